//! The ground the end-to-end suites in `tests/` stand on: real gateway and shard-worker processes,
//! started the way `ops up` starts them ([`im_harness::cluster`]), on the test Redis and MariaDB,
//! isolated per test by a [`TestEnv`] and owned by a [`ClusterGuard`] — so a failing test leaks
//! neither processes nor data. The package holds no product code: its library is this support, its
//! tests are the suites.
//!
//! Traffic at volume goes through the bench's load generator and checker ([`traffic`]), the same
//! code that measures the engine, sized down; single conversations go through the harness's
//! [`Client`]. Operator commands (`ops canary`, `ops scale`, `ops reshard`, `ops down`) are run as
//! the `ops` binary ([`ops`]), exactly as an operator runs them. Build every binary first
//! (`cargo build --workspace`; `ops/test.sh` does).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use im_bench::{run_load, LoadResult, LoadSpec, Target};
use im_common::config::{Config, Mode};
use im_common::store::Store;
use im_harness::cluster::{self, ClusterSpec, ClusterState};
use im_harness::{http, metrics};

pub use im_harness::env::TestEnv;
pub use im_harness::guard::ClusterGuard;
pub use im_harness::ws::{exchange, TestClient as Client, WAIT};

/// How long a test waits for a metric to reach the value it expects (gauges refresh once a second).
pub const METRIC_WAIT: Duration = Duration::from_secs(5);
/// Pause between the traffic's connections being up and its first message.
const TRAFFIC_SETTLE: Duration = Duration::from_millis(200);

/// Waits until the gateway whose metrics are at `metrics_url` knows Redis is gone (its `/readyz`
/// turns red: its probe failed). From then on its appends fail open; an append caught in flight by
/// the outage does not (its outcome is unknown, docs/ARCHITECTURE.md "Fail-open").
pub async fn until_gateway_sees_redis_down(metrics_url: &str) {
    let readyz = metrics_url.replace("/metrics", "/readyz");
    let noticed = im_harness::poll::until_true_async(WAIT, || async {
        http::get(&readyz).await.is_ok_and(|(status, body)| status != 200 && body.contains("redis"))
    })
    .await;
    assert!(noticed, "the gateway at {metrics_url} did not notice within {WAIT:?} that Redis was gone");
}

/// Connects `uid` with a tiny TCP receive buffer (4 KiB), so a client that reads slowly (or not at
/// all) backs up the gateway's outbound queue soon instead of filling kernel buffers first.
pub async fn connect_small_buffer(ws_url: &str, secret: &str, uid: u64) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let addr = ws_url.trim_start_matches("ws://").split('/').next().expect("host:port").parse().expect("an address");
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a receive buffer size");
    let stream = socket.connect(addr).await.expect("connected");
    let mut req = ws_url.into_client_request().expect("a WebSocket request");
    let token = im_common::auth::issue_token(secret, uid, 3600);
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().expect("a header"));
    let (ws, _) = tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    Client::from_stream(uid, ws)
}

/// The cluster spec [`cluster`] uses, for tests that change more (workers, private servers).
pub fn spec(env: &TestEnv, mode: Mode, gateways: usize, shards: u16) -> ClusterSpec {
    let dir = std::env::temp_dir().join(format!("im-test-{}", env.key_prefix.replace(':', "-")));
    ClusterSpec::new(env.config(), mode, gateways, shards, dir)
}

/// Starts a cluster for a test: killed, and its directory removed, when the guard is dropped (the
/// logs stay when the test failed).
pub async fn start(spec: &ClusterSpec) -> ClusterGuard {
    match ClusterGuard::start(spec).await {
        Ok(guard) => guard.removing_dir(),
        Err(e) => panic!("the cluster did not start (build every binary first: cargo build --workspace): {e}"),
    }
}

/// Starts `gateways` gateways (and `shards` workers in two-phase modes) for a test.
pub async fn cluster(env: &TestEnv, mode: Mode, gateways: usize, shards: u16) -> ClusterGuard {
    cluster_with(env, mode, gateways, shards, |_| {}).await
}

/// As [`cluster`], with a hook to adjust the config.
pub async fn cluster_with(
    env: &TestEnv,
    mode: Mode,
    gateways: usize,
    shards: u16,
    tweak: impl FnOnce(&mut Config),
) -> ClusterGuard {
    let mut spec = spec(env, mode, gateways, shards);
    tweak(&mut spec.config);
    start(&spec).await
}

