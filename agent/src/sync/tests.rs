//! Sync tests against [`MemDataplane`], with a wrapper that checks after every single write that
//! the datapath never sees a half-written service.
use std::net::Ipv4Addr;

use kproxy_common::{proto, scope, svc_flags};

use super::*;
use crate::{
    dataplane::mem::{MemDataplane, MemOp},
    model::{Backend, FrontendEntry, ServiceName, ServicePortState},
};

/// A dataplane that records every call it is given (name and number of items) and checks, after
/// each single write (also inside a batch), that every service entry's slots exist and name
/// existing backends and that a restricted entry has its source ranges: what a packet could
/// observe at that moment.
#[derive(Default)]
struct Checked {
    mem: MemDataplane,
    violations: Vec<String>,
    /// Every write call, in order: (method, items).
    calls: Vec<(&'static str, usize)>,
}

impl Checked {
    fn check(&mut self, after: &str) {
        for (k, v) in self.mem.services.iter().filter(|(k, _)| k.slot == 0) {
            if v.flags & svc_flags::SOURCE_RANGES != 0
                && !self.mem.source_ranges.iter().any(|r| r.svc_id == v.svc_id)
            {
                self.violations
                    .push(format!("after {after}: {k:?} restricted but its ranges are missing"));
            }
            for slot in 1..=v.count {
                match self.mem.services.get(&Service4Key { slot, ..*k }) {
                    None => {
                        self.violations.push(format!("after {after}: {k:?} slot {slot} missing"))
                    }
                    Some(s) if !self.mem.backends.contains_key(&s.backend_id) => {
                        self.violations.push(format!(
                            "after {after}: {k:?} slot {slot} names missing backend {}",
                            s.backend_id
                        ))
                    }
                    _ => {}
                }
            }
        }
    }

    /// One write of `what` to the in-memory maps, checked after it.
    fn write<R>(&mut self, what: &str, f: impl FnOnce(&mut MemDataplane) -> R) -> R {
        let r = f(&mut self.mem);
        self.check(what);
        r
    }

    /// A batch call: recorded once, its items written one by one, each checked.
    fn batch<T>(
        &mut self,
        what: &'static str,
        items: &[T],
        mut f: impl FnMut(&mut MemDataplane, &T) -> Result<(), DataplaneError>,
    ) -> Result<(), BatchError> {
        self.calls.push((what, items.len()));
        for (done, item) in items.iter().enumerate() {
            self.write(what, |m| f(m, item)).map_err(|error| BatchError { done, error })?;
        }
        Ok(())
    }

    /// A batch call of a map the in-memory dataplane writes in one call: recorded, then checked.
    fn whole<T>(
        &mut self,
        what: &'static str,
        items: &[T],
        f: impl FnOnce(&mut MemDataplane, &[T]) -> Result<(), BatchError>,
    ) -> Result<(), BatchError> {
        self.calls.push((what, items.len()));
        self.write(what, |m| f(m, items))
    }
}

impl Dataplane for Checked {
    fn set_config(&mut self, cfg: &kproxy_common::NodeConfig) -> Result<(), DataplaneError> {
        self.mem.set_config(cfg)
    }
    fn put_backend(&mut self, id: u32, b: &Backend4) -> Result<(), DataplaneError> {
        self.calls.push(("put_backend", 1));
        self.write("put_backend", |m| m.put_backend(id, b))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.calls.push(("delete_backend", 1));
        self.write("delete_backend", |m| m.delete_backend(id))
    }
    fn put_service(&mut self, k: &Service4Key, v: &Service4Value) -> Result<(), DataplaneError> {
        self.calls.push(("put_service", 1));
        self.write("put_service", |m| m.put_service(k, v))
    }
    fn delete_service(&mut self, k: &Service4Key) -> Result<(), DataplaneError> {
        self.calls.push(("delete_service", 1));
        self.write("delete_service", |m| m.delete_service(k))
    }
    fn put_backends(&mut self, items: &[(u32, Backend4)]) -> Result<(), BatchError> {
        self.batch("put_backends", items, |m, (id, b)| m.put_backend(*id, b))
    }
    fn delete_backends(&mut self, ids: &[u32]) -> Result<(), BatchError> {
        self.batch("delete_backends", ids, |m, id| m.delete_backend(*id))
    }
    fn put_services(&mut self, items: &[(Service4Key, Service4Value)]) -> Result<(), BatchError> {
        self.batch("put_services", items, |m, (k, v)| m.put_service(k, v))
    }
    fn delete_services(&mut self, keys: &[Service4Key]) -> Result<(), BatchError> {
        self.batch("delete_services", keys, |m, k| m.delete_service(k))
    }
    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>, DataplaneError> {
        self.mem.services()
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError> {
        self.mem.backends()
    }
    fn put_source_ranges(&mut self, k: &[crate::dataplane::SourceRange]) -> Result<(), BatchError> {
        self.whole("put_source_ranges", k, MemDataplane::put_source_ranges)
    }
    fn delete_source_ranges(
        &mut self,
        k: &[crate::dataplane::SourceRange],
    ) -> Result<(), BatchError> {
        self.whole("delete_source_ranges", k, MemDataplane::delete_source_ranges)
    }
    fn source_ranges(&self) -> Result<Vec<crate::dataplane::SourceRange>, DataplaneError> {
        self.mem.source_ranges()
    }
    fn put_service_addrs(&mut self, a: &[u32]) -> Result<(), BatchError> {
        self.whole("put_service_addrs", a, MemDataplane::put_service_addrs)
    }
    fn delete_service_addrs(&mut self, a: &[u32]) -> Result<(), BatchError> {
        self.whole("delete_service_addrs", a, MemDataplane::delete_service_addrs)
    }
    fn service_addrs(&self) -> Result<Vec<u32>, DataplaneError> {
        self.mem.service_addrs()
    }
    fn set_service_cidrs(
        &mut self,
        c: &kproxy_common::ServiceCidrs4,
    ) -> Result<(), DataplaneError> {
        self.mem.set_service_cidrs(c)
    }
}

fn spn(name: &str) -> ServicePortName {
    ServicePortName {
        service: ServiceName { namespace: "default".into(), name: name.into() },
        port: "http".into(),
        proto: proto::TCP,
    }
}

fn be(host: u8) -> Backend {
    Backend { addr: Ipv4Addr::new(198, 18, 100, host), port: 8080, proto: proto::TCP, flags: 0 }
}

fn cip(n: u8) -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(198, 19, 0, n),
        port: 80,
        proto: proto::TCP,
        scope: scope::INTERNAL,
    }
}

/// A desired state: services named `svc{n}` with ClusterIP 198.19.0.n and the given backends.
fn desired(services: &[(u8, &[u8])]) -> DesiredState {
    let mut d = DesiredState::default();
    for (n, hosts) in services {
        let backends: Vec<Backend> = hosts.iter().map(|h| be(*h)).collect();
        let mut s = ServicePortState::default();
        s.endpoints.extend(backends.iter().copied());
        s.frontends.insert(
            cip(*n),
            FrontendEntry { flags: svc_flags::CLUSTER_IP, affinity_timeout: 0, backends },
        );
        d.services.insert(spn(&format!("svc{n}")), s);
    }
    d
}

/// Backend hosts (last octet) of a programmed frontend, in slot order.
fn programmed(mem: &MemDataplane, f: &Frontend) -> Option<Vec<u8>> {
    let entry = mem.services.get(&key_of(f, 0))?;
    Some(
        (1..=entry.count)
            .map(|slot| {
                let s = mem.services[&key_of(f, slot)];
                Ipv4Addr::from(u32::from_be(mem.backends[&s.backend_id].addr)).octets()[3]
            })
            .collect(),
    )
}

