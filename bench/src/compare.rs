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

use crate::chart::{self, ArmRun, ChartError, CompareArm, Heading, SweepPoint, SweepSeries};
use crate::report::{markdown_table, redis_nodes_markdown, RunReport};
use crate::spec::{LoadSpec, Target};
use crate::BenchError;

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

/// The load sweep of one mode.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    pub cluster: ClusterOptions,
    /// Connections, body, warm-up, duration, drain; the interval is set from each step's rate.
    pub load: LoadSpec,
    pub mode: Mode,
    /// Offered rates in msg/s, ascending.
    pub rates: Vec<f64>,
    /// A step passes while saved p99 stays within this bound.
    pub max_saved_p99_ms: f64,
    pub out: PathBuf,
    pub command: String,
}

/// One step of a sweep.
#[derive(Debug, Clone)]
pub struct SweepStep {
    pub rate: f64,
    pub run: FinishedRun,
    /// Why the step does not count as sustained (`None`: it does).
    pub failure: Option<String>,
}

/// Why a step at `offered` msg/s is not sustainable, if it is not.
pub fn step_failure(report: &RunReport, max_saved_p99_ms: f64) -> Option<String> {
    let m = &report.messages.counts;
    if report.latency_ms.saved.p99 > max_saved_p99_ms {
        return Some(format!("saved p99 {:.1} ms > {max_saved_p99_ms} ms", report.latency_ms.saved.p99));
    }
    if m.lost + m.undelivered_receiver_gone > 0 {
        return Some(format!("{} messages lost", m.lost + m.undelivered_receiver_gone));
    }
    if report.errors_total() > 0 {
        return Some(format!("{} errors", report.errors_total()));
    }
    if let Some(db) = &report.db {
        if db.missing + db.duplicated > 0 {
            return Some(format!("DB: {} missing, {} duplicated", db.missing, db.duplicated));
        }
    }
    // The generator must actually offer the load, or the step measures the bench, not the engine.
    if !report.load.closed_loop && report.rates.sent < 0.95 * report.rates.offered {
        return Some(format!("bench sent only {:.0} of {:.0} msg/s offered", report.rates.sent, report.rates.offered));
    }
    None
}

/// Raises the offered rate step by step until a step fails; the last passing rate is the maximum
/// sustainable one. Returns the steps in order.
pub async fn sweep(spec: &SweepSpec) -> Result<Vec<SweepStep>, BenchError> {
    if spec.rates.is_empty() || spec.rates.iter().any(|&r| r <= 0.0 || !r.is_finite()) {
        return Err(BenchError::InvalidSpec("--rates must list positive msg/s values".into()));
    }
    std::fs::create_dir_all(&spec.out).map_err(io(format!("create {}", spec.out.display())))?;
    let tag = format!("{}_sweep_{}", compact_stamp(im_common::ids::now_ms() / 1000), spec.mode.as_str());
    let dir = spec.out.join("clusters").join(format!("sweep-{}", spec.mode.as_str()));
    let cluster = ManagedCluster::start(&spec.cluster, spec.mode, &dir, &tag).await?;
    let target = Target::from_state(cluster.state())?;
    let rate_limit = f64::from(spec.cluster.config.gateway.rate_per_sec);
    let mut steps = Vec::new();
    for &rate in &spec.rates {
        let mut load = spec.load.clone();
        load.interval = LoadSpec::interval_for_rate(load.pairs(), rate);
        load.closed_loop = false;
        load.base_uid = None;
        load.label = format!("{} @ {rate:.0}/s", spec.mode.as_str());
        load.validate()?;
        let per_connection = rate / load.pairs() as f64;
        if per_connection > rate_limit {
            eprintln!(
                "warning: {per_connection:.0} msg/s per sender exceeds the gateway rate limit ({rate_limit}/s); \
                 expect too_many_requests (use more --connections)"
            );
        }
        let report = crate::run(&target, &load).await?;
        let file = spec.out.join(sweep_step_file(spec.mode, rate));
        write_json(&file, &report)?;
        let failure = step_failure(&report, spec.max_saved_p99_ms);
        eprintln!(
            "step {rate:>8.0}/s: sent {:.0}/s saved {:.0}/s; accepted p99 {:.1} ms, saved p99 {:.1} ms, e2e p99 {:.1} ms; \
             cpu {} µs/msg → {}",
            report.rates.sent,
            report.rates.saved,
            report.latency_ms.accepted.p99,
            report.latency_ms.saved.p99,
            report.latency_ms.e2e.p99,
            report.cpu.cluster_us_per_msg.map_or("–".into(), |u| format!("{u:.0}")),
            failure.as_deref().unwrap_or("ok"),
        );
        let stop = failure.is_some();
        steps.push(SweepStep { rate, run: FinishedRun { label: load.label, report, file }, failure });
        if stop {
            break;
        }
        tokio::time::sleep(SETTLE).await;
    }
    cluster.stop(spec.cluster.keep_data).await?;
    let path = spec.out.join(format!("sweep-{}.md", spec.mode.as_str()));
    std::fs::write(&path, sweep_summary(spec, &steps)).map_err(io(format!("write {}", path.display())))?;
    write_sweep_chart(spec, &steps);
    Ok(steps)
}

