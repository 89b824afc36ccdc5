//! The IPv6 maps of the datapath, with their purpose (the IPv4 ones and those both families
//! share are in [`crate::maps`]). Types come from `kproxy_common`; capacities are defaults the
//! agent overrides at load time.
#![allow(non_upper_case_globals)] // map statics are named as the kernel objects they become
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use kproxy_common::{
    Addr6, Affinity6Key, Affinity6Value, Backend6, Ct6Value, Frag6Key, Frag6Value, NodeConfig6,
    REASON_MAX, Reason, RevNat6Value, Service6Key, Service6Value, SockRev6Key, SockRev6Value,
    Tuple6, ct_counter, defaults, hints,
};

use crate::{
    maps::{kp_addrbits, kp_portbits},
    parse6::Ip6,
};

/// IPv6 frontend (+ backend slot) → service entry / backend id.
#[btf_map]
pub static kp_svc6: HashMap<Service6Key, Service6Value, { defaults::SERVICES6_MAX as usize }> =
    HashMap::new();

/// IPv6 backend id → backend address and port.
#[btf_map]
pub static kp_be6: HashMap<u32, Backend6, { defaults::BACKENDS6_MAX as usize }> = HashMap::new();

/// IPv6 original tuple → translated connection (LRU: a full table evicts the oldest flow).
#[btf_map]
pub static kp_ct6: LruHashMap<Tuple6, Ct6Value, { defaults::CT6_MAX as usize }> = LruHashMap::new();

/// IPv6 reply tuple → original client and frontend (reverse NAT; also the SNAT port table).
#[btf_map]
pub static kp_rnat6: LruHashMap<Tuple6, RevNat6Value, { defaults::CT6_MAX as usize }> =
    LruHashMap::new();

/// IPv6 client + service → backend, for sessionAffinity ClientIP.
#[btf_map]
pub static kp_aff6: LruHashMap<Affinity6Key, Affinity6Value, { defaults::AFFINITY6_MAX as usize }> =
    LruHashMap::new();

/// The IPv6 fast path's per-CPU cache of reverse-NAT lookups (`crate::ct6::revnat_fast`), as
/// [`crate::maps::kp_rnmiss`] for IPv4 (the generation, [`crate::maps::kp_rngen`], is shared:
/// either family's new connections void both caches). Internal to the datapath: not pinned.
#[btf_map]
pub static kp_rnmiss6: PerCpuArray<RevNatSlot6, { RNMISS6_SLOTS as usize }> = PerCpuArray::new();

/// Slots of [`kp_rnmiss6`] (a power of two).
const RNMISS6_SLOTS: u32 = 64;

/// An entry of [`kp_rnmiss6`] (two cache lines): what `kp_rnat6` held for the reply tuple `key`
/// in jiffy `jiffies` under generation `gen_`: no entry (`found` 0) or `value`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RevNatSlot6 {
    /// The reply tuple looked up, as five words ([`crate::ct6::tuple_words`]).
    pub key: [u64; 5],
    /// [`crate::maps::kp_rngen`] read before the lookup.
    pub gen_: u64,
    /// `bpf_jiffies64()` of the lookup.
    pub jiffies: u64,
    /// 1: `value` holds the entry; 0: there was none.
    pub found: u64,
    /// A copy of the entry found, its flags and time kept up to date by the replies this CPU
    /// translates with it (`crate::ct6::RevNat6Ref::refreshed`).
    pub value: RevNat6Value,
}

/// The cache slot of reply tuple `key` ([`crate::ct6::tuple_words`]) on this CPU.
#[inline(always)]
pub fn rnmiss_slot6(key: &[u64; 5]) -> Option<*mut RevNatSlot6> {
    let w = key[0] ^ key[1] ^ key[2] ^ key[3] ^ key[4];
    let h = (w ^ w >> 32) as u32;
    kp_rnmiss6.get_ptr_mut(h.wrapping_mul(0x9e37_79b1) >> 26 & (RNMISS6_SLOTS - 1))
}

/// Per-CPU counters of IPv6 packets, indexed by `Reason`.
#[btf_map]
pub static kp_stats6: PerCpuArray<u64, { REASON_MAX as usize }> = PerCpuArray::new();

/// Fragmented IPv6 datagram → its ports, so that later fragments follow the first one's
/// translation.
#[btf_map]
pub static kp_frag6: LruHashMap<Frag6Key, Frag6Value, { defaults::FRAG6_MAX as usize }> =
    LruHashMap::new();

/// Per-CPU connection-tracking events of `kp_ct6`, indexed by `ct_counter`.
#[btf_map]
pub static kp_ctstat6: PerCpuArray<u64, { ct_counter::MAX as usize }> = PerCpuArray::new();

/// Socket LB: socket cookie + IPv6 backend → the frontend the socket asked for.
#[btf_map]
pub static kp_sock6: LruHashMap<SockRev6Key, SockRev6Value, { defaults::SOCK6_MAX as usize }> =
    LruHashMap::new();

/// IPv6 node configuration (one entry), written by the agent.
#[btf_map]
pub static kp_config6: Array<NodeConfig6, 1> = Array::new();

/// Service id + IPv6 client network → allowed (`loadBalancerSourceRanges`; see `crate::guard`).
#[btf_map]
pub static kp_srcrng6: LpmTrie<
    kproxy_common::SrcRange6,
    u32,
    { defaults::SRC_RANGES6_MAX as usize },
