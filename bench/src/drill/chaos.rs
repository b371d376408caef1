//! The chaos drill: under steady load from clients that behave like real ones (receivers confirm
//! deliveries, everyone reconnects with backoff, senders resend what is unconfirmed; conversations
//! are crossed, so every receiver hears from two senders), a seeded random sequence of the faults the
//! engine promises to survive, then the drain and the usual verdict.
//!
//! What it injects, each through the one mechanism in `faults`:
//! - **worker-kill**: `kill -9` of a shard owner (a standby takes the shard over when the lease runs
//!   out; a fresh standby is started at once, so the pool never runs dry);
//! - **worker-pause**: SIGSTOP of a shard owner for 0.5–2 × `two_phase.lease_ttl_ms` (past the TTL a
//!   standby takes over and the resumed owner must find itself fenced), then SIGCONT;
//! - **gateway-restart**: a gateway stopped (SIGKILL 3 times in 4, SIGTERM otherwise), down 0.5–3 s,
//!   started again with its node id; its clients reconnect to the others and resend;
//! - **gateway-pause**: SIGSTOP of a gateway for 0.5–2 × `gateway.route_ttl_ms` (past the TTL its
//!   route entries lapse and it must close its connections with 1012), then SIGCONT;
//! - **db-outage**: MariaDB stopped for 2–10 s;
//! - **redis-restart**: Redis SIGKILLed, down 0–3 s, started again from its AOF (the private Redis
//!   runs with `appendfsync always`, so nothing that got `ACK(accepted)` may be lost); while it is
//!   down, fail-open saves through the baseline path. On a Redis Cluster (`--redis-cluster`) every
//!   node is killed and restarted (the private nodes run `appendfsync always`);
//! - **reconnect-storm**: 20–60 % of the users' connections (senders and receivers) closed at once.
//!
//! Schedule rules:
//! 1. **One fault at a time.** A fault is over (process restarted and ready, server answering,
//!    process resumed) before the next begins. Overlapping outages are not something the engine
//!    promises to answer well: with Redis and MariaDB down together a message can neither be
//!    appended nor saved through fail-open, so it can only be refused.
//! 2. **Quiet time** of 3–8 s after every fault, so the system recovers under load before the next.
//! 3. A fault starts only within the chaos period (`--minutes`); it may end up to its own length
//!    past it. Then the load runs its tail, and the drain and the checks follow.
//! 4. After every fault a worker that is no longer running is replaced by a fresh standby, and a
//!    gateway that is no longer running is started again. A process that died without the drill
//!    killing it is reported and fails the check `no_process_died_on_its_own`.
//! 5. **Seeded.** `StdRng::seed_from_u64(seed)` draws every step — quiet time, fault, target,
//!    length, signal, storm share — with the same draws per step whatever the fault, so one seed gives
//!    one schedule (within one build of the bench). Targets are picked by position among the
//!    candidates of the moment (the shard owners can differ between runs). The seed is printed at the
//!    start and kept in the verdict; `--seed` replays it.
//!
//! The verdict is the common one (lost 0, duplicate rows 0, reorders 0, one message one id, every
//! `ACK(saved)` with its row, every message answered) plus: the only `ERROR` allowed as a message's
//! answer is `server_busy` (Redis restarts with the fail-open order guard, load shedding while the
//! cluster catches up, the backlog bound), every receiver is connected at the end, and no gateway or
//! worker log shows a panic (SPEC §3.7; a panicking task is caught by the runtime and would pass
//! unseen otherwise).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use im_common::config::Config;
use im_harness::process;

use super::faults::{
    kill_worker_and_replace, pause_process, redis_appendfsync, replace_dead_workers, restart_gateway, restart_redis,
    restart_server, shard_owners, stop_redis, stop_server,
};
use super::session::DrillRun;
use super::{Check, StopSignal};
use crate::BenchError;

