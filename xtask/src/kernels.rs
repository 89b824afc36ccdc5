//! `cargo xtask kernels`: the datapath on the kernels production nodes run. Each kernel of
//! `xtask/kernels.list` (unpacked by `make setup`) is booted with qemu through virtme-ng, on the
//! machine's own root file system, and runs inside it:
//! - the BPF_PROG_TEST_RUN suite (`tests/tests/datapath_testrun.rs`: every program through the
//!   verifier of that kernel, crafted frames in and out; its `real_sockets_*` tests, with real
//!   sockets in namespaces, on the oldest kernel only, as they take minutes under emulation;
//!   `--pure-testrun`, what `make test` runs: only the tests that build no namespace);
//! - the verifier's own figures for every program (`kproxy-verifier-stats`);
//! - the kernel feature probes (`kproxy features`), each checked against the kernel the table
//!   says it needs;
//! - on the oldest kernel, namespace end-to-end tests with the agent: a ClusterIP and a NodePort
//!   service served to real sockets.
//!
//! Output: each test line prefixed with the kernel (`test [linux 5.10] name ... ok`) and each
//! suite's `test result:` line, which the summary of `make test` adds up.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// One kernel of the matrix.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Series, e.g. "5.10".
    pub series: String,
    /// Debian package, e.g. "linux-image-5.10.0-30-amd64".
    pub package: String,
}

impl Kernel {
    /// The release the package unpacks to (its `boot/vmlinuz-<release>`).
    fn release(&self) -> &str {
        self.package.trim_start_matches("linux-image-")
    }
}

/// Conformance tests run on the oldest kernel: a ClusterIP and a NodePort service, with the
/// agent, in a lab of real sockets.
const E2E_TESTS: [&str; 2] = [
    "upstream_should_serve_a_basic_endpoint_from_pods",
    "upstream_should_create_a_functioning_nodeport_service",
];

/// TEST_RUN tests that build network namespaces (veth pairs, routes, neighbours) around the
/// programs: each takes minutes under emulation (many short `ip` processes), so
/// [`Opts::pure_testrun`] leaves them out, with the `real_sockets_*` tests. A test missing
/// from this list only makes that run slower.
const NAMESPACE_TESTS: [&str; 23] = [
    "a_translated_packet_passed_on_is_left_as_it_came_by_a_second_kproxy_program",
    "another_abi_versions_datapath_is_taken_over",
    "attachments_outlive_the_agent_and_are_replaced_in_place",
    "earlier_loads_tail_call_tables_go_once_their_programs_run_nowhere",
    "established_path_cost",
    "icmp_error_from_remote_backend_reaches_external_client",
    "local_only_keeps_client_address_and_drop_if_empty",
    "nodeport_local_backend_no_snat",
    "nodeport_remote_backend_snat_fib_forward_and_reply",
    "nodeport_remote_without_neighbour_goes_xdp_to_tc",
    "pod_to_own_node_nodeport_remote_backend_reply_is_forwarded",
    "programs_behind_kproxys_see_every_packet_it_passes",
    "snat_ports_run_out_and_are_reclaimed_from_closed_connections",
    "tcx_anchor_head_puts_kproxys_link_in_front_of_other_owners",
    "xdp_route_cache_follows_a_neighbour_change",
    "ipv6_nodeport_remote_backend_snat_fib_forward_and_reply",
    "ipv6_packet_too_big_from_remote_backend_path_reaches_external_client",
    "established_path_cost6",
    "ipv6_xdp_nodeport_remote_backend_snat_fib_redirect_and_reply",
    "ipv6_xdp_nodeport_remote_without_neighbour_goes_to_tc",
    "ipv6_xdp_packet_too_big_reaches_external_client",
    "ipv6_xdp_route_cache_follows_a_neighbour_change",
    "real_sockets_",
];

/// What to run (the options of `cargo xtask kernels`).
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// Kernel series to run, comma-separated (default: all of xtask/kernels.list).
    #[arg(long, value_delimiter = ',')]
    pub kernels: Vec<String>,
    /// Only the TEST_RUN tests whose names contain this (skips the end-to-end tests).
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the end-to-end tests on the oldest kernel.
    #[arg(long)]
    pub no_e2e: bool,
    /// Only load every program with each kernel's verifier (`kproxy-verifier-stats`; a couple
    /// of minutes): a quick check of a datapath change against each verifier.
    #[arg(long)]
    pub verifier_only: bool,
    /// The verifier on every kernel and the end-to-end tests on the oldest, without the
    /// TEST_RUN suite (which takes an hour per kernel under emulation).
    #[arg(long)]
    pub no_testrun: bool,
    /// Only the TEST_RUN suite (no verifier figures, feature probes or end-to-end tests).
    #[arg(long, conflicts_with_all = ["no_testrun", "verifier_only"])]
    pub testrun_only: bool,
    /// Only the TEST_RUN tests that build no network namespace (`NAMESPACE_TESTS` in
    /// xtask/src/kernels.rs; minutes per kernel instead of an hour), with the verifier figures,
    /// feature probes and, on the oldest kernel, the end-to-end tests; what `make test` runs.
    #[arg(long, conflicts_with_all = ["no_testrun", "verifier_only"])]
    pub pure_testrun: bool,
}

