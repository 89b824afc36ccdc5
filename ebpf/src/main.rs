//! kproxy's XDP and TC entry points. Entry points are thin: each runs the shared pipeline
//! ([`flow`]), counts the reason of its verdict and turns the verdict into a return code. The
//! entry programs run the fast path and tail-call the slow-path programs (`*_new`, `*_icmp`)
//! for the rest. The entry programs (XDP and TC) tell the families apart first, by the
//! ethertype, and run the fast path of the frame's family; IPv6 has its own slow-path programs
//! (`*6`), in each of the two tail-call tables.
//!
//! The entry programs' bodies are `#[inline(always)]`: the program macros wrap the body in an
//! inner function, and when the compiler leaves it out of line its tail calls sit in a
//! subprogram, which the verifier refuses ("tail_call is not allowed in subprogs without BTF").
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target offers no atomic read-modify-write through `core::sync`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod csum;
mod ct;
mod ct6;
mod flow;
mod flow6;
mod guard;
mod icmp;
mod icmp6;
mod lb;
mod lb6;
mod maps;
mod maps6;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod pkt;
mod pkt6;
mod sock;
mod sock6;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::{
        bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_xdp_adjust_meta,
    },
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use flow::{Hook, NO_TAIL};
use kproxy_common::Reason;
use nat::{Action, Verdict};
use pkt::Packet as _;

/// NodePort / LoadBalancer / externalIP entry on the node's external devices (fast path). As
/// in TC (`tc_fast`), an IPv6 frame runs the IPv6 fast path, inline.
#[xdp]
#[inline(always)]
pub fn kp_xdp_ext(ctx: XdpContext) -> u32 {
    let mut c = pkt::Xdp(&ctx);
    let s = if parse6::is_ipv6(&c) {
        flow6::fast(&mut c, Hook::XdpExt)
    } else {
        flow::fast(&mut c, Hook::XdpExt)
    };
    if s.tail != NO_TAIL {
        // SAFETY: tail call on our own context; returns only if it failed.
        unsafe { maps::kp_calls_xdp.tail_call(&ctx, s.tail) };
        count(Reason::DropTailCall, s.v6);
        return xdp_action::XDP_DROP;
    }
    xdp_verdict_in(&ctx, s.verdict, s.reason, s.v6)
}

/// XDP slow path: new connections and the rest the fast path leaves (see `flow`).
#[xdp]
pub fn kp_xdp_new(ctx: XdpContext) -> u32 {
    let (v, reason) = flow::slow(&mut pkt::Xdp(&ctx), Hook::XdpExt);
    xdp_verdict(&ctx, v, reason)
}

/// XDP: ICMP errors about translated connections.
#[xdp]
pub fn kp_xdp_icmp(ctx: XdpContext) -> u32 {
    let (v, reason) = flow::icmp_error(&mut pkt::Xdp(&ctx), Hook::XdpExt);
    xdp_verdict(&ctx, v, reason)
}

/// XDP slow path of IPv6 (see `flow6::slow`).
#[xdp]
#[inline(always)]
pub fn kp_xdp_new6(ctx: XdpContext) -> u32 {
    let s = flow6::slow(&mut pkt::Xdp(&ctx), Hook::XdpExt);
    if s.tail != NO_TAIL {
        // SAFETY: tail call on our own context; returns only if it failed.
        unsafe { maps::kp_calls_xdp.tail_call(&ctx, s.tail) };
        count(Reason::DropTailCall, true);
        return xdp_action::XDP_DROP;
    }
    xdp_verdict_in(&ctx, s.verdict, s.reason, true)
}

/// XDP: a new IPv6 connection (tail-called by `kp_xdp_new6`).
#[xdp]
pub fn kp_xdp_conn6(ctx: XdpContext) -> u32 {
    let (v, reason) = flow6::conn(&mut pkt::Xdp(&ctx), Hook::XdpExt);
    xdp_verdict_in(&ctx, v, reason, true)
}

/// XDP: the rejection of an IPv6 packet the slow path decided (TCP RST, ICMPv6 unreachable).
#[xdp]
pub fn kp_xdp_reject6(ctx: XdpContext) -> u32 {
    let (v, reason) = flow6::reject(&mut pkt::Xdp(&ctx));
    xdp_verdict_in(&ctx, v, reason, true)
}

