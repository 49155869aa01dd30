//! Prometheus metrics. kube-proxy's names where the meaning matches, so
//! existing dashboards keep working; `kube_ebpf_proxy_*` for the rest.
//!
//! Control-plane figures are recorded by the sync loop through the
//! `record_*` methods of [`SyncMetrics`]. Datapath figures are read from the
//! pinned per-CPU BPF counters at scrape time ([`DatapathCollector`]), so
//! they cost nothing between scrapes.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter as PromCounter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::*;

mod process;
pub use process::{ProcessCollector, ProcessFigures};

use crate::{
    datapath::open_pinned,
    log_limit::{LogLimiter, REMIND_EVERY},
    model::{Frontend, FrontendKey, FrontendKind, ObjectChanges, Problem},
    source::kube::WatchStats,
    sync::lbmap::WriteError,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// "internal" or "external", as kube-proxy labels it.
    pub traffic_policy: &'static str,
    /// "IPv4" or "IPv6": kube-proxy runs one proxier per family, each
    /// counting its own frontends.
    pub ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// "IPv4" or "IPv6", as Kubernetes spells the families.
    pub ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapFamilyLabels {
    map: &'static str,
    ip_family: &'static str,
}

const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

fn family_of(ip: &std::net::IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The family of a per-family map's entries.
fn family_of_map(map: &str) -> &'static str {
    if proxy_common::V6_MAPS.contains(&map) {
        "IPv6"
    } else {
        "IPv4"
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub map: &'static str,
}

/// Figures the sync loop updates.
#[derive(Debug)]
pub struct SyncMetrics {
    pub sync_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// From a slice's trigger time to the datapath using the change, as
    /// kube-proxy measures it.
    pub network_programming: Histogram,
    /// From the daemon seeing a change (either source) to programming it.
    pub sync_wait: Histogram,
    pub service_changes: PromCounter,
    pub endpoint_changes: PromCounter,
    pub no_local_endpoints: Family<PolicyLabels, Gauge>,
    pub map_write_failures: Family<MapLabels, PromCounter>,
    pub skipped_objects: Family<KindLabels, Gauge>,
    /// Entries the syncer keeps in the desired-state maps, and their share
    /// of each map's capacity.
    pub map_entries: Family<NameLabels, Gauge>,
    pub map_fill: Family<NameLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Frontends and backends programmed, per address family.
    pub frontends: Family<FamilyLabels, Gauge>,
    pub backends: Family<FamilyLabels, Gauge>,
    /// 1 while the socket-level programs are attached.
    pub socket_lb_enabled: Gauge,
    pub socket_lb_attach_failures: PromCounter,
    /// 1 while pods' devices get the egress hook.
    pub pod_egress_hook: Gauge,
    /// 1 while the ingress hook sends traffic on itself (BPF host routing).
    pub bpf_host_routing: Gauge,
    /// Health-check listeners (`healthCheckNodePort`) serving, and waiting
    /// for a retry because the port could not be bound.
    pub health_check_listeners: Family<StateLabels, Gauge>,
    pub health_check_bind_failures: PromCounter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. ~32 s, as kube-proxy's sync histograms span.
    exponential_buckets(0.001, 2.0, 16)
}

fn programming_buckets() -> impl Iterator<Item = f64> {
    // 10 ms .. ~11 min: the trigger time includes the EndpointSlice
    // controller's own delay, and kube-proxy's buckets reach 5 min.
    exponential_buckets(0.01, 2.0, 17)
}

/// Maps the syncer writes, and how a write can fail: their failure series
/// exist at 0 from the start, so that a dashboard's rate() and an alert see
/// the first failure as an increase rather than a new series.
const WRITTEN_MAPS: [&str; 7] = [
    SVC_MAP,
    SLOT_MAP,
    BACKEND_MAP,
    ADDR_MAP,
    NAME_MAP,
    AFFMEM_MAP,
    SRCRNG_MAP,
];
const WRITE_FAILURES: [&str; 2] = ["full", "error"];

impl SyncMetrics {
    fn new() -> SyncMetrics {
        let map_write_failures = Family::<MapLabels, PromCounter>::default();
        for map in WRITTEN_MAPS {
            for reason in WRITE_FAILURES {
                drop(map_write_failures.get_or_create(&MapLabels { map, reason }));
            }
        }
        SyncMetrics {
            sync_duration: Histogram::new(seconds_buckets()),
            last_sync_timestamp: Gauge::default(),
            network_programming: Histogram::new(programming_buckets()),
            sync_wait: Histogram::new(seconds_buckets()),
            service_changes: PromCounter::default(),
            endpoint_changes: PromCounter::default(),
            no_local_endpoints: Family::default(),
            map_write_failures,
            skipped_objects: Family::default(),
            map_entries: Family::default(),
            map_fill: Family::default(),
            frontends: Family::default(),
            backends: Family::default(),
            health_check_listeners: Family::default(),
            health_check_bind_failures: PromCounter::default(),
            socket_lb_enabled: Gauge::default(),
            pod_egress_hook: Gauge::default(),
            bpf_host_routing: Gauge::default(),
            socket_lb_attach_failures: PromCounter::default(),
        }
    }
}

/// The registry and the handles the daemon updates.
pub struct Metrics {
    pub registry: Registry,
    pub sync: Arc<SyncMetrics>,
}

impl Metrics {
    /// `bpffs`: where the datapath's maps are pinned (read at scrape time).
    pub fn new(bpffs: &Path) -> Metrics {
        let sync = Arc::new(SyncMetrics::new());
        let mut r = Registry::default();
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long a sync of the datapath state took",
            sync.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the datapath state was last synced (Unix time)",
            sync.last_sync_timestamp.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change's trigger time (its \
             endpoints.kubernetes.io/last-change-trigger-time) to the datapath using it",
            sync.network_programming.clone(),
        );
        r.register(
            "kube_ebpf_proxy_sync_wait_duration_seconds",
            "From the daemon seeing a change of Services or EndpointSlices to the datapath using it",
            sync.sync_wait.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Changed Services seen",
            sync.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Changed EndpointSlices seen",
            sync.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints",
            "Service frontends with a Local traffic policy and no local endpoint",
            sync.no_local_endpoints.clone(),
        );
        r.register(
            "kube_ebpf_proxy_map_write_failures",
            "Map writes that failed; the frontend kept its previous state",
            sync.map_write_failures.clone(),
        );
        r.register(
            "kube_ebpf_proxy_socket_lb_enabled",
            "1 while socket-level load balancing is attached; 0 when turned off or its attach failed",
            sync.socket_lb_enabled.clone(),
        );
        r.register(
            "kube_ebpf_proxy_pod_egress_hook",
            "1 while pods' devices get the egress program (socket LB off, or a hostNetwork backend on this node); 0 when their ingress alone is hooked",
            sync.pod_egress_hook.clone(),
        );
        r.register(
            "kube_ebpf_proxy_bpf_host_routing",
            "1 while the ingress hook sends traffic to and from endpoints on by FIB lookup and redirect (--bpf-host-routing; with auto, while no netfilter hook on the forwarding path has rules)",
            sync.bpf_host_routing.clone(),
        );
        r.register(
            "kube_ebpf_proxy_socket_lb_attach_failures",
            "Attaching the socket-level programs failed; the per-packet path serves everything",
            sync.socket_lb_attach_failures.clone(),
        );
        r.register(
            "kube_ebpf_proxy_skipped_objects",
            "Objects or parts of objects currently skipped as invalid, by problem kind",
            sync.skipped_objects.clone(),
        );
        r.register(
            "kube_ebpf_proxy_desired_map_entries",
            "Entries the daemon keeps in each desired-state map (probe filters: bits set)",
            sync.map_entries.clone(),
        );
        r.register(
            "kube_ebpf_proxy_desired_map_fill_ratio",
            "Entries over capacity of each desired-state map (probe filters: bits set over bits)",
            sync.map_fill.clone(),
        );
        r.register(
            "kube_ebpf_proxy_frontends",
            "Service frontends (address, port, protocol) programmed, per address family",
            sync.frontends.clone(),
        );
        r.register(
            "kube_ebpf_proxy_backends",
            "Backends programmed, per address family",
            sync.backends.clone(),
        );
        r.register(
            "kube_ebpf_proxy_health_check_listeners",
            "Listeners of Services' health checks (healthCheckNodePort), serving or failing to bind",
            sync.health_check_listeners.clone(),
        );
        r.register(
            "kube_ebpf_proxy_health_check_bind_failures",
            "Attempts to bind a health check port that failed (each is retried with a backoff)",
            sync.health_check_bind_failures.clone(),
        );
        r.register_collector(Box::new(DatapathCollector {
            bpffs: bpffs.to_path_buf(),
            read_errors: std::sync::Mutex::new(LogLimiter::reminding(REMIND_EVERY)),
        }));
        r.register_collector(Box::new(ProcessCollector));
        Metrics { registry: r, sync }
    }

    /// Exports the API server watchers' counters (read at scrape time).
    pub fn register_watch(&mut self, stats: WatchStats) {
        self.registry
            .register_collector(Box::new(WatchCollector(stats)));
    }

    /// The Prometheus text format (0.0.4), which every scraper and
    /// `promtool check metrics` read.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(openmetrics_to_prometheus(&out))
    }
}

