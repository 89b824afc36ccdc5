//! IPv6 connection tracking: `kp_ct6` (original tuple → translation) and `kp_rnat6` (reply
//! tuple → original addresses, also the table of allocated source-NAT ports), as [`crate::ct`]
//! does for IPv4. The state machine and timeouts are the IPv4 ones ([`crate::ct::touch`] on the
//! common fields).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
};
use kproxy_common::{
    Addr6, Ct6Value, Frag6Key, Frag6Value, NodeConfig, Reason, RevNat6Value, Tuple6, ct_counter,
    ct_flags, ct_state, frag, proto,
};

use crate::{
    maps,
    maps6::{self, kp_ct6, kp_frag6, kp_rnat6},
    parse::tcp_flags,
    parse6::Ip6,
};

/// Refresh `last_seen_ns` at most this often (saves a cache-line write per packet).
pub const TOUCH_NS: u64 = 1_000_000_000;

/// A tuple from its parts.
#[inline(always)]
pub fn tuple(saddr: &Addr6, daddr: &Addr6, sport: u16, dport: u16, proto: u8) -> Tuple6 {
    // Ports in one word: sport at the lower address (little-endian target).
    let ports = sport as u32 | (dport as u32) << 16;
    key40::<Tuple6>(saddr, daddr, ports, proto)
}

/// A 40-byte IPv6 key (`Tuple6`, `Frag6Key`): two addresses, one 32-bit word, then the
/// protocol followed by three zero bytes, written as ten 32-bit stores. A struct literal with
/// `_pad: [0; 3]` compiles to a call of a byte-wise `memset` for the three bytes, on every
/// packet.
#[inline(always)]
fn key40<K>(saddr: &Addr6, daddr: &Addr6, word: u32, proto: u8) -> K {
    const _: () = assert!(cfg!(target_endian = "little"));
    const _: () =
        assert!(core::mem::size_of::<Tuple6>() == 40 && core::mem::align_of::<Tuple6>() == 4);
    const _: () =
        assert!(core::mem::size_of::<Frag6Key>() == 40 && core::mem::align_of::<Frag6Key>() == 4);
    const _: () = assert!(
        core::mem::offset_of!(Tuple6, sport) == 32
            && core::mem::offset_of!(Tuple6, dport) == 34
            && core::mem::offset_of!(Tuple6, proto) == 36
            && core::mem::offset_of!(Frag6Key, id) == 32
            && core::mem::offset_of!(Frag6Key, proto) == 36
    );
    let mut k = core::mem::MaybeUninit::<K>::uninit();
    let w = k.as_mut_ptr() as *mut u32;
    // SAFETY: K is one of the two 40-byte, 4-byte aligned keys checked above (the only
    // callers): ten aligned stores cover all of it, and every bit pattern is a valid value.
    unsafe {
        let mut i = 0;
        while i < 4 {
            w.add(i).write(saddr[i]);
            w.add(4 + i).write(daddr[i]);
            i += 1;
        }
        w.add(8).write(word);
        // The protocol in the lowest byte, the padding zero.
        w.add(9).write(proto as u32);
        k.assume_init()
    }
}

/// The live connection entry of an original tuple (expired entries count as absent).
#[inline(always)]
pub fn lookup(t: &Tuple6, now: u64) -> Option<*mut Ct6Value> {
    let v = entry(t)?;
    // SAFETY: valid map value pointer.
    let c = unsafe { &*v };
    crate::ct::unexpired(c.last_seen_ns, t.proto, c.state, now).then_some(v)
}

/// The connection entry of an original tuple, expired or not.
#[inline(always)]
pub fn entry(t: &Tuple6) -> Option<*mut Ct6Value> {
    kp_ct6.get_ptr_mut(t)
}

/// Makes the entry at `c` (of the same tuple, closed or expired) the new connection's `v`, in
/// place (see [`crate::ct::reopen`]).
#[inline(always)]
pub fn reopen(c: *mut Ct6Value, v: &Ct6Value) {
    // SAFETY: valid map value pointer.
    unsafe { crate::ct::reopen_fields!(c, v) };
}

