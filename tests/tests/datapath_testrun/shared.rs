//! Datapath loads shared by the packet tests of one test process. A load costs the verifier's
//! time for every program (about 90 s on Linux 5.10 under emulation), a packet test
//! milliseconds: [`take`] lends a load to one test at a time and [`reset`] brings it back to
//! the state of a fresh load first, so that no test sees what another left behind, whatever the
//! order and the number of test threads.
//!
//! At most [`max_loads`] loads are made (`KPROXY_TESTRUN_LOADS`, default 2: one per test
//! thread of `--test-threads=2`); a test finding them all lent waits for one. Their pin
//! directories are removed when the process exits.
//!
//! What [`reset`] resets is found, not listed: every map that any program of the load uses
//! (the program's map ids, from the kernel) and every map pinned under the load's `v1/`,
//! whatever the map:
//! - hash, LRU hash and LPM trie maps (services, backends, conntrack, reverse NAT, affinity,
//!   fragments, socket LB, service addresses, pod devices, source ranges): every entry deleted;
//! - arrays and per-CPU arrays (counters, hint bitmaps, configurations, service CIDRs, and the
//!   datapath-internal ones that are not pinned: clocks, remembered reverse-NAT misses and
//!   their generation, route caches, scratch space): every element written with zeros, as a
//!   fresh load creates them;
//! - the tail-call tables: every target put back at its index (a test may clear one).
//!
//! A map of another type, or a pinned map no program uses and the walk missed, fails the test
//! with its name. A shared load must not be attached to a device: tests that attach, or that
//! test loading itself, load their own datapath.
use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Condvar, Mutex, MutexGuard, Once, PoisonError, TryLockError},
};

use aya::maps::{Map, MapData, MapInfo, MapType, ProgramArray};
use kproxy::dataplane::{
    loader::{Datapath, MapSizes},
    sys::{self, bpf_cmd},
};
use kproxy_common::names;

/// A loaded datapath in its pin directory.
pub struct Loaded {
    pub dir: PathBuf,
    pub dp: Datapath,
}

struct Pool {
    /// Loads not lent out.
    idle: Vec<Loaded>,
    /// Loads made (lent or idle), and being made.
    made: usize,
    /// Pin directories of the loads made, removed at exit.
    dirs: Vec<PathBuf>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { idle: Vec::new(), made: 0, dirs: Vec::new() });
/// Signalled when a load goes back to the pool (or a load failed).
static RETURNED: Condvar = Condvar::new();

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many loads the process shares at most (`KPROXY_TESTRUN_LOADS`, default 2).
pub fn max_loads() -> usize {
    std::env::var("KPROXY_TESTRUN_LOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(1)
}

/// A shared load, reset, for one test: an idle one, a new one while fewer than
/// [`max_loads`] exist, else the next one given back. `load` makes a new one.
pub fn take(load: impl FnOnce() -> Loaded) -> Loaded {
    let mut p = pool();
    let mut loaded = loop {
        if let Some(l) = p.idle.pop() {
            break l;
        }
        if p.made < max_loads() {
            p.made += 1;
            drop(p);
            // Counted before it exists: a load that panics gives its place back.
            let undo = Unmade;
            let l = load();
            std::mem::forget(undo);
            let mut p = pool();
            if p.dirs.is_empty() {
                static AT_EXIT: Once = Once::new();
                // SAFETY: registers a plain function without arguments.
                AT_EXIT.call_once(|| assert_eq!(unsafe { libc::atexit(remove_pins) }, 0));
            }
            p.dirs.push(l.dir.clone());
            break l;
        }
        p = RETURNED.wait(p).unwrap_or_else(PoisonError::into_inner);
    };
    // A reset that panics loses the load (its pins go at exit): its place is given back, so
    // that the tests waiting for a load fail on their own instead of waiting for ever.
    let undo = Unmade;
    reset(&mut loaded);
    std::mem::forget(undo);
    loaded
}

/// Gives a load back to the pool.
pub fn give_back(loaded: Loaded) {
    pool().idle.push(loaded);
    RETURNED.notify_one();
}

struct Unmade;

impl Drop for Unmade {
    fn drop(&mut self) {
        pool().made -= 1;
        RETURNED.notify_all();
    }
}

extern "C" fn remove_pins() {
    // A test thread still holding the pool at exit keeps its pins.
    let p = match POOL.try_lock() {
        Ok(p) => p,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    for d in &p.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Every program of a load, by name.
fn programs() -> Vec<&'static str> {
    let mut v = names::TC_ENTRY_PROGS.to_vec();
    v.push(names::PROG_XDP_EXT);
    v.extend(names::TC_CALLS.iter().chain(&names::XDP_CALLS).map(|(n, _)| *n));
    v.extend(names::SOCK_PROGS.iter().chain(&names::SOCK_PROGS6).map(|(n, _)| *n));
    v
}

/// Brings every map of `l` back to the state of a fresh load (see the module doc).
pub fn reset(l: &mut Loaded) {
    let v1 = l.dir.join("v1");
    assert!(
        !v1.join("links").exists(),
        "a shared datapath was attached to a device ({}): such a test loads its own",
        v1.display()
    );
    // The loader writes only the slots of `kp_hookdevs` that differ from its last call: emptied
    // through it, so that it forgets what an earlier test recorded (the map is zeroed below).
    l.dp.set_hook_devs(&Default::default()).expect("hook devices emptied");
    let mut ids = BTreeSet::new();
    for name in programs() {
        let p = l.dp.program_mut(name).unwrap_or_else(|| panic!("program {name} missing"));
        let info = p.info().unwrap_or_else(|e| panic!("{name}: {e}"));
        ids.extend(info.map_ids().unwrap().expect("map ids (Linux 4.15+)"));
    }
    // Every pinned map must be among them.
    for e in std::fs::read_dir(&v1).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            continue; // calls/: the tail-call tables, which the programs use
        }
        let id = MapData::from_pin(&path).unwrap().info().unwrap().id();
        assert!(ids.contains(&id), "pinned map {} is used by no program", path.display());
    }
    for id in ids {
        let info = MapInfo::from_id(id).unwrap();
        let name = info.name_as_str().unwrap_or("?").to_owned();
        if info.map_flags() & aya_obj::generated::BPF_F_RDONLY_PROG != 0 {
            // The object's constants (`.rodata`, `names::GLOBAL_XDP_META`): frozen at load.
            continue;
        }
        let fd = info.fd().unwrap();
        let fd = fd.as_fd();
        match info.map_type().unwrap() {
            MapType::Hash | MapType::LruHash | MapType::LpmTrie => {
                clear(fd, info.key_size() as usize, &name)
            }
            MapType::Array => zero(fd, info.value_size() as usize, info.max_entries(), &name),
            MapType::PerCpuArray => {
                let cpus = aya::util::nr_cpus().expect("possible CPUs");
                let per_cpu = (info.value_size() as usize).div_ceil(8) * 8;
                zero(fd, per_cpu * cpus, info.max_entries(), &name)
            }
            MapType::ProgramArray => refill(l, id, &name),
            t => panic!("map {name}: no reset for type {t:?}"),
        }
    }
}

