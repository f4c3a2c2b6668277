//! The admin API on loopback (default 127.0.0.1:15000): `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text), `/version`, `/status`, `/config`, `/certs`, `/endpoints` (JSON), and what
//! a composition adds (`/authz/check` on agents; `/routes`, `/routes/match` and `POST /why` on
//! gateways). Read-only; the CLI reads it.
//!
//! `/readyz` is 200 only while certificates are held, listeners are bound, the process is not
//! draining and no certificate is at risk (expired, or in its last quarter with renewal
//! failing); otherwise 503 with one line per reason. `/version` names the build and the kind of
//! process (`agent` or `gateway`), so the CLI can tell when it was pointed at the wrong one.

use std::{
    convert::Infallible,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Instant, SystemTime},
};

pub mod authz;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    discovery::Endpoints,
    drain::Drain,
    identity::{IdentityManager, StartupStatus},
    telemetry::Metrics,
};

/// This build's version, as `/version` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the admin API reads.
#[derive(Debug)]
pub struct AdminState {
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The effective config as JSON, secrets redacted ([`redact`]); replaced on reload.
    pub config: arc_swap::ArcSwap<serde_json::Value>,
    /// Set once SVIDs are held and listeners bound.
    pub ready: AtomicBool,
    /// Filled in once the identity manager has joined.
    pub identity: OnceLock<IdentityManager>,
    /// Filled in once discovery is set up.
    pub endpoints: OnceLock<Arc<Endpoints>>,
    /// Drain state (draining => not ready).
    pub drain: Drain,
    /// Extra read-only endpoints a composition adds (the gateway's `/routes`).
    pub extension: OnceLock<Arc<dyn AdminExtension>>,
    /// What identity start-up waits for (the CA, a renewal); pass it to
    /// `IdentityManager::start_with` in `IdentityOptions::status` and `/readyz` shows it.
    pub startup: Arc<StartupStatus>,
    /// The bound listeners, for `/status`.
    listeners: std::sync::Mutex<Vec<ListenerView>>,
    /// The config generation and the last reload, for `/status`.
    reloads: std::sync::Mutex<ConfigView>,
    started: SystemTime,
}

/// One bound listener as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerView {
    /// What it serves: `admin`, `inbound`, `http`, `https`, `upstream web -> users`.
    pub name: String,
    /// The bound address.
    pub address: std::net::SocketAddr,
}

/// The config's state as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigView {
    /// 1 at start, plus one per applied reload.
    pub generation: u64,
    /// When the config in use was applied (RFC 3339).
    pub applied_at: String,
    /// Whether this process reloads its config (a gateway on SIGHUP; an agent restarts).
    pub reloads: bool,
    /// The last reload attempt, if any.
    pub last_reload: Option<ReloadView>,
}

/// One reload attempt.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadView {
    /// When (RFC 3339).
    pub at: String,
    /// `ok` or `invalid` (the previous config kept serving).
    pub result: &'static str,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminState {
    /// Not ready yet, no identity or endpoints; `config` is the effective config as JSON.
    pub fn new(metrics: Arc<Metrics>, config: serde_json::Value, drain: Drain) -> Self {
        Self {
            metrics,
            config: arc_swap::ArcSwap::from_pointee(redacted(config)),
            ready: AtomicBool::new(false),
            identity: OnceLock::new(),
            endpoints: OnceLock::new(),
            drain,
            extension: OnceLock::new(),
            startup: Arc::new(StartupStatus::default()),
            listeners: std::sync::Mutex::new(Vec::new()),
            reloads: std::sync::Mutex::new(ConfigView {
                generation: 1,
                applied_at: rfc3339(SystemTime::now()),
                reloads: false,
                last_reload: None,
            }),
            started: SystemTime::now(),
        }
    }

    /// Records a bound listener for `/status`.
    pub fn listener(&self, name: impl Into<String>, address: std::net::SocketAddr) {
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(ListenerView {
                name: name.into(),
                address,
            });
    }

    /// Marks this process as one that reloads its config (the gateway).
    pub fn reloadable(&self) {
        self.reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reloads = true;
    }

    /// Records a reload attempt: applied (`Ok`, a new generation) or refused with its reason.
    pub fn reloaded(&self, result: Result<(), String>) {
        let mut r = self
            .reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = rfc3339(SystemTime::now());
        r.last_reload = Some(match result {
            Ok(()) => {
                r.generation += 1;
                r.applied_at.clone_from(&at);
                ReloadView {
                    at,
                    result: "ok",
                    error: None,
                }
            }
            Err(e) => ReloadView {
                at,
                result: "invalid",
                error: Some(e),
            },
        });
    }

    /// `/status`: what this process is, where it listens, its tunnel peers, its discovery and
    /// config state (certificates are `/certs`).
    pub async fn status(&self) -> serde_json::Value {
        let cfg = self.config.load();
        let now = Instant::now();
        let discovery: Vec<serde_json::Value> = self
            .endpoints
            .get()
            .map(|e| e.snapshot(now))
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let total = s.endpoints.len();
                let healthy = s.endpoints.iter().filter(|e| !e.ejected).count();
                serde_json::json!({
                    "service": s.service,
                    "source": s.source,
                    "endpoints": total,
                    "healthy": healthy,
                    "stale": s.stale,
                    "last_update": s.last_update,
                    "last_error": s.last_error,
                })
            })
            .collect();
        let reasons = self.not_ready_reasons().await;
        serde_json::json!({
            "kind": self.kind(),
            "version": VERSION,
            "node": cfg.get("node"),
            "trust_domain": cfg.get("trust_domain"),
            "started_at": rfc3339(self.started),
            "uptime_seconds": SystemTime::now().duration_since(self.started).map(|d| d.as_secs()).unwrap_or(0),
            "ready": reasons.is_empty(),
            "not_ready": reasons,
            "listeners": *self.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            "peers": self.metrics.peers.snapshot(),
            "discovery": discovery,
            "config": *self.reloads.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        })
    }

    /// `agent` or `gateway`: a gateway's effective config has `routes`.
    pub fn kind(&self) -> &'static str {
        if self.config.load().get("routes").is_some() {
            "gateway"
        } else {
            "agent"
        }
    }
}

