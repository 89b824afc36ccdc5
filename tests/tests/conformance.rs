//! The Service conformance suite: one test per data-plane behaviour of the upstream Kubernetes
//! `[sig-network] Services` end-to-end tests, named after the upstream test (`upstream_*`).
//! Each runs in a fresh lab (2 nodes, 3 pods each, an external client) with one `kproxy agent`
//! per node on a manifest directory, real servers in the pods and real clients, in both pod
//! wirings (routed and bridged). A behaviour kproxy does not support yet is present, `#[ignore]`d
//! with the reason, and counted as not passing by the test summary.
//!
//! [`ipv6_data_plane_behaviours`] runs the IPv6 side in one dual-stack lab per wiring (agents
//! with `--enable-ipv6`): the same behaviours over IPv6, and the dual-stack ones (which families
//! `ipFamilyPolicy` programs, and a policy change adding and removing the IPv6 frontend).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    time::{Duration, Instant},
};

use kproxy_tests::{
    apiserver::{ApiServer, Binder, KubeConfigFile},
    client::{
        DnsAnswer, DnsTransport, DnsType, Reply, Reply6, RequestError, TcpSession, dns_query,
        tcp_request, tcp_request6, udp_request, udp_request6,
    },
    hostnet::{Cgroups, host_client},
    lab::{
        self, Agent, AgentOpts, CLIENT_IP, CLIENT_IP6, DNS_NAME, DNS_PORT, Lab, LabSpec,
        SERVER_PORT, Wiring, exec,
    },
    manifests::{Endpoint, ManifestDir, Port, Service, Slice, SvcType},
};

/// Per-request time limit.
const T: Duration = Duration::from_secs(2);
/// How long a change may take to show in the datapath (agent polls manifests every second).
const CONVERGE: Duration = Duration::from_secs(15);

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 20);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);

/// Every data-plane behaviour of the upstream `[sig-network] Services` tests, by the name of the
/// test here that covers it (`upstream_` and the upstream name). `xtask/summary.sh` counts the
/// suite's closing line against this list: a behaviour whose test is missing, ignored or failing
/// does not pass. [`behaviour_list_names_every_upstream_test`] keeps list and tests in step.
const UPSTREAM_BEHAVIOURS: &[&str] = &[
    "upstream_should_serve_a_basic_endpoint_from_pods",
    "upstream_should_serve_multiport_endpoints_from_pods",
    "upstream_should_serve_endpoints_on_same_port_and_different_protocols",
    "upstream_should_be_updated_after_adding_or_deleting_ports",
    "upstream_should_create_a_functioning_nodeport_service",
    "upstream_should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols",
    "upstream_should_be_able_to_change_the_type_from_externalname_to_clusterip_to_nodeport_and_back",
    "upstream_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip",
    "upstream_should_allow_pods_to_hairpin_back_to_themselves_through_services",
    "upstream_should_be_able_to_up_and_down_services",
    "upstream_should_work_after_the_service_has_been_recreated",
    "upstream_should_work_after_restarting_kube_proxy",
    "upstream_should_work_after_restarting_apiserver",
    "upstream_should_be_possible_to_connect_to_a_service_via_externalip_when_the_external_ip_is_not_assigned_to_a_node",
    "upstream_should_serve_loadbalancer_ingress_ips",
    "upstream_should_have_session_affinity_work_for_service_with_type_clusterip",
    "upstream_should_have_session_affinity_work_for_nodeport_service",
    "upstream_should_be_able_to_switch_session_affinity_for_service_with_type_clusterip",
    "upstream_should_have_session_affinity_timeout_work_for_service_with_type_clusterip",
    "upstream_should_be_able_to_switch_session_affinity_for_nodeport_service",
    "upstream_should_have_session_affinity_timeout_work_for_nodeport_service",
    "upstream_should_have_session_affinity_work_for_loadbalancer_service_with_esipp_on",
    "upstream_should_have_session_affinity_work_for_loadbalancer_service_with_esipp_off",
    "upstream_should_be_able_to_switch_session_affinity_for_loadbalancer_service_with_esipp_on",
    "upstream_should_be_able_to_switch_session_affinity_for_loadbalancer_service_with_esipp_off",
    "upstream_should_be_rejected_when_no_endpoints_exist",
    "upstream_should_be_rejected_for_evicted_pods_no_endpoints_exist",
    "upstream_should_create_endpoints_for_unready_pods",
    "upstream_should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_true",
    "upstream_should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_false",
    "upstream_should_implement_service_kubernetes_io_service_proxy_name",
    "upstream_should_implement_service_kubernetes_io_headless",
    "upstream_should_respect_internal_traffic_policy_local",
    "upstream_should_respect_internaltrafficpolicy_local_pod_hostnetwork_true_to_pod",
    "upstream_should_respect_internaltrafficpolicy_local_pod_and_node_to_pod_hostnetwork_true",
    "upstream_should_work_for_type_nodeport_with_externaltrafficpolicy_local",
    "upstream_should_serve_health_check_node_port_for_externaltrafficpolicy_local",
    "upstream_should_fail_health_check_node_port_if_there_are_only_terminating_endpoints",
    "upstream_should_implement_nodeport_and_healthchecknodeport_correctly_when_externaltrafficpolicy_changes",
    "upstream_should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_loadbalancer",
    "upstream_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_cluster",
    "upstream_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_local",
    "upstream_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_cluster",
    "upstream_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_local",
    "upstream_should_release_nodeports_on_delete",
];

/// A lab with an agent per node watching one manifest directory.
struct Cluster {
    agents: Vec<Option<Agent>>,
    dir: ManifestDir,
    /// Arguments every agent gets beyond the lab's.
    agent_args: Vec<String>,
    lab: Lab,
}

impl Cluster {
    fn new(wiring: Wiring, label: &str) -> Cluster {
        Self::with_spec(LabSpec::with_wiring(wiring), label, Vec::new())
    }

    /// A dual-stack lab whose agents serve IPv6 (`--enable-ipv6`), with the IPv6 ClusterIPs'
    /// network as their IPv6 service CIDR.
    fn dual_stack(wiring: Wiring, label: &str) -> Cluster {
        let spec = LabSpec { ipv6: true, ..LabSpec::with_wiring(wiring) };
        let args = ["--enable-ipv6", "--service-cidr", "2001:2:ff::/112"];
        Self::with_spec(spec, label, args.iter().map(|a| a.to_string()).collect())
    }

    fn with_spec(spec: LabSpec, label: &str, agent_args: Vec<String>) -> Cluster {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "conformance tests need root");
        let mut lab = Lab::up(spec).expect("lab up");
        lab.start_servers().expect("servers");
        let dir = ManifestDir::new(&format!("{label}-{}", lab.prefix())).expect("manifest dir");
        let mut c = Cluster { agents: Vec::new(), dir, agent_args, lab };
        // The convergence checks start once each agent has loaded its datapath, attached its
        // devices and read the node's addresses (it syncs next): loading takes many seconds on
        // a busy machine or an emulated kernel.
        let agents = c.lab.start_agents(&c.agent_opts()).expect("agents start");
        c.agents = agents.into_iter().map(Some).collect();
        c
    }

    /// Waits (up to [`lab::AGENT_LOAD`]) until every agent's log contains `needle`.
    fn wait_agents_logged(&self, needle: &str) {
        for a in self.agents.iter().flatten() {
            if let Err(e) = a.wait_logged(needle, lab::AGENT_LOAD) {
                panic!("{e:#}\n{}", self.agent_logs());
            }
        }
    }

    /// Starts node `node`'s agent again and waits until it has loaded its datapath (see
    /// [`Cluster::with_spec`]).
    fn restart_agent(&mut self, node: usize) {
        let a = self.lab.start_agent(node, &self.agent_opts()).expect("agent starts");
        self.agents[node] = Some(a);
    }

    /// The agents' options: the manifest directory and [`Cluster::agent_args`].
    fn agent_opts(&self) -> AgentOpts {
        AgentOpts {
            manifests_dir: self.dir.path().to_path_buf(),
            extra_args: self.agent_args.clone(),
            ..Default::default()
        }
    }

    fn pod_ns(&self, i: usize, j: usize) -> String {
        self.lab.pod(i, j).expect("pod").ns.clone()
    }

    fn pod_ip(&self, i: usize, j: usize) -> Ipv4Addr {
        self.lab.pod(i, j).expect("pod").ip
    }

    fn ep(&self, i: usize, j: usize) -> Endpoint {
        let p = self.lab.pod(i, j).expect("pod");
        Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.lab.node(i).ip
    }

    fn client(&self) -> String {
        self.lab.client_ns()
    }

    fn put(&self, svc: &Service, eps: Vec<Endpoint>) {
        self.dir.put(svc, &[Slice::for_service(svc, eps)]).expect("write manifests");
    }

    fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .flatten()
            .map(|a| format!("--- node {} ---\n{}", a.node, a.log_text()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.agent_logs());
        }
        self.agents.clear();
        for i in 0..self.lab.nodes().len() {
            let _ = self.lab.cleanup(i);
        }
    }
}

/// Runs `scenario` on both wirings.
fn both(label: &str, scenario: impl Fn(&mut Cluster)) {
    for wiring in [Wiring::Routed, Wiring::Bridged] {
        let mut c = Cluster::new(wiring, label);
        scenario(&mut c);
    }
}

/// Polls `f` until it returns `Some`, or panics after [`CONVERGE`] naming `what`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

fn request(ns: &str, addr: Ipv4Addr, port: u16, proto: Proto) -> Result<Reply, RequestError> {
    match proto {
        Proto::Tcp => tcp_request(ns, addr, port, T),
        Proto::Udp => udp_request(ns, addr, port, T),
    }
}

/// Backends that answered `n` requests (errors are not counted).
fn backends(ns: &str, addr: Ipv4Addr, port: u16, proto: Proto, n: usize) -> BTreeSet<String> {
    (0..n).filter_map(|_| request(ns, addr, port, proto).ok()).map(|r| r.server_pod).collect()
}

