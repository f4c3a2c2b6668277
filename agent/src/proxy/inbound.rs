//! Inbound: accept mTLS tunnels from other agents, verify the peer, evaluate intentions, connect
//! to the named local service on 127.0.0.1 and splice (L4), or check every HTTP request against
//! the L7 rules before forwarding it (`protocol: http`).
//!
//! Every refusal is answered with a status on the CONNECT (403 denied, 404 not on this node,
//! 502 local service unreachable, 503 draining), logged once and counted.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshgate_ca::{
    pki::CertInfo,
    spiffe::{SpiffeId, Subject},
};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    config::{Protocol, TunnelConfig},
    drain::Drain,
    policy::authz::{Action, HttpRequest, Peer, Policy, Target},
    telemetry::{DenyReason, Direction, Metrics},
    transport::{forward::splice, hbone::server_builder},
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
    pub policy: Policy,
    /// Tunnel settings.
    pub tunnel: TunnelConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Drain state.
    pub drain: Drain,
}

/// The verified peer of one tunnel connection.
#[derive(Debug)]
struct PeerInfo {
    addr: SocketAddr,
    id: Option<SpiffeId>,
}

impl PeerInfo {
    fn label(&self) -> String {
        self.id
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), ToString::to_string)
    }
}

/// Accepts tunnels until draining starts; each connection then finishes its streams.
pub async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, ctx: Arc<Inbound>) {
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = ctx.drain.started() => return,
        };
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move { connection(tcp, addr, acceptor, ctx).await });
    }
}

