//! OpenTelemetry traces over OTLP (gRPC or HTTP/protobuf): the exporter and sampler set-up from
//! `telemetry.tracing` and the standard `OTEL_*` environment variables, and the small helpers
//! the request path uses (W3C `traceparent` in and out, spans with explicit parents).
//!
//! Off (no endpoint anywhere, or `OTEL_SDK_DISABLED=true`) means no tracer at all: the pipeline
//! checks one `Option` per request and creates nothing.
//!
//! Precedence: environment over file. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) beats
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL: `/v1/traces` is appended for HTTP) beats
//! `telemetry.tracing.endpoint` (also a base URL). Likewise `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_EXPORTER_OTLP_HEADERS` (merged over the file's headers), `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// `telemetry.tracing`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP collector base URL, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318`
    /// (HTTP; `/v1/traces` is appended). Unset (and no `OTEL_EXPORTER_OTLP_*ENDPOINT` in the
    /// environment): tracing is off and costs nothing.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `grpc` (default) or `http` (HTTP/protobuf).
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
    /// Headers sent with every export (collector auth tokens): secrets, redacted in `/config`
    /// and never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Fraction of new traces to sample, 0.0 to 1.0 (default 1.0). Parent-based: a request
    /// whose `traceparent` says sampled (or not) keeps that decision.
    #[serde(default)]
    pub sampling_ratio: Option<f64>,
    /// Resource attributes added to every span (`service.name` defaults to `meshgate-gateway`
    /// or `meshgate-agent`; `service.instance.id` is the node name).
    #[serde(default)]
    pub resource: BTreeMap<String, String>,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    Http,
}

/// Setting up the exporter failed.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// A value (config or environment) is not usable.
    #[error("telemetry.tracing: {0}")]
    Invalid(String),
    /// The exporter could not be built.
    #[error("telemetry.tracing: cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// What the config and the environment resolve to.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// The URL to export to (for HTTP, including `/v1/traces`).
    pub endpoint: String,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// Export headers.
    pub headers: BTreeMap<String, String>,
    /// The sampler.
    pub sampler: SamplerChoice,
    /// Resource attributes (service.name included).
    pub resource: BTreeMap<String, String>,
}

/// A sampler as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This fraction of traces by trace id.
    Ratio(f64),
    /// The parent's decision; for roots, the inner choice.
    ParentBased(ParentRoot),
}

/// The root sampler of a parent-based sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParentRoot {
    /// Sample every root.
    AlwaysOn,
    /// Sample no root.
    AlwaysOff,
    /// Sample this fraction of roots.
    Ratio(f64),
}

fn ratio(v: f64, what: &str) -> Result<f64, TracingError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(TracingError::Invalid(format!(
            "{what} is {v}; use a fraction between 0.0 and 1.0"
        )))
    }
}

