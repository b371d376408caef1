//! Faults under load, with real processes: a shard owner killed with SIGKILL, MariaDB stopped, Redis
//! stopped, a row the database refuses forever, and a backlog past its bound. Tests that stop a
//! server start private ones (`force_private`), so shared servers and other tests are never touched.

use std::time::Duration;

use e2e::{check_rows, private_server, spec, wait_metric, Client, TestEnv, Traffic};
use im_common::backoff::Backoff;
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::poll;
use im_harness::process::{self, Signal};

/// A client's retries of a refused message: first pause, and the most it grows to.
const RETRY_FIRST: Duration = Duration::from_millis(300);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a test waits for a condition the cluster should reach by itself.
const SETTLES_WITHIN: Duration = Duration::from_secs(30);

/// Sends `signal` to a process this test started.
fn signal(pid: u32, signal: Signal) {
    process::send(pid, signal).expect("signal delivered");
}

/// Waits until the store holds at least `rows` messages (or [`SETTLES_WITHIN`] passes).
async fn wait_rows(store: &Store, rows: u64) {
    poll::until_true_async(SETTLES_WITHIN, || async {
        store.query_u64("SELECT COUNT(*) FROM messages").await.is_ok_and(|n| n >= rows)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_survive_worker_kill() {
    let env = TestEnv::new("kill");
    let mut s = spec(&env, Mode::Full, 2, 2);
    s.workers = 3; // one standby
    s.config.two_phase.lease_ttl_ms = 1500;
    s.config.two_phase.block_ms = s.config.two_phase.max_block_ms();
    let c = e2e::start(&s).await;
    let load =
        Traffic { pairs: 40, per_sender: 50, pace: Duration::from_millis(30), deadline: Duration::from_secs(40) };
    let state = c.state.clone();
    let traffic = tokio::spawn(async move { load.run(&state).await });
    // The kill lands while messages flow: once the first gateway has appended some.
    e2e::until_appended(&c.state, 100.0, SETTLES_WITHIN).await;
    signal(c.state.workers[0].pid, Signal::SIGKILL);
    let result = traffic.await.unwrap();
    let v = &result.verdict;
    println!("worker kill: {v:?}");
    assert_eq!((v.accepted, v.saved, v.delivered, v.lost, v.reorders, v.errored), (2000, 2000, 2000, 0, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (2000, 0, 0), "rows, duplicate rows, senders out of order");
    // The standby owns the victim's shard now.
    let held =
        wait_metric(&c.state.workers[2].metrics_url, "im_worker_lease_held", &[("shard", "0")], |v| v == 1.0).await;
    assert_eq!(held, 1.0, "the standby took shard 0");
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_outage_keeps_accepting_and_drains_after_restart() {
    let env = TestEnv::new("dbdown");
    let mut s = spec(&env, Mode::Full, 1, 2);
    s.force_private = true;
    s.config.gateway.rate_burst = 1000;
    let mut c = e2e::start(&s).await;
    let secret = c.state.jwt_secret.clone();
    let ws = c.state.gateways[0].ws_url.clone();
    let mut alice = Client::connect(&ws, &secret, 5001).await;
    let mut bob = Client::connect(&ws, &secret, 5002).await;

    let db = private_server(&c.state, "mariadb");
    c.state.private_servers[db].stop().await.unwrap();
    // Under load while the database is away: every message is still accepted at once.
    for k in 0..200 {
        alice.chat(5002, &format!("d{k:03}"), "while the db is down").await;
    }
    for k in 0..200 {
        let ack = tokio::time::timeout(Duration::from_secs(2), alice.ack("accepted", &format!("d{k:03}"))).await;
        assert!(ack.is_ok(), "ACK(accepted) d{k:03} while MariaDB is down");
    }
    // Full mode pushes before saving: Bob already has them.
    let pushes = bob.drain(Duration::from_millis(500)).await;
    assert_eq!(pushes.iter().filter(|v| v["type"] == "SINGLE_CHAT").count(), 200);
    // The backlog is visible in the workers' metrics and nothing is saved.
    // Sender 5001's shard is owned by one of the two workers.
    let mut backlog = 0.0;
    for w in &c.state.workers {
        backlog += wait_metric(&w.metrics_url, "im_stream_length", &[("stream", "to_save")], |v| v >= 200.0).await;
    }
    assert!(backlog >= 200.0, "to_save backlog {backlog} should hold the 200 unsaved messages");
    tokio::time::sleep(Duration::from_secs(8)).await; // at least 10 s down in all
    c.state.private_servers[db] = c.state.private_servers[db].restart().await.unwrap();

    let mut saved = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while saved < 200 && tokio::time::Instant::now() < deadline {
        if let Some(v) = alice.next_within(Duration::from_secs(1)).await {
            saved += usize::from(v["type"] == "ACK" && v["ackType"] == "saved");
        }
    }
    assert_eq!(saved, 200, "every sender gets ACK(saved) after the database returns");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (200, 0, 0));
    store.close().await;
    drop(c);
}

async fn redis_outage(fail_open: bool, name: &str) {
    let env = TestEnv::new(name);
    let mut s = spec(&env, Mode::Full, 1, 1);
    s.force_private = true;
    s.config.two_phase.fail_open = fail_open;
    let mut c = e2e::start(&s).await;
    let secret = c.state.jwt_secret.clone();
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &secret, 6001).await;
    let mut carol = Client::connect(&c.state.gateways[0].ws_url, &secret, 6003).await;
    for k in 0..20 {
        alice.chat(6002, &format!("before{k:02}"), "x").await;
    }
    let mut saved = 0;
    while saved < 20 {
        saved += usize::from(alice.next().await["ackType"] == "saved");
    }
    // Carol's message is stuck in the stream: the only worker is paused.
    let worker = c.state.workers[0].pid;
    signal(worker, Signal::SIGSTOP);
    carol.chat(6002, "stuck", "x").await;
    carol.ack("accepted", "stuck").await;
    let redis = private_server(&c.state, "redis");
    c.state.private_servers[redis].stop().await.unwrap();
    e2e::until_gateway_sees_redis_down(&c.state.gateways[0].metrics_url).await;
    let mut receipted = 21;
    for k in 0..10 {
        let cmid = format!("during{k:02}");
        alice.chat(6002, &cmid, "x").await;
        let answer = alice.expect("answer", |v| v["clientMsgId"] == cmid.as_str()).await;
        if fail_open {
            assert_eq!((answer["type"].as_str(), answer["ackType"].as_str()), (Some("ACK"), Some("saved")), "{answer}");
            receipted += 1;
        } else {
            assert_eq!(
                (answer["type"].as_str(), answer["reason"].as_str()),
                (Some("ERROR"), Some("server_busy")),
                "{answer}"
            );
        }
    }
    // Fail-open or not, Carol's next message would overtake the one in the stream (SPEC §3.4).
    carol.chat(6002, "after-stuck", "x").await;
    let answer = carol.expect("answer", |v| v["clientMsgId"] == "after-stuck").await;
    assert_eq!((answer["type"].as_str(), answer["reason"].as_str()), (Some("ERROR"), Some("server_busy")), "{answer}");
    c.state.private_servers[redis] = c.state.private_servers[redis].restart().await.unwrap();
    signal(worker, Signal::SIGCONT);
    carol.ack("saved", "stuck").await;
    // Everything that got a receipt is saved once Redis is back (the stream survived in the AOF).
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    wait_rows(&store, receipted).await;
    assert_eq!(check_rows(&store).await, (receipted as usize, 0, 0));
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_fail_open_saves_through_the_baseline_path() {
    redis_outage(true, "redis_open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_without_fail_open_answers_server_busy() {
    redis_outage(false, "redis_closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_dead_lettered_and_the_rest_saved() {
    let env = TestEnv::new("poison");
    let (c, store) = e2e::poisoned_cluster(&env).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7001).await;
    for (cmid, body) in [("p1", "fine"), ("p2", "POISON"), ("p3", "also fine")] {
        alice.chat(7002, cmid, body).await;
    }
    // Collect the final answer of each (they may come in any order across batches).
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 3 {
        let v = alice.next().await;
        let kind = match (v["type"].as_str(), v["ackType"].as_str()) {
            (Some("ACK"), Some("saved")) => "saved".to_owned(),
            (Some("ERROR"), _) => v["reason"].as_str().unwrap_or("").to_owned(),
            _ => continue,
        };
        answers.insert(v["clientMsgId"].as_str().unwrap().to_owned(), kind);
    }
    assert_eq!(
        (answers["p1"].as_str(), answers["p2"].as_str(), answers["p3"].as_str()),
        ("saved", "save_failed", "saved")
    );
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 2);
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let dead: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(env.keys().dead_letter_stream(0))
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(
        wait_metric(&c.state.workers[0].metrics_url, "im_worker_dead_letters_total", &[], |v| v == 1.0).await,
        1.0
    );
    store.close().await;
    drop(c);
}

/// The save stage is pipelined: a batch's rows are inserted while the batch before it is still
/// committing its receipts in Redis, and receipts stay in stream order (SPEC §3.4): the later
/// batch's `ACK(saved)` waits for the earlier batch's answers. Here the earlier commit cannot
/// finish: its refused row goes to a dead-letter key of the wrong type until the test removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_while_the_one_before_commits_and_its_receipts_follow_in_order() {
    let env = TestEnv::new("pipelined_save");
    let (c, store) = e2e::poisoned_cluster(&env).await;
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let dead = env.keys().dead_letter_stream(0);
    let () = redis::cmd("SET").arg(&dead).arg("not a stream").query_async(&mut redis).await.unwrap();
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7101).await;

    alice.chat(7102, "q1", "POISON").await;
    alice.ack("accepted", "q1").await;
    // The save stage has read q1's batch (and fails to commit it) before q2 is sent.
    let to_save = env.keys().to_save_stream(0);
    let read = poll::until_true_async(SETTLES_WITHIN, || async {
        let mut redis = redis.clone();
        // XPENDING's summary: the count, the smallest and largest ids, the consumers.
        let pending: redis::RedisResult<(u64, redis::Value, redis::Value, redis::Value)> =
            redis::cmd("XPENDING").arg(&to_save).arg("workers").query_async(&mut redis).await;
        pending.is_ok_and(|(n, ..)| n == 1)
    })
    .await;
    assert!(read, "the save stage never read q1");
    alice.chat(7102, "q2", "fine").await;
    alice.ack("accepted", "q2").await;

    let stored = poll::until_true_async(SETTLES_WITHIN, || async {
        store.query_u64("SELECT COUNT(*) FROM messages WHERE client_msg_id = 'q2'").await.is_ok_and(|n| n == 1)
    })
    .await;
    assert!(stored, "q2's row is not stored while q1's batch commits");
    let early = alice.drain(Duration::from_millis(500)).await;
    assert!(
        early.iter().all(|v| v["clientMsgId"] != "q1" && v["clientMsgId"] != "q2"),
        "no answer before q1's batch commits: {early:?}"
    );

    let () = redis::cmd("DEL").arg(&dead).query_async(&mut redis).await.unwrap();
    let first = alice.expect("q1's answer", |v| v["clientMsgId"] == "q1" || v["clientMsgId"] == "q2").await;
    assert_eq!((first["clientMsgId"].as_str(), first["reason"].as_str()), (Some("q1"), Some("save_failed")), "{first}");
    alice.ack("saved", "q2").await;
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 1);
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_past_its_bound_answers_server_busy() {
    let env = TestEnv::new("backlog");
    let mut s = spec(&env, Mode::Full, 1, 1);
    s.workers = 0; // nothing drains the stream
    s.config.two_phase.max_backlog = 5;
    let c = e2e::start(&s).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 8001).await;
    let (mut accepted, mut busy) = (0, 0);
    for k in 0..20 {
        let cmid = format!("b{k:02}");
        alice.chat(8002, &cmid, "x").await;
        let answer = alice.expect("answer", |v| v["clientMsgId"] == cmid.as_str()).await;
        match (answer["type"].as_str(), answer["ackType"].as_str(), answer["reason"].as_str()) {
            (Some("ACK"), Some("accepted"), _) => accepted += 1,
            (Some("ERROR"), _, Some("server_busy")) => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gateway's backlog figure refreshes every 250 ms, so a few may slip past the bound.
    assert!((5..=8).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + busy, 20);
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let len: u64 = redis::cmd("XLEN").arg(env.keys().accepted_stream(0)).query_async(&mut redis).await.unwrap();
    assert_eq!(len, accepted);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_db_error_answers_internal_error_and_the_retry_keeps_the_id() {
    let env = TestEnv::new("base_dberr");
    let mut s = spec(&env, Mode::Baseline, 1, 1);
    s.force_private = true;
    let mut c = e2e::start(&s).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 9001).await;
    let db = private_server(&c.state, "mariadb");
    c.state.private_servers[db].stop().await.unwrap();
    alice.chat(9002, "r1", "will be retried").await;
    let err = alice.expect("error", |v| v["clientMsgId"] == "r1").await;
    assert_eq!((err["type"].as_str(), err["reason"].as_str()), (Some("ERROR"), Some("internal_error")), "{err}");
    c.state.private_servers[db] = c.state.private_servers[db].restart().await.unwrap();
    // The retry is saved (the pool reconnects), once, with one id however often it is sent.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        loop {
            alice.chat(9002, "r1", "will be retried").await;
            let v = alice.expect("answer", |v| v["clientMsgId"] == "r1").await;
            if v["ackType"] == "saved" {
                ids.push(v["serverMsgId"].as_str().unwrap().to_owned());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "retry never saved: {v}");
            backoff.wait().await;
        }
    }
    assert_eq!(ids[0], ids[1]);
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (1, 0, 0));
    assert_eq!(store.query_u64("SELECT id FROM messages").await.unwrap().to_string(), ids[0]);
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_back_from_a_subscription_gap_replays_it_in_order_from_its_journal() {
    let env = TestEnv::new("journal");
    let mut s = spec(&env, Mode::Full, 2, 1);
    // Killing pub/sub clients must not touch other tests' gateways: a Redis of our own.
    s.force_private = true;
    let c = e2e::start(&s).await;
    let secret = c.state.jwt_secret.clone();
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, &secret, 6102).await;
    // Bob's connect-time sync is over before his gateway is paused (else it would run after the
    // pause, find the messages saved meanwhile and send them besides the journal's replay).
    bob.synced().await;
    let mut alice = Client::connect(&c.state.gateways[1].ws_url, &secret, 6101).await;
    let keys = env.keys();
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let routed = poll::until_true_async(SETTLES_WITHIN, || async {
        let nodes: Vec<u16> =
            redis::cmd("ZRANGE").arg(keys.route(6102)).arg(0).arg(-1).query_async(&mut redis.clone()).await.unwrap();
        !nodes.is_empty()
    })
    .await;
    assert!(routed, "bob's route is registered");

    // Bob's gateway loses its subscription and cannot resubscribe (paused) while Alice sends.
    let kill =
        async { redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut redis).await.unwrap() };
    e2e::a_paused_gateway_replays_its_journals(&c.state, &mut alice, &mut bob, kill).await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_that_stay_slow_make_the_gateway_shed_load_until_they_are_fast_again() {
    let env = TestEnv::new("shed");
    let mut s = spec(&env, Mode::Full, 1, 1);
    // Pausing Redis must not touch other tests: a Redis of our own.
    s.force_private = true;
    s.config.gateway.shed_append_ms = 50;
    let c = e2e::start(&s).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7001).await;
    let answer = |cmid: &'static str| move |v: &serde_json::Value| v["clientMsgId"] == cmid && v["ackType"] != "saved";
    alice.chat(7002, "fast", "x").await;
    assert_eq!(alice.expect("fast", answer("fast")).await["ackType"], "accepted");

    // One append that waits 300 ms on a paused Redis: a window whose fastest append took 300 ms.
    let redis = c.state.private_servers[private_server(&c.state, "redis")].pid;
    signal(redis, Signal::SIGSTOP);
    alice.chat(7002, "slow", "x").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(redis, Signal::SIGCONT);
    assert_eq!(alice.expect("slow", answer("slow")).await["ackType"], "accepted");

    // The next window refuses at once, without touching Redis ...
    tokio::time::sleep(Duration::from_millis(150)).await;
    alice.chat(7002, "shed", "x").await;
    let shed = alice.expect("shed", answer("shed")).await;
    assert_eq!((shed["type"].as_str(), shed["reason"].as_str()), (Some("ERROR"), Some("server_busy")), "{shed}");
    let overload =
        wait_metric(&c.state.gateways[0].metrics_url, "im_gateway_server_busy_total", &[("cause", "overload")], |v| {
            v >= 1.0
        })
        .await;
    assert!(overload >= 1.0, "counted as overload");
    // ... and admits again once a window passes without slow appends.
    tokio::time::sleep(Duration::from_millis(250)).await;
    alice.chat(7002, "again", "x").await;
    assert_eq!(alice.expect("again", answer("again")).await["ackType"], "accepted");
    drop(c);
}
