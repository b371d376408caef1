//! One run: open every connection, send on schedule, record every receipt and push, drain, check.
//!
//! Timeline: connect (bounded concurrency; receivers and senders alike must finish their first
//! `PING`) → settle → warm-up → measured window → drain → shutdown. All timestamps come from one monotonic
//! clock in this process: the sender writes the send time (µs since the run's epoch) at the front of
//! the body, so the receiver computes end-to-end latency without any shared map or clock sync.
//!
//! Each sender runs two tasks: a writer that follows the schedule (open loop: a fixed interval from a
//! hashed offset, never waiting for answers; closed loop: also waiting for the previous message's
//! answer) and a reader that matches receipts to messages by `clientMsgId` (the message number).
//! Each receiver runs a reader that logs pushes and a keep-alive writer (`PING` every 30 s, under the
//! gateway's idle timeout). Messages sent during warm-up are checked like all others but kept out
//! of latency figures and rates; CPU and rates cover exactly the measured window.

use std::collections::{BTreeMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use im_common::backoff::Backoff;
use im_common::config::Mode;
use im_common::protocol::{AckType, FrameType, ServerFrame};

use crate::checker::{self, Delivery, DeliveryVerdict, ReceiverLog, RowVerdict, SenderLog, SentMsg};
use crate::client::{self, ClientFrame, Incoming, WsReader, WsWriter};
use crate::cpu::{self, ProcessCpu};
use crate::plan::{self, Pair};
use crate::recorder::{CounterSnapshot, Counters, Histograms, Latency, Recorder};
use crate::report::RunReport;
use crate::spec::{AuthMode, LoadSpec, Target};
use crate::{db, BenchError};

/// A receiver (or an idle sender) sends `PING` this often, well under the gateway's idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Closed loop: the longest a sender waits for the previous message's answer before sending anyway.
const CLOSED_LOOP_WAIT: Duration = Duration::from_secs(30);
/// After everything is answered and delivered, how long to keep listening for late duplicates.
const LINGER: Duration = Duration::from_millis(300);
/// How long connection tasks get to finish after shutdown before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Lifetime of the tokens the bench signs.
const TOKEN_TTL_SECS: u64 = 86_400;
/// Reconnect backoff: first pause, and the most it grows to (each pause is jittered ±50 %).
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Prefix of the error label a slow receiver records for its disconnects.
pub const SLOW_RECEIVER_PREFIX: &str = "slow_receiver_";

/// Socket receive buffer of a slow receiver.
const SLOW_RECV_BUFFER: u32 = 4096;

/// Whether pair `index`'s receiver is one of the slow ones (the first `slow_receivers` share).
fn is_slow(spec: &LoadSpec, index: usize) -> bool {
    (index as f64) < (spec.pairs() as f64 * spec.slow_receivers).round()
}

/// What a client needs to connect again after its connection closed.
#[derive(Clone)]
struct Link {
    uid: u64,
    urls: Arc<Vec<String>>,
    token: Arc<str>,
    auth: AuthMode,
    timeout: Duration,
    recv_buffer: Option<u32>,
    /// The gateway currently connected to (index into `urls`).
    gateway: usize,
    /// Whether to reconnect at all.
    enabled: bool,
}

impl Link {
    fn new(target: &Target, spec: &LoadSpec, uid: u64, gateway: usize, recv_buffer: Option<u32>) -> Link {
        Link {
            uid,
            urls: Arc::new(target.ws_urls.clone()),
            token: im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS).into(),
            auth: spec.auth,
            timeout: spec.connect_timeout,
            recv_buffer,
            gateway,
            enabled: spec.reconnect,
        }
    }

    /// Connects again, to the next gateway in the list each attempt, with exponential backoff and
    /// jitter (so a gateway's clients do not all come back in the same millisecond). `None` once
    /// shutdown begins.
    async fn reconnect(&mut self, rec: &Recorder, shutdown: &mut watch::Receiver<bool>) -> Option<Conn> {
        let mut backoff = Backoff::jittered(RECONNECT_FIRST, RECONNECT_MAX);
        loop {
            tokio::select! {
                _ = backoff.wait() => {}
                _ = stopped(shutdown) => return None,
            }
            self.gateway = (self.gateway + 1) % self.urls.len();
            let url = &self.urls[self.gateway];
            match client::connect_with(url, &self.token, self.auth, self.timeout, self.recv_buffer).await {
                Ok(conn) => {
                    Counters::bump(&rec.counters.reconnects);
                    return Some(conn);
                }
                Err(e) => rec.error(&format!("re{}", e.label())),
            }
        }
    }
}

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
    /// Connections opened again after they closed (with [`LoadSpec::reconnect`]).
    pub reconnects: u64,
    /// Messages sent again after a reconnect, under the same clientMsgId.
    pub resent: u64,
}