#[test]
fn first_sync_writes_backends_then_slots_then_entry() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let r = s.sync(&desired(&[(1, &[10, 11, 12]), (2, &[11, 13])]), &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 11, 12]));
    assert_eq!(programmed(&dp.mem, &cip(2)), Some(vec![11, 13]));
    // Backend 198.18.100.11:8080 is shared: 4 distinct backends.
    assert_eq!(dp.mem.backends.len(), 4);
    // Phase by phase over both services: the 4 backends, the 5 slots, the 2 entries, then the
    // two ClusterIPs as closed service addresses.
    let ops = &dp.mem.ops;
    assert_eq!(ops.len(), 13, "{ops:?}");
    assert!(ops[..4].iter().all(|o| matches!(o, MemOp::PutBackend(_))), "{ops:?}");
    assert!(ops[4..9].iter().all(|o| matches!(o, MemOp::PutService(k) if k.slot != 0)));
    assert_eq!(
        ops[9..],
        [
            MemOp::PutService(key_of(&cip(1), 0)),
            MemOp::PutService(key_of(&cip(2), 0)),
            MemOp::PutServiceAddr(key_of(&cip(1), 0).addr),
            MemOp::PutServiceAddr(key_of(&cip(2), 0).addr),
        ]
    );
    // Same service id on the entry and its slots, different between services.
    let id1 = dp.mem.services[&key_of(&cip(1), 0)].svc_id;
    let id2 = dp.mem.services[&key_of(&cip(2), 0)].svc_id;
    assert_ne!(id1, id2);
    assert_eq!(dp.mem.services[&key_of(&cip(1), 2)].svc_id, id1);
    assert_eq!(s.programmed_frontends(), 2);
    assert_eq!(s.programmed_backends(), 4);
}

/// A from-scratch sync of more ports than a round holds writes them round by round (each
/// round's backends, slots, then entries), so that the plans of all ports never exist at once;
/// every port is still written in the order that never shows a half-written service, and all
/// are programmed.
#[test]
fn large_first_sync_is_written_in_rounds() {
    let n = 2 * ROUND_PORTS + 10;
    let nth = |base: Ipv4Addr, i: usize| Ipv4Addr::from(u32::from(base) + i as u32);
    let mut d = DesiredState::default();
    for i in 0..n {
        let f = Frontend { addr: nth(Ipv4Addr::new(198, 19, 0, 0), i), ..cip(0) };
        let b = Backend { addr: nth(Ipv4Addr::new(198, 18, 0, 0), i), ..be(0) };
        let mut s = ServicePortState::default();
        s.endpoints.insert(b);
        s.frontends.insert(
            f,
            FrontendEntry { flags: svc_flags::CLUSTER_IP, affinity_timeout: 0, backends: vec![b] },
        );
        d.services.insert(spn(&format!("svc{i}")), s);
    }
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new();
    let r = s.sync(&d, &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((s.programmed_frontends(), s.programmed_backends()), (n, n));
    assert_eq!((dp.services.len(), dp.backends.len()), (2 * n, n));
    // Three rounds: a backend write follows a service write twice.
    let ops = &dp.ops;
    let rounds = 1 + ops
        .windows(2)
        .filter(|w| matches!(w, [MemOp::PutService(_), MemOp::PutBackend(_)]))
        .count();
    assert_eq!(rounds, 3);
    // Per port: its backend, then its slot, then its entry.
    let mut backend_at = HashMap::new();
    let mut key_at = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            MemOp::PutBackend(id) => backend_at.insert(*id, i),
            MemOp::PutService(k) => key_at.insert(*k, i),
            _ => None,
        };
    }
    for k in dp.services.keys().filter(|k| k.slot == 0) {
        let slot = Service4Key { slot: 1, ..*k };
        let backend = dp.services[&slot].backend_id;
        assert!(backend_at[&backend] < key_at[&slot], "{k:?}");
        assert!(key_at[&slot] < key_at[k], "{k:?}");
    }
}

/// A UDP port `dns` of service `svc1` (ClusterIP 198.19.0.1:53) whose endpoints are the hosts
/// of `all`, serving when also in `serving`; the backends in the slots are the serving ones.
fn udp_state(all: &[u8], serving: &[u8]) -> (ServicePortName, ServicePortState) {
    let b = |h: &u8| Backend { proto: proto::UDP, port: 5353, ..be(*h) };
    let mut s = ServicePortState::default();
    s.endpoints.extend(all.iter().map(b));
    s.udp_serving.extend(serving.iter().map(|h| (b(h).addr, 5353)));
    s.frontends.insert(
        Frontend { port: 53, proto: proto::UDP, ..cip(1) },
        FrontendEntry {
            flags: svc_flags::CLUSTER_IP,
            affinity_timeout: 0,
            backends: serving.iter().map(b).collect(),
        },
    );
    (ServicePortName { port: "dns".into(), proto: proto::UDP, ..spn("svc1") }, s)
}

#[test]
fn udp_ports_that_lose_a_serving_backend_are_handed_to_the_reconciler() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let sync = |s: &mut Syncer, dp: &mut Checked, all: &[u8], serving: &[u8]| {
        let (name, st) = udp_state(all, serving);
        let mut d = desired(&[(2, &[10, 11])]);
        d.services.insert(name, st);
        let r = s.sync(&d, dp);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        r.udp_reconcile
    };
    let hosts = |u: &UdpServing| {
        let mut v: Vec<u8> = u
            .serving
            .iter()
            .map(|(a, p)| {
                assert_eq!(u16::from_be(*p), 5353);
                Ipv4Addr::from(u32::from_be(*a)).octets()[3]
            })
            .collect();
        v.sort();
        v
    };
    // The first sync (maybe after a restart) checks every UDP port; TCP ports never.
    let first = sync(&mut s, &mut dp, &[10, 11], &[10, 11]);
    assert_eq!(first.len(), 1, "{first:?}");
    let id = first[0].svc_id;
    assert_eq!(
        dp.mem.services[&key_of(&Frontend { port: 53, proto: proto::UDP, ..cip(1) }, 0)].svc_id,
        id
    );
    assert_eq!(hosts(&first[0]), [10, 11]);
    // Nothing changed, or a backend added: nothing to reconcile.
    assert!(sync(&mut s, &mut dp, &[10, 11], &[10, 11]).is_empty());
    assert!(sync(&mut s, &mut dp, &[10, 11, 12], &[10, 11, 12]).is_empty());
    // 11 stops serving (still an endpoint, so still a backend): its UDP flows must move.
    let r = sync(&mut s, &mut dp, &[10, 11, 12], &[10, 12]);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].svc_id, hosts(&r[0])), (id, vec![10, 12]));
    assert!(dp.mem.backends.len() >= 3, "the not-serving backend stays for TCP");
    // 12 removed altogether.
    let r = sync(&mut s, &mut dp, &[10, 11], &[10]);
    assert_eq!(hosts(&r[0]), [10]);
    // No serving endpoint left: flows are left alone (kube-proxy's rule).
    assert!(sync(&mut s, &mut dp, &[10, 11], &[]).is_empty());
    // A new syncer (a restart adopting the maps) checks every UDP port again.
    let mut s2 = Syncer::adopt(&dp).unwrap();
    let r = sync(&mut s2, &mut dp, &[10, 11], &[11]);
    assert_eq!((r[0].svc_id, hosts(&r[0])), (id, vec![11]));
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let d = desired(&[(1, &[10, 11]), (2, &[12])]);
    s.sync(&d, &mut dp);
    dp.mem.ops.clear();
    let r = s.sync(&d, &mut dp);
    assert_eq!(r.writes, 0);
    assert!(dp.mem.ops.is_empty(), "{:?}", dp.mem.ops);
}

