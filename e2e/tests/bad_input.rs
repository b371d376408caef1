//! Every input gets an answer (SPEC §3.7), over real sockets in baseline mode: each bad frame gets its
//! documented `ERROR` reason, oversize frames and unauthenticated connections are closed with their
//! codes, bad tokens get HTTP 401 — and meanwhile two other users on the same gateway keep chatting.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use e2e::TestEnv;
use e2e::{cluster_with, exchange, Client};
use futures_util::SinkExt;
use im_common::config::Mode;
use im_common::store::Store;

const ALICE: u64 = 1;
const BOB: u64 = 2;
const MALLORY: u64 = 66;
const MAX_BODY: usize = 100;
const MAX_FRAME: usize = 2048;

/// Connects Alice and Bob, who chat throughout a test, and proves they can.
async fn chatting_pair(ws_url: &str, secret: &str) -> (Client, Client) {
    let mut alice = Client::connect(ws_url, secret, ALICE).await;
    let mut bob = Client::connect(ws_url, secret, BOB).await;
    alice.ping().await;
    bob.ping().await;
    exchange(&mut alice, &mut bob, "pair-0").await;
    (alice, bob)
}

/// Sends `frame` raw and expects `ERROR {reason}` carrying `cmid` (or no clientMsgId when `None`).
async fn expect_error(client: &mut Client, frame: &str, reason: &str, cmid: Option<&str>) {
    client.send_text(frame).await;
    let answer = client.next().await;
    assert_eq!(answer["type"], "ERROR", "{frame} → {answer}");
    assert_eq!(answer["reason"], reason, "{frame} → {answer}");
    match cmid {
        Some(cmid) => assert_eq!(answer["clientMsgId"], cmid, "{frame} → {answer}"),
        None => assert!(answer.get("clientMsgId").is_none(), "{frame} → {answer}"),
    }
}

