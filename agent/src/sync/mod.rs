//! Applies the desired state to a [`Dataplane`], writing only differences.
//!
//! The syncer keeps a shadow copy of exactly what is programmed (Katran's shadow state). For each
//! service port whose rendering differs from the shadow it runs one transaction, in the order that
//! never shows the datapath a half-written service:
//!
//! 1. backends it needs that are missing or changed,
//! 2. backend slots at new keys (invisible: above the programmed count),
//! 3. changed slots at existing keys (each still names a live backend),
//! 4. the service entry (slot 0) with the new count and flags,
//! 5. slots above the new count.
//!
//! If a write fails (map full), the writes of that transaction are undone in reverse order, the
//! service port keeps its previous state (or stays absent), the error names it and the sync goes
//! on. Then frontends that are no longer wanted are removed (slot 0 first, then its slots), and
//! last backends that nothing references any more.
//!
//! Ids: service ids are per service port and stable while it exists; backend ids are per backend
//! (address, port, protocol) and come from a counter that only moves forward, so a freed id is
//! not handed out again until the counter wraps around `u32`: a tracked connection to a removed
//! backend sees it gone. Slot order is kept stable across syncs (a removed backend's slot is
//! refilled by a new one or by the last slot) so one changed endpoint costs a few writes.
//!
//! After a restart, [`Syncer::adopt`] loads the programmed maps as the shadow and the ids found
//! there are reused, so unchanged services see no writes.
//!
//! Two entry points: [`Syncer::sync`] / a full [`Changes`] take the whole desired state (anything
//! else programmed is removed: the full resync), [`Syncer::sync_changes`] with the tracker's
//! incremental [`Changes`] looks only at the services they name. The shadow keeps indexes (the
//! frontends of each service id, the slots naming each backend, the ports wanting each backend)
//! so that the incremental path finds stale frontends and unused backends without a scan. What is
//! remembered per service port is a hash of its last desired state, its backends and frontends,
//! not a copy of the state.
//!
//! UDP flows: a backend that stops serving stays in the maps while its endpoint exists (tracked
//! TCP connections keep working), so a UDP flow tracked to it would stay there. The report lists
//! the UDP service ports whose serving set lost a member (every UDP port on the first sync, which
//! may follow a restart) with the set, for the conntrack reconciler
//! ([`crate::dataplane::conntrack`]) to delete the flows to other backends, as kube-proxy's
//! does. A port without serving endpoints is left alone (kube-proxy's rule too).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use kproxy_common::{Backend4, Service4Key, Service4Value, backend_flags};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    model::{
        Backend, Changes, DesiredState, Frontend, ServiceName, ServicePortName, ServicePortState,
    },
};

/// A failed part of a sync; the rest of the sync went on.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A service port could not be written; it keeps its previous programmed state.
    #[error("service {service}: {source}; kept its previous state")]
    Service {
        /// `namespace/name:port/PROTO`.
        service: String,
        /// The failed write.
        #[source]
        source: DataplaneError,
    },
    /// A service port has more backends than a service entry can count.
    #[error(
        "service {service}: {count} backends exceed the limit of {max}; kept its previous state"
    )]
    TooManyBackends {
        /// `namespace/name:port/PROTO`.
        service: String,
        /// Number of backends wanted.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Removing a stale frontend or backend failed (retried on the next sync).
    #[error("removing {what}: {source}")]
    Remove {
        /// What was being removed.
        what: String,
        /// The failed write.
        #[source]
        source: DataplaneError,
    },
    /// Reading the programmed state failed.
    #[error("reading the programmed state: {0}")]
    Read(#[source] DataplaneError),
}

impl SyncError {
    /// Short label for metrics (`kproxy_sync_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            SyncError::Service { source: DataplaneError::Full { .. }, .. } => "map_full",
            SyncError::Service { .. } => "write",
            SyncError::TooManyBackends { .. } => "too_many_backends",
            SyncError::Remove { .. } => "remove",
            SyncError::Read(_) => "read",
        }
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map writes (puts and deletes), including undone ones.
    pub writes: usize,
    /// Service ports whose entries were (re)written.
    pub services_changed: usize,
    /// Frontends removed.
    pub frontends_removed: usize,
    /// Backends removed.
    pub backends_removed: usize,
    /// Failures; each left the affected service as it was.
    pub errors: Vec<SyncError>,
    /// UDP service ports whose tracked flows must be checked against their serving backends
    /// (written before this report is returned).
    pub udp_reconcile: Vec<UdpServing>,
}

