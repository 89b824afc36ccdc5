//! Pure translation (no IO) from Services, EndpointSlices and this node's identity to the desired
//! datapath state: for every frontend (address, port, protocol, scope) the service entry (flags,
//! affinity timeout) and the ordered backend list.
//!
//! Frontends of one service port: the ClusterIP (scope INTERNAL); every node address + NodePort,
//! every LoadBalancer ingress IP (VIP mode) and every externalIP, each in both scopes. EXTERNAL
//! scope follows externalTrafficPolicy; INTERNAL scope of those external frontends always gets the
//! cluster-wide set (kube-proxy's short circuit for pods reaching an external address); the
//! ClusterIP follows internalTrafficPolicy. When a Local policy leaves no endpoint although the
//! service has some elsewhere the entry is empty with `DROP_IF_EMPTY`; with no endpoint at all it
//! is empty without it (rejected).
//!
//! Validation errors skip the service (or only the port, or only the endpoint) at fault and name
//! it; everything else goes on.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kproxy_common::{Backend4, backend_flags, proto, scope, svc_flags};

pub mod endpoints;

use endpoints::{Endpoint, Policy, categorize};

/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label are served by another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (no proxying).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// EndpointSlice annotation: when the change that produced it was triggered.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Default sessionAffinity ClientIP timeout (kube-apiserver's default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest sessionAffinity ClientIP timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// This node, as the model needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (endpoints with this `nodeName` are local).
    pub name: String,
    /// IPv4 addresses of the NodePort devices (NodePort frontends).
    pub addrs: Vec<Ipv4Addr>,
    /// `topology.kubernetes.io/zone` of the node, if known (topology hints).
    pub zone: Option<String>,
}

/// A Service's `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service: the unit that gets a service id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// The Service.
    pub service: ServiceName,
    /// Port name ("" when unnamed).
    pub port: String,
    /// IP protocol.
    pub proto: u8,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.service, self.port, proto_name(self.proto))
    }
}

/// Name of an IP protocol number as Kubernetes spells it.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        proto::ICMP => "ICMP",
        _ => "?",
    }
}

/// A frontend: what a packet is matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`scope::EXTERNAL`] or [`scope::INTERNAL`].
    pub scope: u8,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.scope == scope::EXTERNAL { "external" } else { "internal" };
        write!(f, "{}:{}/{} ({s})", self.addr, self.port, proto_name(self.proto))
    }
}

/// A backend (pod address and target port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Pod address.
    pub addr: Ipv4Addr,
    /// Target port.
    pub port: u16,
    /// IP protocol.
    pub proto: u8,
    /// `backend_flags::*`.
    pub flags: u8,
}

impl Backend {
    /// The identity of a backend in the datapath (flags may change in place).
    pub fn key(&self) -> (Ipv4Addr, u16, u8) {
        (self.addr, self.port, self.proto)
    }

    /// The map value.
    pub fn to_map(&self) -> Backend4 {
        Backend4 {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.proto,
            flags: self.flags,
        }
    }

    /// From the map value.
    pub fn from_map(b: &Backend4) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(b.addr)),
            port: u16::from_be(b.port),
            proto: b.proto,
            flags: b.flags,
        }
    }
}

/// The desired service entry of one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendEntry {
    /// `svc_flags::*`.
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds, 0 when off.
    pub affinity_timeout: u32,
    /// Backends to balance over, ordered (by address, then port). Empty: reject or drop.
    pub backends: Vec<Backend>,
}

/// The desired state of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePortState {
    /// Its frontends.
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    /// Every endpoint of the port, also those outside every slot (terminating, not ready):
    /// their backends stay in the datapath so that tracked connections keep working.
    pub endpoints: BTreeSet<Backend>,
}

/// A healthCheckNodePort to serve (externalTrafficPolicy Local services).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The Service.
    pub service: ServiceName,
    /// Number of local endpoints usable under the Local policy (the largest over its ports).
    pub local_endpoints: usize,
}