/// `/version`.
#[derive(Debug, Serialize)]
struct VersionView {
    name: &'static str,
    version: &'static str,
    kind: &'static str,
}

impl AdminState {
    /// Replaces the config `/config` shows (after a reload); secrets are redacted.
    pub fn set_config(&self, config: serde_json::Value) {
        self.config.store(Arc::new(redacted(config)));
    }
}

/// Field names whose values are secrets, compared case-insensitively as suffixes.
const SECRET_KEYS: &[&str] = &[
    "password",
    "secret",
    "token",
    "private_key",
    "client_secret",
    "keys",
    "jwks",
    "api_key",
];

/// `v` with every secret replaced by `"[redacted]"`: values of secret-named fields (passwords,
/// tokens, inline keys and JWKS, API key hashes) and the user-info part of URLs
/// (`redis://:pass@host` -> `redis://[redacted]@host`). Paths to files holding secrets are
/// kept: they are not secrets.
pub fn redacted(mut v: serde_json::Value) -> serde_json::Value {
    redact(&mut v);
    // collector headers carry auth tokens under any name
    if let Some(h) = v
        .pointer_mut("/telemetry/tracing/headers")
        .and_then(|h| h.as_object_mut())
    {
        for val in h.values_mut() {
            *val = serde_json::Value::String("[redacted]".into());
        }
    }
    v
}

fn redact(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = SECRET_KEYS
                    .iter()
                    .any(|s| k == *s || k.ends_with(&format!("_{s}")))
                    && !k.ends_with("_file")
                    && !val.is_null();
                if secret {
                    *val = Value::String("[redacted]".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) => {
            if let Some(r) = without_userinfo(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

/// `url` with its user-info replaced (`redis://:pass@host` -> `redis://[redacted]@host`), or
/// `None` when it has none.
pub(crate) fn without_userinfo(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (userinfo, host) = rest.split_once('@')?;
    (!userinfo.contains('/')).then(|| format!("{scheme}://[redacted]@{host}"))
}

/// The answer to an extension's POST, still to be computed.
pub type PostFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send + 'a>,
>;

/// Extra admin endpoints, answered with JSON.
pub trait AdminExtension: Send + Sync + std::fmt::Debug {
    /// The JSON for `path` (with its raw `query`), or None if the path is not this extension's.
    fn get(&self, path: &str, query: &str) -> Option<Result<serde_json::Value, String>>;

    /// The JSON answer to a POST of the JSON `body` to `path`, or None if the path takes no
    /// POST. For questions that carry credentials (`/why`), which must not travel in a URL;
    /// they change nothing.
    fn post<'a>(&'a self, _path: &'a str, _body: serde_json::Value) -> Option<PostFuture<'a>> {
        None
    }
}

/// The largest POST body the admin API reads.
const MAX_POST_BYTES: usize = 64 * 1024;

/// How long the admin API waits for a POST body, and for a request head.
const POST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// At most this many admin connections are served at once; more wait to be accepted.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Whether `host` (a Host header: `name[:port]`) names an IP address or localhost.
fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// A POST: only to an extension path that takes one, only JSON (a browser's cross-site form
/// cannot send `application/json` without a preflight, which this API never answers).
async fn post(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let read_only = || {
        respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the admin API is read-only: use GET (a gateway also takes POST /why)\n",
        )
    };
    let Some(ext) = state.extension.get() else {
        return read_only();
    };
    let json_body = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let path = req.uri().path().to_owned();
    if !json_body {
        return respond(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "text/plain",
            "POST a JSON body (Content-Type: application/json)\n",
        );
    }
    let read = tokio::time::timeout(
        POST_READ_TIMEOUT,
        http_body_util::Limited::new(req.into_body(), MAX_POST_BYTES).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            return respond(
                StatusCode::REQUEST_TIMEOUT,
                "text/plain",
                format!("the body did not arrive within {POST_READ_TIMEOUT:?}\n"),
            );
        }
        Ok(Err(_)) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("the body is over {MAX_POST_BYTES} bytes or was cut off\n"),
            );
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("the body is not JSON: {e}\n"),
            );
        }
    };
    match ext.post(&path, value) {
        None => read_only(),
        Some(f) => match f.await {
            Ok(v) => json(&v),
            Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        },
    }
}

