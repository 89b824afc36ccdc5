//! The lab: a virtual kproxy cluster made of network namespaces on this machine.
//!
//! ```text
//!  client ns (198.18.0.2) ── eth0 ─┐
//!                                  │   underlay ns: bridge br0 (198.18.0.0/24, no address)
//!  node-i ns (198.18.0.(10+i)) ─ eth0 ─┘
//!      ├─ vp{j} ── eth0  pod ns node-i-pod-j (198.18.(100+i).(10+j))
//!      └─ routes to the other nodes' pod CIDRs via their underlay address (host-gw)
//! ```
//!
//! Addressing follows the shared design: pod CIDR of node i is 198.18.(100+i).0/24, ClusterIPs
//! are in 198.19.0.0/16 (nothing routes them; only the datapath can make them work), external /
//! LoadBalancer IPs are in 198.18.200.0/24 and the client routes them to node 0.
//!
//! Two pod wirings: [`Wiring::Routed`] (Calico-like: pod /32, default route via 169.254.1.1
//! onlink, proxy ARP on the host veth, one /32 route per pod on the node) and
//! [`Wiring::Bridged`] (Flannel-like: host veths enslaved to bridge `cni0` holding
//! 198.18.(100+i).1/24, pods route via it).
//!
//! Every namespace name starts with the lab prefix followed by `-` (`kpl<pid>x<n>-node-0`, ...),
//! so concurrent labs (parallel tests, several engineers) never collide and a sweep by prefix
//! removes only that lab. All links live inside lab namespaces; nothing is created in the host
//! namespace except the per-node pin directories `/sys/fs/bpf/<prefix>/node-<i>` and a log
//! directory under the system temp dir. [`Lab`]'s `Drop` (which also runs while a panic unwinds)
//! removes all of it; [`sweep`] removes what a killed run left.
//!
//! Device settings, and why:
//! - TX checksum offload is off on every lab veth. With it on, locally generated packets carry
//!   only a partial (pseudo-header) checksum and `CHECKSUM_PARTIAL` metadata that XDP cannot see;
//!   a program that rewrites ports and then redirects or XDP_TXes the frame would emit a packet
//!   with a wrong checksum. With it off, every packet carries a full checksum, as on a real wire.
//! - An `XDP_PASS` program is attached to the underlay ports facing the nodes (`n{i}`) and to
//!   the pods' `eth0`: a veth processes frames its peer sends with XDP_TX / XDP_REDIRECT only
//!   if it has an XDP program itself (see [`xdp`]). So the datapath's XDP_TX out of a node's
//!   `eth0` reaches the underlay, and an XDP_REDIRECT into a pod's host veth reaches the pod.
//!   The links are pinned under `/sys/fs/bpf/<prefix>/lab/` (so a persisted lab keeps them).
//! - IPv6 is disabled in lab namespaces (no router solicitations or DAD noise in the counters),
//!   unless the lab is dual-stack ([`LabSpec::ipv6`]).
//!
//! A dual-stack lab gives every namespace IPv6 as well, all inside 2001:2::/48 and numbered as
//! the IPv4 twin: underlay 2001:2::/64 (client 2001:2::2, node i 2001:2::(10+i) in hex), pod
//! CIDR of node i 2001:2:(100+i)::/64 and pod j 2001:2:(100+i)::(10+j) (hex), IPv6 ClusterIPs in
//! 2001:2:ff::/64 and external / LoadBalancer IPv6 in 2001:2:c8::/64 (the client routes it to
//! node 0). Routed wiring: pod /128, default route via fe80::1 on the host veth, a /128 route per
//! pod on the node; bridged wiring: `cni0` holds 2001:2:(100+i)::1/64. Nodes forward IPv6 and
//! route each other's pod CIDRs, as for IPv4. Addresses skip duplicate address detection.
//! - Nodes: ip_forward=1, rp_filter=0, send_redirects=0 (the datapath may forward a frame back
//!   out the device it came in on), default route via the client (198.18.0.2), which plays the
//!   router but does not forward: unknown destinations are dropped there, inside the lab. The
//!   default route is also what lets proxy ARP answer for 169.254.1.1 (Calico requires one).

mod ns;
pub mod xdp;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpStream},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub use self::ns::{
    DEFAULT_EXEC_TIMEOUT, NETNS_DIR, Proc, SpawnOpts, exec, exec_timeout, in_netns,
    kill_netns_processes, list_netns, netns_exists, netns_path, ns_command, run, run_ok, spawn,
    spawn_with, sysctls,
};
use self::ns::{add_netns, del_netns, ip};

/// The external client's underlay address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Prefix length of the underlay segment 198.18.0.0/24.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Start of the ClusterIP range 198.19.0.0/16.
pub const CLUSTER_IP_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// Start of the externalIP / LoadBalancer range 198.18.200.0/24 (the client routes it to node 0).
pub const EXTERNAL_IP_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 0);
/// The routed wiring's pod gateway (answered by proxy ARP on the host veth).
pub const ROUTED_POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// A node's external device (its link to the underlay), where kproxy runs its NodePort programs.
pub const EXT_DEV: &str = "eth0";

