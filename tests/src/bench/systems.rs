//! Turning the systems under test on and off in the lab's node 0: the kproxy agent, the
//! kube-proxy-equivalent iptables rules (legacy backend) and nftables rules; timed rule loads in
//! a memory cgroup; metrics of a running agent.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::workload::{self, BService};
use crate::{
    baseline,
    lab::{self, Agent, AgentOpts, Lab},
};

/// Outcome of one timed command.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// CPU seconds (user + system) of the command.
    pub cpu_s: f64,
    /// Memory charged to the command's cgroup when it ended (bytes), if it ran in one.
    pub mem_bytes: Option<u64>,
}

fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// A cgroup v1 memory cgroup created for one measurement and removed on drop.
#[derive(Debug)]
pub struct MemCgroup {
    path: PathBuf,
}

impl MemCgroup {
    /// Creates `/sys/fs/cgroup/memory/kproxy-bench-<pid>-<tag>`.
    pub fn new(tag: &str) -> Result<Self> {
        let path = PathBuf::from(format!(
            "/sys/fs/cgroup/memory/kproxy-bench-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir(&path).with_context(|| {
            format!("creating memory cgroup {} (cgroup v1 memory controller)", path.display())
        })?;
        Ok(Self { path })
    }

    /// Bytes charged to the cgroup (memory.usage_in_bytes).
    pub fn usage(&self) -> Result<u64> {
        let s = std::fs::read_to_string(self.path.join("memory.usage_in_bytes"))?;
        Ok(s.trim().parse()?)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Charges of kernel objects that outlive the cgroup move to the parent.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("bench: could not remove cgroup {}", self.path.display());
    }
}

/// Runs `argv` in network namespace `ns` with `input` on stdin, optionally inside a fresh memory
/// cgroup; fails with stderr on a non-zero exit or after `timeout`.
pub fn run_timed(
    ns: &str,
    argv: &[&str],
    input: &str,
    cgroup_tag: Option<&str>,
    timeout: Duration,
) -> Result<Timed> {
    let cg = cgroup_tag.map(MemCgroup::new).transpose()?;
    let mut t = run_in(ns, argv, input, cg.as_ref(), timeout)?;
    t.mem_bytes = cg.as_ref().map(MemCgroup::usage).transpose()?;
    Ok(t)
}

