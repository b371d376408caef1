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
//!
//! Across processes that word is lost, so a generator can be given a floor
//! ([`IdGenerator::with_floor`], [`IdGenerator::raise_floor`]): the millisecond up to which its node
//! id already issued ids (the gateway keeps it in its node lease, `node_lease.rs`). Every id after that
//! is made strictly above the floor, so a restart after a clock step back never reissues an id, and
//! [`IdGenerator::high_water_ms`] is what the next holder of the node id must start above.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
/// Node ids are `0..MAX_NODES`.
pub const MAX_NODES: u16 = 1 << NODE_BITS;
/// The last Unix millisecond an id can carry (41 bits after [`EPOCH_MS`]).
pub const MAX_TIMESTAMP_MS: u64 = EPOCH_MS + (1 << MS_BITS) - 1;

const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const MS_BITS: u32 = 64 - 1 - NODE_BITS - SEQ_BITS;

/// A floor an id generator cannot start above: it lies beyond the last millisecond ids can carry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("ids issued up to Unix ms {0}: beyond the last millisecond a serverMsgId can carry ({MAX_TIMESTAMP_MS})")]
pub struct FloorOutOfRange(pub u64);

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

    /// A generator for `node` whose ids are all made strictly after Unix millisecond `floor_ms`,
    /// whatever the clock says (see [`IdGenerator::raise_floor`]).
    pub fn with_floor(node: u16, floor_ms: u64) -> Result<Self, FloorOutOfRange> {
        let generator = IdGenerator::new(node);
        generator.raise_floor(floor_ms)?;
        Ok(generator)
    }

    /// From now on, makes ids strictly after Unix millisecond `floor_ms` (ids its node id issued
    /// before, perhaps in another process). Never moves the generator back: a floor below the last id
    /// made changes nothing.
    pub fn raise_floor(&self, floor_ms: u64) -> Result<(), FloorOutOfRange> {
        // The next id's millisecond is floor + 1, which must still fit.
        if floor_ms >= MAX_TIMESTAMP_MS {
            return Err(FloorOutOfRange(floor_ms));
        }
        // The word of the last sequence number of the floor's millisecond: the next id is (floor + 1, 0)
        // unless the clock is already past it.
        let word = ((floor_ms.saturating_sub(EPOCH_MS) + 1) << SEQ_BITS) - 1;
        self.last.fetch_max(word, Ordering::Relaxed);
        Ok(())
    }

    /// Unix millisecond of the newest id made so far (or of the floor, if higher): every id this
    /// generator has issued was made at or before it.
    pub fn high_water_ms(&self) -> u64 {
        (self.last.load(Ordering::Relaxed) >> SEQ_BITS) + EPOCH_MS
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
    fn a_generator_with_a_floor_ahead_of_the_clock_issues_ids_strictly_above_it() {
        // The node issued ids up to an hour from now before a restart; the clock has stepped back.
        let floor = now_ms() + 3_600_000;
        let g = IdGenerator::with_floor(7, floor).unwrap();
        let ids: Vec<u64> = (0..10_000).map(|_| g.next_id()).collect();
        assert_eq!(timestamp_ms(ids[0]), floor as i64 + 1, "the first id is made just above the floor");
        assert!(ids.iter().all(|&id| timestamp_ms(id) > floor as i64 && node_of(id) == 7));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids keep increasing above the floor");
        assert!(g.high_water_ms() >= timestamp_ms(*ids.last().unwrap()) as u64);
    }

    #[test]
    fn raising_the_floor_never_moves_a_generator_back() {
        let g = IdGenerator::new(3);
        let first = g.next_id();
        g.raise_floor(now_ms() - 60_000).unwrap();
        let second = g.next_id();
        assert!(second > first, "a floor in the past changes nothing");
        let floor = now_ms() + 10_000;
        g.raise_floor(floor).unwrap();
        assert!(timestamp_ms(g.next_id()) > floor as i64, "a floor in the future is honoured at once");
        g.raise_floor(floor - 5_000).unwrap();
        assert!(timestamp_ms(g.next_id()) > floor as i64, "and a lower one does not undo it");
    }

    #[test]
    fn the_high_water_mark_covers_every_id_issued() {
        let g = IdGenerator::new(9);
        assert!(g.high_water_ms() <= now_ms(), "a fresh generator has issued nothing");
        for _ in 0..20_000 {
            let id = g.next_id();
            assert!(g.high_water_ms() as i64 >= timestamp_ms(id));
        }
        // A successor seeded with the mark issues only ids above every one of them.
        let successor = IdGenerator::with_floor(9, g.high_water_ms()).unwrap();
        assert!(timestamp_ms(successor.next_id()) > g.high_water_ms() as i64);
    }

    #[test]
    fn a_floor_beyond_the_id_space_is_refused() {
        assert_eq!(IdGenerator::with_floor(1, MAX_TIMESTAMP_MS).err(), Some(FloorOutOfRange(MAX_TIMESTAMP_MS)));
        assert_eq!(IdGenerator::new(1).raise_floor(u64::MAX), Err(FloorOutOfRange(u64::MAX)));
        let g = IdGenerator::with_floor(1, MAX_TIMESTAMP_MS - 1).unwrap();
        assert_eq!(timestamp_ms(g.next_id()), MAX_TIMESTAMP_MS as i64, "the last millisecond is still usable");
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
