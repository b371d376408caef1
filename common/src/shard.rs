//! Which shard a sender belongs to.
//!
//! `shard_of(uid, n) = fmix64(fnv1a64(uid as 8 little-endian bytes)) mod n`. Both functions are fixed
//! by their definitions (FNV-1a 64; MurmurHash3's 64-bit finalizer), so the mapping is identical in
//! every build, release and process (std's `DefaultHasher` makes no such promise). The finalizer
//! matters: FNV-1a's low bits depend only on the low bits of each input byte, so `fnv mod 2` put all
//! even user ids of a 256-block on one shard; after `fmix64` every output bit depends on every input
//! bit. Changing `n` moves most users to another shard, which is why resharding is an operator
//! procedure (see docs/OPERATIONS.md).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// MurmurHash3's 64-bit finalizer: an avalanche step so every output bit depends on every input bit.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shard (`0..shards`) that owns messages sent by `uid`.
pub fn shard_of(uid: u64, shards: u16) -> u16 {
    (fmix64(fnv1a64(&uid.to_le_bytes())) % u64::from(shards.max(1))) as u16
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

    const PINNED: [u16; 6] = [2, 2, 2, 1, 0, 2];

    #[test]
    fn shards_are_stable() {
        // Pinned values: a change here would silently move users between shards.
        assert_eq!([1, 2, 3, 1000, 10_000, 10_002].map(|u| shard_of(u, 4)), PINNED);
        assert_eq!(shard_of(42, 1), 0);
    }

    #[test]
    fn shards_are_balanced_for_sequential_even_and_strided_ids() {
        // Sequential ids, even ids only, and ids with a stride of 256 (the pattern FNV alone fails).
        for (name, ids) in [
            ("sequential", (1..=40_000u64).collect::<Vec<_>>()),
            ("even", (0..40_000u64).map(|i| 10_000 + 2 * i).collect()),
            ("stride 256", (0..40_000u64).map(|i| i * 256).collect()),
        ] {
            for n in [2u16, 3, 4, 8] {
                let mut counts = vec![0u32; n as usize];
                for &uid in &ids {
                    counts[shard_of(uid, n) as usize] += 1;
                }
                let expected = ids.len() as f64 / f64::from(n);
                assert!(
                    counts.iter().all(|&c| (f64::from(c) - expected).abs() < expected * 0.05),
                    "{name} ids over {n} shards unbalanced: {counts:?}"
                );
            }
        }
    }
}
