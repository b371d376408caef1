//! What the stages of one shard's pipeline share: the [`ShardContext`], batch reading with retries,
//! and decoding.
//!
//! Full mode runs [`crate::deliver`] and [`crate::save`] concurrently; accepted-only mode runs only
//! the save stage, on `accepted`, and pushes to recipients after the commit. A stage that hits an
//! error keeps its batch unacknowledged and retries it with capped backoff; if the lease is lost
//! meanwhile it drops the batch, and the next owner reads it from the pending entries. Redelivery
//! after a crash can repeat a push (same serverMsgId) but never a row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use im_common::ids::{now_ms, timestamp_ms};
use im_common::keys::Keys;
use im_common::record::{decode, Accepted, ChatMessage, Handed, Push};
use im_common::router::{Epochs, Router, Routes, Target};
use im_common::store::Store;

use crate::lease::ShardLease;
use crate::mover::Mover;
use crate::sequences::{self, SeqPlan};
use crate::streams::{Entry, StreamReader};
use im_common::backoff::Backoff;

/// What every stage of one shard shares.
#[derive(Clone)]
pub struct ShardContext {
    pub shard: u16,
    /// `cluster.shards` (which senders are this shard's, for restoring seq counters).
    pub shards: u16,
    pub keys: Keys,
    pub lease: ShardLease,
    pub router: Router,
    pub mover: Mover,
    pub store: Store,
    /// Unix ms of the last time a stage loop went round (for `/readyz`).
    pub progress: Arc<AtomicU64>,
}

impl ShardContext {
    pub(crate) fn label(&self) -> String {
        self.shard.to_string()
    }

    fn tick(&self) {
        self.progress.store(now_ms(), Ordering::Relaxed);
    }

    /// Numbers the messages of `batch` that have no seq yet from the shard's counters (restoring
    /// lost counters from MySQL first). With `locate`, the recipients' routes and presence epochs
    /// are read in the same round trip (`Router::locate`). Messages that may also have been saved
    /// on the baseline path are claimed first ([`ShardContext::claim_paths`]).
    pub(crate) async fn number(
        &self,
        batch: &mut [Accepted],
        locate: bool,
    ) -> Result<(SeqPlan, Routes, Epochs), String> {
        self.claim_paths(batch).await?;
        loop {
            let msgs: Vec<&ChatMessage> = batch.iter().map(|a| &a.msg).collect();
            let (read, fields) = sequences::read_counters(&self.keys, self.shard, &msgs);
            let users = if locate { recipients(&msgs) } else { Vec::new() };
            let (routes, epochs, reply) = self.router.locate(&users, Some(read)).await.map_err(|e| e.to_string())?;
            if let Some(counters) = sequences::parse_counters(fields, reply).map_err(|e| e.to_string())? {
                let mut refs: Vec<&mut ChatMessage> = batch.iter_mut().map(|a| &mut a.msg).collect();
                return Ok((sequences::number(&counters, &mut refs), routes, epochs));
            }
            let restored =
                sequences::restore(&self.mover.conn, &self.keys, &self.store, self.shards, self.shard).await?;
            tracing::warn!(shard = self.shard, directions = restored, "seq counters were missing; restored from MySQL");
            metrics::counter!("im_worker_seq_restores_total", "shard" => self.label()).increment(1);
        }
    }

    /// Entries appended while their gateway believed Redis away may have been saved on the baseline
    /// path too (fail-open): claims them for the stream in MySQL, and gives each one the baseline
    /// path claimed first its row's seq, so it is not numbered again (see `store::path_claims`).
    /// One query pair per batch that holds any; none otherwise.
    async fn claim_paths(&self, batch: &mut [Accepted]) -> Result<(), String> {
        let ids: Vec<u64> = batch.iter().filter(|a| a.path_claim && a.msg.seq == 0).map(|a| a.msg.id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let saved = self.store.claim_for_stream(&ids).await.map_err(|e| format!("claiming paths in MySQL: {e}"))?;
        for a in batch.iter_mut() {
            if let Some(&seq) = saved.get(&a.msg.id) {
                a.msg.seq = seq;
            }
        }
        if !saved.is_empty() {
            tracing::info!(
                shard = self.shard,
                messages = saved.len(),
                "stream copies of fail-open saves take their rows' seqs"
            );
        }
        let label = self.label();
        metrics::counter!("im_worker_path_claims_total", "shard" => label.clone(), "path" => "stream")
            .increment((ids.len() - saved.len()) as u64);
        metrics::counter!("im_worker_path_claims_total", "shard" => label, "path" => "baseline")
            .increment(saved.len() as u64);
        Ok(())
    }

    /// The next non-empty batch, retrying failed reads with backoff; `None` once the lease is gone.
    pub(crate) async fn next_batch(&self, reader: &mut StreamReader, backoff: &mut Backoff) -> Option<Vec<Entry>> {
        while self.lease.is_valid() {
            self.tick();
            match reader.next_batch().await {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => return Some(batch),
                Err(e) => {
                    tracing::warn!(shard = self.shard, stream = %reader.key, error = %e, "read failed");
                    reader.resume();
                    backoff.wait().await;
                }
            }
        }
        None
    }

    /// Runs `step` until it succeeds, backing off between tries; `None` if the lease is lost first
    /// (the batch stays pending, and the next owner redoes it).
    pub(crate) async fn until_done<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
        &self,
        backoff: &mut Backoff,
        what: &str,
        mut step: impl FnMut() -> F,
    ) -> Option<T> {
        loop {
            match step().await {
                Ok(value) => {
                    backoff.reset();
                    return Some(value);
                }
                Err(e) => {
                    tracing::warn!(shard = self.shard, error = %e, "{what} failed; retrying the batch");
                    self.tick();
                    if !self.lease.is_valid() {
                        return None;
                    }
                    backoff.wait().await;
                }
            }
        }
    }
}

