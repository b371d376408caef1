//! The engine on a real Redis Cluster of three masters (`redis.cluster_urls`): every mode end to end,
//! a shard owner killed, a gateway's subscriptions killed (journal replay), the whole cluster down
//! (fail-open), and a master's slots migrated to another while messages flow. Tests that only load
//! the cluster share the suite's (`TestEnv::on_redis_cluster`); tests that kill clients, stop nodes
//! or move slots start private ones, so they never disturb another test.

use std::process::Command;
use std::time::Duration;

use e2e::{check_rows, spec, wait_metric, Client, ClusterGuard, TestEnv, Traffic};
use im_common::config::{Config, Mode};
use im_common::keys::{slot_of, Keys};
use im_common::store::Store;
use im_harness::cluster::ClusterSpec;
use im_harness::poll;
use im_harness::process::{self, Signal};

/// How long a test waits for a condition the cluster should reach by itself.
const SETTLES_WITHIN: Duration = Duration::from_secs(30);

async fn shared_cluster_env(name: &str) -> TestEnv {
    TestEnv::on_redis_cluster(name).await.expect("the tests' Redis Cluster (started by the harness when missing)")
}

/// A spec on a private three-master cluster of its own.
fn private_cluster_spec(env: &TestEnv, mode: Mode, gateways: usize, shards: u16) -> ClusterSpec {
    let mut s = spec(env, mode, gateways, shards);
    s.config.redis.cluster_urls.clear();
    s.redis_cluster = Some(3);
    s
}

/// Ports of the private cluster's nodes.
fn node_ports(c: &ClusterGuard) -> Vec<u16> {
    c.state.redis_cluster.as_ref().expect("a private Redis Cluster").nodes.iter().map(|n| n.port).collect()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A master: node id, port, slot ranges.
type Master = (String, u16, Vec<(u16, u16)>);

/// Every master, from `CLUSTER NODES`.
fn masters(port: u16) -> Vec<Master> {
    redis_cli(port, &["cluster", "nodes"])
        .lines()
        .filter(|l| l.contains("master"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f[1].split(['@', ':']).nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            let ranges = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                })
                .collect();
            (f[0].to_owned(), port, ranges)
        })
        .collect()
}

