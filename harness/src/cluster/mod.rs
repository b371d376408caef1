//! A local cluster: gateways and shard workers as real background processes on this machine, on top
//! of Redis and MariaDB (the configured ones, or private ones from [`crate::servers`]).
//!
//! `ops up`, the bench's comparisons, the drills and the end-to-end tests all go through [`start`],
//! so the tests exercise exactly what an operator runs. Processes are detached and log to files under
//! the cluster directory; the state file (`state`) records every endpoint and pid so later commands
//! can find them. Operations on a running cluster that an operator asks for by name (scale, reshard)
//! live in `ops`; the pieces they are made of — start one more gateway or worker, wait until ready,
//! stop — are here.

mod spawn;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use im_common::config::{Config, Mode};

use crate::servers::{ensure_servers_with, RedisWanted, ServerError, REDIS_CLUSTER_MIN_MASTERS};
use crate::{http, poll, process};

pub use spawn::{bin_dir, binary, spawn_dashboard, spawn_gateway, spawn_worker};
pub use state::{is_running, load_state, save_state, ClusterState, DashboardProc, GatewayProc, WorkerProc};

/// Longest wait for one process's `/readyz` to answer 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway or worker gets to stop gracefully before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// The generated config every process of the cluster reads, in the cluster directory.
pub const CONFIG_FILE: &str = "cluster.toml";
/// The state file name `ops up` uses by default (in `.im-local/`).
pub const STATE_FILE: &str = "cluster.json";

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Base configuration (URLs, prefix, secret, limits); mode and shard count are set from below.
    pub config: Config,
    pub gateways: usize,
    pub shards: u16,
    /// Shard-worker processes; more than `shards` leaves standbys.
    pub workers: usize,
    pub mode: Mode,
    /// Directory for the generated config, logs, ready files and private servers.
    pub dir: PathBuf,
    /// Where the state file goes; the cluster's dashboard follows this file.
    pub state_file: PathBuf,
    /// Start private Redis/MariaDB even when the configured ones answer.
    pub force_private: bool,
    /// Run on a Redis Cluster of this many masters: the configured one (`redis.cluster_urls`) when it
    /// is healthy (and `force_private` is false), else a private one in `dir/redis-cluster`. `None`:
    /// one Redis server as always — unless the config names a cluster, which is then used as
    /// configured (and replaced by a private one of as many masters, at least three, when it does not
    /// answer).
    pub redis_cluster: Option<usize>,
}

impl ClusterSpec {
    /// A spec for `mode` under `dir`, with the state file in `dir` and one worker per shard.
    pub fn new(config: Config, mode: Mode, gateways: usize, shards: u16, dir: PathBuf) -> ClusterSpec {
        ClusterSpec {
            config,
            gateways,
            shards,
            workers: shards.into(),
            mode,
            state_file: dir.join(STATE_FILE),
            dir,
            force_private: false,
            redis_cluster: None,
        }
    }

    /// The Redis this spec needs, given the configuration's URLs.
    fn redis_wanted(&self) -> RedisWanted<'_> {
        let redis = &self.config.redis;
        let configured = redis.cluster_urls.len().max(REDIS_CLUSTER_MIN_MASTERS);
        match self.redis_cluster.or((!redis.cluster_urls.is_empty()).then_some(configured)) {
            Some(masters) => RedisWanted::Cluster { urls: &redis.cluster_urls, masters },
            None => RedisWanted::Single { url: &redis.url },
        }
    }
}

