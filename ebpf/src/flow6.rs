//! The IPv6 pipeline. The entry programs (XDP and TC) check the ethertype first and run this
//! family's fast path for an IPv6 frame inline (no tail call, no IPv4 parse before it). It has
//! the same two stages as [`crate::flow`]: the fast path ([`fast`])
//! passes what the hint bitmaps rule out after the parse and two array lookups, translates
//! packets of tracked connections and their replies, and tail-calls the IPv6 slow-path programs
//! ([`slow`], [`icmp_error`]) for new connections, connections whose backend went away, stale
//! reverse-NAT entries and ICMPv6 errors. Neighbour discovery and the other ICMPv6 messages are
//! passed untouched. IPv6 packets are counted in `kp_stats6` ([`Step::v6`]).
use kproxy_common::{
    Ct6Value, NodeConfig, Reason, RevNat6Value, Service6Key, Service6Value, Tuple6, backend_flags,
    calls, ct_flags, ct_state, hints, proto, rnat_flags, scope, svc_flags,
};

use crate::{
    ct6,
    flow::{self, Hook, NO_TAIL, Step},
    guard, icmp6, lb6, maps, maps6,
    nat::{self, Fib, To, Verdict},
    nat6::{self, Nat6},
    parse::{Frag, tcp_flags},
    parse6::{self, HDR, Ip6},
    pkt::{L3, Packet},
    pkt6::Packet6,
};

type Out = Result<(Verdict, Reason), Reason>;

/// What to do with a packet: translate it to `n` and deliver it `to` (`translate`), or give it
/// `verdict` as it is (a rejection frame already built in its place, a pass). Each program
/// decides first and translates in one place, so the translation and route state is on the
/// stack once (a plain struct, as [`Verdict`], keeps every byte initialised).
#[derive(Clone, Copy)]
struct Next {
    translate: bool,
    /// Rejected: the frame is built by the rejection program (see [`reject`]).
    reject: bool,
    /// A new connection: the connection program ([`conn`]) picks the backend and translates.
    conn: bool,
    n: Nat6,
    to: To,
    verdict: Verdict,
    reason: Reason,
}

impl Next {
    #[inline(always)]
    fn tx(n: Nat6, to: To, reason: Reason) -> Next {
        Next { translate: true, reject: false, conn: false, n, to, verdict: Verdict::PASS, reason }
    }
    /// Passed as it is, `n` carried along untranslated: where the paths of one function end
    /// in both [`Next::tx`] and a pass, this keeps the compiler from zeroing the translation of
    /// the pass ([`Next::done`]) in the shared value, which it does with a byte-wise `memset`
    /// call once TC's packet writes are direct (see
    /// `per_packet_programs_call_no_bytewise_memory_subprogram`).
    #[inline(always)]
    fn pass_with(n: Nat6, reason: Reason) -> Next {
        Next { translate: false, ..Next::tx(n, To::Stack, reason) }
    }
    #[inline(always)]
    fn done(verdict: Verdict, reason: Reason) -> Next {
        let n = Nat6 { saddr: [0; 4], sport: 0, daddr: [0; 4], dport: 0 };
        Next { translate: false, reject: false, conn: false, n, to: To::Stack, verdict, reason }
    }
    /// Rejected for `reason` (`RejectNoBackend`, `ResetBackendGone` or `RejectUnknownPort`):
    /// the rejection program replaces the packet by a TCP RST or an ICMPv6 port unreachable.
    /// The reason travels in this CPU's scratch space.
    #[inline(always)]
    fn reject(reason: Reason) -> Result<Next, Reason> {
        maps6::scratch()?.reject_why = match reason {
            Reason::ResetBackendGone => maps6::REJECT_GONE,
            Reason::RejectUnknownPort => maps6::REJECT_UNKNOWN_PORT,
            _ => maps6::REJECT_NO_BACKEND,
        };
        Ok(Next { reject: true, ..Next::done(Verdict::DROP, reason) })
    }
}

/// Carries out `next` on `p` (`whole`: see [`nat6::apply`]).
#[inline(always)]
fn finish<P: Packet6>(c: &mut P, p: &Ip6, next: &Next, now: u64, whole: bool) -> Out {
    if !next.translate {
        return Ok((next.verdict, next.reason));
    }
    deliver_with(c, p, &next.n, None, next.to, next.reason, now, whole)
}

