//! Header parsing: Ethernet, IPv4 (with options), TCP and UDP. Everything the later stages need
//! is copied into [`Ip4`] so that no packet pointer outlives a helper call that may move data.
use kproxy_common::{Reason, proto};

use crate::pkt::{L3, Packet, ptr_at};

pub const ETH_P_IP: u16 = 0x0800;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Fragment position of a datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// First fragment (has the L4 header).
    First,
    /// Later fragment (no L4 header).
    Later,
}

/// A parsed IPv4 packet. Addresses and ports are as in the packet (be).
#[derive(Clone, Copy)]
pub struct Ip4 {
    /// Offset of the L4 header.
    pub l4: usize,
    /// IP protocol.
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// Fragment position.
    pub frag: Frag,
    /// IHL in 32-bit words.
    pub ihl: u8,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// TTL.
    pub ttl: u8,
    /// Source address, be.
    pub saddr: u32,
    /// Destination address, be.
    pub daddr: u32,
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
    /// IP identification, be.
    pub id: u16,
    /// The packet carries the L4 header (false for later fragments).
    pub has_l4: bool,
}

#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    _window: u16,
    _check: u16,
    _urg: u16,
}

#[repr(C)]
struct UdpHdr {
    sport: u16,
    dport: u16,
    len: u16,
    _check: u16,
}

/// Parses Ethernet + IPv4 (+ TCP/UDP ports). `Ok(None)`: not IPv4 (passed untouched).
#[inline(always)]
pub fn ipv4<P: Packet>(c: &mut P) -> Result<Option<Ip4>, Reason> {
    // Ethernet, IPv4 without options and the fixed TCP header: what nearly every packet needs.
    c.pull(L3 + 20 + 20);
    let ethertype: *const u16 = ptr_at(c, 12)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { *ethertype }) != ETH_P_IP {
        return Ok(None);
    }
    let ip: *const Ipv4Hdr = ptr_at(c, L3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ip.vihl & 0x0f;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(Reason::DropMalformed);
    }
    let hlen = (ihl as usize) * 4;
    let tot_len = u16::from_be(ip.tot_len);
    if (tot_len as usize) < hlen || L3 + tot_len as usize > c.len() {
        return Err(Reason::DropMalformed);
    }
    let frag_off = u16::from_be(ip.frag_off);
    let frag = if frag_off & 0x1fff != 0 {
        Frag::Later
    } else if frag_off & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let mut p = Ip4 {
        l4: L3 + hlen,
        proto: ip.proto,
        tcp_flags: 0,
        frag,
        ihl,
        tot_len,
        ttl: ip.ttl,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        seq: 0,
        ack: 0,
        tcp_hlen: 0,
        id: ip.id,
        has_l4: false,
    };
    if frag == Frag::Later {
        return Ok(Some(p));
    }
    let l4_len = tot_len as usize - hlen;
    if hlen > 20 {
        // IP options push the L4 header out of what was made readable above.
        c.pull(p.l4 + 20);
    }
    match p.proto {
        proto::TCP => {
            let t: *const TcpHdr = ptr_at(c, p.l4)?;
            // SAFETY: bounds checked by ptr_at.
            let t = unsafe { &*t };
            let thlen = ((t.doff >> 4) as usize) * 4;
            if thlen < 20 || (frag == Frag::None && thlen > l4_len) {
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
            if ulen < 8 || (frag == Frag::None && ulen > l4_len) {
                return Err(Reason::DropMalformed);
            }
            p.sport = u.sport;
            p.dport = u.dport;
            p.has_l4 = true;
        }
        _ => {}
    }
    Ok(Some(p))
}
