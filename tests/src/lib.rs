//! kproxy's test support: the lab (a virtual cluster in network namespaces), the
//! `kproxy-netexec` test server and the clients that talk to it, host-network clients in
//! cgroups (socket LB), frames and checksums for packet tests, manifests for the lab, the
//! Kubernetes API test server, the demo, and the kube-proxy-equivalent baselines and the
//! benchmark harness (`make bench`).
#![warn(missing_docs)]

pub mod apiserver;
pub mod baseline;
pub mod bench;
pub mod client;
pub mod demo;
pub mod frames;
pub mod frames6;
pub mod hostnet;
pub mod lab;
pub mod manifests;
pub mod netexec;
