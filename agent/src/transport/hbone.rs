//! The tunnel between agents: TLS 1.3 mTLS with ALPN h2 and HTTP/2 on top. Two kinds of
//! streams share a connection:
//!
//! - **CONNECT** streams, one per application connection (L4 services, upgrades): the
//!   authority names the destination service, never an address;
//! - **request** streams, one per HTTP request to an L7 service (`http`, `grpc`): the request
//!   itself, with the destination service in the [`SERVICE_HEADER`] header. HTTP/2 end to end,
//!   trailers and all, without a second HTTP layer inside the tunnel.
//!
//! The client side keeps a small set of connections per (source identity, destination address,
//! identity that must answer there) — like ztunnel's `WorkloadKey` with its `dst_id`: a stream
//! goes on the least loaded one with room (at most `max_streams_per_connection` each), and a new
//! connection is dialled when all are full. Dials are single-flight: callers waiting for the
//! same destination share one attempt and its result (all fail over together on an error), and
//! no lock is held across I/O; one `connect_timeout` bounds TCP, TLS and HTTP/2 together.
//! Per-stream windows are well below the connection window, so streams nobody reads cannot
//! starve the others.
//!
//! Destination pinning: the server must present exactly the node identity that must answer —
//! the node discovery names for the endpoint, or (for an address without one) a node that the
//! trust bundle's hosting map allows for the service — never "any node of the trust domain".
//! An endpoint whose named node may not host the service is not used at all. Either refusal is
//! counted (`meshgate_tunnel_destination_refusals{reason}`), logged once per endpoint, and
//! reported as not processed, so the caller fails over to another endpoint.
//!
//! No tunnel outlives the trust it was opened with: a connection stops taking new streams a
//! little before either side's certificate chain expires (a fresh one is dialled with the
//! renewed certificates), and is closed when the peer's chain expires, leaves the bundle's
//! roots, is revoked, or its node may no longer host the service
//! (`meshgate_tunnel_cut_offs{direction,reason}`).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_ca::{
    pki,
    spiffe::{SpiffeId, Subject},
    verify::{ExpectedPeer, PeerRefusal, Usage, peer_refusal},
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{net::TcpStream, sync::OnceCell};
use tracing::{debug, info, warn};

use crate::{
    balance::Target,
    config::TunnelConfig,
    http::{Body, empty},
    identity::{Identity, IdentityManager, PeerWatch},
    telemetry::{DestinationRefusal, Direction, Metrics},
};

/// The request header that names the destination service of a request stream.
pub const SERVICE_HEADER: http::HeaderName = http::HeaderName::from_static("meshgate-service");

/// Why a tunnel stream could not be opened or a request could not be carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    /// TCP connect failed or timed out.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (wrong identity, foreign CA, expired…).
    #[error("TLS handshake with {addr}: {reason}")]
    Handshake {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The stream was not processed by the remote agent (the connection closed or went away
    /// before it was taken, or the stream was refused): safe to send again elsewhere.
    #[error("tunnel to {addr}: {reason} (not processed)")]
    NotProcessed {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// HTTP/2 failed after the stream may have been processed.
    #[error("tunnel to {addr}: {reason}")]
    Http2 {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The destination is not the node that must answer there, or that node may not host the
    /// service: it was not used (or the handshake was refused). Safe to try another endpoint.
    #[error("{addr}: {reason}")]
    WrongDestination {
        /// The agent's address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The remote agent answered the CONNECT with an error status.
    #[error("{addr} refused the stream to {service}: {status}")]
    Refused {
        /// The agent.
        addr: SocketAddr,
        /// The destination service.
        service: String,
        /// 403 denied, 404 not on that node, 502 local service down, 503 draining.
        status: StatusCode,
        /// The deciding intention, when the agent named it (403).
        rule: Option<String>,
    },
}

impl TunnelError {
    /// The agent's address the error is about.
    pub fn addr(&self) -> SocketAddr {
        match self {
            TunnelError::Connect { addr, .. }
            | TunnelError::Handshake { addr, .. }
            | TunnelError::WrongDestination { addr, .. }
            | TunnelError::NotProcessed { addr, .. }
            | TunnelError::Http2 { addr, .. }
            | TunnelError::Refused { addr, .. } => *addr,
        }
    }

    /// Whether trying another endpoint could help (everything but a policy denial).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN)
    }

    /// Whether the remote agent certainly did not act on the stream (so even a request that is
    /// not idempotent may be sent again).
    pub fn not_processed(&self) -> bool {
        matches!(
            self,
            TunnelError::Connect { .. }
                | TunnelError::Handshake { .. }
                | TunnelError::WrongDestination { .. }
                | TunnelError::NotProcessed { .. }
                | TunnelError::Refused { .. }
        )
    }
}

/// HTTP/2 client settings for tunnels.
pub fn client_builder(cfg: &TunnelConfig) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(256 * 1024)
        .max_header_list_size(256 * 1024)
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true)
        // streams we cancel (a client went away) must never count against the connection:
        // remember enough of them to ignore their late frames, and do not tear the tunnel down
        // over library resets (the inbound side guards against reset floods by rate)
        .max_concurrent_reset_streams(4096)
        .max_local_error_reset_streams(None);
    b
}

/// HTTP/2 server settings for the inbound port.
pub fn server_builder(cfg: &TunnelConfig) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(256 * 1024)
        .max_concurrent_streams(cfg.max_streams)
        // never below what a gateway accepts: a request the edge took is not refused here
        .max_header_list_size(256 * 1024)
        .max_local_error_reset_streams(None)
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout);
    b
}

