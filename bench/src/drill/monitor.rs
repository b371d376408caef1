//! What a drill watches while its load runs: about every half second, the total backlog (unsaved
//! stream entries over all shards; the gateways' own per-shard figure where a worker that owned the
//! shard is gone), the save rate, and every gateway's and worker's resident memory.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use im_harness::cluster::ClusterState;
use im_harness::{metrics, process, status};

use super::DrillCluster;
use crate::load::LoadResult;
use crate::BenchError;

/// Sampling interval of the monitor (two scrapes this far apart per sample).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(400);
/// Sampling interval while waiting for the load's first accepted messages.
const TRAFFIC_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait for the first accepted message before the drill gives up.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(120);
/// KiB per MiB.
const KIB_PER_MIB: f64 = 1024.0;

/// One monitor sample.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub at: Instant,
    pub backlog: f64,
    pub saved_per_sec: f64,
    pub rss_mib: Vec<(String, f64)>,
}

/// Samples backlog, save rate and RSS until told to stop.
pub(super) async fn monitor(state: DrillCluster, stop: CancellationToken) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !stop.is_cancelled() {
        tokio::select! {
            s = sample(&state) => samples.push(s),
            _ = stop.cancelled() => break,
        }
    }
    // One more after the load: a load that drains quickly may end before the next regular sample,
    // and the recovery check needs to see the state after the fault.
    samples.push(sample(&state).await);
    samples
}

async fn sample(state: &DrillCluster) -> Sample {
    let current = state.snapshot();
    let status = status::collect(&current, SAMPLE_INTERVAL).await;
    let gateway_backlog = gateway_backlogs(&current).await;
    let backlog =
        status.shards.iter().map(|s| s.backlog.max(gateway_backlog.get(&s.shard).copied().unwrap_or(0.0))).sum();
    let saved_per_sec = status.shards.iter().map(|s| s.saved_per_sec).sum();
    let rss_mib = current
        .gateways
        .iter()
        .map(|g| (format!("gateway-{}", g.node_id), g.pid))
        .chain(current.workers.iter().enumerate().map(|(i, w)| (format!("worker-{i}"), w.pid)))
        .filter_map(|(name, pid)| rss_mib(pid).map(|m| (name, m)))
        .collect();
    Sample { at: Instant::now(), backlog, saved_per_sec, rss_mib }
}

/// Each shard's backlog as the gateways see it (`im_gateway_shard_backlog`, refreshed from Redis every
/// 250 ms): still there while the worker that owned the shard is dead.
async fn gateway_backlogs(state: &ClusterState) -> BTreeMap<u16, f64> {
    let mut out: BTreeMap<u16, f64> = BTreeMap::new();
    for g in &state.gateways {
        let Ok(samples) = metrics::scrape(&g.metrics_url).await else { continue };
        for s in samples.into_iter().filter(|s| s.name == "im_gateway_shard_backlog") {
            if let Some(shard) = s.labels.get("shard").and_then(|v| v.parse().ok()) {
                let e = out.entry(shard).or_default();
                *e = e.max(s.value);
            }
        }
    }
    out
}

/// Resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    process::rss_kib(pid).map(|kib| kib as f64 / KIB_PER_MIB)
}

/// Waits until the gateways report accepted messages (the load is sending), or the load ended early.
pub(super) async fn wait_for_traffic(
    state: &DrillCluster,
    load: &mut tokio::task::JoinHandle<Result<LoadResult, BenchError>>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    while Instant::now() < deadline {
        if load.is_finished() {
            return Err(BenchError::InvalidSpec("the load ended before any message was accepted".into()));
        }
        let status = status::collect(&state.snapshot(), TRAFFIC_SAMPLE_INTERVAL).await;
        if status.shards.iter().any(|s| s.accepted_per_sec > 0.0) {
            return Ok(());
        }
    }
    Err(BenchError::InvalidSpec(format!("no message accepted within {TRAFFIC_TIMEOUT:?}")))
}
