//! `bench`: load generator and checker for the im engine.
//!
//! - `bench run` offers load to a running cluster (`ops up`) and prints what it measured;
//! - `bench compare` starts a cluster per mode and runs baseline, accepted-only and full at the same
//!   load, writing a run directory with a JSON per run and `summary.md`;
//! - `bench sweep --mode M` raises the offered rate until saved p99 passes a bound or errors appear.
//!
//! The cluster binaries are found next to this one, so build everything first:
//! `cargo build --release --workspace && target/release/bench compare`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use im_bench::compare::{self, ClusterOptions, CompareSpec, SweepSpec};
use im_bench::{AuthMode, LoadSpec, RunReport, Target};
use im_common::config::{Config, Mode};

#[derive(Parser)]
#[command(about = "im load generator: accepted/saved/E2E latency, loss/duplicate/order checks, three-arm comparison")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Offer load to a running cluster and report.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        /// State file of the cluster (written by `ops up`).
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        /// Gateway WebSocket URL instead of a state file (repeat for several gateways).
        #[arg(long = "ws-url")]
        ws_urls: Vec<String>,
        /// JWT secret, with --ws-url.
        #[arg(long)]
        jwt_secret: Option<String>,
        /// MySQL URL for the row check, with --ws-url (omit to skip the check).
        #[arg(long)]
        mysql_url: Option<String>,
        /// The cluster's mode, with --ws-url.
        #[arg(long, default_value = "full", value_parser = parse_mode)]
        mode: Mode,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Start a cluster per mode and run the same load in each: the seed's comparison in one command.
    Compare {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Runs per mode.
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        /// Modes to compare, in order.
        #[arg(long, value_delimiter = ',', default_value = "baseline,accepted-only,full", value_parser = parse_mode)]
        modes: Vec<Mode>,
        /// Run directory (default bench-runs/<UTC timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Raise the offered load step by step until saved p99 passes a bound or errors/loss appear.
    Sweep {
        #[arg(long, value_parser = parse_mode)]
        mode: Mode,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Offered rates to try, in msg/s, ascending.
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000,15000,20000,30000,40000")]
        rates: Vec<f64>,
        /// A step is sustained while saved p99 stays within this many ms.
        #[arg(long, default_value_t = 250.0)]
        max_saved_p99_ms: f64,
        /// Run directory (default bench-runs/<UTC timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// The load, shared by every subcommand.
#[derive(Args)]
struct LoadArgs {
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
    /// minimum spacing; 0 for none).
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
    #[arg(long, default_value = "header", value_parser = parse_auth)]
    auth: AuthMode,
    /// First user id (default: fresh ids from the clock).
    #[arg(long)]
    base_uid: Option<u64>,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5.0)]
    progress_secs: f64,
}

/// How each comparison/sweep cluster is started.
#[derive(Args)]
struct ClusterArgs {
    /// Base config (TOML; IM__SECTION__KEY variables override it). Mode, shards, key prefix and
    /// database are set per arm.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    #[arg(long, default_value_t = 4)]
    shards: u16,
    /// Worker processes (default one per shard; more become standbys).
    #[arg(long)]
    workers: Option<usize>,
    /// Keep each arm's Redis keys and database afterwards.
    #[arg(long)]
    keep_data: bool,
}

#[derive(Args)]
struct OutputArgs {
    /// Print JSON (one RunReport, or an array of them) on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Exit with status 2 when the checker finds a problem (loss, duplicates, reorders, errors, DB).
    #[arg(long)]
    check: bool,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("unknown mode {s:?}: use baseline, accepted-only or full"))
}

fn parse_auth(s: &str) -> Result<AuthMode, String> {
    AuthMode::parse(s).ok_or_else(|| format!("unknown auth {s:?}: use header or frame"))
}

fn secs(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

impl LoadArgs {
    fn spec(&self) -> anyhow::Result<LoadSpec> {
        let pairs = self.connections / 2;
        let interval = match self.rate {
            Some(rate) if rate > 0.0 => LoadSpec::interval_for_rate(pairs.max(1), rate),
            Some(_) => bail!("--rate must be positive"),
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
            base_uid: self.base_uid,
            progress: (!progress.is_zero()).then_some(progress),
            ..LoadSpec::default()
        })
    }
}

