//! What a Redis Cluster says about itself: whether every node reports `cluster_state:ok`, which
//! master holds which slots (`CLUSTER SLOTS`), and the masters' URLs.
//!
//! Each question goes to one node over a plain single-node connection (not a cluster client): the
//! point is to ask a particular node, and a cluster client would hide which one answered. Every call
//! is bounded in time, so a node that is gone costs about a second, not a hang.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;

/// A Redis Cluster's slot space: every key hashes to one of these.
pub const CLUSTER_SLOTS: u32 = 16_384;
/// How long one node gets to answer one question.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a node's answer does not show a whole, healthy cluster.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterProbeError {
    /// No URLs at all: there is no cluster to ask.
    #[error("no Redis Cluster URLs given")]
    NoUrls,
    /// The node refused or failed the command (or the URL is not a Redis URL).
    #[error("{url}: {message}")]
    Redis { url: String, message: String },
    /// The node did not answer in time.
    #[error("{url}: no answer within {waited:?}")]
    Timeout { url: String, waited: Duration },
    /// The node answers but is not (yet) part of a healthy cluster.
    #[error("{url} reports cluster_state:{state}")]
    NotOk { url: String, state: String },
    /// The slot map leaves slots without a master.
    #[error("CLUSTER SLOTS from {url} assigns {covered} of {CLUSTER_SLOTS} slots")]
    SlotsUncovered { url: String, covered: u32 },
    /// `CLUSTER SLOTS` answered something this parser does not understand.
    #[error("{url}: unexpected CLUSTER SLOTS reply ({detail})")]
    BadReply { url: String, detail: String },
}

/// One contiguous range of slots (both ends included) and the master that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    /// `host:port` of the master, as the cluster announces it.
    pub master: String,
}

impl SlotRange {
    /// How many slots the range holds.
    pub fn slot_count(&self) -> u32 {
        u32::from(self.last).saturating_sub(u32::from(self.first)) + 1
    }

    /// Whether `slot` is in the range.
    pub fn contains(&self, slot: u16) -> bool {
        (self.first..=self.last).contains(&slot)
    }
}

/// The slot ranges `addr` holds (of the slot map `ranges`) and the shards (of `shard_slots`: shard
/// and its slot, `Keys::shard_slots`) in them.
pub fn holdings(addr: &str, ranges: &[SlotRange], shard_slots: &[(u16, u16)]) -> (Vec<(u16, u16)>, Vec<u16>) {
    let own: Vec<&SlotRange> = ranges.iter().filter(|r| r.master == addr).collect();
    let shards = shard_slots.iter().filter(|(_, slot)| own.iter().any(|r| r.contains(*slot))).map(|(s, _)| *s);
    (own.iter().map(|r| (r.first, r.last)).collect(), shards.collect())
}

/// A single-node connection to `url`, made within a second.
pub async fn node_connection(url: &str) -> Result<MultiplexedConnection, ClusterProbeError> {
    let redis_error = |e: redis::RedisError| ClusterProbeError::Redis { url: url.to_owned(), message: e.to_string() };
    let client = redis::Client::open(url).map_err(redis_error)?;
    bounded(url, client.get_multiplexed_async_connection()).await?.map_err(redis_error)
}

/// Runs one command on one node, bounded in time.
async fn ask<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Result<T, ClusterProbeError> {
    let mut conn = node_connection(url).await?;
    bounded(url, cmd.query_async::<T>(&mut conn))
        .await?
        .map_err(|e| ClusterProbeError::Redis { url: url.to_owned(), message: e.to_string() })
}

async fn bounded<T>(url: &str, work: impl std::future::Future<Output = T>) -> Result<T, ClusterProbeError> {
    tokio::time::timeout(NODE_TIMEOUT, work)
        .await
        .map_err(|_| ClusterProbeError::Timeout { url: url.to_owned(), waited: NODE_TIMEOUT })
}

/// The value of `field` in an `INFO`-style reply (`field:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

/// Ok when the node at `url` reports `cluster_state:ok`.
async fn node_state_ok(url: &str) -> Result<(), ClusterProbeError> {
    let info: String = ask(url, redis::cmd("CLUSTER").arg("INFO")).await?;
    match info_field(&info, "cluster_state") {
        Some("ok") => Ok(()),
        state => Err(ClusterProbeError::NotOk { url: url.to_owned(), state: state.unwrap_or("?").to_owned() }),
    }
}

