//! Batched map operations: `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH` and
//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+, hash and LRU hash maps), which aya 0.14 does not offer.
//! One system call moves up to [`CHUNK`] entries instead of one (or two, for a walk), which is
//! what makes programming tens of thousands of services and walking a large connection table
//! cheap.
//!
//! Semantics, as the kernel implements them: an update or delete batch applies its elements in
//! order and stops at the first one that fails, reporting how many it applied; a lookup batch
//! walks a hash map bucket by bucket from an opaque cursor. The functions here keep those
//! semantics: a failure says which element failed and everything before it is done.
//!
//! Which map types have the batched commands: hash, per-CPU hash and LRU hash maps and arrays
//! since Linux 5.6 (every kernel kproxy supports: the matrix's 5.10, 6.1 and 6.12), per-CPU
//! arrays and LPM tries since 5.13 (not on 5.10), device, socket and program maps not at all.
//! The kernel answers `ENOTSUPP` for a map type without them: [`update`] and [`delete`] then
//! write element by element (`BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM`), with the same
//! semantics.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

use super::sys::{self, bpf_cmd};

/// Elements per system call.
pub const CHUNK: usize = 4096;

/// A batch that stopped at element `done` (elements `0..done` were applied).
#[derive(Debug)]
pub struct Stopped {
    /// Elements applied before the failing one.
    pub done: usize,
    /// Why element `done` failed.
    pub error: io::Error,
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// The kernel's `ENOTSUPP` (524, not in libc): the map type has no batched form of a command.
const ENOTSUPP: i32 = 524;

/// Whether a batch command failed because the map type has no batched form of it.
fn no_batch(e: &io::Error) -> bool {
    matches!(errno(e), Some(ENOTSUPP) | Some(libc::EOPNOTSUPP))
}

/// One `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`): inserts or replaces `key` in the map `fd`.
fn update_one<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = sys::attr();
    attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key as *const K as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value as *const V as u64;
    // SAFETY: a key and a value of the map's sizes (the caller's types), alive across the call.
    unsafe { sys::bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// One `BPF_MAP_DELETE_ELEM`: removes `key` from the map `fd`.
fn delete_one<K: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = sys::attr();
    attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key as *const K as u64;
    // SAFETY: a key of the map's size, alive across the call.
    unsafe { sys::bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// [`update`] element by element, for map types without the batched command; `first` is the
/// index of `items[0]` in the caller's list.
fn update_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    items: &[(K, V)],
    first: usize,
) -> Result<(), Stopped> {
    for (i, (k, v)) in items.iter().enumerate() {
        update_one(fd, k, v).map_err(|error| Stopped { done: first + i, error })?;
    }
    Ok(())
}

/// Inserts or replaces `items` in the map `fd`, in order, [`CHUNK`] per system call (one per
/// element for map types without batched updates).
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, items: &[(K, V)]) -> Result<(), Stopped> {
    let mut keys: Vec<K> = Vec::with_capacity(items.len().min(CHUNK));
    let mut values: Vec<V> = Vec::with_capacity(items.len().min(CHUNK));
    for (c, chunk) in items.chunks(CHUNK).enumerate() {
        keys.clear();
        values.clear();
        keys.extend(chunk.iter().map(|(k, _)| *k));
        values.extend(chunk.iter().map(|(_, v)| *v));
        // SAFETY: `chunk.len()` keys and values of the caller's types, alive across the call.
        let r =
            unsafe { update_batch(fd, keys.as_ptr().cast(), values.as_ptr().cast(), chunk.len()) };
        if let Err(Stopped { done, error }) = r {
            if no_batch(&error) {
                // Refused before any element: the rest one by one.
                return update_each(fd, &items[c * CHUNK..], c * CHUNK);
            }
            return Err(Stopped { done: c * CHUNK + done, error });
        }
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_BATCH` of the `n` keys at `keys` and values at `values` into the map
/// `fd`; a failure says how many it applied before the element that failed.
///
/// # Safety
/// `keys` and `values` must point to `n` keys and `n` values of the map's sizes.
unsafe fn update_batch(
    fd: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    n: usize,
) -> Result<(), Stopped> {
    let mut attr = sys::attr();
    attr.batch.map_fd = fd.as_raw_fd() as u32;
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.count = n as u32;
    // SAFETY: `n` keys and values (the caller's promise), alive across the call.
    unsafe { sys::bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop).map_err(|error| {
        // SAFETY: the kernel wrote back how many elements it applied.
        let applied = unsafe { attr.batch.count } as usize;
        Stopped { done: applied.min(n), error }
    })
}

/// [`delete`] element by element, for map types without the batched command; `first` is the
/// index of `keys[0]` in the caller's list. Returns how many entries were deleted.
fn delete_each<K: Pod>(fd: BorrowedFd<'_>, keys: &[K], first: usize) -> Result<usize, Stopped> {
    let mut deleted = 0;
    for (i, k) in keys.iter().enumerate() {
        match delete_one(fd, k) {
            Ok(()) => deleted += 1,
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(error) => return Err(Stopped { done: first + i, error }),
        }
    }
    Ok(deleted)
}

/// Deletes `keys` from the map `fd`, in order, [`CHUNK`] per system call (one per key for map
/// types without batched deletes). Keys that are absent are skipped (not an error); returns how
/// many entries were deleted.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<usize, Stopped> {
    let mut deleted = 0;
    let mut at = 0;
    while at < keys.len() {
        let chunk = &keys[at..keys.len().min(at + CHUNK)];
        let mut attr = sys::attr();
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        attr.batch.keys = chunk.as_ptr() as u64;
        attr.batch.count = chunk.len() as u32;
        // SAFETY: `count` keys, alive across the call.
        let r = unsafe { sys::bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr) };
        if let Err(e) = &r
            && no_batch(e)
        {
            // The map type has no batched delete (refused before any key, `count` untouched):
            // the rest one by one.
            return Ok(deleted + delete_each(fd, &keys[at..], at)?);
        }
        // SAFETY: the kernel wrote back how many elements it deleted.
        let applied = (unsafe { attr.batch.count } as usize).min(chunk.len());
        deleted += applied;
        match r {
            Ok(_) => at += chunk.len(),
            // The key after the deleted ones is absent: skip it and go on.
            Err(e) if errno(&e) == Some(libc::ENOENT) => at += applied + 1,
            Err(error) => return Err(Stopped { done: at + applied, error }),
        }
    }
    Ok(deleted)
}

/// Walks the hash map `fd` with `BPF_MAP_LOOKUP_BATCH`, calling `f` on each chunk of keys and
/// values as raw bytes (`n` entries of `key_size` and `value_size` bytes). Entries added or
/// removed during the walk may or may not be seen, as with any hash map walk.
pub fn walk_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut f: impl FnMut(&[u8], &[u8], usize),
) -> io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys = vec![0u8; key_size * chunk];
    let mut values = vec![0u8; value_size * chunk];
    // Hash maps use a 4-byte bucket cursor; 8 bytes leave room.
    let (mut in_batch, mut out_batch) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = sys::attr();
        attr.batch.in_batch = if first { 0 } else { &in_batch as *const u64 as u64 };
        attr.batch.out_batch = &mut out_batch as *mut u64 as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk as u32;
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: cursors, key and value buffers of `chunk` entries, all alive across the call.
        let r = unsafe { sys::bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // SAFETY: the kernel wrote back how many entries it copied.
        let got = (unsafe { attr.batch.count } as usize).min(chunk);
        match r {
            Ok(_) => f(&keys[..got * key_size], &values[..got * value_size], got),
            // The end of the map; the last entries come with it.
            Err(e) if errno(&e) == Some(libc::ENOENT) => {
                if got > 0 {
                    f(&keys[..got * key_size], &values[..got * value_size], got);
                }
                return Ok(());
            }
            // One bucket holds more entries than fit: retry with room for more.
            Err(e) if errno(&e) == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 4;
                keys.resize(key_size * chunk, 0);
                values.resize(value_size * chunk, 0);
                continue;
            }
            Err(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Walks the hash map `fd` (keys `K`, values `V`), calling `f` on every entry.
pub fn walk<K: Pod, V: Pod>(fd: BorrowedFd<'_>, mut f: impl FnMut(&K, &V)) -> io::Result<()> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    walk_raw(fd, ks, vs, |keys, values, n| {
        for i in 0..n {
            // SAFETY: `K` and `V` are plain data (any bytes are a valid value) and the slices
            // hold `n` entries of their sizes; unaligned reads copy them out.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()),
                    std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()),
                )
            };
            f(&k, &v);
        }
    })
}

/// Every entry of the hash map `fd`.
pub fn collect<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    walk(fd, |k: &K, v: &V| out.push((*k, *v)))?;
    Ok(out)
}

/// Copies every entry of the hash map `from` into the map `to` (same key and value sizes:
/// `key_size`, `value_size` bytes), [`CHUNK`] per system call each way; returns how many. Stops
/// at the first entry `to` refuses (full), with everything before it copied.
pub fn copy(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<u64> {
    let mut copied = 0u64;
    let mut failed = None;
    walk_raw(from, key_size, value_size, |keys, values, n| {
        if failed.is_some() || n == 0 {
            return;
        }
        // SAFETY: the walk's `n` keys and values, of the sizes both maps share.
        match unsafe { update_batch(to, keys.as_ptr(), values.as_ptr(), n) } {
            Ok(()) => copied += n as u64,
            Err(Stopped { done, error }) => {
                copied += done as u64;
                failed = Some(error);
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(copied),
    }
}

/// Number of entries of the hash map `fd` (keys of `key_size`, values of `value_size` bytes).
pub fn count(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<u64> {
    let mut n = 0u64;
    walk_raw(fd, key_size, value_size, |_, _, got| n += got as u64)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::*;

    const HASH: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32;
    const LRU_HASH: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;

    /// A BPF map of `map_type` with u32 keys and u64 values and room for `max` entries; `None`
    /// without the privileges to create one.
    fn bpf_map(map_type: u32, max: u32) -> Option<OwnedFd> {
        let mut attr = sys::attr();
        attr.__bindgen_anon_1.map_type = map_type;
        attr.__bindgen_anon_1.key_size = 4;
        attr.__bindgen_anon_1.value_size = 8;
        attr.__bindgen_anon_1.max_entries = max;
        // SAFETY: BPF_MAP_CREATE with an attribute block of plain numbers.
        let fd = unsafe { sys::bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) }.ok()?;
        // SAFETY: a fresh fd we own.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn contents(fd: &OwnedFd) -> std::collections::BTreeMap<u32, u64> {
        collect::<u32, u64>(fd.as_fd()).unwrap().into_iter().collect()
    }

    #[test]
    fn batches_update_walk_count_and_delete() {
        for (ty, n) in [(HASH, 0u32), (HASH, 1), (HASH, 10_000), (LRU_HASH, 5000)] {
            let Some(fd) = bpf_map(ty, 2 * n.max(1)) else {
                eprintln!("skipped: cannot create BPF maps (not root?)");
                return;
            };
            let items: Vec<(u32, u64)> = (0..n).map(|k| (k, u64::from(k) * 3)).collect();
            update(fd.as_fd(), &items).unwrap();
            let got = contents(&fd);
            assert_eq!(got.len(), n as usize, "type {ty}");
            assert!(got.iter().all(|(k, v)| *v == u64::from(*k) * 3));
            assert_eq!(count(fd.as_fd(), 4, 8).unwrap(), u64::from(n));
            // Every other key, plus keys that are not there (skipped).
            let gone: Vec<u32> = (0..n + 10).step_by(2).collect();
            let deleted = delete(fd.as_fd(), &gone).unwrap();
            assert_eq!(deleted, n.div_ceil(2) as usize);
            assert_eq!(count(fd.as_fd(), 4, 8).unwrap(), u64::from(n / 2), "type {ty}");
            assert!(contents(&fd).keys().all(|k| k % 2 == 1));
        }
    }

    #[test]
    fn a_copy_moves_every_entry_and_stops_where_the_target_is_full() {
        let n = 9_000u32;
        let (Some(from), Some(to), Some(small)) =
            (bpf_map(HASH, n), bpf_map(HASH, 2 * n), bpf_map(HASH, 100))
        else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        let items: Vec<(u32, u64)> = (0..n).map(|k| (k, u64::from(k) + 7)).collect();
        update(from.as_fd(), &items).unwrap();
        assert_eq!(copy(from.as_fd(), to.as_fd(), 4, 8).unwrap(), u64::from(n));
        assert_eq!(contents(&to), contents(&from));
        let err = copy(from.as_fd(), small.as_fd(), 4, 8).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::E2BIG), "{err}");
        assert_eq!(count(small.as_fd(), 4, 8).unwrap(), 100);
    }

    /// The value at `key` in the map `fd` (`BPF_MAP_LOOKUP_ELEM`), `None` when absent.
    fn lookup(fd: &OwnedFd, key: u32) -> Option<u32> {
        let mut value = 0u32;
        let mut attr = sys::attr();
        attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
        attr.__bindgen_anon_2.key = &key as *const u32 as u64;
        attr.__bindgen_anon_2.__bindgen_anon_1.value = &mut value as *mut u32 as u64;
        // SAFETY: a 4-byte key and a 4-byte value buffer, alive across the call.
        unsafe { sys::bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) }.ok().map(|_| value)
    }

    #[test]
    fn map_types_without_batches_are_written_one_element_at_a_time() {
        // A device hash map (key: u32, value: ifindex) has no batched commands on any kernel.
        const DEVMAP_HASH: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH as u32;
        let mut attr = sys::attr();
        attr.__bindgen_anon_1.map_type = DEVMAP_HASH;
        attr.__bindgen_anon_1.key_size = 4;
        attr.__bindgen_anon_1.value_size = 4;
        attr.__bindgen_anon_1.max_entries = 8;
        // SAFETY: BPF_MAP_CREATE with an attribute block of plain numbers.
        let Ok(fd) = (unsafe { sys::bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) }) else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let lo = lo_index();
        // The kernel has no batch for it: the fallback must be what wrote these.
        let mut attr = sys::attr();
        let keys = [1u32];
        let values = [lo];
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        attr.batch.keys = keys.as_ptr() as u64;
        attr.batch.values = values.as_ptr() as u64;
        attr.batch.count = 1;
        // SAFETY: one key and one value, alive across the call.
        let e = unsafe { sys::bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }.unwrap_err();
        assert!(no_batch(&e), "{e}");
        update(fd.as_fd(), &[(1u32, lo), (2, lo), (3, lo)]).unwrap();
        assert_eq!([1, 2, 3, 4].map(|k| lookup(&fd, k)), [Some(lo), Some(lo), Some(lo), None]);
        // Absent keys are skipped.
        assert_eq!(delete(fd.as_fd(), &[2u32, 4, 3]).unwrap(), 2);
        assert_eq!([1, 2, 3].map(|k| lookup(&fd, k)), [Some(lo), None, None]);
        // A failing element stops the writes there, as a batch does (ifindex 0 is no device).
        let e = update(fd.as_fd(), &[(5u32, lo), (6, 0), (7, lo)]).unwrap_err();
        assert_eq!(e.done, 1);
        assert_eq!([5, 6, 7].map(|k| lookup(&fd, k)), [Some(lo), None, None]);
    }

    /// The loopback device's ifindex.
    fn lo_index() -> u32 {
        // SAFETY: a NUL-terminated name.
        let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        assert_ne!(i, 0, "no lo device");
        i
    }

    #[test]
    fn a_full_map_stops_the_batch_at_the_element_that_did_not_fit() {
        let Some(fd) = bpf_map(HASH, 100) else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        // Two chunks' worth: the failure index counts across chunks.
        let items: Vec<(u32, u64)> = (0..(CHUNK as u32 + 10)).map(|k| (k, 1)).collect();
        let e = update(fd.as_fd(), &items).unwrap_err();
        assert_eq!(e.done, 100);
        assert_eq!(e.error.raw_os_error(), Some(libc::E2BIG));
        assert_eq!(count(fd.as_fd(), 4, 8).unwrap(), 100);
        // Replacing existing keys still works in a full map.
        update(fd.as_fd(), &items[..100].iter().map(|(k, _)| (*k, 7u64)).collect::<Vec<_>>())
            .unwrap();
        let c = contents(&fd);
        assert!(c.values().all(|v| *v == 7), "{c:?}");
    }
}
