//! The measured window every raw operation shares: workers run flat out or paced ([`Drive`]) and
//! count what they completed; after a warm-up the count and the CPU time of the processes involved
//! are read, once at each end of the window, then the workers are stopped.
//!
//! Reading both ends while the load runs keeps start-up and wind-down out of the figures. CPU comes
//! from `/proc` in clock ticks (10 ms), so a window shorter than a second or so is coarse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::model::{Measurement, Op};
use super::LimitsError;
use crate::cpu::{self, ProcessRef};

/// The shortest warm-up before a window.
const MIN_WARMUP: Duration = Duration::from_millis(200);
/// The longest warm-up before a window.
const MAX_WARMUP: Duration = Duration::from_secs(1);

/// How the workers of an operation drive it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Drive {
    /// As fast as the servers take it, in batches (pipelines, multi-row statements, frames in
    /// flight): the limit.
    #[default]
    FlatOut,
    /// Paced so each operation runs as often as `msgs_per_sec` messages need it, one per call (rows
    /// `rows_per_insert` per statement, as many as a save batch holds at that rate): light load
    /// such as the seed tier's, where each operation is a wake-up of its own.
    Paced { msgs_per_sec: f64, rows_per_insert: usize },
}

impl Drive {
    /// Operations per call: `flat` flat out, one paced.
    pub fn batch(self, flat: usize) -> usize {
        match self {
            Drive::FlatOut => flat,
            Drive::Paced { .. } => 1,
        }
    }

    /// The ticker of one of `workers` workers whose calls each complete `per_call` operations of
    /// `op`; none flat out.
    pub fn ticker(self, op: Op, workers: usize, per_call: usize) -> Option<Interval> {
        let Drive::Paced { msgs_per_sec, .. } = self else { return None };
        let calls_per_sec = msgs_per_sec * f64::from(op.per_message()) / (workers * per_call.max(1)) as f64;
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / calls_per_sec.max(1e-3)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(ticker)
    }

    /// How the measurement was paced, for its `how`.
    pub fn describe(self) -> String {
        match self {
            Drive::FlatOut => "flat out".into(),
            Drive::Paced { msgs_per_sec, .. } => format!("paced for {msgs_per_sec:.0} msg/s"),
        }
    }
}

/// Waits for the next tick when paced.
pub async fn pace(ticker: &mut Option<Interval>) {
    if let Some(ticker) = ticker {
        ticker.tick().await;
    }
}

/// Whose CPU an operation costs the engine.
pub enum CpuScope {
    /// The server processes plus the bench, which plays the gateway or worker.
    ServersAndBench(Vec<ProcessRef>),
    /// One thread of the bench (the WebSocket serving side); the rest of the bench is the client.
    Thread(u32),
}

/// Workers of one operation: they add completed operations to `done` until `stop` is cancelled.
pub struct Workers {
    pub done: Arc<AtomicU64>,
    pub stop: CancellationToken,
    pub tasks: JoinSet<Result<(), LimitsError>>,
}

impl Workers {
    pub fn new() -> Workers {
        Workers { done: Arc::new(AtomicU64::new(0)), stop: CancellationToken::new(), tasks: JoinSet::new() }
    }
}

impl Default for Workers {
    fn default() -> Self {
        Workers::new()
    }
}

/// One end of the window.
struct Mark {
    at: Instant,
    done: u64,
    servers: Vec<Option<u64>>,
    bench: Option<u64>,
    thread: Option<u64>,
}

fn mark(scope: &CpuScope, done: &AtomicU64) -> Mark {
    let (servers, thread) = match scope {
        CpuScope::ServersAndBench(procs) => (cpu::sample(procs).ticks, None),
        CpuScope::Thread(tid) => (Vec::new(), thread_ticks(*tid)),
    };
    Mark { at: Instant::now(), done: done.load(Ordering::Relaxed), servers, bench: cpu::sample(&[]).own_ticks, thread }
}

/// Warms `workers` up, measures a window of `secs`, stops them and returns the figures of `op`. A
/// worker that failed fails the measurement.
pub async fn measure(
    op: Op,
    how: String,
    scope: CpuScope,
    secs: Duration,
    mut workers: Workers,
) -> Result<Measurement, LimitsError> {
    tokio::time::sleep((secs / 5).clamp(MIN_WARMUP, MAX_WARMUP)).await;
    let start = mark(&scope, &workers.done);
    tokio::time::sleep(secs).await;
    let end = mark(&scope, &workers.done);
    workers.stop.cancel();
    while let Some(joined) = workers.tasks.join_next().await {
        joined.map_err(|e| LimitsError::Worker(e.to_string()))??;
    }
    Ok(figures(op, how, &scope, &start, &end))
}

