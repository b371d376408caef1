//! Phase 2 of the storm: one receiving device catching up as a real client.

use super::*;

/// One receiver of the storm.
pub(super) struct StormDevice {
    pub(super) url: String,
    pub(super) token: String,
    pub(super) auth: AuthMode,
    pub(super) timeout: Duration,
    pub(super) options: ConnectOptions,
    pub(super) acks: ReceiverAcks,
    /// Messages it is owed.
    pub(super) owed: u64,
    pub(super) began: Instant,
}

impl StormDevice {
    /// Connects (again after any close), syncs, reads and confirms until shutdown.
    pub(super) async fn run(
        self,
        tally: &Tally,
        limiter: &tokio::sync::Semaphore,
        shutdown: &CancellationToken,
    ) -> DeviceResult {
        let mut result = DeviceResult::default();
        let mut state = DeviceState::new(false);
        let mut first = true;
        'connect: loop {
            let conn = {
                let _permit = tokio::select! {
                    p = limiter.acquire() => p.ok(),
                    _ = shutdown.cancelled() => return result,
                };
                tokio::select! {
                    c = client::connect_with(&self.url, &self.token, self.auth, self.timeout, self.options) => c,
                    _ = shutdown.cancelled() => return result,
                }
            };
            let (mut reader, mut writer) = match conn {
                Ok(c) => c,
                Err(e) => {
                    Tally::bump(&tally.connect_failures);
                    tally.close(format!("re{}", e.label()));
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_PAUSE) => continue 'connect,
                        _ = shutdown.cancelled() => return result,
                    }
                }
            };
            let connected = Instant::now();
            if first {
                Tally::bump(&tally.connected);
                result.connected_after = Some(connected.saturating_duration_since(self.began));
                first = false;
            } else {
                state.reconnected();
            }
            state.full_sync_began(connected);
            if self.options.manual_sync {
                let sync = ClientFrame::Sync { positions: Some(state.positions()), peer: None, after_seq: None };
                if writer.send(&sync).await.is_err() {
                    continue 'connect;
                }
            }
            loop {
                let now = Instant::now();
                let due = state.next_due(now, self.acks == ReceiverAcks::Seq);
                let incoming = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        writer.close().await;
                        return result;
                    }
                    _ = tokio::time::sleep_until(due.unwrap_or(now)), if due.is_some() => {
                        for (peer, seq, _) in if self.acks == ReceiverAcks::Seq { state.take_acks(now) } else { Vec::new() } {
                            let ack = ClientFrame::AckSeq { ack_type: "delivered", from: peer.to_string(), seq };
                            if writer.send(&ack).await.is_err() {
                                continue 'connect;
                            }
                            Tally::bump(&tally.acks);
                        }
                        for (peer, after_seq) in state.take_gap_syncs(now) {
                            let sync = ClientFrame::Sync { positions: None, peer: Some(peer.to_string()), after_seq: Some(after_seq) };
                            if writer.send(&sync).await.is_err() {
                                continue 'connect;
                            }
                        }
                        continue;
                    }
                    r = reader.next() => r,
                };
                let frame = match incoming {
                    Ok(Incoming::Frame(f)) => f,
                    Ok(Incoming::Unparsable) => continue,
                    Ok(Incoming::Closed(code, reason)) => {
                        tally.close(crate::load::close_label(code, &reason));
                        continue 'connect;
                    }
                    Err(_) => {
                        tally.close("disconnected".into());
                        continue 'connect;
                    }
                };
                match frame.kind {
                    Kind::SingleChat => {
                        let (Some(from), Some(id)) = (frame.from, frame.server_msg_id) else { continue };
                        match state.push(from, frame.seq, id, Instant::now()) {
                            Held::Duplicate => Tally::bump(&tally.duplicates),
                            held => {
                                if held == Held::SeqReused {
                                    Tally::bump(&tally.seq_reused);
                                }
                                if frame.seq.is_none() {
                                    Tally::bump(&tally.without_seq);
                                }
                                result.held += 1;
                                Tally::bump(&tally.held);
                                if result.held == self.owed {
                                    result.complete_after = Some(self.began.elapsed());
                                    Tally::bump(&tally.complete);
                                }
                            }
                        }
                    }
                    Kind::SyncDone => {
                        if let Some(took) = state.sync_done(frame.peer, Instant::now()) {
                            if frame.peer.is_none() && result.sync_took.is_none() {
                                result.sync_took = Some(took);
                            }
                        }
                    }
                    Kind::Error if frame.reason() == "too_many_requests" => state.confirm_again(),
                    _ => {}
                }
            }
        }
    }
}
