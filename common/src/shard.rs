//! Which shard a sender belongs to.
//!
//! `shard_of(uid, n) = fnv1a64(uid as 8 little-endian bytes) mod n`. FNV-1a is fixed by its definition,
//! so the mapping is identical in every build, release and process (std's `DefaultHasher` makes no such
//! promise). Hashing first spreads sequential user ids evenly. Changing `n` moves most users to another
//! shard, which is why resharding is an operator procedure (see docs/OPERATIONS.md).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// The shard (`0..shards`) that owns messages sent by `uid`.
pub fn shard_of(uid: u64, shards: u16) -> u16 {
    (fnv1a64(&uid.to_le_bytes()) % u64::from(shards.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_published_fnv1a() {
        // Reference vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shards_are_stable_and_balanced() {
        // Pinned values: a change here would silently move users between shards.
        assert_eq!([1, 2, 3, 1000].map(|u| shard_of(u, 4)), [0, 3, 2, 0]);
        assert_eq!(shard_of(42, 1), 0);
        let mut counts = [0u32; 8];
        for uid in 1..=80_000u64 {
            counts[shard_of(uid, 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "unbalanced: {counts:?}");
    }
}
