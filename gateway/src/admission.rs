//! Admission control (two-phase modes): whether a new message may enter its shard's stream, decided
//! from figures kept in memory, never a query per message.
//!
//! Three refusals, each answered `server_busy` at once:
//! - `backlog`: the shard holds `two_phase.max_backlog` unsaved entries (memory stays bounded
//!   whatever happens downstream, outages included);
//! - `drain` (when `gateway.shed_wait_ms` is set; off by default, because the first second of a
//!   shard owner's takeover looks the same): the shard drains, but its backlog keeps growing (for [`SUSTAINED`] refreshes in a row)
//!   and already takes longer than `gateway.shed_wait_ms` to drain. Admitting more would only make
//!   every admitted message wait longer. Refusing stops once the backlog drains within half that.
//!   A shard that drains nothing (its worker or MySQL is away) is not refused for this: absorbing
//!   outages is what the stream is for; nor is one that drains a backlog faster than it grows
//!   (recovery);
//! - `overload`: the append round trip's standing level is past
//!   `gateway.shed_append_ms` (Redis or this process cannot keep up).
//!
//! A background task refreshes the per-shard figures (one pipelined `XINFO STREAM` + `XLEN` round
//! per shard every [`REFRESH`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use im_common::config::Config;
use im_common::connections::RedisConn;
use im_common::keys::Keys;
use redis::Value;

/// How often the per-shard figures are refreshed.
const REFRESH: Duration = Duration::from_millis(250);

/// The span over which the drain rate is measured.
const RATE_SPAN: Duration = Duration::from_secs(1);

/// Refreshes in a row with a growing backlog before the wait can refuse messages.
const SUSTAINED: u32 = 3;

