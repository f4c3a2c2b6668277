//! Outbound: each upstream listener accepts local TCP connections, picks an endpoint (power of
//! two choices over peak-EWMA latency, passive ejection), opens a tunnel stream presenting the
//! owning service's SVID, and splices. A failed endpoint is skipped for the next one before the
//! client sees anything, so a dead node costs no client-visible error.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    balance::Balancer,
    drain::Drain,
    identity::Identity,
    telemetry::{Direction, Metrics},
    transport::{forward::splice, hbone::Pool},
};

/// Attempts on distinct endpoints before a client connection is given up.
const MAX_ATTEMPTS: usize = 3;

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

async fn connection(mut client: TcpStream, addr: std::net::SocketAddr, up: Arc<Upstream>) {
    let _tracked = up.drain.track();
    let _ = client.set_nodelay(true);
    let mut rand = super::rng();
    let mut exclude = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let Some(ep) = up.balancer.pick(Instant::now(), &exclude, &mut rand) else {
            break;
        };
        let _in_flight = ep.start();
        let started = Instant::now();
        match up.pool.connect(&up.source, ep.addr(), &up.service).await {
            Ok(tunnel) => {
                ep.record_success(Instant::now(), started.elapsed());
                let _metered = up.metrics.stream(Direction::Outbound);
                let mut tunnel = TokioIo::new(tunnel);
                match splice(&mut client, &mut tunnel).await {
                    Ok((sent, received)) => up.metrics.bytes(Direction::Outbound, sent, received),
                    Err(e) => {
                        debug!(dst.service = %up.service, error = %e, "outbound stream ended with an error")
                    }
                }
                return;
            }
            Err(e) if !e.is_retryable() => {
                info!(src.addr = %addr, dst.service = %up.service, error = %e, "connection refused by the destination's intentions");
                return;
            }
            Err(e) => {
                ep.record_failure(Instant::now());
                up.metrics.connect_failed(&up.service);
                warn!(dst.service = %up.service, endpoint = %ep.addr(), error = %e, "endpoint failed; trying another");
                exclude.push(ep.addr());
            }
        }
    }
    warn!(src.addr = %addr, dst.service = %up.service, tried = exclude.len(), "no endpoint reachable; closing the client connection");
}
