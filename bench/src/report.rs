//! The result of a run as numbers: [`RunReport`] (serialized as the `--json` output and the per-run
//! files of `compare`), its readable summary, and the markdown table that compares runs.
//!
//! Units are in the field names' documentation: latencies in milliseconds, rates per second, CPU in
//! seconds and microseconds per message. Counts cover every message of the run (warm-up included);
//! latencies, rates and CPU cover the measured window only.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::checker::{DeliveryVerdict, RecipientVerdict, RowVerdict};
use crate::cpu::ProcessCpu;
use crate::load::LoadResult;
use crate::recorder::Percentiles;
use crate::redis_nodes::{self, RedisNodeLoad};

/// The load as it was offered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    pub connections: usize,
    pub senders: usize,
    pub gateways: usize,
    pub interval_ms: f64,
    pub closed_loop: bool,
    pub body_bytes: usize,
    /// Pause between the last connection and the first send.
    pub settle_secs: f64,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    /// The drain allowance, and how much of it the run needed.
    pub drain_secs: f64,
    pub drain_used_secs: f64,
    /// `header` or `frame`.
    pub auth: String,
    /// `json` or `msgpack`.
    #[serde(default)]
    pub encoding: String,
    /// How receivers confirmed: `seq`, `id` or `none` (and `read` too).
    #[serde(default)]
    pub acks: String,
    #[serde(default)]
    pub ack_read: bool,
    /// Fraction of receiving users with two devices.
    #[serde(default)]
    pub two_devices: f64,
}

/// Connection outcomes and setup latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub connect_ok: u64,
    pub connect_fail: u64,
    pub auth_ok: u64,
    pub auth_fail: u64,
    /// TCP connect through the first `PONG`.
    pub connect_ms: Percentiles,
}

/// Message counts (see [`crate::checker`] for the definitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageCounts {
    /// The checker's counts (`accepted` and `saved` appear as `ack_accepted`, `ack_saved`).
    #[serde(flatten)]
    pub counts: DeliveryVerdict,
    /// `ack_accepted / sent`, `ack_saved / sent`, in percent.
    pub ack_accepted_pct: f64,
    pub ack_saved_pct: f64,
    /// Messages that failed in any way (errored or unanswered) per message sent, in percent.
    pub error_pct: f64,
}

/// Latency percentiles in milliseconds, over messages sent in the measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// Send → `ACK(accepted)`.
    pub accepted: Percentiles,
    /// Send → `ACK(saved)`.
    pub saved: Percentiles,
    /// Send → push received by the recipient.
    pub e2e: Percentiles,
    /// Generator lateness against its schedule; large values mean the bench itself was overloaded.
    pub send_lag: Percentiles,
}

/// Throughput over the measured window, messages per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub offered: f64,
    pub sent: f64,
    pub saved: f64,
    pub delivered: f64,
}

/// CPU used over the measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    pub window_secs: f64,
    pub cores: usize,
    pub processes: Vec<ProcessCpu>,
    /// Sum over the cluster's processes (gateways, workers, Redis, MariaDB).
    pub cluster_cpu_secs: f64,
    /// The bench process, reported apart (it shares the machine).
    pub bench_cpu_secs: Option<f64>,
    /// `cluster_cpu_secs` per message sent in the window, in microseconds.
    pub cluster_us_per_msg: Option<f64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `baseline`, `accepted-only` or `full`.
    pub mode: String,
    /// Unix ms when the run began.
    pub started_at_ms: u64,
    /// The run's users are `base_uid ..= base_uid + connections - 1`: senders first, then receivers.
    pub base_uid: u64,
    pub load: LoadSummary,
    pub connections: ConnectionReport,
    pub messages: MessageCounts,
    pub latency_ms: Latencies,
    pub rates: Rates,
    /// Server `ERROR` reasons, client-side failures (`connect_*`, `closed_*`, `disconnected`), and
    /// `no_saved_ack` / `no_accepted_ack` for receipts still missing after the drain.
    pub errors_by_reason: BTreeMap<String, u64>,
    /// The row check (`None` when no database was given).
    pub db: Option<RowVerdict>,
    /// Per receiving device: missing messages, seq gaps, receipts (with the rows' seqs when the row
    /// check ran).
    #[serde(default)]
    pub recipients: RecipientVerdict,
    pub cpu: CpuReport,
    /// On a Redis Cluster, what each master served over the measured window: its shards, calls,
    /// calls per message, busiest commands (absent on one Redis server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_nodes: Vec<RedisNodeLoad>,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