/// What the IPv4 fast path does with a frame that is not IPv4. The entry programs run the IPv6
/// fast path themselves before the IPv4 one (see `main.rs`), so an IPv6 frame does not come
/// here (if one did, it would be left to TC untouched); anything else (ARP, ...) is passed.
#[inline(always)]
pub fn dispatch<P: Packet>(c: &P) -> Step {
    if parse6::is_ipv6(c) {
        return done(Verdict::PASS, Reason::XdpPassToTc);
    }
    Step { verdict: Verdict::PASS, reason: Reason::PassNotIpv4, tail: NO_TAIL, v6: false }
}

/// Index of this hook's IPv6 slow-path program in its tail-call table; `ToPod` has none (an
/// index past the table).
#[inline(always)]
fn new_call(hook: Hook) -> u32 {
    match hook {
        Hook::FromPod => calls::POD_NEW6,
        Hook::TcExt => calls::EXT_NEW6,
        Hook::XdpExt => calls::XDP_NEW6,
        Hook::ToPod => calls::TC_MAX,
    }
}

/// Index of this hook's ICMPv6-error program in its tail-call table.
#[inline(always)]
fn icmp_call(hook: Hook) -> u32 {
    match hook {
        Hook::FromPod => calls::POD_ICMP6,
        Hook::ToPod => calls::TOPOD_ICMP6,
        Hook::TcExt => calls::EXT_ICMP6,
        Hook::XdpExt => calls::XDP_ICMP6,
    }
}

/// Index of the rejection program in this hook's tail-call table (XDP has its own).
#[inline(always)]
fn reject_call(hook: Hook) -> u32 {
    if hook == Hook::XdpExt { calls::XDP_REJECT6 } else { calls::REJECT6 }
}

#[inline(always)]
fn done(verdict: Verdict, reason: Reason) -> Step {
    Step { verdict, reason, tail: NO_TAIL, v6: true }
}

#[inline(always)]
fn tail(index: u32) -> Step {
    Step { verdict: Verdict::PASS, reason: Reason::DropTailCall, tail: index, v6: true }
}

/// A TCP segment opening a connection (SYN without ACK).
#[inline(always)]
fn syn_only(p: &Ip6) -> bool {
    flow::opens_connection(p.proto, p.tcp_flags)
}

/// The IPv6 fast path, run by the IPv6 entry programs. A frame that is not IPv6 is passed
/// (`PassNotIpv4`, counted with the IPv4 counters).
#[inline(always)]
pub fn fast<P: Packet6>(c: &mut P, hook: Hook) -> Step {
    match fast_path(c, hook) {
        Ok(s) => s,
        Err(r) => done(Verdict::DROP, r),
    }
}

/// The verdict of an IPv6 packet that arrived before the agent wrote the node configuration.
#[inline(always)]
fn not_ready() -> Step {
    done(Verdict::PASS, Reason::PassNotReady)
}

