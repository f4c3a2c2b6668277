//! Edge authentication, authorization and rate limiting for a route, as one step of the
//! request path: credentials are checked once here (JWT via JWKS, API keys), the route's
//! requirements (scopes, claim values, consumer groups) are enforced, identity is injected into
//! headers the services can trust (the same headers were stripped on ingress), and the route's
//! rate limit is applied. Decisions are plain data; the only I/O is a JWKS refetch on an unknown
//! `kid`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_agent::http::respond::Problem;
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};

use crate::{
    apikey::{self, ApiKeyConfig, KeyStore},
    jwks::JwksCache,
    jwt::{JwtProviderConfig, KeySet, Validator, VerifiedToken},
    ratelimit::{self, Decision, KeySource, LimitConfig, MemoryStore, RateLimitPolicy},
    ratelimit_redis::{RedisConfig, RedisStore},
};

fn h_user() -> String {
    "X-User-Id".into()
}
fn h_scopes() -> String {
    "X-Scopes".into()
}
fn h_consumer() -> String {
    "X-Consumer".into()
}

/// Names of the identity headers injected after authentication.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeaders {
    /// The user (JWT `sub`, or the API key's consumer). Default `X-User-Id`.
    #[serde(default = "h_user")]
    pub user: String,
    /// Granted scopes, space-separated. Default `X-Scopes`.
    #[serde(default = "h_scopes")]
    pub scopes: String,
    /// The consumer name. Default `X-Consumer`.
    #[serde(default = "h_consumer")]
    pub consumer: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            user: h_user(),
            scopes: h_scopes(),
            consumer: h_consumer(),
        }
    }
}

/// `auth` in gateway.yaml: the credential sources routes can require.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// JWT providers.
    #[serde(default)]
    pub jwt: Vec<JwtProviderConfig>,
    /// API key consumers.
    #[serde(default)]
    pub api_keys: Option<ApiKeyConfig>,
    /// OAuth2 token introspection (RFC 7662) endpoints, for opaque tokens.
    #[serde(default)]
    pub introspection: Vec<crate::introspect::IntrospectionConfig>,
    /// PEM bundle trusted for `https` JWKS URIs; default: the system roots.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Identity header names.
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    /// Rate-limit policies routes refer to by name.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Keep rate-limit state in Redis so every gateway replica shares one limit (default: in
    /// memory, per replica). `fail: open|closed` decides what happens while Redis is away.
    #[serde(default)]
    pub rate_limit_store: Option<RedisConfig>,
    /// Which part of a verified client certificate names the consumer for `auth.mtls` routes.
    #[serde(default)]
    pub mtls_consumer_from: CertField,
}

/// A part of a client certificate.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    /// The subject common name (default).
    #[default]
    SubjectCn,
    /// The first DNS SAN.
    SanDns,
    /// The first URI SAN (e.g. a SPIFFE ID).
    SanUri,
    /// The first email SAN.
    SanEmail,
}

/// A route's `auth`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    /// JWT providers accepted (any one); empty with `api_key: false` means no authentication.
    #[serde(default)]
    pub jwt: Vec<String>,
    /// Accept API keys.
    #[serde(default)]
    pub api_key: bool,
    /// Introspection endpoints accepted for a bearer token (any one).
    #[serde(default)]
    pub introspection: Vec<String>,
    /// Accept a client certificate verified on the HTTPS listener (`client_auth`); the consumer
    /// is named by `auth.mtls_consumer_from`.
    #[serde(default)]
    pub mtls: bool,
    /// Scopes the credential must all carry (403 otherwise).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// JWT claims that must have these exact values (403 otherwise).
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// The API key consumer must be in one of these groups (403 otherwise).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Who the request is, once authenticated.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// JWT `sub` or the consumer name.
    pub user: Option<String>,
    /// Consumer name (API keys).
    pub consumer: Option<String>,
    /// Consumer tier (API keys), for per-tier limits.
    pub tier: Option<String>,
    /// Consumer groups.
    pub groups: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// The verified token, when JWT (shared with the token cache).
    pub token: Option<Arc<VerifiedToken>>,
    /// Hash of the API key used, when an API key (never the key itself).
    pub key_hash: Option<String>,
    /// Claim -> header mapping of the provider that verified the token.
    pub claims_to_headers: Arc<BTreeMap<String, String>>,
}

