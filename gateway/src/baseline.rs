//! The baseline path: a synchronous save, then `ACK(saved)`, then the push.
//!
//! Baseline mode sends every message this way, and two-phase modes fall back to it when Redis cannot
//! take an append (fail-open). Concurrent messages from all connections share multi-row INSERTs
//! (group commit): a few workers take turns draining one queue, so one batch commits while the next
//! fills. After COMMIT the saved keys are marked in the idempotency window and the batch goes to
//! [`Fanout`]. The save numbers its rows itself (seq per direction, in MySQL) and then raises the
//! shard's seq counters in Redis past them, with the marks. When Redis cannot be reached the claim is skipped and the UNIQUE key in MySQL is the
//! only dedupe; the save reports the id stored first, so a retry still gets the original id.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::fanout::Fanout;
use crate::outbox::Outbox;
use im_common::idempotency::{IdempotencyWindow, Stage};
use im_common::keys::Keys;
use im_common::protocol::{Reason, ServerFrame};
use im_common::record::{ChatMessage, Push};
use im_common::seq_counters::SeqFloor;
use im_common::store::Store;

/// Jobs the queue holds per worker and batch size before senders wait.
const QUEUED_BATCHES_PER_WORKER: usize = 4;

/// What became of one message handed to the baseline saver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveResult {
    /// Committed; the id MySQL holds for it.
    Saved(u64),
    /// The database refused the row for good.
    Rejected,
    /// The database was unavailable; the sender may retry.
    Failed,
    /// Fail-open only: the shard owner numbered this message from the stream first (its append
    /// did reach Redis); the stream saves it. The id is the message's own.
    Streamed(u64),
}

struct Job {
    msg: ChatMessage,
    idempotency_key: Option<String>,
    reply: oneshot::Sender<SaveResult>,
}

/// Group commit for the baseline path: concurrent messages from many connections share multi-row
/// INSERTs. A few workers take turns draining the queue, so one batch commits while the next fills.
#[derive(Clone)]
pub struct BaselineSaver {
    jobs: mpsc::Sender<Job>,
    /// The pushes of saved batches that wait for Redis.
    pub outbox: Arc<Outbox>,
    window: IdempotencyWindow,
}

/// What a baseline batch needs after its commit: the window to mark saved, the seq counters to
/// raise (`keys`, `shards`), and the fan-out.
pub struct AfterCommit {
    pub idempotency: IdempotencyWindow,
    pub fanout: Arc<Fanout>,
    pub keys: Keys,
    pub shards: u16,
    /// Two-phase modes, where every save here is a fail-open one: claim each message's path first
    /// (`Store::save_fail_open`), since its append may have reached the stream after all.
    pub claim_paths: bool,
}

impl BaselineSaver {
    /// Starts `workers` batch workers with batches of at most `batch_max`.
    pub fn start(store: Store, after: AfterCommit, workers: usize, batch_max: usize) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>(batch_max * workers * QUEUED_BATCHES_PER_WORKER);
        let rx = Arc::new(Mutex::new(rx));
        let (outbox, window) = (after.fanout.outbox.clone(), after.idempotency.clone());
        let after = Arc::new(after);
        // Batches publish their pushes one at a time, in the order they answered their senders: a
        // sender's next message is saved only after its previous one was answered, so its push
        // cannot overtake the previous one's (workers commit side by side; SPEC §3.4).
        let push_turn = Arc::new(Mutex::new(()));
        for _ in 0..workers.max(1) {
            let (rx, store, after, push_turn) = (rx.clone(), store.clone(), after.clone(), push_turn.clone());
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::with_capacity(batch_max);
                    {
                        let mut rx = rx.lock().await;
                        match rx.recv().await {
                            Some(job) => batch.push(job),
                            None => return,
                        }
                        while batch.len() < batch_max {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    save_batch(&store, &after, &push_turn, batch).await;
                }
            });
        }
        BaselineSaver { jobs, outbox, window }
    }

    /// Saves one message (waiting for its batch to commit).
    pub async fn save(&self, msg: ChatMessage, idempotency_key: Option<String>) -> SaveResult {
        let (reply, rx) = oneshot::channel();
        if self.jobs.send(Job { msg, idempotency_key, reply }).await.is_err() {
            return SaveResult::Failed;
        }
        rx.await.unwrap_or(SaveResult::Failed)
    }

    /// The baseline path for a message whose window may be reachable: claims `key` first, so a
    /// retry gets the first attempt's answer or is saved under its id; then saves.
    pub async fn claim_and_save(&self, key: String, mut msg: ChatMessage) -> Vec<ServerFrame> {
        match self.window.claim(&key, msg.id).await {
            Ok(None) => {}
            Ok(Some((stage @ (Stage::Saved | Stage::Failed), id))) => {
                return vec![stage.receipt(&msg.client_msg_id, id)]
            }
            // An earlier attempt is in a stream: the stream numbers and saves it. Saved here too it
            // would get a second seq.
            Ok(Some((Stage::Accepted, id))) => return vec![Stage::Accepted.receipt(&msg.client_msg_id, id)],
            // An earlier attempt was a baseline save that did not confirm: save it under its id. The
            // UNIQUE key dedupes the row.
            Ok(Some((_, id))) => msg.id = id,
            Err(e) => tracing::debug!(error = %e, "idempotency window unavailable; the unique key dedupes"),
        }
        self.save_and_answer(msg, Some(key)).await
    }

    /// Saves one message and returns the frame to answer with: `ACK(saved)` or the error.
    pub async fn save_and_answer(&self, msg: ChatMessage, idempotency_key: Option<String>) -> Vec<ServerFrame> {
        let cmid = msg.client_msg_id.clone();
        match self.save(msg, idempotency_key).await {
            SaveResult::Saved(id) => vec![Stage::Saved.receipt(&cmid, id)],
            // Its stream copy gets the final receipt to this connection, like any accepted message.
            SaveResult::Streamed(id) => vec![Stage::Accepted.receipt(&cmid, id)],
            failed => vec![save_error(failed, &cmid)],
        }
    }
}

