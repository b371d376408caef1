//! `bench limits`: the raw operations the engine is made of, measured in one run on the servers the
//! engine uses, the limit rate they imply, and — with an engine sweep — the engine's rate and CPU
//! per message as fractions of it.
//!
//! The operations ([`model::Op`]): pipelined XADD, XREADGROUP + XACK and PUBLISH (`redis_ops`),
//! multi-row INSERTs into the engine's `messages` table (`insert`), and WebSocket frames through
//! the bench's client to an echo server built like the gateway (`ws`). Each runs alone for a few
//! seconds (`window`); [`model`] weighs them by how many of each one message needs in full mode,
//! and `render` writes the table ([`markdown`]).
//!
//! With `--paced-rate` the same operations run paced, one per call, as often as that many messages
//! a second need them ([`Drive::Paced`]): the raw cost of a message at light load, such as the
//! seed tier's, where batches hold one or a few messages and each operation is a wake-up of its own.
//!
//! The servers are found the way a comparison finds them ([`ensure_servers`]: the configured ones
//! when they answer, else private ones), and the engine sweep is pointed at exactly those. The raw
//! operations write under a key prefix and into a database of their own ([`Scratch`]), removed
//! afterwards — also when the run fails or is interrupted (`servers`).

mod insert;
pub mod model;
mod redis_ops;
mod render;
mod servers;
mod window;
mod ws;

pub use window::Drive;

use std::path::{Path, PathBuf};
use std::time::Duration;

use im_common::config::Mode;
use im_harness::cluster::ClusterError;
use im_harness::servers::{ensure_servers, EnsuredServers};
use serde::{Deserialize, Serialize};

use crate::args::StepBounds;
use crate::compare::{self, with_database, ClusterOptions, SweepSpec};
use crate::cpu::ProcessRef;
use crate::spec::LoadSpec;
use crate::BenchError;
use model::{message_cost, ratio, Measurement, MessageCost};
pub use render::markdown;
use servers::{server_notes, Lease};

/// Connections (and concurrent pipelines or transactions) of each Redis and MySQL operation: one
/// per shard of the default cluster.
pub const CONNECTIONS: usize = 4;
/// Bytes of a message payload (the engine's MessagePack record of a short text is about this size).
pub const PAYLOAD_BYTES: usize = 200;

/// Why `bench limits` could not measure.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("mysql: {0}")]
    Mysql(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A worker of a measurement failed (or the WebSocket client could not connect).
    #[error("{0}")]
    Worker(String),
}

impl From<mysql_async::Error> for LimitsError {
    fn from(e: mysql_async::Error) -> Self {
        LimitsError::Mysql(e.to_string())
    }
}

impl From<im_common::store::StoreError> for LimitsError {
    fn from(e: im_common::store::StoreError) -> Self {
        LimitsError::Mysql(e.to_string())
    }
}

/// What `bench limits` runs.
#[derive(Debug, Clone)]
pub struct LimitsSpec {
    /// The engine's config (servers, key prefix) and, for the sweep, the cluster to start.
    pub cluster: ClusterOptions,
    /// The measured window of each raw operation.
    pub secs_per_op: Duration,
    /// Flat out (the limit) or paced (light load).
    pub drive: Drive,
    /// An engine sweep in full mode on the same servers, or none.
    pub engine: Option<EngineSweep>,
    /// The run directory (`limits.json`, `limits.md`, private servers, the sweep's files).
    pub out: PathBuf,
    pub command: String,
}

/// The engine's part of a `bench limits` run.
#[derive(Debug, Clone)]
pub struct EngineSweep {
    pub load: LoadSpec,
    /// Offered rates, msg/s ascending.
    pub rates: Vec<f64>,
    /// When a step is sustained.
    pub bounds: StepBounds,
}

/// Where the raw operations run: the servers, the scratch key prefix and database, and the server
/// processes whose CPU counts.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub redis_url: String,
    /// Names the scratch database.
    pub mysql_url: String,
    pub key_prefix: String,
    pub redis_processes: Vec<ProcessRef>,
    pub mysql_processes: Vec<ProcessRef>,
}

