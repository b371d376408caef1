//! The save stage: read a batch from `to_save` (full mode: a few deliver batches, one entry each) or
//! `accepted` (accepted-only mode, which numbers the batch here) → one multi-row INSERT → after COMMIT, one fenced script
//! ([`crate::mover`]) that raises the seq counters, dead-letters rejected rows, marks the saved ones
//! in the idempotency window, publishes `ACK(saved)` (and `ERROR save_failed`) to the senders' nodes
//! and the pushes — all of them in accepted-only mode; in full mode again those whose recipient
//! connected since the deliver stage pushed them (SPEC §3.11) — and XACKs the batch.
//!
//! The stage is pipelined by one batch: once a batch's rows are committed, its Redis commit runs as
//! a task of its own while the stage reads and inserts the next batch. Commits stay in stream order
//! (each waits for the one before), so receipts and acknowledgements keep the order the rows were
//! committed in (SPEC §3.4); the INSERTs themselves stay one at a time per shard, so MySQL commits
//! in stream order too. A batch that is numbered here first waits for the previous commit, which
//! raises the counters it is numbered from.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::task::JoinHandle;

use im_common::backoff::Backoff;
use im_common::idempotency::{encode_state, Stage};
use im_common::ids::now_ms;
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{encode, Accepted, ChatMessage, Push};
use im_common::router::Target;
use im_common::store::SaveOutcome;

use crate::mover::DeadLetter;
use crate::save_health::SaveHealth;
use crate::sequences::SeqPlan;
use crate::stage::{age_seconds, chat_push, decode_accepted, decode_handed, recipients, Decoded, ShardContext};
use crate::streams::StreamReader;

/// Rows a full-mode save batch is made for: it takes as many deliver batches (`to_save` entries,
/// each up to `batch_size` messages) as make at most this many rows when they are full, and at
/// least one. Under load they are far from full (a deliver batch holds what arrived in a few ms).
const ROWS_PER_SAVE: usize = 4_000;

/// How many `to_save` entries one save batch reads.
pub fn handed_per_read(batch_size: usize) -> usize {
    (ROWS_PER_SAVE / batch_size.max(1)).max(1)
}

/// The save stage: reads `to_save` (full mode) or `accepted` (accepted-only mode, which also pushes
/// to recipients after the commit). Returns when the lease is lost.
pub async fn save_stage(ctx: ShardContext, reader: StreamReader, push_after_save: bool) {
    // The previous batch's commit while it runs (`false` once it gave up: the lease is lost).
    let mut committing: Option<JoinHandle<bool>> = None;
    save_batches(&ctx, reader, push_after_save, &mut committing).await;
    // The last batch's commit ends before the stage does: on shutdown the lease is held until then.
    committed(committing.take()).await;
}

async fn save_batches(
    ctx: &ShardContext,
    mut reader: StreamReader,
    push_after_save: bool,
    committing: &mut Option<JoinHandle<bool>>,
) {
    let mut backoff = Backoff::default();
    let mut health = SaveHealth::new(ctx.shard);
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = if push_after_save { decode_accepted(&batch) } else { decode_handed(&batch) };
        let mut accepted: Vec<Accepted> = decoded.ok.clone();
        // Accepted-only mode numbers here (full mode's deliver stage did). The rows are saved with
        // these seqs and the commit raises the counters to them; a batch that never gets that far
        // is numbered the same way again from the same counters.
        let mut plan = SeqPlan::default();
        if accepted.iter().any(|a| a.msg.seq == 0) {
            if !committed(committing.take()).await {
                return;
            }
            let number = || async {
                let mut numbered = accepted.clone();
                let (plan, _, _) = ctx.number(&mut numbered, false).await?;
                Ok::<_, String>((plan, numbered))
            };
            let Some((numbered_plan, numbered)) = ctx.until_done(&mut backoff, "save: number", number).await else {
                return;
            };
            (plan, accepted) = (numbered_plan, numbered);
        }
        let msgs: Vec<ChatMessage> = accepted.iter().map(|a| a.msg.clone()).collect();

        // Save, retrying while the database is away or refuses; the entries stay pending meanwhile.
        let Some(outcome) = insert_until_saved(ctx, &mut health, &mut backoff, &msgs).await else { return };

        let commit = Commit::of(ctx, &decoded, &accepted, &outcome, plan, push_after_save);
        let ids = batch.into_iter().map(|e| e.id).collect();
        if !committed(committing.take()).await {
            return;
        }
        *committing = Some(tokio::spawn(commit.run(ctx.clone(), reader.key.clone(), ids)));
    }
}

/// Waits for the previous batch's commit, if one runs; whether it was done (not given up).
async fn committed(commit: Option<JoinHandle<bool>>) -> bool {
    match commit {
        None => true,
        Some(task) => task.await.unwrap_or(false),
    }
}

