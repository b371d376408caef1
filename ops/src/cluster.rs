//! A local cluster: gateways and shard workers as real background processes on this machine, on top
//! of Redis and MariaDB (the configured ones, or private ones from [`crate::servers`]).
//!
//! `ops up` and the end-to-end tests both go through [`start`], so the tests exercise exactly what an
//! operator runs. Processes are detached (own session) and log to files under the state directory; a
//! JSON state file records every endpoint and pid so `ops down`, `bench` and drills can find them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dashboard::DashboardProc;
use crate::servers::{ensure_servers, PrivateServer, ServerError};
use im_common::config::{Config, Mode};

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
    /// Start private Redis/MariaDB even when the configured ones answer.
    pub force_private: bool,
}

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
}

/// Why a cluster could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Servers(#[from] ServerError),
    #[error("migrations failed: {0}")]
    Migrate(#[from] im_common::store::StoreError),
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

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Where the `gateway` and `shard-worker` binaries are: `IM_BIN_DIR`, else next to the running
/// executable (for test executables in `target/<profile>/deps`, its parent).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or(dir);
    }
    dir
}

/// Starts servers (if needed), migrations, gateways and workers; returns when all are ready.
pub async fn start(spec: &ClusterSpec) -> Result<ClusterState, ClusterError> {
    std::fs::create_dir_all(&spec.dir).map_err(io_err(format!("create {}", spec.dir.display())))?;
    let dir = spec.dir.canonicalize().map_err(io_err("resolve state dir"))?;
    let mut cfg = spec.config.clone();
    let servers = ensure_servers(&cfg.redis.url, &cfg.mysql.url, &dir, spec.force_private).await?;
    let db = mysql_async::Opts::from_url(&cfg.mysql.url)
        .ok()
        .and_then(|o| o.db_name().map(str::to_owned))
        .unwrap_or_else(|| "im".into());
    cfg.redis.url = servers.redis_url.clone();
    cfg.mysql.url = format!("{}/{db}", servers.mysql_url.trim_end_matches('/'));
    cfg.set_mode(spec.mode);
    cfg.cluster.shards = spec.shards;
    im_common::store::migrate(&cfg.mysql.url).await?;

    let config_path = dir.join("cluster.toml");
    let text = toml::to_string(&cfg).map_err(|e| ClusterError::BadState(config_path.clone(), e.to_string()))?;
    std::fs::write(&config_path, text).map_err(io_err("write cluster.toml"))?;

    let mut state = ClusterState {
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
    };
    // Whatever was started before a failure is stopped again, private servers included: a
    // half-started cluster leaks nothing.
    if let Err(e) = launch(&mut state, spec).await {
        let _ = stop(&state).await;
        return Err(e);
    }
    // The page is a convenience: a cluster without it is still a working cluster.
    match crate::dashboard::spawn(&dir) {
        Ok(dashboard) => state.dashboard = Some(dashboard),
        Err(e) => eprintln!("warning: the dashboard did not start ({e}); `ops dashboard` serves it by hand"),
    }
    Ok(state)
}

/// Starts the gateways and (in two-phase modes) the workers of `state`, and waits until all are ready.
async fn launch(state: &mut ClusterState, spec: &ClusterSpec) -> Result<(), ClusterError> {
    for i in 0..spec.gateways {
        state.gateways.push(spawn_gateway(&state.dir, &state.config_path, i as u16 + 1)?);
    }
    if spec.mode != Mode::Baseline {
        for i in 0..spec.workers {
            let shard = (i < usize::from(spec.shards)).then_some(i as u16);
            state.workers.push(spawn_worker(&state.dir, &state.config_path, i, shard)?);
        }
    }
    wait_ready(state).await
}

/// Adds `gateways` gateways and `workers` standby workers (`--shard auto`: they take free or orphaned
/// shards) to a running cluster, and waits until the new gateways are ready.
pub async fn scale(state: &mut ClusterState, gateways: usize, workers: usize) -> Result<(), ClusterError> {
    let mut added = state.clone();
    added.gateways.clear();
    added.workers.clear();
    for _ in 0..gateways {
        let node = state.gateways.iter().map(|g| g.node_id).max().unwrap_or(0) + 1;
        let g = spawn_gateway(&state.dir, &state.config_path, node)?;
        state.gateways.push(g.clone());
        added.gateways.push(g);
    }
    for _ in 0..workers {
        let w = spawn_worker(&state.dir, &state.config_path, state.workers.len(), None)?;
        state.workers.push(w);
    }
    wait_ready(&added).await
}

