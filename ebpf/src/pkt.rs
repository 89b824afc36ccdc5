//! The packet as both program types see it: one bounds-checked accessor, and the operations
//! whose implementation differs between XDP (direct writes, incremental checksums) and TC
//! (skb helpers for the L4 checksum, which keep CHECKSUM_PARTIAL skbs from local sockets
//! correct; direct writes, as XDP's, for what no checksum or only a plain one covers: the
//! Ethernet addresses, the TTL, the IPv6 hop limit, and the IP header of a whole tuple).
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
        bpf_fib_lookup as FibParams,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_skb_adjust_room,
        bpf_skb_change_tail, bpf_skb_store_bytes, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use kproxy_common::{Reason, proto};

use crate::{csum, parse::Ip4};

/// A 16- or 32-bit header word covered by a plain checksum.
pub trait Word: Copy {
    /// As the `from`/`to` argument of `bpf_l3_csum_replace`.
    fn widen(self) -> u32;
    /// The checksum field after this word changed from `old` to `new` (RFC 1624).
    fn replace(check: u16, old: Self, new: Self) -> u16;
}

impl Word for u16 {
    #[inline(always)]
    fn widen(self) -> u32 {
        self as u32
    }
    #[inline(always)]
    fn replace(check: u16, old: u16, new: u16) -> u16 {
        csum::replace2(check, old, new)
    }
}

impl Word for u32 {
    #[inline(always)]
    fn widen(self) -> u32 {
        self
    }
    #[inline(always)]
    fn replace(check: u16, old: u32, new: u32) -> u16 {
        csum::replace4(check, old, new)
    }
}

/// Offset of the IPv4 header (Ethernet without VLAN tags).
pub const L3: usize = 14;
/// Offset of the IPv4 header checksum.
pub const IP_CSUM: usize = L3 + 10;
/// Offset of the TTL + protocol word.
pub const IP_TTL: usize = L3 + 8;
/// Offset of the IPv4 source address.
pub const IP_SADDR: usize = L3 + 12;
/// Offset of the IPv4 destination address.
pub const IP_DADDR: usize = L3 + 16;