impl RunReport {
    /// Assembles the report of a run and its row check.
    pub fn new(r: &LoadResult, db: Option<RowVerdict>) -> RunReport {
        let v = &r.verdict;
        let two_phase = r.mode != im_common::config::Mode::Baseline;
        let mut errors = r.errors.clone();
        let mut add = |reason: &str, n: u64| {
            if n > 0 {
                *errors.entry(reason.to_owned()).or_default() += n;
            }
        };
        add("no_saved_ack", v.unanswered);
        let no_accepted = r
            .senders
            .iter()
            .flat_map(|s| &s.messages)
            .filter(|m| two_phase && m.saved.is_some() && m.accepted.is_none() && m.error.is_none())
            .count();
        add("no_accepted_ack", no_accepted as u64);

        let cluster_cpu_secs: f64 = r.cpu.iter().filter_map(|p| p.cpu_secs).sum();
        let per_sec = |n: u64| n as f64 / r.window.secs;
        RunReport {
            mode: r.mode.as_str().to_owned(),
            started_at_ms: r.started_at_ms,
            base_uid: r.base_uid,
            load: LoadSummary {
                connections: r.spec.pairs() * 2,
                senders: r.spec.pairs(),
                gateways: r.gateways,
                interval_ms: r.spec.interval.as_secs_f64() * 1000.0,
                closed_loop: r.spec.closed_loop,
                body_bytes: r.spec.body_bytes,
                settle_secs: r.spec.settle.as_secs_f64(),
                warmup_secs: r.spec.warmup.as_secs_f64(),
                duration_secs: r.spec.duration.as_secs_f64(),
                drain_secs: r.spec.drain.as_secs_f64(),
                drain_used_secs: r.drain_used.as_secs_f64(),
                auth: r.spec.auth.as_str().to_owned(),
                encoding: r.spec.encoding.as_str().to_owned(),
                acks: format!("{:?}", r.spec.receiver_acks()).to_lowercase(),
                ack_read: r.spec.ack_read,
                two_devices: r.spec.two_devices,
            },
            connections: ConnectionReport {
                connect_ok: r.connections.connect_ok,
                connect_fail: r.connections.connect_fail,
                auth_ok: r.connections.auth_ok,
                auth_fail: r.connections.auth_fail,
                connect_ms: Percentiles::of(&r.histograms.connect),
            },
            messages: MessageCounts {
                counts: v.clone(),
                ack_accepted_pct: pct(v.accepted, v.sent),
                ack_saved_pct: pct(v.saved, v.sent),
                error_pct: pct(v.errored + v.unanswered, v.sent),
            },
            latency_ms: Latencies {
                accepted: Percentiles::of(&r.histograms.accepted),
                saved: Percentiles::of(&r.histograms.saved),
                e2e: Percentiles::of(&r.histograms.end_to_end),
                send_lag: Percentiles::of(&r.histograms.send_lag),
            },
            rates: Rates {
                offered: if r.spec.closed_loop { per_sec(r.window.sent) } else { r.spec.offered_rate() },
                sent: per_sec(r.window.sent),
                saved: per_sec(r.window.saved),
                delivered: per_sec(r.window.delivered),
            },
            errors_by_reason: errors,
            db,
            recipients: r.recipients.clone(),
            cpu: CpuReport {
                window_secs: r.window.secs,
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                processes: r.cpu.clone(),
                cluster_cpu_secs,
                bench_cpu_secs: r.bench_cpu_secs,
                cluster_us_per_msg: (r.window.sent > 0).then(|| cluster_cpu_secs * 1e6 / r.window.sent as f64),
            },
            redis_nodes: r.redis_nodes.clone(),
        }
    }

    /// Total count of failures by reason.
    pub fn errors_total(&self) -> u64 {
        self.errors_by_reason.values().sum()
    }

