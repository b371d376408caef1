//! `ops`: the operator CLI — local cluster up/down, status, canary, dashboard, scale, reshard, fault
//! drills, a chat client, migrations, tokens, servers for the test suite.
//!
//! A thin layer: starting, watching and stopping processes is `im_harness`'s job, drills and load are
//! `im_bench`'s; what is here is what only an operator asks for by name (the status table, the
//! canary, the dashboard page, scaling and resharding, the Prometheus targets file) and the command
//! line itself. Progress and warnings go to stderr, results to stdout.

mod canary;
mod chat;
mod dashboard;
mod observability;
mod reshard;
mod scale;
mod status;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser, Subcommand};

use im_bench::args::{DrillArgs, ModeArg};
use im_common::config::{Config, Mode};
use im_harness::cluster::{self, ClusterSpec, ClusterState};
use im_harness::guard::ClusterGuard;
use im_harness::servers::{
    ensure_redis_cluster, ensure_servers, PrivateRedisCluster, PrivateServer, RedisClusterInUse,
    PRIVATE_REDIS_CLUSTER_APPENDFSYNC, REDIS_CLUSTER_MAX_MASTERS as MAX_MASTERS,
    REDIS_CLUSTER_MIN_MASTERS as MIN_MASTERS,
};

/// What `ops` logs to stderr unless `RUST_LOG` says otherwise: its own steps (servers found, started,
/// installed), and warnings from everything else.
const DEFAULT_LOG_FILTER: &str = "warn,im_harness=info,ops=info";
/// Where every cluster command looks for the cluster unless `--state` says otherwise.
const DEFAULT_STATE: &str = ".im-local/cluster.json";

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
    /// Start a local cluster in the background; returns when every process is ready. Uses Redis and
    /// MySQL at the configured URLs when they answer, else starts private ones (installing the
    /// Debian packages if needed). Every process listens on a random loopback port: `ops status`
    /// shows them.
    Up {
        /// Gateway processes (WebSocket, history API and metrics), node ids 1..N.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        gateways: u16,
        /// Shards: each sender's messages go to one shard's stream, owned by one worker. Overrides
        /// cluster.shards of the config.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
        shards: u16,
        /// Shard-worker processes (default: one per shard; more become standbys).
        #[arg(long)]
        workers: Option<usize>,
        /// Delivery mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Full)]
        mode: ModeArg,
        /// State file recording every process, port and pid, for the other commands; the generated
        /// config, the logs and private servers go in its directory.
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Start private Redis/MariaDB even if the configured ones answer.
        #[arg(long)]
        private: bool,
        /// Do not serve the demo chat page (by default the gateways serve it at /demo and sign
        /// development tokens for it: gateway.demo_page and gateway.demo_dev_tokens).
        #[arg(long)]
        no_demo: bool,
        /// Run on a Redis Cluster of N masters instead of one Redis server: the configured one
        /// (redis.cluster_urls) when it is healthy, else a private one under the state directory
        /// (`redis-cluster/`, AOF with appendfsync always), stopped again by `ops down`.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(MIN_MASTERS as i64..=MAX_MASTERS as i64))]
        redis_cluster: Option<u16>,
    },
    /// Per-shard and per-gateway state of a running cluster, from the processes' metrics.
    Status {
        #[arg(long, default_value = DEFAULT_STATE)]
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
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Chat by hand: connect as --user, send TEXT to --to (if given) and print every frame that comes
    /// back as a JSON line — ACK(accepted), ACK(saved), pushes. Without --to, listen until Ctrl-C.
    Chat {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// The user to connect as.
        #[arg(long)]
        user: u64,
        /// The recipient of TEXT.
        #[arg(long, requires = "text")]
        to: Option<u64>,
        /// The message.
        #[arg(requires = "to")]
        text: Option<String>,
        /// Which gateway to connect to (1 = the first `ops up` lists).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        gateway: u16,
        /// Longest wait for ACK(saved) (or ERROR) after sending.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Keep printing incoming frames this long (after the receipts when sending).
        #[arg(long)]
        listen_secs: Option<f64>,
    },
    /// Add gateways and standby workers to a running cluster.
    Scale {
        #[arg(long, default_value = DEFAULT_STATE)]
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
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Written as JSON ({"addr": ...}) once the listener is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Change the shard count of a running cluster: stop gateways, drain every shard, switch, restart.
    Reshard {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        shards: u16,
        /// Longest wait for the streams to drain.
        #[arg(long, default_value_t = 300)]
        drain_timeout_secs: u64,
    },
    /// Stop everything `ops up` started.
    Down {
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
    },
    /// Make sure Redis and MySQL answer (starting private ones under --dir if not) and print
    /// `IM_TEST_REDIS_URL=...` / `IM_TEST_MYSQL_URL=...` lines for the test suite; `--stop` stops them.
    Servers {
        #[arg(long, default_value = ".im-local/test-servers")]
        dir: PathBuf,
        #[arg(long)]
        private: bool,
        /// Stop the private servers (and the private Redis Cluster) recorded under --dir.
        #[arg(long)]
        stop: bool,
        /// Also make sure a Redis Cluster of N masters answers — the one IM_TEST_REDIS_CLUSTER_URLS
        /// (else redis.cluster_urls) names when it is healthy, else a private one in
        /// `<dir>/redis-cluster`, reused while it runs — and print `IM_TEST_REDIS_CLUSTER_URLS=...`.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(MIN_MASTERS as i64..=MAX_MASTERS as i64))]
        redis_cluster: Option<u16>,
    },
    /// Fault drill under load with a loss/duplicate/order verdict (the same as `bench drill`); exits
    /// 0 only if the verdict passes. See docs/RELIABILITY.md.
    Drill {
        #[command(flatten)]
        drill: Box<DrillArgs>,
        /// The drill's options (the same as --help; kept for scripts written against older versions).
        #[arg(long = "help-drill", action = ArgAction::Help, hide = true)]
        help_drill: Option<bool>,
    },
}

/// Logs to stderr, so stdout carries only results (`ops token`, `ops servers` are read by scripts).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

/// Whether the Redis at `url` writes an append-only file.
async fn redis_has_aof(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return false };
    let reply: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await.unwrap_or_default();
    reply.get(1).is_some_and(|v| v == "yes")
}

