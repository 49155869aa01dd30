//! The daemon's HTTP endpoints, as kube-proxy has them: metrics on one
//! address (default 127.0.0.1:10249), /healthz and /livez on another
//! (default 0.0.0.0:10256).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::{
    health::{Health, Verdict},
    metrics::Metrics,
};

/// What one listener serves.
#[derive(Clone)]
pub enum Endpoints {
    Metrics(Arc<Metrics>),
    Health(Arc<Health>),
}

/// Go's RFC 3339 with nanoseconds (`time.RFC3339Nano`, trailing zeros of
/// the fraction dropped), in UTC: how kube-proxy's JSON writes times.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    // Civil date from days since the epoch (Howard Hinnant's algorithm),
    // to avoid a date crate for one timestamp.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let fraction = match since.subsec_nanos() {
        0 => String::new(),
        n => format!(".{n:09}").trim_end_matches('0').to_string(),
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Go's zero `time.Time`, which kube-proxy writes before its first sync.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// kube-proxy's /healthz (`node_eligible` given) or /livez answer: whether
/// it is 200, and the JSON (its `ProxyHealth`, field for field). As
/// kube-proxy does for compatibility, a healthy answer's `lastUpdated` is
/// the current time; `status` has the (IPv4) proxier's own last update.
fn health_json(v: &Verdict, now: SystemTime, node_eligible: Option<bool>) -> (bool, String) {
    let healthy = v.healthy && node_eligible != Some(false);
    let time = |t: Option<SystemTime>| t.map_or(ZERO_TIME.to_string(), rfc3339);
    let last_updated = if healthy { Some(now) } else { v.last_updated };
    let mut body = format!(
        "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\"",
        time(last_updated),
        time(Some(now))
    );
    if let Some(eligible) = node_eligible {
        body.push_str(&format!(",\"nodeEligible\":{eligible}"));
    }
    body.push_str(&format!(",\"healthy\":{}", v.healthy));
    if let Some(synced) = v.last_updated {
        body.push_str(&format!(
            ",\"status\":{{\"IPv4\":{{\"lastUpdated\":\"{}\",\"healthy\":{}}}}}",
            rfc3339(synced),
            v.healthy
        ));
    }
    body.push('}');
    (healthy, body)
}

fn respond(endpoints: &Endpoints, path: &str) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    match (endpoints, path) {
        (Endpoints::Metrics(m), "/metrics") => match m.encode() {
            Ok(body) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding failed\n".into(),
            ),
        },
        (Endpoints::Health(h), "/healthz" | "/livez") => {
            // /livez ignores the node's eligibility: a node being drained
            // still has a live proxy.
            let eligible = (path == "/healthz").then(|| h.node_eligible());
            let (healthy, body) =
                health_json(&h.verdict(Instant::now()), SystemTime::now(), eligible);
            let mut resp = text(status_of(healthy), "application/json", body);
            resp.headers_mut().insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// How long one connection may stay open: ample for a request and its
/// answer, short enough that connections opened and left idle cannot pile
/// up (the health port answers every pod of the cluster).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, typically): pause
/// rather than retry at once, which would keep a core busy.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// 200 when healthy, 503 otherwise.
pub fn status_of(healthy: bool) -> StatusCode {
    if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Binds now (so a taken port is a start-up error) and serves in the
/// background on the current runtime.
pub async fn serve(addr: SocketAddr, endpoints: Endpoints) -> Result<SocketAddr> {
    serve_for(addr, endpoints, CONNECTION_LIFETIME).await
}

async fn serve_for(
    addr: SocketAddr,
    endpoints: Endpoints,
    lifetime: Duration,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, endpoints, lifetime));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, endpoints: Endpoints, lifetime: Duration) {
    let mut failed: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if failed == 0 {
                    warn!(error = %e, "accepting a connection failed; retrying every 100 ms");
                }
                failed += 1;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if failed > 0 {
            info!(failed, "accepting connections again");
            failed = 0;
        }
        tokio::spawn(serve_connection(stream, endpoints.clone(), lifetime));
    }
}

