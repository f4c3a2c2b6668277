//! CORS answered at the gateway: preflight responses and the `Access-Control-*` headers of
//! every cross-origin response.
//!
//! This module owns the CORS policy of a route: compiling [`CorsConfig`] into [`Cors`],
//! answering preflights ([`Cors::preflight`]) and rewriting response headers
//! ([`Cors::apply_response`]). Upstream services never get a say: every `Access-Control-*`
//! header they return is removed, so one route has exactly one policy.
//!
//! It must not do I/O, build whole responses (status codes and bodies are the caller's), or
//! decide anything beyond CORS: a CORS "allowed" is no authentication or authorisation verdict.

use std::collections::BTreeSet;

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use serde::{Deserialize, Serialize};

/// Request headers that need no `Access-Control-Allow-Headers` entry (the CORS-safelisted
/// request-header names), lowercase.
const SAFELISTED_HEADERS: [&str; 4] = [
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];

/// A route's CORS policy, as written in configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call the route: exact `scheme://host[:port]` values (compared
    /// case-insensitively; a default port such as `:443` on `https` is dropped), or `"*"` for
    /// any origin (other entries are still checked, then redundant). Default: empty (no
    /// cross-origin access).
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Methods a cross-origin request may use (upper-cased here; the requested method must
    /// match exactly, as browsers send it).
    /// Default: `GET, HEAD, POST, PUT, PATCH, DELETE`.
    #[serde(default = "default_allow_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a cross-origin request may send beyond the CORS-safelisted ones
    /// (`Accept`, `Accept-Language`, `Content-Language`, `Content-Type`). List `Content-Type`
    /// here too if browsers should send non-form bodies such as `application/json`.
    /// Default: empty.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read (`Access-Control-Expose-Headers`). Default: empty.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Whether credentials (cookies, HTTP auth) may be sent; incompatible with `"*"` origins.
    /// Default: `false`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight answer, in seconds. Default: `600`.
    #[serde(default = "default_max_age_seconds")]
    pub max_age_seconds: u64,
}

fn default_allow_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .into_iter()
        .map(String::from)
        .collect()
}

fn default_max_age_seconds() -> u64 {
    600
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            allow_methods: default_allow_methods(),
            allow_headers: Vec::new(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age_seconds: default_max_age_seconds(),
        }
    }
}

/// Why a [`CorsConfig`] cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorsError {
    /// `"*"` origins together with `allow_credentials`: browsers reject that combination.
    #[error(
        "cors: allow_origins \"*\" cannot be combined with allow_credentials (browsers reject it); list the origins"
    )]
    WildcardWithCredentials,
    /// An origin that is not `scheme://host[:port]`.
    #[error("cors: origin {origin:?} is not scheme://host[:port] ({reason})")]
    InvalidOrigin {
        /// The origin as configured.
        origin: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A method that is not an HTTP method token.
    #[error("cors: allow_methods entry {0:?} is not an HTTP method")]
    InvalidMethod(String),
    /// A header name that is not valid (or is `"*"`, which is not supported).
    #[error("cors: {field} entry {name:?} is not a header name")]
    InvalidHeader {
        /// `allow_headers` or `expose_headers`.
        field: &'static str,
        /// The name as configured.
        name: String,
    },
}

/// Which origins a compiled policy accepts.
#[derive(Debug, Clone)]
enum Origins {
    /// `"*"`: any origin, answered with `Access-Control-Allow-Origin: *`.
    Any,
    /// Exact origins, lowercase and without default ports.
    List(BTreeSet<String>),
}

/// A compiled, validated CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Origins,
    methods: Vec<Method>,
    methods_value: HeaderValue,
    allow_headers: Vec<HeaderName>,
    allow_headers_value: Option<HeaderValue>,
    expose_headers_value: Option<HeaderValue>,
    credentials: bool,
    max_age_value: HeaderValue,
}

