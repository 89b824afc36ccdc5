//! Dual stack end to end in the lab: a one-node dual-stack lab ([`LabSpec::ipv6`]), one agent
//! reading a dual-stack Service from manifests or from the Kubernetes API, and a pod reaching it
//! over both ClusterIPs with real sockets. Everything lives in the lab's namespaces and goes with the lab, also on failure.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, TcpStream},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use kproxy_tests::{
    apiserver::{ApiServer, Binder, KubeConfigFile},
    client::{RequestError, tcp_request, tcp_request6},
    lab::{self, AgentOpts, CLIENT_IP, Lab, LabSpec, Pod, SERVER_PORT, exec, in_netns},
    manifests::ManifestDir,
};

const T: Duration = Duration::from_secs(2);
const CIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 60);
const CIP6: &str = "2001:2:ff::60";
/// ClusterIP of an IPv6-only service without endpoints.
const CIP6_EMPTY: &str = "2001:2:ff::61";
const NODE_PORT: u16 = 30660;

fn pod6(p: &Pod) -> Ipv6Addr {
    p.ip6.expect("a dual-stack lab gives every pod an IPv6 address")
}

/// One TCP request from `ns` to `[addr]:port`: the name of the pod that answered.
fn tcp6_name(ns: &str, addr: Ipv6Addr, port: u16) -> Result<String, RequestError> {
    tcp_request6(ns, addr, port, T).map(|r| r.server_pod)
}

/// The value of `kproxy_packets6_total{reason}` on the node's `/metrics` (port 10249).
fn packets6(node_ns: &str, reason: &str) -> Result<u64> {
    let body = in_netns(node_ns, || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:10249".parse()?, T)?;
        s.set_read_timeout(Some(T))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let series = format!("kproxy_packets6_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .with_context(|| format!("no {series} in the metrics"))
}

/// The dual-stack NodePort service `web6` under `policy`: both ClusterIPs, or only the IPv4
/// one for `SingleStack`.
fn web6(policy: &str) -> String {
    let (ips, families) = if policy == "SingleStack" {
        (format!("[{CIP4}]"), "[IPv4]")
    } else {
        (format!("[{CIP4}, \"{CIP6}\"]"), "[IPv4, IPv6]")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web6, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CIP4}
  clusterIPs: {ips}
  ipFamilies: {families}
  ipFamilyPolicy: {policy}
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}]
"#
    )
}

fn manifests(backends: &[Pod]) -> Vec<String> {
    let svc = web6("RequireDualStack");
    let empty = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: empty6, namespace: default}}
spec:
  clusterIPs: ["{CIP6_EMPTY}"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, protocol: TCP}}]
"#
    );
    let slice = |fam: &str, addr: &dyn Fn(&Pod) -> String| {
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web6-{fam}, namespace: default, labels: {{kubernetes.io/service-name: web6}}}}\naddressType: {fam}\nports: [{{name: http, port: {SERVER_PORT}, protocol: TCP}}]\nendpoints:\n"
        );
        for p in backends {
            y += &format!(
                "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n",
                addr(p),
                lab::node_name(p.node)
            );
        }
        y
    };
    vec![svc, slice("IPv4", &|p| p.ip.to_string()), slice("IPv6", &|p| pod6(p).to_string()), empty]
}

/// A one-node dual-stack lab with its servers up, and its three pods (a client, two backends).
fn dual_stack_lab() -> (Lab, Vec<Pod>) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "lab tests need root (network namespaces)");
    let spec = LabSpec { nodes: 1, pods_per_node: 3, ipv6: true, ..LabSpec::default() };
    let mut lab = Lab::up(spec).expect("lab");
    lab.start_servers().expect("servers");
    let pods = lab.pods_on(0);
    (lab, pods)
}