/// [`run_timed`] inside an existing cgroup (or none); `mem_bytes` is left empty.
fn run_in(
    ns: &str,
    argv: &[&str],
    input: &str,
    cg: Option<&MemCgroup>,
    timeout: Duration,
) -> Result<Timed> {
    let mut cmd = Command::new("sh");
    let procs = cg
        .map(|c| c.path.join("cgroup.procs").to_string_lossy().into_owned())
        .unwrap_or_else(|| "/dev/null".into());
    let netns = format!("--net={}", lab::netns_path(ns).display());
    cmd.args(["-c", "echo $$ > \"$0\" && exec \"$@\"", &procs, "nsenter", &netns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let cpu0 = children_cpu_s();
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {argv:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {timeout:?}", argv.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu_s = children_cpu_s() - cpu0;
    let _ = writer.join();
    let err = reader.join().unwrap_or_default();
    ensure!(status.success(), "{} failed ({status}): {}", argv.join(" "), err.trim());
    Ok(Timed { wall_s, cpu_s, mem_bytes: None })
}

/// iptables-restore binary of the baseline (legacy backend: the faster one on this kernel).
pub const IPT_RESTORE: &str = "iptables-legacy-restore";
/// The IPv6 baseline's restore binary (kube-proxy's IPv6 proxier uses ip6tables-restore).
pub const IP6T_RESTORE: &str = "ip6tables-legacy-restore";

fn restore_bin(ipv6: bool) -> &'static str {
    if ipv6 { IP6T_RESTORE } else { IPT_RESTORE }
}

/// Removes every iptables rule and user chain in namespace `ns` (filter and nat tables).
pub fn iptables_flush(ns: &str) -> Result<()> {
    iptables_flush_family(ns, false)
}

/// [`iptables_flush`] of the IPv4 (iptables) or the IPv6 (ip6tables) tables.
pub fn iptables_flush_family(ns: &str, ipv6: bool) -> Result<()> {
    let bin = restore_bin(ipv6);
    run_timed(ns, &[bin], "*filter\nCOMMIT\n*nat\nCOMMIT\n", None, Duration::from_secs(120))
        .map(drop)
}

/// Loads the kube-proxy-equivalent rules for `ports` into `ns` with the restore binary of the
/// family of `node` (no jumps from the built-in chains, as [`iptables_load`]).
pub fn iptables_load_ports(
    ns: &str,
    node: &baseline::NodeSettings,
    ports: &[baseline::ServicePort],
) -> Result<Timed> {
    let text = baseline::iptables_restore(node, ports);
    let argv = [restore_bin(node.ipv6), "--noflush"];
    run_timed(ns, &argv, &text, None, Duration::from_secs(600))
}

/// Loads the kube-proxy-equivalent rules for `services` into `ns` (without the jumps from the
/// built-in chains: the rules are loaded but not reached until [`iptables_hooks`]).
pub fn iptables_load(
    ns: &str,
    services: &[BService],
    node: usize,
    cg: Option<&str>,
) -> Result<Timed> {
    let text = baseline::iptables_restore(
        &workload::node_settings(node),
        &workload::baseline_ports(services, node),
    );
    run_timed(ns, &[IPT_RESTORE, "--noflush"], &text, cg, Duration::from_secs(600))
}

/// Adds (`on`) or removes the jumps from the built-in chains into kube-proxy's chains.
pub fn iptables_hooks(ns: &str, on: bool) -> Result<Timed> {
    iptables_hooks_family(ns, false, on)
}

/// [`iptables_hooks`] in the IPv4 (iptables) or the IPv6 (ip6tables) tables.
pub fn iptables_hooks_family(ns: &str, ipv6: bool, on: bool) -> Result<Timed> {
    let mut text = String::new();
    for line in baseline::iptables_jumps().lines() {
        if line.starts_with('*') || line == "COMMIT" {
            text.push_str(line);
        } else if let Some(rule) = line.strip_prefix("-A ") {
            text.push_str(if on { "-A " } else { "-D " });
            text.push_str(rule);
        } else {
            continue;
        }
        text.push('\n');
    }
    run_timed(ns, &[restore_bin(ipv6), "--noflush"], &text, None, Duration::from_secs(120))
}

/// The partial restore kube-proxy's iptables proxier writes when `changed` was added or changed
/// while `all` (which includes it) exist: the whole `KUBE-SERVICES` / `KUBE-NODEPORTS` chains
/// rewritten, plus the chains of the changed service.
pub fn iptables_partial(all: &[BService], changed: &BService, node: usize) -> String {
    let settings = workload::node_settings(node);
    let own = baseline::iptables_restore(&settings, &changed.to_baseline(node));
    let mut keep: std::collections::BTreeSet<String> =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for line in own.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if chain.starts_with("KUBE-SVC-")
                || chain.starts_with("KUBE-SEP-")
                || chain.starts_with("KUBE-EXT-")
                || chain.starts_with("KUBE-SVL-")
            {
                keep.insert(chain.to_string());
            }
        }
    }
    let full = baseline::iptables_restore(&settings, &workload::baseline_ports(all, node));
    let mut out = String::new();
    for line in full.lines() {
        let chain = line
            .strip_prefix(':')
            .or_else(|| line.strip_prefix("-A "))
            .and_then(|r| r.split_whitespace().next());
        let take = match chain {
            Some(c) => keep.contains(c),
            None => true, // *table and COMMIT
        };
        if take {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Applies a partial restore (see [`iptables_partial`]).
pub fn iptables_apply(ns: &str, text: &str) -> Result<Timed> {
    run_timed(ns, &[IPT_RESTORE, "--noflush"], text, None, Duration::from_secs(300))
}

const NFT_HOOK_CHAINS: [&str; 6] = [
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    "filter-input",
    "filter-forward",
    "filter-output",
];

/// Loads the kube-proxy-equivalent nftables rules (table `ip kube-proxy`) as `nft -f`
/// transactions of at most `per_txn` services each (see
/// [`baseline::nftables_transactions`]), all in one memory cgroup; the base chains are hooked
/// (active) when this returns. Times and CPU are summed over the transactions.
pub fn nft_load(
    ns: &str,
    services: &[BService],
    node: usize,
    cg: Option<&str>,
    per_txn: usize,
) -> Result<Timed> {
    let txns = baseline::nftables_transactions(
        &workload::node_settings(node),
        &workload::baseline_ports(services, node),
        per_txn,
    );
    let cg = cg.map(MemCgroup::new).transpose()?;
    let mut total = Timed { wall_s: 0.0, cpu_s: 0.0, mem_bytes: None };
    for text in &txns {
        let t = run_in(ns, &["nft", "-f", "-"], text, cg.as_ref(), Duration::from_secs(900))?;
        total.wall_s += t.wall_s;
        total.cpu_s += t.cpu_s;
    }
    total.mem_bytes = cg.as_ref().map(MemCgroup::usage).transpose()?;
    Ok(total)
}

/// Loads the kube-proxy-equivalent nftables rules for `ports` (table `ip kube-proxy` or, for an
/// IPv6 `node`, `ip6 kube-proxy`) in transactions of at most `per_txn` service ports; the base
/// chains are hooked when this returns.
pub fn nft_load_ports(
    ns: &str,
    node: &baseline::NodeSettings,
    ports: &[baseline::ServicePort],
    per_txn: usize,
) -> Result<Timed> {
    let mut total = Timed { wall_s: 0.0, cpu_s: 0.0, mem_bytes: None };
    for text in &baseline::nftables_transactions(node, ports, per_txn) {
        let t = run_in(ns, &["nft", "-f", "-"], text, None, Duration::from_secs(900))?;
        total.wall_s += t.wall_s;
        total.cpu_s += t.cpu_s;
    }
    Ok(total)
}

/// Adds one service to a loaded nftables rule set (what kube-proxy's nftables proxier sends for
/// a new service: its chains and map elements).
pub fn nft_add(ns: &str, svc: &BService, node: usize) -> Result<Timed> {
    let text = baseline::nftables_script(
        &workload::node_settings(node),
        &workload::baseline_ports(std::slice::from_ref(svc), node),
    );
    // Everything but the table's static part: the service's chains, rules and map elements.
    let empty = baseline::nftables_script(&workload::node_settings(node), &[]);
    let fixed: std::collections::HashSet<&str> = empty.lines().collect();
    let delta: String =
        text.lines().filter(|l| !fixed.contains(l)).map(|l| format!("{l}\n")).collect();
    run_timed(ns, &["nft", "-f", "-"], &delta, None, Duration::from_secs(120))
}

/// Hooks (`on`) or unhooks the nftables rule set by filling or flushing its base chains.
pub fn nft_hooks(ns: &str, services_text_on: bool) -> Result<Timed> {
    nft_hooks_table(ns, "ip kube-proxy", services_text_on)
}

/// [`nft_hooks`] of table `t` (`ip kube-proxy` or `ip6 kube-proxy`).
pub fn nft_hooks_table(ns: &str, t: &str, services_text_on: bool) -> Result<Timed> {
    let mut text = String::new();
    for c in NFT_HOOK_CHAINS {
        text.push_str(&format!("flush chain {t} {c}\n"));
    }
    if services_text_on {
        for r in [
            "filter-forward ct state new jump service-endpoints-check",
            "filter-input ct state new jump nodeport-endpoints-check",
            "filter-input ct state new jump service-endpoints-check",
            "filter-output ct state new jump service-endpoints-check",
            "nat-output jump services",
            "nat-postrouting jump masquerading",
            "nat-prerouting jump services",
        ] {
            text.push_str(&format!("add rule {t} {r}\n"));
        }
    }
    run_timed(ns, &["nft", "-f", "-"], &text, None, Duration::from_secs(60))
}

/// Deletes table `ip kube-proxy` if it exists.
pub fn nft_unload(ns: &str) -> Result<()> {
    nft_unload_table(ns, "ip kube-proxy")
}

/// Deletes table `t` (`ip kube-proxy` or `ip6 kube-proxy`) if it exists.
pub fn nft_unload_table(ns: &str, t: &str) -> Result<()> {
    let out = lab::exec(ns, &["nft", "list", "tables"])?;
    let listed = format!("table {t}");
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == listed) {
        let text = format!("delete table {t}\n");
        run_timed(ns, &["nft", "-f", "-"], &text, None, Duration::from_secs(300))?;
    }
    Ok(())
}

/// Numbers from a running agent's `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentMetrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds_sum`.
    pub sync_sum_s: f64,
    /// `kubeproxy_sync_proxy_rules_duration_seconds_count`.
    pub sync_count: u64,
    /// `kproxy_services_programmed`.
    pub frontends: u64,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: when the last sync ended (Unix time).
    pub last_sync_s: f64,
}

/// Reads the metrics of the agent in namespace `ns` (127.0.0.1:10249).
pub fn agent_metrics(ns: &str) -> Result<AgentMetrics> {
    let body = lab::in_netns(ns, || -> Result<String> {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })??;
    let mut m = AgentMetrics::default();
    for line in body.lines() {
        let mut it = line.split_whitespace();
        let (Some(name), Some(v)) = (it.next(), it.next()) else { continue };
        let v: f64 = v.parse().unwrap_or(f64::NAN);
        // kube-proxy's series carry `{ip_family="IPv4"}`.
        match name.split('{').next().unwrap_or(name) {
            "kubeproxy_sync_proxy_rules_duration_seconds_sum" => m.sync_sum_s = v,
            "kubeproxy_sync_proxy_rules_duration_seconds_count" => m.sync_count = v as u64,
            "kproxy_services_programmed" => m.frontends = v as u64,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds" => m.last_sync_s = v,
            _ => {}
        }
    }
    Ok(m)
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub fn proc_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// VmRSS of a process in bytes.
pub fn proc_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kb * 1024)
}

