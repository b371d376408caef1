//! WebSocket framing for one connection, apart from what the frames mean.
//!
//! The read half reassembles fragmented messages under a total size cap (fastwebsockets' own
//! collector has none, so a stream of small continuation frames could grow without bound) and hands
//! the protocol layer whole text or binary messages. The write half runs in its own task and drains
//! two queues: a small control queue (pongs, closes: always first) and the bounded outbound queue of
//! frames for the client. A client that stops reading fills its outbound queue; whoever pushes to it
//! then sees `Full` and asks for a close instead of waiting, so one slow consumer slows nobody else.
//! The write half gathers what is queued and sends it in one write ([`crate::gathering`]).

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::gathering::Gathering;

/// The upgraded connection's byte stream.
pub type Stream = TokioIo<Upgraded>;

/// WebSocket close codes this gateway sends (documented in docs/PROTOCOL.md).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down: reconnect (to another gateway).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error from the client (bad framing, invalid UTF-8).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Authentication failed or a frame came before authentication.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message was larger than `gateway.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The gateway was cut off from Redis longer than it can replay (its journal or its route
    /// entries lapsed): reconnect, and offline resend delivers what was missed.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Nothing received for `gateway.idle_timeout_ms`.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The client did not read fast enough: its outbound queue filled up.
    pub const SLOW_CONSUMER: u16 = 4001;
}

/// Something for the write task that must not wait behind queued frames.
#[derive(Debug)]
pub enum Control {
    /// A frame the protocol obliges us to send (pong, close echo).
    Obligated(OpCode, Vec<u8>),
    /// Send a close frame with this code and reason, then stop.
    Close(u16, &'static str),
}

/// A whole message from the client.
pub enum Message {
    Text(Vec<u8>),
    Binary,
    Close,
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    TooBig,
    Protocol,
    Disconnected,
}

/// The read half plus fragment reassembly.
pub struct Reader {
    ws: WebSocketRead<ReadHalf<Stream>>,
    ctrl: mpsc::Sender<Control>,
    max_bytes: usize,
}

impl Reader {
    pub fn new(ws: WebSocketRead<ReadHalf<Stream>>, ctrl: mpsc::Sender<Control>, max_bytes: usize) -> Self {
        Reader { ws, ctrl, max_bytes }
    }

    /// The next whole message.
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        // A fragmented message in progress: (is text, bytes so far).
        let mut partial: Option<(bool, Vec<u8>)> = None;
        loop {
            let ctrl = self.ctrl.clone();
            let mut obligated = move |frame: Frame<'_>| {
                // A full control queue means the client floods pings faster than we write: dropping a
                // pong is allowed (only the latest ping needs one).
                let _ = ctrl.try_send(Control::Obligated(frame.opcode, frame.payload.to_vec()));
                std::future::ready(Ok::<(), std::convert::Infallible>(()))
            };
            let frame = self.ws.read_frame(&mut obligated).await.map_err(|e| match e {
                WebSocketError::FrameTooLarge => ReadError::TooBig,
                WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::ConnectionClosed => {
                    ReadError::Disconnected
                }
                _ => ReadError::Protocol,
            })?;
            let (is_text, mut buf) = match (frame.opcode, partial.take()) {
                (OpCode::Close, _) => return Ok(Message::Close),
                (OpCode::Ping | OpCode::Pong, p) => {
                    partial = p;
                    continue;
                }
                (OpCode::Text | OpCode::Binary, None) => (frame.opcode == OpCode::Text, Vec::new()),
                (OpCode::Continuation, Some(p)) => p,
                _ => return Err(ReadError::Protocol),
            };
            if buf.len() + frame.payload.len() > self.max_bytes {
                return Err(ReadError::TooBig);
            }
            buf.extend_from_slice(&frame.payload);
            if !frame.fin {
                partial = Some((is_text, buf));
                continue;
            }
            return Ok(if is_text { Message::Text(buf) } else { Message::Binary });
        }
    }
}

/// The write half: frames gather in memory and leave on [`WebSocketWrite::flush`].
pub type Writer = WebSocketWrite<Gathering<WriteHalf<Stream>>>;

/// Splits an upgraded connection into its halves, the write half gathering its frames.
pub fn split(ws: WebSocket<Stream>) -> (WebSocketRead<ReadHalf<Stream>>, Writer) {
    ws.split(|stream| {
        let (read, write) = tokio::io::split(stream);
        (read, Gathering::new(write))
    })
}

/// Most frames gathered into one write.
const MAX_GATHERED: usize = 256;

/// Most bytes gathered into one write. Frames the writer took off the queue are invisible to
/// whoever paces itself by the queue's room (a sync keeps half of it free for live pushes), so the
/// writer holds little more than it did frame by frame: many small frames, or a couple of large.
const MAX_GATHERED_BYTES: usize = 8 * 1024;

/// Runs the write half until a close is sent or the connection fails. Each wake-up writes the
/// frames queued by then (up to [`MAX_GATHERED`] frames or [`MAX_GATHERED_BYTES`]) and flushes
/// once: one `send()` per burst.
pub async fn write_loop(mut ws: Writer, mut ctrl: mpsc::Receiver<Control>, mut out: mpsc::Receiver<Bytes>) {
    loop {
        let result = tokio::select! {
            biased;
            c = ctrl.recv() => match c {
                Some(Control::Obligated(opcode, payload)) => {
                    let closing = opcode == OpCode::Close;
                    let r = write_flushed(&mut ws, Frame::new(true, opcode, None, Payload::Owned(payload))).await;
                    if closing {
                        return;
                    }
                    r
                }
                Some(Control::Close(code, reason)) => {
                    // Frames queued before the close was asked for are answers the client is owed
                    // (an `ERROR unauthorized`, `AUTH_FAIL`, receipts): they go out first. Only what
                    // is already queued; a slow consumer's queue is bounded, so this ends.
                    while let Ok(text) = out.try_recv() {
                        if ws.write_frame(Frame::text(Payload::Borrowed(&text))).await.is_err() {
                            return;
                        }
                    }
                    let _ = write_flushed(&mut ws, Frame::close(code, reason.as_bytes())).await;
                    return;
                }
                None => return,
            },
            frame = out.recv() => match frame {
                Some(text) => write_queued(&mut ws, text, &mut out).await,
                None => return,
            },
        };
        if result.is_err() {
            return;
        }
    }
}

/// Writes `first` and whatever else is queued now, then flushes.
async fn write_queued(ws: &mut Writer, first: Bytes, out: &mut mpsc::Receiver<Bytes>) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::text(Payload::Borrowed(&first))).await?;
    let mut gathered = first.len();
    for _ in 1..MAX_GATHERED {
        if gathered >= MAX_GATHERED_BYTES {
            break;
        }
        let Ok(text) = out.try_recv() else { break };
        gathered += text.len();
        ws.write_frame(Frame::text(Payload::Borrowed(&text))).await?;
    }
    ws.flush().await
}

async fn write_flushed(ws: &mut Writer, frame: Frame<'_>) -> Result<(), WebSocketError> {
    ws.write_frame(frame).await?;
    ws.flush().await
}