/// Waits until `n` consecutive requests are all answered by exactly the pods in `want`
/// (each of them at least once when `all` is set).
fn converge_to(ns: &str, addr: Ipv4Addr, port: u16, proto: Proto, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("{addr}:{port}/{proto:?} served by exactly {want:?}"), || {
        let mut seen = BTreeSet::new();
        for _ in 0..(8 * want.len()).max(6) {
            match request(ns, addr, port, proto) {
                Ok(r) if want.contains(&r.server_pod) => {
                    seen.insert(r.server_pod);
                }
                _ => return None,
            }
        }
        (seen == want).then_some(())
    });
}

/// Waits until requests get no answer at all (timeout or refusal).
fn converge_dead(ns: &str, addr: Ipv4Addr, port: u16, proto: Proto) -> RequestError {
    eventually(&format!("{addr}:{port}/{proto:?} not answering"), || {
        let errs: Vec<RequestError> =
            (0..3).filter_map(|_| request(ns, addr, port, proto).err()).collect();
        (errs.len() == 3).then(|| errs.into_iter().next().expect("three errors"))
    })
}

/// Waits until `addr:port` times out three times in a row (dropped, not refused): a node that
/// has not programmed the service yet refuses, so the first failure is not the verdict.
fn converge_dropped(ns: &str, addr: Ipv4Addr, port: u16, proto: Proto) {
    eventually(&format!("{addr}:{port}/{proto:?} dropped (timeouts, not refusals)"), || {
        (0..3)
            .all(|_| request(ns, addr, port, proto).err().is_some_and(|e| e.is_timeout()))
            .then_some(())
    })
}

fn web(ip: Ipv4Addr) -> Service {
    Service::cluster_ip("web", ip, vec![Port::tcp("http", 80, SERVER_PORT)])
}

#[test]
fn upstream_should_serve_a_basic_endpoint_from_pods() {
    both("basic", |c| {
        let client = c.pod_ns(1, 1);
        let svc = web(VIP);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&client, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        c.put(&svc, vec![c.ep(0, 0), c.ep(1, 0)]);
        converge_to(&client, VIP, 80, Proto::Tcp, &["node-0-pod-0", "node-1-pod-0"]);
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_to(&client, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
    });
}

#[test]
fn upstream_should_serve_multiport_endpoints_from_pods() {
    both("multiport", |c| {
        let client = c.pod_ns(0, 2);
        let svc = Service::cluster_ip(
            "multi",
            VIP,
            vec![Port::tcp("portname1", 80, SERVER_PORT), Port::tcp("portname2", 81, DNS_PORT)],
        );
        c.put(&svc, vec![c.ep(0, 0), c.ep(1, 1)]);
        converge_to(&client, VIP, 80, Proto::Tcp, &["node-0-pod-0", "node-1-pod-1"]);
        // Port 81 leads to the pods' DNS server over TCP.
        let got = eventually("dns over port 81", || {
            dns_query(&client, VIP, 81, DNS_NAME, DnsType::Txt, DnsTransport::Tcp, T).ok()
        });
        assert!(
            got == vec![DnsAnswer::Txt("node-0-pod-0".into())]
                || got == vec![DnsAnswer::Txt("node-1-pod-1".into())],
            "{got:?}"
        );
    });
}

#[test]
fn upstream_should_serve_endpoints_on_same_port_and_different_protocols() {
    both("sameport", |c| {
        let client = c.pod_ns(1, 2);
        let svc = Service::cluster_ip(
            "dns",
            VIP,
            vec![Port::tcp("dns-tcp", 53, DNS_PORT), Port::udp("dns-udp", 53, DNS_PORT)],
        );
        c.put(&svc, vec![c.ep(0, 1)]);
        for t in [DnsTransport::Udp, DnsTransport::Tcp] {
            let got = eventually(&format!("dns {t:?}"), || {
                dns_query(&client, VIP, 53, DNS_NAME, DnsType::A, t, T).ok()
            });
            assert_eq!(got, vec![DnsAnswer::A(c.pod_ip(0, 1))], "{t:?}");
        }
        // Only UDP: TCP to the same port stops being served.
        let udp_only = Service::cluster_ip("dns", VIP, vec![Port::udp("dns-udp", 53, DNS_PORT)]);
        c.put(&udp_only, vec![c.ep(0, 1)]);
        eventually("tcp/53 gone", || {
            dns_query(&client, VIP, 53, DNS_NAME, DnsType::A, DnsTransport::Tcp, T)
                .is_err()
                .then_some(())
        });
        // UDP may lose a datagram on a loaded machine: still served means answered within the
        // convergence time, as every other check here.
        let got = eventually("udp still served", || {
            dns_query(&client, VIP, 53, DNS_NAME, DnsType::A, DnsTransport::Udp, T).ok()
        });
        assert_eq!(got, vec![DnsAnswer::A(c.pod_ip(0, 1))]);
    });
}

#[test]
fn upstream_should_be_updated_after_adding_or_deleting_ports() {
    both("ports", |c| {
        let client = c.pod_ns(0, 1);
        let mut svc = web(VIP);
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_to(&client, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        svc.ports.push(Port::udp("udp", 81, SERVER_PORT));
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_to(&client, VIP, 81, Proto::Udp, &["node-1-pod-0"]);
        svc.ports.remove(0);
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_dead(&client, VIP, 80, Proto::Tcp);
        converge_to(&client, VIP, 81, Proto::Udp, &["node-1-pod-0"]);
    });
}

#[test]
fn upstream_should_create_a_functioning_nodeport_service() {
    both("nodeport", |c| {
        let client = c.client();
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30080);
        c.put(&svc, vec![c.ep(0, 0)]);
        // Local backend on node 0: the client's address is preserved.
        let r =
            eventually("nodeport on node 0", || tcp_request(&client, c.node_ip(0), 30080, T).ok());
        assert_eq!(r.server_pod, "node-0-pod-0");
        assert_eq!(*r.client_addr.ip(), CLIENT_IP);
        // Remote backend through node 1 (externalTrafficPolicy Cluster): source NAT to node 1.
        let r =
            eventually("nodeport on node 1", || tcp_request(&client, c.node_ip(1), 30080, T).ok());
        assert_eq!(r.server_pod, "node-0-pod-0");
        assert_eq!(*r.client_addr.ip(), c.node_ip(1), "remote backend sees the node's address");
        // Pods reach the NodePort too.
        let r = eventually("nodeport from a pod", || {
            tcp_request(&c.pod_ns(1, 2), c.node_ip(1), 30080, T).ok()
        });
        assert_eq!(r.server_pod, "node-0-pod-0");
    });
}

#[test]
fn upstream_should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols()
 {
    both("np-protocols", |c| {
        let client = c.client();
        let mut svc = Service::cluster_ip("web", VIP, vec![Port::tcp("tcp", 80, SERVER_PORT)]);
        c.put(&svc, vec![c.ep(0, 0), c.ep(1, 0)]);
        converge_to(&c.pod_ns(0, 1), VIP, 80, Proto::Tcp, &["node-0-pod-0", "node-1-pod-0"]);
        svc.svc_type = SvcType::NodePort;
        svc.ports = vec![
            Port::tcp("tcp", 80, SERVER_PORT).node_port(30090),
            Port::udp("udp", 80, SERVER_PORT).node_port(30090),
        ];
        c.put(&svc, vec![c.ep(0, 0), c.ep(1, 0)]);
        for node in 0..2 {
            for proto in [Proto::Tcp, Proto::Udp] {
                converge_to(
                    &client,
                    c.node_ip(node),
                    30090,
                    proto,
                    &["node-0-pod-0", "node-1-pod-0"],
                );
            }
        }
    });
}

#[test]
fn upstream_should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_loadbalancer()
 {
    both("lb-protocols", |c| {
        let pod = c.pod_ns(1, 1);
        // Port 80 leads to the web server over TCP and to the DNS server over UDP.
        let mut svc = Service::cluster_ip(
            "multiprotocol",
            VIP,
            vec![
                Port::tcp("portname1", 80, SERVER_PORT).node_port(30260),
                Port::udp("portname2", 80, DNS_PORT).node_port(30260),
            ],
        );
        svc.svc_type = SvcType::LoadBalancer;
        svc.lb_ips = vec![LB_IP];
        c.put(&svc, vec![c.ep(0, 0)]);
        // Internal traffic: a pod through the ClusterIP and through the load-balancer IP.
        for addr in [VIP, LB_IP] {
            converge_to(&pod, addr, 80, Proto::Tcp, &["node-0-pod-0"]);
            let got = eventually(&format!("DNS over UDP to {addr}:80"), || {
                dns_query(&pod, addr, 80, DNS_NAME, DnsType::Txt, DnsTransport::Udp, T).ok()
            });
            assert_eq!(got, vec![DnsAnswer::Txt("node-0-pod-0".into())], "UDP {addr}:80");
        }
    });
}

#[test]
fn upstream_should_be_able_to_change_the_type_from_externalname_to_clusterip_to_nodeport_and_back()
{
    both("types", |c| {
        let pod = c.pod_ns(1, 1);
        let mut svc = web(VIP);
        svc.svc_type = SvcType::ExternalName;
        svc.external_name = Some("example.invalid".into());
        svc.cluster_ip = None;
        c.put(&svc, vec![c.ep(0, 0)]);
        std::thread::sleep(Duration::from_secs(2));
        assert!(tcp_request(&pod, VIP, 80, T).is_err(), "ExternalName must program nothing");
        // ExternalName → ClusterIP.
        let mut svc = web(VIP);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        // ClusterIP → NodePort.
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30100);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&c.client(), c.node_ip(1), 30100, Proto::Tcp, &["node-0-pod-0"]);
        // NodePort → ExternalName: both the ClusterIP and the NodePort go away.
        let mut en = web(VIP);
        en.svc_type = SvcType::ExternalName;
        en.external_name = Some("example.invalid".into());
        en.cluster_ip = None;
        c.put(&en, vec![c.ep(0, 0)]);
        converge_dead(&c.client(), c.node_ip(1), 30100, Proto::Tcp);
        converge_dead(&pod, VIP, 80, Proto::Tcp);
    });
}