#[test]
fn one_added_endpoint_costs_three_writes() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 12, 13]), (2, &[12])]), &mut dp);
    dp.mem.ops.clear();
    // 11 sorts before 12 and 13 in the model's order: the slots must not shift.
    let r = s.sync(&desired(&[(1, &[10, 11, 12, 13]), (2, &[12])]), &mut dp);
    assert!(r.errors.is_empty());
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    let new_id = match dp.mem.ops[0] {
        MemOp::PutBackend(id) => id,
        ref o => panic!("first op {o:?}"),
    };
    assert_eq!(
        dp.mem.ops,
        [
            MemOp::PutBackend(new_id),
            MemOp::PutService(key_of(&cip(1), 4)),
            MemOp::PutService(key_of(&cip(1), 0)),
        ]
    );
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 12, 13, 11]));
}

#[test]
fn one_removed_endpoint_shrinks_entry_before_deleting() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11, 12, 13])]), &mut dp);
    let removed_id = dp.mem.services[&key_of(&cip(1), 2)].backend_id;
    dp.mem.ops.clear();
    let r = s.sync(&desired(&[(1, &[10, 12, 13])]), &mut dp);
    assert!(r.errors.is_empty());
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    // Slot 2 gets the last backend, count shrinks, slot 4 goes, then the backend.
    assert_eq!(
        dp.mem.ops,
        [
            MemOp::PutService(key_of(&cip(1), 2)),
            MemOp::PutService(key_of(&cip(1), 0)),
            MemOp::DeleteService(key_of(&cip(1), 4)),
            MemOp::DeleteBackend(removed_id),
        ]
    );
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 13, 12]));
    // The same endpoint coming back gets the lowest free id, its old one (ids stay dense; the
    // datapath compares a connection's backend address with the id's on every id change).
    s.sync(&desired(&[(1, &[10, 11, 12, 13])]), &mut dp);
    assert_eq!(dp.mem.backends.len(), 4);
    assert_eq!(Ipv4Addr::from(u32::from_be(dp.mem.backends[&removed_id].addr)).octets()[3], 11);
}

#[test]
fn freed_backend_ids_are_reused_lowest_first() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let mut highest = 0;
    for round in 0..20u8 {
        // Replace all backends every round: the new ones are written before the old ones go, so
        // two sets of ids alternate.
        let hosts = [round * 2 + 10, round * 2 + 11];
        s.sync(&desired(&[(1, &hosts)]), &mut dp);
        assert!(dp.violations.is_empty(), "{:?}", dp.violations);
        assert_eq!(programmed(&dp.mem, &cip(1)), Some(hosts.to_vec()));
        assert_eq!(dp.mem.backends.len(), 2);
        highest = highest.max(*dp.mem.backends.keys().max().unwrap());
    }
    assert_eq!(highest, 4, "ids beyond the two sets in flux");
    // A wider gap is refilled from its lowest id.
    s.sync(&desired(&[(1, &[100, 101, 102, 103, 104, 105])]), &mut dp);
    let mut ids: Vec<u32> = dp.mem.backends.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 5, 6, 7, 8], "the two old ids (3, 4) were still held while writing");
}

#[test]
fn adopted_sparse_ids_stay_apart_and_new_ids_fill_from_the_lowest() {
    let mut dp = Checked::default();
    // A map written by an agent that handed out ids in increasing order: one far id.
    let far = 3_000_000;
    let b = |h: u8| Backend4 {
        addr: u32::from(Ipv4Addr::new(198, 18, 100, h)).to_be(),
        port: 8080u16.to_be(),
        proto: proto::TCP,
        flags: 0,
    };
    dp.mem.backends.insert(2, b(10));
    dp.mem.backends.insert(far, b(11));
    let mut s = Syncer::adopt(&dp).unwrap();
    assert!(s.shadow.backends.dense.len() < 10, "a far id is not held densely");
    s.sync(&desired(&[(1, &[10, 11, 12])]), &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 11, 12]));
    let mut ids: Vec<u32> = dp.mem.backends.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, far], "the new backend takes id 1");
    // The far id goes when its backend does, and is not handed out again.
    s.sync(&desired(&[(1, &[10, 12])]), &mut dp);
    s.sync(&desired(&[(1, &[10, 12, 13])]), &mut dp);
    let mut ids: Vec<u32> = dp.mem.backends.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3]);
    // An id too large for a port's record to pack its flags with: the key gets a new id.
    let mut dp = Checked::default();
    dp.mem.backends.insert(ID_LIMIT + 5, b(10));
    let mut s = Syncer::adopt(&dp).unwrap();
    let mut d = desired(&[(1, &[10])]);
    flag_backend(&mut d, 1, 10, backend_flags::LOCAL | backend_flags::TERMINATING);
    s.sync(&d, &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(dp.mem.backends.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(dp.mem.backends[&1].flags, backend_flags::LOCAL | backend_flags::TERMINATING);
}

/// `desired` with service `n`'s frontend restricted to `ranges` (None: unrestricted).
fn restricted(n: u8, ranges: &[(Ipv4Addr, u8)]) -> DesiredState {
    let mut d = desired(&[(n, &[10]), (n + 1, &[11])]);
    let s = d.services.get_mut(&spn(&format!("svc{n}"))).unwrap();
    s.source_ranges = ranges.iter().copied().collect();
    if !ranges.is_empty() {
        s.frontends.get_mut(&cip(n)).unwrap().flags |= svc_flags::SOURCE_RANGES;
    }
    d
}

#[test]
fn source_ranges_come_before_the_restricted_entry_and_go_after_it() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let a = (Ipv4Addr::new(198, 18, 0, 0), 24);
    let b = (Ipv4Addr::new(198, 18, 5, 0), 30);
    let r = s.sync(&restricted(1, &[a, b]), &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // The checker saw no restricted entry without its ranges at any write.
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    let id = dp.mem.services[&key_of(&cip(1), 0)].svc_id;
    let range = |(addr, len): (Ipv4Addr, u8)| SourceRange {
        svc_id: id,
        addr: u32::from(addr).to_be(),
        len,
    };
    assert_eq!(dp.mem.source_ranges, BTreeSet::from([range(a), range(b)]));
    let entry_at =
        |ops: &[MemOp]| ops.iter().position(|o| *o == MemOp::PutService(key_of(&cip(1), 0)));
    let first_range = dp.mem.ops.iter().position(|o| matches!(o, MemOp::PutSourceRange(_)));
    assert!(first_range < entry_at(&dp.mem.ops), "{:?}", dp.mem.ops);
    // One range less: only it goes.
    dp.mem.ops.clear();
    s.sync(&restricted(1, &[a]), &mut dp);
    assert_eq!(dp.mem.ops, [MemOp::DeleteSourceRange(range(b))]);
    // Unrestricted: the entry loses its flag first, then the range goes.
    dp.mem.ops.clear();
    s.sync(&restricted(1, &[]), &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(dp.mem.ops.last(), Some(&MemOp::DeleteSourceRange(range(a))), "{:?}", dp.mem.ops);
    assert!(dp.mem.source_ranges.is_empty());
    // Restricted again, then the service goes: its ranges go after its entry.
    s.sync(&restricted(1, &[a]), &mut dp);
    dp.mem.ops.clear();
    s.sync(&desired(&[(2, &[11])]), &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert!(dp.mem.source_ranges.is_empty(), "{:?}", dp.mem.ops);
    let gone = dp.mem.ops.iter().position(|o| *o == MemOp::DeleteService(key_of(&cip(1), 0)));
    let range_gone = dp.mem.ops.iter().position(|o| matches!(o, MemOp::DeleteSourceRange(_)));
    assert!(gone < range_gone, "{:?}", dp.mem.ops);
    // A restarted agent reads the ranges back and removes the stale ones on its first sync.
    s.sync(&restricted(1, &[a, b]), &mut dp);
    let mut s2 = Syncer::adopt(&dp).unwrap();
    s2.sync(&restricted(1, &[b]), &mut dp);
    assert_eq!(dp.mem.source_ranges.len(), 1, "{:?}", dp.mem.source_ranges);
}

#[test]
fn removed_service_goes_entry_first_then_slots_then_backends() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11]), (2, &[11, 12])]), &mut dp);
    dp.mem.ops.clear();
    let r = s.sync(&desired(&[(2, &[11, 12])]), &mut dp);
    assert!(r.errors.is_empty());
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(r.frontends_removed, 1);
    assert_eq!(r.backends_removed, 1, "only .10 is unused; .11 is shared");
    let ops = &dp.mem.ops;
    assert_eq!(ops[0], MemOp::DeleteService(key_of(&cip(1), 0)));
    assert_eq!(ops[1], MemOp::DeleteService(key_of(&cip(1), 2)));
    assert_eq!(ops[2], MemOp::DeleteService(key_of(&cip(1), 1)));
    // The ClusterIP is no service address any more, after its entries.
    assert_eq!(ops[3], MemOp::DeleteServiceAddr(key_of(&cip(1), 0).addr));
    assert!(matches!(ops[4], MemOp::DeleteBackend(_)));
    assert_eq!(ops.len(), 5);
    assert_eq!(dp.mem.service_addrs, BTreeSet::from([key_of(&cip(2), 0).addr]));
    assert_eq!(programmed(&dp.mem, &cip(1)), None);
    assert_eq!(dp.mem.services.len(), 3);
}

