//! The fenced scripts that move a shard's entries from one stage to the next.
//!
//! Each script first checks the lease value (fencing), so a paused ex-owner cannot move entries, and
//! XACKs an entry and trims it off its stream in the same atomic step that hands it to the next stage (the `to_save`
//! stream, or the saved row's receipts): an entry is acknowledged only once the next stage durably
//! has it, and streams stay trimmed to what is in flight. A deliver batch goes to `to_save` as one
//! entry ([`im_common::record::Handed`]); a count of the messages in `to_save` is kept with it
//! (`Keys::to_save_messages`), since its length no longer says how many wait to be saved. Pushes are published (journaled) inside
//! the same script, so a batch's pushes and its acknowledgement happen together or not at all.

use std::sync::LazyLock;

use im_common::connections::RedisConn;

use im_common::journal::PublishingScript;
use im_common::keys::Keys;
use im_common::record::MSG_FIELD;
use im_common::router::Publication;

use im_common::seq_counters::SEQ_LUA;

use crate::sequences::SeqPlan;

/// Most entries the dead-letter stream keeps (approximately; oldest trimmed first).
pub const DEAD_LETTER_MAXLEN: usize = 100_000;

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
-- Whether this batch was handed on already (a retry after a reply that got lost): its entries are
-- trimmed together when it is, so none of its range is left. (Not just its first entry: a pending
-- entry can outlive its stream entry, and such a batch must still be handed on and acknowledged.)
local function handed(stream, ids)
  return #ids > 0 and #redis.call('XRANGE', stream, ids[1], ids[#ids], 'COUNT', 1) == 0