impl LoadResult {
    /// Every user id of the run (senders and receivers).
    pub fn user_range(&self) -> RangeInclusive<u64> {
        self.base_uid..=self.base_uid + (2 * self.spec.pairs() as u64).saturating_sub(1)
    }
}

/// Runs the load, checks the rows in MySQL (when the target names a database), and reports.
pub async fn run(target: &Target, spec: &LoadSpec) -> Result<RunReport, BenchError> {
    let result = run_load(target, spec).await?;
    let rows = match &target.mysql_url {
        Some(url) => Some(check_db(url, &result).await?),
        None => None,
    };
    Ok(RunReport::new(&result, rows))
}

/// Reads the run's rows from MySQL and checks them against the receipts.
pub async fn check_db(mysql_url: &str, result: &LoadResult) -> Result<RowVerdict, BenchError> {
    let rows = db::rows_from(mysql_url, result.user_range()).await?;
    Ok(checker::check_rows(&result.senders, &rows))
}

/// When things happen in a run, on the monotonic clock.
#[derive(Debug)]
struct Schedule {
    epoch: Instant,
    /// Sending starts.
    start: Instant,
    window_start: Instant,
    /// Sending stops; the window ends.
    stop: Instant,
    interval: Duration,
    closed_loop: bool,
    body_bytes: usize,
}

impl Schedule {
    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Whether a message sent at `sent_at_us` belongs to the measured window.
    fn measured(&self, sent_at_us: u64) -> bool {
        (self.us(self.window_start)..self.us(self.stop)).contains(&sent_at_us)
    }

    /// Time from `sent_at_us` to `now`.
    fn since(&self, sent_at_us: u64, now: Instant) -> Duration {
        Duration::from_micros(self.us(now).saturating_sub(sent_at_us))
    }
}

/// The body of a message: its send time, then padding to `bytes`.
fn message_body(sent_at_us: u64, bytes: usize) -> String {
    let mut body = format!("{sent_at_us}|");
    if body.len() < bytes {
        body.extend(std::iter::repeat_n('x', bytes - body.len()));
    }
    body
}

/// The send time carried by a body made by [`message_body`].
fn body_sent_at(body: &str) -> Option<u64> {
    body.split_once('|')?.0.parse().ok()
}

/// What the progress line says the run is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Connecting = 0,
    Settling = 1,
    Warmup = 2,
    Measuring = 3,
    Draining = 4,
}

/// A connection in both halves.
type Conn = (WsReader, WsWriter);

