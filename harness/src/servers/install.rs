//! Making sure the server programs are there: find `redis-server`, `redis-cli` (which joins private
//! Redis Cluster nodes), `mariadbd` and `mariadb-install-db`, and when one is missing and we are root
//! on Debian/Ubuntu, install the packages with `apt-get` — saying so on the log (stderr in `ops`),
//! since it takes a minute.
//!
//! Note for operators: installing Debian's packages also starts their system services on 6379 and
//! 3306 (Redis without AOF). The next `ops up` finds them answering and uses them as shared servers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::info;

use super::{ServerError, ServerKind};
use crate::process::running_as_root;

/// Where server binaries are looked for besides PATH (mariadbd is in /usr/sbin, which a non-root
/// PATH often lacks).
const EXTRA_BIN_DIRS: [&str; 6] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin"];
/// The Debian packages that bring both servers (`redis-tools` is `redis-cli`; `redis-server`
/// depends on it, and naming it also repairs a machine where only the CLI is missing).
const PACKAGES: [&str; 3] = ["redis-server", "redis-tools", "mariadb-server"];
/// The Redis command-line client, which `redis-cli --cluster create` needs.
pub(super) const REDIS_CLI: [&str; 1] = ["redis-cli"];
/// How many lines of a failed apt-get's output go into the error.
const OUTPUT_TAIL_LINES: usize = 20;

/// Makes sure the binaries for `kind` exist (`redis-server` and `redis-cli`; `mariadbd` and
/// `mariadb-install-db`). When one is missing and this runs as root on Debian/Ubuntu, installs the
/// server packages with `apt-get` (one install covers both kinds, so a second call finds everything
/// present). Blocking: call it from `spawn_blocking` in async code.
pub fn ensure_installed(kind: ServerKind) -> Result<(), ServerError> {
    let missing = missing_binaries(kind);
    if missing.is_empty() {
        return Ok(());
    }
    let binary = missing.join(", ");
    let Some(apt_get) = find_binary(&["apt-get"]) else {
        return Err(ServerError::NotInstalled {
            binary,
            hint: "install redis-server, redis-tools and mariadb-server with your package manager".into(),
        });
    };
    if !running_as_root() {
        return Err(ServerError::NotInstalled {
            binary,
            hint: format!("run `sudo apt-get install -y {}` (or run this as root)", PACKAGES.join(" ")),
        });
    }
    let packages = PACKAGES.join(" ");
    info!(missing = %binary, "installing {packages} with apt-get (this takes a minute or two)");
    info!("running apt-get update");
    run_apt_get(&apt_get, &["update"])?;
    info!("running apt-get install -y {packages}");
    run_apt_get(&apt_get, &[["install", "-y"].as_slice(), PACKAGES.as_slice()].concat())?;
    info!("{packages} installed");
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

/// The first of `names` found as an executable file in PATH or the sbin directories (mariadbd is in
/// /usr/sbin, which a non-root PATH often lacks).
pub(super) fn find_binary(names: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let extra = EXTRA_BIN_DIRS.map(PathBuf::from);
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_var).chain(extra).collect();
    names.iter().find_map(|name| {
        dirs.iter().map(|dir| dir.join(name)).find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
    })
}

pub(super) fn require_binary(names: &[&str]) -> Result<PathBuf, ServerError> {
    find_binary(names).ok_or_else(|| ServerError::NotInstalled {
        binary: names.join(" or "),
        hint: format!("call ensure_installed (or `apt-get install {}`) first", PACKAGES.join(" ")),
    })
}

/// The binaries `kind` needs that are not installed.
fn missing_binaries(kind: ServerKind) -> Vec<String> {
    let mut needed = vec![kind.server_binaries()];
    match kind {
        ServerKind::Redis => needed.push(&REDIS_CLI),
        ServerKind::MariaDb => needed.push(&["mariadb-install-db", "mysql_install_db"]),
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
        output_tail: lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join("\n"),
    })
}
