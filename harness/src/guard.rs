//! [`ClusterGuard`]: the one kill-on-drop owner of a cluster. Tests, the bench's comparison arms and
//! the drills hold one, so a cluster they started never outlives them — whether they end normally,
//! return an error halfway, panic, or are interrupted.
//!
//! A cluster can grow after it started (`ops scale`, a drill restarting a gateway or replacing a
//! killed worker) and those processes are recorded in its state file, so on drop the guard kills
//! what it started with *and* whatever the state file names by then.

use std::path::{Path, PathBuf};

use crate::cluster::{self, ClusterError, ClusterSpec, ClusterState};

/// A running cluster that is killed (processes and private servers, SIGKILL) when dropped, unless it
/// was stopped or released first.
pub struct ClusterGuard {
    /// The cluster as this owner last knew it (see [`ClusterGuard::reload`]).
    pub state: ClusterState,
    state_file: PathBuf,
    armed: bool,
    remove_dir: bool,
}

impl ClusterGuard {
    /// Starts a cluster ([`cluster::start`]); its directory and logs stay when it is dropped.
    pub async fn start(spec: &ClusterSpec) -> Result<ClusterGuard, ClusterError> {
        let state = cluster::start(spec).await?;
        Ok(ClusterGuard::adopt(state, spec.state_file.clone()))
    }

    /// Takes charge of a cluster that is already running and recorded in `state_file`.
    pub fn adopt(state: ClusterState, state_file: PathBuf) -> ClusterGuard {
        ClusterGuard { state, state_file, armed: true, remove_dir: false }
    }

    /// For tests: on drop, also remove the cluster directory — unless the thread is panicking, when
    /// the logs are kept for whoever reads the failure.
    pub fn removing_dir(mut self) -> ClusterGuard {
        self.remove_dir = true;
        self
    }

    /// The state file this cluster is recorded in.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Re-reads the state file (after a command changed the cluster, e.g. `ops scale`).
    pub fn reload(&mut self) -> Result<(), ClusterError> {
        self.state = cluster::load_state(&self.state_file)?;
        Ok(())
    }

    /// Writes [`ClusterGuard::state`] to the state file (after this owner changed the cluster).
    pub fn save(&self) -> Result<(), ClusterError> {
        cluster::save_state(&self.state, &self.state_file)
    }

    /// Stops the cluster gracefully ([`cluster::stop`]) and returns its last state.
    pub async fn stop(mut self) -> Result<ClusterState, ClusterError> {
        self.armed = false;
        let state = self.state.clone();
        cluster::stop(&state).await?;
        Ok(state)
    }

    /// Leaves the cluster running and hands over its state (`ops up`).
    pub fn release(mut self) -> ClusterState {
        self.armed = false;
        self.state.clone()
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.armed {
            self.state.kill_now();
            if let Ok(recorded) = cluster::load_state(&self.state_file) {
                recorded.kill_now();
            }
            if !self.remove_dir {
                eprintln!("cluster in {} killed", self.state.dir.display());
            }
        }
        if self.remove_dir {
            if std::thread::panicking() {
                eprintln!("cluster logs kept in {}", self.state.dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&self.state.dir);
            }
        }
    }
}
