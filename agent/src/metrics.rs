//! The agent's Prometheus metrics, on the `prometheus` client crate (text format 0.0.4, what
//! kube-proxy serves).
//!
//! Every `kubeproxy_*` series of kube-proxy's nftables mode whose meaning applies to kproxy is
//! exported with kube-proxy's name, type, labels and buckets (Kubernetes 1.34; `ip_family` is
//! always `IPv4`); kproxy's own are prefixed `kproxy_`. Every series exists from the start
//! (counters at 0, every label value kproxy can produce), so alerts on `increase()` see the first
//! event. This module only receives numbers: the dataplane counts, the sync loop reports.
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kproxy_common::Reason;
use prometheus::{
    Encoder as _, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{dataplane::usage::SyncedCounts, http::Reply};

/// The `ip_family` label value of every kube-proxy series (kproxy serves IPv4).
const IP_FAMILY: &str = "IPv4";

/// kube-proxy's buckets for sync durations: 1 ms doubling 15 times (to 16.384 s).
pub fn sync_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid buckets")
}

/// kube-proxy's buckets for network programming latency: 0, 0.25 s, 0.5 s, every second to
/// 59 s, every 5 s to 115 s, every 30 s to 5 min (component-base's `MergeBuckets` starts with 0).
pub fn programming_buckets() -> Vec<f64> {
    let mut v = vec![0.0, 0.25, 0.5];
    v.extend((1..=59).map(f64::from));
    v.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    v.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    v
}

/// Kinds of `kproxy_sync_errors_total`: the sync's failed parts (`SyncError::kind`), invalid
/// objects and the node configuration write.
pub const SYNC_ERROR_KINDS: [&str; 10] = [
    "invalid_object",
    "frontend_conflict",
    "address_not_allowed",
    "config",
    "map_full",
    "write",
    "too_many_backends",
    "remove",
    "read",
    "service_addrs",
];

/// Labels of `kproxy_map_*` (every sampled map) and of `kproxy_map_full_errors_total` (the maps
/// the agent writes).
pub const MAP_LABELS: [&str; 14] = [
    "services",
    "backends",
    "conntrack",
    "revnat",
    "affinity",
    "fragments",
    "socket_lb",
    "services6",
    "backends6",
    "conntrack6",
    "revnat6",
    "affinity6",
    "fragments6",
    "socket_lb6",
];
const WRITTEN_MAPS: [&str; 4] = ["services", "backends", "services6", "backends6"];

/// All metrics of the agent. Shared (`Arc`) between the sync loop, the device and conntrack
/// threads and the HTTP servers.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_full: Histogram,
    sync_partial: Histogram,
    last_sync: Gauge,
    last_queued: Gauge,
    programming: Histogram,
    endpoint_changes: IntCounter,
    endpoint_changes_pending: IntGauge,
    service_changes: IntCounter,
    service_changes_pending: IntGauge,
    no_local_endpoints: IntGaugeVec,
    sync_failures: IntCounter,
    healthz: IntCounterVec,
    livez: IntCounterVec,
    reconciler_duration: HistogramVec,
    reconciler_deleted: IntCounterVec,
    services: IntGauge,
    backends: IntGauge,
    packets: IntCounterVec,
    packets6: IntCounterVec,
    sync_errors: IntCounterVec,
    manifest_errors: IntCounter,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    map_pressure: GaugeVec,
    map_memory: IntGaugeVec,
    map_full: IntCounterVec,
    devices: IntGaugeVec,
    nodeport_devices_missing: IntGauge,
    device_attach_errors: IntCounter,
    ct_evictions: IntCounter,
    /// The monotonic eviction counts of IPv4 and IPv6, whose sum `ct_evictions` exports.
    ct_evictions_by_family: [std::sync::atomic::AtomicU64; 2],
    kernel_features: IntGaugeVec,
    /// The entries of the maps the agent writes, published by each sync for the map sampler.
    synced_maps: Arc<SyncedCounts>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers `c` in `r` and returns it.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn family_histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let v = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["ip_family"])
        .expect("valid histogram");
    reg(r, v).with_label_values(&[IP_FAMILY])
}