/// prometheus-client writes OpenMetrics, where a counter's HELP and TYPE
/// lines name it without the `_total` its samples carry, and which ends in
/// `# EOF`. The Prometheus text format names counters with `_total`
/// throughout; promtool (and older scrapers) otherwise see counters without
/// help or type.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The API server watchers' counters, per resource.
#[derive(Debug)]
struct WatchCollector(WatchStats);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

impl Collector for WatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.get();
        let rows = |get: fn(&crate::source::kube::WatchCounters) -> u64| -> Vec<_> {
            stats
                .iter()
                .map(|(resource, c)| (ResourceLabels { resource }, get(c)))
                .collect()
        };
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_watch_lists",
            "Lists started by the API server watcher: the initial one and every re-list",
            &rows(|c| c.lists),
        )?;
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_watch_errors",
            "Failed lists, failed or broken watches and error events; each is followed by a backoff",
            &rows(|c| c.errors),
        )?;
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_watch_events",
            "Objects added, modified or deleted after the initial list",
            &rows(|c| c.events),
        )?;
        let synced: Vec<_> = rows(|c| c.ready as u64)
            .into_iter()
            .map(|(l, v)| (l, v as f64))
            .collect();
        gauge_family(
            &mut encoder,
            "kube_ebpf_proxy_watch_synced",
            "1 once the watcher's initial list has completed",
            &synced,
        )
    }
}

