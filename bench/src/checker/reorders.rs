//! Where per-sender reorders happened, so a drill can say what kind they are.
//!
//! [`super::check_deliveries`] counts a reorder whenever a message's first push arrives after a
//! higher number from the same sender. Two very different things look like that: pushes that left
//! the engine out of order (SPEC §3.4), and a receiver that reconnected and got an older message by
//! offline resend after a newer one arrived live on the new connection (SPEC §3.11 asks for seq
//! order there too). The receiver's log knows on which of its connections each push arrived, which
//! tells the two apart.

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
}

/// Every reorder [`super::check_deliveries`] counts (same rule), with where it happened.
pub fn reorders(receivers: &[ReceiverLog]) -> Vec<Reorder> {
    let mut out = Vec::new();
    for r in receivers {
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        // Per sender: the highest number so far and the connection it arrived on.
        let mut highest: HashMap<u64, (u64, usize)> = HashMap::new();
        for (position, d) in r.deliveries.iter().enumerate() {
            if !seen.insert((d.from, d.seq)) {
                continue;
            }
            let connection = r.reconnected_at.iter().filter(|&&start| start <= position).count();
            match highest.get_mut(&d.from) {
                Some((h, on)) if d.seq < *h => out.push(Reorder {
                    receiver: r.uid,
                    from: d.from,
                    seq: d.seq,
                    after_seq: *h,
                    connection,
                    higher_on_same_connection: *on == connection,
                }),
                Some(h) => *h = (d.seq, connection),
                None => {
                    highest.insert(d.from, (d.seq, connection));
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
        let push = |seq| Delivery { from: 1, seq, server_msg_id: 1000 + seq };
        // First connection: 0, 2, 1 (out of order on one connection); then a reconnect: 5 live,
        // then 3 and 4 by offline resend.
        let deliveries = vec![push(0), push(2), push(1), push(5), push(3), push(4)];
        let r = ReceiverLog { uid: 2, deliveries, reconnected_at: vec![3], ..Default::default() };
        let found = reorders(std::slice::from_ref(&r));
        assert_eq!(
            found.iter().map(|o| (o.seq, o.after_seq, o.connection, o.higher_on_same_connection)).collect::<Vec<_>>(),
            vec![(1, 2, 0, true), (3, 5, 1, true), (4, 5, 1, true)]
        );
        let messages = (0..6).map(|seq| SentMsg { saved: Some(1000 + seq), ..Default::default() }).collect();
        let v = check_deliveries(&[SenderLog { uid: 1, to: 2, messages }], &[r]);
        assert_eq!(v.reorders, found.len() as u64, "the same rule as the count");
    }
}
