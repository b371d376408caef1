//! The Redis Cluster under a running cluster, per master: its address, the slots it holds, which
//! shards' streams live there (the slot of each shard's accepted stream, `Keys::shard_slots`, against
//! `CLUSTER SLOTS`), its memory (`used_memory_human`) and its load (`instantaneous_ops_per_sec`).
//!
//! Every node is asked over a plain single-node connection, bounded in time: a node that is down
//! shows as down instead of stalling the table.

use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;

use im_common::keys::Keys;

use crate::cluster::ClusterState;
use crate::servers::{cluster_slots, holdings, node_connection, SlotRange};

/// How long a node gets to answer `INFO`.
const INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// One node of the Redis Cluster.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RedisNodeStatus {
    /// `host:port`.
    pub addr: String,
    /// Whether it answered `INFO`.
    pub up: bool,
    /// The slot ranges it holds as a master (first and last slot, both included).
    pub slots: Vec<(u16, u16)>,
    /// The shards whose streams (their hash tag's slot) it holds.
    pub shards: Vec<u16>,
    /// `used_memory_human` from `INFO`, e.g. `1.27M`.
    pub used_memory_human: Option<String>,
    /// `instantaneous_ops_per_sec` from `INFO`.
    pub ops_per_sec: Option<f64>,
}

/// Every node of the cluster's Redis Cluster (none when it runs on one Redis server): the masters
/// in slot order, then any configured node that holds no slots or did not answer.
pub async fn collect(state: &ClusterState) -> Vec<RedisNodeStatus> {
    let Some(redis_cluster) = &state.redis_cluster else { return Vec::new() };
    let ranges = slot_map(&redis_cluster.urls).await;
    let shard_slots: Vec<(u16, u16)> = match state.config() {
        Ok(cfg) => Keys::from_config(&cfg).shard_slots(cfg.cluster.shards),
        Err(_) => Vec::new(),
    };
    let nodes = node_addrs(&ranges, &redis_cluster.urls);
    join_all(nodes.into_iter().map(|addr| node_status(addr, &ranges, &shard_slots))).await
}

/// The slot map from the first node that answers (empty when none does).
async fn slot_map(urls: &[String]) -> Vec<SlotRange> {
    for url in urls {
        if let Ok(ranges) = cluster_slots(url).await {
            return ranges;
        }
    }
    Vec::new()
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn url_addr(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// The masters in slot order, then the configured nodes not among them.
fn node_addrs(ranges: &[SlotRange], urls: &[String]) -> Vec<String> {
    let mut addrs: Vec<String> = Vec::new();
    let masters = ranges.iter().map(|r| r.master.as_str());
    for addr in masters.chain(urls.iter().map(|u| url_addr(u))) {
        if !addrs.iter().any(|known| known == addr) {
            addrs.push(addr.to_owned());
        }
    }
    addrs
}

async fn node_status(addr: String, ranges: &[SlotRange], shard_slots: &[(u16, u16)]) -> RedisNodeStatus {
    let (slots, shards) = holdings(&addr, ranges, shard_slots);
    let info = node_info(&addr).await;
    let field = |name: &str| info.as_deref().and_then(|text| crate::servers::info_field(text, name)).map(str::to_owned);
    RedisNodeStatus {
        up: info.is_some(),
        used_memory_human: field("used_memory_human"),
        ops_per_sec: field("instantaneous_ops_per_sec").and_then(|v| v.parse().ok()),
        addr,
        slots,
        shards,
    }
}

/// The node's `INFO memory` and `INFO stats`, or `None` when it does not answer.
async fn node_info(addr: &str) -> Option<String> {
    let mut conn = node_connection(&format!("redis://{addr}")).await.ok()?;
    let mut info = redis::cmd("INFO");
    info.arg("memory").arg("stats");
    tokio::time::timeout(INFO_TIMEOUT, info.query_async::<String>(&mut conn)).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16, master: &str) -> SlotRange {
        SlotRange { first, last, master: master.into() }
    }

    #[test]
    fn each_master_holds_the_shards_whose_slots_are_in_its_ranges() {
        let ranges = [range(0, 5460, "a:1"), range(5461, 10922, "b:2"), range(10923, 16383, "c:3")];
        let shard_slots = [(0, 2048), (1, 6144), (2, 10240), (3, 14336)];
        assert_eq!(holdings("a:1", &ranges, &shard_slots), (vec![(0, 5460)], vec![0]));
        assert_eq!(holdings("b:2", &ranges, &shard_slots), (vec![(5461, 10922)], vec![1, 2]));
        assert_eq!(holdings("d:4", &ranges, &shard_slots), (vec![], vec![]));
    }

    #[test]
    fn nodes_are_listed_masters_first_then_configured_ones_once_each() {
        let ranges = [range(0, 100, "127.0.0.1:2"), range(101, 16383, "127.0.0.1:1")];
        let urls = ["redis://127.0.0.1:1".to_string(), "redis://127.0.0.1:3/".to_string()];
        assert_eq!(node_addrs(&ranges, &urls), ["127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:3"]);
        assert_eq!(url_addr("redis://:secret@10.0.0.1:7000/0"), "10.0.0.1:7000");
    }
}
