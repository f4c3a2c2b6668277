//! Where proxied requests go. An [`Upstream`] sends one attempt of a request and says, when it
//! fails, whether the request certainly was not processed (so the proxy may send it again
//! elsewhere). Three kinds:
//!
//! - [`MeshService`]: a service in the mesh. The endpoint (a destination agent) is chosen per
//!   request (power of two choices over peak-EWMA latency, in-flight counted per request), and
//!   the request travels as one HTTP/2 stream on a pooled tunnel connection, versions,
//!   trailers and `te: trailers` kept. Upgrades (WebSocket) ride a CONNECT stream instead.
//! - [`LocalService`]: node mode's last hop, a service on 127.0.0.1 behind this agent, over
//!   pooled HTTP/1.1 connections (`protocol: http`) or HTTP/2 with prior knowledge
//!   (`protocol: grpc`). A pooled connection the service closed is noticed, and a request that
//!   was not sent (or that failed on a reused connection before any answer) goes on a fresh one.
//! - [`External`]: a URL outside the mesh (`http://` or `https://`), for migrations and
//!   external APIs. This leaves zero-trust: only configured routes use it.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;
use tracing::debug;

use super::{Body, BoxError, DENY_RULE_HEADER, LOCAL_HEADER, body::Guard, ctx::Ctx};
use crate::{
    discovery::Endpoints,
    identity::Identity,
    telemetry::Metrics,
    transport::hbone::{Pool, SERVICE_HEADER, TunnelError},
};

/// Why one attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Discovery knows no endpoint.
    #[error("no endpoints known for {0}")]
    NoEndpoints(String),
    /// The attempt never reached the service (connect or handshake failed, the stream was
    /// refused or the destination agent could not take it): safe to try another endpoint.
    #[error("{reason}")]
    NotProcessed {
        /// The endpoint tried.
        endpoint: Option<SocketAddr>,
        /// Why.
        reason: String,
        /// The destination's local service refused the connection (502 rather than 503).
        refused: bool,
    },
    /// An intention at the destination refused the caller.
    #[error("denied by intention{}", .rule.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Denied {
        /// The deciding rule, as the destination named it.
        rule: Option<String>,
    },
    /// Sent, then failed (reset, closed before an answer, bad response).
    #[error("{reason}")]
    Failed {
        /// The endpoint.
        endpoint: Option<SocketAddr>,
        /// Why.
        reason: String,
    },
    /// The upstream cannot carry this request (an upgrade to an external URL…).
    #[error("{0}")]
    Unsupported(String),
}

impl UpstreamError {
    /// The endpoint involved, if any.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            UpstreamError::NotProcessed { endpoint, .. }
            | UpstreamError::Failed { endpoint, .. } => *endpoint,
            _ => None,
        }
    }
}

/// A successful attempt: the response, the endpoint that gave it, and guards that must live
/// as long as the response body (the tunnel stream's slot, the in-flight count).
#[derive(Debug)]
pub struct Upstreamed {
    /// The response head and its streaming body.
    pub response: Response<Incoming>,
    /// Who answered.
    pub endpoint: Option<SocketAddr>,
    /// Keep until the body ends.
    pub guards: Vec<Guard>,
}

/// A boxed future of an attempt.
pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Upstreamed, UpstreamError>> + Send + 'a>>;

/// An upgraded exchange: the upstream's answer and, on `101`, the upgraded upstream stream.
#[derive(Debug)]
pub struct UpgradeAnswer {
    /// The upstream's response head (body empty on 101).
    pub response: Response<Incoming>,
    /// Guards for as long as the upgraded stream lives.
    pub guards: Vec<Guard>,
}

/// A boxed future of an upgrade.
pub type UpgradeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<UpgradeAnswer, UpstreamError>> + Send + 'a>>;