/// Records a packet of a tracked connection; `reply` says which direction it went.
#[inline(always)]
pub fn touch(c: *mut Ct6Value, proto_: u8, flags: u8, reply: bool, now: u64) {
    // SAFETY: valid map value pointer; racing writers only store equivalent values.
    let c = unsafe { &mut *c };
    let mut state = c.state;
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
    if state != c.state {
        c.state = state;
        c.last_seen_ns = now;
    } else if now.saturating_sub(c.last_seen_ns) > TOUCH_NS {
        c.last_seen_ns = now;
    }
}

/// Notes that the connection entry's backend was found in the backends map under backend
/// generation `gen_`, and whether it is local (as [`crate::ct::validated`]).
#[inline(always)]
pub fn validated(c: *mut Ct6Value, gen_: u16, local: bool) {
    // SAFETY: valid map value pointer; whole-field volatile stores.
    unsafe {
        let f = core::ptr::read_volatile(&raw const (*c).flags);
        let f = if local { f | ct_flags::LOCAL_BACKEND } else { f & !ct_flags::LOCAL_BACKEND };
        core::ptr::write_volatile(&raw mut (*c).flags, f);
        core::ptr::write_volatile(&raw mut (*c).backend_gen, gen_);
    }
}

/// Creates (or replaces) the connection entry of `t`; a new entry is counted in `kp_ctstat6`.
#[inline(always)]
pub fn create(t: &Tuple6, v: &Ct6Value) -> Result<(), Reason> {
    if kp_ct6.insert(t, v, BPF_NOEXIST as u64).is_ok() {
        maps6::count_ct6(ct_counter::CREATED);
        return Ok(());
    }
    kp_ct6.insert(t, v, 0).map_err(|_| Reason::DropCtInsert)
}

/// Removes the connection entry of `t` (counted as `ct_counter::DELETED_DATAPATH`).
#[inline(always)]
pub fn delete(t: &Tuple6) {
    if kp_ct6.remove(t).is_ok() {
        maps6::count_ct6(ct_counter::DELETED_DATAPATH);
    }
}

/// The reverse-NAT entry of a reply tuple.
#[inline(always)]
pub fn revnat(t: &Tuple6) -> Option<RevNat6Value> {
    // SAFETY: map values are only read by copy.
    unsafe { kp_rnat6.get(t) }.copied()
}

/// The reverse-NAT entry of a reply tuple, in place.
#[inline(always)]
pub fn revnat_ptr(t: &Tuple6) -> Option<*mut RevNat6Value> {
    kp_rnat6.get_ptr_mut(t)
}

/// A reverse-NAT entry found by [`revnat_fast`]: `p` points at it in `kp_rnat6`, or at this
/// CPU's copy of it (`cached`) in the lookup cache, whose `slot` holds the copy.
#[derive(Clone, Copy)]
pub struct RevNat6Ref {
    /// The entry or its copy, read in place (an IPv6 entry is 48 bytes: not copied to the
    /// stack).
    pub p: *mut RevNat6Value,
    cached: bool,
    slot: Option<*mut maps6::RevNatSlot6>,
}

impl RevNat6Ref {
    /// The entry at `p`, looked up by the caller.
    #[inline(always)]
    pub fn at(p: *mut RevNat6Value) -> Self {
        RevNat6Ref { p, cached: false, slot: None }
    }

    /// Stores `flags` and `now` in the entry of reply tuple `t` and in this CPU's copy of it
    /// (the entry looked up again if `p` is the copy), as [`revnat_refreshed`].
    #[inline(always)]
    pub fn refreshed(&self, t: &Tuple6, flags: u32, now: u64) {
        revnat_refreshed(self.p, flags, now);
        let other = if self.cached {
            revnat_ptr(t)
        } else {
            // SAFETY: this CPU's slot of a per-CPU map, only used by this CPU's programs.
            self.slot.map(|s| unsafe { &raw mut (*s).value })
        };
        if let Some(o) = other {
            revnat_refreshed(o, flags, now);
        }
    }
}

