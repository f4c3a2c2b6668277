//! Edge JWT validation: the provider configuration, the key set built from a JWKS document,
//! token extraction from a request and the verification of a token against a key set.
//!
//! This module owns the *decision*: is this bearer token acceptable for this provider, and which
//! claims does it carry. It is pure: it performs **no I/O**. Fetching a JWKS over HTTP, reading
//! `jwks_file`, the refresh schedule and the rate-limited refetch on an unknown `kid` belong to
//! another module, which hands this one a [`KeySet`] built with [`KeySet::from_jwks`]. The
//! current time is passed in by the caller too (`now_unix`).
//!
//! Rules [`Validator::validate`] enforces, in order:
//!
//! 1. Size (`max_token_bytes`) and shape (three base64url segments).
//! 2. The JOSE header is decoded here first: `alg` must be in the provider's allowlist (`none` is
//!    never accepted); `crit` naming anything is rejected (RFC 7515 §4.1.11: no extension is
//!    understood here). `jwk`, `jku`, `x5u` and `x5c` are ignored: keys only ever come from the
//!    [`KeySet`].
//! 3. The key is chosen by `kid`. Its type must fit `alg`: RSA for `RS*`/`PS*`, EC P-256 for
//!    `ES256`, EC P-384 for `ES384`, Ed25519 for `EdDSA`, `oct` for `HS*`; a JWK `alg`, when
//!    present, must equal the token's. An RSA key therefore never verifies an `HS*` token.
//! 4. The signature and the `iss`/`aud` claims are checked by `jsonwebtoken` with an explicit
//!    `Validation` (required claims per config, issuer, audiences; audience checking is off when
//!    no audiences are configured, so tokens that carry an `aud` are not rejected for it).
//! 5. `exp` and `nbf` are checked here against `now_unix` with the configured leeway, after the
//!    signature. `jsonwebtoken`'s own time checks read the wall clock and cannot be given a time,
//!    so they are switched off in favour of this single check against the caller's clock.
//!    A token is expired when `now >= exp + leeway` and not yet valid when `now + leeway < nbf`.
//! 6. When an issuer is configured, `iss` must be a string equal to it (an array is rejected).
//!
//! Errors ([`JwtError`]) display as short reasons fit for
//! `WWW-Authenticate: Bearer error="invalid_token", error_description="…"`; they never contain
//! the token, key material or attacker-controlled header text.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_refetch_min_interval() -> Duration {
    Duration::from_secs(30)
}

/// One JWT issuer the gateway accepts tokens from (a `jwt.providers[]` entry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    /// Name routes use to refer to this provider. Required, non-empty.
    pub name: String,
    /// Expected issuer. When set, `iss` is required and must be a string equal to it.
    /// Default: unset (not checked).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted audiences. When non-empty, `aud` (a string or an array) is required and must
    /// contain at least one of them. Default: empty (not checked, `aud` is ignored).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// URL of the JWKS (`http` or `https`), fetched by the JWKS fetcher.
    /// Exactly one of `jwks_uri`, `jwks_file` and `jwks` must be set.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Path of a JWKS file, read by the JWKS fetcher.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// An inline JWKS document (`{"keys": [...]}`).
    #[serde(default)]
    pub jwks: Option<Value>,
    /// A file holding the HMAC secret for `HS*` tokens (its raw bytes, a trailing newline
    /// dropped; at least 32 bytes), re-read with every key refresh. It may sit beside a JWKS
    /// source: `HS*` tokens are then verified only with this secret and asymmetric tokens only
    /// with the JWKS keys (the JWKS's own `oct` keys are ignored), so an algorithm is always
    /// bound to its key type.
    #[serde(default)]
    pub hmac_secret_file: Option<PathBuf>,
    /// Allowlist of JWS algorithms, e.g. `[RS256, ES256, EdDSA]`. Required and non-empty.
    /// Supported: `HS256 HS384 HS512 RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA`.
    /// `none` is rejected, and so is mixing `HS*` with asymmetric algorithms in one provider
    /// unless the HMAC secret comes from `hmac_secret_file`.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds; fractions are dropped).
    /// Default `30s`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// Whether tokens without `exp` are rejected. Default `true`.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Where to look for the token, in order; the first location holding one wins.
    /// Default (empty list): `[bearer]`.
    #[serde(default)]
    pub locations: Vec<TokenLocation>,
    /// Claims forwarded upstream as request headers: claim name → header name,
    /// e.g. `sub: X-User-Id`. Default: none.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Largest accepted token, in bytes. Default `8192`.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// How often the fetcher refreshes `jwks_uri` / `jwks_file`. Default `5m`.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_refresh: Duration,
    /// Minimum time between two refetches triggered by an unknown `kid`. Default `30s`.
    #[serde(default = "default_refetch_min_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub unknown_kid_refetch_min_interval: Duration,
}

/// Where a token is looked for in a request.
///
/// Serde form (externally tagged, snake_case): the unit variant is a plain string, the others a
/// one-key map, e.g. in YAML
/// `locations: [bearer, {header: {name: X-Token}}, {cookie: {name: session}}, {query: {name: access_token}}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenLocation {
    /// `Authorization: Bearer <token>` (the scheme is matched case-insensitively).
    Bearer,
    /// The whole value of a request header.
    Header {
        /// Header name, e.g. `X-Token`.
        name: String,
    },
    /// The value of a cookie (surrounding double quotes are removed).
    Cookie {
        /// Cookie name (case-sensitive).
        name: String,
    },
    /// The value of a query parameter (taken as is: JWTs need no percent-decoding).
    Query {
        /// Parameter name (case-sensitive).
        name: String,
    },
}

/// Where a provider's JWKS comes from (see [`JwtProviderConfig::key_source`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeySource<'a> {
    /// Fetched over HTTP(S).
    Uri(&'a str),
    /// Read from a file.
    File(&'a Path),
    /// Inline in the configuration.
    Inline(&'a Value),
    /// No JWKS: only the `hmac_secret_file`.
    HmacOnly,
}

/// A provider configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtConfigError {
    /// `name` is empty.
    #[error("provider name must not be empty")]
    EmptyName,
    /// `algorithms` is empty.
    #[error("`algorithms` must list at least one algorithm")]
    NoAlgorithms,
    /// `algorithms` lists `none`.
    #[error("algorithm `none` is never allowed")]
    NoneAlgorithm,
    /// `algorithms` lists a name that is not a supported JWS algorithm.
    #[error("unsupported algorithm `{0}`")]
    UnknownAlgorithm(String),
    /// `algorithms` mixes `HS*` with asymmetric algorithms.
    #[error("HS* algorithms cannot be mixed with asymmetric algorithms in one provider")]
    MixedAlgorithms,
    /// Not exactly one of `jwks_uri`, `jwks_file`, `jwks` is set (none is fine beside
    /// `hmac_secret_file`).
    #[error(
        "set exactly one of `jwks_uri`, `jwks_file`, `jwks` (found {0}), or `hmac_secret_file` alone"
    )]
    KeySources(usize),
    /// `HS*` tokens are allowed but no HMAC secret can verify them, or the reverse.
    #[error("{0}")]
    HmacSource(&'static str),
    /// `jwks_uri` is not an absolute `http(s)` URI with a host.
    #[error("`jwks_uri` must be an absolute http or https URI with a host: {0}")]
    InvalidJwksUri(String),
    /// `jwks_file` is empty.
    #[error("`jwks_file` must not be empty")]
    EmptyJwksFile,
    /// The inline `jwks` is not a JWKS document.
    #[error("inline `jwks`: {0}")]
    InvalidInlineJwks(JwksError),
    /// The inline `jwks` holds no usable key.
    #[error("inline `jwks` holds no usable key")]
    EmptyInlineJwks,
    /// `issuer` is set but empty.
    #[error("`issuer` must not be empty when set")]
    EmptyIssuer,
    /// An entry of `audiences` is empty.
    #[error("`audiences` entries must not be empty")]
    EmptyAudience,
    /// `max_token_bytes` is zero.
    #[error("`max_token_bytes` must be greater than zero")]
    ZeroMaxTokenBytes,
    /// A refresh interval is zero.
    #[error("`{0}` must be greater than zero")]
    ZeroInterval(&'static str),
    /// A header, cookie or query location has an empty name.
    #[error("token locations need a non-empty name")]
    EmptyLocationName,
    /// A header name (location or `claims_to_headers`) is not a valid HTTP header name.
    #[error("invalid header name `{0}`")]
    InvalidHeaderName(String),
    /// `claims_to_headers` targets a header that frames or routes the request.
    #[error("header `{0}` cannot carry a claim")]
    ForbiddenHeader(String),
    /// Two claims in `claims_to_headers` target the same header.
    #[error("header `{0}` is the target of several claims")]
    DuplicateHeader(String),
    /// `claims_to_headers` has an empty claim name.
    #[error("`claims_to_headers` claim names must not be empty")]
    EmptyClaimName,
}

/// Headers that frame, route or hop the request: never written from a claim.
const FORBIDDEN_CLAIM_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

impl JwtProviderConfig {
    /// Checks the configuration (everything [`Validator::new`] checks).
    pub fn validate(&self) -> Result<(), JwtConfigError> {
        Validator::new(self).map(|_| ())
    }

    /// The single configured key source.
    ///
    /// Checks that exactly one source is set, that `jwks_uri` is an absolute `http(s)` URI and
    /// that an inline `jwks` is a JWKS document with at least one usable key.
    pub fn key_source(&self) -> Result<KeySource<'_>, JwtConfigError> {
        let count = usize::from(self.jwks_uri.is_some())
            + usize::from(self.jwks_file.is_some())
            + usize::from(self.jwks.is_some());
        if count == 0 && self.hmac_secret_file.is_some() {
            return Ok(KeySource::HmacOnly);
        }
        if count != 1 {
            return Err(JwtConfigError::KeySources(count));
        }
        if let Some(uri) = &self.jwks_uri {
            let parsed: http::Uri = uri
                .parse()
                .map_err(|_| JwtConfigError::InvalidJwksUri(uri.clone()))?;
            let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
            let host_ok = parsed.host().is_some_and(|h| !h.is_empty());
            if !scheme_ok || !host_ok {
                return Err(JwtConfigError::InvalidJwksUri(uri.clone()));
            }
            return Ok(KeySource::Uri(uri));
        }
        if let Some(path) = &self.jwks_file {
            if path.as_os_str().is_empty() {
                return Err(JwtConfigError::EmptyJwksFile);
            }
            return Ok(KeySource::File(path));
        }
        let inline = self
            .jwks
            .as_ref()
            .expect("invariant: exactly one key source is set and it is not uri or file");
        let bytes = serde_json::to_vec(inline).map_err(|e| {
            JwtConfigError::InvalidInlineJwks(JwksError::InvalidJson(e.to_string()))
        })?;
        let keys = KeySet::from_jwks(&bytes).map_err(JwtConfigError::InvalidInlineJwks)?;
        if keys.is_empty() {
            return Err(JwtConfigError::EmptyInlineJwks);
        }
        Ok(KeySource::Inline(inline))
    }
}

