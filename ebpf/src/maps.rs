//! Every map of the datapath, with its purpose. Types come from `kproxy_common`; capacities are
//! defaults the agent overrides at load time.
#![allow(non_upper_case_globals)] // map statics are named as the kernel objects they become
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use kproxy_common::{
    Affinity4Key, Affinity4Value, Backend4, Ct4Value, Frag4Key, Frag4Value, NodeConfig, REASON_MAX,
    Reason, RevNat4Value, Service4Key, Service4Value, SockRev4Key, SockRev4Value, Tuple4, calls,
    cfg_flags, ct_counter, defaults, hints,
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

/// `BPF_F_MMAPABLE`: the agent sets hint bits through a shared mapping of the array.
const MMAPABLE: usize = 1 << 10;

/// Frontend and backend address bitmaps (see `kproxy_common::hints`).
#[btf_map]
pub static kp_addrbits: Array<u64, { hints::ADDR_MAX as usize }, MMAPABLE> = Array::new();

/// Frontend and backend port bitmaps by protocol (see `kproxy_common::hints`).
#[btf_map]
pub static kp_portbits: Array<u64, { hints::PORT_MAX as usize }, MMAPABLE> = Array::new();

/// TC slow-path programs, indexed by `kproxy_common::calls`.
#[btf_map]
pub static kp_calls_tc: ProgramArray<{ calls::TC_MAX as usize }> = ProgramArray::new();

/// XDP slow-path programs, indexed by `kproxy_common::calls`.
#[btf_map]
pub static kp_calls_xdp: ProgramArray<{ calls::XDP_MAX as usize }> = ProgramArray::new();

/// Host-side pod interfaces (ifindex → 1), written by the agent as it attaches them; eBPF host
/// routing hands packets for them to the pod's namespace with `bpf_redirect_peer`.
#[btf_map]
pub static kp_poddevs: HashMap<u32, u32, { defaults::POD_DEVS_MAX as usize }> = HashMap::new();

/// Devices whose ingress runs kproxy's programs, by [`kproxy_common::hook_dev_slot`] (value: the
/// ifindex, 0 for none), written by the agent once it has attached them: a packet entering a pod
/// from one of them was translated there already if it needed it.
#[btf_map]
pub static kp_hookdevs: Array<u32, { defaults::HOOK_DEVS_MAX as usize }> = Array::new();

/// The datapath's per-CPU clock (`jiffies` and the `bpf_ktime_get_ns()` read in that jiffy; see
/// `crate::flow`). Internal to the datapath: not pinned.
#[btf_map]
pub static kp_clock: PerCpuArray<Clock, 1> = PerCpuArray::new();

/// An entry of [`kp_clock`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Clock {
    /// `bpf_jiffies64()` when `ns` was read.
    pub jiffies: u64,
    /// `bpf_ktime_get_ns()`.
    pub ns: u64,
}

/// The fast path's per-CPU cache of reverse-NAT lookups (`crate::ct::revnat_fast`), a slot per
/// reply-tuple hash: the last lookup of a tuple, a miss or a copy of the entry found. Internal
/// to the datapath: not pinned, each load starts empty.
#[btf_map]
pub static kp_rnmiss: PerCpuArray<RevNatSlot, { RNMISS_SLOTS as usize }> = PerCpuArray::new();

/// Slots of [`kp_rnmiss`] (a power of two).
const RNMISS_SLOTS: u32 = 64;

/// An entry of [`kp_rnmiss`] (one cache line): what `kp_rnat4` held for the reply tuple `key`
/// in jiffy `jiffies` under generation `gen` ([`kp_rngen`]): no entry (`found` 0) or `value`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RevNatSlot {
    /// The reply tuple looked up, as two words ([`crate::ct::tuple_words`]): compared and
    /// stored with two 64-bit loads or stores each, where a `Tuple4` takes five of mixed sizes
    /// (and its copy a call of the byte-wise `memmove` subprogram).
    pub key: [u64; 2],
    /// [`kp_rngen`] read before the lookup.
    pub gen_: u64,
    /// `bpf_jiffies64()` of the lookup.
    pub jiffies: u64,
    /// A copy of the entry found (`found` 1), its flags and time kept up to date by the
    /// replies this CPU translates with it (`crate::ct::RevNatRef::refreshed`).
    pub value: RevNat4Value,
    /// 1: `value` holds the entry; 0: there was none.
    pub found: u64,
}

/// The generation of `kp_rnat4` and `kp_rnat6` (one entry): a new connection of either family
/// adds one once it has installed its reverse-NAT entry (`crate::flow`, `crate::flow6`), as does
/// the removal of a stale one (`crate::ct::clear_stale_revnat` and its IPv6 twin) and a SYN-ACK
/// that finds no entry where this CPU's copy named one (`crate::ct::revnat_fast`), which voids
/// what [`kp_rnmiss`] and `kp_rnmiss6` remembered before (a miss of the new entry's tuple; a
/// copy of a replaced or removed entry). Internal to the datapath:
/// not pinned (a slot also lasts one jiffy at most, which bounds what the programs of an older
/// load, counting in their own copy while an agent replaces them, could leave stale, as it
/// bounds how long a CPU still translates with an entry the agent deleted: a reply within that
/// jiffy gets the translation it would have got a moment earlier).
#[btf_map]
pub static kp_rngen: Array<u64, 1> = Array::new();

