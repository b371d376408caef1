//! `bench run` against a real local cluster in every mode: the counts must add up (every message sent
//! is answered, saved and delivered exactly once, in order, and is one row in MySQL), and faults
//! injected on purpose must show up in the checker's verdict.
//!
//! The cluster binaries come from the workspace build (`cargo build --workspace`); the servers are the
//! shared test Redis and MariaDB, isolated per test by [`TestEnv`] (cleaned up when dropped).

use std::time::Duration;

use im_bench::{check_db, run_load, AuthMode, BenchError, LoadSpec, RunReport, Target};
use im_common::config::Mode;
use im_common::store::Store;
use im_harness::cluster::ClusterSpec;
use im_harness::env::TestEnv;
use im_harness::guard::ClusterGuard;

async fn cluster(env: &TestEnv, mode: Mode) -> ClusterGuard {
    let dir = std::env::temp_dir().join(format!("im-test-{}", env.key_prefix.replace(':', "-")));
    let spec = ClusterSpec::new(env.config(), mode, 2, 2, dir);
    let guard = ClusterGuard::start(&spec).await.expect("cluster starts (build the workspace binaries first)");
    guard.removing_dir()
}

/// About 3 s of traffic from 10 senders to 10 receivers, one message per 200 ms each.
fn brief_load(auth: AuthMode) -> LoadSpec {
    LoadSpec {
        connections: 20,
        interval: Duration::from_millis(200),
        warmup: Duration::from_millis(500),
        duration: Duration::from_millis(2500),
        drain: Duration::from_secs(15),
        auth,
        progress: None,
        ..LoadSpec::default()
    }
}

/// (receiver, message number, position in its arrival order) of every push it had already received:
/// the first thing to look at when a duplicate shows up.
fn repeated_pushes(receivers: &[im_bench::checker::ReceiverLog]) -> Vec<(u64, u64, usize)> {
    let mut out = Vec::new();
    for r in receivers {
        let mut seen = std::collections::HashSet::new();
        for (position, d) in r.deliveries.iter().enumerate() {
            if !seen.insert((d.from, d.number)) {
                out.push((r.uid, d.number, position));
            }
        }
    }
    out
}

async fn counts_add_up_and_a_deleted_row_is_found(mode: Mode, name: &str, auth: AuthMode) {
    let env = TestEnv::new(name);
    let c = cluster(&env, mode).await;
    let target = Target::from_state(&c.state).expect("target from state");
    let result = run_load(&target, &brief_load(auth)).await.expect("the load runs");
    let v = &result.verdict;
    println!("{mode:?}: {v:?} errors {:?}", result.errors);

    assert_eq!((result.connections.connect_ok, result.connections.auth_ok), (20, 20), "{:?}", result.connections);
    assert!(v.sent >= 100, "10 senders × ~15 messages: {v:?}");
    assert_eq!(v.saved, v.sent, "every message gets ACK(saved): {v:?}");
    assert_eq!(v.delivered, v.sent, "every message is pushed: {v:?}");
    let expected_accepted = if mode == Mode::Baseline { 0 } else { v.sent };
    assert_eq!(v.accepted, expected_accepted, "{v:?}");
    assert_eq!(
        (v.lost, v.duplicates, v.reorders, v.id_mismatches, v.unexpected),
        (0, 0, 0, 0, 0),
        "{v:?}; repeated pushes: {:?}",
        repeated_pushes(&result.receivers)
    );
    assert_eq!((v.errored, v.unanswered), (0, 0), "{v:?}");
    assert!(result.errors.is_empty(), "{:?}", result.errors);

    let rows = check_db(&c.state.mysql_url, &result).await.expect("rows readable");
    assert_eq!((rows.rows, rows.missing, rows.duplicated, rows.unreceipted, rows.id_mismatches), (v.sent, 0, 0, 0, 0));
    assert_eq!((rows.messages_with_several_ids, rows.saved_without_matching_row), (0, 0), "one id, one row: {rows:?}");
    let report = RunReport::new(&result, Some(rows));
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    let sent_in_window = (report.rates.sent * report.load.duration_secs).round() as u64;
    assert!(sent_in_window > 0 && sent_in_window < v.sent, "warm-up sends are outside the window");
    assert_eq!(report.latency_ms.saved.count, sent_in_window, "every measured message has a saved latency");
    assert!(report.latency_ms.e2e.count > 0 && report.latency_ms.e2e.p50 > 0.0, "{:?}", report.latency_ms.e2e);
    let gateway_cpu = report.cpu.processes.iter().filter(|p| p.name.starts_with("gateway")).count();
    assert_eq!(gateway_cpu, 2, "both gateways accounted: {:?}", report.cpu.processes);
    assert!(report.cpu.processes.iter().all(|p| p.cpu_secs.is_some()), "{:?}", report.cpu.processes);

    // Fault: one receipted message disappears from the database.
    let store = Store::connect(&c.state.mysql_url, 1).expect("store");
    store
        .execute(&format!("DELETE FROM messages WHERE from_user_id = {} AND client_msg_id = '3'", result.base_uid))
        .await
        .expect("delete one row");
    store.close().await;
    let rows = check_db(&c.state.mysql_url, &result).await.expect("rows readable");
    assert_eq!((rows.rows, rows.missing, rows.duplicated), (v.sent - 1, 1, 0), "{rows:?}");
    assert_eq!(rows.saved_without_matching_row, 1, "its ACK(saved) has no row now: {rows:?}");
    let report = RunReport::new(&result, Some(rows));
    assert_eq!(
        report.problems(),
        vec![
            "1 receipted messages missing from the DB".to_owned(),
            "1 ACK(saved) without a row of that message".to_owned()
        ]
    );

    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_run_adds_up_and_detects_a_missing_row() {
    counts_add_up_and_a_deleted_row_is_found(Mode::Baseline, "bench_base", AuthMode::Header).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_only_run_adds_up_and_detects_a_missing_row() {
    counts_add_up_and_a_deleted_row_is_found(Mode::AcceptedOnly, "bench_acc", AuthMode::Frame).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_run_adds_up_and_detects_a_missing_row() {
    counts_add_up_and_a_deleted_row_is_found(Mode::Full, "bench_full", AuthMode::Header).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_counted_as_auth_failures() {
    let env = TestEnv::new("bench_auth");
    let c = cluster(&env, Mode::Full).await;
    let mut target = Target::from_state(&c.state).expect("target from state");
    target.jwt_secret = "not-the-cluster-secret".into();
    let mut load = brief_load(AuthMode::Header);
    load.connections = 6;
    match run_load(&target, &load).await {
        Err(BenchError::NothingConnected(6)) => {}
        other => panic!("expected 6 refused connections, got {other:?}"),
    }
    drop(c);
}
