//! Outbound bytes gathered in memory until the write task flushes: a connection's write task
//! writes every frame queued for it, then flushes once, so a burst of receipts and pushes leaves in
//! one `send()` instead of one per frame (the kernel's per-call cost was a fifth of a gateway's CPU).
//!
//! The buffer holds nothing while the connection is idle: it is allocated by the first write after
//! a flush and, when it grew past [`KEEP_BYTES`], released by the flush.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Bytes gathered before a write goes to the socket even without a flush.
const FLUSH_AT_BYTES: usize = 64 * 1024;

/// Capacity kept across flushes; a larger buffer is released.
const KEEP_BYTES: usize = 4 * 1024;

/// An [`AsyncWrite`] that gathers writes until [`AsyncWrite::poll_flush`].
pub struct Gathering<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` the socket took already.
    sent: usize,
}

impl<W: AsyncWrite + Unpin> Gathering<W> {
    pub fn new(inner: W) -> Self {
        Gathering { inner, buf: Vec::new(), sent: 0 }
    }

    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        if self.buf.capacity() > KEEP_BYTES {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Gathering<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= FLUSH_AT_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_reach_the_socket_only_when_flushed() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut w = Gathering::new(client);
        w.write_all(b"one").await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut got = [0u8; 6];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut got)).await;
        assert!(early.is_err(), "nothing may leave before the flush");
        w.flush().await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");
    }

    #[tokio::test]
    async fn a_large_burst_goes_out_before_the_flush_and_in_order() {
        let (client, mut server) = tokio::io::duplex(1 << 22);
        let mut w = Gathering::new(client);
        let chunk = vec![7u8; 1000];
        for _ in 0..100 {
            w.write_all(&chunk).await.unwrap();
        }
        let mut got = vec![0u8; FLUSH_AT_BYTES];
        server.read_exact(&mut got).await.unwrap();
        w.flush().await.unwrap();
        let mut rest = vec![0u8; 100_000 - FLUSH_AT_BYTES];
        server.read_exact(&mut rest).await.unwrap();
        assert!(got.iter().chain(&rest).all(|&b| b == 7));
        assert_eq!(w.buf.capacity(), 0, "a buffer that grew is released by the flush");
    }
}
