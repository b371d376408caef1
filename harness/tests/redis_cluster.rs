//! Private Redis Clusters against real `redis-server` processes: the tests' shared cluster is whole on
//! every node, a test's keys are removed from every master, and a private cluster is reused while
//! it runs and comes back with its data after a stop.

use std::collections::BTreeSet;
use std::path::PathBuf;

use im_harness::env::TestEnv;
use im_harness::servers::{cluster_slots, PrivateRedisCluster, SlotRange};

async fn node(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// A key under `prefix` whose slot (as the server computes it) is one `master` holds.
async fn key_held_by(url: &str, prefix: &str, ranges: &[SlotRange], master: &str) -> (String, u16) {
    let mut conn = node(url).await;
    for i in 0..10_000 {
        let key = format!("{prefix}:probe:{i}");
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key).query_async(&mut conn).await.unwrap();
        if ranges.iter().any(|r| r.master == master && r.contains(slot)) {
            return (key, slot);
        }
    }
    panic!("no key under {prefix} hashes to a slot of {master}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_the_tests_redis_cluster_reports_cluster_state_ok() {
    let env = TestEnv::on_redis_cluster("rc_ok").await.expect("the tests' Redis Cluster");
    assert!(env.redis_cluster_urls.len() >= 3, "{:?}", env.redis_cluster_urls);
    assert_eq!(env.config().redis.cluster_urls, env.redis_cluster_urls);
    assert_eq!(env.redis_url, env.redis_cluster_urls[0], "tools that need one node get the first");
    for url in &env.redis_cluster_urls {
        let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut node(url).await).await.unwrap();
        assert!(info.contains("cluster_state:ok"), "{url}: {info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{url}: {info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tests_keys_are_removed_from_every_master() {
    let env = TestEnv::on_redis_cluster("rc_clean").await.expect("the tests' Redis Cluster");
    let ranges = cluster_slots(&env.redis_url).await.expect("the slot map");
    let masters: BTreeSet<&str> = ranges.iter().map(|r| r.master.as_str()).collect();
    assert!(masters.len() >= 3, "{ranges:?}");
    let mut written = Vec::new();
    for master in &masters {
        let (key, slot) = key_held_by(&env.redis_url, &env.key_prefix, &ranges, master).await;
        let url = format!("redis://{master}");
        let () = redis::cmd("SET").arg(&key).arg("x").query_async(&mut node(&url).await).await.unwrap();
        written.push((url, key, slot));
    }
    let slots: BTreeSet<u16> = written.iter().map(|(_, _, slot)| *slot).collect();
    assert_eq!(slots.len(), masters.len(), "one key per master, each in its own slot: {written:?}");

    env.cleanup().await;

    for (url, key, _) in &written {
        let exists: u32 = redis::cmd("EXISTS").arg(key).query_async(&mut node(url).await).await.unwrap();
        assert_eq!(exists, 0, "{key} on {url} was deleted");
    }
}

/// A directory for one private cluster, whose nodes are killed and which is removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(cluster) = PrivateRedisCluster::recorded_in(&self.0) {
            cluster.kill();
            let gone = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while cluster.nodes.iter().any(|n| n.is_running()) && std::time::Instant::now() < gone {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_cluster_is_reused_while_it_runs_and_restarted_with_its_data_after_a_stop() {
    let scratch = Scratch(std::env::temp_dir().join(format!("im-redis-cluster-{:08x}", rand::random::<u32>())));
    let first = PrivateRedisCluster::ensure(&scratch.0, 3).await.expect("a private cluster");
    assert_eq!((first.nodes.len(), first.urls.len()), (3, 3));
    assert!(first.nodes.iter().all(|n| n.dir.starts_with(scratch.0.join("redis-cluster"))), "{first:?}");
    let ranges = cluster_slots(&first.urls[0]).await.unwrap();
    let master = ranges[0].master.clone();
    let (key, _) = key_held_by(&first.urls[0], "imt:reuse", &ranges, &master).await;
    let url = format!("redis://{master}");
    let () = redis::cmd("SET").arg(&key).arg("kept").query_async(&mut node(&url).await).await.unwrap();

    let again = PrivateRedisCluster::ensure(&scratch.0, 3).await.expect("the same cluster");
    assert_eq!(again, first, "a healthy cluster is reused, not started twice");

    first.stop().await.unwrap();
    assert!(first.nodes.iter().all(|n| !n.is_running()));
    let revived = PrivateRedisCluster::ensure(&scratch.0, 3).await.expect("the cluster restarted");
    assert_eq!(revived.urls, first.urls, "restarted on its ports");
    let value: String = redis::cmd("GET").arg(&key).query_async(&mut node(&url).await).await.unwrap();
    assert_eq!(value, "kept", "the AOF brought the data back");
    revived.stop().await.unwrap();
}
