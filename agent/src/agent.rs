//! The node agent: loads the datapath, attaches it to the devices, and runs the
//! source → model → sync loop until SIGTERM/SIGINT (the datapath stays in place on exit).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use kproxy_common::{NodeConfig, cfg_flags};
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::{
    cli::AgentArgs,
    dataplane::{
        Dataplane,
        bpf::BpfDataplane,
        loader::{self, Datapath, ExternalMode, MapSizing},
    },
    healthcheck::HealthCheckServers,
    metrics::{self, Metrics, Role, serve},
    model::{self, Changes, NodeInfo, Tracker},
    netdev,
    source::{self, manifests::ManifestDir},
    sync::Syncer,
};

/// Where the objects come from.
enum Source {
    Manifests(ManifestDir),
    /// Events of the API watchers; `ready` once the first lists are in.
    Watch {
        rx: tokio::sync::mpsc::UnboundedReceiver<source::kube::Event>,
        ready: bool,
    },
}

impl Source {
    /// Feeds what changed into `tracker`; true when a full resync is due (the watches relisted).
    fn poll(&mut self, metrics: &Metrics, tracker: &mut Tracker) -> bool {
        match self {
            Source::Manifests(dir) => {
                let r = dir.poll();
                for e in &r.errors {
                    error!(file = %e.path.display(), error = %e.message, "manifest not loaded; keeping its last good objects");
                }
                metrics.manifest_errors(r.errors.len() as u64);
                for (file, kind) in &r.ignored {
                    info!(file = %file.display(), kind, "ignoring object of a kind kproxy does not use");
                }
                for c in r.changes {
                    tracker.apply(c);
                }
                false
            }
            Source::Watch { rx, ready } => {
                let mut resync = false;
                loop {
                    match rx.try_recv() {
                        Ok(source::kube::Event::Changes(changes)) => {
                            for c in changes {
                                tracker.apply(c);
                            }
                        }
                        Ok(source::kube::Event::Synced) => {
                            resync |= *ready;
                            *ready = true;
                        }
                        Err(_) => break,
                    }
                }
                resync
            }
        }
    }

    /// Whether the objects reflect the source (never sync an empty view taken before the first
    /// read: it would remove everything a previous agent programmed).
    fn ready(&self) -> bool {
        match self {
            Source::Manifests(dir) => dir.ready(),
            Source::Watch { ready, .. } => *ready,
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    for (addr, role) in [(args.metrics_addr, Role::Metrics), (args.healthz_addr, Role::Healthz)] {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(addr, m, role).await {
                error!(%addr, ?role, error = %e, "HTTP server failed");
            }
        });
    }
    let health_bind: Option<IpAddr> = match args.health_check_bind.as_str() {
        "none" => None,
        s => Some(s.parse().with_context(|| format!("--health-check-bind {s:?}"))?),
    };
    let mut health_checks = health_bind.map(HealthCheckServers::new);

