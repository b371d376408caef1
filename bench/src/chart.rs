//! SVG charts of a sweep and of a comparison, written into the run directory beside the markdown.
//!
//! Drawing only: [`sweep_svg`] and [`compare_svg`] take the numbers to show ([`SweepSeries`] per
//! mode, [`CompareArm`] per arm) and return the SVG text. Which runs the numbers come from and where
//! the file goes is [`crate::compare`]'s business, so the charts are tested on made-up numbers
//! without a cluster. plotters' SVG backend writes every label as a `<text>` element that the
//! viewer's fonts render, so neither building nor drawing needs a font file.
//!
//! A mode keeps its colour in every chart, so a sweep and a comparison read alike side by side.

use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::recorder::Percentiles;
use crate::report::RunReport;

const WIDTH: u32 = 960;
/// Height of one of the two stacked panels; the title takes what it needs above them.
const PANEL_HEIGHT: u32 = 440;
const TITLE_HEIGHT: u32 = 44;
const FONT: &str = "sans-serif";
/// The y = x reference of the throughput panel.
const REFERENCE_GREY: RGBColor = RGBColor(140, 140, 140);

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// No run has anything to draw.
    #[error("no run to draw")]
    Empty,
    /// plotters refused to draw (it writes into a string, so this is never a file error).
    #[error("drawing the chart: {0}")]
    Draw(String),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ChartError {
    fn from(e: DrawingAreaErrorKind<E>) -> ChartError {
        ChartError::Draw(e.to_string())
    }
}

/// What a chart's title says besides the modes it shows.
#[derive(Debug, Clone)]
pub struct Heading {
    /// `bench sweep`, `bench compare`.
    pub command: String,
    /// When, e.g. `2026-11-28 16:00:00 UTC`.
    pub date: String,
    /// Connections of the load (senders and receivers).
    pub connections: usize,
}

impl Heading {
    fn title<'a>(&self, modes: impl IntoIterator<Item = &'a str>) -> String {
        let modes: Vec<&str> = modes.into_iter().collect();
        format!("{}: {} · {} · {} connections", self.command, modes.join(", "), self.date, self.connections)
    }
}

/// One step of a sweep as the chart shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Offered rate, msg/s: the x axis.
    pub offered: f64,
    /// Saved over the measured window, msg/s.
    pub saved_rate: f64,
    /// p99 of send → `ACK(saved)`, ms; `None` when nothing was measured (a log axis has no zero).
    pub saved_p99_ms: Option<f64>,
    /// p99 of send → recipient's push, ms; `None` when nothing was measured.
    pub e2e_p99_ms: Option<f64>,
    /// The step was not sustained: its marks are drawn hollow.
    pub failed: bool,
}

impl SweepPoint {
    /// The step at `offered` msg/s that measured `report`.
    pub fn of(offered: f64, report: &RunReport, failed: bool) -> SweepPoint {
        SweepPoint {
            offered,
            saved_rate: report.rates.saved,
            saved_p99_ms: p99(&report.latency_ms.saved),
            e2e_p99_ms: p99(&report.latency_ms.e2e),
            failed,
        }
    }
}

/// The steps of one mode's sweep, in ascending offered rate: one line per chart panel.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSeries {
    pub mode: String,
    pub points: Vec<SweepPoint>,
}

/// One run of a comparison arm as the chart shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmRun {
    /// p99 of send → `ACK(accepted)`, ms; `None` when not measured (baseline has no such ACK).
    pub accepted_p99_ms: Option<f64>,
    /// p99 of send → `ACK(saved)`, ms.
    pub saved_p99_ms: Option<f64>,
    /// p99 of send → recipient's push, ms.
    pub e2e_p99_ms: Option<f64>,
    /// Cluster CPU per message sent, µs.
    pub cpu_us_per_msg: Option<f64>,
}

impl ArmRun {
    /// What the chart shows of `report`.
    pub fn of(report: &RunReport) -> ArmRun {
        ArmRun {
            accepted_p99_ms: p99(&report.latency_ms.accepted),
            saved_p99_ms: p99(&report.latency_ms.saved),
            e2e_p99_ms: p99(&report.latency_ms.e2e),
            cpu_us_per_msg: report.cpu.cluster_us_per_msg,
        }
    }
}

