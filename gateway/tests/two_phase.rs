//! Two-phase receipts end to end: gateways append, shard workers deliver and save.

mod support;

use im_common::config::Mode;
use im_common::testkit::TestEnv;
use support::{cluster, Client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mode_gives_accepted_then_saved_and_pushes() {
    let env = TestEnv::new("full1");
    let c = cluster(&env, Mode::Full, 2, 2).await;
    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, secret, 2001).await;
    let mut bob = Client::connect(&c.state.gateways[1].ws_url, secret, 2002).await;
    alice.chat(2002, "x1", "hi").await;
    let accepted = alice.ack("accepted", "x1").await;
    let saved = alice.ack("saved", "x1").await;
    assert_eq!(accepted["serverMsgId"], saved["serverMsgId"]);
    let push = bob.expect("push", |v| v["type"] == "SINGLE_CHAT").await;
    assert_eq!(push["serverMsgId"], saved["serverMsgId"]);
    drop(c);
    env.cleanup().await;
}
