//! Reading a shard stream through its consumer group.
//!
//! Every stage uses the same consumer name per shard (`owner`), so whoever holds the lease inherits the
//! previous owner's pending entries (the PEL) and reads them first — from id `0` — before new ones
//! (`>`). That is crash recovery and per-sender order across a takeover in one rule. Entries leave a
//! stream only through the fenced scripts of [`crate::mover`].
//!
//! A reader keeps a cursor, the last id it took, and every read is one transaction (`MULTI`) of the
//! lease's value and two plain group reads: the pending entries after the cursor, then new ones.
//! Together they are every entry after the cursor, in stream order, also those a former owner's
//! late read moved into the shared PEL. A reader whose lease value is no longer in Redis gets
//! `FENCED` instead of its entries (they stay in the PEL for the owner), so a former owner stops at
//! its first read after a takeover. Waiting for new entries is a plain blocking `XREAD` beyond the
//! cursor, which takes nothing into the PEL. Why not a Lua script: docs/ARCHITECTURE.md, "The
//! pipeline".

use std::time::{Duration, Instant};

use im_common::connections::RedisConn;
use redis::Value;

use im_common::record::MSG_FIELD;

/// The consumer name every owner of a shard uses.
pub const CONSUMER: &str = "owner";

/// One stream entry: its id and the MessagePack payload.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub payload: Vec<u8>,
}

/// The lease a reader proves on every read: its key and the value it must hold.
#[derive(Debug, Clone)]
pub struct Fence {
    pub lease_key: String,
    pub lease_value: String,
}

/// Reads batches from one stream for the shard owner: first the pending entries, then new ones.
pub struct StreamReader {
    conn: RedisConn,
    fence: Fence,
    pub key: String,
    group: String,
    count: usize,
    block_ms: u64,
    max_delay_ms: u64,
    /// The last id taken; the next read takes what follows it. `0`: from the start of the PEL.
    cursor: String,
    /// Set when a read found nothing more to take: the id beyond which the next call waits first.
    drained_at: Option<String>,
    /// When the last call returned a batch: the stage has been busy with it since.
    read_at: Option<Instant>,
}

impl StreamReader {
    /// A reader on a dedicated connection (blocking reads must not share one), reading only while
    /// `fence` holds.
    pub fn new(
        conn: RedisConn,
        fence: Fence,
        key: String,
        group: String,
        count: usize,
        block_ms: u64,
        max_delay_ms: u64,
    ) -> Self {
        StreamReader {
            conn,
            fence,
            key,
            group,
            count,
            block_ms,
            max_delay_ms,
            cursor: "0".into(),
            drained_at: None,
            read_at: None,
        }
    }

    /// Creates the consumer group (and the stream) if missing.
    pub async fn ensure_group(&mut self) -> redis::RedisResult<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// After a failed read: the next one reads at once, on from the last batch taken (what the
    /// failed read may have moved into the PEL is after it). Never back to a batch already taken:
    /// the stage may still be acknowledging it.
    pub fn resume(&mut self) {
        self.drained_at = None;
    }

    /// The next batch: the entries after the last one taken, pending ones first. Once a read found
    /// nothing more (fewer than `count` entries), the next waits — a plain blocking `XREAD`, up to
    /// `block_ms` — for an entry beyond the last one seen, then lets `max_delay_ms` pass before it
    /// reads, so a burst gathers into one batch. The time the stage spent on its previous batch
    /// counts towards that delay (entries were arriving meanwhile): under load a stage reads again
    /// as soon as it is done, and no entry waits for batching longer than the delay beyond the
    /// stage being busy. Two round trips per batch however light the load. Fails with `FENCED`
    /// once the lease is no longer this reader's.
    pub async fn next_batch(&mut self) -> redis::RedisResult<Vec<Entry>> {
        // Since the last batch was read, the stage was busy with it (none if the last call found
        // nothing).
        let busy = self.read_at.take().map_or(Duration::ZERO, |at| at.elapsed());
        let after = match self.drained_at.take() {
            Some(after) => after,
            None => {
                let batch = self.read().await?;
                if !batch.is_empty() {
                    return Ok(self.took(batch));
                }
                self.cursor.clone()
            }
        };
        let Some(seen) = self.wait_beyond(&after, self.block_ms).await? else {
            self.drained_at = Some(after);
            return Ok(Vec::new());
        };
        let delay = Duration::from_millis(self.max_delay_ms).saturating_sub(busy);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let batch = self.read().await?;
        if batch.is_empty() {
            // The entry that woke the wait is nothing to take (not this group's to read): wait
            // beyond it next time, not wake for it again.
            self.drained_at = Some(seen);
            return Ok(Vec::new());
        }
        Ok(self.took(batch))
    }

