//! The dashboard and alert rules in `ops/grafana` and `ops/prometheus`, proven against the real thing:
//! `promtool` checks the rules, the scrape config (rendered with the targets file `ops up` writes) and
//! the live `/metrics` page of every process; a real Prometheus scrapes a local cluster, and its HTTP
//! API must show the per-shard backlog series, alerts firing on real conditions (a shard without an
//! owner, a dead letter, fail-open, server_busy), every rule evaluating cleanly and every dashboard
//! query returning data. Every metric a panel or rule names must be in the live scrape.
//!
//! The cluster is made to show everything at once: 3 shards but workers for only 0 and 1 (shard 2
//! has no owner, its backlog passes a tiny `max_backlog`, so its sender gets `server_busy`); a CHECK
//! constraint makes one message a dead letter; an idempotency key of the wrong Redis type makes one
//! append fail, so that message takes the fail-open path.
//!
//! `promtool`/`prometheus` come from the Debian package `prometheus`; `ops/test.sh` installs it, and
//! these tests install it too when run directly as root.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use e2e::{spec, Client, ClusterGuard, TestEnv};
use im_common::config::Mode;
use im_common::keys::Keys;
use im_common::shard::shard_of;
use im_common::store::Store;
use im_harness::{http, metrics, poll, process};

const SHARDS: u16 = 3;
/// The shard no worker is started for.
const ORPHAN_SHARD: u16 = 2;
/// How long a test waits for Prometheus to show what it expects (it scrapes and evaluates every second).
const PROMETHEUS_WAIT: Duration = Duration::from_secs(15);
/// The Prometheus `file_sd` targets file `ops up` writes next to its state file.
const TARGETS_FILE: &str = "prometheus-targets.json";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read_repo_file(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Makes sure `promtool` and `prometheus` are installed (Debian package `prometheus`, installed here
/// when missing and running as root; `ops/test.sh` normally did it already).
fn ensure_prometheus_installed() {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let present = |bin: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present("promtool") && present("prometheus") {
        return;
    }
    assert!(process::running_as_root(), "promtool is missing: apt-get install prometheus (ops/test.sh does)");
    let script = "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                  prometheus && if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; fi";
    let status = std::process::Command::new("sh").arg("-c").arg(script).status().expect("run apt-get");
    assert!(status.success() && present("promtool"), "installing the Debian package prometheus failed");
}

/// Runs `promtool <args>` with `stdin`; returns (exit code, stdout + stderr).
async fn promtool(args: &[&str], stdin: &str) -> (i32, String) {
    let mut child = tokio::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("write to promtool");
    drop(input);
    let out = child.wait_with_output().await.expect("promtool output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The repository's `prometheus.yml`, made to scrape and evaluate every second, read `targets` and
/// load `rules`. Panics if the file no longer has what is replaced, so the render cannot silently
/// test a different config.
fn render_prometheus_config(targets: &Path, rules: &Path) -> String {
    let mut text = read_repo_file("ops/prometheus/prometheus.yml");
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_owned()),
        ("evaluation_interval: 15s", "evaluation_interval: 1s".to_owned()),
        ("scrape_timeout: 5s", "scrape_timeout: 1s".to_owned()),
        ("refresh_interval: 30s", "refresh_interval: 1s".to_owned()),
        ("../../.im-local/prometheus-targets.json", targets.display().to_string()),
        ("- alerts.yml", format!("- {}", rules.display())),
    ] {
        assert_eq!(text.matches(from).count(), 1, "ops/prometheus/prometheus.yml should contain {from:?} once");
        text = text.replace(from, &to);
    }
    text
}

/// The repository's alert rules with every `for:` set to 0s, so a test sees them fire at once.
fn rules_firing_at_once() -> String {
    read_repo_file("ops/prometheus/alerts.yml")
        .lines()
        .map(|line| {
            let indent = line.len() - line.trim_start().len();
            if line.trim_start().starts_with("for:") {
                format!("{}for: 0s", &line[..indent])
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every PromQL expression of the dashboard (panel targets and template-variable queries), with the
/// Grafana variables replaced by what "all shards, 1m rate window" means.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&read_repo_file("ops/grafana/im-engine.json")).expect("dashboard is JSON");
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            out.push((title, target["expr"].as_str().expect("target expr").to_owned()));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        // Grafana's `label_values(metric, label)` asks Prometheus for `group by (label) (metric)`.
        if let Some(args) = var["query"]["query"].as_str().and_then(|q| q.strip_prefix("label_values(")) {
            let (metric, label) = args.trim_end_matches(')').split_once(',').expect("label_values(metric, label)");
            out.push((format!("variable {}", var["name"]), format!("group by ({}) ({metric})", label.trim())));
        }
    }
    out.into_iter().map(|(t, e)| (t, e.replace("$__rate_interval", "1m").replace("$shard", ".*"))).collect()
}

/// How many alerts `ops/prometheus/alerts.yml` defines.
fn alert_count() -> usize {
    let rules = read_repo_file("ops/prometheus/alerts.yml");
    let count = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert!(count >= 6, "backlog, save lag, dead letters, lease owner, subscription, error ratio at least");
    count
}

/// The PromQL `expr:` blocks of the alert rules file (single-line or block scalars).
fn rule_expressions(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else { continue };
        let indent = line.len() - trimmed.len();
        let mut expr = rest.trim().trim_start_matches(['|', '>']).to_owned();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            expr.push('\n');
            expr.push_str(next.trim());
            lines.next();
        }
        out.push(expr.trim().to_owned());
    }
    out
}

/// Metric names (`im_...`) an expression refers to.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("im_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).map_or(expr.len(), |e| start + e);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end.max(start + 3);
    }
    names
}