/// The compiled `auth` section.
#[derive(Debug)]
pub struct Auth {
    providers: BTreeMap<String, (Validator, Arc<JwksCache>, JwtProviderConfig, ProviderHot)>,
    tokens: TokenCache,
    keys: Option<(KeyStore, ApiKeyConfig)>,
    introspectors: BTreeMap<String, crate::introspect::Introspector>,
    headers: IdentityHeaders,
    cert_field: CertField,
    limits: BTreeMap<String, RateLimitPolicy>,
    stores: RateStores,
}

/// JWT checks by provider and result (`verified`: the signature was checked; `cache_hit`: a
/// token verified before was accepted from the cache).
pub type JwtChecks = Family<Vec<(&'static str, String)>, Counter>;

/// State that outlives a config reload: rate-limit stores (always a memory store; a Redis store
/// when configured) and the JWT check counters.
#[derive(Debug, Clone)]
pub struct RateStores {
    /// The in-memory store (used when there is no Redis).
    pub memory: Arc<MemoryStore>,
    /// The shared store.
    pub redis: Option<RedisStore>,
    /// `meshgate_gateway_jwt_checks_total{provider, result}`.
    pub jwt_checks: JwtChecks,
    /// `meshgate_gateway_rate_limit_decisions_total{route, policy, decision}`.
    pub rate_decisions: JwtChecks,
    /// `meshgate_gateway_auth_failures_total{route, reason}`.
    pub auth_failures: JwtChecks,
}

impl Auth {
    /// Counts a refused authentication on `route`: `missing` (no credentials), `expired`,
    /// `invalid` (bad or unknown credentials), `forbidden` (authenticated, but scopes, claims or
    /// groups do not match).
    pub fn auth_failed(&self, route: &str, p: &meshgate_agent::http::respond::Problem) {
        use meshgate_agent::http::respond::Problem;
        let reason = match p {
            Problem::Unauthorized { reason, .. } if reason.starts_with("missing") => "missing",
            Problem::Unauthorized { reason, .. } if reason.contains("expired") => "expired",
            Problem::Unauthorized { .. } => "invalid",
            Problem::Forbidden(_) => "forbidden",
            _ => "error",
        };
        self.stores
            .auth_failures
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// The (allowed, limited) decision counters of `policy` on `route`, resolved once when the
    /// route compiles.
    pub fn rate_decision_counters(
        &self,
        route: &str,
        policy: &str,
    ) -> (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    ) {
        let c = |decision: &str| {
            self.stores
                .rate_decisions
                .get_or_create(&vec![
                    ("route", route.to_owned()),
                    ("policy", policy.to_owned()),
                    ("decision", decision.to_owned()),
                ])
                .clone()
        };
        (c("allowed"), c("limited"))
    }
}

impl RateStores {
    /// Only a memory store.
    pub fn memory() -> Self {
        Self {
            memory: Arc::new(MemoryStore::new()),
            redis: None,
            jwt_checks: JwtChecks::default(),
            rate_decisions: JwtChecks::default(),
            auth_failures: JwtChecks::default(),
        }
    }
}

/// What a JWT check of a provider touches on every request, resolved when the config is
/// compiled (no label allocation or map clone per request).
#[derive(Debug)]
struct ProviderHot {
    claims_to_headers: Arc<BTreeMap<String, String>>,
    cache_hit: Counter,
    verified: Counter,
}

/// Most verified tokens kept.
const TOKEN_CACHE_ENTRIES: usize = 10_000;

/// A token verified before: kept until its `exp`, keyed by a hash of the provider and the
/// whole token.
#[derive(Debug, Clone)]
struct CachedToken {
    token: Arc<VerifiedToken>,
    /// The key set it was verified with (by address): a refresh that keeps its `kid` keeps
    /// the entry; one that drops it (or a key without `kid`) ends it.
    keys: usize,
}

/// Verified tokens, so a token is verified once until it expires. `exp` and `nbf` are still
/// checked against the clock on every hit, and an entry whose key left the provider's key set
/// is dropped.
#[derive(Debug, Default)]
struct TokenCache {
    entries: Mutex<HashMap<[u8; 32], CachedToken>>,
}

fn token_hash(provider: &str, token: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(provider.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl TokenCache {
    fn get(&self, hash: &[u8; 32], keys: &Arc<KeySet>) -> Option<Arc<VerifiedToken>> {
        let mut entries = self
            .entries
            .lock()
            .expect("invariant: cache lock not poisoned");
        let hit = entries.get_mut(hash)?;
        let now_keys = Arc::as_ptr(keys) as usize;
        if hit.keys != now_keys {
            match hit.token.kid.as_deref() {
                Some(kid) if keys.has_kid(kid) => hit.keys = now_keys,
                _ => {
                    entries.remove(hash);
                    return None;
                }
            }
        }
        Some(hit.token.clone())
    }

    fn insert(&self, hash: [u8; 32], token: &Arc<VerifiedToken>, keys: &Arc<KeySet>, now: u64) {
        let mut entries = self
            .entries
            .lock()
            .expect("invariant: cache lock not poisoned");
        if entries.len() >= TOKEN_CACHE_ENTRIES {
            // expired entries first; if the cache is still full, start over
            entries.retain(|_, e| {
                e.token
                    .claims
                    .get("exp")
                    .and_then(serde_json::Value::as_u64)
                    .is_some_and(|exp| exp > now)
            });
            if entries.len() >= TOKEN_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            hash,
            CachedToken {
                token: token.clone(),
                keys: Arc::as_ptr(keys) as usize,
            },
        );
    }

    fn remove(&self, hash: &[u8; 32]) {
        self.entries
            .lock()
            .expect("invariant: cache lock not poisoned")
            .remove(hash);
    }
}

fn unauthorized(scheme: &str, reason: &str) -> Problem {
    // RFC 6750 §3.1: a request without any credentials gets the challenge but no error code
    let missing = reason.starts_with("missing");
    let challenge = if scheme == "Bearer" && !missing {
        format!(
            "Bearer realm=\"meshgate\", error=\"invalid_token\", error_description=\"{reason}\""
        )
    } else {
        format!("{scheme} realm=\"meshgate\"")
    };
    Problem::Unauthorized {
        challenge,
        reason: reason.to_owned(),
    }
}

impl Auth {
    /// Compiles `cfg`; `caches` are the providers' JWKS caches (built and loaded by the caller).
    pub fn new(
        cfg: &AuthConfig,
        caches: &BTreeMap<String, Arc<JwksCache>>,
        stores: RateStores,
    ) -> Result<Self, String> {
        let mut providers = BTreeMap::new();
        for p in &cfg.jwt {
            let v = Validator::new(p).map_err(|e| format!("auth.jwt ({}): {e}", p.name))?;
            let cache = caches
                .get(&p.name)
                .cloned()
                .ok_or_else(|| format!("auth.jwt ({}): no key cache", p.name))?;
            let counter = |result: &str| {
                stores
                    .jwt_checks
                    .get_or_create(&vec![
                        ("provider", p.name.clone()),
                        ("result", result.to_owned()),
                    ])
                    .clone()
            };
            let hot = ProviderHot {
                claims_to_headers: Arc::new(p.claims_to_headers.clone()),
                cache_hit: counter("cache_hit"),
                verified: counter("verified"),
            };
            if providers
                .insert(p.name.clone(), (v, cache, p.clone(), hot))
                .is_some()
            {
                return Err(format!("auth.jwt: provider {} is listed twice", p.name));
            }
        }
        let keys = match &cfg.api_keys {
            Some(k) => {
                let mut consumers = k.consumers.clone();
                if let Some(path) = &k.consumers_file {
                    // a JSON list of consumers, kept apart from the config (e.g. mounted secret)
                    let data = std::fs::read(path).map_err(|e| {
                        format!("auth.api_keys.consumers_file {}: {e}", path.display())
                    })?;
                    let more: Vec<crate::apikey::Consumer> = serde_json::from_slice(&data).map_err(|e| {
                        format!("auth.api_keys.consumers_file {}: not a JSON list of consumers: {e}", path.display())
                    })?;
                    consumers.extend(more);
                }
                Some((
                    KeyStore::new(&consumers).map_err(|e| format!("auth.api_keys: {e}"))?,
                    k.clone(),
                ))
            }
            None => None,
        };
        let mut introspectors = BTreeMap::new();
        for i in &cfg.introspection {
            let x = crate::introspect::Introspector::new(i)
                .map_err(|e| format!("auth.introspection ({}): {e}", i.name))?;
            introspectors.insert(i.name.clone(), x);
        }
        if let Some(r) = &cfg.rate_limit_store {
            r.validate()
                .map_err(|e| format!("auth.rate_limit_store: {e}"))?;
        }
        let mut limits = BTreeMap::new();
        for l in &cfg.rate_limits {
            l.validate()
                .map_err(|e| format!("auth.rate_limits ({}): {e}", l.name))?;
            limits.insert(l.name.clone(), l.clone());
        }
        for h in [
            &cfg.identity_headers.user,
            &cfg.identity_headers.scopes,
            &cfg.identity_headers.consumer,
        ] {
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("auth.identity_headers: {h:?} is not a header name"))?;
        }
        Ok(Self {
            providers,
            tokens: TokenCache::default(),
            keys,
            introspectors,
            headers: cfg.identity_headers.clone(),
            cert_field: cfg.mtls_consumer_from,
            limits,
            stores,
        })
    }

    /// Checks that a route's `auth` and `rate_limit` name things that exist.
    pub fn check_route(
        &self,
        name: &str,
        auth: Option<&RouteAuth>,
        limit: Option<&str>,
    ) -> Result<(), String> {
        if let Some(a) = auth {
            for p in &a.jwt {
                if !self.providers.contains_key(p) {
                    return Err(format!(
                        "route {name}: auth.jwt names unknown provider {p:?}"
                    ));
                }
            }
            for i in &a.introspection {
                if !self.introspectors.contains_key(i) {
                    return Err(format!(
                        "route {name}: auth.introspection names unknown endpoint {i:?}"
                    ));
                }
            }
            if a.api_key && self.keys.is_none() {
                return Err(format!("route {name}: auth.api_key needs auth.api_keys"));
            }
        }
        if let Some(l) = limit
            && !self.limits.contains_key(l)
        {
            return Err(format!(
                "route {name}: rate_limit names unknown policy {l:?}"
            ));
        }
        Ok(())
    }

    /// Authenticates and authorizes; strips API keys when configured. `query` may be rewritten
    /// (API key removed). Errors are 401 or 403 problems that leak nothing.
    pub async fn authenticate(
        &self,
        route: &RouteAuth,
        headers: &mut HeaderMap,
        query: &mut String,
        client_cert: Option<&rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<Principal, Problem> {
        self.authenticate_counted(route, headers, query, client_cert, true)
            .await
    }

    /// [`Auth::authenticate`] for `meshgate why`: the same checks, without moving the JWT
    /// check counters (a question is not traffic).
    pub async fn authenticate_quietly(
        &self,
        route: &RouteAuth,
        headers: &mut HeaderMap,
        query: &mut String,
    ) -> Result<Principal, Problem> {
        self.authenticate_counted(route, headers, query, None, false)
            .await
    }

    async fn authenticate_counted(
        &self,
        route: &RouteAuth,
        headers: &mut HeaderMap,
        query: &mut String,
        client_cert: Option<&rustls_pki_types::CertificateDer<'static>>,
        count: bool,
    ) -> Result<Principal, Problem> {
        let wants_jwt = !route.jwt.is_empty();
        let mut principal = None;
        let mut failure = None;
        if route.mtls
            && let Some(cert) = client_cert
            && let Ok(info) = meshgate_ca::pki::CertInfo::from_der(cert)
        {
            let name = match self.cert_field {
                CertField::SubjectCn => info.common_name.clone(),
                CertField::SanDns => info.dns_names.first().cloned(),
                CertField::SanUri => info.uris.first().cloned(),
                CertField::SanEmail => info.emails.first().cloned(),
            };
            if let Some(name) = name {
                let known = self
                    .keys
                    .as_ref()
                    .and_then(|(store, _)| store.consumer(&name));
                principal = Some(Principal {
                    user: Some(name.clone()),
                    consumer: Some(name),
                    tier: known.and_then(|c| c.tier.clone()),
                    groups: known.map(|c| c.groups.clone()).unwrap_or_default(),
                    ..Principal::default()
                });
            }
        }
        if principal.is_none()
            && route.api_key
            && let Some((store, cfg)) = &self.keys
            && let Some(key) = apikey::extract(&cfg.locations, headers, query)
        {
            match store.lookup(&key) {
                Some(c) => {
                    principal = Some(Principal {
                        user: Some(c.name.clone()),
                        consumer: Some(c.name.clone()),
                        tier: c.tier.clone(),
                        groups: c.groups.clone(),
                        key_hash: Some(apikey::hash_key(&key)),
                        ..Principal::default()
                    });
                    if cfg.hide_from_upstream {
                        *query = apikey::hide(&cfg.locations, headers, query);
                    }
                }
                None => failure = Some(unauthorized("ApiKey", "invalid API key")),
            }
        }
        if principal.is_none() && wants_jwt {
            let mut last = None;
            for name in &route.jwt {
                let Some((validator, cache, _, hot)) = self.providers.get(name) else {
                    continue;
                };
                let token = match validator.extract(headers, query) {
                    Ok(t) => t,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let hash = token_hash(name, token);
                let keys = cache.keys();
                let cached = self.tokens.get(&hash, &keys).map(|t| {
                    let r = validator.check_time(&t, now).map(|()| t);
                    if r.is_err() {
                        self.tokens.remove(&hash);
                    }
                    r
                });
                // a `why` question is not traffic: it moves no check counter
                let tally = |c: &Counter| {
                    if count {
                        c.inc();
                    }
                };
                let result = match cached {
                    Some(r) => {
                        tally(&hot.cache_hit);
                        r
                    }
                    None => {
                        tally(&hot.verified);
                        let mut r = validator.validate(token, &keys, now);
                        if r.as_ref().is_err_and(|e| e.is_unknown_kid())
                            && cache.refetch_for_unknown_kid().await
                        {
                            tally(&hot.verified);
                            r = validator.validate(token, &cache.keys(), now);
                        }
                        // verified once; later requests with the token are cache hits
                        r.map(|t| {
                            let t = Arc::new(t);
                            self.tokens.insert(hash, &t, &cache.keys(), now);
                            t
                        })
                    }
                };
                match result {
                    Ok(t) => {
                        principal = Some(Principal {
                            user: t.claim_as_header_value("sub"),
                            scopes: t.scopes(),
                            claims_to_headers: hot.claims_to_headers.clone(),
                            token: Some(t),
                            ..Principal::default()
                        });
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if principal.is_none() {
                if matches!(last, Some(crate::jwt::JwtError::TooLarge)) {
                    // an oversized credential is a header-size problem, not a bad token
                    let limit = route
                        .jwt
                        .iter()
                        .filter_map(|n| self.providers.get(n))
                        .map(|(_, _, c, _)| c.max_token_bytes)
                        .max()
                        .unwrap_or(8192);
                    return Err(Problem::HeadersTooLarge { limit });
                }
                // no token at all is "missing" (a bare challenge), whichever way it was noticed
                let reason = match last {
                    None | Some(crate::jwt::JwtError::Missing) => "missing token".to_owned(),
                    Some(e) => e.to_string(),
                };
                failure = Some(unauthorized("Bearer", &reason));
            }
        }
        if principal.is_none() && !route.introspection.is_empty() {
            let token = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim().to_owned());
            match token {
                None => failure = Some(unauthorized("Bearer", "missing token")),
                Some(t) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    for name in &route.introspection {
                        let Some(x) = self.introspectors.get(name) else {
                            continue;
                        };
                        match x.introspect(&t, now).await {
                            Ok(info) => {
                                principal = Some(Principal {
                                    user: info.sub.clone(),
                                    scopes: info.scopes(),
                                    ..Principal::default()
                                });
                                break;
                            }
                            Err(crate::introspect::IntrospectError::TooLarge) => {
                                return Err(Problem::HeadersTooLarge { limit: 8192 });
                            }
                            Err(e) => failure = Some(unauthorized("Bearer", &e.to_string())),
                        }
                    }
                }
            }
        }
        let Some(p) = principal else {
            let scheme = if wants_jwt || !route.introspection.is_empty() {
                "Bearer"
            } else if route.api_key {
                "ApiKey"
            } else {
                "Certificate"
            };
            return Err(failure.unwrap_or_else(|| unauthorized(scheme, "missing credentials")));
        };
        for s in &route.scopes {
            if !p.scopes.contains(s) {
                return Err(Problem::Forbidden(format!("missing scope {s}")));
            }
        }
        for (claim, want) in &route.claims {
            let got = p
                .token
                .as_ref()
                .and_then(|t| t.claim_as_header_value(claim));
            if got.as_deref() != Some(want.as_str()) {
                return Err(Problem::Forbidden(format!(
                    "claim {claim} does not allow this route"
                )));
            }
        }
        if !route.groups.is_empty() && !route.groups.iter().any(|g| p.groups.contains(g)) {
            return Err(Problem::Forbidden(
                "consumer group not allowed on this route".into(),
            ));
        }
        Ok(p)
    }

    /// Every header this gateway injects (identity headers, and the claim headers of every
    /// provider): hygiene strips them from incoming requests in every spelling.
    pub fn identity_header_names(&self) -> Vec<HeaderName> {
        let mut out: Vec<HeaderName> = [
            &self.headers.user,
            &self.headers.scopes,
            &self.headers.consumer,
        ]
        .into_iter()
        .chain(
            self.providers
                .values()
                .flat_map(|(_, _, cfg, _)| cfg.claims_to_headers.values()),
        )
        .filter_map(|h| HeaderName::from_bytes(h.replace('_', "-").as_bytes()).ok())
        .collect();
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        out.dedup();
        out
    }

    /// Removes every header this gateway injects (identity headers and claim headers of every
    /// provider) from an incoming request, whatever `headers.strip` says: only the gateway may
    /// set them.
    pub fn strip_identity(&self, headers: &mut HeaderMap) {
        for h in [
            &self.headers.user,
            &self.headers.scopes,
            &self.headers.consumer,
        ] {
            headers.remove(h.as_str());
        }
        for (_, _, cfg, _) in self.providers.values() {
            for h in cfg.claims_to_headers.values() {
                headers.remove(h.as_str());
            }
        }
    }

    /// Sets the identity headers (only ever after successful authentication).
    pub fn inject(&self, p: &Principal, headers: &mut HeaderMap) {
        let mut set = |name: &str, value: &str| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.insert(n, v);
            }
        };
        if let Some(u) = &p.user {
            set(&self.headers.user, u);
        }
        if !p.scopes.is_empty() {
            set(&self.headers.scopes, &p.scopes.join(" "));
        }
        if let Some(c) = &p.consumer {
            set(&self.headers.consumer, c);
        }
        if let Some(t) = &p.token {
            for (claim, header) in p.claims_to_headers.iter() {
                if let Some(v) = t.claim_as_header_value(claim) {
                    set(header, &v);
                }
            }
        }
    }

    /// Whether rate-limit policy `name` keys on who the caller is (consumer, API key, a JWT
    /// claim), so it can only run after authentication. Policies keyed on the client address,
    /// a header or the route run before it: unauthenticated attempts count too (a brute-force
    /// guard), and the gateway's own 401s carry the RateLimit headers.
    pub fn rate_limit_needs_principal(&self, name: &str) -> bool {
        self.limits.get(name).is_some_and(|p| {
            matches!(
                p.key,
                KeySource::Consumer | KeySource::ApiKey | KeySource::Claim { .. }
            )
        })
    }

    /// The store key and the limit of policy `policy` for this request.
    fn rate_key<'a>(
        policy: &'a RateLimitPolicy,
        route: &str,
        p: Option<&Principal>,
        client_ip: std::net::IpAddr,
        headers: &HeaderMap,
    ) -> (String, &'a LimitConfig) {
        let part = match &policy.key {
            KeySource::Consumer => p
                .and_then(|p| p.consumer.clone().or_else(|| p.user.clone()))
                .unwrap_or_else(|| format!("ip:{client_ip}")),
            KeySource::ApiKey => p
                .and_then(|p| p.key_hash.clone())
                .unwrap_or_else(|| format!("ip:{client_ip}")),
            KeySource::ClientIp => client_ip.to_string(),
            KeySource::Route => route.to_owned(),
            KeySource::Claim { claim } => p
                .and_then(|p| p.token.as_ref())
                .and_then(|t| t.claim_as_header_value(claim))
                .unwrap_or_else(|| "-".into()),
            KeySource::Header { header } => headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned(),
        };
        let cfg = policy.limit_for(p.and_then(|p| p.tier.as_deref()));
        (format!("{}|{}|{part}", policy.name, route), cfg)
    }

    /// What policy `name` would decide for this request now, without counting it (`meshgate
    /// why`): the decision, the limit and the store asked; `None` for an unknown policy.
    pub async fn rate_limit_peek(
        &self,
        name: &str,
        route: &str,
        p: Option<&Principal>,
        client_ip: std::net::IpAddr,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Option<(Decision, LimitConfig, Result<&'static str, String>)> {
        let policy = self.limits.get(name)?;
        let (key, cfg) = Self::rate_key(policy, route, p, client_ip, headers);
        Some(match &self.stores.redis {
            Some(redis) => match redis.peek(&key, cfg, now_ms).await {
                Ok(d) => (d, cfg.clone(), Ok("redis")),
                Err(e) => (
                    redis.fail_mode().decision(cfg),
                    cfg.clone(),
                    Err(format!(
                        "the Redis store cannot be asked ({e}); fail mode {:?} applies",
                        redis.fail_mode()
                    )),
                ),
            },
            None => (
                self.stores.memory.peek(&key, cfg, now_ms),
                cfg.clone(),
                Ok("memory"),
            ),
        })
    }

    /// Where the gateway looks for an API key first (`meshgate why --api-key` puts it there);
    /// `None` when no API keys are configured.
    pub fn api_key_location(&self) -> Option<&crate::apikey::KeyLocation> {
        self.keys.as_ref().and_then(|(_, c)| c.locations.first())
    }

    /// Applies rate-limit policy `name`: Ok(headers to add to the response) or a 429 problem.
    pub async fn rate_limit(
        &self,
        name: &str,
        route: &str,
        p: Option<&Principal>,
        client_ip: std::net::IpAddr,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Problem> {
        let Some(policy) = self.limits.get(name) else {
            return Ok(Vec::new());
        };
        let (key, cfg) = Self::rate_key(policy, route, p, client_ip, headers);
        let d = match &self.stores.redis {
            Some(redis) => {
                let (d, err) = redis.check_or_fail_mode(&key, cfg, now_ms).await;
                if let Some(e) = err {
                    tracing::warn!(policy = %policy.name, error = %e, fail_mode = ?redis.fail_mode(), "rate-limit store unavailable; applying the fail mode");
                }
                d
            }
            None => self.stores.memory.check(&key, cfg, now_ms),
        };
        let out = ratelimit::headers(&policy.name, cfg, &d);
        if d.allowed {
            Ok(out)
        } else {
            let retry = d.retry_after_ms.unwrap_or(1000).div_ceil(1000).max(1);
            Err(Problem::TooManyRequests {
                retry_after_secs: retry,
                headers: out
                    .into_iter()
                    .filter(|(k, _)| k != http::header::RETRY_AFTER)
                    .collect(),
            })
        }
    }
}
