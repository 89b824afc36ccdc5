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
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kproxy_common::{Backend4, backend_flags, proto, scope, svc_flags};
use smallvec::SmallVec;

use crate::excerpt::excerpt;

pub mod endpoints;
pub mod objects;
mod shared;
pub mod v6;

use endpoints::{Endpoint, Policy, categorize};
pub use objects::{Change, ObjectName};
use objects::{EndpointAddr, ServiceCidrObj, ServiceObj, ServicePortObj, SliceObj};
pub use shared::SharedStr;

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
    /// IPv6 addresses of the NodePort devices (IPv6 NodePort frontends).
    pub addrs6: Vec<std::net::Ipv6Addr>,
    /// `topology.kubernetes.io/zone` of the node, if known (topology hints).
    pub zone: Option<String>,
}

/// A Service's `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Namespace.
    pub namespace: SharedStr,
    /// Name.
    pub name: SharedStr,
}

// Two words: a service's name keys the tracker's and the syncer's tables and each claim holds it.
const _: () = assert!(size_of::<ServiceName>() == 2 * size_of::<usize>());

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
    pub port: SharedStr,
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

/// A frontend: what a packet is matched on (IPv4 unless `A` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend<A = Ipv4Addr> {
    /// Address.
    pub addr: A,
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

/// A backend (pod address and target port; IPv4 unless `A` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = Ipv4Addr> {
    /// Pod address.
    pub addr: A,
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

/// The desired service entry of one frontend (IPv4 unless `A` says otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FrontendEntry<A = Ipv4Addr> {
    /// `svc_flags::*`.
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds, 0 when off.
    pub affinity_timeout: u32,
    /// Backends to balance over, ordered (by address, then port). Empty: reject or drop.
    pub backends: Vec<Backend<A>>,
}

/// The frontends of a service port and their service entries.
pub type FrontendMap<A = Ipv4Addr> = BTreeMap<Frontend<A>, FrontendEntry<A>>;

/// The desired state of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct ServicePortState {
    /// Its frontends.
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    /// Every endpoint of the port, also those outside every slot (terminating, not ready):
    /// their backends stay in the datapath so that tracked connections keep working.
    pub endpoints: BTreeSet<Backend>,
    /// UDP ports only: the endpoints (address, target port) that are serving (ready, or
    /// terminating but still serving), whatever the traffic policies and topology select. UDP
    /// flows tracked to any other backend are moved away, as kube-proxy's conntrack reconciler
    /// deletes their entries; TCP connections stay. Empty for TCP.
    pub udp_serving: BTreeSet<(Ipv4Addr, u16)>,
    /// The client networks (address, prefix length) allowed to open connections to the
    /// frontends flagged `SOURCE_RANGES` (`spec.loadBalancerSourceRanges`); empty when no
    /// frontend is.
    pub source_ranges: BTreeSet<(Ipv4Addr, u8)>,
}

/// A healthCheckNodePort to serve (externalTrafficPolicy Local services).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The Service.
    pub service: ServiceName,
    /// Ready endpoints on this node, counted by distinct address over the service's ports
    /// (kube-proxy's `LocalReadyEndpoints`; terminating endpoints do not count).
    pub local_endpoints: usize,
}

/// Everything the datapath should contain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// By service port.
    pub services: BTreeMap<ServicePortName, ServicePortState>,
    /// The IPv6 side, by service port (the ports of services with an IPv6 ClusterIP).
    pub services6: BTreeMap<ServicePortName, v6::PortState6>,
    /// healthCheckNodePort → service and local endpoint count.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl DesiredState {
    /// Number of frontends over all services.
    pub fn frontend_count(&self) -> usize {
        self.services.values().map(|s| s.frontends.len()).sum()
    }
}

/// What a [`ModelError`] is about; its [`ErrorClass::label`] is the `kind` of
/// `kproxy_sync_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A field's value is not valid.
    Invalid,
    /// A frontend that an older service already holds.
    FrontendConflict,
    /// An externalIP or load-balancer IP outside the CIDRs the agent allows.
    AddressNotAllowed,
}

impl ErrorClass {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Invalid => "invalid_object",
            ErrorClass::FrontendConflict => "frontend_conflict",
            ErrorClass::AddressNotAllowed => "address_not_allowed",
        }
    }
}

/// What became of the object (or part) at fault: the end of every [`ModelError`] message.
pub mod outcome {
    /// An update was not applied; the object's previous version stays in effect.
    pub const KEPT_LAST_VALID: &str =
        "the update is ignored: its last valid version stays programmed";
    /// The Service is not programmed.
    pub const SERVICE_SKIPPED: &str = "service skipped";
    /// That port of the Service is not programmed.
    pub const PORT_SKIPPED: &str = "port skipped";
    /// That frontend of the Service is not programmed.
    pub const FRONTEND_REFUSED: &str = "frontend refused";
    /// That address of the Service is not programmed.
    pub const ADDRESS_REFUSED: &str = "address refused";
    /// That source range of the Service is left out (the others apply).
    pub const RANGE_IGNORED: &str = "range ignored";
    /// The EndpointSlice is not used.
    pub const SLICE_IGNORED: &str = "slice ignored";
    /// That network of the ServiceCIDR is not a service CIDR of the datapath (the others are).
    pub const CIDR_IGNORED: &str = "CIDR ignored";
    /// That port of the EndpointSlice is not used.
    pub const SLICE_PORT_IGNORED: &str = "port ignored";
    /// That endpoint of the EndpointSlice is not used.
    pub const ENDPOINT_IGNORED: &str = "endpoint ignored";
    /// A dual-stack field disagrees with the addresses: each address is programmed for its
    /// own family, as kube-proxy's per-family proxiers do.
    pub const BY_ADDRESS_FAMILY: &str = "each address is used for its own family";
}

/// A problem with an object: the object (and the file it came from), the field and the value at
/// fault (at most [`crate::excerpt::MAX_QUOTE`] bytes of it), what is wrong and what was done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}{}: {field} = {value:?}: {reason}; {outcome}", file_suffix(.origin))]
pub struct ModelError {
    /// `Service`, `EndpointSlice` or `ServiceCIDR`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub object: String,
    /// The manifest file the object came from (`None`: the Kubernetes API).
    pub origin: Option<SharedStr>,
    /// Path of the field.
    pub field: String,
    /// The value at fault (an excerpt of it when long).
    pub value: String,
    /// What is wrong.
    pub reason: String,
    /// What was done about it (one of [`outcome`]).
    pub outcome: &'static str,
    /// Its class.
    pub class: ErrorClass,
}

/// ` (file PATH)` for an object read from a manifest file.
fn file_suffix(origin: &Option<SharedStr>) -> String {
    origin.as_ref().map(|o| format!(" (file {o})")).unwrap_or_default()
}

/// The object an error is about, to build [`ModelError`]s.
struct ErrorSite {
    kind: &'static str,
    object: String,
    origin: Option<SharedStr>,
}

impl ErrorSite {
    fn service(s: &ServiceObj) -> Self {
        Self { kind: "Service", object: s.name.to_string(), origin: s.origin.clone() }
    }

    fn slice(s: &SliceObj) -> Self {
        Self { kind: "EndpointSlice", object: s.name.to_string(), origin: s.origin.clone() }
    }

    fn service_cidr(c: &ServiceCidrObj) -> Self {
        Self { kind: "ServiceCIDR", object: c.name.clone(), origin: c.origin.clone() }
    }

    /// An [`ErrorClass::Invalid`] error; `value` is quoted through [`excerpt`].
    fn invalid(
        &self,
        field: impl Into<String>,
        value: &str,
        reason: impl Into<String>,
        outcome: &'static str,
    ) -> ModelError {
        ModelError {
            kind: self.kind,
            object: self.object.clone(),
            origin: self.origin.clone(),
            field: field.into(),
            value: excerpt(value).into_owned(),
            reason: reason.into(),
            outcome,
            class: ErrorClass::Invalid,
        }
    }
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

/// Translates the objects into the desired state (all at once; the agent uses a [`Tracker`]).
pub fn build(services: &[Service], slices: &[EndpointSlice], node: &NodeInfo) -> BuildOutput {
    let mut t = Tracker::new(node.clone());
    for s in slices {
        t.apply(Change::Slice(s.into()));
    }
    for s in services {
        t.apply(Change::Service(s.into()));
    }
    let c = t.full();
    BuildOutput { state: c.state, errors: c.new_errors, skipped: c.skipped }
}

/// What one round of the [`Tracker`] produced.
#[derive(Debug, Default)]
pub struct Changes {
    /// True when `state` holds every service (a full resync): anything else programmed is stale.
    pub full: bool,
    /// The services recomputed: for each, its ports in `state.services` and `state.services6`
    /// replace the ones it had (a service listed here without ports in `state` has none any
    /// more).
    pub services: BTreeSet<ServiceName>,
    /// The desired state of those services; `health_checks` is always complete.
    pub state: DesiredState,
    /// Validation errors not reported before for the same object (log them once).
    pub new_errors: Vec<ModelError>,
    /// Deliberate skips of the recomputed services, for the log.
    pub skipped: Vec<String>,
    /// `last-change-trigger-time` of EndpointSlices that changed since the last round.
    pub triggers: Vec<String>,
    /// The service CIDRs (`--service-cidr` and ServiceCIDR objects), when they changed or the
    /// round is full: the ones the datapath holds, at most [`kproxy_common::SERVICE_CIDRS_MAX`].
    pub service_cidrs: Option<Vec<ipnet::Ipv4Net>>,
    /// The IPv6 service CIDRs, given with [`Self::service_cidrs`].
    pub service_cidrs6: Option<Vec<ipnet::Ipv6Net>>,
}

/// How old a service is, for frontend ownership: a known creation time comes before an unknown
/// one. The seconds and nanoseconds of the creation timestamp, which order as it does (both carry
/// its sign), packed into 12 bytes where an `Option<jiff::Timestamp>` takes 24: every claim holds
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(Rust, packed(4))]
struct Age {
    second: i64,
    nanosecond: i32,
}

