//! The datapath as the agent's sync code sees it: a small trait over the BPF maps, with the aya
//! implementation ([`bpf`]) and an in-memory one ([`mem`]) for unit tests (Katran's
//! `BaseBpfAdapter` pattern).
use kproxy_common::{
    Addr6, Backend4, Backend6, NodeConfig, NodeConfig6, Service4Key, Service4Value, Service6Key,
    Service6Value, ServiceCidrs4, ServiceCidrs6,
};

pub mod batch;
pub mod bpf;
pub mod bpf6;
pub mod btf;
pub mod conntrack;
pub mod features;
pub mod guard;
pub mod hints;
pub mod loader;
pub mod mem;
pub mod sockdiag;
pub mod sys;
pub mod usage;

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns` (the datapath's timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A failed datapath write or read. Messages name the map and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The map has no room for a new entry.
    #[error("map {map} is full (max_entries {capacity}) writing {key}")]
    Full {
        /// Map name.
        map: &'static str,
        /// Its capacity.
        capacity: u32,
        /// The key that did not fit, formatted.
        key: String,
    },
    /// Any other failure of the underlying map operation.
    #[error("map {map}: {op} {key}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Operation (`update`, `delete`, `lookup`, `iterate`).
        op: &'static str,
        /// Key, formatted.
        key: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A batched write that stopped at item `done`: items `0..done` were written, item `done`
/// failed with `error`, the rest were not tried.
#[derive(Debug, thiserror::Error)]
#[error("item {done} of a batch: {error}")]
pub struct BatchError {
    /// Items written before the failing one.
    pub done: usize,
    /// Why item `done` failed.
    #[source]
    pub error: DataplaneError,
}

/// Writes and reads of the service and backend maps. Implementations do exactly what they are
/// told: ordering (backends, then slots, then the service entry) is the caller's job. The batch
/// methods write their items in order, as one `BPF_MAP_*_BATCH` per chunk in the BPF
/// implementation; their default implementations write item by item.
pub trait Dataplane {
    /// Writes the node configuration.
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DataplaneError>;
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), DataplaneError>;
    /// Removes a backend; removing an absent one is not an error.
    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Inserts or replaces a service entry or backend slot.
    fn put_service(
        &mut self,
        key: &Service4Key,
        value: &Service4Value,
    ) -> Result<(), DataplaneError>;
    /// Removes a service entry or backend slot; removing an absent one is not an error.
    fn delete_service(&mut self, key: &Service4Key) -> Result<(), DataplaneError>;
    /// Inserts or replaces backends, in order.
    fn put_backends(&mut self, items: &[(u32, Backend4)]) -> Result<(), BatchError> {
        for (i, (id, b)) in items.iter().enumerate() {
            self.put_backend(*id, b).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Removes backends, in order; absent ones are not an error.
    fn delete_backends(&mut self, ids: &[u32]) -> Result<(), BatchError> {
        for (i, id) in ids.iter().enumerate() {
            self.delete_backend(*id).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Inserts or replaces service entries and backend slots, in order.
    fn put_services(&mut self, items: &[(Service4Key, Service4Value)]) -> Result<(), BatchError> {
        for (i, (k, v)) in items.iter().enumerate() {
            self.put_service(k, v).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Removes service entries and backend slots, in order; absent ones are not an error.
    fn delete_services(&mut self, keys: &[Service4Key]) -> Result<(), BatchError> {
        for (i, k) in keys.iter().enumerate() {
            self.delete_service(k).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Everything in the services map (to reconcile after a restart).
    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>, DataplaneError>;
    /// Everything in the backends map.
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError>;

    /// Inserts source-range entries (`loadBalancerSourceRanges`), in order.
    fn put_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError>;
    /// Removes source-range entries, in order; absent ones are not an error.
    fn delete_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError>;
    /// Every source-range entry.
    fn source_ranges(&self) -> Result<Vec<SourceRange>, DataplaneError>;
    /// Inserts closed service addresses (be), in order.
    fn put_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError>;
    /// Removes closed service addresses (be), in order; absent ones are not an error.
    fn delete_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError>;
    /// Every closed service address (be).
    fn service_addrs(&self) -> Result<Vec<u32>, DataplaneError>;
    /// Writes the service CIDRs.
    fn set_service_cidrs(&mut self, cidrs: &ServiceCidrs4) -> Result<(), DataplaneError>;
    /// The IPv6 maps, when the datapath has them.
    fn as_v6(&self) -> Option<&dyn Dataplane6> {
        None
    }
    /// The IPv6 maps for writing, when the datapath has them.
    fn as_v6_mut(&mut self) -> Option<&mut dyn Dataplane6> {
        None
    }
}

/// One entry of the source-range map: service `svc_id` accepts new connections from the
/// network `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// Service id.
    pub svc_id: u32,
    /// Network address (be), host bits zero.
    pub addr: u32,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl std::fmt::Display for SourceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = std::net::Ipv4Addr::from(u32::from_be(self.addr));
        write!(f, "service id {} range {a}/{}", self.svc_id, self.len)
    }
}

