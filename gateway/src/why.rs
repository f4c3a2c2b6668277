//! `POST /why` on the gateway's admin API: the layers a request would cross at this gateway,
//! in the order the pipeline runs them — path normalization, route selection, a rate limit
//! keyed on the client (before authentication), authentication, authorization (scopes, claims,
//! groups), a rate limit keyed on the caller (after it) — each with its verdict, and where the
//! request would go next (the backend services and the path they would see), so `meshgate why`
//! can ask the destination's discovery and intentions.
//!
//! Nothing is consumed or forwarded: rate limits are peeked (the store is asked what it would
//! decide, and nothing is counted), the credentials are checked as the auth filter checks them
//! (a verified token enters the JWT cache, as it would on a real request) and never appear in
//! the answer. Credentials come in the POST body, never in a URL.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_agent::http::{path::PathOptions, respond::Problem};
use serde::{Deserialize, Serialize};

use crate::{
    apikey::KeyLocation,
    auth::{Auth, Principal},
    routes::{BackendConfig, CompiledRoute, ROLL_RANGE, RequestView, RouteTable, choose_backend},
};

/// What `/why` is asked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhyRequest {
    /// The method (default GET).
    #[serde(default)]
    pub method: Option<String>,
    /// `http(s)://host/path?query` as the client would send it.
    pub url: String,
    /// Request headers, `[name, value]` pairs.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// An API key, put where the gateway looks first for one.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The client address rate limits and logs would see (default 127.0.0.1).
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
}

/// What `/why` needs from the running gateway; replaced on reload, as one value, so a question
/// never mixes the routes of one config with the policies of another.
#[derive(Debug)]
pub struct WhyState {
    /// The route table.
    pub table: Arc<RouteTable>,
    /// The compiled `auth` section (the same one the filters use).
    pub auth: Arc<Auth>,
    /// `limits.max_header_bytes`.
    pub max_head_bytes: usize,
    /// `limits.max_body` (a route's `max_body` overrides it).
    pub max_body: u64,
    /// `redirect_https`.
    pub redirect_https: bool,
    /// Whether a gateway-wide `cors` is set.
    pub cors: bool,
    /// Path normalization options.
    pub paths: PathOptions,
    /// The gateway's SPIFFE ID: the caller the destination's intentions see.
    pub caller: String,
}

/// One layer's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The request gets through this layer.
    Pass,
    /// The request stops here.
    Stop,
    /// The layer does not apply to this request.
    Skip,
    /// The layer applies but `why` cannot check it (a client certificate, a body).
    Unchecked,
}

/// One layer.
#[derive(Debug, Serialize)]
pub struct Layer {
    /// `path`, `route`, `rate-limit`, `authentication`, `authorization`, `backend`.
    pub layer: &'static str,
    /// The verdict.
    pub result: Verdict,
    /// Why, in words.
    pub detail: String,
    /// The status the gateway would answer with, when it stops here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The problem type it would answer with (docs/gateway.md), when it stops here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<&'static str>,
}

/// Where a request that gets through the gateway goes.
#[derive(Debug, Serialize)]
pub struct Backend {
    /// `mesh` (a service: discovery and intentions apply), `external` (a URL outside the
    /// mesh) or `gateway` (answered by the gateway: aggregation, the OpenAPI document).
    pub kind: &'static str,
    /// The service name, the URL, or the route name for `gateway`.
    pub target: String,
    /// The share of requests it would get, in percent (100 unless a weighted split).
    pub percent: f64,
    /// The path this backend sees, when it differs from the route's (an aggregate's calls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct WhyAnswer {
    /// The method.
    pub method: String,
    /// The normalized path the routes see.
    pub path: String,
    /// The matched route.
    pub route: Option<String>,
    /// Every layer, in the order the gateway runs them.
    pub layers: Vec<Layer>,
    /// Where it goes next (empty when it stops here).
    pub backends: Vec<Backend>,
    /// The method the backend would see (a transcoded route calls gRPC: POST).
    pub upstream_method: Option<String>,
    /// The path the backend would see (after the route's rewrite).
    pub upstream_path: Option<String>,
    /// The gateway's SPIFFE ID (the caller the destination's intentions see).
    pub caller: String,
}