/// How long one round-trip window lasts.
const WINDOW_MS: u64 = 100;

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Backlog,
    /// The backlog takes too long to drain.
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

    /// Keeps the per-shard figures current: unsaved entries = accepted + to_save stream lengths
    /// (both are trimmed as entries move on); arrivals from the accepted stream's `entries-added`.
    /// Runs until the process ends.
    pub async fn refresh(&self, mut conn: RedisConn, keys: Keys) {
        loop {
            // A stream that does not exist yet (no message, no worker) answers XINFO with an
            // error: it must not void the figures of the others.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
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
                    if let Some(change) = self.shards[shard].update(now, added, backlog, self.shed_wait) {
                        log_change(shard, backlog, change);
                    }
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

/// One shard's figures: its backlog, and whether it is refused for what it takes to drain.
#[derive(Default)]
struct ShardLoad {
    backlog: AtomicU64,
    refusing: AtomicBool,
    trend: Mutex<Trend>,
}

/// The recent samples of one shard and the state of its wait-based refusal.
#[derive(Default)]
struct Trend {
    /// (when, entries ever added, backlog) over the last [`RATE_SPAN`].
    samples: VecDeque<(Instant, u64, u64)>,
    /// Consecutive refreshes in which the backlog grew.
    growing: u32,
}

impl ShardLoad {
    /// Takes a refresh. Refusing starts once the backlog grew [`SUSTAINED`] refreshes in a row
    /// (a stall of MySQL for a moment is not overload) and would take longer than `bound` to drain;
    /// it stops once the backlog drains within half of `bound`, or nothing drained since the last
    /// refresh (an outage: absorbed, not refused).
    /// Returns the estimated wait when refusing starts or stops (`Some((refusing, wait))`).
    /// A zero `bound` (refusing by drain is off) only records the backlog.
    fn update(&self, now: Instant, added: u64, backlog: u64, bound: Duration) -> Option<(bool, Duration)> {
        let before = self.backlog.swap(backlog, Ordering::Relaxed);
        if bound.is_zero() {
            return None;
        }
        let mut trend = self.trend.lock().unwrap_or_else(|p| p.into_inner());
        // Whether anything drained since the last refresh: if not, the shard is stalled or in an
        // outage (its owner died, MySQL is away), even while the rate window still holds drain.
        let stalled = trend
            .samples
            .back()
            .is_some_and(|&(_, added_before, before)| before + added.saturating_sub(added_before) <= backlog);
        // Growth counts only while the shard drains: what piled up in an outage is not overload.
        trend.growing = if backlog > before && !stalled { trend.growing + 1 } else { 0 };
        trend.samples.push_back((now, added, backlog));
        while trend.samples.len() > 2 && now.duration_since(trend.samples[1].0) >= RATE_SPAN {
            trend.samples.pop_front();
        }
        let (then, added_then, backlog_then) = trend.samples[0];
        let wait = drain_time(now.duration_since(then), added.saturating_sub(added_then), backlog_then, backlog);
        let was = self.refusing.load(Ordering::Relaxed);
        let refusing = match wait {
            None => false,
            Some(_) if stalled => false,
            Some(wait) if was => wait > bound / 2,
            Some(wait) => wait > bound && trend.growing >= SUSTAINED,
        };
        self.refusing.store(refusing, Ordering::Relaxed);
        (refusing != was).then(|| (refusing, wait.unwrap_or_default()))
    }
}

/// Logs a shard's refusing by drain starting or stopping.
fn log_change(shard: usize, backlog: u64, (refusing, wait): (bool, Duration)) {
    let wait_ms = wait.as_millis() as u64;
    if refusing {
        tracing::warn!(shard, backlog, wait_ms, "shard backlog keeps growing: refusing new messages");
    } else {
        tracing::info!(shard, backlog, wait_ms, "shard backlog drains again: admitting");
    }
}

/// How long `backlog_now` takes to drain at the rate it drained over `span`; `None` when nothing
/// drained (idle, or an outage).
fn drain_time(span: Duration, arrived: u64, backlog_then: u64, backlog_now: u64) -> Option<Duration> {
    let drained = (backlog_then + arrived).saturating_sub(backlog_now);
    if span.is_zero() || drained == 0 {
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
    fn the_wait_is_the_backlog_over_the_drain_rate() {
        // 1 s: 12,000 arrived, the backlog went 1,000 → 3,000, so 10,000 drained: 3,000 take 0.3 s.
        assert_eq!(drain_time(Duration::from_secs(1), 12_000, 1_000, 3_000), Some(Duration::from_millis(300)));
        assert_eq!(drain_time(Duration::from_secs(1), 5_000, 1_000, 6_000), None, "nothing drained: an outage");
        assert_eq!(drain_time(Duration::from_secs(1), 0, 0, 0), None, "idle");
    }

    fn admission(bound_ms: u64) -> Admission {
        let mut cfg = Config::default();
        cfg.cluster.shards = 1;
        cfg.gateway.shed_wait_ms = bound_ms;
        cfg.gateway.shed_append_ms = 0;
        Admission::new(&cfg)
    }

    /// Feeds refreshes 250 ms apart, the first at `t0 + REFRESH × first`: (entries ever added, backlog).
    fn feed(a: &Admission, t0: Instant, first: u32, samples: &[(u64, u64)]) {
        for (k, &(added, backlog)) in samples.iter().enumerate() {
            a.shards[0].update(t0 + REFRESH * (first + k as u32), added, backlog, a.shed_wait);
        }
    }

    #[test]
    fn a_backlog_that_keeps_growing_past_the_bound_refuses_until_it_drains() {
        let a = admission(250);
        let t0 = Instant::now();
        // 4,000/s arrive, 2,000/s drain: +500 per refresh.
        let growing: Vec<(u64, u64)> = (0..8).map(|k| (1_000 * k, 500 * k)).collect();
        feed(&a, t0, 0, &growing[..3]);
        assert_eq!(a.check(0), None, "1,000 drain in 0.5 s, but it grew only twice");
        feed(&a, t0, 3, &growing[3..]);
        assert_eq!(a.check(0), Some(Refusal::Drain), "3,500 take 1.75 s at 2,000/s and it keeps growing");
        // Refused, arrivals stop and it drains 2,000/s.
        let draining: Vec<(u64, u64)> = (1..=7).map(|k| (7_000, 3_500 - 500 * k)).collect();
        feed(&a, t0, 8, &draining[..4]);
        assert_eq!(a.check(0), Some(Refusal::Drain), "1,500 still take 0.75 s");
        feed(&a, t0, 12, &draining[4..]);
        assert_eq!(a.check(0), None, "drained");
    }

    #[test]
    fn an_outage_that_begins_while_the_rate_window_still_holds_drain_is_not_refused() {
        let a = admission(250);
        let t0 = Instant::now();
        // 2,000/s arrive and drain; then the worker dies (or MySQL goes): nothing drains.
        let steady: Vec<(u64, u64)> = (0..4).map(|k| (500 * k, 100)).collect();
        feed(&a, t0, 0, &steady);
        for k in 4..12u32 {
            let added = 500 * u64::from(k);
            feed(&a, t0, k, &[(added, 100 + added - 1_500)]);
            assert_eq!(a.check(0), None, "refresh {k}: an outage is absorbed, never refused");
        }
        // A standby takes over: its first refresh drains a little while more still arrives.
        feed(&a, t0, 12, &[(6_000, 4_500)]);
        assert_eq!(a.check(0), None, "the growth of the outage does not count once draining resumes");
    }

    #[test]
    fn a_short_stall_an_outage_and_a_recovery_are_not_refused() {
        let t0 = Instant::now();
        // A 250 ms stall: 2,000/s arrive, nothing drains once, then it catches up.
        let a = admission(250);
        feed(&a, t0, 0, &[(0, 50), (500, 50), (1_000, 550), (1_500, 50)]);
        assert_eq!(a.check(0), None, "one refresh of growth is a stall");
        // An outage: nothing drains for seconds.
        let a = admission(250);
        feed(&a, t0, 0, &(0..12).map(|k| (500 * k, 500 * k)).collect::<Vec<_>>());
        assert_eq!(a.check(0), None, "nothing drains: the stream absorbs it");
        // Recovery: a big backlog shrinking.
        let a = admission(250);
        feed(&a, t0, 0, &(0..8).map(|k| (500 * k, 20_000 - 1_000 * k)).collect::<Vec<_>>());
        assert_eq!(a.check(0), None, "it shrinks");
    }
}
