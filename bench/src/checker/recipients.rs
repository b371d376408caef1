//! Recipients lose nothing (SPEC §3.10–3.11), checked per receiving device.
//!
//! A message is **owed** to its recipient when its sender got `ACK(accepted)` or `ACK(saved)` for it
//! and no `ERROR`. Every device of the recipient (a user may have several connections, each with
//! its own log) is owed every such message, whatever its other devices confirmed:
//! - **missing on device**: owed messages a device connected at the end never got (counted again
//!   under `missing_after_reconnect` when the device had reconnected at least once; a device that
//!   could not come back is counted apart, `missing_on_gone_devices`);
//! - **seq gaps**: per device and conversation (peer → user), the seqs between the direction's first
//!   and last seq of this run that the device does not hold. The first and last come from the rows
//!   when they carry `seq` (and from the pushes otherwise), so a direction whose seqs do not start at
//!   1 (users reused across runs) is judged from its own first seq;
//! - **seq mismatches**: pushes whose `seq` differs from the row's (or, without rows, from another
//!   push of the same message); **pushes without seq**;
//! - **receipts missing**: conversations whose sender's highest `RECEIPT delivered` from the
//!   recipient is below the conversation's last seq at the end (and `read` ones when the receivers
//!   confirmed reads);
//! - from the rows alone (SPEC §3.10: no gap, no reuse): per direction, seqs missing between the
//!   first and last row of the run (`row_seq_gaps`), seqs given to two rows (`row_seq_reused`), and
//!   rows without seq.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{DbRow, ReceiverLog, SenderLog};

/// Missing messages listed in a verdict (all are counted).
const MISSING_EXAMPLES: usize = 10;

/// What the receivers' devices got, against what they were owed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientVerdict {
    /// Receiving devices, and users with more than one.
    pub devices: u64,
    pub multi_device_users: u64,
    /// Devices not connected at the end.
    pub devices_gone: u64,
    /// (device, owed message) pairs the device, connected at the end, never got. Must be 0.
    pub missing_on_device: u64,
    /// Of `missing_on_device`, those on devices that had reconnected.
    pub missing_after_reconnect: u64,
    /// (device, owed message) pairs on devices not connected at the end.
    pub missing_on_gone_devices: u64,
    /// Seqs of a conversation's range that a device connected at the end does not hold. Must be 0.
    pub seq_gaps: u64,
    /// Pushes whose seq disagrees with the message's row (or another push of it). Must be 0.
    pub seq_mismatches: u64,
    /// Pushes without a seq. Must be 0.
    pub pushes_without_seq: u64,
    /// Conversations (sender → recipient with an owed message).
    pub conversations: u64,
    /// Conversations whose sender never got `RECEIPT delivered` up to the last seq. Must be 0 when
    /// receivers confirm.
    pub receipts_missing: u64,
    /// Seqs the delivered receipts fell short by, summed over conversations.
    pub receipt_seqs_behind: u64,
    /// Conversations whose sender never got `RECEIPT read` up to the last seq (receivers confirming
    /// reads only).
    pub read_receipts_missing: u64,
    /// `RECEIPT`s lower than one the sender already had.
    pub receipt_regressions: u64,
    /// `SYNC {peer, afterSeq}` the devices sent for gaps, and reconnections with own positions.
    pub gap_syncs: u64,
    pub own_position_syncs: u64,
    /// Whether the rows carried seq (the row checks below are meaningful only then).
    pub rows_with_seq: bool,
    /// Per direction, seqs missing between the first and the last row of the run. Must be 0.
    pub row_seq_gaps: u64,
    /// Rows sharing a seq with another row of the same direction. Must be 0.
    pub row_seq_reused: u64,
    /// Rows of the run without seq (when the table has the column). Must be 0.
    pub rows_without_seq: u64,
    /// The first missing messages, described.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_examples: Vec<MissingOnDevice>,
    /// The first seq problems, described (`from→to #number: push seq 7, row seq 9`, `rows from→to:
    /// seqs 12..13 missing`, `device 1 of to: from's seqs 4 missing`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seq_examples: Vec<String>,
}

