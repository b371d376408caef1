//! The progress line on stderr while a run runs: phase, connections, sent (and rate), answers,
//! deliveries, errors, duplicates and saved p99.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::recorder::{CounterSnapshot, Latency, Recorder};

/// What the progress line says the run is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    Connecting = 0,
    Settling = 1,
    Warmup = 2,
    Measuring = 3,
    Draining = 4,
}

/// Prints a progress line to stderr every `every` until `done` is cancelled.
pub(super) async fn progress_loop(
    rec: Arc<Recorder>,
    phase: Arc<AtomicU8>,
    label: String,
    every: Duration,
    connections: usize,
    done: CancellationToken,
) {
    let began = Instant::now();
    let mut last = (began, CounterSnapshot::default());
    let label = if label.is_empty() { String::new() } else { format!("[{label}] ") };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => return,
        }
        let now = Instant::now();
        let c = rec.counters.snapshot();
        let rate = (c.sent - last.1.sent) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, c);
        let phase = match phase.load(Ordering::Relaxed) {
            0 => "connecting",
            1 => "settling",
            2 => "warm-up",
            3 => "measuring",
            _ => "draining",
        };
        let connected = c.connect_ok;
        eprintln!(
            "{label}{:>6.1}s {phase:<10} conn {connected}/{connections}  sent {} ({rate:.0}/s)  accepted {}  saved {}  delivered {}  errors {}  dups {}  saved p99 {:.1} ms",
            now.duration_since(began).as_secs_f64(),
            c.sent,
            c.accepted,
            c.saved,
            c.delivered,
            c.errored,
            c.duplicates,
            rec.p99_ms(Latency::Saved),
        );
    }
}
