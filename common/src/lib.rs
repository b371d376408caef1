//! Shared by every im process: the wire protocol, configuration, shard hashing, message ids, the Redis
//! key layout, the records stored in Redis, the SQL, routing of pushes, and process plumbing.

pub mod auth;
pub mod bus;
pub mod config;
pub mod health;
pub mod ids;
pub mod keys;
pub mod protocol;
pub mod record;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod testkit;