/// Writes and reads of the IPv6 service and backend maps and configuration, as [`Dataplane`]
/// does for IPv4 (same ordering contract: the caller orders the writes).
pub trait Dataplane6 {
    /// Writes the IPv6 node configuration.
    fn set_config6(&mut self, cfg: &NodeConfig6) -> Result<(), DataplaneError>;
    /// Inserts or replaces an IPv6 backend.
    fn put_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError>;
    /// Removes an IPv6 backend; removing an absent one is not an error.
    fn delete_backend6(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Inserts or replaces an IPv6 service entry or backend slot.
    fn put_service6(
        &mut self,
        key: &Service6Key,
        value: &Service6Value,
    ) -> Result<(), DataplaneError>;
    /// Removes an IPv6 service entry or backend slot; removing an absent one is not an error.
    fn delete_service6(&mut self, key: &Service6Key) -> Result<(), DataplaneError>;
    /// Inserts or replaces IPv6 backends, in order.
    fn put_backends6(&mut self, items: &[(u32, Backend6)]) -> Result<(), BatchError> {
        for (i, (id, b)) in items.iter().enumerate() {
            self.put_backend6(*id, b).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Removes IPv6 backends, in order; absent ones are not an error.
    fn delete_backends6(&mut self, ids: &[u32]) -> Result<(), BatchError> {
        for (i, id) in ids.iter().enumerate() {
            self.delete_backend6(*id).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Inserts or replaces IPv6 service entries and backend slots, in order.
    fn put_services6(&mut self, items: &[(Service6Key, Service6Value)]) -> Result<(), BatchError> {
        for (i, (k, v)) in items.iter().enumerate() {
            self.put_service6(k, v).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Removes IPv6 service entries and backend slots, in order; absent ones are not an error.
    fn delete_services6(&mut self, keys: &[Service6Key]) -> Result<(), BatchError> {
        for (i, k) in keys.iter().enumerate() {
            self.delete_service6(k).map_err(|error| BatchError { done: i, error })?;
        }
        Ok(())
    }
    /// Everything in the IPv6 services map.
    fn services6(&self) -> Result<Vec<(Service6Key, Service6Value)>, DataplaneError>;
    /// Everything in the IPv6 backends map.
    fn backends6(&self) -> Result<Vec<(u32, Backend6)>, DataplaneError>;

    /// Inserts IPv6 source-range entries (`loadBalancerSourceRanges`), in order.
    fn put_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError>;
    /// Removes IPv6 source-range entries, in order; absent ones are not an error.
    fn delete_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError>;
    /// Every IPv6 source-range entry.
    fn source_ranges6(&self) -> Result<Vec<SourceRange6>, DataplaneError>;
    /// Inserts closed IPv6 service addresses (be words), in order.
    fn put_service_addrs6(&mut self, addrs: &[Addr6]) -> Result<(), BatchError>;
    /// Removes closed IPv6 service addresses, in order; absent ones are not an error.
    fn delete_service_addrs6(&mut self, addrs: &[Addr6]) -> Result<(), BatchError>;
    /// Every closed IPv6 service address.
    fn service_addrs6(&self) -> Result<Vec<Addr6>, DataplaneError>;
    /// Writes the IPv6 service CIDRs.
    fn set_service_cidrs6(&mut self, cidrs: &ServiceCidrs6) -> Result<(), DataplaneError>;
}

/// One entry of the IPv6 source-range map: service `svc_id` accepts new connections from the
/// network `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange6 {
    /// Service id.
    pub svc_id: u32,
    /// Network address (be words), host bits zero.
    pub addr: Addr6,
    /// Prefix length, 0..=128.
    pub len: u8,
}

impl std::fmt::Display for SourceRange6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = crate::model::v6::from_addr6(&self.addr);
        write!(f, "service id {} range {a}/{}", self.svc_id, self.len)
    }
}
