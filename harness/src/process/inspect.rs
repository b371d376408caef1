//! What `/proc` says about a process: alive or not, its command name, its CPU time and its resident
//! memory, which process listens on a port. Read through the `procfs` crate, so the format details
//! (a command name may hold spaces and parentheses; field positions) live in one tested library.

use std::collections::HashSet;

use nix::errno::Errno;
use nix::unistd::Pid;
use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// The fields of `/proc/<pid>/stat` the harness uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The command name (`/proc/<pid>/comm`, at most 15 bytes).
    pub comm: String,
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub parent_pid: u32,
    /// User plus system CPU time, in clock ticks ([`ticks_per_second`]).
    pub cpu_ticks: u64,
}

/// The pid as a kill(2) target, or `None` for values that would address a group or init (0, 1, and
/// values beyond `i32`, which kill(2) reads as negative: a process group).
pub(super) fn kill_target(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().filter(|&pid| pid > 1).map(Pid::from_raw)
}

/// Whether any process has `pid` (a zombie counts): kill(2) with signal 0.
pub fn exists(pid: u32) -> bool {
    kill_target(pid).is_some_and(|target| !matches!(nix::sys::signal::kill(target, None), Err(Errno::ESRCH)))
}

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// Live processes (pid, command line) that run in `dir` or name it on their command line: a
/// private server runs with its directory as working directory, the engine's processes name their
/// config in it. What a test checks is gone after a stop.
pub fn processes_in(dir: &std::path::Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy();
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten()
        .filter_map(|p| {
            let cmd = p.cmdline().ok()?.join(" ");
            let cwd = p.cwd().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
            let pid = u32::try_from(p.pid).ok()?;
            (!cmd.is_empty() && (cmd.contains(dir.as_ref()) || cwd.starts_with(dir.as_ref()))).then_some((pid, cmd))
        })
        .collect()
}

/// The stat line of `pid`, or `None` when there is no such process (or it is unreadable).
pub fn stat(pid: u32) -> Option<ProcStat> {
    let stat = process(pid)?.stat().ok()?;
    Some(ProcStat {
        comm: stat.comm,
        state: stat.state,
        parent_pid: u32::try_from(stat.ppid).unwrap_or(0),
        cpu_ticks: stat.utime + stat.stime,
    })
}

/// Anything but zombie (`Z`) and dead (`X`).
pub fn is_live_state(state: char) -> bool {
    !matches!(state, 'Z' | 'X')
}

/// Whether `pid` exists and has not exited. A zombie waiting for its reaper counts as gone: detached
/// processes are reaped by init, which may take a moment.
pub fn is_alive(pid: u32) -> bool {
    // kill(pid, 0) is the authoritative "exists"; /proc only refines a yes. Reading /proc races with
    // an exiting process: a failed read is either a transient failure (still there) or a zombie
    // reaped between the two looks (gone), so it is settled by asking kill(pid, 0) again.
    exists(pid) && stat(pid).map_or_else(|| exists(pid), |s| is_live_state(s.state))
}

/// Whether any thread of `pid` is still live (after kill -9 the main thread turns zombie first while
/// the others still tear down, holding the process's sockets).
pub fn any_live_thread(pid: u32) -> bool {
    let Some(tasks) = process(pid).and_then(|p| p.tasks().ok()) else { return false };
    tasks.flatten().any(|task| task.stat().is_ok_and(|s| is_live_state(s.state)))
}

/// The command name of `pid`.
pub fn comm(pid: u32) -> Option<String> {
    stat(pid).map(|s| s.comm)
}

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.cpu_ticks)
}

/// Clock ticks per second (`getconf CLK_TCK`, practically always 100).
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second().max(1)
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    process(pid)?.status().ok()?.vmrss
}

/// Every process whose command name is one of `names`: (name, pid), by pid.
pub fn find_by_comm(names: &[&str]) -> Vec<(String, u32)> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    let mut found: Vec<(String, u32)> = all
        .flatten()
        .filter_map(|p| {
            let comm = p.stat().ok()?.comm;
            let pid = u32::try_from(p.pid).ok()?;
            names.contains(&comm.as_str()).then_some((comm, pid))
        })
        .collect();
    found.sort_by_key(|(_, pid)| *pid);
    found
}

/// The process listening on TCP `port` (IPv4 or IPv6): the listening socket's inode, matched against
/// every process's open descriptors. `None` when nothing listens there or the descriptors are not
/// readable (another user's process without privileges).
pub fn listener_pid(port: u16) -> Option<u32> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    let inodes: HashSet<u64> = tables
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.state == TcpState::Listen && entry.local_address.port() == port)
        .map(|entry| entry.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    procfs::process::all_processes().ok()?.flatten().find_map(|p| {
        let owns =
            p.fd().ok()?.flatten().any(|fd| matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode)));
        owns.then(|| u32::try_from(p.pid).ok()).flatten()
    })
}

/// Whether this process runs as root (package installs and `mariadbd --user=root` need to know).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Raises this process's open-file limit to its hard limit (a connection costs one descriptor).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, "could not raise the open-file limit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_readable() {
        let me = std::process::id();
        assert!(is_alive(me));
        let stat = stat(me).unwrap();
        assert!(is_live_state(stat.state) && !stat.comm.is_empty());
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(ticks_per_second() > 0 && cpu_ticks(me).is_some());
        assert!(!is_alive(0) && !is_alive(u32::MAX));
    }

    #[test]
    fn a_process_that_exited_is_never_alive_while_it_is_being_reaped() {
        // A zombie reaped between is_alive's kill(pid, 0) and its /proc read must still read as gone.
        for _ in 0..200 {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            while stat(pid).is_none_or(|s| s.state != 'Z') {
                std::thread::yield_now();
            }
            let reaper = std::thread::spawn(move || child.wait());
            while !reaper.is_finished() {
                assert!(!is_alive(pid), "pid {pid} read as alive while being reaped");
            }
            reaper.join().unwrap().unwrap();
        }
    }

    #[test]
    fn states_other_than_zombie_and_dead_are_live() {
        assert!(is_live_state('S') && is_live_state('D') && !is_live_state('Z') && !is_live_state('X'));
    }

    #[test]
    fn the_listener_of_a_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        drop(listener);
        assert_eq!(listener_pid(port), None);
    }
}