#[inline(always)]
fn fast_path<P: Packet6>(c: &mut P, hook: Hook) -> Result<Step, Reason> {
    // The configuration is checked only where a lookup is due, as in `flow::fast_path`.
    let mut p = match parse6::ipv6(c) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Step { v6: false, ..done(Verdict::PASS, Reason::PassNotIpv4) }),
        Err(_) if !maps::ready() => return Ok(not_ready()),
        Err(r) => return Err(r),
    };
    if p.proto == proto::ICMPV6 {
        if icmp6::is_error(c, &p) {
            return Ok(tail(icmp_call(hook)));
        }
        // Neighbour discovery, echo, ...: untouched.
        return Ok(done(Verdict::PASS, Reason::PassUnsupportedProto));
    }
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return Ok(done(Verdict::PASS, Reason::PassUnsupportedProto));
    }
    if p.frag == Frag::Later {
        match ct6::fragment_ports(&p) {
            Some((sport, dport)) => {
                p.sport = sport;
                p.dport = dport;
            }
            None => return Ok(done(Verdict::PASS, Reason::PassNoService)),
        }
    }
    let orig = hook != Hook::ToPod && maps6::hinted6(hints::FRONTEND, &p.daddr, p.proto, p.dport);
    if orig {
        if syn_only(&p) {
            // A new connection, or a client reusing its port: the slow path (see
            // `flow::fast_path`).
            return Ok(tail(new_call(hook)));
        }
        if !maps::ready() {
            return Ok(not_ready());
        }
        if p.frag == Frag::First {
            ct6::record_fragment(&p);
        }
        // The fast path's clock (see `flow::coarse_now`), read only where a lookup found
        // something to check or refresh.
        let t = ct6::tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
        let now = flow::coarse_now();
        if let Some(ctp) = ct6::lookup(&t, now) {
            // The entry's fields are read in place where they are needed (no copy of the
            // whole entry on the stack).
            let Some(local) = backend_local(ctp) else {
                // The backend went away: re-balanced or reset by the slow path.
                return Ok(tail(new_call(hook)));
            };
            let next = forward_established(&p, ctp, local, hook);
            ct6::touch(ctp, p.proto, p.tcp_flags, false, now);
            return finish(c, &p, &next, now, true).map(|(v, r)| done(v, r));
        }
    }
    // The backend hint only now, replies before new connections (see `flow::fast_path`).
    if maps6::hinted6(hints::BACKEND, &p.saddr, p.proto, p.sport) {
        // Only the replies to the node's source-NAT address are translated on an external
        // device; the replies of pods' connections are passed without a lookup (see
        // `flow::fast_path`; IPv6 has no eBPF host routing). `kp_config6` alone decides that
        // pass, one cache line as IPv4's `kp_config` does: the readiness is read for it only
        // where a first fragment is to be recorded (before the agent writes the address it is
        // zero: such a reply passes, counted as a reply to a pod).
        let to_pod = hook.external() && !maps6::is_snat_addr6(&p.daddr);
        let record = !orig && p.frag == Frag::First;
        if (!to_pod || record) && !maps::ready() {
            return Ok(not_ready());
        }
        if record {
            ct6::record_fragment(&p);
        }
        if to_pod {
            return Ok(done(Verdict::PASS, Reason::PassReplyToPod));
        }
        let t = ct6::tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
        if let Some(rn) = ct6::revnat_fast(&t, flow::carries_syn(p.proto, p.tcp_flags)) {
            let now = flow::coarse_now();
            let next = reply_translated(&p, &t, rn, hook, now);
            return finish(c, &p, &next, now, true).map(|(v, r)| done(v, r));
        }
    }
    if orig {
        return Ok(tail(new_call(hook)));
    }
    if hook != Hook::ToPod && (guard::maybe_closed6(&p.daddr) || guard::in_service_cidr6(&p.daddr))
    {
        // A closed service address or the service CIDRs (see `flow::fast_path`).
        return Ok(tail(new_call(hook)));
    }
    if hook == Hook::FromPod
        && syn_only(&p)
        && maps6::hinted6(hints::BACKEND, &p.daddr, p.proto, p.dport)
        && ct6::may_have_stale_revnat(&p)
    {
        // A stale reverse-NAT entry to clear (see `flow::fast_path`).
        return Ok(tail(new_call(hook)));
    }
    Ok(done(Verdict::PASS, Reason::PassNoService))
}

/// Index of this hook's IPv6 new-connection program (`ToPod` has none).
#[inline(always)]
fn conn_call(hook: Hook) -> u32 {
    match hook {
        Hook::FromPod => calls::POD_CONN6,
        Hook::TcExt => calls::EXT_CONN6,
        Hook::XdpExt => calls::XDP_CONN6,
        Hook::ToPod => calls::TC_MAX,
    }
}

/// What a slow-path program ends with.
enum Slow {
    /// A verdict (the packet translated or not).
    Done(Verdict, Reason),
    /// Rejected: the rejection program builds the reply.
    Reject,
    /// A new connection: the connection program continues with what is in the scratch space.
    Conn,
}

/// The IPv6 slow path of a `*_new6` program; a rejection continues in the rejection program
/// and a new connection in the connection program (tail calls), which keeps the frame building
/// and the backend choice out of the slow path's verification: each program stays within what
/// the verifiers of older kernels follow (a million instructions, 512 bytes of stack).
#[inline(always)]
pub fn slow<P: Packet6>(c: &mut P, hook: Hook) -> Step {
    match run(c, hook) {
        Ok(Slow::Done(v, r)) => done(v, r),
        Ok(Slow::Reject) => tail(reject_call(hook)),
        Ok(Slow::Conn) => tail(conn_call(hook)),
        Err(r) => done(Verdict::DROP, r),
    }
}

/// The connection program: the first packet of a connection to the service its slow path
/// found (and left in the scratch space, with the parsed packet): backend choice with
/// affinity, connection and reverse-NAT entries, source NAT, translation.
#[inline(always)]
pub fn conn<P: Packet6>(c: &mut P, hook: Hook) -> (Verdict, Reason) {
    match run_conn(c, hook) {
        Ok(v) => v,
        Err(r) => (Verdict::DROP, r),
    }
}

