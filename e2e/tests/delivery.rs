//! Delivery in baseline mode over real sockets: multi-device fan-out across gateways, and the offline
//! resend with its delivered cursor.

use std::time::Duration;

use serde_json::{json, Value};

use e2e::TestEnv;
use e2e::{cluster, cluster_with, Client, WAIT};
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::poll;

const ALICE: u64 = 1001;
const BOB: u64 = 1002;

/// The SINGLE_CHAT frames among `frames`.
fn chats(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|v| v["type"] == "SINGLE_CHAT").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_receives_on_both_devices() {
    let env = TestEnv::new("two_devices");
    let c = cluster(&env, Mode::Baseline, 2, 1).await;
    let (g1, g2) = (&c.state.gateways[0], &c.state.gateways[1]);
    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&g1.ws_url, secret, ALICE).await;
    // Bob's phone shares Alice's gateway (local delivery); his laptop is on the other one (pub/sub).
    let mut phone = Client::connect(&g1.ws_url, secret, BOB).await;
    let mut laptop = Client::connect(&g2.ws_url, secret, BOB).await;
    for client in [&mut alice, &mut phone, &mut laptop] {
        client.ping().await;
    }

    for (cmid, body) in [("d1", "hello both"), ("d2", "second one")] {
        alice.chat(BOB, cmid, body).await;
        let id = alice.ack("saved", cmid).await["serverMsgId"].as_str().expect("id").to_owned();
        for (device, name) in [(&mut phone, "phone"), (&mut laptop, "laptop")] {
            let push = device.expect(&format!("{cmid} on the {name}"), |v| v["type"] == "SINGLE_CHAT").await;
            assert_eq!(push["serverMsgId"], id.as_str(), "{name}: {push}");
            assert_eq!(push["clientMsgId"], cmid, "{name}: {push}");
            assert_eq!(push["from"], ALICE.to_string(), "{name}: {push}");
            assert_eq!(push["to"], BOB.to_string(), "{name}: {push}");
            assert_eq!(push["body"], body, "{name}: {push}");
            // At-least-once: a copy from the offline resend racing the push carries the same id.
            let extra = device.drain(Duration::from_millis(300)).await;
            assert!(chats(&extra).iter().all(|v| v["serverMsgId"] == id.as_str()), "{name}: {extra:?}");
        }
    }
    // Alice's own connection got receipts only, never her own message.
    let rest = alice.drain(Duration::from_millis(200)).await;
    assert!(chats(&rest).is_empty(), "the sender got a push: {rest:?}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_are_resent_in_order_until_delivered() {
    let env = TestEnv::new("offline");
    let flush_ms = 100;
    let c = cluster_with(&env, Mode::Baseline, 2, 1, |cfg| cfg.gateway.cursor_flush_ms = flush_ms).await;
    let (g1, g2) = (&c.state.gateways[0], &c.state.gateways[1]);
    let secret = &c.state.jwt_secret;
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();

    // Bob is offline while Alice sends three messages.
    let mut alice = Client::connect(&g1.ws_url, secret, ALICE).await;
    let mut ids = Vec::new();
    for (cmid, body) in [("o1", "first"), ("o2", "second"), ("o3", "third")] {
        alice.chat(BOB, cmid, body).await;
        ids.push(alice.ack("saved", cmid).await["serverMsgId"].as_str().expect("id").to_owned());
    }

    // On connect he gets all three, oldest first (seq 1, 2, 3), then SYNC_DONE, and nothing else.
    let mut bob = Client::connect(&g2.ws_url, secret, BOB).await;
    for (i, (id, body)) in ids.iter().zip(["first", "second", "third"]).enumerate() {
        let push = bob.expect(&format!("resend #{i}"), |v| v["type"] == "SINGLE_CHAT").await;
        assert_eq!(push["serverMsgId"], id.as_str(), "resend #{i} out of order: {push}");
        assert_eq!((push["body"].as_str(), push["from"].as_str()), (Some(body), Some("1001")), "{push}");
        assert_eq!(push["seq"], i as u64 + 1, "{push}");
    }
    let extra = bob.drain(Duration::from_millis(300)).await;
    assert!(chats(&extra).is_empty(), "more than the three missed messages: {extra:?}");
    assert!(extra.iter().any(|v| v["type"] == "SYNC_DONE"), "no SYNC_DONE after the sync: {extra:?}");

    // He confirms the last one (by serverMsgId, as older clients do); the gateway writes his
    // position in the conversation within a flush period or so.
    let last = ids[2].clone();
    bob.send_json(json!({"type": "ACK", "ackType": "delivered", "serverMsgId": last})).await;
    let position = format!("SELECT delivered_seq FROM positions WHERE owner_id = {BOB} AND peer_id = {ALICE}");
    let flushed =
        poll::until_true_async(WAIT, || async { store.query_u64(&position).await.is_ok_and(|c| c == 3) }).await;
    assert!(flushed, "delivered position not flushed within {WAIT:?}");
    bob.inner().close(None).await.unwrap();
    drop(bob);
    tokio::time::sleep(Duration::from_millis(3 * flush_ms)).await;

    // Reconnecting (to either gateway) resends none of them.
    let mut bob = Client::connect(&g1.ws_url, secret, BOB).await;
    bob.ping().await;
    let again = bob.drain(Duration::from_millis(700)).await;
    assert!(chats(&again).is_empty(), "delivered messages were resent: {again:?}");
    // The connection is live: a new message arrives, and only it.
    alice.chat(BOB, "o4", "fourth").await;
    let id4 = alice.ack("saved", "o4").await["serverMsgId"].as_str().expect("id").to_owned();
    let push = bob.expect("o4", |v| v["type"] == "SINGLE_CHAT").await;
    assert_eq!(push["serverMsgId"], id4.as_str(), "{push}");
    let rest = bob.drain(Duration::from_millis(300)).await;
    assert!(chats(&rest).iter().all(|v| v["serverMsgId"] == id4.as_str()), "{rest:?}");
    store.close().await;
    drop(c);
}