#[test]
fn terminating_endpoints_keep_their_backend_outside_the_slots() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11])]), &mut dp);
    // .11 still listed as an endpoint (terminating) but no longer balanced to.
    let mut d = desired(&[(1, &[10])]);
    d.services.values_mut().next().unwrap().endpoints.insert(be(11));
    s.sync(&d, &mut dp);
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10]));
    assert_eq!(dp.mem.backends.len(), 2);
    // Once gone from the slice, the backend goes.
    s.sync(&desired(&[(1, &[10])]), &mut dp);
    assert_eq!(dp.mem.backends.len(), 1);
}

#[test]
fn map_full_keeps_the_previous_state_and_names_the_service() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11]), (2, &[12])]), &mut dp);
    // 3 + 2 entries programmed; room for 2 more.
    dp.mem.services_capacity = Some(7);
    let before = dp.mem.clone();
    // svc1 grows by 3 (does not fit), svc3 is new with one backend (fits: 2 entries).
    let r = s.sync(&desired(&[(1, &[10, 11, 13, 14, 15]), (2, &[12]), (3, &[16])]), &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    let msg = r.errors[0].to_string();
    assert!(msg.contains("default/svc1:http/TCP") && msg.contains("full"), "{msg}");
    assert_eq!(r.errors[0].kind(), "map_full");
    // svc1 exactly as before, its would-be backends gone again.
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 11]));
    for slot in 0..=2 {
        let k = key_of(&cip(1), slot);
        assert_eq!(dp.mem.services.get(&k), before.services.get(&k));
    }
    assert_eq!(programmed(&dp.mem, &cip(3)), Some(vec![16]));
    assert_eq!(dp.mem.backends.len(), 4);
    // A new service that does not fit is not added at all.
    let r =
        s.sync(&desired(&[(1, &[10, 11]), (2, &[12]), (3, &[16]), (4, &[17, 18, 19])]), &mut dp);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].to_string().contains("svc4"));
    assert_eq!(programmed(&dp.mem, &cip(4)), None);
    assert!(!dp.mem.services.keys().any(|k| k.addr == key_of(&cip(4), 0).addr));
    // The shadow agrees with the map: when room appears, the next sync completes it.
    dp.mem.services_capacity = None;
    let r =
        s.sync(&desired(&[(1, &[10, 11]), (2, &[12]), (3, &[16]), (4, &[17, 18, 19])]), &mut dp);
    assert!(r.errors.is_empty());
    assert_eq!(programmed(&dp.mem, &cip(4)), Some(vec![17, 18, 19]));
}

#[test]
fn backends_map_full_rolls_back() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10])]), &mut dp);
    dp.mem.backends_capacity = Some(2);
    let r = s.sync(&desired(&[(1, &[10, 11, 12])]), &mut dp);
    assert_eq!(r.errors.len(), 1);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10]));
    assert_eq!(dp.mem.backends.len(), 1);
}

/// A restart over maps of many services with dense backend ids holds every id in the shadow's
/// vector: none passes through the table of far ids (whose buckets stay allocated once it
/// empties: 11 MB at 300,000 backends).
#[test]
fn adopted_dense_ids_never_fill_the_far_id_table() {
    let mut dp = Checked::default();
    let (fronts, per) = (1_000u32, 10u32);
    for f in 0..fronts {
        let addr = u32::from(Ipv4Addr::new(198, 19, 0, 0)).wrapping_add(f).to_be();
        let k = |slot: u16| Service4Key {
            addr,
            port: 80u16.to_be(),
            proto: proto::TCP,
            scope: scope::INTERNAL,
            slot,
            _pad: 0,
        };
        let svc_id = f + 1;
        let entry = Service4Value {
            svc_id,
            count: per as u16,
            flags: svc_flags::CLUSTER_IP,
            ..Default::default()
        };
        dp.mem.services.insert(k(0), entry);
        for slot in 1..=per {
            let id = f * per + slot;
            dp.mem.services.insert(k(slot as u16), slot_value(id, svc_id));
            let host = u32::from(Ipv4Addr::new(198, 18, 128, 0)) + id;
            let b =
                Backend4 { addr: host.to_be(), port: 8080u16.to_be(), proto: proto::TCP, flags: 0 };
            dp.mem.backends.insert(id, b);
        }
    }
    assert!(fronts * per > ShadowBackends::DENSE_SLACK as u32, "more ids than the vector's slack");
    let s = Syncer::adopt(&dp).unwrap();
    let b = &s.shadow.backends;
    assert_eq!(b.sparse.capacity(), 0, "{} ids went through the far-id table", b.sparse.len());
    assert_eq!(s.programmed_backends(), (fronts * per) as usize);
    assert_eq!(s.programmed_service_entries(), dp.mem.services.len());
    assert!((1..=fronts * per).all(|id| b.referenced(id) && b.contains_key(&id)));
}

