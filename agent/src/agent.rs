//! The node agent: loads the datapath, attaches it to the devices, and runs the
//! source → model → sync loop until SIGTERM/SIGINT (the datapath stays in place on exit).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use kproxy_common::{NodeConfig, cfg_flags, scope, svc_flags};
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::{
    config::{Config, SourceConfig},
    dataplane::{
        Dataplane, DataplaneError,
        bpf::BpfDataplane,
        conntrack,
        features::Features,
        loader::{self, Datapath, TcAttach},
        usage::{self, map_label},
    },
    health::{ProxyHealth, Stamp},
    healthcheck::HealthCheckServers,
    http,
    metrics::Metrics,
    model::{self, Change, Changes, NameSet, NodeInfo, ObjectName, ServicePortName, Tracker},
    netdev, preflight,
    ratelimit::LogLimiter,
    source::{self, dirwatch::DirWatch, manifests::ManifestDir},
    sync::{SyncError, Syncer},
};

/// Where the objects come from.
enum Source {
    /// A manifest directory, read when its change notifications say so.
    Manifests {
        /// The directory's objects.
        dir: ManifestDir,
        /// Its inotify watch.
        watch: DirWatch,
    },
    /// Events of the API watchers, applied to the tracker as they arrive.
    Watch {
        rx: tokio::sync::mpsc::UnboundedReceiver<source::kube::Event>,
        /// The first lists are in.
        ready: bool,
        /// A relist completed since the last sync: a full resync is due.
        relisted: bool,
        /// The watchers' channel closed (never expected: the watchers retry forever).
        closed: bool,
    },
}

impl Source {
    fn manifests(dir: &std::path::Path, max_file_bytes: u64) -> Self {
        Source::Manifests {
            dir: ManifestDir::new(dir).with_max_file_bytes(max_file_bytes),
            watch: DirWatch::new(dir),
        }
    }

    /// Waits for the source's next change notification (API events are applied to `tracker`
    /// here); true when it calls for a sync. Cancel-safe. Never resolves while the source has no
    /// notifications (an unwatched manifest directory is read on the loop's tick instead).
    async fn changed(&mut self, obs: &mut ChangeObserver, tracker: &mut Tracker) -> bool {
        match self {
            Source::Manifests { watch, .. } => {
                if watch.watching() {
                    watch.changed().await;
                    true
                } else {
                    std::future::pending().await
                }
            }
            Source::Watch { rx, closed, .. } if !*closed => match rx.recv().await {
                Some(ev) => {
                    self.handle(ev, obs, tracker);
                    // Before the first complete list a sync could not run anyway.
                    self.ready()
                }
                None => {
                    error!("the Kubernetes watchers stopped: no more changes will be applied");
                    *closed = true;
                    false
                }
            },
            Source::Watch { .. } => std::future::pending().await,
        }
    }

    fn handle(&mut self, ev: source::kube::Event, obs: &mut ChangeObserver, tracker: &mut Tracker) {
        let Source::Watch { ready, relisted, .. } = self else { return };
        match ev {
            source::kube::Event::Changes(changes) => {
                for c in changes {
                    obs.observe(&c);
                    tracker.apply(c);
                }
            }
            source::kube::Event::Synced => {
                *relisted |= *ready;
                *ready = true;
            }
        }
    }

    /// Feeds what changed into `tracker`; true when a full resync is due (the watches relisted).
    fn poll(&mut self, obs: &mut ChangeObserver, tracker: &mut Tracker) -> bool {
        match self {
            Source::Manifests { dir, .. } => {
                let r = dir.poll();
                for e in &r.errors {
                    let key = format!("{}: {}", e.path.display(), e.message);
                    if let Some(held) = obs.log_limiter.allow(&key, Instant::now()) {
                        error!(file = %e.path.display(), error = %e.message, repeats_not_logged = held, "manifest not loaded; keeping its last good objects");
                    }
                }
                obs.metrics.manifest_errors(r.errors.len() as u64);
                for (file, kind) in &r.ignored {
                    info!(file = %file.display(), kind, "ignoring object of a kind kproxy does not use");
                }
                for c in r.changes {
                    obs.observe(&c);
                    tracker.apply(c);
                }
                false
            }
            Source::Watch { .. } => {
                while let Source::Watch { rx, .. } = self
                    && let Ok(ev) = rx.try_recv()
                {
                    self.handle(ev, obs, tracker);
                }
                match self {
                    Source::Watch { relisted, .. } => std::mem::take(relisted),
                    Source::Manifests { .. } => false,
                }
            }
        }
    }

    /// On the loop's tick: whether the source must be read because it has no change
    /// notifications (an unwatched manifest directory; watching it is tried again first).
    fn needs_polling(&mut self) -> bool {
        match self {
            Source::Manifests { watch, .. } => {
                // A watch set up just now: changes made before it have no event.
                watch.rewatch() || !watch.watching()
            }
            Source::Watch { .. } => false,
        }
    }

    /// Whether the objects reflect the source (never sync an empty view taken before the first
    /// read: it would remove everything a previous agent programmed).
    fn ready(&self) -> bool {
        match self {
            Source::Manifests { dir, .. } => dir.ready(),
            Source::Watch { ready, .. } => *ready,
        }
    }
}

/// When the next sync may start, with kube-proxy's `BoundedFrequencyRunner` rules: a change
/// notification asks for a sync; the sync starts `coalesce` after the first request that found
/// none pending (requests in between join it), and never sooner than `min_period` after the
/// start of the previous sync (kube-proxy's `--min-sync-period`: requests arriving sooner are
/// coalesced into that next sync).
#[derive(Debug, Clone)]
struct Schedule {
    coalesce: Duration,
    min_period: Duration,
    /// The first request since the last sync started.
    requested: Option<Instant>,
    last_start: Option<Instant>,
}

impl Schedule {
    fn new(coalesce: Duration, min_period: Duration) -> Self {
        Self { coalesce, min_period, requested: None, last_start: None }
    }

    /// A sync is wanted (at `now`).
    fn request(&mut self, now: Instant) {
        self.requested.get_or_insert(now);
    }

    /// When the requested sync starts; `None` when none is requested.
    fn due(&self) -> Option<Instant> {
        let at = self.requested? + self.coalesce;
        Some(match self.last_start {
            Some(last) => at.max(last + self.min_period),
            None => at,
        })
    }

    /// The requested sync starts now: later requests ask for the next one.
    fn started(&mut self, now: Instant) {
        self.requested = None;
        self.last_start = Some(now);
    }
}

