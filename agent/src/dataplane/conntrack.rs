//! Connection-tracking upkeep, as Cilium's CT GC does it: a periodic garbage collection that
//! deletes the `kp_ct4` entries whose idle timeout ([`kproxy_common::timeouts`]) has expired,
//! together with their `kp_rnat4` partners, and the numbers behind the `kproxy_conntrack_*`
//! metrics: present entries, capacity and LRU evictions. The IPv6 tables (`kp_ct6`, `kp_rnat6`,
//! `kp_frag6`, `kp_ctstat6`) get the same upkeep: the code is generic over [`CtFamily`].
//!
//! `kp_ct4` is an LRU hash: when it is full the kernel evicts its least recently used entries
//! without telling anyone. The datapath counts the entries it creates and deletes in
//! `kp_ctstat`, the agent adds the entries its collection deletes, and the evictions are the
//! rest: `created - deleted by the datapath - deleted by the agent - present entries`. Every term
//! lives in pinned maps, so the count survives agent restarts. The walk that counts the present
//! entries is not atomic: the counters are read before it, which can only under-state evictions
//! while connections are being created during the walk (never over-state them), and the agent
//! keeps the exported counter monotonic.
//!
//! Linux 6.6 has a kfunc (`bpf_map_sum_elem_count`) to count the entries of a hash map without a
//! walk; kproxy keeps the 5.15 line and walks, which the collection does anyway.
//!
//! The conntrack reconciler, as kube-proxy's (`CleanStaleEntries`): a UDP flow stays on the
//! backend it was tracked to while that backend's id lives, and a backend stays in the maps while
//! its endpoint exists, serving or not (so that TCP connections to a terminating pod finish). When
//! the sync reports UDP service ports whose serving set shrank ([`UdpServing`]), the reconciler
//! deletes their tracked UDP flows to any backend outside the set, with their reverse-NAT
//! partners; the next datagram of such a flow is balanced again over the serving backends. TCP
//! entries are never touched. Deletions count as the agent's in `kp_ctstat` and in
//! `kubeproxy_conntrack_reconciler_deleted_entries_total`.
//!
//! Both walks run on one thread of their own ([`spawn_worker`]), never on the sync loop.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuValues};
use kproxy_common::{
    Addr6, Ct4Value, Ct6Value, Frag4Key, Frag4Value, Frag6Key, RevNat4Value, RevNat6Value, Tuple4,
    Tuple6, ct_counter, ct_flags, ct_state, frag, names, timeouts,
};
use tracing::{debug, info, warn};

use super::{
    DataplaneError, batch,
    bpf::{BpfDataplane, Hash, map_err, syscall_errno},
};
use crate::sync::UdpServing;

/// Connection-tracking numbers of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtStats {
    /// Entries the datapath created.
    pub created: u64,
    /// Entries the datapath deleted.
    pub deleted_datapath: u64,
    /// Entries the agent's garbage collection deleted.
    pub deleted_agent: u64,
    /// Entries present in `kp_ct4` (expired ones included until collected).
    pub entries: u64,
    /// `max_entries` of `kp_ct4`.
    pub capacity: u32,
}

impl CtStats {
    /// Entries the kernel evicted from the full LRU table (0 when the counters started after
    /// the entries, e.g. pins from an older kproxy).
    pub fn evictions(&self) -> u64 {
        self.created
            .saturating_sub(self.deleted_datapath)
            .saturating_sub(self.deleted_agent)
            .saturating_sub(self.entries)
    }

    /// Name/value rows for `kproxy stats`.
    pub fn rows(&self) -> [(&'static str, u64); 6] {
        [
            ("conntrack_entries", self.entries),
            ("conntrack_capacity", u64::from(self.capacity)),
            ("conntrack_created", self.created),
            ("conntrack_deleted_datapath", self.deleted_datapath),
            ("conntrack_deleted_gc", self.deleted_agent),
            ("conntrack_evictions", self.evictions()),
        ]
    }
}

/// What one garbage collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Expired connection entries deleted.
    pub deleted: u64,
    /// Reverse-NAT entries deleted (partners of the deleted entries, and orphans).
    pub revnat_deleted: u64,
    /// Fragment-tracking entries deleted (older than `kproxy_common::frag::TIMEOUT_NS`).
    pub fragments_deleted: u64,
    /// The numbers after the collection.
    pub stats: CtStats,
}

