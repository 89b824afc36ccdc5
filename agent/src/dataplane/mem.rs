//! An in-memory [`Dataplane`] for unit tests, with optional capacities to exercise "map full".
use std::collections::BTreeMap;

use kproxy_common::{
    Backend4, Backend6, NodeConfig, NodeConfig6, Service4Key, Service4Value, Service6Key,
    Service6Value, ServiceCidrs4, ServiceCidrs6, names,
};

use super::{BatchError, Dataplane, Dataplane6, DataplaneError, SourceRange, SourceRange6};

/// In-memory maps; `ops` records every write in order so tests can check the write order.
#[derive(Debug, Default, Clone)]
pub struct MemDataplane {
    /// Node configuration.
    pub config: NodeConfig,
    /// Services map contents.
    pub services: BTreeMap<Service4Key, Service4Value>,
    /// Backends map contents.
    pub backends: BTreeMap<u32, Backend4>,
    /// Capacity of the services map (None: unbounded).
    pub services_capacity: Option<u32>,
    /// Capacity of the backends map (None: unbounded).
    pub backends_capacity: Option<u32>,
    /// Log of writes, in order.
    pub ops: Vec<MemOp>,
    /// IPv6 node configuration.
    pub config6: NodeConfig6,
    /// IPv6 services map contents.
    pub services6: BTreeMap<Service6Key, Service6Value>,
    /// IPv6 backends map contents.
    pub backends6: BTreeMap<u32, Backend6>,
    /// Log of IPv6 writes, in order.
    pub ops6: Vec<MemOp6>,
    /// Source-range map contents.
    pub source_ranges: std::collections::BTreeSet<SourceRange>,
    /// Closed service addresses (be).
    pub service_addrs: std::collections::BTreeSet<u32>,
    /// Service CIDRs.
    pub service_cidrs: ServiceCidrs4,
    /// Makes writes of the service CIDRs fail (tests of a failed write).
    pub service_cidrs_fail: bool,
    /// IPv6 source-range map contents.
    pub source_ranges6: std::collections::BTreeSet<SourceRange6>,
    /// Closed IPv6 service addresses (be words).
    pub service_addrs6: std::collections::BTreeSet<kproxy_common::Addr6>,
    /// IPv6 service CIDRs.
    pub service_cidrs6: ServiceCidrs6,
}

/// One write, as recorded by [`MemDataplane`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp {
    /// `put_backend`.
    PutBackend(u32),
    /// `delete_backend`.
    DeleteBackend(u32),
    /// `put_service`.
    PutService(Service4Key),
    /// `delete_service`.
    DeleteService(Service4Key),
    /// A source-range entry written.
    PutSourceRange(SourceRange),
    /// A source-range entry removed.
    DeleteSourceRange(SourceRange),
    /// A closed service address written (be).
    PutServiceAddr(u32),
    /// A closed service address removed (be).
    DeleteServiceAddr(u32),
}

/// One IPv6 write, as recorded by [`MemDataplane`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp6 {
    /// `put_backend6`.
    PutBackend(u32),
    /// `delete_backend6`.
    DeleteBackend(u32),
    /// `put_service6`.
    PutService(Service6Key),
    /// `delete_service6`.
    DeleteService(Service6Key),
}

