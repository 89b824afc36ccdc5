//! The agent applies changes when their notifications arrive, not on a timer (root required):
//! each test runs the agent with `--poll-interval-ms` and `--sync-period-secs` of a day, so
//! neither the fallback polling nor the periodic resync can pick a change up, and checks that
//! the change reaches the datapath anyway: a manifest file written, changed and removed
//! (inotify), a watch event of the Kubernetes API (kube-rs watch against the test API server),
//! and a new address on the NodePort device (netlink address notifications).
use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use kproxy_tests::{
    apiserver::{ApiServer, Binder, KubeConfigFile},
    client::tcp_request,
    lab::{self, Agent, AgentOpts, CLIENT_IP, Lab, LabSpec, SERVER_PORT, exec},
    manifests::{Endpoint, ManifestDir, Port, Service, Slice, SvcType},
};

const T: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// A second address given to node 0's NodePort device during the test (on the lab's underlay).
const EXTRA_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
/// A day: no periodic read or resync happens while a test runs.
const NO_POLLING: [&str; 4] = ["--poll-interval-ms", "86400000", "--sync-period-secs", "86400"];

fn root_lab() -> Lab {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let mut lab =
        Lab::up(LabSpec { nodes: 2, pods_per_node: 1, ..Default::default() }).expect("lab");
    lab.start_servers().expect("servers");
    lab
}

fn ep(lab: &Lab, i: usize) -> Endpoint {
    let p = lab.pod(i, 0).expect("pod");
    Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
}

fn web() -> Service {
    let mut svc = Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, SERVER_PORT)]);
    svc.svc_type = SvcType::NodePort;
    svc.ports[0] = svc.ports[0].clone().node_port(30080);
    svc
}

/// Waits (up to 20 s) until a request from `ns` to `addr:port` is answered by `want` (`None`:
/// until it fails).
fn until(ns: &str, addr: Ipv4Addr, port: u16, want: Option<&str>, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = tcp_request(ns, addr, port, T).ok().map(|r| r.server_pod);
        if got.as_deref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}:{port} from {ns}: {got:?} instead of {want:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_agent(lab: &Lab, dir: Option<&ManifestDir>, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = NO_POLLING.iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let opts = AgentOpts {
        manifests_dir: dir.map(|d| d.path().to_path_buf()).unwrap_or_default(),
        extra_args: args,
        ..Default::default()
    };
    lab.start_agent(0, &opts).expect("agent")
}

fn cleanup(lab: Lab, agent: Agent) {
    drop(agent);
    let _ = lab.cleanup(0);
    lab.down().expect("lab down");
}

#[test]
fn manifest_changes_apply_without_polling() {
    let lab = root_lab();
    let dir = ManifestDir::new(&format!("events-{}", lab.prefix())).expect("dir");
    let agent = start_agent(&lab, Some(&dir), &[]);
    let pod = lab.pod(0, 0).expect("pod").ns.clone();
    let svc = web();
    dir.put(&svc, &[Slice::for_service(&svc, vec![ep(&lab, 1)])]).expect("write");
    until(&pod, VIP, 80, Some("node-1-pod-0"), &agent);
    dir.put(&svc, &[Slice::for_service(&svc, vec![ep(&lab, 0)])]).expect("rewrite");
    until(&pod, VIP, 80, Some("node-0-pod-0"), &agent);
    dir.remove("web.yaml").expect("remove");
    until(&pod, VIP, 80, None, &agent);
    cleanup(lab, agent);
}

#[test]
fn kubernetes_watch_events_apply_without_polling() {
    let lab = root_lab();
    // The API server runs in the client namespace, where the node reaches it on the underlay.
    let client_ns = lab.client_ns();
    let bind: Binder = Arc::new(move || {
        lab::in_netns(&client_ns, || std::net::TcpListener::bind((CLIENT_IP, 16443)))
            .map_err(std::io::Error::other)?
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let api = rt.block_on(ApiServer::start_with(bind)).expect("api server");
    let kubeconfig = KubeConfigFile::write(lab.prefix(), &api.url()).expect("kubeconfig");
    let apply = |svc: &Service, eps: Vec<Endpoint>| {
        for y in [svc.to_yaml(), Slice::for_service(svc, eps).to_yaml()] {
            let v: serde_json::Value = serde_saphyr::from_str(&y).expect("yaml");
            api.apply(v).expect("apply");
        }
    };
    let svc = web();
    apply(&svc, vec![ep(&lab, 1)]);
    let agent = start_agent(&lab, None, &["--kubeconfig", &kubeconfig.arg()]);
    let pod = lab.pod(0, 0).expect("pod").ns.clone();
    // The initial list, then a watch event.
    until(&pod, VIP, 80, Some("node-1-pod-0"), &agent);
    apply(&svc, vec![ep(&lab, 0)]);
    until(&pod, VIP, 80, Some("node-0-pod-0"), &agent);
    assert!(api.delete("Service", "default", "web"));
    until(&pod, VIP, 80, None, &agent);
    cleanup(lab, agent);
    drop(api);
}

#[test]
fn node_address_changes_apply_without_polling() {
    let lab = root_lab();
    let dir = ManifestDir::new(&format!("events-addr-{}", lab.prefix())).expect("dir");
    let svc = web();
    dir.put(&svc, &[Slice::for_service(&svc, vec![ep(&lab, 0)])]).expect("write");
    let agent = start_agent(&lab, Some(&dir), &[]);
    let client = lab.client_ns();
    until(&client, lab.node(0).ip, 30080, Some("node-0-pod-0"), &agent);
    // A new address on the NodePort device: a NodePort frontend on it appears.
    let node = lab.node(0).ns.clone();
    let addr = format!("{EXTRA_NODE_IP}/24");
    exec(&node, &["ip", "addr", "add", &addr, "dev", "eth0"]).expect("ip addr add");
    until(&client, EXTRA_NODE_IP, 30080, Some("node-0-pod-0"), &agent);
    let _ = exec(&node, &["ip", "addr", "del", &addr, "dev", "eth0"]);
    cleanup(lab, agent);
}
