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

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::spec::AuthMode;
use im_common::protocol::{Encoding, MSGPACK_SUBPROTOCOL};

type Stream = TokioIo<Upgraded>;

/// The read half: whole messages, reassembled from fragments.
pub struct WsReader {
    inner: FragmentCollectorRead<ReadHalf<Stream>>,
    /// Frames that arrived while the connection was being set up (before the first `PONG`): a
    /// sync's pushes and its `SYNC_DONE` may come first. [`WsReader::next`] hands them out first.
    early: std::collections::VecDeque<Received>,
}

/// The write half.
pub struct WsWriter {
    inner: WebSocketWrite<WriteHalf<Stream>>,
    encoding: Encoding,
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

/// A frame type the gateway sends (docs/PROTOCOL.md). Read leniently: a type this bench does not
/// know is [`Kind::Other`], never an unparsable frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    SingleChat,
    Ack,
    Pong,
    AuthOk,
    AuthFail,
    Error,
    SyncDone,
    Receipt,
    #[serde(other)]
    Other,
}

/// The `ackType` of an `ACK` or `RECEIPT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    Accepted,
    Saved,
    Delivered,
    Read,
    #[serde(other)]
    Other,
}

/// One frame from the gateway, as the bench reads it: ids as numbers or decimal strings, unknown
/// fields ignored, any `reason` kept as text. The bench keeps its own reading of the envelope, so a
/// server that adds a frame type or a reason never turns a frame into an unparsable one here.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Received {
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(default, deserialize_with = "text")]
    pub client_msg_id: Option<String>,
    #[serde(default, deserialize_with = "decimal")]
    pub server_msg_id: Option<u64>,
    #[serde(default, deserialize_with = "decimal")]
    pub from: Option<u64>,
    #[serde(default, deserialize_with = "decimal")]
    pub to: Option<u64>,
    #[serde(default, deserialize_with = "decimal")]
    pub peer: Option<u64>,
    /// The message's position in its sender→recipient direction (pushes), or the position a
    /// `RECEIPT` confirms.
    #[serde(default, deserialize_with = "decimal")]
    pub seq: Option<u64>,
    #[serde(default)]
    pub ack_type: Option<AckKind>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Received {
    /// The `reason`, or `unknown`.
    pub fn reason(&self) -> &str {
        self.reason.as_deref().unwrap_or("unknown")
    }
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
    Other(serde::de::IgnoredAny),
}

/// An id or a count written as a JSON number or a decimal string (anything else reads as absent).
fn decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<NumOrStr>::deserialize(d)? {
        Some(NumOrStr::Num(n)) => Some(n),
        Some(NumOrStr::Str(s)) => s.parse().ok(),
        _ => None,
    })
}

/// A string, or a number written as its decimal text.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<NumOrStr>::deserialize(d)? {
        Some(NumOrStr::Num(n)) => Some(n.to_string()),
        Some(NumOrStr::Str(s)) => Some(s),
        _ => None,
    })
}

/// Something a gateway sent.
#[derive(Debug)]
pub enum Incoming {
    /// A protocol frame.
    Frame(Box<Received>),
    /// A frame that is not a valid envelope.
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
    connect_with(ws_url, token, auth, timeout, ConnectOptions::default()).await
}

/// How a connection is opened beyond its URL and credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The socket's receive buffer in bytes (a slow reader with a small buffer backs up the
    /// gateway's outbound queue soon, as a phone on a bad link would).
    pub recv_buffer: Option<u32>,
    /// `?sync=manual`: the gateway does not sync the connection by itself; the client sends `SYNC`
    /// (with its own positions) when it is ready.
    pub manual_sync: bool,
    /// What the connection speaks; MessagePack is asked for by subprotocol, and the connection fails
    /// unless the gateway selects it.
    pub encoding: Encoding,
}

/// [`connect`], with [`ConnectOptions`].
pub async fn connect_with(
    ws_url: &str,
    token: &str,
    auth: AuthMode,
    timeout: Duration,
    options: ConnectOptions,
) -> Result<(WsReader, WsWriter), ConnectError> {
    tokio::time::timeout(timeout, open(ws_url, token, auth, options)).await.map_err(|_| ConnectError::Timeout)?
}