#[test]
fn restart_adopts_programmed_state_without_writes() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    // History that makes the slot order differ from the model order.
    s.sync(&desired(&[(1, &[10, 12]), (2, &[13])]), &mut dp);
    s.sync(&desired(&[(1, &[10, 11, 12]), (2, &[13])]), &mut dp);
    let d = desired(&[(1, &[10, 11, 12]), (2, &[13])]);
    let before = dp.mem.clone();
    let ids = (s.service_id(&spn("svc1")), s.service_id(&spn("svc2")));

    let mut restarted = Syncer::adopt(&dp).expect("adopt");
    dp.mem.ops.clear();
    let r = restarted.sync(&d, &mut dp);
    assert!(r.errors.is_empty());
    assert!(dp.mem.ops.is_empty(), "{:?}", dp.mem.ops);
    assert_eq!(dp.mem.services, before.services);
    assert_eq!((restarted.service_id(&spn("svc1")), restarted.service_id(&spn("svc2"))), ids);

    // A change after the restart reuses the adopted ids and allocates above them.
    let r = restarted.sync(&desired(&[(1, &[10, 11, 12, 14]), (2, &[13])]), &mut dp);
    assert!(r.errors.is_empty());
    assert_eq!(restarted.service_id(&spn("svc1")), ids.0);
    let max_before = *before.backends.keys().max().unwrap();
    let added: Vec<u32> =
        dp.mem.backends.keys().filter(|id| !before.backends.contains_key(id)).copied().collect();
    assert_eq!(added.len(), 1);
    assert!(added[0] > max_before);
    // Service removed by a restarted agent is cleaned up.
    let r = restarted.sync(&desired(&[(2, &[13])]), &mut dp);
    assert!(r.errors.is_empty());
    assert_eq!(programmed(&dp.mem, &cip(1)), None);
    assert_eq!(dp.mem.backends.len(), 1);
}

/// The count of service entries the syncer publishes for the map sampler is the services
/// map's, through growth, shrinking, removal, a restart and a crash's leftovers.
#[test]
fn programmed_service_entries_are_the_maps() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let same = |s: &Syncer, dp: &Checked, when: &str| {
        assert_eq!(s.programmed_service_entries(), dp.mem.services.len(), "{when}");
        assert_eq!(s.programmed_backends(), dp.mem.backends.len(), "{when}");
    };
    s.sync(&desired(&[(1, &[10, 11, 12]), (2, &[13])]), &mut dp);
    assert_eq!(dp.mem.services.len(), 6);
    same(&s, &dp, "first sync");
    s.sync(&desired(&[(1, &[10]), (2, &[13, 14, 15])]), &mut dp);
    same(&s, &dp, "one service shrunk, one grown");
    // Leftovers of a crash: a frontend and a slot nobody wants.
    let stale = key_of(&cip(9), 0);
    dp.mem.services.insert(stale, Service4Value { svc_id: 99, count: 1, ..Default::default() });
    let stale_slot = key_of(&cip(9), 1);
    dp.mem
        .services
        .insert(stale_slot, Service4Value { svc_id: 99, backend_id: 500, ..Default::default() });
    let mut s = Syncer::adopt(&dp).expect("adopt");
    same(&s, &dp, "adopted");
    s.sync(&desired(&[(2, &[13])]), &mut dp);
    assert!(!dp.mem.services.contains_key(&stale));
    same(&s, &dp, "leftovers and a service removed");
    s.sync(&desired(&[]), &mut dp);
    assert_eq!(s.programmed_service_entries(), 0);
    same(&s, &dp, "everything removed");
}

#[test]
fn restart_removes_orphans_left_by_a_crash() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11])]), &mut dp);
    // A crash mid-update left a slot above the count and a backend nothing uses.
    let orphan_slot = key_of(&cip(1), 3);
    dp.mem
        .services
        .insert(orphan_slot, Service4Value { backend_id: 99, svc_id: 1, ..Default::default() });
    dp.mem.backends.insert(99, be(99).to_map());
    let mut restarted = Syncer::adopt(&dp).expect("adopt");
    let r = restarted.sync(&desired(&[(1, &[10, 11])]), &mut dp);
    assert!(r.errors.is_empty());
    assert!(!dp.mem.services.contains_key(&orphan_slot));
    assert!(!dp.mem.backends.contains_key(&99));
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![10, 11]));
}

/// The shadow holds slots in half a value each, and values that are not kproxy's (fields besides
/// the backend and service id set, also with both ids zero) whole: a restarted agent sees them as
/// they are and rewrites them.
#[test]
fn restart_rewrites_slot_values_that_are_not_kproxys() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    let d = desired(&[(1, &[10, 11, 12])]);
    s.sync(&d, &mut dp);
    let before = dp.mem.clone();
    let (k1, k2, k3) = (key_of(&cip(1), 1), key_of(&cip(1), 2), key_of(&cip(1), 3));
    let odd1 = Service4Value { flags: 1, ..before.services[&k1] };
    let odd2 = Service4Value { backend_id: 0, svc_id: 0, count: 5, ..Default::default() };
    dp.mem.services.insert(k1, odd1);
    dp.mem.services.insert(k2, odd2);
    let mut restarted = Syncer::adopt(&dp).expect("adopt");
    assert_eq!(restarted.shadow.get(&k1), Some(odd1));
    assert_eq!(restarted.shadow.get(&k2), Some(odd2));
    assert_eq!(restarted.shadow.get(&k3), Some(before.services[&k3]));
    dp.mem.ops.clear();
    let r = restarted.sync(&d, &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(dp.mem.services, before.services, "both odd slots rewritten");
    assert_eq!(restarted.shadow.get(&k1), Some(before.services[&k1]));
    assert!(restarted.shadow.odd_slots.is_empty(), "{:?}", restarted.shadow.odd_slots);
    // Held as programmed now: nothing more to write.
    dp.mem.ops.clear();
    restarted.sync(&d, &mut dp);
    assert!(dp.mem.ops.is_empty(), "{:?}", dp.mem.ops);
}

#[test]
fn flag_changes_update_in_place() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10])]), &mut dp);
    let id = *dp.mem.backends.keys().next().unwrap();
    let mut d = desired(&[(1, &[10])]);
    let st = d.services.values_mut().next().unwrap();
    let e = st.frontends.values_mut().next().unwrap();
    e.flags |= svc_flags::AFFINITY;
    e.affinity_timeout = 30;
    e.backends[0].flags = backend_flags::TERMINATING;
    st.endpoints = e.backends.iter().copied().collect();
    dp.mem.ops.clear();
    s.sync(&d, &mut dp);
    assert_eq!(dp.mem.ops, [MemOp::PutBackend(id), MemOp::PutService(key_of(&cip(1), 0))]);
    assert_eq!(dp.mem.backends[&id].flags, backend_flags::TERMINATING);
    assert_eq!(dp.mem.services[&key_of(&cip(1), 0)].affinity_timeout, 30);
}

/// Sets `flags` on backend host `h` in every copy service `n` of `d` holds.
fn flag_backend(d: &mut DesiredState, n: u8, h: u8, flags: u8) {
    let st = d.services.get_mut(&spn(&format!("svc{n}"))).unwrap();
    for e in st.frontends.values_mut() {
        e.backends.iter_mut().filter(|b| b.addr == be(h).addr).for_each(|b| b.flags = flags);
    }
    st.endpoints = st
        .endpoints
        .iter()
        .map(|b| if b.addr == be(h).addr { Backend { flags, ..*b } } else { *b })
        .collect();
}

