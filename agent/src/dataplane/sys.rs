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
