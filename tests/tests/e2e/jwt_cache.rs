//! The gateway's verified-token cache, seen from outside: a token is verified once and then
//! served from the cache (counted by `meshgate_gateway_jwt_checks_total`), and a token whose
//! key leaves the provider's JWKS stops working after the next refresh.

use std::{sync::atomic::Ordering, time::Duration};

use serde_json::json;

use crate::{
    auth::{ISS, Jwks, claims, ec, rsa, token},
    gw_harness::{Backend, plain},
    harness::eventually,
    mesh::{AgentSpec, GatewaySpec, Intention, RouteSpec, ServiceSpec, TestMesh},
};

const VERIFIED: &str = r#"meshgate_gateway_jwt_checks_total{provider="main",result="verified"}"#;
const CACHE_HIT: &str = r#"meshgate_gateway_jwt_checks_total{provider="main",result="cache_hit"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_verified_once_and_fails_after_its_key_leaves_the_jwks() {
    let (old, kept) = (ec("old-1"), rsa("kept-1"));
    let jwks = Jwks::start(&[&old, &kept]).await;
    let backend = Backend::start("users").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .auth(json!({"jwt": [{
                    "name": "main", "issuer": ISS, "audiences": ["api"], "jwks_uri": jwks.url,
                    "algorithms": ["ES256", "RS256"], "jwks_refresh": "500ms",
                    "unknown_kid_refetch_min_interval": "1h",
                }]}))
                .route(RouteSpec::new("api").prefix("/").jwt(&["main"]).to("users")),
        )
        .start()
        .await;
    let gw = mesh.gw();
    let call = |t: &str| {
        let bearer = format!("Bearer {t}");
        async move {
            plain(
                gw.http(),
                "GET",
                "api.example",
                "/x",
                &[("authorization", &bearer)],
                b"",
            )
            .await
        }
    };
    let old_token = token(&old, claims("alice", 300));
    let kept_token = token(&kept, claims("bob", 300));

    assert_eq!(call(&old_token).await.status, 200);
    assert_eq!(
        (gw.metric(VERIFIED).await, gw.metric(CACHE_HIT).await),
        (1.0, 0.0)
    );
    for i in 0..3 {
        let got = call(&old_token).await;
        assert_eq!(got.status, 200, "repeat {i}: {}", got.body);
    }
    assert_eq!(
        (gw.metric(VERIFIED).await, gw.metric(CACHE_HIT).await),
        (1.0, 3.0),
        "the same token again is a cache hit, not a second verification"
    );
    assert_eq!(call(&kept_token).await.status, 200);
    assert_eq!(call(&kept_token).await.status, 200);
    assert_eq!(
        (gw.metric(VERIFIED).await, gw.metric(CACHE_HIT).await),
        (2.0, 4.0)
    );

    // the issuer withdraws one key; after the next refresh its cached token is refused
    let fetches = jwks.fetches.load(Ordering::SeqCst);
    jwks.set(&[&kept]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            jwks.fetches.load(Ordering::SeqCst) > fetches
        })
        .await,
        "the JWKS was refreshed"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            call(&old_token).await.status == 401
        })
        .await,
        "a cached token whose key left the JWKS is refused after the refresh"
    );
    let got = call(&old_token).await;
    assert_eq!(got.status, 401, "{}", got.body);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/unauthorized"
    );
    // the key that stayed keeps its tokens working
    let got = call(&kept_token).await;
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
        Some("bob")
    );
}
