//! `/readyz` reflects whether a process can do its job, not just that it runs: a shard worker whose
//! save stage hangs inside an INSERT turns red, and so does a gateway whose node-channel subscription
//! is gone; both turn green again by themselves once the cause is removed.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use tokio::time::Instant;

use e2e::{exchange, spec, wait_metric, Client, TestEnv};
use im_common::config::Mode;
use im_harness::{http, poll};

/// While subscriptions are being killed: how often they are killed, and how often readyz is asked.
const KILL_EVERY: Duration = Duration::from_millis(50);
const SAMPLE_EVERY: Duration = Duration::from_millis(15);

/// `GET url` as (status, body); `None` when nothing answered.
async fn http_get(url: &str) -> Option<(u16, String)> {
    http::get(url).await.ok()
}

fn readyz(metrics_url: &str) -> String {
    metrics_url.replace("/metrics", "/readyz")
}

/// Polls `url` until its status is `want` or `limit` passes; returns the last answer.
async fn wait_status(url: &str, want: u16, limit: Duration) -> (u16, String) {
    let wanted = poll::until(limit, || async { http_get(url).await.filter(|(status, _)| *status == want) }).await;
    match wanted {
        Some(answer) => answer,
        None => http_get(url).await.unwrap_or((0, String::new())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_red_while_the_save_stage_hangs_in_an_insert_and_green_after() {
    let env = TestEnv::new("stuck_save");
    let c = e2e::cluster(&env, Mode::Full, 1, 1).await;
    let worker_ready = readyz(&c.state.workers[0].metrics_url);
    assert_eq!(http_get(&worker_ready).await.map(|(s, _)| s), Some(200), "ready before the fault");

    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, secret, 11_001).await;
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, secret, 11_002).await;
    bob.ping().await;
    alice.synced().await; // its connect-time SYNC_DONE is not an answer to what follows

    // A session that holds the table's write lock makes the save stage's INSERT wait for it.
    let opts = mysql_async::Opts::from_url(&c.state.mysql_url).expect("mysql url");
    let mut locker = mysql_async::Conn::new(opts).await.expect("mysql connection");
    locker.query_drop("LOCK TABLES messages WRITE").await.expect("lock messages");
    let locked_at = Instant::now();

    alice.chat(bob.uid, "stuck1", "waits for the lock").await;
    alice.ack("accepted", "stuck1").await;
    // Full mode delivers before saving: the push is not held up by the stuck save.
    bob.expect("push", |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == "stuck1").await;

    // The save stage stops ticking; after max(3 × block_ms, 5 s) the worker says so.
    let (status, body) = wait_status(&worker_ready, 503, Duration::from_secs(12)).await;
    assert_eq!(status, 503, "readyz while the INSERT hangs: {body}");
    assert!(body.contains("save stage made no progress"), "names the stalled stage: {body}");
    let red_after = locked_at.elapsed();
    println!("worker red {red_after:?} after the lock: {}", body.trim());
    assert!(red_after >= Duration::from_secs(3), "not red long before the stall bound ({red_after:?})");
    assert!(alice.next_within(Duration::from_millis(200)).await.is_none(), "nothing is saved while locked");
    // The gateway is unaffected.
    assert_eq!(http_get(&readyz(&c.state.gateways[0].metrics_url)).await.map(|(s, _)| s), Some(200));

    locker.query_drop("UNLOCK TABLES").await.expect("unlock");
    alice.ack("saved", "stuck1").await;
    let (status, body) = wait_status(&worker_ready, 200, Duration::from_secs(5)).await;
    assert_eq!(status, 200, "ready again after the lock is released: {body}");
    locker.disconnect().await.ok();
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_red_while_the_node_channel_subscription_is_lost_and_green_after() {
    let env = TestEnv::new("lost_sub");
    let mut s = spec(&env, Mode::Full, 2, 1);
    // Killing pub/sub clients must not touch other tests' gateways: a Redis of our own.
    s.force_private = true;
    let c = e2e::start(&s).await;
    let gateway_ready = readyz(&c.state.gateways[0].metrics_url);
    assert_eq!(http_get(&gateway_ready).await.map(|(s, _)| s), Some(200), "ready before the fault");

    let killing = Duration::from_secs(2);
    let killer = tokio::spawn({
        let url = c.state.redis_url.clone();
        async move {
            let mut redis = e2e::redis(&url).await;
            let (start, mut killed) = (Instant::now(), 0u64);
            while start.elapsed() < killing {
                let n: u64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query_async(&mut redis)
                    .await
                    .expect("client kill");
                killed += n;
                tokio::time::sleep(KILL_EVERY).await;
            }
            killed
        }
    });
    let (start, mut red, mut green) = (Instant::now(), Vec::new(), 0);
    while start.elapsed() < killing {
        match http_get(&gateway_ready).await {
            Some((503, body)) => red.push(body),
            Some((200, _)) => green += 1,
            other => panic!("unexpected readyz answer {other:?}"),
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let killed = killer.await.expect("killer");
    println!("killed {killed} pub/sub clients; readyz answered {} red, {green} green", red.len());
    assert!(killed >= 2, "pub/sub clients were killed ({killed})");
    assert!(!red.is_empty(), "readyz was never red while subscriptions were killed ({green} green answers)");
    assert!(red.iter().all(|b| b.contains("node channel not subscribed")), "red for the subscription: {red:?}");

    // Killing stopped: every gateway resubscribes by itself and is ready again.
    for g in &c.state.gateways {
        let (status, body) = wait_status(&readyz(&g.metrics_url), 200, Duration::from_secs(5)).await;
        assert_eq!(status, 200, "gateway {} ready again: {body}", g.node_id);
        let up = wait_metric(&g.metrics_url, "im_gateway_subscription_up", &[], |v| v == 1.0).await;
        assert_eq!(up, 1.0, "gateway {} reports its subscription up", g.node_id);
    }
    // And pushes and receipts cross gateways through the new subscriptions.
    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, secret, 12_001).await;
    let mut bob = Client::connect(&c.state.gateways[1].ws_url, secret, 12_002).await;
    bob.ping().await;
    exchange(&mut alice, &mut bob, "after-recovery").await;
    exchange(&mut bob, &mut alice, "and-back").await;
    drop(c);
}