impl Age {
    /// After every creation time (the last second jiff represents is far below `i64::MAX`).
    const UNKNOWN: Self = Self { second: i64::MAX, nanosecond: 0 };

    fn of(svc: &ServiceObj) -> Self {
        svc.created.map_or(Self::UNKNOWN, Self::created)
    }

    fn created(t: jiff::Timestamp) -> Self {
        Self { second: t.as_second(), nanosecond: t.subsec_nanosecond() }
    }

    fn timestamp(self) -> Option<jiff::Timestamp> {
        let Self { second, nanosecond } = self;
        (self != Self::UNKNOWN)
            .then(|| jiff::Timestamp::new(second, nanosecond).expect("the parts of a timestamp"))
    }
}

impl Default for Age {
    fn default() -> Self {
        Self::UNKNOWN
    }
}

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.timestamp() {
            Some(t) => write!(f, "created {t}"),
            None => f.write_str("creation time unknown"),
        }
    }
}

/// A service port's claim on a frontend. Claims order so that the smallest one owns the
/// frontend: the oldest service (creationTimestamp), then namespace/name, port name, protocol
/// (the order of the fields). The service port is spelt out rather than a [`ServicePortName`]
/// so that the protocol fills the room after the age: 40 bytes instead of 48.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    age: Age,
    service: ServiceName,
    port: SharedStr,
    proto: u8,
}

// One per frontend of every service, in the claims table.
const _: () = assert!(size_of::<Claim>() <= 40);

impl Claim {
    fn new(age: Age, service: &ServiceName, (port, proto): (&SharedStr, u8)) -> Self {
        Self { age, service: service.clone(), port: port.clone(), proto }
    }

    /// Whether the claim is service port `spn`'s.
    fn is_of(&self, spn: &ServicePortName) -> bool {
        self.service == spn.service && self.port == spn.port && self.proto == spn.proto
    }

    fn port_name(&self) -> ServicePortName {
        ServicePortName {
            service: self.service.clone(),
            port: self.port.clone(),
            proto: self.proto,
        }
    }
}

/// The claims on one frontend: almost always one, held inline (a `SmallVec` would add two words
/// of length and capacity).
#[derive(Debug)]
enum Claims {
    One(Claim),
    /// Two or more.
    Many(Vec<Claim>),
}

// The claims table's value: one claim's size, the list in the room its pointers leave.
const _: () = assert!(size_of::<Claims>() <= 40);

impl Claims {
    fn all(&self) -> &[Claim] {
        match self {
            Self::One(c) => std::slice::from_ref(c),
            Self::Many(v) => v,
        }
    }

    /// The claim that owns the frontend.
    fn owner(&self) -> &Claim {
        self.all().iter().min().expect("a frontend's claims are never empty")
    }

    fn add(&mut self, c: Claim) {
        match self {
            Self::One(first) => *self = Self::Many(vec![first.clone(), c]),
            // Exact growth: a frontend rarely has more than two.
            Self::Many(v) => {
                v.reserve_exact(1);
                v.push(c);
            }
        }
    }

    /// Drops `c`; true when no claim is left.
    fn remove(&mut self, c: &Claim) -> bool {
        match self {
            Self::One(only) => only == c,
            Self::Many(v) => {
                v.retain(|x| x != c);
                if let [_] = v[..] {
                    let last = v.pop().expect("one left");
                    *self = Self::One(last);
                    return false;
                }
                v.is_empty()
            }
        }
    }
}

/// The key claims are made on: address, port and protocol. Both scopes of an address count as
/// one: a service that loses a frontend loses it for every client.
fn claim_key(f: &Frontend) -> Frontend {
    Frontend { scope: scope::INTERNAL, ..*f }
}

/// Which addresses services may use besides their ClusterIP (`None`: any, as kube-proxy).
/// CVE-2020-8554: anyone who may create a Service can otherwise intercept traffic to any address
/// through `spec.externalIPs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// CIDRs that `spec.externalIPs` must fall in (empty: none allowed).
    pub external_ips: Option<Vec<ipnet::IpNet>>,
    /// CIDRs that `status.loadBalancer.ingress[].ip` must fall in (empty: none allowed).
    pub load_balancer_ips: Option<Vec<ipnet::IpNet>>,
}

impl AddressPolicy {
    fn allows(list: &Option<Vec<ipnet::IpNet>>, addr: impl Into<IpAddr>) -> bool {
        let addr = addr.into();
        list.as_ref().is_none_or(|nets| nets.iter().any(|n| n.contains(&addr)))
    }
}

/// A claim as the record of its service keeps it: the frontend (claim key), the port's name and
/// protocol (the service is the record's).
type RecordClaim = (Frontend, SharedStr, u8);

/// What the tracker remembers of the last computation of one service.
#[derive(Debug, Default)]
struct ServiceRecord {
    /// The service's age when it made its claims.
    age: Age,
    /// Frontends it claimed, owned or not. Inline for the usual one (no allocation of its own).
    claims: SmallVec<[RecordClaim; 1]>,
    /// A boxed slice, not a vector: a word less in every service's entry.
    errors: Box<[ModelError]>,
    health: Option<u16>,
}

/// What the tracker holds under one service name: the Service, the names of its slices and the
/// record of its last computation, in one entry (one hash table with one copy of the key rather
/// than three) and one allocation (the entry is boxed, the Service inline in it). Any part may
/// be missing: slices arrive before their Service, a deleted Service's record stays until it is
/// recomputed.
#[derive(Debug, Default)]
struct Held {
    service: Option<ServiceObj>,
    /// Names of its IPv4 and IPv6 slices, in name order. Inline for the usual one slice (no
    /// allocation of its own).
    slices: SmallVec<[SharedStr; 1]>,
    record: ServiceRecord,
}

// One box per Service: 280 bytes and the allocator's word fit a 288-byte block.
const _: () = assert!(size_of::<Held>() <= 280);

impl Held {
    /// Nothing left to hold.
    fn is_empty(&self) -> bool {
        self.service.is_none()
            && self.slices.is_empty()
            && self.record.claims.is_empty()
            && self.record.errors.is_empty()
            && self.record.health.is_none()
    }
}

/// Errors and skips that belong to one EndpointSlice rather than its service.
#[derive(Debug, Default, PartialEq)]
struct SliceIssues {
    errors: Vec<ModelError>,
    skipped: Vec<String>,
}

/// Hash maps keyed by names from the API (the tracker's, the syncer's): foldhash's randomly
/// seeded quality hasher (SipHash was a few % of a from-scratch model build and sync).
pub(crate) type NameMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

/// Hash sets of names from the API ([`NameMap`]'s hasher). A set that fills with every object
/// of a first read and empties at the next sync is one table (a few large blocks, the largest
/// mapped apart), not a B-tree of ~11-key nodes that would leave thousands of small holes among
/// the objects read with them.
pub(crate) type NameSet<K> = HashSet<K, foldhash::quality::RandomState>;