    /// What the checker found wrong: empty for a run where every message was answered, delivered
    /// once, in order, and saved once.
    pub fn problems(&self) -> Vec<String> {
        let m = &self.messages.counts;
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(self.connections.connect_fail, "connections failed");
        check(self.connections.auth_fail, "authentications refused");
        check(m.lost, "messages lost (receipted, never delivered)");
        check(m.undelivered_receiver_gone, "messages undelivered to a receiver that dropped");
        check(m.duplicates, "duplicate deliveries");
        check(m.reorders, "per-sender reorders");
        check(m.id_mismatches, "serverMsgId mismatches");
        check(m.unexpected, "unexpected pushes");
        check(m.errored, "messages answered with ERROR");
        check(m.unanswered, "messages without ACK(saved) after the drain");
        if let Some(db) = &self.db {
            check(db.missing, "receipted messages missing from the DB");
            check(db.duplicated, "duplicate rows in the DB");
            check(db.id_mismatches, "rows stored under another id");
            check(db.messages_with_several_ids, "messages under several serverMsgIds");
            check(db.saved_without_matching_row, "ACK(saved) without a row of that message");
        }
        let receipts_expected = self.load.acks != "none";
        for (n, what) in self.recipients.problems(receipts_expected) {
            check(n, what);
        }
        out
    }
}

fn ms(p: &Percentiles) -> String {
    if p.count == 0 {
        "–".into()
    } else {
        format!("{:.2} / {:.2}", p.p50, p.p99)
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (l, conn, m) = (&self.load, &self.connections, &self.messages);
        let c = &m.counts;
        writeln!(
            f,
            "mode {}: {} connections ({} senders) over {} gateways, {} every {:.0} ms, {} B bodies{}",
            self.mode,
            l.connections,
            l.senders,
            l.gateways,
            if l.closed_loop { "closed loop," } else { "open loop," },
            l.interval_ms,
            l.body_bytes,
            if l.encoding == "msgpack" { ", MessagePack" } else { "" }
        )?;
        writeln!(
            f,
            "  window {:.0} s after {:.1} s settle and {:.0} s warm-up; drain used {:.1} of {:.0} s",
            l.duration_secs, l.settle_secs, l.warmup_secs, l.drain_used_secs, l.drain_secs
        )?;
        writeln!(
            f,
            "connections  ok {}  failed {}  auth ok {}  auth failed {}  connect p50/p99 {} ms",
            conn.connect_ok,
            conn.connect_fail,
            conn.auth_ok,
            conn.auth_fail,
            ms(&conn.connect_ms)
        )?;
        writeln!(
            f,
            "messages     sent {}  ackAccepted {} ({:.1} %)  ackSaved {} ({:.1} %)  delivered {}  errors {}  unanswered {}",
            c.sent, c.accepted, m.ack_accepted_pct, c.saved, m.ack_saved_pct, c.delivered, c.errored, c.unanswered
        )?;
        writeln!(
            f,
            "checker      lost {}  duplicates {}  reorders {}  id mismatches {}  unexpected {}  undelivered (receiver gone) {}",
            c.lost, c.duplicates, c.reorders, c.id_mismatches, c.unexpected, c.undelivered_receiver_gone
        )?;
        match &self.db {
            Some(db) => writeln!(
                f,
                "database     rows {}  missing {}  duplicated {}  unreceipted {}  id mismatches {}  \
                 messages with several ids {}  saved without matching row {}",
                db.rows,
                db.missing,
                db.duplicated,
                db.unreceipted,
                db.id_mismatches,
                db.messages_with_several_ids,
                db.saved_without_matching_row
            )?,
            None => writeln!(f, "database     not checked")?,
        }
        let rv = &self.recipients;
        writeln!(
            f,
            "recipients   acks {}{}  devices {} ({} users with two)  missing on device {}  seq gaps {}  \
             seq mismatches {}  without seq {}  receipts missing {}/{}",
            l.acks,
            if l.ack_read { "+read" } else { "" },
            rv.devices,
            rv.multi_device_users,
            rv.missing_on_device,
            rv.seq_gaps,
            rv.seq_mismatches,
            rv.pushes_without_seq,
            rv.receipts_missing,
            rv.conversations
        )?;
        writeln!(f, "latency ms        count      p50      p95      p99    p99.9      max")?;
        for (name, p) in [
            ("accepted", &self.latency_ms.accepted),
            ("saved", &self.latency_ms.saved),
            ("e2e", &self.latency_ms.e2e),
            ("send lag", &self.latency_ms.send_lag),
        ] {
            writeln!(
                f,
                "  {name:<12} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                p.count, p.p50, p.p95, p.p99, p.p999, p.max
            )?;
        }
        let r = &self.rates;
        writeln!(
            f,
            "rates /s     offered {:.0}  sent {:.0}  saved {:.0}  delivered {:.0}",
            r.offered, r.sent, r.saved, r.delivered
        )?;
        let cpu = &self.cpu;
        let procs: Vec<String> = cpu
            .processes
            .iter()
            .map(|p| match p.cpu_secs {
                Some(s) => format!("{} {:.2}", p.name, s),
                None => format!("{} ?", p.name),
            })
            .collect();
        writeln!(
            f,
            "cpu s        cluster {:.2} ({})  bench {}  → {} µs/msg over {:.0} s on {} cores",
            cpu.cluster_cpu_secs,
            procs.join(", "),
            cpu.bench_cpu_secs.map_or("?".into(), |s| format!("{s:.2}")),
            cpu.cluster_us_per_msg.map_or("–".into(), |u| format!("{u:.1}")),
            cpu.window_secs,
            cpu.cores
        )?;
        write!(f, "{}", redis_nodes::text_table(&self.redis_nodes))?;
        if !self.errors_by_reason.is_empty() {
            let list: Vec<String> = self.errors_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
            writeln!(f, "errors       {}", list.join(", "))?;
        }
        let problems = self.problems();
        if problems.is_empty() {
            writeln!(f, "verdict      clean: every message answered, delivered once and in order, saved once")
        } else {
            writeln!(f, "verdict      PROBLEMS: {}", problems.join("; "))
        }
    }
}

