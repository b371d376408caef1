//! Offline resend and delivery cursors.
//!
//! On connect, a user is sent every saved message addressed to them beyond their delivered cursor, in
//! pages of `gateway.offline_page_size`, oldest first. Clients confirm with `ACK {ackType:"delivered"}`;
//! those confirmations only move an in-memory high-water mark per user, and a flusher writes all of
//! them in one statement every `gateway.cursor_flush_ms` — never one write per message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use im_common::protocol::ServerFrame;
use im_common::store::Store;

/// Pushes a user's undelivered saved messages into their connection's queue. Waits for queue space
/// (the queue is the connection's own), so a long backlog is paced by the client's reading speed.
pub async fn resend(store: Store, uid: u64, page_size: u32, out: mpsc::Sender<Bytes>) {
    let mut after = match store.delivered_cursor(uid).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(uid, error = %e, "offline resend: cannot read cursor");
            return;
        }
    };
    loop {
        let page = match store.inbox_after(uid, after, page_size).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(uid, error = %e, "offline resend: cannot read inbox");
                return;
            }
        };
        for msg in &page {
            if out.send(Bytes::from(ServerFrame::chat(msg).to_json())).await.is_err() {
                return;
            }
            metrics::counter!("im_gateway_offline_resent_total").increment(1);
        }
        match page.last() {
            Some(last) if page.len() == page_size as usize => after = last.id,
            _ => return,
        }
    }
}

/// Coalesces delivered-cursor updates and writes them in batches.
#[derive(Default)]
pub struct Cursors {
    pending: Mutex<HashMap<u64, u64>>,
}

impl Cursors {
    /// Records that `uid` has everything up to `id`.
    pub fn advance(&self, uid: u64, id: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = pending.entry(uid).or_insert(0);
        *cursor = (*cursor).max(id);
    }

    /// Writes everything pending; on failure keeps it for the next flush.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<(u64, u64)> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        for chunk in batch.chunks(1000) {
            if let Err(e) = store.advance_cursors(chunk).await {
                tracing::warn!(error = %e, "cursor flush failed; will retry");
                for &(uid, id) in chunk {
                    self.advance(uid, id);
                }
            }
        }
    }

    /// Flushes every `period` until the process ends.
    pub async fn flush_every(&self, store: Store, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            self.flush(&store).await;
        }
    }
}