/// The serving backends of one UDP service port: tracked UDP flows of this service id to any
/// other backend are to be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpServing {
    /// Service id (`Ct4Value::svc_id`).
    pub svc_id: u32,
    /// Serving backends: (address, port), both big-endian as in `Ct4Value`.
    pub serving: HashSet<(u32, u16)>,
}

/// Identity of a backend in the datapath: address (be), port (be), protocol.
type BackendKey = (u32, u16, u8);

fn backend_key(b: &Backend4) -> BackendKey {
    (b.addr, b.port, b.proto)
}

/// Frontend part of a key (slot cleared).
fn frontend_of(k: &Service4Key) -> Service4Key {
    Service4Key { slot: 0, ..*k }
}

fn key_of(f: &Frontend, slot: u16) -> Service4Key {
    Service4Key {
        addr: u32::from(f.addr).to_be(),
        port: f.port.to_be(),
        proto: f.proto,
        scope: f.scope,
        slot,
        _pad: 0,
    }
}

/// The shadow copy: exactly what the maps hold, as far as this process knows, with two indexes
/// kept up to date by every change: the frontends of each service id and, for each backend id,
/// how many slots name it.
#[derive(Debug, Default, Clone)]
struct Shadow {
    services: BTreeMap<Service4Key, Service4Value>,
    backends: BTreeMap<u32, Backend4>,
    /// Service id → its programmed frontends (slot-0 keys).
    frontends_of: HashMap<u32, Vec<Service4Key>>,
    /// Backend id → number of slots naming it.
    slot_refs: HashMap<u32, u32>,
    /// Backend ids whose last slot went away since the last [`Shadow::take_unreferenced`].
    unreferenced: Vec<u32>,
    /// Number of slot-0 entries.
    frontends: usize,
}

impl Shadow {
    fn insert_service(&mut self, k: Service4Key, v: Service4Value) {
        let old = self.services.insert(k, v);
        if let Some(old) = old {
            self.unindex(&k, &old);
        }
        if k.slot == 0 {
            self.frontends += 1;
            self.frontends_of.entry(v.svc_id).or_default().push(k);
        } else {
            *self.slot_refs.entry(v.backend_id).or_default() += 1;
        }
    }

    fn remove_service(&mut self, k: &Service4Key) -> Option<Service4Value> {
        let old = self.services.remove(k)?;
        self.unindex(k, &old);
        Some(old)
    }

    fn unindex(&mut self, k: &Service4Key, v: &Service4Value) {
        if k.slot == 0 {
            self.frontends -= 1;
            if let Some(list) = self.frontends_of.get_mut(&v.svc_id) {
                list.retain(|f| f != k);
                if list.is_empty() {
                    self.frontends_of.remove(&v.svc_id);
                }
            }
        } else if let Some(n) = self.slot_refs.get_mut(&v.backend_id) {
            *n -= 1;
            if *n == 0 {
                self.slot_refs.remove(&v.backend_id);
                self.unreferenced.push(v.backend_id);
            }
        }
    }

    fn referenced(&self, id: u32) -> bool {
        self.slot_refs.contains_key(&id)
    }
}

/// How many desired service ports want a backend, and with which flags.
#[derive(Debug, Default, Clone, Copy)]
struct Want {
    ports: u32,
    local: u32,
    terminating: u32,
}

impl Want {
    /// The flags programmed for the backend: LOCAL if any port says so, TERMINATING only if all
    /// do.
    fn flags(&self) -> u8 {
        let mut f = 0;
        if self.local > 0 {
            f |= backend_flags::LOCAL;
        }
        if self.ports > 0 && self.terminating == self.ports {
            f |= backend_flags::TERMINATING;
        }
        f
    }
}

