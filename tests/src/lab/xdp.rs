//! Tiny XDP programs loaded with raw `bpf(2)` calls (no object file, no compiler), attached with
//! BPF links.
//!
//! The lab needs one: a veth only processes frames that its peer sends with XDP_TX /
//! XDP_REDIRECT when NAPI runs on it *and* the sender kicks that NAPI, which the kernel's veth
//! driver does only if the receiving veth has an XDP program (`veth_xdp_flush` checks the
//! peer's `xdp_prog`; GRO alone enables NAPI but the frames then wait in the ring until other
//! traffic arrives). So the lab attaches an `XDP_PASS` program to the veth ends facing the
//! nodes' external devices and the pods' `eth0`, as Cilium does with its dummy XDP program on
//! veth peers. Tests can also load their own small programs with [`load_xdp`].

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

/// One eBPF instruction (`struct bpf_insn`).
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

/// `r0 = XDP_PASS; exit`.
pub const XDP_PASS_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, 2), Insn::new(0x95, 0, 0, 0, 0)];

/// `r0 = XDP_TX; exit`: sends every frame back out of the device it arrived on, unchanged.
pub const XDP_TX_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, 3), Insn::new(0x95, 0, 0, 0, 0)];

const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_PIN: i64 = 6;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_XDP: u64 = 6;
const BPF_XDP: u64 = 37;

fn bpf(cmd: i64, attr: &mut [u64; 16]) -> io::Result<RawFd> {
    // SAFETY: `attr` is a zero-padded 128-byte `union bpf_attr` filled for `cmd`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr))
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as RawFd) }
}

/// Name of the lab's `XDP_PASS` program as `bpftool prog` shows it.
pub const XDP_PASS_NAME: &str = "kpl_xdp_pass";

/// Loads `insns` as an XDP program named `name` (at most 15 characters: letters, digits, `_`,
/// `.`; license GPL, expected attach type BPF_XDP). A verifier rejection is an error carrying
/// the verifier log.
pub fn load_xdp(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    if name.len() > 15 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad BPF program name {name:?}"),
        ));
    }
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_XDP | ((insns.len() as u64) << 32); // prog_type, insn_cnt
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32); // log_level, log_size
    attr[4] = log.as_mut_ptr() as u64;
    // prog_name at byte offset 48, expected_attach_type at 68.
    attr[6] = u64::from_ne_bytes(prog_name[..8].try_into().expect("8 bytes"));
    attr[7] = u64::from_ne_bytes(prog_name[8..].try_into().expect("8 bytes"));
    attr[8] = BPF_XDP << 32;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a fresh fd returned by the kernel.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(e.kind(), format!("loading XDP program: {e}; verifier: {text}")))
        }
    }
}

/// Attaches `prog` to device `dev` of the calling thread's network namespace with a BPF link;
/// the program stays attached while the returned link fd (or a pin of it) exists.
pub fn attach_xdp(prog: &OwnedFd, dev: &str) -> io::Result<OwnedFd> {
    let name = CString::new(dev).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no device {dev}")));
    }
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32); // prog_fd, target_ifindex
    attr[1] = BPF_XDP; // attach_type, flags 0
    match bpf(BPF_LINK_CREATE, &mut attr) {
        // SAFETY: a fresh fd returned by the kernel.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => Err(io::Error::new(e.kind(), format!("attaching XDP to {dev}: {e}"))),
    }
}

/// Pins a BPF object (program, map, link) at `path` on a bpffs.
pub fn pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname
    attr[1] = fd.as_raw_fd() as u64; // bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("pinning at {}: {e}", path.display())))
}

const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_LINK_UPDATE: i64 = 29;

/// Id of the loaded program `prog` (`bpf_prog_info.id`, as `bpftool prog` lists it).
pub fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
    // The first fields of `struct bpf_prog_info`: type (u32), id (u32); the kernel fills at
    // most `info_len` bytes.
    let mut info = [0u32; 2];
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[1])
}

/// Puts program `prog` into the XDP link `link` in place of the one it runs (`BPF_LINK_UPDATE`:
/// the device is never without a program).
pub fn update_link(link: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((prog.as_raw_fd() as u64) << 32); // link_fd, new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("updating an XDP link: {e}")))
}