/// Whether a connection entry last seen at `last_seen_ns` is expired at `now_ns` (an entry
/// touched after `now_ns` was taken is not).
fn expired(proto: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeouts::for_state(proto, state)
}

/// One family's connection-tracking tables as the garbage collection and the reconciler read
/// them: IPv4's and IPv6's have the same shape with their own address type.
pub trait CtFamily {
    /// An address as the tables hold it (be).
    type Addr: Copy + Eq + std::hash::Hash + std::fmt::Debug;
    /// Key of the connection and reverse-NAT tables.
    type Tuple: aya::Pod + Copy + std::fmt::Debug;
    /// Value of the connection table.
    type Ct: aya::Pod + Copy;
    /// Value of the reverse-NAT table.
    type RevNat: aya::Pod + Copy;
    /// Key of the fragment table (its value is [`Frag4Value`] for both families).
    type FragKey: aya::Pod + Copy + std::fmt::Debug;
    /// Map names, for errors.
    const CT: &'static str;
    const REVNAT: &'static str;
    const FRAG: &'static str;
    /// The IP protocol of a tuple.
    fn proto(t: &Self::Tuple) -> u8;
    /// A connection's state and last packet (`bpf_ktime_get_ns`).
    fn state_seen(v: &Self::Ct) -> (u8, u64);
    /// A connection's service id and backend (address, port).
    fn service_backend(v: &Self::Ct) -> (u32, (Self::Addr, u16));
    /// The reverse-NAT key of a connection: the reply as it arrives from the backend.
    fn reply_tuple(t: &Self::Tuple, v: &Self::Ct) -> Self::Tuple;
    /// The connection a reverse-NAT entry was made for.
    fn orig_tuple(r: &Self::Tuple, rv: &Self::RevNat) -> Self::Tuple;
    /// When a reverse-NAT entry was last refreshed.
    fn revnat_seen(rv: &Self::RevNat) -> u64;
    /// Whether `rv` still points back at the connection `t` (a source-NAT port may have been
    /// reused by another connection).
    fn points_at(rv: &Self::RevNat, t: &Self::Tuple) -> bool;
}