/// Reads the datapath's counters from the pinned maps at scrape time.
#[derive(Debug)]
pub struct DatapathCollector {
    bpffs: PathBuf,
    /// Every scrape retries: a failure is logged when it changes.
    read_errors: std::sync::Mutex<LogLimiter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    name: String,
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

fn service_labels(name: &str) -> ServiceLabels {
    // namespace/name:port (port omitted for an unnamed port)
    let (namespace, rest) = name.split_once('/').unwrap_or(("", name));
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    ServiceLabels {
        namespace: namespace.into(),
        name: name.into(),
        port: port.into(),
    }
}

/// A counter family built at scrape time.
fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// Datapath figures, gathered in one go so a failing map read skips the
/// datapath section instead of failing the whole scrape.
struct DatapathFigures {
    per_service: BTreeMap<String, SvcStats>,
    counters: Vec<(Counter, u64)>,
    tracked: Vec<(&'static str, u64, u32)>,
}

impl DatapathCollector {
    fn gather(&self) -> anyhow::Result<DatapathFigures> {
        let root = &self.bpffs;
        let names: HashMap<MapData, u32, SvcName> = open_pinned(root, NAME_MAP)?;
        let stats: PerCpuArray<MapData, SvcStats> = open_pinned(root, SVC_STATS_MAP)?;
        let mut per_service: BTreeMap<String, SvcStats> = BTreeMap::new();
        for item in names.iter() {
            let (id, name) = item?;
            let total = SvcStats::sum(stats.get(&id, 0)?.iter());
            // A service port has several frontends (ClusterIP, NodePort):
            // one series per service port.
            let e = per_service.entry(name.as_str().to_string()).or_default();
            *e = SvcStats::sum([&*e, &total]);
        }
        let global: PerCpuArray<MapData, u64> = open_pinned(root, STATS_MAP)?;
        let counters = Counter::ALL
            .iter()
            .map(|c| Ok((*c, global.get(&(*c as u32), 0)?.iter().sum())))
            .collect::<anyhow::Result<_>>()?;
        // Conntrack maps are LRU: their fill is counted by walking the keys
        // (one syscall per entry; fine at the sizes a scrape interval sees).
        let tracked = crate::inspect::map_fill(root)?
            .into_iter()
            .map(|r| (r.map, r.entries, r.max))
            .collect();
        Ok(DatapathFigures {
            per_service,
            counters,
            tracked,
        })
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = match self.gather() {
            Ok(f) => f,
            Err(e) => {
                let e = format!("{e:#}");
                let mut limiter = self.read_errors.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(times) = limiter.failed(&e) {
                    tracing::warn!(error = %e, times, "reading datapath counters failed");
                }
                return Ok(());
            }
        };
        if let Some(times) = self
            .read_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .succeeded()
        {
            tracing::info!(failed = times, "reading datapath counters works again");
        }
        let svc = |get: fn(&SvcStats) -> u64| -> Vec<(ServiceLabels, u64)> {
            f.per_service
                .iter()
                .map(|(n, s)| (service_labels(n), get(s)))
                .collect()
        };
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_service_packets",
            "Packets translated for a service port, both directions",
            &svc(|s| s.packets),
        )?;
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_service_bytes",
            "Bytes translated for a service port, both directions",
            &svc(|s| s.bytes),
        )?;
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_service_new_connections",
            "New connections (flows) balanced by a service port",
            &svc(|s| s.new_flows),
        )?;
        let drops: Vec<(ReasonLabels, u64)> = f
            .counters
            .iter()
            .filter(|(c, _)| c.is_drop())
            .map(|(c, v)| (ReasonLabels { reason: c.name() }, *v))
            .collect();
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_datapath_drops",
            "Packets dropped or rejected by the datapath, by reason",
            &drops,
        )?;
        let events: Vec<(EventLabels, u64)> = f
            .counters
            .iter()
            .filter(|(c, _)| !c.is_drop())
            .map(|(c, v)| (EventLabels { event: c.name() }, *v))
            .collect();
        counter_family(
            &mut encoder,
            "kube_ebpf_proxy_datapath_packets",
            "Packets the datapath translated, by event",
            &events,
        )?;
        let labels = |map: &'static str| MapFamilyLabels {
            map,
            ip_family: family_of_map(map),
        };
        let entries: Vec<(MapFamilyLabels, f64)> = f
            .tracked
            .iter()
            .map(|(m, n, _)| (labels(m), *n as f64))
            .collect();
        gauge_family(
            &mut encoder,
            "kube_ebpf_proxy_conntrack_entries",
            "Entries in the LRU maps the datapath writes: conntrack, reverse NAT, session affinity",
            &entries,
        )?;
        let fill: Vec<(MapFamilyLabels, f64)> = f
            .tracked
            .iter()
            .map(|(m, n, size)| (labels(m), *n as f64 / (*size).max(1) as f64))
            .collect();
        gauge_family(
            &mut encoder,
            "kube_ebpf_proxy_conntrack_fill_ratio",
            "Entries over capacity of the LRU maps the datapath writes",
            &fill,
        )?;
        let max: Vec<(MapFamilyLabels, f64)> = f
            .tracked
            .iter()
            .map(|(m, _, size)| (labels(m), *size as f64))
            .collect();
        gauge_family(
            &mut encoder,
            "kube_ebpf_proxy_conntrack_max",
            "Capacity (max entries) of the LRU maps the datapath writes (--conntrack-max sizes \
             conntrack and reverse NAT)",
            &max,
        )?;
        Ok(())
    }
}

