//! A gateway's claim on its node id: a lease in Redis, and the high-water mark of the ids issued under
//! that node id.
//!
//! A `serverMsgId` is unique because its 10-bit node id is (SPEC §3.8), and node ids come from config.
//! Two live gateways configured with the same `gateway.node_id` would issue colliding ids, and a
//! gateway restarted after its clock stepped back would reissue its own. The lease turns both into
//! something that cannot happen silently:
//!
//! - [`Keys::node_lease`] is a hash: `owner` (`<host>-<pid>-<nonce>`), `expires_ms` and
//!   `ids_up_to_ms`. Expiry is judged by Redis's clock (`TIME` inside the scripts), never by a
//!   gateway's — the clocks this guards against are the ones that step. The key itself has no TTL: the
//!   high-water mark must outlive the lease (a gateway killed with SIGKILL and restarted after a clock
//!   step back still sees it); there are at most [`MAX_NODES`](crate::ids::MAX_NODES) such keys.
//! - [`NodeLease::claim`] takes the lease when it is free or expired and seeds the id generator
//!   strictly above the `ids_up_to_ms` it finds (recording a reservation of its own at once, as a
//!   renewal does). While another owner holds it, the claim watches it: a renewal
//!   proves that owner alive and the claim is refused ([`NodeLeaseError::InUse`]); a lease that runs
//!   out unrenewed (a predecessor killed without releasing it) is taken. So a restart under the same
//!   node id waits at most one TTL, and a duplicate is refused within a third of one.
//! - [`NodeLease::hold`] renews every third of the TTL, each time recording
//!   `ids_up_to_ms = high-water + TTL`: a reservation covering every id this process can issue before
//!   its next renewal, so a successor that takes the lease after it ran out (at least one TTL after the
//!   last renewal) starts above everything issued. A renewal that finds another owner returns
//!   [`NodeLeaseError::Lost`]: the gateway must stop issuing ids under this node id (it exits).
//! - [`NodeLease::release`] (clean shutdown) ends the lease at once and records the exact high-water
//!   mark, so a restart neither waits nor starts in the future.
//!
//! Fail-open: a gateway must start while Redis is down (it serves baseline then). If the first claim
//! cannot reach Redis, the gateway starts under its configured node id without the lease (logged, and
//! `im_gateway_node_lease_held` is 0), and [`NodeLease::hold`] takes the lease as soon as Redis answers
//! — raising the generator's floor to what it finds — or stops the gateway if a live process holds it.
//! Until then, and while renewals fail, nothing in Redis guards the node id; the database's primary
//! key on the id is the backstop (a colliding id is dead-lettered and answered `save_failed`, never
//! acknowledged as saved).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connections::RedisConn;
use redis::Script;

use crate::backoff::Backoff;
use crate::ids::{now_ms, FloorOutOfRange, IdGenerator};
use crate::keys::Keys;

/// How long a node lease lasts unrenewed: how long a gateway restarted after SIGKILL waits for its
/// own node id, and how long a paused gateway keeps it.
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(5);

/// Redis server time in ms, for the scripts (effects replication makes `TIME` safe before writes).
const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS[1] lease; ARGV owner, ttl_ms, the caller's Unix ms. Takes a free or expired lease, reserving
/// ids up to one TTL past max(recorded mark, caller's clock), and returns the mark it found:
/// `{'taken', ids_up_to_ms}`; else `{'held', owner, expires_ms, remaining_ms}`.
const TAKE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms')) or 0
if owner and owner ~= ARGV[1] and expires > now then
  return {'held', owner, string.format('%.0f', expires), string.format('%.0f', expires - now)}
end
local found = redis.call('HGET', KEYS[1], 'ids_up_to_ms') or '0'
local reserved = math.max(tonumber(found) or 0, tonumber(ARGV[3])) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_ms', string.format('%.0f', now + tonumber(ARGV[2])),
  'ids_up_to_ms', string.format('%.0f', reserved))
return {'taken', found}
";

/// KEYS[1] lease; ARGV owner, ttl_ms, ids_up_to_ms. Extends our lease and raises the high-water mark;
/// returns nil, or the other owner that holds it now. A missing key (Redis lost its data) is ours to
/// take again: nobody else holds it.
const RENEW: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return owner end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_ms', string.format('%.0f', now + tonumber(ARGV[2])))
local stored = tonumber(redis.call('HGET', KEYS[1], 'ids_up_to_ms')) or 0
if tonumber(ARGV[3]) > stored then redis.call('HSET', KEYS[1], 'ids_up_to_ms', ARGV[3]) end
return false
";

/// KEYS[1] lease; ARGV owner, ids_up_to_ms. Ends our lease now, keeping the exact high-water mark.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'expires_ms', '0', 'ids_up_to_ms', ARGV[2])
return 1
";