fn load_cluster(state: &Path) -> anyhow::Result<ClusterState> {
    cluster::load_state(state).with_context(|| "no running cluster")
}

/// Rewrites the state file and the Prometheus targets next to it after the cluster changed.
fn record(cluster: &ClusterState, state: &Path) -> anyhow::Result<()> {
    cluster::save_state(cluster, state)?;
    observability::write_prometheus_targets(cluster, &observability::targets_path(state))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
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
        Cmd::Up { gateways, shards, workers, mode, state, private, no_demo, redis_cluster } => {
            let redis_cluster = redis_cluster.map(usize::from);
            up(cfg, gateways, shards, workers, mode, state, private, !no_demo, redis_cluster).await?
        }
        Cmd::Status { state, watch, json, interval_ms } => {
            let cluster = load_cluster(&state)?;
            loop {
                let status = im_harness::status::collect(&cluster, Duration::from_millis(interval_ms)).await;
                if json {
                    println!("{}", serde_json::to_string(&status)?);
                } else {
                    if watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", status::render(&status));
                }
                if !watch {
                    break;
                }
            }
        }
        Cmd::Canary { state, timeout_ms, json } => {
            let cluster = load_cluster(&state)?;
            let results = canary::run(&cluster, Duration::from_millis(timeout_ms)).await;
            let two_phase = cluster.mode != Mode::Baseline.as_str();
            if json {
                println!("{}", serde_json::to_string(&results)?);
            } else {
                print!("{}", canary::render(&results, two_phase));
            }
            if !results.iter().all(|r| r.ok(two_phase)) {
                bail!("canary failed on at least one shard");
            }
        }
        Cmd::Chat { state, user, to, text, gateway, timeout_ms, listen_secs } => {
            let cluster = load_cluster(&state)?;
            let listen = listen_secs.map(Duration::try_from_secs_f64).transpose().context("--listen-secs")?;
            let chat = chat::Chat {
                user,
                gateway: usize::from(gateway) - 1,
                message: to.zip(text),
                timeout: Duration::from_millis(timeout_ms),
                listen,
            };
            chat.run(&cluster).await?;
        }
        Cmd::Scale { state: path, gateways, workers } => {
            let mut cluster = load_cluster(&path)?;
            scale::scale(&mut cluster, gateways, workers).await?;
            record(&cluster, &path)?;
            println!("cluster now has {} gateways and {} workers", cluster.gateways.len(), cluster.workers.len());
        }
        Cmd::Dashboard { state, listen, ready_file } => {
            dashboard::run(&listen, state, ready_file.as_deref()).await?;
        }
        Cmd::Reshard { state: path, shards, drain_timeout_secs } => {
            let mut cluster = load_cluster(&path)?;
            let from = cluster.shards;
            reshard::reshard(&mut cluster, shards, Duration::from_secs(drain_timeout_secs)).await?;
            record(&cluster, &path)?;
            println!("resharded from {from} to {shards} shards; gateways restarted (clients reconnect):");
            for g in &cluster.gateways {
                println!("  gateway {}  {}", g.node_id, g.ws_url);
            }
        }
        Cmd::Down { state } => {
            let cluster = cluster::load_state(&state).with_context(|| "no cluster to stop")?;
            cluster::stop(&cluster).await?;
            std::fs::remove_file(&state).ok();
            std::fs::remove_file(observability::targets_path(&state)).ok();
            println!("cluster stopped");
        }
        // Ctrl-C or SIGTERM drops the drill; the cluster it started is killed on the way out.
        Cmd::Drill { drill, .. } => std::process::exit(im_harness::process::unless_stopped(drill.run(cfg)).await?),
        Cmd::Servers { dir, stop: true, .. } => stop_servers(&dir).await?,
        Cmd::Servers { dir, private, stop: false, redis_cluster } => {
            servers(cfg, &dir, private, redis_cluster.map(usize::from)).await?
        }
    }
    Ok(())
}