/// RSS of `pid` once it has settled: read every 200 ms until two readings in a row are within
/// 1% of each other (at most `limit`). The agent counts its first sync as done before it
/// reconciles conntrack and returns the first load's freed heap to the system
/// (`malloc_trim`): a reading taken before or during that is the peak, not the agent's steady
/// memory (one run read 253 MiB at 30,000 services where the run before had read 165 MiB).
pub fn settled_rss(pid: u32, limit: Duration) -> Result<u64> {
    let t0 = Instant::now();
    let mut last = proc_rss(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = proc_rss(pid)?;
        if now.abs_diff(last) * 100 <= last || t0.elapsed() >= limit {
            return Ok(now);
        }
        last = now;
    }
}

/// Memory locked by the BPF maps a process holds open (sum of `memlock` over its map fds,
/// each map counted once), from /proc/<pid>/fdinfo.
pub fn proc_bpf_map_bytes(pid: u32) -> Result<u64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else { continue };
        if !info.contains("map_type:") {
            continue;
        }
        let field = |k: &str| {
            info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += mem;
        }
    }
    Ok(total)
}

/// A kproxy agent on node 0 that has programmed its manifests.
pub struct Kproxy {
    /// The agent.
    pub agent: Agent,
    /// Seconds from start until the first sync that holds every service was done.
    pub ready_s: f64,
}

