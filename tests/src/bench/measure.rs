//! Traffic measurements: the load generator (`kproxy-loadgen`), a UDP small-packet blaster with
//! silent sink sockets in the backend pods, iperf3 TCP throughput, and the XDP_TX bounce
//! reference.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::lab::{self, Lab, xdp};

/// One `kproxy-loadgen` result.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Transactions per second.
    pub rate: f64,
    /// System-wide CPU time per transaction, µs.
    pub cpu_us_per_txn: f64,
    /// Transactions measured (latency samples).
    pub samples: f64,
}

/// The latency of the second address of [`loadgen_alternating_in`].
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Transactions measured (latency samples).
    pub samples: f64,
}

/// Unmeasured warm-up of each load generator run, ms (its connections are not in
/// [`Load::samples`] but cross the datapath).
pub const WARMUP_MS: &str = "200";

/// The CPU the new-connection latency load runs on (the last one online), client and pod
/// servers alike ([`PinnedServers`]).
///
/// One connection at a time, client and server otherwise wake each other across the two CPUs of
/// the VM: on 2026-12-04 the floor's p50 read ~150 µs unpinned and ~60–70 µs pinned, the
/// difference being the wake-ups, which every system pays alike and which diluted the
/// datapaths' differences (kproxy's p50 over the floor's: 1.06× unpinned, 1.16× pinned, same
/// build). On one CPU a transaction is the CPU work of the client, the stack, the datapath and
/// the server, which is what the systems differ in.
pub fn latency_cpu() -> usize {
    online_cpus().rsplit([',', '-']).next().and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The online CPUs as the kernel lists them (`0-1`), empty if unknown.
fn online_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default().trim().into()
}

/// Every thread of every process in the pods' namespaces pinned to one CPU until dropped
/// (then allowed on every online CPU again).
pub struct PinnedServers {
    namespaces: Vec<String>,
}

impl PinnedServers {
    /// Pins the processes of `namespaces` to `cpu`.
    pub fn new(namespaces: &[String], cpu: usize) -> Result<Self> {
        let pinned = Self { namespaces: namespaces.to_vec() };
        pinned.set(&cpu.to_string())?;
        Ok(pinned)
    }

    fn set(&self, cpus: &str) -> Result<()> {
        for ns in &self.namespaces {
            each_process_of(ns, &["taskset", "-a", "-p", "-c", cpus])?;
        }
        Ok(())
    }
}