#[test]
fn upstream_should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    both("srcip", |c| {
        let mut svc = web(VIP);
        svc.ports.push(Port::udp("udp", 81, SERVER_PORT));
        c.put(&svc, vec![c.ep(0, 0)]);
        for (i, j) in [(1, 1), (0, 2)] {
            let r = eventually("answer", || tcp_request(&c.pod_ns(i, j), VIP, 80, T).ok());
            assert_eq!(r.server_pod, "node-0-pod-0");
            assert_eq!(
                *r.client_addr.ip(),
                c.pod_ip(i, j),
                "source address of pod ({i},{j}) preserved"
            );
            let r = eventually("udp answer", || udp_request(&c.pod_ns(i, j), VIP, 81, T).ok());
            assert_eq!(
                *r.client_addr.ip(),
                c.pod_ip(i, j),
                "UDP source of pod ({i},{j}) preserved"
            );
        }
    });
}

#[test]
fn upstream_should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    both("hairpin", |c| {
        let mut svc = web(VIP);
        svc.ports.push(Port::udp("udp", 81, SERVER_PORT));
        c.put(&svc, vec![c.ep(0, 0)]);
        let r = eventually("hairpin", || tcp_request(&c.pod_ns(0, 0), VIP, 80, T).ok());
        assert_eq!(r.server_pod, "node-0-pod-0");
        let r = eventually("hairpin udp", || udp_request(&c.pod_ns(0, 0), VIP, 81, T).ok());
        assert_eq!(r.server_pod, "node-0-pod-0");
        // Other pods are not affected by the hairpin translation.
        let r = tcp_request(&c.pod_ns(0, 1), VIP, 80, T).expect("another pod");
        assert_eq!(*r.client_addr.ip(), c.pod_ip(0, 1));
    });
}

#[test]
fn upstream_should_be_able_to_up_and_down_services() {
    both("updown", |c| {
        let pod = c.pod_ns(0, 1);
        let a = web(VIP);
        let mut b = web(VIP2);
        b.name = "web2".into();
        c.put(&a, vec![c.ep(0, 0)]);
        c.put(&b, vec![c.ep(1, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        converge_to(&pod, VIP2, 80, Proto::Tcp, &["node-1-pod-0"]);
        c.dir.remove("web.yaml").unwrap();
        converge_dead(&pod, VIP, 80, Proto::Tcp);
        converge_to(&pod, VIP2, 80, Proto::Tcp, &["node-1-pod-0"]);
        c.put(&a, vec![c.ep(0, 2)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-2"]);
        converge_to(&pod, VIP2, 80, Proto::Tcp, &["node-1-pod-0"]);
    });
}

#[test]
fn upstream_should_work_after_the_service_has_been_recreated() {
    both("recreate", |c| {
        let pod = c.pod_ns(1, 2);
        let svc = web(VIP);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        c.dir.remove("web.yaml").unwrap();
        converge_dead(&pod, VIP, 80, Proto::Tcp);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
    });
}

#[test]
fn upstream_should_work_after_restarting_kube_proxy() {
    both("restart", |c| {
        let pod = c.pod_ns(0, 1);
        let svc = web(VIP);
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        let (mut session, first) =
            TcpSession::connect(&pod, VIP, 80, T).expect("long-lived connection");
        // Stop node 0's agent: the datapath keeps serving existing and new connections.
        let agent = c.agents[0].take().expect("agent 0");
        agent.stop(Duration::from_secs(5)).expect("agent stops on SIGTERM");
        assert_eq!(session.request().expect("established connection survives the stop"), first);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        // A change made while it is down is applied when it is back.
        c.put(&svc, vec![c.ep(1, 0), c.ep(0, 2)]);
        c.restart_agent(0);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-0", "node-0-pod-2"]);
        assert_eq!(session.request().expect("established connection survives the restart"), first);
    });
}

#[test]
fn upstream_should_work_after_restarting_apiserver() {
    for wiring in [Wiring::Routed, Wiring::Bridged] {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "conformance tests need root");
        let mut lab = Lab::up(LabSpec::with_wiring(wiring)).expect("lab up");
        lab.start_servers().expect("servers");
        // The API server runs in the client namespace, where the nodes reach it on the underlay.
        let client_ns = lab.client_ns();
        let bind: Binder = Arc::new(move || {
            lab::in_netns(&client_ns, || std::net::TcpListener::bind((CLIENT_IP, 16443)))
                .map_err(std::io::Error::other)?
        });
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut api = rt.block_on(ApiServer::start_with(bind)).expect("api server");
        let kubeconfig = KubeConfigFile::write(lab.prefix(), &api.url()).expect("kubeconfig");
        let ep = |i: usize, j: usize| {
            let p = lab.pod(i, j).unwrap();
            Endpoint::ready(p.ip, &lab::node_name(i), &p.name)
        };
        let apply = |api: &ApiServer, svc: &Service, eps: Vec<Endpoint>| {
            for y in [svc.to_yaml(), Slice::for_service(svc, eps).to_yaml()] {
                let v: serde_json::Value = serde_saphyr::from_str(&y).unwrap();
                api.apply(v).unwrap();
            }
        };
        let svc = web(VIP);
        apply(&api, &svc, vec![ep(0, 0)]);
        let opts = AgentOpts {
            extra_args: vec!["--kubeconfig".into(), kubeconfig.arg()],
            ..Default::default()
        };
        let agents = lab.start_agents(&opts).expect("agents");
        let pod = lab.pod(1, 1).unwrap().ns.clone();
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        // API server down: the datapath keeps serving.
        api.stop();
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        // Changes while it was down, history compacted: the agents reconnect, relist, apply.
        apply(&api, &svc, vec![ep(0, 0), ep(1, 0)]);
        api.compact();
        rt.block_on(api.restart()).expect("api server restarts");
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0", "node-1-pod-0"]);
        // And it keeps watching.
        apply(&api, &svc, vec![ep(1, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        drop(agents);
        for i in 0..lab.nodes().len() {
            let _ = lab.cleanup(i);
        }
    }
}

#[test]
fn upstream_should_be_possible_to_connect_to_a_service_via_externalip_when_the_external_ip_is_not_assigned_to_a_node()
 {
    both("externalip", |c| {
        let mut svc = web(VIP);
        svc.external_ips = vec![EXTERNAL_IP];
        c.put(&svc, vec![c.ep(0, 1), c.ep(1, 1)]);
        converge_to(&c.client(), EXTERNAL_IP, 80, Proto::Tcp, &["node-0-pod-1", "node-1-pod-1"]);
    });
}

#[test]
fn upstream_should_serve_loadbalancer_ingress_ips() {
    both("lb", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::LoadBalancer;
        svc.ports[0] = svc.ports[0].clone().node_port(30110);
        svc.lb_ips = vec![LB_IP];
        c.put(&svc, vec![c.ep(0, 1), c.ep(1, 1)]);
        converge_to(&c.client(), LB_IP, 80, Proto::Tcp, &["node-0-pod-1", "node-1-pod-1"]);
        // Pods reach the load-balancer IP too (it is routed to the node, then translated).
        converge_to(&c.pod_ns(1, 2), LB_IP, 80, Proto::Tcp, &["node-0-pod-1", "node-1-pod-1"]);
    });
}

fn all_endpoints(c: &Cluster) -> Vec<Endpoint> {
    (0..2).flat_map(|i| (0..3).map(move |j| (i, j))).map(|(i, j)| c.ep(i, j)).collect()
}

fn sticky(ns: &str, addr: Ipv4Addr, port: u16, n: usize) -> BTreeSet<String> {
    backends(ns, addr, port, Proto::Tcp, n)
}

#[test]
fn upstream_should_have_session_affinity_work_for_service_with_type_clusterip() {
    both("affinity", |c| {
        let pod = c.pod_ns(1, 2);
        let mut svc = web(VIP);
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("served", || tcp_request(&pod, VIP, 80, T).ok());
        assert_eq!(sticky(&pod, VIP, 80, 20).len(), 1, "one client, one backend");
    });
}

#[test]
fn upstream_should_have_session_affinity_work_for_nodeport_service() {
    both("affinity-np", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30120);
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        let client = c.client();
        eventually("served", || tcp_request(&client, c.node_ip(0), 30120, T).ok());
        assert_eq!(sticky(&client, c.node_ip(0), 30120, 20).len(), 1, "one client, one backend");
    });
}

#[test]
fn upstream_should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() {
    both("affinity-switch", |c| {
        let pod = c.pod_ns(0, 1);
        let mut svc = web(VIP);
        c.put(&svc, all_endpoints(c));
        eventually("spread without affinity", || {
            (sticky(&pod, VIP, 80, 30).len() > 1).then_some(())
        });
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("sticky with affinity", || (sticky(&pod, VIP, 80, 20).len() == 1).then_some(()));
        svc.affinity_timeout = None;
        c.put(&svc, all_endpoints(c));
        eventually("spread again", || (sticky(&pod, VIP, 80, 30).len() > 1).then_some(()));
    });
}

#[test]
fn upstream_should_have_session_affinity_timeout_work_for_service_with_type_clusterip() {
    both("affinity-timeout", |c| {
        let pod = c.pod_ns(1, 0);
        let mut svc = web(VIP);
        svc.affinity_timeout = Some(2);
        c.put(&svc, all_endpoints(c));
        let first = eventually("served", || tcp_request(&pod, VIP, 80, T).ok()).server_pod;
        assert_eq!(
            sticky(&pod, VIP, 80, 10),
            BTreeSet::from([first.clone()]),
            "sticky within the timeout"
        );
        // After the timeout, the client is balanced anew: with 6 backends a different one shows
        // up within a few rounds (chance of a false failure: 6^-8).
        let mut changed = false;
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(2500));
            if tcp_request(&pod, VIP, 80, T).map(|r| r.server_pod != first).unwrap_or(false) {
                changed = true;
                break;
            }
        }
        assert!(changed, "affinity never expired");
    });
}

/// `svc` as a NodePort service on `node_port`.
fn nodeport(mut svc: Service, node_port: u16) -> Service {
    svc.svc_type = SvcType::NodePort;
    svc.ports[0] = svc.ports[0].clone().node_port(node_port);
    svc
}

#[test]
fn upstream_should_be_able_to_switch_session_affinity_for_nodeport_service() {
    both("affinity-np-switch", |c| {
        let (client, node) = (c.client(), c.node_ip(1));
        let mut svc = nodeport(web(VIP), 30190);
        c.put(&svc, all_endpoints(c));
        eventually("spread without affinity", || {
            (sticky(&client, node, 30190, 30).len() > 1).then_some(())
        });
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("sticky with affinity", || {
            (sticky(&client, node, 30190, 20).len() == 1).then_some(())
        });
        svc.affinity_timeout = None;
        c.put(&svc, all_endpoints(c));
        eventually("spread again", || (sticky(&client, node, 30190, 30).len() > 1).then_some(()));
    });
}

#[test]
fn upstream_should_have_session_affinity_timeout_work_for_nodeport_service() {
    both("affinity-np-timeout", |c| {
        let (client, node) = (c.client(), c.node_ip(0));
        let mut svc = nodeport(web(VIP), 30200);
        svc.affinity_timeout = Some(2);
        c.put(&svc, all_endpoints(c));
        let first = eventually("served", || tcp_request(&client, node, 30200, T).ok()).server_pod;
        assert_eq!(
            sticky(&client, node, 30200, 10),
            BTreeSet::from([first.clone()]),
            "sticky within the timeout"
        );
        // After the timeout, the client is balanced anew: with 6 backends a different one shows
        // up within a few rounds (chance of a false failure: 6^-8).
        let mut changed = false;
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(2500));
            if tcp_request(&client, node, 30200, T).map(|r| r.server_pod != first).unwrap_or(false)
            {
                changed = true;
                break;
            }
        }
        assert!(changed, "affinity never expired");
    });
}

