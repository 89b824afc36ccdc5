//! kproxy's automation: `cargo xtask build`, `cargo xtask demo [--keep]`, `cargo xtask demo-down`,
//! `cargo xtask lab up|down|status|sweep`,
//! `cargo xtask bench [--quick] [--only-e2e | --only-programming | --only-per-packet |
//! --only-ipv6 | --only-latency]
//! [--kproxy-before BINARY] [--bin-dir DIR] [--out DIR] [--report DIR]`,
//! `cargo xtask kernels [--kernels 5.10,6.1]`.

mod kernels;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use kproxy_tests::lab::{self, Lab, LabSpec, Wiring};

/// Prefix of the lab `cargo xtask lab` manages when none is given.
const DEFAULT_PREFIX: &str = "kplab";

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "kproxy build and lab automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the binaries of the default members: kproxy (its build script builds the eBPF
    /// object), kproxy-netexec, xtask. `--workspace` would also try the eBPF crate for the host.
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// The demo: a 2-node lab, one agent per node on `examples/`, traffic, and what happened.
    Demo {
        /// Keep the lab running afterwards (remove it with `cargo xtask demo-down`).
        #[arg(long)]
        keep: bool,
        /// Manifest directory.
        #[arg(long, default_value = "examples/demo")]
        manifests: PathBuf,
    },
    /// Remove the lab a `demo --keep` left running.
    DemoDown,
    /// Benchmark kproxy against kube-proxy-equivalent iptables / nftables rule sets and the
    /// direct-to-pod floor; results in bench/results/<UTC time>/ (and bench/results/latest).
    Bench {
        /// Small scales, one repetition, short runs (≤ 3 minutes): a smoke test of the harness.
        #[arg(long)]
        quick: bool,
        /// Output directory (default: bench/results/<UTC time>, or a temp dir with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only item 5 (change → first connection, with the programming figures of its scale):
        /// a few minutes instead of the whole run, results in a temp dir unless --out.
        #[arg(long, conflicts_with = "only_programming")]
        only_e2e: bool,
        /// Only items 4 and 6 (programming time and memory of kproxy, iptables and nftables at
        /// the run's programming scales): minutes instead of the whole run, results in a temp dir
        /// unless --out.
        #[arg(long)]
        only_programming: bool,
        /// Only the per-packet costs: bpf_stats under real traffic (item 8) and
        /// BPF_PROG_TEST_RUN (item 7), about a minute, results in a temp dir unless --out.
        #[arg(long, conflicts_with_all = ["only_e2e", "only_programming"])]
        only_per_packet: bool,
        /// Only the IPv6 rows: ClusterIP new-connection latency (floor, kproxy, ip6tables,
        /// nftables) and NodePort TCP from the external client (kproxy, ip6tables, nftables),
        /// each in a dual-stack lab, about two minutes, results in a temp dir unless --out.
        #[arg(long, conflicts_with_all = ["only_e2e", "only_programming", "only_per_packet"])]
        only_ipv6: bool,
        /// Only ClusterIP new-connection latency at 1 and 1,000 services: floor, kproxy,
        /// kproxy with generic XDP on eth0 (kproxy-generic), with clsact filters instead of
        /// tcx links (kproxy-clsact), with eBPF host routing and with
        /// the socket LB, and the floor across empty TC programs on kproxy's hooks (tcx links:
        /// floor-tc-hooks; clsact filters: floor-clsact-hooks), twice the repetitions, with the
        /// kproxy programs' run time per connection (bpf_stats), the service's and a direct
        /// one's; about 15 minutes, results in a temp dir unless --out.
        #[arg(long, conflicts_with_all = ["only_e2e", "only_programming", "only_per_packet", "only_ipv6"])]
        only_latency: bool,
        /// Benchmark the binaries in DIR (kproxy, kproxy-loadgen, ...: a copy of another
        /// revision's target/release, to compare two datapaths) instead of building; item 7
        /// (BPF_PROG_TEST_RUN, which loads the object built into xtask) is left out.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// An earlier kproxy binary (e.g. a copy of main's target/release/kproxy) measured
        /// beside the one built in the programming and memory items, as `kproxy-before`:
        /// before/after figures of one run.
        #[arg(long, value_name = "BINARY")]
        kproxy_before: Option<PathBuf>,
        /// Measure nothing: rewrite `report.md` and the plots of the run in DIR from its
        /// `results.json` (after a change to the report's tables).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["quick", "out", "only_e2e", "only_programming", "kproxy_before", "only_per_packet", "only_ipv6", "only_latency", "bin_dir"])]
        report: Option<PathBuf>,
    },
    /// The kernel matrix: the BPF_PROG_TEST_RUN suite and the verifier's figures on every
    /// kernel of xtask/kernels.list (booted with qemu), end-to-end tests on the oldest.
    Kernels(kernels::Opts),
    /// Manage a long-lived lab (a virtual cluster in network namespaces).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Debug, Subcommand)]