/// Where a packet's bytes are, and how to change them.
pub trait Packet {
    /// True for XDP (decides the verdict encoding and what helpers exist).
    const XDP: bool;
    /// Start of the packet data.
    fn data(&self) -> usize;
    /// End of the linear packet data.
    fn data_end(&self) -> usize;
    /// Length of the whole frame (an skb may hold more than its linear part).
    fn len(&self) -> usize;
    /// Interface the packet arrived on (TC: the device the program is attached to).
    fn ifindex(&self) -> u32;
    /// TC: the device the packet entered the node on (`__sk_buff.ingress_ifindex`; 0 for what
    /// the node sent itself). XDP: the device it arrives on.
    fn ingress_ifindex(&self) -> u32;
    /// Whether the packet is a GSO super-packet (TC: `__sk_buff.gso_size`; never in XDP), whose
    /// IP total length is that of all its segments together.
    fn gso(&self) -> bool;
    /// Replaces the 32-bit address at `off` (`old` → `new`), fixing IP and L4 checksums.
    fn set_addr(&mut self, p: &Ip4, off: usize, old: u32, new: u32) -> Result<(), Reason>;
    /// Replaces the 16-bit L4 port at `off`, fixing the L4 checksum.
    fn set_port(&mut self, p: &Ip4, off: usize, old: u16, new: u16) -> Result<(), Reason>;
    /// Replaces the 16- or 32-bit word at `base + off`, fixing the plain (no pseudo header)
    /// checksum at `base + csum_off`; both lie in the `N` bytes at `base` (one bounds check, so
    /// the verifier sees both accesses through the same pointer).
    fn set_word<const N: usize, W: Word>(
        &mut self,
        base: usize,
        off: usize,
        csum_off: usize,
        old: W,
        new: W,
    ) -> Result<(), Reason>;
    /// Overwrites the Ethernet addresses.
    fn set_macs(&mut self, dst: &MacWords, src: &MacWords) -> Result<(), Reason>;
    /// Replaces the whole frame by `buf` (resizing the packet).
    fn emit<const N: usize>(&mut self, buf: &[u8; N]) -> Result<(), Reason>;
    /// `bpf_fib_lookup` on this context.
    fn fib_lookup(&mut self, params: &mut FibParams) -> i64;
    /// Rewrites addresses and ports in one go where that is cheaper than one word at a time;
    /// `Ok(false)`: not done, use `set_addr`/`set_port`. XDP's direct writes are as cheap
    /// already.
    #[inline(always)]
    fn set_tuple(&mut self, _p: &Ip4, _n: &crate::nat::Nat) -> Result<bool, Reason> {
        Ok(false)
    }
    /// Leaves what a reply built in place of the packet (an RST, an ICMPv6 error) holds at
    /// `off` as the packet's checksum state needs it: TC's skb of a TCP or UDP packet a pod sent
    /// with checksum offload (CHECKSUM_PARTIAL) is completed on the way out from `off` on,
    /// summing from the L4 header with `off`'s field as the seed, which must then hold
    /// `if_partial` instead (the pseudo header's sum); any other state, and XDP, keeps the
    /// field as built.
    #[inline(always)]
    fn settle_l4_csum(&mut self, _off: usize, _if_partial: u16) -> Result<(), Reason> {
        Ok(())
    }
    /// Removes the `len` bytes behind the fixed IP header (IPv4 options, IPv6 extension
    /// headers), before a reply without them is built in place of the packet: TC's skb keeps
    /// its L4 header where it was, so that a checksum offload pointing there (a pod's
    /// CHECKSUM_PARTIAL segment) points at the reply's L4 header, which
    /// [`Packet::settle_l4_csum`] then settles; XDP's frame has no checksum state, nothing to
    /// do. Packet pointers taken before are invalid afterwards.
    #[inline(always)]
    fn strip_l3_ext(&mut self, _len: u32) -> Result<(), Reason> {
        Ok(())
    }
    /// Makes the first `n` bytes directly readable if the frame has them (TC: an skb's linear
    /// part may be shorter than its headers; XDP frames are linear). Packet pointers taken
    /// before are invalid afterwards.
    fn pull(&mut self, n: usize);
}

/// The one bounds-checked packet accessor: a pointer to a `T` at `off`, or `DropMalformed`.
#[inline(always)]
pub fn ptr_at<P: Packet, T>(p: &P, off: usize) -> Result<*mut T, Reason> {
    let start = p.data();
    let end = p.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Reason::DropMalformed);
    }
    Ok((start + off) as *mut T)
}

/// [`Packet::set_word`] by direct writes, for both program types: `Err(DropMalformed)` where the
/// `N` bytes at `base` are not directly readable (TC: past an skb's linear part).
#[inline(always)]
fn write_word<P: Packet, const N: usize, W: Word>(
    c: &P,
    base: usize,
    off: usize,
    csum_off: usize,
    old: W,
    new: W,
) -> Result<(), Reason> {
    if off + size_of::<W>() > N || csum_off + 2 > N {
        return Err(Reason::DropRewrite);
    }
    let b: *mut [u8; N] = ptr_at(c, base)?;
    // SAFETY: both words lie inside the bounds-checked N bytes, at offsets of their own size's
    // alignment from the frame start as the verifier counts it (TTL and checksum of an IPv4
    // header, addresses and ports of one an ICMP error quotes; see `MacWords`), as `set_addr`
    // and `set_port` write theirs: typed accesses, which the BPF backend emits as one load or
    // store each where `write_unaligned` became single bytes.
    unsafe {
        let a = (b as *mut u8).add(off) as *mut W;
        let c = (b as *mut u8).add(csum_off) as *mut u16;
        *a = new;
        *c = W::replace(*c, old, new);
    }
    Ok(())
}

