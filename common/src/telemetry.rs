//! Process plumbing shared by every binary: logging, the Prometheus recorder, and the small HTTP
//! endpoints every process serves (`/metrics`, `/healthz`, `/readyz`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Structured logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}

/// Installs the process-wide Prometheus recorder (the one global besides logging), with labels that
/// every series of this process carries (`process`, `node`). Latency histograms (`*_seconds`) get
/// buckets from 0.25 ms to 60 s; batch-size histograms (`*_size`) from 1 to 2000.
pub fn install_metrics(global_labels: &[(&str, String)]) -> Result<PrometheusHandle, String> {
    const BUCKETS: [f64; 17] =
        [0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
    let builder = global_labels.iter().fold(PrometheusBuilder::new(), |b, (k, v)| b.add_global_label(*k, v.clone()));
    builder
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), &BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_size".into()),
                &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0],
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// A plain-text or JSON response.
pub fn text_response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// What `/readyz` asks: `Ok` when the process can do its job, else the reason it cannot.
pub type ReadinessCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Answers `/metrics`, `/healthz` and `/readyz`; `None` for any other path.
pub fn admin_response(path: &str, metrics: &PrometheusHandle, ready: &ReadinessCheck) -> Option<Response<Full<Bytes>>> {
    match path {
        "/metrics" => Some(text_response(StatusCode::OK, "text/plain; version=0.0.4", metrics.render())),
        "/healthz" => Some(text_response(StatusCode::OK, "text/plain", "ok\n")),
        "/readyz" => Some(match ready() {
            Ok(()) => text_response(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        }),
        _ => None,
    }
}

/// Serves only the admin endpoints on `listener` until the process exits (for shard workers).
pub async fn serve_admin(listener: tokio::net::TcpListener, metrics: PrometheusHandle, ready: ReadinessCheck) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = admin_response(req.uri().path(), &metrics, &ready)
                    .unwrap_or_else(|| text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Writes `{"addr": ...}`-style readiness info as JSON to `path` (atomically: write then rename), so a
/// launcher learns the bound ports of a process started with port 0.
pub fn write_ready_file(path: &std::path::Path, info: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, info.to_string())?;
    std::fs::rename(tmp, path)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Help text of every metric, by name (`/metrics` shows it; `promtool check metrics` wants it).
const HELP: &[(&str, &str)] = &[
    ("im_build_info", "Build and mode of this process (always 1)"),
    ("im_gateway_connections", "Open WebSocket connections"),
    ("im_gateway_auth_total", "Authentications by result"),
    ("im_gateway_frames_in_total", "Frames received, by type"),
    ("im_gateway_frames_out_total", "Frames sent, by type"),
    ("im_gateway_errors_total", "ERROR frames sent (and fatal closes), by reason"),
    ("im_gateway_appends_total", "Messages appended to a shard's accepted stream"),
    ("im_gateway_fail_open_total", "Appends that failed over to the baseline path"),
    ("im_gateway_append_seconds", "Append round trip of each accepted message (its batch's script call)"),
    ("im_gateway_server_busy_total", "server_busy answers, by cause"),
    ("im_gateway_shard_backlog", "Unsaved entries per shard as admission control sees them"),
    ("im_gateway_slow_consumer_disconnects_total", "Connections dropped because their outbound queue was full"),
    ("im_gateway_pubsub_messages_in_total", "Node-channel messages received"),
    ("im_gateway_pubsub_messages_out_total", "Node-channel messages published (baseline pushes)"),
    ("im_gateway_offline_resent_total", "Messages pushed by offline resend"),
    ("im_gateway_replayed_pushes_total", "Pushes replayed from the node's journals after (re)subscribing"),
    ("im_gateway_outbox_pushes", "Pushes of saved messages waiting for Redis to be republished"),
    ("im_gateway_pushes_dropped_total", "Waiting pushes dropped because the outbox was full"),
    (
        "im_gateway_append_standing_seconds",
        "Lowest append round trip of the last 100 ms window (sheds load past gateway.shed_append_ms)",
    ),
    ("im_gateway_subscription_up", "1 while the node-channel subscription is live"),
    ("im_gateway_node_lease_held", "1 while this gateway holds the lease on its node id"),
    ("im_gateway_insert_batch_size", "Rows per baseline group-commit INSERT"),
    ("im_gateway_insert_seconds", "Baseline INSERT transaction latency"),
    ("im_worker_lease_held", "1 while this process owns the shard"),
    ("im_worker_fencing_token", "Fencing token of the shard lease this process holds"),
    ("im_worker_delivered_total", "Messages pushed by the deliver stage"),
    ("im_worker_saved_total", "Messages committed by the save stage"),
    ("im_worker_save_retries_total", "Failed INSERT attempts, retried"),
    ("im_worker_save_errors_total", "Failed INSERT attempts, by class (unavailable, statement)"),
    ("im_worker_save_failing_seconds", "Seconds the save stage's current batch has been failing (0 when healthy)"),
    ("im_worker_dead_letters_total", "Messages refused by the database for good"),
    ("im_worker_seq_restores_total", "Times the shard's seq counters were missing and rebuilt from MySQL"),
    ("im_worker_fail_open_floors_total", "Fail-open saves whose seqs the shard owner raised its counters to"),
    ("im_worker_batch_size", "Entries per batch, by stage"),
    ("im_worker_insert_seconds", "INSERT transaction latency of the save stage"),
    ("im_worker_accepted_to_pushed_seconds", "Time from ACK(accepted) to the push"),
    ("im_worker_accepted_to_saved_seconds", "Time from ACK(accepted) to the commit"),
    ("im_stream_length", "Entries in the stream (in flight: trimmed as acknowledged)"),
    ("im_stream_pending", "Entries read but not acknowledged"),
    ("im_stream_consumer_lag", "Entries not yet read by the consumer group"),
    ("im_stream_oldest_pending_age_seconds", "Age of the oldest pending entry"),
    ("im_stream_dead_letter_length", "Entries in the dead-letter stream"),
];

/// Registers help text for every metric and creates a process's counters at zero (once per label
/// value given; an empty label name means an unlabelled counter), so the first event is already
/// visible to `rate()` and alerts.
pub fn register_metrics(zero_counters: &[(&'static str, &'static str, Vec<String>)]) {
    for &(name, help) in HELP {
        if name.ends_with("_total") {
            metrics::describe_counter!(name, help);
        } else if name.ends_with("_seconds") || name.ends_with("_size") {
            metrics::describe_histogram!(name, help);
        } else {
            metrics::describe_gauge!(name, help);
        }
    }
    for (name, label, values) in zero_counters {
        if label.is_empty() {
            metrics::counter!(*name).increment(0);
        }
        for value in values.iter().filter(|_| !label.is_empty()) {
            metrics::counter!(*name, *label => value.clone()).increment(0);
        }
    }
}
