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
    manifests::{Endpoint, ManifestDir, Port, Service, Slice, SvcType},
};

const T: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

struct Setup {
    agents: Vec<Option<Agent>>,
    dir: ManifestDir,
    lab: Lab,
    /// Further agent arguments.
    extra: Vec<String>,
}

impl Setup {
    fn new(label: &str) -> Setup {
        Setup::with_args(label, &[])
    }

    fn with_args(label: &str, extra: &[&str]) -> Setup {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
        let mut lab = Lab::up(LabSpec::with_wiring(Wiring::Routed)).expect("lab");
        lab.start_servers().expect("servers");
        let dir = ManifestDir::new(&format!("{label}-{}", lab.prefix())).expect("dir");
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut s = Setup { agents: Vec::new(), dir, lab, extra };
        // What the tests check starts once the datapaths are loaded.
        let agents = s.lab.start_agents(&s.opts()).expect("agents");
        s.agents = agents.into_iter().map(Some).collect();
        s
    }

    /// The agents' options: the manifest directory and the extra arguments.
    fn opts(&self) -> AgentOpts {
        AgentOpts {
            manifests_dir: self.dir.path().to_path_buf(),
            extra_args: self.extra.clone(),
            ..Default::default()
        }
    }

    /// Starts node `node`'s agent, returning once it has loaded its datapath.
    fn start_agent(&self, node: usize) -> Agent {
        self.lab.start_agent(node, &self.opts()).expect("agent")
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

/// The capacity of the map `name` pinned by node `node`'s agent.
fn max_entries(s: &Setup, node: usize, name: &str) -> u32 {
    let pin = kproxy::dataplane::bpf::maps_dir(s.lab.pin_path(node)).join(name);
    aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap().max_entries()
}

/// The value of the sample `series` (name with labels) in a Prometheus text body.
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls node `node`'s `/metrics` until `ok` accepts it (15 s at most).
fn metrics_until(s: &Setup, node: usize, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let ns = s.lab.node(node).ns.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = http_get(&ns, Ipv4Addr::LOCALHOST, 10249, "/metrics");
        assert_eq!(code, 200);
        if ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
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
    try_http_get(ns, addr, port, path)
        .unwrap_or_else(|e| panic!("GET {path} on {addr}:{port}: {e}"))
}

/// [`http_get`], with a failed connection or read as an error.
fn try_http_get(ns: &str, addr: Ipv4Addr, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    lab::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), T)?;
        s.set_read_timeout(Some(T))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Ok((code, body))
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
    let s = Setup::with_args("metrics", &["--map-stats-interval-secs", "1"]);
    s.put(&web("web", VIP), vec![s.ep(0, 0), s.ep(1, 0)]);
    let pod = s.lab.pod(0, 1).unwrap().ns.clone();
    wait_served(&pod, VIP);
    for _ in 0..10 {
        tcp_request(&pod, VIP, 80, T).expect("served");
    }
    let node = s.lab.node(0).ns.clone();
    // Datapath counters are read by the agent periodically, map fill levels sampled every
    // --map-stats-interval-secs: wait for the reads that follow the programming and the traffic.
    let metrics = metrics_until(&s, 0, "packet counters and map fill levels", |b| {
        b.contains("kproxy_packets_total{reason=\"translated_new\"}")
            && metric(b, "kproxy_map_entries{map=\"services\"}").is_some_and(|v| v >= 2.0)
            && metric(b, "kproxy_map_entries{map=\"conntrack\"}").is_some_and(|v| v >= 1.0)
    });
    assert_eq!(metric(&metrics, "kproxy_map_entries{map=\"backends\"}"), Some(2.0), "{metrics}");
    // Sized from the node's memory by the default ratio.
    use kproxy::dataplane::loader::{DEFAULT_MAP_RATIO, MapSizing, node_memory};
    let sized = MapSizing {
        ratio: DEFAULT_MAP_RATIO,
        services: None,
        backends: None,
        conntrack: None,
        affinity: None,
        ipv6: false,
    }
    .resolve(node_memory().unwrap());
    assert_eq!(
        metric(&metrics, "kproxy_map_capacity{map=\"conntrack\"}"),
        Some(f64::from(sized.conntrack)),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "kproxy_map_memory_bytes{map=\"conntrack\"}").is_some_and(|b| b > 0.0),
        "{metrics}"
    );
    // Without --enable-ipv6 the IPv6 maps holding services and flows take one entry each; the
    // IPv6 counters keep their slots.
    use kproxy_common::names;
    let cap = |name| max_entries(&s, 0, name);
    for name in [names::SERVICES6, names::BACKENDS6, names::CT6, names::REVNAT6, names::SOCK6] {
        assert_eq!(cap(name), 1, "{name}");
    }
    assert!(cap(names::COUNTERS6) > 1);
    for series in [
        "kproxy_map_pressure{map=\"affinity\"}",
        "kproxy_map_full_errors_total{map=\"services\"}",
        "kproxy_devices_attached{kind=\"external\"}",
    ] {
        assert!(metric(&metrics, series).is_some(), "{series} missing:\n{metrics}");
    }
    assert_eq!(metric(&metrics, "kproxy_devices_attached{kind=\"pod\"}"), Some(3.0));
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}",
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
    // promtool's own parser and linter. Its only complaint is kube-proxy's own name for a gauge
    // (`..._no_local_endpoints_total`), kept so that dashboards work.
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (make setup installs it)");
    p.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let upstream_lint = "kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have \"_total\" suffix";
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let problems: Vec<&str> =
        text.lines().filter(|l| !l.trim().is_empty() && l.trim() != upstream_lint).collect();
    assert!(
        problems.is_empty() && (out.status.success() || text.contains(upstream_lint)),
        "promtool check metrics failed ({}):\n{text}",
        out.status
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
    // Graceful stop (SIGTERM) and start again.
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("SIGTERM stop");
    std::thread::sleep(Duration::from_millis(500));
    // ... with IPv6 switched on: its one-entry maps are recreated at full size, the IPv4 maps
    // (and the session) are kept.
    let ct6 = kproxy_common::names::CT6;
    assert_eq!(max_entries(&s, 0, ct6), 1);
    s.extra.push("--enable-ipv6".into());
    s.agents[0] = Some(s.start_agent(0));
    assert_eq!(session.request().expect("after restarts"), first);
    assert!(max_entries(&s, 0, ct6) > 1, "IPv6 maps recreated");
    let (ok, failed) = traffic.finish();
    assert!(ok > 50, "too little traffic to judge: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed across stop/pause/crash/restart",
        ok + failed
    );
}

