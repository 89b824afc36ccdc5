//! `make demo`: a 2-node dual-stack lab, one `kproxy agent --enable-ipv6` per node on the bundled
//! `examples/` manifests, real traffic to every service the examples define, and a readable
//! account of what happened.
//!
//! The demo reads the Services in `examples/` (any standard YAML) and drives, for each port:
//! TCP requests to the lab's test server, DNS queries with `dig` for UDP port 53, from a pod for
//! ClusterIPs (over IPv4 and, for a dual-stack Service, over IPv6 too) and from the external
//! client for NodePorts (through each node) and LoadBalancer/external IPs. It counts which
//! backend (pod) answered and whether the server saw the client's own address.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;

use crate::{
    client::{tcp_request, tcp_request6},
    lab::{self, AgentOpts, CLIENT_IP, Lab, LabSpec, exec},
};

/// Name prefix of the demo's lab.
const PREFIX: &str = "kpdemo";
/// Requests per frontend.
const REQUESTS: usize = 30;
const T: Duration = Duration::from_secs(2);

fn step(n: usize, total: usize, what: &str) {
    println!("[{n}/{total}] {what}");
}

/// Every Service in the YAML files of `dir`.
pub fn load_services(dir: &Path) -> Result<Vec<Service>> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parsing {}", f.display()))?;
        for v in docs {
            if v.get("kind").and_then(|k| k.as_str()) == Some("Service") {
                out.push(
                    serde_json::from_value(v)
                        .with_context(|| format!("Service in {}", f.display()))?,
                );
            }
        }
    }
    Ok(out)
}

/// One frontend the demo drives.
struct Target {
    label: String,
    from_ns: String,
    from_ip: IpAddr,
    addr: IpAddr,
    port: u16,
    /// Port 53: queried with `dig` (over TCP when `tcp`).
    dns: bool,
    tcp: bool,
}

/// Results of one frontend: backend → answers, errors, and the client addresses servers saw.
#[derive(Default)]
struct Tally {
    per_backend: BTreeMap<String, usize>,
    errors: usize,
    preserved: usize,
    seen_as: BTreeMap<IpAddr, usize>,
}

fn drive(t: &Target) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..REQUESTS {
        if t.dns {
            let port = t.port.to_string();
            let server = format!("@{}", t.addr);
            let transport = if t.tcp { "+tcp" } else { "+notcp" };
            let out = exec(
                &t.from_ns,
                &[
                    "dig",
                    "+short",
                    "+tries=1",
                    "+time=2",
                    transport,
                    &server,
                    "-p",
                    &port,
                    lab::DNS_NAME,
                    "TXT",
                ],
            );
            match out {
                Ok(o) if o.status.success() && !o.stdout.is_empty() => {
                    let name =
                        String::from_utf8_lossy(&o.stdout).trim().trim_matches('"').to_string();
                    *tally.per_backend.entry(name).or_default() += 1;
                }
                _ => tally.errors += 1,
            }
        } else {
            match request(t) {
                Ok((pod, ip)) => {
                    *tally.per_backend.entry(pod).or_default() += 1;
                    if ip == t.from_ip {
                        tally.preserved += 1;
                    }
                    *tally.seen_as.entry(ip).or_default() += 1;
                }
                Err(_) => tally.errors += 1,
            }
        }
    }
    tally
}

/// One TCP request to the target: the pod that answered and the client address it saw.
fn request(t: &Target) -> Result<(String, IpAddr)> {
    Ok(match t.addr {
        IpAddr::V4(a) => {
            let r = tcp_request(&t.from_ns, a, t.port, T)?;
            (r.server_pod, IpAddr::V4(*r.client_addr.ip()))
        }
        IpAddr::V6(a) => {
            let r = tcp_request6(&t.from_ns, a, t.port, T)?;
            (r.server_pod, IpAddr::V6(*r.client_addr.ip()))
        }
    })
}

