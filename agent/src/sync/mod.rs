//! Applies the desired state to a [`Dataplane`], writing only differences, in batches.
//!
//! The syncer keeps a shadow copy of exactly what is programmed (Katran's shadow state). The
//! service ports whose rendering differs from the shadow are written together, phase by phase,
//! each phase as batched map writes (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` in the BPF
//! dataplane), in the order that never shows the datapath a half-written service:
//!
//! 1. backends the ports need that are missing or changed,
//! 2. backend slots at new keys (invisible: above the programmed count),
//! 3. changed slots at existing keys (each still names a live backend),
//! 4. the service entries (slot 0) with the new count and flags,
//! 5. slots above the new counts.
//!
//! Every service port is its own transaction: if one of its writes fails (map full), its writes
//! so far are undone in reverse order, it keeps its previous state (or stays absent), the error
//! names it, and the other ports go on; a backend written for it alone is removed again at the
//! end. Then frontends that are no longer wanted are removed (all service entries first, then
//! their slots), and last backends that nothing references any more.
//!
//! Ids: service ids are per service port and stable while it exists; backend ids are per backend
//! (address, port, protocol), handed out lowest free first so that they stay dense (the shadow
//! holds the backends in a vector indexed by id). A freed id is handed out only after the backend
//! was deleted from the map, which moves the backend generation on: a tracked connection then
//! looks its backend up again and, finding another address under the id, sees its own gone (it
//! is never moved to the id's new backend). Slot order is kept stable across syncs (a removed
//! backend's slot is refilled by a new one or by the last slot) so one changed endpoint costs a
//! few writes.
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
//! Source ranges (`loadBalancerSourceRanges`) are part of a port's transaction: networks it
//! gains are written after the backends and before its service entries (which carry the
//! `SOURCE_RANGES` flag), networks it loses after its slots, so a restricted frontend never
//! lacks its networks; a port that goes away loses its networks after its frontends.
//!
//! Closed service addresses (the addresses of ClusterIP, external-IP and load-balancer
//! frontends that are no node address: the datapath rejects their ports without frontend) follow
//! the programmed service entries: counted per address as the entries are written and removed,
//! and written after the frontends of a sync (removed after them too). The service CIDRs (from
//! the model's [`Changes`]: `--service-cidr` and ServiceCIDR objects) are written after them when
//! they changed; a failed write keeps the previous ones and is retried by the next sync.
//!
//! UDP flows: a backend that stops serving stays in the maps while its endpoint exists (tracked
//! TCP connections keep working), so a UDP flow tracked to it would stay there. The report lists
//! the UDP service ports whose serving set lost a member (every UDP port on the first sync, which
//! may follow a restart) with the set, for the conntrack reconciler
//! ([`crate::dataplane::conntrack`]) to delete the flows to other backends, as kube-proxy's
//! does. A port without serving endpoints is left alone (kube-proxy's rule too).
use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque, hash_map::Entry},
    hash::BuildHasher as _,
};

use kproxy_common::{Backend4, Service4Key, Service4Value, backend_flags, svc_flags};
use smallvec::SmallVec;

pub mod v6;

use crate::{
    dataplane::{BatchError, Dataplane, DataplaneError, SourceRange},
    model::{
        Changes, DesiredState, Frontend, NameMap, ServiceName, ServicePortName, ServicePortState,
        SharedStr,
    },
};

/// Hash maps keyed by numbers the syncer itself derives (ids, map keys): a fast hasher.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

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
    /// Writing the closed service addresses failed (retried on the next sync).
    #[error("closed service addresses: {0}")]
    ServiceAddrs(#[source] DataplaneError),
    /// Writing the service CIDRs failed (retried on the next sync; the previous ones stay).
    #[error("service CIDRs: {0}")]
    ServiceCidrs(#[source] DataplaneError),
    /// Writing the IPv6 node configuration failed (retried on the next sync).
    #[error("IPv6 node configuration: {0}")]
    Config6(#[source] DataplaneError),
    /// An IPv6 frontend another service port holds; the rest of the port is programmed.
    #[error("service {service} (IPv6): frontend {frontend} is held by {owner}; frontend refused")]
    Conflict6 {
        /// `namespace/name:port/PROTO` asking for it.
        service: String,
        /// The frontend.
        frontend: String,
        /// The service port holding it.
        owner: String,
    },
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
            SyncError::ServiceAddrs(_) => "service_addrs",
            SyncError::ServiceCidrs(_) => "service_cidrs",
            SyncError::Config6(_) => "config",
            SyncError::Conflict6 { .. } => "frontend_conflict",
        }
    }

    /// Whether the datapath refused or failed a write or read (a full map, a failed syscall): the
    /// sync failed, as a failed nftables transaction fails kube-proxy's. A service port with more
    /// backends than a service entry counts is refused on its own, like an invalid object, and
    /// trying again would not help.
    pub fn is_datapath_failure(&self) -> bool {
        !matches!(self, SyncError::TooManyBackends { .. } | SyncError::Conflict6 { .. })
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
    /// The same for IPv6 UDP service ports.
    pub udp_reconcile6: Vec<UdpServing<kproxy_common::Addr6>>,
}

/// The serving backends of one UDP service port: tracked UDP flows of this service id to any
/// other backend are to be deleted. `A` is the address as the connection table holds it (`u32`
/// for IPv4, `Addr6` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpServing<A: Eq + std::hash::Hash = u32> {
    /// Service id (`Ct4Value::svc_id`, `Ct6Value::svc_id`).
    pub svc_id: u32,
    /// Serving backends: (address, port), both big-endian as in the connection table.
    pub serving: HashSet<(A, u16)>,
}

/// Moves the id counter `next` past every id in `ids` (ids are never 0).
fn skip_ids(next: &mut u32, ids: impl IntoIterator<Item = u32>) {
    if let Some(max) = ids.into_iter().max()
        && max >= *next
    {
        *next = max.wrapping_add(1).max(1);
    }
}

/// Whether the flows of a UDP port whose serving set is now `new` must be reconciled: the set
/// lost a member since `old`, or, for a port without a previous set, this is the agent's first
/// sync (flows left by a previous agent). A port with nothing serving keeps its flows (nothing
/// to move them to).
fn udp_reconcile_needed<A: Ord>(
    old: Option<&BTreeSet<(A, u16)>>,
    new: &BTreeSet<(A, u16)>,
    synced: bool,
) -> bool {
    !new.is_empty()
        && match old {
            Some(old) => old.iter().any(|b| !new.contains(b)),
            None => !synced,
        }
}

/// Identity of a backend in the datapath: address (be) << 32 | port (be) << 16 | protocol << 8.
/// The low byte is free for the flags a service port gives it (see [`with_flags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey(u64);

fn backend_key(b: &Backend4) -> BackendKey {
    BackendKey((u64::from(b.addr) << 32) | (u64::from(b.port) << 16) | (u64::from(b.proto) << 8))
}

/// A backend key with the flags one service port gives it, packed into one word.
fn with_flags(k: BackendKey, flags: u8) -> u64 {
    k.0 | u64::from(flags)
}

fn unpack(w: u64) -> (BackendKey, u8) {
    (BackendKey(w & !0xff), w as u8)
}

/// Backend ids (far ids from maps an agent that did not reuse ids wrote aside) stay below this,
/// so that a port's record packs the flags it gives a backend into the id's top bits.
const ID_LIMIT: u32 = 1 << 30;

/// A backend id with the flags (LOCAL, TERMINATING) one service port gives it.
fn pack_id(id: u32, flags: u8) -> u32 {
    debug_assert!(id < ID_LIMIT);
    id | (u32::from(flags & (backend_flags::LOCAL | backend_flags::TERMINATING)) << 30)
}

fn unpack_id(w: u32) -> (u32, u8) {
    (w & (ID_LIMIT - 1), (w >> 30) as u8)
}

/// The backend (flags 0) of key `k`.
fn backend_of(k: BackendKey) -> Backend4 {
    Backend4 {
        addr: (k.0 >> 32) as u32,
        port: (k.0 >> 16) as u16,
        proto: (k.0 >> 8) as u8,
        flags: 0,
    }
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

/// The value of backend slot naming `backend_id` in service `svc_id`.
fn slot_value(backend_id: u32, svc_id: u32) -> Service4Value {
    Service4Value { backend_id, svc_id, ..Default::default() }
}

/// A backend slot held in [`Front::slots`]: the two fields of the values kproxy writes
/// ([`slot_value`]), half the size of a whole value. A value with other fields set (not
/// kproxy's) is held whole in [`Shadow::odd_slots`] besides.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Slot {
    backend_id: u32,
    svc_id: u32,
}

impl Slot {
    /// An absent slot: kproxy never writes a slot without a backend id (an all-zero value read
    /// back counts as absent).
    const NONE: Slot = Slot { backend_id: 0, svc_id: 0 };
    /// Stands for an odd value whose own two fields are zero (not to be taken for [`Slot::NONE`]).
    const ODD: Slot = Slot { backend_id: 0, svc_id: u32::MAX };

    fn value(self) -> Service4Value {
        slot_value(self.backend_id, self.svc_id)
    }
}

/// What the services map holds for one frontend: its service entry and its backend slots.
#[derive(Debug, Default, Clone)]
struct Front {
    /// Slot 0.
    entry: Option<Service4Value>,
    /// Slots 1.. (index 0 is slot 1); [`Slot::NONE`] where the key is absent.
    slots: Vec<Slot>,
}

