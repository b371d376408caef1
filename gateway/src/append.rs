//! The two-phase write: claim the idempotency key and append to the shard's accepted stream in one
//! atomic step, then answer `ACK(accepted)`.
//!
//! The Lua script runs on keys of one hash tag (`{s<k>}`), so it is one round trip and stays valid on
//! Redis Cluster. Appends from all connections share the gateway's multiplexed connection, which
//! pipelines concurrent calls by itself. Admission control reads a per-shard backlog figure that a
//! background task refreshes (one pipelined XLEN round per interval), never a query per message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use im_common::connections::RedisConn;
use redis::Script;

use crate::baseline::BaselineSaver;
use crate::receipt_watch::ReceiptWatch;
use crate::sessions::SenderLedger;
use im_common::config::Config;
use im_common::health::Dependencies;
use im_common::idempotency::{decode_state, encode_state, IdempotencyWindow, Stage};
use im_common::keys::Keys;
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{encode, Accepted, ChatMessage, Origin, MSG_FIELD};

/// KEYS: idempotency key, accepted stream. ARGV: state to store, payload, field name.
/// Returns the earlier state when the key exists (nothing appended), else nil.
///
/// The key gets no TTL here: the window of a message must last at least as long as the message is
/// unsaved (SPEC §3.9), however long MySQL is away. The save stage's commit sets the final state
/// with the `idempotency.ttl_secs` expiry. XADD comes first: if it fails nothing is claimed.
const APPEND_SCRIPT: &str = r"
local prev = redis.call('GET', KEYS[1])
if prev then return prev end
redis.call('XADD', KEYS[2], '*', ARGV[3], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return false
";

/// How long one admission window lasts.
const WINDOW_MS: u64 = 100;

/// The append round trip's standing level: the lowest round trip of each [`WINDOW_MS`] window. A
/// standing queue (Redis, the network or this process cannot keep up) raises the minimum; a burst,
/// which also makes some appends slow, does not. A window without appends reads as 0.
#[derive(Default)]
struct Pressure {
    window_start_ms: AtomicU64,
    window_min_us: AtomicU64,
    standing_us: AtomicU64,
}

impl Pressure {
    fn record(&self, round_trip: Duration) {
        self.roll();
        self.window_min_us.fetch_min(round_trip.as_micros() as u64, Ordering::Relaxed);
    }

    fn standing(&self) -> Duration {
        self.roll();
        Duration::from_micros(self.standing_us.load(Ordering::Relaxed))
    }

    fn roll(&self) {
        let now = im_common::ids::now_ms();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) < WINDOW_MS
            || self.window_start_ms.compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let min = self.window_min_us.swap(u64::MAX, Ordering::Relaxed);
        let standing = if min == u64::MAX { 0 } else { min };
        self.standing_us.store(standing, Ordering::Relaxed);
        metrics::gauge!("im_gateway_append_standing_seconds").set(standing as f64 / 1e6);
    }
}

/// Appends accepted messages to shard streams.
#[derive(Clone)]
pub struct Appender {
    conn: RedisConn,
    keys: Keys,
    script: Arc<Script>,
    fail_open: bool,
    max_backlog: u64,
    /// Load shedding bound on the standing append round trip (`gateway.shed_append_ms`; zero: off).
    shed_at: Duration,
    pressure: Arc<Pressure>,
    backlog: Arc<Vec<AtomicU64>>,
    /// `im_gateway_appends_total{shard}`, one handle per shard (no label lookup per message).
    appends: Arc<Vec<metrics::Counter>>,
    saver: BaselineSaver,
    /// For refusals: a retry of a known message gets its receipt, not `server_busy`.
    window: IdempotencyWindow,
    /// Whether Redis answered the gateway's last probe (see [`Appender::append`] on failures).
    deps: Arc<Dependencies>,
    /// The last append failed (cleared by the next that succeeds).
    failing: Arc<AtomicBool>,
    /// Resends of accepted messages: their final receipt for the resending connection.
    receipts: ReceiptWatch,
}

