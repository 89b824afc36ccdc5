//! Safe on a real cluster, agent side, end to end in the lab: bad input never withdraws what
//! works (an invalid edit of a live Service or EndpointSlice, from manifests or from the
//! Kubernetes API; a huge manifest), a newer service cannot take a live one's frontend, UDP
//! flows leave a backend that stops serving while TCP connections stay, an agent with empty
//! maps bootstraps through the API server's real address, ServiceCIDR objects guard their
//! networks, two connections from one client port through two ClusterIPs to one backend both
//! work, a node address used as an externalIP keeps its other ports for the node, and a node
//! firewall that drops invalid packets does not break ClusterIPs.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use kproxy_tests::{
    apiserver::{ApiServer, Binder, KubeConfigFile},
    client::{RequestError, TcpSession, tcp_request, udp_request, udp_request_here},
    lab::{self, Agent, AgentOpts, CLIENT_IP, Lab, LabSpec, SERVER_PORT, Wiring},
    manifests::{Endpoint, ManifestDir, Port, Service, Slice, SvcType},
};

/// Per-request time limit.
const T: Duration = Duration::from_secs(2);
/// How long a change may take to show (the agent polls manifests every 500 ms).
const CONVERGE: Duration = Duration::from_secs(15);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const VIP3: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);

/// A lab with one agent per node on a manifest directory (or on `extra` arguments only).
struct Setup {
    agents: Vec<Agent>,
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
        Setup { agents: Vec::new(), dir, lab }
    }

    /// Starts the agents on the manifest directory, with `extra` arguments.
    fn start_manifest_agents(&mut self, extra: &[&str]) {
        let opts = AgentOpts {
            manifests_dir: self.dir.path().to_path_buf(),
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        self.agents = self.lab.start_agents(&opts).expect("agents");
    }

    fn ep(&self, i: usize, j: usize) -> Endpoint {
        let p = self.lab.pod(i, j).unwrap();
        Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
    }

    fn pod_ns(&self, i: usize, j: usize) -> String {
        self.lab.pod(i, j).unwrap().ns.clone()
    }

    fn put(&self, svc: &Service, eps: Vec<Endpoint>) {
        self.dir.put(svc, &[Slice::for_service(svc, eps)]).unwrap();
    }

    fn log(&self, node: usize) -> String {
        self.agents.iter().find(|a| a.node == node).expect("an agent on that node").log_text()
    }

    /// Waits until node `node`'s agent log contains every one of `needles` (in one line).
    fn wait_log_line(&self, node: usize, needles: &[&str]) -> String {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let log = self.log(node);
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no log line with {needles:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for a in &self.agents {
                eprintln!("--- agent node {} ---\n{}", a.node, a.log_text());
            }
        }
        self.agents.clear();
        for i in 0..self.lab.nodes().len() {
            let _ = self.lab.cleanup(i);
        }
    }
}