/// The change tracker: keeps the compact objects, takes per-object [`Change`]s, marks the
/// services they affect dirty (a Service itself, the owner of an EndpointSlice through its
/// `kubernetes.io/service-name` label, every service for a node change) and recomputes only
/// those.
///
/// One frontend (address, port, protocol) has one owner: the port of the oldest service claiming
/// it (creationTimestamp, then namespace/name, port name, protocol), so a newer service cannot
/// take the traffic of a live one; the others are refused with an error naming the owner. A
/// change of owner recomputes the services involved.
///
/// An update that makes a valid Service or EndpointSlice invalid is not applied: the last valid
/// version stays in effect (and programmed) until a valid one arrives, and the errors of the
/// update are reported once. An object whose first version is invalid is used for what is valid
/// in it.
#[derive(Debug, Default)]
pub struct Tracker {
    node: NodeInfo,
    policy: AddressPolicy,
    /// Whether `loadBalancerSourceRanges` restrict the service's NodePorts too.
    node_port_source_ranges: bool,
    /// Node objects: name → zone label.
    node_zones: HashMap<String, Option<String>>,
    /// Service name → the Service, its slices' names, its record ([`Held`]); an entry goes when
    /// it holds nothing. Boxed (as `slices`): a `Held` is a few hundred bytes, and the table's
    /// free buckets (up to half of them right after it doubles) then cost a pointer each.
    held: NameMap<ServiceName, Box<Held>>,
    /// Number of Services held.
    service_count: usize,
    // Boxed: a hash table's free buckets then cost a pointer, not a whole object.
    slices: NameMap<ObjectName, Box<SliceObj>>,
    /// Claim key → service ports claiming it (almost always one).
    claims: NameMap<Frontend, Claims>,
    /// Objects whose last update was invalid and not applied → the errors of that update.
    rejected: HashMap<(&'static str, ObjectName), Vec<ModelError>>,
    /// healthCheckNodePort → services asking for it, with their local endpoint counts.
    health: BTreeMap<u16, BTreeMap<ServiceName, usize>>,
    slice_issues: HashMap<ObjectName, SliceIssues>,
    /// Services to recompute (in name order, at the next round).
    dirty: NameSet<ServiceName>,
    all_dirty: bool,
    pending_errors: Vec<ModelError>,
    pending_skipped: Vec<String>,
    triggers: Vec<String>,
    /// One copy of each namespace, node name and short repeated value (port names, protocols,
    /// types, policies) the objects name.
    strings: HashSet<SharedStr>,
    /// Service CIDRs: `--service-cidr`, ServiceCIDR objects by name, whether they changed since
    /// the last round or were never given, the networks last left out for lack of room (reported
    /// once).
    cidr_flags: Vec<ipnet::Ipv4Net>,
    cidr_flags6: Vec<ipnet::Ipv6Net>,
    cidr_objects: BTreeMap<String, ServiceCidrObj>,
    cidrs_dirty: bool,
    cidrs_given: bool,
    cidrs_left_out: Vec<ModelError>,
}

impl Tracker {
    /// An empty tracker for `node` (its `zone` is overridden by a Node object of that name).
    pub fn new(node: NodeInfo) -> Self {
        Self { node, ..Default::default() }
    }

    /// The node as the model uses it.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Number of Services and EndpointSlices held.
    pub fn object_counts(&self) -> (usize, usize) {
        (self.service_count, self.slices.len())
    }

    /// Whether some service needs recomputing.
    pub fn has_changes(&self) -> bool {
        self.all_dirty
            || !self.dirty.is_empty()
            || !self.pending_errors.is_empty()
            || self.cidrs_dirty
    }

    /// Whether the next round recomputes every service (after a node change): [`Self::changes`]
    /// then returns what [`Self::full`] does.
    pub fn all_dirty(&self) -> bool {
        self.all_dirty
    }

    /// Sets the service CIDRs of `--service-cidr` (used with those of the ServiceCIDR objects).
    pub fn set_service_cidrs(&mut self, nets: &[ipnet::Ipv4Net]) {
        if self.cidr_flags != nets {
            self.cidr_flags = nets.to_vec();
            self.cidrs_dirty = true;
        }
    }

    /// Sets the IPv6 service CIDRs of `--service-cidr`.
    pub fn set_service_cidrs6(&mut self, nets: &[ipnet::Ipv6Net]) {
        if self.cidr_flags6 != nets {
            self.cidr_flags6 = nets.to_vec();
            self.cidrs_dirty = true;
        }
    }

    /// Sets the NodePort addresses (every service is recomputed when they change).
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) {
        if self.node.addrs != addrs {
            self.node.addrs = addrs.to_vec();
            self.all_dirty = true;
        }
    }

