//! The raw `bpf(2)` system call, for the few commands aya 0.14 does not offer (batched lookups,
//! `BPF_LINK_DETACH`/`BPF_LINK_UPDATE` on a pinned link).
use std::io;

/// Runs `bpf(cmd, attr, size_of_val(attr))` and returns its non-negative result (an fd for the
/// commands that open something, else 0).
///
/// # Safety
/// `attr` must be a valid attribute block for `cmd`: every pointer it holds must point to memory
/// of the size the kernel reads or writes through it, alive for the duration of the call.
pub(crate) unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut [T]) -> io::Result<i64> {
    // SAFETY: the caller vouches for the attribute block; its size is the slice's.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32)
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}
