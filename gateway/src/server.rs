//! The gateway's request path: the edge chain in DESIGN §8 order, then the mesh upstream.
//!
//! hygiene (strip spoofable identity headers, request id, traceparent, X-Forwarded-*) -> head
//! size (431) -> route (404) -> CORS preflight -> content type (415) -> body limit (413, before
//! the upstream sees a byte) -> request transforms -> backend choice (split, pinning) and rewrite
//! -> upstream through a mesh tunnel with timeout (504) and budgeted retries -> response
//! transforms -> CORS headers -> access log and metrics. Every refusal is a problem+json
//! answer from `meshgate_agent::http::respond`.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use meshgate_agent::http::{
    Body,
    front::{ConnInfo, Handler},
    full,
    respond::Problem,
    upstream::{MeshHttpClient, UpstreamError},
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::{info, warn};

use crate::{
    config::{Compiled, RoutePolicy},
    cors::Preflight,
    routes::{CompiledRoute, RequestView, choose_backend, rewrite_path},
    transform::{self, JsonOutcome},
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Retries allowed as a share of requests, refilled by traffic.
#[derive(Debug)]
struct RetryBudget {
    tokens: Mutex<f64>,
}

impl RetryBudget {
    fn deposit(&self, percent: f64) {
        let mut t = self
            .tokens
            .lock()
            .expect("invariant: budget lock not poisoned");
        *t = (*t + percent / 100.0).min(100.0);
    }

    fn withdraw(&self) -> bool {
        let mut t = self
            .tokens
            .lock()
            .expect("invariant: budget lock not poisoned");
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Gateway metrics.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    requests: Family<Vec<(&'static str, String)>, Counter>,
    reloads: Family<Vec<(&'static str, String)>, Counter>,
}

impl GatewayMetrics {
    /// Registers into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshgate_gateway_requests",
            "requests by route and status code",
            self.requests.clone(),
        );
        registry.register(
            "meshgate_gateway_config_reloads",
            "config reloads by result (ok, invalid)",
            self.reloads.clone(),
        );
    }

    /// Counts a reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&vec![(
                "result",
                if ok { "ok" } else { "invalid" }.to_owned(),
            )])
            .inc();
    }
}

