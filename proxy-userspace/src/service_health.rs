//! The Services' health checks, as kube-proxy's service health server: for
//! every LoadBalancer Service with `externalTrafficPolicy: Local` (the
//! model's [`HealthCheck`]s), this node answers HTTP on its
//! `healthCheckNodePort`, so the load balancer sends external traffic only
//! to nodes with a local endpoint (which the datapath requires: it drops
//! such traffic on a node without one).
//!
//! * Any method and path get the answer: 200 when the node has a ready
//!   local endpoint and the proxy is healthy, 503 otherwise, with
//!   kube-proxy's JSON body and headers (`X-Content-Type-Options: nosniff`,
//!   `X-Load-Balancing-Endpoint-Weight`: the count). Node eligibility
//!   (/healthz's) does not count, as in kube-proxy.
//! * Where: `0.0.0.0` (dual stack, as Go's listener) when
//!   `--nodeport-addresses` is unset; otherwise each selected node address,
//!   following them as they come and go.
//! * Ports open and close as Services come and go; counts change in place
//!   at every sync, without reopening anything.
//! * A port that cannot be bound (another process has it) is logged,
//!   counted and retried with a backoff (1 s doubling to 60 s); the other
//!   ports and the daemon carry on. Unlike kube-proxy, which closes a
//!   Service's other addresses when one fails, the addresses that could be
//!   bound keep serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::{JoinHandle, JoinSet},
};
use tracing::{info, warn};

use crate::{
    health::Health,
    http::{self, status_of},
    model::{HealthCheck, NamespacedName},
};

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// kube-proxy's answer for one Service: the status and the body, byte for
/// byte (its template, indented with tabs, without a final newline).
pub fn answer(
    service: &NamespacedName,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (StatusCode, String) {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&service.namespace),
        quote(&service.name),
    );
    (status_of(local_endpoints > 0 && proxy_healthy), body)
}

/// Where the health checks listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    /// Every address of the node (no `--nodeport-addresses`).
    Any,
    /// These addresses (the node's addresses within `--nodeport-addresses`).
    Addresses(BTreeSet<IpAddr>),
}

impl Bind {
    fn addresses(&self) -> BTreeSet<IpAddr> {
        match self {
            // One wildcard listener; [::] also takes IPv4 (see `listen`).
            Bind::Any => BTreeSet::from([IpAddr::V6(Ipv6Addr::UNSPECIFIED)]),
            Bind::Addresses(a) => a.clone(),
        }
    }
}

/// What one Service's handlers read.
struct Shared {
    service: NamespacedName,
    local_endpoints: AtomicUsize,
    health: Arc<Health>,
}

/// A listener's accept loop; its connections go with it.
struct Serving {
    task: JoinHandle<()>,
    bound: SocketAddr,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Listener {
    Serving(Serving),
    /// Bind failed; try again at `retry_at`, then wait `2 * delay`.
    Failed {
        retry_at: Instant,
        delay: Duration,
    },
}

struct Instance {
    port: u16,
    shared: Arc<Shared>,
    listeners: BTreeMap<IpAddr, Listener>,
}

/// What [`ServiceHealthServer::reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub opened: usize,
    pub closed: usize,
    /// Binds that failed in this round.
    pub bind_failures: usize,
}

/// The health-check listeners, brought to what the model wants by
/// [`ServiceHealthServer::update`] (every sync) and
/// [`ServiceHealthServer::reconcile`] (every tick: retries).
pub struct ServiceHealthServer {
    health: Arc<Health>,
    bind: Bind,
    wanted: BTreeMap<NamespacedName, HealthCheck>,
    instances: BTreeMap<NamespacedName, Instance>,
}

impl ServiceHealthServer {
    pub fn new(health: Arc<Health>) -> ServiceHealthServer {
        ServiceHealthServer {
            health,
            bind: Bind::Any,
            wanted: BTreeMap::new(),
            instances: BTreeMap::new(),
        }
    }

    /// The health checks the model wants now, and where to listen; opens,
    /// closes and updates counts at once. Must run on a tokio runtime.
    pub fn update(
        &mut self,
        wanted: BTreeMap<NamespacedName, HealthCheck>,
        bind: Bind,
        now: Instant,
    ) -> Reconciled {
        self.wanted = wanted;
        self.bind = bind;
        self.reconcile(now)
    }

