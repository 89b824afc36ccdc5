//! kproxy's test support: the lab (a virtual cluster in network namespaces), test servers,
//! clients, and the kube-proxy-equivalent baselines of the benchmarks.

pub mod apiserver;
pub mod baseline;
pub mod manifests;
