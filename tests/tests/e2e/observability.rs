//! Observability end to end (issue 11): the JSON access log of the gateway and of a node agent
//! (fields present, the two hops agreeing on the trace id, no credential in any log line),
//! metric counts that move by exactly what was sent, and every live metric documented in
//! docs/metrics.md.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    gw_harness::{Backend, plain},
    harness::{captured_logs, eventually},
    mesh::{AgentSpec, GatewaySpec, Intention, RouteSpec, ServiceSpec, TestMesh},
};

const HS_SECRET: &[u8] = b"observability-test-secret-of-32-bytes!!";
const API_KEY: &str = "mgk_obs_4f1d2c3b5a697887";
const QUERY_SECRET: &str = "q-s3cr3t-in-the-query";
const HEADER_SECRET: &str = "h-s3cr3t-in-a-header";

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn hs_token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("obs-1".into());
    jsonwebtoken::encode(
        &h,
        &json!({"iss": "https://issuer.test", "aud": "api", "sub": sub, "exp": now + 300, "iat": now}),
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET),
    )
    .expect("sign")
}

fn auth_section() -> Value {
    json!({
        "jwt": [{
            "name": "hs", "issuer": "https://issuer.test", "audiences": ["api"], "algorithms": ["HS256"],
            "jwks": {"keys": [{"kty": "oct", "kid": "obs-1", "alg": "HS256", "k": b64url(HS_SECRET)}]},
        }],
        "api_keys": {"consumers": [{"name": "acme", "keys": [meshgate_gateway::apikey::hash_key(API_KEY)]}]},
    })
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Gateway -> node-b (`users`, `protocol: http`, access log on) -> backend. Four requests: a
/// JWT one, an API-key one, an open one carrying a secret in its query and a header, and one
/// refused for a missing token. Every gateway line parses and carries the documented fields;
/// the node agent's line for the same request has the same trace id and the gateway as peer;
/// neither the token, the key, nor the secrets appear in any access line or diagnostic log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_the_fields_and_no_secret() {
    crate::harness::init();
    let users = Backend::start("users").await;
    let node_log = tempfile::tempdir().expect("tempdir");
    let node_log_path = node_log.path().join("node-access.log");
    let p = node_log_path.clone();
    let mesh = TestMesh::new()
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", users.port))
                .configure(move |c| {
                    c.telemetry.access_log.enabled = Some(true);
                    c.telemetry.access_log.path = Some(p);
                }),
        )
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(auth_section())
                .route(
                    RouteSpec::new("jwt")
                        .prefix("/jwt")
                        .to("users")
                        .extra(json!({"auth": {"jwt": ["hs"]}})),
                )
                .route(
                    RouteSpec::new("key")
                        .prefix("/key")
                        .to("users")
                        .extra(json!({"auth": {"api_key": true}})),
                )
                .route(RouteSpec::new("open").prefix("/open").to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw().http();
    let token = hs_token("alice");
    let bearer = format!("Bearer {token}");
    let r = plain(
        gw,
        "GET",
        "api.example",
        "/jwt/a",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = plain(
        gw,
        "POST",
        "api.example",
        "/key/b",
        &[("x-api-key", API_KEY)],
        b"hello",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = plain(
        gw,
        "GET",
        "api.example",
        &format!("/open/c?token={QUERY_SECRET}"),
        &[("x-secret", HEADER_SECRET), ("cookie", "session=abc")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = plain(gw, "GET", "api.example", "/jwt/d", &[], b"").await;
    assert_eq!(r.status, 401, "{r:?}");

    assert!(
        eventually(Duration::from_secs(5), || async {
            mesh.gw().access_log().lines().count() >= 4
                && std::fs::read_to_string(&node_log_path)
                    .map(|t| t.lines().count() >= 3)
                    .unwrap_or(false)
        })
        .await,
        "access lines did not arrive: gateway:\n{}",
        mesh.gw().access_log()
    );
    let gw_text = mesh.gw().access_log();
    let node_text = std::fs::read_to_string(&node_log_path).expect("node log");
    let gw_lines = lines(&gw_text);
    let node_lines = lines(&node_text);
    assert_eq!(gw_lines.len(), 4, "{gw_text}");
    assert_eq!(
        node_lines.len(),
        3,
        "the 401 never left the gateway: {node_text}"
    );
    for l in &gw_lines {
        for field in [
            "ts",
            "request_id",
            "trace_id",
            "span_id",
            "route",
            "method",
            "authority",
            "path",
            "status",
            "duration_ms",
            "upstream",
            "upstream_status",
            "bytes_in",
            "bytes_out",
            "client_ip",
            "reason",
            "consumer",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
        assert_eq!(l["kind"], "http");
        assert_eq!(l["authority"], "api.example");
        assert_eq!(l["trace_id"].as_str().map(str::len), Some(32), "{l}");
        assert_eq!(l["span_id"].as_str().map(str::len), Some(16), "{l}");
        assert!(l["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
    }
    let by_route = |route: &str| {
        gw_lines
            .iter()
            .find(|l| l["route"] == route && l["status"] != 401)
            .unwrap_or_else(|| panic!("no line for {route}: {gw_text}"))
            .clone()
    };
    let jwt = by_route("jwt");
    assert_eq!(jwt["consumer"], "alice");
    assert_eq!(jwt["upstream"], "users");
    assert_eq!(jwt["upstream_status"], 200);
    assert_eq!(jwt["path"], "/jwt/a");
    let key = by_route("key");
    assert_eq!(key["consumer"], "acme");
    assert_eq!(key["method"], "POST");
    assert_eq!(key["bytes_in"], 5, "{key}");
    assert!(key["bytes_out"].as_u64().is_some_and(|n| n > 0), "{key}");
    let open = by_route("open");
    assert_eq!(open["path"], "/open/c", "no query by default: {open}");
    let refused = gw_lines
        .iter()
        .find(|l| l["status"] == 401)
        .expect("the 401 line");
    assert_eq!(refused["reason"], "unauthorized");
    assert!(refused["upstream_status"].is_null(), "{refused}");

    // the node agent's lines: same trace as the gateway's, the gateway as the verified peer
    for l in &node_lines {
        assert_eq!(l["route"], "users", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        let peer = l["peer_identity"].as_str().unwrap_or_default();
        assert!(peer.ends_with("/gateway"), "{l}");
        assert!(
            gw_lines.iter().any(|g| g["trace_id"] == l["trace_id"]),
            "node trace id {} not among the gateway's",
            l["trace_id"]
        );
    }
    // the backend received the traceparent whose trace id both lines carry
    let seen = users.seen.lock().expect("lock").clone();
    for s in &seen {
        let tp = s.headers.get("traceparent").expect("traceparent forwarded");
        assert!(
            gw_lines
                .iter()
                .any(|g| tp.contains(g["trace_id"].as_str().unwrap_or("-"))),
            "{tp}"
        );
    }

    let everything = format!("{gw_text}\n{node_text}\n{}", captured_logs());
    for secret in [
        token.as_str(),
        API_KEY,
        QUERY_SECRET,
        HEADER_SECRET,
        "session=abc",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret} appeared in a log line"
        );
    }
    assert!(mesh.shutdown().await);
}

/// `GET /metrics` with an optional `Accept`: (content type, body).
async fn scrape(admin: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get("/metrics").header("host", admin.to_string());
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = sender
        .send_request(
            req.body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("response");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (ct, String::from_utf8_lossy(&body).into_owned())
}

/// The metric names a Prometheus-text exposition declares (`# TYPE name kind`).
fn declared(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// A mesh with one L7 service behind the gateway: gateway -> node-b (`users`), the intentions
/// `#0 allow gateway -> users` and `#1 deny gateway -> users DELETE /admin/*`.
async fn users_mesh(users: &Backend) -> crate::mesh::Mesh {
    TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", users.port)))
        .intention(Intention::allow("gateway", "users"))
        .intention(
            Intention::deny("gateway", "users")
                .methods(&["DELETE"])
                .paths(&["/admin/*"]),
        )
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/").to("users")))
        .start()
        .await
}

/// Every metric a live agent and a live gateway register is listed in docs/metrics.md, and
/// `/metrics` speaks Prometheus text by default and OpenMetrics when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_metric_is_documented() {
    let users = Backend::start("users").await;
    let mesh = users_mesh(&users).await;
    // some traffic, so that lazily created series exist too
    let r = plain(mesh.gw().http(), "GET", "api.example", "/x", &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .expect("docs/metrics.md");
    let mut missing = Vec::new();
    for admin in [
        mesh.gw().app.admin_addr(),
        mesh.agent("node-b").agent.admin_addr(),
    ] {
        let (ct, text) = scrape(admin, None).await;
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(!text.contains("# EOF"), "Prometheus text has no EOF marker");
        let names = declared(&text);
        assert!(names.len() >= 10, "only {} metrics: {text}", names.len());
        for n in names {
            if !doc.contains(&format!("`{n}`")) {
                missing.push(n);
            }
        }
        let (ct, om) = scrape(admin, Some("application/openmetrics-text; version=1.0.0")).await;
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        assert!(
            om.trim_end().ends_with("# EOF"),
            "OpenMetrics ends with # EOF"
        );
        assert!(
            om.contains("# TYPE meshgate_gateway_requests counter")
                || om.contains("# TYPE meshgate_inbound_requests counter")
        );
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/metrics.md: {missing:?}"
    );
    assert!(mesh.shutdown().await);
}

/// Counts move by exactly what was sent: 7 GETs and 3 denied DELETEs through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_requests_sent() {
    let users = Backend::start("users").await;
    let mesh = users_mesh(&users).await;
    let gw = mesh.gw();
    for i in 0..7 {
        let r = plain(
            gw.http(),
            "GET",
            "api.example",
            &format!("/users/{i}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    for _ in 0..3 {
        let r = plain(gw.http(), "DELETE", "api.example", "/admin/x", &[], b"").await;
        assert_eq!(r.status, 403, "{r:?}");
    }
    let node = mesh.agent("node-b");
    let want_gw = [
        (
            r#"meshgate_gateway_requests_total{route="users",method="GET",code="200"}"#,
            7.0,
        ),
        (
            r#"meshgate_gateway_requests_total{route="users",method="DELETE",code="403"}"#,
            3.0,
        ),
        (
            r#"meshgate_gateway_request_duration_seconds_count{route="users"}"#,
            10.0,
        ),
        (
            r#"meshgate_upstream_requests_total{service="users",result="ok"}"#,
            7.0,
        ),
        (
            r#"meshgate_upstream_requests_total{service="users",result="denied-by-intention"}"#,
            3.0,
        ),
        (
            r#"meshgate_upstream_request_duration_seconds_count{service="users"}"#,
            10.0,
        ),
        (
            r#"meshgate_gateway_requests_local_total{route="users",reason="denied-by-intention"}"#,
            3.0,
        ),
    ];
    for (series, want) in want_gw {
        assert_eq!(gw.metric(series).await, want, "gateway {series}");
    }
    let want_node = [
        (
            r#"meshgate_inbound_requests_total{route="users",method="GET",code="200"}"#,
            7.0,
        ),
        (
            r#"meshgate_inbound_request_duration_seconds_count{route="users"}"#,
            10.0,
        ),
        (
            r##"meshgate_authz_rule_denials_total{service="users",rule="#1"}"##,
            3.0,
        ),
        (r#"meshgate_authz_denials_total{reason="l7_policy"}"#, 3.0),
        (
            r#"meshgate_upstream_requests_total{service="users",result="ok"}"#,
            7.0,
        ),
    ];
    for (series, want) in want_node {
        assert_eq!(node.metric(series).await, want, "node-b {series}");
    }
    // the histogram's buckets are cumulative and end at the count
    assert_eq!(
        gw.metric(r#"meshgate_gateway_request_duration_seconds_bucket{le="+Inf",route="users"}"#)
            .await,
        10.0
    );
    assert!(
        node.metric(r#"meshgate_tunnel_connections_total{direction="inbound"}"#)
            .await
            >= 1.0
    );
    assert!(
        gw.metric("meshgate_tunnel_connect_duration_seconds_count")
            .await
            >= 1.0,
        "the gateway dialed node-b at least once"
    );
    assert!(
        gw.metric(r#"meshgate_tls_handshake_duration_seconds_count{direction="outbound"}"#)
            .await
            >= 1.0
    );
    assert!(mesh.shutdown().await);
}

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::{Span, span::SpanKind},
};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<Got> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(Got {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    out
}

fn attr(s: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

/// The in-test collector: a tonic `TraceService` that keeps every span and the metadata of
/// the last export.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Got>>>,
    auth: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(v) = req.metadata().get("authorization") {
            *self.auth.lock().expect("lock") = v.to_str().ok().map(str::to_owned);
        }
        self.spans
            .lock()
            .expect("lock")
            .extend(flatten(req.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().expect("lock").clone()
    }
}

const COLLECTOR_TOKEN: &str = "Bearer collector-t0ken-secret";

/// One trace across gateway -> node-b -> service, exported over OTLP/gRPC by both processes.
///
/// The gateway embeds the agent's outbound half (its tunnel pool), so the path has three legs:
/// the gateway's edge, its outbound tunnel leg, node-b's inbound leg. Expected spans, all with
/// one trace id:
///
/// 1. gateway `GET key` (server, the root: the client sent no traceparent);
/// 2. gateway `auth` (internal, child of 1: the API-key filter did work);
/// 3. gateway `upstream users` (client, child of 1: the outbound tunnel leg);
/// 4. node-b `GET users` (server, child of 3, continued from the forwarded traceparent: the
///    inbound leg);
/// 5. node-b `upstream users` (client, child of 4: the call to the local service).
///
/// The service receives `traceparent` `00-<trace id>-<span 5>-01`. Collector headers reach the
/// collector and never appear in a log line or in `/config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_gateway_tunnel_and_agent() {
    crate::harness::init();
    let collector = Collector::default();
    let at = format!("http://{}", collector.start().await);
    let users = Backend::start("users").await;
    let (at_gw, at_node) = (at.clone(), at.clone());
    let mesh = TestMesh::new()
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", users.port))
                .configure(move |c| c.telemetry.tracing.endpoint = Some(at_node)),
        )
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(auth_section())
                .route(
                    RouteSpec::new("key")
                        .prefix("/")
                        .to("users")
                        .extra(json!({"auth": {"api_key": true}})),
                )
                .configure(move |c| {
                    c.telemetry.tracing.endpoint = Some(at_gw);
                    c.telemetry
                        .tracing
                        .headers
                        .insert("authorization".into(), COLLECTOR_TOKEN.into());
                }),
        )
        .start()
        .await;
    let r = plain(
        mesh.gw().http(),
        "GET",
        "api.example",
        "/users/1",
        &[("x-api-key", API_KEY)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (_, config) = crate::harness::http_get(mesh.gw().app.admin_addr(), "/config").await;
    assert!(!config.contains("collector-t0ken"), "{config}");
    let tp = users
        .seen
        .lock()
        .expect("lock")
        .last()
        .and_then(|s| s.headers.get("traceparent").cloned())
        .expect("the service got a traceparent");
    assert!(mesh.shutdown().await);
    // both processes flushed on shutdown; the export may still be on the wire
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = collector.spans();
            s.iter().any(|g| g.service == "meshgate-gateway")
                && s.iter().filter(|g| g.service == "meshgate-agent").count() >= 2
        })
        .await,
        "spans did not arrive: {:?}",
        collector.spans()
    );
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    let trace_id = parts[1];
    let spans: Vec<Got> = collector
        .spans()
        .into_iter()
        .filter(|g| hex(&g.span.trace_id) == trace_id)
        .collect();
    let find = |service: &str, name: &str, kind: SpanKind| {
        spans
            .iter()
            .find(|g| g.service == service && g.span.name == name && g.span.kind == kind as i32)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind:?} span {name:?} from {service} in trace {trace_id}: {:?}",
                    spans
                        .iter()
                        .map(|g| (&g.service, &g.span.name, g.span.kind))
                        .collect::<Vec<_>>()
                )
            })
            .span
            .clone()
    };
    let root = find("meshgate-gateway", "GET key", SpanKind::Server);
    let auth = find("meshgate-gateway", "auth", SpanKind::Internal);
    let gw_up = find("meshgate-gateway", "upstream users", SpanKind::Client);
    let node = find("meshgate-agent", "GET users", SpanKind::Server);
    let node_up = find("meshgate-agent", "upstream users", SpanKind::Client);
    assert!(
        root.parent_span_id.is_empty(),
        "the gateway span is the root"
    );
    assert_eq!(auth.parent_span_id, root.span_id);
    assert_eq!(gw_up.parent_span_id, root.span_id);
    assert_eq!(
        node.parent_span_id, gw_up.span_id,
        "the inbound leg continues the gateway's call"
    );
    assert_eq!(node_up.parent_span_id, node.span_id);
    assert_eq!(
        parts[2],
        hex(&node_up.span_id),
        "the service's parent is the last hop's call"
    );
    assert_eq!(parts[3], "01", "sampled");
    assert_eq!(attr(&root, "http.route").as_deref(), Some("key"));
    assert_eq!(
        attr(&root, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(&node, "meshgate.peer.identity").map(|p| p.ends_with("/gateway")),
        Some(true)
    );
    assert_eq!(spans.len(), 5, "exactly the five spans: {spans:?}");
    assert_eq!(
        collector.auth.lock().expect("lock").as_deref(),
        Some(COLLECTOR_TOKEN),
        "the configured collector header was sent"
    );
    assert!(
        !captured_logs().contains("collector-t0ken"),
        "the collector token was logged"
    );
}

/// Sampling is decided once, at the first hop: with the gateway sampling no new trace, a
/// request creates no span at the gateway or at node-b (whose parent-based sampler follows the
/// forwarded `traceparent`, flag cleared), and the service sees the flag cleared; a request that
/// arrives with a sampled `traceparent` is traced end to end all the same (parent-based).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_request_creates_no_span_on_any_hop() {
    crate::harness::init();
    let collector = Collector::default();
    let at = format!("http://{}", collector.start().await);
    let users = Backend::start("users").await;
    let (at_gw, at_node) = (at.clone(), at.clone());
    let mesh = TestMesh::new()
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", users.port))
                .configure(move |c| c.telemetry.tracing.endpoint = Some(at_node)),
        )
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .route(RouteSpec::new("all").prefix("/").to("users"))
                .configure(move |c| {
                    c.telemetry.tracing.endpoint = Some(at_gw);
                    c.telemetry.tracing.sampling_ratio = Some(0.0);
                }),
        )
        .start()
        .await;
    for _ in 0..3 {
        let r = plain(mesh.gw().http(), "GET", "api.example", "/users/1", &[], b"").await;
        assert_eq!(r.status, 200, "{r:?}");
        let tp = users
            .seen
            .lock()
            .expect("lock")
            .last()
            .and_then(|s| s.headers.get("traceparent").cloned())
            .expect("the service got a traceparent");
        assert!(
            tp.ends_with("-00"),
            "an unsampled trace says so downstream: {tp}"
        );
    }
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = plain(
        mesh.gw().http(),
        "GET",
        "api.example",
        "/users/2",
        &[("traceparent", sampled)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(mesh.shutdown().await);
    // both processes flushed on shutdown
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = collector.spans();
            s.iter().any(|g| g.service == "meshgate-gateway")
                && s.iter().any(|g| g.service == "meshgate-agent")
        })
        .await,
        "the sampled request's spans did not arrive: {:?}",
        collector.spans()
    );
    let spans = collector.spans();
    let traces: std::collections::BTreeSet<String> =
        spans.iter().map(|g| hex(&g.span.trace_id)).collect();
    assert_eq!(
        traces.into_iter().collect::<Vec<_>>(),
        ["4bf92f3577b34da6a3ce929d0e0e4736"],
        "only the trace that came in sampled has spans: {spans:?}"
    );
}

/// A collector that refuses its first `refuse` exports with `PERMISSION_DENIED` (as one does a
/// wrong token; `UNAVAILABLE` would be retried by the exporter before it counts), then accepts.
#[derive(Clone)]
struct Flaky {
    refuse: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepted: Collector,
}

#[tonic::async_trait]
impl TraceService for Flaky {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        use std::sync::atomic::Ordering;
        let refuse = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Err(tonic::Status::permission_denied("not this token"));
        }
        self.accepted.export(req).await
    }
}

/// A collector that refuses spans costs no request anything: the gateway answers every request,
/// counts each failed export and the spans lost in it, logs the first failure once (not the
/// next ones), and once the collector accepts again, exports and says it recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_collector_is_counted_logged_once_and_recovered_from() {
    crate::harness::init();
    let flaky = Flaky {
        refuse: std::sync::Arc::new(3.into()),
        accepted: Collector::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let at = format!("http://{}", listener.local_addr().expect("addr"));
    let endpoint = format!("endpoint={at}");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(flaky.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let users = Backend::start("users").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", users.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .route(RouteSpec::new("all").prefix("/").to("users"))
                .configure(move |c| c.telemetry.tracing.endpoint = Some(at)),
        )
        .start()
        .await;
    let gw = mesh.gw();
    let failures = "meshgate_tracing_export_failures_total";
    // one batch per second (the exporter's schedule): a request, then wait for its export
    for round in 1..=4_u32 {
        let r = plain(gw.http(), "GET", "api.example", "/users/1", &[], b"").await;
        assert_eq!(r.status, 200, "a failing collector costs no request: {r:?}");
        let want = f64::from(round.min(3));
        assert!(
            eventually(Duration::from_secs(10), || async {
                gw.metric(failures).await >= want
                    && (round < 4
                        || gw.metric("meshgate_tracing_spans_exported_total").await >= 1.0)
            })
            .await,
            "round {round}: failures {} exported {}",
            gw.metric(failures).await,
            gw.metric("meshgate_tracing_spans_exported_total").await
        );
    }
    assert_eq!(
        gw.metric(failures).await,
        3.0,
        "the fourth export went through"
    );
    assert!(
        gw.metric("meshgate_tracing_spans_lost_total").await >= 3.0,
        "each refused batch held a request's span"
    );
    assert!(
        !flaky.accepted.spans().is_empty(),
        "the collector got spans after it recovered"
    );
    let logs = captured_logs();
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("trace export failed") && l.contains(&endpoint))
            .count(),
        1,
        "the first failure is logged, the next two are not: {logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("trace export recovered") && l.contains(&endpoint)),
        "{logs}"
    );
}

