//! A stand-in Kubernetes API server for Services, EndpointSlices, Nodes and
//! ServiceCIDRs,
//! speaking the real list/watch protocol over plain HTTP/1.1, so the real
//! kube client (and the daemon) can be tested against it, faults included.
//!
//! * `GET /api/v1/services`, `/api/v1/namespaces/{ns}/services`,
//!   `/apis/discovery.k8s.io/v1/endpointslices` (and namespaced),
//!   `/api/v1/nodes`, `/apis/networking.k8s.io/v1/servicecidrs`, one object
//!   by name under each, and `/version`.
//! * Lists are `ServiceList` (etc.) objects with `metadata.resourceVersion`,
//!   paginated with `limit` and `continue`; `labelSelector` and
//!   `fieldSelector` (see [`selector`]) are honoured.
//! * `watch=true` answers a chunked stream of JSON event lines: ADDED,
//!   MODIFIED, DELETED (an object leaving a selector is DELETED, one entering
//!   it ADDED), BOOKMARK when `allowWatchBookmarks=true`, and an ERROR event
//!   carrying a `Status` with code 410 when `resourceVersion` is older than
//!   the history kept. `timeoutSeconds` ends the stream (with a bookmark),
//!   `sendInitialEvents=true` gives the streaming-list form.
//! * One resourceVersion counter across kinds, as etcd's revision: a watcher
//!   of one kind falls behind while another kind changes, which is what
//!   bookmarks are for and why [`ApiServer::compact`] produces 410s.
//!
//! Faults, for tests: [`ApiServer::drop_watches`], [`ApiServer::compact`],
//! [`ApiServer::set_down`], [`ApiServer::set_delay`]. The server runs on its
//! own tokio runtime, so its methods are plain calls usable from sync and
//! async tests alike.

mod http;
mod selector;
mod store;

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::Netns;
use store::Store;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ServiceCidr,
    ];

    fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::ServiceCidr)
    }

    /// The kind at `prefix` (`api/v1` or `apis/GROUP/VERSION`) and `plural`.
    fn at(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.plural() == plural)
    }
}

/// The typed objects the server takes.
pub trait Served: Serialize {
    const KIND: Kind;
}

impl Served for Service {
    const KIND: Kind = Kind::Service;
}

impl Served for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
}

impl Served for Node {
    const KIND: Kind = Kind::Node;
}

impl Served for ServiceCIDR {
    const KIND: Kind = Kind::ServiceCidr;
}

/// Requests of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounters {
    /// List requests (each page counts).
    pub lists: u64,
    /// Watch requests, answered or not.
    pub watches: u64,
    /// Watches answered with 410 Gone.
    pub gone: u64,
    /// Watches answered with headers and then nothing
    /// ([`ApiServer::set_hanging_watches`]).
    pub hung: u64,
}

/// What the server has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// HTTP requests, any path.
    pub requests: u64,
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections reset at once because the server was down.
    pub refused: u64,
    /// Requests answered with the error status of [`ApiServer::set_failing`].
    pub failed: u64,
    pub kinds: BTreeMap<Kind, KindCounters>,
}

impl Counters {
    pub fn lists(&self, kind: Kind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.lists)
    }

    pub fn watches(&self, kind: Kind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.watches)
    }

    pub fn gone(&self, kind: Kind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.gone)
    }

    pub fn hung(&self, kind: Kind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.hung)
    }

    /// List and watch requests of every kind, and refused connections: what
    /// a client retrying in a loop would drive up.
    pub fn attempts(&self) -> u64 {
        self.refused
            + self.failed
            + self
                .kinds
                .values()
                .map(|k| k.lists + k.watches)
                .sum::<u64>()
    }
}

/// State shared by the runtime's tasks and the control methods.
struct Inner {
    store: Mutex<Store>,
    counters: Mutex<Counters>,
    log: Mutex<VecDeque<String>>,
    delay: Mutex<Duration>,
    /// Every request is answered with this HTTP status.
    failing: Mutex<Option<u16>>,
    /// New watches get their headers and then nothing, for good.
    hanging_watches: Mutex<bool>,
    /// Down: connections are reset and open ones cut. Connection tasks wait
    /// on it.
    down: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The server; dropping it stops it.
pub struct ApiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    runtime: Option<Runtime>,
}

