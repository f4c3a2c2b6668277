//! Gateway mode end to end: HTTPS/HTTP clients -> gateway -> mesh tunnel -> agent -> service.

use std::time::{Duration, Instant};

use meshgate_gateway::{config::Limits, routes::BackendConfig};
use serde_json::json;

use crate::{
    gw_harness::{Backend, Conn, TestGateway, plain, tls},
    mesh::{AgentSpec, GatewaySpec, Intention, Mesh, RouteSpec, ServiceSpec, TestMesh},
};

struct Stack {
    mesh: Mesh,
    v1: Backend,
    canary: Backend,
    v2: Backend,
}

impl Stack {
    fn gw(&self) -> &TestGateway {
        self.mesh.gw()
    }
}

fn routes() -> Vec<RouteSpec> {
    vec![
        RouteSpec::new("users-v2-header")
            .hosts(&["api.example"])
            .prefix("/users")
            .header("Accept-Version", "2")
            .to("users-v2"),
        RouteSpec::new("users-v2-subdomain")
            .hosts(&["v2.api.example"])
            .prefix("/users")
            .to("users-v2"),
        RouteSpec::new("users-v2-path")
            .hosts(&["api.example"])
            .prefix("/v2/users")
            .extra(json!({"rewrite": {"prefix": "/users"}}))
            .to("users-v2"),
        RouteSpec::new("users")
            .hosts(&["api.example"])
            .prefix("/users")
            .split(
                &[("users", 90), ("users-canary", 10)],
                Some(("X-Canary", "canary")),
            ),
        RouteSpec::new("upload")
            .exact("/upload")
            .methods(&["POST"])
            .extra(json!({"max_body": 1024, "content_types": ["application/json"]}))
            .to("users"),
        RouteSpec::new("slow")
            .prefix("/slow")
            .timeout(Duration::from_secs(1))
            .to("users"),
        RouteSpec::new("down").prefix("/down").to("nobody"),
        RouteSpec::new("cors")
            .prefix("/cors")
            .extra(json!({"cors": {"allow_origins": ["https://app.example"], "allow_headers": ["Content-Type"]}}))
            .to("users"),
        RouteSpec::new("transform")
            .prefix("/t")
            .extra(json!({"transforms": {"request_headers": {"set": {"X-From-Gateway": "yes"}}, "response_json": {"remove": ["secret"], "rename": {"service": "svc"}}}}))
            .to("users"),
    ]
}

async fn stack() -> Stack {
    let (v1, canary, v2) = (
        Backend::start("users").await,
        Backend::start("users-canary").await,
        Backend::start("users-v2").await,
    );
    let gateway = routes()
        .into_iter()
        .fold(GatewaySpec::new(), GatewaySpec::route);
    let mesh = TestMesh::new()
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", v1.port))
                .service(ServiceSpec::http("users-canary", canary.port))
                .service(ServiceSpec::http("users-v2", v2.port)),
        )
        .intention(Intention::allow("gateway", "*"))
        .endpoint("nobody", "127.0.0.1:9".parse().expect("addr"))
        .gateway(gateway)
        .start()
        .await;
    Stack {
        mesh,
        v1,
        canary,
        v2,
    }
}