async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<Inbound>,
) {
    let _tracked = ctx.drain.track();
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.handshake_failed(Direction::Inbound);
            warn!(src.addr = %addr, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            ctx.metrics.handshake_failed(Direction::Inbound);
            warn!(src.addr = %addr, "inbound handshake timed out");
            return;
        }
    };
    let id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| CertInfo::from_der(leaf).ok())
        .and_then(|info| info.spiffe_uri().and_then(|u| SpiffeId::parse(u).ok()));
    let peer = Arc::new(PeerInfo { addr, id });
    ctx.metrics.tunnel_opened(Direction::Inbound);
    debug!(src.addr = %addr, peer.identity = %peer.label(), "tunnel accepted");
    let svc = {
        let (ctx, peer) = (ctx.clone(), peer.clone());
        hyper::service::service_fn(move |req| {
            let (ctx, peer) = (ctx.clone(), peer.clone());
            async move { Ok::<_, Infallible>(stream(req, peer, ctx).await) }
        })
    };
    let conn = server_builder(&ctx.tunnel).serve_connection(TokioIo::new(tls), svc);
    let mut conn = std::pin::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.drain.started() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        debug!(src.addr = %addr, error = %e, "tunnel connection ended with an error");
    }
    ctx.metrics.tunnel_closed(Direction::Inbound);
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// One CONNECT stream.
async fn stream(
    req: Request<Incoming>,
    peer: Arc<PeerInfo>,
    ctx: Arc<Inbound>,
) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let service = req.uri().host().unwrap_or_default().to_owned();
    let Some(local) = ctx.services.get(&service).cloned() else {
        ctx.metrics.denied(DenyReason::UnknownService);
        warn!(src.addr = %peer.addr, peer.identity = %peer.label(), dst.service = %service, "refused: service does not run on this node");
        return status(StatusCode::NOT_FOUND);
    };
    let from = match peer.id.as_ref().map(|id| (id, id.subject())) {
        Some((id, Subject::Workload { service, .. })) => (service.clone(), id.to_string()),
        _ => {
            ctx.metrics.denied(DenyReason::NotWorkload);
            warn!(src.addr = %peer.addr, peer.identity = %peer.label(), dst.service = %service, "refused: peer is not a workload identity");
            return status(StatusCode::FORBIDDEN);
        }
    };
    let target_id = local.id.to_string();
    let (p, t) = (
        Peer {
            service: &from.0,
            spiffe_id: &from.1,
        },
        Target {
            service: &service,
            spiffe_id: &target_id,
        },
    );
    let admitted = match local.protocol {
        Protocol::Http => ctx.policy.admits_http(&p, &t),
        Protocol::Tcp | Protocol::Grpc => {
            let d = ctx.policy.check_connection(&p, &t);
            if d.action == Action::Deny {
                info!(peer.identity = %from.1, dst.service = %service, reason = %d.reason, "denied by intention");
            }
            d.action == Action::Allow
        }
    };
    if !admitted {
        ctx.metrics.denied(DenyReason::Policy);
        if local.protocol == Protocol::Http {
            info!(peer.identity = %from.1, dst.service = %service, "denied by intention: no rule allows this source");
        }
        return status(StatusCode::FORBIDDEN);
    }
    if ctx.drain.is_draining() {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let upstream = match tokio::time::timeout(
        ctx.tunnel.connect_timeout,
        TcpStream::connect(("127.0.0.1", local.port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(dst.service = %service, port = local.port, error = %e, "local service unreachable");
            return status(StatusCode::BAD_GATEWAY);
        }
        Err(_) => {
            warn!(dst.service = %service, port = local.port, "local service connect timed out");
            return status(StatusCode::BAD_GATEWAY);
        }
    };
    let _ = upstream.set_nodelay(true);
    let tracked = ctx.drain.track();
    let metered = ctx.metrics.stream(Direction::Inbound);
    tokio::spawn(async move {
        let _guards = (tracked, metered);
        let tunnel = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "stream upgrade failed");
                return;
            }
        };
        match local.protocol {
            Protocol::Http => l7(tunnel, upstream, from, service, target_id, ctx).await,
            Protocol::Tcp | Protocol::Grpc => {
                let (mut tunnel, mut upstream) = (TokioIo::new(tunnel), upstream);
                match splice(&mut tunnel, &mut upstream).await {
                    Ok((sent, received)) => ctx.metrics.bytes(Direction::Inbound, sent, received),
                    Err(e) => {
                        debug!(dst.service = %service, error = %e, "inbound stream ended with an error")
                    }
                }
            }
        }
    });
    status(StatusCode::OK)
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(code: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// HTTP/1.1 inside the tunnel: each request is checked against the L7 rules; allowed ones go
/// to the local service over one connection, denied ones get 403 and never reach it.
async fn l7(
    tunnel: hyper::upgrade::Upgraded,
    upstream: TcpStream,
    from: (String, String),
    service: String,
    target_id: String,
    ctx: Arc<Inbound>,
) {
    let (sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(e) => {
                warn!(dst.service = %service, error = %e, "local service HTTP handshake failed");
                return;
            }
        };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let from = Arc::new(from);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (sender, ctx, from, service, target_id) = (
            sender.clone(),
            ctx.clone(),
            from.clone(),
            service.clone(),
            target_id.clone(),
        );
        async move {
            if !is_normalized(req.uri().path()) {
                ctx.metrics.denied(DenyReason::L7Policy);
                info!(peer.identity = %from.1, dst.service = %service, path = %req.uri().path(), "request refused: path is not normalized");
                return Ok::<_, Infallible>(text(
                    StatusCode::BAD_REQUEST,
                    "path must be normalized (no '.', '..', '//' or encoded '/' and '.')\n",
                ));
            }
            let decision = ctx.policy.check_request(
                &Peer {
                    service: &from.0,
                    spiffe_id: &from.1,
                },
                &Target {
                    service: &service,
                    spiffe_id: &target_id,
                },
                &HttpRequest {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                },
            );
            if decision.action == Action::Deny {
                ctx.metrics.denied(DenyReason::L7Policy);
                info!(peer.identity = %from.1, dst.service = %service, method = %req.method(), path = %req.uri().path(), reason = %decision.reason, "request denied by intention");
                return Ok::<_, Infallible>(text(StatusCode::FORBIDDEN, "denied by intention\n"));
            }
            let mut sender = sender.lock().await;
            match sender.send_request(req).await {
                Ok(resp) => Ok(resp.map(BodyExt::boxed)),
                Err(e) => {
                    warn!(dst.service = %service, error = %e, "local service request failed");
                    Ok(text(StatusCode::BAD_GATEWAY, "local service failed\n"))
                }
            }
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(tunnel, svc)
        .await
    {
        debug!(error = %e, "L7 stream ended with an error");
    }
}

/// Whether a path is in the form path rules are written for: no `.`/`..` segments, no empty
/// segments, no percent-encoded `/`, `.` or `\\`. Such paths could dodge a deny rule, so they are
/// refused rather than interpreted.
fn is_normalized(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.starts_with('/')
        && !path.contains("//")
        && !lower.contains("%2f")
        && !lower.contains("%2e")
        && !lower.contains("%5c")
        && !path.contains('\\')
        && path.split('/').skip(1).all(|seg| seg != "." && seg != "..")
}

#[cfg(test)]
mod tests {
    use super::is_normalized;

    #[test]
    fn path_normalization() {
        for ok in ["/", "/users/1", "/admin/", "/a.b/c..d"] {
            assert!(is_normalized(ok), "{ok}");
        }
        for bad in [
            "/users/../admin/x",
            "/./admin",
            "//admin",
            "/admin/%2e%2e/x",
            "/a%2Fb",
            "/a\\b",
            "/..",
        ] {
            assert!(!is_normalized(bad), "{bad}");
        }
    }
}
