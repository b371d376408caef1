//! `ops status`: the cluster at a glance, per shard and per gateway, from the processes' own
//! `/metrics` (the same numbers Prometheus sees). Rates come from two scrapes a sampling interval
//! apart. Also the JSON behind `ops dashboard`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{http_get, ClusterState};

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (the subset our exporters write: no escaped quotes in labels).
pub fn parse_metrics(page: &str) -> Vec<Sample> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample { name: name.to_owned(), labels, value })
        })
        .collect()
}

/// Sum of `name` over samples whose labels include all of `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .fold(0.0, |total, s| total + s.value)
}

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
}

async fn scrape_all(urls: &[String]) -> Vec<Option<Vec<Sample>>> {
    let pages = futures_util::future::join_all(urls.iter().map(|u| http_get(u))).await;
    pages.into_iter().map(|p| p.filter(|(s, _)| *s == 200).map(|(_, body)| parse_metrics(&body))).collect()
}

/// Scrapes every process twice, `interval` apart, and summarises.
pub async fn collect(state: &ClusterState, interval: Duration) -> ClusterStatus {
    let gw_urls: Vec<String> = state.gateways.iter().map(|g| g.metrics_url.clone()).collect();
    let wk_urls: Vec<String> = state.workers.iter().map(|w| w.metrics_url.clone()).collect();
    let (g0, w0) = (scrape_all(&gw_urls).await, scrape_all(&wk_urls).await);
    let started = Instant::now();
    tokio::time::sleep(interval).await;
    let (g1, w1) = (scrape_all(&gw_urls).await, scrape_all(&wk_urls).await);
    let secs = started.elapsed().as_secs_f64().max(0.001);
    summarise(state, (&g0, &g1), (&w0, &w1), secs)
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
            let stream = |name: &str, stream: &str| sum(&w_now, name, &[("shard", s.as_str()), ("stream", stream)]);
            let owner = w_now
                .iter()
                .find(|x| x.name == "im_worker_lease_held" && x.value == 1.0 && x.labels.get("shard") == Some(&s));
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
                dead_letters: sum(&w_now, "im_stream_dead_letter_length", &by_shard),
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
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses() {
        let page = "# HELP x y\n# TYPE im_stream_length gauge\nim_stream_length{node=\"a\",shard=\"0\",stream=\"accepted\"} 12\nim_build_info 1\n";
        let s = parse_metrics(page);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["stream"], "accepted");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(sum(&s, "im_stream_length", &[("shard", "0")]), 12.0);
        assert_eq!(sum(&s, "im_stream_length", &[("shard", "1")]), 0.0);
    }
}