impl Front {
    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.slots.is_empty()
    }
}

/// The backend ids: what the backends map holds at each, the number of service slots naming it
/// and, for the id of a backend key, the number of desired service ports wanting that key, in
/// one entry of 16 bytes; and the index from key to id. Backend ids are handed out lowest free
/// first ([`ShadowBackends::want`]), so they stay dense and the entries sit in a vector indexed
/// by id; the index is a hash table of ids alone (5 bytes a bucket), the key read from the entry.
/// A key-to-{id, ports} table and an id-to-{value, count} table took 17 bytes a bucket each, at
/// 57–76% load: 4.5 → 2.3 MB at 100,000 backends, 17.8 → 7.4 MB at 300,000. Ids far above the
/// others (adopted from maps an agent that did not reuse ids wrote) are held in a hash table
/// beside the vector. A slot may name an id the map does not hold (a state a crash left): the
/// entry then holds the count alone; and the map may hold two ids of one key (likewise): the
/// index names the lowest.
#[derive(Debug, Default)]
struct ShadowBackends {
    /// Entries by id (index 0 unused) for ids below its length.
    dense: Vec<ShadowBackend>,
    /// Entries of ids at or above `dense.len()`.
    sparse: FastMap<u32, ShadowBackend>,
    /// Entries whose value the map holds.
    held: usize,
    /// Ids below `dense.len()` whose entry emptied, lowest first (an id taken again since is
    /// skipped when it comes up).
    free: BinaryHeap<Reverse<u32>>,
    /// Ids never handed out ([`Syncer::avoid_backend_ids`]).
    avoid: FastSet<u32>,
    /// Backend key → its id (the entries with [`ShadowBackend::KEYED`]).
    keys: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug, Default, Clone, Copy)]
struct ShadowBackend {
    /// The value the map holds ([`ShadowBackend::HELD`]); else, for a keyed id, the key's
    /// backend (its flags not yet known).
    value: Backend4,
    /// Slots naming the id, with [`ShadowBackend::HELD`] set when the map holds `value` and
    /// [`ShadowBackend::KEYED`] while the id is its key's.
    refs: u32,
    /// Desired service ports wanting the key (keyed ids only).
    ports: u32,
}

// One per backend id, in the dense vector.
const _: () = assert!(size_of::<ShadowBackend>() == 16);

impl ShadowBackend {
    const HELD: u32 = 1 << 31;
    const KEYED: u32 = 1 << 30;

    fn held(&self) -> bool {
        self.refs & Self::HELD != 0
    }

    fn keyed(&self) -> bool {
        self.refs & Self::KEYED != 0
    }

    fn count(&self) -> u32 {
        self.refs & !(Self::HELD | Self::KEYED)
    }

    /// Neither value, nor count, nor key: the id is free.
    fn is_free(&self) -> bool {
        self.refs == 0
    }
}

impl ShadowBackends {
    /// Ids up to this far above twice the backends held (or keyed) go into the vector.
    const DENSE_SLACK: usize = 4096;

    fn entry(&self, id: u32) -> Option<&ShadowBackend> {
        lookup(&self.dense, &self.sparse, id).filter(|e| !e.is_free())
    }

    /// The entry of `id`, made (free) if there is none.
    fn entry_mut(&mut self, id: u32) -> &mut ShadowBackend {
        let i = id as usize;
        if i >= self.dense.len() && i <= 2 * self.held.max(self.keys.len()) + Self::DENSE_SLACK {
            self.grow(i + 1);
        }
        match self.dense.get_mut(i) {
            Some(e) => e,
            None => self.sparse.entry(id).or_default(),
        }
    }

    /// Makes the vector `len` long for id `len - 1` (the caller fills its entry); the ids on the
    /// way are free unless the hash table held them.
    fn grow(&mut self, len: usize) {
        let from = self.dense.len().max(1);
        if self.dense.capacity() < len {
            // An eighth of slack, not the vector's doubling: the vector is most of this table.
            let more = (len - self.dense.len()).max(len / 8).max(1024);
            self.dense.reserve_exact(more);
        }
        self.dense.resize(len, ShadowBackend::default());
        for id in from..len {
            let id = id as u32;
            match self.sparse.remove(&id) {
                Some(e) => self.dense[id as usize] = e,
                None if id as usize + 1 < len => self.free.push(Reverse(id)),
                None => {}
            }
        }
    }

    /// Called after `id`'s entry changed: a free entry is dropped (hash table) or offered again.
    fn settle(&mut self, id: u32) {
        match self.dense.get(id as usize) {
            Some(e) => {
                if e.is_free() && id != 0 {
                    self.free.push(Reverse(id));
                }
            }
            None => {
                if self.sparse.get(&id).is_some_and(ShadowBackend::is_free) {
                    self.sparse.remove(&id);
                }
            }
        }
    }

    fn get(&self, id: &u32) -> Option<&Backend4> {
        self.entry(*id).filter(|e| e.held()).map(|e| &e.value)
    }

    fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    /// Number of backends held.
    fn len(&self) -> usize {
        self.held
    }

    /// The backends held.
    fn iter(&self) -> impl Iterator<Item = (u32, Backend4)> + '_ {
        let dense = self.dense.iter().enumerate().map(|(id, e)| (id as u32, e));
        dense
            .chain(self.sparse.iter().map(|(id, e)| (*id, e)))
            .filter(|(_, e)| e.held())
            .map(|(id, e)| (id, e.value))
    }

    /// The ids of the backends held.
    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(id, _)| id)
    }

    /// Records `value` at `id`; returns the value it replaced.
    fn insert(&mut self, id: u32, value: Backend4) -> Option<Backend4> {
        let e = self.entry_mut(id);
        let old = e.held().then_some(e.value);
        e.value = value;
        e.refs |= ShadowBackend::HELD;
        self.held += usize::from(old.is_none());
        old
    }

    /// Forgets the value at `id` (its count stays, and its key while ports want it); returns it.
    fn remove(&mut self, id: &u32) -> Option<Backend4> {
        let old = self.get(id).copied()?;
        let e = self.entry_mut(*id);
        e.refs &= !ShadowBackend::HELD;
        let unkey = e.keyed() && e.ports == 0;
        self.held -= 1;
        if unkey {
            self.unkey(*id);
        } else {
            self.settle(*id);
        }
        Some(old)
    }

    /// One more slot names `id`.
    fn add_ref(&mut self, id: u32) {
        self.entry_mut(id).refs += 1;
    }

    /// One slot naming `id` went; true when it was the last.
    fn drop_ref(&mut self, id: u32) -> bool {
        if self.entry(id).is_none_or(|e| e.count() == 0) {
            return false;
        }
        let e = self.entry_mut(id);
        e.refs -= 1;
        let last = e.count() == 0;
        self.settle(id);
        last
    }

    /// Whether a slot names `id`.
    fn referenced(&self, id: u32) -> bool {
        self.entry(id).is_some_and(|e| e.count() > 0)
    }

    /// The id of key `k`.
    fn key_id(&self, k: BackendKey) -> Option<u32> {
        let (dense, sparse) = (&self.dense, &self.sparse);
        self.keys
            .find(self.hasher.hash_one(k), |&id| entry_key(dense, sparse, id) == Some(k))
            .copied()
    }

    /// The id of key `k` and the number of ports wanting it.
    fn key_info(&self, k: BackendKey) -> Option<(u32, u32)> {
        let id = self.key_id(k)?;
        Some((id, self.entry(id).map_or(0, |e| e.ports)))
    }

    /// Makes `id` the id of its value's key.
    fn key(&mut self, id: u32) {
        let e = self.entry_mut(id);
        e.refs |= ShadowBackend::KEYED;
        let k = backend_key(&e.value);
        let (dense, sparse, hasher) = (&self.dense, &self.sparse, &self.hasher);
        self.keys.insert_unique(hasher.hash_one(k), id, |&i| {
            hasher.hash_one(entry_key(dense, sparse, i).unwrap_or(BackendKey(0)))
        });
    }

    /// `id` is no longer its key's.
    fn unkey(&mut self, id: u32) {
        let Some(k) = entry_key(&self.dense, &self.sparse, id) else { return };
        if let Ok(slot) = self.keys.find_entry(self.hasher.hash_one(k), |&i| i == id) {
            slot.remove();
        }
        let e = self.entry_mut(id);
        e.refs &= !ShadowBackend::KEYED;
        e.ports = 0;
        self.settle(id);
    }

    /// The id of backend `b`'s key: its own, or the lowest free one for a new key.
    fn key_for(&mut self, b: Backend4) -> u32 {
        let k = backend_key(&b);
        match self.key_id(k) {
            Some(id) => id,
            None => {
                let id = self.alloc();
                let e = self.entry_mut(id);
                e.value = Backend4 { flags: 0, ..b };
                self.key(id);
                id
            }
        }
    }

    /// One more port wants backend `b`'s key: its id.
    fn want(&mut self, b: Backend4) -> u32 {
        let id = self.key_for(b);
        self.entry_mut(id).ports += 1;
        id
    }

    /// A keyed id that no port wants and the map does not hold is free again.
    fn settle_key(&mut self, id: u32) {
        if self.entry(id).is_some_and(|e| e.keyed() && e.ports == 0 && !e.held()) {
            self.unkey(id);
        }
    }

    /// The key of keyed id `id`.
    fn key_of(&self, id: u32) -> Option<BackendKey> {
        entry_key(&self.dense, &self.sparse, id)
    }

    /// One port wanting keyed id `id` went: an id left without ports and value is free again.
    fn unwant(&mut self, id: u32) {
        if self.key_of(id).is_none() {
            return;
        }
        let e = self.entry_mut(id);
        e.ports = e.ports.saturating_sub(1);
        if e.ports == 0 && !e.held() {
            self.unkey(id);
        }
    }

    /// The lowest free id (never 0 nor an avoided one); the caller fills its entry.
    fn alloc(&mut self) -> u32 {
        while let Some(Reverse(id)) = self.free.pop() {
            if self.dense[id as usize].is_free() && !self.avoid.contains(&id) {
                return id;
            }
        }
        let mut id = self.dense.len().max(1) as u32;
        while self.avoid.contains(&id) || self.sparse.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        // Avoided ids skipped on the way are offered by `grow` and dropped when they come up.
        id
    }
}

