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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// How long a Redis gets to answer PING before it counts as unreachable.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a MySQL/MariaDB gets to accept a connection before it counts as unreachable.
const MYSQL_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A fresh Redis (or one replaying its AOF) must answer PING within this.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous because the first start initialises InnoDB and crash recovery may follow a kill -9.
const MARIADB_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// A graceful stop gets this long before it is escalated to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGKILL the kernel needs only moments; longer means something is badly wrong.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `restart` waits for the previous process to be gone (it was just stopped or killed).
const RESTART_WAIT: Duration = Duration::from_secs(10);
/// Polling interval while waiting for a server to come up or go away.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The AOF fsync policy of the private Redis that [`ensure_servers`] starts. `always` makes
/// `ACK(accepted)` survive even a machine crash (SPEC §3.1); start a server with
/// [`PrivateServer::start_redis`] directly to measure `everysec` instead.
pub const PRIVATE_REDIS_APPENDFSYNC: &str = "always";

/// The file in a private server's directory that records its handle.
const STATE_FILE: &str = "server.json";
/// How much of a log file goes into an error message.
const LOG_EXCERPT_BYTES: u64 = 8 * 1024;
/// Unix socket paths are limited to 108 bytes; beyond this the MariaDB socket moves to the temp dir.
const MAX_SOCKET_PATH: usize = 100;

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
    fn process_names(self) -> &'static [&'static str] {
        match self {
            ServerKind::Redis => &["redis-server"],
            ServerKind::MariaDb => &["mariadbd", "mysqld"],
        }
    }

    /// The server binary, under its current name first.
    fn server_binaries(self) -> &'static [&'static str] {
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
    /// The server process could not be started at all.
    #[error("could not start `{binary}`: {source}")]
    Spawn { binary: String, source: io::Error },
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
    #[error("could not signal pid {pid}: {source}")]
    Signal { pid: u32, source: io::Error },
    /// The process survived SIGKILL (or, for `restart`, is still running).
    #[error("pid {pid} is still running")]
    StillRunning { pid: u32 },
    /// A handle names a kind this module does not know (e.g. a hand-edited state file).
    #[error("unknown server kind `{0}`")]
    UnknownKind(String),
}

/// True when a Redis answers PING at `url` within about a second.
pub async fn redis_reachable(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    // A Redis still replaying its AOF answers PING with LOADING, which is an error here: it is not
    // ready to serve yet.
    matches!(tokio::time::timeout(REDIS_PROBE_TIMEOUT, ping).await, Ok(Ok(pong)) if pong == "PONG")
}

/// True when a MySQL/MariaDB accepts a connection at `url` (`mysql://user:pass@host:port/db`) within
/// about two seconds. The database in the URL is ignored, so a server without that database yet still
/// counts as reachable (migrations create it).
pub async fn mysql_reachable(url: &str) -> bool {
    let Ok(opts) = mysql_async::Opts::from_url(url) else {
        return false;
    };
    // prefer_socket(false): the question is whether TCP works, not whether a local socket does.
    let opts = mysql_async::OptsBuilder::from_opts(opts).db_name(None::<String>).prefer_socket(false);
    let connect = async {
        let conn = mysql_async::Conn::new(opts).await?;
        conn.disconnect().await
    };
    matches!(tokio::time::timeout(MYSQL_PROBE_TIMEOUT, connect).await, Ok(Ok(())))
}

/// The server part of a MySQL URL with a trailing `/` and no database or query, so callers append
/// their database name: `mysql://u:p@h:3306/im?x=1` → `mysql://u:p@h:3306/`.
pub fn mysql_server_url(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
    format!("{}/", &url[..authority_end])
}

