//! Network devices of the agent's network namespace and the agent's attachments to them.
//!
//! - Names, indexes and IPv4 addresses, read with libc and netlink, so the answer is the current
//!   namespace's even when /sys belongs to another one (`nsenter --net`); [`AddrWatch`] follows
//!   address changes (`RTNLGRP_IPV4_IFADDR`).
//! - [`Devices`]: keeps kproxy's programs attached to the NodePort devices and to every pod
//!   interface matching the `--pod-devices` globs. A thread follows link changes
//!   (`RTNLGRP_LINK`), so a new pod veth gets its programs as soon as the kernel announces it, a
//!   NodePort device deleted and created again (same name, new index) gets XDP and TC again, and
//!   interfaces that go away are forgotten (the kernel drops their filters and detaches their
//!   links; kproxy removes the XDP and tcx link pins). A slow periodic rescan is the backstop for
//!   anything missed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::CStr,
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::{
    dataplane::loader::{self, Datapath, ExternalMode},
    metrics::Metrics,
};

pub mod netlink;

/// Every interface: name → ifindex.
pub fn interfaces() -> std::io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = BTreeMap::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// IPv4 addresses by interface name, in the kernel's order.
pub fn ipv4_addrs() -> std::io::Result<BTreeMap<String, Vec<Ipv4Addr>>> {
    let v4 = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(_) => None,
    };
    let all = if_addrs(libc::AF_INET)?;
    Ok(all.into_iter().map(|(n, l)| (n, l.into_iter().filter_map(v4).collect())).collect())
}

/// The global IPv6 addresses of `devices`, in device order (IPv6 NodePort frontends; the first
/// one is the IPv6 source-NAT address): no loopback, link-local, multicast or IPv4-mapped one.
pub fn ipv6_nodeport_addrs(devices: &[String]) -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    let all = if_addrs(libc::AF_INET6)?;
    let global = |a: &std::net::IpAddr| match a {
        std::net::IpAddr::V6(a) => (!a.is_loopback()
            && !a.is_unicast_link_local()
            && !a.is_multicast()
            && !a.is_unspecified()
            && a.to_ipv4_mapped().is_none())
        .then_some(*a),
        std::net::IpAddr::V4(_) => None,
    };
    Ok(devices.iter().flat_map(|d| all.get(d).into_iter().flatten().filter_map(global)).collect())
}