async fn every_message_once_on_a_cluster(mode: Mode, name: &str) {
    let env = shared_cluster_env(name).await;
    let c = e2e::cluster(&env, mode, 2, 3).await;
    let traffic =
        Traffic { pairs: 60, per_sender: 10, pace: Duration::from_millis(5), deadline: Duration::from_secs(40) };
    let v = traffic.run(&c.state).await.verdict;
    println!("{mode:?} on a Redis Cluster: {v:?}");
    assert_eq!((v.errored, v.saved, v.delivered, v.lost, v.reorders), (0, 600, 600, 0, 0), "{v:?}");
    assert_eq!(v.accepted, if mode == Mode::Baseline { 0 } else { 600 }, "{v:?}");
    assert_eq!(v.id_mismatches, 0, "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (600, 0, 0), "rows, duplicate rows, senders out of order");
    let holes = store
        .query_u64(
            "SELECT COUNT(*) FROM (SELECT from_user_id, to_user_id FROM messages GROUP BY from_user_id, to_user_id \
             HAVING MAX(seq) <> COUNT(*) OR MIN(seq) <> 1) d",
        )
        .await
        .unwrap();
    assert_eq!(holes, 0, "seqs are 1..n in every direction");
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mode_on_a_redis_cluster_saves_and_delivers_every_message_once() {
    every_message_once_on_a_cluster(Mode::Full, "rc_full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_only_mode_on_a_redis_cluster_saves_and_delivers_every_message_once() {
    every_message_once_on_a_cluster(Mode::AcceptedOnly, "rc_acc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_mode_on_a_redis_cluster_saves_and_delivers_every_message_once() {
    every_message_once_on_a_cluster(Mode::Baseline, "rc_base").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_killed_shard_owner_loses_nothing() {
    let env = shared_cluster_env("rc_kill").await;
    let mut s = spec(&env, Mode::Full, 2, 2);
    s.workers = 3; // one standby
    s.config.two_phase.lease_ttl_ms = 1500;
    s.config.two_phase.block_ms = s.config.two_phase.max_block_ms();
    let c = e2e::start(&s).await;
    let load =
        Traffic { pairs: 40, per_sender: 25, pace: Duration::from_millis(30), deadline: Duration::from_secs(40) };
    let state = c.state.clone();
    let traffic = tokio::spawn(async move { load.run(&state).await });
    e2e::until_appended(&c.state, 100.0, SETTLES_WITHIN).await;
    process::send(c.state.workers[0].pid, Signal::SIGKILL).unwrap();
    let v = traffic.await.unwrap().verdict;
    println!("worker kill on a Redis Cluster: {v:?}");
    assert_eq!((v.accepted, v.saved, v.delivered, v.lost, v.reorders, v.errored), (1000, 1000, 1000, 0, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (1000, 0, 0));
    store.close().await;
    let held =
        wait_metric(&c.state.workers[2].metrics_url, "im_worker_lease_held", &[("shard", "0")], |v| v == 1.0).await;
    assert_eq!(held, 1.0, "the standby took shard 0");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_gateway_whose_subscriptions_were_killed_replays_its_journals_in_order() {
    let env = TestEnv::new("rc_journal");
    let c = e2e::start(&private_cluster_spec(&env, Mode::Full, 2, 2)).await;
    let secret = c.state.jwt_secret.clone();
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, &secret, 6102).await;
    bob.synced().await;
    let mut alice = Client::connect(&c.state.gateways[1].ws_url, &secret, 6101).await;
    alice.ping().await;

    // Bob's gateway loses its sharded subscriptions on every master and cannot resubscribe (paused)
    // while Alice sends.
    let ports = node_ports(&c);
    let kill = async {
        ports
            .iter()
            .map(|&p| redis_cli(p, &["client", "kill", "type", "pubsub"]).trim().parse::<u64>().unwrap_or(0))
            .sum()
    };
    e2e::a_paused_gateway_replays_its_journals(&c.state, &mut alice, &mut bob, kill).await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_whole_redis_cluster_down_messages_fail_open_and_are_saved() {
    let env = TestEnv::new("rc_down");
    let mut s = private_cluster_spec(&env, Mode::Full, 1, 2);
    s.config.two_phase.fail_open = true;
    let c = e2e::start(&s).await;
    let (url, secret) = (c.state.gateways[0].ws_url.clone(), c.state.jwt_secret.clone());
    let mut bob = Client::connect(&url, &secret, 6502).await;
    bob.synced().await;
    let mut alice = Client::connect(&url, &secret, 6501).await;
    alice.chat(6502, "c0", "x").await;
    alice.ack("saved", "c0").await;

    c.state.redis_cluster.as_ref().unwrap().stop().await.unwrap();
    e2e::until_gateway_sees_redis_down(&c.state.gateways[0].metrics_url).await;
    for k in 1..6 {
        alice.chat(6502, &format!("c{k}"), "x").await;
        let answer = alice.ack("saved", &format!("c{k}")).await;
        assert!(answer["serverMsgId"].as_str().is_some_and(|id| !id.is_empty()), "{answer}");
    }
    let got: Vec<String> = bob
        .drain(Duration::from_secs(1))
        .await
        .iter()
        .filter(|v| v["type"] == "SINGLE_CHAT")
        .map(|v| v["clientMsgId"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(got, ["c0", "c1", "c2", "c3", "c4", "c5"], "pushed once each, in order");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (6, 0, 0));
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_loses_duplicates_and_reorders_nothing() {
    let env = TestEnv::new("rc_migrate");
    let c = e2e::start(&private_cluster_spec(&env, Mode::Full, 2, 2)).await;
    let ports = node_ports(&c);
    // The master that holds shard 0's keys gives all its slots to another master.
    let cfg = Config::load_with_env(Some(&c.state.config_path), Vec::<(String, String)>::new())
        .expect("the cluster's config");
    let shard0 = slot_of(Keys::from_config(&cfg).accepted_stream(0).as_bytes());
    let all = masters(ports[0]);
    let (from, _, ranges) = all
        .iter()
        .find(|(_, _, r)| r.iter().any(|&(a, b)| (a..=b).contains(&shard0)))
        .expect("shard 0's master")
        .clone();
    let (to, to_port, _) = all.iter().find(|(id, _, _)| *id != from).expect("another master").clone();
    let moving: u32 = ranges.iter().map(|&(a, b)| u32::from(b - a) + 1).sum();

    let load =
        Traffic { pairs: 20, per_sender: 150, pace: Duration::from_millis(100), deadline: Duration::from_secs(120) };
    let state = c.state.clone();
    let traffic = tokio::spawn(async move { load.run(&state).await });
    e2e::until_appended(&c.state, 100.0, SETTLES_WITHIN).await;
    let (from_id, to_id) = (from.clone(), to.clone());
    let appends = || async {
        let mut n = 0.0;
        for g in &c.state.gateways {
            n += e2e::metric(&g.metrics_url, "im_gateway_appends_total").await;
        }
        n
    };
    let (started, appended_before) = (std::time::Instant::now(), appends().await);
    let reshard = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{to_port}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id, "--cluster-slots", &moving.to_string()])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli --cluster reshard runs")
    });
    let out = reshard.await.unwrap();
    assert!(out.status.success(), "reshard failed: {}", String::from_utf8_lossy(&out.stderr));
    let appended_during = appends().await - appended_before;
    println!("{moving} slots moved in {:?} while {appended_during} messages were appended", started.elapsed());
    assert!(appended_during >= 100.0, "messages flowed during the migration ({appended_during})");
    let moved = poll::until_true(SETTLES_WITHIN, || {
        masters(to_port).iter().any(|(id, _, r)| *id == to && r.iter().any(|&(a, b)| (a..=b).contains(&shard0)))
    })
    .await;
    assert!(moved, "shard 0's slot now belongs to the other master");

    let v = traffic.await.unwrap().verdict;
    println!("slot migration under load: {v:?}");
    assert_eq!((v.accepted, v.saved, v.delivered, v.lost, v.reorders, v.errored), (3000, 3000, 3000, 0, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (3000, 0, 0), "rows, duplicate rows, senders out of order");
    store.close().await;
    drop(c);
}
