//! Real Redis and MariaDB servers for local clusters, test runs and fault drills.
//!
//! The two README commands (`ops up` and the test command) have to work on a fresh machine, where
//! no Redis or MySQL may be listening on the configured ports. So when the configured servers do not
//! answer, this module installs the packages if it can and starts *private* servers: each one lives
//! in its own directory, listens on 127.0.0.1 only, and runs in its own session so it outlives the
//! `ops up` process that started it. Fault drills get the same handles and stop, `kill -9` and
//! restart them freely — a private server is never shared, so a drill never disturbs a server that
//! somebody else relies on.
//!
//! A private server's handle ([`PrivateServer`]) is plain data (kind, port, pid, directory, URL) and
//! is also written to `<dir>/server.json`, so a later process (`ops down`, a drill) can find and stop
//! what an earlier one started, and a second start in the same directory is refused instead of two
//! servers writing the same data files.
//!
//! A private Redis Cluster ([`PrivateRedisCluster`]) is M such Redis servers started as cluster
//! nodes, joined with `redis-cli --cluster create`, and recorded together in
//! `<dir>/redis-cluster/cluster.json`; a second start there reuses the running cluster.
//!
//! The pieces: `probe` asks whether a server answers, `cluster_probe` whether a Redis Cluster is
//! whole (and which master holds which slots), `install` brings the programs, `redis` and `mariadb`
//! start one of each kind, `redis_cluster` joins Redis nodes into a cluster, `ensure` puts it
//! together ([`ensure_servers`], [`ensure_servers_with`]); this module holds the handle and what every
//! kind shares (stop, kill, restart, readiness).

mod cluster_probe;
mod dir_lock;
mod ensure;
mod install;
mod mariadb;
mod probe;
mod redis;
mod redis_cluster;

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use im_common::backoff::Backoff;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::poll;
use crate::process::{self, Signal};

pub use self::redis::{RedisOptions, CLUSTER_NODE_TIMEOUT_MS};
pub(crate) use cluster_probe::info_field;
pub use cluster_probe::{
    cluster_masters, cluster_slots, holdings, node_connection, redis_cluster_ready, ClusterProbeError, SlotRange,
    CLUSTER_SLOTS,
};
pub use ensure::{
    ensure_redis_cluster, ensure_servers, ensure_servers_with, EnsuredServers, RedisClusterInUse, RedisWanted,
};
pub use install::ensure_installed;
pub use probe::{free_port, mysql_reachable, mysql_server_url, redis_reachable, with_port_retries};
pub use redis_cluster::{
    PrivateRedisCluster, MAX_MASTERS as REDIS_CLUSTER_MAX_MASTERS, MIN_MASTERS as REDIS_CLUSTER_MIN_MASTERS,
    PRIVATE_REDIS_CLUSTER_APPENDFSYNC, REDIS_CLUSTER_DIR,
};

/// A graceful stop gets this long before it is escalated to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGKILL the kernel needs only moments; longer means something is badly wrong.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `restart` waits for the previous process to be gone (it was just stopped or killed).
const RESTART_WAIT: Duration = Duration::from_secs(10);

/// The AOF fsync policy of the private Redis that [`ensure_servers`] starts. `always` makes
/// `ACK(accepted)` survive even a machine crash (SPEC §3.1); start a server with
/// [`PrivateServer::start_redis`] directly to measure `everysec` instead.
pub const PRIVATE_REDIS_APPENDFSYNC: &str = "always";

/// The file in a private server's directory that records its handle.
const STATE_FILE: &str = "server.json";
/// How much of a log file goes into an error message.
const LOG_EXCERPT_BYTES: u64 = 8 * 1024;
/// How many lines of a log's tail go into an error message.
const LOG_TAIL_LINES: usize = 30;

/// Which server program a private server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `redis-server`: streams, pub/sub, leases, idempotency, routes.
    Redis,
    /// `mariadbd`: the durable message store.
    MariaDb,
}

impl ServerKind {
    /// The name used in [`PrivateServer::kind_name`], logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Redis => "redis",
            ServerKind::MariaDb => "mariadb",
        }
    }

    /// The kind whose [`name`](Self::name) is `name`.
    pub fn from_name(name: &str) -> Option<ServerKind> {
        match name {
            "redis" => Some(ServerKind::Redis),
            "mariadb" => Some(ServerKind::MariaDb),
            _ => None,
        }
    }

    /// Process names (`/proc/<pid>/comm`) the server runs under; anything else at the recorded pid
    /// is a different process that reused the pid and must never be signalled.
    pub(crate) fn process_names(self) -> &'static [&'static str] {
        match self {
            ServerKind::Redis => &["redis-server"],
            ServerKind::MariaDb => &["mariadbd", "mysqld"],
        }
    }

    /// The server binary, under its current name first.
    pub(super) fn server_binaries(self) -> &'static [&'static str] {
        match self {
            ServerKind::Redis => &["redis-server"],
            ServerKind::MariaDb => &["mariadbd", "mysqld"],
        }
    }
}

