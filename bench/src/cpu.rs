//! CPU time of the cluster's processes, from `/proc/<pid>/stat` (Linux).
//!
//! `utime + stime` (fields 14 and 15, in clock ticks) is read once at the start of the measured window
//! and once at its end; the difference is the CPU each process spent while the bench was measuring.
//! Summed over gateways, workers, Redis and MariaDB and divided by the messages sent in the window,
//! it gives the cost of one message to the whole engine. The bench's own CPU is reported apart: on a
//! small machine it competes with the cluster for the same cores.

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

/// `utime + stime` from the text of a `/proc/<pid>/stat` file. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ")" come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks used so far by `pid`.
pub fn process_ticks(pid: u32) -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`, practically always 100).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Every process whose `/proc/<pid>/comm` is one of `names`, named after its command.
pub fn find_by_comm(names: &[&str]) -> Vec<ProcessRef> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<ProcessRef> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            names.contains(&comm).then(|| ProcessRef { name: comm.to_owned(), pid })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

/// The process listening on TCP `port` (IPv4 or IPv6): the listening socket's inode from
/// `/proc/net/tcp{,6}`, matched against every process's open descriptors. `None` when nothing
/// listens there or the descriptors are not readable (another user's process without privileges).
pub fn listener_pid(port: u16) -> Option<u32> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
        let owns = fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| targets.iter().any(|t| link.as_os_str() == t.as_str()))
        });
        owns.then_some(pid)
    })
}

/// Inodes of the sockets in LISTEN state (`0A`) on `port`, from a `/proc/net/tcp` table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *fields.get(3)? == "0A").then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
}

/// The command name of `pid` (`/proc/<pid>/comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim().to_owned())
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
        ticks: procs.iter().map(|p| process_ticks(p.pid)).collect(),
        own_ticks: process_ticks(std::process::id()),
    }
}

/// Per-process CPU seconds between `start` and `end` (samples of the same `procs`), and the bench's own.
pub fn usage(procs: &[ProcessRef], start: &CpuSample, end: &CpuSample) -> (Vec<ProcessCpu>, Option<f64>) {
    let hz = clock_ticks_per_sec() as f64;
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
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 730 270 0 0 20 0 9 0 12345 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(1000));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                     0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 31337 1 0\n\
                     1: 0100007F:18EB 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000   100        0 4242 1 0\n";
        assert_eq!(listening_inodes(table, 6379), vec![31337]);
        assert!(listening_inodes(table, 3306).is_empty());
        // A real listener: this test's own socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
    }

    #[test]
    fn ports_come_from_urls() {
        assert_eq!(url_port("redis://127.0.0.1:6380", 6379), 6380);
        assert_eq!(url_port("redis://127.0.0.1/0", 6379), 6379);
        assert_eq!(url_port("mysql://root:pw@127.0.0.1:3307/im?x=1", 3306), 3307);
        assert_eq!(url_port("mysql://root@localhost/im", 3306), 3306);
    }

    #[test]
    fn this_process_is_readable() {
        // Burn a little CPU so the counter has something to show on any kernel.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0 && process_ticks(std::process::id()).is_some());
        assert!(clock_ticks_per_sec() > 0);
    }
}
