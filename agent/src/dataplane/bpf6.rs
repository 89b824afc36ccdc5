//! The IPv6 maps of one node, beside the IPv4 ones of [`super::bpf`]: their ABI specs, the
//! opened handles and the [`Dataplane6`] implementation of [`BpfDataplane`].
use std::{path::Path, sync::Arc};

use aya::maps::{Array, MapData, MapType, PerCpuArray};
use kproxy_common::{
    Addr6, Affinity6Key, Affinity6Value, Backend6, Ct6Value, Frag6Key, Frag6Value, NodeConfig6,
    REASON_MAX, Reason, RevNat6Value, Service6Key, Service6Value, ServiceCidrs6, SockRev6Key,
    SockRev6Value, Tuple6, names,
};

use super::{
    BatchError, Dataplane6, DataplaneError, SourceRange6,
    bpf::{
        BpfDataplane, Hash, MapSpec, check_pinned, delete_batch, ignore_absent, map_err, open_map,
        put_batch, spec, update_err,
    },
};

/// Every IPv6 map of the ABI with its expected type and sizes, in [`names::ALL_MAPS6`] order.
pub const MAP_SPECS6: [MapSpec; 10] = [
    spec::<Service6Key, Service6Value>(names::SERVICES6, MapType::Hash),
    spec::<u32, Backend6>(names::BACKENDS6, MapType::Hash),
    spec::<Tuple6, Ct6Value>(names::CT6, MapType::LruHash),
    spec::<Tuple6, RevNat6Value>(names::REVNAT6, MapType::LruHash),
    spec::<Affinity6Key, Affinity6Value>(names::AFFINITY6, MapType::LruHash),
    spec::<u32, u64>(names::COUNTERS6, MapType::PerCpuArray),
    spec::<u32, NodeConfig6>(names::CONFIG6, MapType::Array),
    spec::<Frag6Key, Frag6Value>(names::FRAG6, MapType::LruHash),
    spec::<u32, u64>(names::CT_COUNTERS6, MapType::PerCpuArray),
    spec::<SockRev6Key, SockRev6Value>(names::SOCK6, MapType::LruHash),
];

/// The IPv6 maps, opened.
pub(super) struct Maps6 {
    services: Hash<Service6Key, Service6Value>,
    backends: Hash<u32, Backend6>,
    pub(super) ct: Hash<Tuple6, Ct6Value>,
    pub(super) ct_counters: PerCpuArray<MapData, u64>,
    pub(super) revnat: Hash<Tuple6, RevNat6Value>,
    pub(super) frag: Hash<Frag6Key, Frag6Value>,
    affinity: Hash<Affinity6Key, Affinity6Value>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, NodeConfig6>,
    /// The IPv6 guard maps (absent on pins of an agent from before them).
    pub(super) guards: Option<super::guard::GuardMaps6>,
}

impl Maps6 {
    /// Opens the IPv6 maps pinned in `dir` (the versioned pin directory), checking them against
    /// the ABI; `None` when the pins come from an agent without IPv6 maps. The guard maps are
    /// opened only with `guards` (see [`super::bpf::BpfDataplane::open_for_conntrack`]), sharing
    /// `bits`, the closed-address bitmap as the IPv4 guards mapped it (`None`: mapped here).
    pub(super) fn open_if_pinned(
        dir: &Path,
        guards: bool,
        bits: Option<Arc<super::hints::ServiceAddrBits>>,
    ) -> anyhow::Result<Option<Self>> {
        let [svc, be, ct, rnat, aff, stats, cfg, frag, ctstat, sock] = &MAP_SPECS6;
        if !dir.join(svc.name).exists() {
            return Ok(None);
        }
        check_pinned(&dir.join(sock.name), sock)?;
        Ok(Some(Self {
            services: Hash::open(dir, svc)?,
            backends: Hash::open(dir, be)?,
            ct: Hash::open(dir, ct)?,
            ct_counters: open_map(dir, ctstat)?.try_into()?,
            revnat: Hash::open(dir, rnat)?,
            frag: Hash::open(dir, frag)?,
            affinity: Hash::open(dir, aff)?,
            counters: open_map(dir, stats)?.try_into()?,
            config: open_map(dir, cfg)?.try_into()?,
            guards: if guards {
                super::guard::GuardMaps6::open_if_pinned(dir, bits)?
            } else {
                None
            },
        }))
    }
}

