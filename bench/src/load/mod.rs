//! One run: open every connection, send on schedule, record every receipt and push, drain, stop.
//!
//! Timeline: connect (bounded concurrency; receivers and senders alike must finish their first
//! `PING`) → settle → warm-up → measured window → drain → shutdown. All timestamps come from one
//! monotonic clock in this process (`schedule`). Messages sent during warm-up are checked like all
//! others but kept out of latency figures and rates; CPU, rates and (on a Redis Cluster) each node's
//! command counts cover exactly the measured window.
//!
//! The parts: `link` opens connections (and reopens them), `sender` and `receiver` are the
//! connection tasks, `progress` prints the progress line. Shutdown is one `CancellationToken` that
//! every task selects on, and one `TaskTracker` that the run waits on for at most a grace period;
//! each task's log is its return value, so a task still running after the grace is aborted and
//! counted (`task_stuck_at_shutdown`) rather than waited for.
//!
//! The drain (after the last send, until every message is answered and delivered) polls the
//! recorder's counters every `DRAIN_POLL` instead of being notified: the counters are bumped on the
//! hot path by every connection task, and a wake-up per bump would cost more than a 20 ms poll.
//! Checking rows against the database is [`crate::run()`]'s job, not this module's.

mod delivered;
pub(crate) mod device;
mod link;
mod progress;
mod receiver;
mod schedule;
mod sender;
mod storm;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use im_common::config::Mode;

use crate::checker::{self, DeliveryVerdict, ReceiverLog, RecipientVerdict, SenderLog};
use crate::cpu::{self, ProcessCpu};
use crate::plan;
use crate::recorder::{CounterSnapshot, Histograms, Recorder};
use crate::redis_nodes::{self, CommandSnapshot, RedisNodeLoad};
use crate::spec::{LoadSpec, Target};
use crate::BenchError;

use link::{connect_all, device_gateway, device_options, is_slow, Link};
use progress::{progress_loop, Phase};
use schedule::Schedule;
use sender::{spawn_sender, SenderOptions, SenderTasks};

pub(crate) use link::close_label;
pub use receiver::CHURN_CLOSE_LABEL;
pub use storm::ReconnectStorm;

/// A receiver (or an idle sender) sends `PING` this often, well under the gateway's idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// After everything is answered and delivered, how long to keep listening for late duplicates.
const LINGER: Duration = Duration::from_millis(300);
/// With confirming receivers: how long everything must stay complete (every device holding what it
/// is owed, every confirmed position back at its sender as a receipt) before the drain ends — a
/// confirmation goes out up to 100 ms after its push and the gateway relays it coalesced.
const RECEIPT_SETTLE: Duration = Duration::from_millis(1500);
/// How long connection tasks get to finish after shutdown before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the drain looks at the counters.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The least lead between spawning the connection tasks and the first send, even without settling.
const MIN_LEAD: Duration = Duration::from_millis(20);
/// Prefix of the error label a slow receiver records for its disconnects.
pub const SLOW_RECEIVER_PREFIX: &str = "slow_receiver_";
/// A connection a reconnect storm closed is recorded as if the gateway had closed it with this code
/// and reason (`closed_by_storm`).
const STORM_CLOSE_CODE: u16 = 1000;
const STORM_CLOSE_LABEL: &str = "by_storm";

/// Connection outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub connect_ok: u64,
    pub connect_fail: u64,
    /// Handshakes that got through with valid credentials (auth failures count as connected).
    pub auth_ok: u64,
    pub auth_fail: u64,
}

impl From<CounterSnapshot> for ConnectionCounts {
    fn from(c: CounterSnapshot) -> Self {
        ConnectionCounts {
            connect_ok: c.connect_ok,
            connect_fail: c.connect_fail,
            auth_ok: c.auth_ok,
            auth_fail: c.auth_fail,
        }
    }
}

/// Counts over the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub secs: f64,
    /// Messages sent in the window.
    pub sent: u64,
    /// `ACK(saved)` receipts and first pushes that arrived during the window (throughput).
    pub saved: u64,
    pub delivered: u64,
}