/// Makes sure the binaries for `kind` exist (`redis-server`; `mariadbd` and `mariadb-install-db`).
/// When one is missing and this runs as root on Debian/Ubuntu, installs both server packages with
/// `apt-get` (one install covers both kinds, so a second call finds everything present). Blocking:
/// call it from `spawn_blocking` in async code.
pub fn ensure_installed(kind: ServerKind) -> Result<(), ServerError> {
    let missing = missing_binaries(kind);
    if missing.is_empty() {
        return Ok(());
    }
    let binary = missing.join(", ");
    let Some(apt_get) = find_binary(&["apt-get"]) else {
        return Err(ServerError::NotInstalled {
            binary,
            hint: "install redis-server and mariadb-server with your package manager".into(),
        });
    };
    if !running_as_root() {
        return Err(ServerError::NotInstalled {
            binary,
            hint: "run `sudo apt-get install -y redis-server mariadb-server` (or run this as root)".into(),
        });
    }
    info!(missing = %binary, "installing redis-server and mariadb-server with apt-get");
    run_apt_get(&apt_get, &["update"])?;
    run_apt_get(&apt_get, &["install", "-y", "redis-server", "mariadb-server"])?;
    let still_missing = missing_binaries(kind);
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(ServerError::NotInstalled {
            binary: still_missing.join(", "),
            hint: "apt-get install succeeded but the binary is still not found".into(),
        })
    }
}

/// A free TCP port on 127.0.0.1, found by binding port 0 and letting the listener go. Another
/// process may take it before it is used; a start on it then fails with a clear error.
pub fn free_port() -> u16 {
    match TcpListener::bind(("127.0.0.1", 0)).and_then(|listener| listener.local_addr()) {
        Ok(addr) => addr.port(),
        Err(error) => {
            // Only happens without a loopback interface; a random high port is as good a guess as
            // any, and starting a server on it reports the real problem.
            let port = rand::random_range(20_000..60_000);
            warn!(%error, port, "could not ask the kernel for a free port; guessing");
            port
        }
    }
}

/// A private server process that this module started, living under `dir`. Plain data, so it can be
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
}

