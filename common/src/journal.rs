//! The node-channel journal: what makes pub/sub pushes replayable.
//!
//! Pub/sub keeps no copy, so a gateway that is between subscriptions (Redis restarted, the subscriber
//! connection dropped) or whose connection died with messages in flight would miss them. Every
//! publisher therefore publishes with `deliver` ([`PublishingScript`]): the batch also goes to a short journal (a
//! stream per publisher key and node), and the published message carries its journal position, so a
//! gateway that resubscribes replays exactly what it has not seen, in order, before anything live.

use std::sync::LazyLock;

use crate::connections::RedisConn;
use redis::streams::StreamRangeReply;
use redis::Script;

/// How long a node's journal keeps what was published to it. A gateway that was away longer cannot
/// replay its gap and asks its clients to reconnect instead (offline resend covers them).
pub const JOURNAL_RETENTION_MS: u64 = 30_000;

/// Lua: `deliver(channel, message, journal)` appends the message to the node's journal (a stream
/// trimmed to [`JOURNAL_RETENTION_MS`], expiring when nothing is written to it), then publishes it
/// prefixed with where it is journaled: `<journal key>\n<entry id>\n<message>`. `publish` is the
/// command: `PUBLISH` on one server, `SPUBLISH` (sharded pub/sub: the channel lives in the
/// journal's slot) on a cluster.
fn journal_lua(publish: &str) -> String {
    format!(
        r"
local function deliver(channel, message, journal)
  local now = redis.call('TIME')
  local cutoff = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - {JOURNAL_RETENTION_MS})
  local id = redis.call('XADD', journal, 'MINID', '~', cutoff, '*', 'm', message)
  redis.call('PEXPIRE', journal, {})
  redis.call('{publish}', channel, journal .. '\n' .. id .. '\n' .. message)
end
",
        2 * JOURNAL_RETENTION_MS
    )
}

/// A script that publishes through [`journal_lua`]'s `deliver`, built for both kinds of Redis.
pub struct PublishingScript([(String, Script); 2]);

impl PublishingScript {
    /// `body` follows the `deliver` function.
    pub fn new(body: &str) -> Self {
        PublishingScript(["PUBLISH", "SPUBLISH"].map(|cmd| {
            let source = format!("{}{body}", journal_lua(cmd));
            let script = Script::new(&source);
            (source, script)
        }))
    }

    /// The variant for `conn`.
    pub fn on(&self, conn: &RedisConn) -> &Script {
        &self.0[usize::from(conn.is_cluster())].1
    }

    /// The variant's source, for `EVAL` in a pipeline (which cannot load a missing script).
    pub fn source(&self, conn: &RedisConn) -> &str {
        &self.0[usize::from(conn.is_cluster())].0
    }
}

/// KEYS: journal. ARGV: channel, message.
pub(crate) static PUBLISH_SCRIPT: LazyLock<PublishingScript> =
    LazyLock::new(|| PublishingScript::new("deliver(ARGV[1], ARGV[2], KEYS[1])"));

/// A stream entry id, `<ms>-<seq>`, comparable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId(pub u64, pub u64);

impl EntryId {
    pub fn parse(s: &str) -> Option<EntryId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Splits a node-channel message into (journal key, entry id, encoded [`PushBatch`]).
pub fn split_journaled(msg: &[u8]) -> Option<(&str, EntryId, &[u8])> {
    let mut parts = msg.splitn(3, |&b| b == b'\n');
    let journal = std::str::from_utf8(parts.next()?).ok()?;
    let id = EntryId::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    Some((journal, id, parts.next()?))
}

/// The newest entry id of each journal (`EntryId::default()` for an empty one), in one pipeline.
pub async fn journal_tails(conn: &RedisConn, journals: &[String]) -> redis::RedisResult<Vec<EntryId>> {
    let mut pipe = redis::pipe();
    for key in journals {
        pipe.cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1);
    }
    let tails: Vec<StreamRangeReply> = pipe.query_async(&mut conn.clone()).await?;
    Ok(tails.iter().map(|r| r.ids.first().and_then(|e| EntryId::parse(&e.id)).unwrap_or_default()).collect())
}

/// Entries read per XRANGE while replaying a journal.
const REPLAY_PAGE: usize = 1000;

/// The entries of `journal` after `after`, oldest first: (id, encoded [`PushBatch`]).
pub async fn read_journal(
    conn: &RedisConn,
    journal: &str,
    mut after: EntryId,
) -> redis::RedisResult<Vec<(EntryId, Vec<u8>)>> {
    let mut out = Vec::new();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(journal)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(REPLAY_PAGE)
            .query_async(&mut conn.clone())
            .await?;
        let n = page.ids.len();
        for entry in page.ids {
            let Some(id) = EntryId::parse(&entry.id) else { continue };
            if let Some(redis::Value::BulkString(bytes)) = entry.map.get("m") {
                out.push((id, bytes.clone()));
            }
            after = id;
        }
        if n < REPLAY_PAGE {
            return Ok(out);
        }
    }
}
