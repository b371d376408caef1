//! Shared by every im process: the wire protocol, configuration, shard hashing, message ids, the Redis
//! key layout, the records stored in Redis, the SQL, routing of pushes, and process plumbing.

pub mod auth;
pub mod backoff;
pub mod config;
pub mod connections;
pub mod health;
pub mod idempotency;
pub mod ids;
pub mod journal;
pub mod keys;
pub mod node_lease;
pub mod protocol;
pub mod record;
pub mod route_cache;
pub mod router;
pub mod runtime;
pub mod seq_counters;
pub mod shard;
pub mod store;
pub mod subscription;
pub mod telemetry;

/// Why a process could not start: a server it needs is unusable, or its options are.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("mysql: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    NodeId(#[from] node_lease::NodeLeaseError),
    #[error("{0}")]
    Invalid(String),
}