/// The cache slot of reply tuple `key` ([`crate::ct::tuple_words`]) on this CPU.
#[inline(always)]
pub fn rnmiss_slot(key: &[u64; 2]) -> Option<*mut RevNatSlot> {
    // Addresses and both ports folded into 32 bits, then a multiplicative hash's top 6 bits.
    let h = (key[0] ^ key[0] >> 32 ^ key[1]) as u32;
    kp_rnmiss.get_ptr_mut(h.wrapping_mul(0x9e37_79b1) >> 26 & (RNMISS_SLOTS - 1))
}

/// The current generation of `kp_rnat4`'s keys ([`kp_rngen`]).
#[inline(always)]
pub fn rnat_gen() -> u64 {
    match kp_rngen.get_ptr(0) {
        // SAFETY: valid map value pointer; a plain 64-bit load of a word other CPUs add to.
        Some(g) => unsafe { core::ptr::read_volatile(g) },
        None => 0,
    }
}

/// Notes inserts into `kp_rnat4` or `kp_rnat6` and removals from them (after them: see
/// [`kp_rngen`]).
#[inline(always)]
pub fn rnat_changed() {
    if let Some(g) = kp_rngen.get_ptr_mut(0) {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        // SAFETY: valid, aligned map value pointer. An atomic add (`lock xadd`; the BPF target
        // has no `AtomicU64::fetch_add`): concurrent inserts never move the generation back.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(g, 1) };
    }
}

/// The per-CPU route cache of XDP and TC (`crate::nat::route`), a slot per destination hash.
/// Internal to the datapath: not pinned, each load starts empty.
#[btf_map]
pub static kp_route4: PerCpuArray<crate::nat::Route4, { ROUTE_SLOTS as usize }> =
    PerCpuArray::new();

/// Slots of [`kp_route4`] (a power of two).
const ROUTE_SLOTS: u32 = 64;

/// The route cache slot of destination `daddr` (be) on this CPU.
#[inline(always)]
pub fn route_slot(daddr: u32) -> Option<*mut crate::nat::Route4> {
    kp_route4.get_ptr_mut(hints::addr_bit(daddr) & (ROUTE_SLOTS - 1))
}

/// Node configuration (one entry), written by the agent.
#[btf_map]
pub static kp_config: Array<NodeConfig, 1> = Array::new();

/// Service id + client network → allowed (`loadBalancerSourceRanges`; see `crate::guard`).
#[btf_map]
pub static kp_srcrng4: LpmTrie<
    kproxy_common::SrcRange4,
    u32,
    { defaults::SRC_RANGES4_MAX as usize },
> = LpmTrie::new();

/// Closed service address → kinds (`svc_flags` of its frontends; see `crate::guard`).
#[btf_map]
pub static kp_svcaddr4: HashMap<u32, u32, { defaults::SVC_ADDRS4_MAX as usize }> = HashMap::new();

/// Hint bitmap of the closed service addresses (`hints::addr_bit`).
#[btf_map]
pub static kp_svcaddrbits: Array<u64, { hints::ADDR_WORDS as usize }, MMAPABLE> = Array::new();

/// The service CIDRs (one entry).
#[btf_map]
pub static kp_svccidr4: Array<kproxy_common::ServiceCidrs4, 1> = Array::new();

/// Socket-LB configuration (one entry): which network namespaces are balanced.
#[btf_map]
pub static kp_sockcfg: Array<kproxy_common::SockConfig, 1> = Array::new();

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

/// Whether `addr:port` (be) of `proto` may be a frontend (`kind == hints::FRONTEND`) or a
/// backend (`hints::BACKEND`): both its address and its port bits are set.
#[inline(always)]
pub fn hinted(kind: u32, addr: u32, proto_: u8, port: u16) -> bool {
    let Some((pi, pm)) = hints::port_slot(kind, proto_, port) else { return false };
    if !kp_portbits.get(pi).is_some_and(|w| *w & pm != 0) {
        return false;
    }
    let (ai, am) = hints::addr_slot(kind, addr);
    kp_addrbits.get(ai).is_some_and(|w| *w & am != 0)
}

/// The node configuration (all zero, i.e. not READY, until the agent writes it).
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    kp_config.get(0).copied()
}

/// Whether the packet arrived on a device whose ingress runs kproxy's programs
/// ([`kp_hookdevs`]; `ifindex` 0, a packet the node itself sent, never did).
#[inline(always)]
pub fn hooked_ingress(ifindex: u32) -> bool {
    ifindex != 0
        && kp_hookdevs.get(kproxy_common::hook_dev_slot(ifindex)).is_some_and(|v| *v == ifindex)
}

/// Whether `ifindex` is a host-side pod interface ([`kp_poddevs`]).
#[inline(always)]
pub fn is_pod_dev(ifindex: u32) -> bool {
    // SAFETY: only the presence of the value is used.
    unsafe { kp_poddevs.get(ifindex) }.is_some()
}

/// Whether the agent has written the node configuration (`cfg_flags::READY`), for a path that
/// needs no more of it than that.
#[inline(always)]
pub fn ready() -> bool {
    config_flag(cfg_flags::READY)
}

/// Whether the node configuration has `flag` (`cfg_flags::*`; none before the agent wrote it).
#[inline(always)]
pub fn config_flag(flag: u32) -> bool {
    kp_config.get(0).is_some_and(|c| c.flags & flag != 0)
}

/// The node configuration once the agent has written it (`cfg_flags::READY`).
#[inline(always)]
pub fn ready_config() -> Option<NodeConfig> {
    config().filter(|c| c.flags & cfg_flags::READY != 0)
}
