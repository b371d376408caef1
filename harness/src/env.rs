//! Test isolation against the real servers: every test gets its own database and key prefix, so tests
//! run in parallel and twice in a row, and whatever a test wrote is gone when its [`TestEnv`] is
//! dropped — also when the test panics.
//!
//! Server URLs come from `IM_TEST_REDIS_URL` and `IM_TEST_MYSQL_URL` (server URL without database),
//! which the test command sets after making sure the servers answer (starting private ones when
//! needed); the defaults are the local standard ports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use im_common::config::Config;
use im_common::keys::Keys;

/// Where the tests' Redis is, unless `IM_TEST_REDIS_URL` says otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Where the tests' MySQL server is, unless `IM_TEST_MYSQL_URL` says otherwise.
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/";
/// The secret test clusters sign tokens with.
pub const TEST_JWT_SECRET: &str = "test-secret-0123456789-0123456789";
/// Longest a cleanup may take (servers that do not answer are not waited for beyond this).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys deleted per `DEL`.
const DELETE_BATCH: usize = 500;

/// Redis and MySQL coordinates private to one test; its data is removed on drop.
#[derive(Debug)]
pub struct TestEnv {
    pub redis_url: String,
    /// Includes the test's own database name.
    pub mysql_url: String,
    pub key_prefix: String,
    cleaned: AtomicBool,
}

impl TestEnv {
    /// A fresh, unique database name and key prefix; nothing is created yet.
    pub fn new(name: &str) -> TestEnv {
        let redis_url = std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into());
        let server = std::env::var("IM_TEST_MYSQL_URL").unwrap_or_else(|_| DEFAULT_MYSQL_URL.into());
        let tag = format!("{}_{}_{:06x}", name, std::process::id(), rand::random::<u32>() & 0xff_ffff);
        TestEnv {
            redis_url,
            mysql_url: format!("{}/imt_{tag}", server.trim_end_matches('/')),
            key_prefix: format!("imt:{tag}"),
            cleaned: AtomicBool::new(false),
        }
    }

    /// A config pointing at this environment (other keys default).
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.redis.url = self.redis_url.clone();
        cfg.redis.key_prefix = self.key_prefix.clone();
        cfg.mysql.url = self.mysql_url.clone();
        cfg.auth.jwt_secret = TEST_JWT_SECRET.into();
        // Tests count answers exactly on a shared, busy machine: no load shedding.
        cfg.gateway.shed_append_ms = 0;
        cfg
    }

    /// The key layout of [`TestEnv::config`].
    pub fn keys(&self) -> Keys {
        Keys::from_config(&self.config())
    }

    /// Drops the database and deletes every key under the prefix (once; dropping does it otherwise).
    pub async fn cleanup(&self) {
        if !self.cleaned.swap(true, Ordering::SeqCst) {
            remove_data(&self.redis_url, &self.mysql_url, self.keys().prefix()).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        // Drop may run inside a runtime (a test's own), which cannot be blocked on; a thread with a
        // runtime of its own can, and the test waits for it so nothing outlives the test.
        let (redis_url, mysql_url, prefix) = (self.redis_url.clone(), self.mysql_url.clone(), self.key_prefix.clone());
        let cleanup =
            std::thread::spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(remove_data(&redis_url, &mysql_url, &prefix)),
                Err(error) => eprintln!("test data under {prefix} left behind: {error}"),
            });
        let _ = cleanup.join();
    }
}

/// Drops the database of `mysql_url` and deletes every Redis key under `key_prefix` (the prefix of a
/// [`Keys`] layout). Best effort and bounded in time: a server that is gone (a test stopped it)
/// leaves nothing to clean.
pub async fn remove_data(redis_url: &str, mysql_url: &str, key_prefix: &str) {
    let work = async {
        let _ = im_common::store::drop_database(mysql_url).await;
        let Ok(client) = redis::Client::open(redis_url) else { return };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
        let pattern = format!("{key_prefix}:*");
        let found: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap_or_default();
        for chunk in found.chunks(DELETE_BATCH) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    };
    if tokio::time::timeout(CLEANUP_TIMEOUT, work).await.is_err() {
        eprintln!("cleanup of {key_prefix} did not finish within {CLEANUP_TIMEOUT:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_env_gets_its_own_database_and_prefix() {
        let (a, b) = (TestEnv::new("same"), TestEnv::new("same"));
        assert_ne!(a.key_prefix, b.key_prefix);
        assert_ne!(a.mysql_url, b.mysql_url);
        assert!(a.mysql_url.rsplit('/').next().is_some_and(|db| db.starts_with("imt_same_")));
        assert_eq!(a.keys().prefix(), a.key_prefix);
        a.config().validate().expect("a test's config passes validation (e.g. a 32-byte secret)");
        // Nothing was created, so nothing needs removing.
        a.cleaned.store(true, Ordering::SeqCst);
        b.cleaned.store(true, Ordering::SeqCst);
    }
}
