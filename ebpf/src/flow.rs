//! The per-packet pipeline shared by all hooks, in two stages.
//!
//! The *fast path* ([`fast`]) runs in every entry program on every packet. A packet that the
//! hint bitmaps rule out as service traffic (most pod and node traffic) is passed after the
//! parse and two inlined array lookups. A packet of a tracked connection, or a reply of one, is
//! translated and delivered with one or two hash lookups. Everything else (new connections,
//! connections whose backend went away, ICMP errors, stale reverse-NAT entries) continues in a
//! tail-called *slow-path* program ([`slow`], [`icmp_error`]): the fast programs stay small and
//! quick, and every program stays within what the verifiers of older kernels can follow.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use kproxy_common::{
    Ct4Value, NodeConfig, Reason, RevNat4Value, Service4Key, Service4Value, Tuple4, backend_flags,
    calls, cfg_flags, ct_flags, ct_state, hints, proto, rnat_flags, scope, svc_flags,
};

use crate::{
    ct, flow6, guard, icmp, lb, maps,
    nat::{self, Fib, Nat, To, Verdict},
    parse::{self, Frag, Ip4, tcp_flags},
    pkt::Packet,
};

/// Where the program runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of a host-side pod interface (traffic leaving a pod).
    FromPod,
    /// TC egress of a host-side pod interface (traffic entering a pod).
    ToPod,
    /// XDP on an external device.
    XdpExt,
    /// TC ingress on an external device.
    TcExt,
}

impl Hook {
    /// A hook on an external device (XDP or TC).
    #[inline(always)]
    pub(crate) fn external(self) -> bool {
        matches!(self, Hook::XdpExt | Hook::TcExt)
    }
    /// The frontend scope this hook's traffic may use.
    #[inline(always)]
    pub(crate) fn scope(self) -> u8 {
        if self.external() { scope::EXTERNAL } else { scope::INTERNAL }
    }
    /// Index of this hook's slow-path program in its tail-call table. `ToPod` has none (it
    /// never balances): an index past the table, whose tail call fails and is counted.
    #[inline(always)]
    fn new_call(self) -> u32 {
        match self {
            Hook::FromPod => calls::POD_NEW,
            Hook::TcExt => calls::EXT_NEW,
            Hook::XdpExt => calls::XDP_NEW,
            Hook::ToPod => calls::TC_MAX,
        }
    }
    /// Index of this hook's ICMP-error program in its tail-call table.
    #[inline(always)]
    fn icmp_call(self) -> u32 {
        match self {
            Hook::FromPod => calls::POD_ICMP,
            Hook::ToPod => calls::TOPOD_ICMP,
            Hook::TcExt => calls::EXT_ICMP,
            Hook::XdpExt => calls::XDP_ICMP,
        }
    }
}

/// What the fast path decided: a verdict and its reason, or a tail call (`tail != NO_TAIL`).
/// A plain struct rather than an enum with payloads, as [`Verdict`].
#[derive(Clone, Copy)]
pub struct Step {
    /// The verdict (when `tail == NO_TAIL`).
    pub verdict: Verdict,
    /// Its reason.
    pub reason: Reason,
    /// Index in the hook's tail-call table, or [`NO_TAIL`].
    pub tail: u32,
    /// An IPv6 packet: counted in `kp_stats6` (see [`crate::flow6`]).
    pub v6: bool,
}

/// [`Step::tail`] of a finished packet.
pub const NO_TAIL: u32 = u32::MAX;

impl Step {
    #[inline(always)]
    fn done(verdict: Verdict, reason: Reason) -> Step {
        Step { verdict, reason, tail: NO_TAIL, v6: false }
    }
    #[inline(always)]
    fn tail(index: u32) -> Step {
        Step { verdict: Verdict::PASS, reason: Reason::DropTailCall, tail: index, v6: false }
    }
}

/// A TCP segment opening a connection (SYN without ACK).
#[inline(always)]
fn syn_only(p: &Ip4) -> bool {
    opens_connection(p.proto, p.tcp_flags)
}

