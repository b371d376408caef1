//! What each master of a Redis Cluster did during a run's measured window: `INFO commandstats` of
//! every master read when the window opens and when it closes, and per node the difference — total
//! calls, calls per message sent, the busiest commands — next to the shards whose streams it holds.
//! This is how a run shows the shards' load spreading over the nodes (or piling up on one).
//!
//! Each master is asked over a plain single-node connection ([`node_connection`]), bounded in time: a
//! cluster client would route `INFO` to a node of its choosing, and the point is to ask each one. A
//! node that does not answer at either end is reported without counts rather than failing the run,
//! and a node whose counters went backwards (it restarted in the window, as in a drill) counts its
//! calls since the restart. The counts are everything the node executed: the engine's commands and
//! the commands its scripts run (an `EVALSHA` whose script calls `GET` and `XADD` counts as `evalsha`,
//! `get` and `xadd`: calls, not round trips), the drill monitor's and `ops status`'s reads, and the
//! bench's own `INFO` and `CLUSTER SLOTS` (one or two calls per node per run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use im_common::keys::Keys;
use im_harness::cluster::ClusterState;
use im_harness::servers::{cluster_slots, holdings, node_connection, SlotRange};

/// How long a node gets to answer `INFO commandstats`.
const INFO_TIMEOUT: Duration = Duration::from_secs(1);
/// How many of a node's commands the tables name, busiest first.
const TOP_COMMANDS: usize = 5;
/// The prefix of a command's line in `INFO commandstats`.
const COMMANDSTAT_PREFIX: &str = "cmdstat_";

/// The Redis Cluster a target runs on, as the bench watches it: where to ask for the slot map, and
/// the slot each shard's streams hash to (their hash tag's slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisClusterNodes {
    /// `redis://host:port` of the cluster's nodes as the cluster state names them.
    pub urls: Vec<String>,
    /// Every shard and the slot of its accepted stream (empty when the cluster's config could not be
    /// read: the nodes are then reported without their shards).
    pub shard_slots: Vec<(u16, u16)>,
}

impl RedisClusterNodes {
    /// The Redis Cluster of a cluster state (`None` when it runs on one Redis server).
    pub fn from_state(state: &ClusterState) -> Option<RedisClusterNodes> {
        let redis_cluster = state.redis_cluster.as_ref()?;
        let shard_slots = match state.config() {
            Ok(cfg) => Keys::from_config(&cfg).shard_slots(cfg.cluster.shards),
            Err(_) => Vec::new(),
        };
        Some(RedisClusterNodes { urls: redis_cluster.urls.clone(), shard_slots })
    }
}

/// One command's counters in `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandCount {
    pub calls: u64,
    /// Microseconds the node spent executing it (Redis's own accounting).
    pub usec: u64,
}

/// A node's counters per command (`xadd`, `evalsha`, `client|setname`, ...).
pub type CommandStats = BTreeMap<String, CommandCount>;

/// Parses an `INFO commandstats` reply: lines `cmdstat_<command>:calls=N,usec=N,...`. Lines of any
/// other shape (section headers, fields this parser does not know) are skipped, never an error.
pub fn parse_commandstats(info: &str) -> CommandStats {
    let mut stats = CommandStats::new();
    for line in info.lines() {
        let Some((command, fields)) = line.trim().strip_prefix(COMMANDSTAT_PREFIX).and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |name: &str| {
            fields
                .split(',')
                .find_map(|f| f.split_once('=').filter(|(k, _)| *k == name).and_then(|(_, v)| v.parse().ok()))
        };
        if let Some(calls) = field("calls") {
            stats.insert(command.to_owned(), CommandCount { calls, usec: field("usec").unwrap_or(0) });
        }
    }
    stats
}

/// What a node's counters grew by between two readings. A counter that went backwards means the
/// node restarted (or someone ran `CONFIG RESETSTAT`) in between: what it counted since is the
/// growth.
pub fn counts_between(before: &CommandStats, after: &CommandStats) -> CommandStats {
    let grown = |a: u64, b: u64| b.checked_sub(a).unwrap_or(b);
    after
        .iter()
        .map(|(command, end)| {
            let start = before.get(command).copied().unwrap_or_default();
            let count = if end.calls < start.calls {
                *end
            } else {
                CommandCount { calls: grown(start.calls, end.calls), usec: grown(start.usec, end.usec) }
            };
            (command.clone(), count)
        })
        .filter(|(_, count)| count.calls > 0)
        .collect()
}

