//! Fault drills (SPEC §3 on demand): start a cluster with private servers, offer bench load, inject one
//! fault while it runs, wait for the drain, check every receipt against the pushes and the rows, and
//! print a verdict.
//!
//! A drill only ever stops, kills or restarts what its cluster started itself: the private Redis and
//! MariaDB under the cluster directory, and the cluster's own gateways and workers. Pointed at a
//! cluster whose servers are shared (`--state` of an `ops up` without private servers), it refuses.
//!
//! While the load runs, a monitor polls [`im_ops::status::collect`] about every half second: the
//! total backlog (unsaved stream entries over all shards; the gateways' own per-shard figure is used
//! when a worker that owned the shard is gone), the save rate, and the resident memory of every
//! gateway and worker from `/proc`. The backlog peak and the time from the end of the fault until the
//! backlog is back to its pre-fault level with saves flowing again come from those samples.
//!
//! The verdict passes only when nothing receipted is lost (every `ACK(accepted)`/`ACK(saved)` message
//! was pushed to its receiver and has its row), no row is duplicated, no sender's messages arrived
//! out of order, and the drill's own checks hold (listed in `checks`, each with what it measured).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use im_common::config::{Config, Mode};
use im_ops::cluster::{self, ClusterSpec, ClusterState};
use im_ops::servers::PrivateServer;
use im_ops::status::{self, parse_metrics};

use crate::compare::kill_now;
use crate::load::{check_db, run_load, LoadResult};
use crate::recorder::Percentiles;
use crate::spec::{LoadSpec, Target};
use crate::BenchError;

/// Sampling interval of the monitor (two scrapes this far apart per sample).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(400);
/// Longest wait for the first accepted message before the drill gives up.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(120);

/// The drills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Drill {
    DbOutage,
    WorkerKill,
    GatewayRestart,
    RedisRestart,
    RedisOutage,
    SlowConsumers,
    Overload,
}

impl Drill {
    /// Every drill, in the order `ops drill all` would run them.
    pub const ALL: [Drill; 7] = [
        Drill::DbOutage,
        Drill::WorkerKill,
        Drill::RedisOutage,
        Drill::RedisRestart,
        Drill::GatewayRestart,
        Drill::SlowConsumers,
        Drill::Overload,
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
        }
    }

    /// Parses [`Drill::name`]'s output.
    pub fn parse(s: &str) -> Option<Drill> {
        Drill::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// How a gateway is taken down in `gateway-restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// Length of the fault (outages), or of the whole fault period (`worker-kill`).
    pub fault: Duration,
    /// The load; the drill stretches its window to cover the lead, the fault and a tail.
    pub load: LoadSpec,
    /// Base config of a cluster the drill starts (ignored with `state`).
    pub config: Config,
    pub gateways: usize,
    pub shards: u16,
    /// Worker processes (default: shards + 1, one standby).
    pub workers: Option<usize>,
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
    /// `overload`: the maximum sustainable rate the offered load is twice of.
    pub max_rate: f64,
    /// `slow-consumers`: bound on the fast receivers' E2E p99, as a multiple of the control run's.
    pub slow_p99_factor: f64,
    /// Pause between the load's first accepted messages and the fault, so the backlog and rates have
    /// a steady level to compare the recovery with.
    pub lead: Duration,
    /// Load kept up after the fault, to watch the recovery under load.
    pub tail: Duration,
}

impl DrillSpec {
    /// A drill with the defaults of `bench drill`: 200 connections at 400 msg/s over 2 gateways and
    /// 4 shards with one standby worker, a 4 s lead and an 8 s tail.
    pub fn new(drill: Drill, fault: Duration, out: PathBuf) -> DrillSpec {
        let load =
            LoadSpec { connections: 200, interval: LoadSpec::interval_for_rate(100, 400.0), ..LoadSpec::default() };
        DrillSpec {
            drill,
            fault,
            load,
            config: Config::default(),
            gateways: 2,
            shards: 4,
            workers: None,
            out,
            state: None,
            fail_open: None,
            kill_every: Duration::from_secs(4),
            signal: StopSignal::Kill,
            appendfsync: None,
            max_rate: 10_000.0,
            slow_p99_factor: 2.0,
            lead: Duration::from_secs(4),
            tail: Duration::from_secs(8),
        }
    }
}

/// One named check beyond the common ones.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was measured.
    pub detail: String,
}

