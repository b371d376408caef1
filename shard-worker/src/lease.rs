//! Shard ownership: a lease in Redis with a fencing token.
//!
//! `lease(k)` holds `<token>:<owner>` with a TTL; `token` comes from `INCR fence(k)`, so every new
//! owner has a larger token than all before it. The owner renews every third of the TTL. It stops
//! acting on the shard as soon as it cannot prove ownership: locally, once the last successful renewal
//! is older than the TTL minus a safety margin (so it stops before a standby can take over), and in
//! Redis, because every stream side effect runs in a script that first compares the lease value.
//! A clean shutdown deletes the lease so a standby takes over at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use im_common::connections::RedisConn;
use redis::Script;

use im_common::keys::Keys;

const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return token
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
";

/// A lease this process holds (or held) on one shard.
#[derive(Clone)]
pub struct ShardLease {
    pub shard: u16,
    pub token: u64,
    /// `<token>:<owner>`: what the lease key must hold for our side effects to apply.
    pub value: String,
    key: String,
    ttl: Duration,
    conn: RedisConn,
    /// When ownership ends unless renewed, as ms since `epoch`.
    valid_until_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl ShardLease {
    /// Tries to take `shard`'s lease for `owner`; `None` while someone else holds it.
    pub async fn acquire(
        conn: &RedisConn,
        keys: &Keys,
        shard: u16,
        owner: &str,
        ttl: Duration,
    ) -> redis::RedisResult<Option<ShardLease>> {
        let epoch = Instant::now();
        let token: Option<u64> = Script::new(ACQUIRE)
            .key(keys.lease(shard))
            .key(keys.fence(shard))
            .arg(owner)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn.clone())
            .await?;
        Ok(token.map(|token| {
            let lease = ShardLease {
                shard,
                token,
                value: format!("{token}:{owner}"),
                key: keys.lease(shard),
                ttl,
                conn: conn.clone(),
                valid_until_ms: Arc::new(AtomicU64::new(0)),
                epoch,
            };
            lease.extend_from(epoch);
            lease
        }))
    }

    fn extend_from(&self, renewed_at: Instant) {
        // Stop a fifth of the TTL early: clocks drift, and a standby must never overlap with us.
        let margin = self.ttl / im_common::config::LEASE_SAFETY_MARGIN_DIVISOR;
        let until = renewed_at.duration_since(self.epoch) + self.ttl - margin;
        self.valid_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether we may still act on the shard.
    pub fn is_valid(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.valid_until_ms.load(Ordering::Relaxed)
    }

    /// Renews once; false when the lease is no longer ours.
    pub async fn renew(&self) -> bool {
        let sent = Instant::now();
        let renewed: redis::RedisResult<i64> = Script::new(RENEW)
            .key(&self.key)
            .arg(&self.value)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await;
        match renewed {
            Ok(1) => {
                // Count from when we asked, not when the answer came: the TTL started no earlier.
                self.extend_from(sent);
                true
            }
            Ok(_) => {
                self.valid_until_ms.store(0, Ordering::Relaxed);
                false
            }
            // Redis unreachable: keep trying until the local deadline says we are no longer owner.
            Err(_) => self.is_valid(),
        }
    }

    /// Renews every third of the TTL until the lease is lost; then returns.
    pub async fn keep_alive(self) {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            if !self.renew().await {
                tracing::warn!(shard = self.shard, token = self.token, "shard lease lost");
                return;
            }
        }
    }

    /// Stops acting on the shard locally (stages finish the batch in hand and stop) while the lease
    /// key stays ours until [`release`](Self::release).
    pub fn retire(&self) {
        self.valid_until_ms.store(0, Ordering::Relaxed);
    }

    /// Gives the lease up (clean shutdown) so a standby can take over immediately.
    pub async fn release(&self) {
        self.retire();
        let _: redis::RedisResult<i64> =
            Script::new(RELEASE).key(&self.key).arg(&self.value).invoke_async(&mut self.conn.clone()).await;
    }
}
