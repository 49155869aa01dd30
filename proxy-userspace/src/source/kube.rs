//! Services, EndpointSlices, this node's Node object and the ServiceCIDRs
//! from the API server.
//!
//! Four kube-runtime watchers (list, then watch from the list's
//! resourceVersion, resume after a dropped stream, re-list after 410 Gone)
//! each feed a reflector store, as client-go's informers feed kube-proxy.
//! They run as tokio tasks; the daemon's one sync loop waits on
//! [`KubeSource::changed`] and hands the changed objects to the model with
//! [`KubeSource::feed`] ([`KubeSource::snapshot`] copies the stores whole,
//! for tests).
//!
//! While the API server is unreachable the stores keep the last state they
//! had (so the datapath keeps serving it) and every watcher retries with
//! kube-runtime's default backoff (0.8 s doubling to 30 s, with jitter):
//! no busy loop, whatever the failure.
//!
//! Filtering: as kube-proxy, slices labelled `service.kubernetes.io/headless`
//! are dropped by the server. Services (and slices) labelled
//! `service.kubernetes.io/service-proxy-name` are dropped by the server only
//! when no `--service-proxy-name` is set; otherwise the model filters them
//! (a label selector cannot say "unset or equal to X").
//!
//! ServiceCIDRs (`networking.k8s.io/v1`, Kubernetes 1.33 and later) are
//! optional: when the server does not serve them (404) or the proxy may not
//! read them (403, an older ClusterRole), the watcher counts as listed with
//! none, so the proxy still starts, and it keeps retrying with its backoff.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::Debug,
    hash::Hash,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    health,
    log_limit::{LogLimiter, REMIND_EVERY},
    model::{
        LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ModelCache, NamespacedName, NodeInfo, slim,
        slim::SlimSlice,
    },
};

/// How long a watch lasts before the server ends it and the watcher resumes
/// it. kube-runtime treats a watch silent for this long plus 5 s as a dead
/// connection, so this also bounds how long a half-open connection (a
/// crashed server, a dropped route) goes unnoticed: about a minute, as
/// client-go's HTTP/2 health checks give kube-proxy.
pub const WATCH_TIMEOUT_S: u32 = 60;

/// The longest the client waits for bytes on a connection before failing
/// the request. kube leaves it unset, so a list sent to a server that
/// accepted the connection and then hung would wait forever; the API server
/// itself ends requests after 60 s, so nothing legitimate is cut. Longer
/// than [`WATCH_TIMEOUT_S`], so a quiet watch is never cut by it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Set by the EndpointSlice controller to when the change a slice reflects
/// happened (a Pod became ready, a Service changed): where kube-proxy's
/// network programming latency starts, and ours.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The slice's [`TRIGGER_TIME_ANNOTATION`], if it has a valid one (RFC 3339,
/// as the controller writes it).
pub fn trigger_time<K: Resource>(object: &K) -> Option<SystemTime> {
    let value = object
        .meta()
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let at: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(at))
}

/// Where the API server is and how to authenticate to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeOptions {
    /// A kubeconfig file (its current context).
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL; overrides the kubeconfig's server. Without a
    /// kubeconfig, requests are sent without credentials (for a local or
    /// test server). `host:port` without a scheme means https.
    pub master: Option<String>,
    /// This node's name: its Node object gives addresses and topology labels.
    pub node_name: String,
}

/// The client configuration `opts` asks for: the kubeconfig file, `--master`
/// overriding its server (or alone), or, when neither is given, in-cluster
/// (the pod's service account), falling back to kube's inference
/// (`$KUBECONFIG`, `~/.kube/config`).
pub async fn config(opts: &KubeOptions) -> Result<Config> {
    let master = opts.master.as_deref().map(parse_master).transpose()?;
    let mut config = match (&opts.kubeconfig, master) {
        (Some(path), master) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            let mut config =
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("using kubeconfig {}", path.display()))?;
            if let Some(url) = master {
                config.cluster_url = url;
            }
            config
        }
        (None, Some(url)) => Config::new(url),
        (None, None) => match Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => Config::infer().await.with_context(|| {
                format!("no --kubeconfig or --master, and not in a cluster ({in_cluster})")
            })?,
        },
    };
    config.read_timeout = Some(READ_TIMEOUT);
    // Count the read timeout from when a request is sent, not from when its
    // pooled connection went idle.
    config.reset_reader_on_write = true;
    Ok(config)
}

/// A client for the API server `opts` names (see [`config`]).
pub async fn client(opts: &KubeOptions) -> Result<Client> {
    let config = config(opts).await?;
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("building a client for {url}"))
}

