//! ICMPv6 errors (destination unreachable, packet too big, time exceeded, parameter problem)
//! about translated connections, as [`crate::icmp`] does for IPv4: the quoted packet and the
//! outer addresses are translated like the connection, so that a client sees "port
//! unreachable" or "packet too big" (path MTU discovery) from the frontend it talked to, and a
//! backend sees errors about its replies. Neighbour discovery, echo and every other ICMPv6
//! message are not errors and pass untouched.
//!
//! Checksums: the ICMPv6 checksum covers the outer pseudo-header and the whole quote, so every
//! outer address, quoted address and quoted port change updates it. The quoted TCP/UDP checksum
//! is left alone (receivers do not check it in quoted headers).
use kproxy_common::{Addr6, NodeConfig6, Reason, backend_flags, ct_flags, proto, rnat_flags};

use crate::{
    ct6, lb6,
    nat::To,
    nat6::Nat6,
    parse::Frag,
    parse6::{self, HDR, Ip6},
    pkt::{Packet, ptr_at},
    pkt6::Packet6,
};

const DEST_UNREACH: u8 = 1;
const PACKET_TOO_BIG: u8 = 2;
const TIME_EXCEEDED: u8 = 3;
const PARAMETER_PROBLEM: u8 = 4;

/// The packet quoted by an ICMPv6 error (IPv6, its extension headers followed as
/// [`parse6::ipv6`] follows them, TCP or UDP).
#[derive(Clone, Copy)]
pub struct Inner6 {
    /// Offset of the quoted IPv6 header.
    pub l3: usize,
    /// Offset of the quoted TCP or UDP header.
    pub l4: usize,
    /// Quoted source address, be words.
    pub saddr: Addr6,
    /// Quoted destination address, be words.
    pub daddr: Addr6,
    /// Quoted source port, be.
    pub sport: u16,
    /// Quoted destination port, be.
    pub dport: u16,
    /// Quoted protocol.
    pub proto: u8,
}

#[inline(always)]
fn error_type(typ: u8) -> bool {
    typ == DEST_UNREACH || typ == PACKET_TOO_BIG || typ == TIME_EXCEEDED || typ == PARAMETER_PROBLEM
}

/// Whether `p` is an ICMPv6 error, the kind kproxy translates when it quotes a translated
/// packet.
#[inline(always)]
pub fn is_error<P: Packet>(c: &P, p: &Ip6) -> bool {
    if p.proto != proto::ICMPV6 || p.frag != Frag::None {
        return false;
    }
    let Ok(h) = ptr_at::<P, [u8; 2]>(c, p.l4) else { return false };
    // SAFETY: bounds checked by ptr_at.
    error_type(unsafe { (*h)[0] })
}

#[repr(C)]
struct Quote {
    _vtc: [u8; 6],
    next: u8,
    _hop: u8,
    saddr: Addr6,
    daddr: Addr6,
}

#[repr(C)]
struct Ports {
    sport: u16,
    dport: u16,
}

