//! Sync (SPEC §3.11): a device gets, per conversation, every saved message beyond its position, in
//! seq order, then `SYNC_DONE`.
//!
//! Each connection answers its `SYNC` requests one after the other, in a task that runs while
//! requests wait ([`Syncs`]; the gateway queues a `SYNC {}` itself when the connection opens,
//! unless the client asked for `?sync=manual`). Positions come from the request or from the
//! server's delivered positions (`conversations.delivered_seq`). Pages of `gateway.offline_page_size` go into the connection's
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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::AbortHandle;

use im_common::backoff::Backoff;
use im_common::protocol::{FrameType, ServerFrame, SyncRequest};
use im_common::store::{Store, StoreError};

use crate::outbound::{Outbound, Refused};
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

/// A connection's sync requests and the task answering them, in order. The task runs only while
/// requests wait, so a quiet connection holds neither a task nor a queue (about 2 KiB of each idle
/// connection when it had both for its whole life).
#[derive(Clone)]
pub struct Syncs {
    syncer: Arc<Syncer>,
    state: Arc<Mutex<Waiting>>,
}

/// The requests not yet answered, and the task answering them while there are any.
#[derive(Default)]
struct Waiting {
    requests: VecDeque<SyncRequest>,
    task: Option<AbortHandle>,
}

impl Syncs {
    pub fn new(syncer: Syncer) -> Self {
        Syncs { syncer: Arc::new(syncer), state: Arc::default() }
    }

    /// Queues a request, starting the task if none runs. A client's request is refused (false)
    /// while [`QUEUED_SYNCS`] wait; the server's own are always taken. Requests must come after the
    /// connection is registered (route, presence epoch): a sync that read MySQL before could miss a
    /// message saved in between.
    pub fn request(&self, request: SyncRequest) -> bool {
        let mut waiting = lock(&self.state);
        if waiting.requests.len() >= QUEUED_SYNCS && !matches!(request, SyncRequest::Server) {
            return false;
        }
        waiting.requests.push_back(request);
        if waiting.task.is_none() {
            // Spawned under the lock: the task cannot find the queue empty and clear `task`
            // before it is set here.
            let (syncer, state) = (self.syncer.clone(), self.state.clone());
            waiting.task = Some(tokio::spawn(answer(syncer, state)).abort_handle());
        }
        true
    }

    /// Stops the sync in progress and forgets the waiting requests: the connection ended.
    pub fn stop(&self) {
        let mut waiting = lock(&self.state);
        waiting.requests.clear();
        if let Some(task) = waiting.task.take() {
            task.abort();
        }
    }
}

/// Answers the waiting requests one after the other; ends when none is left or the connection is
/// gone.
async fn answer(syncer: Arc<Syncer>, state: Arc<Mutex<Waiting>>) {
    loop {
        let request = {
            let mut waiting = lock(&state);
            match waiting.requests.pop_front() {
                Some(request) => request,
                None => {
                    waiting.task = None;
                    return;
                }
            }
        };
        if !syncer.sync(request).await {
            let mut waiting = lock(&state);
            waiting.requests.clear();
            waiting.task = None;
            return;
        }
    }
}

fn lock(state: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Syncer {
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
        open && self.room_for(1).await && self.queue(self.conn.encoding.encode(&done)).await
    }

    fn out(&self) -> &Outbound {
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
        let page_size = self.page_size.min((self.out().capacity() / 2).max(1) as u32);
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
                if !self.queue(self.conn.encoding.encode(&msg.push_frame())).await {
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

    /// Queues a frame, waiting while the queue is full (live pushes took the room kept for them): a
    /// sync never closes a reading client as a slow consumer. False once the connection is gone.
    async fn queue(&self, frame: Bytes) -> bool {
        loop {
            match self.out().push(frame.clone()) {
                Ok(()) => return true,
                Err(Refused::Closed) => return false,
                Err(Refused::Full) => tokio::time::sleep(ROOM_POLL).await,
            }
        }
    }

    /// Waits until the queue has room for `n` frames and still half of it free for live pushes.
    async fn room_for(&self, n: usize) -> bool {
        let out = self.out();
        let need = (n + out.capacity() / 2).min(out.capacity());
        while out.room() < need {
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
