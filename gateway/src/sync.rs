//! Sync (SPEC §3.11): a device gets, per conversation, every saved message beyond its position, in
//! seq order, then `SYNC_DONE`.
//!
//! Each connection has one sync task that answers its `SYNC` requests one after the other (the
//! gateway queues a `SYNC {}` itself when the connection opens, unless the client asked for
//! `?sync=manual`). Positions come from the request or from the server's delivered positions
//! (`conversations.delivered_seq`). Pages of `gateway.offline_page_size` go into the connection's
//! own queue only while it keeps half its room for live pushes, so a client that reads keeps up and
//! is never closed as a slow consumer while catching up. Database errors are retried with backoff
//! until the sync completes or the connection closes.
//!
//! A message pushed live to the connection while its sync runs ends the sync of its conversation:
//! pushes of one direction come in seq order, so everything from that seq on arrives live, and the
//! sync does not send it twice ([`ConnHandle::first_live_seq`]).
//!
//! Messages saved after a sync read their conversation are not lost: a message pushed before the
//! connection existed and saved after it is pushed again by the save stage (it notices the user's
//! presence epoch moved), and one pushed after the connection registered arrives live.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use im_common::backoff::Backoff;
use im_common::protocol::{FrameType, ServerFrame, SyncRequest};
use im_common::store::{Store, StoreError};

use crate::sessions::ConnHandle;

/// SYNC requests a connection may have waiting; more get `ERROR too_many_requests`.
pub const QUEUED_SYNCS: usize = 8;
/// How often a sync that waits for room in the queue looks again.
const ROOM_POLL: Duration = Duration::from_millis(5);

/// What one connection's sync task needs.
pub struct Syncer {
    pub store: Store,
    pub uid: u64,
    pub page_size: u32,
    pub conn: ConnHandle,
}

impl Syncer {
    /// Starts the connection's sync task; it answers the requests sent to the returned queue, in
    /// order, until the queue or the connection closes. Requests must come after the connection is
    /// registered (route, presence epoch): a sync that read MySQL before could miss a message saved
    /// in between.
    /// The task ends with the connection: abort it (it holds the connection's queue open).
    pub fn start(self) -> (mpsc::Sender<SyncRequest>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel(QUEUED_SYNCS);
        let task = tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if !self.sync(request).await {
                    return;
                }
            }
        });
        (tx, task)
    }

    /// Answers one request; false once the connection is gone.
    async fn sync(&self, request: SyncRequest) -> bool {
        let peer_only = match request {
            SyncRequest::Peer { peer, .. } => Some(peer),
            _ => None,
        };
        self.conn.begin_sync();
        let mut open = true;
        if let Some(conversations) = self.retrying(|| self.positions(&request)).await {
            for (peer, after) in conversations {
                open = self.conversation(peer, after).await;
                if !open {
                    break;
                }
            }
        } else {
            open = false;
        }
        self.conn.end_sync();
        metrics::counter!("im_gateway_syncs_total").increment(1);
        let done = ServerFrame { peer: peer_only, ..ServerFrame::bare(FrameType::SyncDone) };
        open && self.out().send(Bytes::from(done.to_json())).await.is_ok()
    }

    fn out(&self) -> &mpsc::Sender<Bytes> {
        &self.conn.out
    }

    /// The (peer, position) pairs to sync.
    async fn positions(&self, request: &SyncRequest) -> Result<Vec<(u64, u64)>, StoreError> {
        match request {
            SyncRequest::Peer { peer, after_seq } => Ok(vec![(*peer, *after_seq)]),
            SyncRequest::Server => self.store.behind(self.uid).await,
            SyncRequest::Positions(own) => {
                let mut all: Vec<(u64, u64)> = self
                    .store
                    .behind(self.uid)
                    .await?
                    .into_iter()
                    .filter(|(p, _)| !own.iter().any(|(o, _)| o == p))
                    .collect();
                all.extend(own.iter().filter(|&&(peer, _)| peer != self.uid));
                Ok(all)
            }
        }
    }

    /// Sends the peer's messages after `after`, page by page; false once the connection is gone.
    async fn conversation(&self, peer: u64, mut after: u64) -> bool {
        // A page never takes more than half the queue (the other half is for live pushes).
        let page_size = self.page_size.min((self.out().max_capacity() / 2).max(1) as u32);
        loop {
            let Some(page) = self.retrying(|| self.store.messages_after(peer, self.uid, after, page_size)).await else {
                return false;
            };
            if !self.room_for(page.len()).await {
                return false;
            }
            // From the first seq pushed live during this sync on, the rest arrives live.
            let live_from = self.conn.first_live_seq(peer).unwrap_or(u64::MAX);
            let missing: Vec<_> = page.iter().take_while(|m| m.seq < live_from).collect();
            for msg in &missing {
                if self.out().send(Bytes::from(msg.push_frame().to_json())).await.is_err() {
                    return false;
                }
            }
            metrics::counter!("im_gateway_synced_messages_total").increment(missing.len() as u64);
            match page.last() {
                Some(last) if page.len() == page_size as usize && missing.len() == page.len() => after = last.seq,
                _ => return true,
            }
        }
    }

    /// Waits until the queue has room for `n` frames and still half of it free for live pushes.
    async fn room_for(&self, n: usize) -> bool {
        let out = self.out();
        let need = (n + out.max_capacity() / 2).min(out.max_capacity());
        while out.capacity() < need {
            if out.is_closed() {
                return false;
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
        true
    }

    /// Runs a query until it succeeds (backing off) or the connection closes.
    async fn retrying<T, F: std::future::Future<Output = Result<T, StoreError>>>(
        &self,
        mut query: impl FnMut() -> F,
    ) -> Option<T> {
        let mut backoff = Backoff::default();
        loop {
            match query().await {
                Ok(value) => return Some(value),
                Err(e) => {
                    metrics::counter!("im_gateway_sync_retries_total").increment(1);
                    tracing::debug!(uid = self.uid, error = %e, "sync query failed; retrying");
                    if self.out().is_closed() {
                        return None;
                    }
                    backoff.wait().await;
                }
            }
        }
    }
}
