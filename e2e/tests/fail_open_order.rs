//! Fail-open keeps per-sender order (SPEC §3.4): while a sender's earlier message waits in the
//! stream, none of the sender's later messages may be saved and pushed past it on the baseline path
//! — not from the same connection, not from a second device, not after a reconnect.

use e2e::{private_server, spec, Client, ClusterGuard, TestEnv, WAIT};
use im_common::backoff::Backoff;
use im_common::config::Mode;
use im_harness::process::{self, Signal};

/// A client's resends while the gateway does not see Redis yet: first pause, and the most it grows to.
const RESEND_FIRST: std::time::Duration = std::time::Duration::from_millis(200);
const RESEND_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A full-mode cluster of one gateway and one worker with fail-open on, on private servers (these
/// tests stop or pause Redis); with the gateway's WebSocket URL and the JWT secret.
async fn fail_open_cluster(env: &TestEnv) -> (ClusterGuard, String, String) {
    let mut s = spec(env, Mode::Full, 1, 1);
    s.force_private = true;
    s.config.two_phase.fail_open = true;
    let c = e2e::start(&s).await;
    let (url, secret) = (c.state.gateways[0].ws_url.clone(), c.state.jwt_secret.clone());
    (c, url, secret)
}

/// Shard 0's seq counter of `from` → `to` (0 when it has none).
async fn seq_counter(conn: &redis::aio::MultiplexedConnection, env: &TestEnv, from: u64, to: u64) -> u64 {
    let top: Option<u64> = redis::cmd("HGET")
        .arg(env.keys().seq_counters(0))
        .arg(im_common::keys::seq_field(from, to))
        .query_async(&mut conn.clone())
        .await
        .ok()
        .flatten();
    top.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_device_of_a_sender_overtakes_its_message_still_in_the_stream() {
    let env = TestEnv::new("fail_open_sender");
    let (mut c, url, secret) = fail_open_cluster(&env).await;
    let mut phone = Client::connect(&url, &secret, 6301).await;
    let mut laptop = Client::connect(&url, &secret, 6301).await;
    laptop.ping().await;

    // The phone's message is stuck in the stream: the only worker is paused. Then Redis goes away.
    let worker = c.state.workers[0].pid;
    process::send(worker, Signal::SIGSTOP).unwrap();
    phone.chat(6302, "stuck", "x").await;
    phone.ack("accepted", "stuck").await;
    let redis = private_server(&c.state, "redis");
    c.state.private_servers[redis].stop().await.unwrap();

    let busy =
        |v: &serde_json::Value| (v["type"].as_str() == Some("ERROR"), v["reason"].as_str() == Some("server_busy"));
    laptop.chat(6302, "from-laptop", "x").await;
    let answer = laptop.expect("answer", |v| v["clientMsgId"] == "from-laptop").await;
    assert_eq!(busy(&answer), (true, true), "a second device overtook the sender's stuck message: {answer}");

    // The phone reconnects (new connection, same sender) and sends again.
    drop(phone);
    let mut phone = Client::connect(&url, &secret, 6301).await;
    phone.chat(6302, "after-reconnect", "x").await;
    let answer = phone.expect("answer", |v| v["clientMsgId"] == "after-reconnect").await;
    assert_eq!(busy(&answer), (true, true), "a reconnected client overtook its stuck message: {answer}");

    // Someone else with nothing in the stream still gets through on the baseline path.
    let mut dave = Client::connect(&url, &secret, 6303).await;
    dave.chat(6302, "dave", "x").await;
    dave.ack("saved", "dave").await;

    c.state.private_servers[redis] = c.state.private_servers[redis].restart().await.unwrap();
    process::send(worker, Signal::SIGCONT).unwrap();
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_saved_while_redis_was_down_keeps_its_id_when_resent_after_redis_returns() {
    let env = TestEnv::new("fail_open_resend");
    let (mut c, url, secret) = fail_open_cluster(&env).await;
    let mut alice = Client::connect(&url, &secret, 6401).await;
    let redis = private_server(&c.state, "redis");
    c.state.private_servers[redis].stop().await.unwrap();
    e2e::until_gateway_sees_redis_down(&c.state.gateways[0].metrics_url).await;
    alice.chat(6402, "while-down", "x").await;
    let first = alice.ack("saved", "while-down").await;

    // Redis returns; the client never saw that ACK(saved) (say its connection dropped) and resends.
    c.state.private_servers[redis] = c.state.private_servers[redis].restart().await.unwrap();
    let mut alice = Client::connect(&url, &secret, 6401).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut backoff = Backoff::new(RESEND_FIRST, RESEND_MAX);
    let answer = loop {
        alice.chat(6402, "while-down", "x").await;
        let v = alice.expect("answer", |v| v["clientMsgId"] == "while-down").await;
        // Until the gateway sees Redis again the resend may be refused; then it must be answered.
        if v["reason"] != "server_busy" || tokio::time::Instant::now() > deadline {
            break v;
        }
        backoff.wait().await;
    };
    assert_eq!(
        (answer["ackType"].as_str(), answer["serverMsgId"].as_str()),
        (Some("saved"), first["serverMsgId"].as_str()),
        "one message, two ids: {answer}"
    );
    drop(c);
}

/// SPEC §3.9–3.10: a message whose append may have reached Redis — the reply never came because
/// Redis stalled, and Redis runs the append once it resumes — is not also saved on the baseline
/// path: the stream copy would be numbered again, giving one message two seqs and its direction a
/// hole that no recipient can acknowledge past (found by the chaos drill around Redis kills). Its
/// sender hears `server_busy`; the resend after Redis is back gets the message's one id; the rows
/// are 1..n and every push carries its row's seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_append_may_have_reached_redis_is_not_saved_a_second_way() {
    let env = TestEnv::new("append_unknown");
    let (c, url, secret) = fail_open_cluster(&env).await;
    let (alice_id, bob_id) = (6401, 6402);
    let mut alice = Client::connect(&url, &secret, alice_id).await;
    let mut bob = Client::connect(&url, &secret, bob_id).await;
    alice.synced().await;
    bob.synced().await;
    alice.chat(bob_id, "m0", "x").await;
    alice.ack("saved", "m0").await;

    // Redis stalls with m1's append in its socket: the gateway's call times out, and Redis runs the
    // append when it resumes.
    let redis = c.state.private_servers[private_server(&c.state, "redis")].pid;
    process::send(redis, Signal::SIGSTOP).unwrap();
    alice.chat(bob_id, "m1", "x").await;
    let answer = alice.expect("the answer to m1", |v| v["clientMsgId"] == "m1").await;
    process::send(redis, Signal::SIGCONT).unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["reason"].as_str()),
        (Some("ERROR"), Some("server_busy")),
        "a message whose append may have reached Redis was answered another way (saved on the baseline path?): {answer}"
    );

    // The client resends until the window answers with m1's one id.
    let mut backoff = Backoff::new(RESEND_FIRST, RESEND_MAX);
    let m1 = loop {
        alice.chat(bob_id, "m1", "x").await;
        let v = alice.expect("the answer to m1's resend", |v| v["clientMsgId"] == "m1").await;
        if v["type"] == "ACK" {
            break v["serverMsgId"].as_str().expect("an id").to_owned();
        }
        backoff.wait().await;
    };
    alice.ack("saved", "m1").await;
    alice.chat(bob_id, "m2", "x").await;
    alice.ack("saved", "m2").await;

    let mut pushed = std::collections::BTreeMap::new();
    while pushed.len() < 3 {
        let v = bob.expect("a push", |v| v["type"] == "SINGLE_CHAT").await;
        pushed.insert(
            v["clientMsgId"].as_str().unwrap_or_default().to_owned(),
            (v["serverMsgId"].clone(), v["seq"].clone()),
        );
    }
    let store = im_common::store::Store::connect(&c.state.mysql_url, 1).unwrap();
    let rows: Vec<(String, u64)> = store.all_ids().await.unwrap().into_iter().map(|(_, id, cmid)| (cmid, id)).collect();
    assert_eq!(rows.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["m0", "m1", "m2"], "one row each");
    assert_eq!(rows[1].1.to_string(), m1, "m1's row has the id its receipts named");
    for (k, cmid) in ["m0", "m1", "m2"].iter().enumerate() {
        let seq = store.query_u64(&format!("SELECT seq FROM messages WHERE client_msg_id = '{cmid}'")).await.unwrap();
        assert_eq!(seq, k as u64 + 1, "{cmid}: the rows' seqs have a gap");
        assert_eq!(pushed[*cmid].1.as_u64(), Some(seq), "{cmid} was pushed under another seq than its row's");
    }
    store.close().await;
    drop(c);
}

