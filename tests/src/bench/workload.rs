//! The Services and EndpointSlices of a benchmark run, in the two forms the systems under test
//! read: Kubernetes JSON for the kproxy agent (`--manifests`) and [`baseline::ServicePort`]s for
//! the kube-proxy-equivalent rule sets. The probed services always come last (last in the
//! iptables `KUBE-SERVICES` scan, the worst case a user meets).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use crate::{
    baseline::{self, NodeSettings},
    lab,
};

/// Namespace of every benchmark object.
pub const NAMESPACE: &str = "bench";
/// ClusterIP of the probed ClusterIP service (one endpoint: node-1-pod-0:8080).
pub const PROBE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// Service port of the probed ClusterIP service.
pub const PROBE_PORT: u16 = 80;
/// A second server port of the probed service's endpoint that no service uses: the direct
/// connections that take turns with the service's in item 1 (`p50_over_direct`) go there, so
/// that a direct connection never reuses the server-side 4-tuple of a translated one still in
/// TIME_WAIT (see the port ranges in the bench's `clusterip_one`).
pub const DIRECT_PORT: u16 = 8090;
/// ClusterIP of the NodePort service whose backend is on node 0 (its iperf3 port: a ClusterIP
/// flow to a local backend).
pub const NP_LOCAL_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// ClusterIP of the NodePort service whose backend is on node 1.
pub const NP_REMOTE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 3);
/// NodePort (TCP, iperf3) of the service whose backend is on node 0 (local).
pub const NP_LOCAL_TCP: u16 = 30001;
/// NodePort (UDP, sink) of the service whose backend is on node 0 (local).
pub const NP_LOCAL_UDP: u16 = 30002;
/// NodePort (TCP, iperf3) of the service whose backend is on node 1 (remote).
pub const NP_REMOTE_TCP: u16 = 30011;
/// NodePort (UDP, sink) of the service whose backend is on node 1 (remote).
pub const NP_REMOTE_UDP: u16 = 30012;
/// IPv6 ClusterIP of the probe service in the dual-stack lab of the IPv6 windows.
pub const PROBE_IP6: Ipv6Addr = ipv6_cluster_ip(1);
/// IPv6 ClusterIP of the NodePort service whose backend is on node 0 (dual-stack lab).
pub const NP_LOCAL_CLUSTER_IP6: Ipv6Addr = ipv6_cluster_ip(2);
/// IPv6 ClusterIP of the NodePort service whose backend is on node 1 (dual-stack lab).
pub const NP_REMOTE_CLUSTER_IP6: Ipv6Addr = ipv6_cluster_ip(3);

/// IPv6 twin of the probes' ClusterIP 198.19.255.`k`: 2001:2:ff::ff:`k` (hex).
const fn ipv6_cluster_ip(k: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 0xff, k)
}

/// Port of the iperf3 servers in the backend pods.
pub const IPERF_PORT: u16 = 5201;
/// UDP port of the silent sink sockets the harness holds in the backend pods.
pub const SINK_PORT: u16 = 9999;

/// One port of a benchmark service.
#[derive(Debug, Clone)]
pub struct BPort {
    /// Port name.
    pub name: &'static str,
    /// `TCP` or `UDP`.
    pub udp: bool,
    /// Service port.
    pub port: u16,
    /// Target port.
    pub target: u16,
    /// NodePort.
    pub node_port: Option<u16>,
}

/// One benchmark service with its endpoints (all ready).
#[derive(Debug, Clone)]
pub struct BService {
    /// Name.
    pub name: String,
    /// ClusterIP: the service is single-stack of its family, its endpoints of the same one.
    pub cluster_ip: IpAddr,
    /// Ports.
    pub ports: Vec<BPort>,
    /// Endpoints: address, node index.
    pub endpoints: Vec<(IpAddr, usize)>,
}