/// Runs the load and returns everything observed (the rows are checked separately, see [`run`]).
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
    let (shutdown_tx, shutdown) = watch::channel(false);
    let progress = spec.progress.map(|every| {
        tokio::spawn(progress_loop(rec.clone(), phase.clone(), spec.label.clone(), every, spec.pairs() * 2))
    });

    let conns = connect_all(target, spec, &pairs, &rec).await;
    let connections = ConnectionCounts::from(rec.counters.snapshot());
    if conns.iter().all(|(s, r)| s.is_none() || r.is_none()) {
        if let Some(p) = progress {
            p.abort();
        }
        return Err(BenchError::NothingConnected(connections.connect_fail + connections.auth_fail));
    }

    // A little lead even without settling, so every task is spawned before the first send is due.
    let start = Instant::now() + spec.settle.max(Duration::from_millis(20));
    let schedule = Arc::new(Schedule {
        epoch,
        start,
        window_start: start + spec.warmup,
        stop: start + spec.warmup + spec.duration,
        interval: spec.interval,
        closed_loop: spec.closed_loop,
        body_bytes: spec.body_bytes,
    });
    phase.store(Phase::Settling as u8, Ordering::Relaxed);
    let mut sender_tasks = Vec::new();
    let mut receiver_tasks = Vec::new();
    for (pair, (sender, receiver)) in pairs.iter().zip(conns) {
        let Some(conn) = receiver else { continue };
        let slow = is_slow(spec, pair.index);
        let link = Link::new(target, spec, pair.receiver, pair.receiver_gateway, slow.then_some(SLOW_RECV_BUFFER));
        let pace = slow.then_some(spec.slow_read_delay);
        receiver_tasks.push((
            pair.receiver,
            tokio::spawn(receive(conn, link, pace, rec.clone(), schedule.clone(), shutdown.clone())),
        ));
        // A sender without its receiver stays silent: its pushes could only be counted as lost.
        if let Some(conn) = sender {
            let link = Link::new(target, spec, pair.sender, pair.sender_gateway, None);
            sender_tasks.push(spawn_sender(conn, link, pair, &rec, &schedule, &shutdown));
        }
    }

    tokio::time::sleep_until(schedule.start).await;
    phase.store(Phase::Warmup as u8, Ordering::Relaxed);
    tokio::time::sleep_until(schedule.window_start).await;
    phase.store(Phase::Measuring as u8, Ordering::Relaxed);
    let (cpu_start, counters_start) = (cpu::sample(&target.processes), rec.counters.snapshot());
    tokio::time::sleep_until(schedule.stop).await;
    let (cpu_end, counters_end) = (cpu::sample(&target.processes), rec.counters.snapshot());
    phase.store(Phase::Draining as u8, Ordering::Relaxed);
    let (cpu, bench_cpu_secs) = cpu::usage(&target.processes, &cpu_start, &cpu_end);

    let drain_used = drain(&rec, schedule.stop, spec.drain).await;
    let _ = shutdown_tx.send(true);
    let senders = collect_senders(sender_tasks, &rec).await;
    let receivers = collect_receivers(receiver_tasks, &rec).await;
    if let Some(p) = progress {
        p.abort();
    }
    let verdict = checker::check_deliveries(&senders, &receivers);
    // Sends are counted from the logs with the same rule the latency histograms use, so the window's
    // rate and CPU per message cover exactly the measured messages.
    let sent_in_window =
        senders.iter().flat_map(|s| &s.messages).filter(|m| schedule.measured(m.sent_at_us)).count() as u64;
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
        reconnects: rec.counters.snapshot().reconnects,
        resent: rec.counters.snapshot().resent,
    })
}

