//! The one request path both modes run (DESIGN §3):
//!
//! ```text
//! head checks (authority, path normalization, head size)
//!   -> pre-route filters -> route resolution -> { the route's chain, its action }
//!   -> response filters (every filter's on_response, for upstream AND local answers)
//!   -> access log + metrics, in one place
//! ```
//!
//! Filters run on the head: authentication, authorization and rate limits decide before a body
//! byte is read. The body then streams to the action through [`Guarded`] (413 as soon as the
//! limit is crossed, 408 when it stalls); only a chain whose filters declared a need buffers it,
//! up to their cap. Every local answer is a [`Problem`] mapped in `respond.rs` (gRPC callers
//! get a gRPC status).
//!
//! The pipeline's configuration is a [`PipelineConfig`] swapped whole on reload: requests in
//! flight finish on the one they started with.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Version, header, request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tracing::debug;

use super::{
    Body,
    action::RouteAction,
    body::{BodyFault, BodyState, CollectError, Guarded, collect_capped},
    chain::{Chain, Stop},
    ctx::{ConnInfo, Ctx},
    path::{PathOptions, normalize},
    respond::{Problem, is_grpc},
};
use crate::telemetry::{
    access::{AccessLog, HttpRecord, LoggedBody},
    metrics::{LatencyFamily, latency_family},
    otel::Tracing,
};

/// A resolved route: its filters, its action, and the body limits it applies.
#[derive(Debug)]
pub struct Route {
    /// The route's name (logs, metrics).
    pub name: Arc<str>,
    /// Its filters, in order.
    pub chain: Chain,
    /// What it does with requests its filters let through.
    pub action: Arc<dyn RouteAction>,
    /// Largest request body (413 beyond, enforced while streaming).
    pub max_body: u64,
    /// A request body that sends nothing for this long gets 408.
    pub body_idle_timeout: Duration,
    /// Whether TRACE requests may use this route (405 otherwise).
    pub allow_trace: bool,
    /// Its metric handles (start with `RouteStats::default()`).
    pub stats: RouteStats,
}

/// Picks the route for a request: a pure function of the config (and discovery snapshot).
pub trait Router: Send + Sync + std::fmt::Debug {
    /// The route for `req`, or the problem to answer (404, 405…). May leave values for later
    /// stages in `ctx.extensions` (template captures).
    fn route(&self, req: &request::Parts, ctx: &mut Ctx) -> Result<Arc<Route>, Problem>;
}

/// Everything a pipeline runs with; swapped whole on reload.
#[derive(Debug)]
pub struct PipelineConfig {
    /// Filters every request crosses before routing (hygiene, request id…).
    pub pre: Chain,
    /// Route resolution.
    pub router: Arc<dyn Router>,
    /// Path normalization.
    pub paths: PathOptions,
    /// Largest request head, header names and values summed (431 beyond).
    pub max_head_bytes: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCode {
    route: Arc<str>,
    method: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReason {
    route: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceResult {
    service: Arc<str>,
    result: &'static str,
}

/// The method as a bounded label value: the common methods by name, everything else `other`.
pub fn method_class(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A route's metric handles, resolved on its first request and kept with the compiled route
/// (a reload compiles new routes, which resolve again).
#[derive(Debug, Default)]
pub struct RouteStats {
    duration: std::sync::OnceLock<Histogram>,
}

/// Request metrics of one pipeline, registered by the composition under its own names.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RouteCode, Counter>,
    local: Family<RouteReason, Counter>,
    duration: LatencyFamily<RouteLabel>,
    upstream_duration: LatencyFamily<ServiceLabel>,
    upstream_results: Family<ServiceResult, Counter>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            local: Family::default(),
            duration: latency_family(),
            upstream_duration: latency_family(),
            upstream_results: Family::default(),
        }
    }
}

impl RequestMetrics {
    /// Registers the request counter as `{name}` (e.g. `meshgate_gateway_requests`, by route,
    /// method class and code), the counter of local answers by reason as `{name}_local`, the
    /// request latency histogram as `{name without the s}_duration_seconds`, and the upstream
    /// metrics `meshgate_upstream_request_duration_seconds{service}` and
    /// `meshgate_upstream_requests{service,result}`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.requests.clone());
        registry.register(
            format!("{name}_local"),
            "requests answered by meshgate itself, by route and reason (the problem type)",
            self.local.clone(),
        );
        registry.register(
            format!("{}_duration_seconds", name.trim_end_matches('s')),
            "request latency by route: head received to response head ready (time to first byte for streamed answers)",
            self.duration.clone(),
        );
        registry.register(
            "meshgate_upstream_request_duration_seconds",
            "upstream exchange latency by service: first attempt sent to response head (retries and failover included)",
            self.upstream_duration.clone(),
        );
        registry.register(
            "meshgate_upstream_requests",
            "requests sent upstream by service and result (ok, or the problem type: upstream-refused, upstream-timeout, no-endpoints, denied-by-intention, upstream-failed...)",
            self.upstream_results.clone(),
        );
    }