/// Implements [`CtFamily`] for a family whose tables have the common field names.
macro_rules! ct_family {
    ($(#[$doc:meta])* $fam:ident: $addr:ty, $tuple:ident, $ct:ty, $rn:ty, $frag:ty,
     $ct_map:ident, $rn_map:ident, $frag_map:ident) => {
        $(#[$doc])*
        pub enum $fam {}

        impl CtFamily for $fam {
            type Addr = $addr;
            type Tuple = $tuple;
            type Ct = $ct;
            type RevNat = $rn;
            type FragKey = $frag;
            const CT: &'static str = names::$ct_map;
            const REVNAT: &'static str = names::$rn_map;
            const FRAG: &'static str = names::$frag_map;

            fn proto(t: &$tuple) -> u8 {
                t.proto
            }

            fn state_seen(v: &$ct) -> (u8, u64) {
                (v.state, v.last_seen_ns)
            }

            fn service_backend(v: &$ct) -> (u32, ($addr, u16)) {
                (v.svc_id, (v.backend_addr, v.backend_port))
            }

            fn reply_tuple(t: &$tuple, v: &$ct) -> $tuple {
                let snat = v.flags & ct_flags::SNAT != 0;
                $tuple {
                    saddr: v.backend_addr,
                    daddr: if snat { v.snat_addr } else { t.saddr },
                    sport: v.backend_port,
                    dport: if snat { v.snat_port } else { t.sport },
                    proto: t.proto,
                    _pad: [0; 3],
                }
            }

            fn orig_tuple(r: &$tuple, rv: &$rn) -> $tuple {
                $tuple {
                    saddr: rv.client_addr,
                    daddr: rv.frontend_addr,
                    sport: rv.client_port,
                    dport: rv.frontend_port,
                    proto: r.proto,
                    _pad: [0; 3],
                }
            }

            fn revnat_seen(rv: &$rn) -> u64 {
                rv.last_seen_ns
            }

            fn points_at(rv: &$rn, t: &$tuple) -> bool {
                rv.client_addr == t.saddr
                    && rv.client_port == t.sport
                    && rv.frontend_addr == t.daddr
                    && rv.frontend_port == t.dport
            }
        }
    };
}

ct_family!(
    /// IPv4 connection tracking (`kp_ct4`, `kp_rnat4`, `kp_frag4`).
    V4: u32, Tuple4, Ct4Value, RevNat4Value, Frag4Key, CT4, REVNAT4, FRAG4
);
ct_family!(
    /// IPv6 connection tracking (`kp_ct6`, `kp_rnat6`, `kp_frag6`).
    V6: Addr6, Tuple6, Ct6Value, RevNat6Value, Frag6Key, CT6, REVNAT6, FRAG6
);

/// The reverse-NAT key of an IPv4 connection entry.
#[cfg(test)]
fn reply_tuple(t: &Tuple4, v: &Ct4Value) -> Tuple4 {
    V4::reply_tuple(t, v)
}

/// Serving backends by service id, as the reconciler matches them (IPv4 addresses by default).
pub type ServingSets<A = u32> = HashMap<u32, HashSet<(A, u16)>>;

/// Whether a tracked connection is a UDP flow of one of `services` to a backend outside that
/// service's serving set.
pub fn stale_udp_flow<F: CtFamily>(
    t: &F::Tuple,
    v: &F::Ct,
    services: &ServingSets<F::Addr>,
) -> bool {
    let (svc_id, backend) = F::service_backend(v);
    F::proto(t) == kproxy_common::proto::UDP
        && services.get(&svc_id).is_some_and(|set| !set.contains(&backend))
}

/// One family's connection-tracking maps, opened.
struct CtTables<'a, F: CtFamily> {
    ct: &'a Hash<F::Tuple, F::Ct>,
    revnat: &'a Hash<F::Tuple, F::RevNat>,
    frag: &'a Hash<F::FragKey, Frag4Value>,
    /// `kp_ctstat` or `kp_ctstat6`, with its name.
    counters: (&'a PerCpuArray<MapData, u64>, &'static str),
}

impl<F: CtFamily> CtTables<'_, F> {
    /// The counters (created, deleted by the datapath, deleted by the agent), summed over CPUs.
    fn counters(&self) -> Result<[u64; 3], DataplaneError> {
        let (map, name) = self.counters;
        let mut out = [0; 3];
        for (i, idx) in
            [ct_counter::CREATED, ct_counter::DELETED_DATAPATH, ct_counter::DELETED_AGENT]
                .into_iter()
                .enumerate()
        {
            let v = map.get(&idx, 0).map_err(|e| map_err(name, "lookup", &idx.to_string(), e))?;
            out[i] = v.iter().sum();
        }
        Ok(out)
    }

    fn stats(&self) -> Result<CtStats, DataplaneError> {
        let [created, deleted_datapath, deleted_agent] = self.counters()?;
        let entries = batch::count(self.ct.fd(), size_of::<F::Tuple>(), size_of::<F::Ct>())
            .map_err(walk_err(F::CT))?;
        Ok(CtStats {
            created,
            deleted_datapath,
            deleted_agent,
            entries,
            capacity: self.ct.capacity,
        })
    }

    /// The collection of [`BpfDataplane::conntrack_gc`], without counting its deletions.
    fn gc(&self, now_ns: u64) -> Result<GcReport, DataplaneError> {
        let [created, deleted_datapath, deleted_agent] = self.counters()?;
        let is_expired = |t: &F::Tuple, v: &F::Ct| {
            let (state, seen) = F::state_seen(v);
            expired(F::proto(t), state, seen, now_ns)
        };
        let mut present = 0u64;
        let mut stale = Vec::new();
        batch::walk(self.ct.fd(), |t: &F::Tuple, v: &F::Ct| {
            present += 1;
            if is_expired(t, v) {
                stale.push(*t);
            }
        })
        .map_err(walk_err(F::CT))?;
        let mut report = GcReport::default();
        // Small batches keep the time between the last look and the delete short.
        for chunk in stale.chunks(GC_BATCH) {
            let mut dead = Vec::with_capacity(chunk.len());
            let mut partners = Vec::new();
            for t in chunk {
                // Look again: the flow may have seen a packet since the walk.
                let v = match self.ct.map.get(t, 0) {
                    Ok(v) if is_expired(t, &v) => v,
                    _ => continue,
                };
                dead.push(*t);
                let r = F::reply_tuple(t, &v);
                if let Ok(rv) = self.revnat.map.get(&r, 0)
                    && F::points_at(&rv, t)
                {
                    partners.push(r);
                }
            }
            report.deleted += delete_all(self.ct.fd(), F::CT, &dead)?;
            report.revnat_deleted += delete_all(self.revnat.fd(), F::REVNAT, &partners)?;
        }
        // Reverse-NAT entries whose connection entry is gone (evicted, or deleted by the
        // datapath when its backend went away) and older than any idle timeout of their
        // protocol: nothing can use them any more.
        let mut old = Vec::new();
        batch::walk(self.revnat.fd(), |r: &F::Tuple, rv: &F::RevNat| {
            if expired(F::proto(r), ct_state::ESTABLISHED, F::revnat_seen(rv), now_ns) {
                old.push((*r, *rv));
            }
        })
        .map_err(walk_err(F::REVNAT))?;
        let orphans: Vec<F::Tuple> = old
            .iter()
            .filter(|(r, rv)| {
                matches!(self.ct.map.get(&F::orig_tuple(r, rv), 0), Err(ref e) if gone(e))
            })
            .map(|(r, _)| *r)
            .collect();
        report.revnat_deleted += delete_all(self.revnat.fd(), F::REVNAT, &orphans)?;
        // Fragment-tracking entries the datapath no longer uses (it ignores them too).
        let mut frags = Vec::new();
        batch::walk(self.frag.fd(), |k: &F::FragKey, v: &Frag4Value| {
            if frag::expired(v.seen, now_ns) {
                frags.push(*k);
            }
        })
        .map_err(walk_err(F::FRAG))?;
        report.fragments_deleted = delete_all(self.frag.fd(), F::FRAG, &frags)?;
        report.stats = CtStats {
            created,
            deleted_datapath,
            // The deletions of this run were taken from the entries counted present.
            deleted_agent: deleted_agent + report.deleted,
            entries: present.saturating_sub(report.deleted),
            capacity: self.ct.capacity,
        };
        Ok(report)
    }

    /// Deletes a connection entry and its reverse-NAT partner (only if that partner still points
    /// back at the entry: a SNAT port may have been reused). `None` when the entry was gone
    /// already, else whether the partner was deleted.
    fn remove_flow(&self, t: &F::Tuple, v: &F::Ct) -> Result<Option<bool>, DataplaneError> {
        if delete_all(self.ct.fd(), F::CT, std::slice::from_ref(t))? == 0 {
            return Ok(None);
        }
        let r = F::reply_tuple(t, v);
        Ok(Some(
            matches!(self.revnat.map.get(&r, 0), Ok(rv) if F::points_at(&rv, t))
                && delete_all(self.revnat.fd(), F::REVNAT, &[r])? == 1,
        ))
    }

    /// The reconciliation of [`BpfDataplane::reconcile_udp_flows`], without counting its
    /// deletions.
    fn reconcile_udp(&self, services: &ServingSets<F::Addr>) -> Result<u64, DataplaneError> {
        if services.is_empty() {
            return Ok(0);
        }
        let mut stale = Vec::new();
        batch::walk(self.ct.fd(), |t: &F::Tuple, v: &F::Ct| {
            if stale_udp_flow::<F>(t, v, services) {
                stale.push(*t);
            }
        })
        .map_err(walk_err(F::CT))?;
        let mut deleted = 0;
        for t in &stale {
            // The flow may have been deleted and balanced again since the walk.
            let v = match self.ct.map.get(t, 0) {
                Ok(v) if stale_udp_flow::<F>(t, &v, services) => v,
                _ => continue,
            };
            if self.remove_flow(t, &v)?.is_some() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// Adds `n` to the agent's deletion counter of `map` (the datapath never writes that slot).
fn count_agent_deletes(
    map: &mut PerCpuArray<MapData, u64>,
    name: &'static str,
    n: u64,
) -> Result<(), DataplaneError> {
    if n == 0 {
        return Ok(());
    }
    let idx = ct_counter::DELETED_AGENT;
    let err = |op, e| map_err(name, op, &idx.to_string(), e);
    let cur = map.get(&idx, 0).map_err(|e| err("lookup", e))?;
    let mut v: Vec<u64> = cur.iter().copied().collect();
    v[0] += n;
    let vals = PerCpuValues::try_from(v).map_err(|source| DataplaneError::Map {
        map: name,
        op: "update",
        key: idx.to_string(),
        source,
    })?;
    map.set(idx, vals, 0).map_err(|e| err("update", e))
}

impl BpfDataplane {
    fn tables4(&self) -> CtTables<'_, V4> {
        CtTables {
            ct: &self.ct,
            revnat: &self.revnat,
            frag: &self.frag,
            counters: (&self.ct_counters, names::CT_COUNTERS),
        }
    }

    /// The IPv6 tables; an error on pins without IPv6 maps.
    fn tables6(&self) -> Result<CtTables<'_, V6>, DataplaneError> {
        let m = self.v6.as_ref().ok_or_else(|| super::bpf6::no_v6("iterate"))?;
        Ok(CtTables {
            ct: &m.ct,
            revnat: &m.revnat,
            frag: &m.frag,
            counters: (&m.ct_counters, names::CT_COUNTERS6),
        })
    }

    /// The IPv6 `kp_ctstat6` counter map, to count the agent's deletions.
    fn ct_counters6_mut(&mut self) -> Result<&mut PerCpuArray<MapData, u64>, DataplaneError> {
        let m = self.v6.as_mut().ok_or_else(|| super::bpf6::no_v6("update"))?;
        Ok(&mut m.ct_counters)
    }

    /// The `kp_ctstat` counters (created, deleted by the datapath, deleted by the agent), summed
    /// over CPUs.
    pub fn ct_counters(&self) -> Result<[u64; 3], DataplaneError> {
        self.tables4().counters()
    }

    /// The connection-tracking numbers, walking `kp_ct4` (in batches) to count its entries.
    pub fn conntrack_stats(&self) -> Result<CtStats, DataplaneError> {
        self.tables4().stats()
    }

    /// The IPv6 connection-tracking numbers (`kp_ct6`, `kp_ctstat6`); `None` on pins without
    /// IPv6 maps.
    pub fn conntrack_stats6(&self) -> Result<Option<CtStats>, DataplaneError> {
        if !self.has_ipv6() {
            return Ok(None);
        }
        self.tables6()?.stats().map(Some)
    }

    /// One garbage collection at `now_ns` (CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`):
    /// deletes the expired connection entries and their reverse-NAT partners, and reverse-NAT
    /// entries whose connection is gone (evicted) and that are older than the longest timeout
    /// of their protocol. Counts what it deleted in `kp_ctstat`. The tables are read and
    /// cleaned in batches (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`); each expired entry is
    /// looked at once more right before its batch is deleted.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<GcReport, DataplaneError> {
        let r = self.tables4().gc(now_ns)?;
        count_agent_deletes(&mut self.ct_counters, names::CT_COUNTERS, r.deleted)?;
        Ok(r)
    }

    /// [`Self::conntrack_gc`] of the IPv6 tables (`kp_ct6`, `kp_rnat6`, `kp_frag6`, counted in
    /// `kp_ctstat6`); `None` on pins without IPv6 maps.
    pub fn conntrack_gc6(&mut self, now_ns: u64) -> Result<Option<GcReport>, DataplaneError> {
        if !self.has_ipv6() {
            return Ok(None);
        }
        let r = self.tables6()?.gc(now_ns)?;
        count_agent_deletes(self.ct_counters6_mut()?, names::CT_COUNTERS6, r.deleted)?;
        Ok(Some(r))
    }

    /// The conntrack reconciler: deletes the tracked UDP flows of `services` whose backend is not
    /// in the service's serving set ([`stale_udp_flow`], re-checked right before each delete),
    /// with their reverse-NAT partners; counts them as the agent's deletions. Returns how many
    /// connection entries it deleted.
    pub fn reconcile_udp_flows(&mut self, services: &ServingSets) -> Result<u64, DataplaneError> {
        let n = self.tables4().reconcile_udp(services)?;
        count_agent_deletes(&mut self.ct_counters, names::CT_COUNTERS, n)?;
        Ok(n)
    }

    /// [`Self::reconcile_udp_flows`] for IPv6 flows (`kp_ct6`); 0 on pins without IPv6 maps.
    pub fn reconcile_udp_flows6(
        &mut self,
        services: &ServingSets<Addr6>,
    ) -> Result<u64, DataplaneError> {
        if services.is_empty() || !self.has_ipv6() {
            return Ok(0);
        }
        let n = self.tables6()?.reconcile_udp(services)?;
        count_agent_deletes(self.ct_counters6_mut()?, names::CT_COUNTERS6, n)?;
        Ok(n)
    }
}