/// Opens every pair's two connections, at most `connect_concurrency` at a time, each on its own task
/// (the handshakes' CPU work spreads over all cores). Returns (sender, receiver) per pair.
async fn connect_all(
    target: &Target,
    spec: &LoadSpec,
    pairs: &[Pair],
    rec: &Arc<Recorder>,
) -> Vec<(Option<Conn>, Option<Conn>)> {
    // Collected first: a borrowing iterator inside the stream would keep the future from being spawned.
    let jobs: Vec<(usize, bool, u64, usize)> = pairs
        .iter()
        .flat_map(|p| [(p.index, true, p.sender, p.sender_gateway), (p.index, false, p.receiver, p.receiver_gateway)])
        .collect();
    let attempts = futures_util::stream::iter(jobs)
        .map(|(index, is_sender, uid, gateway)| {
            let url = target.ws_urls[gateway].clone();
            let token = im_common::auth::issue_token(&target.jwt_secret, uid, TOKEN_TTL_SECS);
            let (auth, timeout, rec) = (spec.auth, spec.connect_timeout, rec.clone());
            let buffer = (!is_sender && is_slow(spec, index)).then_some(SLOW_RECV_BUFFER);
            tokio::spawn(async move {
                let began = Instant::now();
                let result = client::connect_with(&url, &token, auth, timeout, buffer).await;
                match &result {
                    Ok(_) => {
                        Counters::bump(&rec.counters.connect_ok);
                        Counters::bump(&rec.counters.auth_ok);
                        rec.record(Latency::Connect, began.elapsed());
                    }
                    Err(e) if e.is_auth() => {
                        Counters::bump(&rec.counters.connect_ok);
                        Counters::bump(&rec.counters.auth_fail);
                        rec.error(&e.label());
                    }
                    Err(e) => {
                        Counters::bump(&rec.counters.connect_fail);
                        rec.error(&e.label());
                    }
                }
                (index, is_sender, result.ok())
            })
        })
        .buffer_unordered(spec.connect_concurrency);
    let mut out: Vec<(Option<Conn>, Option<Conn>)> = (0..pairs.len()).map(|_| (None, None)).collect();
    let mut attempts = std::pin::pin!(attempts);
    while let Some(done) = attempts.next().await {
        match done {
            Ok((index, true, conn)) => out[index].0 = conn,
            Ok((index, false, conn)) => out[index].1 = conn,
            Err(_) => {
                Counters::bump(&rec.counters.connect_fail);
                rec.error("connect_task_failed");
            }
        }
    }
    out
}

/// What a sender's writer and reader share.
struct SenderState {
    uid: u64,
    to: u64,
    messages: Mutex<Vec<SentMsg>>,
    /// Signalled when a message becomes complete (closed loop waits on it).
    answered: Notify,
}

impl SenderState {
    fn messages(&self) -> std::sync::MutexGuard<'_, Vec<SentMsg>> {
        // A poisoned lock only means the other half panicked; the log itself is still consistent.
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct SenderTasks {
    state: Arc<SenderState>,
    /// The writer; it owns the current connection's receipt reader and reconnects when it breaks.
    writer: JoinHandle<()>,
}

fn spawn_sender(
    conn: Conn,
    link: Link,
    pair: &Pair,
    rec: &Arc<Recorder>,
    schedule: &Arc<Schedule>,
    shutdown: &watch::Receiver<bool>,
) -> SenderTasks {
    let state = Arc::new(SenderState {
        uid: pair.sender,
        to: pair.receiver,
        messages: Mutex::new(Vec::new()),
        answered: Notify::new(),
    });
    let session = SenderSession {
        state: state.clone(),
        link,
        rec: rec.clone(),
        schedule: schedule.clone(),
        shutdown: shutdown.clone(),
    };
    SenderTasks { writer: tokio::spawn(session.send_loop(conn, pair.offset)), state }
}

/// One sender: its log, how to reach the gateways, and the run's clock.
struct SenderSession {
    state: Arc<SenderState>,
    link: Link,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    shutdown: watch::Receiver<bool>,
}

impl SenderSession {
    fn spawn_reader(&self, reader: WsReader) -> JoinHandle<()> {
        let (state, rec, schedule, shutdown) =
            (self.state.clone(), self.rec.clone(), self.schedule.clone(), self.shutdown.clone());
        tokio::spawn(receipts(reader, state, rec, schedule, shutdown))
    }