fn targets(lab: &Lab, services: &[Service]) -> Vec<Target> {
    let pod = lab.pod(1, 2).cloned().expect("the default lab has pod node-1-pod-2");
    let client = lab.client_ns();
    let mut out = Vec::new();
    for svc in services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let Some(spec) = &svc.spec else { continue };
        let Some(cip) = spec.cluster_ip.as_deref().and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        for p in spec.ports.iter().flatten() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let port = p.port as u16;
            let dns = port == 53;
            let tcp = proto == "TCP";
            if !tcp && !dns {
                continue;
            }
            let kind = match (dns, tcp) {
                (true, true) => "DNS over TCP, dig",
                (true, false) => "DNS over UDP, dig",
                _ => "TCP",
            };
            // ClusterIP, from a pod on node 1.
            out.push(Target {
                label: format!("{name} ClusterIP {cip}:{port} {kind} (from {})", pod.name),
                from_ns: pod.ns.clone(),
                from_ip: pod.ip.into(),
                addr: cip.into(),
                port,
                dns,
                tcp,
            });
            // The IPv6 ClusterIP of a dual-stack Service, from the same pod over IPv6.
            let cip6 = spec.cluster_ips.iter().flatten().find_map(|s| s.parse::<Ipv6Addr>().ok());
            if let (Some(cip6), Some(pod6), false) = (cip6, pod.ip6, dns) {
                out.push(Target {
                    label: format!(
                        "{name} ClusterIP [{cip6}]:{port} {kind} over IPv6 (from {})",
                        pod.name
                    ),
                    from_ns: pod.ns.clone(),
                    from_ip: pod6.into(),
                    addr: cip6.into(),
                    port,
                    dns,
                    tcp,
                });
            }
            if dns {
                continue;
            }
            if let Some(np) = p.node_port {
                for n in lab.nodes() {
                    out.push(Target {
                        label: format!("{name} NodePort {}:{np} (client via {})", n.ip, n.name),
                        from_ns: client.clone(),
                        from_ip: CLIENT_IP.into(),
                        addr: n.ip.into(),
                        port: np as u16,
                        dns: false,
                        tcp: true,
                    });
                }
            }
            let lb_ips = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i.ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()));
            let ext = spec
                .external_ips
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|s| s.parse::<Ipv4Addr>().ok());
            for ip in lb_ips.chain(ext) {
                out.push(Target {
                    label: format!("{name} LoadBalancer/external {ip}:{port} (client)"),
                    from_ns: client.clone(),
                    from_ip: CLIENT_IP.into(),
                    addr: ip.into(),
                    port,
                    dns: false,
                    tcp: true,
                });
            }
        }
    }
    out
}

fn print_tally(t: &Target, r: &Tally) {
    println!("  {}", t.label);
    let answers: usize = r.per_backend.values().sum();
    for (backend, n) in &r.per_backend {
        println!("      {backend:<16} {n:>3} {}", "#".repeat(*n));
    }
    if r.errors > 0 {
        println!("      {:<16} {:>3}", "(no answer)", r.errors);
    }
    if !t.dns && answers > 0 {
        let seen: Vec<String> = r.seen_as.iter().map(|(ip, n)| format!("{ip} ×{n}")).collect();
        let verdict = if r.preserved == answers {
            "yes".to_string()
        } else if r.preserved == 0 {
            "no (source NAT to the node)".to_string()
        } else {
            format!(
                "for {} of {answers}; the rest were source-NATed (a remote backend behind a \
                 NodePort sees the node, a pod reaching itself sees the service address)",
                r.preserved
            )
        };
        println!("      client address preserved: {verdict}; servers saw {}", seen.join(", "));
    }
}

