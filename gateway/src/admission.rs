//! Admission control (two-phase modes): whether a new message may enter its shard's stream, decided
//! from figures kept in memory, never a query per message.
//!
//! Three refusals, each answered `server_busy` at once:
//! - `backlog`: the shard holds `two_phase.max_backlog` unsaved entries (memory stays bounded
//!   whatever happens downstream, outages included);
//! - `drain` (`gateway.shed_wait_ms`; 0 turns it off): the shard's oldest unsaved message has waited
//!   longer than that, the shard drains, and that wait is not falling. Admitting more would only make
//!   every admitted message wait longer. Refusing stops once the oldest waits less than half the
//!   bound. A shard that drains nothing (its worker or MySQL is away) is not refused for this:
//!   absorbing outages is what the stream is for; nor is one whose oldest wait falls (it catches up
//!   after a stall or a takeover);
//! - `overload`: the append round trip's standing level is past
//!   `gateway.shed_append_ms` (Redis or this process cannot keep up).
//!
//! A background task refreshes the per-shard figures every [`REFRESH`]: one pipelined round of
//! `XINFO STREAM` of each shard's two streams (one slot per shard on a cluster). Stream ids carry
//! Redis's clock, so the oldest wait is measured on one clock, whatever the gateway's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use im_common::config::Config;
use im_common::connections::RedisConn;
use im_common::keys::Keys;
use redis::Value;

/// How often the per-shard figures are refreshed.
const REFRESH: Duration = Duration::from_millis(100);

/// How long one round-trip window lasts.
const WINDOW_MS: u64 = 100;

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Backlog,
    /// The shard's oldest unsaved message waits too long.
    Drain,
    /// The append round trip stands too high.
    Overload,
}

impl Refusal {
    pub fn cause(self) -> &'static str {
        match self {
            Refusal::Backlog => "backlog",
            Refusal::Drain => "drain",
            Refusal::Overload => "overload",
        }
    }
}

/// The per-shard figures and the bounds they are held to.
pub struct Admission {
    max_backlog: u64,
    shed_append: Duration,
    shed_wait: Duration,
    shards: Vec<ShardLoad>,
    pressure: Pressure,
}

impl Admission {
    pub fn new(cfg: &Config) -> Self {
        Admission {
            max_backlog: cfg.two_phase.max_backlog,
            shed_append: Duration::from_millis(cfg.gateway.shed_append_ms),
            shed_wait: Duration::from_millis(cfg.gateway.shed_wait_ms),
            shards: (0..cfg.cluster.shards).map(|_| ShardLoad::default()).collect(),
            pressure: Pressure::default(),
        }
    }

    /// Whether a new message for `shard` is refused, and why.
    pub fn check(&self, shard: u16) -> Option<Refusal> {
        let load = &self.shards[usize::from(shard)];
        if load.backlog.load(Ordering::Relaxed) >= self.max_backlog {
            return Some(Refusal::Backlog);
        }
        if load.refusing.load(Ordering::Relaxed) {
            return Some(Refusal::Drain);
        }
        if !self.shed_append.is_zero() && self.pressure.standing() >= self.shed_append {
            return Some(Refusal::Overload);
        }
        None
    }

    /// Records how long an append that Redis answered took.
    pub fn appended(&self, round_trip: Duration) {
        self.pressure.record(round_trip);
    }

    /// The per-shard backlog figures as last refreshed (unsaved entries per shard).
    pub fn backlog(&self) -> Vec<u64> {
        self.shards.iter().map(|s| s.backlog.load(Ordering::Relaxed)).collect()
    }