impl Check {
    fn new(name: &str, passed: bool, detail: impl Into<String>) -> Check {
        Check { name: name.to_owned(), passed, detail: detail.into() }
    }
}

/// What one drill run found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillVerdict {
    pub drill: Drill,
    /// `fail_open=true`, `appendfsync=always`, ...
    pub variant: String,
    pub fault_secs: f64,
    pub connections: usize,
    pub offered_rate: f64,
    pub sent: u64,
    pub accepted: u64,
    pub saved: u64,
    /// Messages answered with an `ERROR` (see `errors_by_reason`).
    pub errored: u64,
    /// Neither `ACK(saved)` nor `ERROR` by the end of the drain.
    pub unanswered: u64,
    pub delivered: u64,
    /// Receipted messages never pushed to their receiver plus receipted messages without a row.
    pub lost: u64,
    pub lost_pushes: u64,
    pub missing_rows: u64,
    /// Receipted, not pushed, to a receiver that could not stay or get connected.
    pub undelivered_receiver_gone: u64,
    pub duplicate_rows: u64,
    pub duplicate_deliveries: u64,
    pub reorders: u64,
    pub id_mismatches: u64,
    /// Client reconnects (load with reconnect on).
    pub reconnects: u64,
    /// Highest total backlog seen (unsaved stream entries, all shards).
    pub backlog_peak: f64,
    /// Backlog before the fault (highest sample), the level "recovered" returns to.
    pub backlog_before: f64,
    /// From the end of the fault until the backlog is back to its pre-fault level and saves flow.
    pub time_to_recover_secs: Option<f64>,
    pub saved_ms: Percentiles,
    pub end_to_end_ms: Percentiles,
    /// Peak resident memory per process, MiB.
    pub rss_peak_mib: BTreeMap<String, f64>,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    pub passed: bool,
    /// The run directory of this drill (cluster logs, verdict JSON).
    pub dir: PathBuf,
}

impl DrillVerdict {
    /// A terminal summary.
    pub fn render(&self) -> String {
        let mut out = format!(
            "drill {}{}: {}\n",
            self.drill.name(),
            if self.variant.is_empty() { String::new() } else { format!(" ({})", self.variant) },
            if self.passed { "PASSED" } else { "FAILED" }
        );
        out += &format!(
            "  load {} connections at {:.0} msg/s; fault {:.0} s\n",
            self.connections, self.offered_rate, self.fault_secs
        );
        out += &format!(
            "  sent {}  accepted {}  saved {}  errored {}  unanswered {}  delivered {}\n",
            self.sent, self.accepted, self.saved, self.errored, self.unanswered, self.delivered
        );
        out += &format!(
            "  lost {} (pushes {}, rows {})  duplicate rows {}  duplicate deliveries {}  reorders {}  id mismatches {}  reconnects {}\n",
            self.lost,
            self.lost_pushes,
            self.missing_rows,
            self.duplicate_rows,
            self.duplicate_deliveries,
            self.reorders,
            self.id_mismatches,
            self.reconnects
        );
        let recover = self.time_to_recover_secs.map_or_else(|| "not seen".to_owned(), |s| format!("{s:.1} s"));
        out += &format!(
            "  backlog peak {:.0} (before {:.0})  time to recover {recover}  saved p99 {:.0} ms  E2E p99 {:.0} ms\n",
            self.backlog_peak, self.backlog_before, self.saved_ms.p99, self.end_to_end_ms.p99
        );
        if !self.rss_peak_mib.is_empty() {
            let rss: Vec<String> = self.rss_peak_mib.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
            out += &format!("  RSS peak MiB: {}\n", rss.join(", "));
        }
        if !self.errors_by_reason.is_empty() {
            let errors: Vec<String> = self.errors_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("  errors: {}\n", errors.join(", "));
        }
        for c in &self.checks {
            out += &format!("  [{}] {}: {}\n", if c.passed { "ok" } else { "FAIL" }, c.name, c.detail);
        }
        for n in &self.notes {
            out += &format!("  note: {n}\n");
        }
        out += &format!("  logs: {}\n", self.dir.display());
        out
    }
}