    let sizes = MapSizing {
        ratio: args.map_dynamic_size_ratio,
        services: args.max_services,
        backends: args.max_backends,
        conntrack: args.max_conntrack,
        affinity: args.max_affinity,
    }
    .resolve(loader::node_memory().context("reading the node's memory")?);
    info!(
        ?sizes,
        ratio = args.map_dynamic_size_ratio,
        estimated_mib = loader::estimated_bytes(&sizes) / (1 << 20),
        "map capacities"
    );
    let mut datapath = Datapath::load(&args.pin_path, &sizes)
        .with_context(|| format!("loading the datapath at {}", args.pin_path.display()))?;
    let mut dp: BpfDataplane = datapath.dataplane().context("opening the pinned maps")?;
    if args.conntrack_gc_interval_secs > 0 {
        let m = metrics.clone();
        let every = Duration::from_secs(args.conntrack_gc_interval_secs);
        crate::dataplane::conntrack::spawn_gc(args.pin_path.clone(), every, move |s, ev| {
            m.set_conntrack(*s, ev)
        })
        .context("starting the conntrack GC")?;
    }
    let mut syncer = Syncer::adopt(&dp).context("reading the programmed state")?;
    match dp.conntrack() {
        Ok(ct) => syncer.avoid_backend_ids(ct.iter().map(|(_, v)| v.backend_id)),
        Err(e) => warn!(error = %e, "reading conntrack to protect backend ids"),
    }
    info!(
        frontends = syncer.programmed_frontends(),
        backends = syncer.programmed_backends(),
        "adopted the programmed state"
    );
    metrics::spawn_map_sampler(
        args.pin_path.clone(),
        metrics.clone(),
        Duration::from_secs(args.map_stats_interval_secs.max(1)),
    );
    match &args.cgroup_path {
        Some(cg) => datapath.attach_cgroup(cg).context("attaching the socket LB")?,
        None => datapath.detach_cgroup().context("detaching the socket LB")?,
    }
    let spec = netdev::DeviceSpec {
        external: args.nodeport_devices.clone(),
        pod_globs: args.pod_devices.clone(),
        mode: if args.no_xdp { ExternalMode::TcOnly } else { ExternalMode::Xdp },
        rescan: Duration::from_secs(args.device_rescan_secs.max(1)),
    };
    let _devices = netdev::Devices::start(datapath, spec, metrics.clone())?;

    let mut source = match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => Source::Manifests(ManifestDir::new(dir)),
        (None, kubeconfig) => Source::Watch {
            rx: source::kube::spawn(kubeconfig.clone(), args.node_name.clone())
                .await
                .context("connecting to the Kubernetes API")?,
            ready: false,
        },
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sync_period = Duration::from_secs(args.sync_period_secs.max(1));

    let mut state = LoopState::default();
    let mut tracker =
        Tracker::new(NodeInfo { name: args.node_name.clone(), addrs: Vec::new(), zone: None });
    let mut node_addrs: Option<Vec<Ipv4Addr>> = None;
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigterm.recv() => { info!("SIGTERM: exiting, datapath stays in place"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting, datapath stays in place"); break; }
        }
        let mut full = source.poll(&metrics, &mut tracker);
        let addrs = match netdev::node_addrs(&args.nodeport_devices) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot read the NodePort device addresses");
                node_addrs.clone().unwrap_or_default()
            }
        };
        if node_addrs.as_ref() != Some(&addrs) {
            info!(addresses = ?addrs, "node addresses");
            if addrs.is_empty() {
                warn!(devices = ?args.nodeport_devices, "NodePort devices have no IPv4 address: no NodePort frontends, no source NAT");
            }
            node_addrs = Some(addrs.clone());
            tracker.set_node_addrs(&addrs);
            state.config_written = false;
        }
        let changed = tracker.has_changes();
        if changed {
            metrics.change_queued(SystemTime::now());
        }
        // The periodic resync waits one tick when changes are pending, so that a change is not
        // delayed by a full recomputation (it runs on the next tick, even under churn).
        let periodic = last_full.elapsed() >= sync_period;
        let postpone = periodic && changed && !state.resync_postponed;
        state.resync_postponed = postpone;
        full |= !state.synced_once || (periodic && !postpone);
        let mut due = changed || full || !state.config_written;
        if due && !source.ready() {
            if !state.waiting_logged {
                info!("waiting for the first complete read of the source before syncing");
                state.waiting_logged = true;
            }
            due = false;
        }
        if due {
            if full {
                last_full = Instant::now();
            }
            let span = info_span!("sync", generation = state.generation, full);
            state.generation += 1;
            async {
                let started = Instant::now();
                let mut changes = if full { tracker.full() } else { tracker.changes() };
                state.sync(started, &args, &mut changes, &addrs, &mut syncer, &mut dp, &metrics);
                drop(changes);
                if let Some(hc) = health_checks.as_mut() {
                    hc.update(&state.health).await;
                }
            }
            .instrument(span)
            .await;
            if !state.trimmed {
                // The first load's parse buffers are free now: give them back to the system.
                release_free_memory();
                state.trimmed = true;
            }
        }
        match dp.counters() {
            Ok(c) => metrics.set_packets(c),
            Err(e) => debug!(error = %e, "reading counters"),
        }
    }
    Ok(())
}

