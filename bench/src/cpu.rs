//! CPU time of the cluster's processes over the measured window (read from `/proc` through
//! [`im_harness::process`]).
//!
//! `utime + stime` (in clock ticks) is read once at the start of the measured window
//! and once at its end; the difference is the CPU each process spent while the bench was measuring.
//! Summed over gateways, workers, Redis and MariaDB and divided by the messages sent in the window,
//! it gives the cost of one message to the whole engine. The bench's own CPU is reported apart: on a
//! small machine it competes with the cluster for the same cores.

use im_harness::process;
use serde::{Deserialize, Serialize};

/// A process to account for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// What it is (`gateway-1`, `worker-s0`, `redis-server`, ...).
    pub name: String,
    pub pid: u32,
}

/// CPU ticks of each process at one moment (`None`: the process was gone or unreadable).
#[derive(Debug, Clone)]
pub struct CpuSample {
    pub ticks: Vec<Option<u64>>,
    /// The bench process itself.
    pub own_ticks: Option<u64>,
}

/// CPU seconds one process used between two samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub name: String,
    pub pid: u32,
    /// `None` when the process could not be read at both ends of the window (it died or restarted).
    pub cpu_secs: Option<f64>,
}

/// Every process whose command name is one of `names`, named after its command.
pub fn find_by_comm(names: &[&str]) -> Vec<ProcessRef> {
    process::find_by_comm(names).into_iter().map(|(name, pid)| ProcessRef { name, pid }).collect()
}

/// The TCP port of a `redis://` or `mysql://` URL (`default` when it names none).
pub fn url_port(url: &str, default: u16) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(default)
}

/// Reads the CPU ticks of every process in `procs` and of this process.
pub fn sample(procs: &[ProcessRef]) -> CpuSample {
    CpuSample {
        ticks: procs.iter().map(|p| process::cpu_ticks(p.pid)).collect(),
        own_ticks: process::cpu_ticks(std::process::id()),
    }
}

/// Per-process CPU seconds between `start` and `end` (samples of the same `procs`), and the bench's own.
pub fn usage(procs: &[ProcessRef], start: &CpuSample, end: &CpuSample) -> (Vec<ProcessCpu>, Option<f64>) {
    let hz = process::ticks_per_second() as f64;
    let secs = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / hz),
        _ => None,
    };
    let per_process = procs
        .iter()
        .zip(start.ticks.iter().zip(&end.ticks))
        .map(|(p, (&a, &b))| ProcessCpu { name: p.name.clone(), pid: p.pid, cpu_secs: secs(a, b) })
        .collect();
    (per_process, secs(start.own_ticks, end.own_ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_urls() {
        assert_eq!(url_port("redis://127.0.0.1:6380", 6379), 6380);
        assert_eq!(url_port("redis://127.0.0.1/0", 6379), 6379);
        assert_eq!(url_port("mysql://root:pw@127.0.0.1:3307/im?x=1", 3306), 3307);
        assert_eq!(url_port("mysql://root@localhost/im", 3306), 3306);
    }

    #[test]
    fn this_process_is_accounted() {
        // Burn a little CPU so the counter has something to show on any kernel.
        let me = [ProcessRef { name: "bench".into(), pid: std::process::id() }];
        let start_sample = sample(&me);
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let (per_process, own) = usage(&me, &start_sample, &sample(&me));
        assert!(x > 0 && per_process[0].cpu_secs.is_some() && own.is_some());
    }
}
