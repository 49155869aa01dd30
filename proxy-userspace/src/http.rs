//! The daemon's HTTP endpoints, as kube-proxy has them: metrics on one
//! address (default 127.0.0.1:10249), /healthz and /livez on another
//! (default 0.0.0.0:10256).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
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
use tokio::net::TcpListener;

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

/// Binds now (so a taken port is a start-up error) and serves in the
/// background on the current runtime.
pub async fn serve(addr: SocketAddr, endpoints: Endpoints) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = respond(&endpoints, req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
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
}
