//! A private Redis Cluster: M private Redis servers started as cluster nodes, each in its own
//! directory `<dir>/redis-cluster/<port>`, joined as M masters without replicas by
//! `redis-cli --cluster create`, and ready once every node reports `cluster_state:ok` and the slot
//! map assigns all 16384 slots.
//!
//! The handle ([`PrivateRedisCluster`]) is plain data like a [`PrivateServer`]'s and is recorded in
//! `<dir>/redis-cluster/cluster.json`, so a later process can find and stop it. Asking for a cluster
//! in a directory that has one ([`PrivateRedisCluster::ensure`]) reuses it when it is whole, restarts
//! its nodes on their ports (data and `nodes.conf` kept) when they were stopped, and only replaces it
//! with a new one when neither works. The whole check-or-start runs under an exclusive lock on the
//! directory, so processes that ask at the same time (parallel test binaries) get one cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use im_common::backoff::Backoff;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::dir_lock::lock_dir;
use super::install::{require_binary, REDIS_CLI};
use super::{
    ensure_installed, free_port, redis_cluster_ready, with_port_retries, PrivateServer, RedisOptions, ServerError,
    ServerKind,
};
use crate::{poll, process};

/// Where under a cluster's (or test run's) directory its private Redis Cluster lives.
pub const REDIS_CLUSTER_DIR: &str = "redis-cluster";
/// The AOF fsync policy of private Redis Cluster nodes: `always`, as a standalone private Redis
/// ([`super::PRIVATE_REDIS_APPENDFSYNC`]), so `ACK(accepted)` survives a node's crash — the drills
/// SIGKILL nodes and count every accepted message. (`everysec` lost accepted writes on a SIGKILL
/// when a slow fsync made Redis postpone its AOF write: the cluster redis-restart drill failed so
/// once in CI.)
pub const PRIVATE_REDIS_CLUSTER_APPENDFSYNC: &str = super::PRIVATE_REDIS_APPENDFSYNC;
/// The file in the cluster's directory that records its handle.
const STATE_FILE: &str = "cluster.json";
/// Redis Cluster needs three masters at least; more than a few dozen on one machine is a mistake.
pub const MIN_MASTERS: usize = 3;
/// The most masters [`PrivateRedisCluster::ensure`] starts.
pub const MAX_MASTERS: usize = 32;
/// How long `redis-cli --cluster create` may take (it waits for the nodes to agree).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a joined or restarted cluster gets to report `cluster_state:ok` everywhere.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a caller waits for another process that is starting the cluster in the same directory
/// (it may be installing the packages first).
const LOCK_TIMEOUT: Duration = Duration::from_secs(300);
/// How many lines of a failed `redis-cli` run go into the error.
const OUTPUT_TAIL_LINES: usize = 30;

/// A running private Redis Cluster: its nodes (all masters) and their URLs, in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateRedisCluster {
    pub nodes: Vec<PrivateServer>,
    /// `redis://127.0.0.1:<port>` of every node: what `redis.cluster_urls` takes.
    pub urls: Vec<String>,
}

impl PrivateRedisCluster {
    /// The directory of the cluster that belongs to `parent`: `<parent>/redis-cluster`.
    pub fn dir_in(parent: &Path) -> PathBuf {
        parent.join(REDIS_CLUSTER_DIR)
    }

    /// The cluster recorded under `parent`, whether or not its nodes still run.
    pub fn recorded_in(parent: &Path) -> Option<PrivateRedisCluster> {
        let state = std::fs::read(Self::dir_in(parent).join(STATE_FILE)).ok()?;
        serde_json::from_slice(&state).ok()
    }

    /// Whether every node's process runs (whether they form a healthy cluster is
    /// [`redis_cluster_ready`]'s question).
    pub fn is_running(&self) -> bool {
        !self.nodes.is_empty() && self.nodes.iter().all(PrivateServer::is_running)
    }

    /// A healthy private cluster of `masters` masters under `parent` (in `<parent>/redis-cluster`):
    /// the one recorded there when it is whole or can be restarted, else a new one on free ports,
    /// installing `redis-server` and `redis-cli` first if needed.
    pub async fn ensure(parent: &Path, masters: usize) -> Result<PrivateRedisCluster, ServerError> {
        if !(MIN_MASTERS..=MAX_MASTERS).contains(&masters) {
            return Err(ServerError::InvalidClusterSize { masters, min: MIN_MASTERS, max: MAX_MASTERS });
        }
        let dir = std::path::absolute(Self::dir_in(parent))
            .map_err(|source| ServerError::Io { what: format!("resolving {}", parent.display()), source })?;
        std::fs::create_dir_all(&dir)
            .map_err(|source| ServerError::Io { what: format!("creating {}", dir.display()), source })?;
        let _lock = lock_dir(&dir, LOCK_TIMEOUT).await?;
        install_redis().await?;
        if let Some(recorded) = Self::recorded_in(parent) {
            if recorded.nodes.len() == masters {
                match recorded.revive(&dir).await {
                    Ok(cluster) => return Ok(cluster),
                    Err(error) => {
                        warn!(%error, dir = %dir.display(), "the recorded Redis Cluster cannot be reused; starting a new one")
                    }
                }
            }
            recorded.discard(&dir).await;
        }
        Self::create(&dir, masters).await
    }

