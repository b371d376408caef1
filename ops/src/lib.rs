//! The operator toolkit as a library, so tests drive clusters exactly the way `ops` does.

pub mod cluster;
pub mod servers;
