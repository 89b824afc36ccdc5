//! Tiny XDP programs loaded with `bpf(2)` (no object file, no compiler), attached with
//! BPF links.
//!
//! The lab needs one: a veth only processes frames that its peer sends with XDP_TX /
//! XDP_REDIRECT when NAPI runs on it *and* the sender kicks that NAPI, which the kernel's veth
//! driver does only if the receiving veth has an XDP program (`veth_xdp_flush` checks the
//! peer's `xdp_prog`; GRO alone enables NAPI but the frames then wait in the ring until other
//! traffic arrives). So the lab attaches an `XDP_PASS` program to the veth ends facing the
//! nodes' external devices and the pods' `eth0`, as Cilium does with its dummy XDP program on
//! veth peers. Tests can also load their own small programs with [`load_xdp`].
//!
//! The bench also chains empty TC programs in front of kproxy's ([`attach_tcx_front`]): the
//! floor of a bpf_stats figure measured at the same hook, on the same packets.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_prog_type};
use kproxy::dataplane::sys::{self, bpf_attr, bpf_cmd};

/// Loads `insns` as a program of a given type (same rules as [`load_xdp`]).
pub use kproxy::dataplane::sys::load_program as load;
pub use kproxy::dataplane::sys::{Insn, TestRun, test_run};

/// `r0 = XDP_PASS; exit`.
pub const XDP_PASS_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, 2), Insn::new(0x95, 0, 0, 0, 0)];

/// `r0 = XDP_TX; exit`: sends every frame back out of the device it arrived on, unchanged.
pub const XDP_TX_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, 3), Insn::new(0x95, 0, 0, 0, 0)];

/// `r0 = TCX_NEXT (-1); exit`: a TC program that does nothing and lets the next program of the
/// hook (tcx, then the clsact filters) decide.
pub const TC_NEXT_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, -1), Insn::new(0x95, 0, 0, 0, 0)];

/// `r0 = TCX_PASS (0); exit`: a TC program that ends the hook with every packet, passed on to
/// the stack (what Cilium's programs return): the programs behind it on the hook do not run.
pub const TC_PASS_PROGRAM: [Insn; 2] = [Insn::new(0xb7, 0, 0, 0, 0), Insn::new(0x95, 0, 0, 0, 0)];

/// A policy-like TC program: drops (`TC_ACT_SHOT`) every IPv4 packet to `dst` as the packet
/// reads when the program runs, and lets the next program of the hook decide on anything else
/// (`TCX_NEXT`). Behind a translating program it shows which address that program left.
pub fn tc_deny_ipv4_dst(dst: std::net::Ipv4Addr) -> [Insn; 12] {
    // `__sk_buff.data` and `data_end`; the IPv4 destination in an Ethernet frame.
    const DATA: i16 = 76;
    const DATA_END: i16 = 80;
    const IP_DST: i16 = 14 + 16;
    [
        Insn::new(0x61, 2, 1, DATA, 0),     // r2 = skb->data
        Insn::new(0x61, 3, 1, DATA_END, 0), // r3 = skb->data_end
        Insn::new(0xb7, 0, 0, 0, -1),       // r0 = TCX_NEXT
        Insn::new(0xbf, 4, 2, 0, 0),        // r4 = r2
        Insn::new(0x07, 4, 0, 0, 34),       // r4 += Ethernet + IPv4 header
        Insn::new(0x2d, 4, 3, 5, 0),        // if r4 > r3 goto exit
        Insn::new(0x69, 4, 2, 12, 0),       // r4 = ethertype (as loaded: 0x0008 is IPv4)
        Insn::new(0x55, 4, 0, 3, 0x0008),   // if r4 != IPv4 goto exit
        Insn::new(0x61, 4, 2, IP_DST, 0),   // r4 = destination address
        // if (u32)r4 != dst goto exit
        Insn::new(0x56, 4, 0, 1, u32::from_ne_bytes(dst.octets()) as i32),
        Insn::new(0xb7, 0, 0, 0, 2), // r0 = TC_ACT_SHOT
        Insn::new(0x95, 0, 0, 0, 0), // exit
    ]
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<RawFd> {
    // SAFETY: every caller fills `attr` (zeroed by `sys::attr`) for `cmd`, with pointers to
    // memory that outlives the call.
    unsafe { sys::bpf(cmd, attr) }.map(|fd| fd as RawFd)
}

/// Name of the lab's `XDP_PASS` program as `bpftool prog` shows it.
pub const XDP_PASS_NAME: &str = "kpl_xdp_pass";

/// Loads `insns` as an XDP program named `name` (at most 15 characters: letters, digits, `_`,
/// `.`; license GPL, expected attach type BPF_XDP). A verifier rejection is an error carrying
/// the verifier log.
pub fn load_xdp(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    load(bpf_prog_type::BPF_PROG_TYPE_XDP, bpf_attach_type::BPF_XDP as u32, name, insns)
}

/// Attaches `prog` to device `dev` of the calling thread's network namespace with a BPF link;
/// the program stays attached while the returned link fd (or a pin of it) exists.
pub fn attach_xdp(prog: &OwnedFd, dev: &str) -> io::Result<OwnedFd> {
    link_create(prog, dev, bpf_attach_type::BPF_XDP, 0, "XDP")
}

/// A BPF link of `prog` to device `dev` of the calling thread's network namespace, for hook
/// `attach` with link flags `flags` and no relative program (multi-program hooks: 0 appends it
/// after the others, `BPF_F_BEFORE` puts it in front of them).
fn link_create(
    prog: &OwnedFd,
    dev: &str,
    attach: bpf_attach_type,
    flags: u32,
    what: &str,
) -> io::Result<OwnedFd> {
    let name = CString::new(dev).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no device {dev}")));
    }
    let mut attr = sys::attr();
    // SAFETY: union access; the link-create member is the one BPF_LINK_CREATE reads.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.__bindgen_anon_2.target_ifindex = ifindex;
    l.attach_type = attach as u32;
    l.flags = flags;
    match bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr) {
        // SAFETY: a fresh fd returned by the kernel.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => Err(io::Error::new(e.kind(), format!("attaching {what} to {dev}: {e}"))),
    }
}