/// Whether a segment of protocol `proto` with TCP flags `flags` opens a connection (a TCP SYN
/// without ACK); both families.
#[inline(always)]
pub(crate) fn opens_connection(proto: u8, flags: u8) -> bool {
    proto == proto::TCP && flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
}

/// Whether a segment of protocol `proto` with TCP flags `flags` carries SYN (a TCP SYN or, in
/// the reply direction, a SYN-ACK); both families.
#[inline(always)]
pub(crate) fn carries_syn(proto: u8, flags: u8) -> bool {
    proto == proto::TCP && flags & tcp_flags::SYN != 0
}

/// The exact clock (`bpf_ktime_get_ns`), read by [`coarse_now`] once per jiffy.
#[inline(always)]
fn ktime() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The datapath's clock, fast and slow paths alike: `bpf_ktime_get_ns()` read at most once per
/// jiffy on each CPU and reused until `jiffies` moves (`bpf_jiffies64` is a plain memory load
/// once the verifier has inlined it; every helper call costs, a return thunk on mitigated CPUs).
/// Up to one jiffy (≤ 10 ms) behind the exact clock, which is far below every timeout and
/// refresh interval it is compared with; the comparisons saturate, so a timestamp another CPU
/// wrote a little later counts as fresh. Connection lifetimes shown by the CLI are that coarse.
#[inline(always)]
pub(crate) fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = maps::kp_clock.get_ptr_mut(0) else { return ktime() };
    // SAFETY: this CPU's slot of a per-CPU map; a torn pair only makes the time one jiffy
    // older.
    unsafe {
        if (*c).jiffies == j {
            return (*c).ns;
        }
        let ns = ktime();
        (*c).jiffies = j;
        (*c).ns = ns;
        ns
    }
}

/// The fast path of every entry program; see the module documentation.
#[inline(always)]
pub fn fast<P: Packet>(c: &mut P, hook: Hook) -> Step {
    match fast_path(c, hook) {
        Ok(s) => s,
        Err(r) => Step::done(Verdict::DROP, r),
    }
}

