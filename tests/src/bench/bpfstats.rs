//! Per-program cost under real traffic, from the kernel's own accounting: run-time statistics
//! are switched on (`BPF_ENABLE_STATS`, the switch behind `kernel.bpf_stats_enabled`, held only
//! for the measurement and released when the returned fd closes, also if the bench fails) and
//! each program's `run_time_ns / run_cnt` is taken over a traffic window, as `bpftool prog show`
//! reports them. The kernel's timing of each run is part of the figure (two clock reads, tens
//! of ns on a VM): an empty program measured in the same window under the same traffic is that
//! floor, and a program's net cost is its figure minus the empty program's.
use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use kproxy::dataplane::sys::{self, bpf_cmd};
use serde_json::Value;

/// Switches run-time statistics on until the fd is dropped.
pub fn enable() -> Result<OwnedFd> {
    let mut attr = sys::attr();
    attr.enable_stats.type_ = aya_obj::generated::bpf_stats_type::BPF_STATS_RUN_TIME as u32;
    // SAFETY: an attribute block of plain numbers.
    let fd = unsafe { sys::bpf(bpf_cmd::BPF_ENABLE_STATS, &mut attr) }
        .context("BPF_ENABLE_STATS (Linux 5.8+)")?;
    // SAFETY: a fresh fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Run time and run count of each program using the counters map pinned under `pin_path` (the
/// programs of that agent, not those of other kproxy instances on the machine) and of the
/// programs with ids `extra` (e.g. the lab's empty XDP program), by name.
pub fn snapshot(pin_path: &Path, extra: &[u32]) -> Result<BTreeMap<String, (u64, u64)>> {
    let pin = pin_path.join("v1").join(kproxy_common::names::COUNTERS);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin)
        .output()?;
    let map: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool map show pinned {}", pin.display()))?;
    let id = map["id"].as_u64().with_context(|| format!("no map id for {}", pin.display()))?;
    let out = std::process::Command::new("bpftool").args(["-j", "prog", "show"]).output()?;
    let progs: Value = serde_json::from_slice(&out.stdout).context("bpftool prog show JSON")?;
    let mut m = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let ours =
            p["map_ids"].as_array().is_some_and(|l| l.iter().any(|x| x.as_u64() == Some(id)))
                || p["id"].as_u64().is_some_and(|i| extra.iter().any(|e| u64::from(*e) == i));
        let Some(name) = p["name"].as_str().filter(|_| ours) else { continue };
        let e = m.entry(name.to_string()).or_insert((0, 0));
        e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(m)
}

/// Fewest runs in a window for a per-run figure (a handful of stray packets, ARP for example,
/// says nothing about a program's cost under the window's traffic).
pub const MIN_RUNS: u64 = 100;

/// ns per run of program `name` between two snapshots; `None` when it ran fewer than
/// [`MIN_RUNS`] times.
pub fn per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    name: &str,
) -> Option<f64> {
    let (t1, _) = after.get(name)?;
    let (t0, _) = before.get(name).copied().unwrap_or((0, 0));
    let runs = runs(before, after, name);
    (runs >= MIN_RUNS).then(|| t1.saturating_sub(t0) as f64 / runs as f64)
}

/// Runs of program `name` between two snapshots (0 when it is in neither).
pub fn runs(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    name: &str,
) -> u64 {
    let c1 = after.get(name).map_or(0, |e| e.1);
    let c0 = before.get(name).map_or(0, |e| e.1);
    c1.saturating_sub(c0)
}
