//! Applies the IPv6 side of the desired state ([`crate::model::v6`]) to a [`Dataplane6`], as
//! the IPv4 syncer does for IPv4: only differences are written, in the order that never shows
//! the datapath a half-written service port:
//!
//! 1. backends the port needs that are missing or changed,
//! 2. its backend slots (new keys above the programmed count are invisible; changed ones still
//!    name a live backend),
//! 3. its service entries (slot 0) with the new count and flags,
//! 4. slots above the new counts, then its frontends that are no longer wanted (entry first),
//!
//! then, after every port, the frontends of ports that went away and last the backends nothing
//! references any more. A failed write stops that port (the error names it) and its service-map
//! writes so far are undone in reverse order, as IPv4's: the port keeps its previous state (or
//! stays absent) rather than a mix of old and new slots; what is programmed is remembered
//! exactly (the shadow of the IPv6 services map), so the next sync writes what is missing. One frontend has one owner: a port asking for a frontend another live port holds is
//! refused with an error naming both, once per state of the refused port (every sync tries
//! again, silently, until the owner lets the frontend go).
//!
//! Ids: a port keeps its service id while it exists. A new port takes the IPv4 id of the same
//! service port (so `kproxy service list` and conntrack show one id per service port whatever
//! the family), else the id found on its frontends after a restart, else a new one from
//! [`V6_ONLY_IDS`] up, where IPv4 ids never go; backend ids are the IPv6 backends map's own, from a counter that only
//! moves forward. The node configuration ([`NodeConfig6`]: the source NAT address of IPv6
//! NodePorts) is written when it changes.
//!
//! The IPv6 service guards, as the IPv4 syncer writes them: a port's source ranges are written
//! before its service entries (a restricted entry never shows without its ranges) and the ones
//! it no longer has removed after them; the closed service addresses follow the programmed
//! ClusterIP, LoadBalancer and external IP entries (never a node address) at the end of the
//! sync; the service CIDRs are written when they change.
use std::{
    collections::{BTreeMap, BTreeSet},
    hash::BuildHasher,
    net::Ipv6Addr,
};

use kproxy_common::{Addr6, NodeConfig6, Service6Key, Service6Value};

use super::{FastMap, FastSet, SyncError, SyncReport};
use crate::{
    dataplane::{BatchError, Dataplane6, DataplaneError, SourceRange6},
    model::{
        NameMap, ServiceName, ServicePortName,
        v6::{Backend6, Frontend6, PortState6, from_addr6, to_addr6},
    },
};

/// First service id of IPv6-only service ports (IPv4 ids count up from 1).
pub const V6_ONLY_IDS: u32 = 1 << 31;

/// Identity of an IPv6 backend: address, port, protocol.
type Key6 = (Ipv6Addr, u16, u8);

/// What the IPv6 services map holds for one frontend.
#[derive(Debug, Clone, Default)]
struct Front6 {
    /// Slot 0, when written.
    entry: Option<Service6Value>,
    /// Backend id of slot `i + 1` (0: absent).
    slots: Vec<u32>,
    /// The port that wrote it (`None`: adopted from a previous agent).
    owner: Option<ServicePortName>,
}

/// A programmed IPv6 backend.
#[derive(Debug, Clone, Copy)]
struct Be6 {
    id: u32,
    value: kproxy_common::Backend6,
}

/// What is remembered of a service port's last successful sync.
#[derive(Debug, Clone)]
struct Port6 {
    svc_id: u32,
    /// Hash of the port state it was last brought to (`None`: a write failed).
    hash: Option<u64>,
    /// Hash of the port state whose refused frontends were reported: the same state refused
    /// again at a later sync is not reported again.
    refused: Option<u64>,
    frontends: Vec<Frontend6>,
    endpoints: Vec<Key6>,
}

/// Keeps the IPv6 maps equal to the IPv6 desired state. See the module documentation.
#[derive(Debug, Default)]
pub struct Syncer6 {
    fronts: FastMap<Frontend6, Front6>,
    /// Number of service entries (slot 0) `fronts` holds.
    frontends: usize,
    /// Number of backend slots (non-zero, above slot 0) `fronts` holds.
    slots: usize,
    backends: FastMap<Key6, Be6>,
    /// Backend ids programmed or handed out.
    ids: FastSet<u32>,
    /// Backend key → number of ports whose endpoints hold it.
    refs: FastMap<Key6, u32>,
    ports: NameMap<ServicePortName, Port6>,
    pub(super) next_backend_id: u32,
    next_svc_id: u32,
    /// The node configuration wanted and whether it is written.
    config: NodeConfig6,
    config_written: bool,
    hasher: foldhash::fast::RandomState,
    /// Service id → its programmed source ranges (network, prefix length).
    ranges: FastMap<u32, BTreeSet<(Addr6, u8)>>,
    /// The closed service addresses programmed.
    closed: FastSet<Addr6>,
    /// Whether service entries or local addresses changed since the closed addresses were
    /// brought to them.
    closed_dirty: bool,
    /// The node's local IPv6 addresses: never closed service addresses.
    local: FastSet<Addr6>,
    /// The IPv6 service CIDRs wanted and whether they are written.
    cidrs: Option<Vec<ipnet::Ipv6Net>>,
    cidrs_written: bool,
    /// The serving set of each programmed UDP port, for the conntrack reconciler.
    udp_serving: NameMap<ServicePortName, BTreeSet<(Ipv6Addr, u16)>>,
    /// Whether a sync ran (the first one reconciles every UDP port's flows).
    synced: bool,
}

/// A failed write of one port.
struct Failed(SyncError);

impl Syncer6 {
    /// A syncer for empty IPv6 maps.
    pub fn new() -> Self {
        Self { next_backend_id: 1, next_svc_id: V6_ONLY_IDS, ..Default::default() }
    }

    /// A syncer that adopts what `dp` already holds (after a restart): the maps become the
    /// shadow, and their ids are reused.
    pub fn adopt(dp: &dyn Dataplane6) -> Result<Self, SyncError> {
        let mut s = Self::new();
        let mut max_svc = 0;
        for (k, v) in dp.services6().map_err(SyncError::Read)? {
            max_svc = max_svc.max(v.svc_id);
            s.hold(&k, &v);
        }
        let mut max_be = 0;
        let mut all = dp.backends6().map_err(SyncError::Read)?;
        // The lowest id of a key wins; the others are removed by the first sync.
        all.sort_unstable_by_key(|(id, _)| *id);
        for (id, b) in all {
            max_be = max_be.max(id);
            let key = (from_addr6(&b.addr), u16::from_be(b.port), b.proto);
            s.backends.entry(key).or_insert(Be6 { id, value: b });
            s.ids.insert(id);
        }
        s.next_backend_id = max_be.wrapping_add(1).max(1);
        s.next_svc_id = (max_svc + 1).max(V6_ONLY_IDS);
        for r in dp.source_ranges6().map_err(SyncError::Read)? {
            s.ranges.entry(r.svc_id).or_default().insert((r.addr, r.len));
        }
        s.closed = dp.service_addrs6().map_err(SyncError::Read)?.into_iter().collect();
        s.closed_dirty = true;
        Ok(s)
    }