/// One HTTP export as received: path, content type, spans.
type Export = (String, String, Vec<Got>);

/// OTLP over HTTP/protobuf: a plain hyper server on `/v1/traces` receives the gateway's spans
/// (protobuf-encoded `ExportTraceServiceRequest`), one server span per request sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_export_over_http_protobuf() {
    use http_body_util::BodyExt;
    let got: std::sync::Arc<std::sync::Mutex<Vec<Export>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let ct = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let decoded =
                                <ExportTraceServiceRequest as prost::Message>::decode(body)
                                    .map(flatten)
                                    .unwrap_or_default();
                            sink.lock().expect("lock").push((path, ct, decoded));
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let users = Backend::start("users").await;
    let endpoint = format!("http://{addr}");
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", users.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .route(RouteSpec::new("users").prefix("/").to("users"))
                .configure(move |c| {
                    c.telemetry.tracing.endpoint = Some(endpoint);
                    c.telemetry.tracing.protocol =
                        Some(meshgate_agent::telemetry::otel::OtlpProtocol::Http);
                }),
        )
        .start()
        .await;
    for i in 0..3 {
        let r = plain(
            mesh.gw().http(),
            "GET",
            "api.example",
            &format!("/u/{i}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(mesh.shutdown().await);
    let servers = || {
        got.lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, _, s)| s.clone())
            .filter(|g| g.span.kind == SpanKind::Server as i32)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || async { servers() >= 3 }).await,
        "server spans: {}",
        servers()
    );
    let exports = got.lock().expect("lock").clone();
    for (path, ct, _) in &exports {
        assert_eq!(path, "/v1/traces");
        assert_eq!(ct, "application/x-protobuf");
    }
    let spans: Vec<Got> = exports.into_iter().flat_map(|(_, _, s)| s).collect();
    assert_eq!(servers(), 3, "one server span per request: {spans:?}");
    for g in spans
        .iter()
        .filter(|g| g.span.kind == SpanKind::Server as i32)
    {
        assert_eq!(g.service, "meshgate-gateway");
        assert_eq!(attr(&g.span, "http.route").as_deref(), Some("users"));
        assert_eq!(g.span.name, "GET users");
    }
}

