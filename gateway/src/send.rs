//! The send path: what happens between a validated `SINGLE_CHAT` and its receipts.
//!
//! Every message first claims its (sender, clientMsgId) in the idempotency window in Redis, so a retry
//! gets the id of the first attempt in whatever state it has reached. Then, by mode:
//! - **baseline**: the message joins the next group-commit batch of [`BaselineSaver`]; `ACK(saved)`
//!   comes after COMMIT, and the batch is pushed to recipients after that.
//! - **two-phase** (accepted-only, full): see [`crate::append`]; `ACK(accepted)` right after the
//!   stream append, `ACK(saved)` later from the shard worker.
//!
//! When Redis cannot be reached, the claim is skipped and the UNIQUE key in MySQL is the only dedupe;
//! the save reports the id stored first, so a retry still gets the original id.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::sessions::Sessions;
use im_common::bus::{Router, Target};
use im_common::protocol::{AckType, Reason, ServerFrame};
use im_common::record::{ChatMessage, Push};
use im_common::store::Store;

/// How far an earlier attempt with the same clientMsgId got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Claimed by a baseline save that has not committed (or whose gateway died before committing).
    Pending,
    /// In the shard's accepted stream.
    Accepted,
    /// Committed in MySQL.
    Saved,
}

/// The idempotency window: `idempotency(shard, from, clientMsgId)` → `<stage>:<serverMsgId>`.
#[derive(Clone)]
pub struct Idempotency {
    conn: ConnectionManager,
    ttl_secs: u64,
}

impl Idempotency {
    pub fn new(conn: ConnectionManager, ttl_secs: u64) -> Self {
        Idempotency { conn, ttl_secs }
    }

    /// Claims `key` for `id` (stage pending) unless an earlier attempt holds it; then returns that
    /// attempt's stage and id. One round trip (`SET NX GET`).
    pub async fn claim(&self, key: &str, id: u64) -> redis::RedisResult<Option<(Stage, u64)>> {
        let prev: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(encode_state(Stage::Pending, id))
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(self.ttl_secs)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(prev.as_deref().and_then(decode_state))
    }

    /// The recorded stage of many keys, in one pipeline (`None` for missing or unreadable ones).
    pub async fn stages(&self, keys: &[String]) -> redis::RedisResult<Vec<Option<(Stage, u64)>>> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.get(key);
        }
        let values: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(values.iter().map(|v| v.as_deref().and_then(decode_state)).collect())
    }

    /// Marks many keys saved, in one pipeline.
    pub async fn mark_saved(&self, entries: &[(String, u64)]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for (key, id) in entries {
            pipe.cmd("SET").arg(key).arg(encode_state(Stage::Saved, *id)).arg("EX").arg(self.ttl_secs).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }
}

/// `p:<id>`, `a:<id>` or `s:<id>`.
pub fn encode_state(stage: Stage, id: u64) -> String {
    let tag = match stage {
        Stage::Pending => 'p',
        Stage::Accepted => 'a',
        Stage::Saved => 's',
    };
    format!("{tag}:{id}")
}

/// Parses [`encode_state`]'s output.
pub fn decode_state(s: &str) -> Option<(Stage, u64)> {
    let (tag, id) = s.split_once(':')?;
    let stage = match tag {
        "p" => Stage::Pending,
        "a" => Stage::Accepted,
        "s" => Stage::Saved,
        _ => return None,
    };
    Some((stage, id.parse().ok()?))
}

/// The answer to a message, as the sender will see it.
pub fn receipt(stage: Stage, client_msg_id: &str, id: u64) -> ServerFrame {
    let ack = if stage == Stage::Saved { AckType::Saved } else { AckType::Accepted };
    ServerFrame::ack(ack, client_msg_id, id)
}

/// What became of one message handed to the baseline saver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveResult {
    /// Committed; the id MySQL holds for it.
    Saved(u64),
    /// The database refused the row for good.
    Rejected,
    /// The database was unavailable; the sender may retry.
    Failed,
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
}

/// What a baseline batch needs after its commit.
pub struct AfterCommit {
    pub idempotency: Idempotency,
    pub router: Router,
    pub outbox: Arc<Outbox>,
    pub sessions: Arc<Sessions>,
    pub node: u16,
}

impl BaselineSaver {
    /// Starts `workers` batch workers with batches of at most `batch_max`.
    pub fn start(store: Store, after: AfterCommit, workers: usize, batch_max: usize) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>(batch_max * workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let outbox = after.outbox.clone();
        let after = Arc::new(after);
        for _ in 0..workers.max(1) {
            let (rx, store, after) = (rx.clone(), store.clone(), after.clone());
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
                    save_batch(&store, &after, batch).await;
                }
            });
        }
        BaselineSaver { jobs, outbox }
    }

    /// Saves one message (waiting for its batch to commit).
    pub async fn save(&self, msg: ChatMessage, idempotency_key: Option<String>) -> SaveResult {
        let (reply, rx) = oneshot::channel();
        if self.jobs.send(Job { msg, idempotency_key, reply }).await.is_err() {
            return SaveResult::Failed;
        }
        rx.await.unwrap_or(SaveResult::Failed)
    }

    /// Saves one message and returns the frame to answer with: `ACK(saved)` or the error.
    pub async fn save_and_answer(&self, msg: ChatMessage, idempotency_key: Option<String>) -> Vec<ServerFrame> {
        let cmid = msg.client_msg_id.clone();
        match self.save(msg, idempotency_key).await {
            SaveResult::Saved(id) => vec![receipt(Stage::Saved, &cmid, id)],
            failed => vec![save_error(failed, &cmid)],
        }
    }
}

