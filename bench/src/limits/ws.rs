//! WebSocket frames, raw: the bench's own client ([`crate::client`]) against a minimal echo server
//! built like the gateway (hyper HTTP/1 with upgrades, fastwebsockets, fragments collected), in
//! this process.
//!
//! The echo server runs on a thread of its own with a single-threaded runtime, so the CPU of the
//! serving side — the part a gateway pays — can be read apart from the client's (`/proc`'s
//! per-thread figures). Each connection keeps [`IN_FLIGHT`] frames in flight; every echo is one
//! frame in and one frame out, and both directions count as frames.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::model::{Measurement, Op};
use super::window::{current_tid, measure, pace, CpuScope, Drive, Workers};
use super::{LimitsError, PAYLOAD_BYTES};
use crate::client::{self, ClientFrame, Incoming as ClientIncoming};
use crate::spec::AuthMode;
use im_common::protocol::Encoding;

/// Client connections.
pub const WS_CONNECTIONS: usize = 16;
/// Frames each connection keeps in flight.
pub const IN_FLIGHT: usize = 32;
/// The bench client's readiness probe, answered with [`PONG`] and not counted.
const PING: &[u8] = br#"{"type":"PING"}"#;
const PONG: &[u8] = br#"{"type":"PONG"}"#;
/// Longest wait for a connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The echo server: where it listens, its thread, and the frames it has seen (in and out).
struct EchoServer {
    addr: SocketAddr,
    tid: u32,
    frames: Arc<AtomicU64>,
    shutdown: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl EchoServer {
    /// Starts the server on 127.0.0.1 on a port of its own, on a thread of its own.
    fn start() -> Result<EchoServer, LimitsError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let frames = Arc::new(AtomicU64::new(0));
        let (shutdown, stopped) = oneshot::channel();
        let (tid_sender, tid) = std::sync::mpsc::channel();
        let counted = frames.clone();
        let thread = std::thread::Builder::new().name("limits-ws-echo".into()).spawn(move || {
            let _ = tid_sender.send(current_tid());
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(serve(listener, counted, stopped)),
                Err(e) => eprintln!("the echo server's runtime did not start: {e}"),
            }
        })?;
        let tid = tid.recv().ok().flatten().ok_or_else(|| LimitsError::Worker("the echo thread has no id".into()))?;
        Ok(EchoServer { addr, tid, frames, shutdown, thread })
    }

    /// Stops accepting and serving, and waits for the thread.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

async fn serve(listener: std::net::TcpListener, frames: Arc<AtomicU64>, mut stopped: oneshot::Receiver<()>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        let _ = stream.set_nodelay(true);
        let frames = frames.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let frames = frames.clone();
                async move { Ok::<_, Infallible>(upgrade(req, frames)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn upgrade(mut req: Request<Incoming>, frames: Arc<AtomicU64>) -> Response<http_body_util::Empty<bytes::Bytes>> {
    match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, upgraded)) => {
            tokio::spawn(async move {
                if let Ok(ws) = upgraded.await {
                    let _ = echo(FragmentCollector::new(ws), &frames).await;
                }
            });
            response
        }
        Err(_) => {
            let mut refused = Response::new(http_body_util::Empty::new());
            *refused.status_mut() = hyper::StatusCode::BAD_REQUEST;
            refused
        }
    }
}

/// Sends every text frame back (the readiness probe gets its answer instead).
async fn echo(
    mut ws: FragmentCollector<TokioIo<hyper::upgrade::Upgraded>>,
    frames: &AtomicU64,
) -> Result<(), WebSocketError> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text if &frame.payload[..] == PING => {
                ws.write_frame(Frame::text(Payload::Borrowed(PONG))).await?;
            }
            OpCode::Text => {
                ws.write_frame(frame).await?;
                frames.fetch_add(2, Ordering::Relaxed);
            }
            OpCode::Close => return Ok(()),
            _ => {}
        }
    }
}

/// Echoes of message-sized SINGLE_CHAT frames over [`WS_CONNECTIONS`] connections, [`IN_FLIGHT`]
/// each flat out, one at a time paced. Counts frames in both directions; CPU per frame is the
/// serving thread's.
pub async fn frames(secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    let server = EchoServer::start()?;
    let measured = echo_load(&server, secs, drive).await;
    server.stop().await;
    measured
}

async fn echo_load(server: &EchoServer, secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    let url = format!("ws://{}/ws", server.addr);
    let body = "x".repeat(PAYLOAD_BYTES);
    let chat = ClientFrame::SingleChat { to: 2, client_msg_id: "1", msg_type: "TEXT", body: &body };
    let mut workers = Workers { done: server.frames.clone(), ..Workers::new() };
    let in_flight = drive.batch(IN_FLIGHT);
    for _ in 0..WS_CONNECTIONS {
        let (mut reader, mut writer) = client::connect(&url, "limits", AuthMode::Header, CONNECT_TIMEOUT)
            .await
            .map_err(|e| LimitsError::Worker(format!("WebSocket connect: {e}")))?;
        let (stop, text) = (workers.stop.clone(), writer.encode(&chat));
        // An echo is two frames.
        let mut ticker = drive.ticker(Op::WsFrame, WS_CONNECTIONS, 2);
        workers.tasks.spawn(async move {
            let broken = |e: WebSocketError| LimitsError::Worker(format!("WebSocket: {e}"));
            for _ in 0..in_flight {
                pace(&mut ticker).await;
                writer.send_encoded(text.clone()).await.map_err(broken)?;
            }
            loop {
                let echoed = tokio::select! {
                    _ = stop.cancelled() => break,
                    echoed = reader.next() => echoed.map_err(broken)?,
                };
                if let ClientIncoming::Closed(code, reason) = echoed {
                    return Err(LimitsError::Worker(format!("echo server closed: {code} {reason}")));
                }
                pace(&mut ticker).await;
                writer.send_encoded(text.clone()).await.map_err(broken)?;
            }
            writer.close().await;
            Ok(())
        });
    }
    let how = format!(
        "{WS_CONNECTIONS} connections × {in_flight} in flight, {}, {}-byte SINGLE_CHAT frames echoed; \
         CPU: the serving thread",
        drive.describe(),
        Encoding::Json.to_vec(&chat).len()
    );
    measure(Op::WsFrame, how, CpuScope::Thread(server.tid), secs, workers).await
}
