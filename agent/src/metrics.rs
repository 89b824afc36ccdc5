//! Prometheus metrics (text format) and the kube-proxy style `/healthz`, served by a small
//! hand-written HTTP/1.1 server on tokio.
//!
//! Names follow kube-proxy where the meaning is the same (`kubeproxy_sync_proxy_rules_*`,
//! `kubeproxy_network_programming_duration_seconds`); kproxy's own are prefixed `kproxy_`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use kproxy_common::{Reason, names};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{dataplane::DataplaneError, sync::SyncError};

/// A cumulative histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending); `+Inf` is implicit.
    pub fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Self { bounds, counts: vec![0; n], sum: 0.0, count: 0 }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// kube-proxy's buckets for sync durations: 1 ms doubling to about 16 s.
fn sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// kube-proxy's buckets for network programming latency (0.25 s to 410 s).
fn programming_buckets() -> Vec<f64> {
    let mut v = vec![0.25, 0.5];
    v.extend((1..=59).map(f64::from));
    v.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    v.extend((0..12).map(|i| 300.0 + 10.0 * f64::from(i)));
    v
}

/// How long a queued change may wait for a sync before `/healthz` turns unhealthy
/// (kube-proxy: twice the sync period).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Health {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
}

/// All metrics of the agent. Shared (`Arc`) between the sync loop and the HTTP servers.
#[derive(Debug)]
pub struct Metrics {
    sync_duration: Mutex<Histogram>,
    programming: Mutex<Histogram>,
    last_sync: AtomicU64,
    services: AtomicU64,
    backends: AtomicU64,
    manifest_errors: AtomicU64,
    sync_errors: Mutex<BTreeMap<&'static str, u64>>,
    packets: Mutex<Vec<(Reason, u64)>>,
    conntrack: Mutex<Option<(crate::dataplane::conntrack::CtStats, u64)>>,
    health: Mutex<Health>,
    maps: Mutex<Vec<MapUsage>>,
    map_full: Mutex<BTreeMap<&'static str, u64>>,
    devices: [AtomicU64; 2],
    device_attach_errors: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sync_duration: Mutex::new(Histogram::new(sync_buckets())),
            programming: Mutex::new(Histogram::new(programming_buckets())),
            last_sync: AtomicU64::new(0),
            services: AtomicU64::new(0),
            backends: AtomicU64::new(0),
            manifest_errors: AtomicU64::new(0),
            sync_errors: Mutex::new(BTreeMap::new()),
            packets: Mutex::new(Vec::new()),
            conntrack: Mutex::new(None),
            health: Mutex::new(Health::default()),
            maps: Mutex::new(Vec::new()),
            // Listed from the start, so `increase()` sees the first failure.
            map_full: Mutex::new(
                MAP_LABELS
                    .iter()
                    .filter(|(p, _)| SYNCED_MAPS.contains(p))
                    .map(|(_, l)| (*l, 0))
                    .collect(),
            ),
            devices: [AtomicU64::new(0), AtomicU64::new(0)],
            device_attach_errors: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Records a completed sync.
    pub fn sync_done(&self, took: Duration, at: SystemTime, frontends: usize, backends: usize) {
        lock(&self.sync_duration).observe(took.as_secs_f64());
        let ts = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.last_sync.store(ts.to_bits(), Ordering::Relaxed);
        self.services.store(frontends as u64, Ordering::Relaxed);
        self.backends.store(backends as u64, Ordering::Relaxed);
        let mut h = lock(&self.health);
        h.last_updated = Some(at);
        h.oldest_pending = None;
    }

    /// Notes that a change is waiting for a sync (for `/healthz`).
    pub fn change_queued(&self, at: SystemTime) {
        lock(&self.health).oldest_pending.get_or_insert(at);
    }

    /// Records one network programming latency (seconds from the trigger to programmed).
    pub fn observe_programming(&self, secs: f64) {
        lock(&self.programming).observe(secs);
    }

