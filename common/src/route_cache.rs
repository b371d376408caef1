//! A publisher's memory of where its recipients are: each user's routes, with the presence epoch
//! they were read at, so a batch reads every recipient's epoch (one `MGET`) but routes only for
//! users who connected since or whose routes were read more than `max_age` ago. Every
//! [`crate::router::Router`] has one: a shard worker's stages share it, and so do a gateway's
//! pushes (baseline) and receipt relays.
//!
//! Why an unchanged epoch vouches for routes: a gateway adds a connection's route before it raises
//! the user's presence epoch, in two round trips (`RouteKeeper::connected` in the gateway), and
//! [`crate::router::Router::locate`] reads routes no earlier than the epochs — in the same pipeline
//! on one server, which runs a pipeline in order, or in a round trip after it on a cluster, where
//! the two keys live on different nodes. So routes read after seeing epoch `e` hold every connection
//! that raised the epoch to `e` or below, and while the epoch still reads `e` no connection came
//! since. Cached routes can only hold too much — a node the user left, a gateway that died — which
//! costs a publish nobody takes, until they are read again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::router::{Epochs, Routes};

/// How long a publisher pushes to a user's cached routes before it reads them again, even with the
/// epoch unchanged: a node the user left, or a gateway that died, gets their pushes (dropped there)
/// for at most this long. New connections raise the epoch and are seen at once.
pub const ROUTES_READ_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// Users kept at most; beyond that the cache starts over (it is only a cache).
const CAPACITY: usize = 200_000;

/// Cached routes of users, each with the presence epoch that vouches for them.
pub struct RouteCache {
    max_age: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    users: HashMap<u64, Cached>,
    swept_at: Instant,
}

struct Cached {
    epoch: u64,
    nodes: Vec<u16>,
    read_at: Instant,
}

impl RouteCache {
    /// A cache whose routes are read again once they are `max_age` old.
    pub fn new(max_age: Duration) -> Self {
        RouteCache { max_age, inner: Mutex::new(Inner { users: HashMap::new(), swept_at: Instant::now() }) }
    }

    /// Of `users`, those whose routes to read in the same round trip as their epochs: cached ones
    /// older than `max_age` (their epoch, if unchanged, vouches for the new read), and uncached ones
    /// if `ordered` (the round trip reads the routes after the epochs).
    pub(crate) fn stale(&self, users: &[u64], ordered: bool) -> Vec<u64> {
        let now = Instant::now();
        let inner = self.lock();
        let stale = |u: &u64| match inner.users.get(u) {
            Some(cached) => now.duration_since(cached.read_at) >= self.max_age,
            None => ordered,
        };
        users.iter().copied().filter(stale).collect()
    }

    /// Takes a round trip's epochs and the routes it read with them: a read is kept if `ordered` or
    /// if the user's epoch is the cached one (nobody connected since the cached routes were read).
    /// Returns the routes of the users settled so, and the users whose routes must be read again in
    /// a round trip after this one ([`RouteCache::store`]).
    pub(crate) fn settle(&self, epochs: &Epochs, read: Vec<(u64, Vec<u16>)>, ordered: bool) -> (Routes, Vec<u64>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut read: HashMap<u64, Vec<u16>> = read.into_iter().collect();
        let mut routes = Routes::with_capacity(epochs.len());
        let mut again = Vec::new();
        for (&user, &epoch) in epochs {
            let unchanged = inner.users.get(&user).is_some_and(|cached| cached.epoch == epoch);
            let nodes = match read.remove(&user) {
                Some(nodes) if ordered || unchanged => {
                    inner.users.insert(user, Cached { epoch, nodes: nodes.clone(), read_at: now });
                    nodes
                }
                None if unchanged => inner.users[&user].nodes.clone(),
                _ => {
                    again.push(user);
                    continue;
                }
            };
            if !nodes.is_empty() {
                routes.insert(user, nodes);
            }
        }
        self.sweep(&mut inner, now);
        (routes, again)
    }

