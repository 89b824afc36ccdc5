//! `report.md` (tables, goals, missing figures) and the PNG plots of a benchmark run.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result, ensure};

use super::{
    Results,
    results::{Figure, Status, find, median},
};

/// Python script drawing the plots from `results.json` (run with the system python3, which
/// has matplotlib from `make setup`).
const PLOT_PY: &str = include_str!("plot.py");

/// Names of the PNG files [`plots`] writes.
pub const PLOTS: [&str; 3] =
    ["latency_vs_services.png", "programming_time.png", "testrun_cost.png"];

/// Draws the plots into `dir` (which holds `results.json`).
pub fn plots(dir: &Path) -> Result<()> {
    let script = dir.join(".plot.py");
    std::fs::write(&script, PLOT_PY)?;
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(dir)
        .output()
        .context("running /usr/bin/python3 (make setup installs python3-matplotlib)");
    let _ = std::fs::remove_file(&script);
    let out = out?;
    ensure!(out.status.success(), "plotting failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn fmt_num(v: f64, unit: &str) -> String {
    match unit {
        "bytes" => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        "bit/s" => format!("{:.2} Gbit/s", v / 1e9),
        "1/s" => {
            if v >= 1e4 {
                format!("{:.0}k", v / 1e3)
            } else {
                format!("{v:.0}")
            }
        }
        "s" => format!("{v:.3} s"),
        "ms" => format!("{v:.2} ms"),
        "µs" => format!("{v:.0} µs"),
        "ns" => format!("{v:.0} ns"),
        _ => format!("{v:.2}"),
    }
}

/// "median (min–max)" or "— (why)".
fn cell(f: Option<&Figure>) -> String {
    let Some(f) = f else { return "—".into() };
    match (f.status, f.median) {
        (Status::Ok, Some(m)) => {
            let (lo, hi) = (f.min.unwrap_or(m), f.max.unwrap_or(m));
            if f.samples.len() > 1 {
                format!(
                    "{} ({}–{})",
                    fmt_num(m, &f.unit),
                    fmt_num(lo, &f.unit),
                    fmt_num(hi, &f.unit)
                )
            } else {
                fmt_num(m, &f.unit)
            }
        }
        (Status::Skipped, _) => "not measured¹".into(),
        _ => "failed²".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `text` on one line without terminal escapes, at most `max` characters (an ellipsis says it
/// was cut).
pub fn one_line(text: &str, max: usize) -> String {
    let mut plain = String::with_capacity(text.len().min(max + 8));
    let mut esc = false;
    for c in text.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, c) if c.is_ascii_alphabetic() => esc = false,
            (true, _) => {}
            (false, '\n' | '\r' | '\t') => plain.push(' '),
            (false, c) => plain.push(c),
        }
    }
    let plain = plain.split_whitespace().collect::<Vec<_>>().join(" ");
    if plain.chars().count() <= max {
        return plain;
    }
    let mut cut: String = plain.chars().take(max).collect();
    cut.push('…');
    cut
}

/// The label of a NodePort system in the tables.
fn nodeport_label(sys: &str) -> &str {
    match sys {
        "kproxy" => "kproxy (native XDP)",
        "kproxy-generic" => "kproxy (generic XDP)",
        "kproxy-tc" => "kproxy (TC only, the default on veth)",
        s => s,
    }
}

/// One row of the goals table.
#[derive(Debug, Clone, PartialEq)]
pub struct GoalRow {
    /// The goal, with its issue and number.
    pub goal: String,
    /// What this run measured.
    pub measured: String,
    /// The measured figure as a ratio against a baseline measured in the same run (the floor,
    /// a kube-proxy rule set, an empty or bounce-only program), so that runs on a loaded or a
    /// different machine compare.
    pub baseline: String,
    /// "met", "missed (by …)" or "—" (not measured).
    pub verdict: String,
}

fn verdict(ok: bool, by: String) -> String {
    if ok { "met".to_string() } else { format!("missed ({by})") }
}

const NOT_MEASURED: &str = "not measured";

/// How a missed ratio against a baseline reads repetition by repetition: each of kproxy's
/// samples against the baseline's sample of the same repetition (the systems alternate within a
/// repetition), how many of those ratios `meet` the goal, and their range. A miss most
/// repetitions meet is this run's noise; one none meets is not. Empty where the two figures do
/// not have the same number (at least three) of samples, or where a repetition of either
/// failed.
fn by_repetition(
    k: Option<&Figure>,
    base: Option<&Figure>,
    whose: &str,
    meets: impl Fn(f64) -> bool,
) -> String {
    let (Some(k), Some(b)) = (k, base) else { return String::new() };
    // A failed repetition records no sample: after one, the samples no longer pair by index.
    if k.reason.is_some() || b.reason.is_some() {
        return String::new();
    }
    if k.samples.len() != b.samples.len() || k.samples.len() < 3 {
        return String::new();
    }
    let ratios: Vec<f64> =
        k.samples.iter().zip(&b.samples).filter(|(_, b)| **b > 0.0).map(|(k, b)| k / b).collect();
    if ratios.len() != k.samples.len() {
        return String::new();
    }
    let met = ratios.iter().filter(|x| meets(**x)).count();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "; {met} of {} repetitions meet it, each against {whose} repetition beside it \
         ({lo:.2}–{hi:.2}×)",
        ratios.len()
    )
}

/// Goal 10.2 read from item 1's paired figures of `sys` ([`super::PAIRED_P50`]): the service's
/// connections against the direct ones that took turns with them, so that the VM's drift
/// between two systems' runs (which decides the rows against the floor's and nftables' own
/// runs) is out. Against the floor: what the system adds to a connection, ≤ 5%; against
/// nftables: no more than nftables adds, at p50 and p99.
fn paired_rows(
    f: &[Figure],
    c: &super::Config,
    sys: &str,
    mode: &str,
    row: &mut dyn FnMut(&str, String, String, String),
) {
    let (p50, p99) = (super::PAIRED_P50, super::PAIRED_P99);
    let paired = |s: &str, m: &str, n: u64| median(f, "1-latency", m, s, n, "");
    let spread = |item: &str, m: &str, n: u64, v: &str| {
        find(f, item, m, sys, n, v)
            .and_then(|x| Some((x.min?, x.max?, x.samples.len())))
            .filter(|&(.., k)| k > 1)
            .map_or(String::new(), |(lo, hi, k)| format!("; {k} repetitions {lo:.2}–{hi:.2}×"))
    };
    let worst = worst_median(f, "1-latency", p50, sys, &c.scales, "");
    let goal = format!(
        "10.2 paired: service connections' p50 ≤ 1.05× that of direct connections taking turns with them, at every scale{mode}"
    );
    match worst {
        Some((x, n)) => {
            let fig = find(f, "1-latency", p50, sys, n, "");
            let met = fig.map_or(0, |x| x.samples.iter().filter(|r| **r <= 1.05).count());
            let reps = fig.map_or(0, |x| x.samples.len());
            // A failed repetition records no sample, only its reason.
            let failed =
                if fig.is_some_and(|x| x.reason.is_some()) { ", others failed" } else { "" };
            row(
                &goal,
                format!(
                    "{x:.2}× at {} services (the worst scale{})",
                    thousands(n),
                    spread("1-latency", p50, n, "")
                ),
                format!(
                    "direct connections to the endpoint in the same generator (p50 {}){}",
                    cell(find(f, "1-latency", "direct_p50_us", sys, n, "")),
                    paired("floor", p50, n)
                        .map_or(String::new(), |c| format!("; the floor's control {c:.2}×"))
                ),
                verdict(
                    x <= 1.05,
                    format!(
                        "by {:.0}%; {met} of {reps} repetitions meet it{failed}",
                        (x - 1.05) * 100.0
                    ),
                ),
            )
        }
        None => row(&goal, NOT_MEASURED.to_string(), "—".to_string(), "—".to_string()),
    }
    let mut worst_nft: Option<(f64, f64, f64, u64, &str)> = None;
    for &n in &c.scales {
        let n = n as u64;
        for m in [p50, p99] {
            if let (Some(k), Some(nf)) = (paired(sys, m, n), paired("nftables", m, n))
                && worst_nft.is_none_or(|(w, ..)| k / nf > w)
            {
                worst_nft = Some((k / nf, k, nf, n, m));
            }
        }
    }
    let goal = format!(
        "10.2 paired: … no more added to p50 and p99 than nftables adds (each against its own direct connections){mode}"
    );
    match worst_nft {
        Some((x, k, nf, n, m)) => {
            let p = if m == p50 { "p50" } else { "p99" };
            row(
                &goal,
                format!(
                    "{p} {k:.2}× the direct connections' at {} services (the worst{})",
                    thousands(n),
                    spread("1-latency", m, n, "")
                ),
                format!("nftables' {p} {nf:.2}× its direct connections' ({x:.2}×)"),
                verdict(
                    x <= 1.0,
                    format!(
                        "{:.0}% above nftables', each over its own direct connections",
                        (x - 1.0) * 100.0
                    ),
                ),
            )
        }
        None => row(&goal, NOT_MEASURED.to_string(), "—".to_string(), "—".to_string()),
    }
    // Request/response: with a fixed number of clients each waiting for its answer, the rate
    // is the clients over the latency, so "≥ 0.97× the rate" reads "p50 ≤ 1/0.97×".
    let limit = 1.0 / 0.97;
    let worst = worst_median(f, "2-rate", p50, sys, &c.rate_scales, "rr");
    let goal = format!(
        "10.2 paired: request/response on open connections ≥ 0.97× the rate of direct ones taking turns with them (p50 ≤ {limit:.3}×){mode}"
    );
    match worst {
        Some((x, n)) => row(
            &goal,
            format!(
                "p50 {x:.3}× at {} services (the worst{})",
                thousands(n),
                spread("2-rate", p50, n, "rr")
            ),
            format!(
                "direct transactions in the same {} (rate ≈ {:.2}×)",
                if c.rr_paired_pinned { "client" } else { "clients" },
                1.0 / x
            ),
            verdict(x <= limit, format!("{} the rate", short_of(1.0 / x, 0.97))),
        ),
        None => row(&goal, NOT_MEASURED.to_string(), "—".to_string(), "—".to_string()),
    }
}