/// Loads `insns` as a TC program named `name` (rules of [`load_xdp`]).
pub fn load_tc(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    load(bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS, 0, name, insns)
}

/// Attaches TC program `prog` to the ingress (`egress` false) or egress of device `dev` of the
/// calling thread's network namespace with a tcx link (Linux 6.6+), in front of the tcx programs
/// already there (kproxy's come last on a hook, its clsact filters after every tcx program), so
/// that a program returning `TCX_NEXT` ([`TC_NEXT_PROGRAM`]) runs before kproxy's on every
/// packet. The program stays attached while the returned link fd exists.
pub fn attach_tcx_front(prog: &OwnedFd, dev: &str, egress: bool) -> io::Result<OwnedFd> {
    /// `BPF_F_BEFORE` of the multi-program attach API: with no relative program, at the front.
    const BPF_F_BEFORE: u32 = 1 << 3;
    let (attach, what) = tcx_hook(egress);
    link_create(prog, dev, attach, BPF_F_BEFORE, what)
}

/// The tcx attach type of a device's ingress (`egress` false) or egress, and its name.
fn tcx_hook(egress: bool) -> (bpf_attach_type, &'static str) {
    if egress {
        (bpf_attach_type::BPF_TCX_EGRESS, "tcx egress")
    } else {
        (bpf_attach_type::BPF_TCX_INGRESS, "tcx ingress")
    }
}

/// Attaches TC program `prog` to the ingress (`egress` false) or egress of device `dev` of the
/// calling thread's network namespace with a tcx link (Linux 6.6+) behind the tcx programs
/// already there, as another owner attaching after kproxy would (kproxy's own tcx links go
/// last too). The program stays attached while the returned link fd exists.
pub fn attach_tcx_last(prog: &OwnedFd, dev: &str, egress: bool) -> io::Result<OwnedFd> {
    let (attach, what) = tcx_hook(egress);
    link_create(prog, dev, attach, 0, what)
}

/// How often the kernel ran `prog` (`bpf_prog_info.run_cnt`): counted only while run-time
/// statistics are on (`BPF_ENABLE_STATS` or `kernel.bpf_stats_enabled`).
pub fn prog_runs(prog: &OwnedFd) -> io::Result<u64> {
    // SAFETY: a plain C struct of integers; all-zero is valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = sys::attr();
    // SAFETY: union access; the info member is the one BPF_OBJ_GET_INFO_BY_FD reads.
    let i = unsafe { &mut attr.info };
    i.bpf_fd = prog.as_raw_fd() as u32;
    i.info_len = std::mem::size_of_val(&info) as u32;
    i.info = (&raw mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.run_cnt)
}

/// Pins a BPF object (program, map, link) at `path` on a bpffs.
pub fn pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = sys::attr();
    // SAFETY: union access; the object member is the one BPF_OBJ_PIN reads.
    let o = unsafe { &mut attr.__bindgen_anon_4 };
    o.pathname = c.as_ptr() as u64;
    o.bpf_fd = fd.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("pinning at {}: {e}", path.display())))
}

/// Id of the loaded program `prog` (`bpf_prog_info.id`, as `bpftool prog` lists it).
pub fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
    // The first fields of `struct bpf_prog_info`: type (u32), id (u32); the kernel fills at
    // most `info_len` bytes.
    let mut info = [0u32; 2];
    let mut attr = sys::attr();
    // SAFETY: union access; the info member is the one BPF_OBJ_GET_INFO_BY_FD reads.
    let i = unsafe { &mut attr.info };
    i.bpf_fd = prog.as_raw_fd() as u32;
    i.info_len = std::mem::size_of_val(&info) as u32;
    i.info = info.as_mut_ptr() as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[1])
}

/// Puts program `prog` into the XDP link `link` in place of the one it runs (`BPF_LINK_UPDATE`:
/// the device is never without a program).
pub fn update_link(link: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    let mut attr = sys::attr();
    // SAFETY: union access; the link-update member is the one BPF_LINK_UPDATE reads.
    let l = unsafe { &mut attr.link_update };
    l.link_fd = link.as_raw_fd() as u32;
    l.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("updating an XDP link: {e}")))
}