fn parse_master(master: &str) -> Result<hyper::Uri> {
    let with_scheme = if master.contains("://") {
        master.to_string()
    } else {
        format!("https://{master}")
    };
    let uri: hyper::Uri = with_scheme
        .parse()
        .with_context(|| format!("--master {master:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => bail!("--master {master:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"),
    }
}

/// Label selectors sent to the server, as kube-proxy's informers send them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selectors {
    pub services: Option<String>,
    pub slices: String,
}

impl Selectors {
    pub fn new(service_proxy_name: Option<&str>) -> Selectors {
        match service_proxy_name {
            None => Selectors {
                services: Some(format!("!{LABEL_SERVICE_PROXY_NAME}")),
                slices: format!("!{LABEL_HEADLESS},!{LABEL_SERVICE_PROXY_NAME}"),
            },
            // Services labelled for us, and unlabelled ones: the model picks.
            Some(_) => Selectors {
                services: None,
                slices: format!("!{LABEL_HEADLESS}"),
            },
        }
    }
}

/// A copy of the stores.
#[derive(Clone, Debug, Default)]
pub struct KubeObjects {
    /// Sorted by namespace and name.
    pub services: Vec<Service>,
    /// Sorted by namespace and name.
    pub slices: Vec<EndpointSlice>,
    /// This node's Node object; `None` until it is seen (or if it does not
    /// exist).
    pub node: Option<Node>,
    /// Sorted by name.
    pub service_cidrs: Vec<ServiceCIDR>,
    /// Every watcher has completed its initial list. Until then the stores
    /// are empty or partial, and programming them would wipe the maps a
    /// previous run left.
    pub ready: bool,
}

/// Counters of one watcher, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchCounters {
    /// Lists started: the initial one and every re-list (after 410 Gone, or
    /// after an error while listing).
    pub lists: u64,
    /// Errors: failed lists, failed watch starts, broken streams, ERROR
    /// events. Each is followed by a backoff.
    pub errors: u64,
    /// Objects added, modified or deleted after the initial list.
    pub events: u64,
    /// The initial list has completed.
    pub ready: bool,
}

/// The resources watched, in the order [`KubeSource::counters`] gives them.
pub const RESOURCES: [&str; 4] = [
    Watched::Services.name(),
    Watched::EndpointSlices.name(),
    Watched::Node.name(),
    Watched::ServiceCidrs.name(),
];

/// One of the watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watched {
    Services,
    EndpointSlices,
    /// This node's Node object: read whole at every feed, so its changes
    /// are not recorded one by one.
    Node,
    /// Read whole at every feed too; optional (see the module
    /// documentation).
    ServiceCidrs,
}

impl Watched {
    const fn name(self) -> &'static str {
        match self {
            Watched::Services => "services",
            Watched::EndpointSlices => "endpointslices",
            Watched::Node => "node",
            Watched::ServiceCidrs => "servicecidrs",
        }
    }

    /// A resource the proxy can work without: a server that does not serve
    /// it, or forbids it, must not keep the proxy from starting.
    fn optional(self) -> bool {
        self == Watched::ServiceCidrs
    }
}

/// The server does not serve the resource (404) or forbids listing it
/// (403).
fn unavailable(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => matches!(s.code, 403 | 404),
        _ => false,
    }
}

/// Four reflectors running as tokio tasks (on whatever runtime `start` is
/// called from, current-thread included); dropping this stops them.
pub struct KubeSource {
    node_name: String,
    services: Store<Service>,
    /// In the compact form (see [`SlimSlice`]).
    slices: Store<SlimSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    shared: Arc<Shared>,
    counters: [Arc<Counters>; 4],
    /// The change generation the last feed or snapshot saw.
    seen: AtomicU64,
    /// This node's Node has been seen: if it vanishes, it was deleted.
    node_seen: AtomicBool,
    tasks: Vec<JoinHandle<()>>,
}

/// Wakes the sync loop: bumped (then notified) after every store change.
struct Shared {
    /// When watching started: older trigger times are not ours to measure.
    started: SystemTime,
    generation: AtomicU64,
    notify: Notify,
    /// What changed since the last feed: so the model is handed the
    /// changed objects, not all of them.
    pending: std::sync::Mutex<PendingChanges>,
}

/// Services and EndpointSlices changed since the last feed.
#[derive(Default)]
struct PendingChanges {
    services: Changed,
    slices: Changed,
}

impl PendingChanges {
    /// Where changes of `resource` are recorded; None for the Node.
    fn of(&mut self, resource: Watched) -> Option<&mut Changed> {
        match resource {
            Watched::Services => Some(&mut self.services),
            Watched::EndpointSlices => Some(&mut self.slices),
            Watched::Node | Watched::ServiceCidrs => None,
        }
    }
}

