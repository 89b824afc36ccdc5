//! IPv6 packet rewriting: address/port translation, forwarding through the FIB, and the
//! rejection frames (TCP RST, ICMPv6 port unreachable), as [`crate::nat`] does for IPv4. The
//! verdicts, route results and destinations are [`crate::nat`]'s.
use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
};
use kproxy_common::{Addr6, Reason, proto, timeouts};

use crate::{
    csum, maps6,
    nat::{self, Fib, Verdict},
    parse::tcp_flags,
    parse6::{DADDR, ETH_P_IPV6, HDR, Ip6, SADDR},
    pkt::{L3, MacWords, Packet, ptr_at},
    pkt6::Packet6,
};

const AF_INET6: u8 = 10;
/// ICMPv6 destination unreachable.
pub const DEST_UNREACH: u8 = 1;
/// ICMPv6 code: port unreachable.
const PORT_UNREACH: u8 = 4;

/// New addresses and ports (be) for an IPv6 packet, in the order they follow each other in a
/// TCP or UDP packet without extension headers (TC stores them in one go from here).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Nat6 {
    /// Source address.
    pub saddr: Addr6,
    /// Destination address.
    pub daddr: Addr6,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<Nat6>() == 36);

/// Rewrites `p` to `n`, touching only the fields that change; `whole`: in one go where the
/// packet type makes that cheaper ([`Packet6::set_tuple6`]; the fast path and the connection
/// programs; the slow path's stack has no room left for it).
#[inline(always)]
pub fn apply<P: Packet6>(c: &mut P, p: &Ip6, n: &Nat6, whole: bool) -> Result<(), Reason> {
    if whole && c.set_tuple6(p, n)? {
        return Ok(());
    }
    if n.daddr != p.daddr {
        c.set_addr6(p, DADDR, &p.daddr, &n.daddr)?;
    }
    if n.saddr != p.saddr {
        c.set_addr6(p, SADDR, &p.saddr, &n.saddr)?;
    }
    if !p.has_l4 || p.proto == proto::ICMPV6 {
        // A later fragment: the ports live in the first one. ICMPv6 has none.
        return Ok(());
    }
    if n.dport != p.dport {
        c.set_l4_word(p, p.l4 + 2, p.dport, n.dport)?;
    }
    if n.sport != p.sport {
        c.set_l4_word(p, p.l4, p.sport, n.sport)?;
    }
    Ok(())
}

/// One route XDP or TC looked up for IPv6, per CPU ([`crate::maps6::kp_route6`], slot by
/// destination), as [`crate::nat::Route4`]: for a packet from `ifindex_in` carrying
/// `saddr → daddr` with at most `max_len` bytes of payload (the forwarding check passed for that
/// length), out of `ifindex_out` with these MACs, until `stamp + timeouts::ROUTE_CACHE_NS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route6 {
    /// Source address, be words.
    pub saddr: Addr6,
    /// Destination address, be words.
    pub daddr: Addr6,
    /// Device the packet arrived on.
    pub ifindex_in: u32,
    /// Egress device.
    pub ifindex_out: u32,
    /// Next hop's MAC.
    pub dmac: MacWords,
    /// Egress device's MAC.
    pub smac: MacWords,
    /// Longest IPv6 payload the entry admits (see [`route`]).
    pub max_len: u16,
    /// Zero.
    pub _pad: u16,
    /// Clock of the lookup (the caller's `now`).
    pub stamp: u64,
}
const _: () = assert!(core::mem::size_of::<Route6>() == 64);

/// Zeroes the route lookup parameters in place with sixteen volatile 32-bit stores (a zeroed
/// value assigned compiles to a byte-wise `memset` loop; the parameters are 4-byte aligned).
#[inline(always)]
fn zero_fib(f: &mut FibParams) {
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    let w = f as *mut FibParams as *mut u32;
    let mut i = 0;
    while i < 16 {
        // SAFETY: sixteen aligned, in-bounds stores over the 64 bytes; all-zero bytes are a
        // valid FibParams (plain integers and unions of them).
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
        i += 1;
    }
}