/// The slot map as the node at `url` sees it, ordered by first slot.
pub async fn cluster_slots(url: &str) -> Result<Vec<SlotRange>, ClusterProbeError> {
    let reply: Vec<Value> = ask(url, redis::cmd("CLUSTER").arg("SLOTS")).await?;
    let mut ranges = reply
        .iter()
        .map(parse_slot_range)
        .collect::<Result<Vec<_>, String>>()
        .map_err(|detail| ClusterProbeError::BadReply { url: url.to_owned(), detail })?;
    ranges.sort_by_key(|r| r.first);
    Ok(ranges)
}

/// One entry of `CLUSTER SLOTS`: `[first, last, [host, port, id, ...], replicas...]`.
fn parse_slot_range(entry: &Value) -> Result<SlotRange, String> {
    let Value::Array(fields) = entry else { return Err(format!("entry is not an array: {entry:?}")) };
    let slot = |i: usize| -> Result<u16, String> {
        let value = fields.get(i).ok_or("entry too short")?;
        redis::from_redis_value_ref::<u16>(value).map_err(|e| e.to_string())
    };
    let (first, last) = (slot(0)?, slot(1)?);
    let Some(Value::Array(master)) = fields.get(2) else { return Err("no master in entry".into()) };
    let host = master.first().ok_or("master without host")?;
    let port = master.get(1).ok_or("master without port")?;
    let host: String = redis::from_redis_value_ref(host).map_err(|e| e.to_string())?;
    let port: u16 = redis::from_redis_value_ref(port).map_err(|e| e.to_string())?;
    if first > last {
        return Err(format!("range {first}-{last} is backwards"));
    }
    Ok(SlotRange { first, last, master: format!("{host}:{port}") })
}

/// The masters that hold slots, as `redis://host:port` URLs, in slot order.
pub async fn cluster_masters(url: &str) -> Result<Vec<String>, ClusterProbeError> {
    let by_master: BTreeMap<u16, String> =
        cluster_slots(url).await?.into_iter().map(|range| (range.first, range.master)).collect();
    let mut masters: Vec<String> = Vec::new();
    for master in by_master.into_values().map(|addr| format!("redis://{addr}")) {
        if !masters.contains(&master) {
            masters.push(master);
        }
    }
    Ok(masters)
}

/// Ok when every node in `urls` reports `cluster_state:ok` and the slot map the first one gives
/// assigns all 16384 slots — what a client needs before any key can be served.
pub async fn redis_cluster_ready(urls: &[String]) -> Result<(), ClusterProbeError> {
    let first = urls.first().ok_or(ClusterProbeError::NoUrls)?;
    for url in urls {
        node_state_ok(url).await?;
    }
    let covered: u32 = cluster_slots(first).await?.iter().map(SlotRange::slot_count).sum();
    if covered == CLUSTER_SLOTS {
        Ok(())
    } else {
        Err(ClusterProbeError::SlotsUncovered { url: first.clone(), covered })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_cluster_slots_entry_names_its_range_and_master() {
        let entry = Value::Array(vec![
            Value::Int(5461),
            Value::Int(10922),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(30002), bulk("abc")]),
        ]);
        let range = parse_slot_range(&entry).unwrap();
        assert_eq!(range, SlotRange { first: 5461, last: 10922, master: "127.0.0.1:30002".into() });
        assert_eq!(range.slot_count(), 5462);
        assert!(range.contains(5461) && range.contains(10922) && !range.contains(10923));
    }

    #[test]
    fn a_malformed_cluster_slots_entry_is_an_error_not_a_panic() {
        assert!(parse_slot_range(&Value::Int(1)).is_err());
        assert!(parse_slot_range(&Value::Array(vec![Value::Int(1)])).is_err());
        assert!(parse_slot_range(&Value::Array(vec![Value::Int(9), Value::Int(1), Value::Array(vec![])])).is_err());
        assert!(parse_slot_range(&Value::Array(vec![Value::Int(1), Value::Int(99_999)])).is_err());
    }

    #[test]
    fn info_fields_are_read_by_name() {
        let info = "# Cluster\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots"), None, "a prefix of another field's name is not the field");
        assert_eq!(info_field(info, "cluster_slots_assigned"), Some("16384"));
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_naming_the_url() {
        let url = format!("redis://127.0.0.1:{}", super::super::free_port());
        let error = redis_cluster_ready(std::slice::from_ref(&url)).await.unwrap_err();
        assert!(error.to_string().contains(&url), "{error}");
        assert!(matches!(redis_cluster_ready(&[]).await, Err(ClusterProbeError::NoUrls)));
    }
}