impl Dataplane for MemDataplane {
    fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DataplaneError> {
        self.config = *cfg;
        Ok(())
    }

    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), DataplaneError> {
        if let Some(cap) = self.backends_capacity
            && !self.backends.contains_key(&id)
            && self.backends.len() as u32 >= cap
        {
            return Err(DataplaneError::Full {
                map: names::BACKENDS4,
                capacity: cap,
                key: id.to_string(),
            });
        }
        self.backends.insert(id, *backend);
        self.ops.push(MemOp::PutBackend(id));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends.remove(&id);
        self.ops.push(MemOp::DeleteBackend(id));
        Ok(())
    }

    fn put_service(
        &mut self,
        key: &Service4Key,
        value: &Service4Value,
    ) -> Result<(), DataplaneError> {
        if let Some(cap) = self.services_capacity
            && !self.services.contains_key(key)
            && self.services.len() as u32 >= cap
        {
            return Err(DataplaneError::Full {
                map: names::SERVICES4,
                capacity: cap,
                key: format!("{key:?}"),
            });
        }
        self.services.insert(*key, *value);
        self.ops.push(MemOp::PutService(*key));
        Ok(())
    }

    fn delete_service(&mut self, key: &Service4Key) -> Result<(), DataplaneError> {
        self.services.remove(key);
        self.ops.push(MemOp::DeleteService(*key));
        Ok(())
    }

    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>, DataplaneError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn put_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError> {
        for k in keys {
            self.source_ranges.insert(*k);
            self.ops.push(MemOp::PutSourceRange(*k));
        }
        Ok(())
    }

    fn delete_source_ranges(&mut self, keys: &[SourceRange]) -> Result<(), BatchError> {
        for k in keys {
            self.source_ranges.remove(k);
            self.ops.push(MemOp::DeleteSourceRange(*k));
        }
        Ok(())
    }

    fn source_ranges(&self) -> Result<Vec<SourceRange>, DataplaneError> {
        Ok(self.source_ranges.iter().copied().collect())
    }

    fn put_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        for a in addrs {
            self.service_addrs.insert(*a);
            self.ops.push(MemOp::PutServiceAddr(*a));
        }
        Ok(())
    }

    fn delete_service_addrs(&mut self, addrs: &[u32]) -> Result<(), BatchError> {
        for a in addrs {
            self.service_addrs.remove(a);
            self.ops.push(MemOp::DeleteServiceAddr(*a));
        }
        Ok(())
    }

    fn service_addrs(&self) -> Result<Vec<u32>, DataplaneError> {
        Ok(self.service_addrs.iter().copied().collect())
    }

    fn set_service_cidrs(&mut self, cidrs: &ServiceCidrs4) -> Result<(), DataplaneError> {
        if self.service_cidrs_fail {
            return Err(DataplaneError::Map {
                map: names::SVC_CIDRS4,
                op: "update",
                key: "0".into(),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        self.service_cidrs = *cidrs;
        Ok(())
    }

    fn as_v6(&self) -> Option<&dyn Dataplane6> {
        Some(self)
    }

    fn as_v6_mut(&mut self) -> Option<&mut dyn Dataplane6> {
        Some(self)
    }
}

impl Dataplane6 for MemDataplane {
    fn set_config6(&mut self, cfg: &NodeConfig6) -> Result<(), DataplaneError> {
        self.config6 = *cfg;
        Ok(())
    }

    fn put_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError> {
        if let Some(cap) = self.backends_capacity
            && !self.backends6.contains_key(&id)
            && self.backends6.len() as u32 >= cap
        {
            return Err(DataplaneError::Full {
                map: names::BACKENDS6,
                capacity: cap,
                key: id.to_string(),
            });
        }
        self.backends6.insert(id, *backend);
        self.ops6.push(MemOp6::PutBackend(id));
        Ok(())
    }

    fn delete_backend6(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends6.remove(&id);
        self.ops6.push(MemOp6::DeleteBackend(id));
        Ok(())
    }

    fn put_service6(
        &mut self,
        key: &Service6Key,
        value: &Service6Value,
    ) -> Result<(), DataplaneError> {
        if let Some(cap) = self.services_capacity
            && !self.services6.contains_key(key)
            && self.services6.len() as u32 >= cap
        {
            return Err(DataplaneError::Full {
                map: names::SERVICES6,
                capacity: cap,
                key: format!("{key:?}"),
            });
        }
        self.services6.insert(*key, *value);
        self.ops6.push(MemOp6::PutService(*key));
        Ok(())
    }

    fn delete_service6(&mut self, key: &Service6Key) -> Result<(), DataplaneError> {
        self.services6.remove(key);
        self.ops6.push(MemOp6::DeleteService(*key));
        Ok(())
    }

    fn services6(&self) -> Result<Vec<(Service6Key, Service6Value)>, DataplaneError> {
        Ok(self.services6.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends6(&self) -> Result<Vec<(u32, Backend6)>, DataplaneError> {
        Ok(self.backends6.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn put_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        self.source_ranges6.extend(keys.iter().copied());
        Ok(())
    }

    fn delete_source_ranges6(&mut self, keys: &[SourceRange6]) -> Result<(), BatchError> {
        for k in keys {
            self.source_ranges6.remove(k);
        }
        Ok(())
    }

    fn source_ranges6(&self) -> Result<Vec<SourceRange6>, DataplaneError> {
        Ok(self.source_ranges6.iter().copied().collect())
    }

    fn put_service_addrs6(&mut self, addrs: &[kproxy_common::Addr6]) -> Result<(), BatchError> {
        self.service_addrs6.extend(addrs.iter().copied());
        Ok(())
    }

    fn delete_service_addrs6(&mut self, addrs: &[kproxy_common::Addr6]) -> Result<(), BatchError> {
        for a in addrs {
            self.service_addrs6.remove(a);
        }
        Ok(())
    }

    fn service_addrs6(&self) -> Result<Vec<kproxy_common::Addr6>, DataplaneError> {
        Ok(self.service_addrs6.iter().copied().collect())
    }

    fn set_service_cidrs6(&mut self, cidrs: &ServiceCidrs6) -> Result<(), DataplaneError> {
        self.service_cidrs6 = *cidrs;
        Ok(())
    }
}
