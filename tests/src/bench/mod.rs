//! `make bench`: kproxy side by side with kube-proxy-equivalent rule sets (iptables mode loaded
//! with `iptables-legacy-restore`, nftables mode loaded with `nft -f`) and the direct-to-pod
//! floor, in one lab, in one run, with alternating A/B repetitions.
//!
//! Phases (issue 5's items):
//! 1. ClusterIP new-connection latency (connect, one request, close) at each scale, the probed
//!    service last in rule order; 2. connection and request/response rates with CPU per
//!    transaction; 3. NodePort from the external client (UDP small packets, iperf3 TCP), local and
//!    remote backend, kproxy with XDP and TC only, plus an XDP_TX bounce reference; 4. programming
//!    time from scratch and for one change; 5. change-to-first-connection latency at rest and under
//!    churn, for kproxy on both of its sources (manifest directory, Kubernetes API through the
//!    test API server) and the baselines; 6. memory; 7. per-packet cost under BPF_PROG_TEST_RUN.
//!
//! Every system is loaded into node 0 of the lab once per scale and switched on and off between
//! repetitions (kproxy: agent started / stopped and its datapath removed; iptables: the jumps
//! from the built-in chains; nftables: the rules of the hooked base chains), so each repetition
//! measures every system right after the others. Failures become missing figures with a reason;
//! the run itself only fails when the lab cannot be built.
pub mod bpfstats;
pub mod compare;
pub mod livegen;
mod measure;
pub mod report;
pub mod results;
mod systems;
pub mod testrun;
pub mod workload;

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use self::{
    results::{Figure, Recorder},
    systems::Kproxy,
    workload::BService,
};
use crate::{
    apiserver::{ApiServer, Binder},
    baseline,
    lab::{self, Lab, LabSpec, Wiring},
};

/// What a run measures and for how long.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// `--quick`.
    pub quick: bool,
    /// Item 1 scales (number of services).
    pub scales: Vec<usize>,
    /// Scales of item 1 over IPv6 (step "1 over IPv6", in a dual-stack lab of its own).
    #[serde(default)]
    pub ipv6_scales: Vec<usize>,
    /// Item 2 scales.
    pub rate_scales: Vec<usize>,
    /// Items 4 and 6 scales (services × 10 endpoints).
    pub prog_scales: Vec<usize>,
    /// Item 5 scale.
    pub e2e_scale: usize,
    /// Repetitions below 10,000 services.
    pub reps: usize,
    /// Repetitions at 10,000 services and more (each baseline toggle rewrites a large table).
    pub reps_large: usize,
    /// Services per `nft -f` transaction when a baseline table is loaded (see
    /// [`crate::baseline::nftables_transactions`]).
    #[serde(default = "default_nft_txn")]
    pub nft_txn_services: usize,
    /// Measured time of each load generator run, ms.
    pub duration_ms: u64,
    /// Measured time of each NodePort run, ms.
    pub np_duration_ms: u64,
    /// One-change samples per scale and system.
    pub change_samples: usize,
    /// One-change samples of the baselines at 30,000 services and more (each legacy
    /// `iptables-restore --noflush` then reads and rewrites a ~300 MB table).
    #[serde(default = "default_change_samples_large")]
    pub change_samples_large: usize,
    /// Item 5 samples per system and condition.
    pub e2e_samples: usize,
    /// Item 5 samples per condition for the iptables baseline (each is a legacy partial restore
    /// that reads and rewrites the whole 10,000 × 10 table: ~5–10 s).
    #[serde(default = "default_e2e_samples_ipt")]
    pub e2e_samples_iptables: usize,
    /// Item 7 scales.
    pub testrun_scales: Vec<usize>,
    /// Item 7 runs per figure.
    pub testrun_runs: usize,
    /// Largest predicted time of one baseline rule load, s; larger loads are not attempted.
    pub load_budget_s: f64,
    /// Time budget of the whole run, s: a phase that would start past its share of it is not
    /// run (its figures say so).
    pub run_budget_s: f64,
    /// Only item 5 ([`Config::only_e2e`]): the NodePort and BPF_PROG_TEST_RUN items are left out.
    #[serde(default)]
    pub only_e2e: bool,
    /// Only the per-packet items 7 and 8 ([`Config::only_per_packet`]).
    #[serde(default)]
    pub only_per_packet: bool,
    /// Only items 4 and 6 ([`Config::only_programming`]): programming time and memory.
    #[serde(default)]
    pub only_programming: bool,
    /// Only the IPv6 rows of items 1 and 3 ([`Config::only_ipv6`]).
    #[serde(default)]
    pub only_ipv6: bool,
    /// Only item 1's latency at its scales, kproxy also with generic XDP
    /// ([`Config::only_latency`]).
    #[serde(default)]
    pub only_latency: bool,
    /// An earlier kproxy binary measured in items 4 and 6 beside the one built (as system
    /// `kproxy-before`, right before it at each scale): before/after figures of one run.
    #[serde(default)]
    pub kproxy_before: Option<std::path::PathBuf>,
    /// Whether the paired request/response figure (`2-rate` [`PAIRED_P50`] `rr`) came from one
    /// client pinned with the pod servers (true since 2026-12-07 23:42) or from the rate run's
    /// four unpinned clients (false: results written before): the report words it accordingly
    /// and the comparison with a run of the other method leaves it out.
    #[serde(default)]
    pub rr_paired_pinned: bool,
    /// The CPU the new-connection latency loads ran on, client and pod servers
    /// ([`measure::latency_cpu`]; filled in by the run, `None` in runs before it pinned them).
    #[serde(default)]
    pub latency_cpu: Option<usize>,
}

impl Config {
    /// The full run (`make bench`, about 25 minutes on 2 cores).
    pub fn full() -> Self {
        Self {
            quick: false,
            scales: vec![1, 1_000, 10_000, 30_000],
            ipv6_scales: vec![1, 1_000],
            rate_scales: vec![1, 10_000],
            prog_scales: vec![1_000, 10_000, 30_000],
            e2e_scale: 10_000,
            reps: 5,
            reps_large: 5,
            nft_txn_services: 1000,
            duration_ms: 1000,
            np_duration_ms: 1000,
            change_samples: 5,
            change_samples_large: 2,
            e2e_samples: 12,
            e2e_samples_iptables: 6,
            testrun_scales: vec![1, 10, 100, 1_000, 10_000, 100_000],
            testrun_runs: 20_000,
            load_budget_s: 150.0,
            // The paired latency runs (twice as long) made items 1-2 ~220 s longer: at 1,260 s
            // the IPv6 latency step started past its share and was left out.
            run_budget_s: 1560.0,
            only_e2e: false,
            only_per_packet: false,
            only_programming: false,
            only_ipv6: false,
            only_latency: false,
            kproxy_before: None,
            rr_paired_pinned: true,
            latency_cpu: None,
        }
    }

    /// The smoke run (`make bench QUICK=1`, part of `make test`, ≤ 3 minutes).
    pub fn quick() -> Self {
        Self {
            quick: true,
            scales: vec![1, 100],
            ipv6_scales: vec![1, 100],
            rate_scales: vec![1, 100],
            prog_scales: vec![100, 300],
            e2e_scale: 300,
            reps: 1,
            reps_large: 1,
            nft_txn_services: 1000,
            duration_ms: 500,
            np_duration_ms: 400,
            change_samples: 2,
            change_samples_large: 2,
            e2e_samples: 3,
            e2e_samples_iptables: 3,
            testrun_scales: vec![1, 100, 1_000],
            testrun_runs: 1_000,
            load_budget_s: 20.0,
            run_budget_s: 200.0,
            only_e2e: false,
            only_per_packet: false,
            only_programming: false,
            only_ipv6: false,
            only_latency: false,
            kproxy_before: None,
            rr_paired_pinned: true,
            latency_cpu: None,
        }
    }
}

impl Config {
    /// The same run restricted to item 5 (and the programming and memory figures of its scale,
    /// which come from the same agent runs): the other items' scales are emptied.
    pub fn only_e2e(mut self) -> Self {
        self.scales.clear();
        self.ipv6_scales.clear();
        self.rate_scales.clear();
        self.prog_scales = vec![self.e2e_scale];
        self.testrun_scales.clear();
        self.only_e2e = true;
        self
    }

    /// The same run restricted to the per-packet costs: item 8 (bpf_stats under real traffic)
    /// and item 7 (BPF_PROG_TEST_RUN), about a minute; the other items' scales are emptied.
    pub fn only_per_packet(mut self) -> Self {
        self.scales.clear();
        self.ipv6_scales.clear();
        self.rate_scales.clear();
        self.prog_scales.clear();
        self.only_per_packet = true;
        self
    }
    /// The same run restricted to items 4 and 6 (programming from scratch, one change, agent
    /// and rule memory, at the same scales): no latency, rate, NodePort, change → connection,
    /// bpf_stats or BPF_PROG_TEST_RUN item.
    pub fn only_programming(mut self) -> Self {
        self.scales.clear();
        self.ipv6_scales.clear();
        self.rate_scales.clear();
        self.testrun_scales.clear();
        self.e2e_scale = 0;
        self.only_programming = true;
        self
    }

    /// The same run restricted to the IPv6 rows of items 1 and 3 (ClusterIP latency at
    /// [`Config::ipv6_scales`] and NodePort TCP, each in a dual-stack lab of its own): about two
    /// minutes.
    pub fn only_ipv6(mut self) -> Self {
        self.scales.clear();
        self.rate_scales.clear();
        self.prog_scales.clear();
        self.testrun_scales.clear();
        self.e2e_scale = 0;
        self.only_ipv6 = true;
        self
    }

    /// The same run restricted to item 1 (ClusterIP new-connection latency) at 1 and 1,000
    /// services, floor and kproxy only (kproxy also with generic XDP on `eth0`, `--xdp-mode
    /// generic`, as `kproxy-generic`: the XDP program its default leaves off veth devices; with
    /// its TC programs as clsact filters, [`KPROXY_CLSACT`]; with host routing; with the socket
    /// LB for pods; the floor across empty TC programs on kproxy's
    /// hooks, [`FLOOR_TC_HOOKS`] and [`FLOOR_CLSACT_HOOKS`]), twice the repetitions, and the
    /// kproxy programs' run time per connection (bpf_stats): a few minutes, to compare datapath
    /// changes on the new-connection path.
    pub fn only_latency(mut self) -> Self {
        self.scales.retain(|&n| n <= 1_000);
        self.reps *= 2;
        self.ipv6_scales.clear();
        self.rate_scales.clear();
        self.prog_scales.clear();
        self.testrun_scales.clear();
        self.e2e_scale = 0;
        self.only_latency = true;
        self
    }

    /// Whether the items measured on packets (NodePort, bpf_stats, BPF_PROG_TEST_RUN) run.
    fn packet_items(&self) -> bool {
        !self.only_e2e && !self.only_programming && !self.only_ipv6 && !self.only_latency
    }

    /// The systems of item 1 (IPv4).
    fn latency_systems(&self) -> &'static [Sys] {
        if self.only_latency { &Sys::LATENCY } else { &Sys::ALL }
    }
}

fn default_nft_txn() -> usize {
    1000
}

fn default_e2e_samples_ipt() -> usize {
    12
}

fn default_change_samples_large() -> usize {
    2
}

/// Wall-clock time of one step of a run (printed as it ends, listed in the report).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTime {
    /// What the step did.
    pub step: String,
    /// Seconds it took.
    pub secs: f64,
    /// CPU pressure over the whole step: % of its wall time during which some runnable task
    /// waited for a CPU (the `some total` stall counter of /proc/pressure/cpu at its start and
    /// end; runs recorded before that read `some avg10` at the step's end). Above
    /// [`NOISY_PRESSURE`] other work competed with the bench.
    pub cpu_pressure: Option<f64>,
}

/// CPU pressure (%) above which a step's figures are flagged as taken on a noisy machine. The
/// bench's own load (4 client threads, servers, softirqs on 2 cores) reaches ~45% in its
/// latency steps on a quiet machine; runs beside other work read 77–91%.
pub const NOISY_PRESSURE: f64 = 60.0;

/// `some total` of /proc/pressure/cpu: microseconds some runnable task waited for a CPU since
/// boot.
pub fn cpu_stall_us() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let line = s.lines().find(|l| l.starts_with("some"))?;
    line.split_whitespace().find_map(|kv| kv.strip_prefix("total="))?.parse().ok()
}

/// CPU pressure (%) between two readings of [`cpu_stall_us`] taken `secs` apart.
pub fn pressure_between(stall0: u64, stall1: u64, secs: f64) -> Option<f64> {
    (secs > 0.0 && stall1 >= stall0)
        .then(|| (stall1 - stall0) as f64 / (secs * 1e6) * 100.0)
        .map(|p| p.min(100.0))
}

/// The machine the run was taken on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Online CPUs.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// MemTotal, bytes.
    pub memory_bytes: u64,
    /// iptables version line.
    pub iptables: String,
    /// nft version line.
    pub nft: String,
    /// What was measured: the workspace's revision (`git describe --always`, `-dirty` when
    /// files differed from it, which the build measured too), or the directory of the binaries
    /// where `--bin-dir` named another build. Read when the run starts.
    #[serde(default)]
    pub source: String,
    /// Whether the binaries measured were built from a worktree with uncommitted changes.
    #[serde(default)]
    pub source_dirty: bool,
}

/// Everything a run produced (`results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// UTC start time (RFC 3339).
    pub started: String,
    /// Seconds the run took.
    pub wall_s: f64,
    /// Machine facts.
    pub machine: Machine,
    /// Configuration.
    pub config: Config,
    /// Figures.
    pub figures: Vec<Figure>,
    /// Facts about the run the tables need (sizes of inputs, budget decisions).
    pub notes: Vec<String>,
    /// Wall-clock time of each step.
    #[serde(default)]
    pub steps: Vec<StepTime>,
    /// Figures worse than in the previous run by more than their noise (`None`: not compared).
    #[serde(default)]
    pub regressions: Option<Vec<compare::Regression>>,
    /// The previous run compared with (its start time).
    #[serde(default)]
    pub compared_with: Option<String>,
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine((source, source_dirty): (String, bool)) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()
        })
        .map_or(0, |kb: u64| kb * 1024);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel: sh("uname -r"),
        memory_bytes: mem,
        iptables: sh("iptables-legacy --version"),
        nft: sh("nft --version"),
        source,
        source_dirty,
    }
}

/// [`Machine::source`] and [`Machine::source_dirty`], read before anything is measured (the
/// build just made): the workspace's revision, `-dirty` where a file the build reads differs
/// from it (changed, staged or untracked; earlier results under `bench/results` do not count).
fn source() -> (String, bool) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(std::path::Path::new("."));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["describe", "--always", "--abbrev=12"]);
    let changes = git(&[
        "status",
        "--porcelain",
        "--untracked-files=all",
        "--",
        ".",
        ":(exclude)bench/results",
    ]);
    let (rev, dirty) = match (rev, changes) {
        (Some(r), Some(c)) if !c.is_empty() => (format!("{r}-dirty"), true),
        (Some(r), Some(_)) => (r, false),
        _ => ("unknown revision (git describe or git status failed)".to_string(), false),
    };
    let own = root.join("target/release");
    match std::env::var_os("KPROXY_BIN_DIR").map(std::path::PathBuf::from) {
        Some(d) if std::fs::canonicalize(&d).ok() != std::fs::canonicalize(&own).ok() => {
            (format!("binaries of {} (the harness: {rev})", d.display()), false)
        }
        _ => (rev, dirty),
    }
}

/// UTC time now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    sh("date -u +%Y-%m-%dT%H:%M:%SZ")
}

