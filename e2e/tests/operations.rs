//! What operators do: canary and status on a live cluster, scaling out, and graceful drains of a
//! gateway and of a shard worker under load without losing a message.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use e2e::{check_rows, ops_on, spec, wait_metric, Client, TestEnv, Traffic};
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::process::{self, Signal};
use im_harness::{metrics, poll};

/// How long a drained process gets to exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

fn sigterm(pid: u32) {
    process::send(pid, Signal::SIGTERM).expect("signal delivered");
}

/// `ops canary --json` on the guard's cluster: one result per shard, each `ok` when it went all the way.
async fn canary(c: &e2e::ClusterGuard) -> Vec<Value> {
    let out = ops_on(c, "canary", &["--json", "--timeout-ms", "10000"]).await;
    serde_json::from_str(out.trim()).expect("canary JSON")
}

fn all_through(results: &[Value]) -> bool {
    results.iter().all(|r| {
        r["error"].is_null() && !r["accepted_ms"].is_null() && !r["saved_ms"].is_null() && !r["delivered_ms"].is_null()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_status_and_scale_see_every_shard() {
    let env = TestEnv::new("ops_status");
    let mut c = e2e::start(&spec(&env, Mode::Full, 2, 3)).await;
    let results = canary(&c).await;
    assert_eq!(results.len(), 3);
    assert!(all_through(&results), "{results:?}");
    let status = im_harness::status::collect(&c.state, Duration::from_millis(300)).await;
    assert_eq!(status.shards.len(), 3);
    assert!(status.shards.iter().all(|s| s.owner.is_some() && s.backlog == 0.0), "{status:?}");
    assert!(status.gateways.iter().all(|g| g.up));

    ops_on(&c, "scale", &["--gateways", "1", "--workers", "1"]).await;
    c.reload().expect("the state file after scaling");
    assert_eq!((c.state.gateways.len(), c.state.workers.len()), (3, 4));
    let results = canary(&c).await;
    assert!(all_through(&results), "after scaling: {results:?}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_drain_under_load_hands_over_at_once_and_loses_nothing() {
    let env = TestEnv::new("drain_worker");
    let mut s = spec(&env, Mode::Full, 2, 1);
    s.workers = 2; // the second stands by
    s.config.two_phase.lease_ttl_ms = 20_000; // a takeover that waited for the TTL would be obvious
    let c = e2e::start(&s).await;
    let load =
        Traffic { pairs: 20, per_sender: 60, pace: Duration::from_millis(25), deadline: Duration::from_secs(30) };
    let state = c.state.clone();
    let traffic = tokio::spawn(async move { load.run(&state).await });
    // The drain lands while messages flow: once the first gateway has appended some.
    let appended =
        metrics::wait_for(&c.state.gateways[0].metrics_url, "im_gateway_appends_total", &[], load.deadline, |n| {
            n >= 50.0
        })
        .await;
    assert!(appended >= 50.0, "traffic is flowing ({appended} appends)");
    let stopped = Instant::now();
    sigterm(c.state.workers[0].pid);
    let held =
        wait_metric(&c.state.workers[1].metrics_url, "im_worker_lease_held", &[("shard", "0")], |v| v == 1.0).await;
    let takeover = stopped.elapsed();
    assert_eq!(held, 1.0, "the standby took the shard");
    assert!(takeover < Duration::from_secs(3), "takeover took {takeover:?} (lease TTL is 20 s)");
    let result = traffic.await.unwrap();
    let v = &result.verdict;
    println!("worker drain: takeover {takeover:?}, {v:?}");
    assert_eq!((v.accepted, v.saved, v.delivered, v.lost, v.reorders, v.errored), (1200, 1200, 1200, 0, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (1200, 0, 0));
    store.close().await;
    assert!(process::wait_gone(c.state.workers[0].pid, EXIT_WAIT).await, "the drained worker exited");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_drain_closes_with_going_away_and_retries_elsewhere_lose_nothing() {
    let env = TestEnv::new("drain_gw");
    let c = e2e::start(&spec(&env, Mode::Full, 2, 2)).await;
    let (g1, g2) = (c.state.gateways[0].clone(), c.state.gateways[1].clone());
    let secret = c.state.jwt_secret.clone();
    let mut bob = Client::connect(&g2.ws_url, &secret, 50_002).await;
    let mut alice = Client::connect(&g1.ws_url, &secret, 50_001).await;
    // Alice sends 100 messages closed-loop; gateway 1 is drained half way. On the close she moves to
    // gateway 2 and resends the message she had no ACK(saved) for, with the same clientMsgId.
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut close_seen = None;
    let mut k = 0;
    while k < 100 {
        let cmid = format!("g{k:03}");
        if k == 50 {
            sigterm(g1.pid);
        }
        alice.chat(50_002, &cmid, "drain").await;
        let saved = loop {
            match alice.next_within(Duration::from_secs(5)).await {
                Some(v) if v["type"] == "ACK" && v["ackType"] == "saved" && v["clientMsgId"] == cmid.as_str() => {
                    break Some(v["serverMsgId"].as_str().unwrap().to_owned())
                }
                Some(_) => continue,
                None => break None,
            }
        };
        match saved {
            Some(id) => {
                assert!(ids.insert(cmid, id).is_none());
                k += 1;
            }
            None => {
                // The connection ended: learn why, then reconnect elsewhere and retry the same k.
                close_seen = Some(alice.close_frame().await);
                alice = Client::connect(&g2.ws_url, &secret, 50_001).await;
            }
        }
    }
    let close = close_seen.expect("gateway 1 closed alice's connection");
    if let Some((code, reason)) = close {
        assert_eq!((code, reason.as_str()), (1001, "going_away"));
    }
    let mut got: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 100 && Instant::now() < deadline {
        if let Some(v) = bob.next_within(Duration::from_secs(1)).await {
            if v["type"] == "SINGLE_CHAT" {
                got.insert(
                    v["clientMsgId"].as_str().unwrap().to_owned(),
                    v["serverMsgId"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
    assert_eq!(got, ids, "bob got every message with the id alice was given");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (100, 0, 0));
    store.close().await;
    assert!(process::wait_gone(g1.pid, EXIT_WAIT).await, "the drained gateway exited");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_with_messages_in_flight_keeps_per_sender_order() {
    use mysql_async::prelude::Queryable;
    let env = TestEnv::new("reshard");
    let mut c = e2e::start(&spec(&env, Mode::Full, 1, 2)).await;
    let secret = c.state.jwt_secret.clone();
    let senders: Vec<u64> = (70_000..70_020).collect();
    let moved =
        senders.iter().filter(|&&u| im_common::shard::shard_of(u, 2) != im_common::shard::shard_of(u, 3)).count();
    assert!(moved > 0, "some senders change shard");

    // Hold the saves (table lock) so phase-1 messages are still in the streams when the switch starts.
    let mut lock = mysql_async::Conn::from_url(c.state.mysql_url.as_str()).await.unwrap();
    lock.query_drop("LOCK TABLES messages WRITE, conversations WRITE").await.unwrap();
    let send_phase = |url: String, phase: u32| {
        let secret = secret.clone();
        let senders = senders.clone();
        async move {
            let mut accepted = 0;
            for &uid in &senders {
                let mut client = Client::connect(&url, &secret, uid).await;
                for k in 0..15 {
                    client.chat(uid + 1000, &format!("p{phase}-{k:02}"), "reshard").await;
                }
                for k in 0..15 {
                    client.ack("accepted", &format!("p{phase}-{k:02}")).await;
                    accepted += 1;
                }
            }
            accepted
        }
    };
    assert_eq!(send_phase(c.state.gateways[0].ws_url.clone(), 1).await, 300);
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        lock.query_drop("UNLOCK TABLES").await.unwrap();
        lock
    });
    ops_on(&c, "reshard", &["--shards", "3", "--drain-timeout-secs", "60"]).await;
    c.reload().expect("the state file after resharding");
    drop(release.await.unwrap());
    assert_eq!((c.state.shards, c.state.workers.len()), (3, 3));
    assert_eq!(send_phase(c.state.gateways[0].ws_url.clone(), 2).await, 300);

    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    poll::until_true_async(Duration::from_secs(20), || async {
        store.query_u64("SELECT COUNT(*) FROM messages").await.is_ok_and(|n| n >= 600)
    })
    .await;
    // Every phase-1 row of a sender comes before every phase-2 row, in order (ids are acceptance order).
    assert_eq!(check_rows(&store).await, (600, 0, 0), "rows, duplicates, senders out of order");
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_resent_after_resharding_keeps_its_id_also_when_its_sender_moved_shard() {
    let env = TestEnv::new("reshard_ids");
    let mut c = e2e::start(&spec(&env, Mode::Full, 1, 2)).await;
    let secret = c.state.jwt_secret.clone();
    let senders: Vec<u64> = (71_000..71_100)
        .filter(|&u| im_common::shard::shard_of(u, 2) != im_common::shard::shard_of(u, 3))
        .take(3)
        .collect();
    assert_eq!(senders.len(), 3, "senders whose shard changes");
    let mut first_ids = HashMap::new();
    for &uid in &senders {
        let mut client = Client::connect(&c.state.gateways[0].ws_url, &secret, uid).await;
        client.chat(uid + 1000, "before-reshard", "x").await;
        first_ids.insert(uid, client.ack("saved", "before-reshard").await["serverMsgId"].clone());
    }
    ops_on(&c, "reshard", &["--shards", "3", "--drain-timeout-secs", "60"]).await;
    c.reload().expect("the state file after resharding");

    // Receipts published while the gateways were down are lost; clients resend. Same message, same id.
    for &uid in &senders {
        let mut client = Client::connect(&c.state.gateways[0].ws_url, &secret, uid).await;
        client.chat(uid + 1000, "before-reshard", "x").await;
        let answer = client.expect("answer", |v| v["clientMsgId"] == "before-reshard").await;
        assert_eq!(
            (answer["ackType"].as_str(), &answer["serverMsgId"]),
            (Some("saved"), &first_ids[&uid]),
            "uid {uid}: one message, two ids after resharding: {answer}"
        );
    }
}
