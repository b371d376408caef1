//! `gateway`: runs one gateway node.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// mimalloc instead of the system allocator: allocation and freeing took a sixth of this process's
/// CPU with glibc's (docs/BENCHMARKS.md). Built with `no_thp`: with transparent huge pages its
/// eagerly committed arenas made 10,000 idle connections cost 20.8 KiB each instead of 16.7.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "im gateway: WebSocket front end, history API, metrics")]
struct Args {
    /// Config file (TOML); defaults apply to missing keys, IM__SECTION__KEY env vars override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides gateway.node_id.
    #[arg(long)]
    node_id: Option<u16>,
    /// Overrides gateway.listen (port 0 picks a free port; see --ready-file).
    #[arg(long)]
    listen: Option<String>,
    /// Written as JSON ({"addr": ...}) once the listener is bound.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Binds with a deep accept queue: the OS default of 128 overflows when thousands of clients
/// reconnect at once (after a gateway restart), and every dropped SYN costs its client a 1 s retry.
fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr =
        addr.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn main() -> anyhow::Result<()> {
    im_common::telemetry::init_tracing();
    let mut args = Args::parse();
    let mut cfg = im_common::config::Config::load(args.config.as_deref())?;
    if let Some(node) = args.node_id {
        cfg.gateway.node_id = node;
    }
    if let Some(listen) = args.listen.take() {
        cfg.gateway.listen = listen;
    }
    cfg.validate()?;
    im_common::runtime::build(&cfg.runtime)?.block_on(run(args, cfg))
}

async fn run(args: Args, cfg: im_common::config::Config) -> anyhow::Result<()> {
    let labels = [("process", "gateway".to_owned()), ("node", cfg.gateway.node_id.to_string())];
    let metrics = im_common::telemetry::install_metrics(&labels).map_err(anyhow::Error::msg)?;
    // Before binding: a gateway refused its node id never looks up.
    let lease = im_gateway::claim_node_id(&cfg).await?;
    let listener = listen(&cfg.gateway.listen)
        .with_context(|| format!("cannot listen on gateway.listen = {}", cfg.gateway.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = cfg.gateway.node_id, mode = cfg.mode().as_str(), "gateway listening");
    if let Some(path) = &args.ready_file {
        im_common::telemetry::write_ready_file(path, &serde_json::json!({ "addr": addr.to_string() }))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        im_common::telemetry::terminated().await;
        tracing::info!("shutdown requested: draining");
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        served = im_gateway::run(cfg, listener, metrics, lease.ids(), stop_rx) => {
            lease.release().await;
            served?;
        }
        lost = lease.hold() => {
            // Another process issues ids under this node id now: stop issuing at once, without a drain
            // (clients reconnect and resend as after a crash; a supervisor restarts the gateway).
            tracing::error!(error = %lost, "stopping: this gateway may no longer issue ids under its node id");
            std::process::exit(1);
        }
    }
    Ok(())
}
