//! The engine's Redis operations, raw: pipelined XADD, XREADGROUP + XACK, and PUBLISH to one
//! subscriber — each on long-lived multiplexed connections, as the gateways and workers hold them.
//!
//! Every key lives under the scratch prefix. Streams are capped (`MAXLEN ~`) so a few seconds at
//! hundreds of thousands of appends per second do not fill the server's memory; the engine keeps its
//! streams short by trimming what it acknowledged (`XTRIM MINID`) instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use im_common::record::MSG_FIELD;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::AsyncConnectionConfig;
use tokio::sync::Notify;

use super::model::{Measurement, Op};
use super::window::{measure, pace, CpuScope, Drive, Workers};
use super::{LimitsError, Scratch, CONNECTIONS, PAYLOAD_BYTES};

/// Commands per pipeline, and entries per XREADGROUP.
pub const PIPELINE: usize = 64;
/// Entries a measured stream keeps (approximately).
const STREAM_CAP: usize = 10_000;
/// Entries each read-and-ack stream holds; read again from the start once all are acknowledged.
const READ_STREAM_ENTRIES: usize = 8_192;
/// The consumer group of the read-and-ack streams.
const GROUP: &str = "limits";
/// Publications sent but not yet received beyond which publishers wait: a subscriber that falls
/// behind far enough is disconnected by Redis, and its messages are lost silently.
const MAX_UNRECEIVED: u64 = 64 * PIPELINE as u64;
/// A loaded machine answers slowly; the default 500 ms would fail a measurement, not measure it.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A message-sized payload.
fn payload() -> Vec<u8> {
    vec![b'x'; PAYLOAD_BYTES]
}

async fn connect(url: &str) -> Result<MultiplexedConnection, LimitsError> {
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
    Ok(redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&config).await?)
}

fn how(drive: Drive, what: &str) -> String {
    format!(
        "{CONNECTIONS} connections, {}, pipelines of {}, {PAYLOAD_BYTES} B {what}",
        drive.describe(),
        drive.batch(PIPELINE)
    )
}