/// What the loop remembers between syncs.
#[derive(Default)]
struct LoopState {
    generation: u64,
    synced_once: bool,
    waiting_logged: bool,
    config_written: bool,
    /// Whether free memory was given back after the first sync.
    trimmed: bool,
    /// Whether the due periodic resync was put off by one tick for pending changes.
    resync_postponed: bool,
    health: BTreeMap<u16, model::HealthCheck>,
}

/// Returns freed heap memory to the system (glibc keeps it otherwise: the first load parses
/// tens of MB of objects that are dropped right after).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl LoopState {
    /// One sync (begun at `started`, when the model was asked for its changes): the changes
    /// written to `dp`, node configuration (once and whenever the
    /// addresses changed), metrics.
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &mut self,
        started: Instant,
        args: &AgentArgs,
        changes: &mut Changes,
        addrs: &[Ipv4Addr],
        syncer: &mut Syncer,
        dp: &mut dyn Dataplane,
        metrics: &Metrics,
    ) {
        for e in &changes.new_errors {
            warn!(error = %e, "invalid object");
            metrics.sync_error("invalid_object");
        }
        for s in &changes.skipped {
            debug!(reason = %s, "skipped");
        }
        let report = syncer.sync_changes(changes, dp);
        for e in &report.errors {
            error!(error = %e, "sync");
            metrics.sync_failed(e);
        }
        if !self.config_written || !self.synced_once {
            let cfg = NodeConfig {
                snat_addr: addrs.first().map_or(0, |a| u32::from(*a).to_be()),
                snat_port_min: args.snat_port_min,
                snat_port_max: args.snat_port_max,
                flags: cfg_flags::READY,
                _pad: 0,
            };
            match dp.set_config(&cfg) {
                Ok(()) => {
                    info!(snat = ?addrs.first(), "node configuration written");
                    self.config_written = true;
                }
                Err(e) => {
                    error!(error = %e, "writing the node configuration");
                    metrics.sync_error("config");
                }
            }
        }
        let now = SystemTime::now();
        // kube-proxy's network programming latency: from each EndpointSlice's new
        // last-change-trigger-time to now. The first sync's times predate this agent.
        if self.synced_once {
            for t in &changes.triggers {
                if let Ok(ts) = t.parse::<jiff::Timestamp>()
                    && let Ok(d) = now.duration_since(SystemTime::from(ts))
                {
                    metrics.observe_programming(d.as_secs_f64());
                }
            }
        }
        self.synced_once = true;
        self.health = changes.state.health_checks.clone();
        metrics.sync_done(
            started.elapsed(),
            now,
            syncer.programmed_frontends(),
            syncer.programmed_backends(),
        );
        let level_info = report.writes > 0 || !report.errors.is_empty();
        if level_info {
            info!(
                full = changes.full,
                services = changes.services.len(),
                frontends = syncer.programmed_frontends(),
                changed = report.services_changed,
                removed = report.frontends_removed,
                backends_removed = report.backends_removed,
                writes = report.writes,
                errors = report.errors.len(),
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "synced"
            );
        } else {
            debug!(took_ms = started.elapsed().as_secs_f64() * 1e3, "in sync");
        }
    }
}

#[cfg(test)]
mod tests {
    use kproxy_common::{Service4Key, proto, scope};

    use super::*;
    use crate::dataplane::mem::{MemDataplane, MemOp};

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn args(dir: &std::path::Path) -> AgentArgs {
        crate::cli::parse_agent(&["--manifests", dir.to_str().unwrap()]).unwrap()
    }

    fn key(addr: [u8; 4], port: u16, p: u8, s: u8) -> Service4Key {
        Service4Key {
            addr: u32::from(Ipv4Addr::from(addr)).to_be(),
            port: port.to_be(),
            proto: p,
            scope: s,
            slot: 0,
            _pad: 0,
        }
    }