fn service_of(g: &crate::gw_harness::Got) -> String {
    g.json()["service"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_h1_and_h2_reach_services_through_the_mesh() {
    let s = stack().await;
    for h2 in [false, true] {
        let got = tls(
            s.gw(),
            h2,
            "GET",
            "api.example",
            "/users/7",
            &[("x-canary", "users")],
            b"",
        )
        .await;
        assert_eq!(got.status, 200, "h2={h2}: {}", got.body);
        assert_eq!(service_of(&got), "users");
        assert_eq!(got.json()["path"], "/users/7");
        assert!(got.headers.contains_key("x-request-id"));
    }
    let got = plain(
        s.gw().http(),
        "GET",
        "api.example",
        "/users/1",
        &[("x-canary", "users")],
        b"",
    )
    .await;
    assert_eq!(got.status, 200);
    // the service saw the mesh, not the client: forwarded headers and a traceparent
    let seen =
        s.v1.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("seen");
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(String::as_str),
        Some("127.0.0.1")
    );
    assert!(
        seen.headers
            .get("traceparent")
            .is_some_and(|t| t.starts_with("00-")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn errors_are_problem_json_with_the_right_status() {
    let s = stack().await;
    let gw = s.gw().http();
    let got = plain(gw, "GET", "other.example", "/nope", &[], b"").await;
    assert_eq!(got.status, 404);
    assert_eq!(got.headers["content-type"], "application/problem+json");
    assert_eq!(got.json()["type"], "https://meshgate.dev/problems/no-route");
    assert!(got.json()["request_id"].is_string());

    // the only endpoint refuses connections: 502, its own problem type (503 is for no
    // endpoints at all)
    let got = plain(gw, "GET", "api.example", "/down/x", &[], b"").await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/upstream-refused"
    );
    assert!(
        !got.body.contains("127.0.0.1:9"),
        "no upstream internals: {}",
        got.body
    );

    let before = s.v1.count();
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(4000));
    let got = plain(
        gw,
        "POST",
        "api.example",
        "/upload",
        &[("content-type", "application/json")],
        big.as_bytes(),
    )
    .await;
    assert_eq!(got.status, 413);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/body-too-large"
    );
    let got = plain(
        gw,
        "POST",
        "api.example",
        "/upload",
        &[("content-type", "text/plain")],
        b"hi",
    )
    .await;
    assert_eq!(got.status, 415);
    assert_eq!(
        s.v1.count(),
        before,
        "the upstream saw nothing of refused requests"
    );
    let got = plain(
        gw,
        "POST",
        "api.example",
        "/upload",
        &[("content-type", "application/json; charset=utf-8")],
        b"{}",
    )
    .await;
    assert_eq!(got.status, 200);

    let big_header = "x".repeat(20_000);
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/users/1",
        &[("x-big", &big_header)],
        b"",
    )
    .await;
    assert_eq!(got.status, 431);

    let started = Instant::now();
    let got = plain(gw, "GET", "api.example", "/slow/3000", &[], b"").await;
    let took = started.elapsed();
    assert_eq!(got.status, 504);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/upstream-timeout"
    );
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(1100),
        "504 after {took:?}, route timeout 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_pins_and_versions() {
    let s = stack().await;
    let mut conn = Conn::open(s.gw().http()).await;
    let mut canary = 0;
    for _ in 0..2000 {
        let got = conn.get("api.example", "/users/1", &[]).await;
        assert_eq!(got.status, 200);
        if service_of(&got) == "users-canary" {
            canary += 1;
        }
    }
    let share = f64::from(canary) / 2000.0 * 100.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "canary share {share:.1}% for a 90/10 split"
    );
    for _ in 0..50 {
        assert_eq!(
            service_of(
                &conn
                    .get("api.example", "/users/1", &[("x-canary", "users-canary")])
                    .await
            ),
            "users-canary"
        );
        assert_eq!(
            service_of(
                &conn
                    .get(
                        "api.example",
                        "/users/1",
                        &[("cookie", "a=b; canary=users-canary")]
                    )
                    .await
            ),
            "users-canary"
        );
    }
    assert_eq!(
        service_of(
            &conn
                .get("api.example", "/users/1", &[("accept-version", "2")])
                .await
        ),
        "users-v2"
    );
    assert_eq!(
        service_of(&conn.get("v2.api.example", "/users/1", &[]).await),
        "users-v2"
    );
    let got = conn.get("api.example", "/v2/users/9", &[]).await;
    assert_eq!(service_of(&got), "users-v2");
    assert_eq!(got.json()["path"], "/users/9", "prefix rewritten");
    assert!(s.v2.count() >= 3 && s.canary.count() >= 100);
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_service() {
    let s = stack().await;
    let got = plain(
        s.gw().http(),
        "GET",
        "api.example",
        "/users/1",
        &[
            ("x-user-id", "admin"),
            ("x-scopes", "root"),
            ("x-consumer-id", "c1"),
            ("x-forwarded-client-cert", "forged"),
            ("x-canary", "users"),
        ],
        b"",
    )
    .await;
    assert_eq!(got.status, 200);
    let seen =
        s.v1.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("seen");
    for h in [
        "x-user-id",
        "x-scopes",
        "x-consumer-id",
        "x-forwarded-client-cert",
    ] {
        assert!(
            !seen.headers.contains_key(h),
            "{h} reached the service: {seen:?}"
        );
    }
}

#[tokio::test]
async fn cors_is_answered_and_enforced_at_the_gateway() {
    let s = stack().await;
    let gw = s.gw().http();
    let before = s.v1.count();
    let pre = plain(
        gw,
        "OPTIONS",
        "api.example",
        "/cors/x",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        b"",
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        pre.headers["access-control-allow-methods"]
            .to_str()
            .expect("str")
            .contains("POST")
    );
    assert_eq!(s.v1.count(), before, "preflight answered by the gateway");
    let denied = plain(
        gw,
        "OPTIONS",
        "api.example",
        "/cors/x",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    )
    .await;
    assert_eq!(denied.status, 403);
    let actual = plain(
        gw,
        "GET",
        "api.example",
        "/cors/x",
        &[("origin", "https://app.example")],
        b"",
    )
    .await;
    assert_eq!(actual.status, 200);
    assert_eq!(
        actual.headers["access-control-allow-origin"], "https://app.example",
        "the upstream's '*' was replaced"
    );
    assert!(
        !actual.headers.contains_key("access-control-allow-methods"),
        "upstream CORS headers removed"
    );
}

