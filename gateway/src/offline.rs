//! Offline resend and delivery cursors.
//!
//! On connect, a user is sent every saved message addressed to them beyond their delivered cursor and
//! accepted before they came online, in pages of `gateway.offline_page_size`, oldest first. Clients confirm with `ACK {ackType:"delivered"}`;
//! those confirmations only move an in-memory high-water mark per user, and a flusher writes all of
//! them in one statement every `gateway.cursor_flush_ms` — never one write per message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use im_common::ids;
use im_common::store::Store;

/// Second look at the inbox, for messages that were in flight when the user came online.
const SECOND_PASS_AFTER: Duration = Duration::from_secs(2);

/// Pushes a user's undelivered saved messages into their connection's queue, oldest first. Waits for
/// queue space (the queue is the connection's own), so a long backlog is paced by the client.
///
/// Only messages accepted before `online_since_ms` (when the user's route was registered) are
/// resent: later ones find the route when they are pushed and arrive live, and resending them too
/// would push them twice. A second pass after [`SECOND_PASS_AFTER`] picks up messages that were in
/// flight at connect time: accepted before, pushed before the route existed, and saved only after
/// the first pass read the inbox. (Ids carry their gateway's clock, so the boundary is as sharp as
/// the gateways' clocks agree.)
pub async fn resend(store: Store, uid: u64, page_size: u32, out: mpsc::Sender<Bytes>, online_since_ms: u64) {
    let before = ids::min_id_at(online_since_ms);
    let after = match store.delivered_cursor(uid).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(uid, error = %e, "offline resend: cannot read cursor");
            return;
        }
    };
    let Some(after) = resend_pass(&store, uid, after, before, page_size, &out).await else { return };
    tokio::time::sleep(SECOND_PASS_AFTER).await;
    resend_pass(&store, uid, after, before, page_size, &out).await;
}

/// Sends the inbox between `after` and `before`; returns the last id sent (or `after`), `None` when
/// the connection or the database went away.
async fn resend_pass(
    store: &Store,
    uid: u64,
    mut after: u64,
    before: u64,
    page_size: u32,
    out: &mpsc::Sender<Bytes>,
) -> Option<u64> {
    loop {
        let page = match store.inbox_between(uid, after, before, page_size).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(uid, error = %e, "offline resend: cannot read inbox");
                return None;
            }
        };
        for msg in &page {
            out.send(Bytes::from(msg.push_frame().to_json())).await.ok()?;
            metrics::counter!("im_gateway_offline_resent_total").increment(1);
        }
        after = page.last().map_or(after, |m| m.id);
        if page.len() < page_size as usize {
            return Some(after);
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
