//! Admission control (two-phase modes): whether a new message may enter its shard's stream, decided
//! from figures kept in memory, never a query per message.
//!
//! Three refusals, each answered `server_busy` at once:
//! - `backlog`: the shard holds `two_phase.max_backlog` unsaved entries (memory stays bounded
//!   whatever happens downstream, outages included);
//! - `overload` by wait: the shard drains, but more arrives than it drains and what is queued
//!   already takes longer than `gateway.shed_wait_ms` to drain. Admitting more would only make every
//!   admitted message wait longer. A shard that drains nothing (its worker or MySQL is away) is not
//!   refused for this: absorbing outages is what the stream is for; nor is one draining a backlog
//!   faster than it grows (recovery);
//! - `overload` by round trip: the append round trip's standing level is past
//!   `gateway.shed_append_ms` (Redis or this process cannot keep up).
//!
//! A background task refreshes the per-shard figures (one pipelined `XINFO STREAM` + `XLEN` round
//! per shard every [`REFRESH`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use im_common::config::Config;
use im_common::connections::RedisConn;
use im_common::keys::Keys;
use redis::Value;

/// How often the per-shard figures are refreshed.
const REFRESH: Duration = Duration::from_millis(250);

/// The span over which arrival and drain rates are measured.
const RATE_SPAN: Duration = Duration::from_secs(1);

/// How long one round-trip window lasts.
const WINDOW_MS: u64 = 100;

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Backlog,
    Overload,
}

impl Refusal {
    pub fn cause(self) -> &'static str {
        match self {
            Refusal::Backlog => "backlog",
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
        if !self.shed_wait.is_zero() && load.waiting_us.load(Ordering::Relaxed) > self.shed_wait.as_micros() as u64 {
            return Some(Refusal::Overload);
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

    /// Keeps the per-shard figures current: unsaved entries = accepted + to_save stream lengths
    /// (both are trimmed as entries move on); arrivals from the accepted stream's `entries-added`.
    /// Runs until the process ends.
    pub async fn refresh(&self, mut conn: RedisConn, keys: Keys) {
        loop {
            let mut pipe = redis::pipe();
            for shard in 0..self.shards.len() as u16 {
                pipe.cmd("XINFO").arg("STREAM").arg(keys.accepted_stream(shard));
                pipe.xlen(keys.to_save_stream(shard));
            }
            if let Ok(replies) = pipe.query_async::<Vec<Value>>(&mut conn).await {
                let now = Instant::now();
                for (shard, pair) in replies.chunks(2).enumerate() {
                    let Some((accepted_len, added)) = stream_figures(&pair[0]) else { continue };
                    let to_save_len = redis::from_redis_value_ref::<u64>(&pair[1]).unwrap_or(0);
                    let backlog = accepted_len + to_save_len;
                    self.shards[shard].update(now, added, backlog);
                    metrics::gauge!("im_gateway_shard_backlog", "shard" => shard.to_string()).set(backlog as f64);
                }
            }
            tokio::time::sleep(REFRESH).await;
        }
    }
}

/// `length` and `entries-added` from an `XINFO STREAM` reply (a map in RESP3, pairs in RESP2).
fn stream_figures(reply: &Value) -> Option<(u64, u64)> {
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items.chunks(2).filter(|p| p.len() == 2).map(|p| (&p[0], &p[1])).collect(),
        _ => return None,
    };
    let field = |name: &str| {
        pairs.iter().find_map(|(k, v)| {
            let key = redis::from_redis_value_ref::<String>(k).ok()?;
            (key == name).then(|| redis::from_redis_value_ref::<u64>(v).ok()).flatten()
        })
    };
    Some((field("length")?, field("entries-added")?))
}

/// One shard's figures: its backlog, and how long that backlog takes to drain while it grows.
#[derive(Default)]
struct ShardLoad {
    backlog: AtomicU64,
    /// Estimated time to drain the backlog (µs), while more arrives than drains; 0 otherwise.
    waiting_us: AtomicU64,
    /// (when, entries ever added, backlog) over the last [`RATE_SPAN`].
    samples: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl ShardLoad {
    fn update(&self, now: Instant, added: u64, backlog: u64) {
        self.backlog.store(backlog, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now, added, backlog));
        while samples.len() > 2 && now.duration_since(samples[1].0) >= RATE_SPAN {
            samples.pop_front();
        }
        let (then, added_then, backlog_then) = samples[0];
        let waiting = drain_time(now.duration_since(then), added.saturating_sub(added_then), backlog_then, backlog);
        self.waiting_us.store(waiting.map_or(0, |w| w.as_micros() as u64), Ordering::Relaxed);
    }
}

/// How long `backlog_now` takes to drain at the rate it drained over `span`, if more `arrived` than
/// drained (the backlog grew) and some did drain; `None` otherwise (idle, outage or recovery).
fn drain_time(span: Duration, arrived: u64, backlog_then: u64, backlog_now: u64) -> Option<Duration> {
    let drained = (backlog_then + arrived).saturating_sub(backlog_now);
    if span.is_zero() || drained == 0 || backlog_now <= backlog_then {
        return None;
    }
    let per_sec = drained as f64 / span.as_secs_f64();
    Some(Duration::from_secs_f64(backlog_now as f64 / per_sec))
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

    #[test]
    fn a_growing_backlog_that_drains_slower_than_it_fills_has_a_wait() {
        // 1 s: 12,000 arrived, the backlog went 1,000 → 3,000, so 10,000 drained: 3,000 take 0.3 s.
        let wait = drain_time(Duration::from_secs(1), 12_000, 1_000, 3_000);
        assert_eq!(wait, Some(Duration::from_millis(300)));
    }

    #[test]
    fn outages_recoveries_and_idleness_have_no_wait() {
        let s = Duration::from_secs(1);
        assert_eq!(drain_time(s, 5_000, 1_000, 6_000), None, "nothing drained: an outage, absorbed");
        assert_eq!(drain_time(s, 5_000, 20_000, 10_000), None, "the backlog shrinks: recovery");
        assert_eq!(drain_time(s, 0, 0, 0), None, "idle");
    }

    #[test]
    fn the_wait_refuses_only_past_its_bound() {
        let mut cfg = Config::default();
        cfg.cluster.shards = 1;
        cfg.gateway.shed_wait_ms = 250;
        cfg.gateway.shed_append_ms = 0;
        let a = Admission::new(&cfg);
        let t0 = Instant::now();
        a.shards[0].update(t0, 0, 1_000);
        a.shards[0].update(t0 + Duration::from_secs(1), 12_000, 2_000);
        assert_eq!(a.check(0), None, "2,000 drain in 0.18 s at 11,000/s");
        a.shards[0].update(t0 + Duration::from_secs(2), 24_000, 5_000);
        assert_eq!(a.check(0), Some(Refusal::Overload), "5,000 take 0.56 s at 9,000/s");
    }
}
