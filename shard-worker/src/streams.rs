//! Reading a shard stream through its consumer group, fenced by the shard lease.
//!
//! Every stage uses the same consumer name per shard (`owner`), so whoever holds the lease inherits the
//! previous owner's pending entries (the PEL) and reads them first — from id `0` — before new ones
//! (`>`). That is crash recovery and per-sender order across a takeover in one rule. Entries leave a
//! stream only through the fenced scripts of [`crate::mover`].
//!
//! Reads are fenced too. A group read moves entries into the shared PEL, so a former owner that
//! still reads after the lease changed hands (its key evicted or lost in a failover, a blocked read
//! answered after a takeover) would park entries where the new owner, having read the PEL once,
//! never looks again: they would stay unsaved while later messages of the same senders go past. So
//! every group read runs in [`FENCED_READ`], which checks the lease value first, and never blocks;
//! waiting for new entries is a plain blocking `XREAD` from the stream's last id, which takes
//! nothing into the PEL.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use im_common::connections::RedisConn;
use redis::{Script, Value};

use im_common::record::MSG_FIELD;

/// The consumer name every owner of a shard uses.
pub const CONSUMER: &str = "owner";

/// KEYS: lease, stream. ARGV: lease value, group, consumer, count, start id (`0` or `>`).
/// Returns the entries read, or — when there are none — the stream's last generated id (a string),
/// from which a blocking `XREAD` waits for the next entry.
const FENCED_READ: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED shard lease lost') end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], ARGV[5])
if r and #r[1][2] > 0 then return r[1][2] end
local info = redis.call('XINFO', 'STREAM', KEYS[2])
for k = 1, #info, 2 do
  if info[k] == 'last-generated-id' then return info[k + 1] end
end
return '0-0'
";

static FENCED_READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FENCED_READ));

/// One stream entry: its id and the MessagePack payload.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub payload: Vec<u8>,
}

/// What one fenced read found.
enum Read {
    Entries(Vec<Entry>),
    /// Nothing to read; the stream's last generated id.
    Nothing(String),
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
    pending_done: bool,
    /// The last entry id seen when a read found the stream drained: the next read waits for more.
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
            pending_done: false,
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

    /// Goes back to reading pending entries first (after an error left a batch unacknowledged).
    pub fn rewind(&mut self) {
        self.pending_done = false;
        self.drained_at = None;
    }

    /// The next batch: pending entries while there are any, else new entries. Once a read found the
    /// stream drained (fewer than `count` entries), the next waits — a plain blocking `XREAD`, up to
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
        if !self.pending_done {
            if let Read::Entries(pending) = self.read("0", self.count).await? {
                self.read_at = Some(Instant::now());
                return Ok(pending);
            }
            self.pending_done = true;
        }
        let last = match self.drained_at.take() {
            Some(last) => last,
            None => match self.read(">", self.count).await? {
                Read::Entries(batch) => return Ok(self.took(batch)),
                Read::Nothing(last) => last,
            },
        };
        if !self.wait_beyond(&last, self.block_ms).await? {
            self.drained_at = Some(last);
            return Ok(Vec::new());
        }
        let delay = Duration::from_millis(self.max_delay_ms).saturating_sub(busy);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match self.read(">", self.count).await? {
            Read::Entries(batch) => Ok(self.took(batch)),
            Read::Nothing(last) => {
                self.drained_at = Some(last);
                Ok(Vec::new())
            }
        }
    }

    /// Remembers when a batch was read, and where a partial one left the stream: drained, so the next
    /// read waits.
    fn took(&mut self, batch: Vec<Entry>) -> Vec<Entry> {
        self.read_at = Some(Instant::now());
        if batch.len() < self.count {
            self.drained_at = batch.last().map(|e| e.id.clone());
        }
        batch
    }

    /// One fenced, non-blocking group read from `from`.
    async fn read(&mut self, from: &str, count: usize) -> redis::RedisResult<Read> {
        let reply: Value = FENCED_READ_SCRIPT
            .key(&self.fence.lease_key)
            .key(&self.key)
            .arg(&self.fence.lease_value)
            .arg(&self.group)
            .arg(CONSUMER)
            .arg(count)
            .arg(from)
            .invoke_async(&mut self.conn)
            .await?;
        match reply {
            Value::Array(entries) => Ok(Read::Entries(entries.into_iter().filter_map(entry).collect())),
            Value::BulkString(last) => Ok(Read::Nothing(String::from_utf8_lossy(&last).into_owned())),
            Value::SimpleString(last) => Ok(Read::Nothing(last)),
            other => Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected fenced read reply",
                format!("{other:?}"),
            ))),
        }
    }

    /// Blocks up to `ms` until the stream has an entry after `after`; true if it has.
    async fn wait_beyond(&mut self, after: &str, ms: u64) -> redis::RedisResult<bool> {
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
        Ok(!matches!(reply, Value::Nil))
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
