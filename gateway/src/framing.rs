//! WebSocket framing for one connection, apart from what the frames mean.
//!
//! The read half is [`crate::frame_reader`]. The write half runs in its own task and drains the
//! connection's [`Outbound`] queue: control frames (pongs, closes) first, then the bounded frames
//! for the client. A client that stops reading fills its queue; whoever pushes to it then sees
//! `Full` and asks for a close instead of waiting, so one slow consumer slows nobody else. The write
//! half gathers what is queued and sends it in one write ([`crate::gathering`]).

use bytes::Bytes;
use fastwebsockets::{after_handshake_split, Frame, OpCode, Payload, Role, WebSocket, WebSocketError, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::gathering::Gathering;
use crate::outbound::{Next, Outbound};
use im_common::protocol::Encoding;

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

/// The write half: frames gather in memory and leave on [`WebSocketWrite::flush`].
pub type Writer = WebSocketWrite<Gathering<OwnedWriteHalf>>;

/// Splits an upgraded connection into the socket's read half with the bytes the HTTP layer read
/// past the handshake (for [`crate::frame_reader::Reader`]) and the write half, which gathers its
/// frames. `None` if the connection is not the TCP socket the server accepted.
pub fn split(ws: WebSocket<Stream>) -> Option<(OwnedReadHalf, Vec<u8>, Writer)> {
    let parts = ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>().ok()?;
    let (read, write) = parts.io.into_inner().into_split();
    let (_unused, writer) = after_handshake_split(tokio::io::empty(), Gathering::new(write), Role::Server);
    Some((read, parts.read_buf.to_vec(), writer))
}

/// Most frames gathered into one write.
const MAX_GATHERED: usize = 256;

/// Most bytes gathered into one write. Frames the writer took off the queue are invisible to
/// whoever paces itself by the queue's room (a sync keeps half of it free for live pushes), so the
/// writer holds little more than it did frame by frame: many small frames, or a couple of large.
const MAX_GATHERED_BYTES: usize = 8 * 1024;

/// Runs the write half until a close is sent, the connection ended and everything queued went
/// out, or the socket fails. Each wake-up writes the frames queued by then (up to [`MAX_GATHERED`]
/// frames or [`MAX_GATHERED_BYTES`]) and flushes once: one `send()` per burst.
/// The queued frames go out as text frames (JSON) or binary ones (MessagePack), by `encoding`.
pub async fn write_loop(mut ws: Writer, out: Arc<Outbound>, encoding: Encoding) {
    let opcode = if encoding.is_binary() { OpCode::Binary } else { OpCode::Text };
    let mut batch = Vec::new();
    loop {
        let next = out.next(&mut batch, MAX_GATHERED, MAX_GATHERED_BYTES).await;
        let result = match next {
            Next::Frames => write_batch(&mut ws, opcode, &mut batch).await,
            Next::Control(Control::Obligated(opcode, payload)) => {
                let r = write_flushed(&mut ws, Frame::new(true, opcode, None, Payload::Owned(payload))).await;
                if opcode == OpCode::Close {
                    break;
                }
                r
            }
            Next::Control(Control::Close(code, reason)) => {
                // The batch holds the frames queued before the close: answers the client is owed (an
                // `ERROR unauthorized`, `AUTH_FAIL`, receipts), which go out first.
                if write_batch(&mut ws, opcode, &mut batch).await.is_ok() {
                    let _ = write_flushed(&mut ws, Frame::close(code, reason.as_bytes())).await;
                }
                break;
            }
            Next::End => break,
        };
        if result.is_err() {
            break;
        }
    }
    out.close();
}

/// Writes the batch's frames and flushes once; the batch is left empty.
async fn write_batch(ws: &mut Writer, opcode: OpCode, batch: &mut Vec<Bytes>) -> Result<(), WebSocketError> {
    for frame in batch.drain(..) {
        ws.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&frame))).await?;
    }
    ws.flush().await
}

async fn write_flushed(ws: &mut Writer, frame: Frame<'_>) -> Result<(), WebSocketError> {
    ws.write_frame(frame).await?;
    ws.flush().await
}
