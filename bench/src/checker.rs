//! Verdicts from what the clients saw and what the database holds: pure functions over logs.
//!
//! Every sender numbers its messages `0, 1, 2, ...` and uses the number as `clientMsgId`; every
//! receiver logs each push (sender, number, serverMsgId) in arrival order. From these alone:
//! - **delivered**: distinct (sender, number) pushes;
//! - **duplicates**: pushes of a (sender, number) the receiver already had (SPEC §3.5 allows them
//!   after a crash; the bench counts them, never hides them);
//! - **reorders**: first pushes that arrive after a higher number from the same sender (§3.4);
//! - **lost**: messages that got `ACK(accepted)` or `ACK(saved)` but were never pushed to a receiver
//!   that stayed connected until the end (§3.1); messages to a receiver that dropped are counted apart,
//!   since offline resend, not live push, owes them;
//! - **id mismatches**: the push, the accepted receipt and the saved receipt of one message must carry
//!   the same serverMsgId (§3.3); counted per push or receipt that disagrees.
//!
//! The row check compares the receipts with the run's rows in MySQL: receipted but missing, the same
//! (sender, clientMsgId) twice, rows nobody got a receipt for, and rows under a different id. With
//! the rows at hand, [`ids`] counts per message what SPEC §3.9 forbids: one message under several
//! serverMsgIds anywhere (receipts, answers to resends, pushes, rows), and an `ACK(saved)` whose
//! serverMsgId has no row of that very message.

mod ids;
mod lost;
mod recipients;
mod reorders;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

pub use ids::{messages_with_several_ids, saved_ids_without_row, saved_without_matching_row};
pub use lost::{lost_pushes, LostPush};
pub use recipients::{check_recipients, RecipientVerdict};
pub use reorders::{reorders, Reorder};

/// One message as its sender saw it. Its number (index in [`SenderLog::messages`]) is its clientMsgId.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentMsg {
    /// Microseconds from the run's epoch to the write.
    pub sent_at_us: u64,
    /// serverMsgId of the `ACK(accepted)`.
    pub accepted: Option<u64>,
    /// serverMsgId of the `ACK(saved)`.
    pub saved: Option<u64>,
    /// Reason of an `ERROR` for this message.
    pub error: Option<String>,
    /// Times it was sent again with the same clientMsgId after a reconnect (its receipts may then
    /// arrive twice, with the same serverMsgId).
    pub resends: u32,
    /// Its receiver when that is not the sender's own ([`SenderLog::to`]): a crossed load sends every
    /// other message to the next pair's receiver.
    pub to: Option<u64>,
    /// Later receipts (answers to resends, repeated receipts, `ERROR`s naming an id) whose serverMsgId
    /// is neither `accepted`'s nor `saved`'s: one message under several ids (SPEC §3.9).
    pub other_receipts: Vec<Receipt>,
}

/// A receipt beyond the first of its kind, kept only when it names another serverMsgId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// `ACK(saved)` (which promises a row under this id), or another frame (`ACK(accepted)`, `ERROR`).
    pub saved: bool,
    pub server_msg_id: u64,
}

impl SentMsg {
    /// Whether the engine promised this message (accepted or saved).
    pub fn receipted(&self) -> bool {
        self.accepted.is_some() || self.saved.is_some()
    }

    /// The serverMsgId the receipts gave (saved wins; they must agree anyway).
    pub fn receipted_id(&self) -> Option<u64> {
        self.saved.or(self.accepted)
    }

    /// Notes a later receipt (or an `ERROR` carrying an id) of this message; kept only when its id
    /// is one the first receipts did not give.
    pub fn note_receipt(&mut self, saved: bool, server_msg_id: u64) {
        if self.accepted != Some(server_msg_id) && self.saved != Some(server_msg_id) {
            self.other_receipts.push(Receipt { saved, server_msg_id });
        }
    }

