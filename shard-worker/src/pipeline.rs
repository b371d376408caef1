//! The deliver-then-save pipeline of one shard.
//!
//! Full mode runs two stages concurrently:
//! - **deliver**: read a batch from `accepted` → push every message to its recipient (one route lookup
//!   and one PUBLISH per gateway node for the whole batch) → hand the batch to `to_save` and XACK it.
//! - **save**: read a batch from `to_save` → one multi-row INSERT → after COMMIT, `ACK(saved)` to the
//!   senders (grouped per node) → XACK, mark saved, trim.
//!
//! Accepted-only mode runs only the save stage, on `accepted`, and pushes to recipients after the
//! commit. A stage that hits an error keeps its batch unacknowledged and retries it with capped
//! backoff; if the lease is lost meanwhile it drops the batch, and the next owner reads it from the
//! pending entries. Redelivery after a crash can repeat a push (same serverMsgId) but never a row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use im_common::bus::{Router, Target};
use im_common::ids::{now_ms, timestamp_ms};
use im_common::keys::Keys;
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{decode, Accepted, ChatMessage, Push};
use im_common::store::Store;

use crate::lease::ShardLease;
use crate::streams::{DeadLetter, Entry, Mover, StreamReader};
use im_common::backoff::Backoff;

/// What every stage of one shard shares.
#[derive(Clone)]
pub struct ShardContext {
    pub shard: u16,
    pub keys: Keys,
    pub lease: ShardLease,
    pub router: Router,
    pub mover: Mover,
    pub store: Store,
    /// Unix ms of the last time a stage loop went round (for `/readyz`).
    pub progress: Arc<AtomicU64>,
}

impl ShardContext {
    fn label(&self) -> String {
        self.shard.to_string()
    }

    fn tick(&self) {
        self.progress.store(now_ms(), Ordering::Relaxed);
    }

    /// The next non-empty batch, retrying failed reads with backoff; `None` once the lease is gone.
    async fn next_batch(&self, reader: &mut StreamReader, backoff: &mut Backoff) -> Option<Vec<Entry>> {
        while self.lease.is_valid() {
            self.tick();
            match reader.next_batch().await {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => return Some(batch),
                Err(e) => {
                    tracing::warn!(shard = self.shard, stream = %reader.key, error = %e, "read failed");
                    reader.rewind();
                    backoff.wait().await;
                }
            }
        }
        None
    }

    /// Runs `step` until it succeeds, backing off between tries; `None` if the lease is lost first
    /// (the batch stays pending, and the next owner redoes it).
    async fn until_done<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
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

/// Entries decoded; those that do not decode are set aside for the dead-letter stream.
struct Decoded<'a> {
    ok: Vec<(&'a Entry, Accepted)>,
    bad: Vec<&'a Entry>,
}

fn decode_batch(batch: &[Entry]) -> Decoded<'_> {
    let mut d = Decoded { ok: Vec::with_capacity(batch.len()), bad: Vec::new() };
    for e in batch {
        match decode::<Accepted>(&e.payload) {
            Ok(a) => d.ok.push((e, a)),
            Err(_) => d.bad.push(e),
        }
    }
    d
}

fn chat_push(msg: &ChatMessage) -> (Target, Push) {
    (Target::Routed, Push { user: msg.to, conn: None, frame: ServerFrame::chat(msg) })
}

/// Seconds since the message was accepted (its id carries the time).
fn age_seconds(id: u64) -> f64 {
    (now_ms() as i64 - timestamp_ms(id)).max(0) as f64 / 1000.0
}

/// The deliver stage (full mode). Returns when the lease is lost.
pub async fn deliver_stage(ctx: ShardContext, mut reader: StreamReader) {
    let to_save = ctx.keys.to_save_stream(ctx.shard);
    let shard = ctx.label();
    let pushed_age = metrics::histogram!("im_worker_accepted_to_pushed_seconds", "shard" => shard.clone());
    let mut backoff = Backoff::default();
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = decode_batch(&batch);
        let pushes: Vec<_> = decoded.ok.iter().map(|(_, a)| chat_push(&a.msg)).collect();
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        // Undecodable entries go straight to to_save too: the save stage dead-letters them in one place.
        let payloads: Vec<&[u8]> = batch.iter().map(|e| e.payload.as_slice()).collect();
        let handoff = || async {
            let (pubs, _) = ctx.router.prepare(&pushes, None).await?;
            ctx.mover.handoff(&reader.key, &to_save, &ids, &payloads, &pubs).await
        };
        if ctx.until_done(&mut backoff, "deliver: push/handoff", handoff).await.is_none() {
            return;
        }
        metrics::counter!("im_worker_delivered_total", "shard" => shard.clone()).increment(decoded.ok.len() as u64);
        metrics::histogram!("im_worker_batch_size", "shard" => shard.clone(), "stage" => "deliver")
            .record(batch.len() as f64);
        for (_, a) in &decoded.ok {
            pushed_age.record(age_seconds(a.msg.id));
        }
    }
}

