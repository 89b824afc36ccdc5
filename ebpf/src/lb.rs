//! Service and backend lookup (two-level, Cilium style) and session affinity.
use kproxy_common::{
    Affinity4Key, Affinity4Value, Backend4, Reason, Service4Key, Service4Value, Tuple4, svc_flags,
};

use crate::maps::{kp_aff4, kp_be4, kp_svc4};

/// The service entry (slot 0) of a frontend.
#[inline(always)]
pub fn service(addr: u32, port: u16, proto: u8, scope: u8) -> Option<(Service4Key, Service4Value)> {
    let key = Service4Key { addr, port, proto, scope, slot: 0, _pad: 0 };
    // SAFETY: map values are only read by copy.
    let v = unsafe { kp_svc4.get(key) }?;
    Some((key, *v))
}

/// A backend by id.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend4> {
    // SAFETY: map values are only read by copy.
    unsafe { kp_be4.get(id) }.copied()
}

/// Flow hash: the same tuple always picks the same slot (so an XDP attempt that falls back to
/// TC, and a UDP flow re-balanced after its backend went away, are deterministic).
#[inline(always)]
pub fn hash(t: &Tuple4) -> u32 {
    let mut h = t.saddr
        ^ t.daddr.rotate_left(11)
        ^ (((t.sport as u32) << 16) | t.dport as u32).rotate_left(5)
        ^ t.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Picks the backend of a new connection: the client's affinity entry when it is still valid
/// (fresh, and its slot still names its backend), otherwise slot `1 + hash % count`. `count`
/// must be non-zero.
#[inline(always)]
pub fn pick(
    key: &Service4Key,
    svc: &Service4Value,
    t: &Tuple4,
    now: u64,
) -> Result<(u32, Backend4), Reason> {
    let affinity = svc.flags & svc_flags::AFFINITY != 0 && svc.affinity_timeout != 0;
    let akey = Affinity4Key { client_addr: t.saddr, svc_id: svc.svc_id };
    if affinity && let Some(a) = kp_aff4.get_ptr_mut(akey) {
        // SAFETY: valid map value pointer; concurrent updates only race on the timestamp.
        let a = unsafe { &mut *a };
        let timeout = svc.affinity_timeout as u64 * 1_000_000_000;
        if now.saturating_sub(a.last_used_ns) < timeout
            && a.slot != 0
            && a.slot <= svc.count
            // SAFETY: map values are only read by copy.
            && unsafe { kp_svc4.get(Service4Key { slot: a.slot, ..*key }) }
                .is_some_and(|s| s.backend_id == a.backend_id)
            && let Some(be) = backend(a.backend_id)
        {
            a.last_used_ns = now;
            return Ok((a.backend_id, be));
        }
    }
    let slot = 1 + hash(t).checked_rem(svc.count as u32).unwrap_or(0) as u16;
    let skey = Service4Key { slot, ..*key };
    // SAFETY: map values are only read by copy.
    let id = unsafe { kp_svc4.get(skey) }.ok_or(Reason::DropBackendMissing)?.backend_id;
    let be = backend(id).ok_or(Reason::DropBackendMissing)?;
    if affinity {
        let v = Affinity4Value { backend_id: id, slot, _pad: 0, last_used_ns: now };
        // A full LRU map evicts; a failed insert only loses stickiness.
        let _ = kp_aff4.insert(akey, v, 0);
    }
    Ok((id, be))
}
