//! The MessagePack subprotocol (SPEC §4) against real processes: a client that offers `msgpack`
//! reads every frame in binary MessagePack, the same envelope as JSON, and chats with JSON clients
//! through the whole pipeline; bad MessagePack is refused by name and loses nothing.

use std::time::Duration;

use e2e::{exchange, Client, TestEnv, Traffic};
use im_bench::{run_load, LoadSpec, Target, WireEncoding};
use im_common::config::Mode;
use im_common::protocol::Encoding;
use serde_json::json;

const ALICE: u64 = 8101;
const BOB: u64 = 8102;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messagepack_client_and_json_clients_chat_each_reading_its_own_encoding() {
    let env = TestEnv::new("msgpack_chat");
    let c = e2e::cluster(&env, Mode::Full, 2, 1).await;
    let secret = &c.state.jwt_secret;
    let (near, far) = (&c.state.gateways[0].ws_url, &c.state.gateways[1].ws_url);
    let mut alice = Client::connect_with(near, secret, ALICE, Encoding::MsgPack).await;
    // Bob has two devices on the other gateway, one in each encoding: one push, written twice.
    let mut bob_json = Client::connect(far, secret, BOB).await;
    let mut bob_packed = Client::connect_with(far, secret, BOB, Encoding::MsgPack).await;
    for client in [&mut alice, &mut bob_json, &mut bob_packed] {
        client.ping().await;
    }

    let id = exchange(&mut alice, &mut bob_json, "to-bob").await;
    let push =
        bob_packed.expect("push of to-bob", |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == "to-bob").await;
    assert_eq!((push["serverMsgId"].as_str(), push["seq"].as_u64()), (Some(id.as_str()), Some(1)), "{push}");
    assert_eq!(push["body"], "body of to-bob");
    exchange(&mut bob_packed, &mut alice, "to-alice").await;

    // A position confirmed in JSON reaches the MessagePack sender as a RECEIPT.
    bob_json.send_json(json!({"type": "ACK", "ackType": "read", "from": ALICE.to_string(), "seq": 1})).await;
    let receipt = alice.expect("RECEIPT read", |v| v["type"] == "RECEIPT" && v["ackType"] == "read").await;
    assert_eq!((receipt["peer"].as_str(), receipt["seq"].as_u64()), (Some(BOB.to_string().as_str()), Some(1)));

    for client in [&alice, &bob_json, &bob_packed] {
        assert_eq!(client.foreign_frames, 0, "uid {} got frames in the other encoding", client.uid);
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_is_not_messagepack_gets_bad_msgpack_and_the_connection_goes_on() {
    let env = TestEnv::new("msgpack_bad");
    let c = e2e::cluster_with(&env, Mode::Baseline, 1, 1, |cfg| cfg.gateway.max_body_chars = 20).await;
    let (ws, secret) = (&c.state.gateways[0].ws_url, &c.state.jwt_secret);
    let mut alice = Client::connect_with(ws, secret, ALICE, Encoding::MsgPack).await;
    let mut bob = Client::connect(ws, secret, BOB).await;
    alice.ping().await;

    for bad in [vec![0xc1], b"{\"type\":\"PING\"}".to_vec(), vec![0x81, 0xa4, b't']] {
        alice.send_binary(bad.clone()).await.unwrap();
        let answer = alice.next().await;
        assert_eq!(
            (answer["type"].as_str(), answer["reason"].as_str()),
            (Some("ERROR"), Some("bad_msgpack")),
            "{bad:?}"
        );
    }
    // Validation is the same as in JSON, clientMsgId included.
    let long = json!({"type": "SINGLE_CHAT", "clientMsgId": "long", "to": BOB, "body": "x".repeat(21)});
    alice.send_json(long).await;
    let answer = alice.next().await;
    assert_eq!((answer["reason"].as_str(), answer["clientMsgId"].as_str()), (Some("body_too_long"), Some("long")));
    // A JSON connection may send a binary frame too; it is answered in JSON.
    bob.send_binary(Encoding::MsgPack.encode(&json!({"type": "PING"})).to_vec()).await.unwrap();
    assert_eq!(bob.expect("PONG", |v| v["type"] == "PONG").await["type"], "PONG");

    exchange(&mut alice, &mut bob, "after-bad").await;
    assert!(alice.drain(Duration::from_millis(300)).await.iter().all(|v| v["type"] != "ERROR"));
    assert_eq!((alice.foreign_frames, bob.foreign_frames), (0, 0));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_in_messagepack_sees_every_message_receipted_delivered_and_saved_once() {
    let env = TestEnv::new("msgpack_bench");
    let c = e2e::cluster(&env, Mode::Full, 2, 2).await;
    let traffic =
        Traffic { pairs: 50, per_sender: 20, pace: Duration::from_millis(5), deadline: Duration::from_secs(30) };
    let load = LoadSpec { encoding: WireEncoding::Msgpack, ..traffic.load() };
    let target = Target::from_state(&c.state).expect("a target");
    let result = run_load(&target, &load).await.expect("the traffic runs");
    let v = &result.verdict;
    assert_eq!((v.errored, v.accepted, v.saved, v.delivered), (0, 1000, 1000, 1000), "{v:?}");
    assert_eq!((v.lost, v.reorders, v.id_mismatches), (0, 0, 0), "{v:?}");
    drop(c);
}