/// `/authz/check` on the destination agent decides with its live rules and names the rule:
/// what `meshgate authz check` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_check_names_the_deciding_rule() {
    let users = Backend::start("users").await;
    let mesh = users_mesh(&users).await;
    let node = mesh.agent("node-b");
    let check = |q: &'static str| async move {
        let (code, body) = node.admin(&format!("/authz/check?{q}")).await;
        (
            code,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
        )
    };
    let (code, v) = check("from=gateway&to=users&method=DELETE&path=/admin/x").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["rule"], 1, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rule #1")),
        "{v}"
    );
    assert_eq!(v["layer"], "l7");
    let (_, v) = check("from=gateway&to=users&method=GET&path=/users/1").await;
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["rule"], 0, "{v}");
    let (_, v) = check("from=web&to=users").await;
    assert_eq!(v["decision"], "deny", "{v}");
    assert!(v["rule"].is_null(), "the default decided: {v}");
    assert!(
        v["from"].as_str().is_some_and(|f| f.ends_with("/svc/web")),
        "{v}"
    );
    let (code, v) = check("from=gateway&to=billing").await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v.as_str()
            .is_some_and(|e| e.contains("does not run on this node")),
        "{v}"
    );
    // the same request through the gateway is refused by that rule
    let r = plain(
        mesh.gw().http(),
        "DELETE",
        "api.example",
        "/admin/x",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(mesh.shutdown().await);
}
