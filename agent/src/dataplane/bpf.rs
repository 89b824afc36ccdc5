//! The aya implementation of [`Dataplane`](super::Dataplane): the pinned BPF maps of one node.
//!
//! Every map is opened from its pin under `<pin-path>/v1/<name>` and checked against the ABI
//! ([`MAP_SPECS`]) before use, so a stale pin from another layout is refused with a clear error
//! instead of being reinterpreted.
use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError, MapType, PerCpuArray};
use kproxy_common::{
    ABI_VERSION, Affinity4Key, Affinity4Value, Backend4, Ct4Value, Frag4Key, Frag4Value,
    NodeConfig, REASON_MAX, Reason, RevNat4Value, Service4Key, Service4Value, SockRev4Key,
    SockRev4Value, Tuple4, names,
};

use super::{BatchError, Dataplane, DataplaneError, batch, hints::Hints};

/// What the ABI says one pinned map must look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapSpec {
    /// Map name (also the pin file name).
    pub name: &'static str,
    /// Kernel map type.
    pub map_type: MapType,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Creation flags that must be set (`BPF_F_MMAPABLE` for the hint maps).
    pub flags: u32,
}

pub(super) const fn spec<K, V>(name: &'static str, map_type: MapType) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        flags: 0,
    }
}

/// `BPF_F_MMAPABLE`.
pub(super) const MMAPABLE: u32 = 1 << 10;

/// Every map of the ABI with its expected type and sizes, in [`names::ALL_MAPS`] order.
pub const MAP_SPECS: [MapSpec; 14] = [
    spec::<Service4Key, Service4Value>(names::SERVICES4, MapType::Hash),
    spec::<u32, Backend4>(names::BACKENDS4, MapType::Hash),
    spec::<Tuple4, Ct4Value>(names::CT4, MapType::LruHash),
    spec::<Tuple4, RevNat4Value>(names::REVNAT4, MapType::LruHash),
    spec::<Affinity4Key, Affinity4Value>(names::AFFINITY4, MapType::LruHash),
    spec::<u32, u64>(names::COUNTERS, MapType::PerCpuArray),
    spec::<u32, NodeConfig>(names::CONFIG, MapType::Array),
    spec::<Frag4Key, Frag4Value>(names::FRAG4, MapType::LruHash),
    spec::<u32, u64>(names::CT_COUNTERS, MapType::PerCpuArray),
    spec::<SockRev4Key, SockRev4Value>(names::SOCK4, MapType::LruHash),
    MapSpec { flags: MMAPABLE, ..spec::<u32, u64>(names::ADDR_BITS, MapType::Array) },
    MapSpec { flags: MMAPABLE, ..spec::<u32, u64>(names::PORT_BITS, MapType::Array) },
    spec::<u32, u32>(names::POD_DEVS, MapType::Hash),
    spec::<u32, u32>(names::HOOK_DEVS, MapType::Array),
];

/// `BPF_F_NO_PREALLOC` (LPM tries require it).
const NO_PREALLOC: u32 = 1;

/// The maps of the service guards and of the socket LB's scope, in [`names::GUARD_MAPS`] order:
/// pinned and checked like [`MAP_SPECS`]; opened by [`super::guard::GuardMaps`].
pub const GUARD_MAP_SPECS: [MapSpec; 5] = [
    MapSpec {
        flags: NO_PREALLOC,
        ..spec::<aya::maps::lpm_trie::Key<kproxy_common::SrcRange4>, u32>(
            names::SRC_RANGES4,
            MapType::LpmTrie,
        )
    },
    spec::<u32, u32>(names::SVC_ADDRS4, MapType::Hash),
    MapSpec { flags: MMAPABLE, ..spec::<u32, u64>(names::SVC_ADDR_BITS, MapType::Array) },
    spec::<u32, kproxy_common::ServiceCidrs4>(names::SVC_CIDRS4, MapType::Array),
    spec::<u32, kproxy_common::SockConfig>(names::SOCK_CONFIG, MapType::Array),
];

