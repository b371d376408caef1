//! A private Redis: AOF on (`appendfsync` as asked, `always` for clusters), no RDB snapshots, bound
//! to 127.0.0.1, data and log in its own directory.

use std::path::Path;

use super::install::require_binary;
use super::{prepare_dir, Launch, PrivateServer, ServerError, ServerKind};

/// A fresh Redis (or one replaying its AOF) must answer PING within this.
const REDIS_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The fsync policies Redis knows.
const APPENDFSYNC_POLICIES: [&str; 3] = ["always", "everysec", "no"];

impl PrivateServer {
    /// Starts a private Redis on `port` with its data in `dir` (created): AOF on with the given
    /// `appendfsync` policy (`always` | `everysec` | `no`), no RDB snapshots, bound to 127.0.0.1,
    /// logging to `dir/redis.log`. Returns once it answers PING (AOF replayed).
    pub async fn start_redis(dir: &Path, port: u16, appendfsync: &str) -> Result<PrivateServer, ServerError> {
        if !APPENDFSYNC_POLICIES.contains(&appendfsync) {
            return Err(ServerError::InvalidAppendfsync(appendfsync.to_string()));
        }
        let kind = ServerKind::Redis;
        let binary = require_binary(kind.server_binaries())?;
        let dir = prepare_dir(dir, kind, port)?;
        let args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            appendfsync.into(),
            // The AOF is the durability story; RDB snapshots would only add fork pauses.
            "--save".into(),
            String::new(),
            "--daemonize".into(),
            "no".into(),
            // Empty logfile = stdout, which spawn_detached sends to redis.log.
            "--logfile".into(),
            String::new(),
        ];
        let launch = Launch { kind, binary, args, url: format!("redis://127.0.0.1:{port}"), port, dir };
        launch.run(Some(appendfsync.into()), REDIS_READY_TIMEOUT).await
    }
}
