//! All SQL lives here: migrations, the batched save (with seqs for the baseline path), history;
//! the recipient side's queries (sync pages, positions, the conversation list) in [`recipients`].
//!
//! The save is one multi-row `INSERT ... ON DUPLICATE KEY UPDATE id = id` per batch plus one
//! conversation upsert, in one transaction (when rows still need their seq, the conversation upsert
//! comes first, raising the counters, plus one read of them). A row the INSERT did not add is a duplicate only when a
//! stored row has exactly the same (from_user_id, client_msg_id) bytes — a retry of the same message —
//! and then counts as saved and reports the id already stored. Any other collision (the id already
//! belongs to another message, or a collation folded two clientMsgIds into one key) leaves the message
//! without a row, so it is rejected with the reason, never acknowledged (SPEC §3.9). `INSERT IGNORE`
//! is deliberately not used: it would also turn real rejections (a failed CHECK, bad data) into
//! warnings and lose rows silently. A batch that hits a permanent row error is split in halves until
//! the offending rows stand alone; those are returned as rejected (they go to the dead-letter stream),
//! the rest are saved.
//!
//! Telling inserts from duplicates relies on the affected-row count, so the pool always runs with
//! `CLIENT_FOUND_ROWS` off, whatever the URL says (with it on, a duplicate counts as affected).

use std::collections::{BTreeMap, HashMap, HashSet};

use mysql_async::prelude::*;
use mysql_async::{Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, Transaction, TxOpts, Value};

use crate::record::ChatMessage;

mod errors;
mod migrate;
mod path_claims;
mod recipients;
pub use errors::StoreError;
pub use migrate::{drop_database, migrate, MIGRATIONS};
pub use recipients::{Conversation, Position, Receipt};

/// A save that keeps being a deadlock's victim is redone at once this often before its caller hears.
const DEADLOCK_REDOS: usize = 3;

/// The result of saving one batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SaveOutcome {
    /// For each saved message (by index in the batch): the id and seq the database holds for it — its
    /// own, or those of the earlier row with the same sender and clientMsgId.
    pub saved: Vec<(usize, u64, u64)>,
    /// Messages the database refused for good, with the reason (by index in the batch).
    pub rejected: Vec<(usize, String)>,
    /// [`Store::save_fail_open`] only: messages the shard owner claimed first for the stream (by
    /// index in the batch). Not saved here: the stream saves them.
    pub streamed: Vec<usize>,
}

/// What the database holds for one row of an INSERT: the (id, seq) of the stored row with the same
/// sender and clientMsgId bytes, or why there is no row for this message.
type StoredRow = Result<(u64, u64), String>;

/// A pooled connection to the messages database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// Columns of a message row, in the order [`to_message`] reads them.
const MESSAGE_COLUMNS: &str = "id, from_user_id, to_user_id, client_msg_id, msg_type, content, seq";

