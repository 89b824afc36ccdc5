//! Ethernet/IPv4/TCP/UDP/ICMP frames for datapath tests: a builder that produces correct
//! frames (checksums included), a decoder, and a checksum verifier. The checksum code here is
//! written independently of the eBPF programs' (big-endian word sums over the whole header or
//! segment, RFC 1071), so a test that compares against it checks the programs' arithmetic.
use std::net::{Ipv4Addr, SocketAddrV4};

/// TCP FIN.
pub const FIN: u8 = 0x01;
/// TCP SYN.
pub const SYN: u8 = 0x02;
/// TCP RST.
pub const RST: u8 = 0x04;
/// TCP PSH.
pub const PSH: u8 = 0x08;
/// TCP ACK.
pub const ACK: u8 = 0x10;

/// The L4 part of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment.
    Tcp {
        /// Source port (host order).
        sport: u16,
        /// Destination port (host order).
        dport: u16,
        /// Sequence number.
        seq: u32,
        /// Acknowledgement number.
        ack: u32,
        /// Flags (`SYN`, `ACK`, ...).
        flags: u8,
        /// Window.
        window: u16,
        /// TCP options (length a multiple of 4).
        options: Vec<u8>,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A UDP datagram.
    Udp {
        /// Source port (host order).
        sport: u16,
        /// Destination port (host order).
        dport: u16,
        /// Payload.
        payload: Vec<u8>,
        /// Send with checksum 0 ("none").
        no_checksum: bool,
    },
    /// An ICMP message.
    Icmp {
        /// Type.
        typ: u8,
        /// Code.
        code: u8,
        /// Bytes 4..8 of the header.
        rest: [u8; 4],
        /// Payload.
        payload: Vec<u8>,
    },
}

/// An Ethernet + IPv4 frame description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Source MAC.
    pub smac: [u8; 6],
    /// Source address.
    pub saddr: Ipv4Addr,
    /// Destination address.
    pub daddr: Ipv4Addr,
    /// TTL.
    pub ttl: u8,
    /// Identification.
    pub id: u16,
    /// Flags + fragment offset word (host order; 0x4000 is DF).
    pub frag: u16,
    /// IP options (length a multiple of 4).
    pub ip_options: Vec<u8>,
    /// L4 content.
    pub l4: L4,
}

/// MAC used as the client / sender side by default.
pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// MAC used as the node / receiver side by default.
pub const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

impl Frame {
    fn new(src: SocketAddrV4, dst: SocketAddrV4, l4: L4) -> Self {
        Self {
            dmac: MAC_NODE,
            smac: MAC_CLIENT,
            saddr: *src.ip(),
            daddr: *dst.ip(),
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            ip_options: Vec::new(),
            l4,
        }
    }

    /// A TCP segment with `flags`, seq 1000, ack 0 (or 5000 with ACK), no payload.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
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
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
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

    /// Replaces the source address and port.
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.saddr = *src.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = src.port(),
            L4::Icmp { .. } => {}
        }
        self
    }

    /// Replaces the destination address and port.
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
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

    /// Replaces the TCP/UDP payload.
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
            L4::Icmp { .. } => 1,
        }
    }

    /// The L4 bytes with a correct checksum.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let csum_at = match &self.l4 {
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
                Some(16)
            }
            L4::Udp { sport, dport, payload, no_checksum } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                if *no_checksum { None } else { Some(6) }
            }
            L4::Icmp { typ, code, rest, payload } => {
                b.extend_from_slice(&[*typ, *code, 0, 0]);
                b.extend_from_slice(rest);
                b.extend_from_slice(payload);
                let c = checksum(&[&b]);
                b[2..4].copy_from_slice(&c.to_be_bytes());
                return b;
            }
        };
        if let Some(at) = csum_at {
            let mut c =
                checksum(&[&pseudo_header(self.saddr, self.daddr, self.proto(), b.len()), &b]);
            if c == 0 && self.proto() == 17 {
                c = 0xffff;
            }
            b[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        b
    }

    /// The complete frame.
    pub fn build(&self) -> Vec<u8> {
        assert_eq!(self.ip_options.len() % 4, 0);
        let l4 = self.l4_bytes();
        let hlen = 20 + self.ip_options.len();
        let mut f = Vec::with_capacity(14 + hlen + l4.len());
        f.extend_from_slice(&self.dmac);
        f.extend_from_slice(&self.smac);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x40 | (hlen / 4) as u8, 0];
        ip.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.saddr.octets());
        ip.extend_from_slice(&self.daddr.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// The IPv4 pseudo header of a TCP/UDP segment.
pub fn pseudo_header(saddr: Ipv4Addr, daddr: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&saddr.octets());
    p.extend_from_slice(&daddr.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksum of an Ethernet frame.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let hlen = ((frame[14] & 0x0f) as usize) * 4;
    let ip = &frame[14..14 + hlen];
    if checksum(&[ip]) != 0 {
        return Err(format!(
            "bad IPv4 header checksum {:#06x}",
            u16::from_be_bytes([ip[10], ip[11]])
        ));
    }
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4 = &frame[14 + hlen..14 + tot];
    let saddr = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let daddr = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let ok = match ip[9] {
        6 => checksum(&[&pseudo_header(saddr, daddr, 6, l4.len()), l4]) == 0,
        17 => {
            u16::from_be_bytes([l4[6], l4[7]]) == 0
                || checksum(&[&pseudo_header(saddr, daddr, 17, l4.len()), l4]) == 0
        }
        1 => checksum(&[l4]) == 0,
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("bad L4 checksum (protocol {})", ip[9])) }
}

/// Decodes a frame produced by [`Frame::build`] or by the datapath (no IP options on output).
pub fn decode(frame: &[u8]) -> Option<Frame> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let hlen = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if frame.len() < 14 + tot || tot < hlen {
        return None;
    }
    let l4b = &ip[hlen..tot];
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let l4 = match ip[9] {
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
        1 => L4::Icmp {
            typ: l4b[0],
            code: l4b[1],
            rest: l4b[4..8].try_into().ok()?,
            payload: l4b[8..].to_vec(),
        },
        _ => return None,
    };
    Some(Frame {
        dmac: frame[0..6].try_into().ok()?,
        smac: frame[6..12].try_into().ok()?,
        saddr: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        daddr: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        id: be16(ip, 4),
        frag: be16(ip, 6),
        ip_options: ip[20..hlen].to_vec(),
        l4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 -> sum 0xddf2, checksum 0x220d.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), 0x220d);
    }

    #[test]
    fn built_frames_verify_and_decode() {
        let a: SocketAddrV4 = "198.18.0.2:40000".parse().unwrap();
        let b: SocketAddrV4 = "198.19.0.1:80".parse().unwrap();
        for f in [Frame::tcp(a, b, SYN), Frame::udp(a, b, b"hello")] {
            let bytes = f.build();
            verify_checksums(&bytes).unwrap();
            assert_eq!(decode(&bytes).unwrap(), f);
            let mut broken = bytes.clone();
            *broken.last_mut().unwrap() ^= 1;
            assert!(verify_checksums(&broken).is_err());
        }
    }
}