/// `svc` as a LoadBalancer service with the ingress IP [`LB_IP`] (the client routes it to node
/// 0, as a load balancer would send it) and NodePort `node_port`; with ESIPP (externalTrafficPolicy
/// Local, and the healthCheckNodePort the API server allocates then) when `esipp`.
fn load_balancer(mut svc: Service, node_port: u16, esipp: bool) -> Service {
    svc.svc_type = SvcType::LoadBalancer;
    svc.ports[0] = svc.ports[0].clone().node_port(node_port);
    svc.lb_ips = vec![LB_IP];
    svc.external_local = esipp;
    svc.health_check_node_port = esipp.then_some(node_port + 2000);
    svc
}

/// The pods that answer `n` requests of the client to the load-balancer IP (errors are not
/// counted). With ESIPP every answer must come from a pod of node 0, the node the traffic
/// arrives at, and see the client's own address.
fn lb_backends(c: &Cluster, n: usize, esipp: bool) -> BTreeSet<String> {
    let client = c.client();
    let replies: Vec<Reply> =
        (0..n).filter_map(|_| tcp_request(&client, LB_IP, 80, T).ok()).collect();
    if esipp {
        for r in &replies {
            assert!(r.server_pod.starts_with("node-0-"), "ESIPP: {} answered", r.server_pod);
            assert_eq!(*r.client_addr.ip(), CLIENT_IP, "ESIPP keeps the client's address");
        }
    }
    replies.into_iter().map(|r| r.server_pod).collect()
}

/// Upstream's `execAffinityTestForLBService`: one client, one backend through the load-balancer IP.
fn lb_session_affinity(label: &str, node_port: u16, esipp: bool) {
    both(label, |c| {
        let mut svc = load_balancer(web(VIP), node_port, esipp);
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("served through the load-balancer IP", || {
            tcp_request(&c.client(), LB_IP, 80, T).ok()
        });
        let got = lb_backends(c, 20, esipp);
        assert_eq!(got.len(), 1, "one client, one backend: {got:?}");
    });
}

/// Upstream's `execAffinityTestForLBServiceWithTransition`: ClientIP affinity, then none (the
/// client is spread), then ClientIP again.
fn lb_switch_session_affinity(label: &str, node_port: u16, esipp: bool) {
    both(label, |c| {
        let mut svc = load_balancer(web(VIP), node_port, esipp);
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("sticky with affinity", || (lb_backends(c, 20, esipp).len() == 1).then_some(()));
        svc.affinity_timeout = None;
        c.put(&svc, all_endpoints(c));
        eventually("spread without affinity", || {
            (lb_backends(c, 30, esipp).len() > 1).then_some(())
        });
        svc.affinity_timeout = Some(10800);
        c.put(&svc, all_endpoints(c));
        eventually("sticky again", || (lb_backends(c, 20, esipp).len() == 1).then_some(()));
    });
}

#[test]
fn upstream_should_have_session_affinity_work_for_loadbalancer_service_with_esipp_on() {
    lb_session_affinity("affinity-lb-esipp", 30250, true);
}

#[test]
fn upstream_should_have_session_affinity_work_for_loadbalancer_service_with_esipp_off() {
    lb_session_affinity("affinity-lb", 30251, false);
}

#[test]
fn upstream_should_be_able_to_switch_session_affinity_for_loadbalancer_service_with_esipp_on() {
    lb_switch_session_affinity("affinity-lb-esipp-switch", 30252, true);
}

#[test]
fn upstream_should_be_able_to_switch_session_affinity_for_loadbalancer_service_with_esipp_off() {
    lb_switch_session_affinity("affinity-lb-switch", 30253, false);
}

#[test]
fn upstream_should_be_rejected_when_no_endpoints_exist() {
    both("reject", |c| {
        let pod = c.pod_ns(0, 0);
        let mut svc = web(VIP);
        svc.ports.push(Port::udp("udp", 80, SERVER_PORT));
        c.put(&svc, vec![]);
        let e = eventually("tcp refused", || {
            tcp_request(&pod, VIP, 80, T).err().filter(RequestError::is_refused)
        });
        assert!(e.is_refused());
        let e = eventually("udp refused", || {
            udp_request(&pod, VIP, 80, T).err().filter(RequestError::is_refused)
        });
        assert!(e.is_refused(), "UDP gets an ICMP port unreachable, not a timeout");
        // From outside through a NodePort too.
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30130);
        svc.ports[1] = svc.ports[1].clone().node_port(30130);
        c.put(&svc, vec![]);
        let client = c.client();
        eventually("nodeport tcp refused", || {
            tcp_request(&client, c.node_ip(1), 30130, T).err().filter(RequestError::is_refused)
        });
    });
}

