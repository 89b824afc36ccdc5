//! IPv6 packet rewrites for both program types. IPv6 has no header checksum: an address change
//! only touches the L4 checksum, through its pseudo-header. XDP writes directly and updates the
//! checksum incrementally (RFC 1624); TC uses `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR`
//! (and `BPF_F_IPV6` where the kernel knows it), so CHECKSUM_PARTIAL skbs from local sockets
//! stay right.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_l4_csum_replace,
};
use kproxy_common::{Addr6, Reason, cfg_flags, proto};

use crate::{
    csum,
    nat6::Nat6,
    parse6::{DADDR, HDR, HOP_LIMIT, Ip6, SADDR},
    pkt::{L3, L4Csum, Packet, Tc, Xdp, ptr_at},
};

/// `BPF_F_IPV6` (Linux 6.16): the pseudo-header change of an IPv6 packet must not touch
/// `skb->csum` of a CHECKSUM_COMPLETE skb. Older kernels refuse the flag; the helper is then
/// called without it.
const BPF_F_IPV6: u64 = kproxy_common::L4_CSUM_F_IPV6;

/// Offset of the L4 checksum of `p` (None without an L4 header we maintain).
#[inline(always)]
pub fn l4_csum_off(p: &Ip6) -> Option<usize> {
    if !p.has_l4 {
        return None;
    }
    match p.proto {
        proto::TCP => Some(p.l4 + 16),
        proto::UDP => Some(p.l4 + 6),
        proto::ICMPV6 => Some(p.l4 + 2),
        _ => None,
    }
}

/// IPv6 rewrites, beside [`Packet`]'s family-neutral ones.
pub trait Packet6: Packet {
    /// Replaces the address at `off` (`old` → `new`), fixing the L4 checksum (pseudo-header).
    fn set_addr6(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason>;
    /// Replaces a 16-bit word at `off` covered by the L4 checksum (a port, or a quoted port of
    /// an ICMPv6 error).
    fn set_l4_word(&mut self, p: &Ip6, off: usize, old: u16, new: u16) -> Result<(), Reason>;
    /// Replaces a 128-bit field at `off` covered by the L4 checksum but not part of the
    /// pseudo-header (a quoted address of an ICMPv6 error).
    fn set_l4_addr(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason>;
    /// Decrements the hop limit (no checksum covers it).
    fn set_hop_limit(&mut self, hop_limit: u8) -> Result<(), Reason>;
    /// Rewrites both addresses and both ports in one go (TCP and UDP without extension
    /// headers); `Ok(false)`: not done, use `set_addr6`/`set_l4_word`.
    #[inline(always)]
    fn set_tuple6(&mut self, _p: &Ip6, _n: &Nat6) -> Result<bool, Reason> {
        Ok(false)
    }
}

/// [`Packet6::set_hop_limit`] by a direct write, for both program types: `Err(DropMalformed)`
/// where the IPv6 header is not directly writable (TC: past an skb's linear part).
#[inline(always)]
fn write_hop_limit<P: Packet>(c: &P, hop_limit: u8) -> Result<(), Reason> {
    let h: *mut u8 = ptr_at(c, HOP_LIMIT)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *h = hop_limit };
    Ok(())
}

impl Xdp<'_> {
    #[inline(always)]
    fn fix_l4_6(&self, p: &Ip6, old: &Addr6, new: &Addr6) -> Result<(), Reason> {
        let Some(off) = l4_csum_off(p) else { return Ok(()) };
        let c: *mut u16 = ptr_at(self, off)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *c = csum::l4_field(p.proto, csum::replace16(*c, old, new)) };
        Ok(())
    }
}

impl Packet6 for Xdp<'_> {
    #[inline(always)]
    fn set_addr6(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason> {
        let a: *mut Addr6 = ptr_at(self, off)?;
        // SAFETY: bounds checked by ptr_at; a typed copy, four word stores (`write_unaligned`
        // became sixteen byte stores); packet fields as in `pkt::MacWords`.
        unsafe { core::ptr::copy_nonoverlapping(new as *const Addr6, a, 1) };
        self.fix_l4_6(p, old, new)
    }
    #[inline(always)]
    fn set_l4_word(&mut self, p: &Ip6, off: usize, old: u16, new: u16) -> Result<(), Reason> {
        let a: *mut u16 = ptr_at(self, off)?;
        // SAFETY: bounds checked by ptr_at; packet fields as in `pkt::MacWords`.
        unsafe { *a = new };
        let Some(coff) = l4_csum_off(p) else { return Ok(()) };
        let c: *mut u16 = ptr_at(self, coff)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *c = csum::l4_field(p.proto, csum::replace2(*c, old, new)) };
        Ok(())
    }
    #[inline(always)]
    fn set_l4_addr(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason> {
        self.set_addr6(p, off, old, new)
    }
    #[inline(always)]
    fn set_hop_limit(&mut self, hop_limit: u8) -> Result<(), Reason> {
        write_hop_limit(self, hop_limit)
    }
    /// Without extension headers: both addresses, both ports and the checksum behind one
    /// bounds check, one 36-byte store and one checksum update for the four fields (four
    /// updates of the same checksum, each behind its own bounds check, otherwise).
    #[inline(always)]
    fn set_tuple6(&mut self, p: &Ip6, n: &Nat6) -> Result<bool, Reason> {
        if p.l4 != L3 + HDR || !p.has_l4 || (p.proto != proto::TCP && p.proto != proto::UDP) {
            return Ok(false);
        }
        const _: () = assert!(DADDR == SADDR + 16 && SADDR + 32 == L3 + HDR);
        // Addresses, ports and the L4 header up to TCP's checksum (past UDP's).
        const SPAN: usize = 32 + 18;
        let Ok(b) = ptr_at::<Self, [u8; SPAN]>(self, SADDR) else {
            // A UDP datagram with less than 10 bytes of payload: one field at a time.
            return Ok(false);
        };
        let coff = if p.proto == proto::TCP { 32 + 16 } else { 32 + 6 };
        // SAFETY: the tuple and both checksum offsets lie inside the bounds-checked SPAN
        // bytes (packet fields as in `pkt::MacWords`): typed accesses, word loads and stores
        // where `read_unaligned`/`write_unaligned` became bytes (36 stores for the tuple).
        unsafe {
            let c = (b as *mut u8).add(coff) as *mut u16;
            let v = csum::replace_tuple6(*c, [&p.saddr, &p.daddr], [p.sport, p.dport], n);
            let v = csum::l4_field(p.proto, v);
            core::ptr::copy_nonoverlapping(n as *const Nat6, b as *mut Nat6, 1);
            *c = v;
        }
        Ok(true)
    }
}