/// One destination a proxy can send to.
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// The name for logs and metrics: the service, or the URL's host.
    fn name(&self) -> &Arc<str>;

    /// Sends one attempt of `req`, avoiding `exclude` (endpoints that failed for this request).
    fn send<'a>(
        &'a self,
        req: Request<Body>,
        ctx: &'a Ctx,
        exclude: &'a [SocketAddr],
    ) -> SendFuture<'a>;

    /// Sends an HTTP/1.1 upgrade request (WebSocket…) and returns the answer; on 101 the
    /// caller takes the upgraded stream from the response with `hyper::upgrade::on`.
    fn upgrade<'a>(&'a self, _req: Request<Body>, _ctx: &'a Ctx) -> UpgradeFuture<'a> {
        let name = self.name().clone();
        Box::pin(async move {
            Err(UpstreamError::Unsupported(format!(
                "upgrades to {name} are not supported"
            )))
        })
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded, nor anything the `Connection` header
/// names — except that names meshgate itself set are kept (the caller removes those from
/// `Connection` first, see [`strip_hop_by_hop`]).
const HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and the ones the `Connection` header names, except those in
/// `protected` (headers meshgate set itself, such as injected identity: a client naming
/// `X-User-Id` in `Connection` must not remove it). `te` survives only as `te: trailers`.
/// With `upgrade`, `Connection: upgrade` and `Upgrade` are kept.
pub fn strip_hop_by_hop(
    headers: &mut http::HeaderMap,
    protected: &[header::HeaderName],
    upgrade: bool,
) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<header::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| header::HeaderName::from_bytes(s.trim().as_bytes()).ok())
            .collect();
        for h in listed {
            if !(protected.contains(&h) || upgrade && h == header::UPGRADE) {
                headers.remove(h);
            }
        }
    }
    for h in &HOP_BY_HOP {
        if upgrade && (*h == header::CONNECTION || *h == header::UPGRADE) {
            continue;
        }
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Sets the request's URI to `scheme://authority{path?query}` (the form HTTP/2 needs).
fn absolute(req: &mut Request<Body>, scheme: &str, authority: &str) -> Result<(), UpstreamError> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri =
        format!("{scheme}://{authority}{pq}")
            .parse()
            .map_err(|e| UpstreamError::Failed {
                endpoint: None,
                reason: format!("cannot build the upstream URI: {e}"),
            })?;
    *req.uri_mut() = uri;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mesh services
// ---------------------------------------------------------------------------------------------

/// Reaches mesh services through tunnels, presenting one source identity.
#[derive(Debug)]
pub struct MeshClient {
    source: Identity,
    endpoints: Arc<Endpoints>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
}

impl MeshClient {
    /// A client presenting `source`'s SVID, endpoints from `endpoints`.
    pub fn new(
        source: Identity,
        endpoints: Arc<Endpoints>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            endpoints,
            pool,
            metrics,
        })
    }

    /// The identity presented.
    pub fn source(&self) -> &Identity {
        &self.source
    }

    /// The tunnel pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The upstream for mesh service `name`.
    pub fn service(self: &Arc<Self>, name: &str) -> Arc<MeshService> {
        Arc::new(MeshService {
            name: Arc::from(name),
            client: self.clone(),
        })
    }

    fn pick(
        &self,
        service: &str,
        exclude: &[SocketAddr],
    ) -> Result<Arc<crate::balance::Endpoint>, UpstreamError> {
        let Some(balancer) = self.endpoints.balancer(service) else {
            return Err(UpstreamError::NoEndpoints(service.to_owned()));
        };
        let mut rand = super::ctx::fast_rand;
        balancer
            .pick(Instant::now(), exclude, &mut rand)
            .ok_or_else(|| {
                if exclude.is_empty() {
                    UpstreamError::NoEndpoints(service.to_owned())
                } else {
                    UpstreamError::NotProcessed {
                        endpoint: None,
                        reason: format!("every endpoint of {service} failed"),
                        refused: true,
                    }
                }
            })
    }

    fn tunnel_error(&self, service: &str, e: TunnelError) -> UpstreamError {
        let endpoint = match &e {
            TunnelError::Connect { addr, .. }
            | TunnelError::Handshake { addr, .. }
            | TunnelError::WrongDestination { addr, .. }
            | TunnelError::NotProcessed { addr, .. }
            | TunnelError::Http2 { addr, .. }
            | TunnelError::Refused { addr, .. } => Some(*addr),
        };
        match e {
            TunnelError::Refused {
                status: StatusCode::FORBIDDEN,
                rule,
                ..
            } => UpstreamError::Denied { rule },
            TunnelError::Refused { status, .. } => UpstreamError::NotProcessed {
                endpoint,
                reason: format!(
                    "the agent at {} answered {status} for {service}",
                    endpoint.map(|a| a.to_string()).unwrap_or_default()
                ),
                refused: status == StatusCode::BAD_GATEWAY,
            },
            e if e.not_processed() => UpstreamError::NotProcessed {
                endpoint,
                reason: e.to_string(),
                refused: matches!(
                    e,
                    TunnelError::Connect { .. }
                        | TunnelError::Handshake { .. }
                        | TunnelError::WrongDestination { .. }
                ),
            },
            e => UpstreamError::Failed {
                endpoint,
                reason: e.to_string(),
            },
        }
    }
}