    /// Keeps routes read after `epochs` were; returns them (users on no node left out).
    pub(crate) fn store(&self, epochs: &Epochs, read: Vec<(u64, Vec<u16>)>) -> Routes {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut routes = Routes::with_capacity(read.len());
        for (user, nodes) in read {
            let epoch = epochs.get(&user).copied().unwrap_or(0);
            inner.users.insert(user, Cached { epoch, nodes: nodes.clone(), read_at: now });
            if !nodes.is_empty() {
                routes.insert(user, nodes);
            }
        }
        routes
    }

    /// Drops entries read long ago (every `max_age`), and everything beyond [`CAPACITY`].
    fn sweep(&self, inner: &mut Inner, now: Instant) {
        if now.duration_since(inner.swept_at) < self.max_age && inner.users.len() <= CAPACITY {
            return;
        }
        inner.swept_at = now;
        // Routes this old are read again before use anyway: their entries only save a round trip
        // on a cluster, where an unchanged epoch lets them be read along with the epochs.
        let keep = self.max_age * 4;
        inner.users.retain(|_, cached| now.duration_since(cached.read_at) < keep);
        if inner.users.len() > CAPACITY {
            inner.users.clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves nothing half-done worth refusing.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(pairs: &[(u64, u64)]) -> Epochs {
        pairs.iter().copied().collect()
    }

    #[test]
    fn cached_routes_serve_while_the_epoch_is_unchanged_and_are_read_again_when_it_moves() {
        let cache = RouteCache::new(Duration::from_secs(60));
        assert_eq!(cache.stale(&[1, 2], true), [1, 2], "uncached users are read with their epochs on one server");
        let (routes, again) = cache.settle(&epochs(&[(1, 3), (2, 0)]), vec![(1, vec![4]), (2, vec![])], true);
        assert_eq!((routes, again), ([(1, vec![4])].into(), vec![]));

        assert!(cache.stale(&[1, 2], true).is_empty(), "fresh entries are not read again");
        let (routes, again) = cache.settle(&epochs(&[(1, 3), (2, 0)]), vec![], true);
        assert_eq!((routes, again), ([(1, vec![4])].into(), vec![]), "same epochs: the cached routes");

        let (routes, again) = cache.settle(&epochs(&[(1, 3), (2, 1)]), vec![], true);
        assert_eq!((routes, again), ([(1, vec![4])].into(), vec![2]), "user 2 connected: read again");
        assert_eq!(cache.store(&epochs(&[(2, 1)]), vec![(2, vec![5])]), [(2, vec![5])].into());
        let (routes, _) = cache.settle(&epochs(&[(1, 3), (2, 1)]), vec![], true);
        assert_eq!(routes, [(1, vec![4]), (2, vec![5])].into());
    }

    #[test]
    fn on_a_cluster_routes_read_with_the_epochs_count_only_if_the_epoch_vouches_for_them() {
        let cache = RouteCache::new(Duration::ZERO);
        assert!(cache.stale(&[1], false).is_empty(), "an uncached user's routes come after its epoch");
        let (routes, again) = cache.settle(&epochs(&[(1, 2)]), vec![], false);
        assert_eq!((routes, again), (Routes::new(), vec![1]));
        cache.store(&epochs(&[(1, 2)]), vec![(1, vec![4])]);

        assert_eq!(cache.stale(&[1], false), [1], "entries older than max_age are read with the epochs");
        let (routes, again) = cache.settle(&epochs(&[(1, 2)]), vec![(1, vec![4, 6])], false);
        assert_eq!((routes, again), ([(1, vec![4, 6])].into(), vec![]), "unchanged epoch: the new read counts");
        let (routes, again) = cache.settle(&epochs(&[(1, 3)]), vec![(1, vec![4])], false);
        assert_eq!((routes, again), (Routes::new(), vec![1]), "moved epoch: that read may predate the route");
    }
}