/// Why a cluster could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Servers(#[from] ServerError),
    #[error("migrations failed: {0}")]
    Migrate(#[from] im_common::store::StoreError),
    #[error(transparent)]
    Spawn(#[from] process::SpawnError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0} did not become ready within {1:?}; see its log {2}")]
    NotReady(String, Duration, PathBuf),
    #[error("binary {0} not found next to this executable (build the workspace first, or set IM_BIN_DIR)")]
    MissingBinary(PathBuf),
    #[error("a cluster is already running (state file {0}); run `ops down` first")]
    AlreadyRunning(PathBuf),
    #[error("bad state file {0}: {1}")]
    BadState(PathBuf, String),
}

/// Starts servers (if needed), migrations, gateways, workers and the dashboard; returns when all are
/// ready, with the state file written.
pub async fn start(spec: &ClusterSpec) -> Result<ClusterState, ClusterError> {
    let io = |what: String| move |source| ClusterError::Io { what, source };
    std::fs::create_dir_all(&spec.dir).map_err(io(format!("create {}", spec.dir.display())))?;
    let dir = spec.dir.canonicalize().map_err(io("resolve the cluster directory".into()))?;
    let mut cfg = spec.config.clone();
    let servers = ensure_servers_with(spec.redis_wanted(), &cfg.mysql.url, &dir, spec.force_private).await?;
    let db = mysql_async::Opts::from_url(&cfg.mysql.url)
        .ok()
        .and_then(|o| o.db_name().map(str::to_owned))
        .unwrap_or_else(|| "im".into());
    cfg.redis.url = servers.redis_url.clone();
    if let Some(redis_cluster) = &servers.redis_cluster {
        cfg.redis.cluster_urls = redis_cluster.urls.clone();
    }
    cfg.mysql.url = format!("{}/{db}", servers.mysql_url.trim_end_matches('/'));
    cfg.set_mode(spec.mode);
    cfg.cluster.shards = spec.shards;

    let config_path = dir.join(CONFIG_FILE);
    // From here on, whatever was started is stopped again if the start does not finish: a failure
    // stops it (private servers included), and so does a start abandoned midway — the future
    // dropped because the command was asked to stop (`process::unless_stopped`).
    let mut starting = Starting(Some(ClusterState {
        gateways: Vec::new(),
        workers: Vec::new(),
        redis_url: cfg.redis.url.clone(),
        mysql_url: cfg.mysql.url.clone(),
        jwt_secret: cfg.auth.jwt_secret.clone(),
        key_prefix: cfg.redis.key_prefix.clone(),
        mode: spec.mode.as_str().into(),
        shards: spec.shards,
        config_path: config_path.clone(),
        dir: dir.clone(),
        private_servers: servers.private.clone(),
        dashboard: None,
        redis_cluster: servers.redis_cluster.clone(),
    }));
    let state = starting.0.as_mut().expect("a cluster being started");
    let started = async {
        im_common::store::migrate(&cfg.mysql.url).await?;
        write_config(&cfg, &config_path)?;
        launch(state, spec).await?;
        // The page is a convenience: a cluster without it is still a working cluster.
        match spawn_dashboard(&dir, &spec.state_file).await {
            Ok(dashboard) => state.dashboard = Some(dashboard),
            Err(e) => eprintln!("warning: the dashboard did not start ({e}); `ops dashboard` serves it by hand"),
        }
        save_state(state, &spec.state_file)
    };
    if let Err(e) = started.await {
        // Stopped gracefully if that works; killed by the guard if not.
        if stop(state).await.is_ok() {
            starting.0 = None;
        }
        return Err(e);
    }
    Ok(starting.0.take().expect("a cluster being started"))
}

/// A cluster whose start has not finished: killed at once if it is dropped (`None` once the start
/// has finished, or stopped it by itself).
struct Starting(Option<ClusterState>);

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state.kill_now();
        }
    }
}

/// Writes the configuration every process of the cluster reads.
pub fn write_config(cfg: &Config, path: &std::path::Path) -> Result<(), ClusterError> {
    let text = toml::to_string(cfg).map_err(|e| ClusterError::BadState(path.to_path_buf(), e.to_string()))?;
    std::fs::write(path, text).map_err(|source| ClusterError::Io { what: format!("write {}", path.display()), source })
}

/// Starts the gateways and (in two-phase modes) the workers of `state`, and waits until all are ready.
async fn launch(state: &mut ClusterState, spec: &ClusterSpec) -> Result<(), ClusterError> {
    for node in 1..=spec.gateways {
        let node = u16::try_from(node)
            .map_err(|_| ClusterError::BadState(spec.state_file.clone(), "too many gateways".into()))?;
        state.gateways.push(spawn_gateway(&state.dir, &state.config_path, node).await?);
    }
    if spec.mode != Mode::Baseline {
        for index in 0..spec.workers.min(spec.shards.into()) {
            let shard = u16::try_from(index).ok();
            state.workers.push(spawn_worker(&state.dir, &state.config_path, index, shard).await?);
        }
        // Standbys only once every shard has its owner: a standby started alongside could take a
        // shard before the worker started for it, which would then never become ready.
        wait_ready(state).await?;
        for index in spec.shards.into()..spec.workers {
            state.workers.push(spawn_worker(&state.dir, &state.config_path, index, None).await?);
        }
    }
    wait_ready(state).await
}

/// Waits until every gateway and every worker assigned a shard answers `/readyz` with 200.
pub async fn wait_ready(state: &ClusterState) -> Result<(), ClusterError> {
    let gateways = state.gateways.iter().map(|g| (&g.metrics_url, &g.log));
    let workers = state.workers.iter().filter(|w| w.shard.is_some()).map(|w| (&w.metrics_url, &w.log));
    for (metrics_url, log) in gateways.chain(workers) {
        let url = metrics_url.replace("/metrics", "/readyz");
        let ready =
            poll::until_true_async(READY_TIMEOUT, || async { matches!(http::get(&url).await, Ok((200, _))) }).await;
        if !ready {
            return Err(ClusterError::NotReady(url, READY_TIMEOUT, log.clone()));
        }
    }
    Ok(())
}

/// Stops every process of the cluster (SIGTERM, SIGKILL after [`STOP_GRACE`]), then the private
/// servers it started (a private Redis Cluster's nodes included).
pub async fn stop(state: &ClusterState) -> Result<(), ClusterError> {
    futures_util::future::join_all(state.process_pids().into_iter().map(|pid| process::terminate(pid, STOP_GRACE)))
        .await;
    for server in &state.private_servers {
        server.stop().await?;
    }
    if let Some(redis_cluster) = &state.redis_cluster {
        redis_cluster.stop().await?;
    }
    Ok(())
}