/// XDP: ICMPv6 errors about translated connections.
#[xdp]
pub fn kp_xdp_icmp6(ctx: XdpContext) -> u32 {
    let (v, reason) = flow6::icmp_error(&mut pkt::Xdp(&ctx), Hook::XdpExt);
    xdp_verdict_in(&ctx, v, reason, true)
}

/// Counts one packet under `reason`, in the counters of its family.
#[inline(always)]
fn count(reason: Reason, v6: bool) {
    if v6 {
        maps6::count6(reason);
    } else {
        maps::count(reason);
    }
}

/// Counts `reason` and turns `v` into an XDP action.
#[inline(always)]
fn xdp_verdict(ctx: &XdpContext, v: Verdict, reason: Reason) -> u32 {
    xdp_verdict_in(ctx, v, reason, false)
}

/// [`xdp_verdict`], counting in the counters of the packet's family.
#[inline(always)]
fn xdp_verdict_in(ctx: &XdpContext, v: Verdict, reason: Reason, v6: bool) -> u32 {
    count(reason, v6);
    if matches!(v.action, Action::Pass | Action::RedirectNeigh | Action::RedirectPeer) {
        mark_for_tc(ctx, v.action == Action::Pass && reason != Reason::XdpPassToTc);
    }
    match v.action {
        Action::Pass | Action::RedirectNeigh | Action::RedirectPeer => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        Action::Redirect => unsafe { bpf_redirect(v.ifindex, 0) as u32 },
    }
}

/// External devices where TC runs alone, TC ingress: everything, on the complete path. It does
/// not trust the source-MAC mark ([`kproxy_common::MAC_MARK`]; without XDP in front a frame
/// could come with it from the wire) but takes it off, so that the stack never sees it while
/// this program still sits behind an XDP program that sets it (an agent restart attaches it
/// first); XDP's metadata mark, which nothing but XDP writes, it does trust.
#[classifier]
#[inline(always)]
pub fn kp_tc_ext(ctx: TcContext) -> i32 {
    tc_ext(&ctx, false)
}

/// External devices where XDP runs, TC ingress: passes what XDP marked as handled (its metadata
/// mark, or the source-MAC mark where it could not write metadata, taken off here) and what is
/// neither IPv4 nor IPv6 (XDP decides those itself) without a lookup, and runs the complete
/// path of [`kp_tc_ext`] on the rest: inline, not as a tail call, which cost what XDP leaves to
/// TC (the replies of remote backends with eBPF host routing) 50–70 ns per packet at their
/// packet rate in the lab, for one more verification of the fast path at load.
#[classifier]
#[inline(always)]
pub fn kp_tc_ext_xdp(ctx: TcContext) -> i32 {
    tc_ext(&ctx, true)
}

/// The body of both external TC programs: the source-MAC mark taken off, XDP's marks honoured
/// (the source-MAC one only `behind_xdp`), the complete path for the rest.
#[inline(always)]
fn tc_ext(ctx: &TcContext, behind_xdp: bool) -> i32 {
    let c = pkt::Tc(ctx);
    let (ip, marked) = pkt::take_mac_mark(&c);
    if (behind_xdp && (marked || !ip)) || handled_by_xdp(ctx) {
        count(Reason::PassHandledByXdp, parse6::is_ipv6(&c));
        return TC_NEXT;
    }
    tc_fast(ctx, Hook::TcExt)
}

/// XDP metadata word telling `kp_tc_ext_xdp` that XDP already decided ("KPX1").
const XDP_HANDLED: u32 = u32::from_ne_bytes(*b"KPX1");

/// Whether XDP may mark what it handled with metadata (`bpf_xdp_adjust_meta`): set to 0 by the
/// loader where the kernel does not offer the helper to XDP programs (some builds withhold it).
/// A constant of the read-only data section, frozen before the programs load: the verifier
/// then never walks the helper call, and XDP marks in the source MAC instead.
#[unsafe(no_mangle)]
static KP_XDP_META: u8 = 1;

/// Tells `kp_tc_ext_xdp` whether XDP handled a packet it passes (`handled`: TC has nothing
/// left to do) or left it to TC. A handled packet gets the 4-byte metadata mark, or where XDP
/// cannot write metadata (the helper withheld, or a driver without metadata room) the
/// source-MAC mark ([`kproxy_common::MAC_MARK`]; [`pkt::set_mac_mark`] says on which frames). A
/// packet left to TC gets no mark; a source-MAC mark a packet arrived with is taken off unless
/// XDP sets it.
#[inline(always)]
fn mark_for_tc(ctx: &XdpContext, handled: bool) {
    let meta = handled && write_meta_mark(ctx);
    pkt::set_mac_mark(&pkt::Xdp(ctx), handled && !meta);
}