/// What woke the loop.
enum Wake {
    Stop(&'static str),
    Sync,
    Changed(bool),
    Addresses,
    Tick,
}

/// What the loop notes about each change a source delivers: kube-proxy's change counters and
/// pending gauges, and this node's eligibility for `/healthz`.
struct ChangeObserver {
    node_name: String,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    /// EndpointSlices and Services changed since the last sync (hash sets: see [`NameSet`]).
    pending_slices: NameSet<ObjectName>,
    pending_services: NameSet<ObjectName>,
    /// Repeated errors of the loop, logged at most once a minute each.
    log_limiter: LogLimiter,
}

impl ChangeObserver {
    fn new(node_name: &str, metrics: Arc<Metrics>, health: Arc<ProxyHealth>) -> Self {
        Self {
            node_name: node_name.to_owned(),
            metrics,
            health,
            pending_slices: NameSet::default(),
            pending_services: NameSet::default(),
            log_limiter: LogLimiter::default(),
        }
    }

    fn observe(&mut self, change: &Change) {
        let (pending, name, is_slice) = match change {
            Change::Slice(s) => (&mut self.pending_slices, &s.name, true),
            Change::SliceDeleted(n) => (&mut self.pending_slices, n, true),
            Change::Service(s) => (&mut self.pending_services, &s.name, false),
            Change::ServiceDeleted(n) => (&mut self.pending_services, n, false),
            Change::Node(n) => {
                if n.name == self.node_name {
                    self.health.set_node_eligible(n.eligible);
                }
                return;
            }
            Change::NodeDeleted(name) => {
                if *name == self.node_name {
                    self.health.set_node_eligible(false);
                }
                return;
            }
            Change::ServiceCidr(_) | Change::ServiceCidrDeleted(_) => return,
        };
        pending.insert(name.clone());
        self.metrics.count_changes(u64::from(is_slice), u64::from(!is_slice));
        self.metrics.set_pending_changes(self.pending_slices.len(), self.pending_services.len());
    }

    /// A sync took every pending change.
    fn synced(&mut self) {
        // Released, not cleared: after a first read they held every object.
        self.pending_slices = NameSet::default();
        self.pending_services = NameSet::default();
        self.metrics.set_pending_changes(0, 0);
    }
}

/// Runs the agent until SIGTERM or SIGINT: start-up checks, the HTTP servers, the datapath and
/// its helpers, the devices, the source, then the sync loop.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    preflight::check(&config)?;
    tune_allocator();
    let metrics = Arc::new(Metrics::new());
    let features = Features::probe();
    info!(features = %features.summary(), "kernel features");
    metrics.set_kernel_features(&features);
    config.no_l4_csum_ipv6 = !features.has("l4_csum_ipv6");
    if config.bpf_host_routing && !features.has("redirect_peer") {
        warn!(
            "--bpf-host-routing: this kernel has no bpf_redirect_peer for TC programs; \
             host routing is off, translated packets go through the node's stack"
        );
        config.bpf_host_routing = false;
    }
    let tc_attach = match config.tc_attach {
        Some(TcAttach::Tcx) if !features.has("tcx") => anyhow::bail!(
            "--tc-attach tcx: this kernel has no tcx hooks (Linux 6.6+); use auto or netlink"
        ),
        Some(how) => how,
        None => TcAttach::given(features.has("tcx")),
    };
    info!(
        ?tc_attach,
        "TC programs attach with {}",
        if tc_attach == TcAttach::Tcx { "tcx links" } else { "clsact filters" }
    );
    // kube-proxy's health timeout: twice the sync period.
    let health =
        Arc::new(ProxyHealth::new(Stamp::now()).with_timeout(config.sync_period.saturating_mul(2)));
    start_servers(&config, &metrics, &health).await?;
    let health_checks =
        config.health_check_bind.map(|b| HealthCheckServers::new(b, health.clone()));
    let (mut datapath, mut dp) = load_datapath(&config)?;
    datapath.set_xdp_mode(config.xdp_mode);
    datapath.set_tc_attach(tc_attach);
    datapath.set_tcx_anchor(config.tcx_anchor);
    let conntrack = start_conntrack(&config, &metrics)?;
    let mut syncer = adopt_programmed_state(&dp)?;
    syncer.set_ipv6(config.map_sizing.ipv6);
    write_guard_config(&config, &mut dp)?;
    start_map_sampler(&config, &metrics);
    let attach = Attach {
        datapath,
        cgroup: config.cgroup_path.clone(),
        spec: netdev::DeviceSpec {
            external: config.nodeport_devices.clone(),
            pod_globs: config.pod_devices.clone(),
            mode: config.external_mode,
            rescan: config.device_rescan,
        },
        metrics: metrics.clone(),
    };
    let left = attach.datapath.maps_left_behind();
    let (devices, pending) = if left.is_empty() {
        (Some(attach.start()?), None)
    } else {
        // A map this load started empty (services, backends...) would leave its entries
        // unserved between the attach and the first sync; the other version's programs serve
        // them from their own maps until then.
        info!(
            maps = left.join(","),
            "maps of the other ABI version not taken: its programs serve until the first sync, \
             then this load's are attached"
        );
        (None, Some(attach))
    };
    let source = open_source(&config).await?;
    let parts = LoopParts { source, syncer, dp, health_checks, conntrack, devices, pending };
    sync_loop(&config, parts, metrics, health).await
}

/// What puts this load's programs on the node: the socket LB's cgroup (`--cgroup-path`) and
/// the devices.
struct Attach {
    datapath: Datapath,
    cgroup: Option<std::path::PathBuf>,
    spec: netdev::DeviceSpec,
    metrics: Arc<Metrics>,
}

impl Attach {
    fn start(mut self) -> anyhow::Result<netdev::Devices> {
        match &self.cgroup {
            Some(cg) => self.datapath.attach_cgroup(cg).with_context(|| {
                format!("--cgroup-path {}: attaching the socket LB", cg.display())
            })?,
            None => self.datapath.detach_cgroup().context("detaching the socket LB")?,
        }
        netdev::Devices::start(self.datapath, self.spec, self.metrics)
    }
}

/// Binds `/metrics` and `/healthz` + `/livez` (an address in use is an error naming the flag)
/// and serves them from tasks of their own.
async fn start_servers(
    config: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<ProxyHealth>,
) -> anyhow::Result<()> {
    let listener = http::bind("--metrics-addr", config.metrics_addr).await?;
    let m = metrics.clone();
    tokio::spawn(http::serve(listener, move |path| m.respond(path)));
    let listener = http::bind("--healthz-addr", config.healthz_addr).await?;
    let (m, h) = (metrics.clone(), health.clone());
    tokio::spawn(http::serve(listener, move |path| {
        let now = Stamp::now();
        match path {
            "/healthz" => {
                let r = h.healthz(now);
                m.healthz_answered(r.status);
                r
            }
            "/livez" => {
                let r = h.livez(now);
                m.livez_answered(r.status);
                r
            }
            _ => http::Reply::not_found(),
        }
    }));
    info!(metrics = %config.metrics_addr, healthz = %config.healthz_addr, "serving /metrics, /healthz and /livez");
    Ok(())
}