/// Runs the drill (twice for `redis-outage` without a fixed fail-open setting; a control run first
/// for `slow-consumers`) and returns a verdict per run.
pub async fn run(spec: &DrillSpec) -> Result<Vec<DrillVerdict>, BenchError> {
    spec.load.validate()?;
    let existing = match &spec.state {
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
        let run = DrillRun::prepare(spec, existing.clone(), fail_open).await?;
        verdicts.push(run.execute().await?);
    }
    if let (Some(path), Some(last)) = (&spec.state, verdicts.last()) {
        // Restarted processes and servers have new pids: keep `ops down` able to find them.
        if let Ok(state) = cluster::load_state(&last.dir.join("cluster.json")) {
            cluster::save_state(&state, path)?;
        }
    }
    Ok(verdicts)
}

/// The cluster a drill works on, shared by the fault injector (which replaces pids and server
/// handles) and the monitor (which reads the current endpoints).
type SharedState = Arc<Mutex<ClusterState>>;

fn snapshot(state: &SharedState) -> ClusterState {
    state.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn update(state: &SharedState, f: impl FnOnce(&mut ClusterState)) {
    f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Kills a cluster the drill started when the drill ends early (error, Ctrl-C).
struct ClusterGuard {
    state: SharedState,
    owned: bool,
    stopped: bool,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.owned && !self.stopped {
            let state = snapshot(&self.state);
            kill_now(&state);
            eprintln!("drill cluster in {} killed", state.dir.display());
        }
    }
}

/// One drill run on one cluster.
struct DrillRun<'a> {
    spec: &'a DrillSpec,
    variant: String,
    dir: PathBuf,
    guard: ClusterGuard,
    load: LoadSpec,
    notes: Vec<String>,
}

