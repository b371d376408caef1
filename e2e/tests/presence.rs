//! A gateway's presence in the cluster (SPEC §3.11): pushes published while its users seemed
//! offline reach them anyway — a gateway that was stalled past its route entries' lifetime asks its
//! clients to reconnect (1012) so they resync, instead of carrying on as if nothing was missed.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use e2e::{spec, Client, ClusterGuard, TestEnv, WAIT};
use im_common::config::Mode;
use im_harness::poll;
use im_harness::process::{self, Signal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stalled_past_its_route_ttl_asks_its_clients_to_reconnect() {
    let env = TestEnv::new("stall");
    let mut s = spec(&env, Mode::Full, 2, 1);
    s.config.gateway.route_ttl_ms = 1500;
    let c = e2e::start(&s).await;
    let secret = c.state.jwt_secret.clone();
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, &secret, 6202).await;
    bob.ping().await;
    let mut alice = Client::connect(&c.state.gateways[1].ws_url, &secret, 6201).await;
    let keys = env.keys();
    let redis = e2e::redis(&c.state.redis_url).await;

    // Bob's gateway stalls (a GC-like pause) until his route entry has expired.
    let gw0 = c.state.gateways[0].pid;
    process::send(gw0, Signal::SIGSTOP).unwrap();
    let expired = poll::until_true_async(WAIT, || async {
        let live: Vec<u16> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys.route(6202))
            .arg(im_common::ids::now_ms())
            .arg("+inf")
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        live.is_empty()
    })
    .await;
    assert!(expired, "Bob's route never expired");
    // Meanwhile Alice's message finds Bob offline: nothing is published to his gateway.
    alice.chat(6202, "while-stalled", "x").await;
    alice.ack("saved", "while-stalled").await;
    process::send(gw0, Signal::SIGCONT).unwrap();

    // Bob must not silently miss it: either it arrives, or his gateway tells him to reconnect.
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(5), bob.inner().next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("while-stalled") => break "pushed".to_owned(),
            Ok(Some(Ok(Message::Close(Some(frame))))) => break format!("closed {}", u16::from(frame.code)),
            Ok(Some(Ok(_))) => continue,
            other => break format!("{other:?}"),
        }
    };
    assert!(
        outcome == "pushed" || outcome == "closed 1012",
        "Bob neither got the message nor a 1012 after his gateway's stall: {outcome}"
    );
    drop(c);
}

/// Bob connected to the first gateway and Alice to the second, both served, and one message from
/// Alice pushed to Bob.
async fn bob_and_alice(c: &ClusterGuard, bob: u64, alice: u64) -> (Client, Client) {
    let secret = &c.state.jwt_secret;
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, secret, bob).await;
    bob.ping().await;
    let mut alice = Client::connect(&c.state.gateways[1].ws_url, secret, alice).await;
    alice.ping().await;
    e2e::exchange(&mut alice, &mut bob, "before").await;
    (bob, alice)
}

/// `from` sends `cmid` to `to` and waits for its `ACK(saved)`; whether `to` then gets its push
/// within `limit`.
async fn saved_then_pushed_within(from: &mut Client, to: &mut Client, cmid: &str, limit: Duration) -> bool {
    from.chat(to.uid, cmid, "x").await;
    from.ack("saved", cmid).await;
    let quoted = format!("\"{cmid}\"");
    let pushed = tokio::time::timeout(limit, async {
        loop {
            match to.inner().next().await {
                Some(Ok(Message::Text(t))) if t.contains(&quoted) => return,
                Some(Ok(_)) => continue,
                other => panic!("uid {}: the connection ended: {other:?}", to.uid),
            }
        }
    })
    .await;
    pushed.is_ok()
}

