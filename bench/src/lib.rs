//! `im_bench`: the load generator and checker behind the `bench` binary.
//!
//! A tour, in the order a run uses them: [`spec`] says what load to offer and against which cluster;
//! [`plan`] turns that into fixed sender → receiver pairs spread over the gateways; [`client`] opens
//! one authenticated WebSocket; [`load`] drives every connection on its schedule and records what
//! comes back into a [`recorder::Recorder`]; [`checker`] turns the logs into verdicts (lost,
//! duplicated, reordered, missing rows) with pure functions; [`db`] reads the run's rows back from
//! MySQL; [`cpu`] reads per-process CPU time; [`redis_nodes`] reads what each Redis Cluster node
//! served; [`run()`] puts load, row check and [`report`] together;
//! [`compare`] starts clusters and runs the three-arm comparison and the load sweep, and [`chart`]
//! draws them; [`limits`] measures the raw operations the engine is made of against the engine;
//! [`drill`] runs fault drills; [`hold`] holds many idle connections; [`args`] is the command line
//! that `bench` and `ops` share. Processes are started, watched and stopped through `im_harness`.
//!
//! The numbers this crate prints are how the project proves itself, so the rule throughout is: count
//! everything, hide nothing. A message is either answered, delivered and saved, or it shows up in one
//! of the failure counts.

pub mod args;
pub mod catchup;
pub mod chart;
pub mod checker;
pub mod client;
pub mod compare;
pub mod cpu;
pub mod db;
pub mod drill;
pub mod hold;
pub mod limits;
pub mod load;
pub mod plan;
pub mod recorder;
pub mod redis_nodes;
pub mod report;
pub mod run;
pub mod spec;

pub use load::{run_load, LoadResult};
pub use report::RunReport;
pub use run::{check_db, run};
pub use spec::{AuthMode, FrontDoor, LoadSpec, Target, WireEncoding};

/// Why a bench command could not complete (as opposed to what it measured, which is in the report).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The load or cluster options are unusable.
    #[error("invalid options: {0}")]
    InvalidSpec(String),
    /// Starting, reading or stopping a cluster failed.
    #[error("cluster: {0}")]
    Cluster(#[from] im_harness::cluster::ClusterError),
    /// Reading the run's rows back from MySQL failed.
    #[error("database check: {0}")]
    Db(#[from] db::DbError),
    /// Writing the run directory failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// Not a single pair of connections could be opened, so there is nothing to measure.
    #[error("no sender/receiver pair could connect ({0} connection failures); is the cluster up?")]
    NothingConnected(u64),
}
