//! Redis connections: the one place that decides how a process talks to Redis.
//!
//! Every process holds long-lived multiplexed connections ([`ConnectionManager`]: pipelines by itself,
//! reconnects after a failure) instead of checking connections out of a pool per command, which costs
//! an extra round trip each time (see shared/LIMITS.md). Blocking readers get connections of their
//! own, because a blocked command holds up every command pipelined behind it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long connecting may take before the call fails (fail-open needs a quick "no").
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a reply may take (plus the block time, for blocking reads).
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(2000);
/// Reconnect attempts inside one call, and the most one waits.
const RETRIES: usize = 1;
const RETRY_MAX_DELAY: Duration = Duration::from_millis(200);

/// Opens a managed connection with short timeouts, so a dead Redis fails calls fast (fail-open needs a
/// quick "no") instead of hanging them.
pub async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    connect_for_blocking(url, Duration::ZERO).await
}

/// A dedicated connection for blocking reads (`XREADGROUP BLOCK`): a blocked command holds up every
/// command pipelined behind it, so blocking readers never share the connection other work uses. Its
/// response timeout allows for the `block` time.
pub async fn connect_for_blocking(url: &str, block: Duration) -> redis::RedisResult<ConnectionManager> {
    let config = manager_config().set_response_timeout(Some(RESPONSE_TIMEOUT + block));
    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await
}

/// As [`connect`], but returns at once and connects on first use (for processes that must start while
/// Redis is down, like a fail-open gateway).
pub fn connect_lazy(url: &str) -> redis::RedisResult<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, manager_config())
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RETRIES)
        .set_max_delay(RETRY_MAX_DELAY)
}
