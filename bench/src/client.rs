//! One authenticated WebSocket to a gateway, split into a read half and a write half.
//!
//! fastwebsockets in the client role (the same library the gateway serves with): the HTTP upgrade
//! goes through hyper's client connection, then the socket is split so one task can read receipts
//! and pushes while another writes on its own schedule. Frames are written from owned buffers,
//! because the client role masks payloads in place (a borrowed payload would be copied first).
//!
//! A connection is ready only after a `PING` → `PONG` round trip: the gateway registers the user's
//! route before it serves frames, so after the `PONG` pushes from any gateway can reach this user.
//! Without that barrier the first messages of a run could race the route registration.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use im_common::protocol::{FrameType, ServerFrame};

use crate::spec::AuthMode;

type Stream = TokioIo<Upgraded>;

/// The read half: whole messages, reassembled from fragments.
pub struct WsReader {
    inner: FragmentCollectorRead<ReadHalf<Stream>>,
}

/// The write half.
pub struct WsWriter {
    inner: WebSocketWrite<WriteHalf<Stream>>,
}

/// Why a connection could not be opened. [`ConnectError::is_auth`] separates refused credentials
/// from connection failures, which the report counts apart.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad WebSocket URL {0}")]
    BadUrl(String),
    #[error("tcp connect: {0}")]
    Tcp(std::io::Error),
    #[error("handshake answered HTTP {0}")]
    Status(u16),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("AUTH refused")]
    AuthRefused,
    #[error("connection closed during setup")]
    Closed,
    #[error("no answer within the connect timeout")]
    Timeout,
}

impl ConnectError {
    /// Whether the gateway refused the credentials (HTTP 401 or `AUTH_FAIL`).
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Status(401) | ConnectError::AuthRefused)
    }

    /// A short label for the errors-by-reason table.
    pub fn label(&self) -> String {
        match self {
            ConnectError::BadUrl(_) => "connect_bad_url".into(),
            ConnectError::Tcp(e) => format!("connect_tcp_{:?}", e.kind()).to_lowercase(),
            ConnectError::Status(code) => format!("connect_http_{code}"),
            ConnectError::Handshake(_) => "connect_handshake".into(),
            ConnectError::AuthRefused => "auth_refused".into(),
            ConnectError::Closed => "connect_closed".into(),
            ConnectError::Timeout => "connect_timeout".into(),
        }
    }
}

/// Something a gateway sent.
#[derive(Debug)]
pub enum Incoming {
    /// A protocol frame.
    Frame(Box<ServerFrame>),
    /// A text frame that is not a valid envelope.
    Unparsable,
    /// The gateway closed the connection with this code and reason.
    Closed(u16, String),
}

/// hyper runs the connection's HTTP state machine on a task until the upgrade completes.
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Splits `ws://host:port/path?query` into (`host:port`, `/path?query`).
fn split_ws_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("ws://")?;
    match rest.find(['/', '?']) {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}

/// Opens a connection to `ws_url` as the holder of `token`, authenticates, and waits for the first
/// `PONG`. Everything, TCP included, must finish within `timeout`.
pub async fn connect(
    ws_url: &str,
    token: &str,
    auth: AuthMode,
    timeout: Duration,
) -> Result<(WsReader, WsWriter), ConnectError> {
    connect_with(ws_url, token, auth, timeout, None).await
}

/// [`connect`], with the socket's receive buffer set to `recv_buffer` bytes when given (a slow reader
/// with a small buffer backs up the gateway's outbound queue soon, as a phone on a bad link would).
pub async fn connect_with(
    ws_url: &str,
    token: &str,
    auth: AuthMode,
    timeout: Duration,
    recv_buffer: Option<u32>,
) -> Result<(WsReader, WsWriter), ConnectError> {
    tokio::time::timeout(timeout, open(ws_url, token, auth, recv_buffer)).await.map_err(|_| ConnectError::Timeout)?
}