/// Everything the datapath should contain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// By service port.
    pub services: BTreeMap<ServicePortName, ServicePortState>,
    /// healthCheckNodePort → service and local endpoint count.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl DesiredState {
    /// Number of frontends over all services.
    pub fn frontend_count(&self) -> usize {
        self.services.values().map(|s| s.frontends.len()).sum()
    }
}

/// A validation error: the object, the field and the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field} = {value:?}: {reason}")]
pub struct ModelError {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub object: String,
    /// Path of the field.
    pub field: String,
    /// The value at fault.
    pub value: String,
    /// What is wrong and what was skipped.
    pub reason: String,
}

/// Result of [`build`].
#[derive(Debug, Clone, Default)]
pub struct BuildOutput {
    /// The desired state.
    pub state: DesiredState,
    /// Validation errors (each skipped something).
    pub errors: Vec<ModelError>,
    /// Deliberate skips that are not errors (ExternalName, headless, SCTP, ...), for the log.
    pub skipped: Vec<String>,
}

/// The per-Service facts the frontends are made from.
struct SvcSpec {
    name: ServiceName,
    cluster_ip: Ipv4Addr,
    /// Type NodePort or LoadBalancer: node ports are served.
    node_ports: bool,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    policy_internal_local: bool,
    policy_external_local: bool,
    affinity_timeout: u32,
    publish_not_ready: bool,
    health_check_node_port: Option<u16>,
}

