//! The eBPF programs under BPF_PROG_TEST_RUN: loaded by the real loader into a throw-away pin
//! directory, maps filled only through the agent's `Dataplane` trait, crafted frames in, verdict
//! and the complete output frame checked (checksums by the independent code in
//! `kproxy_tests::frames`), and the per-reason counters.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN) and bpffs on /sys/fs/bpf.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use kproxy::dataplane::{
    Dataplane,
    bpf::BpfDataplane,
    features::{kernel_at_least, xdp_meta},
    loader::{Datapath, MapSizes},
};
use kproxy_common::{
    Affinity4Key, Affinity4Value, Backend4, MAC_MARK, MAC_MARK_OFF, NodeConfig, REASON_MAX, Reason,
    Service4Key, Service4Value, backend_flags, cfg_flags, ct_state, names, proto, rnat_flags,
    scope, svc_flags, timeouts,
};
use kproxy_tests::frames::{self, ACK, FIN, Frame, L4, PSH, RST, SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// kproxy's TC pass, translated or not: `TC_ACT_UNSPEC` (-1, as the test run returns it), which
/// is `TCX_NEXT` (the next program on the hook decides). Every run checks that kproxy never
/// ends the hook with `TC_ACT_OK` ([`Env::tc_run`]).
const TC_PASS: u32 = u32::MAX;
/// `TC_ACT_OK`: a pass that ends the hook, which kproxy never returns.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// Longer than a jiffy at any HZ (100 to 1000): the datapath's clock has moved after it.
const JIFFY: std::time::Duration = std::time::Duration::from_millis(25);

const NODE_IP: &str = "198.18.0.10";
const CLIENT: &str = "198.18.0.2:40000";
const POD_CLIENT: &str = "198.18.100.10:41000";

#[path = "datapath_testrun/shared.rs"]
mod shared;

/// Numbers the pin directories and namespaces of this process.
static N: AtomicU32 = AtomicU32::new(0);

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}
fn be_addr(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// The map sizes of the packet tests' datapaths.
const TEST_SIZES: MapSizes =
    MapSizes { services: 1024, backends: 1024, conntrack: 4096, affinity: 1024, ipv6: true };

/// A loaded datapath for one test, its maps as the agent writes them and its node configuration
/// set: a shared load ([`Env::new`], reset to a fresh load's state for the test, see
/// [`shared`]) or one of the test's own ([`Env::own`], [`Env::with_sizes`]) in a pin directory
/// removed on drop (also on panic).
struct Env {
    dir: PathBuf,
    maps: BpfDataplane,
    lease: Lease,
}

/// Where a test's datapath goes after the test: back to the shared ones, or away with its pin
/// directory.
struct Lease {
    loaded: Option<shared::Loaded>,
    shared: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(l) = self.loaded.take() else { return };
        if self.shared {
            shared::give_back(l);
        } else {
            shared::remove(&l.dir);
        }
    }
}

impl Env {
    /// A shared datapath (for tests that only write maps and run programs).
    fn new() -> Self {
        let loaded = shared::take(|| shared::load(N.fetch_add(1, Ordering::SeqCst), &TEST_SIZES));
        Self::with(Lease { loaded: Some(loaded), shared: true })
    }

    /// A datapath of the test's own (for tests that attach it, load it again or break it).
    fn own() -> Self {
        Self::with_sizes(&TEST_SIZES)
    }

    /// A datapath of the test's own with other map sizes.
    fn with_sizes(sizes: &MapSizes) -> Self {
        let loaded = shared::load(N.fetch_add(1, Ordering::SeqCst), sizes);
        Self::with(Lease { loaded: Some(loaded), shared: false })
    }

    fn with(lease: Lease) -> Self {
        let loaded = lease.loaded.as_ref().expect("a loaded datapath");
        let dir = loaded.dir.clone();
        let mut maps = loaded.dp.dataplane().expect("open maps");
        maps.set_config(&NodeConfig {
            snat_addr: be_addr(NODE_IP.parse().unwrap()),
            snat_port_min: 61000,
            snat_port_max: 65535,
            flags: cfg_flags::READY,
            backend_gen: 0,
        })
        .unwrap();
        Env { dir, maps, lease }
    }

    fn dp(&mut self) -> &mut Datapath {
        &mut self.lease.loaded.as_mut().expect("a loaded datapath").dp
    }

    fn backend(&mut self, id: u32, addr: &str, flags: u8, p: u8) {
        let a = sa(addr);
        self.maps
            .put_backend(
                id,
                &Backend4 { addr: be_addr(*a.ip()), port: a.port().to_be(), proto: p, flags },
            )
            .unwrap();
    }

    /// Writes a service the way the agent does: slots first, the service entry last.
    fn service(&mut self, fe: &str, p: u8, sc: u8, flags: u16, backends: &[u32], svc_id: u32) {
        self.service_aff(fe, p, sc, flags, backends, svc_id, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn service_aff(
        &mut self,
        fe: &str,
        p: u8,
        sc: u8,
        flags: u16,
        backends: &[u32],
        svc_id: u32,
        affinity_timeout: u32,
    ) {
        let a = sa(fe);
        let key = Service4Key {
            addr: be_addr(*a.ip()),
            port: a.port().to_be(),
            proto: p,
            scope: sc,
            slot: 0,
            _pad: 0,
        };
        for (i, id) in backends.iter().enumerate() {
            let k = Service4Key { slot: i as u16 + 1, ..key };
            self.maps
                .put_service(&k, &Service4Value { backend_id: *id, svc_id, ..Default::default() })
                .unwrap();
        }
        self.maps
            .put_service(
                &key,
                &Service4Value {
                    backend_id: 0,
                    svc_id,
                    count: backends.len() as u16,
                    flags,
                    affinity_timeout,
                },
            )
            .unwrap();
    }

    /// Backend 1 on node 1 ([`BE_REMOTE`]) behind the NodePort `NODE_IP:port` (scope
    /// EXTERNAL, service id 1); returns the frontend.
    fn remote_nodeport(&mut self, p: u8, port: u16) -> String {
        self.backend(1, BE_REMOTE, 0, p);
        let np = format!("{NODE_IP}:{port}");
        self.service(&np, p, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        np
    }

    fn counters(&self) -> BTreeMap<Reason, u64> {
        self.maps.counters().unwrap().into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Turns eBPF host routing (`cfg_flags::HOST_ROUTING`) on in the node configuration.
    fn enable_host_routing(&mut self) {
        let cfg = self.maps.config().unwrap();
        let flags = cfg.flags | cfg_flags::HOST_ROUTING;
        self.maps.set_config(&NodeConfig { flags, ..cfg }).unwrap();
    }

    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (v, out, _) = self.xdp_meta(frame);
        (v, out)
    }

    /// Runs the XDP program; also says whether it left its "handled" mark for TC: the metadata
    /// mark (TEST_RUN returns the metadata in front of the frame; split off here) or, where XDP
    /// cannot write metadata, the source-MAC mark (`MAC_MARK`, taken off here as
    /// `kp_tc_ext_xdp` takes it off, so that the frame compares with what the stack gets). A
    /// frame that comes with the bit set gets it checked by [`Self::xdp_raw`] instead.
    fn xdp_meta(&mut self, frame: &[u8]) -> (u32, Vec<u8>, bool) {
        assert_eq!(frame[MAC_MARK_OFF] & MAC_MARK, 0, "input with the source-MAC mark: xdp_raw");
        let (v, mut out, meta) = self.xdp_raw(frame);
        let markable = out.len() >= 14
            && matches!(out[12..14], [0x08, 0x00] | [0x86, 0xdd] | [0x81, 0x00] | [0x88, 0xa8]);
        let mac = v == XDP_PASS && markable && out[MAC_MARK_OFF] & MAC_MARK != 0;
        if mac {
            assert!(!xdp_meta_offered(), "source-MAC mark where XDP can write metadata");
            out[MAC_MARK_OFF] &= !MAC_MARK;
        }
        (v, out, meta || mac)
    }

    /// Runs the XDP program: its verdict, its output frame as it is, and whether the output
    /// carries the metadata mark (split off).
    fn xdp_raw(&mut self, frame: &[u8]) -> (u32, Vec<u8>, bool) {
        let p: &mut Xdp = self.dp().program_mut(names::PROG_XDP_EXT).unwrap().try_into().unwrap();
        let mut out = vec![0u8; 2048];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test_run xdp");
        out.truncate(r.data_size_out as usize);
        if out.starts_with(b"KPX1") {
            (r.return_value, out.split_off(4), true)
        } else {
            (r.return_value, out, false)
        }
    }

    /// [`Self::tc`] for a packet that arrived on device `ingress_ifindex` (`__sk_buff` context:
    /// zero but for `ingress_ifindex`; see [`skip_without_ingress_device`]).
    fn tc_from(&mut self, name: &str, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
        /// Offset of `ingress_ifindex` in `struct __sk_buff`.
        const INGRESS_IFINDEX: usize = 36;
        let mut ctx = [0u8; INGRESS_IFINDEX + 4];
        ctx[INGRESS_IFINDEX..].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        self.tc_run(name, frame, Some(&ctx))
    }

    fn tc(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run(name, frame, None)
    }

    fn tc_run(&mut self, name: &str, frame: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>) {
        let p: &mut SchedClassifier = self.dp().program_mut(name).unwrap().try_into().unwrap();
        let mut out = vec![0u8; 2048];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx,
                ..Default::default()
            })
            .expect("test_run tc");
        out.truncate(r.data_size_out as usize);
        // A pass goes on to the programs behind kproxy's on the hook, translated or not.
        let v = r.return_value;
        assert_ne!(v, TC_ACT_OK, "{name}: TC_ACT_OK (the end of the hook) for a pass");
        (v, out)
    }
}

/// Asserts the output frame equals `want` byte for byte and has valid checksums.
#[track_caller]
fn assert_frame(got: &[u8], want: &Frame) {
    if let Err(e) = frames::verify_checksums(got) {
        panic!("{e}: {:?}", frames::decode(got));
    }
    assert_eq!(frames::decode(got).as_ref(), Some(want), "decoded frame");
    assert_eq!(got, &want.build()[..], "frame bytes");
}

/// Whether a test of [`Env::tc_from`] is skipped on this kernel (said on stderr): the kernels of
/// the matrix from 6.1 on take an skb's ingress device in `BPF_PROG_TEST_RUN`'s context; before
/// 5.15 it is not assumed (5.10 is not tried).
fn skip_without_ingress_device() -> bool {
    let skip = !kernel_at_least(5, 15);
    if skip {
        eprintln!("skipped: BPF_PROG_TEST_RUN's skb context with an ingress device needs 5.15");
    }
    skip
}

/// Whether the kernel lets XDP write metadata (`features::xdp_meta`; asked once).
fn xdp_meta_offered() -> bool {
    static META: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *META.get_or_init(xdp_meta)
}

/// Asserts that XDP left its "handled" mark for TC (`want`) or not, where that can be seen:
/// BPF_PROG_TEST_RUN returns the metadata since Linux 5.16; where the kernel withholds
/// `bpf_xdp_adjust_meta` from XDP (`names::GLOBAL_XDP_META`) the mark is in the source MAC, seen
/// on every kernel.
#[track_caller]
fn assert_marked(marked: bool, want: bool) {
    if xdp_meta_offered() && !kernel_at_least(5, 16) {
        return;
    }
    assert_eq!(marked, want, "XDP's mark for TC");
}

#[track_caller]
fn assert_counts(env: &Env, want: &[(Reason, u64)]) {
    let want: BTreeMap<Reason, u64> = want.iter().copied().collect();
    assert_eq!(env.counters(), want);
}

/// Asserts that `reply`, a reply of a connection from a pod of this node run through `prog`, a
/// program before the node's stack ([`names::PROG_XDP_EXT`], [`names::PROG_TC_EXT`] or
/// [`names::PROG_TC_FROM_POD`]), passes untouched and is counted once, as `PassReplyToPod`:
/// the stack forwards it as the backend sent it, and [`names::PROG_TC_TO_POD`] translates it
/// where it enters the client pod. XDP marks it handled for TC (see [`assert_marked`]).
#[track_caller]
fn assert_reply_passed_to_the_stack(env: &mut Env, prog: &str, reply: &[u8]) {
    let mut want = env.counters();
    *want.entry(Reason::PassReplyToPod).or_default() += 1;
    let out = if prog == names::PROG_XDP_EXT {
        let (v, out, marked) = env.xdp_meta(reply);
        assert_eq!(v, XDP_PASS, "{prog}");
        assert_marked(marked, true);
        out
    } else {
        let (v, out) = env.tc(prog, reply);
        assert_eq!(v, TC_PASS, "{prog}");
        out
    };
    assert_eq!(out, reply, "{prog}: passed untouched");
    assert_eq!(env.counters(), want, "{prog}: counted as PassReplyToPod");
}

const CIP: &str = "198.19.0.10:80";
const BE1: &str = "198.18.100.11:8080";
const BE2: &str = "198.18.100.12:8080";
const BE_REMOTE: &str = "198.18.101.10:8080";

/// Runs `f` on a thread in a fresh, unnamed network namespace set up for FIB lookups: a veth
/// pair inside it, the node address, a route to node 1's pod CIDR and permanent neighbours.
/// The namespace (and everything in it) disappears when the thread ends, also on panic.
fn in_test_netns<F: FnOnce() + Send + 'static>(with_neighbours: bool, f: F) {
    let h = std::thread::spawn(move || {
        // SAFETY: unshare on this thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        let sh = |cmd: &str| {
            let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
        };
        sh("ip link set lo up");
        sh(
            "ip link add kpt0 address 02:00:00:00:00:10 type veth peer name kpt1 address 02:00:00:00:00:01",
        );
        sh("ip link set kpt0 up && ip link set kpt1 up");
        sh(&format!("ip addr add {NODE_IP}/24 dev kpt0"));
        sh("ip route add 198.18.101.0/24 via 198.18.0.11 dev kpt0");
        if with_neighbours {
            sh("ip neigh add 198.18.0.11 lladdr 02:00:00:00:00:11 dev kpt0 nud permanent");
            sh("ip neigh add 198.18.0.2 lladdr 02:00:00:00:00:02 dev kpt0 nud permanent");
            // kpt1 plays a pod interface: pod 198.18.100.10 behind it.
            sh("ip route add 198.18.100.10/32 dev kpt1");
            sh("ip neigh add 198.18.100.10 lladdr 02:00:00:00:00:a0 dev kpt1 nud permanent");
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/lo/forwarding", "1").unwrap();
        f();
    });
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn programs_pass_verifier_and_pinned_maps_are_reused() {
    let mut env = Env::own();
    env.backend(7, BE1, 0, proto::TCP);
    // A second load reuses the pinned maps: the backend written through the first is visible.
    let dp2 = Datapath::load(&env.dir, &MapSizes::default()).unwrap();
    let maps2 = dp2.dataplane().unwrap();
    assert_eq!(maps2.backends().unwrap().len(), 1);
    assert_eq!(maps2.config().unwrap().flags, cfg_flags::READY);
    // The maps stay usable with no loader alive at all (what the CLI does).
    drop((dp2, maps2));
    let cli = BpfDataplane::open(&env.dir).unwrap();
    assert_eq!(cli.backends().unwrap()[0].0, 7);
    assert_eq!(cli.counters().unwrap().len(), Reason::ALL.len());
    for m in names::ALL_MAPS {
        assert!(env.dir.join("v1").join(m).exists(), "{m} pinned");
    }
    env.dp().detach("kproxy-no-such-dev").unwrap();
}

/// The programs a packet of an established or new connection runs call no byte-wise memory
/// subprogram. LLVM turns some copies and zeroings (a padding literal such as `_pad: [0; 3]`,
/// an array field assigned through pointers) into calls of `memset` / `memmove`, which the BPF
/// target builds as byte-at-a-time loops in a subprogram of their own: a call and a loop where
/// a few stores would do, on every packet. Only the rejection paths (frames built from zeroed
/// buffers) may keep them.
#[test]
fn per_packet_programs_call_no_bytewise_memory_subprogram() {
    let mut env = Env::new();
    let progs = [
        names::PROG_XDP_EXT,
        names::PROG_TC_EXT,
        names::PROG_TC_FROM_POD,
        names::PROG_TC_TO_POD,
        names::PROG_XDP_NEW,
        names::PROG_XDP_NEW6,
        names::PROG_TC_POD_NEW6,
        names::PROG_TC_EXT_NEW6,
        names::PROG_XDP_CONN6,
        names::PROG_TC_POD_CONN6,
        names::PROG_TC_EXT_CONN6,
    ];
    for name in progs {
        let id = env
            .dp()
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .info()
            .unwrap()
            .id();
        let out = Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool prog dump xlated id {id}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().count() > 100, "{name}: no instructions dumped");
        let calls: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("call") && ["memset", "memmove", "memcpy"].iter().any(|m| l.contains(m))
            })
            .collect();
        assert!(calls.is_empty(), "{name} calls a byte-wise memory subprogram: {calls:#?}");
    }
}

/// Pins at `pin` a new backends-like hash map (4-byte keys, `value_size`-byte values, 16
/// entries), as another layout or a half-made map would leave it.
fn pin_backends_map(pin: &Path, value_size: u32) {
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin)
        .args(["type", "hash", "key", "4", "value", &value_size.to_string()])
        .args(["entries", "16", "name", "kp_be4"])
        .status()
        .expect("bpftool");
    assert!(st.success(), "bpftool map create {}", pin.display());
}

#[test]
fn pinned_map_with_wrong_layout_is_refused() {
    let env = Env::own();
    // Replace the backends pin by a map with another value size.
    let pin = env.dir.join("v1").join(names::BACKENDS4);
    std::fs::remove_file(&pin).unwrap();
    pin_backends_map(&pin, 12);
    let err = Datapath::load(&env.dir, &MapSizes::default()).err().expect("must refuse");
    let msg = format!("{err:#}");
    assert!(msg.contains("does not match ABI") && msg.contains("kp_be4"), "{msg}");
    assert!(BpfDataplane::open(&env.dir).is_err());
}

/// A struct for [`pin_map_with_btf`]: its size and members (name, size of an integer, byte
/// offset); no members: an integer of that size.
type BtfStruct<'a> = (u32, &'a [(&'a str, u32, u32)]);

/// Pins at `pin` a new map named `name` of type `map_type` (16 entries) whose key and value
/// BTF are `key` and `value`, as a build with those layouts would have left it.
fn pin_map_with_btf(
    pin: &Path,
    name: &str,
    map_type: aya_obj::generated::bpf_map_type,
    key: BtfStruct,
    value: BtfStruct,
) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use kproxy::dataplane::sys;
    let mut strings: Vec<u8> = vec![0];
    let mut string = |s: &str| {
        let at = strings.len() as u32;
        strings.extend(s.as_bytes());
        strings.push(0);
        at
    };
    // [1] u8, [2] u16, [3] u32, [4] u64 (INT: name, kind 1, size, encoding with the bits).
    let mut types: Vec<u32> = Vec::new();
    for size in [1, 2, 4, 8] {
        types.extend([string(&format!("u{}", size * 8)), 1 << 24, size, size * 8]);
    }
    let int = |size: u32| size.trailing_zeros() + 1;
    // Then the key's struct and the value's, where they are structs.
    let (mut ids, mut next) = ([0; 2], 5);
    for (n, (size, members)) in [key, value].into_iter().enumerate() {
        if members.is_empty() {
            ids[n] = int(size);
            continue;
        }
        (ids[n], next) = (next, next + 1);
        types.extend([string(&format!("T{n}")), (4 << 24) | members.len() as u32, size]);
        for (m, msize, off) in members {
            types.extend([string(m), int(*msize), off * 8]);
        }
    }
    let type_len = (types.len() * 4) as u32;
    let mut blob: Vec<u8> = vec![0x9f, 0xeb, 1, 0];
    for w in [24, 0, type_len, type_len, strings.len() as u32] {
        blob.extend(u32::to_le_bytes(w));
    }
    blob.extend(types.iter().flat_map(|w| w.to_le_bytes()));
    blob.extend(&strings);
    let mut attr = sys::attr();
    attr.__bindgen_anon_7.btf = blob.as_ptr() as u64;
    attr.__bindgen_anon_7.btf_size = blob.len() as u32;
    // SAFETY: the blob outlives the call; no log buffer.
    let btf = unsafe { sys::bpf(sys::bpf_cmd::BPF_BTF_LOAD, &mut attr) }.expect("BTF_LOAD");
    // SAFETY: a new file descriptor we own.
    let btf = unsafe { OwnedFd::from_raw_fd(btf as i32) };
    let mut attr = sys::attr();
    // SAFETY: union access; the map-create member is the one BPF_MAP_CREATE reads.
    let m = unsafe { &mut attr.__bindgen_anon_1 };
    m.map_type = map_type as u32;
    (m.key_size, m.value_size, m.max_entries) = (key.0, value.0, 16);
    for (d, c) in m.map_name.iter_mut().zip(name.bytes()) {
        *d = c as _;
    }
    (m.btf_fd, m.btf_key_type_id, m.btf_value_type_id) = (btf.as_raw_fd() as u32, ids[0], ids[1]);
    // SAFETY: a plain attribute block; the BTF fd is open.
    let map = unsafe { sys::bpf(sys::bpf_cmd::BPF_MAP_CREATE, &mut attr) }.expect("MAP_CREATE");
    // SAFETY: a new file descriptor we own.
    let map = unsafe { OwnedFd::from_raw_fd(map as i32) };
    aya::maps::MapData::from_fd(map).unwrap().pin(pin).unwrap();
}

/// Pins at `pin` a backends-like hash map whose sizes are this build's (4-byte keys, 8-byte
/// values) but whose BTF lays the value out otherwise: the port first, the address last, as a
/// build that reordered `Backend4` without a new ABI version would leave it.
fn pin_reordered_backends_map(pin: &Path) {
    let value = [("port", 2, 0), ("proto", 1, 2), ("flags", 1, 3), ("addr", 4, 4)];
    let hash = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH;
    pin_map_with_btf(pin, names::BACKENDS4, hash, (4, &[]), (8, &value));
}

/// A map pinned by a build of the same ABI version from before one of its padding fields got
/// a meaning (`Affinity4Value`'s `_pad: u32` became `slot: u16, _pad: u16`) is reused as it is:
/// its entries read the new field as 0, which the programs take for "not recorded".
#[test]
fn a_map_pinned_before_its_padding_got_a_field_is_reused() {
    let env = Env::own();
    let pin = env.dir.join("v1").join(names::AFFINITY4);
    std::fs::remove_file(&pin).unwrap();
    let key = [("client_addr", 4, 0), ("svc_id", 4, 4)];
    let value = [("backend_id", 4, 0), ("_pad", 4, 4), ("last_used_ns", 8, 8)];
    let lru = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH;
    pin_map_with_btf(&pin, names::AFFINITY4, lru, (8, &key), (16, &value));
    let id = aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap().id();
    let _dp = Datapath::load(&env.dir, &TEST_SIZES).expect("reuses the map");
    let reused = aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap().id();
    assert_eq!(reused, id, "the pinned map is kept");
}

/// A map pinned by a build whose value layout differs at equal sizes is refused (its entries
/// would be read with this build's field offsets), with the fields that differ in the error.
#[test]
fn pinned_map_with_reordered_fields_is_refused() {
    let env = Env::own();
    let pin = env.dir.join("v1").join(names::BACKENDS4);
    std::fs::remove_file(&pin).unwrap();
    pin_reordered_backends_map(&pin);
    let err = Datapath::load(&env.dir, &MapSizes::default()).err().expect("must refuse");
    let msg = format!("{err:#}");
    assert!(msg.contains("does not match ABI") && msg.contains("kp_be4"), "{msg}");
    assert!(msg.contains("pinned field port (byte 0"), "names where the fields differ: {msg}");
    // The CLI's readers check the same way.
    let err = kproxy::dataplane::loader::check_pinned_layouts(&env.dir).expect_err("must refuse");
    assert!(format!("{err:#}").contains("pinned field port (byte 0"), "{err:#}");
}

/// A counter map pinned by an earlier build with fewer slots (before reasons were added) is
/// re-created with this build's slots at the next load, so that no reason's count falls past its
/// end; the other maps are reused as they are.
#[test]
fn counter_map_of_an_earlier_build_is_recreated_with_this_builds_slots() {
    let env = Env::own();
    let pin = env.dir.join("v1").join(names::COUNTERS);
    std::fs::remove_file(&pin).unwrap();
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "percpu_array", "key", "4", "value", "8", "entries", "32"])
        .args(["name", names::COUNTERS])
        .status()
        .expect("bpftool");
    assert!(st.success(), "bpftool map create {}", pin.display());
    let snat = BpfDataplane::open(&env.dir).unwrap().config().unwrap().snat_addr;
    assert_ne!(snat, 0);
    let _dp = Datapath::load(&env.dir, &TEST_SIZES).expect("loads over the old counter map");
    let show = String::from_utf8(
        Command::new("bpftool").args(["map", "show", "pinned"]).arg(&pin).output().unwrap().stdout,
    )
    .unwrap();
    assert!(show.contains(&format!("max_entries {REASON_MAX} ")), "{show}");
    let maps = BpfDataplane::open(&env.dir).unwrap();
    assert_eq!(maps.counters().unwrap().len(), Reason::ALL.len());
    assert_eq!(maps.config().unwrap().snat_addr, snat, "the node configuration map is reused");
}

