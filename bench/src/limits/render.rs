//! `limits.md` (also what `bench limits` prints): the raw operations' table, the limit they imply,
//! and the engine's figures as fractions of it.

use super::model::{Op, NOT_COUNTED};
use super::{Drive, LimitsReport};

fn or_dash(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.decimals$}"))
}

/// The report as markdown.
pub fn markdown(report: &LimitsReport) -> String {
    let mut out = format!(
        "# bench limits, {}\n\n`{}`\n\n- machine: {}\n- Redis {} · MariaDB {}\n- each operation alone for {} s \
         after a warm-up, on the servers the engine uses\n\n",
        report.started, report.command, report.machine, report.redis, report.mysql, report.secs_per_op
    );
    out.push_str(&table(report));
    out.push('\n');
    for m in &report.measurements {
        out.push_str(&format!("- {}: {}\n", m.op.label(), m.how));
    }
    out.push_str(&match report.drive {
        Drive::FlatOut => limit_lines(report),
        Drive::Paced { msgs_per_sec, .. } => paced_lines(report, msgs_per_sec),
    });
    if let Some(engine) = &report.engine {
        out.push_str(&format!(
            "\n## The engine, full mode, same servers\n\n- offered rates {}: maximum sustainable rate **{} msg/s** \
             → **{} of the limit**\n- its CPU per message at that rate: {} µs → **{}× the raw operations' CPU**\n",
            engine.rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
            or_dash(engine.max_sustainable_rate, 0),
            or_dash(engine.rate_vs_limit, 2),
            or_dash(engine.cpu_us_per_msg, 1),
            or_dash(engine.cpu_vs_raw, 1),
        ));
    }
    out
}

/// Operation, count per message, rate, CPU per op, and what a message needs of each.
fn table(report: &LimitsReport) -> String {
    let mut out = String::from(
        "| operation | per message | ops/s | CPU µs/op | µs/msg, time-shared | CPU µs/msg |\n|---|---|---|---|---|---|\n",
    );
    for op in Op::ALL {
        let Some(m) = report.measurements.iter().find(|m| m.op == op) else { continue };
        let count = f64::from(op.per_message());
        let time_shared = (m.ops_per_sec > 0.0).then(|| count * 1e6 / m.ops_per_sec);
        out.push_str(&format!(
            "| {} | {} ({}) | {:.0} | {} | {} | {} |\n",
            op.label(),
            op.per_message(),
            op.counted_as(),
            m.ops_per_sec,
            or_dash(m.cpu_us_per_op, 2),
            or_dash(time_shared, 2),
            or_dash(m.cpu_us_per_op.map(|us| count * us), 2),
        ));
    }
    let cost = report.per_message.as_ref();
    out.push_str(&format!(
        "| **one message** | | | | **{}** | **{}** |\n",
        or_dash(cost.map(|c| c.time_shared_us), 2),
        or_dash(cost.and_then(|c| c.cpu_us), 2)
    ));
    out
}

fn limit_lines(report: &LimitsReport) -> String {
    let Some(cost) = &report.per_message else {
        return "\nNo limit: not every operation was measured.\n".into();
    };
    format!(
        "\n- **Limit: {:.0} msg/s** with the operations taking turns on this machine (1e6 / {:.2} µs)\n\
         - raw CPU per message {} µs: {} msg/s on {} cores if CPU were the only bound\n\
         - CPU µs/op is the engine's side: the server plus the bench (in the gateway's or worker's place); for \
         WebSocket frames the serving thread alone (the client plays the device)\n- not counted: {NOT_COUNTED}\n",
        cost.limit_rate,
        cost.time_shared_us,
        or_dash(cost.cpu_us, 2),
        or_dash(cost.cpu_limit_rate, 0),
        report.cores,
    )
}

/// Paced, the rates are the pacing's: what counts is the CPU a message's operations cost at that load.
fn paced_lines(report: &LimitsReport, msgs_per_sec: f64) -> String {
    let cpu = report.per_message.as_ref().and_then(|c| c.cpu_us);
    format!(
        "\n- **Paced for {msgs_per_sec:.0} msg/s, one operation per call: raw CPU per message {} µs** (no limit rate: \
         the operations ran at the pace, not flat out)\n\
         - CPU µs/op is the engine's side: the server plus the bench (in the gateway's or worker's place); for \
         WebSocket frames the serving thread alone (the client plays the device)\n- not counted: {NOT_COUNTED}\n",
        or_dash(cpu, 2)
    )
}

#[cfg(test)]
mod tests {
    use super::super::model::{message_cost, tests::all_measured};
    use super::super::EngineFigures;
    use super::*;

    fn report() -> LimitsReport {
        let measurements = all_measured();
        LimitsReport {
            started: "2026-11-25 19:44:26 UTC".into(),
            command: "bench limits".into(),
            machine: "2 cores".into(),
            cores: 2,
            redis: "redis://r (shared, appendfsync everysec)".into(),
            mysql: "mysql://m (shared)".into(),
            secs_per_op: 3.0,
            drive: Drive::FlatOut,
            per_message: message_cost(&measurements, 2),
            measurements,
            engine: None,
        }
    }

    #[test]
    fn the_table_shows_each_operation_per_message_and_the_sum() {
        let text = markdown(&report());
        assert!(
            text.contains(
                "| WebSocket frame | 4 (send in; ACK accepted, ACK saved, push out) | 200000 | 2.00 | 20.00 | 8.00 |"
            ),
            "{text}"
        );
        assert!(text.contains("| XADD | 2 (accepted, to_save) | 500000 | 1.00 | 4.00 | 2.00 |"), "{text}");
        assert!(text.contains("| **one message** | | | | **41.50** | **23.00** |"), "{text}");
        assert!(text.contains("**Limit: 24096 msg/s**"), "{text}");
        assert!(text.contains("raw CPU per message 23.00 µs: 86957 msg/s on 2 cores"), "{text}");
        assert!(!text.contains("## The engine"));
    }

    #[test]
    fn the_engine_is_quoted_as_a_fraction_of_the_limit() {
        let mut r = report();
        r.engine = Some(EngineFigures {
            rates: vec![4000.0, 8000.0],
            max_sustainable_rate: Some(8000.0),
            cpu_us_per_msg: Some(115.0),
            rate_vs_limit: Some(8000.0 / 24096.4),
            cpu_vs_raw: Some(5.0),
        });
        let text = markdown(&r);
        assert!(
            text.contains("offered rates 4000, 8000: maximum sustainable rate **8000 msg/s** → **0.33 of the limit**"),
            "{text}"
        );
        assert!(text.contains("115.0 µs → **5.0× the raw operations' CPU**"), "{text}");
    }

    #[test]
    fn paced_the_report_gives_the_cpu_per_message_and_no_limit() {
        let mut r = report();
        r.drive = Drive::Paced { msgs_per_sec: 833.0, rows_per_insert: 12 };
        let text = markdown(&r);
        assert!(
            text.contains("**Paced for 833 msg/s, one operation per call: raw CPU per message 23.00 µs**"),
            "{text}"
        );
        assert!(!text.contains("**Limit:"), "{text}");
    }

    #[test]
    fn without_every_operation_there_is_no_limit() {
        let mut r = report();
        r.measurements.pop();
        r.per_message = message_cost(&r.measurements, 2);
        let text = markdown(&r);
        assert!(text.contains("No limit") && text.contains("| **one message** | | | | **–** | **–** |"), "{text}");
    }
}