type Sender = SendRequest<Body>;

/// What must answer at a destination address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Expect {
    /// Exactly this node (discovery named it).
    Node(Arc<str>),
    /// Any node the hosting map allows for this service (discovery named none).
    HostOf {
        namespace: Arc<str>,
        service: Arc<str>,
    },
}

/// A pool key under one source identity: the address and who must answer there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConnKey {
    addr: SocketAddr,
    expect: Expect,
}

/// One pooled tunnel connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    sender: Sender,
    streams: AtomicUsize,
    /// Set a little before either side's chain expires: no new streams go on it.
    retiring: Arc<AtomicBool>,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.retiring.load(Ordering::Relaxed)
    }
}

/// A stream's claim on a pooled connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Conn>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

type Dial = Arc<OnceCell<Result<Arc<Conn>, TunnelError>>>;

#[derive(Debug, Default)]
struct Peer {
    conns: Vec<Arc<Conn>>,
    dialing: Option<Dial>,
}

/// Pooled tunnel connections per (source identity, destination address, identity that must
/// answer there).
pub struct Pool {
    identity: IdentityManager,
    cfg: TunnelConfig,
    metrics: Arc<Metrics>,
    peers: Mutex<HashMap<SpiffeId, HashMap<ConnKey, Peer>>>,
    /// Refusals already logged (endpoint and what was wrong), so each is logged once.
    logged: Mutex<HashSet<(SocketAddr, String)>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

fn error_text(e: &hyper::Error) -> String {
    crate::identity::error_chain(e)
}

/// Whether a hyper error on a request means the remote never processed it: the connection
/// closed before the request was sent, a GOAWAY named a lower last stream id, or the stream
/// was refused.
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return (h2e.is_go_away() && h2e.is_remote())
                || h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

/// When a connection opened at `now` whose chains end at `deadline` stops taking new streams:
/// a quarter of its remaining life (at most 30 s) before the end, so streams in flight can
/// finish and a fresh connection with renewed certificates takes over. `None` when that moment
/// is already here (the peer's certificate was not renewed either): the connection is then
/// used until it ends, rather than dialling a new one for every stream.
fn retire_after(now: SystemTime, deadline: SystemTime) -> Option<Duration> {
    let life = deadline.duration_since(now).ok()?;
    let margin = (life / 4).min(Duration::from_secs(30));
    let at = life - margin;
    (at > Duration::from_secs(1)).then_some(at)
}

/// The name of a negotiated TLS version, for `/status`.
pub fn tls_version(v: Option<rustls::ProtocolVersion>) -> Option<&'static str> {
    match v? {
        rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        _ => None,
    }
}

const PHASE_TCP: u8 = 0;
const PHASE_TLS: u8 = 1;
const PHASE_H2: u8 = 2;

