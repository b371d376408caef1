//! Shard ownership under a lease that vanishes (evicted, lost in a failover, deleted by hand): the
//! former owner must not take entries into the shared pending list once the lease is no longer its
//! own, or they sit there — unsaved, with later messages of the same senders going past them —
//! until the next takeover (SPEC §3.1, §3.4).

mod support;

use std::time::Duration;

use im_common::config::Mode;
use im_common::keys::Keys;
use im_common::store::Store;
use im_common::testkit::TestEnv;
use im_ops::cluster::TestCluster;
use support::spec;
use support::traffic::{self, TrafficSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_keep_flowing_in_order_when_the_shard_lease_vanishes_under_load() {
    let env = TestEnv::new("lease_gone");
    let mut s = spec(&env, Mode::Full, 1, 1);
    s.workers = 2; // one standby
    s.config.two_phase.lease_ttl_ms = 1500;
    s.config.two_phase.block_ms = 250;
    let c = TestCluster::start(&s).await.unwrap();
    let keys = Keys::from_config(&s.config);
    let mut redis = im_common::connections::connect(&c.state.redis_url).await.unwrap();
    let load = TrafficSpec {
        pairs: 20,
        per_sender: 120,
        base_uid: 40_000,
        pace: Duration::from_millis(25),
        expect_accepted: true,
        deadline: Duration::from_secs(30),
    };
    let urls: Vec<String> = c.state.gateways.iter().map(|g| g.ws_url.clone()).collect();
    let secret = c.state.jwt_secret.clone();
    let traffic = tokio::spawn({
        let load = load.clone();
        async move { traffic::run(&urls, &secret, &load).await }
    });
    // The lease disappears once while messages flow; the standby takes over, and nothing takes the
    // shard back afterwards (a second takeover would read the pending list again and hide the bug).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _: () = redis::cmd("DEL").arg(keys.lease(0)).query_async(&mut redis).await.unwrap();
    let t = traffic.await.unwrap();
    let v = t.verdict(load.per_sender);
    let total = load.pairs * load.per_sender;
    assert_eq!((v.saved, v.delivered, v.lost, v.reorders), (total, total, 0, 0), "{v:?}");
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(traffic::check_rows(&store).await, (total, 0, 0), "rows, duplicate rows, senders out of order");
    store.close().await;
    drop(c);
    env.cleanup().await;
}