/// Quiet time after each fault, seconds.
const QUIET_SECS: (f64, f64) = (3.0, 8.0);
/// gateway-restart: how long the gateway stays down, seconds; and how often it is a graceful stop.
const GATEWAY_DOWN_SECS: (f64, f64) = (0.5, 3.0);
const GRACEFUL_STOP_SHARE: f64 = 0.25;
/// db-outage: how long MariaDB stays down, seconds.
const DB_DOWN_SECS: (f64, f64) = (2.0, 10.0);
/// redis-restart: how long Redis stays down after its SIGKILL, seconds.
const REDIS_DOWN_SECS: (f64, f64) = (0.0, 3.0);
/// worker-pause / gateway-pause: the pause as a multiple of the lease / route TTL.
const PAUSE_TTL_FACTOR: (f64, f64) = (0.5, 2.0);
/// reconnect-storm: the share of users whose connections close.
const STORM_SHARE: (f64, f64) = (0.2, 0.6);

/// A fault the chaos drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChaosFault {
    WorkerKill,
    WorkerPause,
    GatewayRestart,
    GatewayPause,
    DbOutage,
    RedisRestart,
    ReconnectStorm,
}

impl ChaosFault {
    /// Every fault, equally likely.
    pub const ALL: [ChaosFault; 7] = [
        ChaosFault::WorkerKill,
        ChaosFault::WorkerPause,
        ChaosFault::GatewayRestart,
        ChaosFault::GatewayPause,
        ChaosFault::DbOutage,
        ChaosFault::RedisRestart,
        ChaosFault::ReconnectStorm,
    ];

    /// The fault's name in logs and the verdict.
    pub fn name(self) -> &'static str {
        match self {
            ChaosFault::WorkerKill => "worker-kill",
            ChaosFault::WorkerPause => "worker-pause",
            ChaosFault::GatewayRestart => "gateway-restart",
            ChaosFault::GatewayPause => "gateway-pause",
            ChaosFault::DbOutage => "db-outage",
            ChaosFault::RedisRestart => "redis-restart",
            ChaosFault::ReconnectStorm => "reconnect-storm",
        }
    }
}

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Step {
    /// Quiet time before the fault.
    pub quiet_before: Duration,
    pub fault: ChaosFault,
    /// Picks the target: `pick % candidates` (and salts a storm's choice of users).
    pub pick: u64,
    /// How long the fault lasts: downtime, outage or pause (zero for a kill or a storm).
    pub length: Duration,
    /// gateway-restart: SIGTERM instead of SIGKILL.
    pub graceful: bool,
    /// reconnect-storm: the share of users closed.
    pub share: f64,
}

/// The seeded schedule: an endless sequence of steps.
pub(super) struct ChaosPlan {
    rng: StdRng,
    lease_ttl: Duration,
    route_ttl: Duration,
}

impl ChaosPlan {
    pub fn new(seed: u64, lease_ttl: Duration, route_ttl: Duration) -> ChaosPlan {
        ChaosPlan { rng: StdRng::seed_from_u64(seed), lease_ttl, route_ttl }
    }

    /// The next step. Always the same six draws, so the sequence depends on the seed alone.
    pub fn next_step(&mut self) -> Step {
        let quiet = between(QUIET_SECS, self.rng.random());
        let fault = ChaosFault::ALL[self.rng.random_range(0..ChaosFault::ALL.len())];
        let pick: u64 = self.rng.random();
        let x: f64 = self.rng.random();
        let graceful = self.rng.random_bool(GRACEFUL_STOP_SHARE);
        let share = between(STORM_SHARE, self.rng.random());
        let ttl_multiple = |ttl: Duration| ttl.mul_f64(between(PAUSE_TTL_FACTOR, x));
        let length = match fault {
            ChaosFault::WorkerKill | ChaosFault::ReconnectStorm => Duration::ZERO,
            ChaosFault::WorkerPause => ttl_multiple(self.lease_ttl),
            ChaosFault::GatewayPause => ttl_multiple(self.route_ttl),
            ChaosFault::GatewayRestart => Duration::from_secs_f64(between(GATEWAY_DOWN_SECS, x)),
            ChaosFault::DbOutage => Duration::from_secs_f64(between(DB_DOWN_SECS, x)),
            ChaosFault::RedisRestart => Duration::from_secs_f64(between(REDIS_DOWN_SECS, x)),
        };
        Step {
            quiet_before: Duration::from_secs_f64(quiet),
            fault,
            pick,
            length,
            graceful: fault == ChaosFault::GatewayRestart && graceful,
            share: if fault == ChaosFault::ReconnectStorm { share } else { 0.0 },
        }
    }
}