    /// Every serverMsgId any receipt of this message named.
    pub fn receipt_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.accepted.into_iter().chain(self.saved).chain(self.other_receipts.iter().map(|r| r.server_msg_id))
    }

    /// Every serverMsgId an `ACK(saved)` of this message named: each promises a committed row of
    /// this very message under that id.
    pub fn saved_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.saved.into_iter().chain(self.other_receipts.iter().filter(|r| r.saved).map(|r| r.server_msg_id))
    }

    /// Whether this message has its final answer: an error or `ACK(saved)`. (In two-phase modes its
    /// `ACK(accepted)` travels another path and may come after; a fail-open save never gets one. The
    /// drain lingers a moment after the last final answer for such stragglers.)
    pub fn complete(&self) -> bool {
        self.error.is_some() || self.saved.is_some()
    }
}

/// Everything one sender saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderLog {
    pub uid: u64,
    /// Its receiver (of every message without its own [`SentMsg::to`]).
    pub to: u64,
    /// Indexed by message number (= clientMsgId).
    pub messages: Vec<SentMsg>,
    /// `RECEIPT`s by recipient.
    pub receipts: BTreeMap<u64, ReceiptLog>,
}

/// One push as its recipient saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub from: u64,
    /// The sender's message number (its clientMsgId).
    pub number: u64,
    pub server_msg_id: u64,
    /// The push's `seq`: the message's position in the from→to direction (`None`: it had none).
    pub seq: Option<u64>,
}

impl Delivery {
    /// A push without `seq`.
    pub fn new(from: u64, number: u64, server_msg_id: u64) -> Delivery {
        Delivery { from, number, server_msg_id, seq: None }
    }

    /// A push with `seq`.
    pub fn with_seq(from: u64, number: u64, server_msg_id: u64, seq: u64) -> Delivery {
        Delivery { from, number, server_msg_id, seq: Some(seq) }
    }
}

/// Everything one receiving device saw. A user may have several devices (connections of the same
/// user id, each with its own log); every one of them is owed every message to the user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverLog {
    pub uid: u64,
    /// Which of the user's devices (0, 1, ...).
    pub device: u8,
    /// Pushes in arrival order.
    pub deliveries: Vec<Delivery>,
    /// The device was not connected at the end of the drain (it dropped and could not come back).
    pub gone: bool,
    /// Where each reconnection began: the number of pushes in `deliveries` before it (the first
    /// connection begins at 0 and is not listed).
    pub reconnected_at: Vec<usize>,
    /// Reconnections that sent the device's own positions (`?sync=manual` + `SYNC {positions}`).
    pub own_position_syncs: u32,
    /// Every `SYNC {peer, afterSeq}` sent for a gap in live pushes: (the number of pushes in
    /// `deliveries` before it, the peer).
    pub gap_synced_at: Vec<(usize, u64)>,
    /// Seqs still missing below the highest one held, per conversation, at the end.
    pub open_gaps: u64,
}

/// The receipts (`RECEIPT`) one sender got from one recipient: the highest positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiptLog {
    pub delivered: u64,
    pub read: u64,
    /// `RECEIPT` frames.
    pub frames: u64,
    /// Receipts below one the sender already had (positions never go backwards; a receipt may be
    /// overtaken by a newer one on another path, so this is counted, not failed).
    pub regressions: u64,
}

/// What the receipts and pushes add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryVerdict {
    pub sent: u64,
    #[serde(rename = "ack_accepted")]
    pub accepted: u64,
    #[serde(rename = "ack_saved")]
    pub saved: u64,
    /// Messages answered with an `ERROR`.
    pub errored: u64,
    /// Neither `ACK(saved)` nor `ERROR` by the end of the drain.
    pub unanswered: u64,
    /// Distinct messages pushed (to any device of their recipient).
    pub delivered: u64,
    /// Receipted, not errored, and never pushed to a receiver that stayed connected.
    pub lost: u64,
    /// Receipted but not pushed because the receiver was not connected throughout.
    pub undelivered_receiver_gone: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// A push or receipt whose serverMsgId disagrees with another one of the same message.
    pub id_mismatches: u64,
    /// Pushes of messages this run never sent (unknown sender or number).
    pub unexpected: u64,
}