/// Everything one run observed, before the database check.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub mode: Mode,
    pub spec: LoadSpec,
    pub gateways: usize,
    pub base_uid: u64,
    /// Unix ms when the run began (connect phase).
    pub started_at_ms: u64,
    pub connections: ConnectionCounts,
    pub senders: Vec<SenderLog>,
    pub receivers: Vec<ReceiverLog>,
    pub verdict: DeliveryVerdict,
    pub histograms: Histograms,
    /// Failures by reason: server `ERROR` reasons and client-side ones (`connect_*`, `closed_*`, ...).
    pub errors: BTreeMap<String, u64>,
    pub window: Window,
    /// How much of the drain allowance was used.
    pub drain_used: Duration,
    /// CPU of the cluster's processes over the measured window.
    pub cpu: Vec<ProcessCpu>,
    /// CPU of the bench itself over the measured window.
    pub bench_cpu_secs: Option<f64>,
    /// On a Redis Cluster, what each master served over the measured window (empty on one server).
    pub redis_nodes: Vec<RedisNodeLoad>,
    /// Connections opened again after they closed (with [`LoadSpec::reconnect`]).
    pub reconnects: u64,
    /// Messages sent again after a reconnect, under the same clientMsgId.
    pub resent: u64,
    /// `ACK delivered` / `ACK read` frames the receivers sent (see [`LoadSpec::acks`]).
    pub delivered_acks: u64,
    pub read_acks: u64,
    /// `SYNC {peer, afterSeq}` the devices sent for gaps in live pushes; reconnections that sent
    /// their own positions; `SYNC_DONE`s received; `RECEIPT`s the senders received.
    pub gap_syncs: u64,
    pub own_position_syncs: u64,
    pub sync_dones: u64,
    pub receipts: u64,
    /// Per receiving device (see [`checker::check_recipients`]), from the logs alone; the row check
    /// ([`crate::run::check_db_all`]) judges it again with the rows' seqs.
    pub recipients: RecipientVerdict,
}

impl LoadResult {
    /// Every user id of the run (senders and receivers).
    pub fn user_range(&self) -> RangeInclusive<u64> {
        self.base_uid..=self.base_uid + (2 * self.spec.pairs() as u64).saturating_sub(1)
    }
}