#[inline(always)]
fn fast_path<P: Packet>(c: &mut P, hook: Hook) -> Result<Step, Reason> {
    // The configuration is read only where a lookup is due: a packet the hints pass (most pod
    // and node traffic) touches one cache line fewer. Until the agent has written it, everything
    // is passed, as before (a malformed packet too; the slow-path programs check it themselves).
    let mut p = match parse::ipv4(c) {
        Ok(Some(p)) => p,
        // IPv6 runs its own fast path in TC (before this one) and is left to TC by XDP;
        // anything else is passed.
        Ok(None) => return Ok(flow6::dispatch(c)),
        Err(_) if !maps::ready() => return Ok(not_ready()),
        Err(r) => return Err(r),
    };
    if p.proto == proto::ICMP {
        if icmp::is_error(c, &p) {
            if hook == Hook::ToPod
                && translated_upstream(c, maps::config_flag(cfg_flags::HOST_ROUTING))
            {
                return Ok(Step::done(Verdict::PASS, Reason::PassTranslatedUpstream));
            }
            return Ok(Step::tail(hook.icmp_call()));
        }
        return Ok(Step::done(Verdict::PASS, Reason::PassUnsupportedProto));
    }
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return Ok(Step::done(Verdict::PASS, Reason::PassUnsupportedProto));
    }
    if p.frag == Frag::Later {
        match ct::fragment_ports(&p) {
            Some((sport, dport)) => {
                p.sport = sport;
                p.dport = dport;
            }
            // First fragment not seen (or not service traffic): nothing to match on.
            None => return Ok(Step::done(Verdict::PASS, Reason::PassNoService)),
        }
    }
    let orig = hook != Hook::ToPod && maps::hinted(hints::FRONTEND, p.daddr, p.proto, p.dport);
    if orig {
        if syn_only(&p) {
            // A new connection (or a client reusing its port): the slow path looks the tuple up
            // anyway, and reuses a closed entry in place (`ct::reopen`); a retransmitted SYN of
            // a live connection is forwarded there as here.
            return Ok(Step::tail(hook.new_call()));
        }
        let Some(cfg) = maps::ready_config() else { return Ok(not_ready()) };
        if p.frag == Frag::First {
            // Remember the ports so that the later fragments follow the same translation.
            ct::record_fragment(&p);
        }
        let t = ct::tuple(p.saddr, p.daddr, p.sport, p.dport, p.proto);
        // The clock is read only where a lookup found something to check or refresh: a
        // packet whose hints led to a miss (plain traffic to or from a backend) skips it.
        let now = coarse_now();
        if let Some(ctp) = ct::lookup(&t, now) {
            // SAFETY: valid map value pointer, copied out.
            let e: Ct4Value = unsafe { *ctp };
            let Some(local) = backend_local(ctp, &e, &cfg) else {
                // The backend went away: re-balanced or reset by the slow path.
                return Ok(Step::tail(hook.new_call()));
            };
            ct::touch(ctp, p.proto, p.tcp_flags, false, now);
            return forward_established(c, &p, &e, local, &cfg, hook, now)
                .map(|(v, r)| Step::done(v, r));
        }
    }
    // The backend hint is read only now: a packet of a tracked connection (the bulk of service
    // traffic) never needs it. Replies before new connections: a reply tuple is exact, so it
    // must win over a frontend that happens to share address and port (a hairpin reply to a
    // ClusterIP's SNAT port).
    if maps::hinted(hints::BACKEND, p.saddr, p.proto, p.sport) {
        let Some(cfg) = maps::ready_config() else { return Ok(not_ready()) };
        if hook == Hook::ToPod && translated_upstream(c, cfg.flags & cfg_flags::HOST_ROUTING != 0) {
            return Ok(Step::done(Verdict::PASS, Reason::PassTranslatedUpstream));
        }
        if !orig && p.frag == Frag::First {
            ct::record_fragment(&p);
        }
        if hook.external() && cfg.flags & cfg_flags::HOST_ROUTING == 0 && p.daddr != cfg.snat_addr {
            // On an external device, only the replies to the node's source-NAT address are
            // translated: the replies of pods' connections (every other reply that can come
            // in here) cross the stack untouched and are translated where they enter the pod
            // (`rnat_flags::TO_POD`), so they are passed without a lookup. With eBPF host
            // routing they are translated here and delivered straight to the pod.
            return Ok(Step::done(Verdict::PASS, Reason::PassReplyToPod));
        }
        let t = ct::tuple(p.saddr, p.daddr, p.sport, p.dport, p.proto);
        if let Some(rn) = ct::revnat_fast(&t, carries_syn(p.proto, p.tcp_flags)) {
            return reply_translated(c, &p, &t, rn, &cfg, hook, coarse_now())
                .map(|(v, r)| Step::done(v, r));
        }
    }
    if orig {
        // Not tracked: a new connection if the frontend exists (the slow path looks).
        return Ok(Step::tail(hook.new_call()));
    }
    if hook != Hook::ToPod && (guard::maybe_closed(p.daddr) || guard::in_service_cidr(p.daddr)) {
        // A service address on a port without frontend (rejected), or an address of the
        // service CIDRs that no service holds (dropped): the slow path decides.
        return Ok(Step::tail(hook.new_call()));
    }
    if hook == Hook::FromPod
        && syn_only(&p)
        && maps::hinted(hints::BACKEND, p.daddr, p.proto, p.dport)
        && ct::may_have_stale_revnat(&p)
    {
        // A direct connection from a client port whose translated connection to this backend
        // left a reverse-NAT entry: the slow path removes it if that connection is closed
        // (`ct::clear_stale_revnat`). Without one (every direct connection to a backend port,
        // the socket LB's among them) there is nothing to clear: passed here, without the
        // tail call.
        return Ok(Step::tail(hook.new_call()));
    }
    Ok(Step::done(Verdict::PASS, Reason::PassNoService))
}

/// Entering a pod (`kp_tc_to_pod`), with eBPF host routing (`host_routing`): the packet arrived
/// on a device whose ingress runs kproxy's programs, which translated it there if it needed it
/// (a local backend's reply on the backend's veth, a remote one's on the external device, ICMP
/// errors alike) and sent it straight here. Asked only where a lookup would be due: traffic
/// with nothing to translate does not read the configuration.
#[inline(always)]
fn translated_upstream<P: Packet>(c: &P, host_routing: bool) -> bool {
    host_routing && maps::hooked_ingress(c.ingress_ifindex())
}

