//! `meshgate top`: live requests per second, error rate and p50/p99 latency per route and per
//! upstream service of a running gateway or agent, refreshing in place like `top` (`--once`:
//! one sample).
//!
//! A sample is two scrapes of the admin API's `/metrics` (Prometheus text 0.0.4) `--interval`
//! apart. The pure parts are plain functions over plain data, unit-tested below: [`parse`] reads
//! the exposition, [`delta`] subtracts two scrapes series by series (a counter that went down,
//! because the process restarted, counts as zero, never negative), [`rows`] sums the deltas per
//! route and per service, and [`quantile`] is Prometheus' `histogram_quantile`. This module only
//! reads the admin API; it changes nothing, and it writes only through [`crate::output`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::IsTerminal as _,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::{
    admin_client::{Admin, ProcessKind},
    inspect::AdminArgs,
    outln,
    output::{Output, print_json, print_table},
    signals::Signals,
};

/// Arguments of `meshgate top`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// Take one sample (two scrapes --interval apart), print it and exit.
    #[arg(long)]
    once: bool,
    /// Time between the scrapes of /metrics, and between refreshes (e.g. 2s, 500ms; at least
    /// 100ms).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    interval: Duration,
    #[command(flatten)]
    admin: AdminArgs,
}

/// The shortest `--interval`: below it the scrape itself is a large part of the interval.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `--interval`: a humantime duration of at least [`MIN_INTERVAL`].
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 2s or 500ms)"))?;
    if d < MIN_INTERVAL {
        return Err(format!(
            "{s:?} is too short: the interval must be at least {}",
            humantime::format_duration(MIN_INTERVAL)
        ));
    }
    Ok(d)
}

/// Upstream requests by service and result (`ok` or the problem type), both process kinds.
const UPSTREAM_REQUESTS: &str = "meshgate_upstream_requests_total";
/// Upstream exchange latency by service, both process kinds.
const UPSTREAM_DURATION: &str = "meshgate_upstream_request_duration_seconds";

/// The per-route request counter and latency histogram of a process kind: the gateway's
/// requests, or an agent's inbound L7 requests (`route` = the local service).
fn route_metrics(kind: ProcessKind) -> (&'static str, &'static str) {
    match kind {
        ProcessKind::Gateway => (
            "meshgate_gateway_requests_total",
            "meshgate_gateway_request_duration_seconds",
        ),
        ProcessKind::Agent => (
            "meshgate_inbound_requests_total",
            "meshgate_inbound_request_duration_seconds",
        ),
    }
}

/// The families `top` reads for `kind`, as `# TYPE` lines name them.
fn families(kind: ProcessKind) -> [&'static str; 4] {
    let (requests, duration) = route_metrics(kind);
    [requests, duration, UPSTREAM_REQUESTS, UPSTREAM_DURATION]
}

/// Whether series `name` belongs to one of `families` (a histogram's series carry `_bucket`,
/// `_count` and `_sum`).
fn belongs(name: &str, families: &[&str]) -> bool {
    families.iter().any(|f| {
        name.strip_prefix(f)
            .is_some_and(|rest| matches!(rest, "" | "_bucket" | "_count" | "_sum"))
    })
}

/// Label pairs, in exposition order.
type Labels = Vec<(String, String)>;

/// One line of an exposition: a series and its value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    /// The series name (`meshgate_gateway_requests_total`, `…_bucket`).
    name: String,
    /// Label pairs in exposition order, values unescaped.
    labels: Labels,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Name and sorted labels: what identifies the series across scrapes.
    fn key(&self) -> (String, Labels) {
        let mut labels = self.labels.clone();
        labels.sort();
        (self.name.clone(), labels)
    }
}

/// A parsed exposition.
#[derive(Debug, Default)]
struct Exposition {
    /// The names `# TYPE` lines declare (families with no series yet included).
    declared: BTreeSet<String>,
    /// Every series line, in order.
    samples: Vec<Sample>,
}

