//! The outbox: what fail-open saves owe Redis — their idempotency marks, the seq floors their seqs
//! set for the shard's counters, and their remote pushes.
//!
//! A fail-open (baseline) save commits while Redis is unreachable, so neither its `s:<id>` mark in
//! the idempotency window nor its pushes to other gateways can be written. They wait here, and
//! [`Outbox::republish`] writes them once Redis answers: the marks and floors first (so a resend of such a
//! message keeps its id, and the shard's owner numbers past its seq), then the pushes, oldest first. While anything waits, new remote pushes
//! queue behind it and the appender keeps messages on the baseline path, whose save reports the id
//! already stored — so nothing a sender sends later can overtake a waiting push or get a second id.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use im_common::idempotency::{IdempotencyWindow, Stage};
use im_common::record::Push;
use im_common::router::{Router, Target};
use im_common::seq_counters::SeqFloor;

/// How often an idle republisher looks for waiting pushes, and how long it waits after a failure.
const IDLE_POLL: Duration = Duration::from_millis(50);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Most pushes the outbox holds; beyond that the oldest are dropped (their rows are saved, and
/// offline resend delivers them on reconnect).
const OUTBOX_MAX_PUSHES: usize = 100_000;

/// Idempotency marks (key, final stage, id) and seq floors waiting for Redis.
type Deferred = (Vec<(String, Stage, u64)>, Vec<SeqFloor>);

/// Remote pushes of saved messages that could not be published (Redis unreachable), oldest first.
/// [`Outbox::republish`] sends them in order once Redis answers. While anything waits here, new
/// remote pushes queue behind it and the appender keeps messages on the baseline path, so nothing
/// a sender sends later can overtake a waiting push.
#[derive(Default)]
pub struct Outbox {
    queue: std::sync::Mutex<VecDeque<Vec<(Target, Push)>>>,
    /// Pushes queued or being republished.
    pushes: AtomicUsize,
    /// Idempotency marks (key, final stage, id) and seq floors of saves made while Redis was away.
    marks: std::sync::Mutex<Deferred>,
    marks_waiting: AtomicUsize,
}

impl Outbox {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pushes.load(Ordering::Acquire) == 0 && self.marks_waiting.load(Ordering::Acquire) == 0
    }

    /// Keeps idempotency marks and seq floors that could not be written until Redis answers.
    pub fn defer_marks(&self, marks: Vec<(String, Stage, u64)>, floors: Vec<SeqFloor>) {
        let mut waiting = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        self.marks_waiting.fetch_add(marks.len() + floors.len(), Ordering::AcqRel);
        waiting.0.extend(marks);
        waiting.1.extend(floors);
    }

    /// Writes the deferred marks and floors; false while Redis does not take them.
    async fn flush_marks(&self, window: &IdempotencyWindow) -> bool {
        let (marks, floors) = std::mem::take(&mut *self.marks.lock().unwrap_or_else(|p| p.into_inner()));
        if marks.is_empty() && floors.is_empty() {
            return true;
        }
        if window.settle(&marks, &floors).await.is_ok() {
            self.marks_waiting.fetch_sub(marks.len() + floors.len(), Ordering::AcqRel);
            return true;
        }
        let mut waiting = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        waiting.0.extend(marks);
        waiting.1.extend(floors);
        false
    }

    /// Queues a batch behind what waits (dropping the oldest beyond the cap).
    pub fn enqueue(&self, batch: Vec<(Target, Push)>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.pushes.fetch_add(batch.len(), Ordering::AcqRel);
        queue.push_back(batch);
        self.trim(&mut queue);
    }

    fn trim(&self, queue: &mut VecDeque<Vec<(Target, Push)>>) {
        while self.pushes.load(Ordering::Acquire) > OUTBOX_MAX_PUSHES {
            let Some(oldest) = queue.pop_front() else { break };
            self.pushes.fetch_sub(oldest.len(), Ordering::AcqRel);
            metrics::counter!("im_gateway_pushes_dropped_total").increment(oldest.len() as u64);
        }
        metrics::gauge!("im_gateway_outbox_pushes").set(self.pushes.load(Ordering::Acquire) as f64);
    }

    /// Writes deferred marks, then republishes waiting pushes oldest first, until the process ends.
    pub async fn republish(self: Arc<Self>, router: Router, window: IdempotencyWindow, node: u16) {
        loop {
            if !self.flush_marks(&window).await {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            let next = self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            let Some(batch) = next else {
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            };
            match router.send(&batch, Some(node)).await {
                Ok(stats) => {
                    metrics::counter!("im_gateway_pubsub_messages_out_total").increment(stats.publishes as u64);
                    self.pushes.fetch_sub(batch.len(), Ordering::AcqRel);
                    metrics::gauge!("im_gateway_outbox_pushes").set(self.pushes.load(Ordering::Acquire) as f64);
                }
                Err(_) => {
                    {
                        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                        queue.push_front(batch);
                        self.trim(&mut queue);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_common::protocol::ServerFrame;

    fn batch(n: usize, first_id: u64) -> Vec<(Target, Push)> {
        (0..n as u64)
            .map(|i| {
                let frame = ServerFrame::ack(im_common::protocol::AckType::Saved, "c", first_id + i);
                (Target::Routed, Push { user: 1, conn: None, frame })
            })
            .collect()
    }

    fn queued_ids(outbox: &Outbox) -> Vec<u64> {
        let queue = outbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.iter().flatten().filter_map(|(_, p)| p.frame.server_msg_id).collect()
    }

    #[test]
    fn pushes_wait_in_the_order_they_were_queued() {
        let outbox = Outbox::default();
        assert!(outbox.is_empty());
        outbox.enqueue(batch(2, 10));
        outbox.enqueue(batch(1, 20));
        assert!(!outbox.is_empty());
        assert_eq!(queued_ids(&outbox), [10, 11, 20]);
    }

    #[test]
    fn beyond_the_cap_the_oldest_batches_are_dropped_whole() {
        let outbox = Outbox::default();
        let half = OUTBOX_MAX_PUSHES / 2 + 1;
        outbox.enqueue(batch(half, 0));
        outbox.enqueue(batch(half, 1_000_000));
        assert_eq!(outbox.pushes.load(Ordering::Acquire), half, "the oldest batch was not dropped");
        assert_eq!(queued_ids(&outbox).first(), Some(&1_000_000));
    }
}