/// Waits until every one of `n` TCP requests to `addr:port` from `ns` is answered by a pod in
/// `want`.
fn wait_served_by(ns: &str, addr: Ipv4Addr, port: u16, want: &[&str]) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ok = (0..6).all(|_| {
            tcp_request(ns, addr, port, T).is_ok_and(|r| want.contains(&r.server_pod.as_str()))
        });
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}:{port} never served by {want:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` TCP requests to `addr:port` from `ns`, each answered by a pod in `want`.
fn assert_served_by(ns: &str, addr: Ipv4Addr, port: u16, want: &[&str], what: &str) {
    for _ in 0..10 {
        match tcp_request(ns, addr, port, T) {
            Ok(r) => assert!(want.contains(&r.server_pod.as_str()), "{what}: answered by {r:?}"),
            Err(e) => panic!("{what}: {addr}:{port} not served any more: {e}"),
        }
    }
}

fn web_lb() -> Service {
    let mut svc = Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    svc.svc_type = SvcType::LoadBalancer;
    svc.ports[0].node_port = Some(30080);
    svc.lb_ips = vec![LB_IP];
    svc
}

/// `clusterIP: 999.1.1.1` on a live LoadBalancer service, then a slice port of 0: both updates
/// are refused with a warning naming the file, the object, the field and the value; the
/// service keeps being served on every frontend as before.
#[test]
fn invalid_edits_of_live_objects_keep_their_last_valid_version() {
    let mut s = Setup::new("invalid");
    s.start_manifest_agents(&[]);
    let svc = web_lb();
    s.put(&svc, vec![s.ep(0, 0), s.ep(1, 0)]);
    let pods = ["node-0-pod-0", "node-1-pod-0"];
    let (pod, client) = (s.pod_ns(0, 1), s.lab.client_ns());
    wait_served_by(&pod, VIP, 80, &pods);
    wait_served_by(&client, LB_IP, 80, &pods);
    let file = s.dir.path().join("web.yaml").display().to_string();

    let slice = Slice::for_service(&svc, vec![s.ep(0, 0), s.ep(1, 0)]);
    let bad_svc = svc.to_yaml().replace(&VIP.to_string(), "999.1.1.1");
    s.dir.write("web.yaml", &[bad_svc, slice.to_yaml()]).unwrap();
    s.wait_log_line(
        0,
        &["Service default/web", &file, "spec.clusterIP", "999.1.1.1", "last valid"],
    );
    assert_served_by(&pod, VIP, 80, &pods, "ClusterIP after an invalid clusterIP edit");
    assert_served_by(&client, LB_IP, 80, &pods, "LoadBalancer IP after an invalid clusterIP edit");

    let mut bad_slice = slice.clone();
    bad_slice.ports[0].2 = 0;
    s.dir.write("web.yaml", &[svc.to_yaml(), bad_slice.to_yaml()]).unwrap();
    s.wait_log_line(0, &["EndpointSlice default/web-1", &file, "ports[0].port", "last valid"]);
    assert_served_by(&pod, VIP, 80, &pods, "ClusterIP after an invalid slice edit");

    // A valid edit is applied again.
    s.put(&svc, vec![s.ep(1, 0)]);
    wait_served_by(&pod, VIP, 80, &["node-1-pod-0"]);
}

/// The same through the Kubernetes API (the API test server accepts what a real one would
/// refuse, as an admission webhook or an older server could let through).
#[test]
fn invalid_edit_from_the_api_keeps_the_last_valid_version() {
    let mut s = Setup::new("invalidapi");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = start_api(&rt, &s.lab);
    let svc = web_lb();
    apply(&api, &svc, vec![s.ep(0, 0), s.ep(1, 0)]);
    let kubeconfig = KubeConfigFile::write(s.lab.prefix(), &api.url()).unwrap();
    let opts = AgentOpts {
        extra_args: vec!["--kubeconfig".into(), kubeconfig.arg()],
        ..Default::default()
    };
    s.agents = s.lab.start_agents(&opts).expect("agents");
    let pods = ["node-0-pod-0", "node-1-pod-0"];
    let pod = s.pod_ns(0, 1);
    wait_served_by(&pod, VIP, 80, &pods);
    let bad: serde_json::Value =
        serde_saphyr::from_str(&svc.to_yaml().replace(&VIP.to_string(), "999.1.1.1")).unwrap();
    api.apply(bad).unwrap();
    let line = s.wait_log_line(0, &["Service default/web", "spec.clusterIP", "999.1.1.1"]);
    assert!(line.contains("last valid") && !line.contains("(file "), "{line}");
    assert_served_by(&pod, VIP, 80, &pods, "ClusterIP after an invalid clusterIP edit");
    drop(kubeconfig);
}

/// Newer services (no endpoints, named to sort first) claim the live service's ClusterIP:port
/// and, through externalIPs, its LoadBalancer IP: both are refused with a warning naming the two
/// services and counted; the live service keeps its traffic. An externalIP outside
/// `--external-ip-cidrs` is refused too.
#[test]
fn a_newer_service_cannot_take_a_live_frontend() {
    let mut s = Setup::new("collide");
    s.start_manifest_agents(&["--external-ip-cidrs", "198.18.200.0/24"]);
    s.put(&web_lb(), vec![s.ep(0, 0)]);
    let (pod, client) = (s.pod_ns(0, 1), s.lab.client_ns());
    wait_served_by(&pod, VIP, 80, &["node-0-pod-0"]);
    wait_served_by(&client, LB_IP, 80, &["node-0-pod-0"]);

    let same_vip = Service::cluster_ip("aaa-vip", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    s.put(&same_vip, vec![]);
    let mut lb_thief =
        Service::cluster_ip("aaa-lb", VIP2, vec![Port::tcp("http", 80, SERVER_PORT)]);
    lb_thief.external_ips = vec![LB_IP];
    s.put(&lb_thief, vec![]);
    s.wait_log_line(0, &["default/aaa-vip", "198.19.0.10:80/TCP", "default/web", "refused"]);
    s.wait_log_line(0, &["default/aaa-lb", "198.18.200.10:80/TCP", "default/web", "refused"]);
    assert_served_by(&pod, VIP, 80, &["node-0-pod-0"], "ClusterIP claimed by a newer service");
    assert_served_by(&client, LB_IP, 80, &["node-0-pod-0"], "LB IP claimed through externalIPs");
    // The newcomer keeps what is its own.
    assert!(tcp_request(&pod, VIP2, 80, T).is_err_and(|e| e.is_refused()), "no endpoints");
    let metrics = metrics(&s.lab.node(0).ns);
    assert!(
        metrics.contains("kproxy_sync_errors_total{kind=\"frontend_conflict\"} 2"),
        "{metrics}"
    );

    // externalIPs: one inside --external-ip-cidrs, one outside (nothing in the lab routes it).
    let (allowed, outside) = (Ipv4Addr::new(198, 18, 200, 20), Ipv4Addr::new(198, 19, 200, 7));
    let mut ext = Service::cluster_ip("ext", VIP3, vec![Port::tcp("http", 80, SERVER_PORT)]);
    ext.external_ips = vec![allowed, outside];
    s.put(&ext, vec![s.ep(1, 0)]);
    wait_served_by(&pod, allowed, 80, &["node-1-pod-0"]);
    // Programmed in the same sync as the allowed one.
    assert!(
        tcp_request(&pod, outside, 80, T).is_err(),
        "an externalIP outside the CIDRs is served"
    );
    s.wait_log_line(
        0,
        &["default/ext", "spec.externalIPs[1]", "198.19.200.7", "--external-ip-cidrs"],
    );
}

/// The value of `kproxy_packets_total{reason}` in a metrics page.
fn packets(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("kproxy_packets_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// `loadBalancerSourceRanges` restrict the LoadBalancer IP (from outside and from pods) and,
/// with `--load-balancer-source-ranges-node-ports`, the NodePort; an invalid range is named and
/// left out. A ClusterIP on a port the service does not define is rejected (TCP and UDP), an
/// address of `--service-cidr` that no service holds is dropped; each counted by reason.
#[test]
fn source_ranges_and_closed_service_addresses() {
    let mut s = Setup::new("guards");
    let dir = s.dir.path().to_path_buf();
    for (i, extra) in [
        vec!["--service-cidr", "198.19.0.0/16", "--load-balancer-source-ranges-node-ports"],
        vec!["--service-cidr", "198.19.0.0/16"],
    ]
    .into_iter()
    .enumerate()
    {
        let opts = AgentOpts {
            manifests_dir: dir.clone(),
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        s.agents.push(s.lab.start_agent(i, &opts).expect("agent"));
    }
    let mut svc = web_lb();
    svc.ports.push(Port::udp("dns", 53, SERVER_PORT));
    svc.source_ranges = vec!["198.18.250.0/24".into(), "not-a-cidr".into()];
    s.put(&svc, vec![s.ep(0, 0)]);
    let (pod, client) = (s.pod_ns(0, 1), s.lab.client_ns());
    // The ClusterIP is not restricted.
    wait_served_by(&pod, VIP, 80, &["node-0-pod-0"]);
    s.wait_log_line(0, &["default/web", "spec.loadBalancerSourceRanges[1]", "not-a-cidr"]);
    let (n0, n1) = (s.lab.node(0).ip, s.lab.node(1).ip);
    // The client (198.18.0.2) and the pods are outside 198.18.250.0/24.
    for (ns, addr, port, what) in [
        (&client, LB_IP, 80, "client to the LB IP"),
        (&pod, LB_IP, 80, "pod to the LB IP"),
        (&client, n0, 30080, "client to the NodePort of node 0 (NodePorts restricted)"),
    ] {
        let r = tcp_request(ns, addr, port, T);
        assert!(r.as_ref().is_err_and(|e| e.is_timeout()), "{what}: {r:?}");
    }
    // Node 1 runs without the NodePort option.
    wait_served_by(&client, n1, 30080, &["node-0-pod-0"]);
    // The client's network added: served.
    svc.source_ranges = vec!["198.18.0.2/32".into()];
    s.put(&svc, vec![s.ep(0, 0)]);
    wait_served_by(&client, LB_IP, 80, &["node-0-pod-0"]);
    wait_served_by(&client, n0, 30080, &["node-0-pod-0"]);
    let r = tcp_request(&pod, LB_IP, 80, T);
    assert!(r.as_ref().is_err_and(|e| e.is_timeout()), "pod to the LB IP: {r:?}");

    // A port the service does not define: refused at once (TCP RST, ICMP port unreachable).
    let r = tcp_request(&pod, VIP, 81, T);
    assert!(r.as_ref().is_err_and(|e| e.is_refused()), "TCP to an undefined port: {r:?}");
    let r = udp_request(&pod, VIP, 54, T);
    assert!(r.as_ref().is_err_and(|e| e.is_refused()), "UDP to an undefined port: {r:?}");
    // An address of the service CIDR no service holds.
    let r = tcp_request(&pod, Ipv4Addr::new(198, 19, 0, 99), 80, T);
    assert!(r.as_ref().is_err_and(|e| e.is_timeout()), "unallocated service address: {r:?}");
    let m = metrics(&s.lab.node(0).ns);
    assert!(packets(&m, "drop_source_range") >= 4, "{m}");
    assert!(packets(&m, "reject_unknown_port") >= 2, "{m}");
    assert!(packets(&m, "drop_unallocated_service_ip") >= 1, "{m}");
}

/// A node address on an interface that is no NodePort device, used by a service as an
/// externalIP: the service's port goes to the service, every other port is the node's (kube-proxy
/// leaves traffic to a local address alone when no service uses the port); an externalIP that is
/// no node address still rejects the ports its services do not use.
#[test]
fn a_local_address_used_as_external_ip_keeps_its_other_ports_for_the_node() {
    let mut s = Setup::new("localip");
    let node_ns = s.lab.node(0).ns.clone();
    let (local, other) = (Ipv4Addr::new(198, 18, 200, 20), Ipv4Addr::new(198, 18, 200, 21));
    for argv in [
        vec!["ip", "link", "add", "kpvip0", "type", "veth", "peer", "name", "kpvip1"],
        vec!["ip", "addr", "add", "198.18.200.20/32", "dev", "kpvip0"],
        vec!["ip", "link", "set", "kpvip0", "up"],
        vec!["ip", "link", "set", "kpvip1", "up"],
    ] {
        let out = lab::exec(&node_ns, &argv).expect("ip");
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The node's own service on the local address (the link and the listener go with the
    // namespace and the test).
    const NODE_SERVICE_PORT: u16 = 9443;
    let listener =
        lab::in_netns(&node_ns, || std::net::TcpListener::bind((local, NODE_SERVICE_PORT)))
            .expect("netns")
            .expect("listen on the local address");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(b"node\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    s.start_manifest_agents(&[]);
    let mut svc = Service::cluster_ip("ext", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    svc.external_ips = vec![local, other];
    s.put(&svc, vec![s.ep(0, 0)]);
    let client = s.lab.client_ns();
    wait_served_by(&client, local, 80, &["node-0-pod-0"]);
    wait_served_by(&client, other, 80, &["node-0-pod-0"]);
    // Another port of the node's address: the node answers.
    let answer = lab::in_netns(&client, || -> std::io::Result<String> {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect_timeout(&(local, NODE_SERVICE_PORT).into(), T)?;
        c.set_read_timeout(Some(T))?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        Ok(text)
    })
    .expect("netns");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    server.join().unwrap();
    assert_eq!(
        answer.as_deref().ok(),
        Some("node\n"),
        "the node's port on its own address: {answer:?}"
    );
    // The other externalIP is no node address: its unused ports are rejected.
    let r = tcp_request(&client, other, NODE_SERVICE_PORT, T);
    assert!(r.as_ref().is_err_and(|e| e.is_refused()), "an unused port of {other}: {r:?}");
}

/// Two live TCP connections from one pod address and port through two ClusterIPs to the same
/// backend: the second gets another source port on the way (the backend would otherwise see
/// one tuple twice, and the replies of one would be restored to the other's frontend), and both
/// keep working, each answered through its own ClusterIP.
#[test]
fn one_client_port_through_two_cluster_ips_to_one_backend() {
    let mut s = Setup::new("srcport");
    s.start_manifest_agents(&[]);
    let backend = vec![s.ep(1, 0)];
    for (name, vip) in [("one", VIP), ("two", VIP2)] {
        let svc = Service::cluster_ip(name, vip, vec![Port::tcp("http", 80, SERVER_PORT)]);
        s.put(&svc, backend.clone());
    }
    let pod = s.pod_ns(0, 1);
    wait_served_by(&pod, VIP, 80, &["node-1-pod-0"]);
    wait_served_by(&pod, VIP2, 80, &["node-1-pod-0"]);
    // Below the ephemeral range (32768–60999): no probe connection of `wait_served_by` through
    // the other ClusterIP can hold this port's tuple to the backend already (then the first
    // connection would be the one to get another port).
    let src = SocketAddrV4::new(s.lab.pod(0, 1).unwrap().ip, 20080);
    let (mut one, r1) = TcpSession::connect_from(&pod, Some(src), VIP, 80, T).expect("first");
    assert_eq!(r1.client_addr, src, "the first connection keeps the client's port");
    let (mut two, r2) =
        TcpSession::connect_from(&pod, Some(src), VIP2, 80, T).expect("second, same client port");
    assert_eq!(r2.server_pod, "node-1-pod-0");
    assert_eq!(*r2.client_addr.ip(), *src.ip());
    assert_ne!(r2.client_addr.port(), src.port(), "the backend sees another source port");
    for round in 0..5 {
        let a = one.request().unwrap_or_else(|e| panic!("round {round}: first connection: {e}"));
        let b = two.request().unwrap_or_else(|e| panic!("round {round}: second connection: {e}"));
        assert_eq!(a.client_addr, r1.client_addr, "round {round}");
        assert_eq!(b.client_addr, r2.client_addr, "round {round}");
    }
}

/// A node whose firewall drops what its netfilter conntrack finds invalid (`ct state invalid
/// drop` in the forward hook, as distributions' rule sets and CNIs' `--ctstate INVALID -j DROP`
/// do) keeps serving ClusterIPs to its pods, with remote and local backends, TCP, UDP and the
/// backend's ICMP errors, and counts nothing invalid: the replies cross the node's stack as the
/// backend sent them (the stack's conntrack sees one connection, pod ↔ backend, in both
/// directions) and are translated back where they enter the client's pod. Translated before the
/// stack, every reply (frontend → pod) was invalid to it and dropped there.
#[test]
fn a_firewall_dropping_invalid_packets_keeps_cluster_ips_working() {
    let mut s = Setup::new("ctinvalid");
    let node0 = s.lab.node(0).ns.clone();
    for argv in [
        &["nft", "add", "table", "inet", "kpfw"][..],
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "kpfw",
            "filter",
            "{ type filter hook forward priority 0; }",
        ],
        &[
            "nft", "add", "rule", "inet", "kpfw", "filter", "ct", "state", "invalid", "counter",
            "drop",
        ],
    ] {
        lab::exec(&node0, argv).expect("node firewall");
    }
    s.start_manifest_agents(&[]);
    // Port 82 leads to a UDP port nothing listens on: the backend answers port unreachable.
    let ports = vec![
        Port::tcp("http", 80, SERVER_PORT),
        Port::udp("udp", 81, SERVER_PORT),
        Port::udp("closed", 82, 9),
    ];
    let remote = Service::cluster_ip("remote", VIP, ports.clone());
    let local = Service::cluster_ip("local", VIP2, ports);
    s.put(&remote, vec![s.ep(1, 0)]);
    s.put(&local, vec![s.ep(0, 1)]);
    let client = s.pod_ns(0, 0);
    wait_served_by(&client, VIP, 80, &["node-1-pod-0"]);
    wait_served_by(&client, VIP2, 80, &["node-0-pod-1"]);
    for (vip, pod) in [(VIP, "node-1-pod-0"), (VIP2, "node-0-pod-1")] {
        assert_served_by(&client, vip, 80, &[pod], "TCP through the node's firewall");
        let (mut conn, _) = TcpSession::connect_from(&client, None, vip, 80, T).expect("connect");
        for round in 0..5 {
            let r = conn.request().unwrap_or_else(|e| panic!("{vip} round {round}: {e}"));
            assert_eq!(r.server_pod, pod);
        }
        for _ in 0..3 {
            let r = udp_request(&client, vip, 81, T).expect("UDP through the node's firewall");
            assert_eq!(r.server_pod, pod);
        }
        // The backend's ICMP error crosses the stack as it sent it too (related to the pod ↔
        // backend connection) and reaches the client as a refusal, not a time-out.
        let e = udp_request(&client, vip, 82, T).expect_err("nothing listens there");
        assert!(matches!(e, RequestError::Refused), "{vip}:82: {e}");
    }
    let rules =
        lab::exec(&node0, &["nft", "list", "chain", "inet", "kpfw", "filter"]).expect("nft");
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(rules.contains("counter packets 0 bytes 0 drop"), "invalid packets:\n{rules}");
}