/// Bound of the L4 offset the parse can yield (the headers and four extension headers of at
/// most 2,048 bytes each), with room below the verifier's 64 KiB packet-offset limit for the
/// field offsets added to it.
const MAX_L4_OFF: usize = 0x3fff;

#[inline(always)]
fn run_conn<P: Packet6>(c: &mut P, hook: Hook) -> Out {
    let Some(cfg) = maps::ready_config() else {
        return Ok((Verdict::PASS, Reason::PassNotReady));
    };
    let nc = maps6::scratch()?.conn;
    let p = &nc.p;
    if p.l4 > MAX_L4_OFF {
        // Read back from the scratch space, so unbounded for the verifier (XDP addresses the
        // packet with it directly); the parse never yields a larger one.
        return Err(Reason::DropMalformed);
    }
    let reason = match nc.why {
        1 => Reason::Rebalanced,
        2 => Reason::CtMissMidFlow,
        _ => Reason::TranslatedNew,
    };
    let t = ct6::tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
    let now = flow::coarse_now();
    let next = new_conn(p, &t, &cfg, hook, &nc.key, &nc.svc, now, reason)?;
    finish(c, p, &next, now, true)
}

/// The rejection program: replaces the packet by the TCP RST (or, for UDP, the ICMPv6 port
/// unreachable) from the address it was sent to, as the slow path decided. XDP leaves a frame
/// it cannot grow to the reply's size to TC, untouched (TC decides again and rejects it).
#[inline(always)]
pub fn reject<P: Packet6>(c: &mut P) -> (Verdict, Reason) {
    let reason = match maps6::scratch().map(|s| s.reject_why) {
        Ok(maps6::REJECT_GONE) => Reason::ResetBackendGone,
        Ok(maps6::REJECT_UNKNOWN_PORT) => Reason::RejectUnknownPort,
        _ => Reason::RejectNoBackend,
    };
    let built = match parse6::ipv6(c) {
        Ok(Some(p)) if p.proto == proto::TCP => nat6::tcp_reset(c, &p),
        Ok(Some(p)) if p.proto == proto::UDP => nat6::icmp_unreachable(c, &p),
        Ok(_) => Ok(Verdict::DROP),
        Err(r) => Err(r),
    };
    match built {
        Ok(v) => (v, reason),
        Err(Reason::DropRewrite) if P::XDP => (Verdict::PASS, Reason::XdpPassToTc),
        Err(r) => (Verdict::DROP, r),
    }
}

/// The program of ICMPv6 errors: translated like the connection they are about.
#[inline(always)]
pub fn icmp_error<P: Packet6>(c: &mut P, hook: Hook) -> (Verdict, Reason) {
    match run_icmp(c, hook) {
        Ok(v) => v,
        Err(r) => (Verdict::DROP, r),
    }
}

#[inline(always)]
fn run_icmp<P: Packet6>(c: &mut P, hook: Hook) -> Out {
    if maps::ready_config().is_none() {
        return Ok((Verdict::PASS, Reason::PassNotReady));
    }
    let Some(mut p) = parse6::ipv6(c)? else {
        return Ok((Verdict::PASS, Reason::PassUnsupportedProto));
    };
    if P::XDP {
        if p.l4 != XDP_ICMP_L4 {
            return Ok((Verdict::PASS, Reason::XdpPassToTc));
        }
        p.l4 = XDP_ICMP_L4;
    }
    let cfg6 = maps6::config6();
    let now = flow::coarse_now();
    if let Some(mut i) = icmp6::parse(c, &p)
        && let Some(plan) = icmp6::plan(&p, &i, &cfg6, hook.external(), hook == Hook::FromPod, now)
    {
        if plan.to_pod {
            return Ok((Verdict::PASS, Reason::PassReplyToPod));
        }
        if P::XDP {
            if i.l4 != XDP_ICMP_L4 + 8 + HDR {
                return Ok((Verdict::PASS, Reason::XdpPassToTc));
            }
            // Constants from here on, for the verifier (see `XDP_ICMP_L4`).
            i.l3 = XDP_ICMP_L4 + 8;
            i.l4 = XDP_ICMP_L4 + 8 + HDR;
        }
        let inner = Some((&i, &plan.inner));
        let reason = Reason::IcmpErrorTranslated;
        return deliver_with(c, &p, &plan.outer, inner, plan.to, reason, now, false);
    }
    Ok((Verdict::PASS, Reason::PassUnsupportedProto))
}