/// An agent started over the datapath of another map layout version (here: the pin
/// directory of the running datapath renamed `v0`, as an agent of ABI v0 would have left it)
/// takes its maps and links over and then removes it: the open connection keeps its tracked
/// entry, new connections keep being served throughout, each hook keeps one of kproxy's
/// programs.
#[test]
fn an_agent_takes_over_the_datapath_of_another_abi_version() {
    let ct4 = kproxy_common::names::CT4;
    let conntrack = |dir: &std::path::Path| {
        aya::maps::MapData::from_pin(dir.join(ct4)).unwrap().info().unwrap().id()
    };
    let tracked = std::cell::Cell::new(0);
    let session = std::cell::RefCell::new(None);
    across_a_take_over(
        "abiver",
        |pod| *session.borrow_mut() = Some(TcpSession::connect(pod, VIP, 80, T).expect("session")),
        |v0| tracked.set(conntrack(v0)),
        |s| {
            log_until(s, 0, &["took over the datapath of another ABI version", "maps="]);
            assert_eq!(
                conntrack(&s.lab.pin_path(0).join("v1")),
                tracked.get(),
                "the connection-tracking map carried over"
            );
            let (mut session, first) = session.take().unwrap();
            assert_eq!(session.request().expect("after the take-over"), first);
        },
    );
}

/// Where the take-over leaves one of the other version's maps behind (here its backends map
/// pinned again without BTF, whose layout cannot be compared), the new load starts that map
/// empty, and its programs would find no backend for the services until the first sync: the
/// agent attaches them after its first sync, the other version's programs serving from their
/// own maps until then. New connections keep being served throughout.
#[test]
fn a_take_over_that_leaves_a_map_behind_attaches_after_the_first_sync() {
    across_a_take_over(
        "abilate",
        |_| {},
        |v0| {
            // The running programs keep the map they were loaded with; only the pin changes.
            let be = v0.join(kproxy_common::names::BACKENDS4);
            std::fs::remove_file(&be).unwrap();
            pin_hash_map_without_btf(&be, 4, 8);
        },
        |s| {
            log_until(s, 0, &["other version's map not taken", "kp_be4"]);
            let log = s.agents[0].as_ref().unwrap().log_text();
            let at =
                |needle: &str| log.find(needle).unwrap_or_else(|| panic!("no {needle:?}:\n{log}"));
            assert!(
                at("node configuration written") < at("first sync done: attaching")
                    && at("first sync done: attaching") < at("external device attached"),
                "attached before the first sync:\n{log}"
            );
        },
    );
}

