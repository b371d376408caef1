//! Signals to processes the harness started: a graceful stop, a kill, a pause.
//!
//! A recorded pid can be stale (the process exited and the pid was reused) or corrupt (a hand-edited
//! state file), so nothing here ever addresses pid 0, 1 or a negative id — those mean a process group
//! or init to kill(2) — and a process that is already gone is not an error.

use std::time::Duration;

use nix::errno::Errno;

pub use nix::sys::signal::Signal;

use super::inspect::{is_alive, kill_target as target};
use crate::poll;

/// How long a SIGKILLed process gets to disappear before [`terminate`] gives up on it.
const AFTER_KILL: Duration = Duration::from_secs(2);

/// A signal could not be delivered for a reason other than the process being gone.
#[derive(Debug, thiserror::Error)]
#[error("could not send {signal:?} to pid {pid}: {source}")]
pub struct SignalError {
    pub pid: u32,
    pub signal: Signal,
    pub source: Errno,
}

/// Sends `signal` to `pid`. A process that is gone (or a pid that is never signalled) is `Ok`.
pub fn send(pid: u32, signal: Signal) -> Result<(), SignalError> {
    let Some(target) = target(pid) else { return Ok(()) };
    match nix::sys::signal::kill(target, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(SignalError { pid, signal, source }),
    }
}

/// SIGKILL without waiting, for guards that clean up on the way out; a failure is only logged.
pub fn kill_now(pid: u32) {
    if let Err(error) = send(pid, Signal::SIGKILL) {
        tracing::warn!(%error, "could not kill");
    }
}

/// SIGKILL to every process of the group `pgid` (a program started as a group leader together with
/// the helpers it forked, e.g. a browser); a group that is gone is not an error.
pub fn kill_group_now(pgid: u32) {
    let Some(target) = target(pgid) else { return };
    match nix::sys::signal::killpg(target, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pgid, %error, "could not kill the process group"),
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`; returns once it is gone (or
/// `AFTER_KILL` after the SIGKILL).
pub async fn terminate(pid: u32, grace: Duration) {
    if let Err(error) = send(pid, Signal::SIGTERM) {
        tracing::warn!(%error, "could not stop");
    }
    if !wait_gone(pid, grace).await {
        kill_now(pid);
        wait_gone(pid, AFTER_KILL).await;
    }
}

/// Waits until `pid` is no longer alive; false if it still is after `limit`.
pub async fn wait_gone(pid: u32, limit: Duration) -> bool {
    poll::until_true(limit, || !is_alive(pid)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_that_address_groups_or_init_are_never_signalled() {
        assert_eq!(target(0), None);
        assert_eq!(target(1), None);
        assert_eq!(target(u32::MAX), None);
        assert_eq!(target(4242), Some(nix::unistd::Pid::from_raw(4242)));
        assert!(send(0, Signal::SIGKILL).is_ok() && send(1, Signal::SIGKILL).is_ok());
    }

    #[tokio::test]
    async fn terminate_stops_a_process_that_ignores_sigterm() {
        let mut child = std::process::Command::new("sh").arg("-c").arg("trap '' TERM; sleep 30").spawn().unwrap();
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        tokio::time::sleep(Duration::from_millis(100)).await;
        terminate(pid, Duration::from_millis(200)).await;
        assert!(!is_alive(pid));
    }
}