impl PrivateServer {
    /// Starts a private Redis on `port` with its data in `dir` (created): AOF on with the given
    /// `appendfsync` policy (`always` | `everysec` | `no`), no RDB snapshots, bound to 127.0.0.1,
    /// logging to `dir/redis.log`. Returns once it answers PING (AOF replayed).
    pub async fn start_redis(dir: &Path, port: u16, appendfsync: &str) -> Result<PrivateServer, ServerError> {
        if !["always", "everysec", "no"].contains(&appendfsync) {
            return Err(ServerError::InvalidAppendfsync(appendfsync.to_string()));
        }
        let kind = ServerKind::Redis;
        let binary = require_binary(kind.server_binaries())?;
        let dir = prepare_dir(dir, kind, port)?;
        let args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            appendfsync.into(),
            // The AOF is the durability story; RDB snapshots would only add fork pauses.
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            // Empty logfile = stdout, which spawn_detached sends to redis.log.
            "--logfile".into(),
            String::new(),
        ];
        let pid = spawn_detached(&binary, &args, &log_path(&dir, kind))?;
        let server = PrivateServer {
            kind_name: kind.name().into(),
            port,
            pid,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            appendfsync: Some(appendfsync.into()),
        };
        server.wait_ready(REDIS_READY_TIMEOUT).await?;
        server.save_state()?;
        info!(pid, port, dir = %server.dir.display(), appendfsync, "private redis ready");
        Ok(server)
    }

    /// Starts a private MariaDB on `port` with its datadir in `dir/data`, initialising it with
    /// `mariadb-install-db` on first use, logging to `dir/mariadb.log`. Returns once `root` with an
    /// empty password can connect over TCP to 127.0.0.1; `url` is `mysql://root@127.0.0.1:<port>/`.
    pub async fn start_mariadb(dir: &Path, port: u16) -> Result<PrivateServer, ServerError> {
        let kind = ServerKind::MariaDb;
        let binary = require_binary(kind.server_binaries())?;
        let dir = prepare_dir(dir, kind, port)?;
        let log = log_path(&dir, kind);
        let datadir = dir.join("data");
        // A private tmpdir: at startup mariadbd deletes every `#sql*` file in its tmpdir, which in a
        // shared /tmp would pull temporary tables from under any other MariaDB (including a
        // concurrent mariadb-install-db and the shared server).
        let tmpdir = dir.join("tmp");
        fs::create_dir_all(&tmpdir)
            .map_err(|source| ServerError::Io { what: format!("creating {}", tmpdir.display()), source })?;
        if !datadir.join("mysql").is_dir() {
            initialise_mariadb_datadir(&datadir, &tmpdir, &log).await?;
        }
        let socket = mariadb_socket_path(&dir, port);
        let mut args = vec![
            // --no-defaults must come first: no /etc/mysql config may leak into a private server.
            "--no-defaults".to_string(),
            format!("--datadir={}", datadir.display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.join("mariadb.pid").display()),
            format!("--tmpdir={}", tmpdir.display()),
            // No DNS lookups per connection; TCP clients then match root@'127.0.0.1', which
            // wait_ready makes sure exists.
            "--skip-name-resolve".into(),
            "--innodb-buffer-pool-size=256M".into(),
            "--innodb-log-file-size=256M".into(),
            "--max-connections=1000".into(),
        ];
        if running_as_root() {
            // mariadbd refuses to run as root unless told explicitly.
            args.push("--user=root".into());
        }
        let pid = spawn_detached(&binary, &args, &log)?;
        let server = PrivateServer {
            kind_name: kind.name().into(),
            port,
            pid,
            url: format!("mysql://root@127.0.0.1:{port}/"),
            dir,
            appendfsync: None,
        };
        server.wait_ready(MARIADB_READY_TIMEOUT).await?;
        server.save_state()?;
        info!(pid, port, dir = %server.dir.display(), "private mariadb ready");
        Ok(server)
    }

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
        self.signal(libc::SIGTERM)?;
        if self.wait_gone(STOP_TIMEOUT).await {
            info!(pid = self.pid, kind = %self.kind_name, "private server stopped");
            return Ok(());
        }
        warn!(pid = self.pid, kind = %self.kind_name, "private server ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL");
        self.signal(libc::SIGKILL)?;
        if self.wait_gone(KILL_TIMEOUT).await {
            Ok(())
        } else {
            Err(ServerError::StillRunning { pid: self.pid })
        }
    }

    /// `kill -9` the server, for fault drills. Returns at once; the process is gone moments later.
    pub fn kill(&self) {
        if self.is_running() {
            if let Err(error) = self.signal(libc::SIGKILL) {
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
                PrivateServer::start_redis(&self.dir, self.port, appendfsync).await
            }
            Some(ServerKind::MariaDb) => PrivateServer::start_mariadb(&self.dir, self.port).await,
            None => Err(ServerError::UnknownKind(self.kind_name.clone())),
        }
    }

    /// Whether the server process is alive: some thread of it still runs, so its port and files may
    /// still be held. A fully exited zombie, or a different program that has since reused the pid,
    /// does not count.
    pub fn is_running(&self) -> bool {
        let Some(pid) = signalable_pid(self.pid) else {
            return false;
        };
        // The authoritative test: ESRCH means no process has this pid any more. /proc only refines
        // a "yes", because reading it races with an exiting process and fails transiently.
        // SAFETY: signal 0 only checks for existence; pid is a positive, single process id.
        if unsafe { libc::kill(pid, 0) } != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return false;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        let Some(proc_stat) = parse_stat(&stat) else {
            return true;
        };
        if !self.kind().is_none_or(|kind| kind.process_names().iter().any(|name| proc_stat.comm.starts_with(name))) {
            return false;
        }
        // Our own child is reaped by its reaper thread only once every thread has exited, so until
        // the pid vanishes it counts as running.
        if proc_stat.parent_pid == std::process::id() {
            return true;
        }
        // Someone else's: after kill -9 the main thread turns zombie first while other threads are
        // still tearing down (the listening socket closes only when the last is gone). A zombie with
        // no live thread is dead and merely waits for its parent to reap it.
        is_live_state(proc_stat.state) || any_live_thread(pid)
    }

    /// Sends `signal` to the server process; a process that is already gone is not an error.
    fn signal(&self, signal: libc::c_int) -> Result<(), ServerError> {
        let Some(pid) = signalable_pid(self.pid) else {
            return Ok(());
        };
        // SAFETY: kill has no memory-safety preconditions; signalable_pid rules out 0 and negative
        // ids, which would signal whole process groups.
        if unsafe { libc::kill(pid, signal) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(ServerError::Signal { pid: self.pid, source: error })
        }
    }

    /// Polls until the process is gone; false if it still runs after `timeout`.
    async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        true
    }

    /// Waits until the server serves clients: Redis answers PING, MariaDB accepts root over TCP.
    /// A server that dies or stays unready is reported with its log tail; an unready one is killed
    /// so no half-started orphan keeps the port and data files.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), ServerError> {
        let kind = self.kind().ok_or_else(|| ServerError::UnknownKind(self.kind_name.clone()))?;
        let started = Instant::now();
        let mut granted_root_tcp = false;
        let mut last_error = String::from("no answer yet");
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
                let socket = mariadb_socket_path(&self.dir, self.port);
                if socket.exists() {
                    match tokio::time::timeout(MYSQL_PROBE_TIMEOUT, grant_root_tcp_access(&socket)).await {
                        Ok(Ok(())) => {
                            granted_root_tcp = true;
                            info!(port = self.port, "granted root@'127.0.0.1' access through the socket");
                        }
                        Ok(Err(error)) => last_error = error.to_string(),
                        Err(_) => last_error = "socket connection timed out".into(),
                    }
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
            tokio::time::sleep(POLL_INTERVAL).await;
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

/// The servers a cluster or test run uses, as found or started by [`ensure_servers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnsuredServers {
    /// Where Redis answers.
    pub redis_url: String,
    /// The MySQL server URL without a database, e.g. `mysql://root@127.0.0.1:3306/`.
    pub mysql_url: String,
    /// The private servers in use (empty when both configured servers answered).
    pub private: Vec<PrivateServer>,
}