/// Looks up the route of a packet that will carry `saddr → daddr`; the result (egress device,
/// MACs) is left in `f`. A successful lookup is reused for the same addresses and ingress
/// device for [`timeouts::ROUTE_CACHE_NS`] by packets whose payload is no longer than it
/// admits (a per-CPU cache shared by XDP and TC, as IPv4's [`crate::nat::route`], whose rules it
/// follows: an IPv6 `bpf_fib_lookup` is the largest cost of a forwarded packet). XDP's entry
/// admits the payload it was made for; TC passes no length, so its entry admits what the
/// egress device's MTU (returned from Linux 5.12) leaves after the IPv6 header, or the packet's
/// own payload where that is more, and a GSO super-packet takes a cached route without the
/// length check.
#[inline(always)]
pub fn route<P: Packet>(
    c: &mut P,
    p: &Ip6,
    saddr: &Addr6,
    daddr: &Addr6,
    f: &mut FibParams,
    now: u64,
) -> Fib {
    if p.hop_limit <= 1 {
        return Fib::Failed;
    }
    let ifindex = c.ifindex();
    let gso = c.gso();
    let cached = maps6::route_slot(daddr);
    if let Some(e) = cached {
        // SAFETY: valid per-CPU map value pointer; only this CPU's program uses it.
        let e = unsafe { &*e };
        if e.daddr == *daddr
            && e.saddr == *saddr
            && e.ifindex_in == ifindex
            && (gso || p.payload_len <= e.max_len)
            && now.saturating_sub(e.stamp) < timeouts::ROUTE_CACHE_NS
        {
            f.ifindex = e.ifindex_out;
            nat::set_fib_macs(f, &e.dmac, &e.smac);
            return Fib::Resolved;
        }
    }
    zero_fib(f);
    f.family = AF_INET6;
    f.l4_protocol = p.proto;
    f.sport = p.sport;
    f.dport = p.dport;
    // TC: no length (GSO skbs; see `nat::route`). XDP frames are real frames.
    f.__bindgen_anon_1.tot_len = if P::XDP { HDR as u16 + p.payload_len } else { 0 };
    f.ifindex = ifindex;
    f.__bindgen_anon_3.ipv6_src = *saddr;
    f.__bindgen_anon_4.ipv6_dst = *daddr;
    let r = c.fib_lookup(f);
    if r == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if let Some(e) = cached {
            // SAFETY: plain integers; TC: the egress device's MTU the kernel wrote back (0
            // before Linux 5.12), which holds the IPv6 header.
            let mtu = if P::XDP { 0 } else { unsafe { f.__bindgen_anon_1.mtu_result } };
            let room = mtu.saturating_sub(HDR as u16);
            let (dmac, smac) = nat::fib_macs(f);
            // SAFETY: valid per-CPU map value pointer; only this CPU's program uses it.
            unsafe {
                *e = Route6 {
                    saddr: *saddr,
                    daddr: *daddr,
                    ifindex_in: ifindex,
                    ifindex_out: f.ifindex,
                    dmac,
                    smac,
                    max_len: if gso { room } else { room.max(p.payload_len) },
                    _pad: 0,
                    stamp: now,
                }
            };
        }
        Fib::Resolved
    } else if r == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Fib::NoNeigh
    } else {
        Fib::Failed
    }
}

/// Forwards an already translated packet along the route `f`: hop limit, Ethernet addresses,
/// verdict.
#[inline(always)]
pub fn forward<P: Packet6>(c: &mut P, p: &Ip6, f: &FibParams, fib: Fib) -> Result<Verdict, Reason> {
    c.set_hop_limit(p.hop_limit - 1)?;
    if fib != Fib::Resolved {
        return Ok(Verdict::redirect_neigh(f.ifindex));
    }
    let (dmac, smac) = nat::fib_macs(f);
    c.set_macs(&dmac, &smac)?;
    if P::XDP && f.ifindex == c.ifindex() {
        Ok(Verdict::TX)
    } else {
        Ok(Verdict::redirect(f.ifindex))
    }
}

