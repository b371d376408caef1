//! Redis connections and push routing: who holds a user, and one PUBLISH per gateway node per batch.
//!
//! Every process holds long-lived multiplexed connections ([`ConnectionManager`]: pipelines by itself,
//! reconnects after a failure) instead of checking connections out of a pool per command, which costs
//! an extra round trip each time (see shared/LIMITS.md).
//!
//! Routes: `route(uid)` is a sorted set of gateway node ids scored by expiry (Unix ms). Gateways add
//! themselves when a user connects, refresh all their users on a heartbeat, and remove themselves when
//! the user's last local connection closes; a crashed gateway's entries simply expire. Pushes for a
//! batch resolve all recipients in one pipeline and then send one PUBLISH per node in a second one.
//!
//! Pub/sub keeps no copy, so a gateway that is between subscriptions (Redis restarted, the subscriber
//! connection dropped) would miss what is published to it. Every publisher therefore publishes with
//! [`PARK_LUA`]: when `PUBLISH` reaches nobody, the batch is parked in a list that the gateway drains,
//! in order, right after it subscribes again and before it reads anything live.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::keys::Keys;
use crate::record::{encode, Push, PushBatch};

/// Opens a managed connection with short timeouts, so a dead Redis fails calls fast (fail-open needs a
/// quick "no") instead of hanging them.
pub async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    connect_for_blocking(url, Duration::ZERO).await
}

/// A dedicated connection for blocking reads (`XREADGROUP BLOCK`): a blocked command holds up every
/// command pipelined behind it, so blocking readers never share the connection other work uses. Its
/// response timeout allows for the `block` time.
pub async fn connect_for_blocking(url: &str, block: Duration) -> redis::RedisResult<ConnectionManager> {
    let config = manager_config().set_response_timeout(Some(Duration::from_millis(2000) + block));
    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await
}

/// As [`connect`], but returns at once and connects on first use (for processes that must start while
/// Redis is down, like a fail-open gateway).
pub fn connect_lazy(url: &str) -> redis::RedisResult<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, manager_config())
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(1000)))
        .set_response_timeout(Some(Duration::from_millis(2000)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200))
}

/// Lua: `deliver(channel, message, parked)` publishes, and parks the message when nobody received it.
/// A parked list keeps the newest 10,000 batches (older ones are trimmed: their rows are saved, and
/// offline resend delivers them on reconnect) and expires 5 minutes after its last write, so a node
/// that never comes back leaves nothing behind.
pub const PARK_LUA: &str = r"
local function deliver(channel, message, parked)
  if redis.call('PUBLISH', channel, message) == 0 then
    redis.call('RPUSH', parked, message)
    redis.call('LTRIM', parked, -10000, -1)
    redis.call('PEXPIRE', parked, 300000)
  end
end
";

/// KEYS: parked list. ARGV: channel, message.
const PUBLISH_SCRIPT: &str = "deliver(ARGV[1], ARGV[2], KEYS[1])";

/// KEYS: parked list. Returns its entries and deletes it, atomically.
const TAKE_PARKED: &str = "local v = redis.call('LRANGE', KEYS[1], 0, -1) redis.call('DEL', KEYS[1]) return v";

/// Takes everything parked under `keys` (in order, key by key) in one pipeline.
pub async fn take_parked(conn: &ConnectionManager, keys: &[String]) -> redis::RedisResult<Vec<Vec<u8>>> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("EVAL").arg(TAKE_PARKED).arg(1).arg(key);
    }
    let lists: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut conn.clone()).await?;
    Ok(lists.into_iter().flatten().collect())
}

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
    /// Routed pushes whose user is on no gateway (offline: resent from MySQL on connect).
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

    /// Live gateway nodes of each user, in one pipelined round trip.
    pub async fn resolve(&self, users: &[u64]) -> redis::RedisResult<HashMap<u64, Vec<u16>>> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let now = crate::ids::now_ms();
        let mut pipe = redis::pipe();
        for &u in users {
            pipe.zrangebyscore(self.keys.route(u), now, "+inf");
        }
        let nodes: Vec<Vec<u16>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(users.iter().copied().zip(nodes).collect())
    }

    /// Delivers pushes: routed ones to every node holding their user (except `skip_node`, whose
    /// caller delivers locally), the others to their node. One pipeline to resolve, one to publish.
    pub async fn send(&self, pushes: &[(Target, Push)], skip_node: Option<u16>) -> redis::RedisResult<SendStats> {
        let (publications, stats) = self.prepare(pushes, skip_node).await?;
        if !publications.is_empty() {
            // EVAL, not EVALSHA: a pipeline cannot load a missing script; Redis caches it by hash anyway.
            let script = format!("{PARK_LUA}{PUBLISH_SCRIPT}");
            let mut pipe = redis::pipe();
            for p in &publications {
                let parked = self.keys.parked_by_gateways(p.node);
                pipe.cmd("EVAL").arg(&script).arg(1).arg(parked).arg(&p.channel).arg(&p.payload).ignore();
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
            .map(|(node, pushes)| Publication {
                node,
                channel: self.keys.node_channel(node),
                payload: encode(&PushBatch { pushes }),
            })
            .collect();
        Ok((publications, stats))
    }
}

/// One PUBLISH: a node channel and an encoded [`PushBatch`].
#[derive(Debug, Clone)]
pub struct Publication {
    pub node: u16,
    pub channel: String,
    pub payload: Vec<u8>,
}
