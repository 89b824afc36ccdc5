//! Per-packet cost of the datapath programs under BPF_PROG_TEST_RUN, as the number of services
//! grows, next to pass-through programs (`return XDP_PASS` / `return TC_ACT_OK`) measured the
//! same way in the same run.
//!
//! TEST_RUN with `repeat > 1` runs the program again on the *same* buffer, which the first run
//! already translated, so later repetitions would measure a different path. Each figure is
//! therefore the median of many runs with `repeat = 1` (the kernel's own per-run duration, which
//! includes the same timer overhead for every program).
use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::PathBuf,
};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya_obj::generated::bpf_prog_type;
use kproxy::dataplane::{
    Dataplane,
    loader::{Datapath, MapSizes},
};
use kproxy_common::{
    Backend4, NodeConfig, Service4Key, Service4Value, backend_flags, cfg_flags, names, proto,
    scope, svc_flags,
};

use crate::{
    frames::{ACK, Frame, PSH, SYN},
    lab::xdp::{self, Insn, XDP_PASS_PROGRAM},
};

/// Per-packet costs (ns, medians) at one number of services.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Services in the maps.
    pub services: usize,
    /// `kp_tc_from_pod`, established ClusterIP flow.
    pub tc_established_ns: f64,
    /// `kp_tc_from_pod`, new connection (SYN, a new source port each run).
    pub tc_new_ns: f64,
    /// `kp_tc_to_pod`, a remote backend's reply to an established ClusterIP flow (translated).
    pub to_pod_reply_ns: f64,
    /// `kp_tc_to_pod`, plain pod traffic from a backend's address and port (no connection of
    /// a service: the reverse-NAT lookup misses).
    pub to_pod_plain_ns: f64,
    /// `kp_xdp_ext`, established NodePort flow to a local backend.
    pub xdp_established_ns: f64,
    /// Raw `return TC_ACT_OK`.
    pub tc_pass_ns: f64,
    /// Raw `return XDP_PASS`.
    pub xdp_pass_ns: f64,
}

/// The figures of [`Cost`], by their name in the results.
pub const METRICS: [&str; 7] = [
    "tc_established_ns",
    "tc_new_ns",
    "to_pod_reply_ns",
    "to_pod_plain_ns",
    "xdp_established_ns",
    "tc_pass_ns",
    "xdp_pass_ns",
];