/// Offset of the ICMPv6 header of the errors XDP translates: those without extension headers,
/// around and in the quoted packet; XDP leaves the others to TC untouched. XDP rewrites the
/// packet directly, so every variable offset multiplies the paths its verifier follows (past a
/// million instructions on Linux 5.10); TC's helpers take the offsets as plain arguments.
const XDP_ICMP_L4: usize = L3 + HDR;

/// The slow path's outcome (see [`slow`]).
#[inline(always)]
fn run<P: Packet6>(c: &mut P, hook: Hook) -> Result<Slow, Reason> {
    if maps::ready_config().is_none() {
        return Ok(Slow::Done(Verdict::PASS, Reason::PassNotReady));
    }
    let Some(mut p) = parse6::ipv6(c)? else {
        return Ok(Slow::Done(Verdict::PASS, Reason::PassUnsupportedProto));
    };
    let now = flow::coarse_now();
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return Ok(Slow::Done(Verdict::PASS, Reason::PassUnsupportedProto));
    }
    match p.frag {
        Frag::None => {}
        Frag::First => ct6::record_fragment(&p),
        Frag::Later => match ct6::fragment_ports(&p) {
            Some((sport, dport)) => {
                p.sport = sport;
                p.dport = dport;
            }
            None => return Ok(Slow::Done(Verdict::PASS, Reason::PassNoService)),
        },
    }
    let next = decide(&p, hook, now)?;
    if next.reject {
        return Ok(Slow::Reject);
    }
    if next.conn {
        return Ok(Slow::Conn);
    }
    finish(c, &p, &next, now, false).map(|(v, r)| Slow::Done(v, r))
}

/// The slow path's decision for `p`.
#[inline(always)]
fn decide(p: &Ip6, hook: Hook, now: u64) -> Result<Next, Reason> {
    let t = ct6::tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
    let mut reason = Reason::TranslatedNew;
    if hook != Hook::ToPod {
        match established(p, &t, hook, now)? {
            Tracked::Next(next) => return Ok(next),
            // The backend went away: balanced anew below (UDP, TCP SYN).
            Tracked::Rebalance => reason = Reason::Rebalanced,
            Tracked::No => {}
        }
    }
    // Replies before new connections: a reply tuple is exact, so it must win over a frontend
    // that happens to share address and port (a hairpin reply to a ClusterIP's SNAT port). A
    // source the backend hints leave out has no reverse-NAT entry (the fast path's rule).
    if reason != Reason::Rebalanced
        && maps6::hinted6(hints::BACKEND, &p.saddr, p.proto, p.sport)
        && let Some(rnp) = ct6::revnat_ptr(&t)
    {
        return Ok(reply_translated(p, &t, ct6::RevNat6Ref::at(rnp), hook, now));
    }
    if hook != Hook::ToPod
        && let Some((key, svc)) = lb6::service(&p.daddr, p.dport, p.proto, hook.scope())
    {
        // A TCP segment without SYN and without a connection entry: evicted or expired
        // mid-flow, balanced as new, counted apart.
        if reason != Reason::Rebalanced
            && p.proto == proto::TCP
            && p.tcp_flags & tcp_flags::SYN == 0
        {
            reason = Reason::CtMissMidFlow;
        }
        return open(p, &key, &svc, reason);
    }
    if hook != Hook::ToPod && closed_address(p, hook)? {
        return Next::reject(Reason::RejectUnknownPort);
    }
    if hook == Hook::FromPod && syn_only(p) && ct6::clear_stale_revnat(p, now) {
        return Ok(Next::done(Verdict::PASS, Reason::PassStaleNatCleared));
    }
    Ok(Next::done(Verdict::PASS, Reason::PassNoService))
}

/// A packet to an IPv6 service address that no frontend of its scope took, as
/// `flow::closed_address`: `Ok(true)` for a closed service address on a port no service
/// defines (rejected), `Err` for an unallocated address of the service CIDRs (dropped) or an
/// RST to a closed address (not answered); `Ok(false)`: neither. (A flag rather than an
/// `Option<Next>`, whose padding 5.10's verifier would see read uninitialised.)
#[inline(always)]
fn closed_address(p: &Ip6, hook: Hook) -> Result<bool, Reason> {
    if guard::closed6(&p.daddr) {
        let other = if hook.external() { scope::INTERNAL } else { scope::EXTERNAL };
        if lb6::service(&p.daddr, p.dport, p.proto, other).is_some() {
            return Ok(false);
        }
        if p.proto == proto::TCP && p.tcp_flags & tcp_flags::RST != 0 {
            // An RST is not answered.
            return Err(Reason::RejectUnknownPort);
        }
        return Ok(true);
    }
    if guard::in_service_cidr6(&p.daddr) {
        return Err(Reason::DropUnallocatedServiceIp);
    }
    Ok(false)
}

