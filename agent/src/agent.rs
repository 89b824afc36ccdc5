//! The node agent: loads the datapath, attaches it to the devices, and runs the
//! source → model → sync loop until SIGTERM/SIGINT (the datapath stays in place on exit).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
        loader::{Datapath, ExternalMode, MapSizes},
    },
    healthcheck::HealthCheckServers,
    metrics::{self, Metrics, Role, serve},
    model::{self, ANNOTATION_TRIGGER_TIME, NodeInfo},
    netdev,
    source::{
        self,
        manifests::{ManifestDir, Objects},
    },
    sync::Syncer,
};

/// Label of a Node naming its zone (topology hints).
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Where the objects come from.
enum Source {
    Manifests(ManifestDir),
    /// Snapshots from the API watchers; the flag says whether the first one arrived.
    Watch(tokio::sync::watch::Receiver<Arc<Objects>>, bool),
}

impl Source {
    /// Checks for changes; true when the objects changed.
    fn poll(&mut self, metrics: &Metrics) -> bool {
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
                r.changed
            }
            Source::Watch(rx, ready) => {
                let changed = rx.has_changed().unwrap_or(false);
                *ready |= changed;
                changed
            }
        }
    }

    /// Whether the objects reflect the source (never sync an empty view taken before the first
    /// read: it would remove everything a previous agent programmed).
    fn ready(&self) -> bool {
        match self {
            Source::Manifests(dir) => dir.ready(),
            Source::Watch(_, ready) => *ready,
        }
    }

    fn objects(&mut self) -> Arc<Objects> {
        match self {
            Source::Manifests(dir) => Arc::new(dir.objects()),
            Source::Watch(rx, _) => rx.borrow_and_update().clone(),
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

    let sizes = MapSizes {
        services: args.max_services,
        backends: args.max_backends,
        conntrack: args.max_conntrack,
        affinity: args.max_affinity,
    };
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
        (None, kubeconfig) => Source::Watch(
            source::kube::spawn(kubeconfig.clone(), args.node_name.clone())
                .await
                .context("connecting to the Kubernetes API")?,
            false,
        ),
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sync_period = Duration::from_secs(args.sync_period_secs.max(1));

    let mut state = LoopState::default();
    let mut node_addrs: Option<Vec<Ipv4Addr>> = None;
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigterm.recv() => { info!("SIGTERM: exiting, datapath stays in place"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting, datapath stays in place"); break; }
        }
        let mut dirty = source.poll(&metrics);
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
            state.config_written = false;
            dirty = true;
        }
        if dirty {
            metrics.change_queued(SystemTime::now());
        }
        if !state.synced_once || last_full.elapsed() >= sync_period {
            dirty = true;
        }
        if dirty && !source.ready() {
            if !state.waiting_logged {
                info!("waiting for the first complete read of the source before syncing");
                state.waiting_logged = true;
            }
            dirty = false;
        }
        if dirty {
            last_full = Instant::now();
            let objects = source.objects();
            let span = info_span!("sync", generation = state.generation);
            state.generation += 1;
            async {
                state.sync(&args, &objects, &addrs, &mut syncer, &mut dp, &metrics);
                if let Some(hc) = health_checks.as_mut() {
                    hc.update(&state.health).await;
                }
            }
            .instrument(span)
            .await;
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
    /// Model errors already logged (logged again only when they change).
    logged_errors: BTreeSet<String>,
    /// EndpointSlice → last-change-trigger-time already accounted for.
    triggers: HashMap<(String, String), String>,
    health: BTreeMap<u16, model::HealthCheck>,
}

impl LoopState {
    /// One sync: model from `objects`, differences written to `dp`, node configuration (once
    /// and whenever the addresses changed), metrics.
    fn sync(
        &mut self,
        args: &AgentArgs,
        objects: &Objects,
        addrs: &[Ipv4Addr],
        syncer: &mut Syncer,
        dp: &mut dyn Dataplane,
        metrics: &Metrics,
    ) {
        let started = Instant::now();
        let zone = objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(args.node_name.as_str()))
            .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());
        let node = NodeInfo { name: args.node_name.clone(), addrs: addrs.to_vec(), zone };
        let out = model::build(&objects.services, &objects.slices, &node);
        let errors: BTreeSet<String> = out.errors.iter().map(|e| e.to_string()).collect();
        for e in errors.difference(&self.logged_errors) {
            warn!(error = %e, "invalid object");
            metrics.sync_error("invalid_object");
        }
        if errors != self.logged_errors {
            for s in &out.skipped {
                debug!(reason = %s, "skipped");
            }
        }
        self.logged_errors = errors;
        let report = syncer.sync(&out.state, dp);
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
        self.record_programming_latency(objects, now, metrics);
        self.synced_once = true;
        self.health = out.state.health_checks.clone();
        metrics.sync_done(
            started.elapsed(),
            now,
            syncer.programmed_frontends(),
            syncer.programmed_backends(),
        );
        let level_info = report.writes > 0 || !report.errors.is_empty();
        if level_info {
            info!(
                services = out.state.services.len(),
                frontends = out.state.frontend_count(),
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

    /// kube-proxy's network programming latency: for every EndpointSlice whose
    /// last-change-trigger-time is new since the last sync, the time from that trigger to now.
    /// The first sync only records the times (they predate this agent).
    fn record_programming_latency(
        &mut self,
        objects: &Objects,
        now: SystemTime,
        metrics: &Metrics,
    ) {
        let mut seen = HashMap::new();
        for s in &objects.slices {
            let Some(t) =
                s.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
            else {
                continue;
            };
            let key = (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            );
            if self.synced_once
                && self.triggers.get(&key) != Some(t)
                && let Ok(ts) = t.parse::<jiff::Timestamp>()
            {
                let trigger = SystemTime::from(ts);
                if let Ok(d) = now.duration_since(trigger) {
                    metrics.observe_programming(d.as_secs_f64());
                }
            }
            seen.insert(key, t.clone());
        }
        self.triggers = seen;
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

        assert!(source.poll(&metrics));
        let objects = source.objects();
        state.sync(&args, &objects, &addrs, &mut syncer, &mut dp, &metrics);
        assert_eq!(dp.config.flags, cfg_flags::READY);
        assert_eq!(dp.config.snat_addr, u32::from(addrs[0]).to_be());
        let web = key([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
        assert_eq!(dp.services[&web].count, 6);
        let local = key([198, 18, 0, 10], 30081, proto::TCP, scope::EXTERNAL);
        assert_eq!(dp.services[&local].count, 3);
        assert!(metrics.render().contains("kproxy_services_programmed 14\n"));
        assert_eq!(metrics.healthz(SystemTime::now()).0, 200);

        // Nothing changed: no poll change, a resync writes nothing.
        assert!(!source.poll(&metrics));
        dp.ops.clear();
        state.sync(&args, &source.objects(), &addrs, &mut syncer, &mut dp, &metrics);
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
        assert!(source.poll(&metrics));
        dp.ops.clear();
        state.sync(&args, &source.objects(), &addrs, &mut syncer, &mut dp, &metrics);
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
        assert!(!source.poll(&metrics));
        assert!(metrics.render().contains("kproxy_manifest_errors_total 1\n"));
        state.sync(&args, &source.objects(), &addrs, &mut syncer, &mut dp, &metrics);
        assert_eq!(dp.services[&web].count, 5);
    }
}
