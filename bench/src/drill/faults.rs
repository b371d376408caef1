//! Injecting a drill's fault into its cluster: stop or kill a private server (on a private Redis
//! Cluster, every node of it) and start it again,
//! kill shard owners and replace them, stop and restart a gateway, pause a process (SIGSTOP) and
//! resume it — always only what the drill's own cluster started, and every replacement recorded in
//! the run's state file. Each mechanism exists once here; the single-fault drills and the chaos drill
//! (`chaos`) both call these.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use im_harness::cluster::{self, ClusterState};
use im_harness::process::{self, Signal};
use im_harness::servers::{redis_cluster_ready, PrivateServer, RedisOptions, ServerError};
use im_harness::{metrics, poll};

use super::session::DrillRun;
use super::{Check, Drill, DrillCluster, StopSignal};
use crate::BenchError;

/// worker-kill: pause before looking for a shard owner again when none holds a lease right now.
const OWNER_RETRY: Duration = Duration::from_millis(200);
/// How long a stopped or killed process gets to be gone before it is started again.
const GONE_WAIT: Duration = Duration::from_secs(10);
/// How long a Redis Cluster whose nodes were all restarted gets to be whole again.
const CLUSTER_WHOLE_WAIT: Duration = Duration::from_secs(30);

/// When the fault began and ended.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultWindow {
    pub began: Instant,
    pub ended: Instant,
}

impl DrillRun<'_> {
    /// Injects the drill's fault; returns when it is over (the instant the fault ended).
    pub async fn inject(&mut self, checks: &mut Vec<Check>) -> Result<FaultWindow, BenchError> {
        let spec = self.spec;
        let state = &self.cluster;
        let began = Instant::now();
        match spec.drill {
            Drill::DbOutage => {
                let db = stop_server(state, "mariadb", false).await?;
                eprintln!("[{}] MariaDB stopped for {:?}", self.load.label, spec.fault);
                tokio::time::sleep(spec.fault).await;
                restart_server(state, db, None).await?;
                eprintln!("[{}] MariaDB back", self.load.label);
            }
            Drill::RedisOutage => {
                let redis = stop_redis(state, false).await?;
                eprintln!("[{}] {redis} stopped for {:?}", self.load.label, spec.fault);
                tokio::time::sleep(spec.fault).await;
                restart_redis(state, redis, None).await?;
                eprintln!("[{}] {redis} back", self.load.label);
            }
            Drill::RedisRestart => {
                // A crash, not a shutdown: what the AOF fsync policy promises is about exactly this.
                let old = redis_appendfsync(&state.snapshot());
                let redis = stop_redis(state, true).await?;
                eprintln!("[{}] {redis} killed (SIGKILL), restarting", self.load.label);
                restart_redis(state, redis, spec.appendfsync.as_deref()).await?;
                let policy = spec.appendfsync.clone().or(old).unwrap_or_else(|| "unknown".into());
                self.notes.push(match policy.as_str() {
                    "always" => "appendfsync always: every write is fsynced before Redis answers, so nothing \
                                 that got ACK(accepted) may be lost by a Redis crash (checked: lost = 0)"
                        .to_owned(),
                    "everysec" => "appendfsync everysec: up to about one second of accepted writes may be lost by a \
                                   Redis crash (SPEC §3.1); lost > 0 here is the policy's documented cost"
                        .to_owned(),
                    other => format!("appendfsync {other}: the OS decides when to flush; no durability promise"),
                });
            }
            Drill::WorkerKill | Drill::RecipientChurn => {
                // recipient-churn: the receivers come and go by themselves (the load's churn); the
                // drill kills shard owners under them.
                let until = began + spec.fault;
                let mut kills = 0;
                while Instant::now() < until {
                    let Some(victim) = shard_owner(state, kills).await else {
                        tokio::time::sleep(OWNER_RETRY).await;
                        continue;
                    };
                    kill_worker_and_replace(state, victim).await?;
                    kills += 1;
                    eprintln!("[{}] killed a shard owner (kill {kills})", self.load.label);
                    tokio::time::sleep(spec.kill_every.min(until.saturating_duration_since(Instant::now()))).await;
                }
                checks.push(Check::new(
                    "owners_killed",
                    kills > 0,
                    format!("{kills} shard owners killed with SIGKILL"),
                ));
            }
            Drill::GatewayRestart => {
                let node = restart_gateway(state, 0, spec.signal, spec.fault).await?;
                eprintln!("[{}] gateway {node} stopped ({:?}) and started again", self.load.label, spec.signal);
            }
            Drill::SlowConsumers | Drill::Overload => {
                // The load is the fault: watch it for its window.
                tokio::time::sleep(self.load.duration).await;
            }
            Drill::Chaos => self.chaos(checks).await?,
        }
        Ok(FaultWindow { began, ended: Instant::now() })
    }
}

