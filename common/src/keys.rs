//! The Redis key layout, in one place.
//!
//! Every key that belongs to a shard carries the hash tag `{s<k>}` so a shard's streams, lease and
//! idempotency entries live in one Redis Cluster slot: the append script, pipelines and MULTI blocks
//! that touch them stay valid on a cluster. Keys that are per user or per node (routes, node channels)
//! are not shard-local and are never combined in one multi-key command.

use std::sync::Arc;

/// Builds key names under a configurable prefix (`im` in production, a unique one per test).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
    accepted: Arc<str>,
    to_save: Arc<str>,
    dead_letter: Arc<str>,
}

/// The field of a [`Keys::seq_counters`] hash that marks its counters complete (restored from MySQL
/// or started empty on an empty database). A hash without it was lost and is restored before use.
pub const SEQ_RESTORED: &str = "restored";

/// The field of one direction in a [`Keys::seq_counters`] hash.
pub fn seq_field(from: u64, to: u64) -> String {
    format!("{from}:{to}")
}

impl Keys {
    /// Keys under `prefix`, with the configured stream names.
    pub fn new(prefix: &str, accepted: &str, to_save: &str, dead_letter: &str) -> Self {
        Keys {
            prefix: prefix.into(),
            accepted: accepted.into(),
            to_save: to_save.into(),
            dead_letter: dead_letter.into(),
        }
    }

    /// From a loaded config.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let tp = &cfg.two_phase;
        Keys::new(&cfg.redis.key_prefix, &tp.accepted_stream, &tp.to_save_stream, &tp.dead_letter_stream)
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn shard_key(&self, shard: u16, name: &str) -> String {
        format!("{}:{{s{shard}}}:{name}", self.prefix)
    }

    /// Stream the gateway appends accepted messages to.
    pub fn accepted_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.accepted)
    }

    /// Stream the deliver stage hands delivered messages to, for the save stage (full mode).
    pub fn to_save_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.to_save)
    }

    /// Stream of messages the database rejected for good.
    pub fn dead_letter_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.dead_letter)
    }

    /// Idempotency entry of (sender, clientMsgId); lives in the sender's shard slot.
    pub fn idempotency(&self, shard: u16, from: u64, client_msg_id: &str) -> String {
        format!("{}:{{s{shard}}}:idem:{from}:{client_msg_id}", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every idempotency entry of `shard`.
    pub fn idempotency_pattern(&self, shard: u16) -> String {
        let mut pattern = String::new();
        for c in self.idempotency(shard, 0, "").trim_end_matches("0:").chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    /// The (sender, clientMsgId) of `shard`'s idempotency entry `key` (the inverse of
    /// [`Keys::idempotency`]).
    pub fn parse_idempotency<'k>(&self, shard: u16, key: &'k str) -> Option<(u64, &'k str)> {
        let head = self.idempotency(shard, 0, "");
        let rest = key.strip_prefix(head.strip_suffix("0:")?)?;
        let (from, client_msg_id) = rest.split_once(':')?;
        Some((from.parse().ok()?, client_msg_id))
    }

    /// The shard-ownership lease (value: `<fencing token>:<owner>`).
    pub fn lease(&self, shard: u16) -> String {
        self.shard_key(shard, "lease")
    }

    /// Monotonic counter that hands out fencing tokens for the shard's lease.
    pub fn fence(&self, shard: u16) -> String {
        self.shard_key(shard, "fence")
    }

    /// Sorted set of the gateway nodes holding a user (member: node id, score: expiry in Unix ms).
    pub fn route(&self, uid: u64) -> String {
        format!("{}:route:{uid}", self.prefix)
    }

    /// A user's presence epoch: a counter raised on every connection of the user (any device, any
    /// gateway). The deliver stage notes it when it pushes; a save that finds it changed pushes again
    /// (the user connected since, and that connection's sync could not see the unsaved message).
    pub fn presence(&self, uid: u64) -> String {
        format!("{}:presence:{uid}", self.prefix)
    }

    /// The per-direction sequence counters of the senders of `shard` (a hash: field `<from>:<to>` →
    /// last seq handed out, and [`SEQ_RESTORED`] once the counters are known to be complete).
    pub fn seq_counters(&self, shard: u16) -> String {
        self.shard_key(shard, "seq")
    }

    /// Pub/sub channel of one gateway node.
    pub fn node_channel(&self, node: u16) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// The journal of what a shard's owner published to `node` (see `journal::JOURNAL_LUA`). In the
    /// shard's slot, next to its streams, so the owner's scripts can write it.
    pub fn journal_of_shard(&self, shard: u16, node: u16) -> String {
        self.shard_key(shard, &format!("journal:{node}"))
    }

    /// The lease on gateway node id `node` (a hash: `owner`, `expires_ms`, `ids_up_to_ms`; see
    /// `node_lease`). Per node, not shard-local; one key, so its scripts are valid on a cluster.
    pub fn node_lease(&self, node: u16) -> String {
        format!("{}:node-lease:{node}", self.prefix)
    }

    /// The journal of what gateways published to `node` (baseline and fail-open pushes).
    pub fn journal_of_gateways(&self, node: u16) -> String {
        format!("{}:journal:{node}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_parse_back_and_match_their_shard_pattern() {
        let keys = Keys::new("im*t", "accepted", "to_save", "dead");
        let key = keys.idempotency(3, 1001, "c:1 *x");
        assert_eq!(keys.parse_idempotency(3, &key), Some((1001, "c:1 *x")));
        assert_eq!(keys.parse_idempotency(4, &key), None, "another shard's key");
        assert_eq!(keys.idempotency_pattern(3), "im\\*t:{s3}:idem:*");
    }

    #[test]
    fn shard_keys_share_one_hash_tag() {
        let k = Keys::new("im", "accepted", "to_save", "dead");
        assert_eq!(k.accepted_stream(3), "im:{s3}:accepted");
        assert_eq!(k.to_save_stream(3), "im:{s3}:to_save");
        assert_eq!(k.dead_letter_stream(3), "im:{s3}:dead");
        assert_eq!(k.idempotency(3, 7, "c:1"), "im:{s3}:idem:7:c:1");
        assert_eq!(k.lease(3), "im:{s3}:lease");
        assert_eq!(k.route(9), "im:route:9");
        assert_eq!(k.node_channel(2), "im:node:2");
        assert_eq!(k.journal_of_shard(3, 2), "im:{s3}:journal:2");
        assert_eq!(k.journal_of_gateways(2), "im:journal:2");
        assert_eq!(k.node_lease(2), "im:node-lease:2");
    }
}
