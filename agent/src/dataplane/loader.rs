//! Loading the embedded eBPF object, pinning its maps, attaching its programs to devices.
//!
//! Layout under the pin path (`--pin-path`, on bpffs):
//! - `v1/<map>`: every map of the ABI, reused by the next agent (checked against the ABI first);
//! - `v1/links/xdp-<ifname>`: the XDP `bpf_link` of each external device;
//! - `v1/links/tcx-<ingress|egress>-<ifname>`: the tcx `bpf_link`s of each device's TC programs
//!   (Linux 6.6+);
//! - `v1/links/cgroup-<type>`: the socket-LB `bpf_link`s on the cgroup given as
//!   `--cgroup-path` (connect4, sendmsg4, recvmsg4, getpeername4).
//!
//! Attachments outlive the agent, as kube-proxy's rules outlive kube-proxy:
//! - XDP uses a pinned `bpf_link` (Linux 5.9+); a restarted agent swaps the program inside the
//!   link with `BPF_LINK_UPDATE`, atomically.
//! - TC uses a pinned tcx `bpf_link` per hook where the kernel has tcx (Linux 6.6+):
//!   `v1/links/tcx-<ingress|egress>-<ifname>`, appended after the tcx programs already on the
//!   hook (a CNI's run first, as they ran before kproxy's clsact filters; [`TcxAnchor::Head`]
//!   puts them in front and moves them back there) and swapped in place with `BPF_LINK_UPDATE`
//!   by a restarted agent. tcx runs a device's programs straight from its
//!   hook, without the qdisc layer clsact filters go through (1-2 µs less per connection in the
//!   bench). Older kernels, and `--tc-attach netlink`, get classic `cls_bpf` filters on the
//!   `clsact` qdisc, always at priority [`TC_PRIORITY`] and handle [`TC_HANDLE`]; a restarted
//!   agent replaces the filter at that priority/handle in place (one `RTM_NEWTFILTER` without
//!   `NLM_F_EXCL`), so there is neither a gap nor a duplicate. Moving from one to the other
//!   attaches the new kind first, then removes the old one. A kproxy program ends the hook only
//!   with a packet it redirected or dropped, so while both are attached the second one sees
//!   every packet the first passed: one left as it came it decides on alike from the same maps,
//!   one translated is addressed to its backend by then (or comes from the frontend), which it
//!   passes as it came: no packet is translated twice.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{
        CgroupSockAddr, LinkOrder, Program, ProgramFd, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{CgroupAttachMode, FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::XdpLink,
    },
};
use kproxy_common::names;
use tracing::{debug, info, warn};

use super::{
    bpf::{BpfDataplane, MAP_SPECS, MapSpec, check_pinned, maps_dir, pinned_map_specs},
    bpf6::MAP_SPECS6,
    sys::{self, bpf_cmd},
};

/// Priority of kproxy's TC filters (lower runs first).
pub const TC_PRIORITY: u16 = 1;
/// Handle of kproxy's TC filters ("KP").
pub const TC_HANDLE: u32 = 0x4b50;

/// How the TC programs are attached to a device's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcAttach {
    /// tcx `bpf_link`s (Linux 6.6+), pinned under `v1/links/`.
    Tcx,
    /// `cls_bpf` filters of the `clsact` qdisc (netlink).
    Netlink,
}

impl TcAttach {
    /// tcx where the running kernel has it ([`super::features::tcx`]), netlink otherwise.
    pub fn auto() -> Self {
        Self::given(super::features::tcx())
    }

    /// tcx when the kernel has tcx hooks (`tcx`, as probed), netlink otherwise.
    pub fn given(tcx: bool) -> Self {
        if tcx { Self::Tcx } else { Self::Netlink }
    }
}

/// Where kproxy's tcx links go among the other tcx programs of a hook (`--tcx-anchor`). clsact
/// filters are not concerned: kproxy's has priority 1, in front of the other filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcxAnchor {
    /// After the tcx programs already on the hook (a CNI's run first, as they ran before
    /// kproxy's clsact filters); other owners' links attached later come after kproxy's. A link
    /// is never moved.
    #[default]
    Tail,
    /// In front of every tcx program of the hook, so that kproxy sees each packet first
    /// whatever the others return: a link found behind another owner's program is moved back to
    /// the front at each attach (the new link first, then the old one goes).
    Head,
}

/// Map capacities chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Service entries plus backend slots.
    pub services: u32,
    /// Backends.
    pub backends: u32,
    /// Connection-tracking (and reverse-NAT) entries.
    pub conntrack: u32,
    /// Session-affinity entries.
    pub affinity: u32,
    /// Whether the IPv6 maps get the capacities of their IPv4 twins; without IPv6 they are
    /// created with one entry each (the IPv6 programs still load and pass every IPv6 packet).
    pub ipv6: bool,
}

impl Default for MapSizes {
    fn default() -> Self {
        use kproxy_common::defaults::*;
        Self {
            services: SERVICES4_MAX,
            backends: BACKENDS4_MAX,
            conntrack: CT4_MAX,
            affinity: AFFINITY4_MAX,
            ipv6: true,
        }
    }
}

/// Capacity of the IPv6 maps that hold services or flows while IPv6 is off (the kernel's
/// minimum).
pub const IPV6_OFF_ENTRIES: u32 = 1;

/// The IPv6 maps that hold services or flows: one entry each while IPv6 is off.
const IPV6_SIZED: [&str; 8] = [
    names::SERVICES6,
    names::BACKENDS6,
    names::CT6,
    names::REVNAT6,
    names::AFFINITY6,
    names::FRAG6,
    names::SOCK6,
    names::SVC_ADDRS6,
];

impl MapSizes {
    fn of(&self, map: &str) -> Option<u32> {
        if !self.ipv6 && IPV6_SIZED.contains(&map) {
            return Some(IPV6_OFF_ENTRIES);
        }
        match map {
            names::SERVICES4 => Some(self.services),
            names::BACKENDS4 => Some(self.backends),
            names::CT4 | names::REVNAT4 => Some(self.conntrack),
            names::AFFINITY4 => Some(self.affinity),
            names::SOCK4 => Some(sock_entries(self.conntrack)),
            // IPv6 maps get the capacities of their IPv4 twins.
            names::SERVICES6 => Some(self.services),
            names::BACKENDS6 => Some(self.backends),
            names::CT6 | names::REVNAT6 => Some(self.conntrack),
            names::AFFINITY6 => Some(self.affinity),
            names::SOCK6 => Some(sock_entries(self.conntrack)),
            _ => None,
        }
    }
}

/// The socket-LB reverse map follows the connection-tracking capacity: a quarter of it (its
/// default, 131,072 for the default 524,288), at least 4,096.
fn sock_entries(conntrack: u32) -> u32 {
    (conntrack / 4).max(4096)
}

/// Bytes a preallocated hash map of `spec` with `entries` entries takes in the kernel: per
/// entry its key and value (each rounded up to 8 bytes) and the 48-byte element header, plus a
/// 16-byte bucket per power-of-two slot (what Linux 6.x reports as the map's memory, within a
/// few percent).
pub fn hash_map_bytes(spec: &MapSpec, entries: u32) -> u64 {
    let round8 = |n: u32| u64::from(n.div_ceil(8) * 8);
    let elem = round8(spec.key_size) + round8(spec.value_size) + 48;
    u64::from(entries) * elem + u64::from(entries.max(1).next_power_of_two()) * 16
}

/// How the per-node state maps (connection tracking with its reverse NAT and socket-LB maps,
/// session affinity) are sized, as Cilium's `--bpf-map-dynamic-size-ratio` does: a share
/// `ratio` of the node's memory, split between them in proportion to their default sizes, each
/// within a floor and a ceiling. An explicit capacity wins over the ratio. The services and
/// backends maps hold the cluster's services, not the node's flows: they keep their defaults
/// unless given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapSizing {
    /// Share of the node's memory for the per-node state maps (0: fixed defaults).
    pub ratio: f64,
    /// `--max-services`.
    pub services: Option<u32>,
    /// `--max-backends`.
    pub backends: Option<u32>,
    /// `--max-conntrack`.
    pub conntrack: Option<u32>,
    /// `--max-affinity`.
    pub affinity: Option<u32>,
    /// `--enable-ipv6`: the IPv6 maps get the capacities of their IPv4 twins (else one entry).
    pub ipv6: bool,
}

/// Default share of the node's memory for the per-node state maps (Cilium's default ratio).
pub const DEFAULT_MAP_RATIO: f64 = 0.0025;
/// Fewest connection-tracking entries the ratio may give (Cilium's floor for its TCP table).
pub const CONNTRACK_MIN: u32 = 131_072;
/// Most connection-tracking entries the ratio may give.
pub const CONNTRACK_MAX: u32 = 1 << 24;
/// Fewest session-affinity entries the ratio may give.
pub const AFFINITY_MIN: u32 = 16_384;
/// Most session-affinity entries the ratio may give.
pub const AFFINITY_MAX: u32 = 1 << 21;

impl MapSizing {
    /// The capacities for a node with `memory` bytes of RAM.
    pub fn resolve(&self, memory: u64) -> MapSizes {
        let d = MapSizes::default();
        let [_, _, ct, rnat, aff, _, _, _, _, sock, _, _, _, _] = &MAP_SPECS;
        // Bytes per connection-tracking entry: its entry, its reverse-NAT entry and a quarter
        // of a socket-LB entry.
        let per_ct = (hash_map_bytes(ct, 1 << 20) + hash_map_bytes(rnat, 1 << 20)) as f64
            / f64::from(1 << 20)
            + hash_map_bytes(sock, 1 << 18) as f64 / f64::from(1 << 20);
        let per_aff = hash_map_bytes(aff, 1 << 20) as f64 / f64::from(1 << 20);
        let scaled = |default: u32, min: u32, max: u32| -> u32 {
            if self.ratio <= 0.0 {
                return default;
            }
            let budget = self.ratio * memory as f64;
            let default_bytes = f64::from(d.conntrack) * per_ct + f64::from(d.affinity) * per_aff;
            let n = f64::from(default) * budget / default_bytes;
            (n as u64).clamp(u64::from(min), u64::from(max)) as u32
        };
        MapSizes {
            services: self.services.unwrap_or(d.services),
            backends: self.backends.unwrap_or(d.backends),
            conntrack: self
                .conntrack
                .unwrap_or_else(|| scaled(d.conntrack, CONNTRACK_MIN, CONNTRACK_MAX)),
            affinity: self
                .affinity
                .unwrap_or_else(|| scaled(d.affinity, AFFINITY_MIN, AFFINITY_MAX)),
            ipv6: self.ipv6,
        }
    }
}

/// The node's memory (`MemTotal` of /proc/meminfo), bytes.
pub fn node_memory() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("no MemTotal in /proc/meminfo"))
}

/// What the maps of `sizes` take in the kernel, bytes (the estimate of [`hash_map_bytes`]).
pub fn estimated_bytes(sizes: &MapSizes) -> u64 {
    MAP_SPECS
        .iter()
        .chain(&MAP_SPECS6)
        .filter_map(|s| match s.name {
            names::FRAG4 => Some(hash_map_bytes(s, kproxy_common::defaults::FRAG4_MAX)),
            names::FRAG6 if sizes.ipv6 => {
                Some(hash_map_bytes(s, kproxy_common::defaults::FRAG6_MAX))
            }
            n => sizes.of(n).map(|e| hash_map_bytes(s, e)),
        })
        .sum()
}

