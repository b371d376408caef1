//! The live backlog page (`ops dashboard`) in a real browser. Headless Chromium loads the page the
//! cluster's own dashboard process serves, runs its polling script in virtual time, and dumps the DOM;
//! the test reads what was drawn from the data attributes every chart canvas carries after a draw
//! (`data-points`, `data-first`, `data-last`, `data-max` of its main series). The cluster runs on
//! private servers, so the test can stop MariaDB and watch the backlog grow, then restart it and watch
//! the backlog drain.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::{ops_on, spec, Client, TestEnv};
use im_common::config::Mode;
use im_common::shard::shard_of;
use im_harness::cluster::ClusterState;
use im_harness::{poll, process};

/// The same guarded install as `ops/test.sh`, plus waiting for the dpkg lock (a parallel test may be
/// installing its own packages).
const INSTALL_CHROMIUM: &str = "command -v chromium >/dev/null || (apt-get update -qq -o DPkg::Lock::Timeout=600 && \
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends chromium)";

/// Page time each load gets: about one `/api/status` poll per 1000 ms.
const PAGE_MS: u64 = 6000;

/// Installs Debian's `chromium` when it is missing (needs root, as the test suite runs).
fn ensure_chromium() {
    let status = Command::new("sh").arg("-c").arg(INSTALL_CHROMIUM).status().expect("run sh");
    assert!(status.success(), "installing chromium failed ({status}); run `apt-get install chromium` as root");
}

/// The DOM of the page after it ran for `page_ms` of virtual time.
struct Page {
    dom: String,
}

impl Page {
    /// Loads `url` in a fresh headless Chromium profile (blocking; seconds).
    fn load(url: &str, page_ms: u64) -> Page {
        static LOADS: AtomicUsize = AtomicUsize::new(0);
        let n = LOADS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("im-dashboard-browser-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profile")).expect("browser temp dir");
        let (dom_path, log_path) = (dir.join("dom.html"), dir.join("chromium.log"));
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]);
        cmd.arg(format!("--user-data-dir={}", dir.join("profile").display()));
        cmd.arg(format!("--virtual-time-budget={page_ms}")).arg("--dump-dom").arg(url);
        cmd.stdin(Stdio::null());
        cmd.stdout(std::fs::File::create(&dom_path).expect("dom file"));
        cmd.stderr(std::fs::File::create(&log_path).expect("log file"));
        // Its own process group, so a hung browser goes with all its helper processes.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("start chromium");
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for chromium") {
                break status;
            }
            if Instant::now() > deadline {
                // The browser and every helper it forked (their group; the browser is not reaped yet).
                process::kill_group_now(child.id());
                let _ = child.wait();
                panic!("chromium did not finish loading {url} within 120 s; log:\n{}", tail(&log_path));
            }
            std::thread::sleep(poll::MAX_PAUSE);
        };
        let dom = std::fs::read_to_string(&dom_path).unwrap_or_default();
        assert!(status.success() && dom.contains("</html>"), "chromium failed ({status}); log:\n{}", tail(&log_path));
        let _ = std::fs::remove_dir_all(&dir);
        Page { dom }
    }

    /// The attribute `name` of the element with id `id`.
    fn attr(&self, id: &str, name: &str) -> Option<&str> {
        let at = self.dom.find(&format!(" id=\"{id}\""))?;
        let start = self.dom[..at].rfind('<')?;
        let tag = &self.dom[start..at + self.dom[at..].find('>')?];
        let value_at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(&tag[value_at..value_at + tag[value_at..].find('"')?])
    }

    /// A numeric attribute; panics with the element when it is missing (the chart was never drawn).
    fn number(&self, id: &str, name: &str) -> f64 {
        let value = self.attr(id, name).unwrap_or_else(|| panic!("#{id} has no {name}: {}", self.tag(id)));
        value.parse().unwrap_or_else(|_| panic!("#{id} {name}={value:?} is not a number"))
    }

    /// The element's opening tag, for failure messages.
    fn tag(&self, id: &str) -> &str {
        let Some(at) = self.dom.find(&format!(" id=\"{id}\"")) else { return "<no such element>" };
        let start = self.dom[..at].rfind('<').unwrap_or(at);
        &self.dom[start..(at + self.dom[at..].find('>').unwrap_or(0) + 1).min(self.dom.len())]
    }

    /// The cell texts of the table row carrying `row_attr` (e.g. `data-shard="0"`).
    fn row(&self, row_attr: &str) -> Vec<String> {
        let Some(start) = self.dom.find(&format!("<tr {row_attr}>")) else { return Vec::new() };
        let row = &self.dom[start..start + self.dom[start..].find("</tr>").unwrap_or(0)];
        row.split("<td")
            .skip(1)
            .filter_map(|cell| Some(cell[cell.find('>')? + 1..cell.find("</td>")?].to_owned()))
            .collect()
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn load(url: String) -> Page {
    tokio::task::spawn_blocking(move || Page::load(&url, PAGE_MS)).await.expect("browser task")
}

/// The cluster's total backlog as `ops status` sees it.
async fn total_backlog(state: &ClusterState) -> f64 {
    im_harness::status::collect(state, Duration::from_millis(100)).await.shards.iter().map(|s| s.backlog).sum()
}

/// Reads `client`'s frames until it has `n` ACKs of `ack_type` (other frames skipped); returns how
/// many came within `wait`.
async fn count_acks(client: &mut Client, ack_type: &str, n: usize, wait: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    while seen < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_within(left).await {
            Some(v) => seen += usize::from(v["type"] == "ACK" && v["ackType"] == ack_type),
            None => break,
        }
    }
    seen
}