/// What the connection entry of a packet says.
enum Tracked {
    /// Not tracked (or a new connection reusing a closed tuple).
    No,
    /// Tracked, but its backend went away and the packet may open a new connection.
    Rebalance,
    /// Tracked: what to do.
    Next(Next),
}

/// A packet of a tracked connection.
#[inline(always)]
fn established(p: &Ip6, t: &Tuple6, hook: Hook, now: u64) -> Result<Tracked, Reason> {
    let Some(ctp) = ct6::lookup(t, now) else { return Ok(Tracked::No) };
    // SAFETY: valid map value pointer; read in place (a copy would not fit on the stack).
    let e: &Ct6Value = unsafe { &*ctp };
    let syn_only = syn_only(p);
    if syn_only && e.state >= ct_state::CLOSING {
        return Ok(Tracked::No);
    }
    let be = match lb6::backend(e.backend_id) {
        Some(be) if be.addr == e.backend_addr && be.port == e.backend_port => be,
        _ => {
            // The backend was removed (or its id reused for another address).
            ct6::delete(t);
            if p.proto == proto::UDP || syn_only {
                return Ok(Tracked::Rebalance);
            }
            return Ok(Tracked::Next(Next::reject(Reason::ResetBackendGone)?));
        }
    };
    let next = forward_established(p, ctp, be.flags & backend_flags::LOCAL != 0, hook);
    ct6::touch(ctp, p.proto, p.tcp_flags, false, now);
    Ok(Tracked::Next(next))
}

/// Whether the backend of the connection entry `e` (at `ctp`) is local; `None` when it was
/// removed (or its id reused for another address). As for IPv4 (`flow::backend_local`), the
/// backend is looked up only when the agent removed a backend since the entry was last
/// validated (the backend generation, which both families share).
#[inline(always)]
fn backend_local(ctp: *mut Ct6Value) -> Option<bool> {
    let gen_ = maps::ready_config()?.backend_gen as u16;
    // SAFETY: valid map value pointer; fields read in place.
    let (entry_gen, flags, id) = unsafe { ((*ctp).backend_gen, (*ctp).flags, (*ctp).backend_id) };
    if entry_gen == gen_ {
        return Some(flags & ct_flags::LOCAL_BACKEND != 0);
    }
    let be = lb6::backend(id)?;
    // SAFETY: as above.
    if unsafe { be.addr != (*ctp).backend_addr || be.port != (*ctp).backend_port } {
        return None;
    }
    let local = be.flags & backend_flags::LOCAL != 0;
    ct6::validated(ctp, gen_, local);
    Some(local)
}

/// Translates and delivers a packet of the tracked connection at `ctp` to its backend
/// (`local`: on this node); the entry's fields are read in place.
#[inline(always)]
fn forward_established(p: &Ip6, ctp: *const Ct6Value, local: bool, hook: Hook) -> Next {
    // SAFETY: valid map value pointer.
    let flags = unsafe { (*ctp).flags };
    let snat = flags & ct_flags::SNAT != 0;
    // SAFETY: as above.
    let n = unsafe {
        Nat6 {
            saddr: if snat { (*ctp).snat_addr } else { p.saddr },
            sport: if snat { (*ctp).snat_port } else { p.sport },
            daddr: (*ctp).backend_addr,
            dport: (*ctp).backend_port,
        }
    };
    let to = if flags & ct_flags::HAIRPIN != 0 {
        To::Bounce
    } else if hook.external() && !local {
        To::Fib
    } else {
        To::Stack
    };
    Next::tx(n, to, Reason::TranslatedEstablished)
}

/// First packet of a connection to an IPv6 service frontend, in the slow-path program: a
/// service without endpoints rejects (or drops) it; otherwise the packet and the service go to
/// the connection program ([`conn`]) through the scratch space.
#[inline(always)]
fn open(p: &Ip6, key: &Service6Key, svc: &Service6Value, reason: Reason) -> Result<Next, Reason> {
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !guard::source_allowed6(svc.svc_id, &p.saddr) {
        return Err(Reason::DropSourceRange);
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            return Err(Reason::DropNoLocalBackend);
        }
        return Next::reject(Reason::RejectNoBackend);
    }
    let why = match reason {
        Reason::Rebalanced => 1,
        Reason::CtMissMidFlow => 2,
        _ => 0,
    };
    maps6::scratch()?.conn = maps6::NewConn6 { p: *p, key: *key, svc: *svc, why };
    Ok(Next { conn: true, ..Next::done(Verdict::PASS, reason) })
}