/// Deletes every entry of a hash-like map.
fn clear(fd: BorrowedFd<'_>, key_size: usize, name: &str) {
    loop {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; key_size];
            let mut attr = sys::attr();
            attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
            // No key: the first one.
            attr.__bindgen_anon_2.key = keys.last().map_or(0, |k| k.as_ptr() as u64);
            attr.__bindgen_anon_2.__bindgen_anon_1.next_key = next.as_mut_ptr() as u64;
            // SAFETY: key (or none) and next_key buffers of the map's key size, alive across
            // the call.
            match unsafe { sys::bpf(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut attr) } {
                Ok(_) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => panic!("map {name}: next key: {e}"),
            }
        }
        if keys.is_empty() {
            return;
        }
        for k in &keys {
            let mut attr = sys::attr();
            attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
            attr.__bindgen_anon_2.key = k.as_ptr() as u64;
            // SAFETY: a key of the map's key size, alive across the call.
            match unsafe { sys::bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) } {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => panic!("map {name}: delete: {e}"),
            }
        }
    }
}

/// Writes zeros (`value_len` bytes, all CPUs' values for a per-CPU map) to every element of an
/// array.
fn zero(fd: BorrowedFd<'_>, value_len: usize, entries: u32, name: &str) {
    let zeros = vec![0u8; value_len];
    for i in 0..entries {
        let key = i;
        let mut attr = sys::attr();
        attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
        attr.__bindgen_anon_2.key = &key as *const u32 as u64;
        attr.__bindgen_anon_2.__bindgen_anon_1.value = zeros.as_ptr() as u64;
        // SAFETY: a 4-byte key and a value buffer of the size the kernel reads, alive across
        // the call.
        if let Err(e) = unsafe { sys::bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr) } {
            panic!("map {name}[{i}]: {e}");
        }
    }
}

/// Puts every tail-call target of table `name` back at its index.
fn refill(l: &mut Loaded, id: u32, name: &str) {
    let targets: &[(&str, u32)] = if name == names::CALLS_TC {
        &names::TC_CALLS
    } else if name == names::CALLS_XDP {
        &names::XDP_CALLS
    } else {
        panic!("program array {name}: not a tail-call table of the datapath")
    };
    let mut table = ProgramArray::try_from(Map::ProgramArray(MapData::from_id(id).unwrap()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    for (prog, index) in targets {
        let fd = l.dp.program_mut(prog).unwrap().fd().unwrap().try_clone().unwrap();
        table.set(*index, &fd, 0).unwrap_or_else(|e| panic!("{name}[{index}] = {prog}: {e}"));
    }
}

/// Loads a datapath into a new pin directory under `/sys/fs/bpf` (named after the process and
/// `n`), removing the directory if the load fails.
pub fn load(n: u32, sizes: &MapSizes) -> Loaded {
    let dir = pin_dir(n);
    let guard = RemoveDir(dir.clone());
    let dp = Datapath::load(&dir, sizes).expect("load datapath");
    std::mem::forget(guard);
    Loaded { dir, dp }
}

/// Prefix of the test processes' pin directories under `/sys/fs/bpf`.
const PIN_PREFIX: &str = "kproxy-test-";

/// A pin directory under `/sys/fs/bpf` named after the process and `n` (bpffs mounted if it
/// is not). The first call removes the directories of test processes that are gone: a process
/// killed by a signal (a timeout, an interrupted run) never reaches its exit handler.
pub fn pin_dir(n: u32) -> PathBuf {
    static STALE: Once = Once::new();
    let _ = std::process::Command::new("sh")
        .args(["-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf"])
        .status();
    STALE.call_once(remove_stale_pin_dirs);
    PathBuf::from(format!("/sys/fs/bpf/{PIN_PREFIX}{}-{n}", std::process::id()))
}

/// Removes `/sys/fs/bpf/kproxy-test-<pid>-<n>` of every `<pid>` no longer running.
fn remove_stale_pin_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove(&e.path());
        }
    }
}

/// Removes a directory tree on drop.
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

pub fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}