/// The error of an IPv6 access to pins without IPv6 maps.
pub(super) fn no_v6(op: &'static str) -> DataplaneError {
    DataplaneError::Map {
        map: names::SERVICES6,
        op,
        key: String::new(),
        source: std::io::Error::other(
            "the pinned maps have no IPv6 maps (pinned by an older kproxy; `kproxy cleanup` \
             and restart the agent)",
        ),
    }
}

impl BpfDataplane {
    fn v6(&self, op: &'static str) -> Result<&Maps6, DataplaneError> {
        self.v6.as_ref().ok_or_else(|| no_v6(op))
    }

    fn v6_mut(&mut self, op: &'static str) -> Result<&mut Maps6, DataplaneError> {
        self.v6.as_mut().ok_or_else(|| no_v6(op))
    }

    fn guards6_mut(&mut self) -> Result<&mut super::guard::GuardMaps6, BatchError> {
        let m = self.v6_mut("update").map_err(|error| BatchError { done: 0, error })?;
        m.guards.as_mut().ok_or_else(|| BatchError { done: 0, error: super::guard::missing6() })
    }

    /// The IPv6 guard maps, when pinned.
    pub fn guards6(&self) -> Option<&super::guard::GuardMaps6> {
        self.v6.as_ref().and_then(|m| m.guards.as_ref())
    }

    /// Whether the pins have the IPv6 maps.
    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// Every IPv6 connection-tracking entry.
    pub fn conntrack6(&self) -> Result<Vec<(Tuple6, Ct6Value)>, DataplaneError> {
        self.v6("iterate")?.ct.collect(names::CT6)
    }

    /// Every IPv6 reverse-NAT entry.
    pub fn revnat6(&self) -> Result<Vec<(Tuple6, RevNat6Value)>, DataplaneError> {
        self.v6("iterate")?.revnat.collect(names::REVNAT6)
    }

    /// Every IPv6 session-affinity entry.
    pub fn affinity6(&self) -> Result<Vec<(Affinity6Key, Affinity6Value)>, DataplaneError> {
        self.v6("iterate")?.affinity.collect(names::AFFINITY6)
    }

    /// The IPv6 node configuration as programmed.
    pub fn config6(&self) -> Result<NodeConfig6, DataplaneError> {
        self.v6("lookup")?.config.get(&0, 0).map_err(|e| map_err(names::CONFIG6, "lookup", "0", e))
    }

    /// Counters of IPv6 packets by reason, summed over CPUs (empty without IPv6 maps).
    pub fn counters6(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let Some(m) = &self.v6 else { return Ok(Vec::new()) };
        let mut out = Vec::with_capacity(Reason::ALL.len());
        for r in Reason::ALL {
            let idx = *r as u32;
            debug_assert!(idx < REASON_MAX);
            let per_cpu = m
                .counters
                .get(&idx, 0)
                .map_err(|e| map_err(names::COUNTERS6, "lookup", &idx.to_string(), e))?;
            out.push((*r, per_cpu.iter().copied().sum()));
        }
        Ok(out)
    }

    /// The IPv6 connection-tracking event counters (`ct_counter` order), summed over CPUs.
    pub fn ct_counters6(&self) -> Result<[u64; 3], DataplaneError> {
        let m = self.v6("lookup")?;
        let mut out = [0u64; 3];
        for (i, o) in out.iter_mut().enumerate() {
            let per_cpu = m
                .ct_counters
                .get(&(i as u32), 0)
                .map_err(|e| map_err(names::CT_COUNTERS6, "lookup", &i.to_string(), e))?;
            *o = per_cpu.iter().copied().sum();
        }
        Ok(out)
    }
}

impl Dataplane6 for BpfDataplane {
    fn set_config6(&mut self, cfg: &NodeConfig6) -> Result<(), DataplaneError> {
        self.v6_mut("update")?
            .config
            .set(0, cfg, 0)
            .map_err(|e| map_err(names::CONFIG6, "update", "0", e))
    }