/// One owed message a device never got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingOnDevice {
    pub to: u64,
    pub device: u8,
    pub from: u64,
    /// The sender's message number (clientMsgId).
    pub number: u64,
    pub seq: Option<u64>,
    /// The device's reconnections.
    pub reconnects: usize,
    /// Whether the device got a later seq of the same conversation.
    pub later_seq_held: bool,
}

impl RecipientVerdict {
    /// What fails a run: `(count, what)` for every nonzero count that must be 0. Receipts count only
    /// when the receivers confirmed (`receipts_expected`).
    pub fn problems(&self, receipts_expected: bool) -> Vec<(u64, &'static str)> {
        let mut out = vec![
            (self.missing_on_device, "owed messages missing on a connected device"),
            (self.seq_gaps, "seq gaps on a connected device"),
            (self.seq_mismatches, "pushes whose seq disagrees with the row"),
            (self.pushes_without_seq, "pushes without seq"),
            (self.row_seq_gaps, "seq gaps in the rows"),
            (self.row_seq_reused, "seqs given to two rows"),
            (self.rows_without_seq, "rows without seq"),
        ];
        if receipts_expected {
            out.push((self.receipts_missing, "conversations without RECEIPT delivered up to the last seq"));
            out.push((self.read_receipts_missing, "conversations without RECEIPT read up to the last seq"));
        }
        out.retain(|(n, _)| *n > 0);
        out
    }
}

