//! The idempotency window: `idempotency(shard, from, clientMsgId)` → how far the first attempt got.
//!
//! A message's (sender, clientMsgId) is claimed here before anything else happens to it, so a retry
//! gets the serverMsgId of the first attempt in whatever state it has reached. The gateway claims and
//! reads keys ([`IdempotencyWindow`]); the shard worker's commit script marks them saved. Both write
//! the value through [`encode_state`], the one definition of its format (`<stage>:<serverMsgId>`,
//! stage `p` pending, `a` accepted, `s` saved, `f` failed for good).

use crate::connections::RedisConn;

use crate::protocol::{AckType, Reason, ServerFrame};
use crate::seq_counters::{add_floors, SeqFloor};

/// How far an earlier attempt with the same clientMsgId got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Claimed by a baseline save that has not committed (or whose gateway died before committing).
    Pending,
    /// In the shard's accepted stream.
    Accepted,
    /// Committed in MySQL.
    Saved,
    /// Refused by the database for good (dead-lettered); a resend hears `save_failed` again.
    Failed,
}

/// The idempotency window: `idempotency(shard, from, clientMsgId)` → `<stage>:<serverMsgId>`.
#[derive(Clone)]
pub struct IdempotencyWindow {
    conn: RedisConn,
    ttl_secs: u64,
}

impl IdempotencyWindow {
    /// The window over `conn`, whose keys live `ttl_secs`.
    pub fn new(conn: RedisConn, ttl_secs: u64) -> Self {
        IdempotencyWindow { conn, ttl_secs }
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

    /// Records the final stage (saved or failed) of many keys, and raises the seq counters past the
    /// seqs the baseline path gave them (`seq_counters`), in one pipeline.
    pub async fn settle(&self, entries: &[(String, Stage, u64)], floors: &[SeqFloor]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for (key, stage, id) in entries {
            pipe.cmd("SET").arg(key).arg(encode_state(*stage, *id)).arg("EX").arg(self.ttl_secs).ignore();
        }
        add_floors(&mut pipe, floors);
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// How far the message under `key` got (`None`: no attempt in the window).
    pub async fn stage(&self, key: &str) -> redis::RedisResult<Option<(Stage, u64)>> {
        let state: Option<String> = redis::cmd("GET").arg(key).query_async(&mut self.conn.clone()).await?;
        Ok(state.as_deref().and_then(decode_state))
    }

    /// The answer to a message refused before it was claimed (shard full, overload, rate limit),
    /// from one GET: see [`refused_answer`].
    pub async fn answer_refused(&self, key: &str, client_msg_id: &str, reason: Reason) -> ServerFrame {
        refused_answer(self.stage(key).await.ok().flatten(), client_msg_id, reason)
    }
}

/// The answer to a message refused before it was claimed, given how far an earlier attempt under
/// its key got (`earlier`): if it was accepted, saved or failed, its receipt — `reason` promises that
/// nothing was accepted, which would be false for it; otherwise the error.
pub fn refused_answer(earlier: Option<(Stage, u64)>, client_msg_id: &str, reason: Reason) -> ServerFrame {
    match earlier {
        Some((stage, id)) if stage != Stage::Pending => stage.receipt(client_msg_id, id),
        _ => ServerFrame::error(reason, Some(client_msg_id.to_owned())),
    }
}

/// `p:<id>`, `a:<id>` or `s:<id>`.
pub fn encode_state(stage: Stage, id: u64) -> String {
    let tag = match stage {
        Stage::Pending => 'p',
        Stage::Accepted => 'a',
        Stage::Saved => 's',
        Stage::Failed => 'f',
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
        "f" => Stage::Failed,
        _ => return None,
    };
    Some((stage, id.parse().ok()?))
}

impl Stage {
    /// The receipt for a message at this stage, as the sender will see it.
    pub fn receipt(self, client_msg_id: &str, id: u64) -> ServerFrame {
        match self {
            Stage::Pending | Stage::Accepted => ServerFrame::ack(AckType::Accepted, client_msg_id, id),
            Stage::Saved => ServerFrame::ack(AckType::Saved, client_msg_id, id),
            Stage::Failed => ServerFrame::error(Reason::SaveFailed, Some(client_msg_id.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_round_trips_through_its_encoding() {
        for stage in [Stage::Pending, Stage::Accepted, Stage::Saved, Stage::Failed] {
            assert_eq!(decode_state(&encode_state(stage, 384063290302533632)), Some((stage, 384063290302533632)));
        }
    }

    #[test]
    fn unreadable_states_decode_to_none() {
        for bad in ["", "s", "x:1", "s:", "s:-1", "s:abc", "a:18446744073709551616"] {
            assert_eq!(decode_state(bad), None, "{bad:?}");
        }
    }
}
