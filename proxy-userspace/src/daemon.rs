//! The daemon: one loop that watches its sources (the manifest directory or
//! the API server, the node's devices and addresses), computes the desired
//! state with the model, and hands it to the syncer.
//!
//! On exit (SIGTERM, SIGINT) the datapath stays attached and pinned: traffic
//! keeps flowing, and the next start adopts it. `cleanup` removes it.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, MapData};
use proxy_common::{CFG_F_HOST_ROUTING, CONFIG_MAP, CONFIG6_MAP, Config, Config6, SERVICE_CIDRS};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    cidr::Cidr,
    cli::{HostRouting, Ipv6Mode, RunArgs},
    datapath::{
        Datapath, Ipv6Maps, bpffs, datapath_config, datapath_config6,
        devices::{self, Attachments, DeviceFilter},
        netfilter,
        netlink_watch::NetlinkWatch,
        open_pinned, sockets,
    },
    health::{self, Health},
    http::{self, Endpoints},
    log_limit::{LogLimiter, REMIND_EVERY},
    metrics::Metrics,
    model::{FrontendKey, ModelCache, NodeInfo, Options, Problem, service_cidrs::service_cidrs},
    preflight,
    service_health::{Bind, ServiceHealthServer},
    source::Source,
    sync::{SyncReport, Syncer, convert, lbmap::BpfLbMaps},
};

/// Everything the loop works with.
struct Context {
    args: RunArgs,
    dp: Datapath,
    syncer: Syncer<BpfLbMaps>,
    devices: Attachments,
    /// Netlink link and address notifications; None if the socket could
    /// not be made (the safety poll alone then).
    links: Option<NetlinkWatch>,
    /// nftables notifications, with `--bpf-host-routing=auto`; None
    /// otherwise or if the socket could not be made (the tick alone then).
    nftables: Option<NetlinkWatch>,
    /// Whether the datapath's configuration has host routing on.
    host_routing: bool,
    /// Both families.
    node_addrs: BTreeSet<IpAddr>,
    /// Every address of the node (hostNetwork backends answer from them).
    host_addrs: BTreeSet<IpAddr>,
    source: Source,
    /// The API server sent changes not yet synced.
    kube_pending: bool,
    last_sync: Instant,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The IPv6 LRU maps are small (`--ipv6`) and no IPv6 has been seen
    /// since: the first IPv6 frontend or node address is logged.
    ipv6_maps_small: bool,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    /// Trigger times of the slice changes handed to the model and not yet
    /// programmed (kube-proxy's network programming latency starts there).
    pending_triggers: Vec<SystemTime>,
    model: ModelCache,
    synced_once: bool,
    problems_logged: BTreeSet<String>,
    /// The Services' health checks (healthCheckNodePort listeners).
    service_health: ServiceHealthServer,
    /// The service CIDRs the datapath's configuration holds.
    service_cidrs: Vec<Cidr>,
    /// Frontends whose write failed, as logged (retried at every sync).
    failures_logged: BTreeSet<String>,
    address_errors: LogLimiter,
    /// Whether the socket-level programs are attached; None until tried.
    socket_lb: Option<bool>,
    /// Whether pods' egress hook was decided with the Services known (see
    /// [`Context::update_pod_egress`]).
    pod_egress_decided: bool,
    /// The node's addresses changed: every frontend's backends are looked
    /// at again for hostNetwork ones.
    recheck_backends: bool,
}

/// A sync that wrote or removed this many frontends follows a large
/// change (a first list, a big manifest file): what parsing and the model
/// rebuild freed is handed back to the system.
const TRIM_AFTER_FRONTENDS: usize = 1000;

/// Returns the allocator's free memory to the system. glibc keeps freed
/// memory of large transient structures (a parsed manifest file, a
/// re-list) in its arenas: without this the daemon's RSS stays at the
/// peak of its largest change. (musl, the container image's libc, has no
/// malloc_trim: its allocator returns freed memory by itself.)
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    preflight::check(&args)?;
    let mut ctx = Context::start(args).await?;
    ctx.program_then_attach()?;
    ctx.serve_until_signal().await?;
    info!("exiting; the datapath stays attached and pinned (run `cleanup` to remove it)");
    Ok(())
}