/// Changed objects of one resource since the last feed.
#[derive(Default)]
struct Changed {
    objects: std::collections::BTreeSet<NamespacedName>,
    /// A (re)list completed: anything may have changed.
    all: bool,
    /// The trigger times of the slices changed by watch events, as
    /// kube-proxy counts them: changes made before this source started, and
    /// deletions, are not programming latency.
    trigger_times: Vec<SystemTime>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            started: SystemTime::now(),
            generation: AtomicU64::default(),
            notify: Notify::default(),
            pending: Default::default(),
        }
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    fn record(&self, resource: Watched, change: impl FnOnce(&mut Changed)) {
        if let Some(changed) = self.pending.lock().unwrap().of(resource) {
            change(changed);
        }
    }
}

/// The watchers' counters, readable from elsewhere (the metrics).
#[derive(Clone)]
pub struct WatchStats([Arc<Counters>; 4]);

impl std::fmt::Debug for WatchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.get()).finish()
    }
}

impl WatchStats {
    /// Counters per resource, named as in [`RESOURCES`].
    pub fn get(&self) -> BTreeMap<&'static str, WatchCounters> {
        RESOURCES
            .iter()
            .zip(&self.0)
            .map(|(name, c)| (*name, c.get()))
            .collect()
    }
}

#[derive(Default)]
struct Counters {
    lists: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
    ready: AtomicBool,
}

impl Counters {
    fn get(&self) -> WatchCounters {
        WatchCounters {
            lists: self.lists.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Acquire),
        }
    }
}

impl KubeSource {
    /// Starts watching. `service_proxy_name` is the daemon's
    /// `--service-proxy-name`; it only decides what the server filters.
    pub fn start(client: Client, node_name: &str, service_proxy_name: Option<&str>) -> KubeSource {
        let selectors = Selectors::new(service_proxy_name);
        let config = || watcher::Config::default().timeout(WATCH_TIMEOUT_S);
        let mut services = config();
        services.label_selector = selectors.services;
        let slices = config().labels(&selectors.slices);
        let node = config().fields(&format!("metadata.name={node_name}"));
        KubeSource::from_streams(
            node_name,
            watcher(Api::<Service>::all(client.clone()), services)
                .modify(slim_service)
                .default_backoff(),
            watcher(Api::<EndpointSlice>::all(client.clone()), slices).default_backoff(),
            watcher(Api::<Node>::all(client.clone()), node)
                .modify(slim_node)
                .default_backoff(),
            watcher(Api::<ServiceCIDR>::all(client), config())
                .modify(|c: &mut ServiceCIDR| c.managed_fields_mut().clear())
                .default_backoff(),
        )
    }

    /// The reflectors over any event streams (the tests feed their own).
    fn from_streams(
        node_name: &str,
        services: impl WatchStream<Service>,
        slices: impl WatchStream<EndpointSlice>,
        nodes: impl WatchStream<Node>,
        service_cidrs: impl WatchStream<ServiceCIDR>,
    ) -> KubeSource {
        let shared = Arc::new(Shared::new());
        let counters: [Arc<Counters>; 4] = Default::default();
        let (svc_writer, slice_writer, node_writer, cidr_writer) = (
            Writer::default(),
            Writer::default(),
            Writer::default(),
            Writer::default(),
        );
        let mut source = KubeSource {
            node_name: node_name.to_string(),
            services: svc_writer.as_reader(),
            slices: slice_writer.as_reader(),
            nodes: node_writer.as_reader(),
            service_cidrs: cidr_writer.as_reader(),
            shared: shared.clone(),
            counters: counters.clone(),
            seen: AtomicU64::new(0),
            node_seen: AtomicBool::new(false),
            tasks: Vec::new(),
        };
        let [c_svc, c_slice, c_node, c_cidr] = counters;
        source.tasks = vec![
            tokio::spawn(reflect(
                Watched::Services,
                services,
                svc_writer,
                c_svc,
                shared.clone(),
            )),
            tokio::spawn(reflect(
                Watched::EndpointSlices,
                slices.map(|item| item.map(slim_slice_event)),
                slice_writer,
                c_slice,
                shared.clone(),
            )),
            tokio::spawn(reflect(
                Watched::Node,
                nodes,
                node_writer,
                c_node,
                shared.clone(),
            )),
            tokio::spawn(reflect(
                Watched::ServiceCidrs,
                service_cidrs,
                cidr_writer,
                c_cidr,
                shared,
            )),
        ];
        source
    }

