//! Where this gateway sends pushes from: its local connections directly, other gateways by one
//! journaled PUBLISH per node, and what cannot be published into the [`Outbox`].
//!
//! Only the baseline path pushes from the gateway; in two-phase modes the shard worker publishes.
//! Pushes arrive at other gateways through their node channel ([`crate::node_channel`]).

use std::sync::Arc;

use crate::outbox::Outbox;
use crate::sessions::Sessions;
use im_common::record::Push;
use im_common::router::{Router, Target};

/// Pushes frames to every connection of their users.
pub struct Fanout {
    pub router: Router,
    pub outbox: Arc<Outbox>,
    pub sessions: Arc<Sessions>,
    pub node: u16,
}

impl Fanout {
    /// Local connections first, then one PUBLISH per other node holding a user; while the outbox is
    /// not empty (or the publish fails) the remote part queues there, so a sender's pushes keep their
    /// order.
    pub async fn push(&self, pushes: Vec<Push>) {
        let mut remote = Vec::with_capacity(pushes.len());
        for p in pushes {
            self.sessions.deliver(&p);
            remote.push((Target::Routed, p));
        }
        if !self.outbox.is_empty() {
            self.outbox.enqueue(remote);
            return;
        }
        match self.router.send(&remote, Some(self.node)).await {
            Ok(stats) => metrics::counter!("im_gateway_pubsub_messages_out_total").increment(stats.publishes as u64),
            Err(e) => {
                tracing::warn!(error = %e, "push publish failed; queued until Redis answers");
                self.outbox.enqueue(remote);
            }
        }
    }
}
