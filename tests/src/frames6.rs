//! Ethernet/IPv6 frames for datapath tests, the IPv6 twin of [`crate::frames`]: a builder with
//! extension headers (hop-by-hop, routing, destination options, fragment), a decoder and a
//! checksum verifier. The checksums use [`crate::frames::checksum`] over the RFC 8200 8.1
//! pseudo-header, code independent of the eBPF programs' incremental arithmetic.
use std::net::{Ipv6Addr, SocketAddrV6};

use crate::frames::{ACK, L4, MAC_CLIENT, MAC_NODE, checksum};

/// Next-header value of a hop-by-hop options header.
pub const HOP_BY_HOP: u8 = 0;
/// Next-header value of a routing header.
pub const ROUTING: u8 = 43;
/// Next-header value of a fragment header.
pub const FRAGMENT: u8 = 44;
/// Next-header value of a destination options header.
pub const DEST_OPTS: u8 = 60;
/// Next-header value of ICMPv6.
pub const ICMPV6: u8 = 58;

/// An IPv6 extension header: its type (next-header value that announces it) and its body after
/// the next-header byte (the length byte included for all but the fragment header; the body is
/// padded by [`Frame6::build`] to a multiple of 8 bytes with the next-header byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext {
    /// Next-header value of this header.
    pub kind: u8,
    /// The header's bytes after its next-header byte (7 bytes for a fragment header).
    pub body: Vec<u8>,
}

impl Ext {
    /// An options header (hop-by-hop or destination options) of 8 bytes with a PadN option.
    pub fn options(kind: u8) -> Self {
        Self { kind, body: vec![0, 1, 4, 0, 0, 0, 0] }
    }

    /// A fragment header at `offset` (units of 8 bytes) with the more-fragments flag `more`.
    pub fn fragment(offset: u16, more: bool, id: u32) -> Self {
        let off = (offset << 3) | more as u16;
        let mut body = vec![0];
        body.extend_from_slice(&off.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        Self { kind: FRAGMENT, body }
    }
}

/// An Ethernet + IPv6 frame description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame6 {
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Source MAC.
    pub smac: [u8; 6],
    /// Source address.
    pub saddr: Ipv6Addr,
    /// Destination address.
    pub daddr: Ipv6Addr,
    /// Hop limit.
    pub hop_limit: u8,
    /// Extension headers, in order.
    pub ext: Vec<Ext>,
    /// L4 content (`L4::Icmp` is ICMPv6 here).
    pub l4: L4,
}

impl Frame6 {
    fn new(src: SocketAddrV6, dst: SocketAddrV6, l4: L4) -> Self {
        Self {
            dmac: MAC_NODE,
            smac: MAC_CLIENT,
            saddr: *src.ip(),
            daddr: *dst.ip(),
            hop_limit: 64,
            ext: Vec::new(),
            l4,
        }
    }

