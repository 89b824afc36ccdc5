//! `kproxy-testrun-cost [SERVICES] [RUNS] [EVICT_KIB]`: the per-packet costs of the
//! benchmark's item 7 (BPF_PROG_TEST_RUN, median ns per run) for the embedded eBPF object,
//! without the lab: one line per figure, for quick comparisons of two builds (run them
//! alternately, several times). With `EVICT_KIB` > 0, that much memory is written through before
//! each run, so that each run starts with cold caches (1024: the L2 cache of this machine class;
//! see `testrun::measure_cold`). Needs root; works in a private network namespace and pin
//! directory of its own.
use anyhow::{Context, Result};
use kproxy_tests::bench::testrun;

/// Removes the measurements' pin directory when the tool is stopped by a signal (`timeout`,
/// Ctrl-C), which skips the drops that remove it otherwise; the network namespace of the
/// measurements goes with the process.
fn remove_pins_on_signal() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let pin = testrun::pin_dir();
            if pin.exists()
                && let Err(e) = std::fs::remove_dir_all(&pin)
            {
                eprintln!("kproxy-testrun-cost: removing {}: {e}", pin.display());
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

fn main() -> Result<()> {
    remove_pins_on_signal()?;
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
