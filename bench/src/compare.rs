//! Runs that start their own clusters: the three-arm comparison (seed §4.2, §5.1) and the load sweep.
//!
//! Each arm gets a fresh cluster started the way `ops up` starts one ([`im_harness::cluster::start`]),
//! with its own Redis key prefix and its own database, so arms never see each other's streams, routes
//! or rows, nor those of a cluster someone else is running. After the arm the cluster is stopped and
//! its keys and database are dropped (unless asked to keep them). A cluster still running when its
//! [`ManagedCluster`] is dropped (an error or Ctrl-C halfway) is killed by its guard, never left
//! behind (its keys and database are then left in place).
//!
//! Everything lands in one run directory: a JSON [`RunReport`] per run, `summary.md` and
//! `compare.svg` (compare) or `sweep-<mode>.md` and `sweep.svg` (sweep), and each arm's cluster
//! directory with its processes' logs. `sweep.svg` draws every mode swept into the directory, so
//! sweeps of several modes sharing one `--out` end up on one chart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use im_common::config::{Config, Mode};
use im_harness::cluster::{ClusterSpec, ClusterState};
use im_harness::env::remove_data;
use im_harness::guard::ClusterGuard;

use crate::args::StepBounds;
use crate::chart::{self, ArmRun, ChartError, CompareArm, Heading, SweepPoint, SweepSeries};
use crate::report::{markdown_table, redis_nodes_markdown, RunReport};
use crate::spec::{LoadSpec, Target};
use crate::BenchError;

mod sweep;

pub use sweep::{max_sustainable, step_failure, sweep, SweepSpec, SweepStep};

/// Pause between runs, so one run's tail (flushes, trims) does not bleed into the next one's window.
const SETTLE: Duration = Duration::from_secs(2);

/// The cluster each arm starts.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Base config (URLs, limits, batch sizes); mode, shard count, key prefix and database are set
    /// per arm.
    pub config: Config,
    pub gateways: usize,
    pub shards: u16,
    /// Worker processes (default one per shard).
    pub workers: Option<usize>,
    /// Run each cluster on a Redis Cluster of this many masters ([`ClusterSpec::redis_cluster`]);
    /// `None`: one Redis server.
    pub redis_cluster: Option<usize>,
    /// Leave each arm's Redis keys and database in place afterwards.
    pub keep_data: bool,
}

/// A cluster this module started, with its own key prefix and database: a [`ClusterGuard`] (killed
/// on drop unless stopped) that also knows how to remove the arm's data.
pub struct ManagedCluster {
    guard: ClusterGuard,
}

impl ManagedCluster {
    /// Starts a cluster in `mode` under `dir`, isolated by `tag` (key prefix `<prefix>:bench:<tag>`,
    /// database `imbench_<tag>`).
    pub async fn start(opts: &ClusterOptions, mode: Mode, dir: &Path, tag: &str) -> Result<ManagedCluster, BenchError> {
        let mut config = opts.config.clone();
        config.redis.key_prefix = format!("{}:bench:{tag}", config.redis.key_prefix);
        config.mysql.url = with_database(&config.mysql.url, &format!("imbench_{}", tag.replace(['-', ':'], "_")));
        let mut spec = ClusterSpec::new(config, mode, opts.gateways, opts.shards, dir.to_path_buf());
        spec.workers = opts.workers.unwrap_or(usize::from(opts.shards));
        spec.redis_cluster = opts.redis_cluster;
        Ok(ManagedCluster { guard: ClusterGuard::start(&spec).await? })
    }

    /// The running cluster.
    pub fn state(&self) -> &ClusterState {
        &self.guard.state
    }