/// What went wrong while installing, starting or stopping a private server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A server binary is missing and could not be installed automatically.
    #[error("`{binary}` is not installed; {hint}")]
    NotInstalled { binary: String, hint: String },
    /// `apt-get` ran but failed.
    #[error("`{command}` failed ({status}):\n{output_tail}")]
    InstallFailed { command: String, status: String, output_tail: String },
    /// A file or directory of a private server could not be used.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A helper program (the installer, apt-get) could not be started at all.
    #[error("could not start `{binary}`: {source}")]
    Spawn { binary: String, source: io::Error },
    /// The server process could not be started.
    #[error(transparent)]
    Start(#[from] process::SpawnError),
    /// Something else already listens on the port the private server should take.
    #[error("port {port} on 127.0.0.1 is already in use: {source}")]
    PortInUse { port: u16, source: io::Error },
    /// A private server started earlier still runs in this directory.
    #[error("a private {kind} server (pid {pid}, port {port}) already runs in {}", dir.display())]
    AlreadyRunning { kind: String, pid: u32, port: u16, dir: PathBuf },
    /// Redis only knows `always`, `everysec` and `no`.
    #[error("invalid appendfsync policy `{0}` (expected always, everysec or no)")]
    InvalidAppendfsync(String),
    /// `mariadb-install-db` failed to create the data directory.
    #[error("initialising the MariaDB data directory {} failed ({status}); log tail:\n{log_tail}", datadir.display())]
    InitFailed { datadir: PathBuf, status: String, log_tail: String },
    /// The server process died before it became ready.
    #[error("private {kind} on port {port} exited during startup; log tail:\n{log_tail}")]
    Exited { kind: &'static str, port: u16, log_tail: String },
    /// The server process runs but did not answer in time (it has been killed).
    #[error("private {kind} on port {port} was not ready after {waited:?} (last error: {last_error}); log tail:\n{log_tail}")]
    NotReady { kind: &'static str, port: u16, waited: Duration, last_error: String, log_tail: String },
    /// Sending a signal failed for a reason other than the process being gone.
    #[error(transparent)]
    Signal(#[from] process::SignalError),
    /// The process survived SIGKILL (or, for `restart`, is still running).
    #[error("pid {pid} is still running")]
    StillRunning { pid: u32 },
    /// A handle names a kind this module does not know (e.g. a hand-edited state file).
    #[error("unknown server kind `{0}`")]
    UnknownKind(String),
    /// Redis Cluster needs at least three masters (and this launcher starts at most a few dozen).
    #[error("a private Redis Cluster needs {min} to {max} masters, not {masters}")]
    InvalidClusterSize { masters: usize, min: usize, max: usize },
    /// `redis-cli --cluster create` failed (its nodes have been stopped).
    #[error("`{command}` failed ({status}):\n{output_tail}")]
    ClusterCreate { command: String, status: String, output_tail: String },
    /// The nodes run but the cluster did not become whole in time (its nodes have been stopped).
    #[error("the Redis Cluster in {} was not ready after {waited:?}: {last_error}", dir.display())]
    ClusterNotReady { dir: PathBuf, waited: Duration, last_error: ClusterProbeError },
    /// An exclusive lock (e.g. on the tests' shared Redis Cluster) was not granted in time.
    #[error("could not lock {} within {waited:?}: {reason}", path.display())]
    Lock { path: PathBuf, waited: Duration, reason: String },
}

/// stored (see `<dir>/server.json`) and used from another process to stop or kill the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateServer {
    /// `"redis"` or `"mariadb"` (see [`ServerKind::name`]).
    pub kind_name: String,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The server process.
    pub pid: u32,
    /// The server's directory (absolute): data, log and state file.
    pub dir: PathBuf,
    /// `redis://127.0.0.1:<port>` or `mysql://root@127.0.0.1:<port>/` (append a database name).
    pub url: String,
    /// The Redis AOF fsync policy, reused by [`restart`](Self::restart); `None` for MariaDB.
    #[serde(default)]
    pub appendfsync: Option<String>,
    /// For a Redis Cluster node, its cluster bus port (reused by [`restart`](Self::restart), so the
    /// node rejoins its cluster where `nodes.conf` says it is); `None` for a standalone server.
    #[serde(default)]
    pub cluster_bus_port: Option<u16>,
}

impl PrivateServer {
    /// The private server recorded in `dir/server.json`, if that process is still running.
    pub fn running_in(dir: &Path) -> Option<PrivateServer> {
        let state = fs::read(dir.join(STATE_FILE)).ok()?;
        let server: PrivateServer = serde_json::from_slice(&state).ok()?;
        server.is_running().then_some(server)
    }

    /// The kind of server, if `kind_name` is one this module knows.
    pub fn kind(&self) -> Option<ServerKind> {
        ServerKind::from_name(&self.kind_name)
    }

    /// Graceful stop: SIGTERM, then wait until the process is gone (Redis flushes its AOF, MariaDB
    /// shuts InnoDB down cleanly). Escalates to SIGKILL after 30 s. Stopping a stopped server is Ok.
    pub async fn stop(&self) -> Result<(), ServerError> {
        if !self.is_running() {
            return Ok(());
        }
        process::send(self.pid, Signal::SIGTERM)?;
        if self.wait_gone(STOP_TIMEOUT).await {
            info!(pid = self.pid, kind = %self.kind_name, "private server stopped");
            return Ok(());
        }
        warn!(pid = self.pid, kind = %self.kind_name, "private server ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL");
        process::send(self.pid, Signal::SIGKILL)?;
        if self.wait_gone(KILL_TIMEOUT).await {
            Ok(())
        } else {
            Err(ServerError::StillRunning { pid: self.pid })
        }
    }

    /// `kill -9` the server, for fault drills. Returns at once; the process is gone moments later.
    pub fn kill(&self) {
        if self.is_running() {
            if let Err(error) = process::send(self.pid, Signal::SIGKILL) {
                warn!(pid = self.pid, %error, "could not kill private server");
            }
        }
    }

    /// Starts the same server again on the same port and directory (after `stop` or `kill`) and
    /// returns the new handle (new pid). Redis keeps its `appendfsync` policy.
    pub async fn restart(&self) -> Result<PrivateServer, ServerError> {
        // Right after kill() the process may still be exiting; give it a moment before the port
        // and data files are needed again.
        if !self.wait_gone(RESTART_WAIT).await {
            return Err(ServerError::StillRunning { pid: self.pid });
        }
        match self.kind() {
            Some(ServerKind::Redis) => {
                let appendfsync = self.appendfsync.as_deref().unwrap_or(PRIVATE_REDIS_APPENDFSYNC);
                let options = RedisOptions { appendfsync: appendfsync.into(), cluster_bus_port: self.cluster_bus_port };
                PrivateServer::start_redis_with(&self.dir, self.port, &options).await
            }
            Some(ServerKind::MariaDb) => PrivateServer::start_mariadb(&self.dir, self.port).await,
            None => Err(ServerError::UnknownKind(self.kind_name.clone())),
        }
    }

    /// Whether the server process is alive: some thread of it still runs, so its port and files may
    /// still be held. A fully exited zombie, or a different program that has since reused the pid,
    /// does not count.
    pub fn is_running(&self) -> bool {
        // The authoritative test: no process has this pid any more. /proc only refines a "yes",
        // because reading it races with an exiting process and fails transiently.
        if !process::exists(self.pid) {
            return false;
        }
        let Some(stat) = process::stat(self.pid) else { return true };
        if !self.kind().is_none_or(|kind| kind.process_names().iter().any(|name| stat.comm.starts_with(name))) {
            return false;
        }
        // Our own child is reaped by its reaper thread only once every thread has exited, so until
        // the pid vanishes it counts as running.
        if stat.parent_pid == std::process::id() {
            return true;
        }
        // Someone else's: after kill -9 the main thread turns zombie first while other threads are
        // still tearing down (the listening socket closes only when the last is gone). A zombie with
        // no live thread is dead and merely waits for its parent to reap it.
        process::is_live_state(stat.state) || process::any_live_thread(self.pid)
    }

    /// Polls until the process is gone; false if it still runs after `timeout`.
    async fn wait_gone(&self, timeout: Duration) -> bool {
        poll::until_true(timeout, || !self.is_running()).await
    }

    /// Waits until the server serves clients: Redis answers PING, MariaDB accepts root over TCP.
    /// A server that dies or stays unready is reported with its log tail; an unready one is killed
    /// so no half-started orphan keeps the port and data files.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), ServerError> {
        let kind = self.kind().ok_or_else(|| ServerError::UnknownKind(self.kind_name.clone()))?;
        let started = Instant::now();
        let mut granted_root_tcp = false;
        let mut last_error = String::from("no answer yet");
        let mut backoff = Backoff::new(poll::FIRST_PAUSE, poll::MAX_PAUSE);
        loop {
            let ready = match kind {
                ServerKind::Redis => redis_reachable(&self.url).await,
                ServerKind::MariaDb => mysql_reachable(&self.url).await,
            };
            if ready {
                return Ok(());
            }
            if !self.is_running() {
                return Err(ServerError::Exited { kind: kind.name(), port: self.port, log_tail: self.log_tail() });
            }
            // Root over TCP may be refused although the server is up (a datadir initialised with
            // socket-only root, or root@'127.0.0.1' dropped): the socket still lets root in, so
            // grant TCP access from there. Idempotent, so racing with a server that is merely slow
            // to open its TCP port does no harm.
            if kind == ServerKind::MariaDb && !granted_root_tcp {
                match self.grant_root_tcp().await {
                    Ok(granted) => granted_root_tcp = granted,
                    Err(error) => last_error = error,
                }
            }
            if started.elapsed() >= timeout {
                self.kill();
                return Err(ServerError::NotReady {
                    kind: kind.name(),
                    port: self.port,
                    waited: timeout,
                    last_error,
                    log_tail: self.log_tail(),
                });
            }
            backoff.wait().await;
        }
    }

    /// Records this handle in `dir/server.json` for later processes and for the running-twice guard.
    fn save_state(&self) -> Result<(), ServerError> {
        let path = self.dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|error| ServerError::Io {
            what: format!("encoding {}", path.display()),
            source: io::Error::other(error),
        })?;
        fs::write(&path, json).map_err(|source| ServerError::Io { what: format!("writing {}", path.display()), source })
    }

    /// The last lines of the server's log, for error messages.
    fn log_tail(&self) -> String {
        match self.kind() {
            Some(kind) => read_log_tail(&log_path(&self.dir, kind)),
            None => String::new(),
        }
    }
}

