//! IDs never collide (SPEC §3.8) across gateway processes: a gateway holds a lease on its node id in
//! Redis, so a second live process configured with the same `gateway.node_id` refuses to start, a
//! gateway that lost its lease (paused past the TTL while another took it) stops, and a gateway
//! started after a clock step back issues ids above what its node id issued before.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e::{cluster, wait_metric, Client, ClusterGuard, TestEnv};
use im_common::config::Mode;
use im_common::ids::{now_ms, timestamp_ms};
use im_harness::cluster::{self as launcher, STOP_GRACE};
use im_harness::poll;
use im_harness::process::{self, Signal};
use im_harness::servers::{free_port, PrivateServer};

/// A gateway started by hand with the cluster's config (not registered in the cluster state), so a
/// test can watch it refuse to start; killed when dropped.
struct HandGateway {
    child: Child,
    ready: PathBuf,
    log: PathBuf,
}

impl HandGateway {
    fn start(c: &ClusterGuard, node: u16, name: &str) -> HandGateway {
        HandGateway::start_with(c, node, name, &[])
    }

    /// As [`HandGateway::start`], with environment overrides of the cluster's config.
    fn start_with(c: &ClusterGuard, node: u16, name: &str, overrides: &[(&str, &str)]) -> HandGateway {
        let binary = launcher::binary("gateway").expect("build the workspace first");
        let (ready, log) = (c.state.dir.join(format!("{name}.ready")), c.state.dir.join(format!("{name}.log")));
        let _ = std::fs::remove_file(&ready);
        let out = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(&binary);
        process::clear_config_overrides(&mut command);
        command.envs(overrides.iter().copied());
        let child = command
            .arg("--config")
            .arg(&c.state.config_path)
            .args(["--node-id", &node.to_string(), "--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("gateway starts");
        HandGateway { child, ready, log }
    }

    /// The address it listens on once it is up; `None` if it exited or `limit` passed first.
    async fn ready_within(&mut self, limit: Duration) -> Option<String> {
        let (ready, child) = (&self.ready, &mut self.child);
        let outcome = poll::until(limit, || {
            let addr = std::fs::read_to_string(ready)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| v["addr"].as_str().map(str::to_owned));
            let exited = child.try_wait().expect("try_wait").is_some();
            std::future::ready(match (addr, exited) {
                (Some(addr), _) => Some(Some(addr)),
                (None, true) => Some(None),
                (None, false) => None,
            })
        })
        .await;
        outcome.flatten()
    }

    /// Its exit status, if it exits within `limit`.
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        poll::until(limit, || std::future::ready(child.try_wait().expect("try_wait"))).await
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HandGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lease_key(env: &TestEnv, node: u16) -> String {
    env.keys().node_lease(node)
}

fn ws_url(addr: &str) -> String {
    format!("ws://{addr}/ws")
}

/// Sends one message through the gateway at `ws_url`; returns its serverMsgId.
async fn one_message(ws_url: &str, secret: &str, cmid: &str) -> u64 {
    let mut alice = Client::connect(ws_url, secret, 61_001).await;
    alice.chat(61_002, cmid, "hello").await;
    let saved = alice.ack("saved", cmid).await;
    saved["serverMsgId"].as_str().expect("serverMsgId").parse().expect("numeric id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_with_a_node_id_in_use_refuses_to_start_and_one_starts_once_the_holder_stops() {
    let env = TestEnv::new("nodeid_dup");
    let c = cluster(&env, Mode::Baseline, 1, 1).await;
    let first = c.state.gateways[0].clone();
    assert_eq!(first.node_id, 1);
    let key = lease_key(&env, 1);

    let mut second = HandGateway::start(&c, 1, "second");
    let status = second.exit_within(Duration::from_secs(15)).await;
    let text = second.output();
    let status = status.unwrap_or_else(|| panic!("a second gateway with node id 1 kept running; output: {text}"));
    assert!(!status.success(), "exit status {status}; output: {text}");
    assert!(text.contains("gateway.node_id"), "the error names the config key: {text}");
    assert!(text.contains(&key), "the error names the lease key {key}: {text}");
    assert!(process::is_alive(first.pid), "the first gateway keeps serving");

    // A clean stop releases the lease: a new gateway with that id starts at once.
    process::terminate(first.pid, STOP_GRACE).await;
    let mut third = HandGateway::start(&c, 1, "third");
    let started = Instant::now();
    let addr = third.ready_within(Duration::from_secs(15)).await;
    let text = third.output();
    let addr = addr.unwrap_or_else(|| panic!("a gateway with the released node id did not start: {text}"));
    assert!(started.elapsed() < Duration::from_secs(4), "it waited for a released lease: {:?}", started.elapsed());
    one_message(&ws_url(&addr), &c.state.jwt_secret, "after-release").await;
    drop(third);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_restarts_under_its_node_id_once_its_lease_expires() {
    let env = TestEnv::new("nodeid_kill");
    let c = cluster(&env, Mode::Baseline, 1, 1).await;
    let first = c.state.gateways[0].clone();
    let before = one_message(&first.ws_url, &c.state.jwt_secret, "a").await;
    process::send(first.pid, Signal::SIGKILL).unwrap();
    assert!(process::wait_gone(first.pid, Duration::from_secs(5)).await);

    let mut restarted = HandGateway::start(&c, 1, "restarted");
    let addr = restarted.ready_within(Duration::from_secs(20)).await;
    let text = restarted.output();
    let addr = addr.unwrap_or_else(|| panic!("the restarted gateway did not come up: {text}"));
    let after = one_message(&ws_url(&addr), &c.state.jwt_secret, "b").await;
    assert!(after > before, "ids keep increasing across the restart: {before} then {after}");
    drop(restarted);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_after_a_clock_step_back_issues_ids_above_what_its_node_id_issued_before() {
    let env = TestEnv::new("nodeid_clock");
    // What a gateway with node id 1 recorded before it stopped: ids issued up to an hour from now
    // (as if this machine's clock had since stepped back by an hour).
    let high_water = now_ms() + 3_600_000;
    let key = lease_key(&env, 1);
    let mut redis = e2e::redis(&env.redis_url).await;
    let _: () = redis::cmd("HSET").arg(&key).arg("ids_up_to_ms").arg(high_water).query_async(&mut redis).await.unwrap();

    let c = cluster(&env, Mode::Baseline, 1, 1).await;
    let g = c.state.gateways[0].clone();
    let id = one_message(&g.ws_url, &c.state.jwt_secret, "after-step-back").await;
    assert!(
        timestamp_ms(id) > high_water as i64,
        "id {id} was made at ms {}, not above the node's high-water mark {high_water}",
        timestamp_ms(id)
    );

    // A clean stop leaves the high-water mark behind, covering the id just issued.
    process::terminate(g.pid, STOP_GRACE).await;
    let stored: Option<u64> = redis::cmd("HGET").arg(&key).arg("ids_up_to_ms").query_async(&mut redis).await.unwrap();
    assert!(stored.is_some_and(|s| s as i64 >= timestamp_ms(id)), "stored {stored:?} below the id's ms");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_paused_while_another_takes_its_node_id_stops_when_it_resumes() {
    let env = TestEnv::new("nodeid_pause");
    let c = cluster(&env, Mode::Baseline, 1, 1).await;
    let paused = c.state.gateways[0].clone();
    process::send(paused.pid, Signal::SIGSTOP).unwrap();

    // Its lease expires while it is paused; a new process takes the node id.
    let mut successor = HandGateway::start(&c, 1, "successor");
    let addr = successor.ready_within(Duration::from_secs(20)).await;
    process::send(paused.pid, Signal::SIGCONT).unwrap();
    let text = successor.output();
    let addr = addr.unwrap_or_else(|| panic!("the successor did not take the expired node id: {text}"));

    let stopped = process::wait_gone(paused.pid, Duration::from_secs(10)).await;
    let log = std::fs::read_to_string(&paused.log).unwrap_or_default();
    assert!(stopped, "the paused gateway kept running under a node id another process holds; log: {log}");
    assert!(log.contains(&lease_key(&env, 1)), "its log names the lost lease: {log}");
    one_message(&ws_url(&addr), &c.state.jwt_secret, "successor-serves").await;
    drop(successor);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starts_while_redis_is_down_and_takes_its_node_lease_once_redis_answers() {
    let env = TestEnv::new("nodeid_noredis");
    let c = cluster(&env, Mode::Baseline, 1, 1).await;
    // A Redis of its own, not started yet: fail-open, the gateway must come up and serve baseline.
    let port = free_port();
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut gateway = HandGateway::start_with(&c, 2, "no-redis", &[("IM__REDIS__URL", &redis_url)]);
    let addr = gateway.ready_within(Duration::from_secs(15)).await;
    let text = gateway.output();
    let addr = addr.unwrap_or_else(|| panic!("a gateway must start while Redis is down: {text}"));
    assert!(text.contains("WITHOUT its lease"), "the risk is logged: {text}");
    let metrics_url = format!("http://{addr}/metrics");
    assert_eq!(wait_metric(&metrics_url, "im_gateway_node_lease_held", &[], |v| v == 0.0).await, 0.0);
    one_message(&ws_url(&addr), &c.state.jwt_secret, "while-redis-is-down").await;

    let redis = PrivateServer::start_redis(&c.state.dir.join("redis-late"), port, "everysec").await.unwrap();
    let held = wait_metric(&metrics_url, "im_gateway_node_lease_held", &[], |v| v == 1.0).await;
    let mut conn = e2e::redis(&redis_url).await;
    let owner: Option<String> =
        redis::cmd("HGET").arg(lease_key(&env, 2)).arg("owner").query_async(&mut conn).await.unwrap();
    redis.stop().await.unwrap();
    assert_eq!(held, 1.0, "the lease is taken once Redis answers: {}", gateway.output());
    assert!(owner.is_some(), "the lease key names its owner");
    drop(gateway);
    drop(c);
}