/// One certificate as `/certs` shows it.
#[derive(Debug, Serialize)]
pub struct CertView {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Seconds until expiry.
    pub time_left_seconds: u64,
    /// The signing intermediate in its chain: RFC 3339 expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_not_after: Option<String>,
    /// Seconds until the intermediate expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_time_left_seconds: Option<u64>,
    /// Fingerprint of the root the CA signs under, when the bundle names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_root: Option<String>,
    /// Sequence of the trust bundle held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_sequence: Option<u64>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl AdminState {
    async fn certs(&self) -> Vec<CertView> {
        let Some(ids) = self.identity.get() else {
            return Vec::new();
        };
        let now = SystemTime::now();
        let bundle = ids.bundle().load_full();
        ids.identities()
            .await
            .into_iter()
            .filter_map(|i| {
                i.info()
                    .map(|info| (i.intermediate_info(), i.id.to_string(), info))
            })
            .map(|(int, id, info)| CertView {
                spiffe_id: id,
                serial: info.serial.clone(),
                not_before: rfc3339(info.not_before),
                not_after: rfc3339(info.not_after),
                time_left_seconds: info.remaining(now).as_secs(),
                intermediate_not_after: int.as_ref().map(|i| rfc3339(i.not_after)),
                intermediate_time_left_seconds: int.map(|i| i.remaining(now).as_secs()),
                signing_root: bundle.signing_root().map(str::to_owned),
                bundle_sequence: Some(bundle.sequence()),
            })
            .collect()
    }

    async fn metrics_text(&self) -> String {
        if let Some(ids) = self.identity.get() {
            let problems = ids.problems().await;
            if let Some(int) = ids.node().intermediate_info() {
                self.metrics.set_intermediate_expiry(
                    i64::try_from(int.remaining(SystemTime::now()).as_secs()).unwrap_or(i64::MAX),
                );
            }
            self.metrics
                .set_bundle_sequence(ids.bundle().load().sequence());
            for c in self.certs().await {
                self.metrics.set_cert_expiry(
                    &c.spiffe_id,
                    i64::try_from(c.time_left_seconds).unwrap_or(i64::MAX),
                );
                self.metrics.set_cert_at_risk(
                    &c.spiffe_id,
                    problems.iter().any(|p| p.spiffe_id == c.spiffe_id),
                );
            }
            self.metrics.set_renew_failures(ids.status().renew_failures);
        }
        let ready = self.not_ready_reasons().await.is_empty();
        self.metrics.set_ready(ready);
        self.metrics.encode()
    }

    /// Why the process is not ready, one line each; empty when it is.
    pub async fn not_ready_reasons(&self) -> Vec<String> {
        if self.drain.is_draining() {
            return vec!["draining".into()];
        }
        if !self.ready.load(Ordering::SeqCst) {
            return vec![match self.startup.get() {
                Some(line) => format!("starting: {line}"),
                None => "waiting for certificates and listeners".into(),
            }];
        }
        match self.identity.get() {
            Some(ids) => ids
                .problems()
                .await
                .into_iter()
                .map(|p| p.message)
                .collect(),
            None => Vec::new(),
        }
    }
}

