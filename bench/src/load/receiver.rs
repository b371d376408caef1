//! A receiving device: one connection of a receiving user (a user may have several), behaving as a
//! client written from docs/PROTOCOL.md does. It logs every push (sender, number, serverMsgId, seq)
//! in arrival order, dedupes by serverMsgId, tracks per peer the seqs it holds ([`DeviceState`]),
//! confirms `delivered` (and optionally `read`) per conversation up to its position, asks for gaps in
//! live pushes with `SYNC {peer, afterSeq}`, and after every reconnect either relies on the server's
//! sync at connect or (`?sync=manual`) sends its own positions. It records end-to-end latency from
//! the send time in the body, keeps its connection alive with `PING`s, and takes part in reconnect
//! storms and receiver churn.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delivered::DeliveredAcks;
use super::device::{DeviceState, Held};
use super::link::{close_label, Conn, Link};
use super::schedule::{body_sent_at, Schedule};
use super::storm::{self, StormWatch};
use super::{KEEP_ALIVE, SLOW_RECEIVER_PREFIX, STORM_CLOSE_CODE, STORM_CLOSE_LABEL};
use crate::checker::{Delivery, ReceiverLog};
use crate::client::{ClientFrame, Incoming, Kind, Received, WsWriter};
use crate::recorder::{Counters, Latency, Recorder};
use crate::spec::{Churn, ReceiverAcks};

/// The error label of a connection the device closed itself (receiver churn).
pub const CHURN_CLOSE_LABEL: &str = "closed_by_churn";

/// How a device behaves beyond logging what it gets.
pub(super) struct Behaviour {
    /// A slow receiver's pause after every frame (until its first disconnect).
    pub pace: Option<Duration>,
    /// How it confirms deliveries.
    pub acks: ReceiverAcks,
    /// Confirms `read` as well.
    pub ack_read: bool,
    /// Reconnect storms that may close its connection.
    pub storm: Option<StormWatch>,
    /// Which of its user's devices it is.
    pub device: u8,
    /// Device 0 counts its user's deliveries and end-to-end latency (a second device would count
    /// every message twice); every device counts its own holds and duplicates.
    pub primary: bool,
    /// Leaves and comes back at random while the load sends.
    pub churn: Option<ChurnState>,
}

/// One device's draws for receiver churn.
pub(super) struct ChurnState {
    spec: Churn,
    rng: StdRng,
    /// No leaving from then on (the load stopped sending).
    until: Instant,
}

impl ChurnState {
    pub fn new(spec: Churn, uid: u64, device: u8, until: Instant) -> ChurnState {
        let seed = spec.seed ^ uid.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(device).rotate_left(48);
        ChurnState { spec, rng: StdRng::seed_from_u64(seed), until }
    }

    /// When to leave next, counted from `now` (`None`: not any more).
    fn next_leave(&mut self, now: Instant) -> Option<Instant> {
        let u: f64 = self.rng.random();
        let online = self.spec.online_mean.mul_f64(-(1.0 - u).max(f64::MIN_POSITIVE).ln());
        let at = now + online;
        (at < self.until).then_some(at)
    }

    /// How long to stay away.
    fn offline(&mut self) -> Duration {
        let (low, high) = self.spec.offline;
        low + high.saturating_sub(low).mul_f64(self.rng.random())
    }
}

/// What woke the device up.
enum Wake {
    Incoming(Result<Incoming, fastwebsockets::WebSocketError>),
    Ping,
    Due,
    Storm,
    Leave,
}