impl ApiServer {
    /// Listens on `addr` in the caller's network namespace (port 0: any).
    pub fn start(addr: SocketAddr) -> Result<ApiServer> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        ApiServer::serve(listener)
    }

    /// Listens on `addr` inside `ns` (the socket belongs to `ns` for good;
    /// the server's threads can run anywhere).
    pub fn start_in(ns: &Netns, addr: SocketAddrV4) -> Result<ApiServer> {
        let listener = ns
            .run(|| std::net::TcpListener::bind(addr))
            .with_context(|| format!("binding {addr} in netns {}", ns.name()))?;
        ApiServer::serve(listener)
    }

    fn serve(listener: std::net::TcpListener) -> Result<ApiServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apiserver")
            .enable_all()
            .build()?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let inner = Arc::new(Inner {
            store: Mutex::default(),
            counters: Mutex::default(),
            log: Mutex::default(),
            delay: Mutex::default(),
            failing: Mutex::default(),
            hanging_watches: Mutex::default(),
            down: watch::Sender::new(false),
        });
        runtime.spawn(http::accept(listener, inner.clone()));
        Ok(ApiServer {
            addr,
            inner,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `--master` or `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig naming this server (no credentials), for
    /// `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n\
             users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    \
             cluster: lab\n    user: lab\ncurrent-context: lab\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces an object (a Service without namespace goes to
    /// `default`); returns its new resourceVersion. Panics on an object
    /// without a name: a bug in the test.
    pub fn apply<T: Served>(&self, object: &T) -> u64 {
        let value = serde_json::to_value(object).expect("k8s-openapi objects serialize");
        self.apply_json(value)
            .unwrap_or_else(|e| panic!("applying a {}: {e:#}", T::KIND.name()))
    }

    /// Creates or replaces an object given as JSON (`kind`, `apiVersion`,
    /// `metadata.name` required).
    pub fn apply_json(&self, object: Value) -> Result<u64> {
        lock(&self.inner.store)
            .apply(object)
            .map_err(|e| anyhow::anyhow!(e.message))
    }

    /// Deletes an object (`ns` is ignored for Nodes); its deletion's
    /// resourceVersion, or None if it did not exist.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Option<u64> {
        lock(&self.inner.store).delete(kind, ns, name)
    }

    /// An object as stored.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        lock(&self.inner.store)
            .get(kind, ns, name)
            .map(|o| (*o).clone())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv()
    }

    /// Ends every open watch stream cleanly (as a watch timeout or an API
    /// server restart does); clients resume from their last resourceVersion.
    /// Returns how many there were.
    pub fn drop_watches(&self) -> usize {
        lock(&self.inner.store).drop_watches()
    }

    /// Open watch streams.
    pub fn watch_count(&self) -> usize {
        lock(&self.inner.store).watch_count()
    }

    /// Forgets the history of changes (and pending list pages): a watch
    /// resuming from any resourceVersion older than the current one gets 410
    /// Gone and must re-list. A client that saw the latest change of its
    /// kind still resumes fine; one that did not (another kind changed
    /// since, and no bookmark told it) gets 410.
    pub fn compact(&self) {
        lock(&self.inner.store).compact();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that
    /// allowed bookmarks.
    pub fn bookmark(&self) {
        lock(&self.inner.store).bookmark();
    }

    /// Down: every open connection is cut, watches end, and new connections
    /// are reset as soon as they are accepted (counted in
    /// [`Counters::refused`]). Up again: served as before, on the same
    /// address, with the same objects.
    pub fn set_down(&self, down: bool) {
        self.inner.down.send_replace(down);
        if down {
            self.drop_watches();
        }
    }

    /// Delays every response (list, get, the start of a watch) by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.inner.delay) = delay;
    }

    /// Answers every request with `status` (500, 429 with `Retry-After: 1`,
    /// ...) until called with None. Open watches are cut, as an API server
    /// in trouble does, so that the clients' next requests fail too.
    pub fn set_failing(&self, status: Option<u16>) {
        *lock(&self.inner.failing) = status;
        if status.is_some() {
            self.drop_watches();
        }
    }

    /// While on, a new watch is answered 200 with its headers and then
    /// never a byte, nor an end (a watch stuck behind a broken proxy).
    /// Watches that hung stay hung after it is turned off, until their
    /// client gives up on them.
    pub fn set_hanging_watches(&self, hang: bool) {
        *lock(&self.inner.hanging_watches) = hang;
    }

    pub fn counters(&self) -> Counters {
        lock(&self.inner.counters).clone()
    }

    /// The last requests, as `GET /path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner.log).iter().cloned().collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Tasks are dropped (and sockets closed) without blocking, so a
        // server may be dropped inside an async test.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