impl<'a> DrillRun<'a> {
    async fn prepare(
        spec: &'a DrillSpec,
        existing: Option<ClusterState>,
        fail_open: Option<bool>,
    ) -> Result<DrillRun<'a>, BenchError> {
        let mut variant = Vec::new();
        let mut config = spec.config.clone();
        // A short lease, so a killed owner's shard moves within a couple of seconds.
        config.two_phase.lease_ttl_ms = config.two_phase.lease_ttl_ms.min(1500);
        config.two_phase.block_ms = config.two_phase.block_ms.min(config.two_phase.max_block_ms());
        // The bench's senders must not hit the per-connection rate limit by accident.
        config.gateway.rate_per_sec = config.gateway.rate_per_sec.max(1000);
        config.gateway.rate_burst = config.gateway.rate_burst.max(2000);
        if let Some(open) = fail_open {
            config.two_phase.fail_open = open;
            variant.push(format!("fail_open={open}"));
        }
        if spec.drill == Drill::SlowConsumers {
            // A small outbound queue, so a slow reader is found out within seconds, not minutes.
            config.gateway.outbound_queue = config.gateway.outbound_queue.min(64);
            // A bounded kernel buffer, as an operator with many connections would set: a stalled
            // reader is then noticed within the window instead of after megabytes.
            config.gateway.socket_send_buffer = 65_536;
        }
        if spec.drill == Drill::Overload {
            // Admission control must bite before memory does.
            config.two_phase.max_backlog = config.two_phase.max_backlog.min(20_000);
        }
        let name = if variant.is_empty() {
            spec.drill.name().to_owned()
        } else {
            format!("{}-{}", spec.drill.name(), variant.join("-").replace('=', "-"))
        };
        let dir = spec.out.join(&name);
        std::fs::create_dir_all(&dir)
            .map_err(|source| BenchError::Io { what: format!("create {}", dir.display()), source })?;
        let (state, owned) = match existing {
            Some(state) => (state, false),
            None => {
                let cluster_spec = ClusterSpec {
                    config,
                    gateways: spec.gateways,
                    shards: spec.shards,
                    workers: spec.workers.unwrap_or(usize::from(spec.shards) + 1),
                    mode: Mode::Full,
                    dir: dir.join("cluster"),
                    force_private: true,
                };
                eprintln!("[{name}] starting a cluster with private servers in {}", cluster_spec.dir.display());
                (cluster::start(&cluster_spec).await?, true)
            }
        };
        cluster::save_state(&state, &dir.join("cluster.json"))?;
        let guard = ClusterGuard { state: Arc::new(Mutex::new(state)), owned, stopped: false };
        let mut load = spec.load.clone();
        load.label = name.clone();
        if spec.drill == Drill::RedisRestart {
            let policy = spec.appendfsync.clone().or_else(|| {
                snapshot(&guard.state).private_servers.iter().find(|s| s.kind_name == "redis")?.appendfsync.clone()
            });
            variant.push(format!("appendfsync={}", policy.unwrap_or_else(|| "unknown".into())));
        }
        Ok(DrillRun { spec, variant: variant.join(", "), dir, guard, load, notes: Vec::new() })
    }

    /// Runs the load with the fault, then checks.
    async fn execute(mut self) -> Result<DrillVerdict, BenchError> {
        let spec = self.spec;
        let mut checks = Vec::new();
        let mut control_e2e_p99 = None;
        match spec.drill {
            Drill::GatewayRestart | Drill::SlowConsumers => self.load.reconnect = true,
            Drill::Overload => {
                self.load.interval = LoadSpec::interval_for_rate(self.load.pairs(), 2.0 * spec.max_rate);
            }
            _ => {}
        }
        // How long the load sends: the lead, the fault, and a tail to watch the recovery under load.
        let window = match spec.drill {
            Drill::SlowConsumers | Drill::Overload => spec.fault.max(Duration::from_secs(10)),
            _ => spec.lead + spec.fault + spec.tail,
        };
        self.load.duration = window;
        self.load.drain = self.load.drain.max(spec.fault + Duration::from_secs(30));

        if spec.drill == Drill::SlowConsumers {
            // Same load, everyone reading at full speed: the p99 the fast receivers are held to.
            let mut control = self.load.clone();
            control.slow_receivers = 0.0;
            control.label = format!("{}-control", self.load.label);
            let target = Target::from_state(&snapshot(&self.guard.state))?;
            let result = run_load(&target, &control).await?;
            let p99 = Percentiles::of(&result.histograms.end_to_end).p99;
            self.notes.push(format!("control run (no slow receivers): E2E p99 {p99:.1} ms"));
            control_e2e_p99 = Some(p99);
        }

        let target = Target::from_state(&snapshot(&self.guard.state))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let monitor = tokio::spawn(monitor(self.guard.state.clone(), stop_rx));
        let load_spec = self.load.clone();
        let mut load_task = tokio::spawn(async move { run_load(&target, &load_spec).await });

        let fault = match wait_for_traffic(&self.guard.state, &mut load_task).await {
            Ok(()) => {
                tokio::time::sleep(spec.lead).await;
                self.inject(&mut checks).await
            }
            Err(e) => Err(e),
        };
        let load_result = load_task.await;
        let _ = stop_tx.send(true);
        let samples = monitor.await.unwrap_or_default();
        let fault = fault?;
        let result = match load_result {
            Ok(r) => r?,
            Err(e) => return Err(BenchError::InvalidSpec(format!("load task failed: {e}"))),
        };
        let state = snapshot(&self.guard.state);
        cluster::save_state(&state, &self.dir.join("cluster.json"))?;
        let rows = check_db(&state.mysql_url, &result).await?;

        let verdict = self.verdict(&result, &rows, &samples, fault, checks, control_e2e_p99);
        let json = serde_json::to_string_pretty(&verdict).unwrap_or_default();
        let _ = std::fs::write(self.dir.join("verdict.json"), json);
        let _ = std::fs::write(
            self.dir.join("report.json"),
            serde_json::to_string_pretty(&crate::RunReport::new(&result, Some(rows))).unwrap_or_default(),
        );
        if self.guard.owned {
            self.guard.stopped = true;
            cluster::stop(&state).await?;
            if verdict.passed {
                // The logs stay; the private servers' data (hundreds of MB of InnoDB files) goes.
                for server in &state.private_servers {
                    let _ = std::fs::remove_dir_all(server.dir.join("data"));
                }
            }
        }
        Ok(verdict)
    }

    /// Injects the drill's fault; returns when it is over (the instant the fault ended).
    async fn inject(&mut self, checks: &mut Vec<Check>) -> Result<FaultWindow, BenchError> {
        let spec = self.spec;
        let state = &self.guard.state;
        let began = Instant::now();
        match spec.drill {
            Drill::DbOutage => {
                let db = stop_server(state, "mariadb", false).await?;
                eprintln!("[{}] MariaDB stopped for {:?}", self.load.label, spec.fault);
                tokio::time::sleep(spec.fault).await;
                restart_server(state, db, None).await?;
                eprintln!("[{}] MariaDB back", self.load.label);
            }
            Drill::RedisOutage => {
                let redis = stop_server(state, "redis", false).await?;
                eprintln!("[{}] Redis stopped for {:?}", self.load.label, spec.fault);
                tokio::time::sleep(spec.fault).await;
                restart_server(state, redis, None).await?;
                eprintln!("[{}] Redis back", self.load.label);
            }
            Drill::RedisRestart => {
                // A crash, not a shutdown: what the AOF fsync policy promises is about exactly this.
                let redis = stop_server(state, "redis", true).await?;
                let old = snapshot(state).private_servers[redis].appendfsync.clone();
                eprintln!("[{}] Redis killed (SIGKILL), restarting", self.load.label);
                restart_server(state, redis, spec.appendfsync.as_deref()).await?;
                let policy = spec.appendfsync.clone().or(old).unwrap_or_else(|| "unknown".into());
                self.notes.push(match policy.as_str() {
                    "always" => "appendfsync always: every write is fsynced before Redis answers, so nothing \
                                 that got ACK(accepted) may be lost by a Redis crash (checked: lost = 0)"
                        .to_owned(),
                    "everysec" => "appendfsync everysec: up to about one second of accepted writes may be lost by a \
                                   Redis crash (SPEC §3.1); lost > 0 here is the policy's documented cost"
                        .to_owned(),
                    other => format!("appendfsync {other}: the OS decides when to flush; no durability promise"),
                });
            }
            Drill::WorkerKill => {
                let until = began + spec.fault;
                let mut kills = 0;
                while Instant::now() < until {
                    let Some(victim) = shard_owner(state, kills).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    kill_worker_and_replace(state, victim).await?;
                    kills += 1;
                    eprintln!("[{}] killed a shard owner (kill {kills})", self.load.label);
                    tokio::time::sleep(spec.kill_every.min(until.saturating_duration_since(Instant::now()))).await;
                }
                checks.push(Check::new(
                    "owners_killed",
                    kills > 0,
                    format!("{kills} shard owners killed with SIGKILL"),
                ));
            }
            Drill::GatewayRestart => {
                let gw = snapshot(state).gateways[0].clone();
                match spec.signal {
                    StopSignal::Kill => {
                        // SAFETY: signalling a gateway this drill's cluster started.
                        unsafe { libc::kill(gw.pid as libc::pid_t, libc::SIGKILL) };
                        while cluster::pid_alive(gw.pid) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    StopSignal::Term => cluster::terminate(gw.pid, Duration::from_secs(10)).await,
                }
                eprintln!("[{}] gateway {} stopped ({:?})", self.load.label, gw.node_id, spec.signal);
                tokio::time::sleep(spec.fault).await;
                let (dir, config) = {
                    let s = snapshot(state);
                    (s.dir.clone(), s.config_path.clone())
                };
                let node = gw.node_id;
                let fresh = tokio::task::spawn_blocking(move || cluster::spawn_gateway(&dir, &config, node))
                    .await
                    .map_err(|e| BenchError::InvalidSpec(format!("gateway restart task: {e}")))??;
                update(state, |s| s.gateways[0] = fresh);
                eprintln!("[{}] gateway {node} started again", self.load.label);
            }
            Drill::SlowConsumers | Drill::Overload => {
                // The load is the fault: watch it for its window.
                tokio::time::sleep(self.load.duration).await;
            }
        }
        Ok(FaultWindow { began, ended: Instant::now() })
    }

    fn verdict(
        &mut self,
        result: &LoadResult,
        rows: &crate::checker::RowVerdict,
        samples: &[Sample],
        fault: FaultWindow,
        mut checks: Vec<Check>,
        control_e2e_p99: Option<f64>,
    ) -> DrillVerdict {
        let spec = self.spec;
        let v = &result.verdict;
        let before: f64 = samples.iter().filter(|s| s.at < fault.began).map(|s| s.backlog).fold(0.0, f64::max);
        let peak = samples.iter().map(|s| s.backlog).fold(0.0, f64::max);
        let recovered = samples
            .iter()
            .find(|s| s.at >= fault.ended && s.backlog <= before && (s.saved_per_sec > 0.0 || s.backlog == 0.0));
        let time_to_recover = recovered.map(|s| s.at.saturating_duration_since(fault.ended).as_secs_f64());
        let mut rss: BTreeMap<String, f64> = BTreeMap::new();
        for s in samples {
            for (name, mib) in &s.rss_mib {
                let e = rss.entry(name.clone()).or_default();
                *e = e.max(*mib);
            }
        }
        let errors = result.errors.clone();
        let saved_ms = Percentiles::of(&result.histograms.saved);
        let e2e = Percentiles::of(&result.histograms.end_to_end);
        checks.push(Check::new(
            "every_message_answered",
            v.unanswered == 0,
            format!("{} messages without ACK(saved) or ERROR after the drain", v.unanswered),
        ));
        checks.push(Check::new(
            "recovered",
            time_to_recover.is_some(),
            time_to_recover.map_or_else(
                || "the backlog never returned to its pre-fault level with saves flowing".to_owned(),
                |t| format!("{t:.1} s after the fault ended"),
            ),
        ));
        let busy_like = |reason: &str| matches!(reason, "server_busy" | "too_many_requests");
        match spec.drill {
            Drill::DbOutage => {
                checks.push(Check::new(
                    "accepted_during_outage",
                    v.errored == 0 && v.accepted == v.sent,
                    format!("{} of {} sent got ACK(accepted); {} errors", v.accepted, v.sent, v.errored),
                ));
                checks.push(Check::new(
                    "backlog_grew_and_drained",
                    peak > before,
                    format!("backlog {before:.0} before, peak {peak:.0}"),
                ));
            }
            Drill::RedisOutage => {
                let open = self.variant.contains("fail_open=true");
                let busy = errors.get("server_busy").copied().unwrap_or(0);
                if open {
                    // Saved without ACK(accepted): taken by the baseline path. A connection whose earlier
                    // messages were still in the stream gets server_busy instead (order, SPEC §3.4).
                    let other: u64 = errors.iter().filter(|(k, _)| k.as_str() != "server_busy").map(|(_, n)| n).sum();
                    let baseline = v.saved.saturating_sub(v.accepted);
                    checks.push(Check::new(
                        "saved_through_baseline_path",
                        baseline > 0 && other == 0,
                        format!(
                            "{baseline} saved through the baseline path; {busy} server_busy (connections with \
                             messages still in the stream); {other} other errors"
                        ),
                    ));
                } else {
                    let other: u64 = errors.iter().filter(|(k, _)| !busy_like(k)).map(|(_, n)| n).sum();
                    checks.push(Check::new(
                        "server_busy_while_down",
                        busy > 0,
                        format!("{busy} server_busy answers; {other} other errors"),
                    ));
                }
            }
            Drill::RedisRestart => {}
            Drill::WorkerKill => {}
            Drill::GatewayRestart => {
                checks.push(Check::new(
                    "clients_reconnected",
                    result.reconnects > 0,
                    format!("{} reconnects", result.reconnects),
                ));
            }
            Drill::SlowConsumers => {
                let fast = Percentiles::of(&result.histograms.end_to_end).p99;
                let bound = control_e2e_p99.map(|c| (c * spec.slow_p99_factor).max(c + 50.0)).unwrap_or(250.0);
                checks.push(Check::new(
                    "fast_receivers_unaffected",
                    fast <= bound,
                    format!("fast receivers' E2E p99 {fast:.1} ms, bound {bound:.1} ms"),
                ));
                let disconnects = |slow: bool| -> u64 {
                    errors
                        .iter()
                        .filter(|(k, _)| k.starts_with(crate::load::SLOW_RECEIVER_PREFIX) == slow)
                        .filter(|(k, _)| k.contains("closed_") || k.contains("disconnected"))
                        .map(|(_, n)| n)
                        .sum()
                };
                let (dropped, fast_dropped) = (disconnects(true), disconnects(false));
                let with_reason = errors.get(&format!("{}closed_slow_consumer", crate::load::SLOW_RECEIVER_PREFIX));
                checks.push(Check::new(
                    "slow_receivers_disconnected",
                    dropped > 0,
                    format!(
                        "{dropped} slow receiver disconnects ({} with the close frame `slow_consumer`; a writer \
                         stuck on a full socket cannot send it); {} reconnects",
                        with_reason.copied().unwrap_or(0),
                        result.reconnects
                    ),
                ));
                checks.push(Check::new(
                    "fast_receivers_kept",
                    fast_dropped == 0,
                    format!("{fast_dropped} disconnects of fast receivers"),
                ));
                checks.push(Check::new(
                    "slow_receivers_recovered",
                    v.undelivered_receiver_gone == 0 && v.lost == 0,
                    format!("{} undelivered, {} lost", v.undelivered_receiver_gone, v.lost),
                ));
            }
            Drill::Overload => {
                let rejected: u64 = errors.iter().filter(|(k, _)| busy_like(k)).map(|(_, n)| n).sum();
                let other: u64 = errors.iter().filter(|(k, _)| !busy_like(k)).map(|(_, n)| n).sum();
                checks.push(Check::new(
                    "rest_refused_clearly",
                    other == 0,
                    format!("{rejected} server_busy/too_many_requests, {other} other errors"),
                ));
                checks.push(Check::new(
                    "admitted_p99_bounded",
                    saved_ms.p99 <= 5_000.0,
                    format!("admitted messages' saved p99 {:.0} ms (bound 5000 ms)", saved_ms.p99),
                ));
                let max_rss = rss.values().copied().fold(0.0, f64::max);
                checks.push(Check::new(
                    "memory_bounded",
                    max_rss <= 1024.0,
                    format!("largest gateway/worker RSS {max_rss:.0} MiB (bound 1024 MiB)"),
                ));
            }
        }
        let lost = v.lost + rows.missing;
        let passed = lost == 0 && rows.duplicated == 0 && v.reorders == 0 && checks.iter().all(|c| c.passed);
        DrillVerdict {
            drill: spec.drill,
            variant: self.variant.clone(),
            fault_secs: fault.ended.saturating_duration_since(fault.began).as_secs_f64(),
            connections: self.load.connections,
            offered_rate: self.load.offered_rate(),
            sent: v.sent,
            accepted: v.accepted,
            saved: v.saved,
            errored: v.errored,
            unanswered: v.unanswered,
            delivered: v.delivered,
            lost,
            lost_pushes: v.lost,
            missing_rows: rows.missing,
            undelivered_receiver_gone: v.undelivered_receiver_gone,
            duplicate_rows: rows.duplicated,
            duplicate_deliveries: v.duplicates,
            reorders: v.reorders,
            id_mismatches: v.id_mismatches + rows.id_mismatches,
            reconnects: result.reconnects,
            backlog_peak: peak,
            backlog_before: before,
            time_to_recover_secs: time_to_recover,
            saved_ms,
            end_to_end_ms: e2e,
            rss_peak_mib: rss,
            errors_by_reason: errors,
            checks,
            notes: std::mem::take(&mut self.notes),
            passed,
            dir: self.dir.clone(),
        }
    }
}

