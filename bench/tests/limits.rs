//! `bench limits` against the real servers, briefly: every raw operation is measured, a limit
//! follows, and nothing the run wrote stays behind. The servers are the shared test Redis and
//! MariaDB; the run's key prefix lies under the test's own ([`TestEnv`]), so tests run in parallel
//! and twice.

use std::time::Duration;

use im_bench::compare::ClusterOptions;
use im_bench::limits::model::Op;
use im_bench::limits::{self, Drive, LimitsSpec};
use im_harness::env::TestEnv;

fn spec(env: &TestEnv, out: &std::path::Path, secs_per_op: Duration, drive: Drive) -> LimitsSpec {
    LimitsSpec {
        cluster: ClusterOptions {
            config: env.config(),
            gateways: 1,
            shards: 1,
            workers: None,
            redis_cluster: None,
            keep_data: false,
        },
        secs_per_op,
        drive,
        engine: None,
        out: out.to_path_buf(),
        command: "bench limits".into(),
    }
}

#[tokio::test]
async fn every_raw_operation_is_measured_and_nothing_stays_behind() {
    let env = TestEnv::new("limits");
    let out = std::env::temp_dir().join(format!("im-test-{}", env.key_prefix.replace(':', "-")));
    let spec = spec(&env, &out, Duration::from_millis(300), Drive::FlatOut);
    let report = limits::run(&spec).await.expect("limits measures");

    for op in Op::ALL {
        let m = report.measurements.iter().find(|m| m.op == op).unwrap_or_else(|| panic!("{op:?} measured"));
        assert!(m.ops > 0 && m.ops_per_sec > 0.0, "{m:?}");
    }
    let cost = report.per_message.as_ref().expect("a limit follows from the operations");
    assert!(cost.limit_rate > 0.0 && cost.time_shared_us > 0.0, "{cost:?}");
    let table = std::fs::read_to_string(out.join("limits.md")).expect("limits.md written");
    assert!(table.contains("| **one message** |") && out.join("limits.json").exists(), "{table}");

    let mut conn =
        redis::Client::open(env.redis_url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let left = im_harness::env::keys_matching(&mut conn, &format!("{}:*", env.key_prefix)).await.unwrap();
    assert!(left.is_empty(), "scratch keys left behind: {left:?}");
    std::fs::remove_dir_all(&out).ok();
    env.cleanup().await;
}

/// Paced, no operation runs faster than the messages need it (not flat out), and the report gives a
/// CPU cost per message. How close each gets to its pace is the machine's business, not asserted: on
/// a CI box loaded by the other suites PUBLISH reached 274 of its 800 a second.
#[tokio::test]
async fn paced_operations_never_run_faster_than_the_messages_need_them() {
    let env = TestEnv::new("limits_paced");
    let out = std::env::temp_dir().join(format!("im-test-{}", env.key_prefix.replace(':', "-")));
    let drive = Drive::Paced { msgs_per_sec: 400.0, rows_per_insert: 4 };
    let report = limits::run(&spec(&env, &out, Duration::from_secs(1), drive)).await.expect("limits measures");
    assert_eq!(report.drive, drive);
    for op in Op::ALL {
        let m = report.measurements.iter().find(|m| m.op == op).unwrap_or_else(|| panic!("{op:?} measured"));
        let pace = 400.0 * f64::from(op.per_message());
        assert!(
            m.ops > 0 && m.ops_per_sec < 1.2 * pace,
            "{op:?} ran at {:.0}/s, paced for {pace:.0}/s: {m:?}",
            m.ops_per_sec
        );
    }
    let table = std::fs::read_to_string(out.join("limits.md")).expect("limits.md written");
    assert!(table.contains("**Paced for 400 msg/s, one operation per call: raw CPU per message"), "{table}");
    std::fs::remove_dir_all(&out).ok();
    env.cleanup().await;
}
