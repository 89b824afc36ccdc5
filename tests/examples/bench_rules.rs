//! Prints the rule sets or the agent manifest of the benchmark workload (for debugging a run by
//! hand): `cargo run -p kproxy-tests --example bench_rules -- iptables|nftables|manifest N EPS`.
use kproxy_tests::{baseline, bench::workload};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("iptables");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let eps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut services = workload::fillers(n.saturating_sub(1), eps);
    services.extend(workload::probes());
    let ports = workload::baseline_ports(&services, 0);
    let node = workload::node_settings(0);
    match mode {
        "nftables" => print!("{}", baseline::nftables_script(&node, &ports)),
        "nftables-txns" => {
            for t in baseline::nftables_transactions(&node, &ports, 1000) {
                println!("{t}#--txn");
            }
        }
        "manifest" => print!("{}", workload::manifest_json(&services)),
        _ => print!("{}", baseline::iptables_restore(&node, &ports)),
    }
}