/// `sweep-<mode>-<rate>.json`: one step of a sweep in the run directory.
fn sweep_step_file(mode: Mode, rate: f64) -> String {
    format!("sweep-{}-{rate:.0}.json", mode.as_str())
}

/// The mode and rate in a [`sweep_step_file`] name.
fn parse_sweep_step_file(name: &str) -> Option<(Mode, f64)> {
    let (mode, rate) = name.strip_prefix("sweep-")?.strip_suffix(".json")?.rsplit_once('-')?;
    Some((Mode::parse(mode)?, rate.parse().ok()?))
}

/// Draws `sweep.svg`: this sweep's steps and, one line per mode, those of other modes' sweeps already
/// in the run directory (the title's connection count is this sweep's).
fn write_sweep_chart(spec: &SweepSpec, steps: &[SweepStep]) {
    let points = steps.iter().map(|s| SweepPoint::of(s.rate, &s.run.report, s.failure.is_some())).collect();
    let mut series = other_modes_sweeps(&spec.out, spec.mode, spec.max_saved_p99_ms);
    series.push(SweepSeries { mode: spec.mode.as_str().to_owned(), points });
    series.sort_by_key(|s| Mode::parse(&s.mode).map(|m| m as u8));
    let heading = chart_heading("bench sweep", &spec.load);
    write_chart(&spec.out.join("sweep.svg"), chart::sweep_svg(&heading, &series));
}

/// The sweep steps of modes other than `mode` found in `dir`, judged by this sweep's bound. This
/// mode's files are left out: the sweep just run replaces them, and an earlier sweep of the same
/// mode may have left steps this one did not reach.
fn other_modes_sweeps(dir: &Path, mode: Mode, max_saved_p99_ms: f64) -> Vec<SweepSeries> {
    let mut by_mode: BTreeMap<&str, Vec<SweepPoint>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some((other, rate)) = name.to_str().and_then(parse_sweep_step_file) else { continue };
        if other == mode {
            continue;
        }
        let path = entry.path();
        let read = std::fs::read_to_string(&path).map_err(|e| e.to_string());
        match read.and_then(|json| serde_json::from_str::<RunReport>(&json).map_err(|e| e.to_string())) {
            Ok(report) => {
                let failed = step_failure(&report, max_saved_p99_ms).is_some();
                by_mode.entry(other.as_str()).or_default().push(SweepPoint::of(rate, &report, failed));
            }
            Err(e) => eprintln!("warning: {} left off the chart: {e}", path.display()),
        }
    }
    by_mode
        .into_iter()
        .map(|(mode, mut points)| {
            points.sort_by(|a, b| a.offered.total_cmp(&b.offered));
            SweepSeries { mode: mode.to_owned(), points }
        })
        .collect()
}

/// The highest offered rate of the steps that passed, before the first that failed.
pub fn max_sustainable(steps: &[SweepStep]) -> Option<f64> {
    steps.iter().take_while(|s| s.failure.is_none()).map(|s| s.rate).last()
}