/// Runs one device until shutdown and returns its log. A slow receiver (`pace`) pauses after every
/// frame until its first disconnect, which it records as `slow_receiver_<close label>`; then it
/// reads at full speed, like a client whose network recovered. A storm that picks it closes its
/// connection (`closed_by_storm`), churn makes it leave for a while (`closed_by_churn`). With
/// reconnect on, a closed connection is replaced and synced; without it, or if no gateway takes it
/// back before shutdown, the device counts as gone.
pub(super) async fn receive(
    (mut reader, mut writer): Conn,
    mut link: Link,
    mut behaviour: Behaviour,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    shutdown: CancellationToken,
) -> ReceiverLog {
    let uid = link.uid;
    let mut log = ReceiverLog { uid, device: behaviour.device, ..Default::default() };
    let slow = behaviour.pace.is_some();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut state = DeviceState::new(behaviour.ack_read);
    let mut id_acks = (behaviour.acks == ReceiverAcks::Id).then(DeliveredAcks::default);
    let seq_acks = behaviour.acks == ReceiverAcks::Seq;
    let mut ping_at = Instant::now() + KEEP_ALIVE;
    if !begin_sync(&mut writer, &mut state, &link, &rec, &mut log, false).await {
        rec.error("write_failed");
    }
    let mut leave_at = behaviour.churn.as_mut().and_then(|c| c.next_leave(Instant::now()));
    loop {
        let now = Instant::now();
        let due =
            [state.next_due(now, seq_acks), id_acks.as_ref().and_then(|a| a.due(now))].into_iter().flatten().min();
        let wake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = storm::hit(&mut behaviour.storm, uid) => Wake::Storm,
            // Before reading, so a steady stream of pushes cannot hold confirmations back.
            _ = tokio::time::sleep_until(due.unwrap_or(ping_at)), if due.is_some() => Wake::Due,
            _ = tokio::time::sleep_until(leave_at.unwrap_or(ping_at)), if leave_at.is_some() => Wake::Leave,
            r = reader.next() => Wake::Incoming(r),
            _ = tokio::time::sleep_until(ping_at) => Wake::Ping,
        };
        // Our own close, echoed by the gateway, can arrive as shutdown begins: not a failure.
        if shutdown.is_cancelled() {
            break;
        }
        let incoming = match wake {
            Wake::Incoming(incoming) => incoming,
            Wake::Ping => {
                ping_at = Instant::now() + KEEP_ALIVE;
                if writer.send(&ClientFrame::Ping).await.is_err() {
                    rec.error("write_failed");
                }
                continue;
            }
            Wake::Due => {
                if !send_due(&mut writer, &mut state, id_acks.as_mut(), seq_acks, uid, &rec, &mut log).await {
                    rec.error("write_failed");
                }
                continue;
            }
            Wake::Storm => {
                writer.close().await;
                Ok(Incoming::Closed(STORM_CLOSE_CODE, STORM_CLOSE_LABEL.to_owned()))
            }
            Wake::Leave => {
                writer.close().await;
                rec.error(CHURN_CLOSE_LABEL);
                let away = behaviour.churn.as_mut().map_or(Duration::ZERO, ChurnState::offline);
                tokio::select! {
                    _ = tokio::time::sleep(away) => {}
                    _ = shutdown.cancelled() => break,
                }
                match link.reconnect(&rec, &shutdown).await {
                    Some(conn) => {
                        (reader, writer) = conn;
                        reconnected(&mut writer, &mut state, &link, &rec, &mut log).await;
                        leave_at = behaviour.churn.as_mut().and_then(|c| c.next_leave(Instant::now()));
                        continue;
                    }
                    None => break,
                }
            }
        };
        let frame = match incoming {
            Ok(Incoming::Frame(frame)) => frame,
            Ok(Incoming::Unparsable) => {
                rec.error("unparsable_frame");
                continue;
            }
            Ok(Incoming::Closed(..)) | Err(_) => {
                let label = match incoming {
                    Ok(Incoming::Closed(code, reason)) => close_label(code, &reason),
                    _ => "disconnected".to_owned(),
                };
                // A gateway that drops a slow consumer whose writer is stuck on a full socket cannot
                // send it a close frame: for a slow receiver every disconnect is its own doing.
                rec.error(&if slow { format!("{SLOW_RECEIVER_PREFIX}{label}") } else { label });
                behaviour.pace = None;
                if link.enabled {
                    if let Some(conn) = link.reconnect(&rec, &shutdown).await {
                        (reader, writer) = conn;
                        reconnected(&mut writer, &mut state, &link, &rec, &mut log).await;
                        continue;
                    }
                }
                log.gone = true;
                log.open_gaps = state.open_gaps();
                return log;
            }
        };
        if let Some(pause) = behaviour.pace {
            tokio::time::sleep(pause).await;
        }
        match frame.kind {
            Kind::SingleChat => {}
            Kind::SyncDone => {
                Counters::bump(&rec.counters.sync_dones);
                if let Some(took) = state.sync_done(frame.peer, Instant::now()) {
                    if frame.peer.is_none() {
                        rec.record(Latency::Sync, took);
                    }
                }
                continue;
            }
            Kind::Error => {
                // A refused frame may have been a confirmation: confirm every position again.
                if frame.reason() == "too_many_requests" {
                    state.confirm_again();
                }
                rec.error(frame.reason());
                continue;
            }
            _ => continue,
        }
        on_push(&frame, &mut state, id_acks.as_mut(), &mut seen, behaviour.primary, slow, &rec, &schedule, &mut log);
    }
    writer.close().await;
    log.open_gaps = state.open_gaps();
    log
}

/// Logs one push and updates the device's state.
#[allow(clippy::too_many_arguments)]
fn on_push(
    frame: &Received,
    state: &mut DeviceState,
    id_acks: Option<&mut DeliveredAcks>,
    seen: &mut HashSet<(u64, u64)>,
    primary: bool,
    slow: bool,
    rec: &Recorder,
    schedule: &Schedule,
    log: &mut ReceiverLog,
) {
    let now = Instant::now();
    let number = frame.client_msg_id.as_deref().and_then(|c| c.parse::<u64>().ok());
    let (Some(from), Some(number), Some(server_msg_id)) = (frame.from, number, frame.server_msg_id) else {
        rec.error("malformed_push");
        return;
    };
    match state.push(from, frame.seq, server_msg_id, now) {
        Held::SeqReused => rec.error("push_seq_reused"),
        Held::New if frame.seq.is_none() => rec.error("push_without_seq"),
        _ => {}
    }
    if let Some(acks) = id_acks {
        acks.seen_at(server_msg_id, from, frame.seq);
    }
    if seen.insert((from, number)) {
        Counters::bump(&rec.counters.device_held);
        if primary {
            Counters::bump(&rec.counters.delivered);
            // Slow receivers' latency is their own doing; the figure is about everyone else.
            if let (Some(sent_at_us), false) = (frame.body.as_deref().and_then(body_sent_at), slow) {
                if schedule.measured(sent_at_us) {
                    rec.record(Latency::EndToEnd, schedule.since(sent_at_us, now));
                }
            }
        }
    } else {
        Counters::bump(&rec.counters.duplicates);
    }
    log.deliveries.push(Delivery { from, number, server_msg_id, seq: frame.seq });
}

