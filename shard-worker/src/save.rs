//! The save stage: read a batch from `to_save` (full mode) or `accepted` (accepted-only mode) → one
//! multi-row INSERT → after COMMIT, one fenced script ([`crate::mover`]) that dead-letters rejected
//! rows, marks the saved ones in the idempotency window, publishes `ACK(saved)` (and `ERROR
//! save_failed`) to the senders' nodes — and in accepted-only mode the pushes — and XACKs the batch.

use std::sync::atomic::Ordering;
use std::time::Instant;

use im_common::backoff::Backoff;
use im_common::idempotency::{encode_state, Stage};
use im_common::ids::now_ms;
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{ChatMessage, Push};
use im_common::router::Target;
use im_common::store::SaveOutcome;

use crate::mover::DeadLetter;
use crate::save_health::SaveHealth;
use crate::stage::{age_seconds, chat_push, decode_batch, ShardContext};
use crate::streams::StreamReader;

/// The save stage: reads `to_save` (full mode) or `accepted` (accepted-only mode, which also pushes
/// to recipients after the commit). Returns when the lease is lost.
pub async fn save_stage(ctx: ShardContext, mut reader: StreamReader, push_after_save: bool) {
    let dead_stream = ctx.keys.dead_letter_stream(ctx.shard);
    let shard = ctx.label();
    let saved_age = metrics::histogram!("im_worker_accepted_to_saved_seconds", "shard" => shard.clone());
    let mut backoff = Backoff::default();
    let mut health = SaveHealth::new(ctx.shard);
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = decode_batch(&batch);
        let msgs: Vec<ChatMessage> = decoded.ok.iter().map(|(_, a)| a.msg.clone()).collect();

        // Save, retrying while the database is away or refuses; the entries stay pending meanwhile.
        let Some(outcome) = insert_until_saved(&ctx, &mut health, &mut backoff, &msgs).await else { return };

        let mut frames = Vec::with_capacity(msgs.len() * 2);
        let mut settled = Vec::with_capacity(msgs.len());
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
            settled.push((
                ctx.keys.idempotency(ctx.shard, a.msg.from, &a.msg.client_msg_id),
                encode_state(Stage::Saved, id),
            ));
        }
        let mut dead: Vec<DeadLetter> =
            decoded.bad.iter().map(|e| DeadLetter { payload: &e.payload, reason: "undecodable" }).collect();
        for (i, reason) in &outcome.rejected {
            let (entry, a) = &decoded.ok[*i];
            tracing::error!(shard = ctx.shard, id = a.msg.id, from = a.msg.from, %reason, "save: row rejected for good; dead-lettered");
            dead.push(DeadLetter { payload: &entry.payload, reason });
            settled.push((
                ctx.keys.idempotency(ctx.shard, a.msg.from, &a.msg.client_msg_id),
                encode_state(Stage::Failed, a.msg.id),
            ));
            let error = ServerFrame::error(Reason::SaveFailed, Some(a.msg.client_msg_id.clone()));
            frames.push((
                Target::Node(a.origin.node),
                Push { user: a.msg.from, conn: Some(a.origin.conn), frame: error },
            ));
        }
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        let commit = || async {
            let (pubs, _) = ctx.router.prepare(&frames, None).await?;
            ctx.mover.commit(&reader.key, &dead_stream, &ids, &dead, &pubs, &settled).await
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

/// Inserts `msgs` until the database takes them, backing off between attempts; `None` if the lease
/// is lost first (the batch stays pending for the next owner). Failures are reported through
/// [`SaveHealth`] — a gauge, a counter by class, a log line per state change — not logged per retry.
async fn insert_until_saved(
    ctx: &ShardContext,
    health: &mut SaveHealth,
    backoff: &mut Backoff,
    msgs: &[ChatMessage],
) -> Option<SaveOutcome> {
    let shard = ctx.label();
    loop {
        let started = Instant::now();
        match ctx.store.save_batch(msgs).await {
            Ok(outcome) => {
                metrics::histogram!("im_worker_insert_seconds", "shard" => shard)
                    .record(started.elapsed().as_secs_f64());
                health.saved();
                backoff.reset();
                return Some(outcome);
            }
            Err(e) => {
                metrics::counter!("im_worker_save_retries_total", "shard" => shard.clone()).increment(1);
                health.failed(&e);
                // The stage is alive and retrying (what /readyz asks); the gauge says it is failing.
                ctx.progress.store(now_ms(), Ordering::Relaxed);
                if !ctx.lease.is_valid() {
                    return None;
                }
                health.wait(backoff.next_pause()).await;
            }
        }
    }
}
