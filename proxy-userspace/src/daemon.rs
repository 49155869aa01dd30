//! The daemon: one sync loop that watches its sources (the manifest
//! directory, the node's devices and addresses), computes the desired state
//! with the pure model, and hands it to the syncer.
//!
//! On exit (SIGTERM, SIGINT) the datapath stays attached and pinned: traffic
//! keeps flowing, and the next start adopts it. `cleanup` removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aya::maps::Array;
use proxy_common::{CONFIG_MAP, Config, HAIRPIN_ADDR};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    allocate, bpffs,
    cli::RunArgs,
    datapath::{Datapath, Device, sockets},
    devices::{self, DeviceFilter},
    frontends,
    health::{self, Health},
    http::{self, Endpoints},
    kube_source::{self, KubeOptions, KubeSource},
    lbmap::BpfLbMaps,
    manifests,
    metrics::{KindLabels, MapLabels, Metrics, PolicyLabels},
    model::{self, FrontendKind, NodeInfo},
    model_cache::ModelCache,
    sync::Syncer,
};

/// Everything the sync loop works with.
struct Context {
    args: RunArgs,
    dp: Datapath,
    syncer: Syncer<BpfLbMaps>,
    filter: DeviceFilter,
    attached: BTreeSet<Device>,
    /// Devices whose attach failed: when to try again, and the delay after.
    retry: BTreeMap<Device, (Instant, Duration)>,
    node_addrs: BTreeSet<Ipv4Addr>,
    source: Source,
    /// Parts of the manifests that could not be read, at the last load.
    manifest_problems: usize,
    /// The API server sent changes not yet synced.
    kube_pending: bool,
    last_sync: Instant,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    model: ModelCache,
    synced_once: bool,
    problems_logged: BTreeSet<String>,
}

/// Where Services and EndpointSlices come from.
enum Source {
    /// The embedded default: a directory of manifests.
    Manifests(ManifestDir),
    /// An API server, watched.
    Kube(KubeSource),
}

