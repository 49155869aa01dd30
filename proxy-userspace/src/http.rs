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
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::{health::Health, metrics::Metrics};

/// What one listener serves.
#[derive(Clone)]
pub enum Endpoints {
    Metrics(Arc<Metrics>),
    Health(Arc<Health>),
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
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
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
            let v = h.verdict(Instant::now());
            let body = format!(
                "{{\"lastUpdated\": {}, \"currentTime\": \"{}\", \"nodeEligible\": true}}\n",
                v.last_updated
                    .map_or("null".to_string(), |t| format!("\"{}\"", rfc3339(t))),
                rfc3339(SystemTime::now())
            );
            let status = if v.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", body)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// How long one connection may stay open: ample for a request and its
/// answer, short enough that connections opened and left idle cannot pile
/// up (the health port answers every pod of the cluster).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, typically): pause
/// rather than retry at once, which would keep a core busy.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
        assert_eq!(respond(&e, "/healthz").status(), StatusCode::OK);
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
