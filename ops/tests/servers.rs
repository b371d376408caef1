//! The private-server launcher against real `redis-server` and `mariadbd` processes: they start when
//! nothing answers on the configured ports, keep their data across kill -9 and restart, stop for good,
//! and are not started at all when the shared servers answer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use im_ops::servers::{self, PrivateServer};
use mysql_async::prelude::Queryable;

/// A per-test directory that kills whatever servers the test registered and removes itself on drop,
/// so a failing assertion leaves no server or data behind.
struct Scratch {
    dir: PathBuf,
    servers: Vec<PrivateServer>,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("im-servers-{name}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir, servers: Vec::new() }
    }

    fn track(&mut self, server: &PrivateServer) {
        self.servers.push(server.clone());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for server in &self.servers {
            server.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.servers.iter().any(PrivateServer::is_running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test]
async fn private_servers_start_when_configured_ports_are_unused() {
    let mut scratch = Scratch::new("unused-ports");
    let redis_url = format!("redis://127.0.0.1:{}", servers::free_port());
    let mysql_url = format!("mysql://root@127.0.0.1:{}/im_test", servers::free_port());

    let started = Instant::now();
    let ensured = servers::ensure_servers(&redis_url, &mysql_url, &scratch.dir, false).await.unwrap();
    for server in &ensured.private {
        scratch.track(server);
    }
    eprintln!("private redis + mariadb ready in {:?}", started.elapsed());

    assert_eq!(ensured.private.len(), 2, "both servers should be private: {ensured:?}");
    let redis = ensured.private.iter().find(|server| server.kind_name == "redis").unwrap();
    let mariadb = ensured.private.iter().find(|server| server.kind_name == "mariadb").unwrap();
    assert_eq!(ensured.redis_url, redis.url);
    assert_eq!(ensured.mysql_url, mariadb.url);
    assert!(ensured.mysql_url.ends_with('/'), "server URL without database: {}", ensured.mysql_url);
    assert!(redis.dir.ends_with("redis") && mariadb.dir.ends_with("mariadb"));

    let mut conn = redis_connection(&ensured.redis_url).await;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    let entry_id: String =
        redis::cmd("XADD").arg("im:test").arg("*").arg("f").arg("v").query_async(&mut conn).await.unwrap();
    assert!(entry_id.contains('-'));
    let appendonly: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await.unwrap();
    assert_eq!(appendonly, ["appendonly", "yes"]);
    let appendfsync: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("appendfsync").query_async(&mut conn).await.unwrap();
    assert_eq!(appendfsync, ["appendfsync", servers::PRIVATE_REDIS_APPENDFSYNC]);
    let save: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await.unwrap();
    assert_eq!(save, ["save", ""], "no RDB snapshots");
    drop(conn);

    let mut admin = mysql_async::Conn::from_url(&ensured.mysql_url).await.unwrap();
    admin.query_drop("CREATE DATABASE servers_test").await.unwrap();
    admin.disconnect().await.unwrap();
    let mut db = mysql_async::Conn::from_url(format!("{}servers_test", ensured.mysql_url)).await.unwrap();
    db.query_drop("CREATE TABLE t (id BIGINT PRIMARY KEY, body VARCHAR(64)) ENGINE=InnoDB").await.unwrap();
    db.query_drop("INSERT INTO t VALUES (1, 'hello')").await.unwrap();
    let body: Option<String> = db.query_first("SELECT body FROM t WHERE id = 1").await.unwrap();
    assert_eq!(body.as_deref(), Some("hello"));
    db.disconnect().await.unwrap();

    ensured.stop_private().await.unwrap();
    for server in &ensured.private {
        assert!(!server.is_running(), "{} still running", server.kind_name);
        assert!(!process_exists(server.pid), "{} pid {} not reaped", server.kind_name, server.pid);
    }
    assert!(!servers::redis_reachable(&ensured.redis_url).await);
    assert!(!servers::mysql_reachable(&ensured.mysql_url).await);
}

#[tokio::test]
async fn redis_restart_keeps_aof_data() {
    let mut scratch = Scratch::new("redis-restart");
    let redis = PrivateServer::start_redis(&scratch.dir.join("redis"), servers::free_port(), "always").await.unwrap();
    scratch.track(&redis);

    let mut conn = redis_connection(&redis.url).await;
    let () = redis::cmd("SET").arg("accepted").arg("survives").query_async(&mut conn).await.unwrap();
    drop(conn);

    redis.kill();
    let restarted = redis.restart().await.unwrap();
    scratch.track(&restarted);
    assert_ne!(restarted.pid, redis.pid);
    assert_eq!((restarted.port, &restarted.url), (redis.port, &redis.url));
    assert!(!redis.is_running() && restarted.is_running());

    let mut conn = redis_connection(&restarted.url).await;
    let value: Option<String> = redis::cmd("GET").arg("accepted").query_async(&mut conn).await.unwrap();
    assert_eq!(value.as_deref(), Some("survives"));
    let appendfsync: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("appendfsync").query_async(&mut conn).await.unwrap();
    assert_eq!(appendfsync, ["appendfsync", "always"]);
    drop(conn);

    restarted.stop().await.unwrap();
    assert!(!process_exists(restarted.pid));
}

#[tokio::test]
async fn mariadb_restart_after_kill_keeps_rows_and_root_tcp_access() {
    let mut scratch = Scratch::new("mariadb-restart");
    let started = Instant::now();
    let mariadb = PrivateServer::start_mariadb(&scratch.dir.join("mariadb"), servers::free_port()).await.unwrap();
    eprintln!("fresh private mariadb (install-db + first start) ready in {:?}", started.elapsed());
    scratch.track(&mariadb);

    let mut conn = mysql_async::Conn::from_url(&mariadb.url).await.unwrap();
    conn.query_drop("CREATE DATABASE drill").await.unwrap();
    conn.query_drop("CREATE TABLE drill.t (id BIGINT PRIMARY KEY) ENGINE=InnoDB").await.unwrap();
    conn.query_drop("INSERT INTO drill.t VALUES (7)").await.unwrap();
    // Take away TCP root access: the restart has to restore it through the unix socket.
    conn.query_drop("DROP USER 'root'@'127.0.0.1'").await.unwrap();
    let tcp_roots: Option<i64> =
        conn.query_first("SELECT COUNT(*) FROM mysql.user WHERE user = 'root' AND host = '127.0.0.1'").await.unwrap();
    assert_eq!(tcp_roots, Some(0));
    conn.disconnect().await.unwrap();

    mariadb.kill();
    let started = Instant::now();
    let restarted = mariadb.restart().await.unwrap();
    eprintln!("private mariadb restarted after kill -9 in {:?}", started.elapsed());
    scratch.track(&restarted);
    assert_ne!(restarted.pid, mariadb.pid);

    // prefer_socket=false: the driver would otherwise switch to the unix socket as root@localhost.
    let mut conn = mysql_async::Conn::from_url(format!("{}?prefer_socket=false", restarted.url)).await.unwrap();
    let user: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(user.as_deref(), Some("root@127.0.0.1"));
    let id: Option<i64> = conn.query_first("SELECT id FROM drill.t").await.unwrap();
    assert_eq!(id, Some(7), "a committed row survives kill -9");
    conn.disconnect().await.unwrap();

    restarted.stop().await.unwrap();
    assert!(!process_exists(restarted.pid));
}

#[tokio::test]
async fn a_second_start_in_a_running_servers_directory_is_refused() {
    let mut scratch = Scratch::new("twice");
    let dir = scratch.dir.join("redis");
    let redis = PrivateServer::start_redis(&dir, servers::free_port(), "everysec").await.unwrap();
    scratch.track(&redis);

    let second = PrivateServer::start_redis(&dir, servers::free_port(), "everysec").await;
    assert!(matches!(second, Err(servers::ServerError::AlreadyRunning { pid, .. }) if pid == redis.pid), "{second:?}");
    assert_eq!(PrivateServer::running_in(&dir), Some(redis.clone()));

    redis.stop().await.unwrap();
    assert_eq!(PrivateServer::running_in(&dir), None);
}

#[tokio::test]
async fn shared_servers_are_used_when_they_answer() {
    let redis_url = "redis://127.0.0.1:6379";
    let mysql_url = "mysql://root@127.0.0.1:3306/whatever";
    assert!(
        servers::redis_reachable(redis_url).await && servers::mysql_reachable(mysql_url).await,
        "this test needs the shared Redis on 6379 and MariaDB on 3306"
    );
    let scratch = Scratch::new("shared");

    let ensured = servers::ensure_servers(redis_url, mysql_url, &scratch.dir, false).await.unwrap();

    assert!(ensured.private.is_empty(), "no private server expected: {ensured:?}");
    assert_eq!(ensured.redis_url, redis_url);
    assert_eq!(ensured.mysql_url, "mysql://root@127.0.0.1:3306/");
    assert!(!scratch.dir.join("redis").exists() && !scratch.dir.join("mariadb").exists());
}
