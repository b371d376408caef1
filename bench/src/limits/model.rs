//! What one message costs in raw operations, and the limit that cost implies.
//!
//! A message in full mode is made of a fixed number of each raw operation (the constants below).
//! Each operation was measured alone, using the whole machine, so two limits follow:
//! - time-shared: the operations take turns on the machine, so a message needs
//!   `Σ count / ops_per_sec` seconds and the limit is its inverse;
//! - CPU: a message needs `Σ count × CPU µs per op`, and the machine's cores supply `cores × 1e6` µs
//!   of CPU per second. Only a stage bound by CPU alone gets this close.
//!
//! The engine's rate and CPU per message are then quoted as fractions of these.

use serde::{Deserialize, Serialize};

/// Stream appends per message: the gateway's append to `accepted`, the worker's hand-off to `to_save`.
pub const XADDS_PER_MESSAGE: u32 = 2;
/// Stream entries read with XREADGROUP and acknowledged with XACK per message: once from
/// `accepted` (the deliver stage), once from `to_save` (the save stage).
pub const READ_ACKS_PER_MESSAGE: u32 = 2;
/// Publications per message: the push to the recipient's gateway and ACK(saved) to the sender's.
/// The engine batches both per gateway node (and journals each batch), so this counts
/// message-sized publications, not PUBLISH commands.
pub const PUBLISHES_PER_MESSAGE: u32 = 2;
/// Rows of a multi-row INSERT per message: its row in `messages`.
pub const ROWS_PER_MESSAGE: u32 = 1;
/// WebSocket frames per message: SINGLE_CHAT in, ACK(accepted) out, ACK(saved) out, the push out.
/// The recipient's `delivered` confirmation is coalesced per conversation and not counted.
pub const WS_FRAMES_PER_MESSAGE: u32 = 4;

/// Not counted, so the limit flatters the raw side: the idempotency GET and SET around the append
/// (and the final SET at commit), the XTRIM after each XACK, the journal XADD of each publication, the
/// sequence counters, and Lua itself.
pub const NOT_COUNTED: &str = "idempotency GET/SET, XTRIM after XACK, journal XADD per publication, \
                               sequence counters, Lua";

/// A raw operation the engine is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// XADD of a message-sized entry, pipelined.
    Xadd,
    /// One entry read with XREADGROUP and acknowledged with XACK, pipelined.
    ReadAck,
    /// PUBLISH of a message-sized payload, received by one subscriber.
    Publish,
    /// One row of a multi-row INSERT into `messages`, committed.
    InsertRow,
    /// One WebSocket text frame, either direction.
    WsFrame,
}

impl Op {
    /// Every operation, in the order of a message's path.
    pub const ALL: [Op; 5] = [Op::WsFrame, Op::Xadd, Op::ReadAck, Op::Publish, Op::InsertRow];

    /// How many of this operation one message needs in full mode.
    pub fn per_message(self) -> u32 {
        match self {
            Op::Xadd => XADDS_PER_MESSAGE,
            Op::ReadAck => READ_ACKS_PER_MESSAGE,
            Op::Publish => PUBLISHES_PER_MESSAGE,
            Op::InsertRow => ROWS_PER_MESSAGE,
            Op::WsFrame => WS_FRAMES_PER_MESSAGE,
        }
    }

    /// The operation as the table names it.
    pub fn label(self) -> &'static str {
        match self {
            Op::Xadd => "XADD",
            Op::ReadAck => "XREADGROUP + XACK (per entry)",
            Op::Publish => "PUBLISH → 1 subscriber",
            Op::InsertRow => "INSERT row (multi-row, committed)",
            Op::WsFrame => "WebSocket frame",
        }
    }

    /// Which of a message's steps the count stands for.
    pub fn counted_as(self) -> &'static str {
        match self {
            Op::Xadd => "accepted, to_save",
            Op::ReadAck => "accepted, to_save",
            Op::Publish => "push, ACK(saved)",
            Op::InsertRow => "its row",
            Op::WsFrame => "send in; ACK accepted, ACK saved, push out",
        }
    }
}

/// One raw operation over its measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub op: Op,
    /// How it was driven: connections, pipeline or batch, payload.
    pub how: String,
    /// Operations completed in the window.
    pub ops: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    /// CPU seconds of the server in the window: Redis or MariaDB, or for WebSocket frames the
    /// serving thread.
    pub server_cpu_secs: Option<f64>,
    /// CPU seconds of the bench process in the window (for WebSocket frames: without the serving
    /// thread, i.e. the client side).
    pub bench_cpu_secs: Option<f64>,
    /// CPU per operation on the engine's side, µs: server plus bench (which plays the gateway or
    /// worker), or for WebSocket frames the serving side alone (the client plays the user's device).
    pub cpu_us_per_op: Option<f64>,
}