/// Item 1's paired figure: the p50 of a system's service connections (the floor's: to the
/// endpoint's usual port) over the p50 of the direct connections to the endpoint (the same
/// server pod, [`workload::DIRECT_PORT`]) that took turns with them in one load generator, on
/// the same client port range and through the same loaded system. What the system adds to a
/// connection, with the machine's drift between runs taken out; the floor's is the control (its
/// two addresses are one path: ~1.00×). A system's hooks' cost on traffic that is not a
/// service's (which the direct connections pay too) is item 8's. Item 2 has it for
/// request/response (variant `rr`): one client, pinned with the pod servers during the latency
/// step, keeps a connection to each address and takes turns between them
/// ([`Config::rr_paired_pinned`]; before, each of the rate run's four clients did, unpinned).
pub const PAIRED_P50: &str = "p50_over_direct";

/// Item 2's paired request/response figure (item, metric, variant): [`PAIRED_P50`] of `rr`.
pub const PAIRED_RR: (&str, &str, &str) = ("2-rate", PAIRED_P50, "rr");

/// [`PAIRED_P50`] of the p99s.
pub const PAIRED_P99: &str = "p99_over_direct";

/// Item 1's latency figures of the service's connections (item, metric, variant).
fn unpaired_figures() -> Vec<(&'static str, &'static str, &'static str)> {
    ["p50_us", "p99_us"].map(|m| ("1-latency", m, "")).to_vec()
}

/// Item 1's latency figures (item, metric, variant).
fn latency_figures() -> Vec<(&'static str, &'static str, &'static str)> {
    [unpaired_figures(), paired_figures()].concat()
}

/// Item 1's paired figures (item, metric, variant): against the direct connections.
fn paired_figures() -> Vec<(&'static str, &'static str, &'static str)> {
    [PAIRED_P50, PAIRED_P99, "direct_p50_us", "direct_p99_us"]
        .map(|m| ("1-latency", m, ""))
        .to_vec()
}

/// Every figure of items 1 and 2 of a system at a scale (`rates`: a scale of item 2).
fn clusterip_figures(rates: bool) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut figs = latency_figures();
    if rates {
        for v in ["connect", "rr"] {
            figs.extend([("2-rate", "rate_per_s", v), ("2-rate", "cpu_us_per_txn", v)]);
        }
        figs.push(PAIRED_RR);
    }
    figs
}

/// The ClusterIP system of kproxy with `--bpf-host-routing` (translated flows delivered to the
/// backend's veth or the next hop by the datapath, past the host stack).
pub const HOST_ROUTING: &str = "kproxy-host-routing";

/// The ClusterIP system of the floor with an empty TC program on each hook kproxy's programs
/// use (`--only-latency` only): what hooking alone costs a connection.
pub const FLOOR_TC_HOOKS: &str = "floor-tc-hooks";

/// [`FLOOR_TC_HOOKS`] with the empty programs attached as kproxy attaches its own: netlink
/// filters of a clsact qdisc (`--only-latency` only).
pub const FLOOR_CLSACT_HOOKS: &str = "floor-clsact-hooks";

/// kproxy with its TC programs as clsact filters, `--tc-attach netlink` (`--only-latency`
/// only): beside `kproxy` (tcx links on Linux 6.6+), what the attachment's kind costs.
pub const KPROXY_CLSACT: &str = "kproxy-clsact";

/// The ClusterIP system of kproxy with the socket LB for pods (`--cgroup-path` on the client
/// pod's cgroup, `--socket-lb-pods`): the client's connect() is sent to the backend, so its
/// packets need no translation.
pub const SOCKET_LB: &str = "kproxy-socket-lb";

/// The label of a system's direct connections in the `--only-latency` bpf_stats
/// (`conn_stats`): the same load to the endpoint's second port ([`workload::DIRECT_PORT`])
/// instead of the service, through the same loaded system.
pub fn direct_conns(sys: &str) -> String {
    format!("{sys} (direct connections)")
}

/// Systems of the ClusterIP phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sys {
    Floor,
    Kproxy,
    KproxyHostRouting,
    /// kproxy with the socket LB for pods ([`SOCKET_LB`]).
    KproxySocketLb,
    /// kproxy with generic XDP on `eth0` (`--xdp-mode generic`; `--only-latency` only).
    KproxyGeneric,
    /// kproxy with its TC programs as clsact filters (`--tc-attach netlink`; its default is
    /// tcx links where the kernel has them; `--only-latency` only).
    KproxyClsact,
    /// The floor's traffic with an empty TC program (tcx, `TCX_NEXT`) on each hook of kproxy's
    /// TC programs: node 0's pod veths, ingress and egress, and its `eth0` ingress
    /// ([`FLOOR_TC_HOOKS`]; `--only-latency` only).
    FloorTcHooks,
    /// [`Sys::FloorTcHooks`] through clsact filters ([`FLOOR_CLSACT_HOOKS`]).
    FloorClsactHooks,
    Iptables,
    Nftables,
}

impl Sys {
    /// Every system, in the order of the first repetition.
    const ALL: [Sys; 6] = [
        Sys::Floor,
        Sys::Kproxy,
        Sys::KproxyHostRouting,
        Sys::KproxySocketLb,
        Sys::Iptables,
        Sys::Nftables,
    ];

    /// The systems of item 1 over IPv6 ("iptables" is then ip6tables, "nftables" table
    /// `ip6 kube-proxy`).
    const IPV6: [Sys; 4] = [Sys::Floor, Sys::Kproxy, Sys::Iptables, Sys::Nftables];

    /// The systems of `--only-latency`.
    const LATENCY: [Sys; 8] = [
        Sys::Floor,
        Sys::Kproxy,
        Sys::KproxyGeneric,
        Sys::KproxyClsact,
        Sys::KproxyHostRouting,
        Sys::KproxySocketLb,
        Sys::FloorTcHooks,
        Sys::FloorClsactHooks,
    ];

    /// A floor (no system translating the service): its connections go to the pod address.
    fn is_floor(self) -> bool {
        matches!(self, Sys::Floor | Sys::FloorTcHooks | Sys::FloorClsactHooks)
    }

    /// Gives the client namespace `ns` this system's own client port range (see
    /// `clusterip_one`; the sysctl covers IPv6 sockets too).
    fn use_client_ports(self, ns: &str) {
        let ports = match self {
            Sys::Floor => "20000 29999",
            Sys::Kproxy => "30000 39999",
            Sys::KproxyHostRouting => "10000 19999",
            Sys::KproxySocketLb => "61000 64999",
            Sys::KproxyGeneric => "40000 49999",
            // nftables is not in `--only-latency`, the only run with kproxy-clsact.
            Sys::KproxyClsact => "50000 60999",
            Sys::FloorTcHooks => "1024 5999",
            Sys::FloorClsactHooks => "6000 9999",
            Sys::Iptables => "40000 49999",
            Sys::Nftables => "50000 60999",
        };
        let range = format!("net.ipv4.ip_local_port_range={ports}");
        let _ = lab::exec(ns, &["sysctl", "-qw", &range]);
    }

    fn name(self) -> &'static str {
        match self {
            Sys::Floor => "floor",
            Sys::Kproxy => "kproxy",
            Sys::KproxyHostRouting => HOST_ROUTING,
            Sys::KproxySocketLb => SOCKET_LB,
            Sys::KproxyGeneric => "kproxy-generic",
            Sys::KproxyClsact => KPROXY_CLSACT,
            Sys::FloorTcHooks => FLOOR_TC_HOOKS,
            Sys::FloorClsactHooks => FLOOR_CLSACT_HOOKS,
            Sys::Iptables => "iptables",
            Sys::Nftables => "nftables",
        }
    }
}

fn rotate<T: Copy>(v: &[T], k: usize) -> Vec<T> {
    (0..v.len()).map(|i| v[(i + k) % v.len()]).collect()
}

/// Predicts a load time at `n` from one at `n0` (`t0` s) with growth exponent `exp`.
/// The systems of item 5: kproxy on its manifest source, kproxy on the Kubernetes API source,
/// and the baselines.
pub const E2E_SYSTEMS: [&str; 4] = ["kproxy", "kproxy-kube", "iptables", "nftables"];

/// Item 5's split of a kproxy change at rest: change → programmed (p50, p99), programmed → first
/// reply (p50), and the sync itself (p50).
pub const E2E_BREAKDOWN: [&str; 4] = ["agent_p50_ms", "agent_p99_ms", "conn_p50_ms", "sync_ms"];

/// Interval between the new connections of the change-to-connection probe (its resolution).
const E2E_PROBE_EVERY: Duration = Duration::from_millis(1);

/// A change-to-first-connection sample above this (ms; goal 12's limit for the Kubernetes
/// source) gets a note of how the probe's attempts went ([`systems::FirstConnection`]) and, for
/// kproxy at rest, when the agent's sync ended: a late sync, a datapath that refused or lost the
/// first connections after it, and a probe that stalled read apart.
const E2E_SLOW_MS: f64 = 20.0;

/// Port of the test API server of item 5 (in the client namespace).
const API_PORT: u16 = 16443;

/// The system name of [`Config::kproxy_before`]'s figures.
pub const KPROXY_BEFORE: &str = "kproxy-before";

/// Agent flags of the programming and change runs: no periodic resync during the measurement;
/// N × (1 entry + 10 slots) and N × 10 backends exceed the default map sizes at 30,000.
const KPROXY_BENCH_ARGS: [&str; 6] =
    ["--sync-period-secs", "3600", "--max-services", "1048576", "--max-backends", "524288"];

/// The `q` quantile of `v` (nearest rank; `v` is sorted in place). NaN when empty.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn predict(t0: f64, n0: usize, n: usize, exp: f64) -> f64 {
    t0 * (n as f64 / n0.max(1) as f64).powf(exp)
}

/// The systems of the NodePort item (besides the references): kproxy with native XDP on the
/// external device (the lab runs XDP on the veth peers, as a NIC's driver would allow), kproxy
/// with generic XDP, kproxy with TC only (its default on veth), and the baselines.
pub const NODEPORT_SYSTEMS: [&str; 5] =
    ["kproxy", "kproxy-generic", "kproxy-tc", "iptables", "nftables"];

/// The NodePort figures of each system and backend placement.
const NODEPORT_METRICS: [&str; 6] =
    ["udp_pps", "udp_cpu_ns_per_pkt", "tcp_bps", "live_pps", "live_ns_per_frame", "live_delivered"];

/// The live-frame generator's figures (see [`livegen`]).
const LIVE_METRICS: [&str; 3] = ["live_pps", "live_ns_per_frame", "live_delivered"];

/// Agent flags of each kproxy NodePort system.
fn nodeport_agent_args(sys: &str) -> &'static [&'static str] {
    match sys {
        "kproxy" => &["--xdp-mode", "native"],
        "kproxy-generic" => &["--xdp-mode", "generic"],
        "kproxy-tc" => &["--no-xdp"],
        _ => &[],
    }
}

/// The traffic windows of the bpf_stats step, each one TCP flow of iperf3 (a packet rate high
/// enough that the programs run with warm caches): (window, traffic).
pub const BPF_STATS_WINDOWS: [(&str, &str); 4] = [
    (
        "clusterip-local",
        "one iperf3 TCP flow from a pod to a ClusterIP whose backend is on the same node",
    ),
    (
        "clusterip-remote",
        "one iperf3 TCP flow from a pod to a ClusterIP whose backend is on the other node",
    ),
    (
        "pod-direct",
        "one iperf3 TCP flow from a pod to a pod address on the other node (not service traffic)",
    ),
    (
        "nodeport-remote",
        "one iperf3 TCP flow from the external client to a NodePort whose backend is on the other node",
    ),
];

/// The windows of the bpf_stats step with the agent's `--bpf-host-routing` (opt-in): the TC
/// programs deliver translated packets themselves, to a local pod with `bpf_redirect_peer`, so
/// that the host side of the client pod's veth, `kp_tc_to_pod`'s hook, does not see its
/// service replies at all (goal 10.1's "or not run at all"); the translation of a remote
/// backend's replies moves to TC on the external device (`kp_tc_ext_xdp`, behind XDP).
pub const BPF_STATS_HR_WINDOWS: [(&str, &str); 2] = [
    (
        "hr-clusterip-local",
        "eBPF host routing: one iperf3 TCP flow from a pod to a ClusterIP whose backend is on the same node",
    ),
    (
        "hr-clusterip-remote",
        "eBPF host routing: one iperf3 TCP flow from a pod to a ClusterIP whose backend is on the other node",
    ),
];

/// Window names of [`BPF_STATS_HR_WINDOWS`] start so (the rest names the traffic, as in
/// [`BPF_STATS_WINDOWS`]).
const HR_PREFIX: &str = "hr-";

/// The IPv6 windows of the bpf_stats step (goal 13), in a dual-stack lab of their own with the
/// agent's `--enable-ipv6` (the IPv4 windows above keep their IPv4-only lab): each IPv6 window
/// beside an IPv4 window of the same shape in that same lab, so that the IPv6/IPv4 ratio
/// compares one agent, one lab and one set of programs.
pub const BPF_STATS6_WINDOWS: [(&str, &str); 8] = [
    (
        "ds-clusterip6-local",
        "dual-stack lab: one iperf3 TCP flow from a pod to an IPv6 ClusterIP whose backend is on the same node",
    ),
    ("ds-clusterip4-local", "dual-stack lab: the same over the service's IPv4 ClusterIP"),
    (
        "ds-clusterip6-remote",
        "dual-stack lab: one iperf3 TCP flow from a pod to an IPv6 ClusterIP whose backend is on the other node",
    ),
    ("ds-clusterip4-remote", "dual-stack lab: the same over the service's IPv4 ClusterIP"),
    (
        "ds-clusterip6-local-paced",
        "dual-stack lab, both families paced to one rate: the IPv6 ClusterIP flow to the same node's backend",
    ),
    ("ds-clusterip4-local-paced", "dual-stack lab, paced: the same over the IPv4 ClusterIP"),
    (
        "ds-clusterip6-remote-paced",
        "dual-stack lab, both families paced to one rate: the IPv6 ClusterIP flow to the other node's backend",
    ),
    ("ds-clusterip4-remote-paced", "dual-stack lab, paced: the same over the IPv4 ClusterIP"),
];

/// (IPv6 window, IPv4 window of the same shape) of [`BPF_STATS6_WINDOWS`], each flow at the
/// full speed of its family.
pub const BPF_STATS6_PAIRS: [(&str, &str); 2] = [
    ("ds-clusterip6-local", "ds-clusterip4-local"),
    ("ds-clusterip6-remote", "ds-clusterip4-remote"),
];

/// The same pairs with both flows paced to one rate ([`PACE_SHARE`]): goal 13 compares these.
/// At full speed the IPv6 flow moves fewer packets than the IPv4 one (the kernel's IPv6 stack
/// costs more per packet), so the programs on its replies run less often, each run with colder
/// caches, and its ns per run measures the packet rate as much as the program.
pub const BPF_STATS6_PACED_PAIRS: [(&str, &str); 2] = [
    ("ds-clusterip6-local-paced", "ds-clusterip4-local-paced"),
    ("ds-clusterip6-remote-paced", "ds-clusterip4-remote-paced"),
];

/// The paced windows' rate: this share of the slowest of the dual-stack lab's four full-speed
/// flows, measured (one window each) just before the windows.
pub const PACE_SHARE: f64 = 0.7;

/// Window names of the paced windows end so.
const PACED_SUFFIX: &str = "-paced";

/// Metric of each window's iperf3 throughput (bits/s received).
pub const FLOW_BPS: &str = "tcp_bps";