/// The answer to a possible preflight request.
#[derive(Debug, Clone, PartialEq)]
pub enum Preflight {
    /// Not a preflight (not `OPTIONS`, or no `Origin` / `Access-Control-Request-Method`):
    /// route the request normally.
    NotPreflight,
    /// An allowed preflight: answer it at the gateway (typically `204`) with these headers.
    Allowed(HeaderMap),
    /// A refused preflight: answer without CORS headers (typically `403`); the reason is for
    /// logs, not for the client.
    Denied(&'static str),
}

impl Cors {
    /// Validates and compiles a policy.
    ///
    /// # Errors
    /// `"*"` with credentials, an origin that is not `scheme://host[:port]`, a method or a
    /// header name that is not a valid token (`"*"` is not accepted as a header name).
    pub fn new(cfg: &CorsConfig) -> Result<Cors, CorsError> {
        let mut listed = BTreeSet::new();
        let mut wildcard = false;
        for origin in &cfg.allow_origins {
            if origin.trim() == "*" {
                wildcard = true;
            } else {
                listed.insert(normalize_origin(origin)?);
            }
        }
        let origins = match (wildcard, cfg.allow_credentials) {
            (true, true) => return Err(CorsError::WildcardWithCredentials),
            (true, false) => Origins::Any,
            (false, _) => Origins::List(listed),
        };

        let mut methods: Vec<Method> = Vec::new();
        for m in &cfg.allow_methods {
            let method = Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| CorsError::InvalidMethod(m.clone()))?;
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        let methods_value = join_value(methods.iter().map(Method::as_str))
            .expect("invariant: method tokens are valid header value text");

        let allow_headers = parse_header_names("allow_headers", &cfg.allow_headers)?;
        let expose_headers = parse_header_names("expose_headers", &cfg.expose_headers)?;
        let allow_headers_value = join_value(allow_headers.iter().map(HeaderName::as_str));
        let expose_headers_value = join_value(expose_headers.iter().map(HeaderName::as_str));

        Ok(Cors {
            origins,
            methods,
            methods_value,
            allow_headers,
            allow_headers_value,
            expose_headers_value,
            credentials: cfg.allow_credentials,
            max_age_value: HeaderValue::from(cfg.max_age_seconds),
        })
    }

    /// Answers a preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    ///
    /// Allowed answers carry `Access-Control-Allow-Origin` (the request's origin, or `*` for a
    /// `"*"` policy), `-Allow-Methods`, `-Allow-Headers` (the configured list; absent when it
    /// is empty), `-Max-Age`, `-Allow-Credentials: true` when configured, and
    /// `Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers`.
    /// Denied when the origin, the method or any requested header (other than a
    /// CORS-safelisted one) is not allowed, or when those headers are malformed.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Preflight {
        if method != Method::OPTIONS
            || !headers.contains_key(header::ORIGIN)
            || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Preflight::NotPreflight;
        }
        let Some(origin) = self.allowed_origin(headers) else {
            return Preflight::Denied("origin not allowed");
        };

        let mut requested = headers
            .get_all(header::ACCESS_CONTROL_REQUEST_METHOD)
            .iter();
        let (Some(requested_method), None) = (requested.next(), requested.next()) else {
            return Preflight::Denied("malformed Access-Control-Request-Method");
        };
        let Ok(requested_method) = Method::from_bytes(requested_method.as_bytes()) else {
            return Preflight::Denied("malformed Access-Control-Request-Method");
        };
        if !self.methods.contains(&requested_method) {
            return Preflight::Denied("method not allowed");
        }

