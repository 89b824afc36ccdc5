//! The IPv6 half of the desired state: for every service port with an IPv6 ClusterIP, its IPv6
//! frontends and backends, beside the IPv4 ones of the same service port (same
//! [`ServicePortName`], its own frontends and backends), as kube-proxy's IPv6 proxier sees the
//! service: the IPv6 ClusterIP of `spec.clusterIPs`, the IPv6 `externalIPs` and load-balancer
//! ingress IPs, the node's IPv6 addresses for NodePorts, the endpoints of the `addressType: IPv6`
//! EndpointSlices. Traffic policies, topology, affinity and the reject/drop rules are the
//! IPv4 ones (the same [`categorize`]); `loadBalancerSourceRanges` restrict the IPv6
//! load-balancer frontends (and NodePorts when asked to) with the IPv6 ranges.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv6Addr,
};

use kproxy_common::{Addr6, Service6Key, proto, scope};

use super::{
    ErrorSite, ModelError, NodeInfo, Serve, ServicePortName, SvcSpec, collect_endpoints,
    endpoints::Endpoint,
    objects::{EndpointAddr, EndpointObj, ServiceObj, SliceObj},
    outcome, port_frontends, proto_name,
};

/// An IPv6 address in map form (four words, network byte order in memory).
pub fn to_addr6(a: Ipv6Addr) -> Addr6 {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// An IPv6 address from its map form.
pub fn from_addr6(a: &Addr6) -> Ipv6Addr {
    let mut b = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(b)
}

/// An IPv6 frontend: what a packet is matched on.
pub type Frontend6 = super::Frontend<Ipv6Addr>;

impl Frontend6 {
    /// The key of its service entry (`slot` 0) or of backend slot `slot`.
    pub fn key(&self, slot: u16) -> Service6Key {
        Service6Key {
            addr: to_addr6(self.addr),
            port: self.port.to_be(),
            proto: self.proto,
            scope: self.scope,
            slot,
            _pad: 0,
        }
    }
}

impl fmt::Display for Frontend6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.scope == scope::EXTERNAL { "external" } else { "internal" };
        write!(f, "[{}]:{}/{} ({s})", self.addr, self.port, proto_name(self.proto))
    }
}

/// An IPv6 backend (pod address and target port).
pub type Backend6 = super::Backend<Ipv6Addr>;

impl Backend6 {
    /// The identity of a backend in the datapath (flags may change in place).
    pub fn key(&self) -> (Ipv6Addr, u16, u8) {
        (self.addr, self.port, self.proto)
    }

    /// The map value.
    pub fn to_map(&self) -> kproxy_common::Backend6 {
        kproxy_common::Backend6 {
            addr: to_addr6(self.addr),
            port: self.port.to_be(),
            proto: self.proto,
            flags: self.flags,
        }
    }
}

/// The desired IPv6 service entry of one frontend.
pub type FrontendEntry6 = super::FrontendEntry<Ipv6Addr>;

/// The desired IPv6 state of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct PortState6 {
    /// Its IPv6 frontends.
    pub frontends: BTreeMap<Frontend6, FrontendEntry6>,
    /// Every IPv6 endpoint of the port, also those outside every slot (terminating, not
    /// ready): their backends stay in the datapath so that tracked connections keep working.
    pub endpoints: BTreeSet<Backend6>,
    /// UDP ports only: the serving IPv6 endpoints (address, target port), as
    /// `ServicePortState::udp_serving` for IPv4.
    pub udp_serving: BTreeSet<(Ipv6Addr, u16)>,
    /// The IPv6 client networks (address, prefix length) allowed to open connections to the
    /// frontends flagged `SOURCE_RANGES`; empty when no frontend is.
    pub source_ranges: BTreeSet<(Ipv6Addr, u8)>,
}

/// The IPv6 addresses of a Service (the IPv6 side of [`SvcSpec`]).
#[derive(Debug, Default)]
pub(super) struct Addrs6 {
    /// The IPv6 ClusterIP of `spec.clusterIPs` (the first one).
    pub cluster_ip: Option<Ipv6Addr>,
    /// IPv6 `spec.externalIPs`.
    pub external_ips: Vec<Ipv6Addr>,
    /// IPv6 load-balancer ingress IPs (VIP mode).
    pub lb_ips: Vec<Ipv6Addr>,
    /// Addresses left out (IPv4-mapped): warnings, not errors that make an update invalid.
    pub warnings: Vec<ModelError>,
}