/// The verdict of a packet that arrived before the agent wrote the node configuration.
#[inline(always)]
fn not_ready() -> Step {
    Step::done(Verdict::PASS, Reason::PassNotReady)
}

/// The slow path of a `*_new` program: new connections, connections whose backend went away,
/// stale reverse-NAT entries (and, as a safety net, everything the fast path does).
#[inline(always)]
pub fn slow<P: Packet>(c: &mut P, hook: Hook) -> (Verdict, Reason) {
    match run(c, hook) {
        Ok(v) => v,
        Err(r) => (Verdict::DROP, r),
    }
}

/// The program of ICMP errors: translated like the connection they are about.
#[inline(always)]
pub fn icmp_error<P: Packet>(c: &mut P, hook: Hook) -> (Verdict, Reason) {
    match run_icmp(c, hook) {
        Ok(v) => v,
        Err(r) => (Verdict::DROP, r),
    }
}

#[inline(always)]
fn run_icmp<P: Packet>(c: &mut P, hook: Hook) -> Out {
    let Some(cfg) = maps::ready_config() else {
        return Ok((Verdict::PASS, Reason::PassNotReady));
    };
    let Some(p) = parse::ipv4(c)? else {
        return Ok((Verdict::PASS, Reason::PassNotIpv4));
    };
    let now = coarse_now();
    if let Some(i) = icmp::parse(c, &p)
        && let Some(plan) = icmp::plan(&p, &i, &cfg, hook.external(), hook == Hook::FromPod, now)
    {
        if plan.to_pod {
            return Ok((Verdict::PASS, Reason::PassReplyToPod));
        }
        let inner = Some((&i, &plan.inner));
        let reason = Reason::IcmpErrorTranslated;
        return deliver_with(c, &p, &plan.outer, inner, plan.to, reason, now);
    }
    Ok((Verdict::PASS, Reason::PassUnsupportedProto))
}

type Out = Result<(Verdict, Reason), Reason>;

#[inline(always)]
fn run<P: Packet>(c: &mut P, hook: Hook) -> Out {
    let Some(cfg) = maps::ready_config() else {
        return Ok((Verdict::PASS, Reason::PassNotReady));
    };
    let Some(mut p) = parse::ipv4(c)? else {
        return Ok((Verdict::PASS, Reason::PassNotIpv4));
    };
    let now = coarse_now();
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return Ok((Verdict::PASS, Reason::PassUnsupportedProto));
    }
    match p.frag {
        Frag::None => {}
        // Remember the ports so that the later fragments follow the same translation.
        Frag::First => ct::record_fragment(&p),
        Frag::Later => match ct::fragment_ports(&p) {
            Some((sport, dport)) => {
                p.sport = sport;
                p.dport = dport;
            }
            // First fragment not seen (yet): nothing to match on.
            None => return Ok((Verdict::PASS, Reason::PassNoService)),
        },
    }
    let t = ct::tuple(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    // The tuple's entry, live or not: a new connection on it is written over it in place.
    let old = if hook != Hook::ToPod { ct::entry(&t) } else { None };
    if let Some(ctp) = old
        && let Some(v) = established(c, &p, &t, ctp, &cfg, hook, now)?
    {
        return Ok(v);
    }
    // Replies before new connections: a reply tuple is exact, so it must win over a frontend
    // that happens to share address and port (a hairpin reply to a ClusterIP's SNAT port). A
    // reverse-NAT entry names a backend as source, so a source the backend hints leave out
    // has none (the fast path's rule): a new connection's SYN skips the lookup.
    if maps::hinted(hints::BACKEND, p.saddr, p.proto, p.sport)
        && let Some(rn) = ct::revnat_ptr(&t)
    {
        return reply_translated(c, &p, &t, ct::RevNatRef::at(rn), &cfg, hook, now);
    }
    if hook != Hook::ToPod
        && let Some((key, svc)) = lb::service(p.daddr, p.dport, p.proto, hook.scope())
    {
        // A TCP segment without SYN and without a connection entry: the entry was evicted or
        // expired mid-flow. Balanced as new (the flow hash picks the same backend while the
        // backend set is unchanged), counted apart.
        let reason = if p.proto == proto::TCP && p.tcp_flags & tcp_flags::SYN == 0 {
            Reason::CtMissMidFlow
        } else {
            Reason::TranslatedNew
        };
        return new_conn(c, &p, &t, &cfg, hook, &key, &svc, now, reason, old);
    }
    if hook != Hook::ToPod
        && let Some(v) = closed_address(c, &p, hook)?
    {
        return Ok(v);
    }
    if hook == Hook::FromPod && syn_only(&p) && ct::clear_stale_revnat(&p, now) {
        return Ok((Verdict::PASS, Reason::PassStaleNatCleared));
    }
    Ok((Verdict::PASS, Reason::PassNoService))
}

