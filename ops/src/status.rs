//! `ops status`: the cluster at a glance, per shard and per gateway, as a terminal table. The numbers
//! come from [`im_harness::status::collect`] (the processes' own `/metrics`, two scrapes a sampling
//! interval apart); `--json` prints them as they are, which is also what the dashboard serves.

use im_harness::status::ClusterStatus;

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
    out
}
