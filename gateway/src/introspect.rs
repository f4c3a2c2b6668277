//! OAuth2 token introspection (RFC 7662) for edge authentication of opaque access tokens.
//!
//! An [`Introspector`] asks one identity provider's introspection endpoint whether a bearer
//! token is active: a `POST` of `token=<token>&token_type_hint=access_token`
//! (`application/x-www-form-urlencoded`), authenticated with HTTP Basic as the gateway's
//! client (`client_id` and secret each form-urlencoded first, RFC 6749 §2.3.1), with
//! `Accept: application/json`. Redirects are not followed.
//!
//! Answers are cached in memory, keyed by the SHA-256 of the token (the token itself is never
//! stored, logged or shown in an error):
//!
//! - an active token is cached until `min(exp, now + cache_ttl)`;
//! - an inactive token (including one answered `active: true` with an `exp` already past) is
//!   cached for `negative_cache_ttl`;
//! - errors (endpoint unreachable, non-200 status, malformed answer) are never cached, so the
//!   next request asks again.
//!
//! The cache holds at most 100 000 entries; when full, expired entries go first, then the ones
//! closest to expiry. Concurrent requests for the same uncached token may each ask the
//! endpoint; that is harmless and not coalesced.
//!
//! # How the gateway answers
//!
//! Every [`IntrospectError`] denies the request with `401` and
//! `WWW-Authenticate: Bearer error="invalid_token"`: the edge fails closed and does not tell
//! the client whether the token was bad or the identity provider was unavailable (no `503`).
//! [`IntrospectError::Inactive`] and [`IntrospectError::TooLarge`] are ordinary client
//! failures (logged at `debug`); [`IntrospectError::Unreachable`],
//! [`IntrospectError::Status`] and [`IntrospectError::BadResponse`] are infrastructure
//! failures and are logged here at `warn` with the provider's name and the full cause.
//!
//! The endpoint must be `https`; `http` is accepted only for a loopback host (`localhost`,
//! `127.0.0.0/8`, `[::1]`), e.g. a sidecar IdP or tests. `ca_file` replaces the system roots
//! with a PEM bundle for the endpoint.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, warn};

/// The most cache entries an [`Introspector`] keeps.
const MAX_CACHE_ENTRIES: usize = 100_000;

/// The largest introspection response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

fn d_cache_ttl() -> Duration {
    Duration::from_secs(300)
}
fn d_negative_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn d_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_max_token_bytes() -> usize {
    8192
}

/// One introspection provider (an `introspection` entry of the gateway's `auth` config).
///
/// `Debug` shows `client_secret` only as redacted and `Serialize` leaves it out, so neither a
/// log line nor a dumped effective config carries the secret.
#[derive(Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The provider's name, used by routes and in logs.
    pub name: String,
    /// The RFC 7662 endpoint, e.g. `https://idp.example/oauth2/introspect`. `http` is allowed
    /// only for a loopback host.
    pub endpoint: String,
    /// The gateway's client id at the identity provider.
    pub client_id: String,
    /// The client secret inline. Exactly one of `client_secret` and `client_secret_file`.
    /// Never serialized.
    #[serde(default, skip_serializing)]
    pub client_secret: Option<String>,
    /// A file holding the client secret (read once at start; trailing line breaks and spaces
    /// are dropped). Exactly one of `client_secret` and `client_secret_file`.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// How long an active answer may be reused (never past the token's `exp`), in whole
    /// seconds. Default `5m`; `0s` disables positive caching.
    #[serde(default = "d_cache_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub cache_ttl: Duration,
    /// How long an inactive answer is reused, in whole seconds. Default `30s`; `0s` disables
    /// negative caching.
    #[serde(default = "d_negative_cache_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub negative_cache_ttl: Duration,
    /// The whole-request timeout (connect, TLS, answer). Default `5s`.
    #[serde(default = "d_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// PEM roots trusted for the endpoint instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Longer tokens are refused without asking the endpoint. Default 8192.
    #[serde(default = "d_max_token_bytes")]
    pub max_token_bytes: usize,
}

impl fmt::Debug for IntrospectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectionConfig")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("max_token_bytes", &self.max_token_bytes)
            .finish()
    }
}

/// An active token's introspection answer (RFC 7662 §2.2).
#[derive(Debug, Clone, PartialEq)]
pub struct Introspection {
    /// Always `true` for a returned value (inactive tokens are [`IntrospectError::Inactive`]).
    pub active: bool,
    /// The subject (`sub`).
    pub sub: Option<String>,
    /// The granted scopes, space-separated (`scope`).
    pub scope: Option<String>,
    /// The client the token was issued to (`client_id`).
    pub client_id: Option<String>,
    /// Expiry, seconds since the Unix epoch (`exp`).
    pub exp: Option<u64>,
    /// Every other member of the answer (`iss`, `aud`, `username`, custom claims…); the
    /// members above are not repeated here.
    pub claims: Map<String, Value>,
}