/// The quoted packet of an ICMPv6 error, if `p` is one kproxy can translate.
#[inline(always)]
pub fn parse<P: Packet>(c: &P, p: &Ip6) -> Option<Inner6> {
    if !is_error(c, p) || p.l4 > 0xffff {
        return None;
    }
    let l3 = p.l4 + 8;
    let q: *const Quote = ptr_at(c, l3).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { &*q };
    if q._vtc[0] >> 4 != 6 {
        return None;
    }
    let (l4, next) = parse6::quoted_l4(c, l3 + HDR, q.next)?;
    if (next != proto::TCP && next != proto::UDP) || l4 > 0xffff {
        return None;
    }
    let ports: *const Ports = ptr_at(c, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    Some(Inner6 {
        l3,
        l4,
        saddr: q.saddr,
        daddr: q.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: next,
    })
}

/// How to translate an error: new outer addresses, new quoted addresses, destination.
pub struct Plan6 {
    /// Outer header (ports unused).
    pub outer: Nat6,
    /// Quoted header.
    pub inner: Nat6,
    /// Where the translated error goes.
    pub to: To,
    /// About a connection of a pod of this node whose error would cross the node's stack: left
    /// untouched for `kp_topod_icmp6` (IPv6 has no host routing), which translates it where it
    /// enters the pod, as the connection's replies (`rnat_flags::TO_POD`).
    pub to_pod: bool,
}

/// Finds the connection an error is about (see [`crate::icmp::plan`]).
#[inline(always)]
pub fn plan(
    p: &Ip6,
    i: &Inner6,
    cfg: &NodeConfig6,
    external: bool,
    from_pod: bool,
    now: u64,
) -> Option<Plan6> {
    // The quoted packet, seen from its receiver's side.
    let rev = ct6::tuple(&i.daddr, &i.saddr, i.dport, i.sport, i.proto);
    // About a packet the client sent (quoted: client/SNAT → backend); the error travels to
    // the client.
    if let Some(rn) = ct6::revnat(&rev) {
        let orig = ct6::tuple(
            &rn.client_addr,
            &rn.frontend_addr,
            rn.client_port,
            rn.frontend_port,
            i.proto,
        );
        // SAFETY: valid map value pointer.
        let fl = ct6::lookup(&orig, now).map(|c| unsafe { (*c).flags }).unwrap_or(0);
        let snat_set = cfg.snat_addr != [0; 4];
        let to = if from_pod && rn.client_addr == p.saddr {
            To::Bounce
        } else if (external && snat_set && p.daddr == cfg.snat_addr)
            || ((external || from_pod) && fl & ct_flags::REPLY_FIB != 0)
        {
            To::Fib
        } else {
            To::Stack
        };
        let to_pod =
            (external || from_pod) && to == To::Stack && rn.flags & rnat_flags::TO_POD != 0;
        return Some(Plan6 {
            outer: Nat6 {
                saddr: if p.saddr == i.daddr { rn.frontend_addr } else { p.saddr },
                sport: 0,
                daddr: rn.client_addr,
                dport: 0,
            },
            inner: Nat6 {
                saddr: rn.client_addr,
                sport: rn.client_port,
                daddr: rn.frontend_addr,
                dport: rn.frontend_port,
            },
            to,
            to_pod,
        });
    }
    // About a reply (quoted: frontend → client); the error travels to the backend.
    let ctp = ct6::lookup(&rev, now)?;
    // SAFETY: valid map value pointer, copied out.
    let e = unsafe { *ctp };
    let snat = e.flags & ct_flags::SNAT != 0;
    let to = if e.flags & ct_flags::HAIRPIN != 0 {
        To::Bounce
    } else if external
        && lb6::backend(e.backend_id).is_some_and(|b| b.flags & backend_flags::LOCAL == 0)
    {
        To::Fib
    } else {
        To::Stack
    };
    Some(Plan6 {
        outer: Nat6 {
            saddr: if snat && p.saddr == i.daddr { e.snat_addr } else { p.saddr },
            sport: 0,
            daddr: e.backend_addr,
            dport: 0,
        },
        inner: Nat6 {
            saddr: e.backend_addr,
            sport: e.backend_port,
            daddr: if snat { e.snat_addr } else { i.daddr },
            dport: if snat { e.snat_port } else { i.dport },
        },
        to,
        to_pod: false,
    })
}

/// Rewrites the quoted header to `n`, keeping the ICMPv6 checksum of `p` right.
#[inline(always)]
pub fn apply_inner<P: Packet6>(c: &mut P, p: &Ip6, i: &Inner6, n: &Nat6) -> Result<(), Reason> {
    if n.saddr != i.saddr {
        c.set_l4_addr(p, i.l3 + 8, &i.saddr, &n.saddr)?;
    }
    if n.daddr != i.daddr {
        c.set_l4_addr(p, i.l3 + 24, &i.daddr, &n.daddr)?;
    }
    if n.sport != i.sport {
        c.set_l4_word(p, i.l4, i.sport, n.sport)?;
    }
    if n.dport != i.dport {
        c.set_l4_word(p, i.l4 + 2, i.dport, n.dport)?;
    }
    Ok(())
}
