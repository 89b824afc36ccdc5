//! Loading the embedded eBPF object, pinning its maps, attaching its programs to devices.
//!
//! API CONTRACT (bodies are being written on the `datapath` branch).
use std::path::{Path, PathBuf};

use super::bpf::BpfDataplane;

/// Map capacities chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// Service entries plus backend slots.
    pub services: u32,
    /// Backends.
    pub backends: u32,
    /// Connection-tracking (and reverse-NAT) entries.
    pub conntrack: u32,
    /// Session-affinity entries.
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use kproxy_common::defaults::*;
        Self {
            services: SERVICES4_MAX,
            backends: BACKENDS4_MAX,
            conntrack: CT4_MAX,
            affinity: AFFINITY4_MAX,
        }
    }
}

/// How the external (NodePort) devices are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalMode {
    /// XDP fast path plus the TC ingress program for what XDP cannot do.
    #[default]
    Xdp,
    /// TC ingress only.
    TcOnly,
}

/// The loaded programs and pinned maps of one node. Attachments outlive the process: dropping a
/// `Datapath` (or the agent dying) leaves the datapath serving; only [`cleanup`] removes it.
pub struct Datapath {
    pin_path: PathBuf,
}

impl Datapath {
    /// Loads the embedded object, reusing the maps pinned under `pin_path/v1` when they exist and
    /// match the ABI (type, key and value size), creating and pinning them otherwise.
    pub fn load(pin_path: &Path, sizes: &MapSizes) -> anyhow::Result<Self> {
        let _ = sizes;
        anyhow::bail!("Datapath::load({}) is not implemented yet", pin_path.display())
    }

    /// Attaches the external-device programs to `ifname` (replacing an earlier attachment).
    pub fn attach_external(&mut self, ifname: &str, mode: ExternalMode) -> anyhow::Result<()> {
        anyhow::bail!("attach_external({ifname}, {mode:?}) is not implemented yet")
    }

    /// Attaches the pod-interface programs (TC ingress and egress) to `ifname`.
    pub fn attach_pod(&mut self, ifname: &str) -> anyhow::Result<()> {
        anyhow::bail!("attach_pod({ifname}) is not implemented yet")
    }

    /// Detaches whatever kproxy attached to `ifname`; a device that is gone is not an error.
    pub fn detach(&mut self, ifname: &str) -> anyhow::Result<()> {
        anyhow::bail!("detach({ifname}) is not implemented yet")
    }

    /// The maps, for the sync code.
    pub fn dataplane(&self) -> anyhow::Result<BpfDataplane> {
        BpfDataplane::open(&self.pin_path)
    }
}

/// Removes every program attachment, link and pin kproxy made under `pin_path`.
pub fn cleanup(pin_path: &Path) -> anyhow::Result<()> {
    anyhow::bail!("cleanup({}) is not implemented yet", pin_path.display())
}
