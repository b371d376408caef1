//! The read half of a client connection: WebSocket frames (RFC 6455, server side) parsed from the
//! socket and reassembled into whole messages under a size cap.
//!
//! Ours, not fastwebsockets', for memory: its read half keeps an 8 KiB buffer for the connection's
//! whole life, about half of what an idle connection cost. This one waits until the socket is
//! readable before it takes a buffer, sizes the buffer to what arrives, and hands the buffer over
//! with the message, so a quiet connection holds none. (fastwebsockets still does the handshake
//! and the write half.)
//!
//! A client's frames must be masked and use no reserved bits (no extension is negotiated); control
//! frames are short and whole; text must be UTF-8. Anything else is a protocol error, which closes
//! the connection with 1002.

use fastwebsockets::{unmask, CloseCode, OpCode};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;

use crate::framing::Control;
use crate::outbound::Outbound;

/// A whole message from the client.
pub enum Message {
    /// Its bytes, and whether it came in binary frames (MessagePack) rather than text (JSON).
    Data {
        binary: bool,
        bytes: Vec<u8>,
    },
    Close,
}

/// Why reading stopped.
#[derive(Debug, PartialEq)]
pub enum ReadError {
    TooBig,
    Protocol,
    Disconnected,
}

/// Bytes asked of the socket per read at least: a few chat frames.
const READ_CHUNK: usize = 1024;

/// The read half plus fragment reassembly.
pub struct Reader {
    stream: OwnedReadHalf,
    /// Bytes read and not yet consumed: empty, without an allocation, between messages.
    buf: Vec<u8>,
    /// Where pongs and close echoes go (the write half sends them ahead of queued frames).
    out: Arc<Outbound>,
    max_bytes: usize,
}

/// A frame's header, parsed.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    len: usize,
    /// Bytes before the payload.
    size: usize,
}

impl Reader {
    /// `early`: bytes the client sent right after its handshake, read already by the HTTP layer.
    pub fn new(stream: OwnedReadHalf, early: Vec<u8>, out: Arc<Outbound>, max_bytes: usize) -> Self {
        Reader { stream, buf: early, out, max_bytes }
    }

    /// The next whole message. Pings are answered and skipped; a close is echoed.
    pub async fn next(&mut self) -> Result<Message, ReadError> {
        // A fragmented message in progress: (is text, bytes so far).
        let mut partial: Option<(bool, Vec<u8>)> = None;
        loop {
            let (header, payload) = self.frame().await?;
            let (is_text, mut buf) = match (header.opcode, partial.take()) {
                (OpCode::Close, _) => {
                    self.echo_close(&payload)?;
                    return Ok(Message::Close);
                }
                (OpCode::Ping, p) => {
                    // A full control queue means the client floods pings faster than we write:
                    // dropping a pong is allowed (only the latest ping needs one).
                    self.out.control(Control::Obligated(OpCode::Pong, payload));
                    partial = p;
                    continue;
                }
                (OpCode::Pong, p) => {
                    partial = p;
                    continue;
                }
                (OpCode::Text | OpCode::Binary, None) if header.fin => {
                    // The common case: one frame, one message, and its buffer is the message.
                    return whole(header.opcode == OpCode::Text, payload);
                }
                (OpCode::Text | OpCode::Binary, None) => (header.opcode == OpCode::Text, Vec::new()),
                (OpCode::Continuation, Some(p)) => p,
                _ => return Err(ReadError::Protocol),
            };
            if buf.len() + payload.len() > self.max_bytes {
                return Err(ReadError::TooBig);
            }
            buf.extend_from_slice(&payload);
            if !header.fin {
                partial = Some((is_text, buf));
                continue;
            }
            return whole(is_text, buf);
        }
    }

