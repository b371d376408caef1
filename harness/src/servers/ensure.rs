//! [`ensure_servers`]: the servers a cluster or a test run uses — the configured ones when they
//! answer, else private ones (installed first if needed), reused when one still runs in its directory.
//! Redis is one server, or a Redis Cluster ([`RedisWanted::Cluster`], [`ensure_servers_with`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::process;

use super::{
    ensure_installed, free_port, mysql_reachable, mysql_server_url, redis_cluster_ready, redis_reachable,
    with_port_retries, PrivateRedisCluster, PrivateServer, ServerError, ServerKind, PRIVATE_REDIS_APPENDFSYNC,
};

/// Which Redis a cluster or test run needs.
#[derive(Debug, Clone, Copy)]
pub enum RedisWanted<'a> {
    /// One server, the configured one at this URL when it answers.
    Single { url: &'a str },
    /// A Redis Cluster: the configured one (some of its masters' URLs) when it is healthy, else a
    /// private one of `masters` masters.
    Cluster { urls: &'a [String], masters: usize },
}

impl RedisWanted<'_> {
    /// Whether the configured Redis answers (a cluster: every URL reports `cluster_state:ok` and all
    /// slots are assigned).
    async fn answers(self) -> bool {
        match self {
            RedisWanted::Single { url } => redis_reachable(url).await,
            RedisWanted::Cluster { urls, .. } => redis_cluster_ready(urls).await.is_ok(),
        }
    }
}

/// The Redis Cluster a cluster or test run uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisClusterInUse {
    /// Its masters' `redis://host:port` URLs (what `redis.cluster_urls` takes).
    pub urls: Vec<String>,
    /// Its nodes when it is private (started for this cluster or test run, stopped with it); empty
    /// for a configured cluster, which is never touched.
    #[serde(default)]
    pub nodes: Vec<PrivateServer>,
}

impl From<PrivateRedisCluster> for RedisClusterInUse {
    fn from(private: PrivateRedisCluster) -> RedisClusterInUse {
        RedisClusterInUse { urls: private.urls, nodes: private.nodes }
    }
}

impl RedisClusterInUse {
    /// A configured cluster, which is never stopped.
    fn configured(urls: &[String]) -> RedisClusterInUse {
        RedisClusterInUse { urls: urls.to_vec(), nodes: Vec::new() }
    }

    /// Gracefully stops the private nodes (none for a configured cluster).
    pub async fn stop(&self) -> Result<(), ServerError> {
        for node in &self.nodes {
            node.stop().await?;
        }
        Ok(())
    }

    /// `kill -9` the private nodes; returns at once.
    pub fn kill(&self) {
        self.nodes.iter().for_each(PrivateServer::kill);
    }
}

/// The servers a cluster or test run uses, as found or started by [`ensure_servers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnsuredServers {
    /// Where Redis answers (on a Redis Cluster: its first master, for tools that need one node).
    pub redis_url: String,
    /// The MySQL server URL without a database, e.g. `mysql://root@127.0.0.1:3306/`.
    pub mysql_url: String,
    /// The private servers in use (empty when both configured servers answered); a private Redis
    /// Cluster's nodes are in [`redis_cluster`](Self::redis_cluster), not here.
    pub private: Vec<PrivateServer>,
    /// The Redis Cluster in use, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster: Option<RedisClusterInUse>,
}

impl EnsuredServers {
    /// Gracefully stops every private server and private Redis Cluster node; shared servers are never
    /// touched.
    pub async fn stop_private(&self) -> Result<(), ServerError> {
        for server in &self.private {
            server.stop().await?;
        }
        match &self.redis_cluster {
            Some(cluster) => cluster.stop().await,
            None => Ok(()),
        }
    }
}

/// The servers a cluster or test run uses: the configured ones when they answer (and `force_private`
/// is false), else private ones under `dir` (Redis in `dir/redis`, MariaDB in `dir/mariadb`) on free
/// ports, installing the packages first if needed. A private server that still runs in its directory
/// from an earlier call is reused rather than started twice. Private Redis uses
/// [`PRIVATE_REDIS_APPENDFSYNC`].
pub async fn ensure_servers(
    redis_url: &str,
    mysql_url: &str,
    dir: &Path,
    force_private: bool,
) -> Result<EnsuredServers, ServerError> {
    ensure_servers_with(RedisWanted::Single { url: redis_url }, mysql_url, dir, force_private).await
}