fn private_mariadb(state: &ClusterState) -> usize {
    state.private_servers.iter().position(|s| s.kind_name == "mariadb").expect("a private MariaDB")
}

/// A sender whose messages go to each shard, so every shard's chart has something to show.
fn sender_per_shard(shards: u16) -> Vec<u64> {
    (0..shards).map(|k| (9_001..).find(|uid| shard_of(*uid, shards) == k).expect("a uid on every shard")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_page_charts_a_backlog_that_grows_while_mariadb_is_down_and_drains_after() {
    tokio::task::spawn_blocking(ensure_chromium).await.expect("install task");
    let env = TestEnv::new("dashboard");
    let mut s = spec(&env, Mode::Full, 1, 2);
    s.force_private = true;
    s.config.gateway.rate_burst = 1000;
    let mut c = e2e::start(&s).await;
    let url =
        c.state.dashboard.as_ref().expect("the cluster started its dashboard (build target/debug/ops)").url.clone();

    // Healthy and idle: every chart drawn from several polls, owners and tokens in the table, no backlog.
    let status = im_harness::status::collect(&c.state, Duration::from_millis(100)).await;
    let page = load(url.clone()).await;
    for id in ["chart-total", "backlog-0", "backlog-1", "rates-0", "rates-1"] {
        assert!(page.number(id, "data-points") >= 3.0, "{id} was drawn from several polls: {}", page.tag(id));
    }
    assert_eq!(page.number("total-backlog", "data-value"), 0.0);
    assert_eq!(page.number("chart-total", "data-max"), 0.0);
    for shard in &status.shards {
        let row = page.row(&format!("data-shard=\"{}\"", shard.shard));
        let owner = shard.owner.clone().expect("every shard has an owner");
        let token = shard.fencing_token.expect("and a fencing token").to_string();
        assert_eq!(row.get(1..3), Some(&[owner, token][..]), "shard {} row: {row:?}", shard.shard);
    }
    let gateway = page.row("data-node=\"1\"");
    assert_eq!(gateway.get(1).map(String::as_str), Some("yes"), "gateway row: {gateway:?}");

    // MariaDB away: messages are still accepted and pile up unsaved.
    let db = private_mariadb(&c.state);
    c.state.private_servers[db].stop().await.unwrap();
    let ws = c.state.gateways[0].ws_url.clone();
    let mut senders = Vec::new();
    for uid in sender_per_shard(2) {
        senders.push(Client::connect(&ws, &c.state.jwt_secret, uid).await);
    }
    const BURST: usize = 150;
    for sender in &mut senders {
        for k in 0..BURST {
            sender.chat(9_999, &format!("burst{k:03}"), "while the database is down").await;
        }
    }
    for sender in &mut senders {
        assert_eq!(count_acks(sender, "accepted", BURST, Duration::from_secs(10)).await, BURST, "uid {}", sender.uid);
    }
    // The page's first sample should see the whole burst (workers refresh their gauges once a second).
    let state = &c.state;
    poll::until_true_async(Duration::from_secs(10), || async { total_backlog(state).await >= (2 * BURST) as f64 })
        .await;
    // Keep sending while the page loads, so its own history shows the growth.
    let browser = tokio::spawn(load(url.clone()));
    let mut sent = vec![BURST; senders.len()];
    while !browser.is_finished() {
        for (sender, sent) in senders.iter_mut().zip(&mut sent) {
            sender.chat(9_999, &format!("paced{sent:04}"), "still down").await;
            *sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = browser.await.unwrap();
    for (sender, sent) in senders.iter_mut().zip(&sent) {
        let more = sent - BURST;
        assert_eq!(count_acks(sender, "accepted", more, Duration::from_secs(10)).await, more, "uid {}", sender.uid);
    }
    let total_sent: usize = sent.iter().sum();
    let (first, last) = (page.number("chart-total", "data-first"), page.number("chart-total", "data-last"));
    println!("while MariaDB is down: {total_sent} sent, the page's total backlog went {first} -> {last}");
    assert!(last > first && first >= (2 * BURST) as f64, "the backlog grows within one page load: {first} -> {last}");
    assert_eq!(page.number("total-backlog", "data-value"), last, "the total shown is the chart's last point");
    for k in 0..2 {
        let id = format!("backlog-{k}");
        assert!(page.number(&id, "data-last") >= BURST as f64, "shard {k} backlog: {}", page.tag(&id));
        let rates = format!("rates-{k}");
        assert!(page.number(&rates, "data-max") > 0.0, "shard {k} accepted rate drawn: {}", page.tag(&rates));
        assert_eq!(page.attr(&rates, "data-last-saved_per_sec"), Some("0.0"), "nothing saved: {}", page.tag(&rates));
    }

    // MariaDB back: everything is saved and the page shows the backlog gone.
    c.state.private_servers[db] = c.state.private_servers[db].restart().await.unwrap();
    c.save().unwrap(); // so that `ops down` below finds the restarted server
    for (sender, sent) in senders.iter_mut().zip(&sent) {
        assert_eq!(count_acks(sender, "saved", *sent, Duration::from_secs(60)).await, *sent, "uid {}", sender.uid);
    }
    let state = &c.state;
    poll::until_true_async(Duration::from_secs(20), || async { total_backlog(state).await == 0.0 }).await;
    let page = load(url.clone()).await;
    println!("after MariaDB returned: the page's total backlog is {}", page.number("total-backlog", "data-value"));
    assert_eq!(page.number("total-backlog", "data-value"), 0.0);
    for id in ["chart-total", "backlog-0", "backlog-1"] {
        assert_eq!(page.number(id, "data-last"), 0.0, "{id} drained: {}", page.tag(id));
    }

    // `ops down` stops the dashboard with the rest.
    let dashboard_pid = c.state.dashboard.as_ref().map(|d| d.pid).unwrap_or_default();
    ops_on(&c, "down", &[]).await;
    assert!(!process::is_alive(dashboard_pid), "the dashboard stopped with the cluster");
    drop(c);
}