#[test]
fn full_map_reports_full() {
    let mut env = Env::with_sizes(&MapSizes {
        services: 4,
        backends: 2,
        conntrack: 64,
        affinity: 8,
        ipv6: true,
    });
    env.backend(1, BE1, 0, proto::TCP);
    env.backend(2, BE2, 0, proto::TCP);
    let err = env.maps.put_backend(3, &Backend4::default()).unwrap_err();
    assert!(matches!(err, kproxy::dataplane::DataplaneError::Full { capacity: 2, .. }), "{err}");
    // Replacing an existing entry still works, deleting an absent one is fine.
    env.backend(2, BE1, 0, proto::TCP);
    env.maps.delete_backend(99).unwrap();
}

/// A new `--max-services` / `--max-backends` at the next start: the maps the agent writes are
/// copied into maps of the new capacity, pinned in their place, and the new programs serve what
/// was programmed, the connections tracked before included; the connection-tracking map (the
/// datapath writes it) keeps its capacity; a capacity below what a map holds is not taken; a
/// resize that stopped halfway is undone by the next load.
#[test]
fn a_new_capacity_of_the_services_and_backends_maps_is_taken_by_copying_them() {
    let small = MapSizes { services: 4, backends: 2, conntrack: 64, affinity: 8, ipv6: true };
    let mut env = Env::with_sizes(&small);
    env.backend(1, BE1, 0, proto::TCP);
    env.backend(2, BE2, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    let backend = frames::decode(&out).unwrap().daddr;
    let v1 = env.dir.join("v1");
    let cap = |name: &str| {
        aya::maps::MapData::from_pin(v1.join(name)).unwrap().info().unwrap().max_entries()
    };

    let big = MapSizes { services: 64, backends: 32, conntrack: 128, ..small };
    let dp = Datapath::load(&env.dir, &big).unwrap();
    assert_eq!((cap(names::SERVICES4), cap(names::BACKENDS4)), (64, 32));
    assert_eq!(cap(names::CT4), 64, "the datapath's own maps keep their capacity");
    for name in [names::SERVICES4, names::BACKENDS4] {
        assert!(!v1.join(format!("{name}-resizing")).exists(), "{name} left set aside");
    }
    env.lease.loaded.as_mut().unwrap().dp = dp;
    env.maps = env.dp().dataplane().unwrap();
    assert_eq!(env.maps.services().unwrap().len(), 3);
    assert_eq!(env.maps.backends().unwrap().len(), 2);
    // The tracked connection goes on to its backend through the new programs and maps, and a
    // new one is balanced.
    let ack = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(frames::decode(&out).unwrap().daddr, backend);
    let syn2 = Frame::tcp(sa("198.18.100.10:41001"), sa(CIP), SYN);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn2.build());
    let d = frames::decode(&out).unwrap().daddr;
    assert!([BE1, BE2].iter().any(|b| *sa(b).ip() == d), "{d}");
    // Room for what did not fit before.
    env.backend(3, "198.18.100.13:8080", 0, proto::TCP);

    // Below the entries held: the map keeps its capacity.
    let tiny = MapSizes { services: 2, backends: 2, ..big };
    drop(Datapath::load(&env.dir, &tiny).unwrap());
    assert_eq!((cap(names::SERVICES4), cap(names::BACKENDS4)), (64, 32));

    // A resize that stopped after setting the map aside: the next load puts it back (the
    // partial map at the pin goes) and resizes again.
    let pin = v1.join(names::BACKENDS4);
    std::fs::rename(&pin, v1.join(format!("{}-resizing", names::BACKENDS4))).unwrap();
    pin_backends_map(&pin, 8);
    let again = MapSizes { backends: 48, ..big };
    let dp = Datapath::load(&env.dir, &again).unwrap();
    assert_eq!(cap(names::BACKENDS4), 48);
    assert_eq!(dp.dataplane().unwrap().backends().unwrap().len(), 3);
}

/// Without eBPF host routing, the replies of a pod's connections cross the node's stack
/// untranslated (`rnat_flags::TO_POD`): `kp_tc_to_pod` restores them whatever device they
/// arrived on, one carrying kproxy's programs (`kp_hookdevs`) included. With host routing it
/// leaves what arrived on such a device as it is (`PassTranslatedUpstream`): those programs
/// translated it already if it needed it. What the node sent itself, or what came in on any
/// other device (one sharing the slot included), is still restored here.
#[test]
fn to_pod_passes_what_a_hooked_device_translated() {
    if skip_without_ingress_device() {
        return;
    }
    let mut env = Env::new();
    env.backend(1, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
    let synack = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK);
    let restored = synack.clone().with_src(sa(CIP));

    const HOOKED: u32 = 7;
    let same_slot = HOOKED + kproxy_common::defaults::HOOK_DEVS_MAX;
    env.dp().set_hook_devs(&[same_slot, HOOKED].into()).unwrap();
    // Without host routing, nothing before the stack translated it: restored here.
    let (v, out) = env.tc_from(names::PROG_TC_TO_POD, &synack.build(), HOOKED);
    assert_eq!(v, TC_PASS, "from a hooked device, without host routing");
    assert_frame(&out, &restored);
    env.enable_host_routing();
    let (v, out) = env.tc_from(names::PROG_TC_TO_POD, &synack.build(), HOOKED);
    assert_eq!((v, out), (TC_PASS, synack.build()), "from a hooked device: untouched");
    for (what, iif) in [("the node itself", 0), ("the same slot", same_slot), ("elsewhere", 8)] {
        let (v, out) = env.tc_from(names::PROG_TC_TO_POD, &synack.build(), iif);
        assert_eq!(v, TC_PASS, "{what}");
        assert_frame(&out, &restored);
    }
    // A device that is no longer recorded takes the full path again.
    env.dp().set_hook_devs(&Default::default()).unwrap();
    let (_, out) = env.tc_from(names::PROG_TC_TO_POD, &synack.build(), HOOKED);
    assert_frame(&out, &restored);
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::PassTranslatedUpstream, 1),
            (Reason::ReplyTranslated, 5),
        ],
    );
}

#[test]
fn not_ready_passes_everything() {
    let mut env = Env::new();
    env.maps.set_config(&NodeConfig::default()).unwrap();
    env.backend(1, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let f = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &f);
    assert_eq!((v, out), (TC_PASS, f.clone()));
    assert_counts(&env, &[(Reason::PassNotReady, 1)]);
    // The fast path reads the configuration only once the hints call for a lookup: the same
    // frame through XDP, a packet from a backend's address and port entering a pod, and a
    // malformed frame (dropped once the agent is ready) all pass untouched, counted alike.
    let (v, out) = env.xdp(&f);
    assert_eq!((v, out), (XDP_PASS, f.clone()));
    let reply = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK).build();
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &reply);
    assert_eq!((v, out), (TC_PASS, reply));
    let mut bad_version = f.clone();
    bad_version[14] = 0x65;
    for (hook, (v, out)) in
        [("tc", env.tc(names::PROG_TC_FROM_POD, &bad_version)), ("xdp", env.xdp(&bad_version))]
    {
        let pass = if hook == "tc" { TC_PASS } else { XDP_PASS };
        assert_eq!((v, &out), (pass, &bad_version), "malformed frame via {hook}");
    }
    assert_counts(&env, &[(Reason::PassNotReady, 5)]);
}

#[test]
fn clusterip_tcp_forward_and_reply() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);

    // SYN from a pod: destination becomes the backend, source is kept.
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn.clone().with_dst(sa(BE1)));

    // Second packet of the connection.
    let data =
        Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK | PSH).with_payload(b"GET / HTTP/1.0\r\n\r\n");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &data.clone().with_dst(sa(BE1)));

    // The reply from the (local) backend leaves its pod: passed to the node's stack as the
    // backend sent it (the stack's conntrack sees pod <-> backend both ways).
    let synack = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK);
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &synack.build());

    // Entering the client pod (to_pod), its source becomes the ClusterIP.
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &synack.clone().with_src(sa(CIP)));
    // The same reply on the external device (as from a remote backend) passes XDP alike.
    assert_reply_passed_to_the_stack(&mut env, names::PROG_XDP_EXT, &synack.build());

    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.state, kproxy_common::ct_state::ESTABLISHED);
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::ReplyTranslated, 1),
            (Reason::PassReplyToPod, 2),
        ],
    );
}

/// eBPF host routing: the reply of a pod's connection to a remote backend arrives on the
/// external device; XDP leaves it to TC untouched (TC delivers it straight into the client's
/// namespace, past the stack), where it is translated. Without host routing XDP passes it
/// untouched to the stack (`PassReplyToPod`, marked handled for TC), and it is translated
/// where it enters the client pod (`kp_tc_to_pod`).
#[test]
fn host_routing_leaves_replies_from_xdp_to_tc() {
    for host_routing in [true, false] {
        let mut env = Env::new();
        if host_routing {
            env.enable_host_routing();
        }
        env.backend(1, BE1, 0, proto::TCP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
        env.tc(names::PROG_TC_FROM_POD, &syn.build());
        let synack = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK);
        let translated = synack.clone().with_src(sa(CIP));
        if host_routing {
            let (v, out, marked) = env.xdp_meta(&synack.build());
            assert_eq!((v, &out, marked), (XDP_PASS, &synack.build(), false), "left to TC");
            let (v, out) = env.tc(names::PROG_TC_EXT, &synack.build());
            assert_eq!(v, TC_PASS, "no route in the test namespace: the stack decides");
            assert_frame(&out, &translated);
        } else {
            assert_reply_passed_to_the_stack(&mut env, names::PROG_XDP_EXT, &synack.build());
            let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
            assert_eq!(v, TC_PASS);
            assert_frame(&out, &translated);
        }
        let mut want = vec![(Reason::TranslatedNew, 1), (Reason::ReplyTranslated, 1)];
        want.push(if host_routing {
            (Reason::XdpPassToTc, 1)
        } else {
            (Reason::PassReplyToPod, 1)
        });
        assert_counts(&env, &want);
    }
}

/// The replies of a connection from a pod of this node (its reverse NAT flagged
/// `rnat_flags::TO_POD`) cross the node's stack as the backend sent them, so that the stack's
/// conntrack sees one connection (pod <-> backend) both ways; they are translated back to the
/// frontend only where they enter the client pod (`kp_tc_to_pod`). For a remote backend
/// (replies arrive on the external device: XDP, or `kp_tc_ext` in TC-only mode) and a local one
/// (replies also leave its veth: `kp_tc_from_pod`), every hook before the stack passes them
/// untouched (`PassReplyToPod`: the external device's without a lookup, as only replies to the
/// node's source-NAT address are translated there) and the connection's state is kept: the
/// first reply marks it established, and the flag survives the refresh.
#[test]
fn pod_client_replies_are_translated_where_they_enter_the_pod() {
    for (be, flags) in [(BE_REMOTE, 0), (BE1, backend_flags::LOCAL)] {
        let mut env = Env::new();
        env.backend(1, be, flags, proto::TCP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        assert_eq!(v, TC_PASS, "{be}");
        assert_frame(&out, &syn.clone().with_dst(sa(be)));
        let ct = env.maps.conntrack().unwrap();
        assert_eq!(ct.len(), 1, "{be}");
        assert_eq!(ct[0].1.state, ct_state::NEW, "{be}");
        let rn = env.maps.revnat().unwrap();
        assert_eq!(rn.len(), 1, "{be}");
        assert_eq!(rn[0].1.flags, rnat_flags::TO_POD, "{be}: the client is a pod of this node");

        // The hooks the reply crosses before the node's stack.
        let mut before = vec![names::PROG_XDP_EXT, names::PROG_TC_EXT];
        if flags & backend_flags::LOCAL != 0 {
            before.push(names::PROG_TC_FROM_POD);
        }
        // The SYN-ACK, then a later reply (no refresh of the established entries) alike.
        let synack = Frame::tcp(sa(be), sa(POD_CLIENT), SYN | ACK);
        let data = Frame::tcp(sa(be), sa(POD_CLIENT), ACK | PSH).with_payload(b"HTTP/1.0 200");
        for (n, reply) in [synack, data].into_iter().enumerate() {
            for prog in &before {
                assert_reply_passed_to_the_stack(&mut env, prog, &reply.build());
            }
            let (v, out) = env.tc(names::PROG_TC_TO_POD, &reply.build());
            assert_eq!(v, TC_PASS, "{be}");
            assert_frame(&out, &reply.clone().with_src(sa(CIP)));
            if n == 0 {
                let ct = env.maps.conntrack().unwrap();
                assert_eq!(ct[0].1.state, ct_state::ESTABLISHED, "{be}: by the first reply");
            }
        }

        let ct = env.maps.conntrack().unwrap();
        assert_eq!(ct.len(), 1, "{be}");
        assert_eq!(ct[0].1.state, ct_state::ESTABLISHED, "{be}");
        let rn = env.maps.revnat().unwrap();
        assert_eq!(rn.len(), 1, "{be}");
        assert_eq!(rn[0].1.flags, rnat_flags::ESTABLISHED | rnat_flags::TO_POD, "{be}");
        let passed = 2 * before.len() as u64;
        assert_counts(
            &env,
            &[
                (Reason::TranslatedNew, 1),
                (Reason::PassReplyToPod, passed),
                (Reason::ReplyTranslated, 2),
            ],
        );
    }
}

/// A translated packet goes on to the programs behind kproxy's on the hook (`TCX_NEXT`). While
/// the agent replaces its tcx links with clsact filters or back (`--tc-attach`), the program
/// behind is kproxy's own, of the other kind: it passes each translated packet as it came
/// (addressed to its backend by then, a reply back from the frontend) and creates no entry, so
/// no packet is translated twice. ClusterIP TCP and UDP to a local and a remote backend, both
/// ways, and a NodePort to a local backend in TC-only mode.
#[test]
fn a_translated_packet_passed_on_is_left_as_it_came_by_a_second_kproxy_program() {
    in_test_netns(true, || {
        // Runs `frame` through `prog`, expecting a translated pass, then its output through
        // `prog` again: passed unchanged, without a new table entry.
        let twice = |env: &mut Env, prog: &str, frame: &Frame, what: &str| {
            let (v, once) = env.tc(prog, &frame.build());
            assert_eq!(v, TC_PASS, "{what}");
            assert_ne!(once, frame.build(), "{what}: translated");
            let entries =
                |env: &Env| (env.maps.conntrack().unwrap().len(), env.maps.revnat().unwrap().len());
            let before = entries(env);
            let (v, again) = env.tc(prog, &once);
            assert_eq!((v, &again), (TC_PASS, &once), "{what}: the second program");
            assert_eq!(entries(env), before, "{what}: no entry of the second program's");
        };
        for (be, flags) in [(BE1, backend_flags::LOCAL), (BE_REMOTE, 0)] {
            let mut env = Env::new();
            env.backend(1, be, flags, proto::TCP);
            env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
            env.backend(2, be, flags, proto::UDP);
            env.service(CIP, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
            let from = names::PROG_TC_FROM_POD;
            let to = names::PROG_TC_TO_POD;
            twice(&mut env, from, &Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN), "SYN");
            twice(&mut env, to, &Frame::tcp(sa(be), sa(POD_CLIENT), SYN | ACK), "SYN-ACK");
            let data = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK | PSH).with_payload(b"GET /");
            twice(&mut env, from, &data, "data");
            let reply = Frame::tcp(sa(be), sa(POD_CLIENT), ACK | PSH).with_payload(b"200");
            twice(&mut env, to, &reply, "reply");
            twice(&mut env, from, &Frame::udp(sa(POD_CLIENT), sa(CIP), b"query"), "UDP");
            twice(&mut env, to, &Frame::udp(sa(be), sa(POD_CLIENT), b"answer"), "UDP answer");
        }
        let mut env = Env::new();
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        let np = format!("{NODE_IP}:30080");
        env.service(&np, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        twice(&mut env, names::PROG_TC_EXT, &Frame::tcp(sa(CLIENT), sa(&np), SYN), "NodePort");
    });
}

/// The fast path looks nothing up for a packet whose hint bits are clear: the agent's writes
/// set the bits of every frontend and backend (before the entries), and clearing them shows that
/// the datapath relies on them. A failed tail call is dropped and counted.
#[test]
fn hint_bitmaps_gate_the_lookups_and_failed_tail_calls_are_counted() {
    use aya::maps::{Array, MapData, ProgramArray};
    use kproxy_common::hints;
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let (cip, be1) = (sa(CIP), sa(BE1));
    {
        let h = env.maps.hints().expect("hint maps");
        let hinted =
            |kind, a: SocketAddrV4| h.hinted(kind, be_addr(*a.ip()), proto::TCP, a.port().to_be());
        assert!(hinted(hints::FRONTEND, cip) && hinted(hints::BACKEND, be1));
        assert!(!hinted(hints::FRONTEND, be1) && !hinted(hints::BACKEND, sa(POD_CLIENT)));
    }

    let syn = Frame::tcp(sa(POD_CLIENT), cip, SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn.clone().with_dst(be1));

    // Without the frontend bits, the next segment of the connection passes untouched; without
    // the backend bits, so does the reply.
    let v1 = env.dir.join("v1");
    let clear = |name: &str, index: u32| {
        let pin = v1.join(name);
        let mut a: Array<MapData, u64> =
            Array::try_from(aya::maps::Map::Array(MapData::from_pin(&pin).unwrap())).unwrap();
        a.set(index, 0, 0).unwrap();
    };
    let data = Frame::tcp(sa(POD_CLIENT), cip, ACK);
    let reply = Frame::tcp(be1, sa(POD_CLIENT), SYN | ACK);
    clear(names::ADDR_BITS, hints::addr_slot(hints::FRONTEND, be_addr(*cip.ip())).0);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_eq!((v, out), (TC_PASS, data.build()));
    clear(names::ADDR_BITS, hints::addr_slot(hints::BACKEND, be_addr(*be1.ip())).0);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &reply.build());
    assert_eq!((v, out), (TC_PASS, reply.build()));
    // The agent's next write of the frontend sets them again.
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &data.clone().with_dst(be1));

    // A new connection needs the slow path: with its table entry gone it is dropped, counted.
    let calls = std::fs::read_dir(env.dir.join("v1").join("calls"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(names::CALLS_TC))
        .expect("tail-call table pin");
    let mut table =
        ProgramArray::try_from(aya::maps::Map::ProgramArray(MapData::from_pin(&calls).unwrap()))
            .unwrap();
    table.clear_index(&kproxy_common::calls::POD_NEW).unwrap();
    let syn2 = Frame::tcp(sa("198.18.100.10:41001"), cip, SYN);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &syn2.build());
    assert_eq!(v, TC_ACT_SHOT);
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::PassNoService, 2),
            (Reason::DropTailCall, 1),
        ],
    );
}

#[test]
fn direct_connection_from_a_port_of_a_closed_translated_one_is_not_rewritten() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn_ack = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK);
    let direct_syn = Frame::tcp(sa(POD_CLIENT), sa(BE1), SYN);

    // A live translated connection keeps its entries: a direct SYN from the same client port
    // passes, and replies are still those of the translated connection (passed to the stack
    // as the reply of a pod's connection, restored where they enter the client pod).
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &direct_syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &direct_syn);
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &syn_ack.build());
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &syn_ack.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn_ack.clone().with_src(sa(CIP)));

    // The client closes it (RST), then opens a connection from the same port straight to the
    // backend's address: the stale entries go, and the backend's replies reach the client as
    // they were sent, from the backend's address.
    let rst = Frame::tcp(sa(POD_CLIENT), sa(CIP), RST | ACK);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &rst.build());
    assert_eq!(v, TC_PASS);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &direct_syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &direct_syn);
    assert!(env.maps.conntrack().unwrap().is_empty(), "{}", show_ct(&env));
    for prog in [names::PROG_TC_FROM_POD, names::PROG_TC_TO_POD] {
        let (v, out) = env.tc(prog, &syn_ack.build());
        assert_eq!(v, TC_PASS);
        assert_frame(&out, &syn_ack);
    }
    let (v, out) = env.xdp(&syn_ack.build());
    assert_eq!(v, XDP_PASS);
    assert_frame(&out, &syn_ack);
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::ReplyTranslated, 1),
            // The last SYN-ACK on the external device: passed without a lookup.
            (Reason::PassReplyToPod, 2),
            (Reason::PassNoService, 3),
            (Reason::PassStaleNatCleared, 1),
        ],
    );
}

/// The agent deletes a translated connection's entries (garbage collection, a flush) while CPUs
/// still hold copies of its reverse-NAT entry (`kp_rnmiss`, kept for the rest of the jiffy), and
/// the client opens a connection from the same port straight to the backend, its SYN on CPU 1:
/// the backend's SYN-ACK on CPU 0 is looked up in the map (a SYN-ACK always is), reaches the
/// client as it was sent, not restored to the old frontend from the copy, and voids the copies
/// (the generation goes up), so that the next reply, an ACK on CPU 1, is not restored from CPU
/// 1's copy either. (On a machine with one CPU every run is on CPU 0.)
#[test]
fn direct_connection_after_the_agent_deleted_a_cached_translation_is_not_rewritten() {
    // The cache is per CPU: the runs on pinned CPUs, so that each CPU's runs share its cache.
    on_cpu0_with_cluster_ip(|mut env| {
        // Several client ports: the copies and the direct replies fall in one jiffy nearly always.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 45000 + i);
            let syn = Frame::tcp(client, sa(CIP), SYN);
            let (v, _) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
            assert_eq!(v, TC_PASS);
            // The SYN-ACK on CPU 1, then a retransmission of it on CPU 0: a copy on each CPU,
            // CPU 0's the later one (when it has expired by the direct SYN-ACK, in a later
            // jiffy, so has CPU 1's, and nothing is left to void).
            let syn_ack = Frame::tcp(sa(BE1), client, SYN | ACK);
            for cpu1 in [true, false] {
                let (v, out) = on_cpu1_if(cpu1, || env.tc(names::PROG_TC_TO_POD, &syn_ack.build()));
                assert_eq!(v, TC_PASS);
                assert_frame(&out, &syn_ack.clone().with_src(sa(CIP)));
            }
            // What the agent's garbage collection or a flush does: both entries go.
            for (t, _) in env.maps.conntrack().unwrap() {
                env.maps.delete_conntrack(&t).unwrap();
            }
            for (t, _) in env.maps.revnat().unwrap() {
                env.maps.delete_revnat(&t).unwrap();
            }
            let direct_syn = Frame::tcp(client, sa(BE1), SYN);
            let (v, out) =
                on_cpu1_if(true, || env.tc(names::PROG_TC_FROM_POD, &direct_syn.build()));
            assert_eq!(v, TC_PASS);
            assert_frame(&out, &direct_syn);
            let ack = Frame::tcp(sa(BE1), client, ACK);
            for (reply, cpu1) in [(&syn_ack, false), (&ack, true)] {
                for prog in [names::PROG_TC_TO_POD, names::PROG_TC_FROM_POD] {
                    let r = on_cpu1_if(cpu1, || env.tc(prog, &reply.build()));
                    assert_eq!(r, (TC_PASS, reply.build()), "port {}: {prog}", 45000 + i);
                }
            }
        }
        let n = u64::from(PORTS);
        assert_counts(
            &env,
            &[
                (Reason::TranslatedNew, n),
                (Reason::ReplyTranslated, 2 * n),
                (Reason::PassNoService, 5 * n),
            ],
        );
    });
}