/// The maps of the IPv6 service guards, in [`names::GUARD_MAPS6`] order: pinned and checked
/// like [`MAP_SPECS`]; opened by [`super::guard::GuardMaps6`].
pub const GUARD_MAP_SPECS6: [MapSpec; 3] = [
    MapSpec {
        flags: NO_PREALLOC,
        ..spec::<aya::maps::lpm_trie::Key<kproxy_common::SrcRange6>, u32>(
            names::SRC_RANGES6,
            MapType::LpmTrie,
        )
    },
    spec::<kproxy_common::Addr6, u32>(names::SVC_ADDRS6, MapType::Hash),
    spec::<u32, kproxy_common::ServiceCidrs6>(names::SVC_CIDRS6, MapType::Array),
];

/// Every map kept pinned from one agent to the next, both families and the guards (per-CPU
/// scratch and cache maps live and die with their programs).
pub fn pinned_map_specs() -> impl Iterator<Item = &'static MapSpec> {
    const ALL: [&[MapSpec]; 4] =
        [&MAP_SPECS, &GUARD_MAP_SPECS, &super::bpf6::MAP_SPECS6, &GUARD_MAP_SPECS6];
    ALL.into_iter().flatten()
}

/// Kernel memory of the map `fd`, bytes: the `memlock` line of its fdinfo (Linux 6.4+ reports
/// what the map really uses, older kernels an estimate from its sizes).
pub fn map_memory(fd: BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no memlock line in the map's fdinfo"))
}

/// The versioned directory holding the map pins: `<pin_path>/v1`.
pub fn maps_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(format!("v{ABI_VERSION}"))
}

/// Checks the map pinned at `path` against `spec`; returns its `max_entries`.
pub(crate) fn check_pinned(path: &Path, spec: &MapSpec) -> anyhow::Result<(MapData, u32)> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let info = data.info().with_context(|| format!("reading info of {}", path.display()))?;
    let map_type = info.map_type().with_context(|| format!("map type of {}", path.display()))?;
    if map_type != spec.map_type
        || info.key_size() != spec.key_size
        || info.value_size() != spec.value_size
        || info.map_flags() & spec.flags != spec.flags
    {
        bail!(
            "pinned map {} does not match ABI v{ABI_VERSION}: found {:?} key {} value {} bytes, \
             expected {:?} key {} value {} bytes (remove it with `kproxy cleanup` or use another \
             --pin-path)",
            path.display(),
            map_type,
            info.key_size(),
            info.value_size(),
            spec.map_type,
            spec.key_size,
            spec.value_size
        );
    }
    Ok((data, info.max_entries()))
}

/// A hash map opened twice: aya's typed handle for single-entry operations and a file
/// descriptor of the same map for the batched ones ([`batch`]).
pub(super) struct Hash<K, V> {
    pub(super) map: HashMap<MapData, K, V>,
    fd: OwnedFd,
    /// `max_entries`.
    pub(super) capacity: u32,
}

impl<K, V> Hash<K, V> {
    /// The map's file descriptor, for [`batch`].
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl<K: aya::Pod, V: aya::Pod> Hash<K, V> {
    pub(super) fn open(dir: &Path, spec: &MapSpec) -> anyhow::Result<Self> {
        let (data, capacity) = check_pinned(&dir.join(spec.name), spec)?;
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating the fd of map {}", spec.name))?;
        let map = Map::from_map_data(data).with_context(|| format!("map {}", spec.name))?;
        Ok(Self { map: map.try_into()?, fd, capacity })
    }

    /// Every entry, read in batches.
    pub(super) fn collect(&self, name: &'static str) -> Result<Vec<(K, V)>, DataplaneError> {
        batch::collect(self.fd()).map_err(|source| DataplaneError::Map {
            map: name,
            op: "iterate",
            key: String::new(),
            source,
        })
    }
}

/// The pinned maps under `<pin-path>/v1/`, opened for reading and writing. Works whether or not
/// an agent is running (the CLI uses it too).
pub struct BpfDataplane {
    pub(super) services: Hash<Service4Key, Service4Value>,
    backends: Hash<u32, Backend4>,
    pub(super) ct: Hash<Tuple4, Ct4Value>,
    pub(super) ct_counters: PerCpuArray<MapData, u64>,
    pub(super) revnat: Hash<Tuple4, RevNat4Value>,
    pub(super) frag: Hash<Frag4Key, Frag4Value>,
    affinity: Hash<Affinity4Key, Affinity4Value>,
    pub(super) sock: Hash<kproxy_common::SockRev4Key, kproxy_common::SockRev4Value>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, NodeConfig>,
    /// Absent on pins of an agent from before them and in the conntrack worker's view.
    hints: Option<Hints>,
    /// The IPv6 maps (absent on pins of an agent from before them).
    pub(super) v6: Option<super::bpf6::Maps6>,
    /// Absent on pins of an agent from before them and in the conntrack worker's view.
    guards: Option<super::guard::GuardMaps>,
}

pub(super) fn open_map(dir: &Path, spec: &MapSpec) -> anyhow::Result<Map> {
    let (data, _) = check_pinned(&dir.join(spec.name), spec)?;
    Map::from_map_data(data).with_context(|| format!("map {}", spec.name))
}

impl BpfDataplane {
    /// Opens the pinned maps under `pin_path` (the directory given as `--pin-path`), checking type,
    /// key and value sizes against the ABI.
    pub fn open(pin_path: &Path) -> anyhow::Result<Self> {
        Self::open_with(pin_path, true)
    }