    fn count(&self, route: &Arc<str>, method: &Method, code: u16, local: Option<&'static str>) {
        self.requests
            .get_or_create(&RouteCode {
                route: route.clone(),
                method: method_class(method),
                code,
            })
            .inc();
        if let Some(reason) = local {
            self.local
                .get_or_create(&RouteReason {
                    route: route.clone(),
                    reason,
                })
                .inc();
        }
    }

    fn route_duration(&self, route: &Arc<str>) -> Histogram {
        self.duration
            .get_or_create(&RouteLabel {
                route: route.clone(),
            })
            .clone()
    }

    fn upstream(&self, service: &Arc<str>, took: Option<Duration>, local: Option<&'static str>) {
        if let Some(d) = took {
            self.upstream_duration
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .observe(d.as_secs_f64());
        }
        self.upstream_results
            .get_or_create(&ServiceResult {
                service: service.clone(),
                result: local.unwrap_or("ok"),
            })
            .inc();
    }
}

/// The optional sinks of a pipeline: access log and traces (both off: nothing per request).
#[derive(Debug, Clone, Default)]
pub struct Observe {
    /// The access log.
    pub access: Option<AccessLog>,
    /// The trace exporter.
    pub tracing: Option<Tracing>,
}

/// What the front calls for every request.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
}

/// The request path of one listener kind.
#[derive(Debug)]
pub struct Pipeline {
    cfg: ArcSwap<PipelineConfig>,
    metrics: Arc<RequestMetrics>,
    access: Option<AccessLog>,
    tracing: Option<Tracing>,
    none: Arc<str>,
    none_duration: Histogram,
}

/// How the head checks and filters ended a request early.
enum Early {
    Problem(Problem),
    Response(Response<Body>),
}

impl From<Problem> for Early {
    fn from(p: Problem) -> Self {
        Early::Problem(p)
    }
}

impl From<Stop> for Early {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Respond(r) => Early::Response(r),
            Stop::Reject(p) => Early::Problem(p),
        }
    }
}

/// The request's authority: `Host` for HTTP/1.x (exactly one; required for 1.1), the
/// absolute-form target's authority if given, `:authority` for HTTP/2 (a `Host` beside it
/// must agree). Also writes it into `Host`, so every later stage sees one spelling.
fn authority(req: &mut request::Parts) -> Result<String, Problem> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let first = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(Problem::BadRequest("more than one Host header".into()));
    }
    let from_uri = req.uri.authority().map(|a| a.as_str().to_owned());
    let value = match (from_uri, first) {
        (Some(a), Some(h)) if req.version == Version::HTTP_2 && h.as_bytes() != a.as_bytes() => {
            return Err(Problem::BadRequest("Host and :authority disagree".into()));
        }
        (Some(a), _) => a,
        (None, Some(h)) => h
            .to_str()
            .map_err(|_| Problem::BadRequest("the Host header is not valid".into()))?
            .to_owned(),
        (None, None) if req.version == Version::HTTP_11 => {
            return Err(Problem::BadRequest(
                "HTTP/1.1 requests need a Host header".into(),
            ));
        }
        (None, None) => String::new(),
    };
    if !value.is_empty() {
        if value.parse::<http::uri::Authority>().is_err() {
            return Err(Problem::BadRequest("the Host header is not valid".into()));
        }
        let v = HeaderValue::from_str(&value)
            .map_err(|_| Problem::BadRequest("the Host header is not valid".into()))?;
        req.headers.insert(header::HOST, v);
    }
    Ok(value)
}

