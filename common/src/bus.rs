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
//! connection dropped) or whose connection died with messages in flight would miss them. Every
//! publisher therefore publishes with [`JOURNAL_LUA`]: the batch also goes to a short journal (a
//! stream per publisher key and node), and the published message carries its journal position, so a
//! gateway that resubscribes replays exactly what it has not seen, in order, before anything live.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamRangeReply;

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

/// How long a node's journal keeps what was published to it. A gateway that was away longer cannot
/// replay its gap and asks its clients to reconnect instead (offline resend covers them).
pub const JOURNAL_RETENTION_MS: u64 = 30_000;

/// Lua: `deliver(channel, message, journal)` appends the message to the node's journal (a stream
/// trimmed to [`JOURNAL_RETENTION_MS`], expiring when nothing is written to it), then publishes it
/// prefixed with where it is journaled: `<journal key>\n<entry id>\n<message>`.
pub static JOURNAL_LUA: LazyLock<String> = LazyLock::new(|| {
    format!(
        r"
local function deliver(channel, message, journal)
  local now = redis.call('TIME')
  local cutoff = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - {JOURNAL_RETENTION_MS})
  local id = redis.call('XADD', journal, 'MINID', '~', cutoff, '*', 'm', message)
  redis.call('PEXPIRE', journal, {})
  redis.call('PUBLISH', channel, journal .. '\n' .. id .. '\n' .. message)
end
",
        2 * JOURNAL_RETENTION_MS
    )
});

/// KEYS: journal. ARGV: channel, message.
static PUBLISH_SCRIPT: LazyLock<String> =
    LazyLock::new(|| format!("{}deliver(ARGV[1], ARGV[2], KEYS[1])", *JOURNAL_LUA));

/// A stream entry id, `<ms>-<seq>`, comparable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId(pub u64, pub u64);

impl EntryId {
    pub fn parse(s: &str) -> Option<EntryId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Splits a node-channel message into (journal key, entry id, encoded [`PushBatch`]).
pub fn split_journaled(msg: &[u8]) -> Option<(&str, EntryId, &[u8])> {
    let mut parts = msg.splitn(3, |&b| b == b'\n');
    let journal = std::str::from_utf8(parts.next()?).ok()?;
    let id = EntryId::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    Some((journal, id, parts.next()?))
}

/// The newest entry id of each journal (`EntryId::default()` for an empty one), in one pipeline.
pub async fn journal_tails(conn: &ConnectionManager, journals: &[String]) -> redis::RedisResult<Vec<EntryId>> {
    let mut pipe = redis::pipe();
    for key in journals {
        pipe.cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1);
    }
    let tails: Vec<StreamRangeReply> = pipe.query_async(&mut conn.clone()).await?;
    Ok(tails.iter().map(|r| r.ids.first().and_then(|e| EntryId::parse(&e.id)).unwrap_or_default()).collect())
}

/// The entries of `journal` after `after`, oldest first: (id, encoded [`PushBatch`]).
pub async fn read_journal(
    conn: &ConnectionManager,
    journal: &str,
    mut after: EntryId,
) -> redis::RedisResult<Vec<(EntryId, Vec<u8>)>> {
    const PAGE: usize = 1000;
    let mut out = Vec::new();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(journal)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn.clone())
            .await?;
        let n = page.ids.len();
        for entry in page.ids {
            let Some(id) = EntryId::parse(&entry.id) else { continue };
            if let Some(redis::Value::BulkString(bytes)) = entry.map.get("m") {
                out.push((id, bytes.clone()));
            }
            after = id;
        }
        if n < PAGE {
            return Ok(out);
        }
    }
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