/// A 50 MB manifest is refused unread with one short message, a huge bad value is quoted short,
/// and an unrelated valid change is applied.
#[test]
fn huge_manifests_are_refused_and_quoted_short() {
    let mut s = Setup::new("huge");
    s.start_manifest_agents(&[]);
    let pod = s.pod_ns(0, 1);
    // 50 MB of one service with a bad 50 MB name-like value.
    let huge = web_lb().to_yaml().replace("name: web", &format!("name: {}", "w".repeat(50 << 20)));
    s.dir.write("huge.yaml", &[huge]).unwrap();
    // Under the limit, a 1 MB bad clusterIP.
    let bad = Service::cluster_ip("bad", VIP2, vec![Port::tcp("http", 80, SERVER_PORT)])
        .to_yaml()
        .replace(&VIP2.to_string(), &"a".repeat(1 << 20));
    s.dir.write("bad.yaml", &[bad]).unwrap();
    let web = Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    s.put(&web, vec![s.ep(0, 0)]);
    wait_served_by(&pod, VIP, 80, &["node-0-pod-0"]);
    s.wait_log_line(0, &["huge.yaml", "over the limit"]);
    s.wait_log_line(0, &["Service default/bad", "spec.clusterIP", "(1048576 bytes)"]);
    for a in &s.agents {
        let log = a.log_text();
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 2048, "a log line of {longest} bytes on node {}", a.node);
    }
}