/// A mesh service as an upstream.
#[derive(Debug)]
pub struct MeshService {
    name: Arc<str>,
    client: Arc<MeshClient>,
}

/// What a destination agent's own answer (header [`LOCAL_HEADER`]) means for the caller.
fn classify_local(
    service: &str,
    endpoint: SocketAddr,
    resp: &Response<Incoming>,
) -> Option<UpstreamError> {
    let local = resp.headers().get(LOCAL_HEADER)?.to_str().ok()?;
    let rule = || {
        resp.headers()
            .get(DENY_RULE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let not_processed = |refused: bool| UpstreamError::NotProcessed {
        endpoint: Some(endpoint),
        reason: format!("the agent at {endpoint} answered {local} for {service}"),
        refused,
    };
    match local {
        "denied-by-intention" => Some(UpstreamError::Denied { rule: rule() }),
        "upstream-refused" => Some(not_processed(true)),
        "unknown-service" | "draining" => Some(not_processed(false)),
        _ => None,
    }
}

impl Upstream for MeshService {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn send<'a>(
        &'a self,
        mut req: Request<Body>,
        ctx: &'a Ctx,
        exclude: &'a [SocketAddr],
    ) -> SendFuture<'a> {
        Box::pin(async move {
            let c = &self.client;
            let ep = c.pick(&self.name, exclude)?;
            let in_flight = ep.start();
            let authority = if ctx.authority.is_empty() {
                &*self.name
            } else {
                &ctx.authority
            };
            absolute(&mut req, "http", authority)?;
            req.headers_mut().remove(header::HOST);
            req.headers_mut().insert(
                SERVICE_HEADER,
                HeaderValue::from_str(&self.name).expect("invariant: service names are tokens"),
            );
            *req.version_mut() = Version::HTTP_2;
            let started = Instant::now();
            match c
                .pool
                .request(&c.source, &self.name, ep.target(), req)
                .await
            {
                Ok((response, lease)) => {
                    if let Some(e) = classify_local(&self.name, ep.addr(), &response) {
                        if matches!(e, UpstreamError::NotProcessed { .. }) {
                            ep.record_failure(Instant::now());
                            c.metrics.connect_failed(&self.name);
                        }
                        return Err(e);
                    }
                    ep.record_success(Instant::now(), started.elapsed());
                    Ok(Upstreamed {
                        response,
                        endpoint: Some(ep.addr()),
                        guards: vec![Box::new(in_flight), Box::new(lease)],
                    })
                }
                Err(e) => {
                    if e.not_processed() {
                        ep.record_failure(Instant::now());
                        c.metrics.connect_failed(&self.name);
                    }
                    debug!(dst.service = %self.name, endpoint = %ep.addr(), error = %e, "tunnel request failed");
                    Err(c.tunnel_error(&self.name, e))
                }
            }
        })
    }

    fn upgrade<'a>(&'a self, req: Request<Body>, _ctx: &'a Ctx) -> UpgradeFuture<'a> {
        Box::pin(async move {
            let c = &self.client;
            let mut exclude = Vec::new();
            let mut last = None;
            for _ in 0..crate::proxy::outbound::MAX_ATTEMPTS {
                let ep = match c.pick(&self.name, &exclude) {
                    Ok(ep) => ep,
                    Err(e) => return Err(last.unwrap_or(e)),
                };
                let in_flight = ep.start();
                match c.pool.connect(&c.source, ep.target(), &self.name).await {
                    Ok((io, lease)) => {
                        ep.record_success(Instant::now(), Duration::ZERO);
                        let response = http1_upgrade(io, req, Some(ep.addr())).await?;
                        return Ok(UpgradeAnswer {
                            response,
                            guards: vec![Box::new(in_flight), Box::new(lease)],
                        });
                    }
                    Err(e) => {
                        let e = c.tunnel_error(&self.name, e);
                        if !matches!(e, UpstreamError::NotProcessed { .. }) {
                            return Err(e);
                        }
                        ep.record_failure(Instant::now());
                        exclude.push(ep.addr());
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| UpstreamError::NoEndpoints(self.name.to_string())))
        })
    }
}

/// Sends an upgrade request over a fresh HTTP/1.1 connection on `io`.
async fn http1_upgrade<T>(
    io: T,
    mut req: Request<Body>,
    endpoint: Option<SocketAddr>,
) -> Result<Response<Incoming>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let failed = |reason: String| UpstreamError::Failed { endpoint, reason };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(io)
        .await
        .map_err(|e| failed(crate::identity::error_chain(&e)))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    *req.version_mut() = Version::HTTP_11;
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    sender
        .send_request(req)
        .await
        .map_err(|e| failed(crate::identity::error_chain(&e)))
}