impl WhyAnswer {
    fn push(&mut self, layer: &'static str, result: Verdict, detail: impl Into<String>) {
        self.layers.push(Layer {
            layer,
            result,
            detail: detail.into(),
            status: None,
            problem: None,
        });
    }

    fn stop(&mut self, layer: &'static str, p: &Problem, detail: impl Into<String>) {
        self.stop_with(layer, p.status().as_u16(), p.slug(), detail);
    }

    fn stop_with(
        &mut self,
        layer: &'static str,
        status: u16,
        problem: &'static str,
        detail: impl Into<String>,
    ) {
        self.layers.push(Layer {
            layer,
            result: Verdict::Stop,
            detail: detail.into(),
            status: Some(status),
            problem: Some(problem),
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The request's head, parsed as the front would (method, URL, headers).
struct Head {
    method: String,
    https: bool,
    host: String,
    raw_path: String,
    query: String,
    headers: HeaderMap,
}

fn parse(req: &WhyRequest, auth: &Auth) -> Result<Head, String> {
    // methods are case-sensitive: `get` is not GET
    let method = req.method.as_deref().unwrap_or("GET").trim().to_owned();
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        return Err(format!("{method:?} is not an HTTP method"));
    }
    // never echo the URL: its query or user-info may hold a credential
    let uri: http::Uri = req
        .url
        .trim()
        .parse()
        .map_err(|e| format!("the url is not a URL: {e}"))?;
    let scheme_https = uri.scheme_str() == Some("https");
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("{k:?} is not a header name"))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| format!("the value of header {k} is not a valid header value"))?;
        headers.append(name, value);
    }
    let mut query = uri.query().unwrap_or_default().to_owned();
    if let Some(key) = &req.api_key {
        match auth.api_key_location() {
            None => return Err("--api-key: this gateway has no auth.api_keys".into()),
            Some(KeyLocation::Header { name }) => {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| "auth.api_keys: a location is not a header name".to_owned())?;
                let value = HeaderValue::from_str(key.trim())
                    .map_err(|_| "--api-key: not a valid header value".to_owned())?;
                headers.insert(name, value);
            }
            Some(KeyLocation::Query { name }) => {
                let enc: String = percent_encoding::utf8_percent_encode(
                    key.trim(),
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .collect();
                if !query.is_empty() {
                    query.push('&');
                }
                query.push_str(&format!("{name}={enc}"));
            }
        }
    }
    // a Host header given with -H wins, as it does for curl and for HTTP/1.1 routing
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            uri.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned())
        })
        .unwrap_or_default();
    Ok(Head {
        method,
        https: scheme_https,
        host,
        raw_path: uri.path().to_owned(),
        query,
        headers,
    })
}