    /// After a connection broke: connect again and resend every message that has no `ACK(saved)` and
    /// no error yet, under its own clientMsgId (the engine answers with the original serverMsgId).
    /// `None` once shutdown begins.
    async fn reconnect(&mut self) -> Option<(WsWriter, JoinHandle<()>)> {
        loop {
            let (reader, mut writer) = self.link.reconnect(&self.rec, &mut self.shutdown).await?;
            let reader = self.spawn_reader(reader);
            let unconfirmed: Vec<(usize, u64)> = {
                let mut messages = self.state.messages();
                messages
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, m)| m.saved.is_none() && m.error.is_none())
                    .map(|(seq, m)| {
                        m.resends += 1;
                        (seq, m.sent_at_us)
                    })
                    .collect()
            };
            let mut broken = false;
            for (seq, sent_at_us) in unconfirmed {
                Counters::bump(&self.rec.counters.resent);
                let body = message_body(sent_at_us, self.schedule.body_bytes);
                let client_msg_id = seq.to_string();
                let frame = ClientFrame::SingleChat {
                    to: self.state.to,
                    client_msg_id: &client_msg_id,
                    msg_type: "TEXT",
                    body: &body,
                };
                if writer.send(&frame).await.is_err() {
                    broken = true;
                    break;
                }
            }
            if !broken {
                return Some((writer, reader));
            }
            self.rec.error("write_failed");
            reader.abort();
        }
    }

    /// A sender's schedule. Open loop: message `k` goes out at `start + offset + k·interval` whatever
    /// happened to earlier ones (a late generator catches up, and the lag is recorded). Closed loop:
    /// also not before the previous message is complete (answered). The connection stays open until
    /// shutdown, so receipts of the last messages still arrive during the drain. With reconnect on, a
    /// broken connection (its reader ended, or a write failed) is replaced at once, also after the
    /// last send, so unconfirmed messages still get their receipts.
    async fn send_loop(mut self, (reader, mut writer): Conn, offset: Duration) {
        let schedule = self.schedule.clone();
        let mut reader = self.spawn_reader(reader);
        let mut next = schedule.start + offset;
        let mut last_write = Instant::now();
        let reconnect = self.link.enabled;
        // A JoinHandle must not be polled again once it has completed.
        let mut reader_done = false;
        loop {
            let sending = next < schedule.stop;
            let wake = if sending { next.min(last_write + KEEP_ALIVE) } else { last_write + KEEP_ALIVE };
            let mut broken = tokio::select! {
                _ = tokio::time::sleep_until(wake) => false,
                _ = stopped(&mut self.shutdown) => break,
                _ = &mut reader, if reconnect && !reader_done => {
                    reader_done = true;
                    true
                }
            };
            if !broken {
                let frame_ok = if sending && wake >= next {
                    self.send_next(&mut writer, &mut next).await
                } else {
                    writer.send(&ClientFrame::Ping).await.is_ok()
                };
                last_write = Instant::now();
                if !frame_ok {
                    self.rec.error("write_failed");
                    if !reconnect {
                        return;
                    }
                    broken = true;
                }
            }
            if broken {
                reader.abort();
                match self.reconnect().await {
                    Some((w, r)) => {
                        (writer, reader) = (w, r);
                        reader_done = false;
                    }
                    None => {
                        reader_done = true;
                        break;
                    }
                }
                last_write = Instant::now();
                continue;
            }
            if sending && schedule.closed_loop && !self.wait_answer().await {
                break;
            }
        }
        writer.close().await;
        // The reader returns as soon as shutdown is signalled.
        if !reader_done {
            let _ = reader.await;
        }
    }

    /// Writes message `next`'s frame and moves the schedule on; false when the write failed.
    async fn send_next(&mut self, writer: &mut WsWriter, next: &mut Instant) -> bool {
        let (state, rec, schedule) = (&self.state, &self.rec, &self.schedule);
        let now = Instant::now();
        let sent_at_us = schedule.us(now);
        let seq = {
            let mut messages = state.messages();
            messages.push(SentMsg { sent_at_us, ..Default::default() });
            messages.len() - 1
        };
        Counters::bump(&rec.counters.sent);
        if schedule.measured(sent_at_us) {
            rec.record(Latency::SendLag, now.saturating_duration_since(*next));
        }
        let body = message_body(sent_at_us, schedule.body_bytes);
        let client_msg_id = seq.to_string();
        let frame =
            ClientFrame::SingleChat { to: state.to, client_msg_id: &client_msg_id, msg_type: "TEXT", body: &body };
        *next += schedule.interval;
        writer.send(&frame).await.is_ok()
    }

    /// Closed loop: waits until the last message is complete (or the wait times out); false at shutdown.
    async fn wait_answer(&mut self) -> bool {
        let seq = self.state.messages().len().saturating_sub(1);
        let deadline = Instant::now() + CLOSED_LOOP_WAIT;
        while !self.state.messages()[seq].complete() {
            tokio::select! {
                _ = self.state.answered.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stopped(&mut self.shutdown) => return false,
            }
        }
        true
    }
}