/// A UDP flow (same client port) stays on its backend while it serves, and moves to another
/// backend once its backend is not ready any more; a TCP connection to the same backend stays.
#[test]
fn udp_flows_leave_a_backend_that_stops_serving_and_tcp_stays() {
    let mut s = Setup::new("udpflow");
    s.start_manifest_agents(&[]);
    let svc = Service::cluster_ip(
        "echo",
        VIP,
        vec![Port::udp("udp", 53, SERVER_PORT), Port::tcp("tcp", 80, SERVER_PORT)],
    );
    s.put(&svc, vec![s.ep(0, 0), s.ep(1, 0)]);
    let pod = s.pod_ns(0, 2);
    wait_served_by(&pod, VIP, 80, &["node-0-pod-0", "node-1-pod-0"]);
    let src = SocketAddrV4::new(s.lab.pod(0, 2).unwrap().ip, 20053);
    let udp = || {
        lab::in_netns(&pod, || udp_request_here(Some(src), VIP, 53, T))
            .expect("netns")
            .map(|r| r.server_pod)
    };
    let first = lab::eventually(CONVERGE, Duration::from_millis(200), udp).expect("UDP served");
    for _ in 0..5 {
        assert_eq!(udp().expect("pinned flow"), first, "the flow stays on its backend");
    }
    // A TCP connection to the same backend.
    let (mut session, tcp_first) = lab::eventually(CONVERGE, Duration::from_millis(100), || {
        match TcpSession::connect(&pod, VIP, 80, T) {
            Ok((session, r)) if r.server_pod == first => Ok((session, r)),
            Ok((_, r)) => Err(format!("on {}", r.server_pod)),
            Err(e) => Err(e.to_string()),
        }
    })
    .expect("a TCP connection to the same backend");
    let (i, other) =
        if first == "node-0-pod-0" { (0, "node-1-pod-0") } else { (1, "node-0-pod-0") };
    let eps = if i == 0 {
        vec![s.ep(0, 0).not_ready(), s.ep(1, 0)]
    } else {
        vec![s.ep(0, 0), s.ep(1, 0).not_ready()]
    };
    s.put(&svc, eps);
    let moved = lab::eventually(CONVERGE, Duration::from_millis(200), || match udp() {
        Ok(p) if p == other => Ok(p),
        Ok(p) => Err(format!("still on {p}")),
        Err(e) => Err(e.to_string()),
    });
    assert!(moved.is_ok(), "the UDP flow stayed on its unready backend: {moved:?}");
    assert_eq!(session.request().expect("TCP connection stays"), tcp_first);
    let m = metrics(&s.lab.node(0).ns);
    let deleted = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} ",
            )
        })
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(deleted.is_some_and(|n| n >= 1), "{m}");
}

