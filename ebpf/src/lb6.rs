//! IPv6 service and backend lookup and session affinity, as [`crate::lb`] does for IPv4.
use kproxy_common::{
    Addr6, Affinity6Key, Affinity6Value, Backend6, Reason, Service6Key, Service6Value, Tuple6,
    svc_flags,
};

use crate::maps6::{kp_aff6, kp_be6, kp_svc6};

/// The service entry (slot 0) of an IPv6 frontend.
#[inline(always)]
pub fn service(
    addr: &Addr6,
    port: u16,
    proto: u8,
    scope: u8,
) -> Option<(Service6Key, Service6Value)> {
    let key = Service6Key { addr: *addr, port, proto, scope, slot: 0, _pad: 0 };
    // SAFETY: map values are only read by copy.
    let v = unsafe { kp_svc6.get(key) }?;
    Some((key, *v))
}

/// An IPv6 backend by id.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend6> {
    // SAFETY: map values are only read by copy.
    unsafe { kp_be6.get(id) }.copied()
}

/// Flow hash of an IPv6 tuple: the addresses folded, then the IPv4 mixing.
#[inline(always)]
pub fn hash(t: &Tuple6) -> u32 {
    let s = t.saddr[0] ^ t.saddr[1].rotate_left(3) ^ t.saddr[2].rotate_left(7) ^ t.saddr[3];
    let d = t.daddr[0] ^ t.daddr[1].rotate_left(3) ^ t.daddr[2].rotate_left(7) ^ t.daddr[3];
    let mut h = s
        ^ d.rotate_left(11)
        ^ (((t.sport as u32) << 16) | t.dport as u32).rotate_left(5)
        ^ t.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Picks the backend of a new IPv6 connection: the client's affinity entry when it is still
/// valid, otherwise slot `1 + hash % count`. `count` must be non-zero.
#[inline(always)]
pub fn pick(
    key: &Service6Key,
    svc: &Service6Value,
    t: &Tuple6,
    now: u64,
) -> Result<(u32, Backend6), Reason> {
    let affinity = svc.flags & svc_flags::AFFINITY != 0 && svc.affinity_timeout != 0;
    let akey = Affinity6Key { client_addr: t.saddr, svc_id: svc.svc_id };
    if affinity && let Some(a) = kp_aff6.get_ptr_mut(akey) {
        // SAFETY: valid map value pointer; concurrent updates only race on the timestamp.
        let a = unsafe { &mut *a };
        let timeout = svc.affinity_timeout as u64 * 1_000_000_000;
        if now.saturating_sub(a.last_used_ns) < timeout
            && a.slot != 0
            && a.slot <= svc.count
            // SAFETY: map values are only read by copy.
            && unsafe { kp_svc6.get(Service6Key { slot: a.slot, ..*key }) }
                .is_some_and(|s| s.backend_id == a.backend_id)
            && let Some(be) = backend(a.backend_id)
        {
            a.last_used_ns = now;
            return Ok((a.backend_id, be));
        }
    }
    let slot = 1 + hash(t).checked_rem(svc.count as u32).unwrap_or(0) as u16;
    let skey = Service6Key { slot, ..*key };
    // SAFETY: map values are only read by copy.
    let id = unsafe { kp_svc6.get(skey) }.ok_or(Reason::DropBackendMissing)?.backend_id;
    let be = backend(id).ok_or(Reason::DropBackendMissing)?;
    if affinity {
        let v = Affinity6Value { backend_id: id, slot, _pad: 0, last_used_ns: now };
        // A full LRU map evicts; a failed insert only loses stickiness.
        let _ = kp_aff6.insert(akey, v, 0);
    }
    Ok((id, be))
}
