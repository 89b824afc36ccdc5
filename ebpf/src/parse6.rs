//! IPv6 header parsing: the fixed header, the extension headers a service packet may carry
//! (hop-by-hop options, routing, destination options, fragment), TCP and UDP. Everything the
//! later stages need is copied into [`Ip6`], as [`crate::parse::Ip4`] does for IPv4.
use kproxy_common::{Addr6, Reason, proto};

use crate::{
    parse::Frag,
    pkt::{L3, Packet, ptr_at},
};

/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Length of the fixed IPv6 header.
pub const HDR: usize = 40;
/// Offset of the hop limit.
pub const HOP_LIMIT: usize = L3 + 7;
/// Offset of the source address.
pub const SADDR: usize = L3 + 8;
/// Offset of the destination address.
pub const DADDR: usize = L3 + 24;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
/// Extension headers followed before giving up (a packet with more is passed untouched).
const MAX_EXT: usize = 4;

/// A parsed IPv6 packet. Addresses and ports are as in the packet (be).
#[derive(Clone, Copy)]
pub struct Ip6 {
    /// Offset of the upper-layer (L4) header, after the extension headers.
    pub l4: usize,
    /// Upper-layer protocol (the last next-header value).
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// Fragment position (from the fragment header).
    pub frag: Frag,
    /// Payload length (host order): everything after the fixed header.
    pub payload_len: u16,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address, be words.
    pub saddr: Addr6,
    /// Destination address, be words.
    pub daddr: Addr6,
    /// Source port, be (0 without ports).
    pub sport: u16,
    /// Destination port, be (0 without ports).
    pub dport: u16,
    /// TCP sequence number, be.
    pub seq: u32,
    /// TCP acknowledgement number, be.
    pub ack: u32,
    /// TCP header length in bytes.
    pub tcp_hlen: u16,
    /// Identification of the fragment header, be (0 when not fragmented).
    pub frag_id: u32,
    /// The packet carries the L4 header (false for later fragments).
    pub has_l4: bool,
    /// Zero: the struct has no padding, so that copying it (into the scratch space for the
    /// connection program) never reads uninitialised stack, which 5.10's verifier refuses.
    /// Integers rather than `[u8; 7]`: a zeroed byte array compiles to a call of a byte-wise
    /// `memset` subprogram.
    pub _pad1: u8,
    /// Zero (see `_pad1`).
    pub _pad2: u16,
    /// Zero (see `_pad1`).
    pub _pad4: u32,
}
const _: () = assert!(core::mem::size_of::<Ip6>() == 72);

impl Ip6 {
    /// Length of the upper-layer data (L4 header and payload), bytes.
    #[inline(always)]
    pub fn l4_len(&self) -> usize {
        (L3 + HDR + self.payload_len as usize).saturating_sub(self.l4)
    }
}

#[repr(C)]
struct Ipv6Hdr {
    vtc: u8,
    _tc_flow: [u8; 3],
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    saddr: Addr6,
    daddr: Addr6,
}

/// The first 8 bytes of an extension header (the fragment header is exactly these).
#[repr(C)]
struct ExtHdr {
    next: u8,
    len: u8,
    frag_off: u16,
    id: u32,
}

#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
}

#[repr(C)]
struct UdpHdr {
    sport: u16,
    dport: u16,
    len: u16,
}

/// Whether the frame is IPv6 (by its ethertype).
#[inline(always)]
pub fn is_ipv6<P: Packet>(c: &P) -> bool {
    match ptr_at::<P, u16>(c, 12) {
        // SAFETY: bounds checked by ptr_at.
        Ok(t) => u16::from_be(unsafe { *t }) == ETH_P_IPV6,
        Err(_) => false,
    }
}

/// Follows the extension headers of a packet quoted by an ICMPv6 error: `next` is the quoted
/// fixed header's next-header value and `off` the offset after it. Returns the quoted upper
/// layer's offset and protocol, or `None` when the quote has more extension headers than kproxy
/// follows, is cut short, or is a later fragment (no ports to match on).
#[inline(always)]
pub fn quoted_l4<P: Packet>(c: &P, mut off: usize, mut next: u8) -> Option<(usize, u8)> {
    let mut i = 0;
    while i < MAX_EXT {
        if next != HOP_BY_HOP && next != ROUTING && next != DEST_OPTS && next != FRAGMENT {
            return Some((off, next));
        }
        if off > 0xffff {
            return None;
        }
        let h: *const ExtHdr = ptr_at(c, off).ok()?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        if next == FRAGMENT {
            if u16::from_be(h.frag_off) & 0xfff8 != 0 {
                return None;
            }
            off += 8;
        } else {
            off += (h.len as usize + 1) * 8;
        }
        next = h.next;
        i += 1;
    }
    let last = next;
    if last == HOP_BY_HOP || last == ROUTING || last == DEST_OPTS || last == FRAGMENT {
        return None;
    }
    Some((off, next))
}