/// The runs of one arm (several with `--repeats`): bars show their mean, dots each run.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareArm {
    pub mode: String,
    pub runs: Vec<ArmRun>,
}

/// The latencies of the comparison's first panel: name, value, bar colour.
type Metric = (&'static str, fn(&ArmRun) -> Option<f64>, RGBColor);

const LATENCY_METRICS: [Metric; 3] = [
    ("accepted p99", |r| r.accepted_p99_ms, RGBColor(23, 190, 207)),
    ("saved p99", |r| r.saved_p99_ms, RGBColor(31, 59, 115)),
    ("E2E p99", |r| r.e2e_p99_ms, RGBColor(214, 39, 40)),
];

/// p99 of a latency, if any message was measured.
fn p99(p: &Percentiles) -> Option<f64> {
    (p.count > 0 && p.p99 > 0.0).then_some(p.p99)
}

/// A mode's colour, the same in every chart.
fn mode_colour(mode: &str) -> RGBColor {
    match mode {
        "baseline" => RGBColor(31, 119, 180),
        "accepted-only" => RGBColor(255, 127, 14),
        "full" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// The same hue nearer white: a mode's second line (E2E) in the latency panel.
fn lighter(c: RGBColor) -> RGBColor {
    let up = |v: u8| v + ((255 - v) as f32 * 0.5) as u8;
    RGBColor(up(c.0), up(c.1), up(c.2))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Chart<'a, 'b, X, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>;

/// The sweep chart: p99 latencies (log scale) over offered rate above, saved rate over offered rate
/// below, one line per mode in each; hollow marks for steps that were not sustained.
pub fn sweep_svg(heading: &Heading, series: &[SweepSeries]) -> Result<String, ChartError> {
    let x_max = series.iter().flat_map(|s| &s.points).map(|p| p.offered).fold(0.0, f64::max);
    if x_max <= 0.0 {
        return Err(ChartError::Empty);
    }
    let x_max = x_max * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, TITLE_HEIGHT + 2 * PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(&heading.title(series.iter().map(|s| s.mode.as_str())), (FONT, 22))?;
        let (upper, lower) = body.split_vertically(PANEL_HEIGHT);
        latency_panel(&upper, series, x_max)?;
        throughput_panel(&lower, series, x_max)?;
        root.present()?;
    }
    Ok(svg)
}

fn latency_panel(area: &Area, series: &[SweepSeries], x_max: f64) -> Result<(), ChartError> {
    let latencies = series.iter().flat_map(|s| &s.points).flat_map(|p| [p.saved_p99_ms, p.e2e_p99_ms]).flatten();
    let (lo, hi) = log_bounds(latencies);
    let mut chart = panel(area, "p99 latency by offered load (hollow: step not sustained)")
        .build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered rate (msg/s)")
        .y_desc("p99 latency (ms, log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    for s in series {
        let colour = mode_colour(&s.mode);
        line(&mut chart, &s.points, |p| p.saved_p99_ms, colour, &format!("{} saved p99", s.mode))?;
        line(&mut chart, &s.points, |p| p.e2e_p99_ms, lighter(colour), &format!("{} E2E p99", s.mode))?;
    }
    legend(&mut chart)
}

fn throughput_panel(area: &Area, series: &[SweepSeries], x_max: f64) -> Result<(), ChartError> {
    let y_max = series.iter().flat_map(|s| &s.points).map(|p| p.saved_rate * 1.05).fold(x_max, f64::max);
    let mut chart = panel(area, "saved rate by offered load").build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("offered rate (msg/s)")
        .y_desc("saved rate (msg/s)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    let reference = REFERENCE_GREY.stroke_width(1);
    chart
        .draw_series(DashedLineSeries::new([(0.0, 0.0), (x_max, x_max)], 8, 6, reference))?
        .label("saved = offered")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], reference));
    for s in series {
        line(&mut chart, &s.points, |p| Some(p.saved_rate), mode_colour(&s.mode), &format!("{} saved", s.mode))?;
    }
    legend(&mut chart)
}

/// One series as a line with a mark per step: filled where sustained, hollow where not. Steps
/// without a value are left out.
fn line<Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<RangedCoordf64, Y>,
    points: &[SweepPoint],
    y: impl Fn(&SweepPoint) -> Option<f64>,
    colour: RGBColor,
    label: &str,
) -> Result<(), ChartError> {
    let marks: Vec<(f64, f64, bool)> = points.iter().filter_map(|p| Some((p.offered, y(p)?, p.failed))).collect();
    let style = colour.stroke_width(2);
    chart
        .draw_series(LineSeries::new(marks.iter().map(|&(x, y, _)| (x, y)), style))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    chart.draw_series(marks.iter().map(|&(x, y, failed)| {
        Circle::new((x, y), 4, if failed { colour.stroke_width(2) } else { colour.filled() })
    }))?;
    Ok(())
}

