//! kproxy's XDP and TC entry points. Entry points are thin: each runs the shared pipeline
//! ([`flow`]), counts the reason of its verdict and turns the verdict into a return code.
#![no_std]
#![no_main]

mod csum;
mod ct;
mod flow;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod pkt;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_meta},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use flow::Hook;
use kproxy_common::Reason;
use nat::Action;
use pkt::Packet as _;

/// NodePort / LoadBalancer / externalIP entry on the node's external devices.
#[xdp]
pub fn kp_xdp_ext(ctx: XdpContext) -> u32 {
    let mut c = pkt::Xdp(&ctx);
    let (v, reason) = flow::handle(&mut c, Hook::XdpExt);
    maps::count(reason);
    if v.action == Action::Pass && reason != Reason::XdpPassToTc {
        mark_handled(&ctx);
    }
    match v.action {
        Action::Pass | Action::RedirectNeigh => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        Action::Redirect => unsafe { bpf_redirect(v.ifindex, 0) as u32 },
    }
}

/// External devices, TC ingress: everything XDP passed on, or everything in TC-only mode.
#[classifier]
pub fn kp_tc_ext(ctx: TcContext) -> i32 {
    if handled_by_xdp(&ctx) {
        maps::count(Reason::PassHandledByXdp);
        return TC_ACT_OK;
    }
    tc(&ctx, Hook::TcExt)
}

/// XDP metadata word telling `kp_tc_ext` that XDP already decided ("KPX1").
const XDP_HANDLED: u32 = u32::from_ne_bytes(*b"KPX1");

/// Marks a packet XDP passed after handling it completely, so that TC does not repeat the
/// lookups. Devices whose driver has no metadata support simply get no mark (TC then
/// processes the packet again, which finds nothing to do).
#[inline(always)]
fn mark_handled(ctx: &XdpContext) {
    // SAFETY: helper on our own context; the bounds are checked before the write.
    unsafe {
        if bpf_xdp_adjust_meta(ctx.ctx, -4) != 0 {
            return;
        }
        let meta = ctx.metadata();
        if meta + 4 > ctx.data() {
            return;
        }
        *(meta as *mut u32) = XDP_HANDLED;
    }
}

/// Whether XDP marked this packet as handled.
#[inline(always)]
fn handled_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid; the metadata read is bounds-checked.
    unsafe {
        let skb = ctx.skb.skb;
        let meta = (*skb).data_meta as usize;
        let data = (*skb).data as usize;
        if meta + 4 > data {
            return false;
        }
        *(meta as *const u32) == XDP_HANDLED
    }
}

/// Host side of pod interfaces, TC ingress: traffic leaving a pod.
#[classifier]
pub fn kp_tc_from_pod(ctx: TcContext) -> i32 {
    tc(&ctx, Hook::FromPod)
}

/// Host side of pod interfaces, TC egress: replies entering a pod not translated earlier.
#[classifier]
pub fn kp_tc_to_pod(ctx: TcContext) -> i32 {
    tc(&ctx, Hook::ToPod)
}

/// Socket LB, cgroup connect4: TCP and connected UDP sockets to a frontend connect to a backend.
#[cgroup_sock_addr(connect4)]
pub fn kp_sock_conn4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, false)
}

/// Socket LB, cgroup sendmsg4: unconnected UDP datagrams to a frontend go to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn kp_sock_send4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, true)
}

/// Socket LB, cgroup recvmsg4: datagrams from a backend show the frontend as their source.
#[cgroup_sock_addr(recvmsg4)]
pub fn kp_sock_recv4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

/// Socket LB, cgroup getpeername4: the peer of a balanced socket is the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn kp_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

/// Headers the pipeline reads: Ethernet, IPv4 with options, the fixed TCP header.
const HEADERS: u32 = 14 + 60 + 20;

#[inline(always)]
fn tc(ctx: &TcContext, hook: Hook) -> i32 {
    let need = if ctx.len() < HEADERS { ctx.len() } else { HEADERS };
    if ((ctx.data_end() - ctx.data()) as u32) < need {
        // Non-linear skb: make the headers directly readable (failure shows as truncation).
        let _ = ctx.pull_data(need);
    }
    let mut c = pkt::Tc(ctx);
    let (v, reason) = flow::handle(&mut c, hook);
    maps::count(reason);
    match v.action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // SAFETY: plain helper calls; they return TC_ACT_REDIRECT or TC_ACT_SHOT.
        Action::Tx => unsafe { bpf_redirect(c.ifindex(), 0) as i32 },
        Action::Redirect => unsafe { bpf_redirect(v.ifindex, 0) as i32 },
        Action::RedirectNeigh => unsafe {
            bpf_redirect_neigh(v.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