#[tokio::test]
async fn transforms_apply_both_ways() {
    let s = stack().await;
    let got = plain(s.gw().http(), "GET", "api.example", "/t/x", &[], b"").await;
    assert_eq!(got.status, 200);
    let v = got.json();
    assert_eq!(v["svc"], "users", "{v}");
    assert!(
        v.get("secret").is_none() && v.get("service").is_none(),
        "{v}"
    );
    let seen =
        s.v1.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("seen");
    assert_eq!(
        seen.headers.get("x-from-gateway").map(String::as_str),
        Some("yes")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_invalid_configs_are_refused() {
    let s = std::sync::Arc::new(stack().await);
    let addr = s.gw().http();
    let mut loaders = tokio::task::JoinSet::new();
    for _ in 0..4 {
        loaders.spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut failed = 0;
            for _ in 0..750 {
                if conn.get("api.example", "/users/1", &[]).await.status != 200 {
                    failed += 1;
                }
            }
            failed
        });
    }
    let gw = s.clone();
    let reloader = tokio::spawn(async move {
        let mut ok = 0;
        for i in 0..20 {
            let weight = if i % 2 == 0 { 50 } else { 90 };
            let r = gw
                .gw()
                .reload_with(|c| {
                    let BackendConfig::Split { split, .. } = &mut c.routes[3].backend else {
                        panic!("route 3 is the users split");
                    };
                    split[0].weight = weight;
                    split[1].weight = 100 - weight;
                })
                .await;
            if r.is_ok() {
                ok += 1;
            }
            let bad = gw
                .gw()
                .reload_with(|c| {
                    c.routes[3].backend = BackendConfig::Service("not-in-discovery".into())
                })
                .await;
            assert!(bad.is_err(), "an invalid config must be refused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    });
    let mut failed = 0;
    while let Some(r) = loaders.join_next().await {
        failed += r.expect("loader");
    }
    assert_eq!(reloader.await.expect("reloader"), 20);
    assert_eq!(failed, 0, "requests failed during reloads");
    let got = plain(addr, "GET", "api.example", "/users/1", &[], b"").await;
    assert_eq!(got.status, 200, "the last valid config serves");
}

#[tokio::test]
async fn a_slow_request_head_gets_408_and_redirects_go_to_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = TestMesh::new()
        .endpoint("users", "127.0.0.1:9".parse().expect("addr"))
        .gateway(
            GatewaySpec::new()
                .limits(Limits {
                    header_read_timeout: Duration::from_millis(300),
                    ..Limits::default()
                })
                .configure(|c| c.redirect_https = true)
                .route(RouteSpec::new("any").to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw();
    let mut s = tokio::net::TcpStream::connect(gw.http())
        .await
        .expect("connect");
    s.write_all(b"GET /users HTTP/1.1\r\nHost: api.exa")
        .await
        .expect("partial head");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("application/problem+json") && text.contains("request-timeout"),
        "{text}"
    );

    let got = plain(gw.http(), "GET", "api.example", "/users/1?x=1", &[], b"").await;
    assert_eq!(got.status, 308);
    assert_eq!(
        got.headers["location"],
        format!("https://api.example:{}/users/1?x=1", gw.https().port())
    );
}

#[tokio::test]
async fn https_certificates_are_chosen_by_sni() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tls_list = Vec::new();
    let mut ders = Vec::new();
    for (i, name) in ["api.example", "*.shop.example"].iter().enumerate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![(*name).to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (
            dir.path().join(format!("{i}.crt")),
            dir.path().join(format!("{i}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("crt");
        std::fs::write(&k, key.serialize_pem()).expect("key");
        tls_list.push(meshgate_agent::http::front::CertFiles {
            cert_file: c,
            key_file: k,
            ocsp_file: None,
        });
        ders.push(cert.der().clone());
    }
    let mesh = TestMesh::new()
        .endpoint("users", "127.0.0.1:9".parse().expect("addr"))
        .gateway(
            GatewaySpec::new()
                .configure(move |c| c.tls = tls_list)
                .route(RouteSpec::new("any").to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw();
    for (sni, want) in [
        ("api.example", 0),
        ("www.shop.example", 1),
        ("unknown.example", 0),
    ] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ders[want].clone()).expect("root");
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(gw.https())
            .await
            .expect("connect");
        let res = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(
                rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("sni"),
                tcp,
            )
            .await;
        if sni == "unknown.example" {
            // the default (first) certificate is presented; it does not cover this name
            assert!(res.is_err(), "{sni}");
        } else {
            let s = res.unwrap_or_else(|e| panic!("{sni}: {e}"));
            assert_eq!(
                s.get_ref().1.peer_certificates().expect("certs")[0],
                ders[want],
                "{sni}"
            );
        }
    }
}
