//! One drill run on one cluster: [`DrillRun::prepare`] sets the config the drill needs and starts
//! (or adopts) the cluster; [`DrillRun::execute`] runs the load with the fault, then checks.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use im_common::config::Mode;
use im_harness::cluster::{ClusterSpec, ClusterState};
use im_harness::guard::ClusterGuard;

use super::faults::redis_appendfsync;
use super::monitor::{monitor, wait_for_traffic};
use super::{Drill, DrillCluster, DrillSpec, DrillVerdict, STATE_FILE};
use crate::load::run_load;
use crate::recorder::Percentiles;
use crate::run::check_db_all;
use crate::spec::{Churn, LoadSpec, Target};
use crate::BenchError;

/// A lease this short moves a killed owner's shard within a couple of seconds.
const DRILL_LEASE_TTL_MS: u64 = 1500;
/// The bench's senders must not hit the per-connection rate limit by accident.
const DRILL_RATE_PER_SEC: u32 = 1000;
const DRILL_RATE_BURST: u32 = 2000;
/// slow-consumers: a small outbound queue finds a slow reader within seconds, not minutes.
const SLOW_CONSUMER_QUEUE: usize = 64;
/// overload: admission control must bite before memory does.
const OVERLOAD_MAX_BACKLOG: u64 = 20_000;
/// overload: the most `gateway.shed_wait_ms` may be: what holds the admitted messages' saved p99
/// under 0.5 s at 2× on the 2-core box, where every process shares the CPU.
const OVERLOAD_SHED_WAIT_MS: u64 = 50;
/// overload: the most `gateway.shed_append_ms` may be, for the same reason.
const OVERLOAD_SHED_APPEND_MS: u64 = 10;
/// slow-consumers and overload: the shortest loaded window.
const MIN_LOADED_WINDOW: Duration = Duration::from_secs(10);
/// `overload` without `--max-rate`: how long the closed-loop probe of the maximum rate measures.
const MAX_RATE_PROBE: Duration = Duration::from_secs(8);
/// The drain allowance beyond the fault.
const DRAIN_BEYOND_FAULT: Duration = Duration::from_secs(30);
/// chaos: a short route TTL, so a paused gateway's routes lapse within seconds (its pauses are
/// 0.5–2 × this) — with the default 30 s a pause long enough to lapse would last a minute.
const CHAOS_ROUTE_TTL_MS: u64 = 4000;
/// chaos: the drain allowance after the load stops (the last fault ended before the load's tail).
const CHAOS_DRAIN: Duration = Duration::from_secs(60);

/// One drill run on one cluster.
pub(super) struct DrillRun<'a> {
    pub spec: &'a DrillSpec,
    pub variant: String,
    pub dir: PathBuf,
    pub cluster: DrillCluster,
    /// Owns the cluster when the drill started it (`None` for a cluster given with `--state`).
    pub guard: Option<ClusterGuard>,
    pub load: LoadSpec,
    pub notes: Vec<String>,
    /// chaos: the seed of the fault schedule.
    pub seed: Option<u64>,
    /// chaos: what the schedule did.
    pub chaos: Option<super::ChaosReport>,
}