    /// Sets the node's IPv6 NodePort addresses: the first is the source NAT address of IPv6
    /// NodePort traffic to remote backends (none: such traffic is dropped and counted).
    pub fn set_node_addrs(&mut self, addrs: &[Ipv6Addr]) {
        let cfg = NodeConfig6 { snat_addr: addrs.first().map_or([0; 4], |a| to_addr6(*a)) };
        if cfg != self.config {
            self.config = cfg;
            self.config_written = false;
        }
    }

    /// Sets the node's local IPv6 addresses (every interface's): never closed service
    /// addresses. Applied by the next sync.
    pub fn set_local_addrs(&mut self, addrs: &[Ipv6Addr]) {
        let new: FastSet<Addr6> = addrs.iter().map(|a| to_addr6(*a)).collect();
        if new != self.local {
            self.local = new;
            self.closed_dirty = true;
        }
    }

    /// Sets the IPv6 service CIDRs. Applied by the next sync.
    pub fn set_service_cidrs(&mut self, nets: Vec<ipnet::Ipv6Net>) {
        if self.cidrs.as_ref() != Some(&nets) {
            self.cidrs = Some(nets);
            self.cidrs_written = false;
        }
    }

    /// Number of programmed closed IPv6 service addresses.
    pub fn programmed_service_addrs(&self) -> usize {
        self.closed.len()
    }

    /// Number of programmed IPv6 frontends (service entries).
    pub fn programmed_frontends(&self) -> usize {
        self.frontends
    }

    /// Number of programmed IPv6 backends.
    pub fn programmed_backends(&self) -> usize {
        self.backends.len()
    }

    /// Number of programmed IPv6 service entries (frontends and their backend slots).
    pub fn programmed_service_entries(&self) -> usize {
        self.frontends + self.slots
    }