impl Scratch {
    /// The scratch key called `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:limits:{name}", self.key_prefix)
    }
}

/// What `bench limits` measured (`limits.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsReport {
    /// When the run began (UTC).
    pub started: String,
    pub command: String,
    pub machine: String,
    pub cores: usize,
    /// The Redis server: URL, shared or private, persistence.
    pub redis: String,
    /// The MariaDB server: URL, shared or private, commit durability.
    pub mysql: String,
    pub secs_per_op: f64,
    /// How the operations were driven (flat out in reports written before pacing existed).
    #[serde(default)]
    pub drive: Drive,
    pub measurements: Vec<Measurement>,
    /// The operations of one message summed (`None` unless all were measured).
    pub per_message: Option<MessageCost>,
    pub engine: Option<EngineFigures>,
}

/// The engine next to the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineFigures {
    /// The sweep's offered rates.
    pub rates: Vec<f64>,
    pub max_sustainable_rate: Option<f64>,
    /// Cluster CPU per message at the maximum sustainable rate.
    pub cpu_us_per_msg: Option<f64>,
    /// `max_sustainable_rate / limit_rate`.
    pub rate_vs_limit: Option<f64>,
    /// `cpu_us_per_msg / raw CPU per message`.
    pub cpu_vs_raw: Option<f64>,
}

/// How `--paced-rate` drives the operations: flat out without it; paced with it, each INSERT holding
/// what a save batch holds at that rate (`rate × save_batch_delay_ms / shards` rows, at least one).
pub fn drive(paced_rate: Option<f64>, cluster: &ClusterOptions) -> Result<Drive, BenchError> {
    let Some(rate) = paced_rate else { return Ok(Drive::FlatOut) };
    if !(rate.is_finite() && (1.0..=1e6).contains(&rate)) {
        return Err(BenchError::InvalidSpec(format!("--paced-rate must be 1 to 1000000 msg/s, not {rate}")));
    }
    let delay_secs = cluster.config.two_phase.save_batch_delay_ms as f64 / 1000.0;
    let rows = (rate * delay_secs / f64::from(cluster.shards.max(1))).round().max(1.0) as usize;
    Ok(Drive::Paced { msgs_per_sec: rate, rows_per_insert: rows })
}

/// Measures every raw operation on `scratch`, one after the other, for `secs` each.
pub async fn measure_raw(scratch: &Scratch, secs: Duration, drive: Drive) -> Result<Vec<Measurement>, LimitsError> {
    let mut measured = Vec::new();
    eprintln!("[limits] WebSocket frames, {}", drive.describe());
    measured.push(ws::frames(secs, drive).await?);
    eprintln!("[limits] XADD");
    measured.push(redis_ops::xadd(scratch, secs, drive).await?);
    eprintln!("[limits] XREADGROUP + XACK");
    measured.push(redis_ops::read_ack(scratch, secs, drive).await?);
    eprintln!("[limits] PUBLISH");
    measured.push(redis_ops::publish(scratch, secs, drive).await?);
    eprintln!("[limits] INSERT");
    measured.push(insert::insert_rows(scratch, secs, drive).await?);
    Ok(measured)
}