impl BService {
    fn http(name: String, ip: IpAddr, target: u16, endpoints: Vec<(IpAddr, usize)>) -> Self {
        let ports =
            vec![BPort { name: "http", udp: false, port: PROBE_PORT, target, node_port: None }];
        BService { name, cluster_ip: ip, ports, endpoints }
    }

    /// The IPv4 ClusterIP of a service built IPv4 ([`probes`], [`fillers`], [`dynamic`]).
    pub fn cluster_ip4(&self) -> Ipv4Addr {
        match self.cluster_ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => panic!("service {} is IPv6 ({ip})", self.name),
        }
    }

    /// The Service and EndpointSlice as Kubernetes JSON objects.
    pub fn to_json(&self) -> [Value; 2] {
        let np = self.ports.iter().any(|p| p.node_port.is_some());
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = json!({"name": p.name, "protocol": if p.udp {"UDP"} else {"TCP"},
                    "port": p.port, "targetPort": p.target});
                if let Some(n) = p.node_port {
                    v["nodePort"] = json!(n);
                }
                v
            })
            .collect();
        let mut spec = json!({"type": if np {"NodePort"} else {"ClusterIP"},
            "clusterIP": self.cluster_ip.to_string(), "clusterIPs": [self.cluster_ip.to_string()],
            "ports": ports});
        let v6 = self.cluster_ip.is_ipv6();
        if v6 {
            spec["ipFamilyPolicy"] = json!("SingleStack");
            spec["ipFamilies"] = json!(["IPv6"]);
        }
        if np {
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": NAMESPACE}, "spec": spec});
        let slice_ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "protocol": if p.udp {"UDP"} else {"TCP"}, "port": p.target}))
            .collect();
        let eps: Vec<Value> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(k, (ip, node))| {
                json!({"addresses": [ip.to_string()], "nodeName": lab::node_name(*node),
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": format!("{}-ep{k}", self.name)}})
            })
            .collect();
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-1", self.name), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "kproxy-bench"}},
            "addressType": if v6 {"IPv6"} else {"IPv4"}, "ports": slice_ports, "endpoints": eps});
        [svc, slice]
    }

    /// The service ports as kube-proxy sees them, for rules written on node `node`.
    pub fn to_baseline(&self, node: usize) -> Vec<baseline::ServicePort> {
        self.ports
            .iter()
            .map(|p| baseline::ServicePort {
                namespace: NAMESPACE.into(),
                name: self.name.clone(),
                port_name: p.name.into(),
                proto: if p.udp { baseline::Proto::Udp } else { baseline::Proto::Tcp },
                cluster_ip: self.cluster_ip,
                port: p.port,
                node_port: p.node_port,
                external_ips: vec![],
                lb_ips: vec![],
                external_local: false,
                affinity_timeout: None,
                endpoints: self
                    .endpoints
                    .iter()
                    .map(|(ip, n)| baseline::Endpoint {
                        ip: *ip,
                        port: p.target,
                        local: *n == node,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `n` filler services with `eps` endpoints each (never probed). Endpoint (address, port)
/// pairs are unique across the whole set, so no datapath can share backends between services.
pub fn fillers(n: usize, eps: usize) -> Vec<BService> {
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 1));
    let ep_base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    filler_set(n, eps, |i| Ipv4Addr::from(base + i).into(), |k| Ipv4Addr::from(ep_base + k).into())
}

/// [`fillers`] over IPv6 (single-stack IPv6 services, for the IPv6 latency step): ClusterIPs
/// 2001:2:ff::1:0 + i (beside the probes' 2001:2:ff::ff:k), endpoints in 2001:2:ee::/64 (no
/// lab address).
pub fn fillers6(n: usize, eps: usize) -> Vec<BService> {
    let base = u128::from(Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 1, 0));
    let ep_base = u128::from(Ipv6Addr::new(0x2001, 2, 0xee, 0, 0, 0, 0, 0x100));
    filler_set(
        n,
        eps,
        |i| Ipv6Addr::from(base + u128::from(i)).into(),
        |k| Ipv6Addr::from(ep_base + u128::from(k)).into(),
    )
}

/// `n` filler services: service `i` at `cluster_ip(i)`, its endpoints at `endpoint(k)` for
/// k < 32,000 (32,000 distinct addresses per target port; services of one port group share the
/// port).
fn filler_set(
    n: usize,
    eps: usize,
    cluster_ip: impl Fn(u32) -> IpAddr,
    endpoint: impl Fn(u32) -> IpAddr,
) -> Vec<BService> {
    let per_group = (32_000 / eps.max(1)).max(1);
    (0..n)
        .map(|i| {
            let target = 10_000 + (i / per_group) as u16;
            let endpoints =
                (0..eps).map(|e| (endpoint(((i * eps + e) % 32_000) as u32), 1)).collect();
            BService::http(format!("f{i}"), cluster_ip(i as u32), target, endpoints)
        })
        .collect()
}

/// The IPv6 halves of the dual-stack probes of [`probes_dual_manifest`] as the baselines see
/// them (kube-proxy's IPv6 proxier): the same names, ports and NodePorts, the IPv6 ClusterIPs,
/// the backend pods' IPv6 addresses.
pub fn probes6() -> Vec<BService> {
    let ip6 = [PROBE_IP6, NP_LOCAL_CLUSTER_IP6, NP_REMOTE_CLUSTER_IP6];
    probes()
        .into_iter()
        .map(|mut s| {
            let k = s.cluster_ip4().octets()[3];
            let v6 =
                *ip6.iter().find(|a| a.segments()[7] == u16::from(k)).expect("a probe ClusterIP");
            s.cluster_ip = v6.into();
            for (ip, node) in &mut s.endpoints {
                let IpAddr::V4(v4) = *ip else { unreachable!("the probes are built IPv4") };
                *ip = lab::pod_ip6(*node, (v4.octets()[3] - 10) as usize).into();
            }
            s
        })
        .collect()
}

/// The IPv6 probe service of the IPv6 latency step as the baselines see it (the IPv6 half of
/// the dual-stack `probe` of [`probes_dual_manifest`]): [`PROBE_IP6`] → node-1-pod-0's IPv6
/// address.
pub fn probe6() -> BService {
    BService::http(
        "probe".into(),
        PROBE_IP6.into(),
        lab::SERVER_PORT,
        vec![(lab::pod_ip6(1, 0).into(), 1)],
    )
}

/// The probed services: the ClusterIP probe and the two NodePort services (backend on node 0,
/// backend on node 1).
pub fn probes() -> Vec<BService> {
    let np = |name: &str, ip: Ipv4Addr, tcp: u16, udp: u16, ep: (Ipv4Addr, usize)| BService {
        name: name.into(),
        cluster_ip: ip.into(),
        ports: vec![
            BPort {
                name: "iperf",
                udp: false,
                port: IPERF_PORT,
                target: IPERF_PORT,
                node_port: Some(tcp),
            },
            BPort { name: "sink", udp: true, port: 9, target: SINK_PORT, node_port: Some(udp) },
        ],
        endpoints: vec![(ep.0.into(), ep.1)],
    };
    vec![
        np("np-local", NP_LOCAL_CLUSTER_IP, NP_LOCAL_TCP, NP_LOCAL_UDP, (lab::pod_ip(0, 1), 0)),
        np("np-remote", NP_REMOTE_CLUSTER_IP, NP_REMOTE_TCP, NP_REMOTE_UDP, (lab::pod_ip(1, 0), 1)),
        BService::http(
            "probe".into(),
            PROBE_IP.into(),
            lab::SERVER_PORT,
            vec![(lab::pod_ip(1, 0).into(), 1)],
        ),
    ]
}

/// The probes of [`probes`] as dual-stack services (`RequireDualStack`, the IPv6 ClusterIPs
/// above) with an IPv6 EndpointSlice beside the IPv4 one (the same pods' IPv6 addresses), as the
/// agent's manifest: for the dual-stack lab of the IPv6 bpf_stats windows.
pub fn probes_dual_manifest() -> String {
    let ip6 = [PROBE_IP6, NP_LOCAL_CLUSTER_IP6, NP_REMOTE_CLUSTER_IP6];
    let mut items = Vec::new();
    for s in probes() {
        let [mut svc, slice] = s.to_json();
        let k = s.cluster_ip4().octets()[3];
        let v6 = *ip6.iter().find(|a| a.segments()[7] == u16::from(k)).expect("a probe ClusterIP");
        svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
        svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        svc["spec"]["clusterIPs"] = json!([s.cluster_ip.to_string(), v6.to_string()]);
        let mut slice6 = slice.clone();
        slice6["metadata"]["name"] = json!(format!("{}-2", s.name));
        slice6["addressType"] = json!("IPv6");
        for (e, (ip, node)) in s.endpoints.iter().enumerate() {
            let IpAddr::V4(ip) = ip else { unreachable!("the probes are built IPv4") };
            let j = (ip.octets()[3] - 10) as usize;
            debug_assert_eq!(*ip, lab::pod_ip(*node, j), "probe endpoints are lab pods");
            slice6["endpoints"][e]["addresses"] = json!([lab::pod_ip6(*node, j).to_string()]);
        }
        items.extend([svc, slice, slice6]);
    }
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("JSON values serialize")
}

/// A service created (or changed) while the benchmark runs, named `{prefix}{k}`, → node-1-pod-0:8080
/// plus `extra` dummy endpoints. Each prefix has its own ClusterIP block (k < 1000), so services
/// of different kinds never share an address: `chg` 198.19.240.0/22, `lat` 198.19.244.0/22,
/// anything else 198.19.248.0/22.
pub fn dynamic(k: usize, prefix: &str, extra: usize) -> BService {
    let block: u8 = match prefix {
        "chg" => 240,
        "lat" => 244,
        _ => 248,
    };
    let ip = Ipv4Addr::new(198, 19, block + (k / 250 % 4) as u8, (k % 250 + 1) as u8);
    let mut eps = vec![(lab::pod_ip(1, 0).into(), 1)];
    eps.extend((0..extra).map(|e| (Ipv4Addr::new(198, 18, 127, (e % 250 + 1) as u8).into(), 1)));
    BService::http(format!("{prefix}{k}"), ip.into(), lab::SERVER_PORT, eps)
}

/// The agent's manifest: a `kind: List` JSON document holding every service and slice.
pub fn manifest_json(services: &[BService]) -> String {
    let items: Vec<Value> = services.iter().flat_map(|s| s.to_json()).collect();
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("JSON values serialize")
}

/// Node settings of the baseline rules on node `node`.
pub fn node_settings(node: usize) -> NodeSettings {
    NodeSettings {
        cluster_cidr: "198.18.100.0/22".into(),
        node_ips: vec![lab::node_ip(node).into()],
        ipv6: false,
    }
}

/// Node settings of the IPv6 baseline rules (kube-proxy's IPv6 proxier) on node `node` of a
/// dual-stack lab: pod CIDRs 2001:2:100::/64, 2001:2:101::/64, … within 2001:2:100::/46.
pub fn node_settings6(node: usize) -> NodeSettings {
    NodeSettings {
        cluster_cidr: "2001:2:100::/46".into(),
        node_ips: vec![lab::node_ip6(node).into()],
        ipv6: true,
    }
}

/// All service ports of `services` for rules on node `node`.
pub fn baseline_ports(services: &[BService], node: usize) -> Vec<baseline::ServicePort> {
    services.iter().flat_map(|s| s.to_baseline(node)).collect()
}
