//! The aya implementation of [`Dataplane`](super::Dataplane): the pinned BPF maps of one node.
//!
//! API CONTRACT (bodies are being written on the `datapath` branch).
use std::path::Path;

use kproxy_common::{
    Backend4, Ct4Value, NodeConfig, Reason, RevNat4Value, Service4Key, Service4Value, Tuple4,
};

use super::{Dataplane, DataplaneError};

/// The pinned maps under `<pin-path>/v1/`, opened for reading and writing. Works whether or not
/// an agent is running (the CLI uses it too).
pub struct BpfDataplane {
    _private: (),
}

impl BpfDataplane {
    /// Opens the pinned maps under `pin_path` (the directory given as `--pin-path`), checking type,
    /// key and value sizes against the ABI.
    pub fn open(pin_path: &Path) -> anyhow::Result<Self> {
        anyhow::bail!("BpfDataplane::open({}) is not implemented yet", pin_path.display())
    }

    /// Every connection-tracking entry.
    pub fn conntrack(&self) -> Result<Vec<(Tuple4, Ct4Value)>, DataplaneError> {
        Ok(Vec::new())
    }

    /// Every reverse-NAT entry.
    pub fn revnat(&self) -> Result<Vec<(Tuple4, RevNat4Value)>, DataplaneError> {
        Ok(Vec::new())
    }

    /// Packet counters by reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Ok(Vec::new())
    }
}

impl Dataplane for BpfDataplane {
    fn set_config(&mut self, _cfg: &NodeConfig) -> Result<(), DataplaneError> {
        unimplemented!()
    }
    fn put_backend(&mut self, _id: u32, _backend: &Backend4) -> Result<(), DataplaneError> {
        unimplemented!()
    }
    fn delete_backend(&mut self, _id: u32) -> Result<(), DataplaneError> {
        unimplemented!()
    }
    fn put_service(
        &mut self,
        _key: &Service4Key,
        _value: &Service4Value,
    ) -> Result<(), DataplaneError> {
        unimplemented!()
    }
    fn delete_service(&mut self, _key: &Service4Key) -> Result<(), DataplaneError> {
        unimplemented!()
    }
    fn services(&self) -> Result<Vec<(Service4Key, Service4Value)>, DataplaneError> {
        unimplemented!()
    }
    fn backends(&self) -> Result<Vec<(u32, Backend4)>, DataplaneError> {
        unimplemented!()
    }
}