/// Runs `bench limits`: servers, raw operations, the optional engine sweep; writes `limits.json` and
/// `limits.md` into the run directory.
pub async fn run(spec: &LimitsSpec) -> Result<LimitsReport, LimitsError> {
    let config = &spec.cluster.config;
    if spec.cluster.redis_cluster.is_some() || !config.redis.cluster_urls.is_empty() {
        return Err(
            BenchError::InvalidSpec("bench limits measures one Redis server, not a Redis Cluster".into()).into()
        );
    }
    if spec.engine.is_some() && spec.drive != Drive::FlatOut {
        return Err(BenchError::InvalidSpec(
            "--paced-rate measures the raw operations at light load; run `bench compare` at that rate for the engine"
                .into(),
        )
        .into());
    }
    std::fs::create_dir_all(&spec.out)?;
    let stamp = compare::run_stamp(im_common::ids::now_ms() / 1000);
    let servers = ensure_servers(&config.redis.url, &config.mysql.url, &spec.out.join("servers"), false)
        .await
        .map_err(|e| BenchError::Cluster(ClusterError::from(e)))?;
    let tag = format!("{}_{:04x}", stamp.replace('-', ""), rand::random::<u16>());
    let lease = Lease::new(servers, &config.redis.key_prefix, &tag);
    let (redis, mysql) = server_notes(&lease).await;
    let measurements = measure_raw(&lease.scratch, spec.secs_per_op, spec.drive).await?;
    let per_message = message_cost(&measurements, cores());
    let engine = match &spec.engine {
        Some(sweep) => Some(engine_figures(spec, sweep, &lease.servers, per_message.as_ref()).await?),
        None => None,
    };
    lease.release().await;
    let report = LimitsReport {
        started: format!("{stamp} UTC"),
        command: spec.command.clone(),
        machine: compare::machine_summary(),
        cores: cores(),
        redis,
        mysql,
        secs_per_op: spec.secs_per_op.as_secs_f64(),
        drive: spec.drive,
        measurements,
        per_message,
        engine,
    };
    write(&spec.out.join("limits.json"), &serde_json::to_string_pretty(&report).unwrap_or_default())?;
    write(&spec.out.join("limits.md"), &render::markdown(&report))?;
    Ok(report)
}

fn write(path: &Path, text: &str) -> Result<(), LimitsError> {
    std::fs::write(path, text)
        .map_err(|source| BenchError::Io { what: format!("write {}", path.display()), source })?;
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sweeps the engine in full mode on `servers` and sets its best step next to `cost`.
async fn engine_figures(
    spec: &LimitsSpec,
    sweep: &EngineSweep,
    servers: &EnsuredServers,
    cost: Option<&MessageCost>,
) -> Result<EngineFigures, LimitsError> {
    let mut cluster = spec.cluster.clone();
    // The servers the raw operations ran on answer, so the sweep's cluster takes them as they are.
    cluster.config.redis.url = servers.redis_url.clone();
    cluster.config.mysql.url = with_database(&servers.mysql_url, "im");
    let sweep_spec = SweepSpec {
        cluster,
        load: sweep.load.clone(),
        mode: Mode::Full,
        rates: sweep.rates.clone(),
        bounds: sweep.bounds,
        out: spec.out.clone(),
        command: spec.command.clone(),
    };
    let steps = compare::sweep(&sweep_spec).await?;
    let max_sustainable_rate = compare::max_sustainable(&steps);
    let best = steps.iter().take_while(|s| s.failure.is_none()).last();
    let cpu_us_per_msg = best.and_then(|s| s.run.report.cpu.cluster_us_per_msg);
    Ok(EngineFigures {
        rates: sweep.rates.clone(),
        max_sustainable_rate,
        cpu_us_per_msg,
        rate_vs_limit: ratio(max_sustainable_rate, cost.map(|c| c.limit_rate)),
        cpu_vs_raw: ratio(cpu_us_per_msg, cost.and_then(|c| c.cpu_us)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(shards: u16) -> ClusterOptions {
        ClusterOptions {
            config: im_common::config::Config::default(),
            gateways: 2,
            shards,
            workers: None,
            redis_cluster: None,
            keep_data: false,
        }
    }

    #[test]
    fn a_paced_insert_holds_what_a_save_batch_holds_at_that_rate() {
        assert_eq!(drive(None, &cluster(2)).unwrap(), Drive::FlatOut);
        // 833 msg/s × 30 ms (the default save delay) / 2 shards = 12.5 rows.
        assert_eq!(drive(Some(833.0), &cluster(2)).unwrap(), Drive::Paced { msgs_per_sec: 833.0, rows_per_insert: 12 });
        assert_eq!(drive(Some(10.0), &cluster(4)).unwrap(), Drive::Paced { msgs_per_sec: 10.0, rows_per_insert: 1 });
        for bad in [0.0, -5.0, f64::NAN, f64::INFINITY, 2e6] {
            let e = drive(Some(bad), &cluster(2)).unwrap_err().to_string();
            assert!(e.contains("--paced-rate must be 1 to 1000000 msg/s"), "{bad}: {e}");
        }
    }
}
