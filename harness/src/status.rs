//! The state of a running cluster, per shard and per gateway, from the processes' own `/metrics`
//! (the same numbers Prometheus sees): stream lengths, pending entries, lag, lease owners and fencing
//! tokens, dead letters, and rates from two scrapes a sampling interval apart. On a Redis Cluster,
//! also per Redis node: the slots and shards it holds, its memory and load (`redis_nodes`).
//!
//! `ops status` renders it as a table, `ops dashboard` serves it as JSON, the drills' monitor watches
//! the backlog with it, and the end-to-end tests read it — one collector for all of them.

mod redis_nodes;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::ClusterState;
use crate::metrics::{self, sum, Sample};

pub use redis_nodes::RedisNodeStatus;

/// One shard.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShardStatus {
    pub shard: u16,
    /// The owning worker's `node` label, when some worker holds the lease.
    pub owner: Option<String>,
    pub fencing_token: Option<u64>,
    pub accepted_len: f64,
    pub to_save_len: f64,
    /// Unsaved entries: what admission control compares with `two_phase.max_backlog`.
    pub backlog: f64,
    pub pending: f64,
    pub lag: f64,
    pub oldest_pending_secs: f64,
    pub dead_letters: f64,
    pub accepted_per_sec: f64,
    pub delivered_per_sec: f64,
    pub saved_per_sec: f64,
}

/// One gateway.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GatewayStatus {
    pub node_id: u16,
    pub ws_url: String,
    pub up: bool,
    pub connections: f64,
    pub frames_in_per_sec: f64,
    pub accepted_per_sec: f64,
    pub errors_per_sec: f64,
}

/// The whole cluster.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterStatus {
    pub mode: String,
    /// Unix ms of the second scrape.
    pub at_ms: u64,
    pub shards: Vec<ShardStatus>,
    pub gateways: Vec<GatewayStatus>,
    pub workers_up: usize,
    pub workers: usize,
    /// The Redis Cluster's nodes (empty, and left out of the JSON, on one Redis server).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis_nodes: Vec<RedisNodeStatus>,
}

/// Every page of `urls`, scraped concurrently (`None` for a process that did not answer).
async fn scrape_all(urls: &[String]) -> Vec<Option<Vec<Sample>>> {
    let pages = futures_util::future::join_all(urls.iter().map(|u| metrics::scrape(u))).await;
    pages.into_iter().map(Result::ok).collect()
}

/// Scrapes every process twice, `interval` apart, and summarises.
pub async fn collect(state: &ClusterState, interval: Duration) -> ClusterStatus {
    let gw_urls: Vec<String> = state.gateways.iter().map(|g| g.metrics_url.clone()).collect();
    let wk_urls: Vec<String> = state.workers.iter().map(|w| w.metrics_url.clone()).collect();
    let (g0, w0) = (scrape_all(&gw_urls).await, scrape_all(&wk_urls).await);
    let started = Instant::now();
    // The Redis nodes are asked during the sampling interval, so they cost no extra time.
    let (redis_nodes, ()) = tokio::join!(redis_nodes::collect(state), tokio::time::sleep(interval));
    let (g1, w1) = (scrape_all(&gw_urls).await, scrape_all(&wk_urls).await);
    let secs = started.elapsed().as_secs_f64().max(0.001);
    ClusterStatus { redis_nodes, ..summarise(state, (&g0, &g1), (&w0, &w1), secs) }
}

/// [`sum`] over the samples of `node` only, when one is given.
fn sum_of_node<'a>(samples: &[Sample], name: &str, want: &[(&'a str, &'a str)], node: Option<&'a str>) -> f64 {
    let mut want = want.to_vec();
    want.extend(node.map(|node| ("node", node)));
    sum(samples, name, &want)
}

type Scrapes<'a> = (&'a [Option<Vec<Sample>>], &'a [Option<Vec<Sample>>]);