/// `path` with `param` added to its query string.
fn with_query(path: &str, param: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}{param}")
}

async fn open(
    ws_url: &str,
    token: &str,
    auth: AuthMode,
    options: ConnectOptions,
) -> Result<(WsReader, WsWriter), ConnectError> {
    let (host, path) = split_ws_url(ws_url).ok_or_else(|| ConnectError::BadUrl(ws_url.to_owned()))?;
    let path = if options.manual_sync { with_query(path, "sync=manual") } else { path.to_owned() };
    let recv_buffer = options.recv_buffer;
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
    if options.encoding == Encoding::MsgPack {
        req = req.header(hyper::header::SEC_WEBSOCKET_PROTOCOL, MSGPACK_SUBPROTOCOL);
    }
    req = match auth {
        AuthMode::Header => req.uri(path).header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
        AuthMode::Frame => req.uri(with_query(&path, "auth=frame")),
    };
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let (mut ws, response) =
        fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await.map_err(|e| match e {
            WebSocketError::InvalidStatusCode(code) => ConnectError::Status(code),
            other => ConnectError::Handshake(other.to_string()),
        })?;
    let selected = response.headers().get(hyper::header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
    if options.encoding == Encoding::MsgPack && selected != Some(MSGPACK_SUBPROTOCOL) {
        return Err(ConnectError::Handshake(format!("the gateway did not select msgpack (it answered {selected:?})")));
    }
    ws.set_auto_close(false);
    ws.set_auto_pong(true);
    ws.set_max_message_size(1 << 20);
    let (read, write) = ws.split(tokio::io::split);
    let mut reader = WsReader { inner: FragmentCollectorRead::new(read), early: Default::default() };
    let mut writer = WsWriter { inner: write, encoding: options.encoding };

    if auth == AuthMode::Frame {
        writer.send(&ClientFrame::Auth { token }).await.map_err(|_| ConnectError::Closed)?;
        match reader.next_until(|f| matches!(f.kind, Kind::AuthOk | Kind::AuthFail)).await? {
            Kind::AuthOk => {}
            _ => return Err(ConnectError::AuthRefused),
        }
    }
    writer.send(&ClientFrame::Ping).await.map_err(|_| ConnectError::Closed)?;
    reader.next_until(|f| f.kind == Kind::Pong).await?;
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
    /// A recipient's confirmation (`delivered`/`read`) of everything up to `server_msg_id` (the
    /// older form).
    #[serde(rename = "ACK", rename_all = "camelCase")]
    Ack {
        ack_type: &'static str,
        server_msg_id: String,
    },
    /// A recipient's position in the conversation with `from`: every message up to `seq`
    /// (`delivered` or `read`).
    #[serde(rename = "ACK", rename_all = "camelCase")]
    AckSeq {
        ack_type: &'static str,
        from: String,
        seq: u64,
    },
    /// `SYNC {}` (the server's positions), `SYNC {positions}` (the device's own), or
    /// `SYNC {peer, afterSeq}` (one conversation).
    #[serde(rename_all = "camelCase")]
    Sync {
        #[serde(skip_serializing_if = "Option::is_none")]
        positions: Option<BTreeMap<String, u64>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        after_seq: Option<u64>,
    },
}

impl WsWriter {
    /// `frame` in the connection's encoding, for [`WsWriter::send_encoded`] (to send it often).
    pub fn encode(&self, frame: &ClientFrame<'_>) -> Vec<u8> {
        self.encoding.to_vec(frame)
    }

    /// Writes one frame encoded by [`WsWriter::encode`].
    pub async fn send_encoded(&mut self, bytes: Vec<u8>) -> Result<(), WebSocketError> {
        let opcode = if self.encoding.is_binary() { OpCode::Binary } else { OpCode::Text };
        self.inner.write_frame(Frame::new(true, opcode, None, Payload::Owned(bytes))).await
    }

    /// Writes one frame.
    pub async fn send(&mut self, frame: &ClientFrame<'_>) -> Result<(), WebSocketError> {
        self.send_encoded(self.encode(frame)).await
    }

    /// Sends a normal close (the gateway answers and ends the connection).
    pub async fn close(&mut self) {
        let _ = self.inner.write_frame(Frame::close(1000, b"bench done")).await;
    }
}

impl WsReader {
    /// The next thing the gateway sent; `Err` when the connection broke.
    pub async fn next(&mut self) -> Result<Incoming, WebSocketError> {
        if let Some(frame) = self.early.pop_front() {
            return Ok(Incoming::Frame(Box::new(frame)));
        }
        // Pongs to WS pings are answered by the library (auto_pong); nothing else is owed while the
        // bench reads, so frames it would have us send (close echoes) are dropped.
        let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        loop {
            let frame = self.inner.read_frame(&mut ignore).await?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    let encoding = Encoding::of_frame(frame.opcode == OpCode::Binary);
                    return Ok(match encoding.decode::<Received>(&frame.payload) {
                        Some(f) => Incoming::Frame(Box::new(f)),
                        None => Incoming::Unparsable,
                    });
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

    /// Reads until a frame matching `pred` (returning its type); other frames are kept for
    /// [`WsReader::next`] (unparsable ones are dropped).
    async fn next_until(&mut self, pred: impl Fn(&Received) -> bool) -> Result<Kind, ConnectError> {
        let mut early = std::mem::take(&mut self.early);
        let result = loop {
            match self.next().await {
                Ok(Incoming::Frame(f)) if pred(&f) => break Ok(f.kind),
                Ok(Incoming::Frame(f)) => early.push_back(*f),
                Ok(Incoming::Unparsable) => continue,
                Ok(Incoming::Closed(..)) | Err(_) => break Err(ConnectError::Closed),
            }
        };
        self.early = early;
        result
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
        let ack = ClientFrame::AckSeq { ack_type: "read", from: "1001".into(), seq: 42 };
        assert_eq!(serde_json::to_string(&ack).unwrap(), r#"{"type":"ACK","ackType":"read","from":"1001","seq":42}"#);
        let sync = ClientFrame::Sync { positions: None, peer: None, after_seq: None };
        assert_eq!(serde_json::to_string(&sync).unwrap(), r#"{"type":"SYNC"}"#);
        let own = ClientFrame::Sync { positions: Some([("1001".to_owned(), 7)].into()), peer: None, after_seq: None };
        assert_eq!(serde_json::to_string(&own).unwrap(), r#"{"type":"SYNC","positions":{"1001":7}}"#);
        let gap = ClientFrame::Sync { positions: None, peer: Some("1001".into()), after_seq: Some(0) };
        assert_eq!(serde_json::to_string(&gap).unwrap(), r#"{"type":"SYNC","peer":"1001","afterSeq":0}"#);
    }

    #[test]
    fn server_frames_are_read_leniently() {
        let push: Received = serde_json::from_str(
            r#"{"type":"SINGLE_CHAT","from":"1001","to":1002,"clientMsgId":"7","serverMsgId":"3840","seq":42,"body":"x","ts":1}"#,
        )
        .unwrap();
        assert_eq!(
            (push.kind, push.from, push.to, push.seq, push.server_msg_id, push.client_msg_id.as_deref()),
            (Kind::SingleChat, Some(1001), Some(1002), Some(42), Some(3840), Some("7"))
        );
        let receipt: Received =
            serde_json::from_str(r#"{"type":"RECEIPT","ackType":"delivered","peer":"1002","seq":"5"}"#).unwrap();
        assert_eq!(
            (receipt.kind, receipt.ack_type, receipt.peer, receipt.seq),
            (Kind::Receipt, Some(AckKind::Delivered), Some(1002), Some(5))
        );
        let unknown: Received = serde_json::from_str(r#"{"type":"TYPING","reason":"invalid_sync","x":[1]}"#).unwrap();
        assert_eq!((unknown.kind, unknown.reason()), (Kind::Other, "invalid_sync"));
        let done: Received = serde_json::from_str(r#"{"type":"SYNC_DONE","peer":"9"}"#).unwrap();
        assert_eq!((done.kind, done.peer), (Kind::SyncDone, Some(9)));
    }
}
