//! Agent mode end to end: a CA, agents and services on loopback, real mTLS tunnels.

use std::{sync::Arc, time::Duration};

use meshgate_agent::config::{Protocol, TunnelConfig};
use meshgate_ca::{
    signer::make_csr,
    spiffe::SpiffeId,
    store,
    tls::CertSlot,
    verify::{ExpectedPeer, SpiffeServerVerifier, tls13_client_config},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    harness::{EchoService, TestAgent, TestCa, eventually, http_request},
    mesh::{AgentSpec, Intention, Mesh, ServiceSpec, TestMesh},
};

const TD: &str = "mesh.example";

/// node-a runs `web` (which calls `users`), node-b runs `users` on `users_port`.
struct Pair(Mesh);

impl Pair {
    async fn start(users_port: u16, protocol: Protocol, intentions: Vec<Intention>) -> Self {
        let mesh = intentions.into_iter().fold(
            TestMesh::new()
                .agent(
                    AgentSpec::new("node-b")
                        .service(ServiceSpec::new("users", users_port, protocol)),
                )
                .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users"))),
            TestMesh::intention,
        );
        Self(mesh.start().await)
    }

    /// The caller's agent.
    fn a(&self) -> &TestAgent {
        self.0.agent("node-a")
    }

    /// The destination's agent.
    fn b(&self) -> &TestAgent {
        self.0.agent("node-b")
    }
}

fn allow_web() -> Vec<Intention> {
    vec![Intention::allow("web", "users")]
}

/// A service that hashes everything it receives and, at EOF, answers with the hash.
async fn hashing_service() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            ctx.update(&buf[..n]);
                            total += n as u64;
                        }
                    }
                }
                let reply = format!(
                    "{total} {}",
                    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_arrive_intact_through_the_tunnel() {
    let p = Pair::start(hashing_service().await, Protocol::Tcp, allow_web()).await;
    let (a, b) = (p.a(), p.b());
    let mut client = TcpStream::connect(a.upstream("users"))
        .await
        .expect("connect");
    let mut data = vec![0u8; 100 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = format!("{} {}", data.len(), meshgate_ca::pki::sha256_hex(&data));
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(&data).await.expect("send");
        // half-close client -> service: the service sees EOF and answers on the open half
        w.shutdown().await.expect("shutdown");
    };
    let mut reply = String::new();
    let recv = async { r.read_to_string(&mut reply).await.expect("reply") };
    tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(send, recv) })
        .await
        .expect("transfer finished in time");
    assert_eq!(reply, want, "the service received exactly what was sent");
    let sent = b
        .metric(r#"meshgate_tunnel_bytes_total{direction="inbound",flow="sent"}"#)
        .await;
    assert!(sent >= (100 << 20) as f64, "{sent}");
}

