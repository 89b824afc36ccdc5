//! The hint bitmaps (`kp_addrbits`, `kp_portbits`; see `kproxy_common::hints`): which
//! addresses and ports may belong to a frontend or a backend, so that the datapath skips every
//! hash lookup for the rest of the traffic.
//!
//! Both maps are arrays created with `BPF_F_MMAPABLE`: the agent maps them into its memory and
//! sets bits with atomic `OR`s, no system call per bit. Bits are set before the map entries they
//! cover are written, and never cleared while the datapath runs: a stale bit only costs the
//! datapath a lookup, a missing one would let a packet of a translated flow pass untranslated.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use kproxy_common::{Addr6, Backend4, Backend6, Service4Key, Service6Key, hints, names};

/// One memory-mapped hint map.
struct Mapped {
    words: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for Mapped {}
// SAFETY: as above: every access, from any thread, is atomic.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn open(pin: &Path, words: u32) -> anyhow::Result<Self> {
        let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
        let info = data.info().with_context(|| format!("reading info of {}", pin.display()))?;
        if info.max_entries() != words || info.value_size() != 8 {
            bail!(
                "hint map {} has {} entries of {} bytes, expected {words} of 8",
                pin.display(),
                info.max_entries(),
                info.value_size()
            );
        }
        let len = words as usize * 8;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-write mapping of an mmapable array map of `len` bytes; the
        // kernel keeps the map alive while the mapping exists (the fd may be closed after).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {} (needs BPF_F_MMAPABLE)", pin.display()));
        }
        let words = NonNull::new(p.cast::<AtomicU64>()).context("mmap returned null")?;
        Ok(Self { words, len: words_len(len) })
    }

    /// Sets the bits of `mask` in word `index`; returns whether any was new.
    fn set(&self, index: u32, mask: u64) -> bool {
        let i = index as usize;
        assert!(i < self.len, "hint word {i} out of range {}", self.len);
        // SAFETY: `i` is inside the mapping, which lives as long as `self`.
        let w = unsafe { &*self.words.as_ptr().add(i) };
        if w.load(Ordering::Relaxed) & mask == mask {
            return false;
        }
        w.fetch_or(mask, Ordering::SeqCst) & mask != mask
    }

    fn get(&self, index: u32) -> u64 {
        let i = index as usize;
        assert!(i < self.len, "hint word {i} out of range {}", self.len);
        // SAFETY: as in `set`.
        unsafe { &*self.words.as_ptr().add(i) }.load(Ordering::Relaxed)
    }
}

fn words_len(bytes: usize) -> usize {
    bytes / 8
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * 8) };
    }
}

/// The two hint maps of one node, mapped.
pub struct Hints {
    addrs: Mapped,
    ports: Mapped,
}

impl Hints {
    /// Maps the hint maps pinned in `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            addrs: Mapped::open(&dir.join(names::ADDR_BITS), hints::ADDR_MAX)?,
            ports: Mapped::open(&dir.join(names::PORT_BITS), hints::PORT_MAX)?,
        })
    }

    fn mark(&self, kind: u32, addr: u32, proto: u8, port: u16) {
        let Some((pi, pm)) = hints::port_slot(kind, proto, port) else { return };
        let (ai, am) = hints::addr_slot(kind, addr);
        self.ports.set(pi, pm);
        self.addrs.set(ai, am);
    }

    /// Marks the frontend of a service entry (any slot: they share address, port, protocol).
    pub fn frontend(&self, key: &Service4Key) {
        self.mark(hints::FRONTEND, key.addr, key.proto, key.port);
    }

    /// Marks a backend.
    pub fn backend(&self, b: &Backend4) {
        self.mark(hints::BACKEND, b.addr, b.proto, b.port);
    }

    fn mark6(&self, kind: u32, addr: &Addr6, proto: u8, port: u16) {
        let Some((pi, pm)) = hints::port_slot(kind, proto, port) else { return };
        let (ai, am) = hints::addr6_slot(kind, addr);
        self.ports.set(pi, pm);
        self.addrs.set(ai, am);
    }

    /// Marks the frontend of an IPv6 service entry.
    pub fn frontend6(&self, key: &Service6Key) {
        self.mark6(hints::FRONTEND, &key.addr, key.proto, key.port);
    }

    /// Marks an IPv6 backend.
    pub fn backend6(&self, b: &Backend6) {
        self.mark6(hints::BACKEND, &b.addr, b.proto, b.port);
    }

    /// Whether `addr:port` of `proto` (be) passes the `kind` filter, as the datapath tests it.
    pub fn hinted(&self, kind: u32, addr: u32, proto: u8, port: u16) -> bool {
        let Some((pi, pm)) = hints::port_slot(kind, proto, port) else { return false };
        let (ai, am) = hints::addr_slot(kind, addr);
        self.ports.get(pi) & pm != 0 && self.addrs.get(ai) & am != 0
    }
}

/// The hint bitmap of the closed service addresses (`kp_svcaddrbits`, one address bitmap with
/// the bit numbers of [`hints::addr_bit`]), mapped. Bits are set before the addresses are
/// written and never cleared while the datapath runs (a stale bit costs a tail call).
pub struct ServiceAddrBits(Mapped);

impl ServiceAddrBits {
    /// Maps the bitmap pinned in `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self(Mapped::open(&dir.join(names::SVC_ADDR_BITS), hints::ADDR_WORDS)?))
    }

    /// Marks `addr` (be).
    pub fn mark(&self, addr: u32) {
        let bit = hints::addr_bit(addr);
        self.0.set(bit >> 6, 1 << (bit & 63));
    }

    /// Whether `addr` (be) is marked, as the datapath tests it.
    pub fn marked(&self, addr: u32) -> bool {
        let bit = hints::addr_bit(addr);
        self.0.get(bit >> 6) & (1 << (bit & 63)) != 0
    }
}