/// What the syncer remembers of the desired state of one service port as last given (not the
/// state itself: a fingerprint and what removal and the backend counts need).
#[derive(Debug)]
struct Record {
    /// Hash of the state (an equal state is not looked at again once applied).
    hash: u64,
    /// Its backends, each once, with the flags it gives them.
    backends: Box<[(BackendKey, u8)]>,
    /// Its frontends (slot-0 keys).
    frontends: Box<[Service4Key]>,
    /// Whether it is programmed.
    applied: bool,
}

impl Record {
    fn of(s: &ServicePortState) -> Self {
        Self {
            hash: state_hash(s),
            backends: port_backends(s).into_iter().collect(),
            frontends: s.frontends.keys().map(|f| key_of(f, 0)).collect(),
            applied: false,
        }
    }
}

fn state_hash(s: &ServicePortState) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Keeps the datapath equal to the desired state. See the module documentation.
#[derive(Debug, Default)]
pub struct Syncer {
    shadow: Shadow,
    /// Backend key → the id programmed for it.
    backend_ids: HashMap<BackendKey, u32>,
    /// Service port → service id.
    svc_ids: BTreeMap<ServicePortName, u32>,
    /// The values of `svc_ids`.
    svc_ids_used: HashSet<u32>,
    /// The desired state last given per service port: an applied one equal to the next needs no
    /// look at the maps at all (its backends are wanted, so nothing else removed them).
    desired: BTreeMap<ServicePortName, Record>,
    /// Backend key → the ports that want it (over `desired`).
    wants: HashMap<BackendKey, Want>,
    next_backend_id: u32,
    next_svc_id: u32,
    /// UDP service port → its serving endpoints as last programmed.
    udp_serving: HashMap<ServicePortName, BTreeSet<(std::net::Ipv4Addr, u16)>>,
    /// Whether a sync ran: the first one reconciles every UDP port's flows.
    synced: bool,
}

/// The backends one service port wants, each once (LOCAL if any copy says so, TERMINATING if
/// all do).
fn port_backends(s: &ServicePortState) -> HashMap<BackendKey, u8> {
    let mut out: HashMap<BackendKey, u8> = HashMap::new();
    for b in s.endpoints.iter().chain(s.frontends.values().flat_map(|e| e.backends.iter())) {
        let v = b.to_map();
        out.entry(backend_key(&v))
            .and_modify(|f| {
                let local = (*f | v.flags) & backend_flags::LOCAL;
                let term = *f & v.flags & backend_flags::TERMINATING;
                *f = local | term;
            })
            .or_insert(v.flags);
    }
    out
}

impl Syncer {
    /// A syncer for empty maps.
    pub fn new() -> Self {
        Self { next_backend_id: 1, next_svc_id: 1, ..Default::default() }
    }

    /// A syncer that adopts what `dp` already holds (after a restart): the maps become the shadow
    /// and their ids are reused.
    pub fn adopt(dp: &dyn Dataplane) -> Result<Self, SyncError> {
        let mut s = Self::new();
        for (k, v) in dp.services().map_err(SyncError::Read)? {
            s.shadow.insert_service(k, v);
        }
        s.shadow.backends = dp.backends().map_err(SyncError::Read)?.into_iter().collect();
        s.shadow.unreferenced.clear();
        for (id, b) in &s.shadow.backends {
            s.backend_ids.entry(backend_key(b)).or_insert(*id);
        }
        s.next_backend_id = s.shadow.backends.keys().max().map_or(1, |m| m.wrapping_add(1).max(1));
        s.next_svc_id = s.shadow.services.values().map(|v| v.svc_id).max().map_or(1, |m| m + 1);
        Ok(s)
    }