    /// Stops the processes (gracefully) and, unless `keep_data`, drops the cluster's keys and database.
    pub async fn stop(self, keep_data: bool) -> Result<(), BenchError> {
        let state = self.guard.stop().await?;
        if keep_data {
            return Ok(());
        }
        // Private servers (a private Redis Cluster's nodes too) went down with the cluster; their data
        // lives in its directory. Shared ones keep running: the arm's keys and database go.
        let private_redis = state.private_servers.iter().any(|s| s.kind_name == "redis")
            || state.redis_cluster.as_ref().is_some_and(|c| !c.nodes.is_empty());
        let private_mysql = state.private_servers.iter().any(|s| s.kind_name == "mariadb");
        match (private_redis, private_mysql) {
            (false, false) => remove_data(&state.redis_url, &state.mysql_url, &state.key_prefix).await,
            (true, false) => {
                if let Err(e) = im_common::store::drop_database(&state.mysql_url).await {
                    eprintln!("could not drop the arm's database {}: {e}", state.mysql_url);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `url` with its database replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    format!("{server}/{db}{query}")
}

/// The three-arm comparison.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    pub cluster: ClusterOptions,
    /// The load every run offers (fresh users each time).
    pub load: LoadSpec,
    /// Arms, in order (normally baseline, accepted-only, full).
    pub modes: Vec<Mode>,
    pub repeats: usize,
    /// The run directory.
    pub out: PathBuf,
    /// The command line, for the summary.
    pub command: String,
}

/// One finished run of a comparison or sweep.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    /// `full #2`, `full @ 5000/s`.
    pub label: String,
    pub report: RunReport,
    /// Its JSON file in the run directory.
    pub file: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn write_json(path: &Path, report: &RunReport) -> Result<(), BenchError> {
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(path, json).map_err(io(format!("write {}", path.display())))
}

/// Runs every arm `repeats` times and writes the run directory. Returns the runs in order.
pub async fn compare(spec: &CompareSpec) -> Result<Vec<FinishedRun>, BenchError> {
    if spec.repeats == 0 || spec.modes.is_empty() {
        return Err(BenchError::InvalidSpec("nothing to run: need at least one mode and one repeat".into()));
    }
    spec.load.validate()?;
    std::fs::create_dir_all(&spec.out).map_err(io(format!("create {}", spec.out.display())))?;
    let tag = compact_stamp(im_common::ids::now_ms() / 1000);
    let mut runs = Vec::new();
    for &mode in &spec.modes {
        let dir = spec.out.join("clusters").join(mode.as_str());
        eprintln!(
            "starting a {} cluster ({} gateways, {} shards{}) in {}",
            mode.as_str(),
            spec.cluster.gateways,
            spec.cluster.shards,
            spec.cluster.redis_cluster.map_or_else(String::new, |n| format!(", Redis Cluster of {n} masters")),
            dir.display()
        );
        let cluster = ManagedCluster::start(&spec.cluster, mode, &dir, &format!("{tag}_{}", mode.as_str())).await?;
        let target = Target::from_state(cluster.state())?;
        for repeat in 1..=spec.repeats {
            let label = format!("{} #{repeat}", mode.as_str());
            let mut load = spec.load.clone();
            load.label = label.clone();
            load.base_uid = None;
            let report = crate::run(&target, &load).await?;
            let file = spec.out.join(format!("{}-{repeat}.json", mode.as_str()));
            write_json(&file, &report)?;
            eprintln!("── {label} ──\n{report}");
            runs.push(FinishedRun { label, report, file });
            tokio::time::sleep(SETTLE).await;
        }
        cluster.stop(spec.cluster.keep_data).await?;
    }
    let summary = compare_summary(spec, &runs);
    let path = spec.out.join("summary.md");
    std::fs::write(&path, summary).map_err(io(format!("write {}", path.display())))?;
    let arms = compare_arms(&spec.modes, &runs);
    write_chart(&spec.out.join("compare.svg"), chart::compare_svg(&chart_heading("bench compare", &spec.load), &arms));
    Ok(runs)
}

/// The chart's arms: each mode's runs, in the order the modes ran.
fn compare_arms(modes: &[Mode], runs: &[FinishedRun]) -> Vec<CompareArm> {
    let runs_of =
        |mode: Mode| runs.iter().filter(move |r| r.report.mode == mode.as_str()).map(|r| ArmRun::of(&r.report));
    modes.iter().map(|&m| CompareArm { mode: m.as_str().to_owned(), runs: runs_of(m).collect() }).collect()
}

fn chart_heading(command: &str, load: &LoadSpec) -> Heading {
    Heading {
        command: command.to_owned(),
        date: human_stamp(im_common::ids::now_ms() / 1000),
        connections: load.pairs() * 2,
    }
}

/// Writes a chart into the run directory. A chart that cannot be drawn or written is reported, not
/// fatal: the runs are measured and their JSON and markdown are already written.
fn write_chart(path: &Path, svg: Result<String, ChartError>) {
    let written = svg.map_err(|e| e.to_string()).and_then(|svg| std::fs::write(path, svg).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("warning: no chart {}: {e}", path.display());
    }
}

fn compare_summary(spec: &CompareSpec, runs: &[FinishedRun]) -> String {
    let l = &spec.load;
    let mut out = format!(
        "# bench compare, {}\n\n`{}`\n\n- machine: {}\n- cluster: {} gateways, {} shards, one worker per shard; Redis {} · MySQL {}\n\
         - load: {} connections ({} senders), {}, {} B bodies, {:.0} msg/s offered; {:.1} s settle, {} s warm-up, {} s measured, drain ≤ {} s; {} repeat(s)\n\n",
        human_stamp(im_common::ids::now_ms() / 1000),
        spec.command,
        machine_summary(),
        spec.cluster.gateways,
        spec.cluster.shards,
        redis_summary(&spec.cluster),
        spec.cluster.config.mysql.url,
        l.pairs() * 2,
        l.pairs(),
        if l.closed_loop {
            format!("closed loop, at most one message per {} ms", l.interval.as_millis())
        } else {
            format!("open loop, one message per {} ms per sender", l.interval.as_millis())
        },
        l.body_bytes,
        l.offered_rate(),
        l.settle.as_secs_f64(),
        l.warmup.as_secs(),
        l.duration.as_secs(),
        l.drain.as_secs(),
        spec.repeats,
    );
    let rows: Vec<(String, &RunReport)> = runs.iter().map(|r| (r.label.clone(), &r.report)).collect();
    out.push_str(&markdown_table(&rows));
    out.push_str(
        "\nLatencies in ms over messages sent in the measured window; accepted = send → ACK(accepted), saved = send → \
         ACK(saved), E2E = send → recipient's push. lost = receipted but never delivered; errors include messages still \
         without ACK(saved) after the drain. CPU = gateways + workers + redis-server (every node on a Redis Cluster) \
         + mariadbd, per message sent.\n\n",
    );
    out.push_str(&problems_section(runs));
    out.push_str(&redis_nodes_section(&rows));
    out
}

/// What Redis each cluster runs on, for a summary's cluster line.
fn redis_summary(opts: &ClusterOptions) -> String {
    match opts.redis_cluster {
        Some(masters) => format!("Redis Cluster of {masters} masters (private per cluster unless one is configured)"),
        None => opts.config.redis.url.clone(),
    }
}

/// The per-node command counts of the runs on a Redis Cluster, as a section of a summary (empty when
/// no run was on one).
fn redis_nodes_section(rows: &[(String, &RunReport)]) -> String {
    let tables = redis_nodes_markdown(rows);
    if tables.is_empty() {
        return String::new();
    }
    format!(
        "\n## Redis Cluster nodes\n\nPer master, over the measured window: the shards whose streams it holds, \
         its slots, the calls of every command (`INFO commandstats` read at both ends of the window), calls \
         per message sent, and the busiest commands.\n\n{tables}"
    )
}

fn problems_section(runs: &[FinishedRun]) -> String {
    let mut out = String::from("## Checker and database\n\n");
    for run in runs {
        let r = &run.report;
        let db = r.db.as_ref().map_or("not checked".to_owned(), |d| {
            format!(
                "{} rows, {} missing, {} duplicated, {} unreceipted",
                d.rows, d.missing, d.duplicated, d.unreceipted
            )
        });
        let problems = r.problems();
        let verdict = if problems.is_empty() { "clean".to_owned() } else { problems.join("; ") };
        let file = run.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        out.push_str(&format!(
            "- **{}** (`{file}`): sent {}, delivered {}, DB: {db}; connect ok {} / failed {}; send-lag p99 {:.1} ms; bench CPU {} s — {verdict}\n",
            run.label,
            r.messages.counts.sent,
            r.messages.counts.delivered,
            r.connections.connect_ok,
            r.connections.connect_fail,
            r.latency_ms.send_lag.p99,
            r.cpu.bench_cpu_secs.map_or("?".into(), |s| format!("{s:.1}")),
        ));
    }
    out
}

/// Cores, CPU model and kernel of this machine, in one line.
pub fn machine_summary() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default();
    format!("{cores} cores ({model}), Linux {kernel}")
}

/// (year, month, day, hour, minute, second) in UTC of a Unix time.
fn civil(unix_secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's days → civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem / 60 % 60) as u32, (rem % 60) as u32)
}

/// `20261125-194426` (UTC): the default run directory name.
pub fn run_stamp(unix_secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

fn compact_stamp(unix_secs: u64) -> String {
    run_stamp(unix_secs).replace('-', "")
}

fn human_stamp(unix_secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(run_stamp(0), "19700101-000000");
        assert_eq!(run_stamp(951_782_400), "20000229-000000");
        assert_eq!(human_stamp(1_795_635_866), "2026-11-25 19:44:26 UTC");
    }

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() {
        assert_eq!(with_database("mysql://root@127.0.0.1:3306/im", "x"), "mysql://root@127.0.0.1:3306/x");
        assert_eq!(with_database("mysql://u:p@h:1/", "x"), "mysql://u:p@h:1/x");
        assert_eq!(with_database("mysql://h:1", "x"), "mysql://h:1/x");
        assert_eq!(with_database("mysql://h:1/im?ssl=false", "x"), "mysql://h:1/x?ssl=false");
    }
}
