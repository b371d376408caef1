//! Gap-free sequences (SPEC §3.10): the owner of a shard numbers its senders' messages per direction,
//! in stream order, from counters in Redis (`Keys::seq_counters`, one hash per shard).
//!
//! A batch reads the counters of its directions (one `HMGET`, in a round trip the stage makes anyway
//! where it can), numbers its messages, and the fenced script that hands the batch on writes the new
//! tops — the deliver stage only if the counters still hold what it read (a compare-and-set: the
//! baseline path may have raised a floor meanwhile), the save stage by raising them (its rows are
//! already committed with those seqs). A batch whose script did not run consumed nothing, so a
//! crash or a takeover at any point re-numbers the same entries the same way: no gap, no reuse.
//!
//! Counters Redis has lost (the hash lacks its [`SEQ_RESTORED`] field) are restored from MySQL
//! before use: `conversations.last_out_seq` is the last saved seq of each direction.

use std::collections::HashMap;

use im_common::connections::RedisConn;

use im_common::keys::{seq_field, Keys, SEQ_RESTORED};
use im_common::record::ChatMessage;
use im_common::shard::shard_of;
use im_common::store::Store;

/// How one batch moves the counters: per direction, the value it was numbered from and the new top.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqPlan {
    pub fields: Vec<String>,
    pub bases: Vec<u64>,
    pub tops: Vec<u64>,
}

/// The `HMGET` that reads the counters of `msgs`' directions (and the restored marker, last).
pub fn read_counters(keys: &Keys, shard: u16, msgs: &[&ChatMessage]) -> (redis::Cmd, Vec<String>) {
    let mut fields: Vec<String> = msgs.iter().filter(|m| m.seq == 0).map(|m| seq_field(m.from, m.to)).collect();
    fields.sort_unstable();
    fields.dedup();
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(keys.seq_counters(shard)).arg(&fields).arg(SEQ_RESTORED);
    (cmd, fields)
}

/// What an `HMGET` from [`read_counters`] found: the counters, or `None` when the hash lost its
/// marker (restore first).
pub fn parse_counters(fields: Vec<String>, reply: redis::Value) -> redis::RedisResult<Option<HashMap<String, u64>>> {
    let values: Vec<Option<u64>> = redis::from_redis_value(reply)?;
    if values.last().copied().flatten().is_none() {
        return Ok(None);
    }
    Ok(Some(fields.into_iter().zip(values).map(|(f, v)| (f, v.unwrap_or(0))).collect()))
}

/// Numbers every message without a seq, in order, from `counters`; returns the plan to commit.
pub fn number(counters: &HashMap<String, u64>, msgs: &mut [&mut ChatMessage]) -> SeqPlan {
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut plan = SeqPlan::default();
    for m in msgs.iter_mut().filter(|m| m.seq == 0) {
        let field = seq_field(m.from, m.to);
        let top = next.entry(field).or_insert_with_key(|f| counters.get(f).copied().unwrap_or(0));
        *top += 1;
        m.seq = *top;
    }
    let mut fields: Vec<(String, u64)> = next.into_iter().collect();
    fields.sort_unstable();
    for (field, top) in fields {
        plan.bases.push(counters.get(&field).copied().unwrap_or(0));
        plan.tops.push(top);
        plan.fields.push(field);
    }
    plan
}

/// Rebuilds `shard`'s counters from MySQL (the last saved seq of each direction), raising, never
/// lowering, and marks the hash restored.
pub async fn restore(conn: &RedisConn, keys: &Keys, store: &Store, shards: u16, shard: u16) -> Result<usize, String> {
    let floors = store
        .last_out_seqs(|from| shard_of(from, shards) == shard)
        .await
        .map_err(|e| format!("reading the last seqs from MySQL: {e}"))?;
    raise(conn, keys, shard, &floors).await?;
    let key = keys.seq_counters(shard);
    redis::cmd("HSET")
        .arg(&key)
        .arg(SEQ_RESTORED)
        .arg(1)
        .query_async::<()>(&mut conn.clone())
        .await
        .map_err(|e| format!("marking the counters restored: {e}"))?;
    Ok(floors.len())
}

/// Raises `shard`'s counters to `floors` ((from, to, seq) each), never lowering one.
pub async fn raise(conn: &RedisConn, keys: &Keys, shard: u16, floors: &[(u64, u64, u64)]) -> Result<(), String> {
    let key = keys.seq_counters(shard);
    for chunk in floors.chunks(1000) {
        let mut inv = RAISE.prepare_invoke();
        inv.key(&key);
        for &(from, to, _) in chunk {
            inv.arg(seq_field(from, to));
        }
        for &(_, _, seq) in chunk {
            inv.arg(seq);
        }
        inv.invoke_async::<()>(&mut conn.clone()).await.map_err(|e| format!("raising the counters: {e}"))?;
    }
    Ok(())
}

/// KEYS: counters. ARGV: n fields, then n tops.
static RAISE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&im_common::seq_counters::raise_script()));

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: u64, to: u64, seq: u64) -> ChatMessage {
        ChatMessage { id: 1, from, to, client_msg_id: "c".into(), msg_type: "TEXT".into(), body: "b".into(), seq }
    }

    #[test]
    fn messages_are_numbered_per_direction_in_order_from_the_counters() {
        let counters: HashMap<String, u64> = [("1:2".to_owned(), 7)].into();
        let mut batch = [msg(1, 2, 0), msg(2, 1, 0), msg(1, 2, 0), msg(1, 3, 4), msg(2, 1, 0)];
        let mut refs: Vec<&mut ChatMessage> = batch.iter_mut().collect();
        let plan = number(&counters, &mut refs);
        let seqs: Vec<u64> = batch.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [8, 1, 9, 4, 2], "a message that has its seq keeps it");
        assert_eq!(plan.fields, ["1:2", "2:1"]);
        assert_eq!(plan.bases, [7, 0]);
        assert_eq!(plan.tops, [9, 2]);
    }

    #[test]
    fn the_same_batch_numbered_twice_from_the_same_counters_gets_the_same_seqs() {
        let counters: HashMap<String, u64> = [("5:6".to_owned(), 41)].into();
        let numbered = || {
            let mut batch = [msg(5, 6, 0), msg(5, 6, 0)];
            let mut refs: Vec<&mut ChatMessage> = batch.iter_mut().collect();
            number(&counters, &mut refs);
            batch.map(|m| m.seq)
        };
        assert_eq!(numbered(), [42, 43]);
        assert_eq!(numbered(), numbered());
    }
}
