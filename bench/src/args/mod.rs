//! Command-line arguments shared by the `bench` subcommands and by `ops` (which runs the drills and
//! starts clusters in a mode): one definition per group, flattened where it is used, so the flags,
//! their defaults and their help read the same everywhere.

mod drill;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use im_common::config::{Config, Mode};
use im_harness::servers::{REDIS_CLUSTER_MAX_MASTERS, REDIS_CLUSTER_MIN_MASTERS};

use crate::compare::ClusterOptions;
use crate::spec::{AuthMode, LoadSpec, ReceiverAcks, WireEncoding};
use crate::BenchError;

pub use drill::DrillArgs;

/// The delivery mode, as the command line names it (see [`Mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Synchronous insert, then `ACK(saved)` (the comparison arm).
    Baseline,
    /// `ACK(accepted)` after the stream append; the worker saves, then pushes.
    AcceptedOnly,
    /// `ACK(accepted)` after the append; the worker pushes, then saves.
    Full,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Mode {
        match mode {
            ModeArg::Baseline => Mode::Baseline,
            ModeArg::AcceptedOnly => Mode::AcceptedOnly,
            ModeArg::Full => Mode::Full,
        }
    }
}

/// `value` seconds as a duration; `name` is the flag, for the error.
pub fn secs(value: f64, name: &str) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| BenchError::InvalidSpec(format!("--{name} must be a non-negative number of seconds")))
}

/// The load, shared by every subcommand that offers one.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Connections (users): half senders, half receivers, in fixed pairs.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Each sender's interval between messages, in ms (open loop).
    #[arg(long, default_value_t = 3000.0)]
    interval_ms: f64,
    /// Total offered rate in msg/s instead of --interval-ms (sets the interval from the sender count).
    #[arg(long, conflicts_with = "interval_ms")]
    rate: Option<f64>,
    /// Closed loop: each sender waits for ACK(saved) before its next message (--interval-ms is then a
    /// minimum spacing; 0 for none), and after a `server_busy` or `too_many_requests` answer pauses
    /// 100 ms first, as a client would.
    #[arg(long)]
    closed_loop: bool,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Measured window.
    #[arg(long, default_value_t = 20.0)]
    duration_secs: f64,
    /// Pause after all connections are up, before the first send (0 exposes the gateway's
    /// connect-time offline-resend race as duplicate pushes).
    #[arg(long, default_value_t = 1.0)]
    settle_secs: f64,
    /// Sending before the measured window (checked, not measured).
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    /// Longest wait for outstanding receipts and pushes after the last send.
    #[arg(long, default_value_t = 10.0)]
    drain_secs: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// `header` (Authorization: Bearer) or `frame` (AUTH first frame).
    #[arg(long, value_enum, default_value_t = AuthMode::Header)]
    auth: AuthMode,
    /// What connections speak: `json` (text frames) or `msgpack` (binary frames, negotiated by the
    /// `msgpack` subprotocol).
    #[arg(long, value_enum, default_value_t = WireEncoding::Json)]
    encoding: WireEncoding,
    /// First user id (default: fresh ids from the clock).
    #[arg(long)]
    base_uid: Option<u64>,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5.0)]
    progress_secs: f64,
    #[command(flatten)]
    receivers: ReceiverArgs,
    /// Crossed conversations: every sender sends every other message to the next pair's receiver,
    /// so every receiver hears from two senders.
    #[arg(long)]
    crossed: bool,
}

impl LoadArgs {
    /// The load these flags describe.
    pub fn spec(&self) -> Result<LoadSpec, BenchError> {
        let pairs = self.connections / 2;
        let interval = match self.rate {
            Some(rate) if rate > 0.0 => LoadSpec::interval_for_rate(pairs.max(1), rate),
            Some(_) => return Err(BenchError::InvalidSpec("--rate must be positive".into())),
            None => secs(self.interval_ms / 1000.0, "interval-ms")?,
        };
        let progress = secs(self.progress_secs, "progress-secs")?;
        Ok(LoadSpec {
            connections: self.connections,
            interval,
            closed_loop: self.closed_loop,
            body_bytes: self.body_bytes,
            settle: secs(self.settle_secs, "settle-secs")?,
            warmup: secs(self.warmup_secs, "warmup-secs")?,
            duration: secs(self.duration_secs, "duration-secs")?,
            drain: secs(self.drain_secs, "drain-secs")?,
            connect_concurrency: self.connect_concurrency,
            auth: self.auth,
            encoding: self.encoding,
            base_uid: self.base_uid,
            progress: (!progress.is_zero()).then_some(progress),
            crossed: self.crossed,
            ..self.receivers.apply(LoadSpec::default())?
        })
    }
}

