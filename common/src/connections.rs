//! Redis connections: the one place that decides how a process talks to Redis — one server
//! (`redis.url`) or a Redis Cluster (`redis.cluster_urls`).
//!
//! Every process holds long-lived multiplexed connections ([`RedisConn`]: pipelines by itself,
//! reconnects after a failure) instead of checking connections out of a pool per command, which costs
//! an extra round trip each time (see shared/LIMITS.md). Blocking readers get connections of their
//! own, because a blocked command holds up every command pipelined behind it.
//!
//! On a cluster, [`RedisConn`] is a `redis::cluster_async::ClusterConnection` (one multiplexed
//! connection per master, MOVED/ASK followed). redis-rs sends a pipeline to one slot only, so
//! [`RedisConn`] splits a pipeline whose commands name keys in several slots: one sub-pipeline per
//! slot, in the pipeline's order within each slot, all sent at once, the replies put back in order.
//! A pipeline is therefore ordered per slot, not across slots — no caller depends on more (each
//! pipeline's commands on different keys are independent; everything that must happen together is
//! one script on one slot). Commands with several keys in several slots (`MGET`) are fanned out by
//! redis-rs itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Arg, Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisConfig;
use crate::ids::now_ms;

/// How long connecting may take before the call fails (fail-open needs a quick "no").
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a reply may take (plus the block time, for blocking reads).
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(2000);
/// Reconnect attempts inside one call, and the most one waits.
const RETRIES: usize = 1;
const RETRY_MAX_DELAY: Duration = Duration::from_millis(200);
/// On a cluster: redirections and reconnects followed inside one call (a slot migration needs a
/// MOVED and an ASK; a failover a few tries), and the pause between tries.
const CLUSTER_RETRIES: u32 = 5;
const CLUSTER_RETRY_WAIT_MS: u64 = 50;

/// A connection to Redis: one server or a cluster. Clones share the connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(LazyCluster),
}

/// A cluster connection made on first use (a fail-open gateway starts while the cluster is down),
/// and made again when it is stuck. redis-rs 1.8's recovery, once every node restarted, can leave
/// a connection broken for good, in ways seen in the Redis Cluster drill: it retries a slot refresh
/// over an empty connection map ("No connections found" on every call, a busy loop inside the
/// client; a worker never took its shard back); it keeps connections to some nodes only, so calls
/// to the others say "No connections found" while the rest go through (a gateway could not
/// subscribe again for good); or a command fanned out over several slots (`MGET`) comes back with
/// fewer replies than it sent ("Mismatch in the number of multi-slot results" on every call; a
/// worker's stages retried one batch for good). Such a connection is dropped — at once for a short
/// answer, which is never a real one; once "no connections found" has kept coming for
/// [`STUCK_CLUSTER_REPLACED_AFTER`], whatever went through meanwhile — and the next call connects
/// afresh from the configured nodes.
#[derive(Clone)]
pub struct LazyCluster {
    client: Arc<ClusterClient>,
    conn: Arc<RwLock<Option<ClusterConnection>>>,
    /// One connect at a time.
    connecting: Arc<tokio::sync::Mutex<()>>,
    stuck: Arc<StuckRun>,
}

/// The current run of "no connections found": each one no further than [`STUCK_RUN_GAP`] from the
/// one before, whatever went through in between.
#[derive(Default)]
struct StuckRun {
    /// Unix ms of the run's first and latest; 0: no run.
    since_ms: AtomicU64,
    last_ms: AtomicU64,
}

impl StuckRun {
    /// Notes one at `now` (Unix ms); true once the run has lasted [`STUCK_CLUSTER_REPLACED_AFTER`]
    /// (and a new run starts with the next).
    fn note(&self, now: u64) -> bool {
        let last = self.last_ms.swap(now, Ordering::Relaxed);
        let since = self.since_ms.load(Ordering::Relaxed);
        if since == 0 || now.saturating_sub(last) > STUCK_RUN_GAP.as_millis() as u64 {
            self.since_ms.store(now, Ordering::Relaxed);
            return false;
        }
        let done = now.saturating_sub(since) >= STUCK_CLUSTER_REPLACED_AFTER.as_millis() as u64;
        if done {
            self.clear();
        }
        done
    }