async fn save_batch(store: &Store, after: &AfterCommit, push_turn: &Mutex<()>, batch: Vec<Job>) {
    let msgs: Vec<ChatMessage> = batch.iter().map(|j| j.msg.clone()).collect();
    metrics::histogram!("im_gateway_insert_batch_size").record(msgs.len() as f64);
    let started = std::time::Instant::now();
    let saved = if after.claim_paths { store.save_fail_open(&msgs).await } else { store.save_batch(&msgs).await };
    let outcome = match saved {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, rows = msgs.len(), "baseline save failed");
            for job in batch {
                let _ = job.reply.send(SaveResult::Failed);
            }
            return;
        }
    };
    metrics::histogram!("im_gateway_insert_seconds").record(started.elapsed().as_secs_f64());
    let mut results = vec![SaveResult::Rejected; batch.len()];
    for &i in &outcome.streamed {
        results[i] = SaveResult::Streamed(msgs[i].id);
    }
    let mut settled = Vec::new();
    for &(i, _) in &outcome.rejected {
        if let Some(key) = &batch[i].idempotency_key {
            settled.push((key.clone(), Stage::Failed, msgs[i].id));
        }
    }
    let mut pushes = Vec::new();
    let mut floors = Vec::new();
    for &(i, id, seq) in &outcome.saved {
        results[i] = SaveResult::Saved(id);
        if let Some(key) = &batch[i].idempotency_key {
            settled.push((key.clone(), Stage::Saved, id));
        }
        let m = &msgs[i];
        floors.push(SeqFloor::of(&after.keys, after.shards, m.from, m.to, seq));
        pushes.push(Push { user: m.to, conn: None, frame: ChatMessage { id, seq, ..m.clone() }.push_frame() });
    }
    if !settled.is_empty() || !floors.is_empty() {
        if let Err(e) = after.idempotency.settle(&settled, &floors).await {
            // Fail-open: a resend after Redis returns must find these ids, and the shard's owner
            // must number past these seqs; the outbox writes both first.
            tracing::debug!(error = %e, "idempotency window unavailable; marks deferred to the outbox");
            after.fanout.outbox.defer_marks(settled, floors);
        }
    }
    // The turn is taken before anyone is answered and held until the pushes are out.
    let _turn = push_turn.lock().await;
    for (job, result) in batch.into_iter().zip(results) {
        let _ = job.reply.send(result);
    }
    after.fanout.push(pushes).await;
}

/// The error frame for a save that did not commit.
pub fn save_error(result: SaveResult, client_msg_id: &str) -> ServerFrame {
    let reason = if result == SaveResult::Rejected { Reason::SaveFailed } else { Reason::InternalError };
    ServerFrame::error(reason, Some(client_msg_id.to_owned()))
}
