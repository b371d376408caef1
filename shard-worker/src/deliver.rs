//! The deliver stage (full mode): read a batch from `accepted` → push every message to its recipient
//! (one route lookup and one PUBLISH per gateway node for the whole batch) → hand the batch to
//! `to_save` and XACK it, pushes and hand-over in one fenced script ([`crate::mover`]).

use im_common::backoff::Backoff;

use crate::stage::{age_seconds, chat_push, decode_batch, ShardContext};
use crate::streams::StreamReader;

/// The deliver stage (full mode). Returns when the lease is lost.
pub async fn deliver_stage(ctx: ShardContext, mut reader: StreamReader) {
    let to_save = ctx.keys.to_save_stream(ctx.shard);
    let shard = ctx.label();
    let pushed_age = metrics::histogram!("im_worker_accepted_to_pushed_seconds", "shard" => shard.clone());
    let mut backoff = Backoff::default();
    while let Some(batch) = ctx.next_batch(&mut reader, &mut backoff).await {
        let decoded = decode_batch(&batch);
        let pushes: Vec<_> = decoded.ok.iter().map(|(_, a)| chat_push(&a.msg)).collect();
        let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
        // Undecodable entries go straight to to_save too: the save stage dead-letters them in one place.
        let payloads: Vec<&[u8]> = batch.iter().map(|e| e.payload.as_slice()).collect();
        let handoff = || async {
            let (pubs, _) = ctx.router.prepare(&pushes, None).await?;
            ctx.mover.handoff(&reader.key, &to_save, &ids, &payloads, &pubs).await
        };
        if ctx.until_done(&mut backoff, "deliver: push/handoff", handoff).await.is_none() {
            return;
        }
        metrics::counter!("im_worker_delivered_total", "shard" => shard.clone()).increment(decoded.ok.len() as u64);
        metrics::histogram!("im_worker_batch_size", "shard" => shard.clone(), "stage" => "deliver")
            .record(batch.len() as f64);
        for (_, a) in &decoded.ok {
            pushed_age.record(age_seconds(a.msg.id));
        }
    }
}