/// Redis loses a live connection's route and presence epoch (a failover to a replica that had not
/// got them, a restart without persistence). Publishers meanwhile read "no route" at epoch 0 and
/// keep that for a while (`im_common::route_cache`); the gateway's next route refresh adds the route
/// again — and must raise the epoch after it, as a new connection does, or the cached "no route"
/// hides the connection from every push until the cache reads it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_redis_lost_under_a_live_connection_reaches_publishers_once_the_gateway_adds_it_again() {
    let env = TestEnv::new("route_lost");
    let mut s = spec(&env, Mode::Full, 2, 1);
    s.config.gateway.route_ttl_ms = 1500; // refreshed every 500 ms
    let c = e2e::start(&s).await;
    let (mut bob, mut alice) = bob_and_alice(&c, 6302, 6301).await;

    // Redis loses Bob's route and epoch; a message meanwhile finds him offline, and publishers
    // remember that. (His gateway is paused meanwhile, well within the route TTL, so its refresh
    // comes only after.)
    let keys = env.keys();
    let redis = e2e::redis(&c.state.redis_url).await;
    let gw0 = c.state.gateways[0].pid;
    process::send(gw0, Signal::SIGSTOP).unwrap();
    let _: () =
        redis::cmd("DEL").arg(keys.route(6302)).arg(keys.presence(6302)).query_async(&mut redis.clone()).await.unwrap();
    alice.chat(6302, "while-lost", "x").await;
    alice.ack("saved", "while-lost").await;
    process::send(gw0, Signal::SIGCONT).unwrap();

    // His gateway's refresh adds the route again…
    let back = poll::until_true_async(WAIT, || async {
        let nodes: Vec<u16> =
            redis::cmd("ZRANGE").arg(keys.route(6302)).arg(0).arg(-1).query_async(&mut redis.clone()).await.unwrap();
        !nodes.is_empty()
    })
    .await;
    assert!(back, "Bob's gateway never added his route again");
    // …and from then on pushes reach him at once, not once a publisher happens to read it again.
    assert!(
        saved_then_pushed_within(&mut alice, &mut bob, "after", Duration::from_secs(2)).await,
        "a message saved after Bob's route was back did not reach him within 2 s"
    );
    drop(c);
}

/// Redis crashes and comes back empty (no persistence survived: its AOF is gone) while a sender
/// and a recipient stay connected. The engine must come back by itself — workers take their leases
/// and consumer groups anew and rebuild the seq counters from MySQL, gateways subscribe again and
/// add their users' routes again — and from the first message saved after it, pushes must reach the
/// recipient at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_comes_back_empty_pushes_reach_a_recipient_who_stayed_connected() {
    let env = TestEnv::new("redis_emptied");
    let mut s = spec(&env, Mode::Full, 2, 1);
    s.force_private = true; // this test kills Redis and deletes its data
    s.config.two_phase.lease_ttl_ms = 1500;
    s.config.two_phase.block_ms = s.config.two_phase.max_block_ms();
    let mut c = e2e::start(&s).await;
    let (mut bob, mut alice) = bob_and_alice(&c, 6402, 6401).await;

    let redis = e2e::private_server(&c.state, "redis");
    let server = c.state.private_servers[redis].clone();
    server.kill();
    assert!(
        poll::until_true(WAIT, || !server.is_running()).await,
        "Redis (pid {}) still runs after kill -9",
        server.pid
    );
    for entry in std::fs::read_dir(&server.dir).expect("Redis's directory") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.starts_with("appendonly") || name.ends_with(".rdb") {
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
        }
    }
    c.state.private_servers[redis] = server.restart().await.expect("Redis restarts, empty");

    // Alice sends until a message is saved again (the engine answers errors until it is back).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut k = 0;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no message was saved within 30 s of Redis coming back");
        k += 1;
        let cmid = format!("while-recovering-{k}");
        alice.chat(6402, &cmid, "x").await;
        let answer = alice
            .expect(&format!("an answer to {cmid}"), |v| {
                v["clientMsgId"] == cmid.as_str()
                    && (v["type"] == "ERROR" || (v["type"] == "ACK" && v["ackType"] == "saved"))
            })
            .await;
        if answer["type"] == "ACK" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // From now on a push reaches Bob as soon as the message is saved.
    assert!(
        saved_then_pushed_within(&mut alice, &mut bob, "after", Duration::from_secs(2)).await,
        "a message saved after Redis came back did not reach Bob within 2 s"
    );
    drop(c);
}