/// TCP and UDP port of the `kproxy-netexec` server [`Lab::start_servers`] runs in every pod.
pub const SERVER_PORT: u16 = 8080;
/// UDP and TCP port of the DNS server (dnsmasq) [`Lab::start_servers`] runs in every pod.
pub const DNS_PORT: u16 = 5353;
/// Name every pod's DNS server answers: an A record with the pod's address and a TXT record
/// with the pod's name.
pub const DNS_NAME: &str = "web.demo.";
/// Most nodes a lab can have (pod CIDRs 198.18.100.0/24 .. 198.18.149.0/24).
pub const MAX_NODES: usize = 50;
/// Highest pod index on a node (198.18.(100+i).(10+j) must stay below .255).
pub const MAX_POD_INDEX: usize = 244;
/// Root of the bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The external client's underlay IPv6 address (dual-stack labs).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Start of the IPv6 ClusterIP range 2001:2:ff::/64 (nothing routes it).
pub const CLUSTER_IP6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0);
/// Start of the IPv6 externalIP / LoadBalancer range 2001:2:c8::/64 (the client routes it to
/// node 0).
pub const EXTERNAL_IP6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0);
/// The routed wiring's IPv6 pod gateway (an address of every host veth).
pub const ROUTED_POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Underlay IPv6 address of node `i` (dual-stack labs): 2001:2::(0x10+i).
pub fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// IPv6 pod CIDR (network address; the prefix length is 64) of node `i`: 2001:2:(0x100+i)::.
pub fn pod_cidr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0x100 + i as u16, 0, 0, 0, 0, 0)
}

/// IPv6 address of pod `j` on node `i`: 2001:2:(0x100+i)::(0x10+j).
pub fn pod_ip6(i: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0x100 + i as u16, 0, 0, 0, 0, 0x10 + j as u16)
}

/// Bridged wiring: IPv6 address of `cni0` on node `i`: 2001:2:(0x100+i)::1.
pub fn bridge_gateway6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0x100 + i as u16, 0, 0, 0, 0, 1)
}

/// Underlay address of node `i`: 198.18.0.(10+i).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

/// Pod CIDR (network address; the prefix length is 24) of node `i`: 198.18.(100+i).0.
pub fn pod_cidr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + i as u8, 0)
}

/// Address of pod `j` on node `i`: 198.18.(100+i).(10+j).
pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + i as u8, 10 + j as u8)
}

/// Bridged wiring: address of `cni0` on node `i`, the pods' gateway: 198.18.(100+i).1.
pub fn bridge_gateway(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + i as u8, 1)
}

/// Node name of node `i`: `node-i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Pod name of pod `j` on node `i`: `node-i-pod-j`.
pub fn pod_name(i: usize, j: usize) -> String {
    format!("node-{i}-pod-{j}")
}

/// How pods are attached to their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wiring {
    /// Calico-like: pod /32, default via 169.254.1.1 onlink, proxy ARP, a /32 route per pod.
    #[default]
    Routed,
    /// Flannel-like: host veths on bridge `cni0` (198.18.(100+i).1/24), pods route via it.
    Bridged,
}

impl std::str::FromStr for Wiring {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "routed" => Ok(Self::Routed),
            "bridged" => Ok(Self::Bridged),
            other => bail!("unknown wiring {other:?}: expected routed or bridged"),
        }
    }
}

impl std::fmt::Display for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Routed => "routed",
            Self::Bridged => "bridged",
        })
    }
}

/// What lab to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Name prefix of everything the lab creates; `None` picks a unique `kpl<pid>x<n>`.
    /// Lowercase letters and digits, starting with a letter, at most 16 characters.
    pub prefix: Option<String>,
    /// Number of nodes (1..=[`MAX_NODES`]).
    pub nodes: usize,
    /// Pods created on each node at start.
    pub pods_per_node: usize,
    /// Pod wiring.
    pub wiring: Wiring,
    /// Dual stack: nodes, pods and the client get IPv6 addresses and routes too (see the
    /// module doc); otherwise IPv6 is disabled in every namespace.
    pub ipv6: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self { prefix: None, nodes: 2, pods_per_node: 3, wiring: Wiring::Routed, ipv6: false }
    }
}

impl LabSpec {
    /// The default lab (2 nodes, 3 pods each) with the given wiring.
    pub fn with_wiring(wiring: Wiring) -> Self {
        Self { wiring, ..Self::default() }
    }
}

/// A virtual node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Index i.
    pub index: usize,
    /// `node-i`.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Underlay address (device `eth0`).
    pub ip: Ipv4Addr,
    /// Underlay IPv6 address (dual-stack labs).
    pub ip6: Option<Ipv6Addr>,
    /// Network address of the pod CIDR (/24).
    pub pod_cidr: Ipv4Addr,
    /// The agent's pin path `/sys/fs/bpf/<prefix>/node-i`.
    pub pin_path: PathBuf,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Index of its node.
    pub node: usize,
    /// Index j on the node (never reused within a lab).
    pub index: usize,
    /// `node-i-pod-j`.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Pod address (device `eth0` in the pod).
    pub ip: Ipv4Addr,
    /// Pod IPv6 address (dual-stack labs).
    pub ip6: Option<Ipv6Addr>,
    /// Host-side veth in the node namespace: `vp{j}`.
    pub host_veth: String,
}

/// Options of [`Lab::spawn_agent`].
#[derive(Debug, Clone, Default)]
pub struct AgentOpts {
    /// Directory of Service / EndpointSlice manifests the agent watches (`--manifests`); empty:
    /// no `--manifests` (e.g. a `--kubeconfig` in `extra_args` instead).
    pub manifests_dir: PathBuf,
    /// Further arguments appended to the command line.
    pub extra_args: Vec<String>,
    /// The kproxy binary to run; `None` means [`find_bin`]`("kproxy")` (`target/<profile>/kproxy`).
    pub binary: Option<PathBuf>,
}

/// The XDP mode of lab agents whose arguments name none. The nodes' `eth0` are veth devices,
/// which kproxy's default (`--xdp-mode auto`) serves with TC alone; the lab keeps the XDP
/// program in the path of every end-to-end test (generic mode runs on veth on every kernel of
/// the matrix). The benchmark names its modes itself.
pub const LAB_XDP_MODE: [&str; 2] = ["--xdp-mode", "generic"];

/// Whether agent arguments `args` choose how the external devices are served (`--no-xdp` or
/// `--xdp-mode`).
pub fn names_xdp_mode<S: AsRef<str>>(args: &[S]) -> bool {
    args.iter().any(|a| a.as_ref() == "--no-xdp" || a.as_ref().starts_with("--xdp-mode"))
}