/// The raw operations of one message, summed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageCost {
    /// `Σ count × 1e6 / ops_per_sec`: the machine's time one message needs when the operations
    /// take turns on it.
    pub time_shared_us: f64,
    /// `1e6 / time_shared_us`.
    pub limit_rate: f64,
    /// `Σ count × CPU µs per op` (`None` when a CPU figure is missing).
    pub cpu_us: Option<f64>,
    /// `cores × 1e6 / cpu_us`: the rate if CPU were the only bound.
    pub cpu_limit_rate: Option<f64>,
}

/// What one message costs in the measured operations; `None` unless every operation was measured
/// with a positive rate.
pub fn message_cost(measurements: &[Measurement], cores: usize) -> Option<MessageCost> {
    let mut time_shared_us = 0.0;
    let mut cpu_us = Some(0.0);
    for op in Op::ALL {
        let m = measurements.iter().find(|m| m.op == op).filter(|m| m.ops_per_sec > 0.0)?;
        let count = f64::from(op.per_message());
        time_shared_us += count * 1e6 / m.ops_per_sec;
        cpu_us = cpu_us.zip(m.cpu_us_per_op).map(|(sum, us)| sum + count * us);
    }
    let cpu_us = cpu_us.filter(|&us| us > 0.0);
    Some(MessageCost {
        time_shared_us,
        limit_rate: 1e6 / time_shared_us,
        cpu_us,
        cpu_limit_rate: cpu_us.map(|us| cores as f64 * 1e6 / us),
    })
}

/// `engine / limit`, when both are known and the limit is positive.
pub fn ratio(engine: Option<f64>, limit: Option<f64>) -> Option<f64> {
    match (engine, limit) {
        (Some(e), Some(l)) if l > 0.0 => Some(e / l),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A measurement of `op` at `rate` ops/s and `cpu_us` µs per op.
    pub(crate) fn measured(op: Op, rate: f64, cpu_us: Option<f64>) -> Measurement {
        Measurement {
            op,
            how: "test".into(),
            ops: rate as u64,
            secs: 1.0,
            ops_per_sec: rate,
            server_cpu_secs: None,
            bench_cpu_secs: None,
            cpu_us_per_op: cpu_us,
        }
    }

    pub(crate) fn all_measured() -> Vec<Measurement> {
        vec![
            measured(Op::WsFrame, 200_000.0, Some(2.0)),
            measured(Op::Xadd, 500_000.0, Some(1.0)),
            measured(Op::ReadAck, 400_000.0, Some(1.5)),
            measured(Op::Publish, 800_000.0, Some(1.0)),
            measured(Op::InsertRow, 100_000.0, Some(8.0)),
        ]
    }

    #[test]
    fn a_message_costs_each_operation_as_often_as_full_mode_does_it() {
        assert_eq!(Op::ALL.map(Op::per_message), [4, 2, 2, 2, 1]);
        let cost = message_cost(&all_measured(), 2).unwrap();
        // 4/200k + 2/500k + 2/400k + 2/800k + 1/100k s = 20 + 4 + 5 + 2.5 + 10 µs
        assert!((cost.time_shared_us - 41.5).abs() < 1e-9, "{cost:?}");
        assert!((cost.limit_rate - 1e6 / 41.5).abs() < 1e-6);
        // 4×2 + 2×1 + 2×1.5 + 2×1 + 1×8 µs
        assert_eq!(cost.cpu_us, Some(23.0));
        assert_eq!(cost.cpu_limit_rate, Some(2e6 / 23.0));
    }

    #[test]
    fn a_missing_operation_leaves_no_limit_and_a_missing_cpu_figure_no_cpu_limit() {
        let mut some = all_measured();
        some.retain(|m| m.op != Op::Publish);
        assert_eq!(message_cost(&some, 2), None);
        let mut stalled = all_measured();
        stalled[1].ops_per_sec = 0.0;
        assert_eq!(message_cost(&stalled, 2), None);
        let mut no_cpu = all_measured();
        no_cpu[4].cpu_us_per_op = None;
        let cost = message_cost(&no_cpu, 2).unwrap();
        assert_eq!((cost.cpu_us, cost.cpu_limit_rate), (None, None));
        assert!(cost.limit_rate > 0.0);
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(6000.0), Some(24_000.0)), Some(0.25));
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
