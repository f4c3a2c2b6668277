//! The HTTP client that reaches services through mesh tunnels: hyper's pooled client over a
//! connector that opens a tunnel stream to the service named by the URI's host (endpoint choice,
//! failover and ejection as in [`crate::proxy::outbound::open_stream`]). Idle streams are kept
//! per service and reused.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::{body::Incoming, upgrade::Upgraded};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioTimer},
};

use crate::{
    balance::InFlight,
    discovery::Endpoints,
    identity::Identity,
    proxy::outbound::{OpenError, open_stream},
    telemetry::Metrics,
    transport::hbone::Pool,
};

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No endpoint could be reached (or none is known, or the destination refused us).
    #[error("{0}")]
    Unavailable(String),
    /// The request was sent but the exchange failed.
    #[error("upstream exchange failed: {0}")]
    Failed(String),
}

/// A tunnel stream as a client connection.
pub struct MeshIo {
    io: Upgraded,
    _in_flight: InFlight,
}

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshIo {
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

struct ConnectorInner {
    source: Identity,
    endpoints: Arc<Endpoints>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
}

/// Opens tunnel streams for hyper's client.
#[derive(Clone)]
pub struct MeshConnector {
    inner: Arc<ConnectorInner>,
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshIo;
    // a plain boxed error: hyper's client wants `Into<BoxError>`, and a concrete type there
    // trips the compiler's higher-ranked Send checks in callers
    type Error = super::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshIo, super::BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let service = uri.host().unwrap_or_default().to_owned();
            let Some(balancer) = inner.endpoints.balancer(&service) else {
                return Err(format!("no discovery entry for {service}").into());
            };
            match open_stream(
                &service,
                &inner.source,
                &balancer,
                &inner.pool,
                &inner.metrics,
            )
            .await
            {
                Ok((io, in_flight)) => Ok(MeshIo {
                    io,
                    _in_flight: in_flight,
                }),
                Err(
                    e @ (OpenError::NoEndpoints(_)
                    | OpenError::AllFailed { .. }
                    | OpenError::Denied(_)),
                ) => Err(e.to_string().into()),
            }
        })
    }
}

/// HTTP/1.1 to services through the mesh, with pooled idle streams per service.
#[derive(Clone)]
pub struct MeshHttpClient {
    client: Client<MeshConnector, Full<Bytes>>,
}

impl std::fmt::Debug for MeshHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHttpClient").finish_non_exhaustive()
    }
}

impl MeshHttpClient {
    /// A client presenting `source`'s SVID, with endpoints from `endpoints`.
    pub fn new(
        source: Identity,
        endpoints: Arc<Endpoints>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let connector = MeshConnector {
            inner: Arc::new(ConnectorInner {
                source,
                endpoints,
                pool,
                metrics,
            }),
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .retry_canceled_requests(true)
            .build(connector);
        Self { client }
    }

    /// Sends `req` to `service` (the URI's path and query are kept).
    pub async fn send(
        &self,
        service: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = format!("http://{service}{pq}")
            .parse()
            .map_err(|e| UpstreamError::Failed(format!("bad upstream URI: {e}")))?;
        parts.version = http::Version::HTTP_11;
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(r) => Ok(r),
            Err(e) if e.is_connect() => {
                Err(UpstreamError::Unavailable(crate::identity::error_chain(&e)))
            }
            Err(e) => Err(UpstreamError::Failed(crate::identity::error_chain(&e))),
        }
    }
}
