//! Compact forms of the API objects: only the fields the model reads, converted once when an
//! object arrives (kube-proxy keeps its `ServicePort`/`EndpointInfo` caches the same way). The raw
//! API objects are dropped right after conversion, so the agent's memory grows with what it
//! programs, not with the size of the objects.
//!
//! Values are kept as the API spells them where the model validates them (so a bad value is
//! reported with the text at fault); endpoint addresses are parsed here.
use std::{fmt, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use smallvec::SmallVec;

use super::{
    ANNOTATION_TRIGGER_TIME, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
    ServiceName, SharedStr,
};

/// Label of a Node naming its zone (topology hints).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// `namespace/name` of an object (a missing namespace is `default`).
pub type ObjectName = ServiceName;

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectName {
    ServiceName {
        namespace: meta.namespace.as_deref().unwrap_or("default").into(),
        name: meta.name.as_deref().unwrap_or_default().into(),
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortObj {
    /// `name` (the tracker shares one copy per distinct value).
    pub name: Option<SharedStr>,
    /// `protocol` (shared likewise).
    pub protocol: Option<SharedStr>,
    /// `port`.
    pub port: i32,
    /// `nodePort`.
    pub node_port: Option<i32>,
}

/// A load-balancer ingress point of a Service's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressObj {
    /// `ip`.
    pub ip: Option<String>,
    /// `ipMode`.
    pub ip_mode: Option<String>,
}

/// One of a Service's ClusterIPs, in one word: an IPv4 address inline (almost every ClusterIP,
/// no allocation), anything else as written (an IPv6 address, `None`, an invalid value) in a
/// [`SharedStr`]. An IPv4 address is kept as the address rather than its text without losing
/// what the API spelt: the parser accepts only the dotted quad without leading zeros, which is
/// the address's display. Held as text, the ClusterIP of each Service took a 48-byte block
/// (1.4 MiB at 30,000 Services).
pub struct ClusterIp(u64);

impl ClusterIp {
    /// Set in the word of an IPv4 address (the address in the top 32 bits); clear in a
    /// [`SharedStr::into_word`], whose allocation is aligned to 8.
    const V4: u64 = 1;

    /// The ClusterIP written `text`.
    pub fn new(text: &str) -> Self {
        match text.parse::<Ipv4Addr>() {
            Ok(a) => Self(u64::from(u32::from(a)) << 32 | Self::V4),
            Err(_) => Self(SharedStr::into_word(Some(text.into())) as u64),
        }
    }

    /// The IPv4 address, if it is one.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        (self.0 & Self::V4 != 0).then(|| Ipv4Addr::from((self.0 >> 32) as u32))
    }

    /// The text of anything but an IPv4 address.
    pub(super) fn text(&self) -> Option<&SharedStr> {
        if self.0 & Self::V4 != 0 {
            return None;
        }
        // SAFETY: without the bit, the word is a `SharedStr::into_word` of a string (not null)
        // this value owns, not turned back while it lives; a pointer fits a `u64`.
        unsafe { SharedStr::borrow_word(&*(&self.0 as *const u64 as *const usize)) }.as_ref()
    }

    /// The address: the IPv4 one, or the text parsed (`None`: not an address).
    pub fn addr(&self) -> Option<std::net::IpAddr> {
        match (self.v4(), self.text()) {
            (Some(a), _) => Some(a.into()),
            (None, Some(t)) => t.parse().ok(),
            (None, None) => None,
        }
    }

    /// Whether the ClusterIP is `text` as written.
    pub fn is(&self, text: &str) -> bool {
        match (self.v4(), self.text()) {
            (Some(a), _) => text.parse::<Ipv4Addr>() == Ok(a),
            (None, Some(t)) => t == text,
            (None, None) => false,
        }
    }
}

const _: () = assert!(size_of::<ClusterIp>() == 8 && size_of::<usize>() <= size_of::<u64>());

impl From<&str> for ClusterIp {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl Drop for ClusterIp {
    fn drop(&mut self) {
        if self.0 & Self::V4 == 0 {
            // SAFETY: a `SharedStr::into_word` this value owns, turned back once.
            drop(unsafe { SharedStr::from_word(self.0 as usize) });
        }
    }
}

impl Clone for ClusterIp {
    fn clone(&self) -> Self {
        match self.text() {
            Some(t) => Self(SharedStr::into_word(Some(t.clone())) as u64),
            None => Self(self.0),
        }
    }
}

// As the text: an IPv4 address is never held as text.
impl PartialEq for ClusterIp {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 || self.text().is_some_and(|t| other.text() == Some(t))
    }
}

impl Eq for ClusterIp {}

impl PartialEq<&str> for ClusterIp {
    fn eq(&self, text: &&str) -> bool {
        self.is(text)
    }
}

impl fmt::Display for ClusterIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.v4(), self.text()) {
            (Some(a), _) => a.fmt(f),
            (None, Some(t)) => f.write_str(t),
            (None, None) => Ok(()),
        }
    }
}

