//! `meshgate dev`: everything on 127.0.0.1 in one process — a CA, two agents, the gateway, a
//! demo REST service (a v1 and a canary v2) and a demo gRPC service (`demo.orders.v1.Orders`,
//! offered by the gateway as REST/JSON through transcoding and as gRPC / gRPC-Web) — with
//! static discovery. It prints the URLs and
//! ready-to-paste curl lines, and stops cleanly on Ctrl-C. `--port-base` moves every port.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, time::Duration, time::SystemTime};

use crate::config::CaConfig;
use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use meshgate_agent::{app::Agent, config::AgentConfig};
use meshgate_ca::{
    server::CaServer,
    store::{self, TokenStore},
};
use meshgate_gateway::{app::GatewayApp, config::GatewayConfig};
use serde_json::json;
use tracing::info;

// Every line dev prints goes through `outln!`: a closed stdout (`meshgate dev | head`) ends dev
// quietly (status 141) instead of panicking.
macro_rules! println {
    ($($arg:tt)*) => { $crate::outln!($($arg)*) };
}

/// Arguments of `meshgate dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// First port of the block dev uses (it needs base..base+500 free on 127.0.0.1).
    #[arg(long, default_value_t = 18000)]
    port_base: u16,
    /// Keep state here instead of a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the configs dev runs (ca.yaml, node-a.yaml, node-b.yaml, gateway.yaml) into
    /// DIR, as a starting point for a real deployment.
    #[arg(long, value_name = "DIR")]
    print_configs: Option<PathBuf>,
    /// Export traces of every process (both agents and the gateway) to this OTLP/gRPC
    /// endpoint, e.g. http://127.0.0.1:4317 (a Jaeger or an OpenTelemetry Collector). The
    /// standard OTEL_EXPORTER_OTLP_* variables work too.
    #[arg(long, value_name = "ENDPOINT")]
    otlp: Option<String>,
    #[command(flatten)]
    backends: DevBackends,
}

/// Real parts that replace the embedded ones (`--consul`, `--redis`).
#[derive(Debug, Args)]
struct DevBackends {
    /// Use this Consul agent's HTTP API (e.g. http://127.0.0.1:8500) instead of static
    /// discovery: node-a and node-b register their services there (with health checks on
    /// 127.0.0.1), and node-b and the gateway find users and users-canary in it.
    #[arg(long, value_name = "ADDR")]
    consul: Option<String>,
    /// Keep the gateway's rate limits in this Redis (e.g. redis://127.0.0.1:6379/0) instead of
    /// in memory, as several gateway instances share them in production.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

impl DevBackends {
    /// The `discovery` section: Consul for every service when `--consul` is given, else the
    /// static list.
    fn discovery(&self, statics: serde_json::Value) -> serde_json::Value {
        match &self.consul {
            Some(addr) => json!({"consul": {"address": addr, "wait": "30s"}}),
            None => json!({ "static": statics }),
        }
    }

    /// Registration settings: checks every 2s so a real Consul marks the services passing
    /// quickly.
    fn registration(&self) -> serde_json::Value {
        json!({"check_interval": "2s", "deregister_critical_after": "1m"})
    }