impl Introspection {
    /// The scopes in `scope`, split on spaces, empty entries dropped, in order.
    pub fn scopes(&self) -> Vec<String> {
        self.scope
            .as_deref()
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Parses an RFC 7662 answer. `Ok(None)` is an inactive token.
    fn parse(body: &[u8]) -> Result<Option<Self>, IntrospectError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|_| IntrospectError::BadResponse("not JSON".into()))?;
        let Value::Object(mut claims) = value else {
            return Err(IntrospectError::BadResponse("not a JSON object".into()));
        };
        let active = match claims.remove("active") {
            Some(Value::Bool(b)) => b,
            _ => {
                return Err(IntrospectError::BadResponse(
                    "`active` missing or not a boolean".into(),
                ));
            }
        };
        if !active {
            return Ok(None);
        }
        let sub = take_string(&mut claims, "sub")?;
        let scope = take_string(&mut claims, "scope")?;
        let client_id = take_string(&mut claims, "client_id")?;
        let exp = match claims.remove("exp") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => Some(u),
                // Some providers send a float; a fraction of a second does not matter here.
                (None, Some(f)) if f.is_finite() && f >= 0.0 => Some(f as u64),
                _ => return Err(IntrospectError::BadResponse("`exp` is negative".into())),
            },
            Some(_) => {
                return Err(IntrospectError::BadResponse("`exp` is not a number".into()));
            }
        };
        Ok(Some(Self {
            active,
            sub,
            scope,
            client_id,
            exp,
            claims,
        }))
    }
}

fn take_string(
    claims: &mut Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, IntrospectError> {
    match claims.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(IntrospectError::BadResponse(format!(
            "`{name}` is not a string"
        ))),
    }
}

/// Why a token was not accepted. `Display` is short and never contains the token; every
/// variant makes the gateway answer `401` (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectError {
    /// The provider says the token is not active (unknown, revoked, expired), or its `exp` has
    /// passed.
    #[error("token is not active")]
    Inactive,
    /// The token is longer than `max_token_bytes`; the provider was not asked.
    #[error("token is too large")]
    TooLarge,
    /// The endpoint could not be reached: the reason is `dns`, `tcp`, `tls`, `timeout` or
    /// `body` (the answer broke off). Logged at `warn`; the request still gets `401`.
    #[error("introspection endpoint unreachable ({0})")]
    Unreachable(String),
    /// The endpoint answered with this non-200 status (`401` when the gateway's client
    /// credentials are wrong). Logged at `warn`.
    #[error("introspection endpoint answered HTTP {0}")]
    Status(u16),
    /// The endpoint's answer was not a valid RFC 7662 response; the text says what was wrong
    /// (never the body). Logged at `warn`.
    #[error("bad introspection response: {0}")]
    BadResponse(String),
}

/// A cached answer: an active token, or `None` for an inactive one.
#[derive(Debug)]
struct Entry {
    /// Valid while `now_unix < until`.
    until: u64,
    answer: Option<Arc<Introspection>>,
}

struct Inner {
    name: String,
    endpoint: reqwest::Url,
    client_id: String,
    /// `Authorization` user and password, each already form-urlencoded.
    basic_user: String,
    basic_password: String,
    http: reqwest::Client,
    cache_ttl: u64,
    negative_cache_ttl: u64,
    max_token_bytes: usize,
    max_entries: usize,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

/// Introspects tokens at one provider and caches the answers. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Introspector {
    inner: Arc<Inner>,
}

impl fmt::Debug for Introspector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspector")
            .field("name", &self.inner.name)
            .field("endpoint", &self.inner.endpoint.as_str())
            .field("client_id", &self.inner.client_id)
            .field("cached", &self.cached())
            .finish_non_exhaustive()
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (WHATWG URL, as RFC 6749
/// Appendix B asks): `*-._` and alphanumerics kept, space as `+`, everything else `%XX`.
fn form_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
    out
}

/// Checks the endpoint: `https`, or `http` to a loopback host; no credentials or fragment.
fn parse_endpoint(endpoint: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("endpoint: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "endpoint: must not carry credentials (use client_id and client_secret)".into(),
        );
    }
    if url.fragment().is_some() {
        return Err("endpoint: must not have a #fragment".into());
    }
    let host = url
        .host_str()
        .ok_or_else(|| "endpoint: has no host".to_owned())?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(host) => Ok(url),
        "http" => Err(format!(
            "endpoint: http is allowed only for a loopback host, not {host:?}; use https"
        )),
        other => Err(format!("endpoint: scheme {other:?} is not https")),
    }
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads the client secret from a file, without trailing line breaks or spaces.
fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("client_secret_file {}: {e}", path.display()))?;
    Ok(raw.trim_end().to_owned())
}