/// How receiving devices behave, shared by `bench run`/`compare`/`sweep` and the drills.
#[derive(Args, Debug, Clone)]
pub struct ReceiverArgs {
    /// How receivers confirm deliveries: `seq` (`ACK {ackType:"delivered", from, seq}` per
    /// conversation up to the position held without a gap, coalesced per 100 ms, as a client
    /// written from docs/PROTOCOL.md), `id` (the older `ACK {serverMsgId}` of the highest id seen), or
    /// `none` (never: no receipts to senders, and every reconnect syncs everything again).
    #[arg(long, value_enum, default_value_t = ReceiverAcks::Seq)]
    pub acks: ReceiverAcks,
    /// Receivers also confirm `read` (same position as each delivered confirmation).
    #[arg(long)]
    pub ack_read: bool,
    /// Fraction of receiving users with two devices (each device is owed every message).
    #[arg(long, default_value_t = 0.0)]
    pub two_devices: f64,
    /// Fraction of single-device receivers that connect with `?sync=manual` and send their own
    /// positions (devices of two-device users always do).
    #[arg(long, default_value_t = 0.0)]
    pub own_positions: f64,
    /// Deprecated: `--ack-delivered` is `--acks id`, `--ack-delivered=false` is `--acks none`.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ack_delivered: Option<bool>,
}

impl ReceiverArgs {
    /// `spec` with these receivers.
    pub fn apply(&self, spec: LoadSpec) -> Result<LoadSpec, BenchError> {
        let acks = match self.ack_delivered {
            Some(true) => ReceiverAcks::Id,
            Some(false) => ReceiverAcks::None,
            None => self.acks,
        };
        for (value, name) in [(self.two_devices, "two-devices"), (self.own_positions, "own-positions")] {
            if !(0.0..=1.0).contains(&value) {
                return Err(BenchError::InvalidSpec(format!("--{name} is a fraction between 0 and 1")));
            }
        }
        Ok(LoadSpec {
            acks,
            ack_read: self.ack_read,
            two_devices: self.two_devices,
            own_positions: self.own_positions,
            ..spec
        })
    }
}

/// How big a cluster a command starts.
#[derive(Args, Debug, Clone, Copy)]
pub struct ClusterSizeArgs {
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    #[arg(long, default_value_t = 4)]
    pub shards: u16,
    /// Worker processes (default one per shard, and in a drill one more as a standby; workers beyond
    /// the shard count stand by).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Run on a Redis Cluster of N masters (3 to 32) instead of one Redis server: a private one per
    /// cluster started (in its directory, `redis-cluster/`), or the configured one
    /// (`redis.cluster_urls`) when it is healthy and the servers need not be private. The run report
    /// then adds each node's command counts.
    #[arg(long, value_name = "N", value_parser = redis_cluster_masters)]
    pub redis_cluster: Option<usize>,
}

/// `--redis-cluster`'s value: a number of masters a private Redis Cluster can have.
fn redis_cluster_masters(value: &str) -> Result<usize, String> {
    let (min, max) = (REDIS_CLUSTER_MIN_MASTERS, REDIS_CLUSTER_MAX_MASTERS);
    let masters: usize =
        value.trim().parse().map_err(|_| format!("{value:?} is not a number of masters ({min} to {max})"))?;
    if (min..=max).contains(&masters) {
        Ok(masters)
    } else {
        Err(format!("takes {min} to {max} masters (a Redis Cluster needs at least {min}), not {masters}"))
    }
}

/// How each comparison/sweep cluster is started.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Base config (TOML; IM__SECTION__KEY variables override it). Mode, shards, key prefix and
    /// database are set per arm.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    size: ClusterSizeArgs,
    /// Keep each arm's Redis keys and database afterwards.
    #[arg(long)]
    keep_data: bool,
}

impl ClusterArgs {
    /// `--redis-cluster`: the masters of the Redis Cluster each cluster runs on, if any.
    pub fn redis_cluster(&self) -> Option<usize> {
        self.size.redis_cluster
    }

    /// The clusters these flags describe.
    pub fn options(&self) -> Result<ClusterOptions, BenchError> {
        let ClusterSizeArgs { gateways, shards, workers, redis_cluster } = self.size;
        if gateways == 0 || shards == 0 {
            return Err(BenchError::InvalidSpec("--gateways and --shards must be positive".into()));
        }
        Ok(ClusterOptions {
            config: Config::load(self.config.as_deref()).map_err(|e| BenchError::InvalidSpec(e.to_string()))?,
            gateways,
            shards,
            workers,
            redis_cluster,
            keep_data: self.keep_data,
        })
    }
}