    /// Waits (up to 30s) until the gateway's discovery sees `services` with endpoints; only
    /// with `--consul`, where that depends on Consul's health checks.
    async fn wait_for_endpoints(&self, admin: SocketAddr, services: &[&str]) -> anyhow::Result<()> {
        let Some(consul) = &self.consul else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = crate::inspect::admin_get(admin, "/endpoints").await?;
            let missing: Vec<&str> = services
                .iter()
                .copied()
                .filter(|s| {
                    !seen.as_array().is_some_and(|l| {
                        l.iter().any(|e| {
                            e["service"] == *s
                                && e["endpoints"].as_array().is_some_and(|x| !x.is_empty())
                        })
                    })
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "Consul at {consul} has no passing instance of {} after 30s: does that Consul agent run the health checks dev registered (TCP checks on 127.0.0.1)?",
                    missing.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The demo REST service: `GET /users/{id}`, `DELETE /admin/{what}`, `GET /health`.
pub(crate) async fn demo_service(
    addr: SocketAddr,
    version: &'static str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the demo service on {addr}"))?;
    Ok(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let (status, body) = match (
                            req.method().as_str(),
                            path.split('/').collect::<Vec<_>>().as_slice(),
                        ) {
                            ("GET", ["", "users", id]) => (
                                200,
                                json!({"id": id, "name": format!("user {id}"), "version": version}),
                            ),
                            ("DELETE", ["", "admin", what]) => {
                                (200, json!({"deleted": what, "version": version}))
                            }
                            ("GET", ["", "health"]) => (200, json!({"status": "ok"})),
                            // the demo order as a REST service would write it by hand: the
                            // plain JSON twin of the transcoded GET /v1/orders/{id}
                            ("GET", ["", "orders", id]) => {
                                (200, crate::demo_orders::order_json(id))
                            }
                            _ => (404, json!({"error": "not found", "path": path})),
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .expect("invariant: static response is valid");
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    }))
}

/// A gRPC-Web text request body: `GetOrderRequest{id}` framed and base64-encoded.
fn grpc_web_get_order(id: &str) -> String {
    use base64::Engine as _;
    // field 1 (id), length-delimited
    let mut msg = vec![0x0a, u8::try_from(id.len()).unwrap_or(0)];
    msg.extend_from_slice(id.as_bytes());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&msg);
    base64::engine::general_purpose::STANDARD.encode(frame)
}

/// `url` without its password (`user:PASSWORD@` or `?pass=PASSWORD`), for printing.
fn redact_url(url: &str) -> String {
    let (head, query) = url.split_once('?').unwrap_or((url, ""));
    let head = match (head.split_once("://"), head.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() => {
            let user = rest.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{}", &head[at + 1..])
        }
        _ => head.to_owned(),
    };
    if query.is_empty() {
        return head;
    }
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("pass" | "password", _)) => {
                format!("{}=***", kv.split('=').next().unwrap_or("pass"))
            }
            _ => kv.to_owned(),
        })
        .collect();
    format!("{head}?{}", query.join("&"))
}

