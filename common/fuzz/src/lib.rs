//! The oracles of the fuzz targets: what must hold for *any* input to the frame decoder, the config
//! loader and the stream record decoder.
//!
//! Each check takes raw input, never panics on bad input by itself, and panics (an `assert!`) only when
//! the code under test breaks an invariant — which is what libFuzzer reports as a crash. The same
//! checks run in CI from `common/tests/properties.rs` (which includes this file as a module), so the
//! fuzzers and the property tests cannot drift apart.

use im_common::config::{Config, ConfigError};
use im_common::protocol::{
    parse_request, AckTarget, Encoding, FrameLimits, Rejection, Request, SendRequest, ServerFrame, SyncRequest,
};
use im_common::record::{self, Accepted, ChatMessage, Handed, Origin, PushBatch};

/// The authenticated user every fuzzed frame comes from.
pub const FUZZ_UID: u64 = 7;
/// Small enough that the fuzzer reaches `body_too_long` with short inputs.
pub const FUZZ_LIMITS: FrameLimits = FrameLimits { max_body_chars: 64 };
/// `clientMsgId` is part of a MySQL unique key, `VARCHAR(64)`.
const MAX_CLIENT_MSG_ID_BYTES: usize = im_common::protocol::MAX_CLIENT_MSG_ID_LEN;
/// A longer `msgType` falls back to `TEXT` (the column is `VARCHAR(16)`).
const MAX_MSG_TYPE_BYTES: usize = 16;

/// Frame decoder: any bytes from user [`FUZZ_UID`], read as a JSON text frame and as a MessagePack
/// binary frame, give a request or a rejection; a send that passes keeps every limit and survives
/// re-encoding as a client frame, a push frame and a stream record.
pub fn check_frame(bytes: &[u8]) {
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        check_frame_with(bytes, encoding, FUZZ_UID, FUZZ_LIMITS);
    }
}

/// [`check_frame`] with the encoding, uid and limits given.
pub fn check_frame_with(bytes: &[u8], encoding: Encoding, uid: u64, limits: FrameLimits) {
    match parse_request(bytes, encoding, uid, limits) {
        Ok(Request::Send(send)) => check_send(&send, uid, limits),
        Ok(Request::Ack { target: AckTarget::Message(id), .. }) => assert!(id > 0, "ACK of serverMsgId 0 accepted"),
        Ok(Request::Ack { target: AckTarget::Seq { peer, seq }, .. }) => {
            assert!(peer > 0 && seq > 0, "ACK of peer {peer} seq {seq} accepted")
        }
        Ok(Request::Sync(SyncRequest::Positions(positions))) => {
            assert!(positions.iter().all(|&(peer, _)| peer > 0), "SYNC for peer 0 accepted")
        }
        Ok(Request::Sync(SyncRequest::Peer { peer, .. })) => assert!(peer > 0, "SYNC for peer 0 accepted"),
        Ok(Request::Auth { .. } | Request::Ping | Request::Sync(SyncRequest::Server)) => {}
        Err(rejection) => check_rejection(&rejection),
    }
}

/// The limits a validated send must keep, and its round trips.
pub fn check_send(send: &SendRequest, uid: u64, limits: FrameLimits) {
    let body_chars = send.body.chars().count();
    assert!(body_chars >= 1 && body_chars <= limits.max_body_chars, "body of {body_chars} chars accepted");
    let cmid_bytes = send.client_msg_id.len();
    assert!((1..=MAX_CLIENT_MSG_ID_BYTES).contains(&cmid_bytes), "clientMsgId of {cmid_bytes} bytes accepted");
    assert!((1..=MAX_MSG_TYPE_BYTES).contains(&send.msg_type.len()), "msgType {:?} accepted", send.msg_type);
    assert!(send.to > 0 && send.to != uid, "recipient {} accepted from {uid}", send.to);

    // The same send, written out again by a well-behaved client, must parse to the same request.
    let again = serde_json::json!({
        "type": "SINGLE_CHAT",
        "clientMsgId": send.client_msg_id,
        "to": send.to.to_string(),
        "from": uid,
        "msgType": send.msg_type,
        "body": send.body,
    });
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let reparsed = parse_request(&encoding.encode(&again), encoding, uid, limits);
        assert_eq!(reparsed, Ok(Request::Send(send.clone())), "re-encoded send parsed differently in {encoding:?}");
    }

    // The message as the recipient gets it (push frame) and as the stream stores it (record).
    let msg = ChatMessage {
        id: (1 << 40) | 1,
        from: uid,
        to: send.to,
        client_msg_id: send.client_msg_id.clone(),
        msg_type: send.msg_type.clone(),
        body: send.body.clone(),
        seq: 1,
    };
    check_server_frame(&msg.push_frame());
    let entry = Accepted { msg, origin: Origin { node: 1, conn: 2 }, pushed_at_epoch: Some(3), path_claim: false };
    let decoded: Accepted = record::decode(&record::encode(&entry)).expect("encoded Accepted must decode");
    assert_eq!(decoded, entry, "Accepted record did not round-trip");
}

