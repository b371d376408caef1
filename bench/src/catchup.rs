//! The reconnect storm of issue 12 (`bench reconnect-storm`): `users` receiving users each miss
//! `missed` messages while offline (sent and saved while no connection of theirs is up), then all of
//! them connect at once; how long until every device has every message it is owed, what the cluster
//! spent on it, and whether anyone was closed as a slow consumer on the way (a healthy client that
//! catches up must never be: docs/PROTOCOL.md, "Sync is paced by the client's reading").
//!
//! Phase 1 (backlog): `senders` sender connections send each receiver `missed` messages from `peers`
//! different senders, each sender keeping a window of unanswered messages in flight and resending
//! refused ones under the same clientMsgId, until every message has `ACK(saved)`.
//! Phase 2 (storm): CPU and the gateways' `im_gateway_slow_consumer_disconnects_total` are read, then
//! every receiver connects at once (`connect_concurrency` at a time; all of them by default), relying
//! on the server's sync at connect (or, for `own_positions` of them, `?sync=manual` and its own
//! positions), dedupes by serverMsgId, confirms by seq as a real client, reconnects if closed, and
//! records when it holds everything. The phase ends when every device is complete or at `timeout`;
//! CPU and the metric are read again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, AckKind, ClientFrame, ConnectOptions, Incoming, Kind, WsReader, WsWriter};
use crate::cpu::{self, ProcessCpu};
use crate::load::device::{DeviceState, Held};
use crate::recorder::Percentiles;
use crate::spec::{AuthMode, ReceiverAcks, Target};
use crate::BenchError;

mod backlog;
mod device;
use backlog::send_backlog;
use device::StormDevice;

/// Tokens the storm signs live this long.
const TOKEN_TTL_SECS: u64 = 86_400;
/// A sender's unanswered messages in flight.
const SENDER_WINDOW: usize = 16;
/// Pause before a refused message is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(200);
/// The longest the backlog phase may take.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the storm phase looks at its counters.
const POLL: Duration = Duration::from_millis(10);
/// The gateway metric of slow-consumer closes.
const SLOW_CONSUMER_METRIC: &str = "im_gateway_slow_consumer_disconnects_total";
/// Pause between connection attempts of one device that could not connect.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// What to measure.
#[derive(Debug, Clone)]
pub struct CatchUpSpec {
    /// Receiving users (one device each).
    pub users: usize,
    /// Messages each receiver misses.
    pub missed: usize,
    /// Distinct senders each receiver hears from.
    pub peers: usize,
    /// Sender connections.
    pub senders: usize,
    /// Receivers connecting at once.
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    /// The longest the storm phase may take.
    pub timeout: Duration,
    /// Fraction of the receivers that connect with `?sync=manual` and send their own (empty)
    /// positions instead of relying on the server's sync at connect.
    pub own_positions: f64,
    /// How the receivers confirm.
    pub acks: ReceiverAcks,
    pub auth: AuthMode,
}

impl Default for CatchUpSpec {
    fn default() -> Self {
        CatchUpSpec {
            users: 5000,
            missed: 20,
            peers: 4,
            senders: 500,
            connect_concurrency: 5000,
            connect_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(180),
            own_positions: 0.0,
            acks: ReceiverAcks::Seq,
            auth: AuthMode::Header,
        }
    }
}

/// What the storm measured.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUpReport {
    pub users: usize,
    pub missed_per_user: usize,
    pub senders: usize,
    pub gateways: usize,
    /// Messages sent in the backlog phase, saved, and how long that took.
    pub backlog_messages: u64,
    pub backlog_saved: u64,
    pub backlog_refusals: u64,
    pub backlog_secs: f64,
    /// Devices that connected, and the connection attempts that failed.
    pub connected: u64,
    pub connect_failures: u64,
    /// Devices holding every message they were owed by the end, and the messages still missing.
    pub complete_devices: u64,
    pub missing_messages: u64,
    /// From the start of the storm until every device held everything (`None`: not all did).
    pub all_delivered_secs: Option<f64>,
    /// Per device: storm start → holding everything, ms.
    pub device_complete_ms: Percentiles,
    /// Per device: connected → `SYNC_DONE` of the sync at connect, ms.
    pub sync_ms: Percentiles,
    /// Per device: storm start → connected (first `PONG`), ms.
    pub connect_ms: Percentiles,
    /// Pushes of messages a device already held.
    pub duplicates: u64,
    /// Pushes without seq; seqs of one conversation held twice under two ids.
    pub pushes_without_seq: u64,
    pub seq_reused: u64,
    /// `ACK` frames the receivers sent; `RECEIPT`s the senders got during the storm.
    pub acks_sent: u64,
    pub receipts: u64,
    /// Connections closed during the storm, by close label (`closed_slow_consumer`, ...).
    pub closes: HashMap<String, u64>,
    /// The gateways' slow-consumer disconnects during the storm (metric delta). Must be 0.
    pub slow_consumer_disconnects: Option<f64>,
    /// CPU over the storm phase.
    pub storm_secs: f64,
    pub cpu: Vec<ProcessCpu>,
    pub cluster_cpu_secs: f64,
    pub bench_cpu_secs: Option<f64>,
    /// Cluster CPU per message delivered in the storm, µs.
    pub cluster_us_per_msg: Option<f64>,
}