/// Loads the programs and opens (or creates) the pinned maps.
fn load_datapath(config: &Config) -> anyhow::Result<(Datapath, BpfDataplane)> {
    let sizes =
        config.map_sizing.resolve(loader::node_memory().context("reading the node's memory")?);
    info!(
        ?sizes,
        ratio = config.map_sizing.ratio,
        estimated_mib = loader::estimated_bytes(&sizes) / (1 << 20),
        "map capacities"
    );
    let groups = loader::ProgramGroups {
        xdp: config.external_mode == loader::ExternalMode::Xdp,
        socket_lb: config.cgroup_path.is_some(),
    };
    let datapath = Datapath::load_for(&config.pin_path, &sizes, groups).with_context(|| {
        format!("--pin-path {}: loading the datapath", config.pin_path.display())
    })?;
    let dp = datapath.dataplane().context("opening the pinned maps")?;
    Ok((datapath, dp))
}

/// Starts the conntrack thread: garbage collection and the UDP reconciler (kube-proxy's
/// conntrack reconciler metrics).
fn start_conntrack(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<conntrack::ConntrackWorker> {
    let (m, m2) = (metrics.clone(), metrics.clone());
    conntrack::spawn_worker(
        config.pin_path.clone(),
        config.conntrack_gc_interval,
        move |family, r, evictions, took| m.conntrack_collected(family, r.deleted, evictions, took),
        move |family, n| m2.conntrack_reconciled(family, n),
        config.socket_lb_pods,
    )
    .context("starting the conntrack GC and reconciler")
}

/// Adds the first `held_count` service CIDRs a previous agent programmed (`held`) after the
/// `count` of `nets`, each once, as far as `nets` has room.
fn keep_held_cidrs<T: PartialEq + Copy>(
    nets: &mut [T],
    count: &mut u32,
    held: &[T],
    held_count: u32,
) {
    for n in held.iter().take(held_count as usize) {
        let used = *count as usize;
        if used < nets.len() && !nets[..used].contains(n) {
            nets[used] = *n;
            *count += 1;
        }
    }
}

/// Writes the service CIDRs (`--service-cidr`, with those a previous agent programmed until the
/// first sync writes the current ones) and the socket LB's scope (`--socket-lb-pods`) before the
/// socket LB is attached.
fn write_guard_config(config: &Config, dp: &mut BpfDataplane) -> anyhow::Result<()> {
    use crate::dataplane::{Dataplane as _, guard};
    let mut cidrs = guard::service_cidrs(&config.service_cidrs);
    if let Some(Ok(held)) = dp.guards().map(|g| g.service_cidrs()) {
        keep_held_cidrs(&mut cidrs.nets, &mut cidrs.count, &held.nets, held.count);
    }
    dp.set_service_cidrs(&cidrs).context("writing the service CIDRs")?;
    let mut cidrs6 = guard::service_cidrs6(&config.service_cidrs6);
    if let Some(Ok(held)) = dp.guards6().map(|g| g.service_cidrs()) {
        keep_held_cidrs(&mut cidrs6.nets, &mut cidrs6.count, &held.nets, held.count);
    }
    if dp.guards6().is_some() {
        use crate::dataplane::Dataplane6 as _;
        dp.set_service_cidrs6(&cidrs6).context("writing the IPv6 service CIDRs")?;
    }
    let sock = guard::sock_config(config.socket_lb_pods).context("reading the netns cookie")?;
    dp.set_sock_config(&sock).context("writing the socket LB's scope")?;
    info!(
        service_cidrs = ?config.service_cidrs,
        service_cidrs6 = ?config.service_cidrs6,
        socket_lb_pods = config.socket_lb_pods,
        host_netns_cookie = sock.netns_cookie,
        "service guards configured"
    );
    Ok(())
}

/// Reads what a previous agent programmed, so that the first sync only writes differences and
/// never reuses the backend id of a tracked connection.
fn adopt_programmed_state(dp: &BpfDataplane) -> anyhow::Result<Syncer> {
    let mut syncer = Syncer::adopt(dp).context("reading the programmed state")?;
    match dp.conntrack() {
        Ok(ct) => syncer.avoid_backend_ids(ct.iter().map(|(_, v)| v.backend_id)),
        Err(e) => warn!(error = %e, "reading conntrack to protect backend ids"),
    }
    if dp.has_ipv6() {
        match dp.conntrack6() {
            Ok(ct) => syncer.avoid_backend_ids6(ct.iter().map(|(_, v)| v.backend_id)),
            Err(e) => warn!(error = %e, "reading IPv6 conntrack to protect backend ids"),
        }
    }
    info!(
        frontends = syncer.programmed_frontends(),
        backends = syncer.programmed_backends(),
        frontends6 = syncer.v6().programmed_frontends(),
        backends6 = syncer.v6().programmed_backends(),
        "adopted the programmed state"
    );
    Ok(syncer)
}

/// Samples the map fill levels into the metrics.
fn start_map_sampler(config: &Config, metrics: &Arc<Metrics>) {
    let m = metrics.clone();
    let started = usage::spawn_map_sampler(
        config.pin_path.clone(),
        config.map_stats_interval,
        metrics.synced_maps().clone(),
        move |u| m.set_map_usage(u.iter().map(|u| (u.map, u.entries, u.capacity, u.bytes))),
    );
    if let Err(e) = started {
        warn!(error = %e, "cannot start the map sampler: no map fill metrics");
    }
}

/// Opens the object source (connecting to the API server for the Kubernetes source).
async fn open_source(config: &Config) -> anyhow::Result<Source> {
    Ok(match &config.source {
        SourceConfig::Manifests(dir) => Source::manifests(dir, config.max_manifest_bytes),
        SourceConfig::Kube { kubeconfig } => Source::Watch {
            rx: source::kube::spawn(
                kubeconfig.clone(),
                config.api_server.clone(),
                config.node_name.clone(),
            )
            .await
            .context("connecting to the Kubernetes API")?,
            ready: false,
            relisted: false,
            closed: false,
        },
    })
}

/// What the sync loop reads from and writes to.
struct LoopParts {
    source: Source,
    syncer: Syncer,
    dp: BpfDataplane,
    health_checks: Option<HealthCheckServers>,
    conntrack: conntrack::ConntrackWorker,
    /// Following the devices once this load's programs are attached (dropping it stops that,
    /// the attachments stay).
    devices: Option<netdev::Devices>,
    /// The attach, where it waits for the first sync round (done even where it failed in
    /// part: it wrote what it could): the take-over of another ABI version's datapath left maps
    /// behind ([`Datapath::maps_left_behind`]), which this load started empty, and that
    /// version's programs serve from their own maps until then.
    pending: Option<Attach>,
}

/// The source → model → sync loop, until SIGTERM or SIGINT (the datapath stays in place).
async fn sync_loop(
    config: &Config,
    parts: LoopParts,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
) -> anyhow::Result<()> {
    let LoopParts {
        mut source,
        mut syncer,
        mut dp,
        mut health_checks,
        conntrack,
        devices: mut _devices,
        mut pending,
    } = parts;
    // kube-proxy marks itself updated when its sync loop starts and synthesizes a queued time.
    health.updated(Stamp::now());
    metrics.change_queued(SystemTime::now());
    let mut obs = ChangeObserver::new(&config.node_name, metrics.clone(), health.clone());
    // Node addresses follow the kernel's address notifications; without them they are read on
    // every tick.
    let addr_watch = match netdev::AddrWatch::start() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "no netlink address notifications: reading the node addresses every --poll-interval-ms");
            None
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sync_period = config.sync_period;
    let mut schedule = Schedule::new(config.sync_coalesce, config.min_sync_period);

    let mut state = LoopState::default();
    let mut tracker = Tracker::new(NodeInfo {
        name: config.node_name.clone(),
        addrs: Vec::new(),
        zone: None,
        addrs6: Vec::new(),
    });
    tracker.set_address_policy(config.address_policy.clone());
    tracker.set_node_port_source_ranges(config.source_ranges_node_ports);
    tracker.set_service_cidrs(&config.service_cidrs);
    tracker.set_service_cidrs6(&config.service_cidrs6);
    // The NodePort devices' addresses, and every local address (never a closed service address).
    let mut node_addrs: Option<Vec<Ipv4Addr>> = None;
    let mut local_addrs: Vec<Ipv4Addr> = Vec::new();
    let mut addrs_stale = true;
    let mut full_due = false;
    let mut last_full = Instant::now();
    // The first read of the source (a manifest directory has no event for what it holds).
    schedule.request(Instant::now());
    loop {
        let due = schedule.due().map(tokio::time::Instant::from_std);
        let wake = tokio::select! {
            biased;
            _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            _ = tokio::signal::ctrl_c() => Wake::Stop("SIGINT"),
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => Wake::Sync,
            wanted = source.changed(&mut obs, &mut tracker) => Wake::Changed(wanted),
            _ = async {
                match &addr_watch {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => Wake::Addresses,
            _ = tick.tick() => Wake::Tick,
        };
        let now = Instant::now();
        match wake {
            Wake::Stop(signal) => {
                info!(signal, "exiting, datapath stays in place");
                break;
            }
            Wake::Changed(wanted) => {
                if wanted {
                    schedule.request(now);
                }
                continue;
            }
            Wake::Addresses => {
                addrs_stale = true;
                schedule.request(now);
                continue;
            }
            Wake::Tick => {
                match dp.counters() {
                    Ok(c) => metrics.set_packets(&c),
                    Err(e) => debug!(error = %e, "reading counters"),
                }
                match dp.counters6() {
                    Ok(c) => metrics.set_packets6(&c),
                    Err(e) => debug!(error = %e, "reading the IPv6 counters"),
                }
                if source.needs_polling() {
                    schedule.request(now);
                }
                if addr_watch.is_none() {
                    addrs_stale = true;
                    schedule.request(now);
                }
                if last_full.elapsed() >= sync_period && !full_due {
                    full_due = true;
                    schedule.request(now);
                }
                continue;
            }
            Wake::Sync => {}
        }
        schedule.started(now);
        let mut full = source.poll(&mut obs, &mut tracker);
        if addrs_stale {
            addrs_stale = false;
            match netdev::node_addrs(&config.nodeport_devices) {
                Ok(read) => {
                    if local_addrs != read.local {
                        debug!(addresses = ?read.local, "local addresses");
                        syncer.set_node_addrs(&read.local);
                        local_addrs = read.local;
                    }
                    match netdev::local_addrs6() {
                        Ok(local6) => syncer.set_local_addrs6(&local6),
                        Err(e) => warn!(error = %e, "cannot read the local IPv6 addresses"),
                    }
                    match netdev::ipv6_nodeport_addrs(&config.nodeport_devices) {
                        Ok(addrs6) if tracker.node().addrs6 != addrs6 => {
                            info!(addresses = ?addrs6, "node IPv6 addresses");
                            syncer.set_node_addrs6(&addrs6);
                            tracker.set_node_addrs6(&addrs6);
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "cannot read the node IPv6 addresses"),
                    }
                    let addrs = read.nodeport;
                    if node_addrs.as_ref() != Some(&addrs) {
                        info!(addresses = ?addrs, "node addresses");
                        if addrs.is_empty() {
                            warn!(devices = ?config.nodeport_devices, "NodePort devices have no IPv4 address: no NodePort frontends, no source NAT");
                        }
                        tracker.set_node_addrs(&addrs);
                        node_addrs = Some(addrs);
                        state.config_written = false;
                    }
                }
                Err(e) => {
                    if let Some(held) = obs.log_limiter.allow("node addresses", Instant::now()) {
                        warn!(error = %e, repeats_not_logged = held, "cannot read the node addresses");
                    }
                }
            }
        }
        let addrs = node_addrs.clone().unwrap_or_default();
        let changed = tracker.has_changes();
        if changed {
            metrics.change_queued(SystemTime::now());
            health.queued(Stamp::now());
        }
        // A due periodic resync waits for the next sync when changes are pending, so that a
        // change is not delayed by a full recomputation (that next sync is requested at once).
        let postpone = full_due && changed && !state.resync_postponed;
        state.resync_postponed = postpone;
        full |= !state.synced_once || state.retry_full || (full_due && !postpone);
        if postpone {
            schedule.request(now);
        }
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
                full_due = false;
            }
            let span = info_span!("sync", generation = state.generation, full);
            state.generation += 1;
            async {
                let started = Instant::now();
                // Every round that recomputes all services (the periodic one, and one after a
                // node change) does so apart, so its transient state leaves no holes.
                let mut changes = if full || tracker.all_dirty() {
                    apart(|| tracker.full())
                } else {
                    tracker.changes()
                };
                let udp = state.sync(
                    started,
                    config,
                    &mut changes,
                    &addrs,
                    &mut syncer,
                    &mut dp,
                    &mut obs,
                );
                drop(changes);
                // After the sync wrote the new backend sets.
                conntrack.reconcile(udp);
                if let Some(hc) = health_checks.as_mut() {
                    hc.update(&state.health).await;
                }
            }
            .instrument(span)
            .await;
            if let Some(a) = pending.take() {
                info!("first sync done: attaching this load's programs");
                _devices = Some(a.start()?);
            }
            if full {
                // Free now: the first load's parse buffers (the first round is a full one) and a
                // full round's desired state of every service. Give them back to the system.
                release_free_memory();
            }
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
    /// Whether the due periodic resync was put off by one tick for pending changes.
    resync_postponed: bool,
    /// The last sync failed (a datapath write or the node configuration): the next one is a
    /// full one, as kube-proxy's after a failed sync. It comes with the next change, or with the
    /// periodic resync at the latest.
    retry_full: bool,
    health: BTreeMap<u16, model::HealthCheck>,
    /// Service ports with a Local policy that drop for lack of a local endpoint: (internal,
    /// external), IPv4 then IPv6.
    no_local: [BTreeMap<ServicePortName, (bool, bool)>; 2],
}

/// Sets the allocator's threshold above which a block gets its own mapping to glibc's
/// default, 128 KiB, and keeps it there. glibc otherwise raises it to the size of the largest
/// such block freed (up to 32 MiB): after the first load frees its file buffer and parse
/// vectors, the tables built later (the syncer's indexes, grown by doubling) would come from
/// the heap, and the blocks they leave when they grow stay there as holes among live data.
///
/// It also turns glibc's fastbins off: a freed small block then merges with its free
/// neighbours at once, so that the arena [`apart`] fills empties as its blocks are freed. glibc
/// shrinks a thread's arena only when a free merges 64 KiB or more into its top; blocks parked
/// in fastbins merge only at [`release_free_memory`], which leaves a thread arena's top as it is
/// (10 MiB resident and unused at 10,000 services). The per-thread cache still serves the
/// frequent small allocations.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

/// Runs `f` on a short-lived thread of its own and returns its result. glibc serves a thread
/// from an arena of its own, so the desired state of a full round (every service's endpoints
/// and frontends, tens of MB at tens of thousands of services, dropped after the sync) is not
/// laid among the blocks the sync keeps (the syncer's records): freed, it leaves an arena that
/// [`release_free_memory`] gives back whole instead of holes in the main heap that no page
/// release reaches (with [`tune_allocator`]'s settings: 48.3 → 44.0 MiB of RSS after the first
/// sync at 10,000 services × 10 endpoints). The arena is reused by the next such thread. What
/// `f` logs carries the caller's span. If no thread can be started (a process or memory
/// limit), `f` runs on the calling thread, with a warning: the round is done all the same.
pub fn apart<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let span = tracing::Span::current();
    // The closure waits here, not in the thread's, so that it survives a failed spawn.
    let slot = std::sync::Mutex::new(Some(f));
    let take = || slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    std::thread::scope(|s| {
        let spawned =
            std::thread::Builder::new().name("kproxy-full".into()).spawn_scoped(s, || {
                let f = take().expect("the closure is taken once");
                span.in_scope(f)
            });
        match spawned {
            Ok(h) => match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            Err(e) => {
                warn!("cannot start a thread for a full round, running it inline: {e}");
                take().expect("a thread that did not start took nothing")()
            }
        }
    })
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
    /// written to `dp`, node configuration (once and whenever the addresses changed), metrics
    /// and health. Returns the UDP service ports whose flows the conntrack reconciler must check.
    ///
    /// A sync in which a datapath write failed is handled as kube-proxy handles a failed sync:
    /// it is not reported to `/healthz` as an update (the changes stay pending there, so that
    /// `/healthz` and `/livez` fail once one has waited twice the sync period for a sync that
    /// succeeds), the healthCheckNodePort answers and the last-sync timestamp stay as
    /// the last successful sync left them, and the next sync is a full one.
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &mut self,
        started: Instant,
        config: &Config,
        changes: &mut Changes,
        addrs: &[Ipv4Addr],
        syncer: &mut Syncer,
        dp: &mut dyn Dataplane,
        obs: &mut ChangeObserver,
    ) -> conntrack::Reconcile {
        let metrics = obs.metrics.clone();
        for e in &changes.new_errors {
            match e.class {
                model::ErrorClass::Invalid => warn!(error = %e, "invalid object"),
                model::ErrorClass::FrontendConflict => warn!(error = %e, "frontend conflict"),
                model::ErrorClass::AddressNotAllowed => warn!(error = %e, "address not allowed"),
            }
            metrics.sync_error(e.class.label());
        }
        for s in &changes.skipped {
            debug!(reason = %s, "skipped");
        }
        let mut report = syncer.sync_changes(changes, dp);
        for e in &report.errors {
            if let Some(held) = obs.log_limiter.allow(&e.to_string(), Instant::now()) {
                error!(error = %e, repeats_not_logged = held, "sync");
            }
            count_sync_error(&metrics, e);
        }
        let mut failed = report.errors.iter().any(SyncError::is_datapath_failure);
        if !self.config_written || !self.synced_once {
            let (snat_port_min, snat_port_max) = config.snat_ports;
            let cfg = NodeConfig {
                snat_addr: addrs.first().map_or(0, |a| u32::from(*a).to_be()),
                snat_port_min,
                snat_port_max,
                flags: cfg_flags::READY
                    | if config.bpf_host_routing { cfg_flags::HOST_ROUTING } else { 0 }
                    | if config.no_l4_csum_ipv6 { cfg_flags::NO_L4_CSUM_IPV6 } else { 0 },
                backend_gen: 0,
            };
            match dp.set_config(&cfg) {
                Ok(()) => {
                    info!(snat = ?addrs.first(), "node configuration written");
                    self.config_written = true;
                }
                Err(e) => {
                    error!(error = %e, "writing the node configuration");
                    metrics.sync_error("config");
                    failed = true;
                }
            }
        }
        let now = SystemTime::now();
        self.retry_full = failed;
        if failed {
            metrics.sync_failed();
            const MSG: &str = "sync failed; the next sync is a full one";
            if let Some(held) = obs.log_limiter.allow(MSG, Instant::now()) {
                info!(
                    retry_within_secs = config.sync_period.as_secs(),
                    repeats_not_logged = held,
                    "{MSG}"
                );
            }
        }
        // kube-proxy's network programming latency: from each EndpointSlice's new
        // last-change-trigger-time to now. The first sync's times predate this agent.
        if self.synced_once && !failed {
            for t in &changes.triggers {
                if let Ok(ts) = t.parse::<jiff::Timestamp>()
                    && let Ok(d) = now.duration_since(SystemTime::from(ts))
                {
                    metrics.observe_programming(d.as_secs_f64());
                }
            }
        }
        self.synced_once = true;
        if !failed {
            self.health = changes.state.health_checks.clone();
        }
        let [v4, v6] = self.count_no_local_endpoints(changes);
        metrics.set_no_local_endpoints("IPv4", v4.0, v4.1);
        metrics.set_no_local_endpoints("IPv6", v6.0, v6.1);
        metrics.sync_done(
            started.elapsed(),
            changes.full,
            (!failed).then_some(now),
            syncer.programmed_frontends() + syncer.v6().programmed_frontends(),
            syncer.programmed_backends() + syncer.v6().programmed_backends(),
        );
        metrics.synced_maps().set(
            syncer.programmed_service_entries(),
            syncer.programmed_backends(),
            syncer.v6().programmed_service_entries(),
            syncer.v6().programmed_backends(),
        );
        if !failed {
            obs.health.updated(Stamp::now());
        }
        obs.synced();
        let level_info = report.writes > 0 || !report.errors.is_empty();
        if level_info {
            info!(
                full = changes.full,
                services = changes.services.len(),
                frontends = syncer.programmed_frontends(),
                frontends6 = syncer.v6().programmed_frontends(),
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
        conntrack::Reconcile {
            v4: std::mem::take(&mut report.udp_reconcile),
            v6: std::mem::take(&mut report.udp_reconcile6),
        }
    }
}

impl LoopState {
    /// Updates the service ports that drop for lack of a local endpoint under a Local policy
    /// (kube-proxy's `sync_proxy_rules_no_local_endpoints_total`) with the recomputed services,
    /// and counts them: (internalTrafficPolicy, externalTrafficPolicy) for IPv4, then IPv6.
    fn count_no_local_endpoints(&mut self, changes: &Changes) -> [(usize, usize); 2] {
        for m in &mut self.no_local {
            if changes.full {
                m.clear();
            } else {
                m.retain(|port, _| !changes.services.contains(&port.service));
            }
        }
        let [v4, v6] = &mut self.no_local;
        for (port, state) in &changes.state.services {
            note_no_local(v4, port, state.frontends.iter().map(|(k, f)| (k.scope, f)));
        }
        for (port, state) in &changes.state.services6 {
            note_no_local(v6, port, state.frontends.iter().map(|(k, f)| (k.scope, f)));
        }
        self.no_local.each_ref().map(|m| {
            let count = |pick: fn(&(bool, bool)) -> bool| m.values().filter(|v| pick(v)).count();
            (count(|v| v.0), count(|v| v.1))
        })
    }
}

/// Records in `into` whether the port's frontends (scope, entry) drop for lack of a local
/// endpoint under a Local policy: (a ClusterIP frontend, an external one).
fn note_no_local<'a, A: 'a>(
    into: &mut BTreeMap<ServicePortName, (bool, bool)>,
    port: &ServicePortName,
    frontends: impl Iterator<Item = (u8, &'a model::FrontendEntry<A>)> + Clone,
) {
    let drops = |f: &model::FrontendEntry<A>| {
        f.flags & svc_flags::LOCAL_ONLY != 0
            && f.flags & svc_flags::DROP_IF_EMPTY != 0
            && f.backends.is_empty()
    };
    let internal = frontends
        .clone()
        .any(|(sc, f)| sc == scope::INTERNAL && f.flags & svc_flags::CLUSTER_IP != 0 && drops(f));
    let external = frontends.into_iter().any(|(sc, f)| sc == scope::EXTERNAL && drops(f));
    if internal || external {
        into.insert(port.clone(), (internal, external));
    }
}

/// Counts a failed part of a sync by kind and, when a map was full, by map.
fn count_sync_error(metrics: &Metrics, e: &SyncError) {
    metrics.sync_error(e.kind());
    if let SyncError::Service { source: DataplaneError::Full { map, .. }, .. }
    | SyncError::Remove { source: DataplaneError::Full { map, .. }, .. } = e
    {
        metrics.map_full(map_label(map));
    }
}

#[cfg(test)]
mod tests {
    use kproxy_common::{Service4Key, proto, scope};

    use super::*;
    use crate::dataplane::mem::{MemDataplane, MemOp};

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_keep_their_own_mappings_after_a_larger_one_is_freed() {
        tune_allocator();
        // glibc's dynamic threshold would rise to this block's size when it is freed.
        drop(std::hint::black_box(vec![1u8; 16 << 20]));
        let block = std::hint::black_box(vec![1u8; 4 << 20]);
        // SAFETY: glibc keeps a block's size word in the 8 bytes before the address it returns,
        // with bit 1 (IS_MMAPPED) set when the block has a mapping of its own.
        let size_word = unsafe { block.as_ptr().cast::<usize>().sub(1).read_unaligned() };
        assert_ne!(size_word & 2, 0, "a 4 MiB block came from the heap");
    }

    #[test]
    fn apart_returns_the_result_and_passes_a_panic_on() {
        let mut n = 1;
        assert_ne!(apart(|| std::thread::current().id()), std::thread::current().id());
        assert_eq!(
            apart(|| std::thread::current().name().map(String::from)).as_deref(),
            Some("kproxy-full")
        );
        assert_eq!(
            apart(|| {
                n += 1;
                n * 10
            }),
            20
        );
        let r = std::panic::catch_unwind(|| apart(|| -> u32 { panic!("in the thread") }));
        let msg = r.expect_err("the panic is passed on");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"in the thread"));
    }

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &std::path::Path) -> Config {
        Config::from_args(crate::cli::parse_agent(&["--manifests", dir.to_str().unwrap()]).unwrap())
            .unwrap()
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
    fn schedule_coalesces_and_bounds_the_frequency() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut s = Schedule::new(ms(2), ms(0));
        assert_eq!(s.due(), None, "nothing requested");
        s.request(t0);
        s.request(t0 + ms(1));
        assert_eq!(s.due(), Some(t0 + ms(2)), "window from the first request");
        s.started(t0 + ms(2));
        assert_eq!(s.due(), None);
        s.request(t0 + ms(3));
        assert_eq!(s.due(), Some(t0 + ms(5)), "no minimum period: at once after the window");

        let mut s = Schedule::new(ms(2), ms(1000));
        s.request(t0);
        assert_eq!(s.due(), Some(t0 + ms(2)), "the first sync is not held back");
        s.started(t0 + ms(2));
        s.request(t0 + ms(10));
        s.request(t0 + ms(500));
        assert_eq!(s.due(), Some(t0 + ms(1002)), "held until the minimum period has passed");
        s.started(t0 + ms(1002));
        s.request(t0 + ms(5000));
        assert_eq!(s.due(), Some(t0 + ms(5002)), "long after: only the window");
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
        let config = config(&dir.0);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(ProxyHealth::new(Stamp::now()));
        let mut obs = ChangeObserver::new("node-0", metrics.clone(), health.clone());
        let mut source = Source::manifests(&dir.0, u64::MAX);
        let mut state = LoopState::default();
        let mut syncer = Syncer::new();
        let mut dp = MemDataplane::default();
        let addrs = [Ipv4Addr::new(198, 18, 0, 10)];
        let mut tracker = Tracker::new(NodeInfo {
            name: "node-0".into(),
            addrs: addrs.to_vec(),
            zone: None,
            addrs6: Vec::new(),
        });
        let mut sync = |tracker: &mut Tracker,
                        state: &mut LoopState,
                        dp: &mut MemDataplane,
                        obs: &mut ChangeObserver,
                        full: bool| {
            let mut changes = if full { tracker.full() } else { tracker.changes() };
            state.sync(Instant::now(), &config, &mut changes, &addrs, &mut syncer, dp, obs);
            changes
        };

        source.poll(&mut obs, &mut tracker);
        assert!(tracker.has_changes());
        sync(&mut tracker, &mut state, &mut dp, &mut obs, false);
        assert_eq!(dp.config.flags, cfg_flags::READY);
        assert_eq!(dp.config.snat_addr, u32::from(addrs[0]).to_be());
        let web = key([198, 19, 0, 10], 80, proto::TCP, scope::INTERNAL);
        assert_eq!(dp.services[&web].count, 6);
        let local = key([198, 18, 0, 10], 30081, proto::TCP, scope::EXTERNAL);
        assert_eq!(dp.services[&local].count, 3);
        let rendered = metrics.render();
        // 14 IPv4 frontends and the IPv6 ClusterIP of the dual-stack web.
        assert!(rendered.contains("kproxy_services_programmed 15\n"), "{rendered}");
        // The demo's slices and services were counted, and nothing is pending after the sync.
        assert!(rendered.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n"));
        assert!(!rendered.contains("kubeproxy_sync_proxy_rules_service_changes_total 0\n"));
        assert!(rendered.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n"
        ));
        assert_eq!(health.healthz(Stamp::now()).status, 200);

        // Nothing changed: no change from the source, a full resync writes nothing.
        source.poll(&mut obs, &mut tracker);
        assert!(!tracker.has_changes());
        dp.ops.clear();
        sync(&mut tracker, &mut state, &mut dp, &mut obs, true);
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
        source.poll(&mut obs, &mut tracker);
        dp.ops.clear();
        let changes = sync(&mut tracker, &mut state, &mut dp, &mut obs, false);
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
            rendered.contains(
                "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n"
            ),
            "{rendered}"
        );
        assert!(rendered.contains(
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0\n"
        ));

        // A broken file keeps its objects and is counted.
        std::fs::write(dir.0.join("services.yaml"), "apiVersion: v1\nkind: Service\nspec: [\n")
            .unwrap();
        source.poll(&mut obs, &mut tracker);
        assert!(!tracker.has_changes());
        assert!(metrics.render().contains("kproxy_manifest_errors_total 1\n"));
        sync(&mut tracker, &mut state, &mut dp, &mut obs, true);
        assert_eq!(dp.services[&web].count, 5);
    }

    fn node(json: serde_json::Value) -> Change {
        let n: k8s_openapi::api::core::v1::Node = serde_json::from_value(json).unwrap();
        Change::Node((&n).into())
    }

    /// kube-proxy's `SyncNode`: this node being deleted or tainted by the cluster autoscaler fails
    /// `/healthz` (not `/livez`); other nodes do not matter.
    #[test]
    fn node_being_deleted_or_drained_fails_healthz() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(ProxyHealth::new(Stamp::now()));
        let mut obs = ChangeObserver::new("node-0", metrics, health.clone());
        let status = || health.healthz(Stamp::now()).status;
        assert_eq!(status(), 200);
        let tainted = serde_json::json!({"metadata": {"name": "node-0"}, "spec": {"taints": [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
        ]}});
        obs.observe(&node(tainted.clone()));
        assert_eq!(status(), 503);
        assert_eq!(health.livez(Stamp::now()).status, 200);
        // Another taint, or the taint on another node, leaves the node eligible.
        obs.observe(&node(serde_json::json!({"metadata": {"name": "node-0"}, "spec": {"taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
        ]}})));
        assert_eq!(status(), 200);
        let mut other = tainted;
        other["metadata"]["name"] = "node-1".into();
        obs.observe(&node(other));
        assert_eq!(status(), 200);
        obs.observe(&node(serde_json::json!({"metadata": {
            "name": "node-0", "deletionTimestamp": "2026-01-01T00:00:00Z"
        }})));
        assert_eq!(status(), 503);
        obs.observe(&node(serde_json::json!({"metadata": {"name": "node-0"}})));
        assert_eq!(status(), 200);
        obs.observe(&Change::NodeDeleted("node-0".into()));
        assert_eq!(status(), 503);
    }

    /// A sync whose datapath writes fail is handled as kube-proxy handles a failed sync: the
    /// change stays pending for `/healthz` and `/livez` (both fail once it has waited the health
    /// timeout), the health check node ports and the last-sync timestamp keep what the last
    /// successful sync left, the failure is counted, and the next sync is a full one that
    /// programs the change once the map has room.
    #[test]
    fn failed_sync_keeps_changes_pending_for_health() {
        use crate::health::HEALTH_TIMEOUT;
        let svc = |name: &str, spec: serde_json::Value| -> Change {
            let s: k8s_openapi::api::core::v1::Service = serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
            )
            .unwrap();
            Change::Service((&s).into())
        };
        let slice = |svc: &str| -> Change {
            let s: k8s_openapi::api::discovery::v1::EndpointSlice =
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("{svc}-a"), "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": svc}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["198.18.100.10"], "nodeName": "node-0"}]
                }))
                .unwrap();
            Change::Slice((&s).into())
        };
        let dir = std::env::temp_dir();
        let config = config(&dir);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(ProxyHealth::new(Stamp::now()));
        let mut obs = ChangeObserver::new("node-0", metrics.clone(), health.clone());
        let addrs = [Ipv4Addr::new(198, 18, 0, 10)];
        let mut tracker = Tracker::new(NodeInfo {
            name: "node-0".into(),
            addrs: addrs.to_vec(),
            zone: None,
            addrs6: Vec::new(),
        });
        let mut state = LoopState::default();
        let mut syncer = Syncer::new();
        // Room for the first service's frontend and its backend slot only.
        let mut dp = MemDataplane { services_capacity: Some(2), ..Default::default() };
        let mut sync = |tracker: &mut Tracker, state: &mut LoopState, dp: &mut MemDataplane| {
            // As the loop does: a change is queued, and a sync after a failure is a full one.
            health.queued(Stamp::now());
            let mut changes = if state.retry_full { tracker.full() } else { tracker.changes() };
            state.sync(Instant::now(), &config, &mut changes, &addrs, &mut syncer, dp, &mut obs);
        };
        let metric = |name: &str| -> String {
            let text = metrics.render();
            let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_default();
            line.rsplit(' ').next().unwrap_or_default().to_owned()
        };
        let later = || Stamp::now().after(HEALTH_TIMEOUT + Duration::from_secs(1));
        for c in [
            svc(
                "web",
                serde_json::json!({"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]}),
            ),
            slice("web"),
        ] {
            tracker.apply(c);
        }
        sync(&mut tracker, &mut state, &mut dp);
        assert!(!state.retry_full);
        assert_eq!(health.healthz(later()).status, 200, "the change was programmed");
        let synced_at = metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        assert_ne!(synced_at, "0");

        // A LoadBalancer service with a health check node port does not fit.
        let lb = serde_json::json!({"type": "LoadBalancer", "clusterIP": "198.19.0.11",
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]});
        tracker.apply(svc("lb", lb));
        tracker.apply(slice("lb"));
        sync(&mut tracker, &mut state, &mut dp);
        assert!(state.retry_full, "the next sync is a full one");
        assert_eq!(
            metric("kubeproxy_sync_proxy_rules_nftables_sync_failures_total"),
            "1",
            "{}",
            metrics.render()
        );
        assert_eq!(metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), synced_at);
        assert!(
            state.health.is_empty(),
            "health check node port of a failed sync: {:?}",
            state.health
        );
        // Healthy until the change has waited the timeout, then both fail.
        assert_eq!(health.healthz(Stamp::now()).status, 200);
        assert_eq!(health.healthz(later()).status, 503);
        assert_eq!(health.livez(later()).status, 503);
        assert!(!health.is_healthy(later()));

        // Room again: the full retry programs it and clears the pending change.
        dp.services_capacity = None;
        sync(&mut tracker, &mut state, &mut dp);
        assert!(!state.retry_full);
        assert_eq!(health.healthz(later()).status, 200);
        assert_eq!(health.livez(later()).status, 200);
        assert_eq!(state.health.keys().copied().collect::<Vec<_>>(), [32000]);
        assert_eq!(state.health[&32000].local_endpoints, 1);
        assert_ne!(metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), synced_at);
        let cip = key([198, 19, 0, 11], 80, proto::TCP, scope::INTERNAL);
        assert_eq!(dp.services[&cip].count, 1);
    }

    /// kube-proxy's no-local-endpoints gauge follows the recomputed services, and the change
    /// counters and pending gauges count what the source delivered.
    #[test]
    fn no_local_endpoints_and_change_metrics() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "198.19.0.10", "externalTrafficPolicy": "Local",
                     "internalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }))
        .unwrap();
        let slice = |node: &str| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-a", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["198.18.101.10"], "nodeName": node,
                               "conditions": {"ready": true}}]
            }))
            .unwrap()
        };
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(ProxyHealth::new(Stamp::now()));
        let mut obs = ChangeObserver::new("node-0", metrics.clone(), health);
        let mut tracker = Tracker::new(NodeInfo {
            name: "node-0".into(),
            addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
            zone: None,
            addrs6: Vec::new(),
        });
        let mut state = LoopState::default();
        for c in [Change::Service((&svc).into()), Change::Slice((&slice("node-1")).into())] {
            obs.observe(&c);
            tracker.apply(c);
        }
        let m = metrics.render();
        assert!(m.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 1\n"), "{m}");
        assert!(m.contains("kubeproxy_sync_proxy_rules_service_changes_total 1\n"), "{m}");
        // The only endpoint is on node-1: both Local policies drop here.
        assert_eq!(state.count_no_local_endpoints(&tracker.changes())[0], (1, 1));
        obs.synced();
        assert!(
            metrics.render().contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n")
        );
        // It moves to this node: nothing drops any more.
        let c = Change::Slice((&slice("node-0")).into());
        obs.observe(&c);
        tracker.apply(c);
        assert_eq!(state.count_no_local_endpoints(&tracker.changes())[0], (0, 0));
        assert!(metrics.render().contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 2\n"));
        // A full resync starts from scratch.
        tracker.apply(Change::Slice((&slice("node-1")).into()));
        assert_eq!(state.count_no_local_endpoints(&tracker.full())[0], (1, 1));
    }

    /// The same gauge by family: a dual-stack service whose IPv4 endpoint is here and IPv6
    /// endpoint elsewhere drops only for IPv6.
    #[test]
    fn no_local_endpoints_are_counted_by_family() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIPs": ["198.19.0.10", "2001:2:ff::10"],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                     "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }))
        .unwrap();
        let slice = |fam: &str,
                     addr: &str,
                     node: &str|
         -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("web-{fam}"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": fam,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [addr], "nodeName": node, "conditions": {"ready": true}}]
            }))
            .unwrap()
        };
        let mut tracker = Tracker::new(NodeInfo {
            name: "node-0".into(),
            addrs: vec![Ipv4Addr::new(198, 18, 0, 10)],
            zone: None,
            addrs6: vec!["2001:2::10".parse().unwrap()],
        });
        let mut state = LoopState::default();
        tracker.apply(Change::Service((&svc).into()));
        tracker.apply(Change::Slice((&slice("IPv4", "198.18.100.10", "node-0")).into()));
        tracker.apply(Change::Slice((&slice("IPv6", "2001:2:101::10", "node-1")).into()));
        assert_eq!(state.count_no_local_endpoints(&tracker.changes()), [(0, 0), (1, 1)]);
        let metrics = Metrics::new();
        let [v4, v6] = state.count_no_local_endpoints(&tracker.full());
        metrics.set_no_local_endpoints("IPv4", v4.0, v4.1);
        metrics.set_no_local_endpoints("IPv6", v6.0, v6.1);
        let m = metrics.render();
        assert!(
            m.contains("kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 1\n"),
            "{m}"
        );
        // The IPv6 endpoint moves here.
        tracker.apply(Change::Slice((&slice("IPv6", "2001:2:100::10", "node-0")).into()));
        assert_eq!(state.count_no_local_endpoints(&tracker.changes()), [(0, 0), (0, 0)]);
    }
}