/// The entry of `id` in the vector or the hash table.
fn lookup<'a>(
    dense: &'a [ShadowBackend],
    sparse: &'a FastMap<u32, ShadowBackend>,
    id: u32,
) -> Option<&'a ShadowBackend> {
    match dense.get(id as usize) {
        Some(e) => Some(e),
        None => sparse.get(&id),
    }
}

/// The key of keyed id `id`.
fn entry_key(
    dense: &[ShadowBackend],
    sparse: &FastMap<u32, ShadowBackend>,
    id: u32,
) -> Option<BackendKey> {
    lookup(dense, sparse, id).filter(|e| e.keyed()).map(|e| backend_key(&e.value))
}

/// The shadow copy: exactly what the maps hold, as far as this process knows, with indexes kept
/// up to date by every change: the frontends of each service id and, for each backend id, how
/// many slots name it.
#[derive(Debug, Default)]
struct Shadow {
    /// Boxed, as the syncer's ports: the table's free buckets then cost a pointer each.
    fronts: FastMap<Service4Key, Box<Front>>,
    /// Slot values with more than a backend and service id set (never kproxy's own writes, so
    /// normally empty), by key; their [`Front::slots`] entry is a placeholder.
    odd_slots: FastMap<Service4Key, Service4Value>,
    /// Backend id → its value and the number of slots naming it.
    backends: ShadowBackends,
    /// Service id → its programmed frontends (slot-0 keys).
    frontends_of: FrontendsOf,
    /// Backend ids whose last slot went away since the last clear.
    unreferenced: Vec<u32>,
    /// Number of slot-0 entries.
    frontends: usize,
    /// Number of backend slots (keys with a slot above 0).
    slots: usize,
    /// Service id → its programmed source ranges (network be, prefix length).
    ranges: FastMap<u32, BTreeSet<(u32, u8)>>,
    /// Address (be) → programmed service entries that make it a closed service address.
    closed_refs: FastMap<u32, u32>,
    /// Addresses whose count went from or to zero since the last clear.
    closed_changed: Vec<u32>,
}

/// Service id → its programmed frontends: one 12-byte entry per (id, frontend) in a table that
/// holds an id as often as it has frontends (a map to lists took 32 bytes a bucket, with half
/// the buckets free at 30,000 services).
#[derive(Debug, Default)]
struct FrontendsOf {
    table: hashbrown::HashTable<IdFront>,
    hasher: foldhash::fast::RandomState,
}

/// A service id and one of its frontends (a slot-0 key without its slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdFront {
    id: u32,
    addr: u32,
    port: u16,
    proto: u8,
    scope: u8,
}

impl IdFront {
    fn new(id: u32, k: &Service4Key) -> Self {
        Self { id, addr: k.addr, port: k.port, proto: k.proto, scope: k.scope }
    }

    fn key(&self) -> Service4Key {
        let (addr, port, proto, scope) = (self.addr, self.port, self.proto, self.scope);
        Service4Key { addr, port, proto, scope, slot: 0, _pad: 0 }
    }
}

impl FrontendsOf {
    fn insert(&mut self, id: u32, k: &Service4Key) {
        let hasher = &self.hasher;
        self.table
            .insert_unique(hasher.hash_one(id), IdFront::new(id, k), |e| hasher.hash_one(e.id));
    }

    fn remove(&mut self, id: u32, k: &Service4Key) {
        let e = IdFront::new(id, k);
        if let Ok(found) = self.table.find_entry(self.hasher.hash_one(id), |x| *x == e) {
            found.remove();
        }
    }

    /// The frontends of service `id`.
    fn of(&self, id: u32) -> impl Iterator<Item = Service4Key> + '_ {
        self.table.iter_hash(self.hasher.hash_one(id)).filter(move |e| e.id == id).map(IdFront::key)
    }
}

/// The frontend kinds whose addresses are closed service addresses.
const CLOSED_KINDS: u16 = svc_flags::CLUSTER_IP | svc_flags::EXTERNAL_IP | svc_flags::LOAD_BALANCER;

impl Shadow {
    /// Counts a service entry written (`delta` 1) or removed (-1) for the closed addresses.
    fn count_closed(&mut self, k: &Service4Key, v: &Service4Value, add: bool) {
        if v.flags & CLOSED_KINDS == 0 {
            return;
        }
        let n = self.closed_refs.entry(k.addr).or_default();
        if add {
            *n += 1;
            if *n == 1 {
                self.closed_changed.push(k.addr);
            }
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.closed_refs.remove(&k.addr);
                self.closed_changed.push(k.addr);
            }
        }
    }
}

impl Shadow {
    fn get(&self, k: &Service4Key) -> Option<Service4Value> {
        self.slot(self.fronts.get(&frontend_of(k))?, k)
    }

    /// The value at key `k` (slot 0: the entry) of frontend `front`.
    fn slot(&self, front: &Front, k: &Service4Key) -> Option<Service4Value> {
        if k.slot == 0 {
            return front.entry;
        }
        let s = *front.slots.get(k.slot as usize - 1).filter(|s| **s != Slot::NONE)?;
        if !self.odd_slots.is_empty()
            && let Some(v) = self.odd_slots.get(k)
        {
            return Some(*v);
        }
        Some(s.value())
    }

    fn insert_service(&mut self, k: Service4Key, v: Service4Value) {
        self.remove_service(&k);
        let front = self.fronts.entry(frontend_of(&k)).or_default();
        if k.slot == 0 {
            front.entry = Some(v);
            self.frontends += 1;
            self.frontends_of.insert(v.svc_id, &k);
            self.count_closed(&k, &v, true);
        } else {
            let i = k.slot as usize - 1;
            if front.slots.len() <= i {
                // Exact growth for the usual few slots (no doubling slack kept for good), the
                // vector's own growth for large services.
                if i < 64 {
                    front.slots.reserve_exact(i + 1 - front.slots.len());
                }
                front.slots.resize(i + 1, Slot::NONE);
            }
            let slot = Slot { backend_id: v.backend_id, svc_id: v.svc_id };
            front.slots[i] = if slot.value() == v {
                slot
            } else {
                self.odd_slots.insert(k, v);
                if slot == Slot::NONE { Slot::ODD } else { slot }
            };
            self.backends.add_ref(v.backend_id);
            self.slots += 1;
        }
    }

    fn remove_service(&mut self, k: &Service4Key) -> Option<Service4Value> {
        let fk = frontend_of(k);
        let front = self.fronts.get_mut(&fk)?;
        let old = if k.slot == 0 {
            front.entry.take()?
        } else {
            let i = k.slot as usize - 1;
            let s = *front.slots.get(i).filter(|s| **s != Slot::NONE)?;
            let odd = if self.odd_slots.is_empty() { None } else { self.odd_slots.remove(k) };
            let v = odd.unwrap_or(s.value());
            front.slots[i] = Slot::NONE;
            while front.slots.last() == Some(&Slot::NONE) {
                front.slots.pop();
            }
            v
        };
        if front.is_empty() {
            self.fronts.remove(&fk);
        }
        if k.slot == 0 {
            self.frontends -= 1;
            self.count_closed(k, &old, false);
            self.frontends_of.remove(old.svc_id, k);
        } else {
            self.slots -= 1;
            if self.backends.drop_ref(old.backend_id) {
                self.unreferenced.push(old.backend_id);
            }
        }
        Some(old)
    }

    fn referenced(&self, id: u32) -> bool {
        self.backends.referenced(id)
    }

    /// Every programmed key of one frontend: the entry first, then the slots from the lowest.
    fn keys_of(&self, f: &Service4Key) -> Vec<Service4Key> {
        let Some(front) = self.fronts.get(f) else { return Vec::new() };
        let entry = front.entry.map(|_| *f);
        let slots = front
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != Slot::NONE)
            .map(|(i, _)| Service4Key { slot: i as u16 + 1, ..*f });
        entry.into_iter().chain(slots).collect()
    }
}

/// How many of the service ports wanting a backend give it the LOCAL flag (its pod is on this
/// node) and the TERMINATING flag; held only while either is non-zero.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FlagCounts {
    local: u32,
    terminating: u32,
}

impl FlagCounts {
    /// What one port giving a backend `flags` adds to its counts.
    fn of(flags: u8) -> Self {
        Self {
            local: u32::from(flags & backend_flags::LOCAL != 0),
            terminating: u32::from(flags & backend_flags::TERMINATING != 0),
        }
    }
}

