//! Path tricks against a backend that would be fooled (Python's `http.server`, which decodes
//! `%XX` and resolves `..` and `//` before opening a file): through the gateway (a JWT route on
//! `/admin` beside a public catch-all to the same service) over HTTP/1.1, h2c and TLS h2, and
//! through an agent pair with a node-mode `deny DELETE /admin/*` intention. Every spelling gets
//! 400 or the protected answer (401 / 403), never the protected content.

use serde_json::json;

use crate::{
    auth::{ISS, claims, ec, token},
    clients::{H2, PyServer, raw_h1, try_raw_h1},
    gw_harness::Got,
    mesh::{AgentSpec, GatewaySpec, Intention, RouteSpec, ServiceSpec, TestMesh, system_python},
};

/// The bytes only a successful bypass can show.
const SECRET: &str = "PROTECTED-7f3a91";

/// What meshgate must answer for a spelling.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// It is `/admin/x` (or `/admin`) once normalized: the protected route's own refusal.
    Protected,
    /// A spelling refused by default (`%2F`, `%5C`, `\`, `;`, `%00`): 400 invalid-path.
    Invalid,
    /// A different resource on a case-sensitive backend (routes are case-sensitive, as is the
    /// backend's file system): the public route, which finds no such file.
    Other,
}

/// The catalogue: every spelling of `/admin/x` the tests try, and what meshgate must answer.
const TRICKS: &[(&str, Want)] = &[
    ("/admin/x", Want::Protected),
    ("/admin", Want::Protected),
    ("/public/../admin/x", Want::Protected),
    ("/public/%2e%2e/admin/x", Want::Protected),
    ("/public/%2E%2E/admin/x", Want::Protected),
    ("/public/.%2e/admin/x", Want::Protected),
    ("/public/./../admin/x", Want::Protected),
    ("/%2e/admin/x", Want::Protected),
    ("/./admin/x", Want::Protected),
    ("/admin/./x", Want::Protected),
    ("/admin/../admin/x", Want::Protected),
    ("/public/../../admin/x", Want::Protected),
    ("/%61dmin/x", Want::Protected),
    ("/%61%64%6d%69%6e/x", Want::Protected),
    ("/a%64min/%78", Want::Protected),
    ("//admin/x", Want::Protected),
    ("///admin//x", Want::Protected),
    ("/public//../admin/x", Want::Protected),
    ("/admin%2fx", Want::Invalid),
    ("/admin%2Fx", Want::Invalid),
    ("/public%2f..%2fadmin%2fx", Want::Invalid),
    ("/public/..%2fadmin/x", Want::Invalid),
    ("/admin%5cx", Want::Invalid),
    ("/public/..%5cadmin/x", Want::Invalid),
    ("/public\\..\\admin\\x", Want::Invalid),
    ("/admin;/x", Want::Invalid),
    ("/public/..;/admin/x", Want::Invalid),
    ("/admin/x;jsessionid=1", Want::Invalid),
    ("/admin/x%00", Want::Invalid),
    ("/admin%00/x", Want::Invalid),
    ("/Admin/x", Want::Other),
    ("/ADMIN/x", Want::Other),
    ("/%2561dmin/x", Want::Other),
];

/// A directory with `admin/x` (the secret) and `public/x`, served by Python's http.server.
async fn fooled_backend() -> Option<(PyServer, tempfile::TempDir)> {
    let python = system_python()?;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("admin")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("public")).expect("mkdir");
    std::fs::write(dir.path().join("admin/x"), SECRET).expect("write");
    std::fs::write(dir.path().join("admin/index.html"), SECRET).expect("write");
    std::fs::write(dir.path().join("public/x"), "public file").expect("write");
    let dir_arg = dir.path().to_str().expect("utf-8 path").to_owned();
    let server = PyServer::start(&python, "fooled_http.py", &[&dir_arg]).await;
    Some((server, dir))
}

/// The spellings the backend alone resolves to the secret: proof that a bypass would show.
async fn fooling(backend: std::net::SocketAddr, method: &str) -> Vec<&'static str> {
    let mut fooled = Vec::new();
    for (path, _) in TRICKS {
        // Python drops the connection for a few spellings (a NUL in a file name)
        let Some(got) = try_raw_h1(backend, method, path).await else {
            continue;
        };
        let leaked = if method == "DELETE" {
            got.status == 200 && got.body.contains("admin")
        } else {
            got.status == 200 && got.body.contains(SECRET)
        };
        if leaked {
            fooled.push(*path);
        }
    }
    fooled
}

