//! `ops reshard`: change the shard count of a running cluster the safe way (docs/OPERATIONS.md,
//! "Changing the shard count"): stop the gateways so appends pause, wait until every shard's streams
//! are empty, stop the workers, write the new count into the cluster config, then start one worker
//! per new shard and the gateways again under their node ids. Every message appended before the
//! switch is saved before any appended after it, so per-sender order holds even for senders whose
//! shard changes. Before the new workers start, the idempotency window moves with its senders: every
//! `idem` key of a sender whose shard changes is rewritten under the new shard's tag (value and TTL
//! kept), so a client that resends a message whose receipt it missed during the switch gets the
//! same `serverMsgId` (SPEC §3.9). The seq counters do not move: senders change shards, so every
//! shard's counter hash is dropped after the drain, and each new owner restores its senders'
//! counters from MySQL (which then holds every message) before numbering anything (SPEC §3.10).

use std::time::Duration;

use futures_util::future::join_all;

use im_common::config::Config;
use im_common::keys::Keys;
use im_common::shard::shard_of;
use im_harness::cluster::{self, ClusterError, ClusterState, GatewayProc, WorkerProc};
use im_harness::{poll, process};

/// A worker draining its last batch gets longer than the default stop grace.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(15);

/// Reshards the cluster in `state` to `shards`, waiting at most `drain_timeout` for the streams to
/// drain; `state` then describes the restarted cluster.
pub async fn reshard(state: &mut ClusterState, shards: u16, drain_timeout: Duration) -> Result<(), ClusterError> {
    let mut cfg = state.config()?;
    let gateways: Vec<GatewayProc> = std::mem::take(&mut state.gateways);
    join_all(gateways.iter().map(|g| process::terminate(g.pid, cluster::STOP_GRACE))).await;

    if !drained(&cfg, drain_timeout).await? {
        return Err(ClusterError::NotReady("shard drain".into(), drain_timeout, state.dir.clone()));
    }
    let workers: Vec<WorkerProc> = std::mem::take(&mut state.workers);
    join_all(workers.iter().map(|w| process::terminate(w.pid, WORKER_STOP_GRACE))).await;

    move_idempotency_window(&cfg, shards).await?;
    drop_seq_counters(&cfg, shards).await?;
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

/// Drops the seq counters of the old layout and of the new one (`shards` shards); their next owners
/// restore them from MySQL. On a cluster the shard tags depend on the shard count, so the new
/// layout's counters are other keys — possibly left from an earlier time at that count, marked
/// complete, and stale.
async fn drop_seq_counters(cfg: &Config, shards: u16) -> Result<(), ClusterError> {
    let mut resharded = cfg.clone();
    resharded.cluster.shards = shards;
    let (old, new) = (Keys::from_config(cfg), Keys::from_config(&resharded));
    let mut counters: Vec<String> = (0..cfg.cluster.shards).map(|s| old.seq_counters(s)).collect();
    counters.extend((0..shards).map(|s| new.seq_counters(s)));
    counters.sort_unstable();
    counters.dedup();
    let mut conn = im_common::connections::connect(&cfg.redis).await.map_err(redis_err)?;
    redis::cmd("DEL").arg(&counters).query_async::<()>(&mut conn).await.map_err(redis_err)
}

/// Keys looked at per SCAN call while moving the idempotency window.
const SCAN_COUNT: usize = 1000;

fn redis_err(e: redis::RedisError) -> ClusterError {
    ClusterError::Io { what: "resharding redis".into(), source: std::io::Error::other(e) }
}

/// Rewrites the idempotency keys of senders whose shard changes from `cfg.cluster.shards` to
/// `shards` under their new shard (value and remaining TTL kept; the old key is deleted). Runs
/// while no gateway or worker is up, so nothing else writes these keys. Returns how many moved.
async fn move_idempotency_window(cfg: &Config, shards: u16) -> Result<usize, ClusterError> {
    let keys = Keys::from_config(cfg);
    // On a cluster the shard tags depend on the shard count: the new keys have a layout of their own.
    let mut resharded = cfg.clone();
    resharded.cluster.shards = shards;
    let new_keys = Keys::from_config(&resharded);
    let mut redis = im_common::connections::connect(&cfg.redis).await.map_err(redis_err)?;
    let mut moved = 0;
    for old in 0..cfg.cluster.shards {
        let pattern = keys.idempotency_pattern(old);
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut redis)
                .await
                .map_err(redis_err)?;
            let moves: Vec<(&String, String)> = batch
                .iter()
                .filter_map(|key| {
                    let (from, cmid) = keys.parse_idempotency(old, key)?;
                    let new = shard_of(from, shards);
                    let new_key = new_keys.idempotency(new, from, cmid);
                    (new_key != *key).then_some((key, new_key))
                })
                .collect();
            if !moves.is_empty() {
                let mut read = redis::pipe();
                for (key, _) in &moves {
                    read.get(*key).cmd("PTTL").arg(*key);
                }
                let found: Vec<(Option<String>, i64)> = read.query_async(&mut redis).await.map_err(redis_err)?;
                let mut write = redis::pipe();
                for ((old_key, new_key), (value, ttl_ms)) in moves.iter().zip(found) {
                    let Some(value) = value else { continue }; // expired meanwhile
                    let set = write.cmd("SET").arg(new_key).arg(value);
                    if ttl_ms > 0 {
                        set.arg("PX").arg(ttl_ms);
                    }
                    set.ignore();
                    write.del(*old_key).ignore();
                    moved += 1;
                }
                write.query_async::<()>(&mut redis).await.map_err(redis_err)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    tracing::info!(moved, "idempotency window moved to the new shards");
    Ok(moved)
}

/// Whether every stream of the config's shard count is empty within `limit`.
async fn drained(cfg: &Config, limit: Duration) -> Result<bool, ClusterError> {
    let keys = Keys::from_config(cfg);
    let redis = im_common::connections::connect(&cfg.redis).await.map_err(redis_err)?;
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
