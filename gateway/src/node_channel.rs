//! Where pushes arrive: this node's channels — one per shard, which that shard's owner publishes on,
//! and one other gateways publish on — through which frames (pushes, receipts) reach the
//! connections held here ([`Subscription`]: classic pub/sub on one server, sharded on a cluster).
//!
//! Every message names its place in a journal ([`im_common::journal`]); after a gap in the
//! subscription the node replays what it missed, in order, before anything live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::framing::close_code;
use crate::routes::RouteKeeper;
use crate::sessions::Sessions;
use im_common::backoff::Backoff;
use im_common::config::RedisConfig;
use im_common::journal::{self, split_journaled, EntryId, JOURNAL_RETENTION_MS};
use im_common::record::{decode, PushBatch};
use im_common::subscription::Subscription;

/// Resubscribing to the node channel after a failure: first pause and cap.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// Subscribes to the node channel and hands every push to the local sessions, until the process
/// ends. `live` is true exactly while the subscription is established; `im_gateway_subscription_up`
/// mirrors it for alerting (a scrape sees what `/readyz` sees).
///
/// Every message names its place in a journal (`journal::PublishingScript`), and the gateway remembers the
/// last place it delivered from each of its journals. After each SUBSCRIBE, before anything live,
/// it replays what its journals hold beyond those places (in serverMsgId order, which is each
/// sender's order), and afterwards skips live messages it has already replayed. So a gap in the
/// subscription — Redis restarted, the connection dropped, messages lost in flight with it —
/// loses nothing and reorders nothing. A gap longer than the journals keep
/// ([`JOURNAL_RETENTION_MS`]) or the route entries live (`gateway.route_ttl_ms`) cannot be
/// replayed: the gateway then closes its connections with 1012 and the clients reconnect into
/// offline resend.
pub async fn subscribe(
    routes: RouteKeeper,
    redis: RedisConfig,
    shards: u16,
    sessions: Arc<Sessions>,
    live: Arc<AtomicBool>,
) {
    let channels = routes.keys.node_channels(routes.node, shards);
    let mut journals: Vec<String> = (0..shards).map(|s| routes.keys.journal_of_shard(s, routes.node)).collect();
    journals.push(routes.keys.journal_of_gateways(routes.node));
    let mut seen: HashMap<String, EntryId> = HashMap::new();
    let mut lost_at = None;
    let up = metrics::gauge!("im_gateway_subscription_up");
    up.set(0.0);
    let mut backoff = Backoff::new(RESUBSCRIBE_FIRST, RESUBSCRIBE_MAX);
    loop {
        match resume(&routes, &redis, &channels, &journals, &mut seen, lost_at, &sessions).await {
            Ok(mut subscription) => {
                live.store(true, Ordering::Relaxed);
                up.set(1.0);
                tracing::info!(channels = channels.len(), "node channels subscribed");
                backoff.reset();
                while let Some(payload) = subscription.next().await {
                    metrics::counter!("im_gateway_pubsub_messages_in_total").increment(1);
                    let Some((journal, id, batch)) = split_journaled(&payload) else {
                        tracing::warn!("node-channel message without its journal position");
                        continue;
                    };
                    match seen.get_mut(journal) {
                        Some(last) if id <= *last => continue, // replayed already
                        Some(last) => *last = id,
                        None => {}
                    }
                    deliver_batch(&sessions, batch);
                }
                live.store(false, Ordering::Relaxed);
                up.set(0.0);
                lost_at = Some(Instant::now());
                tracing::warn!("node channel subscription lost; resubscribing");
            }
            Err(e) => tracing::warn!(error = %e, "node channel subscribe failed"),
        }
        backoff.wait().await;
    }
}

/// Subscribe, then refresh the routes and replay the journals from `seen`; live messages wait in
/// the subscription's buffer meanwhile. The first time, `seen` starts at the journals' ends (read
/// before subscribing, so nothing published in between is skipped).
async fn resume(
    routes: &RouteKeeper,
    redis: &RedisConfig,
    channels: &[String],
    journals: &[String],
    seen: &mut HashMap<String, EntryId>,
    lost_at: Option<Instant>,
    sessions: &Sessions,
) -> redis::RedisResult<Subscription> {
    if seen.is_empty() {
        let tails = journal::journal_tails(&routes.conn, journals).await?;
        seen.extend(journals.iter().cloned().zip(tails));
    }
    let subscription = Subscription::open(redis, channels).await?;
    routes.refresh(sessions).await?;
    let limit = Duration::from_millis(JOURNAL_RETENTION_MS.min(routes.ttl_ms));
    if lost_at.is_some_and(|t| t.elapsed() > limit) {
        tracing::warn!("node channel gap longer than the journal or the routes; asking clients to reconnect");
        let tails = journal::journal_tails(&routes.conn, journals).await?;
        seen.extend(journals.iter().cloned().zip(tails));
        sessions.close_all(close_code::SERVICE_RESTART, "reconnect");
        return Ok(subscription);
    }
    let mut pushes = Vec::new();
    let mut ends = Vec::new();
    for journal in journals {
        let from = seen.get(journal).copied().unwrap_or_default();
        let entries = journal::read_journal(&routes.conn, journal, from).await?;
        if let Some((last, _)) = entries.last() {
            ends.push((journal.clone(), *last));
        }
        for (_, payload) in &entries {
            match decode::<PushBatch>(payload) {
                Ok(batch) => pushes.extend(batch.pushes),
                Err(e) => tracing::warn!(error = %e, "undecodable journal entry"),
            }
        }
    }
    // Journals interleave only where one sender's messages took two paths (fail-open); ids are
    // each sender's order. The sort is stable, so each journal's own order stands.
    pushes.sort_by_key(|p| p.frame.server_msg_id);
    metrics::counter!("im_gateway_replayed_pushes_total").increment(pushes.len() as u64);
    for push in &pushes {
        sessions.deliver(push);
    }
    seen.extend(ends);
    Ok(subscription)
}

fn deliver_batch(sessions: &Sessions, payload: &[u8]) {
    match decode::<PushBatch>(payload) {
        Ok(batch) => {
            for push in &batch.pushes {
                sessions.deliver(push);
            }
        }
        Err(e) => tracing::warn!(error = %e, "undecodable node-channel message"),
    }
}
