//! The HTTP front door: one listener serves the WebSocket upgrade at `/ws`, the history API, the
//! admin endpoints and (when configured) the demo page under `/demo`. Handshake authentication happens here, before the upgrade, so a bad token is a
//! plain HTTP 401 and never costs a WebSocket.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::connection::Handshake;
use crate::conversations::conversations;
use crate::history::{history, json_error, query_params};
use crate::Gateway;
use im_common::protocol::Encoding;
use im_common::telemetry::admin_response;

/// Accepts connections until shutdown is signalled.
pub async fn accept_loop(gw: Arc<Gateway>, listener: TcpListener) {
    let mut shutdown = gw.shutdown.clone();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|&stop| stop) => return,
        };
        let _ = stream.set_nodelay(true);
        if gw.cfg.gateway.socket_send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(gw.cfg.gateway.socket_send_buffer);
        }
        let gw = gw.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(gw, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn route(gw: Arc<Gateway>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let params = query_params(req.uri().query());
    if let Some(resp) = admin_response(&path, &gw.metrics, &gw.readiness) {
        return resp;
    }
    match path.as_str() {
        "/ws" => upgrade(gw, &mut req, &params),
        "/api/messages" if req.method() == hyper::Method::GET => match authenticate(&gw, &req, &params) {
            Some(uid) => history(&gw, uid, &params).await,
            None => json_error(StatusCode::UNAUTHORIZED, "unauthorized"),
        },
        "/api/messages" => json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        "/api/conversations" if req.method() == hyper::Method::GET => match authenticate(&gw, &req, &params) {
            Some(uid) => conversations(&gw, uid, &params).await,
            None => json_error(StatusCode::UNAUTHORIZED, "unauthorized"),
        },
        "/api/conversations" => json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        p if p == "/demo" || p.starts_with("/demo/") => crate::demo::respond(&gw, req.method(), p, &params)
            .unwrap_or_else(|| json_error(StatusCode::NOT_FOUND, "not_found")),
        _ => json_error(StatusCode::NOT_FOUND, "not_found"),
    }
}

/// The uid of a valid token from `Authorization: Bearer` or `?token=` (callers answer 401 on `None`).
fn authenticate(gw: &Gateway, req: &Request<Incoming>, params: &[(String, String)]) -> Option<u64> {
    let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .or_else(|| params.iter().find(|(k, _)| k == "token").map(|(_, v)| v.as_str()));
    let uid = token.and_then(|t| im_common::auth::verify_token(&gw.cfg.auth.jwt_secret, t).ok());
    if uid.is_none() {
        metrics::counter!("im_gateway_auth_total", "result" => "fail").increment(1);
    }
    uid
}

fn upgrade(gw: Arc<Gateway>, req: &mut Request<Incoming>, params: &[(String, String)]) -> Response<Full<Bytes>> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return json_error(StatusCode::BAD_REQUEST, "websocket_upgrade_required");
    }
    let allowed = &gw.cfg.gateway.allowed_origins;
    if let Some(origin) = req.headers().get(hyper::header::ORIGIN) {
        if !allowed.is_empty() && !allowed.iter().any(|a| origin.as_bytes() == a.as_bytes()) {
            return json_error(StatusCode::FORBIDDEN, "origin_not_allowed");
        }
    }
    let frame_auth = params.iter().any(|(k, v)| k == "auth" && v == "frame");
    let auto_sync = !params.iter().any(|(k, v)| k == "sync" && v == "manual");
    let has_token =
        req.headers().contains_key(hyper::header::AUTHORIZATION) || params.iter().any(|(k, _)| k == "token");
    let uid = if frame_auth && !has_token {
        None
    } else {
        match authenticate(&gw, req, params) {
            Some(uid) => Some(uid),
            None => return json_error(StatusCode::UNAUTHORIZED, "unauthorized"),
        }
    };
    let Ok(slot) = gw.connection_slots.clone().try_acquire_owned() else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections");
    };
    let offered = req.headers().get(hyper::header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
    let subprotocol = offered.and_then(Encoding::negotiate);
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(req) {
        Ok(r) => r,
        Err(_) => return json_error(StatusCode::BAD_REQUEST, "bad_websocket_handshake"),
    };
    let encoding = subprotocol.map_or(Encoding::Json, |(encoding, _)| encoding);
    let handshake = Handshake { uid, auto_sync, encoding };
    tokio::spawn(async move {
        match upgrade.await {
            Ok(ws) => crate::connection::serve(gw, ws, handshake, slot).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let (mut parts, _empty) = response.into_parts();
    if let Some((_, name)) = subprotocol {
        parts.headers.insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, hyper::header::HeaderValue::from_static(name));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}