impl Tc<'_> {
    /// `bpf_l4_csum_replace` on the L4 checksum of `p`, trying `BPF_F_IPV6` first unless the
    /// agent found that the kernel refuses it (`cfg_flags::NO_L4_CSUM_IPV6`: then one call,
    /// not a refused one and a second).
    #[inline(always)]
    fn l4_6(&self, p: &Ip6, from: u64, to: u64, flags: u64) -> Result<(), Reason> {
        let Some(off) = l4_csum_off(p) else { return Ok(()) };
        let mut f = flags;
        if p.proto == proto::UDP {
            f |= BPF_F_MARK_MANGLED_0 as u64;
        }
        let skb = self.0.skb.skb as *mut _;
        let pseudo = flags & BPF_F_PSEUDO_HDR as u64 != 0;
        let mut r = -1;
        if pseudo && !crate::maps::config_flag(cfg_flags::NO_L4_CSUM_IPV6) {
            // SAFETY: helper bounds-checks against the skb.
            r = unsafe { bpf_l4_csum_replace(skb, off as u32, from, to, f | BPF_F_IPV6) };
        }
        if r != 0 {
            // SAFETY: as above.
            r = unsafe { bpf_l4_csum_replace(skb, off as u32, from, to, f) };
        }
        if r != 0 { Err(Reason::DropRewrite) } else { Ok(()) }
    }
}

impl L4Csum for Ip6 {
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn l4_csum(&self, c: &Tc, from: u32, to: u32, flags: u64) -> Result<(), Reason> {
        c.l4_6(self, from as u64, to as u64, flags)
    }
}

impl Packet6 for Tc<'_> {
    #[inline(always)]
    fn set_addr6(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason> {
        // Size 0: `to` is the checksum difference of the whole address.
        self.l4_6(p, 0, csum::diff16(old, new) as u64, BPF_F_PSEUDO_HDR as u64)?;
        self.store(off, new)
    }
    #[inline(always)]
    fn set_l4_word(&mut self, p: &Ip6, off: usize, old: u16, new: u16) -> Result<(), Reason> {
        self.l4_6(p, old as u64, new as u64, 2)?;
        self.store(off, &new)
    }
    #[inline(always)]
    fn set_l4_addr(&mut self, p: &Ip6, off: usize, old: &Addr6, new: &Addr6) -> Result<(), Reason> {
        self.l4_6(p, 0, csum::diff16(old, new) as u64, 0)?;
        self.store(off, new)
    }
    /// Written directly where the linear part holds it (the parse read the header from there),
    /// as XDP does: a helper call less on every packet TC forwards. No checksum covers the hop
    /// limit; `skb->csum` is left as the store helper leaves it.
    #[inline(always)]
    fn set_hop_limit(&mut self, hop_limit: u8) -> Result<(), Reason> {
        if write_hop_limit(self, hop_limit).is_ok() {
            return Ok(());
        }
        self.store(HOP_LIMIT, &hop_limit)
    }
    /// Without extension headers both addresses and both ports of TCP and UDP are 36
    /// contiguous bytes: one direct write, one L4 update for both addresses (pseudo header)
    /// and one for both ports; two helper calls for any translation instead of four for a
    /// DNAT and eight for both.
    #[inline(always)]
    fn set_tuple6(&mut self, p: &Ip6, n: &Nat6) -> Result<bool, Reason> {
        if p.l4 != L3 + HDR || !p.has_l4 || (p.proto != proto::TCP && p.proto != proto::UDP) {
            return Ok(false);
        }
        const _: () = assert!(DADDR == SADDR + 16 && SADDR + 32 == L3 + HDR);
        // Both addresses' difference, tested once (see `Tc::tuple_l4_csum`).
        let d = csum::diff16x2([&p.saddr, &p.daddr], [&n.saddr, &n.daddr]);
        let (old, new) =
            (p.sport as u32 | (p.dport as u32) << 16, n.sport as u32 | (n.dport as u32) << 16);
        self.tuple_l4_csum(p, l4_csum_off(p).unwrap_or(0), d, old, new)?;
        // `Nat6` has the packet's layout. Written directly (a helper call less on every
        // translated packet): the parser read the addresses and ports from the linear part,
        // which the checksum helpers leave as it was.
        let d = ptr_at::<Self, Nat6>(self, SADDR).map_err(|_| Reason::DropRewrite)?;
        // SAFETY: bounds checked by ptr_at; one non-overlapping copy, which LLVM expands into
        // stores (a copy through a temporary would call the byte-wise `memmove` subprogram).
        unsafe { core::ptr::copy_nonoverlapping(n as *const Nat6, d, 1) };
        Ok(true)
    }
}