    /// Sets the IPv6 NodePort addresses (every service is recomputed when they change).
    pub fn set_node_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        if self.node.addrs6 != addrs {
            self.node.addrs6 = addrs.to_vec();
            self.all_dirty = true;
        }
    }

    /// Sets which externalIPs and load-balancer IPs services may use (every service is
    /// recomputed when it changes).
    pub fn set_address_policy(&mut self, policy: AddressPolicy) {
        if self.policy != policy {
            self.policy = policy;
            self.all_dirty = true;
        }
    }

    /// Makes `loadBalancerSourceRanges` restrict the NodePorts of their services as well as
    /// their LoadBalancer IPs (every service is recomputed when it changes).
    pub fn set_node_port_source_ranges(&mut self, on: bool) {
        if self.node_port_source_ranges != on {
            self.node_port_source_ranges = on;
            self.all_dirty = true;
        }
    }

    /// Applies one change from a source; an update equal to what is held changes nothing, an
    /// invalid update of a valid object is set aside (see [`Tracker`]).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Service(mut s) => {
                s.name.namespace = self.intern(&s.name.namespace);
                if let Some((k, _)) = self.held.get_key_value(&s.name) {
                    // The name its slices arrived with: one copy.
                    s.name.name = k.name.clone();
                }
                self.intern_service_values(&mut s);
                let held = self.service(&s.name);
                if s.created_when_read
                    && let Some(h) = held
                {
                    // Read again: as old as the version held (its time stays, whether read or
                    // given by its file).
                    s.created = h.created;
                    s.created_when_read = h.created_when_read;
                }
                if held == Some(&s) {
                    self.rejected.remove(&("Service", s.name));
                    return;
                }
                let errors = check_service(&s);
                if !errors.is_empty() && held.is_some_and(|h| check_service(h).is_empty()) {
                    self.reject("Service", s.name.clone(), errors);
                    return;
                }
                self.rejected.remove(&("Service", s.name.clone()));
                self.dirty.insert(s.name.clone());
                let h = self.held.entry(s.name.clone()).or_default();
                self.service_count += usize::from(h.service.is_none());
                h.service = Some(s);
            }
            Change::ServiceDeleted(name) => {
                self.rejected.remove(&("Service", name.clone()));
                if let Some(h) = self.held.get_mut(&name)
                    && h.service.take().is_some()
                {
                    self.service_count -= 1;
                    // The record stays until the recomputation releases its claims.
                    if h.is_empty() {
                        self.held.remove(&name);
                    }
                    self.dirty.insert(name);
                }
            }
            Change::Slice(mut s) => {
                s.name.namespace = self.intern(&s.name.namespace);
                s.address_type = self.intern(&s.address_type);
                for p in &mut s.ports {
                    self.intern_opt(&mut p.name);
                    self.intern_opt(&mut p.protocol);
                }
                for ep in s.endpoints.iter_mut() {
                    if let Some(n) = ep.node_name() {
                        let n = self.intern(n);
                        ep.set_node_name(Some(n));
                    }
                }
                if let Some(owner) = s.owner() {
                    // The owner's name once: the held Service's, or the one its other slices
                    // arrived with.
                    if let Some((k, _)) = self.held.get_key_value(&owner) {
                        s.service = Some(k.name.clone());
                    }
                }
                let old = self.slices.get(&s.name).map(|o| &**o);
                if old != Some(&s) {
                    let errors = check_slice(&s);
                    if !errors.is_empty() && old.is_some_and(|o| check_slice(o).is_empty()) {
                        self.reject("EndpointSlice", s.name.clone(), errors);
                        return;
                    }
                }
                self.rejected.remove(&("EndpointSlice", s.name.clone()));
                if old == Some(&s) {
                    return;
                }
                if let Some(t) = &s.trigger_time
                    && old.and_then(|o| o.trigger_time.as_ref()) != Some(t)
                {
                    self.triggers.push(t.to_string());
                }
                let name = s.name.clone();
                self.unlink_slice(&name);
                self.link_slice(&s);
                self.slices.insert(name, Box::new(s));
            }
            Change::SliceDeleted(name) => {
                self.rejected.remove(&("EndpointSlice", name.clone()));
                self.unlink_slice(&name);
                self.slices.remove(&name);
                self.slice_issues.remove(&name);
            }
            Change::Node(n) => {
                let zone = n.zone.clone();
                if self.node_zones.insert(n.name.clone(), n.zone) != Some(zone) {
                    self.node_changed(&n.name);
                }
            }
            Change::NodeDeleted(name) => {
                if self.node_zones.remove(&name).is_some() {
                    self.node_changed(&name);
                }
            }
            Change::ServiceCidr(c) => {
                if self.cidr_objects.get(&c.name) != Some(&c) {
                    self.pending_errors.extend(service_cidr_nets(&c).1);
                    self.cidr_objects.insert(c.name.clone(), c);
                    self.cidrs_dirty = true;
                }
            }
            Change::ServiceCidrDeleted(name) => {
                self.cidrs_dirty |= self.cidr_objects.remove(&name).is_some();
            }
        }
    }

    /// The service CIDRs the datapath is to hold, by family: `--service-cidr` first, then the
    /// networks of the ServiceCIDR objects in name order, without duplicates and networks inside
    /// another one; at most [`kproxy_common::SERVICE_CIDRS_MAX`] of each family (the others are
    /// reported once, naming their object, and left unguarded).
    fn service_cidrs(&mut self) -> (Vec<ipnet::Ipv4Net>, Vec<ipnet::Ipv6Net>, Vec<ModelError>) {
        let mut all: Vec<(ipnet::IpNet, Option<(&ServiceCidrObj, usize)>)> = self
            .cidr_flags
            .iter()
            .map(|n| (ipnet::IpNet::V4(*n), None))
            .chain(self.cidr_flags6.iter().map(|n| (ipnet::IpNet::V6(*n), None)))
            .collect();
        for c in self.cidr_objects.values() {
            for (i, n) in service_cidr_nets(c).0 {
                all.push((n, Some((c, i))));
            }
        }
        let (mut kept4, mut kept6) = (Vec::new(), Vec::new());
        let mut left_out = Vec::new();
        for (i, (n, from)) in all.iter().enumerate() {
            let covered = all.iter().enumerate().any(|(j, (o, _))| {
                o.contains(n) && (o.prefix_len() < n.prefix_len() || (o == n && j < i))
            });
            if covered {
                continue;
            }
            let room = match n {
                ipnet::IpNet::V4(n) if kept4.len() < kproxy_common::SERVICE_CIDRS_MAX => {
                    kept4.push(*n);
                    true
                }
                ipnet::IpNet::V6(n) if kept6.len() < kproxy_common::SERVICE_CIDRS_MAX => {
                    kept6.push(*n);
                    true
                }
                _ => false,
            };
            if !room && let Some((c, i)) = from {
                left_out.push(ErrorSite::service_cidr(c).invalid(
                    format!("spec.cidrs[{i}]"),
                    &c.cidrs[*i],
                    format!(
                        "the datapath holds {} service CIDRs of each family: its unallocated \
                         addresses are not dropped",
                        kproxy_common::SERVICE_CIDRS_MAX
                    ),
                    outcome::CIDR_IGNORED,
                ));
            }
        }
        let new = if left_out == self.cidrs_left_out {
            Vec::new()
        } else {
            self.cidrs_left_out = left_out.clone();
            left_out
        };
        (kept4, kept6, new)
    }

    /// Sets an invalid update of a valid object aside: its errors are reported (once per
    /// distinct update), the held version stays.
    fn reject(&mut self, kind: &'static str, name: ObjectName, mut errors: Vec<ModelError>) {
        for e in &mut errors {
            e.outcome = outcome::KEPT_LAST_VALID;
        }
        let key = (kind, name);
        if self.rejected.get(&key) != Some(&errors) {
            self.pending_errors.extend(errors.iter().cloned());
            self.rejected.insert(key, errors);
        }
    }

    /// The shared copy of `s`.
    fn intern(&mut self, s: &SharedStr) -> SharedStr {
        match self.strings.get(s) {
            Some(shared) => shared.clone(),
            None => {
                self.strings.insert(s.clone());
                s.clone()
            }
        }
    }

    fn intern_opt(&mut self, s: &mut Option<SharedStr>) {
        if let Some(v) = s {
            *v = self.intern(v);
        }
    }

    /// Shares the short values of a Service that repeat across objects (type, policies, IP
    /// families, port names and protocols).
    fn intern_service_values(&mut self, s: &mut ServiceObj) {
        self.intern_opt(&mut s.type_);
        self.intern_opt(&mut s.ip_family_policy);
        self.intern_opt(&mut s.external_traffic_policy);
        self.intern_opt(&mut s.internal_traffic_policy);
        self.intern_opt(&mut s.session_affinity);
        for f in &mut s.ip_families {
            *f = self.intern(f);
        }
        for p in &mut s.ports {
            self.intern_opt(&mut p.name);
            self.intern_opt(&mut p.protocol);
        }
    }

    /// The Service held under `name`.
    fn service(&self, name: &ServiceName) -> Option<&ServiceObj> {
        self.held.get(name).and_then(|h| h.service.as_ref())
    }

    fn node_changed(&mut self, name: &str) {
        if name != self.node.name {
            return;
        }
        let zone = self.node_zones.get(name).cloned().flatten();
        if zone != self.node.zone {
            self.node.zone = zone;
            self.all_dirty = true;
        }
    }

    /// Removes a held slice from its owner's index, dirtying the owner.
    fn unlink_slice(&mut self, name: &ObjectName) {
        let Some(owner) = self.slices.get(name).and_then(|s| s.owner()) else { return };
        if let Some(h) = self.held.get_mut(&owner) {
            h.slices.retain(|n| *n != name.name);
            if h.is_empty() {
                self.held.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Checks a new slice, indexes it under its owner and dirties the owner.
    fn link_slice(&mut self, s: &SliceObj) {
        let mut issues = SliceIssues { errors: check_slice(s), skipped: Vec::new() };
        if s.address_type != "IPv4" && s.address_type != "IPv6" {
            issues.skipped.push(format!(
                "EndpointSlice {}: addressType {}",
                s.name,
                excerpt(&s.address_type)
            ));
        } else if let Some(owner) = s.owner() {
            let names = &mut self.held.entry(owner.clone()).or_default().slices;
            if let Err(at) = names.binary_search(&s.name.name) {
                // Almost always one slice per service (inline); exact growth beyond.
                names.reserve_exact(1);
                names.insert(at, s.name.name.clone());
            }
            self.dirty.insert(owner);
        }
        let old = self.slice_issues.remove(&s.name).unwrap_or_default();
        if old != issues {
            self.pending_errors
                .extend(issues.errors.iter().filter(|e| !old.errors.contains(e)).cloned());
            self.pending_skipped.extend(issues.skipped.iter().cloned());
        }
        if issues != SliceIssues::default() {
            self.slice_issues.insert(s.name.clone(), issues);
        }
    }

    /// Recomputes the dirty services (everything after a node change).
    pub fn changes(&mut self) -> Changes {
        if std::mem::take(&mut self.all_dirty) {
            return self.full();
        }
        let mut out = self.take_pending(false);
        self.recompute_dirty(&mut out);
        self.finish(out)
    }

    /// Recomputes every service from the held objects (the full resync; also what a fresh
    /// tracker's first round is). Errors already reported are not reported again.
    pub fn full(&mut self) -> Changes {
        self.all_dirty = false;
        let mut out = self.take_pending(true);
        self.claims.clear();
        self.health.clear();
        let mut old_errors: HashMap<ServiceName, Box<[ModelError]>> = HashMap::new();
        self.held.retain(|name, h| {
            let r = std::mem::take(&mut h.record);
            if !r.errors.is_empty() {
                old_errors.insert(name.clone(), r.errors);
            }
            !h.is_empty()
        });
        // Oldest first: a frontend's owner claims it before the services it is refused to.
        let mut names: Vec<(Age, ServiceName)> = self
            .held
            .iter()
            .filter_map(|(n, h)| Some((Age::of(h.service.as_ref()?), n.clone())))
            .collect();
        names.sort();
        // Released, not cleared: after a first read it held every service.
        self.dirty = NameSet::default();
        for (_, name) in names {
            let errors = old_errors.remove(&name).unwrap_or_default();
            if let Some(h) = self.held.get_mut(&name) {
                h.record = ServiceRecord { errors, ..Default::default() };
            }
            self.recompute(&name, &mut out);
        }
        // Conflicts resolved in ownership order never dirty anything; this is a safety net.
        self.recompute_dirty(&mut out);
        // Values no object names any more (only the set holds them).
        self.strings.retain(SharedStr::is_shared);
        self.finish(out)
    }

    /// Recomputes the dirty services in name order, a service a recomputation dirties (the
    /// next owner of a frontend) joining them in its place.
    fn recompute_dirty(&mut self, out: &mut Changes) {
        let mut todo: BTreeSet<ServiceName> = std::mem::take(&mut self.dirty).into_iter().collect();
        while let Some(name) = todo.pop_first() {
            self.recompute(&name, out);
            todo.extend(self.dirty.drain());
        }
    }

    fn take_pending(&mut self, full: bool) -> Changes {
        let give = !std::mem::replace(&mut self.cidrs_given, true);
        let (service_cidrs, service_cidrs6) =
            if std::mem::take(&mut self.cidrs_dirty) || full || give {
                let (nets, nets6, errors) = self.service_cidrs();
                self.pending_errors.extend(errors);
                (Some(nets), Some(nets6))
            } else {
                (None, None)
            };
        Changes {
            full,
            service_cidrs,
            service_cidrs6,
            new_errors: std::mem::take(&mut self.pending_errors),
            skipped: std::mem::take(&mut self.pending_skipped),
            triggers: std::mem::take(&mut self.triggers),
            ..Default::default()
        }
    }

    fn finish(&self, mut out: Changes) -> Changes {
        out.state.health_checks = self
            .health
            .iter()
            .filter_map(|(port, by)| {
                let (service, n) = by.iter().next_back()?;
                Some((*port, HealthCheck { service: service.clone(), local_endpoints: *n }))
            })
            .collect();
        out
    }

    /// Recomputes one service: its ports into `out`, its claims, errors and health check.
    fn recompute(&mut self, name: &ServiceName, out: &mut Changes) {
        let old =
            self.held.get_mut(name).map(|h| std::mem::take(&mut h.record)).unwrap_or_default();
        let age = self.service(name).map_or(Age::UNKNOWN, Age::of);
        let held = self.held.get(name);
        let mut result = match held.and_then(|h| h.service.as_ref()) {
            Some(svc) => {
                let slices: Vec<&SliceObj> = held
                    .into_iter()
                    .flat_map(|h| &h.slices)
                    .filter_map(|n| {
                        self.slices
                            .get(&ServiceName {
                                namespace: name.namespace.clone(),
                                name: n.clone(),
                            })
                            .map(|s| &**s)
                    })
                    .collect();
                compute_service(
                    svc,
                    &slices,
                    &self.node,
                    &self.policy,
                    self.node_port_source_ranges,
                )
            }
            None => ServiceResult::default(),
        };
        // Claims: drop the ones no longer made, add the new ones, then keep what it owns.
        let mut new_claims: SmallVec<[RecordClaim; 1]> = result
            .ports
            .iter()
            .flat_map(|(spn, st, _)| {
                st.frontends.keys().map(|f| (claim_key(f), spn.port.clone(), spn.proto))
            })
            .collect();
        new_claims.sort();
        new_claims.dedup();
        // Kept in the record: no growth slack.
        new_claims.shrink_to_fit();
        // A claim stays when the service makes it again at the same age.
        let same_age = old.age == age;
        for (f, port, proto) in old.claims.iter().filter(|c| !(same_age && new_claims.contains(c)))
        {
            let c = Claim::new(old.age, name, (port, *proto));
            let Some(list) = self.claims.get_mut(f) else { continue };
            let was_owner = *list.owner() == c;
            if list.remove(&c) {
                self.claims.remove(f);
                continue;
            }
            let next = list.owner();
            if was_owner && next.service != *name {
                self.dirty.insert(next.service.clone());
            }
        }
        for (f, port, proto) in new_claims.iter().filter(|c| !(same_age && old.claims.contains(c)))
        {
            let c = Claim::new(age, name, (port, *proto));
            match self.claims.entry(*f) {
                Entry::Vacant(e) => {
                    e.insert(Claims::One(c));
                }
                Entry::Occupied(mut e) => {
                    let prev = e.get().owner();
                    if c < *prev && prev.service != *name {
                        self.dirty.insert(prev.service.clone());
                    }
                    e.get_mut().add(c);
                }
            }
        }
        let site = self.service(name).map(ErrorSite::service);
        for (spn, st, port_field) in &mut result.ports {
            let mut refused: BTreeMap<Frontend, Claim> = BTreeMap::new();
            st.frontends.retain(|f, _| {
                let key = claim_key(f);
                match self.claims.get(&key).map(Claims::owner) {
                    Some(owner) if !owner.is_of(spn) => {
                        refused.insert(key, owner.clone());
                        false
                    }
                    _ => true,
                }
            });
            let Some(site) = &site else { continue };
            for (f, owner) in refused {
                let Frontend { addr, port, proto, .. } = f;
                let mut e = site.invalid(
                    port_field.clone(),
                    &format!("{addr}:{port}/{}", proto_name(proto)),
                    format!(
                        "already held by {} ({}), which comes first (oldest creationTimestamp, \
                         then namespace/name)",
                        owner.port_name(),
                        owner.age
                    ),
                    outcome::FRONTEND_REFUSED,
                );
                e.class = ErrorClass::FrontendConflict;
                result.errors.push(e);
            }
        }
        // Health check.
        if let Some(port) = old.health
            && let Some(by) = self.health.get_mut(&port)
        {
            by.remove(name);
            if by.is_empty() {
                self.health.remove(&port);
            }
        }
        if let Some((port, n)) = result.health {
            self.health.entry(port).or_default().insert(name.clone(), n);
        }
        out.new_errors.extend(result.errors.iter().filter(|e| !old.errors.contains(e)).cloned());
        out.skipped.append(&mut result.skipped);
        out.services.insert(name.clone());
        // A recomputation in the same round replaces the earlier one.
        remove_ports_of(&mut out.state.services, name);
        remove_ports_of(&mut out.state.services6, name);
        for (spn, st, _) in result.ports {
            out.state.services.insert(spn, st);
        }
        out.state.services6.extend(result.ports6);
        if let Some(h) = self.held.get_mut(name) {
            if h.service.is_some() {
                h.record = ServiceRecord {
                    age,
                    claims: new_claims,
                    errors: result.errors.into_boxed_slice(),
                    health: result.health.map(|(p, _)| p),
                };
            } else if h.is_empty() {
                self.held.remove(name);
            }
        }
    }
}

impl ServicePortName {
    /// The smallest service port name of `service` (for range queries over one service).
    pub fn first_of(service: &ServiceName) -> Self {
        Self { service: service.clone(), port: "".into(), proto: 0 }
    }
}

/// Removes every port of `service` from a map keyed by service port name.
fn remove_ports_of<V>(map: &mut BTreeMap<ServicePortName, V>, service: &ServiceName) {
    let stale: Vec<ServicePortName> = map
        .range(ServicePortName::first_of(service)..)
        .take_while(|(k, _)| k.service == *service)
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        map.remove(&k);
    }
}

/// The per-Service facts the frontends are made from.
struct SvcSpec {
    /// The IPv4 ClusterIP (`None`: an IPv6-only service).
    cluster_ip: Option<Ipv4Addr>,
    /// Type NodePort or LoadBalancer: node ports are served.
    node_ports: bool,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    policy_internal_local: bool,
    policy_external_local: bool,
    affinity_timeout: u32,
    health_check_node_port: Option<u16>,
    /// The IPv6 addresses.
    v6: v6::Addrs6,
}

/// One service computed on its own (before frontend ownership is applied).
#[derive(Debug, Default)]
struct ServiceResult {
    /// Ports with their state and the field naming the port (`spec.ports[name or index].port`).
    ports: Vec<(ServicePortName, ServicePortState, String)>,
    /// Ports with their IPv6 state.
    ports6: Vec<(ServicePortName, v6::PortState6)>,
    /// healthCheckNodePort and the local endpoint count.
    health: Option<(u16, usize)>,
    errors: Vec<ModelError>,
    skipped: Vec<String>,
}

/// The validated numbers of one service port.
struct PortSpec {
    proto: u8,
    port: u16,
    node_port: Option<u16>,
}

/// A Service's ports in the order they are numbered in messages (by name, then port).
fn sorted_ports(svc: &ServiceObj) -> Vec<&ServicePortObj> {
    let mut ports: Vec<&ServicePortObj> = svc.ports.iter().collect();
    ports.sort_by(|a, b| (&a.name, a.port).cmp(&(&b.name, b.port)));
    ports
}

/// `spec.ports[<name or index>].<f>`.
fn port_field(port: &ServicePortObj, index: usize, f: &str) -> String {
    match port.name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => format!("spec.ports[{n}].{f}"),
        None => format!("spec.ports[{index}].{f}"),
    }
}