    /// Counts a sync error by kind.
    pub fn sync_error(&self, kind: &'static str) {
        *lock(&self.sync_errors).entry(kind).or_default() += 1;
    }

    /// Counts a failed part of a sync by kind and, when a map was full, by map
    /// (`kproxy_map_full_errors_total`).
    pub fn sync_failed(&self, e: &SyncError) {
        self.sync_error(e.kind());
        let full = match e {
            SyncError::Service { source, .. } | SyncError::Remove { source, .. } => source,
            _ => return,
        };
        if let DataplaneError::Full { map, .. } = full {
            *lock(&self.map_full).entry(map_label(map)).or_default() += 1;
        }
    }

    /// Replaces the sampled map fill levels.
    pub fn set_map_usage(&self, usage: Vec<MapUsage>) {
        *lock(&self.maps) = usage;
    }

    /// Sets the number of devices carrying kproxy's programs.
    pub fn set_devices_attached(&self, external: usize, pod: usize) {
        self.devices[0].store(external as u64, Ordering::Relaxed);
        self.devices[1].store(pod as u64, Ordering::Relaxed);
    }

    /// Counts a failed attachment to a device.
    pub fn device_attach_failed(&self) {
        self.device_attach_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts manifest files that failed to parse.
    pub fn manifest_errors(&self, n: u64) {
        self.manifest_errors.fetch_add(n, Ordering::Relaxed);
    }

    /// Replaces the packet counters (summed over CPUs, read from the datapath).
    pub fn set_packets(&self, counters: Vec<(Reason, u64)>) {
        *lock(&self.packets) = counters;
    }

    /// Replaces the connection-tracking numbers (from the conntrack GC) and the monotonic
    /// eviction count.
    pub fn set_conntrack(&self, stats: crate::dataplane::conntrack::CtStats, evictions: u64) {
        *lock(&self.conntrack) = Some((stats, evictions));
    }

    /// The `/healthz` answer at `now`: status code and JSON body, like kube-proxy's.
    pub fn healthz(&self, now: SystemTime) -> (u16, String) {
        let h = lock(&self.health);
        let healthy = h.last_updated.is_some()
            && h.oldest_pending
                .is_none_or(|p| now.duration_since(p).unwrap_or_default() < HEALTH_TIMEOUT);
        let ts = |t: Option<SystemTime>| {
            t.and_then(|t| jiff::Timestamp::try_from(t).ok())
                .map(|t| format!("\"{t}\""))
                .unwrap_or_else(|| "null".into())
        };
        let body = format!(
            "{{\"lastUpdated\": {}, \"currentTime\": {}, \"nodeEligible\": true}}",
            ts(h.last_updated),
            ts(Some(now))
        );
        (if healthy { 200 } else { 503 }, body)
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        lock(&self.sync_duration).render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Duration of one sync of the datapath, in seconds.",
        );
        let last = f64::from_bits(self.last_sync.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time the datapath was synced.\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {last}"
        );
        lock(&self.programming).render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "Time from an EndpointSlice change (last-change-trigger-time) to the datapath holding it.",
        );
        for (name, help, v) in [
            (
                "kproxy_services_programmed",
                "Service entries (frontends) in the datapath.",
                &self.services,
            ),
            ("kproxy_backends_programmed", "Backends in the datapath.", &self.backends),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP kproxy_manifest_errors_total Manifest files that failed to read or parse.\n# TYPE kproxy_manifest_errors_total counter\nkproxy_manifest_errors_total {}",
            self.manifest_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP kproxy_sync_errors_total Failed parts of syncs, by kind.\n# TYPE kproxy_sync_errors_total counter"
        );
        for (kind, n) in lock(&self.sync_errors).iter() {
            let _ = writeln!(out, "kproxy_sync_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kproxy_packets_total Packets by the reason of their verdict, summed over hooks and CPUs.\n# TYPE kproxy_packets_total counter"
        );
        for (reason, n) in lock(&self.packets).iter() {
            let _ = writeln!(out, "kproxy_packets_total{{reason=\"{}\"}} {n}", reason.name());
        }
        let maps = lock(&self.maps);
        for (name, help, value) in [
            (
                "kproxy_map_entries",
                "Entries in a BPF map (sampled periodically).",
                (|u: &MapUsage| u.entries as f64) as fn(&MapUsage) -> f64,
            ),
            ("kproxy_map_capacity", "Capacity (max_entries) of a BPF map.", |u| {
                f64::from(u.capacity)
            }),
            ("kproxy_map_pressure", "Fill level of a BPF map: entries / capacity.", |u| {
                u.pressure()
            }),
            ("kproxy_map_memory_bytes", "Kernel memory a BPF map uses, bytes.", |u| u.bytes as f64),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for u in maps.iter() {
                let _ = writeln!(out, "{name}{{map=\"{}\"}} {}", u.map, value(u));
            }
        }
        drop(maps);
        let _ = writeln!(
            out,
            "# HELP kproxy_map_full_errors_total Writes of a sync that failed because the map was full.\n# TYPE kproxy_map_full_errors_total counter"
        );
        for (map, n) in lock(&self.map_full).iter() {
            let _ = writeln!(out, "kproxy_map_full_errors_total{{map=\"{map}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kproxy_devices_attached Devices carrying kproxy's programs, by kind.\n# TYPE kproxy_devices_attached gauge"
        );
        for (kind, v) in ["external", "pod"].iter().zip(&self.devices) {
            let _ = writeln!(
                out,
                "kproxy_devices_attached{{kind=\"{kind}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP kproxy_device_attach_errors_total Failed attempts to attach programs to a device.\n# TYPE kproxy_device_attach_errors_total counter\nkproxy_device_attach_errors_total {}",
            self.device_attach_errors.load(Ordering::Relaxed)
        );
        if let Some((ct, evictions)) = *lock(&self.conntrack) {
            ct.render_prometheus(evictions, &mut out);
        }
        out
    }
}

/// Maps whose fill is reported, pinned name → metric label.
pub const MAP_LABELS: [(&str, &str); 7] = [
    (names::SERVICES4, "services"),
    (names::BACKENDS4, "backends"),
    (names::CT4, "conntrack"),
    (names::REVNAT4, "revnat"),
    (names::AFFINITY4, "affinity"),
    (names::FRAG4, "fragments"),
    (names::SOCK4, "socket_lb"),
];

/// Maps the agent writes (and so can find full).
const SYNCED_MAPS: [&str; 2] = [names::SERVICES4, names::BACKENDS4];

fn map_label(pinned: &str) -> &'static str {
    MAP_LABELS.iter().find(|(p, _)| *p == pinned).map_or("other", |(_, l)| l)
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapUsage {
    /// Metric label (`services`, `backends`, `conntrack`, ...).
    pub map: &'static str,
    /// Pinned name (`kp_svc4`, ...).
    pub pinned: &'static str,
    /// Entries counted.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u32,
    /// Kernel memory the map uses, bytes (`memlock` of its fdinfo: on Linux 6.4+ what it really
    /// uses, on older kernels the kernel's estimate from its sizes).
    pub bytes: u64,
}

impl MapUsage {
    /// entries / capacity.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 { 0.0 } else { self.entries as f64 / f64::from(self.capacity) }
    }
}

/// Counts the entries of every map of [`MAP_LABELS`] pinned under `pin_path`, with batched
/// lookups ([`crate::dataplane::batch`], thousands of entries per system call): about 10 ms per
/// 10,000 entries, half a second for a full 524,288-entry conntrack map on the development VM.
/// Fine every few seconds from a thread of its own, not something to do on every scrape.
pub fn map_usage(pin_path: &Path) -> anyhow::Result<Vec<MapUsage>> {
    let dir = crate::dataplane::bpf::maps_dir(pin_path);
    let mut out = Vec::with_capacity(MAP_LABELS.len());
    for (pinned, label) in MAP_LABELS {
        let path = dir.join(pinned);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info().with_context(|| format!("reading info of {}", path.display()))?;
        let entries = crate::dataplane::batch::count(
            data.fd().as_fd(),
            info.key_size() as usize,
            info.value_size() as usize,
        )
        .with_context(|| format!("counting the entries of {}", path.display()))?;
        let bytes = crate::dataplane::bpf::map_memory(data.fd().as_fd())
            .with_context(|| format!("reading the memory of {}", path.display()))?;
        out.push(MapUsage { map: label, pinned, entries, capacity: info.max_entries(), bytes });
    }
    Ok(out)
}

/// Samples [`map_usage`] every `period` into `metrics`, from a thread of its own, until the
/// process ends. The pause after a sample is at least 20 times what the sample took, so
/// counting large maps never takes more than 5% of a core.
pub fn spawn_map_sampler(pin_path: PathBuf, metrics: Arc<Metrics>, period: Duration) {
    let spawned = std::thread::Builder::new().name("kproxy-maps".into()).spawn(move || {
        let mut logged = false;
        // Maps above 90%: warned once when they cross, noted when they drop back.
        let mut high = std::collections::BTreeSet::new();
        loop {
            let started = std::time::Instant::now();
            match map_usage(&pin_path) {
                Ok(u) => {
                    for m in &u {
                        if m.pressure() >= 0.9 && high.insert(m.pinned) {
                            tracing::warn!(
                                map = m.pinned,
                                entries = m.entries,
                                capacity = m.capacity,
                                "map at least 90% full"
                            );
                        } else if m.pressure() < 0.8 && high.remove(m.pinned) {
                            tracing::info!(
                                map = m.pinned,
                                entries = m.entries,
                                "map below 80% again"
                            );
                        }
                    }
                    metrics.set_map_usage(u);
                    logged = false;
                }
                Err(e) if !logged => {
                    tracing::warn!(error = format!("{e:#}"), "sampling map fill levels");
                    logged = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(period.max(started.elapsed() * 20));
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the map sampler: no map fill metrics");
    }
}

/// Which endpoints a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/metrics`.
    Metrics,
    /// `/healthz` and `/livez`.
    Healthz,
}

/// The answer to one request path: status, content type, body.
pub fn respond(metrics: &Metrics, role: Role, path: &str) -> (u16, &'static str, String) {
    let path = path.split('?').next().unwrap_or("");
    match (role, path) {
        (Role::Metrics, "/metrics") => (200, "text/plain; version=0.0.4", metrics.render()),
        (Role::Healthz, "/healthz") | (Role::Healthz, "/livez") => {
            let (code, body) = metrics.healthz(SystemTime::now());
            (code, "application/json", body)
        }
        _ => (404, "text/plain", "404 page not found\n".into()),
    }
}

/// Serves `role` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, role: Role) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, move |path| {
        let (code, ctype, body) = respond(&metrics, role, path);
        (code, ctype, body)
    })
    .await
}

/// Accepts connections on `listener` and answers each GET with `handler(path)`.
pub async fn serve_listener<F>(listener: TcpListener, handler: F) -> std::io::Result<()>
where
    F: Fn(&str) -> (u16, &'static str, String) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (mut sock, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (bounded in size and time).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (code, ctype, body) = if method == "GET" || method == "HEAD" {
                handler(path)
            } else {
                (405, "text/plain", "method not allowed\n".into())
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                503 => "Service Unavailable",
                _ => "",
            };
            let body = if method == "HEAD" { String::new() } else { body };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(vec![0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_sum 5.55\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }

    #[test]
    fn render_has_every_metric() {
        let m = Metrics::default();
        m.sync_done(Duration::from_millis(3), UNIX_EPOCH + Duration::from_secs(1000), 7, 5);
        m.sync_error("map_full");
        m.manifest_errors(2);
        m.observe_programming(1.5);
        m.set_packets(vec![(Reason::TranslatedNew, 42)]);
        m.sync_failed(&SyncError::Service {
            service: "default/web:http/TCP".into(),
            source: DataplaneError::Full { map: names::BACKENDS4, capacity: 4, key: "9".into() },
        });
        m.set_map_usage(vec![MapUsage {
            map: "conntrack",
            pinned: names::CT4,
            entries: 3,
            capacity: 4,
            bytes: 4096,
        }]);
        m.set_devices_attached(1, 5);
        m.device_attach_failed();
        let ct =
            crate::dataplane::conntrack::CtStats { entries: 3, capacity: 8, ..Default::default() };
        m.set_conntrack(ct, 5);
        let s = m.render();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1\n",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1000\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0\n",
            "kproxy_services_programmed 7\n",
            "kproxy_backends_programmed 5\n",
            "kproxy_manifest_errors_total 2\n",
            "kproxy_packets_total{reason=\"translated_new\"} 42\n",
            "kproxy_sync_errors_total{kind=\"map_full\"} 2\n",
            "kproxy_map_full_errors_total{map=\"backends\"} 1\n",
            "kproxy_map_full_errors_total{map=\"services\"} 0\n",
            "kproxy_map_entries{map=\"conntrack\"} 3\n",
            "kproxy_map_capacity{map=\"conntrack\"} 4\n",
            "kproxy_map_pressure{map=\"conntrack\"} 0.75\n",
            "# TYPE kproxy_map_memory_bytes gauge\nkproxy_map_memory_bytes{map=\"conntrack\"} 4096\n",
            "kproxy_devices_attached{kind=\"external\"} 1\n",
            "kproxy_devices_attached{kind=\"pod\"} 5\n",
            "kproxy_device_attach_errors_total 1\n",
            "kproxy_conntrack_evictions_total 5\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }

    #[test]
    fn healthz_follows_kube_proxy() {
        let m = Metrics::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // Never synced.
        assert_eq!(m.healthz(t0).0, 503);
        m.sync_done(Duration::from_millis(1), t0, 0, 0);
        let (code, body) = m.healthz(t0 + Duration::from_secs(1));
        assert_eq!(code, 200);
        assert!(body.contains("\"lastUpdated\": \"2023-11-14T22:13:20Z\""), "{body}");
        assert!(body.contains("\"currentTime\": \"2023-11-14T22:13:21Z\""), "{body}");
        // No change pending: healthy however long ago the last sync was.
        assert_eq!(m.healthz(t0 + Duration::from_secs(3600)).0, 200);
        // A change pending for longer than the timeout: unhealthy until the next sync.
        m.change_queued(t0 + Duration::from_secs(10));
        assert_eq!(m.healthz(t0 + Duration::from_secs(20)).0, 200);
        assert_eq!(m.healthz(t0 + Duration::from_secs(10) + HEALTH_TIMEOUT).0, 503);
        m.sync_done(Duration::from_millis(1), t0 + Duration::from_secs(80), 0, 0);
        assert_eq!(m.healthz(t0 + Duration::from_secs(81)).0, 200);
    }

    #[tokio::test]
    async fn http_server_answers_on_loopback() {
        let m = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mm = m.clone();
        let server =
            tokio::spawn(serve_listener(listener, move |p| respond(&mm, Role::Healthz, p)));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 503 "));
        m.sync_done(Duration::from_millis(1), SystemTime::now(), 0, 0);
        let r = get("/healthz").await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("lastUpdated"), "{r}");
        assert!(get("/metrics").await.starts_with("HTTP/1.1 404 "));
        server.abort();
    }
}