#[test]
fn a_shared_backend_is_local_if_any_port_says_so_and_terminating_if_all_do() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10]), (2, &[10])]), &mut dp);
    let id = *dp.mem.backends.keys().next().unwrap();
    assert_eq!(dp.mem.backends.len(), 1, "one backend shared by both ports");
    let flags_now = |s: &mut Syncer, dp: &mut Checked, d: &DesiredState| {
        let r = s.sync(d, dp);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        dp.mem.backends[&id].flags
    };
    let mut d = desired(&[(1, &[10]), (2, &[10])]);
    flag_backend(&mut d, 1, 10, backend_flags::LOCAL | backend_flags::TERMINATING);
    assert_eq!(flags_now(&mut s, &mut dp, &d), backend_flags::LOCAL, "one port terminating");
    flag_backend(&mut d, 2, 10, backend_flags::TERMINATING);
    let both = backend_flags::LOCAL | backend_flags::TERMINATING;
    assert_eq!(flags_now(&mut s, &mut dp, &d), both, "both ports terminating");
    assert_eq!(s.flag_counts.len(), 1);
    // The port that made it local goes: neither flag holds any more for the other alone
    // until it says so.
    let mut d = desired(&[(2, &[10])]);
    flag_backend(&mut d, 2, 10, backend_flags::TERMINATING);
    assert_eq!(flags_now(&mut s, &mut dp, &d), backend_flags::TERMINATING);
    assert_eq!(flags_now(&mut s, &mut dp, &desired(&[(2, &[10])])), 0);
    assert!(s.flag_counts.is_empty(), "no counts kept for unflagged backends: {:?}", s.flag_counts);
    s.sync(&desired(&[]), &mut dp);
    let b = &s.shadow.backends;
    assert!(b.keys.is_empty() && b.len() == 0 && s.flag_counts.is_empty());
    assert!(b.dense.iter().all(ShadowBackend::is_free), "{:?}", b.dense);
}

#[test]
fn empty_service_has_entry_with_zero_count() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11])]), &mut dp);
    let r = s.sync(&desired(&[(1, &[])]), &mut dp);
    assert!(r.errors.is_empty());
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(programmed(&dp.mem, &cip(1)), Some(vec![]));
    assert!(dp.mem.backends.is_empty());
    assert_eq!(dp.mem.services.len(), 1);
}

#[test]
fn stable_layout_cases() {
    assert_eq!(stable_layout(&[], &[3, 1, 2]), [3, 1, 2]);
    assert_eq!(stable_layout(&[1, 2, 3], &[1, 2, 3]), [1, 2, 3]);
    assert_eq!(stable_layout(&[1, 2, 3], &[1, 3]), [1, 3]);
    assert_eq!(stable_layout(&[1, 2, 3, 4], &[1, 3, 4]), [1, 4, 3]);
    assert_eq!(stable_layout(&[1, 2, 3], &[1, 3, 5]), [1, 5, 3]);
    assert_eq!(stable_layout(&[1, 2, 3], &[5, 6]), [5, 6]);
    assert_eq!(stable_layout(&[1, 2], &[]), Vec::<u32>::new());
    assert_eq!(stable_layout(&[1, 2, 3, 4, 5], &[5]), [5]);
    assert_eq!(stable_layout(&[1, 1, 2], &[1, 2]), [1, 2]);
}

#[test]
fn ids_named_by_connections_are_avoided_after_restart() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10, 11, 12])]), &mut dp);
    // .12 (the highest id) goes, then the agent restarts: the backends map alone would make the
    // next id equal to the freed one.
    s.sync(&desired(&[(1, &[10, 11])]), &mut dp);
    let freed = 3;
    assert!(!dp.mem.backends.contains_key(&freed));
    let mut restarted = Syncer::adopt(&dp).unwrap();
    restarted.avoid_backend_ids([1, freed]);
    restarted.sync(&desired(&[(1, &[10, 11, 13])]), &mut dp);
    assert!(!dp.mem.backends.contains_key(&freed), "freed id reused: {:?}", dp.mem.backends);
    assert_eq!(dp.mem.backends.len(), 3);
}