/// Reads a sender's receipts until shutdown (or until the gateway drops the connection).
async fn receipts(
    mut reader: WsReader,
    state: Arc<SenderState>,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => return,
            r = reader.next() => r,
        };
        // Our own close, echoed by the gateway, can arrive as shutdown begins: not a failure.
        if *shutdown.borrow() {
            return;
        }
        match incoming {
            Ok(Incoming::Frame(frame)) => match frame.kind {
                FrameType::Ack | FrameType::Error => on_receipt(&frame, &state, &rec, &schedule),
                FrameType::SingleChat => rec.error("push_to_sender"),
                _ => {}
            },
            Ok(Incoming::Unparsable) => rec.error("unparsable_frame"),
            Ok(Incoming::Closed(code, reason)) => return rec.error(&close_label(code, &reason)),
            Err(_) => return rec.error("disconnected"),
        }
    }
}

fn close_label(code: u16, reason: &str) -> String {
    if reason.is_empty() {
        format!("closed_{code}")
    } else {
        format!("closed_{reason}")
    }
}

/// Applies one `ACK` or `ERROR` to the sender's log and records its latency.
fn on_receipt(frame: &ServerFrame, state: &SenderState, rec: &Recorder, schedule: &Schedule) {
    let now = Instant::now();
    let Some(seq) = frame.client_msg_id.as_deref().and_then(|c| c.parse::<usize>().ok()) else {
        if frame.kind == FrameType::Error {
            rec.error(frame.reason.map_or("unknown", |r| r.as_str()));
        }
        if frame.kind == FrameType::Ack {
            rec.error("ack_without_client_msg_id");
        }
        return;
    };
    let id = frame.server_msg_id.unwrap_or(0);
    let (latency, became_complete) = {
        let mut messages = state.messages();
        let Some(m) = messages.get_mut(seq) else {
            drop(messages);
            return rec.error("receipt_for_unknown_message");
        };
        let was_complete = m.complete();
        let latency = schedule.measured(m.sent_at_us).then(|| schedule.since(m.sent_at_us, now));
        let reason = frame.reason.map_or("unknown", |r| r.as_str());
        let latency = match (frame.kind, frame.ack_type) {
            // A resend refused (e.g. server_busy) does not undo the receipt the first send got.
            (FrameType::Error, _) if m.resends > 0 && m.receipted() => {
                drop(messages);
                rec.error(&format!("resend_{reason}"));
                return;
            }
            (FrameType::Error, _) if m.error.is_none() => {
                rec.error(reason);
                m.error = Some(reason.to_owned());
                Counters::bump(&rec.counters.errored);
                None
            }
            (FrameType::Error, _) => {
                rec.error(reason);
                None
            }
            (FrameType::Ack, Some(AckType::Accepted)) if m.accepted.is_none() => {
                m.accepted = Some(id);
                Counters::bump(&rec.counters.accepted);
                latency.map(|l| (Latency::Accepted, l))
            }
            (FrameType::Ack, Some(AckType::Saved)) if m.saved.is_none() => {
                m.saved = Some(id);
                Counters::bump(&rec.counters.saved);
                latency.map(|l| (Latency::Saved, l))
            }
            // A resent message is answered again: fine, as long as the id is the original one.
            (FrameType::Ack, Some(AckType::Accepted | AckType::Saved)) if m.resends > 0 => {
                let same = m.receipted_id() == Some(id);
                drop(messages);
                if !same {
                    rec.error("resend_answered_with_another_id");
                }
                return;
            }
            (FrameType::Ack, Some(AckType::Accepted | AckType::Saved)) => {
                drop(messages);
                rec.error("duplicate_receipt");
                return;
            }
            (FrameType::Ack, _) => {
                drop(messages);
                rec.error("unexpected_ack_type");
                return;
            }
            _ => None,
        };
        (latency, !was_complete && m.complete())
    };
    if let Some((which, l)) = latency {
        rec.record(which, l);
    }
    if became_complete {
        Counters::bump(&rec.counters.complete);
        state.answered.notify_one();
    }
}

