//! Fault drills (SPEC §3 on demand): start a cluster with private servers, offer bench load, inject one
//! fault while it runs, wait for the drain, check every receipt against the pushes and the rows, and
//! print a verdict.
//!
//! A drill only ever stops, kills or restarts what its cluster started itself: the private Redis and
//! MariaDB under the cluster directory, and the cluster's own gateways and workers. Pointed at a
//! cluster whose servers are shared (`--state` of an `ops up` without private servers), it refuses.
//!
//! While the load runs, a monitor polls [`im_harness::status::collect`] about every half second: the
//! total backlog (unsaved stream entries over all shards; the gateways' own per-shard figure is used
//! when a worker that owned the shard is gone), the save rate, and the resident memory of every
//! gateway and worker from `/proc`. The backlog peak and the time from the end of the fault until the
//! backlog is back to its pre-fault level with saves flowing again come from those samples.
//!
//! The verdict passes only when nothing receipted is lost (every `ACK(accepted)`/`ACK(saved)` message
//! was pushed to its receiver and has its row), no row is duplicated, no sender's messages arrived
//! out of order, no message appeared under two serverMsgIds, every `ACK(saved)` has the row of that
//! very message, and the drill's own checks hold (listed in `checks`, each with what it measured).
//!
//! The parts: `session` prepares a run (config, cluster) and executes it; `faults` injects the
//! fault; `chaos` runs the seeded sequence of faults of the `chaos` drill through `faults`; `monitor`
//! samples the cluster while the load runs; `verdict` turns it all into a [`DrillVerdict`]. A cluster the drill started is owned by a `ClusterGuard`, so an error or
//! Ctrl-C halfway kills it instead of leaving it behind.

mod chaos;
mod faults;
mod monitor;
mod session;
mod verdict;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use im_common::config::Config;
use im_harness::cluster::{self, ClusterState};

use crate::spec::{FrontDoor, LoadSpec};
use crate::BenchError;

pub use chaos::{ChaosEvent, ChaosFault, ChaosReport};
pub use verdict::{Check, DrillVerdict};

/// The state file of a drill run, in its run directory.
const STATE_FILE: &str = "cluster.json";

/// The drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Drill {
    DbOutage,
    WorkerKill,
    GatewayRestart,
    RedisRestart,
    RedisOutage,
    SlowConsumers,
    Overload,
    Chaos,
    RecipientChurn,
}

impl Drill {
    /// Every drill, in the order `ops drill all` would run them.
    pub const ALL: [Drill; 9] = [
        Drill::DbOutage,
        Drill::WorkerKill,
        Drill::RedisOutage,
        Drill::RedisRestart,
        Drill::GatewayRestart,
        Drill::SlowConsumers,
        Drill::Overload,
        Drill::Chaos,
        Drill::RecipientChurn,
    ];

    /// The drill's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Drill::DbOutage => "db-outage",
            Drill::WorkerKill => "worker-kill",
            Drill::GatewayRestart => "gateway-restart",
            Drill::RedisRestart => "redis-restart",
            Drill::RedisOutage => "redis-outage",
            Drill::SlowConsumers => "slow-consumers",
            Drill::Overload => "overload",
            Drill::Chaos => "chaos",
            Drill::RecipientChurn => "recipient-churn",
        }
    }

    /// Whether the drill draws from a seed (`--seed`).
    pub fn seeded(self) -> bool {
        matches!(self, Drill::Chaos | Drill::RecipientChurn)
    }

    /// Parses [`Drill::name`]'s output (the same names the command line takes).
    pub fn parse(s: &str) -> Option<Drill> {
        Drill::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// How a gateway is taken down in `gateway-restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StopSignal {
    /// SIGKILL: a crash, nothing flushed.
    Kill,
    /// SIGTERM: a graceful stop (SIGKILL after 10 s).
    Term,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    pub drill: Drill,
    /// Length of the fault (outages), or of the whole fault period (`worker-kill`, `chaos`).
    pub fault: Duration,
    /// The load; the drill stretches its window to cover the lead, the fault and a tail.
    pub load: LoadSpec,
    /// Base config of a cluster the drill starts (ignored with `state`).
    pub config: Config,
    pub gateways: usize,
    pub shards: u16,
    /// Worker processes (default: shards + 1, one standby).
    pub workers: Option<usize>,
    /// Run the drill's cluster on a private Redis Cluster of this many masters (`None`: one private
    /// Redis server). Redis faults then hit every node.
    pub redis_cluster: Option<usize>,
    /// Run directory: one subdirectory per drill run with its cluster, logs and verdict.
    pub out: PathBuf,
    /// An existing cluster to drill instead of starting one (must have private servers).
    pub state: Option<PathBuf>,
    /// `redis-outage`: only this fail-open setting (default: both, one run each).
    pub fail_open: Option<bool>,
    /// `worker-kill`: time between kills.
    pub kill_every: Duration,
    /// `gateway-restart`: how the gateway is stopped.
    pub signal: StopSignal,
    /// `redis-restart`: restart Redis with this `appendfsync` instead of the cluster's.
    pub appendfsync: Option<String>,
    /// `overload`: the maximum rate the offered load is twice of (`None`: measured first, in closed
    /// loop, on the drill's cluster).
    pub max_rate: Option<f64>,
    /// `slow-consumers`: bound on the fast receivers' E2E p99, as a multiple of the control run's.
    pub slow_p99_factor: f64,
    /// Pause between the load's first accepted messages and the fault, so the backlog and rates have
    /// a steady level to compare the recovery with.
    pub lead: Duration,
    /// Load kept up after the fault, to watch the recovery under load.
    pub tail: Duration,
    /// `chaos`: the seed of the fault schedule; `recipient-churn`: the seed of the receivers'
    /// comings and goings (`None`: a random one, printed and kept in the verdict).
    pub seed: Option<u64>,
    /// `recipient-churn`: how long a receiving device stays connected on average, and how long it
    /// stays away (uniform between the two).
    pub churn_online_mean: Duration,
    pub churn_offline: (Duration, Duration),
}