/// `ops servers`: the test suite's servers, one `NAME=value` line each on stdout.
async fn servers(cfg: Config, dir: &Path, private: bool, redis_cluster: Option<usize>) -> anyhow::Result<()> {
    let redis = std::env::var("IM_TEST_REDIS_URL").unwrap_or(cfg.redis.url);
    let mysql = std::env::var("IM_TEST_MYSQL_URL").unwrap_or(cfg.mysql.url);
    let servers = ensure_servers(&redis, &mysql, dir, private).await?;
    for s in &servers.private {
        eprintln!("private {} on port {} (pid {})", s.kind_name, s.port, s.pid);
    }
    println!("IM_TEST_REDIS_URL={}", servers.redis_url);
    println!("IM_TEST_MYSQL_URL={}", servers.mysql_url);
    if let Some(masters) = redis_cluster {
        let configured = im_harness::env::cluster_urls_from_env().unwrap_or(cfg.redis.cluster_urls);
        let cluster = ensure_redis_cluster(&configured, masters, dir, private).await?;
        describe_redis_cluster(&cluster);
        println!("{}={}", im_harness::env::CLUSTER_URLS_VAR, cluster.urls.join(","));
    }
    Ok(())
}

/// `ops servers --stop`: stops the private servers and the private Redis Cluster recorded in `dir`.
async fn stop_servers(dir: &Path) -> anyhow::Result<()> {
    for kind in ["redis", "mariadb"] {
        if let Some(server) = PrivateServer::running_in(&dir.join(kind)) {
            server.stop().await?;
        }
    }
    if let Some(cluster) = PrivateRedisCluster::recorded_in(dir) {
        cluster.stop().await.context("stopping the private Redis Cluster")?;
    }
    Ok(())
}