/// A take-over under traffic: a service served from node 0 to one of its pods (`opened` gets
/// that pod's namespace first), the agent stopped, its pin directory renamed `v0` as an agent
/// of ABI v0 would have left it (`prepare` gets it), a new agent started (`check` runs once
/// it has taken the datapath over and removed `v0`); then one of kproxy's programs on each
/// external hook and no new connection failed throughout.
fn across_a_take_over(
    name: &str,
    opened: impl FnOnce(&str),
    prepare: impl FnOnce(&std::path::Path),
    check: impl FnOnce(&Setup),
) {
    let mut s = Setup::new(name);
    s.put(&web("web", VIP), vec![s.ep(0, 0), s.ep(1, 1)]);
    let pod = s.lab.pod(0, 2).unwrap().ns.clone();
    wait_served(&pod, VIP);
    opened(&pod);
    let traffic = Traffic::start(&pod, &[VIP]);
    std::thread::sleep(Duration::from_millis(300));
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("SIGTERM stop");
    let pins = s.lab.pin_path(0);
    std::fs::rename(pins.join("v1"), pins.join("v0")).unwrap();
    prepare(&pins.join("v0"));
    s.agents[0] = Some(s.start_agent(0));
    log_until(&s, 0, &["other ABI version's datapath removed"]);
    assert!(!pins.join("v0").exists(), "the other version's directory removed");
    check(&s);
    assert_eq!(programs_on(&device_list(&s, 0), "eth0"), ["kp_xdp_ext", "kp_tc_ext_xdp"]);
    let (ok, failed) = traffic.finish();
    assert!(ok > 50, "too little traffic to judge: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed across the take-over",
        ok + failed
    );
}

