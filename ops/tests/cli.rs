//! The `ops` binary as an operator uses it: `up` on a machine where nothing answers on the configured
//! ports — even with `IM__*` variables pointing at them — starts private Redis and MariaDB, says so,
//! and gives its processes the servers and shard count it chose; a refused second `up`; the dashboard
//! following a non-default state file; `chat`, `token`, `down`; `up --help`; a bad config; `servers
//! --redis-cluster` starting, reusing and stopping a private Redis Cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use im_harness::cluster::load_state;
use im_harness::servers::{free_port, PrivateRedisCluster};
use im_harness::{http, metrics, poll, process};

/// The secret the test's config gives the cluster.
const SECRET: &str = "cli-test-secret-0123456789-0123456789";
/// How long the gateway's per-shard backlog gauges take to appear (refreshed every 250 ms).
const GAUGE_WAIT: Duration = Duration::from_secs(5);

fn ops(config: &Path, args: &[&str]) -> Output {
    ops_command(config, args).output().expect("ops runs")
}

fn ops_command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ops"));
    cmd.arg("--config").arg(config).args(args);
    cmd
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A scratch directory removed at the end of the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("im-ops-{name}-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_dead_server_variables_starts_private_servers_that_every_process_uses() {
    let scratch = Scratch::new("cli");
    let config = scratch.0.join("im.toml");
    std::fs::write(&config, format!("[redis]\nkey_prefix = \"opscli\"\n[auth]\njwt_secret = \"{SECRET}\"\n")).unwrap();
    // Nothing answers there; the variables override the file, and would override the cluster's own
    // config file in its children too if they inherited them.
    let (dead_redis, dead_mysql) = (free_port(), free_port());
    let state_path = scratch.0.join("elsewhere").join("other.json");
    std::fs::create_dir_all(state_path.parent().unwrap()).unwrap();
    let state_arg = state_path.to_str().unwrap();

    let up = ops_command(&config, &["up", "--gateways", "1", "--shards", "1", "--mode", "full", "--state", state_arg])
        .env("IM__REDIS__URL", format!("redis://127.0.0.1:{dead_redis}"))
        .env("IM__MYSQL__URL", format!("mysql://root@127.0.0.1:{dead_mysql}/im"))
        .env("IM__CLUSTER__SHARDS", "3")
        .output()
        .expect("ops runs");
    assert!(up.status.success(), "ops up failed: {}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains("private redis ready") && stderr.contains("private mariadb ready"), "{stderr}");
    let state = load_state(&state_path).unwrap();
    assert_eq!(state.private_servers.len(), 2, "both servers were started privately");
    assert!(state.redis_url.contains("127.0.0.1") && !state.redis_url.ends_with(&format!(":{dead_redis}")));
    let gateway = &state.gateways[0];
    let readyz = gateway.metrics_url.replace("/metrics", "/readyz");
    assert_eq!(http::get(&readyz).await.map(|(s, _)| s).ok(), Some(200), "the gateway reached the servers");

    // The gateway runs with the one shard `--shards` asked for, not the variable's three.
    let gauges = || async {
        let samples = metrics::scrape(&gateway.metrics_url).await.unwrap_or_default();
        let shards: Vec<String> = samples
            .into_iter()
            .filter(|s| s.name == "im_gateway_shard_backlog")
            .filter_map(|s| s.labels.get("shard").cloned())
            .collect();
        (!shards.is_empty()).then_some(shards)
    };
    let shards = im_harness::poll::until(GAUGE_WAIT, gauges).await;
    assert_eq!(shards, Some(vec!["0".to_owned()]), "per-shard backlog gauges of the gateway");

    // The dashboard `up` started follows the state file it was given.
    let dashboard = state.dashboard.as_ref().expect("the dashboard started");
    let (status, body) = http::get(&format!("{}api/status", dashboard.url)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["shards"].as_array().map(Vec::len), Some(1), "{body}");

    let again = ops(&config, &["up", "--state", state_arg]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already running"), "{}", text(&again));

    let token = ops(&config, &["token", "--user", "42"]);
    let token = String::from_utf8(token.stdout).unwrap();
    assert_eq!(im_common::auth::verify_token(SECRET, token.trim()), Ok(42));

    // `ops chat` sends and prints the receipts; the recipient connecting later gets the message.
    let chat = ops(&config, &["chat", "--state", state_arg, "--user", "1001", "--to", "1002", "hello"]);
    assert!(chat.status.success(), "ops chat failed: {}", text(&chat));
    let said = String::from_utf8_lossy(&chat.stdout);
    assert!(said.contains(r#""ackType":"accepted""#) && said.contains(r#""ackType":"saved""#), "{said}");
    let heard = ops(&config, &["chat", "--state", state_arg, "--user", "1002", "--listen-secs", "2"]);
    let heard = String::from_utf8_lossy(&heard.stdout);
    assert!(heard.contains(r#""body":"hello""#) && heard.contains(r#""from":"1001""#), "{heard}");

    let down = ops(&config, &["down", "--state", state_arg]);
    assert!(down.status.success(), "ops down failed: {}", text(&down));
    let pids: Vec<u32> = state.process_pids().into_iter().chain(state.private_servers.iter().map(|s| s.pid)).collect();
    assert!(pids.iter().all(|&p| !process::is_alive(p)), "every process stopped");
}

#[test]
fn up_help_describes_every_flag() {
    let help = Command::new(env!("CARGO_BIN_EXE_ops")).args(["up", "--help"]).output().expect("ops runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for (flag, description) in [
        ("--gateways", "Gateway processes"),
        ("--shards", "Shards:"),
        ("--workers", "Shard-worker processes"),
        ("--mode", "Delivery mode"),
        ("--state", "State file"),
        ("--private", "private Redis/MariaDB"),
        ("--no-demo", "demo chat page"),
        ("--redis-cluster", "Redis Cluster of N masters"),
        ("--config", "Config file"),
    ] {
        assert!(help.contains(flag) && help.contains(description), "{flag}: {description}\n{help}");
    }
    for mode in ["baseline", "accepted-only", "full"] {
        assert!(help.contains(mode), "mode {mode}\n{help}");
    }
    assert!(help.contains("random loopback port") && help.contains("ops status"), "{help}");
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let scratch = Scratch::new("badcfg");
    let config = scratch.0.join("bad.toml");
    std::fs::write(&config, "[cluster]\nshards = 0\n").unwrap();
    let out = ops(&config, &["token", "--user", "1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cluster.shards"), "{}", text(&out));
    let out = ops(&config, &["token", "--user", "abc"]);
    assert!(!out.status.success());
}

/// `ops servers --redis-cluster 3` in `dir`, without a cluster named in the environment (the test
/// command names one; this test wants a private one of its own). Its `IM_TEST_REDIS_CLUSTER_URLS`.
fn servers_with_redis_cluster(config: &Path, dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    let mut cmd = ops_command(config, &["servers", "--dir", &dir, "--redis-cluster", "3"]);
    let out = cmd.env_remove("IM_TEST_REDIS_CLUSTER_URLS").output().expect("ops runs");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("IM_TEST_REDIS_CLUSTER_URLS="));
    line.unwrap_or_else(|| panic!("no cluster URLs: {}", text(&out))).split(',').map(String::from).collect()
}

/// Kills the private servers and Redis Cluster recorded in a directory, when a test fails halfway.
struct KillServersIn(PathBuf);

impl Drop for KillServersIn {
    fn drop(&mut self) {
        if let Some(cluster) = PrivateRedisCluster::recorded_in(&self.0) {
            cluster.kill();
        }
        for kind in ["redis", "mariadb"] {
            if let Some(server) = im_harness::servers::PrivateServer::running_in(&self.0.join(kind)) {
                server.kill();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_with_redis_cluster_prints_its_urls_reuses_it_and_stops_it() {
    let scratch = Scratch::new("servers-cluster");
    let config = scratch.0.join("im.toml");
    std::fs::write(&config, format!("[auth]\njwt_secret = \"{SECRET}\"\n")).unwrap();
    let dir = scratch.0.join("servers");
    let _kill = KillServersIn(dir.clone());

    let urls = servers_with_redis_cluster(&config, &dir);
    assert_eq!(urls.len(), 3, "{urls:?}");
    for url in &urls {
        let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await.unwrap();
        assert!(info.contains("cluster_state:ok"), "{url}: {info}");
    }
    assert_eq!(servers_with_redis_cluster(&config, &dir), urls, "the running cluster is reused");

    let out = ops(&config, &["servers", "--dir", &dir.to_string_lossy(), "--stop"]);
    assert!(out.status.success(), "{}", text(&out));
    let cluster = PrivateRedisCluster::recorded_in(&dir).expect("the cluster is recorded in its directory");
    assert_eq!(cluster.urls, urls);
    assert!(cluster.nodes.iter().all(|n| !n.is_running()), "every node stopped");
}

/// `ops drill` stopped by a signal takes its cluster down with it: SIGTERM (what `timeout`, `kill`
/// and a CI runner's cancel send) and SIGINT (Ctrl-C) alike. None of the drill's gateways, workers,
/// dashboard or private servers outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_stopped_by_a_signal_takes_its_cluster_down_with_it() {
    for signal in [process::Signal::SIGTERM, process::Signal::SIGINT] {
        let scratch = Scratch::new("drill-signal");
        let mut drill = start_drill(&scratch, std::process::Stdio::piped());
        let dir = scratch.0.clone();
        // Once it reports progress, the drill's cluster is up and under load. Its output is read to
        // the end, so the drill never blocks on a full pipe.
        let output = drill.stderr.take().expect("stderr");
        let (progress, reported) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut progress = Some(progress);
            for line in std::io::BufReader::new(output).lines().map_while(Result::ok) {
                if line.contains("measuring") {
                    progress.take().map(|p| p.send(()));
                }
            }
        });
        let started = tokio::time::timeout(Duration::from_secs(120), reported).await;
        assert!(matches!(started, Ok(Ok(()))), "the drill never reported progress: {:?}", process::processes_in(&dir));
        stop_drill_and_find_nothing_left(drill, signal, &dir).await;
    }
}

/// The same while the drill's cluster is still starting (its first gateway runs, the rest is not
/// ready yet): what was started so far is stopped too, not left running because the start never
/// finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_stopped_while_its_cluster_starts_leaves_nothing_running() {
    let scratch = Scratch::new("drill-signal-start");
    let drill = start_drill(&scratch, std::process::Stdio::null());
    let dir = scratch.0.clone();
    let starting = poll::until_true(Duration::from_secs(120), || {
        process::processes_in(&dir).iter().any(|(_, cmd)| cmd.contains("gateway"))
    })
    .await;
    assert!(starting, "no gateway of the drill's cluster ever ran: {:?}", process::processes_in(&dir));
    stop_drill_and_find_nothing_left(drill, process::Signal::SIGTERM, &dir).await;
}

/// `ops drill worker-kill` in `scratch`, its stderr to `stderr`.
fn start_drill(scratch: &Scratch, stderr: std::process::Stdio) -> std::process::Child {
    let config = scratch.0.join("im.toml");
    std::fs::write(&config, format!("[auth]\njwt_secret = \"{SECRET}\"\n")).unwrap();
    ops_command(&config, &["drill", "worker-kill"])
        .current_dir(&scratch.0)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("ops drill starts")
}

/// Sends `signal` to the drill, which must exit unsuccessfully, and then nothing may run in `dir`
/// (what does is killed, and the test fails).
async fn stop_drill_and_find_nothing_left(mut drill: std::process::Child, signal: process::Signal, dir: &Path) {
    process::send(drill.id(), signal).expect("signal");
    let exited = tokio::task::spawn_blocking(move || drill.wait()).await.unwrap().expect("wait");
    assert!(!exited.success(), "{signal:?}: a stopped drill reports success");
    let gone = poll::until_true(Duration::from_secs(15), || process::processes_in(dir).is_empty()).await;
    let left = process::processes_in(dir);
    left.iter().for_each(|(pid, _)| process::kill_now(*pid));
    assert!(gone, "{signal:?}: the drill's processes outlived it: {left:?}");
}