/// How to start one private server: the program and its arguments, where it listens and lives.
struct Launch {
    kind: ServerKind,
    binary: PathBuf,
    args: Vec<String>,
    url: String,
    port: u16,
    dir: PathBuf,
    /// A Redis Cluster node's bus port, recorded in its handle.
    cluster_bus_port: Option<u16>,
}

impl Launch {
    /// Starts the server detached ([`process::spawn_detached`]: it outlives the caller), waits until
    /// it serves, and records its handle in its directory; killed if it gets no further.
    async fn run(self, appendfsync: Option<String>, ready_timeout: Duration) -> Result<PrivateServer, ServerError> {
        let kind = self.kind.name();
        let mut command = Command::new(&self.binary);
        command.args(&self.args);
        let pid = process::spawn_detached(command, &log_path(&self.dir, self.kind))?;
        let started = process::Unready::of(pid);
        let server = PrivateServer {
            kind_name: kind.into(),
            port: self.port,
            pid,
            dir: self.dir,
            url: self.url,
            appendfsync,
            cluster_bus_port: self.cluster_bus_port,
        };
        server.wait_ready(ready_timeout).await?;
        server.save_state()?;
        started.ready();
        info!(pid, port = server.port, dir = %server.dir.display(), appendfsync = ?server.appendfsync, "private {kind} ready");
        Ok(server)
    }
}