/// `k=v,k2=v2` with percent-encoded values (the `OTEL_*_HEADERS` / `_ATTRIBUTES` format).
fn kv_list(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_owned(),
                percent_encoding::percent_decode_str(v.trim())
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Resolves `cfg` against the environment (`env` reads a variable); `None` when tracing is off.
/// `default_service` is the `service.name` when neither the file nor the environment sets one.
pub fn effective(
    cfg: &TracingConfig,
    default_service: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Effective>, TracingError> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
    {
        Some(p) => match p.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::Http,
            other => {
                return Err(TracingError::Invalid(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL is {other:?}; meshgate speaks grpc and http/protobuf"
                )));
            }
        },
        None => cfg.protocol.unwrap_or(OtlpProtocol::Grpc),
    };
    let base = |b: String| match protocol {
        OtlpProtocol::Grpc => b,
        OtlpProtocol::Http if b.trim_end_matches('/').ends_with("/v1/traces") => b,
        OtlpProtocol::Http => format!("{}/v1/traces", b.trim_end_matches('/')),
    };
    let endpoint = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some(e) => e,
        None => match var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| cfg.endpoint.clone()) {
            Some(b) => base(b),
            None => return Ok(None),
        },
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(TracingError::Invalid(format!(
            "the endpoint {endpoint:?} is not an http:// or https:// URL"
        )));
    }
    let mut headers = cfg.headers.clone();
    for k in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        if let Some(h) = var(k) {
            headers.extend(kv_list(&h));
        }
    }
    let file_ratio = ratio(cfg.sampling_ratio.unwrap_or(1.0), "sampling_ratio")?;
    let arg = || -> Result<f64, TracingError> {
        match var("OTEL_TRACES_SAMPLER_ARG") {
            Some(a) => ratio(
                a.trim().parse().map_err(|_| {
                    TracingError::Invalid(format!("OTEL_TRACES_SAMPLER_ARG {a:?} is not a number"))
                })?,
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            None => Ok(file_ratio),
        }
    };
    let sampler = match var("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
        None => SamplerChoice::ParentBased(ParentRoot::Ratio(file_ratio)),
        Some("always_on") => SamplerChoice::AlwaysOn,
        Some("always_off") => SamplerChoice::AlwaysOff,
        Some("traceidratio") => SamplerChoice::Ratio(arg()?),
        Some("parentbased_always_on") => SamplerChoice::ParentBased(ParentRoot::AlwaysOn),
        Some("parentbased_always_off") => SamplerChoice::ParentBased(ParentRoot::AlwaysOff),
        Some("parentbased_traceidratio") => SamplerChoice::ParentBased(ParentRoot::Ratio(arg()?)),
        Some(other) => {
            return Err(TracingError::Invalid(format!(
                "OTEL_TRACES_SAMPLER {other:?} is not supported; use always_on, always_off, traceidratio or their parentbased_ forms"
            )));
        }
    };
    let mut resource = BTreeMap::from([("service.name".to_owned(), default_service.to_owned())]);
    resource.extend(cfg.resource.clone());
    if let Some(a) = var("OTEL_RESOURCE_ATTRIBUTES") {
        resource.extend(kv_list(&a));
    }
    if let Some(n) = var("OTEL_SERVICE_NAME") {
        resource.insert("service.name".into(), n);
    }
    Ok(Some(Effective {
        endpoint,
        protocol,
        headers,
        sampler,
        resource,
    }))
}

/// Export batches of this many spans (the SDK's default, 512, is one RPC per 512 spans: at full
/// sampling under load a proxy makes spans faster than one-RPC-per-512 can send them, and the
/// queue overflows; 4096 spans stay well under a collector's 4 MiB message limit).
const EXPORT_BATCH: usize = 4096;

/// Queue this many finished spans at most (the SDK's default is 2048); more are dropped.
const EXPORT_QUEUE: usize = 32 * 1024;

/// The batch exporter's settings: the `OTEL_BSP_*` variables where set (`set` says whether one
/// is), else meshgate's defaults for a proxy's span rate.
fn batch_config(set: &dyn Fn(&str) -> bool) -> opentelemetry_sdk::trace::BatchConfig {
    let mut b = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if !set("OTEL_BSP_MAX_QUEUE_SIZE") {
        b = b.with_max_queue_size(EXPORT_QUEUE);
    }
    if !set("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        b = b.with_max_export_batch_size(EXPORT_BATCH);
    }
    if !set("OTEL_BSP_SCHEDULE_DELAY") {
        b = b.with_scheduled_delay(std::time::Duration::from_secs(1));
    }
    b.build()
}

/// The export counters a [`Tracing`] moves (`meshgate_tracing_*` in the admin API's metrics).
#[derive(Debug, Clone, Default)]
pub struct ExportCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Export calls that failed (the collector refused or could not be reached).
    pub failures: Counter,
    /// Spans in those failed exports: lost (after the exporter's own retries).
    pub lost: Counter,
}

