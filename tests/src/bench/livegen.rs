//! NodePort packet rate with a generator whose own cost per packet is far below the datapath's:
//! `BPF_PROG_TEST_RUN` in live-frame mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18+), the way
//! xdp-trafficgen generates traffic.
//!
//! The generator is a tiny XDP program run by the kernel in a loop from the underlay namespace,
//! as if each frame had arrived on the underlay port facing node 0 (`n0`); it writes a UDP
//! datagram from the external client to the NodePort into the frame and returns `XDP_TX`, which
//! live mode turns into a transmit out of `n0`: the frame lands in the receive ring of node 0's
//! `eth0` (veth `ndo_xdp_xmit`), whose NAPI runs the datapath under test. No socket, no skb, no
//! bridge on the way in. The page pool of live mode recycles frames without rewriting them
//! (a datapath that translated a frame would otherwise see its own output again), hence the
//! program writes the whole frame every time.
//!
//! What comes out is counted where it leaves: a sink XDP program replaces the lab's `XDP_PASS`
//! on the device the translated frame arrives at (`n0` for a remote backend, which node 0's
//! `eth0` transmits to; the backend pod's `eth0` for a local one). It drops, and so counts in
//! the veth's `xdp_drops`, exactly the frames addressed as the datapath must have translated
//! them (backend address and target port), and passes everything else (ARP, other traffic), so a
//! datapath that forwards untranslated frames measures zero.
//!
//! Everything runs in the softirq of the generator's CPU (the generator thread runs with
//! real-time priority), so the rate is one CPU's worth of generator + datapath + sink per frame:
//! frames counted at the sink per second of the kernel's own timing of the generator loop, which
//! stops while the thread is scheduled out (the wall-clock rate on a shared 2-core machine
//! would measure the other work and the page pool set-up of each call).
use std::{
    net::SocketAddrV4,
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use kproxy::dataplane::sys::{self, bpf_cmd};
use serde_json::Value;

use crate::{
    frames::Frame,
    lab::{
        self, Lab,
        xdp::{self, Insn},
    },
};

/// `BPF_F_TEST_XDP_LIVE_FRAMES`.
const LIVE_FRAMES: u32 = 1 << 1;
/// Frames per batch (the kernel's default, NAPI's budget).
const BATCH: u32 = 64;

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// 18-byte payload, as the socket blast sends.
const PAYLOAD: [u8; 18] = [0x42; 18];
/// Source port of the generated datagrams (one flow).
const SRC_PORT: u16 = 40_000;

fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    Insn::new(0x61, dst, src, off, 0)
}

fn ldx_h(dst: u8, src: u8, off: i16) -> Insn {
    Insn::new(0x69, dst, src, off, 0)
}

fn mov_reg(dst: u8, src: u8) -> Insn {
    Insn::new(0xbf, dst, src, 0, 0)
}

fn add_imm(dst: u8, imm: i32) -> Insn {
    Insn::new(0x07, dst, 0, 0, imm)
}

fn mov_imm(dst: u8, imm: i32) -> Insn {
    Insn::new(0xb7, dst, 0, 0, imm)
}

/// `if dst > src goto +off` (64-bit, unsigned).
fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    Insn::new(0x2d, dst, src, off, 0)
}

/// `if (u32)dst != imm goto +off`.
fn jne32_imm(dst: u8, imm: i32, off: i16) -> Insn {
    Insn::new(0x56, dst, 0, off, imm)
}

const EXIT: Insn = Insn::new(0x95, 0, 0, 0, 0);

/// The generator: writes `frame` over the packet (which live mode gives it at that length) and
/// returns `XDP_TX`; a packet shorter than the frame is dropped (never the case).
pub fn generator_program(frame: &[u8]) -> Vec<Insn> {
    let len = frame.len();
    let mut stores = Vec::new();
    let mut off = 0;
    while off < len {
        let (code, width) = match len - off {
            4.. => (0x62, 4), // *(u32 *)(r2 + off) = imm
            2..=3 => (0x6a, 2),
            _ => (0x72, 1),
        };
        let mut b = [0u8; 4];
        b[..width].copy_from_slice(&frame[off..off + width]);
        stores.push(Insn::new(code, 2, 0, off as i16, i32::from_le_bytes(b)));
        off += width;
    }
    let mut p = vec![
        ldx_w(2, 1, 0), // r2 = ctx->data
        ldx_w(3, 1, 4), // r3 = ctx->data_end
        mov_reg(4, 2),
        add_imm(4, len as i32),
        jgt_reg(4, 3, stores.len() as i16 + 2), // too short: to the drop below
    ];
    p.extend(stores);
    p.extend([mov_imm(0, XDP_TX), EXIT, mov_imm(0, XDP_DROP), EXIT]);
    p
}

