//! Fill levels of the pinned maps: entries counted with batched lookups, capacity from the
//! kernel's map info. The agent samples them for the `kproxy_map_*` metrics; `kproxy map list`
//! prints them.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use kproxy_common::names;

use super::sys::bpf;

/// Maps whose fill is reported, pinned name → metric label.
pub const MAP_LABELS: [(&str, &str); 6] = [
    (names::SERVICES4, "services"),
    (names::BACKENDS4, "backends"),
    (names::CT4, "conntrack"),
    (names::REVNAT4, "revnat"),
    (names::AFFINITY4, "affinity"),
    (names::FRAG4, "fragments"),
];

/// Maps the agent writes (and so can find full).
pub const SYNCED_MAPS: [&str; 2] = [names::SERVICES4, names::BACKENDS4];

/// The metric label of a pinned map name (`other` for maps without one).
pub fn map_label(pinned: &str) -> &'static str {
    MAP_LABELS.iter().find(|(p, _)| *p == pinned).map_or("other", |(_, l)| l)
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapUsage {
    /// Metric label (`services`, `backends`, `conntrack`, ...).
    pub map: &'static str,
    /// Pinned name (`kp_svc4`, ...).
    pub pinned: &'static str,
    /// Entries counted.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u32,
}

impl MapUsage {
    /// entries / capacity.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 { 0.0 } else { self.entries as f64 / f64::from(self.capacity) }
    }
}

/// Counts the entries of every map of [`MAP_LABELS`] pinned under `pin_path`. Hash maps are
/// counted with batched lookups (`BPF_MAP_LOOKUP_BATCH`, thousands of entries per system call;
/// key by key on kernels without it): about 10 ms per 10,000 entries, half a second for a full
/// 524,288-entry conntrack map on the development VM (key by key: 1.1 s). Fine every few
/// seconds from a thread of its own, not something to do on every scrape.
pub fn map_usage(pin_path: &Path) -> anyhow::Result<Vec<MapUsage>> {
    let dir = super::bpf::maps_dir(pin_path);
    let mut out = Vec::with_capacity(MAP_LABELS.len());
    for (pinned, label) in MAP_LABELS {
        let path = dir.join(pinned);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info().with_context(|| format!("reading info of {}", path.display()))?;
        let fd = data.fd().as_fd().as_raw_fd();
        let entries = count_entries(fd, info.key_size(), info.value_size())
            .with_context(|| format!("counting the entries of {}", path.display()))?;
        out.push(MapUsage { map: label, pinned, entries, capacity: info.max_entries() });
    }
    Ok(out)
}

/// Entries of the (non per-CPU) hash map `fd`.
fn count_entries(fd: i32, key_size: u32, value_size: u32) -> std::io::Result<u64> {
    match count_batched(fd, key_size, value_size)? {
        Some(n) => Ok(n),
        None => count_by_keys(fd, key_size),
    }
}