/// [`family_histogram`] with the other family's series added when first used.
fn families_histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let v = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["ip_family"])
        .expect("valid histogram");
    let v = reg(r, v);
    v.with_label_values(&[IP_FAMILY]);
    v
}

/// [`family_counter`] with the other family's series added when first used.
fn families_counter(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    let v = reg(r, IntCounterVec::new(Opts::new(name, help), &["ip_family"]).expect("valid"));
    v.with_label_values(&[IP_FAMILY]);
    v
}

fn family_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let v = GaugeVec::new(Opts::new(name, help), &["ip_family"]).expect("valid gauge");
    reg(r, v).with_label_values(&[IP_FAMILY])
}

fn family_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let v = IntCounterVec::new(Opts::new(name, help), &["ip_family"]).expect("valid counter");
    reg(r, v).with_label_values(&[IP_FAMILY])
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::new(name, help).expect("valid counter"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("valid gauge"))
}

/// A labelled family with every label value in `values` present from the start.
fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let v = reg(r, IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter"));
    for value in values {
        v.with_label_values(&[*value]);
    }
    v
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
    let v = reg(r, IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid gauge"));
    for value in values {
        v.with_label_values(&[*value]);
    }
    v
}

/// Sets a counter to an absolute value read elsewhere (a lower value is a reset).
fn set_counter(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v < cur {
        c.reset();
        c.inc_by(v);
    } else {
        c.inc_by(v - cur);
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at its initial value.
    pub fn new() -> Self {
        let r = Registry::new();
        let no_local_endpoints = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                    "Number of services with a Local traffic policy and no endpoints",
                ),
                &["ip_family", "traffic_policy"],
            )
            .expect("valid gauge"),
        );
        for policy in ["internal", "external"] {
            no_local_endpoints.with_label_values(&[IP_FAMILY, policy]);
        }
        let reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        Self {
            sync_duration: family_histogram(
                &r,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                sync_buckets(),
            ),
            sync_full: family_histogram(
                &r,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                sync_buckets(),
            ),
            sync_partial: family_histogram(
                &r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                sync_buckets(),
            ),
            last_sync: family_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued: family_gauge(
                &r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            programming: family_histogram(
                &r,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                programming_buckets(),
            ),
            endpoint_changes: counter(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            endpoint_changes_pending: gauge(
                &r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ),
            service_changes: counter(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            service_changes_pending: gauge(
                &r,
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ),
            no_local_endpoints,
            sync_failures: family_counter(
                &r,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "Cumulative proxy nftables sync failures (kproxy: syncs with a failed map write)",
            ),
            healthz: counter_vec(
                &r,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
                "code",
                &["200", "503"],
            ),
            livez: counter_vec(
                &r,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
                "code",
                &["200", "503"],
            ),
            reconciler_duration: families_histogram(
                &r,
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "ReconcileConntrackFlowsLatency latency in seconds (kproxy: conntrack garbage collection)",
                sync_buckets(),
            ),
            reconciler_deleted: families_counter(
                &r,
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "Cumulative conntrack flows deleted by conntrack reconciler (kproxy: by the conntrack garbage collection)",
            ),
            services: gauge(
                &r,
                "kproxy_services_programmed",
                "Service entries (frontends) in the datapath.",
            ),
            backends: gauge(&r, "kproxy_backends_programmed", "Backends in the datapath."),
            packets: counter_vec(
                &r,
                "kproxy_packets_total",
                "Packets by the reason of their verdict, summed over hooks and CPUs.",
                "reason",
                &reasons,
            ),
            packets6: counter_vec(
                &r,
                "kproxy_packets6_total",
                "IPv6 packets by the reason of their verdict, summed over hooks and CPUs.",
                "reason",
                &reasons,
            ),
            sync_errors: counter_vec(
                &r,
                "kproxy_sync_errors_total",
                "Failed parts of syncs, by kind.",
                "kind",
                &SYNC_ERROR_KINDS,
            ),
            manifest_errors: counter(
                &r,
                "kproxy_manifest_errors_total",
                "Manifest files that failed to read or parse.",
            ),
            map_entries: gauge_vec(
                &r,
                "kproxy_map_entries",
                "Entries in a BPF map (sampled periodically).",
                "map",
                &MAP_LABELS,
            ),
            map_capacity: gauge_vec(
                &r,
                "kproxy_map_capacity",
                "Capacity (max_entries) of a BPF map.",
                "map",
                &MAP_LABELS,
            ),
            map_pressure: {
                let v = reg(
                    &r,
                    GaugeVec::new(
                        Opts::new(
                            "kproxy_map_pressure",
                            "Fill level of a BPF map: entries / capacity.",
                        ),
                        &["map"],
                    )
                    .expect("valid gauge"),
                );
                for m in MAP_LABELS {
                    v.with_label_values(&[m]);
                }
                v
            },
            map_memory: gauge_vec(
                &r,
                "kproxy_map_memory_bytes",
                "Kernel memory a BPF map uses, bytes.",
                "map",
                &MAP_LABELS,
            ),
            map_full: counter_vec(
                &r,
                "kproxy_map_full_errors_total",
                "Writes of a sync that failed because the map was full.",
                "map",
                &WRITTEN_MAPS,
            ),
            devices: gauge_vec(
                &r,
                "kproxy_devices_attached",
                "Devices carrying kproxy's programs, by kind.",
                "kind",
                &["external", "pod"],
            ),
            nodeport_devices_missing: gauge(
                &r,
                "kproxy_nodeport_devices_missing",
                "NodePort devices (--nodeport-devices) that do not exist: waited for, attached when they appear.",
            ),
            device_attach_errors: counter(
                &r,
                "kproxy_device_attach_errors_total",
                "Failed attempts to attach programs to a device.",
            ),
            ct_evictions: counter(
                &r,
                "kproxy_conntrack_evictions_total",
                "Connection-tracking entries evicted by the kernel because the LRU table was full (both families).",
            ),
            ct_evictions_by_family: Default::default(),
            kernel_features: gauge_vec(
                &r,
                "kproxy_kernel_feature",
                "Kernel features kproxy probed at start (1 available, 0 missing); see `kproxy features`.",
                "feature",
                &crate::dataplane::features::names(),
            ),
            synced_maps: Arc::default(),
            registry: r,
        }
    }

    /// The entries of the maps the agent writes, as its last sync left them: what the map
    /// sampler reports for those maps instead of counting them.
    pub fn synced_maps(&self) -> &Arc<SyncedCounts> {
        &self.synced_maps
    }

    /// Records a sync (full or partial) that took `took`; `succeeded_at` is when it finished if
    /// it succeeded (kube-proxy moves its last-sync timestamp only for syncs that succeeded).
    pub fn sync_done(
        &self,
        took: Duration,
        full: bool,
        succeeded_at: Option<SystemTime>,
        frontends: usize,
        backends: usize,
    ) {
        let s = took.as_secs_f64();
        self.sync_duration.observe(s);
        if full { &self.sync_full } else { &self.sync_partial }.observe(s);
        if let Some(at) = succeeded_at {
            self.last_sync.set(unix_secs(at));
        }
        self.services.set(frontends as i64);
        self.backends.set(backends as i64);
    }

    /// Counts a sync that had a failed datapath write.
    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    /// A change was queued for a sync at `at`.
    pub fn change_queued(&self, at: SystemTime) {
        self.last_queued.set(unix_secs(at));
    }

    /// Counts EndpointSlice and Service changes received.
    pub fn count_changes(&self, endpoints: u64, services: u64) {
        self.endpoint_changes.inc_by(endpoints);
        self.service_changes.inc_by(services);
    }

    /// Sets the number of services with endpoint and Service changes waiting for a sync.
    pub fn set_pending_changes(&self, endpoints: usize, services: usize) {
        self.endpoint_changes_pending.set(endpoints as i64);
        self.service_changes_pending.set(services as i64);
    }

    /// Sets the number of service ports of `family` (`"IPv4"`, `"IPv6"`) with a Local policy
    /// that drop for lack of a local endpoint, by policy.
    pub fn set_no_local_endpoints(&self, family: &str, internal: usize, external: usize) {
        self.no_local_endpoints.with_label_values(&[family, "internal"]).set(internal as i64);
        self.no_local_endpoints.with_label_values(&[family, "external"]).set(external as i64);
    }

    /// Records one network programming latency (seconds from the trigger to programmed).
    pub fn observe_programming(&self, secs: f64) {
        self.programming.observe(secs);
    }

    /// Counts a failed part of a sync by kind (one of [`SYNC_ERROR_KINDS`]).
    pub fn sync_error(&self, kind: &str) {
        self.sync_errors.with_label_values(&[kind]).inc();
    }

    /// Counts a sync write refused because the map with this label was full.
    pub fn map_full(&self, map: &str) {
        self.map_full.with_label_values(&[map]).inc();
    }

    /// Counts an answer of `/healthz`.
    pub fn healthz_answered(&self, code: u16) {
        self.healthz.with_label_values(&[&code.to_string()]).inc();
    }

    /// Counts an answer of `/livez`.
    pub fn livez_answered(&self, code: u16) {
        self.livez.with_label_values(&[&code.to_string()]).inc();
    }

    /// Sets the sampled fill levels: (map label, entries, capacity, kernel memory in bytes).
    pub fn set_map_usage(&self, usage: impl IntoIterator<Item = (&'static str, u64, u32, u64)>) {
        for (map, entries, capacity, bytes) in usage {
            self.map_memory.with_label_values(&[map]).set(bytes as i64);
            self.map_entries.with_label_values(&[map]).set(entries as i64);
            self.map_capacity.with_label_values(&[map]).set(i64::from(capacity));
            let pressure = if capacity == 0 { 0.0 } else { entries as f64 / f64::from(capacity) };
            self.map_pressure.with_label_values(&[map]).set(pressure);
        }
    }

    /// Sets the devices carrying kproxy's programs and the NodePort devices that do not exist.
    pub fn set_devices(&self, external: usize, pod: usize, missing_external: usize) {
        self.devices.with_label_values(&["external"]).set(external as i64);
        self.devices.with_label_values(&["pod"]).set(pod as i64);
        self.nodeport_devices_missing.set(missing_external as i64);
    }

    /// Sets the probed kernel features.
    pub fn set_kernel_features(&self, features: &crate::dataplane::features::Features) {
        for f in &features.0 {
            self.kernel_features.with_label_values(&[f.name]).set(i64::from(f.available));
        }
    }

    /// Counts a failed attachment to a device.
    pub fn device_attach_failed(&self) {
        self.device_attach_errors.inc();
    }

    /// Counts manifest files that failed to parse.
    pub fn manifest_errors(&self, n: u64) {
        self.manifest_errors.inc_by(n);
    }

    /// Sets the packet counters (summed over CPUs, read from the datapath).
    pub fn set_packets(&self, counters: &[(Reason, u64)]) {
        for (reason, n) in counters {
            set_counter(&self.packets.with_label_values(&[reason.name()]), *n);
        }
    }

    /// Sets the IPv6 packet counters (summed over CPUs, read from the datapath).
    pub fn set_packets6(&self, counters: &[(Reason, u64)]) {
        for (reason, n) in counters {
            set_counter(&self.packets6.with_label_values(&[reason.name()]), *n);
        }
    }

    /// One conntrack garbage collection of `family` (`"IPv4"`, `"IPv6"`): entries it deleted,
    /// the family's monotonic eviction count, how long it took.
    pub fn conntrack_collected(&self, family: &str, deleted: u64, evictions: u64, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.reconciler_deleted.with_label_values(&[family]).inc_by(deleted);
        self.reconciler_duration.with_label_values(&[family]).observe(took.as_secs_f64());
        let [v4, v6] = &self.ct_evictions_by_family;
        if family == IP_FAMILY { v4 } else { v6 }.store(evictions, Relaxed);
        set_counter(&self.ct_evictions, v4.load(Relaxed) + v6.load(Relaxed));
    }

    /// Counts UDP flows of `family` the conntrack reconciler deleted (their backend stopped
    /// serving): kube-proxy's reconciler counter, which the garbage collection's deletions also
    /// feed.
    pub fn conntrack_reconciled(&self, family: &str, n: u64) {
        self.reconciler_deleted.with_label_values(&[family]).inc_by(n);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The answer of the metrics server for `path`.
    pub fn respond(&self, path: &str) -> Reply {
        match path {
            "/metrics" => {
                Reply { status: 200, content_type: prometheus::TEXT_FORMAT, body: self.render() }
            }
            _ => Reply::not_found(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::{DataplaneError, usage},
        sync::SyncError,
    };

    /// Every kube-proxy (nftables mode, 1.34) series kproxy exports: name, type, labels.
    const KUBE_PROXY_SERIES: [(&str, &str, &str); 16] = [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram", "ip_family"),
        ("kubeproxy_sync_full_proxy_rules_duration_seconds", "histogram", "ip_family"),
        ("kubeproxy_sync_partial_proxy_rules_duration_seconds", "histogram", "ip_family"),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge", "ip_family"),
        ("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge", "ip_family"),
        ("kubeproxy_network_programming_duration_seconds", "histogram", "ip_family"),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge", ""),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter", ""),
        ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge", ""),
        ("kubeproxy_sync_proxy_rules_service_changes_total", "counter", ""),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
            "ip_family,traffic_policy",
        ),
        ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "counter", "ip_family"),
        ("kubeproxy_proxy_healthz_total", "counter", "code"),
        ("kubeproxy_proxy_livez_total", "counter", "code"),
        ("kubeproxy_conntrack_reconciler_sync_duration_seconds", "histogram", "ip_family"),
        ("kubeproxy_conntrack_reconciler_deleted_entries_total", "counter", "ip_family"),
    ];

    /// The label names of the first sample of `name` in `text`.
    fn labels_of(text: &str, name: &str) -> String {
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(name).is_some_and(|r| {
                    r.starts_with(' ') || r.starts_with('{') || r.starts_with("_bucket{")
                })
            })
            .unwrap_or_else(|| panic!("no sample of {name}"));
        let Some((_, rest)) = line.split_once('{') else { return String::new() };
        let inner = rest.split_once('}').unwrap().0;
        inner
            .split(',')
            .map(|kv| kv.split_once('=').unwrap().0)
            .filter(|k| *k != "le")
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn kube_proxy_series_have_their_names_types_and_labels() {
        let s = Metrics::new().render();
        for (name, kind, labels) in KUBE_PROXY_SERIES {
            assert!(s.contains(&format!("# TYPE {name} {kind}\n")), "{name} {kind} missing:\n{s}");
            assert_eq!(labels_of(&s, name), labels, "{name}");
        }
    }

    #[test]
    fn every_series_exists_from_the_start() {
        let s = Metrics::new().render();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 0\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 0\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 0\n",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 0\n",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 0\n",
            "kproxy_sync_errors_total{kind=\"invalid_object\"} 0\n",
            "kproxy_sync_errors_total{kind=\"write\"} 0\n",
            "kproxy_packets_total{reason=\"drop_malformed\"} 0\n",
            "kproxy_map_full_errors_total{map=\"services\"} 0\n",
            "kproxy_map_entries{map=\"fragments\"} 0\n",
            "kproxy_devices_attached{kind=\"external\"} 0\n",
            "kproxy_nodeport_devices_missing 0\n",
            "kproxy_device_attach_errors_total 0\n",
            "kproxy_conntrack_evictions_total 0\n",
            "kproxy_manifest_errors_total 0\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        for r in Reason::ALL {
            assert!(s.contains(&format!("kproxy_packets_total{{reason=\"{}\"}} 0\n", r.name())));
            assert!(s.contains(&format!("kproxy_packets6_total{{reason=\"{}\"}} 0\n", r.name())));
        }
        // Every kind a sync can report is listed (so it exists at 0).
        let full = DataplaneError::Full { map: "kp_be4", capacity: 1, key: "1".into() };
        let other = DataplaneError::Map {
            map: "kp_be4",
            op: "update",
            key: "1".into(),
            source: std::io::Error::other("x"),
        };
        for e in [
            SyncError::Service { service: "s".into(), source: full },
            SyncError::Service { service: "s".into(), source: other },
            SyncError::TooManyBackends { service: "s".into(), count: 2, max: 1 },
            SyncError::Config6(DataplaneError::Full {
                map: "kp_config6",
                capacity: 1,
                key: "0".into(),
            }),
            SyncError::Conflict6 { service: "s".into(), frontend: "f".into(), owner: "o".into() },
        ] {
            assert!(SYNC_ERROR_KINDS.contains(&e.kind()), "{}", e.kind());
        }
        // The map labels are the dataplane's.
        let dp: Vec<&str> = usage::MAP_LABELS.iter().map(|(_, l)| *l).collect();
        assert_eq!(dp, MAP_LABELS);
        for pinned in usage::SYNCED_MAPS {
            assert!(WRITTEN_MAPS.contains(&usage::map_label(pinned)));
        }
    }

    /// The README's metrics section lists every metric the agent exports.
    #[test]
    fn readme_lists_every_metric() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let s = Metrics::new().render();
        for name in s.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = name.split_whitespace().next().unwrap();
            assert!(readme.contains(&format!("`{name}")), "README does not list {name}");
        }
    }

    #[test]
    fn buckets_are_kube_proxy_s() {
        let b = sync_buckets();
        assert_eq!((b.len(), b[0], b[14]), (15, 0.001, 16.384));
        let p = programming_buckets();
        assert_eq!(p.len(), 3 + 59 + 12 + 7);
        assert_eq!(&p[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(&p[p.len() - 8..], &[115.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]);
    }

    #[test]
    fn values_are_recorded() {
        let m = Metrics::new();
        let at = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        m.sync_done(Duration::from_millis(3), false, at(1000), 7, 5);
        m.sync_done(Duration::from_millis(30), true, at(1001), 7, 5);
        m.sync_error("map_full");
        m.map_full("backends");
        m.manifest_errors(2);
        m.observe_programming(1.5);
        m.set_packets(&[(Reason::TranslatedNew, 42)]);
        m.set_packets(&[(Reason::TranslatedNew, 40)]); // maps recreated: a reset
        m.set_packets6(&[(Reason::TranslatedNew, 7)]);
        m.set_map_usage([("conntrack", 3, 4, 4096)]);
        m.set_devices(1, 5, 2);
        m.device_attach_failed();
        m.conntrack_collected("IPv4", 4, 5, Duration::from_millis(2));
        m.conntrack_collected("IPv4", 1, 5, Duration::from_millis(2));
        m.count_changes(3, 1);
        m.set_pending_changes(2, 1);
        m.set_no_local_endpoints("IPv4", 1, 2);
        m.healthz_answered(503);
        m.livez_answered(200);
        m.sync_failed();
        m.change_queued(UNIX_EPOCH + Duration::from_secs(999));
        let r = m.respond("/metrics");
        assert_eq!((r.status, r.content_type), (200, "text/plain; version=0.0.4"));
        let s = r.body;
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2\n",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1\n",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.016\"} 0\n",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1001\n",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} 999\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"2\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 3\n",
            "kubeproxy_sync_proxy_rules_service_changes_total 1\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 2\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1\n",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1\n",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1\n",
            "kubeproxy_proxy_livez_total{code=\"200\"} 1\n",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 5\n",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 2\n",
            "kproxy_map_memory_bytes{map=\"conntrack\"} 4096\n",
            "kproxy_services_programmed 7\n",
            "kproxy_backends_programmed 5\n",
            "kproxy_manifest_errors_total 2\n",
            "kproxy_packets_total{reason=\"translated_new\"} 40\n",
            "kproxy_packets6_total{reason=\"translated_new\"} 7\n",
            "kproxy_sync_errors_total{kind=\"map_full\"} 1\n",
            "kproxy_map_full_errors_total{map=\"backends\"} 1\n",
            "kproxy_map_entries{map=\"conntrack\"} 3\n",
            "kproxy_map_capacity{map=\"conntrack\"} 4\n",
            "kproxy_map_pressure{map=\"conntrack\"} 0.75\n",
            "kproxy_devices_attached{kind=\"pod\"} 5\n",
            "kproxy_nodeport_devices_missing 2\n",
            "kproxy_device_attach_errors_total 1\n",
            "kproxy_conntrack_evictions_total 5\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert_eq!(m.respond("/other").status, 404);
    }
}