/// A dual-stack NodePort Service reached from a pod over its IPv4 and its IPv6 ClusterIP (each
/// family lands on a backend pod, through its own frontend and backends) and from the external
/// client over the node's IPv6 NodePort; an IPv6-only service without endpoints rejects.
#[test]
fn dual_stack_service_over_both_cluster_ips_and_the_ipv6_node_port() {
    let (lab, pods) = dual_stack_lab();
    let (client, backends) = (&pods[0], &pods[1..]);
    let names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
    // Without a proxy the IPv6 network itself works: pod to pod.
    assert_eq!(tcp6_name(&client.ns, pod6(&backends[0]), SERVER_PORT).unwrap(), names[0]);

    let dir = ManifestDir::new(&format!("dual-{}", lab.prefix())).expect("dir");
    dir.write("web6.yaml", &manifests(backends)).expect("manifests");
    let opts = AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        extra_args: vec!["--enable-ipv6".into()],
        ..Default::default()
    };
    let agent = lab.start_agent(0, &opts).expect("agent");

    let cip6: Ipv6Addr = CIP6.parse().unwrap();
    let got6 = lab::eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        tcp6_name(&client.ns, cip6, 80)
    })
    .unwrap_or_else(|e| {
        panic!("[{CIP6}]:80 from {}: {e:#}\nagent log:\n{}", client.name, agent.log_text())
    });
    assert!(names.contains(&got6), "{got6} is no backend of {names:?}");
    let r = tcp_request(&client.ns, CIP4, 80, T)
        .unwrap_or_else(|e| panic!("{CIP4}:80 from {}: {e}", client.name));
    assert!(names.contains(&r.server_pod), "{} is no backend", r.server_pod);
    // Several IPv6 connections: each lands on a backend, both backends are used.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let n = tcp6_name(&client.ns, cip6, 80).expect("IPv6 ClusterIP");
        assert!(names.contains(&n), "{n}");
        seen.insert(n);
    }
    assert_eq!(seen.len(), 2, "both IPv6 backends serve: {seen:?}");
    // The IPv6 NodePort from outside the node.
    let node6 = lab.node(0).ip6.expect("dual-stack node");
    let n = tcp6_name(&lab.client_ns(), node6, NODE_PORT)
        .unwrap_or_else(|e| panic!("[{node6}]:{NODE_PORT} from the client: {e:#}"));
    assert!(names.contains(&n), "{n}");
    // A new IPv6 address on the NodePort device: its NodePort appears, woken by the address
    // notification (nothing else makes the agent read the addresses again).
    let node_ns = lab.node(0).ns.clone();
    let extra6: Ipv6Addr = "2001:2::99".parse().unwrap();
    exec(&node_ns, &["ip", "-6", "addr", "add", "2001:2::99/64", "dev", "eth0", "nodad"])
        .expect("ip -6 addr add");
    let n = lab::eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        tcp6_name(&lab.client_ns(), extra6, NODE_PORT)
    })
    .unwrap_or_else(|e| {
        panic!("[{extra6}]:{NODE_PORT} from the client: {e:#}\nagent log:\n{}", agent.log_text())
    });
    assert!(names.contains(&n), "{n}");
    let _ = exec(&node_ns, &["ip", "-6", "addr", "del", "2001:2::99/64", "dev", "eth0"]);
    // No endpoint: the connection is refused (TCP RST from the datapath), not left to time out.
    let empty: Ipv6Addr = CIP6_EMPTY.parse().unwrap();
    let err = tcp6_name(&client.ns, empty, 80).expect_err("a service without endpoints");
    assert!(err.is_refused(), "{err}");
    // The IPv6 packets are counted by family.
    lab::eventually(Duration::from_secs(15), Duration::from_millis(250), || {
        let n = packets6(&node_ns, "translated_new")?;
        anyhow::ensure!(n >= 22, "kproxy_packets6_total{{reason=\"translated_new\"}} is {n}");
        Ok(())
    })
    .unwrap();
    let status = agent.stop(Duration::from_secs(5)).expect("agent stop");
    assert!(status.success(), "agent exit {status}");
    // The pinned IPv6 maps keep serving while no agent runs, and the next agent adopts them.
    let n = tcp6_name(&client.ns, cip6, 80).expect("IPv6 ClusterIP without an agent");
    assert!(names.contains(&n), "{n}");
    let agent = lab.spawn_agent(0, &opts).expect("agent restart");
    agent.wait_logged("adopted the programmed state", lab::AGENT_LOAD).expect("agent adopts");
    let log = agent.log_text();
    // ClusterIP and NodePort (both scopes) of web6, ClusterIP of empty6.
    assert!(log.contains("frontends6=4"), "{log}");
    let n = tcp6_name(&client.ns, cip6, 80).expect("IPv6 ClusterIP after the restart");
    assert!(names.contains(&n), "{n}");
}