fn summarise(state: &ClusterState, gateways: Scrapes<'_>, workers: Scrapes<'_>, secs: f64) -> ClusterStatus {
    let all = |pages: &[Option<Vec<Sample>>]| pages.iter().flatten().flatten().cloned().collect::<Vec<Sample>>();
    let (g_before, g_now) = (all(gateways.0), all(gateways.1));
    let (w_before, w_now) = (all(workers.0), all(workers.1));
    let rate = |before: &[Sample], now: &[Sample], name: &str, want: &[(&str, &str)]| {
        ((sum(now, name, want) - sum(before, name, want)) / secs).max(0.0)
    };
    let shards = (0..state.shards)
        .map(|shard| {
            let s = shard.to_string();
            let by_shard = [("shard", s.as_str())];
            let owner = w_now
                .iter()
                .find(|x| x.name == "im_worker_lease_held" && x.value == 1.0 && x.labels.get("shard") == Some(&s));
            // A former owner that lost the lease (paused past it, now a standby) still exports the
            // stream gauges it last set: while someone owns the shard, only the owner's count.
            let owner_node = owner.and_then(|o| o.labels.get("node")).map(String::as_str);
            let gauge = |name: &str, want: &[(&str, &str)]| sum_of_node(&w_now, name, want, owner_node);
            let stream = |name: &str, stream: &str| gauge(name, &[("shard", s.as_str()), ("stream", stream)]);
            let token = w_now.iter().find(|x| {
                x.name == "im_worker_fencing_token"
                    && x.labels.get("shard") == Some(&s)
                    && owner.is_some_and(|o| o.labels.get("node") == x.labels.get("node"))
            });
            let (accepted_len, to_save_len) =
                (stream("im_stream_length", "accepted"), stream("im_stream_length", "to_save"));
            ShardStatus {
                shard,
                owner: owner.and_then(|o| o.labels.get("node").cloned()),
                fencing_token: token.map(|t| t.value as u64),
                accepted_len,
                to_save_len,
                backlog: accepted_len + to_save_len,
                pending: stream("im_stream_pending", "accepted") + stream("im_stream_pending", "to_save"),
                lag: stream("im_stream_consumer_lag", "accepted") + stream("im_stream_consumer_lag", "to_save"),
                oldest_pending_secs: stream("im_stream_oldest_pending_age_seconds", "accepted")
                    .max(stream("im_stream_oldest_pending_age_seconds", "to_save")),
                dead_letters: gauge("im_stream_dead_letter_length", &by_shard),
                accepted_per_sec: rate(&g_before, &g_now, "im_gateway_appends_total", &by_shard),
                delivered_per_sec: rate(&w_before, &w_now, "im_worker_delivered_total", &by_shard),
                saved_per_sec: rate(&w_before, &w_now, "im_worker_saved_total", &by_shard),
            }
        })
        .collect();
    let gateways = state
        .gateways
        .iter()
        .zip(gateways.0.iter().zip(gateways.1))
        .map(|(g, (before, now))| {
            let (before, now) = (before.clone().unwrap_or_default(), now.clone().unwrap_or_default());
            GatewayStatus {
                node_id: g.node_id,
                ws_url: g.ws_url.clone(),
                up: !now.is_empty(),
                connections: sum(&now, "im_gateway_connections", &[]),
                frames_in_per_sec: rate(&before, &now, "im_gateway_frames_in_total", &[]),
                accepted_per_sec: rate(&before, &now, "im_gateway_appends_total", &[]),
                errors_per_sec: rate(&before, &now, "im_gateway_errors_total", &[]),
            }
        })
        .collect();
    ClusterStatus {
        mode: state.mode.clone(),
        at_ms: im_common::ids::now_ms(),
        shards,
        gateways,
        workers_up: workers.1.iter().filter(|p| p.is_some()).count(),
        workers: state.workers.len(),
        redis_nodes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.to_owned(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            value,
        }
    }

    fn state() -> ClusterState {
        ClusterState {
            gateways: Vec::new(),
            workers: Vec::new(),
            redis_url: String::new(),
            mysql_url: String::new(),
            jwt_secret: String::new(),
            key_prefix: "im".into(),
            mode: "full".into(),
            shards: 1,
            config_path: std::path::PathBuf::new(),
            dir: std::path::PathBuf::new(),
            private_servers: Vec::new(),
            dashboard: None,
            redis_cluster: None,
        }
    }

    #[test]
    fn a_former_owners_stale_gauges_do_not_count_while_another_worker_owns_the_shard() {
        let page = |node: &str, held: f64, accepted_len: f64| {
            vec![
                sample("im_worker_lease_held", &[("shard", "0"), ("node", node)], held),
                sample("im_stream_length", &[("shard", "0"), ("stream", "accepted"), ("node", node)], accepted_len),
                sample("im_stream_length", &[("shard", "0"), ("stream", "to_save"), ("node", node)], 0.0),
                sample("im_stream_dead_letter_length", &[("shard", "0"), ("node", node)], 1.0),
            ]
        };
        // The former owner was paused past its lease: its gauges froze at 900 entries.
        let workers = vec![Some(page("old", 0.0, 900.0)), Some(page("new", 1.0, 4.0))];
        let status = summarise(&state(), (&[], &[]), (&workers, &workers), 1.0);
        let shard = &status.shards[0];
        assert_eq!(shard.owner.as_deref(), Some("new"));
        assert_eq!((shard.backlog, shard.dead_letters), (4.0, 1.0), "{shard:?}");
        // Nobody owns it: whatever the workers report is all there is.
        let workers = vec![Some(page("old", 0.0, 900.0))];
        let status = summarise(&state(), (&[], &[]), (&workers, &workers), 1.0);
        assert_eq!(status.shards[0].backlog, 900.0);
    }
}
