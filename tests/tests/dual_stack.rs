//! Dual stack end to end in the lab: a one-node lab whose node and pods also get IPv6
//! addresses (inside 2001:2::/48, the routed wiring's IPv6 twin: pod /128, default route via
//! fe80::1 on the host veth, a /128 route per pod on the node), one agent reading a dual-stack
//! Service from manifests, and a pod reaching it over both ClusterIPs with real sockets.
//! Everything lives in the lab's namespaces and goes with the lab, also on failure.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use kproxy_tests::{
    client::tcp_request,
    lab::{self, AgentOpts, Lab, LabSpec, Pod, SERVER_PORT, Wiring, exec, in_netns, sysctls},
    manifests::ManifestDir,
};

const T: Duration = Duration::from_secs(2);
const CIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 60);
const CIP6: &str = "2001:2:ff::60";
/// ClusterIP of an IPv6-only service without endpoints.
const CIP6_EMPTY: &str = "2001:2:ff::61";
const NODE_PORT: u16 = 30660;
/// The client's IPv6 underlay address.
const CLIENT6: &str = "2001:2::2";
/// The node's IPv6 underlay address (its NodePort and IPv6 source-NAT address).
const NODE6: &str = "2001:2::10";

/// A pod's IPv6 address: 2001:2:(100+node)::(10+index), the IPv6 twin of its IPv4 address.
fn pod6(p: &Pod) -> Ipv6Addr {
    format!("2001:2:{:x}::{:x}", 0x100 + p.node, 0x10 + p.index).parse().unwrap()
}