/// Runs `cmd` followed by the pid of each process in namespace `ns` (`chrt -a -p`, `taskset -a
/// -p`: commands that list a process's threads, then set each). A thread (a server's
/// per-connection one) or the process itself (a forked per-query child) may be gone in between,
/// which fails the call (about 1 in 10 under a connection load): a process gone needs nothing,
/// one still there is tried again (its exited threads no longer listed) and fails only if it
/// keeps failing.
pub fn each_process_of(ns: &str, cmd: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(["netns", "pids", ns]).output()?;
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let mut tries = 0;
        loop {
            let out = std::process::Command::new(cmd[0]).args(&cmd[1..]).arg(pid).output()?;
            if out.status.success() || exited(pid) {
                break;
            }
            tries += 1;
            ensure!(
                tries < 5,
                "{} {pid} ({}) in {ns} failed ({}): {}",
                cmd.join(" "),
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Whether process `pid` has exited: no longer in /proc, or a zombie.
fn exited(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, None | Some("Z" | "X"))
}

impl Drop for PinnedServers {
    fn drop(&mut self) {
        let _ = self.set(&online_cpus());
    }
}

/// Runs the load generator in namespace `ns`, in cgroup v2 directory `cgroup` if given (joined
/// before the generator starts, so that every socket it opens belongs to it: the socket LB
/// balances by the socket's cgroup), on CPU `cpu` only if given.
pub fn loadgen_in(
    ns: &str,
    cgroup: Option<&std::path::Path>,
    cpu: Option<usize>,
    target: SocketAddr,
    mode: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    loadgen_with(ns, cgroup, cpu, target, None, mode, concurrency, duration).map(|(l, _)| l)
}

/// [`loadgen_in`] with each client's transactions going to `target` and `alternate` in turns
/// (`mode` connect or rr; rr keeps a connection to each): the latency of each (`Load::rate` and
/// the CPU per transaction count both), measured under the same conditions so that their ratio
/// is the paths' difference and not the machine's drift between two runs. The second address's
/// failure (too many of its transactions failed) is its own: `target`'s figures stand.
#[allow(clippy::too_many_arguments)]
pub fn loadgen_alternating_in(
    ns: &str,
    cgroup: Option<&std::path::Path>,
    cpu: Option<usize>,
    target: SocketAddr,
    alternate: SocketAddr,
    mode: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<(Load, Result<Latency>)> {
    let (l, a) =
        loadgen_with(ns, cgroup, cpu, target, Some(alternate), mode, concurrency, duration)?;
    Ok((l, a.context("loadgen output lacks the alternate address's figures")?))
}

#[allow(clippy::too_many_arguments)]
fn loadgen_with(
    ns: &str,
    cgroup: Option<&std::path::Path>,
    cpu: Option<usize>,
    target: SocketAddr,
    alternate: Option<SocketAddr>,
    mode: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<(Load, Option<Result<Latency>>)> {
    let bin = lab::find_bin("kproxy-loadgen")?;
    let t = target.to_string();
    let c = concurrency.to_string();
    let d = duration.as_millis().to_string();
    let cg = cgroup.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    // `sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' CGROUP ARGV...`
    let join: &[&str] = if cgroup.is_some() {
        &["sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", &cg]
    } else {
        &[]
    };
    let run = [
        "chrt",
        "-f",
        super::systems::RT_PRIORITY,
        &*bin.to_string_lossy(),
        "--target",
        &t,
        "--mode",
        mode,
        "--concurrency",
        &c,
        "--duration-ms",
        &d,
        "--warmup-ms",
        WARMUP_MS,
        "--timeout-ms",
        "1000",
    ];
    let alt = alternate.map(|a| a.to_string());
    let alt_args: Vec<&str> = alt.as_deref().map(|a| vec!["--alternate", a]).unwrap_or_default();
    let cpu = cpu.map(|c| c.to_string());
    let pin: Vec<&str> = cpu.as_deref().map(|c| vec!["taskset", "-c", c]).unwrap_or_default();
    let argv: Vec<&str> =
        join.iter().chain(&pin).chain(run.iter()).chain(&alt_args).copied().collect();
    let out = lab::exec_timeout(ns, &argv, duration + Duration::from_secs(20))?;
    ensure!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| format!("loadgen output {text:?}"))?;
    let num =
        |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("loadgen output lacks {k}"));
    let latency = |v: &Value, to: &str| -> Result<Latency> {
        let done = num(v, "transactions")?;
        let errors = num(v, "errors")?;
        ensure!(done > 0.0, "no transaction succeeded ({errors} errors) to {to}");
        ensure!(errors <= done * 0.01, "{errors} of {} transactions to {to} failed", done + errors);
        Ok(Latency { p50_us: num(v, "p50_us")?, p99_us: num(v, "p99_us")?, samples: done })
    };
    let main = latency(&v, &t)?;
    let load = Load {
        p50_us: main.p50_us,
        p99_us: main.p99_us,
        rate: num(&v, "rate_per_s")?,
        cpu_us_per_txn: num(&v, "system_cpu_us_per_transaction")?,
        samples: main.samples,
    };
    let alt = alt.as_deref().map(|a| latency(&v["alternate"], a));
    Ok((load, alt))
}

/// Silent UDP sockets on [`super::workload::SINK_PORT`] in pods: datagrams are never read, so
/// nothing is sent back; arrivals are counted from the pod's UDP MIB.
pub struct Sinks {
    _socks: Vec<UdpSocket>,
}

impl Sinks {
    /// Binds a sink in each of `pod_namespaces`.
    pub fn new(pod_namespaces: &[String]) -> Result<Self> {
        let mut socks = Vec::new();
        for ns in pod_namespaces {
            let s = lab::in_netns(ns, || {
                UdpSocket::bind(SocketAddrV4::new(
                    Ipv4Addr::UNSPECIFIED,
                    super::workload::SINK_PORT,
                ))
            })??;
            socks.push(s);
        }
        Ok(Self { _socks: socks })
    }
}

/// UDP datagrams that reached the UDP layer of namespace `ns` (InDatagrams + InErrors + NoPorts).
pub fn udp_arrivals(ns: &str) -> Result<u64> {
    let snmp = lab::in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next().context("no Udp header")?.split_whitespace().collect();
    let vals: Vec<u64> = lines
        .next()
        .context("no Udp values")?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |k: &str| names.iter().skip(1).position(|n| *n == k).and_then(|i| vals.get(i));
    Ok(["InDatagrams", "InErrors", "NoPorts"].iter().filter_map(|k| get(k)).sum())
}

/// Threads of the UDP sender (one per core of the 2-core machine: the sender must not be what
/// bounds the rate).
pub const UDP_SENDERS: usize = 2;
/// Datagrams per `sendmmsg` call.
const UDP_BATCH: usize = 64;

/// Sends 18-byte UDP datagrams from namespace `ns` to `target` for `duration` from
/// [`UDP_SENDERS`] threads, each with its own socket (own source port) and `sendmmsg` batches of
/// 64; returns datagrams sent.
pub fn udp_blast(ns: &str, target: SocketAddrV4, duration: Duration) -> Result<u64> {
    let handles: Vec<_> = (0..UDP_SENDERS)
        .map(|_| {
            let ns = ns.to_string();
            std::thread::spawn(move || lab::in_netns(&ns, || blast_one(target, duration))?)
        })
        .collect();
    let mut sent = 0;
    for h in handles {
        sent += h.join().map_err(|_| anyhow::anyhow!("UDP sender thread panicked"))??;
    }
    Ok(sent)
}

fn blast_one(target: SocketAddrV4, duration: Duration) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    let payload = [0x42u8; 18];
    let mut iov =
        [libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: 18 }; UDP_BATCH];
    // SAFETY: mmsghdr is plain data; every field the kernel reads is set below.
    let mut msgs: [libc::mmsghdr; UDP_BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < duration {
        // ENOBUFS / ECONNREFUSED (ICMP) are not fatal for a blast.
        // SAFETY: msgs points at UDP_BATCH initialized headers whose iovecs outlive the call.
        let r = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), UDP_BATCH as u32, 0) };
        if r > 0 {
            sent += r as u64;
        }
    }
    Ok(sent)
}