/// How long a failing collector stays quiet in the log between two reminders.
const EXPORT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The OTLP exporter with its outcome counted and logged: the first failure is logged at once,
/// a collector that stays down once a minute with the count since, its recovery once. Without
/// this a dead collector was silent (the SDK's own logs are compiled out).
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counters: ExportCounters,
    /// The collector's URL, for the log lines.
    endpoint: String,
    /// When the current run of failures was last logged, and how many came since; `None` while
    /// exports succeed.
    failing: Mutex<Option<(Instant, u64)>>,
}

impl<E> Counted<E> {
    fn new(inner: E, counters: ExportCounters, endpoint: String) -> Self {
        Self {
            inner,
            counters,
            endpoint,
            failing: Mutex::new(None),
        }
    }

    /// Counts one export of `spans` spans that ended with `result`, at `now`.
    fn record(&self, spans: usize, result: &OTelSdkResult, now: Instant) {
        let spans = u64::try_from(spans).unwrap_or(u64::MAX);
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        // logged before counted: whoever sees the count also finds the line
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(endpoint = %self.endpoint, "trace export recovered: the collector accepts spans again");
                }
                self.counters.exported.inc_by(spans);
            }
            Err(e) => {
                match failing.as_mut() {
                    None => {
                        tracing::warn!(endpoint = %self.endpoint, error = %e, spans, "trace export failed; the spans are lost (further failures are logged once a minute, counted in meshgate_tracing_export_failures_total)");
                        *failing = Some((now, 0));
                    }
                    Some((at, since)) => {
                        *since += 1;
                        if now.saturating_duration_since(*at) >= EXPORT_FAILURE_LOG_EVERY {
                            tracing::warn!(endpoint = %self.endpoint, error = %e, failed_exports = *since, "trace export still failing");
                            *failing = Some((now, 0));
                        }
                    }
                }
                self.counters.failures.inc();
                self.counters.lost.inc_by(spans);
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let spans = batch.len();
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            self.record(spans, &result, Instant::now());
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A running trace exporter; cheap to clone.
#[derive(Debug, Clone)]
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// Decided here, once per request, before any span exists (the SDK samples everything it
    /// is given): an unsampled request creates no span, no context and no header.
    sampler: SamplerChoice,
}

impl Tracing {
    /// Starts exporting per `cfg` and the environment; `None` when tracing is off. `node` is the
    /// `service.instance.id`. Call from within the Tokio runtime (the gRPC client lives on it).
    /// Export outcomes go to `counters`.
    pub fn start(
        cfg: &TracingConfig,
        default_service: &str,
        node: &str,
        counters: ExportCounters,
    ) -> Result<Option<Self>, TracingError> {
        let Some(e) = effective(cfg, default_service, &|k| std::env::var(k).ok())? else {
            return Ok(None);
        };
        Self::from_effective(e, node, counters).map(Some)
    }

    /// Starts exporting to `e`, counting export outcomes in `counters`.
    pub fn from_effective(
        e: Effective,
        node: &str,
        counters: ExportCounters,
    ) -> Result<Self, TracingError> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
        let exporter = match e.protocol {
            OtlpProtocol::Grpc => {
                let mut md = tonic::metadata::MetadataMap::new();
                for (k, v) in &e.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|_| {
                                TracingError::Invalid(format!("header name {k:?} is not valid"))
                            })?;
                    let val = v.parse().map_err(|_| {
                        TracingError::Invalid(format!("the value of header {k:?} is not valid"))
                    })?;
                    md.insert(key, val);
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(e.endpoint.clone())
                    .with_metadata(md)
                    .build()
            }
            OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(e.endpoint.clone())
                .with_headers(e.headers.clone().into_iter().collect())
                .build(),
        }
        .map_err(|x| TracingError::Exporter(x.to_string()))?;
        let mut attrs: Vec<KeyValue> = e
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        if !e.resource.contains_key("service.instance.id") {
            attrs.push(KeyValue::new("service.instance.id", node.to_owned()));
        }
        // for the log lines: a `user:password@` in the URL is a secret
        let shown =
            crate::admin::without_userinfo(&e.endpoint).unwrap_or_else(|| e.endpoint.clone());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                opentelemetry_sdk::trace::BatchSpanProcessor::builder(Counted::new(
                    exporter,
                    counters,
                    shown.clone(),
                ))
                .with_batch_config(batch_config(&|k| std::env::var_os(k).is_some()))
                .build(),
            )
            // the decision is made in `server` before the SDK sees the request
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(Resource::builder_empty().with_attributes(attrs).build())
            .build();
        let tracer = provider.tracer("meshgate");
        tracing::info!(endpoint = %shown, protocol = ?e.protocol, "exporting traces over OTLP");
        Ok(Self {
            tracer,
            provider,
            sampler: e.sampler,
        })
    }

    /// Exports what is buffered and stops (blocking: call from a blocking thread).
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }

    /// A server span for a request with headers `h`, continuing its `traceparent`; `None` when
    /// the sampler says no (then nothing is created: the caller marks the `traceparent` it
    /// forwards unsampled, see [`unsample`], so the next hops do not sample either).
    pub fn server(&self, h: &HeaderMap, name: &'static str) -> Option<TraceCx> {
        if !sampled(self.sampler, parent_of(h), crate::http::ctx::fast_rand) {
            return None;
        }
        let parent = TraceContextPropagator::new().extract(&Headers(h));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        Some(TraceCx {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
        })
    }
}