/// The same dual-stack service from the Kubernetes API (kproxy's `--kubeconfig` source, a test
/// API server in the lab's client namespace): both ClusterIPs serve; changing `ipFamilyPolicy`
/// to `SingleStack` removes the IPv6 ClusterIP (the IPv4 one keeps serving), and
/// `PreferDualStack` with both addresses brings it back.
#[test]
fn dual_stack_service_from_the_kubernetes_api_follows_its_ip_family_policy() {
    let (lab, pods) = dual_stack_lab();
    let (client, backends) = (&pods[0], &pods[1..]);
    let names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();

    // The API server listens in the client namespace, which the node reaches on the underlay.
    let client_ns = lab.client_ns();
    let bind: Binder = Arc::new(move || {
        in_netns(&client_ns, || std::net::TcpListener::bind((CLIENT_IP, 16443)))
            .map_err(std::io::Error::other)?
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(ApiServer::start_with(bind)).expect("api server");
    let kubeconfig = KubeConfigFile::write(lab.prefix(), &api.url()).expect("kubeconfig");
    let apply = |y: &str| {
        let v: serde_json::Value = serde_saphyr::from_str(y).expect("manifest");
        api.apply(v).expect("apply");
    };
    for y in manifests(backends) {
        apply(&y);
    }
    let opts = AgentOpts {
        extra_args: vec!["--kubeconfig".into(), kubeconfig.arg(), "--enable-ipv6".into()],
        ..Default::default()
    };
    let agent = lab.start_agent(0, &opts).expect("agent");
    let cip6: Ipv6Addr = CIP6.parse().unwrap();
    let wait = Duration::from_secs(20);
    let every = Duration::from_millis(200);
    let on_v6 = || {
        lab::eventually(wait, every, || tcp6_name(&client.ns, cip6, 80)).unwrap_or_else(|e| {
            panic!("[{CIP6}]:80 from {}: {e:#}\nagent log:\n{}", client.name, agent.log_text())
        })
    };
    let on_v4 = || {
        tcp_request(&client.ns, CIP4, 80, T)
            .unwrap_or_else(|e| panic!("{CIP4}:80 from {}: {e}", client.name))
            .server_pod
    };
    let n = on_v6();
    assert!(names.contains(&n), "{n} is no backend of {names:?}");
    let n = on_v4();
    assert!(names.contains(&n), "{n} is no backend of {names:?}");

    // SingleStack: the IPv6 ClusterIP is no longer programmed; IPv4 keeps serving.
    apply(&web6("SingleStack"));
    lab::eventually(wait, every, || match tcp6_name(&client.ns, cip6, 80) {
        Ok(n) => Err(format!("[{CIP6}]:80 still answers ({n})")),
        Err(_) => Ok(()),
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    let n = on_v4();
    assert!(names.contains(&n), "{n} is no backend of {names:?}");

    // PreferDualStack with both addresses: the IPv6 ClusterIP serves again.
    apply(&web6("PreferDualStack"));
    let n = on_v6();
    assert!(names.contains(&n), "{n} is no backend of {names:?}");
    drop(agent);
    let _ = lab.cleanup(0);
}
