//! Starting one cluster process: a gateway, a shard worker, or the dashboard.
//!
//! Each is started detached ([`crate::process::spawn_detached`]) on port 0 with `--ready-file`; the
//! process writes `{"addr": ...}` there once it listens, which is how the launcher learns its port.
//! Children get the configuration file the launcher wrote and nothing else: `IM__*` variables the
//! launcher inherited are removed from their environment, since they would override that file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::state::{DashboardProc, GatewayProc, WorkerProc};
use super::ClusterError;
use crate::{poll, process};

/// Longest wait for a process to write its ready file.
const READY_FILE_TIMEOUT: Duration = Duration::from_secs(30);
/// Where every process of a local cluster listens: loopback, a port the OS picks.
const LISTEN_ANY_PORT: &str = "127.0.0.1:0";

/// Where the `gateway`, `shard-worker` and `ops` binaries are: `IM_BIN_DIR`, else next to the running
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

/// The path of the workspace binary `name` in [`bin_dir`], if it is there.
pub fn binary(name: &str) -> Result<PathBuf, ClusterError> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::MissingBinary(path))
    }
}

/// A command for the workspace binary `name` that listens on any loopback port and reports it in
/// `ready`, with the launcher's config overrides removed from its environment.
fn command(name: &str, ready: &Path) -> Result<Command, ClusterError> {
    let mut cmd = Command::new(binary(name)?);
    process::clear_config_overrides(&mut cmd);
    cmd.arg("--listen").arg(LISTEN_ANY_PORT).arg("--ready-file").arg(ready);
    Ok(cmd)
}

/// Starts one more gateway with node id `node` (also used to restart one) and waits for its ready file.
pub async fn spawn_gateway(dir: &Path, config: &Path, node: u16) -> Result<GatewayProc, ClusterError> {
    let ready = dir.join(format!("gateway-{node}.ready"));
    let log = dir.join(format!("gateway-{node}.log"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = command("gateway", &ready)?;
    cmd.arg("--config").arg(config).arg("--node-id").arg(node.to_string());
    let (addr, pid) = start_until_ready(cmd, &ready, &log).await?;
    Ok(GatewayProc {
        node_id: node,
        ws_url: format!("ws://{addr}/ws"),
        http_url: format!("http://{addr}"),
        metrics_url: format!("http://{addr}/metrics"),
        pid,
        log,
    })
}

/// Starts one more shard worker (`index` names its log and ready file): for `shard`, or a standby
/// that claims any free shard.
pub async fn spawn_worker(
    dir: &Path,
    config: &Path,
    index: usize,
    shard: Option<u16>,
) -> Result<WorkerProc, ClusterError> {
    let ready = dir.join(format!("worker-{index}.ready"));
    let log = dir.join(format!("worker-{index}.log"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = command("shard-worker", &ready)?;
    cmd.arg("--config").arg(config);
    cmd.arg("--shard").arg(shard.map_or_else(|| "auto".to_owned(), |s| s.to_string()));
    let (addr, pid) = start_until_ready(cmd, &ready, &log).await?;
    Ok(WorkerProc { shard, metrics_url: format!("http://{addr}/metrics"), pid, log })
}

/// Starts `ops dashboard` in the background for the cluster described by `state_file` (it re-reads
/// that file on every refresh), on a port the OS picks; returns once it listens.
pub async fn spawn_dashboard(dir: &Path, state_file: &Path) -> Result<DashboardProc, ClusterError> {
    let ready = dir.join("dashboard.ready");
    let log = dir.join("dashboard.log");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(binary("ops")?);
    process::clear_config_overrides(&mut cmd);
    cmd.arg("dashboard").arg("--state").arg(state_file);
    cmd.arg("--listen").arg(LISTEN_ANY_PORT).arg("--ready-file").arg(&ready);
    let (addr, pid) = start_until_ready(cmd, &ready, &log).await?;
    Ok(DashboardProc { url: format!("http://{addr}/"), pid, log })
}

/// Starts `cmd` detached and waits for its ready file: its address and pid. A process that never
/// gets that far — it exited, timed out, or the wait was abandoned — is killed, not left running.
async fn start_until_ready(cmd: Command, ready: &Path, log: &Path) -> Result<(String, u32), ClusterError> {
    let pid = process::spawn_detached(cmd, log)?;
    let started = process::Unready::of(pid);
    let addr = read_ready_addr(ready, pid, log).await?;
    started.ready();
    Ok((addr, pid))
}

/// Waits until the process `pid` wrote `{"addr": ...}` to `ready`; fails early if it exits.
async fn read_ready_addr(ready: &Path, pid: u32, log: &Path) -> Result<String, ClusterError> {
    let addr = poll::until(READY_FILE_TIMEOUT, || async {
        let text = std::fs::read_to_string(ready).ok();
        match text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
            Some(info) => info["addr"].as_str().map(|addr| Ok(addr.to_owned())),
            None if !process::is_alive(pid) => Some(Err(())),
            None => None,
        }
    })
    .await;
    match addr {
        Some(Ok(addr)) => Ok(addr),
        _ => Err(ClusterError::NotReady(format!("process {pid}"), READY_FILE_TIMEOUT, log.to_path_buf())),
    }
}