/// `x` (0..1) mapped onto `range`.
fn between((low, high): (f64, f64), x: f64) -> f64 {
    low + (high - low) * x
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosEvent {
    /// Seconds from the start of the chaos period.
    pub at_secs: f64,
    pub fault: ChaosFault,
    /// What it hit (`worker 3`, `gateway 2 (SIGKILL)`, `mariadb`, `35 % of the users`); empty when
    /// there was no target at that moment (no shard owner found) and the step was skipped.
    pub target: String,
    /// The planned downtime, outage or pause.
    pub length_secs: f64,
    /// How long the step took in all (a restart's wait for readiness included).
    pub took_secs: f64,
}

/// What the chaos drill did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosReport {
    /// Replays this schedule with `--seed`.
    pub seed: u64,
    /// Faults injected, by name.
    pub fired: BTreeMap<String, u64>,
    /// Steps skipped for lack of a target at that moment.
    pub skipped: u64,
    pub timeline: Vec<ChaosEvent>,
    /// Processes that exited without the drill killing them (each replaced).
    pub unexpected_exits: Vec<String>,
}

impl ChaosReport {
    /// `worker-kill 3, db-outage 2, ...`
    pub fn summary(&self) -> String {
        let fired: Vec<String> = self.fired.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!("{} faults: {}; {} skipped (no target)", self.total(), fired.join(", "), self.skipped)
    }

    /// Faults injected.
    pub fn total(&self) -> u64 {
        self.fired.values().sum()
    }
}

