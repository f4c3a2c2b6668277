//! Inbound: the mesh port. Tunnels from other agents (and gateways) arrive over mutual TLS on
//! the same front the gateway uses ([`Security::Mesh`]); each HTTP/2 stream is either
//!
//! - a **CONNECT** to a local service: L4 services (`protocol: tcp`) are checked against the
//!   L4 intentions and spliced to 127.0.0.1; for L7 services (`http`, `grpc`) the stream carries
//!   a nested HTTP/1.1 or HTTP/2 connection whose requests run the node pipeline one by one;
//! - a **request** to an L7 service named by the `meshgate-service` header, run through the
//!   node pipeline directly (HTTP/2 end to end).
//!
//! The node pipeline normalizes the path, applies the intentions filter (every request is
//! checked against the L7 rules with the caller's verified SPIFFE ID) and proxies to the local
//! service. Every refusal is a problem (or gRPC status) marked with the `meshgate-local` header
//! so the caller can tell the mesh's refusal from the service's own answer; denials name the
//! deciding rule in `meshgate-deny-rule` for the caller's log. Everything is counted and logged
//! once.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use http::{HeaderValue, Method, Request, Response, StatusCode, request, response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshgate_ca::spiffe::SpiffeId;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    config::{Protocol, TunnelConfig},
    drain::Drain,
    http::{
        Body, DENY_RULE_HEADER, LOCAL_HEADER,
        action::{Proxy, ProxySettings, ProxyTo},
        chain::Chain,
        ctx::{ConnInfo, Ctx},
        filter::{Filter, Step},
        front::{Front, FrontLimits, Handler, Proto, serve_io},
        path::PathOptions,
        pipeline::{Pipeline, PipelineConfig, RequestMetrics, Route, Router},
        respond::Problem,
        upstream::{LocalProtocol, LocalService as LocalUpstream},
    },
    policy::authz::{Action, HttpRequest, Peer, Policy, Target},
    telemetry::{
        DenyReason, Direction, Metrics,
        access::{Record, TcpRecord},
    },
    transport::{forward::splice, hbone::SERVICE_HEADER},
};

/// A service that runs on this node, as the inbound side needs it.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// How its traffic is checked.
    pub protocol: Protocol,
}

/// Everything the inbound side needs.
#[derive(Debug)]
pub struct Inbound {
    /// Local services by name.
    pub services: HashMap<String, LocalService>,
    /// Compiled intentions.
    pub policy: Arc<Policy>,
    /// Tunnel settings.
    pub tunnel: TunnelConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Drain state.
    pub drain: Drain,
    /// The access log, when on (L7 requests and L4 streams).
    pub access: Option<crate::telemetry::access::AccessLog>,
    /// The trace exporter, when on.
    pub tracing: Option<crate::telemetry::otel::Tracing>,
}

/// The inbound port's limits: tunnels are long-lived and carry many streams.
pub fn front_limits(t: &TunnelConfig) -> FrontLimits {
    FrontLimits {
        max_head_bytes: 256 * 1024,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: t.idle_timeout,
        handshake_timeout: Duration::from_secs(10),
        max_connections: 65_536,
        max_concurrent_streams: t.max_streams,
        reset_flood_limit: 2_000,
        stream_window: t.stream_window,
        connection_window: t.connection_window,
    }
}

/// The verified caller of a stream, when it is a workload: (service, SPIFFE ID).
fn workload_peer(conn: &ConnInfo) -> Option<(Arc<str>, Arc<str>)> {
    conn.peer_workload.clone()
}

/// Marks every local answer of the node pipeline with [`LOCAL_HEADER`].
#[derive(Debug)]
struct MarkLocal;

impl Filter for MarkLocal {
    fn name(&self) -> &'static str {
        "mark-local"
    }
    fn on_request<'a>(&'a self, _req: &'a mut request::Parts, _ctx: &'a mut Ctx) -> Step<'a> {
        Step::CONTINUE
    }
    fn on_response(&self, ctx: &Ctx, resp: &mut response::Parts) {
        if let Some(slug) = ctx.local_reason {
            resp.headers
                .insert(LOCAL_HEADER, HeaderValue::from_static(slug));
        }
    }
}

/// Intentions on every request to one local service.
#[derive(Debug)]
struct Intentions {
    policy: Arc<Policy>,
    service: String,
    target_id: String,
    metrics: Arc<Metrics>,
}