/// Logs a receiver's pushes until shutdown, and keeps its connection alive (`PING` every
/// [`KEEP_ALIVE`]). A slow receiver (`pace`) pauses after every frame until its first disconnect,
/// which it records as `slow_receiver_<close label>`; then it reads at full speed, like a client whose
/// network recovered. With reconnect on, a closed connection is replaced (offline resend then brings
/// what was saved meanwhile); without it, or if no gateway takes it back before shutdown, the
/// receiver counts as gone.
async fn receive(
    (mut reader, mut writer): Conn,
    mut link: Link,
    mut pace: Option<Duration>,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverLog {
    let mut log = ReceiverLog { uid: link.uid, ..Default::default() };
    let slow = pace.is_some();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut ping_at = Instant::now() + KEEP_ALIVE;
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            r = reader.next() => r,
            _ = tokio::time::sleep_until(ping_at) => {
                ping_at = Instant::now() + KEEP_ALIVE;
                if writer.send(&ClientFrame::Ping).await.is_err() {
                    rec.error("write_failed");
                }
                continue;
            }
        };
        // Our own close, echoed by the gateway, can arrive as shutdown begins: not a failure.
        if *shutdown.borrow() {
            break;
        }
        let frame = match incoming {
            Ok(Incoming::Frame(frame)) => frame,
            Ok(Incoming::Unparsable) => {
                rec.error("unparsable_frame");
                continue;
            }
            Ok(Incoming::Closed(..)) | Err(_) => {
                let label = match incoming {
                    Ok(Incoming::Closed(code, reason)) => close_label(code, &reason),
                    _ => "disconnected".to_owned(),
                };
                // A gateway that drops a slow consumer whose writer is stuck on a full socket cannot
                // send it a close frame: for a slow receiver every disconnect is its own doing.
                rec.error(&if slow { format!("{SLOW_RECEIVER_PREFIX}{label}") } else { label });
                pace = None;
                if link.enabled {
                    if let Some(conn) = link.reconnect(&rec, &mut shutdown).await {
                        (reader, writer) = conn;
                        continue;
                    }
                }
                log.gone = true;
                return log;
            }
        };
        if let Some(pause) = pace {
            tokio::time::sleep(pause).await;
        }
        match frame.kind {
            FrameType::SingleChat => {}
            FrameType::Error => {
                rec.error(frame.reason.map_or("unknown", |r| r.as_str()));
                continue;
            }
            _ => continue,
        }
        let now = Instant::now();
        let seq = frame.client_msg_id.as_deref().and_then(|c| c.parse::<u64>().ok());
        let (Some(from), Some(seq), Some(server_msg_id)) = (frame.from, seq, frame.server_msg_id) else {
            rec.error("malformed_push");
            continue;
        };
        if seen.insert((from, seq)) {
            Counters::bump(&rec.counters.delivered);
            // Slow receivers' latency is their own doing; the figure is about everyone else.
            if let (Some(sent_at_us), false) = (frame.body.as_deref().and_then(body_sent_at), slow) {
                if schedule.measured(sent_at_us) {
                    rec.record(Latency::EndToEnd, schedule.since(sent_at_us, now));
                }
            }
        } else {
            Counters::bump(&rec.counters.duplicates);
        }
        log.deliveries.push(Delivery { from, seq, server_msg_id });
    }
    writer.close().await;
    log
}

