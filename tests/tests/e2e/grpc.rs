//! gRPC end to end: the four call kinds (unary, server-, client- and bidi-streaming) through the
//! gateway and through an agent pair (`protocol: grpc` services behind the destination agent,
//! the caller on its upstream listener), against a tonic server and against grpcio (Python,
//! generic handlers, bytes on the wire). Trailers arrive, an error status arrives as that
//! status, and `grpc-timeout` gives DEADLINE_EXCEEDED — also from meshgate itself when the
//! server ignores it. A grpcio client calls grpc.health.v1.Health/Check through the gateway.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshgate_proto::test::v1::{
    EchoRequest, EchoResponse,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, metadata::MetadataMap, transport::Channel};

use crate::{
    clients::{PyServer, python_output},
    mesh::{
        AgentSpec, GatewaySpec, Intention, Mesh, RouteSpec, ServiceSpec, TestMesh, venv_python,
    },
};

/// The tonic side of `meshgate.test.v1.Echo`, steered by metadata like the grpcio server.
struct TonicEcho;

type Out = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

/// Applies `x-delay-ms` and `x-fail-code`; returns `x-repeat`.
async fn steer(md: &MetadataMap) -> Result<u32, Status> {
    let num = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
    };
    if let Some(ms) = num("x-delay-ms") {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
    if let Some(code) = num("x-fail-code") {
        return Err(Status::new(Code::from_i32(code as i32), "asked to fail"));
    }
    Ok(num("x-repeat").unwrap_or(3))
}

/// The status that ends a successful stream with trailing metadata `x-echo-trailer`.
fn ok_with_trailer(method: &str) -> Status {
    let mut md = MetadataMap::new();
    md.insert("x-echo-trailer", method.parse().expect("ascii"));
    Status::with_metadata(Code::Ok, "", md)
}

fn reply(message: String, index: u32) -> EchoResponse {
    EchoResponse { message, index }
}

#[tonic::async_trait]
impl Echo for TonicEcho {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        steer(req.metadata()).await?;
        Ok(Response::new(reply(req.into_inner().message, 0)))
    }

    type ServerStreamStream = Out;

    async fn server_stream(&self, req: Request<EchoRequest>) -> Result<Response<Out>, Status> {
        let n = steer(req.metadata()).await?;
        let msg = req.into_inner().message;
        let items: Vec<Result<EchoResponse, Status>> = (1..=n)
            .map(|i| Ok(reply(msg.clone(), i)))
            .chain([Err(ok_with_trailer("ServerStream"))])
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn client_stream(
        &self,
        req: Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        steer(req.metadata()).await?;
        let mut stream = req.into_inner();
        let mut all = Vec::new();
        while let Some(m) = stream.next().await {
            all.push(m?.message);
        }
        Ok(Response::new(reply(all.join(","), 0)))
    }

    type BidiStream = Out;

    async fn bidi(
        &self,
        req: Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<Response<Out>, Status> {
        steer(req.metadata()).await?;
        let stream = req.into_inner();
        let mut i = 0;
        let out = stream
            .map(move |m| {
                i += 1;
                m.map(|m| reply(m.message, i))
            })
            .chain(tokio_stream::once(Err(ok_with_trailer("Bidi"))));
        Ok(Response::new(Box::pin(out)))
    }
}

/// A tonic Echo server on 127.0.0.1:0 (h2c).
async fn tonic_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(TonicEcho))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (port, task)
}

/// An HTTP/2 (h2c) server that accepts every call and never answers: whatever deadline a
/// client sees comes from meshgate.
async fn deaf_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |_req: http::Request<hyper::body::Incoming>| async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (port, task)
}

/// A tonic client over h2c to `addr`, sending `:authority` `authority`.
async fn client(addr: SocketAddr, authority: &str) -> EchoClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .origin(format!("http://{authority}").parse().expect("origin"))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("gRPC channel");
    EchoClient::new(channel)
}