// ---------------------------------------------------------------------------------------------
// Local services (node mode)
// ---------------------------------------------------------------------------------------------

/// How the agent speaks to a local service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalProtocol {
    /// HTTP/1.1, pooled keep-alive connections.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

type H1 = hyper::client::conn::http1::SendRequest<Body>;
type H2 = hyper::client::conn::http2::SendRequest<Body>;

#[derive(Debug)]
struct IdleH1 {
    sender: H1,
    since: Instant,
}

/// A service on 127.0.0.1 behind this agent.
#[derive(Debug)]
pub struct LocalService {
    name: Arc<str>,
    port: u16,
    protocol: LocalProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Arc<Mutex<Vec<IdleH1>>>,
    h2: tokio::sync::Mutex<Option<H2>>,
}

/// Most idle HTTP/1.1 connections kept per local service.
const MAX_IDLE: usize = 256;

impl LocalService {
    /// Service `name` on 127.0.0.1:`port`. Idle HTTP/1.1 connections are closed after
    /// `idle_timeout` (shorter than the keep-alive timeout of common servers — Node.js closes
    /// after 5 s — so the agent closes first).
    pub fn new(
        name: &str,
        port: u16,
        protocol: LocalProtocol,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            port,
            protocol,
            connect_timeout,
            idle_timeout,
            idle: Arc::new(Mutex::new(Vec::new())),
            h2: tokio::sync::Mutex::new(None),
        })
    }

    async fn tcp(&self) -> Result<TcpStream, UpstreamError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let refused = |reason: String| UpstreamError::NotProcessed {
            endpoint: Some(addr),
            reason: format!(
                "local service {} on port {}: {reason}",
                self.name, self.port
            ),
            refused: true,
        };
        let s = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| refused("connect timed out".into()))?
            .map_err(|e| refused(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn take_idle(&self) -> Option<H1> {
        let mut idle = self.idle.lock().expect("invariant: idle lock not poisoned");
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            if c.sender.is_closed() || now.duration_since(c.since) >= self.idle_timeout {
                continue;
            }
            if c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    async fn dial_h1(&self) -> Result<H1, UpstreamError> {
        let io = TokioIo::new(self.tcp().await?);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(512 * 1024)
            .handshake::<_, Body>(io)
            .await
            .map_err(|e| UpstreamError::NotProcessed {
                endpoint: None,
                reason: crate::identity::error_chain(&e),
                refused: true,
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn h2_sender(&self) -> Result<H2, UpstreamError> {
        let mut slot = self.h2.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let io = TokioIo::new(self.tcp().await?);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .max_concurrent_reset_streams(4096)
            .max_local_error_reset_streams(None)
            .handshake::<_, Body>(io)
            .await
            .map_err(|e| UpstreamError::NotProcessed {
                endpoint: None,
                reason: crate::identity::error_chain(&e),
                refused: true,
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn send_h1(&self, mut req: Request<Body>) -> Result<Upstreamed, UpstreamError> {
        let endpoint = Some(SocketAddr::from(([127, 0, 0, 1], self.port)));
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST)
            && let Some(a) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
        // a bodiless request can always be sent again; one with a body only if it was never sent
        let replayable = req.body().is_end_stream();
        let template = replayable.then(|| {
            let mut r = Request::new(());
            *r.method_mut() = req.method().clone();
            *r.uri_mut() = req.uri().clone();
            *r.version_mut() = req.version();
            *r.headers_mut() = req.headers().clone();
            r
        });
        let mut req = Some(req);
        for attempt in 0..3 {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                None => (self.dial_h1().await?, false),
            };
            let r = match req.take() {
                Some(r) => r,
                None => match &template {
                    Some(t) => {
                        let mut r = Request::new(super::empty());
                        *r.method_mut() = t.method().clone();
                        *r.uri_mut() = t.uri().clone();
                        *r.version_mut() = t.version();
                        *r.headers_mut() = t.headers().clone();
                        r
                    }
                    None => break,
                },
            };
            match sender.try_send_request(r).await {
                Ok(response) => {
                    let back = ReturnH1 {
                        sender: Some(sender),
                        idle: self.idle.clone(),
                    };
                    return Ok(Upstreamed {
                        response,
                        endpoint,
                        guards: vec![Box::new(back)],
                    });
                }
                Err(mut e) => {
                    if let Some(back) = e.take_message() {
                        req = Some(back);
                        continue;
                    }
                    let err = e.into_error();
                    // a reused connection the service closed or reset as we sent: nothing was
                    // answered (a bodiless request is sent again on a fresh connection)
                    let stale =
                        reused && (err.is_incomplete_message() || err.is_canceled() || died(&err));
                    if stale && template.is_some() && attempt < 2 {
                        debug!(dst.service = %self.name, "pooled connection was closed by the service; sending again on a fresh one");
                        continue;
                    }
                    return Err(UpstreamError::Failed {
                        endpoint,
                        reason: format!(
                            "local service {}: {}",
                            self.name,
                            crate::identity::error_chain(&err)
                        ),
                    });
                }
            }
        }
        Err(UpstreamError::Failed {
            endpoint,
            reason: format!("local service {}: connections kept closing", self.name),
        })
    }

    async fn send_h2(&self, mut req: Request<Body>) -> Result<Upstreamed, UpstreamError> {
        let endpoint = Some(SocketAddr::from(([127, 0, 0, 1], self.port)));
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.port));
        absolute(&mut req, "http", &authority)?;
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
        for _ in 0..2 {
            let mut sender = self.h2_sender().await?;
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Upstreamed {
                        response,
                        endpoint,
                        guards: Vec::new(),
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        *self.h2.lock().await = None;
                        req = back;
                    }
                    None => {
                        return Err(UpstreamError::Failed {
                            endpoint,
                            reason: format!(
                                "local service {}: {}",
                                self.name,
                                crate::identity::error_chain(&e.into_error())
                            ),
                        });
                    }
                },
            }
        }
        Err(UpstreamError::NotProcessed {
            endpoint,
            reason: format!("local service {}: connection kept closing", self.name),
            refused: true,
        })
    }
}

/// Whether a hyper error is the connection dying underneath (reset, broken pipe).
fn died(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        src = s.source();
    }
    false
}

/// Puts an HTTP/1.1 connection back into the idle list once its response body is done.
#[derive(Debug)]
struct ReturnH1 {
    sender: Option<H1>,
    idle: Arc<Mutex<Vec<IdleH1>>>,
}

impl Drop for ReturnH1 {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take()
            && !sender.is_closed()
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(IdleH1 {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl Upstream for LocalService {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn send<'a>(
        &'a self,
        req: Request<Body>,
        _ctx: &'a Ctx,
        _exclude: &'a [SocketAddr],
    ) -> SendFuture<'a> {
        Box::pin(async move {
            match self.protocol {
                LocalProtocol::Http1 => self.send_h1(req).await,
                LocalProtocol::Http2 => self.send_h2(req).await,
            }
        })
    }

    fn upgrade<'a>(&'a self, req: Request<Body>, _ctx: &'a Ctx) -> UpgradeFuture<'a> {
        Box::pin(async move {
            let endpoint = Some(SocketAddr::from(([127, 0, 0, 1], self.port)));
            let io = TokioIo::new(self.tcp().await?);
            let response = http1_upgrade(io, req, endpoint).await?;
            Ok(UpgradeAnswer {
                response,
                guards: Vec::new(),
            })
        })
    }
}

// ---------------------------------------------------------------------------------------------
// External URLs
// ---------------------------------------------------------------------------------------------

/// A route backend outside the mesh.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// `http://host[:port]` or `https://host[:port]`, optionally with a base path that is put in
    /// front of every forwarded path.
    pub url: String,
    /// Connect to these addresses instead of resolving the URL's host (which still gives the
    /// TLS server name and the `Host` header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// PEM bundle of CAs trusted for `https`; default: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// TLS server name to verify; default: the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Speak HTTP/2 with prior knowledge over `http://` (h2c, e.g. gRPC servers). Over
    /// `https://` the version is negotiated by ALPN.
    #[serde(default)]
    pub h2c: bool,
    /// Send the client's `Host` instead of the URL's host.
    #[serde(default)]
    pub preserve_host: bool,
}

/// Why an external backend cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExternalError(pub String);

#[derive(Clone)]
struct ExternalConnector {
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    addresses: Arc<Vec<SocketAddr>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    connect_timeout: Duration,
}

/// A TCP or TLS stream to an external server.
pub struct ExternalIo {
    io: TokioIo<ExternalStream>,
    h2: bool,
}

enum ExternalStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ExternalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ExternalStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ExternalStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ExternalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ExternalStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ExternalStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ExternalStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ExternalStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ExternalStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ExternalStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl hyper::rt::Read for ExternalIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ExternalIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connection for ExternalIo {
    fn connected(&self) -> Connected {
        if self.h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl tower::Service<Uri> for ExternalConnector {
    type Response = ExternalIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ExternalIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri
                .port_u16()
                .unwrap_or(if this.tls.is_some() { 443 } else { 80 });
            let addrs: Vec<SocketAddr> = if this.addresses.is_empty() {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .collect()
            } else {
                let n = this.addresses.len();
                let start = this.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (0..n).map(|i| this.addresses[(start + i) % n]).collect()
            };
            let mut last: BoxError = format!("no address for {host}").into();
            for addr in addrs {
                match tokio::time::timeout(this.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        return match &this.tls {
                            None => Ok(ExternalIo {
                                io: TokioIo::new(ExternalStream::Plain(tcp)),
                                h2: false,
                            }),
                            Some((connector, name)) => {
                                let tls = tokio::time::timeout(
                                    this.connect_timeout,
                                    connector.connect(name.clone(), tcp),
                                )
                                .await
                                .map_err(|_| format!("TLS handshake with {addr} timed out"))?
                                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
                                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                                Ok(ExternalIo {
                                    io: TokioIo::new(ExternalStream::Tls(Box::new(tls))),
                                    h2,
                                })
                            }
                        };
                    }
                    Ok(Err(e)) => last = format!("connect to {addr}: {e}").into(),
                    Err(_) => last = format!("connect to {addr} timed out").into(),
                }
            }
            Err(last)
        })
    }
}

