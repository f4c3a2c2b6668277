//! Under load and under attack: bounded load loops through the gateway (200 connections for
//! 30 s with zero 5xx; 2,000 connections with the gateway's memory bounded), clients that
//! never read their large responses while others keep their latency, a local service that
//! restarts or closes idle keep-alive connections, and HTTP/2 rapid-reset floods against the
//! public front and the mesh inbound port.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use meshgate_agent::config::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    gw_harness::{Backend, Conn},
    harness::eventually,
    mesh::{AgentSpec, GatewaySpec, Intention, Mesh, RouteSpec, ServiceSpec, TestMesh},
};

const KIB: usize = 1 << 10;

/// A backend for load: `/small` answers 2 bytes; `/download/N` streams N chunks of 64 KiB
/// (counting what it produced, so a test can tell that a reader stopped reading).
struct Bulk {
    port: u16,
    produced: Arc<AtomicU64>,
}

impl Bulk {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let produced = Arc::new(AtomicU64::new(0));
        let p = produced.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let p = p.clone();
                            async move {
                                let n = req
                                    .uri()
                                    .path()
                                    .strip_prefix("/download/")
                                    .and_then(|n| n.parse::<usize>().ok());
                                let body = match n {
                                    Some(n) => {
                                        let chunk = Bytes::from(vec![b'z'; 64 * KIB]);
                                        let frames = tokio_stream::StreamExt::map(
                                            tokio_stream::iter(0..n),
                                            move |_| {
                                                p.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                                                Ok::<_, Infallible>(Frame::data(chunk.clone()))
                                            },
                                        );
                                        StreamBody::new(frames).boxed()
                                    }
                                    None => Full::new(Bytes::from_static(b"ok")).boxed(),
                                };
                                Ok::<_, Infallible>(http::Response::new(body))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self { port, produced }
    }

    fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }
}

/// Keep-alive HTTP/1.1 load on `conns` connections to `addr` until `until`; returns
/// (status counts by class 2xx..5xx, transport errors, slowest request).
async fn load(
    addr: SocketAddr,
    conns: usize,
    until: Instant,
    max_requests_per_conn: usize,
) -> ([u64; 6], u64, Duration) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        tasks.spawn(async move {
            let mut classes = [0u64; 6];
            let mut errors = 0u64;
            let mut slowest = Duration::ZERO;
            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                return (classes, 1, slowest);
            };
            let Ok((mut s, conn)) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            else {
                return (classes, 1, slowest);
            };
            tokio::spawn(conn);
            let mut done = 0;
            while Instant::now() < until && done < max_requests_per_conn {
                let req = http::Request::get("/small")
                    .header("host", "api.example")
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let started = Instant::now();
                if s.ready().await.is_err() {
                    errors += 1;
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(20), s.send_request(req)).await {
                    Ok(Ok(resp)) => {
                        let class = usize::from(resp.status().as_u16() / 100).min(5);
                        classes[class] += 1;
                        if resp.into_body().collect().await.is_err() {
                            errors += 1;
                            break;
                        }
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
                slowest = slowest.max(started.elapsed());
                done += 1;
            }
            (classes, errors, slowest)
        });
    }
    let mut classes = [0u64; 6];
    let mut errors = 0;
    let mut slowest = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        let (c, e, s) = r.expect("load task");
        for i in 0..6 {
            classes[i] += c[i];
        }
        errors += e;
        slowest = slowest.max(s);
    }
    (classes, errors, slowest)
}