/// Every local IPv6 address of the node (all interfaces'): never a closed service address.
pub fn local_addrs6() -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    let all = if_addrs(libc::AF_INET6)?;
    let mut out: Vec<std::net::Ipv6Addr> = all
        .into_values()
        .flatten()
        .filter_map(|a| match a {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Addresses of `family` (`AF_INET` or `AF_INET6`) by interface name, in the kernel's order.
fn if_addrs(family: i32) -> std::io::Result<BTreeMap<String, Vec<std::net::IpAddr>>> {
    let mut out: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
    // SAFETY: getifaddrs fills a linked list we only read and then free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            let fam =
                if ifa.ifa_addr.is_null() { -1 } else { i32::from((*ifa.ifa_addr).sa_family) };
            if fam == family {
                let addr = if fam == libc::AF_INET {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into()
                } else {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into()
                };
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                out.entry(name).or_default().push(addr);
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// The node's IPv4 addresses, as the agent uses them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    /// The addresses of the NodePort devices, in device order (NodePort frontends; the first one
    /// is the source-NAT address).
    pub nodeport: Vec<Ipv4Addr>,
    /// Every address of every interface of the node (kube-proxy's local addresses, `fib daddr
    /// type local`), sorted: traffic to one of them on a port no service uses is the node's, even
    /// when a service uses the address as an externalIP or load-balancer IP.
    pub local: Vec<Ipv4Addr>,
}

/// The node's addresses (see [`NodeAddrs`]) on `devices`.
pub fn node_addrs(devices: &[String]) -> std::io::Result<NodeAddrs> {
    Ok(split_node_addrs(&ipv4_addrs()?, devices))
}

/// [`NodeAddrs`] from the addresses by interface.
fn split_node_addrs(all: &BTreeMap<String, Vec<Ipv4Addr>>, devices: &[String]) -> NodeAddrs {
    let nodeport = devices.iter().flat_map(|d| all.get(d).cloned().unwrap_or_default()).collect();
    let mut local: Vec<Ipv4Addr> = all.values().flatten().copied().collect();
    local.sort_unstable();
    local.dedup();
    NodeAddrs { nodeport, local }
}

/// Wakes the agent when an address is added or removed anywhere in its network namespace
/// (the kernel's `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR` notifications, read by a thread of its own), so the node
/// addresses are read again at once instead of on a timer. The thread ends with the watch.
pub struct AddrWatch {
    wake: Arc<tokio::sync::Notify>,
}

impl AddrWatch {
    /// Subscribes to the address notifications and starts the thread reading them.
    pub fn start() -> std::io::Result<Self> {
        let mut sock =
            netlink::Socket::subscribe(&[libc::RTNLGRP_IPV4_IFADDR, libc::RTNLGRP_IPV6_IFADDR])?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let weak = Arc::downgrade(&wake);
        std::thread::Builder::new().name("kproxy-addrs".into()).spawn(move || {
            loop {
                let waited = sock.wait(Duration::from_secs(1));
                let Some(wake) = weak.upgrade() else { return };
                match waited {
                    Ok(netlink::Wait::Events(evs)) => {
                        let addrs = evs.iter().any(|e| {
                            matches!(
                                e,
                                netlink::Event::NewAddress(_) | netlink::Event::DelAddress(_)
                            )
                        });
                        if addrs {
                            debug!(events = evs.len(), "address changes");
                            wake.notify_one();
                        }
                    }
                    // Some were lost: read the addresses anyway.
                    Ok(netlink::Wait::Lost) => wake.notify_one(),
                    Ok(netlink::Wait::Timeout) => {}
                    Err(e) => {
                        warn!(error = %e, "reading address notifications");
                        wake.notify_one();
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })?;
        Ok(Self { wake })
    }

    /// Resolves when addresses changed since the last call (at once when they changed in
    /// between). Cancel-safe.
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

/// Shell-style match with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `name` matches any of `globs`.
pub fn matches_any(globs: &[String], name: &str) -> bool {
    globs.iter().any(|g| glob_match(g, name))
}

/// How long a failed attachment waits before it is tried again on the same interface index.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// What [`Devices`] attaches where.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// External (NodePort) devices, by name (`--nodeport-devices`).
    pub external: Vec<String>,
    /// Globs of the host-side pod interfaces (`--pod-devices`); external devices never match.
    pub pod_globs: Vec<String>,
    /// How the external devices are served.
    pub mode: ExternalMode,
    /// Period of the full rescan behind the link notifications.
    pub rescan: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    External,
    Pod,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::External => "external",
            Kind::Pod => "pod",
        }
    }
}

/// The attachment bookkeeping, owned by the device thread.
struct State {
    spec: DeviceSpec,
    datapath: Datapath,
    metrics: Arc<Metrics>,
    /// Attached interfaces: name → (kind, ifindex at attach time).
    attached: BTreeMap<String, (Kind, u32)>,
    /// Failed attempts: name → (ifindex, when), retried after [`RETRY_AFTER`] or when the index
    /// changes.
    failed: HashMap<String, (u32, Instant)>,
    /// External devices reported missing (logged once until they come back).
    missing: BTreeSet<String>,
    /// Earlier loads' tail-call tables may still be pinned: each goes once no program of its
    /// load runs on any device ([`State::retire_old_calls`]).
    old_calls: bool,
    /// The last attempt to remove them.
    last_retire: Option<Instant>,
}

impl State {
    fn kind(&self, name: &str) -> Option<Kind> {
        if self.spec.external.iter().any(|d| d == name) {
            Some(Kind::External)
        } else if matches_any(&self.spec.pod_globs, name) {
            Some(Kind::Pod)
        } else {
            None
        }
    }

    /// Interface `name` exists with `index`: make sure kproxy's programs are on it.
    fn present(&mut self, name: &str, index: u32) {
        // A renamed interface: its old name is gone (its filters moved with it, and are ours
        // again below only if the new name matches too).
        let renamed: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, (_, i))| *i == index && n.as_str() != name)
            .map(|(n, _)| n.clone())
            .collect();
        for old in renamed {
            self.gone(&old, Some(index));
        }
        let Some(kind) = self.kind(name) else { return };
        self.missing.remove(name);
        let before = self.attached.get(name).map(|(_, i)| *i);
        if before == Some(index) {
            return;
        }
        if let Some((fidx, at)) = self.failed.get(name)
            && *fidx == index
            && at.elapsed() < RETRY_AFTER
        {
            return;
        }
        let started = Instant::now();
        let result = match kind {
            Kind::External => self.datapath.attach_external(name, self.spec.mode).map(drop),
            Kind::Pod => self.datapath.attach_pod(name),
        };
        let took_us = started.elapsed().as_micros() as u64;
        match result {
            Ok(()) => {
                let index = ifindex(name).unwrap_or(index);
                self.attached.insert(name.to_owned(), (kind, index));
                self.failed.remove(name);
                match before {
                    Some(old) => info!(
                        device = %name,
                        kind = kind.name(),
                        ifindex = index,
                        old_ifindex = old,
                        took_us,
                        "device recreated: programs attached again"
                    ),
                    None => {
                        info!(device = %name, kind = kind.name(), ifindex = index, took_us, "programs attached")
                    }
                }
            }
            Err(e) => {
                warn!(device = %name, kind = kind.name(), ifindex = index, error = format!("{e:#}"), "attaching programs failed; retrying later");
                self.failed.insert(name.to_owned(), (index, Instant::now()));
                self.metrics.device_attach_failed();
            }
        }
    }

    /// Interface `name` went away (`index`: the index that went, when known).
    fn gone(&mut self, name: &str, index: Option<u32>) {
        let Some(&(kind, recorded)) = self.attached.get(name) else {
            if self.failed.get(name).is_some_and(|(i, _)| index.is_none_or(|g| g == *i)) {
                self.failed.remove(name);
            }
            if self.kind(name) == Some(Kind::External) && self.missing.insert(name.to_owned()) {
                warn!(device = %name, "NodePort device missing: waiting for it to appear");
            }
            return;
        };
        if index.is_some_and(|i| i != recorded) {
            return; // news about an older interface of that name
        }
        self.attached.remove(name);
        self.failed.remove(name);
        // The kernel drops TC filters with the device; what remains are link pins, removed
        // here unless an interface of that name already exists again (it gets attached anew).
        if ifindex(name).is_none()
            && let Err(e) = self.datapath.detach(name)
        {
            warn!(device = %name, error = format!("{e:#}"), "cleaning up after a vanished device");
        }
        match kind {
            Kind::External => {
                self.missing.insert(name.to_owned());
                warn!(device = %name, ifindex = recorded, "NodePort device gone: programs detached; waiting for it to come back")
            }
            Kind::Pod => {
                info!(device = %name, kind = kind.name(), ifindex = recorded, "interface gone: programs detached")
            }
        }
    }

    /// Compares every interface with the bookkeeping.
    fn rescan(&mut self) {
        let ifs = match interfaces() {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot list interfaces");
                return;
            }
        };
        // A device whose attachment failed and that is gone now runs nothing.
        self.failed.retain(|name, _| ifs.contains_key(name));
        let stale: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|(n, (_, i))| ifs.get(*n) != Some(i))
            .map(|(n, (_, i))| (n.clone(), *i))
            .collect();
        for (name, index) in stale {
            self.gone(&name, Some(index));
        }
        for (name, index) in &ifs {
            self.present(name, *index);
        }
        for dev in self.spec.external.clone() {
            if !ifs.contains_key(&dev) {
                self.gone(&dev, None);
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let pods: std::collections::BTreeSet<u32> =
            self.attached.values().filter(|(k, _)| *k == Kind::Pod).map(|(_, i)| *i).collect();
        if let Err(e) = self.datapath.set_pod_devs(&pods) {
            warn!(error = format!("{e:#}"), "recording the pod interfaces for eBPF host routing");
        }
        let hooked: std::collections::BTreeSet<u32> =
            self.attached.values().map(|(_, i)| *i).collect();
        if let Err(e) = self.datapath.set_hook_devs(&hooked) {
            // Packets entering pods then take the full path there, as before: slower, not wrong.
            warn!(error = format!("{e:#}"), "recording the devices that carry kproxy's programs");
        }
        let ext = self.attached.values().filter(|(k, _)| *k == Kind::External).count();
        self.metrics.set_devices(ext, self.attached.len() - ext, self.missing.len());
        self.retire_old_calls();
    }

    /// Removes the tail-call tables of earlier loads that no device runs the programs of any
    /// more ([`Datapath::retire_old_calls`]): a device whose attachment failed may still run an
    /// earlier load's programs, whose slow paths need those tables. Each attempt lists the
    /// kernel's programs: while tables are kept (a device that keeps failing), it runs at most
    /// once a second, however often devices change.
    fn retire_old_calls(&mut self) {
        if !self.old_calls || self.last_retire.is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_retire = Some(Instant::now());
        self.retire_now();
    }

    /// [`Self::retire_old_calls`] without the rate limit; returns what it kept.
    fn retire_now(&mut self) -> Vec<std::path::PathBuf> {
        match self.datapath.retire_old_calls(self.failed.is_empty()) {
            Ok(kept) => {
                self.old_calls = !kept.is_empty();
                kept
            }
            Err(e) => {
                warn!(error = format!("{e:#}"), "removing old tail-call tables");
                Vec::new()
            }
        }
    }

    fn apply(&mut self, events: Vec<netlink::Event>) {
        for ev in events {
            match ev {
                netlink::Event::NewLink(l) => self.present(&l.name, l.index),
                netlink::Event::DelLink(l) => self.gone(&l.name, Some(l.index)),
                netlink::Event::NewAddress(_) | netlink::Event::DelAddress(_) => {}
            }
        }
        self.publish();
    }
}

/// Keeps kproxy's programs attached to the devices of a [`DeviceSpec`], from a thread of its own
/// (attaching is blocking netlink work). Dropping it stops the thread; the attachments stay.
pub struct Devices {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Devices {
    /// Attaches the external devices and every matching pod interface, and follows link
    /// changes from then on. A NodePort device that does not exist or cannot be attached does not
    /// stop the agent: it is warned about, counted (`kproxy_nodeport_devices_missing`,
    /// `kproxy_device_attach_errors_total`) and attached when it appears or on the next retry.
    pub fn start(
        mut datapath: Datapath,
        spec: DeviceSpec,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        // Subscribe before the first scan, so nothing that appears in between is missed.
        let events = match netlink::Socket::link_events() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no netlink link notifications: rescanning devices every second");
                None
            }
        };
        let attached = BTreeMap::new();
        sweep_stale_link_pins(&mut datapath, &spec.external);
        let old_calls = !datapath.old_calls().is_empty();
        let mut state = State {
            spec,
            datapath,
            metrics,
            attached,
            failed: HashMap::new(),
            missing: BTreeSet::new(),
            old_calls,
            last_retire: None,
        };
        // Earlier loads' tail-call tables go at the end of this scan where no device runs
        // their programs any more, the others once none does.
        state.rescan();
        // A clsact filter this scan replaced releases its program after an RCU grace period:
        // its tables are in use until then.
        let mut kept = Vec::new();
        for _ in 0..20 {
            if !state.old_calls {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
            kept = state.retire_now();
        }
        if state.old_calls {
            let tables: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
            let devices: Vec<&str> = state.failed.keys().map(String::as_str).collect();
            warn!(
                tables = tables.join(","),
                failed_devices = devices.join(","),
                "earlier loads' tail-call tables kept: programs of theirs still run (on a device \
                 whose attachment failed, or one kproxy no longer manages)"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kproxy-devices".into())
            .spawn(move || follow(state, events, &flag))
            .context("starting the device thread")?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Detaches the link pins left for devices that no longer exist (gone while no agent ran), and
/// the XDP link pins of devices that are no longer external devices.
fn sweep_stale_link_pins(datapath: &mut Datapath, external: &[String]) {
    let dir = crate::dataplane::bpf::maps_dir(datapath.pin_path()).join("links");
    let Ok(rd) = std::fs::read_dir(&dir) else { return };
    let mut stale = BTreeMap::new();
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((kind, dev)) = loader::device_link_pin(&file) else { continue };
        let exists = ifindex(dev).is_some();
        if exists && (kind != "xdp" || external.iter().any(|d| d == dev)) {
            continue;
        }
        stale.entry(dev.to_owned()).or_insert(if exists { "no longer external" } else { "gone" });
    }
    for (dev, why) in stale {
        match datapath.detach(&dev) {
            Ok(()) => info!(device = %dev, why, "removed the link pins of a device"),
            Err(e) => warn!(device = %dev, error = format!("{e:#}"), "removing stale link pins"),
        }
    }
}

/// The device thread: link notifications as they come, a full rescan every `spec.rescan`.
fn follow(mut state: State, mut events: Option<netlink::Socket>, stop: &AtomicBool) {
    let period = if events.is_some() { state.spec.rescan } else { Duration::from_secs(1) };
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Relaxed) {
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
        match events.as_mut().map(|s| s.wait(wait)) {
            Some(Ok(netlink::Wait::Events(evs))) => {
                debug!(events = evs.len(), "link changes");
                state.apply(evs);
            }
            Some(Ok(netlink::Wait::Timeout)) => {}
            Some(Ok(netlink::Wait::Lost)) => {
                warn!(
                    "link notifications lost (socket buffer overflow or undecodable): rescanning"
                );
                state.rescan();
            }
            Some(Err(e)) => {
                warn!(error = %e, "reading link notifications");
                std::thread::sleep(wait);
            }
            None => std::thread::sleep(wait),
        }
        if Instant::now() >= next {
            state.rescan();
            next = Instant::now() + period;
        }
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// A program of kproxy's found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    /// Program name (`kp_...`).
    pub program: String,
    /// Kernel program id.
    pub id: u32,
    /// XDP mode (`native`, `generic`, ...) or TC hook (`ingress`, `egress`).
    pub hook: &'static str,
    /// How it is attached: `link` (XDP), `tcx` or `clsact` (TC).
    pub via: &'static str,
    /// Other owners' programs that run before it on the hook, in order (TC: the tcx programs
    /// in front of a tcx link, every tcx program and the filters in front of a clsact filter).
    /// One that ends the hook keeps its packets from kproxy (`--tcx-anchor head`).
    pub after: Vec<String>,
}

/// kproxy's programs on one device, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAttachments {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// XDP program, if it is kproxy's.
    pub xdp: Option<AttachedProgram>,
    /// kproxy's TC programs (ingress, then egress; tcx links before clsact filters).
    pub tc: Vec<AttachedProgram>,
}

/// What `kproxy device list` shows: the devices carrying kproxy programs in this network
/// namespace, and link pins under the pin path whose device no longer has the program (left
/// behind by a device that went away while no agent ran).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttachmentReport {
    /// Devices with at least one kproxy program.
    pub devices: Vec<DeviceAttachments>,
    /// File names of the stale pins under `v1/links/` (`xdp-<device>`,
    /// `tcx-<hook>-<device>`).
    pub stale_link_pins: Vec<String>,
}

/// Whether a program name is one of kproxy's.
fn is_kproxy_program(name: &str) -> bool {
    use kproxy_common::names::*;
    name == PROG_XDP_EXT || TC_ENTRY_PROGS.contains(&name)
}

/// Reads kproxy's attachments from the kernel (netlink link and filter dumps), with or without a
/// running agent.
pub fn attachments(pin_path: &Path) -> anyhow::Result<AttachmentReport> {
    let mut sock = netlink::Socket::requests().context("opening a netlink socket")?;
    let links = sock.links().context("listing interfaces")?;
    let mut prog_names: Option<HashMap<u32, String>> = None;
    let mut report = AttachmentReport::default();
    for link in links {
        let mut tc = Vec::new();
        for (hook, (ty, name)) in
            [netlink::TcHook::Ingress, netlink::TcHook::Egress].into_iter().zip(loader::TC_HOOKS)
        {
            // tcx programs run first (a kernel without tcx refuses the query: none), then the
            // clsact filters; other owners' programs are noted where they run before kproxy's.
            let tcx = aya::programs::SchedClassifier::query_tcx(&link.name, ty)
                .map(|(_, progs)| progs)
                .unwrap_or_default();
            let mut after = Vec::new();
            let mut seen = |program: String, id: u32, via: &'static str| {
                if is_kproxy_program(&program) {
                    tc.push(AttachedProgram { program, id, hook: name, via, after: after.clone() });
                } else {
                    after.push(program);
                }
            };
            for p in tcx {
                seen(p.name_as_str().unwrap_or("?").to_owned(), p.id(), "tcx");
            }
            let filters = sock
                .tc_filters(link.index, hook)
                .with_context(|| format!("listing TC filters of {}", link.name))?;
            for f in filters {
                seen(f.name, f.prog_id, "clsact");
            }
        }
        let xdp = link.xdp.and_then(|x| {
            let names = prog_names.get_or_insert_with(|| {
                aya::programs::loaded_programs()
                    .flatten()
                    .filter_map(|p| Some((p.id(), p.name_as_str()?.to_owned())))
                    .collect()
            });
            let program = names.get(&x.prog_id)?.clone();
            is_kproxy_program(&program).then_some(AttachedProgram {
                program,
                id: x.prog_id,
                hook: x.mode_name(),
                via: "link",
                after: Vec::new(),
            })
        });
        if xdp.is_some() || !tc.is_empty() {
            report.devices.push(DeviceAttachments {
                name: link.name,
                ifindex: link.index,
                xdp,
                tc,
            });
        }
    }
    let links_dir = crate::dataplane::bpf::maps_dir(pin_path).join("links");
    if let Ok(rd) = std::fs::read_dir(&links_dir) {
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some((kind, dev)) = loader::device_link_pin(&file) else { continue };
            let device = report.devices.iter().find(|d| d.name == dev);
            let live = device.is_some_and(|d| match kind {
                "xdp" => d.xdp.is_some(),
                tcx => d.tc.iter().any(|p| p.via == "tcx" && tcx.ends_with(p.hook)),
            });
            if !live {
                report.stale_link_pins.push(file);
            }
        }
    }
    report.stale_link_pins.sort();
    Ok(report)
}

impl AttachmentReport {
    /// A table for `kproxy device list`.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{:<16} {:>7}  {:<22} {:<24} {}\n",
            "DEVICE", "IFINDEX", "XDP", "TC INGRESS", "TC EGRESS"
        );
        for d in &self.devices {
            let xdp = d.xdp.as_ref().map_or("-".into(), |x| format!("{} ({})", x.program, x.hook));
            let tc = |hook: &str| {
                let v: Vec<String> =
                    d.tc.iter()
                        .filter(|p| p.hook == hook)
                        .map(|p| match p.after.as_slice() {
                            [] => format!("{} ({})", p.program, p.via),
                            a => format!("{} ({}, after {})", p.program, p.via, a.join("+")),
                        })
                        .collect();
                if v.is_empty() { "-".to_string() } else { v.join(",") }
            };
            let _ = writeln!(
                out,
                "{:<16} {:>7}  {:<22} {:<24} {}",
                d.name,
                d.ifindex,
                xdp,
                tc("ingress"),
                tc("egress")
            );
        }
        if !self.stale_link_pins.is_empty() {
            let _ =
                writeln!(out, "stale link pins (device gone): {}", self.stale_link_pins.join(", "));
        }
        out
    }

    /// JSON for `kproxy device list -o json`.
    pub fn json(&self) -> Value {
        let prog = |p: &AttachedProgram| json!({"program": p.program, "id": p.id, "hook": p.hook, "via": p.via, "after": p.after});
        json!({
            "devices": self.devices.iter().map(|d| json!({
                "name": d.name,
                "ifindex": d.ifindex,
                "xdp": d.xdp.as_ref().map(prog),
                "tc": d.tc.iter().map(prog).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "stale_link_pins": self.stale_link_pins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("vp*", "vp0", true),
            ("vp*", "vp", true),
            ("vp*", "eth0", false),
            ("veth*", "vp1", false),
            ("lxc?", "lxc1", true),
            ("lxc?", "lxc12", false),
            ("*pod*", "mypod7", true),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} {n}");
        }
        assert!(matches_any(&["x*".into(), "vp*".into()], "vp3"));
    }

    #[test]
    fn loopback_is_listed_with_its_address() {
        let ifs = interfaces().unwrap();
        assert!(ifs.contains_key("lo"), "{ifs:?}");
        let addrs = ipv4_addrs().unwrap();
        // lo may be down in a bare namespace, but if it has an address it is 127.0.0.1.
        if let Some(a) = addrs.get("lo") {
            assert!(a.contains(&Ipv4Addr::LOCALHOST), "{a:?}");
        }
        assert!(node_addrs(&["no-such-dev".into()]).unwrap().nodeport.is_empty());
    }

    /// NodePort addresses are the NodePort devices' ones; local addresses are every interface's.
    #[test]
    fn local_addresses_are_every_interface_s() {
        let a = |s: &str| -> Ipv4Addr { s.parse().unwrap() };
        let all: BTreeMap<String, Vec<Ipv4Addr>> = [
            ("eth0".to_string(), vec![a("198.18.0.10"), a("198.18.0.20")]),
            ("lo".to_string(), vec![a("127.0.0.1")]),
            ("vip0".to_string(), vec![a("198.18.200.20"), a("198.18.0.10")]),
        ]
        .into();
        let n = split_node_addrs(&all, &["eth0".into()]);
        assert_eq!(n.nodeport, [a("198.18.0.10"), a("198.18.0.20")]);
        assert_eq!(
            n.local,
            [a("127.0.0.1"), a("198.18.0.10"), a("198.18.0.20"), a("198.18.200.20")]
        );
    }
}