/// How the external (NodePort) devices are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalMode {
    /// XDP fast path plus the TC ingress program for what XDP cannot do.
    #[default]
    Xdp,
    /// TC ingress only.
    TcOnly,
}

/// Refuses a pinned map whose key or value layout this build cannot read (`built`; see
/// [`super::btf::compatible`]) though its sizes match (which [`check_pinned`] checked): its
/// entries would be read in the wrong layout. A map without BTF passes, and one whose BTF the
/// kernel does not show passes with a warning.
fn check_pinned_layout(
    btfs: &mut super::btf::KernelBtfs,
    pin: &Path,
    data: &aya::maps::MapData,
    built: Option<&super::btf::MapLayout>,
) -> anyhow::Result<()> {
    let Some(built) = built else { return Ok(()) };
    let pinned = match btfs.map_layout(data.fd().as_fd()) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(()),
        Err(e) => {
            warn!(pin = %pin.display(), error = %format!("{e:#}"), "cannot read the pinned map's BTF: its layout is not checked");
            return Ok(());
        }
    };
    if let Some(diff) = super::btf::layout_difference(&pinned, built) {
        bail!(
            "pinned map {} does not match ABI v{}: {diff} (a build with another \
             layout left it; remove it with `kproxy cleanup` or use another --pin-path)",
            pin.display(),
            kproxy_common::ABI_VERSION
        );
    }
    Ok(())
}

/// The directories of datapaths of other ABI versions under `pin_path` (`v<k>`, `k` not this
/// build's version: an older one after an upgrade, a newer one after a rollback), newest first.
fn other_versions(pin_path: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_path) else { return Vec::new() };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.strip_prefix('v')?.parse::<u32>().ok()?;
            (v != kproxy_common::ABI_VERSION && e.path().is_dir()).then(|| (v, e.path()))
        })
        .collect();
    found.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Pins the BPF object pinned at `from` (a link) at `to` as well: one object, two pins.
