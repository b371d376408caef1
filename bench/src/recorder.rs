//! Live measurements shared by every connection task: HDR histograms, counters, errors by reason.
//!
//! Histograms hold microseconds (1 µs to 1 h, 3 significant digits) behind one mutex: a record is a
//! few nanoseconds, so even tens of thousands per second barely contend, and one histogram per
//! connection would cost far more memory than it saves. Counters are atomics so the progress line
//! and the drain check can read them without stopping anyone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The latencies a run records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// TCP connect through the first `PONG` (handshake and auth included).
    Connect,
    /// Send → `ACK(accepted)`.
    Accepted,
    /// Send → `ACK(saved)`.
    Saved,
    /// Send → the recipient receives the push (same process, one monotonic clock).
    EndToEnd,
    /// How late the generator sent a message against its schedule (large: the bench fell behind).
    SendLag,
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The histograms of one run.
#[derive(Debug, Clone)]
pub struct Histograms {
    pub connect: Histogram<u64>,
    pub accepted: Histogram<u64>,
    pub saved: Histogram<u64>,
    pub end_to_end: Histogram<u64>,
    pub send_lag: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits; auto-resize covers anything slower.
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid");
    h.auto(true);
    h
}

impl Histograms {
    /// The histogram of one latency.
    pub fn get(&self, which: Latency) -> &Histogram<u64> {
        match which {
            Latency::Connect => &self.connect,
            Latency::Accepted => &self.accepted,
            Latency::Saved => &self.saved,
            Latency::EndToEnd => &self.end_to_end,
            Latency::SendLag => &self.send_lag,
        }
    }

    fn get_mut(&mut self, which: Latency) -> &mut Histogram<u64> {
        match which {
            Latency::Connect => &mut self.connect,
            Latency::Accepted => &mut self.accepted,
            Latency::Saved => &mut self.saved,
            Latency::EndToEnd => &mut self.end_to_end,
            Latency::SendLag => &mut self.send_lag,
        }
    }
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            connect: new_histogram(),
            accepted: new_histogram(),
            saved: new_histogram(),
            end_to_end: new_histogram(),
            send_lag: new_histogram(),
        }
    }
}

/// Running totals, readable at any moment.
#[derive(Debug, Default)]
pub struct Counters {
    pub connect_ok: AtomicU64,
    pub connect_fail: AtomicU64,
    pub auth_ok: AtomicU64,
    pub auth_fail: AtomicU64,
    /// `SINGLE_CHAT` frames written.
    pub sent: AtomicU64,
    /// Distinct messages with an `ACK(accepted)`.
    pub accepted: AtomicU64,
    /// Distinct messages with an `ACK(saved)`.
    pub saved: AtomicU64,
    /// Distinct messages answered with an `ERROR`.
    pub errored: AtomicU64,
    /// Messages with every answer they will get (see `checker::SentMsg::complete`).
    pub complete: AtomicU64,
    /// Distinct messages pushed to their recipient.
    pub delivered: AtomicU64,
    /// Pushes of a message the recipient already had.
    pub duplicates: AtomicU64,
    /// Connections opened again after they closed.
    pub reconnects: AtomicU64,
    /// Messages sent again after a reconnect.
    pub resent: AtomicU64,
    /// `ACK delivered` frames sent by receivers.
    pub delivered_acks: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub connect_ok: u64,
    pub connect_fail: u64,
    pub auth_ok: u64,
    pub auth_fail: u64,
    pub sent: u64,
    pub accepted: u64,
    pub saved: u64,
    pub errored: u64,
    pub complete: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub reconnects: u64,
    pub resent: u64,
    pub delivered_acks: u64,
}

impl Counters {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Adds one.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            connect_ok: Self::get(&self.connect_ok),
            connect_fail: Self::get(&self.connect_fail),
            auth_ok: Self::get(&self.auth_ok),
            auth_fail: Self::get(&self.auth_fail),
            sent: Self::get(&self.sent),
            accepted: Self::get(&self.accepted),
            saved: Self::get(&self.saved),
            errored: Self::get(&self.errored),
            complete: Self::get(&self.complete),
            delivered: Self::get(&self.delivered),
            duplicates: Self::get(&self.duplicates),
            reconnects: Self::get(&self.reconnects),
            resent: Self::get(&self.resent),
            delivered_acks: Self::get(&self.delivered_acks),
        }
    }
}

/// Everything a run records while it runs.
#[derive(Debug, Default)]
pub struct Recorder {
    histograms: Mutex<Histograms>,
    errors: Mutex<BTreeMap<String, u64>>,
    pub counters: Counters,
}

impl Recorder {
    /// Records one latency.
    pub fn record(&self, which: Latency, value: Duration) {
        let us = (value.as_micros() as u64).max(1);
        // A poisoned lock only means another task panicked mid-record; the counts are still usable.
        self.histograms.lock().unwrap_or_else(|p| p.into_inner()).get_mut(which).saturating_record(us);
    }

    /// Counts one error under `reason` (a server `ERROR` reason or a client-side failure).
    pub fn error(&self, reason: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(reason.to_owned()).or_default() += 1;
    }

    /// A copy of the histograms.
    pub fn histograms(&self) -> Histograms {
        self.histograms.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A copy of the errors by reason.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// p99 of one latency so far, in ms (for the progress line).
    pub fn p99_ms(&self, which: Latency) -> f64 {
        let h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let hist = h.get(which);
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(0.99) as f64 / 1000.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_reported_in_milliseconds() {
        let r = Recorder::default();
        for ms in 1..=100u64 {
            r.record(Latency::Saved, Duration::from_millis(ms));
        }
        let p = Percentiles::of(&r.histograms().saved);
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1 && (p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(Percentiles::of(&r.histograms().accepted), Percentiles::default());
    }
}
