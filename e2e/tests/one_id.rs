//! One message, one id, one row (SPEC §3.9) end to end: clientMsgIds are compared byte for byte on
//! every path, and a gateway refuses to start with a config that would break the idempotency window.

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::TestEnv;
use e2e::{cluster, get_json, Client};
use im_common::config::Mode;
use im_common::record::{decode, encode, Accepted, ChatMessage, MSG_FIELD};
use im_common::store::Store;

/// Alice (on the first gateway) sends "x" and then "x " to Bob (on the last one): two messages, two
/// serverMsgIds, two `ACK(saved)`, two pushes, two rows, both in history.
async fn trailing_space_makes_a_second_message(mode: Mode, name: &str, gateways: usize, shards: u16) {
    let env = TestEnv::new(name);
    let c = cluster(&env, mode, gateways, shards).await;
    let (g1, g2) = (&c.state.gateways[0], &c.state.gateways[gateways - 1]);
    let secret = &c.state.jwt_secret;
    let (alice_uid, bob_uid) = (31_001, 31_002);
    let mut alice = Client::connect(&g1.ws_url, secret, alice_uid).await;
    let mut bob = Client::connect(&g2.ws_url, secret, bob_uid).await;
    bob.ping().await;

    let mut ids = Vec::new();
    for cmid in ["x", "x "] {
        alice.chat(bob_uid, cmid, &format!("body of {cmid:?}")).await;
        if mode != Mode::Baseline {
            let accepted = alice.ack("accepted", cmid).await;
            let saved = alice.ack("saved", cmid).await;
            assert_eq!(accepted["serverMsgId"], saved["serverMsgId"], "{cmid:?}: accepted and saved disagree");
            ids.push(saved["serverMsgId"].as_str().expect("id").to_owned());
        } else {
            let saved = alice.ack("saved", cmid).await;
            ids.push(saved["serverMsgId"].as_str().expect("id").to_owned());
        }
        let push =
            bob.expect(&format!("push of {cmid:?}"), |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid).await;
        assert_eq!(push["serverMsgId"], ids.last().unwrap().as_str(), "push and receipt disagree");
    }
    assert_ne!(ids[0], ids[1], "\"x \" is a message of its own, not a retry of \"x\"");

    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    let rows: Vec<(String, String)> =
        store.all_ids().await.unwrap().into_iter().map(|(_, id, cmid)| (id.to_string(), cmid)).collect();
    assert_eq!(rows, vec![(ids[0].clone(), "x".to_owned()), (ids[1].clone(), "x ".to_owned())], "one row each");
    store.close().await;
    let token = im_common::auth::issue_token(secret, bob_uid, 60);
    let (status, body) = get_json(&format!("{}/api/messages?peer={alice_uid}&token={token}", g2.http_url)).await;
    assert_eq!(status, 200);
    let history: Vec<(&str, &str)> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["serverMsgId"].as_str().unwrap(), m["clientMsgId"].as_str().unwrap()))
        .collect();
    assert_eq!(history, vec![(ids[1].as_str(), "x "), (ids[0].as_str(), "x")], "newest first, both messages");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mode_client_msg_ids_differing_by_a_trailing_space_get_two_ids_and_two_rows() {
    trailing_space_makes_a_second_message(Mode::Full, "pad_full", 2, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_client_msg_ids_differing_by_a_trailing_space_get_two_ids_and_two_rows() {
    trailing_space_makes_a_second_message(Mode::Baseline, "pad_base", 2, 1).await;
}

/// A stream entry whose serverMsgId is already stored for another message (two gateways sharing a node
/// id could do that) has no row of its own: the worker dead-letters it and the sender gets
/// `save_failed`, never `ACK(saved)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_already_stored_for_another_message_is_dead_lettered_and_answered_save_failed() {
    let env = TestEnv::new("idcoll");
    let mut s = e2e::spec(&env, Mode::Full, 1, 1);
    s.workers = 0; // entries wait in the stream until a worker is added below
    let mut c = e2e::start(&s).await;
    let keys = env.keys();
    let secret = c.state.jwt_secret.clone();
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &secret, 32_001).await;
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, &secret, 32_002).await;
    bob.ping().await;
    alice.chat(bob.uid, "probe", "the first message with this id").await;
    let probe_id = alice.ack("accepted", "probe").await["serverMsgId"].as_str().unwrap().to_owned();

    // A second message under the same id, from the same connection, straight into the stream.
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let stream = keys.accepted_stream(0);
    let entries: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut redis).await.unwrap();
    let Some(redis::Value::BulkString(payload)) = entries.ids[0].map.get(MSG_FIELD) else { panic!("no payload") };
    let probe: Accepted = decode(payload).unwrap();
    assert_eq!(probe.msg.id.to_string(), probe_id);
    let collider = Accepted {
        msg: ChatMessage {
            client_msg_id: "collide".into(),
            body: "another message, same id".into(),
            ..probe.msg.clone()
        },
        origin: probe.origin,
        pushed_at_epoch: None,
        path_claim: false,
    };
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(MSG_FIELD)
        .arg(encode(&collider))
        .query_async(&mut redis)
        .await
        .unwrap();

    e2e::ops_on(&c, "scale", &["--workers", "1"]).await;
    c.reload().expect("the state file after scaling");
    let saved = alice.ack("saved", "probe").await;
    assert_eq!(saved["serverMsgId"], probe_id.as_str());
    let answer = alice
        .expect("an answer for collide", |v| {
            v["clientMsgId"] == "collide" && (v["type"] == "ERROR" || v["ackType"] == "saved")
        })
        .await;
    assert_eq!((answer["type"].as_str(), answer["reason"].as_str()), (Some("ERROR"), Some("save_failed")), "{answer}");

    let dead = keys.dead_letter_stream(0);
    let dead: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(&dead).arg("-").arg("+").query_async(&mut redis).await.unwrap();
    assert_eq!(dead.ids.len(), 1, "the collider is dead-lettered");
    let reason: String = dead.ids[0].get("reason").unwrap();
    assert!(reason.contains(&probe_id) && reason.contains("another message"), "{reason}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    let rows = store.all_ids().await.unwrap();
    assert_eq!(rows, vec![(alice.uid, probe.msg.id, "probe".to_owned())], "only the first message has a row");
    store.close().await;
    drop(c);
}

/// With an idempotency TTL of 0 the append script would fail after its XADD (Lua does not roll back):
/// every message appended AND saved again on the fail-open path. The gateway must not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_an_idempotency_ttl_of_zero_refuses_to_start_and_names_the_key() {
    let env = TestEnv::new("ttl0");
    let binary = im_harness::cluster::binary("gateway").expect("build the workspace first");
    let mut command = Command::new(&binary);
    for (var, _) in std::env::vars().filter(|(var, _)| var.starts_with("IM__")) {
        command.env_remove(var);
    }
    let mut child = command
        .args(["--listen", "127.0.0.1:0"])
        .env("IM__REDIS__URL", &env.redis_url)
        .env("IM__REDIS__KEY_PREFIX", &env.key_prefix)
        .env("IM__MYSQL__URL", &env.mysql_url)
        .env("IM__AUTH__JWT_SECRET", env.config().auth.jwt_secret)
        .env("IM__IDEMPOTENCY__TTL_SECS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let mut status = None;
    im_harness::poll::until_true(Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    if status.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let status = status.unwrap_or_else(|| panic!("the gateway kept running with ttl_secs = 0; output: {text}"));
    assert!(!status.success(), "exit status {status}; output: {text}");
    assert!(text.contains("idempotency.ttl_secs"), "the error names the key: {text}");
}
