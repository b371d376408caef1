//! The signals that ask a command to stop: Ctrl-C (SIGINT) and SIGTERM, which `timeout`, `kill`
//! and a CI runner's cancel send. A command that starts processes runs [`unless_stopped`], so that
//! its guards run on the way out (a dropped [`crate::guard::ClusterGuard`] kills its cluster)
//! instead of the command dying with its detached processes still running.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Resolves when SIGINT or SIGTERM arrives, with the exit code a shell gives for it (130, 143).
/// A signal whose handler cannot be installed is never waited for.
async fn stop_requested() -> i32 {
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        Ok(()) = tokio::signal::ctrl_c() => 130,
        Some(()) = async { term.as_mut()?.recv().await } => 143,
        else => std::future::pending().await,
    }
}

/// Runs `command` to its exit code, unless a stop is requested first: then `command` is dropped (its
/// guards kill what it started), "interrupted" is printed, and the signal's exit code is returned.
pub async fn unless_stopped<E>(command: impl Future<Output = Result<i32, E>>) -> Result<i32, E> {
    tokio::select! {
        code = command => code,
        code = stop_requested() => {
            eprintln!("interrupted");
            Ok(code)
        }
    }
}
