//! The rules every config must pass before a process starts: ranges, URL shapes, and the rules that
//! tie keys together (the lease against blocking reads, the idempotency window against outages).
//! Each failure names the key to fix (SPEC §5).

use super::{Config, ConfigError, TwoPhaseConfig};

impl Config {
    /// Checks every key: ranges, URL shapes, and the rules that tie keys together (see
    /// docs/OPERATIONS.md, "Configuration"); the error names the key to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError::Key { key: key.into(), message })
        }
        // Batch bounds keep a multi-row statement under MySQL's 65,535 placeholders: 6 per row in the
        // INSERT, up to 6 per row (two chat-list rows of 3) in the conversation upsert.
        let checks: [(&str, u64, u64, u64); 27] = [
            ("cluster.shards", self.cluster.shards.into(), 1, 1024),
            ("gateway.node_id", self.gateway.node_id.into(), 0, u64::from(crate::ids::MAX_NODES) - 1),
            ("gateway.max_frame_bytes", self.gateway.max_frame_bytes as u64, 256, 16 << 20),
            // The content column is TEXT (65,535 bytes): at 4 bytes a character, 16,383 characters fit.
            ("gateway.max_body_chars", self.gateway.max_body_chars as u64, 1, 16_383),
            ("gateway.rate_per_sec", self.gateway.rate_per_sec.into(), 1, 1_000_000),
            ("gateway.rate_burst", self.gateway.rate_burst.into(), 1, 1_000_000),
            ("gateway.idle_timeout_ms", self.gateway.idle_timeout_ms, 1000, 86_400_000),
            ("gateway.auth_timeout_ms", self.gateway.auth_timeout_ms, 100, 600_000),
            ("gateway.outbound_queue", self.gateway.outbound_queue as u64, 1, 1 << 20),
            ("gateway.socket_send_buffer", self.gateway.socket_send_buffer as u64, 0, 64 << 20),
            ("gateway.route_ttl_ms", self.gateway.route_ttl_ms, 1000, 3_600_000),
            ("gateway.max_connections", self.gateway.max_connections as u64, 1, 10_000_000),
            ("gateway.history_max_limit", self.gateway.history_max_limit.into(), 1, 10_000),
            ("gateway.offline_page_size", self.gateway.offline_page_size.into(), 1, 10_000),
            ("gateway.cursor_flush_ms", self.gateway.cursor_flush_ms, 10, 60_000),
            ("gateway.shed_append_ms", self.gateway.shed_append_ms, 0, 60_000),
            ("gateway.shed_wait_ms", self.gateway.shed_wait_ms, 0, 600_000),
            ("runtime.worker_threads", self.runtime.worker_threads as u64, 0, 1024),
            ("mysql.pool_max", self.mysql.pool_max as u64, 1, 1024),
            ("mysql.insert_batch_max", self.mysql.insert_batch_max as u64, 1, 5000),
            ("two_phase.batch_size", self.two_phase.batch_size as u64, 1, 10_000),
            // 0 would be XREADGROUP BLOCK 0: wait forever, never looking at the lease or a shutdown.
            ("two_phase.block_ms", self.two_phase.block_ms, 1, 60_000),
            ("two_phase.max_batch_delay_ms", self.two_phase.max_batch_delay_ms, 0, 10_000),
            ("two_phase.save_batch_delay_ms", self.two_phase.save_batch_delay_ms, 0, 10_000),
            ("two_phase.max_backlog", self.two_phase.max_backlog, 1, 1_000_000_000),
            ("two_phase.lease_ttl_ms", self.two_phase.lease_ttl_ms, 500, 600_000),
            ("idempotency.ttl_secs", self.idempotency.ttl_secs, MIN_IDEMPOTENCY_TTL_SECS, MAX_IDEMPOTENCY_TTL_SECS),
        ];
        for (key, value, min, max) in checks {
            if value < min || value > max {
                let why = match key {
                    "idempotency.ttl_secs" => {
                        ": the window must outlast the time a message can spend unsaved (a database outage), \
                         or a retry gets a second serverMsgId (SPEC §3.9)"
                    }
                    _ => "",
                };
                return bad(key, format!("must be between {min} and {max} (got {value}){why}"));
            }
        }
        let tp = &self.two_phase;
        if tp.block_ms + tp.max_batch_delay_ms > tp.lease_ttl_ms / u64::from(LEASE_SAFETY_MARGIN_DIVISOR) {
            return bad(
                "two_phase.block_ms",
                format!(
                    "two_phase.block_ms + two_phase.max_batch_delay_ms ({} + {} ms) must be at most \
                     two_phase.lease_ttl_ms / {LEASE_SAFETY_MARGIN_DIVISOR} = {} ms (lower block_ms, or raise \
                     lease_ttl_ms): a shard owner stops acting that long before its lease can expire, and a \
                     stream read it started just before must return by then, or it claims entries after a \
                     standby took over",
                    tp.block_ms,
                    tp.max_batch_delay_ms,
                    tp.lease_ttl_ms / u64::from(LEASE_SAFETY_MARGIN_DIVISOR)
                ),
            );
        }
        if let Err(message) = check_redis_url(&self.redis.url) {
            return bad("redis.url", message);
        }
        for url in &self.redis.cluster_urls {
            if let Err(message) = check_redis_url(url).and_then(|()| {
                if url.starts_with("redis://") && url.trim_end_matches('/').matches('/').count() == 2 {
                    Ok(())
                } else {
                    Err(format!("must be redis://host:port with no database (got {url:?}): a cluster has only db 0"))
                }
            }) {
                return bad("redis.cluster_urls", message);
            }
        }
        if let Err(message) = check_mysql_url(&self.mysql.url) {
            return bad("mysql.url", message);
        }
        if self.auth.jwt_secret.len() < MIN_JWT_SECRET_BYTES {
            return bad(
                "auth.jwt_secret",
                format!(
                    "must be at least {MIN_JWT_SECRET_BYTES} bytes (got {}): HS256 needs a key of at least 256 bits \
                     (RFC 7518 §3.2); use e.g. `openssl rand -hex 32`",
                    self.auth.jwt_secret.len()
                ),
            );
        }
        let names = [
            ("redis.key_prefix", &self.redis.key_prefix),
            ("two_phase.accepted_stream", &tp.accepted_stream),
            ("two_phase.to_save_stream", &tp.to_save_stream),
            ("two_phase.dead_letter_stream", &tp.dead_letter_stream),
            ("two_phase.group", &tp.group),
        ];
        for (key, value) in names {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || "{}".contains(c)) {
                return bad(key, format!("must be non-empty without spaces or braces (got {value:?})"));
            }
        }
        // Stream keys are `<prefix>:{s<k>}:<name>`, next to the shard's other keys (keys.rs).
        let streams = [
            ("two_phase.accepted_stream", &tp.accepted_stream),
            ("two_phase.to_save_stream", &tp.to_save_stream),
            ("two_phase.dead_letter_stream", &tp.dead_letter_stream),
        ];
        for (i, (key, name)) in streams.iter().enumerate() {
            if name.contains(':') || RESERVED_SHARD_KEY_NAMES.contains(&name.as_str()) {
                return bad(
                    key,
                    format!(
                        "must not contain ':' nor be one of {RESERVED_SHARD_KEY_NAMES:?} (got {name:?}): it would \
                         share a key with the shard's leases, idempotency entries or journals"
                    ),
                );
            }
            if let Some((other, _)) = streams[..i].iter().find(|(_, earlier)| earlier == name) {
                return bad(key, format!("must differ from {other} (both are {name:?})"));
            }
        }
        for origin in &self.gateway.allowed_origins {
            if let Err(message) = check_origin(origin) {
                return bad("gateway.allowed_origins", message);
            }
        }
        for (key, addr) in [("gateway.listen", &self.gateway.listen), ("worker.listen", &self.worker.listen)] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(key, format!("must be an ip:port socket address (got {addr:?})"));
            }
        }
        if self.gateway.demo_dev_tokens {
            if !self.gateway.demo_page {
                return bad(
                    "gateway.demo_dev_tokens",
                    "needs gateway.demo_page = true (it is the demo's sign-in)".into(),
                );
            }
            let loopback = self.gateway.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
            if !loopback {
                return bad(
                    "gateway.demo_dev_tokens",
                    format!(
                        "hands out a token for any user id to whoever asks, so it is allowed only on a loopback \
                         gateway.listen (got {:?}); never turn it on in production",
                        self.gateway.listen
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash size, 256 bits).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Shortest idempotency window (1 h): it must outlast the time a message can spend unsaved, which
/// includes riding out a database outage (SPEC §3.1, §3.9).
pub const MIN_IDEMPOTENCY_TTL_SECS: u64 = 3600;

/// Longest idempotency window (30 days); every remembered clientMsgId costs Redis memory.
pub const MAX_IDEMPOTENCY_TTL_SECS: u64 = 30 * 86_400;

/// A shard owner stops acting `lease TTL / this` before its lease can expire (clock drift, and the
/// reads it has in flight must return first). shard-worker's lease uses it; `validate` checks
/// `two_phase.block_ms` against it.
pub const LEASE_SAFETY_MARGIN_DIVISOR: u32 = 5;

/// Names under a shard's hash tag that belong to other keys (keys.rs); streams must not take them.
const RESERVED_SHARD_KEY_NAMES: [&str; 4] = ["lease", "fence", "idem", "journal"];

impl TwoPhaseConfig {
    /// The largest `block_ms` the lease allows with this `lease_ttl_ms` and `max_batch_delay_ms`
    /// (for tools that shorten the lease).
    pub fn max_block_ms(&self) -> u64 {
        (self.lease_ttl_ms / u64::from(LEASE_SAFETY_MARGIN_DIVISOR)).saturating_sub(self.max_batch_delay_ms).max(1)
    }
}

fn check_redis_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") && !url.starts_with("unix://") {
        return Err(format!("must start with redis:// or unix:// (got {url:?})"));
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("is not a valid Redis URL: {e}")),
    }
}

fn check_mysql_url(url: &str) -> Result<(), String> {
    let opts = mysql_async::Opts::from_url(url).map_err(|e| format!("is not a valid mysql:// URL: {e}"))?;
    match opts.db_name() {
        Some(db) if !db.is_empty() && !db.contains('`') => {}
        _ => return Err(format!("must name the database, as in mysql://user@host:3306/im (got {url:?})")),
    }
    if opts.client_found_rows() {
        return Err("must not set client_found_rows=true: MySQL would then count a duplicate row as affected, \
                    which hides duplicates from the save"
            .into());
    }
    Ok(())
}

/// A browser `Origin`: `<scheme>://<host>[:port]`, exactly as browsers send it (no path, no slash).
fn check_origin(origin: &str) -> Result<(), String> {
    let well_formed = origin.split_once("://").is_some_and(|(scheme, host)| {
        !scheme.is_empty()
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !host.is_empty()
            && !host.chars().any(|c| c == '/' || c.is_whitespace())
    });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "each origin must be <scheme>://<host>[:port] without a path or trailing slash, as browsers send it \
             (got {origin:?})"
        ))
    }
}