/// A request's parent, as its single valid `traceparent` says: the sampled flag and the low 64
/// bits of the trace id; `None` for a root. Valid as W3C Trace Context (and the SDK's
/// propagator) read it: version `00` is exactly `00-<32 hex>-<16 hex>-<2 hex>`, a later version
/// (not `ff`) the same followed by nothing or by `-…`; lowercase hex; neither id all zeros.
fn parent_of(h: &HeaderMap) -> Option<(bool, u64)> {
    let mut all = h.get_all("traceparent").iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return None;
    };
    let b = v.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    if !(hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55)) || zero(3..35) || zero(36..52) {
        return None;
    }
    let length_ok = match &b[0..2] {
        b"ff" => false,
        b"00" => b.len() == 55,
        _ => b.len() == 55 || b[55] == b'-',
    };
    if !length_ok {
        return None;
    }
    let text = std::str::from_utf8(b).ok()?;
    let flags = u8::from_str_radix(&text[53..55], 16).ok()?;
    let low = u64::from_str_radix(&text[19..35], 16).ok()?;
    Some((flags & 1 == 1, low))
}

/// The sampling decision of `s` for a request whose parent is `parent` (`None`: a root);
/// `rand` draws the roll of a root. A ratio decides from the parent's trace id when there is
/// one, as the SDK's `TraceIdRatioBased` does, so every hop of a trace agrees.
fn sampled(s: SamplerChoice, parent: Option<(bool, u64)>, rand: impl Fn() -> u64) -> bool {
    let roll = |r: f64| {
        if r >= 1.0 {
            return true;
        }
        let bound = (r.max(0.0) * (1u64 << 63) as f64) as u64;
        let draw = parent.map_or_else(&rand, |(_, low)| low);
        (draw >> 1) < bound
    };
    match s {
        SamplerChoice::AlwaysOn => true,
        SamplerChoice::AlwaysOff => false,
        SamplerChoice::Ratio(r) => roll(r),
        SamplerChoice::ParentBased(root) => parent.map_or_else(
            || match root {
                ParentRoot::AlwaysOn => true,
                ParentRoot::AlwaysOff => false,
                ParentRoot::Ratio(r) => roll(r),
            },
            |(sampled, _)| sampled,
        ),
    }
}