/// The size the head limit (`max_head_bytes`) counts: every header's name and value, plus 4
/// bytes each for the separators (`meshgate why` counts the same).
pub fn head_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Replaces the path of `uri` with `path`, keeping the query.
fn set_path(req: &mut request::Parts, path: &str) -> Result<(), Problem> {
    let pq = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(&mut req.uri).into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| Problem::BadRequest("the path is not valid".into()))?,
    );
    req.uri = http::Uri::from_parts(parts)
        .map_err(|_| Problem::BadRequest("the request target is not valid".into()))?;
    Ok(())
}

impl Pipeline {
    /// A pipeline running `cfg`, counting requests into `metrics`, writing access records and
    /// spans when `observe` has them on.
    pub fn new(cfg: PipelineConfig, metrics: Arc<RequestMetrics>, observe: Observe) -> Arc<Self> {
        let Observe { access, tracing } = observe;
        let none: Arc<str> = Arc::from("-");
        Arc::new(Self {
            cfg: ArcSwap::from_pointee(cfg),
            none_duration: metrics.route_duration(&none),
            metrics,
            access,
            tracing,
            none,
        })
    }

    /// Swaps in a new configuration; requests in flight finish on the old one.
    pub fn swap(&self, cfg: PipelineConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    /// The configuration in use.
    pub fn current(&self) -> Arc<PipelineConfig> {
        self.cfg.load_full()
    }

    /// Answers one request.
    pub async fn serve(&self, req: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<Body> {
        let cfg = self.cfg.load_full();
        let mut ctx = Ctx::new(conn);
        let (mut parts, body) = req.into_parts();
        ctx.grpc = is_grpc(&parts.headers);
        ctx.method = parts.method.clone();
        ctx.has_body = !http_body::Body::is_end_stream(&body);
        if let Some(t) = &self.tracing {
            ctx.otel = t.server(&parts.headers, "request");
        }
        if self.access.is_some() {
            ctx.traceparent = parts
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        let mut route: Option<Arc<Route>> = None;
        let outcome = self.run(&cfg, &mut parts, body, &mut ctx, &mut route).await;
        let resp = match outcome {
            Ok(r) => r,
            Err(Early::Response(r)) => r,
            Err(Early::Problem(p)) => local_answer(&mut ctx, &p),
        };
        let resp = self.finish(&cfg, route.as_deref(), &mut ctx, resp).await;
        let status = resp.status().as_u16();
        let route_name = ctx.route.clone().unwrap_or_else(|| self.none.clone());
        self.metrics
            .count(&route_name, &ctx.method, status, ctx.local_reason);
        let took = ctx.started.elapsed().as_secs_f64();
        match &route {
            Some(r) => r
                .stats
                .duration
                .get_or_init(|| self.metrics.route_duration(&r.name))
                .observe(took),
            None => self.none_duration.observe(took),
        }
        if let Some(svc) = &ctx.upstream {
            self.metrics
                .upstream(svc, ctx.upstream_duration, ctx.local_reason);
        }
        if let Some(t) = ctx.otel.take() {
            end_server_span(&t, &ctx, &route_name, &parts, status);
        }
        match &self.access {
            None => resp,
            Some(log) => self.logged(log, resp, ctx, route_name, &parts),
        }
    }

    /// Wraps the response body so that its access record goes out when the body ends.
    fn logged(
        &self,
        log: &AccessLog,
        resp: Response<Body>,
        ctx: Ctx,
        route: Arc<str>,
        req: &request::Parts,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        let path = match (log.include_query(), req.uri.path_and_query()) {
            (true, Some(pq)) => pq.as_str().to_owned(),
            _ => req.uri.path().to_owned(),
        };
        let elapsed = ctx.started.elapsed();
        let body_in = ctx.extensions.get::<Arc<BodyState>>().cloned();
        let rec = HttpRecord {
            at: SystemTime::now().checked_sub(elapsed).unwrap_or(UNIX_EPOCH),
            upstream_status: match (ctx.local_reason, &ctx.upstream) {
                (None, Some(_)) => Some(status),
                _ => None,
            },
            request_id: ctx.request_id,
            traceparent: ctx.traceparent,
            route,
            consumer: ctx.consumer,
            method: ctx.method,
            authority: ctx.authority,
            path,
            status,
            duration: elapsed,
            upstream: ctx.upstream,
            endpoint: ctx.endpoint,
            bytes_in: 0,
            bytes_out: 0,
            client_ip: ctx.client_ip,
            peer_identity: ctx.conn.peer_workload.as_ref().map(|(_, id)| id.clone()),
            reason: ctx.local_reason,
        };
        let (head, body) = resp.into_parts();
        let body = LoggedBody::new(body, log.clone(), rec, ctx.started, body_in);
        Response::from_parts(head, body.boxed())
    }

    async fn run(
        &self,
        cfg: &PipelineConfig,
        parts: &mut request::Parts,
        body: Incoming,
        ctx: &mut Ctx,
        route_out: &mut Option<Arc<Route>>,
    ) -> Result<Response<Body>, Early> {
        if parts.method == Method::CONNECT {
            return Err(Problem::MethodNotAllowed {
                allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".into(),
            }
            .into());
        }
        ctx.authority = authority(parts)?;
        match normalize(parts.uri.path(), &cfg.paths) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(p)) => set_path(parts, &p)?,
            Err(e) => return Err(Problem::InvalidPath(e).into()),
        }
        if head_bytes(&parts.headers) > cfg.max_head_bytes {
            return Err(Problem::HeadersTooLarge {
                limit: cfg.max_head_bytes,
            }
            .into());
        }
        cfg.pre.on_request(parts, ctx).await?;
        if let Some(t) = &ctx.otel {
            // the trace the service sees is this span's (hygiene made a traceparent without it)
            ctx.traceparent = t.inject(&mut parts.headers);
        } else if self.tracing.is_some() {
            // not sampled here: the next hops must not sample it either
            crate::telemetry::otel::unsample(&mut parts.headers, &mut ctx.traceparent);
        }
        let route = cfg.router.route(parts, ctx)?;
        ctx.route = Some(route.name.clone());
        *route_out = Some(route.clone());
        if parts.method == Method::TRACE && !route.allow_trace {
            return Err(Problem::MethodNotAllowed {
                allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".into(),
            }
            .into());
        }
        route.chain.on_request(parts, ctx).await?;
        let body = self.body(&route, parts, body, ctx).await?;
        let req = Request::from_parts(std::mem::replace(parts, clone_head(parts)), body);
        let faults = ctx.extensions.get::<Arc<BodyState>>().cloned();
        match route.action.call(req, ctx).await {
            Ok(r) => Ok(r),
            Err(p) => Err(match faults.and_then(|f| f.fault()) {
                Some(BodyFault::TooLarge) => Problem::BodyTooLarge {
                    limit: route.max_body,
                },
                Some(BodyFault::Stalled) => Problem::BodyTimeout,
                Some(BodyFault::Client) => {
                    debug!(request_id = %ctx.request_id, "client went away while sending the body");
                    Problem::BadRequest("the request body could not be read".into())
                }
                None => p,
            }
            .into()),
        }
    }

    /// The request body as the action gets it: empty, streaming through the guard, or
    /// buffered for the filters that asked.
    async fn body(
        &self,
        route: &Route,
        parts: &mut request::Parts,
        body: Incoming,
        ctx: &mut Ctx,
    ) -> Result<Body, Early> {
        use http_body::Body as _;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_body) {
            return Err(Problem::BodyTooLarge {
                limit: route.max_body,
            }
            .into());
        }
        if body.is_end_stream() {
            return Ok(super::empty());
        }
        let state = Arc::new(BodyState::default());
        ctx.extensions.insert(state.clone());
        let guarded = Guarded::new(body, route.max_body, route.body_idle_timeout, state.clone());
        let Some(cap) = route.chain.request_body_cap() else {
            return Ok(guarded.boxed());
        };
        let cap = cap.min(usize::try_from(route.max_body).unwrap_or(usize::MAX));
        let bytes = match collect_capped(guarded.boxed(), cap).await {
            Ok(b) => b,
            Err(CollectError::TooLarge) => {
                return Err(Problem::BodyTooLarge {
                    limit: route.max_body.min(cap as u64),
                }
                .into());
            }
            Err(CollectError::Failed(_)) => {
                return Err(match state.fault() {
                    Some(BodyFault::TooLarge) => Problem::BodyTooLarge {
                        limit: route.max_body,
                    },
                    Some(BodyFault::Stalled) => Problem::BodyTimeout,
                    _ => Problem::BadRequest("the request body could not be read".into()),
                }
                .into());
            }
        };
        let bytes: Bytes = route.chain.on_request_body(parts, ctx, bytes)?;
        if parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        Ok(super::full(bytes))
    }