    /// Closes what is no longer wanted, opens what is missing (failed binds
    /// once their backoff has passed) and sets the counts.
    pub fn reconcile(&mut self, now: Instant) -> Reconciled {
        let mut done = Reconciled::default();
        self.instances.retain(|id, inst| {
            let keep = self
                .wanted
                .get(id)
                .is_some_and(|hc| hc.node_port == inst.port);
            if !keep {
                info!(service = %id, port = inst.port, "closing health check");
                done.closed += inst.listeners.len();
            }
            keep
        });
        let addresses = self.bind.addresses();
        for (id, hc) in &self.wanted {
            let inst = self
                .instances
                .entry(id.clone())
                .or_insert_with(|| Instance {
                    port: hc.node_port,
                    shared: Arc::new(Shared {
                        service: id.clone(),
                        local_endpoints: AtomicUsize::new(hc.local_endpoints),
                        health: self.health.clone(),
                    }),
                    listeners: BTreeMap::new(),
                });
            inst.shared
                .local_endpoints
                .store(hc.local_endpoints, Ordering::Relaxed);
            let before = inst.listeners.len();
            inst.listeners.retain(|ip, _| addresses.contains(ip));
            done.closed += before - inst.listeners.len();
            for ip in &addresses {
                inst.open(*ip, now, &mut done);
            }
        }
        done
    }

    /// The bound addresses of each Service's health check (for tests and
    /// logs).
    pub fn serving(&self) -> BTreeMap<NamespacedName, Vec<SocketAddr>> {
        self.instances
            .iter()
            .map(|(id, inst)| {
                let bound = inst.listeners.values().filter_map(|l| match l {
                    Listener::Serving(s) => Some(s.bound),
                    Listener::Failed { .. } => None,
                });
                (id.clone(), bound.collect())
            })
            .collect()
    }

    /// Listeners wanted but not bound (waiting for a retry).
    pub fn failing(&self) -> usize {
        self.listener_counts().1
    }

    /// Listeners serving, and waiting for a retry.
    pub fn listener_counts(&self) -> (usize, usize) {
        let all = self.instances.values().flat_map(|i| i.listeners.values());
        all.fold((0, 0), |(ok, failed), l| match l {
            Listener::Serving(_) => (ok + 1, failed),
            Listener::Failed { .. } => (ok, failed + 1),
        })
    }
}

impl Instance {
    /// Binds `ip` unless it is served or waiting for its retry.
    fn open(&mut self, ip: IpAddr, now: Instant, done: &mut Reconciled) {
        let previous = match self.listeners.get(&ip) {
            Some(Listener::Serving(_)) => return,
            Some(Listener::Failed { retry_at, .. }) if now < *retry_at => return,
            Some(Listener::Failed { delay, .. }) => Some(*delay),
            None => None,
        };
        let service = &self.shared.service;
        let listener = match listen(SocketAddr::new(ip, self.port)) {
            Ok(listener) => {
                let bound = listener
                    .local_addr()
                    .unwrap_or(SocketAddr::new(ip, self.port));
                info!(service = %service, address = %bound, "serving health check");
                done.opened += 1;
                Listener::Serving(Serving {
                    task: tokio::spawn(accept_loop(listener, self.shared.clone())),
                    bound,
                })
            }
            Err(e) => {
                let delay = previous.map_or(FIRST_RETRY, |d| (d * 2).min(MAX_RETRY));
                warn!(
                    service = %service, address = %SocketAddr::new(ip, self.port), error = %e,
                    retry_in_s = delay.as_secs(), "health check port cannot be bound"
                );
                done.bind_failures += 1;
                Listener::Failed {
                    retry_at: now + delay,
                    delay,
                }
            }
        };
        self.listeners.insert(ip, listener);
    }
}

/// A listening socket on `at`, with SO_REUSEADDR (as Go's listeners, so a
/// restarted daemon rebinds while old connections linger). `[::]` is dual
/// stack where the kernel allows it, and falls back to `0.0.0.0` where IPv6
/// is off.
fn listen(at: SocketAddr) -> std::io::Result<TcpListener> {
    let bind = |at: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = match at {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(at)?;
        socket.listen(128)
    };
    match bind(at) {
        Err(e)
            if at.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                at.port(),
            ))
        }
        other => other,
    }
}

/// Serves every connection of `listener` (HTTP/1.1, keep-alive) until
/// aborted; aborting drops the connections too.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors and the like: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let resp = respond(&shared);
                async move { Ok::<_, Infallible>(resp) }
            });
            // Bounded like every listener of ours: idle connections from
            // anyone who reaches the port cannot pile up.
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(http::CONNECTION_LIFETIME, connection).await;
        });
    }
}

