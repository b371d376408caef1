//! `ops dashboard`: the live backlog page of a running cluster.
//!
//! A small HTTP server with two routes: `GET /` is one self-contained page (`dashboard.html`: plain
//! HTML + JS + canvas, nothing fetched from elsewhere, so it works offline) and `GET /api/status` is
//! [`crate::status::collect`] as JSON — the same numbers as `ops status`, from the processes' own
//! `/metrics`. The page polls that once a second and keeps the history itself, so the server stays
//! stateless: it re-reads the state file on every refresh, and processes added by `ops scale` show up.
//! Refreshes that arrive while a scrape is under way wait and share the next one, so several open
//! pages cost the cluster about as much as one, and no page gets a status older than its request.
//!
//! `ops up` starts one in the background (`im_harness::cluster::spawn_dashboard`), like the gateways
//! and workers, following the state file `ops up` was given.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};

use im_common::telemetry::text_response;
use im_harness::cluster::{self, ClusterError};
use im_harness::status::{self, ClusterStatus};

/// The page, embedded so the binary is all an operator needs.
pub const PAGE: &str = include_str!("dashboard.html");

/// How far apart the two scrapes behind the rates are.
const RATE_INTERVAL: Duration = Duration::from_millis(500);

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// After a failed accept (out of descriptors and the like), pause this long instead of spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Why `ops dashboard` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile { path: PathBuf, source: std::io::Error },
}

/// What the routes share: where the cluster is described, and the last scrape with when it began.
struct Dashboard {
    state_file: PathBuf,
    last: Mutex<Option<(Instant, ClusterStatus)>>,
}

impl Dashboard {
    /// The cluster's status, from a scrape that began after this request arrived. The lock is held
    /// across the scrape on purpose: requests that arrive meanwhile queue behind it, and the first of
    /// them scrapes for all the others.
    async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((began, status)) = last.as_ref() {
            if *began >= arrived {
                return Ok(status.clone());
            }
        }
        let began = Instant::now();
        let state = cluster::load_state(&self.state_file)?;
        let status = status::collect(&state, RATE_INTERVAL).await;
        *last = Some((began, status.clone()));
        Ok(status)
    }
}

/// Serves the page and `/api/status` for the cluster described by `state_file` on `listener` until
/// `shutdown` resolves.
pub async fn serve(listener: TcpListener, state_file: PathBuf, shutdown: impl Future<Output = ()>) {
    let dashboard = Arc::new(Dashboard { state_file, last: Mutex::new(None) });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = &mut shutdown => return,
        };
        let Ok(slot) = slot else { return };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "dashboard accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let dashboard = dashboard.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let dashboard = dashboard.clone();
                async move { Ok::<_, Infallible>(route(&dashboard, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            drop(slot);
        });
    }
}

async fn route(dashboard: &Dashboard, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let mut resp = match req.uri().path() {
        "/" => text_response(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/api/status" => match dashboard.status().await {
            Ok(status) => match serde_json::to_string(&status) {
                Ok(json) => text_response(StatusCode::OK, "application/json", json),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("no cluster status: {e}")),
        },
        _ => text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    resp.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    resp
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    text_response(status, "application/json", serde_json::json!({ "error": message }).to_string())
}

/// `ops dashboard`: binds `listen`, prints the page's URL, writes `{"addr": ...}` to `ready_file`
/// (how `ops up` learns the port), and serves until SIGTERM or Ctrl-C.
pub async fn run(listen: &str, state_file: PathBuf, ready_file: Option<&Path>) -> Result<(), DashboardError> {
    let listener =
        TcpListener::bind(listen).await.map_err(|source| DashboardError::Listen { addr: listen.to_owned(), source })?;
    let addr = listener.local_addr().map_err(|source| DashboardError::Listen { addr: listen.to_owned(), source })?;
    println!("dashboard {} (cluster state {})", page_url(addr), state_file.display());
    if let Some(path) = ready_file {
        im_common::telemetry::write_ready_file(path, &serde_json::json!({ "addr": addr.to_string() }))
            .map_err(|source| DashboardError::ReadyFile { path: path.to_owned(), source })?;
    }
    serve(listener, state_file, im_common::telemetry::terminated()).await;
    Ok(())
}

/// The page's URL for a listener at `addr`.
fn page_url(addr: impl std::fmt::Display) -> String {
    format!("http://{addr}/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_harness::http;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        assert!(PAGE.contains("<canvas") && PAGE.contains("/api/status"));
        for outside in ["://", "src=", "href=", "@import"] {
            assert!(!PAGE.contains(outside), "the page refers to something outside itself: {outside}");
        }
    }

    #[tokio::test]
    async fn serves_the_page_and_reports_a_missing_cluster_as_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = page_url(listener.local_addr().unwrap());
        let missing = std::env::temp_dir().join(format!("im-no-cluster-{}.json", std::process::id()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, missing, async move {
            let _ = stopped.await;
        }));
        let (status, body) = http::get(&base).await.unwrap();
        assert_eq!((status, body.as_str()), (200, PAGE));
        let (status, body) = http::get(&format!("{base}api/status")).await.unwrap();
        assert_eq!(status, 503);
        assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(), "{body}");
        assert_eq!(http::get(&format!("{base}nothing-here")).await.unwrap().0, 404);
        let _ = stop.send(());
        server.await.unwrap();
    }
}