fn req<T>(msg: T, md: &[(&'static str, &str)]) -> Request<T> {
    let mut r = Request::new(msg);
    for (k, v) in md {
        r.metadata_mut().insert(*k, v.parse().expect("ascii"));
    }
    r
}

fn echo(m: &str) -> EchoRequest {
    EchoRequest { message: m.into() }
}

/// The four call kinds, an error status and a deadline, as a tonic client sees them.
async fn exercise(mut c: EchoClient<Channel>, how: &str) {
    // unary
    let r = c
        .unary(req(echo("hello"), &[]))
        .await
        .unwrap_or_else(|e| panic!("{how}: unary: {e}"));
    assert_eq!(r.into_inner().message, "hello", "{how}");

    // server streaming, with the trailing metadata after the last message
    let mut s = c
        .server_stream(req(echo("s"), &[("x-repeat", "5")]))
        .await
        .unwrap_or_else(|e| panic!("{how}: server stream: {e}"))
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap_or_else(|e| panic!("{how}: {e}")) {
        got.push((m.message, m.index));
    }
    assert_eq!(
        got,
        (1..=5).map(|i| ("s".to_owned(), i)).collect::<Vec<_>>(),
        "{how}"
    );
    let trailers = s
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers arrived");
    assert_eq!(
        trailers.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some("ServerStream"),
        "{how}: the server's trailers arrive"
    );

    // client streaming
    let r = c
        .client_stream(req(tokio_stream::iter(["a", "b", "c"].map(echo)), &[]))
        .await
        .unwrap_or_else(|e| panic!("{how}: client stream: {e}"));
    assert_eq!(r.into_inner().message, "a,b,c", "{how}");

    // bidi: each answer arrives before the next request is sent (no buffering of the stream);
    // the first message goes before the call, as servers may hold their head until it comes
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    tx.send(echo("m1")).await.expect("send");
    let mut answers = c
        .bidi(req(tokio_stream::wrappers::ReceiverStream::new(rx), &[]))
        .await
        .unwrap_or_else(|e| panic!("{how}: bidi: {e}"))
        .into_inner();
    for i in 1..=4u32 {
        let m = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .unwrap_or_else(|_| panic!("{how}: bidi answer {i} held back"))
            .expect("message")
            .expect("not the end");
        assert_eq!(
            (m.message.as_str(), m.index),
            (format!("m{i}").as_str(), i),
            "{how}"
        );
        if i < 4 {
            tx.send(echo(&format!("m{}", i + 1))).await.expect("send");
        }
    }
    drop(tx);
    assert!(
        answers.message().await.expect("clean end").is_none(),
        "{how}"
    );
    let trailers = answers
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers arrived");
    assert_eq!(
        trailers.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some("Bidi"),
        "{how}"
    );

    // an error status arrives as that status, with its message
    let e = c
        .unary(req(echo("x"), &[("x-fail-code", "5")]))
        .await
        .expect_err("asked to fail");
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "asked to fail"),
        "{how}"
    );
    // a streaming call may fail at its head or at its first message: either way, that status
    let status = match c
        .server_stream(req(echo("x"), &[("x-fail-code", "7")]))
        .await
    {
        Err(e) => e,
        Ok(r) => r
            .into_inner()
            .message()
            .await
            .expect_err("a failed stream yields its status, not a message"),
    };
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "asked to fail"),
        "{how}"
    );
}

