//! kproxy's load generator for the benchmarks: drives TCP or UDP request/response traffic at one
//! address and reports latency percentiles (HDR histogram), rate and CPU time as one JSON line.
//!
//! Modes:
//! - `connect`: each transaction opens a TCP connection, sends one request line, reads the reply
//!   line and closes (new-connection latency and rate);
//! - `rr`: request/response on connections kept open (per-packet translation cost): each
//!   connection starts with the netexec keep-alive line `KEEP`, then one line per transaction;
//! - `udp`: one datagram out, one back.
//!
//! The peer is the lab's test server (`kproxy-netexec`), which answers each request with one line.
//!
//! `--alternate ADDR` (connect and rr modes): every other transaction of each client goes to
//! ADDR instead (rr: on a second kept connection), recorded apart (`alternate` in the output):
//! two paths measured in turns, so that the machine's drift (a busy neighbour, a slower minute)
//! weighs on both alike and their ratio is the paths' difference.
//!
//! Latencies are recorded in nanoseconds (three significant digits) and reported in µs with
//! their fraction: a whole-µs histogram moved a 60 µs request/response figure by 1.7% a step.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, UdpSocket},
    sync::Mutex,
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    Connect,
    Rr,
    Udp,
}

#[derive(Parser, Debug)]
#[command(about = "kproxy benchmark load generator")]
struct Args {
    /// Address to load, IP:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// Traffic pattern.
    #[arg(long, value_enum, default_value = "connect")]
    mode: Mode,
    /// Parallel clients.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Stop after this many transactions to `--target` (0: only the duration limits).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Unmeasured warm-up before the measured part.
    #[arg(long, default_value_t = 200)]
    warmup_ms: u64,
    /// Per-transaction timeout.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// A second address, loaded in turns with `--target` (connect and rr modes): every other
    /// transaction of each client, recorded apart.
    #[arg(long)]
    alternate: Option<SocketAddr>,
}

/// The histograms' upper bound, ns (a minute).
const MAX_NS: u64 = 60_000_000_000;

/// The measured transactions of one address.
struct Tally {
    hist: Mutex<Histogram<u64>>,
    done: AtomicU64,
    errors: AtomicU64,
}

/// An empty latency histogram (ns, three significant digits).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("constant histogram bounds")
}

impl Tally {
    fn new() -> Self {
        Self { hist: Mutex::new(histogram()), done: AtomicU64::new(0), errors: AtomicU64::new(0) }
    }
}

struct Shared {
    /// `--target`'s transactions.
    main: Tally,
    /// `--alternate`'s.
    alt: Tally,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// Kernel jiffies (system + irq + softirq) and total jiffies of all CPUs, from /proc/stat.
/// User time is left out: on a shared machine it is mostly other processes' (builds), while the
/// datapath's cost (netfilter, BPF programs, the TCP/IP stack) is all kernel time.
fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|s| s.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let kernel = [2, 5, 6].iter().map(|&i| v.get(i).copied().unwrap_or(0)).sum();
    Ok((kernel, total))
}

