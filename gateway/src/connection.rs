//! One client connection: authentication, then frames handled strictly in order.
//!
//! Each text frame is validated, rate-limited and answered before the next one is read, which is what
//! keeps one connection's messages in order through the whole pipeline. Errors that concern one frame
//! are answered with `ERROR {reason}` and the connection stays open; only framing errors (too big,
//! protocol violations), failed authentication, idleness and slow reading close it.
//!
//! The connection's task lives as long as the connection, and its size is that of its largest
//! state: futures that run once or only while a frame is answered (authentication, route calls,
//! `Gateway::send`) are boxed (`Box::pin`), so an idle connection does not carry their state. That
//! took the task from 3.9 KiB to under 1 KiB (docs/BENCHMARKS.md, connection memory).

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::WebSocket;
use tokio::sync::OwnedSemaphorePermit;

use crate::frame_reader::{Message, ReadError, Reader};
use crate::framing::{close_code, write_loop, Control, Stream};
use crate::outbound::Outbound;
use crate::rate_limit::RateLimit;
use crate::sessions::ConnHandle;
use crate::sync::{Syncer, Syncs};
use crate::Gateway;
use im_common::protocol::{
    parse_request, AckType, Encoding, FrameLimits, FrameType, Reason, Request, ServerFrame, SyncRequest,
};

/// How long a connection's writer gets to send its last frames after the connection ended.
const WRITER_GRACE: Duration = Duration::from_secs(5);

/// What the handshake settled for a connection.
pub struct Handshake {
    /// Set when the handshake carried a valid token; else the first frame must be `AUTH`.
    pub uid: Option<u64>,
    /// Run `SYNC {}` once the connection is registered (off with `?sync=manual`).
    pub auto_sync: bool,
    /// What the server writes in (the negotiated subprotocol).
    pub encoding: Encoding,
}