/// A client that reuses its port (`tcp_tw_reuse`) opens a new connection on the entries of its
/// closed one: the connection entry is taken over in place (not counted as created: the map
/// holds one entry, as before), restarted (state NEW, a new creation time), and the reverse-NAT
/// entry of its reply tuple starts over too (not established until the first reply). When the
/// new connection goes to another backend (the closed one's left the service), its replies get
/// an entry of their own.
#[test]
fn a_client_reusing_its_port_opens_a_new_connection_on_the_closed_ones_entries() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.backend(2, BE2, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let fin = Frame::tcp(sa(POD_CLIENT), sa(CIP), FIN | ACK);
    let mut created = 0;
    for (round, be) in [BE1, BE1, BE2].into_iter().enumerate() {
        if round == 2 {
            env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
        }
        // The datapath's clock moves once per jiffy: a round a jiffy later has a later time.
        std::thread::sleep(JIFFY);
        let before = env.maps.conntrack().unwrap();
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_frame(&out, &syn.clone().with_dst(sa(be)));
        let ct = env.maps.conntrack().unwrap();
        assert_eq!(ct.len(), 1, "round {round}: {}", show_ct(&env));
        let e = ct[0].1;
        assert_eq!(e.state, ct_state::NEW, "round {round}");
        assert_eq!(e.backend_addr, be_addr(*sa(be).ip()), "round {round}");
        if let Some((_, old)) = before.first() {
            assert!(e.created_ns > old.created_ns, "round {round}: a new connection");
        } else {
            created += 1;
        }
        assert_eq!(env.maps.ct_counters().unwrap()[0], created, "round {round}");
        let rn = env.maps.revnat().unwrap();
        let (_, r) = rn.iter().find(|(k, _)| k.saddr == be_addr(*sa(be).ip())).unwrap();
        assert_eq!(r.flags, rnat_flags::TO_POD, "round {round}: {}", show_ct(&env));

        let synack = Frame::tcp(sa(be), sa(POD_CLIENT), SYN | ACK);
        assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &synack.build());
        let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_frame(&out, &synack.clone().with_src(sa(CIP)));
        assert_eq!(env.maps.conntrack().unwrap()[0].1.state, ct_state::ESTABLISHED);
        let (v, _) = env.tc(names::PROG_TC_FROM_POD, &fin.build());
        assert_eq!(v, TC_PASS, "round {round}");
        assert_eq!(env.maps.conntrack().unwrap()[0].1.state, ct_state::CLOSING);
    }
    // The closed connection's entry for replies from the first backend stays until it expires.
    assert_eq!(env.maps.revnat().unwrap().len(), 2, "{}", show_ct(&env));
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 3),
            (Reason::TranslatedEstablished, 3),
            (Reason::PassReplyToPod, 3),
            (Reason::ReplyTranslated, 3),
        ],
    );
}

/// Runs `f` on a thread of its own pinned to CPU 0 ([`pin_thread_to_cpu0`]), so that its test
/// runs share the datapath's per-CPU caches; a panic in it is the caller's.
fn on_cpu0<F: FnOnce() + Send + 'static>(f: F) {
    let h = std::thread::spawn(|| {
        pin_thread_to_cpu0();
        f();
    });
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

/// [`on_cpu0`] with a fresh [`Env`] holding the ClusterIP [`CIP`] (TCP) with the one local
/// backend [`BE1`]: the setting of the per-CPU reverse-NAT cache's tests.
fn on_cpu0_with_cluster_ip<F: FnOnce(Env) + Send + 'static>(f: F) {
    on_cpu0(|| {
        let mut env = Env::new();
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        f(env);
    });
}

/// Pins the calling thread to CPU 0, so that its test runs share the datapath's per-CPU caches.
fn pin_thread_to_cpu0() {
    assert!(pin_thread_to(0), "pinning to CPU 0: {}", std::io::Error::last_os_error());
}

/// Pins the calling thread to `cpu`; false where it cannot run there (no such CPU, or one
/// outside the process's allowed set).
fn pin_thread_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is valid; the set lives across the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs `f` where the calling thread runs (CPU 0), or with `cpu1` on CPU 1 (on CPU 0 where the
/// machine has one CPU) and then back on CPU 0: a packet whose CPU's cache must not matter.
fn on_cpu1_if<T>(cpu1: bool, f: impl FnOnce() -> T) -> T {
    if !cpu1 {
        return f();
    }
    pin_thread_to(1);
    let r = f();
    pin_thread_to_cpu0();
    r
}

/// The fast path remembers a reverse-NAT miss per CPU (the ACK stream of a direct connection
/// from a backend's port is looked up once per jiffy, not once per packet and hook). A new
/// translated connection whose replies carry that tuple voids the remembered miss: its first
/// reply is found on the pods' hooks, translated entering the client pod and passed to the
/// stack as the reply of a pod's connection (`PassReplyToPod`, not a miss) before it (the
/// external device passes traffic to pods without a lookup).
#[test]
fn remembered_reverse_nat_miss_gives_way_to_a_new_translated_connection() {
    // The cache is per CPU: every run on one CPU, so that the runs share it.
    on_cpu0_with_cluster_ip(|mut env| {
        // Several client ports: the miss and the new connection fall in one jiffy nearly
        // always, so a remembered miss that outlived the new entry would show.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 42000 + i);
            // Plain traffic from the backend's port to the client passes untouched on every
            // hook, twice (the second time the miss is remembered).
            let ack = Frame::tcp(sa(BE1), client, ACK);
            for _ in 0..2 {
                for prog in [names::PROG_TC_FROM_POD, names::PROG_TC_TO_POD] {
                    assert_eq!(env.tc(prog, &ack.build()), (TC_PASS, ack.build()), "{prog}");
                }
                assert_eq!(env.xdp(&ack.build()), (XDP_PASS, ack.build()));
            }
            // The client connects from that port to the ClusterIP (balanced to the same
            // backend): the backend's SYN-ACK is a reply now, on every hook (restored entering
            // the client pod, passed to the stack before).
            let syn = Frame::tcp(client, sa(CIP), SYN);
            let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
            assert_eq!(v, TC_PASS);
            assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
            let synack = Frame::tcp(sa(BE1), client, SYN | ACK);
            let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
            assert_eq!(v, TC_PASS);
            assert_frame(&out, &synack.clone().with_src(sa(CIP)));
            for prog in [names::PROG_TC_FROM_POD, names::PROG_XDP_EXT] {
                assert_reply_passed_to_the_stack(&mut env, prog, &synack.build());
            }
        }
        let n = u64::from(PORTS);
        assert_counts(
            &env,
            &[
                // The external device passes the plain traffic without a lookup too.
                (Reason::PassNoService, 4 * n),
                (Reason::TranslatedNew, n),
                (Reason::ReplyTranslated, n),
                (Reason::PassReplyToPod, 4 * n),
            ],
        );
    });
}

/// The fast path also keeps a copy of the reverse-NAT entry a lookup found, per CPU: the
/// following replies of the tuple in the jiffy skip the hash lookup. A copy never outlives a
/// replacement: a client closes its connection through one ClusterIP and opens one from the same
/// port through another to the same backend (the reply tuple is the same, its entry replaced),
/// and the new connection's replies carry the new frontend, also on the CPU that cached the old
/// one. The copy also follows the reply that refreshes the entry (the first one marks it
/// established, in the map too).
#[test]
fn cached_reverse_nat_copy_gives_way_to_a_replaced_entry() {
    // The cache is per CPU: every run on one CPU, so that the runs share it.
    on_cpu0(|| {
        let mut env = Env::new();
        let cip2 = "198.19.0.11:80";
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.service(cip2, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 2);
        // Several client ports: the copy and the replacement fall in one jiffy nearly always.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 44000 + i);
            let synack = Frame::tcp(sa(BE1), client, SYN | ACK);
            let ack = Frame::tcp(sa(BE1), client, ACK);
            for (fe, closing) in [(CIP, true), (cip2, false)] {
                let syn = Frame::tcp(client, sa(fe), SYN);
                let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
                assert_eq!(v, TC_PASS, "{fe}");
                assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
                // The SYN-ACK, then an ACK (from the copy), both from this connection's
                // frontend.
                for reply in [&synack, &ack] {
                    let (v, out) = env.tc(names::PROG_TC_TO_POD, &reply.build());
                    assert_eq!(v, TC_PASS, "{fe}");
                    assert_frame(&out, &reply.clone().with_src(sa(fe)));
                }
                let rn = env.maps.revnat().unwrap();
                let (_, r) = rn.iter().find(|(k, _)| k.dport == client.port().to_be()).unwrap();
                assert_eq!(r.flags, rnat_flags::ESTABLISHED | rnat_flags::TO_POD, "{fe}");
                if closing {
                    let rst = Frame::tcp(client, sa(fe), RST | ACK);
                    assert_eq!(env.tc(names::PROG_TC_FROM_POD, &rst.build()).0, TC_PASS);
                }
            }
        }
        let n = u64::from(PORTS);
        assert_counts(
            &env,
            &[
                (Reason::TranslatedNew, 2 * n),
                (Reason::TranslatedEstablished, n),
                (Reason::ReplyTranslated, 4 * n),
            ],
        );
    });
}

/// A remembered reverse-NAT miss holds for its exact reply tuple only: a backend address and
/// port serving both TCP and UDP, a translated UDP connection, then plain TCP traffic with the
/// same addresses and ports (its miss is remembered, in the same cache slot) and the UDP
/// connection's reply, which must still be found on the pods' hooks: translated entering the
/// client pod, passed to the stack as the reply of a pod's connection (`PassReplyToPod`) before
/// it (the external device passes traffic to pods without a lookup).
#[test]
fn remembered_reverse_nat_miss_is_for_its_protocol_only() {
    // The cache is per CPU: every run on one CPU, so that the runs share it.
    on_cpu0(|| {
        let mut env = Env::new();
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        env.backend(2, BE1, backend_flags::LOCAL, proto::UDP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.service(CIP, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
        // Several client ports: the TCP miss and the UDP reply fall in one jiffy nearly always.
        const PORTS: u16 = 8;
        for i in 0..PORTS {
            let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 43000 + i);
            let q = Frame::udp(client, sa(CIP), b"q");
            let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
            assert_eq!(v, TC_PASS);
            assert_frame(&out, &q.clone().with_dst(sa(BE1)));
            let ack = Frame::tcp(sa(BE1), client, ACK);
            let r = Frame::udp(sa(BE1), client, b"r");
            let to_pod = names::PROG_TC_TO_POD;
            assert_eq!(env.tc(to_pod, &ack.build()), (TC_PASS, ack.build()), "{to_pod}");
            let (v, out) = env.tc(to_pod, &r.build());
            assert_eq!(v, TC_PASS, "{to_pod}");
            assert_frame(&out, &r.clone().with_src(sa(CIP)));
            let from_pod = names::PROG_TC_FROM_POD;
            assert_eq!(env.tc(from_pod, &ack.build()), (TC_PASS, ack.build()), "{from_pod}");
            assert_reply_passed_to_the_stack(&mut env, from_pod, &r.build());
            assert_eq!(env.xdp(&ack.build()), (XDP_PASS, ack.build()));
            assert_reply_passed_to_the_stack(&mut env, names::PROG_XDP_EXT, &r.build());
        }
        let n = u64::from(PORTS);
        assert_counts(
            &env,
            &[
                // The external device passes the plain TCP traffic without a lookup too.
                (Reason::PassNoService, 2 * n),
                (Reason::TranslatedNew, n),
                (Reason::ReplyTranslated, n),
                (Reason::PassReplyToPod, 3 * n),
            ],
        );
    });
}

#[test]
fn clusterip_udp_forward_and_reply_with_and_without_checksum() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:53", backend_flags::LOCAL, proto::UDP);
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let q = Frame::udp(sa(POD_CLIENT), sa("198.19.0.53:53"), b"query");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &q.clone().with_dst(sa("198.18.100.11:53")));
    // The answer leaves the backend's pod untouched (the reply of a pod's connection) and is
    // restored where it enters the client pod.
    let r = Frame::udp(sa("198.18.100.11:53"), sa(POD_CLIENT), b"answer");
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &r.build());
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &r.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &r.clone().with_src(sa("198.19.0.53:53")));

    // UDP without checksum stays without: passed by XDP (reply from a remote backend) and
    // kp_tc_from_pod as it is, restored without checksum by kp_tc_to_pod...
    let mut r0 = r.clone();
    if let L4::Udp { no_checksum, .. } = &mut r0.l4 {
        *no_checksum = true;
    }
    assert_reply_passed_to_the_stack(&mut env, names::PROG_XDP_EXT, &r0.build());
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &r0.build());
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &r0.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &r0.clone().with_src(sa("198.19.0.53:53")));
    // ...and translated without by XDP: a query from an external client to a NodePort of the
    // same (local) backend.
    let np = format!("{NODE_IP}:30053");
    env.service(&np, proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 2);
    let mut q0 = Frame::udp(sa(CLIENT), sa(&np), b"query");
    if let L4::Udp { no_checksum, .. } = &mut q0.l4 {
        *no_checksum = true;
    }
    let (v, out) = env.xdp(&q0.build());
    assert_eq!(v, XDP_PASS);
    assert_frame(&out, &q0.clone().with_dst(sa("198.18.100.11:53")));
    assert_counts(
        &env,
        &[(Reason::TranslatedNew, 2), (Reason::ReplyTranslated, 2), (Reason::PassReplyToPod, 3)],
    );
}

#[test]
fn same_port_different_protocol() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:5353", 0, proto::TCP);
    env.backend(2, "198.18.100.12:5300", 0, proto::UDP);
    env.service("198.19.0.53:53", proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
    let t = Frame::tcp(sa(POD_CLIENT), sa("198.19.0.53:53"), SYN);
    let u = Frame::udp(sa(POD_CLIENT), sa("198.19.0.53:53"), b"q");
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &t.build());
    assert_frame(&out, &t.clone().with_dst(sa("198.18.100.11:5353")));
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &u.build());
    assert_frame(&out, &u.clone().with_dst(sa("198.18.100.12:5300")));
}

#[test]
fn not_for_service_passes_byte_identical() {
    let mut env = Env::new();
    env.backend(1, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let frames_in = [
        Frame::tcp(sa(POD_CLIENT), sa("198.19.0.10:81"), SYN).build(), // other port
        Frame::udp(sa(POD_CLIENT), sa("198.19.0.10:80"), b"x").build(), // other protocol
        Frame::tcp(sa(POD_CLIENT), sa("198.18.0.99:80"), SYN).build(), // other address
    ];
    for f in &frames_in {
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, f);
        assert_eq!((v, &out), (TC_PASS, f));
        let (v, out) = env.xdp(f);
        assert_eq!((v, &out), (XDP_PASS, f));
    }
    // ARP and ICMP echo.
    let mut arp = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN).build();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &arp);
    assert_eq!((v, &out), (TC_PASS, &arp));
    let mut ping = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    ping.l4 = L4::Icmp { typ: 8, code: 0, rest: [0, 1, 0, 1], payload: vec![1, 2, 3, 4] };
    let ping = ping.build();
    let (v, out) = env.xdp(&ping);
    assert_eq!((v, &out), (XDP_PASS, &ping));
    assert_counts(
        &env,
        &[(Reason::PassNotIpv4, 1), (Reason::PassNoService, 6), (Reason::PassUnsupportedProto, 1)],
    );
}

#[test]
fn nodeport_local_backend_no_snat() {
    in_test_netns(true, || {
        let mut env = Env::new();
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        let np = format!("{NODE_IP}:30080");
        env.service(&np, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        let syn = Frame::tcp(sa(CLIENT), sa(&np), SYN);
        let (v, out, marked) = env.xdp_meta(&syn.build());
        assert_eq!(v, XDP_PASS);
        // BPF_PROG_TEST_RUN returns the XDP metadata since Linux 5.16 only.
        assert_marked(marked, true);
        assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
        // The same in TC-only mode, for another client port.
        let syn2 = syn.clone().with_src(sa("198.18.0.2:40001"));
        let (v, out) = env.tc(names::PROG_TC_EXT, &syn2.build());
        assert_eq!(v, TC_PASS);
        assert_frame(&out, &syn2.clone().with_dst(sa(BE1)));
        // The reply leaves the backend pod: source becomes node IP:NodePort (client address
        // preserved), and since the stack would drop a packet from its own address arriving
        // on a pod interface, it goes straight out through the FIB.
        let synack = Frame::tcp(sa(BE1), sa(CLIENT), SYN | ACK);
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &synack.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let mut want = synack
            .clone()
            .with_src(sa(&np))
            .with_macs([2, 0, 0, 0, 0, 0x02], [2, 0, 0, 0, 0, 0x10]);
        want.ttl = 63;
        assert_frame(&out, &want);
        // A pod reaching the NodePort uses the INTERNAL scope entry only: none here, untouched.
        let from_pod = Frame::tcp(sa(POD_CLIENT), sa(&np), SYN).build();
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &from_pod);
        assert_eq!((v, out), (TC_PASS, from_pod));
    });
}

#[test]
fn nodeport_remote_backend_snat_fib_forward_and_reply() {
    in_test_netns(true, || {
        let mut env = Env::new();
        let np = env.remote_nodeport(proto::TCP, 30080);
        let kpt0 = ifindex("kpt0");
        assert_ne!(kpt0, 0);

        let syn = Frame::tcp(sa(CLIENT), sa(&np), SYN);
        let (v, out) = env.xdp(&syn.build());
        assert_eq!(v, XDP_REDIRECT, "redirected to kpt0");
        let got = frames::decode(&out).unwrap();
        let L4::Tcp { sport: snat_port, .. } = got.l4 else { panic!() };
        assert!((61000..=65535).contains(&snat_port), "{snat_port}");
        let mut want = syn
            .clone()
            .with_src(SocketAddrV4::new(NODE_IP.parse().unwrap(), snat_port))
            .with_dst(sa(BE_REMOTE))
            .with_macs([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x10]);
        want.ttl = 63;
        assert_frame(&out, &want);

        let ct = env.maps.conntrack().unwrap();
        assert_eq!(ct.len(), 1);
        assert_eq!(ct[0].1.snat_port, snat_port.to_be());

        // TC-only mode takes the same decision for the established connection.
        let ack = Frame::tcp(sa(CLIENT), sa(&np), ACK);
        let (v, out) = env.tc(names::PROG_TC_EXT, &ack.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let mut want_ack = ack
            .clone()
            .with_src(SocketAddrV4::new(NODE_IP.parse().unwrap(), snat_port))
            .with_dst(sa(BE_REMOTE))
            .with_macs([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x10]);
        want_ack.ttl = 63;
        assert_frame(&out, &want_ack);

        // The backend's reply comes back to the node's SNAT port and is sent to the client.
        let synack = Frame::tcp(
            sa(BE_REMOTE),
            SocketAddrV4::new(NODE_IP.parse().unwrap(), snat_port),
            SYN | ACK,
        )
        .with_macs([2, 0, 0, 0, 0, 0x10], [2, 0, 0, 0, 0, 0x11]);
        let (v, out) = env.xdp(&synack.build());
        assert_eq!(v, XDP_REDIRECT, "to kpt0 (test runs on lo)");
        let mut want = synack
            .clone()
            .with_src(sa(&np))
            .with_dst(sa(CLIENT))
            .with_macs([2, 0, 0, 0, 0, 0x02], [2, 0, 0, 0, 0, 0x10]);
        want.ttl = 63;
        assert_frame(&out, &want);
        assert_counts(
            &env,
            &[
                (Reason::TranslatedNew, 1),
                (Reason::TranslatedEstablished, 1),
                (Reason::ReplyTranslated, 1),
            ],
        );
    });
}

#[test]
fn xdp_route_cache_follows_a_neighbour_change() {
    in_test_netns(true, || {
        // The cache is per CPU: every run on one CPU, so that the runs share it.
        pin_thread_to_cpu0();
        let mut env = Env::new();
        let np = env.remote_nodeport(proto::UDP, 30054);
        let q = Frame::udp(sa(CLIENT), sa(&np), b"q");
        let dmac = |out: &[u8]| -> [u8; 6] { out[..6].try_into().unwrap() };
        // The first datagram looks the route up, the second reuses it (same result).
        for _ in 0..2 {
            let (v, out) = env.xdp(&q.build());
            assert_eq!(v, XDP_REDIRECT);
            assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x11]);
        }
        // A datagram larger than the one the route was checked with is looked up again (the
        // forwarding check depends on the length).
        let big = Frame::udp(sa(CLIENT), sa(&np), &[7u8; 1000]);
        let (v, out) = env.xdp(&big.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x11]);
        // The next hop's MAC changes: once the cached route is older than its lifetime, the
        // packets follow the new neighbour entry.
        let st = Command::new("sh")
            .args([
                "-c",
                "ip neigh replace 198.18.0.11 lladdr 02:00:00:00:00:12 dev kpt0 nud permanent",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        std::thread::sleep(std::time::Duration::from_nanos(3 * timeouts::ROUTE_CACHE_NS));
        let (v, out) = env.xdp(&q.build());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(dmac(&out), [2, 0, 0, 0, 0, 0x12]);
        assert_counts(&env, &[(Reason::TranslatedNew, 1), (Reason::TranslatedEstablished, 3)]);
    });
}

/// The per-CPU array `map` (an internal, unpinned one, such as a route cache) that program
/// `prog` uses, its values as `N` bytes.
fn per_cpu_map<const N: usize>(
    env: &mut Env,
    prog: &str,
    map: &str,
) -> aya::maps::PerCpuArray<aya::maps::MapData, [u8; N]> {
    use aya::maps::{Map, MapData, MapInfo};
    let p = env.dp().program_mut(prog).unwrap();
    for id in p.info().unwrap().map_ids().unwrap().expect("map ids") {
        if MapInfo::from_id(id).unwrap().name_as_str() == Some(map) {
            let m = Map::PerCpuArray(MapData::from_id(id).unwrap());
            return m.try_into().unwrap();
        }
    }
    panic!("{prog} uses no {map}")
}

/// The per-CPU route cache (`kp_route4`) the datapath's programs share.
fn route_cache(env: &mut Env) -> aya::maps::PerCpuArray<aya::maps::MapData, [u8; 40]> {
    per_cpu_map(env, names::PROG_TC_FROM_POD, "kp_route4")
}

/// eBPF host routing: TC reuses a route it looked up, as XDP does (the same per-CPU cache): a
/// packet of the connection after the first goes where the cached entry says, a GSO
/// super-packet too (forwardable whatever its length, as to the kernel's lookup); a GSO
/// packet's own lookup admits the egress device's MTU, not the super-packet's length.
#[test]
fn tc_reuses_its_route_lookups_for_gso_packets_too() {
    in_test_netns(true, || {
        // The cache is per CPU: every run on one CPU, so that the runs share it.
        pin_thread_to_cpu0();
        let mut env = Env::new();
        env.enable_host_routing();
        env.backend(1, BE_REMOTE, 0, proto::TCP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        let dmac = |out: &[u8]| -> [u8; 6] { out[..6].try_into().unwrap() };
        const NEXT_HOP: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
        const CACHED: [u8; 6] = [2, 0, 0, 0, 0, 0x99];
        // The egress device's MTU below the GSO super-packet's length (below).
        sh_out("ip link set dev kpt0 mtu 1000");
        let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, NEXT_HOP));
        // The lookup is in CPU 0's slot of the backend's address: give it another next hop,
        // and a stamp from the future, so that it stays fresh however slowly the test runs (a
        // kernel under emulation takes longer than the cache's 20 ms between two runs).
        let mut cache = route_cache(&mut env);
        let be = be_addr(*sa(BE_REMOTE).ip()).to_ne_bytes();
        let (slot, values) = (0..cache.len())
            .map(|i| (i, cache.get(&i, 0).unwrap()))
            .find(|(_, v)| v[0][4..8] == be)
            .expect("a cached route to the backend");
        let mut values = values.to_vec();
        values[0][16..22].copy_from_slice(&CACHED);
        values[0][32..40].copy_from_slice(&u64::MAX.to_ne_bytes());
        let values = aya::maps::PerCpuValues::try_from(values).unwrap();
        cache.set(slot, values, 0).unwrap();
        let ack = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK);
        let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, CACHED), "the cached route");
        // A GSO super-packet of three 500-byte segments, longer (1,440 bytes of IP) than the
        // egress device's MTU (1,000): `gso_segs` and `gso_size` in the context
        // (`struct __sk_buff` offsets 164 and 176).
        let mut ctx = [0u8; 180];
        ctx[164..168].copy_from_slice(&3u32.to_ne_bytes());
        ctx[176..180].copy_from_slice(&500u32.to_ne_bytes());
        let big = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK).with_payload(&[7u8; 1400]).build();
        let (v, out) = env.tc_run(names::PROG_TC_FROM_POD, &big, Some(&ctx));
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, CACHED), "a GSO packet takes the cache");
        // Its own lookup, once the entry is stale: cached with the device's MTU as the length
        // it admits, which a plain packet of the super-packet's length then exceeds.
        let mut values = cache.get(&slot, 0).unwrap().to_vec();
        values[0][32..40].copy_from_slice(&0u64.to_ne_bytes());
        cache.set(slot, aya::maps::PerCpuValues::try_from(values).unwrap(), 0).unwrap();
        let (v, out) = env.tc_run(names::PROG_TC_FROM_POD, &big, Some(&ctx));
        assert_eq!((v, dmac(&out)), (TC_ACT_REDIRECT, NEXT_HOP), "a GSO packet's lookup");
        let e = cache.get(&slot, 0).unwrap()[0];
        let max_len = u16::from_ne_bytes([e[28], e[29]]);
        // Linux returns the MTU from 5.12 on; before, none (0): only GSO packets take the entry.
        let want = if kernel_at_least(5, 12) { 1000 } else { 0 };
        assert_eq!(max_len, want, "a GSO packet's lookup admits the MTU, not its own length");
        assert_counts(&env, &[(Reason::TranslatedNew, 1), (Reason::TranslatedEstablished, 3)]);
    });
}