/// Clears the sampled flag of the `traceparent` in `h` (and of `forwarded`, the copy the
/// access log keeps): a request this hop did not sample tells the next hops so, and a
/// parent-based sampler there creates nothing either.
pub fn unsample(h: &mut HeaderMap, forwarded: &mut Option<String>) {
    let Some(v) = h.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if v.len() != 55 || v.as_bytes()[52] != b'-' {
        return;
    }
    let Some(flags) = v.get(53..).and_then(|f| u8::from_str_radix(f, 16).ok()) else {
        return;
    };
    if flags & 1 == 0 {
        return;
    }
    let mut s = String::with_capacity(55);
    s.push_str(&v[..53]);
    s.push_str(&format!("{:02x}", flags & !1));
    if let Ok(nv) = HeaderValue::from_str(&s) {
        h.insert("traceparent", nv);
        *forwarded = Some(s);
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap, Option<String>);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            if key == "traceparent" {
                self.1 = Some(value);
            }
            self.0.insert(name, v);
        }
    }
}

/// One request's trace context (present only while tracing is on).
#[derive(Debug, Clone)]
pub struct TraceCx {
    cx: Context,
    tracer: SdkTracer,
}

impl TraceCx {
    /// Writes this span's `traceparent` (and `tracestate`) into `h`; returns the traceparent.
    pub fn inject(&self, h: &mut HeaderMap) -> Option<String> {
        let mut inj = HeadersMut(h, None);
        TraceContextPropagator::new().inject_context(&self.cx, &mut inj);
        inj.1
    }