/// One master's counters at one moment (`None`: it did not answer).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReading {
    /// `host:port`.
    pub addr: String,
    pub stats: Option<CommandStats>,
}

/// Every master's counters at one moment, with the slot map they were found by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandSnapshot {
    /// The slot map (empty when no node answered `CLUSTER SLOTS`).
    pub slots: Vec<SlotRange>,
    pub nodes: Vec<NodeReading>,
}

impl CommandSnapshot {
    /// Reads the slot map from the first node that answers, then every master's counters.
    pub async fn take(cluster: &RedisClusterNodes) -> CommandSnapshot {
        let mut slots = Vec::new();
        for url in &cluster.urls {
            if let Ok(ranges) = cluster_slots(url).await {
                slots = ranges;
                break;
            }
        }
        let addrs = node_addrs(&slots, &cluster.urls);
        CommandSnapshot { nodes: read_all(addrs).await, slots }
    }

    /// The same nodes' counters again (the slot map stays the one found first: a run never moves
    /// slots).
    pub async fn again(&self) -> CommandSnapshot {
        let addrs = self.nodes.iter().map(|n| n.addr.clone()).collect();
        CommandSnapshot { slots: self.slots.clone(), nodes: read_all(addrs).await }
    }
}

/// The masters in slot order, or (without a slot map) the nodes the cluster state names.
fn node_addrs(slots: &[SlotRange], urls: &[String]) -> Vec<String> {
    let from_slots = slots.iter().map(|r| r.master.clone());
    let from_urls = urls.iter().map(|u| u.split_once("://").map_or(u.as_str(), |(_, rest)| rest).to_owned());
    let mut addrs: Vec<String> = Vec::new();
    let candidates: Vec<String> = if slots.is_empty() { from_urls.collect() } else { from_slots.collect() };
    for addr in candidates {
        let addr = addr.trim_end_matches('/').to_owned();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    addrs
}

async fn read_all(addrs: Vec<String>) -> Vec<NodeReading> {
    join_all(addrs.into_iter().map(|addr| async move {
        let stats = read_commandstats(&addr).await;
        NodeReading { addr, stats }
    }))
    .await
}

/// `INFO commandstats` of the node at `addr`, parsed; `None` when it does not answer in time.
async fn read_commandstats(addr: &str) -> Option<CommandStats> {
    let mut conn = node_connection(&format!("redis://{addr}")).await.ok()?;
    let mut info = redis::cmd("INFO");
    info.arg("commandstats");
    let text = tokio::time::timeout(INFO_TIMEOUT, info.query_async::<String>(&mut conn)).await.ok()?.ok()?;
    Some(parse_commandstats(&text))
}

/// One command's calls on one node over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandCalls {
    /// As Redis names it (`evalsha`, `xreadgroup`, `client|setname`).
    pub command: String,
    pub calls: u64,
}

/// What one master of the Redis Cluster served over the measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedisNodeLoad {
    /// `host:port`.
    pub addr: String,
    /// The slot ranges it holds (first and last slot, both included).
    pub slots: Vec<(u16, u16)>,
    /// The shards whose streams (their hash tag's slot) it holds.
    pub shards: Vec<u16>,
    /// Calls of every command over the window (`None`: the node did not answer at the start or the
    /// end of the window).
    pub calls: Option<u64>,
    /// `calls` per message sent in the window.
    pub calls_per_msg: Option<f64>,
    /// Microseconds the node spent executing commands over the window (Redis's accounting).
    pub usec: Option<u64>,
    /// Every command it served over the window, most calls first (the tables name the first few).
    pub commands: Vec<CommandCalls>,
}

/// Each master's load between two snapshots of the same nodes, `messages` being the messages sent in
/// between.
pub fn node_loads(
    cluster: &RedisClusterNodes,
    start: &CommandSnapshot,
    end: &CommandSnapshot,
    messages: u64,
) -> Vec<RedisNodeLoad> {
    end.nodes
        .iter()
        .map(|reading| {
            let (slots, shards) = holdings(&reading.addr, &start.slots, &cluster.shard_slots);
            let before = start.nodes.iter().find(|n| n.addr == reading.addr).and_then(|n| n.stats.as_ref());
            let grown = match (before, &reading.stats) {
                (Some(before), Some(after)) => Some(counts_between(before, after)),
                _ => None,
            };
            let calls = grown.as_ref().map(|g| g.values().map(|c| c.calls).sum::<u64>());
            let mut commands: Vec<CommandCalls> = grown
                .iter()
                .flatten()
                .map(|(command, count)| CommandCalls { command: command.clone(), calls: count.calls })
                .collect();
            commands.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.command.cmp(&b.command)));
            RedisNodeLoad {
                addr: reading.addr.clone(),
                slots,
                shards,
                calls,
                calls_per_msg: calls.filter(|_| messages > 0).map(|c| c as f64 / messages as f64),
                usec: grown.as_ref().map(|g| g.values().map(|c| c.usec).sum()),
                commands,
            }
        })
        .collect()
}

