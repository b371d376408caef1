//! Seqs that fail-open saves took in MySQL and the shard's counters in Redis may not know yet.
//!
//! A gateway that saved messages on the baseline path while Redis was away (numbered from
//! `conversations.last_out_seq`) raises the shard's counters to their seqs once it reaches Redis
//! again (its outbox). If it cannot yet — it is paused, cut off, or gone — and the sender's next
//! message reaches the stream through another gateway, numbering from Redis alone would give that
//! message a seq MySQL already holds: its row is refused and the sender hears `save_failed`.
//!
//! So the shard owner, with `two_phase.fail_open` on, reads the fail-open saves whose claims are
//! not marked raised (`path_claims`, one indexed query every [`POLL`]), raises its senders'
//! counters to their seqs and marks those claims raised. Each save is raised once whatever order
//! the saves commit in, and only its own direction is touched. The raise races no numbering: the
//! deliver stage commits its seqs only if the counters still hold what it read, and numbers again
//! otherwise. What stays open: a fail-open save that commits less than a poll before the numbering
//! of a later message of the same sender, sent through another gateway.

use std::collections::BTreeMap;
use std::time::Duration;

use im_common::shard::shard_of;

use crate::sequences;
use crate::stage::ShardContext;

/// How often the owner asks MySQL for fail-open saves not raised yet.
pub const POLL: Duration = Duration::from_millis(100);

/// Raises the shard's counters to the seqs of its senders' fail-open saves not raised yet, then
/// marks them raised; returns how many saves that was.
pub async fn raise_once(ctx: &ShardContext) -> Result<usize, String> {
    let saves = ctx.store.unraised_fail_open_saves().await.map_err(|e| format!("reading fail-open saves: {e}"))?;
    let (ids, tops) = floors_of(&saves, ctx.shards, ctx.shard);
    if ids.is_empty() {
        return Ok(0);
    }
    sequences::raise(&ctx.mover.conn, &ctx.keys, ctx.shard, &tops).await?;
    ctx.store.mark_raised(&ids).await.map_err(|e| format!("marking fail-open saves raised: {e}"))?;
    tracing::info!(
        shard = ctx.shard,
        saves = ids.len(),
        directions = tops.len(),
        "seq counters raised to fail-open saves' seqs"
    );
    metrics::counter!("im_worker_fail_open_floors_total", "shard" => ctx.label()).increment(ids.len() as u64);
    Ok(ids.len())
}

/// Raises every [`POLL`] until the task is aborted.
pub async fn watch(ctx: ShardContext) {
    loop {
        tokio::time::sleep(POLL).await;
        if let Err(e) = raise_once(&ctx).await {
            tracing::debug!(shard = ctx.shard, error = %e, "raising fail-open floors failed; next poll");
        }
    }
}

/// Of `saves` ((claim id, from, to, seq) each), those of `shard`'s senders: their claim ids, and the
/// highest seq per direction as (from, to, seq).
fn floors_of(saves: &[(u64, u64, u64, u64)], shards: u16, shard: u16) -> (Vec<u64>, Vec<(u64, u64, u64)>) {
    let mut ids = Vec::new();
    let mut tops: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for &(id, from, to, seq) in saves.iter().filter(|&&(_, from, _, _)| shard_of(from, shards) == shard) {
        ids.push(id);
        let top = tops.entry((from, to)).or_default();
        *top = (*top).max(seq);
    }
    (ids, tops.into_iter().map(|((from, to), seq)| (from, to, seq)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_raises_each_direction_of_its_senders_to_their_highest_fail_open_seq() {
        let shards = 4;
        let mine: Vec<u64> = (1..).filter(|&u| shard_of(u, shards) == 1).take(2).collect();
        let other = (1..).find(|&u| shard_of(u, shards) != 1).unwrap();
        let (a, b) = (mine[0], mine[1]);
        let saves = [(10, a, 9, 4), (11, other, 9, 7), (12, a, 9, 3), (13, b, a, 1), (14, a, 8, 2)];
        let (ids, tops) = floors_of(&saves, shards, 1);
        assert_eq!(ids, [10, 12, 13, 14], "another shard's save is left to its owner");
        let mut want = vec![(a, 9, 4), (b, a, 1), (a, 8, 2)];
        want.sort_unstable();
        assert_eq!(tops, want, "one floor per direction, the highest seq");
    }
}
