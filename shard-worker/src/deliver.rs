//! The deliver stage (full mode): read a batch from `accepted` → number it (seq per direction) and
//! push every message to its recipient (one round trip reads the seq counters, the recipients'
//! presence epochs and the routes not cached or cached too long; one PUBLISH per gateway node for
//! the whole batch) → hand the batch to `to_save` (as one
//! entry) and XACK it: numbering, pushes and hand-over in one fenced script ([`crate::mover`]).

use im_common::backoff::Backoff;
use im_common::record::{encode, Accepted, Handed};

use crate::stage::{age_seconds, chat_push, decode_accepted, ShardContext};
use crate::streams::StreamReader;

/// The deliver stage (full mode). Returns when the lease is lost.
pub async fn deliver_stage(ctx: ShardContext, mut reader: StreamReader) {
    let to_save = ctx.keys.to_save_stream(ctx.shard);
    let shard = ctx.label();
    let pushed_age = metrics::histogram!("im_worker_accepted_to_pushed_seconds", "shard" => shard.clone());
    let mut backoff = Backoff::default();
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = decode_accepted(&batch);
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        let handoff = || async {
            // Numbered afresh on every try: a try whose script did not run consumed no seq.
            let mut accepted: Vec<Accepted> = decoded.ok.clone();
            let (plan, routes, epochs) = ctx.number(&mut accepted, true).await?;
            for a in &mut accepted {
                a.pushed_at_epoch = Some(epochs.get(&a.msg.to).copied().unwrap_or(0));
            }
            let pushes: Vec<_> = accepted.iter().map(|a| chat_push(&a.msg)).collect();
            let (pubs, _) = ctx.router.group(&pushes, &routes, None);
            // Undecodable entries go to to_save as they are: the save stage dead-letters them in one place.
            let handed = encode(&Handed { messages: accepted, undecodable: decoded.bad.clone() });
            ctx.mover.handoff(&reader.key, &to_save, &ids, &handed, &pubs, &plan).await.map_err(|e| e.to_string())
        };
        if ctx.until_done(&mut backoff, "deliver: number/push/handoff", handoff).await.is_none() {
            return;
        }
        metrics::counter!("im_worker_delivered_total", "shard" => shard.clone()).increment(decoded.ok.len() as u64);
        metrics::histogram!("im_worker_batch_size", "shard" => shard.clone(), "stage" => "deliver")
            .record(batch.len() as f64);
        for a in &decoded.ok {
            pushed_age.record(age_seconds(a.msg.id));
        }
    }
}