/// The messages of a batch of entries, in stream order; payloads that do not decode are set aside
/// for the dead-letter stream.
#[derive(Default)]
pub(crate) struct Decoded {
    pub ok: Vec<Accepted>,
    pub bad: Vec<Vec<u8>>,
    /// How many messages the batch's `to_save` entries held (what its commit takes off the count;
    /// 0 for a batch read from `accepted`).
    pub handed_messages: usize,
}

/// A batch read from `accepted`: one message per entry.
pub(crate) fn decode_accepted(batch: &[Entry]) -> Decoded {
    let mut d = Decoded { ok: Vec::with_capacity(batch.len()), ..Decoded::default() };
    for e in batch {
        match decode::<Accepted>(&e.payload) {
            Ok(a) => d.ok.push(a),
            Err(_) => d.bad.push(e.payload.clone()),
        }
    }
    d
}

/// A batch read from `to_save`: one deliver batch per entry. An entry of one message, as workers
/// before the batched hand-over wrote it, is read as a batch of one, so a rolling upgrade saves
/// what they left. An entry that decodes as neither counts as one message (its count is lost with
/// it; the stream's next drain resets the count).
pub(crate) fn decode_handed(batch: &[Entry]) -> Decoded {
    let mut d = Decoded::default();
    for e in batch {
        if let Ok(handed) = decode::<Handed>(&e.payload) {
            d.handed_messages += handed.len();
            d.ok.extend(handed.messages);
            d.bad.extend(handed.undecodable);
            continue;
        }
        d.handed_messages += 1;
        match decode::<Accepted>(&e.payload) {
            Ok(one) => d.ok.push(one),
            Err(_) => d.bad.push(e.payload.clone()),
        }
    }
    d
}

/// The push of a message to its recipient, wherever they are connected.
pub(crate) fn chat_push(msg: &ChatMessage) -> (Target, Push) {
    (Target::Routed, Push { user: msg.to, conn: None, frame: msg.push_frame() })
}

/// The distinct recipients of `msgs`.
pub(crate) fn recipients(msgs: &[&ChatMessage]) -> Vec<u64> {
    let mut users: Vec<u64> = msgs.iter().map(|m| m.to).collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// Seconds since the message was accepted (its id carries the time).
pub(crate) fn age_seconds(id: u64) -> f64 {
    (now_ms() as i64 - timestamp_ms(id)).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_common::record::{encode, Origin};

    fn accepted(id: u64) -> Accepted {
        let msg = ChatMessage {
            id,
            from: 1,
            to: 2,
            client_msg_id: format!("c{id}"),
            msg_type: "TEXT".into(),
            body: "hi".into(),
            seq: id,
        };
        Accepted { msg, origin: Origin { node: 1, conn: 1 }, pushed_at_epoch: Some(0), path_claim: false }
    }

    #[test]
    fn to_save_entries_of_a_batch_of_one_message_or_of_garbage_are_read_in_stream_order() {
        let entry = |id: &str, payload: Vec<u8>| Entry { id: id.into(), payload };
        let batch = [
            entry(
                "1-0",
                encode(&Handed { messages: vec![accepted(1), accepted(2)], undecodable: vec![b"x".to_vec()] }),
            ),
            // What a worker before the batched hand-over wrote: one message per entry.
            entry("2-0", encode(&accepted(3))),
            entry("3-0", b"\xc1".to_vec()),
            entry("4-0", encode(&Handed { messages: vec![accepted(4)], undecodable: vec![] })),
        ];
        let d = decode_handed(&batch);
        assert_eq!(d.ok.iter().map(|a| a.msg.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(d.bad, [b"x".to_vec(), b"\xc1".to_vec()]);
        assert_eq!(d.handed_messages, 6);
    }
}