impl EnsuredServers {
    /// Gracefully stops every private server; shared servers are never touched.
    pub async fn stop_private(&self) -> Result<(), ServerError> {
        for server in &self.private {
            server.stop().await?;
        }
        Ok(())
    }
}

/// The servers a cluster or test run uses: the configured ones when they answer (and `force_private`
/// is false), else private ones under `dir` (Redis in `dir/redis`, MariaDB in `dir/mariadb`) on free
/// ports, installing the packages first if needed. A private server that still runs in its directory
/// from an earlier call is reused rather than started twice. Private Redis uses
/// [`PRIVATE_REDIS_APPENDFSYNC`].
pub async fn ensure_servers(
    redis_url: &str,
    mysql_url: &str,
    dir: &Path,
    force_private: bool,
) -> Result<EnsuredServers, ServerError> {
    let (redis_shared, mysql_shared) = if force_private {
        (false, false)
    } else {
        tokio::join!(redis_reachable(redis_url), mysql_reachable(mysql_url))
    };
    // Installing is sequential: two apt-get runs at once would fight over the dpkg lock.
    for (needed, kind) in [(!redis_shared, ServerKind::Redis), (!mysql_shared, ServerKind::MariaDb)] {
        if needed {
            tokio::task::spawn_blocking(move || ensure_installed(kind)).await.map_err(|error| {
                ServerError::InstallFailed {
                    command: format!("ensure_installed({})", kind.name()),
                    status: "task failed".into(),
                    output_tail: error.to_string(),
                }
            })??;
        }
    }

    let redis_port = free_port();
    let mut mysql_port = free_port();
    while mysql_port == redis_port {
        mysql_port = free_port();
    }
    let redis_dir = dir.join("redis");
    let mysql_dir = dir.join("mariadb");
    let redis = async {
        if redis_shared {
            return Ok(None);
        }
        match PrivateServer::running_in(&redis_dir) {
            Some(running) => Ok(Some(running)),
            None => PrivateServer::start_redis(&redis_dir, redis_port, PRIVATE_REDIS_APPENDFSYNC).await.map(Some),
        }
    };
    let mysql = async {
        if mysql_shared {
            return Ok(None);
        }
        match PrivateServer::running_in(&mysql_dir) {
            Some(running) => Ok(Some(running)),
            None => PrivateServer::start_mariadb(&mysql_dir, mysql_port).await.map(Some),
        }
    };
    match tokio::join!(redis, mysql) {
        (Ok(redis), Ok(mysql)) => Ok(EnsuredServers {
            redis_url: redis.as_ref().map_or_else(|| redis_url.to_string(), |server| server.url.clone()),
            mysql_url: mysql.as_ref().map_or_else(|| mysql_server_url(mysql_url), |server| server.url.clone()),
            private: redis.into_iter().chain(mysql).collect(),
        }),
        (Err(error), other) | (other, Err(error)) => {
            // One side failed: do not leave the other one running unowned.
            if let Ok(Some(server)) = other {
                if let Err(stop_error) = server.stop().await {
                    warn!(error = %stop_error, pid = server.pid, "could not stop private server after a failed start");
                }
            }
            Err(error)
        }
    }
}

