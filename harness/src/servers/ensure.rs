//! [`ensure_servers`]: the servers a cluster or a test run uses — the configured ones when they
//! answer, else private ones (installed first if needed), reused when one still runs in its directory.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    ensure_installed, free_port, mysql_reachable, mysql_server_url, redis_reachable, PrivateServer, ServerError,
    ServerKind, PRIVATE_REDIS_APPENDFSYNC,
};

/// The servers a cluster or test run uses, as found or started by [`ensure_servers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnsuredServers {
    /// Where Redis answers.
    pub redis_url: String,
    /// The MySQL server URL without a database, e.g. `mysql://root@127.0.0.1:3306/`.
    pub mysql_url: String,
    /// The private servers in use (empty when both configured servers answered).
    pub private: Vec<PrivateServer>,
}

impl EnsuredServers {
    /// Gracefully stops every private server; shared servers are never touched.
    pub async fn stop_private(&self) -> Result<(), ServerError> {
        for server in &self.private {
            server.stop().await?;
        }
        Ok(())
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
    let (redis_shared, mysql_shared) = if force_private {
        (false, false)
    } else {
        tokio::join!(redis_reachable(redis_url), mysql_reachable(mysql_url))
    };
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
    let redis_dir = dir.join("redis");
    let mysql_dir = dir.join("mariadb");
    let redis = async {
        if redis_shared {
            return Ok(None);
        }
        match PrivateServer::running_in(&redis_dir) {
            Some(running) => Ok(Some(running)),
            None => PrivateServer::start_redis(&redis_dir, redis_port, PRIVATE_REDIS_APPENDFSYNC).await.map(Some),
        }
    };
    let mysql = async {
        if mysql_shared {
            return Ok(None);
        }
        match PrivateServer::running_in(&mysql_dir) {
            Some(running) => Ok(Some(running)),
            None => PrivateServer::start_mariadb(&mysql_dir, mysql_port).await.map(Some),
        }
    };
    match tokio::join!(redis, mysql) {
        (Ok(redis), Ok(mysql)) => Ok(EnsuredServers {
            redis_url: redis.as_ref().map_or_else(|| redis_url.to_string(), |server| server.url.clone()),
            mysql_url: mysql.as_ref().map_or_else(|| mysql_server_url(mysql_url), |server| server.url.clone()),
            private: redis.into_iter().chain(mysql).collect(),
        }),
        (Err(error), other) | (other, Err(error)) => {
            // One side failed: do not leave the other one running unowned.
            if let Ok(Some(server)) = other {
                if let Err(stop_error) = server.stop().await {
                    warn!(error = %stop_error, pid = server.pid, "could not stop private server after a failed start");
                }
            }
            Err(error)
        }
    }
}
