//! One message, one id, one row (SPEC §3.9), checked per message from the logs and the rows.
//!
//! - **messages with several ids**: a (sender, clientMsgId) that appeared under more than one
//!   serverMsgId anywhere — `ACK(accepted)`, `ACK(saved)`, the answers to its resends, an `ERROR`
//!   that named an id, a push to its receiver, or a row in MySQL. Counted once per message however
//!   many ids it had; the per-event count of disagreeing pushes and receipts stays in
//!   `id_mismatches`.
//! - **saved without matching row**: a message with an `ACK(saved)` whose serverMsgId has no row, or
//!   whose row is another (from, clientMsgId) — a store that folded two keys into one, or a colliding
//!   id, acknowledged as a success. The run's rows are read by sender; a saved id that is not among
//!   them is looked up by id as well ([`saved_ids_without_row`] names them), so a row of someone
//!   else under that id is found.

use std::collections::{HashMap, HashSet};

use super::{DbRow, ReceiverLog, SenderLog};

/// The ids one message appeared under: the first one, and whether another one was seen.
#[derive(Clone, Copy)]
struct Ids {
    first: u64,
    several: bool,
}

/// Counts the messages that appeared under more than one serverMsgId in the receipts, pushes and
/// `rows` (rows of other senders, and rows whose clientMsgId is not a message number, are ignored).
pub fn messages_with_several_ids(senders: &[SenderLog], receivers: &[ReceiverLog], rows: &[DbRow]) -> u64 {
    let mut seen: HashMap<(u64, u64), Ids> = HashMap::new();
    let mut note = |from: u64, seq: u64, id: u64| {
        seen.entry((from, seq))
            .and_modify(|ids| ids.several |= ids.first != id)
            .or_insert(Ids { first: id, several: false });
    };
    for s in senders {
        for (seq, m) in s.messages.iter().enumerate() {
            for id in m.receipt_ids() {
                note(s.uid, seq as u64, id);
            }
        }
    }
    let known: HashSet<u64> = senders.iter().map(|s| s.uid).collect();
    for r in receivers {
        for d in r.deliveries.iter().filter(|d| known.contains(&d.from)) {
            note(d.from, d.number, d.server_msg_id);
        }
    }
    for row in rows.iter().filter(|row| known.contains(&row.from)) {
        if let Ok(seq) = row.client_msg_id.parse::<u64>() {
            note(row.from, seq, row.id);
        }
    }
    seen.values().filter(|ids| ids.several).count() as u64
}

/// Counts the messages with an `ACK(saved)` whose serverMsgId names no row in `rows`, or a row of
/// another (from, clientMsgId). `rows` must hold the run's rows and the rows found by the ids of
/// [`saved_ids_without_row`].
pub fn saved_without_matching_row(senders: &[SenderLog], rows: &[DbRow]) -> u64 {
    let by_id: HashMap<u64, &DbRow> = rows.iter().map(|row| (row.id, row)).collect();
    let mut count = 0;
    for s in senders {
        for (seq, m) in s.messages.iter().enumerate() {
            let cmid = seq.to_string();
            let mismatched =
                m.saved_ids().any(|id| by_id.get(&id).is_none_or(|row| row.from != s.uid || row.client_msg_id != cmid));
            count += u64::from(mismatched);
        }
    }
    count
}