async fn one(
    mode: Mode,
    target: SocketAddr,
    conn: &mut Option<BufReader<TcpStream>>,
    udp: &Option<UdpSocket>,
) -> Result<()> {
    let mut line = String::new();
    match mode {
        Mode::Connect => {
            let mut s = BufReader::new(TcpStream::connect(target).await?);
            s.get_mut().set_nodelay(true)?;
            s.get_mut().write_all(b"bench\n").await?;
            s.read_line(&mut line).await?;
        }
        Mode::Rr => {
            if conn.is_none() {
                let s = TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                let mut s = BufReader::new(s);
                s.get_mut().write_all(b"KEEP\n").await?;
                s.read_line(&mut line).await?;
                if line.is_empty() {
                    bail!("connection closed after KEEP");
                }
                line.clear();
                *conn = Some(s);
            }
            let s = conn.as_mut().expect("connected above");
            s.get_mut().write_all(b"bench\n").await?;
            s.read_line(&mut line).await?;
        }
        Mode::Udp => {
            let sock = udp.as_ref().context("no UDP socket")?;
            sock.send(b"bench\n").await?;
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf).await?;
            line = String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    if line.is_empty() {
        bail!("empty reply");
    }
    Ok(())
}

async fn worker(args: Arc<Args>, shared: Arc<Shared>) {
    let (mut local, mut local_alt) = (histogram(), histogram());
    // Whether the next transaction goes to `--alternate`.
    let mut turn_alt = false;
    // rr mode: the kept connection to each address.
    let (mut conn, mut conn_alt) = (None, None);
    let udp = if args.mode == Mode::Udp {
        match UdpSocket::bind("0.0.0.0:0").await {
            Ok(s) if s.connect(args.target).await.is_ok() => Some(s),
            _ => None,
        }
    } else {
        None
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    while !shared.stop.load(Ordering::Relaxed) {
        let alt = turn_alt;
        let target = if alt { args.alternate.unwrap_or(args.target) } else { args.target };
        turn_alt = args.alternate.is_some() && !turn_alt;
        let t0 = Instant::now();
        let kept = if alt { &mut conn_alt } else { &mut conn };
        let r = tokio::time::timeout(timeout, one(args.mode, target, kept, &udp)).await;
        let ns = t0.elapsed().as_nanos() as u64;
        if !matches!(r, Ok(Ok(()))) {
            // A refused connect fails at once, without ever blocking: under SCHED_FIFO on one
            // CPU this worker thread would then keep the thread whose timer ends the run off
            // the CPU for good. A millisecond's pause after each failure lets it run.
            *kept = None;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !shared.measuring.load(Ordering::Relaxed) {
            continue;
        }
        let (tally, hist) =
            if alt { (&shared.alt, &mut local_alt) } else { (&shared.main, &mut local) };
        match r {
            Ok(Ok(())) => {
                let _ = hist.record(ns.clamp(1, MAX_NS));
                let n = tally.done.fetch_add(1, Ordering::Relaxed) + 1;
                if !alt && args.requests > 0 && n >= args.requests {
                    shared.stop.store(true, Ordering::Relaxed);
                }
            }
            _ => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = shared.main.hist.lock().await.add(&local);
    let _ = shared.alt.hist.lock().await.add(&local_alt);
}

/// The latency figures of one address's transactions.
async fn latency_json(t: &Tally) -> serde_json::Value {
    let h = t.hist.lock().await;
    let us = |ns: u64| ns as f64 / 1e3;
    serde_json::json!({
        "transactions": t.done.load(Ordering::Relaxed),
        "errors": t.errors.load(Ordering::Relaxed),
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
    })
}

fn rusage_s() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(ru.ru_utime), s(ru.ru_stime))
}

fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if args.alternate.is_some() && args.mode == Mode::Udp {
        bail!("--alternate takes turns of TCP transactions: connect or rr mode");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let shared = Arc::new(Shared {
            main: Tally::new(),
            alt: Tally::new(),
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let tasks: Vec<_> = (0..args.concurrency.max(1))
            .map(|_| tokio::spawn(worker(args.clone(), shared.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
        let (busy0, total0) = cpu_jiffies()?;
        let (u0, s0) = rusage_s();
        let t0 = Instant::now();
        shared.measuring.store(true, Ordering::Relaxed);
        let deadline = t0 + Duration::from_millis(args.duration_ms);
        while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shared.measuring.store(false, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let (busy1, total1) = cpu_jiffies()?;
        let (u1, s1) = rusage_s();
        shared.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        // Rate and CPU are the whole load's (both addresses' transactions, when alternating).
        let done = shared.main.done.load(Ordering::Relaxed) + shared.alt.done.load(Ordering::Relaxed);
        // Jiffies are USER_HZ (100/s on Linux).
        let system_cpu_s = (busy1 - busy0) as f64 / 100.0;
        let _ = total1 - total0;
        let mut out = serde_json::json!({
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "target": args.target.to_string(),
            "concurrency": args.concurrency,
            "duration_s": elapsed,
            "rate_per_s": done as f64 / elapsed,
            "loadgen_cpu_s": (u1 - u0) + (s1 - s0),
            "system_cpu_s": system_cpu_s,
            "system_cpu_us_per_transaction": if done > 0 { system_cpu_s * 1e6 / done as f64 } else { 0.0 },
        });
        let lat = latency_json(&shared.main).await;
        for (k, v) in lat.as_object().into_iter().flatten() {
            out[k] = v.clone();
        }
        if let Some(a) = args.alternate {
            let mut alt = latency_json(&shared.alt).await;
            alt["target"] = a.to_string().into();
            out["alternate"] = alt;
        }
        println!("{out}");
        anyhow::Ok(())
    })
}
