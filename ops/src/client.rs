//! A minimal WebSocket client of the JSON protocol, for operator tools (`ops canary`, drills).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect {0}: {1}")]
    Connect(String, String),
    #[error("send: {0}")]
    Send(String),
}

/// One authenticated connection.
pub struct Client {
    pub uid: u64,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects as `uid` with a token signed by `secret`.
    pub async fn connect(ws_url: &str, secret: &str, uid: u64) -> Result<Client, ClientError> {
        let token = im_common::auth::issue_token(secret, uid, 3600);
        let fail = |e: String| ClientError::Connect(ws_url.to_owned(), e);
        let mut req = ws_url.into_client_request().map_err(|e| fail(e.to_string()))?;
        let bearer = format!("Bearer {token}").parse().map_err(|_| fail("bad token header".into()))?;
        req.headers_mut().insert("Authorization", bearer);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        Ok(Client { uid, ws })
    }

    /// Sends a `SINGLE_CHAT`.
    pub async fn chat(&mut self, to: u64, client_msg_id: &str, body: &str) -> Result<(), ClientError> {
        let frame =
            json!({"type": "SINGLE_CHAT", "to": to, "clientMsgId": client_msg_id, "msgType": "TEXT", "body": body});
        self.ws.send(Message::Text(frame.to_string().into())).await.map_err(|e| ClientError::Send(e.to_string()))
    }

    /// The next JSON frame within `wait`, or `None` (timeout or closed).
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }
}
