//! `ops canary`: one message through every shard, end to end, timed.
//!
//! For each shard it picks a fresh sender that hashes to that shard, sends one message from a
//! connection on one gateway to a recipient on another, and reports when `ACK(accepted)`,
//! `ACK(saved)` and the push arrived. A shard that does not complete within the timeout fails the run.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Client;
use crate::cluster::ClusterState;
use im_common::shard::shard_of;

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
    let base = 9_000_000_000 + im_common::ids::now_ms() % 1_000_000_000 * 4;
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
            let Some(v) = from.next(deadline.saturating_duration_since(Instant::now())).await else { break };
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
            let v = to.next(deadline.saturating_duration_since(Instant::now())).await?;
            if v["type"] == "SINGLE_CHAT" && v["clientMsgId"] == cmid.as_str() {
                return Some(ms(Instant::now()));
            }
        }
    };
    let ((), delivered) = tokio::join!(sender_side, recipient_side);
    result.delivered_ms = delivered;
    result
}