/// When the fault began and ended.
#[derive(Debug, Clone, Copy)]
struct FaultWindow {
    began: Instant,
    ended: Instant,
}

/// One monitor sample.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    backlog: f64,
    saved_per_sec: f64,
    rss_mib: Vec<(String, f64)>,
}

/// Samples backlog, save rate and RSS until told to stop.
async fn monitor(state: SharedState, mut stop: watch::Receiver<bool>) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !*stop.borrow() {
        tokio::select! {
            s = sample(&state) => samples.push(s),
            _ = stop.wait_for(|&s| s) => break,
        }
    }
    // One more after the load: a load that drains quickly may end before the next regular sample,
    // and the recovery check needs to see the state after the fault.
    samples.push(sample(&state).await);
    samples
}

async fn sample(state: &SharedState) -> Sample {
    let current = snapshot(state);
    let status = status::collect(&current, SAMPLE_INTERVAL).await;
    let gateway_backlog = gateway_backlogs(&current).await;
    let backlog =
        status.shards.iter().map(|s| s.backlog.max(gateway_backlog.get(&s.shard).copied().unwrap_or(0.0))).sum();
    let saved_per_sec = status.shards.iter().map(|s| s.saved_per_sec).sum();
    let rss_mib = current
        .gateways
        .iter()
        .map(|g| (format!("gateway-{}", g.node_id), g.pid))
        .chain(current.workers.iter().enumerate().map(|(i, w)| (format!("worker-{i}"), w.pid)))
        .filter_map(|(name, pid)| rss_mib(pid).map(|m| (name, m)))
        .collect();
    Sample { at: Instant::now(), backlog, saved_per_sec, rss_mib }
}