impl Cost {
    /// The figures with their names ([`METRICS`]' order).
    pub fn figures(&self) -> [(&'static str, f64); 7] {
        let v = [
            self.tc_established_ns,
            self.tc_new_ns,
            self.to_pod_reply_ns,
            self.to_pod_plain_ns,
            self.xdp_established_ns,
            self.tc_pass_ns,
            self.xdp_pass_ns,
        ];
        std::array::from_fn(|i| (METRICS[i], v[i]))
    }
}

/// Loads `return TC_ACT_OK` as a sched_cls program.
fn load_tc_pass() -> io::Result<OwnedFd> {
    let insns = [Insn::new(0xb7, 0, 0, 0, 0), Insn::new(0x95, 0, 0, 0, 0)];
    xdp::load(bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS, 0, "kpb_tc_pass", &insns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// Measures the costs at each of `scales` services (ascending), `runs` runs per figure. Must run
/// in a network namespace whose routes do not matter (e.g. a lab node's).
pub fn measure(scales: &[usize], runs: usize) -> Result<Vec<Cost>> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/kproxy-bench-{}-testrun", std::process::id()));
    let _guard = PinDir(pin.clone());
    let max = scales.iter().copied().max().unwrap_or(1) as u32;
    let sizes = MapSizes {
        services: 2 * max + 64,
        backends: max + 64,
        conntrack: ((runs * (scales.len() + 1) * 2) as u32 + 1024).next_power_of_two(),
        affinity: 1024,
        ipv6: true,
    };
    let mut dp = Datapath::load(&pin, &sizes).context("loading the datapath for TEST_RUN")?;
    let mut maps = dp.dataplane()?;
    let node_ip = Ipv4Addr::new(198, 18, 0, 10);
    maps.set_config(&NodeConfig {
        snat_addr: be(node_ip),
        snat_port_min: 61000,
        snat_port_max: 65535,
        flags: cfg_flags::READY,
        backend_gen: 0,
    })?;
    // NodePort service (XDP figure): node IP:30001 → local backend 198.18.100.11:8080.
    let np_backend = max + 10;
    maps.put_backend(
        np_backend,
        &Backend4 {
            addr: be(Ipv4Addr::new(198, 18, 100, 11)),
            port: 8080u16.to_be(),
            proto: proto::TCP,
            flags: backend_flags::LOCAL,
        },
    )?;
    let np_key = Service4Key {
        addr: be(node_ip),
        port: 30001u16.to_be(),
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    maps.put_service(
        &Service4Key { slot: 1, ..np_key },
        &Service4Value { backend_id: np_backend, svc_id: np_backend, ..Default::default() },
    )?;
    maps.put_service(
        &np_key,
        &Service4Value {
            backend_id: 0,
            svc_id: np_backend,
            count: 1,
            flags: svc_flags::NODE_PORT,
            affinity_timeout: 0,
        },
    )?;

    let xdp_pass = xdp::load_xdp("kpb_xdp_pass", &XDP_PASS_PROGRAM)?;
    let tc_pass = load_tc_pass()?;
    let pod = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 10), 41000);
    let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
    let np = SocketAddrV4::new(node_ip, 30001);
    let mut have = 0usize;
    let mut out = Vec::new();
    let mut sport_base = 1024u16;
    for &n in scales {
        // Fill services have+1 ..= n: ClusterIP 198.19.0.0+i:80 → 198.18.128.0+i:8080.
        for i in (have + 1)..=n {
            let id = i as u32;
            maps.put_backend(
                id,
                &Backend4 {
                    addr: be(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + id)),
                    port: 8080u16.to_be(),
                    proto: proto::TCP,
                    flags: 0,
                },
            )?;
            let key = Service4Key {
                addr: be(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + id)),
                port: 80u16.to_be(),
                proto: proto::TCP,
                scope: scope::INTERNAL,
                slot: 0,
                _pad: 0,
            };
            maps.put_service(
                &Service4Key { slot: 1, ..key },
                &Service4Value { backend_id: id, svc_id: id, ..Default::default() },
            )?;
            maps.put_service(
                &key,
                &Service4Value {
                    backend_id: 0,
                    svc_id: id,
                    count: 1,
                    flags: svc_flags::CLUSTER_IP,
                    affinity_timeout: 0,
                },
            )?;
        }
        have = n;
        // The probed service is the last one written.
        let cip = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + n as u32),
            80,
        );
        let sport = sport_base;
        sport_base = sport_base.wrapping_add(1).max(1024);
        let syn = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport), cip, SYN).build();
        let est = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport), cip, ACK | PSH).build();
        let np_syn = Frame::tcp(SocketAddrV4::new(*client.ip(), sport), np, SYN).build();
        let np_est = Frame::tcp(SocketAddrV4::new(*client.ip(), sport), np, ACK | PSH).build();

        let mut run_tc = |prog: &str, frame: &[u8]| -> Result<(u32, f64, Vec<u8>)> {
            let p: &mut SchedClassifier =
                dp.program_mut(prog).with_context(|| format!("no {prog}"))?.try_into()?;
            let mut buf = vec![0u8; 2048];
            let r = p.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut buf),
                ..Default::default()
            })?;
            Ok((r.return_value, r.duration.as_nanos() as f64, buf))
        };
        run_tc(names::PROG_TC_FROM_POD, &syn)?;
        let mut est_ns = Vec::with_capacity(runs);
        let mut verdict = None;
        for _ in 0..runs {
            let (v, ns, _) = run_tc(names::PROG_TC_FROM_POD, &est)?;
            ensure!(verdict.is_none_or(|x| x == v), "kp_tc_from_pod verdict changed between runs");
            verdict = Some(v);
            est_ns.push(ns);
        }
        // The backend's reply to that connection, as it reaches the client pod untranslated
        // (a remote backend whose node did not translate it); checked to come out translated.
        let backend = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n as u32),
            8080,
        );
        let reply = Frame::tcp(backend, SocketAddrV4::new(*pod.ip(), sport), ACK | PSH).build();
        let mut reply_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (_, ns, out) = run_tc(names::PROG_TC_TO_POD, &reply)?;
            ensure!(
                out.get(26..30) == Some(&cip.ip().octets()[..]),
                "kp_tc_to_pod did not translate the backend's reply"
            );
            reply_ns.push(ns);
        }
        // Plain traffic from the same backend port to another pod: hinted as a possible reply,
        // no reverse-NAT entry; it must pass untranslated.
        let plain =
            Frame::tcp(backend, SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 20), 50000), ACK)
                .build();
        let mut plain_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (_, ns, out) = run_tc(names::PROG_TC_TO_POD, &plain)?;
            ensure!(
                out.get(26..30) == Some(&backend.ip().octets()[..]),
                "kp_tc_to_pod rewrote plain pod traffic"
            );
            plain_ns.push(ns);
        }
        let mut new_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            sport_base = sport_base.wrapping_add(1).max(1024);
            let f = Frame::tcp(SocketAddrV4::new(*pod.ip(), sport_base), cip, SYN).build();
            new_ns.push(run_tc(names::PROG_TC_FROM_POD, &f)?.1);
        }
        let mut run_xdp = |frame: &[u8]| -> Result<(u32, f64)> {
            let p: &mut Xdp =
                dp.program_mut(names::PROG_XDP_EXT).context("no kp_xdp_ext")?.try_into()?;
            let mut buf = vec![0u8; 2048];
            let r = p.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut buf),
                ..Default::default()
            })?;
            Ok((r.return_value, r.duration.as_nanos() as f64))
        };
        run_xdp(&np_syn)?;
        let mut xdp_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            xdp_ns.push(run_xdp(&np_est)?.1);
        }
        let mut tcp_ns = Vec::with_capacity(runs);
        let mut xpp_ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            tcp_ns.push(f64::from(xdp::test_run(&tc_pass, &est)?.duration_ns));
            xpp_ns.push(f64::from(xdp::test_run(&xdp_pass, &np_est)?.duration_ns));
        }
        out.push(Cost {
            services: n,
            tc_established_ns: median(est_ns),
            tc_new_ns: median(new_ns),
            to_pod_reply_ns: median(reply_ns),
            to_pod_plain_ns: median(plain_ns),
            xdp_established_ns: median(xdp_ns),
            tc_pass_ns: median(tcp_ns),
            xdp_pass_ns: median(xpp_ns),
        });
    }
    drop(dp);
    Ok(out)
}