/// Runs the load and returns everything observed (the rows are checked separately, see [`crate::run()`]).
pub async fn run_load(target: &Target, spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    spec.validate()?;
    if target.ws_urls.is_empty() {
        return Err(BenchError::InvalidSpec("no gateway to connect to".into()));
    }
    let base_uid = spec.base_uid.unwrap_or_else(plan::fresh_base_uid);
    let pairs = plan::pairs(base_uid, spec.connections, target.ws_urls.len(), spec.interval);
    let rec = Arc::new(Recorder::default());
    let started_at_ms = im_common::ids::now_ms();
    let epoch = Instant::now();
    let phase = Arc::new(AtomicU8::new(Phase::Connecting as u8));
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let progress_done = CancellationToken::new();
    let progress = spec.progress.map(|every| {
        let (rec, phase, label, done) = (rec.clone(), phase.clone(), spec.label.clone(), progress_done.clone());
        tokio::spawn(progress_loop(rec, phase, label, every, spec.pairs() * 2, done))
    });

    let devices: std::collections::HashMap<u64, u64> =
        pairs.iter().map(|p| (p.receiver, u64::from(plan::devices_of(p.receiver, spec.two_devices)))).collect();
    rec.ledger.set_devices(devices);
    let conns = connect_all(target, spec, &pairs, &rec).await;
    let connections = ConnectionCounts::from(rec.counters.snapshot());
    if conns.iter().all(|c| c.sender.is_none() || c.devices.iter().all(Option::is_none)) {
        progress_done.cancel();
        return Err(BenchError::NothingConnected(connections.connect_fail + connections.auth_fail));
    }

    // A little lead even without settling, so every task is spawned before the first send is due.
    let start = Instant::now() + spec.settle.max(MIN_LEAD);
    let schedule = Arc::new(Schedule {
        epoch,
        start,
        window_start: start + spec.warmup,
        stop: start + spec.warmup + spec.duration,
        interval: spec.interval,
        closed_loop: spec.closed_loop,
        body_bytes: spec.body_bytes,
        messages_per_sender: spec.messages_per_sender,
    });
    phase.store(Phase::Settling as u8, Ordering::Relaxed);
    let mut sender_tasks = Vec::new();
    let mut receiver_tasks = Vec::new();
    let receiver_up: Vec<bool> = conns.iter().map(|c| c.devices.iter().any(Option::is_some)).collect();
    let cross = cross_receivers(spec.crossed, &pairs, &receiver_up);
    let gateways = target.ws_urls.len();
    for ((pair, conns), cross_to) in pairs.iter().zip(conns).zip(cross) {
        let any_device = conns.devices.iter().any(Option::is_some);
        for (device, conn) in conns.devices.into_iter().enumerate() {
            let device = device as u8;
            let Some(conn) = conn else {
                receiver_tasks.push((pair.receiver, device, None));
                continue;
            };
            let slow = device == 0 && is_slow(spec, pair.index);
            let options = device_options(spec, pair, device);
            let link = Link::new(target, spec, pair.receiver, device_gateway(pair, device, gateways), options);
            let behaviour = receiver::Behaviour {
                pace: slow.then_some(spec.slow_read_delay),
                acks: spec.receiver_acks(),
                ack_read: spec.ack_read,
                storm: spec.storm.as_ref().map(ReconnectStorm::watch),
                device,
                primary: device == 0,
                churn: spec.churn.map(|c| receiver::ChurnState::new(c, pair.receiver, device, schedule.stop)),
            };
            let task =
                tasks.spawn(receiver::receive(conn, link, behaviour, rec.clone(), schedule.clone(), shutdown.clone()));
            receiver_tasks.push((pair.receiver, device, Some(task)));
        }
        // A sender without any device of its receiver stays silent: its pushes could only be lost.
        if let (Some(conn), true) = (conns.sender, any_device) {
            let link = Link::new(target, spec, pair.sender, pair.sender_gateway, Default::default());
            let options = SenderOptions { storm: spec.storm.as_ref().map(ReconnectStorm::watch), cross_to };
            sender_tasks.push(spawn_sender(conn, link, options, pair, &rec, &schedule, &shutdown, &tasks));
        }
    }

    tokio::time::sleep_until(schedule.start).await;
    phase.store(Phase::Warmup as u8, Ordering::Relaxed);
    tokio::time::sleep_until(schedule.window_start).await;
    phase.store(Phase::Measuring as u8, Ordering::Relaxed);
    let (cpu_start, counters_start) = (cpu::sample(&target.processes), rec.counters.snapshot());
    let redis_start = match &target.redis_cluster {
        Some(cluster) => Some(CommandSnapshot::take(cluster).await),
        None => None,
    };
    tokio::time::sleep_until(schedule.stop).await;
    let (cpu_end, counters_end) = (cpu::sample(&target.processes), rec.counters.snapshot());
    let redis_end = match &redis_start {
        Some(start) => Some(start.again().await),
        None => None,
    };
    phase.store(Phase::Draining as u8, Ordering::Relaxed);
    let (cpu, bench_cpu_secs) = cpu::usage(&target.processes, &cpu_start, &cpu_end);

    let drain_used = drain(&rec, schedule.stop, spec.drain, spec.receiver_acks().confirms()).await;
    shutdown.cancel();
    tasks.close();
    // Whatever has not ended by then is abandoned (and counted) in `finish`.
    let grace_end = Instant::now() + SHUTDOWN_GRACE;
    let _ = tokio::time::timeout_at(grace_end, tasks.wait()).await;
    let senders = collect_senders(sender_tasks, &rec, grace_end).await;
    let receivers = collect_receivers(receiver_tasks, &rec, grace_end).await;
    progress_done.cancel();
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let verdict = checker::check_deliveries(&senders, &receivers);
    let recipients = checker::check_recipients(&senders, &receivers, None, spec.ack_read);
    // Sends are counted from the logs with the same rule the latency histograms use, so the window's
    // rate and CPU per message cover exactly the measured messages.
    let sent_in_window =
        senders.iter().flat_map(|s| &s.messages).filter(|m| schedule.measured(m.sent_at_us)).count() as u64;
    let end = rec.counters.snapshot();
    let redis_nodes = match (&target.redis_cluster, &redis_start, &redis_end) {
        (Some(cluster), Some(start), Some(end)) => redis_nodes::node_loads(cluster, start, end, sent_in_window),
        _ => Vec::new(),
    };
    Ok(LoadResult {
        mode: target.mode,
        spec: spec.clone(),
        gateways: target.ws_urls.len(),
        base_uid,
        started_at_ms,
        connections,
        senders,
        receivers,
        verdict,
        histograms: rec.histograms(),
        errors: rec.errors(),
        window: Window {
            secs: spec.duration.as_secs_f64(),
            sent: sent_in_window,
            saved: counters_end.saved - counters_start.saved,
            delivered: counters_end.delivered - counters_start.delivered,
        },
        drain_used,
        cpu,
        bench_cpu_secs,
        redis_nodes,
        reconnects: end.reconnects,
        resent: end.resent,
        delivered_acks: end.delivered_acks,
        read_acks: end.read_acks,
        gap_syncs: end.gap_syncs,
        own_position_syncs: end.own_position_syncs,
        sync_dones: end.sync_dones,
        receipts: end.receipts,
        recipients,
    })
}