/// Translates the objects into the desired state.
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> BuildOutput {
    let mut out = BuildOutput::default();
    let slices_by_service = group_slices(slices, &mut out);
    // Frontend → owner, to report two services claiming one frontend.
    let mut owners: BTreeMap<Frontend, ServicePortName> = BTreeMap::new();
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for svc in sorted {
        let Some(spec) = service_spec(svc, &mut out) else { continue };
        let slices = slices_by_service.get(&spec.name).map(Vec::as_slice).unwrap_or(&[]);
        let mut local_total = 0usize;
        let mut ports =
            svc.spec.as_ref().and_then(|s| s.ports.as_ref()).cloned().unwrap_or_default();
        ports.sort_by(|a, b| (&a.name, a.port).cmp(&(&b.name, b.port)));
        for (i, port) in ports.iter().enumerate() {
            let err = |field: String, value: String, reason: &str| ModelError {
                kind: "Service",
                object: spec.name.to_string(),
                field,
                value,
                reason: format!("{reason}; port skipped"),
            };
            let pname = port.name.clone().unwrap_or_default();
            let field = |f: &str| {
                format!(
                    "spec.ports[{}].{f}",
                    if pname.is_empty() { i.to_string() } else { pname.clone() }
                )
            };
            let p = match parse_protocol(port.protocol.as_deref()) {
                Ok(p) if p == proto::SCTP => {
                    out.skipped
                        .push(format!("{}: port {pname:?} is SCTP, not supported", spec.name));
                    continue;
                }
                Ok(p) => p,
                Err(v) => {
                    out.errors.push(err(field("protocol"), v, "unknown protocol"));
                    continue;
                }
            };
            let Some(svc_port) = valid_port(port.port) else {
                out.errors.push(err(field("port"), port.port.to_string(), "out of range 1-65535"));
                continue;
            };
            let node_port = match port.node_port.unwrap_or(0) {
                _ if !spec.node_ports => None,
                0 => None,
                n => match valid_port(n) {
                    Some(n) => Some(n),
                    None => {
                        out.errors.push(err(
                            field("nodePort"),
                            n.to_string(),
                            "out of range 1-65535",
                        ));
                        continue;
                    }
                },
            };
            let spn = ServicePortName { service: spec.name.clone(), port: pname.clone(), proto: p };
            let eps = collect_endpoints(&spn, slices, node, spec.publish_not_ready, &mut out);
            let externally_accessible =
                node_port.is_some() || !spec.lb_ips.is_empty() || !spec.external_ips.is_empty();
            let policy = Policy {
                internal_local: spec.policy_internal_local,
                external_local: spec.policy_external_local && externally_accessible,
                externally_accessible,
            };
            let cat = categorize(&eps, policy, &node.name, node.zone.as_deref());
            if policy.external_local {
                local_total = local_total.max(cat.local.len());
            }
            let to_backends = |set: &[Endpoint]| -> Vec<Backend> {
                let mut v: Vec<Backend> = set.iter().map(|e| backend_of(e, p)).collect();
                v.sort();
                v
            };
            let cluster = to_backends(&cat.cluster);
            let local = to_backends(&cat.local);
            let affinity_flag = if spec.affinity_timeout > 0 { svc_flags::AFFINITY } else { 0 };
            let entry = |flags: u16, backends: &Vec<Backend>, local_policy: bool| {
                let mut flags = flags | affinity_flag;
                if local_policy {
                    flags |= svc_flags::LOCAL_ONLY;
                }
                if backends.is_empty() && cat.has_any {
                    flags |= svc_flags::DROP_IF_EMPTY;
                }
                FrontendEntry {
                    flags,
                    affinity_timeout: spec.affinity_timeout,
                    backends: backends.clone(),
                }
            };
            let mut state = ServicePortState {
                endpoints: eps.iter().map(|e| backend_of(e, p)).collect(),
                ..Default::default()
            };
            let fe =
                |addr: Ipv4Addr, port: u16, scope: u8| Frontend { addr, port, proto: p, scope };
            // ClusterIP: internal scope only, internalTrafficPolicy.
            let (set, local_policy) =
                if policy.internal_local { (&local, true) } else { (&cluster, false) };
            state.frontends.insert(
                fe(spec.cluster_ip, svc_port, scope::INTERNAL),
                entry(svc_flags::CLUSTER_IP, set, local_policy),
            );
            let mut externals: Vec<(Ipv4Addr, u16, u16)> = Vec::new();
            if let Some(np) = node_port {
                externals.extend(node.addrs.iter().map(|a| (*a, np, svc_flags::NODE_PORT)));
            }
            externals.extend(spec.lb_ips.iter().map(|a| (*a, svc_port, svc_flags::LOAD_BALANCER)));
            externals
                .extend(spec.external_ips.iter().map(|a| (*a, svc_port, svc_flags::EXTERNAL_IP)));
            for (addr, port, kind) in externals {
                let (set, local_policy) =
                    if policy.external_local { (&local, true) } else { (&cluster, false) };
                state
                    .frontends
                    .insert(fe(addr, port, scope::EXTERNAL), entry(kind, set, local_policy));
                state
                    .frontends
                    .insert(fe(addr, port, scope::INTERNAL), entry(kind, &cluster, false));
            }
            // One frontend, one owner: the first service (by namespace/name) keeps it.
            state.frontends.retain(|f, _| match owners.get(f) {
                Some(owner) if *owner != spn => {
                    out.errors.push(ModelError {
                        kind: "Service",
                        object: spec.name.to_string(),
                        field: field("port"),
                        value: f.to_string(),
                        reason: format!("frontend already used by {owner}; frontend skipped"),
                    });
                    false
                }
                _ => {
                    owners.insert(*f, spn.clone());
                    true
                }
            });
            out.state.services.insert(spn, state);
        }
        if spec.policy_external_local
            && let Some(port) = spec.health_check_node_port
        {
            out.state.health_checks.insert(
                port,
                HealthCheck { service: spec.name.clone(), local_endpoints: local_total },
            );
        }
    }
    out
}

