//! Push routing: who holds a user, and one PUBLISH per gateway node per batch.
//!
//! Routes: `route(uid)` is a sorted set of gateway node ids scored by expiry (Unix ms). Gateways add
//! themselves when a user connects, refresh all their users on a heartbeat, and remove themselves when
//! the user's last local connection closes; a crashed gateway's entries simply expire. Pushes for a
//! batch resolve all recipients in one pipeline and then send one journaled PUBLISH per node
//! ([`crate::journal`]) in a second one. Routes are read through a [`RouteCache`] that the
//! recipients' presence epochs vouch for.

use std::collections::HashMap;
use std::sync::Arc;

use crate::connections::RedisConn;

use crate::journal::PUBLISH_SCRIPT;
use crate::keys::Keys;
use crate::record::{encode, Push, PushBatch};
use crate::route_cache::{RouteCache, ROUTES_READ_AGAIN_AFTER};

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

/// Resolves routes and publishes pushes to node channels. Clones share the route cache.
#[derive(Clone)]
pub struct Router {
    conn: RedisConn,
    keys: Keys,
    cache: Arc<RouteCache>,
}

impl Router {
    /// A router over an existing connection, whose cached routes are read again once they are
    /// [`ROUTES_READ_AGAIN_AFTER`] old.
    pub fn new(conn: RedisConn, keys: Keys) -> Self {
        Router::with_cache(conn, keys, RouteCache::new(ROUTES_READ_AGAIN_AFTER))
    }

    /// A router over an existing connection with a route cache of its own making.
    pub fn with_cache(conn: RedisConn, keys: Keys, cache: RouteCache) -> Self {
        Router { conn, keys, cache: Arc::new(cache) }
    }

    /// The gateway nodes holding each user (users on none are left out), as [`Router::locate`]
    /// reads them.
    pub async fn resolve(&self, users: &[u64]) -> redis::RedisResult<Routes> {
        Ok(self.locate(users, None).await?.0)
    }

    /// The users' presence epochs (`Keys::presence`: raised on every new connection; 0 if never) and
    /// the gateway nodes holding them, through the route cache, with one more command whose raw
    /// reply is returned — in one round trip, and a second on a cluster for users who connected
    /// since their routes were cached. Routes are read no earlier than the epochs
    /// ([`crate::route_cache`]), so a push sent to them reaches every connection that raised the
    /// epoch it is recorded with, and every connection registered before this call.
    pub async fn locate(
        &self,
        users: &[u64],
        extra: Option<redis::Cmd>,
    ) -> redis::RedisResult<(Routes, Epochs, redis::Value)> {
        if users.is_empty() && extra.is_none() {
            return Ok((Routes::new(), Epochs::new(), redis::Value::Nil));
        }
        // One server runs a pipeline's commands in order; a cluster sends them to their nodes at once.
        let ordered = !self.conn.is_cluster();
        let with_epochs = self.cache.stale(users, ordered);
        let mut pipe = redis::pipe();
        if let Some(cmd) = &extra {
            pipe.add_command(cmd.clone());
        }
        if !users.is_empty() {
            pipe.add_command(self.epochs_cmd(users));
        }
        self.route_reads(&mut pipe, &with_epochs);
        let mut replies = pipe.query_async::<Vec<redis::Value>>(&mut self.conn.clone()).await?.into_iter();
        let extra_reply = if extra.is_some() { replies.next().unwrap_or(redis::Value::Nil) } else { redis::Value::Nil };
        let epochs = match users.is_empty() {
            true => Epochs::new(),
            false => read_epochs(users, replies.next().unwrap_or(redis::Value::Nil))?,
        };
        let (mut routes, again) = self.cache.settle(&epochs, parse_routes(&with_epochs, replies)?, ordered);
        if !again.is_empty() {
            routes.extend(self.cache.store(&epochs, self.read_routes(&again).await?));
        }
        Ok((routes, epochs, extra_reply))
    }

    /// Each user's gateway nodes (empty if on none), in one pipelined round trip.
    async fn read_routes(&self, users: &[u64]) -> redis::RedisResult<Vec<(u64, Vec<u16>)>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        self.route_reads(&mut pipe, users);
        let replies = pipe.query_async::<Vec<redis::Value>>(&mut self.conn.clone()).await?;
        parse_routes(users, replies.into_iter())
    }

    /// Adds a read of each user's live route entries to `pipe`.
    fn route_reads(&self, pipe: &mut redis::Pipeline, users: &[u64]) {
        let now = crate::ids::now_ms();
        for &u in users {
            pipe.zrangebyscore(self.keys.route(u), now, "+inf");
        }
    }

    /// `MGET` of the users' presence keys (never `GET`: the reply is always a list).
    fn epochs_cmd(&self, users: &[u64]) -> redis::Cmd {
        let mut cmd = redis::cmd("MGET");
        for &u in users {
            cmd.arg(self.keys.presence(u));
        }
        cmd
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
                let channel = self.keys.node_channel(p.node);
                pipe.cmd("EVAL")
                    .arg(PUBLISH_SCRIPT.source(&self.conn))
                    .arg(1)
                    .arg(journal)
                    .arg(channel)
                    .arg(&p.payload)
                    .ignore();
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
        routes: &Routes,
        skip_node: Option<u16>,
    ) -> (Vec<Publication>, SendStats) {
        let mut stats = SendStats::default();
        let mut by_node: HashMap<u16, Vec<Push>> = HashMap::new();
        for (target, push) in pushes {
            match *target {
                Target::Node(node) => by_node.entry(node).or_default().push(push.clone()),
                Target::Routed => {
                    let nodes = routes.get(&push.user).map(Vec::as_slice).unwrap_or_default();
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
            .map(|(node, pushes)| Publication { node, payload: encode(&PushBatch { pushes }) })
            .collect();
        (publications, stats)
    }
}

/// The gateway nodes holding each user's connections (users on none are absent).
pub type Routes = HashMap<u64, Vec<u16>>;

/// Each user's presence epoch (`Keys::presence`: raised on every new connection of theirs; 0 if
/// never). A change between two reads means the user connected in between.
pub type Epochs = HashMap<u64, u64>;

fn parse_routes(
    users: &[u64],
    replies: impl Iterator<Item = redis::Value>,
) -> redis::RedisResult<Vec<(u64, Vec<u16>)>> {
    users.iter().zip(replies).map(|(&u, nodes)| Ok((u, redis::from_redis_value(nodes)?))).collect()
}

fn read_epochs(users: &[u64], reply: redis::Value) -> redis::RedisResult<Epochs> {
    let values: Vec<Option<u64>> = redis::from_redis_value(reply)?;
    Ok(users.iter().zip(values).map(|(&u, e)| (u, e.unwrap_or(0))).collect())
}

/// One PUBLISH: the gateway node it is for and an encoded [`PushBatch`] (the channel depends on the
/// publisher: [`Keys::shard_channel`] for a shard's owner, [`Keys::node_channel`] for a gateway).
#[derive(Debug, Clone)]
pub struct Publication {
    pub node: u16,
    pub payload: Vec<u8>,
}
