//! Live measurements shared by every connection task: HDR histograms, counters, errors by reason.
//!
//! Histograms hold microseconds (1 µs to 1 h, 3 significant digits) behind one mutex: a record is a
//! few nanoseconds, so even tens of thousands per second barely contend, and one histogram per
//! connection would cost far more memory than it saves. Counters are atomics so the progress line
//! and the drain check can read them without stopping anyone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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
    /// A device's (re)connection, or its own `SYNC`, → the `SYNC_DONE` that ends the sync.
    Sync,
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
    pub sync: Histogram<u64>,
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
            Latency::Sync => &self.sync,
        }
    }

    fn get_mut(&mut self, which: Latency) -> &mut Histogram<u64> {
        match which {
            Latency::Connect => &mut self.connect,
            Latency::Accepted => &mut self.accepted,
            Latency::Saved => &mut self.saved,
            Latency::EndToEnd => &mut self.end_to_end,
            Latency::SendLag => &mut self.send_lag,
            Latency::Sync => &mut self.sync,
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
            sync: new_histogram(),
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
    /// `ACK read` frames sent by receivers.
    pub read_acks: AtomicU64,
    /// (device, message) holds owed: for every message when it is first receipted, one per device
    /// of its recipient.
    pub device_owed: AtomicU64,
    /// (device, message) holds: a device got a message of the run it did not hold.
    pub device_held: AtomicU64,
    /// `SYNC {peer, afterSeq}` sent for gaps; reconnections that sent their own positions.
    pub gap_syncs: AtomicU64,
    pub own_position_syncs: AtomicU64,
    /// `SYNC_DONE` frames received.
    pub sync_dones: AtomicU64,
    /// `RECEIPT` frames senders received.
    pub receipts: AtomicU64,
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
    pub read_acks: u64,
    pub device_owed: u64,
    pub device_held: u64,
    pub gap_syncs: u64,
    pub own_position_syncs: u64,
    pub sync_dones: u64,
    pub receipts: u64,
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
            read_acks: Self::get(&self.read_acks),
            device_owed: Self::get(&self.device_owed),
            device_held: Self::get(&self.device_held),
            gap_syncs: Self::get(&self.gap_syncs),
            own_position_syncs: Self::get(&self.own_position_syncs),
            sync_dones: Self::get(&self.sync_dones),
            receipts: Self::get(&self.receipts),
        }
    }
}

/// What the drain needs to know about recipients beyond the counters: how many devices each user
/// has, the positions the receivers confirmed, and the receipts their senders got for them.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Devices per receiving user (1 when not listed); set once before the load starts.
    devices: OnceLock<HashMap<u64, u64>>,
    /// (user, peer) → the highest position a device of the user confirmed.
    confirmed: Mutex<HashMap<(u64, u64), u64>>,
    /// (sender, recipient) → the highest `RECEIPT delivered` seq the sender got.
    receipts: Mutex<HashMap<(u64, u64), u64>>,
}

impl Ledger {
    /// Sets the devices per user (once; later calls are ignored).
    pub fn set_devices(&self, devices: HashMap<u64, u64>) {
        let _ = self.devices.set(devices);
    }

    /// How many devices `uid` has.
    pub fn devices_of(&self, uid: u64) -> u64 {
        self.devices.get().and_then(|d| d.get(&uid).copied()).unwrap_or(1)
    }

    /// A device of `user` confirmed `seq` in the conversation with `peer`.
    pub fn confirmed(&self, user: u64, peer: u64, seq: u64) {
        let mut c = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        let e = c.entry((user, peer)).or_default();
        *e = (*e).max(seq);
    }

    /// `sender` got `RECEIPT delivered` from `recipient` up to `seq`.
    pub fn receipt(&self, sender: u64, recipient: u64, seq: u64) {
        let mut r = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        let e = r.entry((sender, recipient)).or_default();
        *e = (*e).max(seq);
    }

    /// Conversations whose confirmed position has not come back to the sender as a receipt yet.
    pub fn receipts_behind(&self) -> usize {
        let confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        confirmed.iter().filter(|((user, peer), &seq)| receipts.get(&(*peer, *user)).is_none_or(|&r| r < seq)).count()
    }
}

/// Everything a run records while it runs.
#[derive(Debug, Default)]
pub struct Recorder {
    histograms: Mutex<Histograms>,
    errors: Mutex<BTreeMap<String, u64>>,
    pub counters: Counters,
    pub ledger: Ledger,
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