    /// Keeps the per-shard figures current: unsaved messages = the accepted stream's length plus
    /// the messages in to_save's entries (`Keys::to_save_messages`; both are trimmed as entries move
    /// on); arrivals from the accepted stream's `entries-added`;
    /// the oldest unsaved message's wait from the first entries of both. Runs until the process
    /// ends.
    pub async fn refresh(&self, mut conn: RedisConn, keys: Keys) {
        loop {
            // A stream that does not exist yet (no message, no worker) answers XINFO with an
            // error: it must not void the figures of the others.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for shard in 0..self.shards.len() as u16 {
                pipe.cmd("XINFO").arg("STREAM").arg(keys.accepted_stream(shard));
                pipe.cmd("XINFO").arg("STREAM").arg(keys.to_save_stream(shard));
                pipe.get(keys.to_save_messages(shard));
            }
            if let Ok(replies) = pipe.query_async::<Vec<Value>>(&mut conn).await {
                for (shard, figures) in replies.chunks(3).enumerate() {
                    let Some(accepted) = stream_figures(&figures[0]) else { continue };
                    let to_save = stream_figures(&figures[1]).unwrap_or_default();
                    let handed: u64 = redis::from_redis_value_ref(&figures[2]).unwrap_or(0);
                    let backlog = accepted.length + handed;
                    // Now, on Redis's clock: the newest id either stream generated (arrivals go on
                    // while it matters: a shard nothing arrives at is not refused anyway). An entry
                    // moved to the to-save stream gets a new id there: the oldest's wait is about
                    // the oldest undelivered's age plus the oldest handed-over's.
                    let now_ms = accepted.last_ms.max(to_save.last_ms);
                    let age = |first: Option<u64>| {
                        first.map_or(Duration::ZERO, |first| Duration::from_millis(now_ms.saturating_sub(first)))
                    };
                    let wait = age(accepted.first_ms) + age(to_save.first_ms);
                    let sample = Sample { added: accepted.added, backlog, wait };
                    if let Some(refusing) = self.shards[shard].update(sample, self.shed_wait) {
                        log_change(shard, &sample, refusing);
                    }
                    metrics::gauge!("im_gateway_shard_backlog", "shard" => shard.to_string()).set(backlog as f64);
                    metrics::gauge!("im_gateway_shard_oldest_wait_seconds", "shard" => shard.to_string())
                        .set(wait.as_secs_f64());
                }
            }
            tokio::time::sleep(REFRESH).await;
        }
    }
}

/// What `XINFO STREAM` tells of a stream.
#[derive(Default)]
struct StreamFigures {
    length: u64,
    added: u64,
    /// The first entry's id time, if there is an entry.
    first_ms: Option<u64>,
    /// The time of the last id the stream generated.
    last_ms: u64,
}

/// `length`, `entries-added`, `first-entry` and `last-generated-id` from an `XINFO STREAM` reply
/// (a map in RESP3, pairs in RESP2).
fn stream_figures(reply: &Value) -> Option<StreamFigures> {
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items.chunks(2).filter(|p| p.len() == 2).map(|p| (&p[0], &p[1])).collect(),
        _ => return None,
    };
    let field = |name: &str| {
        pairs.iter().find_map(|(k, v)| (redis::from_redis_value_ref::<String>(k).ok()? == name).then_some(*v))
    };
    let number = |name: &str| field(name).and_then(|v| redis::from_redis_value_ref::<u64>(v).ok());
    Some(StreamFigures {
        length: number("length")?,
        added: number("entries-added")?,
        first_ms: field("first-entry").and_then(entry_ms),
        last_ms: field("last-generated-id").and_then(id_ms).unwrap_or(0),
    })
}

/// The time part of an entry's id (`<ms>-<seq>`), from an entry `[id, fields]`.
fn entry_ms(entry: &Value) -> Option<u64> {
    let Value::Array(parts) = entry else { return None };
    id_ms(parts.first()?)
}

/// The time part of a stream id (`<ms>-<seq>`).
fn id_ms(id: &Value) -> Option<u64> {
    let id = redis::from_redis_value_ref::<String>(id).ok()?;
    id.split_once('-')?.0.parse().ok()
}

/// One shard's figures: its backlog, and whether it is refused for what its messages wait.
#[derive(Default)]
struct ShardLoad {
    backlog: AtomicU64,
    refusing: AtomicBool,
    /// The last refresh, and whether the shard was stalled at it.
    last: Mutex<Option<(Sample, bool)>>,
}

/// One refresh of a shard.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Entries ever added to the accepted stream.
    added: u64,
    /// Unsaved entries.
    backlog: u64,
    /// How long the oldest unsaved entry has waited.
    wait: Duration,
}

