//! `ops scale`: more gateways and standby workers for a running cluster. New gateways take the next
//! node ids; new workers start with `--shard auto` and take free or orphaned shards, else stand by.

use im_harness::cluster::{self, ClusterError, ClusterState};

/// Adds `gateways` gateways and `workers` standby workers to the cluster in `state`, and waits until
/// the new gateways are ready.
pub async fn scale(state: &mut ClusterState, gateways: usize, workers: usize) -> Result<(), ClusterError> {
    let mut added = state.clone();
    added.gateways.clear();
    added.workers.clear();
    for _ in 0..gateways {
        let node = state.gateways.iter().map(|g| g.node_id).max().unwrap_or(0) + 1;
        let gateway = cluster::spawn_gateway(&state.dir, &state.config_path, node).await?;
        state.gateways.push(gateway.clone());
        added.gateways.push(gateway);
    }
    for _ in 0..workers {
        let worker = cluster::spawn_worker(&state.dir, &state.config_path, state.workers.len(), None).await?;
        state.workers.push(worker);
    }
    cluster::wait_ready(&added).await
}