/// The flags programmed for a backend wanted by `ports` service ports with `counts`: LOCAL if
/// any port says so, TERMINATING only if all do.
fn backend_flags_of(ports: u32, counts: FlagCounts) -> u8 {
    let mut f = 0;
    if counts.local > 0 {
        f |= backend_flags::LOCAL;
    }
    if ports > 0 && counts.terminating == ports {
        f |= backend_flags::TERMINATING;
    }
    f
}

/// What the syncer remembers of one service port: its service id and, of its desired state as
/// last given, a fingerprint and what removal and the backend counts need (not the state).
#[derive(Debug)]
struct PortRecord {
    /// Port name and protocol (the service is the key of the map holding it).
    port: SharedStr,
    proto: u8,
    svc_id: u32,
    /// Hash of the desired state (an equal state is not looked at again once applied).
    hash: u64,
    /// Its backends, each once: their ids with the flags it gives them ([`pack_id`]; the ids
    /// are their keys' while the port wants them).
    backends: Box<[u32]>,
    /// Its desired frontends (slot-0 keys).
    frontends: Box<[Service4Key]>,
    /// Whether the desired state is programmed.
    applied: bool,
}

fn state_hash(s: &ServicePortState) -> u64 {
    use std::hash::BuildHasher as _;
    // Compared only within this process: a fast fixed-seed hash (SipHash cost a few % of a
    // from-scratch sync).
    foldhash::fast::FixedState::default().hash_one(s)
}

/// The backends one service port wants, each once (LOCAL if any copy says so, TERMINATING if
/// all do), sorted.
fn port_backends(s: &ServicePortState) -> Vec<u64> {
    let mut v: Vec<u64> = s
        .endpoints
        .iter()
        .chain(s.frontends.values().flat_map(|e| e.backends.iter()))
        .map(|b| {
            let m = b.to_map();
            with_flags(backend_key(&m), m.flags)
        })
        .collect();
    v.sort_unstable();
    // Merge the copies of one backend: adjacent after sorting (the key is in the high bits).
    let mut out: Vec<u64> = Vec::with_capacity(v.len());
    for w in v {
        let (k, f) = unpack(w);
        match out.last_mut() {
            Some(last) if unpack(*last).0 == k => {
                let (_, g) = unpack(*last);
                let local = (f | g) & backend_flags::LOCAL;
                let term = f & g & backend_flags::TERMINATING;
                *last = with_flags(k, local | term);
            }
            _ => out.push(w),
        }
    }
    out
}

/// Keeps the datapath equal to the desired state. See the module documentation.
#[derive(Debug, Default)]
pub struct Syncer {
    shadow: Shadow,
    /// Backend key → how many of the ports wanting it give it LOCAL or TERMINATING, for the keys
    /// where either count is non-zero.
    flag_counts: FastMap<BackendKey, FlagCounts>,
    /// Service → its ports as last given. Boxed: the table's free buckets (up to half of them
    /// right after it doubles) then cost a pointer each, not a port record.
    ports: NameMap<ServiceName, Box<SmallVec<[PortRecord; 1]>>>,
    /// Service ids held by ports.
    svc_ids_used: FastSet<u32>,
    next_svc_id: u32,
    /// UDP service port → its serving endpoints as last programmed.
    udp_serving: NameMap<ServicePortName, BTreeSet<(std::net::Ipv4Addr, u16)>>,
    /// Whether a sync ran: the first one reconciles every UDP port's flows.
    synced: bool,
    /// The closed service addresses programmed (be).
    closed_programmed: FastSet<u32>,
    /// The node's addresses (be): never closed, whatever frontends they carry.
    node_addrs: FastSet<u32>,
    /// The service CIDRs last given (`None`: never, they are left as they are) and whether
    /// they are programmed.
    service_cidrs: Option<Vec<ipnet::Ipv4Net>>,
    service_cidrs_written: bool,
    /// The IPv6 side.
    v6: v6::Syncer6,
    /// IPv6 services are not programmed (`--enable-ipv6` off): the IPv6 side is synced to
    /// nothing, so what an earlier agent programmed goes too.
    ipv6_off: bool,
    /// The IPv6 services left out while IPv6 is off were reported.
    ipv6_off_reported: bool,
}

/// Most service ports planned and written in one round. A from-scratch sync of tens of
/// thousands of ports then holds the plans and write batches of a thousand at a time, not of
/// all of them (several times the ports' own size, and what fragments the heap most); the
/// batches stay large enough that the number of map calls does not matter.
const ROUND_PORTS: usize = 1024;

/// One write of a port's transaction, with what undoes it.
#[derive(Debug, Clone, Copy)]
struct Undo {
    key: Service4Key,
    old: Option<Service4Value>,
}

/// The writes one service port needs, by phase.
#[derive(Debug, Default)]
struct PortPlan {
    /// Index into the round's names.
    name: usize,
    new_slots: Vec<(Service4Key, Service4Value)>,
    changed_slots: Vec<(Service4Key, Service4Value)>,
    entries: Vec<(Service4Key, Service4Value)>,
    /// Slots above the new count, highest first per frontend.
    deletes: Vec<Service4Key>,
    /// Writes done so far, to undo on failure.
    undo: Vec<Undo>,
    /// Source ranges to add (before the service entries) and to remove (after the slots).
    ranges_add: Vec<SourceRange>,
    ranges_del: Vec<SourceRange>,
    /// Source-range writes done so far (true: added), to undo on failure.
    range_undo: Vec<(SourceRange, bool)>,
    failed: bool,
}

/// A backend written in phase 1 and the ports that needed it.
struct PlannedBackend {
    id: u32,
    value: Backend4,
    needers: SmallVec<[u32; 2]>,
}

/// The writes of one round of service ports, executed phase by phase.
struct Round {
    ports: Vec<PortPlan>,
    backends: Vec<PlannedBackend>,
}

impl Syncer {
    /// A syncer for empty maps.
    pub fn new() -> Self {
        Self { next_svc_id: 1, v6: v6::Syncer6::new(), ..Default::default() }
    }

    /// A syncer that adopts what `dp` already holds (after a restart): the maps become the shadow
    /// and their ids are reused.
    pub fn adopt(dp: &dyn Dataplane) -> Result<Self, SyncError> {
        let mut s = Self::new();
        if let Some(d6) = dp.as_v6() {
            s.v6 = v6::Syncer6::adopt(d6)?;
        }
        // The backends before the slots that name them, in increasing id order: the shadow's
        // vector grows with the backends held, so the ids of a map written with dense ids land
        // in it. Slots first counted every id in the table of far ids while none was held yet:
        // 300,000 entries at 30,000 services x 10 endpoints, a table of 11 MB that stayed
        // allocated, empty, once the backends moved the ids to the vector (RSS 72-76 MiB after a
        // restart over a 30,000-service run's maps, 61-62 MiB after a clean start).
        let mut held = dp.backends().map_err(SyncError::Read)?;
        held.sort_unstable_by_key(|(id, _)| *id);
        for (id, b) in held {
            s.shadow.backends.insert(id, b);
        }
        // The highest slots first, so that each frontend's slot vector is made at its length
        // once: in the map's order it grew a few times per frontend, and the smaller vectors
        // left holes in the heap among what the syncer keeps (0.4 MiB of RSS after a restart
        // over a 30,000-service run's maps).
        let mut services = dp.services().map_err(SyncError::Read)?;
        services.sort_unstable_by_key(|(k, _)| Reverse(k.slot));
        for (k, v) in services {
            s.shadow.insert_service(k, v);
        }
        s.shadow.unreferenced.clear();
        for r in dp.source_ranges().map_err(SyncError::Read)? {
            s.shadow.ranges.entry(r.svc_id).or_default().insert((r.addr, r.len));
        }
        s.closed_programmed = dp.service_addrs().map_err(SyncError::Read)?.into_iter().collect();
        // Compare every counted address with what is programmed on the first sync.
        s.shadow.closed_changed = s.shadow.closed_refs.keys().copied().collect();
        s.shadow.closed_changed.extend(s.closed_programmed.iter().copied());
        // The lowest id of a key is its key's (the iteration is in increasing id order but for
        // the far ids, which come last); an id from `ID_LIMIT` up is no key's, its backend gets a
        // new id on the first sync.
        let ids: Vec<(u32, Backend4)> = s.shadow.backends.iter().collect();
        for (id, b) in ids {
            if id < ID_LIMIT && s.shadow.backends.key_id(backend_key(&b)).is_none() {
                s.shadow.backends.key(id);
            }
        }
        s.next_svc_id =
            s.shadow
                .fronts
                .values()
                .filter_map(|f| f.entry.map(|e| e.svc_id))
                .chain(
                    s.shadow.fronts.values().flat_map(|f| {
                        f.slots.iter().filter(|v| **v != Slot::ODD).map(|v| v.svc_id)
                    }),
                )
                .chain(s.shadow.odd_slots.values().map(|v| v.svc_id))
                .max()
                .map_or(1, |m| m + 1);
        Ok(s)
    }