    /// Response phase: buffered body filters, every filter's `on_response`, headers the
    /// request collected, the request id.
    async fn finish(
        &self,
        cfg: &PipelineConfig,
        route: Option<&Route>,
        ctx: &mut Ctx,
        resp: Response<Body>,
    ) -> Response<Body> {
        let (mut parts, mut body) = resp.into_parts();
        if let Some(r) = route
            && let Some(cap) = r.chain.response_body_cap(ctx, &parts)
        {
            body = match collect_capped(body, cap).await {
                Ok(b) => match r.chain.on_response_body(ctx, &mut parts, b) {
                    Ok(b) => {
                        if parts.headers.contains_key(header::CONTENT_LENGTH) {
                            parts
                                .headers
                                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                        }
                        super::full(b)
                    }
                    Err(p) => local(ctx, p, &mut parts),
                },
                Err(CollectError::TooLarge) => local(
                    ctx,
                    Problem::ResponseNotTransformable(format!(
                        "the response body exceeds the {cap} bytes the route's transform reads"
                    )),
                    &mut parts,
                ),
                Err(CollectError::Failed(_)) => local(ctx, Problem::UpstreamFailed, &mut parts),
            };
        }
        if let Some(r) = route {
            r.chain.on_response(ctx, &mut parts);
        }
        cfg.pre.on_response(ctx, &mut parts);
        for (k, v) in std::mem::take(&mut ctx.response_headers) {
            parts.headers.append(k, v);
        }
        if !ctx.request_id.is_empty()
            && !parts.headers.contains_key("x-request-id")
            && let Ok(v) = HeaderValue::from_str(&ctx.request_id)
        {
            parts.headers.insert("x-request-id", v);
        }
        Response::from_parts(parts, body)
    }
}