/// Each shard's backlog as the gateways see it (`im_gateway_shard_backlog`, refreshed from Redis every
/// 250 ms): still there while the worker that owned the shard is dead.
async fn gateway_backlogs(state: &ClusterState) -> BTreeMap<u16, f64> {
    let mut out: BTreeMap<u16, f64> = BTreeMap::new();
    for g in &state.gateways {
        let Some((200, page)) = cluster::http_get(&g.metrics_url).await else { continue };
        for s in parse_metrics(&page).into_iter().filter(|s| s.name == "im_gateway_shard_backlog") {
            if let Some(shard) = s.labels.get("shard").and_then(|v| v.parse().ok()) {
                let e = out.entry(shard).or_default();
                *e = e.max(s.value);
            }
        }
    }
    out
}

/// Resident memory of `pid` in MiB, from `/proc/<pid>/status`.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Waits until the gateways report accepted messages (the load is sending), or the load ended early.
async fn wait_for_traffic(
    state: &SharedState,
    load: &mut tokio::task::JoinHandle<Result<LoadResult, BenchError>>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    while Instant::now() < deadline {
        if load.is_finished() {
            return Err(BenchError::InvalidSpec("the load ended before any message was accepted".into()));
        }
        let status = status::collect(&snapshot(state), Duration::from_millis(250)).await;
        if status.shards.iter().any(|s| s.accepted_per_sec > 0.0) {
            return Ok(());
        }
    }
    Err(BenchError::InvalidSpec(format!("no message accepted within {TRAFFIC_TIMEOUT:?}")))
}