/// Starts the cluster `spec` describes with the `ops up` binary (its config written to a file in the
/// cluster directory), and takes charge of it like [`start`].
pub async fn ops_up(spec: &ClusterSpec) -> ClusterGuard {
    std::fs::create_dir_all(&spec.dir).expect("the cluster directory");
    let config = spec.dir.join("ops-up.toml");
    cluster::write_config(&spec.config, &config).expect("the config file");
    let (gateways, shards, workers) = (spec.gateways.to_string(), spec.shards.to_string(), spec.workers.to_string());
    let (config, state) = (config.to_string_lossy().into_owned(), spec.state_file.to_string_lossy().into_owned());
    let mut args = vec!["--config", config.as_str(), "up", "--gateways", gateways.as_str(), "--shards"];
    args.extend([shards.as_str(), "--workers", workers.as_str(), "--mode", spec.mode.as_str(), "--state", &state]);
    if spec.force_private {
        args.push("--private");
    }
    let out = ops(&args).await;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let started = cluster::load_state(&spec.state_file);
    let guard = match started {
        Ok(state) => ClusterGuard::adopt(state, spec.state_file.clone()).removing_dir(),
        Err(e) => panic!("ops up left no state file ({e}): {said}"),
    };
    assert!(out.status.success(), "ops up failed: {said}");
    guard
}

/// The index of the cluster's private server of `kind` (`redis` or `mariadb`).
pub fn private_server(state: &ClusterState, kind: &str) -> usize {
    state.private_servers.iter().position(|s| s.kind_name == kind).expect("a private server of that kind")
}

/// Runs the `ops` binary with `args` and returns what it did.
pub async fn ops(args: &[&str]) -> Output {
    let binary = cluster::binary("ops").expect("the ops binary (cargo build --workspace)");
    tokio::process::Command::new(binary).args(args).output().await.expect("ops runs")
}

/// Runs `ops <command> --state <the cluster's state file> <args>`, asserting it succeeds; its stdout.
pub async fn ops_on(guard: &ClusterGuard, command: &str, args: &[&str]) -> String {
    let state = guard.state_file().to_string_lossy().into_owned();
    let mut all = vec![command, "--state", state.as_str()];
    all.extend_from_slice(args);
    let out = ops(&all).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ops {command} failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Polls a process's `/metrics` until `name` (summed over the series whose labels include `labels`)
/// satisfies `ok`, at most [`METRIC_WAIT`]; returns the last value seen.
pub async fn wait_metric(metrics_url: &str, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) -> f64 {
    metrics::wait_for(metrics_url, name, labels, METRIC_WAIT, ok).await
}

/// A connection to the cluster's Redis, for a test that looks at (or pokes) keys.
pub async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("a Redis URL");
    client.get_multiplexed_async_connection().await.expect("Redis answers")
}

/// The current value of a metric on a process (summed over its series).
pub async fn metric(metrics_url: &str, name: &str) -> f64 {
    metrics::value(metrics_url, name, &[]).await.expect("metrics answer")
}