/// The sink: drops (counted by the veth as `xdp_drops`) UDP frames to `dst`, passes the rest.
/// Assumes an IPv4 header without options, as the generated frames have.
pub fn sink_program(dst: SocketAddrV4) -> Vec<Insn> {
    let addr = i32::from_le_bytes(dst.ip().octets());
    let port = i32::from(u16::from_le_bytes(dst.port().to_be_bytes()));
    let proto_off = 14 + 9;
    vec![
        ldx_w(2, 1, 0),
        ldx_w(3, 1, 4),
        mov_reg(4, 2),
        add_imm(4, 14 + 20 + 8),
        jgt_reg(4, 3, 8), // shorter than Ethernet + IPv4 + UDP: pass
        Insn::new(0x71, 5, 2, proto_off, 0), // r5 = *(u8 *)(r2 + 23), the IP protocol
        jne32_imm(5, 17, 6),
        ldx_w(5, 2, 14 + 16), // IPv4 destination
        jne32_imm(5, addr, 4),
        ldx_h(5, 2, 14 + 20 + 2), // UDP destination port
        jne32_imm(5, port, 2),
        mov_imm(0, XDP_DROP),
        EXIT,
        mov_imm(0, XDP_PASS),
        EXIT,
    ]
}

/// A kernel that refuses `BPF_PROG_TEST_RUN` in live-frame mode to root (`EPERM`: a build can
/// withhold it, as this machine's 6.18.44 does): the live-frame figures are not measured there,
/// and say why.
#[derive(Debug)]
pub struct LiveFramesRefused;

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "this kernel refuses BPF_PROG_TEST_RUN with live frames (EPERM): no live-frame \
             generator here",
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

/// `BPF_PROG_TEST_RUN` of `prog` in live-frame mode: `repeat` frames of `frame` as if received on
/// `ifindex` of the calling thread's network namespace. Returns the kernel's time per frame, ns
/// (the whole loop: program, transmit, and the receive processing it triggers on this CPU).
fn run_live(prog: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> Result<u32> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = sys::attr();
    // SAFETY: union access; the test-run member is the one BPF_PROG_TEST_RUN reads.
    let t = unsafe { &mut attr.test };
    t.prog_fd = prog.as_raw_fd() as u32;
    t.data_size_in = frame.len() as u32;
    t.data_in = frame.as_ptr() as u64; // data_out stays 0: live mode refuses it
    t.repeat = repeat;
    t.ctx_size_in = std::mem::size_of_val(&ctx) as u32;
    t.ctx_in = ctx.as_ptr() as u64;
    t.flags = LIVE_FRAMES;
    t.batch_size = BATCH;
    // SAFETY: the pointers (frame, ctx) outlive the call.
    match unsafe { sys::bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr) } {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Err(LiveFramesRefused.into()),
        Err(e) => return Err(e).context("BPF_PROG_TEST_RUN with live frames (Linux 5.18+)"),
    }
    // SAFETY: union access, written by the kernel.
    Ok(unsafe { attr.test.duration })
}

/// `(ifindex, MAC)` of `dev` in namespace `ns`.
fn link_info(ns: &str, dev: &str) -> Result<(u32, [u8; 6])> {
    let out = lab::exec(ns, &["ip", "-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j link show dev {dev} in {ns}"))?;
    let index = v[0]["ifindex"].as_u64().with_context(|| format!("no ifindex for {dev}"))?;
    let text = v[0]["address"].as_str().with_context(|| format!("no MAC for {dev}"))?;
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text:?} of {dev}"))?;
    }
    Ok((index as u32, mac))
}