impl DrillRun<'_> {
    /// Runs the chaos schedule for the drill's fault period; returns when the last fault is over.
    pub(super) async fn chaos(&mut self, checks: &mut Vec<Check>) -> Result<(), BenchError> {
        let seed = self.seed.unwrap_or_default();
        let snapshot = self.cluster.snapshot();
        let config = Config::load(Some(&snapshot.config_path)).unwrap_or_else(|_| self.spec.config.clone());
        let lease_ttl = Duration::from_millis(config.two_phase.lease_ttl_ms);
        let route_ttl = Duration::from_millis(config.gateway.route_ttl_ms);
        let policy = redis_appendfsync(&snapshot);
        self.notes.push(format!(
            "chaos seed {seed}; lease TTL {lease_ttl:?}, route TTL {route_ttl:?}; Redis appendfsync {}",
            policy.as_deref().unwrap_or("unknown")
        ));
        let mut plan = ChaosPlan::new(seed, lease_ttl, route_ttl);
        let mut report = ChaosReport { seed, ..Default::default() };
        let began = Instant::now();
        let until = began + self.spec.fault;
        loop {
            let step = plan.next_step();
            tokio::time::sleep(step.quiet_before).await;
            if Instant::now() >= until {
                break;
            }
            let at = began.elapsed();
            let target = self.inject_step(&step).await?;
            let took = began.elapsed().saturating_sub(at);
            eprintln!(
                "[{}] {:>6.1}s chaos: {} {} ({:.1} s)",
                self.load.label,
                at.as_secs_f64(),
                step.fault.name(),
                target.as_deref().unwrap_or("skipped: no target"),
                step.length.as_secs_f64()
            );
            match &target {
                Some(_) => *report.fired.entry(step.fault.name().to_owned()).or_default() += 1,
                None => report.skipped += 1,
            }
            report.timeline.push(ChaosEvent {
                at_secs: at.as_secs_f64(),
                fault: step.fault,
                target: target.unwrap_or_default(),
                length_secs: step.length.as_secs_f64(),
                took_secs: took.as_secs_f64(),
            });
            report.unexpected_exits.extend(self.restore_processes(at).await?);
        }
        checks.push(Check::new("faults_injected", report.total() > 0, report.summary()));
        checks.push(Check::new(
            "no_process_died_on_its_own",
            report.unexpected_exits.is_empty(),
            if report.unexpected_exits.is_empty() {
                "every gateway and worker exit was one the drill caused".to_owned()
            } else {
                report.unexpected_exits.join("; ")
            },
        ));
        self.chaos = Some(report);
        Ok(())
    }

    /// Injects one step; returns what it hit (`None`: no target at this moment).
    async fn inject_step(&self, step: &Step) -> Result<Option<String>, BenchError> {
        let state = &self.cluster;
        let target = match step.fault {
            ChaosFault::WorkerKill | ChaosFault::WorkerPause => {
                let owners = shard_owners(state).await;
                let Some(&index) = nth(&owners, step.pick) else { return Ok(None) };
                if step.fault == ChaosFault::WorkerKill {
                    kill_worker_and_replace(state, index).await?;
                } else {
                    pause_process(state.snapshot().workers[index].pid, step.length).await?;
                }
                format!("worker {index} (shard owner)")
            }
            ChaosFault::GatewayRestart => {
                let count = state.snapshot().gateways.len();
                let Some(index) = nth(&(0..count).collect::<Vec<_>>(), step.pick).copied() else { return Ok(None) };
                let signal = if step.graceful { StopSignal::Term } else { StopSignal::Kill };
                let node = restart_gateway(state, index, signal, step.length).await?;
                format!("gateway {node} ({})", if step.graceful { "SIGTERM" } else { "SIGKILL" })
            }
            ChaosFault::GatewayPause => {
                let gateways = state.snapshot().gateways;
                let Some(gw) = nth(&gateways, step.pick) else { return Ok(None) };
                pause_process(gw.pid, step.length).await?;
                format!("gateway {}", gw.node_id)
            }
            ChaosFault::DbOutage => {
                let index = stop_server(state, "mariadb", false).await?;
                tokio::time::sleep(step.length).await;
                restart_server(state, index, None).await?;
                "mariadb".to_owned()
            }
            ChaosFault::RedisRestart => {
                let redis = stop_redis(state, true).await?;
                tokio::time::sleep(step.length).await;
                restart_redis(state, redis, None).await?;
                format!("{redis} (SIGKILL)")
            }
            ChaosFault::ReconnectStorm => {
                let Some(storm) = &self.load.storm else { return Ok(None) };
                storm.close_share(step.share, step.pick);
                format!("{:.0} % of the users", step.share * 100.0)
            }
        };
        Ok(Some(target))
    }

    /// Replaces workers and restarts gateways that are no longer running (a worker the drill killed
    /// was replaced already, so whatever is found here exited on its own); returns what it found.
    async fn restore_processes(&mut self, at: Duration) -> Result<Vec<String>, BenchError> {
        let mut found: Vec<String> = replace_dead_workers(&self.cluster)
            .await?
            .into_iter()
            .map(|index| format!("worker {index} exited on its own (found {:.0} s into the chaos)", at.as_secs_f64()))
            .collect();
        let gateways = self.cluster.snapshot().gateways;
        for (index, gw) in gateways.iter().enumerate() {
            if !process::is_alive(gw.pid) {
                restart_gateway(&self.cluster, index, StopSignal::Kill, Duration::ZERO).await?;
                found.push(format!(
                    "gateway {} exited on its own (found {:.0} s into the chaos)",
                    gw.node_id,
                    at.as_secs_f64()
                ));
            }
        }
        Ok(found)
    }
}

/// What a panicking task writes to its process's log.
const PANIC_MARK: &str = "panicked at";

/// The panics in the cluster's process logs (`*.log` in the cluster directory): per log file with
/// any, the count and the first panic's message line.
pub(super) fn panics_in_logs(dir: &Path) -> Vec<(String, u64, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found = Vec::new();
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")) {
        let Ok(text) = std::fs::read(&path) else { continue };
        let text = String::from_utf8_lossy(&text);
        let mut lines = text.lines();
        let (mut count, mut first) = (0, String::new());
        while let Some(line) = lines.next() {
            if line.contains(PANIC_MARK) {
                count += 1;
                if first.is_empty() {
                    // The message is on the line after "panicked at <file>".
                    first = lines.next().unwrap_or_default().trim().to_owned();
                }
            }
        }
        if count > 0 {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            found.push((name, count, first));
        }
    }
    found.sort();
    found
}