    /// Manifests on disk → model → sync → maps, as the agent loop runs them, with a changed
    /// endpoint, a broken file and a trigger-time annotation.
    #[test]
    fn manifests_to_maps_pipeline() {
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
        let dir =
            TempDir(std::env::temp_dir().join(format!("kproxy-agent-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        for f in ["services.yaml", "endpointslices.yaml", "nodes.yaml"] {
            std::fs::copy(demo.join(f), dir.0.join(f)).unwrap();
        }
        let args = args(&dir.0);
        let metrics = Metrics::default();
        let mut source = Source::Manifests(ManifestDir::new(&dir.0));
        let mut state = LoopState::default();
        let mut syncer = Syncer::new();
        let mut dp = MemDataplane::default();
        let addrs = [Ipv4Addr::new(198, 18, 0, 10)];
        let mut tracker =
            Tracker::new(NodeInfo { name: "node-0".into(), addrs: addrs.to_vec(), zone: None });
        let mut sync =
            |tracker: &mut Tracker, state: &mut LoopState, dp: &mut MemDataplane, full: bool| {
                let mut changes = if full { tracker.full() } else { tracker.changes() };
                state.sync(Instant::now(), &args, &mut changes, &addrs, &mut syncer, dp, &metrics);
                changes
            };

        source.poll(&metrics, &mut tracker);
        assert!(tracker.has_changes());
        sync(&mut tracker, &mut state, &mut dp, false);
        assert_eq!(dp.config.flags, cfg_flags::READY);
        assert_eq!(dp.config.snat_addr, u32::from(addrs[0]).to_be());
        let web = key([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
        assert_eq!(dp.services[&web].count, 6);
        let local = key([198, 18, 0, 10], 30081, proto::TCP, scope::EXTERNAL);
        assert_eq!(dp.services[&local].count, 3);
        assert!(metrics.render().contains("kproxy_services_programmed 14\n"));
        assert_eq!(metrics.healthz(SystemTime::now()).0, 200);

        // Nothing changed: no change from the source, a full resync writes nothing.
        source.poll(&metrics, &mut tracker);
        assert!(!tracker.has_changes());
        dp.ops.clear();
        sync(&mut tracker, &mut state, &mut dp, true);
        assert!(dp.ops.is_empty(), "{:?}", dp.ops);

        // node-1-pod-2 leaves the web slice; its change is annotated with a trigger time.
        let path = dir.0.join("endpointslices.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (head, rest) = text.split_once("  name: web-node-1\n").unwrap();
        let trigger = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(2);
        let rest = rest.replacen(
            "- addresses: [198.18.101.12]\n  conditions: {ready: true, serving: true, terminating: false}\n  nodeName: node-1\n  targetRef: {kind: Pod, namespace: default, name: node-1-pod-2}\n",
            "",
            1,
        );
        let annotated = format!(
            "{head}  name: web-node-1\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}\n{rest}"
        );
        std::fs::write(&path, annotated).unwrap();
        source.poll(&metrics, &mut tracker);
        dp.ops.clear();
        let changes = sync(&mut tracker, &mut state, &mut dp, false);
        // Only the owner of the changed slice was recomputed.
        assert_eq!(
            changes.services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ["default/web"]
        );
        assert_eq!(dp.services[&web].count, 5);
        // Slot 6 held the removed backend: count shrinks, the slot goes; the backend stays, the
        // other web services still use the same pod and port.
        assert_eq!(
            dp.ops,
            [MemOp::PutService(web), MemOp::DeleteService(Service4Key { slot: 6, ..web })]
        );
        let rendered = metrics.render();
        assert!(
            rendered.contains("kubeproxy_network_programming_duration_seconds_count 1\n"),
            "{rendered}"
        );
        assert!(
            rendered
                .contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0\n")
        );

        // A broken file keeps its objects and is counted.
        std::fs::write(dir.0.join("services.yaml"), "apiVersion: v1\nkind: Service\nspec: [\n")
            .unwrap();
        source.poll(&metrics, &mut tracker);
        assert!(!tracker.has_changes());
        assert!(metrics.render().contains("kproxy_manifest_errors_total 1\n"));
        sync(&mut tracker, &mut state, &mut dp, true);
        assert_eq!(dp.services[&web].count, 5);
    }
}
