//! kproxy's test support: the lab (a virtual cluster in network namespaces), the
//! `kproxy-netexec` test server and the clients that talk to it.

#![warn(missing_docs)]

pub mod client;
pub mod lab;
pub mod netexec;