/// `grpc-timeout: 300m` on a call the server answers after 3 s: DEADLINE_EXCEEDED, promptly.
/// Sent raw, since tonic's client also enforces its deadline locally (as `Cancelled`), which
/// would hide what the mesh did.
async fn deadline(addr: SocketAddr, authority: &str, how: &str) {
    let started = std::time::Instant::now();
    let (status, headers, trailers, _) = raw_call(
        addr,
        authority,
        &[("grpc-timeout", "300m"), ("x-delay-ms", "3000")],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{how}");
    let code = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert_eq!(
        code.as_deref(),
        Some("4"),
        "{how}: DEADLINE_EXCEEDED: {headers:?} {trailers:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "{how}: DEADLINE_EXCEEDED after {took:?} for a 300ms deadline"
    );
}

/// One raw gRPC unary call (`EchoRequest{message: "hi"}`) over h2c with extra `headers`: the
/// HTTP status, response head, trailers and body, to check what travels where. At most 10 s.
async fn raw_call(
    addr: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Option<http::HeaderMap>, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c");
    tokio::spawn(conn);
    let frame = Bytes::from_static(b"\x00\x00\x00\x00\x04\x0a\x02hi");
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/meshgate.test.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.body(Full::new(frame)).expect("request");
    tokio::time::timeout(Duration::from_secs(10), async {
        let resp = s.send_request(r).await.expect("response");
        let status = resp.status().as_u16();
        let head = resp.headers().clone();
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (status, head, trailers, collected.to_bytes())
    })
    .await
    .expect("answer within 10s")
}

fn check_raw(raw: (u16, http::HeaderMap, Option<http::HeaderMap>, Bytes), how: &str, py: bool) {
    let (status, headers, trailers, body) = raw;
    assert_eq!(status, 200, "{how}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
        "{how}: {headers:?}"
    );
    assert!(
        !headers.contains_key("grpc-status"),
        "{how}: status in the trailers, not the head"
    );
    let trailers = trailers.unwrap_or_else(|| panic!("{how}: no HTTP/2 trailers"));
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{how}"
    );
    if py {
        assert_eq!(
            trailers.get("x-echo-trailer").map(|v| v.as_bytes()),
            Some(&b"Unary"[..]),
            "{how}"
        );
    }
    assert_eq!(&body[5..], b"\x0a\x02hi", "{how}: the message came back");
}

