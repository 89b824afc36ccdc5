//! `kproxy-verifier-stats`: what the verifier of the running kernel makes of each program of the
//! embedded eBPF object: instructions processed, states (total and peak), verification time.
//!
//! aya keeps no verifier log of a successful load, so this loads each program once more, by
//! itself: the object parsed and relocated by `aya-obj` (aya's own object code), maps created
//! with their sizes (hash maps shrunk: their capacity does not change what is verified), and
//! `BPF_PROG_LOAD` with the statistics log level only (`BPF_LOG_STATS`), which costs the
//! verifier nothing. The programs are closed again at once. The kernel matrix
//! (`cargo xtask kernels`) prints this for every kernel, so the growth of a program shows.
use std::{
    collections::{BTreeMap, HashSet},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{Context, Result, bail};
use aya_obj::{
    EbpfSectionKind, Map, ProgramSection,
    generated::{
        BPF_F_RDONLY_PROG, bpf_attach_type, bpf_attr, bpf_cmd, bpf_map_type, bpf_prog_type,
    },
};

/// `BPF_LOG_STATS`: only the closing statistics lines.
const LOG_STATS: u32 = 4;

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<RawFd> {
    // SAFETY: `attr` is a zero-initialised `union bpf_attr` filled for `cmd`; every pointer it
    // holds points to memory that outlives the call.
    unsafe { kproxy::dataplane::sys::bpf(cmd, attr) }.map(|fd| fd as RawFd)
}

/// Creates `m`; a global-data map (`.rodata`) gets its contents, and is frozen when programs
/// only read it (`BPF_F_RDONLY_PROG`, the object's `.rodata`), as aya does: the verifier then
/// takes its values as constants.
fn create_map(name: &str, m: &Map) -> Result<OwnedFd> {
    let hash = [
        bpf_map_type::BPF_MAP_TYPE_HASH as u32,
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
        bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH as u32,
        bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH as u32,
    ];
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the map-create member of the union.
    let u = unsafe { &mut attr.__bindgen_anon_1 };
    u.map_type = m.map_type();
    u.key_size = m.key_size();
    u.value_size = m.value_size();
    u.max_entries =
        if hash.contains(&m.map_type()) { m.max_entries().min(1024) } else { m.max_entries() };
    u.map_flags = m.map_flags();
    let fd = sys_bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr)
        .with_context(|| format!("creating map {name}"))?;
    // SAFETY: a fresh fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if matches!(
        m.section_kind(),
        EbpfSectionKind::Rodata | EbpfSectionKind::Data | EbpfSectionKind::Bss
    ) {
        let key = 0u32;
        let data = m.data();
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the element member of the union; key and value outlive the call.
        let u = unsafe { &mut attr.__bindgen_anon_2 };
        u.map_fd = fd.as_raw_fd() as u32;
        u.key = &key as *const u32 as u64;
        u.__bindgen_anon_1.value = data.as_ptr() as u64;
        sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)
            .with_context(|| format!("writing the data of {name}"))?;
        if m.map_flags() & BPF_F_RDONLY_PROG != 0 {
            // SAFETY: all-zero is a valid bpf_attr.
            let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
            attr.__bindgen_anon_2.map_fd = fd.as_raw_fd() as u32;
            sys_bpf(bpf_cmd::BPF_MAP_FREEZE, &mut attr)
                .with_context(|| format!("freezing {name}"))?;
        }
    }
    Ok(fd)
}

/// Program type and expected attach type of a section kproxy uses.
fn types(section: &ProgramSection) -> Result<(bpf_prog_type, u32)> {
    Ok(match section {
        ProgramSection::SchedClassifier => (bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS, 0),
        ProgramSection::Xdp { .. } => (bpf_prog_type::BPF_PROG_TYPE_XDP, 0),
        ProgramSection::CgroupSockAddr { attach_type } => (
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            bpf_attach_type::from(*attach_type) as u32,
        ),
        other => bail!("section {other:?} not handled"),
    })
}

/// The verifier's figures for one program.
struct Stats {
    processed: u64,
    total_states: u64,
    peak_states: u64,
    time_us: u64,
}

fn number_after(log: &str, key: &str) -> Option<u64> {
    let i = log.find(key)? + key.len();
    log[i..].split_whitespace().next()?.parse().ok()
}

fn load(
    name: &str,
    ty: bpf_prog_type,
    attach: u32,
    insns: &[aya_obj::generated::bpf_insn],
) -> Result<Stats> {
    let mut log = vec![0u8; 64 * 1024];
    let license = c"GPL";
    let mut prog_name = [0 as libc::c_char; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the prog-load member of the union.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = ty as u32;
    u.insn_cnt = insns.len() as u32;
    u.insns = insns.as_ptr() as u64;
    u.license = license.as_ptr() as u64;
    u.log_level = LOG_STATS;
    u.log_size = log.len() as u32;
    u.log_buf = log.as_mut_ptr() as u64;
    u.prog_name = prog_name;
    u.expected_attach_type = attach;
    let r = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr);
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).into_owned();
    match r {
        // SAFETY: a fresh fd from the kernel, closed at once.
        Ok(fd) => drop(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            bail!("{e}; verifier: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
        }
    }
    Ok(Stats {
        processed: number_after(&text, "processed ").context("no 'processed' in the log")?,
        total_states: number_after(&text, "total_states ").unwrap_or(0),
        peak_states: number_after(&text, "peak_states ").unwrap_or(0),
        time_us: number_after(&text, "verification time ").unwrap_or(0),
    })
}

fn main() -> Result<()> {
    kproxy::dataplane::loader::raise_memlock_limit();
    let mut obj = aya_obj::Object::parse(kproxy::EBPF_OBJECT).context("parsing the object")?;
    // The globals the agent's loader sets (`XDP_META`: 0 where the kernel withholds the helper).
    let globals = kproxy::dataplane::loader::object_globals();
    let values: Vec<[u8; 1]> = globals.iter().map(|(_, v)| [*v]).collect();
    obj.patch_map_data(
        globals.iter().zip(&values).map(|((n, _), v)| (*n, (&v[..], true))).collect(),
    )
    .context("setting the object's globals")?;
    let maps: Vec<(String, Map)> = obj.maps.drain().collect();
    let fds: Vec<OwnedFd> = maps.iter().map(|(n, m)| create_map(n, m)).collect::<Result<_>>()?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(
        maps.iter().zip(&fds).map(|((n, m), fd)| (n.as_str(), fd.as_raw_fd(), m)),
        &text_sections,
    )
    .context("relocating map references")?;
    obj.relocate_calls(&text_sections).context("relocating calls")?;
    let programs: BTreeMap<String, _> = obj.programs.drain().collect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "{:<16} {:>10} {:>8} {:>8} {:>10}   (linux {})",
        "program",
        "insns",
        "states",
        "peak",
        "time",
        release.trim()
    );
    let mut failed = false;
    for (name, prog) in &programs {
        let f = &obj.functions[&prog.function_key()];
        let r = types(&prog.section).and_then(|(ty, at)| load(name, ty, at, &f.instructions));
        match r {
            Ok(s) => println!(
                "{name:<16} {:>10} {:>8} {:>8} {:>8} ms",
                s.processed,
                s.total_states,
                s.peak_states,
                s.time_us / 1000
            ),
            Err(e) => {
                failed = true;
                println!("{name:<16} REFUSED: {e:#}");
            }
        }
    }
    if failed {
        bail!("the verifier refused some programs");
    }
    Ok(())
}