> = LpmTrie::new();

/// Closed IPv6 service address → kinds (see `crate::guard`; hint bits in `kp_svcaddrbits`).
#[btf_map]
pub static kp_svcaddr6: HashMap<Addr6, u32, { defaults::SVC_ADDRS6_MAX as usize }> = HashMap::new();

/// The IPv6 service CIDRs (one entry).
#[btf_map]
pub static kp_svccidr6: Array<kproxy_common::ServiceCidrs6, 1> = Array::new();

/// The per-CPU IPv6 route cache of XDP and TC (`crate::nat6::route`), a slot per destination
/// hash.
/// Internal to the datapath: not pinned, each load starts empty.
#[btf_map]
pub static kp_route6: PerCpuArray<crate::nat6::Route6, { ROUTE6_SLOTS as usize }> =
    PerCpuArray::new();

/// Slots of [`kp_route6`] (a power of two).
const ROUTE6_SLOTS: u32 = 64;

/// The route cache slot of destination `daddr` (be words) on this CPU.
#[inline(always)]
pub fn route_slot(daddr: &Addr6) -> Option<*mut crate::nat6::Route6> {
    kp_route6.get_ptr_mut(hints::addr_bit(hints::fold6(daddr)) & (ROUTE6_SLOTS - 1))
}

/// Bytes of the scratch frame buffer.
pub const SCRATCH: usize = 128;

/// [`Scratch6::reject_why`]: a service without endpoints (`RejectNoBackend`).
pub const REJECT_NO_BACKEND: u8 = 0;
/// [`Scratch6::reject_why`]: a connection's backend went away (`ResetBackendGone`).
pub const REJECT_GONE: u8 = 1;
/// [`Scratch6::reject_why`]: a closed service address on a port without frontend
/// (`RejectUnknownPort`).
pub const REJECT_UNKNOWN_PORT: u8 = 2;

/// Per-CPU scratch space of the IPv6 programs: what does not fit on the BPF stack beside the
/// IPv6 slow path's state (addresses are four times longer than IPv4's).
pub struct Scratch6 {
    /// Where the rejection frames are built.
    pub frame: [u8; SCRATCH],
    /// A connection entry being created.
    pub ct: Ct6Value,
    /// The reverse-NAT entry of a connection being created.
    pub rn: RevNat6Value,
    /// The reply tuple of a connection being created.
    pub reply: Tuple6,
    /// Route lookup parameters and result.
    pub fib: FibParams,
    /// For the rejection program, why: [`REJECT_NO_BACKEND`], [`REJECT_GONE`] or
    /// [`REJECT_UNKNOWN_PORT`].
    pub reject_why: u8,
    /// A new connection, as the slow path hands it to the connection program (see
    /// [`crate::flow6::conn`]).
    pub conn: NewConn6,
}

/// A new IPv6 connection found by a slow-path program, for its connection program: the packet
/// as parsed (the connection program does not parse again) and the service it opens.
#[derive(Clone, Copy)]
pub struct NewConn6 {
    /// The packet.
    pub p: Ip6,
    /// The frontend (slot 0).
    pub key: Service6Key,
    /// Its service entry (non-empty).
    pub svc: Service6Value,
    /// Why: 0 new, 1 rebalanced (backend gone), 2 TCP without connection entry mid-flow.
    pub why: u8,
}

/// This CPU's scratch space. Not pinned: each load has its own.
#[btf_map]
pub static kp_scratch6: PerCpuArray<Scratch6, 1> = PerCpuArray::new();

/// This CPU's scratch space (used by one program at a time on a CPU).
#[inline(always)]
pub fn scratch() -> Result<&'static mut Scratch6, Reason> {
    let b = kp_scratch6.get_ptr_mut(0).ok_or(Reason::DropRewrite)?;
    // SAFETY: per-CPU slot; programs run to completion on their CPU.
    Ok(unsafe { &mut *b })
}

/// Counts one IPv6 packet under `reason`.
#[inline(always)]
pub fn count6(reason: Reason) {
    if let Some(c) = kp_stats6.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts one IPv6 connection-tracking event (`ct_counter::*`).
#[inline(always)]
pub fn count_ct6(event: u32) {
    if let Some(c) = kp_ctstat6.get_ptr_mut(event) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Whether `addr:port` (be) of `proto` may be an IPv6 frontend or backend (`kind`): both its
/// port bit and its folded address bit are set (the bitmaps both families share).
#[inline(always)]
pub fn hinted6(kind: u32, addr: &Addr6, proto_: u8, port: u16) -> bool {
    let Some((pi, pm)) = hints::port_slot(kind, proto_, port) else { return false };
    if !kp_portbits.get(pi).is_some_and(|w| *w & pm != 0) {
        return false;
    }
    let (ai, am) = hints::addr6_slot(kind, addr);
    kp_addrbits.get(ai).is_some_and(|w| *w & am != 0)
}

/// Whether `addr` (be words) is the node's IPv6 source-NAT address (never when none is set);
/// read in place.
#[inline(always)]
pub fn is_snat_addr6(addr: &Addr6) -> bool {
    kp_config6.get(0).is_some_and(|c| c.snat_addr != [0; 4] && c.snat_addr == *addr)
}

/// The node's IPv6 configuration (all zero until the agent writes it).
#[inline(always)]
pub fn config6() -> NodeConfig6 {
    kp_config6.get(0).copied().unwrap_or_default()
}
