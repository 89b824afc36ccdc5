//! Where Services, EndpointSlices and Nodes come from: a manifest directory (the lab, with its
//! change notifications in [`dirwatch`]) or the Kubernetes API.
pub mod dirwatch;
pub mod kube;
pub mod manifests;