/// Parses Ethernet + IPv6 + extension headers (+ TCP/UDP ports). `Ok(None)`: not IPv6. A packet
/// with more extension headers than kproxy follows comes back with the last one as `proto`
/// (and no L4 header), which the callers pass untouched.
#[inline(always)]
pub fn ipv6<P: Packet>(c: &mut P) -> Result<Option<Ip6>, Reason> {
    // Ethernet, the fixed header and the fixed TCP header: what nearly every packet needs.
    c.pull(L3 + HDR + 20);
    if !is_ipv6(c) {
        return Ok(None);
    }
    let ip: *const Ipv6Hdr = ptr_at(c, L3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vtc >> 4 != 6 {
        return Err(Reason::DropMalformed);
    }
    let payload_len = u16::from_be(ip.payload_len);
    if L3 + HDR + payload_len as usize > c.len() {
        return Err(Reason::DropMalformed);
    }
    let mut p = Ip6 {
        l4: L3 + HDR,
        proto: ip.next,
        tcp_flags: 0,
        frag: Frag::None,
        payload_len,
        hop_limit: ip.hop_limit,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        seq: 0,
        ack: 0,
        tcp_hlen: 0,
        frag_id: 0,
        has_l4: false,
        _pad1: 0,
        _pad2: 0,
        _pad4: 0,
    };
    let end = L3 + HDR + payload_len as usize;
    if p.proto == proto::TCP || p.proto == proto::UDP {
        // No extension headers (nearly every packet): the L4 header at a constant offset.
        l4_ports(c, &mut p, payload_len as usize)?;
        return Ok(Some(p));
    }
    let mut i = 0;
    while i < MAX_EXT {
        let next = p.proto;
        if next != HOP_BY_HOP && next != ROUTING && next != DEST_OPTS && next != FRAGMENT {
            break;
        }
        // Offsets stay below 64 KiB so the verifier can bound them.
        if p.l4 > 0xffff {
            return Err(Reason::DropMalformed);
        }
        c.pull(p.l4 + 8);
        let h: *const ExtHdr = ptr_at(c, p.l4)?;
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        p.proto = h.next;
        if next == FRAGMENT {
            let off = u16::from_be(h.frag_off);
            p.frag_id = h.id;
            p.frag = if off & 0xfff8 != 0 {
                Frag::Later
            } else if off & 1 != 0 {
                Frag::First
            } else {
                Frag::None // an atomic fragment: the whole datagram
            };
            p.l4 += 8;
        } else {
            p.l4 += (h.len as usize + 1) * 8;
        }
        i += 1;
    }
    let last = p.proto;
    if last == HOP_BY_HOP || last == ROUTING || last == DEST_OPTS || last == FRAGMENT {
        return Ok(Some(p));
    }
    if p.l4 > end {
        return Err(Reason::DropMalformed);
    }
    if p.frag == Frag::Later {
        return Ok(Some(p));
    }
    let l4_len = end - p.l4;
    if p.l4 > L3 + HDR {
        // Extension headers push the L4 header out of what was made readable above.
        c.pull(p.l4 + 20);
    }
    if p.l4 > 0xffff {
        return Err(Reason::DropMalformed);
    }
    if p.proto == proto::ICMPV6 {
        // Its checksum is kept right like the others' (ICMPv6 errors are translated).
        p.has_l4 = true;
        return Ok(Some(p));
    }
    l4_ports(c, &mut p, l4_len)?;
    Ok(Some(p))
}

/// Reads the TCP or UDP header at `p.l4` (`l4_len` bytes of upper-layer data) into `p`; other
/// protocols are left as they are.
#[inline(always)]
fn l4_ports<P: Packet>(c: &P, p: &mut Ip6, l4_len: usize) -> Result<(), Reason> {
    match p.proto {
        proto::TCP => {
            let t: *const TcpHdr = ptr_at(c, p.l4)?;
            // SAFETY: bounds checked by ptr_at.
            let t = unsafe { &*t };
            let thlen = ((t.doff >> 4) as usize) * 4;
            if thlen < 20 || (p.frag == Frag::None && thlen > l4_len) {
                return Err(Reason::DropMalformed);
            }
            p.sport = t.sport;
            p.dport = t.dport;
            p.seq = t.seq;
            p.ack = t.ack;
            p.tcp_flags = t.flags;
            p.tcp_hlen = thlen as u16;
            p.has_l4 = true;
        }
        proto::UDP => {
            let u: *const UdpHdr = ptr_at(c, p.l4)?;
            // SAFETY: bounds checked by ptr_at.
            let u = unsafe { &*u };
            let ulen = u16::from_be(u.len) as usize;
            if ulen < 8 || (p.frag == Frag::None && ulen > l4_len) {
                return Err(Reason::DropMalformed);
            }
            p.sport = u.sport;
            p.dport = u.dport;
            p.has_l4 = true;
        }
        _ => {}
    }
    Ok(())
}
