//! Per-packet cost of the datapath programs under BPF_PROG_TEST_RUN, as the number of services
//! grows, next to pass-through programs (`return XDP_PASS` / `return TC_ACT_OK`) measured the
//! same way in the same run.
//!
//! TEST_RUN with `repeat > 1` runs the program again on the *same* buffer, which the first run
//! already translated, so later repetitions would measure a different path. Each figure is
//! therefore the median of many runs with `repeat = 1` (the kernel's own per-run duration, which
//! includes the same timer overhead for every program).
//!
//! The same frames over IPv6 (an established ClusterIP flow, a remote backend's reply to it)
//! and a remote NodePort backend's reply translated in XDP, in both families, give the IPv6 /
//! IPv4 ratio of the per-packet cost. The XDP replies are routed through the FIB, so the
//! figures are taken in a private network namespace with the routes and neighbours they need.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::OwnedFd,
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya_obj::generated::bpf_prog_type;
use kproxy::{
    dataplane::{
        Dataplane, Dataplane6,
        loader::{Datapath, MapSizes},
    },
    model::v6::to_addr6,
};
use kproxy_common::{
    Backend4, Backend6, NodeConfig, NodeConfig6, Reason, Service4Key, Service4Value, Service6Key,
    Service6Value, backend_flags, cfg_flags, names, proto, scope, svc_flags,
};

use crate::{
    frames::{ACK, Frame, PSH, SYN},
    frames6::Frame6,
    lab::xdp::{self, Insn, XDP_PASS_PROGRAM},
};

/// Per-packet costs (ns, medians) at one number of services.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Services in the maps.
    pub services: usize,
    /// `kp_tc_from_pod`, established ClusterIP flow.
    pub tc_established_ns: f64,
    /// `kp_tc_from_pod`, new connection (SYN, a new source port each run).
    pub tc_new_ns: f64,
    /// `kp_tc_to_pod`, a remote backend's reply to an established ClusterIP flow (translated).
    pub to_pod_reply_ns: f64,
    /// `kp_tc_to_pod`, plain pod traffic from a backend's address and port (no connection of
    /// a service: the reverse-NAT lookup misses).
    pub to_pod_plain_ns: f64,
    /// `kp_xdp_ext`, established NodePort flow to a local backend.
    pub xdp_established_ns: f64,
    /// Raw `return TC_ACT_OK`.
    pub tc_pass_ns: f64,
    /// Raw `return XDP_PASS`.
    pub xdp_pass_ns: f64,
    /// `kp_xdp_ext`, a remote NodePort backend's reply to the node's source-NAT port, translated
    /// and routed back to the client.
    pub xdp_reply_ns: f64,
    /// `kp_tc_from_pod`, established IPv6 ClusterIP flow.
    pub tc_established6_ns: f64,
    /// `kp_tc_to_pod`, a remote backend's reply to an established IPv6 ClusterIP flow.
    pub to_pod_reply6_ns: f64,
    /// `kp_xdp_ext`, the IPv6 twin of [`Cost::xdp_reply_ns`].
    pub xdp_reply6_ns: f64,
    /// `kp_xdp_ext`, a remote backend's reply to a pod's established ClusterIP flow, found and
    /// passed to the node's stack untouched (the reply direction of the bench's remote ClusterIP
    /// flow; it is translated where it enters the pod, [`Cost::to_pod_reply_ns`]).
    pub xdp_cip_reply_ns: f64,
    /// `kp_xdp_ext`, the IPv6 twin of [`Cost::xdp_cip_reply_ns`].
    pub xdp_cip_reply6_ns: f64,
    /// `kp_tc_ext_xdp`, the TC program behind XDP on an external device's ingress, on a packet
    /// XDP handled: the reply of [`Cost::xdp_cip_reply_ns`] as XDP passed it, with the
    /// source-MAC mark (what XDP writes where it cannot write metadata, which TEST_RUN gives no
    /// TC program), taken off and passed on.
    pub tc_ext_xdp_ns: f64,
    /// `kp_tc_ext`, the TC program of an external device without XDP (`--no-xdp`, and
    /// `--xdp-mode auto` on veth), on the established NodePort flow of
    /// [`Cost::xdp_established_ns`].
    pub tc_ext_established_ns: f64,
}