/// Writes the 4-byte metadata mark where XDP may (`KP_XDP_META`) and the driver has room;
/// whether it did.
#[inline(always)]
fn write_meta_mark(ctx: &XdpContext) -> bool {
    // SAFETY: a read of a constant; helper on our own context; the bounds are checked before
    // the write.
    unsafe {
        if core::ptr::read_volatile(&raw const KP_XDP_META) == 0
            || bpf_xdp_adjust_meta(ctx.ctx, -4) != 0
        {
            return false;
        }
        let meta = ctx.metadata();
        if meta + 4 > ctx.data() {
            return false;
        }
        *(meta as *mut u32) = XDP_HANDLED;
        true
    }
}

/// Whether XDP marked this packet as handled with metadata.
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
#[inline(always)]
pub fn kp_tc_from_pod(ctx: TcContext) -> i32 {
    tc_fast(&ctx, Hook::FromPod)
}

/// Host side of pod interfaces, TC egress: replies entering a pod not translated earlier.
#[classifier]
#[inline(always)]
pub fn kp_tc_to_pod(ctx: TcContext) -> i32 {
    // The replies of pods' connections cross the node's stack untranslated
    // (`rnat_flags::TO_POD`) and are translated here, as is what the node itself sent (a
    // host-network backend's reply, an ICMP error the node raised) or what came in on a device
    // kproxy does not hook. With eBPF host routing, an IPv4 packet that arrived on a device
    // whose ingress runs kproxy's programs was translated there if it needed it and sent
    // straight here: the fast path passes it (`PassTranslatedUpstream`) where a lookup would
    // be due, so that traffic with nothing to translate does not read the configuration.
    tc_fast(&ctx, Hook::ToPod)
}

/// TC slow path of pod traffic.
#[classifier]
pub fn kp_pod_new(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow::slow(&mut c, Hook::FromPod);
    tc_verdict(&c, v, reason)
}

/// TC: ICMP errors leaving a pod.
#[classifier]
pub fn kp_pod_icmp(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow::icmp_error(&mut c, Hook::FromPod);
    tc_verdict(&c, v, reason)
}

/// TC: ICMP errors entering a pod.
#[classifier]
pub fn kp_topod_icmp(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow::icmp_error(&mut c, Hook::ToPod);
    tc_verdict(&c, v, reason)
}

/// TC slow path of external devices.
#[classifier]
pub fn kp_ext_new(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow::slow(&mut c, Hook::TcExt);
    tc_verdict(&c, v, reason)
}

/// TC: ICMP errors on external devices.
#[classifier]
pub fn kp_ext_icmp(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow::icmp_error(&mut c, Hook::TcExt);
    tc_verdict(&c, v, reason)
}

/// TC slow path of IPv6 pod traffic.
#[classifier]
pub fn kp_pod_new6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let s = flow6::slow(&mut c, Hook::FromPod);
    tc_step(&ctx, &c, s)
}

/// TC: the rejection of an IPv6 packet a slow path decided (TCP RST, ICMPv6 unreachable).
#[classifier]
pub fn kp_reject6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::reject(&mut c);
    tc_verdict_in(&c, v, reason, true)
}

/// TC: ICMPv6 errors leaving a pod.
#[classifier]
pub fn kp_pod_icmp6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::icmp_error(&mut c, Hook::FromPod);
    tc_verdict_in(&c, v, reason, true)
}

/// TC: ICMPv6 errors entering a pod.
#[classifier]
pub fn kp_topod_icmp6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::icmp_error(&mut c, Hook::ToPod);
    tc_verdict_in(&c, v, reason, true)
}

/// TC slow path of IPv6 traffic on external devices.
#[classifier]
pub fn kp_ext_new6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let s = flow6::slow(&mut c, Hook::TcExt);
    tc_step(&ctx, &c, s)
}

/// TC: a new IPv6 connection leaving a pod (tail-called by `kp_pod_new6`).
#[classifier]
pub fn kp_pod_conn6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::conn(&mut c, Hook::FromPod);
    tc_verdict_in(&c, v, reason, true)
}

/// TC: a new IPv6 connection on an external device (tail-called by `kp_ext_new6`).
#[classifier]
pub fn kp_ext_conn6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::conn(&mut c, Hook::TcExt);
    tc_verdict_in(&c, v, reason, true)
}