/// The comparison chart: mean p99 latencies per arm (accepted, saved, E2E side by side) above,
/// cluster CPU per message below; with repeats, a dot per run on each bar.
pub fn compare_svg(heading: &Heading, arms: &[CompareArm]) -> Result<String, ChartError> {
    if arms.iter().all(|a| a.runs.is_empty()) {
        return Err(ChartError::Empty);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, TITLE_HEIGHT + 2 * PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(&heading.title(arms.iter().map(|a| a.mode.as_str())), (FONT, 22))?;
        let (upper, lower) = body.split_vertically(PANEL_HEIGHT);
        latency_bars(&upper, arms)?;
        cpu_bars(&lower, arms)?;
        root.present()?;
    }
    Ok(svg)
}

fn latency_bars(area: &Area, arms: &[CompareArm]) -> Result<(), ChartError> {
    let top = arms.iter().flat_map(|a| &a.runs).flat_map(|r| LATENCY_METRICS.map(|(_, value, _)| value(r))).flatten();
    // Headroom for the legend above the tallest bar.
    let y_max = top.fold(1.0, f64::max) * 1.4;
    let mut chart = panel(area, "p99 latency per mode").build_cartesian_2d(arm_axis(arms.len()), 0.0..y_max)?;
    arm_mesh(&mut chart, arms, "p99 latency (ms)")?;
    for (i, &(name, value, colour)) in LATENCY_METRICS.iter().enumerate() {
        let offset = (i as f64 - 1.0) * 0.27;
        let bars: Vec<_> = arms.iter().enumerate().map(|(a, arm)| (a as f64 + offset, values(arm, value))).collect();
        chart
            .draw_series(bars.iter().filter_map(|(x, v)| Some(bar(*x, 0.25, mean(v)?, colour))))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        for (x, v) in &bars {
            annotate(&mut chart, *x, v, |m| format!("{m:.1}"))?;
        }
    }
    legend(&mut chart)
}

fn cpu_bars(area: &Area, arms: &[CompareArm]) -> Result<(), ChartError> {
    let cpu = |r: &ArmRun| r.cpu_us_per_msg;
    let y_max = arms.iter().flat_map(|a| &a.runs).filter_map(cpu).fold(1.0, f64::max) * 1.15;
    let mut chart = panel(area, "cluster CPU per message").build_cartesian_2d(arm_axis(arms.len()), 0.0..y_max)?;
    arm_mesh(&mut chart, arms, "cluster CPU (µs/msg)")?;
    for (a, arm) in arms.iter().enumerate() {
        let v = values(arm, cpu);
        if let Some(m) = mean(&v) {
            chart.draw_series([bar(a as f64, 0.5, m, mode_colour(&arm.mode))])?;
        }
        annotate(&mut chart, a as f64, &v, |m| format!("{m:.0} µs"))?;
    }
    Ok(())
}

/// The categorical x axis of a comparison: arm `i` is centred on `i`, half a step of room each side.
fn arm_axis(arms: usize) -> std::ops::Range<f64> {
    -0.5..arms as f64 - 0.5
}

