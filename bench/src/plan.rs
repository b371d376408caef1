//! Who talks to whom, through which gateway, and when: fixed sender → receiver pairs.
//!
//! Pair `i` is sender `base + i` → receiver `base + pairs + i`: the senders are one contiguous id
//! block, which `shard_of` spreads evenly over any number of shards.
//!
//! Each user lands on a gateway by a salted hash of its id (the splitmix64 finalizer), not
//! `uid % gateways`, which would tie the gateway to the id's low bits; the salt keeps the gateway
//! independent of the shard.
//!
//! Senders do not tick together: each starts at its own hashed offset within one interval, which
//! spreads the offered load evenly over time (an open-loop schedule, seed §5.1).

use std::time::Duration;

/// One sender → receiver pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub index: usize,
    pub sender: u64,
    pub receiver: u64,
    /// Index into the target's gateway list.
    pub sender_gateway: usize,
    pub receiver_gateway: usize,
    /// When the sender's first message goes out, after the start of sending.
    pub offset: Duration,
}

/// The pairs of a run of `connections` users starting at `base_uid`.
pub fn pairs(base_uid: u64, connections: usize, gateways: usize, interval: Duration) -> Vec<Pair> {
    let pairs = connections / 2;
    (0..pairs)
        .map(|i| {
            let sender = base_uid + i as u64;
            let receiver = base_uid + (pairs + i) as u64;
            Pair {
                index: i,
                sender,
                receiver,
                sender_gateway: gateway_of(sender, gateways),
                receiver_gateway: gateway_of(receiver, gateways),
                offset: send_offset(sender, interval),
            }
        })
        .collect()
}

/// Salts for the independent choices made per user.
const GATEWAY_SALT: u64 = 0x6761_7465_7761_7921;
const OFFSET_SALT: u64 = 0x6f66_6673_6574_2121;
const DEVICES_SALT: u64 = 0x6465_7669_6365_7321;
const POSITIONS_SALT: u64 = 0x706f_7369_7469_6f6e;

/// `salted_hash` as a fraction in [0, 1).
fn unit(uid: u64, salt: u64) -> f64 {
    (salted_hash(uid, salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// How many devices receiving user `uid` has: 2 for about `two_devices` of the users, else 1.
pub fn devices_of(uid: u64, two_devices: f64) -> u8 {
    if unit(uid, DEVICES_SALT) < two_devices {
        2
    } else {
        1
    }
}

/// Whether device `device` of `uid` (one of `devices`) syncs with its own positions: always on a
/// user with several devices (the server's positions are per user, docs/PROTOCOL.md), else for
/// about `own_positions` of the devices.
pub fn own_positions(uid: u64, device: u8, devices: u8, own_positions: f64) -> bool {
    devices > 1 || unit(uid ^ u64::from(device) << 56, POSITIONS_SALT) < own_positions
}

/// The gateway of device `device` of `uid`: the user's own for device 0, the next ones after it for
/// the others (two devices of one user on two gateways, when there are two).
pub fn device_gateway(uid: u64, device: u8, gateways: usize) -> usize {
    (gateway_of(uid, gateways) + usize::from(device)) % gateways.max(1)
}

/// The splitmix64 finalizer of `uid ^ salt`: fixed by its constants, so stable in every build.
fn salted_hash(uid: u64, salt: u64) -> u64 {
    let mut z = uid ^ salt;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The gateway (`0..gateways`) user `uid` connects to: stable across runs and processes.
pub fn gateway_of(uid: u64, gateways: usize) -> usize {
    (salted_hash(uid, GATEWAY_SALT) % gateways.max(1) as u64) as usize
}

/// The sender's first-send offset within `[0, interval)`, at microsecond resolution.
pub fn send_offset(uid: u64, interval: Duration) -> Duration {
    let span = interval.as_micros().max(1) as u64;
    Duration::from_micros(salted_hash(uid, OFFSET_SALT) % span)
}

/// A base user id no earlier run has used: current Unix milliseconds × [`crate::spec::MAX_CONNECTIONS`].
/// Runs started at least a millisecond apart get disjoint id blocks, so idempotency windows and rows
/// of earlier runs never collide with this one's (about 1.8·10^17 today, well inside `u64`).
pub fn fresh_base_uid() -> u64 {
    im_common::ids::now_ms() * crate::spec::MAX_CONNECTIONS as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_and_receivers_are_two_id_blocks_balanced_over_gateways() {
        let ps = pairs(1_000_000, 20_000, 4, Duration::from_secs(3));
        assert_eq!(ps.len(), 10_000);
        assert_eq!((ps[3].sender, ps[3].receiver), (1_000_003, 1_010_003));
        let mut senders = [0usize; 4];
        let mut receivers = [0usize; 4];
        for p in &ps {
            senders[p.sender_gateway] += 1;
            receivers[p.receiver_gateway] += 1;
        }
        for count in senders.iter().chain(&receivers) {
            assert!((2_300..2_700).contains(count), "unbalanced: senders {senders:?} receivers {receivers:?}");
        }
    }

    #[test]
    fn senders_spread_evenly_over_shards() {
        // `shard_of` mixes its input, so a run's contiguous sender block spreads like random
        // assignment: within ±20 % of the fair share once there are a few hundred per shard.
        for base in [fresh_base_uid(), 10_000, 1 << 40] {
            for (senders, shards) in [(1000usize, 2u16), (1000, 4), (2000, 8)] {
                let mut counts = vec![0usize; usize::from(shards)];
                for p in pairs(base, 2 * senders, 2, Duration::from_secs(1)) {
                    counts[usize::from(im_common::shard::shard_of(p.sender, shards))] += 1;
                }
                let fair = senders / usize::from(shards);
                assert!(
                    counts.iter().all(|&c| c.abs_diff(fair) <= fair / 5),
                    "base {base}: {senders} senders over {shards} shards: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn offsets_spread_over_the_interval_and_are_stable() {
        let interval = Duration::from_millis(3000);
        let ps = pairs(42, 10_000, 2, interval);
        assert!(ps.iter().all(|p| p.offset < interval));
        let mut buckets = [0usize; 10];
        for p in &ps {
            buckets[(p.offset.as_millis() / 300) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (400..600).contains(&b)), "offsets bunch up: {buckets:?}");
        assert_eq!(pairs(42, 10_000, 2, interval), ps, "the plan is a pure function of its inputs");
    }

    #[test]
    fn about_the_asked_share_of_users_have_two_devices_and_they_sync_on_their_own() {
        let two = (0..10_000u64).filter(|&u| devices_of(u, 1.0 / 3.0) == 2).count();
        assert!((3_000..3_700).contains(&two), "{two} of 10000");
        assert!((0..1000u64).all(|u| devices_of(u, 0.0) == 1));
        let own = (0..10_000u64).filter(|&u| own_positions(u, 0, 1, 0.5)).count();
        assert!((4_600..5_400).contains(&own), "{own} of 10000");
        assert!((0..1000u64).all(|u| own_positions(u, 1, 2, 0.0)), "several devices: always their own");
        assert_eq!(device_gateway(5, 1, 2), 1 - device_gateway(5, 0, 2), "two devices, two gateways");
    }

    #[test]
    fn gateway_choice_is_independent_of_the_shard() {
        // With 2 gateways and 2 shards, any FNV-1a-based choice makes gateway == shard for every user.
        let same =
            (1..=10_000u64).filter(|&u| gateway_of(u, 2) == usize::from(im_common::shard::shard_of(u, 2))).count();
        assert!((4_500..5_500).contains(&same), "gateway follows shard for {same} of 10000 users");
    }
}
