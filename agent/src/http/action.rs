//! What a route does once its filters let a request through: a [`RouteAction`]. Today that is
//! [`Proxy`] (to a mesh service, a local service or an external URL); transcoding and
//! aggregation plug in beside it.
//!
//! [`Proxy`] owns the upstream exchange: the deadline (the route timeout, or a shorter
//! `grpc-timeout`), failover to another endpoint when an attempt was certainly not processed,
//! budgeted retries of idempotent requests (the body replayed from a capped buffer), the
//! response body's idle timeout, and upgrades (WebSocket) spliced once both sides switched.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderName, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use tracing::{debug, info, warn};

use super::{
    Body, BoxError, DENY_RULE_HEADER, LOCAL_HEADER,
    body::{ReplayBody, ResponseBody},
    ctx::Ctx,
    respond::Problem,
    upstream::{Upstream, UpstreamError, Upstreamed, strip_hop_by_hop},
};

/// A boxed future of an action's answer.
pub type ActionFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Problem>> + Send + 'a>>;

/// What a route does with a request its filters let through.
pub trait RouteAction: Send + Sync + std::fmt::Debug {
    /// A short name for `meshgate routes` and logs (`proxy`, `transcode`…).
    fn kind(&self) -> &'static str;

    /// Answers `req`.
    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a>;
}

/// Retries as a share of requests, refilled by traffic (linkerd's retry budget).
#[derive(Debug)]
pub struct RetryBudget {
    tokens: Mutex<f64>,
    percent: f64,
}

impl RetryBudget {
    /// A budget allowing retries of `percent` % of requests, starting with 10 retries banked.
    pub fn new(percent: f64) -> Arc<Self> {
        Arc::new(Self {
            tokens: Mutex::new(10.0),
            percent,
        })
    }