/// The per-program figures of the bpf_stats step: (metric, program, window). Each also has a
/// net figure ([`net_metric`]): the program's ns per run minus its floor ([`floor_metric`]) in
/// the same window: for the TC programs on the pods' veths an empty TC program chained just
/// before them on the same hook ([`BPF_STATS_EMPTY_TC`]), for the others (and where tcx is
/// missing) the lab's `XDP_PASS` (metric `empty_ns`). The TC entry programs run the fast path
/// of both families, so in the IPv6 windows their figure is IPv6's.
pub const BPF_STATS_FIGURES: [(&str, &str, &str); 38] = [
    ("from_pod_ns", "kp_tc_from_pod", "clusterip-local"),
    ("to_pod_ns", "kp_tc_to_pod", "clusterip-local"),
    ("from_pod_ns", "kp_tc_from_pod", "clusterip-remote"),
    ("to_pod_ns", "kp_tc_to_pod", "clusterip-remote"),
    ("xdp_ext_ns", "kp_xdp_ext", "clusterip-remote"),
    ("from_pod_ns", "kp_tc_from_pod", "pod-direct"),
    ("to_pod_ns", "kp_tc_to_pod", "pod-direct"),
    ("xdp_ext_ns", "kp_xdp_ext", "pod-direct"),
    ("xdp_ext_ns", "kp_xdp_ext", "nodeport-remote"),
    ("from_pod_ns", "kp_tc_from_pod", "hr-clusterip-local"),
    ("to_pod_ns", "kp_tc_to_pod", "hr-clusterip-local"),
    ("from_pod_ns", "kp_tc_from_pod", "hr-clusterip-remote"),
    ("to_pod_ns", "kp_tc_to_pod", "hr-clusterip-remote"),
    ("tc_ext_ns", "kp_tc_ext_xdp", "hr-clusterip-remote"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip6-local"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip6-local"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip4-local"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip4-local"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip6-remote"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip6-remote"),
    ("xdp_ext_ns", "kp_xdp_ext", "ds-clusterip6-remote"),
    ("tc_ext_ns", "kp_tc_ext_xdp", "ds-clusterip6-remote"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip4-remote"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip4-remote"),
    ("xdp_ext_ns", "kp_xdp_ext", "ds-clusterip4-remote"),
    ("tc_ext_ns", "kp_tc_ext_xdp", "ds-clusterip4-remote"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip6-local-paced"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip6-local-paced"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip4-local-paced"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip4-local-paced"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip6-remote-paced"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip6-remote-paced"),
    ("xdp_ext_ns", "kp_xdp_ext", "ds-clusterip6-remote-paced"),
    ("tc_ext_ns", "kp_tc_ext_xdp", "ds-clusterip6-remote-paced"),
    ("from_pod_ns", "kp_tc_from_pod", "ds-clusterip4-remote-paced"),
    ("to_pod_ns", "kp_tc_to_pod", "ds-clusterip4-remote-paced"),
    ("xdp_ext_ns", "kp_xdp_ext", "ds-clusterip4-remote-paced"),
    ("tc_ext_ns", "kp_tc_ext_xdp", "ds-clusterip4-remote-paced"),
];

/// Metric of the empty program's ns per run in each bpf_stats window.
pub const BPF_STATS_EMPTY: &str = "empty_ns";

/// The empty TC programs the bpf_stats step chains in front of kproxy's on one hook of node 0's
/// pod veths or its external device (tcx links at the front of the hook, Linux 6.6+; kproxy's
/// tcx links or clsact filters come after them): two per hook, each a (metric, program name). The second runs
/// directly before kproxy's program, on the same packets, after another program ran (as
/// kproxy's does): it is the floor of kproxy's figures on that hook. The first one shows what
/// running first costs (the colder caches of the kernel's own timing).
pub struct EmptyTcHook {
    /// The metric of kproxy's program on the hook.
    pub of: &'static str,
    /// Egress (`kp_tc_to_pod`), else ingress (`kp_tc_from_pod`, `kp_tc_ext_xdp`).
    pub egress: bool,
    /// On node 0's external device (`kp_tc_ext_xdp`, TC behind XDP), else on its pod veths.
    pub external: bool,
    /// The program that runs first.
    pub first: (&'static str, &'static str),
    /// The program just before kproxy's: the floor.
    pub floor: (&'static str, &'static str),
}

impl EmptyTcHook {
    /// The devices of node 0 the hook is on: its external device, or its pod veths `veths`.
    fn devices(&self, veths: &[String]) -> Vec<String> {
        if self.external { vec![lab::EXT_DEV.to_string()] } else { veths.to_vec() }
    }

    /// Both programs, in the order they run.
    pub fn programs(&self) -> [(&'static str, &'static str); 2] {
        [self.first, self.floor]
    }
}

/// The hooks of [`EmptyTcHook`]: ingress and egress of the pod veths, ingress of the external
/// device.
pub const BPF_STATS_EMPTY_TC: [EmptyTcHook; 3] = [
    EmptyTcHook {
        of: "from_pod_ns",
        egress: false,
        external: false,
        first: ("empty_tc_in_first_ns", "kpl_tc_in_0"),
        floor: ("empty_tc_in_ns", "kpl_tc_in_1"),
    },
    EmptyTcHook {
        of: "to_pod_ns",
        egress: true,
        external: false,
        first: ("empty_tc_out_first_ns", "kpl_tc_out_0"),
        floor: ("empty_tc_out_ns", "kpl_tc_out_1"),
    },
    EmptyTcHook {
        of: "tc_ext_ns",
        egress: false,
        external: true,
        first: ("empty_tc_ext_first_ns", "kpl_tc_ext_0"),
        floor: ("empty_tc_ext_ns", "kpl_tc_ext_1"),
    },
];

/// The empty TC programs chained before the program of bpf_stats metric `metric`, if it is a
/// pod program.
pub fn empty_tc_of(metric: &str) -> Option<&'static EmptyTcHook> {
    BPF_STATS_EMPTY_TC.iter().find(|h| h.of == metric)
}

/// Whether bpf_stats window `w` has a figure of the program on hook `h` (whose floor are the
/// hook's empty TC programs): no pod program in a NodePort window, whose traffic crosses no pod
/// veth of node 0.
fn has_figures_of(w: &str, h: &EmptyTcHook) -> bool {
    BPF_STATS_FIGURES.iter().any(|f| f.2 == w && f.0 == h.of)
}

/// The floor of a bpf_stats metric: the empty TC program directly before the program at the same
/// hook for the TC programs ([`BPF_STATS_EMPTY_TC`]), the empty XDP program for `kp_xdp_ext`
/// (XDP has no chaining).
pub fn floor_metric(metric: &str) -> &'static str {
    empty_tc_of(metric).map_or(BPF_STATS_EMPTY, |h| h.floor.0)
}

/// The net figure of a bpf_stats metric (`from_pod_ns` → `from_pod_net_ns`).
pub fn net_metric(metric: &str) -> String {
    format!("{}_net_ns", metric.trim_end_matches("_ns"))
}

/// The runs per second of a bpf_stats metric's program in its window (`from_pod_ns` →
/// `from_pod_runs_per_s`): how often it ran, which sets how warm each run's caches were.
pub fn runs_metric(metric: &str) -> String {
    format!("{}_runs_per_s", metric.trim_end_matches("_ns"))
}

/// Growth exponents of load time used for budget predictions: iptables-restore and nft -f of
/// single-endpoint services grow about linearly; nft -f of services with several endpoints
/// (one anonymous verdict map each) grows about quadratically on this kernel (1,000 × 10: 3.5 s,
/// 3,000 × 10: 13.5 s in transactions of 1,000 services).
const IPT_EXP: f64 = 1.2;
const NFT_EXP_SINGLE: f64 = 1.2;
const NFT_EXP_MAPS: f64 = 2.0;

/// One per-program figure of one bpf_stats window (`None`: the program did not run enough).
struct StatSample {
    metric: String,
    program: &'static str,
    window: &'static str,
    value: Option<f64>,
}

struct Bench<'a> {
    cfg: &'a Config,
    lab: Lab,
    rec: Recorder,
    notes: Vec<String>,
    manifests: PathBuf,
    node_ns: String,
    client_pod_ns: String,
    /// The address of item 1's direct connections ([`PAIRED_P50`]), or why there is none.
    direct: Result<SocketAddrV4, String>,
    /// The client pod's cgroup (a cgroup v2 hierarchy of the run's own) for [`SOCKET_LB`].
    client_cgroup: Option<crate::hostnet::Cgroups>,
    /// Last measured (services, seconds) of a full rule load per (baseline is nft,
    /// endpoints per service), for budget predictions.
    loads: std::collections::BTreeMap<(bool, usize), (usize, f64)>,
    /// Wall-clock time of each step so far, and when the current step began.
    steps: Vec<StepTime>,
    step_t0: Instant,
    /// [`cpu_stall_us`] at `step_t0`.
    step_stall0: Option<u64>,
    /// Last (n, seconds) the agent needed to program n services × 10 endpoints.
    kproxy_ready: Option<(usize, f64)>,
    /// Start of the run.
    t0: Instant,
}

/// Writes `text` to `dir/name` atomically (hidden temp file, then rename).
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark and writes `results.json`, `report.md` and the plots into `out`.
pub fn run(cfg: &Config, out: &Path) -> Result<Results> {
    run_compared(cfg, out, None)
}

/// [`run`], and compares the figures with the `results.json` at `previous` (if it exists and
/// parses): the report lists every figure that got worse by more than its noise.
pub fn run_compared(cfg: &Config, out: &Path, previous: Option<&Path>) -> Result<Results> {
    let before: Option<Results> = previous
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str(&text).ok());
    let started = utc_now();
    let t0 = Instant::now();
    // Before the run writes anything: what was built and is about to be measured.
    let source = source();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _ = std::process::Command::new("sh")
        .args(["-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf"])
        .status();
    for tool in ["iptables-legacy-restore", "nft", "iperf3", "nsenter"] {
        anyhow::ensure!(
            !sh(&format!("command -v {tool}")).is_empty(),
            "{tool} is missing: run `make setup`"
        );
    }
    lab::find_bin("kproxy-loadgen")?;
    lab::find_bin("kproxy")?;
    let mdir = TempDir(
        std::env::temp_dir().join(format!("kproxy-bench-{}-manifests", std::process::id())),
    );
    std::fs::create_dir_all(&mdir.0)?;

    eprintln!("[bench] building the lab (2 nodes, 2 pods each)");
    let lab = bench_lab(false)?;
    // One client address opens hundreds of thousands of connections to one server address and
    // port in a run: without TIME_WAIT reuse, connect() scans an ephemeral port range ever more
    // full of TIME_WAIT sockets (14,000 after a few runs): in a lab by hand, p99 went from
    // 0.4 ms to 6–7 ms within three 2 s runs (p50 to 6 ms), and stayed at 0.35 ms with reuse.
    // (The ~16 ms p99 seen in the bench had a second cause: see the port ranges in
    // `clusterip_one`.)
    let client = lab.pod(0, 0).context("client pod")?.ns.clone();
    let sysctl = lab::exec(&client, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    anyhow::ensure!(sysctl.status.success(), "sysctl net.ipv4.tcp_tw_reuse=1 in {client} failed");
    let iperfs = iperf_servers(&lab)?;
    // Without it, item 1 is measured unpaired and its paired figures failed with the reason.
    let (direct_proc, direct) = match direct_server(&lab) {
        Ok((p, addr)) => (Some(p), Ok(addr)),
        Err(e) => (None, Err(format!("starting the direct connections' server: {e:#}"))),
    };
    let node_ns = lab.node(0).ns.clone();
    let client_pod_ns = lab.pod(0, 0).context("client pod")?.ns.clone();
    let mut b = Bench {
        cfg,
        lab,
        rec: Recorder::default(),
        notes: Vec::new(),
        manifests: mdir.0.clone(),
        node_ns,
        client_pod_ns,
        direct,
        client_cgroup: None,
        loads: Default::default(),
        steps: Vec::new(),
        step_t0: Instant::now(),
        step_stall0: cpu_stall_us(),
        kproxy_ready: None,
        t0,
    };
    b.plan();
    b.step("lab set-up");
    b.clusterip_phase();
    if !cfg.ipv6_scales.is_empty() {
        b.clusterip6_phase();
        b.step("1 over IPv6: ClusterIP latency (dual-stack lab)");
        b.nodeport6_phase();
        b.step("3 over IPv6: NodePort TCP (dual-stack lab)");
    }
    if cfg.packet_items() {
        b.bpf_stats_phase();
        b.step("8: per-program cost (bpf_stats)");
        b.bpf_stats6_phase();
        b.step("8: per-program cost over IPv6 (bpf_stats, dual-stack lab)");
        if !cfg.only_per_packet {
            b.nodeport_phase();
        }
    }
    b.programming_phase();
    if cfg.packet_items() {
        b.testrun_phase();
        b.step("7: BPF_PROG_TEST_RUN cost");
    }
    let _ = systems::iptables_flush(&b.node_ns);
    let _ = systems::nft_unload(&b.node_ns);
    drop(iperfs);
    drop(direct_proc);
    b.step("cleanup");
    let Bench { lab, rec, notes, steps, .. } = b;
    lab.down()?;
    let results = Results {
        started,
        wall_s: t0.elapsed().as_secs_f64(),
        machine: machine(source),
        config: Config { latency_cpu: Some(measure::latency_cpu()), ..cfg.clone() },
        figures: rec.finish(),
        notes,
        steps,
        regressions: None,
        compared_with: None,
    };
    let mut results = results;
    if let Some(b) = &before {
        results.regressions = compare::regressions(b, &results);
        results.compared_with = Some(b.started.clone());
    }
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(out.join("report.md"), report::markdown(&results))?;
    report::plots(out)?;
    Ok(results)
}

/// Rewrites `report.md` and the plots of the run in `dir` from its `results.json`.
pub fn rewrite_report(dir: &Path) -> Result<()> {
    let path = dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let results: Results =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    write_atomic(dir, "report.md", &report::markdown(&results))?;
    report::plots(dir)
}