impl Appender {
    pub fn new(
        cfg: &Config,
        conn: RedisConn,
        keys: Keys,
        saver: BaselineSaver,
        window: IdempotencyWindow,
        deps: Arc<Dependencies>,
        receipts: ReceiptWatch,
    ) -> Self {
        Appender {
            conn,
            keys,
            script: Arc::new(Script::new(APPEND_SCRIPT)),
            fail_open: cfg.two_phase.fail_open,
            max_backlog: cfg.two_phase.max_backlog,
            shed_at: Duration::from_millis(cfg.gateway.shed_append_ms),
            pressure: Arc::default(),
            backlog: Arc::new((0..cfg.cluster.shards).map(|_| AtomicU64::new(0)).collect()),
            appends: Arc::new(
                (0..cfg.cluster.shards)
                    .map(|s| metrics::counter!("im_gateway_appends_total", "shard" => s.to_string()))
                    .collect(),
            ),
            saver,
            window,
            deps,
            failing: Arc::default(),
            receipts,
        }
    }

    /// The answer to `msg` refused with `server_busy`: its earlier attempt's receipt if there was one
    /// (watched until final when only accepted, see [`ReceiptWatch`]).
    async fn refused(&self, key: &str, msg: &ChatMessage, origin: Origin) -> ServerFrame {
        let answer = self.window.answer_refused(key, &msg.client_msg_id, Reason::ServerBusy).await;
        if answer.ack_type == Some(AckType::Accepted) {
            self.receipts.watch(key.to_owned(), msg.from, origin.conn, msg.client_msg_id.clone());
        }
        answer
    }