    /// A TCP segment with `flags`, seq 1000, ack 0 (or 5000 with ACK), no payload.
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                seq: 1000,
                ack: if flags & ACK != 0 { 5000 } else { 0 },
                flags,
                window: 64240,
                options: Vec::new(),
                payload: Vec::new(),
            },
        )
    }

    /// A UDP datagram.
    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Self::new(
            src,
            dst,
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
                payload: payload.to_vec(),
                no_checksum: false,
            },
        )
    }

    /// An ICMPv6 message (`rest` is bytes 4..8 of its header).
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, typ: u8, code: u8, payload: &[u8]) -> Self {
        let a = SocketAddrV6::new(src, 0, 0, 0);
        let b = SocketAddrV6::new(dst, 0, 0, 0);
        Self::new(a, b, L4::Icmp { typ, code, rest: [0; 4], payload: payload.to_vec() })
    }

    /// Adds extension headers (before the L4 header, in order).
    pub fn with_ext(mut self, ext: Vec<Ext>) -> Self {
        self.ext = ext;
        self
    }

    /// Replaces the source address and port.
    pub fn with_src(mut self, src: SocketAddrV6) -> Self {
        self.saddr = *src.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = src.port(),
            L4::Icmp { .. } => {}
        }
        self
    }

    /// Replaces the destination address and port.
    pub fn with_dst(mut self, dst: SocketAddrV6) -> Self {
        self.daddr = *dst.ip();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = dst.port(),
            L4::Icmp { .. } => {}
        }
        self
    }

    /// Replaces the MAC addresses.
    pub fn with_macs(mut self, dmac: [u8; 6], smac: [u8; 6]) -> Self {
        self.dmac = dmac;
        self.smac = smac;
        self
    }

    /// Replaces the payload.
    pub fn with_payload(mut self, p: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } | L4::Icmp { payload, .. } => {
                *payload = p.to_vec()
            }
        }
        self
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } => ICMPV6,
        }
    }

    /// The L4 bytes with a correct checksum (pseudo-header of the final destination).
    pub fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let at = match &self.l4 {
            L4::Tcp { sport, dport, seq, ack, flags, window, options, payload } => {
                assert_eq!(options.len() % 4, 0);
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&ack.to_be_bytes());
                b.push((((20 + options.len()) / 4) as u8) << 4);
                b.push(*flags);
                b.extend_from_slice(&window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(options);
                b.extend_from_slice(payload);
                16
            }
            L4::Udp { sport, dport, payload, .. } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                6
            }
            L4::Icmp { typ, code, rest, payload } => {
                b.extend_from_slice(&[*typ, *code, 0, 0]);
                b.extend_from_slice(rest);
                b.extend_from_slice(payload);
                2
            }
        };
        let mut c = checksum(&[&pseudo_header(self.saddr, self.daddr, self.proto(), b.len()), &b]);
        if c == 0 && self.proto() == 17 {
            c = 0xffff;
        }
        b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// The complete frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut ext = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map(|n| n.kind).unwrap_or(self.proto());
            let mut h = vec![next];
            h.extend_from_slice(&e.body);
            if e.kind == FRAGMENT {
                assert_eq!(h.len(), 8);
            } else {
                assert_eq!(h.len() % 8, 0, "extension header length");
                h[1] = (h.len() / 8 - 1) as u8;
            }
            ext.extend_from_slice(&h);
        }
        let first = self.ext.first().map(|e| e.kind).unwrap_or(self.proto());
        let mut f = Vec::with_capacity(54 + ext.len() + l4.len());
        f.extend_from_slice(&self.dmac);
        f.extend_from_slice(&self.smac);
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        f.push(first);
        f.push(self.hop_limit);
        f.extend_from_slice(&self.saddr.octets());
        f.extend_from_slice(&self.daddr.octets());
        f.extend_from_slice(&ext);
        f.extend_from_slice(&l4);
        f
    }
}

/// The IPv6 pseudo-header of an upper-layer checksum (RFC 8200 8.1).
pub fn pseudo_header(saddr: Ipv6Addr, daddr: Ipv6Addr, next: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&saddr.octets());
    p.extend_from_slice(&daddr.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

/// The upper-layer protocol and its offset in `frame` (after the extension headers), with the
/// end of the packet.
fn upper(frame: &[u8]) -> Option<(u8, usize, usize)> {
    if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] || frame[14] >> 4 != 6 {
        return None;
    }
    let end = 54 + u16::from_be_bytes([frame[18], frame[19]]) as usize;
    if frame.len() < end {
        return None;
    }
    let mut next = frame[20];
    let mut off = 54;
    while matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS | FRAGMENT) {
        let h = frame.get(off..off + 8)?;
        let len = if next == FRAGMENT { 8 } else { (h[1] as usize + 1) * 8 };
        next = h[0];
        off += len;
    }
    (off <= end).then_some((next, off, end))
}

