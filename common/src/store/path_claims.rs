//! Path claims (the `path_claims` table): which path numbers a message that may have taken both the
//! stream and a fail-open save (ARCHITECTURE "Fail-open").
//!
//! A gateway falls open only when it believed Redis away before the append; such an append still
//! may have reached Redis (the connection broke after it ran). It marks the entry
//! (`Accepted::path_claim`), and the one message then has two candidates for its seq: the shard
//! owner's counter and MySQL's `conversations.last_out_seq`. Both sides claim its serverMsgId here
//! first, in one store both can reach while Redis is away, and the first claim wins:
//!
//! - the fail-open save claims in the transaction that inserts the row, so a claim the owner sees
//!   always has its row beside it ([`claim_for_baseline`]);
//! - the owner claims before it numbers the entry, and takes the saved row's seq where the
//!   baseline path won ([`Store::claim_for_stream`]); the fail-open save of a message the owner
//!   claimed first answers `ACK(accepted)` instead, and the stream saves it.
//!
//! Both claim in ascending id order, so two claims of the same ids wait for each other and never
//! deadlock. A claim waits for an uncommitted one of the other side (the primary key's lock): it
//! is a real fence, not a check.

use std::collections::{HashMap, HashSet};

use mysql_async::prelude::*;
use mysql_async::Transaction;

use super::{numbers, Store, StoreError};

/// `path_claims.path` of a message the shard owner numbered from the stream.
const STREAM: u8 = 1;
/// `path_claims.path` of a message a fail-open save numbered in MySQL.
const BASELINE: u8 = 2;

impl Store {
    /// Claims `ids` for the stream (the shard owner, before it numbers them). Returns the seq of
    /// each message the baseline path claimed first: its row's seq, which its stream copy must
    /// carry too. Idempotent: a retry of the same batch finds its own claims.
    pub async fn claim_for_stream(&self, ids: &[u64]) -> Result<HashMap<u64, u64>, StoreError> {
        let ids = sorted(ids);
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut conn = self.pool.get_conn().await?;
        conn.query_drop(insert_sql(&ids, STREAM)).await?;
        let sql = format!(
            "SELECT c.id, m.seq FROM path_claims c JOIN messages m ON m.id = c.id WHERE c.path = {BASELINE} AND c.id IN ({})",
            numbers(ids.iter().map(|&id| [id]))
        );
        let found: Vec<(u64, u64)> = conn.query(sql).await?;
        Ok(found.into_iter().collect())
    }

    /// The fail-open saves whose seqs the shard counters in Redis may still lack: (claim id, from,
    /// to, seq) of every message the baseline path numbered whose claim is not yet
    /// [`Store::mark_raised`]. Each shard owner takes its own senders' (an index lookup that finds
    /// nothing outside Redis outages).
    pub async fn unraised_fail_open_saves(&self) -> Result<Vec<(u64, u64, u64, u64)>, StoreError> {
        let sql = format!(
            "SELECT c.id, m.from_user_id, m.to_user_id, m.seq FROM path_claims c JOIN messages m ON m.id = c.id \
             WHERE c.path = {BASELINE} AND c.raised = 0"
        );
        Ok(self.pool.get_conn().await?.query(sql).await?)
    }

    /// Marks the claims `ids` raised: their rows' seqs are in the shard counters.
    pub async fn mark_raised(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut conn = self.pool.get_conn().await?;
        for chunk in ids.chunks(1000) {
            let sql =
                format!("UPDATE path_claims SET raised = 1 WHERE id IN ({})", numbers(chunk.iter().map(|&id| [id])));
            conn.query_drop(sql).await?;
        }
        Ok(())
    }
}

/// Most claims deleted per statement when pruning (short locks, small undo).
const PRUNE_CHUNK: usize = 10_000;

impl Store {
    /// Deletes the claims of messages with an id below `before_id` (older than the time it
    /// encodes, [`crate::ids::min_id_at`]): a claim matters only until the stream copy of its message
    /// has been numbered. In chunks along the primary key; returns how many were deleted.
    pub async fn prune_path_claims(&self, before_id: u64) -> Result<u64, StoreError> {
        let mut conn = self.pool.get_conn().await?;
        let mut deleted = 0;
        loop {
            conn.exec_drop(
                format!("DELETE FROM path_claims WHERE id < ? ORDER BY id LIMIT {PRUNE_CHUNK}"),
                (before_id,),
            )
            .await?;
            let rows = conn.affected_rows();
            deleted += rows;
            if rows < PRUNE_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Claims `ids` for the baseline path inside the fail-open save's transaction. Returns the ids the
/// stream claimed first: those must not be saved here.
pub(super) async fn claim_for_baseline(tx: &mut Transaction<'_>, ids: &[u64]) -> Result<HashSet<u64>, StoreError> {
    let ids = sorted(ids);
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    tx.query_drop(insert_sql(&ids, BASELINE)).await?;
    // A plain read sees every claim committed before it: it is the transaction's first, so its
    // snapshot starts here, after the INSERT waited out any uncommitted claim of the stream. (A
    // locking read took shared locks on other transactions' claims too and deadlocked with them.)
    let sql =
        format!("SELECT id FROM path_claims WHERE path = {STREAM} AND id IN ({})", numbers(ids.iter().map(|&id| [id])));
    let taken: Vec<u64> = tx.query(sql).await?;
    Ok(taken.into_iter().collect())
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Claims of `ids` for `path` (a claim already there stays as it is).
fn insert_sql(ids: &[u64], path: u8) -> String {
    format!(
        "INSERT INTO path_claims (id, path) VALUES {} ON DUPLICATE KEY UPDATE id = id",
        numbers(ids.iter().map(|&id| [id, u64::from(path)]))
    )
}