fn check(got: &Got, path: &str, want: Want, protected_status: u16, how: &str) {
    assert!(
        !got.body.contains(SECRET) && !got.body.contains("deleted admin"),
        "{how} {path}: the protected content leaked ({}): {}",
        got.status,
        got.body
    );
    match want {
        Want::Protected => assert_eq!(
            got.status, protected_status,
            "{how} {path}: want the protected route's {protected_status}: {}",
            got.body
        ),
        Want::Invalid => {
            assert_eq!(got.status, 400, "{how} {path}: {}", got.body);
            assert!(
                got.body
                    .contains("https://meshgate.dev/problems/invalid-path"),
                "{how} {path}: {}",
                got.body
            );
        }
        Want::Other => assert_eq!(got.status, 404, "{how} {path}: {}", got.body),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_bypass_a_jwt_route_over_http1_h2c_and_h2() {
    let Some((backend, _dir)) = fooled_backend().await else {
        return;
    };
    let fooled = fooling(backend.addr(), "GET").await;
    for must in [
        "/public/../admin/x",
        "/%61dmin/x",
        "//admin/x",
        "/admin%2fx",
        "/public/%2e%2e/admin/x",
    ] {
        assert!(
            fooled.contains(&must),
            "the backend alone should serve the secret for {must} (it serves it for {fooled:?})"
        );
    }
    let key = ec("paths-1");
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("site", backend.port)))
        .intention(Intention::allow("gateway", "site"))
        .gateway(
            GatewaySpec::new()
                .auth(json!({"jwt": [{"name": "main", "issuer": ISS, "audiences": ["api"], "algorithms": ["ES256"], "jwks": {"keys": [key.jwk.clone()]}}]}))
                .route(RouteSpec::new("admin").prefix("/admin").jwt(&["main"]).to("site"))
                .route(RouteSpec::new("public").prefix("/").to("site")),
        )
        .start()
        .await;
    let gw = mesh.gw();
    // the routes work: public content for anyone, the secret with a token
    let got = raw_h1(gw.http(), "GET", "/public/x", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "public file"));
    let bearer = format!("Bearer {}", token(&key, claims("alice", 300)));
    let got = raw_h1(gw.http(), "GET", "/admin/x", &[("authorization", &bearer)]).await;
    assert_eq!((got.status, got.body.as_str()), (200, SECRET));

    let mut h2c = H2::h2c(gw.http()).await;
    let mut h2 = H2::tls(gw.https(), &gw.cert, "api.example").await;
    let mut h2_skipped = Vec::new();
    for (path, want) in TRICKS {
        let got = raw_h1(gw.http(), "GET", path, &[]).await;
        check(&got, path, *want, 401, "HTTP/1.1");
        if *want == Want::Protected {
            // RFC 6750 §3.1: no credentials, so a challenge without an error code
            let challenge = got
                .headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer") && !challenge.contains("error="),
                "{path}: a missing token gets a bare Bearer challenge: {challenge:?}"
            );
        }
        if !H2::can_send(path) {
            h2_skipped.push(*path);
            continue;
        }
        for (conn, how) in [(&mut h2c, "h2c"), (&mut h2, "h2 over TLS")] {
            let got = conn.send("GET", "api.example", path, &[], b"").await;
            check(&got, path, *want, 401, how);
        }
    }
    assert!(
        h2_skipped.is_empty(),
        "every spelling went over HTTP/2 too; the client library refused {h2_skipped:?}"
    );
    // every invalid spelling was refused before routing (route "-"), and counted, three ways
    let invalid = TRICKS.iter().filter(|(_, w)| *w == Want::Invalid).count();
    let counted = gw
        .metric(r#"meshgate_gateway_requests_total{route="-",method="GET",code="400"}"#)
        .await;
    assert_eq!(
        counted,
        (3 * invalid) as f64,
        "400s before routing for {invalid} invalid spellings over HTTP/1.1, h2c and h2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_dodge_a_node_mode_deny_rule() {
    let Some((backend, _dir)) = fooled_backend().await else {
        return;
    };
    let fooled = fooling(backend.addr(), "DELETE").await;
    for must in [
        "/public/../admin/x",
        "/%61dmin/x",
        "//admin/x",
        "/admin%2fx",
    ] {
        assert!(
            fooled.contains(&must),
            "the backend alone should DELETE admin/x for {must} (it does for {fooled:?})"
        );
    }
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("site", backend.port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("site")))
        .intention(Intention::allow("web", "site"))
        .intention(
            Intention::deny("web", "site")
                .methods(&["DELETE"])
                .paths(&["/admin/*"]),
        )
        .start()
        .await;
    let addr = mesh.agent("node-a").upstream("site");
    let b = mesh.agent("node-b");
    // what the rule allows still works: DELETE elsewhere, GET on /admin
    let got = raw_h1(addr, "DELETE", "/public/x", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "deleted public/x\n"));
    let got = raw_h1(addr, "GET", "/admin/x", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, SECRET));

    // (a `protocol: http` service's nested connection is HTTP/1.1; HTTP/2 in node mode is
    // `protocol: grpc`, whose path handling is the same node pipeline)
    let mut denied = 0;
    for (path, want) in TRICKS {
        let got = raw_h1(addr, "DELETE", path, &[]).await;
        check(&got, path, *want, 403, "HTTP/1.1");
        if *want == Want::Protected {
            denied += 1;
            assert!(
                got.body
                    .contains("https://meshgate.dev/problems/denied-by-intention"),
                "{path}: {}",
                got.body
            );
        }
    }
    assert_eq!(
        b.metric(r#"meshgate_authz_denials_total{reason="l7_policy"}"#)
            .await,
        f64::from(denied),
        "every denial counted at the destination"
    );
}