    fn deposit(&self) {
        let mut t = self
            .tokens
            .lock()
            .expect("invariant: budget lock not poisoned");
        *t = (*t + self.percent / 100.0).min(100.0);
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

/// Retry policy of a proxy.
#[derive(Debug, Clone)]
pub struct Retries {
    /// Extra attempts after the first, for idempotent requests that got a retryable failure
    /// (no endpoint reachable, or the service answered 503).
    pub attempts: u32,
    /// The shared budget.
    pub budget: Arc<RetryBudget>,
}

/// How a proxy behaves.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Time for the upstream's response head.
    pub timeout: Duration,
    /// Retries; `None` means only failover of attempts that were not processed.
    pub retries: Option<Retries>,
    /// Response body idle timeout: the body ends with an error when nothing arrives for this
    /// long. `None`: no limit.
    pub response_idle_timeout: Option<Duration>,
    /// Bytes of a request body kept for replays.
    pub replay_cap: usize,
    /// Failover attempts on distinct endpoints for attempts that were not processed.
    pub max_failover: usize,
    /// Headers meshgate set that a client's `Connection` header must not remove.
    pub protected_headers: Vec<HeaderName>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            retries: None,
            response_idle_timeout: None,
            replay_cap: 64 * 1024,
            max_failover: crate::proxy::outbound::MAX_ATTEMPTS,
            protected_headers: Vec::new(),
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Parses a `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n).
pub fn grpc_timeout(v: &http::HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether a request asks for an HTTP/1.1 upgrade (`Connection: upgrade` plus `Upgrade`).
pub fn wants_upgrade(req: &http::request::Parts) -> bool {
    req.version <= http::Version::HTTP_11
        && req.headers.contains_key(header::UPGRADE)
        && req
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Forwards requests to an upstream.
#[derive(Debug, Clone)]
pub struct Proxy {
    settings: Arc<ProxySettings>,
}

impl Proxy {
    /// A proxy with these settings.
    pub fn new(settings: ProxySettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    fn problem_for(&self, up: &dyn Upstream, e: &UpstreamError, ctx: &Ctx) -> Problem {
        let service = up.name().to_string();
        match e {
            UpstreamError::NoEndpoints(_) => Problem::NoEndpoints { service },
            UpstreamError::NotProcessed { refused: true, .. } => {
                Problem::UpstreamRefused { service }
            }
            UpstreamError::NotProcessed { .. } => Problem::UpstreamUnavailable { service },
            UpstreamError::Denied { rule } => {
                info!(request_id = %ctx.request_id, dst.service = %service, rule = rule.as_deref().unwrap_or("-"), "denied by an intention at the destination");
                Problem::DeniedByIntention
            }
            UpstreamError::Failed { .. } => Problem::UpstreamFailed,
            UpstreamError::Unsupported(m) => Problem::BadRequest(m.clone()),
        }
    }

    /// Sends `req` to `up` and returns its response (streaming), or the problem to answer.
    /// Records how long the exchange took in `ctx.upstream_duration`.
    pub async fn forward(
        &self,
        up: &dyn Upstream,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, Problem> {
        let t0 = std::time::Instant::now();
        let mut req = req;
        // the upstream call's span: its traceparent is what the service (or the next agent) sees
        let span = ctx.otel.as_ref().map(|t| {
            let s = t.child(
                format!("upstream {}", up.name()),
                opentelemetry::trace::SpanKind::Client,
            );
            ctx.traceparent = s.inject(req.headers_mut());
            s
        });
        let r = self.exchange(up, req, ctx).await;
        ctx.upstream_duration = Some(t0.elapsed());
        if let Some(s) = span {
            use opentelemetry::KeyValue;
            let mut attrs = vec![KeyValue::new("meshgate.upstream", up.name().to_string())];
            if let Some(ep) = ctx.endpoint {
                attrs.push(KeyValue::new("server.address", ep.ip().to_string()));
                attrs.push(KeyValue::new("server.port", i64::from(ep.port())));
            }
            match &r {
                Ok(resp) => {
                    attrs.push(KeyValue::new(
                        "http.response.status_code",
                        i64::from(resp.status().as_u16()),
                    ));
                    if resp.status().is_server_error() {
                        s.error(format!("upstream answered {}", resp.status().as_u16()));
                    }
                }
                Err(p) => {
                    attrs.push(KeyValue::new("meshgate.problem", p.slug()));
                    s.error(p.slug().to_owned());
                }
            }
            s.set(attrs);
            s.end();
        }
        r
    }

    async fn exchange(
        &self,
        up: &dyn Upstream,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, Problem> {
        let s = &*self.settings;
        let (mut parts, body) = req.into_parts();
        let upgrade = wants_upgrade(&parts);
        strip_hop_by_hop(&mut parts.headers, &s.protected_headers, upgrade);
        let mut timeout = s.timeout;
        let started = tokio::time::Instant::from_std(ctx.started);
        // a gRPC deadline bounds the whole call (head and body); the route timeout the head
        let grpc_deadline = ctx
            .grpc
            .then(|| parts.headers.get("grpc-timeout").and_then(grpc_timeout))
            .flatten()
            .map(|t| {
                timeout = timeout.min(t);
                started + t
            });
        let deadline = started + timeout;
        ctx.upstream = Some(up.name().clone());
        if upgrade {
            return self.upgrade(up, parts, body, ctx, deadline).await;
        }
        let retries = s.retries.as_ref().filter(|_| idempotent(&parts.method));
        if let Some(r) = retries {
            r.budget.deposit();
        }
        // one attempt, or a replayable body for more
        let empty = body.is_end_stream();
        let mut replay = (!empty).then(|| ReplayBody::new(body, s.replay_cap));
        let mut exclude: Vec<SocketAddr> = Vec::new();
        let mut retried = 0u32;
        let mut failovers = 0usize;
        let timeout_problem = || Problem::UpstreamTimeout {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        loop {
            let attempt_body: Body = match &mut replay {
                None => super::empty(),
                Some(r) => match r.replay() {
                    Some(next) => std::mem::replace(r, next).boxed(),
                    None => return Err(Problem::UpstreamFailed),
                },
            };
            let req = Request::from_parts(clone_parts(&parts), attempt_body);
            let result = tokio::time::timeout_at(deadline, up.send(req, ctx, &exclude)).await;
            let result = match result {
                Err(_) => return Err(timeout_problem()),
                Ok(r) => r,
            };
            match result {
                // the deadline passed while the answer travelled (a late timer under load): the
                // upstream's own deadline fires after ours, so what it sent is its `CANCELLED`;
                // the caller's deadline is exceeded, and says so
                Ok(_) if grpc_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                    return Err(timeout_problem());
                }
                Ok(answer) => {
                    let status = answer.response.status();
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && let Some(r) = retries
                        && retried < r.attempts
                        && replay.as_ref().is_none_or(|b| b.replay().is_some())
                        && r.budget.withdraw()
                    {
                        retried += 1;
                        if let Some(ep) = answer.endpoint {
                            exclude.push(ep);
                        }
                        debug!(request_id = %ctx.request_id, dst.service = %up.name(), "service answered 503; retrying");
                        continue;
                    }
                    return Ok(self.respond(answer, ctx, grpc_deadline));
                }
                Err(e) => {
                    let retry_safe = match &e {
                        UpstreamError::NotProcessed { .. } => {
                            failovers += 1;
                            failovers < s.max_failover
                        }
                        _ => false,
                    };
                    let budgeted = !retry_safe
                        && matches!(e, UpstreamError::Failed { .. })
                        && retries.is_some_and(|r| retried < r.attempts && r.budget.withdraw());
                    let replayable = replay.as_ref().is_none_or(|b| b.replay().is_some());
                    if (retry_safe || budgeted) && replayable {
                        if budgeted {
                            retried += 1;
                        }
                        if let Some(ep) = e.endpoint() {
                            exclude.push(ep);
                        }
                        debug!(request_id = %ctx.request_id, dst.service = %up.name(), error = %e, "attempt failed; trying again");
                        continue;
                    }
                    if !matches!(e, UpstreamError::Denied { .. }) {
                        warn!(request_id = %ctx.request_id, route = ctx.route.as_deref().unwrap_or("-"), dst.service = %up.name(), error = %e, "upstream request failed");
                    }
                    return Err(self.problem_for(up, &e, ctx));
                }
            }
        }
    }

    fn respond(
        &self,
        answer: Upstreamed,
        ctx: &mut Ctx,
        grpc_deadline: Option<tokio::time::Instant>,
    ) -> Response<Body> {
        let Upstreamed {
            response,
            endpoint,
            guards,
        } = answer;
        ctx.endpoint = endpoint;
        let (mut rparts, rbody) = response.into_parts();
        // HTTP/2 answers carry no connection-specific headers (the h2 codec refuses them)
        if rparts.version != http::Version::HTTP_2 {
            strip_hop_by_hop(&mut rparts.headers, &[], false);
        }
        rparts.headers.remove(LOCAL_HEADER);
        rparts.headers.remove(DENY_RULE_HEADER);
        let mut body = ResponseBody::new(rbody.map_err(|e| Box::new(e) as BoxError).boxed())
            .idle_timeout(self.settings.response_idle_timeout)
            .grpc_deadline(grpc_deadline);
        for g in guards {
            body = body.guard(g);
        }
        Response::from_parts(rparts, body.boxed())
    }

    async fn upgrade(
        &self,
        up: &dyn Upstream,
        mut parts: http::request::Parts,
        body: Body,
        ctx: &mut Ctx,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Body>, Problem> {
        let Some(client_side) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(Problem::BadRequest(
                "this connection cannot be upgraded".into(),
            ));
        };
        let req = Request::from_parts(parts, body);
        let answer = match tokio::time::timeout_at(deadline, up.upgrade(req, ctx)).await {
            Err(_) => {
                return Err(Problem::UpstreamTimeout {
                    timeout_ms: u64::try_from(self.settings.timeout.as_millis())
                        .unwrap_or(u64::MAX),
                });
            }
            Ok(Err(e)) => {
                warn!(request_id = %ctx.request_id, dst.service = %up.name(), error = %e, "upgrade failed");
                return Err(self.problem_for(up, &e, ctx));
            }
            Ok(Ok(a)) => a,
        };
        let mut response = answer.response;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut rparts, rbody) = response.into_parts();
            strip_hop_by_hop(&mut rparts.headers, &[], false);
            return Ok(Response::from_parts(
                rparts,
                rbody.map_err(|e| Box::new(e) as BoxError).boxed(),
            ));
        }
        let upstream_side = hyper::upgrade::on(&mut response);
        let guards = answer.guards;
        let service = up.name().clone();
        tokio::spawn(async move {
            let _guards = guards;
            let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
                Ok(x) => x,
                Err(e) => {
                    debug!(dst.service = %service, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut upstream = hyper_util::rt::TokioIo::new(upstream);
            if let Err(e) = crate::transport::forward::splice(&mut client, &mut upstream).await {
                debug!(dst.service = %service, error = %e, "upgraded stream ended with an error");
            }
        });
        let (rparts, _) = response.into_parts();
        Ok(Response::from_parts(rparts, super::empty()))
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// The simplest action: every request of the route goes to one upstream.
#[derive(Debug, Clone)]
pub struct ProxyTo {
    /// How.
    pub proxy: Proxy,
    /// Where.
    pub upstream: Arc<dyn Upstream>,
}

impl RouteAction for ProxyTo {
    fn kind(&self) -> &'static str {
        "proxy"
    }

    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move { self.proxy.forward(&*self.upstream, req, ctx).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let cases = [
            ("100m", Some(Duration::from_millis(100))),
            ("5S", Some(Duration::from_secs(5))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("300u", Some(Duration::from_micros(300))),
            ("7n", Some(Duration::from_nanos(7))),
            ("100", None),
            ("m", None),
            ("1234567890S", None),
            ("-1S", None),
            ("1x", None),
        ];
        for (v, want) in cases {
            assert_eq!(
                grpc_timeout(&http::HeaderValue::from_static(v)),
                want,
                "{v}"
            );
        }
    }

    #[test]
    fn retry_budget_allows_a_share() {
        let b = RetryBudget::new(20.0);
        let mut allowed = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                allowed += 1;
            }
        }
        // ten banked plus 20 % of 100
        assert!((29..=31).contains(&allowed), "{allowed}");
    }
}
