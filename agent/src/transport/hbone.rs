//! The tunnel between agents: TLS 1.3 mTLS with ALPN h2, HTTP/2 CONNECT whose authority names
//! the destination service, one stream per application connection.
//!
//! The client side keeps one pooled connection per (source identity, destination agent) and
//! multiplexes every stream on it; the server side is configured by [`server_builder`]. Both use
//! the same window sizes (tuned for bulk transfer) and keepalive pings.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::{client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_ca::{spiffe::SpiffeId, verify::ExpectedPeer};
use rustls_pki_types::ServerName;
use tokio::{net::TcpStream, sync::Mutex};
use tracing::{debug, warn};

use crate::{
    config::TunnelConfig,
    identity::{Identity, IdentityManager},
    telemetry::{Direction, Metrics},
};

/// Why a tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
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
    /// HTTP/2 failed on the connection.
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
    },
}

impl TunnelError {
    /// Whether trying another endpoint could help (everything but a policy denial).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN)
    }
}

/// HTTP/2 client settings for tunnels.
pub fn client_builder(cfg: &TunnelConfig) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(256 * 1024)
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true);
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
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout);
    b
}

type Sender = SendRequest<Empty<Bytes>>;
type Slot = Arc<Mutex<Option<Sender>>>;

/// Pooled tunnel connections, one per (source identity, destination agent).
pub struct Pool {
    identity: IdentityManager,
    cfg: TunnelConfig,
    metrics: Arc<Metrics>,
    slots: std::sync::Mutex<HashMap<(SpiffeId, SocketAddr), Slot>>,
    tls: std::sync::Mutex<HashMap<SpiffeId, tokio_rustls::TlsConnector>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(identity: IdentityManager, cfg: TunnelConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            cfg,
            metrics,
            slots: std::sync::Mutex::new(HashMap::new()),
            tls: std::sync::Mutex::new(HashMap::new()),
        }
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

    /// Opens a stream to `service` on the agent at `endpoint`, presenting `source`'s SVID.
    pub async fn connect(
        &self,
        source: &Identity,
        endpoint: SocketAddr,
        service: &str,
    ) -> Result<Upgraded, TunnelError> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .expect("invariant: pool lock not poisoned");
            slots
                .entry((source.id.clone(), endpoint))
                .or_default()
                .clone()
        };
        // one retry: a pooled connection may have closed between the check and the send
        for attempt in 0..2 {
            let mut sender = self.sender(&slot, source, endpoint).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{service}:{}", endpoint.port()))
                .body(Empty::<Bytes>::new())
                .expect("invariant: CONNECT request is well-formed");
            // a pooled connection to a node that vanished (link down) would hang until the
            // keepalive notices; bound the wait so the caller can fail over at once
            let sent =
                tokio::time::timeout(self.cfg.connect_timeout, sender.send_request(req)).await;
            let Ok(sent) = sent else {
                slot.lock().await.take();
                return Err(TunnelError::Http2 {
                    addr: endpoint,
                    reason: format!("no answer to CONNECT within {:?}", self.cfg.connect_timeout),
                });
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) if attempt == 0 && (e.is_closed() || e.is_canceled()) => {
                    slot.lock().await.take();
                    continue;
                }
                Err(e) => {
                    slot.lock().await.take();
                    return Err(TunnelError::Http2 {
                        addr: endpoint,
                        reason: e.to_string(),
                    });
                }
            };
            if resp.status() != StatusCode::OK {
                return Err(TunnelError::Refused {
                    addr: endpoint,
                    service: service.to_owned(),
                    status: resp.status(),
                });
            }
            return hyper::upgrade::on(resp)
                .await
                .map_err(|e| TunnelError::Http2 {
                    addr: endpoint,
                    reason: e.to_string(),
                });
        }
        Err(TunnelError::Http2 {
            addr: endpoint,
            reason: "connection closed twice in a row".into(),
        })
    }

    /// The pooled sender for a slot, connecting if there is none or it closed.
    async fn sender(
        &self,
        slot: &Slot,
        source: &Identity,
        endpoint: SocketAddr,
    ) -> Result<Sender, TunnelError> {
        let mut guard = slot.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let sender = self.dial(source, endpoint).await?;
        *guard = Some(sender.clone());
        Ok(sender)
    }

    async fn dial(&self, source: &Identity, endpoint: SocketAddr) -> Result<Sender, TunnelError> {
        let timeout = self.cfg.connect_timeout;
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
        let tls =
            match tokio::time::timeout(timeout, self.connector(source).connect(server_name, tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
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
        debug!(peer = %endpoint, source = %source.id, "tunnel connection opened");
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                warn!(peer = %endpoint, error = %e, "tunnel connection failed");
            }
            metrics.tunnel_closed(Direction::Outbound);
        });
        Ok(sender)
    }
}
