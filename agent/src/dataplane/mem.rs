//! An in-memory [`Dataplane`] for unit tests, with optional capacities to exercise "map full".
use std::collections::BTreeMap;

use kproxy_common::{Backend4, NodeConfig, Service4Key, Service4Value, names};

use super::{Dataplane, DataplaneError};

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
}