/// Runs the demo on the manifests in `examples`. With `keep`, the lab stays up and its prefix
/// is printed for `make demo-down`.
pub fn run(examples: &Path, keep: bool) -> Result<()> {
    const STEPS: usize = 6;
    let services = load_services(examples)?;
    if services.is_empty() {
        bail!("no Services in {}", examples.display());
    }
    step(
        1,
        STEPS,
        "starting the lab: 2 nodes × 3 pods and an external client, in network namespaces, \
         dual-stack (IPv4 and IPv6)",
    );
    let spec = LabSpec { prefix: Some(PREFIX.into()), ipv6: true, ..LabSpec::default() };
    let mut lab = Lab::up(spec)?;
    if keep {
        lab.set_outlive_parent(true);
    }
    lab.start_servers()?;
    step(
        2,
        STEPS,
        &format!("starting one kproxy agent --enable-ipv6 per node on {}", examples.display()),
    );
    let opts = AgentOpts {
        manifests_dir: examples.to_path_buf(),
        extra_args: vec!["--enable-ipv6".into()],
        ..Default::default()
    };
    let agents: Vec<_> =
        (0..lab.nodes().len()).map(|i| lab.spawn_agent(i, &opts)).collect::<Result<_>>()?;

    let targets = targets(&lab, &services);
    step(3, STEPS, "waiting for the services to be programmed");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The first TCP frontend of each family.
    let probes: Vec<&Target> = [false, true]
        .into_iter()
        .filter_map(|v6| targets.iter().find(|t| !t.dns && t.addr.is_ipv6() == v6))
        .collect();
    anyhow::ensure!(!probes.is_empty(), "no TCP service in the examples");
    for probe in probes {
        while request(probe).is_err() {
            if Instant::now() > deadline {
                for a in &agents {
                    eprintln!("--- agent log node-{} ---\n{}", a.node, a.log_text());
                }
                bail!("{} did not answer within 30 s", probe.label);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    step(4, STEPS, &format!("driving traffic: {REQUESTS} requests per frontend"));
    let mut failures = 0;
    for t in &targets {
        let r = drive(t);
        if r.per_backend.is_empty() {
            failures += 1;
        }
        print_tally(t, &r);
    }

    step(5, STEPS, "what node-0's datapath holds");
    let kproxy = lab::find_bin("kproxy")?;
    let pin = lab.pin_path(0).to_string_lossy().into_owned();
    let node0 = lab.node(0).ns.clone();
    let out = exec(&node0, &[&*kproxy.to_string_lossy(), "service", "list", "--pin-path", &pin])?;
    println!("$ kproxy service list --pin-path {pin}");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let map = format!("{pin}/v1/{}", kproxy_common::names::SERVICES4);
    let out = exec(&node0, &["bpftool", "map", "dump", "pinned", &map])?;
    let dump = String::from_utf8_lossy(&out.stdout);
    println!("$ bpftool map dump pinned {map} | head -24");
    for line in dump.lines().take(24) {
        println!("{line}");
    }

    step(6, STEPS, if keep { "keeping the lab (KEEP=1)" } else { "removing the lab" });
    if keep {
        for a in agents {
            std::mem::forget(a);
        }
        let prefix = lab.persist();
        println!(
            "\nExplore: nsenter --net=/run/netns/{prefix}-node-0 bash   (then: kproxy service list --pin-path {pin}, \
             kproxy conntrack list --pin-path {pin}, bpftool map dump pinned {map})\n\
             Remove it: make demo-down"
        );
    } else {
        drop(agents);
        for i in 0..lab.nodes().len() {
            let _ = lab.cleanup(i);
        }
        lab.down()?;
        println!(
            "\nDone. Explore further: `make demo KEEP=1` keeps the lab; `make test` runs the test suite; \
             `cargo xtask lab up` builds a bare lab."
        );
    }
    if failures > 0 {
        bail!("{failures} frontend(s) got no answer at all");
    }
    Ok(())
}

/// Removes a lab kept by `make demo KEEP=1`.
pub fn down() -> Result<()> {
    let kproxy = lab::find_bin("kproxy").ok();
    for ns in lab::lab_namespaces("kpdemo")? {
        if let (Some(k), Some(node)) =
            (&kproxy, ns.strip_prefix("kpdemo-node-").filter(|n| !n.contains('-')))
        {
            let pin = lab::pin_root("kpdemo").join(format!("node-{node}"));
            let _ = exec(
                &ns,
                &[&*k.to_string_lossy(), "cleanup", "--pin-path", &pin.to_string_lossy()],
            );
        }
    }
    let removed = lab::sweep(PREFIX)?;
    println!("removed {} namespaces of the demo lab", removed.len());
    Ok(())
}
