//! The operator toolkit as a library, so tests drive clusters exactly the way `ops` does.

pub mod canary;
pub mod client;
pub mod cluster;
pub mod dashboard;
pub mod observability;
pub mod servers;
pub mod status;