#[test]
fn nodeport_remote_without_neighbour_goes_xdp_to_tc() {
    in_test_netns(false, || {
        let mut env = Env::new();
        let np = env.remote_nodeport(proto::UDP, 30053);
        let q = Frame::udp(sa(CLIENT), sa(&np), b"q");
        // XDP cannot resolve the neighbour: the packet goes up untouched, unmarked (a frame
        // that came with the source-MAC mark loses it: TC must not take it for XDP's)...
        let (v, out, marked) = env.xdp_meta(&q.build());
        assert_eq!((v, &out, marked), (XDP_PASS, &q.build(), false));
        let mut forged = q.build();
        forged[MAC_MARK_OFF] |= MAC_MARK;
        assert_eq!(env.xdp_raw(&forged), (XDP_PASS, q.build(), false), "mark taken off");
        // ...and TC behind XDP (its complete path) translates it and hands it to
        // bpf_redirect_neigh.
        let (v, out) = env.tc(names::PROG_TC_EXT_XDP, &q.build());
        assert_eq!(v, TC_ACT_REDIRECT);
        let got = frames::decode(&out).unwrap();
        let L4::Udp { sport, .. } = got.l4 else { panic!() };
        let mut want = q
            .clone()
            .with_src(SocketAddrV4::new(NODE_IP.parse().unwrap(), sport))
            .with_dst(sa(BE_REMOTE));
        want.ttl = 63;
        assert_frame(&out, &want);
        let c = env.counters();
        assert_eq!(c.get(&Reason::XdpPassToTc), Some(&2));
        assert_eq!(c.values().sum::<u64>(), 3);
    });
}

/// Where XDP cannot write metadata it marks what it handled in the source MAC (`MAC_MARK`):
/// `kp_tc_ext_xdp`, TC behind XDP, passes a marked IPv4 or IPv6 frame without a lookup and takes
/// the bit off; the rest takes the complete path (`kp_tc_ext`'s). `kp_tc_ext`,
/// where TC runs alone, never takes the bit for a mark: a frame can come with it from the wire.
#[test]
fn tc_behind_xdp_takes_the_source_mac_mark() {
    in_test_netns(true, || {
        let mut env = Env::new();
        env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
        let np = format!("{NODE_IP}:30080");
        env.service(&np, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        let mark = |f: &Frame| {
            let mut b = f.build();
            b[MAC_MARK_OFF] |= MAC_MARK;
            b
        };
        let syn = Frame::tcp(sa(CLIENT), sa(&np), SYN);
        let (v, out) = env.tc(names::PROG_TC_EXT_XDP, &mark(&syn));
        assert_eq!((v, &out), (TC_PASS, &syn.build()), "passed as it came, the bit taken off");
        assert_counts(&env, &[(Reason::PassHandledByXdp, 1)]);
        let (v, out) = env.tc(names::PROG_TC_EXT_XDP, &syn.build());
        assert_eq!(v, TC_PASS);
        assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
        // TC alone translates a frame that came with the bit, and takes the bit off.
        let syn2 = syn.clone().with_src(sa("198.18.0.2:40001"));
        let (v, out) = env.tc(names::PROG_TC_EXT, &mark(&syn2));
        assert_eq!(v, TC_PASS);
        assert_frame(&out, &syn2.clone().with_dst(sa(BE1)));
        // Neither IPv4 nor IPv6: XDP decided it; passed, a bit taken off.
        let mut arp = syn.build();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut arp_marked = arp.clone();
        arp_marked[MAC_MARK_OFF] |= MAC_MARK;
        assert_eq!(env.tc(names::PROG_TC_EXT_XDP, &arp), (TC_PASS, arp.clone()));
        assert_eq!(env.tc(names::PROG_TC_EXT_XDP, &arp_marked), (TC_PASS, arp.clone()));
        assert_counts(&env, &[(Reason::PassHandledByXdp, 3), (Reason::TranslatedNew, 2)]);
        // XDP marks a VLAN-tagged frame it passes (TC sees it untagged); not ARP.
        let mut tagged = syn.build();
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        let (v, out, marked) = env.xdp_meta(&tagged);
        assert_eq!((v, &out), (XDP_PASS, &tagged));
        assert_marked(marked, true);
        let (v, out, marked) = env.xdp_raw(&arp);
        assert_eq!((v, &out), (XDP_PASS, &arp));
        assert_marked(marked, xdp_meta_offered());
    });
}

#[test]
fn local_only_keeps_client_address_and_drop_if_empty() {
    in_test_netns(true, || {
        let mut env = Env::new();
        // LOCAL_ONLY with a backend that is not flagged local (defensive): forwarded, no SNAT.
        env.backend(1, BE_REMOTE, 0, proto::TCP);
        let lb = "198.18.200.1:80";
        env.service(
            lb,
            proto::TCP,
            scope::EXTERNAL,
            svc_flags::LOAD_BALANCER | svc_flags::LOCAL_ONLY,
            &[1],
            1,
        );
        let syn = Frame::tcp(sa(CLIENT), sa(lb), SYN);
        let (v, out) = env.xdp(&syn.build());
        assert_eq!(v, XDP_REDIRECT);
        let mut want = syn
            .clone()
            .with_dst(sa(BE_REMOTE))
            .with_macs([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x10]);
        want.ttl = 63;
        assert_frame(&out, &want);

        // LOCAL_ONLY with a local backend: DNAT only, to the stack.
        env.backend(2, BE1, backend_flags::LOCAL, proto::TCP);
        let lb2 = "198.18.200.2:80";
        env.service(
            lb2,
            proto::TCP,
            scope::EXTERNAL,
            svc_flags::LOAD_BALANCER | svc_flags::LOCAL_ONLY,
            &[2],
            2,
        );
        let syn2 = Frame::tcp(sa(CLIENT), sa(lb2), SYN);
        let (v, out) = env.xdp(&syn2.build());
        assert_eq!(v, XDP_PASS);
        assert_frame(&out, &syn2.clone().with_dst(sa(BE1)));

        // No local endpoint under a Local policy: dropped, not rejected.
        let lb3 = "198.18.200.3:80";
        env.service(
            lb3,
            proto::TCP,
            scope::EXTERNAL,
            svc_flags::LOAD_BALANCER | svc_flags::LOCAL_ONLY | svc_flags::DROP_IF_EMPTY,
            &[],
            3,
        );
        let (v, _) = env.xdp(&Frame::tcp(sa(CLIENT), sa(lb3), SYN).build());
        assert_eq!(v, XDP_DROP);
        let (v, _) = env.tc(names::PROG_TC_EXT, &Frame::tcp(sa(CLIENT), sa(lb3), SYN).build());
        assert_eq!(v, TC_ACT_SHOT);
        assert_counts(&env, &[(Reason::TranslatedNew, 2), (Reason::DropNoLocalBackend, 2)]);
    });
}

#[test]
fn reject_without_backends_tcp_rst_and_icmp_unreachable() {
    let mut env = Env::new();
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    env.service("198.19.0.10:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 1);

    // SYN (with options and payload-less): RST|ACK, ack = seq + 1, from the ClusterIP.
    let mut syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    if let L4::Tcp { options, .. } = &mut syn.l4 {
        *options = vec![2, 4, 5, 0xb4, 1, 1, 4, 2];
    }
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_ACT_REDIRECT, "sent back to the pod");
    let mut rst = Frame::tcp(sa(CIP), sa(POD_CLIENT), RST | ACK).with_macs(syn.smac, syn.dmac);
    rst.ttl = 64;
    rst.id = 0;
    rst.frag = 0x4000;
    if let L4::Tcp { seq, ack, window, .. } = &mut rst.l4 {
        *seq = 0;
        *ack = 1001;
        *window = 0;
    }
    assert_frame(&out, &rst);
    // The same SYN with IP options: the same RST, without them (TC takes them out first, so
    // that the segment's TCP header lies where the RST's is built).
    let mut syn_opts = syn.clone();
    syn_opts.ip_options = vec![1, 1, 1, 0];
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn_opts.build());
    assert_eq!(v, TC_ACT_REDIRECT, "with IP options: sent back to the pod");
    assert_frame(&out, &rst);

    // A segment with ACK and payload from XDP: RST with seq = its ack.
    let data = Frame::tcp(sa(CLIENT), sa(CIP), ACK | PSH).with_payload(b"hello");
    env.service(CIP, proto::TCP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    let (v, out) = env.xdp(&data.build());
    assert_eq!(v, XDP_TX);
    let mut rst2 = Frame::tcp(sa(CIP), sa(CLIENT), RST).with_macs(data.smac, data.dmac);
    rst2.id = 0;
    if let L4::Tcp { seq, ack, window, .. } = &mut rst2.l4 {
        *seq = 5000;
        *ack = 0;
        *window = 0;
    }
    assert_frame(&out, &rst2);

    // UDP: ICMP port unreachable quoting the IP header and 8 bytes.
    let q = Frame::udp(sa(POD_CLIENT), sa("198.19.0.10:53"), b"a longer query payload");
    let qb = q.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &qb);
    assert_eq!(v, TC_ACT_REDIRECT);
    let mut icmp = Frame::udp(sa("198.19.0.10:53"), sa(POD_CLIENT), b"").with_macs(q.smac, q.dmac);
    icmp.id = 0;
    icmp.l4 = L4::Icmp { typ: 3, code: 3, rest: [0; 4], payload: qb[14..14 + 28].to_vec() };
    assert_frame(&out, &icmp);
    // The same datagram with IP options: the same message (TC takes them out first, so that the
    // datagram's UDP header lies where the message is built), quoting the header without them:
    // header length 5, the total length and header checksum of the datagram without options.
    let mut q_opts = q.clone();
    q_opts.ip_options = vec![1, 1, 1, 0];
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q_opts.build());
    assert_eq!(v, TC_ACT_REDIRECT, "with IP options: sent back to the pod");
    assert_frame(&out, &icmp);
    // Short datagram (frame grows) through XDP.
    env.service("198.19.0.10:53", proto::UDP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[], 1);
    let q2 = Frame::udp(sa(CLIENT), sa("198.19.0.10:53"), b"");
    let q2b = q2.build();
    let (v, out) = env.xdp(&q2b);
    assert_eq!(v, XDP_TX);
    let mut icmp2 = Frame::udp(sa("198.19.0.10:53"), sa(CLIENT), b"").with_macs(q2.smac, q2.dmac);
    icmp2.id = 0;
    icmp2.l4 = L4::Icmp { typ: 3, code: 3, rest: [0; 4], payload: q2b[14..14 + 28].to_vec() };
    assert_frame(&out, &icmp2);
    // With IP options XDP leaves it to TC, untouched; TC answers it.
    let mut q3 = q2.clone();
    q3.ip_options = vec![1, 1, 1, 0];
    let q3b = q3.build();
    let (v, out) = env.xdp(&q3b);
    assert_eq!((v, &out), (XDP_PASS, &q3b), "with IP options: left to TC");
    let (v, out) = env.tc(names::PROG_TC_EXT, &q3b);
    assert_eq!(v, TC_ACT_REDIRECT, "with IP options: sent back out by TC");
    assert_frame(&out, &icmp2);
    assert_counts(&env, &[(Reason::RejectNoBackend, 7), (Reason::XdpPassToTc, 1)]);
    assert!(env.maps.conntrack().unwrap().is_empty());
}

#[test]
fn session_affinity_pins_client_to_backend() {
    let mut env = Env::new();
    env.backend(1, BE1, 0, proto::TCP);
    env.backend(2, BE2, 0, proto::TCP);
    env.service_aff(
        CIP,
        proto::TCP,
        scope::INTERNAL,
        svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
        &[1, 2],
        9,
        3600,
    );
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41016 {
        let syn = Frame::tcp(sa(&format!("198.18.100.10:{port}")), sa(CIP), SYN);
        let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        seen.insert(frames::decode(&out).unwrap().daddr);
    }
    assert_eq!(seen.len(), 1, "one backend for one client: {seen:?}");
    let aff = env.maps.affinity().unwrap();
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].0.svc_id, 9);

    // The client's backend leaves the slots (terminating: still a backend, for its tracked
    // connections). New connections of the client go to the serving backend, which becomes its
    // affinity and stays it when the first one is back in a slot.
    let first = *seen.first().unwrap();
    let (gone, stay) = if first == *sa(BE1).ip() { (1, 2) } else { (2, 1) };
    let aff_flags = svc_flags::CLUSTER_IP | svc_flags::AFFINITY;
    env.backend(gone, if gone == 1 { BE1 } else { BE2 }, backend_flags::TERMINATING, proto::TCP);
    env.service_aff(CIP, proto::TCP, scope::INTERNAL, aff_flags, &[stay], 9, 3600);
    let connect = |env: &mut Env, port: u16| {
        let syn = Frame::tcp(sa(&format!("198.18.100.10:{port}")), sa(CIP), SYN);
        let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        frames::decode(&out).unwrap().daddr
    };
    let now = connect(&mut env, 41100);
    assert_ne!(now, first, "affinity to a backend outside the slots");
    env.service_aff(CIP, proto::TCP, scope::INTERNAL, aff_flags, &[1, 2], 9, 3600);
    for port in 41101..41108 {
        assert_eq!(connect(&mut env, port), now, "the new affinity holds");
    }

    // Without affinity, 16 connections spread over both backends.
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 9);
    let mut seen = std::collections::BTreeSet::new();
    for port in 42000..42016 {
        let syn = Frame::tcp(sa(&format!("198.18.100.10:{port}")), sa(CIP), SYN);
        let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
        seen.insert(frames::decode(&out).unwrap().daddr);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// An affinity entry stamped a little later than this CPU's clock reads (another CPU used it
/// in the meantime) still holds: its age is not taken as a wrapped-around huge one.
#[test]
fn session_affinity_holds_for_an_entry_stamped_ahead_of_the_clock() {
    let mut env = Env::new();
    env.backend(1, BE1, 0, proto::TCP);
    env.backend(2, BE2, 0, proto::TCP);
    let flags = svc_flags::CLUSTER_IP | svc_flags::AFFINITY;
    env.service_aff(CIP, proto::TCP, scope::INTERNAL, flags, &[1, 2], 9, 3600);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    // The flow hash's choice for this tuple, then the tuple forgotten.
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    let hashed = frames::decode(&out).unwrap().daddr;
    for (k, _) in env.maps.conntrack().unwrap() {
        env.maps.delete_conntrack(&k).unwrap();
    }
    // The client's affinity now names the other backend (slot 1 or 2), stamped 5 s ahead.
    let (other, slot) = if hashed == *sa(BE1).ip() { (2, 2) } else { (1, 1) };
    let mut aff: aya::maps::HashMap<_, Affinity4Key, Affinity4Value> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(
                kproxy::dataplane::bpf::maps_dir(&env.dir).join(names::AFFINITY4),
            )
            .unwrap(),
        ))
        .unwrap();
    let key = env.maps.affinity().unwrap()[0].0;
    let ahead = kproxy::dataplane::monotonic_ns() + 5_000_000_000;
    let v = Affinity4Value { backend_id: other, slot, _pad: 0, last_used_ns: ahead };
    aff.insert(key, v, 0).unwrap();
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    let want = if other == 1 { *sa(BE1).ip() } else { *sa(BE2).ip() };
    assert_eq!(frames::decode(&out).unwrap().daddr, want, "affinity dropped as expired");
}

/// The RST the datapath answers `ack` (client → ClusterIP) with when its backend is gone.
fn backend_gone_reset(ack: &Frame) -> Frame {
    let mut rst = Frame::tcp(sa(CIP), sa(POD_CLIENT), RST).with_macs(ack.smac, ack.dmac);
    rst.id = 0;
    if let L4::Tcp { seq, ack: a, window, .. } = &mut rst.l4 {
        *seq = 5000;
        *a = 0;
        *window = 0;
    }
    rst
}

#[test]
fn backend_removed_udp_rebalances_tcp_resets() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:53", 0, proto::UDP);
    env.backend(2, "198.18.100.12:53", 0, proto::UDP);
    let svc = "198.19.0.53:53";
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    let q = Frame::udp(sa(POD_CLIENT), sa(svc), b"q");
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    let first = frames::decode(&out).unwrap().daddr;
    let (gone, stay, stay_addr) = if first == "198.18.100.11".parse::<Ipv4Addr>().unwrap() {
        (1, 2, "198.18.100.12:53")
    } else {
        (2, 1, "198.18.100.11:53")
    };
    // The agent removes the backend: slots rewritten, backend deleted.
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[stay], 1);
    env.maps.delete_backend(gone).unwrap();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &q.clone().with_dst(sa(stay_addr)));
    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.backend_id, stay);

    // TCP: established connection whose backend goes away gets a RST; a new SYN rebalances.
    env.backend(11, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[11], 2);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    env.tc(names::PROG_TC_FROM_POD, &syn.build());
    env.backend(12, BE2, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[12], 2);
    env.maps.delete_backend(11).unwrap();
    let ack = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_frame(&out, &backend_gone_reset(&ack));
    // The entry is gone: the client's next SYN on the same tuple goes to the new backend.
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn.clone().with_dst(sa(BE2)));
    assert_counts(
        &env,
        &[(Reason::TranslatedNew, 3), (Reason::Rebalanced, 1), (Reason::ResetBackendGone, 1)],
    );
}

/// The agent hands out the lowest free backend id, so a removed backend's id comes back for
/// another backend: a connection tracked to the old one sees its backend gone (RST, as after a
/// plain removal) and a UDP flow is balanced again; neither is moved to the id's new backend
/// without a new pick.
#[test]
fn reused_backend_id_names_another_backend() {
    let mut env = Env::new();
    env.backend(11, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[11], 2);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_frame(&out, &syn.clone().with_dst(sa(BE1)));
    // Removed (the backend generation moves on), then id 11 is another backend's.
    env.maps.delete_backend(11).unwrap();
    env.backend(11, BE2, 0, proto::TCP);
    let ack = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_frame(&out, &backend_gone_reset(&ack));
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_frame(&out, &syn.clone().with_dst(sa(BE2)));

    env.backend(21, "198.18.100.11:53", 0, proto::UDP);
    let svc = "198.19.0.53:53";
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[21], 1);
    let q = Frame::udp(sa(POD_CLIENT), sa(svc), b"q");
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_frame(&out, &q.clone().with_dst(sa("198.18.100.11:53")));
    env.maps.delete_backend(21).unwrap();
    env.backend(21, "198.18.100.12:53", 0, proto::UDP);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_frame(&out, &q.clone().with_dst(sa("198.18.100.12:53")));
    assert_counts(
        &env,
        &[(Reason::TranslatedNew, 3), (Reason::Rebalanced, 1), (Reason::ResetBackendGone, 1)],
    );
}

#[test]
fn backend_removed_tcp_syn_rebalances() {
    let mut env = Env::new();
    env.backend(11, BE1, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[11], 2);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    env.tc(names::PROG_TC_FROM_POD, &syn.build());
    env.backend(12, BE2, 0, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[12], 2);
    env.maps.delete_backend(11).unwrap();
    // A retransmitted SYN of the tracked connection: balanced anew.
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn.clone().with_dst(sa(BE2)));
    assert_counts(&env, &[(Reason::TranslatedNew, 1), (Reason::Rebalanced, 1)]);
}

/// `frame` cut to an IP datagram of `len` bytes, with total length and checksum fixed.
fn cut_l3(frame: &[u8], len: usize) -> Vec<u8> {
    let mut f = frame[..14 + len].to_vec();
    f[16..18].copy_from_slice(&(len as u16).to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = frames::checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn malformed_frames_are_counted() {
    let mut env = Env::new();
    env.backend(1, BE1, 0, proto::TCP);
    env.backend(2, "198.18.100.11:53", 0, proto::UDP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service("198.19.0.10:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
    env.service(CIP, proto::TCP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let tcp = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let udp = Frame::udp(sa(POD_CLIENT), sa("198.19.0.10:53"), b"data");
    let good = tcp.build();

    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    let mut tot_too_long = good.clone();
    tot_too_long[16..18].copy_from_slice(&200u16.to_be_bytes());
    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x40;
    let mut udp_short_len = udp.build();
    udp_short_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());

    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, so the shortest
        // case is a bare IPv4 Ethernet header.)
        ("ethernet header only", good[..14].to_vec(), Reason::DropMalformed),
        ("truncated ip", good[..14 + 12].to_vec(), Reason::DropMalformed),
        ("truncated tcp", good[..14 + 20 + 10].to_vec(), Reason::DropMalformed),
        ("truncated udp", udp.build()[..14 + 20 + 4].to_vec(), Reason::DropMalformed),
        ("tcp header cut, ip length consistent", cut_l3(&good, 20 + 10), Reason::DropMalformed),
        (
            "udp header cut, ip length consistent",
            cut_l3(&udp.build(), 20 + 4),
            Reason::DropMalformed,
        ),
        ("bad ihl", bad_ihl, Reason::DropMalformed),
        ("bad version", bad_version, Reason::DropMalformed),
        ("total length beyond frame", tot_too_long, Reason::DropMalformed),
        ("tcp data offset < 5", bad_doff, Reason::DropMalformed),
        ("udp length < 8", udp_short_len, Reason::DropMalformed),
    ];
    for (name, frame, reason) in &cases {
        for hook in ["tc", "xdp"] {
            if hook == "tc" && frame.len() < 34 {
                continue; // TEST_RUN builds no skb from an IPv4 frame without an IP header
            }
            let before = env.counters().get(reason).copied().unwrap_or(0);
            let (v, _) =
                if hook == "tc" { env.tc(names::PROG_TC_FROM_POD, frame) } else { env.xdp(frame) };
            let dropped = if hook == "tc" { TC_ACT_SHOT } else { XDP_DROP };
            assert_eq!(v, dropped, "{name} via {hook}");
            assert_eq!(env.counters().get(reason).copied().unwrap_or(0), before + 1, "{name}");
        }
    }

    // Frames that are fine: IP options are parsed past, later fragments pass.
    let mut opts = tcp.clone();
    opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &opts.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &opts.clone().with_dst(sa(BE1)));
    // A later fragment of a datagram whose first fragment was not seen: untouched.
    let later = later_fragment(*sa(POD_CLIENT).ip(), *sa(CIP).ip(), 0x4242, 6, b"12345678");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &later);
    assert_eq!((v, out), (TC_PASS, later));
    // The IPv6 ethertype over an IPv4 header: malformed IPv6, counted with IPv6's counters.
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &v6);
    assert_eq!(v, TC_ACT_SHOT);
    let v6_drops =
        env.maps.counters6().unwrap().into_iter().find(|(r, _)| *r == Reason::DropMalformed);
    assert_eq!(v6_drops, Some((Reason::DropMalformed, 1)));
}

fn sh_out(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// (number of kproxy filters, their program ids) on one TC hook.
fn tc_filters(dev: &str, dir: &str, name: &str) -> (usize, Vec<String>) {
    let out = sh_out(&format!("tc filter show dev {dev} {dir}"));
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(name)).collect();
    let ids = lines
        .iter()
        .filter_map(|l| {
            l.split(" id ").nth(1).map(|r| r.split_whitespace().next().unwrap().to_owned())
        })
        .collect();
    (lines.len(), ids)
}

/// Whether `dev` has a clsact qdisc.
fn has_clsact(dev: &str) -> bool {
    sh_out(&format!("tc qdisc show dev {dev}")).contains("clsact")
}

fn xdp_prog(dev: &str) -> Option<String> {
    let out = sh_out(&format!("ip -d link show dev {dev}"));
    out.split("prog/xdp id ").nth(1).map(|r| r.split_whitespace().next().unwrap().to_owned())
}

/// The kproxy program on hook `dir` of `dev`, as the kernel reports it: (program id, `tcx` or
/// `clsact`) of each one running `name` (`kp_`: any of kproxy's).
fn tc_progs(pin: &Path, dev: &str, dir: &str, name: &str) -> Vec<(u32, &'static str)> {
    let report = kproxy::netdev::attachments(pin).unwrap();
    let Some(d) = report.devices.into_iter().find(|d| d.name == dev) else { return Vec::new() };
    d.tc.iter()
        .filter(|p| {
            p.hook == dir && (p.program == name || name == "kp_" && p.program.starts_with(name))
        })
        .map(|p| (p.id, p.via))
        .collect()
}

