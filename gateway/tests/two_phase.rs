//! Two-phase receipts end to end: gateways append, shard workers deliver and save. Each mode moves
//! 2,000 messages among 200 users over 2 gateways and 2 shards, and the checker looks at every
//! receipt, every push and every row.

mod support;

use std::time::Duration;

use im_common::config::Mode;
use im_common::store::Store;
use im_common::testkit::TestEnv;
use support::traffic::{self, TrafficSpec};
use support::{cluster, Client};

fn spec(mode: Mode) -> TrafficSpec {
    TrafficSpec {
        pairs: 100,
        per_sender: 20,
        base_uid: 10_000,
        pace: Duration::from_millis(5),
        expect_accepted: mode != Mode::Baseline,
        deadline: Duration::from_secs(30),
    }
}

async fn every_message_is_receipted_delivered_and_saved_once(mode: Mode, name: &str) {
    let env = TestEnv::new(name);
    let c = cluster(&env, mode, 2, 2).await;
    let urls: Vec<String> = c.state.gateways.iter().map(|g| g.ws_url.clone()).collect();
    let spec = spec(mode);
    let t = traffic::run(&urls, &c.state.jwt_secret, &spec).await;
    let v = t.verdict(spec.per_sender);
    println!("{mode:?}: {v:?}");
    assert_eq!(v.errors, 0, "{v:?}");
    assert_eq!(v.saved, 2000, "every message gets ACK(saved): {v:?}");
    assert_eq!(v.accepted, if mode == Mode::Baseline { 0 } else { 2000 }, "{v:?}");
    assert_eq!(v.delivered, 2000, "{v:?}");
    assert_eq!((v.lost, v.reorders), (0, 0), "{v:?}");
    for s in &t.senders {
        for (cmid, id) in &s.accepted {
            assert_eq!(s.saved.get(cmid), Some(id), "accepted and saved carry the same serverMsgId");
        }
    }
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    let (rows, dup_rows, out_of_order) = traffic::check_rows(&store).await;
    assert_eq!((rows, dup_rows, out_of_order), (2000, 0, 0));
    store.close().await;
    if mode != Mode::Baseline {
        // Trimming: once drained, nothing is left in any stream.
        let mut redis = im_common::connections::connect(&c.state.redis_url).await.unwrap();
        for shard in 0..2 {
            for stream in ["accepted", "to_save"] {
                let key = format!("{}:{{s{shard}}}:{stream}", c.state.key_prefix);
                let len: u64 = redis::cmd("XLEN").arg(&key).query_async(&mut redis).await.unwrap();
                assert_eq!(len, 0, "{key} still holds {len} entries");
            }
        }
    }
    drop(c);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_mode_saves_and_delivers_every_message_once() {
    every_message_is_receipted_delivered_and_saved_once(Mode::Baseline, "mode_base").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_only_mode_saves_and_delivers_every_message_once() {
    every_message_is_receipted_delivered_and_saved_once(Mode::AcceptedOnly, "mode_acc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mode_saves_and_delivers_every_message_once() {
    every_message_is_receipted_delivered_and_saved_once(Mode::Full, "mode_full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_the_original_id_as_accepted_or_saved() {
    let env = TestEnv::new("retry2p");
    let c = cluster(&env, Mode::Full, 1, 2).await;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, &c.state.jwt_secret, 2001).await;
    alice.chat(2002, "x1", "hi").await;
    let accepted = alice.ack("accepted", "x1").await;
    alice.ack("saved", "x1").await;
    alice.chat(2002, "x1", "hi").await;
    let again = alice.ack("saved", "x1").await;
    assert_eq!(again["serverMsgId"], accepted["serverMsgId"]);
    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 1);
    store.close().await;
    drop(c);
    env.cleanup().await;
}