impl ShardLoad {
    /// Takes a refresh. Refusing starts once the oldest unsaved message waited longer than `bound`
    /// while the shard drained over the last two refreshes and that wait did not fall; it stops
    /// once the wait is below half of `bound`, or nothing drained since the last refresh (an
    /// outage: absorbed, not refused). The first refresh after a stall never starts it: the catch-up
    /// has removed entries, not yet the oldest. Returns whether the shard is refused when that
    /// changes. A zero `bound` (refusing by drain is off) only records the backlog.
    fn update(&self, now: Sample, bound: Duration) -> Option<bool> {
        self.backlog.store(now.backlog, Ordering::Relaxed);
        if bound.is_zero() {
            return None;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // The first refresh has nothing to compare with: it counts as a stall.
        let Some((before, stalled_before)) = *last else {
            *last = Some((now, true));
            return None;
        };
        // Whether anything drained since the last refresh: if not, the shard is stalled or in an
        // outage (its owner died, MySQL is away).
        let stalled = before.backlog + now.added.saturating_sub(before.added) <= now.backlog;
        *last = Some((now, stalled));
        let was = self.refusing.load(Ordering::Relaxed);
        let refusing = !stalled
            && if was { now.wait > bound / 2 } else { !stalled_before && now.wait > bound && now.wait >= before.wait };
        self.refusing.store(refusing, Ordering::Relaxed);
        (refusing != was).then_some(refusing)
    }
}

/// Logs a shard's refusing by drain starting or stopping.
fn log_change(shard: usize, sample: &Sample, refusing: bool) {
    let (backlog, wait_ms) = (sample.backlog, sample.wait.as_millis() as u64);
    if refusing {
        tracing::warn!(shard, backlog, wait_ms, "shard's oldest unsaved message waits too long: refusing new messages");
    } else {
        tracing::info!(shard, backlog, wait_ms, "shard drains again: admitting");
    }
}

/// The append round trip's standing level: the lowest round trip of each [`WINDOW_MS`] window. A
/// standing queue (Redis, the network or this process cannot keep up) raises the minimum; a burst,
/// which also makes some appends slow, does not. A window without appends reads as 0.
#[derive(Default)]
struct Pressure {
    window_start_ms: AtomicU64,
    window_min_us: AtomicU64,
    standing_us: AtomicU64,
}

impl Pressure {
    fn record(&self, round_trip: Duration) {
        self.roll();
        self.window_min_us.fetch_min(round_trip.as_micros() as u64, Ordering::Relaxed);
    }

    fn standing(&self) -> Duration {
        self.roll();
        Duration::from_micros(self.standing_us.load(Ordering::Relaxed))
    }