/// GET over HTTP: (status, JSON body).
pub async fn get_json(url: &str) -> (u16, Value) {
    let (status, body) = http::get(url).await.expect("http answer");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Traffic for a test: `pairs` senders each sending `per_sender` messages, one every `pace`, to their
/// own receiver; everything must be answered and delivered within `deadline` after the last send.
#[derive(Debug, Clone, Copy)]
pub struct Traffic {
    pub pairs: usize,
    pub per_sender: usize,
    pub pace: Duration,
    pub deadline: Duration,
}

impl Traffic {
    /// The bench load that sends exactly this: every message falls in the (unmeasured) window.
    pub fn load(&self) -> LoadSpec {
        let per_sender = u32::try_from(self.per_sender).unwrap_or(u32::MAX);
        LoadSpec {
            connections: 2 * self.pairs,
            interval: self.pace,
            messages_per_sender: Some(self.per_sender),
            settle: TRAFFIC_SETTLE,
            warmup: Duration::ZERO,
            duration: self.pace * per_sender.saturating_add(1),
            drain: self.deadline,
            progress: None,
            ..LoadSpec::default()
        }
    }

    /// Runs it against `state` with the bench's load generator and checker; panics if it cannot run.
    pub async fn run(self, state: &ClusterState) -> LoadResult {
        let target = Target::from_state(state).expect("a target from the cluster state");
        run_load(&target, &self.load()).await.expect("the traffic runs")
    }
}

/// Makes the database refuse, for good, every row whose body is `POISON` (a CHECK constraint): a row
/// the save stage dead-letters while the rest of its batch is saved.
pub async fn refuse_poison(store: &Store) {
    store
        .execute("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (content <> 'POISON')")
        .await
        .expect("adding the no_poison constraint");
}

/// A full-mode cluster of one gateway and one shard whose database refuses `POISON` rows
/// ([`refuse_poison`]), and a store on that database.
pub async fn poisoned_cluster(env: &TestEnv) -> (ClusterGuard, Store) {
    let c = cluster(env, Mode::Full, 1, 1).await;
    let store = Store::connect(&c.state.mysql_url, 1).expect("store");
    refuse_poison(&store).await;
    (c, store)
}

/// Every row in the test's `messages` table, checked per sender: (rows, duplicate (sender,
/// clientMsgId) rows, senders whose rows in id order are not in clientMsgId order). ClientMsgIds of one
/// sender are numbered with equal width (`g007`) or as plain numbers (`7`), so ordering by (length,
/// text) is their numeric order.
pub async fn check_rows(store: &Store) -> (usize, usize, usize) {
    let rows = store.all_ids().await.expect("rows readable");
    let mut by_sender: HashMap<u64, Vec<&String>> = HashMap::new();
    let mut keys = HashSet::new();
    let mut duplicates = 0;
    for (from, _id, cmid) in &rows {
        if !keys.insert((from, cmid)) {
            duplicates += 1;
        }
        by_sender.entry(*from).or_default().push(cmid);
    }
    let natural = |c: &String| (c.len(), c.clone());
    let out_of_order =
        by_sender.values().filter(|cmids| cmids.windows(2).any(|w| natural(w[0]) >= natural(w[1]))).count();
    (rows.len(), duplicates, out_of_order)
}

/// Where a test keeps files of its own next to the cluster's.
pub fn scratch_dir(guard: &ClusterGuard, name: &str) -> PathBuf {
    let dir = guard.state.dir.join(name);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Waits until the first gateway of `state` has appended at least `n` messages (traffic started in
/// the background is flowing) and asserts that it did.
pub async fn until_appended(state: &ClusterState, n: f64, limit: Duration) {
    let appended =
        metrics::wait_for(&state.gateways[0].metrics_url, "im_gateway_appends_total", &[], limit, |a| a >= n).await;
    assert!(appended >= n, "traffic is flowing ({appended} appends)");
}

/// A subscription gap replayed from the journals: Bob (on the first gateway, synced) misses pushes
/// while that gateway is paused and its subscriptions are killed (`kill` returns how many
/// subscriber connections it killed); Alice (on the second) sends 50 messages then and 10 after the
/// gateway resumes. Bob must get all 60 once, in order, the gap from the journals.
pub async fn a_paused_gateway_replays_its_journals(
    state: &ClusterState,
    alice: &mut Client,
    bob: &mut Client,
    kill: impl std::future::Future<Output = u64>,
) {
    let gw0 = state.gateways[0].pid;
    im_harness::process::send(gw0, im_harness::process::Signal::SIGSTOP).expect("gateway paused");
    let killed = kill.await;
    assert!(killed >= 2, "both gateways' subscriptions killed ({killed})");
    for k in 0..50 {
        alice.chat(bob.uid, &format!("m{k:02}"), "x").await;
    }
    let mut saved = 0;
    while saved < 50 {
        saved += usize::from(alice.next().await["ackType"] == "saved");
    }
    // Resumed, it resubscribes, replays its journals first, then live messages; all in order, once.
    im_harness::process::send(gw0, im_harness::process::Signal::SIGCONT).expect("gateway resumed");
    for k in 50..60 {
        alice.chat(bob.uid, &format!("m{k:02}"), "x").await;
    }
    let got: Vec<String> = bob
        .drain(Duration::from_secs(2))
        .await
        .iter()
        .filter(|v| v["type"] == "SINGLE_CHAT")
        .map(|v| v["clientMsgId"].as_str().unwrap_or_default().to_owned())
        .collect();
    let want: Vec<String> = (0..60).map(|k| format!("m{k:02}")).collect();
    assert_eq!(got, want, "every push once, in order");
    let replayed =
        wait_metric(&state.gateways[0].metrics_url, "im_gateway_replayed_pushes_total", &[], |v| v > 0.0).await;
    assert!(replayed >= 50.0, "the gap came from the journals ({replayed} replayed)");
}
