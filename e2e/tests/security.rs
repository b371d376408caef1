//! Security checks as tests: forged and malformed tokens at the handshake, a connection cap, an
//! Origin allow-list, SQL-looking bodies stored verbatim, and secrets kept out of the logs.

use e2e::TestEnv;
use e2e::{cluster_with, get_json, wait_metric, Client};
use im_common::config::Mode;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

/// The HTTP status a handshake got (101 when the upgrade succeeded).
async fn handshake_status(url: &str, headers: &[(&'static str, String)]) -> u16 {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_caps_and_origins_are_refused() {
    let env = TestEnv::new("security");
    let c = cluster_with(&env, Mode::Full, 1, 1, |cfg| {
        cfg.gateway.max_connections = 3;
        cfg.gateway.allowed_origins = vec!["https://chat.example".into()];
    })
    .await;
    let (url, secret) = (c.state.gateways[0].ws_url.clone(), c.state.jwt_secret.clone());
    let exp = im_common::ids::now_ms() / 1000 + 600;
    // alg:none with a valid-looking payload and no signature.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(format!(r#"{{"uid":42,"exp":{exp}}}"#).as_bytes())
    );
    assert_eq!(handshake_status(&format!("{url}?token={none}"), &[]).await, 401, "alg:none");
    // Correctly signed, but no uid claim.
    let no_uid = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "exp": exp, "sub": "42" }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    assert_eq!(handshake_status(&format!("{url}?token={no_uid}"), &[]).await, 401, "missing uid");
    let good = im_common::auth::issue_token(&secret, 42, 60);
    assert_eq!(handshake_status(&format!("{url}?token={good}"), &[]).await, 101);

    // Origin allow-list: a listed origin passes, another is refused, none at all passes.
    let origin = |o: &str| vec![("Origin", o.to_owned())];
    assert_eq!(handshake_status(&format!("{url}?token={good}"), &origin("https://evil.example")).await, 403);
    assert_eq!(handshake_status(&format!("{url}?token={good}"), &origin("https://chat.example")).await, 101);

    // Connection cap: with 3 open, the 4th gets 503; closing one makes room. (First the probes above
    // must have left: their slots are freed when the gateway sees them close.)
    let gone = wait_metric(&c.state.gateways[0].metrics_url, "im_gateway_connections", &[], |v| v == 0.0).await;
    assert_eq!(gone, 0.0, "the probe connections closed");
    let mut open = Vec::new();
    for uid in 1..=3 {
        open.push(Client::connect(&url, &secret, uid).await);
    }
    assert_eq!(handshake_status(&format!("{url}?token={good}"), &[]).await, 503);
    drop(open.pop());
    let room = im_harness::poll::until_true_async(e2e::METRIC_WAIT, || async {
        handshake_status(&format!("{url}?token={good}"), &[]).await == 101
    })
    .await;
    assert!(room, "a closed connection frees its slot");
    drop(open);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_looking_bodies_are_stored_verbatim_and_secrets_never_logged() {
    let env = TestEnv::new("verbatim");
    let c = cluster_with(&env, Mode::Full, 1, 1, |_| {}).await;
    let (url, secret) = (c.state.gateways[0].ws_url.clone(), c.state.jwt_secret.clone());
    let mut alice = Client::connect(&url, &secret, 11).await;
    let bodies = [
        "'); DROP TABLE messages; --",
        "\" OR 1=1 --",
        "Robert'); DELETE FROM conversations;",
        "\\x00\\'\u{0}\u{1F600}",
    ];
    for (i, body) in bodies.iter().enumerate() {
        alice.chat(12, &format!("s{i}"), body).await;
        alice.ack("saved", &format!("s{i}")).await;
    }
    let token = im_common::auth::issue_token(&secret, 11, 60);
    let (status, history) =
        get_json(&format!("{}/api/messages?peer=12&token={token}", c.state.gateways[0].http_url)).await;
    assert_eq!(status, 200);
    let stored: Vec<&str> =
        history["messages"].as_array().unwrap().iter().rev().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(stored, bodies, "bodies come back byte for byte, and the tables are still there");

    // Bad tokens were tried above and in handshakes; neither the secret nor any token is in the logs.
    let _ = handshake_status(&format!("{url}?token=not.a.token"), &[]).await;
    for log in c.state.gateways.iter().map(|g| &g.log).chain(c.state.workers.iter().map(|w| &w.log)) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains(&secret), "secret in {}", log.display());
        assert!(!text.contains(&token), "token in {}", log.display());
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_with_4000_and_a_chatty_one_is_not() {
    let env = TestEnv::new("idle");
    let c = cluster_with(&env, Mode::Baseline, 1, 1, |cfg| cfg.gateway.idle_timeout_ms = 1000).await;
    let (url, secret) = (c.state.gateways[0].ws_url.clone(), c.state.jwt_secret.clone());
    let mut idle = Client::connect(&url, &secret, 21).await;
    let mut chatty = Client::connect(&url, &secret, 22).await;
    let started = std::time::Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        chatty.send_json(serde_json::json!({"type": "PING"})).await;
        assert_eq!(chatty.next().await["type"], "PONG");
    }
    assert_eq!(idle.close_frame().await, Some((4000, "idle_timeout".to_owned())));
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    chatty.send_json(serde_json::json!({"type": "PING"})).await;
    assert_eq!(chatty.next().await["type"], "PONG", "the chatty connection lives on");
    drop(c);
}