impl fmt::Debug for ClusterIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

/// What the model reads of a Service, packed as the tracker holds it for as long as the Service
/// exists: two ClusterIPs (the API's usual `clusterIPs[0]` and `clusterIP`), one IP family and
/// one port inline (no allocation of their own), the fields few Services set (externalIPs,
/// load-balancer ingress, source ranges, affinity timeout, healthCheckNodePort) in one box,
/// present only when one of them is ([`ServiceRare`], read through the accessors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceObj {
    /// `namespace/name`.
    pub name: ObjectName,
    /// Where the object was read, when that is not the API (the manifest file), for messages.
    pub origin: Option<SharedStr>,
    /// `metadata.creationTimestamp`: the oldest of several services claiming one frontend keeps
    /// it. The manifest source fills in the time it read the object if the file has none
    /// ([`Self::created_when_read`]).
    pub created: Option<jiff::Timestamp>,
    /// `created` is the time the manifest source read this version (its file gave no
    /// creationTimestamp): a tracker already holding the Service keeps the time it holds, so
    /// that the Service's age is when it was first read.
    pub created_when_read: bool,
    /// The first of kube-proxy's skip labels it carries ([`LABEL_SERVICE_PROXY_NAME`],
    /// [`LABEL_HEADLESS`]).
    pub skip_label: Option<SkipLabel>,
    /// Whether `spec` is present.
    pub has_spec: bool,
    /// `spec.type` (the tracker shares one copy per distinct value, as of the other short
    /// values that repeat across objects).
    pub type_: Option<SharedStr>,
    /// `spec.clusterIPs` followed by `spec.clusterIP` (which repeats `clusterIPs[0]` and then
    /// shares its allocation, if it has one).
    pub cluster_ips: SmallVec<[ClusterIp; 2]>,
    /// `spec.ipFamilies` (index `i` names the family of `cluster_ips[i]`; shared by the tracker
    /// like the other short values).
    pub ip_families: SmallVec<[SharedStr; 1]>,
    /// `spec.ipFamilyPolicy`.
    pub ip_family_policy: Option<SharedStr>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: Option<SharedStr>,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: Option<SharedStr>,
    /// `spec.sessionAffinity`.
    pub session_affinity: Option<SharedStr>,
    /// `spec.ports`.
    pub ports: SmallVec<[ServicePortObj; 1]>,
    /// The rarely set fields (`None` when none is).
    pub rare: Option<Box<ServiceRare>>,
}

// 208 bytes, where the Service with plain vectors took 272 and its ClusterIPs, IP families and
// ports three allocations more; one is held per Service.
const _: () = assert!(std::mem::size_of::<ServiceObj>() <= 208);

/// What few Services set, in one box of a [`ServiceObj`] so that the others do not pay for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceRare {
    /// `spec.externalIPs`.
    pub external_ips: Box<[String]>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Box<[IngressObj]>,
    /// `spec.loadBalancerSourceRanges`.
    pub source_ranges: Box<[String]>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
}

