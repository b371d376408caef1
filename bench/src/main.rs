//! `bench`: load generator and checker for the im engine.
//!
//! - `bench run` offers load to a running cluster (`ops up`) and prints what it measured;
//! - `bench compare` starts a cluster per mode and runs baseline, accepted-only and full at the same
//!   load, writing a run directory with a JSON per run and `summary.md`;
//! - `bench sweep --mode M` raises the offered rate until saved p99 passes a bound or errors appear;
//! - `bench hold` holds many idle connections and measures the gateways' memory;
//! - `bench limits` measures the raw operations the engine is made of on its servers and the limit
//!   rate they imply (`--engine-rates` adds a full-mode sweep, quoted as a fraction of that limit);
//! - `bench drill <name>` runs a fault drill (also `ops drill`), e.g. `bench drill recipient-churn
//!   --minutes 3 --seed 1128` (receivers that come and go, a third with two devices, under shard-owner
//!   kills: nothing missing on any device);
//! - `bench reconnect-storm --start` (or against `ops up`'s cluster): 5,000 users with 20 missed
//!   messages each connect at once; time until every device has everything, cluster CPU,
//!   slow-consumer disconnects.
//!
//! Every command that starts clusters (`compare`, `sweep`, `drill`, `reconnect-storm --start`) takes
//! `--redis-cluster N`: each cluster then runs on a private Redis Cluster of N masters (3 to 32)
//! instead of one Redis server, its CPU counts every node, drills that stop or kill Redis stop or
//! kill every node, and each run's report adds what every node served (shards, calls, calls per
//! message, busiest commands).
//!
//! Receivers behave like real clients everywhere (docs/PROTOCOL.md): they confirm `delivered` by
//! `from` + `seq` per conversation (`--acks seq`, the default; `id` is the older serverMsgId form,
//! `none` never confirms), optionally `read` (`--ack-read`), ask for gaps with `SYNC {peer,
//! afterSeq}`, and after a reconnect rely on the server's sync or (`--own-positions`, and always on
//! users with `--two-devices`) send their own positions.
//!
//! The cluster binaries are found next to this one, so build everything first:
//! `cargo build --release --workspace && target/release/bench compare`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use im_bench::args::{ClusterArgs, DrillArgs, LoadArgs, ModeArg, OutputArgs, StepBounds};
use im_bench::compare::{self, CompareSpec, SweepSpec};
use im_bench::hold::{self, HoldSpec};
use im_bench::{RunReport, Target};
use im_common::config::{Config, Mode};
use im_harness::cluster::ClusterSpec;
use im_harness::guard::ClusterGuard;

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
    Drill {
        #[command(flatten)]
        drill: DrillArgs,
        /// Base config for the drill's cluster (its servers are always private ones).
        #[arg(long)]
        config: Option<PathBuf>,
    },
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
        #[arg(long, value_enum, default_value_t = ModeArg::Full)]
        mode: ModeArg,
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
        #[arg(long, value_enum, value_delimiter = ',', default_value = "baseline,accepted-only,full")]
        modes: Vec<ModeArg>,
        /// Run directory (default bench-runs/<UTC timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Reconnect storm (issue 12): USERS receivers each miss MISSED messages while offline (sent and
    /// saved first), then all connect at once. Prints the time until every device holds every
    /// message, the cluster's CPU, and the gateways' slow-consumer disconnects (must be 0). Exit 0
    /// only if every device got everything without a slow-consumer close.
    ReconnectStorm {
        #[arg(long, default_value_t = 5000)]
        users: usize,
        #[arg(long, default_value_t = 20)]
        missed: usize,
        /// Distinct senders each receiver hears from.
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Sender connections that send the backlog.
        #[arg(long, default_value_t = 500)]
        senders: usize,
        /// Receivers connecting at once (default: all of them).
        #[arg(long)]
        connect_concurrency: Option<usize>,
        /// The longest the storm may take, seconds.
        #[arg(long, default_value_t = 180.0)]
        timeout_secs: f64,
        /// Fraction of receivers that connect with `?sync=manual` and send their own positions.
        #[arg(long, default_value_t = 0.0)]
        own_positions: f64,
        /// How receivers confirm (`seq`, `id` is not supported here, `none`).
        #[arg(long, value_enum, default_value_t = im_bench::spec::ReceiverAcks::Seq)]
        acks: im_bench::spec::ReceiverAcks,
        /// State file of a running cluster (written by `ops up`), unless --start.
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        /// Start a cluster for the storm (its size and config from the flags below) and stop it after.
        #[arg(long)]
        start: bool,
        /// The started cluster's mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Full)]
        mode: ModeArg,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Raise the offered load step by step until saved p99 passes a bound or errors/loss appear.
    Sweep {
        #[arg(long, value_enum)]
        mode: ModeArg,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Offered rates to try, in msg/s, ascending.
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000,15000,20000,30000,40000")]
        rates: Vec<f64>,
        #[command(flatten)]
        bounds: StepBounds,
        /// Run directory (default bench-runs/<UTC timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The raw operations the engine is made of (pipelined XADD, XREADGROUP+XACK, PUBLISH, batched
    /// INSERT, WebSocket frames) on the servers the engine uses, the limit rate they imply, and with
    /// --engine-rates the engine's full-mode rate and CPU per message as fractions of it. Writes
    /// limits.json and limits.md.
    Limits {
        /// Measured seconds per operation (after a short warm-up).
        #[arg(long, default_value_t = 3.0)]
        secs_per_op: f64,
        /// Run the operations paced, one per call, as often as this many messages a second need them
        /// (rows per INSERT: a save batch at that rate, from two_phase.save_batch_delay_ms and
        /// --shards): the raw cost of a message at light load such as the seed tier's (833). Not with
        /// --engine-rates.
        #[arg(long)]
        paced_rate: Option<f64>,
        /// Also sweep the engine in full mode over these offered rates (msg/s, ascending), on the same
        /// servers; the load flags below shape it.
        #[arg(long, value_delimiter = ',')]
        engine_rates: Vec<f64>,
        #[command(flatten)]
        bounds: StepBounds,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Run directory (default bench-runs/<UTC timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print limits.json instead of the table.
        #[arg(long)]
        json: bool,
    },
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

/// What a hold (or one process's share of it) holds: `connections` users from `base_uid` on over
/// `ws_urls`, for `hold_secs`, pinging every `ping_secs`.
struct HoldTimes {
    hold_secs: u64,
    ping_secs: u64,
    connect_concurrency: usize,
}

fn hold_spec(ws_urls: Vec<String>, jwt_secret: String, connections: usize, base_uid: u64, t: HoldTimes) -> HoldSpec {
    HoldSpec {
        ws_urls,
        jwt_secret,
        connections,
        base_uid,
        hold: Duration::from_secs(t.hold_secs),
        ping_every: Duration::from_secs(t.ping_secs.max(1)),
        connect_concurrency: t.connect_concurrency,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    im_harness::process::raise_fd_limit();
    // Ctrl-C or SIGTERM drops the running command; a cluster it started is killed on the way out.
    let code = im_harness::process::unless_stopped(execute(cli.command)).await?;
    std::process::exit(code);
}

async fn execute(command: Cmd) -> anyhow::Result<i32> {
    match command {
        Cmd::Drill { drill, config } => Ok(drill.run(Config::load(config.as_deref())?).await?),
        Cmd::Hold { state, connections, procs, hold_secs, ping_secs, connect_concurrency, json } => {
            let cluster = im_harness::cluster::load_state(&state)?;
            let spec = hold_spec(
                cluster.gateways.iter().map(|g| g.ws_url.clone()).collect(),
                cluster.jwt_secret.clone(),
                connections,
                im_bench::plan::fresh_base_uid(),
                HoldTimes { hold_secs, ping_secs, connect_concurrency },
            );
            let pids: Vec<u32> = cluster.gateways.iter().map(|g| g.pid).collect();
            let report = hold::hold(&spec, procs, &pids).await?;
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
            let times = HoldTimes { hold_secs, ping_secs, connect_concurrency };
            let spec = hold_spec(ws_urls, jwt_secret, connections, base_uid, times);
            let counts = hold::hold_here(&spec).await;
            println!("{}", serde_json::to_string(&counts)?);
            Ok(0)
        }
        Cmd::Run { load, state, ws_urls, jwt_secret, mysql_url, mode, output } => {
            let target = if ws_urls.is_empty() {
                let cluster = im_harness::cluster::load_state(&state)
                    .with_context(|| format!("no cluster state at {} (start one with `ops up`)", state.display()))?;
                Target::from_state(&cluster)?
            } else {
                let jwt_secret = jwt_secret.context("--ws-url needs --jwt-secret")?;
                let processes = im_bench::cpu::find_by_comm(&["gateway", "shard-worker", "redis-server", "mariadbd"]);
                Target {
                    ws_urls,
                    front_door: None,
                    jwt_secret,
                    mysql_url,
                    mode: mode.into(),
                    processes,
                    redis_cluster: None,
                }
            };
            let report = im_bench::run(&target, &load.spec()?).await?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(exit_code(output.check, &[&report]))
        }
        Cmd::ReconnectStorm {
            users,
            missed,
            peers,
            senders,
            connect_concurrency,
            timeout_secs,
            own_positions,
            acks,
            state,
            start,
            mode,
            cluster,
            json,
        } => {
            let spec = im_bench::catchup::CatchUpSpec {
                users,
                missed,
                peers,
                senders,
                connect_concurrency: connect_concurrency.unwrap_or(users),
                timeout: im_bench::args::secs(timeout_secs, "timeout-secs")?,
                own_positions,
                acks,
                ..Default::default()
            };
            if !start && cluster.redis_cluster().is_some() {
                anyhow::bail!(
                    "--redis-cluster sizes the cluster --start starts; without --start the storm runs on --state's"
                );
            }
            let (guard, cluster_state) = if start {
                // Private Redis and MariaDB, so the CPU figures are this cluster's alone.
                let opts = cluster.options()?;
                let dir = default_out(None).join("reconnect-storm");
                let mut spec =
                    ClusterSpec::new(opts.config, Mode::from(mode), opts.gateways, opts.shards, dir.join("cluster"));
                spec.workers = opts.workers.unwrap_or(usize::from(opts.shards));
                spec.state_file = dir.join("cluster.json");
                spec.force_private = true;
                spec.redis_cluster = opts.redis_cluster;
                eprintln!("[reconnect-storm] starting a cluster with private servers in {}", spec.dir.display());
                let guard = ClusterGuard::start(&spec).await?;
                let state = guard.state.clone();
                (Some(guard), state)
            } else {
                let state = im_harness::cluster::load_state(&state).with_context(|| {
                    format!("no cluster state at {} (start one with `ops up`, or --start)", state.display())
                })?;
                (None, state)
            };
            let target = Target::from_state(&cluster_state)?;
            let metrics: Vec<String> = cluster_state.gateways.iter().map(|g| g.metrics_url.clone()).collect();
            let report = im_bench::catchup::reconnect_storm(&target, &metrics, &spec).await;
            if let Some(guard) = guard {
                let state = guard.stop().await?;
                for server in &state.private_servers {
                    let _ = std::fs::remove_dir_all(server.dir.join("data"));
                }
            }
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Cmd::Compare { load, cluster, repeats, modes, out, output } => {
            let spec = CompareSpec {
                cluster: cluster.options()?,
                load: load.spec()?,
                modes: modes.into_iter().map(Mode::from).collect(),
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
                print!("{}", im_bench::report::redis_nodes_markdown(&rows));
                println!("run directory: {}", spec.out.display());
            }
            Ok(exit_code(output.check, &reports))
        }
        Cmd::Sweep { mode, load, cluster, rates, bounds, out, output } => {
            let mode = Mode::from(mode);
            let spec = SweepSpec {
                cluster: cluster.options()?,
                load: load.spec()?,
                mode,
                rates,
                bounds,
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
                print!("{}", im_bench::report::redis_nodes_markdown(&rows));
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
        Cmd::Limits { secs_per_op, paced_rate, engine_rates, bounds, load, cluster, out, json } => {
            let engine = if engine_rates.is_empty() {
                None
            } else {
                Some(im_bench::limits::EngineSweep { load: load.spec()?, rates: engine_rates, bounds })
            };
            let cluster = cluster.options()?;
            let drive = im_bench::limits::drive(paced_rate, &cluster)?;
            let spec = im_bench::limits::LimitsSpec {
                cluster,
                secs_per_op: im_bench::args::secs(secs_per_op, "secs-per-op")?,
                drive,
                engine,
                out: default_out(out),
                command: command_line(),
            };
            let report = im_bench::limits::run(&spec).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", im_bench::limits::markdown(&report));
                println!("run directory: {}", spec.out.display());
            }
            Ok(0)
        }
    }
}