    /// Resolves when a store changed (or a watcher became ready) since the
    /// last feed or snapshot; at once if one did. Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            let notified = self.shared.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a bump in between still wakes us.
            notified.as_mut().enable();
            if self.shared.generation.load(Ordering::Acquire) != self.seen.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// The stores as they are now. A change that lands while this runs
    /// makes the next [`changed`](Self::changed) resolve, so none is missed.
    pub fn snapshot(&self) -> KubeObjects {
        // Read the generation first: whatever is written after it bumps it
        // again.
        self.seen.store(
            self.shared.generation.load(Ordering::Acquire),
            Ordering::Release,
        );
        let ready = self
            .counters
            .iter()
            .all(|c| c.ready.load(Ordering::Acquire));
        KubeObjects {
            services: sorted(&self.services),
            slices: sorted(&self.slices)
                .iter()
                .map(SlimSlice::to_slice)
                .collect(),
            node: self
                .nodes
                .state()
                .into_iter()
                .find(|n| n.metadata.name.as_deref() == Some(&self.node_name))
                .map(|n| (*n).clone()),
            service_cidrs: sorted(&self.service_cidrs),
            ready,
        }
    }

    /// The ServiceCIDR objects, sorted by name (none while the server does
    /// not serve them).
    pub fn service_cidrs(&self) -> Vec<ServiceCIDR> {
        sorted(&self.service_cidrs)
    }

    /// Hands the stores to the model: only objects whose resourceVersion
    /// changed are copied, nothing is cloned wholesale (unlike
    /// [`snapshot`](Self::snapshot)). Returns whether every watcher has
    /// completed its initial list (the caller must not program anything
    /// before that, or a restart would wipe what is pinned), and the
    /// trigger times of the slice changes handed over.
    pub fn feed(&self, cache: &mut ModelCache) -> (bool, Vec<SystemTime>) {
        self.seen.store(
            self.shared.generation.load(Ordering::Acquire),
            Ordering::Release,
        );
        let PendingChanges { services, slices } =
            std::mem::take(&mut *self.shared.pending.lock().unwrap());
        // After a (re)list, everything; otherwise the objects the watch
        // events named, as the stores have them now (gone: deleted).
        if services.all {
            // The cache shares the store's (slimmed) objects, not copies.
            cache.replace_services(self.services.state());
        } else {
            for id in &services.objects {
                match self.services.get(&object_ref(id)) {
                    Some(svc) => cache.upsert_service(svc),
                    None => cache.delete_service(id),
                }
            }
        }
        if slices.all {
            cache.replace_slices(self.slices.state().iter().map(|s| s.as_ref()));
        } else {
            for id in &slices.objects {
                match self.slices.get(&object_ref(id)) {
                    Some(slice) => cache.upsert_slice(slice.as_ref()),
                    None => cache.delete_slice(id),
                }
            }
        }
        if let Some(node) = self.this_node() {
            cache.set_node(NodeInfo::from_node(&node));
        }
        (self.ready(), slices.trigger_times)
    }

    /// Whether load balancers may keep sending to this node (kube-proxy's
    /// node eligibility, see [`health::node_eligible`]): eligible until
    /// this node's Node is seen (kube-proxy before 1.31 does the same);
    /// not once it is being deleted, marked for deletion, or gone.
    pub fn node_eligible(&self) -> bool {
        match self.this_node() {
            Some(node) => {
                self.node_seen.store(true, Ordering::Relaxed);
                health::node_eligible(&node)
            }
            None => !self.node_seen.load(Ordering::Relaxed),
        }
    }

    fn this_node(&self) -> Option<Arc<Node>> {
        self.nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(&self.node_name))
    }

    /// Every watcher has completed its initial list.
    pub fn ready(&self) -> bool {
        self.counters
            .iter()
            .all(|c| c.ready.load(Ordering::Acquire))
    }

    /// Counters per resource, named as in [`RESOURCES`].
    pub fn counters(&self) -> BTreeMap<&'static str, WatchCounters> {
        self.watch_stats().get()
    }

    /// A handle on the counters, for the metrics to read at scrape time.
    pub fn watch_stats(&self) -> WatchStats {
        WatchStats(self.counters.clone())
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A watcher's output, as [`watcher`] gives it.
trait WatchStream<K>: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static {}
impl<K, S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static> WatchStream<K>
    for S
{
}

/// Applies a watcher's events to its store, counting them and waking the
/// sync loop when the store changed. Runs as long as the stream does
/// (forever: errors are followed by a backoff, never by the end).
async fn reflect<K>(
    watched: Watched,
    stream: impl WatchStream<K>,
    mut writer: Writer<K>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
) where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = 0usize;
    let mut errors = LogLimiter::reminding(REMIND_EVERY);
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                watch_failed(watched, &e, &counters, &shared, &mut errors);
                continue;
            }
        };
        if let Some(times) = errors.succeeded() {
            info!(
                resource = watched.name(),
                failed = times,
                "watch works again"
            );
        }
        // A re-list buffers in the writer and swaps at InitDone, so the store
        // never shows a half-listed state.
        writer.apply_watcher_event(&event);
        record_event(watched, event, &mut listed, &counters, &shared);
    }
}