impl Bench<'_> {
    /// Ends a step: records and prints how long it took since the previous one.
    fn step(&mut self, what: &str) {
        let secs = self.step_t0.elapsed().as_secs_f64();
        self.step_t0 = Instant::now();
        let stall = cpu_stall_us();
        let cpu_pressure = match (self.step_stall0, stall) {
            (Some(a), Some(b)) => pressure_between(a, b, secs),
            _ => None,
        };
        self.step_stall0 = stall;
        eprintln!(
            "[bench] {what}: {secs:.1} s (run so far {:.0} s; CPU pressure {})",
            self.t0.elapsed().as_secs_f64(),
            cpu_pressure.map_or("n/a".into(), |p| format!("{p:.1}%"))
        );
        self.steps.push(StepTime { step: what.to_string(), secs, cpu_pressure });
    }

    /// Declares every figure the run is meant to produce.
    fn plan(&mut self) {
        let c = self.cfg;
        for &n in &c.ipv6_scales {
            for s in Sys::IPV6 {
                for m in ["p50_us", "p99_us"] {
                    self.rec.plan("1-latency", m, s.name(), n, IPV6_VARIANT);
                }
            }
        }
        if !c.ipv6_scales.is_empty() {
            for s in NODEPORT6_SYSTEMS {
                self.rec.plan("3-nodeport", "tcp_bps", s, 3, NODEPORT6_VARIANT);
            }
        }
        for &n in &c.scales {
            for &s in c.latency_systems() {
                for (item, m, v) in clusterip_figures(c.rate_scales.contains(&n)) {
                    self.rec.plan(item, m, s.name(), n, v);
                }
            }
        }
        for s in NODEPORT_SYSTEMS {
            for v in ["local", "remote"] {
                if !c.packet_items() || c.only_per_packet {
                    continue;
                }
                for m in NODEPORT_METRICS {
                    self.rec.plan("3-nodeport", m, s, 3, v);
                }
            }
        }
        if c.packet_items() && !c.only_per_packet {
            self.rec.plan("3-nodeport", "udp_pps", "xdp-tx", 3, "bounce");
            for m in LIVE_METRICS {
                self.rec.plan("3-nodeport", m, "xdp-tx", 3, "bounce");
                self.rec.plan("3-nodeport", m, "generator", 3, "alone");
            }
        }
        for &n in &c.prog_scales {
            for s in ["kproxy", "iptables", "nftables"] {
                for m in ["scratch_s", "scratch_cpu_s", "change_ms", "change_cpu_ms"] {
                    self.rec.plan("4-programming", m, s, n, "");
                }
            }
            self.rec.plan("6-memory", "agent_rss_bytes", "kproxy", n, "");
            self.rec.plan("6-memory", "bpf_map_bytes", "kproxy", n, "");
            if c.kproxy_before.is_some() {
                for m in ["scratch_s", "scratch_cpu_s", "change_ms", "change_cpu_ms"] {
                    self.rec.plan("4-programming", m, KPROXY_BEFORE, n, "");
                }
                self.rec.plan("6-memory", "agent_rss_bytes", KPROXY_BEFORE, n, "");
            }
            self.rec.plan("6-memory", "rules_bytes", "iptables", n, "");
            self.rec.plan("6-memory", "rules_bytes", "nftables", n, "");
        }
        let e2e = !c.only_per_packet && !c.only_ipv6 && !c.only_latency;
        for s in E2E_SYSTEMS.iter().filter(|_| e2e) {
            for v in ["at-rest", "churn"] {
                for m in ["p50_ms", "p99_ms"] {
                    if !c.only_programming {
                        self.rec.plan("5-e2e", m, s, c.e2e_scale, v);
                    }
                }
            }
        }
        for s in ["kproxy", "kproxy-kube"].iter().filter(|_| e2e) {
            for m in E2E_BREAKDOWN {
                if !c.only_programming {
                    self.rec.plan("5-e2e", m, s, c.e2e_scale, "at-rest");
                }
            }
        }
        if c.packet_items() {
            for (m, _, w) in BPF_STATS_FIGURES {
                self.rec.plan("8-bpf-stats", m, "kproxy", 1, w);
                self.rec.plan("8-bpf-stats", &net_metric(m), "kproxy", 1, w);
            }
            for (w, _) in BPF_STATS_WINDOWS.iter().chain(&BPF_STATS_HR_WINDOWS) {
                self.rec.plan("8-bpf-stats", BPF_STATS_EMPTY, "kproxy", 1, w);
                let hooks = BPF_STATS_EMPTY_TC.iter().filter(|h| has_figures_of(w, h));
                for (m, _) in hooks.flat_map(EmptyTcHook::programs) {
                    self.rec.plan("8-bpf-stats", m, "kproxy", 1, w);
                }
            }
        }
        for &n in &c.testrun_scales {
            for m in testrun::METRICS {
                self.rec.plan("7-testrun", m, "kproxy", n, "");
            }
        }
    }

    fn services(&self, n: usize, eps: usize) -> Vec<BService> {
        let probes = workload::probes();
        let mut v = workload::fillers(n.saturating_sub(1), eps);
        v.extend(probes);
        v
    }

    fn write_manifest(&self, services: &[BService]) -> Result<u64> {
        let text = workload::manifest_json(services);
        for e in std::fs::read_dir(&self.manifests)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        write_atomic(&self.manifests, "bulk.json", &text)?;
        Ok(text.len() as u64)
    }

    /// The client pod's cgroup, created (with its cgroup v2 mount) on first use.
    fn client_cgroup(&mut self) -> Result<PathBuf> {
        if self.client_cgroup.is_none() {
            let prefix = format!("{}-bench", self.lab.prefix());
            self.client_cgroup = Some(crate::hostnet::Cgroups::new(&prefix, 1)?);
        }
        Ok(self.client_cgroup.as_ref().expect("created above").node(0).to_path_buf())
    }

    /// The cgroup the load generator joins for `sys` (the socket LB's; none for the others).
    fn cgroup_of(&self, sys: Sys) -> Option<PathBuf> {
        match sys {
            Sys::KproxySocketLb => Some(self.client_cgroup.as_ref()?.node(0).to_path_buf()),
            _ => None,
        }
    }

    fn start_kproxy(&self, n_frontends: usize, extra: &[&str]) -> Result<Kproxy> {
        systems::start_kproxy(
            &self.lab,
            &self.manifests,
            extra,
            None,
            n_frontends as u64,
            Duration::from_secs(300),
        )
    }

    fn stop_kproxy(&self, k: Kproxy) {
        if let Err(e) = systems::stop_kproxy(&self.lab, k) {
            eprintln!("[bench] removing kproxy: {e:#}");
        }
    }

    /// Whether a baseline load of `n` services × `eps` endpoints is within budget (predicted
    /// from the last load that took at least half a second; size counted as service plus
    /// endpoint chains); records the skip otherwise.
    fn within_budget(
        &mut self,
        nft: bool,
        n: usize,
        eps: usize,
    ) -> std::result::Result<(), String> {
        let (exp, what) = match (nft, eps > 1) {
            (true, true) => (NFT_EXP_MAPS, "nft -f"),
            (true, false) => (NFT_EXP_SINGLE, "nft -f"),
            (false, _) => (IPT_EXP, "iptables-restore"),
        };
        let Some(&(n0, t0)) = self.loads.get(&(nft, eps)) else { return Ok(()) };
        let eps0 = eps;
        let (size0, size) = (n0, n);
        if t0 < 0.5 || size <= size0 {
            return Ok(());
        }
        let p = predict(t0, size0, size, exp);
        if p > self.cfg.load_budget_s {
            let why = format!(
                "not measured: {what} of {n} services × {eps} endpoints would take ≈{p:.0} s (extrapolated from {t0:.1} s measured for {n0} × {eps0}; budget {:.0} s per load)",
                self.cfg.load_budget_s
            );
            self.notes.push(why.clone());
            return Err(why);
        }
        Ok(())
    }

    // ---- items 1 and 2 ------------------------------------------------------------------

    fn clusterip_phase(&mut self) {
        let scales = self.cfg.scales.clone();
        for n in scales {
            if let Some(why) = self.over_budget(0.5) {
                self.mark_all_clusterip(n, &why);
                continue;
            }
            eprintln!("[bench] ClusterIP latency and rates at {n} services");
            let services = self.services(n, 1);
            if let Err(e) = self.write_manifest(&services) {
                self.fail_scale(n, &format!("writing manifests: {e:#}"));
                continue;
            }
            let systems = self.cfg.latency_systems();
            let (mut ipt_ok, mut nft_ok) = (Ok(()), Ok(()));
            if systems.contains(&Sys::Iptables) {
                ipt_ok = self.load_ipt(&services, n, 1);
                nft_ok = self.load_nft(&services, n, 1, None).map(drop);
                if nft_ok.is_ok() {
                    let _ = systems::nft_hooks(&self.node_ns, false);
                }
                self.step(&format!("1-2: baseline tables for {n} services × 1 endpoint loaded"));
            }
            let reps = if n >= 10_000 { self.cfg.reps_large } else { self.cfg.reps };
            for rep in 0..reps {
                for sys in rotate(systems, rep) {
                    let unavailable = match sys {
                        Sys::Iptables => ipt_ok.as_ref().err(),
                        Sys::Nftables => nft_ok.as_ref().err(),
                        _ => None,
                    };
                    if let Some(why) = unavailable {
                        self.mark_clusterip(sys, n, why, true);
                        continue;
                    }
                    self.clusterip_one(sys, n, services.len());
                }
            }
            let _ = systems::iptables_flush(&self.node_ns);
            let _ = systems::nft_unload(&self.node_ns);
            self.step(&format!("1-2: {reps} repetitions at {n} services"));
        }
    }

    /// Item 1 over IPv6 ([`clusterip6`]), in a dual-stack lab built for it; every figure
    /// not measured gets the reason.
    fn clusterip6_phase(&mut self) {
        let scales = self.cfg.ipv6_scales.clone();
        let r = match self.over_budget(0.55) {
            Some(why) => Err(why),
            None => {
                eprintln!(
                    "[bench] ClusterIP latency over IPv6 (dual-stack lab) at {scales:?} services"
                );
                clusterip6(self.cfg, &mut self.rec).map_err(|e| format!("{e:#}"))
            }
        };
        if let Err(why) = r {
            for &n in &scales {
                for s in Sys::IPV6 {
                    for m in ["p50_us", "p99_us"] {
                        if why.starts_with("not measured") {
                            self.rec.skip("1-latency", m, s.name(), n, IPV6_VARIANT, &why);
                        } else {
                            self.rec.fail("1-latency", m, s.name(), n, IPV6_VARIANT, &why);
                        }
                    }
                }
            }
        }
    }

    /// Item 3 over IPv6 ([`nodeport6`]); every figure not measured gets the reason.
    fn nodeport6_phase(&mut self) {
        let r = match self.over_budget(0.6) {
            Some(why) => Err(why),
            None => {
                eprintln!("[bench] NodePort over IPv6 from the external client (dual-stack lab)");
                nodeport6(self.cfg, &mut self.rec).map_err(|e| format!("{e:#}"))
            }
        };
        if let Err(why) = r {
            for s in NODEPORT6_SYSTEMS {
                if why.starts_with("not measured") {
                    self.rec.skip("3-nodeport", "tcp_bps", s, 3, NODEPORT6_VARIANT, &why);
                } else {
                    self.rec.fail("3-nodeport", "tcp_bps", s, 3, NODEPORT6_VARIANT, &why);
                }
            }
        }
    }

    fn load_ipt(
        &mut self,
        services: &[BService],
        n: usize,
        eps: usize,
    ) -> std::result::Result<(), String> {
        self.within_budget(false, n, eps)?;
        systems::iptables_flush(&self.node_ns).map_err(|e| format!("{e:#}"))?;
        let t = systems::iptables_load(&self.node_ns, services, 0, None)
            .map_err(|e| format!("{e:#}"))?;
        self.loads.insert((false, eps), (n, t.wall_s));
        Ok(())
    }

    fn load_nft(
        &mut self,
        services: &[BService],
        n: usize,
        eps: usize,
        cg: Option<&str>,
    ) -> std::result::Result<systems::Timed, String> {
        self.within_budget(true, n, eps)?;
        systems::nft_unload(&self.node_ns).map_err(|e| format!("{e:#}"))?;
        let t = systems::nft_load(&self.node_ns, services, 0, cg, self.cfg.nft_txn_services)
            .map_err(|e| format!("{e:#}"))?;
        self.loads.insert((true, eps), (n, t.wall_s));
        Ok(t)
    }

    /// `Some(reason)` when more than `share` of the run's time budget is spent.
    fn over_budget(&mut self, share: f64) -> Option<String> {
        let used = self.t0.elapsed().as_secs_f64();
        if used <= share * self.cfg.run_budget_s {
            return None;
        }
        let why = format!(
            "not measured: {used:.0} s of the run's {:.0} s budget were spent before this step",
            self.cfg.run_budget_s
        );
        self.notes.push(why.clone());
        Some(why)
    }

    fn mark_all_clusterip(&mut self, n: usize, why: &str) {
        for &s in self.cfg.latency_systems() {
            self.mark_clusterip(s, n, why, true);
        }
    }

    fn fail_scale(&mut self, n: usize, why: &str) {
        for &s in self.cfg.latency_systems() {
            self.mark_clusterip(s, n, why, false);
        }
    }

    fn mark_clusterip(&mut self, sys: Sys, n: usize, why: &str, skipped: bool) {
        let figs = clusterip_figures(self.cfg.rate_scales.contains(&n));
        for (item, m, v) in figs {
            if skipped && why.starts_with("not measured") {
                self.rec.skip(item, m, sys.name(), n, v, why);
            } else {
                self.rec.fail(item, m, sys.name(), n, v, why);
            }
        }
    }

    fn clusterip_one(&mut self, sys: Sys, n: usize, frontends: usize) {
        flush_conntrack(&self.lab);
        let mut kp = None;
        // Held until the measurement ends: dropping the links detaches the empty programs.
        let mut hooks = None;
        let mut clsact = None;
        let enabled = match sys {
            Sys::Floor => Ok(()),
            Sys::FloorTcHooks => empty_tc_chain(&self.lab, true).map(|h| hooks = Some(h)),
            Sys::FloorClsactHooks => EmptyClsact::attach(&self.lab).map(|h| clsact = Some(h)),
            Sys::Kproxy => self.start_kproxy(frontends, &[]).map(|k| kp = Some(k)),
            Sys::KproxyHostRouting => {
                self.start_kproxy(frontends, &["--bpf-host-routing"]).map(|k| kp = Some(k))
            }
            Sys::KproxyGeneric => {
                self.start_kproxy(frontends, &["--xdp-mode", "generic"]).map(|k| kp = Some(k))
            }
            Sys::KproxyClsact => {
                self.start_kproxy(frontends, &["--tc-attach", "netlink"]).map(|k| kp = Some(k))
            }
            Sys::KproxySocketLb => self.client_cgroup().and_then(|cg| {
                let args = ["--cgroup-path", &*cg.to_string_lossy(), "--socket-lb-pods"];
                self.start_kproxy(frontends, &args).map(|k| kp = Some(k))
            }),
            Sys::Iptables => systems::iptables_hooks(&self.node_ns, true).map(drop),
            Sys::Nftables => systems::nft_hooks(&self.node_ns, true).map(drop),
        };
        match enabled {
            Err(e) => {
                self.mark_clusterip(sys, n, &format!("enabling {}: {e:#}", sys.name()), false)
            }
            Ok(()) => {
                let target = if sys.is_floor() {
                    SocketAddrV4::new(lab::pod_ip(1, 0), lab::SERVER_PORT)
                } else {
                    SocketAddrV4::new(workload::PROBE_IP, workload::PROBE_PORT)
                };
                // Each system gets its own client port range: a connection to the ClusterIP
                // and a later one to the pod address (or through another system) may otherwise
                // share a 4-tuple at the server, whose TIME_WAIT socket then answers the new SYN
                // with an ACK (different timestamp offsets per destination): RST and a SYN
                // retransmitted ~11–16 ms later. That was the ~16 ms p99 of every system after
                // the first one had run (seen with tcpdump on the client's host veth).
                sys.use_client_ports(&self.client_pod_ns);
                let d = Duration::from_millis(self.cfg.duration_ms);
                let name = sys.name();
                let cg = self.cgroup_of(sys);
                let cg = cg.as_deref();
                let cpu = measure::latency_cpu();
                let pinned = measure::PinnedServers::new(&pod_namespaces(&self.lab), cpu);
                if let Err(e) = &pinned {
                    self.notes.push(format!("pinning the pod servers to CPU {cpu}: {e:#}"));
                }
                let ns = &self.client_pod_ns;
                // Every system's connections take turns with direct ones to the endpoint on
                // another port of the same server pod (the floor's too, the control: both its
                // addresses are one path), for twice the duration so that each gets the samples
                // of a run of its own: their ratio is what the system adds to a connection,
                // with the machine's drift weighing on both alike.
                match self.direct.clone() {
                    Ok(direct) => match measure::loadgen_alternating_in(
                        ns,
                        cg,
                        Some(cpu),
                        target.into(),
                        direct.into(),
                        "connect",
                        1,
                        2 * d,
                    ) {
                        Ok((l, dl)) => {
                            self.record_latency(name, n, &l);
                            match dl {
                                Ok(dl) => self.record_paired(name, n, &l, &dl),
                                Err(e) => {
                                    self.fail_figures(&paired_figures(), name, n, &format!("{e:#}"))
                                }
                            }
                        }
                        Err(e) => self.fail_figures(&latency_figures(), name, n, &format!("{e:#}")),
                    },
                    Err(why) => {
                        match measure::loadgen_in(ns, cg, Some(cpu), target.into(), "connect", 1, d)
                        {
                            Ok(l) => self.record_latency(name, n, &l),
                            Err(e) => {
                                self.fail_figures(&unpaired_figures(), name, n, &format!("{e:#}"))
                            }
                        }
                        self.fail_figures(&paired_figures(), name, n, &why);
                    }
                }
                if self.cfg.only_latency && kp.is_some() {
                    // The service's connections, then direct ones to the endpoint's second port
                    // through the same loaded system: what kproxy's programs cost a connection
                    // that is not a service's (its hooks run on every pod's packets).
                    let direct = self.direct.clone().ok().map(|a| (a, direct_conns(name)));
                    let loads = [Some((target, name.to_string())), direct];
                    for (addr, label) in loads.into_iter().flatten() {
                        if let Err(e) = self.conn_stats(addr.into(), cg, cpu, d, &label, n) {
                            self.notes.push(format!("bpf_stats of {label} at {n} services: {e:#}"));
                        }
                    }
                }
                if self.cfg.rate_scales.contains(&n) {
                    // Request/response paired the same way, while client and servers share the
                    // latency CPU: one client keeps a connection to the service and one to the
                    // endpoint and takes turns between them (on unpinned CPUs, four clients'
                    // pairing let the machine's drift through: repetitions spread 1.00-1.16x).
                    let paired = self.direct.clone().and_then(|direct| {
                        let (ns, t) = (&self.client_pod_ns, target.into());
                        let r = measure::loadgen_alternating_in(
                            ns,
                            cg,
                            Some(cpu),
                            t,
                            direct.into(),
                            "rr",
                            1,
                            2 * d,
                        );
                        let (l, dl) = r.map_err(|e| format!("{e:#}"))?;
                        Ok(l.p50_us / dl.map_err(|e| format!("{e:#}"))?.p50_us)
                    });
                    let (item, metric, variant) = PAIRED_RR;
                    match paired {
                        Ok(x) => self.rec.add(item, metric, name, n, variant, x),
                        Err(why) => self.fail_figures(&[PAIRED_RR], name, n, &why),
                    }
                }
                // The rates load both CPUs.
                drop(pinned);
                if self.cfg.rate_scales.contains(&n) {
                    for mode in ["connect", "rr"] {
                        let ns = &self.client_pod_ns;
                        match measure::loadgen_in(ns, cg, None, target.into(), mode, 4, d) {
                            Ok(l) => {
                                self.rec.add("2-rate", "rate_per_s", name, n, mode, l.rate);
                                self.rec.add(
                                    "2-rate",
                                    "cpu_us_per_txn",
                                    name,
                                    n,
                                    mode,
                                    l.cpu_us_per_txn,
                                );
                            }
                            Err(e) => {
                                let why = format!("{e:#}");
                                self.rec.fail("2-rate", "rate_per_s", name, n, mode, &why);
                                self.rec.fail("2-rate", "cpu_us_per_txn", name, n, mode, &why);
                            }
                        }
                    }
                }
            }
        }
        match sys {
            Sys::Kproxy
            | Sys::KproxyHostRouting
            | Sys::KproxySocketLb
            | Sys::KproxyGeneric
            | Sys::KproxyClsact => {
                if let Some(k) = kp {
                    self.stop_kproxy(k);
                }
            }
            Sys::Iptables => {
                let _ = systems::iptables_hooks(&self.node_ns, false);
            }
            Sys::Nftables => {
                let _ = systems::nft_hooks(&self.node_ns, false);
            }
            Sys::FloorTcHooks => drop(hooks),
            Sys::FloorClsactHooks => drop(clsact),
            Sys::Floor => {}
        }
    }

    fn record_latency(&mut self, name: &str, n: usize, l: &measure::Load) {
        self.rec.add("1-latency", "samples", name, n, "", l.samples);
        self.rec.add("1-latency", "p50_us", name, n, "", l.p50_us);
        self.rec.add("1-latency", "p99_us", name, n, "", l.p99_us);
    }

    /// Item 1's paired figures: `l` of the service's connections, `dl` of the direct ones that
    /// took turns with them.
    fn record_paired(&mut self, name: &str, n: usize, l: &measure::Load, dl: &measure::Latency) {
        self.rec.add("1-latency", "direct_samples", name, n, "", dl.samples);
        self.rec.add("1-latency", "direct_p50_us", name, n, "", dl.p50_us);
        self.rec.add("1-latency", "direct_p99_us", name, n, "", dl.p99_us);
        self.rec.add("1-latency", PAIRED_P50, name, n, "", l.p50_us / dl.p50_us);
        self.rec.add("1-latency", PAIRED_P99, name, n, "", l.p99_us / dl.p99_us);
    }

    /// Records why the figures `figs` (item, metric, variant) of `name` at `n` services were
    /// not measured.
    fn fail_figures(&mut self, figs: &[(&str, &str, &str)], name: &str, n: usize, why: &str) {
        for (item, m, v) in figs {
            self.rec.fail(item, m, name, n, v, why);
        }
    }

    /// `--only-latency`: a second run of the latency step's load with run-time statistics on
    /// (not during the latency run, whose figures they would inflate: two clock reads per
    /// program run); records each kproxy program's runs and run time per connection, and
    /// their sum. A tail-called program's time is its caller's (the kernel accounts the entry
    /// program only).
    fn conn_stats(
        &mut self,
        target: SocketAddr,
        cgroup: Option<&Path>,
        cpu: usize,
        d: Duration,
        sys: &str,
        n: usize,
    ) -> Result<()> {
        let pin = self.lab.pin_path(0);
        let _stats = bpfstats::enable()?;
        let before = bpfstats::snapshot(pin, &[])?;
        let ns = &self.client_pod_ns;
        let l = measure::loadgen_in(ns, cgroup, Some(cpu), target, "connect", 1, d)?;
        let after = bpfstats::snapshot(pin, &[])?;
        // Connections of the measured part and of the warm-up.
        let conns = l.samples + l.rate * measure::WARMUP_MS.parse::<f64>()? / 1e3;
        anyhow::ensure!(conns >= bpfstats::MIN_RUNS as f64, "only {conns} connections");
        let mut total = 0.0;
        for (name, &(t1, c1)) in &after {
            let (t0, c0) = before.get(name).copied().unwrap_or((0, 0));
            let (t, c) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
            if c == 0 {
                continue;
            }
            total += t as f64 / conns;
            self.rec.add("1-latency", &format!("bpf_ns_per_conn.{name}"), sys, n, "", {
                t as f64 / conns
            });
            self.rec.add(
                "1-latency",
                &format!("runs_per_conn.{name}"),
                sys,
                n,
                "",
                c as f64 / conns,
            );
        }
        self.rec.add("1-latency", "bpf_ns_per_conn", sys, n, "", total);
        Ok(())
    }

    // ---- item 3 -------------------------------------------------------------------------

    fn nodeport_phase(&mut self) {
        eprintln!("[bench] NodePort from the external client");
        let services = workload::probes();
        let n = 3;
        let sink_ns = [
            self.lab.pod(0, 1).map(|p| p.ns.clone()).unwrap_or_default(),
            self.lab.pod(1, 0).map(|p| p.ns.clone()).unwrap_or_default(),
        ];
        let sinks = measure::Sinks::new(&sink_ns);
        let setup = (|| -> Result<()> {
            sinks.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            self.write_manifest(&services)?;
            Ok(())
        })();
        let ipt = self.load_ipt(&services, n, 1);
        let nft = self.load_nft(&services, n, 1, None).map(drop);
        if nft.is_ok() {
            let _ = systems::nft_hooks(&self.node_ns, false);
        }
        let mut systems = NODEPORT_SYSTEMS.to_vec();
        systems.push("xdp-tx");
        for rep in 0..self.cfg.reps {
            for sys in rotate(&systems, rep) {
                let pre = match (&setup, sys) {
                    (Err(e), _) => Err(format!("{e:#}")),
                    (_, "iptables") => ipt.clone(),
                    (_, "nftables") => nft.clone(),
                    _ => Ok(()),
                };
                if let Err(why) = pre {
                    self.mark_nodeport(sys, &why);
                    continue;
                }
                self.nodeport_one(sys, n, services.len());
            }
        }
        let _ = systems::iptables_flush(&self.node_ns);
        let _ = systems::nft_unload(&self.node_ns);
        drop(sinks);
        self.step("3: NodePort");
    }

    fn mark_nodeport(&mut self, sys: &str, why: &str) {
        if sys == "xdp-tx" {
            self.rec.fail("3-nodeport", "udp_pps", sys, 3, "bounce", why);
            for m in LIVE_METRICS {
                self.rec.fail("3-nodeport", m, sys, 3, "bounce", why);
                self.rec.fail("3-nodeport", m, "generator", 3, "alone", why);
            }
            return;
        }
        for v in ["local", "remote"] {
            for m in NODEPORT_METRICS {
                self.rec.fail("3-nodeport", m, sys, 3, v, why);
            }
        }
    }

    /// Records a live-frame measurement (or its failure) of `sys` / `variant`.
    fn record_live(&mut self, sys: &str, n: usize, variant: &str, r: Result<livegen::LiveRate>) {
        match r {
            Ok(r) => {
                self.rec.add("3-nodeport", "live_pps", sys, n, variant, r.pps);
                self.rec.add("3-nodeport", "live_ns_per_frame", sys, n, variant, r.ns_per_frame);
                self.rec.add("3-nodeport", "live_delivered", sys, n, variant, r.delivered);
            }
            Err(e) if e.chain().any(|c| c.is::<livegen::LiveFramesRefused>()) => {
                let why = format!("{e:#}");
                for m in LIVE_METRICS {
                    self.rec.skip("3-nodeport", m, sys, n, variant, &why);
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                for m in LIVE_METRICS {
                    self.rec.fail("3-nodeport", m, sys, n, variant, &why);
                }
            }
        }
    }

    /// The references of the NodePort item: the XDP_TX bounce on node 0's `eth0` (socket blast
    /// and live frames) and the live-frame generator alone.
    fn nodeport_references(&mut self, n: usize, d: Duration) {
        let sys = "xdp-tx";
        flush_conntrack(&self.lab);
        match measure::xdp_tx_rate(&self.lab, d) {
            Ok(r) => self.rec.add("3-nodeport", "udp_pps", sys, n, "bounce", r),
            Err(e) => self.rec.fail("3-nodeport", "udp_pps", sys, n, "bounce", &format!("{e:#}")),
        }
        let target = livegen::bounce_target(workload::NP_REMOTE_UDP);
        let bounce = (|| -> Result<livegen::LiveRate> {
            let _gro = livegen::GroOn::new(&self.node_ns, "eth0")?;
            let generator = livegen::Generator::new(&self.lab, target)?;
            let prog = lab::xdp::load_xdp("kpb_xdp_tx", &lab::xdp::XDP_TX_PROGRAM)?;
            let _link: std::os::fd::OwnedFd =
                lab::in_netns(&self.node_ns, || lab::xdp::attach_xdp(&prog, "eth0"))??;
            generator.rate(&self.lab, &self.lab.underlay_ns(), "n0", target, d)
        })();
        self.record_live(sys, n, "bounce", bounce);
        let alone = livegen::Generator::new(&self.lab, target).and_then(|g| g.alone(&self.lab, d));
        self.record_live("generator", n, "alone", alone);
    }

    fn nodeport_one(&mut self, sys: &str, n: usize, frontends: usize) {
        let d = Duration::from_millis(self.cfg.np_duration_ms);
        if sys == "xdp-tx" {
            self.nodeport_references(n, d);
            return;
        }
        flush_conntrack(&self.lab);
        let mut kp = None;
        let enabled = match sys {
            s if s.starts_with("kproxy") => {
                self.start_kproxy(frontends, nodeport_agent_args(s)).map(|k| kp = Some(k))
            }
            "iptables" => systems::iptables_hooks(&self.node_ns, true).map(drop),
            _ => systems::nft_hooks(&self.node_ns, true).map(drop),
        };
        if let Err(e) = enabled {
            self.mark_nodeport(sys, &format!("enabling {sys}: {e:#}"));
        } else {
            let client = self.lab.client_ns();
            let node = lab::node_ip(0);
            for (v, pod, udp, tcp) in [
                ("local", (0, 1), workload::NP_LOCAL_UDP, workload::NP_LOCAL_TCP),
                ("remote", (1, 0), workload::NP_REMOTE_UDP, workload::NP_REMOTE_TCP),
            ] {
                let pod_ns = self.lab.pod(pod.0, pod.1).map(|p| p.ns.clone()).unwrap_or_default();
                match measure::udp_rate(&client, &pod_ns, SocketAddrV4::new(node, udp), d) {
                    Ok(r) => {
                        self.rec.add("3-nodeport", "udp_pps", sys, n, v, r.pps);
                        self.rec.add(
                            "3-nodeport",
                            "udp_cpu_ns_per_pkt",
                            sys,
                            n,
                            v,
                            r.cpu_ns_per_pkt,
                        );
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        self.rec.fail("3-nodeport", "udp_pps", sys, n, v, &why);
                        self.rec.fail("3-nodeport", "udp_cpu_ns_per_pkt", sys, n, v, &why);
                    }
                }
                match measure::iperf3(&client, SocketAddrV4::new(node, tcp).into(), d) {
                    Ok(r) => self.rec.add("3-nodeport", "tcp_bps", sys, n, v, r),
                    Err(e) => self.rec.fail("3-nodeport", "tcp_bps", sys, n, v, &format!("{e:#}")),
                }
                let live = (|| -> Result<livegen::LiveRate> {
                    let _gro = livegen::GroOn::new(&self.node_ns, "eth0")?;
                    let generator =
                        livegen::Generator::new(&self.lab, SocketAddrV4::new(node, udp))?;
                    let (ns, dev, dst) = livegen::sink_of(&self.lab, pod, workload::SINK_PORT)?;
                    generator.rate(&self.lab, &ns, &dev, dst, d)
                })();
                self.record_live(sys, n, v, live);
            }
        }
        match sys {
            s if s.starts_with("kproxy") => {
                if let Some(k) = kp {
                    self.stop_kproxy(k);
                }
            }
            "iptables" => {
                let _ = systems::iptables_hooks(&self.node_ns, false);
            }
            _ => {
                let _ = systems::nft_hooks(&self.node_ns, false);
            }
        }
    }

    // ---- items 4, 5 and 6 ---------------------------------------------------------------

    fn programming_phase(&mut self) {
        let scales = self.cfg.prog_scales.clone();
        for n in scales {
            // kproxy's own programming is measured at every scale whatever the time spent
            // (tens of seconds at 30,000, the goals 5 and 6 are absolute); the baselines and
            // the build before, minutes at the large scales, give way to the run's budget.
            let late = self.over_budget(0.93);
            eprintln!("[bench] programming {n} services × 10 endpoints");
            let services = self.services(n, 10);
            self.step(&format!("4-6: workload of {n} services × 10 endpoints generated"));
            if let Some(bin) = self.cfg.kproxy_before.clone() {
                if let Some(why) = &late {
                    self.fail_prog(KPROXY_BEFORE, n, why, true);
                } else {
                    flush_conntrack(&self.lab);
                    self.prog_kproxy(n, &services, KPROXY_BEFORE, Some(&bin));
                    self.step(&format!("4-6: {KPROXY_BEFORE} at {n} services"));
                }
            }
            flush_conntrack(&self.lab);
            self.prog_kproxy(n, &services, "kproxy", None);
            self.step(&format!("4-6: kproxy at {n} services"));
            if n == self.cfg.e2e_scale {
                flush_conntrack(&self.lab);
                if let Err(e) = self.e2e_kproxy_kube(n, &services) {
                    self.mark_e2e("kproxy-kube", n, &format!("{e:#}"), false);
                }
            }
            if let Some(why) = late {
                for sys in ["iptables", "nftables"] {
                    self.fail_prog(sys, n, &why, true);
                }
                continue;
            }
            flush_conntrack(&self.lab);
            self.prog_iptables(n, &services);
            self.step(&format!("4-6: iptables at {n} services"));
            flush_conntrack(&self.lab);
            self.prog_nftables(n, &services);
            self.step(&format!("4-6: nftables at {n} services"));
        }
    }

    fn baseline_change_samples(&self, n: usize) -> usize {
        if n >= 30_000 { self.cfg.change_samples_large } else { self.cfg.change_samples }
    }

    fn fail_prog(&mut self, sys: &str, n: usize, why: &str, skipped: bool) {
        for m in ["scratch_s", "scratch_cpu_s", "change_ms", "change_cpu_ms"] {
            if skipped {
                self.rec.skip("4-programming", m, sys, n, "", why);
            } else {
                self.rec.fail("4-programming", m, sys, n, "", why);
            }
        }
        let mem: &[&str] = match sys {
            "kproxy" => &["agent_rss_bytes", "bpf_map_bytes"],
            KPROXY_BEFORE => &["agent_rss_bytes"],
            _ => &["rules_bytes"],
        };
        for m in mem {
            if skipped {
                self.rec.skip("6-memory", m, sys, n, "", why);
            } else {
                self.rec.fail("6-memory", m, sys, n, "", why);
            }
        }
        if n == self.cfg.e2e_scale && sys != KPROXY_BEFORE {
            self.mark_e2e(sys, n, why, skipped);
            if sys == "kproxy" && skipped {
                self.mark_e2e("kproxy-kube", n, why, skipped);
            }
        }
    }

    /// Item 5's figures of `sys` (the breakdown too for kproxy) are missing for `why`.
    fn mark_e2e(&mut self, sys: &str, n: usize, why: &str, skipped: bool) {
        let mut figures: Vec<(&str, &str)> = ["at-rest", "churn"]
            .into_iter()
            .flat_map(|v| ["p50_ms", "p99_ms"].map(|m| (m, v)))
            .collect();
        if sys.starts_with("kproxy") {
            figures.extend(E2E_BREAKDOWN.map(|m| (m, "at-rest")));
        }
        for (m, v) in figures {
            if skipped {
                self.rec.skip("5-e2e", m, sys, n, v, why);
            } else {
                self.rec.fail("5-e2e", m, sys, n, v, why);
            }
        }
    }

    /// Items 4 and 6 of kproxy (`sys` "kproxy": the binary built; [`KPROXY_BEFORE`]: `binary`)
    /// at `n` services, and item 5's manifest-source figures at its scale.
    fn prog_kproxy(&mut self, n: usize, services: &[BService], sys: &str, binary: Option<&Path>) {
        if let Some((n0, t0)) = self.kproxy_ready {
            let p = predict(t0, n0, n, 1.5);
            if t0 >= 0.5 && p > 4.0 * self.cfg.load_budget_s {
                let why = format!(
                    "not measured: the agent would need ≈{p:.0} s to program {n} services × 10 endpoints (extrapolated from {t0:.1} s at {n0})"
                );
                self.notes.push(why.clone());
                self.fail_prog(sys, n, &why, true);
                return;
            }
        }
        let r = (|| -> Result<()> {
            let bytes = self.write_manifest(services)?;
            let k = systems::start_kproxy(
                &self.lab,
                &self.manifests,
                &KPROXY_BENCH_ARGS,
                binary,
                services.len() as u64,
                Duration::from_secs(300),
            )?;
            let pid = k.agent.pid();
            self.kproxy_ready = Some((n, k.ready_s));
            let res = (|| -> Result<()> {
                let m = systems::agent_metrics(&self.node_ns)?;
                self.rec.add("4-programming", "scratch_s", sys, n, "", m.sync_sum_s);
                self.rec.add(
                    "4-programming",
                    "scratch_cpu_s",
                    sys,
                    n,
                    "",
                    systems::proc_cpu_s(pid)?,
                );
                self.notes.push(format!(
                    "{sys} at {n} services × 10 endpoints: manifest {:.1} MB of JSON, agent ready {:.1} s after start, {} sync(s) before ready",
                    bytes as f64 / 1e6,
                    k.ready_s,
                    m.sync_count
                ));
                self.rec.add(
                    "6-memory",
                    "agent_rss_bytes",
                    sys,
                    n,
                    "",
                    systems::settled_rss(pid, Duration::from_secs(10))? as f64,
                );
                if sys == "kproxy" {
                    self.rec.add(
                        "6-memory",
                        "bpf_map_bytes",
                        sys,
                        n,
                        "",
                        systems::proc_bpf_map_bytes(pid)? as f64,
                    );
                }
                for j in 0..self.cfg.change_samples {
                    let svc = workload::dynamic(j, "chg", 9);
                    let before = systems::agent_metrics(&self.node_ns)?;
                    let cpu0 = systems::proc_cpu_s(pid)?;
                    write_atomic(
                        &self.manifests,
                        &format!("chg{j}.json"),
                        &workload::manifest_json(&[svc]),
                    )?;
                    let t0 = Instant::now();
                    let after = loop {
                        let m = systems::agent_metrics(&self.node_ns)?;
                        if m.sync_count > before.sync_count {
                            break m;
                        }
                        anyhow::ensure!(
                            t0.elapsed() < Duration::from_secs(60),
                            "no sync after a change"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    };
                    let cpu1 = systems::proc_cpu_s(pid)?;
                    let syncs = (after.sync_count - before.sync_count) as f64;
                    self.rec.add(
                        "4-programming",
                        "change_ms",
                        sys,
                        n,
                        "",
                        (after.sync_sum_s - before.sync_sum_s) * 1e3 / syncs,
                    );
                    self.rec.add("4-programming", "change_cpu_ms", sys, n, "", (cpu1 - cpu0) * 1e3);
                }
                if n == self.cfg.e2e_scale && sys == "kproxy" {
                    self.e2e_kproxy(n)?;
                }
                Ok(())
            })();
            self.stop_kproxy(k);
            res
        })();
        if let Err(e) = r {
            self.fail_prog(sys, n, &format!("{e:#}"), false);
        }
    }

    /// Change-to-first-connection samples with `apply(k)` making service `lat{k}` exist (it may
    /// return the instant the change was handed over, after preparing it, e.g. generating the
    /// rules text in this harness, which is not the baseline's cost). For the kproxy systems at
    /// rest, each sample is also split at the end of the agent's sync (its
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`): change → programmed (notification,
    /// coalescing window, sync) and programmed → first reply (datapath and probe).
    fn e2e_samples(
        &mut self,
        sys: &str,
        n: usize,
        variant: &str,
        first: usize,
        apply: &mut dyn FnMut(usize) -> Result<Option<Instant>>,
    ) -> Result<()> {
        let breakdown = sys.starts_with("kproxy") && variant == "at-rest";
        let (mut lat, mut agent, mut conn, mut sync) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let samples =
            if sys == "iptables" { self.cfg.e2e_samples_iptables } else { self.cfg.e2e_samples };
        for s in 0..samples {
            let k = first + s;
            let svc = workload::dynamic(k, "lat", 0);
            let target = SocketAddrV4::new(svc.cluster_ip4(), workload::PROBE_PORT);
            let before = breakdown.then(|| systems::agent_metrics(&self.node_ns)).transpose()?;
            let (wall0, t0) = (SystemTime::now(), Instant::now());
            let t0 = apply(k)?.unwrap_or(t0);
            let done = systems::first_connection(
                &self.client_pod_ns,
                target,
                E2E_PROBE_EVERY,
                Duration::from_secs(60),
            )?;
            let total = (done.at - t0).as_secs_f64() * 1e3;
            lat.push(total);
            let mut programmed = None;
            if let Some(before) = before {
                let m = systems::agent_metrics(&self.node_ns)?;
                let wall0 = wall0.duration_since(UNIX_EPOCH)?.as_secs_f64();
                let p = (m.last_sync_s - wall0) * 1e3;
                programmed = Some(p);
                agent.push(p);
                conn.push(total - p);
                let syncs = m.sync_count.saturating_sub(before.sync_count);
                if syncs > 0 {
                    sync.push((m.sync_sum_s - before.sync_sum_s) * 1e3 / syncs as f64);
                }
            }
            if total > E2E_SLOW_MS {
                let programmed = programmed
                    .map_or(String::new(), |p| format!(", the agent's sync ended at {p:.1} ms"));
                self.notes.push(format!(
                    "item 5, {sys} at {n} services ({variant}), sample lat{k}: {total:.1} ms{programmed}; {}",
                    done.attempts_since(t0)
                ));
            }
        }
        self.rec.add("5-e2e", "p50_ms", sys, n, variant, percentile(&mut lat, 0.5));
        self.rec.add("5-e2e", "p99_ms", sys, n, variant, percentile(&mut lat, 0.99));
        if breakdown {
            self.rec.add("5-e2e", "agent_p50_ms", sys, n, variant, percentile(&mut agent, 0.5));
            self.rec.add("5-e2e", "agent_p99_ms", sys, n, variant, percentile(&mut agent, 0.99));
            self.rec.add("5-e2e", "conn_p50_ms", sys, n, variant, percentile(&mut conn, 0.5));
            if !sync.is_empty() {
                self.rec.add("5-e2e", "sync_ms", sys, n, variant, percentile(&mut sync, 0.5));
            }
        }
        Ok(())
    }

    fn e2e_kproxy(&mut self, n: usize) -> Result<()> {
        let dir = self.manifests.clone();
        let mut apply = |k: usize| -> Result<Option<Instant>> {
            write_atomic(
                &dir,
                &format!("lat{k}.json"),
                &workload::manifest_json(&[workload::dynamic(k, "lat", 0)]),
            )?;
            Ok(None)
        };
        self.e2e_samples("kproxy", n, "at-rest", 0, &mut apply)?;
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let svc = workload::dynamic(0, "churn", 1 + i % 5);
                    let _ = write_atomic(&dir, "churn.json", &workload::manifest_json(&[svc]));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let r = self.e2e_samples("kproxy", n, "churn", 500, &mut apply);
        stop.store(true, Ordering::Relaxed);
        let _ = churn.join();
        r
    }

    /// Item 5 through the Kubernetes source: the test API server (real list/watch wire
    /// behaviour) serves every service and slice, the agent watches it with kube-rs
    /// (`--kubeconfig`), and each change is an object written to the API server.
    fn e2e_kproxy_kube(&mut self, n: usize, services: &[BService]) -> Result<()> {
        eprintln!("[bench] change → connection through the Kubernetes API source at {n} services");
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        // In the client namespace, where node 0 reaches it over the underlay.
        let client_ns = self.lab.client_ns();
        let bind: Binder = Arc::new(move || {
            lab::in_netns(&client_ns, || std::net::TcpListener::bind((lab::CLIENT_IP, API_PORT)))
                .map_err(std::io::Error::other)?
        });
        let api = rt.block_on(ApiServer::start_with(bind)).context("starting the API server")?;
        let apply = |api: &ApiServer, svc: &BService| -> Result<()> {
            for o in svc.to_json() {
                api.apply(o)?;
            }
            Ok(())
        };
        for svc in services {
            apply(&api, svc)?;
        }
        let kubeconfig = self.manifests.with_extension("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        let kc = kubeconfig.to_string_lossy().into_owned();
        let mut args: Vec<&str> = KPROXY_BENCH_ARGS.to_vec();
        args.extend(["--kubeconfig", &kc]);
        let k = systems::start_kproxy(
            &self.lab,
            Path::new(""),
            &args,
            None,
            services.len() as u64,
            Duration::from_secs(300),
        );
        let _ = std::fs::remove_file(&kubeconfig);
        let k = k?;
        self.step(&format!("5: kproxy on the Kubernetes API at {n} services ready"));
        let res = (|| -> Result<()> {
            let mut at_rest = |k: usize| -> Result<Option<Instant>> {
                apply(&api, &workload::dynamic(k, "lat", 0))?;
                Ok(None)
            };
            self.e2e_samples("kproxy-kube", n, "at-rest", 0, &mut at_rest)?;
            let stop = AtomicBool::new(false);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = apply(&api, &workload::dynamic(0, "churn", 1 + i % 5));
                        i += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
                let mut churn = |k: usize| -> Result<Option<Instant>> {
                    apply(&api, &workload::dynamic(k, "lat", 0))?;
                    Ok(None)
                };
                let r = self.e2e_samples("kproxy-kube", n, "churn", 500, &mut churn);
                stop.store(true, Ordering::Relaxed);
                r
            })
        })();
        self.stop_kproxy(k);
        drop(api);
        drop(rt);
        self.step(&format!("5: kproxy on the Kubernetes API at {n} services"));
        res
    }

    fn prog_iptables(&mut self, n: usize, services: &[BService]) {
        if let Err(why) = self.within_budget(false, n, 10) {
            self.fail_prog("iptables", n, &why, true);
            return;
        }
        let r = (|| -> Result<()> {
            systems::iptables_flush(&self.node_ns)?;
            let t = systems::iptables_load(&self.node_ns, services, 0, Some("ipt"))?;
            self.loads.insert((false, 10), (n, t.wall_s));
            self.rec.add("4-programming", "scratch_s", "iptables", n, "", t.wall_s);
            self.rec.add("4-programming", "scratch_cpu_s", "iptables", n, "", t.cpu_s);
            if let Some(m) = t.mem_bytes {
                self.rec.add("6-memory", "rules_bytes", "iptables", n, "", m as f64);
            }
            let mut all = services.to_vec();
            for j in 0..self.baseline_change_samples(n) {
                let svc = workload::dynamic(j, "chg", 9);
                all.push(svc.clone());
                let text = systems::iptables_partial(&all, &svc, 0);
                let t = systems::iptables_apply(&self.node_ns, &text)?;
                self.rec.add("4-programming", "change_ms", "iptables", n, "", t.wall_s * 1e3);
                self.rec.add("4-programming", "change_cpu_ms", "iptables", n, "", t.cpu_s * 1e3);
            }
            if n == self.cfg.e2e_scale {
                systems::iptables_hooks(&self.node_ns, true)?;
                let r = self.e2e_iptables(n, all);
                let _ = systems::iptables_hooks(&self.node_ns, false);
                r?;
            }
            Ok(())
        })();
        let _ = systems::iptables_flush(&self.node_ns);
        if let Err(e) = r {
            self.fail_prog("iptables", n, &format!("{e:#}"), false);
        }
    }

    fn e2e_iptables(&mut self, n: usize, all: Vec<BService>) -> Result<()> {
        // kube-proxy's one sync loop: a mutex; the rule set it knows: shared.
        let state = Arc::new(Mutex::new(all));
        let ns = self.node_ns.clone();
        let mut apply = {
            let state = state.clone();
            let ns = ns.clone();
            move |k: usize| -> Result<Option<Instant>> {
                // The change is handed over when the rules text exists; under churn it may then
                // wait for a sync in progress (the lock), as in kube-proxy's single sync loop.
                let svc = workload::dynamic(k, "lat", 0);
                let snapshot = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut next = snapshot;
                next.push(svc.clone());
                let text = systems::iptables_partial(&next, &svc, 0);
                let written = Instant::now();
                let mut all = state.lock().unwrap_or_else(|e| e.into_inner());
                all.push(svc);
                systems::iptables_apply(&ns, &text)?;
                Ok(Some(written))
            }
        };
        self.e2e_samples("iptables", n, "at-rest", 0, &mut apply)?;
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            let state = state.clone();
            let ns = ns.clone();
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    {
                        let mut all = state.lock().unwrap_or_else(|e| e.into_inner());
                        let svc = workload::dynamic(0, "churn", 1 + i % 5);
                        all.retain(|s| s.name != svc.name);
                        all.push(svc.clone());
                        let text = systems::iptables_partial(&all, &svc, 0);
                        let _ = systems::iptables_apply(&ns, &text);
                    }
                    i += 1;
                    // kube-proxy's default minSyncPeriod: at most one sync per second.
                    let wait = Duration::from_secs(1).saturating_sub(started.elapsed());
                    std::thread::sleep(wait.max(Duration::from_millis(10)));
                }
            })
        };
        let r = self.e2e_samples("iptables", n, "churn", 500, &mut apply);
        stop.store(true, Ordering::Relaxed);
        let _ = churn.join();
        r
    }

    fn prog_nftables(&mut self, n: usize, services: &[BService]) {
        let t = match self.load_nft(services, n, 10, Some("nft")) {
            Ok(t) => t,
            Err(why) => {
                let skipped = why.starts_with("not measured");
                self.fail_prog("nftables", n, &why, skipped);
                let _ = systems::nft_unload(&self.node_ns);
                return;
            }
        };
        let r = (|| -> Result<()> {
            self.rec.add("4-programming", "scratch_s", "nftables", n, "", t.wall_s);
            self.rec.add("4-programming", "scratch_cpu_s", "nftables", n, "", t.cpu_s);
            if let Some(m) = t.mem_bytes {
                self.rec.add("6-memory", "rules_bytes", "nftables", n, "", m as f64);
            }
            for j in 0..self.baseline_change_samples(n) {
                let svc = workload::dynamic(j, "chg", 9);
                let t = systems::nft_add(&self.node_ns, &svc, 0)?;
                self.rec.add("4-programming", "change_ms", "nftables", n, "", t.wall_s * 1e3);
                self.rec.add("4-programming", "change_cpu_ms", "nftables", n, "", t.cpu_s * 1e3);
            }
            if n == self.cfg.e2e_scale {
                let ns = self.node_ns.clone();
                let mut apply = |k: usize| -> Result<Option<Instant>> {
                    systems::nft_add(&ns, &workload::dynamic(k, "lat", 0), 0)?;
                    Ok(None)
                };
                self.e2e_samples("nftables", n, "at-rest", 0, &mut apply)?;
                let stop = Arc::new(AtomicBool::new(false));
                let churn = {
                    let stop = stop.clone();
                    let ns = ns.clone();
                    std::thread::spawn(move || {
                        let mut i = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            let svc = workload::dynamic(100 + i % 50, "churn", 1);
                            let _ = systems::nft_add(&ns, &svc, 0);
                            i += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    })
                };
                let r = self.e2e_samples("nftables", n, "churn", 500, &mut apply);
                stop.store(true, Ordering::Relaxed);
                let _ = churn.join();
                r?;
            }
            Ok(())
        })();
        let _ = systems::nft_unload(&self.node_ns);
        if let Err(e) = r {
            self.fail_prog("nftables", n, &format!("{e:#}"), false);
        }
    }

    // ---- per-program cost under real traffic ------------------------------------------

    /// Per-program cost from the kernel's bpf_stats with kproxy serving the probe services
    /// (native XDP on the external device, as the NodePort item's `kproxy`): each window of
    /// [`BPF_STATS_WINDOWS`] in every repetition, with the lab's empty XDP program measured in
    /// the same window.
    fn bpf_stats_phase(&mut self) {
        eprintln!("[bench] per-program cost under real traffic (bpf_stats)");
        let r = (|| -> Result<Vec<StatSample>> {
            let services = workload::probes();
            self.write_manifest(&services)?;
            flush_conntrack(&self.lab);
            let k = self.start_kproxy(services.len(), nodeport_agent_args("kproxy"))?;
            let res = self.bpf_stats_windows(&BPF_STATS_WINDOWS);
            self.stop_kproxy(k);
            res
        })();
        self.record_stats(&BPF_STATS_WINDOWS, r);
        eprintln!("[bench] per-program cost with eBPF host routing (bpf_stats)");
        let r = (|| -> Result<Vec<StatSample>> {
            flush_conntrack(&self.lab);
            let mut args = nodeport_agent_args("kproxy").to_vec();
            args.push("--bpf-host-routing");
            let k = self.start_kproxy(workload::probes().len(), &args)?;
            let res = self.bpf_stats_windows(&BPF_STATS_HR_WINDOWS);
            self.stop_kproxy(k);
            res
        })();
        self.record_stats(&BPF_STATS_HR_WINDOWS, r);
    }

    /// The IPv6 windows of the bpf_stats step ([`bpf_stats6`]).
    fn bpf_stats6_phase(&mut self) {
        eprintln!("[bench] per-program cost over IPv6 (bpf_stats, dual-stack lab)");
        let r = bpf_stats6(self.cfg);
        self.record_stats(&BPF_STATS6_WINDOWS, r);
    }

    /// Records the samples of `windows`, or their failure.
    fn record_stats(&mut self, windows: &[(&'static str, &str)], r: Result<Vec<StatSample>>) {
        let samples = match r {
            Ok(v) => v,
            Err(e) => {
                let why = format!("{e:#}");
                for (w, _) in windows {
                    self.rec.fail("8-bpf-stats", BPF_STATS_EMPTY, "kproxy", 1, w, &why);
                    for (m, _, _) in BPF_STATS_FIGURES.iter().filter(|f| f.2 == *w) {
                        self.rec.fail("8-bpf-stats", m, "kproxy", 1, w, &why);
                        self.rec.fail("8-bpf-stats", &net_metric(m), "kproxy", 1, w, &why);
                    }
                }
                return;
            }
        };
        for s in samples {
            match s.value {
                Some(v) => self.rec.add("8-bpf-stats", &s.metric, "kproxy", 1, s.window, v),
                None => {
                    let traffic = windows.iter().find(|w| w.0 == s.window).map(|w| w.1);
                    let why = format!(
                        "not run: {} ran fewer than {} times during {}",
                        s.program,
                        bpfstats::MIN_RUNS,
                        traffic.unwrap_or(s.window)
                    );
                    self.rec.skip("8-bpf-stats", &s.metric, "kproxy", 1, s.window, &why);
                }
            }
        }
    }

    /// The windows of [`Self::bpf_stats_phase`], statistics switched on for their duration.
    fn bpf_stats_windows(&self, windows: &[(&'static str, &str)]) -> Result<Vec<StatSample>> {
        let client = self.lab.client_ns();
        stats_windows(&self.lab, self.cfg, windows, |window| {
            let (ns, to) = match window.trim_start_matches(HR_PREFIX) {
                "clusterip-local" => (
                    self.client_pod_ns.clone(),
                    SocketAddrV4::new(workload::NP_LOCAL_CLUSTER_IP, workload::IPERF_PORT),
                ),
                "clusterip-remote" => (
                    self.client_pod_ns.clone(),
                    SocketAddrV4::new(workload::NP_REMOTE_CLUSTER_IP, workload::IPERF_PORT),
                ),
                "pod-direct" => (
                    self.client_pod_ns.clone(),
                    SocketAddrV4::new(lab::pod_ip(1, 0), workload::IPERF_PORT),
                ),
                _ => (client.clone(), SocketAddrV4::new(lab::node_ip(0), workload::NP_REMOTE_TCP)),
            };
            (ns, to.into(), None)
        })
    }

    // ---- item 7 -------------------------------------------------------------------------

    fn testrun_phase(&mut self) {
        eprintln!("[bench] per-packet cost under BPF_PROG_TEST_RUN");
        let scales = self.cfg.testrun_scales.clone();
        let runs = self.cfg.testrun_runs;
        let r = lab::in_netns(&self.node_ns, || testrun::measure(&scales, runs));
        match r.and_then(|r| r) {
            Ok(costs) => {
                for c in costs {
                    for (m, v) in c.figures() {
                        self.rec.add("7-testrun", m, "kproxy", c.services, "", v);
                    }
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                for &n in &scales {
                    for m in testrun::METRICS {
                        self.rec.fail("7-testrun", m, "kproxy", n, "", &why);
                    }
                }
            }
        }
    }
}

/// The windows of `windows` in `lab` with kproxy running on node 0, statistics switched on for
/// their duration: each window one iperf3 flow from the namespace to the address `target` gives
/// for it, with the lab's empty XDP program and the empty TC programs chained in front of
/// kproxy's ([`BPF_STATS_EMPTY_TC`]) measured in the same window.
fn stats_windows(
    lab: &Lab,
    cfg: &Config,
    windows: &[(&'static str, &str)],
    target: impl Fn(&str) -> (String, SocketAddr, Option<f64>),
) -> Result<Vec<StatSample>> {
    let pin = lab.pin_path(0);
    let mut ids = vec![lab.xdp_pass_id()?];
    // Held until the windows end: dropping the links detaches the empty TC programs.
    let (_tc_progs, tc_links) = match empty_tc_chain(lab, false) {
        Ok((progs, links)) => {
            for p in &progs {
                ids.push(lab::xdp::prog_id(p)?);
            }
            (progs, links)
        }
        Err(e) => {
            // Without tcx (before Linux 6.6) the TC programs' floor is the empty XDP program.
            eprintln!("[bench] no empty TC programs in front of kproxy's ({e:#}): XDP floor");
            (Vec::new(), Vec::new())
        }
    };
    let _stats = bpfstats::enable()?;
    let d = Duration::from_millis(cfg.duration_ms);
    let mut out = Vec::new();
    for rep in 0..cfg.reps {
        for (window, _) in rotate(windows, rep) {
            let (ns, to, rate) = target(window);
            let before = bpfstats::snapshot(pin, &ids)?;
            let t0 = Instant::now();
            let bps =
                measure::iperf3_at(&ns, to, d, rate).with_context(|| format!("window {window}"))?;
            let secs = t0.elapsed().as_secs_f64();
            let after = bpfstats::snapshot(pin, &ids)?;
            out.push(StatSample {
                metric: FLOW_BPS.into(),
                program: "iperf3",
                window,
                value: Some(bps),
            });
            let empty = bpfstats::per_run(&before, &after, lab::xdp::XDP_PASS_NAME);
            out.push(StatSample {
                metric: BPF_STATS_EMPTY.into(),
                program: lab::xdp::XDP_PASS_NAME,
                window,
                value: empty,
            });
            if !tc_links.is_empty() {
                let hooks = BPF_STATS_EMPTY_TC.iter().filter(|h| has_figures_of(window, h));
                for (m, program) in hooks.flat_map(EmptyTcHook::programs) {
                    let value = bpfstats::per_run(&before, &after, program);
                    out.push(StatSample { metric: m.into(), program, window, value });
                }
            }
            let floor = |m: &str| {
                let tc = empty_tc_of(m).and_then(|h| bpfstats::per_run(&before, &after, h.floor.1));
                tc.or(empty)
            };
            for (m, program, _) in BPF_STATS_FIGURES.iter().filter(|f| f.2 == window) {
                let raw = bpfstats::per_run(&before, &after, program);
                out.push(StatSample { metric: m.to_string(), program, window, value: raw });
                let runs = bpfstats::runs(&before, &after, program);
                out.push(StatSample {
                    metric: runs_metric(m),
                    program,
                    window,
                    value: raw.map(|_| runs as f64 / secs),
                });
                out.push(StatSample {
                    metric: net_metric(m),
                    program,
                    window,
                    value: raw.zip(floor(m)).map(|(r, e)| r - e),
                });
            }
        }
    }
    Ok(out)
}

/// The network namespaces of the lab's pods (their servers).
fn pod_namespaces(lab: &Lab) -> Vec<String> {
    lab.pods().into_iter().map(|p| p.ns).collect()
}

/// Loads the empty TC programs of [`BPF_STATS_EMPTY_TC`] and chains them, in order, on their
/// hook of every pod veth of node 0 (where kproxy's pod programs run) or of its external device:
/// (programs, links). `floor_only`: only the floor of each hook, one program per hook as kproxy
/// has.
fn empty_tc_chain(
    lab: &Lab,
    floor_only: bool,
) -> Result<(Vec<std::os::fd::OwnedFd>, Vec<std::os::fd::OwnedFd>)> {
    let mut progs = Vec::new();
    for h in &BPF_STATS_EMPTY_TC {
        for (_, name) in h.programs() {
            if floor_only && name != h.floor.1 {
                continue;
            }
            progs.push((lab::xdp::load_tc(name, &lab::xdp::TC_NEXT_PROGRAM)?, h));
        }
    }
    let veths: Vec<String> = lab.pods_on(0).into_iter().map(|p| p.host_veth).collect();
    let links = lab::in_netns(&lab.node(0).ns, || -> Result<Vec<std::os::fd::OwnedFd>> {
        let mut links = Vec::new();
        // Each in front of the hook's programs: the last one first.
        for (prog, h) in progs.iter().rev() {
            for dev in h.devices(&veths) {
                links.push(lab::xdp::attach_tcx_front(prog, &dev, h.egress)?);
            }
        }
        Ok(links)
    })??;
    Ok((progs.into_iter().map(|(p, _)| p).collect(), links))
}

/// An empty TC program (`TC_ACT_UNSPEC`: the next filter, none, decides) attached as a netlink
/// filter of a clsact qdisc, as kproxy attaches its programs, on each hook of kproxy's TC
/// programs ([`BPF_STATS_EMPTY_TC`]); the filters and the program's pin go on drop.
struct EmptyClsact {
    ns: String,
    /// (device, direction) of each filter added.
    filters: Vec<(String, &'static str)>,
    pin: PathBuf,
}

impl EmptyClsact {
    /// Filter priority, apart from kproxy's.
    const PRIO: &str = "7";

    fn attach(lab: &Lab) -> Result<Self> {
        let prog = lab::xdp::load_tc("kpl_tc_clsact", &lab::xdp::TC_NEXT_PROGRAM)?;
        let pin = PathBuf::from(format!("/sys/fs/bpf/kpl-bench-clsact-{}", std::process::id()));
        lab::xdp::pin(&prog, &pin).with_context(|| format!("pinning {}", pin.display()))?;
        let pinned = pin.to_string_lossy().into_owned();
        let mut h = EmptyClsact { ns: lab.node(0).ns.clone(), filters: Vec::new(), pin };
        let veths: Vec<String> = lab.pods_on(0).into_iter().map(|p| p.host_veth).collect();
        for hook in &BPF_STATS_EMPTY_TC {
            let dir = if hook.egress { "egress" } else { "ingress" };
            for dev in hook.devices(&veths) {
                // Already there after an earlier run of this variant (its filters go, the
                // qdisc stays: without filters the kernel skips it).
                let _ = lab::exec(&h.ns, &["tc", "qdisc", "add", "dev", &dev, "clsact"]);
                lab::exec(
                    &h.ns,
                    &[
                        "tc",
                        "filter",
                        "add",
                        "dev",
                        &dev,
                        dir,
                        "prio",
                        Self::PRIO,
                        "bpf",
                        "da",
                        "object-pinned",
                        &pinned,
                    ],
                )?;
                h.filters.push((dev, dir));
            }
        }
        Ok(h)
    }
}

impl Drop for EmptyClsact {
    fn drop(&mut self) {
        for (dev, dir) in &self.filters {
            let argv = ["tc", "filter", "del", "dev", dev, dir, "prio", Self::PRIO];
            if let Err(e) = lab::exec(&self.ns, &argv) {
                eprintln!("[bench] removing the empty clsact filter of {dev} {dir}: {e:#}");
            }
        }
        if let Err(e) = std::fs::remove_file(&self.pin) {
            eprintln!("[bench] removing {}: {e}", self.pin.display());
        }
    }
}

/// The IPv6 windows ([`BPF_STATS6_WINDOWS`]) in a dual-stack lab of their own, built and removed
/// here (the same shape as the run's lab: 2 routed nodes, 2 pods each, iperf3 servers in
/// node-0-pod-1 and node-1-pod-0), kproxy on node 0 with native XDP and `--enable-ipv6`
/// serving the probes as dual-stack services.
fn bpf_stats6(cfg: &Config) -> Result<Vec<StatSample>> {
    let lab = bench_lab(true)?;
    let r = (|| -> Result<Vec<StatSample>> {
        let iperfs = iperf_servers(&lab)?;
        let mdir = TempDir(
            std::env::temp_dir().join(format!("kproxy-bench-{}-manifests6", std::process::id())),
        );
        std::fs::create_dir_all(&mdir.0)?;
        write_atomic(&mdir.0, "bulk.json", &workload::probes_dual_manifest())?;
        let mut args = nodeport_agent_args("kproxy").to_vec();
        args.push("--enable-ipv6");
        let n = 2 * workload::probes().len() as u64;
        let k = systems::start_kproxy(&lab, &mdir.0, &args, None, n, Duration::from_secs(300))?;
        let client = lab.pod(0, 0).context("client pod")?.ns.clone();
        let res = lab::eventually(Duration::from_secs(10), Duration::from_millis(20), || {
            crate::client::tcp_request6(
                &client,
                workload::PROBE_IP6,
                workload::PROBE_PORT,
                Duration::from_secs(1),
            )
        })
        .context("IPv6 ClusterIP probe through kproxy")
        .and_then(|_| {
            let port = workload::IPERF_PORT;
            let to = |window: &str| -> SocketAddr {
                match window.trim_end_matches(PACED_SUFFIX) {
                    "ds-clusterip6-local" => (workload::NP_LOCAL_CLUSTER_IP6, port).into(),
                    "ds-clusterip4-local" => (workload::NP_LOCAL_CLUSTER_IP, port).into(),
                    "ds-clusterip6-remote" => (workload::NP_REMOTE_CLUSTER_IP6, port).into(),
                    _ => (workload::NP_REMOTE_CLUSTER_IP, port).into(),
                }
            };
            // One rate for every paced window, below what the slowest flow reaches.
            let d = Duration::from_millis(cfg.duration_ms);
            let mut slowest = f64::INFINITY;
            for (w, _) in BPF_STATS6_WINDOWS.iter().filter(|w| !w.0.ends_with(PACED_SUFFIX)) {
                let bps = measure::iperf3(&client, to(w), d)
                    .with_context(|| format!("full-speed flow of {w}"))?;
                slowest = slowest.min(bps);
            }
            let pace = PACE_SHARE * slowest;
            stats_windows(&lab, cfg, &BPF_STATS6_WINDOWS, |window| {
                (client.clone(), to(window), window.ends_with(PACED_SUFFIX).then_some(pace))
            })
        });
        let _ = systems::stop_kproxy(&lab, k);
        drop(iperfs);
        res
    })();
    lab.down()?;
    r
}

/// Variant of the item 1 figures measured over IPv6.
pub const IPV6_VARIANT: &str = "ipv6";

/// Item 1 over IPv6: in a dual-stack lab of its own (the run's lab shape), at each of
/// [`Config::ipv6_scales`], N − 1 single-stack IPv6 filler services and the dual-stack probe
/// services, ClusterIP new-connection latency to the probe's IPv6 ClusterIP through kproxy
/// (`--enable-ipv6`), ip6tables (`ip6tables-legacy-restore`) and nftables (table
/// `ip6 kube-proxy`) rules of kube-proxy's IPv6 proxier, and to the backend pod's IPv6 address
/// (floor); systems rotated between repetitions as in item 1. Figures: item `1-latency`,
/// variant [`IPV6_VARIANT`].
fn clusterip6(cfg: &Config, rec: &mut Recorder) -> Result<()> {
    let lab = bench_lab(true)?;
    let r = (|| -> Result<()> {
        let node_ns = lab.node(0).ns.clone();
        let client = lab.pod(0, 0).context("client pod")?.ns.clone();
        let sysctl = lab::exec(&client, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        anyhow::ensure!(sysctl.status.success(), "sysctl net.ipv4.tcp_tw_reuse=1 in {client}");
        // A fresh lab's first IPv6 connections wait for neighbour discovery (the floor's first
        // run in a new lab saw no connection within 500 ms): measure once the pod answers.
        lab::eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            crate::client::tcp_request6(
                &client,
                lab::pod_ip6(1, 0),
                lab::SERVER_PORT,
                Duration::from_secs(1),
            )
        })
        .context("IPv6 from the client pod to the backend pod")?;
        let mdir = TempDir(
            std::env::temp_dir()
                .join(format!("kproxy-bench-{}-manifests-lat6", std::process::id())),
        );
        std::fs::create_dir_all(&mdir.0)?;
        write_atomic(&mdir.0, "probes.json", &workload::probes_dual_manifest())?;
        let table = baseline::nft_table(&workload::node_settings6(0));
        for &n in &cfg.ipv6_scales {
            let fillers = workload::fillers6(n.saturating_sub(1), 1);
            write_atomic(&mdir.0, "bulk.json", &workload::manifest_json(&fillers))?;
            let mut all = fillers.clone();
            all.push(workload::probe6());
            let settings = workload::node_settings6(0);
            let ports = workload::baseline_ports(&all, 0);
            let ipt = systems::iptables_flush_family(&node_ns, true)
                .and_then(|()| systems::iptables_load_ports(&node_ns, &settings, &ports))
                .map_err(|e| format!("loading the ip6tables rules: {e:#}"));
            let nft = systems::nft_unload_table(&node_ns, table)
                .and_then(|()| {
                    systems::nft_load_ports(&node_ns, &settings, &ports, cfg.nft_txn_services)
                })
                .and_then(|_| systems::nft_hooks_table(&node_ns, table, false))
                .map_err(|e| format!("loading the nftables rules: {e:#}"));
            // The probes' frontends over both families and one per filler.
            let frontends = fillers.len() as u64 + 2 * workload::probes().len() as u64;
            for rep in 0..cfg.reps {
                for sys in rotate(&Sys::IPV6, rep) {
                    let name = sys.name();
                    let r = match (sys, &ipt, &nft) {
                        (Sys::Iptables, Err(why), _) | (Sys::Nftables, _, Err(why)) => {
                            Err(anyhow::anyhow!("{why}"))
                        }
                        _ => clusterip6_one(&lab, cfg, &mdir.0, sys, frontends, table),
                    };
                    match r {
                        Ok(l) => {
                            rec.add("1-latency", "samples", name, n, IPV6_VARIANT, l.samples);
                            rec.add("1-latency", "p50_us", name, n, IPV6_VARIANT, l.p50_us);
                            rec.add("1-latency", "p99_us", name, n, IPV6_VARIANT, l.p99_us);
                        }
                        Err(e) => {
                            let why = format!("{e:#}");
                            rec.fail("1-latency", "p50_us", name, n, IPV6_VARIANT, &why);
                            rec.fail("1-latency", "p99_us", name, n, IPV6_VARIANT, &why);
                        }
                    }
                }
            }
            let _ = systems::iptables_flush_family(&node_ns, true);
            let _ = systems::nft_unload_table(&node_ns, table);
        }
        Ok(())
    })();
    lab.down()?;
    r
}

/// The systems of item 3 over IPv6: kproxy (native XDP, as item 3's `kproxy`; its XDP program
/// serves IPv6 NodePorts as IPv4's) and the IPv6 baselines.
pub const NODEPORT6_SYSTEMS: [&str; 3] = ["kproxy", "iptables", "nftables"];

/// Variant of the item 3 figures over IPv6 (remote backend).
pub const NODEPORT6_VARIANT: &str = "remote-ipv6";

/// Item 3 over IPv6: in a dual-stack lab of its own, one iperf3 TCP flow from the external
/// client to node 0's IPv6 address at the NodePort of the probe service whose backend is on
/// node 1, through kproxy (`--enable-ipv6`, native XDP), ip6tables and nftables (`ip6
/// kube-proxy`) rules of kube-proxy's IPv6 proxier; systems rotated between repetitions.
fn nodeport6(cfg: &Config, rec: &mut Recorder) -> Result<()> {
    let lab = bench_lab(true)?;
    let r = (|| -> Result<()> {
        let iperfs = iperf_servers(&lab)?;
        let node_ns = lab.node(0).ns.clone();
        let client = lab.client_ns();
        let mdir = TempDir(
            std::env::temp_dir().join(format!("kproxy-bench-{}-manifests-np6", std::process::id())),
        );
        std::fs::create_dir_all(&mdir.0)?;
        write_atomic(&mdir.0, "probes.json", &workload::probes_dual_manifest())?;
        let settings = workload::node_settings6(0);
        let table = baseline::nft_table(&settings);
        let ports = workload::baseline_ports(&workload::probes6(), 0);
        let ipt = systems::iptables_flush_family(&node_ns, true)
            .and_then(|()| systems::iptables_load_ports(&node_ns, &settings, &ports))
            .map_err(|e| format!("loading the ip6tables rules: {e:#}"));
        let nft = systems::nft_unload_table(&node_ns, table)
            .and_then(|()| systems::nft_load_ports(&node_ns, &settings, &ports, 1000))
            .and_then(|_| systems::nft_hooks_table(&node_ns, table, false))
            .map_err(|e| format!("loading the nftables rules: {e:#}"));
        let target: SocketAddr = (lab::node_ip6(0), workload::NP_REMOTE_TCP).into();
        // Neighbour discovery between the client and node 0 done before the first flow.
        let node6 = lab::node_ip6(0).to_string();
        lab::eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            let out = lab::exec(&client, &["ping", "-6", "-c", "1", "-W", "1", &node6])?;
            anyhow::ensure!(out.status.success(), "no reply");
            Ok(())
        })
        .with_context(|| format!("ping from the external client to {node6}"))?;
        let d = Duration::from_millis(cfg.np_duration_ms);
        for rep in 0..cfg.reps {
            for sys in rotate(&NODEPORT6_SYSTEMS, rep) {
                flush_conntrack(&lab);
                let mut kp = None;
                let enabled = match (sys, &ipt, &nft) {
                    ("iptables", Err(why), _) | ("nftables", _, Err(why)) => {
                        Err(anyhow::anyhow!("{why}"))
                    }
                    ("iptables", ..) => {
                        systems::iptables_hooks_family(&node_ns, true, true).map(drop)
                    }
                    ("nftables", ..) => systems::nft_hooks_table(&node_ns, table, true).map(drop),
                    _ => {
                        let mut args = nodeport_agent_args("kproxy").to_vec();
                        args.push("--enable-ipv6");
                        let n = 2 * workload::probes().len() as u64;
                        systems::start_kproxy(
                            &lab,
                            &mdir.0,
                            &args,
                            None,
                            n,
                            Duration::from_secs(300),
                        )
                        .map(|k| kp = Some(k))
                    }
                };
                let r = enabled
                    .with_context(|| format!("enabling {sys} over IPv6"))
                    .and_then(|()| measure::iperf3(&client, target, d));
                match r {
                    Ok(bps) => rec.add("3-nodeport", "tcp_bps", sys, 3, NODEPORT6_VARIANT, bps),
                    Err(e) => {
                        let why = format!("{e:#}");
                        rec.fail("3-nodeport", "tcp_bps", sys, 3, NODEPORT6_VARIANT, &why);
                    }
                }
                match sys {
                    "iptables" => {
                        let _ = systems::iptables_hooks_family(&node_ns, true, false);
                    }
                    "nftables" => {
                        let _ = systems::nft_hooks_table(&node_ns, table, false);
                    }
                    _ => {
                        if let Some(k) = kp {
                            let _ = systems::stop_kproxy(&lab, k);
                        }
                    }
                }
            }
        }
        let _ = systems::iptables_flush_family(&node_ns, true);
        let _ = systems::nft_unload_table(&node_ns, table);
        drop(iperfs);
        Ok(())
    })();
    lab.down()?;
    r
}