fn end_server_span(
    t: &crate::telemetry::otel::TraceCx,
    ctx: &Ctx,
    route: &str,
    req: &request::Parts,
    status: u16,
) {
    use opentelemetry::KeyValue;
    t.rename(format!("{} {route}", ctx.method));
    let mut attrs = vec![
        KeyValue::new("http.request.method", ctx.method.to_string()),
        KeyValue::new("http.route", route.to_owned()),
        KeyValue::new("url.path", req.uri.path().to_owned()),
        KeyValue::new("http.response.status_code", i64::from(status)),
        KeyValue::new("client.address", ctx.client_ip.to_string()),
        KeyValue::new("meshgate.request_id", ctx.request_id.clone()),
    ];
    if !ctx.authority.is_empty() {
        attrs.push(KeyValue::new("server.address", ctx.authority.clone()));
    }
    if let Some((_, id)) = &ctx.conn.peer_workload {
        attrs.push(KeyValue::new("meshgate.peer.identity", id.to_string()));
    }
    if let Some(r) = ctx.local_reason {
        attrs.push(KeyValue::new("meshgate.local_reason", r));
    }
    t.set(attrs);
    if status >= 500 {
        t.error(ctx.local_reason.unwrap_or("server error").to_owned());
    }
    t.end();
}

/// The answer for a local problem; a request id is made here if no filter set one (a node
/// agent's pipeline has no hygiene filter, and its proxied answers need none).
fn local_answer(ctx: &mut Ctx, p: &Problem) -> Response<Body> {
    if ctx.request_id.is_empty() {
        ctx.request_id = Ctx::new_request_id();
    }
    ctx.local_reason = Some(p.slug());
    p.respond(&ctx.request_id, ctx.grpc)
}

/// Replaces a response head with a local problem's and returns the problem's body.
fn local(ctx: &mut Ctx, p: Problem, parts: &mut http::response::Parts) -> Body {
    let (np, nb) = local_answer(ctx, &p).into_parts();
    *parts = np;
    nb
}

fn clone_head(p: &request::Parts) -> request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    r.into_parts().0
}

/// The front's handler for a shared pipeline.
#[derive(Debug, Clone)]
pub struct PipelineHandler(pub Arc<Pipeline>);

impl Handler for PipelineHandler {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        let p = self.0.clone();
        Box::pin(async move { p.serve(req, conn).await })
    }
}