impl Pool {
    /// An empty pool.
    pub fn new(identity: IdentityManager, cfg: TunnelConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            cfg,
            metrics,
            peers: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The tunnel settings.
    pub fn config(&self) -> &TunnelConfig {
        &self.cfg
    }

    /// Number of open connections to `endpoint` presenting `source` (for tests and `/stats`).
    pub fn connections(&self, source: &SpiffeId, endpoint: SocketAddr) -> usize {
        let peers = self
            .peers
            .lock()
            .expect("invariant: pool lock not poisoned");
        peers.get(source).map_or(0, |keys| {
            keys.iter()
                .filter(|(k, _)| k.addr == endpoint)
                .map(|(_, p)| p.conns.iter().filter(|c| !c.sender.is_closed()).count())
                .sum()
        })
    }

    /// Counts and logs (once per endpoint and reason) a refused destination.
    fn refuse(&self, addr: SocketAddr, kind: DestinationRefusal, reason: String) -> TunnelError {
        self.metrics.destination_refused(kind);
        let first = {
            let mut logged = self
                .logged
                .lock()
                .expect("invariant: pool lock not poisoned");
            if logged.len() >= 4096 {
                logged.clear();
            }
            logged.insert((addr, reason.clone()))
        };
        if first {
            warn!(peer = %addr, reason = kind.as_str(), "destination refused: {reason}");
        } else {
            debug!(peer = %addr, reason = kind.as_str(), "destination refused: {reason}");
        }
        TunnelError::WrongDestination { addr, reason }
    }

    /// Decides who must answer at `target` for `service` (in `source`'s namespace), or refuses
    /// the endpoint without using it: its node is revoked or may not host the service, or the
    /// bundle has no hosting map to check an address without a node against.
    fn admit(
        &self,
        source: &Identity,
        service: &Arc<str>,
        target: &Target,
    ) -> Result<ConnKey, TunnelError> {
        let bundle = self.identity.bundle().load();
        let ns = source.namespace();
        let expect = match &target.node {
            Some(node) => {
                if bundle.revoked_nodes().contains(&**node) {
                    return Err(self.refuse(
                        target.addr,
                        DestinationRefusal::Revoked,
                        format!("node {node} is revoked; endpoint {target} of {service} not used"),
                    ));
                }
                if !bundle.may_host(node, ns, service) {
                    let allowed = bundle.hosts(ns, service);
                    return Err(self.refuse(
                        target.addr,
                        DestinationRefusal::NotHosting,
                        format!(
                            "node {node} may not host {ns}/{service} (the CA allows: {}); endpoint {target} not used",
                            if allowed.is_empty() { "no node".to_owned() } else { allowed.join(", ") }
                        ),
                    ));
                }
                Expect::Node(node.clone())
            }
            None => {
                if !bundle.has_hosting() {
                    return Err(self.refuse(
                        target.addr,
                        DestinationRefusal::NoHostingMap,
                        format!(
                            "the trust bundle carries no hosting map yet (is the CA older than this agent?), so endpoint {target} of {service}, which names no node, cannot be verified; name its node as NODE@IP:PORT"
                        ),
                    ));
                }
                Expect::HostOf {
                    namespace: ns.clone(),
                    service: service.clone(),
                }
            }
        };
        Ok(ConnKey {
            addr: target.addr,
            expect,
        })
    }

    /// The identities that may answer for `key` now.
    fn expected(&self, source: &Identity, key: &ConnKey) -> Result<Vec<SpiffeId>, TunnelError> {
        let td = source.id.trust_domain();
        let node_id = |n: &str| {
            SpiffeId::node(td, n).map_err(|e| TunnelError::WrongDestination {
                addr: key.addr,
                reason: format!("node name {n:?}: {e}"),
            })
        };
        match &key.expect {
            Expect::Node(n) => Ok(vec![node_id(n)?]),
            Expect::HostOf { namespace, service } => {
                let bundle = self.identity.bundle().load();
                let ids: Vec<SpiffeId> = bundle
                    .hosts(namespace, service)
                    .into_iter()
                    .filter(|n| !bundle.revoked_nodes().contains(*n))
                    .filter_map(|n| node_id(n).ok())
                    .collect();
                if ids.is_empty() {
                    return Err(self.refuse(
                        key.addr,
                        DestinationRefusal::NotHosting,
                        format!(
                            "no node may host {namespace}/{service} (the CA's hosting map lists none); endpoint {} not used",
                            key.addr
                        ),
                    ));
                }
                Ok(ids)
            }
        }
    }

    /// A connection for `key` with room for one more stream, dialling one if every connection
    /// is full or retiring.
    async fn checkout(
        &self,
        source: &Identity,
        service: &str,
        key: &ConnKey,
    ) -> Result<Lease, TunnelError> {
        let max = self.cfg.max_streams_per_connection as usize;
        loop {
            let dial = {
                let mut peers = self
                    .peers
                    .lock()
                    .expect("invariant: pool lock not poisoned");
                if !peers.contains_key(&source.id) {
                    peers.insert(source.id.clone(), HashMap::new());
                }
                let keys = peers
                    .get_mut(&source.id)
                    .expect("invariant: inserted above");
                if !keys.contains_key(key) {
                    keys.insert(key.clone(), Peer::default());
                }
                let peer = keys.get_mut(key).expect("invariant: inserted above");
                peer.conns.retain(|c| !c.sender.is_closed());
                let best = peer
                    .conns
                    .iter()
                    .filter(|c| c.usable() && c.sender.is_ready())
                    .min_by_key(|c| c.streams.load(Ordering::Relaxed));
                match best {
                    Some(c) if c.streams.load(Ordering::Relaxed) < max => {
                        c.streams.fetch_add(1, Ordering::Relaxed);
                        return Ok(Lease { conn: c.clone() });
                    }
                    _ => {}
                }
                peer.dialing.get_or_insert_with(Dial::default).clone()
            };
            let result = dial
                .get_or_init(|| self.dial(source, service, key))
                .await
                .clone();
            {
                let mut peers = self
                    .peers
                    .lock()
                    .expect("invariant: pool lock not poisoned");
                if let Some(peer) = peers.get_mut(&source.id).and_then(|k| k.get_mut(key))
                    && peer.dialing.as_ref().is_some_and(|d| Arc::ptr_eq(d, &dial))
                {
                    peer.dialing = None;
                    if let Ok(c) = &result {
                        peer.conns.push(c.clone());
                    }
                }
            }
            match result {
                Ok(c) if !c.sender.is_closed() => {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lease { conn: c });
                }
                // it closed already: look again (a fresh dial starts if needed)
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops `conn` from the pool (it went away); open streams on it finish.
    fn forget(&self, source: &Identity, key: &ConnKey, conn: &Conn) {
        let mut peers = self
            .peers
            .lock()
            .expect("invariant: pool lock not poisoned");
        if let Some(p) = peers.get_mut(&source.id).and_then(|k| k.get_mut(key)) {
            p.conns.retain(|c| c.id != conn.id);
        }
    }

    /// Sends `req` (an L7 request, [`SERVICE_HEADER`] set) for `service` to the agent at
    /// `target`, presenting `source`'s SVID. A request the pool could not put on a connection
    /// is tried on another connection to the same agent; the returned [`Lease`] must live as
    /// long as the response body.
    pub async fn request(
        &self,
        source: &Identity,
        service: &Arc<str>,
        target: &Target,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), TunnelError> {
        let key = self.admit(source, service, target)?;
        let endpoint = target.addr;
        for _ in 0..3 {
            let lease = self.checkout(source, service, &key).await?;
            let mut sender = lease.conn.sender.clone();
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, lease)),
                Err(mut e) => {
                    self.forget(source, &key, &lease.conn);
                    match e.take_message() {
                        // never sent: put it on another connection
                        Some(back) => {
                            req = back;
                            continue;
                        }
                        None => {
                            let err = e.into_error();
                            let reason = error_text(&err);
                            return Err(if unprocessed(&err) {
                                TunnelError::NotProcessed {
                                    addr: endpoint,
                                    reason,
                                }
                            } else {
                                TunnelError::Http2 {
                                    addr: endpoint,
                                    reason,
                                }
                            });
                        }
                    }
                }
            }
        }
        Err(TunnelError::NotProcessed {
            addr: endpoint,
            reason: "connections closed three times in a row".into(),
        })
    }