    /// A child span, started now.
    pub fn child(&self, name: String, kind: SpanKind) -> TraceCx {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, &self.cx);
        TraceCx {
            cx: self.cx.with_span(span),
            tracer: self.tracer.clone(),
        }
    }

    /// A finished child span that started at `start` (filters that did work are recorded after
    /// the fact, so filters that did nothing cost no span).
    pub fn finished_child(&self, name: &'static str, start: SystemTime, attrs: Vec<KeyValue>) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &self.cx);
        span.end();
    }

    /// Renames the span.
    pub fn rename(&self, name: String) {
        self.cx.span().update_name(name);
    }

    /// Sets attributes on the span.
    pub fn set(&self, attrs: Vec<KeyValue>) {
        self.cx.span().set_attributes(attrs);
    }

    /// Marks the span failed with `description`.
    pub fn error(&self, description: String) {
        self.cx
            .span()
            .set_status(opentelemetry::trace::Status::error(description));
    }

    /// Ends the span.
    pub fn end(&self) {
        self.cx.span().end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn export_outcomes_are_counted_and_a_failing_run_is_logged_once_a_minute() {
        let counters = ExportCounters::default();
        let c = Counted::new((), counters.clone(), "http://collector:4317".into());
        let t0 = Instant::now();
        let down = Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
            "refused".into(),
        ));
        let failing = |c: &Counted<()>| *c.failing.lock().expect("lock");
        c.record(5, &Ok(()), t0);
        assert_eq!(failing(&c), None);
        c.record(7, &down, t0);
        assert_eq!(failing(&c), Some((t0, 0)), "the first failure is logged");
        c.record(2, &down, t0 + Duration::from_secs(30));
        assert_eq!(
            failing(&c),
            Some((t0, 1)),
            "the next one within a minute is not"
        );
        let t1 = t0 + Duration::from_secs(61);
        c.record(1, &down, t1);
        assert_eq!(failing(&c), Some((t1, 0)), "a minute on, a reminder");
        c.record(4, &Ok(()), t1);
        assert_eq!(failing(&c), None, "recovered");
        assert_eq!(counters.exported.get(), 9);
        assert_eq!(counters.failures.get(), 3);
        assert_eq!(counters.lost.get(), 10);
    }

    #[test]
    fn environment_overrides_the_file_and_off_means_none() {
        let file = TracingConfig {
            endpoint: Some("http://collector:4318".into()),
            protocol: Some(OtlpProtocol::Http),
            headers: BTreeMap::from([("authorization".into(), "Bearer f".into())]),
            sampling_ratio: Some(0.5),
            resource: BTreeMap::from([("deployment.environment".into(), "prod".into())]),
        };
        let e = effective(&file, "meshgate-gateway", &env(&[]))
            .expect("ok")
            .expect("on");
        assert_eq!(e.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(
            e.sampler,
            SamplerChoice::ParentBased(ParentRoot::Ratio(0.5))
        );
        assert_eq!(e.resource["service.name"], "meshgate-gateway");
        let e = effective(
            &file,
            "meshgate-gateway",
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=Bearer%20e,x-tenant=t",
                ),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                ("OTEL_SERVICE_NAME", "edge"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging"),
            ]),
        )
        .expect("ok")
        .expect("on");
        assert_eq!(e.endpoint, "http://127.0.0.1:4317");
        assert_eq!(e.protocol, OtlpProtocol::Grpc);
        assert_eq!(e.headers["authorization"], "Bearer e");
        assert_eq!(e.headers["x-tenant"], "t");
        assert_eq!(
            e.sampler,
            SamplerChoice::ParentBased(ParentRoot::Ratio(0.01))
        );
        assert_eq!(e.resource["service.name"], "edge");
        assert_eq!(e.resource["deployment.environment"], "staging");
        let e = effective(
            &file,
            "x",
            &env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:1/custom")]),
        )
        .expect("ok")
        .expect("on");
        assert_eq!(
            e.endpoint, "http://h:1/custom",
            "the signal variable is used as is"
        );
        assert!(
            effective(&file, "x", &env(&[("OTEL_SDK_DISABLED", "true")]))
                .expect("ok")
                .is_none()
        );
        assert!(
            effective(&TracingConfig::default(), "x", &env(&[]))
                .expect("ok")
                .is_none()
        );
        let bad = effective(
            &file,
            "x",
            &env(&[
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ]),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn sampling_is_decided_once_from_the_parent_or_the_ratio() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_str(v).expect("value"));
            h
        };
        let on = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let off = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let low = 0x8448_eb21_1c80_319c;
        assert_eq!(parent_of(&h(on)), Some((true, low)));
        assert_eq!(parent_of(&h(off)), Some((false, low)));
        // not a parent, as the SDK's propagator would not read one either
        for bad in [
            "00-zz-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert_eq!(parent_of(&h(bad)), None, "{bad}");
        }
        assert_eq!(
            parent_of(&h(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"
            )),
            Some((true, low)),
            "a later version is read by the same layout"
        );
        assert_eq!(parent_of(&HeaderMap::new()), None);
        let pb = |r| SamplerChoice::ParentBased(ParentRoot::Ratio(r));
        // a parent's decision wins over the root ratio, both ways
        assert!(sampled(pb(0.0), Some((true, 0)), || 0));
        assert!(!sampled(pb(1.0), Some((false, 0)), || 0));
        // roots roll the ratio: a draw under it samples, one over it does not
        assert!(sampled(pb(0.01), None, || 0));
        assert!(!sampled(pb(0.01), None, || u64::MAX));
        assert!(sampled(pb(1.0), None, || u64::MAX));
        assert!(!sampled(SamplerChoice::AlwaysOff, Some((true, 0)), || 0));
        // a plain ratio decides from the trace id, whatever the roll: every hop agrees
        let r = SamplerChoice::Ratio(0.5);
        assert!(sampled(r, Some((false, 1)), || u64::MAX));
        assert!(!sampled(r, Some((true, u64::MAX)), || 0));
        // over many draws the ratio holds roughly
        let n = (0..10_000)
            .filter(|_| sampled(pb(0.01), None, crate::http::ctx::fast_rand))
            .count();
        assert!((30..=300).contains(&n), "{n} of 10000 at 1%");
    }

    #[test]
    fn an_unsampled_hop_clears_the_flag_it_forwards() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"),
        );
        let mut fwd = None;
        unsample(&mut h, &mut fwd);
        let want = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02";
        assert_eq!(h["traceparent"], want);
        assert_eq!(fwd.as_deref(), Some(want));
        // already unsampled, or malformed: left alone
        let mut fwd = None;
        unsample(&mut h, &mut fwd);
        assert_eq!(fwd, None);
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        unsample(&mut h, &mut fwd);
        assert_eq!(h["traceparent"], "garbage");
    }
}
