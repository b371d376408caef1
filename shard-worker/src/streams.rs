//! Reading a shard stream through its consumer group, and the scripts that move entries on.
//!
//! Every stage uses the same consumer name per shard (`owner`), so whoever holds the lease inherits the
//! previous owner's pending entries (the PEL) and reads them first — from id `0` — before new ones
//! (`>`). That is crash recovery and per-sender order across a takeover in one rule. Entries leave a
//! stream only through the scripts below, which first check the lease value (fencing) and XACK + XDEL
//! an entry in the same atomic step that hands it to the next stage, so an entry is acknowledged only
//! once the next stage durably has it, and streams stay trimmed to what is in flight.

use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::streams::StreamReadReply;
use redis::Script;

use im_common::bus::{Publication, JOURNAL_LUA};
use im_common::keys::Keys;
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

/// Shared prologue of the scripts: the fencing check, and `take(n)` to read the next `n` ARGVs.
const PROLOGUE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED shard lease lost') end
local at = 1
local function take(n)
  local t = {}
  for k = 1, n do t[k] = ARGV[at + k] end
  at = at + n
  return t
end
-- Publication k goes to channels[k], journaled under KEYS[first + k - 1].
local function publish(channels, messages, first)
  for k = 1, #channels do deliver(channels[k], messages[k], KEYS[first + k - 1]) end
end
local function ack(stream, group, ids)
  for k = 1, #ids do
    redis.call('XACK', stream, group, ids[k])
    redis.call('XDEL', stream, ids[k])
  end
end
";

/// Deliver → save: publish the pushes, append the payloads to `to_save`, XACK + XDEL on `accepted`.
/// KEYS: lease, accepted, to_save, journals (one per publication). ARGV: lease value, then group, field, n_ack, n_add, n_pub,
/// ids.., payloads.., channels.., messages..
const HANDOFF: &str = r"
local head = take(5)
local group, field = head[1], head[2]
local ids, payloads = take(tonumber(head[3])), take(tonumber(head[4]))
local n_pub = tonumber(head[5])
local channels, messages = take(n_pub), take(n_pub)
for k = 1, #payloads do redis.call('XADD', KEYS[3], '*', field, payloads[k]) end
publish(channels, messages, 4)
ack(KEYS[2], group, ids)
return #ids
";

/// Save done: dead-letter the rejected, mark the saved in the idempotency window, publish receipts
/// (and, in accepted-only mode, the pushes), XACK + XDEL the batch.
/// KEYS: lease, stream, dead-letter stream, journals (one per publication), idempotency keys..
/// ARGV: lease value, then group, ttl,
/// field, n_ack, n_dead, n_pub, ids.., dead payloads.., dead reasons.., channels.., messages..,
/// idempotency values (one per key).
const COMMIT: &str = r"
local head = take(6)
local group, ttl, field = head[1], head[2], head[3]
local ids = take(tonumber(head[4]))
local n_dead, n_pub = tonumber(head[5]), tonumber(head[6])
local dead, reasons = take(n_dead), take(n_dead)
local channels, messages = take(n_pub), take(n_pub)
local states = take(#KEYS - 3 - n_pub)
for k = 1, n_dead do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', field, dead[k], 'reason', reasons[k])
end
for k = 1, #states do redis.call('SET', KEYS[3 + n_pub + k], states[k], 'EX', ttl) end
publish(channels, messages, 4)
ack(KEYS[2], group, ids)
return #ids
";

static HANDOFF_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{}{PROLOGUE}{HANDOFF}", *JOURNAL_LUA)));
static COMMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{}{PROLOGUE}{COMMIT}", *JOURNAL_LUA)));

/// The fenced stream operations of one shard owner. Each is one atomic script, so a batch's pushes,
/// its hand-over to the next stage and its acknowledgement happen together or not at all.
#[derive(Clone)]
pub struct Mover {
    pub conn: ConnectionManager,
    pub keys: Keys,
    pub shard: u16,
    pub lease_key: String,
    pub lease_value: String,
    pub group: String,
    pub idempotency_ttl: u64,
}

/// A rejected message bound for the dead-letter stream.
pub struct DeadLetter<'a> {
    pub payload: &'a [u8],
    pub reason: &'a str,
}

fn add_publications(inv: &mut redis::ScriptInvocation<'_>, pubs: &[Publication]) {
    for p in pubs {
        inv.arg(&p.channel);
    }
    for p in pubs {
        inv.arg(&p.payload);
    }
}

impl Mover {
    /// The journal of each publication, as KEYS.
    fn add_journal_keys(&self, inv: &mut redis::ScriptInvocation<'_>, pubs: &[Publication]) {
        for p in pubs {
            inv.key(self.keys.journal_of_shard(self.shard, p.node));
        }
    }

    /// Moves entries from `accepted` to `to_save`, publishing `pubs` in the same step.
    pub async fn handoff(
        &self,
        accepted: &str,
        to_save: &str,
        ids: &[&str],
        payloads: &[&[u8]],
        pubs: &[Publication],
    ) -> redis::RedisResult<()> {
        let mut inv = HANDOFF_SCRIPT.prepare_invoke();
        inv.key(&self.lease_key).key(accepted).key(to_save);
        self.add_journal_keys(&mut inv, pubs);
        inv.arg(&self.lease_value).arg(&self.group).arg(MSG_FIELD);
        inv.arg(ids.len()).arg(payloads.len()).arg(pubs.len());
        inv.arg(ids).arg(payloads);
        add_publications(&mut inv, pubs);
        inv.invoke_async(&mut self.conn.clone()).await
    }

    /// Finishes a saved batch: `saved` holds (idempotency key, state) of every saved message.
    pub async fn commit(
        &self,
        stream: &str,
        dead_stream: &str,
        ids: &[&str],
        dead: &[DeadLetter<'_>],
        pubs: &[Publication],
        saved: &[(String, String)],
    ) -> redis::RedisResult<()> {
        let mut inv = COMMIT_SCRIPT.prepare_invoke();
        inv.key(&self.lease_key).key(stream).key(dead_stream);
        self.add_journal_keys(&mut inv, pubs);
        for (key, _) in saved {
            inv.key(key);
        }
        inv.arg(&self.lease_value).arg(&self.group).arg(self.idempotency_ttl).arg(MSG_FIELD);
        inv.arg(ids.len()).arg(dead.len()).arg(pubs.len()).arg(ids);
        for d in dead {
            inv.arg(d.payload);
        }
        for d in dead {
            inv.arg(d.reason);
        }
        add_publications(&mut inv, pubs);
        for (_, state) in saved {
            inv.arg(state);
        }
        inv.invoke_async(&mut self.conn.clone()).await
    }
}