    /// Opens a CONNECT stream to `service` on the agent at `target`, presenting `source`'s
    /// SVID. The [`Lease`] must live as long as the stream.
    pub async fn connect(
        &self,
        source: &Identity,
        target: &Target,
        service: &Arc<str>,
    ) -> Result<(Upgraded, Lease), TunnelError> {
        let endpoint = target.addr;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:{}", endpoint.port()))
            .body(empty())
            .expect("invariant: CONNECT request is well-formed");
        // a pooled connection to a node that vanished (link down) would hang until the
        // keepalive notices; bound the wait so the caller can fail over at once
        let sent = tokio::time::timeout(
            self.cfg.connect_timeout,
            self.request(source, service, target, req),
        )
        .await;
        let (resp, lease) = match sent {
            Ok(r) => r?,
            Err(_) => {
                return Err(TunnelError::NotProcessed {
                    addr: endpoint,
                    reason: format!("no answer to CONNECT within {:?}", self.cfg.connect_timeout),
                });
            }
        };
        if resp.status() != StatusCode::OK {
            let rule = resp
                .headers()
                .get(crate::http::DENY_RULE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(TunnelError::Refused {
                addr: endpoint,
                service: service.to_string(),
                status: resp.status(),
                rule,
            });
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| TunnelError::Http2 {
                addr: endpoint,
                reason: e.to_string(),
            })?;
        Ok((up, lease))
    }

    /// TCP, TLS (the server must be one of the identities `key` expects) and HTTP/2, all
    /// within one `connect_timeout`; then the connection's watcher.
    async fn dial(
        &self,
        source: &Identity,
        service: &str,
        key: &ConnKey,
    ) -> Result<Arc<Conn>, TunnelError> {
        let endpoint = key.addr;
        let expected = self.expected(source, key)?;
        let timeout = self.cfg.connect_timeout;
        let own_not_after = source.chain_not_after();
        let dial_started = std::time::Instant::now();
        let phase = AtomicU8::new(PHASE_TCP);
        let attempt = async {
            let tcp = TcpStream::connect(endpoint)
                .await
                .map_err(|e| TunnelError::Connect {
                    addr: endpoint,
                    reason: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            phase.store(PHASE_TLS, Ordering::Relaxed);
            let handshake_started = std::time::Instant::now();
            let connector = tokio_rustls::TlsConnector::from(
                self.identity
                    .client_config(source, ExpectedPeer::AnyOf(expected.clone())),
            );
            let server_name = ServerName::IpAddress(endpoint.ip().into());
            let tls = connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| self.handshake_error(endpoint, service, &expected, &e))?;
            self.metrics
                .handshake_done("outbound", handshake_started.elapsed());
            phase.store(PHASE_H2, Ordering::Relaxed);
            let peer_chain: Vec<CertificateDer<'static>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let version = tls_version(tls.get_ref().1.protocol_version());
            let (sender, conn) = client_builder(&self.cfg)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| TunnelError::Http2 {
                    addr: endpoint,
                    reason: e.to_string(),
                })?;
            Ok::<_, TunnelError>((sender, conn, (peer_chain, version)))
        };
        let (sender, conn, (peer_chain, version)) =
            match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => r?,
                Err(_) => {
                    let reason = format!("timed out after {timeout:?}");
                    return Err(match phase.load(Ordering::Relaxed) {
                        PHASE_TCP => TunnelError::Connect {
                            addr: endpoint,
                            reason,
                        },
                        PHASE_TLS => {
                            self.metrics.handshake_failed(Direction::Outbound);
                            TunnelError::Handshake {
                                addr: endpoint,
                                reason: format!("TLS handshake {reason}"),
                            }
                        }
                        _ => TunnelError::Http2 {
                            addr: endpoint,
                            reason: format!("HTTP/2 handshake {reason}"),
                        },
                    });
                }
            };
        let peer_id = peer_chain
            .first()
            .and_then(|l| pki::CertInfo::from_der(l).ok())
            .and_then(|i| i.spiffe_uri().and_then(|u| SpiffeId::parse(u).ok()));
        let now = self.identity.now();
        let deadline = match (pki::chain_not_after(&peer_chain), own_not_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let retire_in = deadline.and_then(|d| retire_after(now, d));
        let metrics = self.metrics.clone();
        metrics.tunnel_opened(Direction::Outbound);
        metrics.tunnel_connected(dial_started.elapsed());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer_text = peer_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        debug!(peer = %endpoint, peer.identity = %peer_text, source = %source.id, conn = id, "tunnel connection opened");
        let retiring = Arc::new(AtomicBool::new(false));
        let watch = self.identity.peer_watch();
        let extra = host_check(&key.expect);
        let flag = retiring.clone();
        let listed =
            metrics
                .peers
                .opened(Direction::Outbound, endpoint, peer_text.clone(), version);
        tokio::spawn(async move {
            let _listed = listed;
            tunnel_task(
                conn, watch, peer_chain, extra, retire_in, flag, endpoint, peer_text, metrics,
            )
            .await;
        });
        Ok(Arc::new(Conn {
            id,
            sender,
            streams: AtomicUsize::new(0),
            retiring,
        }))
    }

    /// The error for a failed TLS handshake: a refused destination (the wrong node, or a
    /// revoked one) is counted and logged once as such; other failures are handshake errors.
    fn handshake_error(
        &self,
        addr: SocketAddr,
        service: &str,
        expected: &[SpiffeId],
        e: &std::io::Error,
    ) -> TunnelError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls.and_then(peer_refusal) {
            Some(PeerRefusal::Unexpected(u)) => {
                let want: Vec<String> = expected.iter().map(ToString::to_string).collect();
                self.refuse(
                    addr,
                    DestinationRefusal::WrongIdentity,
                    format!(
                        "{addr} presented {} but only {} may answer there for {service}; not used",
                        u.presented,
                        want.join(" or ")
                    ),
                )
            }
            Some(PeerRefusal::Revoked(r)) => {
                self.refuse(addr, DestinationRefusal::Revoked, format!("{addr}: {r}"))
            }
            None => {
                self.metrics.handshake_failed(Direction::Outbound);
                TunnelError::Handshake {
                    addr,
                    reason: crate::identity::error_chain(e),
                }
            }
        }
    }
}

