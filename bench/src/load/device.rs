//! What one receiving device knows, as a client written from docs/PROTOCOL.md keeps it: per peer,
//! the seqs it holds (its **position**: the highest seq with nothing missing below, and the seqs
//! held above it), the serverMsgIds it holds (pushes are deduped by id), what it has confirmed, and
//! which syncs it is waiting for.
//!
//! From that it decides, as a real client does:
//! - **confirmations**: at most one round per [`ACK_EVERY`], one `ACK {ackType, from, seq}` per
//!   conversation whose position moved — never past a gap (confirming past a gap would skip it);
//! - **gap syncs**: a seq above the position (a gap in live pushes) that is not filled within
//!   [`GAP_WAIT`] gets `SYNC {peer, afterSeq: position}`; one sync per conversation at a time, again
//!   at most every [`GAP_RETRY`] while the gap stays (in full mode a missed message may not be saved
//!   yet, so the first sync can come back empty). While a whole-device sync (the server's at connect,
//!   or the device's own `SYNC {positions}`) is running, gaps wait for its `SYNC_DONE`: live pushes
//!   interleave with synced ones, and most gaps then are only the sync not being through yet;
//! - **its own positions** for `SYNC {positions}` after a reconnect with `?sync=manual`.
//!
//! Pure state, no I/O: the receiver task ([`super::receiver`]) feeds it frames and the clock, and
//! sends what it returns.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two rounds of confirmations of one device.
pub(crate) const ACK_EVERY: Duration = Duration::from_millis(100);
/// How long a gap in live pushes may stay before the device asks for it.
pub(crate) const GAP_WAIT: Duration = Duration::from_millis(250);
/// How often a device asks again for a gap that a sync did not fill.
pub(crate) const GAP_RETRY: Duration = Duration::from_secs(1);
/// How long a sync may go unanswered (no `SYNC_DONE`) before the device stops waiting for it.
pub(crate) const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

/// One conversation (the pushes of one peer) as the device holds it.
#[derive(Debug, Default, Clone)]
struct Conversation {
    /// The highest seq held with every smaller one held too.
    position: u64,
    /// Seqs held above `position` (each leaves a gap below it).
    above: BTreeSet<u64>,
    /// The highest seq confirmed `delivered` / `read`.
    delivered: u64,
    read: u64,
    /// Since when a gap is open (`above` is not empty).
    gap_since: Option<Instant>,
    /// A `SYNC {peer, afterSeq}` sent at this moment and not answered yet.
    sync_sent: Option<Instant>,
    /// When the last one was sent.
    last_sync: Option<Instant>,
}

impl Conversation {
    /// Whether a `SYNC {peer}` is outstanding at `now`.
    fn syncing(&self, now: Instant) -> bool {
        self.sync_sent.is_some_and(|t| now < t + SYNC_TIMEOUT)
    }

    /// When a gap sync is due (`None`: no gap, or one is outstanding).
    fn gap_due(&self, now: Instant) -> Option<Instant> {
        let since = self.gap_since?;
        if self.syncing(now) {
            return None;
        }
        let after_wait = since + GAP_WAIT;
        Some(self.last_sync.map_or(after_wait, |t| after_wait.max(t + GAP_RETRY)))
    }
}

/// What a push was to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// A message it did not hold.
    New,
    /// A serverMsgId it already held.
    Duplicate,
    /// A serverMsgId it did not hold, under a seq it already held for another message: the server
    /// gave one seq twice (SPEC §3.10). Counted as new.
    SeqReused,
}

/// One device's state.
#[derive(Debug)]
pub(crate) struct DeviceState {
    conversations: BTreeMap<u64, Conversation>,
    ids: HashSet<u64>,
    /// Confirm `read` as well as `delivered`.
    read: bool,
    last_ack: Option<Instant>,
    /// A whole-device sync outstanding since then (`None`: none).
    full_sync: Option<Instant>,
}

impl DeviceState {
    pub fn new(read: bool) -> DeviceState {
        DeviceState { conversations: BTreeMap::new(), ids: HashSet::new(), read, last_ack: None, full_sync: None }
    }

