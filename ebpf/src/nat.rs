//! Packet rewriting: address/port translation, forwarding through the FIB, and the rejection
//! frames (TCP RST, ICMP port unreachable) built in place of the offending packet.
use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
};
use kproxy_common::{Reason, proto, timeouts};

use crate::{
    csum, maps,
    parse::{Ip4, tcp_flags},
    pkt::{IP_CSUM, IP_DADDR, IP_SADDR, IP_TTL, L3, MacWords, Packet, ptr_at, read_mac, write_mac},
};

const AF_INET: u8 = 2;

/// What to do with the packet after the program.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Action {
    /// Hand it to the kernel stack.
    Pass,
    /// Drop it.
    Drop,
    /// Send it back out of the device it came in on.
    Tx,
    /// Transmit on `ifindex` (Ethernet header already written).
    Redirect,
    /// Transmit on `ifindex`, letting the kernel resolve the neighbour (TC only).
    RedirectNeigh,
    /// Into the network namespace of the peer of veth `ifindex`, as received there (TC ingress
    /// only).
    RedirectPeer,
}

/// An action and its device. A plain struct rather than an enum with payloads: every byte is
/// always initialised, which keeps the verifier from seeing reads of undefined registers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// What to do.
    pub action: Action,
    /// Target device of `Redirect*`, else 0.
    pub ifindex: u32,
}

impl Verdict {
    /// To the kernel stack.
    pub const PASS: Verdict = Verdict { action: Action::Pass, ifindex: 0 };
    /// Dropped.
    pub const DROP: Verdict = Verdict { action: Action::Drop, ifindex: 0 };
    /// Back out of the ingress device.
    pub const TX: Verdict = Verdict { action: Action::Tx, ifindex: 0 };
    /// Out of `ifindex`.
    #[inline(always)]
    pub const fn redirect(ifindex: u32) -> Verdict {
        Verdict { action: Action::Redirect, ifindex }
    }
    /// Received by the peer of veth `ifindex`.
    #[inline(always)]
    pub const fn redirect_peer(ifindex: u32) -> Verdict {
        Verdict { action: Action::RedirectPeer, ifindex }
    }
    /// Out of `ifindex`, neighbour resolved by the kernel.
    #[inline(always)]
    pub const fn redirect_neigh(ifindex: u32) -> Verdict {
        Verdict { action: Action::RedirectNeigh, ifindex }
    }
}

/// Where a translated packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The kernel stack routes it (local backend, or a reply to a local client).
    Stack,
    /// Straight out through the FIB (remote backend, reply to an external client).
    Fib,
    /// Back out of the interface it came in on (hairpin).
    Bounce,
    /// eBPF host routing: straight to the destination's device, a local pod's namespace or
    /// through the FIB (TC ingress only; the stack when no route is known).
    Direct,
}

/// New addresses and ports (be) for a packet.
#[derive(Clone, Copy)]
pub struct Nat {
    /// Source address.
    pub saddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination address.
    pub daddr: u32,
    /// Destination port.
    pub dport: u16,
}

/// Rewrites `p` to `n`, touching only the fields that change.
#[inline(always)]
pub fn apply<P: Packet>(c: &mut P, p: &Ip4, n: &Nat) -> Result<(), Reason> {
    if c.set_tuple(p, n)? {
        return Ok(());
    }
    if n.daddr != p.daddr {
        c.set_addr(p, IP_DADDR, p.daddr, n.daddr)?;
    }
    if n.saddr != p.saddr {
        c.set_addr(p, IP_SADDR, p.saddr, n.saddr)?;
    }
    if !p.has_l4 {
        // A later fragment: the ports live in the first one.
        return Ok(());
    }
    if n.dport != p.dport {
        c.set_port(p, p.l4 + 2, p.dport, n.dport)?;
    }
    if n.sport != p.sport {
        c.set_port(p, p.l4, p.sport, n.sport)?;
    }
    Ok(())
}

/// Result of a route lookup for a translated packet (a C-like enum: one byte, always
/// initialised).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fib {
    /// No lookup was made (the packet goes to the stack or back where it came from).
    None,
    /// Route and neighbour known: the lookup parameters hold the egress device and both MACs.
    Resolved,
    /// Route known, neighbour not (TC lets the kernel resolve it).
    NoNeigh,
    /// No route, or the packet cannot be forwarded (TTL, MTU, ...).
    Failed,
}

/// Storage for route lookup parameters, 8-byte aligned so that they can be zeroed with 64-bit
/// stores (the verifier refuses misaligned stack accesses).
#[repr(C, align(8))]
pub struct FibBuf(core::mem::MaybeUninit<FibParams>);

