//! A gateway's presence in the cluster (SPEC §3.11): pushes published while its users seemed
//! offline reach them anyway — a gateway that was stalled past its route entries' lifetime asks its
//! clients to reconnect (1012) so they resync, instead of carrying on as if nothing was missed.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use e2e::{spec, Client, TestEnv, WAIT};
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
