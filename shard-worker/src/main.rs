//! `shard-worker`: owns one shard of the accepted streams and saves it to MySQL.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use im_shard_worker::{ShardChoice, WorkerStatus};

/// mimalloc instead of the system allocator: allocation and freeing took a sixth of this process's
/// CPU with glibc's (docs/BENCHMARKS.md). Built with `no_thp`: with transparent huge pages its
/// eagerly committed arenas made 10,000 idle connections cost 20.8 KiB each instead of 16.7.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "im shard worker: deliver-then-save pipeline for one shard")]
struct Args {
    /// Config file (TOML); IM__SECTION__KEY environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The shard to own (0..cluster.shards), or `auto` to claim any free one and stand by otherwise.
    #[arg(long, value_parser = parse_shard)]
    shard: ShardChoice,
    /// Overrides worker.listen (health and metrics; port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Written as JSON ({"addr": ...}) once the listener is bound.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn parse_shard(s: &str) -> Result<ShardChoice, String> {
    if s == "auto" {
        return Ok(ShardChoice::Auto);
    }
    s.parse().map(ShardChoice::Fixed).map_err(|_| format!("--shard must be a shard number or `auto` (got {s:?})"))
}

fn main() -> anyhow::Result<()> {
    im_common::telemetry::init_tracing();
    let mut args = Args::parse();
    let mut cfg = im_common::config::Config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen.take() {
        cfg.worker.listen = listen;
    }
    cfg.validate()?;
    im_common::runtime::build(&cfg.runtime)?.block_on(run(args, cfg))
}

async fn run(args: Args, cfg: im_common::config::Config) -> anyhow::Result<()> {
    let labels = [("process", "shard-worker".to_owned()), ("node", im_shard_worker::owner_id())];
    let metrics = im_common::telemetry::install_metrics(&labels).map_err(anyhow::Error::msg)?;
    metrics::gauge!("im_build_info", "version" => env!("CARGO_PKG_VERSION"), "mode" => cfg.mode().as_str(), "process" => "shard-worker")
        .set(1.0);
    let listener = tokio::net::TcpListener::bind(&cfg.worker.listen)
        .await
        .with_context(|| format!("cannot listen on worker.listen = {}", cfg.worker.listen))?;
    let addr = listener.local_addr()?;
    let status = Arc::new(WorkerStatus::new());
    // A healthy stage goes round at least every block_ms; allow a few rounds before calling it stuck.
    let stall_ms = (cfg.two_phase.block_ms * 3).max(5000);
    let ready = {
        let status = status.clone();
        Arc::new(move || status.check(stall_ms)) as im_common::telemetry::ReadinessCheck
    };
    tokio::spawn(im_common::telemetry::serve_admin(listener, metrics, ready));
    tracing::info!(%addr, shard = ?args.shard, mode = cfg.mode().as_str(), "shard worker listening");
    if let Some(path) = &args.ready_file {
        im_common::telemetry::write_ready_file(path, &serde_json::json!({ "addr": addr.to_string() }))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        im_common::telemetry::terminated().await;
        tracing::info!("shutdown requested: finishing the batch in hand, then releasing the lease");
        let _ = stop_tx.send(true);
    });
    im_shard_worker::run(cfg, args.shard, status, stop_rx).await?;
    Ok(())
}