fn backend_of(e: &Endpoint, p: u8) -> Backend {
    let mut flags = 0;
    if e.local {
        flags |= backend_flags::LOCAL;
    }
    if e.terminating {
        flags |= backend_flags::TERMINATING;
    }
    Backend { addr: e.addr, port: e.port, proto: p, flags }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// Kubernetes protocol name → number; absent means TCP (the API default).
fn parse_protocol(p: Option<&str>) -> Result<u8, String> {
    match p {
        None | Some("TCP") => Ok(proto::TCP),
        Some("UDP") => Ok(proto::UDP),
        Some("SCTP") => Ok(proto::SCTP),
        Some(other) => Err(other.to_string()),
    }
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ServiceName {
    ServiceName {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".to_string()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Checks a Service and extracts what the frontends need; `None` when it is skipped.
fn service_spec(svc: &Service, out: &mut BuildOutput) -> Option<SvcSpec> {
    let name = object_name(&svc.metadata);
    let err = |field: &str, value: &str, reason: &str| ModelError {
        kind: "Service",
        object: name.to_string(),
        field: field.to_string(),
        value: value.to_string(),
        reason: format!("{reason}; service skipped"),
    };
    let labels = svc.metadata.labels.as_ref();
    for label in [LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS] {
        if labels.is_some_and(|l| l.contains_key(label)) {
            out.skipped.push(format!("{name}: has label {label}"));
            return None;
        }
    }
    let Some(spec) = svc.spec.as_ref() else {
        out.errors.push(err("spec", "", "missing"));
        return None;
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP") | Some("NodePort") | Some("LoadBalancer") => {}
        Some("ExternalName") => {
            out.skipped.push(format!("{name}: type ExternalName"));
            return None;
        }
        Some(other) => {
            out.errors.push(err("spec.type", other, "unknown service type"));
            return None;
        }
    }
    // The IPv4 ClusterIP: clusterIPs (dual stack) or clusterIP.
    let mut candidates: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    candidates.extend(spec.cluster_ip.iter());
    if candidates.iter().any(|c| c.as_str() == "None") {
        out.skipped.push(format!("{name}: headless (clusterIP None)"));
        return None;
    }
    let mut cluster_ip = None;
    for c in candidates {
        match c.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                cluster_ip.get_or_insert(a);
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                out.errors.push(err("spec.clusterIP", c, "not an IP address"));
                return None;
            }
        }
    }
    let Some(cluster_ip) = cluster_ip else {
        out.skipped.push(format!("{name}: no IPv4 clusterIP"));
        return None;
    };
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => external_ips.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                out.errors.push(err(&format!("spec.externalIPs[{i}]"), ip, "not an IP address"));
                return None;
            }
        }
    }
    let mut lb_ips = Vec::new();
    let ingress =
        svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else { continue };
        if ing.ip_mode.as_deref() == Some("Proxy") {
            out.skipped.push(format!("{name}: load-balancer ingress {ip} has ipMode Proxy"));
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => lb_ips.push(a),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                let field = format!("status.loadBalancer.ingress[{i}].ip");
                out.errors.push(err(&field, ip, "not an IP address"));
                return None;
            }
        }
    }
    let externally_accessible = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
        || !spec.external_ips.as_ref().is_none_or(Vec::is_empty);
    let policy_external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => externally_accessible,
        Some(other) => {
            out.errors.push(err("spec.externalTrafficPolicy", other, "not Cluster or Local"));
            return None;
        }
    };
    let policy_internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            out.errors.push(err("spec.internalTrafficPolicy", other, "not Cluster or Local"));
            return None;
        }
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT => t as u32,
                Some(t) => {
                    out.errors.push(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        &t.to_string(),
                        "out of range 1-86400",
                    ));
                    return None;
                }
            }
        }
        Some(other) => {
            out.errors.push(err("spec.sessionAffinity", other, "not None or ClientIP"));
            return None;
        }
    };
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => match valid_port(p) {
            Some(p) => Some(p),
            None => {
                out.errors.push(err(
                    "spec.healthCheckNodePort",
                    &p.to_string(),
                    "out of range 1-65535",
                ));
                return None;
            }
        },
    };
    Some(SvcSpec {
        name,
        cluster_ip,
        node_ports: matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")),
        external_ips,
        lb_ips,
        policy_internal_local,
        policy_external_local,
        affinity_timeout,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        health_check_node_port,
    })
}