impl BpfDataplane {
    /// The sockets the socket LB pointed at a UDP backend outside the serving set of their
    /// service, one of `services` (`kp_sock4`: cookie → backend address and port, be).
    pub fn stale_udp_sockets(
        &self,
        services: &ServingSets,
    ) -> Result<HashMap<u64, (u32, u16)>, DataplaneError> {
        let mut out = HashMap::new();
        if services.is_empty() {
            return Ok(out);
        }
        for item in self.sock.map.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(names::SOCK4, "iterate", "", e)),
            };
            if k.proto != kproxy_common::proto::UDP {
                continue;
            }
            let fe = kproxy_common::Service4Key {
                addr: v.addr,
                port: v.port,
                proto: k.proto,
                scope: kproxy_common::scope::INTERNAL,
                slot: 0,
                _pad: 0,
            };
            let Ok(svc) = self.services.map.get(&fe, 0) else { continue };
            if services.get(&svc.svc_id).is_some_and(|set| !set.contains(&(k.addr, k.port))) {
                out.insert(k.cookie, (k.addr, k.port));
            }
        }
        Ok(out)
    }
}

/// Expired entries whose last look and delete go together (one delete batch).
const GC_BATCH: usize = 1024;

/// Deletes `keys` (absent ones skipped); returns how many were deleted.
fn delete_all<K: aya::Pod + std::fmt::Debug>(
    fd: std::os::fd::BorrowedFd<'_>,
    map: &'static str,
    keys: &[K],
) -> Result<u64, DataplaneError> {
    if keys.is_empty() {
        return Ok(0);
    }
    batch::delete(fd, keys).map(|n| n as u64).map_err(|s| DataplaneError::Map {
        map,
        op: "delete",
        key: format!("{:?}", keys[s.done]),
        source: s.error,
    })
}