        for value in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let Ok(list) = value.to_str() else {
                return Preflight::Denied("malformed Access-Control-Request-Headers");
            };
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                    return Preflight::Denied("malformed Access-Control-Request-Headers");
                };
                if !SAFELISTED_HEADERS.contains(&name.as_str())
                    && !self.allow_headers.contains(&name)
                {
                    return Preflight::Denied("request header not allowed");
                }
            }
        }

        let mut out = HeaderMap::new();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.methods_value.clone(),
        );
        if let Some(v) = &self.allow_headers_value {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age_value.clone());
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        out.insert(
            header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Preflight::Allowed(out)
    }

    /// Rewrites a response's CORS headers.
    ///
    /// Always removes every `Access-Control-*` header the upstream set. Then, if the request
    /// carried an allowed `Origin`, sets `Access-Control-Allow-Origin`, `-Expose-Headers` (when
    /// configured) and `-Allow-Credentials` (when configured). `Origin` is appended to `Vary`
    /// (unless already listed, or `Vary: *`) when the request's origin was allowed, and also
    /// for every response of an origin-list policy, because whether the response carries
    /// `Access-Control-Allow-Origin` then depends on the request's `Origin` and shared caches
    /// must key on it.
    pub fn apply_response(&self, request_headers: &HeaderMap, response_headers: &mut HeaderMap) {
        let upstream_cors: Vec<HeaderName> = response_headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in upstream_cors {
            response_headers.remove(name);
        }

        let allowed = self.allowed_origin(request_headers);
        let varies = allowed.is_some() || matches!(self.origins, Origins::List(_));
        if let Some(origin) = allowed {
            response_headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            if let Some(v) = &self.expose_headers_value {
                response_headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
            }
            if self.credentials {
                response_headers.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        if varies {
            append_vary_origin(response_headers);
        }
    }

    /// The `Access-Control-Allow-Origin` value for this request, if its single `Origin` header
    /// is allowed.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut all = headers.get_all(header::ORIGIN).iter();
        let (Some(origin), None) = (all.next(), all.next()) else {
            return None;
        };
        let text = origin.to_str().ok()?;
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(set) => set
                .contains(&text.to_ascii_lowercase())
                .then(|| origin.clone()),
        }
    }
}

