//! Delivered confirmations as a real client sends them today: not one per push, but at most one per
//! [`ACK_EVERY`], for the highest serverMsgId seen so far (`ACK {ackType:"delivered", serverMsgId}`,
//! docs/PROTOCOL.md "Delivery cursor").
//!
//! The gateway moves the user's delivered cursor to that id, and offline resend starts after it. A
//! receiver that confirms the highest id it saw is exactly the client that exposes a cursor kept as
//! one high-water mark over serverMsgIds: anything with a lower id that it has not seen yet is
//! skipped by every later resend. The bench does not hide that behind a friendlier client.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two confirmations of one receiver.
pub(super) const ACK_EVERY: Duration = Duration::from_millis(100);

/// One receiver's coalesced confirmations.
#[derive(Debug, Default)]
pub(super) struct DeliveredAcks {
    highest_seen: u64,
    /// The push of `highest_seen`: its sender and seq (for the drain's receipt ledger).
    highest_at: Option<(u64, u64)>,
    highest_sent: u64,
    last_sent: Option<Instant>,
}

impl DeliveredAcks {
    /// A push of `server_msg_id` arrived.
    pub fn seen(&mut self, server_msg_id: u64) {
        self.highest_seen = self.highest_seen.max(server_msg_id);
    }

    /// A push of `server_msg_id` from `peer` at `seq` arrived.
    pub fn seen_at(&mut self, server_msg_id: u64, peer: u64, seq: Option<u64>) {
        if server_msg_id > self.highest_seen {
            self.highest_at = seq.map(|s| (peer, s));
        }
        self.seen(server_msg_id);
    }

    /// The sender and seq of the highest id seen, when its push had a seq.
    pub fn highest_at(&self) -> Option<(u64, u64)> {
        self.highest_at
    }

    /// When the next confirmation is due (`None`: nothing new to confirm): at once, or
    /// [`ACK_EVERY`] after the previous one.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        (self.highest_seen > self.highest_sent).then(|| self.last_sent.map_or(now, |t| (t + ACK_EVERY).max(now)))
    }

    /// The id to confirm at `now`, if anything new was seen; it counts as sent.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        if self.highest_seen <= self.highest_sent {
            return None;
        }
        self.highest_sent = self.highest_seen;
        self.last_sent = Some(now);
        Some(self.highest_sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_are_coalesced_to_the_highest_id_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut acks = DeliveredAcks::default();
        assert_eq!(acks.due(t0), None, "nothing seen, nothing to confirm");
        acks.seen(10);
        assert_eq!(acks.due(t0), Some(t0), "the first confirmation goes at once");
        assert_eq!(acks.take(t0), Some(10));
        assert_eq!(acks.due(t0), None);
        // Three pushes within the interval: one confirmation, of the highest id, an interval later.
        acks.seen(12);
        acks.seen(15);
        acks.seen(11);
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(acks.due(t1), Some(t0 + ACK_EVERY));
        assert_eq!(acks.take(t0 + ACK_EVERY), Some(15));
        // A push of a lower id (a resend) confirms nothing new.
        acks.seen(14);
        assert_eq!(acks.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(acks.take(t0 + Duration::from_secs(1)), None);
        // Long after the last one: due at once.
        acks.seen(20);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(acks.due(later), Some(later));
    }
}
