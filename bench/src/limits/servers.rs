//! The servers a `bench limits` run uses and the scratch data it leaves on them: which processes
//! serve them (their CPU counts), how they keep what they are given (the figures depend on it), and
//! the [`Lease`] that removes the scratch data and stops private servers — also when the run fails
//! or is interrupted halfway.

use im_harness::env::remove_data;
use im_harness::servers::{EnsuredServers, PrivateServer};

use super::Scratch;
use crate::compare::with_database;
use crate::spec::server_processes;

/// How each server keeps what it is given (`appendfsync`, `innodb_flush_log_at_trx_commit`), with
/// its URL and whether it is private: the figures depend on it.
pub(super) async fn server_notes(lease: &Lease) -> (String, String) {
    let private =
        |kind: &str| if lease.servers.private.iter().any(|s| s.kind_name == kind) { "private" } else { "shared" };
    let appendfsync = async {
        let mut conn = redis::Client::open(lease.scratch.redis_url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let (aof, fsync): ((String, String), (String, String)) = redis::pipe()
            .cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(if aof.1 == "yes" { format!("AOF, appendfsync {}", fsync.1) } else { "no AOF".to_owned() })
    };
    let flush = async {
        use mysql_async::prelude::Queryable;
        let opts = mysql_async::Opts::from_url(&lease.servers.mysql_url).ok()?;
        let mut conn = mysql_async::Conn::new(opts).await.ok()?;
        let flush: Option<u32> = conn.query_first("SELECT @@innodb_flush_log_at_trx_commit").await.ok()?;
        let _ = conn.disconnect().await;
        flush.map(|f| format!("innodb_flush_log_at_trx_commit={f}"))
    };
    let (appendfsync, flush) = tokio::join!(appendfsync, flush);
    let unknown = || "persistence unknown".to_owned();
    (
        format!("{} ({}, {})", lease.scratch.redis_url, private("redis"), appendfsync.unwrap_or_else(unknown)),
        format!("{} ({}, {})", lease.servers.mysql_url, private("mariadb"), flush.unwrap_or_else(unknown)),
    )
}

/// The servers of a run and the scratch data on them. [`Lease::release`] removes the scratch data
/// and stops the private servers; dropped without that (an error or Ctrl-C halfway), it does the
/// same in a hurry: scratch data removed on a thread of its own, private servers killed.
pub(super) struct Lease {
    pub(super) servers: EnsuredServers,
    pub(super) scratch: Scratch,
    armed: bool,
}

impl Lease {
    /// Scratch space under `<prefix>:bench:limits_<tag>` and database `imbench_limits_<tag>`.
    pub(super) fn new(servers: EnsuredServers, prefix: &str, tag: &str) -> Lease {
        let private = &servers.private;
        let scratch = Scratch {
            redis_processes: server_processes(private, "redis", &servers.redis_url, 6379, &["redis-server"]),
            mysql_processes: server_processes(private, "mariadb", &servers.mysql_url, 3306, &["mariadbd", "mysqld"]),
            redis_url: servers.redis_url.clone(),
            mysql_url: with_database(&servers.mysql_url, &format!("imbench_limits_{tag}")),
            key_prefix: format!("{prefix}:bench:limits_{tag}"),
        };
        Lease { servers, scratch, armed: true }
    }

    pub(super) async fn release(mut self) {
        self.armed = false;
        let s = &self.scratch;
        remove_data(&s.redis_url, &s.mysql_url, &s.key_prefix).await;
        if let Err(e) = self.servers.stop_private().await {
            eprintln!("could not stop the private servers: {e}");
        }
        for server in &self.servers.private {
            let _ = std::fs::remove_dir_all(server.dir.join("data"));
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Drop runs inside the runtime, which cannot be blocked on; a thread with a runtime of its
        // own can.
        let Scratch { redis_url, mysql_url, key_prefix, .. } = self.scratch.clone();
        let cleanup = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                runtime.block_on(remove_data(&redis_url, &mysql_url, &key_prefix));
            }
        });
        let _ = cleanup.join();
        self.servers.private.iter().for_each(PrivateServer::kill);
    }
}
