//! Connection scale: open many authenticated connections, keep them alive with `PING`s, and measure
//! what they cost the gateways.
//!
//! One process may hold fewer descriptors than the target (this machine's hard limit is 20,000), so
//! [`hold`] can split the connections over several child processes of the same binary
//! (`--procs`): each child opens its share and prints `connected <n>` when done; the parent reads
//! the gateways' resident memory once everyone is connected, lets the children hold and ping for the
//! hold time, and sums their reports. Connections go round-robin over all gateways, so each
//! (client, gateway) pair needs at most `connections / gateways` ephemeral ports.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use im_harness::process;

use crate::client::{self, ClientFrame, Incoming};
use crate::spec::AuthMode;
use crate::BenchError;

/// Beyond the hold itself, the longest a connection task lives (connect phase included).
const CONNECT_PHASE_ALLOWANCE: Duration = Duration::from_secs(600);
/// Lifetime of the tokens the connections present.
const TOKEN_TTL_SECS: u64 = 86_400;
/// Limit on one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between "everyone connected" and the memory reading, so allocators settle.
const SETTLE_BEFORE_RSS: Duration = Duration::from_secs(2);

/// What to hold.
#[derive(Debug, Clone)]
pub struct HoldSpec {
    pub ws_urls: Vec<String>,
    pub jwt_secret: String,
    pub connections: usize,
    pub base_uid: u64,
    pub hold: Duration,
    pub ping_every: Duration,
    pub connect_concurrency: usize,
}

/// What one process (or all of them, summed) saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldCounts {
    pub connect_ok: u64,
    pub connect_fail: u64,
    pub pings: u64,
    pub pongs: u64,
    /// Connections still open at the end of the hold.
    pub alive_at_end: u64,
    pub connect_secs: f64,
}

/// The scale tier's result.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    pub target: usize,
    pub procs: usize,
    pub counts: HoldCounts,
    /// Gateways' resident memory (KiB) before connecting and once everyone is connected.
    pub gateway_rss_before_kib: u64,
    pub gateway_rss_connected_kib: u64,
    /// (connected − before) / connections.
    pub kib_per_connection: f64,
}

/// Opens this process's share, reports `connected <n>` on stdout, pings until the hold ends.
pub async fn hold_here(spec: &HoldSpec) -> HoldCounts {
    let started = Instant::now();
    let pongs = Arc::new(AtomicU64::new(0));
    let pings = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(spec.connect_concurrency.max(1)));
    let deadline = tokio::time::Instant::now() + spec.hold + CONNECT_PHASE_ALLOWANCE;
    let (ok_tx, mut ok_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(spec.connections);
    for i in 0..spec.connections {
        let url = spec.ws_urls[i % spec.ws_urls.len()].clone();
        let token = im_common::auth::issue_token(&spec.jwt_secret, spec.base_uid + i as u64, TOKEN_TTL_SECS);
        let (gate, ok_tx, pings, pongs, ping_every) =
            (gate.clone(), ok_tx.clone(), pings.clone(), pongs.clone(), spec.ping_every);
        let mut done = hold_rx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let conn = client::connect(&url, &token, AuthMode::Header, CONNECT_TIMEOUT).await;
            drop(permit);
            let Ok((mut reader, mut writer)) = conn else {
                let _ = ok_tx.send(false);
                return false;
            };
            let _ = ok_tx.send(true);
            // Spread pings over the interval so they do not arrive in one burst.
            let offset = Duration::from_millis(rand::random::<u64>() % ping_every.as_millis().max(1) as u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, ping_every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if writer.send(&ClientFrame::Ping).await.is_err() { return false; }
                        pings.fetch_add(1, Ordering::Relaxed);
                    }
                    frame = reader.next() => match frame {
                        Ok(Incoming::Frame(f)) if f.kind == crate::client::Kind::Pong => { pongs.fetch_add(1, Ordering::Relaxed); }
                        Ok(Incoming::Closed(..)) | Err(_) => return false,
                        Ok(_) => {}
                    },
                    _ = done.changed() => { writer.close().await; return true; }
                    _ = tokio::time::sleep_until(deadline) => return false,
                }
            }
        }));
    }
    drop(ok_tx);
    let (mut ok, mut fail) = (0u64, 0u64);
    while let Some(r) = ok_rx.recv().await {
        if r {
            ok += 1
        } else {
            fail += 1
        }
        if ok + fail == spec.connections as u64 {
            break;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    println!("connected {ok}");
    tokio::time::sleep(spec.hold).await;
    let _ = hold_tx.send(true);
    let alive = futures_util::stream::iter(tasks)
        .then(|t| async { t.await.unwrap_or(false) })
        .filter(|&a| async move { a })
        .count()
        .await;
    HoldCounts {
        connect_ok: ok,
        connect_fail: fail,
        pings: pings.load(Ordering::Relaxed),
        pongs: pongs.load(Ordering::Relaxed),
        alive_at_end: alive as u64,
        connect_secs,
    }
}

/// Runs the scale tier over `procs` child processes and measures the gateways (`gateway_pids`).
pub async fn hold(spec: &HoldSpec, procs: usize, gateway_pids: &[u32]) -> Result<HoldReport, BenchError> {
    let rss = || gateway_pids.iter().filter_map(|&p| process::rss_kib(p)).sum::<u64>();
    let before = rss();
    let exe = std::env::current_exe().map_err(|source| BenchError::Io { what: "current exe".into(), source })?;
    let share = spec.connections.div_ceil(procs.max(1));
    let mut children = Vec::new();
    for p in 0..procs.max(1) {
        let n = share.min(spec.connections - p * share);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("hold-child")
            .arg("--ws-urls")
            .arg(spec.ws_urls.join(","))
            .arg("--jwt-secret")
            .arg(&spec.jwt_secret)
            .arg("--connections")
            .arg(n.to_string())
            .arg("--base-uid")
            .arg((spec.base_uid + (p * share) as u64).to_string())
            .arg("--hold-secs")
            .arg(spec.hold.as_secs().to_string())
            .arg("--ping-secs")
            .arg(spec.ping_every.as_secs().max(1).to_string())
            .arg("--connect-concurrency")
            .arg(spec.connect_concurrency.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| BenchError::Io { what: "spawn hold child".into(), source })?;
        let stdout = child.stdout.take().ok_or_else(|| BenchError::InvalidSpec("child has no stdout".into()))?;
        children.push((child, BufReader::new(stdout).lines()));
    }
    // Everyone connected (or failed): measure, then wait for the reports.
    for (_, lines) in children.iter_mut() {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("connected ") {
                break;
            }
        }
    }
    tokio::time::sleep(SETTLE_BEFORE_RSS).await;
    let connected_rss = rss();
    let mut counts = HoldCounts::default();
    for (mut child, mut lines) in children {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(c) = serde_json::from_str::<HoldCounts>(&line) {
                counts.connect_ok += c.connect_ok;
                counts.connect_fail += c.connect_fail;
                counts.pings += c.pings;
                counts.pongs += c.pongs;
                counts.alive_at_end += c.alive_at_end;
                counts.connect_secs = counts.connect_secs.max(c.connect_secs);
            }
        }
        let _ = child.wait().await;
    }
    let kib_per_connection = connected_rss.saturating_sub(before) as f64 / counts.connect_ok.max(1) as f64;
    Ok(HoldReport {
        target: spec.connections,
        procs,
        counts,
        gateway_rss_before_kib: before,
        gateway_rss_connected_kib: connected_rss,
        kib_per_connection,
    })
}
