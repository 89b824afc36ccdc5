//! Connection tracking: `kp_ct4` (original tuple → translation) and `kp_rnat4` (reply tuple →
//! original addresses, also the table of allocated source-NAT ports).
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use kproxy_common::{
    Ct4Value, Frag4Key, Frag4Value, NodeConfig, Reason, RevNat4Value, Tuple4, ct_counter, ct_flags,
    ct_state, frag, proto, timeouts,
};

use crate::{
    maps::{self, kp_ct4, kp_frag4, kp_rnat4},
    parse::{Ip4, tcp_flags},
};

/// Refresh `last_seen_ns` at most this often (saves a cache-line write per packet).
pub const TOUCH_NS: u64 = 1_000_000_000;

/// A tuple from its parts. Built from a zeroed value: a `[0; 3]` padding literal compiles to a
/// call of a byte-wise `memset` subprogram on every packet.
#[inline(always)]
pub fn tuple(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Tuple4 {
    // SAFETY: all-zero is a valid Tuple4.
    let mut t: Tuple4 = unsafe { core::mem::zeroed() };
    t.saddr = saddr;
    t.daddr = daddr;
    t.sport = sport;
    t.dport = dport;
    t.proto = proto;
    t
}

/// Stores every field of the connection entry `$v` into the map value at `$c` (both families),
/// one whole-field volatile store each, the state last. Unsafe: `$c` must be a valid map value
/// pointer.
macro_rules! reopen_fields {
    ($c:expr, $v:expr) => {{
        let (c, v) = ($c, $v);
        core::ptr::write_volatile(&raw mut (*c).backend_id, v.backend_id);
        core::ptr::write_volatile(&raw mut (*c).svc_id, v.svc_id);
        core::ptr::write_volatile(&raw mut (*c).backend_addr, v.backend_addr);
        core::ptr::write_volatile(&raw mut (*c).snat_addr, v.snat_addr);
        core::ptr::write_volatile(&raw mut (*c).backend_port, v.backend_port);
        core::ptr::write_volatile(&raw mut (*c).snat_port, v.snat_port);
        core::ptr::write_volatile(&raw mut (*c).flags, v.flags);
        core::ptr::write_volatile(&raw mut (*c).backend_gen, v.backend_gen);
        core::ptr::write_volatile(&raw mut (*c).created_ns, v.created_ns);
        core::ptr::write_volatile(&raw mut (*c).last_seen_ns, v.last_seen_ns);
        core::ptr::write_volatile(&raw mut (*c).state, v.state);
    }};
}
pub(crate) use reopen_fields;

/// Whether the reverse-NAT entry at `$old` names the client and frontend of `$v` (both
/// families), its fields read one by one. Unsafe: `$old` must be a valid map value pointer.
macro_rules! same_client_and_frontend {
    ($old:expr, $v:expr) => {{
        let (o, v) = ($old, $v);
        (*o).frontend_addr == v.frontend_addr
            && (*o).frontend_port == v.frontend_port
            && (*o).client_addr == v.client_addr
            && (*o).client_port == v.client_port
    }};
}
pub(crate) use same_client_and_frontend;

/// The live connection entry of an original tuple (expired entries count as absent).
#[inline(always)]
pub fn lookup(t: &Tuple4, now: u64) -> Option<*mut Ct4Value> {
    entry(t).filter(|&v| live(v, t.proto, now))
}

/// The connection entry of an original tuple, expired or not.
#[inline(always)]
pub fn entry(t: &Tuple4) -> Option<*mut Ct4Value> {
    kp_ct4.get_ptr_mut(t)
}

/// Whether the connection entry at `v` (protocol `proto_`) has not expired at `now`.
#[inline(always)]
pub fn live(v: *mut Ct4Value, proto_: u8, now: u64) -> bool {
    // SAFETY: valid map value pointer.
    let c = unsafe { &*v };
    unexpired(c.last_seen_ns, proto_, c.state, now)
}

/// Whether a connection entry (either family) of protocol `proto_` in `state`, last seen at
/// `last_seen_ns`, has not expired at `now`.
#[inline(always)]
pub fn unexpired(last_seen_ns: u64, proto_: u8, state: u8, now: u64) -> bool {
    // Saturating: the per-jiffy clock may be a little behind a timestamp another CPU wrote.
    now.saturating_sub(last_seen_ns) <= timeouts::for_state(proto_, state)
}

/// Records a packet of a tracked connection; `reply` says which direction it went. The entry is
/// shared by every CPU: fields are written with volatile stores of whole fields (racing writers
/// only store equivalent values).
#[inline(always)]
pub fn touch(c: *mut Ct4Value, proto_: u8, flags: u8, reply: bool, now: u64) {
    // SAFETY: valid map value pointer; fields read and written one by one, never through a
    // reference.
    unsafe {
        let old = core::ptr::read_volatile(&raw const (*c).state);
        let mut state = old;
        if proto_ == proto::TCP {
            if flags & tcp_flags::RST != 0 {
                state = ct_state::CLOSED;
            } else if flags & tcp_flags::FIN != 0 && state != ct_state::CLOSED {
                state = ct_state::CLOSING;
            } else if reply && state == ct_state::NEW {
                state = ct_state::ESTABLISHED;
            }
        } else if reply && state == ct_state::NEW {
            state = ct_state::ESTABLISHED;
        }
        if state != old {
            core::ptr::write_volatile(&raw mut (*c).state, state);
            core::ptr::write_volatile(&raw mut (*c).last_seen_ns, now);
        } else if now.saturating_sub(core::ptr::read_volatile(&raw const (*c).last_seen_ns))
            > TOUCH_NS
        {
            core::ptr::write_volatile(&raw mut (*c).last_seen_ns, now);
        }
    }
}

/// Notes that the connection entry's backend was found in the backends map under backend
/// generation `gen`, and whether it is local.
#[inline(always)]
pub fn validated(c: *mut Ct4Value, gen_: u16, local: bool) {
    // SAFETY: valid map value pointer; whole-field volatile stores.
    unsafe {
        let f = core::ptr::read_volatile(&raw const (*c).flags);
        let f = if local { f | ct_flags::LOCAL_BACKEND } else { f & !ct_flags::LOCAL_BACKEND };
        core::ptr::write_volatile(&raw mut (*c).flags, f);
        core::ptr::write_volatile(&raw mut (*c).backend_gen, gen_);
    }
}

/// The reverse-NAT entry of a reply tuple, in place.
#[inline(always)]
pub fn revnat_ptr(t: &Tuple4) -> Option<*mut RevNat4Value> {
    kp_rnat4.get_ptr_mut(t)
}

/// Stores in the lookup-cache slot at `$s` (either family's) the lookup of reply tuple `$key`
/// under generation `$gen` in jiffy `$j`: a miss (`$r` `None`), or a copy of the entry `$r`
/// points at, `$words` words (the value type's size, asserted where it is defined), copied one
/// by one with volatile accesses (a struct or array copy can become a call of the byte-wise
/// `memmove` subprogram). A miss leaves the old copy's bytes. Unsafe: `$s` must be this CPU's
/// slot of a per-CPU map, `$r` a valid map value pointer.
macro_rules! remember_lookup {
    ($s:expr, $key:expr, $gen:expr, $j:expr, $r:expr, $words:literal) => {{
        let s = $s;
        (*s).key = $key;
        (*s).gen_ = $gen;
        (*s).jiffies = $j;
        match $r {
            Some(p) => {
                let w = p as *const u64;
                let d = &raw mut (*s).value as *mut u64;
                let mut i = 0;
                while i < $words {
                    core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(w.add(i)));
                    i += 1;
                }
                (*s).found = 1;
            }
            None => (*s).found = 0,
        }
    }};
}
pub(crate) use remember_lookup;

