//! `make bench QUICK=1` as a smoke test of the benchmark harness: the quick run (tiny scales,
//! one repetition) into a temporary directory, then checks that every planned figure was
//! produced — numbers present and finite, or a stated reason for a figure not measured by design
//! (time budget) — and that every output file was written. No speed thresholds: this tests the
//! harness, not the numbers.
//!
//! Needs root, bpffs, iptables-legacy, nft, iperf3, conntrack and the built binaries (`make build`).
use std::path::PathBuf;

use kproxy_tests::bench::{self, report::PLOTS, results::Status};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn quick_bench_produces_every_figure() {
    let out = Dir(std::env::temp_dir().join(format!("kproxy-bench-smoke-{}", std::process::id())));
    let cfg = bench::Config::quick();
    let results = bench::run(&cfg, &out.0).expect("quick benchmark run");

    for f in ["results.json", "report.md"].into_iter().chain(PLOTS) {
        let len = std::fs::metadata(out.0.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} was not written");
    }
    let json = std::fs::read_to_string(out.0.join("results.json")).unwrap();
    let back: bench::Results = serde_json::from_str(&json).expect("results.json parses");
    assert_eq!(back.figures.len(), results.figures.len());

    // Every item of the issue has figures, at every planned scale.
    for item in [
        "1-latency",
        "2-rate",
        "3-nodeport",
        "4-programming",
        "5-e2e",
        "6-memory",
        "7-testrun",
        "8-bpf-stats",
    ] {
        assert!(results.figures.iter().any(|f| f.item == item), "no figure for item {item}");
    }
    for n in &cfg.scales {
        for sys in ["floor", "kproxy", bench::HOST_ROUTING, bench::SOCKET_LB, "iptables"] {
            assert!(
                results.figures.iter().any(|f| f.item == "1-latency"
                    && f.system == sys
                    && f.n == *n as u64
                    && f.status == Status::Ok),
                "no latency figure for {sys} at {n} services"
            );
        }
        // Every system paired with direct connections (the floor as the control).
        for sys in
            ["floor", "kproxy", bench::HOST_ROUTING, bench::SOCKET_LB, "iptables", "nftables"]
        {
            assert!(
                results.figures.iter().any(|f| f.item == "1-latency"
                    && f.metric == bench::PAIRED_P50
                    && f.system == sys
                    && f.n == *n as u64
                    && f.status == Status::Ok),
                "no paired latency figure for {sys} at {n} services"
            );
        }
    }

    // Item 1 over IPv6 (dual-stack lab): every system at every IPv6 scale, and its table.
    assert!(!cfg.ipv6_scales.is_empty());
    for n in &cfg.ipv6_scales {
        for sys in ["floor", "kproxy", "iptables", "nftables"] {
            for m in ["p50_us", "p99_us"] {
                assert!(
                    results.figures.iter().any(|f| f.item == "1-latency"
                        && f.metric == m
                        && f.system == sys
                        && f.n == *n as u64
                        && f.variant == bench::IPV6_VARIANT
                        && f.status == Status::Ok),
                    "no IPv6 latency figure {m} for {sys} at {n} services"
                );
            }
        }
    }
    for sys in ["kproxy", "iptables", "nftables"] {
        assert!(
            results.figures.iter().any(|f| f.item == "3-nodeport"
                && f.metric == "tcp_bps"
                && f.system == sys
                && f.variant == bench::NODEPORT6_VARIANT
                && f.status == Status::Ok),
            "no IPv6 NodePort figure for {sys}"
        );
    }
    let report = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    assert!(report.contains("### 1 over IPv6"), "no IPv6 latency table in the report");
    assert!(report.contains("### 3 over IPv6"), "no IPv6 NodePort table in the report");

    let mut problems = Vec::new();
    for f in &results.figures {
        let what = format!("{} {} {} n={} {}", f.item, f.metric, f.system, f.n, f.variant);
        match f.status {
            Status::Ok => {
                let m = f.median.unwrap_or(f64::NAN);
                if f.samples.is_empty()
                    || !m.is_finite()
                    || f.samples.iter().any(|v| !v.is_finite())
                {
                    problems.push(format!("{what}: no finite numbers"));
                }
            }
            Status::Skipped => {
                if f.reason.as_deref().is_none_or(str::is_empty) {
                    problems.push(format!("{what}: skipped without a reason"));
                }
            }
            Status::Failed => problems
                .push(format!("{what}: failed: {}", f.reason.as_deref().unwrap_or("no reason"))),
        }
    }
    assert!(problems.is_empty(), "figures not produced:\n{}", problems.join("\n"));

    // The live-frame generator's frames reached the sinks translated, for every system.
    // (Not measured, and said why, on a kernel that refuses live frames.)
    for f in
        results.figures.iter().filter(|f| f.metric == "live_delivered" && f.status == Status::Ok)
    {
        let got = f.median.unwrap_or(0.0);
        assert!(got > 0.5, "{} {}: {got:.2} of the frames delivered", f.system, f.variant);
    }
}