/// The figures of [`Cost`], by their name in the results. Results files written before a figure
/// existed lack it (the report shows it as not measured).
pub const METRICS: [&str; 15] = [
    "tc_established_ns",
    "tc_new_ns",
    "to_pod_reply_ns",
    "to_pod_plain_ns",
    "xdp_established_ns",
    "tc_pass_ns",
    "xdp_pass_ns",
    "xdp_reply_ns",
    "tc_established6_ns",
    "to_pod_reply6_ns",
    "xdp_reply6_ns",
    "xdp_cip_reply_ns",
    "xdp_cip_reply6_ns",
    "tc_ext_xdp_ns",
    "tc_ext_established_ns",
];

impl Cost {
    /// The figures with their names ([`METRICS`]' order).
    pub fn figures(&self) -> [(&'static str, f64); 15] {
        let v = [
            self.tc_established_ns,
            self.tc_new_ns,
            self.to_pod_reply_ns,
            self.to_pod_plain_ns,
            self.xdp_established_ns,
            self.tc_pass_ns,
            self.xdp_pass_ns,
            self.xdp_reply_ns,
            self.tc_established6_ns,
            self.to_pod_reply6_ns,
            self.xdp_reply6_ns,
            self.xdp_cip_reply_ns,
            self.xdp_cip_reply6_ns,
            self.tc_ext_xdp_ns,
            self.tc_ext_established_ns,
        ];
        std::array::from_fn(|i| (METRICS[i], v[i]))
    }
}

/// Loads `return TC_ACT_OK` as a sched_cls program.
fn load_tc_pass() -> io::Result<OwnedFd> {
    let insns = [Insn::new(0xb7, 0, 0, 0, 0), Insn::new(0x95, 0, 0, 0, 0)];
    xdp::load(bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS, 0, "kpb_tc_pass", &insns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// Node address (IPv4) of the private namespace: the NodePort frontends and the source-NAT
/// address.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// Node address (IPv6), as [`NODE_IP`].
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);
/// The external client of the NodePort figures.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The external IPv6 client.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// A remote NodePort backend (behind node 1, 198.18.0.11).
const REMOTE_BE: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 10);
/// A remote IPv6 backend (behind node 1, 2001:2::11), also the IPv6 ClusterIP's.
const REMOTE_BE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0x101, 0, 0, 0, 0, 0x10);
/// The IPv6 ClusterIP.
const CIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x10);
/// The IPv6 client pod.
const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0x100, 0, 0, 0, 0, 0x10);

/// Measures the costs at each of `scales` services (ascending), `runs` runs per figure, in a
/// private network namespace (created on a thread of its own, gone with it): a veth pair with
/// the node addresses, routes to node 1's pods and permanent neighbours, what the XDP replies'
/// route lookups need.
pub fn measure(scales: &[usize], runs: usize) -> Result<Vec<Cost>> {
    measure_cold(scales, runs, 0)
}

/// [`measure`], writing through `evict_bytes` of memory before each run (0: nothing), so that
/// each run starts with the caches that size covers cold, as a connection's packets do on a
/// busy node (a few packets per connection, other work between them). With about the L2
/// cache's size (1 MiB here) the figures are of the order bpf_stats reads per run under the
/// latency benchmark's load (there `kp_tc_from_pod` 1.9 µs per run, SYN included; here about
/// 2 µs for an established packet, 4–5 µs for a SYN, against 0.6 and 2.2 warm); with more than
/// the L3 cache they read 5–6 times higher still (TLB and page-walk misses: in a VM each costs
/// two page walks). A profiling view, for figures of one run against each other (an IPv6 figure
/// against its IPv4 twin, a reply against plain traffic): the figures of one run agree with
/// each other, but the same figure reads up to twice as high in one run as in the next (what the
/// buffer's physical pages evict varies), so two builds compare only over many alternating
/// runs.
pub fn measure_cold(scales: &[usize], runs: usize, evict_bytes: usize) -> Result<Vec<Cost>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            EVICT.with(|b| *b.borrow_mut() = vec![1u8; evict_bytes]);
            // SAFETY: unshare on this (fresh) thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            private_routes()?;
            measure_here(scales, runs)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The private namespace's links, addresses, routes and neighbours (see [`measure`]).