/// Checks one port of a Service; `Ok(None)` for a protocol kproxy does not serve (SCTP).
fn port_spec(
    site: &ErrorSite,
    port: &ServicePortObj,
    index: usize,
    spec: &SvcSpec,
) -> Result<Option<PortSpec>, Box<ModelError>> {
    let err = |f: &str, value: &str, reason: &str| {
        Box::new(site.invalid(port_field(port, index, f), value, reason, outcome::PORT_SKIPPED))
    };
    let proto = match parse_protocol(port.protocol.as_deref()) {
        Ok(proto::SCTP) => return Ok(None),
        Ok(p) => p,
        Err(v) => return Err(err("protocol", &v, "unknown protocol")),
    };
    let Some(svc_port) = valid_port(port.port) else {
        return Err(err("port", &port.port.to_string(), "out of range 1-65535"));
    };
    let node_port = match port.node_port.unwrap_or(0) {
        _ if !spec.node_ports => None,
        0 => None,
        n => match valid_port(n) {
            Some(n) => Some(n),
            None => return Err(err("nodePort", &n.to_string(), "out of range 1-65535")),
        },
    };
    Ok(Some(PortSpec { proto, port: svc_port, node_port }))
}

/// The validation errors of a Service taken on its own (not its claims on frontends): what
/// decides whether an update is applied.
/// The networks of a ServiceCIDR's `spec.cidrs` (both families) with their index, and an error
/// for each value that is no network.
fn service_cidr_nets(c: &ServiceCidrObj) -> (Vec<(usize, ipnet::IpNet)>, Vec<ModelError>) {
    let (mut nets, mut errors) = (Vec::new(), Vec::new());
    for (i, v) in c.cidrs.iter().enumerate() {
        let reason = match v.parse::<ipnet::IpNet>() {
            Ok(n) if n.trunc() == n => {
                nets.push((i, n));
                continue;
            }
            Ok(_) => "host bits are set",
            Err(_) => "not a CIDR",
        };
        errors.push(ErrorSite::service_cidr(c).invalid(
            format!("spec.cidrs[{i}]"),
            v,
            reason,
            outcome::CIDR_IGNORED,
        ));
    }
    (nets, errors)
}

