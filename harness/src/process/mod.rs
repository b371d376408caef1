//! Process mechanics in one place: start a program detached, signal it, wait for it to go, and read
//! what Linux says about it under `/proc`.
//!
//! Every process the harness starts — gateways, shard workers, the dashboard, private Redis and
//! MariaDB — goes through [`spawn_detached`]: its own session (so it outlives the caller, its terminal
//! and its Ctrl-C), stdin closed, output appended to a log file, and a reaper thread so that a child
//! which exits while we are alive does not linger as a zombie that still looks alive. Signals go
//! through `signal`, which never addresses a process group or init; `stop_request` is how a command
//! hears it is asked to stop; and the `/proc` readers
//! (`inspect`) answer "is it alive", "how much CPU", "how much memory" the same way for everyone.

mod inspect;
mod signal;
mod stop_request;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub use inspect::{
    any_live_thread, comm, cpu_ticks, exists, find_by_comm, is_alive, is_live_state, listener_pid, processes_in,
    raise_fd_limit, rss_kib, running_as_root, stat, ticks_per_second, ProcStat,
};
pub use signal::{kill_group_now, kill_now, send, terminate, wait_gone, Signal, SignalError};
pub use stop_request::unless_stopped;

/// The environment variables that override a config file (`IM__SECTION__KEY`).
const CONFIG_OVERRIDE_PREFIX: &str = "IM__";

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Its log file could not be opened for appending.
    #[error("cannot open the log {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    /// The program could not be executed (missing, not executable, `setsid` refused).
    #[error("could not start `{program}`: {source}")]
    Start { program: String, source: io::Error },
}

/// Starts `cmd` in its own session with stdin closed and stdout and stderr appended to `log`, and
/// reaps it in the background. Returns its pid. A failing `setsid` fails the start (the child would
/// otherwise share our session and die with our terminal).
pub fn spawn_detached(mut cmd: Command, log: &Path) -> Result<u32, SpawnError> {
    let (stdout, stderr) = open_log(log)?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    // SAFETY: the closure runs between fork and exec and only calls setsid, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = cmd
        .spawn()
        .map_err(|source| SpawnError::Start { program: cmd.get_program().to_string_lossy().into_owned(), source })?;
    let pid = child.id();
    reap_in_background(child);
    Ok(pid)
}

/// Processes just started and not yet recorded by their owner: all killed if this is dropped before
/// [`Unready::ready`] — the start failed, or was abandoned midway (the future dropped by a stop
/// request, [`unless_stopped`]), so a start that does not finish leaves nothing running. Servers
/// started side by side share one: each is up on its own, but the group is not until all are.
#[derive(Default)]
pub struct Unready {
    pids: std::sync::Mutex<Vec<u32>>,
    done: bool,
}

impl Unready {
    /// One process just started.
    pub fn of(pid: u32) -> Self {
        let started = Unready::default();
        started.add(pid);
        started
    }

    /// One more process started.
    pub fn add(&self, pid: u32) {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    }

    /// All are up and their owner records them.
    pub fn ready(mut self) {
        self.done = true;
    }
}

impl Drop for Unready {
    fn drop(&mut self) {
        if !self.done {
            self.pids.lock().unwrap_or_else(|p| p.into_inner()).iter().for_each(|&pid| kill_now(pid));
        }
    }
}

/// Removes every `IM__*` variable from `cmd`'s environment, so the child reads its configuration from
/// the file it is given and nothing else: a launcher that chose servers, ports or a shard count must
/// not have its choice overridden by variables it inherited.
pub fn clear_config_overrides(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with(CONFIG_OVERRIDE_PREFIX) {
            cmd.env_remove(name);
        }
    }
}

/// Opens `log` for appending (restarts keep the earlier history) twice: for stdout and stderr.
pub fn open_log(log: &Path) -> Result<(File, File), SpawnError> {
    let error = |source| SpawnError::Log { path: log.to_path_buf(), source };
    let stdout = OpenOptions::new().create(true).append(true).open(log).map_err(error)?;
    let stderr = stdout.try_clone().map_err(error)?;
    Ok((stdout, stderr))
}

/// Waits for the child on a background thread. While this process lives, an exited child must be
/// reaped or it lingers as a zombie; when this process exits first (`ops up`), the thread goes with
/// it and init adopts the child, which is what detaching is for.
fn reap_in_background(mut child: Child) {
    let pid = child.id();
    let spawned = std::thread::Builder::new().name(format!("reap-{pid}")).spawn(move || {
        let _ = child.wait();
    });
    if let Err(error) = spawned {
        // Only when this process is out of threads. The child runs normally, but once it exits it
        // stays a zombie of ours until this process exits.
        tracing::warn!(pid, %error, "could not start a reaper thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_child_runs_in_its_own_session_and_is_reaped() {
        let dir = std::env::temp_dir().join(format!("im-harness-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("child.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo started; ps -o sid= -p $$");
        let pid = spawn_detached(cmd, &log).unwrap();
        assert!(!is_alive(pid) || wait_gone_blocking(pid));
        let text = std::fs::read_to_string(&log).unwrap();
        let sid: u32 = text.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_default();
        assert!(text.starts_with("started") && sid == pid, "its own session: {text:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_missing_program_is_reported_by_name() {
        let log = std::env::temp_dir().join(format!("im-harness-missing-{}.log", std::process::id()));
        let err = spawn_detached(Command::new("/nonexistent/im-program"), &log).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/im-program"), "{err}");
        std::fs::remove_file(&log).ok();
    }

    #[test]
    fn config_overrides_are_not_inherited() {
        // A variable no other test of this binary reads.
        std::env::set_var("IM__HARNESS__TEST_ONLY", "1");
        let mut cmd = Command::new("env");
        clear_config_overrides(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("IM__HARNESS__TEST_ONLY"));
    }

    fn wait_gone_blocking(pid: u32) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        !is_alive(pid)
    }
}