/// A JWKS document that cannot be read at all (individual unusable keys are only skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not valid JSON.
    #[error("JWKS is not valid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but not an object with a `keys` array.
    #[error("JWKS must be an object with a `keys` array")]
    NotAJwkSet,
}

/// The type of a usable verification key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Oct,
}

impl KeyKind {
    fn label(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Ed25519 => "OKP Ed25519",
            KeyKind::Oct => "oct",
        }
    }

    /// The key type an algorithm needs.
    fn for_algorithm(alg: Algorithm) -> Option<KeyKind> {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Some(KeyKind::Oct),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(KeyKind::Rsa),
            Algorithm::ES256 => Some(KeyKind::EcP256),
            Algorithm::ES384 => Some(KeyKind::EcP384),
            Algorithm::EdDSA => Some(KeyKind::Ed25519),
            _ => None,
        }
    }
}

/// One usable key of a [`KeySet`].
#[derive(Debug, Clone)]
struct KeyEntry {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's `alg`, when it has one: the only algorithm this key verifies.
    alg: Option<Algorithm>,
    key: DecodingKey,
    /// The provider's `hmac_secret_file`: the one key for every `HS*` token, whatever its kid.
    sole_hmac: bool,
}

/// Verification keys of one provider, built from a JWKS document.
///
/// Only public verification keys (and `oct` secrets for `HS*` providers) that can actually be
/// used are kept; the others are listed with a reason in [`KeySet::skipped`].
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<KeyEntry>,
    skipped: Vec<String>,
}

/// Smallest and largest accepted RSA modulus, in bits.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;
/// Smallest accepted `oct` secret (RFC 7518 §3.2: at least the size of the SHA-256 output).
const OCT_MIN_BYTES: usize = 32;

impl KeySet {
    /// Builds a key set from a JWKS document (`{"keys": [...]}`).
    ///
    /// Each key is parsed as a `jsonwebtoken` [`Jwk`]. Kept: RSA (2048–8192 bits), EC P-256 and
    /// P-384, OKP Ed25519 and `oct` (at least 32 bytes) keys whose `use` (if any) is `sig`, whose
    /// `key_ops` (if any) include `verify` and whose `alg` (if any) is a supported signature
    /// algorithm fitting the key type. A `kid` may appear only once (later duplicates are
    /// skipped). A key without `kid` is kept only when it is the only key of its type.
    /// Everything else is skipped and reported by [`KeySet::skipped`].
    ///
    /// Errors only when the document is not JSON or not a JWKS object.
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, JwksError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| JwksError::InvalidJson(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NotAJwkSet)?;

        let mut skipped = Vec::new();
        let mut candidates: Vec<(String, KeyEntry)> = Vec::new();
        for (index, raw) in entries.iter().enumerate() {
            let label = key_label(index, raw);
            match parse_key(raw) {
                Ok(entry) => candidates.push((label, entry)),
                Err(reason) => skipped.push(format!("{label}: {reason}")),
            }
        }

        // A kid names one key: keep the first, skip later duplicates.
        let mut unique: Vec<(String, KeyEntry)> = Vec::with_capacity(candidates.len());
        for (label, entry) in candidates {
            let duplicate = entry.kid.as_deref().is_some_and(|kid| {
                unique
                    .iter()
                    .any(|(_, kept)| kept.kid.as_deref() == Some(kid))
            });
            if duplicate {
                skipped.push(format!("{label}: duplicate kid"));
            } else {
                unique.push((label, entry));
            }
        }

        // A key without kid is usable only when nothing else could be meant.
        let ambiguous: Vec<bool> = unique
            .iter()
            .map(|(_, entry)| {
                entry.kid.is_none()
                    && unique
                        .iter()
                        .filter(|(_, other)| other.kind == entry.kind)
                        .count()
                        > 1
            })
            .collect();
        let mut keys = Vec::with_capacity(unique.len());
        for ((label, entry), ambiguous) in unique.into_iter().zip(ambiguous) {
            if ambiguous {
                skipped.push(format!(
                    "{label}: no kid and not the only {} key",
                    entry.kind.label()
                ));
            } else {
                keys.push(entry);
            }
        }
        Ok(KeySet { keys, skipped })
    }

    /// The `kid`s of the usable keys, in document order.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }

    /// Whether a usable key has this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Human-readable reasons for each key that was skipped.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// This key set with `secret` as the one key for `HS*` tokens: any `oct` key of the JWKS is
    /// dropped (listed in [`KeySet::skipped`]), so `HS*` is verified only with the secret.
    pub fn with_hmac_secret(mut self, secret: &[u8]) -> Result<KeySet, String> {
        if secret.len() < OCT_MIN_BYTES {
            return Err(format!(
                "the HMAC secret is {} bytes; at least {OCT_MIN_BYTES} are needed",
                secret.len()
            ));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.kind != KeyKind::Oct);
        for _ in self.keys.len()..before {
            self.skipped
                .push("an oct key of the JWKS: HS* tokens use hmac_secret_file".into());
        }
        self.keys.push(KeyEntry {
            kid: None,
            kind: KeyKind::Oct,
            alg: None,
            key: DecodingKey::from_secret(secret),
            sole_hmac: true,
        });
        Ok(self)
    }

    /// Picks the key for a token: by `kid` when the token has one, otherwise the only key of the
    /// type `alg` needs.
    fn select(&self, alg: Algorithm, kid: Option<&str>) -> Result<&KeyEntry, JwtError> {
        let kind = KeyKind::for_algorithm(alg).ok_or(JwtError::KeyAlgorithmMismatch)?;
        if kind == KeyKind::Oct
            && let Some(k) = self.keys.iter().find(|k| k.sole_hmac)
        {
            return Ok(k);
        }
        let fits = |entry: &KeyEntry| entry.kind == kind && entry.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => {
                let entry = self
                    .keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or_else(|| JwtError::UnknownKid(Some(sanitize(kid, 128))))?;
                if fits(entry) {
                    Ok(entry)
                } else {
                    Err(JwtError::KeyAlgorithmMismatch)
                }
            }
            None => {
                let mut candidates = self.keys.iter().filter(|k| fits(k));
                match (candidates.next(), candidates.next()) {
                    (Some(entry), None) => Ok(entry),
                    (None, _) => Err(JwtError::UnknownKid(None)),
                    (Some(_), Some(_)) => Err(JwtError::KidRequired),
                }
            }
        }
    }
}

/// `key #3 (kid "abc")`, for skip reasons.
fn key_label(index: usize, raw: &Value) -> String {
    match raw.get("kid").and_then(Value::as_str) {
        Some(kid) => format!("key #{index} (kid \"{}\")", sanitize(kid, 64)),
        None => format!("key #{index}"),
    }
}

/// Checks one JWKS entry and builds its decoding key, or says why it is unusable.
fn parse_key(raw: &Value) -> Result<KeyEntry, String> {
    let Some(obj) = raw.as_object() else {
        return Err("not a JSON object".into());
    };
    if let Some(key_use) = obj.get("use")
        && key_use.as_str() != Some("sig")
    {
        return Err(format!("use {} is not sig", short_json(key_use)));
    }
    if let Some(ops) = obj.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("key_ops does not include verify".into());
        }
    }
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("invalid JWK: {e}"))?;
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = b64url_decode(&rsa.n).ok_or("RSA modulus is not base64url")?;
            let e = b64url_decode(&rsa.e).ok_or("RSA exponent is not base64url")?;
            let bits = modulus_bits(&n);
            if bits < RSA_MIN_BITS {
                return Err(format!(
                    "RSA modulus of {bits} bits is below {RSA_MIN_BITS}"
                ));
            }
            if bits > RSA_MAX_BITS {
                return Err(format!(
                    "RSA modulus of {bits} bits is above {RSA_MAX_BITS}"
                ));
            }
            if e.iter().all(|b| *b == 0) {
                return Err("RSA exponent is zero".into());
            }
            KeyKind::Rsa
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (kind, len) = match ec.curve {
                EllipticCurve::P256 => (KeyKind::EcP256, 32),
                EllipticCurve::P384 => (KeyKind::EcP384, 48),
                _ => return Err(format!("unsupported EC curve {}", raw_field(obj, "crv"))),
            };
            let x = b64url_decode(&ec.x).ok_or("EC x is not base64url")?;
            let y = b64url_decode(&ec.y).ok_or("EC y is not base64url")?;
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates are not {len} bytes"));
            }
            kind
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            if okp.curve != EllipticCurve::Ed25519 {
                return Err(format!("unsupported OKP curve {}", raw_field(obj, "crv")));
            }
            let x = b64url_decode(&okp.x).ok_or("OKP x is not base64url")?;
            if x.len() != 32 {
                return Err("Ed25519 public key is not 32 bytes".into());
            }
            KeyKind::Ed25519
        }
        AlgorithmParameters::OctetKey(oct) => {
            let k = b64url_decode(&oct.value).ok_or("oct k is not base64url")?;
            if k.len() < OCT_MIN_BYTES {
                return Err(format!("oct secret is shorter than {OCT_MIN_BYTES} bytes"));
            }
            KeyKind::Oct
        }
        _ => {
            return Err(format!(
                "unsupported or incomplete key (kty {}, crv {})",
                raw_field(obj, "kty"),
                raw_field(obj, "crv")
            ));
        }
    };
    let alg = match obj.get("alg") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            let alg = Algorithm::from_str(name).map_err(|_| {
                format!(
                    "alg \"{}\" is not a supported signature algorithm",
                    sanitize(name, 32)
                )
            })?;
            if KeyKind::for_algorithm(alg) != Some(kind) {
                return Err(format!("alg {name} does not fit a {} key", kind.label()));
            }
            Some(alg)
        }
        Some(other) => return Err(format!("alg {} is not a string", short_json(other))),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(KeyEntry {
        sole_hmac: false,
        kid: jwk.common.key_id.clone(),
        kind,
        alg,
        key,
    })
}

/// A JWK string field for a skip reason (quoted, sanitized), or `-`.
fn raw_field(obj: &Map<String, Value>, name: &str) -> String {
    match obj.get(name) {
        Some(value) => short_json(value),
        None => "-".into(),
    }
}

fn short_json(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{}\"", sanitize(s, 32)),
        other => sanitize(&other.to_string(), 32),
    }
}

/// Bit length of a big-endian unsigned integer.
fn modulus_bits(n: &[u8]) -> usize {
    let Some(start) = n.iter().position(|b| *b != 0) else {
        return 0;
    };
    let first = n[start];
    (n.len() - start - 1) * 8 + (8 - first.leading_zeros() as usize)
}

