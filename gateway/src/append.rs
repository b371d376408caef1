//! The two-phase write: claim the idempotency key and append to the shard's accepted stream in one
//! atomic step, then answer `ACK(accepted)`.
//!
//! The Lua script runs on keys of one hash tag (`{s<k>}`), so it stays valid on Redis Cluster, and
//! appends of all connections share one call per shard ([`crate::append_batch`]). Admission control
//! ([`crate::admission`]) decides from figures in memory, never a query per message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use im_common::connections::RedisConn;

use crate::admission::Admission;
use crate::append_batch::{Append, AppendBatcher, Appended};
use crate::baseline::BaselineSaver;
use crate::receipt_watch::ReceiptWatch;
use crate::sessions::SenderLedger;
use im_common::config::Config;
use im_common::health::Dependencies;
use im_common::idempotency::{decode_state, encode_state, refused_answer, Stage};
use im_common::keys::Keys;
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{encode, Accepted, ChatMessage, Origin};

/// Appends accepted messages to shard streams.
#[derive(Clone)]
pub struct Appender {
    conn: RedisConn,
    keys: Keys,
    batches: AppendBatcher,
    fail_open: bool,
    admission: Arc<Admission>,
    /// `im_gateway_appends_total{shard}`, one handle per shard (no label lookup per message).
    appends: Arc<Vec<metrics::Counter>>,
    /// `im_gateway_append_seconds`: each message's append round trip (its batch's script call).
    append_seconds: metrics::Histogram,
    saver: BaselineSaver,
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
        deps: Arc<Dependencies>,
        receipts: ReceiptWatch,
    ) -> Self {
        Appender {
            batches: AppendBatcher::start(conn.clone(), &keys, cfg.cluster.shards),
            conn,
            keys,
            fail_open: cfg.two_phase.fail_open,
            admission: Arc::new(Admission::new(cfg)),
            appends: Arc::new(
                (0..cfg.cluster.shards)
                    .map(|s| metrics::counter!("im_gateway_appends_total", "shard" => s.to_string()))
                    .collect(),
            ),
            append_seconds: metrics::histogram!("im_gateway_append_seconds"),
            saver,
            deps,
            failing: Arc::default(),
            receipts,
        }
    }

    /// The answer to `msg` refused with `server_busy`: its earlier attempt's receipt if there was one
    /// (watched until final when only accepted, see [`ReceiptWatch`]).
    /// The lookup rides in the shard's next append batch: under overload most messages are refused,
    /// and a round trip each would load Redis with what admission is meant to spare it.
    async fn refused(&self, shard: u16, key: &str, msg: &ChatMessage, origin: Origin) -> ServerFrame {
        let earlier = match self.batches.append(shard, Append::lookup(key)).await {
            Ok(Appended::Earlier(state)) => Some(state),
            _ => None,
        };
        let answer = refused_answer(earlier.as_deref().and_then(decode_state), &msg.client_msg_id, Reason::ServerBusy);
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
                return self.busy(msg, "in_flight");
            }
            let (from, conn, cmid) = (msg.from, origin.conn, msg.client_msg_id.clone());
            let answer = self.saver.claim_and_save(key.to_owned(), msg).await;
            if answer.first().is_some_and(|f| f.ack_type == Some(AckType::Accepted)) {
                // In a stream from an earlier attempt: its `ACK saved` goes to that attempt's connection.
                self.receipts.watch(key.to_owned(), from, conn, cmid);
            }
            return answer;
        }
        // Refusing at once costs almost nothing and leaves the capacity to the messages admitted.
        if let Some(refusal) = self.admission.check(shard) {
            metrics::counter!("im_gateway_server_busy_total", "cause" => refusal.cause()).increment(1);
            return vec![self.refused(shard, key, &msg, origin).await];
        }
        // Only a call made while Redis was known to be away may fail open if it fails. It may still
        // have reached Redis (the gateway's belief can be stale: a reconnect, then a second crash),
        // so its entry asks the shard owner to claim its path first (`store::path_claims`).
        let known_down = self.failing.load(Ordering::Relaxed) || !self.deps.redis_up();
        let payload = encode(&Accepted { msg: msg.clone(), origin, pushed_at_epoch: None, path_claim: known_down });
        let started = std::time::Instant::now();
        let result = self
            .batches
            .append(shard, Append { key: key.to_owned(), state: encode_state(Stage::Accepted, msg.id), payload })
            .await;
        if result.is_ok() {
            // Failures say nothing about queueing (and a dead Redis is fail-open's business).
            let round_trip = started.elapsed();
            self.admission.appended(round_trip);
            self.append_seconds.record(round_trip);
        }
        self.failing.store(result.is_err(), Ordering::Relaxed);
        match result {
            Ok(Appended::New) => {
                self.appends[usize::from(shard)].increment(1);
                vec![Stage::Accepted.receipt(&msg.client_msg_id, msg.id)]
            }
            // A fail-open attempt claimed it but did not confirm: finish it on the baseline path.
            Ok(Appended::Earlier(prev)) => match decode_state(&prev) {
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
            // Redis was answering when this call was made, so its outcome is unknown whatever the
            // error: it may have run and been persisted before a crash, and a cluster connection
            // retries a failed call on its own (its last error says nothing of the first try).
            // Saved on the baseline path too, the message would get two seqs, and its stream copy
            // carries no claim. Its sender waits, like one with messages in the stream, until a
            // receipt tells what became of it (the client resends it with the same clientMsgId; the
            // window then answers).
            Err(e) if self.fail_open && !known_down => {
                tracing::debug!(error = %e, "append outcome unknown; the sender waits for it");
                ledger.unresolved(msg.from, &msg.client_msg_id);
                self.busy(msg, "append_unknown")
            }
            // Nothing was appended — Redis ran the script and refused this message (its key holds
            // another type, Redis is out of memory, ...) — or the call was made while Redis was
            // known away: the baseline path, if fail-open is on.
            not_taken => {
                tracing::debug!(outcome = ?not_taken, fail_open = self.fail_open, "append not taken");
                if self.fail_open {
                    self.fall_open(key, msg, in_flight).await
                } else {
                    self.busy(msg, "redis_unavailable")
                }
            }
        }
    }

    /// Saves `msg` on the baseline path instead of the stream — unless earlier messages of the same
    /// sender (from any of their connections on this gateway) still wait in the stream: saved and
    /// pushed now, it would overtake them (SPEC §3.4), so the sender gets `server_busy` and retries.
    /// `key` is marked saved once Redis takes it (see [`crate::outbox`]).
    async fn fall_open(&self, key: &str, msg: ChatMessage, in_flight: bool) -> Vec<ServerFrame> {
        if in_flight {
            return self.busy(msg, "in_flight");
        }
        metrics::counter!("im_gateway_fail_open_total").increment(1);
        self.saver.save_and_answer(msg, Some(key.to_owned())).await
    }

    /// `server_busy` for `msg`, counted under `cause`.
    fn busy(&self, msg: ChatMessage, cause: &'static str) -> Vec<ServerFrame> {
        metrics::counter!("im_gateway_server_busy_total", "cause" => cause).increment(1);
        vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))]
    }

    /// The per-shard backlog figures as last refreshed (unsaved entries per shard).
    pub fn backlog(&self) -> Vec<u64> {
        self.admission.backlog()
    }

    /// Keeps the admission figures current. Runs until the process ends.
    pub async fn refresh_backlog(self) {
        self.admission.refresh(self.conn.clone(), self.keys.clone()).await
    }
}
