//! The load sweep: raise the offered rate of one mode step by step until a step fails, write a
//! report per step, the summary and the chart.

use super::*;

/// The load sweep of one mode.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    pub cluster: ClusterOptions,
    /// Connections, body, warm-up, duration, drain; the interval is set from each step's rate.
    pub load: LoadSpec,
    pub mode: Mode,
    /// Offered rates in msg/s, ascending.
    pub rates: Vec<f64>,
    /// When a step passes.
    pub bounds: StepBounds,
    pub out: PathBuf,
    pub command: String,
}

/// One step of a sweep.
#[derive(Debug, Clone)]
pub struct SweepStep {
    pub rate: f64,
    pub run: FinishedRun,
    /// Why the step does not count as sustained (`None`: it does).
    pub failure: Option<String>,
}

/// Why a step at `offered` msg/s is not sustainable, if it is not.
pub fn step_failure(report: &RunReport, bounds: &StepBounds) -> Option<String> {
    let m = &report.messages.counts;
    let l = &report.latency_ms;
    let latencies = [
        ("saved", l.saved.p99, Some(bounds.saved_p99_ms)),
        ("accepted", l.accepted.p99, bounds.accepted_p99_ms),
        ("e2e", l.e2e.p99, bounds.e2e_p99_ms),
    ];
    for (name, p99, bound) in latencies {
        if let Some(bound) = bound.filter(|&b| p99 > b) {
            return Some(format!("{name} p99 {p99:.1} ms > {bound} ms"));
        }
    }
    if m.lost + m.undelivered_receiver_gone > 0 {
        return Some(format!("{} messages lost", m.lost + m.undelivered_receiver_gone));
    }
    if report.errors_total() > 0 {
        return Some(format!("{} errors", report.errors_total()));
    }
    if let Some(db) = &report.db {
        if db.missing + db.duplicated > 0 {
            return Some(format!("DB: {} missing, {} duplicated", db.missing, db.duplicated));
        }
    }
    // The generator must actually offer the load, or the step measures the bench, not the engine.
    if !report.load.closed_loop && report.rates.sent < 0.95 * report.rates.offered {
        return Some(format!("bench sent only {:.0} of {:.0} msg/s offered", report.rates.sent, report.rates.offered));
    }
    None
}

/// Raises the offered rate step by step until a step fails; the last passing rate is the maximum
/// sustainable one. Returns the steps in order.
pub async fn sweep(spec: &SweepSpec) -> Result<Vec<SweepStep>, BenchError> {
    if spec.rates.is_empty() || spec.rates.iter().any(|&r| r <= 0.0 || !r.is_finite()) {
        return Err(BenchError::InvalidSpec("--rates must list positive msg/s values".into()));
    }
    std::fs::create_dir_all(&spec.out).map_err(io(format!("create {}", spec.out.display())))?;
    let tag = format!("{}_sweep_{}", compact_stamp(im_common::ids::now_ms() / 1000), spec.mode.as_str());
    let dir = spec.out.join("clusters").join(format!("sweep-{}", spec.mode.as_str()));
    let cluster = ManagedCluster::start(&spec.cluster, spec.mode, &dir, &tag).await?;
    let target = Target::from_state(cluster.state())?;
    let rate_limit = f64::from(spec.cluster.config.gateway.rate_per_sec);
    let mut steps = Vec::new();
    for &rate in &spec.rates {
        let mut load = spec.load.clone();
        load.interval = LoadSpec::interval_for_rate(load.pairs(), rate);
        load.closed_loop = false;
        load.base_uid = None;
        load.label = format!("{} @ {rate:.0}/s", spec.mode.as_str());
        load.validate()?;
        let per_connection = rate / load.pairs() as f64;
        if per_connection > rate_limit {
            eprintln!(
                "warning: {per_connection:.0} msg/s per sender exceeds the gateway rate limit ({rate_limit}/s); \
                 expect too_many_requests (use more --connections)"
            );
        }
        let report = crate::run(&target, &load).await?;
        let file = spec.out.join(sweep_step_file(spec.mode, rate));
        write_json(&file, &report)?;
        let failure = step_failure(&report, &spec.bounds);
        eprintln!(
            "step {rate:>8.0}/s: sent {:.0}/s saved {:.0}/s; accepted p99 {:.1} ms, saved p99 {:.1} ms, e2e p99 {:.1} ms; \
             cpu {} µs/msg → {}",
            report.rates.sent,
            report.rates.saved,
            report.latency_ms.accepted.p99,
            report.latency_ms.saved.p99,
            report.latency_ms.e2e.p99,
            report.cpu.cluster_us_per_msg.map_or("–".into(), |u| format!("{u:.0}")),
            failure.as_deref().unwrap_or("ok"),
        );
        let stop = failure.is_some();
        steps.push(SweepStep { rate, run: FinishedRun { label: load.label, report, file }, failure });
        if stop {
            break;
        }
        tokio::time::sleep(SETTLE).await;
    }
    cluster.stop(spec.cluster.keep_data).await?;
    let path = spec.out.join(format!("sweep-{}.md", spec.mode.as_str()));
    std::fs::write(&path, sweep_summary(spec, &steps)).map_err(io(format!("write {}", path.display())))?;
    write_sweep_chart(spec, &steps);
    Ok(steps)
}