/// An agent takes over the datapath an agent of another ABI version left, older (an upgrade;
/// here: the pin directory renamed `v0`) or newer (a rollback: `v2`), with one map of another
/// layout in it and the connection table set aside by an unfinished resize: the maps of
/// unchanged layout
/// carry over with their entries (a tracked connection), the one of another layout starts empty
/// in the new directory, and the older version's links take this load's programs in place (one
/// of kproxy's on each hook throughout); once the devices are attached, the older directory
/// goes and the datapath keeps serving from the new one.
#[test]
fn another_abi_versions_datapath_is_taken_over() {
    use aya::maps::MapData;
    use kproxy::dataplane::loader::{ExternalMode, cleanup};
    use kproxy_common::{Ct4Value, Tuple4};
    in_test_netns(true, || {
        for other in ["v0", "v2"] {
            let dir = shared::pin_dir(N.fetch_add(1, Ordering::SeqCst));
            let _remove = shared::RemoveDir(dir.clone());
            // The socket LB too: its cgroup links are taken over with the others (and are no
            // tail-call tables, though the kernel answers a map query about a link).
            let cgroups = kproxy_tests::hostnet::Cgroups::new(
                &format!("kpt{}-takeover-{other}", std::process::id()),
                1,
            )
            .unwrap();
            let cg = cgroups.node(0).to_path_buf();
            let generic = Some(aya::programs::XdpMode::Skb);
            let tuple = Tuple4 {
                saddr: u32::from_ne_bytes([198, 18, 0, 10]),
                daddr: u32::from_ne_bytes([198, 18, 100, 1]),
                sport: 40000u16.to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            };
            let conn =
                Ct4Value { backend_id: 7, backend_port: 8080u16.to_be(), ..Default::default() };
            {
                let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
                dp.set_xdp_mode(generic);
                dp.attach_pod("kpt1").unwrap();
                dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
                dp.attach_cgroup(&cg).unwrap();
                let mut ct: aya::maps::HashMap<_, Tuple4, Ct4Value> =
                    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
                        MapData::from_pin(dir.join("v1").join(names::CT4)).unwrap(),
                    ))
                    .unwrap();
                ct.insert(tuple, conn, 0).unwrap();
            } // the older agent exits, its datapath attached
            let xdp_old = xdp_prog("kpt0").expect("XDP attached");
            std::fs::rename(dir.join("v1"), dir.join(other)).unwrap();
            let old_be = dir.join(other).join(names::BACKENDS4);
            std::fs::remove_file(&old_be).unwrap();
            pin_reordered_backends_map(&old_be);
            let old_be_id = MapData::from_pin(&old_be).unwrap().info().unwrap().id();
            // Its agent stopped in a resize of the connection table, the map set aside and no
            // new one pinned yet: the set-aside map, which holds the connections, is taken.
            let old_ct = dir.join(other).join(names::CT4);
            std::fs::rename(&old_ct, old_ct.with_file_name(format!("{}-resizing", names::CT4)))
                .unwrap();

            let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
            // The services go with the backends (their slots name backend ids); a load after
            // a restart finds the same maps left behind (the attach waits for a first sync).
            let left = [names::BACKENDS4, names::SERVICES4];
            let sorted = |dp: &Datapath| {
                let mut v = dp.maps_left_behind().to_vec();
                v.sort();
                v
            };
            assert_eq!(sorted(&dp), left);
            drop(Datapath::load(&dir, &MapSizes::default()).unwrap());
            let again = Datapath::load(&dir, &MapSizes::default()).unwrap();
            assert_eq!(sorted(&again), left, "left behind after a restart too");
            drop(again);
            let maps = BpfDataplane::open(&dir).unwrap();
            assert_eq!(maps.conntrack().unwrap(), vec![(tuple, conn)], "connection carried over");
            let new_be = MapData::from_pin(dir.join("v1").join(names::BACKENDS4)).unwrap();
            assert_ne!(
                new_be.info().unwrap().id(),
                old_be_id,
                "a map of another layout is not taken"
            );
            dp.set_xdp_mode(generic);
            dp.attach_pod("kpt1").unwrap();
            dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
            dp.attach_cgroup(&cg).unwrap();
            let hooks = [("kpt1", "ingress"), ("kpt1", "egress"), ("kpt0", "ingress")];
            let one_each = || {
                for (dev, hook) in hooks {
                    assert_eq!(tc_progs(&dir, dev, hook, "kp_").len(), 1, "{dev} {hook}");
                }
                assert!(xdp_prog("kpt0").is_some(), "XDP attached");
            };
            one_each();
            assert_ne!(xdp_prog("kpt0").unwrap(), xdp_old, "XDP program swapped inside the link");
            assert!(dp.old_calls().contains(&dir.join(other)), "{:?}", dp.old_calls());
            assert_eq!(retire_until(&dp, &[]), [] as [PathBuf; 0], "nothing runs its programs");
            assert!(!dir.join(other).exists(), "the other version removed");
            one_each();
            assert_eq!(maps.conntrack().unwrap(), vec![(tuple, conn)], "connection kept");
            drop((dp, maps));
            cleanup(&dir).unwrap();
            assert_eq!(xdp_prog("kpt0"), None, "{other}");
        }
    });
}

/// Where the kernel does not let the agent list its programs (an agent run with CAP_BPF and
/// CAP_NET_ADMIN but without CAP_SYS_ADMIN, which `BPF_PROG_GET_NEXT_ID` asks for), it cannot
/// tell which earlier tables are called into: it keeps them all while a device's attachment
/// has failed, and removes them once none has, as before it could tell.
#[test]
fn earlier_tail_call_tables_without_the_program_listing_follow_the_failed_devices() {
    let env = Env::own();
    // Earlier loads (the environment's, and one more) whose programs run nowhere.
    drop(Datapath::load(&env.dir, &TEST_SIZES).unwrap());
    let dp = Datapath::load(&env.dir, &TEST_SIZES).unwrap();
    let mut earlier = dp.old_calls();
    earlier.sort();
    assert_eq!(earlier.len(), 4, "two loads' pairs of tables: {earlier:?}");
    std::thread::scope(|t| {
        t.spawn(|| {
            drop_effective_capability(21); // CAP_SYS_ADMIN, on this thread only
            let mut kept = dp.retire_old_calls(false).unwrap();
            kept.sort();
            assert_eq!(kept, earlier, "kept while a device failed (nothing tells they are unused)");
            assert_eq!(dp.retire_old_calls(true).unwrap(), [] as [PathBuf; 0]);
            assert_eq!(dp.old_calls(), [] as [PathBuf; 0], "removed once none failed");
        });
    });
}

/// Takes capability `cap` out of the calling thread's effective set.
fn drop_effective_capability(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let mut data = [Data::default(); 2];
    // SAFETY: a valid header and two data blocks, as version 3 reads and writes.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    // SAFETY: as above; capset on the calling thread (pid 0).
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

/// `dp.retire_old_calls()` until it keeps exactly `keep` (2 s at most); what it kept last. A
/// clsact filter an attach replaced releases its program after an RCU grace period, and its
/// load's tables are called into until then.
fn retire_until(dp: &Datapath, keep: &[PathBuf]) -> Vec<PathBuf> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut kept = dp.retire_old_calls(true).unwrap();
        kept.sort();
        if kept == keep || std::time::Instant::now() > deadline {
            return kept;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The tail-call tables pinned under `dir` (`v1/calls`), sorted.
fn call_tables(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("v1/calls"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// An earlier load's tail-call table stays while a program of that load that calls into it
/// still runs on a device (an attachment that failed, or one on a device the agent no longer
/// manages: removing the pin would empty the table and drop every new connection there), and
/// goes once none does; a load whose programs run nowhere leaves nothing behind, however many
/// there were (an agent restarting over a device that keeps failing).
#[test]
fn earlier_loads_tail_call_tables_go_once_their_programs_run_nowhere() {
    in_test_netns(true, || {
        let dir = shared::pin_dir(N.fetch_add(1, Ordering::SeqCst));
        let _remove = shared::RemoveDir(dir.clone());
        let tc_table = |tables: &[PathBuf]| -> PathBuf {
            let tc: Vec<&PathBuf> = tables
                .iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(names::CALLS_TC))
                .collect();
            assert_eq!(tc.len(), 1, "{tables:?}");
            tc[0].clone()
        };
        let first_tables = {
            let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
            dp.attach_pod("kpt1").unwrap();
            call_tables(&dir)
        }; // the agent exits, its TC programs attached to kpt1
        assert_eq!(first_tables.len(), 2, "one TC and one XDP table: {first_tables:?}");
        let first_tc = tc_table(&first_tables);

        // A restarted agent that has not (or could not) put its programs on kpt1: the first
        // load's TC table is called into there and stays; its XDP table, whose programs run
        // nowhere, goes.
        let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
        let own: Vec<PathBuf> =
            call_tables(&dir).into_iter().filter(|p| !first_tables.contains(p)).collect();
        assert_eq!(own.len(), 2, "{own:?}");
        assert_eq!(
            retire_until(&dp, std::slice::from_ref(&first_tc)),
            std::slice::from_ref(&first_tc)
        );
        let mut expect = own.clone();
        expect.push(first_tc.clone());
        expect.sort();
        assert_eq!(call_tables(&dir), expect, "the first load's XDP table removed");
        // The kept table still holds the slow path of the programs on kpt1.
        let table = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(
            aya::maps::MapData::from_pin(&first_tc).unwrap(),
        ))
        .unwrap();
        assert!(table.indices().count() > 0, "the kept table is filled");
        drop(table);

        // Once kpt1 runs this load's programs, nothing calls into it any more.
        dp.attach_pod("kpt1").unwrap();
        assert_eq!(retire_until(&dp, &[]), [] as [PathBuf; 0]);
        assert_eq!(call_tables(&dir), own, "only this load's tables left");

        // Loads whose programs never ran anywhere (agents that failed before attaching):
        // their tables go at the next start, while the tables of the load on kpt1 stay.
        drop(dp);
        for _ in 0..2 {
            drop(Datapath::load(&dir, &MapSizes::default()).unwrap());
        }
        assert_eq!(call_tables(&dir).len(), 6, "three loads' tables pinned");
        let dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
        let own_tc = tc_table(&own);
        assert_eq!(retire_until(&dp, std::slice::from_ref(&own_tc)), std::slice::from_ref(&own_tc));
        assert_eq!(call_tables(&dir).len(), 3, "this load's pair and the table kpt1 calls into");
        assert!(call_tables(&dir).contains(&own_tc));
        drop(dp);
        kproxy::dataplane::loader::cleanup(&dir).unwrap();
    });
}

#[test]
fn attachments_outlive_the_agent_and_are_replaced_in_place() {
    use kproxy::dataplane::loader::{ExternalMode, ProgramGroups, TcAttach, cleanup};
    in_test_netns(true, || {
        // The first load below makes the maps, the second reuses them.
        let dir = shared::pin_dir(N.fetch_add(1, Ordering::SeqCst));
        let _remove = shared::RemoveDir(dir.clone());
        let generic = Some(aya::programs::XdpMode::Skb);
        // tcx links where the kernel has them (6.6+), clsact filters before.
        let tcx = kproxy::dataplane::features::tcx();
        assert_eq!(tcx, kernel_at_least(6, 6));
        let via = if tcx { "tcx" } else { "clsact" };
        let hooks = [
            ("kpt1", "ingress", names::PROG_TC_FROM_POD),
            ("kpt1", "egress", names::PROG_TC_TO_POD),
            // Behind XDP: the TC program that takes XDP's marks.
            ("kpt0", "ingress", names::PROG_TC_EXT_XDP),
        ];
        // One kproxy program on each hook, of the kind `via`; the clsact filters as `tc` shows
        // them and the tcx link pins agree. Returns the programs' ids.
        let one_each = |via: &str| -> Vec<u32> {
            hooks
                .iter()
                .map(|&(dev, hook, name)| {
                    let progs = tc_progs(&dir, dev, hook, "kp_");
                    assert_eq!(progs.len(), 1, "{dev} {hook}: {progs:?}");
                    assert_eq!(progs[0].1, via, "{dev} {hook}");
                    assert_eq!(tc_progs(&dir, dev, hook, name).len(), 1, "{dev} {hook}: {name}");
                    let filters = tc_filters(dev, hook, "kp_").0;
                    assert_eq!(filters, usize::from(via == "clsact"), "{dev} {hook} filters");
                    let pin = dir.join(format!("v1/links/tcx-{hook}-{dev}"));
                    assert_eq!(pin.exists(), via == "tcx", "{}", pin.display());
                    progs[0].0
                })
                .collect()
        };
        {
            let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
            assert_eq!(dp.tc_attach(), if tcx { TcAttach::Tcx } else { TcAttach::Netlink });
            dp.set_xdp_mode(generic);
            dp.attach_pod("kpt1").unwrap();
            assert_eq!(dp.attach_external("kpt0", ExternalMode::Xdp).unwrap(), generic);
        } // the "agent" exits
        let ids = one_each(via); // TC programs survive the loader
        let xdp1 = xdp_prog("kpt0").expect("XDP survives the loader");
        assert!(dir.join("v1/links/xdp-kpt0").exists());

        // A restarted agent replaces the programs in place: still one of each, new program ids.
        let mut dp = Datapath::load(&dir, &MapSizes::default()).unwrap();
        dp.set_xdp_mode(generic);
        dp.attach_pod("kpt1").unwrap();
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        let ids2 = one_each(via);
        assert!(ids.iter().zip(&ids2).all(|(a, b)| a != b), "programs replaced: {ids:?} {ids2:?}");
        let xdp2 = xdp_prog("kpt0").expect("XDP attached");
        assert_ne!(xdp1, xdp2, "XDP program swapped inside the pinned link");

        if tcx {
            // From tcx links to clsact filters and back (--tc-attach): each time one program per
            // hook, the other kind gone.
            dp.set_tc_attach(TcAttach::Netlink);
            dp.attach_pod("kpt1").unwrap();
            dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
            one_each("clsact");
            dp.set_tc_attach(TcAttach::Tcx);
            dp.attach_pod("kpt1").unwrap();
            dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
            one_each("tcx");
            // The clsact qdiscs kproxy added for its filters went with them...
            assert!(!has_clsact("kpt1") && !has_clsact("kpt0"), "empty clsact qdiscs left");
            // ...but one holding another owner's filter stays, with it.
            dp.set_tc_attach(TcAttach::Netlink);
            dp.attach_pod("kpt1").unwrap();
            sh_out(
                "tc filter add dev kpt1 egress prio 100 protocol ip u32 match u32 0 0 classid 1:1",
            );
            dp.set_tc_attach(TcAttach::Tcx);
            dp.attach_pod("kpt1").unwrap();
            one_each("tcx");
            assert!(
                sh_out("tc filter show dev kpt1 egress").contains("u32"),
                "foreign filter kept"
            );
            sh_out("tc qdisc del dev kpt1 clsact");
            // A pod interface deleted and created under the same name: its links went with it,
            // the pins left are replaced by new links.
            sh_out("ip link add kptp type veth peer name kptq && ip link set kptp up");
            dp.attach_pod("kptp").unwrap();
            let first = tc_progs(&dir, "kptp", "ingress", names::PROG_TC_FROM_POD);
            assert_eq!(first.len(), 1, "{first:?}");
            sh_out("ip link del kptp");
            sh_out("ip link add kptp type veth peer name kptq && ip link set kptp up");
            assert!(dir.join("v1/links/tcx-ingress-kptp").exists(), "pin of a gone device");
            assert_eq!(tc_progs(&dir, "kptp", "ingress", "kp_"), [], "a new device");
            assert_eq!(
                kproxy::netdev::attachments(&dir).unwrap().stale_link_pins,
                ["tcx-egress-kptp", "tcx-ingress-kptp"]
            );
            dp.attach_pod("kptp").unwrap();
            assert_eq!(tc_progs(&dir, "kptp", "ingress", names::PROG_TC_FROM_POD).len(), 1);
            assert_eq!(tc_progs(&dir, "kptp", "egress", names::PROG_TC_TO_POD).len(), 1);
            assert_eq!(kproxy::netdev::attachments(&dir).unwrap().stale_link_pins, [""; 0]);
            dp.detach("kptp").unwrap();
            assert_eq!(tc_progs(&dir, "kptp", "ingress", "kp_"), [], "detached");
            assert!(!dir.join("v1/links/tcx-ingress-kptp").exists());
            sh_out("ip link del kptp");
        }

        assert!(sh_out("ip link show dev kpt0").contains(" xdpgeneric "), "generic when asked");

        // The default mode on a veth device is TC alone: the XDP link goes.
        dp.set_xdp_mode(None);
        assert_eq!(dp.attach_external("kpt0", ExternalMode::Xdp).unwrap(), None, "auto on veth");
        assert_eq!(xdp_prog("kpt0"), None, "no XDP on veth by default");
        assert!(!dir.join("v1/links/xdp-kpt0").exists(), "XDP link pin removed");
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", names::PROG_TC_EXT).len(), 1, "TC serves it");
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", "kp_").len(), 1, "TC alone");
        // A device whose driver has no native XDP (a bridge): auto falls back to TC alone, a forced
        // native mode fails.
        sh_out("ip link add kptd type bridge && ip link set kptd up");
        assert_eq!(
            dp.attach_external("kptd", ExternalMode::Xdp).unwrap(),
            None,
            "auto on a bridge"
        );
        assert_eq!(xdp_prog("kptd"), None);
        assert_eq!(tc_progs(&dir, "kptd", "ingress", names::PROG_TC_EXT).len(), 1, "TC serves it");
        dp.set_xdp_mode(Some(aya::programs::XdpMode::Driver));
        assert!(
            dp.attach_external("kptd", ExternalMode::Xdp).is_err(),
            "native forced on a bridge"
        );
        dp.detach("kptd").unwrap();
        sh_out("ip link del kptd");
        // TC-only mode removes the XDP attachment.
        dp.set_xdp_mode(generic);
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        assert!(xdp_prog("kpt0").is_some());
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", names::PROG_TC_EXT_XDP).len(), 1);
        assert_eq!(dp.attach_external("kpt0", ExternalMode::TcOnly).unwrap(), None);
        assert_eq!(xdp_prog("kpt0"), None);
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", "kp_").len(), 1, "one TC program");
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", names::PROG_TC_EXT).len(), 1, "TC alone");
        // A forced native mode is honoured for a new attachment.
        dp.set_xdp_mode(Some(aya::programs::XdpMode::Driver));
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        assert!(sh_out("ip link show dev kpt0").contains(" xdp "), "native when asked");
        // A restarted agent asking for another mode gets its link replaced, not updated in place
        // in the old mode (the program stays the same one, so only the mode tells).
        dp.set_xdp_mode(Some(aya::programs::XdpMode::Skb));
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        assert!(sh_out("ip link show dev kpt0").contains(" xdpgeneric "), "generic when asked");
        assert!(xdp_prog("kpt0").is_some(), "XDP still attached");
        // The same mode again: kept (updated in place).
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        assert!(sh_out("ip link show dev kpt0").contains(" xdpgeneric "), "still generic");

        // An agent started with --no-xdp loads no XDP program (nor the TC program that runs
        // behind XDP), serves the device with TC alone and refuses an XDP attachment; one
        // without --cgroup-path loads no socket-LB program and refuses to attach the socket LB.
        {
            let sock_prog = names::SOCK_PROGS[0].0;
            assert!(dp.program_mut(sock_prog).unwrap().fd().is_ok(), "loaded by a full load");
            let groups = ProgramGroups { xdp: false, socket_lb: false };
            let mut tc_only = Datapath::load_for(&dir, &MapSizes::default(), groups).unwrap();
            let sock = names::SOCK_PROGS.iter().chain(&names::SOCK_PROGS6).map(|(n, _)| *n);
            for name in [names::PROG_XDP_EXT, names::PROG_TC_EXT_XDP].into_iter().chain(sock) {
                let p = tc_only.program_mut(name).unwrap();
                assert!(p.fd().is_err(), "{name} loaded without its group");
            }
            assert!(tc_only.program_mut(names::PROG_TC_EXT).unwrap().fd().is_ok());
            assert!(tc_only.program_mut(names::PROG_TC_POD_NEW).unwrap().fd().is_ok());
            let err = tc_only.attach_cgroup(Path::new("/sys/fs/cgroup")).unwrap_err();
            assert!(err.to_string().contains("without its programs"), "{err:#}");
            let err = tc_only.attach_external("kpt0", ExternalMode::Xdp).unwrap_err();
            assert!(err.to_string().contains("without its XDP programs"), "{err:#}");
            assert_eq!(tc_only.attach_external("kpt0", ExternalMode::TcOnly).unwrap(), None);
            assert_eq!(xdp_prog("kpt0"), None);
            assert_eq!(tc_progs(&dir, "kpt0", "ingress", "kp_").len(), 1, "one TC program");
            assert_eq!(tc_progs(&dir, "kpt0", "ingress", names::PROG_TC_EXT).len(), 1);
        }
        dp.attach_external("kpt0", ExternalMode::Xdp).unwrap();
        assert!(sh_out("ip link show dev kpt0").contains(" xdpgeneric "), "generic again");

        // detach removes exactly kproxy's programs on that device.
        sh_out("tc qdisc add dev kpt1 clsact 2>/dev/null; true");
        sh_out("tc filter add dev kpt1 ingress prio 100 protocol ip u32 match u32 0 0 classid 1:1");
        dp.detach("kpt1").unwrap();
        assert_eq!(tc_progs(&dir, "kpt1", "ingress", "kp_"), []);
        assert_eq!(tc_progs(&dir, "kpt1", "egress", "kp_"), []);
        assert!(!dir.join("v1/links/tcx-ingress-kpt1").exists());
        assert!(sh_out("tc filter show dev kpt1 ingress").contains("u32"), "foreign filter kept");
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", names::PROG_TC_EXT_XDP).len(), 1);

        // cleanup removes everything else, pins included.
        drop(dp);
        cleanup(&dir).unwrap();
        assert_eq!(tc_progs(&dir, "kpt0", "ingress", "kp_"), []);
        assert!(!has_clsact("kpt0"), "empty clsact qdisc left by cleanup");
        assert_eq!(xdp_prog("kpt0"), None);
        assert!(!dir.exists(), "pin directory removed");
    });
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    // The backend pod itself connects to the ClusterIP.
    let me = "198.18.100.11:41000";
    let syn = Frame::tcp(sa(me), sa(CIP), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_ACT_REDIRECT, "bounced back into the pod");
    let got = frames::decode(&out).unwrap();
    let L4::Tcp { sport: hp, .. } = got.l4 else { panic!() };
    assert!((61000..=65535).contains(&hp));
    let want = syn
        .clone()
        .with_src(SocketAddrV4::new(*sa(CIP).ip(), hp))
        .with_dst(sa(BE1))
        .with_macs(syn.smac, syn.dmac);
    assert_frame(&out, &want);

    // The pod answers the ClusterIP's port; the answer is restored and bounced back too.
    let synack = Frame::tcp(sa(BE1), SocketAddrV4::new(*sa(CIP).ip(), hp), SYN | ACK);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &synack.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    let want =
        synack.clone().with_src(sa(CIP)).with_dst(sa(me)).with_macs(synack.smac, synack.dmac);
    assert_frame(&out, &want);

    // Established packets keep the same translation.
    let ack = Frame::tcp(sa(me), sa(CIP), ACK);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &ack.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    let want = ack
        .clone()
        .with_src(SocketAddrV4::new(*sa(CIP).ip(), hp))
        .with_dst(sa(BE1))
        .with_macs(ack.smac, ack.dmac);
    assert_frame(&out, &want);
    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct[0].1.flags & kproxy_common::ct_flags::HAIRPIN, kproxy_common::ct_flags::HAIRPIN);
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::ReplyTranslated, 1),
        ],
    );
}

fn show_ct(env: &Env) -> String {
    let a = |x: u32| Ipv4Addr::from(u32::from_be(x));
    let mut out = String::new();
    for (k, v) in env.maps.conntrack().unwrap() {
        out += &format!(
            "ct {}:{} -> {}:{} p{} => be {}:{} snat {}:{} st {} fl {}\n",
            a(k.saddr),
            u16::from_be(k.sport),
            a(k.daddr),
            u16::from_be(k.dport),
            k.proto,
            a(v.backend_addr),
            u16::from_be(v.backend_port),
            a(v.snat_addr),
            u16::from_be(v.snat_port),
            v.state,
            v.flags
        );
    }
    for (k, v) in env.maps.revnat().unwrap() {
        out += &format!(
            "rn {}:{} -> {}:{} p{} => client {}:{} fe {}:{}\n",
            a(k.saddr),
            u16::from_be(k.sport),
            a(k.daddr),
            u16::from_be(k.dport),
            k.proto,
            a(v.client_addr),
            u16::from_be(v.client_port),
            a(v.frontend_addr),
            u16::from_be(v.frontend_port)
        );
    }
    out
}