/// Checks pushes against receipts (see the module doc for each count).
pub fn check_deliveries(senders: &[SenderLog], receivers: &[ReceiverLog]) -> DeliveryVerdict {
    let mut v = DeliveryVerdict::default();
    let by_uid: HashMap<u64, &SenderLog> = senders.iter().map(|s| (s.uid, s)).collect();
    // Which (sender, number) reached its receiver; and which receivers left early.
    let mut reached: HashSet<(u64, u64)> = HashSet::new();
    let gone = gone_users(receivers);

    for r in receivers {
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        let mut highest: HashMap<u64, u64> = HashMap::new();
        for d in &r.deliveries {
            let Some(msg) = by_uid.get(&d.from).and_then(|s| s.messages.get(d.number as usize)) else {
                v.unexpected += 1;
                continue;
            };
            if !seen.insert((d.from, d.number)) {
                v.duplicates += 1;
                if msg.receipted_id().is_some_and(|id| id != d.server_msg_id) {
                    v.id_mismatches += 1;
                }
                continue;
            }
            // Counted once per message, however many devices of its recipient got it.
            v.delivered += u64::from(!reached.contains(&(d.from, d.number)));
            if msg.receipted_id().is_some_and(|id| id != d.server_msg_id) {
                v.id_mismatches += 1;
            }
            match highest.get_mut(&d.from) {
                Some(h) if d.number < *h => v.reorders += 1,
                Some(h) => *h = d.number,
                None => {
                    highest.insert(d.from, d.number);
                }
            }
            reached.insert((d.from, d.number));
        }
    }

    for s in senders {
        for (seq, m) in s.messages.iter().enumerate() {
            v.sent += 1;
            v.accepted += u64::from(m.accepted.is_some());
            v.saved += u64::from(m.saved.is_some());
            v.errored += u64::from(m.error.is_some());
            v.unanswered += u64::from(m.saved.is_none() && m.error.is_none());
            if let (Some(a), Some(b)) = (m.accepted, m.saved) {
                v.id_mismatches += u64::from(a != b);
            }
            if m.receipted() && m.error.is_none() && !reached.contains(&(s.uid, seq as u64)) {
                if gone.contains(&m.to.unwrap_or(s.to)) {
                    v.undelivered_receiver_gone += 1;
                } else {
                    v.lost += 1;
                }
            }
        }
    }
    v
}

/// The users none of whose devices was connected at the end: what they were owed is counted as
/// `undelivered_receiver_gone`, not lost (the per-device check in [`recipients`] holds every device
/// to every message).
pub(crate) fn gone_users(receivers: &[ReceiverLog]) -> HashSet<u64> {
    let connected: HashSet<u64> = receivers.iter().filter(|r| !r.gone).map(|r| r.uid).collect();
    receivers.iter().filter(|r| !connected.contains(&r.uid)).map(|r| r.uid).collect()
}

/// One row of the run in MySQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbRow {
    pub from: u64,
    pub client_msg_id: String,
    pub id: u64,
    /// Its recipient (0 when not read).
    pub to: u64,
    /// Its `seq` (`None`: the table has no seq column, or the row none).
    pub seq: Option<u64>,
}

impl DbRow {
    /// A row without recipient or seq (tests of the id checks).
    pub fn new(from: u64, client_msg_id: impl Into<String>, id: u64) -> DbRow {
        DbRow { from, client_msg_id: client_msg_id.into(), id, to: 0, seq: None }
    }
}