async fn open(
    ws_url: &str,
    token: &str,
    auth: AuthMode,
    recv_buffer: Option<u32>,
) -> Result<(WsReader, WsWriter), ConnectError> {
    let (host, path) = split_ws_url(ws_url).ok_or_else(|| ConnectError::BadUrl(ws_url.to_owned()))?;
    let tcp = match recv_buffer {
        None => TcpStream::connect(host).await.map_err(ConnectError::Tcp)?,
        Some(bytes) => {
            let addr = tokio::net::lookup_host(host)
                .await
                .map_err(ConnectError::Tcp)?
                .next()
                .ok_or_else(|| ConnectError::BadUrl(ws_url.to_owned()))?;
            let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            let socket = socket.map_err(ConnectError::Tcp)?;
            socket.set_recv_buffer_size(bytes).map_err(ConnectError::Tcp)?;
            socket.connect(addr).await.map_err(ConnectError::Tcp)?
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut req = hyper::Request::builder()
        .method("GET")
        .header("Host", host)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13");
    req = match auth {
        AuthMode::Header => req.uri(path).header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
        AuthMode::Frame => {
            let sep = if path.contains('?') { '&' } else { '?' };
            req.uri(format!("{path}{sep}auth=frame"))
        }
    };
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await.map_err(|e| match e {
        WebSocketError::InvalidStatusCode(code) => ConnectError::Status(code),
        other => ConnectError::Handshake(other.to_string()),
    })?;
    ws.set_auto_close(false);
    ws.set_auto_pong(true);
    ws.set_max_message_size(1 << 20);
    let (read, write) = ws.split(tokio::io::split);
    let mut reader = WsReader { inner: FragmentCollectorRead::new(read) };
    let mut writer = WsWriter { inner: write };

    if auth == AuthMode::Frame {
        writer.send(&ClientFrame::Auth { token }).await.map_err(|_| ConnectError::Closed)?;
        match reader.next_until(|f| matches!(f.kind, FrameType::AuthOk | FrameType::AuthFail)).await? {
            FrameType::AuthOk => {}
            _ => return Err(ConnectError::AuthRefused),
        }
    }
    writer.send(&ClientFrame::Ping).await.map_err(|_| ConnectError::Closed)?;
    reader.next_until(|f| f.kind == FrameType::Pong).await?;
    Ok((reader, writer))
}

/// Frames the bench sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientFrame<'a> {
    Auth {
        token: &'a str,
    },
    Ping,
    #[serde(rename_all = "camelCase")]
    SingleChat {
        to: u64,
        client_msg_id: &'a str,
        msg_type: &'static str,
        body: &'a str,
    },
    /// A recipient's confirmation (`delivered`/`read`) of everything up to `server_msg_id`.
    #[serde(rename_all = "camelCase")]
    Ack {
        ack_type: &'static str,
        server_msg_id: String,
    },
}

impl WsWriter {
    /// Writes one JSON frame.
    pub async fn send(&mut self, frame: &ClientFrame<'_>) -> Result<(), WebSocketError> {
        // Serializing strings and integers into a Vec cannot fail.
        let text = serde_json::to_vec(frame).unwrap_or_default();
        self.inner.write_frame(Frame::text(Payload::Owned(text))).await
    }

    /// Sends a normal close (the gateway answers and ends the connection).
    pub async fn close(&mut self) {
        let _ = self.inner.write_frame(Frame::close(1000, b"bench done")).await;
    }
}

impl WsReader {
    /// The next thing the gateway sent; `Err` when the connection broke.
    pub async fn next(&mut self) -> Result<Incoming, WebSocketError> {
        // Pongs to WS pings are answered by the library (auto_pong); nothing else is owed while the
        // bench reads, so frames it would have us send (close echoes) are dropped.
        let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        loop {
            let frame = self.inner.read_frame(&mut ignore).await?;
            match frame.opcode {
                OpCode::Text => {
                    return Ok(match serde_json::from_slice::<ServerFrame>(&frame.payload) {
                        Ok(f) => Incoming::Frame(Box::new(f)),
                        Err(_) => Incoming::Unparsable,
                    })
                }
                OpCode::Close => {
                    let payload = &frame.payload;
                    let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                    return Ok(Incoming::Closed(code, reason));
                }
                _ => continue,
            }
        }
    }

    /// Reads until a frame matching `pred` (returning its type); other frames are skipped.
    async fn next_until(&mut self, pred: impl Fn(&ServerFrame) -> bool) -> Result<FrameType, ConnectError> {
        loop {
            match self.next().await {
                Ok(Incoming::Frame(f)) if pred(&f) => return Ok(f.kind),
                Ok(Incoming::Frame(_) | Incoming::Unparsable) => continue,
                Ok(Incoming::Closed(..)) | Err(_) => return Err(ConnectError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(split_ws_url("ws://127.0.0.1:8080/ws"), Some(("127.0.0.1:8080", "/ws")));
        assert_eq!(split_ws_url("ws://h:1?x=1"), Some(("h:1", "?x=1")));
        assert_eq!(split_ws_url("ws://h:1"), Some(("h:1", "/")));
        assert_eq!(split_ws_url("http://h:1/ws"), None);
    }

    #[test]
    fn client_frames_speak_the_wire_envelope() {
        let chat = ClientFrame::SingleChat { to: 42, client_msg_id: "7", msg_type: "TEXT", body: "hi" };
        assert_eq!(
            serde_json::to_string(&chat).unwrap(),
            r#"{"type":"SINGLE_CHAT","to":42,"clientMsgId":"7","msgType":"TEXT","body":"hi"}"#
        );
        assert_eq!(serde_json::to_string(&ClientFrame::Ping).unwrap(), r#"{"type":"PING"}"#);
        let ack = ClientFrame::Ack { ack_type: "delivered", server_msg_id: "384063290302533632".into() };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"type":"ACK","ackType":"delivered","serverMsgId":"384063290302533632"}"#
        );
        assert_eq!(serde_json::to_string(&ClientFrame::Auth { token: "t" }).unwrap(), r#"{"type":"AUTH","token":"t"}"#);
    }
}
