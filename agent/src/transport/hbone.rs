//! The tunnel between agents: TLS 1.3 mTLS with ALPN h2 and HTTP/2 on top. Two kinds of
//! streams share a connection:
//!
//! - **CONNECT** streams, one per application connection (L4 services, upgrades): the
//!   authority names the destination service, never an address;
//! - **request** streams, one per HTTP request to an L7 service (`http`, `grpc`): the request
//!   itself, with the destination service in the [`SERVICE_HEADER`] header. HTTP/2 end to end,
//!   trailers and all, without a second HTTP layer inside the tunnel.
//!
//! The client side keeps a small set of connections per (source identity, destination agent):
//! a stream goes on the least loaded one with room (at most `max_streams_per_connection`
//! each), and a new connection is dialled when all are full. Dials are single-flight: callers
//! waiting for the same peer share one attempt and its result, and no lock is held across I/O.
//! Per-stream windows are well below the connection window, so streams nobody reads cannot
//! starve the others.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_ca::{spiffe::SpiffeId, verify::ExpectedPeer};
use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, sync::OnceCell};
use tracing::{debug, warn};

use crate::{
    config::TunnelConfig,
    http::{Body, empty},
    identity::{Identity, IdentityManager},
    telemetry::{Direction, Metrics},
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

/// One pooled tunnel connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    sender: Sender,
    streams: AtomicUsize,
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

/// Pooled tunnel connections per (source identity, destination agent).
pub struct Pool {
    identity: IdentityManager,
    cfg: TunnelConfig,
    metrics: Arc<Metrics>,
    peers: Mutex<HashMap<(SpiffeId, SocketAddr), Peer>>,
    tls: Mutex<HashMap<SpiffeId, tokio_rustls::TlsConnector>>,
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

impl Pool {
    /// An empty pool.
    pub fn new(identity: IdentityManager, cfg: TunnelConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            cfg,
            metrics,
            peers: Mutex::new(HashMap::new()),
            tls: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The tunnel settings.
    pub fn config(&self) -> &TunnelConfig {
        &self.cfg
    }

    fn connector(&self, source: &Identity) -> tokio_rustls::TlsConnector {
        let mut map = self.tls.lock().expect("invariant: pool lock not poisoned");
        map.entry(source.id.clone())
            .or_insert_with(|| {
                tokio_rustls::TlsConnector::from(
                    self.identity.client_config(source, ExpectedPeer::AnyNode),
                )
            })
            .clone()
    }

    /// Number of open connections to `endpoint` presenting `source` (for tests and `/stats`).
    pub fn connections(&self, source: &SpiffeId, endpoint: SocketAddr) -> usize {
        let peers = self
            .peers
            .lock()
            .expect("invariant: pool lock not poisoned");
        peers.get(&(source.clone(), endpoint)).map_or(0, |p| {
            p.conns.iter().filter(|c| !c.sender.is_closed()).count()
        })
    }

    /// A connection with room for one more stream, dialling one if every connection is full.
    async fn checkout(
        &self,
        source: &Identity,
        endpoint: SocketAddr,
    ) -> Result<Lease, TunnelError> {
        let key = (source.id.clone(), endpoint);
        let max = self.cfg.max_streams_per_connection as usize;
        loop {
            let dial = {
                let mut peers = self
                    .peers
                    .lock()
                    .expect("invariant: pool lock not poisoned");
                let peer = peers.entry(key.clone()).or_default();
                peer.conns.retain(|c| !c.sender.is_closed());
                let best = peer
                    .conns
                    .iter()
                    .filter(|c| c.sender.is_ready())
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
                .get_or_init(|| self.dial(source, endpoint))
                .await
                .clone();
            {
                let mut peers = self
                    .peers
                    .lock()
                    .expect("invariant: pool lock not poisoned");
                let peer = peers.entry(key.clone()).or_default();
                if peer.dialing.as_ref().is_some_and(|d| Arc::ptr_eq(d, &dial)) {
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
    fn forget(&self, source: &Identity, endpoint: SocketAddr, conn: &Conn) {
        let mut peers = self
            .peers
            .lock()
            .expect("invariant: pool lock not poisoned");
        if let Some(p) = peers.get_mut(&(source.id.clone(), endpoint)) {
            p.conns.retain(|c| c.id != conn.id);
        }
    }

    /// Sends `req` (an L7 request, [`SERVICE_HEADER`] set) to the agent at `endpoint`,
    /// presenting `source`'s SVID. A request the pool could not put on a connection is tried on
    /// another connection to the same agent; the returned [`Lease`] must live as long as the
    /// response body.
    pub async fn request(
        &self,
        source: &Identity,
        endpoint: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), TunnelError> {
        for _ in 0..3 {
            let lease = self.checkout(source, endpoint).await?;
            let mut sender = lease.conn.sender.clone();
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, lease)),
                Err(mut e) => {
                    self.forget(source, endpoint, &lease.conn);
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

    /// Opens a CONNECT stream to `service` on the agent at `endpoint`, presenting `source`'s
    /// SVID. The [`Lease`] must live as long as the stream.
    pub async fn connect(
        &self,
        source: &Identity,
        endpoint: SocketAddr,
        service: &str,
    ) -> Result<(Upgraded, Lease), TunnelError> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{service}:{}", endpoint.port()))
            .body(empty())
            .expect("invariant: CONNECT request is well-formed");
        // a pooled connection to a node that vanished (link down) would hang until the
        // keepalive notices; bound the wait so the caller can fail over at once
        let sent = tokio::time::timeout(
            self.cfg.connect_timeout,
            self.request(source, endpoint, req),
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
                service: service.to_owned(),
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

    async fn dial(
        &self,
        source: &Identity,
        endpoint: SocketAddr,
    ) -> Result<Arc<Conn>, TunnelError> {
        let timeout = self.cfg.connect_timeout;
        let dial_started = std::time::Instant::now();
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|_| TunnelError::Connect {
                addr: endpoint,
                reason: format!("timed out after {timeout:?}"),
            })?
            .map_err(|e| TunnelError::Connect {
                addr: endpoint,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::IpAddress(endpoint.ip().into());
        let handshake_started = std::time::Instant::now();
        let tls =
            match tokio::time::timeout(timeout, self.connector(source).connect(server_name, tcp))
                .await
            {
                Ok(Ok(tls)) => {
                    self.metrics
                        .handshake_done("outbound", handshake_started.elapsed());
                    tls
                }
                Ok(Err(e)) => {
                    self.metrics.handshake_failed(Direction::Outbound);
                    return Err(TunnelError::Handshake {
                        addr: endpoint,
                        reason: crate::identity::error_chain(&e),
                    });
                }
                Err(_) => {
                    self.metrics.handshake_failed(Direction::Outbound);
                    return Err(TunnelError::Handshake {
                        addr: endpoint,
                        reason: "timed out".into(),
                    });
                }
            };
        let (sender, conn) = client_builder(&self.cfg)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TunnelError::Http2 {
                addr: endpoint,
                reason: e.to_string(),
            })?;
        let metrics = self.metrics.clone();
        metrics.tunnel_opened(Direction::Outbound);
        metrics.tunnel_connected(dial_started.elapsed());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        debug!(peer = %endpoint, source = %source.id, conn = id, "tunnel connection opened");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                warn!(peer = %endpoint, error = %e, "tunnel connection failed");
            }
            metrics.tunnel_closed(Direction::Outbound);
        });
        Ok(Arc::new(Conn {
            id,
            sender,
            streams: AtomicUsize::new(0),
        }))
    }
}