/// Runs `mariadb-install-db` into `datadir`, with root allowed in with an empty password (private
/// servers only listen on 127.0.0.1). Output goes to the server log.
async fn initialise_mariadb_datadir(datadir: &Path, tmpdir: &Path, log: &Path) -> Result<(), ServerError> {
    let install_db = require_binary(&["mariadb-install-db", "mysql_install_db"])?;
    let mut command = tokio::process::Command::new(&install_db);
    // --no-defaults must come first here too.
    command
        .arg("--no-defaults")
        .arg(format!("--datadir={}", datadir.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        // Passed through to the bootstrap mariadbd; see start_mariadb for why /tmp is avoided.
        .arg(format!("--tmpdir={}", tmpdir.display()));
    if running_as_root() {
        command.arg("--user=root");
    }
    let install_output_start = fs::metadata(log).map_or(0, |meta| meta.len());
    let (stdout, stderr) = open_log(log)?;
    let status = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .await
        .map_err(|source| ServerError::Spawn { binary: install_db.display().to_string(), source })?;
    if status.success() {
        return Ok(());
    }
    // A half-written datadir would look initialised next time and fail in confusing ways; start
    // over from nothing instead. It is a private directory, nothing else lives there.
    if let Err(error) = fs::remove_dir_all(datadir) {
        warn!(%error, datadir = %datadir.display(), "could not remove a half-initialised datadir");
    }
    // The cause comes first in the installer's output, followed by a page of generic advice.
    let output = read_log_from(log, install_output_start);
    let log_tail = output.lines().take(12).collect::<Vec<_>>().join("\n");
    Err(ServerError::InitFailed { datadir: datadir.to_path_buf(), status: status.to_string(), log_tail })
}

/// Makes sure `root@'127.0.0.1'` exists with an empty password and all privileges, connecting as
/// root through the unix socket (where root@localhost always gets in on a private datadir).
async fn grant_root_tcp_access(socket: &Path) -> Result<(), mysql_async::Error> {
    let opts = mysql_async::OptsBuilder::default().socket(Some(socket.display().to_string())).user(Some("root"));
    let mut conn = mysql_async::Conn::new(opts).await?;
    conn.query_drop("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'").await?;
    conn.query_drop("ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY ''").await?;
    conn.query_drop("GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION").await?;
    conn.disconnect().await
}

/// Starts `binary` in its own session (so it survives the caller, its terminal and its Ctrl-C) with
/// stdin closed and output appended to `log`. Returns the pid.
fn spawn_detached(binary: &Path, args: &[String], log: &Path) -> Result<u32, ServerError> {
    let (stdout, stderr) = open_log(log)?;
    let mut command = Command::new(binary);
    command.args(args).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // SAFETY: the closure runs between fork and exec and only calls setsid, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| if libc::setsid() == -1 { Err(io::Error::last_os_error()) } else { Ok(()) });
    }
    let child =
        command.spawn().map_err(|source| ServerError::Spawn { binary: binary.display().to_string(), source })?;
    let pid = child.id();
    reap_when_exits(child);
    Ok(pid)
}

/// Waits for the child on a background thread. While this process lives, a stopped server must be
/// reaped or it lingers as a zombie and still looks alive to `kill(pid, 0)` — stop() would then wait
/// forever inside tests. When this process exits first (`ops up`), the thread goes with it and init
/// adopts the server, which is what detaching is for.
fn reap_when_exits(mut child: Child) {
    let pid = child.id();
    let spawned = std::thread::Builder::new().name(format!("reap-{pid}")).spawn(move || {
        let _ = child.wait();
    });
    if let Err(error) = spawned {
        // Only when this process is out of threads. The Child is dropped unreaped (dropping does
        // not kill it): the server runs normally, but once stopped it stays a zombie of ours until
        // this process exits, so stop() reports StillRunning.
        warn!(pid, %error, "could not start a reaper thread for a private server");
    }
}

/// Opens `log` for appending (restarts keep the earlier history) twice: for stdout and stderr.
fn open_log(log: &Path) -> Result<(File, File), ServerError> {
    let io_error = |source| ServerError::Io { what: format!("opening {}", log.display()), source };
    let stdout = OpenOptions::new().create(true).append(true).open(log).map_err(io_error)?;
    let stderr = stdout.try_clone().map_err(io_error)?;
    Ok((stdout, stderr))
}

/// Makes `dir` absolute (servers change their working directory) and creates it, refusing when a
/// server recorded there still runs or when `port` is taken.
fn prepare_dir(dir: &Path, kind: ServerKind, port: u16) -> Result<PathBuf, ServerError> {
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

fn log_path(dir: &Path, kind: ServerKind) -> PathBuf {
    dir.join(format!("{}.log", kind.name()))
}

/// The MariaDB socket lives in the server directory unless that path is too long for a unix socket.
fn mariadb_socket_path(dir: &Path, port: u16) -> PathBuf {
    let socket = dir.join("mysqld.sock");
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        socket
    } else {
        std::env::temp_dir().join(format!("im-mariadb-{port}.sock"))
    }
}

/// The last 30 lines (at most 8 KiB) of a log file; empty when it cannot be read.
fn read_log_tail(path: &Path) -> String {
    const MAX_LINES: usize = 30;
    let len = fs::metadata(path).map_or(0, |meta| meta.len());
    let text = read_log_from(path, len.saturating_sub(LOG_EXCERPT_BYTES));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(MAX_LINES)..].join("\n")
}

