//! The verdict of one drill run: the common checks (nothing receipted lost, no duplicate rows, no
//! reorders, every message answered, recovered after the fault) and each drill's own, with what was
//! measured, and its terminal rendering.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::chaos::panics_in_logs;
use super::faults::FaultWindow;
use super::monitor::Sample;
use super::session::DrillRun;
use super::{ChaosReport, Drill};
use crate::checker::{self, LostPush, RecipientVerdict, Reorder, RowVerdict};
use crate::load::{LoadResult, SLOW_RECEIVER_PREFIX};
use crate::recorder::Percentiles;

mod render;

/// overload: the bound on the admitted messages' saved p99, ms — issue 14's goal (5 s before it,
/// 1 s while admission was still tuned). Every run since the save stage was pipelined held it,
/// on fast and slow boxes alike: 233–449 ms in nine runs (docs/RELIABILITY.md, drills of
/// sessions 11–15); the one miss before (642 ms) was on a box with half the capacity of the
/// slowest of those.
const OVERLOAD_SAVED_P99_BOUND_MS: f64 = 500.0;
/// overload: the bound on any gateway's or worker's resident memory, MiB.
const OVERLOAD_RSS_BOUND_MIB: f64 = 1024.0;
/// slow-consumers: the fast receivers' E2E p99 bound without a control run, ms.
const SLOW_CONSUMERS_DEFAULT_BOUND_MS: f64 = 250.0;
/// slow-consumers: the bound is never tighter than the control's p99 plus this, ms.
const SLOW_CONSUMERS_MIN_HEADROOM_MS: f64 = 50.0;
/// Reorders and lost pushes listed in a verdict (all are counted).
const REORDER_EXAMPLES: usize = 10;
const LOST_EXAMPLES: usize = 10;
/// chaos: the only `ERROR` a message may be answered with — Redis restarts (fail-open's order guard),
/// load shedding while the cluster catches up, the shard backlog bound.
const CHAOS_ALLOWED_ERRORS: [&str; 1] = ["server_busy"];

/// One named check beyond the common ones.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// What was measured.
    pub detail: String,
}

impl Check {
    pub(super) fn new(name: &str, passed: bool, detail: impl Into<String>) -> Check {
        Check { name: name.to_owned(), passed, detail: detail.into() }
    }
}

