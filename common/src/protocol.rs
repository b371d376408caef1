//! The wire envelope (SPEC §4): one JSON object per WebSocket text frame, or the same envelope in
//! MessagePack per binary frame ([`Encoding`]).
//!
//! Inbound frames ([`ClientFrame`]) are parsed leniently — ids may arrive as numbers or strings — and
//! then validated into a typed [`Request`] with a named [`Reason`] for every way they can be wrong.
//! Outbound frames ([`ServerFrame`]) always emit ids as decimal strings and omit null fields, so the
//! envelope stays compatible with the original system's JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a request was refused. The wire form is the snake_case name (`bad_json`, `server_busy`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Unauthorized,
    BadJson,
    BadMsgpack,
    MissingType,
    NotImplemented,
    MissingMsgId,
    InvalidMsgId,
    MissingTo,
    InvalidTo,
    MissingBody,
    BodyTooLong,
    CannotSendToSelf,
    SpoofedFrom,
    InvalidAck,
    InvalidSync,
    TooManyRequests,
    ServerBusy,
    InternalError,
    SaveFailed,
}

impl Reason {
    /// Every reason, for docs and metrics pre-registration.
    pub const ALL: [Reason; 19] = [
        Reason::Unauthorized,
        Reason::BadJson,
        Reason::BadMsgpack,
        Reason::MissingType,
        Reason::NotImplemented,
        Reason::MissingMsgId,
        Reason::InvalidMsgId,
        Reason::MissingTo,
        Reason::InvalidTo,
        Reason::MissingBody,
        Reason::BodyTooLong,
        Reason::CannotSendToSelf,
        Reason::SpoofedFrom,
        Reason::InvalidAck,
        Reason::InvalidSync,
        Reason::TooManyRequests,
        Reason::ServerBusy,
        Reason::InternalError,
        Reason::SaveFailed,
    ];

    /// The wire name, also used as the `reason` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthorized => "unauthorized",
            Reason::BadJson => "bad_json",
            Reason::BadMsgpack => "bad_msgpack",
            Reason::MissingType => "missing_type",
            Reason::NotImplemented => "not_implemented",
            Reason::MissingMsgId => "missing_msg_id",
            Reason::InvalidMsgId => "invalid_msg_id",
            Reason::MissingTo => "missing_to",
            Reason::InvalidTo => "invalid_to",
            Reason::MissingBody => "missing_body",
            Reason::BodyTooLong => "body_too_long",
            Reason::CannotSendToSelf => "cannot_send_to_self",
            Reason::SpoofedFrom => "spoofed_from",
            Reason::InvalidAck => "invalid_ack",
            Reason::InvalidSync => "invalid_sync",
            Reason::TooManyRequests => "too_many_requests",
            Reason::ServerBusy => "server_busy",
            Reason::InternalError => "internal_error",
            Reason::SaveFailed => "save_failed",
        }
    }
}

/// Frame types on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FrameType {
    SingleChat,
    Ack,
    Ping,
    Pong,
    Auth,
    AuthOk,
    AuthFail,
    Error,
    Sync,
    SyncDone,
    Receipt,
}

impl FrameType {
    /// The wire name, also the `type` label of frame metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::SingleChat => "SINGLE_CHAT",
            FrameType::Ack => "ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Auth => "AUTH",
            FrameType::AuthOk => "AUTH_OK",
            FrameType::AuthFail => "AUTH_FAIL",
            FrameType::Error => "ERROR",
            FrameType::Sync => "SYNC",
            FrameType::SyncDone => "SYNC_DONE",
            FrameType::Receipt => "RECEIPT",
        }
    }
}

/// The stage a receipt confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckType {
    /// Appended to the shard stream; will be delivered and saved.
    Accepted,
    /// Committed in MySQL; visible in history.
    Saved,
    /// Recipient → server: the client has the message and every earlier one of its sender (moves the
    /// delivered position the sync starts from); server → sender in `RECEIPT`.
    Delivered,
    /// Recipient → server: the user has read the message.
    Read,
}

/// Maximum length of a `clientMsgId`, in bytes (it is part of a UNIQUE key in MySQL).
pub const MAX_CLIENT_MSG_ID_LEN: usize = 64;