impl Filter for Intentions {
    fn name(&self) -> &'static str {
        "intentions"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        let Some((from, from_id)) = workload_peer(&ctx.conn) else {
            self.metrics.denied(DenyReason::NotWorkload);
            warn!(src.addr = %ctx.conn.peer, dst.service = %self.service, "refused: peer is not a workload identity");
            return Step::reject(Problem::DeniedByIntention);
        };
        let decision = self.policy.check_request(
            &Peer {
                service: &from,
                spiffe_id: &from_id,
            },
            &Target {
                service: &self.service,
                spiffe_id: &self.target_id,
            },
            &HttpRequest {
                method: req.method.as_str(),
                path: req.uri.path(),
            },
        );
        if decision.action == Action::Deny {
            self.metrics.denied(DenyReason::L7Policy);
            self.metrics.denied_by_rule(&self.service, decision.rule);
            info!(peer.identity = %from_id, dst.service = %self.service, method = %req.method, path = %req.uri.path(), reason = %decision.reason, "request denied by intention");
            if let Ok(v) = HeaderValue::from_str(&decision.reason) {
                ctx.add_response_header(DENY_RULE_HEADER, v);
            }
            return Step::reject(Problem::DeniedByIntention);
        }
        Step::CONTINUE
    }
}

/// Routes node-pipeline requests to the local service they name.
#[derive(Debug)]
struct NodeRouter {
    routes: HashMap<String, Arc<Route>>,
    drain: Drain,
}

impl Router for NodeRouter {
    fn route(&self, req: &request::Parts, ctx: &mut Ctx) -> Result<Arc<Route>, Problem> {
        if self.drain.is_draining() {
            return Err(Problem::UpstreamUnavailable {
                service: "this node".into(),
            });
        }
        let named = match &ctx.conn.bound_service {
            Some(s) => Some(s.to_string()),
            None => req
                .headers
                .get(SERVICE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        let Some(name) = named else {
            return Err(Problem::BadRequest(
                "a tunnel request must name its service (meshgate-service)".into(),
            ));
        };
        match self.routes.get(&name) {
            Some(r) => Ok(r.clone()),
            None => {
                warn!(src.addr = %ctx.conn.peer, dst.service = %name, "refused: service does not run on this node");
                Err(Problem::NoRoute)
            }
        }
    }
}

/// Removes the tunnel's own request header before the service sees the request.
#[derive(Debug)]
struct StripTunnelHeaders;

impl Filter for StripTunnelHeaders {
    fn name(&self) -> &'static str {
        "strip-tunnel-headers"
    }
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, _ctx: &'a mut Ctx) -> Step<'a> {
        req.headers.remove(SERVICE_HEADER);
        Step::CONTINUE
    }
}

/// The inbound side, built once at start.
#[derive(Debug)]
pub struct InboundHandler {
    ctx: Arc<Inbound>,
    pipeline: Arc<Pipeline>,
    nested: std::sync::OnceLock<Front>,
}

impl InboundHandler {
    /// Builds the node pipeline for the L7 services of `ctx`.
    pub fn new(ctx: Arc<Inbound>, request_metrics: Arc<RequestMetrics>) -> Arc<Self> {
        let mut routes = HashMap::new();
        for (name, svc) in &ctx.services {
            let protocol = match svc.protocol {
                Protocol::Http => LocalProtocol::Http1,
                Protocol::Grpc => LocalProtocol::Http2,
                Protocol::Tcp => continue,
            };
            let upstream = LocalUpstream::new(
                name,
                svc.port,
                protocol,
                ctx.tunnel.connect_timeout,
                ctx.tunnel.local_idle_timeout,
            );
            let proxy = Proxy::new(ProxySettings {
                timeout: ctx.tunnel.request_timeout,
                max_failover: 1,
                ..ProxySettings::default()
            });
            let chain = Chain::new(vec![
                Arc::new(StripTunnelHeaders),
                Arc::new(Intentions {
                    policy: ctx.policy.clone(),
                    service: name.clone(),
                    target_id: svc.id.to_string(),
                    metrics: ctx.metrics.clone(),
                }),
            ]);
            routes.insert(
                name.clone(),
                Arc::new(Route {
                    name: Arc::from(name.as_str()),
                    chain,
                    action: Arc::new(ProxyTo { proxy, upstream }),
                    max_body: u64::MAX,
                    body_idle_timeout: ctx.tunnel.idle_timeout,
                    allow_trace: false,
                    stats: Default::default(),
                }),
            );
        }
        let pipeline = Pipeline::new(
            PipelineConfig {
                pre: Chain::new(vec![Arc::new(MarkLocal)]),
                router: Arc::new(NodeRouter {
                    routes,
                    drain: ctx.drain.clone(),
                }),
                paths: PathOptions::default(),
                max_head_bytes: 256 * 1024,
            },
            request_metrics,
            crate::http::pipeline::Observe {
                access: ctx.access.clone(),
                tracing: ctx.tracing.clone(),
            },
        );
        Arc::new(Self {
            ctx,
            pipeline,
            nested: std::sync::OnceLock::new(),
        })
    }