/// A MAC address as three 16-bit words, in memory order. The BPF backend splits every access
/// it cannot prove aligned into single bytes (a MAC copied as `[u8; 6]` took six loads and six
/// stores); each MAC the forwarding paths move lies at an even offset of the packet, of the FIB
/// parameters or of a route cache entry, so it moves as three words.
///
/// Packet fields: the datapath's typed accesses to the frame (MACs, IPv4 and IPv6 header
/// fields, ports, checksums) need no alignment where the CPU has efficient unaligned access
/// (the JIT emits plain loads and stores); elsewhere the verifier checks them as if the frame
/// started at 2 mod 4 (NET_IP_ALIGN), where each of these fields is aligned to its size (the
/// IP header at 14, its options and IPv6's extension headers in 4- and 8-byte units).
pub type MacWords = [u16; 3];

/// The MAC address at `p`.
///
/// # Safety
/// `p` is valid for 6 bytes and 2-aligned, or a packet pointer (see [`MacWords`]).
#[inline(always)]
pub unsafe fn read_mac(p: *const u8) -> MacWords {
    let w = p as *const u16;
    // SAFETY: the caller's.
    unsafe { [*w, *w.add(1), *w.add(2)] }
}

/// Writes MAC address `m` at `p`, one word at a time (volatile, so that the stores are not
/// merged into a `memcpy` call).
///
/// # Safety
/// `p` is valid for 6 bytes and 2-aligned, or a packet pointer (see [`MacWords`]).
#[inline(always)]
pub unsafe fn write_mac(p: *mut u8, m: &MacWords) {
    let w = p as *mut u16;
    // SAFETY: the caller's.
    unsafe {
        core::ptr::write_volatile(w, m[0]);
        core::ptr::write_volatile(w.add(1), m[1]);
        core::ptr::write_volatile(w.add(2), m[2]);
    }
}

/// The Ethernet header's addresses (destination, source).
#[inline(always)]
pub fn read_macs<P: Packet>(c: &P) -> Result<(MacWords, MacWords), Reason> {
    let e: *const u8 = ptr_at::<P, [u8; 12]>(c, 0)? as *const u8;
    // SAFETY: bounds checked by ptr_at; packet fields as in `MacWords`.
    unsafe { Ok((read_mac(e), read_mac(e.add(6)))) }
}

/// [`Packet::set_macs`] by a direct write, for both program types: `Err(DropMalformed)` where
/// the Ethernet header is not directly writable (TC: past an skb's linear part).
#[inline(always)]
fn write_macs<P: Packet>(c: &P, dst: &MacWords, src: &MacWords) -> Result<(), Reason> {
    let e: *mut u8 = ptr_at::<P, [u8; 12]>(c, 0)? as *mut u8;
    // SAFETY: bounds checked by ptr_at; packet fields as in `MacWords`.
    unsafe {
        write_mac(e, dst);
        write_mac(e.add(6), src);
    }
    Ok(())
}

/// The byte of the Ethernet source address that holds XDP's mark for TC
/// ([`kproxy_common::MAC_MARK`]) and the frame's ethertype; `None` for a frame too short for an
/// Ethernet header.
#[inline(always)]
fn mac_mark_byte<P: Packet>(c: &P) -> Option<(*mut u8, u16)> {
    let e = ptr_at::<P, [u8; 14]>(c, 0).ok()? as *mut u8;
    // SAFETY: bounds checked by ptr_at; the ethertype is a packet field as in `MacWords`.
    unsafe { Some((e.add(kproxy_common::MAC_MARK_OFF), u16::from_be(*(e.add(12) as *const u16)))) }
}