fn walk_err(map: &'static str) -> impl Fn(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Map { map, op: "iterate", key: String::new(), source }
}

/// Whether a map error means "no such entry".
fn gone(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound) || syscall_errno(e) == Some(libc::ENOENT)
}

/// Keeps the exported eviction counter monotonic across racy walks.
#[derive(Debug, Default)]
pub struct EvictionCounter(u64);

impl EvictionCounter {
    /// The counter after `stats`: never lower than before.
    pub fn update(&mut self, stats: &CtStats) -> u64 {
        self.0 = self.0.max(stats.evictions());
        self.0
    }
}

/// UDP service ports whose flows the reconciler is to check, by family.
#[derive(Debug, Default)]
pub struct Reconcile {
    pub v4: Vec<UdpServing>,
    pub v6: Vec<UdpServing<Addr6>>,
}

impl Reconcile {
    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// The handle of the conntrack thread ([`spawn_worker`]): hands it reconciliations.
#[derive(Debug, Clone)]
pub struct ConntrackWorker {
    tx: mpsc::Sender<Reconcile>,
}

impl ConntrackWorker {
    /// Asks for the UDP flows of these service ports to be reconciled (soon, on the worker's
    /// thread); nothing happens for an empty list.
    pub fn reconcile(&self, ports: Reconcile) {
        if !ports.is_empty() && self.tx.send(ports).is_err() {
            warn!(
                "conntrack reconciler not running: UDP flows to backends that stopped serving stay"
            );
        }
    }
}

/// Serving sets by service id from reconciliation requests: later requests for a service
/// replace earlier ones.
fn serving_sets<A: Copy + Eq + std::hash::Hash>(
    requests: impl IntoIterator<Item = UdpServing<A>>,
) -> ServingSets<A> {
    requests.into_iter().map(|p| (p.svc_id, p.serving)).collect()
}

/// Starts the conntrack thread (its walks are blocking syscalls), with its own handle on the
/// maps pinned under `pin_path`: a garbage collection of both families at once and then every
/// `gc_interval` (`None`: never; `gc_report` gets the family (`"IPv4"`, `"IPv6"`), the numbers of
/// each run, the monotonic eviction count and how long the run took), and the reconciliations
/// handed over by [`ConntrackWorker::reconcile`], several waiting ones merged into one walk per
/// family (`reconciled` gets the family and the number of flows each deleted). Connected UDP
/// sockets the socket LB pointed at a backend that stopped serving are destroyed in the agent's
/// network namespace, and with `all_netns` (`--socket-lb-pods`) in the pods' too (IPv4 sockets).
pub fn spawn_worker(
    pin_path: PathBuf,
    gc_interval: Option<Duration>,
    gc_report: impl Fn(&'static str, &GcReport, u64, Duration) + Send + 'static,
    reconciled: impl Fn(&'static str, u64) + Send + 'static,
    all_netns: bool,
) -> std::io::Result<ConntrackWorker> {
    let (tx, rx) = mpsc::channel::<Reconcile>();
    std::thread::Builder::new().name("kproxy-conntrack".into()).spawn(move || {
        let mut dp = match BpfDataplane::open_for_conntrack(&pin_path) {
            Ok(dp) => dp,
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "conntrack GC and reconciler disabled: cannot open the maps"
                );
                return;
            }
        };
        let mut gc = Gc::default();
        let mut next_gc = Instant::now();
        // Until the kernel says it cannot.
        let mut destroy_sockets = true;
        loop {
            let request = match gc_interval {
                Some(every) => {
                    match rx.recv_timeout(next_gc.saturating_duration_since(Instant::now())) {
                        Ok(r) => r,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            gc.run(&mut dp, &gc_report);
                            next_gc = Instant::now() + every;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            let (mut v4, mut v6) = (request.v4, request.v6);
            for r in rx.try_iter() {
                v4.extend(r.v4);
                v6.extend(r.v6);
            }
            let (services, services6) = (serving_sets(v4), serving_sets(v6));
            let started = Instant::now();
            let results = [
                ("IPv4", services.len(), dp.reconcile_udp_flows(&services)),
                ("IPv6", services6.len(), dp.reconcile_udp_flows6(&services6)),
            ];
            let took_ms = started.elapsed().as_secs_f64() * 1e3;
            for (family, n_services, r) in results {
                if n_services == 0 {
                    continue;
                }
                match r {
                    Ok(n) => {
                        reconciled(family, n);
                        if n > 0 {
                            info!(
                                family,
                                deleted = n,
                                services = n_services,
                                took_ms,
                                "UDP flows to backends that stopped serving deleted"
                            );
                        } else {
                            debug!(family, services = n_services, took_ms, "UDP flows reconciled");
                        }
                    }
                    Err(e) => warn!(family, error = %e, "conntrack reconciliation failed"),
                }
            }
            if destroy_sockets {
                destroy_sockets = destroy_stale_udp_sockets(&dp, &services, all_netns);
            }
        }
    })?;
    Ok(ConntrackWorker { tx })
}

/// Destroys the connected UDP sockets of the socket LB pointed at a backend that left the
/// serving set of their service ([`super::sockdiag`]; with `all_netns`, pods' too); `false` when
/// the kernel cannot destroy sockets (logged once, not tried again).
fn destroy_stale_udp_sockets(dp: &BpfDataplane, services: &ServingSets, all_netns: bool) -> bool {
    let targets = match dp.stale_udp_sockets(services) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "reading the socket LB's sockets");
            return true;
        }
    };
    match super::sockdiag::destroy_connected(&targets, all_netns) {
        Ok(0) => {}
        Ok(n) => info!(destroyed = n, "connected UDP sockets to backends that stopped serving"),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            warn!(
                "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY): connected UDP sockets keep a backend that stopped serving"
            );
            return false;
        }
        Err(e) => warn!(error = %e, "destroying connected UDP sockets"),
    }
    true
}

