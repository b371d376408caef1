//! Test isolation against the real servers: every test gets its own database and key prefix, so tests
//! run in parallel and twice in a row. Server URLs come from `IM_TEST_REDIS_URL` and
//! `IM_TEST_MYSQL_URL` (server URL without database), which the test command sets after making sure
//! the servers answer (starting private ones when needed); the defaults are the local standard ports.

use crate::config::Config;

/// Redis and MySQL coordinates private to one test.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub redis_url: String,
    /// Includes the test's own database name.
    pub mysql_url: String,
    pub key_prefix: String,
}

impl TestEnv {
    /// A fresh, unique database name and key prefix; nothing is created yet.
    pub fn new(name: &str) -> TestEnv {
        let redis_url = std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let server = std::env::var("IM_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/".into());
        let tag = format!("{}_{}_{:06x}", name, std::process::id(), rand::random::<u32>() & 0xff_ffff);
        TestEnv {
            redis_url,
            mysql_url: format!("{}/imt_{tag}", server.trim_end_matches('/')),
            key_prefix: format!("imt:{tag}"),
        }
    }

    /// A config pointing at this environment (other keys default).
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.redis.url = self.redis_url.clone();
        cfg.redis.key_prefix = self.key_prefix.clone();
        cfg.mysql.url = self.mysql_url.clone();
        cfg.auth.jwt_secret = "test-secret-0123456789-0123456789".into();
        // Tests count answers exactly on a shared, busy machine: no load shedding.
        cfg.gateway.shed_append_ms = 0;
        cfg
    }

    /// Drops the database and deletes every key under the prefix.
    pub async fn cleanup(&self) {
        let _ = crate::store::drop_database(&self.mysql_url).await;
        if let Ok(mut conn) = crate::connections::connect(&self.redis_url).await {
            let pattern = format!("{}:*", self.key_prefix);
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        }
    }
}