/// Whether `ethertype` is IPv4 or IPv6.
#[inline(always)]
fn is_ip(ethertype: u16) -> bool {
    ethertype == crate::parse::ETH_P_IP || ethertype == crate::parse6::ETH_P_IPV6
}

/// XDP: sets (`on`) or clears XDP's mark for TC ([`kproxy_common::MAC_MARK`]). It is set only on
/// IPv4, IPv6 and VLAN-tagged frames (TC sees the last untagged, as IPv4 or IPv6 or not) and
/// cleared on any frame that came with it.
#[inline(always)]
pub fn set_mac_mark<P: Packet>(c: &P, on: bool) {
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88a8;
    let Some((b, t)) = mac_mark_byte(c) else { return };
    let on = on && (is_ip(t) || t == ETH_P_8021Q || t == ETH_P_8021AD);
    // SAFETY: `b` is in the bounds-checked Ethernet header.
    unsafe {
        let was = *b & kproxy_common::MAC_MARK != 0;
        if was != on {
            *b ^= kproxy_common::MAC_MARK;
        }
    }
}

/// TC behind XDP: takes XDP's mark for TC off the frame; whether the frame is IPv4 or IPv6, and
/// whether it was marked.
#[inline(always)]
pub fn take_mac_mark<P: Packet>(c: &P) -> (bool, bool) {
    let Some((b, t)) = mac_mark_byte(c) else { return (false, false) };
    // SAFETY: `b` is in the bounds-checked Ethernet header.
    unsafe {
        let was = *b & kproxy_common::MAC_MARK != 0;
        if was {
            *b &= !kproxy_common::MAC_MARK;
        }
        (is_ip(t), was)
    }
}

/// Offset of the L4 checksum of `p` (None for protocols without one we maintain).
#[inline(always)]
pub fn l4_csum_off(p: &Ip4) -> Option<usize> {
    if !p.has_l4 {
        return None;
    }
    match p.proto {
        proto::TCP => Some(p.l4 + 16),
        proto::UDP => Some(p.l4 + 6),
        _ => None,
    }
}

/// XDP: direct packet writes with RFC 1624 incremental checksum updates.
pub struct Xdp<'a>(pub &'a XdpContext);

impl Xdp<'_> {
    #[inline(always)]
    fn fix_l4(&self, p: &Ip4, old: u32, new: u32, two: bool) -> Result<(), Reason> {
        let Some(off) = l4_csum_off(p) else { return Ok(()) };
        let c: *mut u16 = ptr_at(self, off)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let cur = *c;
            if p.proto == proto::UDP && cur == 0 {
                return Ok(()); // UDP without checksum stays without
            }
            let v = if two {
                csum::replace2(cur, old as u16, new as u16)
            } else {
                csum::replace4(cur, old, new)
            };
            *c = csum::l4_field(p.proto, v);
        }
        Ok(())
    }
}