/// One seq per message (SPEC §3.10) when a message does take both paths: an append made while the
/// gateway already believed Redis away fails open, and if Redis runs it after all (here: Redis was
/// stalled and runs its queue when it resumes), the stream copy must follow the row the baseline path
/// saved — not be numbered again after the sender's later messages, which would push it under
/// another seq than its row's and leave a hole (the Redis Cluster drill found this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_saved_by_fail_open_whose_append_ran_after_all_keeps_its_rows_seq() {
    let env = TestEnv::new("both_paths");
    let (c, url, secret) = fail_open_cluster(&env).await;
    let (alice_id, carol_id, bob_id) = (6411, 6413, 6412);
    let mut alice = Client::connect(&url, &secret, alice_id).await;
    let mut carol = Client::connect(&url, &secret, carol_id).await;
    let mut bob = Client::connect(&url, &secret, bob_id).await;
    for client in [&mut alice, &mut carol, &mut bob] {
        client.synced().await;
    }
    carol.chat(bob_id, "c0", "x").await;
    carol.ack("saved", "c0").await;

    // The shard owner pauses, so it numbers nothing until the fail-open save's seq floor is in Redis.
    let worker = c.state.workers[0].pid;
    process::send(worker, Signal::SIGSTOP).unwrap();
    let redis = c.state.private_servers[private_server(&c.state, "redis")].pid;
    process::send(redis, Signal::SIGSTOP).unwrap();
    // Alice's append times out while Redis was answering: unknown outcome, server_busy. From now on
    // the gateway believes Redis away.
    alice.chat(bob_id, "a1", "x").await;
    let answer = alice.expect("the answer to a1", |v| v["clientMsgId"] == "a1").await;
    assert_eq!(answer["reason"].as_str(), Some("server_busy"), "{answer}");
    // Carol's append, made while Redis is known away, times out too and fails open: saved, seq 2.
    carol.chat(bob_id, "c1", "x").await;
    let saved = carol.expect("the answer to c1", |v| v["clientMsgId"] == "c1").await;
    assert_eq!((saved["type"].as_str(), saved["ackType"].as_str()), (Some("ACK"), Some("saved")), "{saved}");
    // Redis resumes and runs both queued appends: c1 is in the stream as well.
    process::send(redis, Signal::SIGCONT).unwrap();
    let keys = env.keys();
    let mut redis_conn = e2e::redis(&c.state.redis_url).await;
    // The gateway writes the fail-open save's seq floor once it sees Redis again.
    let raised = im_harness::poll::until_true_async(WAIT, || async {
        seq_counter(&redis_conn, &env, carol_id, bob_id).await >= 2
    })
    .await;
    assert!(raised, "the gateway never raised carol→bob's counter to the fail-open save's seq");
    let entries: usize = redis::cmd("XLEN").arg(keys.accepted_stream(0)).query_async(&mut redis_conn).await.unwrap();
    assert_eq!(entries, 2, "a1 and c1 were appended when Redis resumed");
    process::send(worker, Signal::SIGCONT).unwrap();

    carol.chat(bob_id, "c2", "x").await;
    carol.ack("saved", "c2").await;
    let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for v in bob.drain(std::time::Duration::from_secs(2)).await.iter().filter(|v| v["type"] == "SINGLE_CHAT") {
        let cmid = v["clientMsgId"].as_str().unwrap_or_default().to_owned();
        seqs.entry(cmid).or_default().push(v["seq"].as_u64().unwrap_or(0));
    }
    assert!(seqs["c1"].iter().all(|&s| s == 2), "c1 pushed under another seq than its row's 2: {seqs:?}");
    assert!(seqs["c1"].len() >= 2, "the stream copy of c1 was pushed too (with the row's seq): {seqs:?}");
    assert_eq!(seqs["c2"], [3], "{seqs:?}");
    let store = im_common::store::Store::connect(&c.state.mysql_url, 1).unwrap();
    let count =
        store.query_u64(&format!("SELECT COUNT(*) FROM messages WHERE from_user_id = {carol_id}")).await.unwrap();
    let top = store.query_u64(&format!("SELECT MAX(seq) FROM messages WHERE from_user_id = {carol_id}")).await.unwrap();
    assert_eq!((count, top), (3, 3), "carol's rows are c0, c1, c2 with seqs 1..3, no gap");
    store.close().await;
    drop(c);
}

