//! `ops`: the operator CLI — local cluster up/down, migrations, tokens, servers for the test suite.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use im_common::config::{Config, Mode};
use im_ops::cluster::{self, ClusterSpec};
use im_ops::servers::ensure_servers;

#[derive(Parser)]
#[command(about = "im operator tool")]
struct Cli {
    /// Config file (TOML); IM__SECTION__KEY environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Print the effective configuration (file + environment + defaults) as TOML, secret redacted.
    Config,
    /// Print a signed JWT for a user.
    Token {
        #[arg(long)]
        user: u64,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Start a local cluster in the background; returns when every process is ready.
    Up {
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        gateways: u16,
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
        shards: u16,
        /// Shard-worker processes (default: one per shard; more become standbys).
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long, default_value = "full", value_parser = parse_mode)]
        mode: Mode,
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        /// Start private Redis/MariaDB even if the configured ones answer.
        #[arg(long)]
        private: bool,
    },
    /// Per-shard and per-gateway state of a running cluster, from the processes' metrics.
    Status {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        /// Refresh until interrupted.
        #[arg(long)]
        watch: bool,
        /// One JSON object (per refresh with --watch) instead of a table.
        #[arg(long)]
        json: bool,
        /// Sampling interval for rates.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
    },
    /// Send one message through every shard and time accepted / saved / delivered.
    Canary {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Add gateways and standby workers to a running cluster.
    Scale {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        /// Gateways to add.
        #[arg(long, default_value_t = 0)]
        gateways: usize,
        /// Workers to add (they claim free or orphaned shards, else stand by).
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Serve the live backlog page: per-shard backlog and rates charted from the processes' metrics.
    Dashboard {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Written as JSON ({"addr": ...}) once the listener is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Change the shard count of a running cluster: stop gateways, drain every shard, switch, restart.
    Reshard {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        shards: u16,
        /// Longest wait for the streams to drain.
        #[arg(long, default_value_t = 300)]
        drain_timeout_secs: u64,
    },
    /// Stop everything `ops up` started.
    Down {
        #[arg(long, default_value = ".im-local/cluster.json")]
        state: PathBuf,
    },
    /// Make sure Redis and MySQL answer (starting private ones under --dir if not) and print
    /// `IM_TEST_REDIS_URL=...` / `IM_TEST_MYSQL_URL=...` lines for the test suite; `--stop` stops them.
    Servers {
        #[arg(long, default_value = ".im-local/test-servers")]
        dir: PathBuf,
        #[arg(long)]
        private: bool,
        #[arg(long)]
        stop: bool,
    },
    /// Fault drill under load with a loss/duplicate/order verdict: runs `bench drill <name> [args]`
    /// (the `bench` binary next to this one) and exits with its status. `ops drill --help-drill` for
    /// the drill's own options; see docs/RELIABILITY.md.
    #[command(disable_help_flag = true)]
    Drill {
        /// db-outage | worker-kill | gateway-restart | redis-restart | redis-outage | slow-consumers | overload
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

/// Runs `bench drill` with `args` (ops cannot link bench: bench depends on ops) and returns its status.
fn forward_drill(config: Option<&std::path::Path>, args: &[String]) -> anyhow::Result<i32> {
    let bench = cluster::bin_dir().join("bench");
    if !bench.is_file() {
        bail!("{} not found: build the workspace first (cargo build --release --workspace)", bench.display());
    }
    let mut cmd = std::process::Command::new(&bench);
    cmd.arg("drill");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let args: Vec<&str> = args.iter().map(|a| if a == "--help-drill" { "--help" } else { a.as_str() }).collect();
    let status = cmd.args(args).status().with_context(|| format!("run {}", bench.display()))?;
    Ok(status.code().unwrap_or(1))
}

async fn redis_has_aof(url: &str) -> bool {
    let Ok(mut conn) = im_common::connections::connect(url).await else { return false };
    let reply: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await.unwrap_or_default();
    reply.get(1).is_some_and(|v| v == "yes")
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("unknown mode {s:?}: use baseline, accepted-only or full"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Drill { args } = &cli.command {
        std::process::exit(forward_drill(cli.config.as_deref(), args)?);
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Cmd::Migrate => {
            let applied = im_common::store::migrate(&cfg.mysql.url).await?;
            println!("migrations applied: {applied:?} (database up to date)");
        }
        Cmd::Config => {
            let mut shown = cfg.clone();
            shown.auth.jwt_secret = "<redacted>".into();
            print!("{}", toml::to_string(&shown)?);
        }
        Cmd::Token { user, ttl_secs } => {
            if user == 0 {
                bail!("--user must be a positive user id");
            }
            println!("{}", im_common::auth::issue_token(&cfg.auth.jwt_secret, user, ttl_secs));
        }
        Cmd::Up { gateways, shards, workers, mode, state, private } => {
            if cluster::is_running(&state) {
                bail!(cluster::ClusterError::AlreadyRunning(state));
            }
            let dir = state.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            let spec = ClusterSpec {
                config: cfg,
                gateways: gateways.into(),
                shards,
                workers: workers.unwrap_or(shards.into()),
                mode,
                dir,
                force_private: private,
            };
            let cluster = cluster::start(&spec).await?;
            cluster::save_state(&cluster, &state)?;
            let targets = im_ops::observability::targets_path(&state);
            im_ops::observability::write_prometheus_targets(&cluster, &targets)?;
            if cluster.private_servers.iter().all(|s| s.kind_name != "redis")
                && !redis_has_aof(&cluster.redis_url).await
            {
                eprintln!(
                    "warning: the Redis at {} runs without appendonly: ACK(accepted) is only as durable as its \
                     memory (see docs/OPERATIONS.md); `ops up --private` starts one with AOF on",
                    cluster.redis_url
                );
            }
            println!("cluster up in {} mode, {} shards", cluster.mode, cluster.shards);
            for g in &cluster.gateways {
                println!("  gateway {}  {}  (http {}, pid {})", g.node_id, g.ws_url, g.http_url, g.pid);
            }
            for w in &cluster.workers {
                let shard = w.shard.map_or_else(|| "standby".to_owned(), |s| format!("shard {s}"));
                println!("  worker {shard}  {}  (pid {})", w.metrics_url, w.pid);
            }
            println!("  redis {}\n  mysql {}", cluster.redis_url, cluster.mysql_url);
            if let Some(d) = &cluster.dashboard {
                println!("  dashboard {}  (pid {})", d.url, d.pid);
            }
            println!("state: {}\nprometheus targets: {}", state.display(), targets.display());
        }
        Cmd::Status { state, watch, json, interval_ms } => {
            let cluster = cluster::load_state(&state).with_context(|| "no running cluster")?;
            loop {
                let status = im_ops::status::collect(&cluster, std::time::Duration::from_millis(interval_ms)).await;
                if json {
                    println!("{}", serde_json::to_string(&status)?);
                } else {
                    if watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", im_ops::status::render(&status));
                }
                if !watch {
                    break;
                }
            }
        }
        Cmd::Canary { state, timeout_ms, json } => {
            let cluster = cluster::load_state(&state).with_context(|| "no running cluster")?;
            let results = im_ops::canary::run(&cluster, std::time::Duration::from_millis(timeout_ms)).await;
            let two_phase = cluster.mode != "baseline";
            if json {
                println!("{}", serde_json::to_string(&results)?);
            } else {
                let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                println!("{:>5} {:>12} {:>12} {:>12}  result", "shard", "accepted_ms", "saved_ms", "delivered_ms");
                for r in &results {
                    let verdict =
                        if r.ok(two_phase) { "ok".to_owned() } else { r.error.clone().unwrap_or("TIMEOUT".into()) };
                    println!(
                        "{:>5} {:>12} {:>12} {:>12}  {verdict}",
                        r.shard,
                        ms(r.accepted_ms),
                        ms(r.saved_ms),
                        ms(r.delivered_ms)
                    );
                }
            }
            if !results.iter().all(|r| r.ok(two_phase)) {
                bail!("canary failed on at least one shard");
            }
        }
        Cmd::Scale { state, gateways, workers } => {
            let mut cluster = cluster::load_state(&state).with_context(|| "no running cluster")?;
            cluster::scale(&mut cluster, gateways, workers).await?;
            cluster::save_state(&cluster, &state)?;
            im_ops::observability::write_prometheus_targets(&cluster, &im_ops::observability::targets_path(&state))?;
            println!("cluster now has {} gateways and {} workers", cluster.gateways.len(), cluster.workers.len());
        }
        Cmd::Dashboard { state, listen, ready_file } => {
            im_ops::dashboard::run(&listen, state, ready_file.as_deref()).await?;
        }
        Cmd::Reshard { state, shards, drain_timeout_secs } => {
            let mut cluster = cluster::load_state(&state).with_context(|| "no running cluster")?;
            let from = cluster.shards;
            cluster::reshard(&mut cluster, shards, std::time::Duration::from_secs(drain_timeout_secs)).await?;
            cluster::save_state(&cluster, &state)?;
            im_ops::observability::write_prometheus_targets(&cluster, &im_ops::observability::targets_path(&state))?;
            println!("resharded from {from} to {shards} shards; gateways restarted (clients reconnect):");
            for g in &cluster.gateways {
                println!("  gateway {}  {}", g.node_id, g.ws_url);
            }
        }
        Cmd::Down { state } => {
            let cluster = cluster::load_state(&state).with_context(|| "no cluster to stop")?;
            cluster::stop(&cluster).await?;
            std::fs::remove_file(&state).ok();
            std::fs::remove_file(im_ops::observability::targets_path(&state)).ok();
            println!("cluster stopped");
        }
        // Forwarded before the config is loaded (see above).
        Cmd::Drill { .. } => {}
        Cmd::Servers { dir, private, stop } => {
            let redis = std::env::var("IM_TEST_REDIS_URL").unwrap_or(cfg.redis.url);
            let mysql = std::env::var("IM_TEST_MYSQL_URL").unwrap_or(cfg.mysql.url);
            if stop {
                for kind in ["redis", "mariadb"] {
                    if let Some(server) = im_ops::servers::PrivateServer::running_in(&dir.join(kind)) {
                        server.stop().await?;
                    }
                }
                return Ok(());
            }
            let servers = ensure_servers(&redis, &mysql, &dir, private).await?;
            for s in &servers.private {
                eprintln!("started private {} on port {} (pid {})", s.kind_name, s.port, s.pid);
            }
            println!("IM_TEST_REDIS_URL={}", servers.redis_url);
            println!("IM_TEST_MYSQL_URL={}", servers.mysql_url);
        }
    }
    Ok(())
}