/// Real-time priority (SCHED_FIFO) given to the load generator and the pod servers while they
/// measure latency: on a 2-core machine shared with builds, a woken thread otherwise waits for
/// a CPU for milliseconds, which made every system's p99 ≈ 16 ms (the floor's included).
pub const RT_PRIORITY: &str = "20";

/// Gives every thread of every process in namespace `ns` (the pod servers) SCHED_FIFO
/// priority [`RT_PRIORITY`]; threads they create later inherit it.
pub fn realtime_netns(ns: &str) -> Result<()> {
    super::measure::each_process_of(ns, &["chrt", "-a", "-f", "-p", RT_PRIORITY])
}

/// Starts the agent on node 0 (`binary`, or the kproxy built; `extra` arguments appended,
/// `--xdp-mode auto` when they name no XDP mode, the default on veth being TC alone) and
/// waits until it reports at least `min_frontends` frontends programmed and the ClusterIP probe
/// answers through it.
pub fn start_kproxy(
    lab: &Lab,
    manifests: &Path,
    extra: &[&str],
    binary: Option<&Path>,
    min_frontends: u64,
    timeout: Duration,
) -> Result<Kproxy> {
    // The benchmark's one manifest holds every service: tens of MB at 30,000 services, over the
    // agent's default limit for a manifest file.
    let mut extra_args = vec!["--max-manifest-bytes".to_string(), (1u64 << 30).to_string()];
    // kproxy as it attaches by default unless the caller names a mode (the lab's own default
    // for its agents is generic XDP, for its tests).
    if !lab::names_xdp_mode(extra) {
        extra_args.extend(["--xdp-mode".to_string(), "auto".to_string()]);
    }
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    let opts = AgentOpts {
        manifests_dir: manifests.to_path_buf(),
        extra_args,
        binary: binary.map(Path::to_path_buf),
    };
    let t0 = Instant::now();
    let mut agent = lab.spawn_agent(0, &opts)?;
    let ns = lab.node(0).ns.clone();
    loop {
        if let Some(st) = agent.proc_mut().try_status()? {
            bail!("agent exited ({st}): {}", tail(&agent.log_text()));
        }
        if let Ok(m) = agent_metrics(&ns)
            && m.sync_count >= 1
            && m.frontends >= min_frontends
        {
            break;
        }
        if t0.elapsed() > timeout {
            bail!(
                "agent did not program {min_frontends} frontends within {timeout:?}: {}",
                tail(&agent.log_text())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_s = t0.elapsed().as_secs_f64();
    let client = lab.pod(0, 0).context("client pod")?.ns.clone();
    lab::eventually(Duration::from_secs(10), Duration::from_millis(20), || {
        probe_once(&client, SocketAddrV4::new(workload::PROBE_IP, workload::PROBE_PORT))
    })
    .context("ClusterIP probe through kproxy")?;
    Ok(Kproxy { agent, ready_s })
}

/// Stops the agent and removes its datapath (programs detached, pins removed).
pub fn stop_kproxy(lab: &Lab, k: Kproxy) -> Result<()> {
    let _ = k.agent.stop(Duration::from_secs(3));
    lab.cleanup(0).map(drop)
}

fn tail(s: &str) -> String {
    // Without the terminal colour escapes of the agent's log.
    let mut plain = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    let lines: Vec<&str> = plain.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// One request line to `target` from namespace `ns`; Ok when a reply line came back.
/// One request to `target` from namespace `ns`. The connect timeout is short (20 ms, ~50×
/// the lab's p99 connect time) because a SYN sent before the service is programmed is never
/// answered: the timeout is the resolution of the change-to-connection figures.
pub fn probe_once(ns: &str, target: SocketAddrV4) -> Result<()> {
    lab::in_netns(ns, || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&target.into(), Duration::from_millis(20))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"probe\n")?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf)?;
        ensure!(n > 0, "empty reply from {target}");
        Ok(())
    })?
}

