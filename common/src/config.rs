//! Configuration: one TOML file plus environment overrides, validated once at start.
//!
//! Every key has a default (docs/OPERATIONS.md lists them; `ops config` prints them), so an empty file is a valid
//! config for a local cluster. An environment variable `IM__<SECTION>__<KEY>` overrides `section.key`
//! (for example `IM__TWO_PHASE__ENABLED=false`); its value is read as a TOML literal, or as a string
//! when it is not one. Unknown keys, wrong types and out-of-range values fail with the key's name;
//! the rules themselves are in `config/validate.rs`.

use serde::{Deserialize, Serialize};
use std::path::Path;

mod validate;

pub use validate::{
    LEASE_SAFETY_MARGIN_DIVISOR, MAX_IDEMPOTENCY_TTL_SECS, MIN_IDEMPOTENCY_TTL_SECS, MIN_JWT_SECRET_BYTES,
};

/// A config that could not be loaded; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

/// The whole configuration; each process reads the sections it needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub redis: RedisConfig,
    pub mysql: MysqlConfig,
    pub auth: AuthConfig,
    pub cluster: ClusterConfig,
    pub gateway: GatewayConfig,
    pub two_phase: TwoPhaseConfig,
    pub idempotency: IdempotencyConfig,
    pub worker: WorkerConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` (one server; unused when `cluster_urls` is set).
    pub url: String,
    /// Redis Cluster: some of its masters' `redis://host:port` (the rest are discovered). Empty: one
    /// server at `url`.
    pub cluster_urls: Vec<String>,
    /// Prefix of every key and channel.
    pub key_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user:pass@host:port/database`.
    pub url: String,
    /// Connections per process.
    pub pool_max: usize,
    /// Most rows in one multi-row INSERT.
    pub insert_batch_max: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret, at least 32 bytes. Never logged.
    pub jwt_secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Number of shards N; senders map to `shard_of(uid, N)`.
    pub shards: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address for WebSocket, history API, health and metrics.
    pub listen: String,
    /// Node id (0..1024): distinct per gateway; names the node channel and seeds message ids.
    pub node_id: u16,
    /// Largest accepted WebSocket message, in bytes (larger: close 1009).
    pub max_frame_bytes: usize,
    /// Largest body, in characters.
    pub max_body_chars: usize,
    /// Sustained frames per second per connection before `too_many_requests`.
    pub rate_per_sec: u32,
    /// Burst allowance on top of the rate.
    pub rate_burst: u32,
    /// A connection that sends nothing for this long is closed (4000).
    pub idle_timeout_ms: u64,
    /// Time a `?auth=frame` connection has to send `AUTH`.
    pub auth_timeout_ms: u64,
    /// Outbound frames queued per connection before it is dropped as a slow consumer (4001).
    pub outbound_queue: usize,
    /// Kernel send buffer per WebSocket connection (`SO_SNDBUF`), bytes; default 64 KiB. 0 keeps
    /// the OS default, which auto-tunes up to `net.ipv4.tcp_wmem` (4 MiB on Linux): a client that
    /// stops reading can then hide thousands of frames in the kernel before its outbound queue
    /// fills, and a writer blocked on a full buffer waits for a third of it to drain.
    pub socket_send_buffer: usize,
    /// Route entries expire unless refreshed within this time (refreshed every third of it).
    pub route_ttl_ms: u64,
    /// Most concurrent connections per gateway; more get HTTP 503.
    pub max_connections: usize,
    /// Browser origins allowed to open a WebSocket (`Origin` header); empty allows any. Requests
    /// without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Most messages a history page returns.
    pub history_max_limit: u32,
    /// Messages per page of a sync (per conversation).
    pub offline_page_size: u32,
    /// How often delivered/read positions are written (coalesced) and `RECEIPT`s relayed.
    pub cursor_flush_ms: u64,
    /// Load shedding (two-phase modes): while the append round trip stays at least this long — its
    /// lowest value over each 100 ms — new messages get `server_busy` instead of being appended, so
    /// the capacity goes to the messages already admitted. 0 turns shedding off.
    pub shed_append_ms: u64,
    /// Load shedding (two-phase modes) by wait: while a shard's oldest unsaved message has waited
    /// longer than this, the shard drains, and that wait is not falling, new messages for it get
    /// `server_busy` (until the wait is below half of this). A shard that drains nothing (outage)
    /// or whose oldest wait falls (catching up after a stall or a takeover) is not refused for
    /// this. 0 turns it off.
    pub shed_wait_ms: u64,
    /// Serve the demo chat page at `/demo` (docs/CLIENTS.md): the reference JS client in a page with
    /// the conversation list, the ticks and the shard backlog. Off by default; `ops up` turns it on.
    pub demo_page: bool,
    /// Development only: `POST /demo/token` signs a token for whatever user id the page names, so the
    /// demo signs in without an identity provider. Anyone who reaches the gateway could then act as
    /// any user: it needs `demo_page` and a loopback `listen` address, and stays off in production.
    /// Off by default; `ops up` turns it on.
    pub demo_dev_tokens: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwoPhaseConfig {
    /// Two-level receipts on (`ACK(accepted)` after the stream append); off = baseline.
    pub enabled: bool,
    /// Push before the save (full mode) or after it (accepted-only).
    pub deliver_before_saved: bool,
    /// On a failed append, fall back to the baseline path instead of answering `server_busy`.
    pub fail_open: bool,
    /// Stream names, under `<prefix>:{s<k>}:`.
    pub accepted_stream: String,
    pub to_save_stream: String,
    pub dead_letter_stream: String,
    /// Consumer group of the deliver and save stages.
    pub group: String,
    /// Entries read per XREADGROUP (and rows per save batch).
    pub batch_size: usize,
    /// XREADGROUP BLOCK when the stream is empty. With `max_batch_delay_ms` at most
    /// `lease_ttl_ms / 5`: a read in flight must return before the lease can pass to a standby.
    pub block_ms: u64,
    /// How long a batch waits for more once its first entry arrived (the stage that pushes: full
    /// mode's deliver stage, accepted-only mode's save stage). The time the stage spent on its
    /// previous batch counts towards it, so under load a stage reads again as soon as it is done.
    pub max_batch_delay_ms: u64,
    /// Full mode's save stage: how long a batch waits for more once the first entry arrived (counted
    /// the same way). Saves are not on the path of a push, so they can wait longer and commit larger
    /// batches (the per-batch cost of a commit dominates at light load).
    pub save_batch_delay_ms: u64,
    /// Shard backlog (unsaved entries) past which new messages get `server_busy`.
    pub max_backlog: u64,
    /// Shard lease time-to-live; a standby takes over this long after the owner dies.
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a clientMsgId is remembered in Redis (the DB unique key covers the rest); at least
    /// an hour, so it outlasts the time a message can spend unsaved.
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Address for the worker's health and metrics endpoint.
    pub listen: String,
}

/// The async runtime of each process (gateway, shard worker).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads running the process's tasks. 1 (the default): everything on one thread, so no task
    /// is ever handed to another thread — 12–20 % less CPU per message where several processes
    /// share the cores (docs/BENCHMARKS.md); scale by running more processes. 0 = one per core.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig { url: "redis://127.0.0.1:6379".into(), cluster_urls: Vec::new(), key_prefix: "im".into() }
    }
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig { url: "mysql://root@127.0.0.1:3306/im".into(), pool_max: 8, insert_batch_max: 500 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { jwt_secret: "change-me-local-dev-secret-0123456789abcdef".into() }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { shards: 4 }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            node_id: 1,
            max_frame_bytes: 64 * 1024,
            max_body_chars: 4096,
            rate_per_sec: 50,
            rate_burst: 100,
            idle_timeout_ms: 120_000,
            auth_timeout_ms: 10_000,
            outbound_queue: 1024,
            socket_send_buffer: 64 * 1024,
            route_ttl_ms: 30_000,
            max_connections: 100_000,
            allowed_origins: Vec::new(),
            history_max_limit: 200,
            offline_page_size: 200,
            cursor_flush_ms: 100,
            shed_append_ms: 50,
            shed_wait_ms: 500,
            demo_page: false,
            demo_dev_tokens: false,
        }
    }
}

impl Default for TwoPhaseConfig {
    fn default() -> Self {
        TwoPhaseConfig {
            enabled: true,
            deliver_before_saved: true,
            fail_open: true,
            accepted_stream: "accepted".into(),
            to_save_stream: "to_save".into(),
            dead_letter_stream: "dead".into(),
            group: "workers".into(),
            batch_size: 500,
            block_ms: 500,
            max_batch_delay_ms: 5,
            save_batch_delay_ms: 30,
            max_backlog: 200_000,
            lease_ttl_ms: 5000,
        }
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { ttl_secs: 86_400 }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { listen: "127.0.0.1:9100".into() }
    }
}

/// The delivery mode a deployment runs in (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Baseline,
    AcceptedOnly,
    Full,
}

impl Mode {
    /// `baseline`, `accepted-only` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::AcceptedOnly => "accepted-only",
            Mode::Full => "full",
        }
    }

    /// Parses `baseline`, `accepted-only` or `full`.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::Baseline, Mode::AcceptedOnly, Mode::Full].into_iter().find(|m| m.as_str() == s)
    }
}

impl Config {
    /// Loads `path` (or only defaults when `None`), applies `IM__*` environment overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => {
                let name = p.display().to_string();
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
                (text, name)
            }
            None => (String::new(), "<defaults>".to_owned()),
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { path: name, message: e.message().to_owned() })?;
        for (var, value) in env {
            if let Some(path) = var.strip_prefix("IM__") {
                apply_override(&mut table, path, &value)?;
            }
        }
        Self::from_table(table)
    }

    /// Parses a config from TOML text (no environment), validating it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: "<text>".into(),
            message: e.message().to_owned(),
        })?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            ConfigError::Key { key, message }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The mode selected by the `two_phase` switches.
    pub fn mode(&self) -> Mode {
        match (self.two_phase.enabled, self.two_phase.deliver_before_saved) {
            (false, _) => Mode::Baseline,
            (true, false) => Mode::AcceptedOnly,
            (true, true) => Mode::Full,
        }
    }

    /// Sets the `two_phase` switches for `mode`.
    pub fn set_mode(&mut self, mode: Mode) {
        self.two_phase.enabled = mode != Mode::Baseline;
        self.two_phase.deliver_before_saved = mode == Mode::Full;
    }
}

/// Sets `section.key` (given as `SECTION__KEY`) in `table` from an environment value. An error in the
/// variable's name names the variable (`IM__GATEWAY____LISTEN`), which is what the operator has to find.
fn apply_override(table: &mut toml::Table, path: &str, raw: &str) -> Result<(), ConfigError> {
    let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    // `IM__`, `IM__GATEWAY__` or `IM__GATEWAY____LISTEN` would set a key named "" that a key error
    // could only call `` or `gateway.`.
    if parts.iter().any(String::is_empty) {
        return Err(ConfigError::Key {
            key: format!("IM__{path}"),
            message: "environment variable has an empty section or key name".into(),
        });
    }
    let key = parts.join(".");
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let (last, sections) =
        parts.split_last().ok_or_else(|| ConfigError::Key { key: key.clone(), message: "empty".into() })?;
    let mut cursor = table;
    for section in sections {
        let entry = cursor.entry(section.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        cursor = entry.as_table_mut().ok_or_else(|| ConfigError::Key {
            key: format!("IM__{path}"),
            message: format!("`{section}` in `{key}` is not a section"),
        })?;
    }
    cursor.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
