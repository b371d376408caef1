//! The recipient side's SQL (SPEC §3.10–3.11): sync pages by seq, per-conversation positions (the
//! `positions` table), the look-ups that turn ACKs and positions into seqs and ids, and the
//! conversation list.

use std::collections::HashMap;

use mysql_async::prelude::*;

use super::{numbers, to_message, Store, StoreError, MESSAGE_COLUMNS};
use crate::record::ChatMessage;

/// One entry of a user's conversation list (`GET /api/conversations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub peer: u64,
    /// The last saved message either way.
    pub last: Option<ChatMessage>,
    pub last_in_seq: u64,
    pub last_out_seq: u64,
    pub delivered: u64,
    pub read: u64,
    pub peer_delivered: u64,
    pub peer_read: u64,
}

/// A user's delivered and read positions in one peer's messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub delivered: u64,
    pub read: u64,
}

/// A stored position and the serverMsgIds of the messages at its seqs (`None`: not saved, or seq 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Receipt {
    pub at: Position,
    pub delivered_id: Option<u64>,
    pub read_id: Option<u64>,
}

impl Store {
    /// Saved messages from `from` to `to` with seq above `after_seq`, in seq order (one page of a sync).
    pub async fn messages_after(
        &self,
        from: u64,
        to: u64,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE from_user_id = ? AND to_user_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        );
        let rows = self.pool.get_conn().await?.exec(sql, (from, to, after_seq, limit)).await?;
        Ok(rows.into_iter().map(to_message).collect())
    }

    /// `user`'s conversations with saved messages beyond the delivered position: (peer, position).
    pub async fn behind(&self, user: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let sql = "SELECT c.peer_id, COALESCE(p.delivered_seq, 0) FROM conversations c \
                   JOIN conversations theirs ON theirs.owner_id = c.peer_id AND theirs.peer_id = c.owner_id \
                   LEFT JOIN positions p ON p.owner_id = c.owner_id AND p.peer_id = c.peer_id \
                   WHERE c.owner_id = ? AND theirs.last_out_seq > COALESCE(p.delivered_seq, 0)";
        Ok(self.pool.get_conn().await?.exec(sql, (user,)).await?)
    }

    /// The sender and seq of messages addressed to their user: `(to, id)` → `(from, seq)`, for the
    /// ones that are saved.
    pub async fn seqs_of(&self, messages: &[(u64, u64)]) -> Result<HashMap<(u64, u64), (u64, u64)>, StoreError> {
        if messages.is_empty() {
            return Ok(HashMap::new());
        }
        let ids = numbers(messages.iter().map(|&(_, id)| [id]));
        let sql = format!("SELECT to_user_id, id, from_user_id, seq FROM messages WHERE id IN ({ids})");
        let rows: Vec<(u64, u64, u64, u64)> = self.pool.get_conn().await?.query(sql).await?;
        Ok(rows.into_iter().map(|(to, id, from, seq)| ((to, id), (from, seq))).collect())
    }

    /// Moves `(owner, peer)` positions forward (never back; `read` moves `delivered` too), all in one
    /// statement.
    pub async fn advance_positions(&self, positions: &[((u64, u64), Position)]) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        // Rows locked in key order, as saves lock them.
        let mut positions = positions.to_vec();
        positions.sort_unstable_by_key(|&(key, _)| key);
        let rows = numbers(positions.iter().map(|&((owner, peer), p)| [owner, peer, p.delivered.max(p.read), p.read]));
        let sql = format!(
            "INSERT INTO positions (owner_id, peer_id, delivered_seq, read_seq) VALUES {rows} ON DUPLICATE KEY UPDATE \
             delivered_seq = GREATEST(delivered_seq, VALUES(delivered_seq), VALUES(read_seq)), \
             read_seq = GREATEST(read_seq, VALUES(read_seq))"
        );
        self.pool.get_conn().await?.query_drop(sql).await?;
        Ok(())
    }

    /// The stored positions of `(owner, peer)` pairs with the ids of the peer's messages at them
    /// (when saved), in one statement: what a `RECEIPT` says. Pairs without a row are left out.
    pub async fn receipts_of(&self, pairs: &[(u64, u64)]) -> Result<HashMap<(u64, u64), Receipt>, StoreError> {
        if pairs.is_empty() {
            return Ok(HashMap::new());
        }
        let keys = numbers(pairs.iter().map(|&(owner, peer)| [owner, peer]));
        let sql = format!(
            "SELECT p.owner_id, p.peer_id, p.delivered_seq, p.read_seq, d.id, r.id FROM positions p \
             LEFT JOIN messages d ON d.from_user_id = p.peer_id AND d.to_user_id = p.owner_id AND d.seq = p.delivered_seq \
             LEFT JOIN messages r ON r.from_user_id = p.peer_id AND r.to_user_id = p.owner_id AND r.seq = p.read_seq \
             WHERE (p.owner_id, p.peer_id) IN ({keys})"
        );
        type Row = (u64, u64, u64, u64, Option<u64>, Option<u64>);
        let rows: Vec<Row> = self.pool.get_conn().await?.query(sql).await?;
        Ok(rows
            .into_iter()
            .map(|(o, p, delivered, read, delivered_id, read_id)| {
                ((o, p), Receipt { at: Position { delivered, read }, delivered_id, read_id })
            })
            .collect())
    }

    /// `user`'s conversations with a saved message older than `before`, newest activity first.
    pub async fn conversations(&self, user: u64, before: u64, limit: u32) -> Result<Vec<Conversation>, StoreError> {
        // Each row's `last_msg_id` is its owner's last message out: the last either way is the
        // greater of the two rows'. The owner's rows are read by primary key and sorted.
        let sql = "SELECT c.peer_id, c.last_in_seq, c.last_out_seq, COALESCE(mine.delivered_seq, 0), \
                   COALESCE(mine.read_seq, 0), COALESCE(p.delivered_seq, 0), COALESCE(p.read_seq, 0), \
                   m.id, m.from_user_id, m.to_user_id, m.client_msg_id, m.msg_type, LEFT(m.content, 100), m.seq \
                   FROM (SELECT c.owner_id, c.peer_id, c.last_out_seq, COALESCE(theirs.last_out_seq, 0) AS last_in_seq, \
                                GREATEST(c.last_msg_id, COALESCE(theirs.last_msg_id, 0)) AS last_id \
                         FROM conversations c \
                         LEFT JOIN conversations theirs ON theirs.owner_id = c.peer_id AND theirs.peer_id = c.owner_id \
                         WHERE c.owner_id = ?) c \
                   LEFT JOIN positions mine ON mine.owner_id = c.owner_id AND mine.peer_id = c.peer_id \
                   LEFT JOIN positions p ON p.owner_id = c.peer_id AND p.peer_id = c.owner_id \
                   LEFT JOIN messages m ON m.id = c.last_id \
                   WHERE c.last_id > 0 AND c.last_id < ? \
                   ORDER BY c.last_id DESC LIMIT ?";
        let rows: Vec<mysql_async::Row> = self.pool.get_conn().await?.exec(sql, (user, before, limit)).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let get = |i: usize| row.get::<Option<u64>, _>(i).flatten().unwrap_or(0);
            let last = row.get::<Option<u64>, _>(7).flatten().map(|id| {
                to_message((
                    id,
                    get(8),
                    get(9),
                    row.get::<Option<Vec<u8>>, _>(10).flatten().unwrap_or_default(),
                    row.get::<Option<String>, _>(11).flatten().unwrap_or_default(),
                    row.get::<Option<String>, _>(12).flatten().unwrap_or_default(),
                    get(13),
                ))
            });
            out.push(Conversation {
                peer: get(0),
                last,
                last_in_seq: get(1),
                last_out_seq: get(2),
                delivered: get(3),
                read: get(4),
                peer_delivered: get(5),
                peer_read: get(6),
            });
        }
        Ok(out)
    }
}
