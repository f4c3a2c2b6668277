//! The gateway's edge behaviour as a browser or client sees it: CORS and RateLimit headers on
//! the gateway's own 401 and 429, HTTP/2 `:authority` reaching the service as Host and
//! X-Forwarded-Host, hop-by-hop tricks against the injected identity, WebSocket through the
//! gateway and through an agent pair, and routes to upstreams outside the mesh (plain and TLS).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    auth::{ISS, claims, ec, token},
    clients::{H2, parse_h1, raw_h1},
    gw_harness::{Backend, plain},
    mesh::{AgentSpec, GatewaySpec, Intention, RouteSpec, ServiceSpec, TestMesh},
};

const ORIGIN: &str = "https://app.example";

fn header<'a>(g: &'a crate::gw_harness::Got, name: &str) -> Option<&'a str> {
    g.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_401_429_and_502_carry_cors_and_ratelimit_headers() {
    let backend = Backend::start("users").await;
    let key = ec("edge-1");
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(json!({
                    "jwt": [{"name": "main", "issuer": ISS, "audiences": ["api"], "algorithms": ["ES256"], "jwks": {"keys": [key.jwk.clone()]}}],
                    "rate_limits": [
                        {"name": "per-ip", "key": "client_ip", "limit": {"requests": 2, "per": "1m"}},
                        {"name": "down-ip", "key": "client_ip", "limit": {"requests": 5, "per": "1m"}},
                    ],
                }))
                .route(
                    RouteSpec::new("api")
                        .prefix("/api")
                        .jwt(&["main"])
                        .rate_limit("per-ip")
                        .cors(&[ORIGIN])
                        .to("users"),
                )
                .route(
                    RouteSpec::new("down")
                        .prefix("/down")
                        .rate_limit("down-ip")
                        .cors(&[ORIGIN])
                        .to("nobody"),
                ),
        )
        .endpoint("nobody", "127.0.0.1:9".parse().expect("addr"))
        .start()
        .await;
    let gw = mesh.gw().http();
    let origin = [("origin", ORIGIN)];
    // the gateway's own 502 after the rate limit ran: both header sets
    let got = plain(gw, "GET", "api.example", "/down/x", &origin, b"").await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert_eq!(
        header(&got, "access-control-allow-origin"),
        Some(ORIGIN),
        "{:?}",
        got.headers
    );
    assert!(
        header(&got, "ratelimit").is_some_and(|v| v.contains("down-ip") && v.contains("r=4")),
        "{:?}",
        got.headers
    );
    // no token: the gateway's own 401, readable by the browser; the per-IP limit runs before
    // authentication (unauthenticated attempts count), so its headers are there too
    let got = plain(gw, "GET", "api.example", "/api/x", &origin, b"").await;
    assert_eq!(got.status, 401, "{}", got.body);
    assert_eq!(
        header(&got, "access-control-allow-origin"),
        Some(ORIGIN),
        "{:?}",
        got.headers
    );
    assert!(header(&got, "x-request-id").is_some(), "{:?}", got.headers);
    assert!(
        header(&got, "ratelimit").is_some_and(|v| v.contains("per-ip") && v.contains("r=1")),
        "{:?}",
        got.headers
    );
    assert!(
        header(&got, "ratelimit-policy").is_some_and(|v| v.contains("q=2")),
        "{:?}",
        got.headers
    );

    let bearer = format!("Bearer {}", token(&key, claims("alice", 300)));
    let auth = [("origin", ORIGIN), ("authorization", bearer.as_str())];
    for i in 0..1 {
        let got = plain(gw, "GET", "api.example", "/api/x", &auth, b"").await;
        assert_eq!(got.status, 200, "request {i}: {}", got.body);
        assert_eq!(header(&got, "access-control-allow-origin"), Some(ORIGIN));
        assert!(
            header(&got, "ratelimit").is_some_and(|v| v.contains("per-ip")),
            "request {i}: {:?}",
            got.headers
        );
    }
    // over the limit: 429 with CORS, RateLimit and Retry-After
    let got = plain(gw, "GET", "api.example", "/api/x", &auth, b"").await;
    assert_eq!(got.status, 429, "{}", got.body);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/rate-limited"
    );
    assert_eq!(
        header(&got, "access-control-allow-origin"),
        Some(ORIGIN),
        "{:?}",
        got.headers
    );
    let ratelimit = header(&got, "ratelimit").unwrap_or_default();
    assert!(
        ratelimit.contains("per-ip") && ratelimit.contains("r=0"),
        "{:?}",
        got.headers
    );
    assert!(
        header(&got, "ratelimit-policy").is_some_and(|v| v.contains("q=2")),
        "{:?}",
        got.headers
    );
    let retry: u64 = header(&got, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        backend.count(),
        1,
        "only the one allowed, authenticated request reached the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_reaches_the_service_as_host_and_forwarded_host() {
    let backend = Backend::start("users").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new().route(RouteSpec::new("users").hosts(&["api.example"]).to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw();
    let mut h2 = H2::tls(gw.https(), &gw.cert, "api.example").await;
    let mut h2c = H2::h2c(gw.http()).await;
    for (conn, how) in [(&mut h2, "h2"), (&mut h2c, "h2c")] {
        let got = conn.send("GET", "api.example", "/users/1", &[], b"").await;
        assert_eq!(got.status, 200, "{how}: {}", got.body);
        let seen = backend
            .seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("seen");
        assert_eq!(
            seen.headers.get("host").map(String::as_str),
            Some("api.example"),
            "{how}: {seen:?}"
        );
        assert_eq!(
            seen.headers.get("x-forwarded-host").map(String::as_str),
            Some("api.example"),
            "{how}: {seen:?}"
        );
    }
    // an :authority no route serves is not rescued by another header
    let got = h2c.send("GET", "other.example", "/users/1", &[], b"").await;
    assert_eq!(got.status, 404, "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_names_never_remove_the_injected_identity() {
    let backend = Backend::start("users").await;
    let key = ec("edge-2");
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(json!({"jwt": [{"name": "main", "issuer": ISS, "audiences": ["api"], "algorithms": ["ES256"], "jwks": {"keys": [key.jwk.clone()]}}]}))
                .route(RouteSpec::new("api").prefix("/").jwt(&["main"]).to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw().http();
    let bearer = format!("Bearer {}", token(&key, claims("alice", 300)));
    let got = raw_h1(
        gw,
        "GET",
        "/me",
        &[
            ("Authorization", &bearer),
            ("Connection", "x-user-id, X-Scopes, x-forwarded-for"),
            ("X_User_Id", "mallory"),
            ("x-USER-id", "mallory"),
        ],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let seen = backend
        .seen
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("seen");
    assert_eq!(
        seen.headers.get("x-user-id").map(String::as_str),
        Some("alice"),
        "the verified subject survives a Connection header naming it: {seen:?}"
    );
    assert_eq!(
        seen.headers.get("x-scopes").map(String::as_str),
        Some("read write"),
        "{seen:?}"
    );
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(String::as_str),
        Some("127.0.0.1"),
        "{seen:?}"
    );
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.replace('_', "-") == "x-user-id" && k != "x-user-id"),
        "no other spelling of the identity header reached the service: {seen:?}"
    );
    assert!(
        !seen.headers.values().any(|v| v.contains("mallory")),
        "the spoofed identity never reached the service: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// WebSocket (RFC 6455), by hand: a handshake and one frame each way
// ---------------------------------------------------------------------------------------------

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn ws_accept(key: &str) -> String {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(d.as_ref())
}

/// Reads one WebSocket frame: (opcode, unmasked payload). Payloads under 64 KiB only.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await?;
    let masked = h[1] & 0x80 != 0;
    let mut len = usize::from(h[1] & 0x7f);
    if len == 126 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l).await?;
        len = usize::from(u16::from_be_bytes(l));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((h[0] & 0x0f, payload))
}

/// One frame with FIN set; masked (as clients must) when `mask` is given.
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if payload.len() < 126 {
        f.push(m | payload.len() as u8);
    } else {
        f.push(m | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A WebSocket echo server (HTTP/1.1 upgrade, then each text frame echoed back with the
/// `Host` it was reached by in front).
async fn ws_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        let key = req
                            .headers()
                            .get("sec-websocket-key")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let upgrade = req
                            .headers()
                            .get("upgrade")
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                        let (Some(key), true) = (key, upgrade) else {
                            let mut r =
                                http::Response::new(Full::new(Bytes::from("not a websocket")));
                            *r.status_mut() = http::StatusCode::BAD_REQUEST;
                            return Ok::<_, Infallible>(r);
                        };
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(up) = on.await else { return };
                            let mut io = hyper_util::rt::TokioIo::new(up);
                            while let Ok((op, payload)) = read_frame(&mut io).await {
                                match op {
                                    1 => {
                                        let mut back = b"echo: ".to_vec();
                                        back.extend_from_slice(&payload);
                                        if io.write_all(&frame(1, &back, None)).await.is_err() {
                                            return;
                                        }
                                    }
                                    8 => {
                                        let _ = io.write_all(&frame(8, &payload, None)).await;
                                        return;
                                    }
                                    _ => {}
                                }
                            }
                        });
                        let r = http::Response::builder()
                            .status(101)
                            .header("upgrade", "websocket")
                            .header("connection", "upgrade")
                            .header("sec-websocket-accept", ws_accept(&key))
                            .body(Full::new(Bytes::new()))
                            .expect("101");
                        Ok(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

/// Handshake at `addr`, then three text frames and a close, each answered.
async fn ws_roundtrip(addr: SocketAddr, how: &str) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    s.write_all(
        format!(
            "GET /ws/chat HTTP/1.1\r\nHost: api.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.expect("read head");
            head.push(b[0]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{how}: no 101 in 10s"));
    let got = parse_h1(&head).expect("head");
    assert_eq!(
        got.status,
        101,
        "{how}: {:?}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(
        header(&got, "sec-websocket-accept"),
        Some(ws_accept(key).as_str()),
        "{how}: the service's accept key reached the client"
    );
    for i in 0..3 {
        let msg = format!("message {i} of {how}");
        s.write_all(&frame(1, msg.as_bytes(), Some([1, 2, 3, 4 + i as u8])))
            .await
            .expect("send frame");
        let (op, payload) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
            .await
            .unwrap_or_else(|_| panic!("{how}: no echo in 10s"))
            .expect("frame");
        assert_eq!(
            (op, String::from_utf8_lossy(&payload).into_owned()),
            (1, format!("echo: {msg}")),
            "{how}"
        );
    }
    s.write_all(&frame(8, &[0x03, 0xe8], Some([9, 9, 9, 9])))
        .await
        .expect("close");
    let (op, _) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
        .await
        .unwrap_or_else(|_| panic!("{how}: close not answered"))
        .expect("close frame");
    assert_eq!(op, 8, "{how}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway_and_an_agent_pair() {
    let port = ws_echo().await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("chat", port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("chat")))
        .intention(Intention::allow("gateway", "chat"))
        .intention(Intention::allow("web", "chat"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("ws").prefix("/ws").to("chat")))
        .start()
        .await;
    ws_roundtrip(mesh.gw().http(), "gateway").await;
    ws_roundtrip(mesh.agent("node-a").upstream("chat"), "agent pair").await;
}

// ---------------------------------------------------------------------------------------------
// Upstreams outside the mesh
// ---------------------------------------------------------------------------------------------

/// A throwaway CA and an HTTPS server for `backend.test` signed by it; answers
/// `tls PATH host=HOST`. Returns the port and the CA's PEM file.
async fn tls_backend(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "throwaway test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["backend.test".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let ca_file = dir.join("backend-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("ca file");
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                            "tls {} host={host}",
                            req.uri().path()
                        )))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    (port, ca_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_upstreams_outside_the_mesh_over_http_and_tls() {
    let plain_backend = Backend::start("legacy").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls_port, ca_file) = tls_backend(dir.path()).await;
    let tls_url = format!("https://backend.test:{tls_port}");
    let tls_addr: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let external = |url: &str, ca: Option<&std::path::Path>| {
        let mut e = json!({"url": url, "addresses": [tls_addr]});
        if let Some(ca) = ca {
            e["ca_file"] = json!(ca);
        }
        json!({"backend": {"external": e}})
    };
    let mesh = TestMesh::new()
        .gateway(
            GatewaySpec::new()
                .route(
                    RouteSpec::new("legacy")
                        .prefix("/legacy")
                        .external(&format!("http://127.0.0.1:{}", plain_backend.port), None),
                )
                .route(
                    RouteSpec::new("partner")
                        .prefix("/partner")
                        .extra(external(&tls_url, Some(&ca_file))),
                )
                .route(
                    RouteSpec::new("untrusted")
                        .prefix("/untrusted")
                        .extra(external(&tls_url, None)),
                ),
        )
        .start()
        .await;
    let gw = mesh.gw().http();
    let got = plain(gw, "GET", "api.example", "/legacy/x", &[], b"").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.json()["service"], "legacy");
    assert_eq!(got.json()["path"], "/legacy/x");
    let seen = plain_backend
        .seen
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("seen");
    assert_eq!(
        seen.headers.get("host").map(String::as_str),
        Some(format!("127.0.0.1:{}", plain_backend.port).as_str()),
        "the URL's host, not the client's: {seen:?}"
    );
    assert!(
        seen.headers.contains_key("x-request-id"),
        "edge hygiene applies too: {seen:?}"
    );

    let got = plain(gw, "GET", "api.example", "/partner/y", &[], b"").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(
        got.body,
        format!("tls /partner/y host=backend.test:{tls_port}")
    );
    // the server's certificate is verified: without its CA the route fails, closed
    let got = plain(gw, "GET", "api.example", "/untrusted/z", &[], b"").await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert!(!got.body.contains("tls /untrusted"), "{}", got.body);
}