#[test]
fn upstream_should_be_rejected_for_evicted_pods_no_endpoints_exist() {
    both("evicted", |c| {
        let pod = c.pod_ns(0, 1);
        // publishNotReadyAddresses as upstream sets it "to cover edge cases too".
        let mut svc = nodeport(web(VIP), 30210);
        svc.publish_not_ready = true;
        c.put(&svc, vec![c.ep(1, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        // The pod was evicted (phase Failed): its endpoint is neither ready, serving nor
        // terminating. The service has no endpoint left and rejects.
        let mut evicted = c.ep(1, 0);
        evicted.ready = false;
        evicted.serving = false;
        evicted.terminating = false;
        c.put(&svc, vec![evicted]);
        eventually("clusterIP refused", || {
            tcp_request(&pod, VIP, 80, T).err().filter(RequestError::is_refused)
        });
        let client = c.client();
        for node in 0..2 {
            eventually(&format!("nodePort on node {node} refused"), || {
                tcp_request(&client, c.node_ip(node), 30210, T)
                    .err()
                    .filter(RequestError::is_refused)
            });
        }
    });
}

#[test]
fn upstream_should_create_endpoints_for_unready_pods() {
    both("unready", |c| {
        let pod = c.pod_ns(0, 1);
        // publishNotReadyAddresses: the EndpointSlice controller marks every address ready.
        let mut svc = web(VIP);
        svc.publish_not_ready = true;
        let mut e = c.ep(1, 2);
        e.serving = false;
        c.put(&svc, vec![e]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-1-pod-2"]);
        // Without it, an unready (not serving) endpoint is not used: the service has no backend.
        svc.publish_not_ready = false;
        c.put(&svc, vec![c.ep(1, 2).not_ready()]);
        eventually("unready endpoint unused", || {
            tcp_request(&pod, VIP, 80, T).err().filter(RequestError::is_refused)
        });
    });
}

/// The endpoint of pod (i, j) after the pod was deleted while its readiness probe fails: it is
/// terminating and not serving; the EndpointSlice controller publishes it as ready when the
/// service has publishNotReadyAddresses, not ready otherwise.
fn terminating_unready(c: &Cluster, i: usize, j: usize, publish_not_ready: bool) -> Endpoint {
    let mut e = c.ep(i, j).terminating();
    e.ready = publish_not_ready;
    e.serving = false;
    e
}

#[test]
fn upstream_should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_true()
 {
    both("pnr-true", |c| {
        let pod = c.pod_ns(1, 1);
        let mut svc = nodeport(web(VIP), 30220);
        svc.publish_not_ready = true;
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        // The webserver is deleted and turns unready; the same update adds a port, so that the
        // new port answering shows the update is programmed.
        svc.ports.push(Port::tcp("marker", 81, SERVER_PORT));
        c.put(&svc, vec![terminating_unready(c, 0, 0, true)]);
        converge_to(&pod, VIP, 81, Proto::Tcp, &["node-0-pod-0"]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        for node in 0..2 {
            converge_to(&pod, c.node_ip(node), 30220, Proto::Tcp, &["node-0-pod-0"]);
        }
    });
}

#[test]
fn upstream_should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_false()
 {
    both("pnr-false", |c| {
        let pod = c.pod_ns(1, 1);
        let svc = nodeport(web(VIP), 30230);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        for node in 0..2 {
            converge_to(&pod, c.node_ip(node), 30230, Proto::Tcp, &["node-0-pod-0"]);
        }
        // Deleted and unready: no endpoint may be used (terminating ones only serve while they
        // are still serving).
        c.put(&svc, vec![terminating_unready(c, 0, 0, false)]);
        converge_dead(&pod, VIP, 80, Proto::Tcp);
        for node in 0..2 {
            converge_dead(&pod, c.node_ip(node), 30230, Proto::Tcp);
        }
    });
}

/// A service carrying `label` is not served (another proxy owns it, or it is headless) while a
/// plain one next to it is; without the label it is served.
fn label_hides_service(label: &str, key: &str, value: &str) {
    both(label, |c| {
        let pod = c.pod_ns(1, 1);
        let mut svc = web(VIP);
        svc.labels = vec![(key.into(), value.into())];
        let mut plain = web(VIP2);
        plain.name = "web2".into();
        c.put(&plain, vec![c.ep(0, 0)]);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP2, 80, Proto::Tcp, &["node-0-pod-0"]);
        assert!(tcp_request(&pod, VIP, 80, T).is_err(), "a service labelled {key} is not served");
        svc.labels.clear();
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&pod, VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
    });
}

#[test]
fn upstream_should_implement_service_kubernetes_io_service_proxy_name() {
    label_hides_service("proxyname", "service.kubernetes.io/service-proxy-name", "foo-bar");
}

#[test]
fn upstream_should_implement_service_kubernetes_io_headless() {
    label_hides_service("headless", "service.kubernetes.io/headless", "");
}

#[test]
fn upstream_should_respect_internal_traffic_policy_local() {
    both("itp", |c| {
        let mut svc = web(VIP);
        svc.internal_local = true;
        c.put(&svc, vec![c.ep(0, 0), c.ep(1, 0)]);
        converge_to(&c.pod_ns(0, 2), VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
        converge_to(&c.pod_ns(1, 2), VIP, 80, Proto::Tcp, &["node-1-pod-0"]);
        // A node without a local endpoint drops (kube-proxy: no fallback to remote ones).
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_dropped(&c.pod_ns(1, 2), VIP, 80, Proto::Tcp);
    });
}

/// Restarts every agent with socket-level load balancing for the node's host-network processes
/// (`--cgroup-path`: the node's cgroup of `cg`). The datapath stays in place meanwhile.
fn restart_agents_with_socket_lb(c: &mut Cluster, cg: &Cgroups) {
    for i in 0..c.agents.len() {
        c.agents[i] = None;
        let opts = AgentOpts {
            manifests_dir: c.dir.path().to_path_buf(),
            extra_args: vec!["--cgroup-path".into(), cg.node(i).to_string_lossy().into_owned()],
            ..Default::default()
        };
        c.agents[i] = Some(c.lab.spawn_agent(i, &opts).expect("agent starts"));
    }
    // The convergence checks start once the programs are attached again: loading the datapath
    // takes many seconds on a busy machine.
    c.wait_agents_logged("socket LB attached");
}

/// Who answered a TCP request from a host-network process of node `node` to `addr:port` (`Err`
/// with the client's error otherwise).
fn host_request(
    c: &Cluster,
    cg: &Cgroups,
    node: usize,
    addr: Ipv4Addr,
    port: u16,
) -> Result<String, String> {
    let r = host_client(&c.lab.node(node).ns, Some(cg.node(node)), "tcp", addr, port)
        .expect("host-network client runs");
    r.answered_by().ok_or_else(|| r.get("error").unwrap_or("no answer").to_owned())
}

/// Waits until host-network requests of node `node` are answered by `want`, then checks 5 more.
fn host_converge_to(c: &Cluster, cg: &Cgroups, node: usize, want: &str) {
    eventually(&format!("host of node {node} → {VIP}:80 answered by {want}"), || {
        (host_request(c, cg, node, VIP, 80).as_deref() == Ok(want)).then_some(())
    });
    for _ in 0..5 {
        assert_eq!(host_request(c, cg, node, VIP, 80).as_deref(), Ok(want), "node {node} host");
    }
}

/// Waits until host-network requests of node `node` fail, then checks 5 more fail.
fn host_converge_dead(c: &Cluster, cg: &Cgroups, node: usize) {
    eventually(&format!("host of node {node} → {VIP}:80 failing"), || {
        host_request(c, cg, node, VIP, 80).is_err().then_some(())
    });
    for _ in 0..5 {
        let r = host_request(c, cg, node, VIP, 80);
        assert!(r.is_err(), "node {node} host reached {r:?} without a local endpoint");
    }
}

#[test]
fn upstream_should_respect_internaltrafficpolicy_local_pod_hostnetwork_true_to_pod() {
    both("itp-hostnet-client", |c| {
        let cg = Cgroups::new(c.lab.prefix(), c.lab.nodes().len()).expect("cgroup2 hierarchy");
        restart_agents_with_socket_lb(c, &cg);
        // First cluster-wide, so that node 1's host is seen reaching the service at all.
        let mut svc = web(VIP);
        c.put(&svc, vec![c.ep(0, 0)]);
        host_converge_to(c, &cg, 1, "node-0-pod-0");
        // Local: node 0's host reaches its own pod; node 1 has no local endpoint.
        svc.internal_local = true;
        c.put(&svc, vec![c.ep(0, 0)]);
        host_converge_dead(c, &cg, 1);
        host_converge_to(c, &cg, 0, "node-0-pod-0");
    });
}

/// Port of the host-network backend on node 0.
const HOST_BACKEND_PORT: u16 = 10180;

#[test]
fn upstream_should_respect_internaltrafficpolicy_local_pod_and_node_to_pod_hostnetwork_true() {
    both("itp-hostnet-backend", |c| {
        let cg = Cgroups::new(c.lab.prefix(), c.lab.nodes().len()).expect("cgroup2 hierarchy");
        restart_agents_with_socket_lb(c, &cg);
        // The backend runs in node 0's host network: its address is the node's, and it answers
        // with the node's name.
        let netexec = lab::find_bin("kproxy-netexec").expect("kproxy-netexec built");
        let port = HOST_BACKEND_PORT.to_string();
        let _server = c
            .lab
            .spawn(
                &c.lab.node(0).ns,
                "node-0-hostnet",
                &[&*netexec.to_string_lossy(), "--name", "node-0", "--tcp", &port],
            )
            .expect("host-network server");
        let backend = Endpoint::ready(c.node_ip(0), &lab::node_name(0), "node-0-hostnet");
        let mut svc =
            Service::cluster_ip("web", VIP, vec![Port::tcp("http", 80, HOST_BACKEND_PORT)]);
        c.put(&svc, vec![backend.clone()]);
        // Cluster-wide first: pods and hosts of both nodes reach it.
        for node in 0..2 {
            converge_to(&c.pod_ns(node, 1), VIP, 80, Proto::Tcp, &["node-0"]);
            host_converge_to(c, &cg, node, "node-0");
        }
        // Local: only node 0's pods and host.
        svc.internal_local = true;
        c.put(&svc, vec![backend]);
        converge_dead(&c.pod_ns(1, 1), VIP, 80, Proto::Tcp);
        converge_to(&c.pod_ns(0, 1), VIP, 80, Proto::Tcp, &["node-0"]);
        host_converge_dead(c, &cg, 1);
        host_converge_to(c, &cg, 0, "node-0");
    });
}

#[test]
fn upstream_should_work_for_type_nodeport_with_externaltrafficpolicy_local() {
    both("etp", |c| {
        let client = c.client();
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.external_local = true;
        svc.ports[0] = svc.ports[0].clone().node_port(30140);
        c.put(&svc, vec![c.ep(0, 0), c.ep(0, 1)]);
        converge_to(&client, c.node_ip(0), 30140, Proto::Tcp, &["node-0-pod-0", "node-0-pod-1"]);
        let r = tcp_request(&client, c.node_ip(0), 30140, T).unwrap();
        assert_eq!(*r.client_addr.ip(), CLIENT_IP, "client address preserved");
        // Node 1 has no local endpoint: dropped, like kube-proxy.
        converge_dropped(&client, c.node_ip(1), 30140, Proto::Tcp);
        // Pods on node 1 still reach the service through the NodePort (cluster-wide endpoints).
        converge_to(
            &c.pod_ns(1, 1),
            c.node_ip(1),
            30140,
            Proto::Tcp,
            &["node-0-pod-0", "node-0-pod-1"],
        );
    });
}

/// `GET /` on `addr:port` from namespace `ns`: status code and body.
fn http_get(ns: &str, addr: Ipv4Addr, port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    lab::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), T).ok()?;
        s.set_read_timeout(Some(T)).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Some((code, body))
    })
    .ok()
    .flatten()
}

#[test]
fn upstream_should_serve_health_check_node_port_for_externaltrafficpolicy_local() {
    both("healthcheck", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.external_local = true;
        svc.health_check_node_port = Some(32000);
        svc.ports[0] = svc.ports[0].clone().node_port(30180);
        c.put(&svc, vec![c.ep(0, 0), c.ep(0, 1)]);
        let client = c.client();
        let (code, body) = eventually("health check on node 0", || {
            http_get(&client, c.node_ip(0), 32000).filter(|(code, _)| *code == 200)
        });
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["localEndpoints"], 2, "{body}");
        let (code, _) =
            eventually("health check on node 1", || http_get(&client, c.node_ip(1), 32000));
        assert_eq!(code, 503, "no local endpoint on node 1");
        // Endpoints move: the answers follow.
        c.put(&svc, vec![c.ep(1, 0)]);
        eventually("node 0 now 503", || {
            http_get(&client, c.node_ip(0), 32000).filter(|(c, _)| *c == 503)
        });
        eventually("node 1 now 200", || {
            http_get(&client, c.node_ip(1), 32000).filter(|(c, _)| *c == 200)
        });
    });
}

#[test]
fn upstream_should_fail_health_check_node_port_if_there_are_only_terminating_endpoints() {
    both("healthcheck-terminating", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.external_local = true;
        svc.health_check_node_port = Some(32010);
        svc.ports[0] = svc.ports[0].clone().node_port(30190);
        let client = c.client();
        c.put(&svc, vec![c.ep(0, 0)]);
        let (_, body) = eventually("health check on node 0 passes", || {
            http_get(&client, c.node_ip(0), 32010).filter(|(code, _)| *code == 200)
        });
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["localEndpoints"], 1, "{body}");
        // The only local endpoint starts terminating (still serving): the health check fails so
        // that the load balancer drains the node...
        c.put(&svc, vec![c.ep(0, 0).terminating()]);
        let (_, body) = eventually("health check on node 0 fails", || {
            http_get(&client, c.node_ip(0), 32010).filter(|(code, _)| *code == 503)
        });
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["localEndpoints"], 0, "{body}");
        assert_eq!(v["serviceProxyHealthy"], true, "{body}");
        // ...while the traffic that still arrives is served by the terminating endpoint.
        converge_to(&client, c.node_ip(0), 30190, Proto::Tcp, &["node-0-pod-0"]);
    });
}

