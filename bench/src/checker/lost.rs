//! What the lost pushes have in common, so a drill can say what kind of loss it saw.
//!
//! A lost push is a receipted message that its receiver — connected at the end — never got
//! ([`super::check_deliveries`]). A receiver that confirms deliveries (`ACK delivered` for the highest
//! serverMsgId it saw) moves its user's delivered cursor there, and offline resend after every later
//! reconnect starts beyond it: a message whose id is below what the receiver saw from anyone is then
//! skipped for good (issue 12: one delivered high-water mark per user over serverMsgIds). Each lost
//! push is listed with that comparison.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::{ReceiverLog, SenderLog};

/// One receipted message its receiver never got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostPush {
    pub from: u64,
    /// The sender's message number (clientMsgId).
    pub seq: u64,
    pub to: u64,
    /// The id its receipts gave.
    pub server_msg_id: u64,
    /// Whether it got `ACK(saved)` (else only `ACK(accepted)`).
    pub saved: bool,
    /// Whether the receiver saw a push with a higher serverMsgId from anyone (so a cursor at the
    /// highest id it saw lies beyond this message).
    pub below_receivers_highest_seen: bool,
    /// Whether the receiver saw a later message from the same sender.
    pub later_from_same_sender_seen: bool,
}

/// Every lost push [`super::check_deliveries`] counts (same rule), described.
pub fn lost_pushes(senders: &[SenderLog], receivers: &[ReceiverLog]) -> Vec<LostPush> {
    let gone = super::gone_users(receivers);
    let reached: HashSet<(u64, u64)> =
        receivers.iter().flat_map(|r| r.deliveries.iter().map(|d| (d.from, d.number))).collect();
    let mut highest_seen: HashMap<u64, u64> = HashMap::new();
    let mut highest_seq: HashMap<(u64, u64), u64> = HashMap::new();
    for r in receivers {
        for d in &r.deliveries {
            let h = highest_seen.entry(r.uid).or_default();
            *h = (*h).max(d.server_msg_id);
            let s = highest_seq.entry((r.uid, d.from)).or_default();
            *s = (*s).max(d.number);
        }
    }
    let mut out = Vec::new();
    for s in senders {
        for (seq, m) in s.messages.iter().enumerate() {
            let to = m.to.unwrap_or(s.to);
            let seq = seq as u64;
            let Some(id) = m.receipted_id() else { continue };
            if m.error.is_some() || reached.contains(&(s.uid, seq)) || gone.contains(&to) {
                continue;
            }
            out.push(LostPush {
                from: s.uid,
                seq,
                to,
                server_msg_id: id,
                saved: m.saved.is_some(),
                below_receivers_highest_seen: highest_seen.get(&to).is_some_and(|&h| h > id),
                later_from_same_sender_seen: highest_seq.get(&(to, s.uid)).is_some_and(|&h| h > seq),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{check_deliveries, Delivery, SentMsg};
    use super::*;

    #[test]
    fn a_lost_push_is_described_against_what_its_receiver_saw() {
        // Two senders to receiver 9: sender 1's #1 (id 1002) never arrived, sender 2's #0 (id 1005) did.
        let sent = |ids: &[u64]| ids.iter().map(|&id| SentMsg { saved: Some(id), ..Default::default() }).collect();
        let one = SenderLog { uid: 1, to: 9, messages: sent(&[1001, 1002, 1006]), ..Default::default() };
        let two = SenderLog { uid: 2, to: 9, messages: sent(&[1005]), ..Default::default() };
        let push = |from, seq, id| Delivery::new(from, seq, id);
        let r = ReceiverLog { uid: 9, deliveries: vec![push(1, 0, 1001), push(2, 0, 1005)], ..Default::default() };
        let lost = lost_pushes(&[one.clone(), two.clone()], std::slice::from_ref(&r));
        assert_eq!(
            lost.iter()
                .map(|l| (l.from, l.seq, l.below_receivers_highest_seen, l.later_from_same_sender_seen))
                .collect::<Vec<_>>(),
            vec![(1, 1, true, false), (1, 2, false, false)]
        );
        assert_eq!(check_deliveries(&[one, two], &[r]).lost, lost.len() as u64, "the same rule as the count");
    }
}