enum LabCmd {
    /// Build a lab and leave it running; prints its map.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = 3)]
        pods: usize,
        /// Pod wiring: routed (Calico-like) or bridged (Flannel-like).
        #[arg(long, default_value = "routed")]
        wiring: Wiring,
        /// Name prefix of the lab's namespaces and pins.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// Also start kproxy-netexec (8080 TCP/UDP) and dnsmasq (5353) in every pod.
        #[arg(long)]
        servers: bool,
        /// Dual stack: IPv6 addresses and routes (inside 2001:2::/48) as well.
        #[arg(long)]
        ipv6: bool,
    },
    /// Remove a lab: processes inside it, its namespaces and its pins.
    Down {
        /// Name prefix of the lab.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Show a lab's namespaces, addresses and processes.
    Status {
        /// Name prefix of the lab.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Remove labs left by test runs that died (automatic `kpl<pid>x<n>` prefixes whose
    /// process is gone).
    Sweep,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build { release } => build(release),
        Cmd::Demo { keep, manifests } => kproxy_tests::demo::run(&manifests, keep),
        Cmd::DemoDown => kproxy_tests::demo::down(),
        Cmd::Bench { report: Some(dir), .. } => kproxy_tests::bench::rewrite_report(&dir),
        Cmd::Bench {
            quick,
            out,
            only_e2e,
            only_programming,
            kproxy_before,
            only_per_packet,
            only_ipv6,
            only_latency,
            bin_dir,
            report: None,
        } => {
            let only = [
                (only_e2e, Only::E2e),
                (only_programming, Only::Programming),
                (only_per_packet, Only::PerPacket),
                (only_ipv6, Only::Ipv6),
                (only_latency, Only::Latency),
            ]
            .into_iter()
            .find_map(|(set, o)| set.then_some(o));
            bench(quick, out, only, kproxy_before, bin_dir)
        }
        Cmd::Kernels(opts) => kernels::run(&workspace_root(), &opts),
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Up { nodes, pods, wiring, prefix, servers, ipv6 } => {
                let spec =
                    LabSpec { prefix: Some(prefix), nodes, pods_per_node: pods, wiring, ipv6 };
                lab_up(spec, servers)
            }
            LabCmd::Down { prefix } => {
                let removed = lab::sweep(&prefix)?;
                let _ = std::fs::remove_dir_all(lab::log_root(&prefix));
                if removed.is_empty() {
                    println!("no lab with prefix {prefix}");
                }
                for r in removed {
                    println!("removed {r}");
                }
                Ok(())
            }
            LabCmd::Status { prefix } => lab_status(&prefix),
            LabCmd::Sweep => {
                let removed = lab::sweep_orphans()?;
                if removed.is_empty() {
                    println!("nothing to sweep");
                }
                for r in removed {
                    println!("removed {r}");
                }
                Ok(())
            }
        },
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").into()
}

fn build(release: bool) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "cargo build failed ({status})");
    Ok(())
}

/// The part of the bench run alone (`--only-*`).
#[derive(Debug, Clone, Copy)]
enum Only {
    E2e,
    Programming,
    PerPacket,
    Ipv6,
    Latency,
}