/// After a reboot the maps are empty and the `kubernetes` ClusterIP answers nothing until the
/// agent programs it: with `--api-server` at the API server's real address the agent starts
/// anyway, and then ClusterIPs work, the `kubernetes` one included.
#[test]
fn agent_with_empty_maps_bootstraps_through_the_api_servers_real_address() {
    let mut s = Setup::new("bootstrap");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = start_api(&rt, &s.lab);
    // The kubernetes service: ClusterIP 198.19.0.1:443 → the API server in the client namespace.
    let kubernetes_ip = Ipv4Addr::new(198, 19, 0, 1);
    let kubernetes =
        Service::cluster_ip("kubernetes", kubernetes_ip, vec![Port::tcp("https", 443, API_PORT)]);
    let endpoint = Endpoint::ready(CLIENT_IP, "control-plane", "kube-apiserver");
    apply(&api, &kubernetes, vec![endpoint]);
    let web = Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    apply(&api, &web, vec![s.ep(0, 0), s.ep(1, 0)]);
    // The in-cluster view: the API server at the kubernetes ClusterIP.
    let kubeconfig =
        KubeConfigFile::write(s.lab.prefix(), &format!("http://{kubernetes_ip}:443")).unwrap();
    let opts = AgentOpts {
        extra_args: vec!["--kubeconfig".into(), kubeconfig.arg(), "--api-server".into(), api.url()],
        ..Default::default()
    };
    s.agents = s.lab.start_agents(&opts).expect("agents");
    let pod = s.pod_ns(1, 1);
    wait_served_by(&pod, VIP, 80, &["node-0-pod-0", "node-1-pod-0"]);
    // And the kubernetes ClusterIP reaches the API server (which answers the pod's address
    // through node 1).
    let route = ["ip", "route", "add", "198.18.101.0/24", "via", &lab::node_ip(1).to_string()]
        .map(String::from);
    let out = lab::exec(&s.lab.client_ns(), &route).expect("ip route");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = lab::in_netns(&pod, || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect_timeout(&(kubernetes_ip, 443).into(), T)?;
        c.set_read_timeout(Some(T))?;
        write!(c, "GET /api/v1/services HTTP/1.1\r\nHost: x\r\n\r\n")?;
        // The test server keeps the connection open: read until the list is in.
        let (mut text, mut buf) = (String::new(), [0u8; 4096]);
        while !text.contains("ServiceList") {
            match c.read(&mut buf)? {
                0 => break,
                n => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        std::io::Result::Ok(text)
    })
    .expect("netns")
    .expect("the kubernetes ClusterIP answers");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("ServiceList"), "{answer}");
    drop(kubeconfig);
}

