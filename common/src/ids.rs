//! Message ids (`serverMsgId`): time-ordered 64-bit integers, unique across every process.
//!
//! Layout, high to low: 41 bits of milliseconds since [`EPOCH_MS`] (about 69 years), 10 bits of node id,
//! 12 bits of sequence. Uniqueness across processes comes from the node id, which each process gets
//! from its config (`ops up` hands out distinct ones); no Redis round trip is needed, so ids keep
//! coming in fail-open mode when Redis is down.
//!
//! Within a node, `(millisecond, sequence)` lives in one atomic word that only moves forward: a clock
//! that steps back reuses the last millisecond, and a sequence that overflows borrows the next
//! millisecond. Ids therefore never repeat and never go backwards, even across threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
/// Node ids are `0..MAX_NODES`.
pub const MAX_NODES: u16 = 1 << NODE_BITS;

const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;

/// Generates ids for one node.
#[derive(Debug)]
pub struct IdGenerator {
    node: u64,
    /// `(ms since EPOCH) << SEQ_BITS | sequence` of the last id handed out.
    last: AtomicU64,
}

impl IdGenerator {
    /// A generator for `node` (must be below [`MAX_NODES`]; config validation guarantees it).
    pub fn new(node: u16) -> Self {
        assert!(node < MAX_NODES, "node id {node} out of range");
        IdGenerator { node: u64::from(node), last: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next_id(&self) -> u64 {
        let now = now_ms().saturating_sub(EPOCH_MS) << SEQ_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = if now > last { now } else { last + 1 };
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return compose(next >> SEQ_BITS, self.node, next & ((1 << SEQ_BITS) - 1)),
                Err(actual) => last = actual,
            }
        }
    }
}

fn compose(ms: u64, node: u64, seq: u64) -> u64 {
    (ms << (NODE_BITS + SEQ_BITS)) | (node << SEQ_BITS) | seq
}

/// Unix milliseconds at which `id` was made.
pub fn timestamp_ms(id: u64) -> i64 {
    ((id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS) as i64
}

/// The node that made `id`.
pub fn node_of(id: u64) -> u16 {
    ((id >> SEQ_BITS) & u64::from(MAX_NODES - 1)) as u16
}

/// The smallest id that could have been made at Unix millisecond `ms` (for time-based id ranges).
pub fn min_id_at(ms: u64) -> u64 {
    compose(ms.saturating_sub(EPOCH_MS), 0, 0)
}

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn a_million_ids_from_concurrent_generators_never_collide() {
        // 4 nodes × 2 threads each (threads of one node share its generator) × 125k ids.
        let generators: Vec<_> = (0..4u16).map(|n| Arc::new(IdGenerator::new(n * 300 + 1))).collect();
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let g = generators[t % 4].clone();
                std::thread::spawn(move || (0..125_000).map(|_| g.next_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::with_capacity(1_000_000);
        for h in handles {
            let ids = h.join().unwrap();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "one thread's ids must increase");
            for id in ids {
                assert!(seen.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(seen.len(), 1_000_000);
    }

    #[test]
    fn ids_carry_their_node_and_time() {
        let before = now_ms() as i64;
        let id = IdGenerator::new(513).next_id();
        assert_eq!(node_of(id), 513);
        let ts = timestamp_ms(id);
        assert!(ts >= before && ts <= now_ms() as i64 + 1, "ts {ts} not near {before}");
        assert!(min_id_at(ts as u64) <= id && id < min_id_at(ts as u64 + 1));
    }
}