/// Echo servers of both kinds (and a deaf one) behind node-b; node-a calls them; the gateway
/// routes by host: tonic.example, py.example, deaf.example.
struct Grpc {
    mesh: Mesh,
    _py: Option<PyServer>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn grpc_mesh(py: Option<PyServer>) -> Grpc {
    let (tonic_port, t1) = tonic_server().await;
    let (deaf_port, t2) = deaf_server().await;
    let mut b = AgentSpec::new("node-b")
        .service(ServiceSpec::grpc("echo-tonic", tonic_port))
        .service(ServiceSpec::grpc("deaf", deaf_port));
    let mut web = ServiceSpec::tcp("web", 1).calls("echo-tonic").calls("deaf");
    let mut gw = GatewaySpec::new()
        .route(
            RouteSpec::new("tonic")
                .hosts(&["tonic.example"])
                .to("echo-tonic"),
        )
        .route(RouteSpec::new("deaf").hosts(&["deaf.example"]).to("deaf"));
    if let Some(p) = &py {
        b = b.service(ServiceSpec::grpc("echo-py", p.port));
        web = web.calls("echo-py");
        gw = gw.route(RouteSpec::new("py").hosts(&["py.example"]).to("echo-py"));
    }
    let mesh = TestMesh::new()
        .agent(b)
        .agent(AgentSpec::new("node-a").service(web))
        .intention(Intention::allow("web", "*"))
        .intention(Intention::allow("gateway", "*"))
        .gateway(gw)
        .start()
        .await;
    Grpc {
        mesh,
        _py: py,
        _tasks: vec![t1, t2],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_to_tonic_through_the_gateway_and_an_agent_pair() {
    let g = grpc_mesh(None).await;
    let gw = g.mesh.gw().http();
    let a = g.mesh.agent("node-a");
    exercise(client(gw, "tonic.example").await, "gateway -> tonic").await;
    exercise(
        client(a.upstream("echo-tonic"), "echo-tonic").await,
        "agent pair -> tonic",
    )
    .await;
    deadline(gw, "tonic.example", "gateway -> tonic").await;
    deadline(
        a.upstream("echo-tonic"),
        "echo-tonic",
        "agent pair -> tonic",
    )
    .await;
    check_raw(
        raw_call(gw, "tonic.example", &[]).await,
        "gateway raw -> tonic",
        false,
    );
    check_raw(
        raw_call(a.upstream("echo-tonic"), "echo-tonic", &[]).await,
        "agent pair raw -> tonic",
        false,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_to_grpcio_through_the_gateway_and_an_agent_pair() {
    let Some(python) = venv_python() else {
        return;
    };
    let py = PyServer::start(&python, "grpc_echo_server.py", &[]).await;
    let g = grpc_mesh(Some(py)).await;
    let gw = g.mesh.gw().http();
    let a = g.mesh.agent("node-a");
    exercise(client(gw, "py.example").await, "gateway -> grpcio").await;
    exercise(
        client(a.upstream("echo-py"), "echo-py").await,
        "agent pair -> grpcio",
    )
    .await;
    deadline(gw, "py.example", "gateway -> grpcio").await;
    deadline(a.upstream("echo-py"), "echo-py", "agent pair -> grpcio").await;
    check_raw(
        raw_call(gw, "py.example", &[]).await,
        "gateway raw -> grpcio",
        true,
    );
    check_raw(
        raw_call(a.upstream("echo-py"), "echo-py", &[]).await,
        "agent pair raw -> grpcio",
        true,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_checks_health_through_the_gateway_and_an_agent_pair() {
    let Some(python) = venv_python() else {
        return;
    };
    let py = PyServer::start(&python, "grpc_echo_server.py", &[]).await;
    let g = grpc_mesh(Some(py)).await;
    let gw = g.mesh.gw().http().to_string();
    let pair = g.mesh.agent("node-a").upstream("echo-py").to_string();
    for (target, authority) in [(pair.as_str(), "echo-py"), (gw.as_str(), "py.example")] {
        let lines = python_output(
            &python,
            "grpc_client.py",
            &[target, authority],
            Duration::from_secs(60),
        )
        .await;
        let line = |name: &str| {
            lines
                .iter()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("{target}: no {name} line in {lines:?}"))
                .clone()
        };
        assert_eq!(line("health"), "health OK SERVING", "{target}");
        assert_eq!(line("health-echo"), "health-echo OK SERVING", "{target}");
        assert_eq!(line("fail"), "fail NOT_FOUND asked to fail", "{target}");
        let deadline = line("deadline");
        let parts: Vec<&str> = deadline.split_whitespace().collect();
        assert_eq!(parts[1], "DEADLINE_EXCEEDED", "{target}: {deadline}");
        let ms: u64 = parts[2].parse().expect("ms");
        assert!((250..2500).contains(&ms), "{target}: {deadline}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshgate_itself_ends_calls_past_their_grpc_timeout() {
    let g = grpc_mesh(None).await;
    let gw = g.mesh.gw();
    for (addr, authority, how) in [
        (gw.http(), "deaf.example", "gateway"),
        (
            g.mesh.agent("node-a").upstream("deaf"),
            "deaf",
            "agent pair",
        ),
    ] {
        let started = std::time::Instant::now();
        let (status, headers, trailers, _) =
            raw_call(addr, authority, &[("grpc-timeout", "400m")]).await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{how}: gRPC callers get HTTP 200");
        assert!(
            trailers.is_none(),
            "{how}: a trailers-only answer: {trailers:?}"
        );
        assert_eq!(
            headers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"4"[..]),
            "{how}: DEADLINE_EXCEEDED: {headers:?}"
        );
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_millis(2000),
            "{how}: DEADLINE_EXCEEDED after {took:?} for a 400ms deadline"
        );
    }
    assert_eq!(
        gw.metric(r#"meshgate_gateway_requests_total{route="deaf",method="POST",code="200"}"#)
            .await,
        1.0,
        "the gateway answered the gRPC call itself (HTTP 200, trailers-only status)"
    );
}