/// The largest median of a figure over `scales` and the scale it was measured at.
fn worst_median(
    f: &[Figure],
    item: &str,
    metric: &str,
    sys: &str,
    scales: &[usize],
    variant: &str,
) -> Option<(f64, u64)> {
    scales
        .iter()
        .filter_map(|&n| Some((median(f, item, metric, sys, n as u64, variant)?, n as u64)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// A ratio `x` that missed `limit`, with two decimals, or three where two would print the
/// limit itself (0.967 is not "0.97× instead of 0.97×").
fn short_of(x: f64, limit: f64) -> String {
    if format!("{x:.2}") == format!("{limit:.2}") {
        format!("{x:.3}×")
    } else {
        format!("{x:.2}×")
    }
}

/// `a / b` as a factor with two significant digits when it is small (0.004× and 0.000022× read
/// better than 0.00×).
fn times(a: f64, b: f64) -> String {
    let x = a / b;
    let digits = if x > 0.0 && x < 0.1 { (1.0 - x.log10().floor()) as usize } else { 2 };
    format!("{x:.digits$}×")
}

/// A program's ns per run in a bpf_stats window: (net, raw, its floor's).
type NetRawFloor = (f64, f64, f64);

/// The goals of the open issues (10: datapath speed, 12: change to first connection, 13: IPv6)
/// against this run's figures, each with its ratio against a baseline of the same run.
pub fn goals(r: &Results) -> Vec<GoalRow> {
    let f = &r.figures;
    let c = &r.config;
    let mut rows: Vec<GoalRow> = Vec::new();
    let mut row = |goal: &str, measured: String, baseline: String, verdict: String| {
        rows.push(GoalRow { goal: goal.to_string(), measured, baseline, verdict })
    };
    let nm = |row: &mut dyn FnMut(&str, String, String, String), goal: &str| {
        row(goal, NOT_MEASURED.to_string(), "—".to_string(), "—".to_string())
    };

    // Issue 10, goal 1: per-program cost under real traffic (kernel bpf_stats), net of the empty
    // program measured in the same window; the worst window of each goal counts.
    for (goal, figures, limit) in [
        (
            "10.1 `kp_tc_from_pod` ≤ 200 ns per run, established service flows (net of an empty program)",
            &[("from_pod_ns", "clusterip-local"), ("from_pod_ns", "clusterip-remote")][..],
            200.0,
        ),
        (
            "10.1 program on packets entering a pod ≤ 60 ns per run (net)",
            &[
                ("to_pod_ns", "clusterip-local"),
                ("to_pod_ns", "clusterip-remote"),
                ("to_pod_ns", "pod-direct"),
            ],
            60.0,
        ),
        (
            "10.1 program on packets entering a pod, eBPF host routing (`--bpf-host-routing`, opt-in): ≤ 60 ns per run (net) or not run",
            &[("to_pod_ns", "hr-clusterip-local"), ("to_pod_ns", "hr-clusterip-remote")],
            60.0,
        ),
        (
            "10.1 `kp_xdp_ext` ≤ 150 ns per run, established NodePort flows (net)",
            &[("xdp_ext_ns", "nodeport-remote")],
            150.0,
        ),
        (
            "10.1 pod traffic that is not service traffic ≤ 60 ns per run (net)",
            &[("from_pod_ns", "pod-direct")],
            60.0,
        ),
    ] {
        // (net, raw, empty, window) of each window measured; a program that did not run in a
        // window (fewer than the minimum of runs in every repetition: a skip, never a failure)
        // meets its limit, as the goal allows, and reads "not run".
        let got: Vec<(Option<NetRawFloor>, &str)> = figures
            .iter()
            .filter_map(|(m, w)| {
                let measured = || -> Option<NetRawFloor> {
                    let net = median(f, "8-bpf-stats", &super::net_metric(m), "kproxy", 1, w)?;
                    let raw = median(f, "8-bpf-stats", m, "kproxy", 1, w)?;
                    let empty = median(f, "8-bpf-stats", super::floor_metric(m), "kproxy", 1, w)
                        .or_else(|| {
                            median(f, "8-bpf-stats", super::BPF_STATS_EMPTY, "kproxy", 1, w)
                        })?;
                    Some((net, raw, empty))
                };
                match measured() {
                    Some(v) => Some((Some(v), *w)),
                    None => find(f, "8-bpf-stats", m, "kproxy", 1, w)
                        .filter(|x| x.status == Status::Skipped && x.samples.is_empty())
                        .map(|_| (None, *w)),
                }
            })
            .collect();
        let worst = got.iter().map(|(v, _)| v.map_or(0.0, |v| v.0)).max_by(f64::total_cmp);
        match worst {
            Some(net) => {
                let each: Vec<String> = got
                    .iter()
                    .map(|(v, w)| match v {
                        Some((n, r, _)) => format!("{w} {n:.0} ns (raw {r:.0})"),
                        None => format!("{w} not run"),
                    })
                    .collect();
                let base: Vec<String> = got
                    .iter()
                    .map(|(v, w)| match v {
                        Some((_, r, e)) => format!("{w} {} its floor ({e:.0} ns)", times(*r, *e)),
                        None => format!("{w} —"),
                    })
                    .collect();
                row(
                    goal,
                    each.join(", "),
                    base.join(", "),
                    verdict(net <= limit, format!("{:.1}× the limit", net / limit)),
                )
            }
            None => nm(&mut row, goal),
        }
    }
    // Goal 2: new-connection latency against the floor and nftables, request/response rate;
    // for the default datapath, then for the socket LB for pods (opt-in, rows of its own).
    let lat = |sys: &str, p: &str, n: u64| median(f, "1-latency", p, sys, n, "");
    for (sys, mode) in
        [("kproxy", ""), (super::SOCKET_LB, ", socket LB for pods (`--socket-lb-pods`, opt-in)")]
    {
        let mut worst_floor: Option<(f64, f64, f64, u64)> = None;
        let mut worst_nft: Option<(f64, f64, f64, u64, &str)> = None;
        for &n in &c.scales {
            let n = n as u64;
            if let (Some(k), Some(fl)) = (lat(sys, "p50_us", n), lat("floor", "p50_us", n))
                && worst_floor.is_none_or(|(w, ..)| k / fl > w)
            {
                worst_floor = Some((k / fl, k, fl, n));
            }
            for p in ["p50_us", "p99_us"] {
                if let (Some(k), Some(nf)) = (lat(sys, p, n), lat("nftables", p, n))
                    && worst_nft.is_none_or(|(w, ..)| k / nf > w)
                {
                    worst_nft = Some((k / nf, k, nf, n, p));
                }
            }
        }
        let goal =
            format!("10.2 ClusterIP new-connection p50 ≤ 1.05× the floor at every scale{mode}");
        match worst_floor {
            Some((x, k, fl, n)) => row(
                &goal,
                format!("p50 {k:.0} µs at {} services (the worst scale)", thousands(n)),
                format!("{x:.2}× the floor ({fl:.0} µs)"),
                verdict(
                    x <= 1.05,
                    format!(
                        "by {:.0}%{}",
                        (x - 1.05) * 100.0,
                        by_repetition(
                            find(f, "1-latency", "p50_us", sys, n, ""),
                            find(f, "1-latency", "p50_us", "floor", n, ""),
                            "the floor's",
                            |r| r <= 1.05
                        )
                    ),
                ),
            ),
            None => nm(&mut row, &goal),
        }
        let goal =
            format!("10.2 … p50 and p99 ≤ nftables' at every scale nftables was measured at{mode}");
        match worst_nft {
            Some((x, k, nf, n, p)) => {
                let p = p.trim_end_matches("_us");
                row(
                    &goal,
                    format!("{p} {k:.0} µs at {} services (the worst)", thousands(n)),
                    format!("{x:.2}× nftables' {p} ({nf:.0} µs)"),
                    verdict(
                        x <= 1.0,
                        format!(
                            "{:.0}% slower{}",
                            (x - 1.0) * 100.0,
                            by_repetition(
                                find(f, "1-latency", &format!("{p}_us"), sys, n, ""),
                                find(f, "1-latency", &format!("{p}_us"), "nftables", n, ""),
                                "nftables'",
                                |r| r <= 1.0
                            )
                        ),
                    ),
                )
            }
            None => nm(&mut row, &goal),
        }
        paired_rows(f, c, sys, mode, &mut row);
        let rr: Vec<(u64, f64, f64)> = c
            .rate_scales
            .iter()
            .filter_map(|&n| {
                let k = median(f, "2-rate", "rate_per_s", sys, n as u64, "rr")?;
                let fl = median(f, "2-rate", "rate_per_s", "floor", n as u64, "rr")?;
                Some((n as u64, k, fl))
            })
            .collect();
        let goal = format!("10.2 request/response on open connections ≥ 0.97× the floor{mode}");
        match rr.iter().copied().min_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2))) {
            Some((n, k, fl)) => row(
                &goal,
                format!("{k:.0} transactions/s at {} services (the worst)", thousands(n)),
                format!("{:.2}× the floor ({fl:.0}/s)", k / fl),
                verdict(
                    k / fl >= 0.97,
                    format!(
                        "{} instead of 0.97×{}",
                        short_of(k / fl, 0.97),
                        by_repetition(
                            find(f, "2-rate", "rate_per_s", sys, n, "rr"),
                            find(f, "2-rate", "rate_per_s", "floor", n, "rr"),
                            "the floor's",
                            |r| r >= 0.97
                        )
                    ),
                ),
            ),
            None => nm(&mut row, &goal),
        }
    }
    // Goal 3: the host-stack bypass (the agent's `--bpf-host-routing`), against the floor.
    let goal = "10.3 ClusterIP new-connection p50 below the floor (host-stack bypass, `--bpf-host-routing`)";
    let bypass = c
        .scales
        .iter()
        .filter_map(|&n| {
            let n = n as u64;
            Some((lat(super::HOST_ROUTING, "p50_us", n)?, lat("floor", "p50_us", n)?, n))
        })
        .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    match bypass {
        Some((k, fl, n)) => {
            let routed = lat("kproxy", "p50_us", n)
                .map_or(String::new(), |kr| format!(", {} kproxy without it", times(k, kr)));
            row(
                goal,
                format!("p50 {k:.0} µs at {} services (the worst scale)", thousands(n)),
                format!("{} the floor ({fl:.0} µs){routed}", times(k, fl)),
                verdict(k < fl, format!("{:.2}×", k / fl)),
            )
        }
        None => nm(&mut row, goal),
    }
    // The same from the paired figures: host routing's service connections against the direct
    // ones that took turns with them (which the stack routes).
    let goal = "10.3 paired: … p50 below that of direct connections taking turns with them";
    let worst = worst_median(f, "1-latency", super::PAIRED_P50, super::HOST_ROUTING, &c.scales, "");
    match worst {
        Some((x, n)) => {
            let routed = lat("kproxy", super::PAIRED_P50, n)
                .map_or(String::new(), |k| format!(", kproxy without it {k:.2}×"));
            row(
                goal,
                format!("{x:.2}× at {} services (the worst scale)", thousands(n)),
                format!("direct connections routed by the stack in the same generator{routed}"),
                verdict(x < 1.0, format!("{x:.2}×")),
            )
        }
        None => nm(&mut row, goal),
    }
    // Goal 4: NodePort packet rate with the live-frame generator.
    let live = |sys: &str, v: &str| median(f, "3-nodeport", "live_pps", sys, 3, v);
    let tx = live("xdp-tx", "bounce");
    let (xdp, ipt) = (live("kproxy", "remote"), live("iptables", "remote"));
    let (xdp_l, ipt_l) = (live("kproxy", "local"), live("iptables", "local"));
    let local_note = |den: Option<f64>| {
        xdp_l.zip(den).map_or(String::new(), |(k, d)| format!(" (local backend {})", times(k, d)))
    };
    let rates = |x: f64| {
        format!(
            "{:.0}k frames/s to a remote backend{}",
            x / 1e3,
            xdp_l.map_or(String::new(), |l| format!(", {:.0}k local", l / 1e3))
        )
    };
    let goal = "10.4 XDP NodePort to a remote backend ≥ 3× iptables' packets per second (live-frame generator)";
    match (xdp, ipt) {
        (Some(x), Some(i)) => row(
            goal,
            rates(x),
            format!("{} iptables{}", times(x, i), local_note(ipt_l)),
            verdict(x / i >= 3.0, format!("{:.2}× instead of 3×", x / i)),
        ),
        _ => nm(&mut row, goal),
    }
    let goal = "10.4 … and ≥ ½ of a bounce-only XDP_TX program";
    match (xdp, tx) {
        (Some(x), Some(t)) => row(
            goal,
            rates(x),
            format!("{} the bounce{}", times(x, t), local_note(tx)),
            verdict(x / t >= 0.5, format!("{:.2}× instead of 0.5×", x / t)),
        ),
        _ => nm(&mut row, goal),
    }
    // Goal 5: programming, against the rule loads of the same run.
    let against = |metric: &str, n: u64, k: f64| {
        let each: Vec<String> = [("iptables", "iptables-restore"), ("nftables", "nft -f")]
            .iter()
            .filter_map(|(sys, what)| {
                median(f, "4-programming", metric, sys, n, "")
                    .map(|b| format!("{} {what}", times(k, b)))
            })
            .collect();
        if each.is_empty() { "—".to_string() } else { each.join(", ") }
    };
    for (n, limit) in [(10_000u64, 0.5), (30_000, 1.5)] {
        let goal =
            format!("10.5 {} services × 10 endpoints from scratch < {limit} s", thousands(n));
        match median(f, "4-programming", "scratch_s", "kproxy", n, "") {
            Some(t) => row(
                &goal,
                format!("{t:.3} s"),
                against("scratch_s", n, t),
                verdict(t < limit, format!("by {:.3} s", t - limit)),
            ),
            None => nm(&mut row, &goal),
        }
    }
    let goal = "10.5 one change at 10,000 services < 1 ms";
    match median(f, "4-programming", "change_ms", "kproxy", 10_000, "") {
        Some(ch) => row(
            goal,
            format!("{ch:.2} ms"),
            against("change_ms", 10_000, ch),
            verdict(ch < 1.0, format!("by {:.2} ms", ch - 1.0)),
        ),
        None => nm(&mut row, goal),
    }
    // Goal 6: memory, against the kernel memory of the rule sets at the same scale.
    for (n, limit) in [(10_000u64, 32.0), (30_000, 64.0)] {
        let goal = format!(
            "10.6 agent RSS ≤ {limit:.0} MiB at {} services / {} endpoints",
            thousands(n),
            thousands(n * 10)
        );
        match median(f, "6-memory", "agent_rss_bytes", "kproxy", n, "") {
            Some(b) => {
                let mib = b / (1024.0 * 1024.0);
                let base: Vec<String> = ["iptables", "nftables"]
                    .iter()
                    .filter_map(|sys| {
                        median(f, "6-memory", "rules_bytes", sys, n, "")
                            .map(|m| format!("{} {sys}' rule memory", times(b, m)))
                    })
                    .collect();
                row(
                    &goal,
                    format!("{mib:.1} MiB"),
                    if base.is_empty() { "—".into() } else { base.join(", ") },
                    verdict(mib <= limit, format!("by {:.1} MiB", mib - limit)),
                )
            }
            None => nm(&mut row, &goal),
        }
    }
    let maps = c
        .prog_scales
        .iter()
        .find_map(|&n| median(f, "6-memory", "bpf_map_bytes", "kproxy", n as u64, ""));
    let goal = "10.6 BPF map memory reported per map and sized from the node's memory (not a fixed 265 MiB)";
    match maps {
        Some(b) => row(
            goal,
            format!(
                "{:.0} MiB for {:.0} GiB of RAM (`kproxy map list`, `kproxy_map_memory_bytes`)",
                b / (1024.0 * 1024.0),
                r.machine.memory_bytes as f64 / (1u64 << 30) as f64
            ),
            format!(
                "{:.2}% of the node's memory",
                100.0 * b / (r.machine.memory_bytes.max(1) as f64)
            ),
            verdict(b < 265.0 * 1024.0 * 1024.0, "not below the fixed sizes".into()),
        ),
        None => nm(&mut row, goal),
    }
    // Goal 7: the comparison itself.
    let goal = "10.7 figures worse than the previous run by more than the noise are listed";
    match (&r.regressions, &r.compared_with) {
        (Some(list), Some(with)) => row(
            goal,
            format!("{} against the run of {with} (below)", list.len()),
            "—".into(),
            "met".into(),
        ),
        _ => row(goal, "no comparable previous run".into(), "—".into(), "—".into()),
    }
    // Issue 12: change → first successful connection at 10,000 services, against the
    // baselines' change → first connection in the same run.
    for (goal, system, limit) in [
        (
            "12 change → first connection at 10,000 services p99 < 20 ms, Kubernetes source",
            "kproxy-kube",
            20.0,
        ),
        (
            "12 change → first connection at 10,000 services p99 < 50 ms, manifest source",
            "kproxy",
            50.0,
        ),
    ] {
        let p99 = |sys: &str, v: &str| median(f, "5-e2e", "p99_ms", sys, 10_000, v);
        match (p99(system, "at-rest"), p99(system, "churn")) {
            (Some(a), Some(ch)) => {
                let base: Vec<String> = ["iptables", "nftables"]
                    .iter()
                    .filter_map(|sys| {
                        let (ba, bc) = (p99(sys, "at-rest")?, p99(sys, "churn"));
                        Some(format!(
                            "{} {sys} at rest{}",
                            times(a, ba),
                            bc.map_or(String::new(), |bc| format!(
                                ", {} under churn",
                                times(ch, bc)
                            ))
                        ))
                    })
                    .collect();
                row(
                    goal,
                    format!("p99 {a:.1} ms at rest, {ch:.1} ms under churn"),
                    if base.is_empty() { "—".into() } else { base.join("; ") },
                    verdict(a.max(ch) < limit, format!("by {:.1} ms", a.max(ch) - limit)),
                )
            }
            _ => nm(&mut row, goal),
        }
    }
    // Issue 13: the entry programs' net ns per run over IPv6 (their IPv6 tail calls included)
    // against the same programs over IPv4 in the same dual-stack lab and window shape, both
    // flows paced to one rate (runs of older runs without paced windows: at full speed); the
    // worst ratio counts. The full-speed ratios are listed beside.
    let goal = "13 IPv6 per-packet cost within 15% of IPv4's";
    let net = |m: &str, w: &str| median(f, "8-bpf-stats", &super::net_metric(m), "kproxy", 1, w);
    let ratios = |pairs: &[(&str, &str)]| -> Vec<(f64, String)> {
        let mut got = Vec::new();
        for &(w6, w4) in pairs {
            let remote = w6.contains("remote");
            // Replies from a remote backend: both families translate them in XDP
            // (`kp_xdp_ext`, in the ratio); `kp_tc_ext_xdp` then only passes what XDP marked
            // handled (listed apart, not in the ratio).
            let ms: &[&str] = if remote {
                &["from_pod_ns", "to_pod_ns", "xdp_ext_ns"]
            } else {
                &["from_pod_ns", "to_pod_ns"]
            };
            for &m in ms {
                if let (Some(a), Some(b)) = (net(m, w6), net(m, w4))
                    && b > 0.0
                {
                    let prog = super::BPF_STATS_FIGURES
                        .iter()
                        .find(|x| x.0 == m && x.2 == w6)
                        .map_or(m, |x| x.1);
                    let shape = if m == "xdp_ext_ns" {
                        "remote replies"
                    } else if remote {
                        "remote"
                    } else {
                        "local"
                    };
                    got.push((a / b, format!("`{prog}` {shape} {a:.0} vs {b:.0} ns")));
                }
            }
        }
        got
    };
    let paced = ratios(&super::BPF_STATS6_PACED_PAIRS);
    let full = ratios(&super::BPF_STATS6_PAIRS);
    let (got, others, how, pairs) = if paced.is_empty() {
        (full, Vec::new(), "at full speed", super::BPF_STATS6_PAIRS)
    } else {
        (paced, full, "both flows paced to one rate", super::BPF_STATS6_PACED_PAIRS)
    };
    let ext: Vec<String> = pairs
        .iter()
        .filter(|(w6, _)| w6.contains("remote"))
        .filter_map(|&(w6, w4)| {
            let (a, b) = (net("tc_ext_ns", w6)?, net("tc_ext_ns", w4)?);
            Some(format!("`kp_tc_ext_xdp` {a:.0} vs {b:.0} ns"))
        })
        .collect();
    let list =
        |v: &[(f64, String)]| v.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(", ");
    let nums = |v: &[(f64, String)]| {
        v.iter().map(|(r, _)| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
    };
    match got.iter().map(|g| g.0).max_by(f64::total_cmp) {
        Some(worst) => row(
            goal,
            format!(
                "IPv6 vs IPv4 net, {how}: {}{}",
                list(&got),
                if ext.is_empty() {
                    String::new()
                } else {
                    format!("; after XDP (not in the ratio): {}", ext.join(", "))
                }
            ),
            format!(
                "IPv6/IPv4 (net, same dual-stack lab, {how}): {}{}",
                nums(&got),
                if others.is_empty() {
                    String::new()
                } else {
                    format!("; each at its full speed (not in the verdict): {}", nums(&others))
                }
            ),
            verdict(worst <= 1.15, format!("worst {worst:.2}×")),
        ),
        None => nm(&mut row, goal),
    }
    for g in &mut rows {
        if g.measured.starts_with(NOT_MEASURED) || g.verdict == "—" {
            continue;
        }
        if let Some(p) = goal_pressure(r, &g.goal) {
            g.verdict.push_str(&format!(
                " (noisy: CPU pressure {p:.0}% while measured, compare ratios only)"
            ));
        }
    }
    rows
}

/// The CPU pressure of the steps that measured `goal`, when above
/// [`super::NOISY_PRESSURE`]: per-packet costs, latency tails and rates move far more with
/// competing work than with code changes of a few percent.
fn goal_pressure(r: &Results, goal: &str) -> Option<f64> {
    let step: fn(&str) -> bool = match goal.split(' ').next()? {
        "10.1" => |s| s.starts_with("8: per-program cost (bpf_stats)"),
        "13" => |s| s.starts_with("8: per-program cost over IPv6"),
        "10.2" | "10.3" => |s| s.starts_with("1-2: ") && s.contains("repetitions"),
        "10.4" => |s| s.starts_with("3: "),
        "10.5" | "10.6" => |s| s.starts_with("4-6: kproxy at"),
        "12" => |s| s.starts_with("5: "),
        _ => return None,
    };
    r.steps
        .iter()
        .filter(|st| step(&st.step))
        .filter_map(|st| st.cpu_pressure)
        .max_by(f64::total_cmp)
        .filter(|&p| p > super::NOISY_PRESSURE)
}

fn goals_table(r: &Results) -> String {
    let mut s = String::from(
        "## Goals\n\n| Goal | Measured | Against a baseline of this run | Verdict |\n|---|---|---|---|\n",
    );
    for g in goals(r) {
        let _ = writeln!(s, "| {} | {} | {} | {} |", g.goal, g.measured, g.baseline, g.verdict);
    }
    s.push('\n');
    s
}

fn regressions_section(r: &Results) -> String {
    let mut s = String::from("## Against the previous run\n\n");
    match (&r.regressions, &r.compared_with) {
        (Some(list), Some(with)) if list.is_empty() => {
            let _ = writeln!(
                s,
                "No figure is worse than in the run of {with} by more than its noise.\n"
            );
        }
        (Some(list), Some(with)) => {
            let _ = writeln!(
                s,
                "Figures worse than in the run of {with} by more than their noise (the spread of their samples in either run, at least {:.0}%):\n\n| Figure | Before | Now | Worse by | Noise |\n|---|---|---|---|---|",
                super::compare::MIN_NOISE * 100.0
            );
            for g in list {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0}% | {:.0}% |",
                    g.figure,
                    fmt_num(g.before, &g.unit),
                    fmt_num(g.now, &g.unit),
                    g.worse_by * 100.0,
                    g.noise * 100.0
                );
            }
            s.push('\n');
        }
        _ => s.push_str(
            "Not compared: no previous run of the same kind (`bench/results/latest`).\n\n",
        ),
    }
    s
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let f = &r.figures;
    let c = &r.config;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# kproxy vs kube-proxy-equivalent rule sets — {}\n", r.started);
    let _ = writeln!(
        s,
        "Machine: {} cores ({}), kernel {}, {:.0} GiB RAM; {}; {}. Run took {:.0} s{}.\n",
        m.cores,
        m.cpu,
        m.kernel,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.iptables,
        m.nft,
        r.wall_s,
        if c.quick {
            " (`--quick`: tiny scales, 1 repetition — a smoke test, not a measurement)"
        } else {
            ""
        }
    );
    if !m.source.is_empty() {
        let dirty = if m.source_dirty {
            " (`-dirty`: the worktree had uncommitted changes, and the build measured them)"
        } else {
            ""
        };
        let _ = writeln!(s, "Measured: {}{dirty}.\n", m.source);
    }
    let worst = r
        .steps
        .iter()
        .filter_map(|st| st.cpu_pressure.map(|p| (p, &st.step)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((p, step)) = worst
        && p > super::NOISY_PRESSURE
    {
        let _ = writeln!(
            s,
            "**Noisy machine:** other processes competed for the CPUs during this run (CPU pressure up to {p:.0}% in step \"{step}\", see \"Run time by step\"); rates, CPU times and tails are less reliable than on a quiet machine.\n"
        );
    }
    s.push_str(
        "Method: one lab (network namespaces: 2 nodes, routed pods, an external client); every \
system is loaded into node 0 and switched on only while it is measured; repetitions alternate the \
order of the systems (A/B/C/D, then B/C/D/A, …). Cells are `median (min–max)` over the repetitions. \
**Baselines are kube-proxy-equivalent rule sets** generated by `tests/src/baseline.rs` (the \
kube-proxy binary cannot be installed here) and loaded the way kube-proxy loads them: \
\"iptables\" is `iptables-legacy-restore` (the legacy backend: on this kernel it is ~8× faster \
to load than the nft-backed `iptables-restore`, so the comparison is conservative; above 1,000 \
endpoints the per-endpoint rules carry no comments, as kube-proxy's large-cluster mode writes them), \
\"nftables\" is `nft -f` (single-endpoint services get a plain `goto` instead of a `numgen` map, as \
kube-proxy writes them since kubernetes#140723; tables are loaded in transactions of at most 1,000 \
services, as proposed upstream for cold starts in kubernetes#139328, because one transaction with \
thousands of anonymous verdict maps is quadratic in the kernel: 3,000 × 10 took 26 s and stalled a \
CPU for 22 s here). \"floor\" is the client connecting straight to the pod address. Filler services have \
1 endpoint in items 1–2 and 10 endpoints in items 4–6; the probed services are last in rule order.\n\n",
    );
    let _ = writeln!(
        s,
        "Repetitions: {} below 10,000 services, {} at 10,000 and above; load generator runs of {} ms; \
NodePort runs of {} ms.\n",
        c.reps, c.reps_large, c.duration_ms, c.np_duration_ms
    );

    s.push_str(&goals_table(r));
    s.push_str(&regressions_section(r));
    let ipt = median(f, "3-nodeport", "udp_pps", "iptables", 3, "remote");
    let tx = median(f, "3-nodeport", "udp_pps", "xdp-tx", 3, "bounce");

    // Item 1.
    s.push_str(
        "## 1. ClusterIP new-connection latency (connect, one request, close; one client)\n\n",
    );
    s.push_str("| Services | floor p50 | kproxy p50 | kproxy, host routing p50 | iptables p50 | nftables p50 | floor p99 | kproxy p99 | kproxy, host routing p99 | iptables p99 | nftables p99 | kproxy/floor p50 | host routing/floor p50 | kproxy/nftables p99 | host routing/nftables p99 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let hr = super::HOST_ROUTING;
    for &n in &c.scales {
        let n = n as u64;
        let g = |sys: &str, p: &str| cell(find(f, "1-latency", p, sys, n, ""));
        let md = |sys: &str, p: &str| median(f, "1-latency", p, sys, n, "");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(n),
            g("floor", "p50_us"),
            g("kproxy", "p50_us"),
            g(hr, "p50_us"),
            g("iptables", "p50_us"),
            g("nftables", "p50_us"),
            g("floor", "p99_us"),
            g("kproxy", "p99_us"),
            g(hr, "p99_us"),
            g("iptables", "p99_us"),
            g("nftables", "p99_us"),
            ratio(md("kproxy", "p50_us"), md("floor", "p50_us")),
            ratio(md(hr, "p50_us"), md("floor", "p50_us")),
            ratio(md("kproxy", "p99_us"), md("nftables", "p99_us")),
            ratio(md(hr, "p99_us"), md("nftables", "p99_us")),
        );
    }
    let _ = writeln!(
        s,
        "\n\"kproxy, host routing\" is the agent with `--bpf-host-routing`: its TC programs deliver translated packets themselves (to a local pod with `bpf_redirect_peer`, elsewhere through the FIB), past the node's IP stack and netfilter."
    );
    // The systems with paired figures, the floor first (the control: its two addresses are
    // one path); `--only-latency`'s variants where the run has them.
    let has = |sys: &str| f.iter().any(|x| x.metric == super::PAIRED_P50 && x.system == sys);
    let paired: Vec<(&str, &str)> = [
        ("floor", "floor (control)"),
        ("kproxy", "kproxy"),
        (hr, "kproxy, host routing"),
        (super::SOCKET_LB, "kproxy, socket LB"),
        ("kproxy-generic", "kproxy, generic XDP"),
        (super::KPROXY_CLSACT, "kproxy, clsact"),
        ("iptables", "iptables"),
        ("nftables", "nftables"),
    ]
    .into_iter()
    .filter(|(sys, _)| has(sys))
    .collect();
    if !paired.is_empty() {
        let head: Vec<&str> = paired.iter().map(|(_, label)| *label).collect();
        let table_head =
            format!("| Services | {} |\n|---|{}", head.join(" | "), "---|".repeat(head.len()));
        let rows = |item: &str, v: &str, scales: &[usize]| -> String {
            scales
                .iter()
                .map(|&n| {
                    let cells: Vec<String> = paired
                        .iter()
                        .map(|(sys, _)| cell(find(f, item, super::PAIRED_P50, sys, n as u64, v)))
                        .collect();
                    format!("| {} | {} |\n", thousands(n as u64), cells.join(" | "))
                })
                .collect()
        };
        let _ = write!(
            s,
            "\nPaired with direct connections: each system's service connections (the floor's: its connections to the endpoint's usual port) took turns, one by one in the same load generator, with direct connections to the endpoint on a second port of the same server pod, through the same loaded system; each cell is the p50 of the first over the second's (median of the repetitions, min–max): what the system adds to a connection, without the machine's drift between the systems' runs that the ratios above carry. The floor's is the control: its two addresses are one path. (A system's hooks' cost on traffic that is not a service's, which the direct connections pay too, is item 8's.)\n\n{table_head}\n{}",
            rows("1-latency", "", &c.scales)
        );
        let rr_measured = c.rate_scales.iter().any(|&n| {
            paired
                .iter()
                .any(|(sys, _)| find(f, "2-rate", super::PAIRED_P50, sys, n as u64, "rr").is_some())
        });
        if rr_measured {
            let _ = write!(
                s,
                "\nRequest/response on open connections, paired the same way ({}; the p50 of the first's transactions over the second's):\n\n{table_head}\n{}",
                if c.rr_paired_pinned {
                    "one client, pinned with the pod servers as the latency loads are, keeps a connection to each address and takes turns between them"
                } else {
                    "each of the rate run's clients keeps a connection to each address and takes turns between them"
                },
                rows("2-rate", "rr", &c.rate_scales)
            );
        }
    }
    let sl = super::SOCKET_LB;
    if c.scales.iter().any(|&n| find(f, "1-latency", "p50_us", sl, n as u64, "").is_some()) {
        s.push_str("\nThe socket LB for pods (`--cgroup-path` on the client pod's cgroup, `--socket-lb-pods`; opt-in): the client's `connect()` to the ClusterIP is sent to the backend by the cgroup `connect4` program, so the connection's packets cross the pod programs untranslated.\n\n| Services | kproxy, socket LB p50 | kproxy, socket LB p99 | socket LB/floor p50 | socket LB/kproxy p50 | socket LB/nftables p99 |\n|---|---|---|---|---|---|\n");
        for &n in &c.scales {
            let n = n as u64;
            let md = |sys: &str, p: &str| median(f, "1-latency", p, sys, n, "");
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                thousands(n),
                cell(find(f, "1-latency", "p50_us", sl, n, "")),
                cell(find(f, "1-latency", "p99_us", sl, n, "")),
                ratio(md(sl, "p50_us"), md("floor", "p50_us")),
                ratio(md(sl, "p50_us"), md("kproxy", "p50_us")),
                ratio(md(sl, "p99_us"), md("nftables", "p99_us")),
            );
        }
    }
    // `--only-latency` also runs kproxy with generic XDP on the node's veth `eth0` and with its TC
    // programs as clsact filters.
    let variants = [
        (
            "kproxy-generic",
            "generic XDP on the node's `eth0` (`--xdp-mode generic`; its default leaves XDP off veth devices)",
        ),
        (
            super::KPROXY_CLSACT,
            "its TC programs as netlink filters of a clsact qdisc (`--tc-attach netlink`; its default on Linux 6.6+ is tcx links)",
        ),
    ];
    for (sys, what) in variants {
        for &n in &c.scales {
            let n = n as u64;
            let md = |sys: &str| median(f, "1-latency", "p50_us", sys, n, "");
            if let (Some(p50), Some(_)) = (md(sys), md("kproxy")) {
                let _ = writeln!(
                    s,
                    "\nAt {} services, kproxy with {what}: p50 {} ({} kproxy's, {} the floor's).",
                    thousands(n),
                    cell(find(f, "1-latency", "p50_us", sys, n, "")),
                    ratio(Some(p50), md("kproxy")),
                    ratio(Some(p50), md("floor")),
                );
            }
        }
    }
    // `--only-latency` also runs the floor's traffic across empty TC programs on kproxy's hooks,
    // attached with tcx links and as kproxy attaches its own (clsact filters).
    let (tcx, cl) = (super::FLOOR_TC_HOOKS, super::FLOOR_CLSACT_HOOKS);
    for &n in &c.scales {
        let n = n as u64;
        let md = |sys: &str| median(f, "1-latency", "p50_us", sys, n, "");
        let (Some(floor), kp) = (md("floor"), md("kproxy")) else { continue };
        if let Some(h) = md(tcx) {
            let _ = writeln!(
                s,
                "\nAt {} services, the floor's connections across an empty TC program on each hook of kproxy's TC programs (tcx, `TCX_NEXT`: node 0's pod veths, ingress and egress, and its `eth0` ingress): p50 {} ({} the floor's; kproxy's p50 is {} it, {} over it). What hooking alone costs, which no change inside kproxy's programs can save.",
                thousands(n),
                cell(find(f, "1-latency", "p50_us", tcx, n, "")),
                ratio(Some(h), Some(floor)),
                ratio(kp, Some(h)),
                kp.map_or("—".to_string(), |k| format!("{:+.1} µs", k - h)),
            );
        }
        if let Some(h) = md(cl) {
            let _ = writeln!(
                s,
                "\nAt {} services, the same empty programs attached as kproxy attaches its own (netlink filters of a clsact qdisc, `da`): p50 {} ({} the floor's, {} the tcx hooks'; kproxy's p50 is {} it).",
                thousands(n),
                cell(find(f, "1-latency", "p50_us", cl, n, "")),
                ratio(Some(h), Some(floor)),
                ratio(Some(h), md(tcx)),
                ratio(kp, Some(h)),
            );
        }
    }
    latency_conn_stats(&mut s, f, c);
    s.push_str("\n![latency](latency_vs_services.png)\n\n");

    let samples: Vec<f64> = f
        .iter()
        .filter(|x| x.item == "1-latency" && x.metric == "samples" && x.variant.is_empty())
        .flat_map(|x| x.samples.iter().copied())
        .collect();
    if let (Some(lo), Some(hi)) =
        (samples.iter().copied().reduce(f64::min), samples.iter().copied().reduce(f64::max))
    {
        let pinned = match c.latency_cpu {
            Some(cpu) => format!(
                ", both pinned to CPU {cpu} (a transaction is then the CPU work of client, stack, datapath and server; unpinned, the two wake each other across CPUs, which on this VM added ~90 µs to every system's p50 and diluted the datapaths' differences)"
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "Each cell's samples: one load generator run per repetition of {} ms, {:.0}–{:.0} connections each (p99 is taken per run, the cell is the median over runs). The load generator and the pod servers run with SCHED_FIFO priority {} so that other work on the machine does not delay their wake-ups{pinned}, and the client's namespace reuses TIME_WAIT ports (`net.ipv4.tcp_tw_reuse=1`; without it connect() slowed down to several ms as TIME_WAIT sockets filled the port range); the floor's min–max is the lab's own noise.\n",
            c.duration_ms,
            lo,
            hi,
            super::systems::RT_PRIORITY
        );
    }

    s.push_str(&ipv6_latency_section(r));

    // Item 2.
    s.push_str("## 2. Rates (4 clients) and kernel CPU time per transaction (system + irq + softirq of the whole machine; user time is left out, on this shared machine it is mostly other processes')\n\n");
    s.push_str("| Services | Pattern | System | Rate (1/s) | Kernel CPU µs / transaction | Rate vs iptables | Rate vs floor |\n|---|---|---|---|---|---|---|\n");
    for &n in &c.rate_scales {
        for v in ["connect", "rr"] {
            for sys in
                ["floor", "kproxy", super::HOST_ROUTING, super::SOCKET_LB, "iptables", "nftables"]
            {
                let _ = writeln!(
                    s,
                    "| {} | {} | {sys} | {} | {} | {} | {} |",
                    thousands(n as u64),
                    if v == "rr" {
                        "request/response on open connections"
                    } else {
                        "new connection per request"
                    },
                    cell(find(f, "2-rate", "rate_per_s", sys, n as u64, v)),
                    cell(find(f, "2-rate", "cpu_us_per_txn", sys, n as u64, v)).replace(" µs", ""),
                    ratio(
                        median(f, "2-rate", "rate_per_s", sys, n as u64, v),
                        median(f, "2-rate", "rate_per_s", "iptables", n as u64, v)
                    ),
                    ratio(
                        median(f, "2-rate", "rate_per_s", sys, n as u64, v),
                        median(f, "2-rate", "rate_per_s", "floor", n as u64, v)
                    ),
                );
            }
        }
    }

    // Item 3.
    let _ = writeln!(
        s,
        "\n## 3. NodePort from the external client (18-byte UDP datagrams from {} sender threads with sendmmsg; iperf3 TCP)\n",
        super::measure::UDP_SENDERS
    );
    s.push_str("| System | UDP local (pkt/s) | UDP remote (pkt/s) | CPU ns/pkt local | CPU ns/pkt remote | TCP local | TCP remote | UDP remote vs iptables |\n|---|---|---|---|---|---|---|---|\n");
    for sys in super::NODEPORT_SYSTEMS {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            nodeport_label(sys),
            cell(find(f, "3-nodeport", "udp_pps", sys, 3, "local")),
            cell(find(f, "3-nodeport", "udp_pps", sys, 3, "remote")),
            cell(find(f, "3-nodeport", "udp_cpu_ns_per_pkt", sys, 3, "local")),
            cell(find(f, "3-nodeport", "udp_cpu_ns_per_pkt", sys, 3, "remote")),
            cell(find(f, "3-nodeport", "tcp_bps", sys, 3, "local")),
            cell(find(f, "3-nodeport", "tcp_bps", sys, 3, "remote")),
            ratio(median(f, "3-nodeport", "udp_pps", sys, 3, "remote"), ipt),
        );
    }
    let _ = writeln!(
        s,
        "| XDP_TX bounce (reference, nothing else attached) | {} | | | | | | {} |\n",
        cell(find(f, "3-nodeport", "udp_pps", "xdp-tx", 3, "bounce")),
        ratio(tx, ipt)
    );
    s.push_str("On veth the receiving side (XDP, TC, netfilter, the pod's UDP socket) runs in the softirq of the sending CPU, so the sender and the datapath share the 2 cores: the rates are bounded by the machine, and the CPU column (kernel time — system + irq + softirq — of the whole machine per datagram that reached the backend: the sender's syscalls, the datapath and the receiver) is the figure that shows what each datapath costs per packet. The bounce reference shows the rate bound.\n\n");
    let live_tx = median(f, "3-nodeport", "live_pps", "xdp-tx", 3, "bounce");
    let live_ipt = |v: &str| median(f, "3-nodeport", "live_pps", "iptables", 3, v);
    s.push_str("### NodePort with the live-frame generator (BPF_PROG_TEST_RUN, `BPF_F_TEST_XDP_LIVE_FRAMES`)\n\n| System | Local (frames/s of one CPU) | Remote (frames/s of one CPU) | Kernel ns per frame, local | remote | Delivered, local | remote | Local vs iptables | Remote vs iptables | Local vs bounce | Remote vs bounce |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for sys in super::NODEPORT_SYSTEMS {
        let g = |m: &str, v: &str| cell(find(f, "3-nodeport", m, sys, 3, v));
        let pps = |v: &str| median(f, "3-nodeport", "live_pps", sys, 3, v);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            nodeport_label(sys),
            g("live_pps", "local"),
            g("live_pps", "remote"),
            g("live_ns_per_frame", "local"),
            g("live_ns_per_frame", "remote"),
            g("live_delivered", "local"),
            g("live_delivered", "remote"),
            ratio(pps("local"), live_ipt("local")),
            ratio(pps("remote"), live_ipt("remote")),
            ratio(pps("local"), live_tx),
            ratio(pps("remote"), live_tx),
        );
    }
    for (sys, v, label) in [
        ("xdp-tx", "bounce", "XDP_TX bounce on node 0's `eth0` (reference)"),
        ("generator", "alone", "the generator alone (its frames dropped by XDP on `eth0`)"),
    ] {
        let _ = writeln!(
            s,
            "| {label} | | {} | | {} | | {} | | {} | | {} |",
            cell(find(f, "3-nodeport", "live_pps", sys, 3, v)),
            cell(find(f, "3-nodeport", "live_ns_per_frame", sys, 3, v)),
            cell(find(f, "3-nodeport", "live_delivered", sys, 3, v)),
            ratio(median(f, "3-nodeport", "live_pps", sys, 3, v), live_ipt("remote")),
            ratio(median(f, "3-nodeport", "live_pps", sys, 3, v), live_tx),
        );
    }
    s.push_str("\nThe generator is an XDP program that the kernel runs in a loop (live-frame mode, batches of 64) in the underlay namespace as if each frame had arrived on the port facing node 0; it writes one UDP datagram from the external client to the NodePort and returns `XDP_TX`, which sends it into node 0's `eth0` (veth `ndo_xdp_xmit`: no socket, no skb, no bridge). What comes out is counted where it leaves node 0, translated: an XDP sink on the underlay port (remote backend) or on the pod's `eth0` (local backend) drops and counts only frames addressed to the backend and its target port (*delivered* is their share of the frames generated). Everything runs in the softirq of the generator's CPU, so a rate is frames counted at the sink per second of that CPU's kernel time: the generator loop's own timing (`BPF_PROG_TEST_RUN`'s duration, which includes the datapath's softirq work and stops while the thread is scheduled out, so the other work on this shared machine stays out of it; *kernel ns per frame* is the same time per generated frame). The generator alone (its frames dropped as they arrive on `eth0`) bounds every rate. GRO is switched on for node 0's `eth0` during these runs (a veth takes `ndo_xdp_xmit` frames only with NAPI, which an XDP program or GRO switches on). \"kproxy (native XDP)\" is the agent with `--xdp-mode native`, \"generic XDP\" with `--xdp-mode generic` (an skb is built before XDP runs), \"TC only\" with `--no-xdp`, which is also what its default (`--xdp-mode auto`) does on a veth device.\n\n");

    // Item 4.
    s.push_str("## 4. Programming time (N services × 10 endpoints)\n\n");
    s.push_str("| Services | System | From scratch | CPU | One change | CPU of the change |\n|---|---|---|---|---|---|\n");
    // An earlier agent measured in the same run (`--kproxy-before`), right above the current one.
    let before: &[&str] = if c.kproxy_before.is_some() { &[super::KPROXY_BEFORE] } else { &[] };
    for &n in &c.prog_scales {
        for &sys in before.iter().chain(&["kproxy", "iptables", "nftables"]) {
            let _ = writeln!(
                s,
                "| {} | {sys} | {} | {} | {} | {} |",
                thousands(n as u64),
                cell(find(f, "4-programming", "scratch_s", sys, n as u64, "")),
                cell(find(f, "4-programming", "scratch_cpu_s", sys, n as u64, "")),
                cell(find(f, "4-programming", "change_ms", sys, n as u64, "")),
                cell(find(f, "4-programming", "change_cpu_ms", sys, n as u64, "")),
            );
        }
    }
    s.push_str("\nkproxy \"from scratch\" is the agent's own sync time (model + diff + map writes, `kubeproxy_sync_proxy_rules_duration_seconds`); its CPU column is the agent's whole CPU time until programmed (also loading the BPF object and parsing the JSON manifests). A change is one new Service with 10 endpoints; for kproxy it is the sync duration, for iptables the partial `iptables-restore --noflush` kube-proxy would run (whole `KUBE-SERVICES` chain plus the new service's chains), for nftables the `nft -f` transaction adding the service's chains and map elements. kproxy's change CPU is the agent's CPU time (10 ms tick granularity) across the change, manifest polling (a stat per file) included.\n\n![programming](programming_time.png)\n\n");

    // Item 5.
    s.push_str(&e2e_section(r));

    // Item 6.
    s.push_str("## 6. Memory (N services × 10 endpoints)\n\n| Services | kproxy agent RSS | kproxy BPF maps | iptables rules | nftables rules |\n|---|---|---|---|---|\n");
    for &n in &c.prog_scales {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            thousands(n as u64),
            cell(find(f, "6-memory", "agent_rss_bytes", "kproxy", n as u64, "")),
            cell(find(f, "6-memory", "bpf_map_bytes", "kproxy", n as u64, "")),
            cell(find(f, "6-memory", "rules_bytes", "iptables", n as u64, "")),
            cell(find(f, "6-memory", "rules_bytes", "nftables", n as u64, "")),
        );
    }
    if c.kproxy_before.is_some() {
        s.push_str("\n| Services | kproxy-before agent RSS | kproxy agent RSS | after/before |\n|---|---|---|---|\n");
        for &n in &c.prog_scales {
            let (b, a) = (
                median(f, "6-memory", "agent_rss_bytes", super::KPROXY_BEFORE, n as u64, ""),
                median(f, "6-memory", "agent_rss_bytes", "kproxy", n as u64, ""),
            );
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                thousands(n as u64),
                cell(find(f, "6-memory", "agent_rss_bytes", super::KPROXY_BEFORE, n as u64, "")),
                cell(find(f, "6-memory", "agent_rss_bytes", "kproxy", n as u64, "")),
                ratio(a, b),
            );
        }
    }
    s.push_str("\nRule memory is what the cgroup v1 memory controller charged to the loading process's cgroup (kernel memory included) after the load exited. BPF map memory is the `memlock` of the agent's maps (preallocated at their configured capacity, so it does not grow with N). The agent RSS includes its manifest source (which keeps compact objects, not the files' JSON) and the loaded BPF object.\n\n");

    // Per-program cost under real traffic.
    s.push_str("## 8. Per-program cost under real traffic (kernel bpf_stats: run_time_ns / run_cnt)\n\n| Traffic | flow | Program | runs per s | ns per run | empty XDP program, same window | empty TC program before it, same hook (first of two) | net |\n|---|---|---|---|---|---|---|---|\n");
    let windows = super::BPF_STATS_WINDOWS.iter().chain(&super::BPF_STATS_HR_WINDOWS);
    for &(w, traffic) in windows.chain(&super::BPF_STATS6_WINDOWS) {
        let empty = cell(find(f, "8-bpf-stats", super::BPF_STATS_EMPTY, "kproxy", 1, w));
        let flow = median(f, "8-bpf-stats", super::FLOW_BPS, "kproxy", 1, w)
            .map_or("—".to_string(), |b| format!("{:.2} Gbit/s", b / 1e9));
        for (m, prog, _) in super::BPF_STATS_FIGURES.iter().filter(|x| x.2 == w) {
            let c = |metric: &str| match find(f, "8-bpf-stats", metric, "kproxy", 1, w) {
                Some(x) if x.status == Status::Skipped => "not run".to_string(),
                other => cell(other),
            };
            let runs = median(f, "8-bpf-stats", &super::runs_metric(m), "kproxy", 1, w)
                .map_or("—".to_string(), |r| thousands(r.round() as u64));
            let tc = super::empty_tc_of(m)
                .map_or("—".to_string(), |h| format!("{} ({})", c(h.floor.0), c(h.first.0)));
            let _ = writeln!(
                s,
                "| {traffic} | {flow} | `{prog}` | {runs} | {} | {empty} | {tc} | {} |",
                c(m),
                c(&super::net_metric(m))
            );
        }
    }
    let _ = writeln!(
        s,
        "\nkproxy on node 0 (native XDP on `eth0`) serving the probe services; statistics switched on (`BPF_ENABLE_STATS`) only for these windows of {} ms each, {} repetition(s), the windows in rotating order. Each window is one TCP flow, at full speed unless *paced*; *flow* is its throughput (median) and *runs per s* how often the program ran: a program on a flow's data packets runs hundreds of thousands of times a second with warm caches, one on its ACKs (a remote backend's replies in `kp_xdp_ext`) ten to twenty times less often, each run paying colder caches, so its ns per run moves with the packet rate as much as with its code. The *paced* windows send both families at one rate ({:.0}% of the slowest of the four full-speed dual-stack flows, measured just before) so that goal 13 compares the programs at one packet rate. The kernel's timing of each run (two clock reads) and the cold start of a program that runs a few thousand times a second are part of every figure: *net* is a program's figure minus its floor in the same window (the goals use it). The floor of the TC programs (`kp_tc_from_pod` and `kp_tc_to_pod` on the pods' veths, `kp_tc_ext_xdp` on the ingress of node 0's `eth0`) is an empty TC program chained just before them on the same hook of the same devices (tcx, returning `TCX_NEXT`; the second of two, so that it too runs after another program, as kproxy's does; the first one's figure is in brackets), so it runs on exactly their packets at their rate; the floor of `kp_xdp_ext` is the lab's empty XDP program (`{}`, on the pods' `eth0` and the underlay ports, the same traffic, at a high rate; XDP has no chaining). A program that ran fewer than {} times in a window reads \"not run\". The *dual-stack lab* windows run in a second lab of the same shape with IPv6 on (kproxy with `--enable-ipv6`, the probes as dual-stack services), each IPv6 window beside the same flow over the service's IPv4 ClusterIP: goal 13 compares the paced pairs (the full-speed ratios are listed beside). The TC entry programs run the IPv6 fast path themselves (the family is chosen first, by the ethertype), so their IPv6 figure is IPv6's own.\n",
        c.duration_ms,
        c.reps,
        super::PACE_SHARE * 100.0,
        crate::lab::xdp::XDP_PASS_NAME,
        super::bpfstats::MIN_RUNS
    );

    // Item 7.
    s.push_str("## 7. Per-packet cost under BPF_PROG_TEST_RUN (median ns per run, repeat = 1)\n\n");
    s.push_str("| Services | kp_tc_from_pod established | kp_tc_from_pod new (SYN) | kp_tc_to_pod remote reply | kp_tc_to_pod plain (backend port, no connection) | TC pass-through | kp_xdp_ext NodePort established | XDP pass-through | kp_tc_ext_xdp behind XDP (a packet XDP handled) | kp_tc_ext NodePort established (TC only) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for &n in &c.testrun_scales {
        let g = |m: &str| cell(find(f, "7-testrun", m, "kproxy", n as u64, ""));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(n as u64),
            g("tc_established_ns"),
            g("tc_new_ns"),
            g("to_pod_reply_ns"),
            g("to_pod_plain_ns"),
            g("tc_pass_ns"),
            g("xdp_established_ns"),
            g("xdp_pass_ns"),
            g("tc_ext_xdp_ns"),
            g("tc_ext_established_ns"),
        );
    }
    let _ = writeln!(
        s,
        "\nEach cell is the median of {} TEST_RUN calls with repeat = 1 (with repeat > 1 the kernel reruns the program on the buffer the first run already translated, which would measure a different path). The kernel's per-run time includes the same timer overhead for every program, pass-through included.\n\n![testrun](testrun_cost.png)\n",
        c.testrun_runs
    );
    s.push_str("IPv6 beside IPv4 (the same frames in each family, each IPv6 figure measured run by run in turn with its IPv4 twin, so that a change of the machine's speed weighs on both alike; *net* is the figure minus the pass-through program of its type, the ratio IPv6 / IPv4 of the net figures):\n\n| Services | Program, packet | IPv4 | IPv6 | IPv6 / IPv4 (net) |\n|---|---|---|---|---|\n");
    for &n in &c.testrun_scales {
        let fig = |m: &str| find(f, "7-testrun", m, "kproxy", n as u64, "");
        let val = |m: &str| fig(m).filter(|x| x.status == Status::Ok).and_then(|x| x.median);
        for (what, v4, v6, pass) in [
            (
                "`kp_tc_from_pod`, established ClusterIP flow",
                "tc_established_ns",
                "tc_established6_ns",
                "tc_pass_ns",
            ),
            (
                "`kp_tc_to_pod`, remote backend's reply",
                "to_pod_reply_ns",
                "to_pod_reply6_ns",
                "tc_pass_ns",
            ),
            (
                "`kp_xdp_ext`, remote NodePort backend's reply",
                "xdp_reply_ns",
                "xdp_reply6_ns",
                "xdp_pass_ns",
            ),
            (
                "`kp_xdp_ext`, remote ClusterIP backend's reply to a pod (passed untouched)",
                "xdp_cip_reply_ns",
                "xdp_cip_reply6_ns",
                "xdp_pass_ns",
            ),
        ] {
            let net = |m: &str| Some(val(m)? - val(pass)?);
            let _ = writeln!(
                s,
                "| {} | {what} | {} | {} | {} |",
                thousands(n as u64),
                cell(fig(v4)),
                cell(fig(v6)),
                ratio(net(v6), net(v4)),
            );
        }
    }
    s.push('\n');

    // Missing figures.
    let missing: Vec<&Figure> = f.iter().filter(|x| x.status != Status::Ok).collect();
    let partial: Vec<&Figure> =
        f.iter().filter(|x| x.status == Status::Ok && x.reason.is_some()).collect();
    s.push_str("## Missing figures\n\n");
    if missing.is_empty() && partial.is_empty() {
        s.push_str("None: every planned figure was measured.\n");
    }
    // One line per cause (several figures usually share one), plain text, bounded length.
    let mut causes: Vec<(String, Vec<String>)> = Vec::new();
    for x in missing.iter().chain(&partial) {
        let kind = match x.status {
            Status::Skipped => "not measured",
            Status::Failed => "failed",
            Status::Ok => "some repetitions failed",
        };
        let reason = x.reason.as_deref().unwrap_or("no reason");
        let reason = reason.strip_prefix("not measured: ").unwrap_or(reason);
        let why = format!("{kind}: {}", one_line(reason, 300));
        let what = format!(
            "{} `{}` {} at {}{}",
            x.item,
            x.metric,
            x.system,
            thousands(x.n),
            if x.variant.is_empty() { String::new() } else { format!(" ({})", x.variant) }
        );
        match causes.iter_mut().find(|(w, _)| *w == why) {
            Some((_, v)) => v.push(what),
            None => causes.push((why, vec![what])),
        }
    }
    for (why, what) in &causes {
        let list = if what.len() > 6 {
            format!("{} and {} more", what[..6].join(", "), what.len() - 6)
        } else {
            what.join(", ")
        };
        let _ = writeln!(s, "- {why} — {list}");
    }
    if !r.steps.is_empty() {
        s.push_str("\n## Run time by step\n\n| Step | Seconds | CPU pressure |\n|---|---|---|\n");
        for st in &r.steps {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} |",
                st.step,
                st.secs,
                st.cpu_pressure.map_or("n/a".into(), |p| format!("{p:.1}%"))
            );
        }
        let _ = writeln!(
            s,
            "\nCPU pressure: the share of the step's time during which some runnable task waited for a CPU (the `some` stall counter of /proc/pressure/cpu over the step). The bench's own load counts too (up to ~45% in the latency steps on a quiet machine); above {:.0}% other processes competed for the 2 cores during that step, its figures are noisier and the goals measured in it say so in their verdict.\n",
            super::NOISY_PRESSURE
        );
    }
    if !r.notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        let mut seen = std::collections::BTreeSet::new();
        for n in &r.notes {
            if seen.insert(n) {
                let _ = writeln!(s, "- {n}");
            }
        }
    }
    s
}

