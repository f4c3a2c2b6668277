//! Edge authentication at the gateway: JWTs signed in the test against a JWKS server on
//! loopback, API keys, identity injection, and rate limits.

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use aws_lc_rs::{
    encoding::AsDer,
    rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents},
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::{
    gw_harness::{Backend, TestGateway, plain},
    harness::{TestAgent, TestCa, eventually},
};

const TD: &str = "mesh.example";
pub(crate) const ISS: &str = "https://issuer.test";

fn b64url(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

pub(crate) struct SigningKey {
    raw: Option<Arc<RsaKeyPair>>,
    key: EncodingKey,
    pub(crate) jwk: Value,
    alg: Algorithm,
    kid: String,
}

pub(crate) fn rsa(kid: &str) -> SigningKey {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa");
    let pem = meshgate_ca::pki::pem_block("PRIVATE KEY", pair.as_der().expect("pkcs8").as_ref());
    let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    SigningKey {
        raw: Some(Arc::new(pair)),
        key: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("pem"),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(&c.n), "e": b64url(&c.e)}),
        alg: Algorithm::RS256,
        kid: kid.into(),
    }
}

pub(crate) fn ec(kid: &str) -> SigningKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec");
    let point = pair.public_key().as_ref().to_vec();
    let pem =
        meshgate_ca::pki::pem_block("PRIVATE KEY", pair.to_pkcs8v1().expect("pkcs8").as_ref());
    SigningKey {
        raw: None,
        key: EncodingKey::from_ec_pem(pem.as_bytes()).expect("pem"),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "x": b64url(&point[1..33]), "y": b64url(&point[33..])}),
        alg: Algorithm::ES256,
        kid: kid.into(),
    }
}

/// A token with a hand-written header, RS256-signed by `k` (or unsigned when `k` is None).
fn raw_token(k: Option<&SigningKey>, header: Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = match k.and_then(|k| k.raw.clone()) {
        Some(pair) => {
            let mut sig = vec![0u8; pair.public_modulus_len()];
            pair.sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("sign");
            b64url(&sig)
        }
        None => String::new(),
    };
    format!("{signing_input}.{sig}")
}

/// HS256 over the input with `secret` (the key-confusion attack: the RSA public key as secret).
fn hs256_token(secret: &[u8], kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(tag.as_ref()))
}

fn ed(kid: &str) -> SigningKey {
    let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().expect("ed25519");
    let pem =
        meshgate_ca::pki::pem_block("PRIVATE KEY", pair.to_pkcs8v1().expect("pkcs8").as_ref());
    SigningKey {
        raw: None,
        key: EncodingKey::from_ed_pem(pem.as_bytes()).expect("pem"),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "x": b64url(pair.public_key().as_ref())}),
        alg: Algorithm::EdDSA,
        kid: kid.into(),
    }
}

const HS_SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!!";

fn hs(kid: &str) -> SigningKey {
    SigningKey {
        raw: None,
        key: EncodingKey::from_secret(HS_SECRET),
        jwk: json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64url(HS_SECRET)}),
        alg: Algorithm::HS256,
        kid: kid.into(),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub(crate) fn token(k: &SigningKey, claims: Value) -> String {
    let mut h = Header::new(k.alg);
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, &claims, &k.key).expect("sign")
}

pub(crate) fn claims(sub: &str, exp_in: i64) -> Value {
    let t = now() as i64;
    json!({"iss": ISS, "aud": "api", "sub": sub, "exp": t + exp_in, "iat": t, "scope": "read write", "email": format!("{sub}@example.com")})
}

/// A JWKS server on loopback; `down` makes it answer 500, `fetches` counts requests.
pub(crate) struct Jwks {
    pub(crate) url: String,
    doc: Arc<Mutex<String>>,
    pub(crate) down: Arc<AtomicBool>,
    pub(crate) fetches: Arc<AtomicUsize>,
}