/// What the live pages declare: every metric family, and which of them are histograms or summaries
/// (whose samples are `_bucket`, `_sum`, `_count`).
#[derive(Default)]
struct Families {
    names: HashSet<String>,
    composite: HashSet<String>,
}

impl Families {
    fn add_page(&mut self, page: &str) {
        for (name, kind) in metrics::families(page) {
            if kind == "histogram" || kind == "summary" {
                self.composite.insert(name.clone());
            }
            self.names.insert(name);
        }
    }

    /// Whether a name used in PromQL is a series of some declared family.
    fn has(&self, used: &str) -> bool {
        self.names.contains(used)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| used.strip_suffix(suffix).is_some_and(|base| self.composite.contains(base)))
    }
}

/// A real Prometheus on a free port with its own storage; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
}

impl Prometheus {
    async fn start(config: &Path, dir: &Path) -> Prometheus {
        for _ in 0..3 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
            let child = std::process::Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn prometheus");
            let mut prom = Prometheus { child, url: format!("http://127.0.0.1:{port}") };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if http_get(&format!("{}/-/ready", prom.url)).await.is_some_and(|(status, _)| status == 200) {
                    return prom;
                }
                if prom.child.try_wait().ok().flatten().is_some() {
                    break; // lost the port race, or a bad config: see the log
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = prom.child.kill();
        }
        panic!(
            "prometheus did not start; log: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&format!("{}/api/v1/{path}", self.url)).await.expect("prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(status == 200 && v["status"] == "success", "GET {path}: {status} {body}");
        v["data"].clone()
    }

    /// An instant query: the result vector.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", url_encode(promql))).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `query` until `ok` holds (scrapes and rule evaluations happen every second).
    async fn wait_query(&self, promql: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let ok = &ok;
        let found = poll::until(PROMETHEUS_WAIT, || async move {
            let result = self.query(promql).await;
            ok(&result).then_some(result)
        })
        .await;
        match found {
            Some(result) => result,
            None => self.query(promql).await,
        }
    }

    /// Active alerts: (name, shard label, state). Panics if an annotation template failed to expand.
    async fn alerts(&self) -> Vec<(String, String, String)> {
        let data = self.api("alerts").await;
        let label = |a: &Value, l: &str| a["labels"][l].as_str().unwrap_or("").to_owned();
        let list = data["alerts"].as_array().cloned().unwrap_or_default();
        for alert in &list {
            let annotations = alert["annotations"].to_string();
            assert!(!annotations.contains("error expanding"), "annotation templates expand: {alert}");
            assert!(alert["annotations"]["summary"].is_string() && alert["annotations"]["runbook"].is_string());
        }
        list.iter()
            .map(|a| (label(a, "alertname"), label(a, "shard"), a["state"].as_str().unwrap_or("").to_owned()))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET url` as (status, body); `None` when nothing answered.
async fn http_get(url: &str) -> Option<(u16, String)> {
    http::get(url).await.ok()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The first uid at or above `from` whose messages go to `shard`.
fn uid_on_shard(shard: u16, from: u64) -> u64 {
    (from..).find(|&uid| shard_of(uid, SHARDS) == shard).expect("a uid")
}

/// Every process's metrics URL.
fn metrics_urls(c: &ClusterGuard) -> Vec<String> {
    c.state
        .gateways
        .iter()
        .map(|g| g.metrics_url.clone())
        .chain(c.state.workers.iter().map(|w| w.metrics_url.clone()))
        .collect()
}

/// A cluster in full mode with an unowned shard and a tiny backlog bound, started by `ops up`, which
/// writes the Prometheus targets file next to its state file.
async fn start_observed_cluster(env: &TestEnv) -> (ClusterGuard, Keys, PathBuf) {
    let mut s = spec(env, Mode::Full, 2, SHARDS);
    s.workers = usize::from(ORPHAN_SHARD); // workers for shards 0..ORPHAN_SHARD only
    s.config.two_phase.max_backlog = 3;
    let keys = Keys::from_config(&s.config);
    let c = e2e::ops_up(&s).await;
    let targets = c.state_file().with_file_name(TARGETS_FILE);
    assert!(targets.is_file(), "ops up wrote {}", targets.display());
    (c, keys, targets)
}

/// Traffic that makes every metric the dashboard and the alerts use appear, with real conditions:
/// messages pushed across gateways and saved, a dead letter, a bad frame, a fail-open append and
/// `server_busy` from the unowned shard. `before_dead_letter` runs after the first saves (a
/// Prometheus test waits there until it has scraped the dead-letter counter at 0).
async fn generate_traffic<F: std::future::Future<Output = ()>>(
    c: &ClusterGuard,
    keys: &Keys,
    before_dead_letter: impl FnOnce() -> F,
) {
    let secret = &c.state.jwt_secret;
    let alice_uid = uid_on_shard(0, 40_001);
    let carol_uid = uid_on_shard(ORPHAN_SHARD, 40_101);
    let mut alice = Client::connect(&c.state.gateways[0].ws_url, secret, alice_uid).await;
    let mut bob = Client::connect(&c.state.gateways[1].ws_url, secret, 40_500).await;
    let mut carol = Client::connect(&c.state.gateways[0].ws_url, secret, carol_uid).await;
    bob.ping().await;
    // One at a time, so shard 0's backlog never reaches the tiny bound.
    for k in 0..5 {
        e2e::exchange(&mut alice, &mut bob, &format!("ok{k}")).await;
    }
    before_dead_letter().await;

    let store = Store::connect(&c.state.mysql_url, 1).expect("store");
    e2e::refuse_poison(&store).await;
    store.close().await;
    alice.chat(bob.uid, "poison", "POISON").await;
    let answer = alice.expect("save_failed", |v| v["type"] == "ERROR" && v["clientMsgId"] == "poison").await;
    assert_eq!(answer["reason"], "save_failed", "{answer}");

    alice.send_text("{not json").await;
    alice.expect("bad_json", |v| v["type"] == "ERROR" && v["reason"] == "bad_json").await;

    // Fail-open and server_busy happen twice, a scrape apart: their counters are created by the
    // first event, and rate() needs a second one to see a sustained condition (what the alerts are for).
    let mut redis = e2e::redis(&c.state.redis_url).await;
    for round in 0..2 {
        // An idempotency key of the wrong type makes the append script fail: fail-open saves it anyway.
        let cmid = format!("failopen{round}");
        let _: i64 = redis::cmd("RPUSH")
            .arg(keys.idempotency(0, alice_uid, &cmid))
            .arg("not a string")
            .query_async(&mut redis)
            .await
            .expect("rpush");
        alice.chat(bob.uid, &cmid, "saved on the baseline path").await;
        let answer = alice.expect("fail-open answer", |v| v["clientMsgId"] == cmid.as_str()).await;
        assert_eq!((answer["type"].as_str(), answer["ackType"].as_str()), (Some("ACK"), Some("saved")), "{answer}");

        // Nobody drains the orphan shard: its backlog passes the bound and carol gets server_busy.
        let mut busy = false;
        for k in 0..20 {
            let cmid = format!("orphan{round}-{k}");
            carol.chat(bob.uid, &cmid, "to a shard without owner").await;
            let answer = carol.expect("orphan answer", |v| v["clientMsgId"] == cmid.as_str()).await;
            if answer["reason"] == "server_busy" {
                busy = true;
                break;
            }
            assert_eq!(answer["ackType"], "accepted", "{answer}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(busy, "the unowned shard's backlog should answer server_busy");
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
}

#[test]
fn the_dashboard_shows_every_required_panel_through_a_datasource_variable() {
    let dash: Value = serde_json::from_str(&read_repo_file("ops/grafana/im-engine.json")).expect("dashboard is JSON");
    let vars = dash["templating"]["list"].as_array().expect("template variables");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let mut ids = HashSet::new();
    let mut exprs = String::new();
    for panel in dash["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "panel ids are unique");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {} uses the variable", panel["title"]);
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has queries", panel["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    for required in [
        "im_stream_length",
        "im_stream_pending",
        "im_stream_oldest_pending_age_seconds",
        "im_stream_consumer_lag",
        "rate(im_gateway_appends_total",
        "rate(im_worker_saved_total",
        "rate(im_worker_delivered_total",
        "histogram_quantile(0.99, sum by (le) (rate(im_worker_accepted_to_saved_seconds_bucket",
        "im_worker_accepted_to_pushed_seconds_bucket",
        "im_worker_batch_size_bucket",
        "im_worker_insert_seconds_bucket",
        "im_gateway_errors_total",
        "im_gateway_connections",
        "im_gateway_fail_open_total",
        "im_gateway_server_busy_total",
        "im_worker_dead_letters_total",
        "im_gateway_subscription_up",
    ] {
        assert!(exprs.contains(required), "the dashboard should chart {required}");
    }
}

#[test]
fn the_alert_rules_pass_promtool() {
    ensure_prometheus_installed();
    let rules = repo_file("ops/prometheus/alerts.yml");
    let out = std::process::Command::new("promtool").arg("check").arg("rules").arg(&rules).output().expect("promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check rules: {text}");
    assert!(text.contains(&format!("SUCCESS: {} rules found", alert_count())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_config_and_every_live_metrics_page_which_has_every_metric_panels_and_rules_use() {
    ensure_prometheus_installed();
    let env = TestEnv::new("promtool");
    let (c, keys, targets) = start_observed_cluster(&env).await;

    // The scrape config, rendered with the targets file of this running cluster.
    let config_path = c.state.dir.join("prometheus.yml");
    std::fs::write(&config_path, render_prometheus_config(&targets, &repo_file("ops/prometheus/alerts.yml"))).unwrap();
    let (code, text) = promtool(&["check", "config", config_path.to_str().unwrap()], "").await;
    assert_eq!(code, 0, "promtool check config: {text}");
    assert!(!text.contains("WARNING"), "the targets file must exist and parse: {text}");

    generate_traffic(&c, &keys, || async {}).await;
    // Gauges refresh once a second; let every process show its latest series.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut families = Families::default();
    for url in metrics_urls(&c) {
        let (status, page) = http::get(&url).await.expect("metrics answer");
        assert_eq!(status, 200, "{url}");
        families.add_page(&page);
        let (code, text) = promtool(&["check", "metrics"], &page).await;
        // Exit 1 is a page promtool cannot parse; 3 is lint findings. The exporter writes no HELP
        // lines (nothing describes the metrics yet), so "no help text" is the one finding allowed.
        let findings: Vec<&str> =
            text.lines().filter(|l| !l.trim().is_empty() && !l.ends_with("no help text")).collect();
        assert!(
            code == 0 || (code == 3 && findings.is_empty()),
            "promtool check metrics {url} (exit {code}): {findings:#?}"
        );
    }

    let rules = read_repo_file("ops/prometheus/alerts.yml");
    let rule_exprs = rule_expressions(&rules);
    assert_eq!(rule_exprs.len(), alert_count(), "every rule's expression is found: {rule_exprs:#?}");
    let used: BTreeSet<String> = rule_exprs
        .iter()
        .cloned()
        .chain(dashboard_queries().into_iter().map(|(_, e)| e))
        .flat_map(|e| metric_names_in(&e))
        .collect();
    assert!(used.len() >= 20, "names found in the expressions: {used:?}");
    let missing: Vec<&String> = used.iter().filter(|name| !families.has(name)).collect();
    assert!(missing.is_empty(), "metrics used by panels or rules but absent from the live scrape: {missing:?}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_cluster_and_reports_alerts_on_real_conditions() {
    ensure_prometheus_installed();
    let env = TestEnv::new("prometheus");
    let (c, keys, targets) = start_observed_cluster(&env).await;
    let dir = c.state.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("alerts-firing-at-once.yml");
    std::fs::write(&rules_path, rules_firing_at_once()).unwrap();
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, render_prometheus_config(&targets, &rules_path)).unwrap();
    let prom = Prometheus::start(&config_path, &dir).await;

    let up = prom.wait_query("up == 1", |r| r.len() == metrics_urls(&c).len()).await;
    assert_eq!(up.len(), metrics_urls(&c).len(), "every process is scraped: {up:?}");

    let scraped = &prom;
    generate_traffic(&c, &keys, move || async move {
        // The dead-letter counter must have been scraped at 0 before the dead letter.
        let seen = scraped.wait_query("im_worker_dead_letters_total{shard=\"0\"} == 0", |r| !r.is_empty()).await;
        assert!(!seen.is_empty(), "Prometheus scraped the dead-letter counter");
    })
    .await;

    // The backlog series, per shard: streams from the owners, the unsaved backlog from the gateways.
    let lengths = prom.wait_query("im_stream_length", |r| r.len() == 4).await;
    let label = |s: &Value, l: &str| s["metric"][l].as_str().unwrap_or("").to_owned();
    let mut seen: Vec<(String, String)> = lengths.iter().map(|s| (label(s, "shard"), label(s, "stream"))).collect();
    seen.sort();
    let want = [("0", "accepted"), ("0", "to_save"), ("1", "accepted"), ("1", "to_save")];
    assert_eq!(
        seen,
        want.map(|(s, t)| (s.to_owned(), t.to_owned())),
        "im_stream_length per shard and stream: {lengths:?}"
    );
    let orphan = ORPHAN_SHARD.to_string();
    let orphan_backlog = |r: &[Value]| {
        r.iter()
            .find(|s| s["metric"]["shard"] == orphan.as_str())
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
    };
    let backlog = prom
        .wait_query("max by (shard) (im_gateway_shard_backlog)", |r| {
            r.len() == 3 && orphan_backlog(r).is_some_and(|b| b >= 3.0)
        })
        .await;
    assert!(
        backlog.len() == 3 && orphan_backlog(&backlog).is_some_and(|b| b >= 3.0),
        "backlog per shard, the orphan's past the bound: {backlog:?}"
    );

    // Alerts on the real conditions, and none where there is no condition.
    let expected = [
        ("ImShardWithoutLeaseOwner", orphan.clone()),
        ("ImDeadLetters", "0".to_owned()),
        ("ImGatewayFailingOpen", String::new()),
        ("ImServerErrorRatioHigh", String::new()),
    ];
    let fires = |alerts: &[(String, String, String)]| {
        expected.iter().all(|(name, shard)| {
            alerts.iter().any(|(n, s, state)| n == name && (shard.is_empty() || s == shard) && state == "firing")
        })
    };
    let prom_ref = &prom;
    let fired = poll::until(PROMETHEUS_WAIT, || async move {
        let alerts = prom_ref.alerts().await;
        fires(&alerts).then_some(alerts)
    })
    .await;
    let alerts = match fired {
        Some(alerts) => alerts,
        None => prom.alerts().await,
    };
    for (name, shard) in &expected {
        assert!(
            alerts.iter().any(|(n, s, state)| n == name && (shard.is_empty() || s == shard) && state == "firing"),
            "{name} {shard} should fire: {alerts:?}"
        );
    }
    assert!(
        !alerts.iter().any(|(n, s, _)| n == "ImShardWithoutLeaseOwner" && *s != orphan),
        "owned shards have an owner: {alerts:?}"
    );
    for quiet in ["ImGatewaySubscriptionDown", "ImProcessDown", "ImSaveLagHigh", "ImShardBacklogGrowing"] {
        assert!(!alerts.iter().any(|(n, _, _)| n == quiet), "{quiet} has no reason to fire: {alerts:?}");
    }

    // Every rule loaded and evaluated cleanly.
    let groups = prom.api("rules").await;
    let rules: Vec<Value> = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), alert_count(), "every rule is loaded");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule {} evaluates: {rule}", rule["name"]);
    }

    // Every dashboard query parses and shows data.
    for (panel, expr) in dashboard_queries() {
        let result = prom.wait_query(&expr, |r| !r.is_empty()).await;
        assert!(!result.is_empty(), "panel {panel:?}: no data for {expr}");
    }
    drop(prom);
    drop(c);
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names_in("sum by (le) (rate(im_a_bucket{x=\"im_not\"}[1m])) / im_b and nim_c");
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["im_a_bucket", "im_b", "im_not"]);
    let exprs = rule_expressions(
        "  - alert: A\n    expr: |\n      im_x > 0\n      and im_y\n    for: 1m\n  - alert: B\n    expr: im_z == 0\n",
    );
    assert_eq!(exprs, ["im_x > 0\nand im_y", "im_z == 0"]);
}
