//! Test support: a real WebSocket client, and clusters started the way `ops up` starts them.
#![allow(dead_code)]

pub mod traffic;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use im_common::config::Mode;
use im_common::testkit::TestEnv;
use im_ops::cluster::{ClusterSpec, TestCluster};

/// Starts `gateways` gateways (and `shards` workers in two-phase modes) for a test.
pub async fn cluster(env: &TestEnv, mode: Mode, gateways: usize, shards: u16) -> TestCluster {
    cluster_with(env, mode, gateways, shards, |_| {}).await
}

/// As [`cluster`], with a hook to adjust the config.
pub async fn cluster_with(
    env: &TestEnv,
    mode: Mode,
    gateways: usize,
    shards: u16,
    tweak: impl FnOnce(&mut im_common::config::Config),
) -> TestCluster {
    let mut spec = spec(env, mode, gateways, shards);
    tweak(&mut spec.config);
    TestCluster::start(&spec).await.expect("cluster starts")
}

/// The cluster spec [`cluster`] uses, for tests that change more (workers, private servers).
pub fn spec(env: &TestEnv, mode: Mode, gateways: usize, shards: u16) -> ClusterSpec {
    ClusterSpec {
        config: env.config(),
        gateways,
        shards,
        workers: shards.into(),
        mode,
        dir: std::env::temp_dir().join(format!("im-test-{}", env.key_prefix.replace(':', "-"))),
        force_private: false,
    }
}

/// Reads a gauge or counter from a Prometheus text page, summed over series whose labels contain
/// every `label="value"` given.
pub fn metric_value(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, v| total + v)
}

/// Polls a process's `/metrics` until `metric_value` satisfies `ok` (gauges refresh once a second,
/// counters move right after the step they count); returns the last value seen.
pub async fn wait_metric(metrics_url: &str, name: &str, labels: &[&str], ok: impl Fn(f64) -> bool) -> f64 {
    let mut value = f64::NAN;
    for _ in 0..50 {
        if let Some((_, page)) = im_ops::cluster::http_get(metrics_url).await {
            value = metric_value(&page, name, labels);
            if ok(value) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    value
}

/// A WebSocket client speaking the JSON protocol.
pub struct Client {
    pub uid: u64,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How long a test waits for an expected frame.
pub const WAIT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects with `Authorization: Bearer` for `uid`.
    pub async fn connect(ws_url: &str, secret: &str, uid: u64) -> Client {
        let token = im_common::auth::issue_token(secret, uid, 3600);
        let mut req = ws_url.into_client_request().unwrap();
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("handshake");
        Client { uid, ws }
    }

    /// Connects without a token, to `url` as given.
    pub async fn connect_raw(
        url: &str,
    ) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, tokio_tungstenite::tungstenite::Error> {
        tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws)
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.to_owned().into())).await.unwrap();
    }

    /// Sends a chat message.
    pub async fn chat(&mut self, to: u64, cmid: &str, body: &str) {
        self.send_json(json!({"type": "SINGLE_CHAT", "to": to, "clientMsgId": cmid, "msgType": "TEXT", "body": body}))
            .await;
    }

    /// The next JSON frame, or None on close/timeout.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(WAIT).await.expect("a frame")
    }

    /// Waits for a frame matching `pred`, skipping others.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(v) if pred(&v) => return v,
                Some(_) => continue,
                None => panic!("uid {}: no frame matching {what} within {WAIT:?}", self.uid),
            }
        }
    }

    /// Waits for the ACK of `ack_type` for `cmid`.
    pub async fn ack(&mut self, ack_type: &str, cmid: &str) -> Value {
        self.expect(&format!("ACK {ack_type} {cmid}"), |v| {
            v["type"] == "ACK" && v["ackType"] == ack_type && v["clientMsgId"] == cmid
        })
        .await
    }

    /// Collects frames until `wait` passes with nothing new.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next_within(wait).await {
            out.push(v);
        }
        out
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(c))))) => return Some((c.code.into(), c.reason.to_string())),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Err(_) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub fn inner(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }

    /// Wraps a WebSocket opened some other way (`?auth=frame`, a socket with custom buffers).
    pub fn from_stream(uid: u64, ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client { uid, ws }
    }

    /// `PING` → `PONG`. Also a barrier: once answered, the connection is registered (routes, offline
    /// resend started) and its frames are being served.
    pub async fn ping(&mut self) {
        self.send_json(json!({"type": "PING"})).await;
        self.expect("PONG", |v| v["type"] == "PONG").await;
    }
}

/// `from` sends one message to `to`: asserts the sender's `ACK(saved)` and the recipient's push carry
/// the same id, and returns it.
pub async fn exchange(from: &mut Client, to: &mut Client, cmid: &str) -> String {
    from.chat(to.uid, cmid, &format!("body of {cmid}")).await;
    let ack = from.ack("saved", cmid).await;
    let id = ack["serverMsgId"].as_str().expect("serverMsgId as a string").to_owned();
    let push = to.expect(&format!("push of {cmid}"), |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid).await;
    assert_eq!(push["serverMsgId"], id.as_str(), "push and receipt disagree: {push}");
    assert_eq!(push["from"], from.uid.to_string());
    id
}

/// The current value of a metric on a process (summed over its series).
pub async fn metric(metrics_url: &str, name: &str) -> f64 {
    let (_, page) = im_ops::cluster::http_get(metrics_url).await.expect("metrics answer");
    metric_value(&page, name, &[])
}

/// GET over HTTP: (status, JSON body).
pub async fn get_json(url: &str) -> (u16, Value) {
    let (status, body) = im_ops::cluster::http_get(url).await.expect("http answer");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}