/// What one drill run found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillVerdict {
    pub drill: Drill,
    /// `fail_open=true`, `appendfsync=always`, ...
    pub variant: String,
    pub fault_secs: f64,
    pub connections: usize,
    pub offered_rate: f64,
    pub sent: u64,
    pub accepted: u64,
    pub saved: u64,
    /// Messages answered with an `ERROR` (see `errors_by_reason`).
    pub errored: u64,
    /// Neither `ACK(saved)` nor `ERROR` by the end of the drain.
    pub unanswered: u64,
    /// The first unanswered messages: `sender #number → to (accepted id, resends, delivered)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unanswered_examples: Vec<String>,
    pub delivered: u64,
    /// Receipted messages never pushed to their receiver plus receipted messages without a row.
    pub lost: u64,
    pub lost_pushes: u64,
    /// Of the lost pushes, those whose id is below the highest id their receiver saw from anyone: a
    /// delivered cursor at the receiver's high-water mark lies beyond them (issue 12).
    pub lost_below_receivers_highest_seen: u64,
    /// Of the lost pushes, those whose receiver got a later message of the same sender (a gap in
    /// one conversation, not only behind another sender's newer id).
    pub lost_with_later_from_same_sender_seen: u64,
    /// The first lost pushes, described.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_examples: Vec<LostPush>,
    pub missing_rows: u64,
    /// Receipted, not pushed, to a receiver that could not stay or get connected.
    pub undelivered_receiver_gone: u64,
    pub duplicate_rows: u64,
    pub duplicate_deliveries: u64,
    pub reorders: u64,
    /// Of the reorders, those on a connection a receiver opened by reconnecting (an older message
    /// that arrived by the sync at connect after a newer live one on that connection).
    pub reorders_after_reconnect: u64,
    /// Of the reorders, those a sync does not explain (first connection, no gap sync of that
    /// sender before): pushes that left the engine out of order (SPEC §3.4). Must be 0. The others
    /// are a sync's pushes interleaving with live ones, which docs/PROTOCOL.md allows.
    pub reorders_live: u64,
    /// The first reorders, with where they happened.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reorder_examples: Vec<Reorder>,
    /// Pushes, receipts and rows whose serverMsgId disagrees with another one of the same message.
    pub id_mismatches: u64,
    /// Messages (sender, clientMsgId) seen under more than one serverMsgId anywhere: receipts,
    /// answers to resends, pushes, rows (SPEC §3.9). Must be 0 for any drill to pass.
    pub messages_with_several_ids: u64,
    /// Messages with an `ACK(saved)` whose serverMsgId has no row, or a row of another (from,
    /// clientMsgId) (SPEC §3.9). Must be 0 for any drill to pass.
    pub saved_without_matching_row: u64,
    /// Client reconnects (load with reconnect on).
    pub reconnects: u64,
    /// How the receivers confirmed (`seq`, `id`, `none`), and the `ACK delivered` / `ACK read`
    /// frames they sent.
    pub acks: String,
    pub delivered_acks: u64,
    pub read_acks: u64,
    /// `RECEIPT` frames the senders got.
    pub receipts: u64,
    /// Per receiving device: missing messages, seq gaps, receipts (SPEC §3.10–3.11; see
    /// [`checker::RecipientVerdict`]). Its counts that must be 0 fail the verdict.
    #[serde(flatten)]
    pub recipients: RecipientVerdict,
    /// Highest total backlog seen (unsaved stream entries, all shards).
    pub backlog_peak: f64,
    /// Backlog before the fault (highest sample), the level "recovered" returns to.
    pub backlog_before: f64,
    /// From the end of the fault until the backlog is back to its pre-fault level and saves flow.
    pub time_to_recover_secs: Option<f64>,
    pub saved_ms: Percentiles,
    pub end_to_end_ms: Percentiles,
    /// Peak resident memory per process, MiB.
    pub rss_peak_mib: BTreeMap<String, f64>,
    pub errors_by_reason: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    /// chaos: the seed and what the schedule injected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<ChaosReport>,
    pub passed: bool,
    /// The run directory of this drill (cluster logs, verdict JSON).
    pub dir: PathBuf,
}