/// Scale measurement (run with `--ignored --nocapture`): 10,000 services with 10 backends each,
/// from Service/EndpointSlice objects through the model and the sync into in-memory maps.
#[test]
#[ignore]
fn scale_10k_services() {
    use std::time::Instant;

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use crate::model::{NodeInfo, build};
    let n = 10_000u32;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i + 1);
        services.push(
            serde_json::from_value::<Service>(serde_json::json!({
                "metadata": {"name": format!("s{i}"), "namespace": "default"},
                "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap(),
        );
        let eps: Vec<_> = (0..10u32)
            .map(|j| {
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i * 10 + j);
                serde_json::json!({"addresses": [a.to_string()], "nodeName": format!("node-{}", j % 2)})
            })
            .collect();
        slices.push(
            serde_json::from_value::<EndpointSlice>(serde_json::json!({
                "metadata": {"name": format!("s{i}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": eps,
            }))
            .unwrap(),
        );
    }
    let node = NodeInfo {
        name: "node-0".into(),
        addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
        zone: None,
        addrs6: Vec::new(),
    };
    let t = Instant::now();
    let out = build(&services, &slices, &node);
    let model_time = t.elapsed();
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new();
    let t = Instant::now();
    let r = s.sync(&out.state, &mut dp);
    let first = t.elapsed();
    let first_writes = r.writes;
    let t = Instant::now();
    let r = s.sync(&out.state, &mut dp);
    let noop = t.elapsed();
    assert_eq!(r.writes, 0);
    // One endpoint of one service goes away.
    let mut changed = slices.clone();
    changed[4242].endpoints.as_mut().unwrap().pop();
    let t = Instant::now();
    let out2 = build(&services, &changed, &node);
    let r = s.sync(&out2.state, &mut dp);
    let incr = t.elapsed();
    println!(
        "10k services x 10 backends: model {model_time:?}, first sync {first:?} ({first_writes} writes), \
         no-op sync {noop:?}, one endpoint removed (model + sync) {incr:?} ({} writes)",
        r.writes
    );
}

mod incremental {
    //! The change tracker and the syncer together: one change touches only its service.
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::{
        Change, NodeInfo, Tracker,
        objects::{EndpointObj, ServiceObj, ServicePortObj, SliceObj, SlicePortObj},
    };

    fn name(i: u32) -> ServiceName {
        ServiceName { namespace: "bench".into(), name: format!("s{i:05}").into() }
    }

    fn cluster_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i)
    }

    fn svc(i: u32) -> ServiceObj {
        ServiceObj {
            name: name(i),
            origin: None,
            created: None,
            created_when_read: false,
            skip_label: None,
            has_spec: true,
            type_: None,
            cluster_ips: smallvec::smallvec![cluster_ip(i).to_string().as_str().into()],
            ip_families: SmallVec::new(),
            ip_family_policy: None,
            external_traffic_policy: None,
            internal_traffic_policy: None,
            session_affinity: None,
            ports: smallvec::smallvec![ServicePortObj {
                name: Some("http".into()),
                protocol: None,
                port: 80,
                node_port: None,
            }],
            rare: None,
        }
    }

    /// The slice of service `i` with endpoints 198.18.128.0 + 10 i + e for e in `eps`.
    fn slice(i: u32, eps: impl Iterator<Item = u32>) -> SliceObj {
        let base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
        SliceObj {
            name: ServiceName { namespace: "bench".into(), name: format!("s{i:05}-1").into() },
            origin: None,
            address_type: "IPv4".into(),
            service: Some(name(i).name.clone()),
            trigger_time: None,
            ports: smallvec::smallvec![SlicePortObj {
                name: Some("http".into()),
                protocol: None,
                port: Some(8080),
            }],
            endpoints: eps
                .map(|e| {
                    EndpointObj::new(
                        Some(&Ipv4Addr::from(base + i * 10 + e).to_string()),
                        Some(format!("node-{}", e % 2).into()),
                        [Some(true), Some(true), Some(false)],
                        None,
                    )
                })
                .collect(),
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-0".into(),
            addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
            zone: None,
            addrs6: Vec::new(),
        }
    }

    /// `n` services with 10 endpoints each, programmed from scratch.
    fn loaded(n: u32) -> (Tracker, Syncer, MemDataplane) {
        let mut t = Tracker::new(node());
        for i in 0..n {
            t.apply(Change::Service(svc(i)));
            t.apply(Change::Slice(slice(i, 0..10)));
        }
        let mut s = Syncer::new();
        let mut dp = MemDataplane::default();
        let mut c = t.changes();
        assert_eq!(c.services.len(), n as usize);
        let r = s.sync_changes(&mut c, &mut dp);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(s.programmed_frontends(), n as usize);
        (t, s, dp)
    }

    /// The frontends whose entries or slots a write touched, and whether backends were written.
    fn touched(dp: &MemDataplane) -> (BTreeSet<Ipv4Addr>, usize) {
        let mut fes = BTreeSet::new();
        let mut backends = 0;
        for op in &dp.ops {
            match op {
                MemOp::PutService(k) | MemOp::DeleteService(k) => {
                    fes.insert(Ipv4Addr::from(u32::from_be(k.addr)));
                }
                MemOp::PutBackend(_) | MemOp::DeleteBackend(_) => backends += 1,
                _ => {}
            }
        }
        (fes, backends)
    }

    /// What a packet sees: frontend → (flags, backend addresses in slot order).
    fn view(dp: &MemDataplane) -> BTreeMap<Service4Key, (u16, Vec<Ipv4Addr>)> {
        dp.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| {
                let mut bes: Vec<Ipv4Addr> = (1..=v.count)
                    .map(|slot| {
                        let s = dp.services[&Service4Key { slot, ..*k }];
                        Ipv4Addr::from(u32::from_be(dp.backends[&s.backend_id].addr))
                    })
                    .collect();
                bes.sort();
                (*k, (v.flags, bes))
            })
            .collect()
    }

    #[test]
    fn one_change_at_10k_services_writes_only_that_service() {
        let (mut t, mut s, mut dp) = loaded(10_000);

        // A new service with 10 endpoints: its 10 backends, 10 slots, entry and closed service
        // address, nothing else.
        dp.ops.clear();
        t.apply(Change::Service(svc(10_000)));
        t.apply(Change::Slice(slice(10_000, 0..10)));
        let mut c = t.changes();
        assert_eq!(c.services, BTreeSet::from([name(10_000)]));
        let r = s.sync_changes(&mut c, &mut dp);
        assert_eq!(touched(&dp), (BTreeSet::from([cluster_ip(10_000)]), 10));
        assert_eq!(r.writes, 22);

        // One endpoint of one service goes away: that frontend only (entry + last slot), the
        // backend goes with it.
        dp.ops.clear();
        t.apply(Change::Slice(slice(4242, 0..9)));
        let mut c = t.changes();
        assert_eq!(c.services, BTreeSet::from([name(4242)]));
        s.sync_changes(&mut c, &mut dp);
        assert_eq!(touched(&dp), (BTreeSet::from([cluster_ip(4242)]), 1));
        assert_eq!(dp.ops.len(), 3, "{:?}", dp.ops);

        // A service deleted: its entry, slots and backends only.
        dp.ops.clear();
        t.apply(Change::ServiceDeleted(name(17)));
        let mut c = t.changes();
        s.sync_changes(&mut c, &mut dp);
        assert_eq!(touched(&dp), (BTreeSet::from([cluster_ip(17)]), 10));
        assert_eq!(s.programmed_frontends(), 10_000);

        // An update equal to what is held dirties nothing.
        t.apply(Change::Service(svc(5)));
        t.apply(Change::Slice(slice(5, 0..10)));
        assert!(!t.has_changes());

        // The incremental result equals a full resync (no writes) and a from-scratch load.
        dp.ops.clear();
        let mut c = t.full();
        let r = s.sync_changes(&mut c, &mut dp);
        assert_eq!(r.writes, 0, "{:?}", dp.ops);
        let mut fresh = MemDataplane::default();
        Syncer::new().sync_changes(&mut t.full(), &mut fresh);
        assert_eq!(view(&dp), view(&fresh));
        assert_eq!(dp.backends.len(), fresh.backends.len());
    }

    #[test]
    fn slice_moving_between_services_and_frontend_conflicts_dirty_both_sides() {
        let (mut t, mut s, mut dp) = loaded(20);
        // The slice of service 3 now names service 4: both are recomputed.
        let mut moved = slice(3, 0..10);
        moved.service = Some(name(4).name.clone());
        t.apply(Change::Slice(moved));
        let mut c = t.changes();
        assert_eq!(c.services, BTreeSet::from([name(3), name(4)]));
        s.sync_changes(&mut c, &mut dp);
        let v = view(&dp);
        let entry = |i: u32| {
            let k = key_of(
                &Frontend {
                    addr: cluster_ip(i),
                    port: 80,
                    proto: proto::TCP,
                    scope: scope::INTERNAL,
                },
                0,
            );
            v[&k].1.len()
        };
        assert_eq!((entry(3), entry(4)), (0, 20));

        // Service 0 takes the ClusterIP of service 9 (service 0 sorts first, so it wins): both
        // are recomputed, 9 loses the frontend with an error, and gets it back when 0 leaves it.
        let mut thief = svc(0);
        thief.cluster_ips = smallvec::smallvec![cluster_ip(9).to_string().as_str().into()];
        t.apply(Change::Service(thief));
        let mut c = t.changes();
        assert_eq!(c.services, BTreeSet::from([name(0), name(9)]));
        assert_eq!(c.new_errors.len(), 1, "{:?}", c.new_errors);
        assert_eq!(c.new_errors[0].object, "bench/s00009");
        s.sync_changes(&mut c, &mut dp);
        let k9 = key_of(
            &Frontend { addr: cluster_ip(9), port: 80, proto: proto::TCP, scope: scope::INTERNAL },
            0,
        );
        let s0 = s.service_id(&ServicePortName {
            service: name(0),
            port: "http".into(),
            proto: proto::TCP,
        });
        assert_eq!(Some(dp.services[&k9].svc_id), s0);
        t.apply(Change::ServiceDeleted(name(0)));
        let mut c = t.changes();
        assert_eq!(c.services, BTreeSet::from([name(0), name(9)]));
        s.sync_changes(&mut c, &mut dp);
        let s9 = s.service_id(&ServicePortName {
            service: name(9),
            port: "http".into(),
            proto: proto::TCP,
        });
        assert_eq!(Some(dp.services[&k9].svc_id), s9);
        assert_eq!(dp.services[&k9].count, 10);
        let mut fresh = MemDataplane::default();
        Syncer::new().sync_changes(&mut t.full(), &mut fresh);
        assert_eq!(view(&dp), view(&fresh));
    }

    #[test]
    fn node_address_change_recomputes_everything() {
        let (mut t, _, _) = loaded(5);
        t.set_node_addrs(&[Ipv4Addr::new(198, 18, 0, 11)]);
        let c = t.changes();
        assert!(c.full);
        assert_eq!(c.services.len(), 5);
        t.set_node_addrs(&[Ipv4Addr::new(198, 18, 0, 11)]);
        assert!(!t.has_changes());
    }
}

#[test]
fn services_are_written_in_one_batch_per_phase() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    // 50 services × 3 backends: 150 backends, 150 slots, 50 entries.
    let hosts: Vec<[u8; 3]> = (0..50u8).map(|i| [i * 3, i * 3 + 1, i * 3 + 2]).collect();
    let spec: Vec<(u8, &[u8])> = (0..50u8).map(|i| (i + 1, &hosts[i as usize][..])).collect();
    let r = s.sync(&desired(&spec), &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // And the 50 ClusterIPs as closed service addresses.
    assert_eq!(r.writes, 400);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(
        dp.calls,
        [
            ("put_backends", 150),
            ("put_services", 150),
            ("put_services", 50),
            ("put_service_addrs", 50)
        ]
    );
    // Removing half of them: all entries in one batch, then all slots, then the backends.
    dp.calls.clear();
    let r = s.sync(&desired(&spec[..25]), &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        dp.calls,
        [
            ("delete_services", 25),
            ("delete_services", 75),
            ("delete_service_addrs", 25),
            ("delete_backends", 75)
        ]
    );
}