/// A failed list or watch: the watcher retries with backoff and the last
/// state stays. An optional resource the server does not serve (or does not
/// let us read) counts as ready, so the daemon goes on without it.
fn watch_failed(
    watched: Watched,
    e: &watcher::Error,
    counters: &Counters,
    shared: &Shared,
    errors: &mut LogLimiter,
) {
    let resource = watched.name();
    counters.errors.fetch_add(1, Ordering::Relaxed);
    if watched.optional() && unavailable(e) {
        if !counters.ready.swap(true, Ordering::AcqRel) {
            warn!(
                resource,
                error = %e,
                "not served or not allowed; going on without, retrying with backoff"
            );
            shared.bump();
        }
        return;
    }
    let e = e.to_string();
    if let Some(times) = errors.failed(&e) {
        warn!(
            resource,
            error = %e,
            times,
            "watch failed; keeping the last state, retrying with backoff"
        );
    }
}

/// Tells the sync loop what one watcher event changed, and counts it.
fn record_event<K>(
    watched: Watched,
    event: watcher::Event<K>,
    listed: &mut usize,
    counters: &Counters,
    shared: &Shared,
) where
    K: Resource,
{
    match event {
        watcher::Event::Init => {
            counters.lists.fetch_add(1, Ordering::Relaxed);
            *listed = 0;
        }
        watcher::Event::InitApply(_) => *listed += 1,
        watcher::Event::InitDone => {
            shared.record(watched, |changed| changed.all = true);
            let first = !counters.ready.swap(true, Ordering::AcqRel);
            info!(
                resource = watched.name(),
                objects = *listed,
                relist = !first,
                "listed; watching"
            );
            shared.bump();
        }
        watcher::Event::Apply(obj) => {
            let trigger = (watched == Watched::EndpointSlices)
                .then(|| trigger_time(&obj))
                .flatten()
                .filter(|t| *t > shared.started);
            shared.record(watched, |changed| {
                changed.objects.insert(NamespacedName::of(obj.meta()));
                changed.trigger_times.extend(trigger);
            });
            counters.events.fetch_add(1, Ordering::Relaxed);
            shared.bump();
        }
        watcher::Event::Delete(obj) => {
            shared.record(watched, |changed| {
                changed.objects.insert(NamespacedName::of(obj.meta()));
            });
            counters.events.fetch_add(1, Ordering::Relaxed);
            shared.bump();
        }
    }
}

fn object_ref<K>(id: &NamespacedName) -> ObjectRef<K>
where
    K: Resource,
    K::DynamicType: Default,
{
    ObjectRef::new(&id.name).within(&id.namespace)
}

fn sorted<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut all = store.state();
    all.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    all.into_iter().map(|o| (*o).clone()).collect()
}

/// Drops what the proxy never reads and can be large, to keep the stores
/// small (see [`slim`]); the model shares these objects.
fn slim_service(svc: &mut Service) {
    slim::service(svc);
}

/// A slice watcher's event with the slice in the form the store keeps.
fn slim_slice_event(event: watcher::Event<EndpointSlice>) -> watcher::Event<SlimSlice> {
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(s) => watcher::Event::InitApply(s.into()),
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::Apply(s) => watcher::Event::Apply(s.into()),
        watcher::Event::Delete(s) => watcher::Event::Delete(s.into()),
    }
}

/// The store's slices are EndpointSlices to the reflector.
impl Resource for SlimSlice {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Node's status lists every image on the node (often hundreds of
/// entries); only labels and addresses matter here.
fn slim_node(node: &mut Node) {
    node.managed_fields_mut().clear();
    if let Some(status) = node.status.as_mut() {
        status.images = None;
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, time::Duration};

    use tokio::sync::mpsc;

    use super::*;

    fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(str::to_string),
            name: Some(name.to_string()),
            resource_version: Some("1".to_string()),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str) -> Service {
        Service {
            metadata: meta(Some(ns), name),
            ..Default::default()
        }
    }