/// Crossed load: per pair, the receiver its sender's odd-numbered messages go to — the next connected
/// receiver in pair order (wrapping), so every receiver hears from two senders. `None` for every pair
/// without crossing, or with fewer than two connected receivers.
fn cross_receivers(crossed: bool, pairs: &[plan::Pair], receiver_up: &[bool]) -> Vec<Option<u64>> {
    let connected: Vec<u64> = pairs.iter().zip(receiver_up).filter(|(_, &up)| up).map(|(p, _)| p.receiver).collect();
    pairs
        .iter()
        .map(|p| {
            if !crossed || connected.len() < 2 {
                return None;
            }
            let at = connected.iter().position(|&r| r == p.receiver)?;
            Some(connected[(at + 1) % connected.len()])
        })
        .collect()
}

/// Waits after the last send until every message is complete, every answered one delivered, and
/// every device holds what it is owed, or `allowance` passes; then lingers briefly for late
/// duplicates. With confirming receivers (`receipts`), also until every confirmed position
/// has come back to its sender as a `RECEIPT`, all of it holding for [`RECEIPT_SETTLE`]. Returns the
/// time used.
async fn drain(rec: &Recorder, stop: Instant, allowance: Duration, receipts: bool) -> Duration {
    let deadline = stop + allowance;
    let settle = if receipts { RECEIPT_SETTLE } else { Duration::ZERO };
    let mut complete_since: Option<Instant> = None;
    loop {
        let c = rec.counters.snapshot();
        let complete = c.complete >= c.sent
            && c.delivered + c.errored >= c.sent
            && c.device_held >= c.device_owed
            && (!receipts || rec.ledger.receipts_behind() == 0);
        let now = Instant::now();
        complete_since = if complete { complete_since.or(Some(now)) } else { None };
        if complete_since.is_some_and(|t| now >= t + settle) {
            tokio::time::sleep(LINGER).await;
            break;
        }
        if now >= deadline {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    Instant::now().saturating_duration_since(stop)
}

async fn collect_senders(tasks: Vec<SenderTasks>, rec: &Recorder, grace_end: Instant) -> Vec<SenderLog> {
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        finish(t.writer, rec, grace_end).await;
        let messages = std::mem::take(&mut *t.state.messages());
        let receipts = std::mem::take(&mut *t.state.receipts());
        logs.push(SenderLog { uid: t.state.uid, to: t.state.to, messages, receipts });
    }
    logs
}

/// Every device's log; a device that never connected (`None`) or whose task did not end counts as
/// gone.
async fn collect_receivers(
    tasks: Vec<(u64, u8, Option<JoinHandle<ReceiverLog>>)>,
    rec: &Recorder,
    grace_end: Instant,
) -> Vec<ReceiverLog> {
    let mut logs = Vec::with_capacity(tasks.len());
    for (uid, device, reader) in tasks {
        let log = match reader {
            Some(reader) => finish(reader, rec, grace_end).await,
            None => None,
        };
        logs.push(log.unwrap_or(ReceiverLog { uid, device, gone: true, ..Default::default() }));
    }
    logs
}

/// A connection task's result. The tracker has seen every task end (or the grace ran out), so this
/// waits only for a task that is still storing its result — until `grace_end`; one still running
/// then is aborted and counted.
async fn finish<T>(mut task: JoinHandle<T>, rec: &Recorder, grace_end: Instant) -> Option<T> {
    match tokio::time::timeout_at(grace_end, &mut task).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(_)) => {
            rec.error("task_panicked");
            None
        }
        Err(_) => {
            task.abort();
            rec.error("task_stuck_at_shutdown");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crossed_load_sends_to_the_next_connected_receiver() {
        let pairs = plan::pairs(100, 8, 2, Duration::from_millis(10));
        let receivers: Vec<u64> = pairs.iter().map(|p| p.receiver).collect();
        assert_eq!(cross_receivers(false, &pairs, &[true; 4]), vec![None; 4]);
        assert_eq!(
            cross_receivers(true, &pairs, &[true; 4]),
            vec![Some(receivers[1]), Some(receivers[2]), Some(receivers[3]), Some(receivers[0])]
        );
        // Receiver 2 never connected: nobody sends to it, and its own sender stays silent anyway.
        assert_eq!(
            cross_receivers(true, &pairs, &[true, true, false, true]),
            vec![Some(receivers[1]), Some(receivers[3]), None, Some(receivers[0])]
        );
        assert_eq!(cross_receivers(true, &pairs[..1], &[true]), vec![None], "one pair has nobody to cross to");
    }
}