    /// Queues the echo of a client's close: its code, if it gave a valid one.
    fn echo_close(&self, payload: &[u8]) -> Result<(), ReadError> {
        match payload.len() {
            0 => {}
            1 => return Err(ReadError::Protocol),
            _ => {
                let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
                if !code.is_allowed() || std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(ReadError::Protocol);
                }
            }
        }
        let code = payload.get(..2).unwrap_or_default().to_vec();
        self.out.control(Control::Obligated(OpCode::Close, code));
        Ok(())
    }

    /// The next frame and its unmasked payload, read as far as needed.
    async fn frame(&mut self) -> Result<(Header, Vec<u8>), ReadError> {
        loop {
            let Some(header) = parse_header(&self.buf, self.max_bytes)? else {
                self.fill(1).await?;
                continue;
            };
            let end = header.size + header.len;
            if self.buf.len() < end {
                self.fill(end - self.buf.len()).await?;
                continue;
            }
            let mut payload = if self.buf.len() == end {
                let mut all = std::mem::take(&mut self.buf);
                all.drain(..header.size);
                all
            } else {
                let payload = self.buf[header.size..end].to_vec();
                self.buf.drain(..end);
                payload
            };
            unmask(&mut payload, header.mask);
            return Ok((header, payload));
        }
    }

    /// Reads what the socket has, at least one byte; the buffer is taken only once bytes wait.
    ///
    /// The read goes through `AsyncRead`, not `try_read`: a read that leaves room in the buffer
    /// has drained the socket, and tokio then clears its readiness, so the next call waits for
    /// the next epoll event instead of asking the kernel once more for nothing (`EAGAIN`) — a
    /// syscall saved per frame that arrives alone, which is most of them.
    async fn fill(&mut self, missing: usize) -> Result<(), ReadError> {
        self.stream.readable().await.map_err(|_| ReadError::Disconnected)?;
        self.buf.reserve(missing.max(READ_CHUNK));
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(ReadError::Disconnected),
            Ok(_) => Ok(()),
        }
    }
}

/// A complete message; text must be UTF-8.
fn whole(is_text: bool, bytes: Vec<u8>) -> Result<Message, ReadError> {
    if is_text && std::str::from_utf8(&bytes).is_err() {
        return Err(ReadError::Protocol);
    }
    Ok(Message::Data { binary: !is_text, bytes })
}