/// First packet of a connection to an IPv6 service frontend with endpoints, in the connection
/// program.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn new_conn(
    p: &Ip6,
    t: &Tuple6,
    cfg: &NodeConfig,
    hook: Hook,
    key: &Service6Key,
    svc: &Service6Value,
    now: u64,
    reason: Reason,
) -> Result<Next, Reason> {
    // The entry the tuple still has (a closed or expired connection's, a client reusing its
    // port): taken over in place, as for IPv4 (`flow::new_conn`). The slow path has just looked
    // the tuple up, so this lookup finds its bucket in the cache.
    let old = ct6::entry(t);
    let (id, be) = lb6::pick(key, svc, t, now)?;
    let local = be.flags & backend_flags::LOCAL != 0;
    // Hairpin: a pod balanced to itself (see `flow::new_conn`).
    let hairpin = hook == Hook::FromPod && be.addr == p.saddr;
    let snat = hairpin || (hook.external() && !local && svc.flags & svc_flags::LOCAL_ONLY == 0);
    let snat_addr = if hairpin { p.daddr } else { maps6::config6().snat_addr };
    let sc = maps6::scratch()?;
    sc.rn = RevNat6Value {
        client_addr: p.saddr,
        frontend_addr: p.daddr,
        client_port: p.sport,
        frontend_port: p.dport,
        flags: if hook == Hook::FromPod { rnat_flags::TO_POD } else { 0 },
        last_seen_ns: now,
    };
    let mut n = Nat6 { saddr: p.saddr, sport: p.sport, daddr: be.addr, dport: be.port };
    let mut flags = if hook.external() { ct_flags::EXTERNAL | ct_flags::REPLY_FIB } else { 0 };
    if svc.flags & svc_flags::NODE_PORT != 0 {
        flags |= ct_flags::REPLY_FIB;
    }
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    if snat {
        if snat_addr == [0; 4] {
            return Err(Reason::DropNoSnatAddr);
        }
        sc.reply = ct6::tuple(&be.addr, &snat_addr, be.port, 0, p.proto);
        n.sport = ct6::alloc_snat_port(cfg, &mut sc.reply, &sc.rn, lb6::hash(t), now)?;
        n.saddr = snat_addr;
        flags |= ct_flags::SNAT;
        if hairpin {
            flags |= ct_flags::HAIRPIN;
        }
    } else {
        sc.reply = ct6::tuple(&be.addr, &p.saddr, be.port, p.sport, p.proto);
        ct6::claim_revnat(&sc.reply, &sc.rn, old.is_some())?;
    }
    // The reverse-NAT entry is in: what the fast path's caches remembered of its tuple is void
    // from here on, before the packet leaves (see `flow::new_conn`).
    maps::rnat_changed();
    let e = &mut sc.ct;
    *e = Ct6Value {
        backend_id: id,
        svc_id: svc.svc_id,
        backend_addr: be.addr,
        snat_addr: if snat { n.saddr } else { [0; 4] },
        backend_port: be.port,
        snat_port: if snat { n.sport } else { 0 },
        state: ct_state::NEW,
        flags,
        backend_gen: cfg.backend_gen as u16,
        created_ns: now,
        last_seen_ns: now,
    };
    match old {
        Some(ctp) => ct6::reopen(ctp, e),
        None => ct6::create(t, e)?,
    }
    let to = if hairpin {
        To::Bounce
    } else if hook.external() && !local {
        To::Fib
    } else {
        To::Stack
    };
    Ok(Next::tx(n, to, reason))
}

