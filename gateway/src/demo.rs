//! The demo chat page (`gateway.demo_page`, off by default; `ops up` turns it on): the reference
//! JavaScript client (`clients/js`) in a page that signs in, lists conversations with unread counts,
//! shows every tick and pages through history, next to a live panel of the shard backlog.
//!
//! Everything is compiled in (`include_str!`), so the page is the client in the same commit and
//! needs no build step or file path at run time. The page talks to the gateway only through the
//! public protocol (`/ws`, `/api/*`); the two routes of its own are the backlog figures this gateway
//! already keeps for admission control, and — with `gateway.demo_dev_tokens`, for a local cluster
//! only (config validation allows it on a loopback listener alone) — a token for any user id.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde_json::json;

use crate::history::json_error;
use crate::Gateway;
use im_common::telemetry::text_response;

/// The page, its script and the client module it imports.
const PAGE: &str = include_str!("demo/demo.html");
const SCRIPT: &str = include_str!("demo/demo.js");
const CLIENT: &str = include_str!("../../clients/js/src/im-client.js");
/// How long a development token is valid.
const DEV_TOKEN_TTL_SECS: u64 = 12 * 3600;

/// Answers a request under `/demo`; `None` when the demo is off (the caller answers 404).
pub fn respond(
    gw: &Gateway,
    method: &Method,
    path: &str,
    params: &[(String, String)],
) -> Option<Response<Full<Bytes>>> {
    if !gw.cfg.gateway.demo_page {
        return None;
    }
    let js = "text/javascript; charset=utf-8";
    Some(match (method, path) {
        (&Method::GET, "/demo" | "/demo/") => asset("text/html; charset=utf-8", PAGE),
        (&Method::GET, "/demo/demo.js") => asset(js, SCRIPT),
        (&Method::GET, "/demo/im-client.js") => asset(js, CLIENT),
        (&Method::GET, "/demo/status") => status(gw),
        (&Method::POST, "/demo/token") => dev_token(gw, params),
        _ => json_error(StatusCode::NOT_FOUND, "not_found"),
    })
}

fn asset(content_type: &str, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text_response(StatusCode::OK, content_type, Bytes::from_static(body.as_bytes()));
    resp.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-cache"));
    resp
}

/// What the page shows beside the chat: the mode, this gateway's node, whether it signs tokens, and
/// the per-shard backlog (unsaved entries, as admission control sees them).
fn status(gw: &Gateway) -> Response<Full<Bytes>> {
    let shards: Vec<_> = gw
        .appender
        .backlog()
        .into_iter()
        .enumerate()
        .map(|(shard, backlog)| json!({ "shard": shard, "backlog": backlog }))
        .collect();
    let body = json!({
        "mode": gw.mode.as_str(),
        "node": gw.node,
        "devTokens": gw.cfg.gateway.demo_dev_tokens,
        "maxBacklog": gw.cfg.two_phase.max_backlog,
        "shards": shards,
    });
    text_response(StatusCode::OK, "application/json", body.to_string())
}

/// `POST /demo/token?user=<uid>`: a signed token for that user, only with `gateway.demo_dev_tokens`.
fn dev_token(gw: &Gateway, params: &[(String, String)]) -> Response<Full<Bytes>> {
    if !gw.cfg.gateway.demo_dev_tokens {
        return json_error(StatusCode::FORBIDDEN, "dev_tokens_off");
    }
    let user = params.iter().find(|(k, _)| k == "user").and_then(|(_, v)| v.parse::<u64>().ok()).filter(|&u| u > 0);
    let Some(user) = user else {
        return json_error(StatusCode::BAD_REQUEST, "invalid_user");
    };
    let token = im_common::auth::issue_token(&gw.cfg.auth.jwt_secret, user, DEV_TOKEN_TTL_SECS);
    let body = json!({ "user": user.to_string(), "token": token, "expiresInSecs": DEV_TOKEN_TTL_SECS });
    text_response(StatusCode::OK, "application/json", body.to_string())
}