async fn bulk_mesh(bulk: &Bulk, gateway: bool) -> Mesh {
    let mut m = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("bulk", bulk.port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("bulk")))
        .intention(Intention::allow("gateway", "bulk"))
        .intention(Intention::allow("web", "bulk"));
    if gateway {
        m = m.gateway(GatewaySpec::new().route(RouteSpec::new("bulk").prefix("/").to("bulk")));
    }
    m.start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_connections_for_thirty_seconds_get_no_5xx() {
    let bulk = Bulk::start().await;
    let mesh = bulk_mesh(&bulk, true).await;
    let gw = mesh.gw();
    let until = Instant::now() + Duration::from_secs(30);
    let (classes, errors, slowest) = load(gw.http(), 200, until, usize::MAX).await;
    let total: u64 = classes.iter().sum();
    eprintln!(
        "200 connections x 30s: {classes:?} by class, {errors} transport errors, slowest {slowest:?}"
    );
    assert_eq!(classes[5], 0, "5xx answers under load: {classes:?}");
    assert_eq!(errors, 0, "requests that got no answer: {classes:?}");
    assert_eq!(total, classes[2], "every answer a 2xx: {classes:?}");
    assert!(
        total >= 3000,
        "only {total} requests in 30s on 200 connections"
    );
    assert_eq!(
        gw.metric(r#"meshgate_gateway_requests_total{route="bulk",method="GET",code="200"}"#)
            .await,
        total as f64,
        "the gateway counted what the clients saw"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_connections_keep_the_gateway_memory_bounded() {
    const CONNS: usize = 2000;
    /// Stated bound: 64 KiB of resident memory per open client connection, at most.
    const PER_CONN_KIB: u64 = 64;
    let bulk = Bulk::start().await;
    let (mesh, _) = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("bulk", bulk.port)))
        .intention(Intention::allow("gateway", "bulk"))
        .start_agents()
        .await;
    let gw = mesh
        .start_gateway_process(
            GatewaySpec::new().route(RouteSpec::new("bulk").prefix("/").to("bulk")),
        )
        .await;
    let (warm, _, _) = load(gw.http, 4, Instant::now() + Duration::from_secs(5), 5).await;
    assert_eq!(warm[2], 20, "warm-up");
    let (baseline, _) = gw.rss_kib();
    let (classes, errors, slowest) =
        load(gw.http, CONNS, Instant::now() + Duration::from_secs(60), 5).await;
    let (_, peak) = gw.rss_kib();
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "{CONNS} connections: {classes:?} by class, {errors} errors, slowest {slowest:?}; gateway RSS baseline {baseline} KiB, peak {peak} KiB (+{grew} KiB, {} KiB per connection)",
        grew / CONNS as u64
    );
    assert_eq!(classes[5], 0, "5xx answers: {classes:?}");
    assert_eq!(errors, 0, "requests that got no answer");
    assert_eq!(classes[2], (CONNS * 5) as u64, "every request answered 2xx");
    assert!(
        grew <= PER_CONN_KIB * CONNS as u64,
        "the gateway grew by {grew} KiB for {CONNS} connections (bound {PER_CONN_KIB} KiB each)"
    );
    assert_eq!(
        gw.metric(r#"meshgate_http_connections_total{listener="http"}"#)
            .await,
        (CONNS + 4) as f64
    );
}

/// Requests for `/download/1` on fresh connections to `addr`, one after another: the slowest.
async fn victim_latency(addr: SocketAddr, n: usize, how: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let started = Instant::now();
        let mut c = Conn::open(addr).await;
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            c.get("api.example", "/download/4", &[]),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{how}: request {i} stalled behind a client that does not read")
        });
        assert_eq!(got.status, 200, "{how}: request {i}: {}", got.body);
        assert_eq!(got.body.len(), 4 * 64 * KIB, "{how}: request {i}");
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

/// Opens `n` HTTP/1.1 connections to `addr` that each ask for 64 MiB and never read it.
async fn h1_non_readers(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /download/1024 HTTP/1.1\r\nHost: api.example\r\n\r\n")
            .await
            .expect("request");
        held.push(s);
    }
    held
}

/// An HTTP/2 connection to `addr` with a zero initial window that asks for 64 MiB on `n`
/// streams and never reads: the server may send nothing and must hold it all.
async fn h2_zero_window(addr: SocketAddr, n: usize) -> Vec<h2::client::ResponseFuture> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .initial_connection_window_size(65_535)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut held = Vec::new();
    for _ in 0..n {
        let req = http::Request::get("http://api.example/download/1024")
            .body(())
            .expect("request");
        client = client.ready().await.expect("h2 ready");
        let (resp, _) = client.send_request(req, true).expect("send");
        held.push(resp);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_never_read_do_not_stall_others_through_the_gateway() {
    let bulk = Bulk::start().await;
    let mesh = bulk_mesh(&bulk, true).await;
    let gw = mesh.gw().http();
    let normal = victim_latency(gw, 3, "before").await;
    let before = bulk.produced();
    let _h1 = h1_non_readers(gw, 20).await;
    let mut streams = h2_zero_window(gw, 50).await;
    // the held responses are on their way: their heads arrive, their bodies pile up
    for r in streams.iter_mut().take(5) {
        let resp = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("a head for the zero-window client")
            .expect("response");
        assert_eq!(resp.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            bulk.produced() - before >= 8 << 20
        })
        .await,
        "the backend is pushing the unread responses"
    );
    let slowest = victim_latency(gw, 20, "gateway").await;
    eprintln!("gateway: normal {normal:?}, slowest beside 70 unread 64 MiB responses {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?} while others did not read (alone: {normal:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_never_read_do_not_stall_others_through_an_upstream_listener() {
    let bulk = Bulk::start().await;
    let mesh = bulk_mesh(&bulk, false).await;
    let up = mesh.agent("node-a").upstream("bulk");
    let normal = victim_latency(up, 3, "before").await;
    let before = bulk.produced();
    let _h1 = h1_non_readers(up, 40).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            bulk.produced() - before >= 8 << 20
        })
        .await,
        "the backend is pushing the unread responses"
    );
    let slowest = victim_latency(up, 20, "upstream listener").await;
    eprintln!(
        "upstream listener: normal {normal:?}, slowest beside 40 unread 64 MiB responses {slowest:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?} while others did not read (alone: {normal:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// A local service that restarts, or closes idle keep-alive connections
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 service on a fixed port that can be stopped (every connection closed) and
/// started again on the same port.
struct Restartable {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    generation: Arc<AtomicUsize>,
}

impl Restartable {
    async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let mut me = Self {
            port,
            task: None,
            generation: Arc::new(AtomicUsize::new(0)),
        };
        me.serve(l);
        me
    }

    fn serve(&mut self, l: tokio::net::TcpListener) {
        let gen_no = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = l.accept().await {
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |_req: http::Request<hyper::body::Incoming>| async move {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                format!("generation {gen_no}"),
                            ))))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }

    /// Stops: the listener and every open connection close (aborting the task drops them).
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the same port again");
        self.serve(l);
    }
}