/// One seq per message (SPEC §3.10) when a sender moves to another gateway right after a fail-open
/// episode: the first gateway saved the sender's messages on the baseline path (numbered in MySQL)
/// and has not yet raised the shard's counters in Redis to their seqs — here it is paused, so its
/// outbox cannot — when the sender's next message reaches the stream through the second gateway.
/// That message must get the next seq, not one of theirs (found by the chaos drill, seed
/// 3047488976131772480: ten messages numbered with taken seqs were dead-lettered and answered
/// `save_failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_who_moves_gateway_after_fail_open_saves_gets_the_next_seq() {
    let env = TestEnv::new("fail_open_move");
    let mut s = spec(&env, Mode::Full, 2, 1);
    s.force_private = true;
    s.config.two_phase.fail_open = true;
    let mut c = e2e::start(&s).await;
    let (g1, g2) = (c.state.gateways[0].clone(), c.state.gateways[1].clone());
    let secret = c.state.jwt_secret.clone();
    let (alice_id, bob_id) = (6501, 6502);
    let mut alice = Client::connect(&g1.ws_url, &secret, alice_id).await;
    alice.synced().await;
    alice.chat(bob_id, "m1", "x").await;
    alice.ack("saved", "m1").await;

    // Redis goes away; the first gateway saves m2 and m3 on the baseline path (seqs 2 and 3).
    let redis = private_server(&c.state, "redis");
    c.state.private_servers[redis].stop().await.unwrap();
    e2e::until_gateway_sees_redis_down(&g1.metrics_url).await;
    for cmid in ["m2", "m3"] {
        alice.chat(bob_id, cmid, "x").await;
        alice.ack("saved", cmid).await;
    }
    // The first gateway stops before it can tell Redis those seqs; Redis returns.
    process::send(g1.pid, Signal::SIGSTOP).unwrap();
    c.state.private_servers[redis] = c.state.private_servers[redis].restart().await.unwrap();

    // Alice, reconnected to the second gateway, sends m4 until it is answered for good.
    let mut alice = Client::connect(&g2.ws_url, &secret, alice_id).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut backoff = Backoff::new(RESEND_FIRST, RESEND_MAX);
    let answer = loop {
        alice.chat(bob_id, "m4", "x").await;
        let v = alice.expect("the answer to m4", |v| v["clientMsgId"] == "m4" && v["ackType"] != "accepted").await;
        if v["reason"] != "server_busy" || tokio::time::Instant::now() > deadline {
            break v;
        }
        backoff.wait().await;
    };
    process::send(g1.pid, Signal::SIGCONT).unwrap();
    assert_eq!((answer["type"].as_str(), answer["ackType"].as_str()), (Some("ACK"), Some("saved")), "{answer}");
    let store = im_common::store::Store::connect(&c.state.mysql_url, 1).unwrap();
    for (k, cmid) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
        let seq = store.query_u64(&format!("SELECT seq FROM messages WHERE client_msg_id = '{cmid}'")).await.unwrap();
        assert_eq!(seq, k as u64 + 1, "{cmid}'s row");
    }
    store.close().await;
    drop(c);
}

