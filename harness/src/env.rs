//! Test isolation against the real servers: every test gets its own database and key prefix, so tests
//! run in parallel and twice in a row, and whatever a test wrote is gone when its [`TestEnv`] is
//! dropped — also when the test panics.
//!
//! Server URLs come from `IM_TEST_REDIS_URL` and `IM_TEST_MYSQL_URL` (server URL without database),
//! which the test command sets after making sure the servers answer (starting private ones when
//! needed); the defaults are the local standard ports. A test on a Redis Cluster
//! ([`TestEnv::on_redis_cluster`]) gets the cluster `IM_TEST_REDIS_CLUSTER_URLS` names (the test
//! command sets it), else a private one the tests share (`shared_cluster`); its keys are removed
//! from every master.

mod shared_cluster;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use im_common::config::Config;
use im_common::keys::Keys;

use crate::servers::{cluster_masters, node_connection, ServerError};

pub use shared_cluster::{
    cluster_urls_from_env, shared_cluster_dir, test_cluster_urls, CLUSTER_URLS_VAR, SHARED_CLUSTER_MASTERS,
};

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
/// Keys each `SCAN` call looks at.
const SCAN_COUNT: usize = 10_000;

/// Redis and MySQL coordinates private to one test; its data is removed on drop.
#[derive(Debug)]
pub struct TestEnv {
    /// The test's Redis; on a Redis Cluster, its first node (for tools that need one node).
    pub redis_url: String,
    /// The Redis Cluster's node URLs when the test runs on one ([`TestEnv::on_redis_cluster`]);
    /// empty on one Redis server.
    pub redis_cluster_urls: Vec<String>,
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
            redis_cluster_urls: Vec::new(),
            mysql_url: format!("{}/imt_{tag}", server.trim_end_matches('/')),
            key_prefix: format!("imt:{tag}"),
            cleaned: AtomicBool::new(false),
        }
    }

    /// As [`TestEnv::new`], on the tests' Redis Cluster: the one `IM_TEST_REDIS_CLUSTER_URLS` names
    /// (comma-separated node URLs), else a private cluster of three masters that the tests share,
    /// started by the first test that asks and reused by the rest (see `shared_cluster`). Fails when
    /// that cluster can be neither found nor started.
    pub async fn on_redis_cluster(name: &str) -> Result<TestEnv, ServerError> {
        let urls = test_cluster_urls().await?;
        let mut env = TestEnv::new(name);
        if let Some(first) = urls.first() {
            env.redis_url = first.clone();
        }
        env.redis_cluster_urls = urls;
        Ok(env)
    }

    /// A config pointing at this environment (other keys default).
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.redis.url = self.redis_url.clone();
        cfg.redis.cluster_urls = self.redis_cluster_urls.clone();
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

    /// The key layout of a cluster of `shards` shards in this environment: on a Redis Cluster the
    /// shards' hash tags depend on the shard count, so a test whose cluster has other than the
    /// default count needs this rather than [`TestEnv::keys`].
    pub fn keys_for_shards(&self, shards: u16) -> Keys {
        let mut cfg = self.config();
        cfg.cluster.shards = shards;
        Keys::from_config(&cfg)
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
/// [`Keys`] layout). When `redis_url` is a Redis Cluster node, the keys are deleted on every master
/// of its cluster. Best effort and bounded in time: a server that is gone (a test stopped it) leaves
/// nothing to clean.
pub async fn remove_data(redis_url: &str, mysql_url: &str, key_prefix: &str) {
    let work = async {
        let _ = im_common::store::drop_database(mysql_url).await;
        let pattern = format!("{key_prefix}:*");
        for node in key_holders(redis_url).await {
            delete_matching(&node, &pattern).await;
        }
    };
    if tokio::time::timeout(CLEANUP_TIMEOUT, work).await.is_err() {
        eprintln!("cleanup of {key_prefix} did not finish within {CLEANUP_TIMEOUT:?}");
    }
}

/// The servers that hold keys: every master of the cluster when `redis_url` is a Redis Cluster node
/// (a standalone server refuses `CLUSTER SLOTS`), else that server.
async fn key_holders(redis_url: &str) -> Vec<String> {
    match cluster_masters(redis_url).await {
        Ok(masters) if !masters.is_empty() => masters,
        _ => vec![redis_url.to_owned()],
    }
}

/// The keys matching `pattern` on the server behind `conn`, by `SCAN`: never one `KEYS`, which
/// blocks the server for the whole keyspace (a shared server that holds a day of benchmark keys
/// took longer than a client's timeout).
pub async fn keys_matching(conn: &mut MultiplexedConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// Deletes the keys matching `pattern` on the one server at `url`. One `DEL` per key, pipelined:
/// keys of different slots cannot share a `DEL` on a cluster node, even when it holds them all.
async fn delete_matching(url: &str, pattern: &str) {
    let Ok(mut conn) = node_connection(url).await else { return };
    let found = keys_matching(&mut conn, pattern).await.unwrap_or_default();
    for chunk in found.chunks(DELETE_BATCH) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("DEL").arg(key).ignore();
        }
        let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
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