impl SyncMetrics {
    /// Services and EndpointSlices changed since the last sync.
    pub fn record_changes(&self, changes: ObjectChanges) {
        self.service_changes.inc_by(changes.services);
        self.endpoint_changes.inc_by(changes.endpoint_slices);
    }

    /// Frontends a sync could not write (they keep their previous state).
    pub fn record_write_failures(&self, failed: &[(String, WriteError)]) {
        for (_, e) in failed {
            self.map_write_failures
                .get_or_create(&MapLabels {
                    map: e.map(),
                    reason: e.label(),
                })
                .inc();
        }
    }

    /// What is skipped now: the model's problems by kind, and the parts of
    /// the manifests that could not be read (kind `manifest`).
    pub fn record_skipped(&self, problems: &[Problem], unreadable_manifests: usize) {
        let mut skipped: BTreeMap<String, i64> = BTreeMap::new();
        for p in problems {
            *skipped.entry(p.kind.label().to_string()).or_default() += 1;
        }
        *skipped.entry("manifest".to_string()).or_default() += unreadable_manifests as i64;
        self.skipped_objects.clear();
        for (kind, n) in skipped {
            self.skipped_objects
                .get_or_create(&KindLabels { kind })
                .set(n);
        }
    }

    /// Frontends with a Local traffic policy and no local endpoint, by
    /// policy (internal: ClusterIP frontends; external: the others) and
    /// address family.
    pub fn record_no_local_endpoints(&self, frontends: &BTreeMap<FrontendKey, Frontend>) {
        let mut counts: BTreeMap<(&'static str, &'static str), i64> = BTreeMap::new();
        for policy in ["internal", "external"] {
            for family in FAMILIES {
                counts.insert((policy, family), 0);
            }
        }
        for (key, fe) in frontends {
            if fe.local_only && fe.backends.is_empty() {
                let policy = match fe.kind {
                    FrontendKind::ClusterIp => "internal",
                    _ => "external",
                };
                *counts.entry((policy, family_of(&key.ip))).or_default() += 1;
            }
        }
        for ((traffic_policy, ip_family), n) in counts {
            self.no_local_endpoints
                .get_or_create(&PolicyLabels {
                    traffic_policy,
                    ip_family,
                })
                .set(n);
        }
    }

