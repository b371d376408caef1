//! The local session registry: which connections on this node belong to which user (multi-device).
//!
//! Delivery never waits: a frame is offered to each connection's bounded outbound queue with
//! `try_send`; a full queue marks the connection a slow consumer, which is asked to close (4001) and
//! dropped from the registry. The registry also tells the route keeper when a user's first connection
//! arrives and their last one leaves.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::framing::{close_code, Control};
use crate::outbound::{Outbound, Refused};
use im_common::protocol::{AckType, Encoded, Encoding, FrameType, Reason, ServerFrame};
use im_common::record::Push;

/// Most unconfirmed messages remembered per connection.
const MAX_UNSAVED: usize = 10_000;

/// Messages each sender on this node got `ACK(accepted)` for and no final receipt yet. Kept per
/// sender, not per connection, and beyond a connection's life: while a sender has any, fail-open
/// must not save a newer message of theirs past them (see `Appender::fall_open`) — whichever device
/// or connection it comes from. Receipts settle them also when the sender is no longer connected.
#[derive(Default)]
pub struct SenderLedger {
    unsaved: Mutex<HashMap<u64, HashSet<String>>>,
}

impl SenderLedger {
    fn accepted(&self, uid: u64, cmid: &str) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        let mine = unsaved.entry(uid).or_default();
        // Bounded: a client with this many unconfirmed messages is far behind anyway.
        if mine.len() < MAX_UNSAVED {
            mine.insert(cmid.to_owned());
        }
    }

    fn settled(&self, uid: u64, cmid: &str) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mine) = unsaved.get_mut(&uid) {
            mine.remove(cmid);
            if mine.is_empty() {
                unsaved.remove(&uid);
            }
        }
    }

    /// A message of `uid` whose append may or may not have reached Redis: it counts as unsaved until
    /// a final receipt for it arrives (the sender resends it; the idempotency window answers).
    pub fn unresolved(&self, uid: u64, cmid: &str) {
        self.accepted(uid, cmid);
    }

    /// Whether messages of `uid` wait for their final receipt.
    pub fn has_unsaved(&self, uid: u64) -> bool {
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&uid)
    }
}

/// Whether `frame` is a final receipt (`ACK(saved)` or an `ERROR`) for a message: its clientMsgId.
/// `server_busy` and `too_many_requests` are not: they refuse an attempt, and are never the answer
/// to a message that was accepted — except one whose append's outcome is unknown, which stays
/// unsaved until a real receipt comes (`SenderLedger::unresolved`).
fn final_receipt(frame: &ServerFrame) -> Option<&str> {
    match (frame.kind, frame.ack_type, frame.reason) {
        (FrameType::Error, _, Some(Reason::ServerBusy | Reason::TooManyRequests)) => None,
        (FrameType::Ack, Some(AckType::Saved), _) | (FrameType::Error, _, _) => frame.client_msg_id.as_deref(),
        _ => None,
    }
}

/// The sending side of one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub out: Arc<Outbound>,
    /// What the client reads (negotiated at the handshake).
    pub encoding: Encoding,
    /// Signalled when the outbound queue overflowed. The connection's task then drops the connection
    /// itself: its write task may be blocked on a socket the client no longer reads, and would never
    /// get to the close frame.
    pub overflowed: Arc<Notify>,
    /// The user, once authenticated (0 before).
    uid: Arc<AtomicU64>,
    ledger: Arc<SenderLedger>,
    /// The order of this connection's own answers against receipts pushed to it.
    answers: Arc<Mutex<Answering>>,
    /// While a sync runs on this connection: per peer, the lowest seq pushed to it live meanwhile.
    /// Pushes of one direction arrive in seq order once the connection is registered, so the sync
    /// stops there instead of sending those messages a second time.
    live_during_sync: Arc<Mutex<Option<HashMap<u64, u64>>>>,
}

/// The request a connection's task is answering now, and a final receipt held back for it.
#[derive(Default)]
struct Answering {
    client_msg_id: Option<String>,
    held: Option<Bytes>,
}

impl ConnHandle {
    /// Marks `client_msg_id` as the request this connection's task is answering now (a connection
    /// handles its frames one at a time): a final receipt for it that arrives by push meanwhile is
    /// held back until [`ConnHandle::finish_reply`], so the client always sees `ACK(accepted)` before
    /// `ACK(saved)`.
    pub fn begin_reply(&self, client_msg_id: &str) {
        let mut answering = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answering.client_msg_id = Some(client_msg_id.to_owned());
    }

