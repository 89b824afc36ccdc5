//! Socket-level load balancing for IPv6 sockets (cgroup `connect6`, `sendmsg6`, `recvmsg6`,
//! `getpeername6`), as [`crate::sock`] does for IPv4: the destination is chosen once per socket
//! from the IPv6 service maps (scope INTERNAL), and `kp_sock6` remembers socket + backend →
//! frontend for replies and `getpeername`. An IPv4-mapped destination (`::ffff:a.b.c.d`, an
//! IPv6 socket talking IPv4) is served from the IPv4 maps and remembered in `kp_sock4`, its
//! packets counted with IPv4's.
use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_addr, helpers::generated::bpf_get_socket_cookie,
    programs::SockAddrContext,
};
use kproxy_common::{
    Addr6, Reason, SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value, cfg_flags, proto, scope,
    svc_flags,
};

use crate::{ct, ct6, guard, lb, lb6, maps, maps6};

/// Verdicts of `sock_addr` programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// `::1`, be words: a rejected connect goes to port 0 there (see [`crate::sock`]).
const LOOPBACK6: Addr6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The third word of an IPv4-mapped address (`::ffff:0:0/96`), be.
const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// 127.0.0.1, be.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on our own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The IP protocol of the socket, if TCP or UDP.
#[inline(always)]
fn l4(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: valid context pointer; `protocol` is readable in every sock_addr hook.
    let p = unsafe { (*sa(ctx)).protocol } as u8;
    (p == proto::TCP || p == proto::UDP).then_some(p)
}

#[inline(always)]
fn count(reason: Reason, v6: bool) {
    if v6 {
        maps6::count6(reason);
    } else {
        maps::count(reason);
    }
}

/// The destination of the socket address: address (be words) and port (be).
#[inline(always)]
fn user(s: *mut bpf_sock_addr) -> (Addr6, u16) {
    // SAFETY: valid context pointer; user_ip6/user_port are readable in the IPv6 hooks. One
    // volatile load per word: the verifier only accepts context accesses at a constant offset
    // from the context pointer itself, which an array copy does not keep.
    unsafe {
        let a = [
            core::ptr::read_volatile(&raw const (*s).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*s).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*s).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*s).user_ip6[3]),
        ];
        (a, (*s).user_port as u16)
    }
}

#[inline(always)]
fn set_user(s: *mut bpf_sock_addr, addr: &Addr6, port: u16) {
    // SAFETY: user_ip6/user_port are writable in connect6, sendmsg6, recvmsg6, getpeername6.
    // One volatile store per word (see `user`).
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&raw mut (*s).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&raw mut (*s).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&raw mut (*s).user_ip6[3], addr[3]);
        (*s).user_port = port as u32;
    }
}

/// The flow hash source port of a socket: its cookie folded.
#[inline(always)]
fn cookie_port(c: u64) -> u16 {
    (c ^ (c >> 16) ^ (c >> 32)) as u16
}

/// connect6 (`udp_only == false`) and sendmsg6 (`udp_only == true`): rewrites a frontend
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
    let s = sa(ctx);
    let (addr, port) = user(s);
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED {
        let Some((key, svc)) = lb::service(addr[3], port, p, scope::INTERNAL) else {
            return ALLOW;
        };
        // The node is the client of source ranges (see `crate::sock::forward`).
        if svc.flags & svc_flags::SOURCE_RANGES != 0
            && !guard::source_allowed(svc.svc_id, cfg.snat_addr)
        {
            maps::count(Reason::DropSourceRange);
            return REJECT;
        }
        if svc.count == 0 {
            return reject(s, svc.flags, udp_only, false);
        }
        let c = cookie(ctx);
        let t = ct::tuple(cfg.snat_addr, addr[3], cookie_port(c), port, p);
        let (_, be) = match lb::pick(&key, &svc, &t, now) {
            Ok(b) => b,
            Err(r) => {
                maps::count(r);
                return REJECT;
            }
        };
        let rk = SockRev4Key { cookie: c, addr: be.addr, port: be.port, proto: p, _pad: 0 };
        let rv = SockRev4Value { addr: addr[3], port, _pad: 0 };
        // LRU: a full table forgets the oldest sockets (their replies then show the backend).
        let _ = maps::kp_sock4.insert(rk, rv, 0);
        set_user(s, &[0, 0, MAPPED, be.addr], be.port);
        maps::count(Reason::SockTranslated);
        return ALLOW;
    }
    let Some((key, svc)) = lb6::service(&addr, port, p, scope::INTERNAL) else { return ALLOW };
    let node = maps6::config6().snat_addr;
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !guard::source_allowed6(svc.svc_id, &node) {
        maps6::count6(Reason::DropSourceRange);
        return REJECT;
    }
    if svc.count == 0 {
        return reject(s, svc.flags, udp_only, true);
    }
    let c = cookie(ctx);
    let t = ct6::tuple(&node, &addr, cookie_port(c), port, p);
    let (_, be) = match lb6::pick(&key, &svc, &t, now) {
        Ok(b) => b,
        Err(r) => {
            maps6::count6(r);
            return REJECT;
        }
    };
    let rk = SockRev6Key { cookie: c, addr: be.addr, port: be.port, proto: p, _pad: [0; 5] };
    let rv = SockRev6Value { addr, port, _pad: 0 };
    // LRU: a full table forgets the oldest sockets (their replies then show the backend).
    let _ = maps6::kp_sock6.insert(rk, rv, 0);
    set_user(s, &be.addr, be.port);
    maps6::count6(Reason::SockTranslated);
    ALLOW
}

/// A frontend without backends (see [`crate::sock::forward`]): connect goes to port 0 of the
/// loopback address; sendmsg and `DROP_IF_EMPTY` fail with EPERM.
#[inline(always)]
fn reject(s: *mut bpf_sock_addr, flags: u16, udp_only: bool, v6: bool) -> i32 {
    if flags & svc_flags::DROP_IF_EMPTY != 0 || udp_only {
        let r = if udp_only && flags & svc_flags::DROP_IF_EMPTY == 0 {
            Reason::RejectNoBackend
        } else {
            Reason::DropNoLocalBackend
        };
        count(r, v6);
        return REJECT;
    }
    let lo = if v6 { LOOPBACK6 } else { [0, 0, MAPPED, LOOPBACK4] };
    set_user(s, &lo, 0);
    count(Reason::RejectNoBackend, v6);
    ALLOW
}

/// recvmsg6 (`count_it == true`) and getpeername6: shows the frontend instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, count_it: bool) -> i32 {
    let Some(p) = l4(ctx) else { return ALLOW };
    let s = sa(ctx);
    let (addr, port) = user(s);
    let c = cookie(ctx);
    if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED {
        let rk = SockRev4Key { cookie: c, addr: addr[3], port, proto: p, _pad: 0 };
        // SAFETY: map values are only read by copy.
        if let Some(v) = unsafe { maps::kp_sock4.get(rk) }.copied() {
            set_user(s, &[0, 0, MAPPED, v.addr], v.port);
            if count_it {
                maps::count(Reason::SockReplyRestored);
            }
        }
        return ALLOW;
    }
    let rk = SockRev6Key { cookie: c, addr, port, proto: p, _pad: [0; 5] };
    // SAFETY: map values are only read by copy.
    if let Some(v) = unsafe { maps6::kp_sock6.get(rk) }.copied() {
        set_user(s, &v.addr, v.port);
        if count_it {
            maps6::count6(Reason::SockReplyRestored);
        }
    }
    ALLOW
}