/// Gives node 0, the client and `pods` IPv6 (the lab disables it in every namespace); the
/// underlay bridge carries IPv6 as it is.
fn enable_ipv6(lab: &Lab, pods: &[Pod]) -> Result<()> {
    let node = &lab.node(0).ns;
    let ip6 = |ns: &str, args: &[&str]| -> Result<()> {
        let mut argv = vec!["ip", "-6"];
        argv.extend_from_slice(args);
        exec(ns, &argv).map(drop).with_context(|| format!("ip -6 {} in {ns}", args.join(" ")))
    };
    sysctls(
        node,
        &[
            ("net/ipv6/conf/all/disable_ipv6", "0"),
            ("net/ipv6/conf/default/disable_ipv6", "0"),
            ("net/ipv6/conf/eth0/disable_ipv6", "0"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ],
    )?;
    ip6(node, &["addr", "add", &format!("{NODE6}/64"), "dev", "eth0", "nodad"])?;
    let client = lab.client_ns();
    sysctls(
        &client,
        &[
            ("net/ipv6/conf/all/disable_ipv6", "0"),
            ("net/ipv6/conf/default/disable_ipv6", "0"),
            ("net/ipv6/conf/eth0/disable_ipv6", "0"),
        ],
    )?;
    ip6(&client, &["addr", "add", &format!("{CLIENT6}/64"), "dev", "eth0", "nodad"])?;
    for p in pods {
        let v = &p.host_veth;
        sysctls(node, &[(&format!("net/ipv6/conf/{v}/disable_ipv6"), "0")])?;
        ip6(node, &["addr", "add", "fe80::1/64", "dev", v, "nodad"])?;
        ip6(node, &["route", "add", &format!("{}/128", pod6(p)), "dev", v])?;
        sysctls(
            &p.ns,
            &[
                ("net/ipv6/conf/all/disable_ipv6", "0"),
                ("net/ipv6/conf/default/disable_ipv6", "0"),
                ("net/ipv6/conf/eth0/disable_ipv6", "0"),
            ],
        )?;
        ip6(&p.ns, &["addr", "add", &format!("{}/128", pod6(p)), "dev", "eth0", "nodad"])?;
        ip6(&p.ns, &["route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
    }
    Ok(())
}

/// A TCP server on `[pod6]:SERVER_PORT` in the pod's namespace (the socket is made there; its
/// thread runs here) answering every connection with the pod's name; stops when dropped.
struct Server6 {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server6 {
    fn start(p: &Pod) -> Result<Server6> {
        let addr = SocketAddr::new(pod6(p).into(), SERVER_PORT);
        let l = in_netns(&p.ns, || TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", p.ns))?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), p.name.clone());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(format!("{name}\n").as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Server6 { stop, thread: Some(thread) })
    }
}

impl Drop for Server6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP connection from `ns` to `[addr]:port`: the name the server answered.
fn tcp6_name(ns: &str, addr: Ipv6Addr, port: u16) -> Result<String> {
    in_netns(ns, || -> Result<String> {
        let dst = SocketAddr::new(addr.into(), port);
        let mut s =
            TcpStream::connect_timeout(&dst, T).with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(T))?;
        let mut out = String::new();
        s.read_to_string(&mut out).with_context(|| format!("reading from {dst}"))?;
        Ok(out.trim().to_string())
    })?
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

fn manifests(backends: &[Pod]) -> Vec<String> {
    let svc = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web6, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CIP4}
  clusterIPs: [{CIP4}, "{CIP6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{{name: http, port: 80, targetPort: {SERVER_PORT}, nodePort: {NODE_PORT}, protocol: TCP}}]
"#
    );
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

/// A dual-stack NodePort Service reached from a pod over its IPv4 and its IPv6 ClusterIP (each
/// family lands on a backend pod, through its own frontend and backends) and from the external
/// client over the node's IPv6 NodePort; an IPv6-only service without endpoints rejects.
#[test]
fn dual_stack_service_over_both_cluster_ips_and_the_ipv6_node_port() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "lab tests need root (network namespaces)");
    let spec = LabSpec { nodes: 1, pods_per_node: 3, wiring: Wiring::Routed, prefix: None };
    let mut lab = Lab::up(spec).expect("lab");
    lab.start_servers().expect("servers");
    let pods = lab.pods_on(0);
    enable_ipv6(&lab, &pods).expect("IPv6 in the lab");
    let (client, backends) = (&pods[0], &pods[1..]);
    let names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
    let _servers: Vec<Server6> =
        backends.iter().map(|p| Server6::start(p).expect("IPv6 server")).collect();
    // Without a proxy the IPv6 network itself works: pod to pod.
    assert_eq!(tcp6_name(&client.ns, pod6(&backends[0]), SERVER_PORT).unwrap(), names[0]);

    let dir = ManifestDir::new(&format!("dual-{}", lab.prefix())).expect("dir");
    dir.write("web6.yaml", &manifests(backends)).expect("manifests");
    let opts = AgentOpts {
        manifests_dir: dir.path().to_path_buf(),
        extra_args: vec!["--enable-ipv6".into()],
        ..Default::default()
    };
    let agent = lab.spawn_agent(0, &opts).expect("agent");

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
    let node6: Ipv6Addr = NODE6.parse().unwrap();
    let n = tcp6_name(&lab.client_ns(), node6, NODE_PORT)
        .unwrap_or_else(|e| panic!("[{NODE6}]:{NODE_PORT} from the client: {e:#}"));
    assert!(names.contains(&n), "{n}");
    // No endpoint: the connection is refused (TCP RST from the datapath), not left to time out.
    let empty: Ipv6Addr = CIP6_EMPTY.parse().unwrap();
    let err = tcp6_name(&client.ns, empty, 80).expect_err("a service without endpoints");
    let io = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
    assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "{err:#}");
    // The IPv6 packets are counted by family.
    let node_ns = lab.node(0).ns.clone();
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
    let log = lab::eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        let log = agent.log_text();
        if log.contains("adopted the programmed state") { Ok(log) } else { Err("not yet") }
    })
    .unwrap();
    // ClusterIP and NodePort (both scopes) of web6, ClusterIP of empty6.
    assert!(log.contains("frontends6=4"), "{log}");
    let n = tcp6_name(&client.ns, cip6, 80).expect("IPv6 ClusterIP after the restart");
    assert!(names.contains(&n), "{n}");
}
