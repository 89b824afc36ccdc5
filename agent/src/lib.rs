//! The kproxy node agent: turns Services and EndpointSlices into datapath state.
//!
//! Flow of one sync, by module:
//! - [`source`]: where objects come from: a manifest directory ([`source::manifests`]) or the
//!   Kubernetes API ([`source::kube`]).
//! - [`model`]: pure translation to the desired state (frontends, service entries, ordered
//!   backends), with kube-proxy's endpoint selection in [`model::endpoints`].
//! - [`sync`]: shadow-state diff and ordered, transactional writes through the
//!   [`dataplane::Dataplane`] trait (aya maps in [`dataplane::bpf`], in-memory in
//!   [`dataplane::mem`]).
//! - [`agent`]: start-up and the loop (devices, addresses, node configuration, signals), run with
//!   the validated [`config::Config`] after the [`preflight`] checks; [`metrics`] (Prometheus),
//!   [`health`] (`/healthz`, `/livez`) and [`healthcheck`] (healthCheckNodePort) are served over
//!   [`http`]; [`cli`] is the command line and the map views; [`netdev`] reads interfaces and
//!   addresses.

/// The eBPF object built from `ebpf/` (with BTF), embedded at compile time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kproxy-ebpf"));

pub mod agent;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod excerpt;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod preflight;
pub mod ratelimit;
pub mod source;
pub mod sync;
