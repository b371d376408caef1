//! Dependency health for `/readyz`: a background probe pings Redis and MySQL once a second and keeps
//! the answers, so a readiness request never waits on a server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connections::RedisConn;

use crate::store::Store;

/// Whether the servers this process needs answered their last probe.
#[derive(Debug, Default)]
pub struct Dependencies {
    redis: AtomicBool,
    mysql: AtomicBool,
}

impl Dependencies {
    /// Starts probing; both count as down until their first answer.
    pub fn watch(redis: RedisConn, store: Store) -> Arc<Dependencies> {
        let deps = Arc::new(Dependencies::default());
        let probe = deps.clone();
        tokio::spawn(async move {
            loop {
                let ping = async { redis::cmd("PING").query_async::<String>(&mut redis.clone()).await.is_ok() };
                let (redis_ok, mysql_ok) = tokio::join!(ping, store.ping());
                probe.redis.store(redis_ok, Ordering::Relaxed);
                probe.mysql.store(mysql_ok, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        deps
    }

    /// Whether Redis answered its last probe.
    pub fn redis_up(&self) -> bool {
        self.redis.load(Ordering::Relaxed)
    }

    /// `Ok` when both answered, else which did not.
    pub fn check(&self) -> Result<(), String> {
        match (self.redis.load(Ordering::Relaxed), self.mysql.load(Ordering::Relaxed)) {
            (true, true) => Ok(()),
            (false, true) => Err("redis unreachable".into()),
            (true, false) => Err("mysql unreachable".into()),
            (false, false) => Err("redis and mysql unreachable".into()),
        }
    }
}
