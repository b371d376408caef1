//! The shard worker: owns one shard at a time and runs its deliver-then-save pipeline.
//!
//! A tour: [`lease`] decides who owns a shard; [`streams`] reads a shard's streams; [`mover`]'s fenced
//! scripts move entries on under the lease; [`sequences`] numbers each direction's messages;
//! [`deliver`] and [`save`] are the stages, sharing [`stage`]'s context; [`save_health`] reports a save stage that keeps failing; [`stats`] exports
//! the backlog gauges. [`run`] ties them together: acquire a lease (a fixed shard, or any free one for
//! `--shard auto`), run the stages until the lease is lost or shutdown is asked, release, repeat.

pub mod deliver;
pub mod fail_open_floors;
pub mod lease;
pub mod mover;
pub mod pruning;
pub mod save;
pub mod save_health;
pub mod sequences;
pub mod stage;
pub mod stats;
pub mod streams;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use im_common::backoff::Backoff;

use im_common::config::{Config, Mode};
use im_common::health::Dependencies;
use im_common::ids::now_ms;
use im_common::keys::Keys;
use im_common::router::Router;
use im_common::store::Store;
use im_common::StartError;

use lease::ShardLease;
use mover::Mover;
use stage::ShardContext;
use streams::{Fence, StreamReader};

/// Which shard to own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardChoice {
    Fixed(u16),
    /// Any free (or orphaned) shard; wait as a standby while all are owned.
    Auto,
}

/// What `/readyz` reads.
#[derive(Default)]
pub struct WorkerStatus {
    /// The shard held, or -1.
    pub shard: AtomicI64,
    /// Each running stage and the Unix ms of its last round.
    stages: Mutex<Vec<(&'static str, Arc<AtomicU64>)>>,
    /// Redis and MySQL reachability, once the worker has connected.
    deps: OnceLock<Arc<Dependencies>>,
}

impl WorkerStatus {
    pub fn new() -> Self {
        WorkerStatus { shard: AtomicI64::new(-1), ..Default::default() }
    }

    /// A progress clock for a stage that starts now.
    fn start_stage(&self, name: &'static str) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(now_ms()));
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).push((name, clock.clone()));
        clock
    }

    fn stop_stages(&self) {
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Ready when Redis and MySQL answer, a lease is held, and every stage went round within
    /// `stall_ms` (a stage stuck in a call that never returns turns this red).
    pub fn check(&self, stall_ms: u64) -> Result<(), String> {
        self.deps.get().ok_or("not connected yet")?.check()?;
        let shard = self.shard.load(Ordering::Relaxed);
        if shard < 0 {
            return Err("no shard lease held (standby)".into());
        }
        for (stage, clock) in self.stages.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let idle = now_ms().saturating_sub(clock.load(Ordering::Relaxed));
            if idle > stall_ms {
                return Err(format!("shard {shard}: {stage} stage made no progress for {idle} ms"));
            }
        }
        Ok(())
    }
}

