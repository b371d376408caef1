//! Reading a shard stream through its consumer group.
//!
//! Every stage uses the same consumer name per shard (`owner`), so whoever holds the lease inherits the
//! previous owner's pending entries (the PEL) and reads them first — from id `0` — before new ones
//! (`>`). That is crash recovery and per-sender order across a takeover in one rule. Entries leave a
//! stream only through the fenced scripts of [`crate::mover`].

use redis::aio::ConnectionManager;
use redis::streams::StreamReadReply;

use im_common::record::MSG_FIELD;

/// The consumer name every owner of a shard uses.
pub const CONSUMER: &str = "owner";

/// One stream entry: its id and the MessagePack payload.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub payload: Vec<u8>,
}

/// Reads batches from one stream for the shard owner: first the pending entries, then new ones.
pub struct StreamReader {
    conn: ConnectionManager,
    pub key: String,
    group: String,
    count: usize,
    block_ms: u64,
    max_delay_ms: u64,
    pending_done: bool,
}

impl StreamReader {
    /// A reader on a dedicated connection (blocking reads must not share one).
    pub fn new(
        conn: ConnectionManager,
        key: String,
        group: String,
        count: usize,
        block_ms: u64,
        max_delay_ms: u64,
    ) -> Self {
        StreamReader { conn, key, group, count, block_ms, max_delay_ms, pending_done: false }
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

    /// Goes back to reading pending entries first (after an error left a batch unacknowledged).
    pub fn rewind(&mut self) {
        self.pending_done = false;
    }

    /// The next batch: pending entries while there are any, else new entries (blocking up to
    /// `block_ms`). A partial batch waits up to `max_delay_ms` once for more, so batches grow under
    /// load while a lone message is never held longer than that.
    pub async fn next_batch(&mut self) -> redis::RedisResult<Vec<Entry>> {
        if !self.pending_done {
            let pending = self.read("0", None, self.count).await?;
            if !pending.is_empty() {
                return Ok(pending);
            }
            self.pending_done = true;
        }
        let mut batch = self.read(">", Some(self.block_ms), self.count).await?;
        if !batch.is_empty() && batch.len() < self.count && self.max_delay_ms > 0 {
            let more = self.read(">", Some(self.max_delay_ms), self.count - batch.len()).await?;
            batch.extend(more);
        }
        Ok(batch)
    }

    async fn read(&mut self, from: &str, block_ms: Option<u64>, count: usize) -> redis::RedisResult<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.group).arg(CONSUMER).arg("COUNT").arg(count);
        if let Some(ms) = block_ms {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(from);
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
        Ok(entries
            .map(|e| {
                let payload = match e.map.get(MSG_FIELD) {
                    Some(redis::Value::BulkString(bytes)) => bytes.clone(),
                    _ => Vec::new(),
                };
                Entry { id: e.id, payload }
            })
            .collect())
    }
}