/// Changes the shard count of a running cluster the safe way (docs/OPERATIONS.md, "Changing the shard
/// count"): stop the gateways so appends pause, wait until every shard's streams are empty, stop the
/// workers, write the new count into the cluster config, then start one worker per new shard and the
/// gateways again under their node ids. Every message appended before the switch is saved before any
/// appended after it, so per-sender order holds even for senders whose shard changes.
pub async fn reshard(state: &mut ClusterState, shards: u16, drain_timeout: Duration) -> Result<(), ClusterError> {
    let config_err =
        |e: im_common::config::ConfigError| ClusterError::BadState(state.config_path.clone(), e.to_string());
    let mut cfg = Config::load(Some(&state.config_path)).map_err(config_err)?;
    let gateways: Vec<GatewayProc> = std::mem::take(&mut state.gateways);
    futures_util::future::join_all(gateways.iter().map(|g| terminate(g.pid, Duration::from_secs(10)))).await;

    // Drained: nothing left in any stream of the old shard count.
    let keys = im_common::keys::Keys::from_config(&cfg);
    let redis_err =
        |e: redis::RedisError| ClusterError::Io { what: "drain check".into(), source: std::io::Error::other(e) };
    let mut redis = im_common::connections::connect(&cfg.redis.url).await.map_err(redis_err)?;
    let started = Instant::now();
    loop {
        let mut pipe = redis::pipe();
        for shard in 0..cfg.cluster.shards {
            pipe.xlen(keys.accepted_stream(shard)).xlen(keys.to_save_stream(shard));
        }
        let lengths: Vec<u64> = pipe.query_async(&mut redis).await.map_err(redis_err)?;
        if lengths.iter().all(|&l| l == 0) {
            break;
        }
        if started.elapsed() > drain_timeout {
            return Err(ClusterError::NotReady("shard drain".into(), drain_timeout, state.dir.clone()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workers: Vec<WorkerProc> = std::mem::take(&mut state.workers);
    futures_util::future::join_all(workers.iter().map(|w| terminate(w.pid, Duration::from_secs(15)))).await;

    cfg.cluster.shards = shards;
    let text = toml::to_string(&cfg).map_err(|e| ClusterError::BadState(state.config_path.clone(), e.to_string()))?;
    std::fs::write(&state.config_path, text).map_err(io_err("write cluster.toml"))?;
    state.shards = shards;
    for shard in 0..shards {
        state.workers.push(spawn_worker(&state.dir, &state.config_path, usize::from(shard), Some(shard))?);
    }
    for g in &gateways {
        state.gateways.push(spawn_gateway(&state.dir, &state.config_path, g.node_id)?);
    }
    wait_ready(state).await
}

/// Starts one more gateway with node id `node` (also used to restart one).
pub fn spawn_gateway(dir: &Path, config: &Path, node: u16) -> Result<GatewayProc, ClusterError> {
    let ready = dir.join(format!("gateway-{node}.ready"));
    let log = dir.join(format!("gateway-{node}.log"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(binary("gateway")?);
    cmd.arg("--config").arg(config).arg("--node-id").arg(node.to_string());
    cmd.arg("--listen").arg("127.0.0.1:0").arg("--ready-file").arg(&ready);
    let pid = spawn_detached(cmd, &log)?;
    let addr = read_ready_addr(&ready, pid, &log)?;
    Ok(GatewayProc {
        node_id: node,
        ws_url: format!("ws://{addr}/ws"),
        http_url: format!("http://{addr}"),
        metrics_url: format!("http://{addr}/metrics"),
        pid,
        log,
    })
}

/// Starts one more shard worker: for `shard`, or a standby that claims any free shard.
pub fn spawn_worker(dir: &Path, config: &Path, index: usize, shard: Option<u16>) -> Result<WorkerProc, ClusterError> {
    let ready = dir.join(format!("worker-{index}.ready"));
    let log = dir.join(format!("worker-{index}.log"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(binary("shard-worker")?);
    cmd.arg("--config").arg(config);
    cmd.arg("--shard").arg(shard.map_or_else(|| "auto".to_owned(), |s| s.to_string()));
    cmd.arg("--listen").arg("127.0.0.1:0").arg("--ready-file").arg(&ready);
    let pid = spawn_detached(cmd, &log)?;
    let addr = read_ready_addr(&ready, pid, &log)?;
    Ok(WorkerProc { shard, metrics_url: format!("http://{addr}/metrics"), pid, log })
}

pub(crate) fn binary(name: &str) -> Result<PathBuf, ClusterError> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::MissingBinary(path))
    }
}

/// Spawns `cmd` in its own session with output appended to `log`, and reaps it in the background so
/// a process that exits while we are alive does not linger as a zombie.
pub(crate) fn spawn_detached(mut cmd: Command, log: &Path) -> Result<u32, ClusterError> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io_err("open log"))?;
    let err = out.try_clone().map_err(io_err("open log"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err(format!("spawn {:?}", cmd.get_program())))?;
    let pid = child.id();
    std::thread::spawn(move || child.wait());
    Ok(pid)
}

pub(crate) fn read_ready_addr(ready: &Path, pid: u32, log: &Path) -> Result<String, ClusterError> {
    let limit = Duration::from_secs(30);
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(text) = std::fs::read_to_string(ready) {
            if let Some(addr) = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["addr"].as_str().map(str::to_owned))
            {
                return Ok(addr);
            }
        }
        if !pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(ClusterError::NotReady(format!("process {pid}"), limit, log.to_path_buf()))
}

/// Polls every process's `/readyz` until all answer 200.
pub async fn wait_ready(state: &ClusterState) -> Result<(), ClusterError> {
    let limit = Duration::from_secs(30);
    let urls = state.gateways.iter().map(|g| (g.metrics_url.replace("/metrics", "/readyz"), &g.log)).chain(
        state
            .workers
            .iter()
            .filter(|w| w.shard.is_some())
            .map(|w| (w.metrics_url.replace("/metrics", "/readyz"), &w.log)),
    );
    for (url, log) in urls {
        let start = Instant::now();
        while http_get(&url).await.map(|(status, _)| status) != Some(200) {
            if start.elapsed() > limit {
                return Err(ClusterError::NotReady(url, limit, log.clone()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET over loopback: (status, body). Enough for readiness and metrics scrapes.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host)).await.ok()?.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Whether a process exists and has not exited (a zombie waiting for its reaper counts as gone:
/// detached processes are reaped by init, which may take a moment).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if pid <= 1 || unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// SIGTERM to `pid`, then SIGKILL if it is still there after `grace`.
pub async fn terminate(pid: u32, grace: Duration) {
    // SAFETY: sending a signal to a pid we started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while pid_alive(pid) && start.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if pid_alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        while pid_alive(pid) && start.elapsed() < grace + Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn stop_processes(state: &ClusterState) {
    let pids = state.gateways.iter().map(|g| g.pid).chain(state.workers.iter().map(|w| w.pid));
    let pids = pids.chain(state.dashboard.iter().map(|d| d.pid));
    futures_util::future::join_all(pids.map(|pid| terminate(pid, Duration::from_secs(10)))).await;
}

/// Stops every process of the cluster, then the private servers it started.
pub async fn stop(state: &ClusterState) -> Result<(), ClusterError> {
    stop_processes(state).await;
    for server in &state.private_servers {
        server.stop().await?;
    }
    Ok(())
}

/// Writes the state file.
pub fn save_state(state: &ClusterState, path: &Path) -> Result<(), ClusterError> {
    let json = serde_json::to_string_pretty(state).map_err(|e| ClusterError::BadState(path.into(), e.to_string()))?;
    std::fs::write(path, json).map_err(io_err(format!("write {}", path.display())))
}

/// Reads the state file.
pub fn load_state(path: &Path) -> Result<ClusterState, ClusterError> {
    let text = std::fs::read_to_string(path).map_err(io_err(format!("read {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ClusterError::BadState(path.into(), e.to_string()))
}

/// Whether the cluster recorded in `path` still has a live process.
pub fn is_running(path: &Path) -> bool {
    load_state(path)
        .is_ok_and(|s| s.gateways.iter().map(|g| g.pid).chain(s.workers.iter().map(|w| w.pid)).any(pid_alive))
}

/// A cluster owned by a test: stopped (processes killed, private servers stopped) when dropped.
pub struct TestCluster {
    pub state: ClusterState,
}

impl TestCluster {
    /// Starts a cluster for a test.
    pub async fn start(spec: &ClusterSpec) -> Result<TestCluster, ClusterError> {
        Ok(TestCluster { state: start(spec).await? })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let pids = self.state.gateways.iter().map(|g| g.pid).chain(self.state.workers.iter().map(|w| w.pid));
        for pid in pids.chain(self.state.dashboard.iter().map(|d| d.pid)) {
            // SAFETY: killing processes this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        for server in &self.state.private_servers {
            server.kill();
        }
        // Keep the logs of a failed test for whoever reads its output.
        if std::thread::panicking() {
            eprintln!("cluster logs kept in {}", self.state.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.state.dir);
        }
    }
}