/// The save stage: reads `to_save` (full mode) or `accepted` (accepted-only mode, which also pushes
/// to recipients after the commit). Returns when the lease is lost.
pub async fn save_stage(ctx: ShardContext, mut reader: StreamReader, push_after_save: bool) {
    let dead_stream = ctx.keys.dead_letter_stream(ctx.shard);
    let shard = ctx.label();
    let saved_age = metrics::histogram!("im_worker_accepted_to_saved_seconds", "shard" => shard.clone());
    let mut backoff = Backoff::default();
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = decode_batch(&batch);
        let msgs: Vec<ChatMessage> = decoded.ok.iter().map(|(_, a)| a.msg.clone()).collect();

        // Save, retrying while the database is away; the entries stay pending meanwhile.
        let insert = || async {
            let started = Instant::now();
            let result = ctx.store.save_batch(&msgs).await;
            match &result {
                Ok(_) => metrics::histogram!("im_worker_insert_seconds", "shard" => shard.clone())
                    .record(started.elapsed().as_secs_f64()),
                Err(_) => metrics::counter!("im_worker_save_retries_total", "shard" => shard.clone()).increment(1),
            }
            result
        };
        let Some(outcome) = ctx.until_done(&mut backoff, "save: insert", insert).await else { return };

        let mut frames = Vec::with_capacity(msgs.len() * 2);
        let mut saved_keys = Vec::with_capacity(outcome.saved.len());
        for &(i, id) in &outcome.saved {
            let a = &decoded.ok[i].1;
            let to_sender = Push {
                user: a.msg.from,
                conn: Some(a.origin.conn),
                frame: ServerFrame::ack(AckType::Saved, &a.msg.client_msg_id, id),
            };
            frames.push((Target::Node(a.origin.node), to_sender));
            if push_after_save {
                frames.push(chat_push(&ChatMessage { id, ..a.msg.clone() }));
            }
            saved_keys.push((ctx.keys.idempotency(ctx.shard, a.msg.from, &a.msg.client_msg_id), format!("s:{id}")));
        }
        let mut dead: Vec<DeadLetter> =
            decoded.bad.iter().map(|e| DeadLetter { payload: &e.payload, reason: "undecodable" }).collect();
        for (i, reason) in &outcome.rejected {
            let (entry, a) = &decoded.ok[*i];
            tracing::error!(shard = ctx.shard, id = a.msg.id, from = a.msg.from, %reason, "save: row rejected for good; dead-lettered");
            dead.push(DeadLetter { payload: &entry.payload, reason });
            let error = ServerFrame::error(Reason::SaveFailed, Some(a.msg.client_msg_id.clone()));
            frames.push((
                Target::Node(a.origin.node),
                Push { user: a.msg.from, conn: Some(a.origin.conn), frame: error },
            ));
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        let commit = || async {
            let (pubs, _) = ctx.router.prepare(&frames, None).await?;
            ctx.mover.commit(&reader.key, &dead_stream, &ids, &dead, &pubs, &saved_keys).await
        };
        if ctx.until_done(&mut backoff, "save: receipts/commit", commit).await.is_none() {
            return;
        }
        metrics::counter!("im_worker_saved_total", "shard" => shard.clone()).increment(outcome.saved.len() as u64);
        metrics::counter!("im_worker_dead_letters_total", "shard" => shard.clone()).increment(dead.len() as u64);
        metrics::histogram!("im_worker_batch_size", "shard" => shard.clone(), "stage" => "save")
            .record(batch.len() as f64);
        for m in &msgs {
            saved_age.record(age_seconds(m.id));
        }
    }
}