#[inline(always)]
fn eth_reply(c: &impl Packet, b: &mut [u8]) -> Result<(), Reason> {
    let e: *const [u8; 12] = ptr_at(c, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { &*e };
    b[0..6].copy_from_slice(&e[6..12]);
    b[6..12].copy_from_slice(&e[0..6]);
    b[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    Ok(())
}

#[inline(always)]
fn put_addr(b: &mut [u8], a: &Addr6) {
    let mut i = 0;
    while i < 4 {
        b[i * 4..i * 4 + 4].copy_from_slice(&a[i].to_ne_bytes());
        i += 1;
    }
}

/// Writes a fixed IPv6 header (hop limit 64) at `L3`.
#[inline(always)]
fn ip_header(b: &mut [u8], payload_len: u16, next: u8, saddr: &Addr6, daddr: &Addr6) {
    b[L3] = 0x60;
    b[L3 + 4..L3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    b[L3 + 6] = next;
    b[L3 + 7] = 64;
    put_addr(&mut b[L3 + 8..L3 + 24], saddr);
    put_addr(&mut b[L3 + 24..L3 + 40], daddr);
}

/// The pseudo-header sum of an IPv6 upper-layer checksum (RFC 8200 8.1).
#[inline(always)]
pub fn pseudo_sum(saddr: &Addr6, daddr: &Addr6, next: u8, len: u32) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < 4 {
        s += (saddr[i] & 0xffff) as u64 + (saddr[i] >> 16) as u64;
        s += (daddr[i] & 0xffff) as u64 + (daddr[i] >> 16) as u64;
        i += 1;
    }
    let mut tail = [0u8; 8];
    tail[0..4].copy_from_slice(&len.to_be_bytes());
    tail[7] = next;
    csum::add(&tail, s)
}

/// Replaces a TCP segment by the RST the frontend would send (RFC 9293 3.10.7.1): from the
/// frontend address to the client, sent back where the segment came from.
#[inline(always)]
pub fn tcp_reset<P: Packet>(c: &mut P, p: &Ip6) -> Result<Verdict, Reason> {
    if !p.has_l4 {
        // A later fragment has no TCP header to answer: dropped (the reason is still counted).
        return Ok(Verdict::DROP);
    }
    let b = &mut maps6::scratch()?.frame;
    *b = [0; maps6::SCRATCH];
    eth_reply(c, b)?;
    ip_header(b, 20, proto::TCP, &p.daddr, &p.saddr);
    let t = L3 + HDR;
    b[t..t + 2].copy_from_slice(&p.dport.to_ne_bytes());
    b[t + 2..t + 4].copy_from_slice(&p.sport.to_ne_bytes());
    if p.tcp_flags & tcp_flags::ACK != 0 {
        b[t + 4..t + 8].copy_from_slice(&p.ack.to_ne_bytes());
        b[t + 13] = tcp_flags::RST;
    } else {
        let payload = (p.l4_len() as u32).saturating_sub(p.tcp_hlen as u32);
        let mut ack = u32::from_be(p.seq).wrapping_add(payload);
        if p.tcp_flags & tcp_flags::SYN != 0 {
            ack = ack.wrapping_add(1);
        }
        if p.tcp_flags & tcp_flags::FIN != 0 {
            ack = ack.wrapping_add(1);
        }
        b[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        b[t + 13] = tcp_flags::RST | tcp_flags::ACK;
    }
    b[t + 12] = 0x50;
    let pseudo = pseudo_sum(&p.daddr, &p.saddr, proto::TCP, 20);
    let cs = !csum::fold(csum::add(&b[t..t + 20], pseudo));
    b[t + 16..t + 18].copy_from_slice(&cs.to_ne_bytes());
    // Extension headers go first, so that the segment's TCP header, where its checksum
    // offload (if any) points, lies where the RST's is built.
    c.strip_l3_ext(p.l4.saturating_sub(L3 + HDR) as u32)?;
    let v = emit_prefix::<P, { L3 + HDR + 20 }>(c, b)?;
    c.settle_l4_csum(t + 16, csum::fold(pseudo))?;
    Ok(v)
}

/// Replaces the frame by the first `N` bytes of the scratch buffer `b`, sent back where it came
/// from.
#[inline(always)]
fn emit_prefix<P: Packet, const N: usize>(
    c: &mut P,
    b: &[u8; maps6::SCRATCH],
) -> Result<Verdict, Reason> {
    const { assert!(N <= maps6::SCRATCH) };
    // SAFETY: N bytes of the buffer, which has SCRATCH >= N.
    let frame = unsafe { &*(b.as_ptr() as *const [u8; N]) };
    c.emit(frame)?;
    Ok(Verdict::TX)
}

/// Bytes of the rejected datagram an ICMPv6 port unreachable quotes: its IPv6 and UDP headers,
/// what the client's stack needs to find the socket (RFC 4443 allows up to 1280 bytes; a fixed
/// length keeps the frame a constant for the verifier).
const QUOTE: usize = HDR + 8;

/// Replaces a UDP datagram by an ICMPv6 port unreachable from the frontend address to the
/// client (RFC 4443 3.1), quoting the datagram's headers. A datagram's extension headers go
/// first (TC), so that its UDP header, where its checksum offload (if any) points, lies where
/// the message is built; the quoted header is then the datagram's without them (next header
/// UDP, payload length to match), whose UDP header the client's stack finds right behind it.
/// XDP leaves such a datagram to TC (`DropRewrite`, which the rejection program turns into a
/// pass); a later fragment, which has no UDP header to quote, is dropped (still counted).
#[inline(always)]
pub fn icmp_unreachable<P: Packet>(c: &mut P, p: &Ip6) -> Result<Verdict, Reason> {
    if !p.has_l4 {
        return Ok(Verdict::DROP);
    }
    let ext = p.l4.saturating_sub(L3 + HDR);
    if P::XDP && ext != 0 {
        return Err(Reason::DropRewrite);
    }
    c.strip_l3_ext(ext as u32)?;
    let q: *const [u8; QUOTE] = ptr_at(c, L3)?;
    let b = &mut maps6::scratch()?.frame;
    *b = [0; maps6::SCRATCH];
    eth_reply(c, b)?;
    let len = (8 + QUOTE) as u16;
    ip_header(b, len, proto::ICMPV6, &p.daddr, &p.saddr);
    let i = L3 + HDR;
    b[i] = DEST_UNREACH;
    b[i + 1] = PORT_UNREACH;
    // SAFETY: bounds checked by ptr_at.
    b[i + 8..i + 8 + QUOTE].copy_from_slice(unsafe { &*q });
    if ext != 0 {
        let h = i + 8;
        b[h + 4..h + 6].copy_from_slice(&(p.payload_len - ext as u16).to_be_bytes());
        b[h + 6] = proto::UDP;
    }
    let pseudo = pseudo_sum(&p.daddr, &p.saddr, proto::ICMPV6, len as u32);
    let cs = !csum::fold(csum::add(&b[i..i + 8 + QUOTE], pseudo));
    b[i + 2..i + 4].copy_from_slice(&cs.to_ne_bytes());
    let v = emit_prefix::<P, { L3 + HDR + 8 + QUOTE }>(c, b)?;
    // A datagram sent with checksum offload leaves the skb completing a UDP checksum: over
    // this message, into its bytes 6 and 7 (unused, zero). Holding the pseudo header's sum
    // there, they come out zero and the ICMPv6 checksum right. (IPv4's ICMP has no pseudo
    // header: zero there comes out zero.)
    c.settle_l4_csum(i + 6, csum::fold(pseudo))?;
    Ok(v)
}
