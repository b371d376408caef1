//! A sender: a writer task that follows the schedule and a reader task that matches receipts to
//! messages by `clientMsgId` (the message number).
//!
//! Open loop: message `k` goes out at `start + offset + k·interval` whatever happened to earlier ones;
//! closed loop: also not before the previous message is complete. With reconnect on, a broken
//! connection (also one a reconnect storm closed) is replaced and every unconfirmed message is sent
//! again under its own clientMsgId.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::link::{close_label, Conn, Link};
use super::schedule::{message_body, Schedule};
use super::storm::{self, StormWatch};
use super::{KEEP_ALIVE, STORM_CLOSE_CODE, STORM_CLOSE_LABEL};
use crate::checker::{ReceiptLog, SentMsg};
use crate::client::{AckKind, ClientFrame, Incoming, Kind, Received, WsReader, WsWriter};
use crate::plan::Pair;
use crate::recorder::{Counters, Latency, Recorder};

/// Closed loop: the longest a sender waits for the previous message's answer before sending anyway.
const CLOSED_LOOP_WAIT: Duration = Duration::from_secs(30);
/// Closed loop: how long a sender pauses after a refusal (`server_busy`, `too_many_requests`: "retry
/// later") before its next message, as a client does; without it a closed loop turns overload into a
/// flood of sends refused at once.
const CLOSED_LOOP_REFUSED_PAUSE: Duration = Duration::from_millis(100);

/// What a sender's writer and reader share.
pub(super) struct SenderState {
    pub uid: u64,
    pub to: u64,
    /// Crossed load: every other message (odd numbers) goes to this receiver instead.
    cross_to: Option<u64>,
    messages: Mutex<Vec<SentMsg>>,
    /// `RECEIPT`s by recipient.
    receipts: Mutex<BTreeMap<u64, ReceiptLog>>,
    /// Signalled when a message becomes complete (closed loop waits on it).
    answered: Notify,
}

impl SenderState {
    /// The receiver of message `seq`.
    fn to_of(&self, seq: usize) -> u64 {
        match self.cross_to {
            Some(other) if seq % 2 == 1 => other,
            _ => self.to,
        }
    }

