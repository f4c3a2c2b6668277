//! Outbound: each upstream listener accepts local TCP connections, picks an endpoint (power of
//! two choices over peak-EWMA latency, passive ejection), opens a tunnel stream presenting the
//! owning service's SVID, and splices. A failed endpoint — dead, too slow to connect, or not
//! the node that must answer there — is skipped for the next one before the client sees
//! anything, so a dead or impersonating node costs no client-visible error.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use hyper::upgrade::Upgraded;

use crate::{
    balance::{Balancer, InFlight},
    drain::Drain,
    identity::Identity,
    telemetry::{Direction, Metrics},
    transport::{
        forward::splice,
        hbone::{Lease, Pool, TunnelError},
    },
};

/// Attempts on distinct endpoints before a client connection is given up.
pub const MAX_ATTEMPTS: usize = 3;

/// One upstream listener's context.
#[derive(Debug)]
pub struct Upstream {
    /// Destination service.
    pub service: String,
    /// The identity presented: the SVID of the local service that owns the listener.
    pub source: Identity,
    /// Endpoints of `service`.
    pub balancer: Arc<Balancer>,
    /// Shared tunnel pool.
    pub pool: Arc<Pool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Drain state.
    pub drain: Drain,
}

/// Accepts until draining starts.
pub async fn serve(listener: TcpListener, up: Arc<Upstream>) {
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "upstream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = up.drain.started() => return,
        };
        let up = up.clone();
        tokio::spawn(async move { connection(tcp, addr, up).await });
    }
}

/// Why no tunnel stream to a service could be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Discovery knows no endpoint of the service.
    #[error("no endpoints known for {0}")]
    NoEndpoints(String),
    /// The destination's intentions refused the source (403): final, no other endpoint is tried.
    #[error(transparent)]
    Denied(TunnelError),
    /// Every endpoint tried failed.
    #[error("no endpoint of {service} reachable after {tried} attempts; last error: {last}")]
    AllFailed {
        /// The service.
        service: String,
        /// Endpoints tried.
        tried: usize,
        /// The last failure.
        last: TunnelError,
    },
}

/// Opens a tunnel stream to `service`: picks an endpoint (P2C over peak-EWMA, ejected ones
/// skipped), and on a failure records it and tries another, up to [`MAX_ATTEMPTS`] distinct
/// endpoints. The returned guards keep the endpoint's in-flight count and the tunnel stream's
/// slot until dropped.
pub async fn open_stream(
    service: &str,
    source: &Identity,
    balancer: &Balancer,
    pool: &Pool,
    metrics: &Metrics,
) -> Result<(Upgraded, InFlight, Lease), OpenError> {
    let mut rand = super::rng();
    let name: Arc<str> = Arc::from(service);
    let mut exclude = Vec::new();
    let mut last = None;
    for _ in 0..MAX_ATTEMPTS {
        let Some(ep) = balancer.pick(Instant::now(), &exclude, &mut rand) else {
            break;
        };
        let in_flight = ep.start();
        let started = Instant::now();
        match pool.connect(source, ep.target(), &name).await {
            Ok((tunnel, lease)) => {
                ep.record_success(Instant::now(), started.elapsed());
                return Ok((tunnel, in_flight, lease));
            }
            Err(e) if !e.is_retryable() => return Err(OpenError::Denied(e)),
            Err(e) => {
                ep.record_failure(Instant::now());
                metrics.connect_failed(service);
                warn!(dst.service = %service, endpoint = %ep.addr(), error = %e, "endpoint failed; trying another");
                exclude.push(ep.addr());
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(last) => OpenError::AllFailed {
            service: service.to_owned(),
            tried: exclude.len(),
            last,
        },
        None => OpenError::NoEndpoints(service.to_owned()),
    })
}

async fn connection(mut client: TcpStream, addr: std::net::SocketAddr, up: Arc<Upstream>) {
    let _tracked = up.drain.track();
    let _ = client.set_nodelay(true);
    match open_stream(&up.service, &up.source, &up.balancer, &up.pool, &up.metrics).await {
        Ok((tunnel, _in_flight, _lease)) => {
            let _metered = up.metrics.stream(Direction::Outbound);
            let mut tunnel = TokioIo::new(tunnel);
            match splice(&mut client, &mut tunnel).await {
                Ok((sent, received)) => up.metrics.bytes(Direction::Outbound, sent, received),
                Err(e) => {
                    debug!(dst.service = %up.service, error = %e, "outbound stream ended with an error")
                }
            }
        }
        Err(OpenError::Denied(e)) => {
            info!(src.addr = %addr, dst.service = %up.service, error = %e, "connection refused by the destination's intentions");
        }
        Err(e) => {
            warn!(src.addr = %addr, dst.service = %up.service, error = %e, "closing the client connection");
        }
    }
}