/// What a run prints, and whether problems fail it.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Print JSON (one RunReport, or an array of them) on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 2 when the checker finds a problem (loss, duplicates, reorders, errors, DB).
    #[arg(long)]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::drill::{self, Drill};

    /// A command that starts clusters, as `bench compare` and `bench sweep` take their flags.
    #[derive(Parser, Debug)]
    struct ClusterCommand {
        #[command(flatten)]
        cluster: ClusterArgs,
    }

    /// `bench drill`'s flags.
    #[derive(Parser, Debug)]
    struct DrillCommand {
        #[command(flatten)]
        drill: DrillArgs,
    }

    fn cluster_command(args: &[&str]) -> Result<ClusterCommand, clap::Error> {
        ClusterCommand::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
    }

    #[test]
    fn redis_cluster_takes_three_to_thirty_two_masters_and_is_off_by_default() {
        assert_eq!(cluster_command(&[]).unwrap().cluster.redis_cluster(), None, "one Redis server as before");
        for masters in ["3", "7", "32"] {
            let parsed = cluster_command(&["--redis-cluster", masters]).unwrap();
            assert_eq!(parsed.cluster.redis_cluster(), masters.parse().ok());
            assert_eq!(parsed.cluster.options().unwrap().redis_cluster, masters.parse().ok());
        }
        for bad in ["2", "33", "0", "-1", "three", ""] {
            let error = cluster_command(&[&format!("--redis-cluster={bad}")]).unwrap_err().to_string();
            assert!(error.contains("--redis-cluster") && error.contains("3 to 32"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_drill_gets_its_redis_cluster_size() {
        let parse = |args: &[&str]| {
            DrillCommand::try_parse_from(["bench", "redis-restart"].into_iter().chain(args.iter().copied()))
        };
        let spec = parse(&["--redis-cluster", "4"]).unwrap().drill.spec(Config::default()).unwrap();
        assert_eq!((spec.drill, spec.redis_cluster), (Drill::RedisRestart, Some(4)));
        assert_eq!(parse(&[]).unwrap().drill.spec(Config::default()).unwrap().redis_cluster, None);
        assert!(parse(&["--redis-cluster", "1"]).is_err());
    }

    #[tokio::test]
    async fn a_drill_on_an_existing_cluster_refuses_a_redis_cluster_size_before_touching_anything() {
        let out = std::env::temp_dir().join(format!("im-bench-args-{:08x}", rand::random::<u32>()));
        let mut spec = drill::DrillSpec::new(Drill::RedisRestart, Duration::ZERO, out.clone());
        spec.state = Some(out.join("no-such-state.json"));
        spec.redis_cluster = Some(3);
        let error = drill::run(&spec).await.unwrap_err().to_string();
        assert!(error.contains("--redis-cluster"), "{error}");
        assert!(!out.exists(), "nothing was created");
    }
}

/// When a sweep step counts as sustained, besides no loss, no errors and the offered load sent
/// (`bench sweep`, `bench limits`). The goal (saved ≤ 250, accepted ≤ 20, E2E ≤ 50 ms) is
/// `--max-accepted-p99-ms 20 --max-e2e-p99-ms 50`.
#[derive(Args, Debug, Clone, Copy, PartialEq)]
pub struct StepBounds {
    /// A step is sustained while saved p99 stays within this many ms.
    #[arg(long = "max-saved-p99-ms", default_value_t = 250.0)]
    pub saved_p99_ms: f64,
    /// ... and accepted p99 within this many ms (two-phase modes; no bound when not given).
    #[arg(long = "max-accepted-p99-ms")]
    pub accepted_p99_ms: Option<f64>,
    /// ... and E2E p99 within this many ms (no bound when not given).
    #[arg(long = "max-e2e-p99-ms")]
    pub e2e_p99_ms: Option<f64>,
}

impl std::fmt::Display for StepBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "saved p99 ≤ {} ms", self.saved_p99_ms)?;
        if let Some(ms) = self.accepted_p99_ms {
            write!(f, ", accepted p99 ≤ {ms} ms")?;
        }
        if let Some(ms) = self.e2e_p99_ms {
            write!(f, ", E2E p99 ≤ {ms} ms")?;
        }
        Ok(())
    }
}

impl StepBounds {
    /// Saved p99 within `ms`, nothing else bounded.
    pub fn saved_within(ms: f64) -> Self {
        StepBounds { saved_p99_ms: ms, accepted_p99_ms: None, e2e_p99_ms: None }
    }
}
