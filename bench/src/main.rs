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
    /// Fault drill: start a cluster with private servers, offer load, inject the fault, check that
    /// nothing receipted is lost, duplicated or reordered. Exit code 0 only if the verdict passes.
    Drill(DrillArgs),
    /// Connection scale: hold many idle authenticated connections with pings, measure gateway memory.
    Hold {
        /// State file of the cluster (written by `ops up`).
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        #[arg(long, default_value_t = 50_000)]
        connections: usize,
        /// Client processes to spread the connections over (each stays under the fd limit).
        #[arg(long, default_value_t = 4)]
        procs: usize,
        #[arg(long, default_value_t = 30)]
        hold_secs: u64,
        #[arg(long, default_value_t = 10)]
        ping_secs: u64,
        #[arg(long, default_value_t = 256)]
        connect_concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// One share of `hold` (run by `hold` itself).
    #[command(hide = true)]
    HoldChild {
        #[arg(long, value_delimiter = ',')]
        ws_urls: Vec<String>,
        #[arg(long)]
        jwt_secret: String,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        base_uid: u64,
        #[arg(long)]
        hold_secs: u64,
        #[arg(long)]
        ping_secs: u64,
        #[arg(long)]
        connect_concurrency: usize,
    },
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

/// `bench drill <name>`: a drill's own small load (the cluster is started by the drill).
#[derive(Args)]
struct DrillArgs {
    /// db-outage | worker-kill | gateway-restart | redis-restart | redis-outage | slow-consumers | overload
    #[arg(value_parser = parse_drill)]
    name: im_bench::drill::Drill,
    /// Length of the fault: the outage (db-outage, redis-outage), the kill period (worker-kill), the
    /// gateway's downtime (gateway-restart), the loaded window (slow-consumers, overload).
    #[arg(long)]
    seconds: Option<f64>,
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
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    #[arg(long, default_value_t = 4)]
    shards: u16,
    /// Worker processes (default shards + 1: one standby).
    #[arg(long)]
    workers: Option<usize>,
    /// Base config for the drill's cluster (its servers are always private ones).
    #[arg(long)]
    config: Option<PathBuf>,
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
    #[arg(long, default_value = "kill", value_parser = parse_signal)]
    signal: im_bench::drill::StopSignal,
    /// redis-restart: restart Redis with this appendfsync (always | everysec | no).
    #[arg(long)]
    appendfsync: Option<String>,
    /// overload: the maximum sustainable rate (msg/s); the drill offers twice this. The default is
    /// what `bench sweep` measured for full mode on the 2-vCPU reference machine (docs/BENCHMARKS.md).
    #[arg(long, default_value_t = 10_000.0)]
    max_rate: f64,
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

fn parse_drill(s: &str) -> Result<im_bench::drill::Drill, String> {
    im_bench::drill::Drill::parse(s).ok_or_else(|| {
        let names: Vec<&str> = im_bench::drill::Drill::ALL.iter().map(|d| d.name()).collect();
        format!("unknown drill {s:?}: use one of {}", names.join(", "))
    })
}

fn parse_signal(s: &str) -> Result<im_bench::drill::StopSignal, String> {
    match s {
        "kill" => Ok(im_bench::drill::StopSignal::Kill),
        "term" => Ok(im_bench::drill::StopSignal::Term),
        _ => Err(format!("unknown signal {s:?}: use kill or term")),
    }
}

impl DrillArgs {
    fn spec(&self) -> anyhow::Result<im_bench::drill::DrillSpec> {
        use im_bench::drill::Drill;
        let slow = self.name == Drill::SlowConsumers;
        let connections = self.connections.unwrap_or(match self.name {
            Drill::SlowConsumers => 100,
            Drill::Overload => 1000,
            _ => 200,
        });
        let rate = self.rate.unwrap_or(if slow { 1000.0 } else { 400.0 });
        if rate <= 0.0 {
            bail!("--rate must be positive");
        }
        let default_fault = match self.name {
            Drill::WorkerKill => 20.0,
            Drill::GatewayRestart => 2.0,
            Drill::RedisRestart => 0.0,
            Drill::SlowConsumers | Drill::Overload => 20.0,
            Drill::DbOutage | Drill::RedisOutage => 10.0,
        };
        let progress = secs(self.progress_secs, "progress-secs")?;
        let pairs = (connections / 2).max(1);
        let load = LoadSpec {
            connections,
            interval: LoadSpec::interval_for_rate(pairs, rate),
            body_bytes: self.body_bytes.unwrap_or(if slow { 2000 } else { 64 }),
            progress: (!progress.is_zero()).then_some(progress),
            slow_receivers: if slow { self.slow_fraction } else { 0.0 },
            slow_read_delay: Duration::from_millis(self.slow_read_ms),
            warmup: Duration::from_secs(2),
            ..LoadSpec::default()
        };
        let out = self.out.clone().unwrap_or_else(|| {
            PathBuf::from("bench-runs").join(format!("drill-{}", compare::run_stamp(im_common::ids::now_ms() / 1000)))
        });
        Ok(im_bench::drill::DrillSpec {
            drill: self.name,
            fault: secs(self.seconds.unwrap_or(default_fault), "seconds")?,
            load,
            config: Config::load(self.config.as_deref())?,
            gateways: self.gateways,
            shards: self.shards,
            workers: self.workers,
            out,
            state: self.state.clone(),
            fail_open: self.fail_open,
            kill_every: secs(self.kill_every, "kill-every")?,
            signal: self.signal,
            appendfsync: self.appendfsync.clone(),
            max_rate: self.max_rate,
            slow_p99_factor: 2.0,
            lead: Duration::from_secs(4),
            tail: Duration::from_secs(8),
        })
    }
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
        Cmd::Drill(args) => {
            let verdicts = im_bench::drill::run(&args.spec()?).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&verdicts)?);
            } else {
                for v in &verdicts {
                    print!("{}", v.render());
                }
            }
            Ok(if verdicts.iter().all(|v| v.passed) { 0 } else { 1 })
        }
        Cmd::Hold { state, connections, procs, hold_secs, ping_secs, connect_concurrency, json } => {
            let cluster = im_ops::cluster::load_state(&state)?;
            let spec = im_bench::hold::HoldSpec {
                ws_urls: cluster.gateways.iter().map(|g| g.ws_url.clone()).collect(),
                jwt_secret: cluster.jwt_secret.clone(),
                connections,
                base_uid: im_bench::plan::fresh_base_uid(),
                hold: std::time::Duration::from_secs(hold_secs),
                ping_every: std::time::Duration::from_secs(ping_secs.max(1)),
                connect_concurrency,
            };
            let pids: Vec<u32> = cluster.gateways.iter().map(|g| g.pid).collect();
            let report = im_bench::hold::hold(&spec, procs, &pids).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                let c = &report.counts;
                println!(
                    "held {}/{} connections over {} gateways ({} client processes): connect fail {}, alive at end {}, \
                     connect phase {:.1} s, pings {} / pongs {}",
                    c.connect_ok,
                    report.target,
                    pids.len(),
                    report.procs,
                    c.connect_fail,
                    c.alive_at_end,
                    c.connect_secs,
                    c.pings,
                    c.pongs
                );
                println!(
                    "gateway RSS {} KiB idle -> {} KiB connected: {:.2} KiB per connection",
                    report.gateway_rss_before_kib, report.gateway_rss_connected_kib, report.kib_per_connection
                );
            }
            Ok(0)
        }
        Cmd::HoldChild { ws_urls, jwt_secret, connections, base_uid, hold_secs, ping_secs, connect_concurrency } => {
            let spec = im_bench::hold::HoldSpec {
                ws_urls,
                jwt_secret,
                connections,
                base_uid,
                hold: std::time::Duration::from_secs(hold_secs),
                ping_every: std::time::Duration::from_secs(ping_secs.max(1)),
                connect_concurrency,
            };
            let counts = im_bench::hold::hold_here(&spec).await;
            println!("{}", serde_json::to_string(&counts)?);
            Ok(0)
        }
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