/// Checks the TCP/UDP/ICMPv6 checksum of an Ethernet + IPv6 frame (a first or only fragment
/// is checked over the bytes it carries, which is the whole datagram for unfragmented ones).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let (next, off, end) = upper(frame).ok_or("not an IPv6 frame")?;
    let l4 = &frame[off..end];
    let saddr = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38]).unwrap());
    let daddr = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap());
    let ok = match next {
        6 | 17 | ICMPV6 => checksum(&[&pseudo_header(saddr, daddr, next, l4.len()), l4]) == 0,
        _ => true,
    };
    if next == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return Err("UDP checksum 0 is not allowed in IPv6".into());
    }
    if ok { Ok(()) } else { Err(format!("bad L4 checksum (next header {next})")) }
}

/// Decodes a frame produced by [`Frame6::build`] or by the datapath.
pub fn decode(frame: &[u8]) -> Option<Frame6> {
    let (next, off, end) = upper(frame)?;
    let mut ext = Vec::new();
    let mut kind = frame[20];
    let mut at = 54;
    while at < off {
        let len = if kind == FRAGMENT { 8 } else { (frame[at + 1] as usize + 1) * 8 };
        let mut body = frame[at + 1..at + len].to_vec();
        if kind != FRAGMENT {
            body[0] = 0; // the length byte is recomputed by `build`
        }
        ext.push(Ext { kind, body });
        kind = frame[at];
        at += len;
    }
    let l4b = &frame[off..end];
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let l4 = match next {
        6 => {
            let doff = ((l4b[12] >> 4) as usize) * 4;
            L4::Tcp {
                sport: be16(l4b, 0),
                dport: be16(l4b, 2),
                seq: u32::from_be_bytes(l4b[4..8].try_into().ok()?),
                ack: u32::from_be_bytes(l4b[8..12].try_into().ok()?),
                flags: l4b[13],
                window: be16(l4b, 14),
                options: l4b[20..doff].to_vec(),
                payload: l4b[doff..].to_vec(),
            }
        }
        17 => L4::Udp {
            sport: be16(l4b, 0),
            dport: be16(l4b, 2),
            payload: l4b[8..].to_vec(),
            no_checksum: be16(l4b, 6) == 0,
        },
        ICMPV6 => L4::Icmp {
            typ: l4b[0],
            code: l4b[1],
            rest: l4b[4..8].try_into().ok()?,
            payload: l4b[8..].to_vec(),
        },
        _ => return None,
    };
    Some(Frame6 {
        dmac: frame[0..6].try_into().ok()?,
        smac: frame[6..12].try_into().ok()?,
        saddr: Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38]).ok()?),
        daddr: Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).ok()?),
        hop_limit: frame[21],
        ext,
        l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::SYN;

    #[test]
    fn built_frames_verify_and_decode() {
        let a: SocketAddrV6 = "[2001:2::2]:40000".parse().unwrap();
        let b: SocketAddrV6 = "[2001:2:1::1]:80".parse().unwrap();
        for f in [
            Frame6::tcp(a, b, SYN),
            Frame6::udp(a, b, b"hello"),
            Frame6::tcp(a, b, SYN)
                .with_ext(vec![Ext::options(HOP_BY_HOP), Ext::options(DEST_OPTS)]),
            Frame6::udp(a, b, b"x").with_ext(vec![Ext::fragment(0, false, 7)]),
        ] {
            let bytes = f.build();
            verify_checksums(&bytes).unwrap();
            assert_eq!(decode(&bytes).unwrap(), f);
            let mut broken = bytes.clone();
            *broken.last_mut().unwrap() ^= 1;
            assert!(verify_checksums(&broken).is_err());
        }
    }

    #[test]
    fn checksum_matches_a_known_packet() {
        // An ICMPv6 echo request ::1 -> ::1, id 0, seq 0, no data: the sum over the
        // pseudo-header (2 + len 8 + next 58) and the message (0x8000) is 0x8044, whose
        // complement is 0x7fbb (computed by hand).
        let f = Frame6::icmp(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 128, 0, b"");
        let b = f.l4_bytes();
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 0x7fbb);
    }
}