/// A packet to a service address that no frontend of its scope took: a closed service address
/// (ClusterIP, LoadBalancer or external IP) on a port no service defines is rejected (TCP RST,
/// ICMP port unreachable), an unallocated address of the service CIDRs dropped. `Ok(None)`:
/// neither (or the frontend exists for the other scope, a ClusterIP reached from outside: the
/// stack gets it as before).
#[inline(always)]
fn closed_address<P: Packet>(
    c: &mut P,
    p: &Ip4,
    hook: Hook,
) -> Result<Option<(Verdict, Reason)>, Reason> {
    if guard::closed(p.daddr) {
        let other = if hook.external() { scope::INTERNAL } else { scope::EXTERNAL };
        if lb::service(p.daddr, p.dport, p.proto, other).is_some() {
            return Ok(None);
        }
        if p.proto == proto::TCP && p.tcp_flags & tcp_flags::RST == 0 {
            return Ok(Some((nat::tcp_reset(c, p)?, Reason::RejectUnknownPort)));
        }
        if p.proto == proto::UDP {
            return nat::reject_udp(c, p, Reason::RejectUnknownPort).map(Some);
        }
        // An RST is not answered.
        return Err(Reason::RejectUnknownPort);
    }
    if guard::in_service_cidr(p.daddr) {
        return Err(Reason::DropUnallocatedServiceIp);
    }
    Ok(None)
}

/// A packet of the connection whose entry (live or not) is at `ctp`. `Ok(None)`: not tracked
/// (expired, or a new connection reusing a closed tuple), continue with the service lookup.
#[inline(always)]
fn established<P: Packet>(
    c: &mut P,
    p: &Ip4,
    t: &Tuple4,
    ctp: *mut Ct4Value,
    cfg: &NodeConfig,
    hook: Hook,
    now: u64,
) -> Result<Option<(Verdict, Reason)>, Reason> {
    if !ct::live(ctp, p.proto, now) {
        return Ok(None);
    }
    // SAFETY: valid map value pointer, copied out.
    let e: Ct4Value = unsafe { *ctp };
    let syn_only = syn_only(p);
    if syn_only && e.state >= ct_state::CLOSING {
        return Ok(None);
    }
    let local = match backend_local(ctp, &e, cfg) {
        Some(local) => local,
        None => {
            // The backend was removed (or its id reused for another address).
            ct::delete(t);
            if p.proto == proto::UDP || syn_only {
                return match lb::service(p.daddr, p.dport, p.proto, hook.scope()) {
                    Some((key, svc)) => {
                        new_conn(c, p, t, cfg, hook, &key, &svc, now, Reason::Rebalanced, None)
                            .map(Some)
                    }
                    None => Ok(None),
                };
            }
            return Ok(Some((nat::tcp_reset(c, p)?, Reason::ResetBackendGone)));
        }
    };
    ct::touch(ctp, p.proto, p.tcp_flags, false, now);
    forward_established(c, p, &e, local, cfg, hook, now).map(Some)
}