/// Runs until `shutdown` turns true: own a shard, pipeline it, release it on the way out.
pub async fn run(
    cfg: Config,
    choice: ShardChoice,
    status: Arc<WorkerStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    if let ShardChoice::Fixed(s) = choice {
        if s >= cfg.cluster.shards {
            return Err(StartError::Invalid(format!(
                "--shard {s} is out of range: cluster.shards = {}",
                cfg.cluster.shards
            )));
        }
    }
    let keys = Keys::from_config(&cfg);
    let conn = im_common::connections::connect(&cfg.redis).await?;
    let store = Store::connect(&cfg.mysql.url, cfg.mysql.pool_max)?;
    let _ = status.deps.set(Dependencies::watch(conn.clone(), store.clone()));
    let owner = owner_id();
    let ttl = Duration::from_millis(cfg.two_phase.lease_ttl_ms);
    let mut first = rand::random::<u16>();
    while !*shutdown.borrow() {
        let lease = match acquire(&conn, &keys, &cfg, choice, &owner, ttl, first).await {
            Some(lease) => lease,
            None => {
                // Standby: someone owns it (or Redis is away). Look again soon: a released lease should
                // be taken within a fraction of a second, an expired one well before another TTL.
                tokio::select! {
                    _ = tokio::time::sleep((ttl / 4).min(Duration::from_millis(250))) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        first = lease.shard;
        tracing::info!(shard = lease.shard, token = lease.token, %owner, "shard lease acquired");
        status.shard.store(i64::from(lease.shard), Ordering::Relaxed);
        let shard = vec![lease.shard.to_string()];
        im_common::telemetry::register_metrics(&[
            ("im_worker_delivered_total", "shard", shard.clone()),
            ("im_worker_saved_total", "shard", shard.clone()),
            ("im_worker_save_retries_total", "shard", shard.clone()),
            ("im_worker_dead_letters_total", "shard", shard),
        ]);
        metrics::gauge!("im_worker_lease_held", "shard" => lease.shard.to_string()).set(1.0);
        metrics::gauge!("im_worker_fencing_token", "shard" => lease.shard.to_string()).set(lease.token as f64);
        if let Err(e) = own_shard(&cfg, &keys, &conn, &store, lease.clone(), &status, shutdown.clone()).await {
            tracing::warn!(shard = lease.shard, error = %e, "shard run failed");
        }
        lease.release().await;
        metrics::gauge!("im_worker_lease_held", "shard" => lease.shard.to_string()).set(0.0);
        status.shard.store(-1, Ordering::Relaxed);
        tracing::info!(shard = lease.shard, "shard released");
    }
    store.close().await;
    Ok(())
}

/// This process's name as a lease owner and metrics `node` label: `<host>-<pid>`.
pub fn owner_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

async fn acquire(
    conn: &im_common::connections::RedisConn,
    keys: &Keys,
    cfg: &Config,
    choice: ShardChoice,
    owner: &str,
    ttl: Duration,
    start: u16,
) -> Option<ShardLease> {
    let n = cfg.cluster.shards;
    let candidates: Vec<u16> = match choice {
        ShardChoice::Fixed(s) => vec![s],
        ShardChoice::Auto => (0..n).map(|i| (start.wrapping_add(i)) % n).collect(),
    };
    for shard in candidates {
        match ShardLease::acquire(conn, keys, shard, owner, ttl).await {
            Ok(Some(lease)) => return Some(lease),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "lease acquire failed");
                return None;
            }
        }
    }
    None
}

/// Runs the stages of one shard until the lease is lost or shutdown is asked.
async fn own_shard(
    cfg: &Config,
    keys: &Keys,
    conn: &im_common::connections::RedisConn,
    store: &Store,
    lease: ShardLease,
    status: &WorkerStatus,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), redis::RedisError> {
    let tp = &cfg.two_phase;
    let shard = lease.shard;
    let block = Duration::from_millis(tp.block_ms);
    let reader = |key: String, conn, count, delay_ms| {
        let fence = Fence { lease_key: keys.lease(shard), lease_value: lease.value.clone() };
        StreamReader::new(conn, fence, key, tp.group.clone(), count, tp.block_ms, delay_ms)
    };
    let ctx = ShardContext {
        shard,
        shards: cfg.cluster.shards,
        keys: keys.clone(),
        lease: lease.clone(),
        router: Router::new(conn.clone(), keys.clone()),
        mover: Mover {
            conn: conn.clone(),
            keys: keys.clone(),
            shard,
            lease_key: keys.lease(shard),
            lease_value: lease.value.clone(),
            group: tp.group.clone(),
            idempotency_ttl: cfg.idempotency.ttl_secs,
        },
        store: store.clone(),
        progress: Arc::default(),
    };
    // Fail-open saves their gateways have not told Redis about yet (see `fail_open_floors`): the
    // first round before anything is numbered.
    let floors_watch = if tp.fail_open {
        if let Err(e) = fail_open_floors::raise_once(&ctx).await {
            tracing::warn!(shard, error = %e, "raising fail-open floors failed; retrying every poll");
        }
        Some(tokio::spawn(fail_open_floors::watch(ctx.clone())))
    } else {
        None
    };
    // Counters Redis lost are rebuilt from MySQL now, while it may well be up, not at the first
    // message — full mode must push while MySQL is away.
    if ctx
        .until_done(&mut Backoff::default(), "seq counters", || async { ctx.number(&mut [], false).await })
        .await
        .is_none()
    {
        return Ok(());
    }
    let stage = |name| ShardContext { progress: status.start_stage(name), ..ctx.clone() };
    let mut accepted = reader(
        keys.accepted_stream(shard),
        im_common::connections::connect_for_blocking(&cfg.redis, block).await?,
        tp.batch_size,
        tp.max_batch_delay_ms,
    );
    accepted.ensure_group().await?;
    let mut stages = tokio::task::JoinSet::new();
    match cfg.mode() {
        Mode::Full => {
            let mut to_save = reader(
                keys.to_save_stream(shard),
                im_common::connections::connect_for_blocking(&cfg.redis, block).await?,
                save::handed_per_read(tp.batch_size),
                tp.save_batch_delay_ms,
            );
            to_save.ensure_group().await?;
            stages.spawn(deliver::deliver_stage(stage("deliver"), accepted));
            stages.spawn(save::save_stage(stage("save"), to_save, false));
        }
        // Baseline deployments run no workers; if one is started anyway it drains what is there.
        Mode::AcceptedOnly | Mode::Baseline => {
            stages.spawn(save::save_stage(stage("save"), accepted, true));
        }
    }
    let keeper = tokio::spawn(lease.clone().keep_alive());
    let reporter = tokio::spawn(stats::report(conn.clone(), keys.clone(), tp.group.clone(), shard));
    let pruner = (shard == 0).then(|| tokio::spawn(pruning::prune_path_claims(store.clone())));
    tokio::select! {
        // A stage ends on its own only when the lease is gone.
        _ = stages.join_next() => {}
        _ = shutdown.wait_for(|&stop| stop) => {}
    }
    // Stages stop at their next round; the batch in hand still commits (the lease key is ours
    // until `run` releases it after this returns).
    lease.retire();
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while stages.join_next().await.is_some() {} }).await;
    keeper.abort();
    reporter.abort();
    // Once it has ended, so no last round of it sets them again.
    let _ = reporter.await;
    stats::clear(lease.shard);
    for task in [pruner, floors_watch].into_iter().flatten() {
        task.abort();
    }
    status.stop_stages();
    stages.abort_all();
    Ok(())
}