/// One seq per message (SPEC §3.10) whatever order fail-open saves commit in: two gateways' saves
/// overlap, and the one with the older message id commits last — after the shard owner has already
/// seen the newer one. Its seqs must still reach the shard's counters before the sender's next
/// message through the stream is numbered (a high-water mark over claim ids skipped it: the next
/// message took its seq and was refused as `save_failed`). The older save is written here by hand
/// in an open transaction, as `Store::save_fail_open` writes it, and its gateway never raises the
/// counters itself (say it died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_save_that_commits_after_a_newer_one_still_reaches_the_seq_counters() {
    use mysql_async::prelude::Queryable;
    use std::time::Duration;

    let env = TestEnv::new("fail_open_commit_order");
    let (c, url, secret) = fail_open_cluster(&env).await;
    let (alice_id, bob_id, carol_id, dave_id, erin_id) = (6601, 6602, 6603, 6604, 6605);
    let mut alice = Client::connect(&url, &secret, alice_id).await;
    let mut erin = Client::connect(&url, &secret, erin_id).await;
    alice.chat(bob_id, "m1", "x").await;
    alice.ack("saved", "m1").await;

    // Gateway A's fail-open save of alice's m2 (seq 2, the older id) is in flight: not committed.
    let older = im_common::ids::min_id_at(im_common::ids::now_ms()) + 1;
    let mut held = mysql_async::Conn::from_url(c.state.mysql_url.as_str()).await.unwrap();
    held.query_drop("START TRANSACTION").await.unwrap();
    held.query_drop(format!("INSERT INTO path_claims (id, path) VALUES ({older}, 2)")).await.unwrap();
    held.query_drop(format!(
        "INSERT INTO conversations (owner_id, peer_id, last_out_seq, last_msg_id) VALUES \
         ({alice_id}, {bob_id}, 1, {older}), ({bob_id}, {alice_id}, 0, {older}) \
         ON DUPLICATE KEY UPDATE last_out_seq = last_out_seq + VALUES(last_out_seq), \
         last_msg_id = GREATEST(last_msg_id, VALUES(last_msg_id))"
    ))
    .await
    .unwrap();
    held.query_drop(format!(
        "INSERT INTO messages (id, from_user_id, to_user_id, seq, client_msg_id, msg_type, content) \
         VALUES ({older}, {alice_id}, {bob_id}, 2, 'm2', 'TEXT', 'x')"
    ))
    .await
    .unwrap();

    // Gateway B's fail-open save of carol's message (a newer id) commits first.
    let store = im_common::store::Store::connect(&c.state.mysql_url, 1).unwrap();
    let newer = im_common::record::ChatMessage {
        id: older + 1_000_000,
        from: carol_id,
        to: dave_id,
        client_msg_id: "c1".into(),
        msg_type: "TEXT".into(),
        body: "x".into(),
        seq: 0,
    };
    let outcome = store.save_fail_open(std::slice::from_ref(&newer)).await.unwrap();
    assert_eq!(outcome.saved, [(0, newer.id, 1)], "carol's fail-open save");

    // The owner sees the newer save and raises carol→dave's counter (erin's messages keep it numbering).
    let redis_conn = e2e::redis(&c.state.redis_url).await;
    let mut nudges = 0;
    let mut until_counter = async |from, to, at_least, erin: &mut Client| {
        let deadline = tokio::time::Instant::now() + WAIT;
        while seq_counter(&redis_conn, &env, from, to).await < at_least && tokio::time::Instant::now() < deadline {
            nudges += 1;
            let cmid = format!("e{nudges}");
            erin.chat(bob_id, &cmid, "x").await;
            erin.ack("saved", &cmid).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seq_counter(&redis_conn, &env, from, to).await
    };
    assert_eq!(until_counter(carol_id, dave_id, 1, &mut erin).await, 1, "the owner never saw carol's fail-open save");

    // Now alice's m2 commits, and gateway A is gone before it could raise the counters itself.
    held.query_drop("COMMIT").await.unwrap();
    drop(held);
    assert_eq!(
        until_counter(alice_id, bob_id, 2, &mut erin).await,
        2,
        "the owner never raised alice→bob's counter to the seq of the fail-open save that committed last"
    );

    alice.chat(bob_id, "m3", "x").await;
    let answer = alice.expect("the answer to m3", |v| v["clientMsgId"] == "m3" && v["ackType"] != "accepted").await;
    assert_eq!((answer["type"].as_str(), answer["ackType"].as_str()), (Some("ACK"), Some("saved")), "{answer}");
    let seq = store.query_u64("SELECT seq FROM messages WHERE client_msg_id = 'm3'").await.unwrap();
    assert_eq!(seq, 3, "m3 follows the fail-open save's seq 2");
    store.close().await;
    drop(c);
}