/// How long a pooled connection beyond the first may stay idle before the pool closes it.
const IDLE_CONNECTION_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Store {
    /// A pool of at most `pool_max` connections to `url` (which names the database).
    pub fn connect(url: &str, pool_max: usize) -> Result<Store, StoreError> {
        let opts = Opts::from_url(url).map_err(|e| StoreError::Url(e.to_string()))?;
        let constraints = PoolConstraints::new(1, pool_max.max(1)).unwrap_or_default();
        let opts = OptsBuilder::from_opts(opts)
            // No COM_RESET_CONNECTION when a connection goes back to the pool: it is a round trip per
            // checkout and it drops the server's prepared statements, so every statement was prepared
            // again. Nothing here keeps session state; a transaction left open is rolled back by the pool.
            //
            // Idle connections live for IDLE_CONNECTION_TTL: with mysql_async's default of 0 the pool
            // keeps only `min` idle and closes every other connection on return, so each moment of
            // two overlapping queries opened a new one (TCP, authentication, setup queries, and a
            // reconnect over the Unix socket): about 18 a second at the seed tier.
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_reset_connection(false)
                    .with_inactive_connection_ttl(IDLE_CONNECTION_TTL),
            )
            .stmt_cache_size(128)
            // With found rows counted, a duplicate would look inserted (see the module doc).
            .client_found_rows(false);
        Ok(Store { pool: Pool::new(opts) })
    }

    /// Closes the pool's connections.
    pub async fn close(self) {
        let _ = self.pool.disconnect().await;
    }

    /// Saves a batch; see the module doc for duplicate and rejection handling.
    pub async fn save_batch(&self, batch: &[ChatMessage]) -> Result<SaveOutcome, StoreError> {
        self.save(batch, false).await
    }

    /// Saves a batch of fail-open messages (a gateway's baseline path while it believed Redis away):
    /// as [`Store::save_batch`], but each row first claims its message for the baseline path (see
    /// [`path_claims`]), and a message the stream claimed first is left out (`streamed`).
    pub async fn save_fail_open(&self, batch: &[ChatMessage]) -> Result<SaveOutcome, StoreError> {
        self.save(batch, true).await
    }

    async fn save(&self, batch: &[ChatMessage], claim: bool) -> Result<SaveOutcome, StoreError> {
        let mut outcome = SaveOutcome::default();
        let mut deadlocks = 0;
        // Ranges of the batch still to insert; a permanent error splits its range.
        let mut todo: Vec<std::ops::Range<usize>> = Vec::with_capacity(8);
        todo.push(0..batch.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            match self.insert_rows(&batch[range.clone()], claim).await {
                Ok((rows, streamed)) => {
                    for (i, row) in rows.into_iter().enumerate() {
                        match row {
                            _ if streamed.contains(&i) => outcome.streamed.push(range.start + i),
                            Ok((id, seq)) => outcome.saved.push((range.start + i, id, seq)),
                            Err(reason) => outcome.rejected.push((range.start + i, reason)),
                        }
                    }
                }
                Err(StoreError::Permanent(reason)) if range.len() == 1 => outcome.rejected.push((range.start, reason)),
                Err(StoreError::Permanent(_)) => {
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Err(e) if e.is_deadlock() && deadlocks < DEADLOCK_REDOS => {
                    deadlocks += 1;
                    metrics::counter!("im_store_deadlock_redos_total").increment(1);
                    todo.push(range);
                }
                Err(e) => return Err(e),
            }
        }
        outcome.saved.sort_unstable();
        outcome.rejected.sort_unstable_by_key(|&(i, _)| i);
        outcome.streamed.sort_unstable();
        Ok(outcome)
    }

    /// One transaction: seqs for the rows that have none, the rows, then the conversations they
    /// touch. Returns, per row, the stored (id, seq) or why the message has no row.
    ///
    /// Rows without a seq (the baseline path) take the next seqs of their direction from
    /// `conversations.last_out_seq`, raised in the same transaction, so a rolled-back save consumes
    /// none. If the INSERT then meets rows already stored (a retry of a saved message), the
    /// transaction is rolled back and redone without them: a seq is never spent on a row that does
    /// not get it.
    ///
    /// With `claim`, the rows first claim their messages for the baseline path; those the stream
    /// claimed first are left out and returned as the second value (by index).
    async fn insert_rows(
        &self,
        rows: &[ChatMessage],
        claim: bool,
    ) -> Result<(Vec<StoredRow>, HashSet<usize>), StoreError> {
        let mut conn = self.pool.get_conn().await?;
        // Rows found already stored by an earlier round of this loop, by index.
        let mut known: HashMap<usize, StoredRow> = HashMap::new();
        // Rows whose message the stream claimed first (a claim is final).
        let mut streamed: HashSet<usize> = HashSet::new();
        loop {
            let mut tx = conn.start_transaction(TxOpts::default()).await?;
            let mut fresh: Vec<(usize, ChatMessage)> = rows
                .iter()
                .enumerate()
                .filter(|(i, _)| !known.contains_key(i) && !streamed.contains(i))
                .map(|(i, m)| (i, m.clone()))
                .collect();
            if claim && !fresh.is_empty() {
                let ids: Vec<u64> = fresh.iter().map(|(_, m)| m.id).collect();
                let taken = path_claims::claim_for_baseline(&mut tx, &ids).await?;
                fresh.retain(|(i, m)| !(taken.contains(&m.id) && streamed.insert(*i)));
            }
            // Rows numbered here (the baseline path) had their conversations moved by the numbering.
            let numbered: Vec<bool> = fresh.iter().map(|(_, m)| m.seq == 0).collect();
            let numbered_here = numbered.contains(&true);
            if numbered_here {
                assign_seqs(&mut tx, fresh.iter_mut().filter(|(_, m)| m.seq == 0).map(|(_, m)| m)).await?;
            }
            let inserted =
                if fresh.is_empty() { 0 } else { insert_messages(&mut tx, fresh.iter().map(|(_, m)| m)).await? };
            let stored: Vec<StoredRow> = if inserted == fresh.len() {
                fresh.iter().map(|(_, m)| Ok((m.id, m.seq))).collect()
            } else {
                let msgs: Vec<&ChatMessage> = fresh.iter().map(|(_, m)| m).collect();
                let stored = stored_rows(&mut tx, &msgs).await?;
                if numbered_here {
                    // Seqs were spent on rows that are not new: redo without them.
                    tx.rollback().await?;
                    for ((i, m), row) in fresh.iter().zip(stored) {
                        // A row this INSERT added holds the seq just given; any other answer is final.
                        if row != Ok((m.id, m.seq)) {
                            known.insert(*i, row);
                        }
                    }
                    continue;
                }
                stored
            };
            let untouched =
                fresh.iter().zip(&stored).zip(&numbered).filter(|(_, &n)| !n).map(|(((_, m), row), _)| (m, row));
            touch_conversations(&mut tx, untouched).await?;
            for ((i, _), row) in fresh.iter().zip(stored) {
                known.insert(*i, row);
            }
            let all: Vec<StoredRow> = (0..rows.len()).map(|i| known.remove(&i).unwrap_or(Err(String::new()))).collect();
            tx.commit().await?;
            return Ok((all, streamed));
        }
    }

    /// Saved messages between `user` and `peer` with id below `before`, newest first.
    pub async fn history(&self, user: u64, peer: u64, before: u64, limit: u32) -> Result<Vec<ChatMessage>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE user_lo = ? AND user_hi = ? AND id < ? ORDER BY id DESC LIMIT ?"
        );
        let rows = self.pool.get_conn().await?.exec(sql, (user.min(peer), user.max(peer), before, limit)).await?;
        Ok(rows.into_iter().map(to_message).collect())
    }

    /// The last saved seq of every direction whose sender `keep` accepts (the floor the shard's seq
    /// counters are restored from).
    pub async fn last_out_seqs(&self, keep: impl Fn(u64) -> bool) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let rows: Vec<(u64, u64, u64)> = self
            .pool
            .get_conn()
            .await?
            .query("SELECT owner_id, peer_id, last_out_seq FROM conversations WHERE last_out_seq > 0")
            .await?;
        Ok(rows.into_iter().filter(|&(from, _, _)| keep(from)).collect())
    }

    /// Whether the database answers `SELECT 1` within 2 s.
    pub async fn ping(&self) -> bool {
        let probe = async { self.pool.get_conn().await?.query_drop("SELECT 1").await };
        matches!(tokio::time::timeout(std::time::Duration::from_secs(2), probe).await, Ok(Ok(())))
    }

    /// Runs a query that returns nothing (for tests and tools).
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.pool.get_conn().await?.query_drop(sql).await?)
    }

    /// Runs a query returning one unsigned integer (for tests and tools).
    pub async fn query_u64(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(self.pool.get_conn().await?.query_first(sql).await?.unwrap_or(0))
    }

    /// `(from, id)` of every row, ordered by id (for checkers: order and duplicate verdicts).
    pub async fn all_ids(&self) -> Result<Vec<(u64, u64, String)>, StoreError> {
        let rows: Vec<(u64, u64, Vec<u8>)> = self
            .pool
            .get_conn()
            .await?
            .query("SELECT from_user_id, id, client_msg_id FROM messages ORDER BY id")
            .await?;
        Ok(rows.into_iter().map(|(from, id, cmid)| (from, id, String::from_utf8_lossy(&cmid).into_owned())).collect())
    }
}

