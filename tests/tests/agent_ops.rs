//! Operating the agent in the lab: metrics (checked with `promtool`), health, traffic across an
//! agent stop / pause / crash / restart, churn that must not disturb other services, bad
//! manifests that must not cost the last good state, and the CLI while the agent is down.
use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use kproxy_tests::{
    client::{TcpSession, tcp_request},
    lab::{self, Agent, AgentOpts, Lab, LabSpec, SERVER_PORT, Wiring, exec},
    manifests::{Endpoint, ManifestDir, Port, Service, Slice},
};

const T: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

struct Setup {
    agents: Vec<Option<Agent>>,
    dir: ManifestDir,
    lab: Lab,
}

impl Setup {
    fn new(label: &str) -> Setup {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
        let mut lab = Lab::up(LabSpec::with_wiring(Wiring::Routed)).expect("lab");
        lab.start_servers().expect("servers");
        let dir = ManifestDir::new(&format!("{label}-{}", lab.prefix())).expect("dir");
        let mut s = Setup { agents: Vec::new(), dir, lab };
        for i in 0..2 {
            let a = s.start_agent(i);
            s.agents.push(Some(a));
        }
        s
    }

    fn start_agent(&self, node: usize) -> Agent {
        let opts = AgentOpts { manifests_dir: self.dir.path().to_path_buf(), ..Default::default() };
        self.lab.spawn_agent(node, &opts).expect("agent")
    }

    fn ep(&self, i: usize, j: usize) -> Endpoint {
        let p = self.lab.pod(i, j).unwrap();
        Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
    }

    fn put(&self, svc: &Service, eps: Vec<Endpoint>) {
        self.dir.put(svc, &[Slice::for_service(svc, eps)]).unwrap();
    }

    fn kproxy(&self, node: usize, args: &[&str]) -> std::process::Output {
        let k = lab::find_bin("kproxy").unwrap();
        let pin = self.lab.pin_path(node).to_string_lossy().into_owned();
        let mut argv: Vec<String> = vec![k.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        argv.push("--pin-path".into());
        argv.push(pin);
        exec(&self.lab.node(node).ns, &argv).expect("kproxy command")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for a in self.agents.iter().flatten() {
                eprintln!("--- agent node {} ---\n{}", a.node, a.log_text());
            }
        }
        self.agents.clear();
        for i in 0..2 {
            let _ = self.lab.cleanup(i);
        }
    }
}

fn web(name: &str, ip: Ipv4Addr) -> Service {
    Service::cluster_ip(name, ip, vec![Port::tcp("http", 80, SERVER_PORT)])
}

