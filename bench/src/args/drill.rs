//! `bench drill <name>` and `ops drill <name>`: which drill, how long the fault lasts, and the drill's
//! own small load (the cluster is started by the drill unless `--state` names one).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use im_common::config::Config;

use super::{secs, ClusterSizeArgs, ReceiverArgs};
use crate::compare::run_stamp;
use crate::drill::{self, Drill, DrillSpec, StopSignal};
use crate::spec::{LoadSpec, ReceiverAcks};
use crate::BenchError;

/// Connections of a drill's load, unless `--connections` says otherwise.
const DRILL_CONNECTIONS: usize = 200;
const SLOW_CONSUMERS_CONNECTIONS: usize = 100;
/// Overload offers twice the maximum rate; this many connections keep each sender within the
/// gateways' per-connection rate limit.
const OVERLOAD_CONNECTIONS: usize = 1000;
/// Offered rate, msg/s, unless `--rate` says otherwise.
const DRILL_RATE: f64 = 400.0;
const SLOW_CONSUMERS_RATE: f64 = 1000.0;
/// Body size, unless `--body-bytes` says otherwise: slow consumers get bodies large enough that a
/// slow reader's socket buffers fill and the gateway's outbound queue overflows within the window.
const DRILL_BODY_BYTES: usize = 64;
const SLOW_CONSUMERS_BODY_BYTES: usize = 2000;
/// Sending before the drill's measured window.
const DRILL_WARMUP: Duration = Duration::from_secs(2);
/// chaos: the chaos period unless `--minutes` or `--seconds` says otherwise.
const CHAOS_MINUTES: f64 = 5.0;
/// recipient-churn: the kill period unless `--minutes` or `--seconds` says otherwise.
const RECIPIENT_CHURN_MINUTES: f64 = 2.0;