/// Per run on a Redis Cluster, a markdown table of what each master served (empty when no run ran on
/// a cluster).
pub fn redis_nodes_markdown(rows: &[(String, &RunReport)]) -> String {
    let mut out = String::new();
    for (label, r) in rows.iter().filter(|(_, r)| !r.redis_nodes.is_empty()) {
        out.push_str(&format!("**{label}**: Redis Cluster nodes over the measured window\n\n"));
        out.push_str(&redis_nodes::markdown_table(&r.redis_nodes));
        out.push('\n');
    }
    out
}

/// A markdown table comparing runs, one row per `(label, report)`: the seed's comparison columns.
pub fn markdown_table(rows: &[(String, &RunReport)]) -> String {
    let mut out = String::from(
        "| arm | accepted p50 / p99 ms | saved p50 / p99 ms | E2E p50 / p99 ms | ackSaved % | lost | dups | reorders | errors | sent msg/s | delivered msg/s | cluster CPU µs/msg |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (label, r) in rows {
        let m = &r.messages;
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
            ms(&r.latency_ms.accepted),
            ms(&r.latency_ms.saved),
            ms(&r.latency_ms.e2e),
            m.ack_saved_pct,
            m.counts.lost,
            m.counts.duplicates,
            m.counts.reorders,
            r.errors_total(),
            r.rates.sent,
            r.rates.delivered,
            r.cpu.cluster_us_per_msg.map_or("–".into(), |u| format!("{u:.0}")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_counts_keep_their_json_field_names() {
        let m = MessageCounts {
            counts: DeliveryVerdict { sent: 4, accepted: 3, saved: 2, ..Default::default() },
            ack_accepted_pct: 75.0,
            ack_saved_pct: 50.0,
            error_pct: 0.0,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"sent":4,"ack_accepted":3,"ack_saved":2,"errored":0,"unanswered":0,"delivered":0,"lost":0,"undelivered_receiver_gone":0,"duplicates":0,"reorders":0,"id_mismatches":0,"unexpected":0,"ack_accepted_pct":75.0,"ack_saved_pct":50.0,"error_pct":0.0}"#
        );
        assert_eq!(serde_json::from_str::<MessageCounts>(&json).unwrap(), m);
    }
}