fn private_routes() -> Result<()> {
    let sh = |cmd: &str| -> Result<()> {
        let st = Command::new("sh").args(["-c", cmd]).status().context("running sh")?;
        ensure!(st.success(), "{cmd}: {st}");
        Ok(())
    };
    sh("ip link set lo up")?;
    sh("ip link add kpb0 address 02:00:00:00:00:10 type veth peer name kpb1 \
        address 02:00:00:00:00:01")?;
    sh("ip link set kpb0 up && ip link set kpb1 up")?;
    sh(&format!("ip addr add {NODE_IP}/24 dev kpb0"))?;
    sh("ip route add 198.18.101.0/24 via 198.18.0.11 dev kpb0")?;
    sh("ip neigh add 198.18.0.11 lladdr 02:00:00:00:00:11 dev kpb0 nud permanent")?;
    sh(&format!("ip neigh add {CLIENT} lladdr 02:00:00:00:00:02 dev kpb0 nud permanent"))?;
    sh(&format!("ip -6 addr add {NODE6}/64 dev kpb0 nodad"))?;
    sh("ip -6 route add 2001:2:101::/64 via 2001:2::11 dev kpb0")?;
    sh("ip -6 neigh add 2001:2::11 lladdr 02:00:00:00:00:11 dev kpb0 nud permanent")?;
    sh(&format!("ip -6 neigh add {CLIENT6} lladdr 02:00:00:00:00:02 dev kpb0 nud permanent"))?;
    for (f, v) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv4/conf/lo/forwarding", "1"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
    ] {
        std::fs::write(f, v).with_context(|| format!("writing {f}"))?;
    }
    Ok(())
}