/// For an address without a node: the peer must stay a node the hosting map allows for the
/// service.
fn host_check(expect: &Expect) -> Option<crate::identity::ExtraCheck> {
    let Expect::HostOf { namespace, service } = expect else {
        return None;
    };
    let (namespace, service) = (namespace.clone(), service.clone());
    Some(Box::new(move |bundle, id| match id.subject() {
        Subject::Node(n) if bundle.may_host(n, &namespace, &service) => None,
        _ => Some(format!("{id} may no longer host {namespace}/{service}")),
    }))
}

/// Runs one outbound tunnel connection: until it ends, or its peer stops being trusted (then
/// it is closed at once); marks it retiring when its certificates near their end.
#[allow(clippy::too_many_arguments)]
async fn tunnel_task<C>(
    conn: C,
    watch: PeerWatch,
    peer_chain: Vec<CertificateDer<'static>>,
    extra: Option<crate::identity::ExtraCheck>,
    retire_in: Option<Duration>,
    retiring: Arc<AtomicBool>,
    endpoint: SocketAddr,
    peer: String,
    metrics: Arc<Metrics>,
) where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    let cut = watch.cut_off(peer_chain, Usage::Server, extra);
    let retire = async {
        if let Some(d) = retire_in {
            tokio::time::sleep(d).await;
            retiring.store(true, Ordering::Relaxed);
            debug!(peer = %endpoint, peer.identity = %peer, "tunnel connection retiring: its certificates end soon; new streams go on a fresh one");
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                warn!(peer = %endpoint, error = %e, "tunnel connection failed");
            }
        }
        c = cut => {
            metrics.tunnel_cut_off(Direction::Outbound, c.reason.as_str());
            info!(peer = %endpoint, peer.identity = %peer, reason = c.reason.as_str(), "closing tunnel connection: {c}");
        }
        () = retire => {}
    }
    metrics.tunnel_closed(Direction::Outbound);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_retire_before_their_certificates_end() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        // (seconds of life left, retire after)
        for (left, want) in [
            (86_400, Some(s(86_370))),
            (120, Some(s(90))),
            (20, Some(s(15))),
            (2, Some(Duration::from_millis(1500))),
            (1, None),
            (0, None),
        ] {
            assert_eq!(retire_after(t0, t0 + s(left)), want, "{left}s left");
        }
        assert_eq!(retire_after(t0 + s(5), t0), None, "already over");
    }
}