fn node_name(args: &RunArgs) -> Result<String> {
    Ok(match &args.hostname_override {
        Some(n) => n.clone(),
        None => fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname")?
            .trim()
            .to_string(),
    })
}

/// Loads the datapath (adopting what a previous run pinned) and configures
/// it.
fn load_datapath(
    args: &RunArgs,
    node_name: &str,
    ipv6: Ipv6Maps,
    host_routing: bool,
) -> Result<(Datapath, Syncer<BpfLbMaps>)> {
    let mut dp = Datapath::load_sized(&args.bpffs, args.bpf_debug, args.conntrack_max, ipv6)?;
    if args.bpf_debug {
        dp.forward_debug_events()?;
    }
    match crate::datapath::enable_local_delivery() {
        Ok(true) => info!(
            "set net.ipv4.conf.lo.accept_local=1 (node processes to this node's own backends)"
        ),
        Ok(false) => {}
        Err(e) => warn!(
            error = %e,
            "node processes cannot reach hostNetwork backends of this node through a Service, \
             nor NodePorts on its own addresses: set net.ipv4.conf.lo.accept_local=1"
        ),
    }
    dp.write_config(crate::datapath::datapath_config(
        args.snat_port_range,
        &args.cluster_cidr,
        &args.service_cluster_ip_range,
        switches(args, host_routing),
    )?)?;
    dp.write_config6(datapath_config6(
        &args.cluster_cidr,
        &args.service_cluster_ip_range,
    )?)?;
    let maps = BpfLbMaps::new(&mut dp)?;
    let syncer = Syncer::adopt(maps).context("reading the pinned maps")?;
    info!(
        node = %node_name,
        bpffs = %args.bpffs.display(),
        adopted_frontends = syncer.frontend_count(),
        "datapath loaded"
    );
    Ok((dp, syncer))
}

/// The datapath's switches, with host routing as decided.
fn switches(args: &RunArgs, host_routing: bool) -> u8 {
    let forced = args.datapath_switches() & !CFG_F_HOST_ROUTING;
    if host_routing {
        forced | CFG_F_HOST_ROUTING
    } else {
        forced
    }
}

/// Whether host routing is to be on, and why: with `auto`, while no
/// netfilter hook that it would bypass has rules (see [`netfilter`]).
fn host_routing_wanted(mode: HostRouting) -> (bool, String) {
    match mode {
        HostRouting::True => (true, "--bpf-host-routing=true".into()),
        HostRouting::False => (false, "--bpf-host-routing=false".into()),
        HostRouting::Auto => match netfilter::bypassed_hook() {
            Ok(None) => (
                true,
                "no netfilter hook on the forwarding path has rules".into(),
            ),
            Ok(Some(hook)) => (false, hook),
            Err(e) => (false, format!("the netfilter hooks could not be read: {e}")),
        },
    }
}

fn log_host_routing(on: bool, reason: &str) {
    if on {
        info!(%reason, "BPF host routing on: traffic to and from endpoints is redirected by the ingress hook");
    } else {
        info!(%reason, "BPF host routing off: the kernel's forwarding path (and its netfilter hooks) carries what needs no translation");
    }
}

/// How `--ipv6` sizes the IPv6 LRU maps; `auto` looks for IPv6 at start.
fn ipv6_maps(args: &RunArgs) -> Ipv6Maps {
    match args.ipv6 {
        Ipv6Mode::On => Ipv6Maps::Full,
        Ipv6Mode::Off => Ipv6Maps::Small,
        Ipv6Mode::Auto => match ipv6_in_use(args) {
            Some(reason) => {
                info!(%reason, "IPv6 in use: full-size IPv6 maps");
                Ipv6Maps::Full
            }
            None => {
                info!(
                    entries = crate::datapath::resize::IPV6_OFF_ENTRIES,
                    "no IPv6 on this node: small IPv6 maps (--ipv6=on sizes them fully)"
                );
                Ipv6Maps::Small
            }
        },
    }
}

