//! Bodies and connection lifetimes at the gateway: 200 MiB streamed up and down with flat
//! memory, authentication before the body, a stalled body timed out, idle connections closed.
//!
//! Memory is measured on a gateway in its own process ([`crate::mesh::GatewayProcess`]): the
//! tests of this binary run in parallel threads, so this process's RSS would count their
//! buffers too; the child's `/proc/PID/status` counts only the gateway.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use meshgate_gateway::config::Limits;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    auth::{ISS, ec},
    clients::parse_h1,
    gw_harness::Backend,
    harness::eventually,
    mesh::{AgentSpec, GatewaySpec, Intention, RouteSpec, ServiceSpec, TestMesh},
};

const MIB: usize = 1 << 20;

/// Chunk `i` of a transfer: 1 MiB of a byte pattern that differs per chunk.
fn chunk(i: usize) -> Bytes {
    let mut v = vec![0u8; MIB];
    for (j, b) in v.iter_mut().enumerate() {
        *b = ((i * 31 + j * 7) % 251) as u8;
    }
    Bytes::from(v)
}

fn sha_of(chunks: usize) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for i in 0..chunks {
        ctx.update(&chunk(i));
    }
    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
}

/// A backend that hashes uploads (`POST /upload` answers `BYTES SHA256`) and streams
/// downloads (`GET /download/CHUNKS`, chunked, no Content-Length).
async fn bulk_backend() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let body: crate::clients::Boxed = if path == "/upload" {
                            let mut ctx =
                                aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                            let mut n = 0usize;
                            let mut body = req.into_body();
                            while let Some(f) = body.frame().await {
                                let Ok(f) = f else { break };
                                if let Some(d) = f.data_ref() {
                                    ctx.update(d);
                                    n += d.len();
                                }
                            }
                            let out = format!(
                                "{n} {}",
                                data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
                            );
                            crate::clients::full(out)
                        } else if let Some(n) = path
                            .strip_prefix("/download/")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            let frames = futures_stream(n);
                            StreamBody::new(frames).boxed()
                        } else {
                            crate::clients::full("ok".to_owned())
                        };
                        Ok::<_, Infallible>(http::Response::new(body))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

/// `n` chunks as a lazily generated stream of frames.
fn futures_stream(
    n: usize,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + 'static {
    tokio_stream::StreamExt::map(tokio_stream::iter(0..n), |i| Ok(Frame::data(chunk(i))))
}

/// An HTTP/1.1 connection to `addr`.
async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<crate::clients::Boxed> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mib_stream_up_and_down_with_flat_gateway_memory() {
    const CHUNKS: usize = 200;
    let port = bulk_backend().await;
    let (mesh, _) = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("bulk", port)))
        .intention(Intention::allow("gateway", "bulk"))
        .start_agents()
        .await;
    let gw = mesh
        .start_gateway_process(
            GatewaySpec::new().route(
                RouteSpec::new("bulk")
                    .prefix("/")
                    .timeout(Duration::from_secs(120))
                    .extra(json!({"max_body": 300 * MIB}))
                    .to("bulk"),
            ),
        )
        .await;
    // warm up: connections, tunnels and pools exist before the baseline is taken
    let mut s = h1(gw.http).await;
    for _ in 0..5 {
        let req = http::Request::get("/warm")
            .header("host", "api.example")
            .body(crate::clients::full(String::new()))
            .expect("request");
        s.ready().await.expect("connection ready");
        let resp = s.send_request(req).await.expect("warm-up");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    }
    let (baseline, _) = gw.rss_kib();

    let want = sha_of(CHUNKS);
    let upload = tokio::time::timeout(Duration::from_secs(180), async {
        let body = StreamBody::new(futures_stream(CHUNKS)).boxed();
        let req = http::Request::post("/upload")
            .header("host", "api.example")
            .body(body)
            .expect("request");
        s.ready().await.expect("connection ready");
        let resp = s.send_request(req).await.expect("upload answered");
        let status = resp.status();
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&text).into_owned())
    })
    .await
    .expect("upload within 180s");
    assert_eq!(upload.0, 200, "{}", upload.1);
    assert_eq!(
        upload.1,
        format!("{} {want}", CHUNKS * MIB),
        "the backend received the 200 MiB exactly"
    );

    let download = tokio::time::timeout(Duration::from_secs(180), async {
        let req = http::Request::get(format!("/download/{CHUNKS}"))
            .header("host", "api.example")
            .body(crate::clients::full(String::new()))
            .expect("request");
        s.ready().await.expect("connection ready");
        let resp = s.send_request(req).await.expect("download answered");
        assert_eq!(resp.status(), 200);
        assert!(
            !resp.headers().contains_key("content-length"),
            "streamed, not buffered into a length"
        );
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut n = 0usize;
        let mut body = resp.into_body();
        while let Some(f) = body.frame().await {
            if let Some(d) = f.expect("download frame").data_ref() {
                ctx.update(d);
                n += d.len();
            }
        }
        (n, data_encoding::HEXLOWER.encode(ctx.finish().as_ref()))
    })
    .await
    .expect("download within 180s");
    assert_eq!(
        download,
        (CHUNKS * MIB, want),
        "the client received the 200 MiB exactly"
    );

    let (_, peak) = gw.rss_kib();
    let grew_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!(
        "gateway RSS: baseline {baseline} KiB, peak {peak} KiB (+{grew_mib:.1} MiB) for 2 x 200 MiB"
    );
    assert!(
        grew_mib < 64.0,
        "the gateway's peak RSS grew by {grew_mib:.1} MiB moving 2 x 200 MiB (limit 64 MiB)"
    );
}