impl From<&Service> for ServiceObj {
    fn from(svc: &Service) -> Self {
        let labels = svc.metadata.labels.as_ref();
        let skip_label = [SkipLabel::ServiceProxyName, SkipLabel::Headless]
            .into_iter()
            .find(|l| labels.is_some_and(|m| m.contains_key(l.key())));
        let spec = svc.spec.as_ref();
        let mut cluster_ips: SmallVec<[ClusterIp; 2]> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.as_str().into())
            .collect();
        if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_deref()) {
            // Almost always `clusterIPs[0]` again: one allocation for both.
            let shared = cluster_ips.iter().find(|c| c.is(ip)).cloned();
            cluster_ips.push(shared.unwrap_or_else(|| ip.into()));
        }
        let rare = ServiceRare {
            external_ips: spec.and_then(|s| s.external_ips.as_deref()).unwrap_or_default().into(),
            ingress: svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .into_iter()
                .flatten()
                .map(|i| IngressObj { ip: i.ip.clone(), ip_mode: i.ip_mode.clone() })
                .collect(),
            source_ranges: spec
                .and_then(|s| s.load_balancer_source_ranges.as_deref())
                .unwrap_or_default()
                .into(),
            affinity_timeout: spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            health_check_node_port: spec.and_then(|s| s.health_check_node_port),
        };
        Self {
            name: object_name(&svc.metadata),
            origin: None,
            created: svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            created_when_read: false,
            skip_label,
            has_spec: spec.is_some(),
            type_: spec.and_then(|s| s.type_.as_deref()).map(Into::into),
            cluster_ips: exact(cluster_ips),
            ip_families: exact(
                spec.and_then(|s| s.ip_families.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|f| f.as_str().into())
                    .collect(),
            ),
            ip_family_policy: spec.and_then(|s| s.ip_family_policy.as_deref()).map(Into::into),
            external_traffic_policy: spec
                .and_then(|s| s.external_traffic_policy.as_deref())
                .map(Into::into),
            internal_traffic_policy: spec
                .and_then(|s| s.internal_traffic_policy.as_deref())
                .map(Into::into),
            session_affinity: spec.and_then(|s| s.session_affinity.as_deref()).map(Into::into),
            ports: exact(
                spec.and_then(|s| s.ports.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|p| ServicePortObj {
                        name: p.name.as_deref().map(Into::into),
                        protocol: p.protocol.as_deref().map(Into::into),
                        port: p.port,
                        node_port: p.node_port,
                    })
                    .collect(),
            ),
            rare: (rare != ServiceRare::default()).then(|| Box::new(rare)),
        }
    }
}

/// A list held for an object's life: inline when it fits, else without growth slack.
fn exact<A: smallvec::Array>(mut v: SmallVec<A>) -> SmallVec<A> {
    v.shrink_to_fit();
    v
}

impl ServiceObj {
    fn rare(&self) -> Option<&ServiceRare> {
        self.rare.as_deref()
    }

    /// `spec.externalIPs`.
    pub fn external_ips(&self) -> &[String] {
        self.rare().map_or(&[], |r| &r.external_ips)
    }

    /// `status.loadBalancer.ingress`.
    pub fn ingress(&self) -> &[IngressObj] {
        self.rare().map_or(&[], |r| &r.ingress)
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn source_ranges(&self) -> &[String] {
        self.rare().map_or(&[], |r| &r.source_ranges)
    }

    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub fn affinity_timeout(&self) -> Option<i32> {
        self.rare().and_then(|r| r.affinity_timeout)
    }

    /// `spec.healthCheckNodePort`.
    pub fn health_check_node_port(&self) -> Option<i32> {
        self.rare().and_then(|r| r.health_check_node_port)
    }
}

/// One of kube-proxy's skip labels: a Service carrying it is not proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipLabel {
    /// [`LABEL_SERVICE_PROXY_NAME`]: served by another proxy.
    ServiceProxyName,
    /// [`LABEL_HEADLESS`].
    Headless,
}

impl SkipLabel {
    /// The label's key.
    pub fn key(self) -> &'static str {
        match self {
            Self::ServiceProxyName => LABEL_SERVICE_PROXY_NAME,
            Self::Headless => LABEL_HEADLESS,
        }
    }
}

impl fmt::Display for SkipLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePortObj {
    /// `name` (the tracker shares one copy per distinct value).
    pub name: Option<SharedStr>,
    /// `protocol` (shared likewise).
    pub protocol: Option<SharedStr>,
    /// `port`.
    pub port: Option<i32>,
}

/// The first address of an endpoint, as [`EndpointObj::addr`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointAddr<'a> {
    /// A valid IPv4 address.
    V4(Ipv4Addr),
    /// Anything else, as written: an IPv6 address (parsed by the model's IPv6 side, which keeps
    /// IPv4 endpoints as small as they were) or an invalid one (reported by the model).
    Invalid(&'a str),
}