/// Says on stderr which Redis Cluster is used, and how durable a private one is.
fn describe_redis_cluster(cluster: &RedisClusterInUse) {
    if cluster.nodes.is_empty() {
        eprintln!("Redis Cluster {} (configured)", cluster.urls.join(","));
        return;
    }
    let pids: Vec<String> = cluster.nodes.iter().map(|n| n.pid.to_string()).collect();
    eprintln!(
        "private Redis Cluster of {} masters {} (pids {}); its AOF uses appendfsync \
         {PRIVATE_REDIS_CLUSTER_APPENDFSYNC} (no replicas: a failover is not covered; see docs/OPERATIONS.md)",
        cluster.nodes.len(),
        cluster.urls.join(","),
        pids.join(",")
    );
}

/// Warns when `ACK(accepted)` is only as durable as Redis's memory (no AOF), or — on a private Redis
/// Cluster — as durable as `appendfsync everysec`.
async fn warn_about_durability(cluster: &ClusterState) {
    let redis_urls: Vec<&String> = match &cluster.redis_cluster {
        Some(redis_cluster) if !redis_cluster.nodes.is_empty() => {
            describe_redis_cluster(redis_cluster);
            return;
        }
        Some(redis_cluster) => redis_cluster.urls.iter().collect(),
        None if cluster.private_servers.iter().any(|s| s.kind_name == "redis") => return,
        None => vec![&cluster.redis_url],
    };
    for url in redis_urls {
        if !redis_has_aof(url).await {
            eprintln!(
                "warning: the Redis at {url} runs without appendonly: ACK(accepted) is only as durable as its \
                 memory (see docs/OPERATIONS.md); `ops up --private` starts one with AOF on"
            );
        }
    }
}

/// `ops up`: starts the cluster (its guard kills it again if anything below fails), writes the state
/// and targets files, and prints where everything is. `demo`: the gateways serve the demo page and,
/// since a local cluster listens on loopback only, sign development tokens for it.
#[allow(clippy::too_many_arguments)]
async fn up(
    mut cfg: Config,
    gateways: u16,
    shards: u16,
    workers: Option<usize>,
    mode: ModeArg,
    state: PathBuf,
    private: bool,
    demo: bool,
    redis_cluster: Option<usize>,
) -> anyhow::Result<()> {
    if cluster::is_running(&state) {
        bail!(cluster::ClusterError::AlreadyRunning(state));
    }
    if demo {
        cfg.gateway.demo_page = true;
        // Every process of a local cluster listens on loopback (the launcher passes --listen), but the
        // shared config file must pass validation too: dev tokens need a loopback gateway.listen.
        cfg.gateway.demo_dev_tokens =
            cfg.gateway.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
    }
    let dir = state.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), PathBuf::from);
    let mut spec = ClusterSpec::new(cfg, mode.into(), gateways.into(), shards, dir);
    spec.workers = workers.unwrap_or(shards.into());
    spec.state_file = state.clone();
    spec.force_private = private;
    spec.redis_cluster = redis_cluster;
    let guard = ClusterGuard::start(&spec).await?;
    let targets = observability::targets_path(&state);
    observability::write_prometheus_targets(&guard.state, &targets)?;
    let cluster = guard.release();
    warn_about_durability(&cluster).await;
    println!("cluster up in {} mode, {} shards", cluster.mode, cluster.shards);
    for g in &cluster.gateways {
        println!("  gateway {}  {}  (http {}, pid {})", g.node_id, g.ws_url, g.http_url, g.pid);
    }
    for w in &cluster.workers {
        let shard = w.shard.map_or_else(|| "standby".to_owned(), |s| format!("shard {s}"));
        println!("  worker {shard}  {}  (pid {})", w.metrics_url, w.pid);
    }
    match &cluster.redis_cluster {
        Some(redis_cluster) => println!("  redis cluster {}", redis_cluster.urls.join(" ")),
        None => println!("  redis {}", cluster.redis_url),
    }
    println!("  mysql {}", cluster.mysql_url);
    if let Some(d) = &cluster.dashboard {
        println!("  dashboard {}  (pid {})", d.url, d.pid);
    }
    if let (true, Some(g)) = (demo, cluster.gateways.first()) {
        println!("  demo chat {}/demo  (sign in as any user id; docs/CLIENTS.md)", g.http_url);
    }
    println!("state: {}\nprometheus targets: {}", state.display(), targets.display());
    Ok(())
}
