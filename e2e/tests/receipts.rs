//! Receipts that tell the truth (SPEC §3.9, §2): a resend always learns what became of the first
//! attempt — also when it was dead-lettered, and also when the shard is too busy to take new
//! messages.

use std::time::Duration;

use e2e::{spec, Client, TestEnv, WAIT};
use im_common::config::Mode;

/// How often a test probes whether the gateway sees the shard full (it refreshes every 250 ms).
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// The final answer for `cmid`: `saved`, `accepted` or the error reason.
async fn answer(client: &mut Client, cmid: &str) -> (String, Option<String>) {
    let v = client.expect(&format!("answer to {cmid}"), |v| v["clientMsgId"] == cmid).await;
    let kind = match (v["type"].as_str(), v["ackType"].as_str(), v["reason"].as_str()) {
        (Some("ACK"), Some(ack), _) => ack.to_owned(),
        (Some("ERROR"), _, Some(reason)) => reason.to_owned(),
        _ => panic!("unexpected answer {v}"),
    };
    (kind, v["serverMsgId"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_dead_lettered_message_is_answered_save_failed_again() {
    let env = TestEnv::new("dead_resend");
    let (c, store) = e2e::poisoned_cluster(&env).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7101).await;
    alice.chat(7102, "poison", "POISON").await;
    alice.ack("accepted", "poison").await;
    assert_eq!(answer(&mut alice, "poison").await.0, "save_failed");

    // The client did not get ACK(saved), so it resends: it must hear save_failed again, not a
    // fresh ACK(accepted) followed by silence.
    alice.chat(7102, "poison", "POISON").await;
    assert_eq!(answer(&mut alice, "poison").await.0, "save_failed");
    assert!(alice.drain(Duration::from_millis(500)).await.iter().all(|v| v["clientMsgId"] != "poison"));
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_accepted_message_gets_its_receipt_even_when_the_shard_is_full() {
    let env = TestEnv::new("busy_retry");
    let mut s = spec(&env, Mode::Full, 1, 1);
    s.workers = 0; // nothing drains the stream
    s.config.two_phase.max_backlog = 1;
    let c = e2e::start(&s).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7201).await;
    alice.chat(7202, "first", "x").await;
    let (kind, id) = answer(&mut alice, "first").await;
    assert_eq!(kind, "accepted");

    // Wait until the gateway sees the shard full (its backlog figure refreshes every 250 ms).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut probe = 0;
    loop {
        probe += 1;
        let cmid = format!("probe{probe}");
        alice.chat(7202, &cmid, "x").await;
        if answer(&mut alice, &cmid).await.0 == "server_busy" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the shard never reported full");
        tokio::time::sleep(PROBE_EVERY).await;
    }

    // server_busy means "nothing was accepted"; for a message that was, the retry gets its receipt.
    alice.chat(7202, "first", "x").await;
    assert_eq!(answer(&mut alice, "first").await, ("accepted".to_owned(), id));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_window_of_a_message_lasts_as_long_as_it_is_unsaved() {
    let env = TestEnv::new("window_unsaved");
    let mut s = spec(&env, Mode::Full, 1, 1);
    s.workers = 0; // nothing saves: the message stays unsaved as long as the test wants
    let c = e2e::start(&s).await;
    let keys = env.keys();
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7301).await;
    alice.chat(7302, "held", "x").await;
    assert_eq!(answer(&mut alice, "held").await.0, "accepted");
    // A key that expires while its message is unsaved (a long MySQL outage) would let a resend in
    // under a second id: it must not expire before the save settles it.
    let key = keys.idempotency(0, 7301, "held");
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(ttl, -1, "the window of an unsaved message expires in {ttl} s");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_message_is_remembered_for_the_configured_window() {
    let env = TestEnv::new("window_saved");
    let c = e2e::cluster(&env, Mode::Full, 1, 1).await;
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 7401).await;
    alice.chat(7402, "done", "x").await;
    alice.ack("saved", "done").await;
    let key = env.keys().idempotency(0, 7401, "done");
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut redis).await.unwrap();
    let window = env.config().idempotency.ttl_secs as i64;
    assert!(ttl > window - 30 && ttl <= window, "saved key ttl {ttl}, window {window}");
    drop(c);
}

/// SPEC §2: a resend that learns its message is only accepted hears `ACK saved` on the resending
/// connection once the message is saved — also when the first attempt's connection is gone and the
/// resend came in on another gateway (the save stage addresses its receipt to the first one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_answered_accepted_hears_saved_on_its_own_connection() {
    let env = TestEnv::new("resend_saved");
    let c = e2e::cluster(&env, Mode::Full, 2, 1).await;
    let secret = c.state.jwt_secret.clone();
    let worker = c.state.workers[0].pid;
    // The message stays accepted: its shard's only worker is paused.
    im_harness::process::send(worker, im_harness::process::Signal::SIGSTOP).unwrap();
    let mut first = Client::connect(&c.state.gateways[0].ws_url, &secret, 7101).await;
    first.chat(7102, "m1", "hi").await;
    let (kind, id) = answer(&mut first, "m1").await;
    assert_eq!(kind, "accepted");
    drop(first); // the connection the receipt will be addressed to is gone

    let mut again = Client::connect(&c.state.gateways[1].ws_url, &secret, 7101).await;
    again.chat(7102, "m1", "hi").await;
    assert_eq!(answer(&mut again, "m1").await, ("accepted".to_owned(), id.clone()), "the same message");
    im_harness::process::send(worker, im_harness::process::Signal::SIGCONT).unwrap();
    let saved = tokio::time::timeout(WAIT, answer(&mut again, "m1")).await;
    assert_eq!(saved.ok(), Some(("saved".to_owned(), id)), "ACK saved reaches the resending connection");
    drop(c);
}
