//! A drill verdict as the terminal shows it.

use super::*;

impl DrillVerdict {
    /// A terminal summary.
    pub fn render(&self) -> String {
        let mut out = format!(
            "drill {}{}: {}\n",
            self.drill.name(),
            if self.variant.is_empty() { String::new() } else { format!(" ({})", self.variant) },
            if self.passed { "PASSED" } else { "FAILED" }
        );
        out += &format!(
            "  load {} connections at {:.0} msg/s; fault {:.0} s\n",
            self.connections, self.offered_rate, self.fault_secs
        );
        out += &format!(
            "  sent {}  accepted {}  saved {}  errored {}  unanswered {}  delivered {}\n",
            self.sent, self.accepted, self.saved, self.errored, self.unanswered, self.delivered
        );
        out += &format!(
            "  lost {} (pushes {}, rows {})  duplicate rows {}  duplicate deliveries {}  reorders {}  reconnects {}\n",
            self.lost,
            self.lost_pushes,
            self.missing_rows,
            self.duplicate_rows,
            self.duplicate_deliveries,
            self.reorders,
            self.reconnects
        );
        out += &format!(
            "  one message, several ids {}  receipt without matching row {}  id mismatches {}\n",
            self.messages_with_several_ids, self.saved_without_matching_row, self.id_mismatches
        );
        let r = &self.recipients;
        out += &format!(
            "  devices {} ({} users with two, {} gone): missing on device {} (after reconnect {}, on gone devices {})  \
             seq gaps {}  seq mismatches {}  pushes without seq {}\n",
            r.devices,
            r.multi_device_users,
            r.devices_gone,
            r.missing_on_device,
            r.missing_after_reconnect,
            r.missing_on_gone_devices,
            r.seq_gaps,
            r.seq_mismatches,
            r.pushes_without_seq
        );
        out += &format!(
            "  acks {} (delivered {}, read {}): receipts {} — missing {} of {} conversations ({} seqs behind), read \
             missing {}, regressions {}; gap syncs {}, own-position syncs {}\n",
            self.acks,
            self.delivered_acks,
            self.read_acks,
            self.receipts,
            r.receipts_missing,
            r.conversations,
            r.receipt_seqs_behind,
            r.read_receipts_missing,
            r.receipt_regressions,
            r.gap_syncs,
            r.own_position_syncs
        );
        if r.rows_with_seq {
            out += &format!(
                "  rows: seq gaps {}  seqs reused {}  rows without seq {}\n",
                r.row_seq_gaps, r.row_seq_reused, r.rows_without_seq
            );
        }
        for e in r.seq_examples.iter().take(3) {
            out += &format!("  seq: {e}\n");
        }
        if let Some(m) = r.missing_examples.first() {
            out += &format!(
                "  missing e.g. user {} device {}: {}'s #{} (seq {:?}; {} reconnects; later seq held: {})\n",
                m.to, m.device, m.from, m.number, m.seq, m.reconnects, m.later_seq_held
            );
        }
        if self.lost_pushes > 0 {
            out += &format!(
                "  lost pushes: {} below the highest id their receiver saw from anyone (a delivered cursor there skips \
                 them), {} with a later message of the same sender seen\n",
                self.lost_below_receivers_highest_seen, self.lost_with_later_from_same_sender_seen
            );
        }
        if self.reorders > 0 {
            let examples: Vec<String> = self
                .reorder_examples
                .iter()
                .take(3)
                .map(|o| {
                    format!(
                        "receiver {} got {}'s #{} after #{} (connection {}{})",
                        o.receiver,
                        o.from,
                        o.seq,
                        o.after_seq,
                        o.connection,
                        if o.higher_on_same_connection { "" } else { ", the later one on an earlier connection" }
                    )
                })
                .collect();
            out += &format!(
                "  reorders: {} on connections opened by a reconnect, {} after a gap sync, {} live (must be 0); e.g. {}\n",
                self.reorders_after_reconnect,
                self.reorders - self.reorders_after_reconnect - self.reorders_live,
                self.reorders_live,
                examples.join("; ")
            );
        }
        let recover = self.time_to_recover_secs.map_or_else(|| "not seen".to_owned(), |s| format!("{s:.1} s"));
        out += &format!(
            "  backlog peak {:.0} (before {:.0})  time to recover {recover}  saved p99 {:.0} ms  E2E p99 {:.0} ms\n",
            self.backlog_peak, self.backlog_before, self.saved_ms.p99, self.end_to_end_ms.p99
        );
        if !self.rss_peak_mib.is_empty() {
            let rss: Vec<String> = self.rss_peak_mib.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
            out += &format!("  RSS peak MiB: {}\n", rss.join(", "));
        }
        if !self.errors_by_reason.is_empty() {
            let errors: Vec<String> = self.errors_by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("  errors: {}\n", errors.join(", "));
        }
        if let Some(chaos) = &self.chaos {
            out += &format!("  chaos seed {} (replay: --seed {}): {}\n", chaos.seed, chaos.seed, chaos.summary());
        }
        for u in self.unanswered_examples.iter().take(3) {
            out += &format!("  unanswered: {u}\n");
        }
        for c in &self.checks {
            out += &format!("  [{}] {}: {}\n", if c.passed { "ok" } else { "FAIL" }, c.name, c.detail);
        }
        for n in &self.notes {
            out += &format!("  note: {n}\n");
        }
        out += &format!("  logs: {}\n", self.dir.display());
        out
    }
}