/// Parses Prometheus text format 0.0.4: `name{label="value",…} value [timestamp]` lines, label
/// values with `\"`, `\\` and `\n` escapes. Comments are skipped except that `# TYPE` lines
/// record the family names. A malformed line is an error naming its line number.
fn parse(text: &str) -> anyhow::Result<Exposition> {
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE")
                && let Some(name) = words.next()
            {
                out.declared.insert(name.to_owned());
            }
            continue;
        }
        let sample = parse_line(line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        out.samples.push(sample);
    }
    Ok(out)
}

/// Whether `c` may appear in a metric name (`[a-zA-Z0-9_:]`).
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// One series line.
fn parse_line(line: &str) -> Result<Sample, String> {
    let end = line.find(|c| !name_char(c)).unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("expected a metric name at the start of {line:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.trim_start().strip_prefix('{') {
        (labels, rest) = parse_labels(r).map_err(|e| format!("{name}: {e}"))?;
    } else if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return Err(format!("{name}: expected '{{' or a space after the name"));
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or_else(|| format!("{name}: no value"))?;
    let value = parse_value(value).ok_or_else(|| format!("{name}: {value:?} is not a number"))?;
    if let Some(ts) = words.next()
        && ts.parse::<i64>().is_err()
    {
        return Err(format!("{name}: {ts:?} is not a timestamp (milliseconds)"));
    }
    if words.next().is_some() {
        return Err(format!(
            "{name}: unexpected text after the value and timestamp"
        ));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The labels after `{`: the pairs, and what follows the closing `}`.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end == 0 {
            return Err("expected a label name or '}'".into());
        }
        let key = &s[..end];
        s = s[end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or_else(|| format!("expected '=' after label {key}"))?
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label {key}: expected a quoted value"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err(format!("label {key}: the value has no closing quote")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    // Not an escape the format defines: keep it as written.
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err(format!("label {key}: the value has no closing quote")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        s = s[close + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {key}"));
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// What each series of `after` grew by since `before`: a series new in `after` grew by its
/// value (it started at zero), one that went down (the process restarted) or is not finite by
/// zero. Series only in `before` are dropped.
fn delta(before: &[Sample], after: &[Sample]) -> Vec<Sample> {
    let was: HashMap<_, f64> = before.iter().map(|s| (s.key(), s.value)).collect();
    after
        .iter()
        .map(|s| {
            let d = s.value - was.get(&s.key()).copied().unwrap_or(0.0);
            Sample {
                value: if d.is_finite() && d > 0.0 { d } else { 0.0 },
                ..s.clone()
            }
        })
        .collect()
}

/// The `q` quantile (0 to 1) of a cumulative histogram, exactly as Prometheus'
/// `histogram_quantile`: linear interpolation inside the bucket the rank falls in (from 0 for
/// the first bucket), the highest finite bound when it falls in `+Inf`. `buckets` are
/// `(upper bound, cumulative count)` in any order and must include `+Inf`; counts that go down
/// are raised to keep them monotonic. `None` when there are no observations, no `+Inf` bucket,
/// fewer than two buckets, or `q` is outside 0..=1.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut b: Vec<(f64, f64)> = buckets
        .iter()
        .filter(|(le, _)| !le.is_nan())
        .copied()
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    if b.len() < 2 || b.last()?.0 != f64::INFINITY {
        return None;
    }
    let mut max = 0.0_f64;
    for (_, count) in &mut b {
        max = max.max(*count);
        *count = max;
    }
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let i = b.iter().position(|&(_, count)| count >= rank)?;
    if i == b.len() - 1 {
        return Some(b[i - 1].0);
    }
    if i == 0 && b[0].0 <= 0.0 {
        return Some(b[0].0);
    }
    let (start, below) = if i == 0 { (0.0, 0.0) } else { b[i - 1] };
    let (end, count) = b[i];
    let inside = count - below;
    if inside <= 0.0 {
        return Some(start);
    }
    Some(start + (end - start) * ((rank - below) / inside))
}

/// One line of the table: a route or an upstream service over one interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Row {
    /// The route (`-`: none matched) or the service.
    name: String,
    /// Requests per second over the measured interval.
    rps: f64,
    /// Requests in the interval.
    requests: u64,
    /// Of those, errors: a 5xx answer (routes) or a result other than `ok` (services).
    errors: u64,
    /// `errors / requests`; `None` without requests.
    error_rate: Option<f64>,
    /// Median latency in seconds; `None` without requests.
    p50_seconds: Option<f64>,
    /// 99th percentile latency in seconds; `None` without requests.
    p99_seconds: Option<f64>,
}

/// The rows of one sample.
#[derive(Debug, Default, PartialEq)]
struct Rows {
    /// Per route, busiest first.
    routes: Vec<Row>,
    /// Per upstream service, busiest first.
    services: Vec<Row>,
}

/// What one route or service added up to in an interval.
#[derive(Debug, Default)]
struct Totals {
    requests: f64,
    errors: f64,
    /// `(le, cumulative count)`, one entry per bound.
    buckets: Vec<(f64, f64)>,
}

impl Totals {
    /// Adds one series' delta: a count of the `requests` counter (an error when `error`), or a
    /// `_bucket` of the `duration` histogram (its `_count` and `_sum` only make the row exist).
    fn add(&mut self, s: &Sample, requests: &str, duration: &str, error: bool) {
        if s.name == requests {
            self.requests += s.value;
            if error {
                self.errors += s.value;
            }
        } else if s.name.strip_prefix(duration) == Some("_bucket")
            && let Some(le) = s.label("le").and_then(parse_value)
        {
            match self.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => self.buckets.push((le, s.value)),
            }
        }
    }

    /// The row of `name` over `elapsed`.
    fn row(self, name: String, elapsed: Duration) -> Row {
        let requests = self.requests.round() as u64;
        let errors = self.errors.round() as u64;
        let secs = elapsed.as_secs_f64();
        let has = requests > 0;
        // Rounded so that JSON does not carry float noise: rps to 1/1000, latency to 1ns.
        let round = |v: f64, scale: f64| (v * scale).round() / scale;
        let latency = |q| has.then(|| quantile(q, &self.buckets)).flatten();
        Row {
            name,
            rps: if secs > 0.0 {
                round(requests as f64 / secs, 1e3)
            } else {
                0.0
            },
            requests,
            errors,
            error_rate: has.then(|| errors as f64 / requests as f64),
            p50_seconds: latency(0.5).map(|v| round(v, 1e9)),
            p99_seconds: latency(0.99).map(|v| round(v, 1e9)),
        }
    }
}

/// The rows of an interval of `elapsed` between scrapes `before` and `after` of a `kind`
/// process: every route and service either scrape names (route `-`, no route matched, only
/// when it had requests), sorted by requests per second, busiest first, then by name.
fn rows(before: &[Sample], after: &[Sample], kind: ProcessKind, elapsed: Duration) -> Rows {
    let (route_requests, route_duration) = route_metrics(kind);
    let mut routes: BTreeMap<String, Totals> = BTreeMap::new();
    let mut services: BTreeMap<String, Totals> = BTreeMap::new();
    for s in delta(before, after) {
        if belongs(&s.name, &[route_requests, route_duration]) {
            let Some(name) = s.label("route") else {
                continue;
            };
            let error = s.label("code").is_some_and(|c| c.starts_with('5'));
            let totals = routes.entry(name.to_owned()).or_default();
            totals.add(&s, route_requests, route_duration, error);
        } else if belongs(&s.name, &[UPSTREAM_REQUESTS, UPSTREAM_DURATION]) {
            let Some(name) = s.label("service") else {
                continue;
            };
            let error = s.label("result") != Some("ok");
            let totals = services.entry(name.to_owned()).or_default();
            totals.add(&s, UPSTREAM_REQUESTS, UPSTREAM_DURATION, error);
        }
    }
    let finish = |map: BTreeMap<String, Totals>, hide_unmatched: bool| {
        let mut rows: Vec<Row> = map
            .into_iter()
            .map(|(name, t)| t.row(name, elapsed))
            .filter(|r| !(hide_unmatched && r.name == "-" && r.requests == 0))
            .collect();
        rows.sort_by(|a, b| b.rps.total_cmp(&a.rps).then_with(|| a.name.cmp(&b.name)));
        rows
    };
    Rows {
        routes: finish(routes, true),
        services: finish(services, false),
    }
}

/// Seconds as people read latency: `350µs`, `1.2ms`, `25ms`, `2.1s` (one decimal under 10 of
/// the unit, none above; a trailing `.0` dropped).
fn human_seconds(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s == 0.0 {
        return "0s".into();
    }
    let digits = |v: f64| {
        let text = if v < 9.95 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        };
        text.strip_suffix(".0").map(str::to_owned).unwrap_or(text)
    };
    let (text, unit) = [("µs", 1e6), ("ms", 1e3)]
        .into_iter()
        .map(|(unit, scale)| (digits(s * scale), unit))
        .find(|(text, _)| text.parse::<f64>().is_ok_and(|v| v < 1000.0))
        .unwrap_or_else(|| (digits(s), "s"));
    format!("{text}{unit}")
}

/// Requests per second for the table: two decimals under 1, one under 100, none above.
fn human_rps(rps: f64) -> String {
    if rps == 0.0 {
        "0".into()
    } else if rps < 1.0 {
        format!("{rps:.2}")
    } else if rps < 100.0 {
        format!("{rps:.1}")
    } else {
        format!("{rps:.0}")
    }
}

/// The ERRORS cell: a percentage, `-` without requests.
fn human_errors(r: &Row) -> String {
    match r.error_rate {
        None => "-".into(),
        Some(_) if r.errors == 0 => "0%".into(),
        Some(rate) => format!("{:.1}%", rate * 100.0),
    }
}

/// The table cells of `rows`, routes first, then services.
fn table(rows: &Rows) -> Vec<Vec<String>> {
    let kinds = [("route", &rows.routes), ("service", &rows.services)];
    kinds
        .into_iter()
        .flat_map(|(kind, list)| {
            list.iter().map(move |r| {
                let latency = |v: Option<f64>| v.map_or_else(|| "-".into(), human_seconds);
                vec![
                    kind.to_owned(),
                    r.name.clone(),
                    human_rps(r.rps),
                    human_errors(r),
                    latency(r.p50_seconds),
                    latency(r.p99_seconds),
                    r.requests.to_string(),
                ]
            })
        })
        .collect()
}

/// One sample as `-o json` prints it.
#[derive(Debug, Serialize)]
struct Report<'a> {
    kind: &'static str,
    admin: String,
    /// The measured time between the two scrapes.
    interval_seconds: f64,
    /// When the sample ended (RFC 3339, UTC).
    time: String,
    routes: &'a [Row],
    services: &'a [Row],
}

