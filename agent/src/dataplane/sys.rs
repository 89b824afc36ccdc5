//! The raw `bpf(2)` system call, for the few commands aya 0.14 does not offer (batched map
//! operations, `BPF_LINK_DETACH`/`BPF_LINK_UPDATE` on a pinned link, `BPF_ENABLE_STATS`), with
//! the command numbers and the attribute layout of aya's generated kernel bindings.
use std::io;

pub use aya_obj::generated::{bpf_attr, bpf_cmd};

/// A zeroed attribute block (the kernel requires every field a command does not use to be 0).
pub fn attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a union of plain integer structs, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Runs `bpf(cmd, attr, sizeof(attr))` and returns its non-negative result (an fd for the
/// commands that open something, else 0).
///
/// # Safety
/// `attr` must be a valid attribute block for `cmd`: every pointer it holds must point to memory
/// of the size the kernel reads or writes through it, alive for the duration of the call.
pub unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the caller vouches for the attribute block; its size is the union's.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as u32,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// One eBPF instruction (`struct bpf_insn`), for the few programs built without a compiler
/// (the kernel-feature probes, the lab's and the bench's tiny programs).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low nibble) and source register (high nibble).
    pub regs: u8,
    /// Signed offset.
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

impl Insn {
    /// Builds an instruction.
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn { code, regs: dst | (src << 4), off, imm }
    }
}

/// Loads `insns` as a program of type `prog_type` named `name` (at most 15 characters:
/// letters, digits, `_`, `.`; license GPL; `attach` is the expected attach type, 0 where the
/// type has none). A verifier rejection is an error carrying the verifier log.
pub fn load_program(
    prog_type: aya_obj::generated::bpf_prog_type,
    attach: u32,
    name: &str,
    insns: &[Insn],
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    if name.len() > 15 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad BPF program name {name:?}"),
        ));
    }
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = attr();
    // SAFETY: union access; the prog-load member is the one BPF_PROG_LOAD reads.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = prog_type as u32;
    u.insn_cnt = insns.len() as u32;
    u.insns = insns.as_ptr() as u64;
    u.license = license.as_ptr() as u64;
    u.log_level = 1;
    u.log_size = log.len() as u32;
    u.log_buf = log.as_mut_ptr() as u64;
    for (d, s) in u.prog_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    u.expected_attach_type = attach;
    // SAFETY: the instructions, license and log outlive the call.
    match unsafe { bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) } {
        // SAFETY: a fresh fd returned by the kernel.
        Ok(fd) => Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(e.kind(), format!("loading {name}: {e}; verifier: {text}")))
        }
    }
}

/// The result of one [`test_run`].
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The program's return value (its verdict).
    pub retval: u32,
    /// The kernel's duration of the run, ns.
    pub duration_ns: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
}

/// Runs `prog` once on `data` with `BPF_PROG_TEST_RUN` (not live; the frame is not sent).
pub fn test_run(prog: &std::os::fd::OwnedFd, data: &[u8]) -> io::Result<TestRun> {
    use std::os::fd::AsRawFd as _;
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = attr();
    // SAFETY: union access; the test-run member is the one BPF_PROG_TEST_RUN reads.
    let t = unsafe { &mut attr.test };
    t.prog_fd = prog.as_raw_fd() as u32;
    t.data_size_in = data.len() as u32;
    t.data_size_out = out.len() as u32;
    t.data_in = data.as_ptr() as u64;
    t.data_out = out.as_mut_ptr() as u64;
    t.repeat = 1;
    // SAFETY: both buffers outlive the call and have the sizes given.
    unsafe { bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr) }?;
    // SAFETY: union access, written by the kernel.
    let t = unsafe { attr.test };
    out.truncate(t.data_size_out as usize);
    Ok(TestRun { retval: t.retval, duration_ns: t.duration, data: out })
}
