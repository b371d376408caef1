//! Where per-sender reorders happened, so a drill can say what kind they are.
//!
//! [`super::check_deliveries`] counts a reorder whenever a message's first push arrives after a
//! higher number from the same sender. Different things look like that: pushes that left the engine
//! out of order (SPEC §3.4) — a defect; and a sync's pushes interleaving with live ones, which
//! docs/PROTOCOL.md allows ("live pushes keep arriving during a sync; they may interleave with synced
//! ones ... order by seq per peer"): after a reconnect (the sync at connect), or after the device
//! asked for a gap with `SYNC {peer, afterSeq}`. The device's log knows on which connection each
//! push arrived and when it asked for which gap, which tells them apart.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::ReceiverLog;

/// One first push that arrived after a higher number from the same sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reorder {
    pub receiver: u64,
    pub from: u64,
    /// The message number (clientMsgId) that came late.
    pub seq: u64,
    /// The highest number from that sender seen before it.
    pub after_seq: u64,
    /// The receiver's connection it arrived on (0: the first; n: after the n-th reconnect).
    pub connection: usize,
    /// Whether the higher number arrived on the same connection (else on an earlier one).
    pub higher_on_same_connection: bool,
    /// Whether the device had asked for a gap of that sender (`SYNC {peer, afterSeq}`) on this
    /// connection before it arrived.
    pub after_gap_sync: bool,
}

impl Reorder {
    /// Whether a sync explains it (a reconnect's sync, or a gap sync of that sender); the others are
    /// pushes that left the engine out of order.
    pub fn by_sync(&self) -> bool {
        self.connection > 0 || self.after_gap_sync
    }
}

/// Every reorder [`super::check_deliveries`] counts (same rule), with where it happened.
pub fn reorders(receivers: &[ReceiverLog]) -> Vec<Reorder> {
    let mut out = Vec::new();
    for r in receivers {
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        // Per sender: the highest number so far and the connection it arrived on.
        let mut highest: HashMap<u64, (u64, usize)> = HashMap::new();
        for (position, d) in r.deliveries.iter().enumerate() {
            if !seen.insert((d.from, d.number)) {
                continue;
            }
            let connection = r.reconnected_at.iter().filter(|&&start| start <= position).count();
            let connection_start =
                r.reconnected_at.iter().copied().filter(|&start| start <= position).max().unwrap_or(0);
            let after_gap_sync =
                r.gap_synced_at.iter().any(|&(at, peer)| peer == d.from && at >= connection_start && at <= position);
            match highest.get_mut(&d.from) {
                Some((h, on)) if d.number < *h => out.push(Reorder {
                    receiver: r.uid,
                    from: d.from,
                    seq: d.number,
                    after_seq: *h,
                    connection,
                    higher_on_same_connection: *on == connection,
                    after_gap_sync,
                }),
                Some(h) => *h = (d.number, connection),
                None => {
                    highest.insert(d.from, (d.number, connection));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{check_deliveries, Delivery, SenderLog, SentMsg};
    use super::*;

    #[test]
    fn a_reorder_after_a_reconnect_is_told_apart_from_one_within_a_connection() {
        let push = |seq| Delivery::new(1, seq, 1000 + seq);
        // First connection: 0, 2, 1 (out of order on one connection); then a reconnect: 5 live,
        // then 3 and 4 by offline resend.
        let deliveries = vec![push(0), push(2), push(1), push(5), push(3), push(4)];
        let r = ReceiverLog { uid: 2, deliveries, reconnected_at: vec![3], ..Default::default() };
        let found = reorders(std::slice::from_ref(&r));
        assert_eq!(
            found.iter().map(|o| (o.seq, o.after_seq, o.connection, o.higher_on_same_connection)).collect::<Vec<_>>(),
            vec![(1, 2, 0, true), (3, 5, 1, true), (4, 5, 1, true)]
        );
        assert_eq!(found.iter().map(Reorder::by_sync).collect::<Vec<_>>(), vec![false, true, true]);
        let messages = (0..6).map(|seq| SentMsg { saved: Some(1000 + seq), ..Default::default() }).collect();
        let v = check_deliveries(&[SenderLog { uid: 1, to: 2, messages, ..Default::default() }], &[r]);
        assert_eq!(v.reorders, found.len() as u64, "the same rule as the count");
        // The same on one connection, after the device asked for the gap: explained by the sync.
        let deliveries = vec![push(0), push(2), push(1)];
        let r = ReceiverLog { uid: 2, deliveries, gap_synced_at: vec![(2, 1)], ..Default::default() };
        let found = reorders(&[r]);
        assert!(!found.is_empty() && found.iter().all(|o| o.after_gap_sync && o.by_sync()));
    }
}