/// A reply of a translated connection: restore the frontend as source and the client as
/// destination.
#[inline(always)]
fn reply_translated(p: &Ip6, t: &Tuple6, r: ct6::RevNat6Ref, hook: Hook, now: u64) -> Next {
    let rnp = r.p;
    // SAFETY: valid map value pointer; what the reply needs is read straight into its
    // translation (no copy of the whole entry), before the entry is written below.
    let (n, mut fl, last_seen) = unsafe {
        let n = Nat6 {
            saddr: (*rnp).frontend_addr,
            sport: (*rnp).frontend_port,
            daddr: (*rnp).client_addr,
            dport: (*rnp).client_port,
        };
        (n, (*rnp).flags, (*rnp).last_seen_ns)
    };
    if hook == Hook::FromPod
        && fl & (rnat_flags::TO_POD | rnat_flags::REPLY_FIB) == rnat_flags::TO_POD
        && n.daddr != p.saddr
    {
        // A local backend's reply to a pod of this node: passed before any refresh, the
        // client pod's hook refreshes and translates it (see `flow::reply_translated`).
        return Next::pass_with(n, Reason::PassReplyToPod);
    }
    // The connection entry is refreshed by the first reply, by replies carrying SYN, FIN or
    // RST, and at most once a second otherwise, as for IPv4 (`flow::reply_translated`).
    let control = p.proto == proto::TCP
        && p.tcp_flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0;
    if control || fl & rnat_flags::ESTABLISHED == 0 || now.saturating_sub(last_seen) > ct6::TOUCH_NS
    {
        // The original tuple: client → frontend.
        let orig = ct6::tuple(&n.daddr, &n.saddr, n.dport, n.sport, p.proto);
        if let Some(ctp) = ct6::lookup(&orig, now) {
            ct6::touch(ctp, p.proto, p.tcp_flags, true, now);
            // SAFETY: valid map value pointer.
            let ct_fl = unsafe { (*ctp).flags };
            fl = rnat_flags::ESTABLISHED | fl & rnat_flags::TO_POD;
            if ct_fl & ct_flags::REPLY_FIB != 0 {
                fl |= rnat_flags::REPLY_FIB;
            }
            r.refreshed(t, fl, now);
        }
    }
    // Both routed cases first by what the entry already says: the node's source-NAT address
    // (`kp_config6`, a cache line of its own) is compared only for a reply to an address other
    // than the client's, i.e. of a source-NATed connection; a reply to a pod client (most
    // replies) does not read it.
    let to = if n.daddr == p.saddr && hook == Hook::FromPod {
        To::Bounce
    } else if hook != Hook::ToPod && fl & rnat_flags::REPLY_FIB != 0 {
        To::Fib
    } else if hook.external() && t.daddr != n.daddr && maps6::is_snat_addr6(&t.daddr) {
        // Replies to the node's source-NAT address go back out to an external client.
        To::Fib
    } else if hook != Hook::ToPod && fl & rnat_flags::TO_POD != 0 {
        // For the stack to forward as it is (see `rnat_flags::TO_POD`).
        return Next::pass_with(n, Reason::PassReplyToPod);
    } else {
        To::Stack
    };
    Next::tx(n, to, Reason::ReplyTranslated)
}

/// Translates and delivers (also the packet quoted by an ICMPv6 error). XDP leaves packets
/// whose neighbour is unresolved to TC, untouched. `now` stamps a route XDP caches; `whole`:
/// see [`nat6::apply`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn deliver_with<P: Packet6>(
    c: &mut P,
    p: &Ip6,
    n: &Nat6,
    inner: Option<(&icmp6::Inner6, &Nat6)>,
    to: To,
    reason: Reason,
    now: u64,
    whole: bool,
) -> Out {
    // The route parameters live in this CPU's scratch space (too large for the stack beside
    // the IPv6 state), looked up only for a packet that is routed here: a reply handed to the
    // stack (most replies to pods) does not pay for the lookup. The pointer and the route result
    // stay two variables: as one `Option<(&mut _, Fib)>` the pointer takes `Fib`'s niche, is a
    // scalar on one path, and the verifier refuses the access ("invalid mem access 'scalar'").
    let mut routed = None;
    let mut fib = Fib::None;
    if to == To::Fib {
        let f = &mut maps6::scratch()?.fib;
        match nat6::route(c, p, &n.saddr, &n.daddr, f, now) {
            Fib::Resolved => fib = Fib::Resolved,
            _ if P::XDP => return Ok((Verdict::PASS, Reason::XdpPassToTc)),
            Fib::NoNeigh => fib = Fib::NoNeigh,
            _ => return Err(Reason::DropFib),
        }
        routed = Some(f);
    }
    nat6::apply(c, p, n, whole)?;
    if let Some((i, inn)) = inner {
        icmp6::apply_inner(c, p, i, inn)?;
    }
    match routed {
        Some(f) => Ok((nat6::forward(c, p, f, fib)?, reason)),
        None if to == To::Bounce => Ok((nat::bounce(c)?, reason)),
        None => Ok((Verdict::PASS, reason)),
    }
}