/// One repetition of one system of [`clusterip6`]: the system switched on, one load generator
/// run from node-0-pod-0 over IPv6, the system switched off.
fn clusterip6_one(
    lab: &Lab,
    cfg: &Config,
    manifests: &Path,
    sys: Sys,
    frontends: u64,
    table: &str,
) -> Result<measure::Load> {
    let node_ns = lab.node(0).ns.clone();
    let client = lab.pod(0, 0).context("client pod")?.ns.clone();
    flush_conntrack(lab);
    let mut kp = None;
    let enabled = match sys {
        Sys::Kproxy => systems::start_kproxy(
            lab,
            manifests,
            &["--enable-ipv6"],
            None,
            frontends,
            Duration::from_secs(300),
        )
        .and_then(|k| {
            kp = Some(k);
            lab::eventually(Duration::from_secs(10), Duration::from_millis(20), || {
                crate::client::tcp_request6(
                    &client,
                    workload::PROBE_IP6,
                    workload::PROBE_PORT,
                    Duration::from_secs(1),
                )
            })
            .context("IPv6 ClusterIP probe through kproxy")
            .map(drop)
        }),
        Sys::Iptables => systems::iptables_hooks_family(&node_ns, true, true).map(drop),
        Sys::Nftables => systems::nft_hooks_table(&node_ns, table, true).map(drop),
        _ => Ok(()),
    };
    let r = enabled.with_context(|| format!("enabling {} over IPv6", sys.name())).and_then(|()| {
        let target: SocketAddr = match sys {
            Sys::Floor => (lab::pod_ip6(1, 0), lab::SERVER_PORT).into(),
            _ => (workload::PROBE_IP6, workload::PROBE_PORT).into(),
        };
        // Per-system client port ranges as in item 1.
        sys.use_client_ports(&client);
        // Client and servers on one CPU as in item 1.
        let cpu = measure::latency_cpu();
        let _pinned = measure::PinnedServers::new(&pod_namespaces(lab), cpu)?;
        let d = Duration::from_millis(cfg.duration_ms);
        measure::loadgen_in(&client, None, Some(cpu), target, "connect", 1, d)
    });
    match sys {
        Sys::Kproxy
        | Sys::KproxyHostRouting
        | Sys::KproxySocketLb
        | Sys::KproxyGeneric
        | Sys::KproxyClsact => {
            if let Some(k) = kp {
                let _ = systems::stop_kproxy(lab, k);
            }
        }
        Sys::Iptables => {
            let _ = systems::iptables_hooks_family(&node_ns, true, false);
        }
        Sys::Nftables => {
            let _ = systems::nft_hooks_table(&node_ns, table, false);
        }
        Sys::Floor | Sys::FloorTcHooks | Sys::FloorClsactHooks => {}
    }
    r
}