fn bench(
    quick: bool,
    out: Option<PathBuf>,
    only: Option<Only>,
    kproxy_before: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
) -> Result<()> {
    use kproxy_tests::bench;
    // Timings of unoptimized binaries mean nothing: the agent and the load generator run from
    // the release profile (or from the copy of a release build given).
    let bin_dir_given = bin_dir.is_some();
    let bins = match bin_dir {
        Some(d) => {
            std::fs::canonicalize(&d).with_context(|| format!("--bin-dir {}", d.display()))?
        }
        None => {
            build(true)?;
            workspace_root().join("target/release")
        }
    };
    // SAFETY: single-threaded here; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("KPROXY_BIN_DIR", bins) };
    let mut cfg = if quick { bench::Config::quick() } else { bench::Config::full() };
    cfg = match only {
        Some(Only::E2e) => cfg.only_e2e(),
        Some(Only::Programming) => cfg.only_programming(),
        Some(Only::PerPacket) => cfg.only_per_packet(),
        Some(Only::Ipv6) => cfg.only_ipv6(),
        Some(Only::Latency) => cfg.only_latency(),
        None => cfg,
    };
    if bin_dir_given {
        // BPF_PROG_TEST_RUN loads the object built into this process, not the one in DIR.
        cfg.testrun_scales.clear();
    }
    if let Some(bin) = kproxy_before {
        cfg.kproxy_before = Some(std::path::absolute(&bin).context("--kproxy-before")?);
    }
    let stamp = bench::utc_now().replace(':', "");
    let results_dir = workspace_root().join("bench/results");
    let (dir, is_default) = match out {
        Some(d) => (d, false),
        None if quick || only.is_some() || bin_dir_given => {
            (std::env::temp_dir().join(format!("kproxy-bench-quick-{stamp}")), false)
        }
        None => (results_dir.join(&stamp), true),
    };
    println!("[bench] results go to {}", dir.display());
    let previous = results_dir.join("latest").join("results.json");
    let results = bench::run_compared(&cfg, &dir, Some(&previous))?;
    if is_default {
        let latest = results_dir.join("latest");
        let _ = std::fs::remove_file(&latest);
        std::os::unix::fs::symlink(&stamp, &latest)
            .with_context(|| format!("linking {}", latest.display()))?;
    }
    let missing = results.figures.iter().filter(|f| f.median.is_none()).count();
    println!(
        "[bench] done in {:.0} s: {} figures, {missing} missing (see the report)\n[bench] {}",
        results.wall_s,
        results.figures.len(),
        dir.join("report.md").display()
    );
    Ok(())
}

fn lab_up(spec: LabSpec, servers: bool) -> Result<()> {
    let mut lab = Lab::up(spec)?;
    if servers {
        lab.set_outlive_parent(true);
        lab.start_servers().context("starting pod servers (build them: cargo xtask build)")?;
    }
    print!("{}", lab.describe());
    if servers {
        println!("servers: kproxy-netexec on TCP/UDP {}, dnsmasq on {}", lab::SERVER_PORT, {
            lab::DNS_PORT
        });
    }
    let prefix = lab.persist();
    println!("remove it with: cargo xtask lab down --prefix {prefix}");
    Ok(())
}

fn lab_status(prefix: &str) -> Result<()> {
    let namespaces = lab::lab_namespaces(prefix)?;
    if namespaces.is_empty() {
        bail!("no lab with prefix {prefix} (cargo xtask lab up --prefix {prefix})");
    }
    println!("lab {prefix}: {} namespaces", namespaces.len());
    for ns in &namespaces {
        let out = lab::exec(ns, &["ip", "-br", "-4", "addr", "show"])?;
        let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("lo "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        println!("  {ns:<28} {}", addrs.join(" | "));
        for pid in processes_in(ns) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            println!("      pid {pid} {}", comm.trim());
        }
    }
    let pins = lab::pin_root(prefix);
    if pins.exists() {
        println!("  pins under {}", pins.display());
    }
    println!("enter one: nsenter --net=/run/netns/<ns> bash");
    Ok(())
}

/// Pids whose network namespace is `ns` (what `ip netns pids` prints).
fn processes_in(ns: &str) -> Vec<u32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
    })
    .unwrap_or_default()
}
