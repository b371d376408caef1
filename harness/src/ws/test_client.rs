//! [`TestClient`]: the WebSocket [`Client`] for tests, which asserts as it goes. A connection that
//! fails, a frame that does not come within [`WAIT`] or a send that fails panics with a message that
//! names the user and what was expected, so a test reads as the conversation it checks.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use im_common::protocol::Encoding;
use serde_json::{json, Value};

use super::{Client, WsError, WsStream};

/// How long a test waits for a frame it expects.
pub const WAIT: Duration = Duration::from_secs(10);

/// A [`Client`] whose calls panic instead of returning errors. `.1`: the `SYNC_DONE` of the sync
/// the gateway runs for every new connection was seen (see [`TestClient::next`]).
pub struct TestClient(Client, bool);

impl Deref for TestClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.0
    }
}

impl DerefMut for TestClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.0
    }
}

impl TestClient {
    /// Connects with `Authorization: Bearer` for `uid`.
    pub async fn connect(ws_url: &str, secret: &str, uid: u64) -> TestClient {
        Self::connect_with(ws_url, secret, uid, Encoding::Json).await
    }

    /// See [`Client::connect_with`].
    pub async fn connect_with(ws_url: &str, secret: &str, uid: u64, encoding: Encoding) -> TestClient {
        match Client::connect_with(ws_url, secret, uid, encoding).await {
            Ok(client) => TestClient(client, false),
            Err(e) => panic!("uid {uid} ({encoding:?}): {e}"),
        }
    }

    /// See [`Client::connect_raw`].
    pub async fn connect_raw(url: &str) -> Result<WsStream, WsError> {
        Client::connect_raw(url).await
    }

    /// See [`Client::from_stream`].
    pub fn from_stream(uid: u64, ws: WsStream) -> TestClient {
        TestClient(Client::from_stream(uid, ws), false)
    }

    pub async fn send_json(&mut self, frame: Value) {
        let uid = self.uid;
        self.0.send_json(&frame).await.unwrap_or_else(|e| panic!("uid {uid}: sending {frame}: {e}"));
    }

    pub async fn send_text(&mut self, text: &str) {
        let uid = self.uid;
        self.0.send_text(text).await.unwrap_or_else(|e| panic!("uid {uid}: sending {text:?}: {e}"));
    }

    /// Sends a chat message.
    pub async fn chat(&mut self, to: u64, cmid: &str, body: &str) {
        let uid = self.uid;
        self.0.chat(to, cmid, body).await.unwrap_or_else(|e| panic!("uid {uid}: sending {cmid}: {e}"));
    }

    /// The next frame — except the `SYNC_DONE` that ends the sync the gateway runs by itself for
    /// every new connection, which is skipped once: tests that read answers frame by frame are not
    /// about it (those that are use [`TestClient::expect`] or [`TestClient::drain`]).
    pub async fn next(&mut self) -> Value {
        let uid = self.uid;
        loop {
            let v = self.next_within(WAIT).await.unwrap_or_else(|| panic!("uid {uid}: no frame within {WAIT:?}"));
            if !self.1 && v["type"] == "SYNC_DONE" && v.get("peer").is_none() {
                self.1 = true;
                continue;
            }
            return v;
        }
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

    /// Reads until the server closes (at most [`WAIT`]); the close code and reason.
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        self.0.close_frame(WAIT).await
    }

    /// Waits for the `SYNC_DONE` of the sync the gateway runs for every new connection: from then on
    /// the connection is registered and has everything saved before it connected. A barrier for
    /// tests that pause or cut the gateway right after connecting.
    pub async fn synced(&mut self) {
        if !self.1 {
            self.expect("the connect-time SYNC_DONE", |v| v["type"] == "SYNC_DONE" && v.get("peer").is_none()).await;
            self.1 = true;
        }
    }

    /// `PING` → `PONG`. Also a barrier: once answered, the connection is registered (route, presence
    /// epoch) and its frames are being served. It skips other frames — a `SYNC_DONE` before the
    /// `PONG` too: use [`TestClient::synced`] for that.
    pub async fn ping(&mut self) {
        self.send_json(json!({"type": "PING"})).await;
        self.expect("PONG", |v| v["type"] == "PONG").await;
    }
}

/// `from` sends one message to `to`: asserts the sender's `ACK(saved)` and the recipient's push carry
/// the same id, and returns it.
pub async fn exchange(from: &mut TestClient, to: &mut TestClient, cmid: &str) -> String {
    from.chat(to.uid, cmid, &format!("body of {cmid}")).await;
    let ack = from.ack("saved", cmid).await;
    let id = ack["serverMsgId"].as_str().expect("serverMsgId as a string").to_owned();
    let push = to.expect(&format!("push of {cmid}"), |v| v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid).await;
    assert_eq!(push["serverMsgId"], id.as_str(), "push and receipt disagree: {push}");
    assert_eq!(push["from"], from.uid.to_string());
    id
}