/// Walks `req` through the gateway's layers with the live `state`.
pub async fn why(state: &WhyState, req: &WhyRequest) -> Result<WhyAnswer, String> {
    let table = &*state.table;
    let auth = &*state.auth;
    let head = parse(req, auth)?;
    let client_ip = req
        .client_ip
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let mut a = WhyAnswer {
        method: head.method.clone(),
        path: head.raw_path.clone(),
        route: None,
        layers: Vec::new(),
        backends: Vec::new(),
        upstream_method: None,
        upstream_path: None,
        caller: state.caller.clone(),
    };
    // the front, before anything else
    if head.method == "CONNECT" {
        a.stop_with(
            "front",
            405,
            "method-not-allowed",
            "the gateway answers CONNECT with 405",
        );
        return Ok(a);
    }
    if head.host.contains(',') || head.headers.get_all(http::header::HOST).iter().count() > 1 {
        a.stop(
            "front",
            &Problem::BadRequest("more than one Host".into()),
            "more than one Host: the gateway answers 400",
        );
        return Ok(a);
    }
    let head_bytes = meshgate_agent::http::pipeline::head_bytes(&head.headers);
    if head_bytes > state.max_head_bytes {
        let limit = state.max_head_bytes;
        a.stop(
            "front",
            &Problem::HeadersTooLarge { limit },
            format!("the headers are {head_bytes} bytes, over limits.max_header_bytes ({limit})"),
        );
        return Ok(a);
    }
    let path = match meshgate_agent::http::path::normalize(&head.raw_path, &state.paths) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            let detail = format!("the path is refused: {e}");
            a.stop("path", &Problem::InvalidPath(e), detail);
            return Ok(a);
        }
    };
    if path == head.raw_path {
        a.push("path", Verdict::Pass, format!("{path} (already normal)"));
    } else {
        a.push(
            "path",
            Verdict::Pass,
            format!(
                "{} normalizes to {path}; routes and policies see {path}",
                head.raw_path
            ),
        );
    }
    a.path.clone_from(&path);
    if state.redirect_https && !head.https {
        a.stop_with(
            "redirect",
            308,
            "redirect-https",
            "redirect_https is on: a plain-HTTP request is redirected to https://",
        );
        return Ok(a);
    }
    let view = RequestView {
        method: &head.method,
        host: &head.host,
        path: &path,
        query: &head.query,
        headers: &head.headers,
    };
    let Some(m) = table.find(&view) else {
        let detail = format!(
            "no route matches {} {path} ({} routes checked; `meshgate routes --match` gives each one's reason)",
            head.method,
            table.routes().len()
        );
        a.stop("route", &Problem::NoRoute, detail);
        return Ok(a);
    };
    let route = m.route;
    let name = route.config.name.clone();
    a.push(
        "route",
        Verdict::Pass,
        format!("route {name}: {}", describe(route, &m.params)),
    );
    a.route = Some(name.clone());
    let allowed = |m: &str| {
        route
            .config
            .r#match
            .methods
            .iter()
            .any(|x| x.eq_ignore_ascii_case(m))
    };
    if head.method == "TRACE" && !allowed("TRACE") {
        a.stop_with(
            "route",
            405,
            "method-not-allowed",
            "TRACE is answered with 405 unless the route lists it",
        );
        return Ok(a);
    }
    let preflight = head.method == "OPTIONS"
        && head.headers.contains_key(http::header::ORIGIN)
        && head
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight && (route.config.cors.is_some() || state.cors) {
        a.stop_with(
            "cors",
            204,
            "cors-preflight",
            "a CORS preflight: the gateway answers it itself from the route's cors policy; it goes no further",
        );
        return Ok(a);
    }
    let declared = head
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if !route.config.content_types.is_empty() && declared.is_some_and(|n| n > 0) {
        let types = crate::filters::limits::ContentTypes::new(&route.config.content_types);
        if let Err(p) = types.check(&head.headers) {
            let got = match &p {
                Problem::UnsupportedMediaType { got } => got.clone(),
                _ => String::new(),
            };
            a.stop(
                "content-type",
                &p,
                format!(
                    "Content-Type {got:?} is not one of {}",
                    route.config.content_types.join(", ")
                ),
            );
            return Ok(a);
        }
    }
    let limit = route.config.rate_limit.as_deref();
    let early_limit = limit.filter(|l| !auth.rate_limit_needs_principal(l));
    if let Some(l) = early_limit
        && !peek(&mut a, auth, l, &name, None, client_ip, &head.headers).await
    {
        return Ok(a);
    }
    let principal = match &route.config.auth {
        None => {
            a.push("authentication", Verdict::Skip, "the route requires none");
            a.push("authorization", Verdict::Skip, "the route requires none");
            None
        }
        Some(ra) => {
            let mut headers = head.headers.clone();
            let mut query = head.query.clone();
            match auth
                .authenticate_quietly(ra, &mut headers, &mut query)
                .await
            {
                Ok(p) => {
                    a.push("authentication", Verdict::Pass, who(&p));
                    a.push("authorization", Verdict::Pass, requirements(ra));
                    Some(p)
                }
                Err(p @ Problem::Forbidden(_)) => {
                    a.push("authentication", Verdict::Pass, "the credentials are valid");
                    let detail = match &p {
                        Problem::Forbidden(why) => {
                            format!("{why} (the route needs {})", requirements(ra))
                        }
                        _ => String::new(),
                    };
                    a.stop("authorization", &p, detail);
                    return Ok(a);
                }
                Err(Problem::Unauthorized { .. }) if ra.mtls => {
                    // a client certificate cannot be given to `why`
                    a.push(
                        "authentication",
                        Verdict::Unchecked,
                        format!(
                            "the route accepts {}; why cannot present a client certificate",
                            accepted(ra)
                        ),
                    );
                    None
                }
                Err(p @ Problem::HeadersTooLarge { .. }) => {
                    a.stop(
                        "front",
                        &p,
                        "a credential over its size limit: the gateway answers 431",
                    );
                    return Ok(a);
                }
                Err(p) => {
                    let detail = match &p {
                        Problem::Unauthorized { reason, .. } => {
                            format!("{reason} (the route accepts {})", accepted(ra))
                        }
                        other => other.slug().to_owned(),
                    };
                    a.stop("authentication", &p, detail);
                    return Ok(a);
                }
            }
        }
    };
    match limit {
        None => a.push("rate-limit", Verdict::Skip, "the route has none"),
        Some(l) if early_limit.is_none() => {
            if !peek(
                &mut a,
                auth,
                l,
                &name,
                principal.as_ref(),
                client_ip,
                &head.headers,
            )
            .await
            {
                return Ok(a);
            }
        }
        Some(_) => {}
    }
    let max_body = route.config.max_body.unwrap_or(state.max_body);
    if let Some(n) = declared.filter(|n| *n > max_body) {
        a.stop(
            "body",
            &Problem::BodyTooLarge { limit: max_body },
            format!("Content-Length {n} is over the route's max_body ({max_body})"),
        );
        return Ok(a);
    }
    if route.config.request_schema.is_some() {
        a.push(
            "body",
            Verdict::Unchecked,
            "the body is validated against the route's request_schema; why sends none",
        );
    }
    a.upstream_path = Some(
        if route
            .config
            .rewrite
            .as_ref()
            .is_some_and(|r| r.prefix.is_some())
        {
            crate::routes::rewrite_path(route, &path)
        } else {
            path.clone()
        },
    );
    a.backends = backends(route, &view);
    if route.config.transcode.is_some() {
        // the service sees the gRPC method this REST call maps to, not this path
        a.upstream_method = Some("POST".into());
        a.upstream_path = None;
    } else {
        a.upstream_method = Some(head.method.clone());
    }
    let names: Vec<String> = a
        .backends
        .iter()
        .map(|b| {
            if b.percent < 100.0 {
                format!("{} {} ({:.0}%)", b.kind, b.target, b.percent)
            } else {
                format!("{} {}", b.kind, b.target)
            }
        })
        .collect();
    let seen = match &a.upstream_path {
        Some(p) if *p != path => format!("; it sees the path {p}"),
        _ => String::new(),
    };
    a.push(
        "backend",
        Verdict::Pass,
        format!("{}{seen}", names.join(", ")),
    );
    Ok(a)
}