/// A JWT route in front of the recording backend, with short body and idle timeouts.
async fn guarded_gateway() -> (crate::mesh::Mesh, Backend) {
    let backend = Backend::start("users").await;
    let key = ec("bodies-1");
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(json!({"jwt": [{"name": "main", "issuer": ISS, "audiences": ["api"], "algorithms": ["ES256"], "jwks": {"keys": [key.jwk.clone()]}}]}))
                .limits(Limits {
                    max_body: 512 * MIB as u64,
                    body_idle_timeout: Duration::from_millis(500),
                    idle_timeout: Duration::from_millis(700),
                    header_read_timeout: Duration::from_millis(700),
                    ..Limits::default()
                })
                .route(RouteSpec::new("secure").prefix("/secure").jwt(&["main"]).to("users"))
                .route(RouteSpec::new("open").prefix("/").to("users")),
        )
        .start()
        .await;
    (mesh, backend)
}

/// Reads from `s` until a complete HTTP/1.1 response arrived (at most `limit`): its head and
/// a body framed by `content-length` or chunked encoding (the head and the body may come in
/// separate reads); `None` on timeout or when the connection ends before it is complete.
async fn read_head(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<crate::gw_harness::Got> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                return parse_h1(&buf);
            }
            buf.extend_from_slice(&tmp[..n]);
            // parse_h1 answers only once the body its head announces is all there
            if let Some(got) = parse_h1(&buf) {
                return Some(got);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_before_the_body_is_sent() {
    let (mesh, backend) = guarded_gateway().await;
    let gw = mesh.gw().http();
    const DECLARED: usize = 256 * MIB;
    let tcp = tokio::net::TcpStream::connect(gw).await.expect("connect");
    let (mut r, mut w) = tcp.into_split();
    w.write_all(
        format!(
            "POST /secure/upload HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer not.a.valid-token\r\nContent-Length: {DECLARED}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("head");
    // the uploader keeps sending 64 KiB pieces at a modest pace, counting what it sent
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let uploader = tokio::spawn(async move {
        let piece = vec![b'x'; 64 * 1024];
        while counter.load(std::sync::atomic::Ordering::SeqCst) < DECLARED {
            if w.write_all(&piece).await.is_err() {
                break;
            }
            counter.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = r.read(&mut tmp).await.expect("read");
            assert!(n > 0, "closed without an answer");
            buf.extend_from_slice(&tmp[..n]);
            if let Some(g) = parse_h1(&buf).filter(|g| !g.body.is_empty()) {
                return g;
            }
        }
    })
    .await
    .expect("the 401 arrives while the client is still uploading");
    let at = sent.load(std::sync::atomic::Ordering::SeqCst);
    uploader.abort();
    assert_eq!(got.status, 401, "{}", got.body);
    assert!(
        got.body
            .contains("https://meshgate.dev/problems/unauthorized"),
        "{}",
        got.body
    );
    assert!(
        at < DECLARED / 4,
        "the answer came after {at} of {DECLARED} body bytes: it must not wait for the body"
    );
    assert_eq!(backend.count(), 0, "the service never saw the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408() {
    let (mesh, _backend) = guarded_gateway().await;
    let gw = mesh.gw();
    let mut s = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: api.example\r\nContent-Length: 1000\r\n\r\nfirst ten.",
    )
    .await
    .expect("head and a little body");
    let started = std::time::Instant::now();
    let got = read_head(&mut s, Duration::from_secs(10))
        .await
        .expect("an answer to the stalled body");
    let took = started.elapsed();
    assert_eq!(got.status, 408, "{}", got.body);
    assert!(
        got.body
            .contains("https://meshgate.dev/problems/body-timeout"),
        "{}",
        got.body
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "408 after {took:?} with body_idle_timeout 500ms"
    );
    assert_eq!(
        gw.metric(r#"meshgate_gateway_requests_total{route="open",method="POST",code="408"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_half_prefaces_are_closed_quietly() {
    let (mesh, _backend) = guarded_gateway().await;
    let gw = mesh.gw();
    let active = r#"meshgate_http_connections_active{listener="http"}"#;
    let mut silent = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    let mut half = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    half.write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("half a preface");
    // a connection that sent one request and then nothing (keep-alive idle)
    let mut kept = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    kept.write_all(b"GET /x HTTP/1.1\r\nHost: api.example\r\n\r\n")
        .await
        .expect("request");
    let first = read_head(&mut kept, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(first.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.metric(active).await == 3.0
        })
        .await,
        "three connections open"
    );
    let started = std::time::Instant::now();
    for (s, how) in [
        (&mut silent, "silent"),
        (&mut half, "half preface"),
        (&mut kept, "idle keep-alive"),
    ] {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{how}: still open 10s later (idle_timeout 700ms)"));
        assert!(
            r.is_err() || rest.is_empty(),
            "{how}: closed quietly, without an unrequested answer: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.metric(active).await == 0.0
        })
        .await,
        "the gateway counts them closed"
    );
}
