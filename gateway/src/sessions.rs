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
    /// clientMsgIds this connection got `ACK(accepted)` for and no `ACK(saved)` yet: while there are
    /// any, fail-open must not save a newer message past them (see `Appender::fall_open`).
    unsaved: Arc<Mutex<HashSet<String>>>,
}

impl ConnHandle {
    /// A handle for a new connection.
    pub fn new(id: u64, out: mpsc::Sender<Bytes>, ctrl: mpsc::Sender<Control>) -> Self {
        ConnHandle { id, out, ctrl, overflowed: Arc::default(), unsaved: Arc::default() }
    }

    /// Notes a frame about to be sent to this connection: a receipt settles its message.
    pub fn track(&self, frame: &ServerFrame) {
        let Some(cmid) = &frame.client_msg_id else { return };
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        match (frame.kind, frame.ack_type) {
            // Bounded: a client with this many unconfirmed messages is far behind anyway.
            (FrameType::Ack, Some(AckType::Accepted)) if unsaved.len() < MAX_UNSAVED => {
                unsaved.insert(cmid.clone());
            }
            (FrameType::Ack, Some(AckType::Saved)) | (FrameType::Error, _) => {
                unsaved.remove(cmid);
            }
            _ => {}
        }
    }

    /// Whether messages of this connection wait for their `ACK(saved)`.
    pub fn has_unsaved(&self) -> bool {
        !self.unsaved.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
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
        for c in &targets {
            c.track(&push.frame);
        }
        let taken = targets.iter().filter(|c| c.offer(text.clone())).count();
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