/// A rejection must be answerable: its ERROR frame serializes and parses back.
fn check_rejection(rejection: &Rejection) {
    check_server_frame(&ServerFrame::error(rejection.reason, rejection.client_msg_id.clone()));
}

/// A server frame serializes with ids as decimal strings, no nulls, and parses back equal; its
/// MessagePack form is the same envelope.
pub fn check_server_frame(frame: &ServerFrame) {
    let json = String::from_utf8(Encoding::Json.encode(frame).to_vec()).expect("JSON is UTF-8");
    let value: serde_json::Value = serde_json::from_str(&json).expect("the JSON encoding must emit JSON");
    let packed: Option<serde_json::Value> = Encoding::MsgPack.decode(&Encoding::MsgPack.encode(frame));
    assert_eq!(packed.as_ref(), Some(&value), "the MessagePack envelope differs from {json}");
    let object = value.as_object().expect("a frame is a JSON object");
    assert!(object.values().all(|v| !v.is_null()), "null field in {json}");
    for (key, id) in [("serverMsgId", frame.server_msg_id), ("from", frame.from), ("to", frame.to)] {
        match id {
            Some(id) => assert_eq!(object.get(key), Some(&serde_json::Value::String(id.to_string())), "{json}"),
            None => assert!(!object.contains_key(key), "{key} should be omitted: {json}"),
        }
    }
    let back: ServerFrame = serde_json::from_str(&json).expect("a server frame must parse back");
    assert_eq!(&back, frame, "server frame did not round-trip through {json}");
}

/// Stream record decoder: any bytes decode or fail cleanly; whatever decodes re-encodes to an equal
/// record.
pub fn check_record(bytes: &[u8]) {
    if let Ok(entry) = record::decode::<Accepted>(bytes) {
        let again: Accepted = record::decode(&record::encode(&entry)).expect("re-encoded Accepted must decode");
        assert_eq!(again, entry, "Accepted did not round-trip");
    }
    if let Ok(handed) = record::decode::<Handed>(bytes) {
        let again: Handed = record::decode(&record::encode(&handed)).expect("re-encoded Handed must decode");
        assert_eq!(again, handed, "Handed did not round-trip");
    }
    if let Ok(batch) = record::decode::<PushBatch>(bytes) {
        let again: PushBatch = record::decode(&record::encode(&batch)).expect("re-encoded PushBatch must decode");
        assert_eq!(again, batch, "PushBatch did not round-trip");
    }
}

/// Config loader: the text as a config file, and the same text read as `NAME=value` lines of an
/// environment, each load or fail with an error that names the key or the file.
pub fn check_config(text: &str) {
    check_config_result(Config::from_toml(text));
    let env = text.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned()));
    check_config_result(Config::load_with_env(None, env));
}

/// What any load must satisfy: a loaded config is valid and re-serializes to TOML that loads to the
/// same config; a failure names where it comes from.
pub fn check_config_result(result: Result<Config, ConfigError>) {
    match result {
        Ok(cfg) => {
            assert!(cfg.validate().is_ok(), "a loaded config must be valid");
            let text = toml::to_string(&cfg).expect("a config serializes to TOML");
            let again = Config::from_toml(&text).unwrap_or_else(|e| panic!("re-serialized config fails: {e}\n{text}"));
            assert_eq!(toml::to_string(&again).ok(), Some(text), "config did not round-trip through TOML");
        }
        Err(err) => assert!(names_its_source(&err), "error names neither key nor file: {err:?}"),
    }
}

/// True when the error names the file (read/syntax errors) or the config key: a dotted key path, the
/// `IM__…` variable that set it, or — for a key whose own name is odd (`"" = 1`, `IM__.`) — an
/// unknown-field message that quotes exactly that name.
pub fn names_its_source(err: &ConfigError) -> bool {
    let shown = err.to_string();
    match err {
        ConfigError::Read { path, .. } | ConfigError::Syntax { path, .. } => !path.is_empty() && shown.contains(path),
        ConfigError::Key { key, message } => {
            let named = is_key_path(key) || key.starts_with("IM__") || quotes_unknown_field_of(key, message);
            named && shown.contains(key.as_str())
        }
    }
}

/// `section.key`, `section`, or `section.key[3]`: dot-separated non-empty names.
fn is_key_path(key: &str) -> bool {
    !key.is_empty() && key.split('.').all(|part| !part.is_empty())
}

/// The message is "unknown field `NAME`…" and the key is NAME or ends with `.NAME` (names may hold
/// dots and backticks themselves, so every split is tried).
fn quotes_unknown_field_of(key: &str, message: &str) -> bool {
    let mut names = std::iter::once(key).chain(key.match_indices('.').map(|(i, _)| &key[i + 1..]));
    names.any(|name| message.starts_with(&format!("unknown field `{name}`")))
}