    /// [`Self::open`] for a reader of the connection tables (the conntrack worker), which writes
    /// no service, backend or guard entry: the hint bitmaps and the service guards are left
    /// out. Each of those bitmaps the kernel maps whole into a process that maps it (544 KiB
    /// for the node's), so a second mapping would only add to the agent's memory.
    pub fn open_for_conntrack(pin_path: &Path) -> anyhow::Result<Self> {
        Self::open_with(pin_path, false)
    }

    fn open_with(pin_path: &Path, writer: bool) -> anyhow::Result<Self> {
        let dir = maps_dir(pin_path);
        let [svc, be, ct, rnat, aff, stats, cfg, frag, ctstat, sock, addrbits, portbits, _, _] =
            &MAP_SPECS;
        // Pins of an agent from before the hint maps have none: the writes then skip the hints
        // (its programs do not read them).
        let hints = if writer && dir.join(addrbits.name).exists() {
            check_pinned(&dir.join(addrbits.name), addrbits)?;
            check_pinned(&dir.join(portbits.name), portbits)?;
            Some(Hints::open(&dir)?)
        } else {
            None
        };
        let guards = if writer { super::guard::GuardMaps::open_if_pinned(&dir)? } else { None };
        Ok(Self {
            services: Hash::open(&dir, svc)?,
            backends: Hash::open(&dir, be)?,
            ct: Hash::open(&dir, ct)?,
            ct_counters: open_map(&dir, ctstat)?.try_into()?,
            revnat: Hash::open(&dir, rnat)?,
            frag: Hash::open(&dir, frag)?,
            affinity: Hash::open(&dir, aff)?,
            sock: Hash::open(&dir, sock)?,
            counters: open_map(&dir, stats)?.try_into()?,
            config: open_map(&dir, cfg)?.try_into()?,
            hints,
            v6: super::bpf6::Maps6::open_if_pinned(
                &dir,
                writer,
                guards.as_ref().map(|g| g.service_addr_bits()),
            )?,
            guards,
        })
    }

    /// The service-guard maps (absent on pins of an agent from before them).
    pub fn guards(&self) -> Option<&super::guard::GuardMaps> {
        self.guards.as_ref()
    }

    /// Writes the socket LB's configuration (which network namespaces it balances).
    pub fn set_sock_config(&mut self, c: &kproxy_common::SockConfig) -> Result<(), DataplaneError> {
        self.guards_mut()?.set_sock_config(c)
    }

    fn guards_mut(&mut self) -> Result<&mut super::guard::GuardMaps, DataplaneError> {
        self.guards.as_mut().ok_or_else(super::guard::missing)
    }

    /// Moves the backend generation on after backends were removed, so that connection entries
    /// look their backend up again (see `kproxy_common::NodeConfig::backend_gen`).
    pub(super) fn next_backend_gen(&mut self) -> Result<(), DataplaneError> {
        let cfg = self.config()?;
        let cfg = NodeConfig { backend_gen: cfg.backend_gen.wrapping_add(1), ..cfg };
        self.config.set(0, cfg, 0).map_err(|e| map_err(names::CONFIG, "update", "0", e))
    }

    /// The hint bitmaps (absent on pins of an agent from before them).
    pub fn hints(&self) -> Option<&Hints> {
        self.hints.as_ref()
    }