/// Whether the backend of the connection entry `e` (at `ctp`) is local; `None` when it was
/// removed (or its id reused for another address). The backend is looked up only when the
/// agent removed a backend since the entry was last validated (the backend generation).
#[inline(always)]
fn backend_local(ctp: *mut Ct4Value, e: &Ct4Value, cfg: &NodeConfig) -> Option<bool> {
    let gen_ = cfg.backend_gen as u16;
    if e.backend_gen == gen_ {
        return Some(e.flags & ct_flags::LOCAL_BACKEND != 0);
    }
    let be = lb::backend(e.backend_id)?;
    if be.addr != e.backend_addr || be.port != e.backend_port {
        return None;
    }
    let local = be.flags & backend_flags::LOCAL != 0;
    ct::validated(ctp, gen_, local);
    Some(local)
}

/// Translates and delivers a packet of the tracked connection `e` to its backend `be`.
#[inline(always)]
fn forward_established<P: Packet>(
    c: &mut P,
    p: &Ip4,
    e: &Ct4Value,
    local: bool,
    cfg: &NodeConfig,
    hook: Hook,
    now: u64,
) -> Out {
    let n = Nat {
        saddr: if e.flags & ct_flags::SNAT != 0 { e.snat_addr } else { p.saddr },
        sport: if e.flags & ct_flags::SNAT != 0 { e.snat_port } else { p.sport },
        daddr: e.backend_addr,
        dport: e.backend_port,
    };
    let to = if e.flags & ct_flags::HAIRPIN != 0 {
        To::Bounce
    } else if hook.external() && !local {
        To::Fib
    } else {
        stack_or_direct::<P>(cfg, hook)
    };
    if defer_to_tc::<P>(cfg, to) {
        return Ok((Verdict::PASS, Reason::XdpPassToTc));
    }
    deliver(c, p, &n, to, Reason::TranslatedEstablished, now)
}

/// First packet of a connection to a service frontend. `old`: the entry its tuple still has (a
/// closed or expired connection's), which the new one takes over in place.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn new_conn<P: Packet>(
    c: &mut P,
    p: &Ip4,
    t: &Tuple4,
    cfg: &NodeConfig,
    hook: Hook,
    key: &Service4Key,
    svc: &Service4Value,
    now: u64,
    reason: Reason,
    old: Option<*mut Ct4Value>,
) -> Out {
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !guard::source_allowed(svc.svc_id, p.saddr) {
        return Err(Reason::DropSourceRange);
    }
    if svc.count == 0 {
        if svc.flags & svc_flags::DROP_IF_EMPTY != 0 {
            return Err(Reason::DropNoLocalBackend);
        }
        if p.proto == proto::TCP {
            return Ok((nat::tcp_reset(c, p)?, Reason::RejectNoBackend));
        }
        return nat::reject_udp(c, p, Reason::RejectNoBackend);
    }
    let (id, be) = lb::pick(key, svc, t, now)?;
    let local = be.flags & backend_flags::LOCAL != 0;
    // Hairpin: a pod balanced to itself. Its kernel would drop a packet carrying its own
    // address as source, so the source becomes the frontend (with a SNAT port) and the packet
    // is bounced straight back into the pod.
    let hairpin = hook == Hook::FromPod && be.addr == p.saddr;
    let mut snat = hairpin || (hook.external() && !local && svc.flags & svc_flags::LOCAL_ONLY == 0);
    let mut snat_addr = if hairpin { p.daddr } else { cfg.snat_addr };
    let mut n = Nat { saddr: p.saddr, sport: p.sport, daddr: be.addr, dport: be.port };
    let mut flags = if hook.external() { ct_flags::EXTERNAL | ct_flags::REPLY_FIB } else { 0 };
    if svc.flags & svc_flags::NODE_PORT != 0 {
        flags |= ct_flags::REPLY_FIB;
    }
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    let rn = RevNat4Value {
        client_addr: p.saddr,
        frontend_addr: p.daddr,
        client_port: p.sport,
        frontend_port: p.dport,
        flags: if flags & ct_flags::REPLY_FIB != 0 { rnat_flags::REPLY_FIB } else { 0 }
            | if hook == Hook::FromPod { rnat_flags::TO_POD } else { 0 },
        last_seen_ns: now,
    };
    if !snat
        && !ct::claim_revnat(
            &ct::tuple(be.addr, p.saddr, be.port, p.sport, p.proto),
            &rn,
            now,
            old.is_some(),
        )?
    {
        // Another live connection from the same client address and port, through another
        // frontend, to the same backend holds the reply tuple: this one gets another source
        // port (the client address is kept), as the kernel's NAT does.
        snat = true;
        snat_addr = p.saddr;
    }
    if snat {
        if snat_addr == 0 {
            return Err(Reason::DropNoSnatAddr);
        }
        let reply = ct::tuple(be.addr, snat_addr, be.port, 0, p.proto);
        n.sport = ct::alloc_snat_port(cfg, &reply, &rn, lb::hash(t), now)?;
        n.saddr = snat_addr;
        flags |= ct_flags::SNAT;
        if hairpin {
            flags |= ct_flags::HAIRPIN;
        }
    }
    // The reverse-NAT entry is in (claimed or with a source-NAT port): misses of its tuple the
    // fast path remembered are void from here on, before the packet leaves, so before any
    // reply can exist. Once per connection, not per insert: the slow paths stay within what
    // the verifier of Linux 5.10 follows.
    maps::rnat_changed();
    let e = Ct4Value {
        backend_id: id,
        svc_id: svc.svc_id,
        backend_addr: be.addr,
        snat_addr: if snat { n.saddr } else { 0 },
        backend_port: be.port,
        snat_port: if snat { n.sport } else { 0 },
        state: ct_state::NEW,
        flags,
        backend_gen: cfg.backend_gen as u16,
        created_ns: now,
        last_seen_ns: now,
    };
    match old {
        Some(ctp) => ct::reopen(ctp, &e),
        None => ct::create(t, &e)?,
    }
    let to = if hairpin {
        To::Bounce
    } else if hook.external() && !local {
        To::Fib
    } else {
        stack_or_direct::<P>(cfg, hook)
    };
    deliver(c, p, &n, to, reason, now)
}