/// How the route matched.
fn describe(route: &CompiledRoute, params: &[(String, String)]) -> String {
    let mut s = match serde_json::to_value(&route.config.r#match.path) {
        Ok(serde_json::Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                format!(
                    "path {k} {}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Ok(serde_json::Value::String(p)) => format!("path {p}"),
        _ => "any path".to_owned(),
    };
    if !route.config.r#match.methods.is_empty() {
        s.push_str(&format!(
            ", methods {}",
            route.config.r#match.methods.join("|")
        ));
    }
    for (k, v) in params {
        s.push_str(&format!(", {{{k}}} = {v}"));
    }
    s
}

/// Who the credentials say the caller is (never the credential).
fn who(p: &Principal) -> String {
    let mut s = match (&p.consumer, &p.user) {
        (Some(c), _) => format!("consumer {c}"),
        (None, Some(u)) => format!("subject {u}"),
        (None, None) => "authenticated".to_owned(),
    };
    if !p.scopes.is_empty() {
        s.push_str(&format!(", scopes {}", p.scopes.join(" ")));
    }
    if !p.groups.is_empty() {
        s.push_str(&format!(", groups {}", p.groups.join(" ")));
    }
    s
}

fn accepted(ra: &crate::auth::RouteAuth) -> String {
    let mut v: Vec<String> = ra.jwt.iter().map(|j| format!("a JWT from {j}")).collect();
    v.extend(
        ra.introspection
            .iter()
            .map(|i| format!("a token {i} accepts")),
    );
    if ra.api_key {
        v.push("an API key".into());
    }
    if ra.mtls {
        v.push("a client certificate".into());
    }
    v.join(" or ")
}

fn requirements(ra: &crate::auth::RouteAuth) -> String {
    let mut v = Vec::new();
    if !ra.scopes.is_empty() {
        v.push(format!("scopes {}", ra.scopes.join(" ")));
    }
    for (k, want) in &ra.claims {
        v.push(format!("claim {k} = {want}"));
    }
    if !ra.groups.is_empty() {
        v.push(format!("a group of {}", ra.groups.join(", ")));
    }
    if v.is_empty() {
        "no scopes, claims or groups".to_owned()
    } else {
        v.join(", ")
    }
}

/// Peeks policy `l`; pushes its layer; false when it would refuse.
async fn peek(
    a: &mut WhyAnswer,
    auth: &Auth,
    l: &str,
    route: &str,
    p: Option<&Principal>,
    ip: IpAddr,
    headers: &HeaderMap,
) -> bool {
    let Some((d, cfg, store)) = auth
        .rate_limit_peek(l, route, p, ip, headers, now_ms())
        .await
    else {
        a.push(
            "rate-limit",
            Verdict::Skip,
            format!("policy {l} is not defined"),
        );
        return true;
    };
    let per = humantime::format_duration(cfg.per).to_string();
    let store = match store {
        Ok(s) => Ok(format!("{s} store")),
        Err(e) => Err(e),
    };
    if d.allowed {
        let detail = match &store {
            // the fail mode's decision has no count to show
            Err(e) => format!("policy {l} ({} per {per}): {e}", d.limit),
            Ok(s) => format!(
                "policy {l}: {} left now, this one included ({} per {per}; {s})",
                d.remaining + 1,
                d.limit,
            ),
        };
        a.push("rate-limit", Verdict::Pass, detail);
        true
    } else {
        let retry = d.retry_after_ms.unwrap_or(1000).div_ceil(1000).max(1);
        let detail = match &store {
            Err(e) => format!("policy {l} ({} per {per}): {e}", d.limit),
            Ok(s) => format!(
                "policy {l}: none of {} per {per} left; retry in {retry}s ({s})",
                d.limit
            ),
        };
        a.stop(
            "rate-limit",
            &Problem::TooManyRequests {
                retry_after_secs: retry,
                headers: Vec::new(),
            },
            detail,
        );
        false
    }
}

/// The backends `route` sends to, with each one's share; a pin in the request decides alone.
fn backends(route: &CompiledRoute, view: &RequestView<'_>) -> Vec<Backend> {
    match &route.config.backend {
        BackendConfig::Service(s) => vec![Backend {
            kind: "mesh",
            target: s.clone(),
            percent: 100.0,
            path: None,
        }],
        BackendConfig::External(x) => vec![Backend {
            kind: "external",
            target: x.url.clone(),
            percent: 100.0,
            path: None,
        }],
        BackendConfig::Aggregate(agg) => agg
            .calls
            .iter()
            .map(|c| match (&c.service, &c.external) {
                (Some(s), _) => Backend {
                    kind: "mesh",
                    target: s.clone(),
                    percent: 100.0,
                    path: Some(c.path.clone()),
                },
                (None, x) => Backend {
                    kind: "external",
                    target: x.as_ref().map(|x| x.url.clone()).unwrap_or_default(),
                    percent: 100.0,
                    path: None,
                },
            })
            .collect(),
        BackendConfig::OpenApi(_) => vec![Backend {
            kind: "gateway",
            target: route.config.name.clone(),
            percent: 100.0,
            path: None,
        }],
        BackendConfig::Split { .. } => {
            // the same choice the proxy makes, over evenly spread rolls: exact weights, or the
            // one backend a pin names
            const SAMPLES: u32 = 1000;
            let mut counts: Vec<(String, u32)> = Vec::new();
            for i in 0..SAMPLES {
                let roll = i * (ROLL_RANGE / SAMPLES);
                let svc = choose_backend(route, view, roll);
                match counts.iter_mut().find(|(s, _)| s == svc) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((svc.to_owned(), 1)),
                }
            }
            counts
                .into_iter()
                .map(|(s, n)| Backend {
                    kind: "mesh",
                    target: s,
                    percent: f64::from(n) * 100.0 / f64::from(SAMPLES),
                    path: None,
                })
                .collect()
        }
    }
}