/// The gateway handler behind the public front.
pub struct Gateway {
    compiled: ArcSwap<Compiled>,
    client: MeshHttpClient,
    budget: RetryBudget,
    metrics: Arc<GatewayMetrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, for rate limits.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn rand64() -> u64 {
    u64::from_le_bytes(meshgate_ca::pki::random_bytes::<8>())
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for h in HOP_BY_HOP.iter().copied().map(str::to_owned).chain(listed) {
        headers.remove(h.as_str());
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Gateway {
    /// A gateway serving `compiled`, reaching services through `client`.
    pub fn new(compiled: Compiled, client: MeshHttpClient, metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            compiled: ArcSwap::from_pointee(compiled),
            client,
            budget: RetryBudget {
                tokens: Mutex::new(10.0),
            },
            metrics,
        }
    }

    /// Swaps in a new compiled config; requests in flight finish on the old one.
    pub fn swap(&self, compiled: Compiled) {
        self.compiled.store(Arc::new(compiled));
    }

    /// The config in use.
    pub fn current(&self) -> Arc<Compiled> {
        self.compiled.load_full()
    }

    async fn serve(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> (Response<Body>, String, String) {
        let cfg = self.compiled.load_full();
        let (mut parts, body) = req.into_parts();
        let scheme = if conn.tls { "https" } else { "http" };
        let mut rand = rand64;
        let ingress = cfg
            .hygiene
            .ingress(&mut parts.headers, conn.peer.ip(), scheme, &mut rand);
        let rid = ingress.request_id.clone();
        cfg.auth.strip_identity(&mut parts.headers);
        let head_bytes: usize = parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if head_bytes > cfg.limits.max_header_bytes {
            return (
                Problem::HeadersTooLarge {
                    limit: cfg.limits.max_header_bytes,
                }
                .response(&rid),
                rid,
                "-".into(),
            );
        }
        if cfg.redirect_https && !conn.tls {
            return (redirect(&parts, cfg.https_port), rid, "-".into());
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let view = RequestView {
            method: parts.method.as_str(),
            host: &host,
            path: &path,
            query: &query,
            headers: &parts.headers,
        };
        let Some(matched) = cfg.table.find(&view) else {
            return (Problem::NoRoute.response(&rid), rid, "-".into());
        };
        let route: &CompiledRoute = matched.route;
        let name = route.config.name.clone();
        let empty = RoutePolicy::default();
        let policy = cfg.policies.get(&name).unwrap_or(&empty);
        if let Some(cors) = &policy.cors {
            match cors.preflight(&parts.method, &parts.headers) {
                Preflight::NotPreflight => {}
                Preflight::Allowed(h) => {
                    let mut r = Response::new(meshgate_agent::http::empty());
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    *r.headers_mut() = h;
                    return (r, rid, name);
                }
                Preflight::Denied(why) => {
                    return (
                        Problem::Forbidden(format!("CORS preflight refused: {why}")).response(&rid),
                        rid,
                        name,
                    );
                }
            }
        }
        let cfg_route = &route.config;
        if !cfg_route.content_types.is_empty() && has_body(&parts.headers) {
            let got = media_type(&parts.headers).unwrap_or_default();
            if !cfg_route
                .content_types
                .iter()
                .any(|c| c.eq_ignore_ascii_case(&got))
            {
                return (
                    Problem::UnsupportedMediaType { got }.response(&rid),
                    rid,
                    name,
                );
            }
        }
        let limit = cfg_route.max_body.unwrap_or(cfg.limits.max_body);
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return (Problem::BodyTooLarge { limit }.response(&rid), rid, name);
        }
        let mut bytes = match collect_limited(body, usize::try_from(limit).unwrap_or(usize::MAX))
            .await
        {
            Ok(b) => b,
            Err(Collect::TooLarge) => {
                return (Problem::BodyTooLarge { limit }.response(&rid), rid, name);
            }
            Err(Collect::Failed) => {
                return (
                    Problem::BadRequest("the request body could not be read".into()).response(&rid),
                    rid,
                    name,
                );
            }
        };
        let mut rate_headers = Vec::new();
        if let Some(route_auth) = &cfg_route.auth {
            let mut q = query.clone();
            let principal = match cfg
                .auth
                .authenticate(
                    route_auth,
                    &mut parts.headers,
                    &mut q,
                    conn.client_cert.as_deref(),
                )
                .await
            {
                Ok(p) => p,
                Err(problem) => return (problem.response(&rid), rid, name),
            };
            cfg.auth.inject(&principal, &mut parts.headers);
            if q != query {
                let pq = if q.is_empty() {
                    path.clone()
                } else {
                    format!("{path}?{q}")
                };
                if let Ok(u) = pq.parse() {
                    parts.uri = u;
                }
            }
            if let Some(limit) = &cfg_route.rate_limit {
                match cfg
                    .auth
                    .rate_limit(
                        limit,
                        &name,
                        Some(&principal),
                        ingress.client_ip,
                        &parts.headers,
                        now_ms(),
                    )
                    .await
                {
                    Ok(h) => rate_headers = h,
                    Err(problem) => return (problem.response(&rid), rid, name),
                }
            }
        } else if let Some(limit) = &cfg_route.rate_limit {
            match cfg
                .auth
                .rate_limit(
                    limit,
                    &name,
                    None,
                    ingress.client_ip,
                    &parts.headers,
                    now_ms(),
                )
                .await
            {
                Ok(h) => rate_headers = h,
                Err(problem) => return (problem.response(&rid), rid, name),
            }
        }
        let query = parts.uri.query().unwrap_or_default().to_owned();
        // CORS decides on the request's Origin after the upstream answered; keep the headers only then
        let original_headers = policy.cors.is_some().then(|| parts.headers.clone());
        if let Some(t) = &policy.transforms {
            if let Some(h) = &t.request_headers {
                transform::apply_headers(h, &mut parts.headers);
            }
            if let Some(j) = &t.request_json
                && let JsonOutcome::Rewritten(b) =
                    transform::apply_json(j, parts.headers.get(header::CONTENT_TYPE), &bytes)
            {
                bytes = Bytes::from(b);
                parts.headers.remove(header::CONTENT_LENGTH);
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(
            "traceparent",
            HeaderValue::from_str(&ingress.traceparent).unwrap_or(HeaderValue::from_static("")),
        );
        if let Some(h) = &route.config.rewrite.as_ref().and_then(|r| r.host.clone())
            && let Ok(v) = HeaderValue::from_str(h)
        {
            parts.headers.insert(header::HOST, v);
        }
        let new_path = rewrite_path(route, &path);
        let pq = if query.is_empty() {
            new_path
        } else {
            format!("{new_path}?{query}")
        };
        parts.uri = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        let timeout = cfg_route.timeout.unwrap_or(cfg.limits.timeout);
        let retries = cfg_route.retries.as_ref();
        if let Some(r) = retries {
            self.budget.deposit(r.budget_percent);
        }
        let max_attempts = 1 + if idempotent(&parts.method) {
            retries.map_or(0, |r| r.attempts)
        } else {
            0
        };
        let started = Instant::now();
        let mut attempt = 0;
        let (resp, service) = loop {
            attempt += 1;
            let roll = u32::try_from(rand64() % 10_000).unwrap_or(0);
            let service =
                choose_backend(route, &view_of(&parts, &host, &path, &query), roll).to_owned();
            let mut req = Request::from_parts(parts.clone(), Full::new(bytes.clone()));
            *req.version_mut() = http::Version::HTTP_11;
            let left = timeout.saturating_sub(started.elapsed());
            let result = tokio::time::timeout(left, self.client.send(&service, req)).await;
            let retryable = match &result {
                Ok(Err(UpstreamError::Unavailable(_))) => true,
                Ok(Ok(r)) => r.status() == StatusCode::SERVICE_UNAVAILABLE,
                _ => false,
            };
            if retryable && attempt < max_attempts && self.budget.withdraw() {
                continue;
            }
            break (result, service);
        };
        let upstream = match resp {
            Err(_) => {
                return (
                    Problem::UpstreamTimeout {
                        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    }
                    .response(&rid),
                    rid,
                    name,
                );
            }
            Ok(Err(UpstreamError::Unavailable(why))) => {
                warn!(request_id = %rid, route = %name, dst.service = %service, reason = %why, "upstream unavailable");
                return (
                    Problem::UpstreamUnavailable { service }.response(&rid),
                    rid,
                    name,
                );
            }
            Ok(Err(UpstreamError::Failed(why))) => {
                warn!(request_id = %rid, route = %name, dst.service = %service, reason = %why, "upstream failed");
                return (Problem::UpstreamFailed.response(&rid), rid, name);
            }
            Ok(Ok(r)) => r,
        };
        let (mut rparts, rbody) = upstream.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let mut body: Body = rbody
            .map_err(|e| Box::new(e) as meshgate_agent::http::BoxError)
            .boxed();
        if let Some(t) = &policy.transforms {
            if let Some(h) = &t.response_headers {
                transform::apply_headers(h, &mut rparts.headers);
            }
            if let Some(j) = &t.response_json
                && transform::is_json(rparts.headers.get(header::CONTENT_TYPE))
            {
                match collect_limited(body, j.max_bytes).await {
                    Ok(b) => {
                        body = match transform::apply_json(
                            j,
                            rparts.headers.get(header::CONTENT_TYPE),
                            &b,
                        ) {
                            JsonOutcome::Rewritten(v) => {
                                rparts.headers.remove(header::CONTENT_LENGTH);
                                full(v)
                            }
                            JsonOutcome::Unchanged => full(b),
                        };
                    }
                    Err(_) => return (Problem::UpstreamFailed.response(&rid), rid, name),
                }
            }
        }
        if let (Some(cors), Some(h)) = (&policy.cors, &original_headers) {
            cors.apply_response(h, &mut rparts.headers);
        }
        if let Ok(v) = HeaderValue::from_str(&rid) {
            rparts.headers.insert("x-request-id", v);
        }
        for (k, v) in rate_headers {
            rparts.headers.insert(k, v);
        }
        (Response::from_parts(rparts, body), rid, name)
    }
}

/// Why a body could not be collected.
enum Collect {
    TooLarge,
    Failed,
}

/// Collects at most `limit` bytes of `body`. A boxed, explicitly `Send` future: written inline,
/// the compiler's higher-ranked checks on `Limited`'s boxed error reject the handler future.
fn collect_limited<B>(
    body: B,
    limit: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, Collect>> + Send>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<meshgate_agent::http::BoxError>,
{
    Box::pin(async move {
        match Limited::new(body, limit).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(Collect::TooLarge)
            }
            Err(_) => Err(Collect::Failed),
        }
    })
}

fn view_of<'a>(
    parts: &'a http::request::Parts,
    host: &'a str,
    path: &'a str,
    query: &'a str,
) -> RequestView<'a> {
    RequestView {
        method: parts.method.as_str(),
        host,
        path,
        query,
        headers: &parts.headers,
    }
}

fn redirect(parts: &http::request::Parts, https_port: Option<u16>) -> Response<Body> {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let port = match https_port {
        Some(443) | None => String::new(),
        Some(p) => format!(":{p}"),
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut r = Response::new(meshgate_agent::http::empty());
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{pq}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The front's handler: a shared gateway.
#[derive(Debug, Clone)]
pub struct GatewayHandler(pub Arc<Gateway>);

impl Handler for GatewayHandler {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
        let this = self.0.clone();
        Box::pin(async move {
            let started = Instant::now();
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            let (resp, rid, route) = this.serve(req, &conn).await;
            let status = resp.status().as_u16();
            this.metrics
                .requests
                .get_or_create(&vec![
                    ("route", route.clone()),
                    ("code", status.to_string()),
                ])
                .inc();
            info!(
                target: "access",
                request_id = %rid,
                src.addr = %conn.peer,
                method = %method,
                path = %path,
                route = %route,
                status,
                duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "request"
            );
            resp
        })
    }
}