/// A reverse-NAT entry found: a copy of it (`v`), where it lies in `kp_rnat4` when this packet
/// looked it up (`None` when the copy came from this CPU's cache, [`revnat_fast`]), and the
/// cache slot holding its copy.
#[derive(Clone, Copy)]
pub struct RevNatRef {
    /// The entry's value.
    pub v: RevNat4Value,
    ptr: Option<*mut RevNat4Value>,
    slot: Option<*mut maps::RevNatSlot>,
}

impl RevNatRef {
    /// The entry at `p`, looked up by the caller.
    #[inline(always)]
    pub fn at(p: *mut RevNat4Value) -> Self {
        RevNatRef { v: copy_revnat(p), ptr: Some(p), slot: None }
    }

    /// Stores `flags` and `now` in the entry of reply tuple `t` (looked up again if it came from
    /// the cache: once a second and on SYN, FIN or RST) and in this CPU's copy of it, as
    /// [`revnat_refreshed`].
    #[inline(always)]
    pub fn refreshed(&self, t: &Tuple4, flags: u32, now: u64) {
        let p = match self.ptr {
            Some(p) => Some(p),
            None => revnat_ptr(t),
        };
        if let Some(p) = p {
            revnat_refreshed(p, flags, now);
        }
        if let Some(s) = self.slot {
            // SAFETY: this CPU's slot of a per-CPU map, only used by this CPU's programs.
            unsafe {
                (*s).value.flags = flags;
                (*s).value.last_seen_ns = now;
            }
        }
    }
}