fn respond(
    code: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

fn json(v: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => respond(StatusCode::OK, "application/json", b),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

async fn route(req: Request<Incoming>, state: Arc<AdminState>) -> Response<Full<Bytes>> {
    // DNS rebinding: a web page whose name now resolves to 127.0.0.1 may read its own origin, so
    // it could read /config or /status, or POST JSON same-origin; its requests carry its name as
    // Host. Local tools send an address or `localhost`; a GET without Host is no browser's, a
    // POST must say.
    let host_ok = match req.headers().get(http::header::HOST) {
        Some(v) => v.to_str().is_ok_and(loopback_host),
        None => req.method() != Method::POST,
    };
    if !host_ok {
        return respond(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the admin API answers requests addressed to an IP address or localhost only (a DNS name is how a web page would reach it)\n",
        );
    }
    if req.method() == Method::POST {
        return post(req, &state).await;
    }
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the admin API is read-only: use GET\n",
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let reasons = state.not_ready_reasons().await;
            if reasons.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                let body: String = reasons
                    .iter()
                    .map(|r| format!("not ready: {r}\n"))
                    .collect();
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
            }
        }
        "/version" => json(&VersionView {
            name: "meshgate",
            version: VERSION,
            kind: state.kind(),
        }),
        "/metrics" => {
            let text = state.metrics_text().await;
            if wants_openmetrics(req.headers()) {
                respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            } else {
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus_text(&text),
                )
            }
        }
        "/config" => json(&**state.config.load()),
        "/status" => json(&state.status().await),
        "/certs" => json(&state.certs().await),
        "/endpoints" => match state.endpoints.get() {
            Some(e) => json(&e.snapshot(Instant::now())),
            None => json(&Vec::<()>::new()),
        },
        path => match state
            .extension
            .get()
            .and_then(|x| x.get(path, req.uri().query().unwrap_or_default()))
        {
            Some(Ok(v)) => json(&v),
            Some(Err(e)) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /healthz /readyz /metrics /version /status /config /certs /endpoints\n",
            ),
        },
    }
}

/// Whether the scraper asked for OpenMetrics (`Accept: application/openmetrics-text`).
fn wants_openmetrics(h: &http::HeaderMap) -> bool {
    h.get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: counters' `HELP` and `TYPE`
/// lines name the `_total` series, and `# UNIT` and `# EOF` go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let series = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {series} {text}\n"));
            }
            out.push_str(&format!("# TYPE {series} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serves the admin API until the process ends (it keeps answering while draining).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, state).await) }
            });
            // a client that never finishes its head is closed (a slot is not held forever)
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(POST_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn user_info_is_cut_from_urls_shown() {
        assert_eq!(
            super::without_userinfo("http://user:pw@collector:4317").as_deref(),
            Some("http://[redacted]@collector:4317")
        );
        assert_eq!(super::without_userinfo("http://collector:4317"), None);
        assert_eq!(super::without_userinfo("http://collector:4317/a@b"), None);
    }

    #[test]
    fn requests_need_a_host_that_is_an_address_or_localhost() {
        for ok in [
            "127.0.0.1:15000",
            "localhost:15000",
            "LOCALHOST",
            "[::1]:15000",
            "::1",
            "10.0.0.1",
        ] {
            assert!(super::loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:15000",
            "127.0.0.1.nip.io",
            "localhost.evil",
            "",
        ] {
            assert!(!super::loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn prometheus_text_names_counter_series() {
        let m = crate::telemetry::Metrics::new();
        m.denied(crate::telemetry::DenyReason::Policy);
        m.tunnel_connected(std::time::Duration::from_millis(3));
        let text = super::prometheus_text(&m.encode());
        assert!(
            text.contains("# TYPE meshgate_authz_denials_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP meshgate_authz_denials_total connections"));
        assert!(text.contains("meshgate_authz_denials_total{reason=\"policy\"} 1\n"));
        assert!(text.contains("# TYPE meshgate_tunnel_connect_duration_seconds histogram\n"));
        assert!(text.contains("meshgate_tunnel_connect_duration_seconds_count 1\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn secrets_never_reach_config_output() {
        let v = redacted(serde_json::json!({
            "auth": {
                "rate_limit_store": {"url": "redis://:s3cret@10.0.0.1:6379/0", "password": "hunter2"},
                "jwt": [{"name": "a", "jwks": {"keys": [{"k": "c2VjcmV0"}]}, "jwks_file": "/etc/jwks.json"}],
                "api_keys": {"consumers": [{"name": "c", "keys": ["sha256:abc"]}]},
                "introspection": [{"client_secret": "x", "client_secret_file": "/run/s"}]
            },
            "ca": {"join_token_file": "/run/token"},
            "telemetry": {"tracing": {"endpoint": "http://c:4317", "headers": {"x-honeycomb-team": "hc-key-1"}}}
        }));
        let text = v.to_string();
        for secret in [
            "s3cret",
            "hunter2",
            "c2VjcmV0",
            "sha256:abc",
            "\"x\"",
            "hc-key-1",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("/etc/jwks.json")
                && text.contains("/run/token")
                && text.contains("/run/s")
        );
        assert!(
            text.contains("redis://[redacted]@10.0.0.1:6379/0"),
            "{text}"
        );
    }
}