impl<'a> DrillRun<'a> {
    pub async fn prepare(
        spec: &'a DrillSpec,
        existing: Option<ClusterState>,
        fail_open: Option<bool>,
    ) -> Result<DrillRun<'a>, BenchError> {
        let mut variant = Vec::new();
        let mut config = spec.config.clone();
        // A short lease, so a killed owner's shard moves within a couple of seconds.
        config.two_phase.lease_ttl_ms = config.two_phase.lease_ttl_ms.min(DRILL_LEASE_TTL_MS);
        config.two_phase.block_ms = config.two_phase.block_ms.min(config.two_phase.max_block_ms());
        // The bench's senders must not hit the per-connection rate limit by accident.
        config.gateway.rate_per_sec = config.gateway.rate_per_sec.max(DRILL_RATE_PER_SEC);
        config.gateway.rate_burst = config.gateway.rate_burst.max(DRILL_RATE_BURST);
        if let Some(open) = fail_open {
            config.two_phase.fail_open = open;
            variant.push(format!("fail_open={open}"));
        }
        if spec.drill == Drill::SlowConsumers {
            // A small outbound queue, so a slow reader is found out within seconds, not minutes.
            config.gateway.outbound_queue = config.gateway.outbound_queue.min(SLOW_CONSUMER_QUEUE);
        }
        if spec.drill == Drill::Overload {
            // Admission control must bite before memory does.
            config.two_phase.max_backlog = config.two_phase.max_backlog.min(OVERLOAD_MAX_BACKLOG);
            // Refusing by the oldest message's wait and by the append round trip is what keeps
            // admitted messages fast; tighter than the defaults, which leave room for slow disks
            // and networks (docs/OPERATIONS.md).
            if config.gateway.shed_wait_ms == 0 || config.gateway.shed_wait_ms > OVERLOAD_SHED_WAIT_MS {
                config.gateway.shed_wait_ms = OVERLOAD_SHED_WAIT_MS;
            }
            if config.gateway.shed_append_ms == 0 || config.gateway.shed_append_ms > OVERLOAD_SHED_APPEND_MS {
                config.gateway.shed_append_ms = OVERLOAD_SHED_APPEND_MS;
            }
        }
        let seed = spec.drill.seeded().then(|| spec.seed.unwrap_or_else(rand::random));
        if let Some(seed) = seed {
            if spec.drill == Drill::Chaos {
                config.gateway.route_ttl_ms = config.gateway.route_ttl_ms.min(CHAOS_ROUTE_TTL_MS);
            }
            eprintln!("[{}] seed {seed} (replay with --seed {seed})", spec.drill.name());
            variant.push(format!("seed={seed}"));
        }
        let name = if variant.is_empty() {
            spec.drill.name().to_owned()
        } else {
            format!("{}-{}", spec.drill.name(), variant.join("-").replace('=', "-"))
        };
        let dir = spec.out.join(&name);
        std::fs::create_dir_all(&dir)
            .map_err(|source| BenchError::Io { what: format!("create {}", dir.display()), source })?;
        let state_file = dir.join(STATE_FILE);
        let (state, guard): (ClusterState, Option<ClusterGuard>) = match existing {
            Some(state) => (state, None),
            None => {
                let mut cluster_spec =
                    ClusterSpec::new(config, Mode::Full, spec.gateways, spec.shards, dir.join("cluster"));
                cluster_spec.workers = spec.workers.unwrap_or(usize::from(spec.shards) + 1);
                cluster_spec.state_file = state_file.clone();
                cluster_spec.force_private = true;
                cluster_spec.redis_cluster = spec.redis_cluster;
                eprintln!("[{name}] starting a cluster with private servers in {}", cluster_spec.dir.display());
                let guard = ClusterGuard::start(&cluster_spec).await?;
                (guard.state.clone(), Some(guard))
            }
        };
        let cluster = DrillCluster::new(state, state_file)?;
        let mut load = spec.load.clone();
        load.label = name.clone();
        if spec.drill == Drill::RedisRestart {
            let policy = spec.appendfsync.clone().or_else(|| redis_appendfsync(&cluster.snapshot()));
            variant.push(format!("appendfsync={}", policy.unwrap_or_else(|| "unknown".into())));
        }
        Ok(DrillRun {
            spec,
            variant: variant.join(", "),
            dir,
            cluster,
            guard,
            load,
            notes: Vec::new(),
            seed,
            chaos: None,
        })
    }

    /// `overload` without a given maximum: what the cluster saves with every sender in closed loop
    /// (each sends its next message once the last is saved) for [`MAX_RATE_PROBE`] — the most it
    /// does on this machine, the bench's own CPU included.
    async fn measure_max_rate(&mut self) -> Result<f64, BenchError> {
        let mut probe = self.load.clone();
        probe.closed_loop = true;
        probe.interval = Duration::ZERO;
        probe.duration = MAX_RATE_PROBE;
        probe.label = format!("{}-max-rate", self.load.label);
        let result = run_load(&Target::from_state(&self.cluster.snapshot())?, &probe).await?;
        let rate = result.window.saved as f64 / result.window.secs.max(1e-3);
        if rate < 1.0 {
            return Err(BenchError::InvalidSpec("the maximum-rate probe saved nothing; see the cluster logs".into()));
        }
        self.notes.push(format!(
            "maximum rate measured first: {rate:.0} msg/s saved in closed loop over {} s; offered twice it",
            MAX_RATE_PROBE.as_secs()
        ));
        Ok(rate)
    }

    /// Runs the load with the fault, then checks.
    pub async fn execute(mut self) -> Result<DrillVerdict, BenchError> {
        let spec = self.spec;
        let mut checks = Vec::new();
        let mut control_e2e_p99 = None;
        match spec.drill {
            Drill::GatewayRestart | Drill::SlowConsumers => self.load.reconnect = true,
            Drill::Chaos => {
                self.load.reconnect = true;
                self.load.storm = Some(crate::load::ReconnectStorm::new());
            }
            Drill::RecipientChurn => {
                self.load.reconnect = true;
                self.load.churn = Some(Churn {
                    online_mean: spec.churn_online_mean,
                    offline: spec.churn_offline,
                    seed: self.seed.unwrap_or_default(),
                });
            }
            Drill::Overload => {
                let max_rate = match spec.max_rate {
                    Some(rate) => rate,
                    None => self.measure_max_rate().await?,
                };
                self.load.interval = LoadSpec::interval_for_rate(self.load.pairs(), 2.0 * max_rate);
            }
            _ => {}
        }
        // How long the load sends: the lead, the fault, and a tail to watch the recovery under load.
        let window = match spec.drill {
            Drill::SlowConsumers | Drill::Overload => spec.fault.max(MIN_LOADED_WINDOW),
            _ => spec.lead + spec.fault + spec.tail,
        };
        self.load.duration = window;
        self.load.drain = match spec.drill {
            Drill::Chaos | Drill::RecipientChurn => self.load.drain.max(CHAOS_DRAIN),
            _ => self.load.drain.max(spec.fault + DRAIN_BEYOND_FAULT),
        };

        if spec.drill == Drill::SlowConsumers {
            // Same load, everyone reading at full speed: the p99 the fast receivers are held to.
            let mut control = self.load.clone();
            control.slow_receivers = 0.0;
            control.label = format!("{}-control", self.load.label);
            let target = Target::from_state(&self.cluster.snapshot())?;
            let result = run_load(&target, &control).await?;
            let p99 = Percentiles::of(&result.histograms.end_to_end).p99;
            self.notes.push(format!("control run (no slow receivers): E2E p99 {p99:.1} ms"));
            control_e2e_p99 = Some(p99);
        }

        let mut target = Target::from_state(&self.cluster.snapshot())?;
        target.front_door = Some(self.cluster.front_door.clone());
        let stop_monitor = CancellationToken::new();
        let monitor = tokio::spawn(monitor(self.cluster.clone(), stop_monitor.clone()));
        let load_spec = self.load.clone();
        let mut load_task = tokio::spawn(async move { run_load(&target, &load_spec).await });

        let fault = match wait_for_traffic(&self.cluster, &mut load_task).await {
            Ok(()) => {
                tokio::time::sleep(spec.lead).await;
                self.inject(&mut checks).await
            }
            Err(e) => Err(e),
        };
        let load_result = load_task.await;
        stop_monitor.cancel();
        let samples = monitor.await.unwrap_or_default();
        let fault = fault?;
        let result = match load_result {
            Ok(r) => r?,
            Err(e) => return Err(BenchError::InvalidSpec(format!("load task failed: {e}"))),
        };
        let state = self.cluster.snapshot();
        let mut result = result;
        let (rows, recipients) = check_db_all(&state.mysql_url, &result).await?;
        result.recipients = recipients;

        let verdict = self.verdict(&result, &rows, &samples, fault, checks, control_e2e_p99);
        let json = serde_json::to_string_pretty(&verdict).unwrap_or_default();
        let _ = std::fs::write(self.dir.join("verdict.json"), json);
        let _ = std::fs::write(
            self.dir.join("report.json"),
            serde_json::to_string_pretty(&crate::RunReport::new(&result, Some(rows))).unwrap_or_default(),
        );
        if let Some(mut guard) = self.guard.take() {
            // The state file holds every replacement the fault made.
            guard.reload()?;
            let state = guard.stop().await?;
            if verdict.passed {
                // The logs stay; the private servers' data (hundreds of MB of InnoDB files) goes.
                for server in &state.private_servers {
                    let _ = std::fs::remove_dir_all(server.dir.join("data"));
                }
            }
        }
        Ok(verdict)
    }
}