fn check_service(svc: &ServiceObj) -> Vec<ModelError> {
    let mut out = ServiceResult::default();
    if let Some(spec) = service_spec(svc, &mut out) {
        let site = ErrorSite::service(svc);
        for (i, port) in sorted_ports(svc).into_iter().enumerate() {
            if let Err(e) = port_spec(&site, port, i, &spec) {
                out.errors.push(*e);
            }
        }
    }
    out.errors
}

/// The family of an address as `spec.ipFamilies` spells it.
fn family_name(a: &IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Disagreements between a Service's dual-stack fields and its addresses: `spec.ipFamilies[i]`
/// naming another family than `spec.clusterIPs[i]`, an unknown family or policy, a
/// RequireDualStack service with the ClusterIP of one family only. kube-proxy's per-family
/// proxiers go by the address itself, and so does kproxy: these are warnings, the service is
/// programmed.
fn family_warnings(site: &ErrorSite, svc: &ServiceObj) -> Vec<ModelError> {
    let warn = |field: String, value: &str, reason: String| {
        site.invalid(field, value, reason, outcome::BY_ADDRESS_FAMILY)
    };
    let mut out = Vec::new();
    let ips: Vec<Option<IpAddr>> = svc.cluster_ips.iter().map(|c| c.addr()).collect();
    for (i, fam) in svc.ip_families.iter().enumerate() {
        if fam != "IPv4" && fam != "IPv6" {
            out.push(warn(format!("spec.ipFamilies[{i}]"), fam, "unknown IP family".into()));
            continue;
        }
        if let Some(Some(a)) = ips.get(i)
            && fam != family_name(a)
        {
            out.push(warn(
                format!("spec.clusterIPs[{i}]"),
                &svc.cluster_ips[i].to_string(),
                format!("an {} address, but spec.ipFamilies[{i}] is {fam}", family_name(a)),
            ));
        }
    }
    match svc.ip_family_policy.as_deref() {
        None | Some("SingleStack") | Some("PreferDualStack") => {}
        Some("RequireDualStack") => {
            let families: BTreeSet<&str> = ips.iter().flatten().map(family_name).collect();
            if families.len() < 2 && !svc.cluster_ips.iter().any(|c| c.is("None")) {
                let value = svc.cluster_ips.iter().map(|c| c.to_string()).collect::<Vec<_>>();
                let value = value.join(",");
                let reason = "RequireDualStack, but the ClusterIPs are of one family".to_string();
                out.push(warn("spec.clusterIPs".into(), &value, reason));
            }
        }
        Some(other) => {
            out.push(warn("spec.ipFamilyPolicy".into(), other, "unknown policy".into()));
        }
    }
    out
}

/// Why an endpoint address of an IPv4 slice is not an IPv4 address.
fn bad_ipv4_reason(text: &str) -> &'static str {
    match text.parse::<std::net::Ipv6Addr>() {
        Ok(a) if a.to_ipv4_mapped().is_some() => {
            "an IPv4-mapped IPv6 address (kube-proxy ignores it; write the IPv4 address)"
        }
        Ok(_) => "an IPv6 address in an IPv4 slice",
        Err(_) => "not an IPv4 address",
    }
}

/// The validation errors of an EndpointSlice taken on its own: the owner label, its ports and
/// its endpoint addresses (IPv4 and IPv6 slices; other address types are skipped whole).
fn check_slice(s: &SliceObj) -> Vec<ModelError> {
    let mut errors = Vec::new();
    let site = ErrorSite::slice(s);
    let v6 = s.address_type == "IPv6";
    if v6 {
        // IPv6 addresses are kept as written (see `EndpointAddr`) and parsed here and by
        // `v6::endpoint_addr6`.
        for (ei, ep) in s.endpoints.iter().enumerate() {
            let (text, reason) = match ep.addr() {
                Some(EndpointAddr::V4(a)) => (a.to_string(), "an IPv4 address in an IPv6 slice"),
                Some(EndpointAddr::Invalid(text)) => match text.parse::<IpAddr>() {
                    Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => (
                        text.to_string(),
                        "an IPv4-mapped address in an IPv6 slice (write the IPv4 address in an \
                         IPv4 slice)",
                    ),
                    Ok(IpAddr::V6(_)) => continue,
                    Ok(IpAddr::V4(_)) => (text.to_string(), "an IPv4 address in an IPv6 slice"),
                    Err(_) => (text.to_string(), "not an IPv6 address"),
                },
                None => continue,
            };
            let field = format!("endpoints[{ei}].addresses[0]");
            errors.push(site.invalid(field, &text, reason, outcome::ENDPOINT_IGNORED));
        }
    } else if s.address_type != "IPv4" {
        return errors;
    }
    if s.owner().is_none() {
        errors.push(site.invalid(
            format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
            s.service.as_deref().unwrap_or(""),
            "missing",
            outcome::SLICE_IGNORED,
        ));
    }
    for (pi, port) in s.ports.iter().enumerate() {
        if let Err(v) = parse_protocol(port.protocol.as_deref()) {
            let field = format!("ports[{pi}].protocol");
            errors.push(site.invalid(field, &v, "unknown protocol", outcome::SLICE_PORT_IGNORED));
        }
        if port.port.and_then(valid_port).is_none() {
            let v = port.port.map(|p| p.to_string()).unwrap_or_else(|| "<none>".into());
            let field = format!("ports[{pi}].port");
            errors.push(site.invalid(
                field,
                &v,
                "out of range 1-65535",
                outcome::SLICE_PORT_IGNORED,
            ));
        }
    }
    for (ei, ep) in s.endpoints.iter().enumerate().filter(|_| !v6) {
        if let Some(EndpointAddr::Invalid(text)) = ep.addr() {
            errors.push(site.invalid(
                format!("endpoints[{ei}].addresses[0]"),
                text,
                bad_ipv4_reason(text),
                outcome::ENDPOINT_IGNORED,
            ));
        }
    }
    errors
}

/// Translates one Service and its slices; externalIPs and load-balancer IPs that `policy` does
/// not allow are left out with an error. Source ranges restrict the LoadBalancer frontends,
/// and the NodePorts too with `node_port_ranges`.
fn compute_service(
    svc: &ServiceObj,
    slices: &[&SliceObj],
    node: &NodeInfo,
    policy: &AddressPolicy,
    node_port_ranges: bool,
) -> ServiceResult {
    let mut out = ServiceResult::default();
    let Some(mut spec) = service_spec(svc, &mut out) else { return out };
    let name = &svc.name;
    let site = ErrorSite::service(svc);
    // Warnings only: they do not make an update invalid (not part of `check_service`).
    out.errors.extend(family_warnings(&site, svc));
    out.errors.append(&mut spec.v6.warnings);
    if spec.cluster_ip.is_none() {
        out.skipped.push(format!("{name}: no IPv4 clusterIP (IPv6 only)"));
    }
    refuse_addresses(&site, svc, &mut spec, policy, &mut out.errors);
    let ranges = source_ranges(&site, svc, &node.addrs, &spec.lb_ips, &mut out.errors);
    let ranges6 = v6::source_ranges6(svc, &node.addrs6, &spec.v6.lb_ips);
    let mut local_ready6 = BTreeSet::new();
    // Ready endpoints on this node, by address over every port (kube-proxy's
    // LocalReadyEndpoints): terminating ones never count, so a node left with only terminating
    // endpoints fails its health check and load balancers drain it.
    let mut local_ready: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (i, port) in sorted_ports(svc).into_iter().enumerate() {
        let pname = port.name.clone().unwrap_or_default();
        let PortSpec { proto: p, port: svc_port, node_port } =
            match port_spec(&site, port, i, &spec) {
                Ok(Some(ps)) => ps,
                Ok(None) => {
                    out.skipped.push(format!("{name}: port {:?} is SCTP, not supported", &*pname));
                    continue;
                }
                Err(e) => {
                    out.errors.push(*e);
                    continue;
                }
            };
        // The port name held by the object: shared, not copied.
        let spn = ServicePortName { service: name.clone(), port: pname, proto: p };
        let state6 = v6::port_state(
            &spec,
            &spn,
            svc_port,
            node_port,
            slices,
            node,
            (&ranges6, node_port_ranges),
            &mut local_ready6,
        );
        out.ports6.extend(state6.map(|st| (spn.clone(), st)));
        let Some(cluster_ip) = spec.cluster_ip else { continue };
        let eps = collect_endpoints(&spn, slices, node, endpoint_addr4);
        let serve = Serve {
            cluster_ip,
            svc_port,
            node_port,
            node_addrs: &node.addrs,
            lb_ips: &spec.lb_ips,
            external_ips: &spec.external_ips,
        };
        let mut restricted = false;
        let (frontends, endpoints) =
            port_frontends(&spec, p, &serve, &eps, node, &mut local_ready, |kind| {
                let flags = range_flags(kind, !ranges.is_empty(), node_port_ranges);
                restricted |= flags != kind;
                flags
            });
        let mut state = ServicePortState { frontends, endpoints, ..Default::default() };
        if restricted {
            state.source_ranges.clone_from(&ranges);
        }
        state.udp_serving = udp_serving(p, &eps);
        out.ports.push((spn, state, port_field(port, i, "port")));
    }
    if spec.policy_external_local
        && let Some(port) = spec.health_check_node_port
    {
        // A dual-stack pod counts once.
        out.health = Some((port, local_ready.len().max(local_ready6.len())));
    }
    out
}