/// The header at the start of `buf`, `None` while it is incomplete.
fn parse_header(buf: &[u8], max_bytes: usize) -> Result<Option<Header>, ReadError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
        // Reserved bits set, or an unmasked frame from a client.
        return Err(ReadError::Protocol);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::try_from(b0 & 0x0F).map_err(|_| ReadError::Protocol)?;
    let (len, at) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")), 10),
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
    if control && (!fin || len > 125) {
        return Err(ReadError::Protocol);
    }
    if len > max_bytes as u64 {
        return Err(ReadError::TooBig);
    }
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    let mask = mask.try_into().expect("4 bytes");
    Ok(Some(Header { fin, opcode, mask, len: len as usize, size: at + 4 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// A client frame: masked, as a browser sends it.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(fin as u8) << 7 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        let mut body = payload.to_vec();
        unmask(&mut body, MASK);
        out.extend_from_slice(&body);
        out
    }

    /// A reader over a real socket, the client's end of it, and the control queue.
    async fn pair(max_bytes: usize) -> (Reader, TcpStream, Arc<Outbound>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        std::mem::forget(write); // keep the connection open for the test's length
        let out = Arc::new(Outbound::new(4));
        (Reader::new(read, Vec::new(), out.clone(), max_bytes), client, out)
    }

    fn text(m: Result<Message, ReadError>) -> String {
        match m {
            Ok(Message::Data { binary: false, bytes }) => String::from_utf8(bytes).unwrap(),
            Ok(Message::Data { binary: true, .. }) => panic!("binary"),
            Ok(Message::Close) => panic!("close"),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[tokio::test]
    async fn frames_written_together_or_a_byte_at_a_time_are_read_whole_and_in_order() {
        let (mut reader, mut client, _ctrl) = pair(1 << 20).await;
        let big = "x".repeat(70_000); // the 64-bit length form
        let mut bytes = frame(true, 1, b"one");
        bytes.extend(frame(true, 1, "two".repeat(100).as_bytes())); // the 16-bit form
        bytes.extend(frame(true, 1, big.as_bytes()));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(text(reader.next().await), "one");
        assert_eq!(text(reader.next().await), "two".repeat(100));
        assert_eq!(text(reader.next().await), big);
        assert_eq!(reader.buf.capacity(), 0, "a quiet connection holds no buffer");

        let slow = frame(true, 1, "slowly".repeat(30).as_bytes());
        let writer = tokio::spawn(async move {
            for b in slow {
                client.write_all(&[b]).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            client
        });
        assert_eq!(text(reader.next().await), "slowly".repeat(30));
        drop(writer.await.unwrap());
        assert_eq!(reader.next().await.err(), Some(ReadError::Disconnected));
    }

    #[tokio::test]
    async fn a_fragmented_message_is_joined_and_a_ping_between_its_fragments_is_answered() {
        let (mut reader, mut client, ctrl) = pair(1 << 20).await;
        let mut bytes = frame(false, 1, b"hel");
        bytes.extend(frame(true, 9, b"are you there"));
        bytes.extend(frame(false, 0, b"lo "));
        bytes.extend(frame(true, 0, b"world"));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(text(reader.next().await), "hello world");
        match ctrl.take_control() {
            Some(Control::Obligated(OpCode::Pong, p)) => assert_eq!(p, b"are you there"),
            other => panic!("expected a pong, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_binary_message_is_read_whole_and_need_not_be_utf8() {
        let (mut reader, mut client, _ctrl) = pair(1 << 20).await;
        let mut bytes = frame(false, 2, &[0x81, 0xff]);
        bytes.extend(frame(true, 0, &[0xfe, 0x00]));
        client.write_all(&bytes).await.unwrap();
        match reader.next().await {
            Ok(Message::Data { binary: true, bytes }) => assert_eq!(bytes, [0x81, 0xff, 0xfe, 0x00]),
            _ => panic!("expected one binary message"),
        }
    }

    #[tokio::test]
    async fn bytes_read_with_the_handshake_come_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, _write) = server.into_split();
        let early = frame(true, 1, b"early");
        let mut reader = Reader::new(read, early[..4].to_vec(), Arc::new(Outbound::new(4)), 1024);
        client.write_all(&early[4..]).await.unwrap();
        client.write_all(&frame(true, 1, b"late")).await.unwrap();
        assert_eq!(text(reader.next().await), "early");
        assert_eq!(text(reader.next().await), "late");
    }

    #[tokio::test]
    async fn a_close_is_echoed_with_its_code() {
        let (mut reader, mut client, ctrl) = pair(1024).await;
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        client.write_all(&frame(true, 8, &close)).await.unwrap();
        assert!(matches!(reader.next().await, Ok(Message::Close)));
        match ctrl.take_control() {
            Some(Control::Obligated(OpCode::Close, p)) => assert_eq!(p, 1000u16.to_be_bytes()),
            other => panic!("expected a close echo, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_over_the_cap_are_too_big_whole_or_in_fragments() {
        let (mut reader, mut client, _ctrl) = pair(100).await;
        client.write_all(&frame(true, 1, &[b'a'; 100])).await.unwrap();
        assert_eq!(text(reader.next().await).len(), 100, "the cap itself is allowed");
        client.write_all(&frame(true, 1, &[b'a'; 101])).await.unwrap();
        assert_eq!(reader.next().await.err(), Some(ReadError::TooBig));

        let (mut reader, mut client, _ctrl) = pair(100).await;
        for opcode in [1, 0, 0] {
            client.write_all(&frame(false, opcode, &[b'a'; 40])).await.unwrap();
        }
        assert_eq!(reader.next().await.err(), Some(ReadError::TooBig));
    }

    #[tokio::test]
    async fn frames_a_client_may_not_send_are_protocol_errors() {
        let unmasked = {
            let mut f = frame(true, 1, b"hi");
            f[1] &= 0x7F;
            f.drain(2..6);
            f
        };
        let reserved_bit = {
            let mut f = frame(true, 1, b"hi");
            f[0] |= 0x40;
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", unmasked),
            ("reserved bit", reserved_bit),
            ("unknown opcode", frame(true, 3, b"hi")),
            ("fragmented ping", frame(false, 9, b"hi")),
            ("long ping", frame(true, 9, &[0; 126])),
            ("continuation first", frame(true, 0, b"hi")),
            ("invalid UTF-8", frame(true, 1, &[0xC3, 0x28])),
            ("close code 1005", frame(true, 8, &1005u16.to_be_bytes())),
            ("one-byte close", frame(true, 8, &[3])),
        ];
        for (name, bytes) in cases {
            let (mut reader, mut client, _ctrl) = pair(1024).await;
            client.write_all(&bytes).await.unwrap();
            assert_eq!(reader.next().await.err(), Some(ReadError::Protocol), "{name}");
        }
        // A text message split inside a UTF-8 character is still valid once joined.
        let (mut reader, mut client, _ctrl) = pair(1024).await;
        let mut bytes = frame(false, 1, &"é".as_bytes()[..1]);
        bytes.extend(frame(true, 0, &"é".as_bytes()[1..]));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(text(reader.next().await), "é");
    }
}