    fn put_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError> {
        if let Some(h) = self.hints() {
            h.backend6(backend);
        }
        let m = self.v6_mut("update")?;
        m.backends
            .map
            .insert(id, backend, 0)
            .map_err(|e| update_err(names::BACKENDS6, m.backends.capacity, &id, e))
    }

    fn delete_backend6(&mut self, id: u32) -> Result<(), DataplaneError> {
        ignore_absent(self.v6_mut("delete")?.backends.map.remove(&id), names::BACKENDS6, &id)?;
        // Both families share the backend generation (see `BpfDataplane::next_backend_gen`).
        self.next_backend_gen()
    }

    fn put_service6(
        &mut self,
        key: &Service6Key,
        value: &Service6Value,
    ) -> Result<(), DataplaneError> {
        if let Some(h) = self.hints() {
            h.frontend6(key);
        }
        let m = self.v6_mut("update")?;
        m.services
            .map
            .insert(key, value, 0)
            .map_err(|e| update_err(names::SERVICES6, m.services.capacity, key, e))
    }

    fn delete_service6(&mut self, key: &Service6Key) -> Result<(), DataplaneError> {
        ignore_absent(self.v6_mut("delete")?.services.map.remove(key), names::SERVICES6, key)
    }

    fn put_backends6(&mut self, items: &[(u32, Backend6)]) -> Result<(), BatchError> {
        if let Some(h) = self.hints() {
            items.iter().for_each(|(_, b)| h.backend6(b));
        }
        let m = self.v6("update").map_err(|error| BatchError { done: 0, error })?;
        put_batch(&m.backends, names::BACKENDS6, items)
    }

    fn delete_backends6(&mut self, ids: &[u32]) -> Result<(), BatchError> {
        let m = self.v6("delete").map_err(|error| BatchError { done: 0, error })?;
        let r = delete_batch(&m.backends, names::BACKENDS6, ids);
        // Also after a partial failure: some backends may be gone.
        if let Err(e) = self.next_backend_gen() {
            tracing::warn!(error = %e, "moving the backend generation on");
        }
        r
    }

    fn put_services6(&mut self, items: &[(Service6Key, Service6Value)]) -> Result<(), BatchError> {
        if let Some(h) = self.hints() {
            items.iter().for_each(|(k, _)| h.frontend6(k));
        }
        let m = self.v6("update").map_err(|error| BatchError { done: 0, error })?;
        put_batch(&m.services, names::SERVICES6, items)
    }

    fn delete_services6(&mut self, keys: &[Service6Key]) -> Result<(), BatchError> {
        let m = self.v6("delete").map_err(|error| BatchError { done: 0, error })?;
        delete_batch(&m.services, names::SERVICES6, keys)
    }

    fn services6(&self) -> Result<Vec<(Service6Key, Service6Value)>, DataplaneError> {
        match &self.v6 {
            Some(m) => m.services.collect(names::SERVICES6),
            None => Ok(Vec::new()),
        }
    }

    fn backends6(&self) -> Result<Vec<(u32, Backend6)>, DataplaneError> {
        match &self.v6 {
            Some(m) => m.backends.collect(names::BACKENDS6),
            None => Ok(Vec::new()),
        }
    }

    fn put_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        self.guards6_mut()?.put_source_ranges(keys)
    }

    fn delete_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        self.guards6_mut()?.delete_source_ranges(keys)
    }

    fn source_ranges6(&self) -> Result<Vec<SourceRange6>, DataplaneError> {
        self.guards6().map_or(Ok(Vec::new()), |g| g.source_ranges())
    }

    fn put_service_addrs6(&mut self, addrs: &[Addr6]) -> Result<(), BatchError> {
        self.guards6_mut()?.put_service_addrs(addrs)
    }

    fn delete_service_addrs6(&mut self, addrs: &[Addr6]) -> Result<(), BatchError> {
        self.guards6_mut()?.delete_service_addrs(addrs)
    }

    fn service_addrs6(&self) -> Result<Vec<Addr6>, DataplaneError> {
        self.guards6().map_or(Ok(Vec::new()), |g| g.service_addrs())
    }

    fn set_service_cidrs6(&mut self, cidrs: &ServiceCidrs6) -> Result<(), DataplaneError> {
        self.guards6_mut().map_err(|e| e.error)?.set_service_cidrs(cidrs)
    }
}