/// What an agent logs once its datapath is loaded and attached and it has read the node's
/// addresses (its first sync follows).
pub const AGENT_LOADED: &str = "node addresses";

/// How long [`Lab::start_agent`] waits for [`AGENT_LOADED`].
pub const AGENT_LOAD: Duration = Duration::from_secs(120);

/// A running agent; dropping it stops the agent (SIGTERM, then SIGKILL after 3 s).
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    /// Node index.
    pub node: usize,
    /// Pin path given to the agent.
    pub pin_path: PathBuf,
}

impl Agent {
    /// The agent's log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        self.proc.log().expect("agents always log to a file")
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Waits until the agent's log contains `needle` (e.g. `node addresses`: its datapath is
    /// loaded and attached, it syncs next), failing with the log after `timeout`. Loading takes
    /// many seconds on a busy machine, so checks of what an agent serves start from here.
    pub fn wait_logged(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "agent of node {} never logged {needle:?} within {timeout:?}:\n{log}",
                self.node
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Process id of the agent.
    pub fn pid(&self) -> u32 {
        self.proc.pid().expect("agent guards own their process")
    }

    /// The process guard.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Stops the agent gracefully (SIGTERM, up to `grace`, then SIGKILL).
    pub fn stop(mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.proc.stop(grace)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.proc.stop(Duration::from_secs(3));
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Checks a lab prefix: a lowercase letter, then lowercase letters / digits, at most 16 chars.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 16
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    ensure!(
        ok,
        "invalid lab prefix {prefix:?}: use a lowercase letter then letters/digits, at most 16"
    );
    Ok(())
}

/// Namespaces belonging to the lab with `prefix` (names starting with `<prefix>-`).
pub fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    validate_prefix(prefix)?;
    let start = format!("{prefix}-");
    Ok(list_netns()?.into_iter().filter(|n| n.starts_with(&start)).collect())
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Pin directory of the lab with `prefix`: `/sys/fs/bpf/<prefix>`.
pub fn pin_root(prefix: &str) -> PathBuf {
    Path::new(BPFFS).join(prefix)
}

/// Log directory of the lab with `prefix`: `<tmp>/<prefix>-logs`.
pub fn log_root(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-logs"))
}

/// Removes everything the lab with `prefix` left: kills processes inside its namespaces,
/// deletes the namespaces (pods first), its pin directory and its log directory. Returns what was removed. Touches
/// nothing whose name does not start with the prefix.
pub fn sweep(prefix: &str) -> Result<Vec<String>> {
    let mut names = lab_namespaces(prefix)?;
    // Pods before nodes before the underlay: fewer dangling peers while deleting.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for ns in names {
        match del_netns(&ns) {
            Ok(()) => removed.push(format!("netns {ns}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let pins = pin_root(prefix);
    if pins.exists() && is_bpffs(&pins) {
        match std::fs::remove_dir_all(&pins) {
            Ok(()) => removed.push(format!("pins {}", pins.display())),
            Err(e) => errors.push(format!("removing {}: {e}", pins.display())),
        }
    }
    let logs = log_root(prefix);
    if logs.exists() {
        match std::fs::remove_dir_all(&logs) {
            Ok(()) => removed.push(format!("logs {}", logs.display())),
            Err(e) => errors.push(format!("removing {}: {e}", logs.display())),
        }
    }
    if !errors.is_empty() {
        bail!("sweep of lab {prefix} incomplete: {}", errors.join("; "));
    }
    Ok(removed)
}

/// Sweeps labs with automatic prefixes (`kpl<pid>x<n>`) whose creating process is gone
/// (namespaces, pin directories and log directories).
pub fn sweep_orphans() -> Result<Vec<String>> {
    let mut prefixes = std::collections::BTreeSet::new();
    let auto_prefix = |name: &str| -> Option<(String, u32)> {
        let rest = name.strip_prefix("kpl")?;
        let (pid, rest) = rest.split_once('x')?;
        let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let pid: u32 = pid.parse().ok()?;
        if n.is_empty() {
            return None;
        }
        Some((format!("kpl{pid}x{n}"), pid))
    };
    let dead = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    for ns in list_netns()? {
        if let Some((prefix, pid)) = auto_prefix(&ns)
            && ns.starts_with(&format!("{prefix}-"))
            && dead(pid)
        {
            prefixes.insert(prefix);
        }
    }
    if let Ok(dir) = std::fs::read_dir(BPFFS) {
        for e in dir.flatten() {
            let name = e.file_name();
            if let Some(name) = name.to_str()
                && let Some((prefix, pid)) = auto_prefix(name)
                && name == prefix
                && dead(pid)
            {
                prefixes.insert(prefix);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            let name = e.file_name();
            if let Some(name) = name.to_str().and_then(|n| n.strip_suffix("-logs"))
                && let Some((prefix, pid)) = auto_prefix(name)
                && name == prefix
                && dead(pid)
            {
                prefixes.insert(prefix);
            }
        }
    }
    let mut removed = Vec::new();
    for p in prefixes {
        removed.extend(sweep(&p)?);
    }
    Ok(removed)
}

/// Directory holding the lab's helper binaries (`kproxy`, `kproxy-netexec`): `$KPROXY_BIN_DIR`
/// if set, otherwise the cargo profile directory of the running executable (`target/<profile>`,
/// also when running from `target/<profile>/deps`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KPROXY_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("executable has no parent directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of the helper binary `name` in [`bin_dir`], or a clear error saying how to build it.
pub fn find_bin(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    ensure!(
        path.is_file(),
        "{name} not found in {}: build it first (`cargo xtask build` or `cargo build --bins`, same profile), \
         or point KPROXY_BIN_DIR at the directory holding it",
        dir.display()
    );
    Ok(path)
}

/// A lab device running another XDP program than the lab's `XDP_PASS` (see
/// [`Lab::swap_xdp_pass`]); dropping it puts `XDP_PASS` back.
#[derive(Debug)]
pub struct XdpSwap<'a> {
    link: &'a OwnedFd,
    pass: &'a OwnedFd,
}

impl Drop for XdpSwap<'_> {
    fn drop(&mut self) {
        if let Err(e) = xdp::update_link(self.link, self.pass) {
            eprintln!("lab: putting XDP_PASS back: {e}");
        }
    }
}

/// A running lab. Dropping it removes everything it created (see the module doc).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    wiring: Wiring,
    ipv6: bool,
    nodes: Vec<Node>,
    pods: BTreeMap<(usize, usize), Pod>,
    next_pod: Vec<usize>,
    /// Namespaces created, in creation order.
    namespaces: Vec<String>,
    /// Servers started by the lab, with the namespace each runs in.
    procs: Vec<Proc>,
    log_dir: PathBuf,
    pins_created: bool,
    /// The lab's `XDP_PASS` program and its links, keyed by (namespace, device).
    xdp_pass: Option<OwnedFd>,
    xdp_links: BTreeMap<(String, String), OwnedFd>,
    persistent: bool,
    outlive_parent: bool,
    torn_down: bool,
}

impl Lab {
    /// Builds the lab described by `spec`. On error, whatever was built is removed again.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "nodes must be in 1..={MAX_NODES}, got {}",
            spec.nodes
        );
        ensure!(
            spec.pods_per_node <= MAX_POD_INDEX + 1,
            "pods_per_node must be at most {}, got {}",
            MAX_POD_INDEX + 1,
            spec.pods_per_node
        );
        // SAFETY: geteuid has no preconditions.
        ensure!(unsafe { libc::geteuid() } == 0, "the lab needs root (network namespaces)");
        let prefix = match spec.prefix.clone() {
            Some(p) => p,
            None => {
                format!("kpl{}x{}", std::process::id(), LAB_COUNTER.fetch_add(1, Ordering::Relaxed))
            }
        };
        validate_prefix(&prefix)?;
        let existing = lab_namespaces(&prefix)?;
        ensure!(
            existing.is_empty(),
            "a lab with prefix {prefix} already exists ({}); remove it with \
             `cargo xtask lab down --prefix {prefix}`",
            existing.join(", ")
        );
        ensure!(
            !pin_root(&prefix).exists(),
            "{} is left from an earlier lab with prefix {prefix}; remove it with \
             `cargo xtask lab down --prefix {prefix}`",
            pin_root(&prefix).display()
        );
        let log_dir = log_root(&prefix);
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        let mut lab = Lab {
            prefix,
            wiring: spec.wiring,
            ipv6: spec.ipv6,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            next_pod: vec![0; spec.nodes],
            namespaces: Vec::new(),
            procs: Vec::new(),
            log_dir,
            pins_created: false,
            xdp_pass: None,
            xdp_links: BTreeMap::new(),
            persistent: false,
            outlive_parent: false,
            torn_down: false,
        };
        lab.build(&spec).with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn ns_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    fn new_ns(&mut self, suffix: &str, forwarding: bool) -> Result<String> {
        let ns = self.ns_name(suffix);
        add_netns(&ns)?;
        self.namespaces.push(ns.clone());
        let fwd = if forwarding { "1" } else { "0" };
        let no6 = if self.ipv6 { "0" } else { "1" };
        let mut settings = vec![
            ("net/ipv6/conf/all/disable_ipv6", no6),
            ("net/ipv6/conf/default/disable_ipv6", no6),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/ip_forward", fwd),
        ];
        if forwarding {
            settings.push(("net/ipv4/conf/all/send_redirects", "0"));
            settings.push(("net/ipv4/conf/default/send_redirects", "0"));
        }
        if self.ipv6 {
            settings.push(("net/ipv6/conf/all/forwarding", fwd));
            settings.push(("net/ipv6/conf/all/accept_ra", "0"));
            settings.push(("net/ipv6/conf/default/accept_ra", "0"));
            settings.push(("net/ipv6/conf/default/router_solicitations", "0"));
        }
        sysctls(&ns, &settings)?;
        ip(Some(&ns), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ethtool -K dev tx off` inside `ns` (see the module doc for why).
    fn offloads(ns: &str, dev: &str) -> Result<()> {
        exec(ns, &["ethtool", "-K", dev, "tx", "off"])
            .map(drop)
            .with_context(|| format!("turning TX checksum offload off on {dev} in {ns}"))
    }

    /// Attaches the lab's `XDP_PASS` program to `dev` in `ns` (see the module doc for why),
    /// pinning the link under `/sys/fs/bpf/<prefix>/lab/` when bpffs is mounted.
    fn attach_xdp_pass(&mut self, ns: &str, dev: &str) -> Result<()> {
        if self.xdp_pass.is_none() {
            self.xdp_pass = Some(xdp::load_xdp(xdp::XDP_PASS_NAME, &xdp::XDP_PASS_PROGRAM)?);
        }
        let prog = self.xdp_pass.as_ref().expect("loaded above");
        let link = in_netns(ns, || xdp::attach_xdp(prog, dev))??;
        if self.pins_created {
            let dir = pin_root(&self.prefix).join("lab");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            xdp::pin(&link, &dir.join(format!("xdp-{ns}-{dev}")))?;
        }
        self.xdp_links.insert((ns.to_owned(), dev.to_owned()), link);
        Ok(())
    }

    fn detach_xdp_pass(&mut self, ns: &str, dev: &str) {
        self.xdp_links.remove(&(ns.to_owned(), dev.to_owned()));
        let _ = std::fs::remove_file(
            pin_root(&self.prefix).join("lab").join(format!("xdp-{ns}-{dev}")),
        );
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        if is_bpffs(Path::new(BPFFS)) {
            let root = pin_root(&self.prefix);
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating {}", root.display()))?;
            self.pins_created = true;
        }
        let underlay = self.new_ns("underlay", false)?;
        ip(Some(&underlay), &["link", "add", "br0", "type", "bridge"])?;
        ip(Some(&underlay), &["link", "set", "br0", "up"])?;

        let client = self.new_ns("client", false)?;
        let v6 = self.ipv6;
        self.attach_underlay("cl", &client, CLIENT_IP, v6.then_some(CLIENT_IP6))?;
        let via0 = node_ip(0).to_string();
        ip(Some(&client), &["route", "add", &format!("{EXTERNAL_IP_NET}/24"), "via", &via0])?;
        if v6 {
            let (dst, via) = (format!("{EXTERNAL_IP6_NET}/64"), node_ip6(0).to_string());
            ip(Some(&client), &["-6", "route", "add", &dst, "via", &via])?;
        }

        for i in 0..spec.nodes {
            let ns = self.new_ns(&node_name(i), true)?;
            self.attach_underlay(&format!("n{i}"), &ns, node_ip(i), v6.then(|| node_ip6(i)))?;
            ip(Some(&ns), &["route", "add", "default", "via", &CLIENT_IP.to_string()])?;
            if v6 {
                ip(Some(&ns), &["-6", "route", "add", "default", "via", &CLIENT_IP6.to_string()])?;
            }
            if self.wiring == Wiring::Bridged {
                ip(Some(&ns), &["link", "add", "cni0", "type", "bridge"])?;
                let gw = format!("{}/24", bridge_gateway(i));
                ip(Some(&ns), &["addr", "add", &gw, "dev", "cni0"])?;
                if v6 {
                    sysctls(&ns, &[("net/ipv6/conf/cni0/disable_ipv6", "0")])?;
                    let gw6 = format!("{}/64", bridge_gateway6(i));
                    ip(Some(&ns), &["-6", "addr", "add", &gw6, "dev", "cni0", "nodad"])?;
                }
                ip(Some(&ns), &["link", "set", "cni0", "up"])?;
            }
            let pin_path = pin_root(&self.prefix).join(node_name(i));
            self.nodes.push(Node {
                index: i,
                name: node_name(i),
                ns,
                ip: node_ip(i),
                ip6: v6.then(|| node_ip6(i)),
                pod_cidr: pod_cidr(i),
                pin_path,
            });
        }
        // host-gw: every node routes every other node's pod CIDR via that node's address.
        for a in 0..spec.nodes {
            for b in (0..spec.nodes).filter(|&b| b != a) {
                let dst = format!("{}/24", pod_cidr(b));
                let via = node_ip(b).to_string();
                ip(Some(&self.nodes[a].ns), &["route", "add", &dst, "via", &via, "dev", "eth0"])?;
                if v6 {
                    let (dst, via) = (format!("{}/64", pod_cidr6(b)), node_ip6(b).to_string());
                    let argv = ["-6", "route", "add", &dst, "via", &via, "dev", "eth0"];
                    ip(Some(&self.nodes[a].ns), &argv)?;
                }
            }
        }
        if is_bpffs(Path::new(BPFFS)) {
            for node in &self.nodes {
                std::fs::create_dir_all(&node.pin_path)
                    .with_context(|| format!("creating {}", node.pin_path.display()))?;
            }
        }
        for i in 0..spec.nodes {
            self.attach_xdp_pass(&self.underlay_ns(), &format!("n{i}"))?;
        }
        for i in 0..spec.nodes {
            for _ in 0..spec.pods_per_node {
                self.add_pod(i)?;
            }
        }
        Ok(())
    }

    /// Connects namespace `ns` to the underlay bridge: `eth0` in `ns` with `addr/24` (and
    /// `addr6/64`), its peer `port` on `br0`.
    fn attach_underlay(
        &self,
        port: &str,
        ns: &str,
        addr: Ipv4Addr,
        addr6: Option<Ipv6Addr>,
    ) -> Result<()> {
        let underlay = self.underlay_ns();
        ip(
            Some(&underlay),
            &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns],
        )?;
        ip(Some(&underlay), &["link", "set", port, "master", "br0", "up"])?;
        Self::offloads(&underlay, port)?;
        let cidr = format!("{addr}/{UNDERLAY_PREFIX_LEN}");
        ip(Some(ns), &["addr", "add", &cidr, "dev", "eth0"])?;
        if let Some(a) = addr6 {
            Self::enable_ipv6_on(ns, "eth0")?;
            ip(Some(ns), &["-6", "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?;
        }
        ip(Some(ns), &["link", "set", "eth0", "up"])?;
        Self::offloads(ns, "eth0")
    }

    /// Turns IPv6 on for `dev` in `ns` (a device moved into a namespace keeps the setting it
    /// was created with).
    fn enable_ipv6_on(ns: &str, dev: &str) -> Result<()> {
        sysctls(ns, &[(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "0")])
    }

    /// Adds a pod to node `node` (the next unused index) and returns it.
    pub fn add_pod(&mut self, node: usize) -> Result<Pod> {
        ensure!(node < self.nodes.len(), "no node {node} (lab has {})", self.nodes.len());
        let j = self.next_pod[node];
        ensure!(j <= MAX_POD_INDEX, "node {node} has used all {MAX_POD_INDEX} pod indexes");
        self.next_pod[node] += 1;
        let name = pod_name(node, j);
        let pod_ns = self.new_ns(&name, false)?;
        let node_ns = self.nodes[node].ns.clone();
        let veth = format!("vp{j}");
        let addr = pod_ip(node, j);
        let addr6 = self.ipv6.then(|| pod_ip6(node, j));
        let pod = Pod {
            node,
            index: j,
            name,
            ns: pod_ns.clone(),
            ip: addr,
            ip6: addr6,
            host_veth: veth.clone(),
        };
        // Registered before wiring so a failure below still removes the namespace.
        self.pods.insert((node, j), pod.clone());
        ip(
            Some(&node_ns),
            &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns],
        )?;
        Self::offloads(&node_ns, &veth)?;
        Self::offloads(&pod_ns, "eth0")?;
        self.attach_xdp_pass(&pod_ns, "eth0")?;
        if addr6.is_some() {
            Self::enable_ipv6_on(&node_ns, &veth)?;
            Self::enable_ipv6_on(&pod_ns, "eth0")?;
        }
        match self.wiring {
            Wiring::Routed => {
                sysctls(
                    &node_ns,
                    &[
                        (&format!("net/ipv4/conf/{veth}/proxy_arp"), "1"),
                        (&format!("net/ipv4/neigh/{veth}/proxy_delay"), "0"),
                        (&format!("net/ipv4/conf/{veth}/rp_filter"), "0"),
                    ],
                )?;
                ip(Some(&node_ns), &["link", "set", &veth, "up"])?;
                ip(Some(&node_ns), &["route", "add", &format!("{addr}/32"), "dev", &veth])?;
                ip(Some(&pod_ns), &["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
                ip(Some(&pod_ns), &["link", "set", "eth0", "up"])?;
                let gw = ROUTED_POD_GATEWAY.to_string();
                ip(
                    Some(&pod_ns),
                    &["route", "add", "default", "via", &gw, "dev", "eth0", "onlink"],
                )?;
                if let Some(a6) = addr6 {
                    let gw6 = format!("{ROUTED_POD_GATEWAY6}/64");
                    ip(Some(&node_ns), &["-6", "addr", "add", &gw6, "dev", &veth, "nodad"])?;
                    let dst = format!("{a6}/128");
                    ip(Some(&node_ns), &["-6", "route", "add", &dst, "dev", &veth])?;
                    let a6 = format!("{a6}/128");
                    ip(Some(&pod_ns), &["-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
                    let gw6 = ROUTED_POD_GATEWAY6.to_string();
                    let argv = ["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"];
                    ip(Some(&pod_ns), &argv)?;
                }
            }
            Wiring::Bridged => {
                ip(Some(&node_ns), &["link", "set", &veth, "master", "cni0", "up"])?;
                ip(Some(&pod_ns), &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                ip(Some(&pod_ns), &["link", "set", "eth0", "up"])?;
                let gw = bridge_gateway(node).to_string();
                ip(Some(&pod_ns), &["route", "add", "default", "via", &gw, "dev", "eth0"])?;
                if let Some(a6) = addr6 {
                    let a6 = format!("{a6}/64");
                    ip(Some(&pod_ns), &["-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
                    let gw6 = bridge_gateway6(node).to_string();
                    let argv = ["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"];
                    ip(Some(&pod_ns), &argv)?;
                }
            }
        }
        Ok(pod)
    }

    /// Removes a pod: stops its servers, deletes its host veth and its namespace.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        ensure!(
            self.pods.get(&(pod.node, pod.index)) == Some(pod),
            "pod {} is not part of lab {}",
            pod.name,
            self.prefix
        );
        self.procs.retain(|p| p.ns() != pod.ns);
        self.detach_xdp_pass(&pod.ns, "eth0");
        let node_ns = &self.nodes[pod.node].ns;
        if ip(Some(node_ns), &["link", "show", "dev", &pod.host_veth]).is_ok() {
            ip(Some(node_ns), &["link", "del", "dev", &pod.host_veth])?;
        }
        del_netns(&pod.ns)?;
        self.namespaces.retain(|n| n != &pod.ns);
        self.pods.remove(&(pod.node, pod.index));
        Ok(())
    }

    /// The lab prefix (every namespace name starts with `<prefix>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Pod wiring.
    pub fn wiring(&self) -> Wiring {
        self.wiring
    }

    /// Whether the lab is dual-stack ([`LabSpec::ipv6`]).
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`; panics if there is none (a test bug).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Id of the lab's `XDP_PASS` program (one program behind every attachment): an empty
    /// program that the same traffic crosses, e.g. the floor of a bpf_stats measurement.
    pub fn xdp_pass_id(&self) -> Result<u32> {
        let prog = self.xdp_pass.as_ref().context("the lab has no XDP_PASS program")?;
        Ok(xdp::prog_id(prog)?)
    }

    /// Runs `prog` instead of the lab's `XDP_PASS` program on `dev` of namespace `ns` (one of
    /// the devices the lab attaches it to) until the returned guard is dropped.
    pub fn swap_xdp_pass<'a>(&'a self, ns: &str, dev: &str, prog: &OwnedFd) -> Result<XdpSwap<'a>> {
        let link = self
            .xdp_links
            .get(&(ns.to_owned(), dev.to_owned()))
            .with_context(|| format!("no lab XDP link on {dev} in {ns}"))?;
        let pass = self.xdp_pass.as_ref().context("the lab has no XDP_PASS program")?;
        xdp::update_link(link, prog)?;
        Ok(XdpSwap { link, pass })
    }

    /// All pods, ordered by node then index.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.values().cloned().collect()
    }

    /// Pods of node `i`, by index.
    pub fn pods_on(&self, i: usize) -> Vec<Pod> {
        self.pods.values().filter(|p| p.node == i).cloned().collect()
    }

    /// Pod `j` of node `i`, if it exists.
    pub fn pod(&self, i: usize, j: usize) -> Option<&Pod> {
        self.pods.get(&(i, j))
    }

    /// The pod named `name` (`node-i-pod-j`), if it exists.
    pub fn pod_by_name(&self, name: &str) -> Option<&Pod> {
        self.pods.values().find(|p| p.name == name)
    }

    /// Namespace of the external client (198.18.0.2).
    pub fn client_ns(&self) -> String {
        self.ns_name("client")
    }

    /// Namespace holding the underlay bridge.
    pub fn underlay_ns(&self) -> String {
        self.ns_name("underlay")
    }

    /// Every namespace of the lab, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Directory holding the logs of processes the lab started.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts `argv` in namespace `ns`, logging to `<log dir>/<label>.log`. The guard is the
    /// caller's (it kills the process on drop). Unless [`Lab::set_outlive_parent`] was called,
    /// the process is also killed when this process exits, however it exits.
    pub fn spawn(&self, ns: &str, label: &str, argv: &[&str]) -> Result<Proc> {
        let log = self.log_dir.join(format!("{label}.log"));
        spawn_with(ns, argv, &SpawnOpts { log: Some(log), outlive_parent: self.outlive_parent })
    }

    /// Starts `kproxy-netexec` (TCP and UDP [`SERVER_PORT`]) and dnsmasq ([`DNS_PORT`]) in every
    /// pod and waits until they accept connections.
    pub fn start_servers(&mut self) -> Result<()> {
        for pod in self.pods() {
            self.start_pod_servers_nowait(&pod)?;
        }
        for pod in self.pods() {
            wait_listening(&pod, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Starts the servers of one pod (e.g. one added with [`Lab::add_pod`]) and waits for them.
    pub fn start_pod_servers(&mut self, pod: &Pod) -> Result<()> {
        self.start_pod_servers_nowait(pod)?;
        wait_listening(pod, Duration::from_secs(10))
    }

    fn start_pod_servers_nowait(&mut self, pod: &Pod) -> Result<()> {
        let netexec = find_bin("kproxy-netexec")?;
        let netexec = netexec.to_string_lossy();
        let port = SERVER_PORT.to_string();
        let mut argv = vec![&*netexec, "--name", &pod.name, "--tcp", &port, "--udp", &port];
        let ip6 = pod.ip6.map(|a| a.to_string());
        if let Some(a) = &ip6 {
            argv.extend(["--bind6", a]);
        }
        let p = self.spawn(&pod.ns, &format!("{}-netexec", pod.name), &argv)?;
        self.procs.push(p);
        let host = DNS_NAME.trim_end_matches('.');
        let argv = [
            "dnsmasq".to_string(),
            // In the foreground, yet serving each TCP query from a process of its own as in
            // production: `--no-daemon` (debug mode) answers TCP inline, so one connection left
            // open by its client (kproxy resets a client whose backend was removed mid-query;
            // the server never hears of it) stopped its UDP service until the TCP timeout.
            "--keep-in-foreground".into(),
            "--user=root".into(),
            "--conf-file=/dev/null".into(),
            "--pid-file=".into(),
            "--log-facility=-".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            format!("--port={DNS_PORT}"),
            format!("--host-record={host},{}", pod.ip),
            format!("--txt-record={host},{}", pod.name),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let p = self.spawn(&pod.ns, &format!("{}-dnsmasq", pod.name), &argv)?;
        self.procs.push(p);
        Ok(())
    }

    /// Pin path of node `i`'s agent: `/sys/fs/bpf/<prefix>/node-i`.
    pub fn pin_path(&self, i: usize) -> &Path {
        &self.nodes[i].pin_path
    }

    /// Starts the kproxy agent of node `node` in its namespace:
    /// `kproxy agent --node-name node-i --manifests DIR --nodeport-devices eth0
    /// --pod-devices 'vp*' --pin-path /sys/fs/bpf/<prefix>/node-i [--xdp-mode generic]
    /// [extra args]` ([`LAB_XDP_MODE`] unless the extra args name an XDP mode), logging to
    /// `<log dir>/node-i-agent.log`. The binary is `target/<profile>/kproxy`.
    pub fn spawn_agent(&self, node: usize, opts: &AgentOpts) -> Result<Agent> {
        ensure!(node < self.nodes.len(), "no node {node} (lab has {})", self.nodes.len());
        ensure!(
            is_bpffs(Path::new(BPFFS)),
            "{BPFFS} is not a bpffs: mount it (mount -t bpf bpf {BPFFS}) or run xtask/setup.sh"
        );
        let kproxy = match &opts.binary {
            Some(b) => b.clone(),
            None => find_bin("kproxy")?,
        };
        let n = &self.nodes[node];
        std::fs::create_dir_all(&n.pin_path)
            .with_context(|| format!("creating {}", n.pin_path.display()))?;
        let mut argv: Vec<String> = vec![
            kproxy.to_string_lossy().into_owned(),
            "agent".into(),
            "--node-name".into(),
            n.name.clone(),
        ];
        if !opts.manifests_dir.as_os_str().is_empty() {
            argv.push("--manifests".into());
            argv.push(opts.manifests_dir.to_string_lossy().into_owned());
        }
        argv.extend([
            "--nodeport-devices".into(),
            EXT_DEV.into(),
            "--pod-devices".into(),
            "vp*".into(),
            "--pin-path".into(),
            n.pin_path.to_string_lossy().into_owned(),
        ]);
        if !names_xdp_mode(&opts.extra_args) {
            argv.extend(LAB_XDP_MODE.iter().map(|a| a.to_string()));
        }
        argv.extend(opts.extra_args.iter().cloned());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc = self.spawn(&n.ns, &format!("{}-agent", n.name), &argv)?;
        Ok(Agent { proc, node, pin_path: n.pin_path.clone() })
    }

    /// Starts an agent on every node ([`Lab::spawn_agent`]); the guards are in node order.
    pub fn spawn_agents(&self, opts: &AgentOpts) -> Result<Vec<Agent>> {
        (0..self.nodes.len()).map(|i| self.spawn_agent(i, opts)).collect()
    }

    /// [`Lab::spawn_agent`], returning once the agent has loaded and attached its datapath and
    /// read the node's addresses (it syncs next), so that a check of what it serves does not
    /// spend its time limit on the load (many seconds on a busy machine).
    pub fn start_agent(&self, node: usize, opts: &AgentOpts) -> Result<Agent> {
        let a = self.spawn_agent(node, opts)?;
        a.wait_logged(AGENT_LOADED, AGENT_LOAD)?;
        Ok(a)
    }

    /// [`Lab::spawn_agents`], returning once every agent has loaded ([`Lab::start_agent`]).
    pub fn start_agents(&self, opts: &AgentOpts) -> Result<Vec<Agent>> {
        let agents = self.spawn_agents(opts)?;
        for a in &agents {
            a.wait_logged(AGENT_LOADED, AGENT_LOAD)?;
        }
        Ok(agents)
    }

    /// Runs `kproxy cleanup --pin-path <pin path>` in node `node`'s namespace (30 s limit);
    /// fails with its stderr if it exits non-zero.
    pub fn cleanup(&self, node: usize) -> Result<std::process::Output> {
        ensure!(node < self.nodes.len(), "no node {node} (lab has {})", self.nodes.len());
        let kproxy = find_bin("kproxy")?;
        let n = &self.nodes[node];
        let pin = n.pin_path.to_string_lossy();
        exec(&n.ns, &[&*kproxy.to_string_lossy(), "cleanup", "--pin-path", &pin])
    }

    /// Keeps the lab after this value is gone (no teardown on drop); processes it started keep
    /// running. Returns the prefix to pass to [`sweep`] later.
    pub fn persist(mut self) -> String {
        self.persistent = true;
        for p in self.procs.drain(..) {
            p.detach();
        }
        self.prefix.clone()
    }

    /// Makes processes started from now on outlive this process (for `cargo xtask lab up`).
    pub fn set_outlive_parent(&mut self, yes: bool) {
        self.outlive_parent = yes;
    }

    /// A human-readable map of the lab: nodes, pods, addresses and how to enter them.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let stack = if self.ipv6 { ", dual-stack" } else { "" };
        let _ = writeln!(s, "lab {} ({} wiring{stack})", self.prefix, self.wiring);
        let _ = writeln!(
            s,
            "  client    {:<16} ns {}  (routes {EXTERNAL_IP_NET}/24 via node-0)",
            CLIENT_IP,
            self.client_ns()
        );
        if self.ipv6 {
            let _ = writeln!(
                s,
                "            {CLIENT_IP6:<16} (routes {EXTERNAL_IP6_NET}/64 via node-0; IPv6 \
                 ClusterIPs in {CLUSTER_IP6_NET}/64)"
            );
        }
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "  {:<9} {:<16} ns {}  pods {}/24  pins {}",
                n.name,
                n.ip,
                n.ns,
                n.pod_cidr,
                n.pin_path.display()
            );
            if let Some(a) = n.ip6 {
                let _ = writeln!(s, "  {:<9} {a:<16} pods {}/64", "", pod_cidr6(n.index));
            }
            for p in self.pods_on(n.index) {
                let _ = writeln!(
                    s,
                    "    {:<15} {:<16} ns {}  host veth {}",
                    p.name, p.ip, p.ns, p.host_veth
                );
                if let Some(a) = p.ip6 {
                    let _ = writeln!(s, "    {:<15} {a}", "");
                }
            }
        }
        let _ = writeln!(s, "  underlay bridge br0 in ns {}", self.underlay_ns());
        let _ = writeln!(s, "enter one: nsenter --net=/run/netns/<ns> bash");
        let _ = writeln!(s, "logs: {}", self.log_dir.display());
        s
    }

    /// Removes the lab now, reporting failures (drop does the same but can only print them).
    pub fn down(mut self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.prefix, errors.join("; "))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down || self.persistent {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        self.procs.clear();
        self.xdp_links.clear();
        self.xdp_pass = None;
        // Reverse creation order: pods, nodes, client, underlay.
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = del_netns(&ns) {
                errors.push(format!("{e:#}"));
            }
        }
        let pins = pin_root(&self.prefix);
        if self.pins_created
            && pins.exists()
            && is_bpffs(&pins)
            && let Err(e) = std::fs::remove_dir_all(&pins)
        {
            errors.push(format!("removing {}: {e}", pins.display()));
        }
        let keep_logs = thread::panicking() || std::env::var_os("KPROXY_KEEP_LOGS").is_some();
        if keep_logs {
            eprintln!("lab {}: logs kept in {}", self.prefix, self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("lab {}: cleanup failed: {e}", self.prefix);
        }
    }
}

/// Calls `f` every `interval` until it succeeds or `timeout` has passed; returns the first
/// success or the last error (with the time waited). For "eventually" checks, e.g. until an
/// agent has programmed a service.
pub fn eventually<T, E: std::fmt::Display>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                bail!("still failing after {:?}: {e}", start.elapsed())
            }
            Err(_) => thread::sleep(interval),
        }
    }
}

/// Waits until the pod's netexec (TCP [`SERVER_PORT`]) and dnsmasq (TCP [`DNS_PORT`]) accept
/// connections on the pod's loopback.
fn wait_listening(pod: &Pod, timeout: Duration) -> Result<()> {
    wait_ports(pod, &[SERVER_PORT, DNS_PORT], timeout)
}

/// Waits until something in `pod` accepts TCP connections on each of `ports` (on loopback).
pub fn wait_ports(pod: &Pod, ports: &[u16], timeout: Duration) -> Result<()> {
    in_netns(&pod.ns, || -> Result<()> {
        let deadline = Instant::now() + timeout;
        for &port in ports {
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => {
                        bail!("server on port {port} in pod {} not listening: {e}", pod.name)
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(())
    })?
}