impl ClusterArgs {
    fn options(&self) -> anyhow::Result<ClusterOptions> {
        if self.gateways == 0 || self.shards == 0 {
            bail!("--gateways and --shards must be positive");
        }
        Ok(ClusterOptions {
            config: Config::load(self.config.as_deref())?,
            gateways: self.gateways,
            shards: self.shards,
            workers: self.workers,
            keep_data: self.keep_data,
        })
    }
}

fn default_out(out: Option<PathBuf>) -> PathBuf {
    out.unwrap_or_else(|| PathBuf::from("bench-runs").join(compare::run_stamp(im_common::ids::now_ms() / 1000)))
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Exit status: 2 when `--check` is on and a report has problems.
fn exit_code(check: bool, reports: &[&RunReport]) -> i32 {
    if check && reports.iter().any(|r| !r.problems().is_empty()) {
        2
    } else {
        0
    }
}

/// Lets this process hold many sockets (a connection costs one descriptor here).
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_fd_limit();
    // Ctrl-C drops the running command; a cluster it started is killed on the way out.
    let code = tokio::select! {
        code = execute(cli.command) => code?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            130
        }
    };
    std::process::exit(code);
}

async fn execute(command: Cmd) -> anyhow::Result<i32> {
    match command {
        Cmd::Run { load, state, ws_urls, jwt_secret, mysql_url, mode, output } => {
            let target = if ws_urls.is_empty() {
                let cluster = im_ops::cluster::load_state(&state)
                    .with_context(|| format!("no cluster state at {} (start one with `ops up`)", state.display()))?;
                Target::from_state(&cluster)?
            } else {
                let jwt_secret = jwt_secret.context("--ws-url needs --jwt-secret")?;
                let processes = im_bench::cpu::find_by_comm(&["gateway", "shard-worker", "redis-server", "mariadbd"]);
                Target { ws_urls, jwt_secret, mysql_url, mode, processes }
            };
            let report = im_bench::run(&target, &load.spec()?).await?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(exit_code(output.check, &[&report]))
        }
        Cmd::Compare { load, cluster, repeats, modes, out, output } => {
            let spec = CompareSpec {
                cluster: cluster.options()?,
                load: load.spec()?,
                modes,
                repeats,
                out: default_out(out),
                command: command_line(),
            };
            let runs = compare::compare(&spec).await?;
            let reports: Vec<&RunReport> = runs.iter().map(|r| &r.report).collect();
            if output.json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                let rows: Vec<(String, &RunReport)> = runs.iter().map(|r| (r.label.clone(), &r.report)).collect();
                println!("{}", im_bench::report::markdown_table(&rows));
                println!("run directory: {}", spec.out.display());
            }
            Ok(exit_code(output.check, &reports))
        }
        Cmd::Sweep { mode, load, cluster, rates, max_saved_p99_ms, out, output } => {
            let spec = SweepSpec {
                cluster: cluster.options()?,
                load: load.spec()?,
                mode,
                rates,
                max_saved_p99_ms,
                out: default_out(out),
                command: command_line(),
            };
            let steps = compare::sweep(&spec).await?;
            let best = compare::max_sustainable(&steps);
            if output.json {
                let reports: Vec<&RunReport> = steps.iter().map(|s| &s.run.report).collect();
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                let rows: Vec<(String, &RunReport)> =
                    steps.iter().map(|s| (format!("{:.0}/s", s.rate), &s.run.report)).collect();
                println!("{}", im_bench::report::markdown_table(&rows));
                match best {
                    Some(rate) => println!("{} mode: maximum sustainable rate {rate:.0} msg/s", mode.as_str()),
                    None => println!("{} mode: no step was sustainable", mode.as_str()),
                }
                println!("run directory: {}", spec.out.display());
            }
            // A sweep ends on a failing step by design; --check only looks at the sustained ones.
            let sustained: Vec<&RunReport> =
                steps.iter().filter(|s| s.failure.is_none()).map(|s| &s.run.report).collect();
            Ok(exit_code(output.check, &sustained))
        }
    }
}