/// `networking.k8s.io/v1` ServiceCIDR objects are service CIDRs together with `--service-cidr`:
/// an address of either that no service holds is dropped (counted); a network whose object is
/// deleted is not guarded any more, a new object's is; a bad value is a warning naming the object
/// and the value. Against an API server without ServiceCIDRs only `--service-cidr` counts, and
/// one line says so.
#[test]
fn service_cidr_objects_from_the_api_are_service_cidrs() {
    let mut s = Setup::new("svccidr");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = start_api(&rt, &s.lab);
    let cidr = |name: &str, cidrs: &[&str]| {
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                           "metadata": {"name": name}, "spec": {"cidrs": cidrs}})
    };
    api.apply(cidr("kubernetes", &["198.19.1.0/24", "198.19.2.0/33", "fd00:10::/108"])).unwrap();
    let web = Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    apply(&api, &web, vec![s.ep(0, 0), s.ep(1, 0)]);
    let kubeconfig = KubeConfigFile::write(s.lab.prefix(), &api.url()).unwrap();
    let opts = AgentOpts {
        extra_args: ["--kubeconfig", &kubeconfig.arg(), "--service-cidr", "198.19.0.0/24"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    // Node 1's agent meets an API server without ServiceCIDRs, node 0's one with them.
    api.serve_service_cidrs(false);
    s.agents.push(s.lab.start_agent(1, &opts).expect("agent 1"));
    s.wait_log_line(1, &["serves no networking.k8s.io/v1 ServiceCIDR"]);
    api.serve_service_cidrs(true);
    s.agents.push(s.lab.start_agent(0, &opts).expect("agent 0"));
    let (pod0, pod1) = (s.pod_ns(0, 1), s.pod_ns(1, 1));
    wait_served_by(&pod0, VIP, 80, &["node-0-pod-0", "node-1-pod-0"]);
    wait_served_by(&pod1, VIP, 80, &["node-0-pod-0", "node-1-pod-0"]);
    s.wait_log_line(0, &["ServiceCIDR kubernetes", "spec.cidrs[1]", "198.19.2.0/33"]);

    // Whether a TCP request from `pod` on `node` to `addr` is dropped as an unallocated service
    // address (the counter grows; the request gets no answer).
    let dropped = |node: usize, pod: &str, addr: Ipv4Addr| {
        let ns = s.lab.node(node).ns.clone();
        let before = packets(&metrics(&ns), "drop_unallocated_service_ip");
        let r = tcp_request(pod, addr, 80, T);
        let after = packets(&metrics(&ns), "drop_unallocated_service_ip");
        if after > before {
            assert!(
                r.as_ref().is_err_and(|e| e.is_timeout()),
                "{addr} counted and answered: {r:?}"
            );
        }
        after > before
    };
    let (flag_addr, object_addr) = (Ipv4Addr::new(198, 19, 0, 99), Ipv4Addr::new(198, 19, 1, 99));
    assert!(dropped(0, &pod0, flag_addr), "--service-cidr's network on node 0");
    assert!(dropped(0, &pod0, object_addr), "the ServiceCIDR's network on node 0");
    assert!(dropped(1, &pod1, flag_addr), "--service-cidr's network on node 1");
    assert!(!dropped(1, &pod1, object_addr), "node 1's API server has no ServiceCIDRs");

    // The object deleted: its network is not guarded any more; a new object's network is.
    assert!(api.delete("ServiceCIDR", "", "kubernetes"));
    api.apply(cidr("extra", &["198.19.3.0/24"])).unwrap();
    let new_addr = Ipv4Addr::new(198, 19, 3, 99);
    lab::eventually(CONVERGE, Duration::from_millis(200), || {
        if dropped(0, &pod0, new_addr) { Ok(()) } else { Err("not dropped yet") }
    })
    .expect("the new ServiceCIDR's network guarded");
    assert!(!dropped(0, &pod0, object_addr), "the deleted ServiceCIDR's network");
    assert!(dropped(0, &pod0, flag_addr), "--service-cidr's network stays");
    drop(kubeconfig);
}

/// Port of the API test server in the client namespace.
const API_PORT: u16 = 16443;

/// The API test server in the client namespace, where the nodes reach it on the underlay.
fn start_api(rt: &tokio::runtime::Runtime, lab: &Lab) -> ApiServer {
    let client_ns = lab.client_ns();
    let bind: Binder = Arc::new(move || {
        lab::in_netns(&client_ns, || std::net::TcpListener::bind((CLIENT_IP, API_PORT)))
            .map_err(std::io::Error::other)?
    });
    rt.block_on(ApiServer::start_with(bind)).expect("api server")
}

fn apply(api: &ApiServer, svc: &Service, eps: Vec<Endpoint>) {
    for y in [svc.to_yaml(), Slice::for_service(svc, eps).to_yaml()] {
        let v: serde_json::Value = serde_saphyr::from_str(&y).unwrap();
        api.apply(v).unwrap();
    }
}

/// `/metrics` of the agent in namespace `ns`.
fn metrics(ns: &str) -> String {
    lab::in_netns(ns, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, 10249).into(), T)
            .expect("metrics");
        s.set_read_timeout(Some(T)).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
    .expect("netns")
}