#[test]
fn a_port_failing_mid_batch_is_undone_and_the_others_are_written() {
    let mut dp = Checked::default();
    let mut s = Syncer::new();
    // 9 entries wanted, room for 6: one port does not fit (which one depends on where the map
    // fills up), the others do.
    dp.mem.services_capacity = Some(6);
    let want = desired(&[(1, &[10, 11]), (2, &[12, 13, 14]), (3, &[15])]);
    let r = s.sync(&want, &mut dp);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].kind(), "map_full");
    let failed = (1..=3u8)
        .find(|n| r.errors[0].to_string().contains(&format!("default/svc{n}:")))
        .expect("the error names the service");
    let hosts: [&[u8]; 3] = [&[10, 11], &[12, 13, 14], &[15]];
    for n in 1..=3u8 {
        if n == failed {
            // Not a key of it left, nor a backend only it needed.
            assert!(!dp.mem.services.keys().any(|k| k.addr == key_of(&cip(n), 0).addr));
            assert_eq!(programmed(&dp.mem, &cip(n)), None);
        } else {
            assert_eq!(programmed(&dp.mem, &cip(n)).as_deref(), Some(hosts[n as usize - 1]));
        }
    }
    let backends: usize =
        (1..=3u8).filter(|n| *n != failed).map(|n| hosts[n as usize - 1].len()).sum();
    assert_eq!(dp.mem.backends.len(), backends);
    // With room, the next sync writes it.
    dp.mem.services_capacity = None;
    let r = s.sync(&want, &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(dp.violations.is_empty(), "{:?}", dp.violations);
    for n in 1..=3u8 {
        assert_eq!(programmed(&dp.mem, &cip(n)).as_deref(), Some(hosts[n as usize - 1]));
    }
}

/// The service CIDRs of the model's changes are written once per change; a failed write is a
/// datapath failure that keeps the previous networks and is retried by the next sync; a syncer
/// never given any leaves the map alone.
#[test]
fn service_cidrs_are_written_when_they_change_and_retried_after_a_failure() {
    let net = |s: &str| -> ipnet::Ipv4Net { s.parse().unwrap() };
    let mut dp = MemDataplane::default();
    let mut s = Syncer::new();
    s.sync(&desired(&[(1, &[10])]), &mut dp);
    assert_eq!(dp.service_cidrs.count, 0, "none given: the map is left as it is");
    let mut changes = Changes {
        service_cidrs: Some(vec![net("198.19.0.0/24"), net("198.19.1.0/24")]),
        ..Default::default()
    };
    let r = s.sync_changes(&mut changes, &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        dp.service_cidrs,
        crate::dataplane::guard::service_cidrs(&[net("198.19.0.0/24"), net("198.19.1.0/24")])
    );
    // The same networks again: no write.
    dp.service_cidrs_fail = true;
    let mut same = Changes {
        service_cidrs: Some(vec![net("198.19.0.0/24"), net("198.19.1.0/24")]),
        ..Default::default()
    };
    assert!(s.sync_changes(&mut same, &mut dp).errors.is_empty());
    // A change whose write fails: the previous networks stay, the error is a datapath failure.
    let mut one = Changes { service_cidrs: Some(vec![net("198.19.0.0/24")]), ..Default::default() };
    let r = s.sync_changes(&mut one, &mut dp);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].kind(), "service_cidrs");
    assert!(r.errors[0].is_datapath_failure());
    assert!(r.errors[0].to_string().contains("kp_svccidr4"), "{}", r.errors[0]);
    assert_eq!(dp.service_cidrs.count, 2);
    // The next sync, with no new networks, writes them.
    dp.service_cidrs_fail = false;
    let r = s.sync_changes(&mut Changes::default(), &mut dp);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(dp.service_cidrs, crate::dataplane::guard::service_cidrs(&[net("198.19.0.0/24")]));
}

#[test]
fn shadow_backends_keep_values_and_slot_counts_in_one_entry() {
    let mut b = ShadowBackends::default();
    let v = Backend4 { addr: 1, port: 2, proto: 6, flags: 0 };
    // A slot naming an id the map does not hold (left by a crash): a count without a value.
    b.add_ref(7);
    assert!(b.referenced(7));
    assert_eq!((b.get(&7), b.len(), b.ids().count()), (None, 0, 0));
    assert_eq!(b.insert(7, v), None);
    assert_eq!((b.get(&7), b.len()), (Some(&v), 1));
    let w = Backend4 { flags: backend_flags::LOCAL, ..v };
    assert_eq!(b.insert(7, w), Some(v));
    assert_eq!(b.len(), 1);
    assert_eq!(b.remove(&7), Some(w));
    assert!(b.referenced(7), "the count outlives the value");
    assert_eq!((b.get(&7), b.len()), (None, 0));
    assert_eq!(b.remove(&7), None);
    assert!(b.drop_ref(7), "the last slot");
    assert!(!b.referenced(7));
    assert!(b.entry(7).is_none(), "an entry with neither value nor count is free");
    b.insert(8, v);
    b.add_ref(8);
    b.add_ref(8);
    assert!(!b.drop_ref(8));
    assert!(b.drop_ref(8));
    assert!(!b.drop_ref(8), "no count left to drop");
    assert_eq!(b.iter().collect::<Vec<_>>(), [(8, v)]);
    assert_eq!(b.remove(&8), Some(v));
    assert!(b.entry(8).is_none());
    assert_eq!(b.alloc(), 1, "the lowest free id");
}

#[test]
fn shadow_backends_index_keys_while_wanted_or_held() {
    let mut b = ShadowBackends::default();
    let v = Backend4 { addr: 1, port: 2, proto: 6, flags: 0 };
    let w = Backend4 { addr: 3, ..v };
    let (kv, kw) = (backend_key(&v), backend_key(&w));
    b.want(v);
    b.want(Backend4 { flags: backend_flags::LOCAL, ..v });
    assert_eq!(b.key_info(kv), Some((1, 2)), "one id for the key whatever the flags");
    b.want(w);
    assert_eq!(b.key_info(kw), Some((2, 1)));
    assert_eq!(b.len(), 0, "wanted is not held");
    // Unwanted and never written: the id is free again, and the next key takes it.
    b.unwant(2);
    assert_eq!(b.key_id(kw), None);
    assert!(b.entry(2).is_none());
    // Held and unwanted: keyed until the map no longer holds it.
    b.insert(1, v);
    b.unwant(1);
    b.unwant(1);
    assert_eq!(b.key_info(kv), Some((1, 0)));
    assert_eq!(b.remove(&1), Some(v));
    assert_eq!(b.key_id(kv), None);
    assert!(b.keys.is_empty());
    // Removed from the map while still wanted (a failed port's write undone): the key keeps it.
    b.want(w);
    assert_eq!(b.key_id(kw), Some(1), "the lowest free id");
    b.insert(1, w);
    assert_eq!(b.remove(&1), Some(w));
    assert_eq!(b.key_info(kw), Some((1, 1)));
    assert_eq!(b.alloc(), 2, "a keyed id is not free");
}
