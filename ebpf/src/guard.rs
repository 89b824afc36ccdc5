//! Service guards: what keeps service addresses as closed as kube-proxy keeps them.
//!
//! - Source ranges (`loadBalancerSourceRanges`): a frontend flagged `SOURCE_RANGES` accepts new
//!   connections only from the networks `kp_srcrng4` holds for its service id (an LPM trie
//!   keyed by service id and client address).
//! - Closed service addresses: a ClusterIP, LoadBalancer or external IP (`kp_svcaddr4`, with the
//!   hint bitmap `kp_svcaddrbits` for the fast path) on a port without frontend is rejected,
//!   not passed to the node's stack.
//! - Service CIDRs (`kp_svccidr4`): an address inside them that no service holds is dropped.
use aya_ebpf::btf_maps::lpm_trie::Key;
use kproxy_common::{SERVICE_CIDRS_MAX, SrcRange4, hints};

use crate::maps::{kp_srcrng4, kp_svcaddr4, kp_svcaddrbits, kp_svccidr4};

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