/// Serves one connection until the client closes it or `lifetime` is up.
async fn serve_connection(stream: TcpStream, endpoints: Endpoints, lifetime: Duration) {
    let service = service_fn(move |req: Request<Incoming>| {
        let resp = respond(&endpoints, req.uri().path());
        async move { Ok::<_, Infallible>(resp) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    // Dropping the connection closes it.
    let _ = tokio::time::timeout(lifetime, connection).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = t + std::time::Duration::from_nanos(120_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.12Z");
    }

    #[test]
    fn health_json_is_kube_proxys() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let synced = now - std::time::Duration::from_secs(5);
        let v = Verdict {
            healthy: true,
            last_updated: Some(synced),
        };
        assert_eq!(
            health_json(&v, now, Some(true)),
            (
                true,
                "{\"lastUpdated\":\"2026-11-18T11:06:40Z\",\"currentTime\":\"2026-11-18T11:06:40Z\",\
                 \"nodeEligible\":true,\"healthy\":true,\
                 \"status\":{\"IPv4\":{\"lastUpdated\":\"2026-11-18T11:06:35Z\",\"healthy\":true}}}"
                    .to_string()
            )
        );
        // An ineligible node: /healthz fails, with the real last update;
        // /livez has no nodeEligible and stays healthy.
        let (ok, body) = health_json(&v, now, Some(false));
        assert!(!ok);
        assert!(
            body.starts_with("{\"lastUpdated\":\"2026-11-18T11:06:35Z\""),
            "{body}"
        );
        assert!(
            body.contains("\"nodeEligible\":false,\"healthy\":true"),
            "{body}"
        );
        let (ok, body) = health_json(&v, now, None);
        assert!(ok && !body.contains("nodeEligible"), "{body}");
        // Never synced and stalled: Go's zero time, no per-family status.
        let stalled = Verdict {
            healthy: false,
            last_updated: None,
        };
        assert_eq!(
            health_json(&stalled, now, Some(true)).1,
            "{\"lastUpdated\":\"0001-01-01T00:00:00Z\",\"currentTime\":\"2026-11-18T11:06:40Z\",\
             \"nodeEligible\":true,\"healthy\":false}"
        );
    }

    #[test]
    fn health_answers_like_kube_proxy() {
        let h = Arc::new(Health::new(
            std::time::Duration::from_secs(60),
            Instant::now() - std::time::Duration::from_secs(120),
        ));
        let e = Endpoints::Health(h.clone());
        assert_eq!(
            respond(&e, "/healthz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.synced(Instant::now(), SystemTime::now());
        let r = respond(&e, "/healthz");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(respond(&e, "/livez").status(), StatusCode::OK);
        h.set_node_eligible(false);
        assert_eq!(
            respond(&e, "/healthz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond(&e, "/livez").status(), StatusCode::OK);
        assert_eq!(respond(&e, "/metrics").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn idle_connections_are_closed_and_do_not_hold_up_a_probe() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = Arc::new(Health::new(Duration::from_secs(60), Instant::now()));
        h.synced(Instant::now(), SystemTime::now());
        let lifetime = Duration::from_millis(300);
        let any = "127.0.0.1:0".parse().unwrap();
        let at = rt
            .block_on(serve_for(any, Endpoints::Health(h), lifetime))
            .unwrap();
        // Connections that never send a request.
        let idle: Vec<std::net::TcpStream> = (0..100)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        let mut probe = std::net::TcpStream::connect(at).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        probe.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        probe.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        // The server closes the idle ones once their lifetime is up: the
        // client reads end of stream, not a timeout.
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let read = s.read(&mut [0u8; 16]);
            assert!(matches!(read, Ok(0)), "{read:?}");
        }
    }
}
