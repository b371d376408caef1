//! What a running cluster is made of, as recorded in its JSON state file: every process with its
//! endpoints, pid and log, the servers, and the shared settings clients need (JWT secret, key prefix,
//! mode, shard count). `ops down`, `ops status`, the dashboard, `bench` and the drills find a cluster
//! through this file, and a guard that cleans up after a test reads it to learn what was added later.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use im_common::config::Config;

use super::ClusterError;
use crate::process;
use crate::servers::{PrivateServer, RedisClusterInUse};

/// A running gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayProc {
    pub node_id: u16,
    pub ws_url: String,
    pub http_url: String,
    pub metrics_url: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// A running shard worker (`shard` is the one it was asked to own; standbys wait for any).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerProc {
    pub shard: Option<u16>,
    pub metrics_url: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// The live backlog page (`ops dashboard`) started with a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DashboardProc {
    /// The page, e.g. `http://127.0.0.1:41234/`.
    pub url: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// Everything about a running cluster; written as JSON to the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub gateways: Vec<GatewayProc>,
    pub workers: Vec<WorkerProc>,
    pub redis_url: String,
    pub mysql_url: String,
    pub jwt_secret: String,
    pub key_prefix: String,
    pub mode: String,
    pub shards: u16,
    pub config_path: PathBuf,
    pub dir: PathBuf,
    /// Servers this cluster started itself (drills may stop and restart only these).
    pub private_servers: Vec<PrivateServer>,
    /// The live backlog page (`ops dashboard`), when it started.
    #[serde(default)]
    pub dashboard: Option<DashboardProc>,
    /// The Redis Cluster the cluster runs on (`redis.cluster_urls`), with its nodes when it is a
    /// private one this cluster started (stopped with it); `None` on one Redis server (`redis_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster: Option<RedisClusterInUse>,
}

impl ClusterState {
    /// The pids of the cluster's own processes: gateways, workers and the dashboard (not servers).
    pub fn process_pids(&self) -> Vec<u32> {
        let gateways = self.gateways.iter().map(|g| g.pid);
        let workers = self.workers.iter().map(|w| w.pid);
        gateways.chain(workers).chain(self.dashboard.iter().map(|d| d.pid)).collect()
    }

    /// The cluster's own config file, as its processes read it: they are launched without `IM__*`
    /// overrides (the launcher clears them), so the caller's environment must not apply here either.
    pub fn config(&self) -> Result<Config, ClusterError> {
        Config::load_with_env(Some(&self.config_path), std::iter::empty())
            .map_err(|e| ClusterError::BadState(self.config_path.clone(), e.to_string()))
    }

    /// Whether any gateway or worker of the cluster still runs.
    pub fn any_running(&self) -> bool {
        self.gateways.iter().map(|g| g.pid).chain(self.workers.iter().map(|w| w.pid)).any(process::is_alive)
    }

    /// SIGKILLs every process of the cluster, private servers (and private Redis Cluster nodes)
    /// included, without waiting: the way out after an error, a panic or Ctrl-C.
    pub fn kill_now(&self) {
        for pid in self.process_pids() {
            process::kill_now(pid);
        }
        for server in &self.private_servers {
            server.kill();
        }
        if let Some(redis_cluster) = &self.redis_cluster {
            redis_cluster.kill();
        }
    }
}

/// Writes the state file (through a temporary file and a rename, so readers never see half of it).
pub fn save_state(state: &ClusterState, path: &Path) -> Result<(), ClusterError> {
    let json = serde_json::to_string_pretty(state).map_err(|e| ClusterError::BadState(path.into(), e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| ClusterError::Io { what, source }
    };
    std::fs::write(&tmp, json).map_err(io("write"))?;
    std::fs::rename(&tmp, path).map_err(io("rename into"))
}

/// Reads the state file.
pub fn load_state(path: &Path) -> Result<ClusterState, ClusterError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ClusterError::Io { what: format!("read {}", path.display()), source })?;
    serde_json::from_str(&text).map_err(|e| ClusterError::BadState(path.into(), e.to_string()))
}

/// Whether the cluster recorded in `path` still has a live process.
pub fn is_running(path: &Path) -> bool {
    load_state(path).is_ok_and(|s| s.any_running())
}