/// A reply of a translated connection: restore the frontend as source and the client as
/// destination.
#[inline(always)]
fn reply_translated<P: Packet>(
    c: &mut P,
    p: &Ip4,
    t: &Tuple4,
    r: ct::RevNatRef,
    cfg: &NodeConfig,
    hook: Hook,
    now: u64,
) -> Out {
    let rn = r.v;
    if hook == Hook::FromPod
        && rn.flags & (rnat_flags::TO_POD | rnat_flags::REPLY_FIB) == rnat_flags::TO_POD
        && rn.client_addr != p.saddr
        && stack_or_direct::<P>(cfg, hook) == To::Stack
    {
        // A local backend's reply to a pod of this node, for the stack to forward as it is:
        // the client pod's hook refreshes the connection and translates it (`TO_POD`).
        return Ok((Verdict::PASS, Reason::PassReplyToPod));
    }
    let mut fl = rn.flags;
    // The connection entry is refreshed by the first reply, by replies carrying SYN, FIN or
    // RST, and at most once a second otherwise (its original direction refreshes it too).
    let control = p.proto == proto::TCP
        && p.tcp_flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0;
    if control
        || fl & rnat_flags::ESTABLISHED == 0
        || now.saturating_sub(rn.last_seen_ns) > ct::TOUCH_NS
    {
        let orig =
            ct::tuple(rn.client_addr, rn.frontend_addr, rn.client_port, rn.frontend_port, p.proto);
        if let Some(ctp) = ct::lookup(&orig, now) {
            ct::touch(ctp, p.proto, p.tcp_flags, true, now);
            // SAFETY: valid map value pointer.
            let ct_fl = unsafe { (*ctp).flags };
            fl = rnat_flags::ESTABLISHED | fl & rnat_flags::TO_POD;
            if ct_fl & ct_flags::REPLY_FIB != 0 {
                fl |= rnat_flags::REPLY_FIB;
            }
            r.refreshed(t, fl, now);
        }
    }
    let n = Nat {
        saddr: rn.frontend_addr,
        sport: rn.frontend_port,
        daddr: rn.client_addr,
        dport: rn.client_port,
    };
    let to = if rn.client_addr == p.saddr && hook == Hook::FromPod {
        // Hairpin reply: back into the pod it came from.
        To::Bounce
    } else if hook.external() && cfg.snat_addr != 0 && t.daddr == cfg.snat_addr {
        // Replies to the node's source-NAT address go back out to an external client.
        To::Fib
    } else if hook != Hook::ToPod && fl & rnat_flags::REPLY_FIB != 0 {
        // Source restored to a node address: straight to the client (see REPLY_FIB).
        To::Fib
    } else {
        stack_or_direct::<P>(cfg, hook)
    };
    if defer_to_tc::<P>(cfg, to) {
        return Ok((Verdict::PASS, Reason::XdpPassToTc));
    }
    if to == To::Stack && hook != Hook::ToPod && fl & rnat_flags::TO_POD != 0 {
        // For the stack to forward as it is (see `rnat_flags::TO_POD`).
        return Ok((Verdict::PASS, Reason::PassReplyToPod));
    }
    deliver(c, p, &n, to, Reason::ReplyTranslated, now)
}