/// What a batch whose rows are committed still owes, done in one fenced script: the senders'
/// answers, the pushes again, the idempotency marks, the dead letters and the acknowledgement.
struct Commit {
    /// `ACK(saved)` and `ERROR save_failed` to the senders' nodes.
    frames: Vec<(Target, Push)>,
    /// Saved messages as stored, and the presence epoch each was pushed at (full mode).
    saved: Vec<(ChatMessage, Option<u64>)>,
    /// Idempotency keys and their final states.
    settled: Vec<(String, String)>,
    /// Payloads for the dead-letter stream and why.
    dead: Vec<(Vec<u8>, String)>,
    plan: SeqPlan,
    push_after_save: bool,
    /// Messages the batch takes out of `to_save` (0 when it was read from `accepted`).
    leaving: usize,
    saved_count: usize,
    /// The batch's message ids (for the accepted → saved histogram).
    ages: Vec<u64>,
}

impl Commit {
    fn of(
        ctx: &ShardContext,
        decoded: &Decoded,
        accepted: &[Accepted],
        outcome: &SaveOutcome,
        plan: SeqPlan,
        push_after_save: bool,
    ) -> Commit {
        let mut frames = Vec::with_capacity(accepted.len() * 2);
        let mut settled = Vec::with_capacity(accepted.len());
        let mut saved = Vec::with_capacity(outcome.saved.len());
        for &(i, id, seq) in &outcome.saved {
            let a = &accepted[i];
            let to_sender = Push {
                user: a.msg.from,
                conn: Some(a.origin.conn),
                frame: ServerFrame::ack(AckType::Saved, &a.msg.client_msg_id, id),
            };
            frames.push((Target::Node(a.origin.node), to_sender));
            let pushed_at = if push_after_save { None } else { a.pushed_at_epoch };
            if push_after_save || pushed_at.is_some() {
                saved.push((ChatMessage { id, seq, ..a.msg.clone() }, pushed_at));
            }
            settled.push((
                ctx.keys.idempotency(ctx.shard, a.msg.from, &a.msg.client_msg_id),
                encode_state(Stage::Saved, id),
            ));
        }
        let mut dead: Vec<(Vec<u8>, String)> =
            decoded.bad.iter().map(|payload| (payload.clone(), "undecodable".to_owned())).collect();
        for (i, reason) in &outcome.rejected {
            // As it was read (accepted-only mode numbers its copy).
            let a = &decoded.ok[*i];
            tracing::error!(shard = ctx.shard, id = a.msg.id, from = a.msg.from, %reason, "save: row rejected for good; dead-lettered");
            dead.push((encode(a), reason.clone()));
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
        Commit {
            frames,
            saved,
            settled,
            dead,
            plan,
            push_after_save,
            leaving: decoded.handed_messages,
            saved_count: outcome.saved.len(),
            ages: accepted.iter().map(|a| a.msg.id).collect(),
        }
    }

    /// Runs the commit until it is done (`true`) or the lease is lost (`false`: the batch stays
    /// pending, and the next owner redoes it).
    async fn run(self, ctx: ShardContext, stream: String, ids: Vec<String>) -> bool {
        let dead_stream = ctx.keys.dead_letter_stream(ctx.shard);
        let dead: Vec<DeadLetter> = self.dead.iter().map(|(payload, reason)| DeadLetter { payload, reason }).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let commit = || async {
            // Routes and epochs are read after the rows are committed: a connection registered
            // before this read gets the push, one registered after it syncs from MySQL, which has
            // the rows. Full mode pushed before the save, so only recipients whose presence epoch
            // moved since (they connected in between) get the message again.
            let msgs: Vec<&ChatMessage> = self.saved.iter().map(|(m, _)| m).collect();
            let (routes, epochs, _) = ctx.router.locate(&recipients(&msgs), None).await?;
            let again: Vec<&ChatMessage> = if self.push_after_save {
                msgs
            } else {
                self.saved
                    .iter()
                    .filter(|(m, at)| at.is_some_and(|at| epochs.get(&m.to).is_some_and(|&now| now != at)))
                    .map(|(m, _)| m)
                    .collect()
            };
            let mut all = self.frames.clone();
            all.extend(again.iter().map(|m| chat_push(m)));
            let (pubs, _) = ctx.router.group(&all, &routes, None);
            ctx.mover
                .commit(&stream, &dead_stream, &ids, self.leaving, &dead, &pubs, &self.settled, &self.plan)
                .await?;
            Ok::<_, redis::RedisError>(if self.push_after_save { 0 } else { again.len() })
        };
        let Some(pushed_again) = ctx.until_done(&mut Backoff::default(), "save: receipts/commit", commit).await else {
            return false;
        };
        let shard = ctx.label();
        metrics::counter!("im_worker_repushed_total", "shard" => shard.clone()).increment(pushed_again as u64);
        metrics::counter!("im_worker_saved_total", "shard" => shard.clone()).increment(self.saved_count as u64);
        metrics::counter!("im_worker_dead_letters_total", "shard" => shard.clone()).increment(self.dead.len() as u64);
        metrics::histogram!("im_worker_batch_size", "shard" => shard.clone(), "stage" => "save")
            .record(self.ages.len() as f64);
        let saved_age = metrics::histogram!("im_worker_accepted_to_saved_seconds", "shard" => shard);
        for &id in &self.ages {
            saved_age.record(age_seconds(id));
        }
        true
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