/// Checks every receiving device against what its user was owed (see the module doc). `rows`: the
/// run's rows when read (with `seq` when the table has it); `read_expected`: the receivers confirmed
/// reads too.
pub fn check_recipients(
    senders: &[SenderLog],
    receivers: &[ReceiverLog],
    rows: Option<&[DbRow]>,
    read_expected: bool,
) -> RecipientVerdict {
    let mut v = RecipientVerdict { devices: receivers.len() as u64, ..Default::default() };
    let mut per_user: HashMap<u64, u64> = HashMap::new();
    for r in receivers {
        *per_user.entry(r.uid).or_default() += 1;
        v.devices_gone += u64::from(r.gone);
        v.gap_syncs += r.gap_synced_at.len() as u64;
        v.own_position_syncs += u64::from(r.own_position_syncs);
    }
    v.multi_device_users = per_user.values().filter(|&&n| n > 1).count() as u64;

    // The run's messages: (from, number) → (to, owed).
    let mut owed: HashMap<u64, Vec<(u64, u64)>> = HashMap::new(); // to → [(from, number)]
    let mut message_to: HashMap<(u64, u64), u64> = HashMap::new();
    for s in senders {
        for (number, m) in s.messages.iter().enumerate() {
            let to = m.to.unwrap_or(s.to);
            message_to.insert((s.uid, number as u64), to);
            if m.receipted() && m.error.is_none() {
                owed.entry(to).or_default().push((s.uid, number as u64));
            }
        }
    }

    // Seqs: from the rows of the run's messages when they carry them, else from the first push.
    let mut seq_of: HashMap<(u64, u64), u64> = HashMap::new();
    let rows_have_seq = rows.is_some_and(|rows| rows.iter().any(|r| r.seq.is_some()));
    if let Some(rows) = rows {
        check_row_seqs(rows, &message_to, &mut v);
        for row in rows {
            let (Some(seq), Ok(number)) = (row.seq, row.client_msg_id.parse::<u64>()) else { continue };
            if message_to.contains_key(&(row.from, number)) {
                seq_of.insert((row.from, number), seq);
            }
        }
    }
    for r in receivers {
        for d in &r.deliveries {
            match d.seq {
                None => v.pushes_without_seq += 1,
                Some(seq) => match seq_of.get(&(d.from, d.number)) {
                    Some(&known) if known != seq => {
                        v.seq_mismatches += 1;
                        if v.seq_examples.len() < MISSING_EXAMPLES {
                            v.seq_examples.push(format!(
                                "{}→{} #{} (id {}): push seq {seq}, {} seq {known}",
                                d.from,
                                r.uid,
                                d.number,
                                d.server_msg_id,
                                if rows_have_seq { "row" } else { "first push" }
                            ));
                        }
                    }
                    Some(_) => {}
                    None => {
                        seq_of.insert((d.from, d.number), seq);
                    }
                },
            }
        }
    }
    // Per direction (from → to): the first seq of the run's messages, and the last of the owed ones.
    let mut first: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last: HashMap<(u64, u64), u64> = HashMap::new();
    for (&(from, number), &seq) in &seq_of {
        let Some(&to) = message_to.get(&(from, number)) else { continue };
        let f = first.entry((from, to)).or_insert(seq);
        *f = (*f).min(seq);
    }
    for (&to, messages) in &owed {
        for &(from, number) in messages {
            if let Some(&seq) = seq_of.get(&(from, number)) {
                let l = last.entry((from, to)).or_default();
                *l = (*l).max(seq);
            }
        }
    }

    for r in receivers {
        let held: HashSet<(u64, u64)> = r.deliveries.iter().map(|d| (d.from, d.number)).collect();
        let mut held_seqs: HashMap<u64, BTreeSet<u64>> = HashMap::new();
        for d in &r.deliveries {
            if let Some(seq) = d.seq {
                held_seqs.entry(d.from).or_default().insert(seq);
            }
        }
        for &(from, number) in owed.get(&r.uid).map_or(&[][..], Vec::as_slice) {
            if held.contains(&(from, number)) {
                continue;
            }
            if r.gone {
                v.missing_on_gone_devices += 1;
                continue;
            }
            v.missing_on_device += 1;
            v.missing_after_reconnect += u64::from(!r.reconnected_at.is_empty());
            if v.missing_examples.len() < MISSING_EXAMPLES {
                let seq = seq_of.get(&(from, number)).copied();
                let top = held_seqs.get(&from).and_then(|s| s.last().copied());
                v.missing_examples.push(MissingOnDevice {
                    to: r.uid,
                    device: r.device,
                    from,
                    number,
                    seq,
                    reconnects: r.reconnected_at.len(),
                    later_seq_held: matches!((seq, top), (Some(s), Some(t)) if t > s),
                });
            }
        }
        if r.gone {
            continue;
        }
        for (&(from, to), &l) in last.iter().filter(|((_, to), _)| *to == r.uid) {
            let f = first.get(&(from, to)).copied().unwrap_or(1);
            let have = held_seqs.get(&from);
            let missing: Vec<u64> = (f..=l).filter(|s| !have.is_some_and(|h| h.contains(s))).collect();
            v.seq_gaps += missing.len() as u64;
            if !missing.is_empty() && v.seq_examples.len() < MISSING_EXAMPLES {
                v.seq_examples.push(format!(
                    "device {} of {to}: {from}'s seqs {} missing (range {f}..={l})",
                    r.device,
                    ranges(&missing)
                ));
            }
        }
    }

    // Receipts: per conversation with an owed message, up to its last seq.
    let by_uid: HashMap<u64, &SenderLog> = senders.iter().map(|s| (s.uid, s)).collect();
    for s in senders {
        v.receipt_regressions += s.receipts.values().map(|r| r.regressions).sum::<u64>();
    }
    let conversations: BTreeMap<(u64, u64), u64> = last.iter().map(|(&k, &l)| (k, l)).collect();
    for (&(from, to), &l) in &conversations {
        v.conversations += 1;
        let got = by_uid.get(&from).and_then(|s| s.receipts.get(&to)).copied().unwrap_or_default();
        if got.delivered < l {
            v.receipts_missing += 1;
            v.receipt_seqs_behind += l - got.delivered;
        }
        if read_expected && got.read < l {
            v.read_receipts_missing += 1;
        }
    }
    v
}