/// Translates and delivers. XDP leaves packets whose neighbour is unresolved to TC, untouched.
/// `now`: the clock, for the route cache ([`nat::route`]).
#[inline(always)]
fn deliver<P: Packet>(c: &mut P, p: &Ip4, n: &Nat, to: To, reason: Reason, now: u64) -> Out {
    deliver_with(c, p, n, None, to, reason, now)
}

/// [`deliver`], also rewriting the packet quoted by an ICMP error.
#[inline(always)]
fn deliver_with<P: Packet>(
    c: &mut P,
    p: &Ip4,
    n: &Nat,
    inner: Option<(&icmp::Inner, &Nat)>,
    to: To,
    reason: Reason,
    now: u64,
) -> Out {
    let mut fbuf = nat::FibBuf::new();
    let f = fbuf.zeroed();
    let mut fib = Fib::None;
    if to == To::Fib {
        match nat::route(c, p, n.saddr, n.daddr, f, now) {
            Fib::Resolved => fib = Fib::Resolved,
            // XDP cannot resolve neighbours: TC does it completely (or counts the drop).
            _ if P::XDP => return Ok((Verdict::PASS, Reason::XdpPassToTc)),
            Fib::NoNeigh => fib = Fib::NoNeigh,
            _ => return Err(Reason::DropFib),
        }
    } else if to == To::Direct && !P::XDP {
        // eBPF host routing; without a route the stack decides, as it would have.
        let r = nat::route(c, p, n.saddr, n.daddr, f, now);
        if r == Fib::Resolved || r == Fib::NoNeigh {
            fib = r;
        }
    }
    nat::apply(c, p, n)?;
    if let Some((i, inn)) = inner {
        icmp::apply_inner(c, i, inn)?;
    }
    match fib {
        Fib::None if to == To::Bounce => Ok((nat::bounce(c)?, reason)),
        Fib::None => Ok((Verdict::PASS, reason)),
        _ => {
            let peer = to == To::Direct && fib == Fib::Resolved && maps::is_pod_dev(f.ifindex);
            Ok((nat::forward(c, p, f, fib, peer)?, reason))
        }
    }
}

/// Whether XDP leaves a packet of a tracked connection (or a reply) that it would hand to the
/// node's stack (`to`) to TC untouched: with eBPF host routing, TC delivers it straight to its
/// destination (XDP cannot put a packet into a pod's namespace), so the reply of a connection
/// from a local pod to a remote backend skips the stack's forwarding path as its original
/// direction does. A new connection is still translated by XDP (its first packet takes the
/// stack; the connection's later packets are TC's).
#[inline(always)]
fn defer_to_tc<P: Packet>(cfg: &NodeConfig, to: To) -> bool {
    P::XDP && to == To::Stack && cfg.flags & cfg_flags::HOST_ROUTING != 0
}

/// Where a packet the node's stack would route goes: the stack, or (eBPF host routing, TC
/// ingress hooks) straight to its destination.
#[inline(always)]
fn stack_or_direct<P: Packet>(cfg: &NodeConfig, hook: Hook) -> To {
    if !P::XDP
        && cfg.flags & cfg_flags::HOST_ROUTING != 0
        && matches!(hook, Hook::FromPod | Hook::TcExt)
    {
        To::Direct
    } else {
        To::Stack
    }
}
