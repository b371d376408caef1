//! A receiver: logs every push (sender, number, serverMsgId) in arrival order, records end-to-end
//! latency from the send time in the body, keeps its connection alive with `PING`s, and (when asked)
//! confirms deliveries and takes part in reconnect storms.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use im_common::protocol::FrameType;

use super::delivered::DeliveredAcks;
use super::link::{close_label, Conn, Link};
use super::schedule::{body_sent_at, Schedule};
use super::storm::{self, StormWatch};
use super::{KEEP_ALIVE, SLOW_RECEIVER_PREFIX, STORM_CLOSE_CODE, STORM_CLOSE_LABEL};
use crate::checker::{Delivery, ReceiverLog};
use crate::client::{ClientFrame, Incoming};
use crate::recorder::{Counters, Latency, Recorder};

/// How a receiver behaves beyond logging what it gets.
pub(super) struct Behaviour {
    /// A slow receiver's pause after every frame (until its first disconnect).
    pub pace: Option<Duration>,
    /// Confirms deliveries as a real client does ([`DeliveredAcks`]).
    pub ack_delivered: bool,
    /// Reconnect storms that may close its connection.
    pub storm: Option<StormWatch>,
}

/// What woke the receiver up.
enum Wake {
    Incoming(Result<Incoming, fastwebsockets::WebSocketError>),
    Ping,
    Ack,
    Storm,
}

/// Logs a receiver's pushes until shutdown, and keeps its connection alive (`PING` every
/// [`KEEP_ALIVE`]). A slow receiver (`pace`) pauses after every frame until its first disconnect,
/// which it records as `slow_receiver_<close label>`; then it reads at full speed, like a client whose
/// network recovered. With `ack_delivered` it confirms the highest serverMsgId seen so far, coalesced.
/// A storm that picks it closes its connection (`closed_by_storm`). With reconnect on, a closed
/// connection is replaced (offline resend then brings what was saved meanwhile); without it, or if no
/// gateway takes it back before shutdown, the receiver counts as gone.
pub(super) async fn receive(
    (mut reader, mut writer): Conn,
    mut link: Link,
    mut behaviour: Behaviour,
    rec: Arc<Recorder>,
    schedule: Arc<Schedule>,
    shutdown: CancellationToken,
) -> ReceiverLog {
    let mut log = ReceiverLog { uid: link.uid, ..Default::default() };
    let slow = behaviour.pace.is_some();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut acks = behaviour.ack_delivered.then(DeliveredAcks::default);
    let mut ping_at = Instant::now() + KEEP_ALIVE;
    loop {
        let ack_at = acks.as_ref().and_then(|a| a.due(Instant::now()));
        let wake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = storm::hit(&mut behaviour.storm, link.uid) => Wake::Storm,
            // Before reading, so a steady stream of pushes cannot hold confirmations back.
            _ = tokio::time::sleep_until(ack_at.unwrap_or(ping_at)), if ack_at.is_some() => Wake::Ack,
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
            Wake::Ack => {
                if let Some(id) = acks.as_mut().and_then(|a| a.take(Instant::now())) {
                    let ack = ClientFrame::Ack { ack_type: "delivered", server_msg_id: id.to_string() };
                    match writer.send(&ack).await {
                        Ok(()) => Counters::bump(&rec.counters.delivered_acks),
                        Err(_) => rec.error("write_failed"),
                    }
                }
                continue;
            }
            Wake::Storm => {
                writer.close().await;
                Ok(Incoming::Closed(STORM_CLOSE_CODE, STORM_CLOSE_LABEL.to_owned()))
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
                        log.reconnected_at.push(log.deliveries.len());
                        continue;
                    }
                }
                log.gone = true;
                return log;
            }
        };
        if let Some(pause) = behaviour.pace {
            tokio::time::sleep(pause).await;
        }
        match frame.kind {
            FrameType::SingleChat => {}
            FrameType::Error => {
                rec.error(frame.reason.map_or("unknown", |r| r.as_str()));
                continue;
            }
            _ => continue,
        }
        let now = Instant::now();
        let seq = frame.client_msg_id.as_deref().and_then(|c| c.parse::<u64>().ok());
        let (Some(from), Some(seq), Some(server_msg_id)) = (frame.from, seq, frame.server_msg_id) else {
            rec.error("malformed_push");
            continue;
        };
        if let Some(acks) = acks.as_mut() {
            acks.seen(server_msg_id);
        }
        if seen.insert((from, seq)) {
            Counters::bump(&rec.counters.delivered);
            // Slow receivers' latency is their own doing; the figure is about everyone else.
            if let (Some(sent_at_us), false) = (frame.body.as_deref().and_then(body_sent_at), slow) {
                if schedule.measured(sent_at_us) {
                    rec.record(Latency::EndToEnd, schedule.since(sent_at_us, now));
                }
            }
        } else {
            Counters::bump(&rec.counters.duplicates);
        }
        log.deliveries.push(Delivery { from, seq, server_msg_id });
    }
    writer.close().await;
    log
}