/// As [`ensure_servers`], for either kind of Redis: with [`RedisWanted::Cluster`], the configured
/// cluster when it is healthy, else a private one in `dir/redis-cluster` ([`PrivateRedisCluster`],
/// reused when one is healthy there), and no single Redis at all.
pub async fn ensure_servers_with(
    redis: RedisWanted<'_>,
    mysql_url: &str,
    dir: &Path,
    force_private: bool,
) -> Result<EnsuredServers, ServerError> {
    let (redis_shared, mysql_shared) =
        if force_private { (false, false) } else { tokio::join!(redis.answers(), mysql_reachable(mysql_url)) };
    // Installing is sequential: two apt-get runs at once would fight over the dpkg lock.
    for (needed, kind) in [(!redis_shared, ServerKind::Redis), (!mysql_shared, ServerKind::MariaDb)] {
        if needed {
            tokio::task::spawn_blocking(move || ensure_installed(kind)).await.map_err(|error| {
                ServerError::InstallFailed {
                    command: format!("ensure_installed({})", kind.name()),
                    status: "task failed".into(),
                    output_tail: error.to_string(),
                }
            })??;
        }
    }
    let redis_port = free_port();
    let mut mysql_port = free_port();
    while mysql_port == redis_port {
        mysql_port = free_port();
    }
    // Started here and up, while the other may still be starting: killed if the start is abandoned.
    let started = process::Unready::default();
    let mysql = async {
        if mysql_shared {
            return Ok(None);
        }
        let mysql_dir = dir.join("mariadb");
        match PrivateServer::running_in(&mysql_dir) {
            Some(running) => Ok(Some(running)),
            None => {
                let server =
                    with_port_retries(mysql_port, |port| PrivateServer::start_mariadb(&mysql_dir, port)).await?;
                started.add(server.pid);
                Ok(Some(server))
            }
        }
    };
    match tokio::join!(ensure_redis(redis, redis_shared, dir, redis_port, &started), mysql) {
        (Ok(redis), Ok(mysql)) => {
            started.ready();
            Ok(EnsuredServers {
                redis_url: redis.url,
                mysql_url: mysql.as_ref().map_or_else(|| mysql_server_url(mysql_url), |server| server.url.clone()),
                private: redis.private.into_iter().chain(mysql).collect(),
                redis_cluster: redis.cluster,
            })
        }
        (Err(error), Ok(mysql)) => {
            // One side failed: do not leave the other one running unowned.
            stop_after_failure(mysql.as_ref()).await;
            Err(error)
        }
        (Ok(redis), Err(error)) => {
            stop_after_failure(redis.private.as_ref()).await;
            if let Some(private) = redis.cluster.filter(|c| !c.nodes.is_empty()) {
                if let Err(stop_error) = private.stop().await {
                    warn!(error = %stop_error, "could not stop the private Redis Cluster after a failed start");
                }
            }
            Err(error)
        }
        (Err(error), Err(_)) => Err(error),
    }
}

/// The Redis side of [`ensure_servers_with`].
struct RedisFound {
    url: String,
    private: Option<PrivateServer>,
    cluster: Option<RedisClusterInUse>,
}

/// The Redis that answers (`shared`), else a private one in `dir/redis` on `port` (or still running
/// there; one started here joins `started`), else for a cluster a private one in `dir/redis-cluster`.
async fn ensure_redis(
    redis: RedisWanted<'_>,
    shared: bool,
    dir: &Path,
    port: u16,
    started: &process::Unready,
) -> Result<RedisFound, ServerError> {
    match (redis, shared) {
        (RedisWanted::Single { url }, true) => Ok(RedisFound { url: url.to_owned(), private: None, cluster: None }),
        (RedisWanted::Single { .. }, false) => {
            let redis_dir = dir.join("redis");
            let server = match PrivateServer::running_in(&redis_dir) {
                Some(running) => running,
                None => {
                    let start = |port| PrivateServer::start_redis(&redis_dir, port, PRIVATE_REDIS_APPENDFSYNC);
                    let server = with_port_retries(port, start).await?;
                    started.add(server.pid);
                    server
                }
            };
            Ok(RedisFound { url: server.url.clone(), private: Some(server), cluster: None })
        }
        (RedisWanted::Cluster { urls, masters }, shared) => {
            let cluster = cluster_in_use(urls, masters, shared, dir).await?;
            let url = cluster.urls.first().cloned().unwrap_or_default();
            Ok(RedisFound { url, private: None, cluster: Some(cluster) })
        }
    }
}

/// The configured cluster when it answers (`shared`), else a private one in `dir/redis-cluster`.
async fn cluster_in_use(
    urls: &[String],
    masters: usize,
    shared: bool,
    dir: &Path,
) -> Result<RedisClusterInUse, ServerError> {
    if shared {
        Ok(RedisClusterInUse::configured(urls))
    } else {
        Ok(PrivateRedisCluster::ensure(dir, masters).await?.into())
    }
}

/// A Redis Cluster alone (for `ops servers`, which ensures the other servers with
/// [`ensure_servers`]): the configured one (`urls`) when it is healthy and `force_private` is false,
/// else a private one of `masters` masters in `dir/redis-cluster`, reused when one is healthy there.
pub async fn ensure_redis_cluster(
    urls: &[String],
    masters: usize,
    dir: &Path,
    force_private: bool,
) -> Result<RedisClusterInUse, ServerError> {
    let shared = !force_private && redis_cluster_ready(urls).await.is_ok();
    cluster_in_use(urls, masters, shared, dir).await
}

async fn stop_after_failure(server: Option<&PrivateServer>) {
    if let Some(server) = server {
        if let Err(stop_error) = server.stop().await {
            warn!(error = %stop_error, pid = server.pid, "could not stop private server after a failed start");
        }
    }
}
