//! `GET /api/conversations?limit=<n>&before=<serverMsgId>`: the caller's conversation list, newest
//! activity first — per peer the last message, the last seq both ways, unread count and both sides'
//! delivered/read positions (PROTOCOL.md "Conversation list"). One query; the rows it reads are kept
//! current per saved batch and per position flush.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::history::{json_error, page_limit};
use crate::Gateway;
use im_common::store::Conversation;
use im_common::telemetry::text_response;

/// Answers a conversation-list request for the authenticated user `uid`.
pub async fn conversations(gw: &Gateway, uid: u64, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let before = match params.iter().find(|(k, _)| k == "before").map(|(_, v)| v.parse::<u64>()) {
        None => u64::MAX,
        Some(Ok(b)) => b,
        Some(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "invalid_before"),
    };
    let Some(limit) = page_limit(gw, params) else { return json_error(StatusCode::BAD_REQUEST, "invalid_limit") };
    match gw.store.conversations(uid, before, limit).await {
        Ok(list) => {
            let next_before = (list.len() == limit as usize)
                .then(|| list.last().and_then(|c| c.last.as_ref()).map(|m| m.id.to_string()))
                .flatten();
            let items: Vec<serde_json::Value> = list.iter().map(entry).collect();
            text_response(
                StatusCode::OK,
                "application/json",
                json!({ "conversations": items, "nextBefore": next_before }).to_string(),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "conversation list query failed");
            json_error(StatusCode::SERVICE_UNAVAILABLE, "internal_error")
        }
    }
}

fn entry(c: &Conversation) -> serde_json::Value {
    let last = c.last.as_ref().map(|m| {
        json!({
            "serverMsgId": m.id.to_string(),
            "from": m.from.to_string(),
            "to": m.to.to_string(),
            "seq": m.seq,
            "msgType": m.msg_type,
            "preview": m.body,
            "ts": im_common::ids::timestamp_ms(m.id),
        })
    });
    json!({
        "peer": c.peer.to_string(),
        "lastMessage": last,
        "lastSeqIn": c.last_in_seq,
        "lastSeqOut": c.last_out_seq,
        "delivered": c.delivered,
        "read": c.read,
        "unread": c.last_in_seq.saturating_sub(c.read),
        "peerDelivered": c.peer_delivered,
        "peerRead": c.peer_read,
    })
}