/// Starts the sync of a fresh connection: with `?sync=manual` the device sends its own positions
/// (`SYNC {positions}`), else the server runs its sync by itself; either ends with `SYNC_DONE`.
/// `counted`: a reconnection (its own-position syncs are counted). False when the write failed.
async fn begin_sync(
    writer: &mut WsWriter,
    state: &mut DeviceState,
    link: &Link,
    rec: &Recorder,
    log: &mut ReceiverLog,
    counted: bool,
) -> bool {
    state.full_sync_began(Instant::now());
    if !link.manual_sync() {
        return true;
    }
    if counted {
        log.own_position_syncs += 1;
        Counters::bump(&rec.counters.own_position_syncs);
    }
    writer.send(&ClientFrame::Sync { positions: Some(state.positions()), peer: None, after_seq: None }).await.is_ok()
}

/// After a reconnect: syncs asked on the old connection are void; sync the new one.
async fn reconnected(
    writer: &mut WsWriter,
    state: &mut DeviceState,
    link: &Link,
    rec: &Recorder,
    log: &mut ReceiverLog,
) {
    state.reconnected();
    log.reconnected_at.push(log.deliveries.len());
    if !begin_sync(writer, state, link, rec, log, true).await {
        rec.error("write_failed");
    }
}

/// Sends what is due: confirmations (by seq, or the older highest-id form) and gap syncs. False
/// when a write failed.
async fn send_due(
    writer: &mut WsWriter,
    state: &mut DeviceState,
    id_acks: Option<&mut DeliveredAcks>,
    seq_acks: bool,
    uid: u64,
    rec: &Recorder,
    log: &mut ReceiverLog,
) -> bool {
    let now = Instant::now();
    if let Some(acks) = id_acks {
        if let Some(id) = acks.take(now) {
            let ack = ClientFrame::Ack { ack_type: "delivered", server_msg_id: id.to_string() };
            if writer.send(&ack).await.is_err() {
                return false;
            }
            Counters::bump(&rec.counters.delivered_acks);
            // The server moves the position of that message's conversation only.
            if let Some((peer, seq)) = acks.highest_at() {
                rec.ledger.confirmed(uid, peer, seq);
            }
        }
    }
    if seq_acks {
        for (peer, seq, read) in state.take_acks(now) {
            let ack_type = if read { "read" } else { "delivered" };
            if writer.send(&ClientFrame::AckSeq { ack_type, from: peer.to_string(), seq }).await.is_err() {
                return false;
            }
            if read {
                Counters::bump(&rec.counters.read_acks);
            } else {
                Counters::bump(&rec.counters.delivered_acks);
                rec.ledger.confirmed(uid, peer, seq);
            }
        }
    }
    for (peer, after_seq) in state.take_gap_syncs(now) {
        let sync = ClientFrame::Sync { positions: None, peer: Some(peer.to_string()), after_seq: Some(after_seq) };
        if writer.send(&sync).await.is_err() {
            return false;
        }
        log.gap_synced_at.push((log.deliveries.len(), peer));
        Counters::bump(&rec.counters.gap_syncs);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_draws_are_seeded_per_device_and_stop_when_the_load_stops() {
        let spec = Churn {
            online_mean: Duration::from_secs(2),
            offline: (Duration::from_millis(200), Duration::from_secs(1)),
            seed: 7,
        };
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(3600);
        let draws = |uid, device| {
            let mut c = ChurnState::new(spec, uid, device, until);
            (0..50).map(|_| (c.next_leave(t0), c.offline())).collect::<Vec<_>>()
        };
        assert_eq!(draws(1, 0), draws(1, 0), "replayable");
        assert_ne!(draws(1, 0), draws(1, 1), "two devices of a user leave independently");
        let mut c = ChurnState::new(spec, 1, 0, until);
        let online: Vec<f64> =
            (0..2000).map(|_| c.next_leave(t0).unwrap().saturating_duration_since(t0).as_secs_f64()).collect();
        let mean = online.iter().sum::<f64>() / online.len() as f64;
        assert!((1.7..2.3).contains(&mean), "mean online time {mean}");
        assert!((0..200).map(|_| c.offline()).all(|d| d >= spec.offline.0 && d <= spec.offline.1));
        let mut ended = ChurnState::new(spec, 1, 0, t0);
        assert_eq!(ended.next_leave(t0), None, "no leaving once the load stopped sending");
    }
}