/// Why this node needs IPv6 maps, if it does: an IPv6 CIDR configured, an
/// IPv6 address on the node, or IPv6 frontends pinned by an earlier run.
fn ipv6_in_use(args: &RunArgs) -> Option<String> {
    let mut cidrs = (args.cluster_cidr.iter())
        .chain(&args.service_cluster_ip_range)
        .chain(&args.manifest_service_cidrs);
    if let Some(c) = cidrs.find(|c| !c.is_ipv4()) {
        return Some(format!("IPv6 CIDR {c} configured"));
    }
    match devices::nodeport_addresses(&[]) {
        Ok(addrs) => {
            if let Some(a) = addrs.iter().find(|a| a.is_ipv6()) {
                return Some(format!("node address {a}"));
            }
        }
        Err(e) => return Some(format!("node addresses unreadable: {e:#}")),
    }
    let pinned: Result<aya::maps::HashMap<MapData, proxy_common::SvcKey6, proxy_common::SvcValue>> =
        open_pinned(&args.bpffs, proxy_common::SVC6_MAP);
    pinned
        .is_ok_and(|m| m.keys().next().is_some())
        .then(|| "IPv6 frontends pinned by an earlier run".to_string())
}

/// Serves /metrics and /healthz.
async fn serve_endpoints(args: &RunArgs, source: &Source) -> Result<(Arc<Metrics>, Arc<Health>)> {
    let mut metrics = Metrics::new(&args.bpffs);
    if let Some(stats) = source.watch_stats() {
        metrics.register_watch(stats);
    }
    let metrics = Arc::new(metrics);
    let health = Arc::new(Health::new(health::DEFAULT_TIMEOUT, Instant::now()));
    let at = http::serve(
        args.metrics_bind_address,
        Endpoints::Metrics(metrics.clone()),
    )
    .await?;
    info!(address = %at, "serving /metrics");
    let at = http::serve(args.healthz_bind_address, Endpoints::Health(health.clone())).await?;
    info!(address = %at, "serving /healthz and /livez");
    Ok((metrics, health))
}

/// Resolves when netlink announces a change to `watch`; never without a
/// netlink socket.
async fn heard(watch: &mut Option<NetlinkWatch>) -> std::io::Result<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

impl Context {
    async fn start(args: RunArgs) -> Result<Context> {
        let node_name = node_name(&args)?;
        // The source first: a kubeconfig that does not parse stops the
        // daemon before anything is pinned.
        let source = Source::start(&args, &node_name).await?;
        // The bpffs before the IPv6 decision, which reads what is pinned
        // there: a bad --bpffs is refused in one line.
        bpffs::ensure(&args.bpffs)?;
        let ipv6_maps = ipv6_maps(&args);
        let (host_routing, why) = host_routing_wanted(args.bpf_host_routing);
        log_host_routing(host_routing, &why);
        let (dp, syncer) = load_datapath(&args, &node_name, ipv6_maps, host_routing)?;
        let (metrics, health) = serve_endpoints(&args, &source).await?;
        metrics.sync.bpf_host_routing.set(i64::from(host_routing));
        let nftables = (args.bpf_host_routing == HostRouting::Auto)
            .then(|| {
                NetlinkWatch::nftables()
                    .inspect_err(|e| warn!(error = %e, "no nftables notifications; netfilter is checked at every tick"))
                    .ok()
            })
            .flatten();
        let node = NodeInfo {
            name: node_name,
            zone: None,
        };
        let opts = Options {
            service_proxy_name: args.service_proxy_name.clone(),
        };
        Ok(Context {
            service_health: ServiceHealthServer::new(health.clone()),
            // What load_datapath wrote.
            service_cidrs: args.service_cluster_ip_range.clone(),
            metrics,
            health,
            pending_since: Some(Instant::now()),
            pending_triggers: Vec::new(),
            model: ModelCache::new(node, opts),
            synced_once: false,
            problems_logged: BTreeSet::new(),
            failures_logged: BTreeSet::new(),
            address_errors: LogLimiter::reminding(REMIND_EVERY),
            socket_lb: None,
            pod_egress_decided: false,
            recheck_backends: false,
            devices: Attachments::new(DeviceFilter {
                only: args.devices.clone(),
            }),
            dp,
            syncer,
            nftables,
            host_routing,
            links: NetlinkWatch::links()
                .inspect_err(|e| warn!(error = %e, "no netlink notifications; devices are polled"))
                .ok(),
            node_addrs: BTreeSet::new(),
            host_addrs: BTreeSet::new(),
            source,
            kube_pending: false,
            last_sync: Instant::now(),
            ipv6_maps_small: ipv6_maps == Ipv6Maps::Small,
            args,
        })
    }