/// Kernel CPU seconds (system + irq + softirq) of the whole machine so far, from /proc/stat.
/// User time is left out: on a shared machine it is mostly other processes', while a datapath's
/// per-packet cost is all kernel time.
pub fn kernel_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|s| s.parse().ok()).collect();
    Ok([2, 5, 6].iter().map(|&i| v.get(i).copied().unwrap_or(0)).sum::<u64>() as f64 / 100.0)
}

/// One small-packet UDP measurement.
#[derive(Debug, Clone, Copy)]
pub struct UdpRate {
    /// Datagrams that arrived per second.
    pub pps: f64,
    /// Kernel CPU time of the whole machine (sender's syscalls, datapath, receiver) per arrived
    /// datagram, ns.
    pub cpu_ns_per_pkt: f64,
}

/// Small-packet UDP rate through `target` (a NodePort of node 0) into the sink of pod `pod_ns`.
pub fn udp_rate(
    client_ns: &str,
    pod_ns: &str,
    target: SocketAddrV4,
    d: Duration,
) -> Result<UdpRate> {
    let a0 = udp_arrivals(pod_ns)?;
    let c0 = kernel_cpu_s()?;
    let t0 = Instant::now();
    let sent = udp_blast(client_ns, target, d)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = kernel_cpu_s()? - c0;
    std::thread::sleep(Duration::from_millis(100));
    let arrived = udp_arrivals(pod_ns)? - a0;
    ensure!(arrived > 0, "none of {sent} datagrams to {target} reached the backend");
    Ok(UdpRate { pps: arrived as f64 / secs, cpu_ns_per_pkt: cpu * 1e9 / arrived as f64 })
}

/// Packets the underlay port facing node 0 (`n0`) received: what node 0's `eth0` sent.
fn n0_rx(lab: &Lab) -> Result<u64> {
    let out = lab::exec(&lab.underlay_ns(), &["ip", "-s", "-j", "link", "show", "dev", "n0"])?;
    let v: Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
    v[0]["stats64"]["rx"]["packets"].as_u64().context("no rx packet count on n0")
}

/// The reference: a do-nothing XDP program returning XDP_TX on node 0's `eth0` (nothing else
/// attached there), the same blast; packets bounced per second.
pub fn xdp_tx_rate(lab: &Lab, d: Duration) -> Result<f64> {
    let prog = xdp::load_xdp("kpb_xdp_tx", &xdp::XDP_TX_PROGRAM)?;
    let node_ns = lab.node(0).ns.clone();
    let link: OwnedFd = lab::in_netns(&node_ns, || xdp::attach_xdp(&prog, "eth0"))??;
    let target = SocketAddrV4::new(lab::node_ip(0), 9);
    let r = (|| {
        let r0 = n0_rx(lab)?;
        let t0 = Instant::now();
        let sent = udp_blast(&lab.client_ns(), target, d)?;
        let secs = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(100));
        let bounced = n0_rx(lab)? - r0;
        ensure!(bounced > 0, "none of {sent} datagrams was bounced");
        Ok(bounced as f64 / secs)
    })();
    drop(link);
    // The bounced frames carried the client's MAC back into the bridge: let it relearn.
    let _ =
        lab::exec(&lab.client_ns(), &["ping", "-c", "1", "-W", "1", &lab::node_ip(0).to_string()]);
    r
}

/// iperf3 TCP throughput (bits/s received) from namespace `ns` to `target`.
pub fn iperf3(ns: &str, target: SocketAddr, d: Duration) -> Result<f64> {
    iperf3_at(ns, target, d, None)
}

/// [`iperf3`], the sender paced to `rate_bps` bits/s when given (iperf3's `-b`).
pub fn iperf3_at(ns: &str, target: SocketAddr, d: Duration, rate_bps: Option<f64>) -> Result<f64> {
    let secs = format!("{}", d.as_secs_f64().max(1.0));
    let ip = target.ip().to_string();
    let port = target.port().to_string();
    let rate = rate_bps.map(|r| format!("{}", r.round() as u64));
    let mut args =
        vec!["iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-J", "--connect-timeout", "2000"];
    if let Some(r) = &rate {
        args.extend(["-b", r.as_str()]);
    }
    let out = lab::exec_timeout(ns, &args, d + Duration::from_secs(15))?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 to {target}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 output lacks end.sum_received")?;
    ensure!(bps > 0.0, "iperf3 to {target} moved no data");
    Ok(bps)
}
