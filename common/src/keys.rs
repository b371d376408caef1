//! The Redis key layout, in one place.
//!
//! Every key that belongs to a shard carries the shard's hash tag (`{s<k>}` on one server) so a
//! shard's streams, lease, counters, idempotency entries, journals and the channels its owner
//! publishes to live in one Redis Cluster slot: every script touches one slot. Keys that are per user
//! (routes, presence) are never combined in one multi-key command except `MGET`, which a cluster
//! connection splits. A gateway's own publications (baseline pushes, receipts) go to the receiving
//! node's channel and journal, tagged `{n<node>}`.
//!
//! On a cluster the shard tags are chosen so N shards spread evenly over the slot space
//! ([`balanced_tag`]): shard k's tag hashes to the middle of the k-th of N equal slot ranges, so on
//! masters that hold equal contiguous ranges (what `redis-cli --cluster create` makes) no master gets
//! more than ⌈N/M⌉ shards. `{s0}..{s3}` would hash to slots 11097, 15224, 2843, 6970 — three on one
//! master of three.

use std::sync::Arc;

/// Builds key names under a configurable prefix (`im` in production, a unique one per test).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
    accepted: Arc<str>,
    to_save: Arc<str>,
    dead_letter: Arc<str>,
    /// Shard k's hash tag; empty: `s<k>` (one server).
    tags: Arc<[String]>,
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
            tags: Arc::new([]),
        }
    }

    /// The same keys with the cluster's balanced shard tags for `shards` shards ([`balanced_tag`]).
    pub fn with_cluster_tags(mut self, shards: u16) -> Self {
        self.tags = (0..shards).map(|k| balanced_tag(k, shards)).collect();
        self
    }

    /// From a loaded config (balanced shard tags when it names a cluster).
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let tp = &cfg.two_phase;
        let keys = Keys::new(&cfg.redis.key_prefix, &tp.accepted_stream, &tp.to_save_stream, &tp.dead_letter_stream);
        if cfg.redis.cluster_urls.is_empty() {
            keys
        } else {
            keys.with_cluster_tags(cfg.cluster.shards)
        }
    }

    /// Each of `shards` shards with the Redis Cluster slot its keys live in.
    pub fn shard_slots(&self, shards: u16) -> Vec<(u16, u16)> {
        (0..shards).map(|shard| (shard, slot_of(self.accepted_stream(shard).as_bytes()))).collect()
    }

    /// Shard `shard`'s hash tag (without braces).
    pub fn shard_tag(&self, shard: u16) -> String {
        self.tags.get(usize::from(shard)).cloned().unwrap_or_else(|| format!("s{shard}"))
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn shard_key(&self, shard: u16, name: &str) -> String {
        format!("{}:{{{}}}:{name}", self.prefix, self.shard_tag(shard))
    }

    /// Stream the gateway appends accepted messages to.
    pub fn accepted_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.accepted)
    }

    /// Stream the deliver stage hands delivered messages to, for the save stage (full mode).
    pub fn to_save_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.to_save)
    }

    /// How many messages the entries of `to_save` hold (each entry is a deliver batch): written
    /// with the entries, by the shard owner's scripts; what the backlog counts.
    pub fn to_save_messages(&self, shard: u16) -> String {
        self.shard_key(shard, &format!("{}:messages", self.to_save))
    }

    /// Stream of messages the database rejected for good.
    pub fn dead_letter_stream(&self, shard: u16) -> String {
        self.shard_key(shard, &self.dead_letter)
    }

    /// Idempotency entry of (sender, clientMsgId); lives in the sender's shard slot.
    pub fn idempotency(&self, shard: u16, from: u64, client_msg_id: &str) -> String {
        self.shard_key(shard, &format!("idem:{from}:{client_msg_id}"))
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
    /// gateway), starting at a random value. The deliver stage notes it when it pushes; a save that
    /// finds it changed pushes again (the user connected since, and that connection's sync could
    /// not see the unsaved message).
    pub fn presence(&self, uid: u64) -> String {
        format!("{}:presence:{uid}", self.prefix)
    }

    /// The per-direction sequence counters of the senders of `shard` (a hash: field `<from>:<to>` →
    /// last seq handed out, and [`SEQ_RESTORED`] once the counters are known to be complete).
    pub fn seq_counters(&self, shard: u16) -> String {
        self.shard_key(shard, "seq")
    }

    /// The channel shard `shard`'s owner publishes pushes for gateway `node` on (in the shard's slot,
    /// as sharded pub/sub on a cluster requires of a script's channel).
    pub fn shard_channel(&self, shard: u16, node: u16) -> String {
        self.shard_key(shard, &format!("node:{node}"))
    }

    /// The channel other gateways publish pushes for gateway `node` on (baseline pushes, receipts).
    pub fn node_channel(&self, node: u16) -> String {
        format!("{}:{{n{node}}}:node", self.prefix)
    }

    /// Every channel gateway `node` subscribes to: one per shard, and its own.
    pub fn node_channels(&self, node: u16, shards: u16) -> Vec<String> {
        (0..shards).map(|s| self.shard_channel(s, node)).chain([self.node_channel(node)]).collect()
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

    /// The journal of what gateways published to `node` (baseline and fail-open pushes, receipts):
    /// in the slot of [`Keys::node_channel`].
    pub fn journal_of_gateways(&self, node: u16) -> String {
        format!("{}:{{n{node}}}:journal", self.prefix)
    }
}

/// The Redis Cluster slot of `key` (CRC16-XMODEM of its hash tag, or of the whole key, mod 16384).
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Shard `shard` of `shards`' tag on a cluster: `s<k>` if it hashes to the middle slot of the k-th
/// of `shards` equal slot ranges, else the first `s<k>.<i>` that does.
pub fn balanced_tag(shard: u16, shards: u16) -> String {
    let target = ((2 * u32::from(shard) + 1) * 16384 / (2 * u32::from(shards.max(1)))) as u16;
    let plain = format!("s{shard}");
    if slot_of(plain.as_bytes()) == target {
        return plain;
    }
    (0u32..).map(|i| format!("s{shard}.{i}")).find(|tag| slot_of(tag.as_bytes()) == target).unwrap_or(plain)
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
        assert_eq!(k.to_save_messages(3), "im:{s3}:to_save:messages");
        assert_eq!(k.dead_letter_stream(3), "im:{s3}:dead");
        assert_eq!(k.idempotency(3, 7, "c:1"), "im:{s3}:idem:7:c:1");
        assert_eq!(k.lease(3), "im:{s3}:lease");
        assert_eq!(k.route(9), "im:route:9");
        assert_eq!(k.shard_channel(3, 2), "im:{s3}:node:2");
        assert_eq!(k.node_channel(2), "im:{n2}:node");
        assert_eq!(k.journal_of_shard(3, 2), "im:{s3}:journal:2");
        assert_eq!(k.journal_of_gateways(2), "im:{n2}:journal");
        assert_eq!(k.node_channels(2, 2), ["im:{s0}:node:2", "im:{s1}:node:2", "im:{n2}:node"]);
        assert_eq!(k.node_lease(2), "im:node-lease:2");
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Known answers (`CLUSTER KEYSLOT`): the issue's {s0}..{s3}, and a hash tag.
        let slots: Vec<u16> = (0..4).map(|k| slot_of(format!("im:{{s{k}}}:accepted").as_bytes())).collect();
        assert_eq!(slots, [11097, 15224, 2843, 6970]);
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"foo{}bar"), slot_of(b"foo{}bar"), "an empty tag hashes the whole key");
    }

    #[test]
    fn cluster_shard_tags_spread_evenly_over_three_masters() {
        // What `redis-cli --cluster create` gives three masters.
        let master = |slot: u16| match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        for (shards, most) in [(3, 1), (4, 2), (6, 2), (12, 4)] {
            let keys = Keys::new("im", "accepted", "to_save", "dead").with_cluster_tags(shards);
            let mut per_master = [0; 3];
            for k in 0..shards {
                per_master[master(slot_of(keys.accepted_stream(k).as_bytes()))] += 1;
            }
            assert!(per_master.iter().all(|&n| n <= most), "{shards} shards: {per_master:?}");
        }
        let keys = Keys::new("im", "accepted", "to_save", "dead").with_cluster_tags(4);
        let tag = keys.shard_tag(1);
        assert_eq!(keys.lease(1), format!("im:{{{tag}}}:lease"));
        assert_eq!(slot_of(keys.shard_channel(1, 9).as_bytes()), slot_of(keys.seq_counters(1).as_bytes()));
    }

    /// Redis Cluster runs a script only if all its keys (and, for `SPUBLISH`, its channel) hash to
    /// one slot. Each line is one script and the keys its call site passes, built as there.
    #[test]
    fn every_script_touches_one_slot() {
        for keys in
            [Keys::new("im", "accepted", "to_save", "dead"), Keys::new("im", "a", "t", "d").with_cluster_tags(6)]
        {
            for shard in 0..6 {
                let scripts: [(&str, Vec<String>); 6] = [
                    (
                        "gateway append (a batch of several senders)",
                        vec![
                            keys.accepted_stream(shard),
                            keys.idempotency(shard, 42, "c:1"),
                            keys.idempotency(shard, 43, "c:9"),
                        ],
                    ),
                    ("lease acquire", vec![keys.lease(shard), keys.fence(shard)]),
                    (
                        "hand-over",
                        vec![
                            keys.lease(shard),
                            keys.accepted_stream(shard),
                            keys.to_save_stream(shard),
                            keys.seq_counters(shard),
                            keys.to_save_messages(shard),
                            keys.journal_of_shard(shard, 3),
                            keys.shard_channel(shard, 3),
                        ],
                    ),
                    (
                        "commit",
                        vec![
                            keys.lease(shard),
                            keys.to_save_stream(shard),
                            keys.dead_letter_stream(shard),
                            keys.seq_counters(shard),
                            keys.to_save_messages(shard),
                            keys.journal_of_shard(shard, 9),
                            keys.shard_channel(shard, 9),
                            keys.idempotency(shard, 7, "x"),
                        ],
                    ),
                    ("seq counters raise / restore", vec![keys.seq_counters(shard)]),
                    ("gateway publish", vec![keys.journal_of_gateways(shard + 1), keys.node_channel(shard + 1)]),
                ];
                for (script, touched) in scripts {
                    let slots: std::collections::BTreeSet<u16> =
                        touched.iter().map(|k| slot_of(k.as_bytes())).collect();
                    assert_eq!(slots.len(), 1, "{script} (shard {shard}) touches slots {slots:?}: {touched:?}");
                }
            }
        }
    }
}