    /// Sends one of this connection's own answers: an `ACK(accepted)` enters the sender's ledger
    /// (unless its final receipt is already held back), a final answer leaves it.
    pub fn reply(&self, frame: &ServerFrame) -> bool {
        let answering = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let uid = self.uid.load(Ordering::Relaxed);
        if let Some(cmid) = &frame.client_msg_id {
            if frame.kind == FrameType::Ack && frame.ack_type == Some(AckType::Accepted) {
                let settled = answering.held.is_some() && answering.client_msg_id.as_ref() == Some(cmid);
                if !settled {
                    self.ledger.accepted(uid, cmid);
                }
            } else if final_receipt(frame).is_some() {
                self.ledger.settled(uid, cmid);
            }
        }
        self.offer(self.encoding.encode(frame))
    }

    /// Ends [`ConnHandle::begin_reply`]: sends the final receipt held back meanwhile, if any.
    pub fn finish_reply(&self) {
        let mut answering = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let cmid = answering.client_msg_id.take();
        if let (Some(held), Some(cmid)) = (answering.held.take(), cmid) {
            self.ledger.settled(self.uid.load(Ordering::Relaxed), &cmid);
            self.offer(held);
        }
    }

    /// A sync starts on this connection: note the seqs pushed live from now on.
    pub fn begin_sync(&self) {
        *self.live_during_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(HashMap::new());
    }

    /// The sync ended.
    pub fn end_sync(&self) {
        *self.live_during_sync.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The lowest seq of `peer`'s messages pushed live since the sync began, if any.
    pub fn first_live_seq(&self, peer: u64) -> Option<u64> {
        self.live_during_sync.lock().unwrap_or_else(|p| p.into_inner()).as_ref()?.get(&peer).copied()
    }

    /// Sends a frame pushed from elsewhere (node channel); a final receipt settles its message in the
    /// ledger, or waits for the connection's own answer to it (see `begin_reply`).
    fn push(&self, frame: &ServerFrame, text: Bytes) -> bool {
        if let (FrameType::SingleChat, Some(from), Some(seq)) = (frame.kind, frame.from, frame.seq) {
            if let Some(live) = self.live_during_sync.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let first = live.entry(from).or_insert(seq);
                *first = (*first).min(seq);
            }
        }
        let mut answering = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cmid) = final_receipt(frame) {
            if answering.client_msg_id.as_deref() == Some(cmid) {
                answering.held = Some(text);
                return true;
            }
            self.ledger.settled(self.uid.load(Ordering::Relaxed), cmid);
        }
        self.offer(text)
    }

    /// Queues a frame; on a full queue asks the connection to close as a slow consumer and returns false.
    pub fn offer(&self, frame: Bytes) -> bool {
        match self.out.push(frame) {
            Ok(()) => true,
            Err(Refused::Closed) => false,
            Err(Refused::Full) => {
                metrics::counter!("im_gateway_slow_consumer_disconnects_total").increment(1);
                self.out.control(Control::Close(close_code::SLOW_CONSUMER, "slow_consumer"));
                self.overflowed.notify_one();
                false
            }
        }
    }
}

/// User → live connections on this node.
#[derive(Default)]
pub struct Sessions {
    users: Mutex<HashMap<u64, Vec<ConnHandle>>>,
    /// Unconfirmed messages per sender.
    pub ledger: Arc<SenderLedger>,
    next_conn: AtomicU64,
    count: AtomicU64,
}