/// Why a gateway may not issue ids under its node id.
#[derive(Debug, thiserror::Error)]
pub enum NodeLeaseError {
    /// Another live process holds the node id.
    #[error(
        "gateway.node_id = {node} is in use by another live process: the lease {key} is held by {owner} \
         (it renewed it while this process waited); give every gateway a distinct gateway.node_id"
    )]
    InUse { node: u16, key: String, owner: String },
    /// Another process took the node id while this one held it (paused or cut off past the TTL).
    #[error(
        "gateway.node_id = {node}: the lease {key} was taken by {owner} while this process held it \
         (paused or cut off from Redis for more than {ttl_ms} ms); stopping so no id is issued twice"
    )]
    Lost { node: u16, key: String, owner: String, ttl_ms: u64 },
    /// The recorded high-water mark cannot be started above.
    #[error("gateway.node_id = {node}: the lease {key} records {source}; inspect or delete the key")]
    HighWater { node: u16, key: String, source: FloorOutOfRange },
    /// Redis did not answer (only while claiming; holding retries).
    #[error("gateway.node_id = {node}: cannot reach Redis for the lease {key}: {source}")]
    Redis { node: u16, key: String, source: redis::RedisError },
}

/// One answer of the take script.
enum Take {
    Taken { ids_up_to_ms: u64 },
    Held { owner: String, expires_ms: u64, remaining: Duration },
}

/// This process's lease on its node id, and the id generator it guards.
pub struct NodeLease {
    node: u16,
    key: String,
    owner: String,
    ttl: Duration,
    conn: RedisConn,
    ids: Arc<IdGenerator>,
    /// False while the gateway runs without the lease (Redis was down when it started).
    held: AtomicBool,
}

impl NodeLease {
    /// Claims `node` for this process (see the module doc): the lease once it is free, `InUse` while a
    /// live process holds it. If Redis does not answer, returns a lease not yet held (fail-open) that
    /// [`hold`](Self::hold) takes later.
    pub async fn claim(conn: RedisConn, keys: &Keys, node: u16, ttl: Duration) -> Result<NodeLease, NodeLeaseError> {
        let lease = NodeLease {
            node,
            key: keys.node_lease(node),
            owner: owner_id(),
            ttl,
            conn,
            ids: Arc::new(IdGenerator::new(node)),
            held: AtomicBool::new(false),
        };
        set_held_gauge(false);
        match lease.take_when_free().await {
            Ok(()) => {}
            Err(NodeLeaseError::Redis { source, .. }) => tracing::warn!(
                node, key = %lease.key, error = %source,
                "Redis is unreachable: starting under the configured node id WITHOUT its lease (fail-open); \
                 it is taken as soon as Redis answers. Until then a second gateway with this node id, or a \
                 clock step back since the last run, is not detected"
            ),
            Err(e) => return Err(e),
        }
        Ok(lease)
    }

    /// The id generator, seeded above every id this node id issued before (when the lease is held).
    pub fn ids(&self) -> Arc<IdGenerator> {
        self.ids.clone()
    }