/// Item 1 over IPv6 (variant [`super::IPV6_VARIANT`]): its table, and kproxy's ratios beside
/// the IPv4 ones of the same run at the same scale.
fn ipv6_latency_section(r: &Results) -> String {
    let (f, c) = (&r.figures, &r.config);
    let v6 = super::IPV6_VARIANT;
    let mut s = String::new();
    if c.ipv6_scales.is_empty() {
        return s;
    }
    s.push_str("### 1 over IPv6: ClusterIP new-connection latency in a dual-stack lab\n\n");
    s.push_str("| Services | floor p50 | kproxy p50 | ip6tables p50 | nftables p50 | floor p99 | kproxy p99 | ip6tables p99 | nftables p99 | kproxy/floor p50 | kproxy/nftables p50 | kproxy/nftables p99 | IPv4: kproxy/floor p50 | IPv4: kproxy/nftables p99 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &n in &c.ipv6_scales {
        let n = n as u64;
        let g = |sys: &str, p: &str| cell(find(f, "1-latency", p, sys, n, v6));
        let md = |sys: &str, p: &str| median(f, "1-latency", p, sys, n, v6);
        let md4 = |sys: &str, p: &str| median(f, "1-latency", p, sys, n, "");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(n),
            g("floor", "p50_us"),
            g("kproxy", "p50_us"),
            g("iptables", "p50_us"),
            g("nftables", "p50_us"),
            g("floor", "p99_us"),
            g("kproxy", "p99_us"),
            g("iptables", "p99_us"),
            g("nftables", "p99_us"),
            ratio(md("kproxy", "p50_us"), md("floor", "p50_us")),
            ratio(md("kproxy", "p50_us"), md("nftables", "p50_us")),
            ratio(md("kproxy", "p99_us"), md("nftables", "p99_us")),
            ratio(md4("kproxy", "p50_us"), md4("floor", "p50_us")),
            ratio(md4("kproxy", "p99_us"), md4("nftables", "p99_us")),
        );
    }
    s.push_str("\nThe same measurement over IPv6, in a dual-stack lab of its own (same shape: 2 routed nodes, 2 pods each): N − 1 single-stack IPv6 filler services and the probe as a dual-stack service, the client connecting to the probe's IPv6 ClusterIP (the floor: to the backend pod's IPv6 address). kproxy runs with `--enable-ipv6`; the baselines are the rules of kube-proxy's IPv6 proxier (`ip6tables-legacy-restore` input with `[addr]:port` endpoints, and table `ip6 kube-proxy`), in figures of system `iptables` / `nftables`, variant `ipv6`. The IPv4 columns repeat item 1's ratios at the same scale (another lab of the same run; `—` where item 1 has no such scale), so the IPv6/IPv4 comparison is of ratios, not of microseconds.\n\n");

    let (v, n) = (super::NODEPORT6_VARIANT, 3);
    let bps = |sys: &str, v: &str| median(f, "3-nodeport", "tcp_bps", sys, n, v);
    let gbps = |sys: &str| cell(find(f, "3-nodeport", "tcp_bps", sys, n, v));
    s.push_str("### 3 over IPv6: NodePort from the external client (iperf3 TCP, backend on the other node)\n\n");
    s.push_str("| kproxy | ip6tables | nftables | kproxy/ip6tables | kproxy/nftables | IPv4: kproxy/iptables | IPv4: kproxy/nftables |\n|---|---|---|---|---|---|---|\n");
    let _ = writeln!(
        s,
        "| {} | {} | {} | {} | {} | {} | {} |",
        gbps("kproxy"),
        gbps("iptables"),
        gbps("nftables"),
        ratio(bps("kproxy", v), bps("iptables", v)),
        ratio(bps("kproxy", v), bps("nftables", v)),
        ratio(bps("kproxy", "remote"), bps("iptables", "remote")),
        ratio(bps("kproxy", "remote"), bps("nftables", "remote")),
    );
    s.push_str("\nOne iperf3 TCP flow from the external client to node 0's IPv6 address at the NodePort (dual-stack lab of its own; figures `3-nodeport` `tcp_bps`, variant `remote-ipv6`). kproxy runs as item 3's `kproxy` (native XDP) with `--enable-ipv6`: its XDP program translates IPv6 NodePort traffic as it does IPv4's (TC takes what XDP leaves). The IPv4 columns are item 3's ratios for the remote backend (`—` when item 3 did not run).\n\n");
    s
}