    /// A push of `id` from `peer` arrived, carrying `seq` (`None`: the push had none).
    pub fn push(&mut self, peer: u64, seq: Option<u64>, id: u64, now: Instant) -> Held {
        if !self.ids.insert(id) {
            return Held::Duplicate;
        }
        let Some(seq) = seq else { return Held::New };
        let c = self.conversations.entry(peer).or_default();
        if seq <= c.position || !c.above.insert(seq) {
            return Held::SeqReused;
        }
        while c.above.remove(&(c.position + 1)) {
            c.position += 1;
        }
        c.gap_since = match (c.above.is_empty(), c.gap_since) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => Some(now),
        };
        Held::New
    }

    /// The device's position in the conversation with `peer`.
    #[cfg(test)]
    pub fn position(&self, peer: u64) -> u64 {
        self.conversations.get(&peer).map_or(0, |c| c.position)
    }

    /// Every position above 0, as `SYNC {positions}` wants them.
    pub fn positions(&self) -> BTreeMap<String, u64> {
        self.conversations.iter().filter(|(_, c)| c.position > 0).map(|(p, c)| (p.to_string(), c.position)).collect()
    }

    /// A whole-device sync began (the server's at connect, or the device's own `SYNC`).
    pub fn full_sync_began(&mut self, now: Instant) {
        self.full_sync = Some(now);
    }

    /// Whether a whole-device sync is outstanding at `now`.
    pub fn full_sync_running(&self, now: Instant) -> bool {
        self.full_sync.is_some_and(|t| now < t + SYNC_TIMEOUT)
    }

    /// `SYNC_DONE` arrived: for one conversation (`peer`), or for a whole-device sync. Returns how
    /// long the sync took, when the device knew it was waiting for it.
    pub fn sync_done(&mut self, peer: Option<u64>, now: Instant) -> Option<Duration> {
        let began = match peer {
            Some(p) => self.conversations.get_mut(&p).and_then(|c| c.sync_sent.take()),
            None => self.full_sync.take(),
        };
        began.map(|t| now.saturating_duration_since(t))
    }

    /// The connection was replaced: syncs asked on the old one will not be answered.
    pub fn reconnected(&mut self) {
        self.full_sync = None;
        for c in self.conversations.values_mut() {
            c.sync_sent = None;
        }
    }

    /// When the device next has something to send (a confirmation or a gap sync), if anything.
    pub fn next_due(&self, now: Instant, acks: bool) -> Option<Instant> {
        let ack = acks.then(|| self.ack_due(now)).flatten();
        let gap = if self.full_sync_running(now) {
            None
        } else {
            self.conversations.values().filter_map(|c| c.gap_due(now)).min()
        };
        match (ack, gap) {
            (Some(a), Some(g)) => Some(a.min(g)),
            (a, g) => a.or(g),
        }
    }

    fn ack_due(&self, now: Instant) -> Option<Instant> {
        let moved = self.conversations.values().any(|c| c.position > c.delivered || (self.read && c.position > c.read));
        moved.then(|| self.last_ack.map_or(now, |t| (t + ACK_EVERY).max(now)))
    }

    /// The confirmations due at `now`: `(peer, seq, read)` — every conversation whose position moved
    /// since its last confirmation, at its position (delivered, and read too when asked). They count
    /// as sent.
    pub fn take_acks(&mut self, now: Instant) -> Vec<(u64, u64, bool)> {
        if self.ack_due(now).is_none_or(|t| t > now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&peer, c) in &mut self.conversations {
            if c.position > c.delivered {
                c.delivered = c.position;
                out.push((peer, c.position, false));
            }
            if self.read && c.position > c.read {
                c.read = c.position;
                out.push((peer, c.position, true));
            }
        }
        self.last_ack = Some(now);
        out
    }

    /// The gap syncs due at `now`: `(peer, afterSeq)`. They count as sent (and outstanding).
    pub fn take_gap_syncs(&mut self, now: Instant) -> Vec<(u64, u64)> {
        if self.full_sync_running(now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&peer, c) in &mut self.conversations {
            if c.gap_due(now).is_some_and(|t| t <= now) {
                c.sync_sent = Some(now);
                c.last_sync = Some(now);
                out.push((peer, c.position));
            }
        }
        out
    }

    /// The gateway refused a frame (`too_many_requests`): confirmations sent since may be lost, so
    /// every position is confirmed again in the next round.
    pub fn confirm_again(&mut self) {
        for c in self.conversations.values_mut() {
            c.delivered = 0;
            c.read = 0;
        }
    }

    /// Seqs missing below the highest held, over every conversation (the open gaps).
    pub fn open_gaps(&self) -> u64 {
        self.conversations
            .values()
            .map(|c| c.above.last().map_or(0, |&top| top - c.position - c.above.len() as u64))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_position_moves_only_over_seqs_held_without_a_gap() {
        let t = Instant::now();
        let mut d = DeviceState::new(false);
        assert_eq!(d.push(7, Some(1), 101, t), Held::New);
        assert_eq!(d.push(7, Some(2), 102, t), Held::New);
        assert_eq!(d.push(7, Some(4), 104, t), Held::New);
        assert_eq!((d.position(7), d.open_gaps()), (2, 1));
        assert_eq!(d.push(7, Some(4), 104, t), Held::Duplicate, "the same id again");
        assert_eq!(d.push(7, Some(3), 103, t), Held::New);
        assert_eq!((d.position(7), d.open_gaps()), (4, 0));
        assert_eq!(d.push(7, Some(3), 999, t), Held::SeqReused, "another message under a seq held");
        assert_eq!(d.push(8, Some(1), 201, t), Held::New, "another peer, another sequence");
        assert_eq!(d.positions(), BTreeMap::from([("7".to_owned(), 4), ("8".to_owned(), 1)]));
        assert_eq!(d.push(9, None, 301, t), Held::New, "a push without seq is still deduped by id");
        assert_eq!(d.push(9, None, 301, t), Held::Duplicate);
    }

    #[test]
    fn confirmations_are_coalesced_per_conversation_and_never_pass_a_gap() {
        let t0 = Instant::now();
        let mut d = DeviceState::new(false);
        assert_eq!(d.next_due(t0, true), None, "nothing held, nothing to confirm");
        d.push(7, Some(1), 101, t0);
        d.push(8, Some(1), 201, t0);
        assert_eq!(d.next_due(t0, true), Some(t0), "the first round goes at once");
        assert_eq!(d.take_acks(t0), vec![(7, 1, false), (8, 1, false)]);
        assert_eq!(d.next_due(t0, true), None);
        // Within the interval: 2 and 3 arrive, 5 too (gap at 4): one round, up to 3, an interval later.
        for (seq, id) in [(2, 102), (3, 103), (5, 105)] {
            d.push(7, Some(seq), id, t0 + ms(10));
        }
        assert_eq!(d.take_acks(t0 + ms(50)), vec![], "not yet due");
        assert_eq!(d.take_acks(t0 + ACK_EVERY), vec![(7, 3, false)], "never past the gap at 4");
        d.push(7, Some(4), 104, t0 + ms(150));
        assert_eq!(d.take_acks(t0 + ms(300)), vec![(7, 5, false)]);
        // With read: both kinds, per conversation.
        let mut r = DeviceState::new(true);
        r.push(7, Some(1), 101, t0);
        assert_eq!(r.take_acks(t0), vec![(7, 1, false), (7, 1, true)]);
    }

    #[test]
    fn a_gap_that_stays_is_asked_for_once_at_a_time_and_again_while_it_stays() {
        let t0 = Instant::now();
        let mut d = DeviceState::new(false);
        d.push(7, Some(1), 101, t0);
        d.take_acks(t0);
        d.push(7, Some(3), 103, t0 + ms(10));
        assert_eq!(d.next_due(t0 + ms(10), true), Some(t0 + ms(10) + GAP_WAIT));
        assert!(d.take_gap_syncs(t0 + ms(100)).is_empty(), "waits for the in-order push first");
        let t1 = t0 + ms(10) + GAP_WAIT;
        assert_eq!(d.take_gap_syncs(t1), vec![(7, 1)]);
        assert!(d.take_gap_syncs(t1 + ms(500)).is_empty(), "one outstanding sync per conversation");
        assert_eq!(d.sync_done(Some(7), t1 + ms(20)), Some(ms(20)));
        // The sync came back without the gap (not saved yet): asked again after GAP_RETRY.
        assert!(d.take_gap_syncs(t1 + ms(500)).is_empty());
        assert_eq!(d.take_gap_syncs(t1 + GAP_RETRY), vec![(7, 1)]);
        d.push(7, Some(2), 102, t1 + GAP_RETRY + ms(5));
        assert_eq!(d.open_gaps(), 0);
        d.sync_done(Some(7), t1 + GAP_RETRY + ms(6));
        assert!(d.take_gap_syncs(t1 + ms(5000)).is_empty(), "filled: nothing more to ask");
    }

    #[test]
    fn gaps_wait_for_a_whole_device_sync_and_outstanding_syncs_end_with_the_connection() {
        let t0 = Instant::now();
        let mut d = DeviceState::new(false);
        d.full_sync_began(t0);
        d.push(7, Some(5), 105, t0);
        assert!(d.take_gap_syncs(t0 + ms(1000)).is_empty(), "the connect sync brings 1..4");
        assert_eq!(d.sync_done(None, t0 + ms(1200)), Some(ms(1200)));
        assert_eq!(d.take_gap_syncs(t0 + ms(1200)), vec![(7, 0)], "still missing after the sync: ask");
        d.reconnected();
        assert_eq!(d.sync_done(Some(7), t0 + ms(1300)), None, "asked on the old connection");
        assert_eq!(d.take_gap_syncs(t0 + ms(1200) + GAP_RETRY), vec![(7, 0)]);
        // A sync that is never answered is given up after SYNC_TIMEOUT.
        let mut s = DeviceState::new(false);
        s.full_sync_began(t0);
        assert!(s.full_sync_running(t0 + ms(10)) && !s.full_sync_running(t0 + SYNC_TIMEOUT));
    }
}
