//! Socket-level load balancing (cgroup `sock_addr` hooks), for processes that do not sit behind
//! a pod interface: the node itself and host-network pods (kube-proxy serves them in its OUTPUT
//! chain). The destination is chosen once per socket, with the same service and backend maps
//! and selection as the packet path (scope INTERNAL, so internalTrafficPolicy applies), and
//! rewritten before the kernel routes anything: no per-packet translation, no conntrack entry.
//! `kp_sock4` remembers socket + backend → frontend so that replies to unconnected UDP sockets
//! (recvmsg4) and `getpeername` show the frontend.
//!
//! Only sockets of the host's network namespace are balanced (`kp_sockcfg`: its cookie, compared
//! with `bpf_get_netns_cookie`), unless the agent extends it to every namespace: a pod's socket
//! keeps the service address, so that service meshes and VMs in pods see what they expect, and
//! the pod's packets are balanced by the TC programs on its interface.
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use kproxy_common::{
    Reason, SockRev4Key, SockRev4Value, cfg_flags, proto, scope, sock_flags, svc_flags,
};

use crate::{ct, guard, lb, maps};

/// Verdicts of `sock_addr` programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// 127.0.0.1, be. A rejected connect is sent to port 0 there, where nothing can listen: TCP gets
/// a RST and connected UDP an ICMP port unreachable, so the caller sees ECONNREFUSED as with
/// kube-proxy's REJECT rule (a cgroup hook itself can only fail a connect with EPERM before
/// Linux 5.18's `bpf_set_retval`).
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on our own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Whether the socket is one the socket LB balances: the host's network namespace (the
/// configured cookie, or the initial namespace's when it is 0), or any with
/// `sock_flags::ALL_NETNS`.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let Some(sc) = maps::kp_sockcfg.get(0) else { return false };
    if sc.flags & sock_flags::ALL_NETNS != 0 {
        return true;
    }
    let host = if sc.netns_cookie != 0 {
        sc.netns_cookie
    } else {
        // SAFETY: a null context asks for the initial network namespace's cookie.
        unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) }
    };
    // SAFETY: helper on our own context.
    let own = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    own == host
}

/// The IP protocol of the socket, if TCP or UDP.
#[inline(always)]
fn l4(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: valid context pointer; `protocol` is readable in every sock_addr hook.
    let p = unsafe { (*sa(ctx)).protocol } as u8;
    (p == proto::TCP || p == proto::UDP).then_some(p)
}

/// connect4 (`udp_only == false`) and sendmsg4 (`udp_only == true`): rewrites a frontend
/// destination to a backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, udp_only: bool) -> i32 {
    let cfg = match maps::config() {
        Some(cfg) if cfg.flags & cfg_flags::READY != 0 => cfg,
        _ => return ALLOW,
    };
    let Some(p) = l4(ctx) else { return ALLOW };
    if udp_only && p != proto::UDP {
        return ALLOW;
    }
    if !in_scope(ctx) {
        return ALLOW;
    }
    let s = sa(ctx);
    // SAFETY: valid context pointer; user_ip4/user_port are readable here (both be; the port
    // in the low 16 bits).
    let (addr, port) = unsafe { ((*s).user_ip4, (*s).user_port as u16) };
    let Some((key, svc)) = lb::service(addr, port, p, scope::INTERNAL) else { return ALLOW };
    // The node's own address is the client of source ranges (kube-proxy lets the node through
    // when a range holds one of its addresses).
    if svc.flags & svc_flags::SOURCE_RANGES != 0
        && !guard::source_allowed(svc.svc_id, cfg.snat_addr)
    {
        maps::count(Reason::DropSourceRange);
        return REJECT;
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 || udp_only {
            // sendmsg cannot be pointed at port 0 (EINVAL): it fails with EPERM.
            maps::count(if udp_only && svc.flags & svc_flags::DROP_IF_EMPTY == 0 {
                Reason::RejectNoBackend
            } else {
                Reason::DropNoLocalBackend
            });
            return REJECT;
        }
        // SAFETY: user_ip4/user_port are writable in connect4.
        unsafe {
            (*s).user_ip4 = LOOPBACK;
            (*s).user_port = 0;
        }
        maps::count(Reason::RejectNoBackend);
        return ALLOW;
    }
    let c = cookie(ctx);
    // The flow hash of a socket: its cookie stands for the source port, the node address for
    // the client (session affinity keys on it).
    let t = ct::tuple(cfg.snat_addr, addr, (c ^ (c >> 16) ^ (c >> 32)) as u16, port, p);
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let (_, be) = match lb::pick(&key, &svc, &t, now) {
        Ok(b) => b,
        Err(r) => {
            maps::count(r);
            return REJECT;
        }
    };
    let rk = SockRev4Key { cookie: c, addr: be.addr, port: be.port, proto: p, _pad: 0 };
    let rv = SockRev4Value { addr, port, _pad: 0 };
    // LRU: a full table forgets the oldest sockets (their replies then show the backend).
    let _ = maps::kp_sock4.insert(rk, rv, 0);
    // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*s).user_ip4 = be.addr;
        (*s).user_port = be.port as u32;
    }
    maps::count(Reason::SockTranslated);
    ALLOW
}

/// recvmsg4 (`count == true`) and getpeername4: shows the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, count: bool) -> i32 {
    let Some(p) = l4(ctx) else { return ALLOW };
    let s = sa(ctx);
    // SAFETY: valid context pointer; user_ip4/user_port are readable here.
    let (addr, port) = unsafe { ((*s).user_ip4, (*s).user_port as u16) };
    let rk = SockRev4Key { cookie: cookie(ctx), addr, port, proto: p, _pad: 0 };
    // SAFETY: map values are only read by copy.
    if let Some(v) = unsafe { maps::kp_sock4.get(rk) }.copied() {
        // SAFETY: user_ip4/user_port are writable in recvmsg4 and getpeername4.
        unsafe {
            (*s).user_ip4 = v.addr;
            (*s).user_port = v.port as u32;
        }
        if count {
            maps::count(Reason::SockReplyRestored);
        }
    }
    ALLOW
}