/// A frame as a client sent it, before validation. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientFrame {
    #[serde(rename = "type")]
    pub kind: Option<Value>,
    pub client_msg_id: Option<Value>,
    pub server_msg_id: Option<Value>,
    pub from: Option<Value>,
    pub to: Option<Value>,
    pub ack_type: Option<Value>,
    pub msg_type: Option<Value>,
    pub body: Option<Value>,
    pub token: Option<Value>,
    pub seq: Option<Value>,
    pub peer: Option<Value>,
    pub after_seq: Option<Value>,
    pub positions: Option<Value>,
}

/// A validated client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Auth { token: String },
    Ping,
    Send(SendRequest),
    Ack { ack_type: AckType, target: AckTarget },
    Sync(SyncRequest),
}

/// What an `ACK delivered|read` confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckTarget {
    /// This message and every earlier one of its sender (the form older clients send).
    Message(u64),
    /// Every message of `peer` up to `seq`.
    Seq { peer: u64, seq: u64 },
}

/// What a `SYNC` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncRequest {
    /// Every conversation, from the server's delivered positions.
    Server,
    /// These (peer, position) pairs instead of the server's; other peers from the server's.
    Positions(Vec<(u64, u64)>),
    /// One conversation, after `after_seq`.
    Peer { peer: u64, after_seq: u64 },
}

/// A validated `SINGLE_CHAT` from the authenticated user.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub to: u64,
    pub client_msg_id: String,
    pub msg_type: String,
    pub body: String,
}

/// A refused frame: the reason, and the clientMsgId when the frame carried a readable one.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub client_msg_id: Option<String>,
}

/// Limits applied while validating a frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Maximum body length in characters (Unicode scalar values).
    pub max_body_chars: usize,
}

