//! The two-phase write: claim the idempotency key and append to the shard's accepted stream in one
//! atomic step, then answer `ACK(accepted)`.
//!
//! The Lua script runs on keys of one hash tag (`{s<k>}`), so it is one round trip and stays valid on
//! Redis Cluster. Appends from all connections share the gateway's multiplexed connection, which
//! pipelines concurrent calls by itself. Admission control reads a per-shard backlog figure that a
//! background task refreshes (one pipelined XLEN round per interval), never a query per message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use crate::send::{decode_state, encode_state, receipt, BaselineSaver, Stage};
use im_common::config::Config;
use im_common::keys::Keys;
use im_common::protocol::{Reason, ServerFrame};
use im_common::record::{encode, Accepted, ChatMessage, Origin, MSG_FIELD};

/// KEYS: idempotency key, accepted stream. ARGV: state to store, TTL seconds, payload, field name.
/// Returns the earlier state when the key exists (nothing appended), else nil.
const APPEND_SCRIPT: &str = r"
local prev = redis.call('GET', KEYS[1])
if prev then return prev end
redis.call('XADD', KEYS[2], '*', ARGV[4], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
";

/// Appends accepted messages to shard streams.
#[derive(Clone)]
pub struct Appender {
    conn: ConnectionManager,
    keys: Keys,
    script: Arc<Script>,
    ttl_secs: u64,
    fail_open: bool,
    max_backlog: u64,
    backlog: Arc<Vec<AtomicU64>>,
    /// `im_gateway_appends_total{shard}`, one handle per shard (no label lookup per message).
    appends: Arc<Vec<metrics::Counter>>,
    saver: BaselineSaver,
}

impl Appender {
    pub fn new(cfg: &Config, conn: ConnectionManager, keys: Keys, saver: BaselineSaver) -> Self {
        Appender {
            conn,
            keys,
            script: Arc::new(Script::new(APPEND_SCRIPT)),
            ttl_secs: cfg.idempotency.ttl_secs,
            fail_open: cfg.two_phase.fail_open,
            max_backlog: cfg.two_phase.max_backlog,
            backlog: Arc::new((0..cfg.cluster.shards).map(|_| AtomicU64::new(0)).collect()),
            appends: Arc::new(
                (0..cfg.cluster.shards)
                    .map(|s| metrics::counter!("im_gateway_appends_total", "shard" => s.to_string()))
                    .collect(),
            ),
            saver,
        }
    }

    /// Appends `msg` to `shard`'s accepted stream (or finds the earlier attempt under `key`).
    /// `in_flight`: the sending connection has accepted messages without `ACK(saved)` yet.
    pub async fn append(
        &self,
        shard: u16,
        key: &str,
        msg: ChatMessage,
        origin: Origin,
        in_flight: bool,
    ) -> Vec<ServerFrame> {
        if self.fail_open && !self.saver.outbox.is_empty() {
            // Pushes of earlier fail-open saves still wait for Redis: stay behind them.
            return self.fall_open(msg, in_flight).await;
        }
        if self.backlog[usize::from(shard)].load(Ordering::Relaxed) >= self.max_backlog {
            metrics::counter!("im_gateway_server_busy_total", "cause" => "backlog").increment(1);
            return vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))];
        }
        let payload = encode(&Accepted { msg: msg.clone(), origin });
        let result: redis::RedisResult<Option<String>> = self
            .script
            .key(key)
            .key(self.keys.accepted_stream(shard))
            .arg(encode_state(Stage::Accepted, msg.id))
            .arg(self.ttl_secs)
            .arg(payload)
            .arg(MSG_FIELD)
            .invoke_async(&mut self.conn.clone())
            .await;
        match result {
            Ok(None) => {
                self.appends[usize::from(shard)].increment(1);
                vec![receipt(Stage::Accepted, &msg.client_msg_id, msg.id)]
            }
            // A fail-open attempt claimed it but did not confirm: finish it on the baseline path.
            Ok(Some(prev)) => match decode_state(&prev) {
                Some((Stage::Pending, id)) => {
                    self.saver.save_and_answer(ChatMessage { id, ..msg }, Some(key.to_owned())).await
                }
                Some((stage, id)) => vec![receipt(stage, &msg.client_msg_id, id)],
                None => vec![ServerFrame::error(Reason::InternalError, Some(msg.client_msg_id))],
            },
            Err(e) if self.fail_open => {
                tracing::debug!(error = %e, "append failed; fail-open to the baseline path");
                self.fall_open(msg, in_flight).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "append failed; fail-open is off");
                metrics::counter!("im_gateway_server_busy_total", "cause" => "redis_unavailable").increment(1);
                vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))]
            }
        }
    }

    /// Saves `msg` on the baseline path instead of the stream — unless earlier messages of the same
    /// connection still wait in the stream: saved and pushed now, it would overtake them (SPEC §3.4),
    /// so the sender gets `server_busy` and retries.
    async fn fall_open(&self, msg: ChatMessage, in_flight: bool) -> Vec<ServerFrame> {
        if in_flight {
            metrics::counter!("im_gateway_server_busy_total", "cause" => "in_flight").increment(1);
            return vec![ServerFrame::error(Reason::ServerBusy, Some(msg.client_msg_id))];
        }
        metrics::counter!("im_gateway_fail_open_total").increment(1);
        self.saver.save_and_answer(msg, None).await
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
