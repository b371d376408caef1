//! The per-direction seq counters in Redis (SPEC §3.10), as every writer of them sees them.
//!
//! Each shard has one hash (`Keys::seq_counters`): field `<from>:<to>` → the last seq handed out in
//! that direction. The shard's owner numbers messages from it (`shard-worker`'s `sequences`); the
//! baseline path — baseline mode, and fail-open while Redis is away — numbers in MySQL instead and
//! then raises these counters to what it used ([`SeqFloor`]), so the owner never hands a seq out
//! twice. Raising never lowers a counter.

use crate::keys::{seq_field, Keys};
use crate::shard::shard_of;

/// Lua: `seqs_match(key, fields, bases)` — whether every counter still holds what a batch was
/// numbered from; `set_seqs(key, fields, tops)` — sets them (after a match); `raise_seqs(key,
/// fields, tops)` — moves each counter up to its highest top, never down (a field may come twice).
/// Each reads with one `HMGET` and writes with one `HSET` per 500 fields (`CALL_CHUNK`, also what
/// the scripts that include these helpers pass to one command): a command called from Lua costs
/// more than the work of a counter.
pub const SEQ_LUA: &str = r"
local CALL_CHUNK = 500
local function seqs_match(key, fields, bases)
  for first = 1, #fields, CALL_CHUNK do
    local last = math.min(first + CALL_CHUNK - 1, #fields)
    local now = redis.call('HMGET', key, unpack(fields, first, last))
    for k = first, last do
      if tonumber(now[k - first + 1] or '0') ~= tonumber(bases[k]) then return false end
    end
  end
  return true
end
local function set_seqs(key, fields, tops)
  for first = 1, #fields, CALL_CHUNK do
    local args = {}
    for k = first, math.min(first + CALL_CHUNK - 1, #fields) do
      args[#args + 1] = fields[k]
      args[#args + 1] = tops[k]
    end
    redis.call('HSET', key, unpack(args))
  end
end
local function raise_seqs(key, fields, tops)
  -- the index of each field's highest top, fields in first-seen order
  local best, order = {}, {}
  for k = 1, #fields do
    local b = best[fields[k]]
    if b == nil then
      order[#order + 1] = fields[k]
      best[fields[k]] = k
    elseif tonumber(tops[k]) > tonumber(tops[b]) then
      best[fields[k]] = k
    end
  end
  for first = 1, #order, CALL_CHUNK do
    local last = math.min(first + CALL_CHUNK - 1, #order)
    local now = redis.call('HMGET', key, unpack(order, first, last))
    local args = {}
    for k = first, last do
      local top = tops[best[order[k]]]
      if tonumber(now[k - first + 1] or '0') < tonumber(top) then
        args[#args + 1] = order[k]
        args[#args + 1] = top
      end
    end
    if #args > 0 then redis.call('HSET', key, unpack(args)) end
  end
end
";

/// Lua: KEYS[1] = counters; ARGV = n fields, then their n tops.
pub fn raise_script() -> String {
    format!(
        "{SEQ_LUA}\nlocal n = #ARGV / 2\nlocal f, t = {{}}, {{}}\n\
         for k = 1, n do f[k] = ARGV[k]; t[k] = ARGV[n + k] end\nraise_seqs(KEYS[1], f, t)\nreturn 0"
    )
}

/// A seq the baseline path gave a saved message: its shard's counter must be at least this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqFloor {
    /// The counters hash of the sender's shard.
    pub key: String,
    pub field: String,
    pub seq: u64,
}

impl SeqFloor {
    /// The floor for message `seq` from `from` to `to`.
    pub fn of(keys: &Keys, shards: u16, from: u64, to: u64, seq: u64) -> Self {
        SeqFloor { key: keys.seq_counters(shard_of(from, shards)), field: seq_field(from, to), seq }
    }
}

/// Adds the commands that raise the counters to `floors` (one EVAL per hash) to `pipe`.
pub fn add_floors(pipe: &mut redis::Pipeline, floors: &[SeqFloor]) {
    let mut by_key: std::collections::BTreeMap<&str, Vec<&SeqFloor>> = std::collections::BTreeMap::new();
    for f in floors {
        by_key.entry(&f.key).or_default().push(f);
    }
    let script = raise_script();
    for (key, floors) in by_key {
        let cmd = pipe.cmd("EVAL").arg(&script).arg(1).arg(key);
        for f in &floors {
            cmd.arg(&f.field);
        }
        for f in &floors {
            cmd.arg(f.seq);
        }
        cmd.ignore();
    }
}