    /// Remembers when a batch was read, and where a partial one left the stream: drained, so the next
    /// read waits.
    fn took(&mut self, batch: Vec<Entry>) -> Vec<Entry> {
        self.read_at = Some(Instant::now());
        if batch.len() < self.count {
            self.drained_at = Some(self.cursor.clone());
        }
        batch
    }

    /// Up to `count` entries after the cursor, in stream order, and the cursor moved past them: in one
    /// transaction, the lease's value, the pending entries after the cursor (a former owner's read
    /// may have moved some there), then new ones. Entries the second read took beyond `count` stay
    /// pending after the new cursor, and the next read returns them first. `FENCED` (the cursor
    /// unmoved) if the lease is no longer this reader's.
    async fn read(&mut self) -> redis::RedisResult<Vec<Entry>> {
        let mut pipe = redis::pipe();
        pipe.atomic().get(&self.fence.lease_key);
        for from in [self.cursor.as_str(), ">"] {
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(CONSUMER)
                .arg("COUNT")
                .arg(self.count)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(from);
        }
        let (lease, pending, new): (Option<String>, Value, Value) = pipe.query_async(&mut self.conn).await?;
        if lease.as_deref() != Some(self.fence.lease_value.as_str()) {
            return Err(redis::RedisError::from((redis::ErrorKind::Client, "FENCED shard lease lost")));
        }
        let mut batch = entries(pending)?;
        batch.extend(entries(new)?);
        batch.truncate(self.count);
        if let Some(last) = batch.last() {
            self.cursor.clone_from(&last.id);
        }
        Ok(batch)
    }

    /// Blocks up to `ms` until the stream has an entry after `after`; its id if it has.
    async fn wait_beyond(&mut self, after: &str, ms: u64) -> redis::RedisResult<Option<String>> {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(after)
            .query_async(&mut self.conn)
            .await?;
        Ok(entries(reply)?.pop().map(|e| e.id))
    }
}

/// The entries of a one-stream `XREAD`/`XREADGROUP` reply: `[[key, [entry, ...]]]` (a map of the
/// key to its entries in RESP3), or nil when there are none.
fn entries(reply: Value) -> redis::RedisResult<Vec<Entry>> {
    let list = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next() {
            Some(Value::Array(mut key_and_entries)) if key_and_entries.len() == 2 => key_and_entries.pop(),
            _ => None,
        },
        Value::Map(streams) => streams.into_iter().next().map(|(_, list)| list),
        _ => None,
    };
    match list {
        Some(Value::Array(list)) => Ok(list.into_iter().filter_map(entry).collect()),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected stream read reply",
            format!("{other:?}"),
        ))),
    }
}

/// `[id, [field, value, ...]]` → an [`Entry`] (payload empty if the field is missing, so the save
/// stage dead-letters it).
fn entry(v: Value) -> Option<Entry> {
    let Value::Array(mut parts) = v else { return None };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = match parts.pop()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        Value::SimpleString(s) => s,
        _ => return None,
    };
    let mut payload = Vec::new();
    if let Value::Array(fields) = fields {
        let mut it = fields.into_iter();
        while let (Some(name), Some(value)) = (it.next(), it.next()) {
            if matches!(&name, Value::BulkString(n) if n == MSG_FIELD.as_bytes()) {
                if let Value::BulkString(bytes) = value {
                    payload = bytes;
                }
            }
        }
    }
    Some(Entry { id, payload })
}