/// Topology hints of an endpoint (rare, so boxed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HintsObj {
    /// `hints.forZones[].name`.
    pub zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub nodes: Vec<String>,
}

/// What few endpoints carry (boxed, so that the others do not pay for it): an address that is
/// not IPv4, kept as written, and topology hints; and then the node name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct EndpointRare {
    node_name: Option<SharedStr>,
    addr_text: Option<Box<str>>,
    hints: Option<HintsObj>,
}

impl EndpointRare {
    /// Whether it holds nothing but a node name.
    fn node_only(&self) -> bool {
        self.addr_text.is_none() && self.hints.is_none()
    }
}

/// An endpoint's node name and rare part in one word: 0 (neither), a [`SharedStr`] (the node
/// name alone, [`SharedStr::into_word`]), or a boxed [`EndpointRare`] with the low bit set (which
/// then holds the node name). Both allocations are aligned to 8.
struct NodeOrRare(usize);

impl NodeOrRare {
    const RARE: usize = 1;

    fn new(node_name: Option<SharedStr>, rare: Option<EndpointRare>) -> Self {
        match rare {
            Some(r) if !r.node_only() => {
                let r = EndpointRare { node_name, ..r };
                Self(Box::into_raw(Box::new(r)) as usize | Self::RARE)
            }
            _ => Self(SharedStr::into_word(node_name)),
        }
    }

    fn rare(&self) -> Option<&EndpointRare> {
        // SAFETY: with the bit set, the rest is a live `Box<EndpointRare>` this value owns.
        (self.0 & Self::RARE != 0).then(|| unsafe { &*((self.0 & !Self::RARE) as *const _) })
    }

    fn node_name(&self) -> Option<&SharedStr> {
        match self.rare() {
            Some(r) => r.node_name.as_ref(),
            // SAFETY: without the bit, the word is a `SharedStr::into_word` this value owns.
            None => unsafe { SharedStr::borrow_word(&self.0) }.as_ref(),
        }
    }

    /// The parts, copied.
    fn parts(&self) -> (Option<SharedStr>, Option<EndpointRare>) {
        (self.node_name().cloned(), self.rare().cloned())
    }
}

impl Drop for NodeOrRare {
    fn drop(&mut self) {
        if self.0 & Self::RARE != 0 {
            // SAFETY: a `Box<EndpointRare>` this value owns, freed once.
            drop(unsafe { Box::from_raw((self.0 & !Self::RARE) as *mut EndpointRare) });
        } else {
            // SAFETY: a `SharedStr::into_word` this value owns, turned back once.
            drop(unsafe { SharedStr::from_word(self.0) });
        }
    }
}

impl Clone for NodeOrRare {
    fn clone(&self) -> Self {
        let (node, rare) = self.parts();
        Self::new(node, rare)
    }
}

impl PartialEq for NodeOrRare {
    fn eq(&self, other: &Self) -> bool {
        self.node_name() == other.node_name() && self.rare() == other.rare()
    }
}

impl Eq for NodeOrRare {}

impl fmt::Debug for NodeOrRare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rare() {
            Some(r) => r.fmt(f),
            None => self.node_name().fmt(f),
        }
    }
}

/// One endpoint of an EndpointSlice. Held for every endpoint of the cluster, so packed into 16
/// bytes: the IPv4 address inline, the three conditions and whether there is an IPv4 address in
/// one byte, the node name or the boxed rest in one word ([`NodeOrRare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointObj {
    /// The first of `addresses` when it is an IPv4 address ([`EndpointObj::HAS_V4`]).
    v4: u32,
    /// `conditions.ready`, `serving` and `terminating`, two bits each ([`cond_bits`]), and
    /// [`EndpointObj::HAS_V4`].
    conditions: u8,
    /// `nodeName` (the tracker shares one copy per node) and the rare part.
    extra: NodeOrRare,
}

// One is held per endpoint of the cluster (24 bytes with the address, node name and rare part
// in fields of their own).
const _: () = assert!(std::mem::size_of::<EndpointObj>() <= 16);

