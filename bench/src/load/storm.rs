//! Reconnect storms: a drill closes a share of the load's connections at once, as when a network
//! blip or a load balancer drops many clients together, and they all come back (with the backoff and
//! resend of [`super::link::Link::reconnect`]).
//!
//! The drill holds a [`ReconnectStorm`] (in [`crate::LoadSpec::storm`]) and calls
//! [`ReconnectStorm::close_share`]; every connection task watches it and closes its connection when
//! an order picks its user. Which users a storm picks follows from the order's salt alone, so a
//! seeded drill picks the same ones again.

use std::sync::Arc;

use tokio::sync::watch;

/// A handle to order reconnect storms; clones order the same load's connections.
#[derive(Debug, Clone)]
pub struct ReconnectStorm {
    orders: Arc<watch::Sender<StormOrder>>,
}

/// The latest storm: which share of the users, picked by `salt`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct StormOrder {
    share: f64,
    salt: u64,
}

impl Default for ReconnectStorm {
    fn default() -> Self {
        ReconnectStorm::new()
    }
}

impl ReconnectStorm {
    pub fn new() -> ReconnectStorm {
        ReconnectStorm { orders: Arc::new(watch::channel(StormOrder::default()).0) }
    }

    /// Closes the connections of about `share` (0..=1) of the users (senders and receivers alike),
    /// picked by `salt`. Returns at once; the connections close and reconnect on their own tasks.
    pub fn close_share(&self, share: f64, salt: u64) {
        self.orders.send_replace(StormOrder { share: share.clamp(0.0, 1.0), salt });
    }

    /// What a connection task watches (orders given before this call are not its business).
    pub(super) fn watch(&self) -> StormWatch {
        StormWatch { orders: self.orders.subscribe() }
    }
}

/// One connection task's view of the storms.
pub(super) struct StormWatch {
    orders: watch::Receiver<StormOrder>,
}

impl StormWatch {
    /// Resolves when a storm picks `uid`; never, once the load is over.
    async fn hit(&mut self, uid: u64) {
        loop {
            if self.orders.changed().await.is_err() {
                return std::future::pending().await;
            }
            if picked(uid, *self.orders.borrow_and_update()) {
                return;
            }
        }
    }
}

/// Resolves when a storm picks `uid` (never without a watch).
pub(super) async fn hit(watch: &mut Option<StormWatch>, uid: u64) {
    match watch {
        Some(w) => w.hit(uid).await,
        None => std::future::pending().await,
    }
}

/// Whether `order` picks `uid`: a well-mixed hash of both, below the share.
fn picked(uid: u64, order: StormOrder) -> bool {
    (splitmix64(uid ^ order.salt) as f64 / u64::MAX as f64) < order.share
}

/// SplitMix64's output function: every input bit moves every output bit.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_picks_about_its_share_and_the_same_users_for_the_same_salt() {
        let order = StormOrder { share: 0.3, salt: 42 };
        let picked_users: Vec<u64> = (1_000..11_000).filter(|&u| picked(u, order)).collect();
        assert!((2_700..3_300).contains(&picked_users.len()), "{} of 10,000", picked_users.len());
        let again: Vec<u64> = (1_000..11_000).filter(|&u| picked(u, order)).collect();
        assert_eq!(picked_users, again);
        let other: Vec<u64> = (1_000..11_000).filter(|&u| picked(u, StormOrder { salt: 43, ..order })).collect();
        assert_ne!(picked_users, other, "another salt, other users");
        assert!(!(1_000..2_000).any(|u| picked(u, StormOrder { share: 0.0, salt: 1 })));
        assert!((1_000..2_000).all(|u| picked(u, StormOrder { share: 1.0, salt: 1 })));
    }

    #[tokio::test]
    async fn a_connection_hears_of_a_storm_that_picks_it_and_not_of_earlier_ones() {
        let storm = ReconnectStorm::new();
        storm.close_share(1.0, 1);
        let mut watch = Some(storm.watch());
        let early = tokio::time::timeout(std::time::Duration::from_millis(20), hit(&mut watch, 7)).await;
        assert!(early.is_err(), "an order before the watch began is not for it");
        storm.close_share(1.0, 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), hit(&mut watch, 7)).await.expect("picked");
    }
}
