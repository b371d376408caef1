//! What Prometheus needs to find a local cluster: a `file_sd` targets file listing every process's
//! metrics endpoint, written next to the state file by `ops up`.
//!
//! Ports are picked by the OS at start, so a static scrape config cannot name them; Prometheus
//! re-reads a `file_sd_configs` file whenever it changes, so `ops/prometheus/prometheus.yml` points at
//! this file and follows the cluster without a reload. Target labels say what a process is
//! (`process`, and the gateway `node` or the worker's assigned `shard`); the processes put the same
//! labels on their own series, and the scrape config honours those (`honor_labels: true`), so a
//! worker that owns another shard than it was started for is still reported under the shard it owns.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use im_harness::cluster::{ClusterError, ClusterState, GatewayProc, WorkerProc};

/// The targets file that belongs to the state file `state_file` (same directory).
pub fn targets_path(state_file: &Path) -> PathBuf {
    state_file.with_file_name("prometheus-targets.json")
}

/// `host:port` of a metrics URL (`http://127.0.0.1:9100/metrics` → `127.0.0.1:9100`).
fn host_port(metrics_url: &str) -> &str {
    let rest = metrics_url.strip_prefix("http://").unwrap_or(metrics_url);
    rest.split('/').next().unwrap_or(rest)
}

/// The `file_sd` target groups of a cluster's processes: one per process, so each carries its own
/// labels.
pub fn prometheus_targets(gateways: &[GatewayProc], workers: &[WorkerProc]) -> Value {
    let gateways = gateways.iter().map(|g| {
        json!({
            "targets": [host_port(&g.metrics_url)],
            "labels": { "process": "gateway", "node": g.node_id.to_string() },
        })
    });
    let workers = workers.iter().map(|w| {
        let mut labels = json!({ "process": "shard-worker" });
        // Standbys own no shard until they take one over; their series say which when they do.
        if let Some(shard) = w.shard {
            labels["shard"] = json!(shard.to_string());
        }
        json!({ "targets": [host_port(&w.metrics_url)], "labels": labels })
    });
    Value::Array(gateways.chain(workers).collect())
}

/// Writes the targets file for `state` to `path` atomically (write, then rename), so Prometheus,
/// which watches the file, never reads half of it.
pub fn write_prometheus_targets(state: &ClusterState, path: &Path) -> Result<(), ClusterError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| ClusterError::Io { what, source }
    };
    let text = serde_json::to_string_pretty(&prometheus_targets(&state.gateways, &state.workers))
        .map_err(|e| ClusterError::BadState(path.into(), e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io("write"))?;
    std::fs::rename(&tmp, path).map_err(io("rename into"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_is_a_target_with_its_labels() {
        let gateways = [GatewayProc {
            node_id: 1,
            ws_url: "ws://127.0.0.1:4001/ws".into(),
            http_url: "http://127.0.0.1:4001".into(),
            metrics_url: "http://127.0.0.1:4001/metrics".into(),
            pid: 10,
            log: "g.log".into(),
        }];
        let workers = [
            WorkerProc {
                shard: Some(0),
                metrics_url: "http://127.0.0.1:4100/metrics".into(),
                pid: 11,
                log: "w".into(),
            },
            WorkerProc { shard: None, metrics_url: "http://127.0.0.1:4101/metrics".into(), pid: 12, log: "s".into() },
        ];
        let targets = prometheus_targets(&gateways, &workers);
        assert_eq!(
            targets,
            json!([
                {"targets": ["127.0.0.1:4001"], "labels": {"process": "gateway", "node": "1"}},
                {"targets": ["127.0.0.1:4100"], "labels": {"process": "shard-worker", "shard": "0"}},
                {"targets": ["127.0.0.1:4101"], "labels": {"process": "shard-worker"}},
            ])
        );
    }

    #[test]
    fn the_targets_file_sits_next_to_the_state_file() {
        assert_eq!(
            targets_path(Path::new(".im-local/cluster.json")),
            PathBuf::from(".im-local/prometheus-targets.json")
        );
    }
}