    /// Whether this process holds the lease.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Keeps the lease: takes it first if the claim could not (Redis was down), then renews every
    /// third of the TTL. Returns only when ids must stop under this node id: the lease is held by
    /// another live process, or was taken by one. Redis being away is not an error here: ids keep
    /// coming (fail-open) and renewal resumes when it answers.
    pub async fn hold(&self) -> NodeLeaseError {
        let mut retry = Backoff::new(Duration::from_millis(250), self.ttl / 3);
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if !self.is_held() {
                match self.take_when_free().await {
                    Ok(()) => {
                        tracing::info!(node = self.node, key = %self.key, "node lease taken: Redis answers again")
                    }
                    Err(NodeLeaseError::Redis { .. }) => {
                        retry.wait().await;
                        continue;
                    }
                    Err(e) => return e,
                }
            }
            tokio::time::sleep(self.ttl / 3).await;
            match self.renew().await {
                Ok(None) => {
                    if let Some(since) = unreachable_since.take() {
                        tracing::info!(node = self.node, after = ?since.elapsed(), "node lease renewed again");
                    }
                }
                Ok(Some(owner)) => {
                    self.held.store(false, Ordering::Relaxed);
                    set_held_gauge(false);
                    let ttl_ms = self.ttl.as_millis() as u64;
                    return NodeLeaseError::Lost { node: self.node, key: self.key.clone(), owner, ttl_ms };
                }
                Err(e) => {
                    if unreachable_since.is_none() {
                        unreachable_since = Some(Instant::now());
                        tracing::warn!(
                            node = self.node, key = %self.key, error = %e,
                            "cannot renew the node lease; ids keep coming under the node id (fail-open)"
                        );
                    }
                }
            }
        }
    }

    /// Ends the lease now (clean shutdown), recording the exact high-water mark, so the next gateway
    /// with this node id starts at once and above every id issued here.
    pub async fn release(&self) {
        if !self.is_held() {
            return;
        }
        let released: redis::RedisResult<i64> = Script::new(&format!("{NOW_MS}{RELEASE}"))
            .key(&self.key)
            .arg(&self.owner)
            .arg(self.ids.high_water_ms().max(now_ms()))
            .invoke_async(&mut self.conn.clone())
            .await;
        if let Err(e) = released {
            tracing::warn!(node = self.node, key = %self.key, error = %e, "node lease not released; it expires by itself");
        }
        self.held.store(false, Ordering::Relaxed);
        set_held_gauge(false);
    }

    /// Takes the lease, waiting while its holder might be dead: refused as soon as the holder renews
    /// (or another process takes it), taken once it runs out; waits at most a little over one TTL.
    async fn take_when_free(&self) -> Result<(), NodeLeaseError> {
        let deadline = Instant::now() + self.ttl + self.ttl / 2;
        let mut first_seen: Option<(String, u64)> = None;
        loop {
            match self.take().await? {
                Take::Taken { ids_up_to_ms } => {
                    self.ids.raise_floor(ids_up_to_ms).map_err(|source| NodeLeaseError::HighWater {
                        node: self.node,
                        key: self.key.clone(),
                        source,
                    })?;
                    if ids_up_to_ms > now_ms() {
                        tracing::warn!(
                            node = self.node,
                            ids_up_to_ms,
                            ahead_ms = ids_up_to_ms - now_ms(),
                            "this node id issued ids up to a time ahead of this clock (a clock step back?): \
                             new ids start above it"
                        );
                    }
                    self.held.store(true, Ordering::Relaxed);
                    set_held_gauge(true);
                    tracing::info!(node = self.node, key = %self.key, owner = %self.owner, ids_up_to_ms, "node lease taken");
                    return Ok(());
                }
                Take::Held { owner, expires_ms, remaining } => {
                    let in_use =
                        || NodeLeaseError::InUse { node: self.node, key: self.key.clone(), owner: owner.clone() };
                    match &first_seen {
                        None => {
                            tracing::info!(
                                node = self.node, key = %self.key, %owner, ?remaining,
                                "node id held by another process: waiting to see whether it is alive (it renews) \
                                 or its lease runs out (it was killed)"
                            );
                            first_seen = Some((owner.clone(), expires_ms));
                        }
                        Some(seen) if *seen != (owner.clone(), expires_ms) => return Err(in_use()),
                        Some(_) => {}
                    }
                    if Instant::now() >= deadline {
                        return Err(in_use());
                    }
                    tokio::time::sleep((remaining + Duration::from_millis(5)).min(Duration::from_millis(100))).await;
                }
            }
        }
    }

    async fn take(&self) -> Result<Take, NodeLeaseError> {
        let reply: Vec<String> = Script::new(&format!("{NOW_MS}{TAKE}"))
            .key(&self.key)
            .arg(&self.owner)
            .arg(self.ttl.as_millis() as u64)
            .arg(now_ms())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|source| NodeLeaseError::Redis { node: self.node, key: self.key.clone(), source })?;
        let number = |i: usize| reply.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(match reply.first().map(String::as_str) {
            Some("held") => Take::Held {
                owner: reply.get(1).cloned().unwrap_or_default(),
                expires_ms: number(2),
                remaining: Duration::from_millis(number(3)),
            },
            // A high-water mark that does not parse as a number counts as none: nothing to start above.
            _ => Take::Taken { ids_up_to_ms: number(1) },
        })
    }

    /// One renewal: `None` when extended, or the owner that holds the lease instead.
    async fn renew(&self) -> redis::RedisResult<Option<String>> {
        // A reservation: every id until the next renewal (within one TTL, or the lease runs out).
        let ids_up_to_ms = self.ids.high_water_ms().max(now_ms()) + self.ttl.as_millis() as u64;
        Script::new(&format!("{NOW_MS}{RENEW}"))
            .key(&self.key)
            .arg(&self.owner)
            .arg(self.ttl.as_millis() as u64)
            .arg(ids_up_to_ms)
            .invoke_async(&mut self.conn.clone())
            .await
    }
}

fn set_held_gauge(held: bool) {
    metrics::gauge!("im_gateway_node_lease_held").set(if held { 1.0 } else { 0.0 });
}

/// `<host>-<pid>-<nonce>`: unique even where pids repeat (containers).
fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}