    /// Every connection-tracking entry.
    pub fn conntrack(&self) -> Result<Vec<(Tuple4, Ct4Value)>, DataplaneError> {
        self.ct.collect(names::CT4)
    }

    /// Every reverse-NAT entry.
    pub fn revnat(&self) -> Result<Vec<(Tuple4, RevNat4Value)>, DataplaneError> {
        self.revnat.collect(names::REVNAT4)
    }

    /// Every session-affinity entry.
    pub fn affinity(&self) -> Result<Vec<(Affinity4Key, Affinity4Value)>, DataplaneError> {
        self.affinity.collect(names::AFFINITY4)
    }

    /// The node configuration as programmed (zero before the first `set_config`).
    pub fn config(&self) -> Result<NodeConfig, DataplaneError> {
        self.config.get(&0, 0).map_err(|e| map_err(names::CONFIG, "lookup", "0", e))
    }

    /// Packet counters by reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for r in Reason::ALL {
            let idx = *r as u32;
            debug_assert!(idx < REASON_MAX);
            let per_cpu = self
                .counters
                .get(&idx, 0)
                .map_err(|e| map_err(names::COUNTERS, "lookup", &idx.to_string(), e))?;
            out.push((*r, per_cpu.iter().copied().sum()));
        }
        Ok(out)
    }

    /// Removes a connection-tracking entry (and nothing else); absent is not an error.
    pub fn delete_conntrack(&mut self, key: &Tuple4) -> Result<(), DataplaneError> {
        ignore_absent(self.ct.map.remove(key), names::CT4, key)
    }

    /// Removes a reverse-NAT entry; absent is not an error.
    pub fn delete_revnat(&mut self, key: &Tuple4) -> Result<(), DataplaneError> {
        ignore_absent(self.revnat.map.remove(key), names::REVNAT4, key)
    }
}

pub(super) fn syscall_errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

pub(super) fn map_err(
    map: &'static str,
    op: &'static str,
    key: &str,
    e: MapError,
) -> DataplaneError {
    let source = match e {
        MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other.to_string()),
    };
    DataplaneError::Map { map, op, key: key.to_owned(), source }
}

pub(super) fn ignore_absent<K: std::fmt::Debug>(
    r: Result<(), MapError>,
    map: &'static str,
    key: &K,
) -> Result<(), DataplaneError> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        Err(e) if syscall_errno(&e) == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(map, "delete", &format!("{key:?}"), e)),
    }
}

pub(super) fn update_err<K: std::fmt::Debug>(
    map: &'static str,
    capacity: u32,
    key: &K,
    e: MapError,
) -> DataplaneError {
    match e {
        MapError::SyscallError(s) => io_update_err(map, capacity, key, s.io_error),
        other => map_err(map, "update", &format!("{key:?}"), other),
    }
}

/// The error of a failed update of `key`: [`DataplaneError::Full`] when the map had no room.
fn io_update_err<K: std::fmt::Debug>(
    map: &'static str,
    capacity: u32,
    key: &K,
    source: io::Error,
) -> DataplaneError {
    match source.raw_os_error() {
        Some(libc::E2BIG) | Some(libc::ENOSPC) => {
            DataplaneError::Full { map, capacity, key: format!("{key:?}") }
        }
        _ => DataplaneError::Map { map, op: "update", key: format!("{key:?}"), source },
    }
}

/// Writes `items` to `map` in batches.
pub(super) fn put_batch<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &Hash<K, V>,
    name: &'static str,
    items: &[(K, V)],
) -> Result<(), BatchError> {
    batch::update(map.fd(), items).map_err(|s| BatchError {
        done: s.done,
        error: io_update_err(name, map.capacity, &items[s.done].0, s.error),
    })
}

/// Deletes `keys` from `map` in batches (absent keys are skipped).
pub(super) fn delete_batch<K: aya::Pod + std::fmt::Debug, V>(
    map: &Hash<K, V>,
    name: &'static str,
    keys: &[K],
) -> Result<(), BatchError> {
    batch::delete(map.fd(), keys).map(drop).map_err(|s| BatchError {
        done: s.done,
        error: DataplaneError::Map {
            map: name,
            op: "delete",
            key: format!("{:?}", keys[s.done]),
            source: s.error,
        },
    })
}