/// Up to 8 KiB of a log file from byte `offset`; empty when it cannot be read.
fn read_log_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.take(LOG_EXCERPT_BYTES).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The command name and state letter from a `/proc/<pid>/stat` line (`pid (comm) state ...`); the
/// name may itself contain spaces and parentheses.
fn parse_stat(stat: &str) -> Option<ProcStat<'_>> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let mut fields = stat.get(close + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent_pid = fields.next()?.parse().ok()?;
    Some(ProcStat { comm: stat.get(open + 1..close)?, state, parent_pid })
}

/// The fields of `/proc/<pid>/stat` that `is_running` needs.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat<'a> {
    comm: &'a str,
    state: char,
    parent_pid: u32,
}

/// Anything but zombie (`Z`) and dead (`X`).
fn is_live_state(state: char) -> bool {
    !matches!(state, 'Z' | 'X')
}

/// Whether any thread of process `pid` is still live.
fn any_live_thread(pid: libc::pid_t) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
            .is_some_and(|task| is_live_state(task.state))
    })
}

/// The pid as a target for kill(2), or None for values that would address a process group (0,
/// negatives after conversion) or init — a corrupt handle must never signal those.
fn signalable_pid(pid: u32) -> Option<libc::pid_t> {
    libc::pid_t::try_from(pid).ok().filter(|&pid| pid > 1)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The first of `names` found as an executable file in PATH or the sbin directories (mariadbd is in
/// /usr/sbin, which a non-root PATH often lacks).
fn find_binary(names: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin"].map(PathBuf::from);
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_var).chain(extra).collect();
    names.iter().find_map(|name| {
        dirs.iter().map(|dir| dir.join(name)).find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
    })
}

fn require_binary(names: &[&str]) -> Result<PathBuf, ServerError> {
    find_binary(names).ok_or_else(|| ServerError::NotInstalled {
        binary: names.join(" or "),
        hint: "call ensure_installed (or `apt-get install redis-server mariadb-server`) first".into(),
    })
}

/// The binaries `kind` needs that are not installed.
fn missing_binaries(kind: ServerKind) -> Vec<String> {
    let mut needed = vec![kind.server_binaries()];
    if kind == ServerKind::MariaDb {
        needed.push(&["mariadb-install-db", "mysql_install_db"]);
    }
    needed.into_iter().filter(|names| find_binary(names).is_none()).map(|names| names.join(" or ")).collect()
}

fn run_apt_get(apt_get: &Path, args: &[&str]) -> Result<(), ServerError> {
    let command_line = format!("apt-get {}", args.join(" "));
    let output = Command::new(apt_get)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ServerError::Spawn { binary: apt_get.display().to_string(), source })?;
    if output.status.success() {
        return Ok(());
    }
    let combined = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = combined.lines().collect();
    Err(ServerError::InstallFailed {
        command: command_line,
        status: output.status.to_string(),
        output_tail: lines[lines.len().saturating_sub(20)..].join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_server_url_drops_database_and_query_but_keeps_credentials() {
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306/whatever"), "mysql://root@127.0.0.1:3306/");
        assert_eq!(mysql_server_url("mysql://u:p%2Fw@db.local:3307/im?pool_max=9"), "mysql://u:p%2Fw@db.local:3307/");
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306"), "mysql://root@127.0.0.1:3306/");
        assert_eq!(mysql_server_url("mysql://root@127.0.0.1:3306/"), "mysql://root@127.0.0.1:3306/");
    }

    #[test]
    fn proc_stat_lines_yield_command_name_state_and_parent() {
        assert_eq!(
            parse_stat("42 (redis-server) S 1 42 42 0"),
            Some(ProcStat { comm: "redis-server", state: 'S', parent_pid: 1 })
        );
        assert_eq!(
            parse_stat("42 (a (weird) name) Z 7 42"),
            Some(ProcStat { comm: "a (weird) name", state: 'Z', parent_pid: 7 })
        );
        assert_eq!(parse_stat("42 (truncated"), None);
        assert!(is_live_state('S') && is_live_state('D') && !is_live_state('Z') && !is_live_state('X'));
    }

    #[test]
    fn a_pid_running_another_program_is_not_our_server() {
        let this_test = PrivateServer {
            kind_name: "redis".into(),
            port: 1,
            pid: std::process::id(),
            dir: PathBuf::from("/nonexistent"),
            url: String::new(),
            appendfsync: None,
        };
        assert!(!this_test.is_running());
    }

    #[test]
    fn pids_that_address_groups_or_init_are_never_signalled() {
        assert_eq!(signalable_pid(0), None);
        assert_eq!(signalable_pid(1), None);
        assert_eq!(signalable_pid(u32::MAX), None);
        assert_eq!(signalable_pid(4242), Some(4242));
    }
}