    /// Makes sure no id in `ids` is handed out soon: after a restart the agent passes the backend
    /// ids that tracked connections still name, so that a backend freed just before the restart
    /// (and so absent from the backends map) is not reborn under the same id.
    pub fn avoid_backend_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        if let Some(max) = ids.into_iter().max()
            && max >= self.next_backend_id
        {
            self.next_backend_id = max.wrapping_add(1).max(1);
        }
    }

    /// Number of programmed frontends (service entries).
    pub fn programmed_frontends(&self) -> usize {
        self.shadow.frontends
    }

    /// Number of programmed backends.
    pub fn programmed_backends(&self) -> usize {
        self.shadow.backends.len()
    }

    /// The service id of a service port, if it has one.
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.svc_ids.get(name).copied()
    }

    /// Brings `dp` to `desired` (every service), writing only differences: anything programmed
    /// that `desired` does not hold is removed. Never fails as a whole: failures are in the
    /// report, and the affected services keep their previous state.
    pub fn sync(&mut self, desired: &DesiredState, dp: &mut dyn Dataplane) -> SyncReport {
        self.apply(desired.services.clone(), None, dp)
    }

    /// Applies the model's [`Changes`]: a full sync when they are full, else only the services
    /// they name (their ports replace the ones they had); nothing else is looked at. The port
    /// states are moved out of `changes` (kept as the record of what is programmed).
    pub fn sync_changes(&mut self, changes: &mut Changes, dp: &mut dyn Dataplane) -> SyncReport {
        let ports = std::mem::take(&mut changes.state.services);
        if changes.full {
            self.apply(ports, None, dp)
        } else {
            self.apply(ports, Some(&changes.services), dp)
        }
    }

    fn want_add(&mut self, backends: &[(BackendKey, u8)], touched: &mut HashSet<BackendKey>) {
        for &(k, flags) in backends {
            let w = self.wants.entry(k).or_default();
            w.ports += 1;
            w.local += u32::from(flags & backend_flags::LOCAL != 0);
            w.terminating += u32::from(flags & backend_flags::TERMINATING != 0);
            touched.insert(k);
        }
    }

    fn want_sub(&mut self, backends: &[(BackendKey, u8)], touched: &mut HashSet<BackendKey>) {
        for &(k, flags) in backends {
            if let Some(w) = self.wants.get_mut(&k) {
                w.ports -= 1;
                w.local -= u32::from(flags & backend_flags::LOCAL != 0);
                w.terminating -= u32::from(flags & backend_flags::TERMINATING != 0);
                if w.ports == 0 {
                    self.wants.remove(&k);
                }
            }
            touched.insert(k);
        }
    }

    /// The sync: `scope` `None` means `desired` is everything, else it holds the new ports of
    /// the services in `scope`.
    fn apply(
        &mut self,
        desired: BTreeMap<ServicePortName, ServicePortState>,
        scope: Option<&BTreeSet<ServiceName>>,
        dp: &mut dyn Dataplane,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut touched: HashSet<BackendKey> = HashSet::new();
        self.shadow.unreferenced.clear();

        // Service ports that go away.
        let removed: Vec<ServicePortName> = match scope {
            None => self.desired.keys().filter(|n| !desired.contains_key(n)).cloned().collect(),
            Some(services) => services
                .iter()
                .flat_map(|s| {
                    self.desired
                        .range(ServicePortName::first_of(s)..)
                        .take_while(move |(k, _)| k.service == *s)
                        .map(|(k, _)| k)
                })
                .filter(|n| !desired.contains_key(n))
                .cloned()
                .collect(),
        };
        for name in &removed {
            if let Some(r) = self.desired.remove(name) {
                self.want_sub(&r.backends, &mut touched);
            }
            self.udp_serving.remove(name);
        }
        // Service ports to write: new, changed, or not programmed last time.
        let mut pending: Vec<(ServicePortName, ServicePortState)> = Vec::new();
        let mut given: Vec<ServicePortName> = Vec::new();
        for (name, state) in desired {
            if scope.is_some() {
                given.push(name.clone());
            }
            let hash = state_hash(&state);
            match self.desired.get(&name) {
                Some(r) if r.hash == hash => {
                    if !r.applied {
                        pending.push((name, state));
                    }
                    continue;
                }
                Some(_) => {
                    let r = self.desired.remove(&name).expect("present");
                    self.want_sub(&r.backends, &mut touched);
                }
                None => {}
            }
            let r = Record::of(&state);
            self.want_add(&r.backends, &mut touched);
            self.desired.insert(name.clone(), r);
            pending.push((name, state));
        }
        for (name, state) in pending {
            let ok = self.apply_port(&name, &state, dp, &mut report);
            if let Some(r) = self.desired.get_mut(&name) {
                r.applied = ok;
            }
            if ok {
                self.note_udp_serving(&name, state.udp_serving, &mut report);
            }
        }
        self.synced = true;

        // Frontends nobody wants any more: slot 0 first, then the slots.
        let stale: BTreeSet<Service4Key> = match scope {
            None => {
                let wanted: HashSet<Service4Key> =
                    self.desired.values().flat_map(|r| r.frontends.iter().copied()).collect();
                self.shadow
                    .services
                    .keys()
                    .map(frontend_of)
                    .filter(|f| !wanted.contains(f))
                    .collect()
            }
            Some(_) => {
                // The frontends still programmed under the ids of the ports just written or
                // removed, that those ports no longer want.
                let mut stale = BTreeSet::new();
                let names = removed
                    .iter()
                    .map(|n| (n, None))
                    .chain(given.iter().map(|n| (n, self.desired.get(n).map(|r| &r.frontends))));
                for (name, state) in names {
                    let Some(id) = self.svc_ids.get(name) else { continue };
                    for k in self.shadow.frontends_of.get(id).into_iter().flatten() {
                        let wanted = state.is_some_and(|fs| fs.contains(k));
                        if !wanted {
                            stale.insert(*k);
                        }
                    }
                }
                stale
            }
        };
        for f in stale {
            let mut keys: Vec<Service4Key> =
                self.shadow_range(&f).into_iter().map(|(k, _)| k).collect();
            // Slot 0 first, then the others from the highest down.
            keys.sort_by_key(|k| if k.slot == 0 { 0 } else { u32::MAX - k.slot as u32 });
            for k in keys {
                report.writes += 1;
                match dp.delete_service(&k) {
                    Ok(()) => {
                        self.shadow.remove_service(&k);
                    }
                    Err(source) => {
                        report.errors.push(SyncError::Remove { what: describe_key(&k), source });
                        break;
                    }
                }
            }
            report.frontends_removed += 1;
        }

        // Backends that no slot names and no port wants (or that are not the id of their key).
        let candidates: BTreeSet<u32> = match scope {
            None => self.shadow.backends.keys().copied().collect(),
            Some(_) => {
                let mut c: BTreeSet<u32> = self.shadow.unreferenced.drain(..).collect();
                c.extend(touched.iter().filter_map(|k| self.backend_ids.get(k)));
                c
            }
        };
        let gc: Vec<u32> = candidates
            .into_iter()
            .filter(|id| {
                let Some(b) = self.shadow.backends.get(id) else { return false };
                !self.shadow.referenced(*id)
                    && (!self.wants.contains_key(&backend_key(b))
                        || self.backend_ids.get(&backend_key(b)) != Some(id))
            })
            .collect();
        for id in gc {
            report.writes += 1;
            match dp.delete_backend(id) {
                Ok(()) => {
                    if let Some(b) = self.shadow.backends.remove(&id)
                        && self.backend_ids.get(&backend_key(&b)) == Some(&id)
                    {
                        self.backend_ids.remove(&backend_key(&b));
                    }
                    report.backends_removed += 1;
                }
                Err(source) => {
                    report.errors.push(SyncError::Remove { what: format!("backend {id}"), source })
                }
            }
        }
        // Shared backends whose flags changed through other ports.
        for k in &touched {
            let (Some(w), Some(id)) = (self.wants.get(k), self.backend_ids.get(k)) else {
                continue;
            };
            let Some(b) = self.shadow.backends.get(id) else { continue };
            if b.flags != w.flags() {
                let v = Backend4 { flags: w.flags(), ..*b };
                report.writes += 1;
                match dp.put_backend(*id, &v) {
                    Ok(()) => {
                        self.shadow.backends.insert(*id, v);
                    }
                    Err(source) => report
                        .errors
                        .push(SyncError::Remove { what: format!("backend {id} flags"), source }),
                }
            }
        }
        // Ids of the ports that went away.
        let gone: Vec<ServicePortName> = match scope {
            None => {
                self.svc_ids.keys().filter(|n| !self.desired.contains_key(*n)).cloned().collect()
            }
            Some(_) => removed,
        };
        for name in gone {
            if let Some(id) = self.svc_ids.remove(&name) {
                self.svc_ids_used.remove(&id);
            }
        }
        report
    }

    /// Remembers the serving set of a programmed UDP port and asks for a reconciliation of its
    /// flows when the set lost a member (or on the first sync).
    fn note_udp_serving(
        &mut self,
        name: &ServicePortName,
        serving: BTreeSet<(std::net::Ipv4Addr, u16)>,
        report: &mut SyncReport,
    ) {
        if name.proto != kproxy_common::proto::UDP {
            return;
        }
        let lost = match self.udp_serving.get(name) {
            Some(old) => old.iter().any(|b| !serving.contains(b)),
            None => !self.synced,
        };
        if lost
            && !serving.is_empty()
            && let Some(svc_id) = self.svc_ids.get(name)
        {
            report.udp_reconcile.push(UdpServing {
                svc_id: *svc_id,
                serving: serving.iter().map(|(a, p)| (u32::from(*a).to_be(), p.to_be())).collect(),
            });
        }
        self.udp_serving.insert(name.clone(), serving);
    }

    /// Writes one service port as one transaction; true when it is programmed as wanted.
    fn apply_port(
        &mut self,
        name: &ServicePortName,
        port_state: &ServicePortState,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) -> bool {
        let svc_id = self.svc_id_for(name, port_state.frontends.keys());
        // Resolve backend ids (fresh ones are only kept if the transaction succeeds).
        let mut fresh: Vec<(BackendKey, u32)> = Vec::new();
        let mut id_of = |b: &Backend, this: &mut Self| -> u32 {
            let k = backend_key(&b.to_map());
            if let Some(id) = this.backend_ids.get(&k) {
                return *id;
            }
            if let Some((_, id)) = fresh.iter().find(|(fk, _)| *fk == k) {
                return *id;
            }
            let id = this.alloc_backend_id();
            fresh.push((k, id));
            id
        };
        // The wanted entries of this service port.
        let mut want: BTreeMap<Service4Key, Service4Value> = BTreeMap::new();
        let mut needed_backends: BTreeMap<u32, Backend4> = BTreeMap::new();
        for (f, entry) in &port_state.frontends {
            let ids: Vec<u32> = entry.backends.iter().map(|b| id_of(b, self)).collect();
            let Ok(count) = u16::try_from(ids.len()) else {
                report.errors.push(SyncError::TooManyBackends {
                    service: name.to_string(),
                    count: ids.len(),
                    max: u16::MAX as usize,
                });
                return false;
            };
            let old = self.programmed_slots(&key_of(f, 0));
            let slots = stable_layout(&old, &ids);
            want.insert(
                key_of(f, 0),
                Service4Value {
                    backend_id: 0,
                    svc_id,
                    count,
                    flags: entry.flags,
                    affinity_timeout: entry.affinity_timeout,
                },
            );
            for (i, id) in slots.iter().enumerate() {
                want.insert(
                    key_of(f, i as u16 + 1),
                    Service4Value { backend_id: *id, svc_id, ..Default::default() },
                );
            }
        }
        for b in port_state
            .endpoints
            .iter()
            .chain(port_state.frontends.values().flat_map(|e| e.backends.iter()))
        {
            let id = id_of(b, self);
            let mut v = b.to_map();
            if let Some(w) = self.wants.get(&backend_key(&v)) {
                v.flags = w.flags();
            }
            needed_backends.insert(id, v);
        }
        // Programmed keys of these frontends (including slots beyond the wanted count).
        let have: Vec<(Service4Key, Service4Value)> =
            port_state.frontends.keys().flat_map(|f| self.shadow_range(&key_of(f, 0))).collect();
        let backends_ok =
            needed_backends.iter().all(|(id, v)| self.shadow.backends.get(id) == Some(v));
        let same = backends_ok
            && have.len() == want.len()
            && have.iter().all(|(k, v)| want.get(k) == Some(v));
        if same {
            return true;
        }
        let mut txn = Txn { dp, shadow: &mut self.shadow, undo: Vec::new(), writes: 0 };
        let result = txn.apply(&needed_backends, &want, &have);
        report.writes += txn.writes;
        match result {
            Ok(()) => {
                report.services_changed += 1;
                for (k, id) in fresh {
                    if txn.shadow.backends.contains_key(&id) {
                        self.backend_ids.insert(k, id);
                    }
                }
                true
            }
            Err(source) => {
                report.writes += txn.rollback();
                report.errors.push(SyncError::Service { service: name.to_string(), source });
                false
            }
        }
    }

    /// The service id of `name`: known, adopted from a programmed frontend, or new.
    fn svc_id_for<'a>(
        &mut self,
        name: &ServicePortName,
        frontends: impl Iterator<Item = &'a Frontend>,
    ) -> u32 {
        if let Some(id) = self.svc_ids.get(name) {
            return *id;
        }
        let taken = &self.svc_ids_used;
        let adopted = frontends
            .filter_map(|f| self.shadow.services.get(&key_of(f, 0)))
            .map(|v| v.svc_id)
            .find(|id| *id != 0 && !taken.contains(id));
        let id = adopted.unwrap_or_else(|| {
            let mut id = self.next_svc_id.max(1);
            while taken.contains(&id) || id == 0 {
                id = id.wrapping_add(1);
            }
            self.next_svc_id = id.wrapping_add(1);
            id
        });
        self.svc_ids.insert(name.clone(), id);
        self.svc_ids_used.insert(id);
        id
    }

    fn alloc_backend_id(&mut self) -> u32 {
        let mut id = self.next_backend_id;
        while id == 0 || self.shadow.backends.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_backend_id = id.wrapping_add(1);
        id
    }

    /// Backend ids in slots `1..=count` of a programmed frontend.
    fn programmed_slots(&self, entry: &Service4Key) -> Vec<u32> {
        let Some(v) = self.shadow.services.get(entry) else { return Vec::new() };
        (1..=v.count)
            .filter_map(|slot| {
                self.shadow.services.get(&Service4Key { slot, ..*entry }).map(|s| s.backend_id)
            })
            .collect()
    }

    /// Every programmed key of one frontend.
    fn shadow_range(&self, entry: &Service4Key) -> Vec<(Service4Key, Service4Value)> {
        let lo = Service4Key { slot: 0, ..*entry };
        let hi = Service4Key { slot: u16::MAX, _pad: u16::MAX, ..*entry };
        self.shadow.services.range(lo..=hi).map(|(k, v)| (*k, *v)).collect()
    }
}

