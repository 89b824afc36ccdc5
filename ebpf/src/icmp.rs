//! ICMP errors (destination unreachable, time exceeded, parameter problem) about translated
//! connections: the quoted packet and the outer addresses are translated like the connection,
//! so that a client sees "port unreachable" or "fragmentation needed" from the frontend it
//! talked to, and a backend sees errors about its replies.
//!
//! Checksums: each inner address change is paired with its inner IP header checksum, which
//! leaves the ICMP checksum unchanged; inner port changes update the ICMP checksum. The inner
//! TCP/UDP checksum is left alone (receivers do not check it in quoted headers).
use kproxy_common::{NodeConfig, Reason, backend_flags, cfg_flags, ct_flags, proto, rnat_flags};

use crate::{
    ct,
    nat::{Nat, To},
    parse::{Frag, Ip4},
    pkt::{Packet, ptr_at},
};

const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;

/// The packet quoted by an ICMP error (IPv4 without options, TCP or UDP).
#[derive(Clone, Copy)]
pub struct Inner {
    /// Offset of the quoted IPv4 header.
    pub l3: usize,
    /// Offset of the ICMP header.
    pub icmp: usize,
    /// Quoted source address, be.
    pub saddr: u32,
    /// Quoted destination address, be.
    pub daddr: u32,
    /// Quoted source port, be.
    pub sport: u16,
    /// Quoted destination port, be.
    pub dport: u16,
    /// Quoted protocol.
    pub proto: u8,
}

/// Whether `p` is an ICMP error (destination unreachable, time exceeded, parameter problem),
/// the kind kproxy translates when it quotes a translated packet.
#[inline(always)]
pub fn is_error<P: Packet>(c: &P, p: &Ip4) -> bool {
    if p.proto != proto::ICMP || p.frag != Frag::None {
        return false;
    }
    // Type and code: a one-byte bounds check would compile to a `>=` the verifier cannot use.
    let Ok(h) = ptr_at::<P, [u8; 2]>(c, p.l4) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let typ = unsafe { (*h)[0] };
    typ == DEST_UNREACH || typ == TIME_EXCEEDED || typ == PARAMETER_PROBLEM
}

/// The quoted packet of an ICMP error, if `p` is one kproxy can translate.
#[inline(always)]
pub fn parse<P: Packet>(c: &P, p: &Ip4) -> Option<Inner> {
    if p.proto != proto::ICMP || p.frag != Frag::None {
        return None;
    }
    let h: *const [u8; 8] = ptr_at(c, p.l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let typ = unsafe { (*h)[0] };
    if typ != DEST_UNREACH && typ != TIME_EXCEEDED && typ != PARAMETER_PROBLEM {
        return None;
    }
    let l3 = p.l4 + 8;
    let ip: *const [u8; 20] = ptr_at(c, l3).ok()?;
    let ports: *const [u16; 2] = ptr_at(c, l3 + 20).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let (ip, ports) = unsafe { (&*ip, &*ports) };
    let inner_proto = ip[9];
    if ip[0] != 0x45 || (inner_proto != proto::TCP && inner_proto != proto::UDP) {
        return None;
    }
    Some(Inner {
        l3,
        icmp: p.l4,
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: ports[0],
        dport: ports[1],
        proto: inner_proto,
    })
}

/// How to translate an error: new outer addresses, new quoted addresses, destination.
pub struct Plan {
    /// Outer header (ports unused).
    pub outer: Nat,
    /// Quoted header.
    pub inner: Nat,
    /// Where the translated error goes.
    pub to: To,
    /// About a connection of a pod of this node whose error would cross the node's stack: left
    /// untouched for `kp_topod_icmp`, which translates it where it enters the pod, as the
    /// connection's replies (`rnat_flags::TO_POD`).
    pub to_pod: bool,
}

/// Finds the connection an error is about. `external`: the hook is on an external device;
/// `from_pod`: the hook is a pod's TC ingress.
#[inline(always)]
pub fn plan(
    p: &Ip4,
    i: &Inner,
    cfg: &NodeConfig,
    external: bool,
    from_pod: bool,
    now: u64,
) -> Option<Plan> {
    // The quoted packet, seen from its receiver's side.
    let rev = ct::tuple(i.daddr, i.saddr, i.dport, i.sport, i.proto);
    // About a packet the client sent (quoted: client/SNAT → backend); the error travels to
    // the client.
    if let Some(rn) = ct::revnat(&rev) {
        let orig =
            ct::tuple(rn.client_addr, rn.frontend_addr, rn.client_port, rn.frontend_port, i.proto);
        // SAFETY: valid map value pointer.
        let fl = ct::lookup(&orig, now).map(|c| unsafe { (*c).flags }).unwrap_or(0);
        let to = if from_pod && rn.client_addr == p.saddr {
            To::Bounce
        } else if (external && cfg.snat_addr != 0 && p.daddr == cfg.snat_addr)
            || ((external || from_pod) && fl & ct_flags::REPLY_FIB != 0)
        {
            // To an external client through the node's SNAT address, or a restored node
            // address as source (see `ct_flags::REPLY_FIB`).
            To::Fib
        } else {
            To::Stack
        };
        let to_pod = (external || from_pod)
            && to == To::Stack
            && rn.flags & rnat_flags::TO_POD != 0
            && cfg.flags & cfg_flags::HOST_ROUTING == 0;
        return Some(Plan {
            outer: Nat {
                saddr: if p.saddr == i.daddr { rn.frontend_addr } else { p.saddr },
                sport: 0,
                daddr: rn.client_addr,
                dport: 0,
            },
            inner: Nat {
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
    let ctp = ct::lookup(&rev, now)?;
    // SAFETY: valid map value pointer, copied out.
    let e = unsafe { *ctp };
    let snat = e.flags & ct_flags::SNAT != 0;
    let to = if e.flags & ct_flags::HAIRPIN != 0 {
        To::Bounce
    } else if external
        && crate::lb::backend(e.backend_id).is_some_and(|b| b.flags & backend_flags::LOCAL == 0)
    {
        To::Fib
    } else {
        To::Stack
    };
    Some(Plan {
        outer: Nat {
            saddr: if snat && p.saddr == i.daddr { e.snat_addr } else { p.saddr },
            sport: 0,
            daddr: e.backend_addr,
            dport: 0,
        },
        inner: Nat {
            saddr: e.backend_addr,
            sport: e.backend_port,
            daddr: if snat { e.snat_addr } else { i.daddr },
            dport: if snat { e.snat_port } else { i.dport },
        },
        to,
        to_pod: false,
    })
}

/// Rewrites the quoted header to `n`.
#[inline(always)]
pub fn apply_inner<P: Packet>(c: &mut P, i: &Inner, n: &Nat) -> Result<(), Reason> {
    // Offsets inside the quoted IP header, and inside ICMP header + quote.
    if n.saddr != i.saddr {
        c.set_word::<20, _>(i.l3, 12, 10, i.saddr, n.saddr)?;
    }
    if n.daddr != i.daddr {
        c.set_word::<20, _>(i.l3, 16, 10, i.daddr, n.daddr)?;
    }
    if n.sport != i.sport {
        c.set_word::<32, _>(i.icmp, 28, 2, i.sport, n.sport)?;
    }
    if n.dport != i.dport {
        c.set_word::<32, _>(i.icmp, 30, 2, i.dport, n.dport)?;
    }
    Ok(())
}
