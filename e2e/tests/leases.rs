//! Shard ownership under a lease that vanishes (evicted, lost in a failover, deleted by hand): the
//! former owner must not take entries into the shared pending list once the lease is no longer its
//! own, or they sit there — unsaved, with later messages of the same senders going past them —
//! until the next takeover (SPEC §3.1, §3.4).

use std::time::Duration;

use e2e::{check_rows, spec, TestEnv, Traffic};
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::cluster::ClusterSpec;
use im_harness::metrics;

/// One shard with its owner and a standby worker, and a lease short enough for a takeover within
/// seconds.
fn owner_and_standby(env: &TestEnv) -> ClusterSpec {
    let mut s = spec(env, Mode::Full, 1, 1);
    s.workers = 2;
    s.config.two_phase.lease_ttl_ms = 1500;
    s.config.two_phase.block_ms = 250;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_keep_flowing_in_order_when_the_shard_lease_vanishes_under_load() {
    let env = TestEnv::new("lease_gone");
    let c = e2e::start(&owner_and_standby(&env)).await;
    let keys = env.keys();
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let load =
        Traffic { pairs: 20, per_sender: 120, pace: Duration::from_millis(25), deadline: Duration::from_secs(30) };
    let state = c.state.clone();
    let traffic = tokio::spawn(async move { load.run(&state).await });
    // The lease disappears once while messages flow; the standby takes over, and nothing takes the
    // shard back afterwards (a second takeover would read the pending list again and hide the bug).
    let appended =
        metrics::wait_for(&c.state.gateways[0].metrics_url, "im_gateway_appends_total", &[], load.deadline, |n| {
            n >= 200.0
        })
        .await;
    assert!(appended >= 200.0, "traffic is flowing ({appended} appends)");
    let _: () = redis::cmd("DEL").arg(keys.lease(0)).query_async(&mut redis).await.unwrap();
    let result = traffic.await.unwrap();
    let v = &result.verdict;
    let total = (load.pairs * load.per_sender) as u64;
    assert_eq!((v.saved, v.delivered, v.lost, v.reorders), (total, total, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(check_rows(&store).await, (total as usize, 0, 0), "rows, duplicate rows, senders out of order");
    store.close().await;
    drop(c);
}

/// A shard's stream gauges come from its owner only: a worker that loses the lease stops saying how
/// long the shard's streams are (it zeroes them), so a dashboard or an alert that sums them over the
/// workers does not count a dead letter twice after a takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_stream_gauges_come_from_its_owner_only_after_a_takeover() {
    let env = TestEnv::new("gauges_owner");
    let c = e2e::start(&owner_and_standby(&env)).await;
    let keys = env.keys();
    let mut redis = e2e::redis(&c.state.redis_url).await;
    let _: String = redis::cmd("XADD")
        .arg(keys.dead_letter_stream(0))
        .arg("*")
        .arg("m")
        .arg("not a message")
        .arg("reason")
        .arg("test")
        .query_async(&mut redis)
        .await
        .unwrap();
    let owner_of = |lease: Option<String>| {
        lease.and_then(|v| c.state.workers.iter().position(|w| v.ends_with(&format!("-{}", w.pid))))
    };
    let lease: Option<String> = redis::cmd("GET").arg(keys.lease(0)).query_async(&mut redis).await.unwrap();
    let first = owner_of(lease).expect("one of the two workers owns shard 0");
    let dead = |w: usize| {
        let url = c.state.workers[w].metrics_url.clone();
        async move { metrics::value(&url, "im_stream_dead_letter_length", &[("shard", "0")]).await.unwrap_or(-1.0) }
    };
    let wait = Duration::from_secs(10);
    let seen = metrics::wait_for(
        &c.state.workers[first].metrics_url,
        "im_stream_dead_letter_length",
        &[("shard", "0")],
        wait,
        |n| n == 1.0,
    )
    .await;
    assert_eq!(seen, 1.0, "the owner reports the dead letter");

    // Take the lease away until the other worker holds it (the former owner may win it back).
    let second = 1 - first;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let lease: Option<String> = redis::cmd("GET").arg(keys.lease(0)).query_async(&mut redis).await.unwrap();
        if owner_of(lease) == Some(second) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the standby never took shard 0");
        let _: () = redis::cmd("DEL").arg(keys.lease(0)).query_async(&mut redis).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let seen = metrics::wait_for(
        &c.state.workers[second].metrics_url,
        "im_stream_dead_letter_length",
        &[("shard", "0")],
        wait,
        |n| n == 1.0,
    )
    .await;
    assert_eq!(seen, 1.0, "the new owner reports the dead letter");
    // The former owner's lease holder noticed within a TTL; give it that and its reporter's second.
    tokio::time::sleep(Duration::from_millis(1500 + 1500)).await;
    let (former, now) = (dead(first).await, dead(second).await);
    assert_eq!((former, now), (0.0, 1.0), "dead letters of shard 0 as reported by (former owner, owner)");
    drop(c);
}