impl DrillRun<'_> {
    pub fn verdict(
        &mut self,
        result: &LoadResult,
        rows: &RowVerdict,
        samples: &[Sample],
        fault: FaultWindow,
        mut checks: Vec<Check>,
        control_e2e_p99: Option<f64>,
    ) -> DrillVerdict {
        let spec = self.spec;
        let v = &result.verdict;
        let before: f64 = samples.iter().filter(|s| s.at < fault.began).map(|s| s.backlog).fold(0.0, f64::max);
        let peak = samples.iter().map(|s| s.backlog).fold(0.0, f64::max);
        let recovered = samples
            .iter()
            .find(|s| s.at >= fault.ended && s.backlog <= before && (s.saved_per_sec > 0.0 || s.backlog == 0.0));
        let time_to_recover = recovered.map(|s| s.at.saturating_duration_since(fault.ended).as_secs_f64());
        let mut rss: BTreeMap<String, f64> = BTreeMap::new();
        for s in samples {
            for (name, mib) in &s.rss_mib {
                let e = rss.entry(name.clone()).or_default();
                *e = e.max(*mib);
            }
        }
        let errors = result.errors.clone();
        let saved_ms = Percentiles::of(&result.histograms.saved);
        let e2e = Percentiles::of(&result.histograms.end_to_end);
        checks.push(Check::new(
            "every_message_answered",
            v.unanswered == 0,
            format!("{} messages without ACK(saved) or ERROR after the drain", v.unanswered),
        ));
        checks.push(Check::new(
            "recovered",
            time_to_recover.is_some(),
            time_to_recover.map_or_else(
                || "the backlog never returned to its pre-fault level with saves flowing".to_owned(),
                |t| format!("{t:.1} s after the fault ended"),
            ),
        ));
        let busy_like = |reason: &str| matches!(reason, "server_busy" | "too_many_requests");
        match spec.drill {
            Drill::DbOutage => {
                checks.push(Check::new(
                    "accepted_during_outage",
                    v.errored == 0 && v.accepted == v.sent,
                    format!("{} of {} sent got ACK(accepted); {} errors", v.accepted, v.sent, v.errored),
                ));
                checks.push(Check::new(
                    "backlog_grew_and_drained",
                    peak > before,
                    format!("backlog {before:.0} before, peak {peak:.0}"),
                ));
            }
            Drill::RedisOutage => {
                let open = self.variant.contains("fail_open=true");
                let busy = errors.get("server_busy").copied().unwrap_or(0);
                if open {
                    // Saved without ACK(accepted): taken by the baseline path. A connection whose earlier
                    // messages were still in the stream gets server_busy instead (order, SPEC §3.4).
                    let other: u64 = errors.iter().filter(|(k, _)| k.as_str() != "server_busy").map(|(_, n)| n).sum();
                    let baseline = v.saved.saturating_sub(v.accepted);
                    checks.push(Check::new(
                        "saved_through_baseline_path",
                        baseline > 0 && other == 0,
                        format!(
                            "{baseline} saved through the baseline path; {busy} server_busy (connections with \
                             messages still in the stream); {other} other errors"
                        ),
                    ));
                } else {
                    let other: u64 = errors.iter().filter(|(k, _)| !busy_like(k)).map(|(_, n)| n).sum();
                    checks.push(Check::new(
                        "server_busy_while_down",
                        busy > 0,
                        format!("{busy} server_busy answers; {other} other errors"),
                    ));
                }
            }
            Drill::RedisRestart => {}
            Drill::WorkerKill => {}
            Drill::GatewayRestart => {
                checks.push(Check::new(
                    "clients_reconnected",
                    result.reconnects > 0,
                    format!("{} reconnects", result.reconnects),
                ));
            }
            Drill::SlowConsumers => {
                let fast = Percentiles::of(&result.histograms.end_to_end).p99;
                let bound = control_e2e_p99
                    .map(|c| (c * spec.slow_p99_factor).max(c + SLOW_CONSUMERS_MIN_HEADROOM_MS))
                    .unwrap_or(SLOW_CONSUMERS_DEFAULT_BOUND_MS);
                checks.push(Check::new(
                    "fast_receivers_unaffected",
                    fast <= bound,
                    format!("fast receivers' E2E p99 {fast:.1} ms, bound {bound:.1} ms"),
                ));
                let disconnects = |slow: bool| -> u64 {
                    errors
                        .iter()
                        .filter(|(k, _)| k.starts_with(SLOW_RECEIVER_PREFIX) == slow)
                        .filter(|(k, _)| k.contains("closed_") || k.contains("disconnected"))
                        .map(|(_, n)| n)
                        .sum()
                };
                let (dropped, fast_dropped) = (disconnects(true), disconnects(false));
                let with_reason = errors.get(&format!("{}closed_slow_consumer", SLOW_RECEIVER_PREFIX));
                checks.push(Check::new(
                    "slow_receivers_disconnected",
                    dropped > 0,
                    format!(
                        "{dropped} slow receiver disconnects ({} with the close frame `slow_consumer`; a writer \
                         stuck on a full socket cannot send it); {} reconnects",
                        with_reason.copied().unwrap_or(0),
                        result.reconnects
                    ),
                ));
                checks.push(Check::new(
                    "fast_receivers_kept",
                    fast_dropped == 0,
                    format!("{fast_dropped} disconnects of fast receivers"),
                ));
                checks.push(Check::new(
                    "slow_receivers_recovered",
                    v.undelivered_receiver_gone == 0 && v.lost == 0,
                    format!("{} undelivered, {} lost", v.undelivered_receiver_gone, v.lost),
                ));
            }
            Drill::RecipientChurn => {
                let r = &result.recipients;
                let churned = errors.get(crate::load::CHURN_CLOSE_LABEL).copied().unwrap_or(0);
                checks.push(Check::new(
                    "receivers_churned",
                    churned > 0 && result.reconnects > 0,
                    format!("{churned} devices left on their own; {} reconnects", result.reconnects),
                ));
                checks.push(Check::new(
                    "devices_mixed",
                    r.multi_device_users > 0 && r.own_position_syncs > 0,
                    format!(
                        "{} users with two devices; {} reconnections with the device's own positions",
                        r.multi_device_users, r.own_position_syncs
                    ),
                ));
                checks.push(Check::new(
                    "receivers_connected_at_the_end",
                    r.devices_gone == 0,
                    format!("{} devices not connected at the end", r.devices_gone),
                ));
            }
            Drill::Chaos => {
                let mut other: BTreeMap<&str, u64> = BTreeMap::new();
                let mut allowed = 0;
                for reason in result.senders.iter().flat_map(|s| &s.messages).filter_map(|m| m.error.as_deref()) {
                    if CHAOS_ALLOWED_ERRORS.contains(&reason) {
                        allowed += 1;
                    } else {
                        *other.entry(reason).or_default() += 1;
                    }
                }
                let listed: Vec<String> = other.iter().map(|(k, n)| format!("{k} {n}")).collect();
                checks.push(Check::new(
                    "only_allowed_errors",
                    other.is_empty(),
                    format!(
                        "{allowed} messages answered {} (allowed); other errors: {}",
                        CHAOS_ALLOWED_ERRORS.join("/"),
                        if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
                    ),
                ));
                let panics = panics_in_logs(&self.cluster.snapshot().dir);
                let listed: Vec<String> =
                    panics.iter().map(|(log, n, first)| format!("{log}: {n} (first: {first})")).collect();
                checks.push(Check::new(
                    "no_panics",
                    panics.is_empty(),
                    if panics.is_empty() {
                        "no panic in any gateway or worker log".to_owned()
                    } else {
                        listed.join("; ")
                    },
                ));
                checks.push(Check::new(
                    "receivers_connected_at_the_end",
                    v.undelivered_receiver_gone == 0,
                    format!(
                        "{} receipted messages undelivered to receivers that could not reconnect; {} reconnects",
                        v.undelivered_receiver_gone, result.reconnects
                    ),
                ));
            }
            Drill::Overload => {
                let rejected: u64 = errors.iter().filter(|(k, _)| busy_like(k)).map(|(_, n)| n).sum();
                let other: u64 = errors.iter().filter(|(k, _)| !busy_like(k)).map(|(_, n)| n).sum();
                checks.push(Check::new(
                    "rest_refused_clearly",
                    other == 0,
                    format!("{rejected} server_busy/too_many_requests, {other} other errors"),
                ));
                checks.push(Check::new(
                    "admitted_p99_bounded",
                    saved_ms.p99 <= OVERLOAD_SAVED_P99_BOUND_MS,
                    format!(
                        "admitted messages' saved p99 {:.0} ms (bound {OVERLOAD_SAVED_P99_BOUND_MS:.0} ms)",
                        saved_ms.p99
                    ),
                ));
                let max_rss = rss.values().copied().fold(0.0, f64::max);
                checks.push(Check::new(
                    "memory_bounded",
                    max_rss <= OVERLOAD_RSS_BOUND_MIB,
                    format!("largest gateway/worker RSS {max_rss:.0} MiB (bound {OVERLOAD_RSS_BOUND_MIB:.0} MiB)"),
                ));
            }
        }
        let reorders = checker::reorders(&result.receivers);
        let delivered: std::collections::HashSet<(u64, u64)> =
            result.receivers.iter().flat_map(|r| r.deliveries.iter().map(|d| (d.from, d.number))).collect();
        let unanswered_examples: Vec<String> = result
            .senders
            .iter()
            .flat_map(|s| s.messages.iter().enumerate().map(move |(n, m)| (s, n, m)))
            .filter(|(_, _, m)| m.saved.is_none() && m.error.is_none())
            .take(LOST_EXAMPLES)
            .map(|(s, n, m)| {
                format!(
                    "{} #{n} → {} (accepted {:?}, {} resends, {})",
                    s.uid,
                    m.to.unwrap_or(s.to),
                    m.accepted,
                    m.resends,
                    if delivered.contains(&(s.uid, n as u64)) { "delivered" } else { "not delivered" }
                )
            })
            .collect();
        let lost_pushes = checker::lost_pushes(&result.senders, &result.receivers);
        let lost = v.lost + rows.missing;
        let reorders_live = reorders.iter().filter(|o| !o.by_sync()).count() as u64;
        let recipients = result.recipients.clone();
        let recipient_problems = recipients.problems(self.load.receiver_acks().confirms());
        checks.push(Check::new(
            "recipients_lose_nothing",
            recipient_problems.is_empty(),
            if recipient_problems.is_empty() {
                format!(
                    "every one of {} devices got every message owed, seqs without gaps{}",
                    recipients.devices,
                    if self.load.receiver_acks().confirms() { ", receipts up to the last seq" } else { "" }
                )
            } else {
                recipient_problems.iter().map(|(n, what)| format!("{n} {what}")).collect::<Vec<_>>().join("; ")
            },
        ));
        let passed = lost == 0
            && rows.duplicated == 0
            && reorders_live == 0
            && rows.messages_with_several_ids == 0
            && rows.saved_without_matching_row == 0
            && checks.iter().all(|c| c.passed);
        DrillVerdict {
            drill: spec.drill,
            variant: self.variant.clone(),
            fault_secs: fault.ended.saturating_duration_since(fault.began).as_secs_f64(),
            connections: self.load.connections,
            offered_rate: self.load.offered_rate(),
            sent: v.sent,
            accepted: v.accepted,
            saved: v.saved,
            errored: v.errored,
            unanswered: v.unanswered,
            unanswered_examples,
            delivered: v.delivered,
            lost,
            lost_pushes: v.lost,
            lost_below_receivers_highest_seen: lost_pushes.iter().filter(|l| l.below_receivers_highest_seen).count()
                as u64,
            lost_with_later_from_same_sender_seen: lost_pushes.iter().filter(|l| l.later_from_same_sender_seen).count()
                as u64,
            lost_examples: lost_pushes.into_iter().take(LOST_EXAMPLES).collect(),
            missing_rows: rows.missing,
            undelivered_receiver_gone: v.undelivered_receiver_gone,
            duplicate_rows: rows.duplicated,
            duplicate_deliveries: v.duplicates,
            reorders: v.reorders,
            reorders_after_reconnect: reorders.iter().filter(|o| o.connection > 0).count() as u64,
            reorders_live,
            reorder_examples: reorders.into_iter().take(REORDER_EXAMPLES).collect(),
            id_mismatches: v.id_mismatches + rows.id_mismatches,
            messages_with_several_ids: rows.messages_with_several_ids,
            saved_without_matching_row: rows.saved_without_matching_row,
            reconnects: result.reconnects,
            acks: format!("{:?}", self.load.receiver_acks()).to_lowercase(),
            delivered_acks: result.delivered_acks,
            read_acks: result.read_acks,
            receipts: result.receipts,
            recipients,
            backlog_peak: peak,
            backlog_before: before,
            time_to_recover_secs: time_to_recover,
            saved_ms,
            end_to_end_ms: e2e,
            rss_peak_mib: rss,
            errors_by_reason: errors,
            checks,
            notes: std::mem::take(&mut self.notes),
            chaos: self.chaos.take(),
            passed,
            dir: self.dir.clone(),
        }
    }
}