/// Axes of a comparison panel. The x labels are the modes: with at most one label per arm over
/// [`arm_axis`], plotters' round-number steps land on the whole numbers, and anything else stays blank.
fn arm_mesh(
    chart: &mut Chart<RangedCoordf64, RangedCoordf64>,
    arms: &[CompareArm],
    y_desc: &str,
) -> Result<(), ChartError> {
    let name = |x: &f64| {
        let i = x.round();
        let arm = if (x - i).abs() < 1e-6 && i >= 0.0 { arms.get(i as usize) } else { None };
        arm.map_or(String::new(), |a| a.mode.clone())
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(arms.len())
        .x_desc("mode")
        .y_desc(y_desc)
        .x_label_formatter(&name)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;
    Ok(())
}

/// The mean over the runs and a dot per run (when there are several), or `n/a` when nothing was
/// measured, written above a bar centred on `x`.
fn annotate(
    chart: &mut Chart<RangedCoordf64, RangedCoordf64>,
    x: f64,
    runs: &[f64],
    text: impl Fn(f64) -> String,
) -> Result<(), ChartError> {
    let above = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let label = mean(runs).map_or("n/a".to_owned(), &text);
    let top = runs.iter().copied().fold(mean(runs).unwrap_or(0.0), f64::max);
    // A few pixels up, clear of the highest dot.
    chart.draw_series([EmptyElement::at((x, top)) + Text::new(label, (0, -4), above)])?;
    if runs.len() > 1 {
        chart.draw_series(runs.iter().map(|&v| Circle::new((x, v), 3, BLACK.filled())))?;
    }
    Ok(())
}

fn bar(x: f64, width: f64, height: f64, colour: RGBColor) -> Rectangle<(f64, f64)> {
    Rectangle::new([(x - width / 2.0, 0.0), (x + width / 2.0, height)], colour.filled())
}

fn values(arm: &CompareArm, value: impl Fn(&ArmRun) -> Option<f64>) -> Vec<f64> {
    arm.runs.iter().filter_map(value).collect()
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// A panel's frame: caption, margins and room for the axis labels.
fn panel<'a, 'b>(area: &'a Area<'b>, caption: &str) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder.caption(caption, (FONT, 17)).margin(14).x_label_area_size(48).y_label_area_size(70);
    builder
}

fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(chart: &mut Chart<'a, 'b, X, Y>) -> Result<(), ChartError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 13))
        .draw()?;
    Ok(())
}

