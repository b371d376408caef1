//! A wedged shard is not silent: when the database refuses a save for a reason that is not about a
//! row (here: the `messages` table is gone), the save stage keeps retrying (no loss after accepted,
//! SPEC §3.1) and says so — a gauge of how long it has been failing, errors counted by class, and a
//! log line naming the server's error once per state change rather than once per retry — and it
//! drains as soon as the database is fixed.

use e2e::{cluster, wait_metric, Client, TestEnv};
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::{http, metrics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_refused_by_the_schema_is_reported_as_failing_and_drains_once_the_table_is_back() {
    let env = TestEnv::new("wedged");
    let c = cluster(&env, Mode::Full, 1, 1).await;
    let worker = c.state.workers[0].clone();
    let secret = &c.state.jwt_secret;
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, secret, 62_001).await;
    let mut bob = Client::connect(&c.state.gateways[0].ws_url, secret, 62_002).await;
    alice.ping().await;
    bob.ping().await;
    let failing = |v: f64| v > 0.0;
    let shard = [("shard", "0")];
    // Registered at 0 when the shard is taken, so scrapes and rules see it before any failure.
    let (_, page) = http::get(&worker.metrics_url).await.expect("metrics answer");
    assert!(page.contains("im_worker_save_failing_seconds{"), "the gauge is on the page while healthy: {page}");
    assert_eq!(metrics::sum(&metrics::parse(&page), "im_worker_save_failing_seconds", &shard), 0.0);

    let store = Store::connect(&c.state.mysql_url, 1).unwrap();
    store.execute("RENAME TABLE messages TO messages_away").await.unwrap();
    alice.chat(bob.uid, "wedged-1", "saved only once the table is back").await;
    let accepted = alice.ack("accepted", "wedged-1").await;
    bob.expect("the push (full mode delivers before saving)", |v| v["clientMsgId"] == "wedged-1").await;

    let seconds = wait_metric(&worker.metrics_url, "im_worker_save_failing_seconds", &shard, failing).await;
    assert!(failing(seconds), "the save stage reports that it is failing: {seconds}");
    let statement_errors =
        wait_metric(&worker.metrics_url, "im_worker_save_errors_total", &[("class", "statement")], failing).await;
    assert!(statement_errors > 0.0, "the error is counted as a statement error: {statement_errors}");
    // Several retries later, the log has named the error once, not once per retry.
    let retries = wait_metric(&worker.metrics_url, "im_worker_save_retries_total", &shard, |v| v >= 5.0).await;
    assert!(retries >= 5.0, "the stage keeps retrying: {retries}");
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    let naming: Vec<&str> = log.lines().filter(|l| l.contains("1146")).collect();
    assert!(!naming.is_empty(), "the worker log names the server's error (1146, no such table): {log}");
    assert!(naming.len() < 3, "logged per state change, not per retry ({retries} retries): {naming:#?}");
    assert!(
        wait_metric(&worker.metrics_url, "im_worker_save_failing_seconds", &shard, |v| v >= 1.0).await >= 1.0,
        "the gauge grows while the batch keeps failing"
    );

    store.execute("RENAME TABLE messages_away TO messages").await.unwrap();
    let saved = alice.ack("saved", "wedged-1").await;
    assert_eq!(saved["serverMsgId"], accepted["serverMsgId"]);
    assert_eq!(
        wait_metric(&worker.metrics_url, "im_worker_save_failing_seconds", &shard, |v| v == 0.0).await,
        0.0,
        "the gauge returns to 0 once the batch is saved"
    );
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    assert!(log.contains("save recovered"), "the recovery is logged: {log}");
    assert_eq!(store.query_u64("SELECT COUNT(*) FROM messages").await.unwrap(), 1);
    store.close().await;
    drop(c);
}
