//! `im_harness`: everything that starts, watches and stops im processes — for the end-to-end tests,
//! the `ops` CLI and the `bench` tool alike, so the three drive clusters the same way.
//!
//! A tour, from the bottom up:
//! - [`process`]: spawn detached, signal, and read `/proc` (alive, CPU, memory, listeners);
//! - [`poll`]: wait for a condition along the workspace's backoff curve instead of fixed sleeps;
//! - [`servers`]: private Redis, Redis Cluster and MariaDB (installed if needed) when the configured
//!   ones are absent;
//! - [`cluster`]: a local cluster of gateways, shard workers and its dashboard, and its state file;
//! - [`guard`]: the kill-on-drop owner of a cluster;
//! - [`http`] and [`metrics`]: the one HTTP client and the one Prometheus text reader;
//! - [`status`]: a running cluster's per-shard and per-gateway state, from its processes' metrics;
//! - [`ws`]: the WebSocket client of the JSON protocol for tools and tests;
//! - [`mod@env`]: per-test isolation (database and key prefix), cleaned up on drop.

pub mod cluster;
pub mod env;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod poll;
pub mod process;
pub mod servers;
pub mod status;
pub mod ws;