/// The garbage collection's state between runs, per family.
#[derive(Default)]
struct Gc {
    evictions: [EvictionCounter; 2],
    last_evictions: [Option<u64>; 2],
}

impl Gc {
    fn run(
        &mut self,
        dp: &mut BpfDataplane,
        report: &impl Fn(&'static str, &GcReport, u64, Duration),
    ) {
        let now = super::monotonic_ns();
        for (i, family) in ["IPv4", "IPv6"].into_iter().enumerate() {
            let started = Instant::now();
            let r = if i == 0 { dp.conntrack_gc(now).map(Some) } else { dp.conntrack_gc6(now) };
            match r {
                Ok(Some(r)) => self.collected(i, family, &r, started.elapsed(), report),
                // Pins without IPv6 maps.
                Ok(None) => {}
                Err(e) => warn!(family, error = %e, "conntrack garbage collection failed"),
            }
        }
    }

    fn collected(
        &mut self,
        i: usize,
        family: &'static str,
        r: &GcReport,
        took: Duration,
        report: &impl Fn(&'static str, &GcReport, u64, Duration),
    ) {
        let ev = self.evictions[i].update(&r.stats);
        report(family, r, ev, took);
        if let Some(last) = self.last_evictions[i]
            && ev > last
        {
            warn!(
                family,
                evicted = ev - last,
                capacity = r.stats.capacity,
                "connection-tracking table full: entries evicted (raise --max-conntrack)"
            );
        }
        self.last_evictions[i] = Some(ev);
        let took_ms = took.as_secs_f64() * 1e3;
        if r.deleted > 0 || r.revnat_deleted > 0 {
            info!(
                family,
                deleted = r.deleted,
                revnat_deleted = r.revnat_deleted,
                entries = r.stats.entries,
                took_ms,
                "conntrack garbage collection"
            );
        } else {
            debug!(family, entries = r.stats.entries, took_ms, "conntrack garbage collection");
        }
    }
}

#[cfg(test)]
mod tests {
    use kproxy_common::proto;

    use super::*;

    #[test]
    fn evictions_are_what_is_neither_deleted_nor_present() {
        let s = CtStats {
            created: 100,
            deleted_datapath: 3,
            deleted_agent: 7,
            entries: 60,
            capacity: 64,
        };
        assert_eq!(s.evictions(), 30);
        // Pins older than the counters: never negative.
        assert_eq!(CtStats { created: 1, entries: 5, ..s }.evictions(), 0);
        let mut c = EvictionCounter::default();
        assert_eq!(c.update(&s), 30);
        // A walk that saw entries created after the counters were read: the counter holds.
        assert_eq!(c.update(&CtStats { entries: 70, ..s }), 30);
        assert_eq!(c.update(&CtStats { created: 110, ..s }), 40);
        assert_eq!(s.rows()[5], ("conntrack_evictions", 30));
    }

    #[test]
    fn expiry_follows_state_and_tolerates_newer_timestamps() {
        let s = 1_000_000_000;
        assert!(!expired(proto::UDP, ct_state::NEW, 100 * s, 130 * s));
        assert!(expired(proto::UDP, ct_state::NEW, 100 * s, 131 * s));
        assert!(!expired(proto::UDP, ct_state::ESTABLISHED, 100 * s, 131 * s));
        assert!(!expired(proto::TCP, ct_state::ESTABLISHED, 100 * s, 10_000 * s));
        // Touched by the datapath after the collector read the clock.
        assert!(!expired(proto::TCP, ct_state::CLOSED, 200 * s, 100 * s));
    }

    #[test]
    fn reconciler_picks_udp_flows_of_the_listed_services_to_backends_outside_their_set() {
        let t = |p| Tuple4 { saddr: 1, daddr: 2, sport: 3, dport: 4, proto: p, _pad: [0; 3] };
        let v = |svc_id, backend_addr| Ct4Value {
            svc_id,
            backend_addr,
            backend_port: 53,
            ..Default::default()
        };
        let services: ServingSets = [(7, [(10, 53), (11, 53)].into_iter().collect())].into();
        // Listed UDP service, backend no longer serving: stale.
        assert!(stale_udp_flow::<V4>(&t(proto::UDP), &v(7, 12), &services));
        // Serving backend; same address on another port is another backend.
        assert!(!stale_udp_flow::<V4>(&t(proto::UDP), &v(7, 10), &services));
        assert!(stale_udp_flow::<V4>(
            &t(proto::UDP),
            &Ct4Value { backend_port: 54, ..v(7, 10) },
            &services
        ));
        // TCP keeps its connections; services not listed are not looked at.
        assert!(!stale_udp_flow::<V4>(&t(proto::TCP), &v(7, 12), &services));
        assert!(!stale_udp_flow::<V4>(&t(proto::UDP), &v(8, 12), &services));
    }

    #[test]
    fn reply_tuple_with_and_without_snat() {
        let t = Tuple4 { saddr: 1, daddr: 2, sport: 3, dport: 4, proto: proto::TCP, _pad: [0; 3] };
        let mut v = Ct4Value { backend_addr: 9, backend_port: 8, ..Default::default() };
        let r = reply_tuple(&t, &v);
        assert_eq!((r.saddr, r.daddr, r.sport, r.dport), (9, 1, 8, 3));
        v.flags = ct_flags::SNAT;
        v.snat_addr = 7;
        v.snat_port = 6;
        let r = reply_tuple(&t, &v);
        assert_eq!((r.saddr, r.daddr, r.sport, r.dport), (9, 7, 8, 6));
    }
}