#[tokio::test]
async fn half_close_works_from_the_service_side_too() {
    // the service greets, closes its write half at once, then reads until EOF and reports
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(b"hello").await.expect("greet");
        s.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .expect("read after half-close");
        let _ = tx.send(got);
    });
    let p = Pair::start(port, Protocol::Tcp, allow_web()).await;
    let (a, _b) = (p.a(), p.b());
    let mut client = TcpStream::connect(a.upstream("users"))
        .await
        .expect("connect");
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut greeting))
        .await
        .expect("EOF reaches the client")
        .expect("read");
    assert_eq!(greeting, b"hello");
    client
        .write_all(b"still open")
        .await
        .expect("the other half stays open");
    client.shutdown().await.expect("shutdown");
    let got = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("service got EOF")
        .expect("report");
    assert_eq!(got, b"still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_ride_a_handful_of_tunnels() {
    let echo = EchoService::start().await;
    let p = Pair::start(echo.port, Protocol::Tcp, allow_web()).await;
    let (a, b) = (p.a(), p.b());
    let addr = a.upstream("users");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let msg = format!("client {i}");
            s.write_all(msg.as_bytes()).await.expect("write");
            s.shutdown().await.expect("shutdown");
            let mut back = String::new();
            s.read_to_string(&mut back).await.expect("read");
            assert_eq!(back, msg);
        });
    }
    let done = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            r.expect("client task");
        }
    })
    .await;
    assert!(done.is_ok(), "all 1000 connections completed");
    assert_eq!(echo.accepted(), 1000);
    let streams = a
        .metric(r#"meshgate_tunnel_streams_total{direction="outbound"}"#)
        .await;
    let tunnels = a
        .metric(r#"meshgate_tunnel_connections_total{direction="outbound"}"#)
        .await;
    assert_eq!(streams, 1000.0);
    // the pool opens another tunnel once one carries tunnel.max_streams_per_connection (100)
    // streams, so 1000 streams at once need at most 10; one per connection would be 1000
    let most = (1000.0 / f64::from(TunnelConfig::default().max_streams_per_connection)).ceil();
    assert!(
        (1.0..=most).contains(&tunnels),
        "{tunnels} TLS connections for 1000 streams (at most {most})"
    );
    let inbound = b
        .metric(r#"meshgate_tunnel_connections_total{direction="inbound"}"#)
        .await;
    assert!((1.0..=most).contains(&inbound), "{inbound}");
}

#[tokio::test]
async fn denied_intention_never_reaches_the_service() {
    let echo = EchoService::start().await;
    let authz = vec![Intention::allow("billing", "users")];
    let p = Pair::start(echo.port, Protocol::Tcp, authz).await;
    let (a, b) = (p.a(), p.b());
    let mut client = TcpStream::connect(a.upstream("users"))
        .await
        .expect("connect");
    let _ = client.write_all(b"hello").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut buf))
        .await
        .expect("the client connection is closed");
    assert!(read.is_err() || buf.is_empty(), "nothing came back");
    assert_eq!(echo.accepted(), 0, "the service never saw a connection");
    let denied = b
        .metric(r#"meshgate_authz_denials_total{reason="policy"}"#)
        .await;
    assert_eq!(denied, 1.0);
}

/// An HTTP service that answers "METHOD PATH" and records what it served.
async fn http_service() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let line = format!("{} {}", req.method(), req.uri().path());
                        log.lock().expect("lock").push(line.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                bytes::Bytes::from(line),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn l7_deny_rule_blocks_only_the_matching_request() {
    let (port, seen) = http_service().await;
    let authz = vec![
        Intention::allow("web", "users"),
        Intention::deny("web", "users")
            .methods(&["DELETE"])
            .paths(&["/admin/*"]),
    ];
    let p = Pair::start(port, Protocol::Http, authz).await;
    let (a, b) = (p.a(), p.b());
    let addr = a.upstream("users");
    let cases = [
        ("GET", "/users/1", 200),
        ("DELETE", "/admin/x", 403),
        ("GET", "/admin/x", 200),
        ("DELETE", "/users/1", 200),
        // other spellings of /admin/x are normalized before the rule is checked
        ("DELETE", "/users/../admin/x", 403),
        ("DELETE", "/%61dmin/x", 403),
        ("DELETE", "//admin/x", 403),
        ("DELETE", "/admin", 403),
        ("DELETE", "/admin%2fx", 400),
    ];
    for (method, path, want) in cases {
        let (status, body) = http_request(addr, method, path).await;
        assert_eq!(status, want, "{method} {path}: {body}");
        if want == 200 {
            assert_eq!(body, format!("{method} {path}"));
        }
    }
    assert_eq!(
        *seen.lock().expect("lock"),
        vec!["GET /users/1", "GET /admin/x", "DELETE /users/1"],
        "denied requests never reached the service"
    );
    assert_eq!(
        b.metric(r#"meshgate_authz_denials_total{reason="l7_policy"}"#)
            .await,
        5.0
    );
}

/// Opens a raw tunnel stream to `addr` with `tls` and asks for `service`: the CONNECT status,
/// or the error that stopped it.
async fn raw_connect(
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
    service: &str,
) -> Result<u16, String> {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("node").expect("name"),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("{service}:15008"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

fn client_with(
    ca_bundle: meshgate_ca::verify::SharedBundle,
    slot: Option<Arc<CertSlot>>,
) -> rustls::ClientConfig {
    let b = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            ca_bundle,
            ExpectedPeer::AnyNode,
        )));
    match slot {
        Some(s) => b.with_client_cert_resolver(s),
        None => b.with_no_client_auth(),
    }
}

#[tokio::test]
async fn inbound_port_refuses_what_it_must() {
    let echo = EchoService::start().await;
    let p = Pair::start(echo.port, Protocol::Tcp, allow_web()).await;
    let (a, b, ca) = (p.a(), p.b(), &p.0.ca);
    let inbound = b.inbound();
    let bundle = a.agent.identity().bundle();

    // plain TCP: no TLS, no answer
    let mut plain = TcpStream::connect(inbound).await.expect("connect");
    plain
        .write_all(b"CONNECT users:15008 HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "plain TCP got no tunnel"
    );

    // TLS without a client certificate
    let err = raw_connect(inbound, client_with(bundle.clone(), None), "users").await;
    assert!(err.is_err(), "no client cert: {err:?}");

    // a certificate from a foreign CA
    let foreign = TestCa::start(TD).await;
    let (evil, _d) = foreign.join("node-a", &["web"]).await;
    let evil_web = evil.workload("default", "web").await.expect("foreign web");
    let dir = _d.path().join("data/svids/default");
    let slot = CertSlot::new();
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("web.key")).expect("key"))
        .expect("key");
    slot.set(evil_web.chain(), key.serialize_der())
        .expect("slot");
    let err = raw_connect(inbound, client_with(bundle.clone(), Some(slot)), "users").await;
    assert!(err.is_err(), "foreign CA: {err:?}");

    // an expired certificate from the right CA
    let material = store::load(&ca.data_dir()).expect("ca");
    let root_fp = material.root_fingerprint();
    let signer = meshgate_ca::signer::Signer::new(
        material.intermediate,
        material.intermediate_key,
        &root_fp,
    )
    .expect("signer");
    let id = SpiffeId::workload(TD, "default", "web").expect("id");
    let (key, _) = make_csr(&id).expect("key");
    let past = std::time::SystemTime::now() - Duration::from_secs(3 * 3600);
    let chain = signer
        .sign(&id, &key, Duration::from_secs(3600), past)
        .expect("sign");
    let slot = CertSlot::new();
    slot.set(chain, key.serialize_der()).expect("slot");
    let err = raw_connect(inbound, client_with(bundle.clone(), Some(slot)), "users").await;
    assert!(err.is_err(), "expired cert: {err:?}");

    assert!(
        b.metric(r#"meshgate_tunnel_handshake_failures_total{direction="inbound"}"#)
            .await
            >= 3.0
    );

    // a valid identity asking for a service that is not on that node
    let (good, _d2) = ca.join("node-c", &["web"]).await;
    let web = good.workload("default", "web").await.expect("web");
    let slot = CertSlot::new();
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(_d2.path().join("data/svids/default/web.key")).expect("key"),
    )
    .expect("key");
    slot.set(web.chain(), key.serialize_der()).expect("slot");
    let status = raw_connect(
        inbound,
        client_with(bundle.clone(), Some(slot.clone())),
        "billing",
    )
    .await;
    assert_eq!(status, Ok(404));
    assert_eq!(
        b.metric(r#"meshgate_authz_denials_total{reason="unknown_service"}"#)
            .await,
        1.0
    );
    // and the same identity may reach users
    assert_eq!(
        raw_connect(inbound, client_with(bundle, Some(slot)), "users").await,
        Ok(200)
    );
    assert_eq!(
        echo.accepted(),
        1,
        "only the allowed stream reached the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_fail_over_when_an_endpoint_dies() {
    let echo_b = EchoService::start().await;
    let echo_c = EchoService::start().await;
    let mut mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::tcp("users", echo_b.port)))
        .agent(AgentSpec::new("node-c").service(ServiceSpec::tcp("users", echo_c.port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .start()
        .await;
    let (b, c) = (mesh.take_agent("node-b"), mesh.take_agent("node-c"));
    let a = mesh.agent("node-a");
    let addr = a.upstream("users");
    let roundtrip = |i: usize| async move {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let msg = format!("m{i}");
        s.write_all(msg.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut back = String::new();
        s.read_to_string(&mut back)
            .await
            .map_err(|e| e.to_string())?;
        if back == msg {
            Ok(())
        } else {
            Err(format!("got {back:?}"))
        }
    };
    for i in 0..20 {
        roundtrip(i).await.expect("both endpoints up");
    }
    assert_eq!(echo_b.accepted() + echo_c.accepted(), 20);
    // kill the endpoint the balancer prefers right now, so the next pick hits a dead node
    let b_before = echo_b.accepted();
    roundtrip(20).await.expect("probe");
    let (dead, alive, alive_echo, dead_addr) = if echo_b.accepted() > b_before {
        (b, c, &echo_c, "b")
    } else {
        (c, b, &echo_b, "c")
    };
    let dead_inbound = dead.inbound().to_string();
    assert!(dead.agent.shutdown().await, "node-{dead_addr} drained");
    let before = alive_echo.accepted();
    let failures = r#"meshgate_upstream_connect_failures_total{service="users"}"#;
    // At least 30 connections, and on until the balancer has tried the dead node at least once:
    // the probe above makes that the very next pick, unless the two costs flipped in between
    // (under load they can), and then the idle dead node's decaying estimate makes it the pick
    // within a few seconds. Bounded in count and time.
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < 30
        || (a.metric(failures).await < 1.0
            && sent < 2_000
            && started.elapsed() < Duration::from_secs(30))
    {
        roundtrip(sent)
            .await
            .expect("no client-visible error after a node died");
        sent += 1;
    }
    assert_eq!(
        alive_echo.accepted() - before,
        sent,
        "everything went to the live node"
    );
    let (_, endpoints) = a.admin("/endpoints").await;
    let v: serde_json::Value = serde_json::from_str(&endpoints).expect("json");
    let eps = v[0]["endpoints"].as_array().expect("endpoints");
    let dead_ep = eps
        .iter()
        .find(|e| e["addr"] == dead_inbound.as_str())
        .expect("dead endpoint listed");
    assert!(
        dead_ep["consecutive_failures"].as_u64() > Some(0)
            || dead_ep["times_ejected"].as_u64() > Some(0),
        "the dead endpoint's failures are recorded: {endpoints}"
    );
    assert!(
        a.metric(failures).await >= 1.0,
        "the dead node was never tried in {sent} connections"
    );
    drop(alive);
}

#[tokio::test]
async fn admin_api_reports_health_readiness_and_state() {
    let echo = EchoService::start().await;
    let p = Pair::start(echo.port, Protocol::Tcp, allow_web()).await;
    let (a, _b) = (p.a(), p.b());
    assert_eq!(a.admin("/healthz").await.0, 200);
    assert_eq!(a.admin("/readyz").await.0, 200);
    let (_, certs) = a.admin("/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).expect("json");
    let ids: Vec<&str> = certs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["spiffe_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://mesh.example/node/node-a",
            "spiffe://mesh.example/ns/default/svc/web"
        ]
    );
    let (_, config) = a.admin("/config").await;
    assert!(config.contains("\"node\": \"node-a\""), "{config}");
    assert!(!config.contains("mgjt_"), "the join token is never shown");
    let (_, metrics) = a.admin("/metrics").await;
    assert!(metrics.contains("meshgate_identity_cert_expiry_seconds{spiffe_id=\"spiffe://mesh.example/ns/default/svc/web\"}"), "{metrics}");
    assert!(metrics.contains("meshgate_agent_ready 1"), "{metrics}");
    assert_eq!(a.admin("/nope").await.0, 404);
    let ready = eventually(Duration::from_secs(1), || async { true }).await;
    assert!(ready);
}

#[tokio::test]
async fn drain_lets_open_streams_finish_and_refuses_new_ones() {
    let echo = EchoService::start().await;
    let mut p = Pair::start(echo.port, Protocol::Tcp, allow_web()).await;
    let a = p.0.take_agent("node-a");
    let addr = a.upstream("users");
    let admin = a.agent.admin_addr();
    let mut open = TcpStream::connect(addr).await.expect("connect");
    open.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.expect("echo");
    let drained = tokio::spawn(async move { a.agent.shutdown().await });
    // while draining: not ready, no new connections, the open stream still works
    let not_ready = eventually(Duration::from_secs(5), || async move {
        crate::harness::http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    assert!(not_ready, "readyz turns 503 while draining");
    let refused = eventually(Duration::from_secs(5), || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(refused, "the upstream listener stops accepting");
    open.write_all(b"during")
        .await
        .expect("the open stream keeps working");
    open.read_exact(&mut buf).await.expect("echo during drain");
    assert_eq!(&buf, b"during");
    open.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("eof");
    let clean = tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("drain finished")
        .expect("task");
    assert!(clean, "drain completed before its timeout");
}