/// The serverMsgIds of `ACK(saved)` receipts that no row in `rows` carries: to be looked up by id,
/// in case a row of another sender holds them.
pub fn saved_ids_without_row(senders: &[SenderLog], rows: &[DbRow]) -> Vec<u64> {
    let ids: HashSet<u64> = rows.iter().map(|row| row.id).collect();
    let mut missing: Vec<u64> =
        senders.iter().flat_map(|s| &s.messages).flat_map(|m| m.saved_ids()).filter(|id| !ids.contains(id)).collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::super::{Delivery, SentMsg};
    use super::*;

    /// One pair, `n` messages accepted and saved under id `1000 + seq`, pushed once each, one row each.
    fn clean(n: u64) -> (SenderLog, ReceiverLog, Vec<DbRow>) {
        let messages = (0..n)
            .map(|seq| SentMsg { accepted: Some(1000 + seq), saved: Some(1000 + seq), ..Default::default() })
            .collect();
        let deliveries = (0..n).map(|seq| Delivery::new(1, seq, 1000 + seq)).collect();
        let rows = (0..n).map(|seq| DbRow::new(1, seq.to_string(), 1000 + seq)).collect();
        (
            SenderLog { uid: 1, to: 2, messages, ..Default::default() },
            ReceiverLog { uid: 2, deliveries, ..Default::default() },
            rows,
        )
    }

    #[test]
    fn one_message_has_one_id_everywhere_in_a_clean_run() {
        let (s, r, rows) = clean(4);
        assert_eq!(messages_with_several_ids(std::slice::from_ref(&s), &[r], &rows), 0);
        assert_eq!(saved_without_matching_row(std::slice::from_ref(&s), &rows), 0);
        assert!(saved_ids_without_row(&[s], &rows).is_empty());
    }

    #[test]
    fn one_message_under_several_ids_is_counted_once_wherever_the_second_id_shows() {
        // A resend answered with another id.
        let (mut s, r, rows) = clean(4);
        s.messages[0].note_receipt(false, 7000);
        s.messages[0].note_receipt(true, 7001);
        assert_eq!(
            messages_with_several_ids(&[s], std::slice::from_ref(&r), &rows),
            1,
            "counted per message, not per id"
        );
        // A push under another id (twice: still one message).
        let (s, mut r, rows) = clean(4);
        r.deliveries[1].server_msg_id = 8000;
        r.deliveries.push(Delivery::new(1, 1, 8001));
        assert_eq!(messages_with_several_ids(&[s], &[r], &rows), 1);
        // A row under another id; and the accepted receipt disagreeing with the saved one.
        let (mut s, r, mut rows) = clean(4);
        rows[2].id = 9000;
        s.messages[3].accepted = Some(9100);
        assert_eq!(messages_with_several_ids(&[s], &[r], &rows), 2);
    }

    #[test]
    fn a_repeated_receipt_with_the_same_id_is_one_id() {
        let (mut s, r, rows) = clean(2);
        s.messages[0].note_receipt(true, 1000);
        s.messages[1].note_receipt(false, 1001);
        assert!(s.messages.iter().all(|m| m.other_receipts.is_empty()));
        assert_eq!(messages_with_several_ids(&[s], &[r], &rows), 0);
    }

    #[test]
    fn strangers_pushes_and_rows_are_not_messages_of_the_run() {
        let (s, mut r, mut rows) = clean(2);
        r.deliveries.push(Delivery::new(99, 0, 5));
        rows.push(DbRow::new(99, "0", 6));
        rows.push(DbRow::new(1, "not-a-number", 7));
        assert_eq!(messages_with_several_ids(&[s], &[r], &rows), 0);
    }

    #[test]
    fn a_saved_receipt_without_its_row_is_counted() {
        let (s, _, mut rows) = clean(4);
        rows.remove(1);
        assert_eq!(saved_without_matching_row(std::slice::from_ref(&s), &rows), 1);
        assert_eq!(saved_ids_without_row(&[s], &rows), vec![1001], "looked up by id");
    }

    #[test]
    fn a_saved_receipt_whose_row_is_another_message_is_counted() {
        // The store folded message 2 into message 1's key: the row under 1002 is someone else's.
        let (s, _, mut rows) = clean(4);
        rows[2].client_msg_id = "1".into();
        assert_eq!(saved_without_matching_row(std::slice::from_ref(&s), &rows), 1);
        // Another sender's row under a saved id (a colliding id), found by the lookup by id.
        let (s, _, mut rows) = clean(4);
        rows[3] = DbRow::new(77, "3", 1003);
        assert_eq!(saved_without_matching_row(&[s], &rows), 1);
    }

    #[test]
    fn only_saved_receipts_promise_a_row() {
        let (mut s, _, mut rows) = clean(3);
        // Accepted only (never saved): no row promised.
        s.messages[2].saved = None;
        rows.truncate(2);
        assert_eq!(saved_without_matching_row(std::slice::from_ref(&s), &rows), 0);
        // A resend answered ACK(saved) under an id without a row.
        s.messages[0].note_receipt(true, 4242);
        assert_eq!(saved_without_matching_row(std::slice::from_ref(&s), &rows), 1);
        assert_eq!(saved_ids_without_row(&[s], &rows), vec![4242]);
    }
}