    fn slice(ns: &str, name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(Some(ns), name),
            address_type: "IPv4".to_string(),
            ..Default::default()
        }
    }

    fn node(name: &str) -> Node {
        Node {
            metadata: meta(None, name),
            ..Default::default()
        }
    }

    type Tx<K> = mpsc::UnboundedSender<watcher::Result<watcher::Event<K>>>;

    fn channel<K: Send + 'static>() -> (Tx<K>, impl WatchStream<K>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, stream)
    }

    struct Fixture {
        source: KubeSource,
        svc: Tx<Service>,
        slices: Tx<EndpointSlice>,
        nodes: Tx<Node>,
        cidrs: Tx<ServiceCIDR>,
    }

    fn fixture() -> Fixture {
        let (svc, s1) = channel();
        let (slices, s2) = channel();
        let (nodes, s3) = channel();
        let (cidrs, s4) = channel();
        Fixture {
            source: KubeSource::from_streams("node-a", s1, s2, s3, s4),
            svc,
            slices,
            nodes,
            cidrs,
        }
    }

    fn list<K>(tx: &Tx<K>, objects: Vec<K>) {
        tx.send(Ok(watcher::Event::Init)).unwrap();
        for o in objects {
            tx.send(Ok(watcher::Event::InitApply(o))).unwrap();
        }
        tx.send(Ok(watcher::Event::InitDone)).unwrap();
    }

    async fn changed(source: &mut KubeSource) {
        tokio::time::timeout(Duration::from_secs(5), source.changed())
            .await
            .expect("a change");
    }

    async fn quiet(source: &mut KubeSource) -> bool {
        tokio::time::timeout(Duration::from_millis(50), source.changed())
            .await
            .is_err()
    }

    fn names<K: Resource>(objects: &[K]) -> Vec<String> {
        objects
            .iter()
            .map(|o| o.meta().name.clone().unwrap())
            .collect()
    }

    // The daemon's runtime is current-thread; so is #[tokio::test]'s.
    #[tokio::test]
    async fn ready_only_after_every_initial_list() {
        let mut f = fixture();
        assert!(quiet(&mut f.source).await);
        assert!(!f.source.snapshot().ready);
        list(&f.svc, vec![svc("default", "web")]);
        list(&f.slices, vec![]);
        changed(&mut f.source).await;
        let snap = f.source.snapshot();
        assert!(!snap.ready, "the node list has not completed");
        assert!(!f.source.ready());
        list(&f.nodes, vec![node("node-a")]);
        list(&f.cidrs, vec![]);
        changed(&mut f.source).await;
        // The node's InitDone may land after the wake-up of the slices'.
        while !f.source.snapshot().ready {
            changed(&mut f.source).await;
        }
        let snap = f.source.snapshot();
        assert_eq!(names(&snap.services), ["web"]);
        assert_eq!(snap.node.unwrap().metadata.name.unwrap(), "node-a");
        assert!(
            f.source
                .counters()
                .values()
                .all(|c| c.ready && c.lists == 1)
        );
    }

    #[tokio::test]
    async fn node_eligibility_follows_this_nodes_node() {
        let mut f = fixture();
        assert!(f.source.node_eligible(), "eligible before the Node is seen");
        let mut marked = node("node-a");
        marked.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: health::TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        list(&f.nodes, vec![marked, node("node-b")]);
        while f.source.this_node().is_none() {
            changed(&mut f.source).await;
            f.source.snapshot();
        }
        assert!(!f.source.node_eligible(), "marked by the autoscaler");
        f.source.snapshot();
        f.nodes
            .send(Ok(watcher::Event::Apply(node("node-a"))))
            .unwrap();
        changed(&mut f.source).await;
        assert!(f.source.node_eligible(), "taint removed");
        let mut deleting = node("node-a");
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        f.source.snapshot();
        f.nodes.send(Ok(watcher::Event::Apply(deleting))).unwrap();
        changed(&mut f.source).await;
        assert!(!f.source.node_eligible(), "being deleted");
        f.source.snapshot();
        f.nodes
            .send(Ok(watcher::Event::Delete(node("node-a"))))
            .unwrap();
        changed(&mut f.source).await;
        assert!(!f.source.node_eligible(), "gone after being seen");
    }

    #[tokio::test]
    async fn service_cidrs_are_optional() {
        let mut f = fixture();
        list(&f.svc, vec![]);
        list(&f.slices, vec![]);
        list(&f.nodes, vec![]);
        // An older server: no such resource. Ready anyway, with none.
        let not_found = kube::core::Status::failure(
            "the server could not find the requested resource",
            "NotFound",
        )
        .with_code(404);
        f.cidrs
            .send(Err(watcher::Error::InitialListFailed(kube::Error::Api(
                Box::new(not_found),
            ))))
            .unwrap();
        while !f.source.snapshot().ready {
            changed(&mut f.source).await;
        }
        assert!(f.source.service_cidrs().is_empty());
        // Served later (an upgrade): its objects arrive.
        let cidr: ServiceCIDR = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "resourceVersion": "1"},
            "spec": {"cidrs": ["10.96.0.0/12"]}
        }))
        .unwrap();
        list(&f.cidrs, vec![cidr]);
        changed(&mut f.source).await;
        while f.source.service_cidrs().is_empty() {
            changed(&mut f.source).await;
            f.source.snapshot();
        }
        assert_eq!(f.source.counters()["servicecidrs"].errors, 1);
    }

    #[tokio::test]
    async fn changed_fires_once_per_batch_of_changes() {
        let mut f = fixture();
        list(&f.svc, vec![]);
        list(&f.slices, vec![]);
        list(&f.nodes, vec![]);
        list(&f.cidrs, vec![]);
        while !f.source.snapshot().ready {
            changed(&mut f.source).await;
        }
        assert!(
            quiet(&mut f.source).await,
            "nothing changed since the snapshot"
        );

        f.svc
            .send(Ok(watcher::Event::Apply(svc("b", "two"))))
            .unwrap();
        f.svc
            .send(Ok(watcher::Event::Apply(svc("a", "one"))))
            .unwrap();
        f.slices
            .send(Ok(watcher::Event::Apply(slice("a", "one-x"))))
            .unwrap();
        changed(&mut f.source).await;
        // changed() resolves until a snapshot is taken.
        changed(&mut f.source).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let snap = f.source.snapshot();
        assert_eq!(names(&snap.services), ["one", "two"], "sorted by namespace");
        assert_eq!(names(&snap.slices), ["one-x"]);
        assert!(snap.node.is_none(), "node-a does not exist");
        assert!(quiet(&mut f.source).await);

        f.svc
            .send(Ok(watcher::Event::Delete(svc("b", "two"))))
            .unwrap();
        changed(&mut f.source).await;
        assert_eq!(names(&f.source.snapshot().services), ["one"]);
        assert_eq!(f.source.counters()["services"].events, 3);
    }

    #[tokio::test]
    async fn the_watch_counters_are_exported() {
        let mut f = fixture();
        let mut metrics = crate::metrics::Metrics::new(std::path::Path::new("/nonexistent"));
        metrics.register_watch(f.source.watch_stats());
        list(&f.svc, vec![svc("a", "one")]);
        f.svc.send(Err(watcher::Error::NoResourceVersion)).unwrap();
        list(&f.svc, vec![svc("a", "one")]);
        f.svc
            .send(Ok(watcher::Event::Apply(svc("a", "two"))))
            .unwrap();
        list(&f.slices, vec![]);
        while f.source.counters()["services"].events == 0 {
            changed(&mut f.source).await;
            f.source.snapshot();
        }
        let text = metrics.encode().unwrap();
        for line in [
            "# TYPE kube_ebpf_proxy_watch_lists_total counter",
            "kube_ebpf_proxy_watch_lists_total{resource=\"services\"} 2",
            "kube_ebpf_proxy_watch_errors_total{resource=\"services\"} 1",
            "kube_ebpf_proxy_watch_events_total{resource=\"services\"} 1",
            "kube_ebpf_proxy_watch_synced{resource=\"services\"} 1.0",
            "kube_ebpf_proxy_watch_synced{resource=\"endpointslices\"} 1.0",
            "kube_ebpf_proxy_watch_synced{resource=\"node\"} 0.0",
            "kube_ebpf_proxy_watch_lists_total{resource=\"node\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    fn triggered(ns: &str, name: &str, at: &str) -> EndpointSlice {
        let mut s = slice(ns, name);
        s.annotations_mut()
            .insert(TRIGGER_TIME_ANNOTATION.into(), at.into());
        s
    }

    fn rfc3339(t: SystemTime) -> String {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        let ts = k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32);
        ts.unwrap().to_string()
    }

    #[test]
    fn the_trigger_time_annotation_parses_as_the_controller_writes_it() {
        let at = |v: &str| trigger_time(&triggered("a", "s", v));
        let t = at("2024-05-01T10:00:00Z").unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(secs.as_secs(), 1_714_557_600);
        let t = at("2024-05-01T10:00:00.25+02:00").unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(secs.as_millis(), 1_714_550_400_250);
        assert_eq!(at("yesterday"), None);
        assert_eq!(trigger_time(&slice("a", "s")), None);
    }

    #[tokio::test]
    async fn feed_hands_over_the_trigger_times_of_changed_slices() {
        let mut f = fixture();
        let before_start = rfc3339(SystemTime::now() - Duration::from_secs(3600));
        // The initial list is not programming latency, whatever it says.
        list(&f.svc, vec![]);
        list(
            &f.slices,
            vec![triggered("a", "listed", &rfc3339(SystemTime::now()))],
        );
        list(&f.nodes, vec![]);
        list(&f.cidrs, vec![]);
        let mut cache = ModelCache::new(NodeInfo::default(), Default::default());
        while !f.source.ready() {
            changed(&mut f.source).await;
        }
        f.source.feed(&mut cache);
        let now = SystemTime::now() + Duration::from_millis(1);
        let events = [
            triggered("a", "changed", &rfc3339(now)),
            // From before this source started: another proxy's to measure.
            triggered("a", "old", &before_start),
            slice("a", "unannotated"),
        ];
        for s in events {
            f.slices.send(Ok(watcher::Event::Apply(s))).unwrap();
        }
        f.slices
            .send(Ok(watcher::Event::Delete(triggered(
                "a",
                "gone",
                &rfc3339(now),
            ))))
            .unwrap();
        changed(&mut f.source).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (ready, triggers) = f.source.feed(&mut cache);
        assert!(ready);
        let expected = trigger_time(&triggered("a", "x", &rfc3339(now))).unwrap();
        assert_eq!(triggers, [expected]);
        // Handed over once.
        assert_eq!(f.source.feed(&mut cache).1, []);
    }

    #[tokio::test]
    async fn a_relist_replaces_the_store_at_once_and_errors_keep_it() {
        let mut f = fixture();
        list(&f.svc, vec![svc("a", "old"), svc("a", "kept")]);
        list(&f.slices, vec![]);
        list(&f.nodes, vec![node("node-a"), node("node-b")]);
        list(&f.cidrs, vec![]);
        while !f.source.snapshot().ready {
            changed(&mut f.source).await;
        }
        assert_eq!(
            f.source.snapshot().node.unwrap().metadata.name.unwrap(),
            "node-a",
            "only this node counts"
        );

        // The server goes away: errors, and the state stays.
        let gone =
            kube::core::Status::failure("too old resource version", "Expired").with_code(410);
        f.svc
            .send(Err(watcher::Error::WatchError(Box::new(gone))))
            .unwrap();
        // A re-list in progress is invisible until it completes.
        f.svc.send(Ok(watcher::Event::Init)).unwrap();
        f.svc
            .send(Ok(watcher::Event::InitApply(svc("a", "kept"))))
            .unwrap();
        f.svc
            .send(Ok(watcher::Event::InitApply(svc("a", "new"))))
            .unwrap();
        assert!(quiet(&mut f.source).await);
        assert_eq!(names(&f.source.snapshot().services), ["kept", "old"]);
        let c = f.source.counters()["services"];
        assert_eq!((c.lists, c.errors), (2, 1));

        f.svc.send(Ok(watcher::Event::InitDone)).unwrap();
        changed(&mut f.source).await;
        let snap = f.source.snapshot();
        assert_eq!(names(&snap.services), ["kept", "new"]);
        assert!(snap.ready, "still ready during and after a re-list");
    }

    #[test]
    fn selectors_follow_kube_proxy() {
        let plain = Selectors::new(None);
        assert_eq!(
            plain.services.as_deref(),
            Some("!service.kubernetes.io/service-proxy-name")
        );
        assert_eq!(
            plain.slices,
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
        );
        let named = Selectors::new(Some("ebpf"));
        assert_eq!(named.services, None);
        assert_eq!(named.slices, "!service.kubernetes.io/headless");
    }

    #[test]
    fn slimming_keeps_what_the_model_reads() {
        let mut s = svc("a", "web");
        s.metadata.annotations = Some(
            [
                ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
                ("service.kubernetes.io/topology-mode", "Auto"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        slim_service(&mut s);
        assert_eq!(
            s.annotations().keys().collect::<Vec<_>>(),
            ["service.kubernetes.io/topology-mode"]
        );
    }

    fn opts(kubeconfig: Option<PathBuf>, master: Option<&str>) -> KubeOptions {
        KubeOptions {
            kubeconfig,
            master: master.map(str::to_string),
            node_name: "node-a".to_string(),
        }
    }

    #[tokio::test]
    async fn master_alone_is_the_server() {
        let c = config(&opts(None, Some("http://127.0.0.1:8080")))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:8080/");
        assert_eq!(c.read_timeout, Some(READ_TIMEOUT));
        let c = config(&opts(None, Some("10.0.0.1:6443"))).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://10.0.0.1:6443/");
        for bad in ["ftp://x", "http://", "not a url"] {
            assert!(config(&opts(None, Some(bad))).await.is_err(), "{bad}");
        }
        // A client for a plain-http server can be built.
        client(&opts(None, Some("http://127.0.0.1:8080")))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn kubeconfig_and_master_override() {
        let path = std::env::temp_dir().join(format!("kep-kubeconfig-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        write!(
            f,
            "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: http://127.0.0.1:6443
users:
- name: proxy
  user:
    token: secret
contexts:
- name: lab
  context:
    cluster: lab
    user: proxy
current-context: lab
"
        )
        .unwrap();
        let c = config(&opts(Some(path.clone()), None)).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:6443/");
        let c = config(&opts(Some(path.clone()), Some("http://127.0.0.2:7000")))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.2:7000/");
        assert!(
            config(&opts(Some(path.with_extension("missing")), None))
                .await
                .is_err()
        );
        std::fs::remove_file(&path).unwrap();
    }
}
