//! This node's presence in Redis: route entries for its users.
//!
//! Route entries are written when a user's first connection arrives and removed when the last one
//! leaves; a heartbeat refreshes all of them every third of `gateway.route_ttl_ms`, so the entries of
//! a gateway that died expire by themselves. Publishers read them through
//! [`im_common::router::Router`]; pushes then arrive on this node's [`crate::node_channel`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use im_common::connections::RedisConn;

use crate::framing::close_code;
use crate::sessions::Sessions;
use im_common::keys::Keys;

/// How long a user's presence epoch outlives their last connection (every route refresh renews it).
/// A message pushed longer ago than this and saved only now is pushed again if the user is online
/// (the counter starts again, elsewhere).
const PRESENCE_TTL_SECS: i64 = 7 * 24 * 3600;

/// Where a presence epoch that does not exist starts counting: far from any value counted up from
/// another start, and far below `INCR`'s limit (2^63).
const EPOCH_STARTS: std::ops::Range<u64> = 1 << 32..1 << 62;

/// Users registered per pipeline when refreshing all of them.
const REGISTER_CHUNK: usize = 1000;

/// Writes and refreshes this node's route entries.
#[derive(Clone)]
pub struct RouteKeeper {
    pub(crate) conn: RedisConn,
    pub(crate) keys: Keys,
    pub(crate) node: u16,
    pub(crate) ttl_ms: u64,
}

impl RouteKeeper {
    pub fn new(conn: RedisConn, keys: Keys, node: u16, ttl_ms: u64) -> Self {
        RouteKeeper { conn, keys, node, ttl_ms }
    }

    /// Adds this node to the routes of `users` (one pipeline); returns those whose route did not
    /// hold this node before — a first connection here, or a route Redis lost.
    pub async fn register(&self, users: &[u64]) -> redis::RedisResult<Vec<u64>> {
        let mut pipe = redis::pipe();
        for &uid in users {
            self.add_route(&mut pipe, uid);
        }
        let added: Vec<u32> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(users.iter().zip(added).filter(|&(_, added)| added > 0).map(|(&uid, _)| uid).collect())
    }

    /// A new connection of `uid`: for the user's first connection on this node adds the route, then
    /// raises the user's presence epoch (`Keys::presence`; the save stage pushes again what was
    /// pushed before it). Two round trips, the route first: a publisher that reads the raised epoch
    /// then finds the route too (it reads routes no earlier than epochs,
    /// [`im_common::route_cache`]) — on a cluster the two keys live on different nodes, so one
    /// pipeline would not order them.
    pub async fn connected(&self, uid: u64, first_here: bool) -> redis::RedisResult<()> {
        if first_here {
            self.register(&[uid]).await?;
        }
        self.raise_epochs(&[uid]).await
    }

    /// Raises the presence epochs of `users`, whose routes were just added (one pipeline).
    ///
    /// An epoch that does not exist starts at a random value, not at 0: one Redis lost (or that
    /// expired) and counts again must not come back to a value a publisher still holds with routes
    /// read before — that value would vouch for routes without this connection.
    async fn raise_epochs(&self, users: &[u64]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for &uid in users {
            let presence = self.keys.presence(uid);
            let start = rand::random_range(EPOCH_STARTS);
            pipe.cmd("SET").arg(&presence).arg(start).arg("NX").ignore();
            pipe.incr(&presence, 1).ignore().expire(&presence, PRESENCE_TTL_SECS).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    fn add_route(&self, pipe: &mut redis::Pipeline, uid: u64) {
        let now = im_common::ids::now_ms();
        let key = self.keys.route(uid);
        pipe.zadd(&key, self.node, now + self.ttl_ms);
        // Drop other nodes' expired entries and keep the key itself from outliving its entries.
        pipe.zrembyscore(&key, 0, now).ignore();
        pipe.pexpire(&key, self.ttl_ms as i64).ignore();
        // The epoch lives while a connection does: one that expired under a live connection would
        // count again from 1, and a read before and after could match across a new connection.
        pipe.expire(self.keys.presence(uid), PRESENCE_TTL_SECS).ignore();
    }

    /// The user's last connection here closed: removes this node from the user's route. A
    /// connection of the user that arrived meanwhile may have added the route before this removal
    /// ran, and lost it to it; without the route it would miss every push, and no epoch would move
    /// to have them pushed again. So if one is here once the removal is done, it is asked to
    /// reconnect (1012), which registers it again and resyncs it.
    pub async fn left(&self, uid: u64, sessions: &Sessions) -> redis::RedisResult<()> {
        let () =
            redis::cmd("ZREM").arg(self.keys.route(uid)).arg(self.node).query_async(&mut self.conn.clone()).await?;
        if sessions.holds(uid) {
            tracing::info!(uid, "a connection arrived while the route was removed; asking it to reconnect");
            metrics::counter!("im_gateway_route_removal_races_total").increment(1);
            sessions.close_user(uid, close_code::SERVICE_RESTART, "reconnect");
        }
        Ok(())
    }

    /// Refreshes every local user's route until the process ends.
    ///
    /// If the entries may have expired meanwhile — the process was stalled (a long pause, SIGSTOP)
    /// or Redis was unreachable for longer than `gateway.route_ttl_ms` since the last refresh that
    /// went through — publishers took this node's users for offline and published nothing for them.
    /// Nothing tells the node what it missed, so it closes every connection with 1012: clients
    /// reconnect and resync.
    pub async fn heartbeat(self, sessions: Arc<Sessions>) {
        let period = Duration::from_millis(self.ttl_ms / 3);
        let ttl = Duration::from_millis(self.ttl_ms);
        let mut refreshed_at = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            let sent = Instant::now();
            match self.refresh(&sessions).await {
                Ok(()) => {
                    if sent.duration_since(refreshed_at) >= ttl {
                        tracing::warn!(
                            since_last_refresh_ms = sent.duration_since(refreshed_at).as_millis() as u64,
                            "route entries may have expired (stall or Redis outage); asking clients to reconnect"
                        );
                        metrics::counter!("im_gateway_route_lapses_total").increment(1);
                        sessions.close_all(close_code::SERVICE_RESTART, "reconnect");
                    }
                    refreshed_at = sent;
                }
                Err(e) => tracing::warn!(error = %e, "route heartbeat failed"),
            }
        }
    }

    /// Refreshes every local user's route. A route that no longer held this node — Redis lost it
    /// (a restart without persistence, a failover to a replica that had not got it), or a removal
    /// undid it — is added again and its user's epoch raised after, as for a new connection:
    /// publishers may have read "no route" meanwhile and would keep it while the epoch stays
    /// ([`im_common::route_cache`]). Routes that were there leave epochs alone, so a refresh pushes
    /// nothing again. (A first connection whose own registration runs just after the refresh is
    /// counted too; its epoch is raised once more, which at worst pushes a message twice.)
    pub(crate) async fn refresh(&self, sessions: &Sessions) -> redis::RedisResult<()> {
        for chunk in sessions.users().chunks(REGISTER_CHUNK) {
            let restored = self.register(chunk).await?;
            if !restored.is_empty() {
                tracing::warn!(
                    users = restored.len(),
                    "routes were missing from Redis (lost, or a first connection registering); added again"
                );
                metrics::counter!("im_gateway_routes_restored_total").increment(restored.len() as u64);
                self.raise_epochs(&restored).await?;
            }
        }
        Ok(())
    }
}