/// A keep-alive HTTP/1.1 service that closes a connection 1 s after its last answer (as
/// Node.js does after 5 s), counting the connections it closed that way.
async fn closes_idle_after_1s() -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let closed = Arc::new(AtomicUsize::new(0));
    let c = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                let mut first = true;
                loop {
                    // the first request may take its time; after an answer, 1 s of silence
                    // closes the connection
                    let wait = if first {
                        Duration::from_secs(60)
                    } else {
                        Duration::from_secs(1)
                    };
                    let head_end = loop {
                        if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break Some(e);
                        }
                        match tokio::time::timeout(wait, s.read(&mut tmp)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                            Ok(_) => break None,
                            Err(_) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                break None;
                            }
                        }
                    };
                    let Some(e) = head_end else { return };
                    buf.drain(..e + 4);
                    if s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nKeep-Alive: timeout=1\r\n\r\nfine")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    first = false;
                }
            });
        }
    });
    (port, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_succeeds_after_the_local_service_restarts() {
    let mut svc = Restartable::start().await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::new(
            "users",
            svc.port,
            Protocol::Http,
        )))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .intention(Intention::allow("gateway", "users"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/").to("users")))
        .start()
        .await;
    let paths = [
        (mesh.gw().http(), "gateway"),
        (mesh.agent("node-a").upstream("users"), "agent pair"),
    ];
    // keep-alive connections from each client, so the agent's pooled connections are reused
    let mut conns = Vec::new();
    for (addr, how) in paths {
        let mut c = Conn::open(addr).await;
        let got = c.get("api.example", "/x", &[]).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "generation 1"),
            "{how}"
        );
        conns.push((c, how));
    }
    for generation in 2..=4 {
        svc.restart().await;
        for (c, how) in &mut conns {
            let got = c.get("api.example", "/x", &[]).await;
            assert_eq!(
                (got.status, got.body.clone()),
                (200, format!("generation {generation}")),
                "{how}: the first request after restart {}",
                generation - 1
            );
        }
    }
    drop(conns);
    assert!(
        mesh.shutdown().await,
        "the gateway and agents drained in time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_closes_idle_connections_after_1s_never_causes_an_error() {
    let (port, closed) = closes_idle_after_1s().await;
    let mesh = TestMesh::new()
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", port))
                // the agent keeps idle connections longer than the service does (3s, the
                // default): the service, not the agent, closes them
                .configure(|c| c.tunnel.local_idle_timeout = Duration::from_secs(3)),
        )
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .intention(Intention::allow("gateway", "users"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/").to("users")))
        .start()
        .await;
    for (addr, how) in [
        (mesh.gw().http(), "gateway"),
        (mesh.agent("node-a").upstream("users"), "agent pair"),
    ] {
        let mut c = Conn::open(addr).await;
        for round in 0..3 {
            let got = c.get("api.example", "/x", &[]).await;
            assert_eq!(
                (got.status, got.body.as_str()),
                (200, "fine"),
                "{how}: round {round}"
            );
            // the service closes the agent's idle pooled connection: wait for it to happen
            let before = closed.load(Ordering::SeqCst);
            assert!(
                eventually(Duration::from_secs(5), || async {
                    closed.load(Ordering::SeqCst) > before
                })
                .await,
                "{how}: the service closed its idle connection"
            );
        }
        let got = c.get("api.example", "/x", &[]).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (200, "fine"),
            "{how}: last"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rapid reset
// ---------------------------------------------------------------------------------------------

/// Opens streams on `client` and resets each at once, as fast as it can, until the server
/// cuts the connection (true) or `limit` passes (false).
async fn flood(
    mut client: h2::client::SendRequest<Bytes>,
    conn: tokio::task::JoinHandle<()>,
    make: impl Fn() -> http::Request<()>,
    limit: Duration,
) -> (bool, u64) {
    let deadline = Instant::now() + limit;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        client = match tokio::time::timeout(Duration::from_secs(5), client.ready()).await {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let Ok((resp, mut body)) = client.send_request(make(), false) else {
            break;
        };
        body.send_reset(h2::Reason::CANCEL);
        drop(resp);
        sent += 1;
        if sent.is_multiple_of(64) {
            tokio::task::yield_now().await;
            if conn.is_finished() {
                break;
            }
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .is_ok();
    (closed, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rapid_reset_flood_on_the_public_front_is_cut_off() {
    let backend = Backend::start("users").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/").to("users")))
        .start()
        .await;
    let gw = mesh.gw();
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = spawn_bystander(gw.http(), stop.clone());
    let tcp = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2c");
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!(
                "flood connection ended: {e} (go_away={}, remote={}, reason={:?})",
                e.is_go_away(),
                e.is_remote(),
                e.reason()
            );
        }
    });
    let (closed, sent) = flood(
        client,
        conn,
        || {
            http::Request::get("http://api.example/slow/2000")
                .body(())
                .expect("request")
        },
        Duration::from_secs(20),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = bystander.await.expect("bystander");
    eprintln!("public front: {sent} streams opened and reset; bystander {ok} ok, {failed} failed");
    assert!(
        closed,
        "the flooding connection was cut off ({sent} resets sent)"
    );
    assert_eq!(
        gw.metric(r#"meshgate_http_reset_floods_total{listener="http"}"#)
            .await,
        1.0
    );
    assert_eq!(failed, 0, "another client was affected");
    assert!(ok > 0, "the bystander made requests during the flood");
}

/// A client on its own connection making requests until `stop` (at least 5): (ok, failed).
fn spawn_bystander(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let mut c = Conn::open(addr).await;
        let (mut ok, mut failed) = (0, 0);
        // until told to stop, and at least 5 requests (some after the flood was cut off)
        while !stop.load(Ordering::SeqCst) || ok + failed < 5 {
            match tokio::time::timeout(
                Duration::from_secs(5),
                c.get("api.example", "/users/1", &[]),
            )
            .await
            {
                Ok(g) if g.status == 200 => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rapid_reset_flood_on_the_mesh_inbound_port_is_cut_off() {
    let backend = Backend::start("users").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .start()
        .await;
    let b = mesh.agent("node-b");
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = spawn_bystander(mesh.agent("node-a").upstream("users"), stop.clone());
    // a valid mesh identity of its own (web on node-c), minted by the mesh's CA
    let (identity, dir) = mesh.ca.join("node-c", &["web"]).await;
    let tls = crate::mesh::mesh_client_config(&identity, &dir, "web").await;
    let tcp = tokio::net::TcpStream::connect(b.inbound())
        .await
        .expect("connect");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("node").expect("name"),
            tcp,
        )
        .await
        .expect("mutual TLS with a valid mesh certificate");
    let (client, conn) = h2::client::handshake(stream).await.expect("h2");
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!(
                "flood connection ended: {e} (go_away={}, remote={}, reason={:?})",
                e.is_go_away(),
                e.is_remote(),
                e.reason()
            );
        }
    });
    let (closed, sent) = flood(
        client,
        conn,
        || {
            http::Request::get("http://users/slow/2000")
                .header("meshgate-service", "users")
                .body(())
                .expect("request")
        },
        Duration::from_secs(20),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = bystander.await.expect("bystander");
    eprintln!("inbound: {sent} streams opened and reset; bystander {ok} ok, {failed} failed");
    assert!(
        closed,
        "the flooding tunnel was cut off ({sent} resets sent)"
    );
    assert_eq!(
        b.metric(r#"meshgate_http_reset_floods_total{listener="inbound"}"#)
            .await,
        1.0
    );
    assert_eq!(failed, 0, "another caller was affected");
    assert!(ok > 0, "the bystander made requests during the flood");
}
