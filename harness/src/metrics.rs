//! The one Prometheus text-format reader: parse a `/metrics` page into samples, sum a metric over
//! the series whose labels match, list the declared metric families, and scrape or wait on a live
//! process. `ops status`, the dashboard, the drills' monitor and the end-to-end tests all read
//! metrics through this, so a label that is matched one way in a test is matched the same way by the
//! operator tools.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::http::{self, HttpError};
use crate::poll;

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Why a scrape produced no samples.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
}

/// Parses the Prometheus text exposition format: comment lines are skipped, label values may hold
/// escaped quotes, backslashes and newlines, and a trailing timestamp is ignored. Lines that do not
/// parse are skipped.
pub fn parse(page: &str) -> Vec<Sample> {
    page.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    (!name.is_empty()).then(|| Sample { name: name.to_owned(), labels, value })
}

/// `k="v",k2="v2"}` → the labels and what follows the closing brace.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        text = &rest[end + 1..];
    }
}

/// Sum of `name` over the samples whose labels include every `(label, value)` of `want`.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .fold(0.0, |total, s| total + s.value)
}

/// The metric families a page declares (`# TYPE <name> <kind>`): name → kind.
pub fn families(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("#"), Some("TYPE"), Some(name), Some(kind)) => Some((name.to_owned(), kind.to_owned())),
                _ => None,
            }
        })
        .collect()
}

/// `GET metrics_url` and parse it; anything but HTTP 200 is an error.
pub async fn scrape(metrics_url: &str) -> Result<Vec<Sample>, ScrapeError> {
    let (status, page) = http::get(metrics_url).await?;
    if status != 200 {
        return Err(ScrapeError::Status { url: metrics_url.to_owned(), status });
    }
    Ok(parse(&page))
}

/// The current value of `name` on a process, summed over the series matching `want`.
pub async fn value(metrics_url: &str, name: &str, want: &[(&str, &str)]) -> Result<f64, ScrapeError> {
    Ok(sum(&scrape(metrics_url).await?, name, want))
}

/// Polls a process's metrics until `name` (summed over `want`) satisfies `ok`, at most `limit`
/// (gauges refresh about once a second; counters move right after the step they count). Returns the
/// last value seen (`NaN` if the process never answered).
pub async fn wait_for(
    metrics_url: &str,
    name: &str,
    want: &[(&str, &str)],
    limit: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let last = std::cell::Cell::new(f64::NAN);
    let (last_seen, ok) = (&last, &ok);
    let found = poll::until(limit, || async move {
        let v = value(metrics_url, name, want).await.ok()?;
        last_seen.set(v);
        ok(v).then_some(v)
    })
    .await;
    found.unwrap_or(last.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses() {
        let page = "# HELP x y\n# TYPE im_stream_length gauge\n\
                    im_stream_length{node=\"a\",shard=\"0\",stream=\"accepted\"} 12\nim_build_info 1\n\
                    im_odd{reason=\"say \\\"hi\\\", then\\\\go\"} 2 1700000000\n";
        let s = parse(page);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels["stream"], "accepted");
        assert_eq!(s[0].value, 12.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("im_build_info", 1.0));
        assert_eq!(s[2].labels["reason"], "say \"hi\", then\\go");
        assert_eq!(s[2].value, 2.0, "the timestamp is not the value");
        assert_eq!(sum(&s, "im_stream_length", &[("shard", "0")]), 12.0);
        assert_eq!(sum(&s, "im_stream_length", &[("shard", "1")]), 0.0);
        assert_eq!(families(page).get("im_stream_length").map(String::as_str), Some("gauge"));
    }

    #[test]
    fn a_name_that_is_a_prefix_of_another_is_not_confused_with_it() {
        let s = parse("im_gateway_connections 3\nim_gateway_connections_total 9\n");
        assert_eq!(sum(&s, "im_gateway_connections", &[]), 3.0);
    }
}
