//! Per-shard stream gauges for operators: length, pending, lag and oldest-pending age of `accepted`
//! and `to_save`, refreshed once a second with one pipelined round trip.

use std::time::Duration;

use im_common::connections::RedisConn;
use redis::streams::{StreamInfoGroupsReply, StreamPendingReply};

use im_common::ids::now_ms;
use im_common::keys::Keys;

/// Age in seconds of a stream id (`<ms>-<seq>`).
fn stream_id_age(id: &str) -> f64 {
    let ms: u64 = id.split('-').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if ms == 0 {
        return 0.0;
    }
    now_ms().saturating_sub(ms) as f64 / 1000.0
}

/// Publishes the gauges of `shard` until the task is aborted.
pub async fn report(mut conn: RedisConn, keys: Keys, group: String, shard: u16) {
    let label = shard.to_string();
    let streams = [("accepted", keys.accepted_stream(shard)), ("to_save", keys.to_save_stream(shard))];
    loop {
        let mut pipe = redis::pipe();
        for (_, key) in &streams {
            pipe.xlen(key).xpending(key, &group).xinfo_groups(key);
        }
        pipe.xlen(keys.dead_letter_stream(shard));
        type Row =
            (u64, StreamPendingReply, StreamInfoGroupsReply, u64, StreamPendingReply, StreamInfoGroupsReply, u64);
        if let Ok((len_a, pend_a, info_a, len_s, pend_s, info_s, dead)) = pipe.query_async::<Row>(&mut conn).await {
            for (stream, len, pending, info) in
                [("accepted", len_a, pend_a, info_a), ("to_save", len_s, pend_s, info_s)]
            {
                let labels = [("shard", label.clone()), ("stream", stream.to_owned())];
                metrics::gauge!("im_stream_length", &labels).set(len as f64);
                metrics::gauge!("im_stream_pending", &labels).set(pending.count() as f64);
                let oldest = match &pending {
                    StreamPendingReply::Data(d) => stream_id_age(&d.start_id),
                    _ => 0.0,
                };
                metrics::gauge!("im_stream_oldest_pending_age_seconds", &labels).set(oldest);
                let lag = info.groups.iter().find(|g| g.name == group).and_then(|g| g.lag).unwrap_or(0);
                metrics::gauge!("im_stream_consumer_lag", &labels).set(lag as f64);
            }
            metrics::gauge!("im_stream_dead_letter_length", "shard" => label.clone()).set(dead as f64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