fn wait_served(ns: &str, ip: Ipv4Addr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tcp_request(ns, ip, 80, T).is_err() {
        assert!(Instant::now() < deadline, "{ip}:80 never served");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` on `addr:port` from inside namespace `ns`.
fn http_get(ns: &str, addr: Ipv4Addr, port: u16, path: &str) -> (u16, String) {
    lab::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), T).expect("connect");
        s.set_read_timeout(Some(T)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (code, body)
    })
    .expect("netns")
}

/// Background clients: new connections to each address every few milliseconds, counting
/// successes and failures, until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(ns: &str, targets: &[Ipv4Addr]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = targets
            .iter()
            .map(|ip| {
                let (ns, ip, stop, ok, failed) =
                    (ns.to_string(), *ip, stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match tcp_request(&ns, ip, 80, T) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("request to {ip} failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Traffic { stop, ok, failed, threads }
    }

    /// Stops and returns (ok, failed).
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[test]
fn metrics_pass_promtool_and_health_answers() {
    let s = Setup::new("metrics");
    s.put(&web("web", VIP), vec![s.ep(0, 0), s.ep(1, 0)]);
    let pod = s.lab.pod(0, 1).unwrap().ns.clone();
    wait_served(&pod, VIP);
    for _ in 0..10 {
        tcp_request(&pod, VIP, 80, T).expect("served");
    }
    let node = s.lab.node(0).ns.clone();
    // The datapath counters are read by the agent periodically: wait until they show.
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (code, body) = http_get(&node, Ipv4Addr::LOCALHOST, 10249, "/metrics");
        assert_eq!(code, 200);
        if body.contains("kproxy_packets_total{reason=\"translated_new\"}") {
            break body;
        }
        assert!(Instant::now() < deadline, "no packet counters in metrics:\n{body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kproxy_services_programmed",
        "kproxy_backends_programmed",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let programmed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kproxy_services_programmed "))
        .and_then(|v| v.trim().parse().ok())
        .expect("services gauge");
    assert!(programmed >= 1.0, "{metrics}");
    // promtool's own parser and linter.
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (make setup installs it)");
    p.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, body) = http_get(&node, s.lab.node(0).ip, 10256, "/healthz");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    assert!(v["lastUpdated"].is_string(), "{body}");
}

#[test]
fn traffic_survives_agent_stop_pause_crash_and_restart() {
    let mut s = Setup::new("restart");
    s.put(&web("web", VIP), vec![s.ep(0, 0), s.ep(1, 1)]);
    let pod = s.lab.pod(0, 2).unwrap().ns.clone();
    wait_served(&pod, VIP);
    let (mut session, first) = TcpSession::connect(&pod, VIP, 80, T).expect("session");
    let traffic = Traffic::start(&pod, &[VIP]);
    std::thread::sleep(Duration::from_millis(500));
    // Pause (SIGSTOP), resume.
    let pid = s.agents[0].as_mut().unwrap().proc_mut().pid().expect("agent pid") as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(session.request().expect("during pause"), first);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // Crash (SIGKILL): no chance to clean anything up.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(s.agents[0].take());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(session.request().expect("after a crash"), first);
    // Restart: reuses the pins, reconciles, nothing drops.
    s.agents[0] = Some(s.start_agent(0));
    std::thread::sleep(Duration::from_secs(2));
    // Graceful stop (SIGTERM) and start again.
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("SIGTERM stop");
    std::thread::sleep(Duration::from_millis(500));
    s.agents[0] = Some(s.start_agent(0));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(session.request().expect("after restarts"), first);
    let (ok, failed) = traffic.finish();
    assert!(ok > 50, "too little traffic to judge: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed across stop/pause/crash/restart",
        ok + failed
    );
}

#[test]
fn churn_does_not_disturb_unchanged_or_changing_services() {
    let s = Setup::new("churn");
    let stable = web("stable", VIP);
    let churn = web("churn", VIP2);
    s.put(&stable, vec![s.ep(0, 0), s.ep(1, 0)]);
    s.put(&churn, vec![s.ep(0, 1), s.ep(1, 1)]);
    let pod = s.lab.pod(1, 2).unwrap().ns.clone();
    wait_served(&pod, VIP);
    wait_served(&pod, VIP2);
    let traffic = Traffic::start(&pod, &[VIP, VIP2]);
    // The changing service's ready set flips every 300 ms. Endpoints leaving the ready set stay
    // in the slice as terminating (as the EndpointSlice controller reports a pod going away), so
    // connections already on them finish; a correct, never half-written update loses nothing.
    // (An endpoint removed outright resets its open TCP connections by design.)
    for round in 0..20 {
        let eps = if round % 2 == 0 {
            vec![s.ep(0, 1), s.ep(0, 2), s.ep(1, 2), s.ep(1, 1).terminating()]
        } else {
            vec![s.ep(0, 1), s.ep(1, 1), s.ep(0, 2).terminating(), s.ep(1, 2).terminating()]
        };
        s.put(&churn, eps);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (ok, failed) = traffic.finish();
    assert!(ok > 100, "too little traffic to judge: {ok}");
    assert_eq!(failed, 0, "{failed} of {} connections failed during churn", ok + failed);
}

#[test]
fn bad_manifests_keep_the_last_good_state() {
    let mut s = Setup::new("bad");
    let good = web("good", VIP);
    s.put(&good, vec![s.ep(0, 0)]);
    let pod = s.lab.pod(1, 0).unwrap().ns.clone();
    wait_served(&pod, VIP);
    s.dir.write("garbage.yaml", &["this: is: not: yaml: [".to_string()]).unwrap();
    s.dir
        .write(
            "unknown.yaml",
            &["apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n".to_string()],
        )
        .unwrap();
    let mut bad_port = web("badport", VIP2);
    bad_port.ports[0].port = 0;
    s.put(&bad_port, vec![s.ep(0, 1)]);
    let mut bad_proto = web("badproto", Ipv4Addr::new(198, 19, 0, 12));
    bad_proto.ports[0].protocol = "QUIC".into();
    s.put(&bad_proto, vec![s.ep(0, 1)]);
    s.dir
        .write("badip.yaml", &[web("badip", VIP2).to_yaml().replace("198.19.0.11", "198.19.0.300")])
        .unwrap();
    // Reading the whole directory again, the agent keeps serving, and a later good change still
    // applies.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..10 {
        assert_eq!(
            tcp_request(&pod, VIP, 80, T).expect("good service still served").server_pod,
            "node-0-pod-0"
        );
    }
    s.put(&good, vec![s.ep(1, 2)]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while tcp_request(&pod, VIP, 80, T).map(|r| r.server_pod != "node-1-pod-2").unwrap_or(true) {
        assert!(Instant::now() < deadline, "a good change after bad input was not applied");
        std::thread::sleep(Duration::from_millis(200));
    }
    for a in s.agents.iter_mut().flatten() {
        let log = a.log_text();
        let status = a.proc_mut().try_status().expect("status");
        assert!(status.is_none(), "agent on node {} exited: {status:?}\n{log}", a.node);
    }
    let log = s.agents[0].as_ref().unwrap().log_text();
    for needle in ["garbage.yaml", "default/badport", "default/badproto", "QUIC"] {
        assert!(log.contains(needle), "no clear error naming {needle:?} in the agent log:\n{log}");
    }
}

#[test]
fn cli_reads_the_datapath_while_the_agent_is_down_and_cleanup_removes_it() {
    let mut s = Setup::new("cli");
    s.put(&web("web", VIP), vec![s.ep(0, 0)]);
    let pod = s.lab.pod(0, 1).unwrap().ns.clone();
    wait_served(&pod, VIP);
    let (_session, _) = TcpSession::connect(&pod, VIP, 80, T).expect("a tracked connection");
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("stop");
    let out = s.kproxy(0, &["service", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.19.0.10") && text.contains("198.18.100.10"), "{text}");
    serde_json::from_str::<serde_json::Value>(&text).expect("service list JSON");
    let out = s.kproxy(0, &["conntrack", "list", "-o", "json"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<serde_json::Value>(&text).expect("conntrack JSON");
    assert!(
        text.contains("198.18.100.11") && text.contains("198.19.0.10"),
        "the open connection: {text}"
    );
    // Still serving with the agent down; cleanup removes programs and pins.
    assert!(tcp_request(&pod, VIP, 80, T).is_ok());
    let out = s.kproxy(0, &["cleanup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!s.lab.pin_path(0).join("v1").exists(), "pins left after cleanup");
    let filters =
        exec(&s.lab.node(0).ns, &["tc", "filter", "show", "dev", "vp1", "ingress"]).unwrap();
    assert!(
        String::from_utf8_lossy(&filters.stdout).trim().is_empty(),
        "filters left after cleanup"
    );
    assert!(tcp_request(&pod, VIP, 80, T).is_err(), "the ClusterIP still answers after cleanup");
}