/// TC: ICMPv6 errors on external devices.
#[classifier]
pub fn kp_ext_icmp6(ctx: TcContext) -> i32 {
    let mut c = pkt::Tc(&ctx);
    let (v, reason) = flow6::icmp_error(&mut c, Hook::TcExt);
    tc_verdict_in(&c, v, reason, true)
}

/// Socket LB, cgroup connect6: IPv6 (and IPv4-mapped) sockets to a frontend connect to a
/// backend.
#[cgroup_sock_addr(connect6)]
pub fn kp_sock_conn6(ctx: SockAddrContext) -> i32 {
    sock6::forward(&ctx, false)
}

/// Socket LB, cgroup sendmsg6: unconnected IPv6 UDP datagrams to a frontend go to a backend.
#[cgroup_sock_addr(sendmsg6)]
pub fn kp_sock_send6(ctx: SockAddrContext) -> i32 {
    sock6::forward(&ctx, true)
}

/// Socket LB, cgroup recvmsg6: datagrams from a backend show the frontend as their source.
#[cgroup_sock_addr(recvmsg6)]
pub fn kp_sock_recv6(ctx: SockAddrContext) -> i32 {
    sock6::reverse(&ctx, true)
}

/// Socket LB, cgroup getpeername6: the peer of a balanced IPv6 socket is the frontend.
#[cgroup_sock_addr(getpeername6)]
pub fn kp_sock_peer6(ctx: SockAddrContext) -> i32 {
    sock6::reverse(&ctx, false)
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

/// The fast path of a TC entry program, with the tail call to its slow path. The family is
/// chosen first, by the ethertype: an IPv6 frame runs the IPv6 fast path here, inline, and
/// pays neither the IPv4 parse nor a tail call.
#[inline(always)]
fn tc_fast(ctx: &TcContext, hook: Hook) -> i32 {
    let mut c = pkt::Tc(ctx);
    if parse6::is_ipv6(&c) {
        let s = flow6::fast(&mut c, hook);
        return tc_step(ctx, &c, s);
    }
    let s = flow::fast(&mut c, hook);
    tc_step(ctx, &c, s)
}

/// Carries out a step: its tail call (a failed one dropped, counted in the step's family), or
/// its verdict.
#[inline(always)]
fn tc_step(ctx: &TcContext, c: &pkt::Tc, s: flow::Step) -> i32 {
    if s.tail != NO_TAIL {
        // SAFETY: tail call on our own context; returns only if it failed.
        unsafe { maps::kp_calls_tc.tail_call(ctx, s.tail) };
        count(Reason::DropTailCall, s.v6);
        return TC_ACT_SHOT;
    }
    tc_verdict_in(c, s.verdict, s.reason, s.v6)
}

/// The TC verdict of every packet kproxy passes, translated or as it came: the next program on
/// the hook decides (`TCX_NEXT` of a tcx link; for a clsact filter in direct-action mode, the
/// next filter), and where none is left the packet goes on as with `TC_ACT_OK`. Other owners'
/// programs behind kproxy's (a CNI's policy, a flow monitor, a VLAN tagger) thus see every packet
/// kproxy does not redirect or drop, a service's after its translation, as netfilter's filter
/// table sees kube-proxy's DNATed packets. kproxy never returns `TC_ACT_OK`, which would end the
/// hook.
const TC_NEXT: i32 = TC_ACT_UNSPEC;

/// Counts `reason` and turns `v` into a TC action.
#[inline(always)]
fn tc_verdict(c: &pkt::Tc, v: Verdict, reason: Reason) -> i32 {
    tc_verdict_in(c, v, reason, false)
}

/// [`tc_verdict`], counting in the counters of the packet's family.
#[inline(always)]
fn tc_verdict_in(c: &pkt::Tc, v: Verdict, reason: Reason, v6: bool) -> i32 {
    count(reason, v6);
    match v.action {
        Action::Pass => TC_NEXT,
        Action::Drop => TC_ACT_SHOT,
        // SAFETY: plain helper calls; they return TC_ACT_REDIRECT or TC_ACT_SHOT.
        Action::Tx => unsafe { bpf_redirect(c.ifindex(), 0) as i32 },
        Action::Redirect => unsafe { bpf_redirect(v.ifindex, 0) as i32 },
        Action::RedirectNeigh => unsafe {
            bpf_redirect_neigh(v.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Action::RedirectPeer => unsafe { bpf_redirect_peer(v.ifindex, 0) as i32 },
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
