//! Seqs that fail-open saves took in MySQL and the shard's counters in Redis may not know yet.
//!
//! A gateway that saved messages on the baseline path while Redis was away (numbered from
//! `conversations.last_out_seq`) raises the shard's counters to their seqs once it reaches Redis
//! again (its outbox). If it cannot yet — it is paused, cut off, or gone — and the sender's next
//! message reaches the stream through another gateway, numbering from Redis alone would give that
//! message a seq MySQL already holds: its row is refused and the sender hears `save_failed`.
//!
//! So the shard owner watches MySQL for the newest fail-open save (`path_claims`, one query every
//! [`POLL`], only with `two_phase.fail_open`), and when it has moved, the next numbering first
//! restores the shard's counters from MySQL (raising, never lowering; [`crate::sequences::restore`]).
//! What stays open: a fail-open save that commits less than a poll before the numbering of a later
//! message of the same sender, sent through another gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use im_common::store::Store;

/// How often the owner asks MySQL for the newest fail-open save.
pub const POLL: Duration = Duration::from_millis(100);

/// The newest fail-open save seen, and the newest the counters were restored past.
#[derive(Debug, Default)]
pub struct FailOpenFloors {
    newest: AtomicU64,
    restored: AtomicU64,
}

impl FailOpenFloors {
    /// The newest fail-open save seen, when the counters were not restored since it.
    pub fn pending(&self) -> Option<u64> {
        let newest = self.newest.load(Ordering::Acquire);
        (newest > self.restored.load(Ordering::Acquire)).then_some(newest)
    }

    /// The counters now hold every seq of the fail-open saves up to `newest`.
    pub fn restored(&self, newest: u64) {
        self.restored.fetch_max(newest, Ordering::AcqRel);
    }

    /// Reads the newest fail-open save once.
    pub async fn refresh(&self, store: &Store) {
        match store.newest_fail_open_save().await {
            Ok(id) => {
                self.newest.fetch_max(id, Ordering::AcqRel);
            }
            Err(e) => tracing::debug!(error = %e, "reading the newest fail-open save failed; next poll"),
        }
    }

    /// Refreshes every [`POLL`] until the task is aborted.
    pub async fn watch(self: std::sync::Arc<Self>, store: Store) {
        loop {
            tokio::time::sleep(POLL).await;
            self.refresh(&store).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_fail_open_save_is_pending_until_the_counters_are_restored_past_it() {
        let floors = FailOpenFloors::default();
        assert_eq!(floors.pending(), None, "none seen");
        floors.newest.fetch_max(7, Ordering::AcqRel);
        assert_eq!(floors.pending(), Some(7));
        floors.restored(7);
        assert_eq!(floors.pending(), None);
        // Pruned claims make the newest id go down: nothing to restore for that.
        floors.newest.fetch_max(5, Ordering::AcqRel);
        assert_eq!(floors.pending(), None);
        floors.newest.fetch_max(9, Ordering::AcqRel);
        assert_eq!(floors.pending(), Some(9));
    }
}