/// Printable ASCII only (no quotes or backslashes), at most `max` characters: safe to log or to
/// keep in an error.
fn sanitize(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Strict base64url without padding (RFC 7515 §2), rejecting non-canonical trailing bits.
/// The header and claims of a token, decoded WITHOUT verifying anything: for explaining a
/// failure (`meshgate auth explain`), never for deciding.
pub fn decode_unverified(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut parts = token.trim().split('.');
    let header = serde_json::from_slice(&b64url_decode(parts.next()?)?).ok()?;
    let claims = serde_json::from_slice(&b64url_decode(parts.next()?)?).ok()?;
    Some((header, claims))
}

fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    for &b in bytes {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (acc == 0).then_some(out)
}

/// Why a request's token was not accepted.
///
/// `Display` is the short reason for `error_description`: fixed text only, never the token, key
/// material or header values. The payloads (sanitized, truncated) are for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No configured location holds a token.
    #[error("no token")]
    Missing,
    /// The token is longer than `max_token_bytes`.
    #[error("token too large")]
    TooLarge,
    /// Not a well-formed JWS compact token (or an ambiguous location, e.g. two
    /// `Authorization` headers).
    #[error("malformed token")]
    Malformed,
    /// `alg` is not in the provider's allowlist (or is `none`). Carries the sanitized `alg`.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed(String),
    /// No key has the token's `kid` (`None`: the token has no `kid` and no key fits `alg`).
    /// The caller may refetch the JWKS (rate limited) and retry once.
    #[error("unknown signing key")]
    UnknownKid(Option<String>),
    /// The token has no `kid` and several keys fit its `alg`.
    #[error("key id required")]
    KidRequired,
    /// The key named by `kid` is of another type than `alg` needs, or its JWK `alg` differs.
    #[error("key does not match algorithm")]
    KeyAlgorithmMismatch,
    /// The signature does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim is absent (`exp`, `iss` or `aud`).
    #[error("missing claim: {0}")]
    MissingClaim(&'static str),
    /// A registered claim has the wrong type (e.g. a string `exp`).
    #[error("invalid claim: {0}")]
    InvalidClaim(&'static str),
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` names none of the configured audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// The header's `crit` names an extension (none is understood). Carries the sanitized name.
    #[error("unsupported critical header")]
    UnsupportedCritical(String),
}

impl JwtError {
    /// Whether the JWKS may be stale: refetch it (rate limited) and validate once more.
    pub fn is_unknown_kid(&self) -> bool {
        matches!(self, JwtError::UnknownKid(_))
    }

    /// The `WWW-Authenticate` value for a 401 (RFC 6750 §3): plain `Bearer` when no token was
    /// sent, otherwise `Bearer error="invalid_token", error_description="<Display>"`.
    pub fn www_authenticate(&self) -> HeaderValue {
        match self {
            JwtError::Missing => HeaderValue::from_static("Bearer"),
            other => HeaderValue::from_str(&format!(
                "Bearer error=\"invalid_token\", error_description=\"{other}\""
            ))
            .expect("invariant: error descriptions are fixed ASCII text without quotes"),
        }
    }
}

/// The claim name `jsonwebtoken` reported, as a static string.
fn claim_name(name: &str) -> &'static str {
    match name {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "unknown",
    }
}

/// Maps a `jsonwebtoken` error to the reason reported to the client.
fn map_library_error(err: jsonwebtoken::errors::Error, alg: &str) -> JwtError {
    match err.into_kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::RsaFailedSigning
        | ErrorKind::Signing(_)
        | ErrorKind::Provider(_) => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::InvalidSubject => JwtError::InvalidClaim("sub"),
        ErrorKind::MissingRequiredClaim(name) => JwtError::MissingClaim(claim_name(&name)),
        ErrorKind::InvalidClaimFormat(name) => JwtError::InvalidClaim(claim_name(&name)),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => JwtError::AlgorithmNotAllowed(alg.to_owned()),
        _ => JwtError::Malformed,
    }
}

/// A token whose signature and claims were accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// All claims of the payload.
    pub claims: Map<String, Value>,
    /// `kid` of the key that verified the signature, if it has one.
    pub kid: Option<String>,
    /// The token's `alg`, e.g. `RS256`.
    pub alg: String,
}

impl VerifiedToken {
    /// Granted scopes: from the first of `scope`, `scp`, `scopes` that is a space-separated
    /// string or an array of strings. Order kept, duplicates and empty entries dropped.
    pub fn scopes(&self) -> Vec<String> {
        for name in ["scope", "scp", "scopes"] {
            let mut out: Vec<String> = Vec::new();
            let mut push = |s: &str| {
                if !s.is_empty() && !out.iter().any(|o| o == s) {
                    out.push(s.to_owned());
                }
            };
            match self.claims.get(name) {
                Some(Value::String(s)) => s.split_whitespace().for_each(&mut push),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .for_each(|s| push(s.trim())),
                _ => continue,
            }
            return out;
        }
        Vec::new()
    }

    /// A top-level claim rendered for a request header: strings as-is, numbers and booleans in
    /// their JSON form, arrays of those joined by a space.
    ///
    /// `None` when the claim is absent, `null`, an object, an empty array, an array holding
    /// objects or arrays, or when the text is not a valid header value (control characters).
    /// The text may hold non-ASCII UTF-8: build the header with [`HeaderValue::from_bytes`].
    pub fn claim_as_header_value(&self, claim: &str) -> Option<String> {
        fn scalar(value: &Value) -> Option<String> {
            match value {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            }
        }
        let text = match self.claims.get(claim)? {
            Value::Array(items) if items.is_empty() => return None,
            Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()?
                .join(" "),
            other => scalar(other)?,
        };
        HeaderValue::from_bytes(text.as_bytes()).ok()?;
        Some(text)
    }
}

/// A token location with its header name parsed.
#[derive(Debug, Clone)]
enum Location {
    Bearer,
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

/// Validates tokens for one provider. Built once per configuration; cheap to share.
#[derive(Debug, Clone)]
pub struct Validator {
    name: String,
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    leeway: u64,
    require_exp: bool,
    locations: Vec<Location>,
    claims_to_headers: Vec<(String, HeaderName)>,
    max_token_bytes: usize,
    /// Signature, `iss` and `aud` checks; `algorithms` is narrowed to the token's `alg` per call.
    base: Validation,
}

/// The JOSE header fields validation acts on.
struct TokenHeader {
    alg: Algorithm,
    alg_name: String,
    kid: Option<String>,
}

impl Validator {
    /// Checks the configuration and prepares validation.
    pub fn new(config: &JwtProviderConfig) -> Result<Validator, JwtConfigError> {
        if config.name.trim().is_empty() {
            return Err(JwtConfigError::EmptyName);
        }
        let algorithms = parse_algorithms(&config.algorithms, config.hmac_secret_file.is_some())?;
        let source = config.key_source()?;
        let wants_hmac = algorithms
            .iter()
            .any(|a| a.family() == AlgorithmFamily::Hmac);
        if config.hmac_secret_file.is_some() && !wants_hmac {
            return Err(JwtConfigError::HmacSource(
                "`hmac_secret_file` is set but `algorithms` lists no HS* algorithm",
            ));
        }
        if matches!(source, KeySource::HmacOnly)
            && algorithms
                .iter()
                .any(|a| a.family() != AlgorithmFamily::Hmac)
        {
            return Err(JwtConfigError::HmacSource(
                "asymmetric algorithms need a JWKS source beside `hmac_secret_file`",
            ));
        }
        if config.issuer.as_deref().is_some_and(str::is_empty) {
            return Err(JwtConfigError::EmptyIssuer);
        }
        if config.audiences.iter().any(String::is_empty) {
            return Err(JwtConfigError::EmptyAudience);
        }
        if config.max_token_bytes == 0 {
            return Err(JwtConfigError::ZeroMaxTokenBytes);
        }
        if config.jwks_refresh.is_zero() {
            return Err(JwtConfigError::ZeroInterval("jwks_refresh"));
        }
        if config.unknown_kid_refetch_min_interval.is_zero() {
            return Err(JwtConfigError::ZeroInterval(
                "unknown_kid_refetch_min_interval",
            ));
        }
        let locations = if config.locations.is_empty() {
            vec![Location::Bearer]
        } else {
            config
                .locations
                .iter()
                .map(parse_location)
                .collect::<Result<_, _>>()?
        };
        let mut claims_to_headers: Vec<(String, HeaderName)> = Vec::new();
        for (claim, header_name) in &config.claims_to_headers {
            if claim.is_empty() {
                return Err(JwtConfigError::EmptyClaimName);
            }
            let name = HeaderName::from_bytes(header_name.as_bytes())
                .map_err(|_| JwtConfigError::InvalidHeaderName(header_name.clone()))?;
            if FORBIDDEN_CLAIM_HEADERS.contains(&name.as_str()) {
                return Err(JwtConfigError::ForbiddenHeader(header_name.clone()));
            }
            if claims_to_headers.iter().any(|(_, h)| *h == name) {
                return Err(JwtConfigError::DuplicateHeader(header_name.clone()));
            }
            claims_to_headers.push((claim.clone(), name));
        }

        let leeway = config.leeway.as_secs();
        let mut base = Validation::new(algorithms[0]);
        base.algorithms = algorithms.clone();
        base.leeway = leeway;
        // `jsonwebtoken` checks exp/nbf against the wall clock, not the caller's `now_unix`:
        // those two checks are done in `check_times` instead (same leeway).
        base.validate_exp = false;
        base.validate_nbf = false;
        base.reject_tokens_expiring_in_less_than = 0;
        base.sub = None;
        let mut required = Vec::new();
        if config.require_exp {
            required.push("exp");
        }
        base.iss = None;
        if let Some(issuer) = &config.issuer {
            required.push("iss");
            base.set_issuer(&[issuer]);
        }
        if config.audiences.is_empty() {
            // By default `jsonwebtoken` rejects any token carrying `aud` when none is configured.
            base.validate_aud = false;
            base.aud = None;
        } else {
            required.push("aud");
            base.validate_aud = true;
            base.set_audience(&config.audiences);
        }
        base.set_required_spec_claims(&required);

        ensure_crypto_provider();
        Ok(Validator {
            name: config.name.clone(),
            algorithms,
            issuer: config.issuer.clone(),
            leeway,
            require_exp: config.require_exp,
            locations,
            claims_to_headers,
            max_token_bytes: config.max_token_bytes,
            base,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token from the first configured location that holds one.
    ///
    /// `query` is the request's raw query string (a leading `?` is tolerated).
    /// `Missing` when no location holds a token, `TooLarge` over `max_token_bytes`, `Malformed`
    /// for an empty `Bearer` credential, a value that is not text, or a header or query parameter
    /// given more than once (which one would be meant is ambiguous). For cookies the first
    /// non-empty one of that name is taken. Other `Authorization` schemes are not a token here.
    pub fn extract<'a>(&self, headers: &'a HeaderMap, query: &'a str) -> Result<&'a str, JwtError> {
        for location in &self.locations {
            let found = match location {
                Location::Bearer => bearer_token(headers)?,
                Location::Header(name) => header_token(headers, name)?,
                Location::Cookie(name) => cookie_token(headers, name),
                Location::Query(name) => query_token(query, name)?,
            };
            if let Some(token) = found {
                if token.len() > self.max_token_bytes {
                    return Err(JwtError::TooLarge);
                }
                return Ok(token);
            }
        }
        Err(JwtError::Missing)
    }

    /// Verifies a token against `keys` at time `now_unix` (seconds since the Unix epoch).
    ///
    /// See the module documentation for the rules, in the order they apply. On
    /// [`JwtError::UnknownKid`] the caller may refetch the JWKS and call this once more.
    pub fn validate(
        &self,
        token: &str,
        keys: &KeySet,
        now_unix: u64,
    ) -> Result<VerifiedToken, JwtError> {
        if token.len() > self.max_token_bytes {
            return Err(JwtError::TooLarge);
        }
        let header = self.check_header(token)?;
        let entry = keys.select(header.alg, header.kid.as_deref())?;

        let mut validation = self.base.clone();
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &entry.key, &validation)
            .map_err(|e| map_library_error(e, &header.alg_name))?;
        let claims = data.claims;

        self.check_times(&claims, now_unix)?;
        if let Some(issuer) = &self.issuer {
            match claims.get("iss") {
                Some(Value::String(iss)) if iss == issuer => {}
                None | Some(Value::Null) => return Err(JwtError::MissingClaim("iss")),
                Some(_) => return Err(JwtError::WrongIssuer),
            }
        }
        Ok(VerifiedToken {
            claims,
            kid: entry.kid.clone(),
            alg: header.alg_name,
        })
    }

    /// Checks `exp` and `nbf` of a token verified earlier against `now_unix` (with the leeway):
    /// what a cached verification must still pass on every use.
    pub fn check_time(&self, token: &VerifiedToken, now_unix: u64) -> Result<(), JwtError> {
        self.check_times(&token.claims, now_unix)
    }

    /// Claim headers to add upstream for a verified token (`claims_to_headers`), skipping claims
    /// that are absent or not representable (see [`VerifiedToken::claim_as_header_value`]).
    pub fn claim_headers(&self, token: &VerifiedToken) -> Vec<(HeaderName, HeaderValue)> {
        self.claims_to_headers
            .iter()
            .filter_map(|(claim, name)| {
                let text = token.claim_as_header_value(claim)?;
                let value = HeaderValue::from_bytes(text.as_bytes()).ok()?;
                Some((name.clone(), value))
            })
            .collect()
    }

    /// The headers `claims_to_headers` writes: strip them from incoming requests so that a client
    /// cannot set them itself.
    pub fn claim_header_names(&self) -> impl Iterator<Item = &HeaderName> + '_ {
        self.claims_to_headers.iter().map(|(_, name)| name)
    }

    /// Decodes and checks the JOSE header: shape, `alg` allowlist, `crit`, `kid`.
    fn check_header(&self, token: &str) -> Result<TokenHeader, JwtError> {
        let mut parts = token.split('.');
        let (Some(encoded), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let bytes = b64url_decode(encoded).ok_or(JwtError::Malformed)?;
        let fields: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;

        let Some(Value::String(alg_name)) = fields.get("alg") else {
            return Err(JwtError::Malformed);
        };
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(JwtError::AlgorithmNotAllowed("none".into()));
        }
        let alg = Algorithm::from_str(alg_name)
            .ok()
            .filter(|alg| self.algorithms.contains(alg))
            .ok_or_else(|| JwtError::AlgorithmNotAllowed(sanitize(alg_name, 16)))?;

        match fields.get("crit") {
            None => {}
            Some(Value::Array(names)) => match names.first() {
                // RFC 7515 §4.1.11: producers must not send an empty list.
                None => return Err(JwtError::Malformed),
                Some(name) => {
                    let name = name
                        .as_str()
                        .map_or_else(|| "?".into(), |n| sanitize(n, 32));
                    return Err(JwtError::UnsupportedCritical(name));
                }
            },
            Some(_) => return Err(JwtError::Malformed),
        }

        let kid = match fields.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(JwtError::Malformed),
        };
        // `jwk`, `jku`, `x5u`, `x5c`: deliberately ignored, keys come from the KeySet only.
        Ok(TokenHeader {
            alg,
            alg_name: alg_name.clone(),
            kid,
        })
    }

    /// `exp` and `nbf` against the caller's clock, with the configured leeway.
    fn check_times(&self, claims: &Map<String, Value>, now: u64) -> Result<(), JwtError> {
        match numeric_date(claims, "exp")? {
            Some(exp) if now >= exp.saturating_add(self.leeway) => return Err(JwtError::Expired),
            Some(_) => {}
            None if self.require_exp => return Err(JwtError::MissingClaim("exp")),
            None => {}
        }
        if let Some(nbf) = numeric_date(claims, "nbf")?
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }
}

/// A NumericDate claim (RFC 7519 §2) as whole seconds; `None` when absent or `null`.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(secs) = n.as_u64() {
                return Ok(Some(secs));
            }
            match n.as_f64() {
                // exp rounds down (earlier expiry), nbf up (later start): never more lenient.
                Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(if name == "nbf" {
                    f.ceil() as u64
                } else {
                    f.floor() as u64
                })),
                _ => Err(JwtError::InvalidClaim(name)),
            }
        }
        Some(_) => Err(JwtError::InvalidClaim(name)),
    }
}

/// Parses and checks the `algorithms` allowlist.
fn parse_algorithms(
    names: &[String],
    separate_hmac: bool,
) -> Result<Vec<Algorithm>, JwtConfigError> {
    if names.is_empty() {
        return Err(JwtConfigError::NoAlgorithms);
    }
    let mut algorithms: Vec<Algorithm> = Vec::with_capacity(names.len());
    for name in names {
        if name.trim().eq_ignore_ascii_case("none") {
            return Err(JwtConfigError::NoneAlgorithm);
        }
        let alg = Algorithm::from_str(name)
            .map_err(|_| JwtConfigError::UnknownAlgorithm(name.clone()))?;
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    let hmac = algorithms
        .iter()
        .filter(|a| a.family() == AlgorithmFamily::Hmac)
        .count();
    if hmac != 0 && hmac != algorithms.len() && !separate_hmac {
        return Err(JwtConfigError::MixedAlgorithms);
    }
    Ok(algorithms)
}

fn parse_location(location: &TokenLocation) -> Result<Location, JwtConfigError> {
    Ok(match location {
        TokenLocation::Bearer => Location::Bearer,
        TokenLocation::Header { name } => {
            if name.is_empty() {
                return Err(JwtConfigError::EmptyLocationName);
            }
            Location::Header(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| JwtConfigError::InvalidHeaderName(name.clone()))?,
            )
        }
        TokenLocation::Cookie { name } | TokenLocation::Query { name } if name.is_empty() => {
            return Err(JwtConfigError::EmptyLocationName);
        }
        TokenLocation::Cookie { name } => Location::Cookie(name.clone()),
        TokenLocation::Query { name } => Location::Query(name.clone()),
    })
}

/// Makes `jsonwebtoken`'s process-wide crypto provider explicit (aws-lc-rs). Without it,
/// `jsonwebtoken` panics at the first verification if feature unification ever enabled a second
/// backend. Installing fails harmlessly when a provider is already set.
fn ensure_crypto_provider() {
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
    );
}

/// `Authorization: Bearer <token>`; other schemes are no token. Several headers: ambiguous.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, JwtError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(JwtError::Malformed);
    }
    let text = value.to_str().map_err(|_| JwtError::Malformed)?;
    let text = text.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_matches(|c| c == ' ' || c == '\t');
    if token.is_empty() || token.contains([' ', '\t']) {
        return Err(JwtError::Malformed);
    }
    Ok(Some(token))
}

/// A whole header value; empty counts as absent, several headers are ambiguous.
fn header_token<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a str>, JwtError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(JwtError::Malformed);
    }
    let token = value
        .to_str()
        .map_err(|_| JwtError::Malformed)?
        .trim_matches(|c| c == ' ' || c == '\t');
    Ok((!token.is_empty()).then_some(token))
}

/// The first non-empty cookie of that name across all `Cookie` headers.
fn cookie_token<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| std::str::from_utf8(value.as_bytes()).ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(key, _)| key.trim() == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        })
        .find(|value| !value.is_empty())
}

/// A query parameter; empty counts as absent, several occurrences are ambiguous.
fn query_token<'a>(query: &'a str, name: &str) -> Result<Option<&'a str>, JwtError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != name {
            continue;
        }
        if found.is_some() {
            return Err(JwtError::Malformed);
        }
        found = Some(value);
    }
    Ok(found.filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use aws_lc_rs::{
        encoding::AsDer,
        hmac,
        rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents},
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
    };
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://issuer.test";
    const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs";

    // ---- encoding helpers ------------------------------------------------------------------

    fn b64(bytes: &[u8], url: bool) -> String {
        const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let table = if url { URL } else { STD };
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(table[((n >> (18 - 6 * i)) & 63) as usize]));
            }
            if !url {
                out.push_str(&"=".repeat(3 - chunk.len()));
            }
        }
        out
    }

    fn b64url(bytes: &[u8]) -> String {
        b64(bytes, true)
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let body = b64(der, false);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("invariant: base64 is ASCII"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    // ---- key fixtures ----------------------------------------------------------------------

    struct RsaFixture {
        encoding: EncodingKey,
        jwk: Value,
        public_der: Vec<u8>,
    }

    struct Fixtures {
        rsa: RsaFixture,
        attacker: RsaFixture,
        ec: EncodingKey,
        ec_jwk: Value,
        ed: EncodingKey,
        ed_jwk: Value,
    }

    fn rsa_fixture(kid: &str) -> RsaFixture {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA keygen");
        let pkcs8 = pair.as_der().expect("RSA PKCS#8");
        let encoding =
            EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).expect("pem");
        let components = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let public_der = pair.public_key().as_der().expect("SPKI").as_ref().to_vec();
        let jwk = json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64url(&components.n), "e": b64url(&components.e),
        });
        RsaFixture {
            encoding,
            jwk,
            public_der,
        }
    }

    fn fixtures() -> &'static Fixtures {
        static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
        FIXTURES.get_or_init(|| {
            let ec_pair =
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("EC keygen");
            let ec_point = ec_pair.public_key().as_ref().to_vec();
            assert_eq!(ec_point.len(), 65);
            let ec_pkcs8 = ec_pair.to_pkcs8v1().expect("EC PKCS#8");
            let ed_pair = Ed25519KeyPair::generate().expect("Ed25519 keygen");
            let ed_pkcs8 = ed_pair.to_pkcs8v1().expect("Ed25519 PKCS#8");
            Fixtures {
                rsa: rsa_fixture("rsa-1"),
                attacker: rsa_fixture("evil"),
                ec: EncodingKey::from_ec_pem(pem("PRIVATE KEY", ec_pkcs8.as_ref()).as_bytes())
                    .expect("EC pem"),
                ec_jwk: json!({
                    "kty": "EC", "crv": "P-256", "kid": "ec-1",
                    "x": b64url(&ec_point[1..33]), "y": b64url(&ec_point[33..]),
                }),
                ed: EncodingKey::from_ed_pem(pem("PRIVATE KEY", ed_pkcs8.as_ref()).as_bytes())
                    .expect("Ed pem"),
                ed_jwk: json!({
                    "kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
                    "x": b64url(ed_pair.public_key().as_ref()),
                }),
            }
        })
    }

    fn jwks_json(keys: &[&Value]) -> Value {
        json!({ "keys": keys })
    }

    fn key_set(keys: &[&Value]) -> KeySet {
        KeySet::from_jwks(jwks_json(keys).to_string().as_bytes()).expect("JWKS")
    }

    fn main_keys() -> KeySet {
        let f = fixtures();
        let set = key_set(&[&f.rsa.jwk, &f.ec_jwk, &f.ed_jwk]);
        assert_eq!(set.skipped(), &[] as &[String]);
        set
    }

    fn hs_jwk() -> Value {
        json!({ "kty": "oct", "kid": "hs-1", "k": b64url(HS_SECRET) })
    }

    // ---- configs ---------------------------------------------------------------------------

    fn config_with(algorithms: &[&str], jwks: Value, extra: Value) -> JwtProviderConfig {
        let mut doc = json!({
            "name": "test",
            "issuer": ISS,
            "audiences": ["api"],
            "jwks": jwks,
            "algorithms": algorithms,
        });
        let obj = doc.as_object_mut().expect("object");
        for (k, v) in extra.as_object().expect("object") {
            obj.insert(k.clone(), v.clone());
        }
        serde_json::from_value(doc).expect("config")
    }

    fn main_config(extra: Value) -> JwtProviderConfig {
        let f = fixtures();
        config_with(
            &["RS256", "ES256", "EdDSA"],
            jwks_json(&[&f.rsa.jwk, &f.ec_jwk, &f.ed_jwk]),
            extra,
        )
    }

    fn validator(extra: Value) -> Validator {
        Validator::new(&main_config(extra)).expect("validator")
    }

    fn hs_validator() -> Validator {
        Validator::new(&config_with(&["HS256"], jwks_json(&[&hs_jwk()]), json!({})))
            .expect("HS validator")
    }

    // ---- tokens ----------------------------------------------------------------------------

    fn claims() -> Value {
        json!({
            "iss": ISS, "aud": "api", "sub": "user-1",
            "exp": NOW + 300, "iat": NOW, "scope": "read write",
        })
    }

    /// `claims()` with fields replaced (`null` removes a field).
    fn claims_with(changes: Value) -> Value {
        let mut c = claims();
        let obj = c.as_object_mut().expect("object");
        for (k, v) in changes.as_object().expect("object") {
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        c
    }

    #[derive(Clone, Copy)]
    enum Signer {
        Rsa,
        Attacker,
        Ec,
        Ed,
        Hs,
    }

    fn sign_with(signer: Signer, kid: Option<&str>, claims: &Value) -> String {
        sign_header(signer, kid, claims, |_| {})
    }

    fn sign_header(
        signer: Signer,
        kid: Option<&str>,
        claims: &Value,
        edit: impl FnOnce(&mut Header),
    ) -> String {
        let f = fixtures();
        let hs = EncodingKey::from_secret(HS_SECRET);
        let (alg, key) = match signer {
            Signer::Rsa => (Algorithm::RS256, &f.rsa.encoding),
            Signer::Attacker => (Algorithm::RS256, &f.attacker.encoding),
            Signer::Ec => (Algorithm::ES256, &f.ec),
            Signer::Ed => (Algorithm::EdDSA, &f.ed),
            Signer::Hs => (Algorithm::HS256, &hs),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        edit(&mut header);
        encode(&header, claims, key).expect("encode")
    }

    /// A token with any header, signed by `sign` over `header.payload`.
    fn hand_built(header: Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let message = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signature = sign(message.as_bytes());
        format!("{message}.{}", b64url(&signature))
    }

    fn hs256(secret: &[u8]) -> impl FnOnce(&[u8]) -> Vec<u8> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        move |msg| hmac::sign(&key, msg).as_ref().to_vec()
    }

    fn check(validator: &Validator, keys: &KeySet, token: &str) -> Result<(), JwtError> {
        validator.validate(token, keys, NOW).map(|_| ())
    }

    // ---- validate ----------------------------------------------------------------------------

    #[test]
    fn valid_tokens_of_each_allowed_type_pass_with_claims() {
        let v = validator(json!({}));
        let keys = main_keys();
        for (signer, kid, alg) in [
            (Signer::Rsa, "rsa-1", "RS256"),
            (Signer::Ec, "ec-1", "ES256"),
            (Signer::Ed, "ed-1", "EdDSA"),
        ] {
            let token = sign_with(signer, Some(kid), &claims());
            let verified = v.validate(&token, &keys, NOW).expect(alg);
            assert_eq!(verified.alg, alg);
            assert_eq!(verified.kid.as_deref(), Some(kid));
            assert_eq!(verified.claims.get("sub"), Some(&json!("user-1")));
            assert_eq!(verified.scopes(), ["read", "write"]);
        }
    }

    #[test]
    fn hs256_provider_accepts_its_oct_key() {
        let keys = key_set(&[&hs_jwk()]);
        let v = hs_validator();
        let verified = v
            .validate(&sign_with(Signer::Hs, Some("hs-1"), &claims()), &keys, NOW)
            .expect("HS256");
        assert_eq!(verified.alg, "HS256");
        // Without kid: the only oct key is used.
        check(&v, &keys, &sign_with(Signer::Hs, None, &claims())).expect("HS256 without kid");
        // A signed payload that is not base64url JSON.
        let garbage = {
            let message = format!("{}.!!!", b64url(br#"{"alg":"HS256"}"#));
            let signature = hs256(HS_SECRET)(message.as_bytes());
            format!("{message}.{}", b64url(&signature))
        };
        assert_eq!(check(&v, &keys, &garbage), Err(JwtError::Malformed));
        // Wrong secret.
        let forged = hand_built(
            json!({"alg": "HS256", "kid": "hs-1"}),
            &claims(),
            hs256(b"another-secret-another-secret-xx!"),
        );
        assert_eq!(check(&v, &keys, &forged), Err(JwtError::BadSignature));
    }

    #[test]
    fn claim_and_time_rules() {
        let v = validator(json!({}));
        let keys = main_keys();
        let rsa = |changes: Value| sign_with(Signer::Rsa, Some("rsa-1"), &claims_with(changes));
        let cases: Vec<(&str, String, Result<(), JwtError>)> = vec![
            ("valid", rsa(json!({})), Ok(())),
            (
                "expired",
                rsa(json!({"exp": NOW - 3600})),
                Err(JwtError::Expired),
            ),
            (
                "nbf in the future",
                rsa(json!({"nbf": NOW + 3600})),
                Err(JwtError::NotYetValid),
            ),
            ("nbf in the past", rsa(json!({"nbf": NOW - 10})), Ok(())),
            (
                "wrong aud",
                rsa(json!({"aud": "other"})),
                Err(JwtError::WrongAudience),
            ),
            (
                "aud array with ours",
                rsa(json!({"aud": ["x", "api"]})),
                Ok(()),
            ),
            (
                "aud array without ours",
                rsa(json!({"aud": ["x", "y"]})),
                Err(JwtError::WrongAudience),
            ),
            (
                "wrong iss",
                rsa(json!({"iss": "https://evil.test"})),
                Err(JwtError::WrongIssuer),
            ),
            (
                "iss as array",
                rsa(json!({"iss": [ISS]})),
                Err(JwtError::WrongIssuer),
            ),
            (
                "missing exp",
                rsa(json!({"exp": null})),
                Err(JwtError::MissingClaim("exp")),
            ),
            (
                "missing iss",
                rsa(json!({"iss": null})),
                Err(JwtError::MissingClaim("iss")),
            ),
            (
                "missing aud",
                rsa(json!({"aud": null})),
                Err(JwtError::MissingClaim("aud")),
            ),
            (
                "fractional exp",
                rsa(json!({"exp": (NOW + 300) as f64 + 0.5})),
                Ok(()),
            ),
            (
                "tampered payload",
                {
                    let token = rsa(json!({}));
                    let mut parts: Vec<&str> = token.split('.').collect();
                    let evil = b64url(claims_with(json!({"sub": "admin"})).to_string().as_bytes());
                    parts[1] = &evil;
                    parts.join(".")
                },
                Err(JwtError::BadSignature),
            ),
            (
                "EC signature by another key",
                {
                    let other =
                        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("EC");
                    let der = other.to_pkcs8v1().expect("pkcs8");
                    let key = EncodingKey::from_ec_der(der.as_ref());
                    let mut header = Header::new(Algorithm::ES256);
                    header.kid = Some("ec-1".into());
                    encode(&header, &claims(), &key).expect("encode")
                },
                Err(JwtError::BadSignature),
            ),
        ];
        for (name, token, expected) in cases {
            assert_eq!(check(&v, &keys, &token), expected, "{name}");
        }
    }

    #[test]
    fn optional_claims_when_not_configured() {
        let keys = main_keys();
        let f = fixtures();
        let mut config = main_config(json!({"require_exp": false}));
        config.issuer = None;
        config.audiences.clear();
        let v = Validator::new(&config).expect("validator");
        let rsa = |changes: Value| sign_with(Signer::Rsa, Some("rsa-1"), &claims_with(changes));
        let cases: Vec<(&str, String, Result<(), JwtError>)> = vec![
            (
                "no exp, iss, aud",
                rsa(json!({"exp": null, "iss": null, "aud": null})),
                Ok(()),
            ),
            (
                "aud present but not configured",
                rsa(json!({"aud": "anyone"})),
                Ok(()),
            ),
            (
                "aud array not configured",
                rsa(json!({"aud": ["a", "b"]})),
                Ok(()),
            ),
            ("any iss", rsa(json!({"iss": "https://other.test"})), Ok(())),
            (
                "exp still checked",
                rsa(json!({"exp": NOW - 3600})),
                Err(JwtError::Expired),
            ),
            (
                "exp not a number",
                rsa(json!({"exp": "soon"})),
                Err(JwtError::InvalidClaim("exp")),
            ),
            (
                "nbf not a number",
                rsa(json!({"nbf": "later"})),
                Err(JwtError::InvalidClaim("nbf")),
            ),
        ];
        for (name, token, expected) in cases {
            assert_eq!(check(&v, &keys, &token), expected, "{name}");
        }
        assert_eq!(f.rsa.jwk["kid"], "rsa-1");
    }

    #[test]
    fn leeway_is_exactly_the_configured_one() {
        let keys = main_keys();
        let expired_20s_ago = sign_with(
            Signer::Rsa,
            Some("rsa-1"),
            &claims_with(json!({"exp": NOW - 20})),
        );
        let nbf_in_20s = sign_with(
            Signer::Rsa,
            Some("rsa-1"),
            &claims_with(json!({"nbf": NOW + 20})),
        );
        let expired_45s_ago = sign_with(
            Signer::Rsa,
            Some("rsa-1"),
            &claims_with(json!({"exp": NOW - 45})),
        );

        let lenient = validator(json!({"leeway": "30s"}));
        assert_eq!(check(&lenient, &keys, &expired_20s_ago), Ok(()));
        assert_eq!(check(&lenient, &keys, &nbf_in_20s), Ok(()));
        // The library default (60 s) would accept this one.
        assert_eq!(
            check(&lenient, &keys, &expired_45s_ago),
            Err(JwtError::Expired)
        );
        // The default is 30 s too.
        assert_eq!(
            check(&validator(json!({})), &keys, &expired_20s_ago),
            Ok(())
        );

        let strict = validator(json!({"leeway": "10s"}));
        assert_eq!(
            check(&strict, &keys, &expired_20s_ago),
            Err(JwtError::Expired)
        );
        assert_eq!(
            check(&strict, &keys, &nbf_in_20s),
            Err(JwtError::NotYetValid)
        );

        // Boundaries: expired at exp + leeway; valid from nbf - leeway.
        let zero = validator(json!({"leeway": "0s"}));
        let exp_now = sign_with(
            Signer::Rsa,
            Some("rsa-1"),
            &claims_with(json!({"exp": NOW})),
        );
        let nbf_now = sign_with(
            Signer::Rsa,
            Some("rsa-1"),
            &claims_with(json!({"nbf": NOW})),
        );
        assert_eq!(check(&zero, &keys, &exp_now), Err(JwtError::Expired));
        assert_eq!(check(&zero, &keys, &nbf_now), Ok(()));
        // The caller's clock is the one used.
        assert_eq!(zero.validate(&exp_now, &keys, NOW - 1).map(|_| ()), Ok(()));
    }

    #[test]
    fn algorithm_rules() {
        let v = validator(json!({}));
        let keys = main_keys();
        let f = fixtures();
        let cases: Vec<(&str, String, JwtError)> = vec![
            (
                "alg none",
                hand_built(json!({"alg": "none", "typ": "JWT"}), &claims(), |_| {
                    Vec::new()
                }),
                JwtError::AlgorithmNotAllowed("none".into()),
            ),
            (
                "alg NONE",
                hand_built(json!({"alg": "NONE"}), &claims(), |_| Vec::new()),
                JwtError::AlgorithmNotAllowed("none".into()),
            ),
            (
                "HS256 with the RSA public key (DER) as secret",
                hand_built(
                    json!({"alg": "HS256", "kid": "rsa-1"}),
                    &claims(),
                    hs256(&f.rsa.public_der),
                ),
                JwtError::AlgorithmNotAllowed("HS256".into()),
            ),
            (
                "RS384 not in the allowlist",
                hand_built(json!({"alg": "RS384", "kid": "rsa-1"}), &claims(), |_| {
                    vec![0; 256]
                }),
                JwtError::AlgorithmNotAllowed("RS384".into()),
            ),
            (
                "unknown alg",
                hand_built(json!({"alg": "ES512"}), &claims(), |_| vec![1]),
                JwtError::AlgorithmNotAllowed("ES512".into()),
            ),
            (
                "ES256 token naming the RSA key",
                sign_with(Signer::Ec, Some("rsa-1"), &claims()),
                JwtError::KeyAlgorithmMismatch,
            ),
            (
                "EdDSA token naming the EC key",
                sign_with(Signer::Ed, Some("ec-1"), &claims()),
                JwtError::KeyAlgorithmMismatch,
            ),
        ];
        for (name, token, expected) in cases {
            assert_eq!(check(&v, &keys, &token), Err(expected), "{name}");
        }
    }

    #[test]
    fn rsa_keys_never_verify_hs256() {
        // A provider that allows HS256 but (mis)configured with an RSA JWKS: the attacker signs
        // HS256 with the RSA public key as the HMAC secret. There is no oct key, so it fails.
        let f = fixtures();
        let keys = key_set(&[&f.rsa.jwk]);
        let v = Validator::new(&config_with(
            &["HS256"],
            jwks_json(&[&f.rsa.jwk]),
            json!({}),
        ))
        .expect("validator");
        let public_pem = pem("PUBLIC KEY", &f.rsa.public_der);
        for secret in [f.rsa.public_der.as_slice(), public_pem.as_bytes()] {
            let with_kid = hand_built(
                json!({"alg": "HS256", "kid": "rsa-1"}),
                &claims(),
                hs256(secret),
            );
            assert_eq!(
                check(&v, &keys, &with_kid),
                Err(JwtError::KeyAlgorithmMismatch)
            );
            let without_kid = hand_built(json!({"alg": "HS256"}), &claims(), hs256(secret));
            assert_eq!(
                check(&v, &keys, &without_kid),
                Err(JwtError::UnknownKid(None))
            );
        }
    }

    #[test]
    fn jwk_alg_pins_the_algorithm() {
        // The RSA JWK says alg RS256: a PS256 token naming it is refused even though PS256 is
        // allowed and the key type fits.
        let f = fixtures();
        let keys = main_keys();
        let v = Validator::new(&config_with(
            &["RS256", "PS256"],
            jwks_json(&[&f.rsa.jwk]),
            json!({}),
        ))
        .expect("validator");
        let mut header = Header::new(Algorithm::PS256);
        header.kid = Some("rsa-1".into());
        let token = encode(&header, &claims(), &f.rsa.encoding).expect("encode");
        assert_eq!(
            check(&v, &keys, &token),
            Err(JwtError::KeyAlgorithmMismatch)
        );
    }

    #[test]
    fn unknown_kid_asks_for_a_refetch() {
        let v = validator(json!({}));
        let keys = main_keys();
        let err = check(
            &v,
            &keys,
            &sign_with(Signer::Rsa, Some("rotated-2"), &claims()),
        )
        .expect_err("unknown kid");
        assert_eq!(err, JwtError::UnknownKid(Some("rotated-2".into())));
        assert!(err.is_unknown_kid());
        assert!(!JwtError::BadSignature.is_unknown_kid());
        // After the refetch brings the key, the same token passes.
        let mut rotated = fixtures().rsa.jwk.clone();
        rotated["kid"] = json!("rotated-2");
        let refreshed = key_set(&[&rotated]);
        check(
            &v,
            &refreshed,
            &sign_with(Signer::Rsa, Some("rotated-2"), &claims()),
        )
        .expect("after refetch");
        // The kid kept in the error is sanitized.
        let odd = check(
            &v,
            &keys,
            &sign_with(Signer::Rsa, Some("a\"b\r\nc"), &claims()),
        );
        assert_eq!(odd, Err(JwtError::UnknownKid(Some("a?b??c".into()))));
    }

    #[test]
    fn token_without_kid_needs_an_unambiguous_key() {
        let f = fixtures();
        let v = validator(json!({}));
        let token = sign_with(Signer::Rsa, None, &claims());
        let verified = v
            .validate(&token, &main_keys(), NOW)
            .expect("single RSA key");
        assert_eq!(verified.kid.as_deref(), Some("rsa-1"));
        let two_rsa = key_set(&[&f.rsa.jwk, &f.attacker.jwk]);
        assert_eq!(check(&v, &two_rsa, &token), Err(JwtError::KidRequired));
        let no_rsa = key_set(&[&f.ec_jwk]);
        assert_eq!(check(&v, &no_rsa, &token), Err(JwtError::UnknownKid(None)));
    }

    #[test]
    fn critical_headers_are_rejected() {
        let v = validator(json!({}));
        let keys = main_keys();
        let token = sign_header(Signer::Rsa, Some("rsa-1"), &claims(), |h| {
            h.crit = Some(vec!["exp".into()]);
        });
        assert_eq!(
            check(&v, &keys, &token),
            Err(JwtError::UnsupportedCritical("exp".into()))
        );
        let empty = sign_header(Signer::Rsa, Some("rsa-1"), &claims(), |h| {
            h.crit = Some(vec![])
        });
        assert_eq!(check(&v, &keys, &empty), Err(JwtError::Malformed));
    }

    #[test]
    fn embedded_keys_and_key_urls_are_ignored() {
        let v = validator(json!({}));
        let keys = main_keys();
        let f = fixtures();
        let attacker_jwk: Jwk = serde_json::from_value(f.attacker.jwk.clone()).expect("jwk");
        let attacker_cert = b64(&f.attacker.public_der, false);
        let cases: Vec<(&str, String, JwtError)> = vec![
            (
                "jwk header with our kid",
                sign_header(Signer::Attacker, Some("rsa-1"), &claims(), |h| {
                    h.jwk = Some(attacker_jwk.clone());
                }),
                JwtError::BadSignature,
            ),
            (
                "jwk header with the attacker's kid",
                sign_header(Signer::Attacker, Some("evil"), &claims(), |h| {
                    h.jwk = Some(attacker_jwk.clone());
                }),
                JwtError::UnknownKid(Some("evil".into())),
            ),
            (
                "jku header",
                sign_header(Signer::Attacker, Some("evil"), &claims(), |h| {
                    h.jku = Some("https://attacker.test/jwks.json".into());
                }),
                JwtError::UnknownKid(Some("evil".into())),
            ),
            (
                "x5u header without kid",
                sign_header(Signer::Attacker, None, &claims(), |h| {
                    h.x5u = Some("https://attacker.test/cert.pem".into());
                }),
                JwtError::BadSignature,
            ),
            (
                "x5c header",
                sign_header(Signer::Attacker, Some("rsa-1"), &claims(), |h| {
                    h.x5c = Some(vec![attacker_cert.clone()]);
                }),
                JwtError::BadSignature,
            ),
        ];
        for (name, token, expected) in cases {
            assert_eq!(check(&v, &keys, &token), Err(expected), "{name}");
        }
    }

    #[test]
    fn malformed_and_oversized_tokens() {
        let v = validator(json!({}));
        let keys = main_keys();
        let good = sign_with(Signer::Rsa, Some("rsa-1"), &claims());
        let header_only = b64url(br#"{"alg":"RS256","kid":"rsa-1"}"#);
        let cases: Vec<(&str, String, JwtError)> = vec![
            ("empty", String::new(), JwtError::Malformed),
            ("one part", "abc".into(), JwtError::Malformed),
            ("two parts", "abc.def".into(), JwtError::Malformed),
            ("four parts", format!("{good}.x"), JwtError::Malformed),
            (
                "header not base64url",
                "a+b.c.d".into(),
                JwtError::Malformed,
            ),
            (
                "header not JSON",
                format!("{}.e30.", b64url(b"nope")),
                JwtError::Malformed,
            ),
            (
                "header an array",
                format!("{}.e30.", b64url(b"[]")),
                JwtError::Malformed,
            ),
            (
                "header without alg",
                format!("{}.e30.", b64url(b"{}")),
                JwtError::Malformed,
            ),
            (
                "kid not a string",
                format!("{}.e30.", b64url(br#"{"alg":"RS256","kid":7}"#)),
                JwtError::Malformed,
            ),
            // The signature is checked before the payload is decoded.
            (
                "payload not base64url",
                format!("{header_only}.!!!.abc"),
                JwtError::BadSignature,
            ),
            (
                "payload not an object",
                { hand_built(json!({"alg": "HS256"}), &json!([1]), |_| vec![]) },
                JwtError::AlgorithmNotAllowed("HS256".into()),
            ),
            ("oversized", "a".repeat(8193), JwtError::TooLarge),
        ];
        for (name, token, expected) in cases {
            assert_eq!(check(&v, &keys, &token), Err(expected), "{name}");
        }
        let small = validator(json!({"max_token_bytes": 100}));
        assert_eq!(check(&small, &keys, &good), Err(JwtError::TooLarge));
    }

    #[test]
    fn payload_must_be_a_json_object() {
        let v = validator(json!({}));
        let f = fixtures();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = encode(&header, &json!(["not", "claims"]), &f.rsa.encoding).expect("encode");
        assert_eq!(check(&v, &main_keys(), &token), Err(JwtError::Malformed));
    }

    // ---- key set -----------------------------------------------------------------------------

    #[test]
    fn small_rsa_key_is_skipped_and_its_kid_unknown() {
        let f = fixtures();
        let mut modulus = vec![0xC3u8; 128];
        modulus[127] |= 1;
        let weak = json!({"kty": "RSA", "kid": "weak", "n": b64url(&modulus), "e": "AQAB"});
        let keys = key_set(&[&f.rsa.jwk, &weak]);
        assert!(!keys.has_kid("weak"));
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.skipped().len(), 1);
        assert!(
            keys.skipped()[0].contains("1024 bits"),
            "{:?}",
            keys.skipped()
        );
        let token = sign_with(Signer::Rsa, Some("weak"), &claims());
        assert_eq!(
            check(&validator(json!({})), &keys, &token),
            Err(JwtError::UnknownKid(Some("weak".into())))
        );
    }

    #[test]
    fn key_set_keeps_usable_keys_and_explains_the_rest() {
        let f = fixtures();
        let mut enc = f.rsa.jwk.clone();
        enc["kid"] = json!("enc-1");
        enc["use"] = json!("enc");
        let mut dup = f.attacker.jwk.clone();
        dup["kid"] = json!("rsa-1");
        let mut pinned_wrong = f.attacker.jwk.clone();
        pinned_wrong["kid"] = json!("rsa-es");
        pinned_wrong["alg"] = json!("ES256");
        let mut oaep = f.attacker.jwk.clone();
        oaep["kid"] = json!("rsa-oaep");
        oaep["alg"] = json!("RSA-OAEP");
        let mut no_verify = f.ec_jwk.clone();
        no_verify["kid"] = json!("ec-sign-only");
        no_verify["key_ops"] = json!(["sign"]);
        let mut kidless_rsa = f.attacker.jwk.clone();
        kidless_rsa.as_object_mut().expect("object").remove("kid");
        let mut kidless_ed = f.ed_jwk.clone();
        kidless_ed.as_object_mut().expect("object").remove("kid");
        let skipped_cases = [
            enc,
            dup,
            pinned_wrong,
            oaep,
            no_verify,
            kidless_rsa,
            json!({"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": "AA", "y": "AA"}),
            json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
            json!({"kty": "EC", "crv": "P-256", "kid": "short", "x": "AAAA", "y": "AAAA"}),
            json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64url(&[9; 32])}),
            json!({"kty": "oct", "kid": "short-secret", "k": b64url(b"tiny")}),
            json!({"kty": "weird", "kid": "w"}),
            json!("not an object"),
        ];
        let mut all: Vec<&Value> = vec![&f.rsa.jwk, &f.ec_jwk, &kidless_ed];
        all.extend(skipped_cases.iter());
        let keys = key_set(&all);
        assert_eq!(keys.kids(), ["rsa-1", "ec-1"]);
        assert_eq!(
            keys.len(),
            3,
            "two with kid plus the only Ed25519 key without kid"
        );
        assert!(!keys.is_empty());
        assert!(keys.has_kid("ec-1") && !keys.has_kid("enc-1"));
        assert_eq!(
            keys.skipped().len(),
            skipped_cases.len(),
            "{:#?}",
            keys.skipped()
        );
        for (index, needle) in [
            "use \"enc\" is not sig",
            "duplicate kid",
            "does not fit",
            "not a supported signature algorithm",
            "key_ops",
            "no kid and not the only RSA key",
            "unsupported or incomplete key",
            "unsupported EC curve",
            "not 32 bytes",
            "unsupported or incomplete key",
            "shorter than 32 bytes",
            "unsupported or incomplete key (kty \"weird\"",
            "not a JSON object",
        ]
        .into_iter()
        .enumerate()
        {
            let label = format!("key #{} ", index + 3);
            let label_end = format!("key #{}:", index + 3);
            let reason = keys
                .skipped()
                .iter()
                .find(|r| r.starts_with(&label) || r.starts_with(&label_end))
                .unwrap_or_else(|| panic!("no reason for {label}: {:#?}", keys.skipped()));
            assert!(
                reason.contains(needle),
                "{reason:?} should mention {needle:?}"
            );
        }
        // The kid-less Ed25519 key verifies kid-less EdDSA tokens.
        let v = validator(json!({}));
        check(&v, &keys, &sign_with(Signer::Ed, None, &claims())).expect("kid-less Ed25519");
    }

    #[test]
    fn key_set_errors_only_for_unreadable_documents() {
        assert!(matches!(
            KeySet::from_jwks(b"{nope"),
            Err(JwksError::InvalidJson(_))
        ));
        assert_eq!(KeySet::from_jwks(b"[]").err(), Some(JwksError::NotAJwkSet));
        assert_eq!(
            KeySet::from_jwks(br#"{"keys": {}}"#).err(),
            Some(JwksError::NotAJwkSet)
        );
        let empty = KeySet::from_jwks(br#"{"keys": []}"#).expect("empty set");
        assert!(empty.is_empty() && empty.kids().is_empty() && empty.skipped().is_empty());
    }

    // ---- extraction --------------------------------------------------------------------------

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn extract_from_each_location() {
        let v = validator(json!({"locations": [
            "bearer",
            {"header": {"name": "X-Token"}},
            {"cookie": {"name": "session"}},
            {"query": {"name": "access_token"}},
        ]}));
        let cases: Vec<(&str, HeaderMap, &str, Result<&str, JwtError>)> = vec![
            (
                "bearer",
                headers(&[("authorization", "Bearer t.o.k")]),
                "",
                Ok("t.o.k"),
            ),
            (
                "bearer lower case",
                headers(&[("authorization", "bearer   t.o.k ")]),
                "",
                Ok("t.o.k"),
            ),
            (
                "bearer upper case",
                headers(&[("authorization", "BEARER t.o.k")]),
                "",
                Ok("t.o.k"),
            ),
            (
                "bearer empty",
                headers(&[("authorization", "Bearer ")]),
                "",
                Err(JwtError::Malformed),
            ),
            (
                "bearer two words",
                headers(&[("authorization", "Bearer a b")]),
                "",
                Err(JwtError::Malformed),
            ),
            (
                "two authorization headers",
                headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
                "",
                Err(JwtError::Malformed),
            ),
            (
                "basic is not ours",
                headers(&[("authorization", "Basic dXNlcjpwdw==")]),
                "",
                Err(JwtError::Missing),
            ),
            (
                "basic falls through to the header",
                headers(&[
                    ("authorization", "Basic dXNlcjpwdw=="),
                    ("x-token", "h.d.r"),
                ]),
                "",
                Ok("h.d.r"),
            ),
            ("header", headers(&[("x-token", "h.d.r")]), "", Ok("h.d.r")),
            (
                "header empty is absent",
                headers(&[("x-token", "")]),
                "",
                Err(JwtError::Missing),
            ),
            (
                "cookie among others",
                headers(&[("cookie", "theme=dark; session=c.o.k; lang=en")]),
                "",
                Ok("c.o.k"),
            ),
            (
                "cookie quoted",
                headers(&[("cookie", "session=\"c.o.k\"")]),
                "",
                Ok("c.o.k"),
            ),
            (
                "cookie in a second header",
                headers(&[("cookie", "a=1"), ("cookie", "session=c.o.k")]),
                "",
                Ok("c.o.k"),
            ),
            (
                "cookie name is exact",
                headers(&[("cookie", "xsession=c.o.k")]),
                "",
                Err(JwtError::Missing),
            ),
            (
                "query",
                HeaderMap::new(),
                "page=2&access_token=q.r.y",
                Ok("q.r.y"),
            ),
            (
                "query with ?",
                HeaderMap::new(),
                "?access_token=q.r.y",
                Ok("q.r.y"),
            ),
            (
                "query twice",
                HeaderMap::new(),
                "access_token=a&access_token=b",
                Err(JwtError::Malformed),
            ),
            (
                "query empty",
                HeaderMap::new(),
                "access_token=",
                Err(JwtError::Missing),
            ),
            (
                "first location wins",
                headers(&[("authorization", "Bearer b.b.b"), ("x-token", "h.h.h")]),
                "access_token=q.q.q",
                Ok("b.b.b"),
            ),
            ("nothing", HeaderMap::new(), "", Err(JwtError::Missing)),
        ];
        for (name, map, query, expected) in cases {
            assert_eq!(v.extract(&map, query), expected, "{name}");
        }
    }

    #[test]
    fn extract_defaults_to_bearer_and_bounds_size() {
        let v = validator(json!({"max_token_bytes": 10}));
        let map = headers(&[("authorization", "Bearer 0123456789"), ("x-token", "a.b.c")]);
        assert_eq!(v.extract(&map, "access_token=a.b.c"), Ok("0123456789"));
        let big = headers(&[("authorization", "Bearer 0123456789a")]);
        assert_eq!(v.extract(&big, ""), Err(JwtError::TooLarge));
        assert_eq!(
            v.extract(&HeaderMap::new(), "access_token=a.b.c"),
            Err(JwtError::Missing)
        );
    }

    // ---- verified token ----------------------------------------------------------------------

    fn verified(claims: Value) -> VerifiedToken {
        VerifiedToken {
            claims: claims.as_object().expect("object").clone(),
            kid: None,
            alg: "RS256".into(),
        }
    }

    #[test]
    fn scopes_from_each_claim_form() {
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (json!({"scope": "read  write read"}), vec!["read", "write"]),
            (json!({"scp": ["a", "b", 3]}), vec!["a", "b"]),
            (json!({"scp": "a b"}), vec!["a", "b"]),
            (json!({"scopes": ["x"]}), vec!["x"]),
            (json!({"scope": "first", "scp": ["second"]}), vec!["first"]),
            (json!({"scope": 5, "scp": ["fallback"]}), vec!["fallback"]),
            (json!({"scope": ""}), vec![]),
            (json!({}), vec![]),
        ];
        for (claims, expected) in cases {
            assert_eq!(verified(claims.clone()).scopes(), expected, "{claims}");
        }
    }

    #[test]
    fn claims_as_header_values() {
        let token = verified(json!({
            "sub": "user-1", "n": 42, "f": 1.5, "admin": true, "groups": ["a", "b", 7],
            "empty": [], "nested": [["x"]], "obj": {"a": 1}, "null": null,
            "crlf": "a\r\nX-Evil: 1", "name": "José",
        }));
        let cases = [
            ("sub", Some("user-1")),
            ("n", Some("42")),
            ("f", Some("1.5")),
            ("admin", Some("true")),
            ("groups", Some("a b 7")),
            ("empty", None),
            ("nested", None),
            ("obj", None),
            ("null", None),
            ("crlf", None),
            ("name", Some("José")),
            ("absent", None),
        ];
        for (claim, expected) in cases {
            assert_eq!(
                token.claim_as_header_value(claim).as_deref(),
                expected,
                "{claim}"
            );
        }
    }

    #[test]
    fn claim_headers_follow_the_mapping() {
        let v = validator(
            json!({"claims_to_headers": {"sub": "X-User-Id", "groups": "X-Groups", "missing": "X-Missing"}}),
        );
        let names: Vec<&str> = v.claim_header_names().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-groups", "x-missing", "x-user-id"]);
        let token = verified(json!({"sub": "u1", "groups": ["a", "b"]}));
        let headers = v.claim_headers(&token);
        assert_eq!(
            headers,
            vec![
                (
                    HeaderName::from_static("x-groups"),
                    HeaderValue::from_static("a b")
                ),
                (
                    HeaderName::from_static("x-user-id"),
                    HeaderValue::from_static("u1")
                ),
            ]
        );
    }

    #[test]
    fn errors_render_as_www_authenticate() {
        assert_eq!(JwtError::Missing.www_authenticate(), "Bearer");
        assert_eq!(
            JwtError::Expired.www_authenticate(),
            "Bearer error=\"invalid_token\", error_description=\"token expired\""
        );
        // Attacker-controlled payloads never reach the description.
        let alg = JwtError::AlgorithmNotAllowed("x\"y".into());
        assert_eq!(alg.to_string(), "algorithm not allowed");
        assert_eq!(
            JwtError::UnsupportedCritical("b64".into()).to_string(),
            "unsupported critical header"
        );
        assert_eq!(
            JwtError::MissingClaim("aud").to_string(),
            "missing claim: aud"
        );
    }

    // ---- config ------------------------------------------------------------------------------

    #[test]
    fn config_defaults_and_serde_shape() {
        let config: JwtProviderConfig = serde_json::from_value(json!({
            "name": "idp",
            "jwks_uri": "https://idp.test/.well-known/jwks.json",
            "algorithms": ["RS256"],
        }))
        .expect("config");
        assert_eq!(config.issuer, None);
        assert!(config.audiences.is_empty());
        assert_eq!(config.leeway, Duration::from_secs(30));
        assert!(config.require_exp);
        assert!(config.locations.is_empty());
        assert!(config.claims_to_headers.is_empty());
        assert_eq!(config.max_token_bytes, 8192);
        assert_eq!(config.jwks_refresh, Duration::from_secs(300));
        assert_eq!(
            config.unknown_kid_refetch_min_interval,
            Duration::from_secs(30)
        );
        assert_eq!(
            config.key_source(),
            Ok(KeySource::Uri("https://idp.test/.well-known/jwks.json"))
        );
        config.validate().expect("valid");

        let locations: Vec<TokenLocation> = serde_json::from_value(json!([
            "bearer",
            {"header": {"name": "X-Token"}},
            {"cookie": {"name": "session"}},
            {"query": {"name": "access_token"}},
        ]))
        .expect("locations");
        assert_eq!(
            locations,
            [
                TokenLocation::Bearer,
                TokenLocation::Header {
                    name: "X-Token".into()
                },
                TokenLocation::Cookie {
                    name: "session".into()
                },
                TokenLocation::Query {
                    name: "access_token".into()
                },
            ]
        );
        assert_eq!(
            serde_json::to_value(&locations).expect("serialize"),
            json!(["bearer", {"header": {"name": "X-Token"}}, {"cookie": {"name": "session"}}, {"query": {"name": "access_token"}}])
        );
        let roundtrip: JwtProviderConfig =
            serde_json::from_value(serde_json::to_value(&config).expect("serialize"))
                .expect("parse");
        assert_eq!(roundtrip, config);

        let unknown = serde_json::from_value::<JwtProviderConfig>(json!({
            "name": "idp", "jwks_uri": "https://idp.test/jwks", "algorithms": ["RS256"], "leway": "1s",
        }));
        assert!(unknown.is_err());
        let bad_location =
            serde_json::from_value::<TokenLocation>(json!({"header": {"name": "a", "extra": 1}}));
        assert!(bad_location.is_err());

        let schema =
            serde_json::to_value(schemars::schema_for!(JwtProviderConfig)).expect("schema");
        assert!(schema["properties"]["leeway"].is_object(), "{schema}");
    }

    #[test]
    fn config_errors() {
        let f = fixtures();
        let base = || main_config(json!({}));
        let with = |edit: &dyn Fn(&mut JwtProviderConfig)| {
            let mut c = base();
            edit(&mut c);
            c
        };
        let cases: Vec<(&str, JwtProviderConfig, JwtConfigError)> = vec![
            (
                "no algorithms",
                with(&|c| c.algorithms.clear()),
                JwtConfigError::NoAlgorithms,
            ),
            (
                "none",
                with(&|c| c.algorithms = vec!["RS256".into(), "none".into()]),
                JwtConfigError::NoneAlgorithm,
            ),
            (
                "None",
                with(&|c| c.algorithms = vec!["None".into()]),
                JwtConfigError::NoneAlgorithm,
            ),
            (
                "HS with RS",
                with(&|c| c.algorithms = vec!["RS256".into(), "HS256".into()]),
                JwtConfigError::MixedAlgorithms,
            ),
            (
                "HS with EdDSA",
                with(&|c| c.algorithms = vec!["HS512".into(), "EdDSA".into()]),
                JwtConfigError::MixedAlgorithms,
            ),
            (
                "unsupported",
                with(&|c| c.algorithms = vec!["ES512".into()]),
                JwtConfigError::UnknownAlgorithm("ES512".into()),
            ),
            (
                "no key source",
                with(&|c| c.jwks = None),
                JwtConfigError::KeySources(0),
            ),
            (
                "two key sources",
                with(&|c| c.jwks_uri = Some("https://idp.test/jwks".into())),
                JwtConfigError::KeySources(2),
            ),
            (
                "three key sources",
                with(&|c| {
                    c.jwks_uri = Some("https://idp.test/jwks".into());
                    c.jwks_file = Some("/etc/jwks.json".into());
                }),
                JwtConfigError::KeySources(3),
            ),
            (
                "relative uri",
                with(&|c| {
                    c.jwks = None;
                    c.jwks_uri = Some("/jwks".into());
                }),
                JwtConfigError::InvalidJwksUri("/jwks".into()),
            ),
            (
                "ftp uri",
                with(&|c| {
                    c.jwks = None;
                    c.jwks_uri = Some("ftp://idp.test/jwks".into());
                }),
                JwtConfigError::InvalidJwksUri("ftp://idp.test/jwks".into()),
            ),
            (
                "empty file",
                with(&|c| {
                    c.jwks = None;
                    c.jwks_file = Some(PathBuf::new());
                }),
                JwtConfigError::EmptyJwksFile,
            ),
            (
                "inline not a JWKS",
                with(&|c| c.jwks = Some(json!([1]))),
                JwtConfigError::InvalidInlineJwks(JwksError::NotAJwkSet),
            ),
            (
                "inline without usable key",
                with(&|c| c.jwks = Some(json!({"keys": [{"kty": "weird"}]}))),
                JwtConfigError::EmptyInlineJwks,
            ),
            (
                "empty name",
                with(&|c| c.name = " ".into()),
                JwtConfigError::EmptyName,
            ),
            (
                "empty issuer",
                with(&|c| c.issuer = Some(String::new())),
                JwtConfigError::EmptyIssuer,
            ),
            (
                "empty audience",
                with(&|c| c.audiences.push(String::new())),
                JwtConfigError::EmptyAudience,
            ),
            (
                "zero max",
                with(&|c| c.max_token_bytes = 0),
                JwtConfigError::ZeroMaxTokenBytes,
            ),
            (
                "zero refresh",
                with(&|c| c.jwks_refresh = Duration::ZERO),
                JwtConfigError::ZeroInterval("jwks_refresh"),
            ),
            (
                "zero refetch",
                with(&|c| c.unknown_kid_refetch_min_interval = Duration::ZERO),
                JwtConfigError::ZeroInterval("unknown_kid_refetch_min_interval"),
            ),
            (
                "empty cookie name",
                with(&|c| {
                    c.locations = vec![TokenLocation::Cookie {
                        name: String::new(),
                    }]
                }),
                JwtConfigError::EmptyLocationName,
            ),
            (
                "bad location header",
                with(&|c| {
                    c.locations = vec![TokenLocation::Header {
                        name: "X Token".into(),
                    }]
                }),
                JwtConfigError::InvalidHeaderName("X Token".into()),
            ),
            (
                "bad claim header",
                with(&|c| {
                    c.claims_to_headers.insert("sub".into(), "X:User".into());
                }),
                JwtConfigError::InvalidHeaderName("X:User".into()),
            ),
            (
                "forbidden claim header",
                with(&|c| {
                    c.claims_to_headers.insert("sub".into(), "Host".into());
                }),
                JwtConfigError::ForbiddenHeader("Host".into()),
            ),
            (
                "duplicate claim header",
                with(&|c| {
                    c.claims_to_headers.insert("a".into(), "X-Id".into());
                    c.claims_to_headers.insert("b".into(), "x-id".into());
                }),
                JwtConfigError::DuplicateHeader("x-id".into()),
            ),
            (
                "empty claim",
                with(&|c| {
                    c.claims_to_headers.insert(String::new(), "X-Id".into());
                }),
                JwtConfigError::EmptyClaimName,
            ),
        ];
        for (name, config, expected) in cases {
            assert_eq!(
                Validator::new(&config).err(),
                Some(expected.clone()),
                "{name}"
            );
            assert_eq!(config.validate(), Err(expected), "{name}");
        }
        // The same key set, accepted as a file or URL source.
        let ok = with(&|c| {
            c.jwks = None;
            c.jwks_file = Some("/etc/meshgate/jwks.json".into());
        });
        assert_eq!(
            ok.key_source(),
            Ok(KeySource::File(Path::new("/etc/meshgate/jwks.json")))
        );
        assert!(matches!(base().key_source(), Ok(KeySource::Inline(_))));
        assert_eq!(Validator::new(&base()).expect("valid").name(), "test");
        assert_eq!(f.ec_jwk["kid"], "ec-1");
    }
}
