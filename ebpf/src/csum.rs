//! The one checksum helper: Internet checksum arithmetic (RFC 1071) and incremental updates
//! (RFC 1624, `HC' = ~(~HC + ~m + m')`). Values are 16-bit words exactly as they sit in memory;
//! one's-complement sums do not depend on byte order, so no swapping is needed.
//!
//! 32-bit fields are added whole into a 64-bit accumulator, not as two 16-bit halves: since
//! 2^16 ≡ 1 (mod 0xffff), the fold gives the same sum, and a sum of non-negative terms folds to
//! 0 only when every term is 0, so the result is the same bit for bit (half the additions and
//! none of the masks and shifts; an IPv6 address pair is 16 additions instead of 64 operations).

/// An updated L4 checksum as the field is to hold it: a UDP checksum that computes to 0 is sent
/// as 0xffff (RFC 768; 0 in the field means "no checksum").
#[inline(always)]
pub fn l4_field(proto_: u8, v: u16) -> u16 {
    if proto_ == kproxy_common::proto::UDP && v == 0 { 0xffff } else { v }
}

/// Folds a 64-bit accumulator into 16 bits (not complemented).
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Checksum field after a 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    !fold((!check) as u64 + (!old) as u64 + new as u64)
}

/// Checksum field after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let s = (!check) as u64 + (!old) as u64 + new as u64;
    !fold(s)
}

/// Adds the 16-bit words of `buf` (even length) to the accumulator `acc`.
#[inline(always)]
pub fn add(buf: &[u8], mut acc: u64) -> u64 {
    let mut i = 0;
    while i + 1 < buf.len() {
        acc += u16::from_ne_bytes([buf[i], buf[i + 1]]) as u64;
        i += 2;
    }
    acc
}

/// Checksum field after a 128-bit field of the covered data (an IPv6 address, four words as in
/// memory) changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    !fold(acc16(old, new, (!check) as u64))
}

/// The one's-complement difference `new - old` of two 128-bit fields, as a 32-bit partial sum
/// (what `bpf_csum_diff` returns; the `to` argument of the skb checksum helpers with size 0).
#[inline(always)]
pub fn diff16(old: &[u32; 4], new: &[u32; 4]) -> u32 {
    fold(acc16(old, new, 0)) as u32
}

/// The one's-complement difference `new - old` of two 32-bit fields (both addresses of an IPv4
/// header), as a 32-bit partial sum (the `to` argument of the skb checksum helpers with size 0).
#[inline(always)]
pub fn diff4x2(old: [u32; 2], new: [u32; 2]) -> u32 {
    fold((!old[0]) as u64 + new[0] as u64 + (!old[1]) as u64 + new[1] as u64) as u32
}

/// [`diff16`] of two 128-bit fields at once (both addresses of an IPv6 header), for one
/// checksum update instead of two.
#[inline(always)]
pub fn diff16x2(old: [&[u32; 4]; 2], new: [&[u32; 4]; 2]) -> u32 {
    fold(acc16(old[1], new[1], acc16(old[0], new[0], 0))) as u32
}

/// Adds `new - old` (one's complement) of a 128-bit field to `s`, by 32-bit words (see the
/// module documentation).
#[inline(always)]
fn acc16(old: &[u32; 4], new: &[u32; 4], mut s: u64) -> u64 {
    let mut i = 0;
    while i < 4 {
        s += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    s
}

/// Checksum field after both addresses and both ports of an IPv6 TCP/UDP tuple changed from
/// `old_addrs`/`old_ports` to `new` (a pseudo-header checksum covers all four), in one update.
#[inline(always)]
pub fn replace_tuple6(
    check: u16,
    old_addrs: [&[u32; 4]; 2],
    old_ports: [u16; 2],
    new: &crate::nat6::Nat6,
) -> u16 {
    let mut s = (!check) as u64
        + (!old_ports[0]) as u64
        + (!old_ports[1]) as u64
        + new.sport as u64
        + new.dport as u64;
    s = acc16(old_addrs[0], &new.saddr, s);
    s = acc16(old_addrs[1], &new.daddr, s);
    !fold(s)
}
