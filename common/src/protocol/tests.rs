//! Parsing client frames in both encodings, and how server frames are written.

use super::*;

const LIMITS: FrameLimits = FrameLimits { max_body_chars: 10 };

fn json_text(frame: &ServerFrame) -> String {
    String::from_utf8(Encoding::Json.encode(frame).to_vec()).unwrap()
}

fn reason_of(text: &str) -> Reason {
    parse_request(text.as_bytes(), Encoding::Json, 7, LIMITS).unwrap_err().reason
}

#[test]
fn server_frame_ids_read_from_strings_numbers_and_null_in_json_and_messagepack() {
    let f: ServerFrame =
        serde_json::from_str(r#"{"type":"SINGLE_CHAT","serverMsgId":"384063290302533632","from":1001,"to":null}"#)
            .unwrap();
    assert_eq!((f.server_msg_id, f.from, f.to), (Some(384063290302533632), Some(1001), None));
    for bad in [r#""12x""#, "-1", "1.5", "true"] {
        let text = format!(r#"{{"type":"ACK","serverMsgId":{bad}}}"#);
        assert!(serde_json::from_str::<ServerFrame>(&text).is_err(), "{bad} is no id");
    }
    let pushed = ServerFrame {
        server_msg_id: Some(u64::MAX),
        from: Some(7),
        to: Some(8),
        ..ServerFrame::bare(FrameType::SingleChat)
    };
    let back: ServerFrame = rmp_serde::from_slice(&rmp_serde::to_vec_named(&pushed).unwrap()).unwrap();
    assert_eq!(back, pushed);
}

#[test]
fn every_malformed_send_gets_its_reason() {
    assert_eq!(reason_of("{not json"), Reason::BadJson);
    assert_eq!(reason_of("[]"), Reason::BadJson);
    assert_eq!(reason_of(r#"{"to":1}"#), Reason::MissingType);
    assert_eq!(reason_of(r#"{"type":"GROUP_CHAT"}"#), Reason::NotImplemented);
    assert_eq!(reason_of(r#"{"type":"SINGLE_CHAT","to":1,"body":"x"}"#), Reason::MissingMsgId);
    assert_eq!(reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","body":"x"}"#), Reason::MissingTo);
    assert_eq!(reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","to":"x1","body":"x"}"#), Reason::InvalidTo);
    assert_eq!(reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","to":1}"#), Reason::MissingBody);
    assert_eq!(
        reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","to":1,"body":"12345678901"}"#),
        Reason::BodyTooLong
    );
    assert_eq!(reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","to":7,"body":"x"}"#), Reason::CannotSendToSelf);
    assert_eq!(
        reason_of(r#"{"type":"SINGLE_CHAT","clientMsgId":"a","to":1,"from":8,"body":"x"}"#),
        Reason::SpoofedFrom
    );
    assert_eq!(reason_of(r#"{"type":"ACK","ackType":"delivered"}"#), Reason::InvalidAck);
    assert_eq!(reason_of(r#"{"type":"ACK","ackType":"delivered","from":"3","seq":-1}"#), Reason::InvalidAck);
    assert_eq!(reason_of(r#"{"type":"SYNC","positions":[1]}"#), Reason::InvalidSync);
    assert_eq!(reason_of(r#"{"type":"SYNC","positions":{"x":1}}"#), Reason::InvalidSync);
    assert_eq!(reason_of(r#"{"type":"SYNC","positions":{"3":"a"}}"#), Reason::InvalidSync);
    assert_eq!(reason_of(r#"{"type":"SYNC","peer":"3"}"#), Reason::InvalidSync);
}

#[test]
fn acks_name_a_message_or_a_position_and_syncs_parse() {
    let parse = |t: &str| parse_request(t.as_bytes(), Encoding::Json, 7, LIMITS).unwrap();
    assert_eq!(
        parse(r#"{"type":"ACK","ackType":"read","serverMsgId":"99"}"#),
        Request::Ack { ack_type: AckType::Read, target: AckTarget::Message(99) }
    );
    assert_eq!(
        parse(r#"{"type":"ACK","ackType":"delivered","from":"3","seq":12}"#),
        Request::Ack { ack_type: AckType::Delivered, target: AckTarget::Seq { peer: 3, seq: 12 } }
    );
    assert_eq!(parse(r#"{"type":"SYNC"}"#), Request::Sync(SyncRequest::Server));
    assert_eq!(parse(r#"{"type":"SYNC","positions":{"3":0}}"#), Request::Sync(SyncRequest::Positions(vec![(3, 0)])));
    assert_eq!(
        parse(r#"{"type":"SYNC","peer":3,"afterSeq":"4"}"#),
        Request::Sync(SyncRequest::Peer { peer: 3, after_seq: 4 })
    );
    let receipt = json_text(&ServerFrame::receipt(AckType::Read, 3, 5, None));
    assert_eq!(receipt, r#"{"type":"RECEIPT","ackType":"read","seq":5,"peer":"3"}"#);
}

#[test]
fn to_accepts_number_or_string_and_body_counts_characters() {
    let ok = r#"{"type":"SINGLE_CHAT","clientMsgId":"c1","to":"42","from":7,"body":"ééééééééé"}"#;
    let Request::Send(send) = parse_request(ok.as_bytes(), Encoding::Json, 7, LIMITS).unwrap() else {
        panic!("not a send")
    };
    assert_eq!((send.to, send.msg_type.as_str(), send.client_msg_id.as_str()), (42, "TEXT", "c1"));
    let num = r#"{"type":"SINGLE_CHAT","clientMsgId":5,"to":42,"body":"x"}"#;
    assert!(
        matches!(parse_request(num.as_bytes(), Encoding::Json, 7, LIMITS), Ok(Request::Send(s)) if s.client_msg_id == "5")
    );
}

#[test]
fn a_request_in_messagepack_parses_like_the_same_request_in_json() {
    let send = serde_json::json!({"type": "SINGLE_CHAT", "clientMsgId": "c1", "to": 42, "body": "hé"});
    let packed = rmp_serde::to_vec_named(&send).unwrap();
    let from_json = parse_request(send.to_string().as_bytes(), Encoding::Json, 7, LIMITS);
    assert_eq!(parse_request(&packed, Encoding::MsgPack, 7, LIMITS), from_json);
    assert!(matches!(from_json, Ok(Request::Send(s)) if s.to == 42 && s.body == "hé"));
    let too_long = rmp_serde::to_vec_named(
        &serde_json::json!({"type": "SINGLE_CHAT", "clientMsgId": "c2", "to": "42", "body": "12345678901"}),
    )
    .unwrap();
    let refused = parse_request(&too_long, Encoding::MsgPack, 7, LIMITS).unwrap_err();
    assert_eq!((refused.reason, refused.client_msg_id.as_deref()), (Reason::BodyTooLong, Some("c2")));
    for bad in [&b"\xc1"[..], b"", b"{\"type\":\"PING\"}", &[0x81, 0xa4, b't', b'y']] {
        let refused = parse_request(bad, Encoding::MsgPack, 7, LIMITS).unwrap_err();
        assert_eq!(refused.reason, Reason::BadMsgpack, "{bad:?}");
    }
}

#[test]
fn rejection_keeps_the_client_msg_id() {
    let r = parse_request(br#"{"type":"SINGLE_CHAT","clientMsgId":"m9","to":7,"body":"x"}"#, Encoding::Json, 7, LIMITS)
        .unwrap_err();
    assert_eq!(r.client_msg_id.as_deref(), Some("m9"));
}

#[test]
fn server_frames_emit_ids_as_strings_and_omit_nulls() {
    let json = json_text(&ServerFrame::ack(AckType::Saved, "c1", 1234));
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["type"], "ACK");
    assert_eq!(v["ackType"], "saved");
    assert_eq!(v["serverMsgId"], "1234");
    assert!(v.get("body").is_none());
    let back: ServerFrame = serde_json::from_str(&json).unwrap();
    assert_eq!(back.server_msg_id, Some(1234));
    let err = json_text(&ServerFrame::error(Reason::ServerBusy, None));
    assert_eq!(err, r#"{"type":"ERROR","reason":"server_busy"}"#);
}