/// Makes `dir` absolute (servers change their working directory) and creates it, refusing when a
/// server recorded there still runs or when `port` is taken.
pub(super) fn prepare_dir(dir: &Path, kind: ServerKind, port: u16) -> Result<PathBuf, ServerError> {
    let dir = std::path::absolute(dir)
        .map_err(|source| ServerError::Io { what: format!("resolving {}", dir.display()), source })?;
    fs::create_dir_all(&dir)
        .map_err(|source| ServerError::Io { what: format!("creating {}", dir.display()), source })?;
    if let Some(running) = PrivateServer::running_in(&dir) {
        return Err(ServerError::AlreadyRunning {
            kind: running.kind_name,
            pid: running.pid,
            port: running.port,
            dir: running.dir,
        });
    }
    // Checked up front because a server that fails to bind may still answer health checks from
    // whatever owns the port, which would look like success.
    TcpListener::bind(("127.0.0.1", port)).map_err(|source| ServerError::PortInUse { port, source })?;
    tracing::debug!(kind = kind.name(), port, dir = %dir.display(), "starting private server");
    Ok(dir)
}

pub(super) fn log_path(dir: &Path, kind: ServerKind) -> PathBuf {
    dir.join(format!("{}.log", kind.name()))
}

/// The last 30 lines (at most 8 KiB) of a log file; empty when it cannot be read.
fn read_log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map_or(0, |meta| meta.len());
    let text = read_log_from(path, len.saturating_sub(LOG_EXCERPT_BYTES));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Up to 8 KiB of a log file from byte `offset`; empty when it cannot be read.
pub(super) fn read_log_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.take(LOG_EXCERPT_BYTES).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_running_another_program_is_not_our_server() {
        let this_test = PrivateServer {
            kind_name: "redis".into(),
            port: 1,
            pid: std::process::id(),
            dir: PathBuf::from("/nonexistent"),
            url: String::new(),
            appendfsync: None,
            cluster_bus_port: None,
        };
        assert!(!this_test.is_running());
        let corrupt = PrivateServer { pid: 0, ..this_test.clone() };
        assert!(!corrupt.is_running());
    }
}