impl Packet for Xdp<'_> {
    const XDP: bool = true;
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.ifindex()
    }
    #[inline(always)]
    fn gso(&self) -> bool {
        false
    }
    #[inline(always)]
    fn set_addr(&mut self, p: &Ip4, off: usize, old: u32, new: u32) -> Result<(), Reason> {
        let a: *mut u32 = ptr_at(self, off)?;
        let c: *mut u16 = ptr_at(self, IP_CSUM)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *a = new;
            *c = csum::replace4(*c, old, new);
        }
        self.fix_l4(p, old, new, false)
    }
    #[inline(always)]
    fn set_port(&mut self, p: &Ip4, off: usize, old: u16, new: u16) -> Result<(), Reason> {
        let a: *mut u16 = ptr_at(self, off)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *a = new };
        self.fix_l4(p, old as u32, new as u32, true)
    }
    #[inline(always)]
    fn set_word<const N: usize, W: Word>(
        &mut self,
        base: usize,
        off: usize,
        csum_off: usize,
        old: W,
        new: W,
    ) -> Result<(), Reason> {
        write_word::<Self, N, W>(self, base, off, csum_off, old, new)
    }
    #[inline(always)]
    fn set_macs(&mut self, dst: &MacWords, src: &MacWords) -> Result<(), Reason> {
        write_macs(self, dst, src)
    }
    #[inline(always)]
    fn emit<const N: usize>(&mut self, buf: &[u8; N]) -> Result<(), Reason> {
        let delta = N as i32 - self.len() as i32;
        // SAFETY: plain helper call on our own context.
        if unsafe { bpf_xdp_adjust_tail(self.0.ctx, delta) } != 0 {
            return Err(Reason::DropRewrite);
        }
        let d: *mut [u8; N] = ptr_at(self, 0).map_err(|_| Reason::DropRewrite)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *d = *buf };
        Ok(())
    }
    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut FibParams) -> i64 {
        // SAFETY: params is a valid, fully initialised bpf_fib_lookup.
        unsafe { bpf_fib_lookup(self.0.ctx as *mut _, params, size_of::<FibParams>() as i32, 0) }
    }
    #[inline(always)]
    fn pull(&mut self, _n: usize) {}
}

/// TC: skb helpers (`bpf_l3/l4_csum_replace` understand CHECKSUM_PARTIAL).
pub struct Tc<'a>(pub &'a TcContext);

impl Tc<'_> {
    #[inline(always)]
    pub(crate) fn store<T>(&self, off: usize, v: &T) -> Result<(), Reason> {
        // SAFETY: helper bounds-checks against the skb.
        let r = unsafe {
            bpf_skb_store_bytes(
                self.0.skb.skb as *mut _,
                off as u32,
                v as *const T as *const _,
                size_of::<T>() as u32,
                0,
            )
        };
        if r != 0 { Err(Reason::DropRewrite) } else { Ok(()) }
    }
    #[inline(always)]
    fn l4(&self, p: &Ip4, old: u32, new: u32, flags: u64) -> Result<(), Reason> {
        let Some(off) = l4_csum_off(p) else { return Ok(()) };
        let mut f = flags;
        if p.proto == proto::UDP {
            f |= BPF_F_MARK_MANGLED_0 as u64;
        }
        // SAFETY: helper bounds-checks against the skb.
        let r = unsafe {
            bpf_l4_csum_replace(self.0.skb.skb as *mut _, off as u32, old as u64, new as u64, f)
        };
        if r != 0 { Err(Reason::DropRewrite) } else { Ok(()) }
    }
    #[inline(always)]
    fn l3(&self, old: u32, new: u32, size: u64) -> Result<(), Reason> {
        self.l3_at(IP_CSUM, old, new, size)
    }
    #[inline(always)]
    fn l3_at(&self, csum_off: usize, old: u32, new: u32, size: u64) -> Result<(), Reason> {
        // SAFETY: helper bounds-checks against the skb.
        let r = unsafe {
            bpf_l3_csum_replace(
                self.0.skb.skb as *mut _,
                csum_off as u32,
                old as u64,
                new as u64,
                size,
            )
        };
        if r != 0 { Err(Reason::DropRewrite) } else { Ok(()) }
    }
}

/// A parsed packet of one family, as [`Tc::tuple_l4_csum`] updates its L4 checksum.
pub(crate) trait L4Csum {
    /// The L4 protocol.
    fn proto(&self) -> u8;
    /// `bpf_l4_csum_replace` on this packet's L4 checksum (`from`, `to`, flags).
    fn l4_csum(&self, c: &Tc, from: u32, to: u32, flags: u64) -> Result<(), Reason>;
}

impl L4Csum for Ip4 {
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn l4_csum(&self, c: &Tc, from: u32, to: u32, flags: u64) -> Result<(), Reason> {
        c.l4(self, from, to, flags)
    }
}

/// What [`checksum_at`] gives for a field the linear part does not hold (no field value).
pub(crate) const NO_CSUM: u32 = 0x1_0000;