async fn save_batch(store: &Store, after: &AfterCommit, batch: Vec<Job>) {
    let msgs: Vec<ChatMessage> = batch.iter().map(|j| j.msg.clone()).collect();
    metrics::histogram!("im_gateway_insert_batch_size").record(msgs.len() as f64);
    let started = std::time::Instant::now();
    let outcome = match store.save_batch(&msgs).await {
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
    let mut saved_keys = Vec::new();
    let mut pushes = Vec::new();
    for &(i, id) in &outcome.saved {
        results[i] = SaveResult::Saved(id);
        if let Some(key) = &batch[i].idempotency_key {
            saved_keys.push((key.clone(), id));
        }
        pushes.push(Push {
            user: msgs[i].to,
            conn: None,
            frame: ServerFrame::chat(&ChatMessage { id, ..msgs[i].clone() }),
        });
    }
    if !saved_keys.is_empty() {
        if let Err(e) = after.idempotency.mark_saved(&saved_keys).await {
            tracing::debug!(error = %e, "could not mark saved in the idempotency window");
        }
    }
    for (job, result) in batch.into_iter().zip(results) {
        let _ = job.reply.send(result);
    }
    push(after, pushes).await;
}

/// Pushes frames to their users: to local connections directly, to other gateways by one PUBLISH
/// per node; what cannot be published waits in the [`Outbox`].
pub async fn push(after: &AfterCommit, pushes: Vec<Push>) {
    let mut remote = Vec::with_capacity(pushes.len());
    for p in pushes {
        after.sessions.deliver(&p);
        remote.push((Target::Routed, p));
    }
    if !after.outbox.is_empty() {
        // Behind what is already waiting, so a sender's pushes keep their order.
        after.outbox.enqueue(remote);
        return;
    }
    match after.router.send(&remote, Some(after.node)).await {
        Ok(stats) => metrics::counter!("im_gateway_pubsub_messages_out_total").increment(stats.publishes as u64),
        Err(e) => {
            tracing::warn!(error = %e, "push publish failed; queued until Redis answers");
            after.outbox.enqueue(remote);
        }
    }
}

/// Most pushes the outbox holds; beyond that the oldest are dropped (their rows are saved, and
/// offline resend delivers them on reconnect).
const OUTBOX_MAX_PUSHES: usize = 100_000;

/// Remote pushes of saved messages that could not be published (Redis unreachable), oldest first.
/// [`Outbox::republish`] sends them in order once Redis answers. While anything waits here, new
/// remote pushes queue behind it and the appender keeps messages on the baseline path, so nothing
/// a sender sends later can overtake a waiting push.
#[derive(Default)]
pub struct Outbox {
    queue: std::sync::Mutex<VecDeque<Vec<(Target, Push)>>>,
    /// Pushes queued or being republished.
    pushes: AtomicUsize,
}

impl Outbox {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pushes.load(Ordering::Acquire) == 0
    }

    fn enqueue(&self, batch: Vec<(Target, Push)>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.pushes.fetch_add(batch.len(), Ordering::AcqRel);
        queue.push_back(batch);
        self.trim(&mut queue);
    }

    fn trim(&self, queue: &mut VecDeque<Vec<(Target, Push)>>) {
        while self.pushes.load(Ordering::Acquire) > OUTBOX_MAX_PUSHES {
            let Some(oldest) = queue.pop_front() else { break };
            self.pushes.fetch_sub(oldest.len(), Ordering::AcqRel);
            metrics::counter!("im_gateway_pushes_dropped_total").increment(oldest.len() as u64);
        }
        metrics::gauge!("im_gateway_outbox_pushes").set(self.pushes.load(Ordering::Acquire) as f64);
    }

    /// Republishes waiting pushes, oldest first, until the process ends.
    pub async fn republish(self: Arc<Self>, router: Router, node: u16) {
        loop {
            let next = self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            let Some(batch) = next else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match router.send(&batch, Some(node)).await {
                Ok(stats) => {
                    metrics::counter!("im_gateway_pubsub_messages_out_total").increment(stats.publishes as u64);
                    self.pushes.fetch_sub(batch.len(), Ordering::AcqRel);
                    metrics::gauge!("im_gateway_outbox_pushes").set(self.pushes.load(Ordering::Acquire) as f64);
                }
                Err(_) => {
                    {
                        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                        queue.push_front(batch);
                        self.trim(&mut queue);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// The error frame for a save that did not commit.
pub fn save_error(result: SaveResult, client_msg_id: &str) -> ServerFrame {
    let reason = if result == SaveResult::Rejected { Reason::SaveFailed } else { Reason::InternalError };
    ServerFrame::error(reason, Some(client_msg_id.to_owned()))
}
