//! Push routing: who holds a user, and one PUBLISH per gateway node per batch.
//!
//! Routes: `route(uid)` is a sorted set of gateway node ids scored by expiry (Unix ms). Gateways add
//! themselves when a user connects, refresh all their users on a heartbeat, and remove themselves when
//! the user's last local connection closes; a crashed gateway's entries simply expire. Pushes for a
//! batch resolve all recipients in one pipeline and then send one journaled PUBLISH per node
//! ([`crate::journal`]) in a second one.

use std::collections::HashMap;

use redis::aio::ConnectionManager;

use crate::journal::PUBLISH_SCRIPT;
use crate::keys::Keys;
use crate::record::{encode, Push, PushBatch};

/// Where a push goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every gateway that holds the push's user (looked up in the route registry).
    Routed,
    /// A known node (a receipt going back to the connection a message came in on).
    Node(u16),
}

/// Counts of one [`Router::send`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// PUBLISH commands sent (one per node that had anything).
    pub publishes: usize,
    /// Routed pushes whose user is on no gateway (offline: their next connection syncs them).
    pub offline: usize,
}

/// Resolves routes and publishes pushes to node channels.
#[derive(Clone)]
pub struct Router {
    conn: ConnectionManager,
    keys: Keys,
}

impl Router {
    /// A router over an existing connection.
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Router { conn, keys }
    }

    /// Where each user is, in one pipelined round trip.
    pub async fn resolve(&self, users: &[u64]) -> redis::RedisResult<HashMap<u64, Presence>> {
        Ok(self.resolve_and(users, None).await?.0)
    }

    /// [`Router::resolve`], with one more command in the same round trip (its raw reply is returned).
    pub async fn resolve_and(
        &self,
        users: &[u64],
        extra: Option<redis::Cmd>,
    ) -> redis::RedisResult<(HashMap<u64, Presence>, redis::Value)> {
        if users.is_empty() && extra.is_none() {
            return Ok((HashMap::new(), redis::Value::Nil));
        }
        let now = crate::ids::now_ms();
        let mut pipe = redis::pipe();
        if let Some(cmd) = &extra {
            pipe.add_command(cmd.clone());
        }
        for &u in users {
            pipe.zrangebyscore(self.keys.route(u), now, "+inf").get(self.keys.presence(u));
        }
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let extra_reply = if extra.is_some() { replies.remove(0) } else { redis::Value::Nil };
        let mut found = HashMap::with_capacity(users.len());
        let mut replies = replies.into_iter();
        for &u in users {
            let (Some(nodes), Some(epoch)) = (replies.next(), replies.next()) else { break };
            let nodes: Vec<u16> = redis::from_redis_value(nodes)?;
            let epoch: Option<u64> = redis::from_redis_value(epoch)?;
            found.insert(u, Presence { nodes, epoch: epoch.unwrap_or(0) });
        }
        Ok((found, extra_reply))
    }

    /// Delivers pushes: routed ones to every node holding their user (except `skip_node`, whose
    /// caller delivers locally), the others to their node. One pipeline to resolve, one to publish.
    pub async fn send(&self, pushes: &[(Target, Push)], skip_node: Option<u16>) -> redis::RedisResult<SendStats> {
        let (publications, stats) = self.prepare(pushes, skip_node).await?;
        if !publications.is_empty() {
            // EVAL, not EVALSHA: a pipeline cannot load a missing script; Redis caches it by hash anyway.
            let mut pipe = redis::pipe();
            for p in &publications {
                let journal = self.keys.journal_of_gateways(p.node);
                pipe.cmd("EVAL").arg(&*PUBLISH_SCRIPT).arg(1).arg(journal).arg(&p.channel).arg(&p.payload).ignore();
            }
            pipe.query_async::<()>(&mut self.conn.clone()).await?;
        }
        Ok(stats)
    }

    /// Resolves routes and groups pushes into one [`Publication`] per node, without publishing: shard
    /// workers publish them inside the script that also acknowledges the batch, so a push and its
    /// XACK happen atomically.
    pub async fn prepare(
        &self,
        pushes: &[(Target, Push)],
        skip_node: Option<u16>,
    ) -> redis::RedisResult<(Vec<Publication>, SendStats)> {
        let mut users: Vec<u64> = pushes.iter().filter(|(t, _)| *t == Target::Routed).map(|(_, p)| p.user).collect();
        users.sort_unstable();
        users.dedup();
        let routes = self.resolve(&users).await?;
        Ok(self.group(pushes, &routes, skip_node))
    }

    /// Groups pushes into one [`Publication`] per node, with routes already resolved.
    pub fn group(
        &self,
        pushes: &[(Target, Push)],
        routes: &HashMap<u64, Presence>,
        skip_node: Option<u16>,
    ) -> (Vec<Publication>, SendStats) {
        let mut stats = SendStats::default();
        let mut by_node: HashMap<u16, Vec<Push>> = HashMap::new();
        for (target, push) in pushes {
            match *target {
                Target::Node(node) => by_node.entry(node).or_default().push(push.clone()),
                Target::Routed => {
                    let nodes = routes.get(&push.user).map(|p| p.nodes.as_slice()).unwrap_or_default();
                    if nodes.is_empty() {
                        stats.offline += 1;
                    }
                    for &node in nodes.iter().filter(|&&n| Some(n) != skip_node) {
                        by_node.entry(node).or_default().push(push.clone());
                    }
                }
            }
        }
        stats.publishes = by_node.len();
        let publications = by_node
            .into_iter()
            .map(|(node, pushes)| Publication {
                node,
                channel: self.keys.node_channel(node),
                payload: encode(&PushBatch { pushes }),
            })
            .collect();
        (publications, stats)
    }
}

/// Where a user is: the gateway nodes holding a connection of theirs, and their presence epoch
/// (`Keys::presence`: raised on every new connection; 0 if never).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    pub nodes: Vec<u16>,
    pub epoch: u64,
}

/// One PUBLISH: a node channel and an encoded [`PushBatch`].
#[derive(Debug, Clone)]
pub struct Publication {
    pub node: u16,
    pub channel: String,
    pub payload: Vec<u8>,
}
