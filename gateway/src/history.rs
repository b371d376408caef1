//! `GET /api/messages?peer=<uid>&before=<serverMsgId>&limit=<n>`: saved messages of a conversation,
//! newest first; with `afterSeq=<n>` instead, the peer's messages to the caller after that seq, oldest
//! first (forward sync over HTTP). Authenticated like the WebSocket (Bearer header or `?token=`); bad
//! parameters get HTTP 400 with `{"error": "<reason>"}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::Gateway;
use im_common::protocol::ServerFrame;
use im_common::telemetry::text_response;

/// Query parameters of a request, decoded.
pub fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON error response.
pub fn json_error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    text_response(status, "application/json", json!({ "error": reason }).to_string())
}

/// The `limit` parameter: default 50, at most `gateway.history_max_limit` (`None`: invalid).
pub fn page_limit(gw: &Gateway, params: &[(String, String)]) -> Option<u32> {
    let max = gw.cfg.gateway.history_max_limit;
    match params.iter().find(|(k, _)| k == "limit").map(|(_, v)| v.parse::<u32>()) {
        None => Some(50.min(max)),
        Some(Ok(l)) if (1..=max).contains(&l) => Some(l),
        Some(_) => None,
    }
}

/// Answers a history request for the authenticated user `uid`.
pub async fn history(gw: &Gateway, uid: u64, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let peer = match get("peer").map(str::parse::<u64>) {
        None => return json_error(StatusCode::BAD_REQUEST, "missing_peer"),
        Some(Ok(p)) if p > 0 => p,
        Some(_) => return json_error(StatusCode::BAD_REQUEST, "invalid_peer"),
    };
    let before = match get("before").map(str::parse::<u64>) {
        None => u64::MAX,
        Some(Ok(b)) => b,
        Some(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "invalid_before"),
    };
    let after_seq = match get("afterSeq").map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => return json_error(StatusCode::BAD_REQUEST, "invalid_after_seq"),
    };
    let Some(limit) = page_limit(gw, params) else { return json_error(StatusCode::BAD_REQUEST, "invalid_limit") };
    let found = match after_seq {
        Some(after) => gw.store.messages_after(peer, uid, after, limit).await,
        None => gw.store.history(uid, peer, before, limit).await,
    };
    match found {
        Ok(messages) => {
            let full = messages.len() == limit as usize;
            let frames: Vec<ServerFrame> = messages.iter().map(im_common::record::ChatMessage::push_frame).collect();
            let body = match after_seq {
                Some(_) => {
                    json!({ "messages": frames, "nextAfterSeq": full.then(|| messages.last().map(|m| m.seq)).flatten() })
                }
                None => {
                    json!({ "messages": frames, "nextBefore": full.then(|| messages.last().map(|m| m.id.to_string())).flatten() })
                }
            };
            text_response(StatusCode::OK, "application/json", body.to_string())
        }
        Err(e) => {
            tracing::warn!(error = %e, "history query failed");
            json_error(StatusCode::SERVICE_UNAVAILABLE, "internal_error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let p = query_params(Some("peer=12&token=a%2Eb+c&x&bad=%zz&end=%4"));
        assert_eq!(p[0], ("peer".into(), "12".into()));
        assert_eq!(p[1], ("token".into(), "a.b c".into()));
        assert_eq!(p[2], ("x".into(), "".into()));
        assert_eq!(p[3], ("bad".into(), "%zz".into()));
        assert_eq!(p[4], ("end".into(), "%4".into()));
    }
}
