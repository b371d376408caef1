//! A private Redis: AOF on (`appendfsync` as asked, `always` for clusters), no RDB snapshots, bound
//! to 127.0.0.1, data and log in its own directory — standalone, or as one node of a private Redis
//! Cluster ([`RedisOptions::cluster_bus_port`]; the cluster itself is `redis_cluster`).

use std::net::TcpListener;
use std::path::Path;

use super::install::require_binary;
use super::{prepare_dir, Launch, PrivateServer, ServerError, ServerKind};

/// A fresh Redis (or one replaying its AOF) must answer PING within this.
const REDIS_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The fsync policies Redis knows.
const APPENDFSYNC_POLICIES: [&str; 3] = ["always", "everysec", "no"];
/// How long a cluster node waits for an unreachable peer before it counts the peer as failed.
pub const CLUSTER_NODE_TIMEOUT_MS: u32 = 5000;
/// The cluster configuration a node keeps in its own directory (Redis writes it, never us).
const CLUSTER_CONFIG_FILE: &str = "nodes.conf";

/// How to start a private Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The AOF fsync policy: `always`, `everysec` or `no`.
    pub appendfsync: String,
    /// `Some(bus port)`: start a Redis Cluster node (`cluster-enabled yes`, its configuration in
    /// `nodes.conf` in its directory) whose cluster bus listens on this port. Chosen explicitly
    /// (`cluster-port`) rather than Redis's default of port + 10000, which overflows for the high
    /// ports the kernel hands out.
    pub cluster_bus_port: Option<u16>,
}

impl RedisOptions {
    /// A standalone server with this fsync policy.
    pub fn standalone(appendfsync: &str) -> RedisOptions {
        RedisOptions { appendfsync: appendfsync.into(), cluster_bus_port: None }
    }

    /// A Redis Cluster node with this fsync policy and cluster bus port.
    pub fn cluster_node(appendfsync: &str, bus_port: u16) -> RedisOptions {
        RedisOptions { appendfsync: appendfsync.into(), cluster_bus_port: Some(bus_port) }
    }

    /// The command-line arguments these options add to every server's.
    fn args(&self) -> Vec<String> {
        let mut args = vec!["--appendfsync".to_string(), self.appendfsync.clone()];
        if let Some(bus_port) = self.cluster_bus_port {
            let node_timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
            let bus_port = bus_port.to_string();
            let cluster = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                CLUSTER_CONFIG_FILE,
                "--cluster-node-timeout",
                node_timeout.as_str(),
                "--cluster-port",
                bus_port.as_str(),
            ];
            args.extend(cluster.map(String::from));
        }
        args
    }
}

impl PrivateServer {
    /// Starts a private Redis on `port` with its data in `dir` (created): AOF on with the given
    /// `appendfsync` policy (`always` | `everysec` | `no`), no RDB snapshots, bound to 127.0.0.1,
    /// logging to `dir/redis.log`. Returns once it answers PING (AOF replayed).
    pub async fn start_redis(dir: &Path, port: u16, appendfsync: &str) -> Result<PrivateServer, ServerError> {
        PrivateServer::start_redis_with(dir, port, &RedisOptions::standalone(appendfsync)).await
    }

    /// As [`start_redis`](Self::start_redis), with every option: also starts a Redis Cluster node
    /// (which answers PING before it is part of any cluster; `redis_cluster` joins the nodes).
    pub async fn start_redis_with(dir: &Path, port: u16, options: &RedisOptions) -> Result<PrivateServer, ServerError> {
        if !APPENDFSYNC_POLICIES.contains(&options.appendfsync.as_str()) {
            return Err(ServerError::InvalidAppendfsync(options.appendfsync.clone()));
        }
        let kind = ServerKind::Redis;
        let binary = require_binary(kind.server_binaries())?;
        let dir = prepare_dir(dir, kind, port)?;
        if let Some(bus_port) = options.cluster_bus_port {
            // As for the client port: a node that cannot bind its bus would still answer PING.
            TcpListener::bind(("127.0.0.1", bus_port))
                .map_err(|source| ServerError::PortInUse { port: bus_port, source })?;
        }
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--appendonly".into(),
            "yes".into(),
            // The AOF is the durability story; RDB snapshots would only add fork pauses.
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            // Empty logfile = stdout, which spawn_detached sends to redis.log.
            "--logfile".into(),
            String::new(),
        ];
        args.extend(options.args());
        let url = format!("redis://127.0.0.1:{port}");
        let launch = Launch { kind, binary, args, url, port, dir, cluster_bus_port: options.cluster_bus_port };
        launch.run(Some(options.appendfsync.clone()), REDIS_READY_TIMEOUT).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_gets_its_bus_port_and_config_file_and_a_standalone_server_none() {
        let node = RedisOptions::cluster_node("everysec", 41234).args().join(" ");
        assert!(node.starts_with("--appendfsync everysec --cluster-enabled yes"), "{node}");
        assert!(node.contains("--cluster-config-file nodes.conf") && node.ends_with("--cluster-port 41234"), "{node}");
        assert_eq!(RedisOptions::standalone("always").args(), ["--appendfsync", "always"]);
    }
}
