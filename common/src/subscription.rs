//! A gateway's subscription to its channels (`Keys::node_channels`), as one stream of messages that
//! ends when the subscription breaks: classic `SUBSCRIBE` on one server, sharded `SSUBSCRIBE` on a
//! Redis Cluster (each channel on the master of its slot, so a publication crosses no cluster bus).
//!
//! A broken subscription — the connection dropped, or the server moved a channel away with an
//! unrequested `SUNSUBSCRIBE` (its slot migrated), which redis-rs does not renew — ends the stream;
//! the caller subscribes again and replays its journals, so nothing published meanwhile is lost.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::RedisConfig;
use crate::connections::cluster_builder;

/// How long opening the subscriber connection may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An open subscription.
pub enum Subscription {
    Single(Pin<Box<dyn Stream<Item = redis::Msg> + Send>>),
    Cluster {
        /// Kept open: dropping it ends the subscription.
        _conn: ClusterConnection,
        pushes: UnboundedReceiver<PushInfo>,
    },
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "subscriber connect timed out"))
}

impl Subscription {
    /// Subscribes to `channels` on a connection of its own.
    pub async fn open(cfg: &RedisConfig, channels: &[String]) -> RedisResult<Subscription> {
        if cfg.cluster_urls.is_empty() {
            let client = redis::Client::open(cfg.url.as_str())?;
            let mut pubsub =
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.get_async_pubsub()).await.map_err(|_| timed_out())??;
            pubsub.subscribe(channels).await?;
            return Ok(Subscription::Single(Box::pin(pubsub.into_on_message())));
        }
        let (sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        let client = cluster_builder(cfg)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .response_timeout(SUBSCRIBE_TIMEOUT)
            .build()?;
        let mut conn =
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.get_async_connection()).await.map_err(|_| timed_out())??;
        for channel in channels {
            conn.ssubscribe(channel).await?;
        }
        Ok(Subscription::Cluster { _conn: conn, pushes })
    }

    /// The next message's payload; `None` once the subscription is broken.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Subscription::Single(messages) => messages.next().await.map(|m| m.get_payload_bytes().to_vec()),
            Subscription::Cluster { pushes, .. } => loop {
                let push = pushes.recv().await?;
                match push.kind {
                    PushKind::SMessage => {
                        if let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) {
                            return Some(payload);
                        }
                    }
                    PushKind::SUnsubscribe | PushKind::Disconnection => return None,
                    _ => {}
                }
            },
        }
    }
}