/// A URL outside the mesh as an upstream.
pub struct External {
    name: Arc<str>,
    scheme: &'static str,
    authority: String,
    base_path: String,
    preserve_host: bool,
    client: Client<ExternalConnector, Body>,
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl External {
    /// Builds the upstream; reads `ca_file` now.
    pub fn new(
        cfg: &ExternalConfig,
        connect_timeout: Duration,
    ) -> Result<Arc<Self>, ExternalError> {
        let e = |m: String| ExternalError(format!("{}: {m}", cfg.url));
        let uri: Uri = cfg.url.parse().map_err(|x| e(format!("not a URL: {x}")))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            _ => return Err(e("the scheme must be http:// or https://".into())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| e("the URL needs a host".into()))?
            .as_str()
            .to_owned();
        if authority.contains('@') {
            return Err(e("credentials in the URL are not supported".into()));
        }
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let tls = if scheme == "https" {
            let mut roots = rustls::RootCertStore::empty();
            match &cfg.ca_file {
                Some(path) => {
                    for c in meshgate_ca::pki::read_pem_certs(path)
                        .map_err(|x| e(format!("ca_file {}: {x}", path.display())))?
                    {
                        roots
                            .add(c)
                            .map_err(|x| e(format!("ca_file {}: {x}", path.display())))?;
                    }
                }
                None => {
                    let native = rustls_native_certs_roots();
                    if native.is_empty() {
                        return Err(e(
                            "no system CA roots found; set ca_file to the server's CA".into(),
                        ));
                    }
                    for c in native {
                        let _ = roots.add(c);
                    }
                }
            }
            let mut tls =
                rustls::ClientConfig::builder_with_provider(meshgate_ca::verify::crypto_provider())
                    .with_protocol_versions(rustls::ALL_VERSIONS)
                    .map_err(|x| e(x.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|x| e(format!("server name {name:?}: {x}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
        } else {
            None
        };
        if cfg.h2c && scheme == "https" {
            return Err(e(
                "h2c applies to http:// URLs only (https negotiates HTTP/2 by ALPN)".into(),
            ));
        }
        let connector = ExternalConnector {
            tls,
            addresses: Arc::new(cfg.addresses.clone()),
            next: Arc::default(),
            connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .retry_canceled_requests(true)
            .http2_only(cfg.h2c)
            .build(connector);
        Ok(Arc::new(Self {
            name: Arc::from(host.as_str()),
            scheme,
            authority,
            base_path,
            preserve_host: cfg.preserve_host,
            client,
        }))
    }
}

/// The system's CA roots (Debian: /etc/ssl/certs), read once per external backend.
fn rustls_native_certs_roots() -> Vec<rustls_pki_types::CertificateDer<'static>> {
    for path in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ] {
        if let Ok(certs) = meshgate_ca::pki::read_pem_certs(std::path::Path::new(path))
            && !certs.is_empty()
        {
            return certs;
        }
    }
    Vec::new()
}

impl Upstream for External {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn send<'a>(
        &'a self,
        mut req: Request<Body>,
        ctx: &'a Ctx,
        _exclude: &'a [SocketAddr],
    ) -> SendFuture<'a> {
        Box::pin(async move {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let uri: Uri = format!(
                "{}://{}{}{}",
                self.scheme, self.authority, self.base_path, pq
            )
            .parse()
            .map_err(|e| UpstreamError::Failed {
                endpoint: None,
                reason: format!("cannot build the upstream URI: {e}"),
            })?;
            *req.uri_mut() = uri;
            let host = if self.preserve_host && !ctx.authority.is_empty() {
                ctx.authority.as_str()
            } else {
                self.authority.as_str()
            };
            if let Ok(v) = HeaderValue::from_str(host) {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.version_mut() = Version::HTTP_11;
            match self.client.request(req).await {
                Ok(response) => Ok(Upstreamed {
                    response,
                    endpoint: None,
                    guards: Vec::new(),
                }),
                Err(e) if e.is_connect() => Err(UpstreamError::NotProcessed {
                    endpoint: None,
                    reason: crate::identity::error_chain(&e),
                    refused: true,
                }),
                Err(e) => Err(UpstreamError::Failed {
                    endpoint: None,
                    reason: crate::identity::error_chain(&e),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_keeps_protected_and_te_trailers() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-user-id, x-drop, keep-alive"),
        );
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(
            &mut h,
            &[header::HeaderName::from_static("x-user-id")],
            false,
        );
        assert_eq!(h["x-user-id"], "alice");
        assert!(!h.contains_key("x-drop"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key(header::TRANSFER_ENCODING));
        assert_eq!(h[header::TE], "trailers");
        let mut h = http::HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, &[], true);
        assert!(!h.contains_key(header::TE));
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