/// Pipelined XADD of a message-sized entry, one stream per connection.
pub async fn xadd(scratch: &Scratch, secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    let mut workers = Workers::new();
    let batch = drive.batch(PIPELINE);
    for worker in 0..CONNECTIONS {
        let mut conn = connect(&scratch.redis_url).await?;
        let stream = scratch.key(&format!("xadd:{worker}"));
        let (done, stop) = (workers.done.clone(), workers.stop.clone());
        let mut ticker = drive.ticker(Op::Xadd, CONNECTIONS, batch);
        workers.tasks.spawn(async move {
            let payload = payload();
            while !stop.is_cancelled() {
                pace(&mut ticker).await;
                let mut pipe = redis::pipe();
                for _ in 0..batch {
                    pipe.cmd("XADD").arg(&stream).arg("MAXLEN").arg("~").arg(STREAM_CAP).arg("*");
                    pipe.arg(MSG_FIELD).arg(&payload).ignore();
                }
                let () = pipe.query_async(&mut conn).await?;
                done.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    let scope = CpuScope::ServersAndBench(scratch.redis_processes.clone());
    measure(Op::Xadd, how(drive, "entries"), scope, secs, workers).await
}

/// XREADGROUP COUNT 64 (1 paced) and XACK of the previous batch in one pipeline, one stream and group per
/// connection (as each shard's worker reads its own). An entry counts once it is acknowledged.
pub async fn read_ack(scratch: &Scratch, secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    let mut workers = Workers::new();
    let batch = drive.batch(PIPELINE);
    for worker in 0..CONNECTIONS {
        let mut conn = connect(&scratch.redis_url).await?;
        let stream = scratch.key(&format!("read:{worker}"));
        fill(&mut conn, &stream).await?;
        let (done, stop) = (workers.done.clone(), workers.stop.clone());
        let mut ticker = drive.ticker(Op::ReadAck, CONNECTIONS, batch);
        workers.tasks.spawn(async move {
            let mut unacked: Vec<String> = Vec::new();
            while !stop.is_cancelled() {
                pace(&mut ticker).await;
                let mut pipe = redis::pipe();
                if !unacked.is_empty() {
                    pipe.cmd("XACK").arg(&stream).arg(GROUP).arg(&unacked).ignore();
                }
                pipe.cmd("XREADGROUP").arg("GROUP").arg(GROUP).arg("bench").arg("COUNT").arg(batch);
                pipe.arg("STREAMS").arg(&stream).arg(">");
                let (reply,): (Option<StreamReadReply>,) = pipe.query_async(&mut conn).await?;
                done.fetch_add(unacked.len() as u64, Ordering::Relaxed);
                unacked = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| e.id).collect();
                if unacked.is_empty() {
                    // Everything was read and acknowledged: deliver the same entries again.
                    let () = redis::cmd("XGROUP")
                        .arg("SETID")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg("0")
                        .query_async(&mut conn)
                        .await?;
                }
            }
            Ok(())
        });
    }
    let scope = CpuScope::ServersAndBench(scratch.redis_processes.clone());
    measure(Op::ReadAck, how(drive, "entries, XACK of each batch with the next read"), scope, secs, workers).await
}

/// Fills `stream` with [`READ_STREAM_ENTRIES`] entries and creates the consumer group at its start.
async fn fill(conn: &mut MultiplexedConnection, stream: &str) -> Result<(), LimitsError> {
    let payload = payload();
    for _ in 0..READ_STREAM_ENTRIES / 1024 {
        let mut pipe = redis::pipe();
        for _ in 0..1024 {
            pipe.cmd("XADD").arg(stream).arg("*").arg(MSG_FIELD).arg(&payload).ignore();
        }
        let () = pipe.query_async(conn).await?;
    }
    let () = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").query_async(conn).await?;
    Ok(())
}

/// Pipelined PUBLISH of a message-sized payload to one channel with one subscriber. A publication
/// counts once the subscriber has it; publishers wait while more than [`MAX_UNRECEIVED`] are
/// still on their way, so the rate is what a subscriber that keeps up receives.
pub async fn publish(scratch: &Scratch, secs: Duration, drive: Drive) -> Result<Measurement, LimitsError> {
    let channel = scratch.key("publish");
    let mut subscriber = redis::Client::open(scratch.redis_url.as_str())?.get_async_pubsub().await?;
    subscriber.subscribe(&channel).await?;
    let mut messages = subscriber.into_on_message();
    let mut workers = Workers::new();
    let published = Arc::new(AtomicU64::new(0));
    let caught_up = Arc::new(Notify::new());
    let (received, stop, notify) = (workers.done.clone(), workers.stop.clone(), caught_up.clone());
    workers.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                message = messages.next() => {
                    if message.is_none() {
                        return Err(LimitsError::Worker("the subscriber was disconnected".into()));
                    }
                    if received.fetch_add(1, Ordering::Relaxed) % PIPELINE as u64 == 0 {
                        notify.notify_waiters();
                    }
                }
            }
        }
    });
    let batch = drive.batch(PIPELINE);
    for _ in 0..CONNECTIONS {
        let mut conn = connect(&scratch.redis_url).await?;
        let (channel, received, stop) = (channel.clone(), workers.done.clone(), workers.stop.clone());
        let (published, caught_up) = (published.clone(), caught_up.clone());
        let mut ticker = drive.ticker(Op::Publish, CONNECTIONS, batch);
        workers.tasks.spawn(async move {
            let payload = payload();
            while !stop.is_cancelled() {
                pace(&mut ticker).await;
                if published.load(Ordering::Relaxed).saturating_sub(received.load(Ordering::Relaxed)) > MAX_UNRECEIVED {
                    // Woken when the subscriber catches up; the timeout covers a wake-up missed
                    // between the check and the wait.
                    let _ = tokio::time::timeout(Duration::from_millis(1), caught_up.notified()).await;
                    continue;
                }
                let mut pipe = redis::pipe();
                for _ in 0..batch {
                    pipe.cmd("PUBLISH").arg(&channel).arg(&payload).ignore();
                }
                let () = pipe.query_async(&mut conn).await?;
                published.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    let scope = CpuScope::ServersAndBench(scratch.redis_processes.clone());
    measure(Op::Publish, how(drive, "payloads, counted as received"), scope, secs, workers).await
}