/// An endpoint's first address as [`EndpointObj`] keeps it: the IPv4 address word,
/// [`EndpointObj::HAS_V4`] when it is one, else the text as written.
fn parse_addr(addr: Option<&str>) -> (u32, u8, Option<Box<str>>) {
    match addr.map(|a| (a, a.parse::<Ipv4Addr>())) {
        Some((_, Ok(v4))) => (u32::from(v4), EndpointObj::HAS_V4, None),
        Some((a, Err(_))) => (0, 0, Some(a.into())),
        None => (0, 0, None),
    }
}

/// Two bits of an optional condition: 0 absent, 1 false, 2 true.
fn cond_bits(c: Option<bool>) -> u8 {
    match c {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    }
}

impl EndpointObj {
    const HAS_V4: u8 = 1 << 6;

    /// An endpoint of first address `addr`, on node `node_name`, with the conditions `ready`,
    /// `serving`, `terminating` and topology `hints` (empty hints count as none).
    pub fn new(
        addr: Option<&str>,
        node_name: Option<SharedStr>,
        [ready, serving, terminating]: [Option<bool>; 3],
        hints: Option<HintsObj>,
    ) -> Self {
        let hints = hints.filter(|h| !h.zones.is_empty() || !h.nodes.is_empty());
        let (v4, has_v4, addr_text) = parse_addr(addr);
        let rare = EndpointRare { hints, addr_text, ..Default::default() };
        Self {
            v4,
            conditions: cond_bits(ready)
                | cond_bits(serving) << 2
                | cond_bits(terminating) << 4
                | has_v4,
            extra: NodeOrRare::new(node_name, Some(rare)),
        }
    }

    /// `nodeName`.
    pub fn node_name(&self) -> Option<&SharedStr> {
        self.extra.node_name()
    }

    /// Replaces `nodeName`.
    pub fn set_node_name(&mut self, node_name: Option<SharedStr>) {
        self.extra = NodeOrRare::new(node_name, self.extra.rare().cloned());
    }

    /// Replaces the first address.
    pub fn set_addr(&mut self, addr: Option<&str>) {
        let (v4, has_v4, text) = parse_addr(addr);
        self.v4 = v4;
        self.conditions = (self.conditions & !Self::HAS_V4) | has_v4;
        let (node, rare) = self.extra.parts();
        if text.is_some() || rare.is_some() {
            let rare = EndpointRare { addr_text: text, ..rare.unwrap_or_default() };
            self.extra = NodeOrRare::new(node, Some(rare));
        }
    }

    fn v4(&self) -> Option<Ipv4Addr> {
        (self.conditions & Self::HAS_V4 != 0).then(|| Ipv4Addr::from(self.v4))
    }

    /// The first of `addresses` (`None`: no address).
    pub fn addr(&self) -> Option<EndpointAddr<'_>> {
        match (self.v4(), self.extra.rare().and_then(|r| r.addr_text.as_deref())) {
            (Some(a), _) => Some(EndpointAddr::V4(a)),
            (None, Some(t)) => Some(EndpointAddr::Invalid(t)),
            (None, None) => None,
        }
    }

    fn condition(&self, shift: u8) -> Option<bool> {
        match self.conditions >> shift & 3 {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }

    /// `conditions.ready`.
    pub fn ready(&self) -> Option<bool> {
        self.condition(0)
    }

    /// `conditions.serving`.
    pub fn serving(&self) -> Option<bool> {
        self.condition(2)
    }

    /// `conditions.terminating`.
    pub fn terminating(&self) -> Option<bool> {
        self.condition(4)
    }

    /// `hints`, when it names anything.
    pub fn hints(&self) -> Option<&HintsObj> {
        self.extra.rare().and_then(|r| r.hints.as_ref())
    }
}

/// What the model reads of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceObj {
    /// `namespace/name` of the slice.
    pub name: ObjectName,
    /// Where the object was read, when that is not the API (the manifest file), for messages.
    pub origin: Option<SharedStr>,
    /// `addressType` (the tracker shares one copy per distinct value).
    pub address_type: SharedStr,
    /// The `kubernetes.io/service-name` label (the owner's name in the tracker's index of slices
    /// shares it).
    pub service: Option<SharedStr>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<Box<str>>,
    /// `ports`: the usual one inline (no allocation of its own).
    pub ports: SmallVec<[SlicePortObj; 1]>,
    /// `endpoints` (never grown once built: a boxed slice, no capacity word).
    pub endpoints: Box<[EndpointObj]>,
}