/// What runs in one guest.
#[derive(Debug, Clone, Copy)]
struct Suites {
    /// The verifier's figures and the feature probes.
    checks: bool,
    /// The BPF_PROG_TEST_RUN suite.
    testrun: bool,
    /// Its real-socket tests too.
    sockets: bool,
    /// Only its tests that build no namespace.
    pure: bool,
    /// The agent end-to-end tests.
    e2e: bool,
}

/// Where `make setup` keeps its tools.
fn tools() -> PathBuf {
    std::env::var_os("KPROXY_TOOLS").map(PathBuf::from).unwrap_or("/opt/kproxy-tools".into())
}

/// The kernels of `xtask/kernels.list`, oldest first.
pub fn list(root: &Path) -> Result<Vec<Kernel>> {
    let path = root.join("xtask/kernels.list");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 3, "{}: bad line {line:?} (series suite package)", path.display());
        out.push(Kernel { series: f[0].into(), package: f[2].into() });
    }
    Ok(out)
}

/// The test executables cargo builds for `targets` (name → path).
fn test_executables(root: &Path, targets: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(["test", "--no-run", "--message-format=json", "-p", "kproxy-tests"]);
    for t in targets {
        cmd.args(["--test", t]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("cargo test --no-run")?;
    ensure!(out.status.success(), "building the test binaries failed");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if targets.contains(&name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for t in targets {
        ensure!(found.iter().any(|(n, _)| n == t), "cargo built no executable for test {t}");
    }
    Ok(found)
}

/// Builds the binaries the guest runs from `target/debug` (the agent, for the feature probes and
/// the end-to-end tests, the lab's servers, `kproxy-verifier-stats`): one left there by an
/// earlier build would test another datapath than the tree's.
fn build_guest_bins(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--bins", "-p", "kproxy", "-p", "kproxy-tests"])
        .status()
        .context("cargo build")?;
    ensure!(status.success(), "cargo build of the guest's binaries failed ({status})");
    Ok(())
}

fn exe<'a>(exes: &'a [(String, PathBuf)], name: &str) -> &'a Path {
    &exes.iter().find(|(n, _)| n == name).expect("built above").1
}

/// Shell-quotes `s` for the guest script.
fn q(s: &Path) -> String {
    format!("'{}'", s.display().to_string().replace('\'', r"'\''"))
}

/// Runs the matrix; fails if any suite failed on any kernel (after running them all).
pub fn run(root: &Path, opts: &Opts) -> Result<()> {
    let all = list(root)?;
    let selected: Vec<&Kernel> = if opts.kernels.is_empty() {
        all.iter().collect()
    } else {
        let mut v = Vec::new();
        for s in &opts.kernels {
            v.push(all.iter().find(|k| &k.series == s).with_context(|| {
                format!("kernel {s} is not in xtask/kernels.list (have: {})", series(&all))
            })?);
        }
        v
    };
    let vng = tools().join("vng/bin/vng");
    ensure!(vng.exists(), "{} missing: run `make setup`", vng.display());
    let oldest = all.first().context("xtask/kernels.list is empty")?;
    let exes = test_executables(root, &["datapath_testrun", "conformance"])?;
    build_guest_bins(root)?;
    let stats = root.join("target/debug/kproxy-verifier-stats");
    ensure!(stats.exists(), "cargo built no {}", stats.display());
    let mut failed = Vec::new();
    for k in selected {
        let oldest = k.series == oldest.series;
        let suites = Suites {
            checks: !opts.testrun_only,
            testrun: !opts.verifier_only && !opts.no_testrun,
            sockets: oldest && !opts.pure_testrun,
            pure: opts.pure_testrun,
            e2e: !opts.verifier_only
                && !opts.no_e2e
                && !opts.testrun_only
                && opts.filter.is_none()
                && oldest,
        };
        match run_one(root, k, &exes, &stats, opts.filter.as_deref(), suites) {
            Ok(true) => {}
            Ok(false) => failed.push(k.series.clone()),
            Err(e) => {
                println!("kernel {}: {e:#}", k.series);
                println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured");
                failed.push(k.series.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("the datapath failed on linux {}", failed.join(", "));
    }
    Ok(())
}

fn series(all: &[Kernel]) -> String {
    all.iter().map(|k| k.series.as_str()).collect::<Vec<_>>().join(", ")
}

/// File the guest script creates first (in the shared output directory).
const STARTED: &str = "started";

/// Boots of one kernel tried before its suites count as failed for want of a guest.
const BOOT_ATTEMPTS: u32 = 3;

/// Boots one kernel and runs the suites in it; `Ok(false)` if a suite failed.
fn run_one(
    root: &Path,
    k: &Kernel,
    exes: &[(String, PathBuf)],
    stats: &Path,
    filter: Option<&str>,
    suites: Suites,
) -> Result<bool> {
    let image =
        tools().join("kernels").join(k.release()).join(format!("boot/vmlinuz-{}", k.release()));
    ensure!(image.exists(), "{} missing: run `make setup`", image.display());
    let out =
        std::env::temp_dir().join(format!("kproxy-kernel-{}-{}", k.series, std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let _cleanup = RemoveOnDrop(out.clone());
    let tests_dir = root.join("tests");
    let mut script = String::from(
        "set -u\nmount -t bpf bpf /sys/fs/bpf\nip link set lo up\nexport RUST_BACKTRACE=0\n",
    );
    // Written first: a guest that never got this far failed to boot (retried below).
    script += &format!(": > {}\n", q(&out.join(STARTED)));
    script += &format!("cd {}\n", q(&tests_dir));
    if suites.checks {
        script +=
            &format!("{} > {o}/stats.txt 2>&1; echo $? > {o}/stats.rc\n", q(stats), o = q(&out));
        script += &format!(
            "{} features -o json > {o}/features.json 2> {o}/features.err\n",
            q(&root.join("target/debug/kproxy")),
            o = q(&out)
        );
    }
    if let Ok(n) = std::env::var("KPROXY_TESTRUN_LOADS") {
        // How many datapath loads the TEST_RUN suite shares (tests/tests/datapath_testrun).
        script += &format!("export KPROXY_TESTRUN_LOADS='{}'\n", n.replace('\'', ""));
    }
    if suites.testrun {
        let skip = if suites.pure {
            NAMESPACE_TESTS.iter().map(|t| format!(" --skip {t}")).collect()
        } else if suites.sockets {
            String::new()
        } else {
            " --skip real_sockets_".to_string()
        };
        script += &format!(
            "{} --test-threads=2 {}{skip} > {o}/testrun.txt 2>&1; echo $? > {o}/testrun.rc\n",
            q(exe(exes, "datapath_testrun")),
            filter.map(|f| format!("'{f}'")).unwrap_or_default(),
            o = q(&out)
        );
    }
    if suites.e2e {
        script += &format!(
            "{} --test-threads=1 --exact {} > {o}/e2e.txt 2>&1; echo $? > {o}/e2e.rc\n",
            q(exe(exes, "conformance")),
            E2E_TESTS.join(" "),
            o = q(&out)
        );
    }
    let script_path = out.join("run.sh");
    std::fs::write(&script_path, script)?;
    println!("\n[kernels] linux {} ({}): booting under qemu", k.series, k.package);
    let vng_bin = tools().join("vng/bin");
    let path = format!("{}:{}", vng_bin.display(), std::env::var("PATH").unwrap_or_default());
    let console = out.join("console.txt");
    for attempt in 1..=BOOT_ATTEMPTS {
        let started = Instant::now();
        let log = std::fs::File::create(&console).context("creating the console log")?;
        let status = Command::new("timeout")
            .arg(Duration::from_secs(40 * 60).as_secs().to_string())
            .arg(vng_bin.join("vng"))
            .args(["--verbose", "-r"])
            .arg(&image)
            .args(["--disable-microvm", "--disable-kvm", "--memory", "2G", "--cpus", "2"])
            .arg("--rwdir")
            .arg(&out)
            .args(["--", "bash"])
            .arg(&script_path)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("the console log")?)
            .stderr(log)
            .status()
            .context("starting vng")?;
        println!(
            "[kernels] linux {}: guest done in {:.0} s ({status})",
            k.series,
            started.elapsed().as_secs_f64()
        );
        if out.join(STARTED).exists() {
            break;
        }
        // The emulated guest sometimes never reaches the script (the 6.12 guest on 2026-12-03:
        // done in 13 s, nothing written, once in five runs): its console says why, and the
        // suites are run in a fresh boot.
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        println!(
            "[kernels] linux {}: the guest did not run the suites (boot {attempt} of {BOOT_ATTEMPTS}); its console ended with:",
            k.series
        );
        for line in tail.iter().rev() {
            println!("  | {line}");
        }
    }
    let mut ok = true;
    if suites.checks {
        ok &= verifier(k, &out) & features(k, &out);
    }
    if suites.testrun {
        ok &= report(k, &out, "testrun", "BPF_PROG_TEST_RUN suite")?;
    }
    if suites.e2e {
        ok &= report(k, &out, "e2e", "end-to-end tests (agent, lab)")?;
        ok &= all_ran(k, &out.join("e2e.txt"), &E2E_TESTS);
    }
    Ok(ok)
}

/// Prints the verifier's figures of one kernel; counts as one test.
fn verifier(k: &Kernel, out: &Path) -> bool {
    let stats_ok = std::fs::read_to_string(out.join("stats.rc")).is_ok_and(|s| s.trim() == "0");
    println!("[kernels] linux {}: verifier, per program", k.series);
    for line in std::fs::read_to_string(out.join("stats.txt")).unwrap_or_default().lines() {
        println!("  {line}");
    }
    println!(
        "test [linux {}] verifier_accepts_every_program ... {}",
        k.series,
        if stats_ok { "ok" } else { "FAILED" }
    );
    println!(
        "test result: {}. {} passed; {} failed; 0 ignored; 0 measured",
        if stats_ok { "ok" } else { "FAILED" },
        u8::from(stats_ok),
        u8::from(!stats_ok)
    );
    stats_ok
}

/// Whether every named test ran and passed (a renamed test would otherwise be filtered out
/// silently by `--exact`); a missing one is printed as a failed test.
fn all_ran(k: &Kernel, log: &Path, names: &[&str]) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut ok = true;
    for name in names {
        if !text.lines().any(|l| l.starts_with(&format!("test {name} ... "))) {
            println!("test [linux {}] {name} ... FAILED (did not run: no such test?)", k.series);
            println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured");
            ok = false;
        }
    }
    ok
}

/// Prints the feature probes of one kernel and checks each against the kernel version its
/// table row says it needs (`since`); counts as one test.
fn features(k: &Kernel, out: &Path) -> bool {
    let json = std::fs::read_to_string(out.join("features.json")).unwrap_or_default();
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(&json).ok();
    let mut ok = parsed.is_some();
    println!("[kernels] linux {}: kernel features (available / needs)", k.series);
    for (name, f) in parsed.iter().flatten() {
        let available = f["available"].as_bool().unwrap_or(false);
        let since = f["since"].as_str().unwrap_or("?");
        let expected = version(&k.series) >= version(since);
        println!(
            "  {name:<24} {:<4} needs {since}{}",
            if available { "yes" } else { "no" },
            if available == expected { "" } else { "  <- not what the table says" }
        );
        ok &= available == expected;
    }
    if parsed.is_none() {
        let err = std::fs::read_to_string(out.join("features.err")).unwrap_or_default();
        println!("  kproxy features failed: {}", err.trim());
    }
    let verdict = if ok { "ok" } else { "FAILED" };
    println!("test [linux {}] kernel_features_match_their_table ... {verdict}", k.series);
    println!(
        "test result: {verdict}. {} passed; {} failed; 0 ignored; 0 measured",
        u8::from(ok),
        u8::from(!ok)
    );
    ok
}

/// "6.12" -> (6, 12).
fn version(s: &str) -> (u32, u32) {
    let mut it = s.split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Prints one suite's results with the kernel in every test line; `Ok(false)` if it failed.
fn report(k: &Kernel, out: &Path, name: &str, what: &str) -> Result<bool> {
    let rc = std::fs::read_to_string(out.join(format!("{name}.rc")))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let text = std::fs::read_to_string(out.join(format!("{name}.txt"))).unwrap_or_default();
    println!("[kernels] linux {}: {what}", k.series);
    let mut result_seen = false;
    let mut in_failures = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if !rest.starts_with("result:") {
                println!("test [linux {}] {rest}", k.series);
                continue;
            }
            result_seen = true;
            println!("{line}");
        } else if line == "failures:" {
            in_failures = true;
            println!("{line}");
        } else if in_failures {
            println!("  {line}");
        }
    }
    match rc {
        Some(0) if result_seen => Ok(true),
        _ => {
            if !result_seen {
                // The guest died or hung before the suite ended: count it as one failure.
                println!(
                    "[kernels] linux {}: {what} did not finish (exit {rc:?}); last output:",
                    k.series
                );
                for line in text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev() {
                    println!("  {line}");
                }
                println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured");
            }
            Ok(false)
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