/// [`revnat_ptr`] for the fast path. Its lookups are cached per CPU ([`maps::kp_rnmiss`]) for
/// the rest of the jiffy, and only while no new connection installed a reverse-NAT entry (nor
/// a stale one was removed) since ([`maps::kp_rngen`], read before the lookup): the following
/// packets of the tuple skip the hash lookup, which on a reply arriving from another node
/// (the entry's cache lines cold, the data it answers having left on the node's other path) is
/// most of the cost of translating it. A miss is cached too: the fast path also sees the
/// replies of plain traffic from a backend port (a direct connection to a backend pod: its ACK
/// stream crosses XDP, then the pod's TC hook, each asking for the same reply tuple).
///
/// `opening`: the packet opens its side of a connection (a TCP segment with SYN: a SYN-ACK). It
/// is looked up in the map whatever the cache holds: a copy can outlive its entry for the rest
/// of the jiffy when the agent deleted it (garbage collection, a flush), and a connection that
/// takes the tuple over straight to the backend (a direct connection from the same client port)
/// must not have its SYN-ACK restored from it, on whichever CPU the SYN went. Where the copy
/// named an entry the map no longer has, the generation goes up, voiding the copies of the
/// tuple that other CPUs hold, for the connection's following replies.
#[inline(always)]
pub fn revnat_fast(t: &Tuple4, opening: bool) -> Option<RevNatRef> {
    // SAFETY: helper without arguments (a memory load once the verifier inlined it).
    let j = unsafe { bpf_jiffies64() };
    let gen_ = maps::rnat_gen();
    let key = tuple_words(t);
    let slot = maps::rnmiss_slot(&key);
    let mut copied = false;
    if let Some(s) = slot {
        // SAFETY: this CPU's slot of a per-CPU map, only used by this CPU's programs.
        let c = unsafe { &*s };
        if c.jiffies == j && c.gen_ == gen_ && c.key[0] == key[0] && c.key[1] == key[1] {
            if c.found == 0 {
                return None;
            }
            if !opening {
                return Some(RevNatRef { v: copy_revnat(&raw const c.value), ptr: None, slot });
            }
            copied = true;
        }
    }
    let r = kp_rnat4.get_ptr_mut(t);
    if let Some(s) = slot {
        // SAFETY: this CPU's slot; `r` a valid map value pointer of the slot's value type.
        unsafe { remember_lookup!(s, key, gen_, j, r, 3) };
    }
    if copied && r.is_none() {
        maps::rnat_changed();
    }
    let p = r?;
    Some(RevNatRef { v: copy_revnat(p), ptr: Some(p), slot })
}

/// A copy of the reverse-NAT entry at `p` (a map value or a cache slot's copy), as three words:
/// a copy of the struct can become a call of the byte-wise `memmove` subprogram.
#[inline(always)]
fn copy_revnat(p: *const RevNat4Value) -> RevNat4Value {
    const _: () = assert!(core::mem::size_of::<RevNat4Value>() == 24);
    // SAFETY: `p` is valid for 24 bytes, 8-aligned (its last field is a u64).
    unsafe {
        let w = p as *const [u64; 3];
        core::mem::transmute::<[u64; 3], RevNat4Value>([(*w)[0], (*w)[1], (*w)[2]])
    }
}

/// A tuple as two words: addresses, then ports and protocol (every field, so that equal words
/// mean equal tuples; the padding is left out).
#[inline(always)]
pub fn tuple_words(t: &Tuple4) -> [u64; 2] {
    [
        t.saddr as u64 | (t.daddr as u64) << 32,
        t.sport as u64 | (t.dport as u64) << 16 | (t.proto as u64) << 32,
    ]
}

/// Stores `flags` and `now` in a reverse-NAT entry (after its connection entry was refreshed).
#[inline(always)]
pub fn revnat_refreshed(r: *mut RevNat4Value, flags: u32, now: u64) {
    // SAFETY: valid map value pointer; whole-field volatile stores.
    unsafe {
        core::ptr::write_volatile(&raw mut (*r).flags, flags);
        core::ptr::write_volatile(&raw mut (*r).last_seen_ns, now);
    }
}