/// What the run's rows add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowVerdict {
    /// Rows of the run's senders.
    pub rows: u64,
    /// Receipted messages (accepted or saved) with no row.
    pub missing: u64,
    /// Extra rows for a (sender, clientMsgId) that already has one.
    pub duplicated: u64,
    /// Rows of messages that got no receipt (answered with an error, or still unanswered).
    pub unreceipted: u64,
    /// Rows stored under another id than the receipt gave.
    pub id_mismatches: u64,
    /// Messages (sender, clientMsgId) that appeared under more than one serverMsgId anywhere:
    /// receipts, answers to resends, pushes, rows (SPEC §3.9). Must be 0.
    #[serde(default)]
    pub messages_with_several_ids: u64,
    /// Messages with an `ACK(saved)` whose serverMsgId has no row, or whose row is another
    /// (from, clientMsgId) (SPEC §3.9: saved only when the row of *that* message is committed). Must be 0.
    #[serde(default)]
    pub saved_without_matching_row: u64,
}

/// Checks the run's rows (`rows`: every row of the run's senders) against the receipts and pushes.
/// `strays` are rows of other senders found by the ids of [`saved_ids_without_row`]: an
/// `ACK(saved)` pointing at one of them is a receipt without its row.
pub fn check_rows(senders: &[SenderLog], receivers: &[ReceiverLog], rows: &[DbRow], strays: &[DbRow]) -> RowVerdict {
    let mut v = RowVerdict { rows: rows.len() as u64, ..Default::default() };
    let every_row: Vec<DbRow> = rows.iter().chain(strays).cloned().collect();
    v.messages_with_several_ids = messages_with_several_ids(senders, receivers, rows);
    v.saved_without_matching_row = saved_without_matching_row(senders, &every_row);
    let by_uid: HashMap<u64, &SenderLog> = senders.iter().map(|s| (s.uid, s)).collect();
    let mut stored: HashSet<(u64, &str)> = HashSet::new();
    for row in rows {
        if !stored.insert((row.from, row.client_msg_id.as_str())) {
            v.duplicated += 1;
            continue;
        }
        let msg = row
            .client_msg_id
            .parse::<usize>()
            .ok()
            .and_then(|seq| by_uid.get(&row.from).and_then(|s| s.messages.get(seq)));
        match msg.and_then(SentMsg::receipted_id) {
            Some(id) => v.id_mismatches += u64::from(id != row.id),
            None => v.unreceipted += 1,
        }
    }
    for s in senders {
        for (seq, m) in s.messages.iter().enumerate() {
            if m.receipted() && !stored.contains(&(s.uid, seq.to_string().as_str())) {
                v.missing += 1;
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_receipt_pointing_at_another_senders_row_is_found_among_the_strays() {
        let (s, r) = pair(3);
        let mut db = rows(3);
        let stray = db.remove(2);
        assert_eq!(saved_ids_without_row(std::slice::from_ref(&s), &db), vec![stray.id]);
        let other = DbRow::new(42, "2", stray.id);
        let v = check_rows(&[s], &[r], &db, &[other]);
        assert_eq!(
            (v.rows, v.missing, v.saved_without_matching_row, v.messages_with_several_ids),
            (2, 1, 1, 0),
            "{v:?}"
        );
    }

    /// One pair, `n` messages all accepted and saved under id `1000 + seq`.
    fn pair(n: u64) -> (SenderLog, ReceiverLog) {
        let messages = (0..n)
            .map(|seq| SentMsg {
                sent_at_us: seq,
                accepted: Some(1000 + seq),
                saved: Some(1000 + seq),
                ..Default::default()
            })
            .collect();
        let deliveries = (0..n).map(|seq| Delivery::new(1, seq, 1000 + seq)).collect();
        (
            SenderLog { uid: 1, to: 2, messages, ..Default::default() },
            ReceiverLog { uid: 2, deliveries, ..Default::default() },
        )
    }

    fn rows(n: u64) -> Vec<DbRow> {
        (0..n).map(|seq| DbRow::new(1, seq.to_string(), 1000 + seq)).collect()
    }

    #[test]
    fn a_clean_run_adds_up() {
        let (s, r) = pair(5);
        let v = check_deliveries(std::slice::from_ref(&s), &[r]);
        assert_eq!(
            v,
            DeliveryVerdict { sent: 5, accepted: 5, saved: 5, delivered: 5, ..Default::default() },
            "nothing lost, duplicated or reordered"
        );
        assert_eq!(check_rows(&[s], &[], &rows(5), &[]), RowVerdict { rows: 5, ..Default::default() });
    }

    #[test]
    fn a_message_on_two_devices_is_delivered_once_and_no_duplicate() {
        let (s, r) = pair(5);
        let second = ReceiverLog { device: 1, ..r.clone() };
        let v = check_deliveries(&[s], &[r, second]);
        assert_eq!((v.delivered, v.duplicates, v.reorders, v.lost), (5, 0, 0, 0), "{v:?}");
    }

    #[test]
    fn a_duplicate_delivery_is_counted_not_hidden() {
        let (s, mut r) = pair(5);
        r.deliveries.insert(3, r.deliveries[1]);
        let v = check_deliveries(&[s], &[r]);
        assert_eq!((v.delivered, v.duplicates, v.reorders, v.lost), (5, 1, 0, 0), "{v:?}");
    }

    #[test]
    fn a_reordered_delivery_is_detected() {
        let (s, mut r) = pair(5);
        r.deliveries.swap(1, 3); // arrival order 0, 3, 2, 1, 4
        let v = check_deliveries(&[s], &[r]);
        assert_eq!((v.delivered, v.reorders, v.duplicates), (5, 2, 0), "{v:?}");
    }

    #[test]
    fn a_receipted_message_never_pushed_is_lost() {
        let (s, mut r) = pair(5);
        r.deliveries.remove(2);
        let v = check_deliveries(std::slice::from_ref(&s), std::slice::from_ref(&r));
        assert_eq!((v.delivered, v.lost), (4, 1), "{v:?}");
        // The same gap to a receiver that disconnected is owed by offline resend, not lost.
        r.gone = true;
        let v = check_deliveries(&[s], &[r]);
        assert_eq!((v.lost, v.undelivered_receiver_gone), (0, 1), "{v:?}");
    }

    #[test]
    fn errors_and_silence_are_not_lost_but_counted() {
        let (mut s, mut r) = pair(3);
        s.messages[1] = SentMsg { error: Some("server_busy".into()), ..Default::default() };
        s.messages[2] = SentMsg::default();
        r.deliveries.truncate(1);
        let v = check_deliveries(&[s], &[r]);
        assert_eq!((v.errored, v.unanswered, v.lost, v.delivered), (1, 1, 0, 1), "{v:?}");
    }

    #[test]
    fn ids_that_disagree_and_strangers_are_flagged() {
        let (mut s, mut r) = pair(3);
        s.messages[0].saved = Some(7);
        r.deliveries[2].server_msg_id = 9;
        r.deliveries.push(Delivery::new(99, 0, 1));
        let v = check_deliveries(&[s], &[r]);
        // Message 0: accepted 1000 vs saved 7, and push 1000 vs receipt 7; message 2: push 9 vs 1002.
        assert_eq!((v.id_mismatches, v.unexpected), (3, 1), "{v:?}");
    }

    #[test]
    fn missing_duplicated_and_unreceipted_rows_are_found() {
        let (mut s, _) = pair(5);
        let mut db = rows(5);
        db.remove(3);
        let v = check_rows(&[s.clone()], &[], &db, &[]);
        assert_eq!((v.missing, v.saved_without_matching_row), (1, 1), "{v:?}");
        db.push(DbRow::new(1, "0", 5555));
        let v = check_rows(&[s.clone()], &[], &db, &[]);
        assert_eq!((v.duplicated, v.messages_with_several_ids), (1, 1), "a second row is a second id: {v:?}");
        s.messages[4] = SentMsg { error: Some("internal_error".into()), ..Default::default() };
        let v = check_rows(&[s], &[], &rows(5), &[]);
        assert_eq!((v.unreceipted, v.missing, v.id_mismatches), (1, 0, 0), "{v:?}");
    }
}
