//! Prints the kube-proxy-equivalent rule sets for N generated services:
//! `cargo run -p kproxy-tests --example baseline_dump -- iptables|nftables N`.
use std::net::Ipv4Addr;

use kproxy_tests::baseline::{self, Endpoint, NodeSettings, Proto, ServicePort};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("iptables");
    let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let services: Vec<ServicePort> = (0..n)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc{i}"),
            port_name: "http".into(),
            proto: Proto::Tcp,
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i + 1).into(),
            port: 80,
            node_port: (i % 2 == 0 && i < 5000).then_some(30000 + (i / 2) as u16),
            external_ips: vec![],
            lb_ips: vec![],
            external_local: i % 4 == 0,
            affinity_timeout: (i % 3 == 0).then_some(10800),
            endpoints: (0..3)
                .map(|j| Endpoint {
                    ip: Ipv4Addr::new(198, 18, 100 + (j % 2) as u8, 10 + j as u8).into(),
                    port: 8080,
                    local: j % 2 == 0,
                })
                .collect(),
        })
        .collect();
    let node = NodeSettings {
        cluster_cidr: "198.18.64.0/18".into(),
        node_ips: vec![Ipv4Addr::new(198, 18, 0, 10).into()],
        ipv6: false,
    };
    match mode {
        "iptables-jumps" => print!("{}", baseline::iptables_jumps()),
        "nftables" => print!("{}", baseline::nftables_script(&node, &services)),
        _ => print!("{}", baseline::iptables_restore(&node, &services)),
    }
}