    /// Makes sure no id in `ids` is handed out: after a restart the agent passes the backend ids
    /// that tracked connections still name, so that a backend freed just before the restart (and
    /// so absent from the backends map) is not reborn under the same id.
    pub fn avoid_backend_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        let held = &self.shadow.backends;
        let ids: Vec<u32> = ids.into_iter().filter(|id| !held.contains_key(id)).collect();
        self.shadow.backends.avoid.extend(ids);
    }

    /// [`Self::avoid_backend_ids`] for the IPv6 backend ids that tracked IPv6 connections name.
    pub fn avoid_backend_ids6(&mut self, ids: impl IntoIterator<Item = u32>) {
        skip_ids(&mut self.v6.next_backend_id, ids);
    }

    /// Sets the node's local addresses (every interface's, as kube-proxy counts them): they are
    /// never closed service addresses (an externalIP or load-balancer IP may be a node address;
    /// the node's own ports on it stay open). Applied by the next sync.
    pub fn set_node_addrs(&mut self, addrs: &[std::net::Ipv4Addr]) {
        let new: FastSet<u32> = addrs.iter().map(|a| u32::from(*a).to_be()).collect();
        let changed: Vec<u32> = new.symmetric_difference(&self.node_addrs).copied().collect();
        self.shadow.closed_changed.extend(changed);
        self.node_addrs = new;
    }

    /// Sets the node's IPv6 NodePort addresses (the IPv6 source NAT address). Applied by the
    /// next sync.
    pub fn set_node_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        self.v6.set_node_addrs(addrs);
    }

    /// Sets the node's local IPv6 addresses (every interface's): never closed service
    /// addresses. Applied by the next sync.
    pub fn set_local_addrs6(&mut self, addrs: &[std::net::Ipv6Addr]) {
        self.v6.set_local_addrs(addrs);
    }

    /// Whether IPv6 services are programmed (`--enable-ipv6`; on unless switched off here).
    pub fn set_ipv6(&mut self, on: bool) {
        self.ipv6_off = !on;
    }

    /// The IPv6 side.
    pub fn v6(&self) -> &v6::Syncer6 {
        &self.v6
    }

    /// Number of programmed closed service addresses.
    pub fn programmed_service_addrs(&self) -> usize {
        self.closed_programmed.len()
    }

    /// Number of programmed frontends (service entries).
    pub fn programmed_frontends(&self) -> usize {
        self.shadow.frontends
    }

    /// Number of programmed service entries (the services map's keys: frontends and their
    /// backend slots).
    pub fn programmed_service_entries(&self) -> usize {
        self.shadow.frontends + self.shadow.slots
    }

    /// Number of programmed backends.
    pub fn programmed_backends(&self) -> usize {
        self.shadow.backends.len()
    }

    /// The service id of a service port, if it has one.
    pub fn service_id(&self, name: &ServicePortName) -> Option<u32> {
        self.record(name).map(|r| r.svc_id)
    }

    fn record(&self, name: &ServicePortName) -> Option<&PortRecord> {
        self.ports.get(&name.service)?.iter().find(|r| r.port == name.port && r.proto == name.proto)
    }

    fn record_mut(&mut self, name: &ServicePortName) -> Option<&mut PortRecord> {
        self.ports
            .get_mut(&name.service)?
            .iter_mut()
            .find(|r| r.port == name.port && r.proto == name.proto)
    }

    /// Removes the record of a port; returns it.
    fn take_record(&mut self, name: &ServicePortName) -> Option<PortRecord> {
        let list = self.ports.get_mut(&name.service)?;
        let i = list.iter().position(|r| r.port == name.port && r.proto == name.proto)?;
        let r = list.remove(i);
        if list.is_empty() {
            self.ports.remove(&name.service);
        }
        Some(r)
    }

    /// Brings `dp` to `desired` (every service), writing only differences: anything programmed
    /// that `desired` does not hold is removed. Never fails as a whole: failures are in the
    /// report, and the affected services keep their previous state.
    pub fn sync(&mut self, desired: &DesiredState, dp: &mut dyn Dataplane) -> SyncReport {
        let mut report = self.apply(desired.services.clone(), None, dp);
        self.apply6(&desired.services6, None, dp, &mut report);
        report
    }

    /// Applies the model's [`Changes`]: a full sync when they are full, else only the services
    /// they name (their ports replace the ones they had); nothing else is looked at. The port
    /// states are taken out of `changes`.
    pub fn sync_changes(&mut self, changes: &mut Changes, dp: &mut dyn Dataplane) -> SyncReport {
        if let Some(nets) = changes.service_cidrs.take()
            && self.service_cidrs.as_ref() != Some(&nets)
        {
            self.service_cidrs = Some(nets);
            self.service_cidrs_written = false;
        }
        if let Some(nets) = changes.service_cidrs6.take() {
            self.v6.set_service_cidrs(nets);
        }
        let ports = std::mem::take(&mut changes.state.services);
        let scope = (!changes.full).then_some(&changes.services);
        let mut report = self.apply(ports, scope, dp);
        self.apply6(&changes.state.services6, scope, dp, &mut report);
        report
    }

    /// The IPv6 side of a sync, after the IPv4 one (whose ids it takes); nothing when the
    /// datapath has no IPv6 maps.
    fn apply6(
        &mut self,
        desired: &std::collections::BTreeMap<ServicePortName, crate::model::v6::PortState6>,
        scope: Option<&BTreeSet<ServiceName>>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let Some(d6) = dp.as_v6_mut() else { return };
        let none = std::collections::BTreeMap::new();
        let desired = if self.ipv6_off {
            if !desired.is_empty() && !self.ipv6_off_reported {
                tracing::warn!(
                    ports = desired.len(),
                    example = %desired.keys().next().map(|n| n.to_string()).unwrap_or_default(),
                    "services have IPv6 addresses: not programmed without --enable-ipv6"
                );
                self.ipv6_off_reported = true;
            }
            &none
        } else {
            desired
        };
        let mut v6 = std::mem::take(&mut self.v6);
        v6.apply(desired, scope, &|n| self.service_id(n), d6, report);
        self.v6 = v6;
    }

    /// The flags programmed for backend `k`, wanted by `ports` service ports
    /// ([`backend_flags_of`]).
    fn flags_of(&self, k: BackendKey, ports: u32) -> u8 {
        let counts = if self.flag_counts.is_empty() {
            FlagCounts::default()
        } else {
            self.flag_counts.get(&k).copied().unwrap_or_default()
        };
        backend_flags_of(ports, counts)
    }

    /// One more port wants `backends` (keys with the flags it gives them): their ids with those
    /// flags, for the port's record.
    fn want_add(&mut self, backends: &[u64], touched: &mut FastSet<BackendKey>) -> Box<[u32]> {
        let mut ids = Vec::with_capacity(backends.len());
        for &w in backends {
            let (k, flags) = unpack(w);
            ids.push(pack_id(self.shadow.backends.want(backend_of(k)), flags));
            let add = FlagCounts::of(flags);
            if add != FlagCounts::default() {
                let c = self.flag_counts.entry(k).or_default();
                c.local += add.local;
                c.terminating += add.terminating;
            }
            touched.insert(k);
        }
        ids.into_boxed_slice()
    }

    /// A port's record of `backends` ([`Self::want_add`]) goes.
    fn want_sub(&mut self, backends: &[u32], touched: &mut FastSet<BackendKey>) {
        for &w in backends {
            let (id, flags) = unpack_id(w);
            let Some(k) = self.shadow.backends.key_of(id) else { continue };
            self.shadow.backends.unwant(id);
            let sub = FlagCounts::of(flags);
            if sub != FlagCounts::default()
                && let Entry::Occupied(mut e) = self.flag_counts.entry(k)
            {
                let c = e.get_mut();
                c.local -= sub.local;
                c.terminating -= sub.terminating;
                if *c == FlagCounts::default() {
                    e.remove();
                }
            }
            touched.insert(k);
        }
    }

    /// The sync: `scope` `None` means `desired` is everything, else it holds the new ports of
    /// the services in `scope`.
    fn apply(
        &mut self,
        desired: std::collections::BTreeMap<ServicePortName, ServicePortState>,
        scope: Option<&BTreeSet<ServiceName>>,
        dp: &mut dyn Dataplane,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut touched: FastSet<BackendKey> = FastSet::default();
        self.shadow.unreferenced.clear();

        // Service ports that go away (with the ids they held).
        let removed: Vec<(ServicePortName, u32)> = {
            let mut out = Vec::new();
            let mut collect = |service: &ServiceName, list: &SmallVec<[PortRecord; 1]>| {
                for r in list {
                    let name = ServicePortName {
                        service: service.clone(),
                        port: r.port.clone(),
                        proto: r.proto,
                    };
                    if !desired.contains_key(&name) {
                        out.push((name, r.svc_id));
                    }
                }
            };
            match scope {
                None => self.ports.iter().for_each(|(s, l)| collect(s, l)),
                Some(services) => services
                    .iter()
                    .filter_map(|s| self.ports.get_key_value(s))
                    .for_each(|(s, l)| collect(s, l)),
            }
            out
        };
        for (name, _) in &removed {
            if let Some(r) = self.take_record(name) {
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
            match self.record_mut(&name) {
                Some(r) if r.hash == hash => {
                    if !r.applied {
                        pending.push((name, state));
                    }
                    continue;
                }
                Some(r) => {
                    let old = std::mem::take(&mut r.backends);
                    r.hash = hash;
                    r.frontends = state.frontends.keys().map(|f| key_of(f, 0)).collect();
                    r.applied = false;
                    // Wanted again before the old ones go: a backend in both keeps its id.
                    let new = self.want_add(&port_backends(&state), &mut touched);
                    self.want_sub(&old, &mut touched);
                    if let Some(r) = self.record_mut(&name) {
                        r.backends = new;
                    }
                }
                None => {
                    let backends = self.want_add(&port_backends(&state), &mut touched);
                    let svc_id = self.svc_id_for(state.frontends.keys());
                    self.ports.entry(name.service.clone()).or_default().push(PortRecord {
                        port: name.port.clone(),
                        proto: name.proto,
                        svc_id,
                        hash,
                        backends,
                        frontends: state.frontends.keys().map(|f| key_of(f, 0)).collect(),
                        applied: false,
                    });
                }
            }
            pending.push((name, state));
        }
        self.write_ports(pending, dp, &mut report);
        self.synced = true;

        // Frontends nobody wants any more: every service entry first, then the slots.
        let stale: BTreeSet<Service4Key> = match scope {
            None => {
                let wanted: FastSet<Service4Key> = self
                    .ports
                    .values()
                    .flat_map(|l| l.iter().flat_map(|r| r.frontends.iter().copied()))
                    .collect();
                self.shadow.fronts.keys().filter(|f| !wanted.contains(*f)).copied().collect()
            }
            Some(_) => {
                // The frontends still programmed under the ids of the ports just written or
                // removed, that those ports no longer want.
                let mut stale = BTreeSet::new();
                let ids = removed.iter().map(|(_, id)| (*id, None)).chain(
                    given.iter().filter_map(|n| self.record(n).map(|r| (r.svc_id, Some(r)))),
                );
                for (id, record) in ids {
                    for k in self.shadow.frontends_of.of(id) {
                        if !record.is_some_and(|r| r.frontends.contains(&k)) {
                            stale.insert(k);
                        }
                    }
                }
                stale
            }
        };
        self.remove_frontends(stale, dp, &mut report);
        self.remove_stale_ranges(scope.is_none(), &removed, dp, &mut report);
        self.write_service_addrs(dp, &mut report);
        self.write_service_cidrs(dp, &mut report);
        self.remove_backends(scope.is_none(), &touched, dp, &mut report);
        self.update_backend_flags(&touched, dp, &mut report);
        // The ids of the ports that went away are free now (not earlier: a new port taking over
        // a removed port's frontend must not adopt its id while that frontend is stale).
        for (_, id) in &removed {
            self.svc_ids_used.remove(id);
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
        if udp_reconcile_needed(self.udp_serving.get(name), &serving, self.synced)
            && let Some(svc_id) = self.record(name).map(|r| r.svc_id)
        {
            report.udp_reconcile.push(UdpServing {
                svc_id,
                serving: serving.iter().map(|(a, p)| (u32::from(*a).to_be(), p.to_be())).collect(),
            });
        }
        self.udp_serving.insert(name.clone(), serving);
    }

    /// Writes the pending ports in rounds of at most [`ROUND_PORTS`] (a round never has two
    /// ports on one frontend, which the model does not produce anyway) and records which are
    /// programmed. Each round's states are dropped once it is written.
    fn write_ports(
        &mut self,
        pending: Vec<(ServicePortName, ServicePortState)>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut pending = VecDeque::from(pending);
        while !pending.is_empty() {
            let mut claimed: FastSet<Service4Key> = FastSet::default();
            let mut now = Vec::with_capacity(pending.len().min(ROUND_PORTS));
            // Ports on a frontend of this round's: first in the next round, in their order.
            let mut later = Vec::new();
            while now.len() < ROUND_PORTS
                && let Some((name, st)) = pending.pop_front()
            {
                let keys: SmallVec<[Service4Key; 4]> =
                    st.frontends.keys().map(|f| key_of(f, 0)).collect();
                if keys.iter().any(|k| claimed.contains(k)) {
                    later.push((name, st));
                } else {
                    claimed.extend(keys);
                    now.push((name, st));
                }
            }
            for p in later.into_iter().rev() {
                pending.push_front(p);
            }
            let names: Vec<&ServicePortName> = now.iter().map(|(n, _)| n).collect();
            let mut round = Round { ports: Vec::with_capacity(now.len()), backends: Vec::new() };
            let mut backend_at: FastMap<u32, usize> = FastMap::default();
            let mut ok = vec![false; now.len()];
            for (i, (name, state)) in now.iter().enumerate() {
                match self.plan_port(i, name, state, &mut round, &mut backend_at) {
                    Ok(Some(plan)) => round.ports.push(plan),
                    Ok(None) => ok[i] = true,
                    Err(e) => report.errors.push(e),
                }
            }
            self.execute(&mut round, &names, dp, report);
            for p in &round.ports {
                ok[p.name] = !p.failed;
            }
            for (i, name) in names.iter().enumerate() {
                if let Some(r) = self.record_mut(name) {
                    r.applied = ok[i];
                }
            }
            for (i, (name, state)) in now.into_iter().enumerate() {
                if ok[i] {
                    self.note_udp_serving(&name, state.udp_serving, report);
                }
            }
        }
    }

    /// The writes port `name` needs to reach `state` (`None`: none), resolving backend ids
    /// (fresh ones are kept only if written) and adding its backends to the round's.
    fn plan_port(
        &mut self,
        index: usize,
        name: &ServicePortName,
        state: &ServicePortState,
        round: &mut Round,
        backend_at: &mut FastMap<u32, usize>,
    ) -> Result<Option<PortPlan>, SyncError> {
        let svc_id = self.record(name).map_or(0, |r| r.svc_id);
        let mut plan = PortPlan { name: index, ..Default::default() };
        let mut ids: Vec<u32> = Vec::new();
        let mut needed: Vec<(u32, Backend4)> = Vec::new();
        for (f, entry) in &state.frontends {
            ids.clear();
            for b in &entry.backends {
                ids.push(self.shadow.backends.key_for(b.to_map()));
            }
            let count = u16::try_from(ids.len()).map_err(|_| SyncError::TooManyBackends {
                service: name.to_string(),
                count: ids.len(),
                max: u16::MAX as usize,
            })?;
            let fk = key_of(f, 0);
            let front = self.shadow.fronts.get(&fk);
            let old: Vec<u32> = match front.and_then(|fr| fr.entry.map(|e| (fr, e.count))) {
                Some((fr, n)) => (1..=n)
                    .filter_map(|s| self.shadow.slot(fr, &Service4Key { slot: s, ..fk }))
                    .map(|v| v.backend_id)
                    .collect(),
                None => Vec::new(),
            };
            let layout = stable_layout(&old, &ids);
            if front.is_none() {
                plan.new_slots.reserve(layout.len());
            }
            for (i, id) in layout.iter().enumerate() {
                let k = Service4Key { slot: i as u16 + 1, ..fk };
                let v = slot_value(*id, svc_id);
                match front.and_then(|fr| self.shadow.slot(fr, &k)) {
                    None => plan.new_slots.push((k, v)),
                    Some(have) if have != v => plan.changed_slots.push((k, v)),
                    Some(_) => {}
                }
            }
            let ev = Service4Value {
                backend_id: 0,
                svc_id,
                count,
                flags: entry.flags,
                affinity_timeout: entry.affinity_timeout,
            };
            if front.and_then(|fr| fr.entry) != Some(ev) {
                plan.entries.push((fk, ev));
            }
            if let Some(fr) = front {
                for (i, v) in fr.slots.iter().enumerate().skip(layout.len()).rev() {
                    if *v != Slot::NONE {
                        plan.deletes.push(Service4Key { slot: i as u16 + 1, ..fk });
                    }
                }
            }
        }
        // Room for every write of the port up front: no regrowth (a from-scratch sync plans tens
        // of thousands of ports at once, and the copies regrowth leaves behind fragment the heap).
        plan.undo.reserve_exact(
            plan.new_slots.len()
                + plan.changed_slots.len()
                + plan.entries.len()
                + plan.deletes.len(),
        );
        for b in state.endpoints.iter().chain(state.frontends.values().flat_map(|e| &e.backends)) {
            let mut v = b.to_map();
            // A keyed id: its entry holds the ports wanting the key (no second lookup by key).
            let id = self.shadow.backends.key_for(v);
            let ports = self.shadow.backends.entry(id).map_or(0, |e| e.ports);
            v.flags = self.flags_of(backend_key(&v), ports);
            needed.push((id, v));
        }
        needed.sort_unstable_by_key(|(id, _)| *id);
        needed.dedup_by_key(|(id, _)| *id);
        let mut writes_backend = false;
        for (id, v) in needed {
            if self.shadow.backends.get(&id) == Some(&v) {
                continue;
            }
            writes_backend = true;
            match backend_at.entry(id) {
                Entry::Occupied(e) => round.backends[*e.get()].needers.push(index as u32),
                Entry::Vacant(e) => {
                    e.insert(round.backends.len());
                    round.backends.push(PlannedBackend {
                        id,
                        value: v,
                        needers: SmallVec::from_slice(&[index as u32]),
                    });
                }
            }
        }
        let want: BTreeSet<(u32, u8)> =
            state.source_ranges.iter().map(|(a, l)| (u32::from(*a).to_be(), *l)).collect();
        let have = self.shadow.ranges.get(&svc_id);
        let range = |(addr, len): &(u32, u8)| SourceRange { svc_id, addr: *addr, len: *len };
        plan.ranges_add =
            want.iter().filter(|r| !have.is_some_and(|h| h.contains(r))).map(range).collect();
        plan.ranges_del =
            have.into_iter().flatten().filter(|r| !want.contains(r)).map(range).collect();
        let writes = writes_backend
            || !plan.ranges_add.is_empty()
            || !plan.ranges_del.is_empty()
            || !plan.new_slots.is_empty()
            || !plan.changed_slots.is_empty()
            || !plan.entries.is_empty()
            || !plan.deletes.is_empty();
        Ok(writes.then_some(plan))
    }

    /// Runs a round's phases. Failed ports are rolled back as they fail; backends written for
    /// failed ports only are removed at the end.
    fn execute(
        &mut self,
        round: &mut Round,
        names: &[&ServicePortName],
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        // 1. Backends: new ones, then changed ones.
        let mut order: Vec<usize> = (0..round.backends.len()).collect();
        order.sort_by_key(|&i| self.shadow.backends.contains_key(&round.backends[i].id));
        let items: Vec<(u32, Backend4)> =
            order.iter().map(|&i| (round.backends[i].id, round.backends[i].value)).collect();
        let mut written: Vec<(u32, Option<Backend4>)> = Vec::new();
        let mut at = 0;
        while at < items.len() {
            let r = dp.put_backends(&items[at..]);
            let done = match &r {
                Ok(()) => items.len() - at,
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for (id, v) in &items[at..at + done] {
                let old = self.shadow.backends.insert(*id, *v);
                written.push((*id, old));
            }
            match r {
                Ok(()) => at = items.len(),
                Err(BatchError { done, error }) => {
                    let needers = round.backends[order[at + done]].needers.clone();
                    for p in needers {
                        if let Some(pi) = round.ports.iter().position(|x| x.name == p as usize)
                            && !round.ports[pi].failed
                        {
                            let source = clone_error(&error);
                            report.writes +=
                                self.fail(&mut round.ports[pi], names, source, dp, report);
                        }
                    }
                    at += done + 1;
                }
            }
        }
        // 1b. Source ranges the ports gain (before the entries that use them).
        self.write_ranges(true, round, names, dp, report);
        // 2-5. Slots at new keys, changed slots, service entries, slots above the counts.
        for phase in 0..4 {
            let mut items: Vec<(usize, Service4Key, Option<Service4Value>)> = Vec::new();
            for (pi, p) in round.ports.iter().enumerate() {
                if p.failed {
                    continue;
                }
                match phase {
                    0 => items.extend(p.new_slots.iter().map(|(k, v)| (pi, *k, Some(*v)))),
                    1 => items.extend(p.changed_slots.iter().map(|(k, v)| (pi, *k, Some(*v)))),
                    2 => items.extend(p.entries.iter().map(|(k, v)| (pi, *k, Some(*v)))),
                    _ => items.extend(p.deletes.iter().map(|k| (pi, *k, None))),
                }
            }
            self.write_phase(&items, &mut round.ports, names, dp, report);
        }
        // 6. Source ranges the ports lost (after the entries that no longer use them).
        self.write_ranges(false, round, names, dp, report);
        // Backends written for ports that all failed go again, last written first.
        let failed_ports: FastSet<usize> =
            round.ports.iter().filter(|p| p.failed).map(|p| p.name).collect();
        if !failed_ports.is_empty() {
            let orphaned: FastSet<u32> = round
                .backends
                .iter()
                .filter(|b| b.needers.iter().all(|n| failed_ports.contains(&(*n as usize))))
                .map(|b| b.id)
                .collect();
            for (id, old) in written.iter().rev().filter(|(id, _)| orphaned.contains(id)) {
                report.writes += 1;
                let r = match old {
                    None => dp.delete_backend(*id).map(|()| {
                        self.shadow.backends.remove(id);
                    }),
                    Some(v) => dp.put_backend(*id, v).map(|()| {
                        self.shadow.backends.insert(*id, *v);
                    }),
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "undoing a failed service update");
                }
            }
        }
        // Ids given to keys only for this round's writes (no port wants them) that were not
        // written are free again.
        for b in &round.backends {
            self.shadow.backends.settle_key(b.id);
        }
        report.services_changed += round.ports.iter().filter(|p| !p.failed).count();
    }

    /// Marks a port failed: reports it and undoes its writes so far, in reverse order; returns
    /// the number of writes made. A failed undo is logged and leaves the shadow describing what
    /// the map really holds.
    fn fail(
        &mut self,
        port: &mut PortPlan,
        names: &[&ServicePortName],
        source: DataplaneError,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) -> usize {
        port.failed = true;
        report.errors.push(SyncError::Service { service: names[port.name].to_string(), source });
        let mut writes = 0;
        // Removed ranges come back before the entries that used them, added ones go after.
        for (r, _) in port.range_undo.iter().rev().filter(|(_, added)| !added) {
            writes += 1;
            match dp.put_source_ranges(&[*r]) {
                Ok(()) => self.note_range(r, true),
                Err(e) => tracing::error!(error = %e.error, "undoing a failed service update"),
            }
        }
        while let Some(u) = port.undo.pop() {
            writes += 1;
            let r = match u.old {
                None => dp.delete_service(&u.key).map(|()| {
                    self.shadow.remove_service(&u.key);
                }),
                Some(v) => dp.put_service(&u.key, &v).map(|()| {
                    self.shadow.insert_service(u.key, v);
                }),
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "undoing a failed service update");
            }
        }
        for (r, _) in port.range_undo.iter().rev().filter(|(_, added)| *added) {
            writes += 1;
            match dp.delete_source_ranges(&[*r]) {
                Ok(()) => self.note_range(r, false),
                Err(e) => tracing::error!(error = %e.error, "undoing a failed service update"),
            }
        }
        port.range_undo.clear();
        writes
    }

    /// Records a source range as programmed (`present`) or not in the shadow.
    fn note_range(&mut self, r: &SourceRange, present: bool) {
        if present {
            self.shadow.ranges.entry(r.svc_id).or_default().insert((r.addr, r.len));
        } else if let Some(set) = self.shadow.ranges.get_mut(&r.svc_id) {
            set.remove(&(r.addr, r.len));
            if set.is_empty() {
                self.shadow.ranges.remove(&r.svc_id);
            }
        }
    }

    /// Writes the source ranges the round's live ports gain (`add`) or lose, in one batch; a
    /// failed write fails its port (undone) and the others go on.
    fn write_ranges(
        &mut self,
        add: bool,
        round: &mut Round,
        names: &[&ServicePortName],
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut items: Vec<(usize, SourceRange)> = Vec::new();
        for (pi, p) in round.ports.iter().enumerate().filter(|(_, p)| !p.failed) {
            let list = if add { &p.ranges_add } else { &p.ranges_del };
            items.extend(list.iter().map(|r| (pi, *r)));
        }
        let mut at = 0;
        while at < items.len() {
            let run: Vec<(usize, SourceRange)> =
                items[at..].iter().filter(|(pi, _)| !round.ports[*pi].failed).copied().collect();
            if run.is_empty() {
                return;
            }
            let keys: Vec<SourceRange> = run.iter().map(|(_, r)| *r).collect();
            let r = if add { dp.put_source_ranges(&keys) } else { dp.delete_source_ranges(&keys) };
            let done = match &r {
                Ok(()) => run.len(),
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for (pi, k) in &run[..done] {
                self.note_range(k, add);
                round.ports[*pi].range_undo.push((*k, add));
            }
            match r {
                Ok(()) => return,
                Err(BatchError { done, error }) => {
                    let (pi, k) = run[done];
                    report.writes += self.fail(&mut round.ports[pi], names, error, dp, report);
                    at = items
                        .iter()
                        .position(|x| x.1 == k && x.0 == pi)
                        .map_or(items.len(), |p| p + 1);
                }
            }
        }
    }

    /// Removes the source ranges of service ids no port holds any more (after their frontends):
    /// those of the ports just removed, or on a full sync every one not held.
    fn remove_stale_ranges(
        &mut self,
        full: bool,
        removed: &[(ServicePortName, u32)],
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let ids: BTreeSet<u32> = if full {
            let held: FastSet<u32> =
                self.ports.values().flat_map(|l| l.iter().map(|r| r.svc_id)).collect();
            self.shadow.ranges.keys().filter(|id| !held.contains(id)).copied().collect()
        } else {
            removed
                .iter()
                .map(|(_, id)| *id)
                .filter(|id| self.shadow.ranges.contains_key(id))
                .collect()
        };
        // A removed port's id may already belong to a new port of this sync (written above).
        let ids: Vec<u32> = ids.into_iter().filter(|id| !self.record_of_id(*id)).collect();
        let keys: Vec<SourceRange> = ids
            .iter()
            .flat_map(|id| {
                self.shadow.ranges.get(id).into_iter().flatten().map(|(addr, len)| SourceRange {
                    svc_id: *id,
                    addr: *addr,
                    len: *len,
                })
            })
            .collect();
        if keys.is_empty() {
            return;
        }
        let r = dp.delete_source_ranges(&keys);
        let done = match &r {
            Ok(()) => keys.len(),
            Err(e) => e.done,
        };
        report.writes += done + usize::from(r.is_err());
        for k in &keys[..done] {
            self.note_range(k, false);
        }
        if let Err(BatchError { done, error }) = r {
            report.errors.push(SyncError::Remove { what: keys[done].to_string(), source: error });
        }
    }

    /// Whether a port of the records holds service id `id`.
    fn record_of_id(&self, id: u32) -> bool {
        self.ports.values().any(|l| l.iter().any(|r| r.svc_id == id))
    }

    /// Brings the closed service addresses to the programmed service entries: the addresses
    /// whose count changed since the last sync are written or removed.
    fn write_service_addrs(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        let mut changed = std::mem::take(&mut self.shadow.closed_changed);
        changed.sort_unstable();
        changed.dedup();
        let (mut put, mut del) = (Vec::new(), Vec::new());
        for a in changed {
            let want = self.shadow.closed_refs.contains_key(&a) && !self.node_addrs.contains(&a);
            match (want, self.closed_programmed.contains(&a)) {
                (true, false) => put.push(a),
                (false, true) => del.push(a),
                _ => {}
            }
        }
        for (items, add) in [(put, true), (del, false)] {
            if items.is_empty() {
                continue;
            }
            let r =
                if add { dp.put_service_addrs(&items) } else { dp.delete_service_addrs(&items) };
            let done = match &r {
                Ok(()) => items.len(),
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for a in &items[..done] {
                if add {
                    self.closed_programmed.insert(*a);
                } else {
                    self.closed_programmed.remove(a);
                }
            }
            if let Err(BatchError { error, .. }) = r {
                // Retried on the next sync.
                self.shadow.closed_changed.extend(&items[done..]);
                report.errors.push(SyncError::ServiceAddrs(error));
            }
        }
    }

    /// Writes the service CIDRs when they changed (or their last write failed).
    fn write_service_cidrs(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        let Some(nets) = self.service_cidrs.as_ref().filter(|_| !self.service_cidrs_written) else {
            return;
        };
        report.writes += 1;
        match dp.set_service_cidrs(&crate::dataplane::guard::service_cidrs(nets)) {
            Ok(()) => self.service_cidrs_written = true,
            Err(e) => report.errors.push(SyncError::ServiceCidrs(e)),
        }
    }

    /// Writes one phase's service-map items (`None`: delete) in batches, in order. A failed item
    /// fails its port: its writes so far are undone and its later items are skipped.
    fn write_phase(
        &mut self,
        items: &[(usize, Service4Key, Option<Service4Value>)],
        ports: &mut [PortPlan],
        names: &[&ServicePortName],
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut at = 0;
        while at < items.len() {
            // The run of items of ports still alive, all puts or all deletes.
            if ports[items[at].0].failed {
                at += 1;
                continue;
            }
            let is_put = items[at].2.is_some();
            let mut end = at;
            while end < items.len()
                && !ports[items[end].0].failed
                && items[end].2.is_some() == is_put
            {
                end += 1;
            }
            let run = &items[at..end];
            let r = if is_put {
                let kv: Vec<(Service4Key, Service4Value)> =
                    run.iter().map(|(_, k, v)| (*k, v.expect("a put"))).collect();
                dp.put_services(&kv)
            } else {
                let keys: Vec<Service4Key> = run.iter().map(|(_, k, _)| *k).collect();
                dp.delete_services(&keys)
            };
            let done = match &r {
                Ok(()) => run.len(),
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for (pi, k, v) in &run[..done] {
                let old = match v {
                    Some(v) => {
                        let old = self.shadow.get(k);
                        self.shadow.insert_service(*k, *v);
                        old
                    }
                    None => self.shadow.remove_service(k),
                };
                ports[*pi].undo.push(Undo { key: *k, old });
            }
            match r {
                Ok(()) => at = end,
                Err(BatchError { done, error }) => {
                    let pi = run[done].0;
                    report.writes += self.fail(&mut ports[pi], names, error, dp, report);
                    at += done + 1;
                }
            }
        }
    }

    /// Removes frontends: all their service entries first, then their slots (highest first).
    fn remove_frontends(
        &mut self,
        stale: BTreeSet<Service4Key>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut failed: FastSet<Service4Key> = FastSet::default();
        let entries: Vec<Service4Key> =
            stale.iter().filter(|f| self.shadow.get(f).is_some()).copied().collect();
        self.delete_keys(&entries, &mut failed, dp, report);
        let slots: Vec<Service4Key> = stale
            .iter()
            .filter(|f| !failed.contains(*f))
            .flat_map(|f| self.shadow.keys_of(f).into_iter().filter(|k| k.slot != 0).rev())
            .collect();
        self.delete_keys(&slots, &mut failed, dp, report);
        report.frontends_removed += stale.len();
    }

    /// Deletes service-map keys in batches; a frontend whose delete fails is named in the
    /// report and its later keys are skipped (retried on the next sync).
    fn delete_keys(
        &mut self,
        keys: &[Service4Key],
        failed: &mut FastSet<Service4Key>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut at = 0;
        while at < keys.len() {
            let run: Vec<Service4Key> =
                keys[at..].iter().copied().filter(|k| !failed.contains(&frontend_of(k))).collect();
            if run.is_empty() {
                return;
            }
            let r = dp.delete_services(&run);
            let done = match &r {
                Ok(()) => run.len(),
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for k in &run[..done] {
                self.shadow.remove_service(k);
            }
            match r {
                Ok(()) => return,
                Err(BatchError { done, error }) => {
                    let k = run[done];
                    failed.insert(frontend_of(&k));
                    report.errors.push(SyncError::Remove { what: describe_key(&k), source: error });
                    at = keys.iter().position(|x| *x == k).map_or(keys.len(), |p| p + 1);
                }
            }
        }
    }

    /// Removes backends that no slot names and no port wants (or that are not the id of their
    /// key): all of them on a full sync, else those this sync touched.
    fn remove_backends(
        &mut self,
        full: bool,
        touched: &FastSet<BackendKey>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut candidates: Vec<u32> = if full {
            self.shadow.backends.ids().collect()
        } else {
            let mut c: Vec<u32> = std::mem::take(&mut self.shadow.unreferenced);
            c.extend(touched.iter().filter_map(|k| self.shadow.backends.key_id(*k)));
            c
        };
        candidates.sort_unstable();
        candidates.dedup();
        let gc: Vec<u32> = candidates
            .into_iter()
            .filter(|id| {
                let Some(e) = self.shadow.backends.entry(*id).filter(|e| e.held()) else {
                    return false;
                };
                let wanted = e.keyed() && e.ports > 0;
                !(wanted || self.shadow.referenced(*id))
            })
            .collect();
        let mut at = 0;
        while at < gc.len() {
            let r = dp.delete_backends(&gc[at..]);
            let done = match &r {
                Ok(()) => gc.len() - at,
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for id in &gc[at..at + done] {
                self.shadow.backends.remove(id);
                report.backends_removed += 1;
            }
            match r {
                Ok(()) => at = gc.len(),
                Err(BatchError { done, error }) => {
                    let id = gc[at + done];
                    report
                        .errors
                        .push(SyncError::Remove { what: format!("backend {id}"), source: error });
                    at += done + 1;
                }
            }
        }
    }

    /// Rewrites shared backends whose flags changed through other ports.
    fn update_backend_flags(
        &mut self,
        touched: &FastSet<BackendKey>,
        dp: &mut dyn Dataplane,
        report: &mut SyncReport,
    ) {
        let mut items: Vec<(u32, Backend4)> = touched
            .iter()
            .filter_map(|k| {
                let (id, ports) = self.shadow.backends.key_info(*k)?;
                let b = self.shadow.backends.get(&id)?;
                let flags = self.flags_of(*k, ports);
                (ports > 0 && b.flags != flags).then_some((id, Backend4 { flags, ..*b }))
            })
            .collect();
        items.sort_unstable_by_key(|(id, _)| *id);
        let mut at = 0;
        while at < items.len() {
            let r = dp.put_backends(&items[at..]);
            let done = match &r {
                Ok(()) => items.len() - at,
                Err(e) => e.done,
            };
            report.writes += done + usize::from(r.is_err());
            for (id, v) in &items[at..at + done] {
                self.shadow.backends.insert(*id, *v);
            }
            match r {
                Ok(()) => at = items.len(),
                Err(BatchError { done, error }) => {
                    let id = items[at + done].0;
                    report.errors.push(SyncError::Remove {
                        what: format!("backend {id} flags"),
                        source: error,
                    });
                    at += done + 1;
                }
            }
        }
    }

    /// A service id for a new port: adopted from a programmed frontend, or new.
    fn svc_id_for<'a>(&mut self, frontends: impl Iterator<Item = &'a Frontend>) -> u32 {
        let taken = &self.svc_ids_used;
        let adopted = frontends
            .filter_map(|f| self.shadow.get(&key_of(f, 0)))
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
        self.svc_ids_used.insert(id);
        id
    }
}

/// A copy of a write error (one failed backend fails every port that needed it).
fn clone_error(e: &DataplaneError) -> DataplaneError {
    match e {
        DataplaneError::Full { map, capacity, key } => {
            DataplaneError::Full { map, capacity: *capacity, key: key.clone() }
        }
        DataplaneError::Map { map, op, key, source } => DataplaneError::Map {
            map,
            op,
            key: key.clone(),
            source: match source.raw_os_error() {
                Some(errno) => std::io::Error::from_raw_os_error(errno),
                None => std::io::Error::new(source.kind(), source.to_string()),
            },
        },
    }
}

/// New slot order: backends that stay keep their slot, holes are refilled with new backends, then
/// with the last slots; remaining new backends are appended. With nothing programmed it is the
/// wanted order.
fn stable_layout(old: &[u32], want: &[u32]) -> Vec<u32> {
    if old.is_empty() {
        return want.to_vec();
    }
    let want_set: FastSet<u32> = want.iter().copied().collect();
    let mut seen = FastSet::default();
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

#[cfg(test)]
mod tests;