/// Index of the cluster's private server of `kind`.
fn server_index(state: &SharedState, kind: &str) -> Result<usize, BenchError> {
    snapshot(state).private_servers.iter().position(|s| s.kind_name == kind).ok_or_else(|| {
        BenchError::InvalidSpec(format!("the cluster has no private {kind} server: a drill never touches shared ones"))
    })
}

/// Stops (`kill`: SIGKILL, else a graceful stop) the cluster's private server of `kind`; returns its index.
async fn stop_server(state: &SharedState, kind: &str, kill: bool) -> Result<usize, BenchError> {
    let index = server_index(state, kind)?;
    let server = snapshot(state).private_servers[index].clone();
    if kill {
        server.kill();
    } else {
        server.stop().await.map_err(cluster::ClusterError::from)?;
    }
    Ok(index)
}

/// Starts the stopped server `index` again (Redis with `appendfsync` if given) and records its new pid.
async fn restart_server(state: &SharedState, index: usize, appendfsync: Option<&str>) -> Result<(), BenchError> {
    let server = snapshot(state).private_servers[index].clone();
    let fresh = match appendfsync {
        Some(policy) if server.kind_name == "redis" => {
            let old = server.clone();
            while old.is_running() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            PrivateServer::start_redis(&server.dir, server.port, policy).await
        }
        _ => server.restart().await,
    }
    .map_err(cluster::ClusterError::from)?;
    update(state, |s| s.private_servers[index] = fresh);
    Ok(())
}