/// The L4 checksum field at `off`, where the linear part holds it; [`NO_CSUM`] where not. A
/// plain integer, not an `Option`: the compiler may read an `Option`'s value where it is `None`,
/// from a stack slot no path wrote, which the verifiers of Linux 5.10 and 6.1 refuse.
#[inline(always)]
pub(crate) fn checksum_at<P: Packet>(c: &P, off: usize) -> u32 {
    match ptr_at::<P, u16>(c, off) {
        // SAFETY: bounds checked by ptr_at; read here, before any helper may move the data.
        Ok(f) => unsafe { core::ptr::read_volatile(f) as u32 },
        Err(_) => NO_CSUM,
    }
}

/// Whether two checksum values are the same one's-complement number (0 and 0xffff both zero).
#[inline(always)]
fn same_csum(a: u16, b: u16) -> bool {
    a == b || (a == 0 || a == 0xffff) && (b == 0 || b == 0xffff)
}

/// The skb's checksum state, as `bpf_l4_csum_replace` showed it by moving an L4 field from
/// `before` to `after` for a pseudo-header difference `d` (not one's-complement zero): with
/// CHECKSUM_PARTIAL the field holds the pseudo header's sum, which grew by `d` (`Some(true)`);
/// in every other state it is the checksum, which shrank by `d` (`Some(false)`); `None`: neither
/// (the helper left the field alone, as it does a UDP datagram's without checksum).
#[inline(always)]
fn partial_by_move(before: u16, d: u32, after: u16) -> Option<bool> {
    if same_csum(after, csum::fold(before as u64 + d as u64)) {
        Some(true)
    } else if same_csum(after, !csum::fold((!before) as u64 + d as u64)) {
        Some(false)
    } else {
        None
    }
}

impl Tc<'_> {
    /// The L4 checksum of a tuple rewrite, for both families: the addresses by their
    /// pseudo-header difference `d` (one helper call, none where `d` is 0xffff, one's-complement
    /// zero: unchanged or swapped addresses; one test where comparing the addresses would be up
    /// to eight branches for the verifier to follow), then the ports (`old` → `new`, both as one
    /// word) by [`Tc::ports_after_pseudo`] where the field tells how, else by a second call. `h`
    /// is the parsed packet, whose family's `bpf_l4_csum_replace` ([`L4Csum`]) updates the field
    /// at `off`.
    #[inline(always)]
    pub(crate) fn tuple_l4_csum<H: L4Csum>(
        &self,
        h: &H,
        off: usize,
        d: u32,
        old: u32,
        new: u32,
    ) -> Result<(), Reason> {
        let mut ports_done = old == new;
        if d != 0xffff {
            // Read only where the ports change (a volatile read is never dropped as unused).
            let before = if ports_done { NO_CSUM } else { checksum_at(self, off) };
            h.l4_csum(self, 0, d, BPF_F_PSEUDO_HDR as u64)?;
            ports_done = ports_done || self.ports_after_pseudo(off, h.proto(), before, d, old, new);
        }
        if !ports_done {
            h.l4_csum(self, old, new, 4)?;
        }
        Ok(())
    }
    /// The ports' share of a tuple's L4 checksum update (`old` → `new`, both ports as one word),
    /// written directly instead of a second `bpf_l4_csum_replace`, right after that helper added
    /// the pseudo header's difference `d` to the field at `off` (which read `before`). The
    /// helper treats the field by the skb's checksum state, which a TC program cannot read, and
    /// the field's new value tells it ([`partial_by_move`]): with CHECKSUM_PARTIAL the ports must
    /// not go in (the device sums the L4 header itself); in every other state they go in as the
    /// helper would put them (`skb->csum` of CHECKSUM_COMPLETE stays: the ports' bytes and the
    /// field change by opposite amounts). `false`: the field cannot tell (not readable; `d`
    /// one's-complement zero, as when the addresses were swapped; a UDP datagram without
    /// checksum, which the helpers leave as it is), the helper is to do it.
    #[inline(always)]
    pub(crate) fn ports_after_pseudo(
        &self,
        off: usize,
        proto_: u8,
        before: u32,
        d: u32,
        old: u32,
        new: u32,
    ) -> bool {
        if before >= NO_CSUM {
            return false;
        }
        let before = before as u16;
        if same_csum(d as u16, 0) {
            return false;
        }
        let Ok(f) = ptr_at::<Self, u16>(self, off) else { return false };
        // SAFETY: bounds checked by ptr_at (after the helper, which may move the data).
        let after = unsafe { *f };
        match partial_by_move(before, d, after) {
            Some(true) => return true,
            Some(false) => {}
            None => return false,
        }
        let v = csum::l4_field(proto_, csum::replace4(after, old, new));
        // SAFETY: as above.
        unsafe { *f = v };
        true
    }
}

