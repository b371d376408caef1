//! A resend that finds its message accepted but not saved yet hears the final receipt on its own
//! connection (SPEC §2: a retry learns what became of the first attempt).
//!
//! The save stage addresses `ACK saved` to the connection of the first attempt, on the gateway that
//! took it. After a reconnect — to another gateway, or while the old connection was still closing —
//! that connection is gone, and the client that resent would hear `ACK accepted` and then nothing.
//! So the resending connection watches the message's idempotency entry until it is saved or failed,
//! and then gets that receipt itself. Only resends of unsaved messages start a watch (rare: a
//! reconnect with messages in flight); it ends when the connection closes or the entry is gone. A
//! resend on the very connection of the first attempt can so hear `ACK saved` twice (clients go by
//! clientMsgId).

use std::sync::Arc;
use std::time::Duration;

use im_common::backoff::Backoff;
use im_common::idempotency::{IdempotencyWindow, Stage};
use im_common::record::Push;

use crate::sessions::Sessions;

/// First pause between looks at the entry, and the longest.
const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(2);

/// Watches idempotency entries on behalf of resending connections.
#[derive(Clone)]
pub struct ReceiptWatch {
    pub window: IdempotencyWindow,
    pub sessions: Arc<Sessions>,
}

impl ReceiptWatch {
    /// Sends `user`'s connection `conn` the final receipt of the message under `key` once it has one.
    pub fn watch(&self, key: String, user: u64, conn: u64, client_msg_id: String) {
        let ReceiptWatch { window, sessions } = self.clone();
        metrics::counter!("im_gateway_receipt_watches_total").increment(1);
        tokio::spawn(async move {
            let mut backoff = Backoff::new(FIRST, MAX);
            loop {
                backoff.wait().await;
                if !sessions.has_connection(user, conn) {
                    return;
                }
                match window.stage(&key).await {
                    Ok(Some((stage @ (Stage::Saved | Stage::Failed), id))) => {
                        sessions.deliver(&Push { user, conn: Some(conn), frame: stage.receipt(&client_msg_id, id) });
                        return;
                    }
                    Ok(None) => return,        // the window lapsed: nothing to tell
                    Ok(Some(_)) | Err(_) => {} // not saved yet, or Redis away: look again
                }
            }
        });
    }
}