/// Rows stored from `uid`.
async fn rows_from(store: &Store, uid: u64) -> u64 {
    store.query_u64(&format!("SELECT COUNT(*) FROM messages WHERE from_user_id = {uid}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_reason_while_others_keep_chatting() {
    let env = TestEnv::new("bad_frames");
    let c = cluster_with(&env, Mode::Baseline, 1, 1, |cfg| cfg.gateway.max_body_chars = MAX_BODY).await;
    let g = &c.state.gateways[0];
    let secret = &c.state.jwt_secret;
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    let (mut alice, mut bob) = chatting_pair(&g.ws_url, secret).await;
    let mut mallory = Client::connect(&g.ws_url, secret, MALLORY).await;

    let too_long = "é".repeat(MAX_BODY + 1);
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{not json".into(), "bad_json", None),
        (r#"["SINGLE_CHAT"]"#.into(), "bad_json", None),
        (r#"{"clientMsgId":"b1","to":1,"body":"x"}"#.into(), "missing_type", Some("b1")),
        (r#"{"type":"GROUP_CHAT","clientMsgId":"b2","to":1,"body":"x"}"#.into(), "not_implemented", Some("b2")),
        (r#"{"type":"SINGLE_CHAT","clientMsgId":"b3","body":"x"}"#.into(), "missing_to", Some("b3")),
        (r#"{"type":"SINGLE_CHAT","to":1,"body":"x"}"#.into(), "missing_msg_id", None),
        (r#"{"type":"SINGLE_CHAT","clientMsgId":"b4","to":1}"#.into(), "missing_body", Some("b4")),
        (
            json!({"type":"SINGLE_CHAT","clientMsgId":"b5","to":1,"body":too_long}).to_string(),
            "body_too_long",
            Some("b5"),
        ),
        (r#"{"type":"SINGLE_CHAT","clientMsgId":"b6","to":66,"body":"x"}"#.into(), "cannot_send_to_self", Some("b6")),
        (r#"{"type":"SINGLE_CHAT","clientMsgId":"b7","to":1,"from":2,"body":"x"}"#.into(), "spoofed_from", Some("b7")),
    ];
    for (i, (frame, reason, cmid)) in cases.iter().enumerate() {
        expect_error(&mut mallory, frame, reason, *cmid).await;
        // Interleaved: the pair on the same gateway is unaffected, in both directions.
        if i % 2 == 0 {
            exchange(&mut alice, &mut bob, &format!("pair-a{i}")).await;
        } else {
            exchange(&mut bob, &mut alice, &format!("pair-b{i}")).await;
        }
    }
    // Mallory's connection survived all of it: PING → PONG, and a proper message still goes through,
    // with a body of exactly the limit in (multi-byte) characters.
    mallory.send_json(json!({"type": "PING"})).await;
    assert_eq!(mallory.next().await["type"], "PONG");
    mallory.chat(ALICE, "ok-1", &"é".repeat(MAX_BODY)).await;
    assert_eq!(mallory.ack("saved", "ok-1").await["clientMsgId"], "ok-1");
    let push = alice.expect("mallory's message", |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == "ok-1").await;
    assert_eq!(push["from"], MALLORY.to_string());
    // A forged `from` stored nothing: the one row from Mallory is the proper message.
    assert_eq!(rows_from(&store, MALLORY).await, 1);
    assert_eq!(
        store
            .query_u64("SELECT COUNT(*) FROM messages WHERE from_user_id <> 66 AND client_msg_id = 'b7'")
            .await
            .unwrap(),
        0
    );

    // A flood past the rate limit (50/s, burst 100): some frames get too_many_requests, each answer
    // carries its clientMsgId, and nothing refused was stored. Every tenth frame is a real message
    // to an offline user; the rest are cheap refusals, so the flood outruns the token refill.
    let (flood, rate, burst) = (300, 50.0, 100.0);
    let started = std::time::Instant::now();
    for i in 0..flood {
        let to = if i % 10 == 0 { 4242 } else { MALLORY };
        mallory.send_json(json!({"type":"SINGLE_CHAT","to":to,"clientMsgId":format!("f{i}"),"body":"flood"})).await;
    }
    let (mut served, mut saved, mut limited) = (0, Vec::new(), Vec::new());
    for _ in 0..flood {
        let v = mallory.next().await;
        let cmid = v["clientMsgId"].as_str().unwrap_or_else(|| panic!("answer without clientMsgId: {v}")).to_owned();
        match (v["type"].as_str(), v["ackType"].as_str(), v["reason"].as_str()) {
            (Some("ACK"), Some("saved"), _) => saved.push(cmid),
            (Some("ERROR"), _, Some("too_many_requests")) => limited.push(cmid),
            (Some("ERROR"), _, Some("cannot_send_to_self")) => served += 1,
            _ => panic!("unexpected answer in the flood: {v}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    served += saved.len();
    println!(
        "flood of {flood} in {elapsed:.3} s: {served} served ({} saved), {} too_many_requests",
        saved.len(),
        limited.len()
    );
    assert!(!limited.is_empty(), "no frame of the flood was rate limited");
    assert!((served as f64) <= burst + rate * elapsed + 1.0, "{served} frames served in {elapsed:.3} s");
    assert!(!saved.is_empty(), "the burst let no real message through");
    assert_eq!(rows_from(&store, MALLORY).await, 1 + saved.len() as u64, "refused messages were stored");
    for cmid in limited.iter().filter(|c| c[1..].parse::<u32>().unwrap() % 10 == 0) {
        let n =
            store.query_u64(&format!("SELECT COUNT(*) FROM messages WHERE client_msg_id = '{cmid}'")).await.unwrap();
        assert_eq!(n, 0, "{cmid} was refused but stored");
    }
    // The limit is per connection: the pair never noticed.
    exchange(&mut alice, &mut bob, "pair-after-flood").await;
    exchange(&mut bob, &mut alice, "pair-after-flood-back").await;
    store.close().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_only_that_connection() {
    let env = TestEnv::new("oversize");
    let c = cluster_with(&env, Mode::Baseline, 1, 1, |cfg| cfg.gateway.max_frame_bytes = MAX_FRAME).await;
    let g = &c.state.gateways[0];
    let secret = &c.state.jwt_secret;
    let (mut alice, mut bob) = chatting_pair(&g.ws_url, secret).await;
    let mut mallory = Client::connect(&g.ws_url, secret, MALLORY).await;
    let mut bystander = Client::connect(&g.ws_url, secret, MALLORY).await;
    mallory.ping().await;
    bystander.ping().await;

    // A frame just under the limit is an ordinary frame ...
    let body = "x".repeat(MAX_FRAME - 200);
    mallory.chat(ALICE, "fits", &body).await;
    mallory.ack("saved", "fits").await;
    let push = alice.expect("the big-but-fitting message", |v| v["clientMsgId"] == "fits").await;
    assert_eq!(push["body"].as_str().map(str::len), Some(body.len()));

    // ... one over it closes that connection with 1009.
    let huge = json!({"type":"SINGLE_CHAT","to":ALICE,"clientMsgId":"huge","body":"x".repeat(MAX_FRAME)}).to_string();
    mallory.inner().send(Message::Text(huge.into())).await.unwrap();
    let close = mallory.close_frame().await;
    assert_eq!(close.as_ref().map(|c| c.0), Some(1009), "expected close 1009, got {close:?}");

    // Everyone else on the gateway, including Mallory's other device, carries on.
    bystander.ping().await;
    exchange(&mut alice, &mut bob, "pair-1").await;
    exchange(&mut bystander, &mut alice, "from-the-bystander").await;
    drop(c);
}

/// A WebSocket on `?auth=frame`, no token.
async fn connect_frame_auth(ws_url: &str) -> Client {
    let ws = Client::connect_raw(&format!("{ws_url}?auth=frame")).await.expect("?auth=frame handshake needs no token");
    Client::from_stream(0, ws)
}

/// The HTTP status of a refused handshake.
async fn handshake_status(url: &str, bearer: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(token) = bearer {
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{url}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{url}: handshake accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_refused_while_others_keep_chatting() {
    let env = TestEnv::new("unauth");
    let c = cluster_with(&env, Mode::Baseline, 1, 1, |_| {}).await;
    let g = &c.state.gateways[0];
    let secret = &c.state.jwt_secret;
    let (mut alice, mut bob) = chatting_pair(&g.ws_url, secret).await;

    // A chat frame before AUTH on `?auth=frame`: ERROR unauthorized, then close 1008.
    let mut anon = connect_frame_auth(&g.ws_url).await;
    anon.chat(ALICE, "sneaky", "hi").await;
    let answer = anon.next().await;
    assert_eq!((answer["type"].as_str(), answer["reason"].as_str()), (Some("ERROR"), Some("unauthorized")), "{answer}");
    let close = anon.close_frame().await;
    assert_eq!(close.as_ref().map(|c| c.0), Some(1008), "{close:?}");
    exchange(&mut alice, &mut bob, "pair-1").await;

    // AUTH first frame with a valid token: AUTH_OK, then chatting works both ways.
    let mut carol = connect_frame_auth(&g.ws_url).await;
    carol.uid = 3;
    carol.send_json(json!({"type": "AUTH", "token": im_common::auth::issue_token(secret, 3, 60)})).await;
    assert_eq!(carol.next().await["type"], "AUTH_OK");
    exchange(&mut carol, &mut alice, "carol-1").await;
    exchange(&mut bob, &mut carol, "to-carol-1").await;

    // AUTH with a bad token: AUTH_FAIL, then close.
    let mut forger = connect_frame_auth(&g.ws_url).await;
    forger
        .send_json(json!({"type": "AUTH", "token": im_common::auth::issue_token("not-the-secret-at-all", 3, 60)}))
        .await;
    assert_eq!(forger.next().await["type"], "AUTH_FAIL");
    let close = forger.close_frame().await;
    assert_eq!(close.as_ref().map(|c| c.0), Some(1008), "{close:?}");
    exchange(&mut bob, &mut alice, "pair-2").await;

    // Handshakes without a valid token: HTTP 401, by header or query.
    let expired = encode(
        &Header::new(Algorithm::HS256),
        &json!({"uid": ALICE, "exp": im_common::ids::now_ms() / 1000 - 60}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let badly_signed = im_common::auth::issue_token("not-the-secret-at-all", ALICE, 3600);
    let mut tampered = im_common::auth::issue_token(secret, ALICE, 3600);
    tampered.push('x');
    assert_eq!(handshake_status(&g.ws_url, None).await, 401, "no token");
    for (name, token) in [("expired", &expired), ("badly signed", &badly_signed), ("tampered", &tampered)] {
        assert_eq!(handshake_status(&g.ws_url, Some(token)).await, 401, "{name} token in the header");
        assert_eq!(
            handshake_status(&format!("{}?token={token}", g.ws_url), None).await,
            401,
            "{name} token in the query"
        );
    }
    // The same expired token, but valid otherwise, is accepted once fresh: the 401 was about `exp`.
    let fresh = encode(
        &Header::new(Algorithm::HS256),
        &json!({"uid": ALICE, "exp": im_common::ids::now_ms() / 1000 + 60}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let ws = Client::connect_raw(&format!("{}?token={fresh}", g.ws_url)).await.expect("fresh token accepted");
    let mut alice2 = Client::from_stream(ALICE, ws);
    alice2.ping().await;

    // Nothing unauthenticated reached the store; the pair still chats.
    exchange(&mut alice, &mut bob, "pair-3").await;
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    let sneaky = store.query_u64("SELECT COUNT(*) FROM messages WHERE client_msg_id = 'sneaky'").await.unwrap();
    assert_eq!(sneaky, 0);
    store.close().await;
    drop(c);
}