/// Empties the conntrack tables of `lab`'s nodes (IPv6 too in a dual-stack lab), so that no
/// system meets entries another one left (a DNAT of a reused source port would clash with them
/// and lose the SYN).
fn flush_conntrack(lab: &Lab) {
    for node in lab.nodes() {
        let _ = lab::exec(&node.ns, &["conntrack", "-F"]);
        if lab.ipv6() {
            let _ = lab::exec(&node.ns, &["conntrack", "-F", "-f", "ipv6"]);
        }
    }
}

/// The bench's lab (2 routed nodes, 2 pods each; dual-stack with `ipv6`), its pod servers
/// started with real-time priority.
fn bench_lab(ipv6: bool) -> Result<Lab> {
    let spec = LabSpec { prefix: None, nodes: 2, pods_per_node: 2, wiring: Wiring::Routed, ipv6 };
    let mut lab = Lab::up(spec)?;
    lab.start_servers()?;
    for pod in lab.pods() {
        systems::realtime_netns(&pod.ns).context("real-time priority for the pod servers")?;
    }
    Ok(lab)
}

/// A second test server in the probed service's endpoint (node 1's first pod), on
/// [`workload::DIRECT_PORT`], real-time like the pods' servers: the address of the direct
/// connections of item 1's paired figures, returned with the process, which keeps it running
/// as long as it lives.
fn direct_server(lab: &Lab) -> Result<(lab::Proc, SocketAddrV4)> {
    let pod = lab.pod(1, 0).context("probe backend pod")?.clone();
    let netexec = lab::find_bin("kproxy-netexec")?;
    let port = workload::DIRECT_PORT.to_string();
    let argv = [
        "chrt",
        "-f",
        systems::RT_PRIORITY,
        &*netexec.to_string_lossy(),
        "--name",
        &pod.name,
        "--tcp",
        &port,
    ];
    let p = lab.spawn(&pod.ns, &format!("{}-netexec-direct", pod.name), &argv)?;
    lab::wait_ports(&pod, &[workload::DIRECT_PORT], Duration::from_secs(10))?;
    Ok((p, SocketAddrV4::new(pod.ip, workload::DIRECT_PORT)))
}

/// iperf3 servers in the probe backends (node 0's second pod, node 1's first), kept running as
/// long as the returned processes live.
fn iperf_servers(lab: &Lab) -> Result<Vec<lab::Proc>> {
    let mut iperfs = Vec::new();
    for (i, j) in [(0, 1), (1, 0)] {
        let pod = lab.pod(i, j).context("backend pod")?.clone();
        let port = workload::IPERF_PORT.to_string();
        iperfs.push(lab.spawn(
            &pod.ns,
            &format!("{}-iperf3", pod.name),
            &["iperf3", "-s", "-p", &port],
        )?);
    }
    Ok(iperfs)
}