    /// Ends the run: the next one starts a new one.
    fn clear(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }
}

/// How long "no connections found" may keep coming before the connection is replaced (the client's
/// own recovery, when it works, takes well under a second).
pub const STUCK_CLUSTER_REPLACED_AFTER: Duration = Duration::from_secs(3);

/// "No connections found" this far apart still belong to one run: longer than any caller's pause
/// between retries (`Backoff`: at most 5 s).
const STUCK_RUN_GAP: Duration = Duration::from_secs(10);

impl LazyCluster {
    fn new(client: ClusterClient) -> Self {
        LazyCluster {
            client: Arc::new(client),
            conn: Arc::default(),
            connecting: Arc::default(),
            stuck: Arc::default(),
        }
    }

    fn current(&self) -> Option<ClusterConnection> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn get(&self) -> RedisResult<ClusterConnection> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let _one = self.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let conn = self.client.get_async_connection().await?;
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Notes how a call went; replaces the connection once it is stuck ([`LazyCluster`]).
    fn observe<T>(&self, result: &RedisResult<T>) {
        match result {
            Err(e) if came_back_short(e) => self.replace(e),
            Err(e) if e.kind() == ErrorKind::ClusterConnectionNotFound && self.stuck.note(now_ms()) => self.replace(e),
            // Successes do not end a run: with some nodes' connections lost, calls to the others
            // still go through.
            _ => {}
        }
    }

    /// Drops the connection; the next call connects afresh from the configured nodes.
    fn replace(&self, error: &redis::RedisError) {
        self.stuck.clear();
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::warn!(%error, "the Redis Cluster connection is stuck; connecting afresh");
        metrics::counter!("im_redis_cluster_reconnects_total").increment(1);
    }
}

/// A command fanned out over several slots (`MGET`) answered by fewer of them than it was sent to:
/// the client lost node connections it does not know it lost ([`LazyCluster`]).
fn came_back_short(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Client && e.to_string().contains("multi-slot")
}

impl RedisConn {
    /// Whether this talks to a Redis Cluster (sharded pub/sub, per-slot pipelines).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

/// Opens a connection with short timeouts, so a dead Redis fails calls fast (fail-open needs a quick
/// "no") instead of hanging them.
pub async fn connect(cfg: &RedisConfig) -> RedisResult<RedisConn> {
    connect_for_blocking(cfg, Duration::ZERO).await
}

/// A dedicated connection for blocking reads (`XREAD BLOCK`): a blocked command holds up every
/// command pipelined behind it, so blocking readers never share the connection other work uses. Its
/// response timeout allows for the `block` time.
pub async fn connect_for_blocking(cfg: &RedisConfig, block: Duration) -> RedisResult<RedisConn> {
    let response = RESPONSE_TIMEOUT + block;
    if cfg.cluster_urls.is_empty() {
        let config = manager_config().set_response_timeout(Some(response));
        return Ok(RedisConn::Single(
            ConnectionManager::new_with_config(redis::Client::open(cfg.url.as_str())?, config).await?,
        ));
    }
    let lazy = LazyCluster::new(cluster_client(cfg, response)?);
    lazy.get().await?;
    Ok(RedisConn::Cluster(lazy))
}

/// As [`connect`], but returns at once and connects on first use (for processes that must start while
/// Redis is down, like a fail-open gateway).
pub fn connect_lazy(cfg: &RedisConfig) -> RedisResult<RedisConn> {
    if cfg.cluster_urls.is_empty() {
        let client = redis::Client::open(cfg.url.as_str())?;
        return Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(client, manager_config())?));
    }
    Ok(RedisConn::Cluster(LazyCluster::new(cluster_client(cfg, RESPONSE_TIMEOUT)?)))
}