/// Gives every row without a seq the next seqs of its direction, in row order, by raising
/// `conversations.last_out_seq` (locking those rows until the transaction ends). The same upsert
/// moves the senders' `last_msg_id` and creates the recipients' rows, so a batch numbered here
/// needs no [`touch_conversations`]: its transaction is the counter upsert, one read of the new
/// tops, and the INSERT (rolled back if the INSERT meets rows already stored).
///
/// The upsert locks the reverse rows too, in key order, so two saves of a conversation's two
/// directions cannot deadlock.
async fn assign_seqs<'a>(
    tx: &mut Transaction<'_>,
    rows: impl Iterator<Item = &'a mut ChatMessage>,
) -> Result<(), StoreError> {
    let rows: Vec<&mut ChatMessage> = rows.collect();
    // (owner, peer) → (messages to number, last id either way)
    let mut counts: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    for m in &rows {
        let out = counts.entry((m.from, m.to)).or_default();
        *out = (out.0 + 1, out.1.max(m.id));
        counts.entry((m.to, m.from)).or_default();
    }
    let sql = format!(
        "INSERT INTO conversations (owner_id, peer_id, last_out_seq, last_msg_id) VALUES {} \
         ON DUPLICATE KEY UPDATE last_out_seq = last_out_seq + VALUES(last_out_seq), \
         last_msg_id = GREATEST(last_msg_id, VALUES(last_msg_id))",
        numbers(counts.iter().map(|(&(f, t), &(n, id))| [f, t, n, id]))
    );
    tx.query_drop(sql).await?;
    counts.retain(|_, (n, _)| *n > 0);
    let sql = format!(
        "SELECT owner_id, peer_id, last_out_seq FROM conversations WHERE (owner_id, peer_id) IN ({})",
        numbers(counts.keys().map(|&(f, t)| [f, t]))
    );
    let tops: Vec<(u64, u64, u64)> = tx.query(sql).await?;
    let mut next: HashMap<(u64, u64), u64> =
        tops.into_iter().map(|(f, t, top)| ((f, t), top + 1 - counts.get(&(f, t)).map_or(0, |&(n, _)| n))).collect();
    for m in rows {
        let n = next.entry((m.from, m.to)).or_insert(1);
        m.seq = *n;
        *n += 1;
    }
    Ok(())
}