    /// Appends `msg` to `shard`'s accepted stream (or finds the earlier attempt under `key`).
    /// `ledger`: the senders with messages whose final receipt is still to come (see
    /// [`SenderLedger`]); fail-open never saves a message past them.
    pub async fn append(
        &self,
        shard: u16,
        key: &str,
        msg: ChatMessage,
        origin: Origin,
        ledger: &SenderLedger,
    ) -> Vec<ServerFrame> {
        let in_flight = ledger.has_unsaved(msg.from);
        if self.fail_open && !self.saver.outbox.is_empty() {
            // Marks or pushes of earlier fail-open saves still wait for Redis: stay behind them.
            if in_flight {
                return self.busy_in_flight(msg);
            }
            return self.saver.claim_and_save(key.to_owned(), msg).await;
        }
        if self.backlog[usize::from(shard)].load(Ordering::Relaxed) >= self.max_backlog {
            metrics::counter!("im_gateway_server_busy_total", "cause" => "backlog").increment(1);
            return vec![self.refused(key, &msg, origin).await];
        }
        // Overload: appends queue up somewhere (client sockets, this process, Redis). Refusing at
        // once costs almost nothing and leaves the capacity to the messages already admitted.
        if !self.shed_at.is_zero() && self.pressure.standing() >= self.shed_at {
            metrics::counter!("im_gateway_server_busy_total", "cause" => "overload").increment(1);
            return vec![self.refused(key, &msg, origin).await];
        }
        let payload = encode(&Accepted { msg: msg.clone(), origin, pushed_at_epoch: None });
        // Redis was known to be away before this call: a call that then fails never reached it.
        let known_down = self.failing.load(Ordering::Relaxed) || !self.deps.redis_up();
        let started = std::time::Instant::now();
        let result: redis::RedisResult<Option<String>> = self
            .script
            .key(key)
            .key(self.keys.accepted_stream(shard))
            .arg(encode_state(Stage::Accepted, msg.id))
            .arg(payload)
            .arg(MSG_FIELD)
            .invoke_async(&mut self.conn.clone())
            .await;
        if result.is_ok() {
            // Failures say nothing about queueing (and a dead Redis is fail-open's business).
            self.pressure.record(started.elapsed());
        }
        self.failing.store(result.is_err(), Ordering::Relaxed);
        match result {
            Ok(None) => {
                self.appends[usize::from(shard)].increment(1);
                vec![Stage::Accepted.receipt(&msg.client_msg_id, msg.id)]
            }
            // A fail-open attempt claimed it but did not confirm: finish it on the baseline path.
            Ok(Some(prev)) => match decode_state(&prev) {
                Some((Stage::Pending, id)) => {
                    self.saver.save_and_answer(ChatMessage { id, ..msg }, Some(key.to_owned())).await
                }
                Some((Stage::Accepted, id)) => {
                    // Its `ACK saved` goes to the first attempt's connection, which may be gone.
                    self.receipts.watch(key.to_owned(), msg.from, origin.conn, msg.client_msg_id.clone());
                    vec![Stage::Accepted.receipt(&msg.client_msg_id, id)]
                }
                Some((stage, id)) => vec![stage.receipt(&msg.client_msg_id, id)],
                None => vec![ServerFrame::error(Reason::InternalError, Some(msg.client_msg_id))],
            },
            // The outcome is unknown: the call timed out (Redis is stalled and runs the append when
            // it resumes), or the connection broke under a call made while Redis was answering (it
            // may have run, and been persisted, before the crash). Saving it on the baseline path
            // too would give one message two seqs (the stream copy gets another when it is
            // numbered). Its sender waits, like one with messages in the stream, until a receipt
            // tells what became of it (the client resends it with the same clientMsgId; the window
            // then answers). Calls made once the outage is known fail open, and so do calls Redis
            // answered with an error (the script ran, and failed before its XADD).
            Err(e)
                if self.fail_open
                    && (e.is_timeout() || (!known_down && e.is_io_error() && !e.is_connection_refusal())) =>
            {
                tracing::debug!(error = %e, "append outcome unknown; the sender waits for it");
                ledger.unresolved(msg.from, &msg.client_msg_id);
                metrics::counter!("im_gateway_server_busy_total", "cause" => "append_unknown").increment(1);
                vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))]
            }
            Err(e) if self.fail_open => {
                tracing::debug!(error = %e, "append failed; fail-open to the baseline path");
                self.fall_open(key, msg, in_flight).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "append failed; fail-open is off");
                metrics::counter!("im_gateway_server_busy_total", "cause" => "redis_unavailable").increment(1);
                vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))]
            }
        }
    }

    /// Saves `msg` on the baseline path instead of the stream — unless earlier messages of the same
    /// sender (from any of their connections on this gateway) still wait in the stream: saved and
    /// pushed now, it would overtake them (SPEC §3.4), so the sender gets `server_busy` and retries.
    /// `key` is marked saved once Redis takes it (see [`crate::outbox`]).
    async fn fall_open(&self, key: &str, msg: ChatMessage, in_flight: bool) -> Vec<ServerFrame> {
        if in_flight {
            return self.busy_in_flight(msg);
        }
        metrics::counter!("im_gateway_fail_open_total").increment(1);
        self.saver.save_and_answer(msg, Some(key.to_owned())).await
    }

    fn busy_in_flight(&self, msg: ChatMessage) -> Vec<ServerFrame> {
        metrics::counter!("im_gateway_server_busy_total", "cause" => "in_flight").increment(1);
        vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))]
    }

    /// The per-shard backlog figures as last refreshed (unsaved entries per shard).
    pub fn backlog(&self) -> Vec<u64> {
        self.backlog.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// Keeps the per-shard backlog figure current: unsaved entries = accepted + to_save stream
    /// lengths (both are trimmed as entries move on). Runs until the process ends.
    pub async fn refresh_backlog(self) {
        let shards = self.backlog.len() as u16;
        loop {
            let mut pipe = redis::pipe();
            for shard in 0..shards {
                pipe.xlen(self.keys.accepted_stream(shard)).xlen(self.keys.to_save_stream(shard));
            }
            if let Ok(lengths) = pipe.query_async::<Vec<u64>>(&mut self.conn.clone()).await {
                for (shard, pair) in lengths.chunks(2).enumerate() {
                    let backlog = pair.iter().sum::<u64>();
                    self.backlog[shard].store(backlog, Ordering::Relaxed);
                    metrics::gauge!("im_gateway_shard_backlog", "shard" => shard.to_string()).set(backlog as f64);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_window() {
        std::thread::sleep(Duration::from_millis(WINDOW_MS + 20));
    }

    #[test]
    fn the_standing_round_trip_is_the_lowest_of_the_last_window() {
        let p = Pressure::default();
        p.standing(); // opens the first window
        for ms in [80, 5, 60] {
            p.record(Duration::from_millis(ms));
        }
        next_window();
        assert_eq!(p.standing(), Duration::from_millis(5), "one fast append shows there is no standing queue");
    }

    #[test]
    fn a_window_of_only_slow_appends_raises_the_standing_level() {
        let p = Pressure::default();
        p.standing();
        for ms in [70, 55, 90] {
            p.record(Duration::from_millis(ms));
        }
        next_window();
        assert_eq!(p.standing(), Duration::from_millis(55));
        // A window without appends reads as 0: nothing is queued.
        next_window();
        assert_eq!(p.standing(), Duration::ZERO);
    }
}
