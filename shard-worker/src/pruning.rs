//! Old path claims deleted (`store::path_claims`). A claim matters only until the stream copy of
//! its message is numbered, normally within seconds of the Redis outage that wrote it; the owner of
//! shard 0 (one process in the deployment, whichever holds that lease) deletes the claims of
//! messages older than [`CLAIM_RETENTION`] once every [`PRUNE_EVERY`].

use std::time::Duration;

use im_common::ids::{min_id_at, now_ms};
use im_common::store::Store;

/// How long a claim is kept: far longer than any stream copy waits for its numbering.
pub const CLAIM_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often old claims are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Prunes until the task is aborted; the first round runs at once.
pub async fn prune_path_claims(store: Store) {
    loop {
        let before = min_id_at(now_ms().saturating_sub(CLAIM_RETENTION.as_millis() as u64));
        match store.prune_path_claims(before).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(deleted, "pruned path claims older than a day");
                metrics::counter!("im_worker_path_claims_pruned_total").increment(deleted);
            }
            // MySQL away: the next round tries again; nothing depends on old claims being gone.
            Err(e) => tracing::debug!(error = %e, "pruning path claims failed"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}
