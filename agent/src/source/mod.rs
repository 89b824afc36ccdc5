//! Where Services, EndpointSlices and Nodes come from: a manifest directory (the lab) or the
//! Kubernetes API.
pub mod kube;
pub mod manifests;