    /// Gracefully stops every node (their data and `nodes.conf` stay, so `ensure` can restart them).
    pub async fn stop(&self) -> Result<(), ServerError> {
        join_all(self.nodes.iter().map(PrivateServer::stop)).await.into_iter().collect()
    }

    /// `kill -9` every node; returns at once.
    pub fn kill(&self) {
        self.nodes.iter().for_each(PrivateServer::kill);
    }

    /// The recorded cluster, whole again: running nodes as they are, stopped ones restarted on their
    /// ports; then waits until the cluster is healthy. Nodes restarted here are stopped again when
    /// that fails.
    async fn revive(&self, dir: &Path) -> Result<PrivateRedisCluster, ServerError> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let revived = if node.is_running() { Ok(node.clone()) } else { node.restart().await };
            match revived {
                Ok(revived) => nodes.push(revived),
                Err(error) => {
                    stop_quietly(&nodes).await;
                    return Err(error);
                }
            }
        }
        let cluster = PrivateRedisCluster { nodes, urls: self.urls.clone() };
        if let Err(error) = cluster.wait_ready(dir).await.and_then(|()| cluster.save(dir)) {
            stop_quietly(&cluster.nodes).await;
            return Err(error);
        }
        info!(dir = %dir.display(), urls = %cluster.urls.join(","), "private Redis Cluster reused");
        Ok(cluster)
    }

    /// Stops a recorded cluster that is not reused and removes its nodes' directories and its state
    /// file: a new cluster uses new ports, and stale node directories would only accumulate.
    async fn discard(&self, dir: &Path) {
        stop_quietly(&self.nodes).await;
        for node in &self.nodes {
            // Only directories inside the cluster's own: a hand-edited state file cannot make this
            // remove anything else.
            if node.dir.starts_with(dir) && node.dir != dir {
                let _ = std::fs::remove_dir_all(&node.dir);
            }
        }
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
    }

    /// Starts `masters` new nodes under `dir`, joins them, waits until the cluster is healthy and
    /// records it. Whatever was started is stopped again when a step fails.
    async fn create(dir: &Path, masters: usize) -> Result<PrivateRedisCluster, ServerError> {
        let ports = distinct_free_ports(2 * masters);
        // A node whose port was taken meanwhile moves to a fresh pair (its bus port too).
        let starts = ports.chunks_exact(2).map(|pair| {
            with_port_retries(pair[0], |port| {
                start_node(dir, port, if port == pair[0] { pair[1] } else { free_port() })
            })
        });
        // Nodes up while others still start, or while they are joined: killed if the start is
        // abandoned (they are recorded only as a cluster, at the end).
        let started = process::Unready::default();
        let group = &started;
        let starts = starts.map(|start| async move {
            let node = start.await?;
            group.add(node.pid);
            Ok::<_, ServerError>(node)
        });
        let (nodes, errors): (Vec<_>, Vec<_>) = join_all(starts).await.into_iter().partition(Result::is_ok);
        let nodes: Vec<PrivateServer> = nodes.into_iter().filter_map(Result::ok).collect();
        if let Some(Err(error)) = errors.into_iter().next() {
            stop_quietly(&nodes).await;
            return Err(error);
        }
        let cluster = PrivateRedisCluster { urls: nodes.iter().map(|n| n.url.clone()).collect(), nodes };
        let joined = async {
            cluster.join().await?;
            cluster.wait_ready(dir).await?;
            cluster.save(dir)
        };
        if let Err(error) = joined.await {
            stop_quietly(&cluster.nodes).await;
            return Err(error);
        }
        started.ready();
        info!(dir = %dir.display(), urls = %cluster.urls.join(","), "private Redis Cluster ready");
        Ok(cluster)
    }

    /// `redis-cli --cluster create <nodes> --cluster-replicas 0 --cluster-yes`: assigns the slots in
    /// equal contiguous ranges, one per node, and introduces the nodes to each other.
    async fn join(&self) -> Result<(), ServerError> {
        let cli = require_binary(&REDIS_CLI)?;
        let addrs: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut command = tokio::process::Command::new(&cli);
        command.arg("--cluster").arg("create").args(&addrs).args(["--cluster-replicas", "0", "--cluster-yes"]);
        command.stdin(Stdio::null()).kill_on_drop(true);
        let command_line = format!("redis-cli --cluster create {} --cluster-replicas 0 --cluster-yes", addrs.join(" "));
        let failed = |status: String, output: &str| ServerError::ClusterCreate {
            command: command_line.clone(),
            status,
            output_tail: tail(output, OUTPUT_TAIL_LINES),
        };
        let output = match tokio::time::timeout(CREATE_TIMEOUT, command.output()).await {
            Err(_) => return Err(failed(format!("no result within {CREATE_TIMEOUT:?}"), "")),
            Ok(Err(source)) => return Err(ServerError::Spawn { binary: cli.display().to_string(), source }),
            Ok(Ok(output)) => output,
        };
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        // redis-cli reports some refusals (a node that is not empty) with exit status 0 as well.
        if output.status.success() && !said.contains("[ERR]") {
            return Ok(());
        }
        Err(failed(output.status.to_string(), &said))
    }

    /// Polls until every node reports `cluster_state:ok` and all slots are assigned. A node that dies
    /// meanwhile is reported with its log tail.
    async fn wait_ready(&self, dir: &Path) -> Result<(), ServerError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(poll::FIRST_PAUSE, poll::MAX_PAUSE);
        loop {
            let last_error = match redis_cluster_ready(&self.urls).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if let Some(dead) = self.nodes.iter().find(|node| !node.is_running()) {
                let kind = ServerKind::Redis.name();
                return Err(ServerError::Exited { kind, port: dead.port, log_tail: dead.log_tail() });
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(ServerError::ClusterNotReady { dir: dir.to_path_buf(), waited: READY_TIMEOUT, last_error });
            }
            backoff.wait().await;
        }
    }

    /// Records the handle in `dir/cluster.json` (through a temporary file and a rename).
    fn save(&self, dir: &Path) -> Result<(), ServerError> {
        let path = dir.join(STATE_FILE);
        let io = |what: &str, source| ServerError::Io { what: format!("{what} {}", path.display()), source };
        let json = serde_json::to_vec_pretty(self).map_err(|e| io("encoding", std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("renaming into", e))
    }
}