impl Jwks {
    pub(crate) async fn start(keys: &[&SigningKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let doc = Arc::new(Mutex::new(
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string(),
        ));
        let (down, fetches) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (d, dn, f) = (doc.clone(), down.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (d, dn, f) = (d.clone(), dn.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |_req: http::Request<hyper::body::Incoming>| {
                            f.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = if dn.load(Ordering::SeqCst) {
                                (500, "down".to_owned())
                            } else {
                                (200, d.lock().expect("lock").clone())
                            };
                            async move {
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::from(body)))
                                        .expect("resp"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self {
            url,
            doc,
            down,
            fetches,
        }
    }

    pub(crate) fn set(&self, keys: &[&SigningKey]) {
        *self.doc.lock().expect("lock") =
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string();
    }
}

struct Stack {
    _ca: TestCa,
    _node: TestAgent,
    gw: TestGateway,
    backend: Backend,
}

const PARTNER_KEY: &str = "mgk_partner_0123456789abcdef";

async fn stack(jwks_url: &str) -> Stack {
    let ca = TestCa::start(TD).await;
    let backend = Backend::start("users").await;
    let node = ca
        .agent("node-b", json!({
            "services": [{"name": "users", "port": backend.port, "protocol": "http"}],
            "authz": {"default": "deny", "rules": [{"from": "gateway", "to": "users", "action": "allow"}]},
        }))
        .await;
    let gw = ca
        .gateway(json!({
            "auth": {
                "jwt": [{
                    "name": "main", "issuer": ISS, "audiences": ["api"], "jwks_uri": jwks_url,
                    "algorithms": ["RS256", "ES256", "EdDSA"], "leeway": "5s",
                    "claims_to_headers": {"email": "X-User-Email"},
                    "jwks_refresh": "1h", "unknown_kid_refetch_min_interval": "100ms",
                }, {
                    "name": "hs", "issuer": ISS, "audiences": ["api"], "algorithms": ["HS256"],
                    "jwks": {"keys": [hs("hs-1").jwk]},
                }],
                "api_keys": {
                    "consumers": [{"name": "acme", "groups": ["partners"], "tier": "gold", "keys": [meshgate_gateway::apikey::hash_key(PARTNER_KEY)]}],
                },
                "rate_limits": [{"name": "partners", "key": "consumer", "limit": {"requests": 3, "per": "1m"}}],
            },
            "routes": [
                {"name": "secure", "match": {"path": {"prefix": "/secure"}}, "auth": {"jwt": ["main"], "scopes": ["read"]}, "backend": {"service": "users"}},
                {"name": "hs", "match": {"path": {"prefix": "/hs"}}, "auth": {"jwt": ["hs"]}, "backend": {"service": "users"}},
                {"name": "admin", "match": {"path": {"prefix": "/admin"}}, "auth": {"jwt": ["main"], "scopes": ["admin"]}, "backend": {"service": "users"}},
                {"name": "partner", "match": {"path": {"prefix": "/partner"}}, "auth": {"api_key": true, "groups": ["partners"]}, "rate_limit": "partners", "backend": {"service": "users"}},
            ],
            "discovery": {"static": {"users": [node.inbound().to_string()]}},
        }))
        .await;
    Stack {
        _ca: ca,
        _node: node,
        gw,
        backend,
    }
}

fn last_seen(b: &Backend) -> std::collections::BTreeMap<String, String> {
    b.seen
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("seen")
        .headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_once_at_the_edge() {
    let (rs, es, ed) = (rsa("rs-1"), ec("ec-1"), ed("ed-1"));
    let jwks = Jwks::start(&[&rs, &es, &ed]).await;
    let s = stack(&jwks.url).await;
    let gw = s.gw.http();
    // one allowlist mixing RS256, ES256 and EdDSA accepts a valid token of each type
    for k in [&rs, &es, &ed] {
        let bearer = format!("Bearer {}", token(k, claims("alice", 300)));
        let got = plain(
            gw,
            "GET",
            "api.example",
            "/secure/x",
            &[("authorization", &bearer), ("x-user-id", "mallory")],
            b"",
        )
        .await;
        assert_eq!(got.status, 200, "{:?}: {}", k.alg, got.body);
        let seen = last_seen(&s.backend);
        assert_eq!(
            seen.get("x-user-id").map(String::as_str),
            Some("alice"),
            "the verified subject, never the spoofed one"
        );
        assert_eq!(seen.get("x-scopes").map(String::as_str), Some("read write"));
        assert_eq!(
            seen.get("x-user-email").map(String::as_str),
            Some("alice@example.com")
        );
    }
    let before = s.backend.count();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "missing"),
        (
            vec![(
                "authorization",
                format!("Bearer {}", token(&rs, claims("alice", -60))),
            )],
            "expired",
        ),
        (
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    token(
                        &rs,
                        json!({"iss": ISS, "aud": "other", "sub": "a", "exp": now() + 60})
                    )
                ),
            )],
            "aud",
        ),
        (
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    token(
                        &rs,
                        json!({"iss": "https://evil", "aud": "api", "sub": "a", "exp": now() + 60})
                    )
                ),
            )],
            "iss",
        ),
        (
            vec![("authorization", "Bearer not.a.token".to_owned())],
            "malformed",
        ),
        (
            vec![("x-user-id", "mallory".to_owned())],
            "spoofed identity alone",
        ),
    ];
    for (headers, why) in cases {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let got = plain(gw, "GET", "api.example", "/secure/x", &hs, b"").await;
        assert_eq!(got.status, 401, "{why}: {}", got.body);
        let challenge = got.headers["www-authenticate"].to_str().expect("ascii");
        assert!(challenge.starts_with("Bearer"), "{why}: {challenge}");
        assert_eq!(
            got.json()["type"],
            "https://meshgate.dev/problems/unauthorized"
        );
        for (_, v) in &headers {
            assert!(
                !got.body.contains(v.trim_start_matches("Bearer ")) || v.len() < 20,
                "{why}: the token is echoed"
            );
        }
    }
    assert_eq!(
        s.backend.count(),
        before,
        "refused tokens never reach the service"
    );
    // an HS256 provider (its own, symmetric) accepts its tokens
    let bearer = format!("Bearer {}", token(&hs("hs-1"), claims("carol", 300)));
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/hs/x",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    // the leeway is the configured 5s: expired 2s ago passes, 30s ago does not
    let bearer = format!("Bearer {}", token(&rs, claims("alice", -2)));
    assert_eq!(
        plain(
            gw,
            "GET",
            "api.example",
            "/secure/x",
            &[("authorization", &bearer)],
            b""
        )
        .await
        .status,
        200
    );
    let bearer = format!("Bearer {}", token(&rs, claims("alice", -30)));
    assert_eq!(
        plain(
            gw,
            "GET",
            "api.example",
            "/secure/x",
            &[("authorization", &bearer)],
            b""
        )
        .await
        .status,
        401
    );
    // a required claim missing: aud, iss
    for missing in ["aud", "iss"] {
        let mut c = claims("alice", 300);
        c.as_object_mut().expect("object").remove(missing);
        let bearer = format!("Bearer {}", token(&rs, c));
        assert_eq!(
            plain(
                gw,
                "GET",
                "api.example",
                "/secure/x",
                &[("authorization", &bearer)],
                b""
            )
            .await
            .status,
            401,
            "missing {missing}"
        );
    }

    let before = s.backend.count();
    // hand-made attacks: each is a 401
    let attacker = rsa("attacker");
    let good = claims("alice", 300);
    let rsa_public = rs
        .raw
        .as_ref()
        .expect("rsa")
        .public_key()
        .as_der()
        .expect("spki")
        .as_ref()
        .to_vec();
    let attacks: Vec<(String, &str)> = vec![
        (
            raw_token(None, json!({"alg": "none", "typ": "JWT"}), &good),
            "alg none",
        ),
        (
            hs256_token(&rsa_public, "rs-1", &good),
            "HS256 signed with the RSA public key",
        ),
        (
            raw_token(
                Some(&rs),
                json!({"alg": "RS256", "kid": "rs-1", "crit": ["exp"]}),
                &good,
            ),
            "crit",
        ),
        (
            raw_token(
                Some(&attacker),
                json!({"alg": "RS256", "kid": "attacker", "jwk": attacker.jwk}),
                &good,
            ),
            "embedded jwk",
        ),
        (
            raw_token(
                Some(&attacker),
                json!({"alg": "RS256", "kid": "attacker", "jku": "http://127.0.0.1:1/evil.json"}),
                &good,
            ),
            "jku",
        ),
        (
            raw_token(
                Some(&attacker),
                json!({"alg": "RS256", "x5u": "http://127.0.0.1:1/evil.pem"}),
                &good,
            ),
            "x5u",
        ),
        (token(&rsa("unknown-kid"), good.clone()), "unknown kid"),
        (
            token(&rs, json!({"iss": ISS, "aud": "api", "sub": "a"})),
            "missing exp",
        ),
    ];
    for (t, why) in attacks {
        let bearer = format!("Bearer {t}");
        let got = plain(
            gw,
            "GET",
            "api.example",
            "/secure/x",
            &[("authorization", &bearer)],
            b"",
        )
        .await;
        assert_eq!(got.status, 401, "{why}: {}", got.body);
    }
    let huge = token(
        &rs,
        json!({"iss": ISS, "aud": "api", "sub": "a", "exp": now() + 60, "pad": "x".repeat(12_000)}),
    );
    let bearer = format!("Bearer {huge}");
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/secure/x",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(got.status, 431, "an oversized token");

    let bearer = format!("Bearer {}", token(&rs, claims("alice", 300)));
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/admin/x",
        &[("authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(got.status, 403, "a missing scope is 403");
    assert_eq!(
        s.backend.count(),
        before,
        "refused requests never reach the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_followed_and_an_outage_keeps_the_last_good_keys() {
    let (old, new) = (rsa("old"), ec("new"));
    let jwks = Jwks::start(&[&old]).await;
    let s = stack(&jwks.url).await;
    let gw = s.gw.http();
    let call = |k: &SigningKey| format!("Bearer {}", token(k, claims("bob", 300)));
    assert_eq!(
        plain(
            gw,
            "GET",
            "api.example",
            "/secure/1",
            &[("authorization", &call(&old))],
            b""
        )
        .await
        .status,
        200
    );
    // a new kid appears in the JWKS: the unknown kid triggers a refetch
    jwks.set(&[&old, &new]);
    let fresh = call(&new);
    assert!(
        eventually(Duration::from_secs(5), || async {
            plain(
                gw,
                "GET",
                "api.example",
                "/secure/2",
                &[("authorization", &fresh)],
                b"",
            )
            .await
            .status
                == 200
        })
        .await,
        "the new key is accepted after the refetch"
    );
    // the JWKS server fails: the keys already loaded keep working, and the failure is counted
    jwks.down.store(true, Ordering::SeqCst);
    let fetches = jwks.fetches.load(Ordering::SeqCst);
    let unknown = call(&rsa("never-published"));
    // refetches are rate limited (100ms here): keep asking until one happens, bounded
    let refetched = eventually(Duration::from_secs(5), || async {
        assert_eq!(
            plain(
                gw,
                "GET",
                "api.example",
                "/secure/3",
                &[("authorization", &unknown)],
                b""
            )
            .await
            .status,
            401
        );
        jwks.fetches.load(Ordering::SeqCst) > fetches
    })
    .await;
    assert!(refetched, "an unknown kid refetched");
    for k in [&old, &new] {
        assert_eq!(
            plain(
                gw,
                "GET",
                "api.example",
                "/secure/4",
                &[("authorization", &call(k))],
                b""
            )
            .await
            .status,
            200
        );
    }
    let (_, metrics) = crate::harness::http_get(s.gw.app.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains(
            r#"meshgate_gateway_jwks_fetch_failures_total{provider="main",reason="http_status"}"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn api_keys_and_rate_limits() {
    let jwks = Jwks::start(&[&rsa("k")]).await;
    let s = stack(&jwks.url).await;
    let gw = s.gw.http();
    let wrong = "mgk_wrong_key_that_must_never_be_logged";
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/partner/x",
        &[("x-api-key", wrong)],
        b"",
    )
    .await;
    assert_eq!(got.status, 401);
    assert!(!got.body.contains(wrong));
    let got = plain(gw, "GET", "api.example", "/partner/x", &[], b"").await;
    assert_eq!(got.status, 401);

    // three per minute for the consumer; the RateLimit headers count down
    for remaining in [2, 1, 0] {
        let got = plain(
            gw,
            "GET",
            "api.example",
            "/partner/x",
            &[("x-api-key", PARTNER_KEY)],
            b"",
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
        let rl = got.headers["ratelimit"].to_str().expect("ascii");
        assert!(rl.contains(&format!("r={remaining}")), "{rl}");
        assert!(
            got.headers["ratelimit-policy"]
                .to_str()
                .expect("ascii")
                .contains("q=3"),
            "{:?}",
            got.headers
        );
        let seen = last_seen(&s.backend);
        assert_eq!(seen.get("x-consumer").map(String::as_str), Some("acme"));
        assert!(
            !seen.contains_key("x-api-key"),
            "the key is hidden from the upstream"
        );
    }
    let got = plain(
        gw,
        "GET",
        "api.example",
        "/partner/x",
        &[("x-api-key", PARTNER_KEY)],
        b"",
    )
    .await;
    assert_eq!(got.status, 429);
    assert_eq!(
        got.json()["type"],
        "https://meshgate.dev/problems/rate-limited"
    );
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");

    assert!(
        crate::harness::eventually(std::time::Duration::from_secs(5), || async {
            s.gw.access_log().contains("/partner/x")
        })
        .await,
        "the access log was written"
    );
    let text = format!("{}\n{}", s.gw.access_log(), crate::harness::captured_logs());
    assert!(
        !text.contains(wrong) && !text.contains(PARTNER_KEY),
        "a key appeared in the logs"
    );
}

/// A client CA and a client certificate it signed (CN `cn`), as PEM files in `dir`.
fn client_pki(
    dir: &std::path::Path,
    cn: &str,
) -> (
    std::path::PathBuf,
    rustls_pki_types::CertificateDer<'static>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec![format!("{cn}.clients.example")]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("client cert");
    let ca_path = dir.join(format!("{cn}-ca.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).expect("write");
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    (ca_path, cert.der().clone(), der.into())
}

async fn mtls_get(
    gw: &TestGateway,
    client: Option<(
        rustls_pki_types::CertificateDer<'static>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<u16, String> {
    use http_body_util::BodyExt;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(gw.cert.clone()).expect("root");
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client {
        Some((c, k)) => b.with_client_auth_cert(vec![c], k).expect("client auth"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.https())
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("api.example").expect("sni"),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/cert/x")
        .header("host", "api.example")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("req");
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

#[tokio::test]
async fn edge_mtls_maps_the_certificate_to_a_consumer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_path, cert, key) = client_pki(dir.path(), "partner-1");
    let (_, foreign_cert, foreign_key) = client_pki(dir.path(), "intruder");
    let ca = TestCa::start(TD).await;
    let backend = Backend::start("users").await;
    let node = ca
        .agent("node-b", json!({
            "services": [{"name": "users", "port": backend.port, "protocol": "http"}],
            "authz": {"default": "deny", "rules": [{"from": "gateway", "to": "users", "action": "allow"}]},
        }))
        .await;
    let gw = ca
        .gateway(json!({
            "client_auth": {"ca_file": ca_path},
            "routes": [{"name": "cert", "match": {"path": {"prefix": "/cert"}}, "auth": {"mtls": true}, "backend": {"service": "users"}}],
            "discovery": {"static": {"users": [node.inbound().to_string()]}},
        }))
        .await;
    assert_eq!(mtls_get(&gw, Some((cert, key))).await, Ok(200));
    assert_eq!(
        last_seen(&backend).get("x-consumer").map(String::as_str),
        Some("partner-1")
    );
    assert_eq!(
        mtls_get(&gw, None).await,
        Ok(401),
        "no certificate: 401 on an mtls route"
    );
    assert!(
        mtls_get(&gw, Some((foreign_cert, foreign_key)))
            .await
            .is_err(),
        "a certificate from another CA fails the handshake"
    );
}

#[tokio::test]
async fn opaque_tokens_are_introspected_and_cached() {
    // an RFC 7662 endpoint on loopback: "good-opaque" is active, everything else is not
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}/introspect", listener.local_addr().expect("addr"));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            use http_body_util::BodyExt;
                            c.fetch_add(1, Ordering::SeqCst);
                            let authorized = req
                                .headers()
                                .get("authorization")
                                .is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("Basic ")));
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let form = String::from_utf8_lossy(&body).into_owned();
                            let answer = if !authorized {
                                json!({"error": "invalid_client"})
                            } else if form.contains("token=good-opaque") {
                                json!({"active": true, "sub": "opaque-user", "scope": "read", "exp": now() + 600})
                            } else {
                                json!({"active": false})
                            };
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(answer.to_string())))
                                    .expect("resp"),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let ca = TestCa::start(TD).await;
    let backend = Backend::start("users").await;
    let node = ca
        .agent("node-b", json!({
            "services": [{"name": "users", "port": backend.port, "protocol": "http"}],
            "authz": {"default": "deny", "rules": [{"from": "gateway", "to": "users", "action": "allow"}]},
        }))
        .await;
    let gw = ca
        .gateway(json!({
            "auth": {"introspection": [{"name": "idp", "endpoint": endpoint, "client_id": "gateway", "client_secret": "s3cret"}]},
            "routes": [{"name": "opaque", "match": {"path": {"prefix": "/opaque"}}, "auth": {"introspection": ["idp"], "scopes": ["read"]}, "backend": {"service": "users"}}],
            "discovery": {"static": {"users": [node.inbound().to_string()]}},
        }))
        .await;
    for _ in 0..3 {
        let got = plain(
            gw.http(),
            "GET",
            "api.example",
            "/opaque/x",
            &[("authorization", "Bearer good-opaque")],
            b"",
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    assert_eq!(
        last_seen(&backend).get("x-user-id").map(String::as_str),
        Some("opaque-user")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "active answers are cached");
    for _ in 0..2 {
        let got = plain(
            gw.http(),
            "GET",
            "api.example",
            "/opaque/x",
            &[("authorization", "Bearer revoked-opaque")],
            b"",
        )
        .await;
        assert_eq!(got.status, 401);
        assert!(
            got.headers["www-authenticate"]
                .to_str()
                .expect("ascii")
                .contains("invalid_token")
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "inactive answers are cached too"
    );
}

/// A redis-server child on a free loopback port (killed on drop).
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    async fn start() -> Option<Self> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let up = eventually(Duration::from_secs(10), || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let mut buf = [0u8; 7];
            s.write_all(b"PING\r\n").await.is_ok()
                && s.read_exact(&mut buf).await.is_ok()
                && &buf == b"+PONG\r\n"
        })
        .await;
        assert!(up, "redis-server answered PING");
        Some(Self { child, port })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_limit_through_redis_and_fail_closed_without_it() {
    let Some(mut redis) = RedisServer::start().await else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Redis test, but redis-server is missing"
        );
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED redis rate-limit test: redis-server is not installed"
        );
        return;
    };
    let ca = TestCa::start(TD).await;
    let backend = Backend::start("users").await;
    let node = ca
        .agent("node-b", json!({
            "services": [{"name": "users", "port": backend.port, "protocol": "http"}],
            "authz": {"default": "deny", "rules": [{"from": "gateway", "to": "users", "action": "allow"}]},
        }))
        .await;
    let spec = json!({
        "auth": {
            "rate_limits": [{"name": "global", "key": "route", "limit": {"requests": 100, "per": "1m"}}],
            "rate_limit_store": {"url": format!("redis://127.0.0.1:{}/0", redis.port), "fail": "closed", "timeout": "500ms"},
        },
        "routes": [{"name": "limited", "match": {"path": {"prefix": "/"}}, "rate_limit": "global", "backend": {"service": "users"}}],
        "discovery": {"static": {"users": [node.inbound().to_string()]}},
    });
    let gw1 = ca.gateway(spec.clone()).await;
    let gw2 = ca.gateway(spec).await;
    let mut allowed = 0;
    for i in 0..300 {
        let gw = if i % 2 == 0 { gw1.http() } else { gw2.http() };
        match plain(gw, "GET", "api.example", "/x", &[], b"").await.status {
            200 => allowed += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        (95..=105).contains(&allowed),
        "{allowed} allowed across two gateways for a shared limit of 100"
    );

    // Redis goes away: fail closed means 429, not an open door
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let got = plain(gw1.http(), "GET", "api.example", "/y", &[], b"").await;
    assert_eq!(got.status, 429, "{}", got.body);
    assert!(got.headers.contains_key("retry-after"));
}
