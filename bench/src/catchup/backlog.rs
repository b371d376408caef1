//! Phase 1 of the storm: a sender that builds the receivers' backlog.

use super::*;

/// One sender of the backlog: sends `to[k]` message `k` (clientMsgId `k`), at most
/// [`SENDER_WINDOW`] unanswered, resending refused ones; then keeps reading (`RECEIPT`s) until
/// shutdown. `Err`: the connection broke before every message was saved.
pub(super) async fn send_backlog(
    mut reader: WsReader,
    mut writer: WsWriter,
    to: Vec<u64>,
    saved: &AtomicU64,
    refusals: &AtomicU64,
    receipts: &AtomicU64,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let body = "catch me up";
    let mut next = 0;
    let mut answered = vec![false; to.len()];
    let mut in_flight = 0usize;
    let mut retry: Vec<(Instant, usize)> = Vec::new();
    loop {
        while in_flight < SENDER_WINDOW && next < to.len() {
            send_chat(&mut writer, to[next], next, body).await?;
            next += 1;
            in_flight += 1;
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = retry.into_iter().partition(|&(at, _)| at <= now);
        retry = later;
        for (_, k) in due {
            send_chat(&mut writer, to[k], k, body).await?;
        }
        let wake = retry.iter().map(|&(at, _)| at).min().unwrap_or(now + Duration::from_secs(30));
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(wake) => continue,
            r = reader.next() => r,
        };
        let frame = match incoming {
            Ok(Incoming::Frame(f)) => f,
            Ok(Incoming::Unparsable) => continue,
            Ok(Incoming::Closed(..)) | Err(_) => {
                return if answered.iter().all(|&a| a) { Ok(()) } else { Err("disconnected".into()) };
            }
        };
        let k = frame.client_msg_id.as_deref().and_then(|c| c.parse::<usize>().ok()).filter(|&k| k < to.len());
        match (frame.kind, frame.ack_type, k) {
            (Kind::Ack, Some(AckKind::Saved), Some(k)) if !answered[k] => {
                answered[k] = true;
                in_flight -= 1;
                saved.fetch_add(1, Ordering::Relaxed);
            }
            (Kind::Error, _, Some(k)) if !answered[k] => {
                refusals.fetch_add(1, Ordering::Relaxed);
                retry.push((Instant::now() + RESEND_AFTER, k));
            }
            (Kind::Receipt, _, _) => {
                receipts.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Sends message `k` (its clientMsgId) to `to`.
async fn send_chat(writer: &mut WsWriter, to: u64, k: usize, body: &str) -> Result<(), String> {
    let id = k.to_string();
    let chat = ClientFrame::SingleChat { to, client_msg_id: &id, msg_type: "TEXT", body };
    writer.send(&chat).await.map_err(|_| "write_failed".to_owned())
}