/// `0-5460` (several ranges joined by commas; `–` for none).
fn slot_list(slots: &[(u16, u16)]) -> String {
    let list: Vec<String> = slots.iter().map(|(first, last)| format!("{first}-{last}")).collect();
    if list.is_empty() {
        "–".into()
    } else {
        list.join(",")
    }
}

/// `0,3` (`–` for none).
fn shard_list(shards: &[u16]) -> String {
    let list: Vec<String> = shards.iter().map(u16::to_string).collect();
    if list.is_empty() {
        "–".into()
    } else {
        list.join(",")
    }
}

/// `evalsha 4123, xadd 2000` (`no answer` for a node without counts).
fn top_list(node: &RedisNodeLoad) -> String {
    if node.calls.is_none() {
        return "no answer".into();
    }
    let top = node.commands.iter().take(TOP_COMMANDS);
    let list: Vec<String> = top.map(|c| format!("{} {}", c.command, c.calls)).collect();
    list.join(", ")
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "–".into(), |v| v.to_string())
}

/// The calls of every node that answered, and their sum per message.
fn totals(nodes: &[RedisNodeLoad]) -> (u64, Option<f64>) {
    let calls = nodes.iter().filter_map(|n| n.calls).sum();
    let per_msg = nodes.iter().filter_map(|n| n.calls_per_msg).reduce(|a, b| a + b);
    (calls, per_msg)
}

/// Each node's cells (address, shards, slots, calls, calls/msg, top commands), then the totals row.
fn rows(nodes: &[RedisNodeLoad]) -> Vec<[String; 6]> {
    let mut rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            [
                n.addr.clone(),
                shard_list(&n.shards),
                slot_list(&n.slots),
                or_dash(n.calls),
                or_dash(n.calls_per_msg.map(|c| format!("{c:.2}"))),
                top_list(n),
            ]
        })
        .collect();
    let (calls, per_msg) = totals(nodes);
    let total = [
        "all nodes".into(),
        String::new(),
        String::new(),
        calls.to_string(),
        or_dash(per_msg.map(|c| format!("{c:.2}"))),
        String::new(),
    ];
    rows.push(total);
    rows
}

/// The nodes as a plain-text table (for a run's printed summary); empty for no nodes.
pub fn text_table(nodes: &[RedisNodeLoad]) -> String {
    if nodes.is_empty() {
        return String::new();
    }
    let head = ["redis node", "shards", "slots", "calls", "calls/msg", "top commands"].map(String::from);
    let mut out = String::new();
    for [addr, shards, slots, calls, per_msg, top] in std::iter::once(head).chain(rows(nodes)) {
        let _ = writeln!(out, "{addr:<21} {shards:<8} {slots:<13} {calls:>10} {per_msg:>9}  {top}");
    }
    out
}