/// Resolves once shutdown is signalled (or its sender is gone). The watch guard stays inside, so
/// callers' futures remain `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Waits after the last send until every message is complete and every answered one delivered, or
/// `allowance` passes; then lingers briefly for late duplicates. Returns the time used.
async fn drain(rec: &Recorder, stop: Instant, allowance: Duration) -> Duration {
    let deadline = stop + allowance;
    loop {
        let c = rec.counters.snapshot();
        let complete = c.complete >= c.sent && c.delivered + c.errored >= c.sent;
        if complete {
            tokio::time::sleep(LINGER).await;
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Instant::now().saturating_duration_since(stop)
}

async fn collect_senders(tasks: Vec<SenderTasks>, rec: &Recorder) -> Vec<SenderLog> {
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        finish(t.writer, rec).await;
        let messages = std::mem::take(&mut *t.state.messages());
        logs.push(SenderLog { uid: t.state.uid, to: t.state.to, messages });
    }
    logs
}

async fn collect_receivers(tasks: Vec<(u64, JoinHandle<ReceiverLog>)>, rec: &Recorder) -> Vec<ReceiverLog> {
    let mut logs = Vec::with_capacity(tasks.len());
    for (uid, reader) in tasks {
        let log = finish(reader, rec).await.unwrap_or(ReceiverLog { uid, deliveries: Vec::new(), gone: true });
        logs.push(log);
    }
    logs
}

/// Awaits a connection task after shutdown; one that does not end within the grace is aborted.
async fn finish<T>(mut task: JoinHandle<T>, rec: &Recorder) -> Option<T> {
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
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

/// Prints a progress line to stderr every `every`.
async fn progress_loop(rec: Arc<Recorder>, phase: Arc<AtomicU8>, label: String, every: Duration, connections: usize) {
    let began = Instant::now();
    let mut last = (began, CounterSnapshot::default());
    let label = if label.is_empty() { String::new() } else { format!("[{label}] ") };
    loop {
        tokio::time::sleep(every).await;
        let now = Instant::now();
        let c = rec.counters.snapshot();
        let rate = (c.sent - last.1.sent) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, c);
        let phase = match phase.load(Ordering::Relaxed) {
            0 => "connecting",
            1 => "settling",
            2 => "warm-up",
            3 => "measuring",
            _ => "draining",
        };
        let connected = c.connect_ok;
        eprintln!(
            "{label}{:>6.1}s {phase:<10} conn {connected}/{connections}  sent {} ({rate:.0}/s)  accepted {}  saved {}  delivered {}  errors {}  dups {}  saved p99 {:.1} ms",
            now.duration_since(began).as_secs_f64(),
            c.sent,
            c.accepted,
            c.saved,
            c.delivered,
            c.errored,
            c.duplicates,
            rec.p99_ms(Latency::Saved),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_send_time_and_have_the_requested_size() {
        let body = message_body(123_456, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(body_sent_at(&body), Some(123_456));
        // Too small a size still carries the time.
        assert_eq!(body_sent_at(&message_body(99, 1)), Some(99));
        assert_eq!(body_sent_at("hello"), None);
    }
}
