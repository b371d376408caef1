//! `ops reshard`: change the shard count of a running cluster the safe way (docs/OPERATIONS.md,
//! "Changing the shard count"): stop the gateways so appends pause, wait until every shard's streams
//! are empty, stop the workers, write the new count into the cluster config, then start one worker
//! per new shard and the gateways again under their node ids. Every message appended before the
//! switch is saved before any appended after it, so per-sender order holds even for senders whose
//! shard changes.

use std::time::Duration;

use futures_util::future::join_all;

use im_common::config::Config;
use im_common::keys::Keys;
use im_harness::cluster::{self, ClusterError, ClusterState, GatewayProc, WorkerProc};
use im_harness::{poll, process};

/// A worker draining its last batch gets longer than the default stop grace.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(15);

/// Reshards the cluster in `state` to `shards`, waiting at most `drain_timeout` for the streams to
/// drain; `state` then describes the restarted cluster.
pub async fn reshard(state: &mut ClusterState, shards: u16, drain_timeout: Duration) -> Result<(), ClusterError> {
    let config_err =
        |e: im_common::config::ConfigError| ClusterError::BadState(state.config_path.clone(), e.to_string());
    let mut cfg = Config::load(Some(&state.config_path)).map_err(config_err)?;
    let gateways: Vec<GatewayProc> = std::mem::take(&mut state.gateways);
    join_all(gateways.iter().map(|g| process::terminate(g.pid, cluster::STOP_GRACE))).await;

    if !drained(&cfg, drain_timeout).await? {
        return Err(ClusterError::NotReady("shard drain".into(), drain_timeout, state.dir.clone()));
    }
    let workers: Vec<WorkerProc> = std::mem::take(&mut state.workers);
    join_all(workers.iter().map(|w| process::terminate(w.pid, WORKER_STOP_GRACE))).await;

    cfg.cluster.shards = shards;
    cluster::write_config(&cfg, &state.config_path)?;
    state.shards = shards;
    for shard in 0..shards {
        state
            .workers
            .push(cluster::spawn_worker(&state.dir, &state.config_path, usize::from(shard), Some(shard)).await?);
    }
    for g in &gateways {
        state.gateways.push(cluster::spawn_gateway(&state.dir, &state.config_path, g.node_id).await?);
    }
    cluster::wait_ready(state).await
}

/// Whether every stream of the config's shard count is empty within `limit`.
async fn drained(cfg: &Config, limit: Duration) -> Result<bool, ClusterError> {
    let keys = Keys::from_config(cfg);
    let redis_err =
        |e: redis::RedisError| ClusterError::Io { what: "drain check".into(), source: std::io::Error::other(e) };
    let client = redis::Client::open(cfg.redis.url.as_str()).map_err(redis_err)?;
    let redis = client.get_multiplexed_async_connection().await.map_err(redis_err)?;
    let mut pipe = redis::pipe();
    for shard in 0..cfg.cluster.shards {
        pipe.xlen(keys.accepted_stream(shard)).xlen(keys.to_save_stream(shard));
    }
    let empty = poll::until(limit, || {
        let (pipe, mut redis) = (pipe.clone(), redis.clone());
        async move {
            match pipe.query_async::<Vec<u64>>(&mut redis).await {
                Ok(lengths) if lengths.iter().all(|&l| l == 0) => Some(Ok(())),
                Ok(_) => None,
                Err(e) => Some(Err(redis_err(e))),
            }
        }
    })
    .await;
    match empty {
        Some(Ok(())) => Ok(true),
        Some(Err(e)) => Err(e),
        None => Ok(false),
    }
}
