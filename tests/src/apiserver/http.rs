//! The HTTP side of the stand-in: connections, routing, lists and watch
//! streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Filter, Message, Start};
use super::{Inner, Kind, KindCounters, lock};

/// A watch without `timeoutSeconds` lasts this long (the real server picks
/// 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Request lines kept for [`super::ApiServer::requests`].
const LOG_LIMIT: usize = 1000;

pub(super) async fn accept(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if *inner.down.borrow() {
            lock(&inner.counters).refused += 1;
            // An RST rather than a FIN: a crashed server, not a polite one.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        lock(&inner.counters).connections += 1;
        tokio::spawn(connection(stream, inner.clone()));
    }
}

async fn connection(stream: TcpStream, inner: Arc<Inner>) {
    let mut down = inner.down.subscribe();
    let service = {
        let inner = inner.clone();
        service_fn(move |req| handle(inner.clone(), req))
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Checked first: once down, not one more byte is written.
        biased;
        // Dropping the connection closes the socket mid-whatever.
        _ = down.wait_for(|d| *d) => {}
        _ = conn => {}
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.status())
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    {
        let mut log = lock(&inner.log);
        log.push_back(format!("{} {}", req.method(), req.uri()));
        if log.len() > LOG_LIMIT {
            log.pop_front();
        }
    }
    lock(&inner.counters).requests += 1;
    let delay = *lock(&inner.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = *lock(&inner.failing) {
        lock(&inner.counters).failed += 1;
        return Ok(failing_response(status));
    }
    if *lock(&inner.hanging_watches) && is_watch(&req) {
        if let Some(target) = parse_path(req.uri().path()) {
            count(&inner, target.kind, |c| c.hung += 1);
        }
        return Ok(hanging_response());
    }
    Ok(route(&inner, &req).unwrap_or_else(|e| error_response(&e)))
}

fn is_watch(req: &Request<Incoming>) -> bool {
    Query::parse(req.uri().query()).is_ok_and(|q| q.watch)
}

/// The answer of an API server in trouble: a Status object, and for 429 the
/// Retry-After a real server sends.
fn failing_response(status: u16) -> Response<Body> {
    let reason = match status {
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    let mut response = error_response(&ApiError::new(status, reason, "injected by the test"));
    if status == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// A watch that never sends an event and never ends.
fn hanging_response() -> Response<Body> {
    let body = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(body)))
        .expect("a valid response")
}

/// The query parameters this server reads.
#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    label_selector: String,
    field_selector: String,
    limit: Option<usize>,
    continue_token: Option<String>,
    timeout: Option<Duration>,
    bookmarks: bool,
    initial_events: bool,
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, ApiError> {
        let mut q = Query::default();
        let truthy = |v: &str| v == "true" || v == "1";
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid {k}: {v:?}")))
            };
            match &*k {
                "watch" => q.watch = truthy(&v),
                "resourceVersion" => q.resource_version = Some(v.into_owned()),
                "resourceVersionMatch" => q.resource_version_match = Some(v.into_owned()),
                "labelSelector" => q.label_selector = v.into_owned(),
                "fieldSelector" => q.field_selector = v.into_owned(),
                "limit" => q.limit = Some(number(&v)? as usize),
                "continue" => q.continue_token = Some(v.into_owned()).filter(|t| !t.is_empty()),
                "timeoutSeconds" => q.timeout = Some(Duration::from_secs(number(&v)?)),
                "allowWatchBookmarks" => q.bookmarks = truthy(&v),
                "sendInitialEvents" => q.initial_events = truthy(&v),
                _ => {}
            }
        }
        Ok(q)
    }

    fn filter(&self, namespace: Option<&str>) -> Result<Filter, ApiError> {
        Ok(Filter {
            namespace: namespace.map(str::to_string),
            labels: LabelSelector::parse(&self.label_selector).map_err(ApiError::bad_request)?,
            fields: FieldSelector::parse(&self.field_selector).map_err(ApiError::bad_request)?,
        })
    }

    /// The resourceVersion a watch starts after; None for "the current
    /// state first" (unset, empty or 0).
    fn watch_from(&self) -> Result<Option<u64>, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("" | "0") => Ok(None),
            Some(rv) => rv
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
        }
    }
}

/// What a path names.
struct Target<'a> {
    kind: Kind,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

fn parse_path(path: &str) -> Option<Target<'_>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::at(&api_version, plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    Some(Target {
        kind,
        namespace,
        name,
    })
}

fn route(inner: &Arc<Inner>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "this stand-in only serves GET",
        ));
    }
    let path = req.uri().path();
    if path == "/version" {
        return Ok(json_response(StatusCode::OK, &version()));
    }
    let not_found = || ApiError::new(404, "NotFound", format!("the server could not find {path}"));
    let target = parse_path(path).ok_or_else(not_found)?;
    let query = Query::parse(req.uri().query())?;
    let kind = target.kind;
    if let Some(name) = target.name {
        let ns = target.namespace.unwrap_or("");
        let object = lock(&inner.store).get(kind, ns, name).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("{} {name:?} not found", kind.plural()),
            )
        })?;
        return Ok(json_response(StatusCode::OK, &object));
    }
    let filter = query.filter(target.namespace)?;
    if query.watch {
        count(inner, kind, |c| c.watches += 1);
        return Ok(start_watch(inner, kind, &filter, &query));
    }
    count(inner, kind, |c| c.lists += 1);
    if query.resource_version_match.as_deref() == Some("Exact") {
        return Err(ApiError::bad_request(
            "resourceVersionMatch=Exact is not supported by this stand-in",
        ));
    }
    let page =
        lock(&inner.store).list(kind, &filter, query.limit, query.continue_token.as_deref())?;
    let mut metadata = json!({"resourceVersion": page.rv.to_string()});
    if let Some(token) = page.continue_token {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(page.remaining);
    }
    // As the real server: items of a typed list carry no kind/apiVersion.
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| {
            let mut o = (**o).clone();
            if let Some(map) = o.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            o
        })
        .collect();
    let list = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

