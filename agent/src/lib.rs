//! The kproxy node agent: turns Services and EndpointSlices into datapath state.

/// The eBPF object built from `ebpf/` (with BTF), embedded at compile time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kproxy-ebpf"));

pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod healthcheck;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod source;
pub mod sync;