fn pin_again(from: &Path, to: &Path) -> io::Result<()> {
    let fd = open_pinned(from)?;
    let c = CString::new(to.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = sys::attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    // SAFETY: the attribute block holds a valid NUL-terminated path and our fd, alive across
    // the call.
    unsafe { sys::bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// Takes over the datapath an agent of another ABI version left in `old`, for a load under
/// `pin_path`: each of its maps that this build would reuse (type and sizes this build's, a
/// layout it reads right) is pinned in `pin_path/v1` too, the same map with its live entries,
/// so that tracked connections, services and counts carry over; each of its links is pinned in
/// `pin_path/v1/links`, where this load's attach puts its programs into it in place, as after a
/// restart (no moment without a program, never two of kproxy's on a hook). A map whose layout
/// changed (or whose layout cannot be compared: no BTF) is left behind with a warning, and
/// this load creates it empty (its entries are lost: a version that must keep them converts
/// them). A family's services and backends are taken or left together (one of them pinned
/// here that cannot be unpinned again when its partner stays behind is an error: the load
/// stops, the other version's programs serving on). `old` itself goes once
/// none of its programs runs any more ([`Datapath::retire_old_calls`]); until then its programs
/// keep their own maps and tail-call tables. Returns the maps left behind, also those an
/// earlier start left (one this build cannot read, of which `pin_path` holds a map of its own
/// by now). A resize `old`'s agent left unfinished is undone first, as in this load's own
/// directory.
fn take_over<'a>(
    old: &Path,
    pin_path: &Path,
    specs: impl Iterator<Item = &'a MapSpec>,
    built: &std::collections::BTreeMap<String, super::btf::MapLayout>,
    btfs: &mut super::btf::KernelBtfs,
) -> anyhow::Result<Vec<&'static str>> {
    let dir = maps_dir(pin_path);
    let mut left: Vec<&'static str> = Vec::new();
    let mut takes: Vec<(&'static str, aya::maps::MapData, PathBuf)> = Vec::new();
    let mut earlier: Vec<(&'static str, PathBuf)> = Vec::new();
    for spec in specs {
        let (from, to) = (old.join(spec.name), dir.join(spec.name));
        if to.exists()
            && from.exists()
            && matches!((pinned_map_id(&from), pinned_map_id(&to)), (Some(a), Some(b)) if a == b)
        {
            // Taken by an earlier start: nothing to check again.
            earlier.push((spec.name, to));
            continue;
        }
        // A resize the other version did not finish: its set-aside map holds what was
        // programmed.
        if let Err(e) = restore_set_aside(&from) {
            warn!(map = spec.name, error = format!("{e:#}"), "other version's map not taken");
            left.push(spec.name);
            continue;
        }
        if !from.exists() {
            continue;
        }
        let readable = check_pinned(&from, spec).and_then(|(data, _)| {
            let pinned = btfs.map_layout(data.fd().as_fd())?.ok_or_else(|| {
                anyhow!("pinned without BTF: its layout cannot be compared with this build's")
            })?;
            let built = built.get(spec.name).ok_or_else(|| anyhow!("not in this build's BTF"))?;
            if let Some(d) = super::btf::layout_difference(&pinned, built) {
                bail!("another layout: {d}");
            }
            Ok(data)
        });
        if to.exists() {
            // An earlier start already decided, with a map of its own: a map this build cannot
            // read was left behind then (and the attach still waits for a first sync); a
            // readable one was replaced on purpose (a resize, say).
            if readable.is_err() {
                left.push(spec.name);
            }
            continue;
        }
        match readable {
            Ok(data) => takes.push((spec.name, data, to)),
            Err(e) => {
                warn!(
                    map = spec.name,
                    error = format!("{e:#}"),
                    "other version's map not taken: this load starts it empty"
                );
                left.push(spec.name);
            }
        }
    }
    leave_partners(&mut takes, &mut left, |n| old.join(n).exists());
    let taken =
        pin_taken(takes, earlier, &mut left, |data, to| data.pin(to).map_err(anyhow::Error::from))?;
    let links = links_dir(pin_path);
    let mut links_taken = 0;
    if let Ok(entries) = std::fs::read_dir(old.join("links")) {
        if let Err(e) = std::fs::create_dir_all(&links) {
            warn!(dir = %links.display(), error = %e, "cannot take over the other version's links");
        }
        for e in entries.flatten() {
            let to = links.join(e.file_name());
            if to.exists() {
                continue;
            }
            match pin_again(&e.path(), &to) {
                Ok(()) => links_taken += 1,
                Err(err) => {
                    warn!(link = %e.path().display(), error = %err, "cannot take over the other version's link")
                }
            }
        }
    }
    info!(
        from = %old.display(),
        maps = taken,
        links = links_taken,
        "took over the datapath of another ABI version"
    );
    Ok(left)
}

/// Maps taken or left together: service slots name backend ids, which the agent's first sync
/// assigns anew in a backends map that starts empty; the other version's programs, which serve
/// until then, must keep reading both of their own.
const TAKEN_TOGETHER: [[&str; 2]; 2] =
    [[names::SERVICES4, names::BACKENDS4], [names::SERVICES6, names::BACKENDS6]];

/// Leaves behind the partners ([`TAKEN_TOGETHER`]) of a map left behind: dropped from `takes`,
/// added to `left` where the other version has them (`exists`).
fn leave_partners<T>(
    takes: &mut Vec<(&'static str, T, PathBuf)>,
    left: &mut Vec<&'static str>,
    exists: impl Fn(&str) -> bool,
) {
    for group in TAKEN_TOGETHER {
        let Some(gone) = group.iter().find(|n| left.contains(n)).copied() else { continue };
        let partners: Vec<&'static str> =
            group.into_iter().filter(|n| !left.contains(n) && exists(n)).collect();
        for name in partners {
            if let Some(at) = takes.iter().position(|(n, _, _)| *n == name) {
                takes.remove(at);
                warn!(
                    map = name,
                    with = gone,
                    "other version's map not taken: it goes with the other"
                );
            }
            left.push(name);
        }
    }
}

/// Pins each map of `takes` at its path in this load's directory; returns how many it pinned.
/// A map whose pin fails is left behind (this load starts it empty), and so are its partners
/// ([`TAKEN_TOGETHER`]): a partner pinned here or by an earlier start (`earlier`: an
/// interrupted start may have pinned one member of a family and not the other) is unpinned
/// again. A partner that cannot be unpinned is an error: the load stops rather than run with
/// the family half taken (the other version's programs serve on from their own maps).
fn pin_taken<T>(
    takes: Vec<(&'static str, T, PathBuf)>,
    earlier: Vec<(&'static str, PathBuf)>,
    left: &mut Vec<&'static str>,
    mut pin: impl FnMut(&T, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let mut pinned: Vec<(&'static str, PathBuf)> = Vec::new();
    for (name, data, to) in &takes {
        match pin(data, to) {
            Ok(()) => pinned.push((*name, to.clone())),
            Err(e) => {
                warn!(
                    map = *name,
                    error = format!("{e:#}"),
                    "other version's map not taken: this load starts it empty"
                );
                left.push(*name);
            }
        }
    }
    let mut taken = pinned.len();
    for group in TAKEN_TOGETHER {
        let Some(gone) = group.iter().find(|n| left.contains(n)).copied() else { continue };
        for name in group {
            let here = pinned.iter().find(|(n, _)| *n == name);
            let Some((_, to)) = here.or_else(|| earlier.iter().find(|(n, _)| *n == name)) else {
                continue;
            };
            std::fs::remove_file(to).with_context(|| {
                format!(
                    "unpinning {}, taken from the other version without its partner {gone}",
                    to.display()
                )
            })?;
            warn!(map = name, with = gone, "other version's map not taken: it goes with the other");
            if here.is_some() {
                taken -= 1;
            }
            if !left.contains(&name) {
                left.push(name);
            }
        }
    }
    Ok(taken)
}

/// The optional groups of programs a load verifies ([`Datapath::load_for`]); the TC programs of
/// pod interfaces and external devices, and their slow paths, are always loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramGroups {
    /// The XDP programs and `kp_tc_ext_xdp`, which only runs behind them (the agent without
    /// `--no-xdp`). Without them their tail-call table is pinned empty and
    /// [`Datapath::attach_external`] serves external devices with TC only.
    pub xdp: bool,
    /// The socket-LB programs (the agent with `--cgroup-path`); without them
    /// [`Datapath::attach_cgroup`] is refused.
    pub socket_lb: bool,
}

impl ProgramGroups {
    /// Every program of the object.
    pub const ALL: Self = Self { xdp: true, socket_lb: true };
}

/// The loaded programs and pinned maps of one node. Attachments outlive the process: dropping a
/// `Datapath` (or the agent dying) leaves the datapath serving; only [`cleanup`] removes it.
pub struct Datapath {
    pin_path: PathBuf,
    ebpf: Ebpf,
    xdp_mode: Option<XdpMode>,
    tc_attach: TcAttach,
    tcx_anchor: TcxAnchor,
    /// This load's tail-call table pins.
    calls_pins: Vec<PathBuf>,
    /// The maps of another ABI version's datapath this load did not take over ([`take_over`]).
    left_behind: Vec<&'static str>,
    /// The optional programs this load verified.
    groups: ProgramGroups,
    /// What `kp_hookdevs` holds (slot → ifindex), once [`Self::set_hook_devs`] read or wrote it.
    hook_devs: Option<std::collections::BTreeMap<u32, u32>>,
}

fn links_dir(pin_path: &Path) -> PathBuf {
    maps_dir(pin_path).join("links")
}

fn xdp_link_pin(pin_path: &Path, ifname: &str) -> PathBuf {
    links_dir(pin_path).join(format!("xdp-{ifname}"))
}

/// The TC hooks and their names, as the tcx link pins and `kproxy device list` spell them.
pub const TC_HOOKS: [(TcAttachType, &str); 2] =
    [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")];

fn hook_name(ty: TcAttachType) -> &'static str {
    TC_HOOKS.iter().find(|h| h.0 == ty).map_or("custom", |h| h.1)
}

fn tcx_link_pin(pin_path: &Path, ifname: &str, ty: TcAttachType) -> PathBuf {
    links_dir(pin_path).join(format!("tcx-{}-{ifname}", hook_name(ty)))
}

/// The kind (`xdp`, `tcx-ingress`, `tcx-egress`) and device of a link pin's file name under
/// `v1/links/` (`None` for the cgroup links and anything else).
pub fn device_link_pin(file: &str) -> Option<(&'static str, &str)> {
    ["xdp", "tcx-ingress", "tcx-egress"].into_iter().find_map(|kind| {
        let dev = file.strip_prefix(kind)?.strip_prefix('-')?;
        (!dev.is_empty()).then_some((kind, dev))
    })
}

fn cgroup_link_pin(pin_path: &Path, attach_type: &str) -> PathBuf {
    links_dir(pin_path).join(format!("cgroup-{attach_type}"))
}

fn detach_cgroup_links(pin_path: &Path) -> anyhow::Result<()> {
    for (_, ty) in names::SOCK_PROGS.into_iter().chain(names::SOCK_PROGS6) {
        let pin = cgroup_link_pin(pin_path, ty);
        if !pin.exists() {
            continue;
        }
        remove_link_pin(&pin)?;
        info!(attach_type = ty, "socket LB detached");
    }
    Ok(())
}

fn ifindex(ifname: &str) -> Option<u32> {
    let c = CString::new(ifname).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// `--cgroup-path` must be a directory of a cgroup v2 hierarchy; the error names the flag, the
/// path and what is wrong with it.
pub fn check_cgroup2(cgroup: &Path) -> anyhow::Result<()> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    if let Err(e) = std::fs::read_dir(cgroup) {
        bail!("--cgroup-path {}: {e}", cgroup.display());
    }
    if fs_magic(cgroup) != Some(CGROUP2_SUPER_MAGIC) {
        bail!(
            "--cgroup-path {} is not a cgroup v2 directory (the cgroup2 root, e.g. /sys/fs/cgroup on a cgroup v2 node; on a cgroup v1 node mount one with `mount -t cgroup2 none DIR`, see docs/datapath.md)",
            cgroup.display()
        );
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0).then_some(s.f_type as i64)
}

/// Whether `path` is on a BPF filesystem.
pub(crate) fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Gives back the pages of `object` (a part of the binary's read-only image) that reading it
/// made resident. The loader copies what it keeps (programs, BTF, map definitions) out of the
/// object, so after a load its pages (several MiB: the object carries BTF and debug
/// information) would only count in the agent's memory; a later load reads them from the file
/// again. Only whole pages inside the object are given back.
fn release_object_pages(object: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = (object.as_ptr() as usize).next_multiple_of(page);
    let end = (object.as_ptr() as usize + object.len()) / page * page;
    if end > start {
        // SAFETY: the range lies inside a `'static` read-only part of the binary's image, a
        // private file mapping that is never written: MADV_DONTNEED only drops the pages from
        // this process, and the next access reads the same bytes from the file again.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// The maps whose whole content the agent writes (services and backends, both families): a new
/// capacity (`--max-services`, `--max-backends`, IPv6 switched off) is taken at load by copying
/// the pinned map into a new one of that capacity, pinned in its place before any program that
/// uses it is attached, so that nothing programmed is lost and no connection is dropped. The
/// maps the datapath writes (connection tracking, reverse NAT, affinity, socket LB) keep their
/// pinned capacity: packets change them while a copy would run.
const RESIZED_BY_COPY: [&str; 4] =
    [names::SERVICES4, names::BACKENDS4, names::SERVICES6, names::BACKENDS6];

/// The counter maps, indexed by a packet's reason or a connection-tracking event, with the slots
/// this build's programs count in. One pinned by an earlier build with fewer slots (before a
/// reason was added) is re-created: a count past its end would be lost and reading it would fail.
/// Its counts restart from zero (counters, not state: nothing programmed is lost; Prometheus
/// takes the drop as a counter reset). One with more slots (a newer build's) is reused.
const COUNTER_MAPS: [(&str, u32); 4] = [
    (names::COUNTERS, kproxy_common::REASON_MAX),
    (names::COUNTERS6, kproxy_common::REASON_MAX),
    (names::CT_COUNTERS, kproxy_common::ct_counter::MAX),
    (names::CT_COUNTERS6, kproxy_common::ct_counter::MAX),
];

/// Where a map being resized waits, set aside, until its entries are in the new map (`-`: bpffs
/// refuses names with a dot).
fn set_aside_path(pin: &Path) -> PathBuf {
    let mut p = pin.as_os_str().to_owned();
    p.push("-resizing");
    PathBuf::from(p)
}

/// Puts back a map a resize set aside and did not finish (the agent stopped during the copy):
/// it holds what was programmed, the new map at the pin may be partial.
fn restore_set_aside(pin: &Path) -> anyhow::Result<()> {
    let aside = set_aside_path(pin);
    if !aside.exists() {
        return Ok(());
    }
    if pin.exists() {
        std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    std::fs::rename(&aside, pin)
        .with_context(|| format!("restoring {} from {}", pin.display(), aside.display()))?;
    warn!(pin = %pin.display(), "an unfinished map resize was undone");
    Ok(())
}

/// One map of [`RESIZED_BY_COPY`] taking a new capacity.
struct Resize {
    spec: MapSpec,
    pin: PathBuf,
    aside: PathBuf,
    from: u32,
    to: u32,
}

impl Resize {
    /// Sets the pinned map (`data`, `max` entries) aside for a new one of `want` entries, or
    /// `None` (the pinned map is reused as it is) when it holds more entries than `want`.
    fn prepare(
        spec: &MapSpec,
        pin: &Path,
        data: &aya::maps::MapData,
        max: u32,
        want: u32,
    ) -> anyhow::Result<Option<Self>> {
        let fd = data.fd().as_fd();
        let entries = super::batch::count(fd, spec.key_size as usize, spec.value_size as usize)
            .with_context(|| format!("counting the entries of {}", pin.display()))?;
        if entries > u64::from(want) {
            warn!(
                map = spec.name,
                pinned = max,
                requested = want,
                entries,
                "reusing pinned map with its existing capacity: it holds more entries than \
                 requested"
            );
            return Ok(None);
        }
        let aside = set_aside_path(pin);
        std::fs::rename(pin, &aside)
            .with_context(|| format!("setting {} aside for a resize", pin.display()))?;
        Ok(Some(Self { spec: *spec, pin: pin.to_owned(), aside, from: max, to: want }))
    }

    /// Copies the entries of the map set aside into the new one at the pin.
    fn copy(&self) -> anyhow::Result<()> {
        let open = |p: &Path| {
            aya::maps::MapData::from_pin(p).with_context(|| format!("opening {}", p.display()))
        };
        let (old, new) = (open(&self.aside)?, open(&self.pin)?);
        let (ks, vs) = (self.spec.key_size as usize, self.spec.value_size as usize);
        let copied = super::batch::copy(old.fd().as_fd(), new.fd().as_fd(), ks, vs)
            .with_context(|| format!("copying {} into its resized map", self.spec.name))?;
        info!(
            map = self.spec.name,
            from = self.from,
            to = self.to,
            entries = copied,
            "map resized, its entries copied"
        );
        Ok(())
    }

    /// Drops the map set aside (the programs still attached keep it until they are replaced).
    fn finish(&self) {
        if let Err(e) = std::fs::remove_file(&self.aside) {
            warn!(pin = %self.aside.display(), error = %e, "removing a resized map's old pin");
        }
    }

    /// Puts the map set aside back at its pin.
    fn undo(&self) {
        if let Err(e) = restore_set_aside(&self.pin) {
            warn!(pin = %self.pin.display(), error = format!("{e:#}"), "undoing a map resize");
        }
    }
}

/// The object's read-only globals and the values this kernel needs (every loader of the object
/// sets them: [`Datapath::load`], `kproxy-verifier-stats`). `KP_XDP_META`: XDP's mark for TC
/// (`kp_xdp_ext`), 1 where the kernel lets XDP programs call `bpf_xdp_adjust_meta`; a frozen
/// constant, so that the verifier of a kernel without it never walks the call.
pub fn object_globals() -> [(&'static str, u8); 1] {
    [(names::GLOBAL_XDP_META, u8::from(super::features::xdp_meta()))]
}

impl Datapath {
    /// Loads the embedded object with every program, reusing the maps pinned under
    /// `pin_path/v1` when they exist and match the ABI (type, key and value size, and a layout
    /// their BTF shows this build can read: [`check_pinned_layout`]), creating and pinning them
    /// otherwise; a datapath another ABI version left beside it is taken over ([`take_over`]).
    pub fn load(pin_path: &Path, sizes: &MapSizes) -> anyhow::Result<Self> {
        Self::load_for(pin_path, sizes, ProgramGroups::ALL)
    }

    /// [`Self::load`], with only the optional programs `groups` asks for (see
    /// [`ProgramGroups`]): the kernel does not verify programs that never run, which shortens
    /// the start and lets a node whose kernel refuses one of them run without it.
    pub fn load_for(
        pin_path: &Path,
        sizes: &MapSizes,
        groups: ProgramGroups,
    ) -> anyhow::Result<Self> {
        let ProgramGroups { xdp, socket_lb } = groups;
        raise_memlock_limit();
        let dir = maps_dir(pin_path);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating pin directory {}", dir.display()))?;
        if !is_bpffs(&dir) {
            bail!(
                "pin path {} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf)",
                dir.display()
            );
        }
        let globals = object_globals();
        if globals.iter().any(|&(n, v)| n == names::GLOBAL_XDP_META && v == 0) {
            warn!(
                "this kernel does not let XDP programs call bpf_xdp_adjust_meta: XDP marks the \
                 packets it handled in the source MAC's group bit, which TC takes off (feature \
                 xdp_meta; packet taps on the external devices see it)"
            );
        }
        let mut loader = EbpfLoader::new();
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let specs = pinned_map_specs;
        let pins: Vec<(&'static str, PathBuf)> =
            specs().map(|s| (s.name, dir.join(s.name))).collect();
        let mut resized: Vec<Resize> = Vec::new();
        let built = super::btf::object_layouts(crate::EBPF_OBJECT)
            .context("reading the map layouts of the eBPF object's BTF")?;
        let mut pinned_btf = super::btf::KernelBtfs::default();
        let left_behind = match other_versions(pin_path).first() {
            Some(old) => take_over(old, pin_path, specs(), &built, &mut pinned_btf)?,
            None => Vec::new(),
        };
        for (spec, (name, pin)) in specs().zip(&pins) {
            restore_set_aside(pin)?;
            if pin.exists() {
                let (data, max) = check_pinned(pin, spec)?;
                check_pinned_layout(&mut pinned_btf, pin, &data, built.get(*name))?;
                let want = sizes.of(name);
                let slots = COUNTER_MAPS.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
                if let Some(slots) = slots
                    && max < slots
                {
                    drop(data);
                    std::fs::remove_file(pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                    info!(
                        map = name,
                        pinned = max,
                        slots,
                        "counter map with fewer slots than this build counts in: re-created, its \
                         counts restart from zero"
                    );
                } else if sizes.ipv6 && max == IPV6_OFF_ENTRIES && IPV6_SIZED.contains(name) {
                    // Created while IPv6 was off: never written, so it is replaced by a map of
                    // the capacity IPv6 now needs.
                    std::fs::remove_file(pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                    info!(map = name, "IPv6 switched on: map recreated with its full capacity");
                } else if let Some(want) = want
                    && want != max
                    && RESIZED_BY_COPY.contains(name)
                    && let Some(r) = Resize::prepare(spec, pin, &data, max, want)?
                {
                    resized.push(r);
                } else {
                    if let Some(want) = want
                        && want != max
                        && !RESIZED_BY_COPY.contains(name)
                    {
                        warn!(
                            map = name,
                            pinned = max,
                            requested = want,
                            "reusing pinned map with its existing capacity (the datapath writes \
                             it: `kproxy cleanup` to resize, which drops the tracked connections)"
                        );
                    }
                    debug!(map = name, "reusing pinned map");
                    loader.map_pin_path(name, pin.as_path());
                    continue;
                }
            }
            if let Some(want) = sizes.of(name) {
                loader.map_max_entries(name, want);
            }
            loader.map_pin_path(name, pin.as_path());
        }
        let fresh_hints = !dir.join(names::ADDR_BITS).exists();
        // The copies come before any program that uses the new maps is attached; the maps set
        // aside go only once every copy is complete, and come back if anything failed.
        let loaded = loader.load(crate::EBPF_OBJECT).context("loading the eBPF object");
        let mut ebpf =
            match loaded.and_then(|e| resized.iter().try_for_each(Resize::copy).map(|()| e)) {
                Ok(ebpf) => ebpf,
                Err(e) => {
                    resized.iter().for_each(Resize::undo);
                    return Err(e);
                }
            };
        resized.iter().for_each(Resize::finish);
        let verify = Instant::now();
        // The entry programs first: they take the verifier longest.
        let order: Vec<(&'static str, ProgKind)> = [(names::PROG_XDP_EXT, ProgKind::Xdp)]
            .into_iter()
            .chain(names::TC_ENTRY_PROGS.map(|n| (n, ProgKind::Tc)))
            .chain(names::XDP_CALLS.map(|(n, _)| (n, ProgKind::Xdp)))
            .chain(names::TC_CALLS.map(|(n, _)| (n, ProgKind::Tc)))
            .chain(
                names::SOCK_PROGS
                    .iter()
                    .chain(&names::SOCK_PROGS6)
                    .map(|(n, _)| (*n, ProgKind::Sock)),
            )
            .filter(|(n, k)| xdp || (*k != ProgKind::Xdp && !XDP_ONLY_TC.contains(n)))
            .filter(|(_, k)| socket_lb || *k != ProgKind::Sock)
            .collect();
        load_programs(&mut ebpf, &order)?;
        let verify_ms = verify.elapsed().as_millis() as u64;
        let calls_pins = fill_calls(&mut ebpf, &dir, xdp)?;
        let tc_and_xdp = order.iter().filter(|(_, k)| *k != ProgKind::Sock).map(|(n, _)| *n);
        shed_program_sources(&mut ebpf, tc_and_xdp)?;
        if fresh_hints {
            seed_hints(&dir).context("filling the hint bitmaps from the programmed maps")?;
        }
        release_object_pages(crate::EBPF_OBJECT);
        info!(pin_path = %pin_path.display(), verify_ms, xdp, socket_lb, "datapath loaded");
        Ok(Self {
            pin_path: pin_path.to_path_buf(),
            ebpf,
            xdp_mode: None,
            tc_attach: TcAttach::auto(),
            tcx_anchor: TcxAnchor::Tail,
            calls_pins,
            left_behind,
            groups,
            hook_devs: None,
        })
    }

    /// Forces the XDP attach mode of new XDP attachments (`--xdp-mode`; `None`, the default:
    /// native XDP where the driver has it, TC alone on veth and on drivers without it; see
    /// [`Self::attach_external`]). An attachment surviving from an earlier run in another mode
    /// is replaced.
    pub fn set_xdp_mode(&mut self, mode: Option<XdpMode>) {
        self.xdp_mode = mode;
    }

    /// How new TC attachments are made ([`TcAttach::auto`] unless set; `--tc-attach`). An
    /// attachment of the other kind from an earlier run is replaced at the next attach.
    pub fn set_tc_attach(&mut self, how: TcAttach) {
        self.tc_attach = how;
    }

    /// How TC programs are attached.
    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    /// Where tcx links go among other owners' tcx programs ([`TcxAnchor::Tail`] unless set;
    /// `--tcx-anchor`), from the next attach on.
    pub fn set_tcx_anchor(&mut self, anchor: TcxAnchor) {
        self.tcx_anchor = anchor;
    }

    /// The maps of another ABI version's datapath found under the pin path that this load did
    /// not take over (another layout, no BTF): it started them empty. Until the agent has
    /// written what it programs into them, that version's programs, which still run on their
    /// own maps, serve better than this load's would.
    pub fn maps_left_behind(&self) -> &[&'static str] {
        &self.left_behind
    }

    /// The pin path this datapath lives under.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// A loaded program by name (tests run them with `BPF_PROG_TEST_RUN`).
    pub fn program_mut(&mut self, name: &str) -> Option<&mut Program> {
        self.ebpf.program_mut(name)
    }

    /// Attaches the external-device programs to `ifname` (replacing an earlier attachment) and
    /// returns the XDP mode it got (`None`: TC alone). Unless [`Self::set_xdp_mode`] forces a
    /// mode, XDP goes on in native mode where the driver has it, and the TC program serves
    /// veth devices and drivers without native XDP alone ([`auto_xdp_mode`] says why). An XDP
    /// link of an earlier run is updated in place, or replaced when it is attached in another
    /// mode than the one asked for.
    pub fn attach_external(
        &mut self,
        ifname: &str,
        mode: ExternalMode,
    ) -> anyhow::Result<Option<XdpMode>> {
        ifindex(ifname).ok_or_else(|| anyhow!("no such device {ifname}"))?;
        if mode == ExternalMode::Xdp && !self.groups.xdp {
            bail!("{ifname}: XDP asked for, but the datapath was loaded without its XDP programs");
        }
        // TC's complete path first (it does not trust XDP's marks), then XDP, then the TC
        // program that passes what XDP marked: at no moment does a TC program take a mark XDP
        // did not set.
        self.attach_tc(ifname, TcAttachType::Ingress, names::PROG_TC_EXT)?;
        let xdp = match (mode, self.xdp_mode) {
            (ExternalMode::TcOnly, _) => None,
            (ExternalMode::Xdp, Some(forced)) => Some(forced),
            (ExternalMode::Xdp, None) => auto_xdp_mode(ifname),
        };
        let xdp = match xdp {
            None => None,
            Some(m) => match self.attach_xdp(ifname, m) {
                Ok(()) => Some(m),
                // Auto mode on a driver without native XDP (or an XDP program of another
                // owner on the device): TC serves it alone.
                Err(e) if self.xdp_mode.is_none() => {
                    info!(ifname, error = %e, "no native XDP: TC serves the device alone");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        match xdp {
            None => detach_xdp(&self.pin_path, ifname)?,
            Some(_) => {
                if let Err(e) =
                    self.attach_tc(ifname, TcAttachType::Ingress, names::PROG_TC_EXT_XDP)
                {
                    // TC alone rather than XDP in front of a program that looks everything up
                    // again (and leaves its source-MAC mark to be taken off by `kp_tc_ext`).
                    detach_xdp(&self.pin_path, ifname)?;
                    return Err(e);
                }
            }
        }
        info!(ifname, xdp = ?xdp, "external device attached");
        Ok(xdp)
    }

    /// Attaches the pod-interface programs (TC ingress and egress) to `ifname`.
    pub fn attach_pod(&mut self, ifname: &str) -> anyhow::Result<()> {
        ifindex(ifname).ok_or_else(|| anyhow!("no such device {ifname}"))?;
        self.attach_tc(ifname, TcAttachType::Ingress, names::PROG_TC_FROM_POD)?;
        self.attach_tc(ifname, TcAttachType::Egress, names::PROG_TC_TO_POD)?;
        debug!(ifname, "pod interface attached");
        Ok(())
    }

    /// Detaches whatever kproxy attached to `ifname`; a device that is gone is not an error.
    pub fn detach(&mut self, ifname: &str) -> anyhow::Result<()> {
        detach_device(&self.pin_path, ifname)
    }

    /// Attaches the socket-LB programs (connect, sendmsg, recvmsg and getpeername, for IPv4 and
    /// IPv6 sockets) to the cgroup v2 directory `cgroup`: sockets of processes in it (and in its
    /// descendants) that connect or send to a service frontend go to a backend directly. An
    /// IPv6 socket reaches IPv6 frontends (with `--enable-ipv6`) and, through IPv4-mapped
    /// addresses, IPv4 ones. Links are pinned under
    /// `v1/links/cgroup-<type>`; an attachment from an earlier run gets the new program in place
    /// (`BPF_LINK_UPDATE`). Needs Linux 5.8 (getpeername4; cgroup `bpf_link`s since 5.7).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        if !self.groups.socket_lb {
            bail!(
                "{}: the socket LB asked for, but the datapath was loaded without its programs",
                cgroup.display()
            );
        }
        check_cgroup2(cgroup)?;
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        std::fs::create_dir_all(links_dir(&self.pin_path))?;
        for (name, ty) in names::SOCK_PROGS.into_iter().chain(names::SOCK_PROGS6) {
            let pin = cgroup_link_pin(&self.pin_path, ty);
            let p: &mut CgroupSockAddr = prog(&mut self.ebpf, name)?.try_into()?;
            if update_link_pin(&pin, p.fd()?.as_fd().as_raw_fd())? {
                continue;
            }
            let id = p
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let link = FdLink::try_from(p.take_link(id)?)
                .map_err(|e| anyhow!("{name}: cgroup attachment is not a bpf_link: {e}"))?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        info!(cgroup = %cgroup.display(), "socket LB attached");
        Ok(())
    }

    /// Detaches the socket-LB programs attached by [`Self::attach_cgroup`], if any.
    pub fn detach_cgroup(&mut self) -> anyhow::Result<()> {
        detach_cgroup_links(&self.pin_path)
    }

    /// Removes the tail-call tables of earlier loads that no program alive in the kernel calls
    /// into any more, and what remains of another ABI version's datapath (see [`take_over`])
    /// once none of its tables is called into; returns what it kept. A device whose attachment
    /// failed may still run an earlier load's programs (a link or filter that was not
    /// replaced), whose slow paths are tail calls into that load's tables: the kernel empties a
    /// table once its last pin and descriptor go, which would drop every new connection there.
    /// Those stay until the device runs this load's programs or is gone; the tables of loads
    /// whose programs run nowhere go at once, however many earlier restarts left them. Where
    /// the kernel does not let the agent list its programs, everything goes once
    /// `none_failed` (no device's attachment failed) and stays otherwise. The agent calls it
    /// after attaching its devices, and again while it kept any.
    pub fn retire_old_calls(&self, none_failed: bool) -> anyhow::Result<Vec<PathBuf>> {
        let old = self.old_calls();
        if old.is_empty() {
            return Ok(old);
        }
        let called = tables_called_into(&self.pin_path)?;
        let in_use = |table: &Path| match &called {
            Some(c) => called_into(table, c),
            None => !none_failed,
        };
        let mut kept = Vec::new();
        for path in old {
            if path.is_dir() {
                // Another version's directory: any of its tables, wherever it pins them.
                if program_arrays(&path).iter().any(|t| in_use(t)) {
                    kept.push(path);
                    continue;
                }
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                info!(dir = %path.display(), "other ABI version's datapath removed");
            } else if in_use(&path) {
                kept.push(path);
            } else {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                debug!(pin = %path.display(), "old tail-call table removed");
            }
        }
        Ok(kept)
    }

    /// The pins of earlier loads' tail-call tables and the directories of other ABI versions'
    /// datapaths, whose programs tail-call into tables of their own (see
    /// [`Datapath::retire_old_calls`]).
    pub fn old_calls(&self) -> Vec<PathBuf> {
        let dir = calls_dir(&maps_dir(&self.pin_path));
        let mut old: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| !self.calls_pins.contains(p))
                .collect(),
            Err(_) => Vec::new(),
        };
        old.extend(other_versions(&self.pin_path));
        old
    }

    /// Makes `kp_poddevs` hold exactly `ifindexes`, the host-side pod interfaces carrying the
    /// programs (eBPF host routing delivers into their peers' namespaces; a stale index could
    /// belong to another kind of device later, so removed ones go at once).
    pub fn set_pod_devs(
        &mut self,
        ifindexes: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        let map = self.ebpf.map_mut(names::POD_DEVS).context("map kp_poddevs missing")?;
        let mut devs: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(map)?;
        let present: Vec<u32> = devs.keys().filter_map(Result::ok).collect();
        for i in present.iter().filter(|i| !ifindexes.contains(i)) {
            let _ = devs.remove(i);
        }
        for i in ifindexes.iter().filter(|i| !present.contains(i)) {
            devs.insert(i, 1, 0).with_context(|| format!("kp_poddevs[{i}]"))?;
        }
        Ok(())
    }

    /// Makes `kp_hookdevs` name exactly `ifindexes`, the devices whose ingress runs this load's
    /// programs (pod interfaces, external devices), so that `kp_tc_to_pod` passes what they
    /// translated already. Of two devices in one slot the lower ifindex is recorded (the other's
    /// packets take the full path). Called after the attachments it reports: a device is named
    /// only once its programs run; a vanished one goes at once (its index could be reused).
    pub fn set_hook_devs(
        &mut self,
        ifindexes: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        let map = self.ebpf.map_mut(names::HOOK_DEVS).context("map kp_hookdevs missing")?;
        let mut devs: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map)?;
        let mut want = std::collections::BTreeMap::new();
        for &i in ifindexes.iter().filter(|&&i| i != 0) {
            want.entry(kproxy_common::hook_dev_slot(i)).or_insert(i);
        }
        // The whole table on the first call (a restarted agent finds the last one's), then only
        // the slots that change. After a failed write the table is read again next time.
        let written = match self.hook_devs.take() {
            Some(w) => w,
            None => (0..kproxy_common::defaults::HOOK_DEVS_MAX)
                .filter_map(|s| devs.get(&s, 0).ok().filter(|v| *v != 0).map(|v| (s, v)))
                .collect(),
        };
        let slots: std::collections::BTreeSet<u32> =
            written.keys().chain(want.keys()).copied().collect();
        for slot in slots {
            let new = want.get(&slot).copied();
            if written.get(&slot).copied() != new {
                devs.set(slot, new.unwrap_or(0), 0)
                    .with_context(|| format!("kp_hookdevs[{slot}]"))?;
            }
        }
        self.hook_devs = Some(want);
        Ok(())
    }

    /// The maps, for the sync code.
    pub fn dataplane(&self) -> anyhow::Result<BpfDataplane> {
        BpfDataplane::open(&self.pin_path)
    }

    /// Attaches TC program `name` to hook `ty` of `ifname` the way [`Self::tc_attach`] says, then
    /// removes an attachment of the other kind an earlier run left there.
    fn attach_tc(&mut self, ifname: &str, ty: TcAttachType, name: &str) -> anyhow::Result<()> {
        match self.tc_attach {
            TcAttach::Tcx => {
                self.attach_tcx(ifname, ty, name)?;
                let mut removed = false;
                for n in same_slot(name) {
                    removed |= detach_clsact(ifname, ty, n)?;
                }
                if removed {
                    delete_empty_clsact(ifname);
                }
                Ok(())
            }
            TcAttach::Netlink => {
                self.attach_clsact(ifname, ty, name)?;
                detach_tcx(&self.pin_path, ifname, ty)
            }
        }
    }

    /// A pinned tcx link where [`Self::tcx_anchor`] says; a link pinned by an earlier run gets
    /// the program in place, unless it must move to the front ([`TcxAnchor::Head`]).
    fn attach_tcx(&mut self, ifname: &str, ty: TcAttachType, name: &str) -> anyhow::Result<()> {
        let pin = tcx_link_pin(&self.pin_path, ifname, ty);
        std::fs::create_dir_all(links_dir(&self.pin_path))?;
        let anchor = self.tcx_anchor;
        let p: &mut SchedClassifier = prog(&mut self.ebpf, name)?.try_into()?;
        let fd = p.fd()?.as_fd().as_raw_fd();
        // Other owners' tcx programs in front of kproxy's (of all on the hook, before a first
        // attach): moved behind in head mode, logged in tail mode.
        let (ahead, ours) = tcx_ahead_of(ifname, ty, name);
        let moving = anchor == TcxAnchor::Head && pin.exists() && !ahead.is_empty();
        if anchor == TcxAnchor::Tail && !ahead.is_empty() {
            info!(
                device = ifname, hook = ?ty, programs = ?ahead,
                "tcx programs of other owners run before kproxy's: one that ends the hook \
                 (TCX_PASS, TCX_DROP, a redirect) keeps its packets from kproxy \
                 (--tcx-anchor head puts kproxy's in front)"
            );
        }
        if !moving && update_link_pin(&pin, fd)? {
            return Ok(());
        }
        if moving && ours == Some(p.info()?.id()) {
            // This very program is behind the link: the kernel takes a program once per hook,
            // so the old link goes first (the hook runs without kproxy for that moment).
            remove_link_pin(&pin)?;
        }
        let order = match anchor {
            TcxAnchor::Tail => LinkOrder::last(),
            TcxAnchor::Head => LinkOrder::first(),
        };
        let id = p
            .attach_with_options(ifname, ty, TcAttachOptions::TcxOrder(order))
            .with_context(|| format!("attaching {name} to {ifname} {ty:?} (tcx)"))?;
        let link = FdLink::try_from(p.take_link(id)?)
            .map_err(|e| anyhow!("{name}: tcx attachment is not a bpf_link: {e}"))?;
        if moving {
            // The new link runs in front; the old one, behind it now, goes.
            remove_link_pin(&pin)?;
            info!(device = ifname, hook = ?ty, was_behind = ?ahead, "kproxy's tcx link moved to the front");
        }
        link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }

    fn attach_clsact(&mut self, ifname: &str, ty: TcAttachType, name: &str) -> anyhow::Result<()> {
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("adding clsact qdisc to {ifname}")),
        }
        let p: &mut SchedClassifier = prog(&mut self.ebpf, name)?.try_into()?;
        // Replace our filter in place if it exists (no gap, no duplicate)...
        let existing = SchedClassifierLink::attached(
            ifname,
            ty,
            TC_PRIORITY,
            TcHandle::from(TC_HANDLE),
            None,
        )?;
        let id = match p.attach_to_link(existing) {
            Ok(id) => id,
            // ...or create it.
            Err(_) => p
                .attach_with_options(
                    ifname,
                    ty,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TcHandle::from(TC_HANDLE),
                        classid: None,
                    }),
                )
                .with_context(|| format!("attaching {name} to {ifname} {ty:?}"))?,
        };
        // The filter must outlive this process: take the link and never run its detaching Drop.
        std::mem::forget(p.take_link(id)?);
        Ok(())
    }

    fn attach_xdp(&mut self, ifname: &str, mode: XdpMode) -> anyhow::Result<()> {
        let pin = xdp_link_pin(&self.pin_path, ifname);
        std::fs::create_dir_all(links_dir(&self.pin_path))?;
        if pin.exists()
            && let Some(was) = attached_xdp_mode(ifname).filter(|was| *was != mode)
        {
            // A link of an earlier run in another mode than the one asked for now: replace it
            // (the TC program serves the device alone meanwhile).
            info!(ifname, ?was, ?mode, "XDP attached in another mode: re-attaching");
            detach_xdp(&self.pin_path, ifname)?;
        }
        let p: &mut Xdp = prog(&mut self.ebpf, names::PROG_XDP_EXT)?.try_into()?;
        if pin.exists() {
            // A link from an earlier run: swap the program inside it (atomic).
            let updated = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(XdpLink::try_from(FdLink::from(l))?))
                .and_then(|l| Ok(p.attach_to_link(l)?));
            match updated {
                Ok(id) => {
                    drop(p.take_link(id)?); // closes our fd; the pin keeps the link
                    return Ok(());
                }
                Err(e) => {
                    // Device recreated (link defunct) or not an XDP link: start over.
                    warn!(ifname, error = %e, "replacing stale XDP link pin");
                    std::fs::remove_file(&pin)?;
                }
            }
        }
        let id = p
            .attach(ifname, mode)
            .with_context(|| format!("attaching {} to {ifname}", names::PROG_XDP_EXT))?;
        debug!(ifname, ?mode, "XDP attached");
        let link = p.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                fd.pin(&pin).with_context(|| format!("pinning XDP link at {}", pin.display()))?;
            }
            Err(_) => {
                // Kernel without XDP links: a netlink attachment, which persists by itself.
                warn!(ifname, "XDP attached through netlink (no bpf_link support)");
            }
        }
        Ok(())
    }
}

/// Lifts `RLIMIT_MEMLOCK`: kernels before 5.11 charge BPF maps and programs to it (later ones to
/// the memory cgroup), and its usual default (64 KiB or 8 MiB) is far below the maps' size.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain system call on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            error = %io::Error::last_os_error(),
            "cannot lift RLIMIT_MEMLOCK: loading may fail on kernels before 5.11"
        );
    }
}

/// The TC program that only runs behind XDP (loaded with the XDP programs).
const XDP_ONLY_TC: [&str; 1] = [names::PROG_TC_EXT_XDP];

/// The errno of a failed BPF system call behind `e`.
fn prog_errno(e: &aya::programs::ProgramError) -> Option<i32> {
    match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// The ids of the maps that programs alive in the kernel call into, apart from the programs
/// the tail-call tables under `pin_path` hold (the slow paths, which live as long as a table
/// holds them, and some of which tail-call into it themselves): a table among them is still
/// called into by an entry program of its load. `None` where the kernel does not let this
/// process list its programs (`BPF_PROG_GET_NEXT_ID` asks for CAP_SYS_ADMIN, which an agent run
/// with CAP_BPF and CAP_NET_ADMIN lacks).
fn tables_called_into(pin_path: &Path) -> anyhow::Result<Option<std::collections::HashSet<u32>>> {
    let mut held = std::collections::HashSet::new();
    for table in program_arrays(pin_path) {
        held.extend(table_programs(&table));
    }
    let mut ids = std::collections::HashSet::new();
    for p in aya::programs::loaded_programs() {
        let p = match p {
            Ok(p) => p,
            // Gone since it was listed.
            Err(e) if prog_errno(&e) == Some(libc::ENOENT) => continue,
            Err(e) if matches!(prog_errno(&e), Some(libc::EPERM | libc::EACCES)) => {
                return Ok(None);
            }
            Err(e) => return Err(e).context("listing the kernel's BPF programs"),
        };
        if held.contains(&p.id()) {
            continue;
        }
        match p.map_ids() {
            Ok(Some(maps)) => ids.extend(maps),
            Ok(None) => bail!("this kernel does not list the maps a program uses"),
            Err(e) if prog_errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("reading the maps of a BPF program"),
        }
    }
    Ok(Some(ids))
}

/// Every program array pinned under `dir` (this and other ABI versions, every load's tables),
/// wherever a version pins them (three levels down at most, symbolic links not followed).
fn program_arrays(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let path = e.path();
            if kind.is_dir() {
                if depth < 3 {
                    dirs.push((path, depth + 1));
                }
            } else if kind.is_file()
                && pinned_map(&path)
                    .and_then(|m| m.info().ok())
                    .is_some_and(|m| matches!(m.map_type(), Ok(aya::maps::MapType::ProgramArray)))
            {
                found.push(path);
            }
        }
    }
    found
}

/// The map pinned at `path`, if what is pinned there is a map: the kernel answers a map's
/// information request for a link or a program too, in another layout.
fn pinned_map(path: &Path) -> Option<aya::maps::MapData> {
    let fd = open_pinned(path).ok()?;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    if target.as_os_str() != "anon_inode:bpf-map" {
        return None;
    }
    aya::maps::MapData::from_fd(fd).ok()
}

/// The ids of the programs the program array pinned at `pin` holds (user space reads a
/// program array's entries as program ids).
fn table_programs(pin: &Path) -> Vec<u32> {
    let Some(data) = pinned_map(pin) else { return Vec::new() };
    let Ok(info) = data.info() else { return Vec::new() };
    let fd = data.fd().as_fd().as_raw_fd();
    (0..info.max_entries())
        .filter_map(|index: u32| {
            let mut id = 0u32;
            let mut attr = sys::attr();
            // SAFETY: union access; the element member is the one BPF_MAP_LOOKUP_ELEM reads.
            let elem = unsafe { &mut attr.__bindgen_anon_2 };
            elem.map_fd = fd as u32;
            elem.key = &index as *const u32 as u64;
            elem.__bindgen_anon_1.value = &mut id as *mut u32 as u64;
            // SAFETY: key and value point at live u32s for the duration of the call.
            unsafe { sys::bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) }.ok().map(|_| id)
        })
        .collect()
}

/// The id of the map pinned at `path`, if what is pinned there is a map.
fn pinned_map_id(path: &Path) -> Option<u32> {
    pinned_map(path).and_then(|m| m.info().ok()).map(|m| m.id())
}

/// Whether the map pinned at `path` is one of `called` (see [`tables_called_into`]); a pin
/// that is no map is not.
fn called_into(path: &Path, called: &std::collections::HashSet<u32>) -> bool {
    pinned_map_id(path).is_some_and(|id| called.contains(&id))
}

/// Directory of the tail-call table pins.
fn calls_dir(dir: &Path) -> PathBuf {
    dir.join("calls")
}

/// Fills this load's tail-call tables with its slow-path programs and pins them, so that they
/// outlive the agent (the kernel empties a program array when its last file descriptor and pin
/// are gone). Each load pins its own tables under a new name: programs still attached from an
/// earlier load keep the tables they were loaded with until [`Datapath::retire_old_calls`].
fn fill_calls(ebpf: &mut Ebpf, dir: &Path, xdp: bool) -> anyhow::Result<Vec<PathBuf>> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let stamp = format!(
        "{}-{}",
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
        std::process::id()
    );
    let calls = calls_dir(dir);
    std::fs::create_dir_all(&calls).with_context(|| format!("creating {}", calls.display()))?;
    let tc_calls = &names::TC_CALLS[..];
    // Without the XDP programs their table is pinned empty (no program can tail-call into it).
    let xdp_calls = if xdp { &names::XDP_CALLS[..] } else { &[] };
    let mut pins = Vec::new();
    for (table, targets) in [(names::CALLS_TC, tc_calls), (names::CALLS_XDP, xdp_calls)] {
        let fds: Vec<(u32, ProgramFd)> = targets
            .iter()
            .map(|(name, index)| {
                let p = prog(ebpf, name)?;
                Ok((*index, p.fd()?.try_clone()?))
            })
            .collect::<anyhow::Result<_>>()?;
        let map = ebpf.map_mut(table).ok_or_else(|| anyhow!("map {table} missing"))?;
        let mut array = ProgramArray::try_from(map)?;
        for (index, fd) in &fds {
            array.set(*index, fd, 0).with_context(|| format!("{table}[{index}]"))?;
        }
        let pin = calls.join(format!("{table}-{stamp}"));
        ebpf.map_mut(table)
            .ok_or_else(|| anyhow!("map {table} missing"))?
            .pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        pins.push(pin);
    }
    Ok(pins)
}

/// Sets the hint bits of everything already in the services and backends maps (hint maps
/// created by this load next to maps an earlier agent filled).
fn seed_hints(dir: &Path) -> anyhow::Result<()> {
    use super::{Dataplane as _, Dataplane6 as _};
    let dp = BpfDataplane::open(dir.parent().context("pin directory has no parent")?)?;
    let Some(h) = dp.hints() else { return Ok(()) };
    for (key, _) in dp.services()? {
        h.frontend(&key);
    }
    for (_, b) in dp.backends()? {
        h.backend(&b);
    }
    for (key, _) in dp.services6()? {
        h.frontend6(&key);
    }
    for (_, b) in dp.backends6()? {
        h.backend6(&b);
    }
    Ok(())
}

/// The kernel driver of a device (`ETHTOOL_GDRVINFO`), e.g. "veth".
fn driver(ifname: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    let n = ifname.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    // SAFETY: a datagram socket for the ioctl, closed below; req and info outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        if r != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The XDP mode `--xdp-mode auto` asks for on a device (`None`: TC alone). XDP pays where a
/// driver runs it on its own receive buffers, before any skb exists: native mode. Elsewhere it
/// costs more than it saves. Generic (skb) XDP runs after the skb is built and must copy every
/// skb that is cloned or has less than 256 bytes of headroom (TCP segments from a local sender
/// are clones) into a new page, then build another skb when the program passes it: the TC
/// program sees the same packet without either. veth's native XDP takes skbs from its peer the
/// same way (copied), and can send a packet back out (`XDP_TX`, redirect) only when the peer
/// runs XDP or GRO, which kproxy does not control. So veth devices (container and kind nodes)
/// get TC alone, every other device native XDP; a driver without it falls back to TC alone in
/// [`Datapath::attach_external`].
fn auto_xdp_mode(ifname: &str) -> Option<XdpMode> {
    if driver(ifname).as_deref() == Some("veth") { None } else { Some(XdpMode::Driver) }
}

/// The mode of the XDP program attached to `ifname`, as the kernel reports it (`None`: none
/// attached, or unknown).
fn attached_xdp_mode(ifname: &str) -> Option<XdpMode> {
    use netlink_packet_route::link::XdpAttached;
    let links = crate::netdev::netlink::Socket::requests().and_then(|mut s| s.links()).ok()?;
    match links.into_iter().find(|l| l.name == ifname)?.xdp?.attached {
        XdpAttached::Driver => Some(XdpMode::Driver),
        XdpAttached::SocketBuffer => Some(XdpMode::Skb),
        XdpAttached::Hardware => Some(XdpMode::Hardware),
        _ => None,
    }
}

/// Replaces the loaded TC and XDP programs of `ebpf` by handles on the kernel's programs alone.
/// aya keeps each program's source next to its fd (its instructions with every function it
/// calls linked in, and its BTF function and line information) for a reload that kproxy never
/// does: 0.9 MiB of heap for the whole datapath, held for the agent's life. The handle holds
/// the program's fd before the one it replaces closes, so the program stays loaded; nothing is
/// attached yet. The socket programs (a few KiB of source) stay as they are: aya makes their
/// handles from a pin only.
fn shed_program_sources(
    ebpf: &mut Ebpf,
    names: impl IntoIterator<Item = &'static str>,
) -> anyhow::Result<()> {
    let mut swap = |name: &'static str| -> anyhow::Result<()> {
        let p = prog(ebpf, name)?;
        let handle = match &*p {
            Program::SchedClassifier(c) => Program::SchedClassifier(
                SchedClassifier::from_program_info(c.info()?, name.into())?,
            ),
            Program::Xdp(x) => Program::Xdp(Xdp::from_program_info(
                x.info()?,
                name.into(),
                aya_obj::programs::XdpAttachType::Interface,
            )?),
            _ => bail!("program {name} is neither a TC nor an XDP program"),
        };
        *p = handle;
        Ok(())
    };
    for name in names {
        swap(name).with_context(|| format!("taking a handle on the loaded program {name}"))?;
    }
    Ok(())
}

/// Most programs the verifier checks at once ([`load_programs`]): each check holds the states of
/// the program it walks in kernel memory (tens of MiB for the largest).
const LOAD_THREADS_MAX: usize = 4;

/// Loads the programs `names` (every one must be in the object) through the kernel's verifier
/// on up to [`LOAD_THREADS_MAX`] threads, as many as the machine has CPUs: the kernel checks
/// loads by a privileged process side by side, and the checks are most of a start's time (about
/// three seconds for the whole object here on one thread, several on older kernels). Programs
/// are taken in the order of `names`, the longest checks first, so that no long one starts last.
fn load_programs(ebpf: &mut Ebpf, names: &[(&str, ProgKind)]) -> anyhow::Result<()> {
    use std::{collections::VecDeque, sync::Mutex};
    let mut found: Vec<(usize, &str, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(n, p)| names.iter().position(|(w, _)| *w == n).map(|i| (i, n, p)))
        .collect();
    if let Some((missing, _)) = names.iter().find(|(w, _)| !found.iter().any(|(_, n, _)| n == w)) {
        bail!("program {missing} missing from the eBPF object");
    }
    found.sort_by_key(|(i, _, _)| *i);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, LOAD_THREADS_MAX)
        .min(found.len());
    let queue =
        Mutex::new(found.into_iter().map(|(i, n, p)| (n, names[i].1, p)).collect::<VecDeque<_>>());
    let load_one = |name: &str, kind: ProgKind, p: &mut Program| -> anyhow::Result<()> {
        let r = match (kind, p) {
            (ProgKind::Tc, Program::SchedClassifier(p)) => p.load(),
            (ProgKind::Xdp, Program::Xdp(p)) => p.load(),
            (ProgKind::Sock, Program::CgroupSockAddr(p)) => p.load(),
            (kind, _) => {
                bail!("program {name} is not a {kind:?} program in the eBPF object")
            }
        };
        r.with_context(|| format!("loading program {name} (verifier)"))
    };
    let worker = || -> anyhow::Result<()> {
        loop {
            // The lock is held only to take the next program, never while one is checked.
            let next = queue.lock().map_err(|_| anyhow!("program queue poisoned"))?.pop_front();
            let Some((name, kind, p)) = next else { return Ok(()) };
            load_one(name, kind, p)?;
        }
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..threads)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("kproxy-load-{i}"))
                    .spawn_scoped(s, worker)
                    .context("starting a program-loading thread")
            })
            .collect();
        let mut result = worker();
        for t in others {
            let r = t.and_then(|t| {
                t.join().map_err(|_| anyhow!("a program-loading thread panicked"))?
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// The kind of program a name of the loader's lists must be in the eBPF object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProgKind {
    /// A TC classifier (`SchedClassifier`).
    Tc,
    /// An XDP program.
    Xdp,
    /// A cgroup socket-address program.
    Sock,
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

/// Opens the BPF object (a `bpf_link`, a map) pinned at `path` (`BPF_OBJ_GET`).
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = sys::attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    // SAFETY: the attribute block holds a valid NUL-terminated path, alive across the call.
    let fd = unsafe { sys::bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: a fresh fd returned by the kernel, ours to close.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the `bpf_link` pinned at `path` now (`BPF_LINK_DETACH`, Linux 5.9+), rather than
/// whenever the kernel gets to releasing it after the pin is removed.
fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let link = open_pinned(path)?;
    let mut attr = sys::attr();
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    // SAFETY: an attribute block holding our link fd.
    unsafe { sys::bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Puts program `prog_fd` into the `bpf_link` pinned at `path` (`BPF_LINK_UPDATE`, 5.7+).
fn update_pinned_link(path: &Path, prog_fd: i32) -> io::Result<()> {
    let link = open_pinned(path)?;
    let mut attr = sys::attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = prog_fd as u32;
    // SAFETY: an attribute block holding our link fd and a program fd.
    unsafe { sys::bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// Puts program `prog_fd` into the link pinned at `pin` by an earlier run: true when it did,
/// false when there is no pin or the link could not take it (its device or cgroup is gone:
/// the pin is removed, for a new link in its place).
fn update_link_pin(pin: &Path, prog_fd: i32) -> anyhow::Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    match update_pinned_link(pin, prog_fd) {
        Ok(()) => Ok(true),
        Err(e) => {
            warn!(link = %pin.display(), error = %e, "replacing stale link pin");
            remove_link_pin(pin)?;
            Ok(false)
        }
    }
}

/// The names of the tcx programs that run before kproxy's program `name` on hook `ty` of
/// `ifname` (all of them when `name` is not there), and the id of kproxy's. A failed query (a
/// kernel without tcx, a gone device) reads as an empty hook.
fn tcx_ahead_of(ifname: &str, ty: TcAttachType, name: &str) -> (Vec<String>, Option<u32>) {
    let Ok((_, progs)) = SchedClassifier::query_tcx(ifname, ty) else { return (Vec::new(), None) };
    // The kernel keeps the first 15 bytes of a program's name.
    let ours = same_slot(name);
    let mut ahead = Vec::new();
    for p in progs {
        let n = p.name_as_str().unwrap_or("?");
        if ours.iter().any(|o| &o[..o.len().min(15)] == n) {
            return (ahead, Some(p.id()));
        }
        ahead.push(n.to_owned());
    }
    (ahead, None)
}

/// The programs that take one another's place on a hook: the two of an external device's TC
/// ingress (one where TC runs alone, one behind XDP), or `name` alone.
fn same_slot(name: &str) -> Vec<&str> {
    const EXT: [&str; 2] = [names::PROG_TC_EXT, names::PROG_TC_EXT_XDP];
    if EXT.contains(&name) { EXT.to_vec() } else { vec![name] }
}

/// Detaches the link pinned at `pin`, if any, and removes the pin.
fn remove_link_pin(pin: &Path) -> anyhow::Result<()> {
    if pin.exists()
        && let Err(e) = detach_pinned_link(pin)
    {
        // Removing the pin below still releases the link, only later (a link whose device
        // went is detached already).
        debug!(link = %pin.display(), error = %e, "BPF_LINK_DETACH failed");
    }
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

fn detach_xdp(pin_path: &Path, ifname: &str) -> anyhow::Result<()> {
    remove_link_pin(&xdp_link_pin(pin_path, ifname))
}

fn detach_tcx(pin_path: &Path, ifname: &str, ty: TcAttachType) -> anyhow::Result<()> {
    remove_link_pin(&tcx_link_pin(pin_path, ifname, ty))
}

/// Removes kproxy's clsact filters running program `name` from hook `ty` of `ifname`; whether
/// there were any (none, or no device: not an error).
fn detach_clsact(ifname: &str, ty: TcAttachType, name: &str) -> anyhow::Result<bool> {
    match tc::qdisc_detach_program(ifname, ty, name) {
        Ok(()) => Ok(true),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(TcError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("detaching {name} from {ifname} {ty:?}")),
    }
}

/// Deletes the `clsact` qdisc of `ifname` once kproxy removed its filters from it, if no other
/// owner's filter is left on either hook: the qdisc kproxy added for its filters goes with them
/// (as `tc qdisc del dev DEV clsact` would), one another owner still uses stays. An empty qdisc
/// costs packets nothing (the kernel skips a clsact hook without filters), so a failure is only
/// logged.
fn delete_empty_clsact(ifname: &str) {
    let Some(index) = ifindex(ifname) else { return };
    match crate::netdev::netlink::Socket::requests().and_then(|mut s| s.delete_empty_clsact(index))
    {
        Ok(true) => info!(device = ifname, "clsact qdisc left without filters removed"),
        Ok(false) => {}
        Err(e) => {
            warn!(device = ifname, error = %e, "clsact qdisc left without filters not removed")
        }
    }
}

fn detach_device(pin_path: &Path, ifname: &str) -> anyhow::Result<()> {
    // TC first: `kp_tc_ext_xdp` never runs without the XDP program whose marks it takes.
    for (ty, _) in TC_HOOKS {
        detach_tcx(pin_path, ifname, ty)?;
    }
    if ifindex(ifname).is_none() {
        return detach_xdp(pin_path, ifname);
    }
    let mut removed = false;
    for (ty, name) in [
        (TcAttachType::Ingress, names::PROG_TC_EXT),
        (TcAttachType::Ingress, names::PROG_TC_EXT_XDP),
        (TcAttachType::Ingress, names::PROG_TC_FROM_POD),
        (TcAttachType::Egress, names::PROG_TC_TO_POD),
    ] {
        removed |= detach_clsact(ifname, ty, name)?;
    }
    if removed {
        delete_empty_clsact(ifname);
    }
    detach_xdp(pin_path, ifname)
}

/// Names of the network devices of the current network namespace.
fn devices() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Checks every map pinned under `pin_path` as a load checks its own (type, sizes, and the
/// layout its BTF gives), for a reader that loads nothing (the CLI): a map another build left in
/// a layout this one would misread is refused with the field that differs, instead of being
/// shown in this build's layout.
pub fn check_pinned_layouts(pin_path: &Path) -> anyhow::Result<()> {
    let dir = maps_dir(pin_path);
    let built = super::btf::object_layouts(crate::EBPF_OBJECT)
        .context("reading the map layouts of the eBPF object's BTF")?;
    let mut btfs = super::btf::KernelBtfs::default();
    for spec in pinned_map_specs() {
        let pin = dir.join(spec.name);
        if pin.exists() {
            let (data, _) = check_pinned(&pin, spec)?;
            check_pinned_layout(&mut btfs, &pin, &data, built.get(spec.name))?;
        }
    }
    Ok(())
}

/// Removes every program attachment, link and pin kproxy made under `pin_path`: kproxy's TC
/// filters (found by program name) on every device of the current network namespace, the XDP
/// and tcx links pinned under `v1/links/`, and the map pins.
pub fn cleanup(pin_path: &Path) -> anyhow::Result<()> {
    for dev in devices() {
        detach_device(pin_path, &dev)?;
    }
    detach_cgroup_links(pin_path)?;
    let links = links_dir(pin_path);
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd {
            let e = e?;
            if device_link_pin(&e.file_name().to_string_lossy()).is_some() {
                remove_link_pin(&e.path())?;
            }
        }
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    let dir = maps_dir(pin_path);
    let calls = calls_dir(&dir);
    if let Ok(rd) = std::fs::read_dir(&calls) {
        for e in rd {
            std::fs::remove_file(e?.path())?;
        }
        std::fs::remove_dir(&calls).with_context(|| format!("removing {}", calls.display()))?;
    }
    for spec in pinned_map_specs() {
        match std::fs::remove_file(dir.join(spec.name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing pin {}", spec.name)),
        }
    }
    for old in other_versions(pin_path) {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    for d in [&dir, &pin_path.to_path_buf()] {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %d.display(), error = %e, "pin directory not removed (not empty?)")
            }
        }
    }
    info!(pin_path = %pin_path.display(), "datapath removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Bytes in the test binary's read-only image, as the object is in the agent's.
    static IMAGE: [u8; 256 * 1024] = {
        let mut a = [0u8; 256 * 1024];
        let mut i = 0;
        while i < a.len() {
            a[i] = (i % 251) as u8 + 1;
            i += 1;
        }
        a
    };

    /// How many of the whole pages inside `bytes` this process has resident (bit 63 of each
    /// page's /proc/self/pagemap entry).
    fn resident_pages(bytes: &[u8]) -> usize {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let page = 4096;
        let first = (bytes.as_ptr() as usize).div_ceil(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page;
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start(first as u64 * 8)).unwrap();
        let mut buf = vec![0u8; (end - first) * 8];
        f.read_exact(&mut buf).unwrap();
        buf.chunks(8).filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1).count()
    }

    /// A pin that fails leaves its family's partner behind too, whichever of the two failed and
    /// whether this start or an earlier one pinned the partner; other maps stay taken. A
    /// partner that cannot be unpinned stops the load.
    #[test]
    fn a_failed_pin_leaves_its_family_partner_behind_too() {
        let dir = std::env::temp_dir().join(format!("kproxy-pin-taken-{}", std::process::id()));
        let all =
            [names::SERVICES4, names::BACKENDS4, names::SERVICES6, names::BACKENDS6, names::CT4];
        let fresh = || {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        };
        let takes = |names: &[&'static str]| -> Vec<(&'static str, (), PathBuf)> {
            names.iter().map(|n| (*n, (), dir.join(n))).collect()
        };
        // Written as a file where the real pin writes the map; refused for `fail`; a directory
        // (which cannot be unpinned as a file) for `stuck`.
        let pin = |fail: &'static str, stuck: &'static str| {
            move |_: &(), to: &Path| -> anyhow::Result<()> {
                if to.ends_with(fail) {
                    bail!("pin refused");
                }
                if to.ends_with(stuck) {
                    std::fs::create_dir(to)?;
                } else {
                    std::fs::write(to, b"map")?;
                }
                Ok(())
            }
        };
        let sorted = |mut v: Vec<&'static str>| {
            v.sort();
            v
        };
        // The second of the family fails: the first is unpinned again.
        for failing in [names::BACKENDS4, names::SERVICES4] {
            fresh();
            let mut left = Vec::new();
            let taken =
                pin_taken(takes(&all), Vec::new(), &mut left, pin(failing, "none")).unwrap();
            assert_eq!(sorted(left), sorted(vec![names::SERVICES4, names::BACKENDS4]), "{failing}");
            assert_eq!(taken, 3, "{failing}");
            assert!(!dir.join(names::SERVICES4).exists() && !dir.join(names::BACKENDS4).exists());
            for n in [names::SERVICES6, names::BACKENDS6, names::CT4] {
                assert!(dir.join(n).exists(), "{n} stays taken");
            }
        }
        // An earlier start pinned the services and stopped; this one fails on the backends.
        fresh();
        std::fs::write(dir.join(names::SERVICES4), b"map").unwrap();
        let earlier = vec![(names::SERVICES4, dir.join(names::SERVICES4))];
        let mut left = Vec::new();
        let taken = pin_taken(
            takes(&[names::BACKENDS4, names::CT4]),
            earlier,
            &mut left,
            pin(names::BACKENDS4, "none"),
        )
        .unwrap();
        assert_eq!(taken, 1);
        assert_eq!(sorted(left), sorted(vec![names::SERVICES4, names::BACKENDS4]));
        assert!(!dir.join(names::SERVICES4).exists(), "the earlier start's pin is removed");
        // The backends left before pinning (another layout), the services an earlier start
        // pinned: unpinned, and named once.
        fresh();
        std::fs::write(dir.join(names::SERVICES4), b"map").unwrap();
        let earlier = vec![(names::SERVICES4, dir.join(names::SERVICES4))];
        let mut left = vec![names::BACKENDS4, names::SERVICES4];
        pin_taken(takes(&[names::CT4]), earlier, &mut left, pin("none", "none")).unwrap();
        assert_eq!(left, [names::BACKENDS4, names::SERVICES4]);
        assert!(!dir.join(names::SERVICES4).exists());
        // The partner cannot be unpinned: an error, not a family half taken.
        fresh();
        let mut left = Vec::new();
        let e =
            pin_taken(takes(&all), Vec::new(), &mut left, pin(names::BACKENDS4, names::SERVICES4))
                .unwrap_err();
        assert!(format!("{e:#}").contains("without its partner"), "{e:#}");
        // Nothing fails: everything is taken.
        fresh();
        let mut left = Vec::new();
        assert_eq!(pin_taken(takes(&all), Vec::new(), &mut left, pin("none", "none")).unwrap(), 5);
        assert!(left.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A map left behind before pinning takes its partner with it, where the other version has
    /// one.
    #[test]
    fn a_map_left_behind_takes_its_partner_out_of_the_takes() {
        let takes_of = |names: &[&'static str]| -> Vec<(&'static str, (), PathBuf)> {
            names.iter().map(|n| (*n, (), PathBuf::from(n))).collect()
        };
        let mut takes =
            takes_of(&[names::SERVICES4, names::SERVICES6, names::BACKENDS6, names::CT4]);
        let mut left = vec![names::BACKENDS4];
        leave_partners(&mut takes, &mut left, |_| true);
        let kept: Vec<&str> = takes.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(kept, [names::SERVICES6, names::BACKENDS6, names::CT4]);
        assert_eq!(left, [names::BACKENDS4, names::SERVICES4]);
        // The other version had no IPv6 services map: nothing more to leave.
        let mut takes = takes_of(&[names::SERVICES4, names::BACKENDS4]);
        let mut left = vec![names::BACKENDS6];
        leave_partners(&mut takes, &mut left, |n| n != names::SERVICES6);
        assert_eq!(takes.len(), 2);
        assert_eq!(left, [names::BACKENDS6]);
    }

    #[test]
    fn the_object_pages_are_given_back_and_read_again_on_use() {
        let sum = |b: &[u8]| b.iter().map(|x| u64::from(std::hint::black_box(*x))).sum::<u64>();
        let before = sum(&IMAGE);
        let pages = resident_pages(&IMAGE);
        assert!(pages >= 60, "{pages} pages resident after a read");
        release_object_pages(&IMAGE);
        assert_eq!(resident_pages(&IMAGE), 0);
        // Read again from the file, unchanged.
        assert_eq!(sum(&IMAGE), before);
        assert_eq!(IMAGE[4096 * 3 + 7], ((4096 * 3 + 7) % 251) as u8 + 1);
    }

    fn sizing(ratio: f64) -> MapSizing {
        MapSizing {
            ratio,
            services: None,
            backends: None,
            conntrack: None,
            affinity: None,
            ipv6: true,
        }
    }

    #[test]
    fn link_pins_name_their_kind_and_device() {
        let pin = Path::new("/sys/fs/bpf/kp");
        for (ty, want) in
            [(TcAttachType::Ingress, "tcx-ingress"), (TcAttachType::Egress, "tcx-egress")]
        {
            let p = tcx_link_pin(pin, "lxc-a1", ty);
            assert_eq!(p, links_dir(pin).join(format!("{want}-lxc-a1")));
            let file = p.file_name().unwrap().to_str().unwrap();
            assert_eq!(device_link_pin(file), Some((want, "lxc-a1")));
        }
        let xdp = xdp_link_pin(pin, "eth0");
        assert_eq!(
            device_link_pin(xdp.file_name().unwrap().to_str().unwrap()),
            Some(("xdp", "eth0"))
        );
        for other in ["cgroup-connect4", "xdp-", "tcx-ingress", "tcx-other-eth0", "xdpeth0"] {
            assert_eq!(device_link_pin(other), None, "{other}");
        }
    }

    #[test]
    fn the_estimate_matches_what_the_kernel_reports() {
        // Linux 6.18 reported 62,915,456 bytes for kp_ct4 and 25,166,896 for kp_svc4 at their
        // defaults.
        let [svc, _, ct, ..] = &MAP_SPECS;
        let ct_bytes = hash_map_bytes(ct, 524_288) as f64;
        assert!((ct_bytes / 62_915_456.0 - 1.0).abs() < 0.01, "{ct_bytes}");
        let svc_bytes = hash_map_bytes(svc, 262_144) as f64;
        assert!((svc_bytes / 25_166_896.0 - 1.0).abs() < 0.01, "{svc_bytes}");
    }

    #[test]
    fn per_node_maps_follow_the_node_memory_within_bounds() {
        let d = MapSizes::default();
        assert_eq!(sizing(0.0).resolve(24 * GIB), d);
        // 0.25% of 24 GiB is 61 MiB for the per-node maps (the defaults take 129 MiB).
        let s = sizing(DEFAULT_MAP_RATIO).resolve(24 * GIB);
        assert!((240_000..260_000).contains(&s.conntrack), "{s:?}");
        assert_eq!(u64::from(s.affinity), u64::from(s.conntrack) * 65_536 / 524_288, "{s:?}");
        assert_eq!((s.services, s.backends), (d.services, d.backends));
        assert!(estimated_bytes(&s) < estimated_bytes(&d));
        // Twice the memory, twice the entries.
        let s2 = sizing(DEFAULT_MAP_RATIO).resolve(48 * GIB);
        assert!((s2.conntrack as i64 - 2 * s.conntrack as i64).abs() <= 2, "{s2:?}");
        // Small nodes get the floors, huge ones the ceilings.
        let small = sizing(DEFAULT_MAP_RATIO).resolve(4 * GIB);
        assert_eq!((small.conntrack, small.affinity), (CONNTRACK_MIN, AFFINITY_MIN));
        let huge = sizing(DEFAULT_MAP_RATIO).resolve(1 << 50);
        assert_eq!((huge.conntrack, huge.affinity), (CONNTRACK_MAX, AFFINITY_MAX));
        // The socket-LB map follows the connection-tracking capacity.
        assert_eq!(s.of(names::SOCK4), Some(s.conntrack / 4));
    }

    #[test]
    fn ipv6_maps_take_one_entry_while_ipv6_is_off() {
        let on = sizing(DEFAULT_MAP_RATIO).resolve(24 * GIB);
        let off = MapSizing { ipv6: false, ..sizing(DEFAULT_MAP_RATIO) }.resolve(24 * GIB);
        for name in IPV6_SIZED {
            assert_eq!(off.of(name), Some(IPV6_OFF_ENTRIES), "{name}");
            assert_ne!(on.of(name), Some(IPV6_OFF_ENTRIES), "{name}");
        }
        // The IPv4 maps and the IPv6 counters and configuration are not affected.
        assert_eq!(off.of(names::CT4), on.of(names::CT4));
        assert_eq!(off.of(names::COUNTERS6), None);
        assert_eq!(off.of(names::CONFIG6), None);
        // With IPv6 off the IPv6 maps take a few KiB of the estimate.
        let v6 = |s: &MapSizes| -> u64 {
            MAP_SPECS6.iter().filter_map(|m| s.of(m.name).map(|e| hash_map_bytes(m, e))).sum()
        };
        assert!(v6(&off) < 4 << 10, "{}", v6(&off));
        assert!(estimated_bytes(&on) - estimated_bytes(&off) > v6(&on) / 2);
        assert!(estimated_bytes(&on) > 3 * estimated_bytes(&off) / 2);
    }

    #[test]
    fn explicit_capacities_win_over_the_ratio() {
        let s = MapSizing {
            ratio: DEFAULT_MAP_RATIO,
            services: Some(1000),
            backends: Some(2000),
            conntrack: Some(3000),
            affinity: Some(4000),
            ipv6: true,
        }
        .resolve(24 * GIB);
        assert_eq!(
            s,
            MapSizes {
                services: 1000,
                backends: 2000,
                conntrack: 3000,
                affinity: 4000,
                ipv6: true
            }
        );
        assert_eq!(s.of(names::SOCK4), Some(4096));
    }
}