thread_local! {
    /// The buffer [`run`] writes through before each run, when [`measure_cold`] set one.
    static EVICT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes one byte of every 64-byte line of [`EVICT`]: the program's code, its map values and
/// the kernel's code it calls leave the caches that buffer's size covers.
fn evict() {
    EVICT.with(|b| {
        let mut b = b.borrow_mut();
        for i in (0..b.len()).step_by(64) {
            b[i] = b[i].wrapping_add(1);
        }
        std::hint::black_box(&*b);
    });
}

/// One TEST_RUN of program `prog` (`kp_xdp_ext` or a TC program) on `frame`: its return value,
/// the kernel's duration and the output frame.
fn run(dp: &mut Datapath, prog: &str, frame: &[u8]) -> Result<(u32, f64, Vec<u8>)> {
    let mut buf = vec![0u8; 2048];
    let opts =
        TestRunOptions { data_in: Some(frame), data_out: Some(&mut buf), ..Default::default() };
    let p = dp.program_mut(prog).with_context(|| format!("no {prog}"))?;
    evict();
    let r = if prog == names::PROG_XDP_EXT {
        let p: &mut Xdp = p.try_into()?;
        p.test_run(opts)?
    } else {
        let p: &mut SchedClassifier = p.try_into()?;
        p.test_run(opts)?
    };
    Ok((r.return_value, r.duration.as_nanos() as f64, buf))
}

/// `XDP_PASS`.
const XDP_PASS: u32 = 2;

/// The frame of an XDP program's output as the node's stack gets it: TEST_RUN returns the
/// metadata in front of it (since Linux 5.16), where `kp_xdp_ext` leaves its 4-byte mark on a
/// packet it passed after handling it (translated, or a pod's reply left for `kp_tc_to_pod`);
/// where XDP cannot write metadata the mark is the source MAC's group bit
/// ([`kproxy_common::MAC_MARK`]), which `kp_tc_ext_xdp` takes off.
fn frame(out: &[u8]) -> Vec<u8> {
    let mut f = out.strip_prefix(b"KPX1").unwrap_or(out).to_vec();
    if let Some(b) = f.get_mut(kproxy_common::MAC_MARK_OFF) {
        *b &= !kproxy_common::MAC_MARK;
    }
    f
}
/// `XDP_REDIRECT`.
const XDP_REDIRECT: u32 = 4;
/// `TC_ACT_UNSPEC` (-1) as TEST_RUN returns it: the next program on the hook decides.
const TC_NEXT: u32 = u32::MAX;

/// `runs` runs of `prog` on `frame`, each output checked by `ok` (`what` names the check); the
/// median duration.
fn median_of(
    dp: &mut Datapath,
    runs: usize,
    prog: &str,
    frame: &[u8],
    what: &str,
    ok: impl Fn(u32, &[u8]) -> bool,
) -> Result<f64> {
    Ok(interleaved(dp, runs, &[Case { prog, frame, what, ok: &ok }])?[0])
}

/// A figure [`interleaved`] measures: `runs` of `prog` on `frame`, each output checked by `ok`
/// (`what` names the check).
struct Case<'a> {
    prog: &'a str,
    frame: &'a [u8],
    what: &'a str,
    ok: &'a dyn Fn(u32, &[u8]) -> bool,
}

/// The median durations of `cases`, measured in `runs` rounds that each run every case once, in
/// turn. Figures compared with each other (an IPv6 path and its IPv4 twin, which run the same
/// program) are measured this way, so that a change of the machine's speed during the
/// measurement (this VM's pass-through program has read 61 to 90 ns within one run) weighs on
/// both alike instead of on whichever block of runs it fell in.
fn interleaved(dp: &mut Datapath, runs: usize, cases: &[Case]) -> Result<Vec<f64>> {
    let mut ns = vec![Vec::with_capacity(runs); cases.len()];
    for _ in 0..runs {
        for (c, v) in cases.iter().zip(&mut ns) {
            let (r, t, out) = run(dp, c.prog, c.frame)?;
            ensure!((c.ok)(r, &out), "{}: {} (verdict {r})", c.prog, c.what);
            v.push(t);
        }
    }
    Ok(ns.into_iter().map(median).collect())
}

/// The counts that tell an established packet's fast path from the slow path's translation of
/// the same packet (`CtMissMidFlow`), read before a figure's runs.
struct FastPath {
    established: u64,
    mid_flow: u64,
}

impl FastPath {
    fn counts(maps: &kproxy::dataplane::bpf::BpfDataplane) -> Result<(u64, u64)> {
        let c = maps.counters()?;
        let of = |r: Reason| c.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
        Ok((of(Reason::TranslatedEstablished), of(Reason::CtMissMidFlow)))
    }

    fn new(maps: &kproxy::dataplane::bpf::BpfDataplane) -> Result<Self> {
        let (established, mid_flow) = Self::counts(maps)?;
        Ok(Self { established, mid_flow })
    }

    /// Whether each of the `runs` since [`FastPath::new`] was an established translation.
    fn took_every(
        &self,
        maps: &kproxy::dataplane::bpf::BpfDataplane,
        runs: usize,
        prog: &str,
    ) -> Result<()> {
        let (established, mid_flow) = Self::counts(maps)?;
        ensure!(
            established - self.established == runs as u64 && mid_flow == self.mid_flow,
            "{prog}: {} of {runs} runs translated as established, {} by the slow path",
            established - self.established,
            mid_flow - self.mid_flow
        );
        Ok(())
    }
}