impl CatchUpReport {
    /// Whether every device got everything without a slow-consumer close.
    pub fn passed(&self) -> bool {
        self.missing_messages == 0
            && self.all_delivered_secs.is_some()
            && self.slow_consumer_disconnects.is_some_and(|n| n == 0.0)
            && !self.closes.keys().any(|k| k.contains("slow_consumer"))
    }

    /// A terminal summary.
    pub fn render(&self) -> String {
        let mut out = format!(
            "reconnect storm: {} users × {} missed messages from {} senders over {} gateways: {}\n",
            self.users,
            self.missed_per_user,
            self.senders,
            self.gateways,
            if self.passed() { "PASSED" } else { "FAILED" }
        );
        out += &format!(
            "  backlog: {} messages, {} saved in {:.1} s ({} refusals resent)\n",
            self.backlog_messages, self.backlog_saved, self.backlog_secs, self.backlog_refusals
        );
        out += &format!(
            "  storm: {} connected ({} failed attempts); connect p50/p99 {:.0}/{:.0} ms; sync at connect p50/p99/max \
             {:.0}/{:.0}/{:.0} ms\n",
            self.connected,
            self.connect_failures,
            self.connect_ms.p50,
            self.connect_ms.p99,
            self.sync_ms.p50,
            self.sync_ms.p99,
            self.sync_ms.max
        );
        out += &format!(
            "  every device complete after {}; per device p50/p99/max {:.0}/{:.0}/{:.0} ms; {} of {} devices complete, \
             {} messages missing\n",
            self.all_delivered_secs.map_or_else(|| "— (not all)".to_owned(), |s| format!("{s:.2} s")),
            self.device_complete_ms.p50,
            self.device_complete_ms.p99,
            self.device_complete_ms.max,
            self.complete_devices,
            self.users,
            self.missing_messages
        );
        out += &format!(
            "  duplicates {}  pushes without seq {}  seq reused {}  acks sent {}  receipts to senders {}\n",
            self.duplicates, self.pushes_without_seq, self.seq_reused, self.acks_sent, self.receipts
        );
        let slow =
            self.slow_consumer_disconnects.map_or_else(|| "unknown (metrics unreadable)".into(), |n| format!("{n:.0}"));
        let mut closes: Vec<String> = self.closes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        closes.sort();
        out += &format!(
            "  slow-consumer disconnects (gateway metric) {slow}; closes seen by clients: {}\n",
            if closes.is_empty() { "none".to_owned() } else { closes.join(", ") }
        );
        let procs: Vec<String> = self
            .cpu
            .iter()
            .map(|p| format!("{} {}", p.name, p.cpu_secs.map_or("?".into(), |s| format!("{s:.2}"))))
            .collect();
        out += &format!(
            "  cpu over {:.2} s: cluster {:.2} s ({}) → {} µs/msg; bench {}\n",
            self.storm_secs,
            self.cluster_cpu_secs,
            procs.join(", "),
            self.cluster_us_per_msg.map_or("–".into(), |u| format!("{u:.0}")),
            self.bench_cpu_secs.map_or("?".into(), |s| format!("{s:.2} s"))
        );
        out
    }
}

/// Per receiver: (sender, count) — `missed` messages spread over `peers` senders.
fn assignment(spec: &CatchUpSpec) -> Vec<Vec<(usize, usize)>> {
    let peers = spec.peers.clamp(1, spec.senders.max(1));
    (0..spec.users)
        .map(|r| {
            (0..peers)
                .map(|k| {
                    let sender = (r * peers + k) % spec.senders;
                    let count = spec.missed / peers + usize::from(k < spec.missed % peers);
                    (sender, count)
                })
                .filter(|&(_, n)| n > 0)
                .collect()
        })
        .collect()
}

/// Shared counters of the storm phase.
#[derive(Default)]
struct Tally {
    complete: AtomicU64,
    connected: AtomicU64,
    connect_failures: AtomicU64,
    duplicates: AtomicU64,
    without_seq: AtomicU64,
    seq_reused: AtomicU64,
    acks: AtomicU64,
    held: AtomicU64,
    closes: std::sync::Mutex<HashMap<String, u64>>,
}