/// A log axis range around the positive `values`, with room above and below (1–10 ms when none).
fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > 0.0 {
        (lo / 1.5, hi * 1.5)
    } else {
        (1.0, 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heading(command: &str) -> Heading {
        Heading { command: command.into(), date: "2026-11-28 16:00:00 UTC".into(), connections: 2000 }
    }

    fn step(offered: f64, saved_rate: f64, saved_p99: f64, e2e_p99: f64, failed: bool) -> SweepPoint {
        SweepPoint { offered, saved_rate, saved_p99_ms: Some(saved_p99), e2e_p99_ms: Some(e2e_p99), failed }
    }

    fn two_modes() -> Vec<SweepSeries> {
        vec![
            SweepSeries {
                mode: "baseline".into(),
                points: vec![
                    step(1000.0, 1000.0, 40.0, 42.0, false),
                    step(5000.0, 4990.0, 90.0, 95.0, false),
                    step(10000.0, 7000.0, 900.0, 950.0, true),
                ],
            },
            SweepSeries {
                mode: "full".into(),
                points: vec![
                    step(1000.0, 1000.0, 30.0, 5.0, false),
                    step(5000.0, 5000.0, 35.0, 6.0, false),
                    step(10000.0, 9980.0, 60.0, 8.0, false),
                    step(20000.0, 15000.0, 700.0, 40.0, true),
                ],
            },
        ]
    }

    /// `(stroke colour, number of points)` of every `<polyline>`.
    fn polylines(svg: &str) -> Vec<(String, usize)> {
        svg.split("<polyline")
            .skip(1)
            .map(|tag| (attr(tag, "stroke"), attr(tag, "points").split_whitespace().count()))
            .collect()
    }

    /// The content of every `<text>` element, trimmed.
    fn texts(svg: &str) -> impl Iterator<Item = &str> {
        svg.split("<text").skip(1).filter_map(|tag| Some(tag.split_once('>')?.1.split("</text>").next()?.trim()))
    }

    fn attr(tag: &str, name: &str) -> String {
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        let start = tag.find(&format!(" {name}=\"")).map(|i| i + name.len() + 3);
        start.map_or(String::new(), |s| tag[s..].split('"').next().unwrap_or_default().to_owned())
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// Polylines in `colour` with exactly `points` points: data lines, not legend samples.
    fn lines_of(svg: &str, colour: RGBColor, points: usize) -> usize {
        polylines(svg).iter().filter(|(stroke, n)| stroke.eq_ignore_ascii_case(&hex(colour)) && *n == points).count()
    }

    #[test]
    fn a_sweep_chart_labels_its_axes_and_names_every_mode() {
        let svg = sweep_svg(&heading("bench sweep"), &two_modes()).unwrap();
        for label in [
            "offered rate (msg/s)",
            "p99 latency (ms, log scale)",
            "saved rate (msg/s)",
            "baseline saved p99",
            "full E2E p99",
            "saved = offered",
            "bench sweep: baseline, full · 2026-11-28 16:00:00 UTC · 2000 connections",
        ] {
            assert!(svg.contains(label), "no {label:?} in the chart");
        }
    }

    #[test]
    fn a_sweep_chart_draws_one_line_per_mode_in_each_panel() {
        let svg = sweep_svg(&heading("bench sweep"), &two_modes()).unwrap();
        // Saved p99 above and saved rate below share the mode's colour; E2E p99 is its lighter hue.
        for (mode, steps) in [("baseline", 3), ("full", 4)] {
            assert_eq!(lines_of(&svg, mode_colour(mode), steps), 2, "{mode}: saved lines");
            assert_eq!(lines_of(&svg, lighter(mode_colour(mode)), steps), 1, "{mode}: E2E line");
        }
    }

    #[test]
    fn unsustained_steps_are_drawn_hollow() {
        let svg = sweep_svg(&heading("bench sweep"), &two_modes()).unwrap();
        let hollow = svg.split("<circle").skip(1).filter(|tag| attr(tag, "fill") == "none").count();
        // One failed step per mode, marked on three lines each (saved p99, E2E p99, saved rate).
        assert_eq!(hollow, 6);
    }

    #[test]
    fn a_latency_never_measured_is_left_off_the_log_axis() {
        let mut series = two_modes();
        series[1].points[0].e2e_p99_ms = None;
        let svg = sweep_svg(&heading("bench sweep"), &series).unwrap();
        assert_eq!(lines_of(&svg, lighter(mode_colour("full")), 3), 1);
        assert_eq!(lines_of(&svg, lighter(mode_colour("full")), 4), 0);
    }

    #[test]
    fn a_comparison_chart_has_a_bar_per_mode_and_latency() {
        let run = |accepted: Option<f64>, saved, e2e, cpu| ArmRun {
            accepted_p99_ms: accepted,
            saved_p99_ms: Some(saved),
            e2e_p99_ms: Some(e2e),
            cpu_us_per_msg: Some(cpu),
        };
        let arms = vec![
            CompareArm { mode: "baseline".into(), runs: vec![run(None, 45.0, 47.0, 410.0)] },
            CompareArm { mode: "accepted-only".into(), runs: vec![run(Some(2.0), 60.0, 4.0, 380.0)] },
            CompareArm {
                mode: "full".into(),
                runs: vec![run(Some(2.5), 40.0, 5.0, 300.0), run(Some(2.1), 44.0, 6.0, 320.0)],
            },
        ];
        let svg = compare_svg(&heading("bench compare"), &arms).unwrap();
        for label in ["p99 latency (ms)", "cluster CPU (µs/msg)", "accepted p99", "E2E p99", "n/a", "310 µs"] {
            assert!(svg.contains(label), "no {label:?} in the chart");
        }
        for mode in ["baseline", "accepted-only", "full"] {
            assert_eq!(texts(&svg).filter(|t| *t == mode).count(), 2, "{mode}: an x label per panel");
        }
        let filled = |colour: RGBColor| {
            svg.split("<rect").skip(1).filter(|tag| attr(tag, "fill").eq_ignore_ascii_case(&hex(colour))).count()
        };
        // A bar per arm that measured it, plus the legend's sample; baseline has no accepted ACK.
        assert_eq!(filled(LATENCY_METRICS[0].2), 2 + 1);
        assert_eq!(filled(LATENCY_METRICS[1].2), 3 + 1);
        assert_eq!(filled(LATENCY_METRICS[2].2), 3 + 1);
        assert_eq!(filled(mode_colour("full")), 1, "one CPU bar per mode");
        // Two repeats of full: a dot per run on each of its four bars.
        assert_eq!(svg.matches("<circle").count(), 8);
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        assert!(matches!(sweep_svg(&heading("bench sweep"), &[]), Err(ChartError::Empty)));
        let empty = [CompareArm { mode: "full".into(), runs: vec![] }];
        assert!(matches!(compare_svg(&heading("bench compare"), &empty), Err(ChartError::Empty)));
    }
}