/// A cluster client with the same short timeouts as a single server's connections.
pub fn cluster_builder(cfg: &RedisConfig) -> ClusterClientBuilder {
    ClusterClientBuilder::new(cfg.cluster_urls.iter().map(String::as_str))
        .connection_timeout(CONNECT_TIMEOUT)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_RETRY_WAIT_MS)
        .max_retry_wait(CLUSTER_RETRY_WAIT_MS * 4)
}

fn cluster_client(cfg: &RedisConfig, response: Duration) -> RedisResult<ClusterClient> {
    cluster_builder(cfg).response_timeout(response).build()
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RETRIES)
        .set_max_delay(RETRY_MAX_DELAY)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(lazy) => Box::pin(async move {
                let mut conn = lazy.get().await?;
                let result = match scan_route(cmd) {
                    // SCAN goes to the node of the slot its MATCH pattern's hash tag names.
                    Some(route) => conn.route_command(cmd.clone(), single(route)).await,
                    None => conn.req_packed_command(cmd).await,
                };
                lazy.observe(&result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(lazy) => Box::pin(async move {
                let mut conn = lazy.get().await?;
                let result = if pipeline.is_transaction() {
                    conn.req_packed_commands(pipeline, offset, count).await
                } else {
                    per_slot(conn, pipeline).await
                };
                lazy.observe(&result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

fn single(route: Route) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route))
}

/// Runs a non-atomic pipeline on a cluster: one sub-pipeline per slot (commands in their order), a
/// command without a single key on its own, all at once; the replies in the pipeline's order.
async fn per_slot(conn: ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    // (route, indexes into cmds); `None`: a command sent by itself.
    let mut groups: Vec<(Option<Route>, Vec<usize>)> = Vec::new();
    let mut by_route: HashMap<Route, usize> = HashMap::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match routing_key(cmd) {
            Some(key) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let g = *by_route.entry(route).or_insert_with(|| {
                    groups.push((Some(route), Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(i);
            }
            None => groups.push((None, vec![i])),
        }
    }
    if groups.len() == 1 && groups[0].0.is_some() {
        let mut conn = conn;
        return conn.req_packed_commands(pipeline, 0, cmds.len()).await;
    }
    let sends = groups.iter().map(|(route, idx)| {
        let mut conn = conn.clone();
        let cmds = &cmds;
        async move {
            if route.is_none() {
                return Ok(vec![conn.req_packed_command(cmds[idx[0]]).await?]);
            }
            let mut sub = redis::pipe();
            for &i in idx {
                sub.add_command(cmds[i].clone());
            }
            conn.req_packed_commands(&sub, 0, idx.len()).await
        }
    });
    let replies = try_join_all(sends).await?;
    let mut out = vec![Value::Nil; cmds.len()];
    for ((_, idx), values) in groups.iter().zip(replies) {
        for (&i, v) in idx.iter().zip(values) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// The key a command is routed by, when it has exactly one slot to go to: the first key (the
/// first after `numkeys` for scripts, after `STREAMS` for stream reads); `None` for commands
/// without keys or with several (`MGET a b`: redis-rs splits those itself).
fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let at = match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let numkeys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if numkeys == 0 {
                return None;
            }
            3
        }
        b"XREAD" | b"XREADGROUP" => args.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS"))? + 1,
        b"MGET" | b"DEL" | b"EXISTS" | b"UNLINK" | b"TOUCH" if args.len() > 2 => return None,
        b"TIME" | b"PING" | b"INFO" | b"SCRIPT" | b"CLUSTER" | b"SCAN" | b"DBSIZE" | b"FLUSHALL" => return None,
        _ => 1,
    };
    args.get(at).map(|k| k.to_vec())
}

/// `SCAN ... MATCH <pattern>` whose pattern names a hash tag: the route of that tag's slot.
fn scan_route(cmd: &Cmd) -> Option<Route> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b),
        _ => None,
    });
    if !args.next()?.eq_ignore_ascii_case(b"SCAN") {
        return None;
    }
    let mut args = args.skip_while(|a| !a.eq_ignore_ascii_case(b"MATCH"));
    args.next()?;
    let pattern = args.next()?;
    let open = pattern.iter().position(|&b| b == b'{')?;
    let close = pattern[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| Route::with_key(pattern, SlotAddr::Master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_route_by_their_one_key() {
        let key = |c: &Cmd| routing_key(c).map(|k| String::from_utf8(k).unwrap());
        assert_eq!(key(redis::cmd("GET").arg("a")).as_deref(), Some("a"));
        assert_eq!(key(redis::cmd("EVALSHA").arg("sha").arg(2).arg("k1").arg("k2")).as_deref(), Some("k1"));
        assert_eq!(key(redis::cmd("EVAL").arg("return 1").arg(0)), None);
        assert_eq!(key(redis::cmd("XREAD").arg("BLOCK").arg(5).arg("STREAMS").arg("s").arg("$")).as_deref(), Some("s"));
        assert_eq!(key(redis::cmd("MGET").arg("a").arg("b")), None, "several keys: redis-rs splits it");
        assert_eq!(key(redis::cmd("MGET").arg("a")).as_deref(), Some("a"));
        assert_eq!(key(&redis::cmd("TIME")), None);
    }

    /// A short answer to a command fanned out over several slots is what redis-rs 1.8 gives, on
    /// every such call, once its recovery lost node connections; no other error means that.
    #[test]
    fn only_a_multi_slot_answer_that_came_back_short_replaces_the_connection_at_once() {
        let client =
            |what: &'static str, detail: &str| redis::RedisError::from((ErrorKind::Client, what, detail.into()));
        let mismatch = "Mismatch in the number of multi-slot results compared to the expected result count.";
        assert!(came_back_short(&client(mismatch, "Expected: 2, Found: 4")));
        let shard = "Mismatch in the number of results returned by a shard in a multi-slot command.";
        assert!(came_back_short(&client(shard, "Expected: 3, Found: 1")));
        assert!(!came_back_short(&redis::RedisError::from((
            ErrorKind::ClusterConnectionNotFound,
            "No connections found"
        ))));
        assert!(!came_back_short(&client("Response was of incompatible type", "nil")));
        assert!(!came_back_short(&redis::RedisError::from((ErrorKind::Io, "Connection refused"))));
    }

    /// With some nodes' connections lost, calls to the others go through between the "no
    /// connections found": those must not hide that the connection is stuck.
    #[test]
    fn no_connections_found_that_keeps_coming_replaces_the_connection_whatever_went_through_between() {
        let run = StuckRun::default();
        assert!(!run.note(1_000), "a first one starts a run");
        assert!(!run.note(3_000), "2 s into the run");
        assert!(run.note(4_000), "3 s of them, calls in between or not: replaced");
        assert!(!run.note(4_500), "a new connection starts a new run");
        assert!(!run.note(20_000), "more than the gap since the last one: a new run");
        assert!(!run.note(22_000));
        assert!(run.note(23_000));
    }

    #[test]
    fn a_scan_of_one_hash_tag_goes_to_that_tags_slot() {
        let scan = |pattern: &str| scan_route(redis::cmd("SCAN").arg(0).arg("MATCH").arg(pattern).arg("COUNT").arg(10));
        assert_eq!(scan("im:{s3}:idem:*"), Some(Route::with_key("s3", SlotAddr::Master)));
        assert_eq!(scan("im:*"), None);
        assert_eq!(scan_route(redis::cmd("GET").arg("x")), None);
    }
}