impl Tally {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn close(&self, label: String) {
        *self.closes.lock().unwrap_or_else(|p| p.into_inner()).entry(label).or_default() += 1;
    }
}

/// What one receiver measured.
#[derive(Default)]
struct DeviceResult {
    held: u64,
    complete_after: Option<Duration>,
    connected_after: Option<Duration>,
    sync_took: Option<Duration>,
}

/// Runs the storm against `target`, reading slow-consumer disconnects from the gateways'
/// `metrics_urls`.
pub async fn reconnect_storm(
    target: &Target,
    metrics_urls: &[String],
    spec: &CatchUpSpec,
) -> Result<CatchUpReport, BenchError> {
    if spec.users == 0 || spec.senders == 0 || spec.missed == 0 {
        return Err(BenchError::InvalidSpec("--users, --senders and --missed must be positive".into()));
    }
    if target.ws_urls.is_empty() {
        return Err(BenchError::InvalidSpec("no gateway to connect to".into()));
    }
    let base = crate::plan::fresh_base_uid();
    let sender_uid = |i: usize| base + i as u64;
    let receiver_uid = |r: usize| base + (spec.senders + r) as u64;
    let plan = assignment(spec);
    let mut outbox: Vec<Vec<u64>> = vec![Vec::new(); spec.senders];
    for (r, peers) in plan.iter().enumerate() {
        for &(sender, count) in peers {
            outbox[sender].extend(std::iter::repeat_n(receiver_uid(r), count));
        }
    }
    let gateways = target.ws_urls.len();
    let token = |uid: u64| im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS);

    // Phase 1: the backlog, sent while no receiver is connected.
    let began = Instant::now();
    let shutdown = CancellationToken::new();
    let receipts = Arc::new(AtomicU64::new(0));
    let saved = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let total: u64 = outbox.iter().map(|o| o.len() as u64).sum();
    let mut sender_tasks = Vec::new();
    for (i, messages) in outbox.into_iter().enumerate() {
        let uid = sender_uid(i);
        let url = target.ws_urls[crate::plan::gateway_of(uid, gateways)].clone();
        let (token, auth, timeout) = (token(uid), spec.auth, spec.connect_timeout);
        let (saved, refusals, receipts, shutdown) =
            (saved.clone(), refusals.clone(), receipts.clone(), shutdown.clone());
        sender_tasks.push(tokio::spawn(async move {
            let conn = client::connect_with(&url, &token, auth, timeout, ConnectOptions::default()).await;
            match conn {
                Ok((reader, writer)) => {
                    send_backlog(reader, writer, messages, &saved, &refusals, &receipts, shutdown).await
                }
                Err(e) => Err(e.label()),
            }
        }));
        if i % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = began + BACKLOG_TIMEOUT;
    while saved.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        if sender_tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog_secs = began.elapsed().as_secs_f64();
    let backlog_saved = saved.load(Ordering::Relaxed);
    eprintln!("[reconnect-storm] backlog: {backlog_saved}/{total} saved in {backlog_secs:.1} s; storm next");
    if backlog_saved < total {
        shutdown.cancel();
        return Err(BenchError::InvalidSpec(format!(
            "only {backlog_saved} of {total} backlog messages were saved within {BACKLOG_TIMEOUT:?}"
        )));
    }
    // Let the last saves' post-commit work settle, so the storm starts from a quiet cluster.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Phase 2: every receiver at once.
    let metric_before = slow_consumer_total(metrics_urls).await;
    let cpu_start = cpu::sample(&target.processes);
    receipts.store(0, Ordering::Relaxed);
    let storm_began = Instant::now();
    let tally = Arc::new(Tally::default());
    let per_user: Vec<u64> = plan.iter().map(|p| p.iter().map(|&(_, n)| n as u64).sum()).collect();
    let jobs: Vec<(u64, u64, ConnectOptions, String)> = (0..spec.users)
        .map(|r| {
            let uid = receiver_uid(r);
            let manual = crate::plan::own_positions(uid, 0, 1, spec.own_positions);
            let url = target.ws_urls[crate::plan::gateway_of(uid, gateways)].clone();
            (uid, per_user[r], ConnectOptions { manual_sync: manual, ..Default::default() }, url)
        })
        .collect();
    let receivers: Vec<_> = {
        let (auth, timeout, acks) = (spec.auth, spec.connect_timeout, spec.acks);
        let secret = target.jwt_secret.clone();
        let tally = tally.clone();
        let shutdown = shutdown.clone();
        let limiter = Arc::new(tokio::sync::Semaphore::new(spec.connect_concurrency.max(1)));
        jobs.into_iter()
            .map(|(uid, owed, options, url)| {
                let token = im_common::auth::issue_token(&secret, uid, TOKEN_TTL_SECS);
                let (tally, shutdown, limiter) = (tally.clone(), shutdown.clone(), limiter.clone());
                tokio::spawn(async move {
                    let device = StormDevice { url, token, auth, timeout, options, acks, owed, began: storm_began };
                    device.run(&tally, &limiter, &shutdown).await
                })
            })
            .collect()
    };
    let storm_deadline = storm_began + spec.timeout;
    let mut all_delivered = None;
    loop {
        if tally.complete.load(Ordering::Relaxed) >= spec.users as u64 {
            all_delivered = Some(storm_began.elapsed());
            break;
        }
        if Instant::now() >= storm_deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let storm_secs = storm_began.elapsed().as_secs_f64();
    let cpu_end = cpu::sample(&target.processes);
    let metric_after = slow_consumer_total(metrics_urls).await;
    let (cpu, bench_cpu_secs) = cpu::usage(&target.processes, &cpu_start, &cpu_end);
    shutdown.cancel();
    let mut results = Vec::with_capacity(receivers.len());
    for r in receivers {
        results.push(r.await.unwrap_or_default());
    }
    for s in sender_tasks {
        let _ = s.await;
    }

    let percentiles = |values: Vec<Duration>| {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds");
        for v in values {
            h.saturating_record((v.as_micros() as u64).max(1));
        }
        Percentiles::of(&h)
    };
    let held: u64 = results.iter().map(|d| d.held).sum();
    let owed: u64 = per_user.iter().sum();
    let cluster_cpu_secs: f64 = cpu.iter().filter_map(|p| p.cpu_secs).sum();
    let closes = tally.closes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(CatchUpReport {
        users: spec.users,
        missed_per_user: spec.missed,
        senders: spec.senders,
        gateways,
        backlog_messages: total,
        backlog_saved,
        backlog_refusals: refusals.load(Ordering::Relaxed),
        backlog_secs,
        connected: tally.connected.load(Ordering::Relaxed),
        connect_failures: tally.connect_failures.load(Ordering::Relaxed),
        complete_devices: results.iter().filter(|d| d.complete_after.is_some()).count() as u64,
        missing_messages: owed.saturating_sub(held),
        all_delivered_secs: all_delivered.map(|d| d.as_secs_f64()),
        device_complete_ms: percentiles(results.iter().filter_map(|d| d.complete_after).collect()),
        sync_ms: percentiles(results.iter().filter_map(|d| d.sync_took).collect()),
        connect_ms: percentiles(results.iter().filter_map(|d| d.connected_after).collect()),
        duplicates: tally.duplicates.load(Ordering::Relaxed),
        pushes_without_seq: tally.without_seq.load(Ordering::Relaxed),
        seq_reused: tally.seq_reused.load(Ordering::Relaxed),
        acks_sent: tally.acks.load(Ordering::Relaxed),
        receipts: receipts.load(Ordering::Relaxed),
        closes,
        slow_consumer_disconnects: match (metric_before, metric_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        storm_secs,
        cpu,
        cluster_cpu_secs,
        bench_cpu_secs,
        cluster_us_per_msg: (held > 0).then(|| cluster_cpu_secs * 1e6 / held as f64),
    })
}

/// The gateways' slow-consumer disconnects so far (`None` if any gateway could not be read).
async fn slow_consumer_total(metrics_urls: &[String]) -> Option<f64> {
    let mut total = 0.0;
    for url in metrics_urls {
        total += im_harness::metrics::value(url, SLOW_CONSUMER_METRIC, &[]).await.ok()?;
    }
    (!metrics_urls.is_empty()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_receiver_misses_its_share_from_distinct_senders() {
        let spec = CatchUpSpec { users: 1000, missed: 20, peers: 3, senders: 100, ..Default::default() };
        let plan = assignment(&spec);
        for peers in &plan {
            assert_eq!(peers.iter().map(|&(_, n)| n).sum::<usize>(), 20);
            let mut senders: Vec<usize> = peers.iter().map(|&(s, _)| s).collect();
            senders.dedup();
            assert_eq!(senders.len(), 3, "{peers:?}");
        }
        let mut per_sender = vec![0usize; 100];
        for &(s, n) in plan.iter().flatten() {
            per_sender[s] += n;
        }
        assert!(per_sender.iter().all(|&n| n == 200), "the backlog is spread evenly: {per_sender:?}");
    }
}
