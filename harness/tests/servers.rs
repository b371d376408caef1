//! The private-server launcher against real `redis-server` and `mariadbd` processes: they start when
//! nothing answers on the configured ports, keep their data across kill -9 and restart, stop for good,
//! and are not started at all when the shared servers answer (a machine without shared servers plays
//! them with a private pair of its own).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use im_harness::servers::{self, PrivateServer};
use im_harness::{poll, process};
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

/// How long killed servers get to go before their directory is removed.
const KILLED_WAIT: Duration = Duration::from_secs(5);

impl Drop for Scratch {
    fn drop(&mut self) {
        for server in &self.servers {
            server.kill();
        }
        let deadline = Instant::now() + KILLED_WAIT;
        while self.servers.iter().any(PrivateServer::is_running) && Instant::now() < deadline {
            std::thread::sleep(poll::FIRST_PAUSE);
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

/// A start abandoned midway — its future dropped, as a stop request drops it — while Redis is up
/// already and MariaDB still starts leaves neither running: the one that was up is not kept just
/// because it had got as far as recording itself.
#[tokio::test]
async fn servers_started_side_by_side_are_stopped_when_their_start_is_abandoned() {
    let scratch = Scratch::new("abandoned");
    let redis_url = format!("redis://127.0.0.1:{}", servers::free_port());
    let mysql_url = format!("mysql://root@127.0.0.1:{}/im_test", servers::free_port());
    let redis_dir = scratch.dir.join("redis");
    let start = servers::ensure_servers(&redis_url, &mysql_url, &scratch.dir, false);
    let redis_up = poll::until_true(Duration::from_secs(60), || PrivateServer::running_in(&redis_dir).is_some());
    tokio::select! {
        ensured = start => panic!("MariaDB was up before Redis was seen alone: {ensured:?}"),
        up = redis_up => assert!(up, "the private Redis never came up"),
    }
    let gone = poll::until_true(Duration::from_secs(10), || process::processes_in(&scratch.dir).is_empty()).await;
    let left = process::processes_in(&scratch.dir);
    left.iter().for_each(|&(pid, _)| process::kill_now(pid));
    assert!(gone, "servers of an abandoned start still run: {left:?}");
}

#[tokio::test]
async fn redis_restart_keeps_aof_data() {
    let mut scratch = Scratch::new("redis-restart");
    let dir = scratch.dir.join("redis");
    let redis =
        servers::with_port_retries(servers::free_port(), |port| PrivateServer::start_redis(&dir, port, "always"))
            .await
            .unwrap();
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
    let dir = scratch.dir.join("mariadb");
    let mariadb = servers::with_port_retries(servers::free_port(), |port| PrivateServer::start_mariadb(&dir, port))
        .await
        .unwrap();
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
    let redis =
        servers::with_port_retries(servers::free_port(), |port| PrivateServer::start_redis(&dir, port, "everysec"))
            .await
            .unwrap();
    scratch.track(&redis);

    let second = PrivateServer::start_redis(&dir, servers::free_port(), "everysec").await;
    assert!(matches!(second, Err(servers::ServerError::AlreadyRunning { pid, .. }) if pid == redis.pid), "{second:?}");
    assert_eq!(PrivateServer::running_in(&dir), Some(redis.clone()));

    redis.stop().await.unwrap();
    assert_eq!(PrivateServer::running_in(&dir), None);
}

/// The shared test servers (Redis URL, MySQL server URL) when they answer; otherwise a private pair
/// started under `scratch` to play them, so a machine without shared servers still runs the test.
async fn shared_or_stand_in(scratch: &mut Scratch) -> (String, String) {
    let redis_url = std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mysql_url = std::env::var("IM_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/".into());
    if servers::redis_reachable(&redis_url).await && servers::mysql_reachable(&mysql_url).await {
        return (redis_url, mysql_url);
    }
    eprintln!("no shared servers answer at {redis_url} / {mysql_url}: starting a private pair to play them");
    let stand_in = servers::ensure_servers(&redis_url, &mysql_url, &scratch.dir.join("stand-in"), true).await.unwrap();
    for server in &stand_in.private {
        scratch.track(server);
    }
    (stand_in.redis_url, stand_in.mysql_url)
}

#[tokio::test]
async fn shared_servers_are_used_when_they_answer() {
    let mut scratch = Scratch::new("shared");
    let (redis_url, mysql_server) = shared_or_stand_in(&mut scratch).await;
    let mysql_server = servers::mysql_server_url(&mysql_server);
    let mysql_url = format!("{mysql_server}whatever");
    let dir = scratch.dir.join("cluster");

    let ensured = servers::ensure_servers(&redis_url, &mysql_url, &dir, false).await.unwrap();

    assert!(ensured.private.is_empty(), "no private server expected: {ensured:?}");
    assert_eq!(ensured.redis_url, redis_url);
    assert_eq!(ensured.mysql_url, mysql_server);
    assert!(!dir.join("redis").exists() && !dir.join("mariadb").exists());
}
