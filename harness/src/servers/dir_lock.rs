//! An exclusive lock on a directory: `flock` on `<dir>/.lock`, held until the guard is dropped.
//!
//! Starting a private Redis Cluster takes seconds (several servers, a join, a wait), and several
//! processes may want the same one at once — parallel test binaries sharing the tests' cluster,
//! `ops servers` next to a test run. The lock makes "is a healthy cluster running here? if not, start
//! one" one step, so they neither race nor start two. `flock` is released by the kernel when its
//! holder dies, so a crashed holder never leaves the directory locked.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use im_common::backoff::Backoff;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::ServerError;
use crate::poll;

/// The lock file in a locked directory.
const LOCK_FILE: &str = ".lock";

/// Holds the lock on a directory; dropping it unlocks.
#[derive(Debug)]
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

/// Waits up to `timeout` for the exclusive lock on `dir` (which must exist).
pub(crate) async fn lock_dir(dir: &Path, timeout: Duration) -> Result<DirLock, ServerError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServerError::Io { what: format!("opening {}", path.display()), source })?;
    let started = Instant::now();
    let mut backoff = Backoff::new(poll::FIRST_PAUSE, poll::MAX_PAUSE);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(DirLock { _lock: lock }),
            Err((_, errno)) if errno != Errno::EWOULDBLOCK => return Err(lock_error(path, timeout, errno.desc())),
            Err((unlocked, _)) => file = unlocked,
        }
        if started.elapsed() >= timeout {
            return Err(lock_error(path, timeout, "another process holds it"));
        }
        backoff.wait().await;
    }
}

fn lock_error(path: PathBuf, waited: Duration, reason: &str) -> ServerError {
    ServerError::Lock { path, waited, reason: reason.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_locked_directory_is_refused_until_its_holder_lets_go() {
        let dir = std::env::temp_dir().join(format!("im-dir-lock-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_dir(&dir, Duration::ZERO).await.unwrap();
        let refused = lock_dir(&dir, Duration::from_millis(50)).await.unwrap_err();
        assert!(refused.to_string().contains(".lock"), "{refused}");
        drop(held);
        lock_dir(&dir, Duration::ZERO).await.expect("free again once dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