/// Writes a one-backend service the way the agent does: the slot first, the service entry last.
fn service4(
    maps: &mut impl Dataplane,
    key: Service4Key,
    backend: u32,
    svc_id: u32,
    flags: u16,
) -> Result<()> {
    maps.put_service(
        &Service4Key { slot: 1, ..key },
        &Service4Value { backend_id: backend, svc_id, ..Default::default() },
    )?;
    let v = Service4Value { backend_id: 0, svc_id, count: 1, flags, affinity_timeout: 0 };
    maps.put_service(&key, &v)?;
    Ok(())
}

/// [`service4`] for IPv6.
fn service6(
    maps: &mut impl Dataplane6,
    fe: SocketAddrV6,
    sc: u8,
    backend: u32,
    svc_id: u32,
    flags: u16,
) -> Result<()> {
    let key = Service6Key {
        addr: to_addr6(*fe.ip()),
        port: fe.port().to_be(),
        proto: proto::TCP,
        scope: sc,
        slot: 0,
        _pad: 0,
    };
    maps.put_service6(
        &Service6Key { slot: 1, ..key },
        &Service6Value { backend_id: backend, svc_id, ..Default::default() },
    )?;
    let v = Service6Value { backend_id: 0, svc_id, count: 1, flags, affinity_timeout: 0 };
    maps.put_service6(&key, &v)?;
    Ok(())
}

/// The pin directory the measurements of this process load the datapath into (removed when they
/// end; a caller that can be stopped by a signal removes it too, see `kproxy-testrun-cost`).
pub fn pin_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/kproxy-bench-{}-testrun", std::process::id()))
}