#[test]
fn upstream_should_implement_nodeport_and_healthchecknodeport_correctly_when_externaltrafficpolicy_changes()
 {
    both("etp-change", |c| {
        let client = c.client();
        let hc = |node: usize, want: u16| {
            eventually(&format!("health check node port of node {node} answers {want}"), || {
                http_get(&client, c.node_ip(node), 32020).filter(|(code, _)| *code == want)
            })
        };
        // The only endpoint is on node 1; the load-balancer IP arrives at node 0.
        let mut svc = load_balancer(web(VIP), 30240, true);
        svc.health_check_node_port = Some(32020);
        c.put(&svc, vec![c.ep(1, 0)]);
        // Local: node 1 passes its health check and keeps the client's address; node 0 fails it
        // and drops, through its NodePort and the load-balancer IP.
        hc(1, 200);
        hc(0, 503);
        let r =
            eventually("NodePort on node 1", || tcp_request(&client, c.node_ip(1), 30240, T).ok());
        assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), ("node-1-pod-0", CLIENT_IP));
        converge_dropped(&client, c.node_ip(0), 30240, Proto::Tcp);
        converge_dropped(&client, LB_IP, 80, Proto::Tcp);
        // Cluster (the API server takes the health check node port away): node 0 proxies to
        // the endpoint on node 1 with its own address, and the health check port is closed.
        svc.external_local = false;
        svc.health_check_node_port = None;
        c.put(&svc, vec![c.ep(1, 0)]);
        for (what, addr, port) in [("NodePort", c.node_ip(0), 30240), ("LB IP", LB_IP, 80)] {
            let r = eventually(&format!("{what} through node 0"), || {
                tcp_request(&client, addr, port, T).ok()
            });
            assert_eq!(r.server_pod, "node-1-pod-0");
            assert_eq!(*r.client_addr.ip(), c.node_ip(0), "{what}: source NAT to node 0");
        }
        for node in 0..2 {
            eventually(&format!("health check node port of node {node} closed"), || {
                http_get(&client, c.node_ip(node), 32020).is_none().then_some(())
            });
        }
        // Local again, with the same health check node port.
        svc.external_local = true;
        svc.health_check_node_port = Some(32020);
        c.put(&svc, vec![c.ep(1, 0)]);
        hc(1, 200);
        hc(0, 503);
        converge_dropped(&client, LB_IP, 80, Proto::Tcp);
        converge_dropped(&client, c.node_ip(0), 30240, Proto::Tcp);
        let r = tcp_request(&client, c.node_ip(1), 30240, T).expect("NodePort on node 1");
        assert_eq!((r.server_pod.as_str(), *r.client_addr.ip()), ("node-1-pod-0", CLIENT_IP));
    });
}

fn terminating(c: &Cluster, i: usize, j: usize) -> Endpoint {
    c.ep(i, j).terminating()
}

#[test]
fn upstream_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_cluster()
 {
    both("fallback-itp-cluster", |c| {
        let svc = web(VIP);
        c.put(&svc, vec![terminating(c, 0, 0), terminating(c, 1, 0)]);
        converge_to(&c.pod_ns(0, 2), VIP, 80, Proto::Tcp, &["node-0-pod-0", "node-1-pod-0"]);
        // With a ready endpoint, terminating ones get no new connections.
        c.put(&svc, vec![terminating(c, 0, 0), c.ep(1, 1)]);
        converge_to(&c.pod_ns(0, 2), VIP, 80, Proto::Tcp, &["node-1-pod-1"]);
    });
}

#[test]
fn upstream_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_local()
 {
    both("fallback-itp-local", |c| {
        let mut svc = web(VIP);
        svc.internal_local = true;
        c.put(&svc, vec![terminating(c, 0, 0), c.ep(1, 0)]);
        converge_to(&c.pod_ns(0, 2), VIP, 80, Proto::Tcp, &["node-0-pod-0"]);
    });
}

#[test]
fn upstream_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_cluster()
 {
    both("fallback-etp-cluster", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30150);
        c.put(&svc, vec![terminating(c, 0, 0)]);
        converge_to(&c.client(), c.node_ip(1), 30150, Proto::Tcp, &["node-0-pod-0"]);
    });
}

#[test]
fn upstream_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_local()
 {
    both("fallback-etp-local", |c| {
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.external_local = true;
        svc.ports[0] = svc.ports[0].clone().node_port(30160);
        c.put(&svc, vec![terminating(c, 0, 0), c.ep(1, 0)]);
        converge_to(&c.client(), c.node_ip(0), 30160, Proto::Tcp, &["node-0-pod-0"]);
        converge_to(&c.client(), c.node_ip(1), 30160, Proto::Tcp, &["node-1-pod-0"]);
    });
}

#[test]
fn upstream_should_release_nodeports_on_delete() {
    both("release", |c| {
        let client = c.client();
        let mut svc = web(VIP);
        svc.svc_type = SvcType::NodePort;
        svc.ports[0] = svc.ports[0].clone().node_port(30170);
        c.put(&svc, vec![c.ep(0, 0)]);
        converge_to(&client, c.node_ip(0), 30170, Proto::Tcp, &["node-0-pod-0"]);
        c.dir.remove("web.yaml").unwrap();
        converge_dead(&client, c.node_ip(0), 30170, Proto::Tcp);
        // The port can be used by another service at once.
        let mut other = web(VIP2);
        other.name = "other".into();
        other.svc_type = SvcType::NodePort;
        other.ports[0] = other.ports[0].clone().node_port(30170);
        c.put(&other, vec![c.ep(1, 2)]);
        converge_to(&client, c.node_ip(0), 30170, Proto::Tcp, &["node-1-pod-2"]);
    });
}

// ---- IPv6 and dual stack ----

const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x20);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x10);
const LB_IP6_STICKY: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x11);
const LB_IP6_STICKY_LOCAL: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x12);
/// A load-balancer IP restricted to the client's address.
const LB_IP6_RANGED: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x13);
/// A load-balancer IP restricted to a network holding no client.
const LB_IP6_NOBODY: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc8, 0, 0, 0, 0, 0x14);

/// The `n`-th IPv6 ClusterIP of the IPv6 checks: 2001:2:ff::(0x10+n).
fn vip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0, 0x10 + n)
}

/// The `n`-th IPv4 ClusterIP of the IPv6 checks: 198.19.6.n.
fn vip4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 6, n)
}

impl Cluster {
    fn pod_ip6(&self, i: usize, j: usize) -> Ipv6Addr {
        self.lab.pod(i, j).expect("pod").ip6.expect("dual-stack pod")
    }

    fn node_ip6(&self, i: usize) -> Ipv6Addr {
        self.lab.node(i).ip6.expect("dual-stack node")
    }

    fn ep6(&self, i: usize, j: usize) -> Endpoint {
        let p = self.lab.pod(i, j).expect("pod");
        Endpoint::ready(self.pod_ip6(i, j), &lab::node_name(i), &p.name)
    }

    /// Writes `svc` with an IPv4 slice of pods `eps` and an IPv6 slice of the same pods.
    fn put_dual(&self, svc: &Service, eps: &[(usize, usize)]) {
        let v4 = eps.iter().map(|&(i, j)| self.ep(i, j)).collect();
        let v6 = eps.iter().map(|&(i, j)| self.ep6(i, j)).collect();
        let slices = [Slice::for_service(svc, v4), Slice::for_service6(svc, v6)];
        self.dir.put(svc, &slices).expect("write manifests");
    }

    /// [`Self::put_dual`] with the pods `ready` ready and the pods `terminating` terminating
    /// (still serving).
    fn put_dual_terminating(
        &self,
        svc: &Service,
        ready: &[(usize, usize)],
        terminating: &[(usize, usize)],
    ) {
        let pods =
            || ready.iter().map(|&p| (p, false)).chain(terminating.iter().map(|&p| (p, true)));
        let mark = |ep: Endpoint, t: bool| if t { ep.terminating() } else { ep };
        let v4 = pods().map(|((i, j), t)| mark(self.ep(i, j), t)).collect();
        let v6 = pods().map(|((i, j), t)| mark(self.ep6(i, j), t)).collect();
        let slices = [Slice::for_service(svc, v4), Slice::for_service6(svc, v6)];
        self.dir.put(svc, &slices).expect("write manifests");
    }