/// Creates (or replaces) the connection entry of `t`. A new entry is counted
/// (`ct_counter::CREATED`); replacing an expired or closed one is not, so that created minus
/// deleted minus present entries is exactly what the LRU evicted.
#[inline(always)]
pub fn create(t: &Tuple4, v: &Ct4Value) -> Result<(), Reason> {
    if kp_ct4.insert(t, v, BPF_NOEXIST as u64).is_ok() {
        maps::count_ct(ct_counter::CREATED);
        return Ok(());
    }
    kp_ct4.insert(t, v, 0).map_err(|_| Reason::DropCtInsert)
}

/// Makes the entry at `c` (of the same tuple, closed or expired) the new connection's `v`, in
/// place: a client that reuses its port (`tcp_tw_reuse`, a UDP client's next exchange) finds
/// the entry of its last connection, and an update of an LRU hash map takes a free element, the
/// bucket lock and gives the old element back (twice when the `BPF_NOEXIST` attempt fails
/// first), where this is a few stores. Not counted as created, as a replacement. Fields are
/// stored one by one: the old connection is over (its client opened a new one on the tuple), so
/// a packet of it that another CPU reads meanwhile has nowhere better to go.
#[inline(always)]
pub fn reopen(c: *mut Ct4Value, v: &Ct4Value) {
    // SAFETY: valid map value pointer.
    unsafe { reopen_fields!(c, v) };
}

/// Removes the connection entry of `t` (counted as `ct_counter::DELETED_DATAPATH`).
#[inline(always)]
pub fn delete(t: &Tuple4) {
    if kp_ct4.remove(t).is_ok() {
        maps::count_ct(ct_counter::DELETED_DATAPATH);
    }
}

/// The reverse-NAT entry of a reply tuple.
#[inline(always)]
pub fn revnat(t: &Tuple4) -> Option<RevNat4Value> {
    // SAFETY: map values are only read by copy.
    unsafe { kp_rnat4.get(t) }.copied()
}

/// Whether a pod's SYN straight to a backend port may have a stale reverse-NAT entry for
/// [`clear_stale_revnat`] to remove: one is held for its reply tuple (a miss is remembered per
/// CPU, [`revnat_fast`], so the backend's SYN-ACK skips the lookup).
#[inline(always)]
pub fn may_have_stale_revnat(p: &Ip4) -> bool {
    revnat_fast(&reply_of(p), false).is_some()
}

/// The tuple of the replies to `p`: its addresses and ports swapped.
#[inline(always)]
fn reply_of(p: &Ip4) -> Tuple4 {
    tuple(p.daddr, p.saddr, p.dport, p.sport, p.proto)
}

/// A pod's new TCP connection (SYN) straight to `daddr:dport` from `saddr:sport`, not to a
/// service: if a translated connection from the same client port to a backend at that address
/// left a reverse-NAT entry and is closed or gone, removes it and its connection entry (the new
/// connection's replies would otherwise be rewritten to the old frontend; conntrack likewise
/// lets a new SYN replace a closed entry). A live translated connection is left alone.
/// Returns whether stale entries were removed.
#[inline(always)]
pub fn clear_stale_revnat(p: &Ip4, now: u64) -> bool {
    let reply = reply_of(p);
    let Some(old) = revnat(&reply) else { return false };
    if old.client_addr != p.saddr || old.client_port != p.sport {
        return false;
    }
    let orig =
        tuple(old.client_addr, old.frontend_addr, old.client_port, old.frontend_port, p.proto);
    if let Some(c) = lookup(&orig, now) {
        // SAFETY: valid map value pointer, copied out.
        let c = unsafe { *c };
        if c.state < ct_state::CLOSING {
            return false;
        }
        delete(&orig);
    }
    let _ = kp_rnat4.remove(reply);
    // Voids this tuple's copies in the CPUs' caches (`revnat_fast`).
    maps::rnat_changed();
    true
}