fn respond(shared: &Shared) -> Response<Full<Bytes>> {
    let count = shared.local_endpoints.load(Ordering::Relaxed);
    let healthy = shared.health.verdict(Instant::now()).healthy;
    let (status, body) = answer(&shared.service, count, healthy);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-load-balancing-endpoint-weight", HeaderValue::from(count));
    resp
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use std::io::{Read, Write};

    use super::*;

    fn id(name: &str) -> NamespacedName {
        NamespacedName::new("shop", name)
    }

    #[test]
    fn the_answer_is_kube_proxys() {
        let (status, body) = answer(&id("web"), 2, true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["service"]["name"], "web");
        assert_eq!(
            answer(&id("web"), 0, true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // A stalled proxy fails every check, endpoints or not.
        let (status, body) = answer(&id("web"), 3, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"serviceProxyHealthy\": false"));
    }

    /// A raw HTTP/1.0 GET: (status, headers and body). Blocking, on the
    /// blocking pool, while the runtime serves.
    async fn get(at: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            let status = raw
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok((status, raw))
        })
        .await
        .expect("request task")
    }

    fn healthy() -> Arc<Health> {
        let h = Arc::new(Health::new(Duration::from_secs(60), Instant::now()));
        h.synced(Instant::now(), SystemTime::now());
        h
    }

    fn loopback() -> Bind {
        Bind::Addresses(BTreeSet::from([IpAddr::V4(Ipv4Addr::LOCALHOST)]))
    }

    /// A free port on 127.0.0.1 (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn ports_open_answer_follow_counts_and_close() {
        let mut server = ServiceHealthServer::new(healthy());
        let port = free_port();
        let at = SocketAddr::from(([127, 0, 0, 1], port));
        let hc = |n| HealthCheck {
            node_port: port,
            local_endpoints: n,
        };
        let t0 = Instant::now();
        let r = server.update(BTreeMap::from([(id("web"), hc(1))]), loopback(), t0);
        assert_eq!((r.opened, r.bind_failures), (1, 0));
        let (status, raw) = get(at, "/any/path").await.unwrap();
        assert_eq!(status, 200, "{raw}");
        let lower = raw.to_ascii_lowercase();
        assert!(lower.contains("x-content-type-options: nosniff"), "{raw}");
        assert!(
            lower.contains("x-load-balancing-endpoint-weight: 1"),
            "{raw}"
        );
        assert!(lower.contains("content-type: application/json"), "{raw}");
        assert!(
            raw.ends_with("\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"),
            "{raw}"
        );

        // The count changes in place: same listener, now 503.
        let r = server.update(BTreeMap::from([(id("web"), hc(0))]), loopback(), t0);
        assert_eq!(r, Reconciled::default());
        assert_eq!(get(at, "/").await.unwrap().0, 503);

        // The Service goes: the port closes.
        let r = server.update(BTreeMap::new(), loopback(), t0);
        assert_eq!(r.closed, 1);
        tokio::task::yield_now().await;
        assert!(server.serving().is_empty());
        let refused = get(at, "/").await;
        assert!(refused.is_err(), "port still open: {refused:?}");
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_with_backoff_and_others_carry_on() {
        let mut server = ServiceHealthServer::new(healthy());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let other = free_port();
        let wanted = BTreeMap::from([
            (
                id("a"),
                HealthCheck {
                    node_port: port,
                    local_endpoints: 1,
                },
            ),
            (
                id("b"),
                HealthCheck {
                    node_port: other,
                    local_endpoints: 1,
                },
            ),
        ]);
        let t0 = Instant::now();
        let r = server.update(wanted, loopback(), t0);
        assert_eq!((r.opened, r.bind_failures), (1, 1));
        assert_eq!(server.failing(), 1);
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], other)), "/")
                .await
                .unwrap()
                .0,
            200
        );

        // Not before the backoff; then once the port is free.
        assert_eq!(
            server.reconcile(t0 + Duration::from_millis(500)),
            Reconciled::default()
        );
        let r = server.reconcile(t0 + Duration::from_secs(1));
        assert_eq!(r.bind_failures, 1, "still taken");
        drop(taken);
        assert_eq!(
            server.reconcile(t0 + Duration::from_secs(2)).opened,
            0,
            "backoff doubled"
        );
        let r = server.reconcile(t0 + Duration::from_secs(3));
        assert_eq!((r.opened, r.bind_failures), (1, 0));
        assert_eq!(server.failing(), 0);
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], port)), "/")
                .await
                .unwrap()
                .0,
            200
        );
    }

    #[tokio::test]
    async fn addresses_follow_the_node() {
        let mut server = ServiceHealthServer::new(healthy());
        let port = free_port();
        let wanted = BTreeMap::from([(
            id("web"),
            HealthCheck {
                node_port: port,
                local_endpoints: 1,
            },
        )]);
        let t0 = Instant::now();
        server.update(wanted.clone(), loopback(), t0);
        let two = Bind::Addresses(BTreeSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ]));
        assert_eq!(server.update(wanted.clone(), two, t0).opened, 1);
        assert_eq!(server.serving()[&id("web")].len(), 2);
        let r = server.update(wanted, Bind::Addresses(BTreeSet::new()), t0);
        assert_eq!(r.closed, 2);
        assert!(server.serving()[&id("web")].is_empty());
    }
}