impl DrillSpec {
    /// A drill with the defaults of `bench drill`: 200 connections at 400 msg/s over 2 gateways and
    /// 4 shards with one standby worker, a 4 s lead and an 8 s tail. Receivers confirm deliveries as
    /// real clients do (`ACK delivered` by seq, coalesced) in every drill. In the chaos and
    /// recipient-churn drills conversations are crossed (every receiver hears from two senders); in
    /// recipient-churn a third of the receiving users have two devices and half of the other devices
    /// sync with their own positions.
    pub fn new(drill: Drill, fault: Duration, out: PathBuf) -> DrillSpec {
        let churn = drill == Drill::RecipientChurn;
        let load = LoadSpec {
            connections: 200,
            interval: LoadSpec::interval_for_rate(100, 400.0),
            crossed: drill.seeded(),
            two_devices: if churn { RECIPIENT_CHURN_TWO_DEVICES } else { 0.0 },
            own_positions: if churn { RECIPIENT_CHURN_OWN_POSITIONS } else { 0.0 },
            ..LoadSpec::default()
        };
        DrillSpec {
            drill,
            fault,
            load,
            config: Config::default(),
            gateways: 2,
            shards: 4,
            workers: None,
            redis_cluster: None,
            out,
            state: None,
            fail_open: None,
            kill_every: Duration::from_secs(4),
            signal: StopSignal::Kill,
            appendfsync: None,
            max_rate: None,
            slow_p99_factor: 2.0,
            lead: Duration::from_secs(4),
            tail: Duration::from_secs(8),
            seed: None,
            churn_online_mean: RECIPIENT_CHURN_ONLINE_MEAN,
            churn_offline: RECIPIENT_CHURN_OFFLINE,
        }
    }
}

/// recipient-churn: the share of receiving users with two devices, the share of the other devices
/// that sync with their own positions, a device's mean time connected, and its time away.
pub const RECIPIENT_CHURN_TWO_DEVICES: f64 = 1.0 / 3.0;
pub const RECIPIENT_CHURN_OWN_POSITIONS: f64 = 0.5;
pub const RECIPIENT_CHURN_ONLINE_MEAN: Duration = Duration::from_secs(6);
pub const RECIPIENT_CHURN_OFFLINE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(3));

/// Runs the drill (twice for `redis-outage` without a fixed fail-open setting; a control run first
/// for `slow-consumers`) and returns a verdict per run.
pub async fn run(spec: &DrillSpec) -> Result<Vec<DrillVerdict>, BenchError> {
    spec.load.validate()?;
    let existing = match &spec.state {
        Some(_) if spec.redis_cluster.is_some() => {
            return Err(BenchError::InvalidSpec(
                "--redis-cluster sizes the cluster a drill starts; a drill on --state runs on that cluster's Redis"
                    .into(),
            ))
        }
        Some(path) => {
            let state = cluster::load_state(path)?;
            if state.private_servers.is_empty() {
                return Err(BenchError::InvalidSpec(format!(
                    "the cluster in {} uses shared Redis/MariaDB servers; a drill stops and restarts only \
                     servers its cluster started itself. Start one with `ops up --private`, or let the drill \
                     start its own (omit --state)",
                    path.display()
                )));
            }
            Some(state)
        }
        None => None,
    };
    let variants: Vec<Option<bool>> = match (spec.drill, spec.fail_open) {
        (Drill::RedisOutage, None) if existing.is_none() => vec![Some(true), Some(false)],
        (_, fail_open) => vec![fail_open],
    };
    let mut verdicts = Vec::new();
    for fail_open in variants {
        let run = session::DrillRun::prepare(spec, existing.clone(), fail_open).await?;
        verdicts.push(run.execute().await?);
    }
    if let (Some(path), Some(last)) = (&spec.state, verdicts.last()) {
        // Restarted processes and servers have new pids: keep `ops down` able to find them.
        if let Ok(state) = cluster::load_state(&last.dir.join(STATE_FILE)) {
            cluster::save_state(&state, path)?;
        }
    }
    Ok(verdicts)
}

/// The cluster a drill works on, shared by the fault injector (which replaces pids and server
/// handles) and the monitor (which reads the current endpoints). Every change is written to the
/// run's state file at once, so the cluster's guard (and `ops down`) always knows every process, and
/// to the front door, so reconnecting clients find a restarted gateway on its new port.
#[derive(Clone)]
struct DrillCluster {
    state: Arc<Mutex<ClusterState>>,
    state_file: PathBuf,
    front_door: FrontDoor,
}

/// The gateways' WebSocket URLs of a cluster.
fn gateway_urls(state: &ClusterState) -> Vec<String> {
    state.gateways.iter().map(|g| g.ws_url.clone()).collect()
}

impl DrillCluster {
    fn new(state: ClusterState, state_file: PathBuf) -> Result<DrillCluster, BenchError> {
        cluster::save_state(&state, &state_file)?;
        let front_door = FrontDoor::new(gateway_urls(&state));
        Ok(DrillCluster { state: Arc::new(Mutex::new(state)), state_file, front_door })
    }

    /// The cluster as it is now.
    fn snapshot(&self) -> ClusterState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the cluster and records the change in the state file.
    fn update(&self, f: impl FnOnce(&mut ClusterState)) -> Result<(), BenchError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state);
        self.front_door.set(gateway_urls(&state));
        Ok(cluster::save_state(&state, &self.state_file)?)
    }
}
