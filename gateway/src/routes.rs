//! This node's presence in Redis: route entries for its users, and the subscription to its own node
//! channel through which other processes push frames to its connections.
//!
//! Route entries are written when a user's first connection arrives and removed when the last one
//! leaves; a heartbeat refreshes all of them every third of `gateway.route_ttl_ms`, so the entries of
//! a gateway that died expire by themselves. The subscriber reconnects with backoff; while it is down
//! `/readyz` is red, and what is published to this node meanwhile is parked in Redis and delivered,
//! in order, when the subscription is back (see [`RouteKeeper::subscribe`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;

use crate::framing::close_code;
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
    /// When every local route was last refreshed (Unix ms).
    refreshed_at: Arc<AtomicU64>,
}

impl RouteKeeper {
    pub fn new(conn: ConnectionManager, keys: Keys, node: u16, ttl_ms: u64) -> Self {
        RouteKeeper { conn, keys, node, ttl_ms, refreshed_at: Arc::new(AtomicU64::new(im_common::ids::now_ms())) }
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
            if let Err(e) = self.refresh(&sessions).await {
                tracing::warn!(error = %e, "route heartbeat failed");
            }
        }
    }

    /// Refreshes every local user's route, and notes when that last succeeded.
    async fn refresh(&self, sessions: &Sessions) -> redis::RedisResult<()> {
        let started = im_common::ids::now_ms();
        for chunk in sessions.users().chunks(1000) {
            self.register(chunk).await?;
        }
        self.refreshed_at.store(started, Ordering::Relaxed);
        Ok(())
    }
}

impl RouteKeeper {
    /// Subscribes to the node channel and hands every push to the local sessions, until the process
    /// ends. `live` is true exactly while the subscription is established; `im_gateway_subscription_up`
    /// mirrors it for alerting (a scrape sees what `/readyz` sees).
    ///
    /// After each SUBSCRIBE, and before reading anything live, the gateway takes what publishers
    /// parked for it while nobody was subscribed (`bus::PARK_LUA`) and delivers it in order: every
    /// batch was published either before the subscription (parked) or after it (live), so nothing
    /// of the gap is lost and nothing overtakes. When the gap outlived the route entries
    /// (`gateway.route_ttl_ms`), publishers meanwhile took its users for offline and parked nothing;
    /// those connections are closed with 1012 so their clients reconnect and get offline resend.
    pub async fn subscribe(self, redis_url: String, shards: u16, sessions: Arc<Sessions>, live: Arc<AtomicBool>) {
        let channel = self.keys.node_channel(self.node);
        let mut parked: Vec<String> = (0..shards).map(|s| self.keys.parked_by_shard(s, self.node)).collect();
        parked.push(self.keys.parked_by_gateways(self.node));
        let up = metrics::gauge!("im_gateway_subscription_up");
        up.set(0.0);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.open_subscription(&redis_url, &channel, &parked, &sessions).await {
                Ok(mut pubsub) => {
                    live.store(true, Ordering::Relaxed);
                    up.set(1.0);
                    tracing::info!(%channel, "node channel subscribed");
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        deliver_batch(&sessions, msg.get_payload_bytes());
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

    /// SUBSCRIBE, then refresh the routes and deliver the parked batches; live messages wait in the
    /// subscription's buffer meanwhile.
    async fn open_subscription(
        &self,
        url: &str,
        channel: &str,
        parked: &[String],
        sessions: &Sessions,
    ) -> redis::RedisResult<redis::aio::PubSub> {
        let client = redis::Client::open(url)?;
        let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pubsub connect timed out")))??;
        pubsub.subscribe(channel).await?;
        let routes_lapsed =
            im_common::ids::now_ms().saturating_sub(self.refreshed_at.load(Ordering::Relaxed)) > self.ttl_ms;
        self.refresh(sessions).await?;
        let batches = im_common::bus::take_parked(&self.conn, parked).await?;
        metrics::counter!("im_gateway_parked_taken_total").increment(batches.len() as u64);
        for batch in &batches {
            deliver_batch(sessions, batch);
        }
        if routes_lapsed && sessions.connection_count() > 0 {
            tracing::warn!("route entries lapsed while unsubscribed; asking clients to reconnect");
            sessions.close_all(close_code::SERVICE_RESTART, "reconnect");
        }
        Ok(pubsub)
    }
}

fn deliver_batch(sessions: &Sessions, payload: &[u8]) {
    metrics::counter!("im_gateway_pubsub_messages_in_total").increment(1);
    match decode::<PushBatch>(payload) {
        Ok(batch) => {
            for push in &batch.pushes {
                sessions.deliver(push);
            }
        }
        Err(e) => tracing::warn!(error = %e, "undecodable node-channel message"),
    }
}