/// Item 5: change → first successful connection, both kproxy sources beside the baselines, and
/// where a kproxy change spends its time.
fn e2e_section(r: &Results) -> String {
    let (f, c) = (&r.figures, &r.config);
    let n = c.e2e_scale as u64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 5. Change written → first successful connection at {} services\n",
        thousands(n)
    );
    s.push_str("| System | p50 at rest | p99 at rest | p50 under churn | p99 under churn |\n|---|---|---|---|---|\n");
    for (sys, label) in [
        ("kproxy-kube", "kproxy, Kubernetes API source"),
        ("kproxy", "kproxy, manifest source"),
        ("iptables", "iptables"),
        ("nftables", "nftables"),
    ] {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} |",
            cell(find(f, "5-e2e", "p50_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "p99_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "p50_ms", sys, n, "churn")),
            cell(find(f, "5-e2e", "p99_ms", sys, n, "churn")),
        );
    }
    let _ = writeln!(
        s,
        "\n{} samples per cell ({} for iptables, whose every change rewrites the whole table; p99 of that few samples is their maximum). The probe opens a new TCP connection to the new service every millisecond (each abandoned after 250 ms) and the figure is the time from the change to the first reply, so its resolution is about 1 ms: a SYN sent before the service is programmed is never answered, which is why waiting on one connection with a timeout would measure the timeout. kproxy, Kubernetes API source: each change is a Service and its EndpointSlice written to the test API server (`tests/src/apiserver.rs`, the real API server's list/watch wire behaviour), which the agent watches with kube-rs; kproxy, manifest source: each change is a file renamed into the manifest directory, which the agent watches with inotify. The agent syncs 2 ms (`--sync-coalesce-ms`) after the first notification, with no minimum sync period (`--min-sync-period-ms 0`). iptables: the change is applied right away by a partial restore (no minSyncPeriod wait); under churn another service changes at kube-proxy's default minSyncPeriod (1 s) and the probe's change waits for a sync in progress. kproxy and nftables churn: another service changes every 50 ms.\n",
        c.e2e_samples, c.e2e_samples_iptables
    );
    s.push_str("Where a kproxy change spends its time (at rest, median of the samples' own split at the end of the agent's sync, read from `kubeproxy_sync_proxy_rules_last_timestamp_seconds`):\n\n| Source | change → first reply p50 | change → programmed p50 | change → programmed p99 | of which the sync | programmed → first reply p50 |\n|---|---|---|---|---|---|\n");
    for (sys, label) in [("kproxy-kube", "Kubernetes API"), ("kproxy", "manifests")] {
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(find(f, "5-e2e", "p50_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "agent_p50_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "agent_p99_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "sync_ms", sys, n, "at-rest")),
            cell(find(f, "5-e2e", "conn_p50_ms", sys, n, "at-rest")),
        );
    }
    s.push_str("\n\"Change → programmed\" is the agent's whole share: the notification (watch event or inotify), the coalescing window, reading the change (the manifest directory is listed and the new file parsed), the sync (the map writes) and its bookkeeping. \"Programmed → first reply\" is the probe's: the next new connection after the maps hold the service (up to 1 ms) and its round trip. Every sample above 20 ms is listed in the notes at the end with when its answered connection started and how the probe's earlier attempts ended (refused, reset, unanswered), and for kproxy at rest when the agent's sync ended: a late sync, a datapath that refused or lost the first connections after it, and a stalled probe read apart there.\n\n");
    s
}