/// The candidate `pick` chooses (`None` when there is none).
fn nth<T>(candidates: &[T], pick: u64) -> Option<&T> {
    (!candidates.is_empty()).then(|| &candidates[(pick % candidates.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE_TTL: Duration = Duration::from_millis(1500);
    const ROUTE_TTL: Duration = Duration::from_millis(4000);

    fn steps(seed: u64, n: usize) -> Vec<Step> {
        let mut plan = ChaosPlan::new(seed, LEASE_TTL, ROUTE_TTL);
        (0..n).map(|_| plan.next_step()).collect()
    }

    #[test]
    fn one_seed_gives_one_schedule() {
        assert_eq!(steps(7, 50), steps(7, 50), "replayable with --seed");
        assert_ne!(steps(7, 50), steps(8, 50), "another seed, another schedule");
    }

    #[test]
    fn every_fault_comes_up_with_lengths_and_quiet_times_within_their_bounds() {
        let steps = steps(2026, 700);
        for fault in ChaosFault::ALL {
            let n = steps.iter().filter(|s| s.fault == fault).count();
            assert!(n > 60, "{} came up {n} times in 700 steps", fault.name());
        }
        let secs = |d: Duration| d.as_secs_f64();
        for s in &steps {
            assert!((QUIET_SECS.0..=QUIET_SECS.1).contains(&secs(s.quiet_before)), "{s:?}");
            let within = |(low, high): (f64, f64)| (low..=high).contains(&secs(s.length));
            let pause = |ttl: Duration| (PAUSE_TTL_FACTOR.0 * secs(ttl), PAUSE_TTL_FACTOR.1 * secs(ttl));
            let ok = match s.fault {
                ChaosFault::WorkerKill | ChaosFault::ReconnectStorm => s.length.is_zero(),
                ChaosFault::WorkerPause => within(pause(LEASE_TTL)),
                ChaosFault::GatewayPause => within(pause(ROUTE_TTL)),
                ChaosFault::GatewayRestart => within(GATEWAY_DOWN_SECS),
                ChaosFault::DbOutage => within(DB_DOWN_SECS),
                ChaosFault::RedisRestart => within(REDIS_DOWN_SECS),
            };
            assert!(ok, "{s:?}");
            assert!(!s.graceful || s.fault == ChaosFault::GatewayRestart, "only gateway restarts are graceful: {s:?}");
            if s.fault == ChaosFault::ReconnectStorm {
                assert!((STORM_SHARE.0..=STORM_SHARE.1).contains(&s.share), "{s:?}");
            }
        }
        // Pauses reach past the TTL in some steps and stay under it in others.
        let pauses: Vec<f64> =
            steps.iter().filter(|s| s.fault == ChaosFault::WorkerPause).map(|s| secs(s.length)).collect();
        assert!(pauses.iter().any(|&p| p > secs(LEASE_TTL)) && pauses.iter().any(|&p| p < secs(LEASE_TTL)));
    }

    #[test]
    fn panics_in_the_cluster_logs_are_counted_per_log() {
        let dir = std::env::temp_dir().join(format!("im-chaos-panics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let panic = "thread 'tokio-rt-worker' (7) panicked at src/x.rs:1:2:\nJoinHandle polled after completion\n";
        std::fs::write(dir.join("gateway-1.log"), format!("ok\n{panic}more\n{panic}")).unwrap();
        std::fs::write(dir.join("worker-0.log"), "INFO all fine\n").unwrap();
        std::fs::write(dir.join("notes.txt"), panic).unwrap();
        assert_eq!(
            panics_in_logs(&dir),
            vec![("gateway-1.log".to_owned(), 2, "JoinHandle polled after completion".to_owned())]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_target_is_picked_by_position_among_the_candidates() {
        assert_eq!(nth::<usize>(&[], 5), None);
        assert_eq!(nth(&[10, 11, 12], 4), Some(&11));
    }
}