/// One multi-row INSERT; returns how many rows it added.
async fn insert_messages<'a>(
    tx: &mut Transaction<'_>,
    rows: impl ExactSizeIterator<Item = &'a ChatMessage>,
) -> Result<usize, StoreError> {
    let sql = format!(
        "INSERT INTO messages (id, from_user_id, to_user_id, seq, client_msg_id, msg_type, content) VALUES {} \
         ON DUPLICATE KEY UPDATE id = id",
        placeholders(rows.len(), 7)
    );
    let mut params = Vec::with_capacity(rows.len() * 7);
    for m in rows {
        params.extend([
            Value::from(m.id),
            Value::from(m.from),
            Value::from(m.to),
            Value::from(m.seq),
            Value::from(m.client_msg_id.as_str()),
            Value::from(m.msg_type.as_str()),
            Value::from(m.body.as_str()),
        ]);
    }
    tx.exec_drop(sql, Params::Positional(params)).await?;
    // `id = id` changes nothing, so a row that was already there counts 0 (found rows are off).
    Ok(tx.affected_rows() as usize)
}

/// Both participants' conversation rows, one per pair per batch, in key order so concurrent
/// batches lock them in the same order. The sender's row gets its last message out and last seq out
/// (the peer's row's `last_out_seq` is the owner's last seq in, its `last_msg_id` the owner's last
/// message in); the recipient's row is created if missing and otherwise left as it is (its values
/// here are 0, which the `GREATEST`s keep), so MariaDB writes nothing for it.
async fn touch_conversations<'a>(
    tx: &mut Transaction<'_>,
    rows: impl Iterator<Item = (&'a ChatMessage, &'a StoredRow)>,
) -> Result<(), StoreError> {
    // (owner, peer) → (last id out, last seq out)
    let mut latest: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
    for (m, stored) in rows {
        let Ok((id, seq)) = *stored else { continue };
        let out = latest.entry((m.from, m.to)).or_default();
        *out = (out.0.max(id), out.1.max(seq));
        latest.entry((m.to, m.from)).or_default();
    }
    if latest.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO conversations (owner_id, peer_id, last_msg_id, last_out_seq) VALUES {} \
         ON DUPLICATE KEY UPDATE last_msg_id = GREATEST(last_msg_id, VALUES(last_msg_id)), \
         last_out_seq = GREATEST(last_out_seq, VALUES(last_out_seq))",
        numbers(latest.iter().map(|(&(owner, peer), &(id, out))| [owner, peer, id, out]))
    );
    tx.query_drop(sql).await?;
    Ok(())
}