/// The serving endpoints (address, target port) of a UDP port, whatever the traffic policies
/// and topology select (see [`ServicePortState::udp_serving`]); empty for other protocols.
fn udp_serving<A: Copy + Ord>(p: u8, eps: &[Endpoint<A>]) -> BTreeSet<(A, u16)> {
    if p != proto::UDP {
        return BTreeSet::new();
    }
    eps.iter().filter(|e| e.ready || e.serving).map(|e| (e.addr, e.port)).collect()
}

/// The flags of a frontend's service entry: its kind (`svc_flags::CLUSTER_IP`, ...), with
/// affinity, a Local traffic policy, and drop rather than reject when it has no backend here
/// although the service has some elsewhere.
fn entry_flags(kind: u16, affinity_timeout: u32, local_policy: bool, drop_if_empty: bool) -> u16 {
    let mut flags = kind;
    if affinity_timeout > 0 {
        flags |= svc_flags::AFFINITY;
    }
    if local_policy {
        flags |= svc_flags::LOCAL_ONLY;
    }
    if drop_if_empty {
        flags |= svc_flags::DROP_IF_EMPTY;
    }
    flags
}

/// Where one service port is served, in one family.
struct Serve<'a, A> {
    cluster_ip: A,
    svc_port: u16,
    node_port: Option<u16>,
    node_addrs: &'a [A],
    lb_ips: &'a [A],
    external_ips: &'a [A],
}

/// The frontends of one service port in one family, each with the backends it balances over
/// (internal and external traffic policies, topology), and the backends of all its endpoints.
/// `kind_of` may add flags to an external frontend's kind (source ranges). The local ready
/// endpoint addresses are added to `local_ready` (health check).
fn port_frontends<A: Copy + Ord>(
    spec: &SvcSpec,
    p: u8,
    serve: &Serve<'_, A>,
    eps: &[Endpoint<A>],
    node: &NodeInfo,
    local_ready: &mut BTreeSet<A>,
    mut kind_of: impl FnMut(u16) -> u16,
) -> (FrontendMap<A>, BTreeSet<Backend<A>>) {
    let externally_accessible =
        serve.node_port.is_some() || !serve.lb_ips.is_empty() || !serve.external_ips.is_empty();
    let policy = Policy {
        internal_local: spec.policy_internal_local,
        external_local: spec.policy_external_local && externally_accessible,
        externally_accessible,
    };
    let cat = categorize(eps, policy, &node.name, node.zone.as_deref());
    local_ready.extend(eps.iter().filter(|e| e.local && e.ready).map(|e| e.addr));
    let to_backends = |set: &[Endpoint<A>]| -> Vec<Backend<A>> {
        let mut v: Vec<Backend<A>> = set.iter().map(|e| backend_of(e, p)).collect();
        v.sort();
        v
    };
    let cluster = to_backends(&cat.cluster);
    let local = to_backends(&cat.local);
    let entry = |flags: u16, backends: &Vec<Backend<A>>, local_policy: bool| {
        let drop = backends.is_empty() && cat.has_any;
        FrontendEntry {
            flags: entry_flags(flags, spec.affinity_timeout, local_policy, drop),
            affinity_timeout: spec.affinity_timeout,
            backends: backends.clone(),
        }
    };
    let fe = |addr: A, port: u16, scope: u8| Frontend { addr, port, proto: p, scope };
    let mut frontends = BTreeMap::new();
    // ClusterIP: internal scope only, internalTrafficPolicy.
    let (set, local_policy) =
        if policy.internal_local { (&local, true) } else { (&cluster, false) };
    frontends.insert(
        fe(serve.cluster_ip, serve.svc_port, scope::INTERNAL),
        entry(svc_flags::CLUSTER_IP, set, local_policy),
    );
    let mut externals: Vec<(A, u16, u16)> = Vec::new();
    if let Some(np) = serve.node_port {
        externals.extend(serve.node_addrs.iter().map(|a| (*a, np, svc_flags::NODE_PORT)));
    }
    let svc_port = serve.svc_port;
    externals.extend(serve.lb_ips.iter().map(|a| (*a, svc_port, svc_flags::LOAD_BALANCER)));
    externals.extend(serve.external_ips.iter().map(|a| (*a, svc_port, svc_flags::EXTERNAL_IP)));
    // External addresses: externalTrafficPolicy from outside, every endpoint from inside.
    for (addr, port, kind) in externals {
        let (set, local_policy) =
            if policy.external_local { (&local, true) } else { (&cluster, false) };
        let kind = kind_of(kind);
        frontends.insert(fe(addr, port, scope::EXTERNAL), entry(kind, set, local_policy));
        frontends.insert(fe(addr, port, scope::INTERNAL), entry(kind, &cluster, false));
    }
    (frontends, eps.iter().map(|e| backend_of(e, p)).collect())
}

fn backend_of<A: Copy>(e: &Endpoint<A>, p: u8) -> Backend<A> {
    let mut flags = 0;
    if e.local {
        flags |= backend_flags::LOCAL;
    }
    if e.terminating {
        flags |= backend_flags::TERMINATING;
    }
    Backend { addr: e.addr, port: e.port, proto: p, flags }
}