/// New slot order: backends that stay keep their slot, holes are refilled with new backends, then
/// with the last slots; remaining new backends are appended. With nothing programmed it is the
/// wanted order.
fn stable_layout(old: &[u32], want: &[u32]) -> Vec<u32> {
    let want_set: HashSet<u32> = want.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut slots: Vec<Option<u32>> =
        old.iter().map(|id| (want_set.contains(id) && seen.insert(*id)).then_some(*id)).collect();
    let mut additions: VecDeque<u32> =
        want.iter().copied().filter(|id| !seen.contains(id)).collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match additions.pop_front() {
            Some(a) => *slot = Some(a),
            None => break,
        }
    }
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        let Some(hole) = slots.iter().position(Option::is_none) else { break };
        slots[hole] = slots.pop().flatten();
    }
    slots.into_iter().flatten().chain(additions).collect()
}

fn describe_key(k: &Service4Key) -> String {
    format!(
        "frontend {}:{}/{} scope {} slot {}",
        std::net::Ipv4Addr::from(u32::from_be(k.addr)),
        u16::from_be(k.port),
        crate::model::proto_name(k.proto),
        k.scope,
        k.slot
    )
}

enum Undo {
    Service(Service4Key, Option<Service4Value>),
    Backend(u32, Option<Backend4>),
}