/// A reply tuple as five words: both addresses, then ports and protocol (every field, so that
/// equal words mean equal tuples; the padding is left out).
#[inline(always)]
pub fn tuple_words(t: &Tuple6) -> [u64; 5] {
    let w = |a: &Addr6, i: usize| a[i] as u64 | (a[i + 1] as u64) << 32;
    [
        w(&t.saddr, 0),
        w(&t.saddr, 2),
        w(&t.daddr, 0),
        w(&t.daddr, 2),
        t.sport as u64 | (t.dport as u64) << 16 | (t.proto as u64) << 32,
    ]
}

/// [`revnat_ptr`] for the fast path, through this CPU's lookup cache ([`maps6::kp_rnmiss6`]) as
/// [`crate::ct::revnat_fast`] does for IPv4: a remote backend's replies skip the hash lookup.
/// `opening` (a SYN-ACK): looked up in the map whatever the cache holds, as for IPv4.
#[inline(always)]
pub fn revnat_fast(t: &Tuple6, opening: bool) -> Option<RevNat6Ref> {
    // SAFETY: helper without arguments (a memory load once the verifier inlined it).
    let j = unsafe { bpf_jiffies64() };
    let gen_ = maps::rnat_gen();
    let key = tuple_words(t);
    let slot = maps6::rnmiss_slot6(&key);
    let mut copied = false;
    if let Some(s) = slot {
        // SAFETY: this CPU's slot of a per-CPU map, only used by this CPU's programs.
        unsafe {
            if (*s).jiffies == j
                && (*s).gen_ == gen_
                && (*s).key[0] == key[0]
                && (*s).key[1] == key[1]
                && (*s).key[2] == key[2]
                && (*s).key[3] == key[3]
                && (*s).key[4] == key[4]
            {
                if (*s).found == 0 {
                    return None;
                }
                if !opening {
                    return Some(RevNat6Ref { p: &raw mut (*s).value, cached: true, slot });
                }
                copied = true;
            }
        }
    }
    let r = kp_rnat6.get_ptr_mut(t);
    if let Some(s) = slot {
        // SAFETY: this CPU's slot; `r` a valid map value pointer of the slot's value type.
        unsafe { crate::ct::remember_lookup!(s, key, gen_, j, r, 6) };
    }
    if copied && r.is_none() {
        maps::rnat_changed();
    }
    Some(RevNat6Ref { p: r?, cached: false, slot })
}

/// Records that a reply refreshed the connection entry of the reverse-NAT entry at `r`, with
/// the connection's `rnat_flags` (as [`crate::ct::revnat_refreshed`]).
#[inline(always)]
pub fn revnat_refreshed(r: *mut RevNat6Value, flags: u32, now: u64) {
    // SAFETY: valid map value pointer; whole-field volatile stores.
    unsafe {
        core::ptr::write_volatile(&raw mut (*r).flags, flags);
        core::ptr::write_volatile(&raw mut (*r).last_seen_ns, now);
    }
}

/// Installs the reverse-NAT entry for replies arriving with tuple `reply`. `reused`: the
/// connection's tuple had an entry, so the reply tuple most likely has one of the same client
/// and frontend, which is then refreshed in place (see [`crate::ct::claim_revnat`]).
#[inline(always)]
pub fn claim_revnat(reply: &Tuple6, v: &RevNat6Value, reused: bool) -> Result<(), Reason> {
    if reused
        && let Some(old) = revnat_ptr(reply)
        // SAFETY: valid map value pointer.
        && unsafe { crate::ct::same_client_and_frontend!(old, v) }
    {
        revnat_refreshed(old, v.flags, v.last_seen_ns);
        return Ok(());
    }
    kp_rnat6.insert(reply, v, 0).map_err(|_| Reason::DropCtInsert)
}

/// Whether a pod's SYN straight to a backend port may have a stale reverse-NAT entry for
/// [`clear_stale_revnat`] to remove (see [`crate::ct::may_have_stale_revnat`]).
#[inline(always)]
pub fn may_have_stale_revnat(p: &Ip6) -> bool {
    revnat_ptr(&reply_of(p)).is_some()
}