end
-- One XACK per CALL_CHUNK ids (SEQ_LUA's; a command called from Lua costs more than its work
-- here), then one XTRIM. A stage takes its stream in id order, a contiguous batch at a time, and
-- acknowledges batches in that order, so when a batch is acknowledged every entry up to its last
-- id is done: MINID just past that id drops them all at once (whole stream nodes; 37 entries cost
-- 3 us against XDEL's 23 by id) and keeps everything after.
local function ack(stream, group, ids)
  for first = 1, #ids, CALL_CHUNK do
    redis.call('XACK', stream, group, unpack(ids, first, math.min(first + CALL_CHUNK - 1, #ids)))
  end
  if #ids > 0 then
    local ms, seq = string.match(ids[#ids], '^(%d+)-(%d+)$')
    redis.call('XTRIM', stream, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
  end
end
";

/// Deliver → save: number the batch (if the counters still hold what it was numbered from), publish
/// the pushes, append the batch to `to_save` as one entry and count its messages, XACK the batch on
/// `accepted` and trim it off.
/// KEYS: lease, accepted, to_save, seq counters, to_save message count, journals (one per
/// publication). ARGV: lease value, then group, field, n_ack, n_pub, n_seq, ids.., the batch,
/// channels.., messages.., seq fields.., bases.., tops..
const HANDOFF: &str = r"
local head = take(5)
local group, field = head[1], head[2]
local ids, batch = take(tonumber(head[3])), take(1)[1]
local n_pub, n_seq = tonumber(head[4]), tonumber(head[5])
local channels, messages = take(n_pub), take(n_pub)
local fields, bases, tops = take(n_seq), take(n_seq), take(n_seq)
if handed(KEYS[2], ids) then return 0 end
if not seqs_match(KEYS[4], fields, bases) then
  return redis.error_reply('SEQSTALE sequence counters moved since the batch was numbered')
end
set_seqs(KEYS[4], fields, tops)
redis.call('XADD', KEYS[3], '*', field, batch)
redis.pcall('INCRBY', KEYS[5], #ids)
publish(channels, messages, 6)
ack(KEYS[2], group, ids)
return #ids
";

/// Save done: raise the seq counters to the seqs the rows were saved with, dead-letter the
/// rejected, record saved and failed in the idempotency window, publish receipts (and the pushes:
/// all of them in accepted-only mode, again for recipients who connected since in full mode), XACK
/// the batch and trim it off; on `to_save`, take its messages off the count (which restarts from
/// nothing whenever the stream is empty, so a count set wrong by hand heals itself). The count only
/// informs (the backlog, admission): the scripts change it under `pcall`, so a count that is not a
/// number never stops a batch.
/// KEYS: lease, stream, dead-letter stream, seq counters, to_save message count, journals (one per
/// publication), idempotency keys.. ARGV: lease value, then group, ttl, dead-letter maxlen, field,
/// n_ack, n_dead, n_pub, n_seq, messages leaving to_save (0 on accepted), ids.., dead payloads..,
/// dead reasons.., channels.., messages.., seq fields.., tops.., idempotency values (one per key).
const COMMIT: &str = r"
local head = take(9)
local group, ttl, dead_maxlen, field = head[1], head[2], head[3], head[4]
local ids = take(tonumber(head[5]))
local n_dead, n_pub, n_seq, n_left = tonumber(head[6]), tonumber(head[7]), tonumber(head[8]), tonumber(head[9])
local dead, reasons = take(n_dead), take(n_dead)
local channels, messages = take(n_pub), take(n_pub)
local fields, tops = take(n_seq), take(n_seq)
local states = take(#KEYS - 5 - n_pub)
if handed(KEYS[2], ids) then return 0 end
raise_seqs(KEYS[4], fields, tops)
for k = 1, n_dead do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', dead_maxlen, '*', field, dead[k], 'reason', reasons[k])
end
for k = 1, #states do redis.call('SET', KEYS[5 + n_pub + k], states[k], 'EX', ttl) end
publish(channels, messages, 6)
ack(KEYS[2], group, ids)
if n_left > 0 then
  if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[5]) else redis.pcall('DECRBY', KEYS[5], n_left) end
end
return #ids
";

static HANDOFF_SCRIPT: LazyLock<PublishingScript> =
    LazyLock::new(|| PublishingScript::new(&format!("{SEQ_LUA}{PROLOGUE}{HANDOFF}")));
static COMMIT_SCRIPT: LazyLock<PublishingScript> =
    LazyLock::new(|| PublishingScript::new(&format!("{SEQ_LUA}{PROLOGUE}{COMMIT}")));

/// The fenced stream operations of one shard owner. Each is one atomic script, so a batch's pushes,
/// its hand-over to the next stage and its acknowledgement happen together or not at all.
#[derive(Clone)]
pub struct Mover {
    pub conn: RedisConn,
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

impl Mover {
    /// Each publication's channel (this shard's, for its node), then its payload, as ARGV.
    fn add_publications(&self, inv: &mut redis::ScriptInvocation<'_>, pubs: &[Publication]) {
        for p in pubs {
            inv.arg(self.keys.shard_channel(self.shard, p.node));
        }
        for p in pubs {
            inv.arg(&p.payload);
        }
    }

    /// The journal of each publication, as KEYS.
    fn add_journal_keys(&self, inv: &mut redis::ScriptInvocation<'_>, pubs: &[Publication]) {
        for p in pubs {
            inv.key(self.keys.journal_of_shard(self.shard, p.node));
        }
    }

    /// Moves the entries `ids` from `accepted` to `to_save` as one entry, `batch` (an encoded
    /// [`im_common::record::Handed`] holding them numbered by `seqs`), publishing `pubs` in the same
    /// step. Fails with `SEQSTALE` (nothing done) if the counters moved since the batch was numbered.
    pub async fn handoff(
        &self,
        accepted: &str,
        to_save: &str,
        ids: &[&str],
        batch: &[u8],
        pubs: &[Publication],
        seqs: &SeqPlan,
    ) -> redis::RedisResult<()> {
        let mut inv = HANDOFF_SCRIPT.on(&self.conn).prepare_invoke();
        inv.key(&self.lease_key).key(accepted).key(to_save).key(self.keys.seq_counters(self.shard));
        inv.key(self.keys.to_save_messages(self.shard));
        self.add_journal_keys(&mut inv, pubs);
        inv.arg(&self.lease_value).arg(&self.group).arg(MSG_FIELD);
        inv.arg(ids.len()).arg(pubs.len()).arg(seqs.fields.len());
        inv.arg(ids).arg(batch);
        self.add_publications(&mut inv, pubs);
        inv.arg(&seqs.fields).arg(&seqs.bases).arg(&seqs.tops);
        inv.invoke_async(&mut self.conn.clone()).await
    }

    /// Finishes a saved batch, the entries `ids` of `stream`: `settled` holds (idempotency key,
    /// state) of every saved or rejected message; `seqs` the counters to raise to the seqs the batch
    /// was saved with; `messages` how many messages the entries held if `stream` is `to_save` (0 on
    /// `accepted`), to take off its count.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        &self,
        stream: &str,
        dead_stream: &str,
        ids: &[&str],
        messages: usize,
        dead: &[DeadLetter<'_>],
        pubs: &[Publication],
        settled: &[(String, String)],
        seqs: &SeqPlan,
    ) -> redis::RedisResult<()> {
        let mut inv = COMMIT_SCRIPT.on(&self.conn).prepare_invoke();
        inv.key(&self.lease_key).key(stream).key(dead_stream).key(self.keys.seq_counters(self.shard));
        inv.key(self.keys.to_save_messages(self.shard));
        self.add_journal_keys(&mut inv, pubs);
        for (key, _) in settled {
            inv.key(key);
        }
        inv.arg(&self.lease_value).arg(&self.group).arg(self.idempotency_ttl).arg(DEAD_LETTER_MAXLEN).arg(MSG_FIELD);
        inv.arg(ids.len()).arg(dead.len()).arg(pubs.len()).arg(seqs.fields.len()).arg(messages).arg(ids);
        for d in dead {
            inv.arg(d.payload);
        }
        for d in dead {
            inv.arg(d.reason);
        }
        self.add_publications(&mut inv, pubs);
        inv.arg(&seqs.fields).arg(&seqs.tops);
        for (_, state) in settled {
            inv.arg(state);
        }
        inv.invoke_async(&mut self.conn.clone()).await
    }
}