    pub fn messages(&self) -> std::sync::MutexGuard<'_, Vec<SentMsg>> {
        // A poisoned lock only means the other half panicked; the log itself is still consistent.
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn receipts(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ReceiptLog>> {
        self.receipts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) struct SenderTasks {
    pub state: Arc<SenderState>,
    /// The writer; it owns the current connection's receipt reader and reconnects when it breaks.
    pub writer: JoinHandle<()>,
}

/// What a sender does beyond sending to its own receiver on schedule.
pub(super) struct SenderOptions {
    /// Reconnect storms that may close its connection.
    pub storm: Option<StormWatch>,
    /// Crossed load: the receiver its odd-numbered messages go to.
    pub cross_to: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_sender(
    conn: Conn,
    link: Link,
    options: SenderOptions,
    pair: &Pair,
    rec: &Arc<Recorder>,
    schedule: &Arc<Schedule>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> SenderTasks {
    let state = Arc::new(SenderState {
        uid: pair.sender,
        to: pair.receiver,
        cross_to: options.cross_to,
        messages: Mutex::new(Vec::new()),
        receipts: Mutex::new(BTreeMap::new()),
        answered: Notify::new(),
    });
    let session = SenderSession {
        state: state.clone(),
        link,
        storm: options.storm,
        rec: rec.clone(),
        schedule: schedule.clone(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    SenderTasks { writer: tracker.spawn(session.send_loop(conn, pair.offset)), state }
}

/// One sender: its log, how to reach the gateways, and the run's clock.
struct SenderSession {
    state: Arc<SenderState>,
    link: Link,
    /// Reconnect storms that may close its connection.
    storm: Option<StormWatch>,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl SenderSession {
    fn spawn_reader(&self, reader: WsReader) -> JoinHandle<()> {
        let (state, rec, schedule, shutdown) =
            (self.state.clone(), self.rec.clone(), self.schedule.clone(), self.shutdown.clone());
        self.tracker.spawn(receipts(reader, state, rec, schedule, shutdown))
    }

    /// After a connection broke: connect again and resend every message that has no `ACK(saved)` and
    /// no error yet, under its own clientMsgId (the engine answers with the original serverMsgId).
    /// `None` once shutdown begins.
    async fn reconnect(&mut self) -> Option<(WsWriter, JoinHandle<()>)> {
        loop {
            let (reader, mut writer) = self.link.reconnect(&self.rec, &self.shutdown).await?;
            let reader = self.spawn_reader(reader);
            let unconfirmed: Vec<(usize, u64)> = {
                let mut messages = self.state.messages();
                messages
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, m)| m.saved.is_none() && m.error.is_none())
                    .map(|(seq, m)| {
                        m.resends += 1;
                        (seq, m.sent_at_us)
                    })
                    .collect()
            };
            let mut broken = false;
            for (seq, sent_at_us) in unconfirmed {
                Counters::bump(&self.rec.counters.resent);
                let body = message_body(sent_at_us, self.schedule.body_bytes);
                let client_msg_id = seq.to_string();
                let frame = ClientFrame::SingleChat {
                    to: self.state.to_of(seq),
                    client_msg_id: &client_msg_id,
                    msg_type: "TEXT",
                    body: &body,
                };
                if writer.send(&frame).await.is_err() {
                    broken = true;
                    break;
                }
            }
            if !broken {
                return Some((writer, reader));
            }
            self.rec.error("write_failed");
            reader.abort();
        }
    }

    /// A sender's schedule. Open loop: message `k` goes out at `start + offset + k·interval` whatever
    /// happened to earlier ones (a late generator catches up, and the lag is recorded). Closed loop:
    /// also not before the previous message is complete (answered). The connection stays open until
    /// shutdown, so receipts of the last messages still arrive during the drain. With reconnect on, a
    /// broken connection (its reader ended, or a write failed) is replaced at once, also after the
    /// last send, so unconfirmed messages still get their receipts.
    async fn send_loop(mut self, (reader, mut writer): Conn, offset: Duration) {
        let schedule = self.schedule.clone();
        let mut reader = self.spawn_reader(reader);
        let mut next = schedule.start + offset;
        let mut last_write = Instant::now();
        let reconnect = self.link.enabled;
        // A JoinHandle must not be polled again once it has completed.
        let mut reader_done = false;
        loop {
            let sending = schedule.sends_at(next, self.state.messages().len());
            let wake = if sending { next.min(last_write + KEEP_ALIVE) } else { last_write + KEEP_ALIVE };
            let mut broken = tokio::select! {
                _ = tokio::time::sleep_until(wake) => false,
                _ = self.shutdown.cancelled() => break,
                _ = &mut reader, if reconnect && !reader_done => {
                    reader_done = true;
                    true
                }
                _ = storm::hit(&mut self.storm, self.link.uid), if reconnect => {
                    writer.close().await;
                    self.rec.error(&close_label(STORM_CLOSE_CODE, STORM_CLOSE_LABEL));
                    true
                }
            };
            if !broken {
                let frame_ok = if sending && wake >= next {
                    self.send_next(&mut writer, &mut next).await
                } else {
                    writer.send(&ClientFrame::Ping).await.is_ok()
                };
                last_write = Instant::now();
                if !frame_ok {
                    self.rec.error("write_failed");
                    if !reconnect {
                        return;
                    }
                    broken = true;
                }
            }
            if broken {
                reader.abort();
                match self.reconnect().await {
                    Some((w, r)) => {
                        (writer, reader) = (w, r);
                        reader_done = false;
                    }
                    None => {
                        reader_done = true;
                        break;
                    }
                }
                last_write = Instant::now();
                continue;
            }
            if sending && schedule.closed_loop && !self.wait_answer().await {
                break;
            }
        }
        writer.close().await;
        // The reader returns as soon as shutdown is signalled.
        if !reader_done {
            let _ = reader.await;
        }
    }

    /// Writes message `next`'s frame and moves the schedule on; false when the write failed.
    async fn send_next(&mut self, writer: &mut WsWriter, next: &mut Instant) -> bool {
        let (state, rec, schedule) = (&self.state, &self.rec, &self.schedule);
        let now = Instant::now();
        let sent_at_us = schedule.us(now);
        let seq = {
            let mut messages = state.messages();
            let seq = messages.len();
            let to = state.to_of(seq);
            messages.push(SentMsg { sent_at_us, to: (to != state.to).then_some(to), ..Default::default() });
            seq
        };
        Counters::bump(&rec.counters.sent);
        if schedule.measured(sent_at_us) {
            rec.record(Latency::SendLag, now.saturating_duration_since(*next));
        }
        let body = message_body(sent_at_us, schedule.body_bytes);
        let client_msg_id = seq.to_string();
        let frame = ClientFrame::SingleChat {
            to: state.to_of(seq),
            client_msg_id: &client_msg_id,
            msg_type: "TEXT",
            body: &body,
        };
        *next += schedule.interval;
        writer.send(&frame).await.is_ok()
    }

    /// Closed loop: waits until the last message is complete (or the wait times out); false at shutdown.
    async fn wait_answer(&mut self) -> bool {
        let seq = self.state.messages().len().saturating_sub(1);
        let deadline = Instant::now() + CLOSED_LOOP_WAIT;
        while !self.state.messages()[seq].complete() {
            tokio::select! {
                _ = self.state.answered.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shutdown.cancelled() => return false,
            }
        }
        let refused = matches!(self.state.messages()[seq].error.as_deref(), Some("server_busy" | "too_many_requests"));
        if refused {
            tokio::select! {
                _ = tokio::time::sleep(CLOSED_LOOP_REFUSED_PAUSE) => {}
                _ = self.shutdown.cancelled() => return false,
            }
        }
        true
    }
}

/// Reads a sender's receipts until shutdown (or until the gateway drops the connection).
async fn receipts(
    mut reader: WsReader,
    state: Arc<SenderState>,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = reader.next() => r,
        };
        // Our own close, echoed by the gateway, can arrive as shutdown begins: not a failure.
        if shutdown.is_cancelled() {
            return;
        }
        match incoming {
            Ok(Incoming::Frame(frame)) => match frame.kind {
                Kind::Ack | Kind::Error => on_receipt(&frame, &state, &rec, &schedule),
                Kind::Receipt => on_recipient_receipt(&frame, &state, &rec),
                Kind::SingleChat => rec.error("push_to_sender"),
                _ => {}
            },
            Ok(Incoming::Unparsable) => rec.error("unparsable_frame"),
            Ok(Incoming::Closed(code, reason)) => return rec.error(&close_label(code, &reason)),
            Err(_) => return rec.error("disconnected"),
        }
    }
}

/// Applies one `RECEIPT {ackType, peer, seq}`: the recipient `peer` confirmed the sender's messages
/// up to `seq`.
fn on_recipient_receipt(frame: &Received, state: &SenderState, rec: &Recorder) {
    Counters::bump(&rec.counters.receipts);
    let (Some(peer), Some(seq)) = (frame.peer, frame.seq) else {
        return rec.error("malformed_receipt");
    };
    let mut receipts = state.receipts();
    let r = receipts.entry(peer).or_default();
    r.frames += 1;
    let position = match frame.ack_type {
        Some(AckKind::Delivered) => &mut r.delivered,
        Some(AckKind::Read) => &mut r.read,
        _ => {
            drop(receipts);
            return rec.error("malformed_receipt");
        }
    };
    if seq < *position {
        r.regressions += 1;
    } else {
        *position = seq;
    }
    // `read` moves delivered too.
    if frame.ack_type == Some(AckKind::Read) && r.delivered < seq {
        r.delivered = seq;
    }
    let delivered = r.delivered;
    drop(receipts);
    rec.ledger.receipt(state.uid, peer, delivered);
}

/// Applies one `ACK` or `ERROR` to the sender's log and records its latency.
fn on_receipt(frame: &Received, state: &SenderState, rec: &Recorder, schedule: &Schedule) {
    let now = Instant::now();
    let Some(seq) = frame.client_msg_id.as_deref().and_then(|c| c.parse::<usize>().ok()) else {
        if frame.kind == Kind::Error {
            rec.error(frame.reason());
        }
        if frame.kind == Kind::Ack {
            rec.error("ack_without_client_msg_id");
        }
        return;
    };
    let id = frame.server_msg_id.unwrap_or(0);
    let (latency, became_complete) = {
        let mut messages = state.messages();
        let Some(m) = messages.get_mut(seq) else {
            drop(messages);
            return rec.error("receipt_for_unknown_message");
        };
        let was_complete = m.complete();
        let was_receipted = m.receipted();
        let to = m.to.unwrap_or(state.to);
        let latency = schedule.measured(m.sent_at_us).then(|| schedule.since(m.sent_at_us, now));
        let reason = frame.reason();
        let saved = frame.ack_type == Some(AckKind::Saved);
        let latency = match (frame.kind, frame.ack_type) {
            // A resend refused (e.g. server_busy) does not undo the receipt the first send got.
            (Kind::Error, _) if m.resends > 0 && m.receipted() => {
                if let Some(id) = frame.server_msg_id {
                    m.note_receipt(false, id);
                }
                drop(messages);
                rec.error(&format!("resend_{reason}"));
                return;
            }
            (Kind::Error, _) => {
                // An ERROR that names an id (save_failed) names the message's id too.
                if let Some(id) = frame.server_msg_id {
                    m.note_receipt(false, id);
                }
                rec.error(reason);
                if m.error.is_none() {
                    m.error = Some(reason.to_owned());
                    Counters::bump(&rec.counters.errored);
                }
                None
            }
            (Kind::Ack, Some(AckKind::Accepted)) if m.accepted.is_none() => {
                m.accepted = Some(id);
                Counters::bump(&rec.counters.accepted);
                latency.map(|l| (Latency::Accepted, l))
            }
            (Kind::Ack, Some(AckKind::Saved)) if m.saved.is_none() => {
                m.saved = Some(id);
                Counters::bump(&rec.counters.saved);
                latency.map(|l| (Latency::Saved, l))
            }
            // A resent message is answered again: fine, as long as the id is the original one.
            (Kind::Ack, Some(AckKind::Accepted | AckKind::Saved)) if m.resends > 0 => {
                let same = m.receipted_id() == Some(id);
                m.note_receipt(saved, id);
                drop(messages);
                if !same {
                    rec.error("resend_answered_with_another_id");
                }
                return;
            }
            (Kind::Ack, Some(AckKind::Accepted | AckKind::Saved)) => {
                m.note_receipt(saved, id);
                drop(messages);
                rec.error("duplicate_receipt");
                return;
            }
            (Kind::Ack, _) => {
                drop(messages);
                rec.error("unexpected_ack_type");
                return;
            }
            _ => None,
        };
        if !was_receipted && m.receipted() && m.error.is_none() {
            // Every device of its recipient is owed it now.
            rec.counters.device_owed.fetch_add(rec.ledger.devices_of(to), std::sync::atomic::Ordering::Relaxed);
        }
        (latency, !was_complete && m.complete())
    };
    if let Some((which, l)) = latency {
        rec.record(which, l);
    }
    if became_complete {
        Counters::bump(&rec.counters.complete);
        state.answered.notify_one();
    }
}