/// Frames a veth dropped with XDP (`xdp_drops` of every receive queue, `ethtool -S`).
pub fn xdp_drops(ns: &str, dev: &str) -> Result<u64> {
    let out = lab::exec(ns, &["ethtool", "-S", dev])?;
    ensure!(
        out.status.success(),
        "ethtool -S {dev} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = false;
    let mut sum = 0;
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else { continue };
        if k.starts_with("rx_queue_") && k.ends_with("_xdp_drops") {
            found = true;
            sum += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    ensure!(found, "ethtool -S {dev} in {ns} lists no xdp_drops counter");
    Ok(sum)
}

/// Generic receive offload switched on for a device (a veth without an XDP program of its own
/// takes `ndo_xdp_xmit` frames from its peer only with NAPI on, which GRO switches on), back to
/// how it was when dropped.
pub struct GroOn {
    ns: String,
    dev: String,
    was_on: bool,
}

impl GroOn {
    /// Switches GRO on for `dev` in `ns`.
    pub fn new(ns: &str, dev: &str) -> Result<Self> {
        let out = lab::exec(ns, &["ethtool", "-k", dev])?;
        let was_on = String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("generic-receive-offload: on"));
        let st = lab::exec(ns, &["ethtool", "-K", dev, "gro", "on"])?;
        ensure!(st.status.success(), "ethtool -K {dev} gro on in {ns} failed");
        Ok(Self { ns: ns.into(), dev: dev.into(), was_on })
    }
}

impl Drop for GroOn {
    fn drop(&mut self) {
        if !self.was_on {
            let _ = lab::exec(&self.ns, &["ethtool", "-K", &self.dev, "gro", "off"]);
        }
    }
}

/// The traffic source: datagrams from the external client to a NodePort of node 0, injected on
/// the underlay port facing node 0.
pub struct Generator {
    prog: OwnedFd,
    frame: Vec<u8>,
    underlay: String,
    ifindex: u32,
}

/// One live-frame measurement.
#[derive(Debug, Clone, Copy)]
pub struct LiveRate {
    /// Frames counted at the sink per second of the generating CPU's kernel time (see
    /// [`LiveRate::ns_per_frame`]): what one CPU does of generator + datapath + sink.
    pub pps: f64,
    /// Frames generated.
    pub sent: u64,
    /// Share of the generated frames counted at the sink (below 1: the datapath or a ring
    /// dropped some).
    pub delivered: f64,
    /// The kernel's time per generated frame (generator, datapath and sink, on one CPU), ns.
    pub ns_per_frame: f64,
}

impl Generator {
    /// A generator of UDP datagrams from the client to `target` (node 0's address and a
    /// NodePort).
    pub fn new(lab: &Lab, target: SocketAddrV4) -> Result<Self> {
        let underlay = lab.underlay_ns();
        let (ifindex, _) = link_info(&underlay, "n0")?;
        let (_, node_mac) = link_info(&lab.node(0).ns, "eth0")?;
        let (_, client_mac) = link_info(&lab.client_ns(), "eth0")?;
        let frame = Frame::udp(SocketAddrV4::new(lab::CLIENT_IP, SRC_PORT), target, &PAYLOAD)
            .with_macs(node_mac, client_mac)
            .build();
        let prog = xdp::load_xdp("kpb_livegen", &generator_program(&frame))?;
        Ok(Self { prog, frame, underlay, ifindex })
    }

    /// Generates for `d` (wall clock) from a real-time thread in the underlay namespace; returns
    /// frames sent and the kernel's time spent generating them, s (`BPF_PROG_TEST_RUN`'s own
    /// timing: the program, the transmit and the softirq work it triggers on this CPU; it stops
    /// while the thread is scheduled out, so other work on the machine stays out of it).
    fn run(&self, d: Duration) -> Result<(u64, f64)> {
        lab::in_netns(&self.underlay, || -> Result<(u64, f64)> {
            let prio: i32 = super::systems::RT_PRIORITY.parse().unwrap_or(20);
            let param = libc::sched_param { sched_priority: prio };
            // SAFETY: sets the calling thread's scheduling policy; `param` is valid.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            let t0 = Instant::now();
            let (mut sent, mut kernel_ns) = (0u64, 0f64);
            let mut repeat = 65_536u32;
            while t0.elapsed() < d {
                let per = run_live(&self.prog, &self.frame, self.ifindex, repeat)?;
                sent += u64::from(repeat);
                let call_ns = f64::from(per) * f64::from(repeat);
                kernel_ns += call_ns;
                // About 50 ms of generation per call: each call also sets up and tears down its
                // page pool, 20–30 ms of wall time per call on this VM outside the kernel's
                // timing, which made short calls mostly wait.
                let next = f64::from(repeat) * 50e6 / call_ns.max(1.0);
                repeat = next.clamp(4096.0, 4_194_304.0) as u32;
            }
            Ok((sent, kernel_ns / 1e9))
        })?
    }

    /// Frames per second that reach the sink on `dev` of `ns` (a device the lab runs its
    /// `XDP_PASS` on) addressed to `expect`, over `d` after a short warm-up (neighbour
    /// resolution, connection entries).
    pub fn rate(
        &self,
        lab: &Lab,
        sink_ns: &str,
        sink_dev: &str,
        expect: SocketAddrV4,
        d: Duration,
    ) -> Result<LiveRate> {
        let sink = xdp::load_xdp("kpb_sink", &sink_program(expect))?;
        let _swap = lab.swap_xdp_pass(sink_ns, sink_dev, &sink)?;
        self.count(sink_ns, sink_dev, expect, d)
    }

    /// The generator alone: the sink attached to node 0's `eth0` itself, so the rate is the
    /// generator's, one veth transmit and one XDP run (nothing attached to `eth0` before).
    pub fn alone(&self, lab: &Lab, d: Duration) -> Result<LiveRate> {
        let node = lab.node(0).ns.clone();
        let expect = SocketAddrV4::new(lab::node_ip(0), self.dst_port());
        let sink = xdp::load_xdp("kpb_sink", &sink_program(expect))?;
        let _link: OwnedFd = lab::in_netns(&node, || xdp::attach_xdp(&sink, "eth0"))??;
        self.count(&node, "eth0", expect, d)
    }

    fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.frame[36], self.frame[37]])
    }

    fn count(&self, ns: &str, dev: &str, expect: SocketAddrV4, d: Duration) -> Result<LiveRate> {
        self.run(Duration::from_millis(50))?;
        std::thread::sleep(Duration::from_millis(20));
        let c0 = xdp_drops(ns, dev)?;
        let (sent, kernel_s) = self.run(d)?;
        std::thread::sleep(Duration::from_millis(50));
        let got = xdp_drops(ns, dev)? - c0;
        ensure!(
            got > 0,
            "none of {sent} generated frames reached {dev} in {ns} addressed to {expect}"
        );
        Ok(LiveRate {
            pps: got as f64 / kernel_s.max(1e-9),
            sent,
            delivered: got as f64 / sent.max(1) as f64,
            ns_per_frame: kernel_s * 1e9 / sent.max(1) as f64,
        })
    }
}