/// The writes of one service port, with what is needed to undo them.
struct Txn<'a> {
    dp: &'a mut dyn Dataplane,
    shadow: &'a mut Shadow,
    undo: Vec<Undo>,
    writes: usize,
}

impl Txn<'_> {
    fn apply(
        &mut self,
        backends: &BTreeMap<u32, Backend4>,
        want: &BTreeMap<Service4Key, Service4Value>,
        have: &[(Service4Key, Service4Value)],
    ) -> Result<(), DataplaneError> {
        // 1. Backends: new ones, then changed ones.
        let (new_be, changed_be): (Vec<_>, Vec<_>) = backends
            .iter()
            .filter(|(id, v)| self.shadow.backends.get(id) != Some(v))
            .partition(|(id, _)| !self.shadow.backends.contains_key(id));
        for (id, v) in new_be.into_iter().chain(changed_be) {
            self.put_backend(*id, v)?;
        }
        // 2. Slots at new keys, 3. changed slots at existing keys.
        let slots = want.iter().filter(|(k, _)| k.slot != 0);
        let (new_slots, changed_slots): (Vec<_>, Vec<_>) = slots
            .filter(|(k, v)| self.shadow.services.get(k) != Some(v))
            .partition(|(k, _)| !self.shadow.services.contains_key(k));
        for (k, v) in new_slots.into_iter().chain(changed_slots) {
            self.put_service(k, v)?;
        }
        // 4. Service entries.
        for (k, v) in want.iter().filter(|(k, _)| k.slot == 0) {
            if self.shadow.services.get(k) != Some(v) {
                self.put_service(k, v)?;
            }
        }
        // 5. Slots above the new count, highest first.
        for (k, _) in have.iter().rev().filter(|(k, _)| !want.contains_key(k)) {
            self.delete_service(k)?;
        }
        Ok(())
    }

    fn put_backend(&mut self, id: u32, v: &Backend4) -> Result<(), DataplaneError> {
        self.writes += 1;
        self.dp.put_backend(id, v)?;
        let old = self.shadow.backends.insert(id, *v);
        self.undo.push(Undo::Backend(id, old));
        Ok(())
    }

    fn put_service(&mut self, k: &Service4Key, v: &Service4Value) -> Result<(), DataplaneError> {
        self.writes += 1;
        self.dp.put_service(k, v)?;
        let old = self.shadow.services.get(k).copied();
        self.shadow.insert_service(*k, *v);
        self.undo.push(Undo::Service(*k, old));
        Ok(())
    }

    fn delete_service(&mut self, k: &Service4Key) -> Result<(), DataplaneError> {
        self.writes += 1;
        self.dp.delete_service(k)?;
        if let Some(old) = self.shadow.remove_service(k) {
            self.undo.push(Undo::Service(*k, Some(old)));
        }
        Ok(())
    }

    /// Undoes every write in reverse order; returns the number of writes made. A failed undo is
    /// logged and leaves the shadow describing what the map really holds.
    fn rollback(&mut self) -> usize {
        let mut writes = 0;
        while let Some(u) = self.undo.pop() {
            writes += 1;
            let r = match &u {
                Undo::Service(k, None) => self.dp.delete_service(k).map(|()| {
                    self.shadow.remove_service(k);
                }),
                Undo::Service(k, Some(v)) => self.dp.put_service(k, v).map(|()| {
                    self.shadow.insert_service(*k, *v);
                }),
                Undo::Backend(id, None) => self.dp.delete_backend(*id).map(|()| {
                    self.shadow.backends.remove(id);
                }),
                Undo::Backend(id, Some(v)) => self.dp.put_backend(*id, v).map(|()| {
                    self.shadow.backends.insert(*id, *v);
                }),
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "undoing a failed service update");
            }
        }
        writes
    }
}

#[cfg(test)]
mod tests;