/// Serves an upgraded WebSocket.
pub async fn serve(gw: Arc<Gateway>, ws: WebSocket<Stream>, handshake: Handshake, _slot: OwnedSemaphorePermit) {
    let Handshake { uid, auto_sync, encoding } = handshake;
    let cfg = &gw.cfg.gateway;
    let Some((read, early, write)) = crate::framing::split(ws) else {
        tracing::warn!("an upgraded connection is not a TCP socket; dropped");
        return;
    };
    let out = Arc::new(Outbound::new(cfg.outbound_queue));
    let mut writer = tokio::spawn(write_loop(write, out.clone(), encoding));
    let mut reader = Reader::new(read, early, out.clone(), cfg.max_frame_bytes);
    let conn = gw.sessions.new_handle(out.clone(), encoding);

    let uid = match uid {
        Some(uid) => uid,
        None => match Box::pin(authenticate_by_frame(&gw, &mut reader, &conn)).await {
            Some(uid) => uid,
            None => {
                out.finish();
                let _ = tokio::time::timeout(WRITER_GRACE, writer).await;
                return;
            }
        },
    };
    metrics::counter!("im_gateway_auth_total", "result" => "ok").increment(1);
    let first_here = gw.sessions.add(uid, conn.clone());
    let syncs =
        Syncs::new(Syncer { store: gw.store.clone(), uid, page_size: cfg.offline_page_size, conn: conn.clone() });
    let sync = auto_sync.then(|| syncs.clone());
    let first_try = Box::pin(gw.routes.connected(uid, first_here)).await;
    let registration = tokio::spawn(register(gw.clone(), uid, first_here, first_try, sync));

    // A JoinHandle must not be polled again once it has completed (tokio panics), so remember
    // whether the writer already ended here.
    let mut writer_ended = false;
    let close = tokio::select! {
        close = read_loop(&gw, uid, &mut reader, &conn, &syncs) => close,
        _ = conn.overflowed.notified() => Some((close_code::SLOW_CONSUMER, "slow_consumer")),
        _ = &mut writer => {
            writer_ended = true;
            None
        }
    };
    registration.abort();
    syncs.stop();
    drop(syncs);
    if gw.sessions.remove(uid, conn.id) {
        if let Err(e) = Box::pin(gw.routes.left(uid, &gw.sessions)).await {
            tracing::debug!(uid, error = %e, "route unregister failed; the entry expires by itself");
        }
    }
    if let Some((code, reason)) = close {
        out.control(Control::Close(code, reason));
    }
    drop(conn);
    out.finish();
    // A writer still stuck on a client that does not read after this grace is abandoned: dropping
    // the socket is the disconnect.
    if !writer_ended && tokio::time::timeout(WRITER_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Queues the connection's first `SYNC {}` (`sync`, unless the client syncs by itself) once the
/// cluster knows about the connection (route, presence epoch). `first_try` is the answer to the
/// registration made before the connection's frames were read — so a client's first answered frame
/// means it is registered, and no sync reads MySQL before that. If it failed, it is retried until
/// Redis takes it; the automatic sync runs at once anyway (MySQL may be there while Redis is not),
/// and once more after the registration went through: messages pushed in between had no route to
/// this connection.
async fn register(
    gw: Arc<Gateway>,
    uid: u64,
    first_here: bool,
    first_try: redis::RedisResult<()>,
    sync: Option<Syncs>,
) {
    if let Err(e) = first_try {
        tracing::warn!(uid, error = %e, "registering the connection failed; retrying");
        if let Some(sync) = &sync {
            sync.request(SyncRequest::Server);
        }
        let mut backoff = im_common::backoff::Backoff::default();
        while let Err(e) = gw.routes.connected(uid, first_here).await {
            tracing::debug!(uid, error = %e, "registering the connection failed again");
            backoff.wait().await;
        }
    }
    if let Some(sync) = &sync {
        sync.request(SyncRequest::Server);
    }
}

/// Reads and answers frames until the connection ends; returns the close to send, if any.
async fn read_loop(
    gw: &Gateway,
    uid: u64,
    reader: &mut Reader,
    conn: &ConnHandle,
    syncs: &Syncs,
) -> Option<(u16, &'static str)> {
    let cfg = &gw.cfg.gateway;
    let limits = FrameLimits { max_body_chars: cfg.max_body_chars };
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let mut rate = RateLimit::new(cfg.rate_per_sec, cfg.rate_burst);
    let mut shutdown = gw.shutdown.clone();
    loop {
        let message = tokio::select! {
            m = tokio::time::timeout(idle, reader.next()) => m,
            _ = shutdown.wait_for(|&stop| stop) => return Some((close_code::GOING_AWAY, "going_away")),
        };
        let (encoding, bytes) = match message {
            Err(_) => return Some((close_code::IDLE_TIMEOUT, "idle_timeout")),
            Ok(Err(ReadError::TooBig)) => {
                metrics::counter!("im_gateway_errors_total", "reason" => "frame_too_large").increment(1);
                return Some((close_code::TOO_BIG, "frame_too_large"));
            }
            Ok(Err(ReadError::Protocol)) => return Some((close_code::PROTOCOL_ERROR, "protocol_error")),
            Ok(Err(ReadError::Disconnected)) | Ok(Ok(Message::Close)) => return None,
            Ok(Ok(Message::Data { binary, bytes })) => (Encoding::of_frame(binary), bytes),
        };
        let request = parse_request(&bytes, encoding, uid, limits);
        let frame_type = match &request {
            Ok(Request::Send(_)) => "SINGLE_CHAT",
            Ok(Request::Ack { .. }) => "ACK",
            Ok(Request::Sync(_)) => "SYNC",
            Ok(Request::Ping) => "PING",
            Ok(Request::Auth { .. }) => "AUTH",
            Err(_) => "invalid",
        };
        metrics::counter!("im_gateway_frames_in_total", "type" => frame_type).increment(1);
        if !rate.allow() {
            let answer = match &request {
                Ok(Request::Send(s)) => {
                    let key = gw.idempotency_key(uid, &s.client_msg_id);
                    Box::pin(gw.idempotency.answer_refused(&key, &s.client_msg_id, Reason::TooManyRequests)).await
                }
                Err(r) => ServerFrame::error(Reason::TooManyRequests, r.client_msg_id.clone()),
                _ => ServerFrame::error(Reason::TooManyRequests, None),
            };
            reply(conn, &answer);
            continue;
        }
        match request {
            Err(rejection) => reply(conn, &ServerFrame::error(rejection.reason, rejection.client_msg_id)),
            Ok(Request::Ping) => reply(conn, &ServerFrame::signal(FrameType::Pong)),
            Ok(Request::Auth { .. }) => reply(conn, &ServerFrame::signal(FrameType::AuthOk)),
            Ok(Request::Ack { ack_type: ack_type @ (AckType::Delivered | AckType::Read), target }) => {
                gw.positions.advance(uid, ack_type, target)
            }
            Ok(Request::Sync(request)) => {
                if !syncs.request(request) {
                    reply(conn, &ServerFrame::error(Reason::TooManyRequests, None));
                }
            }
            Ok(Request::Ack { .. }) => reply(conn, &ServerFrame::error(Reason::InvalidAck, None)),
            Ok(Request::Send(send)) => {
                conn.begin_reply(&send.client_msg_id);
                for frame in Box::pin(gw.send(uid, conn, send)).await {
                    reply(conn, &frame);
                }
                conn.finish_reply();
            }
        }
    }
}

/// Queues a frame for this connection and counts it.
fn reply(conn: &ConnHandle, frame: &ServerFrame) {
    if let Some(reason) = frame.reason {
        metrics::counter!("im_gateway_errors_total", "reason" => reason.as_str()).increment(1);
    }
    metrics::counter!("im_gateway_frames_out_total", "type" => frame.kind.as_str()).increment(1);
    conn.reply(frame);
}

/// The `?auth=frame` variant: the first frame must be `AUTH {token}` within `gateway.auth_timeout_ms`.
async fn authenticate_by_frame(gw: &Gateway, reader: &mut Reader, conn: &ConnHandle) -> Option<u64> {
    let timeout = Duration::from_millis(gw.cfg.gateway.auth_timeout_ms);
    let limits = FrameLimits { max_body_chars: gw.cfg.gateway.max_body_chars };
    let fail = |frame: ServerFrame, reason: &'static str| {
        metrics::counter!("im_gateway_auth_total", "result" => "fail").increment(1);
        reply(conn, &frame);
        conn.out.control(Control::Close(close_code::POLICY_VIOLATION, reason));
        None
    };
    let (encoding, bytes) = match tokio::time::timeout(timeout, reader.next()).await {
        Ok(Ok(Message::Data { binary, bytes })) => (Encoding::of_frame(binary), bytes),
        Ok(Err(ReadError::TooBig)) => {
            conn.out.control(Control::Close(close_code::TOO_BIG, "frame_too_large"));
            return None;
        }
        Ok(_) => return None,
        Err(_) => return fail(ServerFrame::signal(FrameType::AuthFail), "auth_timeout"),
    };
    // Any uid will do for parsing AUTH; 0 is no valid user.
    match parse_request(&bytes, encoding, 0, limits) {
        Ok(Request::Auth { token }) => match im_common::auth::verify_token(&gw.cfg.auth.jwt_secret, &token) {
            Ok(uid) => {
                reply(conn, &ServerFrame::signal(FrameType::AuthOk));
                Some(uid)
            }
            Err(_) => fail(ServerFrame::signal(FrameType::AuthFail), "auth_failed"),
        },
        Ok(_) => fail(ServerFrame::error(Reason::Unauthorized, None), "unauthorized"),
        Err(r) => fail(ServerFrame::error(Reason::Unauthorized, r.client_msg_id), "unauthorized"),
    }
}