/// One scrape of `/metrics`, reduced to the series `top` reads.
struct Scrape {
    /// When it was asked for.
    at: Instant,
    samples: Vec<Sample>,
}

/// GETs `/metrics` and keeps the series of [`families`]; fails when the exposition has none of
/// them (not a meshgate agent or gateway, or one without request metrics).
async fn scrape(admin: &Admin, kind: ProcessKind) -> anyhow::Result<Scrape> {
    let at = Instant::now();
    let text = admin.text("/metrics").await?;
    let expo = parse(&text)
        .with_context(|| format!("{}/metrics is not valid Prometheus text", admin.addr()))?;
    let wanted = families(kind);
    let samples: Vec<Sample> = expo
        .samples
        .into_iter()
        .filter(|s| belongs(&s.name, &wanted))
        .collect();
    if samples.is_empty() && !wanted.iter().any(|f| expo.declared.contains(*f)) {
        bail!(
            "the admin API at {} exposes no request metrics (none of {}): is it the admin API of a meshgate agent or gateway?",
            admin.addr(),
            wanted.join(", ")
        );
    }
    Ok(Scrape { at, samples })
}

/// How a sample is shown.
struct View {
    kind: ProcessKind,
    admin: String,
    interval: Duration,
    output: Output,
    once: bool,
    /// Table on a terminal: redraw in place.
    redraw: bool,
}