impl FibBuf {
    /// Uninitialised storage.
    #[inline(always)]
    pub fn new() -> Self {
        FibBuf(core::mem::MaybeUninit::uninit())
    }

    /// Zeroes the parameters in place, with eight volatile 64-bit stores: a zeroed value, or one
    /// moved into place, compiles to a call of a byte-wise `memset` subprogram (64 iterations on
    /// every packet).
    #[inline(always)]
    pub fn zeroed(&mut self) -> &mut FibParams {
        const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
        let w = self.0.as_mut_ptr() as *mut u64;
        // SAFETY: eight aligned, in-bounds stores initialise all 64 bytes; all-zero bytes are a
        // valid FibParams (plain integers and unions of them).
        unsafe {
            for i in 0..8 {
                core::ptr::write_volatile(w.add(i), 0);
            }
            self.0.assume_init_mut()
        }
    }
}

/// One route XDP or TC looked up, per CPU ([`crate::maps::kp_route4`], slot by destination):
/// for a packet from `ifindex_in` carrying `saddr → daddr` and at most `max_len` bytes long
/// (the forwarding check passed for that length, or the egress MTU a TC lookup returned), out
/// of `ifindex_out` with these MACs, until `stamp + timeouts::ROUTE_CACHE_NS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route4 {
    /// Source address, be.
    pub saddr: u32,
    /// Destination address, be.
    pub daddr: u32,
    /// Device the packet arrived on.
    pub ifindex_in: u32,
    /// Egress device.
    pub ifindex_out: u32,
    /// Next hop's MAC.
    pub dmac: MacWords,
    /// Egress device's MAC.
    pub smac: MacWords,
    /// IPv4 total length the lookup was made with.
    pub max_len: u16,
    /// Zero.
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the lookup.
    pub stamp: u64,
}

// The FIB parameters' MACs lie at even offsets of a struct aligned to at least 2: they move
// as words.
const _: () = assert!(
    core::mem::offset_of!(FibParams, dmac) % 2 == 0
        && core::mem::offset_of!(FibParams, smac) % 2 == 0
        && core::mem::align_of::<FibParams>() >= 2
);

/// The route's MAC addresses in `f` (next hop, egress device).
#[inline(always)]
pub fn fib_macs(f: &FibParams) -> (MacWords, MacWords) {
    // SAFETY: fields of `f` at even offsets of a 2-aligned struct (asserted above).
    unsafe { (read_mac(f.dmac.as_ptr()), read_mac(f.smac.as_ptr())) }
}

/// Stores a cached route's MAC addresses in `f`.
#[inline(always)]
pub fn set_fib_macs(f: &mut FibParams, dmac: &MacWords, smac: &MacWords) {
    // SAFETY: fields of `f` at even offsets of a 2-aligned struct (asserted above).
    unsafe {
        write_mac(f.dmac.as_mut_ptr(), dmac);
        write_mac(f.smac.as_mut_ptr(), smac);
    }
}