/// A named network namespace created by this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        sh_out(&format!("ip netns add {name}"));
        Netns(name)
    }
    fn sh(&self, cmd: &str) -> String {
        sh_out(&format!("ip netns exec {} sh -c '{}'", self.0, cmd.replace('\'', "'\\''")))
    }
    /// Runs `python3 -c script` in the namespace: its standard output trimmed, and its
    /// standard error (whatever its exit status: a failed client shows in its output).
    fn python(&self, script: &str) -> (String, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.0, "python3", "-c", script])
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process started by this test, killed (by its own pid) on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &Netns, cmd: &str) -> Child {
    Child(Command::new("ip").args(["netns", "exec", &ns.0, "sh", "-c", cmd]).spawn().unwrap())
}

/// One socket answering every datagram on port 5353 with `pong` (socat's UDP fork mode loses
/// datagrams between forks), for [`spawn_in`].
const UDP_ECHO: &str = "exec python3 -c \"import socket; s=socket.socket(2,2); s.bind(('',5353)); \
                        [s.sendto(b'pong', s.recvfrom(100)[1]) for _ in iter(int,1)]\"";

/// `n` datagrams from `pod` to `to` (address:port), each answer waited for `wait` seconds: the
/// answers' sources, or `timeout`, one per line.
fn ask_udp(pod: &Netns, to: &str, n: u64, wait: u32) -> String {
    let (addr, port) = to.split_once(':').unwrap();
    pod.sh(&format!(
        "python3 -c \"import socket\ns=socket.socket(2,2)\ns.settimeout({wait})\n\
         for _ in range({n}):\n  s.sendto(b'ping',('{addr}',{port}))\n  \
         try: print(s.recvfrom(100)[1][0])\n  except socket.timeout: print('timeout')\""
    ))
    .trim()
    .to_owned()
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/<name>`), where
/// attachments, tcx links and `tc` act.
fn enter_netns(path: &str) {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: setns on this thread only, with a valid namespace fd.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// Runs `f` on a thread inside `node`'s namespace, borrowing from the caller, and returns its
/// value; a panic in it is the caller's.
fn on_node<T: Send, F: FnOnce() -> T + Send>(node: &Netns, f: F) -> T {
    let path = format!("/run/netns/{}", node.0);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Real sockets through the TC programs: two pods on one node, a ClusterIP for TCP and UDP
/// whose backend is pod 2; pod 1 and pod 2 (hairpin) connect through it. Exercises what
/// TEST_RUN cannot: skbs from local sockets (CHECKSUM_PARTIAL), real redirects and routing.
#[test]
fn real_sockets_pod_to_clusterip_and_hairpin() {
    real_sockets_pod_to_clusterip(false);
}

/// The same with eBPF host routing, and a node whose forwarding path drops everything (a
/// netfilter forward chain with policy drop): translated packets are delivered straight to the
/// destination pod's veth peer, so every connection still works; without host routing the
/// stack forwards them and the chain drops them.
#[test]
fn real_sockets_pod_to_clusterip_with_host_routing_bypasses_the_forward_path() {
    real_sockets_pod_to_clusterip(true);
}

/// A node namespace and two pod namespaces behind the node's veths `vp1` and `vp2` (pods
/// 198.18.100.10 and .11; the node 198.18.100.1 on each veth; forwarding on). `quiet`: no
/// traffic but the test's (IPv6 off, so no neighbour discovery or MLD reports, and permanent
/// neighbours both ways, so no ARP).
fn node_and_two_pods(prefix: &str, quiet: bool) -> (Netns, [Netns; 2]) {
    let (node, pods) = node_and_two_pod_veths(prefix);
    node.sh("ip link set lo up && sysctl -qw net.ipv4.ip_forward=1");
    for (i, pod) in pods.iter().enumerate() {
        let j = i + 1;
        let ip = format!("198.18.100.{}", 9 + j);
        // Before the link comes up (IPv6 off), after it has (neighbours).
        let (mut node_pre, mut node_post, mut pod_pre, mut pod_post) = Default::default();
        if quiet {
            let pod_mac = pod.sh("cat /sys/class/net/eth0/address").trim().to_owned();
            let node_mac = node.sh(&format!("cat /sys/class/net/vp{j}/address")).trim().to_owned();
            node_pre = format!("sysctl -qw net.ipv6.conf.vp{j}.disable_ipv6=1 && ");
            node_post =
                format!(" && ip neigh replace {ip} lladdr {pod_mac} dev vp{j} nud permanent");
            pod_pre = "sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1 && ".to_owned();
            pod_post = format!(
                " && ip neigh replace 198.18.100.1 lladdr {node_mac} dev eth0 nud permanent"
            );
        }
        node.sh(&format!(
            "{node_pre}ip link set vp{j} up && ip addr add 198.18.100.1/32 dev vp{j} && \
             ip route add {ip}/32 dev vp{j}{node_post}"
        ));
        pod.sh(&format!(
            "{pod_pre}ip link set lo up && ip link set eth0 up && ip addr add {ip}/32 dev eth0 && \
             ip route add 198.18.100.1 dev eth0 && ip route add default via 198.18.100.1{pod_post}"
        ));
    }
    (node, pods)
}

/// A node namespace and two pod namespaces, each pod's `eth0` the peer of the node's `vp1` or
/// `vp2`; nothing configured.
fn node_and_two_pod_veths(prefix: &str) -> (Netns, [Netns; 2]) {
    let tag = format!("{prefix}{}x{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let node = Netns::new(format!("{tag}-node"));
    let pods = [Netns::new(format!("{tag}-p1")), Netns::new(format!("{tag}-p2"))];
    for (i, pod) in pods.iter().enumerate() {
        sh_out(&format!(
            "ip -n {} link add vp{} type veth peer name eth0 netns {}",
            node.0,
            i + 1,
            pod.0
        ));
    }
    (node, pods)
}

fn real_sockets_pod_to_clusterip(host_routing: bool) {
    let (node, pods) = node_and_two_pods("kpdp", false);
    // The pods send with checksum offload (CHECKSUM_PARTIAL: the L4 field holds the pseudo
    // header's sum); the node's sides of their veths have it off, so that the kernel completes
    // such a checksum from what kproxy's programs left in the field as the packet leaves the
    // node for a pod, and the pod's stack checks it (a partial checksum crossing a veth is
    // otherwise trusted as it is). eBPF host routing hands packets to the pod past that.
    node.sh("ethtool -K vp1 tx off >/dev/null && ethtool -K vp2 tx off >/dev/null");
    if host_routing {
        node.sh("nft add table ip kptest && nft add chain ip kptest fwdrop \
             \"{ type filter hook forward priority 0; policy drop; }\"");
    }
    let _tcp = spawn_in(&pods[1], "exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello'");
    let _bulk = spawn_in(
        &pods[1],
        "exec socat TCP-LISTEN:8081,reuseaddr,fork SYSTEM:'head -c 4000000 /dev/zero'",
    );
    let _udp = spawn_in(&pods[1], UDP_ECHO);

    let env = on_node(&node, move || {
        // Attached to the namespace's devices: a datapath of the test's own.
        let mut env = Env::own();
        env.dp().attach_pod("vp1").unwrap();
        env.dp().attach_pod("vp2").unwrap();
        if host_routing {
            let cfg = env.maps.config().unwrap();
            env.maps
                .set_config(&NodeConfig { flags: cfg.flags | cfg_flags::HOST_ROUTING, ..cfg })
                .unwrap();
            let devs = ["vp1", "vp2"].iter().map(|d| ifindex(d)).collect();
            env.dp().set_pod_devs(&devs).unwrap();
        }
        env.backend(1, "198.18.100.11:8080", backend_flags::LOCAL, proto::TCP);
        env.backend(2, "198.18.100.11:5353", backend_flags::LOCAL, proto::UDP);
        env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        env.backend(3, "198.18.100.11:8081", backend_flags::LOCAL, proto::TCP);
        env.service("198.19.0.10:81", proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[3], 3);
        env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        // No endpoints: rejected.
        env.service("198.19.0.99:80", proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 9);
        env.service("198.19.0.99:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[], 9);
        env
    });
    std::thread::sleep(std::time::Duration::from_millis(300));

    let tcp_client = "import socket; s=socket.create_connection((\"198.19.0.10\",80),timeout=20); \
                      print(s.recv(100).decode().strip())";
    let udp_client = "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
                      s.settimeout(20); s.sendto(b\"ping\",(\"198.19.0.53\",53)); \
                      d,a=s.recvfrom(100); print(d.decode().strip(), a[0], a[1])";
    for (who, pod) in [("pod 1", &pods[0]), ("pod 2 (hairpin)", &pods[1])] {
        assert_eq!(pod.sh(&format!("python3 -c '{tcp_client}'")).trim(), "hello", "{who} TCP");
        let bulk = "import socket; s=socket.create_connection((\"198.19.0.10\",81),timeout=20); \
                    n=0\nwhile True:\n  d=s.recv(65536)\n  n+=len(d)\n  if not d: break\nprint(n)";
        assert_eq!(pod.sh(&format!("python3 -c '{bulk}'")).trim(), "4000000", "{who} bulk");
        for attempt in 0..3 {
            let (out, err) = pod.python(udp_client);
            assert_eq!(
                out,
                "pong 198.19.0.53 53",
                "{who} UDP reply comes from the ClusterIP (attempt {attempt}); {err}\n{:?}\n{}",
                env.counters(),
                show_ct(&env),
            );
        }
    }
    // The client's own stack accepts the rejections: connection refused (only an RST makes
    // that; no answer would be a timeout) for TCP, and for connected UDP (ICMP port
    // unreachable). No timing is asserted: under emulation a second SYN may be needed.
    let refused = "import socket, time\nt=time.time()\ntry:\n  socket.create_connection(\
                   (\"198.19.0.99\",80),timeout=20)\nexcept ConnectionRefusedError:\n  \
                   print(\"tcp refused\")\n\
                   s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(20)\n\
                   s.connect((\"198.19.0.99\",53))\ns.send(b\"q\")\ntry:\n  s.recv(10)\n\
                   except ConnectionRefusedError:\n  print(\"udp refused\")\n\
                   s=socket.socket()\n\
                   s.setsockopt(socket.IPPROTO_IP,socket.IP_OPTIONS,b\"\\x01\\x01\\x01\\x00\")\n\
                   s.settimeout(20)\ntry:\n  s.connect((\"198.19.0.99\",80))\n\
                   except ConnectionRefusedError:\n  print(\"tcp with ip options refused\")\n\
                   s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                   s.setsockopt(socket.IPPROTO_IP,socket.IP_OPTIONS,b\"\\x01\\x01\\x01\\x00\")\n\
                   s.settimeout(20)\ns.connect((\"198.19.0.99\",53))\ns.send(b\"q\")\ntry:\n  s.recv(10)\n\
                   except ConnectionRefusedError:\n  print(\"udp with ip options refused\")";
    // The last SYN and datagram carry IP options (four bytes): their L4 header, where a
    // checksum offload points, lies four bytes further on than the reply's.
    let (o, e) = pods[0].python(refused);
    assert_eq!(
        o,
        "tcp refused\nudp refused\ntcp with ip options refused\nudp with ip options refused",
        "{e}\n{:?}",
        env.counters()
    );
    assert_served_and_rejected(&env.counters(), 4, 4);
    drop(env);
}

/// The counters of a real-socket test: at least `connections` new translated connections and
/// as many translated replies, `rejected` rejections, no failed rewrite.
#[track_caller]
fn assert_served_and_rejected(c: &BTreeMap<Reason, u64>, connections: u64, rejected: u64) {
    assert!(c.get(&Reason::TranslatedNew).copied().unwrap_or(0) >= connections, "{c:?}");
    assert_eq!(c.get(&Reason::RejectNoBackend), Some(&rejected), "{c:?}");
    assert!(c.get(&Reason::ReplyTranslated).copied().unwrap_or(0) >= connections, "{c:?}");
    assert!(!c.contains_key(&Reason::DropRewrite), "{c:?}");
}

/// Another owner's TC program behind kproxy's on a pod's veth (a CNI's policy or a flow
/// monitor, attached after kproxy's) runs on every packet kproxy passes (`TCX_NEXT`, or the next
/// clsact filter), a service's after its translation, as netfilter's filter table sees
/// kube-proxy's DNATed packets: an empty program behind kproxy's on both hooks of the client
/// pod's veth, its runs counted by the kernel's run-time statistics; then a program behind
/// kproxy's that denies traffic to the backend's address stops the service's traffic to it too.
/// With tcx links (Linux 6.6+) and with clsact filters.
#[test]
fn programs_behind_kproxys_see_every_packet_it_passes() {
    use kproxy::dataplane::loader::TcAttach;
    use kproxy_tests::{bench::bpfstats, lab::xdp};
    let (node, pods) = node_and_two_pods("kpbh", true);
    let tag = node.0.trim_end_matches("-node").to_owned();
    let _udp = spawn_in(&pods[1], UDP_ECHO);
    const N_QUERIES: u64 = 20;
    const SERVICE: &str = "198.19.0.53:53";
    const DIRECT: &str = "198.18.100.11:5353";

    let pin = PathBuf::from(format!("/sys/fs/bpf/kpt-behind-{tag}"));
    let _remove_pin = shared::RemoveDir(pin.clone());
    on_node(&node, || in_node(&pin, &pods[0]));

    /// Attaches `prog` behind kproxy's program on the given hooks of `vp1` (`kind`: appended
    /// after its tcx link, or a clsact filter after its priority-1 one, from a pin at `pin`);
    /// detached when the returned guard drops.
    fn behind(
        kind: TcAttach,
        prog: &std::os::fd::OwnedFd,
        hooks: &[&'static str],
        pin: &Path,
    ) -> impl Drop {
        /// The tcx links (detached when closed), the clsact hooks of the filter.
        struct Detach(#[allow(dead_code)] Vec<std::os::fd::OwnedFd>, Vec<&'static str>);
        impl Drop for Detach {
            fn drop(&mut self) {
                for dir in &self.1 {
                    let _ = Command::new("tc")
                        .args(["filter", "del", "dev", "vp1", dir, "prio", "7"])
                        .status();
                }
            }
        }
        if kind == TcAttach::Tcx {
            let links = hooks.iter().map(|h| xdp::attach_tcx_last(prog, "vp1", *h == "egress"));
            return Detach(links.collect::<Result<_, _>>().unwrap(), vec![]);
        }
        std::fs::create_dir_all(pin).unwrap();
        let p = pin.join("prog");
        let _ = std::fs::remove_file(&p);
        xdp::pin(prog, &p).unwrap();
        let d = Detach(vec![], hooks.to_vec());
        for dir in hooks {
            sh_out(&format!(
                "tc filter add dev vp1 {dir} prio 7 bpf da object-pinned {}",
                p.display()
            ));
        }
        d
    }

    fn in_node(pin: &Path, client: &Netns) {
        let (service, direct) = (SERVICE, DIRECT);
        let backend: Ipv4Addr = direct.split_once(':').unwrap().0.parse().unwrap();
        let mut env = Env::own();
        env.backend(2, direct, backend_flags::LOCAL, proto::UDP);
        env.service(service, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        let counter = xdp::load_tc("kpt_behind", &xdp::TC_NEXT_PROGRAM).unwrap();
        let deny = xdp::load_tc("kpt_deny", &xdp::tc_deny_ipv4_dst(backend)).unwrap();
        let _stats = bpfstats::enable().unwrap();
        let tcx = kproxy::dataplane::features::tcx();
        let kinds: &[TcAttach] =
            if tcx { &[TcAttach::Tcx, TcAttach::Netlink] } else { &[TcAttach::Netlink] };
        for &kind in kinds {
            env.dp().set_tc_attach(kind);
            env.dp().attach_pod("vp1").unwrap();
            env.dp().attach_pod("vp2").unwrap();
            let what = format!("{kind:?}");
            {
                let _behind = behind(kind, &counter, &["ingress", "egress"], pin);
                let runs = || xdp::prog_runs(&counter).unwrap();
                // Translated both ways (to the backend on the veth's ingress, back from the
                // ClusterIP on its egress) and passed on: the program behind sees each.
                let r0 = runs();
                let answers = ask_udp(client, service, N_QUERIES, 10);
                let n = answers.lines().filter(|l| *l == "198.19.0.53").count() as u64;
                assert_eq!(n, N_QUERIES, "{what}: answers from the ClusterIP\n{answers}");
                let r1 = runs();
                // Left as they came: seen as well.
                let answers = ask_udp(client, direct, N_QUERIES, 10);
                let n = answers.lines().filter(|l| *l == "198.18.100.11").count() as u64;
                assert_eq!(n, N_QUERIES, "{what}: answers from the pod\n{answers}");
                let r2 = runs();
                let c = env.counters();
                assert!(
                    r1 - r0 >= 2 * N_QUERIES,
                    "{what}: ran {} times on translated packets; {c:?}",
                    r1 - r0
                );
                assert!(
                    r2 - r1 >= 2 * N_QUERIES,
                    "{what}: ran {} times on untouched ones",
                    r2 - r1
                );
            }
            {
                // A policy behind kproxy's that denies the backend's address sees the service's
                // queries as translated, to the backend, and stops them as it stops direct ones.
                let _behind = behind(kind, &deny, &["ingress"], pin);
                let answers = ask_udp(client, direct, 1, 1);
                assert_eq!(answers, "timeout", "{what}: direct, denied");
                let answers = ask_udp(client, service, 2, 1);
                assert_eq!(answers, "timeout\ntimeout", "{what}: service, denied");
                let d = xdp::prog_runs(&deny).unwrap();
                assert!(d >= 3, "{what}: the deny program ran {d} times");
            }
            let answers = ask_udp(client, service, 1, 10);
            assert_eq!(answers, "198.19.0.53", "{what}: service, the policy removed");
        }
    }
}

/// `--tcx-anchor`: another owner's tcx program in front of kproxy's that ends the hook
/// (`TCX_PASS`, as Cilium's programs return) keeps a pod's service traffic from kproxy with the
/// default anchor (`tail`, kproxy's link appended); with `head` kproxy's link moves in front of
/// it, and the service answers: within one agent (the same program: its old link goes first),
/// and across a restart (a new load of the programs: the new link goes in front, then the old
/// one goes). `tail` does not move a link back. Linux 6.6+ (tcx).
#[test]
fn tcx_anchor_head_puts_kproxys_link_in_front_of_other_owners() {
    if !kproxy::dataplane::features::tcx() {
        eprintln!("skipped: this kernel has no tcx hooks");
        return;
    }
    let (node, pods) = node_and_two_pods("kpan", true);
    let _udp = spawn_in(&pods[1], UDP_ECHO);
    on_node(&node, || in_node(&pods[0]));

    fn in_node(client: &Netns) {
        use aya::programs::{SchedClassifier, TcAttachType};
        use kproxy::dataplane::loader::TcxAnchor;
        use kproxy_tests::lab::xdp;
        const SERVICE: &str = "198.19.0.53:53";
        let mut env = Env::own();
        env.backend(2, "198.18.100.11:5353", backend_flags::LOCAL, proto::UDP);
        env.service(SERVICE, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 2);
        // The tcx programs on the client pod's veth ingress, in the order they run.
        let order = || -> Vec<(String, u32)> {
            let (_, progs) = SchedClassifier::query_tcx("vp1", TcAttachType::Ingress).unwrap();
            progs.iter().map(|p| (p.name_as_str().unwrap().to_owned(), p.id())).collect()
        };
        let names = |o: &[(String, u32)]| o.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        let kp = names::PROG_TC_FROM_POD;
        let pass = xdp::load_tc("kpt_pass", &xdp::TC_PASS_PROGRAM).unwrap();
        let _front = xdp::attach_tcx_front(&pass, "vp1", false).unwrap();

        // Tail (the default): appended behind the program that ends the hook.
        env.dp().attach_pod("vp1").unwrap();
        env.dp().attach_pod("vp2").unwrap();
        assert_eq!(names(&order()), ["kpt_pass", kp]);
        assert_eq!(ask_udp(client, SERVICE, 1, 1), "timeout", "kproxy's program never runs");
        // `kproxy device list` names the program in front of kproxy's.
        let in_front = |dir: &Path| -> Vec<String> {
            let report = kproxy::netdev::attachments(dir).unwrap();
            let d = report.devices.iter().find(|d| d.name == "vp1").expect("vp1 listed");
            d.tc.iter().find(|p| p.hook == "ingress").expect("ingress").after.clone()
        };
        assert_eq!(in_front(&env.dir), ["kpt_pass"]);

        // Head: moved to the front (the same program: its old link goes first).
        env.dp().set_tcx_anchor(TcxAnchor::Head);
        env.dp().attach_pod("vp1").unwrap();
        let o = order();
        assert_eq!(names(&o), [kp, "kpt_pass"]);
        assert_eq!(in_front(&env.dir), [""; 0]);
        assert_eq!(ask_udp(client, SERVICE, 3, 10), "198.19.0.53\n198.19.0.53\n198.19.0.53");
        // In front already: the link keeps its program.
        env.dp().attach_pod("vp1").unwrap();
        assert_eq!(order(), o);
        let pin = env.dir.join("v1/links/tcx-ingress-vp1");
        assert!(pin.exists());

        // Another owner puts a program in front again; a restarted agent (a new load of the
        // programs over the same pins) with `head` attaches its program in front, then the
        // old link goes: one kproxy program, the new one, first.
        let _front2 = xdp::attach_tcx_front(&pass2(), "vp1", false).unwrap();
        assert_eq!(names(&order()), ["kpt_pass2", kp, "kpt_pass"]);
        let mut restarted = Datapath::load(&env.dir, &TEST_SIZES).unwrap();
        restarted.set_tcx_anchor(TcxAnchor::Head);
        restarted.attach_pod("vp1").unwrap();
        let o2 = order();
        assert_eq!(names(&o2), [kp, "kpt_pass2", "kpt_pass"]);
        assert_ne!(o2[0].1, o[0].1, "the restarted agent's program");
        assert_eq!(ask_udp(client, SERVICE, 1, 10), "198.19.0.53");

        // Tail does not move a link back.
        restarted.set_tcx_anchor(TcxAnchor::Tail);
        restarted.attach_pod("vp1").unwrap();
        assert_eq!(order(), o2);
        restarted.detach("vp1").unwrap();
        assert_eq!(names(&order()), ["kpt_pass2", "kpt_pass"]);
        assert!(!pin.exists());

        fn pass2() -> std::os::fd::OwnedFd {
            xdp::load_tc("kpt_pass2", &xdp::TC_PASS_PROGRAM).unwrap()
        }
    }
}

/// An ICMP error frame from `src` to `dst` quoting `quote` (IP header + 8 bytes).
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, code: u8, quote: &[u8]) -> Frame {
    let mut f = Frame::udp(SocketAddrV4::new(src, 1), SocketAddrV4::new(dst, 1), b"");
    f.l4 = L4::Icmp { typ: 3, code, rest: [0; 4], payload: quote.to_vec() };
    f
}

#[test]
fn icmp_errors_about_translated_connections_are_translated() {
    let mut env = Env::new();
    let svc = "198.19.0.53:53";
    let be = "198.18.100.11:5353";
    env.backend(1, be, backend_flags::LOCAL, proto::UDP);
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let q = Frame::udp(sa(POD_CLIENT), sa(svc), b"query");
    let qb = q.build();
    let (_, dnat) = env.tc(names::PROG_TC_FROM_POD, &qb);

    // The backend answers "port unreachable", quoting the query as it received it: the
    // error leaves the backend's veth untouched, for the stack (whose conntrack relates it to
    // the pod ↔ backend connection), and is translated where it enters the client pod.
    let err = icmp_error(*sa(be).ip(), *sa(POD_CLIENT).ip(), 3, &dnat[14..42]);
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &err.build());
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &err.build());
    assert_eq!(v, TC_PASS);
    // The client sees it from the ClusterIP, about the query it sent (the quoted UDP checksum
    // is left as the backend saw it).
    let mut quote = qb[14..42].to_vec();
    quote[26..28].copy_from_slice(&dnat[14 + 26..14 + 28]);
    assert_frame(&out, &icmp_error(*sa(svc).ip(), *sa(POD_CLIENT).ip(), 3, &quote));

    // A reply reaches a client whose socket is gone (passed to the stack as the backend sent
    // it, restored entering the client pod): its "port unreachable" about the reply goes to
    // the backend, quoting the reply as the backend sent it.
    let r = Frame::udp(sa(be), sa(POD_CLIENT), b"answer");
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &r.build());
    let (v, restored) = env.tc(names::PROG_TC_TO_POD, &r.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&restored, &r.clone().with_src(sa(svc)));
    let err = icmp_error(*sa(POD_CLIENT).ip(), *sa(svc).ip(), 3, &restored[14..42]);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err.build());
    assert_eq!(v, TC_PASS);
    let rb = r.build();
    let mut quote = rb[14..42].to_vec();
    quote[26..28].copy_from_slice(&restored[14 + 26..14 + 28]);
    assert_frame(&out, &icmp_error(*sa(POD_CLIENT).ip(), *sa(be).ip(), 3, &quote));

    // An ICMP error about something else passes untouched.
    let other = Frame::udp(sa(POD_CLIENT), sa("198.18.0.99:53"), b"x").build();
    let err =
        icmp_error(*sa("198.18.0.99:1").ip(), *sa(POD_CLIENT).ip(), 3, &other[14..42]).build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &err);
    assert_eq!((v, out), (TC_PASS, err));
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::ReplyTranslated, 1),
            (Reason::PassReplyToPod, 2),
            (Reason::IcmpErrorTranslated, 2),
            (Reason::PassUnsupportedProto, 1),
        ],
    );
}

#[test]
fn icmp_error_from_remote_backend_reaches_external_client() {
    in_test_netns(true, || {
        let mut env = Env::new();
        let np = env.remote_nodeport(proto::UDP, 30053);
        let q = Frame::udp(sa(CLIENT), sa(&np), b"query");
        let qb = q.build();
        let (v, fwd) = env.xdp(&qb);
        assert_eq!(v, XDP_REDIRECT);
        let fwd_ip = frames::decode(&fwd).unwrap();
        // Fragmentation needed from the backend's node, quoting the SNATed query.
        let err = icmp_error(*sa(BE_REMOTE).ip(), fwd_ip.saddr, 4, &fwd[14..42])
            .with_macs([2, 0, 0, 0, 0, 0x10], [2, 0, 0, 0, 0, 0x11]);
        let (v, out) = env.xdp(&err.build());
        assert_eq!(v, XDP_REDIRECT, "sent on to the client");
        let mut quote = qb[14..42].to_vec();
        quote[26..28].copy_from_slice(&fwd[14 + 26..14 + 28]); // quoted UDP checksum untouched
        quote[8] = fwd[14 + 8]; // and the TTL the backend saw
        let c = frames::checksum(&[&{
            let mut h = quote[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        }]);
        quote[10..12].copy_from_slice(&c.to_be_bytes());
        let mut want = icmp_error(NODE_IP.parse().unwrap(), *sa(CLIENT).ip(), 4, &quote)
            .with_macs([2, 0, 0, 0, 0, 0x02], [2, 0, 0, 0, 0, 0x10]);
        want.ttl = 63;
        assert_frame(&out, &want);
        assert_eq!(env.counters().get(&Reason::IcmpErrorTranslated), Some(&1));
    });
}

/// Real sockets through XDP and TC on an external device: a client namespace reaches a
/// NodePort whose backend is a pod on the node. XDP translates and marks the packets, TC on the
/// same device (`kp_tc_ext_xdp`) skips them (`PassHandledByXdp`), the pod's replies are restored
/// on its veth. Where the kernel withholds `bpf_xdp_adjust_meta` from XDP (feature `xdp_meta`)
/// the mark is the source MAC's (`MAC_MARK`), which TC takes off: the node's stack still
/// delivers everything.
#[test]
fn real_sockets_nodeport_through_xdp() {
    real_sockets_nodeport(kproxy::dataplane::loader::ExternalMode::Xdp);
}

/// The same in TC-only mode.
#[test]
fn real_sockets_nodeport_tc_only() {
    real_sockets_nodeport(kproxy::dataplane::loader::ExternalMode::TcOnly);
}

fn real_sockets_nodeport(mode: kproxy::dataplane::loader::ExternalMode) {
    let tag = format!("kpdp{}x{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let node = Netns::new(format!("{tag}-node"));
    let client = Netns::new(format!("{tag}-client"));
    let pod = Netns::new(format!("{tag}-p1"));
    sh_out(&format!("ip -n {} link add eth0 type veth peer name eth0 netns {}", node.0, client.0));
    sh_out(&format!("ip -n {} link add vp1 type veth peer name eth0 netns {}", node.0, pod.0));
    node.sh(&format!(
        "ip link set lo up && ip link set eth0 up && ip addr add {NODE_IP}/24 dev eth0 && \
         ip link set vp1 up && ip addr add 198.18.100.1/32 dev vp1 && \
         ip route add 198.18.100.10/32 dev vp1 && sysctl -qw net.ipv4.ip_forward=1"
    ));
    client.sh("ip link set lo up && ip link set eth0 up && ip addr add 198.18.0.2/24 dev eth0");
    pod.sh("ip link set lo up && ip link set eth0 up && ip addr add 198.18.100.10/32 dev eth0 && \
         ip route add 198.18.100.1 dev eth0 && ip route add default via 198.18.100.1");
    let _tcp = spawn_in(&pod, "exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello'");
    // Bulk data from the backend: large (GSO) segments on the reply path.
    let _bulk = spawn_in(
        &pod,
        "exec socat TCP-LISTEN:8081,reuseaddr,fork SYSTEM:'head -c 4000000 /dev/zero'",
    );
    let _udp = spawn_in(&pod, UDP_ECHO);
    let env = on_node(&node, move || {
        // Attached to the namespace's devices: a datapath of the test's own (generic XDP: the
        // default on veth is TC alone).
        let mut env = Env::own();
        env.dp().set_xdp_mode(Some(aya::programs::XdpMode::Skb));
        env.dp().attach_external("eth0", mode).unwrap();
        env.dp().attach_pod("vp1").unwrap();
        env.backend(1, "198.18.100.10:8080", backend_flags::LOCAL, proto::TCP);
        env.backend(2, "198.18.100.10:5353", backend_flags::LOCAL, proto::UDP);
        let np = |p: u16| format!("{NODE_IP}:{p}");
        env.service(&np(30080), proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        env.backend(3, "198.18.100.10:8081", backend_flags::LOCAL, proto::TCP);
        env.service(&np(30081), proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[3], 3);
        env.service(&np(30053), proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[2], 2);
        env
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tcp_client = format!(
        "import socket; s=socket.create_connection((\"{NODE_IP}\",30080),timeout=20); \
         print(s.recv(100).decode().strip())"
    );
    let udp_client = format!(
        "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(20); \
         s.sendto(b\"ping\",(\"{NODE_IP}\",30053)); d,a=s.recvfrom(100); \
         print(d.decode().strip(), a[0], a[1])"
    );
    let run = |code: &str| client.python(code).0;
    assert_eq!(run(&tcp_client), "hello", "{:?}\n{}", env.counters(), show_ct(&env));
    assert_eq!(run(&udp_client), format!("pong {NODE_IP} 30053"), "{:?}", env.counters());
    let bulk_client = format!(
        "import socket; s=socket.create_connection((\"{NODE_IP}\",30081),timeout=20); n=0\n\
         while True:\n  d=s.recv(65536)\n  n+=len(d)\n  if not d: break\nprint(n)"
    );
    assert_eq!(run(&bulk_client), "4000000", "{:?}", env.counters());
    let c = env.counters();
    assert!(c.get(&Reason::TranslatedNew).copied().unwrap_or(0) >= 2, "{c:?}\n{}", show_ct(&env));
    assert!(c.get(&Reason::ReplyTranslated).copied().unwrap_or(0) >= 2, "{c:?}");
    let skipped = c.get(&Reason::PassHandledByXdp).copied().unwrap_or(0);
    if mode == kproxy::dataplane::loader::ExternalMode::Xdp {
        assert!(skipped >= 2, "{c:?}");
    } else {
        assert_eq!(skipped, 0, "{c:?}");
    }
}

/// A pod's connection to its own node's NodePort, balanced to a remote backend: the reply comes
/// back over the external device with the pod's address as destination and crosses the stack as
/// the backend sent it (restored before the stack, its source would be the node's own address:
/// a martian there); it is restored where it enters the pod.
#[test]
fn pod_to_own_node_nodeport_remote_backend_reply_is_restored_entering_the_pod() {
    let mut env = Env::new();
    env.backend(1, BE_REMOTE, 0, proto::TCP);
    let np = format!("{NODE_IP}:30080");
    env.service(&np, proto::TCP, scope::INTERNAL, svc_flags::NODE_PORT, &[1], 1);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(&np), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_PASS, "pods keep their address; the stack routes to node 1");
    assert_frame(&out, &syn.clone().with_dst(sa(BE_REMOTE)));
    let synack = Frame::tcp(sa(BE_REMOTE), sa(POD_CLIENT), SYN | ACK);
    for prog in [names::PROG_XDP_EXT, names::PROG_TC_EXT] {
        assert_reply_passed_to_the_stack(&mut env, prog, &synack.build());
    }
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &synack.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &synack.clone().with_src(sa(&np)));
    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct[0].1.state, ct_state::ESTABLISHED, "by the reply");
    assert_counts(
        &env,
        &[(Reason::TranslatedNew, 1), (Reason::PassReplyToPod, 2), (Reason::ReplyTranslated, 1)],
    );
}

/// Measurement, not a check (`cargo test --test datapath_testrun -- --ignored
/// per_packet_cost_in_the_number_of_services --nocapture`): the XDP program's per-packet cost
/// (BPF_PROG_TEST_RUN average over many repetitions) with 1 and with 10 000 services. Speed is
/// the bench's to judge (`make bench`, item 7 at 1 to 10,000 services); this test checks only
/// that both packets keep their verdict at either scale.
#[test]
#[ignore = "measurement: prints the XDP cost at 1 and 10,001 services"]
fn per_packet_cost_in_the_number_of_services() {
    let mut env = Env::with_sizes(&MapSizes {
        services: 32_768,
        backends: 16_384,
        conntrack: 4096,
        affinity: 1024,
        ipv6: true,
    });
    let measure = |env: &mut Env, frame: &[u8]| -> (u32, f64) {
        let p: &mut Xdp = env.dp().program_mut(names::PROG_XDP_EXT).unwrap().try_into().unwrap();
        let mut best = f64::MAX;
        let mut verdict = None;
        for _ in 0..5 {
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: 200_000,
                    ..Default::default()
                })
                .unwrap();
            assert!(verdict.is_none_or(|v| v == r.return_value), "verdict changed");
            verdict = Some(r.return_value);
            best = best.min(r.duration.as_nanos() as f64);
        }
        (verdict.unwrap(), best)
    };
    // A packet for no service (all three lookups miss) and one to a Local-policy service with
    // no local endpoint (service hit, dropped): neither changes the packet between repetitions.
    env.service("198.19.0.1:80", proto::TCP, scope::EXTERNAL, svc_flags::DROP_IF_EMPTY, &[], 1);
    let miss = Frame::tcp(sa(CLIENT), sa("198.18.0.99:80"), ACK).build();
    let hit = Frame::tcp(sa(CLIENT), sa("198.19.0.1:80"), SYN).build();
    let (miss1, hit1) = (measure(&mut env, &miss), measure(&mut env, &hit));
    for i in 0..10_000u32 {
        let id = i + 10;
        let fe = format!("198.19.{}.{}:80", 1 + i / 250, 1 + i % 250);
        env.backend(id, BE1, 0, proto::TCP);
        env.service(&fe, proto::TCP, scope::EXTERNAL, svc_flags::CLUSTER_IP, &[id], id);
    }
    let (miss2, hit2) = (measure(&mut env, &miss), measure(&mut env, &hit));
    eprintln!(
        "XDP ns/packet: not for a service {:.0} (1 service) vs {:.0} (10001); \
         service hit {:.0} vs {:.0}",
        miss1.1, miss2.1, hit1.1, hit2.1
    );
    assert_eq!((miss1.0, hit1.0), (XDP_PASS, XDP_DROP));
    assert_eq!((miss2.0, hit2.0), (miss1.0, hit1.0), "verdicts at 10,001 services");
}