/// The tuple of the replies to `p`: its addresses and ports swapped.
#[inline(always)]
fn reply_of(p: &Ip6) -> Tuple6 {
    tuple(&p.daddr, &p.saddr, p.dport, p.sport, p.proto)
}

/// A pod's new TCP connection straight to a backend from a client port that a closed
/// translated connection used: removes the stale entries (see [`crate::ct::clear_stale_revnat`]).
#[inline(always)]
pub fn clear_stale_revnat(p: &Ip6, now: u64) -> bool {
    let reply = reply_of(p);
    let Some(old) = revnat(&reply) else { return false };
    if old.client_addr != p.saddr || old.client_port != p.sport {
        return false;
    }
    let orig =
        tuple(&old.client_addr, &old.frontend_addr, old.client_port, old.frontend_port, p.proto);
    if let Some(c) = lookup(&orig, now) {
        // SAFETY: valid map value pointer.
        if unsafe { (*c).state } < ct_state::CLOSING {
            return false;
        }
        delete(&orig);
    }
    let _ = kp_rnat6.remove(reply);
    // Voids this tuple's copies in the CPUs' caches (`revnat_fast`).
    maps::rnat_changed();
    true
}

/// Allocates a source-NAT port for replies `backend → snat address` (the port range is the
/// node's, shared with IPv4), as [`crate::ct::alloc_snat_port`]. Returns the port (be).
#[inline(always)]
pub fn alloc_snat_port(
    cfg: &NodeConfig,
    reply: &mut Tuple6,
    v: &RevNat6Value,
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
    let key = reply;
    // Four tries (IPv4 makes eight): the IPv6 slow path must stay within what the verifier of
    // Linux 5.10 follows.
    let mut i = 0;
    while i < 4 {
        let port = ((min + (start + i).checked_rem(range).unwrap_or(0)) as u16).to_be();
        key.dport = port;
        let k: &Tuple6 = key;
        if kp_rnat6.insert(k, v, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        if snat_port_stale(k, now) && kp_rnat6.insert(k, v, 0).is_ok() {
            return Ok(port);
        }
        i += 1;
    }
    Err(Reason::DropSnatExhausted)
}

/// Whether the connection that claimed the reply tuple `key` no longer uses it.
#[inline(always)]
fn snat_port_stale(key: &Tuple6, now: u64) -> bool {
    let Some(old) = kp_rnat6.get_ptr(key) else { return true };
    // SAFETY: valid map value pointer, read in place.
    let old = unsafe { &*old };
    let orig =
        tuple(&old.client_addr, &old.frontend_addr, old.client_port, old.frontend_port, key.proto);
    match lookup(&orig, now) {
        None => true,
        Some(c) => {
            // SAFETY: valid map value pointer; fields read in place (no 64-byte copy on the
            // stack).
            let c = unsafe { &*c };
            c.state == ct_state::CLOSED || c.snat_port != key.dport || c.snat_addr != key.daddr
        }
    }
}

#[inline(always)]
fn frag_key(p: &Ip6) -> Frag6Key {
    key40::<Frag6Key>(&p.saddr, &p.daddr, p.frag_id, p.proto)
}

/// Remembers the ports of a fragmented datagram from its first fragment, with the time.
#[inline(always)]
pub fn record_fragment(p: &Ip6) {
    // SAFETY: helper without arguments.
    let seen = frag::stamp(unsafe { bpf_ktime_get_ns() });
    let v = Frag6Value { sport: p.sport, dport: p.dport, seen };
    // LRU: a full table forgets the oldest datagram, whose later fragments then pass untouched.
    let _ = kp_frag6.insert(frag_key(p), v, 0);
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was seen less
/// than `frag::TIMEOUT_NS` ago (as [`crate::ct::fragment_ports`]).
#[inline(always)]
pub fn fragment_ports(p: &Ip6) -> Option<(u16, u16)> {
    // SAFETY: map values are only read by copy.
    let v = unsafe { kp_frag6.get(frag_key(p)) }.copied()?;
    // SAFETY: helper without arguments.
    if frag::expired(v.seen, unsafe { bpf_ktime_get_ns() }) {
        return None;
    }
    Some((v.sport, v.dport))
}
