//! `ops canary`: one message through every shard, end to end, timed.
//!
//! For each shard it picks a fresh sender that hashes to that shard, sends one message from a
//! connection on one gateway to a recipient on another, and reports when `ACK(accepted)`,
//! `ACK(saved)` and the push arrived. A shard that does not complete within the timeout fails the run.

use std::time::{Duration, Instant};

use serde::Serialize;

use im_common::shard::shard_of;
use im_harness::cluster::ClusterState;
use im_harness::ws::Client;

/// Canary users are taken from this id on, clear of ordinary ones.
const CANARY_USERS_FROM: u64 = 9_000_000_000;
/// How many distinct canary runs (one per millisecond) get disjoint users before ids repeat.
const CANARY_USER_SPAN: u64 = 1_000_000_000;

/// What one shard's canary saw (milliseconds from send; `None` = never within the timeout).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CanaryResult {
    pub shard: u16,
    pub sender: u64,
    pub accepted_ms: Option<f64>,
    pub saved_ms: Option<f64>,
    pub delivered_ms: Option<f64>,
    pub error: Option<String>,
}

impl CanaryResult {
    /// Whether the message went all the way (accepted only counts in two-phase modes).
    pub fn ok(&self, two_phase: bool) -> bool {
        self.error.is_none()
            && self.saved_ms.is_some()
            && self.delivered_ms.is_some()
            && (!two_phase || self.accepted_ms.is_some())
    }
}

/// Runs a canary through every shard, one after the other.
pub async fn run(state: &ClusterState, timeout: Duration) -> Vec<CanaryResult> {
    // Fresh users per run: idempotency windows of earlier runs never match.
    let base = CANARY_USERS_FROM + im_common::ids::now_ms() % CANARY_USER_SPAN * 4;
    let mut results = Vec::new();
    for shard in 0..state.shards {
        let sender = (base..).step_by(2).find(|&u| shard_of(u, state.shards) == shard).unwrap_or(base);
        results.push(one(state, shard, sender, timeout).await);
    }
    results
}

async fn one(state: &ClusterState, shard: u16, sender: u64, timeout: Duration) -> CanaryResult {
    let mut result = CanaryResult { shard, sender, accepted_ms: None, saved_ms: None, delivered_ms: None, error: None };
    let n = state.gateways.len();
    let (from_url, to_url) =
        (&state.gateways[shard as usize % n].ws_url, &state.gateways[(shard as usize + 1) % n].ws_url);
    let recipient = sender + 1;
    let (mut from, mut to) = match tokio::try_join!(
        Client::connect(from_url, &state.jwt_secret, sender),
        Client::connect(to_url, &state.jwt_secret, recipient)
    ) {
        Ok(pair) => pair,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    let cmid = format!("canary-{shard}");
    let start = Instant::now();
    if let Err(e) = from.chat(recipient, &cmid, "canary").await {
        result.error = Some(e.to_string());
        return result;
    }
    let ms = |at: Instant| at.duration_since(start).as_secs_f64() * 1000.0;
    let deadline = start + timeout;
    let sender_side = async {
        while result.saved_ms.is_none() {
            let Some(v) = from.next_within(deadline.saturating_duration_since(Instant::now())).await else { break };
            match (v["type"].as_str(), v["ackType"].as_str()) {
                (Some("ACK"), Some("accepted")) => result.accepted_ms = Some(ms(Instant::now())),
                (Some("ACK"), Some("saved")) => result.saved_ms = Some(ms(Instant::now())),
                (Some("ERROR"), _) => {
                    result.error = Some(format!("ERROR {}", v["reason"].as_str().unwrap_or("?")));
                    break;
                }
                _ => {}
            }
        }
    };
    let recipient_side = async {
        loop {
            let v = to.next_within(deadline.saturating_duration_since(Instant::now())).await?;
            if v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid.as_str() {
                return Some(ms(Instant::now()));
            }
        }
    };
    let ((), delivered) = tokio::join!(sender_side, recipient_side);
    result.delivered_ms = delivered;
    result
}

/// The terminal table of a canary run: one line per shard with its timings, `ok` or what failed.
pub fn render(results: &[CanaryResult], two_phase: bool) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let mut out = format!("{:>5} {:>12} {:>12} {:>12}  result\n", "shard", "accepted_ms", "saved_ms", "delivered_ms");
    for r in results {
        let verdict = if r.ok(two_phase) { "ok".to_owned() } else { r.error.clone().unwrap_or("TIMEOUT".into()) };
        out.push_str(&format!(
            "{:>5} {:>12} {:>12} {:>12}  {verdict}\n",
            r.shard,
            ms(r.accepted_ms),
            ms(r.saved_ms),
            ms(r.delivered_ms)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_each_shard_and_what_failed() {
        let ok = CanaryResult {
            shard: 0,
            sender: 1,
            accepted_ms: Some(1.25),
            saved_ms: Some(3.0),
            delivered_ms: Some(2.0),
            error: None,
        };
        let lost = CanaryResult { shard: 1, saved_ms: None, ..ok.clone() };
        let table = render(&[ok, lost], true);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].ends_with("1.2          3.0          2.0  ok"), "{table}");
        assert!(lines[2].trim_start().starts_with('1') && lines[2].ends_with("TIMEOUT"), "{table}");
    }
}
