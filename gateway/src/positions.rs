//! Delivered and read positions per conversation, and the `RECEIPT`s they owe senders.
//!
//! `ACK delivered|read` only moves an in-memory position per (user, peer); a flusher writes all of
//! them in one statement every `gateway.cursor_flush_ms` — never one write per ACK — and then tells
//! the senders: every live connection of each peer gets one `RECEIPT` per conversation and kind per
//! flush. An ACK that names a message by serverMsgId (the older form) is turned into its (peer, seq)
//! at the flush, one query for all of them; a message not saved yet is looked up again at the next
//! flushes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_common::protocol::{AckTarget, AckType, ServerFrame};
use im_common::record::Push;
use im_common::store::{Position, Store};

use crate::fanout::Fanout;

/// Flushes an ACK by serverMsgId waits for its message to be saved before it is dropped.
const MAX_LOOKUPS: u8 = 20;
/// Rows per statement.
const CHUNK: usize = 1000;

#[derive(Default)]
struct Pending {
    /// (user, peer) → how far the user confirmed the peer's messages.
    positions: HashMap<(u64, u64), Position>,
    /// (user, serverMsgId) → the kind of ACK and how many flushes looked it up.
    by_id: HashMap<(u64, u64), (AckType, u8)>,
}

/// Coalesces position updates and writes them in batches.
#[derive(Default)]
pub struct Positions {
    pending: Mutex<Pending>,
}

fn raise(positions: &mut HashMap<(u64, u64), Position>, key: (u64, u64), ack_type: AckType, seq: u64) {
    let p = positions.entry(key).or_default();
    match ack_type {
        AckType::Read => p.read = p.read.max(seq),
        _ => p.delivered = p.delivered.max(seq),
    }
}

impl Positions {
    /// Records that `uid` confirmed `target` as delivered or read.
    pub fn advance(&self, uid: u64, ack_type: AckType, target: AckTarget) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match target {
            AckTarget::Seq { peer, seq } => raise(&mut pending.positions, (uid, peer), ack_type, seq),
            AckTarget::Message(id) => {
                let entry = pending.by_id.entry((uid, id)).or_insert((ack_type, 0));
                if ack_type == AckType::Read {
                    entry.0 = AckType::Read;
                }
            }
        }
    }

    /// Writes everything pending and relays the receipts; on failure keeps it for the next flush.
    pub async fn flush(&self, store: &Store, fanout: &Fanout) {
        let Pending { mut positions, by_id } =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut unresolved = HashMap::new();
        if !by_id.is_empty() {
            let asked: Vec<(u64, u64)> = by_id.keys().copied().collect();
            let mut found = HashMap::new();
            for chunk in asked.chunks(CHUNK) {
                match store.seqs_of(chunk).await {
                    Ok(f) => found.extend(f),
                    Err(e) => tracing::debug!(error = %e, "position lookup failed; will retry"),
                }
            }
            for ((uid, id), (ack_type, tries)) in by_id {
                match found.get(&(uid, id)) {
                    Some(&(from, seq)) => raise(&mut positions, (uid, from), ack_type, seq),
                    None if tries + 1 < MAX_LOOKUPS => {
                        unresolved.insert((uid, id), (ack_type, tries + 1));
                    }
                    None => metrics::counter!("im_gateway_acks_unresolved_total").increment(1),
                }
            }
        }
        let batch: Vec<((u64, u64), Position)> = positions.into_iter().collect();
        let mut written = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        for chunk in batch.chunks(CHUNK) {
            match store.advance_positions(chunk).await {
                Ok(()) => written.extend_from_slice(chunk),
                Err(e) => {
                    tracing::warn!(error = %e, "position flush failed; will retry");
                    failed.extend_from_slice(chunk);
                }
            }
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for ((uid, peer), p) in failed {
                raise(&mut pending.positions, (uid, peer), AckType::Delivered, p.delivered);
                raise(&mut pending.positions, (uid, peer), AckType::Read, p.read);
            }
            for (key, value) in unresolved {
                pending.by_id.entry(key).or_insert(value);
            }
        }
        relay_receipts(store, fanout, &written).await;
    }

    /// Flushes every `period` until the process ends.
    pub async fn flush_every(self: Arc<Self>, store: Store, fanout: Arc<Fanout>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            self.flush(&store, &fanout).await;
        }
    }
}

/// Tells each sender how far the recipient got: `RECEIPT delivered` (and `read`, when this flush
/// moved it) per conversation, with the serverMsgId at that seq when it is saved. The positions
/// relayed are the stored ones — the maxima — so a receipt never goes back, whatever an ACK said.
async fn relay_receipts(store: &Store, fanout: &Fanout, written: &[((u64, u64), Position)]) {
    let mut pushes = Vec::with_capacity(written.len() * 2);
    for chunk in written.chunks(CHUNK) {
        let pairs: Vec<(u64, u64)> = chunk.iter().map(|&(pair, _)| pair).collect();
        let stored = match store.receipts_of(&pairs).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::debug!(error = %e, "reading positions back failed; no receipts this flush");
                continue;
            }
        };
        for &((uid, peer), asked) in chunk {
            let Some(now) = stored.get(&(uid, peer)) else { continue };
            let read = (asked.read > 0).then_some((AckType::Read, now.at.read, now.read_id));
            for (ack_type, seq, id) in
                [(AckType::Delivered, now.at.delivered, now.delivered_id)].into_iter().chain(read)
            {
                if seq > 0 {
                    pushes.push(Push { user: peer, conn: None, frame: ServerFrame::receipt(ack_type, uid, seq, id) });
                }
            }
        }
    }
    if pushes.is_empty() {
        return;
    }
    metrics::counter!("im_gateway_receipts_relayed_total").increment(pushes.len() as u64);
    fanout.push(pushes).await;
}