/// Groups IPv4 EndpointSlices by the Service named in their label.
fn group_slices<'a>(
    slices: &'a [EndpointSlice],
    out: &mut BuildOutput,
) -> BTreeMap<ServiceName, Vec<&'a EndpointSlice>> {
    let mut by: BTreeMap<ServiceName, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let slice_name = object_name(&s.metadata);
        if s.address_type != "IPv4" {
            out.skipped.push(format!("EndpointSlice {slice_name}: addressType {}", s.address_type));
            continue;
        }
        let svc = s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME));
        let Some(svc) = svc.filter(|n| !n.is_empty()) else {
            out.errors.push(ModelError {
                kind: "EndpointSlice",
                object: slice_name.to_string(),
                field: format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                value: String::new(),
                reason: "missing; slice ignored".to_string(),
            });
            continue;
        };
        let key = ServiceName { namespace: slice_name.namespace.clone(), name: svc.clone() };
        by.entry(key).or_default().push(s);
    }
    for v in by.values_mut() {
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    by
}

/// The endpoints of one service port over all its slices: slice ports matched by name and
/// protocol, the first address of each endpoint, duplicates (same address and port) counted once
/// (a local copy wins, as in kube-proxy).
fn collect_endpoints(
    spn: &ServicePortName,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    publish_not_ready: bool,
    out: &mut BuildOutput,
) -> Vec<Endpoint> {
    let mut by_key: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for s in slices {
        let slice_name = object_name(&s.metadata);
        let err = |field: String, value: String, reason: &str| ModelError {
            kind: "EndpointSlice",
            object: slice_name.to_string(),
            field,
            value,
            reason: reason.to_string(),
        };
        for (pi, port) in s.ports.iter().flatten().enumerate() {
            // Absent name and protocol take the API defaults ("" and TCP).
            if port.name.as_deref().unwrap_or("") != spn.port {
                continue;
            }
            match parse_protocol(port.protocol.as_deref()) {
                Ok(p) if p == spn.proto => {}
                Ok(_) => continue,
                Err(v) => {
                    let e =
                        err(format!("ports[{pi}].protocol"), v, "unknown protocol; port ignored");
                    if !out.errors.contains(&e) {
                        out.errors.push(e);
                    }
                    continue;
                }
            }
            let Some(target) = port.port.and_then(valid_port) else {
                let v = port.port.map(|p| p.to_string()).unwrap_or_else(|| "<none>".into());
                let e = err(format!("ports[{pi}].port"), v, "out of range 1-65535; port ignored");
                if !out.errors.contains(&e) {
                    out.errors.push(e);
                }
                continue;
            };
            for (ei, ep) in s.endpoints.iter().flatten().enumerate() {
                let Some(first) = ep.addresses.first() else { continue };
                let addr = match first.parse::<Ipv4Addr>() {
                    Ok(a) => a,
                    Err(_) => {
                        let e = err(
                            format!("endpoints[{ei}].addresses[0]"),
                            first.clone(),
                            "not an IPv4 address; endpoint ignored",
                        );
                        if !out.errors.contains(&e) {
                            out.errors.push(e);
                        }
                        continue;
                    }
                };
                let cond = ep.conditions.clone().unwrap_or_default();
                let local = !node.name.is_empty() && ep.node_name.as_deref() == Some(&node.name);
                let hints = ep.hints.as_ref();
                let endpoint = Endpoint {
                    addr,
                    port: target,
                    local,
                    // publishNotReadyAddresses: the control plane publishes every endpoint as
                    // ready; do the same for slices that were not produced by it.
                    ready: publish_not_ready || cond.ready.unwrap_or(true),
                    serving: cond.serving.unwrap_or(true),
                    terminating: cond.terminating.unwrap_or(false),
                    zone_hints: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                };
                let key = (addr, target);
                if !by_key.contains_key(&key) || local {
                    by_key.insert(key, endpoint);
                }
            }
        }
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests;