/// Installs the reverse-NAT entry `v` for replies arriving with tuple `reply`, unless another
/// live connection holds that reply tuple (the same client address and port reaching the same
/// backend through another frontend): then returns `Ok(false)` and leaves it alone. An entry of
/// the same client and frontend (a new connection on a reused tuple) or of a connection that is
/// gone is replaced. `reused`: the connection's tuple had an entry (a client reusing its port),
/// so the reply tuple most likely has one of the same client and frontend, which is then
/// refreshed in place (its addresses and ports stay as they are) instead of replaced.
#[inline(always)]
pub fn claim_revnat(
    reply: &Tuple4,
    v: &RevNat4Value,
    now: u64,
    reused: bool,
) -> Result<bool, Reason> {
    if reused
        && let Some(old) = revnat_ptr(reply)
        // SAFETY: valid map value pointer.
        && unsafe { same_client_and_frontend!(old, v) }
    {
        revnat_refreshed(old, v.flags, v.last_seen_ns);
        return Ok(true);
    }
    if kp_rnat4.insert(reply, v, BPF_NOEXIST as u64).is_ok() {
        return Ok(true);
    }
    if let Some(old) = revnat(reply)
        && (old.frontend_addr != v.frontend_addr
            || old.frontend_port != v.frontend_port
            || old.client_addr != v.client_addr
            || old.client_port != v.client_port)
        && !reply_owner_gone(reply, now)
    {
        return Ok(false);
    }
    kp_rnat4.insert(reply, v, 0).map_err(|_| Reason::DropCtInsert)?;
    Ok(true)
}

/// Allocates a source-NAT port for replies `backend → snat address`, claiming the reverse-NAT
/// entry with `BPF_NOEXIST` so that two connections never share a reply tuple. Probes up to 8
/// consecutive ports from a hashed start; a port whose owner connection is gone, expired or
/// reset is reclaimed. Returns the port (be).
#[inline(always)]
pub fn alloc_snat_port(
    cfg: &NodeConfig,
    reply: &Tuple4,
    v: &RevNat4Value,
    hash: u32,
    now: u64,
) -> Result<u16, Reason> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if min == 0 || max < min {
        return Err(Reason::DropSnatExhausted);
    }
    let range = max - min + 1;
    let start = hash.checked_rem(range).unwrap_or(0);
    // Rebuilt rather than copied: a copy of the padding is a `memset` call (see `tuple`).
    let mut key = tuple(reply.saddr, reply.daddr, reply.sport, reply.dport, reply.proto);
    let mut i = 0;
    while i < 8 {
        let port = ((min + (start + i).checked_rem(range).unwrap_or(0)) as u16).to_be();
        key.dport = port;
        if kp_rnat4.insert(key, v, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        if reply_owner_gone(&key, now) && kp_rnat4.insert(key, v, 0).is_ok() {
            return Ok(port);
        }
        i += 1;
    }
    Err(Reason::DropSnatExhausted)
}

/// Whether the connection that claimed the reply tuple `key` no longer uses it: gone, expired,
/// reset, or translated to another reply tuple since (its source NAT address and port, or its
/// client address and port when it has no source NAT, are not the tuple's destination).
#[inline(always)]
fn reply_owner_gone(key: &Tuple4, now: u64) -> bool {
    let Some(old) = revnat(key) else { return true };
    let orig =
        tuple(old.client_addr, old.frontend_addr, old.client_port, old.frontend_port, key.proto);
    match lookup(&orig, now) {
        None => true,
        Some(c) => {
            // SAFETY: valid map value pointer, copied out.
            let c = unsafe { *c };
            let (addr, port) = if c.flags & ct_flags::SNAT != 0 {
                (c.snat_addr, c.snat_port)
            } else {
                (old.client_addr, old.client_port)
            };
            c.state == ct_state::CLOSED || port != key.dport || addr != key.daddr
        }
    }
}

#[inline(always)]
fn frag_key(p: &Ip4) -> Frag4Key {
    Frag4Key { saddr: p.saddr, daddr: p.daddr, id: p.id, proto: p.proto, _pad: 0 }
}

/// Remembers the ports of a fragmented datagram from its first fragment, with the time.
#[inline(always)]
pub fn record_fragment(p: &Ip4) {
    // SAFETY: helper without arguments.
    let seen = frag::stamp(unsafe { bpf_ktime_get_ns() });
    let v = Frag4Value { sport: p.sport, dport: p.dport, seen };
    // LRU: a full table forgets the oldest datagram, whose later fragments then pass untouched.
    let _ = kp_frag4.insert(frag_key(p), v, 0);
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was seen less
/// than `frag::TIMEOUT_NS` ago (an IP id is reused after a while: an older entry belongs to
/// another datagram).
#[inline(always)]
pub fn fragment_ports(p: &Ip4) -> Option<(u16, u16)> {
    // SAFETY: map values are only read by copy.
    let v = unsafe { kp_frag4.get(frag_key(p)) }.copied()?;
    // SAFETY: helper without arguments.
    if frag::expired(v.seen, unsafe { bpf_ktime_get_ns() }) {
        return None;
    }
    Some((v.sport, v.dport))
}