impl Packet for Tc<'_> {
    const XDP: bool = false;
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's lifetime.
        unsafe { (*self.0.skb.skb).ifindex }
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.0.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn gso(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.0.skb.skb).gso_size != 0 }
    }
    #[inline(always)]
    fn set_addr(&mut self, p: &Ip4, off: usize, old: u32, new: u32) -> Result<(), Reason> {
        self.l4(p, old, new, BPF_F_PSEUDO_HDR as u64 | 4)?;
        self.l3(old, new, 4)?;
        self.store(off, &new)
    }
    #[inline(always)]
    fn set_port(&mut self, p: &Ip4, off: usize, old: u16, new: u16) -> Result<(), Reason> {
        self.l4(p, old as u32, new as u32, 2)?;
        self.store(off, &new)
    }
    /// Without IP options the IP checksum, both addresses and both ports are 14 contiguous
    /// bytes: written directly with the IP checksum computed here, then one L4 update per
    /// changed address (pseudo header) and one for both ports; two helper calls for a DNAT or
    /// an SNAT instead of five, three for both instead of ten.
    #[inline(always)]
    fn set_tuple(&mut self, p: &Ip4, n: &crate::nat::Nat) -> Result<bool, Reason> {
        if p.ihl != 5 || !p.has_l4 || l4_csum_off(p).is_none() {
            return Ok(false);
        }
        const _: () = assert!(IP_SADDR == IP_CSUM + 2 && IP_DADDR == IP_CSUM + 6);
        let Ok(b) = ptr_at::<Self, [u16; 7]>(self, IP_CSUM) else {
            // The linear part ends inside the ports: one field at a time, through the helpers.
            return Ok(false);
        };
        // Written directly, not with `bpf_skb_store_bytes`: a helper call less on every
        // translated packet. (The verifier makes such a program unclone a cloned skb before
        // it runs, `bpf_unclone_prologue`, as the helper would.)
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let check = (*b)[0];
            (*b)[0] = csum::replace4(csum::replace4(check, p.saddr, n.saddr), p.daddr, n.daddr);
            (*b)[1] = n.saddr as u16;
            (*b)[2] = (n.saddr >> 16) as u16;
            (*b)[3] = n.daddr as u16;
            (*b)[4] = (n.daddr >> 16) as u16;
            (*b)[5] = n.sport;
            (*b)[6] = n.dport;
        }
        let (old, new) =
            (p.sport as u32 | (p.dport as u32) << 16, n.sport as u32 | (n.dport as u32) << 16);
        // The addresses are in the pseudo header (the helper knows what that means for each
        // checksum state of the skb): one update for both, by their difference.
        let d = csum::diff4x2([p.saddr, p.daddr], [n.saddr, n.daddr]);
        let off = l4_csum_off(p).unwrap_or(0);
        self.tuple_l4_csum(p, off, d, old, new)?;
        Ok(true)
    }
    #[inline(always)]
    fn set_word<const N: usize, W: Word>(
        &mut self,
        base: usize,
        off: usize,
        csum_off: usize,
        old: W,
        new: W,
    ) -> Result<(), Reason> {
        // Written directly where the linear part holds the word and its checksum (two helper
        // calls less: the TTL of every packet eBPF host routing forwards); the checksum is a
        // plain one, the same in every checksum state of the skb, and neither way touches
        // `skb->csum`.
        match write_word::<Self, N, W>(self, base, off, csum_off, old, new) {
            Err(Reason::DropMalformed) => {}
            r => return r,
        }
        self.l3_at(base + csum_off, old.widen(), new.widen(), size_of::<W>() as u64)?;
        self.store(base + off, &new)
    }
    #[inline(always)]
    fn set_macs(&mut self, dst: &MacWords, src: &MacWords) -> Result<(), Reason> {
        // Written directly, as XDP's, where the linear part holds the Ethernet header (it
        // always does once the headers were parsed): a helper call less on every packet TC
        // forwards through the FIB.
        if write_macs(self, dst, src).is_ok() {
            return Ok(());
        }
        let m: [u16; 6] = [dst[0], dst[1], dst[2], src[0], src[1], src[2]];
        self.store(0, &m)
    }
    #[inline(always)]
    fn emit<const N: usize>(&mut self, buf: &[u8; N]) -> Result<(), Reason> {
        // SAFETY: helper on our own context.
        if unsafe { bpf_skb_change_tail(self.0.skb.skb, N as u32, 0) } != 0 {
            return Err(Reason::DropRewrite);
        }
        self.store(0, buf)
    }
    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut FibParams) -> i64 {
        // SAFETY: params is a valid, fully initialised bpf_fib_lookup.
        unsafe {
            bpf_fib_lookup(self.0.skb.skb as *mut _, params, size_of::<FibParams>() as i32, 0)
        }
    }
    /// `bpf_skb_adjust_room` in its network mode removes bytes right behind the fixed IP
    /// header and moves the headers before them, so the L4 header stays in place (Linux 4.13+).
    #[inline(always)]
    fn strip_l3_ext(&mut self, len: u32) -> Result<(), Reason> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: helper on our own context.
        let r = unsafe { bpf_skb_adjust_room(self.0.skb.skb, -(len as i32), BPF_ADJ_ROOM_NET, 0) };
        if r != 0 {
            return Err(Reason::DropRewrite);
        }
        Ok(())
    }
    /// The skb's checksum state, which a TC program cannot read, shows in how the L4 helper
    /// moves the field for a pseudo header grown by one ([`partial_by_move`]); then the field is
    /// set.
    #[inline(always)]
    fn settle_l4_csum(&mut self, off: usize, if_partial: u16) -> Result<(), Reason> {
        let before = checksum_at(self, off);
        if before >= NO_CSUM {
            return Err(Reason::DropRewrite);
        }
        let before = before as u16;
        // SAFETY: helper bounds-checks against the skb.
        let r = unsafe {
            bpf_l4_csum_replace(self.0.skb.skb as *mut _, off as u32, 0, 1, BPF_F_PSEUDO_HDR as u64)
        };
        if r != 0 {
            return Err(Reason::DropRewrite);
        }
        let f: *mut u16 = ptr_at(self, off).map_err(|_| Reason::DropRewrite)?;
        // SAFETY: bounds checked by ptr_at (after the helper, which may move the data).
        unsafe {
            *f = if partial_by_move(before, 1, *f) == Some(true) { if_partial } else { before };
        }
        Ok(())
    }
    #[inline(always)]
    fn pull(&mut self, n: usize) {
        if self.data() + n > self.data_end() && self.len() >= n {
            // A failure shows as truncation to the accessor that needed the bytes.
            let _ = self.0.pull_data(n as u32);
        }
    }
}