/// Measurement, not a check (`cargo test --test datapath_testrun -- --ignored
/// established_path_cost --nocapture`): the per-packet cost of the established path of
/// `kp_tc_from_pod` and `kp_xdp_ext` under BPF_PROG_TEST_RUN with `repeat` (the kernel's average,
/// without the per-run timer of bpf_stats). TEST_RUN reruns a program on the buffer it just
/// rewrote, so the two frontends are each other's backend: every run translates an established
/// packet to the other frontend's tracked connection.
#[test]
#[ignore = "measurement: prints the established path's cost"]
fn established_path_cost() {
    in_test_netns(true, || {
        let mut env = Env::new();
        let (x, y) = ("198.19.0.10:80", "198.19.0.11:80");
        env.backend(1, y, backend_flags::LOCAL, proto::TCP);
        env.backend(2, x, backend_flags::LOCAL, proto::TCP);
        for sc in [scope::INTERNAL, scope::EXTERNAL] {
            env.service(x, proto::TCP, sc, svc_flags::CLUSTER_IP, &[1], 1);
            env.service(y, proto::TCP, sc, svc_flags::CLUSTER_IP, &[2], 2);
        }
        for fe in [x, y] {
            let syn = Frame::tcp(sa(POD_CLIENT), sa(fe), SYN).build();
            assert_eq!(env.tc(names::PROG_TC_FROM_POD, &syn).0, TC_PASS);
        }
        let data = Frame::tcp(sa(POD_CLIENT), sa(x), ACK | PSH).with_payload(&[7; 100]).build();
        let runs = 200_000;
        let mut tc = f64::MAX;
        for _ in 0..5 {
            let p: &mut SchedClassifier =
                env.dp().program_mut(names::PROG_TC_FROM_POD).unwrap().try_into().unwrap();
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(&data),
                    repeat: runs,
                    ..Default::default()
                })
                .unwrap();
            tc = tc.min(r.duration.as_nanos() as f64);
        }
        let mut xdp = f64::MAX;
        for _ in 0..5 {
            let p: &mut Xdp =
                env.dp().program_mut(names::PROG_XDP_EXT).unwrap().try_into().unwrap();
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(&data),
                    repeat: runs,
                    ..Default::default()
                })
                .unwrap();
            xdp = xdp.min(r.duration.as_nanos() as f64);
        }
        let c = env.counters();
        eprintln!(
            "established path ns/packet: kp_tc_from_pod {tc:.0}, kp_xdp_ext {xdp:.0} ({c:?})"
        );
        assert!(c.get(&Reason::TranslatedEstablished).copied().unwrap_or(0) >= u64::from(runs));
    });
}

/// Real sockets, two nodes on a bridged underlay: a client reaches node 0's NodePort whose
/// only backend is a pod on node 1. Node 0 source-NATs and forwards (XDP_TX / TC redirect);
/// the pod's replies come back to node 0 and are sent on to the client.
fn real_sockets_nodeport_remote(mode: kproxy::dataplane::loader::ExternalMode) {
    let tag = format!("kpdp{}x{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let under = Netns::new(format!("{tag}-under"));
    let client = Netns::new(format!("{tag}-client"));
    let n0 = Netns::new(format!("{tag}-n0"));
    let n1 = Netns::new(format!("{tag}-n1"));
    let pod = Netns::new(format!("{tag}-p"));
    under.sh("ip link set lo up && ip link add br0 type bridge && ip link set br0 up");
    for (i, ns, addr) in
        [(0, &client, "198.18.0.2"), (1, &n0, "198.18.0.10"), (2, &n1, "198.18.0.11")]
    {
        sh_out(&format!("ip -n {} link add u{i} type veth peer name eth0 netns {}", under.0, ns.0));
        under.sh(&format!("ip link set u{i} master br0 && ip link set u{i} up"));
        ns.sh(&format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {addr}/24 dev eth0"
        ));
    }
    sh_out(&format!("ip -n {} link add vp1 type veth peer name eth0 netns {}", n1.0, pod.0));
    n1.sh("ip link set vp1 up && ip addr add 198.18.101.1/32 dev vp1 && \
         ip route add 198.18.101.10/32 dev vp1 && sysctl -qw net.ipv4.ip_forward=1");
    n0.sh("ip route add 198.18.101.0/24 via 198.18.0.11 && sysctl -qw net.ipv4.ip_forward=1");
    pod.sh("ip link set lo up && ip link set eth0 up && ip addr add 198.18.101.10/32 dev eth0 && \
         ip route add 198.18.101.1 dev eth0 && ip route add default via 198.18.101.1");
    let _tcp = spawn_in(&pod, "exec socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello'");
    let _bulk = spawn_in(
        &pod,
        "exec socat TCP-LISTEN:8081,reuseaddr,fork SYSTEM:'head -c 4000000 /dev/zero'",
    );
    let env = on_node(&n0, move || {
        // Attached to the namespace's devices: a datapath of the test's own (generic XDP: the
        // default on veth is TC alone).
        let mut env = Env::own();
        env.dp().set_xdp_mode(Some(aya::programs::XdpMode::Skb));
        env.dp().attach_external("eth0", mode).unwrap();
        env.backend(1, "198.18.101.10:8080", 0, proto::TCP);
        env.backend(2, "198.18.101.10:8081", 0, proto::TCP);
        let np = |p: u16| format!("{NODE_IP}:{p}");
        env.service(&np(30080), proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
        env.service(&np(30081), proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[2], 2);
        env
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let run = |code: &str| client.python(code).0;
    let tcp_client = format!(
        "import socket; s=socket.create_connection((\"{NODE_IP}\",30080),timeout=20); \
         print(s.recv(100).decode().strip())"
    );
    assert_eq!(run(&tcp_client), "hello", "{:?}\n{}", env.counters(), show_ct(&env));
    let bulk_client = format!(
        "import socket; s=socket.create_connection((\"{NODE_IP}\",30081),timeout=20); n=0\n\
         while True:\n  d=s.recv(65536)\n  n+=len(d)\n  if not d: break\nprint(n)"
    );
    assert_eq!(run(&bulk_client), "4000000", "{:?}", env.counters());
    let ct = env.maps.conntrack().unwrap();
    assert!(
        ct.iter().all(|(_, v)| v.flags & kproxy_common::ct_flags::SNAT != 0),
        "{}",
        show_ct(&env)
    );
}

#[test]
fn real_sockets_nodeport_remote_xdp() {
    real_sockets_nodeport_remote(kproxy::dataplane::loader::ExternalMode::Xdp);
}

#[test]
fn real_sockets_nodeport_remote_tc_only() {
    real_sockets_nodeport_remote(kproxy::dataplane::loader::ExternalMode::TcOnly);
}

#[test]
fn snat_ports_run_out_and_are_reclaimed_from_closed_connections() {
    in_test_netns(true, || {
        let mut env = Env::new();
        env.maps
            .set_config(&NodeConfig {
                snat_addr: be_addr(NODE_IP.parse().unwrap()),
                snat_port_min: 61000,
                snat_port_max: 61001,
                flags: cfg_flags::READY,
                backend_gen: 0,
            })
            .unwrap();
        let np = env.remote_nodeport(proto::TCP, 30080);
        let syn = |port: u16| Frame::tcp(SocketAddrV4::new(*sa(CLIENT).ip(), port), sa(&np), SYN);
        let mut ports = std::collections::BTreeSet::new();
        for cport in [40001, 40002] {
            let (v, out) = env.xdp(&syn(cport).build());
            assert_eq!(v, XDP_REDIRECT);
            let L4::Tcp { sport, .. } = frames::decode(&out).unwrap().l4 else { panic!() };
            ports.insert(sport);
        }
        assert_eq!(ports, [61000, 61001].into(), "both ports used, once each");
        // Range exhausted: the third connection is dropped and counted.
        let (v, _) = env.xdp(&syn(40003).build());
        assert_eq!(v, XDP_DROP);
        assert_eq!(env.counters().get(&Reason::DropSnatExhausted), Some(&1));
        // The first client resets its connection; its port is reclaimed by the next one.
        let rst = Frame::tcp(SocketAddrV4::new(*sa(CLIENT).ip(), 40001), sa(&np), RST);
        let (v, _) = env.xdp(&rst.build());
        assert_eq!(v, XDP_REDIRECT);
        let (v, _) = env.xdp(&syn(40003).build());
        assert_eq!(v, XDP_REDIRECT, "{:?}", env.counters());
        assert_eq!(env.counters().get(&Reason::DropSnatExhausted), Some(&1));
    });
}

#[test]
fn xdp_translates_packets_with_ip_options() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:5353", backend_flags::LOCAL, proto::UDP);
    let np = format!("{NODE_IP}:30053");
    env.service(&np, proto::UDP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 1);
    let mut q = Frame::udp(sa(CLIENT), sa(&np), b"query");
    q.ip_options = vec![0x94, 0x04, 0, 0]; // router alert
    let (v, out) = env.xdp(&q.build());
    assert_eq!(v, XDP_PASS);
    assert_frame(&out, &q.clone().with_dst(sa("198.18.100.11:5353")));
    let mut q2 = q.clone().with_src(sa("198.18.0.2:40001"));
    q2.ip_options = vec![1; 40]; // the longest header: IHL 15
    let (v, out) = env.xdp(&q2.build());
    assert_eq!(v, XDP_PASS);
    assert_frame(&out, &q2.clone().with_dst(sa("198.18.100.11:5353")));
}

/// A later fragment (offset 24 bytes, last) of datagram `id`: IP header and raw payload.
fn later_fragment(src: Ipv4Addr, dst: Ipv4Addr, id: u16, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&frames::MAC_NODE);
    f.extend_from_slice(&frames::MAC_CLIENT);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&3u16.to_be_bytes()); // offset 3 * 8, no MF
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let c = frames::checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn fragmented_datagrams_follow_their_first_fragment() {
    let mut env = Env::new();
    let svc = "198.19.0.53:53";
    let be = "198.18.100.11:5353";
    env.backend(1, be, backend_flags::LOCAL, proto::UDP);
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    // Query: first fragment (ports, MF) and the rest.
    let mut first = Frame::udp(sa(POD_CLIENT), sa(svc), b"first fragment..");
    first.frag = 0x2000;
    first.id = 0x0101;
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &first.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &first.clone().with_dst(sa(be)));
    let rest = later_fragment(*sa(POD_CLIENT).ip(), *sa(svc).ip(), 0x0101, 17, b"the rest");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &rest);
    assert_eq!(v, TC_PASS);
    assert_eq!(out, later_fragment(*sa(POD_CLIENT).ip(), *sa(be).ip(), 0x0101, 17, b"the rest"));

    // A large answer from the backend, fragmented by its kernel: both fragments leave the
    // backend's pod as they are (the reply of a pod's connection, for the stack) and both are
    // restored entering the client pod.
    let mut rfirst = Frame::udp(sa(be), sa(POD_CLIENT), b"answer, part one");
    rfirst.frag = 0x2000;
    rfirst.id = 0x0202;
    let rrest = later_fragment(*sa(be).ip(), *sa(POD_CLIENT).ip(), 0x0202, 17, b"part two");
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &rfirst.build());
    assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &rrest);
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &rfirst.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &rfirst.clone().with_src(sa(svc)));
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &rrest);
    assert_eq!(v, TC_PASS);
    assert_eq!(out, later_fragment(*sa(svc).ip(), *sa(POD_CLIENT).ip(), 0x0202, 17, b"part two"));
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::TranslatedEstablished, 1),
            (Reason::ReplyTranslated, 2),
            (Reason::PassReplyToPod, 2),
        ],
    );
}

// --- connection-tracking capacity, garbage collection, evictions ---------------------------------

/// Sends one UDP datagram from pod port `sport` to the ClusterIP through `kp_tc_from_pod`.
fn udp_from_pod(env: &mut Env, sport: u16, fe: &str) -> Vec<u8> {
    let q = Frame::udp(SocketAddrV4::new("198.18.100.10".parse().unwrap(), sport), sa(fe), b"q");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &q.build());
    assert_eq!(v, TC_PASS);
    out
}

/// Destination address and port of a frame.
fn dst_of(frame: &[u8]) -> SocketAddrV4 {
    let f = frames::decode(frame).expect("decodable frame");
    match f.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => SocketAddrV4::new(f.daddr, dport),
        L4::Icmp { .. } => panic!("not TCP/UDP"),
    }
}

fn ct_tuple(sport: u16, fe: &str) -> kproxy_common::Tuple4 {
    let f = sa(fe);
    kproxy_common::Tuple4 {
        saddr: be_addr("198.18.100.10".parse().unwrap()),
        daddr: be_addr(*f.ip()),
        sport: sport.to_be(),
        dport: f.port().to_be(),
        proto: proto::UDP,
        _pad: [0; 3],
    }
}

