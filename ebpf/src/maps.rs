//! Every map of the datapath, with its purpose. Types come from `kproxy_common`; capacities are
//! defaults the agent overrides at load time.
#![allow(non_upper_case_globals)] // map statics are named as the kernel objects they become
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use kproxy_common::{
    Affinity4Key, Affinity4Value, Backend4, Ct4Value, Frag4Key, Frag4Value, NodeConfig, REASON_MAX,
    Reason, RevNat4Value, Service4Key, Service4Value, SockRev4Key, SockRev4Value, Tuple4,
    ct_counter, defaults,
};

/// Frontend (+ backend slot) → service entry / backend id.
#[btf_map]
pub static kp_svc4: HashMap<Service4Key, Service4Value, { defaults::SERVICES4_MAX as usize }> =
    HashMap::new();

/// Backend id → backend address and port.
#[btf_map]
pub static kp_be4: HashMap<u32, Backend4, { defaults::BACKENDS4_MAX as usize }> = HashMap::new();

/// Original tuple → translated connection (LRU: a full table evicts the oldest flow).
#[btf_map]
pub static kp_ct4: LruHashMap<Tuple4, Ct4Value, { defaults::CT4_MAX as usize }> = LruHashMap::new();

/// Reply tuple → original client and frontend (reverse NAT; also the SNAT port table).
#[btf_map]
pub static kp_rnat4: LruHashMap<Tuple4, RevNat4Value, { defaults::CT4_MAX as usize }> =
    LruHashMap::new();

/// Client + service → backend, for sessionAffinity ClientIP.
#[btf_map]
pub static kp_aff4: LruHashMap<Affinity4Key, Affinity4Value, { defaults::AFFINITY4_MAX as usize }> =
    LruHashMap::new();

/// Per-CPU packet counters, indexed by `Reason`.
#[btf_map]
pub static kp_stats: PerCpuArray<u64, { REASON_MAX as usize }> = PerCpuArray::new();

/// Fragmented datagram → its ports, so that later fragments follow the first one's translation.
#[btf_map]
pub static kp_frag4: LruHashMap<Frag4Key, Frag4Value, { defaults::FRAG4_MAX as usize }> =
    LruHashMap::new();

/// Per-CPU connection-tracking events (entries created and deleted), indexed by `ct_counter`; the
/// agent derives the LRU evictions of `kp_ct4` from them.
#[btf_map]
pub static kp_ctstat: PerCpuArray<u64, { ct_counter::MAX as usize }> = PerCpuArray::new();

/// Socket LB: socket cookie + backend → the frontend the socket asked for (recvmsg4,
/// getpeername4).
#[btf_map]
pub static kp_sock4: LruHashMap<SockRev4Key, SockRev4Value, { defaults::SOCK4_MAX as usize }> =
    LruHashMap::new();

/// Node configuration (one entry), written by the agent.
#[btf_map]
pub static kp_config: Array<NodeConfig, 1> = Array::new();

/// Counts one packet under `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = kp_stats.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts one connection-tracking event (`ct_counter::*`).
#[inline(always)]
pub fn count_ct(event: u32) {
    if let Some(c) = kp_ctstat.get_ptr_mut(event) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// The node configuration (all zero, i.e. not READY, until the agent writes it).
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    kp_config.get(0).copied()
}