impl Sessions {
    /// A handle for a new connection, with an id unique on this node.
    pub fn new_handle(&self, out: Arc<Outbound>, encoding: Encoding) -> ConnHandle {
        ConnHandle {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed) + 1,
            out,
            encoding,
            overflowed: Arc::default(),
            uid: Arc::default(),
            ledger: self.ledger.clone(),
            answers: Arc::default(),
            live_during_sync: Arc::default(),
        }
    }

    /// Adds a connection; true when it is the user's first on this node.
    pub fn add(&self, uid: u64, conn: ConnHandle) -> bool {
        conn.uid.store(uid, Ordering::Relaxed);
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let conns = users.entry(uid).or_default();
        conns.push(conn);
        self.count.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("im_gateway_connections").increment(1.0);
        conns.len() == 1
    }

    /// Removes a connection; true when the user has no connection left on this node.
    pub fn remove(&self, uid: u64, conn_id: u64) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conns) = users.get_mut(&uid) else { return false };
        let before = conns.len();
        conns.retain(|c| c.id != conn_id);
        if conns.len() < before {
            self.count.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("im_gateway_connections").decrement(1.0);
        }
        if conns.is_empty() {
            users.remove(&uid);
            return true;
        }
        false
    }

    /// Live connections on this node.
    pub fn connection_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether `uid` has a connection here.
    pub fn holds(&self, uid: u64) -> bool {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&uid)
    }

    /// Users with a connection here (for the route heartbeat).
    pub fn users(&self) -> Vec<u64> {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// Whether `uid`'s connection `conn_id` is still open here.
    pub fn has_connection(&self, uid: u64, conn_id: u64) -> bool {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .is_some_and(|c| c.iter().any(|c| c.id == conn_id))
    }

    /// Hands a push to its connections; returns how many connections took it.
    pub fn deliver(&self, push: &Push) -> usize {
        let targets: Vec<ConnHandle> = {
            let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            let Some(conns) = users.get(&push.user) else {
                // The sender is gone from this node; the receipt still settles their message.
                if let Some(cmid) = final_receipt(&push.frame) {
                    self.ledger.settled(push.user, cmid);
                }
                return 0;
            };
            match push.conn.and_then(|id| conns.iter().find(|c| c.id == id)) {
                Some(c) => vec![c.clone()],
                None => conns.clone(),
            }
        };
        let mut encoded = Encoded::new(&push.frame);
        let taken = targets.iter().filter(|c| c.push(&push.frame, encoded.get(c.encoding))).count();
        metrics::counter!("im_gateway_frames_out_total", "type" => push.frame.kind.as_str()).increment(taken as u64);
        taken
    }

    /// Every connection with its user.
    pub fn connections(&self) -> Vec<(u64, ConnHandle)> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.iter().flat_map(|(&uid, conns)| conns.iter().map(move |c| (uid, c.clone()))).collect()
    }

    /// Asks every connection of `uid` here to close with `code`.
    pub fn close_user(&self, uid: u64, code: u16, reason: &'static str) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for c in users.get(&uid).into_iter().flatten() {
            c.out.control(Control::Close(code, reason));
        }
    }

    /// Asks every connection to close with `code` (graceful drain).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for c in users.values().flatten() {
            c.out.control(Control::Close(code, reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: u64 = 42;

    fn conn(sessions: &Sessions) -> (ConnHandle, Arc<Outbound>) {
        let out = Arc::new(Outbound::new(16));
        let c = sessions.new_handle(out.clone(), Encoding::Json);
        sessions.add(UID, c.clone());
        (c, out)
    }

    fn sent(out: &Outbound) -> Vec<String> {
        out.take_all()
            .into_iter()
            .map(|b| {
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                format!(
                    "{} {}",
                    v["type"].as_str().unwrap_or(""),
                    v["ackType"].as_str().or(v["reason"].as_str()).unwrap_or("")
                )
            })
            .collect()
    }

    fn push(c: &ConnHandle, frame: ServerFrame) {
        c.push(&frame, Encoding::Json.encode(&frame));
    }

    #[test]
    fn a_saved_receipt_that_overtakes_its_accepted_waits_for_it_and_settles_the_message() {
        let sessions = Sessions::default();
        let (c, rx) = conn(&sessions);
        c.begin_reply("m1");
        push(&c, ServerFrame::ack(AckType::Saved, "m1", 7));
        c.reply(&ServerFrame::ack(AckType::Accepted, "m1", 7));
        c.finish_reply();
        assert!(!sessions.ledger.has_unsaved(UID), "the message stays unsaved for good");
        assert_eq!(sent(&rx), ["ACK accepted", "ACK saved"]);
    }

    #[test]
    fn receipts_in_order_settle_the_message() {
        let sessions = Sessions::default();
        let (c, rx) = conn(&sessions);
        c.begin_reply("m1");
        c.reply(&ServerFrame::ack(AckType::Accepted, "m1", 7));
        c.finish_reply();
        assert!(sessions.ledger.has_unsaved(UID));
        push(&c, ServerFrame::ack(AckType::Saved, "m1", 7));
        assert!(!sessions.ledger.has_unsaved(UID));
        assert_eq!(sent(&rx), ["ACK accepted", "ACK saved"]);
    }

    #[test]
    fn a_receipt_for_another_message_is_not_held_back() {
        let sessions = Sessions::default();
        let (c, rx) = conn(&sessions);
        c.begin_reply("m2");
        push(&c, ServerFrame::ack(AckType::Saved, "m1", 7));
        assert_eq!(sent(&rx), ["ACK saved"]);
    }

    #[test]
    fn unsaved_messages_belong_to_the_sender_not_the_connection() {
        let sessions = Sessions::default();
        let (phone, _rx) = conn(&sessions);
        phone.reply(&ServerFrame::ack(AckType::Accepted, "m1", 7));
        sessions.remove(UID, phone.id);
        let (_laptop, _rx2) = conn(&sessions);
        assert!(sessions.ledger.has_unsaved(UID), "a new connection of the sender forgot the unsaved message");
        // The receipt reaches the node after the phone left: it still settles the message.
        sessions.deliver(&Push { user: UID, conn: Some(phone.id), frame: ServerFrame::ack(AckType::Saved, "m1", 7) });
        assert!(!sessions.ledger.has_unsaved(UID));
    }
}