/// `sweep-<mode>-<rate>.json`: one step of a sweep in the run directory.
fn sweep_step_file(mode: Mode, rate: f64) -> String {
    format!("sweep-{}-{rate:.0}.json", mode.as_str())
}

/// The mode and rate in a [`sweep_step_file`] name.
fn parse_sweep_step_file(name: &str) -> Option<(Mode, f64)> {
    let (mode, rate) = name.strip_prefix("sweep-")?.strip_suffix(".json")?.rsplit_once('-')?;
    Some((Mode::parse(mode)?, rate.parse().ok()?))
}

/// Draws `sweep.svg`: this sweep's steps and, one line per mode, those of other modes' sweeps already
/// in the run directory (the title's connection count is this sweep's).
fn write_sweep_chart(spec: &SweepSpec, steps: &[SweepStep]) {
    let points = steps.iter().map(|s| SweepPoint::of(s.rate, &s.run.report, s.failure.is_some())).collect();
    let mut series = other_modes_sweeps(&spec.out, spec.mode, &spec.bounds);
    series.push(SweepSeries { mode: spec.mode.as_str().to_owned(), points });
    series.sort_by_key(|s| Mode::parse(&s.mode).map(|m| m as u8));
    let heading = chart_heading("bench sweep", &spec.load);
    write_chart(&spec.out.join("sweep.svg"), chart::sweep_svg(&heading, &series));
}

/// The sweep steps of modes other than `mode` found in `dir`, judged by this sweep's bounds. This
/// mode's files are left out: the sweep just run replaces them, and an earlier sweep of the same
/// mode may have left steps this one did not reach.
fn other_modes_sweeps(dir: &Path, mode: Mode, bounds: &StepBounds) -> Vec<SweepSeries> {
    let mut by_mode: BTreeMap<&str, Vec<SweepPoint>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some((other, rate)) = name.to_str().and_then(parse_sweep_step_file) else { continue };
        if other == mode {
            continue;
        }
        let path = entry.path();
        let read = std::fs::read_to_string(&path).map_err(|e| e.to_string());
        match read.and_then(|json| serde_json::from_str::<RunReport>(&json).map_err(|e| e.to_string())) {
            Ok(report) => {
                let failed = step_failure(&report, bounds).is_some();
                by_mode.entry(other.as_str()).or_default().push(SweepPoint::of(rate, &report, failed));
            }
            Err(e) => eprintln!("warning: {} left off the chart: {e}", path.display()),
        }
    }
    by_mode
        .into_iter()
        .map(|(mode, mut points)| {
            points.sort_by(|a, b| a.offered.total_cmp(&b.offered));
            SweepSeries { mode: mode.to_owned(), points }
        })
        .collect()
}

/// The highest offered rate of the steps that passed, before the first that failed.
pub fn max_sustainable(steps: &[SweepStep]) -> Option<f64> {
    steps.iter().take_while(|s| s.failure.is_none()).map(|s| s.rate).last()
}