/// The row checks of SPEC §3.10 over the run's rows (`message_to`: the run's messages).
fn check_row_seqs(rows: &[DbRow], message_to: &HashMap<(u64, u64), u64>, v: &mut RecipientVerdict) {
    let mut directions: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
    let mut without = 0;
    for row in rows {
        let Ok(number) = row.client_msg_id.parse::<u64>() else { continue };
        if !message_to.contains_key(&(row.from, number)) {
            continue;
        }
        match row.seq {
            Some(seq) => directions.entry((row.from, row.to)).or_default().push(seq),
            None => without += 1,
        }
    }
    v.rows_with_seq = !directions.is_empty();
    if !v.rows_with_seq {
        // The table has no seq column (a server before issue 12): nothing to judge.
        return;
    }
    v.rows_without_seq = without;
    let mut directions: Vec<((u64, u64), Vec<u64>)> = directions.into_iter().collect();
    directions.sort_unstable();
    for ((from, to), seqs) in &mut directions {
        seqs.sort_unstable();
        let distinct = {
            let mut d = seqs.clone();
            d.dedup();
            d
        };
        let reused = (seqs.len() - distinct.len()) as u64;
        v.row_seq_reused += reused;
        if let (Some(&lo), Some(&hi)) = (distinct.first(), distinct.last()) {
            let held: BTreeSet<u64> = distinct.iter().copied().collect();
            let missing: Vec<u64> = (lo..=hi).filter(|s| !held.contains(s)).collect();
            v.row_seq_gaps += missing.len() as u64;
            if (!missing.is_empty() || reused > 0) && v.seq_examples.len() < MISSING_EXAMPLES {
                v.seq_examples.push(format!(
                    "rows {from}→{to}: seqs {lo}..={hi}, missing [{}], {reused} reused",
                    ranges(&missing)
                ));
            }
        }
    }
}