    /// The frontends of node `node`'s datapath, as `kproxy service list` prints them
    /// (`ADDR:PORT PROTO SCOPE`).
    fn frontends(&self, node: usize) -> BTreeSet<String> {
        let k = lab::find_bin("kproxy").unwrap();
        let pin = self.lab.pin_path(node).to_string_lossy().into_owned();
        let argv = [&*k.to_string_lossy(), "service", "list", "--pin-path", &pin];
        let out = exec(&self.lab.node(node).ns, &argv).expect("kproxy service list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    }
}

fn tcp6(ns: &str, addr: Ipv6Addr, port: u16) -> Result<Reply6, RequestError> {
    tcp_request6(ns, addr, port, T)
}

/// [`converge_to`] over IPv6 (TCP).
fn converge_to6(ns: &str, addr: Ipv6Addr, port: u16, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("[{addr}]:{port} served by exactly {want:?}"), || {
        let mut seen = BTreeSet::new();
        for _ in 0..(8 * want.len()).max(6) {
            match tcp6(ns, addr, port) {
                Ok(r) if want.contains(&r.server_pod) => {
                    seen.insert(r.server_pod);
                }
                _ => return None,
            }
        }
        (seen == want).then_some(())
    });
}

/// A dual-stack TCP web Service on port 80 with ClusterIPs `vip4(n)` and `vip6(n)`.
fn web_dual(name: &str, n: u8, policy: &str) -> Service {
    let mut svc = web(vip4(n));
    svc.name = name.into();
    svc.cluster_ip6 = Some(vip6(n.into()));
    svc.ip_family_policy = Some(policy.into());
    svc
}

/// One IPv6 check: it panics when the behaviour fails.
type Check = fn(&Cluster);

/// The IPv6 checks, in order; each runs even when an earlier one failed.
const IPV6_CHECKS: &[(&str, Check)] = &[
    ("ClusterIP from a pod (TCP and UDP)", ipv6_cluster_ip),
    ("NodePort, externalTrafficPolicy Cluster", ipv6_node_port_cluster),
    ("NodePort, externalTrafficPolicy Local", ipv6_node_port_local),
    ("reject without endpoints (TCP RST, ICMPv6 port unreachable)", ipv6_reject),
    ("session affinity", ipv6_session_affinity),
    ("hairpin", ipv6_hairpin),
    ("externalIP", ipv6_external_ip),
    ("LoadBalancer ingress IP", ipv6_load_balancer),
    ("ipFamilyPolicy programs the right frontends", ipv6_family_policies),
    ("SingleStack -> PreferDualStack -> SingleStack", ipv6_policy_change),
    ("NodePort session affinity", ipv6_node_port_affinity),
    ("LoadBalancer session affinity, ESIPP off and on", ipv6_load_balancer_affinity),
    ("internalTrafficPolicy Local", ipv6_internal_local),
    ("fallback to terminating endpoints (internal and external, Cluster and Local)", ipv6_fallback),
    ("loadBalancerSourceRanges", ipv6_source_ranges),
    ("closed service addresses and the service CIDR", ipv6_closed_addresses),
];

/// Every Service the IPv6 checks use, written at once so that one sync programs them all.
fn ipv6_services(c: &Cluster) {
    let two = [(0, 1), (1, 1)];
    let mut web6 = web_dual("v6web", 1, "RequireDualStack");
    web6.ports.push(Port::udp("udp", 81, SERVER_PORT));
    c.put_dual(&web6, &two);
    let np = |name: &str, n: u8, node_port: u16, local: bool| {
        let mut svc = web_dual(name, n, "RequireDualStack");
        svc.svc_type = SvcType::NodePort;
        svc.external_local = local;
        svc.ports[0] = svc.ports[0].clone().node_port(node_port);
        svc
    };
    c.put_dual(&np("v6np", 2, 30600, false), &two);
    c.put_dual(&np("v6npl", 3, 30601, true), &two);
    let mut empty = web_dual("v6empty", 4, "SingleStack");
    empty.cluster_ip = None;
    empty.ports.push(Port::udp("udp", 80, SERVER_PORT));
    c.put_dual(&empty, &[]);
    let mut sticky = web_dual("v6sticky", 5, "RequireDualStack");
    sticky.affinity_timeout = Some(10800);
    c.put_dual(&sticky, &[(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
    c.put_dual(&web_dual("v6hair", 6, "RequireDualStack"), &[(0, 0)]);
    let mut ext = web_dual("v6ext", 7, "RequireDualStack");
    ext.external_ips6 = vec![EXTERNAL_IP6];
    c.put_dual(&ext, &two);
    let mut lb = np("v6lb", 8, 30602, false);
    lb.svc_type = SvcType::LoadBalancer;
    lb.lb_ips6 = vec![LB_IP6];
    c.put_dual(&lb, &two);
    c.put_dual(&web_dual("v6prefer", 9, "PreferDualStack"), &[(1, 0)]);
    let mut single6 = web_dual("v6single6", 10, "SingleStack");
    single6.cluster_ip = None;
    c.put_dual(&single6, &[(1, 0)]);
    let mut single4 = web_dual("v6single4", 11, "SingleStack");
    single4.cluster_ip6 = None;
    c.put_dual(&single4, &[(1, 0)]);
    let mut flip = web_dual("v6flip", 12, "SingleStack");
    flip.cluster_ip6 = None;
    c.put_dual(&flip, &[(1, 2)]);
    let all = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)];
    let mut np_sticky = np("v6npsticky", 13, 30603, false);
    np_sticky.affinity_timeout = Some(10800);
    c.put_dual(&np_sticky, &all);
    for (name, n, ip, node_port, esipp) in [
        ("v6lbsticky", 14, LB_IP6_STICKY, 30604, false),
        ("v6lbstickyl", 15, LB_IP6_STICKY_LOCAL, 30605, true),
    ] {
        let mut lb = np(name, n, node_port, esipp);
        lb.svc_type = SvcType::LoadBalancer;
        lb.lb_ips6 = vec![ip];
        lb.health_check_node_port = esipp.then_some(node_port + 2000);
        lb.affinity_timeout = Some(10800);
        c.put_dual(&lb, &all);
    }
    let mut itp = web_dual("v6itp", 16, "RequireDualStack");
    itp.internal_local = true;
    c.put_dual(&itp, &[(0, 0), (1, 0)]);
    let mut itp_one = web_dual("v6itpone", 17, "RequireDualStack");
    itp_one.internal_local = true;
    c.put_dual(&itp_one, &[(0, 0)]);
    // Fallback to serving terminating endpoints: all terminating (Cluster policies), or the
    // node's own terminating one beside a ready one elsewhere (Local policies).
    let fb = web_dual("v6fbitpc", 18, "RequireDualStack");
    c.put_dual_terminating(&fb, &[], &[(0, 0), (1, 0)]);
    let mut fb = web_dual("v6fbitpl", 19, "RequireDualStack");
    fb.internal_local = true;
    c.put_dual_terminating(&fb, &[(1, 0)], &[(0, 0)]);
    c.put_dual_terminating(&np("v6fbetpc", 20, 30606, false), &[], &[(0, 0)]);
    c.put_dual_terminating(&np("v6fbetpl", 21, 30607, true), &[(1, 0)], &[(0, 0)]);
    for (name, n, ip, node_port, range) in [
        ("v6ranged", 22, LB_IP6_RANGED, 30608, format!("{CLIENT_IP6}/128")),
        ("v6nobody", 23, LB_IP6_NOBODY, 30609, "2001:2:77::/48".to_string()),
    ] {
        let mut lb = np(name, n, node_port, false);
        lb.svc_type = SvcType::LoadBalancer;
        lb.lb_ips6 = vec![ip];
        lb.source_ranges = vec!["198.18.250.0/24".into(), range];
        c.put_dual(&lb, &two);
    }
}

fn ipv6_cluster_ip(c: &Cluster) {
    let pod = c.pod_ns(1, 2);
    converge_to6(&pod, vip6(1), 80, &["node-0-pod-1", "node-1-pod-1"]);
    let r = tcp6(&pod, vip6(1), 80).expect("answer");
    assert_eq!(*r.client_addr.ip(), c.pod_ip6(1, 2), "source pod address preserved");
    // UDP over IPv6.
    let r = eventually("IPv6 UDP answer", || udp_request6(&pod, vip6(1), 81, T).ok());
    assert!(["node-0-pod-1", "node-1-pod-1"].contains(&r.server_pod.as_str()), "{r:?}");
    assert_eq!(*r.client_addr.ip(), c.pod_ip6(1, 2), "UDP source pod address preserved");
    // The same Service over IPv4 at the same time.
    converge_to(&pod, vip4(1), 80, Proto::Tcp, &["node-0-pod-1", "node-1-pod-1"]);
}

fn ipv6_node_port_cluster(c: &Cluster) {
    for i in 0..2 {
        converge_to6(&c.client(), c.node_ip6(i), 30600, &["node-0-pod-1", "node-1-pod-1"]);
    }
}

fn ipv6_node_port_local(c: &Cluster) {
    for i in 0..2 {
        let local = format!("node-{i}-pod-1");
        converge_to6(&c.client(), c.node_ip6(i), 30601, &[&local]);
        let r = tcp6(&c.client(), c.node_ip6(i), 30601).expect("answer");
        assert_eq!(*r.client_addr.ip(), CLIENT_IP6, "client address preserved");
    }
}

fn ipv6_reject(c: &Cluster) {
    let e = eventually("IPv6 TCP refused", || {
        tcp6(&c.pod_ns(0, 0), vip6(4), 80).err().filter(RequestError::is_refused)
    });
    assert!(e.is_refused());
    let e = eventually("IPv6 UDP refused", || {
        udp_request6(&c.pod_ns(0, 0), vip6(4), 80, T).err().filter(RequestError::is_refused)
    });
    assert!(e.is_refused(), "UDP gets an ICMPv6 port unreachable, not a timeout");
}

fn ipv6_session_affinity(c: &Cluster) {
    let pod = c.pod_ns(1, 2);
    eventually("served", || tcp6(&pod, vip6(5), 80).ok());
    let seen: BTreeSet<String> =
        (0..20).filter_map(|_| tcp6(&pod, vip6(5), 80).ok()).map(|r| r.server_pod).collect();
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
}

fn ipv6_hairpin(c: &Cluster) {
    let r = eventually("hairpin", || tcp6(&c.pod_ns(0, 0), vip6(6), 80).ok());
    assert_eq!(r.server_pod, "node-0-pod-0");
    let r = tcp6(&c.pod_ns(0, 1), vip6(6), 80).expect("another pod");
    assert_eq!(*r.client_addr.ip(), c.pod_ip6(0, 1));
}

fn ipv6_external_ip(c: &Cluster) {
    converge_to6(&c.client(), EXTERNAL_IP6, 80, &["node-0-pod-1", "node-1-pod-1"]);
}

fn ipv6_load_balancer(c: &Cluster) {
    converge_to6(&c.client(), LB_IP6, 80, &["node-0-pod-1", "node-1-pod-1"]);
    converge_to6(&c.pod_ns(1, 2), LB_IP6, 80, &["node-0-pod-1", "node-1-pod-1"]);
}

fn ipv6_family_policies(c: &Cluster) {
    let pod = c.pod_ns(0, 2);
    // PreferDualStack with both ClusterIPs: both families served.
    converge_to6(&pod, vip6(9), 80, &["node-1-pod-0"]);
    converge_to(&pod, vip4(9), 80, Proto::Tcp, &["node-1-pod-0"]);
    // SingleStack IPv6 and SingleStack IPv4: their one family.
    converge_to6(&pod, vip6(10), 80, &["node-1-pod-0"]);
    converge_to(&pod, vip4(11), 80, Proto::Tcp, &["node-1-pod-0"]);
    let fe = c.frontends(0);
    let has = |f: String| fe.contains(&format!("{f} TCP internal"));
    for n in [1, 9] {
        assert!(
            has(format!("{}:80", vip4(n))) && has(format!("[{}]:80", vip6(n.into()))),
            "{fe:?}"
        );
    }
    assert!(has(format!("[{}]:80", vip6(10))) && !has(format!("{}:80", vip4(10))), "{fe:?}");
    assert!(has(format!("{}:80", vip4(11))) && !has(format!("[{}]:80", vip6(11))), "{fe:?}");
}

fn ipv6_policy_change(c: &Cluster) {
    let pod = c.pod_ns(0, 2);
    let mut flip = web_dual("v6flip", 12, "SingleStack");
    flip.cluster_ip6 = None;
    converge_to(&pod, vip4(12), 80, Proto::Tcp, &["node-1-pod-2"]);
    let ipv6_fe = format!("[{}]:80 TCP internal", vip6(12));
    assert!(!c.frontends(0).contains(&ipv6_fe));
    // PreferDualStack: the API server allocates the IPv6 ClusterIP; the IPv6 frontend appears.
    flip.cluster_ip6 = Some(vip6(12));
    flip.ip_family_policy = Some("PreferDualStack".into());
    c.put_dual(&flip, &[(1, 2)]);
    converge_to6(&pod, vip6(12), 80, &["node-1-pod-2"]);
    // Back to SingleStack: the IPv6 frontend goes, IPv4 keeps serving.
    flip.cluster_ip6 = None;
    flip.ip_family_policy = Some("SingleStack".into());
    c.put_dual(&flip, &[(1, 2)]);
    eventually("IPv6 frontend removed", || (!c.frontends(0).contains(&ipv6_fe)).then_some(()));
    assert!(tcp6(&pod, vip6(12), 80).is_err(), "the removed IPv6 ClusterIP still answers");
    converge_to(&pod, vip4(12), 80, Proto::Tcp, &["node-1-pod-2"]);
}

/// The pods that answer 20 TCP requests of `ns` to `[addr]:port` (errors are not counted).
fn sticky6(ns: &str, addr: Ipv6Addr, port: u16) -> BTreeSet<String> {
    (0..20).filter_map(|_| tcp6(ns, addr, port).ok()).map(|r| r.server_pod).collect()
}

/// Upstream's session affinity for NodePort, over IPv6: one client, one backend of six, on
/// either node.
fn ipv6_node_port_affinity(c: &Cluster) {
    let client = c.client();
    for i in 0..2 {
        let node = c.node_ip6(i);
        eventually("served", || tcp6(&client, node, 30603).ok());
        let seen = sticky6(&client, node, 30603);
        assert_eq!(seen.len(), 1, "node {i}: one client, one backend: {seen:?}");
    }
}

/// Upstream's `execAffinityTestForLBService` over IPv6, ESIPP off and on (on: the node the
/// load-balancer IP arrives at, node 0, serves it from its own pods and keeps the client's
/// address).
fn ipv6_load_balancer_affinity(c: &Cluster) {
    let client = c.client();
    for (ip, esipp) in [(LB_IP6_STICKY, false), (LB_IP6_STICKY_LOCAL, true)] {
        eventually("served through the load-balancer IP", || tcp6(&client, ip, 80).ok());
        let replies: Vec<Reply6> = (0..20).filter_map(|_| tcp6(&client, ip, 80).ok()).collect();
        if esipp {
            for r in &replies {
                assert!(r.server_pod.starts_with("node-0-"), "ESIPP: {} answered", r.server_pod);
                assert_eq!(*r.client_addr.ip(), CLIENT_IP6, "ESIPP keeps the client's address");
            }
        }
        let seen: BTreeSet<String> = replies.into_iter().map(|r| r.server_pod).collect();
        assert_eq!(seen.len(), 1, "[{ip}] (ESIPP {esipp}): one client, one backend: {seen:?}");
    }
}

/// Upstream's internalTrafficPolicy Local over IPv6: each node's pods reach their node's
/// endpoint only, and a node without a local endpoint drops (no fallback to remote ones).
fn ipv6_internal_local(c: &Cluster) {
    converge_to6(&c.pod_ns(0, 2), vip6(16), 80, &["node-0-pod-0"]);
    converge_to6(&c.pod_ns(1, 2), vip6(16), 80, &["node-1-pod-0"]);
    converge_to6(&c.pod_ns(0, 2), vip6(17), 80, &["node-0-pod-0"]);
    for _ in 0..5 {
        let r = tcp6(&c.pod_ns(1, 2), vip6(17), 80);
        assert!(r.is_err(), "node 1 reached {r:?} without a local endpoint");
    }
}

/// Upstream's fallback to terminating endpoints over IPv6, for internal and external traffic
/// policies, Cluster and Local.
fn ipv6_fallback(c: &Cluster) {
    // internalTrafficPolicy Cluster, every endpoint terminating: all of them serve.
    converge_to6(&c.pod_ns(0, 2), vip6(18), 80, &["node-0-pod-0", "node-1-pod-0"]);
    // internalTrafficPolicy Local: the node's own terminating endpoint, not the remote ready one.
    converge_to6(&c.pod_ns(0, 2), vip6(19), 80, &["node-0-pod-0"]);
    // externalTrafficPolicy Cluster: the only (terminating) endpoint, through either node.
    for i in 0..2 {
        converge_to6(&c.client(), c.node_ip6(i), 30606, &["node-0-pod-0"]);
    }
    // externalTrafficPolicy Local: node 0 its terminating endpoint, node 1 its ready one.
    converge_to6(&c.client(), c.node_ip6(0), 30607, &["node-0-pod-0"]);
    converge_to6(&c.client(), c.node_ip6(1), 30607, &["node-1-pod-0"]);
}

/// `loadBalancerSourceRanges` over IPv6 (as the IPv4 check of the safety tests): the IPv6
/// load-balancer IP serves the client its range holds, not a pod outside it; a range holding
/// no client serves nobody; the service's ClusterIP is not restricted.
fn ipv6_source_ranges(c: &Cluster) {
    let two = ["node-0-pod-1", "node-1-pod-1"];
    converge_to6(&c.client(), LB_IP6_RANGED, 80, &two);
    converge_to6(&c.pod_ns(0, 2), vip6(22), 80, &two);
    for (ns, ip, what) in [
        (c.pod_ns(0, 2), LB_IP6_RANGED, "a pod outside the range"),
        (c.client(), LB_IP6_NOBODY, "the client outside the range"),
        (c.pod_ns(1, 2), LB_IP6_NOBODY, "a pod outside the range"),
    ] {
        let r = tcp6(&ns, ip, 80);
        assert!(r.as_ref().is_err_and(|e| e.is_timeout()), "{what} to [{ip}]: {r:?}");
    }
}

/// An IPv6 ClusterIP on a port its service does not define is refused at once (TCP RST,
/// ICMPv6 port unreachable), not left to the node; an address of the IPv6 service CIDR that no
/// service holds is dropped.
fn ipv6_closed_addresses(c: &Cluster) {
    let pod = c.pod_ns(0, 2);
    converge_to6(&pod, vip6(1), 80, &["node-0-pod-1", "node-1-pod-1"]);
    let e = eventually("IPv6 TCP to an undefined port refused", || {
        tcp6(&pod, vip6(1), 82).err().filter(RequestError::is_refused)
    });
    assert!(e.is_refused());
    let r = udp_request6(&pod, vip6(1), 82, T);
    assert!(r.as_ref().is_err_and(|e| e.is_refused()), "UDP to an undefined port: {r:?}");
    let r = tcp6(&pod, vip6(99), 80);
    assert!(r.as_ref().is_err_and(|e| e.is_timeout()), "unallocated service address: {r:?}");
}

/// The IPv6 data-plane behaviours and the dual-stack ones ([`IPV6_CHECKS`]) in one dual-stack
/// lab per wiring; the failure names every check that did not pass.
#[test]
fn ipv6_data_plane_behaviours() {
    for wiring in [Wiring::Routed, Wiring::Bridged] {
        let c = Cluster::dual_stack(wiring, "ipv6");
        ipv6_services(&c);
        let failed: Vec<&str> = IPV6_CHECKS
            .iter()
            .filter(|(name, check)| {
                let ok = catch_unwind(AssertUnwindSafe(|| check(&c))).is_ok();
                eprintln!("IPv6 {wiring}: {name}: {}", if ok { "passes" } else { "FAILS" });
                !ok
            })
            .map(|(name, _)| *name)
            .collect();
        assert!(failed.is_empty(), "IPv6 checks failing ({wiring} wiring): {failed:?}");
    }
}

/// The list the summary counts against names every `upstream_*` test of this file, once (a
/// test outside it would not be counted; a name listed twice would be counted twice).
#[test]
fn behaviour_list_names_every_upstream_test() {
    let source = include_str!("conformance.rs");
    let tests: BTreeSet<&str> = source
        .lines()
        .filter_map(|l| l.strip_prefix("fn "))
        .filter(|rest| rest.starts_with("upstream_"))
        .filter_map(|rest| rest.split('(').next())
        .collect();
    assert!(tests.len() > 30, "found {} upstream_* tests: {tests:?}", tests.len());
    let listed: BTreeSet<&str> = UPSTREAM_BEHAVIOURS.iter().copied().collect();
    assert_eq!(listed.len(), UPSTREAM_BEHAVIOURS.len(), "a behaviour is listed twice");
    let unlisted: Vec<&&str> = tests.difference(&listed).collect();
    assert!(unlisted.is_empty(), "upstream_* tests missing from UPSTREAM_BEHAVIOURS: {unlisted:?}");
}