/// How the attempts of [`first_connection`] before the first answered one ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempts {
    /// Refused (an RST or ICMP port unreachable answered the SYN).
    pub refused: u32,
    /// Reset after connecting, or closed without a reply.
    pub reset: u32,
    /// Unanswered for 250 ms.
    pub timed_out: u32,
    /// Failed otherwise (unreachable, no route, ...).
    pub other: u32,
}

impl Attempts {
    fn count(&mut self, e: &std::io::Error) {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => self.refused += 1,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                self.reset += 1
            }
            K::TimedOut => self.timed_out += 1,
            _ => self.other += 1,
        }
    }
}

/// The first connection of [`first_connection`] that got its reply.
#[derive(Debug, Clone, Copy)]
pub struct FirstConnection {
    /// When its reply arrived.
    pub at: Instant,
    /// When that attempt started.
    pub started: Instant,
    /// How the attempts that ended before it ended.
    pub failed: Attempts,
    /// Attempts still waiting for an answer then (started before it, their SYN unanswered, or
    /// after it).
    pub in_flight: usize,
}

impl FirstConnection {
    /// When the answered attempt started (ms after `t0`) and how the others had gone.
    pub fn attempts_since(&self, t0: Instant) -> String {
        let started = self.started.saturating_duration_since(t0).as_secs_f64() * 1e3;
        let f = self.failed;
        format!(
            "the answered connection started at {started:.1} ms; before it {} refused, {} reset, {} unanswered for 250 ms, {} failed otherwise; still unanswered then: {}",
            f.refused, f.reset, f.timed_out, f.other, self.in_flight
        )
    }
}

/// The first connection to `target` from namespace `ns` that got its reply. A new connection is
/// started every `every` (each one abandoned after 250 ms), so the figure's resolution is `every`
/// plus one round trip: a SYN sent before the service is programmed is never answered, and
/// waiting for it would hide when the service became reachable. Fails after `limit`.
pub fn first_connection(
    ns: &str,
    target: SocketAddrV4,
    every: Duration,
    limit: Duration,
) -> Result<FirstConnection> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    lab::in_netns(ns, || -> Result<FirstConnection> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let deadline = Instant::now() + limit;
            let mut attempts = tokio::task::JoinSet::new();
            let mut failed = Attempts::default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    biased;
                    Some(done) = attempts.join_next() => {
                        match done {
                            Ok((started, Ok(at))) => {
                                let in_flight = attempts.len();
                                return Ok(FirstConnection { at, started, failed, in_flight });
                            }
                            Ok((_, Err(e))) => failed.count(&e),
                            Err(_) => failed.other += 1,
                        }
                    }
                    _ = tick.tick() => {
                        ensure!(Instant::now() < deadline, "no connection to {target} within {limit:?}");
                        attempts.spawn(async move {
                            let started = Instant::now();
                            let attempt = async {
                                let mut s = tokio::net::TcpStream::connect(target).await?;
                                s.write_all(b"probe\n").await?;
                                let mut buf = [0u8; 256];
                                let n = s.read(&mut buf).await?;
                                if n == 0 {
                                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                                }
                                Ok(Instant::now())
                            };
                            let r = tokio::time::timeout(Duration::from_millis(250), attempt)
                                .await
                                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                            (started, r)
                        });
                    }
                }
            }
        })
    })?
}