/// An IPv6 address as a service field may hold it: an IPv4-mapped address is refused with an
/// error naming the field (kube-proxy's IPv6 proxier does not serve them either).
pub(super) fn service_addr6(
    site: &ErrorSite,
    field: String,
    text: &str,
    a: Ipv6Addr,
    errors: &mut Vec<ModelError>,
) -> Option<Ipv6Addr> {
    if a.to_ipv4_mapped().is_some() {
        errors.push(site.invalid(
            field,
            text,
            "an IPv4-mapped IPv6 address (write the IPv4 address)",
            outcome::ADDRESS_REFUSED,
        ));
        return None;
    }
    Some(a)
}

/// `spec.loadBalancerSourceRanges` as IPv6 networks, the IPv6 twin of the IPv4 reading: IPv4
/// ranges are left to the IPv4 frontends (with no IPv6 range the IPv6 frontends are open, as
/// with kube-proxy, whose IPv6 proxier sees only the IPv6 ranges); invalid values are reported
/// by the IPv4 reading. When a range holds a node address, the load-balancer IPs are allowed
/// too (kube-proxy's `allowFromNode`).
pub(super) fn source_ranges6(
    svc: &ServiceObj,
    node_addrs: &[Ipv6Addr],
    lb_ips: &[Ipv6Addr],
) -> BTreeSet<(Ipv6Addr, u8)> {
    let mut out = BTreeSet::new();
    for text in svc.source_ranges() {
        if let Ok(ipnet::IpNet::V6(n)) = text.trim().parse::<ipnet::IpNet>() {
            out.insert((n.network(), n.prefix_len()));
        }
    }
    super::allow_from_node(&mut out, node_addrs, lb_ips);
    out
}

/// The IPv6 address of an endpoint of an `addressType: IPv6` slice (`None` for another slice,
/// an IPv4-mapped address or anything that is not an IPv6 address: the slice's errors report
/// those).
pub(super) fn endpoint_addr6(s: &SliceObj, ep: &EndpointObj) -> Option<Ipv6Addr> {
    if s.address_type != "IPv6" {
        return None;
    }
    match ep.addr() {
        Some(EndpointAddr::Invalid(text)) => {
            text.parse::<Ipv6Addr>().ok().filter(|a| a.to_ipv4_mapped().is_none())
        }
        _ => None,
    }
}

/// The IPv6 state of one service port, the IPv6 twin of the IPv4 port state of
/// `compute_service`; `None` when the service has no IPv6 ClusterIP. The local ready endpoint
/// addresses are added to `local_ready` (health check).
#[allow(clippy::too_many_arguments)]
pub(super) fn port_state(
    spec: &SvcSpec,
    spn: &ServicePortName,
    svc_port: u16,
    node_port: Option<u16>,
    slices: &[&SliceObj],
    node: &NodeInfo,
    (ranges, node_port_ranges): (&BTreeSet<(Ipv6Addr, u8)>, bool),
    local_ready: &mut BTreeSet<Ipv6Addr>,
) -> Option<PortState6> {
    let cluster_ip = spec.v6.cluster_ip?;
    let p = spn.proto;
    let eps: Vec<Endpoint<Ipv6Addr>> = collect_endpoints(spn, slices, node, endpoint_addr6);
    let serve = Serve {
        cluster_ip,
        svc_port,
        node_port,
        node_addrs: &node.addrs6,
        lb_ips: &spec.v6.lb_ips,
        external_ips: &spec.v6.external_ips,
    };
    let mut restricted = false;
    let (frontends, endpoints) = port_frontends(spec, p, &serve, &eps, node, local_ready, |kind| {
        let flags = super::range_flags(kind, !ranges.is_empty(), node_port_ranges);
        restricted |= flags != kind;
        flags
    });
    let source_ranges = if restricted { ranges.clone() } else { BTreeSet::new() };
    let udp_serving = super::udp_serving(p, &eps);
    let state = PortState6 { frontends, endpoints, udp_serving, source_ranges };
    debug_assert!(p != proto::SCTP);
    Some(state)
}
