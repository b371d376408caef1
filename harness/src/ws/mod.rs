//! The one WebSocket client of the protocol for tools and tests: `ops canary`, `ops chat` and the
//! end-to-end suites speak to gateways through [`Client`] (fallible, for tools) or [`TestClient`]
//! (the same client, asserting as it goes, for tests). Frames are `serde_json::Value`s whatever the
//! connection's [`Encoding`]: a MessagePack connection writes and reads them as binary frames.
//!
//! tokio-tungstenite rather than the bench's fastwebsockets client: tests need the raw stream (to send
//! an oversize frame, to read the close code, to find the socket's addresses) and tungstenite's typed
//! handshake errors (the HTTP status of a refused upgrade). The bench's client is built for many
//! thousands of connections with split halves; this one is built for a handful, one task each.

mod test_client;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_common::protocol::{Encoding, MSGPACK_SUBPROTOCOL};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use test_client::{exchange, TestClient, WAIT};
pub use tokio_tungstenite::tungstenite::Error as WsError;

/// A client-side WebSocket over plain TCP.
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for TCP, the upgrade and its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime of the tokens the client signs for itself.
const TOKEN_TTL_SECS: u64 = 3600;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("send: {0}")]
    Send(#[from] WsError),
}

/// One authenticated connection to a gateway.
pub struct Client {
    /// The user this connection is authenticated as (0 when opened without a token).
    pub uid: u64,
    /// What this client writes, and expects the gateway to write.
    pub encoding: Encoding,
    /// Frames received in the other encoding than the connection's (a gateway that ignored the
    /// negotiation would show here).
    pub foreign_frames: usize,
    ws: WsStream,
}

impl Client {
    /// Connects to `ws_url` as `uid`, with an `Authorization: Bearer` token signed by `secret`.
    pub async fn connect(ws_url: &str, secret: &str, uid: u64) -> Result<Client, ClientError> {
        Self::connect_with(ws_url, secret, uid, Encoding::Json).await
    }

    /// [`Client::connect`], asking for `encoding` by subprotocol (MessagePack: `msgpack`). The
    /// handshake fails unless the gateway selects it.
    pub async fn connect_with(ws_url: &str, secret: &str, uid: u64, encoding: Encoding) -> Result<Client, ClientError> {
        let fail = |reason: String| ClientError::Connect { url: ws_url.to_owned(), reason };
        let token = im_common::auth::issue_token(secret, uid, TOKEN_TTL_SECS);
        let mut request = ws_url.into_client_request().map_err(|e| fail(e.to_string()))?;
        let bearer = format!("Bearer {token}").parse().map_err(|_| fail("token is not a valid header".into()))?;
        request.headers_mut().insert("Authorization", bearer);
        if encoding == Encoding::MsgPack {
            request.headers_mut().insert("Sec-WebSocket-Protocol", MSGPACK_SUBPROTOCOL.parse().expect("a header"));
        }
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        Ok(Client { uid, encoding, foreign_frames: 0, ws })
    }

    /// Opens a WebSocket to `url` exactly as given (no token added): for `?auth=frame`, tokens in the
    /// query, and handshakes that are meant to be refused.
    pub async fn connect_raw(url: &str) -> Result<WsStream, WsError> {
        tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws)
    }

    /// Wraps a WebSocket opened some other way (custom socket buffers, custom headers).
    pub fn from_stream(uid: u64, ws: WsStream) -> Client {
        Client { uid, encoding: Encoding::Json, foreign_frames: 0, ws }
    }

    /// Sends one frame in the connection's encoding.
    pub async fn send_json(&mut self, frame: &Value) -> Result<(), ClientError> {
        match self.encoding {
            Encoding::Json => self.send_text(&frame.to_string()).await,
            Encoding::MsgPack => self.send_binary(Encoding::MsgPack.to_vec(frame)).await,
        }
    }

    /// Sends a binary frame as given (which need not be MessagePack).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::Binary(bytes.into())).await?)
    }

    /// Sends a text frame as given (which need not be JSON).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::Text(text.to_owned().into())).await?)
    }

    /// Sends a `SINGLE_CHAT` text message.
    pub async fn chat(&mut self, to: u64, client_msg_id: &str, body: &str) -> Result<(), ClientError> {
        self.send_json(
            &json!({"type": "SINGLE_CHAT", "to": to, "clientMsgId": client_msg_id, "msgType": "TEXT", "body": body}),
        )
        .await
    }

    /// The next frame within `wait` as a JSON value (text frames as JSON, binary ones as MessagePack;
    /// one that does not decode comes back as a JSON string of its bytes), skipping control frames;
    /// `None` on timeout, close or a broken connection.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (encoding, bytes) = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => (Encoding::Json, text.as_bytes().to_vec()),
                Ok(Some(Ok(Message::Binary(bytes)))) => (Encoding::MsgPack, bytes.to_vec()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
                _ => return None,
            };
            if encoding != self.encoding {
                self.foreign_frames += 1;
            }
            let text = || Value::String(String::from_utf8_lossy(&bytes).into_owned());
            return Some(encoding.decode(&bytes).unwrap_or_else(text));
        }
    }

    /// Reads until the server closes, at most `wait`: the close code and reason, or `None` when the
    /// connection ended without a close frame (or did not end in time).
    pub async fn close_frame(&mut self, wait: Duration) -> Option<(u16, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Some((frame.code.into(), frame.reason.to_string()))
                }
                Ok(Some(Ok(Message::Close(None)) | Err(_)) | None) | Err(_) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The underlying stream, for frames the protocol helpers do not cover.
    pub fn inner(&mut self) -> &mut WsStream {
        &mut self.ws
    }
}
