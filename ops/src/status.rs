//! `ops status`: the cluster at a glance, per shard and per gateway, as a terminal table. The numbers
//! come from [`im_harness::status::collect`] (the processes' own `/metrics`, two scrapes a sampling
//! interval apart); `--json` prints them as they are, which is also what the dashboard serves. On a
//! Redis Cluster a third table shows each Redis node: the slots and shards it holds, its memory and
//! its load.

use im_harness::status::{ClusterStatus, RedisNodeStatus};

/// A terminal table.
pub fn render(status: &ClusterStatus) -> String {
    let mut out = format!(
        "mode {}   workers up {}/{}\n\n{:>5} {:>16} {:>6} {:>9} {:>9} {:>8} {:>7} {:>8} {:>6} {:>10} {:>10} {:>10}\n",
        status.mode,
        status.workers_up,
        status.workers,
        "shard",
        "owner",
        "token",
        "accepted",
        "to_save",
        "pending",
        "lag",
        "oldest_s",
        "dead",
        "acc/s",
        "deliv/s",
        "saved/s"
    );
    for s in &status.shards {
        out.push_str(&format!(
            "{:>5} {:>16} {:>6} {:>9} {:>9} {:>8} {:>7} {:>8.1} {:>6} {:>10.1} {:>10.1} {:>10.1}\n",
            s.shard,
            s.owner.as_deref().unwrap_or("NONE"),
            s.fencing_token.map_or_else(|| "-".into(), |t| t.to_string()),
            s.accepted_len,
            s.to_save_len,
            s.pending,
            s.lag,
            s.oldest_pending_secs,
            s.dead_letters,
            s.accepted_per_sec,
            s.delivered_per_sec,
            s.saved_per_sec
        ));
    }
    out.push_str(&format!(
        "\n{:>7} {:>4} {:>12} {:>10} {:>10} {:>10}  url\n",
        "gateway", "up", "connections", "in/s", "acc/s", "err/s"
    ));
    for g in &status.gateways {
        out.push_str(&format!(
            "{:>7} {:>4} {:>12} {:>10.1} {:>10.1} {:>10.1}  {}\n",
            g.node_id,
            if g.up { "yes" } else { "NO" },
            g.connections,
            g.frames_in_per_sec,
            g.accepted_per_sec,
            g.errors_per_sec,
            g.ws_url
        ));
    }
    if !status.redis_nodes.is_empty() {
        out.push_str(&render_redis_nodes(&status.redis_nodes));
    }
    out
}

/// The Redis Cluster's nodes: address, up, memory, ops/s, shards, slot ranges.
fn render_redis_nodes(nodes: &[RedisNodeStatus]) -> String {
    let mut out =
        format!("\n{:<21} {:>4} {:>10} {:>8}  {:<16} {}\n", "redis node", "up", "memory", "ops/s", "shards", "slots");
    for n in nodes {
        let slots: Vec<String> = n.slots.iter().map(|(first, last)| format!("{first}-{last}")).collect();
        let shards: Vec<String> = n.shards.iter().map(u16::to_string).collect();
        out.push_str(&format!(
            "{:<21} {:>4} {:>10} {:>8}  {:<16} {}\n",
            n.addr,
            if n.up { "yes" } else { "NO" },
            n.used_memory_human.as_deref().unwrap_or("-"),
            n.ops_per_sec.map_or_else(|| "-".into(), |ops| format!("{ops:.0}")),
            if shards.is_empty() { "-".into() } else { shards.join(",") },
            if slots.is_empty() { "-".into() } else { slots.join(" ") },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_redis_node_is_one_row_with_its_shards_and_slots() {
        let node = |addr: &str, up: bool, slots: Vec<(u16, u16)>, shards: Vec<u16>| RedisNodeStatus {
            addr: addr.into(),
            up,
            slots,
            shards,
            used_memory_human: up.then(|| "1.50M".into()),
            ops_per_sec: up.then_some(12.0),
        };
        let table = render_redis_nodes(&[
            node("127.0.0.1:30001", true, vec![(0, 5460)], vec![0, 3]),
            node("127.0.0.1:30002", false, vec![], vec![]),
        ]);
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("127.")).collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(rows[0].contains("yes") && rows[0].contains("1.50M") && rows[0].contains("0,3"), "{table}");
        assert!(rows[0].ends_with("0-5460"), "{table}");
        assert!(rows[1].contains("NO") && rows[1].ends_with('-'), "{table}");
    }
}