impl View {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            ProcessKind::Gateway => "gateway",
            ProcessKind::Agent => "agent",
        }
    }

    /// Prints one sample; `first` is whether it is the first one.
    fn show(&self, rows: &Rows, elapsed: Duration, first: bool) -> anyhow::Result<()> {
        let time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        if self.output == Output::Json {
            let report = Report {
                kind: self.kind_name(),
                admin: self.admin.clone(),
                interval_seconds: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                time,
                routes: &rows.routes,
                services: &rows.services,
            };
            if self.once {
                return print_json(&report);
            }
            outln!("{}", serde_json::to_string(&report)?);
            return crate::output::flush();
        }
        if self.redraw {
            crate::output::write_bytes(b"\x1b[H\x1b[2J")?;
        } else if !first {
            outln!();
        }
        outln!(
            "{} at {}, interval {} (measured {:.2}s), {time}{}",
            self.kind_name(),
            self.admin,
            humantime::format_duration(self.interval),
            elapsed.as_secs_f64(),
            if self.redraw { "; Ctrl-C to quit" } else { "" }
        );
        print_table(
            &["KIND", "NAME", "RPS", "ERRORS", "P50", "P99", "REQUESTS"],
            &table(rows),
        )
    }
}

/// `meshgate top`: with `--once` one sample, else a sample every `--interval` until Ctrl-C or
/// SIGTERM (exit 0).
pub(crate) async fn run(args: TopArgs) -> anyhow::Result<()> {
    let admin = Admin::new(args.admin.admin);
    let (_, kind) = admin.version().await?;
    let view = View {
        kind,
        admin: admin.addr().to_string(),
        interval: args.interval,
        output: args.admin.output,
        once: args.once,
        redraw: !args.once && args.admin.output == Output::Table && std::io::stdout().is_terminal(),
    };
    if args.once {
        return watch(&admin, &view).await;
    }
    let mut signals = Signals::new()?;
    tokio::select! {
        r = watch(&admin, &view) => r,
        _ = signals.recv() => Ok(()),
    }
}