    /// Programs the maps before attaching, so the first packet the programs
    /// see already finds its service. From an API server that waits for the
    /// first complete lists: until then the pinned state keeps serving.
    fn program_then_attach(&mut self) -> Result<()> {
        self.poll_source();
        self.refresh_addresses();
        if self.source.is_polled() {
            self.sync();
        }
        // Last before attaching, so that few flows start on the previous
        // programs after the copy (with an API server, the first sync can
        // wait for its lists): those that do are served by the previous
        // programs, behind the new ones, until the catch-up copy.
        self.dp.carry_old_layouts()?;
        // Before the devices: whether pods' devices get the egress hook
        // depends on it.
        self.setup_socket_lb();
        self.update_pod_egress(&BTreeSet::new(), self.synced_once);
        self.devices.drop_vanished_pins(&mut self.dp)?;
        self.devices.refresh(&mut self.dp);
        self.retire_old_layouts();
        self.trust_reply_sources();
        if self.synced_once {
            self.log_ready();
        }
        Ok(())
    }

    /// After an upgrade over pins of an earlier map layout: once this
    /// run's programs run in front of the previous ones on every pinned
    /// device link (a device whose attach failed still runs only the
    /// previous ones, on the old maps), carries over what the previous
    /// programs created meanwhile, detaches them and removes the old pins
    /// ([`Datapath::retire_old_layouts`]). Tried again at every tick until
    /// then.
    fn retire_old_layouts(&mut self) {
        if !self.dp.has_old_layouts() || !self.runs_on_every_pinned_link() {
            return;
        }
        let started = Instant::now();
        match self.dp.retire_old_layouts() {
            Ok([attached, behind, alone]) => info!(
                caught_up = format!("{attached}+{behind}+{alone}"),
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "the new programs run everywhere; the older ones are detached and the pins of \
                 the earlier map layout removed"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "retiring the earlier map layout failed"),
        }
    }

    /// Whether this run's programs are on every pinned device link (a
    /// device whose attach failed still runs the previous run's).
    fn runs_on_every_pinned_link(&self) -> bool {
        self.dp
            .attached()
            .is_ok_and(|pinned| pinned.iter().all(|dev| self.devices.has(dev)))
    }

