//! The Redis Cluster the tests run on when `IM_TEST_REDIS_CLUSTER_URLS` names none: a private
//! cluster of three masters in one fixed directory per user ([`shared_cluster_dir`]), started by
//! whichever test asks first and reused by every later test — in this test binary, in the others
//! running next to it, and in the next test run — while it is healthy.
//!
//! [`PrivateRedisCluster::ensure`] holds an exclusive lock on the directory while it checks or
//! starts the cluster, so parallel test binaries neither race nor start two. Nothing stops the
//! cluster when the tests end (a test cannot know it is the last); `ops servers --dir <that
//! directory> --stop` does, and the test command brings its own cluster anyway (`ops/test.sh`).

use std::path::PathBuf;

use crate::servers::{PrivateRedisCluster, ServerError};

/// The variable that names the tests' Redis Cluster: its nodes' URLs, comma-separated.
pub const CLUSTER_URLS_VAR: &str = "IM_TEST_REDIS_CLUSTER_URLS";
/// Masters of the shared test cluster.
pub const SHARED_CLUSTER_MASTERS: usize = 3;

/// Where the shared test cluster lives: `<tmp>/im-test-redis-cluster-<uid>` (its nodes and state
/// file in the `redis-cluster` directory inside).
pub fn shared_cluster_dir() -> PathBuf {
    std::env::temp_dir().join(format!("im-test-redis-cluster-{}", nix::unistd::getuid()))
}

/// The URLs `IM_TEST_REDIS_CLUSTER_URLS` names, if it names any.
pub fn cluster_urls_from_env() -> Option<Vec<String>> {
    let value = std::env::var(CLUSTER_URLS_VAR).ok()?;
    let urls: Vec<String> = value.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
    (!urls.is_empty()).then_some(urls)
}

/// The tests' Redis Cluster: the one `IM_TEST_REDIS_CLUSTER_URLS` names, else the shared private one
/// (started, restarted or reused).
pub async fn test_cluster_urls() -> Result<Vec<String>, ServerError> {
    match cluster_urls_from_env() {
        Some(urls) => Ok(urls),
        None => Ok(PrivateRedisCluster::ensure(&shared_cluster_dir(), SHARED_CLUSTER_MASTERS).await?.urls),
    }
}