/// `[1, 2, 3, 7]` as `1..=3, 7`.
fn ranges(seqs: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        out.push(if i == j { seqs[i].to_string() } else { format!("{}..={}", seqs[i], seqs[j]) });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::{Delivery, ReceiptLog, SentMsg};
    use super::*;

    /// Sender 1 sends `n` messages to user 2 (ids 1000+, seqs `first..`); user 2 has `devices`
    /// devices that got them all; the rows carry the seqs; sender 1 got receipts up to the last.
    fn conversation(n: u64, first: u64, devices: u8) -> (Vec<SenderLog>, Vec<ReceiverLog>, Vec<DbRow>) {
        let messages = (0..n).map(|i| SentMsg { saved: Some(1000 + i), ..Default::default() }).collect();
        let last = first + n - 1;
        let receipts = BTreeMap::from([(2, ReceiptLog { delivered: last, read: last, frames: 3, regressions: 0 })]);
        let sender = SenderLog { uid: 1, to: 2, messages, receipts };
        let deliveries: Vec<Delivery> = (0..n).map(|i| Delivery::with_seq(1, i, 1000 + i, first + i)).collect();
        let receivers = (0..devices).map(|device| ReceiverLog {
            uid: 2,
            device,
            deliveries: deliveries.clone(),
            ..Default::default()
        });
        let rows = (0..n).map(|i| DbRow { seq: Some(first + i), to: 2, ..DbRow::new(1, i.to_string(), 1000 + i) });
        (vec![sender], receivers.collect(), rows.collect())
    }

    #[test]
    fn a_clean_run_owes_nothing() {
        let (s, r, rows) = conversation(5, 1, 2);
        let v = check_recipients(&s, &r, Some(&rows), true);
        assert_eq!((v.devices, v.multi_device_users, v.conversations, v.rows_with_seq), (2, 1, 1, true));
        assert!(v.problems(true).is_empty(), "{v:?}");
        // Users reused across runs: the direction starts at 41, judged from there.
        let (s, r, rows) = conversation(5, 41, 1);
        assert!(check_recipients(&s, &r, Some(&rows), true).problems(true).is_empty());
        let (s, r, _) = conversation(5, 41, 1);
        assert!(check_recipients(&s, &r, None, false).problems(true).is_empty(), "no rows: first seq from pushes");
    }

    #[test]
    fn a_message_one_device_missed_is_missing_on_that_device_only() {
        let (s, mut r, rows) = conversation(5, 1, 2);
        r[1].deliveries.remove(2);
        r[1].reconnected_at = vec![1];
        let v = check_recipients(&s, &r, Some(&rows), false);
        assert_eq!((v.missing_on_device, v.missing_after_reconnect, v.seq_gaps), (1, 1, 1), "{v:?}");
        let e = &v.missing_examples[0];
        assert_eq!((e.device, e.number, e.seq, e.later_seq_held), (1, 2, Some(3), true));
        // The last one missed: a gap at the end of the range too (the range ends at the last seq).
        let (s, mut r, rows) = conversation(5, 1, 1);
        r[0].deliveries.pop();
        let v = check_recipients(&s, &r, Some(&rows), false);
        assert_eq!((v.missing_on_device, v.seq_gaps), (1, 1), "{v:?}");
        // On a device that is gone: counted apart.
        r[0].gone = true;
        let v = check_recipients(&s, &r, Some(&rows), false);
        assert_eq!((v.missing_on_device, v.missing_on_gone_devices, v.seq_gaps, v.devices_gone), (0, 1, 0, 1));
    }

    #[test]
    fn errored_and_unreceipted_messages_are_not_owed() {
        let (mut s, mut r, rows) = conversation(4, 1, 1);
        s[0].messages[3] = SentMsg { error: Some("server_busy".into()), ..Default::default() };
        s[0].messages[2] = SentMsg::default();
        s[0].receipts.get_mut(&2).unwrap().delivered = 2;
        s[0].receipts.get_mut(&2).unwrap().read = 2;
        r[0].deliveries.truncate(2);
        let rows = &rows[..2];
        let v = check_recipients(&s, &r, Some(rows), true);
        assert!(v.problems(true).is_empty(), "{v:?}");
    }

    #[test]
    fn seqs_that_disagree_or_are_absent_and_holes_in_the_rows_are_found() {
        let (s, mut r, mut rows) = conversation(5, 1, 1);
        r[0].deliveries[1].seq = Some(9);
        r[0].deliveries[4].seq = None;
        rows[3].seq = Some(7); // 1, 2, 3, 7, 5: 4 and 6 missing
        let v = check_recipients(&s, &r, Some(&rows), false);
        assert_eq!((v.seq_mismatches, v.pushes_without_seq, v.row_seq_gaps, v.row_seq_reused), (2, 1, 2, 0), "{v:?}");
        assert!(v.seq_examples.iter().any(|e| e.contains("missing [4, 6]")), "{:?}", v.seq_examples);
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1..=3, 7, 9..=10");
        rows[3].seq = Some(2);
        rows[4].seq = None;
        let v = check_recipients(&s, &r, Some(&rows), false);
        assert_eq!((v.row_seq_reused, v.rows_without_seq), (1, 1), "{v:?}");
        // A table without seq: no row verdict at all.
        let plain: Vec<DbRow> = rows.iter().map(|row| DbRow { seq: None, ..row.clone() }).collect();
        let v = check_recipients(&s, &r, Some(&plain), false);
        assert_eq!((v.rows_with_seq, v.rows_without_seq, v.row_seq_gaps), (false, 0, 0));
    }

    #[test]
    fn receipts_short_of_the_last_seq_are_missing() {
        let (mut s, r, rows) = conversation(5, 1, 1);
        s[0].receipts.get_mut(&2).unwrap().delivered = 3;
        let v = check_recipients(&s, &r, Some(&rows), true);
        assert_eq!((v.receipts_missing, v.receipt_seqs_behind, v.read_receipts_missing), (1, 2, 0));
        assert_eq!(v.problems(false), vec![], "receipts are not expected from receivers that do not confirm");
        s[0].receipts.clear();
        let v = check_recipients(&s, &r, Some(&rows), true);
        assert_eq!((v.receipts_missing, v.receipt_seqs_behind, v.read_receipts_missing), (1, 5, 1));
    }
}