/// A full connection table evicts the least recently used flows, and every eviction is counted.
///
/// Every packet runs on one CPU: the LRU maps of older kernels (6.1 here) move up to 128 free
/// elements into the running CPU's own list at once, so a table this small has all its free
/// elements on one CPU, and an insert on another CPU then takes an element from that CPU's list
/// of recent inserts, used or not (the busy flow was evicted 16 times in 300 flows on 6.1).
/// Real tables are thousands of times larger than that batch.
#[test]
fn full_conntrack_table_evicts_lru_entries_and_counts_them() {
    on_cpu0(|| {
        const CAP: u32 = 64;
        const FLOWS: u16 = 300;
        let mut env = Env::with_sizes(&MapSizes {
            services: 64,
            backends: 64,
            conntrack: CAP,
            affinity: 8,
            ipv6: true,
        });
        env.backend(1, "198.18.100.11:53", backend_flags::LOCAL, proto::UDP);
        env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
        // Flow 40000 stays in use while 300 others come and go: the least recently used ones go.
        for i in 0..FLOWS {
            if i % 8 == 0 {
                udp_from_pod(&mut env, 40000, "198.19.0.53:53");
            }
            let out = udp_from_pod(&mut env, 41000 + i, "198.19.0.53:53");
            assert_eq!(dst_of(&out), sa("198.18.100.11:53"));
        }
        let present = env.maps.conntrack().unwrap();
        let s = env.maps.conntrack_stats().unwrap();
        eprintln!("{s:?}, evictions {}", s.evictions());
        assert_eq!(s.capacity, CAP);
        assert_eq!(s.created, u64::from(FLOWS) + 1, "one entry created per flow");
        assert_eq!((s.deleted_datapath, s.deleted_agent), (0, 0));
        assert_eq!(s.entries, present.len() as u64);
        assert!(s.entries <= u64::from(CAP), "{s:?}");
        assert_eq!(s.evictions(), u64::from(FLOWS) + 1 - present.len() as u64);
        assert!(s.evictions() >= u64::from(FLOWS) + 1 - u64::from(CAP), "{s:?}");
        // Recently used flows survive, the oldest are gone.
        let keys: std::collections::BTreeSet<_> = present.iter().map(|(k, _)| *k).collect();
        assert!(keys.contains(&ct_tuple(40000, "198.19.0.53:53")), "busy flow evicted");
        assert!(
            keys.contains(&ct_tuple(41000 + FLOWS - 1, "198.19.0.53:53")),
            "newest flow evicted"
        );
        assert!(!keys.contains(&ct_tuple(41000, "198.19.0.53:53")), "oldest flow kept");
        // Every packet was translated: 301 new flows, the busy one's repeats established.
        assert_counts(
            &env,
            &[
                (Reason::TranslatedNew, u64::from(FLOWS) + 1),
                (Reason::TranslatedEstablished, u64::from(FLOWS).div_ceil(8) - 1),
            ],
        );

        // The same numbers as the operator sees them: `kproxy stats`.
        let kproxy = kproxy_tests::lab::find_bin("kproxy").unwrap();
        let out = Command::new(&kproxy)
            .args(["stats", "-o", "json", "--pin-path"])
            .arg(&env.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["conntrack_evictions"], s.evictions());
        assert_eq!(j["conntrack_capacity"], CAP);
        assert_eq!(j["translated_new"], u64::from(FLOWS) + 1);
    });
}

#[test]
fn conntrack_gc_deletes_expired_entries_and_their_reverse_nat_only() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:53", backend_flags::LOCAL, proto::UDP);
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    // Flow A gets a reply (established, 120 s); flow B does not (30 s).
    udp_from_pod(&mut env, 42001, "198.19.0.53:53");
    udp_from_pod(&mut env, 42002, "198.19.0.53:53");
    let r = Frame::udp(sa("198.18.100.11:53"), sa("198.18.100.10:42001"), b"a");
    let (_, out) = env.tc(names::PROG_TC_TO_POD, &r.build());
    assert_frame(&out, &r.clone().with_src(sa("198.19.0.53:53")));
    assert_eq!(env.maps.conntrack().unwrap().len(), 2);
    assert_eq!(env.maps.revnat().unwrap().len(), 2);

    // Now: nothing is expired, nothing is deleted.
    let now = kproxy::dataplane::monotonic_ns();
    let g = env.maps.conntrack_gc(now).unwrap();
    assert_eq!((g.deleted, g.revnat_deleted, g.stats.entries), (0, 0, 2));

    // 60 s later: B (UDP without reply) has expired, A has not.
    let g = env.maps.conntrack_gc(now + 60_000_000_000).unwrap();
    assert_eq!((g.deleted, g.revnat_deleted, g.stats.entries), (1, 1, 1));
    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].0, ct_tuple(42001, "198.19.0.53:53"));
    let rn = env.maps.revnat().unwrap();
    assert_eq!(rn.len(), 1);
    assert_eq!(rn[0].1.client_port, 42001u16.to_be());
    let s = env.maps.conntrack_stats().unwrap();
    assert_eq!(g.stats, s);
    assert_eq!((s.created, s.deleted_agent, s.entries, s.evictions()), (2, 1, 1, 0));

    // 200 s later A has expired too; a reverse-NAT entry left without its connection (as an
    // LRU eviction leaves it) goes once it is older than any timeout of its protocol.
    env.maps.delete_conntrack(&ct_tuple(42001, "198.19.0.53:53")).unwrap();
    udp_from_pod(&mut env, 42003, "198.19.0.53:53");
    let g = env.maps.conntrack_gc(now + 200_000_000_000).unwrap();
    // Flow C (created now, 30 s) has expired 200 s from now; A's orphan reverse NAT is 200 s old.
    assert_eq!((g.deleted, g.revnat_deleted), (1, 2), "{g:?}");
    assert!(env.maps.conntrack().unwrap().is_empty());
    assert!(env.maps.revnat().unwrap().is_empty());
}

/// The conntrack reconciler: once backend 1 stops serving (the sync left it out of the slots,
/// it stays in `kp_be4`), the UDP flows tracked to it are deleted with their reverse NAT and the
/// next datagram goes to a serving backend; flows on serving backends and TCP stay.
#[test]
fn conntrack_reconciler_moves_udp_flows_off_a_backend_that_stops_serving() {
    let mut env = Env::new();
    env.backend(1, "198.18.100.11:53", backend_flags::LOCAL, proto::UDP);
    env.backend(2, "198.18.100.12:53", backend_flags::LOCAL, proto::UDP);
    env.backend(3, BE1, backend_flags::LOCAL, proto::TCP);
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[3], 2);
    let on = |out: &[u8]| dst_of(out).to_string();
    let mut flows: Vec<(u16, String)> = Vec::new();
    for sport in 42001..42017 {
        let out = udp_from_pod(&mut env, sport, "198.19.0.53:53");
        flows.push((sport, on(&out)));
    }
    let gone: Vec<u16> =
        flows.iter().filter(|(_, b)| b == "198.18.100.11:53").map(|(p, _)| *p).collect();
    assert!(!gone.is_empty() && gone.len() < flows.len(), "both backends used: {flows:?}");
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    env.tc(names::PROG_TC_FROM_POD, &syn.build());
    // Replies, so that every flow has its reverse-NAT entry.
    for (sport, b) in &flows {
        let r =
            Frame::udp(sa(b), SocketAddrV4::new("198.18.100.10".parse().unwrap(), *sport), b"a");
        env.tc(names::PROG_TC_TO_POD, &r.build());
    }
    assert_eq!(env.maps.revnat().unwrap().len(), flows.len() + 1);

    // Backend 1 stops serving: out of the slots, still a backend.
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[2], 1);
    let slot2 = Service4Key {
        addr: be_addr("198.19.0.53".parse().unwrap()),
        port: 53u16.to_be(),
        proto: proto::UDP,
        scope: scope::INTERNAL,
        slot: 2,
        _pad: 0,
    };
    env.maps.delete_service(&slot2).unwrap();
    let serving: kproxy::dataplane::conntrack::ServingSets =
        [(1, [(be_addr("198.18.100.12".parse().unwrap()), 53u16.to_be())].into())].into();
    let before = env.maps.ct_counters().unwrap();
    let deleted = env.maps.reconcile_udp_flows(&serving).unwrap();
    assert_eq!(deleted, gone.len() as u64);
    let ct = env.maps.conntrack().unwrap();
    assert_eq!(ct.len(), flows.len() - gone.len() + 1, "serving flows and TCP stay");
    assert!(
        ct.iter()
            .all(|(_, v)| v.backend_addr != be_addr("198.18.100.11".parse().unwrap())
                || v.svc_id == 2)
    );
    assert_eq!(env.maps.revnat().unwrap().len(), flows.len() - gone.len() + 1);
    assert_eq!(env.maps.ct_counters().unwrap()[2], before[2] + deleted, "counted as the agent's");
    // A moved flow's next datagram goes to the serving backend.
    let out = udp_from_pod(&mut env, gone[0], "198.19.0.53:53");
    assert_eq!(on(&out), "198.18.100.12:53");
    // Nothing left to move.
    assert_eq!(env.maps.reconcile_udp_flows(&serving).unwrap(), 0);
}

#[test]
fn tcp_segment_without_connection_entry_is_balanced_and_counted() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.backend(2, BE2, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1, 2], 1);
    let syn = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    let be = dst_of(&out);
    // The entry is lost (as an eviction loses it): the next segment goes to the same backend.
    for (k, _) in env.maps.conntrack().unwrap() {
        env.maps.delete_conntrack(&k).unwrap();
    }
    let data = Frame::tcp(sa(POD_CLIENT), sa(CIP), ACK | PSH).with_payload(b"x");
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &data.clone().with_dst(be));
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &data.build());
    assert_frame(&out, &data.clone().with_dst(be));
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 1),
            (Reason::CtMissMidFlow, 1),
            (Reason::TranslatedEstablished, 1),
        ],
    );
}

/// Measurement (run with `--ignored --nocapture`): the agent's conntrack GC over a table of
/// 100,000 entries, once with nothing to delete and once deleting everything.
#[test]
#[ignore = "measurement: prints the GC walk cost"]
fn conntrack_gc_cost_on_a_large_table() {
    const FLOWS: u32 = 100_000;
    let mut env = Env::with_sizes(&MapSizes {
        services: 64,
        backends: 64,
        conntrack: 131_072,
        affinity: 8,
        ipv6: true,
    });
    env.backend(1, "198.18.100.11:53", backend_flags::LOCAL, proto::UDP);
    env.service("198.19.0.53:53", proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let t0 = std::time::Instant::now();
    for i in 0..FLOWS {
        let src = SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 102, 10 + (i / 50_000) as u8),
            1024 + (i % 50_000) as u16,
        );
        let q = Frame::udp(src, sa("198.19.0.53:53"), b"q");
        let (v, _) = env.tc(names::PROG_TC_FROM_POD, &q.build());
        assert_eq!(v, TC_PASS);
    }
    let fill = t0.elapsed();
    let now = kproxy::dataplane::monotonic_ns();
    let t1 = std::time::Instant::now();
    let g = env.maps.conntrack_gc(now).unwrap();
    let keep = t1.elapsed();
    assert_eq!((g.deleted, g.stats.entries), (0, u64::from(FLOWS)));
    let t2 = std::time::Instant::now();
    let g = env.maps.conntrack_gc(now + 60_000_000_000).unwrap();
    let delete = t2.elapsed();
    assert_eq!((g.deleted, g.revnat_deleted, g.stats.entries), (FLOWS.into(), FLOWS.into(), 0));
    eprintln!(
        "{FLOWS} entries: filled in {fill:?}; GC walk with nothing expired {keep:?}; \
         GC deleting all (with their reverse NAT) {delete:?}"
    );
}

#[path = "datapath_testrun/ipv6.rs"]
mod ipv6;

// --- service guards: source ranges, closed service addresses, service CIDRs --------------------

const LB: &str = "198.18.200.10:80";

/// `loadBalancerSourceRanges`: a frontend flagged SOURCE_RANGES accepts new connections only from
/// the networks written for its service id, at XDP, TC (external) and from pods; a frontend of
/// another service id without the flag is not restricted.
#[test]
fn source_ranges_restrict_new_connections() {
    use kproxy::dataplane::SourceRange;
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    let flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
    env.service(LB, proto::TCP, scope::EXTERNAL, flags, &[1], 7);
    env.service(LB, proto::TCP, scope::INTERNAL, flags, &[1], 7);
    // 198.18.0.0/30 holds CLIENT (198.18.0.2); the pod network is not allowed.
    let range = SourceRange { svc_id: 7, addr: be_addr(Ipv4Addr::new(198, 18, 0, 0)), len: 30 };
    env.maps.put_source_ranges(&[range]).unwrap();
    // A range of another service id does not open this one.
    let other = SourceRange { svc_id: 8, addr: be_addr(Ipv4Addr::new(198, 18, 100, 0)), len: 24 };
    env.maps.put_source_ranges(&[other]).unwrap();

    let ok = Frame::tcp(sa(CLIENT), sa(LB), SYN);
    let (v, out) = env.xdp(&ok.build());
    assert_eq!(v, XDP_PASS);
    assert_frame(&out, &ok.clone().with_dst(sa(BE1)));
    let outside = Frame::tcp(sa("198.18.0.9:40000"), sa(LB), SYN).build();
    let (v, _) = env.xdp(&outside);
    assert_eq!(v, XDP_DROP, "outside the ranges at XDP");
    let (v, _) = env.tc(names::PROG_TC_EXT, &outside);
    assert_eq!(v, TC_ACT_SHOT, "outside the ranges at TC");
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &Frame::tcp(sa(POD_CLIENT), sa(LB), SYN).build());
    assert_eq!(v, TC_ACT_SHOT, "a pod outside the ranges");
    assert!(env.maps.conntrack().unwrap().len() == 1, "only the allowed connection is tracked");

    // A /32 inside a wider range, and the service without the flag.
    let host = SourceRange { svc_id: 7, addr: be_addr(Ipv4Addr::new(198, 18, 0, 9)), len: 32 };
    env.maps.put_source_ranges(&[host]).unwrap();
    let (v, _) = env.xdp(&outside);
    assert_eq!(v, XDP_PASS, "198.18.0.9/32 added");
    env.service(LB, proto::TCP, scope::INTERNAL, svc_flags::LOAD_BALANCER, &[1], 7);
    let (v, _) = env.tc(names::PROG_TC_FROM_POD, &Frame::tcp(sa(POD_CLIENT), sa(LB), SYN).build());
    assert_eq!(v, TC_PASS, "not restricted without the flag");
    assert_counts(&env, &[(Reason::TranslatedNew, 3), (Reason::DropSourceRange, 3)]);
}

/// A ClusterIP (or LoadBalancer IP) on a port no service defines is rejected, not passed to the
/// node's stack; an unallocated address of the service CIDR is dropped; node addresses, other
/// addresses, and a ClusterIP port reached from outside (a frontend of the other scope) pass as
/// before.
#[test]
fn closed_service_addresses_reject_unknown_ports_and_unallocated_ips_drop() {
    use kproxy_common::{Cidr4, ServiceCidrs4};
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service(LB, proto::TCP, scope::EXTERNAL, svc_flags::LOAD_BALANCER, &[1], 2);
    let np = format!("{NODE_IP}:30080");
    env.service(&np, proto::TCP, scope::EXTERNAL, svc_flags::NODE_PORT, &[1], 3);
    let cip = *sa(CIP).ip();
    env.maps.put_service_addrs(&[be_addr(cip), be_addr(*sa(LB).ip())]).unwrap();
    let mut nets = ServiceCidrs4 { count: 1, ..Default::default() };
    nets.nets[0] = Cidr4 {
        addr: be_addr(Ipv4Addr::new(198, 19, 0, 0)),
        mask: be_addr(Ipv4Addr::new(255, 255, 0, 0)),
    };
    env.maps.set_service_cidrs(&nets).unwrap();

    // TCP to an undefined port of the ClusterIP: RST from it, back into the pod.
    let syn = Frame::tcp(sa(POD_CLIENT), sa("198.19.0.10:81"), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn.build());
    assert_eq!(v, TC_ACT_REDIRECT);
    let mut rst =
        Frame::tcp(sa("198.19.0.10:81"), sa(POD_CLIENT), RST | ACK).with_macs(syn.smac, syn.dmac);
    rst.ttl = 64;
    rst.id = 0;
    rst.frag = 0x4000;
    if let L4::Tcp { seq, ack, window, .. } = &mut rst.l4 {
        *seq = 0;
        *ack = 1001;
        *window = 0;
    }
    assert_frame(&out, &rst);
    // UDP: ICMP port unreachable from the ClusterIP.
    let q = Frame::udp(sa(POD_CLIENT), sa("198.19.0.10:53"), b"query");
    let qb = q.build();
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &qb);
    assert_eq!(v, TC_ACT_REDIRECT);
    let mut icmp = Frame::udp(sa("198.19.0.10:53"), sa(POD_CLIENT), b"").with_macs(q.smac, q.dmac);
    icmp.id = 0;
    icmp.l4 = L4::Icmp { typ: 3, code: 3, rest: [0; 4], payload: qb[14..14 + 28].to_vec() };
    assert_frame(&out, &icmp);
    // The LoadBalancer IP from outside, another port: RST through XDP.
    let (v, _) = env.xdp(&Frame::tcp(sa(CLIENT), sa("198.18.200.10:443"), SYN).build());
    assert_eq!(v, XDP_TX);
    // An RST to an undefined port is dropped, not answered.
    let (v, _) = env.tc(
        names::PROG_TC_FROM_POD,
        &Frame::tcp(sa(POD_CLIENT), sa("198.19.0.10:81"), RST).build(),
    );
    assert_eq!(v, TC_ACT_SHOT);
    // An address of the service CIDR no service holds: dropped.
    let (v, _) = env.tc(
        names::PROG_TC_FROM_POD,
        &Frame::tcp(sa(POD_CLIENT), sa("198.19.0.99:80"), SYN).build(),
    );
    assert_eq!(v, TC_ACT_SHOT);
    let (v, _) = env.xdp(&Frame::tcp(sa(CLIENT), sa("198.19.200.1:80"), SYN).build());
    assert_eq!(v, XDP_DROP);
    assert_counts(&env, &[(Reason::RejectUnknownPort, 4), (Reason::DropUnallocatedServiceIp, 2)]);

    // Untouched: the node's own ports, addresses outside the CIDR, the ClusterIP's defined
    // port from outside (its frontend is internal only), a pod's own traffic entering it.
    let node_ssh = Frame::tcp(sa(CLIENT), sa(&format!("{NODE_IP}:22")), SYN).build();
    assert_eq!(env.xdp(&node_ssh), (XDP_PASS, node_ssh.clone()));
    let other = Frame::tcp(sa(POD_CLIENT), sa("198.18.5.5:80"), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_FROM_POD, &other), (TC_PASS, other.clone()));
    let cip_outside = Frame::tcp(sa(CLIENT), sa(CIP), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_EXT, &cip_outside), (TC_PASS, cip_outside.clone()));
    let to_pod = Frame::tcp(sa("198.19.0.10:81"), sa(POD_CLIENT), SYN).build();
    assert_eq!(env.tc(names::PROG_TC_TO_POD, &to_pod), (TC_PASS, to_pod.clone()));
    // The defined port still works.
    let (v, out) =
        env.tc(names::PROG_TC_FROM_POD, &Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN).build());
    assert_eq!(v, TC_PASS);
    assert_eq!(dst_of(&out), sa(BE1));
}

/// Two live connections from one client address and port through two frontends to one backend:
/// the second gets another source port, so that both replies are restored to their own
/// frontend where they enter the client pod (the reply tuple would otherwise be the same).
#[test]
fn one_client_port_through_two_frontends_to_one_backend() {
    let mut env = Env::new();
    env.backend(1, BE1, backend_flags::LOCAL, proto::TCP);
    let cip2 = "198.19.0.11:80";
    env.service(CIP, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    env.service(cip2, proto::TCP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 2);
    let syn1 = Frame::tcp(sa(POD_CLIENT), sa(CIP), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn1.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &syn1.clone().with_dst(sa(BE1)));
    // The second: same client port, another ClusterIP, the same backend.
    let syn2 = Frame::tcp(sa(POD_CLIENT), sa(cip2), SYN);
    let (v, out) = env.tc(names::PROG_TC_FROM_POD, &syn2.build());
    assert_eq!(v, TC_PASS);
    let L4::Tcp { sport: p2, .. } = frames::decode(&out).unwrap().l4 else { panic!() };
    assert!((61000..=65535).contains(&p2), "source port re-picked: {p2}");
    let client2 = SocketAddrV4::new(*sa(POD_CLIENT).ip(), p2);
    assert_frame(&out, &syn2.clone().with_src(client2).with_dst(sa(BE1)));
    // Later packets of the second keep the new port.
    let data2 = Frame::tcp(sa(POD_CLIENT), sa(cip2), ACK).with_payload(b"two");
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &data2.build());
    assert_frame(&out, &data2.clone().with_src(client2).with_dst(sa(BE1)));
    // Each reply leaves the backend's pod as it is (for the stack) and is restored to its own
    // frontend and the client's own port where it enters the client pod.
    let r1 = Frame::tcp(sa(BE1), sa(POD_CLIENT), SYN | ACK);
    let r2 = Frame::tcp(sa(BE1), client2, SYN | ACK);
    for r in [&r1, &r2] {
        assert_reply_passed_to_the_stack(&mut env, names::PROG_TC_FROM_POD, &r.build());
    }
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &r1.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &r1.clone().with_src(sa(CIP)));
    let (v, out) = env.tc(names::PROG_TC_TO_POD, &r2.build());
    assert_eq!(v, TC_PASS);
    assert_frame(&out, &r2.clone().with_src(sa(cip2)).with_dst(sa(POD_CLIENT)));
    // A new connection on the first tuple (SYN again after a reset) keeps its own port.
    let rst = Frame::tcp(sa(POD_CLIENT), sa(CIP), RST);
    env.tc(names::PROG_TC_FROM_POD, &rst.build());
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &syn1.build());
    assert_frame(&out, &syn1.clone().with_dst(sa(BE1)));
    assert_counts(
        &env,
        &[
            (Reason::TranslatedNew, 3),
            (Reason::TranslatedEstablished, 2),
            (Reason::ReplyTranslated, 2),
            (Reason::PassReplyToPod, 2),
        ],
    );
}

/// Fragment-tracking entries expire: a later fragment whose first fragment was seen longer ago
/// than the reassembly timeout is not translated with its ports (the IP id belongs to another
/// datagram by then); the agent's collection deletes such entries.
#[test]
fn fragment_entries_expire() {
    use aya::maps::{HashMap, Map, MapData};
    use kproxy_common::{Frag4Key, Frag4Value, frag};
    let mut env = Env::new();
    let svc = "198.19.0.53:53";
    let be = "198.18.100.11:5353";
    env.backend(1, be, backend_flags::LOCAL, proto::UDP);
    env.service(svc, proto::UDP, scope::INTERNAL, svc_flags::CLUSTER_IP, &[1], 1);
    let mut first = Frame::udp(sa(POD_CLIENT), sa(svc), b"first fragment..");
    first.frag = 0x2000;
    first.id = 0x0303;
    env.tc(names::PROG_TC_FROM_POD, &first.build());
    let pin = env.dir.join("v1").join(names::FRAG4);
    let mut map: HashMap<MapData, Frag4Key, Frag4Value> =
        Map::from_map_data(MapData::from_pin(&pin).unwrap()).unwrap().try_into().unwrap();
    let (key, v) = map.iter().next().unwrap().unwrap();
    let now = kproxy::dataplane::monotonic_ns();
    assert!(!frag::expired(v.seen, now), "stamped when the first fragment passed");
    // Seen 31 s ago. Stamps wrap (the difference is taken modulo 2^32), so this holds also
    // when the clock is younger than 31 s, as in a kernel the test matrix has just booted.
    let seen = frag::stamp(now).wrapping_sub((31_000_000_000u64 >> frag::SHIFT) as u32);
    let old = Frag4Value { seen: seen.max(1), ..v };
    map.insert(key, old, 0).unwrap();
    let rest = later_fragment(*sa(POD_CLIENT).ip(), *sa(svc).ip(), 0x0303, 17, b"the rest");
    let (v2, out) = env.tc(names::PROG_TC_FROM_POD, &rest);
    assert_eq!((v2, out), (TC_PASS, rest.clone()), "expired: untouched");
    // The collection deletes it.
    let report = env.maps.conntrack_gc(kproxy::dataplane::monotonic_ns()).unwrap();
    assert_eq!(report.fragments_deleted, 1);
    assert!(map.iter().next().is_none());
    // A fresh entry is used.
    map.insert(key, Frag4Value { seen: frag::stamp(kproxy::dataplane::monotonic_ns()), ..v }, 0)
        .unwrap();
    let (_, out) = env.tc(names::PROG_TC_FROM_POD, &rest);
    assert_eq!(out, later_fragment(*sa(POD_CLIENT).ip(), *sa(be).ip(), 0x0303, 17, b"the rest"));
}