/// Appends `Origin` to `Vary` unless it is already listed or `Vary` is `*`.
fn append_vary_origin(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.eq_ignore_ascii_case("origin"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Parses configured header names (lowercased, deduplicated, in configuration order).
fn parse_header_names(field: &'static str, names: &[String]) -> Result<Vec<HeaderName>, CorsError> {
    let mut out: Vec<HeaderName> = Vec::new();
    for name in names {
        let invalid = || CorsError::InvalidHeader {
            field,
            name: name.clone(),
        };
        let trimmed = name.trim();
        if trimmed == "*" {
            return Err(invalid());
        }
        let parsed = HeaderName::from_bytes(trimmed.as_bytes()).map_err(|_| invalid())?;
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

/// `a, b, c` as a header value; `None` for an empty list.
fn join_value<'a>(items: impl Iterator<Item = &'a str>) -> Option<HeaderValue> {
    let joined = items.collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

/// Checks `scheme://host[:port]` and returns it lowercased, without a default port.
fn normalize_origin(origin: &str) -> Result<String, CorsError> {
    let err = |reason| CorsError::InvalidOrigin {
        origin: origin.to_owned(),
        reason,
    };
    let lower = origin.trim().to_ascii_lowercase();
    let (scheme, authority) = lower
        .split_once("://")
        .ok_or_else(|| err("missing scheme://"))?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(err("bad scheme"));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(err("no path, query or trailing slash allowed"));
    }
    if authority.contains('@') {
        return Err(err("no user info allowed"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(|| err("unclosed ["))?;
        if v6.is_empty()
            || !v6
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(err("bad IPv6 host"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| err("junk after ]"))?),
        };
        (&authority[..v6.len() + 2], port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(err("bad host"));
        }
        (host, port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("bad port"));
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(err("bad port")),
                Ok(n) => Some(n),
            }
        }
    };
    Ok(match (scheme, port) {
        ("https", Some(443)) | ("http", Some(80)) | (_, None) => format!("{scheme}://{host}"),
        (_, Some(port)) => format!("{scheme}://{host}:{port}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header name/value pairs of a test request or response.
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    /// Expected values per header name (empty: header absent).
    type Expect<'a> = &'a [(&'a str, &'a [&'a str])];
    /// Configured names.
    type Names<'a> = &'a [&'a str];

    fn cfg(origins: &[&str], headers: &[&str], credentials: bool) -> CorsConfig {
        CorsConfig {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_headers: headers.iter().map(|s| s.to_string()).collect(),
            expose_headers: vec!["X-Total-Count".into()],
            allow_credentials: credentials,
            ..CorsConfig::default()
        }
    }

    fn map(pairs: Pairs<'_>) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        m
    }

    fn values(m: &HeaderMap, name: &str) -> Vec<String> {
        m.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_string())
            .collect()
    }

    fn check(m: &HeaderMap, expect: Expect<'_>, case: &str) {
        for (name, want) in expect {
            assert_eq!(values(m, name), *want, "{case}: {name}");
        }
    }

    #[test]
    fn config_defaults_and_deny_unknown_fields() {
        let parsed: CorsConfig = serde_json::from_str("{}").expect("empty config parses");
        assert_eq!(parsed, CorsConfig::default());
        assert_eq!(parsed.max_age_seconds, 600);
        assert_eq!(
            parsed.allow_methods,
            ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        );
        assert!(serde_json::from_str::<CorsConfig>(r#"{"allow_origin": []}"#).is_err());
    }

    #[test]
    fn config_errors() {
        let origin = |o: &str, reason| {
            Err(CorsError::InvalidOrigin {
                origin: o.into(),
                reason,
            })
        };
        let header = |name: &str| {
            Err(CorsError::InvalidHeader {
                field: "allow_headers",
                name: name.into(),
            })
        };
        let wildcard = Err(CorsError::WildcardWithCredentials);
        // (allow_origins, allow_headers, allow_credentials, want)
        #[rustfmt::skip]
        let cases: &[(Names<'_>, Names<'_>, bool, Result<(), CorsError>)] = &[
            (&["*"], &[], true, wildcard.clone()),
            (&["https://a.example", "*"], &[], true, wildcard),
            (&["*", "a.example"], &[], false, origin("a.example", "missing scheme://")),
            (&["*"], &[], false, Ok(())),
            (&[], &[], true, Ok(())),
            (&["https://a.example", "http://[::1]:8080"], &["X-A"], true, Ok(())),
            (&["https://a.example:8443"], &[], false, Ok(())),
            (&["a.example"], &[], false, origin("a.example", "missing scheme://")),
            (&["null"], &[], false, origin("null", "missing scheme://")),
            (&["1ttp://a.example"], &[], false, origin("1ttp://a.example", "bad scheme")),
            (&["https://a.example/"], &[], false,
                origin("https://a.example/", "no path, query or trailing slash allowed")),
            (&["https://a.example:0"], &[], false, origin("https://a.example:0", "bad port")),
            (&["https://a.example:99999"], &[], false, origin("https://a.example:99999", "bad port")),
            (&["https://a.example:"], &[], false, origin("https://a.example:", "bad port")),
            (&["https://u@a.example"], &[], false, origin("https://u@a.example", "no user info allowed")),
            (&["https://"], &[], false, origin("https://", "bad host")),
            (&["https://[::1"], &[], false, origin("https://[::1", "unclosed [")),
            (&["https://a.example"], &["*"], false, header("*")),
            (&["https://a.example"], &["bad header"], false, header("bad header")),
        ];
        for (origins, headers, credentials, want) in cases {
            let config = cfg(origins, headers, *credentials);
            let got = Cors::new(&config).map(|_| ());
            assert_eq!(&got, want, "{config:?}");
        }
        let bad_method = CorsConfig {
            allow_methods: vec!["GE T".into()],
            ..CorsConfig::default()
        };
        assert_eq!(
            Cors::new(&bad_method).err(),
            Some(CorsError::InvalidMethod("GE T".into()))
        );
    }

    #[test]
    fn origin_normalization() {
        let cases = [
            ("https://A.Example", "https://a.example"),
            ("https://a.example:443", "https://a.example"),
            ("http://a.example:80", "http://a.example"),
            ("http://a.example:443", "http://a.example:443"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("https://[::1]:443", "https://[::1]"),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_origin(input).as_deref().ok(),
                Some(want),
                "{input}"
            );
        }
    }

    enum Want {
        Not,
        Denied(&'static str),
        /// Allowed, with this `Access-Control-Allow-Origin`.
        Allowed(&'static str),
    }

    struct PreflightCase<'a> {
        name: &'a str,
        cors: &'a Cors,
        method: Method,
        request: Vec<(&'static str, &'static str)>,
        want: Want,
    }

    #[test]
    fn preflight_table() {
        let list = Cors::new(&cfg(
            &["https://app.example", "https://admin.example:8443"],
            &["Authorization", "X-Trace"],
            true,
        ))
        .expect("valid");
        let any = Cors::new(&cfg(&["*"], &[], false)).expect("valid");
        const APP: (&str, &str) = ("origin", "https://app.example");
        const ANYONE: (&str, &str) = ("origin", "https://whoever.example");
        let acrm = |m| ("access-control-request-method", m);
        let acrh = |h| ("access-control-request-headers", h);
        let case =
            |name, cors, method, request: &[(&'static str, &'static str)], want| PreflightCase {
                name,
                cors,
                method,
                request: request.to_vec(),
                want,
            };

        #[rustfmt::skip]
        let cases = [
            case("GET is no preflight", &list, Method::GET, &[APP, acrm("PUT")], Want::Not),
            case("OPTIONS without ACRM", &list, Method::OPTIONS, &[APP], Want::Not),
            case("OPTIONS without Origin", &list, Method::OPTIONS, &[acrm("PUT")], Want::Not),
            case("listed origin echoed", &list, Method::OPTIONS, &[APP, acrm("PUT")],
                Want::Allowed("https://app.example")),
            case("origin case-insensitive, echoed as sent", &list, Method::OPTIONS,
                &[("origin", "https://App.Example"), acrm("GET")], Want::Allowed("https://App.Example")),
            case("non-default port must match", &list, Method::OPTIONS,
                &[("origin", "https://admin.example"), acrm("GET")], Want::Denied("origin not allowed")),
            case("listed origin with port", &list, Method::OPTIONS,
                &[("origin", "https://admin.example:8443"), acrm("GET")],
                Want::Allowed("https://admin.example:8443")),
            case("unknown origin", &list, Method::OPTIONS,
                &[("origin", "https://evil.example"), acrm("GET")], Want::Denied("origin not allowed")),
            case("two Origin headers", &list, Method::OPTIONS, &[APP, APP, acrm("GET")],
                Want::Denied("origin not allowed")),
            case("method not allowed", &list, Method::OPTIONS, &[APP, acrm("CONNECT")],
                Want::Denied("method not allowed")),
            case("methods are case-sensitive on the wire", &list, Method::OPTIONS, &[APP, acrm("put")],
                Want::Denied("method not allowed")),
            case("malformed method", &list, Method::OPTIONS, &[APP, acrm("P T")],
                Want::Denied("malformed Access-Control-Request-Method")),
            case("allowed headers, any case, over several lines", &list, Method::OPTIONS,
                &[APP, acrm("POST"), acrh("authorization, x-TRACE"), acrh("content-type")],
                Want::Allowed("https://app.example")),
            case("header not allowed", &list, Method::OPTIONS,
                &[APP, acrm("POST"), acrh("authorization,x-secret")],
                Want::Denied("request header not allowed")),
            case("wildcard answers *", &any, Method::OPTIONS, &[ANYONE, acrm("DELETE")],
                Want::Allowed("*")),
            case("empty header list: safelisted only", &any, Method::OPTIONS,
                &[ANYONE, acrm("POST"), acrh("Content-Type, accept, Accept-Language, content-language")],
                Want::Allowed("*")),
            case("empty header list: others denied", &any, Method::OPTIONS,
                &[ANYONE, acrm("POST"), acrh("authorization")],
                Want::Denied("request header not allowed")),
        ];
        for PreflightCase {
            name,
            cors,
            method,
            request,
            want,
        } in cases
        {
            match (want, cors.preflight(&method, &map(&request))) {
                (Want::Not, Preflight::NotPreflight) => {}
                (Want::Denied(w), Preflight::Denied(g)) => assert_eq!(w, g, "{name}"),
                (Want::Allowed(origin), Preflight::Allowed(h)) => check(
                    &h,
                    &[
                        ("access-control-allow-origin", &[origin]),
                        (
                            "vary",
                            &[
                                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                            ],
                        ),
                        (
                            "access-control-allow-methods",
                            &["GET, HEAD, POST, PUT, PATCH, DELETE"],
                        ),
                        ("access-control-max-age", &["600"]),
                    ],
                    name,
                ),
                (_, got) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn preflight_headers_and_credentials() {
        let request = map(&[
            ("origin", "https://app.example"),
            ("access-control-request-method", "PUT"),
        ]);
        let short_cache = CorsConfig {
            max_age_seconds: 30,
            ..cfg(&["https://app.example"], &[], false)
        };
        let cases: &[(CorsConfig, Expect<'_>)] = &[
            (
                cfg(
                    &["https://app.example"],
                    &["Authorization", "X-Trace", "authorization"],
                    true,
                ),
                &[
                    ("access-control-allow-headers", &["authorization, x-trace"]),
                    ("access-control-allow-credentials", &["true"]),
                ],
            ),
            (
                short_cache,
                &[
                    ("access-control-allow-headers", &[]),
                    ("access-control-allow-credentials", &[]),
                    ("access-control-max-age", &["30"]),
                    ("access-control-expose-headers", &[]),
                ],
            ),
        ];
        for (config, want) in cases {
            let cors = Cors::new(config).expect("valid");
            let Preflight::Allowed(h) = cors.preflight(&Method::OPTIONS, &request) else {
                panic!("{config:?} should allow");
            };
            check(&h, want, &format!("{config:?}"));
        }
    }

    struct ResponseCase<'a> {
        name: &'a str,
        cors: &'a Cors,
        request: Pairs<'a>,
        upstream: Pairs<'a>,
        want: Expect<'a>,
    }

    #[test]
    fn apply_response_table() {
        let list = Cors::new(&cfg(&["https://app.example"], &[], true)).expect("valid");
        let any = Cors::new(&cfg(&["*"], &[], false)).expect("valid");
        let upstream_cors: Pairs<'_> = &[
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", "TRACE"),
            ("access-control-expose-headers", "x-internal"),
            ("content-type", "application/json"),
        ];
        const APP: (&str, &str) = ("origin", "https://app.example");
        let case = |name, cors, request, upstream, want| ResponseCase {
            name,
            cors,
            request,
            upstream,
            want,
        };

        #[rustfmt::skip]
        let cases = [
            case("allowed origin: upstream's replaced", &list, &[APP], &[], &[
                ("access-control-allow-origin", &["https://app.example"]),
                ("access-control-allow-credentials", &["true"]),
                ("access-control-expose-headers", &["x-total-count"]),
                ("content-type", &["application/json"]),
                ("vary", &["Origin"]),
            ]),
            case("foreign origin: upstream's removed, nothing set, still varies", &list,
                &[("origin", "https://evil.example")], &[], &[
                ("access-control-allow-origin", &[]),
                ("access-control-allow-credentials", &[]),
                ("access-control-expose-headers", &[]),
                ("vary", &["Origin"]),
            ]),
            case("no origin: upstream's removed, list policy varies", &list,
                &[], &[("vary", "Accept-Encoding")], &[
                ("access-control-allow-origin", &[]),
                ("vary", &["Accept-Encoding", "Origin"]),
            ]),
            case("Vary already names origin", &list, &[APP], &[("vary", "accept-encoding, origin")], &[
                ("vary", &["accept-encoding, origin"]),
            ]),
            case("Vary *", &list, &[APP], &[("vary", "*")], &[("vary", &["*"])]),
            case("wildcard policy answers *", &any, &[("origin", "https://x.example")], &[], &[
                ("access-control-allow-origin", &["*"]),
                ("access-control-allow-credentials", &[]),
                ("access-control-expose-headers", &["x-total-count"]),
                ("vary", &["Origin"]),
            ]),
            case("wildcard policy, no origin: nothing, no Vary", &any, &[], &[], &[
                ("access-control-allow-origin", &[]),
                ("access-control-expose-headers", &[]),
                ("vary", &[]),
            ]),
        ];
        for ResponseCase {
            name,
            cors,
            request,
            upstream,
            want,
        } in cases
        {
            let mut response = map(upstream_cors);
            for (k, v) in upstream {
                response.append(
                    HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            cors.apply_response(&map(request), &mut response);
            check(&response, want, name);
            assert!(
                !response.contains_key("access-control-allow-methods"),
                "{name}: upstream header survived"
            );
        }
    }
}