/// Where a NodePort's datagrams must come out of node 0, translated: `(namespace, device,
/// destination)`. A remote backend's leave through `eth0` and arrive at the underlay port `n0`;
/// a local backend's arrive at the pod's `eth0`.
pub fn sink_of(
    lab: &Lab,
    backend: (usize, usize),
    port: u16,
) -> Result<(String, String, SocketAddrV4)> {
    let dst = SocketAddrV4::new(lab::pod_ip(backend.0, backend.1), port);
    if backend.0 == 0 {
        let pod = lab.pod(backend.0, backend.1).context("backend pod")?;
        Ok((pod.ns.clone(), "eth0".into(), dst))
    } else {
        Ok((lab.underlay_ns(), "n0".into(), dst))
    }
}

/// Node 0's own address at `port`: where the XDP_TX bounce sends the generated frames back
/// (unchanged) and the sink on `n0` expects them.
pub fn bounce_target(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(lab::node_ip(0), port)
}

#[cfg(test)]
mod tests {
    //! The generator and the sink under `BPF_PROG_TEST_RUN` (one frame, not live; needs root).
    use std::net::Ipv4Addr;

    use super::*;

    /// Runs `prog` once on `data`: (XDP verdict, the packet afterwards).
    fn test_run(prog: &OwnedFd, data: &[u8]) -> (u32, Vec<u8>) {
        let r = xdp::test_run(prog, data).expect("BPF_PROG_TEST_RUN");
        (r.retval, r.data)
    }

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 1), 40_000);
    const BACKEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 2), 9);

    #[test]
    fn the_generator_writes_its_frame_over_any_packet_and_transmits_it() {
        let frame =
            Frame::udp(CLIENT, SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 30_002), &PAYLOAD)
                .with_macs([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .build();
        let prog = xdp::load_xdp("kpb_livegen", &generator_program(&frame)).unwrap();
        // What live mode recycles: an earlier frame, possibly translated by the datapath.
        let stale = Frame::udp(CLIENT, BACKEND, &PAYLOAD).build();
        assert_eq!(stale.len(), frame.len());
        let (verdict, out) = test_run(&prog, &stale);
        assert_eq!(verdict, XDP_TX as u32);
        assert_eq!(out, frame);
        crate::frames::verify_checksums(&out).unwrap();
        // Shorter than the frame: dropped, never written past the packet.
        let (verdict, _) = test_run(&prog, &frame[..frame.len() - 1]);
        assert_eq!(verdict, XDP_DROP as u32);
    }

    #[test]
    fn the_sink_drops_exactly_the_translated_frames() {
        let prog = xdp::load_xdp("kpb_sink", &sink_program(BACKEND)).unwrap();
        let verdict = |f: Vec<u8>| test_run(&prog, &f).0;
        assert_eq!(verdict(Frame::udp(CLIENT, BACKEND, &PAYLOAD).build()), XDP_DROP as u32);
        // Not translated (the NodePort still), another port, another address, TCP: passed.
        let nodeport = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 30_002);
        for other in [
            Frame::udp(CLIENT, nodeport, &PAYLOAD).build(),
            Frame::udp(CLIENT, SocketAddrV4::new(*BACKEND.ip(), 10), &PAYLOAD).build(),
            Frame::udp(CLIENT, SocketAddrV4::new(Ipv4Addr::new(198, 18, 64, 3), 9), &PAYLOAD)
                .build(),
            Frame::tcp(CLIENT, BACKEND, 0x02).build(),
        ] {
            assert_eq!(verdict(other), XDP_PASS as u32);
        }
        // Too short for Ethernet + IPv4 + UDP: passed.
        assert_eq!(verdict(vec![0u8; 20]), XDP_PASS as u32);
    }
}
