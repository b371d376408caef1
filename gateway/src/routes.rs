//! This node's presence in Redis: route entries for its users, and the subscription to its own node
//! channel through which other processes push frames to its connections.
//!
//! Route entries are written when a user's first connection arrives and removed when the last one
//! leaves; a heartbeat refreshes all of them every third of `gateway.route_ttl_ms`, so the entries of
//! a gateway that died expire by themselves. The subscriber reconnects with backoff; while it is down
//! `/readyz` is red, because pushes published to this node meanwhile are lost (pub/sub keeps no copy:
//! the stream and MySQL do, and offline resend recovers them on reconnect).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;

use crate::sessions::Sessions;
use im_common::keys::Keys;
use im_common::record::{decode, PushBatch};

/// Writes and refreshes this node's route entries.
#[derive(Clone)]
pub struct RouteKeeper {
    conn: ConnectionManager,
    keys: Keys,
    node: u16,
    ttl_ms: u64,
}

impl RouteKeeper {
    pub fn new(conn: ConnectionManager, keys: Keys, node: u16, ttl_ms: u64) -> Self {
        RouteKeeper { conn, keys, node, ttl_ms }
    }

    /// Adds this node to the routes of `users` (one pipeline).
    pub async fn register(&self, users: &[u64]) -> redis::RedisResult<()> {
        let expiry = im_common::ids::now_ms() + self.ttl_ms;
        let mut pipe = redis::pipe();
        for &uid in users {
            let key = self.keys.route(uid);
            pipe.zadd(&key, self.node, expiry).ignore();
            // Drop other nodes' expired entries and keep the key itself from outliving its entries.
            pipe.zrembyscore(&key, 0, im_common::ids::now_ms()).ignore();
            pipe.pexpire(&key, self.ttl_ms as i64).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Removes this node from `uid`'s route.
    pub async fn unregister(&self, uid: u64) -> redis::RedisResult<()> {
        redis::cmd("ZREM").arg(self.keys.route(uid)).arg(self.node).query_async(&mut self.conn.clone()).await
    }

    /// Refreshes every local user's route until the process ends.
    pub async fn heartbeat(self, sessions: Arc<Sessions>) {
        let period = Duration::from_millis(self.ttl_ms / 3);
        loop {
            tokio::time::sleep(period).await;
            for chunk in sessions.users().chunks(1000) {
                if let Err(e) = self.register(chunk).await {
                    tracing::warn!(error = %e, "route heartbeat failed");
                    break;
                }
            }
        }
    }
}

/// Subscribes to the node channel and hands every push to the local sessions, until the process ends.
/// `live` is true exactly while the subscription is established; `im_gateway_subscription_up` mirrors
/// it for alerting (a scrape sees what `/readyz` sees).
/// Every subscription after the first signals `resumed`: whatever was published to this node during the
/// gap is gone, and the gateway catches up from the durable copies (`offline::catch_up`).
pub async fn subscribe(
    redis_url: String,
    channel: String,
    sessions: Arc<Sessions>,
    live: Arc<AtomicBool>,
    resumed: Arc<tokio::sync::Notify>,
) {
    let mut first = true;
    let up = metrics::gauge!("im_gateway_subscription_up");
    up.set(0.0);
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_subscription(&redis_url, &channel).await {
            Ok(mut pubsub) => {
                live.store(true, Ordering::Relaxed);
                up.set(1.0);
                tracing::info!(%channel, "node channel subscribed");
                if !std::mem::replace(&mut first, false) {
                    resumed.notify_one();
                }
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    metrics::counter!("im_gateway_pubsub_messages_in_total").increment(1);
                    match decode::<PushBatch>(msg.get_payload_bytes()) {
                        Ok(batch) => {
                            for push in &batch.pushes {
                                sessions.deliver(push);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable node-channel message"),
                    }
                }
                live.store(false, Ordering::Relaxed);
                up.set(0.0);
                tracing::warn!(%channel, "node channel subscription lost; resubscribing");
            }
            Err(e) => tracing::warn!(error = %e, "node channel subscribe failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn open_subscription(url: &str, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let client = redis::Client::open(url)?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pubsub connect timed out")))??;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}
