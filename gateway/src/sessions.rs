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
use tokio::sync::{mpsc, Notify};

use crate::framing::{close_code, Control};
use im_common::protocol::{AckType, FrameType, ServerFrame};
use im_common::record::Push;

/// Most unconfirmed messages remembered per connection.
const MAX_UNSAVED: usize = 10_000;

/// The sending side of one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub out: mpsc::Sender<Bytes>,
    pub ctrl: mpsc::Sender<Control>,
    /// Signalled when the outbound queue overflowed. The connection's task then drops the connection
    /// itself: its write task may be blocked on a socket the client no longer reads, and would never
    /// get to the close frame.
    pub overflowed: Arc<Notify>,
    /// Which of this connection's messages wait for their final receipt.
    receipts: Arc<Mutex<Receipts>>,
}

/// The receipt state of one connection's messages.
#[derive(Default)]
struct Receipts {
    /// clientMsgIds this connection got `ACK(accepted)` for and no final receipt yet: while there
    /// are any, fail-open must not save a newer message past them (see `Appender::fall_open`).
    unsaved: HashSet<String>,
    /// The clientMsgId the connection's task is answering now.
    answering: Option<String>,
    /// Its final receipt, when a push brought it before the task's own answer went out.
    held: Option<Bytes>,
}

impl ConnHandle {
    /// A handle for a new connection.
    pub fn new(id: u64, out: mpsc::Sender<Bytes>, ctrl: mpsc::Sender<Control>) -> Self {
        ConnHandle { id, out, ctrl, overflowed: Arc::default(), receipts: Arc::default() }
    }

    /// Marks `client_msg_id` as the request this connection's task is answering now (a connection
    /// handles its frames one at a time): a final receipt for it that arrives by push meanwhile is
    /// held back until [`ConnHandle::finish_reply`], so the client always sees `ACK(accepted)` before
    /// `ACK(saved)`.
    pub fn begin_reply(&self, client_msg_id: &str) {
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        receipts.answering = Some(client_msg_id.to_owned());
    }

    /// Sends one of this connection's own answers: an `ACK(accepted)` marks the message unsaved
    /// (unless its final receipt is already held back), a final answer settles it.
    pub fn reply(&self, frame: &ServerFrame) -> bool {
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cmid) = &frame.client_msg_id {
            match (frame.kind, frame.ack_type) {
                (FrameType::Ack, Some(AckType::Accepted)) => {
                    let settled = receipts.held.is_some() && receipts.answering.as_ref() == Some(cmid);
                    // Bounded: a client with this many unconfirmed messages is far behind anyway.
                    if !settled && receipts.unsaved.len() < MAX_UNSAVED {
                        receipts.unsaved.insert(cmid.clone());
                    }
                }
                (FrameType::Ack, Some(AckType::Saved)) | (FrameType::Error, _) => {
                    receipts.unsaved.remove(cmid);
                }
                _ => {}
            }
        }
        self.offer(Bytes::from(frame.to_json()))
    }

    /// Ends [`ConnHandle::begin_reply`]: sends the final receipt held back meanwhile, if any.
    pub fn finish_reply(&self) {
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        receipts.answering = None;
        if let Some(held) = receipts.held.take() {
            self.offer(held);
        }
    }

    /// Sends a frame pushed from elsewhere (node channel); a final receipt (`ACK(saved)`, `ERROR`)
    /// settles its message, or waits for the connection's own answer to it (see `begin_reply`).
    fn push(&self, frame: &ServerFrame, text: Bytes) -> bool {
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(cmid), FrameType::Ack | FrameType::Error) = (&frame.client_msg_id, frame.kind) {
            if frame.ack_type != Some(AckType::Accepted) {
                if receipts.answering.as_ref() == Some(cmid) {
                    receipts.held = Some(text);
                    return true;
                }
                receipts.unsaved.remove(cmid);
            }
        }
        self.offer(text)
    }

    /// Whether messages of this connection wait for their `ACK(saved)`.
    pub fn has_unsaved(&self) -> bool {
        !self.receipts.lock().unwrap_or_else(|p| p.into_inner()).unsaved.is_empty()
    }

    /// Queues a frame; on a full queue asks the connection to close as a slow consumer and returns false.
    pub fn offer(&self, frame: Bytes) -> bool {
        match self.out.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("im_gateway_slow_consumer_disconnects_total").increment(1);
                let _ = self.ctrl.try_send(Control::Close(close_code::SLOW_CONSUMER, "slow_consumer"));
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
    next_conn: AtomicU64,
    count: AtomicU64,
}

impl Sessions {
    /// A connection id unique on this node.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a connection; true when it is the user's first on this node.
    pub fn add(&self, uid: u64, conn: ConnHandle) -> bool {
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

    /// Hands a push to its connections; returns how many connections took it.
    pub fn deliver(&self, push: &Push) -> usize {
        let text = Bytes::from(push.frame.to_json());
        let targets: Vec<ConnHandle> = {
            let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            let Some(conns) = users.get(&push.user) else { return 0 };
            match push.conn.and_then(|id| conns.iter().find(|c| c.id == id)) {
                Some(c) => vec![c.clone()],
                None => conns.clone(),
            }
        };
        let taken = targets.iter().filter(|c| c.push(&push.frame, text.clone())).count();
        metrics::counter!("im_gateway_frames_out_total", "type" => push.frame.kind.as_str()).increment(taken as u64);
        taken
    }

    /// Every connection with its user.
    pub fn connections(&self) -> Vec<(u64, ConnHandle)> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.iter().flat_map(|(&uid, conns)| conns.iter().map(move |c| (uid, c.clone()))).collect()
    }

    /// Asks every connection to close with `code` (graceful drain).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for c in users.values().flatten() {
            let _ = c.ctrl.try_send(Control::Close(code, reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (ConnHandle, mpsc::Receiver<Bytes>) {
        let (out, rx) = mpsc::channel(16);
        let (ctrl, _) = mpsc::channel(1);
        (ConnHandle::new(1, out, ctrl), rx)
    }

    fn sent(rx: &mut mpsc::Receiver<Bytes>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
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

    #[test]
    fn a_saved_receipt_that_overtakes_its_accepted_waits_for_it_and_settles_the_message() {
        let (c, mut rx) = conn();
        c.begin_reply("m1");
        let saved = ServerFrame::ack(AckType::Saved, "m1", 7);
        c.push(&saved, Bytes::from(saved.to_json()));
        c.reply(&ServerFrame::ack(AckType::Accepted, "m1", 7));
        c.finish_reply();
        assert!(!c.has_unsaved(), "the message stays unsaved for good");
        assert_eq!(sent(&mut rx), ["ACK accepted", "ACK saved"]);
    }

    #[test]
    fn receipts_in_order_settle_the_message() {
        let (c, mut rx) = conn();
        c.begin_reply("m1");
        c.reply(&ServerFrame::ack(AckType::Accepted, "m1", 7));
        c.finish_reply();
        assert!(c.has_unsaved());
        let saved = ServerFrame::ack(AckType::Saved, "m1", 7);
        c.push(&saved, Bytes::from(saved.to_json()));
        assert!(!c.has_unsaved());
        assert_eq!(sent(&mut rx), ["ACK accepted", "ACK saved"]);
    }

    #[test]
    fn a_receipt_for_another_message_is_not_held_back() {
        let (c, mut rx) = conn();
        c.begin_reply("m2");
        let saved = ServerFrame::ack(AckType::Saved, "m1", 7);
        c.push(&saved, Bytes::from(saved.to_json()));
        assert_eq!(sent(&mut rx), ["ACK saved"]);
    }
}
