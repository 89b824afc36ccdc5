//! kproxy's eBPF programs. The library target is empty: it exists so the agent can name this
//! crate as a build dependency (and be rebuilt when it changes); the programs are in `main.rs`.
#![no_std]
