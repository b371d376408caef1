//! A private MariaDB: its datadir initialised on first use with root allowed in over TCP with an
//! empty password (it listens on 127.0.0.1 only), `--no-defaults` so no `/etc/mysql` setting leaks in,
//! and a private tmpdir and socket. After a `kill -9` the same directory restarts with InnoDB crash
//! recovery; root's TCP access is restored through the unix socket if it went missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use tracing::{info, warn};

use super::install::require_binary;
use super::probe::MYSQL_PROBE_TIMEOUT;
use super::{log_path, prepare_dir, read_log_from, Launch, PrivateServer, ServerError, ServerKind};
use crate::process::{self, running_as_root};

/// Generous because the first start initialises InnoDB and crash recovery may follow a kill -9.
const MARIADB_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Unix socket paths are limited to 108 bytes; beyond this the MariaDB socket moves to the temp dir.
const MAX_SOCKET_PATH: usize = 100;
/// How many lines of the installer's output go into an error (the cause comes first).
const INSTALL_ERROR_LINES: usize = 12;

impl PrivateServer {
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
            // Every deadlock goes to the server's log (`mariadb/mariadb.log`), so a drill that
            // meets one shows which statements took part.
            "--innodb-print-all-deadlocks=ON".into(),
        ];
        if running_as_root() {
            // mariadbd refuses to run as root unless told explicitly.
            args.push("--user=root".into());
        }
        let url = format!("mysql://root@127.0.0.1:{port}/");
        let launch = Launch { kind, binary, args, url, port, dir, cluster_bus_port: None };
        launch.run(None, MARIADB_READY_TIMEOUT).await
    }

    /// Makes sure root can log in over TCP, through the unix socket (where root@localhost always gets
    /// in on a private datadir). `Ok(false)` while the socket is not there yet.
    pub(super) async fn grant_root_tcp(&self) -> Result<bool, String> {
        let socket = mariadb_socket_path(&self.dir, self.port);
        if !socket.exists() {
            return Ok(false);
        }
        match tokio::time::timeout(MYSQL_PROBE_TIMEOUT, grant_root_tcp_access(&socket)).await {
            Ok(Ok(())) => {
                info!(port = self.port, "granted root@'127.0.0.1' access through the socket");
                Ok(true)
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("socket connection timed out".into()),
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
    let (stdout, stderr) = process::open_log(log)?;
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
    let log_tail = output.lines().take(INSTALL_ERROR_LINES).collect::<Vec<_>>().join("\n");
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

/// The MariaDB socket lives in the server directory unless that path is too long for a unix socket.
fn mariadb_socket_path(dir: &Path, port: u16) -> PathBuf {
    let socket = dir.join("mysqld.sock");
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        socket
    } else {
        std::env::temp_dir().join(format!("im-mariadb-{port}.sock"))
    }
}
