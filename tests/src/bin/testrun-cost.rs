//! `kproxy-testrun-cost [SERVICES] [RUNS] [EVICT_KIB]`: the per-packet costs of the
//! benchmark's item 7 (BPF_PROG_TEST_RUN, median ns per run) for the embedded eBPF object,
//! without the lab: one line per figure, for quick comparisons of two builds (run them
//! alternately, several times). With `EVICT_KIB` > 0, that much memory is written through before
//! each run, so that each run starts with cold caches (1024: the L2 cache of this machine class;
//! see `testrun::measure_cold`). Needs root; works in a private network namespace and pin
//! directory of its own.
use anyhow::{Context, Result};
use kproxy_tests::bench::testrun;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().map_or(Ok(100), |a| a.parse()).context("SERVICES")?;
    let runs: usize = args.next().map_or(Ok(2000), |a| a.parse()).context("RUNS")?;
    let evict_kib: usize = args.next().map_or(Ok(0), |a| a.parse()).context("EVICT_KIB")?;
    for c in testrun::measure_cold(&[services], runs, evict_kib << 10)? {
        for (name, ns) in c.figures() {
            println!("{name:<20} {ns:>8.1}");
        }
    }
    Ok(())
}