/// Stops gateway `index` (SIGKILL, or SIGTERM with a grace), leaves it down for `downtime`, and
/// starts it again with the same node id; returns the node id.
pub(super) async fn restart_gateway(
    state: &DrillCluster,
    index: usize,
    signal: StopSignal,
    downtime: Duration,
) -> Result<u16, BenchError> {
    let gw = state.snapshot().gateways[index].clone();
    match signal {
        StopSignal::Kill => {
            process::send(gw.pid, Signal::SIGKILL).map_err(|e| BenchError::InvalidSpec(e.to_string()))?;
            process::wait_gone(gw.pid, GONE_WAIT).await;
        }
        StopSignal::Term => process::terminate(gw.pid, cluster::STOP_GRACE).await,
    }
    tokio::time::sleep(downtime).await;
    let (dir, config) = {
        let s = state.snapshot();
        (s.dir.clone(), s.config_path.clone())
    };
    let fresh = cluster::spawn_gateway(&dir, &config, gw.node_id).await?;
    state.update(|s| s.gateways[index] = fresh)?;
    Ok(gw.node_id)
}

/// SIGSTOPs `pid` for `length`, then SIGCONTs it — also when the drill is dropped halfway, so a
/// paused process is never left behind.
pub(super) async fn pause_process(pid: u32, length: Duration) -> Result<(), BenchError> {
    /// Resumes the process when dropped.
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            if let Err(error) = process::send(self.0, Signal::SIGCONT) {
                eprintln!("could not resume pid {}: {error}", self.0);
            }
        }
    }
    let resume = Resume(pid);
    process::send(pid, Signal::SIGSTOP).map_err(|e| BenchError::InvalidSpec(e.to_string()))?;
    tokio::time::sleep(length).await;
    drop(resume);
    Ok(())
}

/// Starts a standby in place of every worker that is no longer running (killed by a fault, or gone
/// on its own); returns the indexes replaced.
pub(super) async fn replace_dead_workers(state: &DrillCluster) -> Result<Vec<usize>, BenchError> {
    let snapshot = state.snapshot();
    let mut replaced = Vec::new();
    for (index, w) in snapshot.workers.iter().enumerate() {
        if process::is_alive(w.pid) {
            continue;
        }
        let fresh =
            cluster::spawn_worker(&snapshot.dir, &snapshot.config_path, next_worker_serial(&snapshot.dir), None)
                .await?;
        state.update(|s| s.workers[index] = fresh)?;
        replaced.push(index);
    }
    Ok(replaced)
}

/// The Redis a fault took down: the cluster's private Redis server (its index among the private
/// servers), or every node of its private Redis Cluster (how many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RedisDown {
    Server(usize),
    ClusterNodes(usize),
}

impl std::fmt::Display for RedisDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisDown::Server(_) => write!(f, "Redis"),
            RedisDown::ClusterNodes(nodes) => write!(f, "Redis Cluster ({nodes} nodes)"),
        }
    }
}

/// The `appendfsync` policy the cluster's private Redis runs with (its first node's on a Redis
/// Cluster; `None` when it is not known or not private).
pub(super) fn redis_appendfsync(state: &ClusterState) -> Option<String> {
    match &state.redis_cluster {
        Some(redis_cluster) => redis_cluster.nodes.first()?.appendfsync.clone(),
        None => state.private_servers.iter().find(|s| s.kind_name == "redis")?.appendfsync.clone(),
    }
}

/// Stops (`kill`: SIGKILL, else a graceful stop) the cluster's private Redis: its one server, or on a
/// Redis Cluster every node. A configured (shared) Redis Cluster is refused.
pub(super) async fn stop_redis(state: &DrillCluster, kill: bool) -> Result<RedisDown, BenchError> {
    let Some(redis_cluster) = state.snapshot().redis_cluster else {
        return stop_server(state, "redis", kill).await.map(RedisDown::Server);
    };
    if redis_cluster.nodes.is_empty() {
        return Err(BenchError::InvalidSpec(
            "the cluster runs on a configured Redis Cluster, not a private one: a drill never touches shared servers"
                .into(),
        ));
    }
    if kill {
        redis_cluster.kill();
    } else {
        redis_cluster.stop().await.map_err(cluster::ClusterError::from)?;
    }
    Ok(RedisDown::ClusterNodes(redis_cluster.nodes.len()))
}