// One is held per slice, boxed: 104 bytes and the allocator's word fill a 112-byte block, as the
// 96 bytes with a `Vec` of ports did, whose one port took a 32-byte block besides (0.9 MiB at
// 30,000 slices). 112 with a `Vec` of endpoints and a `String` trigger time.
const _: () = assert!(std::mem::size_of::<SliceObj>() <= 104);

impl SliceObj {
    /// The Service owning the slice, if the label names one.
    pub fn owner(&self) -> Option<ServiceName> {
        self.service
            .as_ref()
            .filter(|n| !n.is_empty())
            .map(|n| ServiceName { namespace: self.name.namespace.clone(), name: n.clone() })
    }
}

impl From<&EndpointSlice> for SliceObj {
    fn from(s: &EndpointSlice) -> Self {
        let endpoints = s
            .endpoints
            .iter()
            .flatten()
            .map(|ep| {
                let cond = ep.conditions.as_ref();
                let hints = ep.hints.as_ref().map(|h| HintsObj {
                    zones: h.for_zones.iter().flatten().map(|z| z.name.clone()).collect(),
                    nodes: h.for_nodes.iter().flatten().map(|n| n.name.clone()).collect(),
                });
                EndpointObj::new(
                    ep.addresses.first().map(String::as_str),
                    ep.node_name.as_deref().map(Into::into),
                    [
                        cond.and_then(|c| c.ready),
                        cond.and_then(|c| c.serving),
                        cond.and_then(|c| c.terminating),
                    ],
                    hints,
                )
            })
            .collect();
        let mut obj = Self {
            name: object_name(&s.metadata),
            origin: None,
            address_type: s.address_type.as_str().into(),
            service: s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .map(|n| n.as_str().into()),
            trigger_time: s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
                .map(|t| t.as_str().into()),
            ports: s
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortObj {
                    name: p.name.as_deref().map(Into::into),
                    protocol: p.protocol.as_deref().map(Into::into),
                    port: p.port,
                })
                .collect(),
            endpoints,
        };
        // Held for the object's life: no growth slack (the endpoints are boxed to their length).
        obj.ports = exact(obj.ports);
        obj
    }
}

/// What the model reads of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObj {
    /// Node name.
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Whether load balancers may keep sending traffic to the node (kube-proxy's `SyncNode`):
    /// false while it is being deleted (`deletionTimestamp` set) or tainted
    /// [`TAINT_TO_BE_DELETED`].
    pub eligible: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

impl From<&Node> for NodeObj {
    fn from(n: &Node) -> Self {
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
        Self {
            name: n.metadata.name.clone().unwrap_or_default(),
            zone: n.metadata.labels.as_ref().and_then(|l| l.get(LABEL_ZONE)).cloned(),
            eligible: n.metadata.deletion_timestamp.is_none() && !tainted,
        }
    }
}

/// What the model reads of a ServiceCIDR (`networking.k8s.io/v1`, cluster-scoped): the networks
/// ClusterIPs are allocated from, as the API spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCidrObj {
    /// Object name.
    pub name: String,
    /// `spec.cidrs`.
    pub cidrs: Vec<String>,
    /// The manifest file the object came from (`None`: the Kubernetes API).
    pub origin: Option<SharedStr>,
}

impl From<&ServiceCIDR> for ServiceCidrObj {
    fn from(c: &ServiceCIDR) -> Self {
        Self {
            name: c.metadata.name.clone().unwrap_or_default(),
            cidrs: c.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default(),
            origin: None,
        }
    }
}

/// One change delivered by a source: an object added or updated (whole), or deleted by name.
// Changes are moved once from a source to the tracker, never stored: boxing the service would
// only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A Service was added or updated.
    Service(ServiceObj),
    /// A Service was deleted.
    ServiceDeleted(ObjectName),
    /// An EndpointSlice was added or updated.
    Slice(SliceObj),
    /// An EndpointSlice was deleted.
    SliceDeleted(ObjectName),
    /// A Node was added or updated.
    Node(NodeObj),
    /// A Node was deleted (by name).
    NodeDeleted(String),
    /// A ServiceCIDR was added or updated.
    ServiceCidr(ServiceCidrObj),
    /// A ServiceCIDR was deleted (by name).
    ServiceCidrDeleted(String),
}