fn sweep_summary(spec: &SweepSpec, steps: &[SweepStep]) -> String {
    let mut out = format!(
        "# bench sweep, {} mode, {}\n\n`{}`\n\n- machine: {}\n- cluster: {} gateways, {} shards; Redis {}\n- {} connections, {} B bodies, \
         {} s warm-up, {} s measured per step; bound: saved p99 ≤ {} ms, no errors, nothing lost\n\n",
        spec.mode.as_str(),
        human_stamp(im_common::ids::now_ms() / 1000),
        spec.command,
        machine_summary(),
        spec.cluster.gateways,
        spec.cluster.shards,
        redis_summary(&spec.cluster),
        spec.load.pairs() * 2,
        spec.load.body_bytes,
        spec.load.warmup.as_secs(),
        spec.load.duration.as_secs(),
        spec.max_saved_p99_ms,
    );
    let rows: Vec<(String, &RunReport)> = steps.iter().map(|s| (format!("{:.0}/s", s.rate), &s.run.report)).collect();
    out.push_str(&markdown_table(&rows));
    out.push('\n');
    for s in steps {
        out.push_str(&format!("- {:.0}/s: {}\n", s.rate, s.failure.as_deref().unwrap_or("sustained")));
    }
    match max_sustainable(steps) {
        Some(rate) => out.push_str(&format!("\n**Maximum sustainable rate: {rate:.0} msg/s**\n")),
        None => out.push_str("\n**No step was sustainable.**\n"),
    }
    out.push_str(&redis_nodes_section(&rows));
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
    fn sweep_step_files_name_their_mode_and_rate() {
        let name = sweep_step_file(Mode::AcceptedOnly, 5000.0);
        assert_eq!(name, "sweep-accepted-only-5000.json");
        assert_eq!(parse_sweep_step_file(&name).map(|(m, r)| (m.as_str(), r)), Some(("accepted-only", 5000.0)));
        assert!(parse_sweep_step_file("sweep-full.md").is_none());
        assert!(parse_sweep_step_file("full-1.json").is_none());
    }

    /// A sweep step's report: everything sustained except what `saved_p99_ms` says.
    fn step_report(mode: Mode, offered: f64, saved_p99_ms: f64) -> RunReport {
        use crate::recorder::Percentiles;
        use crate::report::{ConnectionReport, CpuReport, Latencies, LoadSummary, MessageCounts, Rates};
        let p99 = |ms: f64| Percentiles { count: 100, p99: ms, ..Default::default() };
        RunReport {
            mode: mode.as_str().to_owned(),
            started_at_ms: 0,
            base_uid: 1,
            load: LoadSummary {
                connections: 2,
                senders: 1,
                gateways: 1,
                interval_ms: 1.0,
                closed_loop: false,
                body_bytes: 64,
                settle_secs: 0.0,
                warmup_secs: 0.0,
                duration_secs: 1.0,
                drain_secs: 1.0,
                drain_used_secs: 0.0,
                auth: "header".into(),
                acks: "seq".into(),
                ack_read: false,
                two_devices: 0.0,
            },
            connections: ConnectionReport {
                connect_ok: 2,
                connect_fail: 0,
                auth_ok: 2,
                auth_fail: 0,
                connect_ms: Percentiles::default(),
            },
            messages: MessageCounts {
                counts: Default::default(),
                ack_accepted_pct: 100.0,
                ack_saved_pct: 100.0,
                error_pct: 0.0,
            },
            latency_ms: Latencies { accepted: p99(1.0), saved: p99(saved_p99_ms), e2e: p99(2.0), send_lag: p99(0.1) },
            rates: Rates { offered, sent: offered, saved: offered, delivered: offered },
            errors_by_reason: Default::default(),
            db: None,
            recipients: Default::default(),
            cpu: CpuReport {
                window_secs: 1.0,
                cores: 2,
                processes: vec![],
                cluster_cpu_secs: 0.0,
                bench_cpu_secs: None,
                cluster_us_per_msg: None,
            },
            redis_nodes: vec![],
        }
    }

    #[test]
    fn the_sweep_chart_gathers_the_other_modes_swept_into_the_directory() {
        let dir = std::env::temp_dir().join(format!("bench-sweep-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (mode, rate, saved_p99) in
            [(Mode::Baseline, 5000.0, 900.0), (Mode::Baseline, 1000.0, 40.0), (Mode::Full, 40000.0, 30.0)]
        {
            write_json(&dir.join(sweep_step_file(mode, rate)), &step_report(mode, rate, saved_p99)).unwrap();
        }
        std::fs::write(dir.join(sweep_step_file(Mode::AcceptedOnly, 1000.0)), "not a report").unwrap();
        let series = other_modes_sweeps(&dir, Mode::Full, 250.0);
        std::fs::remove_dir_all(&dir).unwrap();
        // The full sweep being drawn brings its own steps; the unreadable file is left off.
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].mode, "baseline");
        let steps: Vec<(f64, bool)> = series[0].points.iter().map(|p| (p.offered, p.failed)).collect();
        assert_eq!(steps, [(1000.0, false), (5000.0, true)]);
    }

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() {
        assert_eq!(with_database("mysql://root@127.0.0.1:3306/im", "x"), "mysql://root@127.0.0.1:3306/x");
        assert_eq!(with_database("mysql://u:p@h:1/", "x"), "mysql://u:p@h:1/x");
        assert_eq!(with_database("mysql://h:1", "x"), "mysql://h:1/x");
        assert_eq!(with_database("mysql://h:1/im?ssl=false", "x"), "mysql://h:1/x?ssl=false");
    }
}