fn count(inner: &Inner, kind: Kind, f: impl FnOnce(&mut KindCounters)) {
    f(lock(&inner.counters).kinds.entry(kind).or_default());
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-lab",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

/// Answers a watch: 200 and a chunked body fed by a task. Even 410 Gone is
/// an ERROR event in a 200 stream, as the real server sends it.
fn start_watch(inner: &Arc<Inner>, kind: Kind, filter: &Filter, query: &Query) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let opened = query
        .watch_from()
        .and_then(|from| {
            let mut store = lock(&inner.store);
            let current = store.rv();
            store.watch(kind, filter, from).map(|w| (w, current))
        })
        .inspect_err(|e| {
            if e.code == 410 {
                count(inner, kind, |c| c.gone += 1);
            }
        });
    match opened {
        Err(e) => {
            let _ = tx.try_send(line("ERROR", &e.status()));
        }
        Ok(((id, start, changes), current)) => {
            let mut first = Vec::new();
            match start {
                Start::Current(objects) => {
                    first.extend(objects.iter().map(|o| line("ADDED", o)));
                    if query.initial_events && query.bookmarks {
                        first.push(bookmark(kind, current, true));
                    }
                }
                Start::Since(changes) => first.extend(
                    changes
                        .iter()
                        .filter_map(|c| filter.event(c))
                        .map(|(t, o)| line(t, o)),
                ),
            }
            let task = WatchTask {
                inner: inner.clone(),
                id,
                kind,
                filter: filter.clone(),
                bookmarks: query.bookmarks,
                timeout: query.timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT),
            };
            tokio::spawn(task.run(first, changes, tx));
        }
    }
    let body = futures::stream::unfold(rx, |mut rx| async {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(Box::pin(body))))
        .expect("a valid response")
}

struct WatchTask {
    inner: Arc<Inner>,
    id: u64,
    kind: Kind,
    filter: Filter,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchTask {
    async fn run(
        self,
        first: Vec<Bytes>,
        mut changes: mpsc::UnboundedReceiver<Message>,
        out: mpsc::Sender<Bytes>,
    ) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Set when the watch timed out: the resourceVersion it stopped
        // taking changes at, for the closing bookmark.
        let mut timed_out: Option<u64> = None;
        for b in first {
            if out.send(b).await.is_err() {
                return self.close();
            }
        }
        loop {
            let msg = tokio::select! {
                msg = changes.recv() => msg,
                _ = tokio::time::sleep_until(deadline), if timed_out.is_none() => {
                    // Stop taking changes; what was already sent is still
                    // delivered, then the closing bookmark.
                    let mut store = lock(&self.inner.store);
                    store.unwatch(self.id);
                    timed_out = Some(store.rv());
                    continue;
                }
                _ = out.closed() => return self.close(),
            };
            let bytes = match msg {
                Some(Message::Change(c)) => match self.filter.event(&c) {
                    Some((t, o)) => line(t, o),
                    None => continue,
                },
                Some(Message::Bookmark(rv)) if self.bookmarks => bookmark(self.kind, rv, false),
                Some(Message::Bookmark(_)) => continue,
                None => {
                    if let (Some(rv), true) = (timed_out, self.bookmarks) {
                        let _ = out.send(bookmark(self.kind, rv, false)).await;
                    }
                    // Otherwise dropped by drop_watches, or timed out
                    // without bookmarks.
                    return;
                }
            };
            if out.send(bytes).await.is_err() {
                return self.close();
            }
        }
    }

    fn close(&self) {
        lock(&self.inner.store).unwatch(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/ns/services/web").unwrap();
        assert_eq!(
            (t.kind, t.namespace, t.name),
            (Kind::Service, Some("ns"), Some("web"))
        );
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!(
            (t.kind, t.namespace, t.name),
            (Kind::EndpointSlice, None, None)
        );
        let t = parse_path("/api/v1/nodes/node-a").unwrap();
        assert_eq!((t.kind, t.name), (Kind::Node, Some("node-a")));
        let t = parse_path("/apis/networking.k8s.io/v1/servicecidrs/kubernetes").unwrap();
        assert_eq!((t.kind, t.name), (Kind::ServiceCidr, Some("kubernetes")));
        for bad in [
            "/api/v1/namespaces/ns/nodes",
            "/apis/networking.k8s.io/v1/namespaces/ns/servicecidrs",
            "/api/v1/pods",
            "/apis/discovery.k8s.io/v1beta1/endpointslices",
            "/api/v1/services/a/b",
            "/",
        ] {
            assert!(parse_path(bad).is_none(), "{bad}");
        }
    }
}