fn sweep_summary(spec: &SweepSpec, steps: &[SweepStep]) -> String {
    let mut out = format!(
        "# bench sweep, {} mode, {}\n\n`{}`\n\n- machine: {}\n- cluster: {} gateways, {} shards; Redis {}\n- {} connections, {} B bodies, \
         {} s warm-up, {} s measured per step; bound: {}, no errors, nothing lost\n\n",
        spec.mode.as_str(),
        human_stamp(im_common::ids::now_ms() / 1000),
        spec.command,
        machine_summary(),
        spec.cluster.gateways,
        spec.cluster.shards,
        redis_summary(&spec.cluster),
        spec.load.pairs() * 2,
        spec.load.body_bytes,
        spec.load.warmup.as_secs(),
        spec.load.duration.as_secs(),
        spec.bounds,
    );
    let rows: Vec<(String, &RunReport)> = steps.iter().map(|s| (format!("{:.0}/s", s.rate), &s.run.report)).collect();
    out.push_str(&markdown_table(&rows));
    out.push('\n');
    for s in steps {
        out.push_str(&format!("- {:.0}/s: {}\n", s.rate, s.failure.as_deref().unwrap_or("sustained")));
    }
    match max_sustainable(steps) {
        Some(rate) => out.push_str(&format!("\n**Maximum sustainable rate: {rate:.0} msg/s**\n")),
        None => out.push_str("\n**No step was sustainable.**\n"),
    }
    out.push_str(&redis_nodes_section(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_step_files_name_their_mode_and_rate() {
        let name = sweep_step_file(Mode::AcceptedOnly, 5000.0);
        assert_eq!(name, "sweep-accepted-only-5000.json");
        assert_eq!(parse_sweep_step_file(&name).map(|(m, r)| (m.as_str(), r)), Some(("accepted-only", 5000.0)));
        assert!(parse_sweep_step_file("sweep-full.md").is_none());
        assert!(parse_sweep_step_file("full-1.json").is_none());
    }

    /// A sweep step's report: everything sustained except what `saved_p99_ms` says.
    fn step_report(mode: Mode, offered: f64, saved_p99_ms: f64) -> RunReport {
        use crate::recorder::Percentiles;
        use crate::report::{ConnectionReport, CpuReport, Latencies, LoadSummary, MessageCounts, Rates};
        let p99 = |ms: f64| Percentiles { count: 100, p99: ms, ..Default::default() };
        RunReport {
            mode: mode.as_str().to_owned(),
            started_at_ms: 0,
            base_uid: 1,
            load: LoadSummary {
                connections: 2,
                senders: 1,
                gateways: 1,
                interval_ms: 1.0,
                closed_loop: false,
                body_bytes: 64,
                settle_secs: 0.0,
                warmup_secs: 0.0,
                duration_secs: 1.0,
                drain_secs: 1.0,
                drain_used_secs: 0.0,
                auth: "header".into(),
                encoding: "json".into(),
                acks: "seq".into(),
                ack_read: false,
                two_devices: 0.0,
            },
            connections: ConnectionReport {
                connect_ok: 2,
                connect_fail: 0,
                auth_ok: 2,
                auth_fail: 0,
                connect_ms: Percentiles::default(),
            },
            messages: MessageCounts {
                counts: Default::default(),
                ack_accepted_pct: 100.0,
                ack_saved_pct: 100.0,
                error_pct: 0.0,
            },
            latency_ms: Latencies { accepted: p99(1.0), saved: p99(saved_p99_ms), e2e: p99(2.0), send_lag: p99(0.1) },
            rates: Rates { offered, sent: offered, saved: offered, delivered: offered },
            errors_by_reason: Default::default(),
            db: None,
            recipients: Default::default(),
            cpu: CpuReport {
                window_secs: 1.0,
                cores: 2,
                processes: vec![],
                cluster_cpu_secs: 0.0,
                bench_cpu_secs: None,
                cluster_us_per_msg: None,
            },
            redis_nodes: vec![],
        }
    }

    #[test]
    fn a_step_fails_on_the_first_latency_past_its_bound_and_unset_bounds_do_not_count() {
        let report = step_report(Mode::Full, 1000.0, 100.0); // accepted p99 1 ms, E2E p99 2 ms
        assert_eq!(step_failure(&report, &StepBounds::saved_within(250.0)), None);
        assert_eq!(step_failure(&report, &StepBounds::saved_within(50.0)).unwrap(), "saved p99 100.0 ms > 50 ms");
        let strict = StepBounds { saved_p99_ms: 250.0, accepted_p99_ms: Some(0.5), e2e_p99_ms: Some(1.5) };
        assert_eq!(step_failure(&report, &strict).unwrap(), "accepted p99 1.0 ms > 0.5 ms");
        let e2e_only = StepBounds { accepted_p99_ms: Some(5.0), ..strict };
        assert_eq!(step_failure(&report, &e2e_only).unwrap(), "e2e p99 2.0 ms > 1.5 ms");
        assert_eq!(e2e_only.to_string(), "saved p99 ≤ 250 ms, accepted p99 ≤ 5 ms, E2E p99 ≤ 1.5 ms");
    }

    #[test]
    fn the_sweep_chart_gathers_the_other_modes_swept_into_the_directory() {
        let dir = std::env::temp_dir().join(format!("bench-sweep-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (mode, rate, saved_p99) in
            [(Mode::Baseline, 5000.0, 900.0), (Mode::Baseline, 1000.0, 40.0), (Mode::Full, 40000.0, 30.0)]
        {
            write_json(&dir.join(sweep_step_file(mode, rate)), &step_report(mode, rate, saved_p99)).unwrap();
        }
        std::fs::write(dir.join(sweep_step_file(Mode::AcceptedOnly, 1000.0)), "not a report").unwrap();
        let series = other_modes_sweeps(&dir, Mode::Full, &StepBounds::saved_within(250.0));
        std::fs::remove_dir_all(&dir).unwrap();
        // The full sweep being drawn brings its own steps; the unreadable file is left off.
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].mode, "baseline");
        let steps: Vec<(f64, bool)> = series[0].points.iter().map(|p| (p.offered, p.failed)).collect();
        assert_eq!(steps, [(1000.0, false), (5000.0, true)]);
    }
}
