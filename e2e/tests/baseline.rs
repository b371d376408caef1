//! Baseline mode end to end: real gateway processes, real Redis and MariaDB, real WebSocket clients.

use std::time::Duration;

use e2e::TestEnv;
use e2e::{cluster, get_json, Client};
use im_common::config::Mode;
use im_common::store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_crosses_gateways_and_lands_in_history() {
    let env = TestEnv::new("cross");
    let c = cluster(&env, Mode::Baseline, 2, 1).await;
    let (g1, g2) = (&c.state.gateways[0], &c.state.gateways[1]);
    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&g1.ws_url, secret, 1001).await;
    let mut bob = Client::connect(&g2.ws_url, secret, 1002).await;

    bob.ping().await; // Bob is registered (the gateway answers frames only after that)
    alice.chat(1002, "m1", "hello bob").await;
    let saved = alice.ack("saved", "m1").await;
    let id = saved["serverMsgId"].as_str().expect("id as string").to_owned();
    let push = bob.expect("push", |v| v["type"] == "SINGLE_CHAT").await;
    assert_eq!(push["serverMsgId"], id.as_str());
    assert_eq!(push["from"], "1001");
    assert_eq!(push["body"], "hello bob");
    // Bob connected just before Alice sent: the offline resend (which runs right after connect, and
    // again 2 s later) must not push a message that was accepted after he came online a second time.
    let early = bob.drain(Duration::from_millis(2500)).await;
    assert!(early.is_empty(), "a message sent after connect was resent too: {early:?}");

    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 1);
    for (http, uid, peer) in [(&g1.http_url, 1001, 1002), (&g2.http_url, 1002, 1001)] {
        let token = im_common::auth::issue_token(secret, uid, 60);
        let (status, body) = get_json(&format!("{http}/api/messages?peer={peer}&token={token}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["messages"][0]["serverMsgId"], id.as_str());
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    }

    // A retry of the same clientMsgId: same id, still one row, no second push.
    alice.chat(1002, "m1", "hello bob").await;
    let again = alice.ack("saved", "m1").await;
    assert_eq!(again["serverMsgId"], id.as_str());
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 1);
    let extra = bob.drain(Duration::from_millis(500)).await;
    assert!(extra.iter().all(|v| v["type"] != "SINGLE_CHAT"), "bob got a second copy: {extra:?}");
    store.close().await;
    drop(c);
}
