//! Service guards: what keeps service addresses as closed as kube-proxy keeps them.
//!
//! - Source ranges (`loadBalancerSourceRanges`): a frontend flagged `SOURCE_RANGES` accepts new
//!   connections only from the networks `kp_srcrng4` holds for its service id (an LPM trie
//!   keyed by service id and client address).
//! - Closed service addresses: a ClusterIP, LoadBalancer or external IP (`kp_svcaddr4`, with the
//!   hint bitmap `kp_svcaddrbits` for the fast path) on a port without frontend is rejected,
//!   not passed to the node's stack.
//! - Service CIDRs (`kp_svccidr4`): an address inside them that no service holds is dropped.
//!
//! IPv6 has the same three guards in its own maps (`kp_srcrng6`, `kp_svcaddr6`,
//! `kp_svccidr6`); the hint bitmap is shared, IPv6 addresses folded as in the frontend hints.
use aya_ebpf::btf_maps::lpm_trie::Key;
use kproxy_common::{Addr6, SERVICE_CIDRS_MAX, SrcRange4, SrcRange6, hints};

use crate::{
    maps::{kp_srcrng4, kp_svcaddr4, kp_svcaddrbits, kp_svccidr4},
    maps6::{kp_srcrng6, kp_svcaddr6, kp_svccidr6},
};

/// Whether `client` (be) may open a connection to a frontend of service `svc_id` that has
/// source ranges.
#[inline(always)]
pub fn source_allowed(svc_id: u32, client: u32) -> bool {
    let key = Key::new(64, SrcRange4 { svc_id, addr: client });
    kp_srcrng4.get(&key).is_some()
}

/// Whether `addr` (be) may be a closed service address (hint bitmap: no false negatives).
#[inline(always)]
pub fn maybe_closed(addr: u32) -> bool {
    let bit = hints::addr_bit(addr);
    kp_svcaddrbits.get(bit >> 6).is_some_and(|w| *w & (1u64 << (bit & 63)) != 0)
}

/// Whether `addr` (be) is a closed service address.
#[inline(always)]
pub fn closed(addr: u32) -> bool {
    // SAFETY: map values are only read by copy.
    unsafe { kp_svcaddr4.get(addr) }.is_some()
}

/// Whether `addr` (be) is inside one of the service CIDRs.
#[inline(always)]
pub fn in_service_cidr(addr: u32) -> bool {
    let Some(c) = kp_svccidr4.get(0) else { return false };
    let mut i = 0;
    while i < SERVICE_CIDRS_MAX {
        if i as u32 >= c.count {
            return false;
        }
        let n = &c.nets[i];
        if addr & n.mask == n.addr {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether IPv6 `client` (be words) may open a connection to a frontend of service `svc_id`
/// that has source ranges.
#[inline(always)]
pub fn source_allowed6(svc_id: u32, client: &Addr6) -> bool {
    let key = Key::new(160, SrcRange6 { svc_id, addr: *client });
    kp_srcrng6.get(&key).is_some()
}

/// Whether IPv6 `addr` (be words) may be a closed service address (the shared hint bitmap).
#[inline(always)]
pub fn maybe_closed6(addr: &Addr6) -> bool {
    maybe_closed(hints::fold6(addr))
}

/// Whether IPv6 `addr` (be words) is a closed service address.
#[inline(always)]
pub fn closed6(addr: &Addr6) -> bool {
    // SAFETY: map values are only read by copy.
    unsafe { kp_svcaddr6.get(addr) }.is_some()
}

/// Whether IPv6 `addr` (be words) is inside one of the IPv6 service CIDRs.
#[inline(always)]
pub fn in_service_cidr6(addr: &Addr6) -> bool {
    let Some(c) = kp_svccidr6.get(0) else { return false };
    let mut i = 0;
    while i < SERVICE_CIDRS_MAX {
        if i as u32 >= c.count {
            return false;
        }
        let n = &c.nets[i];
        if addr[0] & n.mask[0] == n.addr[0]
            && addr[1] & n.mask[1] == n.addr[1]
            && addr[2] & n.mask[2] == n.addr[2]
            && addr[3] & n.mask[3] == n.addr[3]
        {
            return true;
        }
        i += 1;
    }
    false
}
