//! Appends of all connections, batched per shard: one script call appends every message that
//! arrived while the previous call was out, so Redis runs one script per batch instead of one per
//! message, and a lone message waits for nothing.
//!
//! Per shard one call is out at a time, and the calls leave in the order their messages came: a
//! connection waits for its message's answer before it reads the next frame, so each connection's
//! messages enter the stream in order.

use std::sync::{Arc, LazyLock};

use im_common::connections::RedisConn;
use im_common::keys::Keys;
use im_common::record::MSG_FIELD;
use redis::{RedisResult, Script, Value};
use tokio::sync::{mpsc, oneshot};

/// KEYS: accepted stream, then one idempotency key per message. ARGV: field name, then state to
/// store and payload per message; an empty state only looks the key up (a refused message: its
/// earlier attempt's receipt, if any, is its answer). For each message: its earlier state when its
/// key exists (nothing appended), else false (nil in the reply); or `refused:<error>` when Redis
/// refused its GET or XADD (the key holds another type, Redis is out of memory, ...): nothing was
/// appended for it, and the other messages of the batch go on.
///
/// A key gets no TTL here: the window of a message must last at least as long as the message is
/// unsaved (SPEC §3.9), however long MySQL is away. The save stage's commit sets the final state
/// with the `idempotency.ttl_secs` expiry. XADD comes first: if it fails nothing is claimed.
const APPEND_SCRIPT: &str = r"
local out = {}
for i = 2, #KEYS do
  local prev = redis.pcall('GET', KEYS[i])
  if type(prev) == 'table' and prev.err then
    out[i - 1] = 'refused:' .. prev.err
  elseif prev then
    out[i - 1] = prev
  elseif ARGV[2 * i - 2] == '' then
    out[i - 1] = false
  else
    local added = redis.pcall('XADD', KEYS[1], '*', ARGV[1], ARGV[2 * i - 1])
    if type(added) == 'table' and added.err then
      out[i - 1] = 'refused:' .. added.err
    else
      redis.call('SET', KEYS[i], ARGV[2 * i - 2])
      out[i - 1] = false
    end
  end
end
return out
";

/// The prefix of a message's answer when Redis refused it inside the script.
const REFUSED: &str = "refused:";

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_SCRIPT));

/// Most messages in one script call.
const MAX_BATCH: usize = 256;

/// One message to append: its idempotency key, the state to claim it with, its stream payload.
/// An empty state only looks the key up.
pub struct Append {
    pub key: String,
    pub state: String,
    pub payload: Vec<u8>,
}

impl Append {
    /// A lookup of `key` only, riding in the shard's next batch instead of a round trip of its own.
    pub fn lookup(key: &str) -> Self {
        Append { key: key.to_owned(), state: String::new(), payload: Vec::new() }
    }
}

/// What the append script did with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Appended (a lookup: no earlier attempt).
    New,
    /// Its key exists: the earlier attempt's state. Nothing appended.
    Earlier(String),
    /// Redis ran the script and refused this message's commands, with this error. Nothing appended.
    Refused(String),
}

impl Appended {
    fn from_reply(state: Value) -> RedisResult<Self> {
        Ok(match redis::from_redis_value::<Option<String>>(state)? {
            None => Appended::New,
            Some(s) => match s.strip_prefix(REFUSED) {
                Some(error) => Appended::Refused(error.to_owned()),
                None => Appended::Earlier(s),
            },
        })
    }
}

struct Job {
    append: Append,
    answer: oneshot::Sender<RedisResult<Appended>>,
}

/// The per-shard append queues.
#[derive(Clone)]
pub struct AppendBatcher {
    shards: Arc<Vec<mpsc::UnboundedSender<Job>>>,
}

impl AppendBatcher {
    /// Starts one batching task per shard.
    pub fn start(conn: RedisConn, keys: &Keys, shards: u16) -> Self {
        let senders = (0..shards)
            .map(|shard| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(conn.clone(), keys.accepted_stream(shard), rx));
                tx
            })
            .collect();
        AppendBatcher { shards: Arc::new(senders) }
    }

    /// Appends one message to `shard`'s stream unless its key exists. An `Err` is the call's: its
    /// outcome is unknown (it may have run).
    pub async fn append(&self, shard: u16, append: Append) -> RedisResult<Appended> {
        let (answer, answered) = oneshot::channel();
        let gone = || redis::RedisError::from((redis::ErrorKind::Io, "append task ended"));
        self.shards[usize::from(shard)].send(Job { append, answer }).map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// Takes what is queued, appends it in one call, answers each message; again.
async fn run(mut conn: RedisConn, stream: String, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let mut call = SCRIPT.prepare_invoke();
        call.key(&stream).arg(MSG_FIELD);
        for job in &jobs {
            call.key(&job.append.key).arg(&job.append.state).arg(&job.append.payload);
        }
        match call.invoke_async::<Vec<Value>>(&mut conn).await {
            Ok(states) if states.len() == jobs.len() => {
                for (job, state) in jobs.drain(..).zip(states) {
                    let _ = job.answer.send(Appended::from_reply(state));
                }
            }
            Ok(states) => {
                let e = redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "append script answered for a different number of messages",
                    format!("{} answers for {} messages", states.len(), jobs.len()),
                ));
                jobs.drain(..).for_each(|job| drop(job.answer.send(Err(e.clone()))));
            }
            Err(e) => jobs.drain(..).for_each(|job| drop(job.answer.send(Err(e.clone())))),
        }
    }
}