/// Scrapes every interval and shows each sample; returns after the first with `--once`.
async fn watch(admin: &Admin, view: &View) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(view.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut before = scrape(admin, view.kind).await?;
    if view.redraw {
        crate::output::write_bytes(b"\x1b[H\x1b[2J")?;
        outln!(
            "{} at {}: sampling for {}…",
            view.kind_name(),
            view.admin,
            humantime::format_duration(view.interval)
        );
        crate::output::flush()?;
    }
    let mut first = true;
    loop {
        ticks.tick().await;
        let after = scrape(admin, view.kind).await?;
        let elapsed = after.at.duration_since(before.at);
        let rows = rows(&before.samples, &after.samples, view.kind, elapsed);
        view.show(&rows, elapsed, first)?;
        if view.once {
            return Ok(());
        }
        before = after;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            value,
        }
    }

    #[test]
    fn parses_escaped_labels_infinities_and_timestamps() {
        let text = "# HELP meshgate_gateway_requests_total requests by route.\n\
            # TYPE meshgate_gateway_requests_total counter\n\
            # TYPE meshgate_gateway_requests_local_total counter\n\
            meshgate_gateway_requests_total{route=\"a \\\"quoted\\\" \\\\ back\\nslash\",method=\"GET\",code=\"200\"} 3\n\
            \n\
            meshgate_gateway_request_duration_seconds_bucket{le=\"+Inf\",route=\"-\",} 7 1700000000000\n\
            meshgate_gateway_request_duration_seconds_sum { route = \"x,}\" } 0.25\n\
            up 1e3\n\
            weird{a=\"b\"} -Inf\n\
            nan_metric NaN\n";
        let e = parse(text).expect("parses");
        assert!(e.declared.contains("meshgate_gateway_requests_total"));
        assert!(e.declared.contains("meshgate_gateway_requests_local_total"));
        assert_eq!(e.samples.len(), 6);
        assert_eq!(
            e.samples[0],
            sample(
                "meshgate_gateway_requests_total",
                &[
                    ("route", "a \"quoted\" \\ back\nslash"),
                    ("method", "GET"),
                    ("code", "200")
                ],
                3.0
            )
        );
        assert_eq!(e.samples[1].label("le"), Some("+Inf"));
        assert_eq!(e.samples[1].label("route"), Some("-"));
        assert_eq!(e.samples[1].value, 7.0);
        assert_eq!(e.samples[2].label("route"), Some("x,}"));
        assert_eq!(e.samples[2].value, 0.25);
        assert_eq!(e.samples[3].value, 1000.0);
        assert_eq!(e.samples[4].value, f64::NEG_INFINITY);
        assert!(e.samples[5].value.is_nan());
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        for (text, want) in [
            (
                "ok 1\nbroken{route=\"x} 1\n",
                "line 2: broken: label route: the value has no closing quote",
            ),
            ("m{route=x} 1", "expected a quoted value"),
            (
                "m{route=\"x\" code=\"1\"} 1",
                "expected ',' or '}' after label route",
            ),
            ("m 1 2 3", "unexpected text"),
            ("m one", "\"one\" is not a number"),
            ("m", "no value"),
            ("m-x 1", "expected '{' or a space after the name"),
            ("{a=\"b\"} 1", "expected a metric name"),
            ("m 1 soon", "not a timestamp"),
        ] {
            let e = format!("{:#}", parse(text).expect_err(text));
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let inf = f64::INFINITY;
        let b = [(0.001, 0.0), (0.005, 50.0), (0.01, 100.0), (inf, 100.0)];
        let p50 = quantile(0.5, &b).expect("p50");
        assert!((p50 - 0.005).abs() < 1e-12, "{p50}");
        // rank 99 is 49 of the 50 in (0.005, 0.01]: 0.005 + 0.005 * 49/50.
        let p99 = quantile(0.99, &b).expect("p99");
        assert!((p99 - 0.0099).abs() < 1e-12, "{p99}");
        // The order of the buckets does not matter.
        let shuffled = [b[3], b[1], b[0], b[2]];
        assert_eq!(quantile(0.99, &shuffled), Some(p99));
        // Inside the first bucket: from 0. 10 of 40 in [0, 0.1]: rank 20 → 0.05.
        let first = [(0.1, 40.0), (1.0, 40.0), (inf, 40.0)];
        assert!((quantile(0.5, &first).expect("p50") - 0.05).abs() < 1e-12);
        // Landing in +Inf: the highest finite bound.
        let slow = [(0.1, 1.0), (1.0, 2.0), (inf, 10.0)];
        assert_eq!(quantile(0.5, &slow), Some(1.0));
        assert_eq!(quantile(0.99, &slow), Some(1.0));
        // Counts that go down are made monotonic: (0.5 → 4) is raised to 6.
        let bumpy = [(0.25, 6.0), (0.5, 4.0), (1.0, 10.0), (inf, 10.0)];
        // rank 5 in [0, 0.25] holding 6: 0.25 * 5/6.
        let p = quantile(0.5, &bumpy).expect("p50");
        assert!((p - 0.25 * 5.0 / 6.0).abs() < 1e-12, "{p}");
        // rank 9.9 in (0.5, 1] holding 4 (from 6): 0.5 + 0.5 * 3.9/4.
        let p = quantile(0.99, &bumpy).expect("p99");
        assert!((p - (0.5 + 0.5 * 3.9 / 4.0)).abs() < 1e-12, "{p}");
        // No observations, no +Inf, one bucket, q out of range: none.
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (inf, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(0.1, 1.0), (1.0, 2.0)]), None);
        assert_eq!(quantile(0.5, &[(inf, 5.0)]), None);
        assert_eq!(quantile(1.5, &b), None);
    }

    /// A gateway exposition: route counters by code, a route histogram, upstream counters.
    fn gateway(
        users_200: f64,
        users_503: f64,
        unmatched_404: f64,
        users_le: [f64; 4],
    ) -> Vec<Sample> {
        let mut v = vec![
            sample(
                "meshgate_gateway_requests_total",
                &[("route", "users"), ("method", "GET"), ("code", "200")],
                users_200,
            ),
            sample(
                "meshgate_gateway_requests_total",
                &[("route", "users"), ("method", "GET"), ("code", "503")],
                users_503,
            ),
            sample(
                "meshgate_gateway_requests_total",
                &[("route", "-"), ("method", "GET"), ("code", "404")],
                unmatched_404,
            ),
            sample(
                "meshgate_gateway_request_duration_seconds_count",
                &[("route", "orders")],
                0.0,
            ),
            sample(
                "meshgate_upstream_requests_total",
                &[("service", "users"), ("result", "ok")],
                users_200,
            ),
            sample(
                "meshgate_upstream_requests_total",
                &[("service", "users"), ("result", "upstream-timeout")],
                users_503,
            ),
            sample("meshgate_agent_ready", &[], 1.0),
            sample(
                "meshgate_inbound_requests_total",
                &[("route", "elsewhere"), ("method", "GET"), ("code", "200")],
                99.0,
            ),
        ];
        for (le, count) in ["0.001", "0.005", "0.01", "+Inf"].iter().zip(users_le) {
            v.push(sample(
                "meshgate_gateway_request_duration_seconds_bucket",
                &[("le", le), ("route", "users")],
                count,
            ));
        }
        v
    }

    #[test]
    fn rows_come_from_the_deltas_of_two_scrapes() {
        let before = gateway(100.0, 10.0, 0.0, [5.0, 50.0, 100.0, 110.0]);
        // 30 more 200s and 10 more 503s in 2s; the buckets move by 0, 20, 40, 40.
        let after = gateway(130.0, 20.0, 0.0, [5.0, 70.0, 140.0, 150.0]);
        let r = rows(
            &before,
            &after,
            ProcessKind::Gateway,
            Duration::from_secs(2),
        );
        // Route "-" had no traffic: hidden. "orders" is known but idle: shown with "-".
        let names: Vec<&str> = r.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["users", "orders"]);
        let users = &r.routes[0];
        assert_eq!((users.requests, users.errors), (40, 10));
        assert!((users.rps - 20.0).abs() < 1e-12);
        assert_eq!(users.error_rate, Some(0.25));
        // 40 observations: rank 20 is the 20 in (0.001, 0.005]; rank 39.6 is 19.6 of the 20
        // in (0.005, 0.01].
        assert!((users.p50_seconds.expect("p50") - 0.005).abs() < 1e-12);
        assert!((users.p99_seconds.expect("p99") - (0.005 + 0.005 * 19.6 / 20.0)).abs() < 1e-12);
        let orders = &r.routes[1];
        assert_eq!(
            (orders.requests, orders.rps, orders.error_rate),
            (0, 0.0, None)
        );
        assert_eq!((orders.p50_seconds, orders.p99_seconds), (None, None));
        // Services: a result other than ok is an error; no histogram, so no latency.
        assert_eq!(r.services.len(), 1);
        let svc = &r.services[0];
        assert_eq!(
            (svc.name.as_str(), svc.requests, svc.errors),
            ("users", 40, 10)
        );
        assert_eq!(svc.p50_seconds, None);
        // The agent's inbound metric is not read for a gateway.
        assert!(r.routes.iter().all(|r| r.name != "elsewhere"));
    }

    #[test]
    fn unmatched_route_shows_only_with_traffic() {
        let before = gateway(0.0, 0.0, 3.0, [0.0; 4]);
        let idle = rows(
            &before,
            &before,
            ProcessKind::Gateway,
            Duration::from_secs(1),
        );
        assert!(idle.routes.iter().all(|r| r.name != "-"));
        let after = gateway(0.0, 0.0, 7.0, [0.0; 4]);
        let busy = rows(
            &before,
            &after,
            ProcessKind::Gateway,
            Duration::from_secs(1),
        );
        let unmatched = busy.routes.iter().find(|r| r.name == "-").expect("route -");
        // 404 is not a 5xx: no errors.
        assert_eq!((unmatched.requests, unmatched.errors), (4, 0));
        assert_eq!(unmatched.error_rate, Some(0.0));
    }

    #[test]
    fn a_counter_that_went_down_counts_as_zero_and_new_series_from_zero() {
        // The process restarted: every counter is lower than before.
        let before = gateway(500.0, 50.0, 9.0, [5.0, 50.0, 100.0, 550.0]);
        let after = gateway(3.0, 0.0, 1.0, [0.0, 2.0, 3.0, 3.0]);
        let r = rows(
            &before,
            &after,
            ProcessKind::Gateway,
            Duration::from_secs(2),
        );
        for row in r.routes.iter().chain(&r.services) {
            assert_eq!((row.requests, row.errors, row.rps), (0, 0, 0.0), "{row:?}");
        }
        // A series absent from the first scrape started at zero.
        let d = delta(
            &[],
            &[sample(
                "meshgate_upstream_requests_total",
                &[("service", "s"), ("result", "ok")],
                4.0,
            )],
        );
        assert_eq!(d[0].value, 4.0);
        // Label order does not make a different series.
        let a = sample("m", &[("a", "1"), ("b", "2")], 1.0);
        let b = sample("m", &[("b", "2"), ("a", "1")], 3.0);
        assert_eq!(delta(&[a], &[b])[0].value, 2.0);
    }

    #[test]
    fn agents_read_inbound_requests_and_elapsed_is_measured() {
        let before = vec![sample(
            "meshgate_inbound_requests_total",
            &[("route", "users"), ("method", "GET"), ("code", "200")],
            1.0,
        )];
        let after = vec![sample(
            "meshgate_inbound_requests_total",
            &[("route", "users"), ("method", "GET"), ("code", "200")],
            6.0,
        )];
        let r = rows(
            &before,
            &after,
            ProcessKind::Agent,
            Duration::from_millis(2500),
        );
        assert_eq!(r.routes.len(), 1);
        assert_eq!(r.routes[0].requests, 5);
        assert!((r.routes[0].rps - 2.0).abs() < 1e-12);
        assert!(
            rows(
                &before,
                &after,
                ProcessKind::Gateway,
                Duration::from_secs(1)
            )
            .routes
            .is_empty()
        );
    }

    #[test]
    fn sorted_by_rps_then_name() {
        let counter = |route: &str, v: f64| {
            sample(
                "meshgate_gateway_requests_total",
                &[("route", route), ("method", "GET"), ("code", "200")],
                v,
            )
        };
        let after = vec![
            counter("b", 5.0),
            counter("a", 5.0),
            counter("c", 9.0),
            counter("d", 1.0),
        ];
        let r = rows(&[], &after, ProcessKind::Gateway, Duration::from_secs(1));
        let names: Vec<&str> = r.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b", "d"]);
        let cells = table(&r);
        assert_eq!(cells[0], ["route", "c", "9.0", "0%", "-", "-", "9"]);
    }

    #[test]
    fn durations_read_like_latencies() {
        for (secs, want) in [
            (0.00035, "350µs"),
            (0.0000052, "5.2µs"),
            (0.0012, "1.2ms"),
            (0.005, "5ms"),
            (0.0099, "9.9ms"),
            (0.025, "25ms"),
            (0.35, "350ms"),
            (0.9999, "1s"),
            (2.1, "2.1s"),
            (10.0, "10s"),
            (0.0, "0s"),
            (f64::NAN, "-"),
        ] {
            assert_eq!(human_seconds(secs), want, "{secs}");
        }
        for (rps, want) in [(0.0, "0"), (0.5, "0.50"), (20.0, "20.0"), (1234.4, "1234")] {
            assert_eq!(human_rps(rps), want);
        }
    }

    #[test]
    fn intervals_are_humantime_and_not_too_short() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert!(
            parse_interval("10ms")
                .expect_err("short")
                .contains("at least 100ms")
        );
        assert!(parse_interval("soon").expect_err("bad").contains("e.g. 2s"));
    }
}