/// [`measure`] in the current network namespace, set up by [`private_routes`].
fn measure_here(scales: &[usize], runs: usize) -> Result<Vec<Cost>> {
    let pin = pin_dir();
    let _guard = PinDir(pin.clone());
    let max = scales.iter().copied().max().unwrap_or(1) as u32;
    // Every SYN run leaves its connection entries: the tables hold them all, so that no figure
    // runs against evictions (and a run count the kernel cannot allocate tables for is refused
    // here, not with ENOMEM from the map's creation).
    const MAX_CT: usize = 1 << 23;
    let ct =
        runs.checked_mul((scales.len() + 1) * 2).filter(|&n| n <= MAX_CT).with_context(|| {
            format!("{runs} runs need connection tables of more than {MAX_CT} entries: fewer runs")
        })?;
    let sizes = MapSizes {
        services: 2 * max + 64,
        backends: max + 64,
        conntrack: (ct as u32 + 1024).next_power_of_two(),
        affinity: 1024,
        ipv6: true,
    };
    let mut dp = Datapath::load(&pin, &sizes).context("loading the datapath for TEST_RUN")?;
    let mut maps = dp.dataplane()?;
    maps.set_config(&NodeConfig {
        snat_addr: be(NODE_IP),
        snat_port_min: 61000,
        snat_port_max: 65535,
        flags: cfg_flags::READY,
        backend_gen: 0,
    })?;
    maps.set_config6(&NodeConfig6 { snat_addr: to_addr6(NODE6) })?;
    // NodePort service (XDP figure): node IP:30001 → local backend 198.18.100.11:8080.
    let np_backend = max + 10;
    maps.put_backend(
        np_backend,
        &Backend4 {
            addr: be(Ipv4Addr::new(198, 18, 100, 11)),
            port: 8080u16.to_be(),
            proto: proto::TCP,
            flags: backend_flags::LOCAL,
        },
    )?;
    let np_key = Service4Key {
        addr: be(NODE_IP),
        port: 30001u16.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    service4(&mut maps, np_key, np_backend, np_backend, svc_flags::NODE_PORT)?;
    // NodePort node IP:30002 → remote backend (XDP reply figures), in both families; the IPv6
    // ClusterIP [2001:2:ff::10]:80 has the same remote backend.
    let remote = max + 11;
    maps.put_backend(
        remote,
        &Backend4 { addr: be(REMOTE_BE), port: 8080u16.to_be(), proto: proto::TCP, flags: 0 },
    )?;
    let np_remote = SocketAddrV4::new(NODE_IP, 30002);
    let key = Service4Key { port: np_remote.port().to_be(), ..np_key };
    service4(&mut maps, key, remote, remote, svc_flags::NODE_PORT)?;
    maps.put_backend6(
        1,
        &Backend6 {
            addr: to_addr6(REMOTE_BE6),
            port: 8080u16.to_be(),
            proto: proto::TCP,
            flags: 0,
        },
    )?;
    let np6 = SocketAddrV6::new(NODE6, 30002, 0, 0);
    let cip6 = SocketAddrV6::new(CIP6, 80, 0, 0);
    let backend6 = SocketAddrV6::new(REMOTE_BE6, 8080, 0, 0);
    service6(&mut maps, np6, scope::EXTERNAL, 1, 1, svc_flags::NODE_PORT)?;
    service6(&mut maps, cip6, scope::INTERNAL, 1, 2, svc_flags::CLUSTER_IP)?;

    let xdp_pass = xdp::load_xdp("kpb_xdp_pass", &XDP_PASS_PROGRAM)?;
    let tc_pass = load_tc_pass()?;
    let pod = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 41000);
    let np = SocketAddrV4::new(NODE_IP, 30001);
    let mut have = 0usize;
    let mut out = Vec::new();
    let mut sport_base = 1024u16;
    for &n in scales {
        // Fill services have+1 ..= n: ClusterIP 198.19.0.0+i:80 → 198.18.128.0+i:8080.
        for i in (have + 1)..=n {
            let id = i as u32;
            maps.put_backend(
                id,
                &Backend4 {
                    addr: be(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + id)),
                    port: 8080u16.to_be(),
                    proto: proto::TCP,
                    flags: 0,
                },
            )?;
            let key = Service4Key {
                addr: be(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + id)),
                port: 80u16.to_be(),
                proto: proto::TCP,
                scope: scope::INTERNAL,
                slot: 0,
                _pad: 0,
            };
            service4(&mut maps, key, id, id, svc_flags::CLUSTER_IP)?;
        }
        have = n;
        // The probed service is the last one written.
        let cip = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + n as u32),
            80,
        );
        let sport = sport_base;
        sport_base = sport_base.wrapping_add(1).max(1024);
        let syn = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport), cip, SYN).build();
        let est = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport), cip, ACK | PSH).build();
        let np_syn = Frame::tcp(SocketAddrV4::new(CLIENT, sport), np, SYN).build();
        let np_est = Frame::tcp(SocketAddrV4::new(CLIENT, sport), np, ACK | PSH).build();

        // The connection (its established figure is measured below, beside IPv6's) and the
        // backend's reply to it, as it reaches the client pod untranslated (a remote backend
        // whose node did not translate it); both checked to come out translated.
        run(&mut dp, names::PROG_TC_FROM_POD, &syn)?;
        let backend = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n as u32),
            8080,
        );
        let reply = Frame::tcp(backend, SocketAddrV4::new(*pod.ip(), sport), ACK | PSH).build();
        // Plain traffic from the same backend port to another pod: hinted as a possible reply,
        // no reverse-NAT entry; it must pass untranslated.
        let plain =
            Frame::tcp(backend, SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 20), 50000), ACK)
                .build();
        let to_pod_plain_ns = median_of(
            &mut dp,
            runs,
            names::PROG_TC_TO_POD,
            &plain,
            "plain pod traffic rewritten",
            |_, out| out.get(26..30) == Some(&backend.ip().octets()[..]),
        )?;
        run(&mut dp, names::PROG_XDP_EXT, &np_syn)?;
        let xdp = names::PROG_XDP_EXT;
        // Both established NodePort figures must be the fast path's: a miss would go to the
        // slow path, which translates the same packet (`CtMissMidFlow`) at another cost.
        let local = [198u8, 18, 100, 11];
        let fast = FastPath::new(&maps)?;
        let xdp_ns = median_of(&mut dp, runs, xdp, &np_est, "", |_, o| {
            frame(o).get(30..34) == Some(&local[..])
        })?;
        fast.took_every(&maps, runs, "kp_xdp_ext")?;
        // The same flow where TC serves the device alone.
        let fast = FastPath::new(&maps)?;
        let tc_ext_established_ns = median_of(
            &mut dp,
            runs,
            names::PROG_TC_EXT,
            &np_est,
            "the NodePort packet not translated to its local backend",
            |v, o| v == TC_NEXT && o.get(30..34) == Some(&local[..]),
        )?;
        fast.took_every(&maps, runs, "kp_tc_ext")?;

        // A remote NodePort backend's reply: the connection opened (source NAT to the node),
        // then the reply to the node's port, translated and routed back to the client.
        let (v, _, o) = run(
            &mut dp,
            xdp,
            &Frame::tcp(SocketAddrV4::new(CLIENT, sport), np_remote, SYN).build(),
        )?;
        if v != XDP_REDIRECT
            || o.get(26..34) != Some(&[NODE_IP.octets(), REMOTE_BE.octets()].concat()[..])
        {
            bail!("kp_xdp_ext did not send the NodePort SYN to the remote backend (verdict {v})");
        }
        let node = SocketAddrV4::new(NODE_IP, u16::from_be_bytes([o[34], o[35]]));
        let reply4 = Frame::tcp(SocketAddrV4::new(REMOTE_BE, 8080), node, ACK | PSH).build();

        // IPv6: an established ClusterIP flow to a remote backend and the backend's reply.
        let pod6 = SocketAddrV6::new(POD6, sport, 0, 0);
        let (_, _, o) =
            run(&mut dp, names::PROG_TC_FROM_POD, &Frame6::tcp(pod6, cip6, SYN).build())?;
        ensure!(o.get(38..54) == Some(&REMOTE_BE6.octets()[..]), "IPv6 SYN not translated");
        let est6 = Frame6::tcp(pod6, cip6, ACK | PSH).build();
        let reply6 = Frame6::tcp(backend6, pod6, ACK | PSH).build();
        // The IPv6 twin of the XDP reply.
        let client6 = SocketAddrV6::new(CLIENT6, sport, 0, 0);
        let (v, _, o) = run(&mut dp, xdp, &Frame6::tcp(client6, np6, SYN).build())?;
        if v != XDP_REDIRECT || o.get(38..54) != Some(&REMOTE_BE6.octets()[..]) {
            bail!(
                "kp_xdp_ext did not send the IPv6 NodePort SYN to the remote backend (verdict {v})"
            );
        }
        let node6 = SocketAddrV6::new(NODE6, u16::from_be_bytes([o[54], o[55]]), 0, 0);
        let np_reply6 = Frame6::tcp(backend6, node6, ACK | PSH).build();

        // Each figure beside its twin in the other family, interleaved (see [`interleaved`]).
        let from_pod = names::PROG_TC_FROM_POD;
        let to_pod = names::PROG_TC_TO_POD;
        let be4 = backend.ip().octets();
        let (cip4, be6, cip6a) = (cip.ip().octets(), REMOTE_BE6.octets(), CIP6.octets());
        let (client4, client6a) = (CLIENT.octets(), CLIENT6.octets());
        let pairs: [[Case; 2]; 4] = [
            [
                Case {
                    prog: from_pod,
                    frame: &est,
                    what: "not translated",
                    ok: &|_, o| o.get(30..34) == Some(&be4[..]),
                },
                Case {
                    prog: from_pod,
                    frame: &est6,
                    what: "IPv6 not translated",
                    ok: &|_, o| o.get(38..54) == Some(&be6[..]),
                },
            ],
            [
                Case {
                    prog: to_pod,
                    frame: &reply,
                    what: "the backend's reply not translated",
                    ok: &|_, o| o.get(26..30) == Some(&cip4[..]),
                },
                Case {
                    prog: to_pod,
                    frame: &reply6,
                    what: "the backend's IPv6 reply not translated",
                    ok: &|_, o| o.get(22..38) == Some(&cip6a[..]),
                },
            ],
            // The same replies as they reach the client's node from the remote backend's node:
            // XDP finds their connection and passes them to the stack untouched (translated
            // where they enter the pod, above).
            [
                Case {
                    prog: xdp,
                    frame: &reply,
                    what: "the backend's reply not passed untouched by XDP",
                    ok: &|v, o| v == XDP_PASS && frame(o).starts_with(&reply),
                },
                Case {
                    prog: xdp,
                    frame: &reply6,
                    what: "the backend's IPv6 reply not passed untouched by XDP",
                    ok: &|v, o| v == XDP_PASS && frame(o).starts_with(&reply6),
                },
            ],
            [
                Case {
                    prog: xdp,
                    frame: &reply4,
                    what: "the backend's reply not translated",
                    ok: &|v, o| v == XDP_REDIRECT && o.get(30..34) == Some(&client4[..]),
                },
                Case {
                    prog: xdp,
                    frame: &np_reply6,
                    what: "the backend's IPv6 reply not translated",
                    ok: &|v, o| v == XDP_REDIRECT && o.get(38..54) == Some(&client6a[..]),
                },
            ],
        ];
        let mut pair = |cases: &[Case; 2]| -> Result<(f64, f64)> {
            let m = interleaved(&mut dp, runs, cases)?;
            Ok((m[0], m[1]))
        };
        let (tc_established_ns, tc_established6_ns) = pair(&pairs[0])?;
        let (to_pod_reply_ns, to_pod_reply6_ns) = pair(&pairs[1])?;
        let (xdp_cip_reply_ns, xdp_cip_reply6_ns) = pair(&pairs[2])?;
        let (xdp_reply_ns, xdp_reply6_ns) = pair(&pairs[3])?;
        // The same reply behind XDP: marked as handled, taken off and passed on by TC.
        let mut marked = reply.clone();
        marked[kproxy_common::MAC_MARK_OFF] |= kproxy_common::MAC_MARK;
        let tc_ext_xdp_ns = median_of(
            &mut dp,
            runs,
            names::PROG_TC_EXT_XDP,
            &marked,
            "XDP's mark not taken off, or the packet not passed on untouched",
            |v, o| v == TC_NEXT && o.starts_with(&reply),
        )?;
        // New connections, after the established figures (as before they were measured beside
        // each other): tens of thousands of entries more in the connection table.
        let mut new_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            sport_base = sport_base.wrapping_add(1).max(1024);
            let f = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport_base), cip, SYN).build();
            new_ns.push(run(&mut dp, names::PROG_TC_FROM_POD, &f)?.1);
        }

        let mut tcp_ns = Vec::with_capacity(runs);
        let mut xpp_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            tcp_ns.push(f64::from(xdp::test_run(&tc_pass, &est)?.duration_ns));
            xpp_ns.push(f64::from(xdp::test_run(&xdp_pass, &np_est)?.duration_ns));
        }
        out.push(Cost {
            services: n,
            tc_established_ns,
            tc_new_ns: median(new_ns),
            to_pod_reply_ns,
            to_pod_plain_ns,
            xdp_established_ns: xdp_ns,
            tc_pass_ns: median(tcp_ns),
            xdp_pass_ns: median(xpp_ns),
            xdp_reply_ns,
            tc_established6_ns,
            to_pod_reply6_ns,
            xdp_reply6_ns,
            xdp_cip_reply_ns,
            xdp_cip_reply6_ns,
            tc_ext_xdp_ns,
            tc_ext_established_ns,
        });
    }
    drop(dp);
    Ok(out)
}