/// Which drill to run, and its knobs.
#[derive(Args, Debug)]
pub struct DrillArgs {
    /// The drill.
    #[arg(value_enum)]
    name: Drill,
    /// Length of the fault: the outage (db-outage, redis-outage), the kill period (worker-kill,
    /// recipient-churn), the gateway's downtime (gateway-restart), the loaded window (slow-consumers,
    /// overload), the chaos period (chaos).
    #[arg(long)]
    seconds: Option<f64>,
    /// chaos, recipient-churn: the fault period in minutes (faults are injected throughout)
    /// [default: chaos 5, recipient-churn 2].
    #[arg(long, conflicts_with = "seconds")]
    minutes: Option<f64>,
    /// chaos: the seed of the fault schedule; recipient-churn: the seed of the receivers' comings
    /// and goings [default: a random one, printed at the start and in the verdict]; a failing run is
    /// replayed with its seed.
    #[arg(long)]
    seed: Option<u64>,
    /// How receivers confirm deliveries: `seq` (as real clients: `ACK delivered` by from + seq per
    /// conversation, coalesced per 100 ms), `id` (the older highest-serverMsgId form), `none`.
    #[arg(long, value_enum, default_value_t = ReceiverAcks::Seq)]
    acks: ReceiverAcks,
    /// Receivers confirm `read` too.
    #[arg(long)]
    ack_read: bool,
    /// Deprecated: `--ack-delivered` is `--acks id`, `--ack-delivered=false` is `--acks none`.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    ack_delivered: Option<bool>,
    /// Fraction of receiving users with two devices [default: recipient-churn 1/3, else 0].
    #[arg(long)]
    two_devices: Option<f64>,
    /// Fraction of single-device receivers that reconnect with their own positions
    /// (`?sync=manual` + `SYNC {positions}`) [default: recipient-churn 0.5, else 0].
    #[arg(long)]
    own_positions: Option<f64>,
    /// recipient-churn: a device's mean time connected between leaving, seconds.
    #[arg(long, default_value_t = 6.0)]
    churn_online_secs: f64,
    /// recipient-churn: a device's time away, seconds, uniform between these two.
    #[arg(long, value_delimiter = ',', default_value = "0.2,3")]
    churn_offline_secs: Vec<f64>,
    /// Crossed conversations: every sender sends every other message to the next pair's receiver,
    /// so every receiver hears from two senders [default: on for chaos and recipient-churn, off
    /// otherwise]; `--crossed=false` turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    crossed: Option<bool>,
    /// Connections (users): half senders, half receivers [default: 200; slow-consumers 100; overload
    /// 1000, so that twice the maximum rate stays within the gateways' per-connection rate limit].
    #[arg(long)]
    connections: Option<usize>,
    /// Total offered rate, msg/s [default: 400; slow-consumers 1000].
    #[arg(long)]
    rate: Option<f64>,
    /// Message body size [default: 64; slow-consumers 2000, so that a slow reader's socket buffers
    /// fill and the gateway's outbound queue overflows within the window].
    #[arg(long)]
    body_bytes: Option<usize>,
    #[command(flatten)]
    size: ClusterSizeArgs,
    /// Drill an existing cluster instead (`ops up --private`); refused if its servers are shared.
    #[arg(long)]
    state: Option<PathBuf>,
    /// redis-outage: only this fail-open setting (default: both).
    #[arg(long)]
    fail_open: Option<bool>,
    /// worker-kill: seconds between kills.
    #[arg(long, default_value_t = 4.0)]
    kill_every: f64,
    /// gateway-restart: `kill` (SIGKILL) or `term` (SIGTERM).
    #[arg(long, value_enum, default_value_t = StopSignal::Kill)]
    signal: StopSignal,
    /// redis-restart: restart Redis with this appendfsync (always | everysec | no).
    #[arg(long)]
    appendfsync: Option<String>,
    /// overload: the maximum rate (msg/s); the drill offers twice this. Default: measured on the
    /// drill's cluster first — what it saves with every sender in closed loop (the next message once
    /// the last is saved) — since it varies with the machine (a 2-vCPU box here saved 3,000–9,000
    /// msg/s from one day to the next; docs/BENCHMARKS.md).
    #[arg(long)]
    max_rate: Option<f64>,
    /// slow-consumers: fraction of slow receivers.
    #[arg(long, default_value_t = 0.3)]
    slow_fraction: f64,
    /// slow-consumers: a slow receiver's pause after each frame, ms (until it is disconnected; after
    /// its reconnect it reads at full speed, like a client whose network recovered).
    #[arg(long, default_value_t = 1000)]
    slow_read_ms: u64,
    /// Run directory (default bench-runs/drill-<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5.0)]
    progress_secs: f64,
    /// Print the verdicts as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl DrillArgs {
    /// The drill these flags describe, on a cluster started from `config`.
    pub fn spec(&self, config: Config) -> Result<DrillSpec, BenchError> {
        let slow = self.name == Drill::SlowConsumers;
        let connections = self.connections.unwrap_or(match self.name {
            Drill::SlowConsumers => SLOW_CONSUMERS_CONNECTIONS,
            Drill::Overload => OVERLOAD_CONNECTIONS,
            _ => DRILL_CONNECTIONS,
        });
        let rate = self.rate.unwrap_or(if slow { SLOW_CONSUMERS_RATE } else { DRILL_RATE });
        if rate <= 0.0 {
            return Err(BenchError::InvalidSpec("--rate must be positive".into()));
        }
        let default_fault = match self.name {
            Drill::WorkerKill => 20.0,
            Drill::GatewayRestart => 2.0,
            Drill::RedisRestart => 0.0,
            Drill::SlowConsumers | Drill::Overload => 20.0,
            Drill::DbOutage | Drill::RedisOutage => 10.0,
            Drill::Chaos => 60.0 * self.minutes.unwrap_or(CHAOS_MINUTES),
            Drill::RecipientChurn => 60.0 * self.minutes.unwrap_or(RECIPIENT_CHURN_MINUTES),
        };
        if self.minutes.is_some() && !self.name.seeded() {
            return Err(BenchError::InvalidSpec(
                "--minutes is the chaos / recipient-churn period; other drills take --seconds".into(),
            ));
        }
        let offline = match self.churn_offline_secs.as_slice() {
            [low, high] if low <= high => (secs(*low, "churn-offline-secs")?, secs(*high, "churn-offline-secs")?),
            _ => return Err(BenchError::InvalidSpec("--churn-offline-secs takes LOW,HIGH".into())),
        };
        let progress = secs(self.progress_secs, "progress-secs")?;
        let pairs = (connections / 2).max(1);
        let out = self.out.clone().unwrap_or_else(|| {
            PathBuf::from("bench-runs").join(format!("drill-{}", run_stamp(im_common::ids::now_ms() / 1000)))
        });
        let mut spec = DrillSpec::new(self.name, secs(self.seconds.unwrap_or(default_fault), "seconds")?, out);
        spec.load = LoadSpec {
            connections,
            interval: LoadSpec::interval_for_rate(pairs, rate),
            body_bytes: self.body_bytes.unwrap_or(if slow { SLOW_CONSUMERS_BODY_BYTES } else { DRILL_BODY_BYTES }),
            progress: (!progress.is_zero()).then_some(progress),
            slow_receivers: if slow { self.slow_fraction } else { 0.0 },
            slow_read_delay: Duration::from_millis(self.slow_read_ms),
            warmup: DRILL_WARMUP,
            crossed: self.crossed.unwrap_or(self.name.seeded()),
            ..LoadSpec::default()
        };
        let churn = self.name == Drill::RecipientChurn;
        let receivers = ReceiverArgs {
            acks: self.acks,
            ack_read: self.ack_read,
            two_devices: self.two_devices.unwrap_or(if churn { drill::RECIPIENT_CHURN_TWO_DEVICES } else { 0.0 }),
            own_positions: self.own_positions.unwrap_or(if churn { drill::RECIPIENT_CHURN_OWN_POSITIONS } else { 0.0 }),
            ack_delivered: self.ack_delivered,
        };
        spec.load = receivers.apply(spec.load)?;
        spec.churn_online_mean = secs(self.churn_online_secs, "churn-online-secs")?;
        spec.churn_offline = offline;
        spec.config = config;
        spec.gateways = self.size.gateways;
        spec.shards = self.size.shards;
        spec.workers = self.size.workers;
        spec.redis_cluster = self.size.redis_cluster;
        spec.state = self.state.clone();
        spec.fail_open = self.fail_open;
        spec.kill_every = secs(self.kill_every, "kill-every")?;
        spec.signal = self.signal;
        spec.appendfsync = self.appendfsync.clone();
        spec.max_rate = self.max_rate;
        spec.seed = self.seed;
        Ok(spec)
    }

    /// Runs the drill on a cluster started from `config`, prints the verdicts (a summary, or JSON
    /// with `--json`) and returns the exit status: 0 only if every verdict passed.
    pub async fn run(&self, config: Config) -> Result<i32, BenchError> {
        let verdicts = drill::run(&self.spec(config)?).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&verdicts).unwrap_or_default());
        } else {
            for v in &verdicts {
                print!("{}", v.render());
            }
        }
        Ok(if verdicts.iter().all(|v| v.passed) { 0 } else { 1 })
    }
}