    /// The IPv6 service id of a service port, if it has one.
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.ports.get(name).map(|p| p.svc_id)
    }

    /// Brings the IPv6 maps to `desired`: everything when `scope` is `None` (anything else
    /// programmed is removed), else the ports of the services in `scope` (their ports in
    /// `desired` replace the ones they had). `v4_id` gives the IPv4 service id of a port.
    pub fn apply(
        &mut self,
        desired: &BTreeMap<ServicePortName, PortState6>,
        scope: Option<&BTreeSet<ServiceName>>,
        v4_id: &dyn Fn(&ServicePortName) -> Option<u32>,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) {
        if !self.config_written {
            report.writes += 1;
            match dp.set_config6(&self.config) {
                Ok(()) => self.config_written = true,
                Err(e) => report.errors.push(SyncError::Config6(e)),
            }
        }
        if let Some(nets) = self.cidrs.as_ref().filter(|_| !self.cidrs_written) {
            report.writes += 1;
            match dp.set_service_cidrs6(&crate::dataplane::guard::service_cidrs6(nets)) {
                Ok(()) => self.cidrs_written = true,
                Err(e) => report.errors.push(SyncError::ServiceCidrs(e)),
            }
        }
        // Ports that go away let their frontends go first (another port may take them over);
        // the frontends no port took are removed after the writes.
        let gone: Vec<(ServicePortName, Port6)> = self
            .ports
            .keys()
            .filter(|n| scope.is_none_or(|s| s.contains(&n.service)) && !desired.contains_key(*n))
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|n| self.ports.remove(&n).map(|p| (n, p)))
            .collect();
        for (name, state) in desired {
            if scope.is_some_and(|s| !s.contains(&name.service)) {
                continue;
            }
            let hash = self.hash_of(state);
            if self.ports.get(name).is_some_and(|p| p.hash == Some(hash)) {
                continue;
            }
            let reported = self.ports.get(name).is_some_and(|p| p.refused == Some(hash));
            match self.write_port(name, state, hash, v4_id(name), dp, report) {
                Ok(()) => {
                    report.services_changed += 1;
                    self.note_udp_serving(name, &state.udp_serving, report);
                }
                Err(Failed(SyncError::Conflict6 { .. })) if reported => {}
                Err(Failed(e)) => report.errors.push(e),
            }
        }
        for (name, p) in gone {
            self.udp_serving.remove(&name);
            self.unref(&p.endpoints);
            let fronts: Vec<Frontend6> = p
                .frontends
                .into_iter()
                .filter(|f| self.fronts.get(f).is_some_and(|x| x.owner.as_ref() == Some(&name)))
                .collect();
            let r = self.remove_fronts(&fronts, dp, report).and_then(|()| {
                let keep = self.ports.values().any(|x| x.svc_id == p.svc_id);
                if keep {
                    Ok(())
                } else {
                    self.write_ranges(p.svc_id, &BTreeSet::new(), false, dp, report)
                }
            });
            if let Err(e) = r {
                report.errors.push(SyncError::Remove { what: format!("{name} (IPv6)"), source: e });
            }
        }
        if scope.is_none() {
            // The full resync: frontends nobody wants (adopted ones, leftovers of failures).
            let stale: Vec<Frontend6> = self
                .fronts
                .iter()
                .filter(|(f, x)| {
                    !x.owner
                        .as_ref()
                        .is_some_and(|o| self.ports.get(o).is_some_and(|p| p.frontends.contains(f)))
                })
                .map(|(f, _)| *f)
                .collect();
            if let Err(e) = self.remove_fronts(&stale, dp, report) {
                report.errors.push(SyncError::Remove { what: "IPv6 frontends".into(), source: e });
            }
            // Source ranges of no port (adopted ones, leftovers of failures).
            let ids: FastSet<u32> = self.ports.values().map(|p| p.svc_id).collect();
            let mut stale: Vec<u32> =
                self.ranges.keys().filter(|id| !ids.contains(id)).copied().collect();
            stale.sort_unstable();
            for id in stale {
                if let Err(e) = self.write_ranges(id, &BTreeSet::new(), false, dp, report) {
                    let what = "IPv6 source ranges".into();
                    report.errors.push(SyncError::Remove { what, source: e });
                }
            }
        }
        self.remove_unused_backends(dp, report);
        self.write_service_addrs(dp, report);
        self.synced = true;
    }

    /// Remembers the serving set of a programmed UDP port and asks for a reconciliation of its
    /// flows when the set lost a member (or on the first sync), as the IPv4 syncer does.
    fn note_udp_serving(
        &mut self,
        name: &ServicePortName,
        serving: &BTreeSet<(Ipv6Addr, u16)>,
        report: &mut SyncReport,
    ) {
        if name.proto != kproxy_common::proto::UDP {
            return;
        }
        if super::udp_reconcile_needed(self.udp_serving.get(name), serving, self.synced)
            && let Some(p) = self.ports.get(name)
        {
            report.udp_reconcile6.push(super::UdpServing {
                svc_id: p.svc_id,
                serving: serving.iter().map(|(a, port)| (to_addr6(*a), port.to_be())).collect(),
            });
        }
        self.udp_serving.insert(name.clone(), serving.clone());
    }

    /// Brings the source ranges of service `svc_id` to `want`: the missing ones written
    /// (`add`), or the ones no longer wanted removed.
    fn write_ranges(
        &mut self,
        svc_id: u32,
        want: &BTreeSet<(Addr6, u8)>,
        add: bool,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) -> Result<(), DataplaneError> {
        let have = self.ranges.get(&svc_id);
        let nets: Vec<(Addr6, u8)> = if add {
            want.iter().filter(|r| !have.is_some_and(|h| h.contains(r))).copied().collect()
        } else {
            have.into_iter().flatten().filter(|r| !want.contains(r)).copied().collect()
        };
        let keys: Vec<SourceRange6> =
            nets.into_iter().map(|(addr, len)| SourceRange6 { svc_id, addr, len }).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let r = if add { dp.put_source_ranges6(&keys) } else { dp.delete_source_ranges6(&keys) };
        let done = r.as_ref().map_or_else(|e| e.done, |_| keys.len());
        report.writes += done + usize::from(r.is_err());
        let set = self.ranges.entry(svc_id).or_default();
        for k in &keys[..done] {
            if add {
                set.insert((k.addr, k.len));
            } else {
                set.remove(&(k.addr, k.len));
            }
        }
        if set.is_empty() {
            self.ranges.remove(&svc_id);
        }
        r.map_err(|e| e.error)
    }

    /// Brings the closed IPv6 service addresses to the programmed service entries.
    fn write_service_addrs(&mut self, dp: &mut dyn Dataplane6, report: &mut SyncReport) {
        if !std::mem::take(&mut self.closed_dirty) {
            return;
        }
        let want: FastSet<Addr6> = self
            .fronts
            .iter()
            .filter(|(_, x)| x.entry.is_some_and(|e| e.flags & super::CLOSED_KINDS != 0))
            .map(|(f, _)| to_addr6(f.addr))
            .filter(|a| !self.local.contains(a))
            .collect();
        let mut put: Vec<Addr6> = want.difference(&self.closed).copied().collect();
        let mut del: Vec<Addr6> = self.closed.difference(&want).copied().collect();
        put.sort_unstable();
        del.sort_unstable();
        for (items, add) in [(put, true), (del, false)] {
            if items.is_empty() {
                continue;
            }
            let r =
                if add { dp.put_service_addrs6(&items) } else { dp.delete_service_addrs6(&items) };
            let done = r.as_ref().map_or_else(|e| e.done, |_| items.len());
            report.writes += done + usize::from(r.is_err());
            for a in &items[..done] {
                if add {
                    self.closed.insert(*a);
                } else {
                    self.closed.remove(a);
                }
            }
            if let Err(e) = r {
                // Retried on the next sync.
                self.closed_dirty = true;
                report.errors.push(SyncError::ServiceAddrs(e.error));
            }
        }
    }

    fn hash_of(&self, state: &PortState6) -> u64 {
        self.hasher.hash_one(state)
    }

    fn unref(&mut self, keys: &[Key6]) {
        for k in keys {
            if let Some(n) = self.refs.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(k);
                }
            }
        }
    }

    /// Writes one port (phases 1-4 of the module documentation).
    fn write_port(
        &mut self,
        name: &ServicePortName,
        state: &PortState6,
        hash: u64,
        v4_id: Option<u32>,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) -> Result<(), Failed> {
        let what = |source: DataplaneError| {
            Failed(SyncError::Service { service: format!("{name} (IPv6)"), source })
        };
        let batch = |e: BatchError| what(e.error);
        // The endpoints count as wanted from now on, so that a failure below does not free
        // backends the port's slots may already name.
        let endpoints: Vec<Key6> = state.endpoints.iter().map(Backend6::key).collect();
        for k in &endpoints {
            *self.refs.entry(*k).or_default() += 1;
        }
        let old = self.ports.remove(name);
        if let Some(o) = &old {
            self.unref(&o.endpoints);
        }
        let svc_id = old.as_ref().map(|o| o.svc_id).or(v4_id).unwrap_or_else(|| {
            let adopted = state
                .frontends
                .keys()
                .filter_map(|f| self.fronts.get(f))
                .filter(|x| x.owner.is_none())
                .find_map(|x| x.entry.map(|e| e.svc_id));
            adopted.unwrap_or_else(|| {
                let taken: FastSet<u32> = self.ports.values().map(|p| p.svc_id).collect();
                let mut id = self.next_svc_id.max(V6_ONLY_IDS);
                while taken.contains(&id) {
                    id = id.wrapping_add(1).max(V6_ONLY_IDS);
                }
                self.next_svc_id = id.wrapping_add(1);
                id
            })
        });
        let mut record = Port6 {
            svc_id,
            hash: None,
            refused: None,
            frontends: old.as_ref().map(|o| o.frontends.clone()).unwrap_or_default(),
            endpoints,
        };
        let result = self.write_port_maps(name, state, &mut record, dp, report);
        match &result {
            Ok(()) => {
                record.hash = Some(hash);
                record.frontends = state.frontends.keys().copied().collect();
            }
            // Written but for the refused frontends: tried again by every sync until their
            // owner lets them go (reported again only for another state).
            Err(PortError::Conflict(_)) => {
                record.refused = Some(hash);
                record.frontends = state
                    .frontends
                    .keys()
                    .filter(|f| self.fronts.get(f).is_some_and(|x| x.owner.as_ref() == Some(name)))
                    .copied()
                    .collect();
            }
            Err(_) => {}
        }
        self.ports.insert(name.clone(), record);
        result.map_err(|e| match e {
            PortError::Write(e) => what(e),
            PortError::Batch(e) => batch(e),
            PortError::Conflict(e) => Failed(e),
        })
    }

    fn write_port_maps(
        &mut self,
        name: &ServicePortName,
        state: &PortState6,
        record: &mut Port6,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) -> Result<(), PortError> {
        // 1. Backends.
        let mut puts: Vec<(u32, kproxy_common::Backend6)> = Vec::new();
        for b in &state.endpoints {
            let value = b.to_map();
            match self.backends.get(&b.key()) {
                Some(be) if be.value == value => {}
                Some(be) => puts.push((be.id, value)),
                None => {
                    let id = self.alloc_backend_id();
                    puts.push((id, value));
                }
            }
        }
        report.writes += puts.len();
        let done = dp.put_backends6(&puts);
        let n = done.as_ref().map_or_else(|e| e.done, |_| puts.len());
        for (id, value) in &puts[..n] {
            let key = (from_addr6(&value.addr), u16::from_be(value.port), value.proto);
            self.backends.insert(key, Be6 { id: *id, value: *value });
        }
        done.map_err(PortError::Batch)?;
        let ranges_before = self.ranges.get(&record.svc_id).cloned().unwrap_or_default();
        let mut undo = Vec::new();
        let r = self.write_port_services(name, state, record, &mut undo, dp, report);
        if matches!(r, Err(PortError::Write(_) | PortError::Batch(_))) {
            self.undo(record.svc_id, undo, &ranges_before, dp, report);
        }
        r
    }

    /// Undoes a failed port's service-map writes (`undo`: key and the value it had, in write
    /// order), then removes the source ranges it added (not in `ranges_before`). A failed undo
    /// is logged; the shadow keeps describing what is programmed.
    fn undo(
        &mut self,
        svc_id: u32,
        mut undo: Vec<(Service6Key, Option<Service6Value>)>,
        ranges_before: &BTreeSet<(Addr6, u8)>,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) {
        while let Some((k, old)) = undo.pop() {
            report.writes += 1;
            let r = match old {
                None => dp.delete_service6(&k).map(|()| self.note_deletes(&[k], 1)),
                Some(v) => dp.put_service6(&k, &v).map(|()| {
                    let owner = self.fronts.get(&frontend_of(&k)).and_then(|f| f.owner.clone());
                    if let Some(o) = owner {
                        self.note_puts(&[(k, v)], 1, &o);
                    }
                }),
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "undoing a failed IPv6 service update");
            }
        }
        if let Err(e) = self.write_ranges(svc_id, ranges_before, false, dp, report) {
            tracing::error!(error = %e, "undoing a failed IPv6 service update");
        }
    }

    /// The service-map phases of [`Self::write_port_maps`], recording in `undo` every key
    /// written with the value it had.
    fn write_port_services(
        &mut self,
        name: &ServicePortName,
        state: &PortState6,
        record: &mut Port6,
        undo: &mut Vec<(Service6Key, Option<Service6Value>)>,
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) -> Result<(), PortError> {
        // Source ranges before the entries they restrict.
        self.write_ranges(record.svc_id, &ranges6(state), true, dp, report)
            .map_err(PortError::Write)?;
        // Ownership.
        let mut conflict = None;
        let mut wanted: Vec<(&Frontend6, &crate::model::v6::FrontendEntry6)> = Vec::new();
        for (f, e) in &state.frontends {
            match self.fronts.get(f).and_then(|x| x.owner.as_ref()) {
                Some(o) if o != name && self.ports.contains_key(o) => {
                    conflict.get_or_insert(SyncError::Conflict6 {
                        service: name.to_string(),
                        frontend: f.to_string(),
                        owner: o.to_string(),
                    });
                }
                _ => wanted.push((f, e)),
            }
        }
        // 2. Slots, 3. entries, 4. slots above the counts.
        let (mut slots, mut entries, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
        for (f, e) in &wanted {
            let ids: Vec<u32> = e.backends.iter().map(|b| self.backends[&b.key()].id).collect();
            let held = self.fronts.get(f);
            for (i, id) in ids.iter().enumerate() {
                if held.and_then(|h| h.slots.get(i)) != Some(id) {
                    let v = Service6Value {
                        backend_id: *id,
                        svc_id: record.svc_id,
                        ..Default::default()
                    };
                    slots.push((f.key(i as u16 + 1), v));
                }
            }
            let Ok(count) = u16::try_from(ids.len()) else {
                return Err(PortError::Conflict(SyncError::TooManyBackends {
                    service: format!("{name} (IPv6)"),
                    count: ids.len(),
                    max: u16::MAX as usize,
                }));
            };
            let entry = Service6Value {
                backend_id: 0,
                svc_id: record.svc_id,
                count,
                flags: e.flags,
                affinity_timeout: e.affinity_timeout,
            };
            if held.and_then(|h| h.entry) != Some(entry) {
                entries.push((f.key(0), entry));
            }
            if let Some(h) = held {
                for i in (ids.len()..h.slots.len()).rev() {
                    if h.slots[i] != 0 {
                        deletes.push(f.key(i as u16 + 1));
                    }
                }
            }
        }
        let svc_id = record.svc_id;
        for items in [slots, entries] {
            report.writes += items.len();
            let r = dp.put_services6(&items);
            let n = r.as_ref().map_or_else(|e| e.done, |_| items.len());
            undo.extend(items[..n].iter().map(|(k, _)| (*k, self.held_value(k, svc_id))));
            self.note_puts(&items, n, name);
            r.map_err(PortError::Batch)?;
        }
        report.writes += deletes.len();
        let r = dp.delete_services6(&deletes);
        let n = r.as_ref().map_or_else(|e| e.done, |_| deletes.len());
        undo.extend(deletes[..n].iter().map(|k| (*k, self.held_value(k, svc_id))));
        self.note_deletes(&deletes, n);
        r.map_err(PortError::Batch)?;
        // Frontends adopted unchanged are its own now.
        for (f, _) in &wanted {
            if let Some(x) = self.fronts.get_mut(f) {
                x.owner = Some(name.clone());
            }
        }
        // Its frontends no longer wanted.
        let dropped: Vec<Frontend6> = record
            .frontends
            .iter()
            .filter(|f| !state.frontends.contains_key(f))
            .filter(|f| self.fronts.get(f).is_some_and(|x| x.owner.as_ref() == Some(name)))
            .copied()
            .collect();
        self.remove_fronts(&dropped, dp, report).map_err(PortError::Write)?;
        // Source ranges no longer wanted, after the entries.
        self.write_ranges(record.svc_id, &ranges6(state), false, dp, report)
            .map_err(PortError::Write)?;
        match conflict {
            Some(c) => Err(PortError::Conflict(c)),
            None => Ok(()),
        }
    }

    /// The value the shadow holds for `k` (a slot's with service id `svc_id`).
    fn held_value(&self, k: &Service6Key, svc_id: u32) -> Option<Service6Value> {
        let f = self.fronts.get(&frontend_of(k))?;
        if k.slot == 0 {
            return f.entry;
        }
        let id = *f.slots.get(usize::from(k.slot) - 1).filter(|id| **id != 0)?;
        Some(Service6Value { backend_id: id, svc_id, ..Default::default() })
    }

    fn note_puts(
        &mut self,
        items: &[(Service6Key, Service6Value)],
        n: usize,
        owner: &ServicePortName,
    ) {
        self.closed_dirty |= items[..n].iter().any(|(k, _)| k.slot == 0);
        for (k, v) in &items[..n] {
            self.hold(k, v).owner = Some(owner.clone());
        }
    }

    /// Records that the map holds `v` at `k` (a slot naming backend 0 counts as absent); returns
    /// the frontend's record.
    fn hold(&mut self, k: &Service6Key, v: &Service6Value) -> &mut Front6 {
        let front = self.fronts.entry(frontend_of(k)).or_default();
        if k.slot == 0 {
            let held = front.entry.replace(*v).is_some();
            self.frontends += usize::from(!held);
        } else {
            let i = usize::from(k.slot) - 1;
            if front.slots.len() <= i {
                front.slots.resize(i + 1, 0);
            }
            let held = std::mem::replace(&mut front.slots[i], v.backend_id) != 0;
            self.slots = self.slots + usize::from(v.backend_id != 0) - usize::from(held);
        }
        front
    }

    fn note_deletes(&mut self, keys: &[Service6Key], n: usize) {
        self.closed_dirty |= keys[..n].iter().any(|k| k.slot == 0);
        for k in &keys[..n] {
            let f = frontend_of(k);
            let Some(front) = self.fronts.get_mut(&f) else { continue };
            if k.slot == 0 {
                self.frontends -= usize::from(front.entry.take().is_some());
            } else {
                let slot = front.slots.get_mut(usize::from(k.slot) - 1);
                self.slots -= usize::from(slot.is_some_and(|s| std::mem::take(s) != 0));
            }
            while front.slots.last() == Some(&0) {
                front.slots.pop();
            }
            if front.entry.is_none() && front.slots.is_empty() {
                self.fronts.remove(&f);
            }
        }
    }

    /// Removes frontends: every service entry first, then their slots.
    fn remove_fronts(
        &mut self,
        fronts: &[Frontend6],
        dp: &mut dyn Dataplane6,
        report: &mut SyncReport,
    ) -> Result<(), DataplaneError> {
        let mut entries = Vec::new();
        let mut slots = Vec::new();
        for f in fronts {
            let Some(x) = self.fronts.get(f) else { continue };
            if x.entry.is_some() {
                entries.push(f.key(0));
            }
            for (i, id) in x.slots.iter().enumerate().rev() {
                if *id != 0 {
                    slots.push(f.key(i as u16 + 1));
                }
            }
        }
        for keys in [entries, slots] {
            report.writes += keys.len();
            let r = dp.delete_services6(&keys);
            self.note_deletes(&keys, r.as_ref().map_or_else(|e| e.done, |_| keys.len()));
            r.map_err(|e| e.error)?;
        }
        report.frontends_removed += fronts.len();
        Ok(())
    }

    /// Removes the backends no port wants and no programmed slot names.
    fn remove_unused_backends(&mut self, dp: &mut dyn Dataplane6, report: &mut SyncReport) {
        let mut unused: Vec<(Key6, u32)> = self
            .backends
            .iter()
            .filter(|(k, _)| !self.refs.contains_key(*k))
            .map(|(k, b)| (*k, b.id))
            .collect();
        if unused.is_empty() {
            return;
        }
        let named: FastSet<u32> =
            self.fronts.values().flat_map(|f| f.slots.iter().copied()).collect();
        unused.retain(|(_, id)| !named.contains(id));
        unused.sort_unstable_by_key(|(_, id)| *id);
        let ids: Vec<u32> = unused.iter().map(|(_, id)| *id).collect();
        report.writes += ids.len();
        let r = dp.delete_backends6(&ids);
        let n = r.as_ref().map_or_else(|e| e.done, |_| ids.len());
        for (k, id) in &unused[..n] {
            self.backends.remove(k);
            self.ids.remove(id);
        }
        report.backends_removed += n;
        if let Err(e) = r {
            report.errors.push(SyncError::Remove { what: "IPv6 backends".into(), source: e.error });
        }
    }

    fn alloc_backend_id(&mut self) -> u32 {
        let mut id = self.next_backend_id;
        while id == 0 || self.ids.contains(&id) {
            id = id.wrapping_add(1);
        }
        self.next_backend_id = id.wrapping_add(1);
        self.ids.insert(id);
        id
    }
}