    /// A sync that began at `started` is done; `pending_since` is when the
    /// oldest change it programmed was seen, `triggers` the trigger times of
    /// the slice changes it programmed. Returns the wall-clock time recorded
    /// as the last sync.
    pub fn record_sync(
        &self,
        started: Instant,
        pending_since: Option<Instant>,
        triggers: &[SystemTime],
    ) -> SystemTime {
        self.sync_duration.observe(started.elapsed().as_secs_f64());
        let wall = SystemTime::now();
        self.last_sync_timestamp.set(
            wall.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        if let Some(since) = pending_since {
            self.sync_wait.observe(since.elapsed().as_secs_f64());
        }
        for t in triggers {
            // A trigger time ahead of our clock (skew between nodes) counts
            // as 0, as kube-proxy's time.Since would give a negative one.
            let took = wall.duration_since(*t).unwrap_or_default();
            self.network_programming.observe(took.as_secs_f64());
        }
        wall
    }

    /// Records how full the desired-state maps are.
    /// The health-check listeners after a reconcile.
    pub fn record_health_checks(&self, serving: usize, failing: usize, new_failures: usize) {
        for (state, n) in [("serving", serving), ("failing", failing)] {
            self.health_check_listeners
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        self.health_check_bind_failures.inc_by(new_failures as u64);
    }

    /// Also sets the per-family frontend and backend counts, from the
    /// entries of the per-family service and backend maps.
    pub fn set_map_entries(&self, counts: &[(&'static str, usize)]) {
        for (map, n) in counts {
            let family = FamilyLabels {
                ip_family: family_of_map(map),
            };
            match *map {
                SVC_MAP | SVC6_MAP => self.frontends.get_or_create(&family).set(*n as i64),
                BACKEND_MAP | BACKEND6_MAP => self.backends.get_or_create(&family).set(*n as i64),
                _ => 0,
            };
            let capacity = match *map {
                SVC_MAP => SVC_MAP_SIZE,
                SVC6_MAP => SVC6_MAP_SIZE,
                SLOT_MAP => SLOT_MAP_SIZE,
                BACKEND_MAP => BACKEND_MAP_SIZE,
                BACKEND6_MAP => BACKEND6_MAP_SIZE,
                ADDR_MAP => ADDR_MAP_SIZE,
                ADDR6_MAP => ADDR6_MAP_SIZE,
                // Bits set: the fill is the share of non-members a probe
                // filter still sends to the lookup.
                ADDR_FILTER_MAP | ENDPOINT_FILTER_MAP => FILTER_BITS,
                _ => SVC_MAP_SIZE,
            };
            let labels = NameLabels { map };
            self.map_entries.get_or_create(&labels).set(*n as i64);
            self.map_fill
                .get_or_create(&labels)
                .set(*n as f64 / capacity as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_suffix_in_help_and_type() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }

    #[test]
    fn service_names_split_into_labels() {
        let l = service_labels("demo/web:http");
        assert_eq!(
            (l.namespace.as_str(), l.name.as_str(), l.port.as_str()),
            ("demo", "web", "http")
        );
        let l = service_labels("default/backend-service");
        assert_eq!((l.name.as_str(), l.port.as_str()), ("backend-service", ""));
    }

    /// (count, sum) of a histogram in an exposition.
    fn histogram(text: &str, name: &str) -> (f64, f64) {
        let value = |suffix: &str| {
            let prefix = format!("{name}_{suffix} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("{prefix} missing in\n{text}"))
                .parse::<f64>()
                .unwrap()
        };
        (value("count"), value("sum"))
    }

    #[test]
    fn network_programming_is_measured_from_the_trigger_times() {
        let m = Metrics::new(Path::new("/nonexistent"));
        let now = SystemTime::now();
        let triggers = [
            now - std::time::Duration::from_secs(2),
            now - std::time::Duration::from_millis(500),
            // Another node's clock ahead of ours: 0, not negative.
            now + std::time::Duration::from_secs(60),
        ];
        let started = Instant::now();
        m.sync.record_sync(started, Some(started), &triggers);
        let text = m.encode().unwrap();
        let (count, sum) = histogram(&text, "kubeproxy_network_programming_duration_seconds");
        assert_eq!(count, 3.0);
        // 2 s + 0.5 s, plus the few microseconds of this test.
        assert!((2.5..2.6).contains(&sum), "{sum}");
        // A sync without slice changes observes nothing there.
        m.sync.record_sync(started, Some(started), &[]);
        let text = m.encode().unwrap();
        let name = "kubeproxy_network_programming_duration_seconds";
        assert_eq!(histogram(&text, name).0, 3.0);
        let (waits, _) = histogram(&text, "kube_ebpf_proxy_sync_wait_duration_seconds");
        assert_eq!(waits, 2.0);
    }

    #[test]
    fn frontends_backends_and_no_local_endpoints_are_counted_per_family() {
        let m = Metrics::new(Path::new("/nonexistent"));
        m.sync.set_map_entries(&[
            (SVC_MAP, 3),
            (SVC6_MAP, 2),
            (SLOT_MAP, 9),
            (BACKEND_MAP, 4),
            (BACKEND6_MAP, 1),
        ]);
        let mut frontends = BTreeMap::new();
        let local_without_endpoint = |ip: &str, kind| {
            let key = FrontendKey {
                ip: ip.parse().unwrap(),
                port: 80,
                protocol: crate::model::Protocol::Tcp,
            };
            let fe = Frontend {
                service: crate::model::ServicePortName {
                    namespace: "demo".into(),
                    name: "web".into(),
                    port: String::new(),
                },
                kind,
                backends: vec![],
                local_only: true,
                internal_backends: None,
                drop_when_empty: false,
                affinity_timeout: None,
                source_ranges: vec![],
            };
            (key, fe)
        };
        for (ip, kind) in [
            ("10.96.0.1", FrontendKind::ClusterIp),
            ("fd00:96::1", FrontendKind::ClusterIp),
            ("fd00:96::2", FrontendKind::ClusterIp),
            ("::", FrontendKind::NodePort),
        ] {
            let (k, v) = local_without_endpoint(ip, kind);
            frontends.insert(k, v);
        }
        m.sync.record_no_local_endpoints(&frontends);
        let text = m.encode().unwrap();
        for line in [
            "kube_ebpf_proxy_frontends{ip_family=\"IPv4\"} 3",
            "kube_ebpf_proxy_frontends{ip_family=\"IPv6\"} 2",
            "kube_ebpf_proxy_backends{ip_family=\"IPv4\"} 4",
            "kube_ebpf_proxy_backends{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"internal\",ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"internal\",ip_family=\"IPv6\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"external\",ip_family=\"IPv4\"} 0",
            "kubeproxy_sync_proxy_rules_no_local_endpoints{traffic_policy=\"external\",ip_family=\"IPv6\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert_eq!(family_of_map(CT6_MAP), "IPv6");
        assert_eq!(family_of_map(CT_MAP), "IPv4");
    }

    #[test]
    fn control_plane_metrics_use_kube_proxy_names() {
        let m = Metrics::new(Path::new("/nonexistent"));
        m.sync.service_changes.inc();
        m.sync.sync_duration.observe(0.002);
        let text = m.encode().unwrap();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_count",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        for map in WRITTEN_MAPS {
            let name = format!(
                "kube_ebpf_proxy_map_write_failures_total{{map=\"{map}\",reason=\"full\"}} 0"
            );
            assert!(text.contains(&name), "{name} missing in\n{text}");
        }
    }
}