/// Parses and validates one frame from user `uid`, written in `encoding`.
pub fn parse_request(bytes: &[u8], encoding: Encoding, uid: u64, limits: FrameLimits) -> Result<Request, Rejection> {
    let frame: ClientFrame = encoding.decode(bytes).ok_or_else(|| reject(encoding.undecodable(), None))?;
    let client_msg_id = match &frame.client_msg_id {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let kind = match frame.kind.as_ref() {
        None | Some(Value::Null) => return Err(reject(Reason::MissingType, client_msg_id)),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(reject(Reason::NotImplemented, client_msg_id)),
    };
    match kind {
        "PING" => Ok(Request::Ping),
        "AUTH" => match frame.token {
            Some(Value::String(token)) => Ok(Request::Auth { token }),
            _ => Err(reject(Reason::Unauthorized, client_msg_id)),
        },
        "ACK" => {
            let ack_type = match frame.ack_type.as_ref().and_then(Value::as_str) {
                Some("delivered") => AckType::Delivered,
                Some("read") => AckType::Read,
                _ => return Err(reject(Reason::InvalidAck, client_msg_id)),
            };
            let by_id = frame.server_msg_id.as_ref().and_then(id_value);
            let by_seq = frame.from.as_ref().and_then(id_value).zip(frame.seq.as_ref().and_then(id_value));
            match (by_id, by_seq) {
                (_, Some((peer, seq))) => Ok(Request::Ack { ack_type, target: AckTarget::Seq { peer, seq } }),
                (Some(id), None) => Ok(Request::Ack { ack_type, target: AckTarget::Message(id) }),
                (None, None) => Err(reject(Reason::InvalidAck, client_msg_id)),
            }
        }
        "SYNC" => parse_sync(&frame).map(Request::Sync).ok_or_else(|| reject(Reason::InvalidSync, client_msg_id)),
        "SINGLE_CHAT" => parse_send(frame, client_msg_id, uid, limits).map(Request::Send),
        _ => Err(reject(Reason::NotImplemented, client_msg_id)),
    }
}

fn parse_send(
    frame: ClientFrame,
    client_msg_id: Option<String>,
    uid: u64,
    limits: FrameLimits,
) -> Result<SendRequest, Rejection> {
    let Some(cmid) = client_msg_id.clone() else {
        return Err(match frame.client_msg_id {
            None | Some(Value::Null) => reject(Reason::MissingMsgId, None),
            Some(_) => reject(Reason::InvalidMsgId, None),
        });
    };
    if cmid.is_empty() || cmid.len() > MAX_CLIENT_MSG_ID_LEN {
        return Err(reject(Reason::InvalidMsgId, client_msg_id));
    }
    let to = match &frame.to {
        None | Some(Value::Null) => return Err(reject(Reason::MissingTo, client_msg_id)),
        Some(v) => id_value(v).ok_or_else(|| reject(Reason::InvalidTo, client_msg_id.clone()))?,
    };
    if let Some(from) = &frame.from {
        if !from.is_null() && id_value(from) != Some(uid) {
            return Err(reject(Reason::SpoofedFrom, client_msg_id));
        }
    }
    if to == uid {
        return Err(reject(Reason::CannotSendToSelf, client_msg_id));
    }
    let body = match frame.body {
        Some(Value::String(b)) if !b.is_empty() => b,
        _ => return Err(reject(Reason::MissingBody, client_msg_id)),
    };
    if body.chars().count() > limits.max_body_chars {
        return Err(reject(Reason::BodyTooLong, client_msg_id));
    }
    let msg_type = match frame.msg_type {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 16 => t,
        _ => "TEXT".to_owned(),
    };
    Ok(SendRequest { to, client_msg_id: cmid, msg_type, body })
}

/// `SYNC {}`, `SYNC {positions: {"<peer>": seq, ...}}` or `SYNC {peer, afterSeq}`.
fn parse_sync(frame: &ClientFrame) -> Option<SyncRequest> {
    if let Some(peer) = frame.peer.as_ref().filter(|v| !v.is_null()) {
        let after_seq = seq_value(frame.after_seq.as_ref()?)?;
        return Some(SyncRequest::Peer { peer: id_value(peer)?, after_seq });
    }
    match frame.positions.as_ref() {
        None | Some(Value::Null) => Some(SyncRequest::Server),
        Some(Value::Object(map)) => {
            let positions =
                map.iter().map(|(peer, seq)| Some((peer.parse().ok().filter(|&p| p > 0)?, seq_value(seq)?)));
            positions.collect::<Option<Vec<_>>>().map(SyncRequest::Positions)
        }
        Some(_) => None,
    }
}

/// A non-negative seq given as a JSON number or a decimal string.
fn seq_value(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn reject(reason: Reason, client_msg_id: Option<String>) -> Rejection {
    Rejection { reason, client_msg_id }
}

/// A positive id given as a JSON number or a decimal string.
fn id_value(v: &Value) -> Option<u64> {
    let id = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    (id > 0).then_some(id)
}

/// A frame the server sends. Ids are written as decimal strings; `None` fields are omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerFrame {
    #[serde(rename = "type")]
    pub kind: FrameType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal")]
    pub server_msg_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal")]
    pub to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_type: Option<AckType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Position in the sender→recipient direction (pushes, `RECEIPT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The other user of the conversation (`SYNC_DONE`, `RECEIPT`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal")]
    pub peer: Option<u64>,
}

impl ServerFrame {
    /// A frame of `kind` with every optional field empty.
    pub fn bare(kind: FrameType) -> Self {
        ServerFrame {
            kind,
            client_msg_id: None,
            server_msg_id: None,
            from: None,
            to: None,
            ack_type: None,
            msg_type: None,
            body: None,
            ts: None,
            reason: None,
            seq: None,
            peer: None,
        }
    }

    /// A frame that carries only its type (`PONG`, `AUTH_OK`, `AUTH_FAIL`).
    pub fn signal(kind: FrameType) -> Self {
        Self::bare(kind)
    }

    /// `ACK {ackType, clientMsgId, serverMsgId, ts}` to the sender.
    pub fn ack(ack_type: AckType, client_msg_id: &str, server_msg_id: u64) -> Self {
        ServerFrame {
            ack_type: Some(ack_type),
            client_msg_id: Some(client_msg_id.to_owned()),
            server_msg_id: Some(server_msg_id),
            ts: Some(crate::ids::timestamp_ms(server_msg_id)),
            ..Self::bare(FrameType::Ack)
        }
    }

    /// `RECEIPT {ackType, peer, seq, serverMsgId?}` to a sender: `peer` has their messages up to `seq`.
    pub fn receipt(ack_type: AckType, peer: u64, seq: u64, server_msg_id: Option<u64>) -> Self {
        ServerFrame {
            ack_type: Some(ack_type),
            peer: Some(peer),
            seq: Some(seq),
            server_msg_id,
            ..Self::bare(FrameType::Receipt)
        }
    }

    /// `ERROR {reason, clientMsgId?}`.
    pub fn error(reason: Reason, client_msg_id: Option<String>) -> Self {
        ServerFrame { reason: Some(reason), client_msg_id, ..Self::bare(FrameType::Error) }
    }
}

/// Serde helper: `Option<u64>` written as a decimal string, read from a string or a number.
mod decimal;
mod encoding;

pub use encoding::{Encoded, Encoding, JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL};

#[cfg(test)]
mod tests;