/// Installs `redis-server` and `redis-cli` if they are missing (blocking, so on a blocking thread).
async fn install_redis() -> Result<(), ServerError> {
    tokio::task::spawn_blocking(|| ensure_installed(ServerKind::Redis)).await.map_err(|error| {
        ServerError::InstallFailed {
            command: "ensure_installed(redis)".into(),
            status: "task failed".into(),
            output_tail: error.to_string(),
        }
    })?
}

/// Starts one cluster node on `port` (bus on `bus_port`) in `dir/<port>`. A directory left there by
/// an earlier cluster that used the same port is cleared first: its `nodes.conf` would make the new
/// node believe it already belongs to that cluster.
async fn start_node(dir: &Path, port: u16, bus_port: u16) -> Result<PrivateServer, ServerError> {
    let node_dir = dir.join(port.to_string());
    if node_dir.exists() && PrivateServer::running_in(&node_dir).is_none() {
        std::fs::remove_dir_all(&node_dir)
            .map_err(|source| ServerError::Io { what: format!("clearing {}", node_dir.display()), source })?;
    }
    let options = RedisOptions::cluster_node(PRIVATE_REDIS_CLUSTER_APPENDFSYNC, bus_port);
    PrivateServer::start_redis_with(&node_dir, port, &options).await
}

/// `count` different free ports.
fn distinct_free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    while ports.len() < count {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// Stops `nodes`, logging (not returning) what fails: the caller is already on an error path.
async fn stop_quietly(nodes: &[PrivateServer]) {
    for (node, result) in nodes.iter().zip(join_all(nodes.iter().map(PrivateServer::stop)).await) {
        if let Err(error) = result {
            warn!(%error, pid = node.pid, port = node.port, "could not stop a Redis Cluster node");
        }
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fewer_than_three_masters_is_refused_before_anything_starts() {
        let dir = std::env::temp_dir().join(format!("im-redis-cluster-size-{:08x}", rand::random::<u32>()));
        let error = PrivateRedisCluster::ensure(&dir, 2).await.unwrap_err();
        assert!(matches!(error, ServerError::InvalidClusterSize { masters: 2, .. }), "{error}");
        assert!(!dir.exists(), "nothing was created");
    }

    #[test]
    fn free_ports_for_a_cluster_are_all_different() {
        let ports = distinct_free_ports(8);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{ports:?}");
    }
}