/// The nodes as a markdown table (for a run directory's summary); empty for no nodes.
pub fn markdown_table(nodes: &[RedisNodeLoad]) -> String {
    if nodes.is_empty() {
        return String::new();
    }
    let mut out =
        String::from("| redis node | shards | slots | calls | calls/msg | top commands |\n|---|---|---|---|---|---|\n");
    for [addr, shards, slots, calls, per_msg, top] in rows(nodes) {
        let _ = writeln!(out, "| {addr} | {shards} | {slots} | {calls} | {per_msg} | {top} |");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# Commandstats\r\n\
        cmdstat_xadd:calls=100,usec=800,usec_per_call=8.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_evalsha:calls=40,usec=400,usec_per_call=10.00,rejected_calls=0,failed_calls=1\r\n\
        cmdstat_client|setname:calls=3,usec=3,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n";
    const AFTER: &str = "# Commandstats\r\n\
        cmdstat_xadd:calls=250,usec=2000,usec_per_call=8.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_evalsha:calls=140,usec=1400,usec_per_call=10.00,rejected_calls=0,failed_calls=1\r\n\
        cmdstat_client|setname:calls=3,usec=3,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=1,usec=30,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n";

    fn count(calls: u64, usec: u64) -> CommandCount {
        CommandCount { calls, usec }
    }

    #[test]
    fn commandstats_lines_are_read_per_command_and_anything_else_is_skipped() {
        let stats = parse_commandstats(BEFORE);
        assert_eq!(stats.len(), 3);
        assert_eq!(stats["xadd"], count(100, 800));
        assert_eq!(stats["client|setname"], count(3, 3));
        let odd = "cmdstat_broken\r\ncmdstat_nocalls:usec=5\r\ncmdstat_bad:calls=x\r\nkeyspace_hits:4\r\n\r\n";
        assert!(parse_commandstats(odd).is_empty(), "malformed lines are skipped, never a panic");
        assert_eq!(parse_commandstats("cmdstat_get:calls=7")["get"], count(7, 0), "usec is optional");
    }

    #[test]
    fn the_window_counts_what_each_command_grew_by() {
        let grown = counts_between(&parse_commandstats(BEFORE), &parse_commandstats(AFTER));
        assert_eq!(
            grown,
            CommandStats::from([
                ("xadd".to_owned(), count(150, 1200)),
                ("evalsha".to_owned(), count(100, 1000)),
                ("info".to_owned(), count(1, 30)),
            ]),
            "unchanged commands drop out, new ones count in full"
        );
    }

    #[test]
    fn a_node_that_restarted_counts_its_calls_since_the_restart() {
        let after_restart = parse_commandstats("cmdstat_xadd:calls=20,usec=160\r\n");
        let grown = counts_between(&parse_commandstats(BEFORE), &after_restart);
        assert_eq!(grown, CommandStats::from([("xadd".to_owned(), count(20, 160))]));
    }

    fn range(first: u16, last: u16, master: &str) -> SlotRange {
        SlotRange { first, last, master: master.into() }
    }

    #[test]
    fn each_node_reports_its_shards_calls_per_message_and_busiest_commands() {
        let cluster = RedisClusterNodes {
            urls: vec!["redis://a:1".into(), "redis://b:2".into()],
            shard_slots: vec![(0, 100), (1, 9000), (2, 200)],
        };
        let slots = vec![range(0, 8191, "a:1"), range(8192, 16383, "b:2")];
        let reading =
            |addr: &str, text: Option<&str>| NodeReading { addr: addr.into(), stats: text.map(parse_commandstats) };
        let start =
            CommandSnapshot { slots: slots.clone(), nodes: vec![reading("a:1", Some(BEFORE)), reading("b:2", None)] };
        let end = CommandSnapshot { slots, nodes: vec![reading("a:1", Some(AFTER)), reading("b:2", Some(AFTER))] };
        let loads = node_loads(&cluster, &start, &end, 50);
        assert_eq!(loads[0].shards, vec![0, 2]);
        assert_eq!(loads[0].slots, vec![(0, 8191)]);
        assert_eq!(loads[0].calls, Some(251));
        assert_eq!(loads[0].calls_per_msg, Some(251.0 / 50.0));
        assert_eq!(loads[0].usec, Some(2230));
        let top: Vec<(&str, u64)> = loads[0].commands.iter().map(|c| (c.command.as_str(), c.calls)).collect();
        assert_eq!(top, vec![("xadd", 150), ("evalsha", 100), ("info", 1)]);
        assert_eq!(loads[1].shards, vec![1]);
        assert_eq!((loads[1].calls, loads[1].calls_per_msg), (None, None), "no reading at the start: no counts");
        let table = text_table(&loads);
        assert!(table.contains("a:1") && table.contains("0,2") && table.contains("5.02"), "{table}");
        assert!(table.contains("no answer") && table.contains("all nodes"), "{table}");
        assert!(markdown_table(&loads).starts_with("| redis node |"));
        assert!(text_table(&[]).is_empty() && markdown_table(&[]).is_empty());
    }

    #[test]
    fn without_a_slot_map_the_configured_nodes_are_asked() {
        let urls = ["redis://127.0.0.1:7000".to_string(), "redis://127.0.0.1:7001/".to_string()];
        assert_eq!(node_addrs(&[], &urls), ["127.0.0.1:7000", "127.0.0.1:7001"]);
        let slots = [range(0, 10, "127.0.0.1:7001"), range(11, 16383, "127.0.0.1:7001")];
        assert_eq!(node_addrs(&slots, &urls), ["127.0.0.1:7001"], "each master once, from the slot map");
    }
}