    /// Once this run's programs run on every pinned device link and no
    /// earlier layout waits: a program of an earlier run may have written
    /// reverse-NAT entries without marking their sources until then
    /// ([`Datapath::trust_reply_sources`]). Tried at every tick until done.
    fn trust_reply_sources(&mut self) {
        if self.dp.reply_sources_trusted()
            || self.dp.has_old_layouts()
            || !self.runs_on_every_pinned_link()
        {
            return;
        }
        let started = Instant::now();
        match self.dp.trust_reply_sources() {
            Ok(Some(entries)) => info!(
                entries,
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "replies from endpoints no reverse-NAT entry comes from skip the lookup"
            ),
            Ok(None) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "marking the reply sources failed"),
        }
    }

    /// Clears the probe filters' bits of what the maps no longer hold, once
    /// removals have left enough of them (see [`crate::datapath::filters`]).
    /// Not while an earlier layout's programs still run: they write
    /// entries into pins the rebuild does not read.
    fn rebuild_filters(&mut self) {
        let Some(maps_dir) = self.dp.pinned_maps_dir() else {
            return;
        };
        if self.dp.has_old_layouts() || !self.syncer.maps().filter_rebuild_due() {
            return;
        }
        let started = Instant::now();
        match self.syncer.maps_mut().rebuild_filters(&maps_dir) {
            Ok(r) => info!(
                addr_bits_cleared = r.addr_bits_cleared,
                endpoint_bits_cleared = r.endpoint_bits_cleared,
                addr_bits = r.bits_set.0,
                endpoint_bits = r.bits_set.1,
                ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
                "probe filters rebuilt from the pinned maps"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "rebuilding the probe filters failed"),
        }
    }

    /// Socket-level load balancing: attaches the cgroup programs (or swaps
    /// the new ones into the links of an earlier run), or removes them when
    /// turned off. Done once at start; a failure is logged and counted, and
    /// the per-packet path then serves everything: never a reason not to
    /// start.
    fn setup_socket_lb(&mut self) {
        let on = self.attach_socket_lb();
        self.socket_lb = Some(on);
    }

    /// [`Context::setup_socket_lb`]; returns whether the programs are
    /// attached.
    fn attach_socket_lb(&mut self) -> bool {
        let sync = &self.metrics.sync;
        if !self.args.socket_lb {
            match self.dp.detach_sockets() {
                Ok(n) => info!(
                    detached = n,
                    "socket-level load balancing off (--socket-lb=false)"
                ),
                Err(e) => warn!(error = %format!("{e:#}"), "removing socket-level links failed"),
            }
            return false;
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
            return false;
        };
        match self.dp.attach_sockets(&root) {
            Ok(()) => {
                info!(cgroup = %root.display(), "socket-level load balancing on");
                sync.socket_lb_enabled.set(1);
                true
            }
            Err(e) => {
                warn!(cgroup = %root.display(), error = %format!("{e:#}"), "socket-level load balancing is off: attaching failed; the per-packet path serves everything");
                sync.socket_lb_attach_failures.inc();
                false
            }
        }
    }

    /// Gives pods' devices the egress hook, or not (see [`Attachments`]):
    /// decided in full once the Services are known (`services_known`) and
    /// socket LB is set up; until then they have it. After that it is only
    /// given, never taken, during a run (a flow that needs it may be
    /// open): before a frontend with a hostNetwork backend of this node is
    /// written (`changed`: the frontends about to be).
    fn update_pod_egress(&mut self, changed: &BTreeSet<FrontendKey>, services_known: bool) {
        let was_decided = self.pod_egress_decided;
        let reason = if !was_decided {
            self.pod_egress_decided = services_known && self.socket_lb.is_some();
            self.pod_egress_reason(services_known)
        } else if self.devices.pod_egress() {
            return;
        } else {
            let everything = std::mem::take(&mut self.recheck_backends);
            self.hostnetwork_backend((!everything).then_some(changed))
        };
        let on = reason.is_some();
        if on != self.devices.pod_egress() || was_decided != self.pod_egress_decided {
            match reason {
                Some(why) => info!(reason = %why, "pods' devices get the egress hook"),
                None => info!(
                    "pods' devices get no egress hook: socket LB translates their connections, \
                     and no backend is a hostNetwork process of this node"
                ),
            }
            self.devices.set_pod_egress(&mut self.dp, on);
        }
        let hooked = self.devices.pod_egress();
        self.metrics.sync.pod_egress_hook.set(i64::from(hooked));
    }

    /// Why pods' devices need the egress hook, or None. With socket LB,
    /// the node sends a pod a packet of a translated flow only when the
    /// flow goes to a hostNetwork backend of this node (its replies leave
    /// the node's stack towards the pod): a flow socket LB leaves to the
    /// per-packet path, or one an earlier run translated.
    fn pod_egress_reason(&self, services_known: bool) -> Option<String> {
        match self.socket_lb {
            None => return Some("the socket programs are not set up yet".into()),
            Some(false) => return Some("the socket programs are not attached".into()),
            Some(true) => {}
        }
        if self.args.masquerade_all {
            return Some("--masquerade-all leaves every flow to the per-packet path".into());
        }
        if self.dp.has_old_layouts() {
            return Some("the earlier map layout's programs still run".into());
        }
        if !services_known {
            return Some("the Services are not known yet".into());
        }
        if let Some(why) = self.hostnetwork_backend(None) {
            return Some(why);
        }
        match self.dp.reverse_nat_sources() {
            Ok(sources) => sources
                .iter()
                .find(|a| self.host_addrs.contains(a))
                .map(|a| {
                    format!(
                        "a flow translated by an earlier run goes to {a}, an address of this node"
                    )
                }),
            Err(e) => Some(format!(
                "reading the pinned reverse-NAT entries failed: {e:#}"
            )),
        }
    }

    /// A frontend (of `keys`, or any) with a backend at an address of this
    /// node, described.
    fn hostnetwork_backend(&self, keys: Option<&BTreeSet<FrontendKey>>) -> Option<String> {
        let frontends = self.model.frontends();
        let found = match keys {
            Some(keys) => keys
                .iter()
                .filter_map(|k| frontends.get_key_value(k))
                .find(|(_, fe)| fe.has_backend_among(&self.host_addrs)),
            None => frontends
                .iter()
                .find(|(_, fe)| fe.has_backend_among(&self.host_addrs)),
        };
        found.map(|(key, fe)| {
            format!(
                "{} ({key}) has a hostNetwork backend on this node",
                fe.service
            )
        })
    }

    /// The loop: acts on netlink notifications (devices, addresses) and on
    /// the source's changes (inotify for manifests, watch events from an
    /// API server) at once, coalescing them into at most one sync per
    /// `--min-sync-period-ms`; checks everything again at every tick of the
    /// safety poll; returns on SIGTERM or SIGINT.
    async fn serve_until_signal(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let poll = Duration::from_millis(self.args.poll_interval_ms.max(10));
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let min_sync = Duration::from_millis(self.args.min_sync_period_ms);
        loop {
            let coalesce_until = tokio::time::Instant::from_std(self.last_sync + min_sync);
            tokio::select! {
                _ = tick.tick() => {
                    self.check_pins()?;
                    self.on_tick();
                }
                got = heard(&mut self.links) => match got {
                    Ok(()) => self.on_tick(),
                    Err(e) => {
                        warn!(error = %e, "netlink notifications failed; devices are polled");
                        self.links = None;
                    }
                },
                got = heard(&mut self.nftables) => match got {
                    Ok(()) => self.update_host_routing(),
                    Err(e) => {
                        warn!(error = %e, "nftables notifications failed; netfilter is checked at every tick");
                        self.nftables = None;
                    }
                },
                // Until the pending changes are synced there is no need to
                // hear of more (changed() would resolve at once, again).
                _ = self.source.changed(), if !self.kube_pending => {
                    self.kube_pending = true;
                    self.queued();
                }
                // A burst of changes: one sync at most every min_sync.
                _ = tokio::time::sleep_until(coalesce_until), if self.kube_pending => {
                    self.sync_kube();
                }
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
            }
        }
    }

    /// Carrying on over a datapath whose pins were unmounted would report
    /// healthy while serving nothing; exiting makes the DaemonSet start the
    /// daemon again over a fresh bpffs, which loads and attaches anew (the
    /// state in the old maps is lost; the objects are programmed again).
    fn check_pins(&self) -> Result<()> {
        if self.dp.pins_intact() {
            return Ok(());
        }
        bail!(
            "the bpffs at {} was unmounted under the daemon: the links pinned there are gone and \
             the datapath is detached; exiting so that a restart loads it again",
            self.dp.root().display()
        )
    }

    fn on_tick(&mut self) {
        let objects_changed = self.poll_source();
        let addrs_changed = self.refresh_addresses();
        self.devices.refresh(&mut self.dp);
        self.retire_old_layouts();
        self.trust_reply_sources();
        self.update_host_routing();
        // Before the first sync from an API server the model is empty: a
        // sync then would remove every frontend a previous run pinned.
        if objects_changed || (addrs_changed && self.synced_once) {
            self.queued();
            self.sync();
        } else if self.service_health.failing() > 0 {
            let done = self.service_health.reconcile(Instant::now());
            self.record_health_checks(done.bind_failures);
        }
    }

    fn log_ready(&self) {
        info!(
            frontends = self.syncer.frontend_count(),
            devices = self.devices.len(),
            "ready"
        );
    }

    /// Hands the source's changes (the API server's objects, changed
    /// manifest files) to the model and syncs, once every initial list is
    /// complete.
    fn sync_kube(&mut self) {
        self.kube_pending = false;
        let fed = self.source.feed(&mut self.model);
        self.health.set_node_eligible(self.source.node_eligible());
        self.pending_triggers.extend(fed.trigger_times);
        if !fed.ready {
            debug!("waiting for the initial lists");
            return;
        }
        let first = !self.synced_once;
        if self.source.is_polled() && !fed.changed && !first {
            // A wake-up that changed no manifest (an editor's hidden
            // temporary file, a ConfigMap's symlink swap): nothing to
            // program, and a sync would hold the next, real change back by
            // --min-sync-period-ms (it came 46 ms late in half the
            // write-then-rename saves at 10,000 Services).
            if let Some(since) = self.pending_since.take() {
                self.health.unqueue(since);
            }
            return;
        }
        self.sync();
        if first {
            self.log_ready();
        }
    }

    /// Feeds the model from a polled source (manifests); true if it got
    /// new objects. An API server is fed by [`Context::sync_kube`].
    fn poll_source(&mut self) -> bool {
        self.source.is_polled() && self.source.feed(&mut self.model).changed
    }

    fn refresh_addresses(&mut self) -> bool {
        let listed = devices::nodeport_addresses(&self.args.nodeport_addresses)
            .and_then(|np| Ok((np, devices::nodeport_addresses(&[])?)));
        match listed {
            Ok((np, host)) => {
                if let Some(times) = self.address_errors.succeeded() {
                    info!(failed = times, "listing node addresses works again");
                }
                if np == self.node_addrs && host == self.host_addrs {
                    return false;
                }
                info!(addresses = ?np, "NodePort addresses");
                self.node_addrs = np;
                self.host_addrs = host;
                self.recheck_backends = true;
                true
            }
            Err(e) => {
                let e = format!("{e:#}");
                if let Some(times) = self.address_errors.failed(&e) {
                    warn!(error = %e, times, "listing node addresses failed; keeping the last ones");
                }
                false
            }
        }
    }

    /// A change was seen: it counts for health and programming latency.
    fn queued(&mut self) {
        let now = Instant::now();
        self.pending_since.get_or_insert(now);
        self.health.queued(now);
    }

    /// Brings the maps to the model, and records how it went.
    fn sync(&mut self) {
        let started = Instant::now();
        self.last_sync = started;
        let changed = self.model.update();
        self.metrics.sync.record_changes(self.model.take_changes());
        let mut problems = self.model.problems();
        let (service_cidrs, cidr_problems) = service_cidrs(
            &self.args.service_cluster_ip_range,
            &self.source.service_cidrs(),
            SERVICE_CIDRS,
        );
        problems.extend(cidr_problems);
        self.log_new_problems(&problems);
        self.update_pod_egress(&changed, true);
        let report = self.program(&changed);
        self.log_new_failures(&report);
        self.rebuild_filters();
        self.apply_service_cidrs(service_cidrs);
        self.update_health_checks();
        self.warn_of_ipv6_on_small_maps();
        let m = &self.metrics.sync;
        m.record_write_failures(&report.failed);
        m.record_skipped(&problems, self.source.unreadable());
        m.record_no_local_endpoints(self.model.frontends());
        m.set_map_entries(&self.syncer.entry_counts());
        let (addr_bits, endpoint_bits) = self.syncer.maps().filter_bits();
        m.set_map_entries(&[
            (proxy_common::ADDR_FILTER_MAP, addr_bits as usize),
            (proxy_common::ENDPOINT_FILTER_MAP, endpoint_bits as usize),
        ]);
        let triggers = std::mem::take(&mut self.pending_triggers);
        let wall = m.record_sync(started, self.pending_since.take(), &triggers);
        if report.failed.is_empty() {
            self.health.synced(started, wall);
        }
        if report.frontends_written + report.frontends_removed >= TRIM_AFTER_FRONTENDS {
            release_freed_memory();
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

    /// Writes the service CIDRs in force (flags and ServiceCIDR objects)
    /// into the datapath's configuration when they change. Called after the
    /// frontends are programmed, so a new Service in a new range is never
    /// dropped as unallocated in between. A failed write is logged and tried
    /// again at the next sync.
    fn apply_service_cidrs(&mut self, cidrs: Vec<Cidr>) {
        if cidrs == self.service_cidrs {
            return;
        }
        match self.write_config(&cidrs, self.host_routing) {
            Ok(()) => {
                let shown: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                info!(service_cidrs = ?shown, "service CIDRs");
                self.service_cidrs = cidrs;
            }
            Err(e) => warn!(error = %format!("{e:#}"), "writing the service CIDRs failed"),
        }
    }

    /// `--bpf-host-routing=auto`: turns host routing off as soon as a
    /// netfilter hook it would bypass has rules, and on again when none
    /// has. nftables' notification wakes this at once; iptables-legacy,
    /// which sends none, is seen at the next tick. A failed write is logged
    /// and tried again then.
    fn update_host_routing(&mut self) {
        if self.args.bpf_host_routing != HostRouting::Auto {
            return;
        }
        let (on, why) = host_routing_wanted(HostRouting::Auto);
        if on == self.host_routing {
            return;
        }
        let cidrs = self.service_cidrs.clone();
        match self.write_config(&cidrs, on) {
            Ok(()) => {
                log_host_routing(on, &why);
                self.host_routing = on;
                self.metrics.sync.bpf_host_routing.set(i64::from(on));
            }
            Err(e) => warn!(error = %format!("{e:#}"), "switching BPF host routing failed"),
        }
    }

    /// Writes the datapath's configuration (both families) with these
    /// service CIDRs and host routing on or off.
    fn write_config(&self, cidrs: &[Cidr], host_routing: bool) -> Result<()> {
        let cfg = datapath_config(
            self.args.snat_port_range,
            &self.args.cluster_cidr,
            cidrs,
            switches(&self.args, host_routing),
        )?;
        let cfg6 = datapath_config6(&self.args.cluster_cidr, cidrs)?;
        let mut map: Array<MapData, Config> = open_pinned(self.dp.root(), CONFIG_MAP)?;
        map.set(0, cfg, 0)?;
        let mut map6: Array<MapData, Config6> = open_pinned(self.dp.root(), CONFIG6_MAP)?;
        Ok(map6.set(0, cfg6, 0)?)
    }

    /// Opens and closes the Services' health checks and updates their
    /// counts: on the addresses NodePorts answer on, or all of them (one
    /// wildcard listener) without `--nodeport-addresses`, as kube-proxy.
    fn update_health_checks(&mut self) {
        let bind = if self.args.nodeport_addresses.is_empty() {
            Bind::Any
        } else {
            Bind::Addresses(self.node_addrs.clone())
        };
        let done = self
            .service_health
            .update(self.model.health_checks(), bind, Instant::now());
        self.record_health_checks(done.bind_failures);
    }

    fn record_health_checks(&self, new_failures: usize) {
        let (serving, failing) = self.service_health.listener_counts();
        self.metrics
            .sync
            .record_health_checks(serving, failing, new_failures);
    }

    /// IPv6 came to a node whose IPv6 maps are small: served, but with a
    /// few flows at a time until a restart sizes the maps. Logged once.
    fn warn_of_ipv6_on_small_maps(&mut self) {
        if !self.ipv6_maps_small {
            return;
        }
        let frontends6 = self.syncer.has_ipv6_frontends();
        let address6 = self.node_addrs.iter().find(|a| a.is_ipv6());
        if frontends6 || address6.is_some() {
            warn!(
                frontends6,
                address = ?address6,
                entries = crate::datapath::resize::IPV6_OFF_ENTRIES,
                "IPv6 in use, but the IPv6 conntrack maps are small: restart the daemon \
                 (or run it with --ipv6=on) to size them"
            );
            self.ipv6_maps_small = false;
        }
    }

    /// The first sync compares everything with what a previous run left
    /// pinned; later ones only hand over what the model changed.
    fn program(&mut self, changed: &BTreeSet<FrontendKey>) -> SyncReport {
        if self.synced_once {
            let node_addrs = convert::to_node_addrs(&self.node_addrs, &self.host_addrs);
            let changes = convert::to_changes(self.model.frontends(), changed);
            self.syncer.apply(&changes, Some(&node_addrs))
        } else {
            self.synced_once = true;
            self.syncer.sync(&convert::to_desired(
                self.model.frontends(),
                &self.node_addrs,
                &self.host_addrs,
            ))
        }
    }

    /// Write failures not logged at the last sync: a failed frontend is
    /// retried at every sync, and logged again only once it was written.
    fn log_new_failures(&mut self, report: &SyncReport) {
        let now: BTreeSet<String> = report
            .failed
            .iter()
            .map(|(name, e)| format!("{name}: {e}"))
            .collect();
        for f in now.difference(&self.failures_logged) {
            warn!(failure = %f, "not programmed; it keeps its previous state, retried at every sync");
        }
        self.failures_logged = now;
    }

    /// Problems not logged at the last sync (each is logged once while it
    /// lasts).
    fn log_new_problems(&mut self, problems: &[Problem]) {
        let shown: BTreeSet<String> = problems.iter().map(|p| p.to_string()).collect();
        for p in shown.difference(&self.problems_logged) {
            warn!(problem = %p, "skipped");
        }
        self.problems_logged = shown;
    }
}