impl Dataplane for BpfDataplane {
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DataplaneError> {
        // The backend generation belongs to this map: every write moves it on (the caller's
        // value is ignored), so that no connection entry skips its backend check across it.
        let gen_ = self.config()?.backend_gen.wrapping_add(1);
        let cfg = NodeConfig { backend_gen: gen_, ..*cfg };
        self.config.set(0, cfg, 0).map_err(|e| map_err(names::CONFIG, "update", "0", e))
    }

    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), DataplaneError> {
        if let Some(h) = &self.hints {
            h.backend(backend);
        }
        self.backends
            .map
            .insert(id, backend, 0)
            .map_err(|e| update_err(names::BACKENDS4, self.backends.capacity, &id, e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        ignore_absent(self.backends.map.remove(&id), names::BACKENDS4, &id)?;
        self.next_backend_gen()
    }

    fn put_service(
        &mut self,
        key: &Service4Key,
        value: &Service4Value,
    ) -> Result<(), DataplaneError> {
        if let Some(h) = &self.hints {
            h.frontend(key);
        }
        self.services
            .map
            .insert(key, value, 0)
            .map_err(|e| update_err(names::SERVICES4, self.services.capacity, key, e))
    }

    fn delete_service(&mut self, key: &Service4Key) -> Result<(), DataplaneError> {
        ignore_absent(self.services.map.remove(key), names::SERVICES4, key)
    }

    fn put_backends(&mut self, items: &[(u32, Backend4)]) -> Result<(), BatchError> {
        if let Some(h) = &self.hints {
            items.iter().for_each(|(_, b)| h.backend(b));
        }
        put_batch(&self.backends, names::BACKENDS4, items)
    }

    fn delete_backends(&mut self, ids: &[u32]) -> Result<(), BatchError> {
        let r = delete_batch(&self.backends, names::BACKENDS4, ids);
        // Also after a partial failure: some backends may be gone.
        if let Err(e) = self.next_backend_gen() {
            tracing::warn!(error = %e, "moving the backend generation on");
        }
        r
    }

    fn put_services(&mut self, items: &[(Service4Key, Service4Value)]) -> Result<(), BatchError> {
        if let Some(h) = &self.hints {
            items.iter().for_each(|(k, _)| h.frontend(k));
        }
        put_batch(&self.services, names::SERVICES4, items)
    }

    fn delete_services(&mut self, keys: &[Service4Key]) -> Result<(), BatchError> {
        delete_batch(&self.services, names::SERVICES4, keys)
    }

    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>, DataplaneError> {
        self.services.collect(names::SERVICES4)
    }

    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError> {
        self.backends.collect(names::BACKENDS4)
    }

    fn put_source_ranges(&mut self, keys: &[super::SourceRange]) -> Result<(), BatchError> {
        let g = self.guards_mut().map_err(|error| BatchError { done: 0, error })?;
        g.put_source_ranges(keys)
    }

    fn delete_source_ranges(&mut self, keys: &[super::SourceRange]) -> Result<(), BatchError> {
        let g = self.guards_mut().map_err(|error| BatchError { done: 0, error })?;
        g.delete_source_ranges(keys)
    }

    fn source_ranges(&self) -> Result<Vec<super::SourceRange>, DataplaneError> {
        self.guards.as_ref().map_or(Ok(Vec::new()), |g| g.source_ranges())
    }

    fn put_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        let g = self.guards_mut().map_err(|error| BatchError { done: 0, error })?;
        g.put_service_addrs(addrs)
    }

    fn delete_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        let g = self.guards_mut().map_err(|error| BatchError { done: 0, error })?;
        g.delete_service_addrs(addrs)
    }

    fn service_addrs(&self) -> Result<Vec<u32>, DataplaneError> {
        self.guards.as_ref().map_or(Ok(Vec::new()), |g| g.service_addrs())
    }

    fn set_service_cidrs(
        &mut self,
        cidrs: &kproxy_common::ServiceCidrs4,
    ) -> Result<(), DataplaneError> {
        self.guards_mut()?.set_service_cidrs(cidrs)
    }

    fn as_v6(&self) -> Option<&dyn super::Dataplane6> {
        self.has_ipv6().then_some(self as &dyn super::Dataplane6)
    }

    fn as_v6_mut(&mut self) -> Option<&mut dyn super::Dataplane6> {
        if self.has_ipv6() { Some(self) } else { None }
    }
}