/// `--only-latency`: the kproxy programs' run time per connection of the latency load (bpf_stats,
/// a second run of the same load), by system and program, with how often each ran.
fn latency_conn_stats(s: &mut String, f: &[Figure], c: &super::Config) {
    let mut programs: Vec<&str> = f
        .iter()
        .filter(|x| x.item == "1-latency")
        .filter_map(|x| x.metric.strip_prefix("bpf_ns_per_conn."))
        .collect();
    programs.sort_unstable();
    programs.dedup();
    if programs.is_empty() {
        return;
    }
    let mut rows = String::new();
    for &n in &c.scales {
        let n = n as u64;
        let systems = f
            .iter()
            .filter(|x| x.item == "1-latency" && x.metric == "bpf_ns_per_conn" && x.n == n)
            .map(|x| x.system.as_str());
        for sys in systems {
            let per = |p: &str| {
                let ns = median(f, "1-latency", &format!("bpf_ns_per_conn.{p}"), sys, n, "");
                let runs = median(f, "1-latency", &format!("runs_per_conn.{p}"), sys, n, "");
                match (ns, runs) {
                    (Some(ns), Some(runs)) if runs > 0.0 => {
                        format!("{ns:.0} ns ({runs:.1} × {:.0} ns)", ns / runs)
                    }
                    _ => "—".into(),
                }
            };
            let total = median(f, "1-latency", "bpf_ns_per_conn", sys, n, "");
            let cells: Vec<String> = programs.iter().map(|p| per(p)).collect();
            let _ = writeln!(
                rows,
                "| {} | {sys} | {} | {} |",
                thousands(n),
                total.map_or("—".into(), |t| format!("{t:.0} ns")),
                cells.join(" | ")
            );
        }
    }
    let head: Vec<String> = programs.iter().map(|p| format!("`{p}`")).collect();
    let _ = write!(
        s,
        "\nWhere kproxy's part of a connection goes (bpf_stats, a second run of the same load with statistics on; median over the repetitions): the programs' run time per connection, each as runs per connection × time per run. A tail-called program's time is its caller's; the kernel's timing of each run (two clock reads) is included, so the sum is above what the latency run paid. A row marked *(direct connections)* is the same load to the endpoint's second port instead of the service, through the same loaded system: what kproxy's programs cost a connection that is not a service's, which every pod's connections pay.\n\n| Services | System | All programs | {} |\n|---|---|---|{}\n{rows}",
        head.join(" | "),
        "---|".repeat(programs.len()),
    );
}
