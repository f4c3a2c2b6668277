//! `meshgate debug otlp-sink`: a local OTLP receiver that accepts trace exports (gRPC and
//! HTTP/protobuf), counts spans and drops them. For benchmarks of tracing's cost and for
//! checking that a deployment exports at all; not a collector.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

/// `meshgate debug otlp-sink`.
#[derive(Debug, clap::Args)]
pub(crate) struct OtlpSinkArgs {
    /// OTLP/gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:4317")]
    grpc: SocketAddr,
    /// OTLP/HTTP listen address (`POST /v1/traces`, protobuf).
    #[arg(long, default_value = "127.0.0.1:4318")]
    http: SocketAddr,
    /// How often to print the running totals.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
}

#[derive(Debug, Default)]
struct Counts {
    exports: AtomicU64,
    spans: AtomicU64,
}

impl Counts {
    fn add(&self, req: &ExportTraceServiceRequest) {
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter())
            .map(|s| s.spans.len())
            .sum();
        self.exports.fetch_add(1, Ordering::Relaxed);
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
struct Sink(Arc<Counts>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(req.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Runs until interrupted, printing `exports N spans M` every `--every`.
pub(crate) async fn run(args: OtlpSinkArgs) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let grpc = tokio::net::TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", args.grpc))?;
    let http = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on {} (HTTP)", args.http))?;
    println!(
        "otlp-sink: gRPC on {}, HTTP on {} (POST /v1/traces); OTEL_EXPORTER_OTLP_ENDPOINT=http://{}",
        grpc.local_addr()?,
        http.local_addr()?,
        grpc.local_addr()?
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(counts.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = http.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            let ok = req.uri().path() == "/v1/traces";
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let status = match (
                                ok,
                                <ExportTraceServiceRequest as prost::Message>::decode(body),
                            ) {
                                (true, Ok(r)) => {
                                    c.add(&r);
                                    http::StatusCode::OK
                                }
                                (false, _) => http::StatusCode::NOT_FOUND,
                                (true, Err(_)) => http::StatusCode::BAD_REQUEST,
                            };
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let mut tick = tokio::time::interval(args.every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                println!("exports {} spans {}", counts.exports.load(Ordering::Relaxed), counts.spans.load(Ordering::Relaxed));
                return Ok(());
            }
        }
        println!(
            "exports {} spans {}",
            counts.exports.load(Ordering::Relaxed),
            counts.spans.load(Ordering::Relaxed)
        );
    }
}