/// The index (in the state's worker list) of a worker that holds a shard lease now; the `turn`-th
/// such worker in round robin, so kills spread over shards.
async fn shard_owner(state: &SharedState, turn: usize) -> Option<usize> {
    let workers = snapshot(state).workers;
    let mut owners = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let Some((200, page)) = cluster::http_get(&w.metrics_url).await else { continue };
        if parse_metrics(&page).iter().any(|s| s.name == "im_worker_lease_held" && s.value == 1.0) {
            owners.push(i);
        }
    }
    (!owners.is_empty()).then(|| owners[turn % owners.len()])
}

/// `kill -9` worker `index` and start a standby in its place, so the pool never runs dry.
async fn kill_worker_and_replace(state: &SharedState, index: usize) -> Result<(), BenchError> {
    let (victim, dir, config, serial) = {
        let s = snapshot(state);
        (s.workers[index].pid, s.dir.clone(), s.config_path.clone(), next_worker_serial(&s.dir))
    };
    // SAFETY: signalling a worker this drill's cluster started.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) };
    let fresh = tokio::task::spawn_blocking(move || cluster::spawn_worker(&dir, &config, serial, None))
        .await
        .map_err(|e| BenchError::InvalidSpec(format!("worker restart task: {e}")))??;
    update(state, |s| s.workers[index] = fresh);
    Ok(())
}

/// A worker index no earlier worker of this cluster used (its log and ready file names).
fn next_worker_serial(dir: &Path) -> usize {
    (0..).find(|i| !dir.join(format!("worker-{i}.log")).exists()).unwrap_or(0)
}