/// Pins at `pin` a new hash map of `key` and `value` bytes created without BTF.
fn pin_hash_map_without_btf(pin: &std::path::Path, key: u32, value: u32) {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use kproxy::dataplane::sys;
    let mut attr = sys::attr();
    // SAFETY: union access; the map-create member is the one BPF_MAP_CREATE reads.
    let m = unsafe { &mut attr.__bindgen_anon_1 };
    m.map_type = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    (m.key_size, m.value_size, m.max_entries) = (key, value, 1024);
    // SAFETY: a plain attribute block.
    let map = unsafe { sys::bpf(sys::bpf_cmd::BPF_MAP_CREATE, &mut attr) }.expect("MAP_CREATE");
    // SAFETY: a new file descriptor we own.
    let map = unsafe { OwnedFd::from_raw_fd(map as i32) };
    aya::maps::MapData::from_fd(map).unwrap().pin(pin).unwrap();
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
    let out = s.kproxy(0, &["map", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map list JSON");
    let entries = |m: &str| {
        maps.as_array().unwrap().iter().find(|v| v["map"] == m).expect(m)["entries"].as_u64()
    };
    // One frontend and its one backend slot; one backend; the open connection.
    assert_eq!(entries("services"), Some(2), "{maps}");
    assert_eq!(entries("backends"), Some(1), "{maps}");
    assert!(entries("conntrack").unwrap() >= 1, "{maps}");
    // The IPv6 maps are listed beside them (empty here).
    assert_eq!(entries("services6"), Some(0), "{maps}");
    assert_eq!(entries("conntrack6"), Some(0), "{maps}");
    // Every map reports the kernel memory it uses.
    for m in maps.as_array().unwrap() {
        assert!(m["bytes"].as_u64().is_some_and(|b| b > 0), "{m}");
    }
    let out = s.kproxy(0, &["map", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PRESSURE") && text.contains("MEMORY") && text.contains("total"));
    let devices = device_list(&s, 0);
    let eth0 = devices["devices"].as_array().unwrap().iter().find(|d| d["name"] == "eth0");
    assert!(eth0.is_some_and(|d| d["xdp"]["program"] == "kp_xdp_ext"), "{devices}");
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
    let out = s.kproxy(0, &["device", "list", "-o", "json"]);
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).expect("device JSON");
    assert_eq!(devices["devices"], serde_json::json!([]), "attachments left after cleanup");
}

/// `kproxy device list -o json` on node `node`.
fn device_list(s: &Setup, node: usize) -> serde_json::Value {
    let out = s.kproxy(node, &["device", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("device list JSON")
}

/// The kproxy programs `device list` shows on `dev` (XDP first), empty when it is not listed.
fn programs_on(devices: &serde_json::Value, dev: &str) -> Vec<String> {
    let Some(d) = devices["devices"].as_array().unwrap().iter().find(|d| d["name"] == dev) else {
        return Vec::new();
    };
    let mut out: Vec<String> =
        d["xdp"]["program"].as_str().map(str::to_owned).into_iter().collect();
    out.extend(d["tc"].as_array().unwrap().iter().map(|p| p["program"].as_str().unwrap().into()));
    out
}

/// Waits until the agent log of node `node` has a line holding every needle (the bound of a
/// datapath load: some lines follow one).
fn log_until(s: &Setup, node: usize, needles: &[&str]) {
    let deadline = Instant::now() + lab::AGENT_LOAD;
    loop {
        let log = s.agents[node].as_ref().unwrap().log_text();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(Instant::now() < deadline, "no log line with {needles:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// New pod interfaces get the programs from the link notification (the periodic rescan is set
/// far beyond the test), are served at once, and leave nothing behind when they go.
#[test]
fn pod_interfaces_are_attached_as_they_appear_and_forgotten_as_they_go() {
    let mut s = Setup::with_args("devices", &["--device-rescan-secs", "600"]);
    s.put(&web("web", VIP), vec![s.ep(1, 0), s.ep(1, 1)]);
    wait_served(&s.lab.pod(0, 0).unwrap().ns.clone(), VIP);
    let node_ns = s.lab.node(0).ns.clone();
    let pin = s.lab.pin_path(0).to_path_buf();

    // A bare veth: from the moment `ip link add` returns to kproxy's filters on it.
    let attach_latency = lab::in_netns(&node_ns, || {
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["link", "add", "vp200", "type", "veth", "peer", "name", "kpt200"]);
        let created = Instant::now();
        let on_vp200 = || {
            kproxy::netdev::attachments(&pin)
                .expect("attachments")
                .devices
                .iter()
                .find(|d| d.name == "vp200")
                .map_or(0, |d| d.tc.len())
        };
        while on_vp200() < 2 {
            assert!(created.elapsed() < Duration::from_secs(5), "vp200 never got its programs");
            std::thread::sleep(Duration::from_millis(1));
        }
        let latency = created.elapsed();
        ip(&["link", "del", "vp200"]);
        latency
    })
    .expect("netns");
    // Printed for the record: attaching within the loop's 5 s (the rescan is 600 s away) is the
    // check that the link notification did it; how fast is not a test's to judge.
    eprintln!("new veth -> TC programs attached: {attach_latency:?}");
    log_until(&s, 0, &["interface gone", "device=vp200"]);

    // Real pods: a client pod added after the agent started reaches the ClusterIP right away.
    let mut served_after = Vec::new();
    let mut added = Vec::new();
    for _ in 0..3 {
        let pod = s.lab.add_pod(0).expect("add pod");
        let t = Instant::now();
        while tcp_request(&pod.ns, VIP, 80, Duration::from_millis(100)).is_err() {
            // Far below the 600 s rescan: served because its link notification attached it.
            assert!(t.elapsed() < Duration::from_secs(5), "new pod {} not served", pod.name);
        }
        served_after.push(t.elapsed());
        added.push(pod);
    }
    eprintln!("new pod -> first ClusterIP connection served: {served_after:?}");
    let devices = device_list(&s, 0);
    for pod in &added {
        assert_eq!(programs_on(&devices, &pod.host_veth), ["kp_tc_from_pod", "kp_tc_to_pod"]);
    }
    metrics_until(&s, 0, "6 pod devices", |b| {
        metric(b, "kproxy_devices_attached{kind=\"pod\"}") == Some(6.0)
    });

    // Removed pods: logged, no longer attached, counted out, no stale pins.
    for pod in &added {
        s.lab.remove_pod(pod).expect("remove pod");
    }
    for pod in &added {
        log_until(&s, 0, &["interface gone", &format!("device={}", pod.host_veth)]);
    }
    metrics_until(&s, 0, "3 pod devices", |b| {
        metric(b, "kproxy_devices_attached{kind=\"pod\"}") == Some(3.0)
    });
    let devices = device_list(&s, 0);
    let listed: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["eth0", "vp0", "vp1", "vp2"], "{devices}");
    assert_eq!(devices["stale_link_pins"], serde_json::json!([]), "{devices}");
    // The pods that stayed are still served.
    assert!(tcp_request(&s.lab.pod(0, 1).unwrap().ns, VIP, 80, T).is_ok());
}

/// Deletes node `i`'s underlay veth (its `eth0` goes with it) and creates it again with the same
/// names, address and routes: a new interface index, no programs on it.
fn recreate_node_eth0(lab: &Lab, i: usize) {
    let node = lab.node(i);
    let underlay = lab.underlay_ns();
    let port = format!("n{i}");
    let addr = format!("{}/{}", node.ip, lab::UNDERLAY_PREFIX_LEN);
    exec(&underlay, &["ip", "link", "del", &port]).unwrap();
    let veth = ["ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns"];
    exec(&underlay, &[&veth[..], &[node.ns.as_str()]].concat()).unwrap();
    exec(&underlay, &["ip", "link", "set", &port, "master", "br0", "up"]).unwrap();
    exec(&underlay, &["ethtool", "-K", &port, "tx", "off"]).unwrap();
    exec(&node.ns, &["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
    exec(&node.ns, &["ip", "addr", "add", &addr, "dev", "eth0"]).unwrap();
    exec(&node.ns, &["ip", "link", "set", "eth0", "up"]).unwrap();
    let client = lab::CLIENT_IP.to_string();
    exec(&node.ns, &["ip", "route", "add", "default", "via", &client]).unwrap();
    for other in lab.nodes().iter().filter(|n| n.index != i) {
        let dst = format!("{}/24", other.pod_cidr);
        let via = other.ip.to_string();
        exec(&node.ns, &["ip", "route", "add", &dst, "via", &via, "dev", "eth0"]).unwrap();
    }
}

/// A NodePort device deleted and created again (same name, new index) gets XDP and TC again.
#[test]
fn recreated_nodeport_device_is_attached_again() {
    let s = Setup::with_args("extdev", &["--device-rescan-secs", "600"]);
    let mut svc = web("np", VIP);
    svc.svc_type = SvcType::NodePort;
    svc.ports[0] = svc.ports[0].clone().node_port(30080);
    s.put(&svc, vec![s.ep(1, 0)]);
    let client = s.lab.client_ns();
    let node_ip = s.lab.node(0).ip;
    let deadline = Instant::now() + Duration::from_secs(15);
    while tcp_request(&client, node_ip, 30080, T).is_err() {
        assert!(Instant::now() < deadline, "NodePort never served");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = device_list(&s, 0);
    assert_eq!(programs_on(&before, "eth0"), ["kp_xdp_ext", "kp_tc_ext_xdp"], "{before}");

    recreate_node_eth0(&s.lab, 0);
    let t = Instant::now();
    while tcp_request(&client, node_ip, 30080, Duration::from_millis(200)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(5), "NodePort not served after eth0 came back");
    }
    eprintln!("eth0 recreated -> NodePort served: {:?}", t.elapsed());
    log_until(&s, 0, &["NodePort device gone", "device=eth0"]);
    let after = device_list(&s, 0);
    assert_eq!(programs_on(&after, "eth0"), ["kp_xdp_ext", "kp_tc_ext_xdp"], "{after}");
    let index = |v: &serde_json::Value| {
        v["devices"].as_array().unwrap().iter().find(|d| d["name"] == "eth0").unwrap()["ifindex"]
            .as_u64()
            .unwrap()
    };
    assert_ne!(index(&before), index(&after), "eth0 was not recreated");
    log_until(&s, 0, &["programs attached", "device=eth0", &format!("ifindex={}", index(&after))]);
    assert_eq!(after["stale_link_pins"], serde_json::json!([]), "{after}");
    for _ in 0..10 {
        let r = tcp_request(&client, node_ip, 30080, T).expect("NodePort");
        assert_eq!(r.server_pod, "node-1-pod-0");
    }
}

/// A full map is reported: a metric by map, its fill level, a log line naming the service; the
/// services already programmed keep working and the one that did not fit is not half-written.
/// Restarted with a larger `--max-backends`, the agent copies the map into one of that capacity:
/// the service that did not fit is served, a connection open across the restart goes on.
#[test]
fn full_backend_map_is_counted_by_map_and_keeps_the_rest_serving() {
    let mut s =
        Setup::with_args("full", &["--max-backends", "3", "--map-stats-interval-secs", "1"]);
    s.put(&web("web", VIP), vec![s.ep(0, 0), s.ep(1, 0)]);
    let pod = s.lab.pod(0, 2).unwrap().ns.clone();
    wait_served(&pod, VIP);
    // Two more backends: one fits, the second does not.
    s.put(&web("web2", VIP2), vec![s.ep(0, 1), s.ep(1, 1)]);
    let metrics = metrics_until(&s, 0, "a full backends map", |b| {
        metric(b, "kproxy_map_full_errors_total{map=\"backends\"}").is_some_and(|v| v >= 1.0)
            && metric(b, "kproxy_map_pressure{map=\"backends\"}").is_some_and(|v| v > 0.6)
    });
    assert_eq!(metric(&metrics, "kproxy_map_capacity{map=\"backends\"}"), Some(3.0));
    assert_eq!(metric(&metrics, "kproxy_map_full_errors_total{map=\"services\"}"), Some(0.0));
    // The sync failed, as a failed nftables transaction fails kube-proxy's.
    let failures = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}";
    assert!(metric(&metrics, failures).is_some_and(|v| v >= 1.0), "{metrics}");
    log_until(&s, 0, &["default/web2", "is full"]);
    log_until(&s, 0, &["sync failed; the next sync is a full one"]);
    for _ in 0..5 {
        tcp_request(&pod, VIP, 80, T).expect("the service that fit is still served");
    }
    assert!(
        tcp_request(&pod, VIP2, 80, Duration::from_millis(500)).is_err(),
        "the service that did not fit answers"
    );

    let (mut session, first) = TcpSession::connect(&pod, VIP, 80, T).expect("session");
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("stop");
    let at = s.extra.iter().position(|a| a == "--max-backends").unwrap();
    s.extra[at + 1] = "16".into();
    s.agents[0] = Some(s.start_agent(0));
    assert_eq!(max_entries(&s, 0, kproxy_common::names::BACKENDS4), 16);
    log_until(&s, 0, &["map resized, its entries copied", "map=\"kp_be4\"", "from=3", "to=16"]);
    assert_eq!(session.request().expect("across the resize"), first);
    wait_served(&pod, VIP2);
    for _ in 0..5 {
        tcp_request(&pod, VIP, 80, T).expect("the service that fit before");
    }
}

/// An external device that went away while no agent ran leaves its link pins (XDP, and tcx on
/// Linux 6.6+); the next agent removes them.
#[test]
fn link_pins_of_a_device_gone_while_the_agent_was_down_are_removed() {
    let mut s = Setup::new("stalepin");
    let ns = s.lab.node(0).ns.clone();
    exec(&ns, &["ip", "link", "add", "kpx0", "type", "veth", "peer", "name", "kpx1"]).unwrap();
    exec(&ns, &["ip", "link", "set", "kpx0", "up"]).unwrap();
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("stop");
    let opts = AgentOpts {
        manifests_dir: s.dir.path().to_path_buf(),
        extra_args: vec!["--nodeport-devices".into(), "kpx0".into()],
        ..Default::default()
    };
    s.agents[0] = Some(s.lab.spawn_agent(0, &opts).expect("agent"));
    log_until(&s, 0, &["programs attached", "device=kpx0"]);
    assert_eq!(programs_on(&device_list(&s, 0), "kpx0"), ["kp_xdp_ext", "kp_tc_ext_xdp"]);
    s.agents[0].take().unwrap().stop(Duration::from_secs(5)).expect("stop");
    exec(&ns, &["ip", "link", "del", "kpx0"]).unwrap();
    // With tcx (Linux 6.6+) the TC program's link is pinned too.
    let stale = if kproxy::dataplane::features::tcx() {
        serde_json::json!(["tcx-ingress-kpx0", "xdp-kpx0"])
    } else {
        serde_json::json!(["xdp-kpx0"])
    };
    assert_eq!(device_list(&s, 0)["stale_link_pins"], stale);
    s.agents[0] = Some(s.start_agent(0));
    log_until(&s, 0, &["removed the link pins of a device", "device=kpx0", "why=\"gone\""]);
    let devices = device_list(&s, 0);
    assert_eq!(devices["stale_link_pins"], serde_json::json!([]), "{devices}");
    assert!(!s.lab.pin_path(0).join("v1/links/tcx-ingress-kpx0").exists());
    assert_eq!(programs_on(&devices, "eth0"), ["kp_xdp_ext", "kp_tc_ext_xdp"]);
}

/// A sync whose map write fails fails as kube-proxy's does, end to end: the change stays
/// pending, `/healthz` and `/livez` answer 503 once it has waited twice `--sync-period-secs`
/// (kube-proxy's health timeout, 2 × its sync period), the health check node port keeps what the
/// last good sync left (its local endpoint), and once the map has room the change is programmed
/// and health is back.
#[test]
fn failed_sync_fails_health_after_twice_the_sync_period_and_keeps_health_checks() {
    let s = Setup::with_args("failsync", &["--max-backends", "3", "--sync-period-secs", "3"]);
    let mut svc = web("np", VIP);
    svc.svc_type = SvcType::NodePort;
    svc.external_local = true;
    svc.health_check_node_port = Some(32000);
    svc.ports[0] = svc.ports[0].clone().node_port(30180);
    s.put(&svc, vec![s.ep(0, 0)]);
    let (client, node0) = (s.lab.client_ns(), s.lab.node(0).ip);
    let node_ns = s.lab.node(0).ns.clone();
    let health_check = || {
        let (code, body) = try_http_get(&client, node0, 32000, "/").unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (code, v["localEndpoints"].as_u64(), v["serviceProxyHealthy"].as_bool())
    };
    let ok =
        lab::eventually(
            Duration::from_secs(15),
            Duration::from_millis(200),
            || match health_check() {
                (200, Some(1), Some(true)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    assert!(ok.is_ok(), "health check node port never served: {ok:?}");
    assert_eq!(http_get(&node_ns, node0, 10256, "/healthz").0, 200);

    // Three new remote backends with the old one still in place: the backends map (3) is full.
    s.put(&svc, vec![s.ep(1, 0), s.ep(1, 1), s.ep(1, 2)]);
    log_until(&s, 0, &["sync failed; the next sync is a full one"]);
    // The health check node port keeps the last good state (one local endpoint; the change would
    // leave none), healthy until the change has waited the health timeout.
    let (_, local, _) = health_check();
    assert_eq!(local, Some(1), "the failed sync's health checks were taken");
    let unhealthy = lab::eventually(Duration::from_secs(20), Duration::from_millis(250), || {
        let healthz = http_get(&node_ns, node0, 10256, "/healthz").0;
        let livez = http_get(&node_ns, node0, 10256, "/livez").0;
        match (healthz, livez, health_check()) {
            (503, 503, (503, Some(1), Some(false))) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(unhealthy.is_ok(), "health after a failed sync: {unhealthy:?}");
    let metrics = metrics_until(&s, 0, "failed syncs", |b| {
        metric(b, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}")
            .is_some_and(|v| v >= 1.0)
    });
    assert!(
        metric(&metrics, "kubeproxy_proxy_healthz_total{code=\"503\"}").is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    // The service itself kept its programmed backend.
    let pod = s.lab.pod(0, 2).unwrap().ns.clone();
    assert_eq!(tcp_request(&pod, VIP, 80, T).expect("served").server_pod, "node-0-pod-0");

    // A change that fits: programmed, healthy again, the health check follows (no local
    // endpoint any more).
    s.put(&svc, vec![s.ep(1, 0)]);
    let recovered = lab::eventually(Duration::from_secs(20), Duration::from_millis(250), || {
        let healthz = http_get(&node_ns, node0, 10256, "/healthz").0;
        let livez = http_get(&node_ns, node0, 10256, "/livez").0;
        match (healthz, livez, health_check()) {
            (200, 200, (503, Some(0), Some(true))) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(recovered.is_ok(), "health after the map had room: {recovered:?}");
    assert_eq!(tcp_request(&pod, VIP, 80, T).expect("served").server_pod, "node-1-pod-0");
}