    fn roll(&self) {
        let now = im_common::ids::now_ms();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) < WINDOW_MS
            || self.window_start_ms.compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let min = self.window_min_us.swap(u64::MAX, Ordering::Relaxed);
        let standing = if min == u64::MAX { 0 } else { min };
        self.standing_us.store(standing, Ordering::Relaxed);
        metrics::gauge!("im_gateway_append_standing_seconds").set(standing as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_window() {
        std::thread::sleep(Duration::from_millis(WINDOW_MS + 20));
    }

    #[test]
    fn the_standing_round_trip_is_the_lowest_of_the_last_window() {
        let p = Pressure::default();
        p.standing(); // opens the first window
        for ms in [80, 5, 60] {
            p.record(Duration::from_millis(ms));
        }
        next_window();
        assert_eq!(p.standing(), Duration::from_millis(5), "one fast append shows there is no standing queue");
    }

    #[test]
    fn a_window_of_only_slow_appends_raises_the_standing_level() {
        let p = Pressure::default();
        p.standing();
        for ms in [70, 55, 90] {
            p.record(Duration::from_millis(ms));
        }
        next_window();
        assert_eq!(p.standing(), Duration::from_millis(55));
        // A window without appends reads as 0: nothing is queued.
        next_window();
        assert_eq!(p.standing(), Duration::ZERO);
    }

    fn admission(bound_ms: u64) -> Admission {
        let mut cfg = Config::default();
        cfg.cluster.shards = 1;
        cfg.gateway.shed_wait_ms = bound_ms;
        cfg.gateway.shed_append_ms = 0;
        Admission::new(&cfg)
    }

    /// Feeds refreshes: (entries ever added, backlog, oldest wait in ms).
    fn feed(a: &Admission, samples: &[(u64, u64, u64)]) {
        for &(added, backlog, wait_ms) in samples {
            let sample = Sample { added, backlog, wait: Duration::from_millis(wait_ms) };
            a.shards[0].update(sample, a.shed_wait);
        }
    }

    #[test]
    fn an_oldest_wait_that_grows_past_the_bound_while_draining_refuses_until_it_is_below_half() {
        let a = admission(250);
        // 1,000 arrive and 800 drain per refresh: the backlog and its oldest wait grow.
        feed(&a, &[(0, 0, 0), (1_000, 200, 100), (2_000, 400, 200)]);
        assert_eq!(a.check(0), None, "200 ms is within the bound");
        feed(&a, &[(3_000, 600, 300)]);
        assert_eq!(a.check(0), Some(Refusal::Drain), "300 ms and growing");
        // Refused: nothing arrives, 300 drain per refresh.
        feed(&a, &[(3_000, 300, 200)]);
        assert_eq!(a.check(0), Some(Refusal::Drain), "still more than half the bound");
        feed(&a, &[(3_000, 0, 0)]);
        assert_eq!(a.check(0), None, "drained");
        assert_eq!(a.backlog(), vec![0]);
    }

    #[test]
    fn an_outage_is_absorbed_and_the_catch_up_after_it_is_not_refused() {
        let a = admission(250);
        // 1,000 arrive per refresh and nothing drains (the owner died, MySQL is away): the oldest
        // waits longer and longer.
        feed(&a, &[(0, 0, 0), (1_000, 1_000, 100), (2_000, 2_000, 200), (3_000, 3_000, 300), (4_000, 4_000, 400)]);
        assert_eq!(a.check(0), None, "nothing drains: the stream absorbs it");
        // A standby takes over (or MySQL is back): its first commits remove entries, not yet the
        // oldest, whose wait still grows.
        feed(&a, &[(4_500, 3_500, 450)]);
        assert_eq!(a.check(0), None, "the first refresh after a stall is not overload");
        // It catches up: the oldest wait falls while still past the bound.
        for (k, wait) in [350, 300, 260].into_iter().enumerate() {
            let added = 5_000 + 500 * k as u64;
            feed(&a, &[(added, 3_000 - 500 * k as u64, wait)]);
            assert_eq!(a.check(0), None, "catching up at {wait} ms is recovery, not overload");
        }
    }

    #[test]
    fn a_refused_shard_that_stops_draining_is_admitted_again() {
        let a = admission(250);
        feed(&a, &[(0, 0, 0), (1_000, 200, 200), (2_000, 400, 300)]);
        assert_eq!(a.check(0), Some(Refusal::Drain));
        feed(&a, &[(2_500, 900, 400)]);
        assert_eq!(a.check(0), None, "nothing drained: an outage began, absorbed");
    }

    #[test]
    fn a_zero_bound_never_refuses_by_drain_but_keeps_the_backlog() {
        let a = admission(0);
        feed(&a, &[(0, 0, 0), (1_000, 500, 1_000), (2_000, 1_000, 2_000)]);
        assert_eq!(a.check(0), None);
        assert_eq!(a.backlog(), vec![1_000]);
    }

    #[test]
    fn stream_figures_read_the_first_and_last_ids_of_resp2_and_resp3_replies() {
        let entry = Value::Array(vec![Value::BulkString(b"1700000000123-4".to_vec()), Value::Array(vec![])]);
        let last = Value::BulkString(b"1700000000456-0".to_vec());
        let pairs = [
            ("length", Value::Int(3)),
            ("entries-added", Value::Int(10)),
            ("first-entry", entry.clone()),
            ("last-generated-id", last),
        ];
        let resp2 = Value::Array(
            pairs.iter().flat_map(|(k, v)| [Value::BulkString(k.as_bytes().to_vec()), v.clone()]).collect(),
        );
        let resp3 = Value::Map(pairs.iter().map(|(k, v)| (Value::SimpleString((*k).to_owned()), v.clone())).collect());
        for reply in [resp2, resp3] {
            let f = stream_figures(&reply).expect("figures");
            assert_eq!((f.length, f.added, f.first_ms, f.last_ms), (3, 10, Some(1_700_000_000_123), 1_700_000_000_456));
        }
        assert!(stream_figures(&Value::Nil).is_none(), "a stream that does not exist has no figures");
    }
}
