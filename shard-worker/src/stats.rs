//! Per-shard stream gauges for operators: length, pending, lag and oldest-pending age of `accepted`
//! and `to_save`, refreshed once a second with one pipelined round trip by the shard's owner, and
//! zeroed when it lets the shard go ([`clear`]): a former owner that kept its last values would
//! count the shard's backlog and dead letters twice in every sum over the workers.

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

/// The streams the gauges describe, by their `stream` label.
const STREAMS: [&str; 2] = ["accepted", "to_save"];

/// Publishes the gauges of `shard` until the task is aborted.
pub async fn report(mut conn: RedisConn, keys: Keys, group: String, shard: u16) {
    let label = shard.to_string();
    let streams = [(STREAMS[0], keys.accepted_stream(shard)), (STREAMS[1], keys.to_save_stream(shard))];
    loop {
        // The length is in messages: `to_save`'s entries are deliver batches, counted apart.
        let mut pipe = redis::pipe();
        pipe.xlen(&streams[0].1);
        pipe.xpending(&streams[0].1, &group).xinfo_groups(&streams[0].1);
        pipe.get(keys.to_save_messages(shard));
        pipe.xpending(&streams[1].1, &group).xinfo_groups(&streams[1].1);
        pipe.xlen(keys.dead_letter_stream(shard));
        type Row = (
            u64,
            StreamPendingReply,
            StreamInfoGroupsReply,
            // Signed: entries of older workers were never counted, and take the count below 0
            // until the stream drains (a failed parse would void every gauge of the round).
            Option<i64>,
            StreamPendingReply,
            StreamInfoGroupsReply,
            u64,
        );
        if let Ok((len_a, pend_a, info_a, len_s, pend_s, info_s, dead)) = pipe.query_async::<Row>(&mut conn).await {
            for (stream, len, pending, info) in
                [(STREAMS[0], len_a, pend_a, info_a), (STREAMS[1], len_s.unwrap_or(0).max(0) as u64, pend_s, info_s)]
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

/// Zeroes the gauges of `shard` (its reporter stopped: this process no longer owns it).
pub fn clear(shard: u16) {
    let label = shard.to_string();
    for stream in STREAMS {
        let labels = [("shard", label.clone()), ("stream", stream.to_owned())];
        for name in
            ["im_stream_length", "im_stream_pending", "im_stream_oldest_pending_age_seconds", "im_stream_consumer_lag"]
        {
            metrics::gauge!(name, &labels).set(0.0);
        }
    }
    metrics::gauge!("im_stream_dead_letter_length", "shard" => label).set(0.0);
}