fn port(base: u16, offset: u16) -> anyhow::Result<SocketAddr> {
    let p = base.checked_add(offset).ok_or_else(|| {
        anyhow::anyhow!("--port-base {base} is too high: dev needs base..base+500")
    })?;
    Ok(SocketAddr::from(([127, 0, 0, 1], p)))
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let b = args.port_base;
    crate::dev_setup::check_ports(b)?;
    let tmp;
    let root = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("meshgate-dev-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let td = "mesh.dev";
    let ca_dir = root.join("ca");
    if !ca_dir.join("root.crt").exists() {
        store::init(&ca_dir, td, false, SystemTime::now())?;
    }
    let ca_cfg = CaConfig {
        listen: port(b, 12)?,
        ..CaConfig::new(td, &ca_dir)
    };
    let ca = CaServer::start(&ca_cfg, None).await?;
    let tokens = TokenStore::new(&ca_dir);
    let token = |node: &str, services: &[&str]| -> anyhow::Result<PathBuf> {
        let t = tokens.create(
            node,
            None,
            &services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            Duration::from_secs(600),
            SystemTime::now(),
        )?;
        let path = root.join(format!("{node}.token"));
        meshgate_ca::pki::write_atomic(&path, t.token.as_bytes(), 0o600)?;
        Ok(path)
    };
    let ca_ref = |node: &str, services: &[&str]| -> anyhow::Result<serde_json::Value> {
        Ok(
            json!({"address": format!("https://{}", ca.local_addr()), "fingerprint": ca.fingerprint(), "join_token_file": token(node, services)?}),
        )
    };

    let users = port(b, 81)?;
    let canary = port(b, 82)?;
    let _v1 = demo_service(users, "v1").await?;
    let _v2 = demo_service(canary, "v2").await?;
    let orders = port(b, 84)?;
    let _orders = crate::demo_orders::serve(orders).await?;
    // the gateway compiles the demo's .proto at run time, as it would a user's own files
    let protos = root.join("protos");
    let proto_file = protos.join("demo/orders/v1/orders.proto");
    std::fs::create_dir_all(
        proto_file
            .parent()
            .expect("invariant: the path has a parent"),
    )?;
    std::fs::write(&proto_file, meshgate_proto::demo::ORDERS_PROTO)
        .with_context(|| format!("cannot write {}", proto_file.display()))?;

    let node_a: AgentConfig = serde_json::from_value(json!({
        "node": "node-a",
        "trust_domain": td,
        "data_dir": root.join("node-a"),
        "ca": ca_ref("node-a", &["users", "users-canary", "orders"])?,
        "listen": {"inbound": port(b, 8)?, "admin": port(b, 0)?},
        "services": [
            {"name": "users", "port": users.port(), "protocol": "http"},
            {"name": "users-canary", "port": canary.port(), "protocol": "http"},
            {"name": "orders", "port": orders.port(), "protocol": "grpc"},
        ],
        "authz": {"default": "deny", "rules": [
            {"from": "gateway", "to": "*", "action": "allow"},
            {"from": "web", "to": "users", "action": "allow"},
            {"from": "web", "to": "users", "action": "deny", "methods": ["DELETE"], "paths": ["/admin/*"]},
        ]},
        "discovery": args.backends.discovery(json!({})),
        "registration": args.backends.registration(),
        "drain_timeout": "2s",
    }))?;
    let mut node_a = node_a;
    node_a.telemetry.tracing.endpoint = args.otlp.clone();
    let node_a_cfg = node_a.clone();
    let a = Agent::start(node_a).await.context("starting node-a")?;
    let web_upstream = port(b, 91)?;
    let node_b: AgentConfig = serde_json::from_value(json!({
        "node": "node-b",
        "trust_domain": td,
        "data_dir": root.join("node-b"),
        "ca": ca_ref("node-b", &["web"])?,
        "listen": {"inbound": port(b, 108)?, "admin": port(b, 100)?},
        "services": [{"name": "web", "port": port(b, 83)?.port(), "upstreams": [{"service": "users", "listen": web_upstream}]}],
        "discovery": args.backends.discovery(json!({"users": [a.inbound_addr()]})),
        "registration": args.backends.registration(),
        "drain_timeout": "2s",
    }))?;
    let mut node_b = node_b;
    node_b.telemetry.tracing.endpoint = args.otlp.clone();
    let node_b_cfg = node_b.clone();
    let nb = Agent::start(node_b).await.context("starting node-b")?;
    // edge auth for the demo: an ES256 signing key whose JWKS the gateway holds inline, a
    // demo token signed with it, and a demo API key (only its hash goes into the config)
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let point = signing.public_key_raw().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "dev-1", "use": "sig", "alg": "ES256",
                     "x": data_encoding::BASE64URL_NOPAD.encode(&point[1..33]), "y": data_encoding::BASE64URL_NOPAD.encode(&point[33..])});
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("dev-1".into());
    let demo_token = jsonwebtoken::encode(
        &header,
        &json!({"iss": "https://dev.meshgate.local", "aud": "demo", "sub": "demo-user", "scope": "read",
                "iat": now, "exp": now + 24 * 3600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes())?,
    )?;
    let demo_key = format!(
        "mgk_demo_{:016x}{:016x}",
        meshgate_agent::rand::secure_u64(),
        meshgate_agent::rand::secure_u64()
    );
    let gateway_http = port(b, 80)?;
    let gw_cfg: GatewayConfig = serde_json::from_value(json!({
        "node": "gateway",
        "trust_domain": td,
        "data_dir": root.join("gateway"),
        "ca": ca_ref("gateway", &["gateway"])?,
        "listen": {"http": gateway_http, "admin": port(b, 200)?},
        "cors": {"allow_origins": ["http://localhost:3000"], "allow_headers": ["Content-Type"]},
        "auth": {
            "jwt": [{"name": "demo", "issuer": "https://dev.meshgate.local", "audiences": ["demo"],
                     "jwks": {"keys": [jwk]}, "algorithms": ["ES256"]}],
            "api_keys": {"consumers": [{"name": "demo-partner", "groups": ["partners"],
                                        "keys": [meshgate_gateway::apikey::hash_key(&demo_key)]}]},
            "rate_limits": [{"name": "demo", "key": "client_ip", "limit": {"requests": 3, "per": "1m"}}],
            "rate_limit_store": args.backends.redis.as_ref().map(|url| json!({"url": url})),
        },
        "routes": [
        {"name": "me", "match": {"path": {"prefix": "/api/me"}, "methods": ["GET"]}, "rewrite": {"prefix": "/users"},
         "auth": {"jwt": ["demo"], "scopes": ["read"]}, "backend": {"service": "users"}},
        {"name": "partner", "match": {"path": {"prefix": "/api/partner"}}, "rewrite": {"prefix": "/users"},
         "auth": {"api_key": true, "groups": ["partners"]}, "backend": {"service": "users"}},
        {"name": "limited", "match": {"path": {"prefix": "/api/limited"}}, "rewrite": {"prefix": "/users"},
         "rate_limit": "demo", "backend": {"service": "users"}},
        {"name": "orders-json", "match": {"path": {"prefix": "/api/orders"}, "methods": ["GET"]}, "rewrite": {"prefix": "/orders"},
         "backend": {"service": "users"}},
        {"name": "orders-rest", "match": {"path": {"prefix": "/v1"}}, "backend": {"service": "orders"},
         "transcode": {"protos": ["demo/orders/v1/orders.proto"], "include": [protos]}},
        {"name": "orders-grpc", "match": {"path": {"prefix": "/demo.orders.v1.Orders"}}, "backend": {"service": "orders"},
         "grpc_web": true},
        {
            "name": "users",
            "match": {"path": {"prefix": "/api/users"}, "methods": ["GET"]},
            "rewrite": {"prefix": "/users"},
            "timeout": "5s",
            "retries": {"attempts": 2},
            "backend": {"split": [{"service": "users", "weight": 90, "version": "v1"}, {"service": "users-canary", "weight": 10, "version": "v2"}],
                        "pin": {"header": "X-Canary", "cookie": "canary"}},
        }],
        "discovery": args.backends.discovery(json!({"users": [a.inbound_addr()], "users-canary": [a.inbound_addr()], "orders": [a.inbound_addr()]})),
        "drain_timeout": "2s",
    }))?;
    let mut gw_cfg = gw_cfg;
    gw_cfg.telemetry.tracing.endpoint = args.otlp.clone();
    let gw_cfg_copy = gw_cfg.clone();
    let gw = GatewayApp::start(gw_cfg)
        .await
        .context("starting the gateway")?;
    args.backends
        .wait_for_endpoints(gw.admin_addr(), &["users", "users-canary", "orders"])
        .await?;
    if let Some(dir) = &args.print_configs {
        let written = crate::dev_setup::write_configs(
            dir,
            &crate::dev_setup::DevConfigs {
                ca: &ca_cfg,
                agents: vec![&node_a_cfg, &node_b_cfg],
                gateway: &gw_cfg_copy,
            },
        )?;
        info!(files = %written.join(" "), "wrote the configs dev runs");
    }

    let g = gateway_http;
    println!(
        "meshgate dev: a CA, two agents, a gateway and a demo REST service on 127.0.0.1 (Ctrl-C stops it)"
    );
    println!();
    println!(
        "  gateway  http://{g}                 admin http://{}",
        gw.admin_addr()
    );
    println!(
        "  node-a   mesh {}   admin http://{}   runs users (v1 on :{}), users-canary (v2 on :{}) and orders (gRPC on :{})",
        a.inbound_addr(),
        a.admin_addr(),
        users.port(),
        canary.port(),
        orders.port()
    );
    println!(
        "  node-b   mesh {}   admin http://{}   runs web; web reaches users at {web_upstream}",
        nb.inbound_addr(),
        nb.admin_addr()
    );
    println!(
        "  CA       https://{}   trust domain {td}   state in {}",
        ca.local_addr(),
        root.display()
    );
    if let Some(c) = &args.backends.consul {
        println!("  discovery  Consul at {c} (services registered there)");
    }
    if let Some(r) = &args.backends.redis {
        println!("  rate limits  Redis at {}", redact_url(r));
    }
    println!();
    println!("Where to look:");
    println!(
        "  metrics      curl -s http://{}/metrics   (every metric: docs/metrics.md)",
        gw.admin_addr()
    );
    println!(
        "  status       meshgate status --admin {}   (and --admin {} / {} for the agents)",
        gw.admin_addr(),
        a.admin_addr(),
        nb.admin_addr()
    );
    println!(
        "  routes       meshgate routes --admin {} --match 'GET http://{g}/api/users/7'",
        gw.admin_addr()
    );
    println!(
        "  top          meshgate top --admin {}   (live rps, p50/p99, errors per route and service)",
        gw.admin_addr()
    );
    println!(
        "  why          meshgate why 'GET http://{g}/api/me/7' --admin {} --agent-admin {}   (add --token TOKEN)",
        gw.admin_addr(),
        a.admin_addr()
    );
    println!(
        "  why (mesh)   meshgate why 'DELETE http://{web_upstream}/admin/x' --from web --admin {} --agent-admin {}",
        nb.admin_addr(),
        a.admin_addr()
    );
    println!(
        "  authz        meshgate authz check --from web --to users --method DELETE --path /admin/x --admin {}",
        a.admin_addr()
    );
    println!("  access log   one JSON line per gateway request on this terminal's stdout");
    match &args.otlp {
        Some(e) => println!("  traces       exported over OTLP to {e}"),
        None => {
            println!("  traces       off; start with --otlp http://127.0.0.1:4317 to export them")
        }
    }
    println!();
    println!("Try (each prints the response, then its status code):");
    println!(
        "  # a routed call: gateway -> mesh tunnel -> node-a -> users (90% v1, 10% canary v2)"
    );
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{g}/api/users/7   # expect 200");
    println!("  # pinned to the canary by header (or cookie canary=v2)");
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -H 'X-Canary: v2' http://{g}/api/users/7   # expect 200"
    );
    println!(
        "  # east-west: web calls users through its agent; the intention denies DELETE /admin/*"
    );
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -X DELETE http://{web_upstream}/admin/cache   # expect 403"
    );
    println!("  # ...while other calls from web are allowed");
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{web_upstream}/users/7   # expect 200");
    println!("  # no route: an RFC 9457 problem+json");
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{g}/nope   # expect 404");
    println!("  # a JWT-protected route (the demo token below is ES256, valid 24h, scope read)");
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -H 'Authorization: Bearer {demo_token}' http://{g}/api/me/7   # expect 200"
    );
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{g}/api/me/7   # expect 401");
    println!("  # an API-key route (demo key {demo_key})");
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -H 'X-Api-Key: {demo_key}' http://{g}/api/partner/7   # expect 200"
    );
    println!("  # a rate limit of 3 per minute per client IP: the 4th call is refused");
    println!(
        "  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{{http_code}}\\n' http://{g}/api/limited/7; done   # expect 429"
    );
    println!(
        "  # REST to gRPC: the gateway transcodes JSON to the demo.orders.v1.Orders gRPC service"
    );
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{g}/v1/orders/1001   # expect 200");
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -H 'Content-Type: application/json' -d '{{\"items\": [{{\"sku\": \"A1\", \"quantity\": 2, \"priceCents\": \"1250\"}}]}}' http://{g}/v1/shops/demo/orders   # expect 200"
    );
    println!(
        "  # a gRPC error keeps its meaning: NOT_FOUND is a 404 with {{code, message, details}}"
    );
    println!("  curl -s -w '\\n%{{http_code}}\\n' http://{g}/v1/orders/nope   # expect 404");
    println!(
        "  # a server stream, one JSON object per line as each message arrives (SSE with -H 'Accept: text/event-stream')"
    );
    println!(
        "  curl -sN -w '\\n%{{http_code}}\\n' 'http://{g}/v1/orders:watch?count=3&interval=0.2s'   # expect 200"
    );
    println!(
        "  # the gRPC route, here as a browser calls it (gRPC-Web, base64 text): GetOrder id 1001"
    );
    println!(
        "  curl -s -w '\\n%{{http_code}}\\n' -H 'Content-Type: application/grpc-web-text' -d '{}' http://{g}/demo.orders.v1.Orders/GetOrder   # expect 200",
        grpc_web_get_order("1001")
    );
    println!(
        "  # (plain gRPC works on the same route: grpcurl -plaintext -import-path {} -proto demo/orders/v1/orders.proto -d '{{\"id\": \"1001\"}}' {g} demo.orders.v1.Orders/GetOrder)",
        protos.display()
    );
    println!();
    println!("Inspect (one command per line):");
    println!("  meshgate routes --admin {}", gw.admin_addr());
    println!("  meshgate services --admin {}", nb.admin_addr());
    println!("  meshgate endpoints users --admin {}", nb.admin_addr());
    println!("  meshgate top --once --admin {}", gw.admin_addr());
    if let Some(hint) = crate::dev_setup::path_hint() {
        println!("  ({hint})");
    }
    println!("ready");
    crate::output::flush()?;

    let mut signals = crate::signals::Signals::new()?;
    let how = signals.recv().await;
    signals.stopping("dev", how);
    gw.shutdown().await;
    nb.shutdown().await;
    a.shutdown().await;
    ca.shutdown(Duration::from_secs(1)).await;
    println!("stopped");
    Ok(())
}