/// After an INSERT that did not add every row: what the database holds for each row. A stored row
/// with exactly the same (from_user_id, client_msg_id) bytes is this message (a retry): its id and
/// seq. No such row means the collision was with another message — its id or its seq is taken, or a
/// collation folded two clientMsgIds into one key — and this message has no row: the reason says
/// which.
async fn stored_rows(tx: &mut Transaction<'_>, rows: &[&ChatMessage]) -> Result<Vec<StoredRow>, StoreError> {
    let sql = format!(
        "SELECT from_user_id, client_msg_id, id, seq FROM messages WHERE (from_user_id, client_msg_id) IN ({})",
        vec!["(?,?)"; rows.len()].join(",")
    );
    let params: Vec<Value> =
        rows.iter().flat_map(|m| [Value::from(m.from), Value::from(m.client_msg_id.as_str())]).collect();
    let found: Vec<(u64, Vec<u8>, u64, u64)> = tx.exec(sql, Params::Positional(params)).await?;
    // Compared here byte for byte too: the SQL comparison is only as exact as the column's collation.
    let by_key: HashMap<(u64, &[u8]), (u64, u64)> =
        found.iter().map(|(from, cmid, id, seq)| ((*from, cmid.as_slice()), (*id, *seq))).collect();
    let stored: Vec<Option<(u64, u64)>> =
        rows.iter().map(|m| by_key.get(&(m.from, m.client_msg_id.as_bytes())).copied()).collect();
    let homeless: Vec<&ChatMessage> = rows.iter().zip(&stored).filter(|(_, s)| s.is_none()).map(|(m, _)| *m).collect();
    let mut holders: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    if !homeless.is_empty() {
        let sql = format!(
            "SELECT id, from_user_id, client_msg_id FROM messages WHERE id IN ({})",
            numbers(homeless.iter().map(|m| [m.id]))
        );
        let found: Vec<(u64, u64, Vec<u8>)> = tx.query(sql).await?;
        holders.extend(found.into_iter().map(|(id, from, cmid)| (id, (from, cmid))));
    }
    Ok(rows
        .iter()
        .zip(stored)
        .map(|(m, stored)| {
            stored.ok_or_else(|| match holders.get(&m.id) {
                Some((from, cmid)) => format!(
                    "serverMsgId {} is already stored for another message (from {from}, clientMsgId {:?}); \
                     this one (from {}, clientMsgId {:?}) was not saved",
                    m.id,
                    String::from_utf8_lossy(cmid),
                    m.from,
                    m.client_msg_id
                ),
                None => format!(
                    "the database holds another message under this one's key: seq {} of {} → {} is taken, or a \
                     collation folded clientMsgId {:?} into another's; serverMsgId {} was not saved",
                    m.seq, m.from, m.to, m.client_msg_id, m.id
                ),
            })
        })
        .collect())
}

type MessageRow = (u64, u64, u64, Vec<u8>, String, String, u64);

/// A `messages` row ([`MESSAGE_COLUMNS`]) as a message. clientMsgId is stored as bytes; the gateway
/// only ever writes UTF-8.
fn to_message((id, from, to, client_msg_id, msg_type, body, seq): MessageRow) -> ChatMessage {
    ChatMessage {
        id,
        from,
        to,
        client_msg_id: String::from_utf8_lossy(&client_msg_id).into_owned(),
        msg_type,
        body,
        seq,
    }
}

/// Rows of integers written out as SQL: `(1,2),(3,4)` (a single column: `1,2,3`). Statements whose
/// values are all integers go as text, not prepared: a prepared statement per batch size would sit
/// in every pooled connection's statement cache (and on the server) for each size ever seen.
fn numbers<const N: usize>(rows: impl Iterator<Item = [u64; N]>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, row) in rows.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if N > 1 {
            out.push('(');
        }
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "{v}");
        }
        if N > 1 {
            out.push(')');
        }
    }
    out
}

/// `(?,?,?),(?,?,?)` for `rows` rows of `cols` columns.
fn placeholders(rows: usize, cols: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(","));
    vec![row; rows].join(",")
}