/// Counts with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+); `None` when the kernel lacks it.
fn count_batched(fd: i32, key_size: u32, value_size: u32) -> std::io::Result<Option<u64>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const ENOTSUPP: i32 = 524;
    let mut chunk: u32 = 4096;
    let mut keys = vec![0u8; key_size as usize * chunk as usize];
    let mut values = vec![0u8; value_size as usize * chunk as usize];
    // Hash maps use a 4-byte bucket cursor; 8 bytes leave room.
    let (mut in_batch, mut out_batch) = (0u64, 0u64);
    let mut total = 0u64;
    let mut first = true;
    loop {
        // struct { in_batch, out_batch, keys, values; u32 count, map_fd; elem_flags; flags }
        let mut attr = [0u64; 6];
        attr[0] = if first { 0 } else { &in_batch as *const u64 as u64 };
        attr[1] = &mut out_batch as *mut u64 as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = u64::from(chunk) | (u64::from(fd as u32) << 32);
        // SAFETY: cursors, key and value buffers of `chunk` entries, all alive across the call.
        let r = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = attr[4] & 0xffff_ffff;
        match r {
            Ok(_) => total += got,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Some(total + got)),
            // One bucket holds more entries than fit: retry with room for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 4;
                keys.resize(key_size as usize * chunk as usize, 0);
                values.resize(value_size as usize * chunk as usize, 0);
                continue;
            }
            Err(e)
                if first
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOTSUP | ENOTSUPP)
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Counts key by key (`BPF_MAP_GET_NEXT_KEY`), one system call per entry.
fn count_by_keys(fd: i32, key_size: u32) -> std::io::Result<u64> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u64;
    loop {
        let mut attr = [0u64; 3];
        attr[0] = u64::from(fd as u32);
        attr[1] = if n > 0 { key.as_ptr() as u64 } else { 0 };
        attr[2] = next.as_mut_ptr() as u64;
        // SAFETY: key buffers of the map's key size, alive across the call.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {
                n += 1;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

/// Samples [`map_usage`] every `period` and hands each result to `report`, from a thread of its
/// own, until the process ends. The pause after a sample is at least 20 times what the sample
/// took, so counting large maps never takes more than 5% of a core. Maps crossing 90% are
/// warned about once, and noted when they drop below 80% again.
pub fn spawn_map_sampler(
    pin_path: PathBuf,
    period: Duration,
    report: impl Fn(Vec<MapUsage>) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("kproxy-maps".into()).spawn(move || {
        let mut logged = false;
        let mut high = std::collections::BTreeSet::new();
        loop {
            let started = std::time::Instant::now();
            match map_usage(&pin_path) {
                Ok(u) => {
                    for m in &u {
                        if m.pressure() >= 0.9 && high.insert(m.pinned) {
                            tracing::warn!(
                                map = m.pinned,
                                entries = m.entries,
                                capacity = m.capacity,
                                "map at least 90% full"
                            );
                        } else if m.pressure() < 0.8 && high.remove(m.pinned) {
                            tracing::info!(
                                map = m.pinned,
                                entries = m.entries,
                                "map below 80% again"
                            );
                        }
                    }
                    report(u);
                    logged = false;
                }
                Err(e) if !logged => {
                    tracing::warn!(error = format!("{e:#}"), "sampling map fill levels");
                    logged = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(period.max(started.elapsed() * 20));
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    /// A BPF map of `map_type` with u32 keys and u64 values, room for twice `n` (an LRU map
    /// evicts before it is quite full) and holding `n` entries; `None` without the privileges
    /// to create one.
    fn bpf_map(map_type: u32, n: u32) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd as _;
        let mut create = [0u32; 6];
        create[..4].copy_from_slice(&[map_type, 4, 8, 2 * n.max(1)]);
        // SAFETY: BPF_MAP_CREATE with an attribute block of plain numbers.
        let fd = unsafe { bpf(0, &mut create) }.ok()?;
        // SAFETY: a fresh fd we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        for k in 0..n {
            let v = u64::from(k) * 3;
            let mut attr = [0u64; 4];
            attr[0] = u64::from(fd.as_raw_fd() as u32);
            attr[1] = &k as *const u32 as u64;
            attr[2] = &v as *const u64 as u64;
            // SAFETY: key and value pointers to locals alive across the call.
            unsafe { bpf(2, &mut attr) }.expect("BPF_MAP_UPDATE_ELEM");
        }
        Some(fd)
    }

    #[test]
    fn map_entries_are_counted_in_batches_and_key_by_key() {
        const HASH: u32 = 1;
        const LRU_HASH: u32 = 9;
        for (ty, n) in [(HASH, 0), (HASH, 1), (HASH, 10_000), (LRU_HASH, 5000)] {
            let Some(fd) = bpf_map(ty, n) else {
                eprintln!("skipped: cannot create BPF maps (not root?)");
                return;
            };
            let fd = fd.as_raw_fd();
            assert_eq!(count_batched(fd, 4, 8).unwrap(), Some(u64::from(n)), "type {ty}");
            assert_eq!(count_by_keys(fd, 4).unwrap(), u64::from(n), "type {ty}");
            assert_eq!(count_entries(fd, 4, 8).unwrap(), u64::from(n));
        }
    }

    #[test]
    fn labels_of_pinned_maps() {
        assert_eq!(map_label(names::BACKENDS4), "backends");
        assert_eq!(map_label("kp_other"), "other");
        assert_eq!(
            MapUsage { map: "services", pinned: names::SERVICES4, entries: 3, capacity: 4 }
                .pressure(),
            0.75
        );
    }
}