/// A rustls client config trusting only the PEM certificates in `path`.
fn tls_config(path: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificates found",
            path.display()
        ));
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("ca_file: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // A preconfigured rustls config keeps its own ALPN list: offer what reqwest would.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// Names a transport failure for logs and [`IntrospectError::Unreachable`].
fn classify(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    let chain = chain(e).to_ascii_lowercase();
    if chain.contains("timed out") || chain.contains("timeout") {
        "timeout"
    } else if chain.contains("dns")
        || chain.contains("failed to lookup")
        || chain.contains("name or service not known")
    {
        "dns"
    } else if chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake")
    {
        "tls"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "tcp"
    }
}

/// The full cause chain of an error, for the log line.
fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A TTL in whole seconds (rounded down: never cache longer than configured).
fn secs(d: Duration) -> u64 {
    d.as_secs()
}

impl Introspector {
    /// Validates `cfg` and builds the HTTP client. Reads `client_secret_file` (once) and
    /// `ca_file` now. The error names the provider and the problem, never the secret.
    pub fn new(cfg: &IntrospectionConfig) -> Result<Introspector, String> {
        Self::build(cfg, MAX_CACHE_ENTRIES)
    }

    fn build(cfg: &IntrospectionConfig, max_entries: usize) -> Result<Introspector, String> {
        let name = &cfg.name;
        let fail = |e: String| format!("introspection {name:?}: {e}");
        if name.trim().is_empty() {
            return Err("introspection: name is empty".into());
        }
        let endpoint = parse_endpoint(&cfg.endpoint).map_err(fail)?;
        if cfg.client_id.is_empty() {
            return Err(fail("client_id is empty".into()));
        }
        let secret = match (&cfg.client_secret, &cfg.client_secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(p)) => read_secret_file(p).map_err(fail)?,
            _ => {
                return Err(fail(
                    "set exactly one of client_secret and client_secret_file".into(),
                ));
            }
        };
        if secret.is_empty() {
            return Err(fail("the client secret is empty".into()));
        }
        if cfg.timeout.is_zero() {
            return Err(fail("timeout must be positive".into()));
        }
        if cfg.max_token_bytes == 0 {
            return Err(fail("max_token_bytes must be positive".into()));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &cfg.ca_file {
            builder = builder.tls_backend_preconfigured(tls_config(ca).map_err(fail)?);
        }
        let http = builder
            .build()
            .map_err(|e| fail(format!("http client: {e}")))?;
        Ok(Introspector {
            inner: Arc::new(Inner {
                name: name.clone(),
                endpoint,
                client_id: cfg.client_id.clone(),
                basic_user: form_urlencode(&cfg.client_id),
                basic_password: form_urlencode(&secret),
                http,
                cache_ttl: secs(cfg.cache_ttl),
                negative_cache_ttl: secs(cfg.negative_cache_ttl),
                max_token_bytes: cfg.max_token_bytes,
                max_entries: max_entries.max(1),
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Whether `token` is active, from the cache or the endpoint. `now_unix` is the current
    /// time in seconds since the Unix epoch; it decides cache expiry and whether `exp` has
    /// passed. An empty token is [`IntrospectError::Inactive`] without asking.
    pub async fn introspect(
        &self,
        token: &str,
        now_unix: u64,
    ) -> Result<Introspection, IntrospectError> {
        let inner = &*self.inner;
        if token.len() > inner.max_token_bytes {
            debug!(provider = %inner.name, len = token.len(), "token too large for introspection");
            return Err(IntrospectError::TooLarge);
        }
        if token.is_empty() {
            return Err(IntrospectError::Inactive);
        }
        let key = token_key(token);
        if let Some(hit) = self.lookup(&key, now_unix) {
            return match hit {
                Some(i) => Ok((*i).clone()),
                None => Err(IntrospectError::Inactive),
            };
        }
        match self.ask(token).await {
            Ok(Some(i)) if i.exp.is_none_or(|exp| exp > now_unix) => {
                let until = now_unix.saturating_add(inner.cache_ttl);
                let until = i.exp.map_or(until, |exp| exp.min(until));
                self.store(key, until, Some(Arc::new(i.clone())), now_unix);
                Ok(i)
            }
            Ok(_) => {
                debug!(provider = %inner.name, token_id = %token_id(&key), "token not active");
                let until = now_unix.saturating_add(inner.negative_cache_ttl);
                self.store(key, until, None, now_unix);
                Err(IntrospectError::Inactive)
            }
            Err(e) => Err(e),
        }
    }

    /// How many answers the cache holds (expired ones not yet purged included).
    pub fn cached(&self) -> usize {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn lookup(&self, key: &[u8; 32], now_unix: u64) -> Option<Option<Arc<Introspection>>> {
        let cache = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|e| now_unix < e.until)
            .map(|e| e.answer.clone())
    }

    fn store(&self, key: [u8; 32], until: u64, answer: Option<Arc<Introspection>>, now_unix: u64) {
        if until <= now_unix {
            // Zero TTL: not cacheable; drop any stale entry.
            self.inner
                .cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
            return;
        }
        let max = self.inner.max_entries;
        let mut cache = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= max && !cache.contains_key(&key) {
            cache.retain(|_, e| now_unix < e.until);
            // Still nearly full: drop the entries closest to expiry down to 90 %, so the
            // next purge is a tenth of the cap away.
            let target = max - max / 10;
            let target = target.min(max.saturating_sub(1));
            if cache.len() > target {
                let mut order: Vec<(u64, [u8; 32])> =
                    cache.iter().map(|(k, e)| (e.until, *k)).collect();
                let excess = cache.len() - target;
                order.select_nth_unstable(excess - 1);
                for (_, k) in &order[..excess] {
                    cache.remove(k);
                }
            }
        }
        cache.insert(key, Entry { until, answer });
    }

    /// One call to the endpoint. `Ok(None)` is an inactive token.
    async fn ask(&self, token: &str) -> Result<Option<Introspection>, IntrospectError> {
        let inner = &*self.inner;
        let body = format!(
            "token={}&token_type_hint=access_token",
            form_urlencode(token)
        );
        let sent = inner
            .http
            .post(inner.endpoint.clone())
            .basic_auth(&inner.basic_user, Some(&inner.basic_password))
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return Err(self.unreachable(&e)),
        };
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            warn!(provider = %inner.name, endpoint = %inner.endpoint, status = status.as_u16(), "introspection endpoint answered an error status; denying");
            return Err(IntrospectError::Status(status.as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(self.bad("answer too large"));
        }
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(self.bad("answer too large"));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.unreachable(&e)),
            }
        }
        Introspection::parse(&bytes).inspect_err(|e| {
            if let IntrospectError::BadResponse(why) = e {
                warn!(provider = %inner.name, endpoint = %inner.endpoint, reason = %why, "bad introspection response; denying");
            }
        })
    }

    fn unreachable(&self, e: &reqwest::Error) -> IntrospectError {
        let reason = classify(e);
        warn!(provider = %self.inner.name, endpoint = %self.inner.endpoint, reason, detail = %chain(e), "introspection endpoint unreachable; denying");
        IntrospectError::Unreachable(reason.to_owned())
    }

    fn bad(&self, why: &str) -> IntrospectError {
        warn!(provider = %self.inner.name, endpoint = %self.inner.endpoint, reason = why, "bad introspection response; denying");
        IntrospectError::BadResponse(why.to_owned())
    }
}

/// The cache key: SHA-256 of the token.
fn token_key(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// A short, non-reversible token identifier for logs: the first 8 bytes of its SHA-256, hex.
fn token_id(key: &[u8; 32]) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Incoming, service::service_fn};
    use hyper_util::rt::TokioIo;

    const CLIENT_ID: &str = "gate way:1";
    const SECRET: &str = "p@ss word:+/%";
    /// RFC 6749 §2.3.1: each part form-urlencoded, then `user:password` in base64.
    const ENCODED_CREDENTIALS: &str = "gate+way%3A1:p%40ss+word%3A%2B%2F%25";
    const SPECIAL_TOKEN: &str = "a+b/c=d e&f%";

    fn base64(input: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn form_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii hex");
                    out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).expect("utf-8")
    }

    fn form_fields(body: &str) -> HashMap<String, String> {
        body.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (form_decode(k), form_decode(v)))
            .collect()
    }

    fn reply(status: u16, body: &str) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("response")
    }

    /// The IdP's answer for one request.
    fn answer(req_parts: &http::request::Parts, body: &str) -> Response<Full<Bytes>> {
        let expected_auth = format!("Basic {}", base64(ENCODED_CREDENTIALS.as_bytes()));
        if req_parts.method != http::Method::POST || req_parts.uri.path() != "/introspect" {
            return reply(404, "{}");
        }
        if req_parts.headers.get("authorization").map(|v| v.as_bytes())
            != Some(expected_auth.as_bytes())
        {
            return reply(401, r#"{"error":"invalid_client"}"#);
        }
        if req_parts.headers.get("accept").map(|v| v.as_bytes()) != Some(b"application/json")
            || req_parts.headers.get("content-type").map(|v| v.as_bytes())
                != Some(b"application/x-www-form-urlencoded")
        {
            return reply(400, r#"{"error":"invalid_request"}"#);
        }
        let fields = form_fields(body);
        if fields.get("token_type_hint").map(String::as_str) != Some("access_token")
            || fields.len() != 2
        {
            return reply(400, r#"{"error":"invalid_request"}"#);
        }
        let token = fields.get("token").map(String::as_str).unwrap_or_default();
        match token {
            "tok-active" => reply(
                200,
                r#"{"active":true,"sub":"alice","scope":"read  write admin","client_id":"web","exp":2000,"iss":"https://idp.test","aud":"api","tier":"gold"}"#,
            ),
            "tok-expiring" => reply(200, r#"{"active":true,"sub":"bob","exp":1100}"#),
            "tok-past" => reply(200, r#"{"active":true,"sub":"carol","exp":500}"#),
            "tok-noexp" => reply(200, r#"{"active":true,"sub":"dave","exp":1500.5}"#),
            "tok-redirect" => Response::builder()
                .status(302)
                .header("location", "http://127.0.0.1:1/elsewhere")
                .body(Full::new(Bytes::new()))
                .expect("response"),
            SPECIAL_TOKEN => reply(200, r#"{"active":true,"sub":"special"}"#),
            t if t.starts_with("garbage") => reply(200, "<html>oops</html>"),
            t if t.starts_with("badtype") => reply(200, r#"{"active":"yes"}"#),
            _ => reply(200, r#"{"active":false}"#),
        }
    }

    struct Idp {
        addr: SocketAddr,
        calls: Arc<AtomicUsize>,
    }

    async fn idp() -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let counter = counter.clone();
                        async move {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.expect("request body").to_bytes();
                            let body = String::from_utf8(body.to_vec()).expect("utf-8");
                            Ok::<_, Infallible>(answer(&parts, &body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Idp { addr, calls }
    }

    impl Idp {
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn cfg(&self) -> IntrospectionConfig {
            cfg_for(format!("http://{}/introspect", self.addr))
        }
    }

    fn cfg_for(endpoint: String) -> IntrospectionConfig {
        IntrospectionConfig {
            name: "idp".into(),
            endpoint,
            client_id: CLIENT_ID.into(),
            client_secret: Some(SECRET.into()),
            client_secret_file: None,
            cache_ttl: Duration::from_secs(300),
            negative_cache_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            ca_file: None,
            max_token_bytes: 64,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("introspect-test-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn active_token_gives_claims_and_is_cached() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        let got = i
            .introspect("tok-active", 1000)
            .await
            .expect("active token");
        assert!(got.active);
        assert_eq!(got.sub.as_deref(), Some("alice"));
        assert_eq!(got.client_id.as_deref(), Some("web"));
        assert_eq!(got.exp, Some(2000));
        assert_eq!(got.scopes(), vec!["read", "write", "admin"]);
        assert_eq!(
            got.claims.get("iss"),
            Some(&Value::from("https://idp.test"))
        );
        assert_eq!(got.claims.get("tier"), Some(&Value::from("gold")));
        assert!(!got.claims.contains_key("active"));
        assert!(!got.claims.contains_key("sub"));
        assert_eq!(idp.calls(), 1);
        assert_eq!(i.cached(), 1);

        // Served from the cache, also through a clone (shared state).
        let again = i
            .clone()
            .introspect("tok-active", 1200)
            .await
            .expect("active token");
        assert_eq!(again, got);
        assert_eq!(idp.calls(), 1);

        // Past now + cache_ttl (1000 + 300): asked again.
        i.introspect("tok-active", 1300)
            .await
            .expect("active token");
        assert_eq!(idp.calls(), 2);
    }

    #[tokio::test]
    async fn inactive_token_is_negative_cached() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        assert_eq!(
            i.introspect("tok-unknown", 1000).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(
            i.introspect("tok-unknown", 1029).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(idp.calls(), 1);
        // negative_cache_ttl (30 s) over: asked again.
        assert_eq!(
            i.introspect("tok-unknown", 1030).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(idp.calls(), 2);
    }

    #[tokio::test]
    async fn cache_honours_exp() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        let got = i
            .introspect("tok-expiring", 1000)
            .await
            .expect("active token");
        assert_eq!(got.sub.as_deref(), Some("bob"));
        i.introspect("tok-expiring", 1099)
            .await
            .expect("active token");
        assert_eq!(idp.calls(), 1);
        // exp (1100) reached before now + cache_ttl: the IdP is asked again, and its
        // `active: true` with a past exp counts as inactive (and is negative-cached).
        assert_eq!(
            i.introspect("tok-expiring", 1100).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(idp.calls(), 2);
        assert_eq!(
            i.introspect("tok-expiring", 1101).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(idp.calls(), 2);

        // Active with exp already past on the first ask.
        assert_eq!(
            i.introspect("tok-past", 1000).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(
            i.introspect("tok-past", 1001).await,
            Err(IntrospectError::Inactive)
        );
        assert_eq!(idp.calls(), 3);

        // A float exp is accepted (rounded down).
        let f = i.introspect("tok-noexp", 1000).await.expect("active token");
        assert_eq!(f.exp, Some(1500));
    }

    #[tokio::test]
    async fn zero_ttls_disable_caching() {
        let idp = idp().await;
        let mut cfg = idp.cfg();
        cfg.cache_ttl = Duration::ZERO;
        cfg.negative_cache_ttl = Duration::ZERO;
        let i = Introspector::new(&cfg).expect("valid config");
        i.introspect("tok-active", 1000)
            .await
            .expect("active token");
        i.introspect("tok-active", 1000)
            .await
            .expect("active token");
        let _ = i.introspect("tok-unknown", 1000).await;
        let _ = i.introspect("tok-unknown", 1000).await;
        assert_eq!(idp.calls(), 4);
        assert_eq!(i.cached(), 0);
    }

    #[tokio::test]
    async fn token_is_form_encoded() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        let got = i
            .introspect(SPECIAL_TOKEN, 1000)
            .await
            .expect("active token");
        assert_eq!(got.sub.as_deref(), Some("special"));
        assert_eq!(got.exp, None);
        assert!(got.scopes().is_empty());
    }

    #[tokio::test]
    async fn wrong_secret_is_status_401_and_not_cached() {
        let idp = idp().await;
        let mut cfg = idp.cfg();
        cfg.client_secret = Some("wrong".into());
        let i = Introspector::new(&cfg).expect("valid config");
        assert_eq!(
            i.introspect("tok-active", 1000).await,
            Err(IntrospectError::Status(401))
        );
        assert_eq!(
            i.introspect("tok-active", 1000).await,
            Err(IntrospectError::Status(401))
        );
        assert_eq!(idp.calls(), 2);
        assert_eq!(i.cached(), 0);
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        assert_eq!(
            i.introspect("tok-redirect", 1000).await,
            Err(IntrospectError::Status(302))
        );
        assert_eq!(idp.calls(), 1);
    }

    #[tokio::test]
    async fn bad_responses() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        assert_eq!(
            i.introspect("garbage", 1000).await,
            Err(IntrospectError::BadResponse("not JSON".into()))
        );
        assert!(matches!(
            i.introspect("badtype", 1000).await,
            Err(IntrospectError::BadResponse(_))
        ));
        assert_eq!(i.cached(), 0);
        for (body, ok) in [
            (r#"{"active":false,"sub":1}"#, true),
            (r#"{"active":true,"sub":1}"#, false),
            (r#"{"active":true,"exp":-3}"#, false),
            (r#"{"active":true,"exp":"soon"}"#, false),
            (r#"[true]"#, false),
            (r#"{"active":true,"sub":null}"#, true),
        ] {
            assert_eq!(Introspection::parse(body.as_bytes()).is_ok(), ok, "{body}");
        }
    }

    #[tokio::test]
    async fn idp_down_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            l.local_addr().expect("local addr").port()
        };
        let i = Introspector::new(&cfg_for(format!("http://127.0.0.1:{port}/introspect")))
            .expect("valid config");
        assert_eq!(
            i.introspect("tok-active", 1000).await,
            Err(IntrospectError::Unreachable("tcp".into()))
        );
        assert_eq!(i.cached(), 0);
    }

    #[tokio::test]
    async fn slow_idp_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut cfg = cfg_for(format!("http://{addr}/introspect"));
        cfg.timeout = Duration::from_millis(200);
        let i = Introspector::new(&cfg).expect("valid config");
        assert_eq!(
            i.introspect("tok-active", 1000).await,
            Err(IntrospectError::Unreachable("timeout".into()))
        );
    }

    #[tokio::test]
    async fn too_large_token_is_refused_without_asking() {
        let idp = idp().await;
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        let big = "x".repeat(65);
        assert_eq!(
            i.introspect(&big, 1000).await,
            Err(IntrospectError::TooLarge)
        );
        assert_eq!(i.introspect("", 1000).await, Err(IntrospectError::Inactive));
        assert_eq!(idp.calls(), 0);
        // Exactly the limit is fine.
        let _ = i.introspect(&"x".repeat(64), 1000).await;
        assert_eq!(idp.calls(), 1);
    }

    #[tokio::test]
    async fn errors_never_show_the_token() {
        let idp = idp().await;
        let token = "garbage-SeCrEtToKeN";
        let i = Introspector::new(&idp.cfg()).expect("valid config");
        let mut wrong = idp.cfg();
        wrong.client_secret = Some("nope".into());
        let wrong = Introspector::new(&wrong).expect("valid config");
        let down = Introspector::new(&cfg_for("http://127.0.0.1:1/introspect".into()))
            .expect("valid config");
        let errors = vec![
            i.introspect(token, 1000).await.expect_err("an error"),
            i.introspect("tok-unknown-SeCrEtToKeN", 1000)
                .await
                .expect_err("an error"),
            i.introspect(&format!("{token}{}", "x".repeat(64)), 1000)
                .await
                .expect_err("an error"),
            wrong.introspect(token, 1000).await.expect_err("an error"),
            down.introspect(token, 1000).await.expect_err("an error"),
        ];
        for e in &errors {
            for text in [e.to_string(), format!("{e:?}")] {
                assert!(!text.contains("SeCrEtToKeN"), "{text}");
                assert!(!text.contains(SECRET), "{text}");
                assert!(text.len() < 80, "{text}");
            }
        }
    }

    #[test]
    fn debug_and_serialize_hide_the_secret() {
        let cfg = cfg_for("https://idp.example/oauth2/introspect".into());
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let json = serde_json::to_string(&cfg).expect("serializable");
        assert!(!json.contains(SECRET), "{json}");
        assert!(!json.contains("client_secret\""), "{json}");

        let i = Introspector::new(&cfg).expect("valid config");
        let dbg = format!("{i:?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(!dbg.contains(ENCODED_CREDENTIALS), "{dbg}");
        assert!(!dbg.contains("p%40ss"), "{dbg}");
        assert!(dbg.contains("idp.example"), "{dbg}");
    }

    #[test]
    fn config_serde_defaults_and_schema() {
        let cfg: IntrospectionConfig = serde_json::from_value(serde_json::json!({
            "name": "corp",
            "endpoint": "https://idp.example/oauth2/introspect",
            "client_id": "gw",
            "client_secret": "s",
        }))
        .expect("valid config");
        assert_eq!(cfg.cache_ttl, Duration::from_secs(300));
        assert_eq!(cfg.negative_cache_ttl, Duration::from_secs(30));
        assert_eq!(cfg.timeout, Duration::from_secs(5));
        assert_eq!(cfg.max_token_bytes, 8192);
        assert_eq!(cfg.ca_file, None);
        assert_eq!(cfg.client_secret_file, None);

        let tuned: IntrospectionConfig = serde_json::from_value(serde_json::json!({
            "name": "corp",
            "endpoint": "https://idp.example/oauth2/introspect",
            "client_id": "gw",
            "client_secret_file": "/run/secrets/introspect",
            "cache_ttl": "1m 30s",
            "negative_cache_ttl": "5s",
            "timeout": "750ms",
        }))
        .expect("valid config");
        assert_eq!(tuned.cache_ttl, Duration::from_secs(90));
        assert_eq!(tuned.timeout, Duration::from_millis(750));
        let back: serde_json::Value = serde_json::to_value(&tuned).expect("serializable");
        assert_eq!(back["cache_ttl"], "1m 30s");
        let again: IntrospectionConfig = serde_json::from_value(back).expect("round trip");
        assert_eq!(again, tuned);

        let unknown = serde_json::from_value::<IntrospectionConfig>(serde_json::json!({
            "name": "corp",
            "endpoint": "https://idp.example/oauth2/introspect",
            "client_id": "gw",
            "client_secret": "s",
            "cache_tll": "1m",
        }));
        assert!(unknown.is_err());

        let schema =
            serde_json::to_value(schemars::schema_for!(IntrospectionConfig)).expect("serializable");
        let props = &schema["properties"];
        assert_eq!(props["cache_ttl"]["type"], "string");
        assert!(props.get("client_secret_file").is_some());
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn config_validation() {
        let ok = cfg_for("https://idp.example/introspect".into());
        assert!(Introspector::new(&ok).is_ok());
        for endpoint in [
            "http://127.0.0.1:8080/introspect",
            "http://127.9.9.9/introspect",
            "http://localhost/introspect",
            "http://[::1]:9000/introspect",
        ] {
            assert!(
                Introspector::new(&cfg_for(endpoint.into())).is_ok(),
                "{endpoint}"
            );
        }
        for endpoint in [
            "http://idp.example/introspect",
            "http://10.0.0.1/introspect",
            "http://localhost.evil.example/introspect",
            "ftp://idp.example/introspect",
            "https://user:pw@idp.example/introspect",
            "https://idp.example/introspect#x",
            "not a url",
        ] {
            let e = Introspector::new(&cfg_for(endpoint.into())).expect_err("an error");
            assert!(e.contains("endpoint"), "{endpoint}: {e}");
        }

        let mut both = ok.clone();
        both.client_secret_file = Some("/nonexistent".into());
        let mut neither = ok.clone();
        neither.client_secret = None;
        let mut empty = ok.clone();
        empty.client_secret = Some(String::new());
        let mut no_id = ok.clone();
        no_id.client_id.clear();
        let mut zero_timeout = ok.clone();
        zero_timeout.timeout = Duration::ZERO;
        let mut zero_max = ok.clone();
        zero_max.max_token_bytes = 0;
        let mut missing_file = ok.clone();
        missing_file.client_secret = None;
        missing_file.client_secret_file = Some(temp_path("missing"));
        let mut missing_ca = ok.clone();
        missing_ca.ca_file = Some(temp_path("missing-ca"));
        for bad in [
            both,
            neither,
            empty,
            no_id,
            zero_timeout,
            zero_max,
            missing_file,
            missing_ca,
        ] {
            let e = Introspector::new(&bad).expect_err("an error");
            assert!(e.contains("\"idp\""), "{e}");
            assert!(!e.contains(SECRET), "{e}");
        }

        let not_pem = temp_path("not-pem");
        std::fs::write(&not_pem, "hello\n").expect("write temp file");
        let mut cfg = ok.clone();
        cfg.ca_file = Some(not_pem.clone());
        let e = Introspector::new(&cfg).expect_err("an error");
        assert!(e.contains("no PEM certificates"), "{e}");
        std::fs::remove_file(not_pem).expect("remove temp file");
    }

    #[tokio::test]
    async fn secret_file_is_read_once() {
        let idp = idp().await;
        let path = temp_path("secret");
        std::fs::write(&path, format!("{SECRET}\n")).expect("write temp file");
        let mut cfg = idp.cfg();
        cfg.client_secret = None;
        cfg.client_secret_file = Some(path.clone());
        let i = Introspector::new(&cfg).expect("valid config");
        std::fs::remove_file(&path).expect("remove temp file");
        let got = i
            .introspect("tok-active", 1000)
            .await
            .expect("active token");
        assert_eq!(got.sub.as_deref(), Some("alice"));
    }

    #[test]
    fn form_urlencoding() {
        assert_eq!(form_urlencode("azAZ09*-._"), "azAZ09*-._");
        assert_eq!(form_urlencode("a b+c/d=e&f%~"), "a+b%2Bc%2Fd%3De%26f%25%7E");
        assert_eq!(form_urlencode("é"), "%C3%A9");
        assert_eq!(
            format!("{}:{}", form_urlencode(CLIENT_ID), form_urlencode(SECRET)),
            ENCODED_CREDENTIALS
        );
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn cache_is_bounded_and_evicts_expired_first() {
        let cfg = cfg_for("https://idp.example/introspect".into());
        let i = Introspector::build(&cfg, 10).expect("valid config");
        let answer = |sub: &str| {
            Some(Arc::new(Introspection {
                active: true,
                sub: Some(sub.into()),
                scope: None,
                client_id: None,
                exp: None,
                claims: Map::new(),
            }))
        };
        // A long-lived active entry and nine short negative ones.
        i.store(token_key("keep"), 5000, answer("keep"), 1000);
        for n in 0..9 {
            i.store(token_key(&format!("neg{n}")), 1030, None, 1000);
        }
        assert_eq!(i.cached(), 10);
        // Full at 1040: the expired ones go, the live one stays.
        i.store(token_key("new"), 1070, None, 1040);
        assert_eq!(i.cached(), 2);
        assert!(i.lookup(&token_key("keep"), 1040).is_some());
        // Many live entries: never above the cap, and the longest-lived survive.
        for n in 0..50u64 {
            i.store(token_key(&format!("live{n}")), 2000 + n, None, 1040);
            assert!(i.cached() <= 10);
        }
        assert!(i.lookup(&token_key("keep"), 1040).is_some());
        assert!(i.lookup(&token_key("live49"), 1040).is_some());
        assert!(i.lookup(&token_key("live0"), 1040).is_none());
    }

    /// A throwaway self-signed certificate for `localhost` and 127.0.0.1, made per test run
    /// (no key material is committed): (certificate PEM, key PEM).
    fn test_pki() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("test key");
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("test params");
        let cert = params.self_signed(&key).expect("test certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A one-connection-at-a-time HTTPS IdP on a std thread (rustls server side), answering
    /// `{"active":true,"sub":"tls-user"}` to every well-formed request.
    fn tls_idp(cert_pem: &str, key_pem: &str) -> SocketAddr {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        use std::io::{Read, Write};
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("test PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("test PEM");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("server TLS config")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server TLS config");
        let server = Arc::new(server);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for stream in listener.incoming().take(4) {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let conn =
                    rustls::ServerConnection::new(server.clone()).expect("server connection");
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let complete = loop {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break false,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break true;
                        }
                    }
                };
                if complete {
                    let body = r#"{"active":true,"sub":"tls-user"}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_endpoint_with_ca_file() {
        let (cert_pem, key_pem) = test_pki();
        let addr = tls_idp(&cert_pem, &key_pem);
        let ca = temp_path("ca.pem");
        std::fs::write(&ca, &cert_pem).expect("write temp file");
        let mut cfg = cfg_for(format!("https://localhost:{}/introspect", addr.port()));
        cfg.ca_file = Some(ca.clone());
        let i = Introspector::new(&cfg).expect("valid config");
        std::fs::remove_file(&ca).expect("remove temp file");
        let got = i.introspect("tok-tls", 1000).await.expect("active token");
        assert_eq!(got.sub.as_deref(), Some("tls-user"));

        // Without the CA (system roots), the self-signed endpoint is refused.
        let plain = Introspector::new(&cfg_for(format!(
            "https://localhost:{}/introspect",
            addr.port()
        )))
        .expect("valid config");
        assert_eq!(
            plain.introspect("tok-tls", 1000).await,
            Err(IntrospectError::Unreachable("tls".into()))
        );
    }
}