/// Starts the Redis that [`stop_redis`] took down again (with `appendfsync` if given) and records the
/// new pids; on a Redis Cluster, node by node, then waits until the cluster is whole again (every
/// node `cluster_state:ok`, every slot served).
pub(super) async fn restart_redis(
    state: &DrillCluster,
    down: RedisDown,
    appendfsync: Option<&str>,
) -> Result<(), BenchError> {
    if let RedisDown::Server(index) = down {
        return restart_server(state, index, appendfsync).await;
    }
    let Some(redis_cluster) = state.snapshot().redis_cluster else {
        return Err(BenchError::InvalidSpec("the cluster no longer records a Redis Cluster".into()));
    };
    for (index, node) in redis_cluster.nodes.iter().enumerate() {
        let fresh = restart_private(node, appendfsync).await.map_err(cluster::ClusterError::from)?;
        // Recorded at once, so a failure with the next node still leaves this one to the guard.
        state.update(|s| {
            if let Some(node) = s.redis_cluster.as_mut().and_then(|c| c.nodes.get_mut(index)) {
                *node = fresh;
            }
        })?;
    }
    let urls = &redis_cluster.urls;
    if poll::until_true_async(CLUSTER_WHOLE_WAIT, || async { redis_cluster_ready(urls).await.is_ok() }).await {
        return Ok(());
    }
    match redis_cluster_ready(urls).await {
        Ok(()) => Ok(()),
        Err(e) => Err(BenchError::InvalidSpec(format!(
            "the Redis Cluster was not whole {CLUSTER_WHOLE_WAIT:?} after its nodes restarted: {e}"
        ))),
    }
}

/// Index of the cluster's private server of `kind`.
fn server_index(state: &DrillCluster, kind: &str) -> Result<usize, BenchError> {
    state.snapshot().private_servers.iter().position(|s| s.kind_name == kind).ok_or_else(|| {
        BenchError::InvalidSpec(format!("the cluster has no private {kind} server: a drill never touches shared ones"))
    })
}

/// Stops (`kill`: SIGKILL, else a graceful stop) the cluster's private server of `kind`; returns its index.
pub(super) async fn stop_server(state: &DrillCluster, kind: &str, kill: bool) -> Result<usize, BenchError> {
    let index = server_index(state, kind)?;
    let server = state.snapshot().private_servers[index].clone();
    if kill {
        server.kill();
    } else {
        server.stop().await.map_err(cluster::ClusterError::from)?;
    }
    Ok(index)
}

/// Starts the stopped server `index` again (Redis with `appendfsync` if given) and records its new pid.
pub(super) async fn restart_server(
    state: &DrillCluster,
    index: usize,
    appendfsync: Option<&str>,
) -> Result<(), BenchError> {
    let server = state.snapshot().private_servers[index].clone();
    let fresh = restart_private(&server, appendfsync).await.map_err(cluster::ClusterError::from)?;
    state.update(|s| s.private_servers[index] = fresh)
}

/// Starts a stopped private server again on its port and directory; a Redis (a cluster node keeps its
/// bus port) with `appendfsync` instead of its own policy if given.
async fn restart_private(server: &PrivateServer, appendfsync: Option<&str>) -> Result<PrivateServer, ServerError> {
    match appendfsync {
        Some(policy) if server.kind_name == "redis" => {
            poll::until_true(GONE_WAIT, || !server.is_running()).await;
            let options = RedisOptions { appendfsync: policy.into(), cluster_bus_port: server.cluster_bus_port };
            PrivateServer::start_redis_with(&server.dir, server.port, &options).await
        }
        _ => server.restart().await,
    }
}

/// The index (in the state's worker list) of a worker that holds a shard lease now; the `turn`-th
/// such worker in round robin, so kills spread over shards.
async fn shard_owner(state: &DrillCluster, turn: usize) -> Option<usize> {
    let owners = shard_owners(state).await;
    (!owners.is_empty()).then(|| owners[turn % owners.len()])
}

/// The indexes (in the state's worker list, ascending) of the workers that hold a shard lease now.
pub(super) async fn shard_owners(state: &DrillCluster) -> Vec<usize> {
    let workers = state.snapshot().workers;
    let mut owners = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let Ok(samples) = metrics::scrape(&w.metrics_url).await else { continue };
        if samples.iter().any(|s| s.name == "im_worker_lease_held" && s.value == 1.0) {
            owners.push(i);
        }
    }
    owners
}

/// `kill -9` worker `index` and start a standby in its place, so the pool never runs dry.
pub(super) async fn kill_worker_and_replace(state: &DrillCluster, index: usize) -> Result<(), BenchError> {
    let (victim, dir, config, serial) = {
        let s = state.snapshot();
        (s.workers[index].pid, s.dir.clone(), s.config_path.clone(), next_worker_serial(&s.dir))
    };
    process::send(victim, Signal::SIGKILL).map_err(|e| BenchError::InvalidSpec(e.to_string()))?;
    let fresh = cluster::spawn_worker(&dir, &config, serial, None).await?;
    state.update(|s| s.workers[index] = fresh)
}

/// A worker index no earlier worker of this cluster used (its log and ready file names).
fn next_worker_serial(dir: &Path) -> usize {
    (0..).find(|i| !dir.join(format!("worker-{i}.log")).exists()).unwrap_or(0)
}