/// The source ranges of a port state in map form.
fn ranges6(state: &PortState6) -> BTreeSet<(Addr6, u8)> {
    state.source_ranges.iter().map(|(a, l)| (to_addr6(*a), *l)).collect()
}

/// Why a port's writes stopped.
enum PortError {
    Write(DataplaneError),
    Batch(BatchError),
    Conflict(SyncError),
}

fn frontend_of(k: &Service6Key) -> Frontend6 {
    Frontend6 {
        addr: from_addr6(&k.addr),
        port: u16::from_be(k.port),
        proto: k.proto,
        scope: k.scope,
    }
}

#[cfg(test)]
mod tests {
    use kproxy_common::{Backend6 as Backend6Map, proto, scope, svc_flags};

    use super::*;
    use crate::{
        dataplane::mem::MemDataplane,
        model::{
            NodeInfo, build,
            v6::{FrontendEntry6, to_addr6},
        },
    };

    /// The IPv6 maps in memory, checked after every single write: every service entry's slots
    /// exist and name existing backends (what a packet could observe at that moment).
    #[derive(Default)]
    struct Checked6 {
        mem: MemDataplane,
        violations: Vec<String>,
        /// Put and delete calls of the services map, in order (true: put).
        calls: Vec<(bool, Service6Key)>,
    }