/// The IPv4 address of an endpoint of an `addressType: IPv4` slice.
fn endpoint_addr4(s: &SliceObj, ep: &objects::EndpointObj) -> Option<Ipv4Addr> {
    match ep.addr() {
        Some(EndpointAddr::V4(a)) if s.address_type == "IPv4" => Some(a),
        _ => None,
    }
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

/// Leaves out the externalIPs and load-balancer IPs that `policy` does not allow, with an error
/// naming each.
/// The index of `svc`'s LoadBalancer ingress entry holding `addr` (0 when none does).
fn ingress_index(svc: &ServiceObj, addr: IpAddr) -> usize {
    svc.ingress()
        .iter()
        .position(|g| g.ip.as_deref().and_then(|t| t.parse::<IpAddr>().ok()) == Some(addr))
        .unwrap_or(0)
}

fn refuse_addresses(
    site: &ErrorSite,
    svc: &ServiceObj,
    spec: &mut SvcSpec,
    policy: &AddressPolicy,
    errors: &mut Vec<ModelError>,
) {
    let flag_text = |list: &Option<Vec<ipnet::IpNet>>| {
        let nets: Vec<String> = list.iter().flatten().map(|n| n.to_string()).collect();
        if nets.is_empty() { "none".to_string() } else { nets.join(",") }
    };
    let mut refuse = |field: String, addr: IpAddr, flag: &str, list: &Option<Vec<ipnet::IpNet>>| {
        let mut e = site.invalid(
            field,
            &addr.to_string(),
            format!("outside {flag} ({})", flag_text(list)),
            outcome::ADDRESS_REFUSED,
        );
        e.class = ErrorClass::AddressNotAllowed;
        errors.push(e);
    };
    spec.external_ips.retain(|a| {
        let ok = AddressPolicy::allows(&policy.external_ips, *a);
        if !ok {
            let i = svc.external_ips().iter().position(|t| t.trim().parse() == Ok(*a)).unwrap_or(0);
            refuse(
                format!("spec.externalIPs[{i}]"),
                IpAddr::V4(*a),
                "--external-ip-cidrs",
                &policy.external_ips,
            );
        }
        ok
    });
    spec.lb_ips.retain(|a| {
        let ok = AddressPolicy::allows(&policy.load_balancer_ips, *a);
        if !ok {
            let i = ingress_index(svc, IpAddr::V4(*a));
            refuse(
                format!("status.loadBalancer.ingress[{i}].ip"),
                IpAddr::V4(*a),
                "--load-balancer-ip-cidrs",
                &policy.load_balancer_ips,
            );
        }
        ok
    });
    spec.v6.external_ips.retain(|a| {
        let ok = AddressPolicy::allows(&policy.external_ips, *a);
        if !ok {
            let i = svc.external_ips().iter().position(|t| t.trim().parse() == Ok(*a)).unwrap_or(0);
            let field = format!("spec.externalIPs[{i}]");
            refuse(field, IpAddr::V6(*a), "--external-ip-cidrs", &policy.external_ips);
        }
        ok
    });
    spec.v6.lb_ips.retain(|a| {
        let ok = AddressPolicy::allows(&policy.load_balancer_ips, *a);
        if !ok {
            let i = ingress_index(svc, IpAddr::V6(*a));
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            refuse(field, IpAddr::V6(*a), "--load-balancer-ip-cidrs", &policy.load_balancer_ips);
        }
        ok
    });
}

/// `spec.loadBalancerSourceRanges` as IPv4 networks, read as kube-proxy reads them: whitespace
/// trimmed, host bits cleared, IPv6 ranges left to the IPv6 rules, an invalid value left out with
/// an error naming it (the valid ones apply; with none left the service is open, as with
/// kube-proxy). When a range holds a node address, the load-balancer IPs themselves are allowed
/// too: a node reaching a VIP it holds locally shows the VIP as the source (kube-proxy's
/// `allowFromNode`).
fn source_ranges(
    site: &ErrorSite,
    svc: &ServiceObj,
    node_addrs: &[Ipv4Addr],
    lb_ips: &[Ipv4Addr],
    errors: &mut Vec<ModelError>,
) -> BTreeSet<(Ipv4Addr, u8)> {
    let mut out = BTreeSet::new();
    for (i, text) in svc.source_ranges().iter().enumerate() {
        let t = text.trim();
        if t.is_empty() {
            continue;
        }
        match t.parse::<ipnet::IpNet>() {
            Ok(ipnet::IpNet::V4(n)) => {
                out.insert((n.network(), n.prefix_len()));
            }
            Ok(ipnet::IpNet::V6(_)) => {}
            Err(_) => errors.push(site.invalid(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                text,
                "not a CIDR (address/prefix length)",
                outcome::RANGE_IGNORED,
            )),
        }
    }
    allow_from_node(&mut out, node_addrs, lb_ips);
    out
}

/// A frontend's flags under `loadBalancerSourceRanges` (`has_ranges`): LoadBalancer IPs are
/// restricted, NodePorts when `node_port_ranges` asks for it, the others are not.
pub(super) fn range_flags(kind: u16, has_ranges: bool, node_port_ranges: bool) -> u16 {
    if has_ranges
        && (kind == svc_flags::LOAD_BALANCER || (kind == svc_flags::NODE_PORT && node_port_ranges))
    {
        kind | svc_flags::SOURCE_RANGES
    } else {
        kind
    }
}

/// kube-proxy's `allowFromNode`: when one of `ranges` holds a node address, each of `lb_ips`
/// joins them as a host entry.
pub(super) fn allow_from_node<A: Copy + Ord + Into<IpAddr>>(
    ranges: &mut BTreeSet<(A, u8)>,
    node_addrs: &[A],
    lb_ips: &[A],
) {
    let holds_node = ranges.iter().any(|(a, l)| {
        let net = ipnet::IpNet::new((*a).into(), *l).expect("prefix length from a parsed network");
        node_addrs.iter().any(|n| net.contains(&(*n).into()))
    });
    if holds_node {
        for ip in lb_ips {
            let host = if (*ip).into().is_ipv4() { 32 } else { 128 };
            ranges.insert((*ip, host));
        }
    }
}

/// Checks a Service and extracts what the frontends need; `None` when it is skipped.
fn service_spec(svc: &ServiceObj, out: &mut ServiceResult) -> Option<SvcSpec> {
    let name = &svc.name;
    let site = ErrorSite::service(svc);
    let err = |field: &str, value: &str, reason: &str| {
        site.invalid(field, value, reason, outcome::SERVICE_SKIPPED)
    };
    if let Some(label) = svc.skip_label {
        out.skipped.push(format!("{name}: has label {label}"));
        return None;
    }
    if !svc.has_spec {
        out.errors.push(err("spec", "", "missing"));
        return None;
    }
    match svc.type_.as_deref() {
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
    // The ClusterIP of each family: clusterIPs (dual stack) or clusterIP.
    if svc.cluster_ips.iter().any(|c| c.is("None")) {
        out.skipped.push(format!("{name}: headless (clusterIP None)"));
        return None;
    }
    let mut cluster_ip = None;
    let mut v6 = v6::Addrs6::default();
    for (i, c) in svc.cluster_ips.iter().enumerate() {
        match c.addr() {
            Some(IpAddr::V4(a)) => {
                cluster_ip.get_or_insert(a);
            }
            Some(IpAddr::V6(a)) if v6.cluster_ip.is_none() => {
                let field = format!("spec.clusterIPs[{i}]");
                let text = c.to_string();
                v6.cluster_ip = v6::service_addr6(&site, field, &text, a, &mut v6.warnings);
            }
            Some(IpAddr::V6(_)) => {}
            None => {
                out.errors.push(err("spec.clusterIP", &c.to_string(), "not an IP address"));
                return None;
            }
        }
    }
    if cluster_ip.is_none() && v6.cluster_ip.is_none() {
        out.skipped.push(format!("{name}: no usable clusterIP"));
        return None;
    }
    let mut external_ips = Vec::new();
    for (i, ip) in svc.external_ips().iter().enumerate() {
        match ip.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => external_ips.push(a),
            Ok(IpAddr::V6(a)) => {
                let field = format!("spec.externalIPs[{i}]");
                v6.external_ips.extend(v6::service_addr6(&site, field, ip, a, &mut v6.warnings));
            }
            Err(_) => {
                out.errors.push(err(&format!("spec.externalIPs[{i}]"), ip, "not an IP address"));
                return None;
            }
        }
    }
    let mut lb_ips = Vec::new();
    for (i, ing) in svc.ingress().iter().enumerate() {
        let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else { continue };
        if ing.ip_mode.as_deref() == Some("Proxy") {
            out.skipped
                .push(format!("{name}: load-balancer ingress {} has ipMode Proxy", excerpt(ip)));
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => lb_ips.push(a),
            Ok(IpAddr::V6(a)) => {
                let field = format!("status.loadBalancer.ingress[{i}].ip");
                v6.lb_ips.extend(v6::service_addr6(&site, field, ip, a, &mut v6.warnings));
            }
            Err(_) => {
                let field = format!("status.loadBalancer.ingress[{i}].ip");
                out.errors.push(err(&field, ip, "not an IP address"));
                return None;
            }
        }
    }
    let node_ports = matches!(svc.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let externally_accessible = node_ports || !svc.external_ips().is_empty();
    let policy_external_local = match svc.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => externally_accessible,
        Some(other) => {
            out.errors.push(err("spec.externalTrafficPolicy", other, "not Cluster or Local"));
            return None;
        }
    };
    let policy_internal_local = match svc.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            out.errors.push(err("spec.internalTrafficPolicy", other, "not Cluster or Local"));
            return None;
        }
    };
    let affinity_timeout = match svc.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => match svc.affinity_timeout() {
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
        },
        Some(other) => {
            out.errors.push(err("spec.sessionAffinity", other, "not None or ClientIP"));
            return None;
        }
    };
    let health_check_node_port = match svc.health_check_node_port() {
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
        cluster_ip,
        node_ports,
        external_ips,
        lb_ips,
        policy_internal_local,
        policy_external_local,
        affinity_timeout,
        health_check_node_port,
        v6,
    })
}

/// The endpoints of one service port over all its slices: slice ports matched by name and
/// protocol, the first address of each endpoint as `addr_of` reads it for one family (`None`:
/// another family, or not an address), duplicates (same address and port) counted once
/// (a local copy wins, as in kube-proxy). Invalid ports and addresses are left out (their errors
/// belong to the slice: [`check_slice`]).
///
/// The conditions are the endpoint's own, as kube-proxy reads them: `publishNotReadyAddresses`
/// is the EndpointSlice controller's business (it publishes every address of such a service as
/// ready, except pods that have terminated, which it leaves out); an endpoint a slice marks not
/// ready is not ready here either, whatever the service says.
fn collect_endpoints<A: Ord + Copy>(
    spn: &ServicePortName,
    slices: &[&SliceObj],
    node: &NodeInfo,
    addr_of: impl Fn(&SliceObj, &objects::EndpointObj) -> Option<A>,
) -> Vec<Endpoint<A>> {
    let mut by_key: BTreeMap<(A, u16), Endpoint<A>> = BTreeMap::new();
    for s in slices {
        for port in &s.ports {
            // Absent name and protocol take the API defaults ("" and TCP).
            if port.name.as_deref().unwrap_or("") != &*spn.port
                || parse_protocol(port.protocol.as_deref()) != Ok(spn.proto)
            {
                continue;
            }
            let Some(target) = port.port.and_then(valid_port) else { continue };
            for ep in &s.endpoints {
                let Some(addr) = addr_of(s, ep) else { continue };
                let local = !node.name.is_empty()
                    && ep.node_name().map(SharedStr::as_str) == Some(&node.name);
                let hints = ep.hints();
                let endpoint = Endpoint {
                    addr,
                    port: target,
                    local,
                    ready: ep.ready().unwrap_or(true),
                    serving: ep.serving().unwrap_or(true),
                    terminating: ep.terminating().unwrap_or(false),
                    zone_hints: hints
                        .map(|h| h.zones.iter().cloned().collect())
                        .unwrap_or_default(),
                    node_hints: hints
                        .map(|h| h.nodes.iter().cloned().collect())
                        .unwrap_or_default(),
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