    /// The front for connections nested in CONNECT streams (their requests run the pipeline).
    fn nested_front(self: &Arc<Self>) -> Front {
        self.nested
            .get_or_init(|| Front {
                handler: Arc::new(PipelineOnly(self.pipeline.clone())),
                limits: front_limits(&self.ctx.tunnel),
                drain: self.ctx.drain.clone(),
                metrics: self.ctx.metrics.clone(),
                name: "inbound-l7",
            })
            .clone()
    }

    /// The front for the inbound port.
    pub fn front(self: &Arc<Self>) -> Front {
        Front {
            handler: Arc::new(InboundEntry(self.clone())),
            limits: front_limits(&self.ctx.tunnel),
            drain: self.ctx.drain.clone(),
            metrics: self.ctx.metrics.clone(),
            name: "inbound",
        }
    }

    async fn connect(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<Body> {
        let ctx = &self.ctx;
        let service = req.uri().host().unwrap_or_default().to_owned();
        let Some(local) = ctx.services.get(&service).cloned() else {
            ctx.metrics.denied(DenyReason::UnknownService);
            warn!(src.addr = %conn.peer, dst.service = %service, "refused: service does not run on this node");
            return status(StatusCode::NOT_FOUND, "unknown-service", None);
        };
        let Some((from, from_id)) = workload_peer(&conn) else {
            ctx.metrics.denied(DenyReason::NotWorkload);
            warn!(src.addr = %conn.peer, dst.service = %service, "refused: peer is not a workload identity");
            return status(StatusCode::FORBIDDEN, "denied-by-intention", None);
        };
        let target_id = local.id.to_string();
        let (p, t) = (
            Peer {
                service: &from,
                spiffe_id: &from_id,
            },
            Target {
                service: &service,
                spiffe_id: &target_id,
            },
        );
        let (admitted, reason, rule) = match local.protocol {
            Protocol::Http | Protocol::Grpc => (
                ctx.policy.admits_http(&p, &t),
                std::sync::Arc::from("no rule allows this source"),
                None,
            ),
            Protocol::Tcp => {
                let d = ctx.policy.check_connection(&p, &t);
                (d.action == Action::Allow, d.reason, d.rule)
            }
        };
        if !admitted {
            ctx.metrics.denied(DenyReason::Policy);
            ctx.metrics.denied_by_rule(&service, rule);
            info!(peer.identity = %from_id, dst.service = %service, reason = %reason, "denied by intention");
            return status(StatusCode::FORBIDDEN, "denied-by-intention", Some(&reason));
        }
        if ctx.drain.is_draining() {
            return status(StatusCode::SERVICE_UNAVAILABLE, "draining", None);
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let hold = conn.hold.as_ref().map(|h| h.hold());
        let tracked = ctx.drain.track();
        let metered = ctx.metrics.stream(Direction::Inbound);
        match local.protocol {
            Protocol::Tcp => {
                let upstream = match tokio::time::timeout(
                    ctx.tunnel.connect_timeout,
                    TcpStream::connect(("127.0.0.1", local.port)),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(dst.service = %service, port = local.port, error = %e, "local service unreachable");
                        return status(StatusCode::BAD_GATEWAY, "upstream-refused", None);
                    }
                    Err(_) => {
                        warn!(dst.service = %service, port = local.port, "local service connect timed out");
                        return status(StatusCode::BAD_GATEWAY, "upstream-refused", None);
                    }
                };
                let _ = upstream.set_nodelay(true);
                let this = self.clone();
                let started = (std::time::SystemTime::now(), std::time::Instant::now());
                tokio::spawn(async move {
                    let _guards = (tracked, metered, hold);
                    let tunnel = match on_upgrade.await {
                        Ok(u) => u,
                        Err(e) => {
                            debug!(error = %e, "stream upgrade failed");
                            return;
                        }
                    };
                    let (mut tunnel, mut upstream) = (TokioIo::new(tunnel), upstream);
                    let (sent, received, close) = match splice(&mut tunnel, &mut upstream).await {
                        Ok((sent, received)) => {
                            this.ctx.metrics.bytes(Direction::Inbound, sent, received);
                            (sent, received, "closed")
                        }
                        Err(e) => {
                            debug!(dst.service = %service, error = %e, "inbound stream ended with an error");
                            (0, 0, "error")
                        }
                    };
                    if let Some(log) = &this.ctx.access {
                        log.send(Record::Tcp(Box::new(TcpRecord {
                            at: started.0,
                            src_identity: from_id,
                            dst_service: service,
                            dst_identity: target_id,
                            bytes_sent: sent,
                            bytes_received: received,
                            duration: started.1.elapsed(),
                            close,
                        })));
                    }
                });
            }
            Protocol::Http | Protocol::Grpc => {
                let proto = if local.protocol == Protocol::Http {
                    Proto::Http1
                } else {
                    Proto::Http2
                };
                let front = self.nested_front();
                let mut info = (*conn).clone();
                info.bound_service = Some(Arc::from(service.as_str()));
                info.hold = None;
                tokio::spawn(async move {
                    let _guards = (tracked, metered, hold);
                    let tunnel = match on_upgrade.await {
                        Ok(u) => u,
                        Err(e) => {
                            debug!(error = %e, "stream upgrade failed");
                            return;
                        }
                    };
                    serve_io(TokioIo::new(tunnel), info, proto, &front).await;
                });
            }
        }
        status(StatusCode::OK, "", None)
    }
}

fn status(code: StatusCode, local: &'static str, rule: Option<&str>) -> Response<Body> {
    let mut r = Response::new(crate::http::empty());
    *r.status_mut() = code;
    if !local.is_empty() {
        r.headers_mut()
            .insert(LOCAL_HEADER, HeaderValue::from_static(local));
    }
    if let Some(rule) = rule
        && let Ok(v) = HeaderValue::from_str(rule)
    {
        r.headers_mut().insert(DENY_RULE_HEADER, v);
    }
    r
}

/// Tunnel streams: CONNECT or a direct request.
struct InboundEntry(Arc<InboundHandler>);

impl Handler for InboundEntry {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        let this = self.0.clone();
        if req.method() == Method::CONNECT {
            Box::pin(this.connect(req, conn))
        } else {
            let metered = this.ctx.metrics.stream(Direction::Inbound);
            let p = this.pipeline.clone();
            Box::pin(async move {
                let r = p.serve(req, conn).await;
                drop(metered);
                r
            })
        }
    }
}

/// Requests nested in a CONNECT stream: the pipeline only.
struct PipelineOnly(Arc<Pipeline>);

impl Handler for PipelineOnly {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        let p = self.0.clone();
        Box::pin(async move { p.serve(req, conn).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http::filter::Verdict, policy::authz::AuthzConfig};

    fn conn(peer: Option<&str>) -> Arc<ConnInfo> {
        let mut c = ConnInfo::plain("127.0.0.1:1".parse().expect("addr"));
        c.set_peer(peer.map(|p| SpiffeId::parse(p).expect("id")));
        Arc::new(c)
    }

    #[tokio::test]
    async fn intentions_filter_decides_per_request_and_names_the_rule() {
        let cfg: AuthzConfig = serde_json::from_value(serde_json::json!({
            "default": "deny",
            "rules": [
                {"from": "web", "to": "users", "action": "allow"},
                {"from": "web", "to": "users", "action": "deny", "methods": ["DELETE"], "paths": ["/admin/*"]}
            ]
        }))
        .expect("cfg");
        let f = Intentions {
            policy: Arc::new(Policy::compile(&cfg).expect("policy")),
            service: "users".into(),
            target_id: "spiffe://td/ns/default/svc/users".into(),
            metrics: Arc::new(Metrics::new()),
        };
        let cases = [
            (
                Some("spiffe://td/ns/default/svc/web"),
                "GET",
                "/users/1",
                true,
            ),
            (
                Some("spiffe://td/ns/default/svc/web"),
                "DELETE",
                "/admin/x",
                false,
            ),
            (
                Some("spiffe://td/ns/default/svc/web"),
                "DELETE",
                "/admin",
                false,
            ),
            (
                Some("spiffe://td/ns/default/svc/batch"),
                "GET",
                "/users/1",
                false,
            ),
            (Some("spiffe://td/node/node-a"), "GET", "/", false),
            (None, "GET", "/", false),
        ];
        for (peer, method, path, allowed) in cases {
            let mut ctx = Ctx::new(conn(peer));
            let (mut parts, ()) = Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("req")
                .into_parts();
            let v = f.on_request(&mut parts, &mut ctx).resolve().await;
            assert_eq!(
                matches!(v, Verdict::Continue),
                allowed,
                "{peer:?} {method} {path}"
            );
            if !allowed && peer.is_some_and(|p| p.contains("/svc/web")) {
                assert!(
                    ctx.response_headers
                        .iter()
                        .any(|(k, v)| *k == DENY_RULE_HEADER
                            && v.to_str().is_ok_and(|s| s.contains("rule #1"))),
                    "{method} {path}: the deciding rule is named"
                );
            }
        }
    }
}