    impl Checked6 {
        fn check(&mut self, after: &str) {
            for (k, v) in self.mem.services6.iter().filter(|(k, _)| k.slot == 0) {
                if v.flags & svc_flags::SOURCE_RANGES != 0
                    && !self.mem.source_ranges6.iter().any(|r| r.svc_id == v.svc_id)
                {
                    self.violations.push(format!(
                        "after {after}: {k:?} restricted but its ranges are missing"
                    ));
                }
                for slot in 1..=v.count {
                    match self.mem.services6.get(&Service6Key { slot, ..*k }) {
                        None => self
                            .violations
                            .push(format!("after {after}: {k:?} slot {slot} missing")),
                        Some(s) if !self.mem.backends6.contains_key(&s.backend_id) => {
                            self.violations.push(format!(
                                "after {after}: {k:?} slot {slot} names a missing backend"
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    impl Dataplane6 for Checked6 {
        fn set_config6(&mut self, cfg: &NodeConfig6) -> Result<(), DataplaneError> {
            self.mem.set_config6(cfg)
        }
        fn put_backend6(&mut self, id: u32, b: &Backend6Map) -> Result<(), DataplaneError> {
            let r = self.mem.put_backend6(id, b);
            self.check("put_backend6");
            r
        }
        fn delete_backend6(&mut self, id: u32) -> Result<(), DataplaneError> {
            let r = self.mem.delete_backend6(id);
            self.check("delete_backend6");
            r
        }
        fn put_service6(
            &mut self,
            k: &Service6Key,
            v: &Service6Value,
        ) -> Result<(), DataplaneError> {
            let r = self.mem.put_service6(k, v);
            self.calls.push((true, *k));
            self.check("put_service6");
            r
        }
        fn delete_service6(&mut self, k: &Service6Key) -> Result<(), DataplaneError> {
            let r = self.mem.delete_service6(k);
            self.calls.push((false, *k));
            self.check("delete_service6");
            r
        }
        fn services6(&self) -> Result<Vec<(Service6Key, Service6Value)>, DataplaneError> {
            self.mem.services6()
        }
        fn backends6(&self) -> Result<Vec<(u32, Backend6Map)>, DataplaneError> {
            self.mem.backends6()
        }
        fn put_source_ranges6(&mut self, k: &[SourceRange6]) -> Result<(), BatchError> {
            let r = self.mem.put_source_ranges6(k);
            self.check("put_source_ranges6");
            r
        }
        fn delete_source_ranges6(&mut self, k: &[SourceRange6]) -> Result<(), BatchError> {
            let r = self.mem.delete_source_ranges6(k);
            self.check("delete_source_ranges6");
            r
        }
        fn source_ranges6(&self) -> Result<Vec<SourceRange6>, DataplaneError> {
            self.mem.source_ranges6()
        }
        fn put_service_addrs6(&mut self, a: &[Addr6]) -> Result<(), BatchError> {
            self.mem.put_service_addrs6(a)
        }
        fn delete_service_addrs6(&mut self, a: &[Addr6]) -> Result<(), BatchError> {
            self.mem.delete_service_addrs6(a)
        }
        fn service_addrs6(&self) -> Result<Vec<Addr6>, DataplaneError> {
            self.mem.service_addrs6()
        }
        fn set_service_cidrs6(
            &mut self,
            c: &kproxy_common::ServiceCidrs6,
        ) -> Result<(), DataplaneError> {
            self.mem.set_service_cidrs6(c)
        }
    }

    fn net(s: &str) -> (Ipv6Addr, u8) {
        let n: ipnet::Ipv6Net = s.parse().unwrap();
        (n.network(), n.prefix_len())
    }

    /// A port with one LoadBalancer frontend `addr` restricted to `ranges`.
    fn restricted(addr: &str, ranges: &[&str]) -> PortState6 {
        let mut st = port(addr, &[1]);
        let e = st.frontends.values_mut().next().unwrap();
        e.flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
        st.source_ranges = ranges.iter().map(|r| net(r)).collect();
        st
    }

    fn ranges_of(mem: &MemDataplane) -> BTreeSet<(Ipv6Addr, u8)> {
        mem.source_ranges6.iter().map(|r| (from_addr6(&r.addr), r.len)).collect()
    }

    /// Source ranges are written before the restricted entry and removed after it (the checker
    /// sees every write): changed ranges, a restriction lifted, a port gone.
    #[test]
    fn source_ranges_come_before_the_restricted_entry_and_go_after_it() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let a = "2001:2:60::1";
        let d = BTreeMap::from([(spn("a"), restricted(a, &["2001:2:1::/48", "2001:2:2::/64"]))]);
        let r = run(&mut s, &mut dp, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let id = s.service_id(&spn("a")).unwrap();
        assert!(dp.mem.source_ranges6.iter().all(|r| r.svc_id == id));
        assert_eq!(
            ranges_of(&dp.mem),
            BTreeSet::from([net("2001:2:1::/48"), net("2001:2:2::/64")])
        );
        // One range replaced.
        let d = BTreeMap::from([(spn("a"), restricted(a, &["2001:2:1::/48", "2001:2:3::/64"]))]);
        run(&mut s, &mut dp, &d);
        assert_eq!(
            ranges_of(&dp.mem),
            BTreeSet::from([net("2001:2:1::/48"), net("2001:2:3::/64")])
        );
        assert_eq!(run(&mut s, &mut dp, &d).writes, 0, "nothing changed");
        // A restart adopts them: nothing is rewritten but the node configuration.
        let mut s = Syncer6::adopt(&dp).unwrap();
        assert_eq!(run(&mut s, &mut dp, &d).writes, 1);
        // The restriction lifted: the entry first, then the ranges.
        let mut open = restricted(a, &[]);
        open.frontends.values_mut().next().unwrap().flags = svc_flags::LOAD_BALANCER;
        run(&mut s, &mut dp, &BTreeMap::from([(spn("a"), open)]));
        assert!(dp.mem.source_ranges6.is_empty());
        // A restricted port that goes away takes its ranges along.
        run(&mut s, &mut dp, &d);
        assert_eq!(dp.mem.source_ranges6.len(), 2);
        run(&mut s, &mut dp, &BTreeMap::new());
        assert!(dp.mem.source_ranges6.is_empty() && dp.mem.services6.is_empty());
    }

    /// The closed IPv6 service addresses follow the ClusterIP, LoadBalancer and external IP
    /// entries, never a local address; the service CIDRs are written when they change.
    #[test]
    fn closed_addresses_and_service_cidrs() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let d = desired(&[("a", "2001:2:ff::1", &[1]), ("b", "2001:2:ff::2", &[2])]);
        s.set_local_addrs(&[ip("2001:2:ff::2")]);
        s.set_service_cidrs(vec!["2001:2:ff::/112".parse().unwrap()]);
        run(&mut s, &mut dp, &d);
        let closed: Vec<Ipv6Addr> = dp.mem.service_addrs6.iter().map(from_addr6).collect();
        assert_eq!(closed, [ip("2001:2:ff::1")], "the local address is left open");
        assert_eq!(dp.mem.service_cidrs6.count, 1);
        assert_eq!(from_addr6(&dp.mem.service_cidrs6.nets[0].addr), ip("2001:2:ff::"));
        assert_eq!(run(&mut s, &mut dp, &d).writes, 0, "nothing changed");
        // No longer local: closed too.
        s.set_local_addrs(&[]);
        run(&mut s, &mut dp, &d);
        assert_eq!(dp.mem.service_addrs6.len(), 2);
        // A NodePort-only address is not closed; a port gone takes its address along.
        let mut np = port("2001:2:ff::3", &[1]);
        np.frontends.values_mut().next().unwrap().flags = svc_flags::NODE_PORT;
        run(&mut s, &mut dp, &BTreeMap::from([(spn("a"), np)]));
        assert!(dp.mem.service_addrs6.is_empty(), "{:?}", dp.mem.service_addrs6);
    }

    fn spn(name: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName { namespace: "default".into(), name: name.into() },
            port: "http".into(),
            proto: proto::TCP,
        }
    }

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn fe(addr: &str) -> Frontend6 {
        Frontend6 { addr: ip(addr), port: 80, proto: proto::TCP, scope: scope::INTERNAL }
    }

    fn be(n: u8) -> Backend6 {
        Backend6 { addr: ip(&format!("2001:2:100::{n}")), port: 8080, proto: proto::TCP, flags: 0 }
    }

    /// A port with one ClusterIP frontend `addr` balancing over backends `ns`.
    fn port(addr: &str, ns: &[u8]) -> PortState6 {
        let backends: Vec<Backend6> = ns.iter().map(|n| be(*n)).collect();
        let mut st =
            PortState6 { endpoints: backends.iter().copied().collect(), ..Default::default() };
        st.frontends.insert(
            fe(addr),
            FrontendEntry6 { flags: svc_flags::CLUSTER_IP, affinity_timeout: 0, backends },
        );
        st
    }

    fn desired(ports: &[(&str, &str, &[u8])]) -> BTreeMap<ServicePortName, PortState6> {
        ports.iter().map(|(n, a, b)| (spn(n), port(a, b))).collect()
    }

    /// The backends of a programmed frontend, by address, in slot order.
    fn programmed(mem: &MemDataplane, addr: &str) -> Option<Vec<Ipv6Addr>> {
        let k = fe(addr).key(0);
        let e = mem.services6.get(&k)?;
        Some(
            (1..=e.count)
                .map(|slot| {
                    let s = mem.services6[&Service6Key { slot, ..k }];
                    from_addr6(&mem.backends6[&s.backend_id].addr)
                })
                .collect(),
        )
    }

    fn run(
        s: &mut Syncer6,
        dp: &mut Checked6,
        d: &BTreeMap<ServicePortName, PortState6>,
    ) -> SyncReport {
        let mut r = SyncReport::default();
        s.apply(d, None, &|_| None, dp, &mut r);
        assert!(dp.violations.is_empty(), "{:?}", dp.violations);
        assert_eq!(s.programmed_service_entries(), dp.mem.services6.len(), "entries counted");
        let fronts = dp.mem.services6.keys().filter(|k| k.slot == 0).count();
        assert_eq!(s.programmed_frontends(), fronts, "frontends counted");
        r
    }

    /// Writes in order (backends, slots, entries; entries removed before their slots and
    /// backends after), only differences, and removes what goes away.
    #[test]
    fn writes_only_differences_in_a_safe_order() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let d = desired(&[("a", "2001:2:ff::1", &[1, 2, 3]), ("b", "2001:2:ff::2", &[3])]);
        let r = run(&mut s, &mut dp, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            programmed(&dp.mem, "2001:2:ff::1"),
            Some(vec![be(1).addr, be(2).addr, be(3).addr])
        );
        assert_eq!(dp.mem.backends6.len(), 3);
        // IPv6-only ports: ids where IPv4 ones never go.
        assert!(s.service_id(&spn("a")).unwrap() >= V6_ONLY_IDS);
        // The entry after its slots.
        let entry_at = dp.calls.iter().position(|(p, k)| *p && k.slot == 0).unwrap();
        assert!(dp.calls[..entry_at].iter().all(|(p, k)| *p && k.slot > 0));
        // Nothing changed: no write.
        assert_eq!(run(&mut s, &mut dp, &d).writes, 0);
        // A backend leaves port a, port b goes away: its backend 3 stays for a... then goes.
        let d = desired(&[("a", "2001:2:ff::1", &[1, 3])]);
        let r = run(&mut s, &mut dp, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(1).addr, be(3).addr]));
        assert_eq!(programmed(&dp.mem, "2001:2:ff::2"), None);
        assert_eq!(dp.mem.services6.len(), 3, "{:?}", dp.mem.services6.keys());
        assert_eq!(dp.mem.backends6.len(), 2);
        assert_eq!((r.frontends_removed, r.backends_removed), (1, 1));
        // Everything goes.
        run(&mut s, &mut dp, &BTreeMap::new());
        assert!(dp.mem.services6.is_empty() && dp.mem.backends6.is_empty());
    }

    /// An incremental sync looks only at the services it names.
    #[test]
    fn incremental_sync_touches_only_the_named_services() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        run(&mut s, &mut dp, &desired(&[("a", "2001:2:ff::1", &[1]), ("b", "2001:2:ff::2", &[2])]));
        let scope: BTreeSet<ServiceName> = [spn("b").service].into();
        let mut r = SyncReport::default();
        s.apply(&BTreeMap::new(), Some(&scope), &|_| None, &mut dp, &mut r);
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(1).addr]));
        assert_eq!(programmed(&dp.mem, "2001:2:ff::2"), None);
        assert_eq!(dp.mem.backends6.len(), 1);
    }

    /// After a restart the maps are adopted: ids are kept, nothing is rewritten, and what nobody
    /// wants is removed by the full sync.
    #[test]
    fn adopts_the_programmed_maps() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let d = desired(&[("a", "2001:2:ff::1", &[1, 2])]);
        run(&mut s, &mut dp, &d);
        let id = s.service_id(&spn("a")).unwrap();
        // A leftover frontend of an older agent.
        let stale = fe("2001:2:ff::9").key(0);
        dp.mem.services6.insert(stale, Service6Value { svc_id: 77, ..Default::default() });
        let mut s = Syncer6::adopt(&dp).unwrap();
        dp.calls.clear();
        run(&mut s, &mut dp, &d);
        assert_eq!(dp.calls, [(false, stale)], "only the stale entry is removed");
        assert!(!dp.mem.services6.contains_key(&stale));
        assert_eq!(s.service_id(&spn("a")), Some(id));
        // New backends get fresh ids.
        run(&mut s, &mut dp, &desired(&[("a", "2001:2:ff::1", &[1, 2, 3])]));
        assert_eq!(dp.mem.backends6.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    }

    /// A write failing in the middle of a port's update undoes the port's writes so far: its
    /// frontend keeps the old backends rather than a changed first slot beside the old count;
    /// the next sync completes the update.
    #[test]
    fn a_failed_port_update_is_undone() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let a = "2001:2:ff::1";
        run(&mut s, &mut dp, &desired(&[("a", a, &[1])]));
        // Room for the entry and one slot: the second slot of [2, 3] does not fit.
        dp.mem.services_capacity = Some(2);
        let r = run(&mut s, &mut dp, &desired(&[("a", a, &[2, 3])]));
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert_eq!(programmed(&dp.mem, a), Some(vec![be(1).addr]), "the old state, whole");
        assert_eq!(dp.mem.services6.len(), 2, "{:?}", dp.mem.services6.keys());
        dp.mem.services_capacity = None;
        let r = run(&mut s, &mut dp, &desired(&[("a", a, &[2, 3])]));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(programmed(&dp.mem, a), Some(vec![be(2).addr, be(3).addr]));
        assert_eq!(dp.mem.backends6.len(), 2, "backend 1 removed once no slot names it");
    }

    /// A full map fails the port with an error naming it; the others go on, and the next sync
    /// completes it.
    #[test]
    fn a_failed_port_keeps_the_others_and_is_completed_later() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        dp.mem.services_capacity = Some(3);
        let d = desired(&[("a", "2001:2:ff::1", &[1]), ("b", "2001:2:ff::2", &[2, 3])]);
        let r = run(&mut s, &mut dp, &d);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let msg = r.errors[0].to_string();
        assert!(msg.contains("default/b:http/TCP (IPv6)") && msg.contains("kp_svc6"), "{msg}");
        assert!(r.errors[0].is_datapath_failure());
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(1).addr]));
        assert_eq!(programmed(&dp.mem, "2001:2:ff::2"), None);
        dp.mem.services_capacity = None;
        let r = run(&mut s, &mut dp, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(programmed(&dp.mem, "2001:2:ff::2"), Some(vec![be(2).addr, be(3).addr]));
    }

    /// One frontend, one owner: the second port asking for it is refused (named in the error)
    /// until the first lets it go.
    #[test]
    fn a_held_frontend_is_refused_to_another_port() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        run(&mut s, &mut dp, &desired(&[("a", "2001:2:ff::1", &[1])]));
        let d = desired(&[("a", "2001:2:ff::1", &[1]), ("b", "2001:2:ff::1", &[2])]);
        let r = run(&mut s, &mut dp, &d);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(r.errors[0].to_string().contains("held by default/a:http/TCP"), "{}", r.errors[0]);
        assert!(!r.errors[0].is_datapath_failure());
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(1).addr]));
        // Reported once per change of the refused port: the next syncs try again silently.
        let r = run(&mut s, &mut dp, &d);
        assert!(r.errors.is_empty(), "reported again: {:?}", r.errors);
        let changed = desired(&[("a", "2001:2:ff::1", &[1]), ("b", "2001:2:ff::1", &[3])]);
        let r = run(&mut s, &mut dp, &changed);
        assert_eq!(r.errors.len(), 1, "a changed port is reported: {:?}", r.errors);
        let r = run(&mut s, &mut dp, &changed);
        assert!(r.errors.is_empty(), "reported again: {:?}", r.errors);
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(1).addr]));
        let r = run(&mut s, &mut dp, &desired(&[("b", "2001:2:ff::1", &[2])]));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(programmed(&dp.mem, "2001:2:ff::1"), Some(vec![be(2).addr]));
        assert_eq!(dp.mem.backends6.len(), 1);
    }

    /// Through the agent's entry point: a dual-stack service from the model programs both
    /// families' maps, and the IPv6 node configuration carries the source NAT address.
    #[test]
    fn dual_stack_service_programs_both_families() {
        let svc: k8s_openapi::api::core::v1::Service = serde_saphyr::from_str(
            r#"
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIPs: [198.19.0.10, "2001:2:ff::10"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
"#,
        )
        .unwrap();
        let slice = |fam: &str, addr: &str| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_saphyr::from_str(&format!(
                "metadata: {{name: web-{fam}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {fam}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{addr}\"]}}]\n"
            ))
            .unwrap()
        };
        let node = NodeInfo {
            name: "node-0".into(),
            addrs: vec![std::net::Ipv4Addr::new(198, 18, 0, 10)],
            addrs6: vec![ip("2001:2:0:1::10")],
            zone: None,
        };
        let out = build(
            &[svc],
            &[slice("IPv4", "198.18.100.10"), slice("IPv6", "2001:2:100::10")],
            &node,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let mut syncer = crate::sync::Syncer::new();
        syncer.set_node_addrs6(&node.addrs6);
        let mut mem = MemDataplane::default();
        let r = syncer.sync(&out.state, &mut mem);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(mem.config6.snat_addr, to_addr6(ip("2001:2:0:1::10")));
        assert_eq!(programmed(&mem, "2001:2:ff::10"), Some(vec![ip("2001:2:100::10")]));
        let np = Frontend6 { port: 30080, scope: scope::EXTERNAL, ..fe("2001:2:0:1::10") };
        assert_eq!(mem.services6[&np.key(0)].flags, svc_flags::NODE_PORT);
        // 3 IPv6 frontends (ClusterIP, NodePort in both scopes) with a slot each.
        assert_eq!((mem.services6.len(), mem.backends6.len()), (6, 1));
        assert_eq!((mem.services.len(), mem.backends.len()), (6, 1));
        assert_eq!(syncer.v6().programmed_frontends(), 3);
        // One service id per service port, whatever the family.
        let name = spn("web");
        assert_eq!(syncer.v6().service_id(&name), syncer.service_id(&name));
        assert!(syncer.service_id(&name).is_some());
        // With IPv6 off (`--enable-ipv6` not given) an agent adopting these maps removes the
        // IPv6 side and keeps the IPv4 one.
        let mut syncer = crate::sync::Syncer::adopt(&mem).unwrap();
        syncer.set_ipv6(false);
        let r = syncer.sync(&out.state, &mut mem);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(mem.services6.is_empty() && mem.backends6.is_empty());
        assert_eq!((mem.services.len(), mem.backends.len()), (6, 1));
    }

    /// A UDP port of `udp` (2001:2:ff::53:53) whose endpoints are the hosts of `all`, serving
    /// when also in `serving`; the slots hold the serving ones.
    fn udp_port(all: &[u8], serving: &[u8]) -> (ServicePortName, PortState6) {
        let b = |n: &u8| Backend6 { proto: proto::UDP, port: 5353, ..be(*n) };
        let backends: Vec<Backend6> = serving.iter().map(b).collect();
        let mut st = PortState6 {
            endpoints: all.iter().map(b).collect(),
            udp_serving: serving.iter().map(|n| (b(n).addr, 5353)).collect(),
            ..Default::default()
        };
        let f = Frontend6 { port: 53, proto: proto::UDP, ..fe("2001:2:ff::53") };
        st.frontends.insert(
            f,
            FrontendEntry6 { flags: svc_flags::CLUSTER_IP, affinity_timeout: 0, backends },
        );
        (ServicePortName { port: "dns".into(), proto: proto::UDP, ..spn("udp") }, st)
    }

    /// As the IPv4 syncer: the first sync hands every UDP port to the reconciler, later ones
    /// only the ports whose serving set lost a member (not with none left); TCP ports never.
    #[test]
    fn udp_ports_that_lose_a_serving_backend_are_handed_to_the_reconciler() {
        let (mut s, mut dp) = (Syncer6::new(), Checked6::default());
        let sync = |s: &mut Syncer6, dp: &mut Checked6, all: &[u8], serving: &[u8]| {
            let mut d = desired(&[("tcp", "2001:2:ff::1", &[1, 2])]);
            let (name, st) = udp_port(all, serving);
            d.insert(name, st);
            let r = run(s, dp, &d);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert!(r.udp_reconcile.is_empty(), "nothing for IPv4");
            r.udp_reconcile6
        };
        let hosts = |u: &crate::sync::UdpServing<Addr6>| {
            let mut v: Vec<u8> = u
                .serving
                .iter()
                .map(|(a, p)| {
                    assert_eq!(u16::from_be(*p), 5353);
                    from_addr6(a).octets()[15]
                })
                .collect();
            v.sort();
            v
        };
        let first = sync(&mut s, &mut dp, &[10, 11], &[10, 11]);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].svc_id >= V6_ONLY_IDS, "the port's own id: {first:?}");
        assert_eq!(hosts(&first[0]), [0x10, 0x11], "2001:2:100::10 and ::11");
        let id = first[0].svc_id;
        assert!(sync(&mut s, &mut dp, &[10, 11], &[10, 11]).is_empty(), "nothing changed");
        assert!(sync(&mut s, &mut dp, &[10, 11, 12], &[10, 11, 12]).is_empty(), "a backend added");
        // 11 stops serving (still an endpoint, so still a backend).
        let r = sync(&mut s, &mut dp, &[10, 11, 12], &[10, 12]);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].svc_id, hosts(&r[0])), (id, vec![0x10, 0x12]));
        assert!(dp.mem.backends6.len() >= 4, "the not-serving backend stays for TCP");
        // Nothing serving: flows are left alone.
        assert!(sync(&mut s, &mut dp, &[10, 11], &[]).is_empty());
        let r = sync(&mut s, &mut dp, &[10, 11], &[10]);
        assert!(r.is_empty(), "{r:?}: nothing lost against the empty set");
        // A port that went away and comes back is new again, but not a first sync.
        run(&mut s, &mut dp, &BTreeMap::new());
        let (name, st) = udp_port(&[10], &[10]);
        let r = run(&mut s, &mut dp, &BTreeMap::from([(name, st)]));
        assert!(r.udp_reconcile6.is_empty(), "{:?}", r.udp_reconcile6);
    }
}