/// Looks up the route of a packet that will carry `saddr → daddr`; the result (egress device,
/// MACs) is left in `f`, which the caller zeroed. A successful lookup is reused for the same
/// addresses and ingress device for [`timeouts::ROUTE_CACHE_NS`], by packets no longer than
/// the one it was made for (a per-CPU cache, shared by XDP and TC: `bpf_fib_lookup` is the
/// largest cost of an established NodePort packet, and of every translated packet eBPF host
/// routing delivers). TC passes no length, so the kernel checks that the skb itself is
/// forwardable and, from Linux 5.12, returns the egress device's MTU, the length the entry
/// then admits. A GSO super-packet (TC; its IP length is that of all its segments) is
/// forwardable whatever its length, to the kernel's lookup as here (its segments are cut to
/// the route's size later): it takes a cached route without the length check, and its own
/// lookup's entry admits the MTU the kernel returned, never its length.
#[inline(always)]
pub fn route<P: Packet>(
    c: &mut P,
    p: &Ip4,
    saddr: u32,
    daddr: u32,
    f: &mut FibParams,
    now: u64,
) -> Fib {
    if p.ttl <= 1 {
        return Fib::Failed;
    }
    let ifindex = c.ifindex();
    let gso = c.gso();
    let cached = maps::route_slot(daddr);
    if let Some(e) = cached {
        // SAFETY: valid per-CPU map value pointer; only this CPU's program uses it.
        let e = unsafe { &*e };
        if e.daddr == daddr
            && e.saddr == saddr
            && e.ifindex_in == ifindex
            && (gso || p.tot_len <= e.max_len)
            && now.saturating_sub(e.stamp) < timeouts::ROUTE_CACHE_NS
        {
            f.ifindex = e.ifindex_out;
            set_fib_macs(f, &e.dmac, &e.smac);
            return Fib::Resolved;
        }
    }
    f.family = AF_INET;
    f.l4_protocol = p.proto;
    f.sport = p.sport;
    f.dport = p.dport;
    // TC: no length, so the kernel checks forwardability itself, which understands GSO skbs
    // (whose IP total length is that of the whole super-packet). XDP frames are real frames.
    f.__bindgen_anon_1.tot_len = if P::XDP { p.tot_len } else { 0 };
    f.ifindex = ifindex;
    f.__bindgen_anon_3.ipv4_src = saddr;
    f.__bindgen_anon_4.ipv4_dst = daddr;
    let r = c.fib_lookup(f);
    if r == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if let Some(e) = cached {
            // SAFETY: plain integers; TC: what the kernel wrote back (0 before Linux 5.12).
            let mtu = if P::XDP { 0 } else { unsafe { f.__bindgen_anon_1.mtu_result } };
            let (dmac, smac) = fib_macs(f);
            // SAFETY: valid per-CPU map value pointer; only this CPU's program uses it.
            unsafe {
                *e = Route4 {
                    saddr,
                    daddr,
                    ifindex_in: ifindex,
                    ifindex_out: f.ifindex,
                    dmac,
                    smac,
                    max_len: if gso { mtu } else { mtu.max(p.tot_len) },
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

/// Forwards an already translated packet along the route `f` ([`Fib::Resolved`] or
/// [`Fib::NoNeigh`]): TTL decrement, Ethernet addresses, verdict. `peer`: the egress device is a
/// host-side pod veth and the packet goes straight into the pod's namespace
/// ([`Action::RedirectPeer`]).
#[inline(always)]
pub fn forward<P: Packet>(
    c: &mut P,
    p: &Ip4,
    f: &FibParams,
    fib: Fib,
    peer: bool,
) -> Result<Verdict, Reason> {
    let old = u16::from_ne_bytes([p.ttl, p.proto]);
    let new = u16::from_ne_bytes([p.ttl - 1, p.proto]);
    c.set_word::<20, _>(L3, IP_TTL - L3, IP_CSUM - L3, old, new)?;
    if fib != Fib::Resolved {
        return Ok(Verdict::redirect_neigh(f.ifindex));
    }
    let (dmac, smac) = fib_macs(f);
    c.set_macs(&dmac, &smac)?;
    if P::XDP && f.ifindex == c.ifindex() {
        Ok(Verdict::TX)
    } else if !P::XDP && peer {
        Ok(Verdict::redirect_peer(f.ifindex))
    } else {
        Ok(Verdict::redirect(f.ifindex))
    }
}

/// Sends the packet back where it came from, Ethernet addresses swapped.
#[inline(always)]
pub fn bounce<P: Packet>(c: &mut P) -> Result<Verdict, Reason> {
    let (dst, src) = crate::pkt::read_macs(c)?;
    c.set_macs(&src, &dst)?;
    Ok(Verdict::TX)
}

#[inline(always)]
fn eth_reply(c: &impl Packet, b: &mut [u8]) -> Result<(), Reason> {
    let e: *const [u8; 12] = ptr_at(c, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { &*e };
    b[0..6].copy_from_slice(&e[6..12]);
    b[6..12].copy_from_slice(&e[0..6]);
    b[12] = 0x08;
    b[13] = 0x00;
    Ok(())
}

#[inline(always)]
fn ip_header(b: &mut [u8], tot_len: u16, proto_: u8, saddr: u32, daddr: u32) {
    b[L3] = 0x45;
    b[L3 + 2..L3 + 4].copy_from_slice(&tot_len.to_be_bytes());
    b[L3 + 6] = 0x40; // DF
    b[L3 + 8] = 64;
    b[L3 + 9] = proto_;
    b[L3 + 12..L3 + 16].copy_from_slice(&saddr.to_ne_bytes());
    b[L3 + 16..L3 + 20].copy_from_slice(&daddr.to_ne_bytes());
    let c = !csum::fold(csum::add(&b[L3..L3 + 20], 0));
    b[L3 + 10..L3 + 12].copy_from_slice(&c.to_ne_bytes());
}

/// Replaces a TCP segment by the RST the frontend would send (RFC 9293 3.10.7.1): from the
/// frontend address to the client, sent back where the segment came from.
#[inline(always)]
pub fn tcp_reset<P: Packet>(c: &mut P, p: &Ip4) -> Result<Verdict, Reason> {
    if !p.has_l4 {
        // A later fragment has no TCP header to answer: dropped (the reason is still counted).
        return Ok(Verdict::DROP);
    }
    let mut b = [0u8; 54];
    eth_reply(c, &mut b)?;
    ip_header(&mut b, 40, proto::TCP, p.daddr, p.saddr);
    let t = L3 + 20;
    b[t..t + 2].copy_from_slice(&p.dport.to_ne_bytes());
    b[t + 2..t + 4].copy_from_slice(&p.sport.to_ne_bytes());
    if p.tcp_flags & tcp_flags::ACK != 0 {
        b[t + 4..t + 8].copy_from_slice(&p.ack.to_ne_bytes());
        b[t + 13] = tcp_flags::RST;
    } else {
        let payload = p.tot_len as u32 - p.ihl as u32 * 4 - p.tcp_hlen as u32;
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
    let pseudo = pseudo_sum(p.daddr, p.saddr, proto::TCP, 20);
    let cs = !csum::fold(csum::add(&b[t..t + 20], pseudo));
    b[t + 16..t + 18].copy_from_slice(&cs.to_ne_bytes());
    // A segment's IP options go first, so that its L4 header, where its checksum offload (if
    // any) points, lies where the RST's is built.
    c.strip_l3_ext(p.ihl as u32 * 4 - 20)?;
    c.emit(&b)?;
    c.settle_l4_csum(t + 16, csum::fold(pseudo))?;
    Ok(Verdict::TX)
}

/// The rejection of a UDP datagram for `reason`: its ICMP port unreachable
/// ([`icmp_unreachable`]). XDP leaves a datagram with IP options to TC, which takes them out
/// before it builds the message.
#[inline(always)]
pub fn reject_udp<P: Packet>(
    c: &mut P,
    p: &Ip4,
    reason: Reason,
) -> Result<(Verdict, Reason), Reason> {
    if P::XDP && p.ihl != 5 {
        return Ok((Verdict::PASS, Reason::XdpPassToTc));
    }
    Ok((icmp_unreachable(c, p)?, reason))
}

/// Replaces a UDP datagram by an ICMP port unreachable from the frontend address to the
/// client, quoting the datagram's IP header and first 8 bytes (RFC 792). A datagram's IP
/// options go first (TC), so that its L4 header, where its checksum offload (if any) points,
/// lies where the message is built; the quoted header is then the datagram's without them
/// (header length 5, total length and header checksum to match), whose UDP header the client's
/// stack finds right behind it. A later fragment, which has no UDP header to quote, is dropped
/// (still counted).
#[inline(always)]
pub fn icmp_unreachable<P: Packet>(c: &mut P, p: &Ip4) -> Result<Verdict, Reason> {
    if !p.has_l4 {
        return Ok(Verdict::DROP);
    }
    let opts = p.ihl as u16 * 4 - 20;
    c.strip_l3_ext(opts as u32)?;
    let q: *const [u8; 28] = ptr_at(c, L3)?;
    let mut b = [0u8; 70];
    eth_reply(c, &mut b)?;
    ip_header(&mut b, 56, proto::ICMP, p.daddr, p.saddr);
    let i = L3 + 20;
    b[i] = 3; // destination unreachable
    b[i + 1] = 3; // port unreachable
    // SAFETY: bounds checked by ptr_at.
    b[i + 8..i + 36].copy_from_slice(unsafe { &*q });
    if opts != 0 {
        let h = i + 8;
        b[h] = 0x45;
        b[h + 2..h + 4].copy_from_slice(&(p.tot_len - opts).to_be_bytes());
        b[h + 10..h + 12].copy_from_slice(&[0, 0]);
        let hc = !csum::fold(csum::add(&b[h..h + 20], 0));
        b[h + 10..h + 12].copy_from_slice(&hc.to_ne_bytes());
    }
    let cs = !csum::fold(csum::add(&b[i..i + 36], 0));
    b[i + 2..i + 4].copy_from_slice(&cs.to_ne_bytes());
    c.emit(&b)?;
    Ok(Verdict::TX)
}

#[inline(always)]
fn pseudo_sum(saddr: u32, daddr: u32, proto_: u8, len: u16) -> u64 {
    let mut ph = [0u8; 12];
    ph[0..4].copy_from_slice(&saddr.to_ne_bytes());
    ph[4..8].copy_from_slice(&daddr.to_ne_bytes());
    ph[9] = proto_;
    ph[10..12].copy_from_slice(&len.to_be_bytes());
    csum::add(&ph, 0)
}