pub async fn run(args: RunArgs) -> Result<()> {
    let node_name = match &args.hostname_override {
        Some(n) => n.clone(),
        None => fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname")?
            .trim()
            .to_string(),
    };
    bpffs::ensure(&args.bpffs)?;
    let mut dp = Datapath::load(&args.bpffs, args.bpf_debug)?;
    if args.bpf_debug {
        forward_bpf_events(&mut dp)?;
    }
    write_config(&mut dp, &args)?;
    let maps = BpfLbMaps::new(&mut dp)?;
    let syncer = Syncer::adopt(maps).context("reading the pinned maps")?;
    info!(
        node = %node_name,
        bpffs = %args.bpffs.display(),
        adopted_frontends = syncer.frontend_count(),
        "datapath loaded"
    );
    let source = match &args.manifests {
        Some(dir) => Source::Manifests(ManifestDir::new(dir.clone())),
        None => {
            let opts = KubeOptions {
                kubeconfig: args.kubeconfig.clone(),
                master: args.master.clone(),
                node_name: node_name.clone(),
            };
            let client = kube_source::client(&opts).await?;
            info!("watching the API server");
            Source::Kube(KubeSource::start(
                client,
                &node_name,
                args.service_proxy_name.as_deref(),
            ))
        }
    };
    let metrics = Arc::new(Metrics::new(&args.bpffs));
    let health = Arc::new(Health::new(health::DEFAULT_TIMEOUT, Instant::now()));
    let at = http::serve(
        args.metrics_bind_address,
        Endpoints::Metrics(metrics.clone()),
    )
    .await?;
    info!(address = %at, "serving /metrics");
    let at = http::serve(args.healthz_bind_address, Endpoints::Health(health.clone())).await?;
    info!(address = %at, "serving /healthz and /livez");
    let mut ctx = Context {
        metrics,
        health,
        pending_since: Some(Instant::now()),
        model: ModelCache::new(
            NodeInfo {
                name: node_name.clone(),
                zone: None,
            },
            model::Options {
                service_proxy_name: args.service_proxy_name.clone(),
            },
        ),
        synced_once: false,
        problems_logged: BTreeSet::new(),
        filter: DeviceFilter {
            only: args.devices.clone(),
        },
        dp,
        syncer,
        attached: BTreeSet::new(),
        retry: BTreeMap::new(),
        node_addrs: BTreeSet::new(),
        source,
        manifest_problems: 0,
        kube_pending: false,
        last_sync: Instant::now(),
        args,
    };
    // Program the maps before attaching, so the first packet the programs
    // see already finds its service. From an API server that waits for the
    // first complete lists: until then the pinned state keeps serving.
    ctx.poll_manifests();
    ctx.refresh_addresses();
    if matches!(ctx.source, Source::Manifests(_)) {
        ctx.sync();
    }
    // Links pinned by an earlier run: those of devices still here get the
    // new programs swapped in by refresh_devices (atomically, through the
    // link); those of vanished devices are dropped.
    let current = devices::list(&ctx.filter)?;
    for dev in ctx.dp.attached()? {
        if !current.contains(&dev) {
            ctx.dp.detach(&dev)?;
        }
    }
    ctx.refresh_devices();
    ctx.setup_socket_lb();
    if ctx.synced_once {
        ctx.log_ready();
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.args.poll_interval_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let min_sync = Duration::from_millis(ctx.args.min_sync_period_ms);
    loop {
        let kube_changed = async {
            match &mut ctx.source {
                Source::Kube(k) => k.changed().await,
                Source::Manifests(_) => std::future::pending().await,
            }
        };
        let coalesce_until = tokio::time::Instant::from_std(ctx.last_sync + min_sync);
        tokio::select! {
            _ = tick.tick() => {
                let objects_changed = ctx.poll_manifests();
                let addrs_changed = ctx.refresh_addresses();
                ctx.refresh_devices();
                if objects_changed || addrs_changed {
                    ctx.queued();
                    ctx.sync();
                }
            }
            // Until the pending changes are synced there is no need to
            // hear of more (changed() would resolve at once, again).
            _ = kube_changed, if !ctx.kube_pending => {
                ctx.kube_pending = true;
                ctx.queued();
            }
            // A burst of API changes: one sync at most every min_sync.
            _ = tokio::time::sleep_until(coalesce_until), if ctx.kube_pending => {
                ctx.sync_kube();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("exiting; the datapath stays attached and pinned (run `cleanup` to remove it)");
    Ok(())
}

/// Parsing a large manifest directory leaves freed heap that glibc keeps;
/// hand it back so the daemon's resident size reflects what it holds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Copies the programs' aya-log events into our log as they come.
fn forward_bpf_events(dp: &mut Datapath) -> Result<()> {
    let logger = dp.logger(log::logger())?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for as long as the AsyncFd holds the logger.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the debug-event ring buffer: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    info!("forwarding datapath debug events (--bpf-debug)");
    Ok(())
}

fn write_config(dp: &mut Datapath, args: &RunArgs) -> Result<()> {
    let mut cfg: Array<_, Config> = Array::try_from(dp.take_map(CONFIG_MAP)?)?;
    let value = Config {
        snat_port_min: args.snat_port_range.0,
        snat_port_max: args.snat_port_range.1,
        hairpin_addr: HAIRPIN_ADDR,
    };
    cfg.set(0, value, 0)?;
    Ok(())
}

impl Context {
    fn log_ready(&self) {
        info!(
            frontends = self.syncer.frontend_count(),
            devices = self.attached.len(),
            "ready"
        );
    }

    /// Hands the API server's objects to the model and syncs, once every
    /// initial list is complete.
    fn sync_kube(&mut self) {
        self.kube_pending = false;
        let Source::Kube(source) = &self.source else {
            return;
        };
        if !source.feed(&mut self.model) {
            debug!("waiting for the initial lists");
            return;
        }
        let first = !self.synced_once;
        self.sync();
        if first {
            self.log_ready();
        }
    }

    /// Reloads the manifests when the directory changed; true if it did.
    fn poll_manifests(&mut self) -> bool {
        let Source::Manifests(dir) = &mut self.source else {
            return false;
        };
        match dir.load_if_changed() {
            Ok(Some(objects)) => {
                for p in &objects.problems {
                    warn!(problem = %p, "skipped part of a manifest");
                }
                info!(
                    services = objects.services.len(),
                    endpoint_slices = objects.slices.len(),
                    "manifests loaded"
                );
                // The model keeps what it needs; the parsed manifests go.
                self.model.replace(&objects.services, &objects.slices);
                self.manifest_problems = objects.problems.len();
                drop(objects);
                release_freed_memory();
                true
            }
            Ok(None) => false,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading manifests failed; keeping the last state");
                false
            }
        }
    }

    fn refresh_addresses(&mut self) -> bool {
        match devices::nodeport_addresses(&self.args.nodeport_addresses) {
            Ok(addrs) if addrs != self.node_addrs => {
                info!(addresses = ?addrs, "NodePort addresses");
                self.node_addrs = addrs;
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(error = %e, "listing node addresses failed");
                false
            }
        }
    }

    /// Socket-level load balancing: attaches the cgroup programs (or swaps
    /// the new ones into the links of an earlier run), or removes them when
    /// turned off. Done once at start; a failure is logged and counted, and
    /// the per-packet path then serves everything: never a reason not to
    /// start.
    fn setup_socket_lb(&mut self) {
        let sync = &self.metrics.sync;
        if !self.args.socket_lb {
            match self.dp.detach_sockets() {
                Ok(n) => info!(
                    detached = n,
                    "socket-level load balancing off (--socket-lb=false)"
                ),
                Err(e) => warn!(error = %format!("{e:#}"), "removing socket-level links failed"),
            }
            sync.socket_lb_enabled.set(0);
            return;
        }
        let Some(root) = self
            .args
            .cgroup_root
            .clone()
            .or_else(sockets::cgroup2_mount)
        else {
            warn!(
                "socket-level load balancing is off: no cgroup v2 mount; the per-packet path serves everything"
            );
            sync.socket_lb_attach_failures.inc();
            return;
        };
        match self.dp.attach_sockets(&root) {
            Ok(()) => {
                info!(cgroup = %root.display(), "socket-level load balancing on");
                sync.socket_lb_enabled.set(1);
            }
            Err(e) => {
                warn!(cgroup = %root.display(), error = %format!("{e:#}"), "socket-level load balancing is off: attaching failed; the per-packet path serves everything");
                sync.socket_lb_attach_failures.inc();
            }
        }
    }

    /// Attaches to new devices and forgets vanished ones.
    fn refresh_devices(&mut self) {
        let current = match devices::list(&self.filter) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "listing devices failed");
                return;
            }
        };
        let now = Instant::now();
        self.retry.retain(|dev, _| current.contains(dev));
        for dev in current.difference(&self.attached.clone()) {
            if self.retry.get(dev).is_some_and(|(at, _)| now < *at) {
                continue;
            }
            match self.dp.attach(dev) {
                Ok(()) => {
                    info!(device = %dev.name, ifindex = dev.index, "attached");
                    self.attached.insert(dev.clone());
                    self.retry.remove(dev);
                }
                // A device can vanish between listing and attaching (a pod
                // being deleted); the next round sees it gone. Otherwise try
                // again later, backing off to once a minute.
                Err(e) => {
                    let delay = self
                        .retry
                        .get(dev)
                        .map_or(Duration::from_secs(1), |(_, d)| {
                            (*d * 2).min(Duration::from_secs(60))
                        });
                    warn!(device = %dev.name, error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "attach failed");
                    self.retry.insert(dev.clone(), (now + delay, delay));
                }
            }
        }
        for dev in self
            .attached
            .difference(&current)
            .cloned()
            .collect::<Vec<_>>()
        {
            if let Err(e) = self.dp.detach(&dev) {
                warn!(device = %dev.name, error = %format!("{e:#}"), "detach failed");
            }
            debug!(device = %dev.name, "device gone");
            self.attached.remove(&dev);
        }
    }

    /// A change was seen: it counts for health and programming latency.
    fn queued(&mut self) {
        let now = Instant::now();
        self.pending_since.get_or_insert(now);
        self.health.queued(now);
    }

    fn sync(&mut self) {
        let started = Instant::now();
        self.last_sync = started;
        let changed = self.model.update();
        let (services, slices) = self.model.take_changes();
        self.metrics.sync.service_changes.inc_by(services);
        self.metrics.sync.endpoint_changes.inc_by(slices);
        let problems = self.model.problems();
        let shown: BTreeSet<String> = problems.iter().map(|p| p.to_string()).collect();
        for p in shown.difference(&self.problems_logged) {
            warn!(problem = %p, "skipped");
        }
        self.problems_logged = shown;
        let node_addrs: BTreeSet<[u8; 4]> = self.node_addrs.iter().map(|a| a.octets()).collect();
        // The first sync compares everything with what a previous run left
        // pinned; later ones only hand over what the model changed.
        let report = if self.synced_once {
            let changes = frontends::to_changes(self.model.frontends(), &changed);
            self.syncer.apply(&changes, Some(&node_addrs))
        } else {
            self.synced_once = true;
            self.syncer.sync(&frontends::to_desired(
                self.model.frontends(),
                &self.node_addrs,
            ))
        };
        let m = &self.metrics.sync;
        for (name, e) in &report.failed {
            warn!(frontend = %name, error = %e, "frontend not programmed; it keeps its previous state");
            m.map_write_failures
                .get_or_create(&MapLabels {
                    map: e.map(),
                    reason: e.label(),
                })
                .inc();
        }
        let mut skipped: BTreeMap<String, i64> = BTreeMap::new();
        for p in &problems {
            *skipped.entry(p.kind.label().to_string()).or_default() += 1;
        }
        *skipped.entry("manifest".to_string()).or_default() += self.manifest_problems as i64;
        m.skipped_objects.clear();
        for (kind, n) in skipped {
            m.skipped_objects.get_or_create(&KindLabels { kind }).set(n);
        }
        let (mut internal, mut external) = (0, 0);
        for fe in self.model.frontends().values() {
            if fe.local_only && fe.backends.is_empty() {
                match fe.kind {
                    FrontendKind::ClusterIp => internal += 1,
                    _ => external += 1,
                }
            }
        }
        for (policy, n) in [("internal", internal), ("external", external)] {
            m.no_local_endpoints
                .get_or_create(&PolicyLabels {
                    traffic_policy: policy,
                })
                .set(n);
        }
        m.set_map_entries(&self.syncer.entry_counts());
        let took = started.elapsed();
        m.sync_duration.observe(took.as_secs_f64());
        let wall = SystemTime::now();
        m.last_sync_timestamp.set(
            wall.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        if let Some(since) = self.pending_since.take() {
            m.network_programming.observe(since.elapsed().as_secs_f64());
        }
        if report.failed.is_empty() {
            self.health.synced(started, wall);
        }
        if report.writes > 0 {
            info!(
                frontends = self.syncer.frontend_count(),
                written = report.frontends_written,
                removed = report.frontends_removed,
                map_writes = report.writes,
                took_us = started.elapsed().as_micros() as u64,
                "synced"
            );
        }
    }
}

/// A manifest directory, reloaded when any file in it changes.
struct ManifestDir {
    dir: PathBuf,
    fingerprint: Option<Vec<(PathBuf, u64, SystemTime)>>,
}

impl ManifestDir {
    fn new(dir: PathBuf) -> Self {
        ManifestDir {
            dir,
            fingerprint: None,
        }
    }

    fn fingerprint(dir: &Path) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            out.push((entry.path(), meta.len(), meta.modified()?));
        }
        out.sort();
        Ok(out)
    }

    fn load_if_changed(&mut self) -> Result<Option<manifests::Objects>> {
        let fp = Self::fingerprint(&self.dir)?;
        if self.fingerprint.as_ref() == Some(&fp) {
            return Ok(None);
        }
        let mut objects = manifests::load_dir(&self.dir)?;
        // No API server allocates for us: Services without clusterIP or
        // nodePort get deterministic ones (logged).
        let report = allocate::fill_in(&mut objects.services, &allocate::AllocConfig::default());
        for failure in report.failures {
            warn!(%failure, "allocation failed");
        }
        self.fingerprint = Some(fp);
        Ok(Some(objects))
    }
}