fn figures(op: Op, how: String, scope: &CpuScope, start: &Mark, end: &Mark) -> Measurement {
    let hz = im_harness::process::ticks_per_second() as f64;
    let secs_between = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / hz),
        _ => None,
    };
    let ops = end.done.saturating_sub(start.done);
    let secs = end.at.duration_since(start.at).as_secs_f64();
    let bench = secs_between(start.bench, end.bench);
    let (server, bench, engine_side) = match scope {
        CpuScope::ServersAndBench(_) => {
            let per_server: Option<Vec<f64>> =
                start.servers.iter().zip(&end.servers).map(|(&a, &b)| secs_between(a, b)).collect();
            let server = per_server.filter(|s| !s.is_empty()).map(|s| s.iter().sum::<f64>());
            (server, bench, server.zip(bench).map(|(s, b)| s + b))
        }
        CpuScope::Thread(_) => {
            let thread = secs_between(start.thread, end.thread);
            (thread, bench.zip(thread).map(|(b, t)| (b - t).max(0.0)), thread)
        }
    };
    Measurement {
        op,
        how,
        ops,
        secs,
        ops_per_sec: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
        server_cpu_secs: server,
        bench_cpu_secs: bench,
        cpu_us_per_op: engine_side.filter(|_| ops > 0).map(|s| s * 1e6 / ops as f64),
    }
}

/// The id of the calling thread (Linux: `/proc/thread-self` links to `<pid>/task/<tid>`).
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// User plus system CPU ticks of thread `tid` of this process. `/proc/<tid>/stat` would sum the
/// whole process; the per-thread figure is under `task/`.
fn thread_ticks(tid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// `utime + stime` of a `stat` line (fields 14 and 15; the command name in parentheses may hold
/// spaces, so counting starts after its closing parenthesis).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paced_worker_calls_as_often_as_its_share_of_the_messages_needs() {
        let paced = Drive::Paced { msgs_per_sec: 800.0, rows_per_insert: 12 };
        assert_eq!((paced.batch(64), Drive::FlatOut.batch(64)), (1, 64));
        assert!(Drive::FlatOut.ticker(Op::Xadd, 4, 64).is_none());
        // XADD: 2 per message → 1,600/s over 4 workers, one per call: every 2.5 ms.
        let ticker = paced.ticker(Op::Xadd, 4, 1).unwrap();
        assert_eq!(ticker.period(), Duration::from_micros(2500));
        // Rows: 1 per message → 800/s over 4 workers, 12 per statement: every 60 ms.
        assert_eq!(paced.ticker(Op::InsertRow, 4, 12).unwrap().period(), Duration::from_millis(60));
        assert_eq!(paced.describe(), "paced for 800 msg/s");
    }

    #[test]
    fn stat_ticks_are_read_after_the_command_name() {
        let line = "4242 (ws echo) (x)) S 1 4242 4242 0 -1 4194560 10 0 0 0 37 5 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(line), Some(42));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn this_thread_is_found_and_accounted() {
        let tid = current_tid().expect("Linux names the thread");
        assert!(thread_ticks(tid).is_some());
    }

    #[test]
    fn engine_side_cpu_is_servers_plus_bench_or_the_serving_thread() {
        let hz = im_harness::process::ticks_per_second();
        let at = Instant::now();
        let start = Mark { at, done: 0, servers: vec![Some(0)], bench: Some(0), thread: Some(0) };
        let end = Mark {
            at: at + Duration::from_secs(2),
            done: 1000,
            servers: vec![Some(hz)],
            bench: Some(3 * hz),
            thread: Some(2 * hz),
        };
        let servers = CpuScope::ServersAndBench(vec![ProcessRef { name: "redis-server".into(), pid: 1 }]);
        let m = figures(Op::Xadd, String::new(), &servers, &start, &end);
        assert_eq!((m.ops, m.ops_per_sec, m.server_cpu_secs, m.bench_cpu_secs), (1000, 500.0, Some(1.0), Some(3.0)));
        assert_eq!(m.cpu_us_per_op, Some(4000.0));
        let ws = figures(Op::WsFrame, String::new(), &CpuScope::Thread(1), &start, &end);
        assert_eq!((ws.server_cpu_secs, ws.bench_cpu_secs, ws.cpu_us_per_op), (Some(2.0), Some(1.0), Some(2000.0)));
    }
}
