//! The gateway's route table. This module owns the `routes` config shape ([`RouteConfig`] and
//! the types under it), its validation and compilation into a [`RouteTable`], request matching
//! ([`RouteTable::find`], and [`RouteTable::explain`] for `meshgate routes --match`), and the small
//! per-request helpers that follow a match: [`choose_backend`], [`rewrite_path`] and [`cookie`].
//!
//! It must stay pure: no I/O, no sockets, no clocks, no randomness (the caller supplies the
//! random roll for weighted splits), no async. It carries `timeout`, `retries`, `max_body` and
//! `content_types` for the proxy and validates them, but does not enforce them; defaults (such as
//! the route timeout) are applied by the caller.
//!
//! # Matching
//!
//! A route matches a request when every condition of its `match` holds:
//!
//! - `hosts`: `api.example` (exact) or `*.example` (one or more labels in front of `.example`);
//!   compared case-insensitively, with the request's port and a trailing `.` ignored. Empty means
//!   any host.
//! - `path`: `{exact: /users/me}`, `{prefix: /users}` or `{template: "/users/{id}"}`. A prefix is
//!   segment-aware: `/users` matches `/users`, `/users/` and `/users/7` but not `/usersx`; `/`
//!   matches every path. A template's segments are each either literal or a whole `{param}`, and
//!   a parameter matches exactly one non-empty segment: `/users/{id}` matches `/users/7`
//!   (`id=7`), not `/users/` nor `/users/7/x`. Paths are compared as sent (case-sensitive, no
//!   percent-decoding). No `path` means any path.
//! - `methods`: any of the listed methods, case-insensitive. Empty means any method.
//! - `headers`: each named header (name case-insensitive) has a value exactly equal to the given
//!   one; the value `"*"` only requires the header to be present.
//! - `query`: each named query parameter (name case-sensitive, `+` and `%XX` decoded) has a value
//!   equal to the given one; `"*"` only requires the parameter to be present.
//!
//! # Precedence
//!
//! The most specific route wins. Routes are ordered by the following keys, compared in turn,
//! higher first; routes that tie on all of them keep their config order. A request goes to the
//! first route in this order whose every condition matches.
//!
//! 1. Host: an exact host (`api.example`) beats a wildcard (`*.example`), which beats no host
//!    condition; between wildcards the longer suffix wins (`*.api.example` before `*.example`).
//!    A route listing several hosts ranks by its broadest one.
//! 2. Path: an exact path beats a template, which beats a prefix, which beats no path condition.
//!    Between templates, more literal segments win, then more segments (`/users/{id}/orders`
//!    before `/users/{id}`, which is before `/{kind}/{id}`); between prefixes, the longer prefix
//!    wins (`/users/admin` before `/users` before `/`).
//! 3. Conditions: more `headers` plus `query` conditions win.
//! 4. Methods: a route listing `methods` beats one that does not.
//!
//! So `/users/admin` goes to a `{template: "/users/{id}"}` route rather than a
//! `{prefix: /users/admin}` route on the same host: the path kind is compared before the length.
//!
//! # Versioning
//!
//! API versions are plain routes; no extra config is needed:
//!
//! - by path: `match: {path: {prefix: /v2/users}}` with `rewrite: {prefix: /users}` sends
//!   `/v2/users/7` to the backend as `/users/7`;
//! - by header: `match: {path: {prefix: /users}, headers: {Accept-Version: "2"}}` outranks the
//!   same route without the header condition (key 3);
//! - by subdomain: `match: {hosts: [v2.api.example]}`.
//!
//! # Backends
//!
//! A route sends to one service (`backend: {service: users}`) or splits traffic by weight
//! (`backend: {split: [{service: users, weight: 90}, {service: users-canary, weight: 10}]}`).
//! A split may `pin` requests: when the pin header (checked first) or the pin cookie names a
//! backend of the split, by service name or `version` label, the request goes to that backend
//! whatever the roll; `pin.services` may limit which backends can be pinned to. A backend of
//! weight 0 gets no share of the rolls and is reachable only by pin. See [`choose_backend`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderMap;
use http::header::{COOKIE, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The exclusive upper bound of the `roll` passed to [`choose_backend`].
pub const ROLL_RANGE: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// One route as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name: unique, `[A-Za-z0-9._-]+`.
    pub name: String,
    /// Which requests the route takes (YAML key `match`); empty matches every request.
    #[serde(default)]
    pub r#match: MatchConfig,
    /// Where matching requests go.
    pub backend: BackendConfig,
    /// How the request is rewritten before it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteConfig>,
    /// The request timeout (humantime, e.g. `15s`); `None` means the caller's default.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// A response body that sends nothing for this long is cut off (humantime; `0s` turns the
    /// limit off); `None` means the gateway's `limits.response_idle_timeout`.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub response_idle_timeout: Option<Duration>,
    /// Retry policy; `None` means no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryConfig>,
    /// The largest request body accepted, in bytes; `None` means the caller's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    /// Allowed request media types, `type/subtype` without parameters or wildcards
    /// (`application/json`); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_types: Vec<String>,
    /// CORS for this route (replaces the gateway-wide `cors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<crate::cors::CorsConfig>,
    /// Header and JSON body transforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transforms: Option<crate::transform::TransformConfig>,
    /// Authentication and authorization this route requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<crate::auth::RouteAuth>,
    /// Name of the rate-limit policy (in `auth.rate_limits`) applied to this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// REST-to-gRPC transcoding: the backend speaks gRPC and is offered as REST/JSON by the
    /// `google.api.http` rules of these protos (see `crate::transcode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcode: Option<crate::transcode::TranscodeConfig>,
    /// Convert browsers' gRPC-Web calls (`application/grpc-web`, `-text`) to gRPC for the
    /// backend (see `crate::grpc_web`). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grpc_web: bool,
    /// A JSON Schema (2020-12) request bodies must match (400 naming the pointer and the rule
    /// otherwise; see `crate::schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_schema: Option<crate::schema::RequestSchemaConfig>,
}

/// The conditions of a route; every one given must hold (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Hosts: `api.example` (exact) or `*.example` (wildcard); empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The path condition; `None` means any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// HTTP methods, case-insensitive; empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header name (case-insensitive) to exact value; the value `"*"` means "present".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameter name to value; the value `"*"` means "present".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
}

/// A path condition. YAML: `{exact: /users/me}`, `{prefix: /users}`,
/// `{template: "/users/{id}"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum PathMatch {
    /// The path must equal this.
    Exact(String),
    /// The path must start with these whole segments (`/` matches every path).
    Prefix(String),
    /// The path must have these segments, each literal or a `{param}` capturing one segment.
    Template(String),
}

impl PathMatch {
    fn kind(&self) -> &'static str {
        match self {
            PathMatch::Exact(_) => "exact",
            PathMatch::Prefix(_) => "prefix",
            PathMatch::Template(_) => "template",
        }
    }

    fn value(&self) -> &str {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) | PathMatch::Template(p) => p,
        }
    }
}

/// Where a route's requests go. YAML: `{service: users}` or
/// `{split: [{service: users, weight: 90}, …], pin: {header: X-Canary, cookie: canary}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "BackendRepr", into = "BackendRepr")]
pub enum BackendConfig {
    /// Every request goes to this service.
    Service(String),
    /// Requests are spread over these backends by weight, unless pinned.
    Split {
        /// The backends and their weights.
        split: Vec<WeightedBackend>,
        /// How a request may pick its backend itself.
        pin: Option<PinConfig>,
    },
    /// Every request goes to a URL outside the mesh (no mTLS, no intentions: this leaves
    /// zero-trust, for migrations and external APIs).
    External(meshgate_agent::http::upstream::ExternalConfig),
    /// The request fans out to several calls whose JSON answers are merged (a BFF; see
    /// `crate::aggregate`).
    Aggregate(Box<crate::aggregate::AggregateConfig>),
    /// The gateway answers with the OpenAPI document of its routes (see `crate::openapi`).
    OpenApi(crate::openapi::OpenApiConfig),
}

/// The YAML shape of [`BackendConfig`]: exactly one of `service` or `split`, and `pin` only
/// with `split`.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "BackendConfig")]
struct BackendRepr {
    /// Send every request to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    /// Spread requests over these backends by weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    split: Option<Vec<WeightedBackend>>,
    /// With `split`: let a header or cookie pin a request to one backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin: Option<PinConfig>,
    /// Send every request to a URL outside the mesh (leaves zero-trust).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external: Option<meshgate_agent::http::upstream::ExternalConfig>,
    /// Fan out to several calls and merge their JSON answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aggregate: Option<Box<crate::aggregate::AggregateConfig>>,
    /// Serve the gateway's OpenAPI document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    openapi: Option<crate::openapi::OpenApiConfig>,
}

impl BackendConfig {
    /// Every service this backend may send to, in config order (for a split, including
    /// weight-0 backends, which pins can reach).
    pub fn services(&self) -> Vec<String> {
        match self {
            BackendConfig::Service(service) => vec![service.clone()],
            BackendConfig::Split { split, .. } => split.iter().map(|b| b.service.clone()).collect(),
            BackendConfig::External(_) | BackendConfig::OpenApi(_) => Vec::new(),
            BackendConfig::Aggregate(a) => a.services(),
        }
    }
}

impl TryFrom<BackendRepr> for BackendConfig {
    type Error = &'static str;

    fn try_from(r: BackendRepr) -> Result<Self, Self::Error> {
        let set = [
            r.service.is_some(),
            r.split.is_some(),
            r.external.is_some(),
            r.aggregate.is_some(),
            r.openapi.is_some(),
        ]
        .into_iter()
        .filter(|x| *x)
        .count();
        if r.pin.is_some() && r.split.is_none() {
            return Err("backend: `pin` only applies to a `split`");
        }
        if set != 1 {
            return Err(
                "backend: set exactly one of `service`, `split`, `external`, `aggregate` or `openapi`",
            );
        }
        Ok(
            match (r.service, r.split, r.external, r.aggregate, r.openapi) {
                (Some(service), ..) => BackendConfig::Service(service),
                (_, Some(split), ..) => BackendConfig::Split { split, pin: r.pin },
                (_, _, Some(e), ..) => BackendConfig::External(e),
                (_, _, _, Some(a), _) => BackendConfig::Aggregate(a),
                (_, _, _, _, Some(o)) => BackendConfig::OpenApi(o),
                _ => unreachable!("invariant: exactly one backend kind is set"),
            },
        )
    }
}

impl From<BackendConfig> for BackendRepr {
    fn from(b: BackendConfig) -> Self {
        let mut r = BackendRepr {
            service: None,
            split: None,
            pin: None,
            external: None,
            aggregate: None,
            openapi: None,
        };
        match b {
            BackendConfig::Service(service) => r.service = Some(service),
            BackendConfig::Split { split, pin } => {
                r.split = Some(split);
                r.pin = pin;
            }
            BackendConfig::External(e) => r.external = Some(e),
            BackendConfig::Aggregate(a) => r.aggregate = Some(a),
            BackendConfig::OpenApi(o) => r.openapi = Some(o),
        }
        r
    }
}

/// One backend of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedBackend {
    /// The service name, `[A-Za-z0-9._-]+`; unique within the split.
    pub service: String,
    /// The relative weight; 0 means "only reachable by pin".
    pub weight: u32,
    /// A version label (`v2`) that a pin header or cookie may name instead of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// How a request pins itself to one backend of a split: the header is checked first, then the
/// cookie; the value must equal a backend's service name or version label (case-sensitive).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PinConfig {
    /// The request header naming the backend (`X-Canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The cookie naming the backend (`canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The backends (service names or version labels) a request may pin to; empty means any
    /// backend of the split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

/// How a matched request is rewritten before it is forwarded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Replaces the part of the path matched by the route's `prefix` (or `exact` path, or a
    /// template's literal leading segments). Needs a `match.path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Replaces the Host (`users.internal` or `users.internal:8080`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Retry policy of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra attempts after the first (default 2).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retries may add at most this percentage of the route's requests (0–100, default 20).
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            budget_percent: default_budget_percent(),
        }
    }
}

fn default_attempts() -> u32 {
    2
}

fn default_budget_percent() -> f64 {
    20.0
}

// ---------------------------------------------------------------------------------------------
// Compiled table
// ---------------------------------------------------------------------------------------------

/// A route config that failed validation, e.g.
/// `routes[2] (users-v2): template "/users/{" is not closed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes[{index}] ({name}): {message}")]
pub struct RouteError {
    /// The route's index in the config list.
    pub index: usize,
    /// The route's name as configured.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

/// The validated routes, in precedence order (see the module docs), with an index by host and
/// path so a lookup looks only at the routes that could match.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    index: Index,
}

/// One validated route: its config and its matchers.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    /// The route as configured.
    pub config: RouteConfig,
    index: usize,
    hosts: Vec<HostPattern>,
    path: Option<CompiledPath>,
    methods: Vec<String>,
    headers: Vec<HeaderCond>,
    query: Vec<QueryCond>,
    pin_header: Option<HeaderName>,
    /// The literal path part that `rewrite.prefix` replaces; `None` without a path condition.
    rewrite_lead: Option<String>,
    key: Specificity,
}

/// The parts of a request that routes look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method, any case.
    pub method: &'a str,
    /// The Host (or `:authority`), possibly with a `:port`; any case.
    pub host: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query string without `?`; may be empty.
    pub query: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// The route a request matched, with the template's captures.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    /// The winning route.
    pub route: &'a CompiledRoute,
    /// Template captures in template order, e.g. `[("id", "7")]`; empty for other paths.
    pub params: Vec<(String, String)>,
}

impl Matched<'_> {
    /// The captured value of template parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a request was routed, route by route (`meshgate routes --match`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The name of the route that takes the request; `None` when none matches.
    pub chosen: Option<String>,
    /// Every route, in precedence order.
    pub candidates: Vec<Candidate>,
}

/// One route's verdict in an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// The route's name.
    pub route: String,
    /// Whether all of its conditions hold (also true for routes shadowed by a more specific one).
    pub matched: bool,
    /// `matched (template /users/{id}, id=7)`, `matched, but route X is more specific`, or the
    /// first failing check, e.g. `method POST not in [GET]`.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Lowercase host.
    Exact(String),
    /// Lowercase suffix including the leading dot (`.example`).
    Suffix(String),
}

#[derive(Debug, Clone)]
enum CompiledPath {
    Exact(String),
    /// Without a trailing `/`; empty for `/`.
    Prefix(String),
    Template(Vec<Segment>),
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
struct HeaderCond {
    name: HeaderName,
    /// The name as configured, for explanations.
    display: String,
    /// `None` = present.
    want: Option<String>,
}

#[derive(Debug, Clone)]
struct QueryCond {
    name: String,
    /// `None` = present.
    want: Option<String>,
}

/// The precedence key; derived `Ord` compares fields in order, higher is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    host_rank: u8,
    host_suffix: usize,
    path_rank: u8,
    path_primary: usize,
    path_secondary: usize,
    conditions: usize,
    has_methods: bool,
}

/// The first check a route failed.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Host,
    Path,
    Method,
    Header(usize),
    Query(usize),
}

impl RouteTable {
    /// Validates `routes` and orders them by precedence. Errors name the route:
    /// `routes[2] (users-v2): template "/users/{" is not closed`.
    pub fn compile(routes: &[RouteConfig]) -> Result<RouteTable, RouteError> {
        let mut first_use: BTreeMap<&str, usize> = BTreeMap::new();
        let mut compiled = Vec::with_capacity(routes.len());
        for (index, config) in routes.iter().enumerate() {
            let error = |message: String| RouteError {
                index,
                name: config.name.clone(),
                message,
            };
            if !is_name(&config.name) {
                return Err(error(format!(
                    "name {:?} must be non-empty [A-Za-z0-9._-]",
                    config.name
                )));
            }
            if let Some(first) = first_use.insert(&config.name, index) {
                return Err(error(format!(
                    "duplicate route name (first used by routes[{first}])"
                )));
            }
            compiled.push(compile_route(index, config).map_err(error)?);
        }
        // Stable: ties keep config order.
        compiled.sort_by_key(|route| std::cmp::Reverse(route.key));
        let index = Index::build(&compiled);
        Ok(RouteTable {
            routes: compiled,
            index,
        })
    }

    /// The routes in precedence order.
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// The first route, in precedence order, whose every condition matches `req`. Only the
    /// routes the index names as candidates for the request's host and path are checked, so the
    /// cost does not grow with the size of the table.
    pub fn find(&self, req: &RequestView<'_>) -> Option<Matched<'_>> {
        let mut candidates = Vec::new();
        self.index.candidates(req.host, req.path, &mut candidates);
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find_map(|rank| {
            let route = &self.routes[rank as usize];
            route
                .check(req)
                .ok()
                .map(|params| Matched { route, params })
        })
    }

    /// [`RouteTable::find`] by checking every route in order: the definition the index must
    /// agree with (tests compare the two).
    pub fn find_linear(&self, req: &RequestView<'_>) -> Option<Matched<'_>> {
        self.routes.iter().find_map(|route| {
            route
                .check(req)
                .ok()
                .map(|params| Matched { route, params })
        })
    }

    /// Every route's verdict on `req`, in precedence order, and the chosen one.
    pub fn explain(&self, req: &RequestView<'_>) -> Explanation {
        let mut chosen: Option<String> = None;
        let candidates = self
            .routes
            .iter()
            .map(|route| {
                let (matched, reason) = match (route.check(req), &chosen) {
                    (Ok(params), None) => {
                        chosen = Some(route.config.name.clone());
                        (true, route.describe_match(&params))
                    }
                    (Ok(_), Some(winner)) => (
                        true,
                        format!("matched, but route {winner} is more specific"),
                    ),
                    (Err(failure), _) => (false, route.describe_failure(failure, req)),
                };
                Candidate {
                    route: route.config.name.clone(),
                    matched,
                    reason,
                }
            })
            .collect();
        Explanation { chosen, candidates }
    }
}

impl CompiledRoute {
    /// The route's index in the config list it was compiled from.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Ok with the template captures, or the first failing check.
    fn check(&self, req: &RequestView<'_>) -> Result<Vec<(String, String)>, Failure> {
        if !self.hosts.is_empty() {
            let host = host_only(req.host);
            if !self.hosts.iter().any(|p| host_matches(p, host)) {
                return Err(Failure::Host);
            }
        }
        let params = match &self.path {
            None => Vec::new(),
            Some(path) => path_matches(path, req.path).ok_or(Failure::Path)?,
        };
        if !self.methods.is_empty()
            && !self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(req.method))
        {
            return Err(Failure::Method);
        }
        for (i, cond) in self.headers.iter().enumerate() {
            let mut values = req.headers.get_all(&cond.name).iter();
            let ok = match &cond.want {
                None => values.next().is_some(),
                Some(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
            };
            if !ok {
                return Err(Failure::Header(i));
            }
        }
        for (i, cond) in self.query.iter().enumerate() {
            let mut values = query_values(req.query, &cond.name);
            let ok = match &cond.want {
                None => values.next().is_some(),
                Some(want) => values.any(|v| v == want.as_str()),
            };
            if !ok {
                return Err(Failure::Query(i));
            }
        }
        Ok(params)
    }

    fn describe_match(&self, params: &[(String, String)]) -> String {
        let Some(path) = &self.config.r#match.path else {
            return "matched (any path)".to_owned();
        };
        let mut s = format!("matched ({} {}", path.kind(), path.value());
        for (k, v) in params {
            s.push_str(&format!(", {k}={v}"));
        }
        s.push(')');
        s
    }

    fn describe_failure(&self, failure: Failure, req: &RequestView<'_>) -> String {
        let m = &self.config.r#match;
        match failure {
            Failure::Host => {
                let host = host_only(req.host).to_ascii_lowercase();
                let host = if host.is_empty() { "(none)" } else { &host };
                format!("host {host} does not match [{}]", m.hosts.join(", "))
            }
            Failure::Path => match &m.path {
                Some(p) => format!(
                    "path {} does not match {} {}",
                    req.path,
                    p.kind(),
                    p.value()
                ),
                None => format!("path {} does not match", req.path),
            },
            Failure::Method => {
                format!("method {} not in [{}]", req.method, self.methods.join(", "))
            }
            Failure::Header(i) => match self.headers.get(i) {
                Some(cond) => {
                    let got = req
                        .headers
                        .get(&cond.name)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    describe_value("header", &cond.display, got, cond.want.as_deref())
                }
                None => "header condition failed".to_owned(),
            },
            Failure::Query(i) => match self.query.get(i) {
                Some(cond) => {
                    let got = query_values(req.query, &cond.name)
                        .next()
                        .map(Cow::into_owned);
                    describe_value("query", &cond.name, got, cond.want.as_deref())
                }
                None => "query condition failed".to_owned(),
            },
        }
    }
}

fn describe_value(kind: &str, name: &str, got: Option<String>, want: Option<&str>) -> String {
    let want = want.unwrap_or("any value");
    match got {
        None => format!("{kind} {name}: missing (wants {want})"),
        Some(got) => format!("{kind} {name}: is {got} (wants {want})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------------------------

/// Route ranks (positions in precedence order) by host, then by path shape. A superset filter:
/// every route that could match a request is among its candidates, and `check` decides.
#[derive(Debug, Clone, Default)]
struct Index {
    exact_hosts: std::collections::HashMap<String, Bucket>,
    /// Keyed by the suffix with its leading dot (`.example`).
    wildcard_hosts: std::collections::HashMap<String, Bucket>,
    any_host: Bucket,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    exact: std::collections::HashMap<String, Vec<u32>>,
    prefix: SegmentTrie,
    template: SegmentTrie,
    any_path: Vec<u32>,
}

/// A trie over path segments; `{param}` segments of templates go to `param`.
#[derive(Debug, Clone, Default)]
struct SegmentTrie {
    here: Vec<u32>,
    literal: std::collections::HashMap<String, SegmentTrie>,
    param: Option<Box<SegmentTrie>>,
}

impl SegmentTrie {
    fn insert_prefix(&mut self, lead: &str, rank: u32) {
        let mut node = self;
        if !lead.is_empty() {
            for seg in lead[1..].split('/') {
                node = node.literal.entry(seg.to_owned()).or_default();
            }
        }
        node.here.push(rank);
    }

    fn insert_template(&mut self, segments: &[Segment], rank: u32) {
        let mut node = self;
        for seg in segments {
            node = match seg {
                Segment::Literal(l) => node.literal.entry(l.clone()).or_default(),
                Segment::Param(_) => node.param.get_or_insert_with(Box::default),
            };
        }
        node.here.push(rank);
    }

    /// Prefix routes: every node along the request's segments.
    fn collect_prefixes(&self, segments: &[&str], out: &mut Vec<u32>) {
        let mut node = self;
        out.extend_from_slice(&node.here);
        for seg in segments {
            match node.literal.get(*seg) {
                Some(next) => {
                    node = next;
                    out.extend_from_slice(&node.here);
                }
                None => return,
            }
        }
    }

    /// Template routes: nodes reached by consuming exactly all segments.
    fn collect_templates(&self, segments: &[&str], out: &mut Vec<u32>) {
        match segments.split_first() {
            None => out.extend_from_slice(&self.here),
            Some((seg, rest)) => {
                if let Some(next) = self.literal.get(*seg) {
                    next.collect_templates(rest, out);
                }
                if !seg.is_empty()
                    && let Some(next) = &self.param
                {
                    next.collect_templates(rest, out);
                }
            }
        }
    }
}

impl Bucket {
    fn insert(&mut self, route: &CompiledRoute, rank: u32) {
        match &route.path {
            None => self.any_path.push(rank),
            Some(CompiledPath::Exact(p)) => self.exact.entry(p.clone()).or_default().push(rank),
            Some(CompiledPath::Prefix(lead)) => self.prefix.insert_prefix(lead, rank),
            Some(CompiledPath::Template(segments)) => self.template.insert_template(segments, rank),
        }
    }

    fn candidates(&self, path: &str, segments: &[&str], out: &mut Vec<u32>) {
        out.extend_from_slice(&self.any_path);
        if let Some(r) = self.exact.get(path) {
            out.extend_from_slice(r);
        }
        self.prefix.collect_prefixes(segments, out);
        self.template.collect_templates(segments, out);
    }
}

impl Index {
    fn build(routes: &[CompiledRoute]) -> Index {
        let mut index = Index::default();
        for (rank, route) in routes.iter().enumerate() {
            let rank = u32::try_from(rank).expect("invariant: fewer than 2^32 routes");
            if route.hosts.is_empty() {
                index.any_host.insert(route, rank);
            }
            for h in &route.hosts {
                match h {
                    HostPattern::Exact(name) => index
                        .exact_hosts
                        .entry(name.clone())
                        .or_default()
                        .insert(route, rank),
                    HostPattern::Suffix(suffix) => index
                        .wildcard_hosts
                        .entry(suffix.clone())
                        .or_default()
                        .insert(route, rank),
                }
            }
        }
        index
    }

    fn candidates(&self, host: &str, path: &str, out: &mut Vec<u32>) {
        let segments: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None => Vec::new(),
        };
        self.any_host.candidates(path, &segments, out);
        if self.exact_hosts.is_empty() && self.wildcard_hosts.is_empty() {
            return;
        }
        let host = host_only(host).to_ascii_lowercase();
        if let Some(b) = self.exact_hosts.get(&host) {
            b.candidates(path, &segments, out);
        }
        if !self.wildcard_hosts.is_empty() {
            for (i, c) in host.char_indices() {
                if c == '.'
                    && i > 0
                    && let Some(b) = self.wildcard_hosts.get(&host[i..])
                {
                    b.candidates(path, &segments, out);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The service a request matched to `route` goes to. A single service is returned as is. For a
/// split: if the pin header, else the pin cookie, equals (case-sensitive, surrounding whitespace
/// ignored) the service name or version label of a backend the pin allows, that backend;
/// otherwise the backend owning `roll` (uniform in `0..ROLL_RANGE`, larger values count as the
/// last roll) when the range is divided among the backends in proportion to their weights.
pub fn choose_backend<'a>(route: &'a CompiledRoute, req: &RequestView<'_>, roll: u32) -> &'a str {
    let (split, pin) = match &route.config.backend {
        BackendConfig::Service(service) => return service,
        BackendConfig::External(e) => return &e.url,
        BackendConfig::Aggregate(_) | BackendConfig::OpenApi(_) => return &route.config.name,
        BackendConfig::Split { split, pin } => (split, pin),
    };
    if let Some(pin) = pin {
        let pinned = |value: &str| {
            let value = value.trim();
            split
                .iter()
                .find(|b| names_backend(b, value) && pin_allows(pin, b))
        };
        let by_header = route.pin_header.as_ref().and_then(|name| {
            req.headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(pinned)
        });
        let by_cookie = || {
            pin.cookie
                .as_deref()
                .and_then(|name| cookie(req.headers, name))
                .and_then(pinned)
        };
        if let Some(backend) = by_header.or_else(by_cookie) {
            return &backend.service;
        }
    }
    let total: u64 = split.iter().map(|b| u64::from(b.weight)).sum();
    let point = u64::from(roll.min(ROLL_RANGE - 1)) * total / u64::from(ROLL_RANGE);
    let mut upto = 0u64;
    split
        .iter()
        .find(|b| {
            upto += u64::from(b.weight);
            point < upto
        })
        // Only reachable if the config was altered after compile (a compiled split is
        // non-empty with a positive total): fall back rather than panic on the request path.
        .or(split.last())
        .map_or("", |b| b.service.as_str())
}

fn names_backend(b: &WeightedBackend, value: &str) -> bool {
    b.service == value || b.version.as_deref() == Some(value)
}

fn pin_allows(pin: &PinConfig, b: &WeightedBackend) -> bool {
    pin.services.is_empty() || pin.services.iter().any(|s| names_backend(b, s))
}

/// `path` with the route's `rewrite.prefix` applied: the part matched by the route's `prefix`
/// path (or its `exact` path, or a template's literal segments before the first `{`) is replaced
/// by the rewrite, the rest is kept as is. `/v2/users/7` matched by prefix `/v2/users` with
/// rewrite `/users` gives `/users/7`; prefix `/api` with rewrite `/` gives `/` for `/api` and `/x`
/// for `/api/x`. Never returns `""` (`/` instead) and never joins with `//`. Without a rewrite,
/// or if `path` does not start with the matched part, `path` is returned unchanged.
pub fn rewrite_path(route: &CompiledRoute, path: &str) -> String {
    let unchanged = || {
        if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        }
    };
    let to = route
        .config
        .rewrite
        .as_ref()
        .and_then(|r| r.prefix.as_deref());
    let (Some(to), Some(lead)) = (to, route.rewrite_lead.as_deref()) else {
        return unchanged();
    };
    let Some(rest) = strip_segment_prefix(path, lead) else {
        return unchanged();
    };
    let to = to.trim_end_matches('/');
    if rest.is_empty() {
        return if to.is_empty() {
            "/".to_owned()
        } else {
            to.to_owned()
        };
    }
    format!("{to}/{}", rest.trim_start_matches('/'))
}

/// The value of cookie `name` (case-sensitive) in the request's `Cookie` headers (all of them,
/// each a `; `-separated list of `name=value` pairs); surrounding double quotes are removed.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            if k.trim() != name {
                return None;
            }
            let v = v.trim();
            Some(
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Matching internals
// ---------------------------------------------------------------------------------------------

/// The request host without port, brackets kept for IPv6, without a trailing dot.
fn host_only(host: &str) -> &str {
    let host = host.trim();
    let host = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    match pattern {
        HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
        HostPattern::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
    }
}

/// Template captures on a match (empty for exact and prefix paths).
fn path_matches(pattern: &CompiledPath, path: &str) -> Option<Vec<(String, String)>> {
    match pattern {
        CompiledPath::Exact(p) => (p == path).then(Vec::new),
        CompiledPath::Prefix(lead) => strip_segment_prefix(path, lead).map(|_| Vec::new()),
        CompiledPath::Template(segments) => {
            let mut parts = path.strip_prefix('/')?.split('/');
            let mut params = Vec::new();
            for segment in segments {
                let part = parts.next()?;
                match segment {
                    Segment::Literal(lit) if lit == part => {}
                    Segment::Param(name) if !part.is_empty() => {
                        params.push((name.clone(), part.to_owned()));
                    }
                    _ => return None,
                }
            }
            parts.next().is_none().then_some(params)
        }
    }
}

/// The rest of `path` after `lead` when `lead` is a whole-segment prefix of it.
fn strip_segment_prefix<'p>(path: &'p str, lead: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(lead)?;
    (lead.is_empty() || lead.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
        .then_some(rest)
}

/// Decoded values of query parameter `name` in `raw` (`a=1&b=2`; `+` and `%XX` decoded).
fn query_values<'q>(raw: &'q str, name: &str) -> impl Iterator<Item = Cow<'q, str>> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == name).then(|| decode(v))
        })
}

/// Form decoding: `+` is a space, `%XX` a byte; malformed escapes are kept literally.
fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| {
                    let h = std::str::from_utf8(h).ok()?;
                    u8::from_str_radix(h, 16).ok()
                });
                if let Some(b) = hex {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn compile_route(index: usize, config: &RouteConfig) -> Result<CompiledRoute, String> {
    let m = &config.r#match;

    let hosts = m
        .hosts
        .iter()
        .map(|h| compile_host(h))
        .collect::<Result<Vec<_>, _>>()?;
    let (host_rank, host_suffix) = hosts
        .iter()
        .map(|h| match h {
            HostPattern::Exact(_) => (3, 0),
            HostPattern::Suffix(s) => (2, s.len()),
        })
        .min()
        .unwrap_or((1, 0));

    let path = m.path.as_ref().map(compile_path).transpose()?;
    let (path_rank, path_primary, path_secondary) = match &path {
        None => (0, 0, 0),
        Some(CompiledPath::Exact(p)) => (3, p.len(), 0),
        Some(CompiledPath::Template(segments)) => {
            let literal = segments
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count();
            (2, literal, segments.len())
        }
        Some(CompiledPath::Prefix(lead)) => (1, lead.len(), 0),
    };

    let methods = m
        .methods
        .iter()
        .map(|method| {
            if is_token(method) {
                Ok(method.to_ascii_uppercase())
            } else {
                Err(format!("method {method:?} is not an HTTP token"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    let headers = m
        .headers
        .iter()
        .map(|(name, want)| {
            let parsed = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header name {name:?} is not valid"))?;
            if want != "*" && HeaderValue::from_str(want).is_err() {
                return Err(format!("header {name}: value {want:?} is not valid"));
            }
            Ok(HeaderCond {
                name: parsed,
                display: name.clone(),
                want: (want != "*").then(|| want.clone()),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;

    let query = m
        .query
        .iter()
        .map(|(name, want)| {
            if name.is_empty() {
                return Err("query parameter name must not be empty".to_owned());
            }
            Ok(QueryCond {
                name: name.clone(),
                want: (want != "*").then(|| want.clone()),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;

    let pin_header = validate_backend(&config.backend)?;

    let rewrite_lead = path.as_ref().map(|p| match p {
        CompiledPath::Exact(p) | CompiledPath::Prefix(p) => p.clone(),
        CompiledPath::Template(segments) => segments
            .iter()
            .map_while(|s| match s {
                Segment::Literal(lit) if !lit.is_empty() => Some(format!("/{lit}")),
                _ => None,
            })
            .collect(),
    });
    if let Some(rewrite) = &config.rewrite {
        if let Some(prefix) = &rewrite.prefix {
            check_path("rewrite.prefix", prefix)?;
            if path.is_none() {
                return Err(
                    "rewrite.prefix needs a match.path whose matched part it replaces".to_owned(),
                );
            }
        }
        if let Some(host) = &rewrite.host
            && !is_authority(host)
        {
            return Err(format!(
                "rewrite.host {host:?} must be a host name with an optional :port"
            ));
        }
    }

    if config.timeout == Some(Duration::ZERO) {
        return Err("timeout must be greater than 0".to_owned());
    }
    if let Some(retries) = &config.retries
        && !(0.0..=100.0).contains(&retries.budget_percent)
    {
        return Err(format!(
            "retries.budget_percent {} must be between 0 and 100",
            retries.budget_percent
        ));
    }
    for ct in &config.content_types {
        let ok = ct
            .split_once('/')
            .is_some_and(|(t, s)| is_token(t) && is_token(s) && t != "*" && s != "*");
        if !ok {
            return Err(format!(
                "content type {ct:?} must be type/subtype without wildcards (e.g. application/json)"
            ));
        }
    }

    let conditions = headers.len() + query.len();
    Ok(CompiledRoute {
        config: config.clone(),
        index,
        key: Specificity {
            host_rank,
            host_suffix,
            path_rank,
            path_primary,
            path_secondary,
            conditions,
            has_methods: !methods.is_empty(),
        },
        hosts,
        path,
        methods,
        headers,
        query,
        pin_header,
        rewrite_lead,
    })
}

fn compile_host(host: &str) -> Result<HostPattern, String> {
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    if host == "*" {
        return Err("host \"*\" is not allowed: leave hosts empty to match any host".to_owned());
    }
    if name.contains(':') {
        return Err(format!(
            "host {host:?} must not include a port (ports are ignored)"
        ));
    }
    if !is_hostname(name) {
        return Err(format!(
            "host {host:?} is not valid (DNS labels; a wildcard only as a leading \"*.\")"
        ));
    }
    let name = name.to_ascii_lowercase();
    Ok(if wildcard {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name)
    })
}

fn compile_path(path: &PathMatch) -> Result<CompiledPath, String> {
    match path {
        PathMatch::Exact(p) => {
            check_path("exact path", p)?;
            Ok(CompiledPath::Exact(p.clone()))
        }
        PathMatch::Prefix(p) => {
            check_path("prefix", p)?;
            Ok(CompiledPath::Prefix(p.trim_end_matches('/').to_owned()))
        }
        PathMatch::Template(t) => compile_template(t).map(CompiledPath::Template),
    }
}

fn check_path(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{what} {p:?} must start with '/'"));
    }
    if p.contains(['?', '#']) || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{what} {p:?} must not contain '?', '#' or whitespace"
        ));
    }
    Ok(())
}

fn compile_template(t: &str) -> Result<Vec<Segment>, String> {
    check_path("template", t)?;
    let parts: Vec<&str> = t[1..].split('/').collect();
    let last = parts.len() - 1;
    let mut segments = Vec::with_capacity(parts.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        if part.is_empty() && i != last {
            return Err(format!("template {t:?} has an empty segment"));
        }
        let Some(inner) = part.strip_prefix('{') else {
            if part.contains(['{', '}']) {
                return Err(format!(
                    "template {t:?}: segment {part:?} mixes literal text and a parameter"
                ));
            }
            segments.push(Segment::Literal(part.to_owned()));
            continue;
        };
        if !inner.contains('}') {
            return Err(format!("template {t:?} is not closed"));
        }
        let Some(name) = inner.strip_suffix('}').filter(|n| !n.contains(['{', '}'])) else {
            return Err(format!(
                "template {t:?}: segment {part:?} mixes literal text and a parameter"
            ));
        };
        if name.is_empty() {
            return Err(format!("template {t:?} has an empty parameter name"));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "template {t:?}: parameter name {name:?} must be [A-Za-z0-9_]"
            ));
        }
        if names.contains(&name) {
            return Err(format!("template {t:?} repeats parameter {name:?}"));
        }
        names.push(name);
        segments.push(Segment::Param(name.to_owned()));
    }
    Ok(segments)
}

/// Checks the backend; returns the parsed pin header.
fn validate_backend(backend: &BackendConfig) -> Result<Option<HeaderName>, String> {
    let (split, pin) = match backend {
        BackendConfig::Service(service) => {
            return if is_name(service) {
                Ok(None)
            } else {
                Err(format!(
                    "backend service {service:?} must be non-empty [A-Za-z0-9._-]"
                ))
            };
        }
        BackendConfig::Split { split, pin } => (split, pin),
        // checked with the route's other settings when the pipeline is built (compile.rs)
        BackendConfig::Aggregate(_) | BackendConfig::OpenApi(_) => return Ok(None),
        BackendConfig::External(e) => {
            return match e.url.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                    Ok(None)
                }
                _ => Err(format!(
                    "backend external url {:?} must be http://host[:port] or https://host[:port]",
                    e.url
                )),
            };
        }
    };
    if split.is_empty() {
        return Err("backend split has no backends".to_owned());
    }
    for (i, b) in split.iter().enumerate() {
        if !is_name(&b.service) {
            return Err(format!(
                "backend split service {:?} must be non-empty [A-Za-z0-9._-]",
                b.service
            ));
        }
        if split[..i].iter().any(|o| o.service == b.service) {
            return Err(format!("backend split lists service {:?} twice", b.service));
        }
        if let Some(version) = &b.version {
            if version.trim().is_empty() || version.trim() != version {
                return Err(format!(
                    "backend split version {version:?} must be non-empty, without surrounding spaces"
                ));
            }
            let clash = split
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && names_backend(o, version));
            if clash {
                return Err(format!(
                    "backend split version {version:?} also names another backend"
                ));
            }
        }
    }
    if split.iter().all(|b| b.weight == 0) {
        return Err("backend split weights add up to 0".to_owned());
    }
    let Some(pin) = pin else {
        return Ok(None);
    };
    if pin.header.is_none() && pin.cookie.is_none() {
        return Err("backend pin needs a header or a cookie".to_owned());
    }
    if let Some(cookie) = &pin.cookie
        && !is_token(cookie)
    {
        return Err(format!(
            "backend pin cookie {cookie:?} is not a valid cookie name"
        ));
    }
    for s in &pin.services {
        if !split.iter().any(|b| names_backend(b, s)) {
            return Err(format!(
                "backend pin names {s:?}, which is not a service or version of the split"
            ));
        }
    }
    pin.header
        .as_ref()
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("backend pin header {h:?} is not a valid header name"))
        })
        .transpose()
}

/// `[A-Za-z0-9._-]+`, at most 128 bytes, not `.` or `..`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// An RFC 9110 token (methods, media type parts, cookie names).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Dot-separated labels of `[A-Za-z0-9_-]`, 1–63 bytes each, 253 bytes at most.
fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        })
}

/// `host` or `host:port`.
fn is_authority(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => is_hostname(host) && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => is_hostname(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Header or parameter pairs in a case table.
    type Pairs<'a> = &'a [(&'a str, &'a str)];

    fn routes(values: Vec<Value>) -> Vec<RouteConfig> {
        values
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("route config parses"))
            .collect()
    }

    fn table(values: Vec<Value>) -> RouteTable {
        RouteTable::compile(&routes(values)).expect("routes compile")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        map
    }

    /// `target` is `path?query`.
    fn view<'a>(
        method: &'a str,
        host: &'a str,
        target: &'a str,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        RequestView {
            method,
            host,
            path,
            query,
            headers: h,
        }
    }

    fn found(t: &RouteTable, req: &RequestView<'_>) -> Option<String> {
        t.find(req).map(|m| m.route.config.name.clone())
    }

    fn names(t: &RouteTable) -> Vec<&str> {
        t.routes().iter().map(|r| r.config.name.as_str()).collect()
    }

    fn svc(name: &str) -> Value {
        json!({"service": name})
    }

    /// The index must pick exactly what checking every route in order picks.
    #[test]
    fn index_agrees_with_a_linear_scan() {
        let hosts = [
            "",
            "api.example",
            "*.example",
            "*.api.example",
            "other.test",
        ];
        let paths = [
            json!(null),
            json!({"prefix": "/"}),
            json!({"prefix": "/users"}),
            json!({"prefix": "/users/admin"}),
            json!({"exact": "/users/me"}),
            json!({"exact": "/"}),
            json!({"template": "/users/{id}"}),
            json!({"template": "/users/{id}/orders"}),
            json!({"template": "/{kind}/{id}"}),
            json!({"prefix": "/v2"}),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut values = Vec::new();
        for i in 0..400 {
            let host = hosts[(next() % hosts.len() as u64) as usize];
            let path = &paths[(next() % paths.len() as u64) as usize];
            let mut m = serde_json::Map::new();
            if !host.is_empty() {
                m.insert("hosts".into(), json!([host]));
            }
            if !path.is_null() {
                m.insert("path".into(), path.clone());
            }
            if next() % 5 == 0 {
                m.insert("methods".into(), json!(["POST"]));
            }
            if next() % 7 == 0 {
                m.insert("headers".into(), json!({"x-v": "2"}));
            }
            values.push(json!({"name": format!("r{i}"), "match": m, "backend": svc("a")}));
        }
        let t = table(values);
        let h1 = HeaderMap::new();
        let h2 = headers(&[("x-v", "2")]);
        let req_hosts = [
            "api.example",
            "x.api.example",
            "a.example",
            "other.test",
            "none.test",
            "API.EXAMPLE:80",
        ];
        let targets = [
            "/",
            "/users",
            "/users/",
            "/users/me",
            "/users/7",
            "/users/7/orders",
            "/users/admin",
            "/users/admin/x",
            "/v2/users",
            "/x/y",
            "/x/y/z",
            "/usersx",
        ];
        for host in req_hosts {
            for target in targets {
                for method in ["GET", "POST"] {
                    for h in [&h1, &h2] {
                        let v = view(method, host, target, h);
                        assert_eq!(
                            t.find(&v).map(|m| m.route.config.name.clone()),
                            t.find_linear(&v).map(|m| m.route.config.name.clone()),
                            "{method} {host} {target}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn host_precedence() {
        let t = table(vec![
            json!({"name": "any", "backend": svc("a")}),
            json!({"name": "wild", "match": {"hosts": ["*.example"]}, "backend": svc("a")}),
            json!({"name": "wild-long", "match": {"hosts": ["*.api.example"]},
                "backend": svc("a")}),
            json!({"name": "exact", "match": {"hosts": ["api.example"]}, "backend": svc("a")}),
        ]);
        assert_eq!(names(&t), ["exact", "wild-long", "wild", "any"]);
        let h = HeaderMap::new();
        let cases = [
            ("api.example", "exact"),
            ("API.Example:8443", "exact"),
            ("api.example.", "exact"),
            ("x.api.example", "wild-long"),
            ("X.API.EXAMPLE:80", "wild-long"),
            ("a.example", "wild"),
            ("a.b.example", "wild"),
            ("example", "any"),
            ("other.test", "any"),
            ("[::1]:8080", "any"),
            ("", "any"),
        ];
        for (host, want) in cases {
            assert_eq!(
                found(&t, &view("GET", host, "/", &h)).as_deref(),
                Some(want),
                "host {host}"
            );
        }
    }

    #[test]
    fn multi_host_route_ranks_by_broadest_host() {
        let t = table(vec![
            json!({"name": "mixed", "match": {"hosts": ["api.example", "*.example"]},
                "backend": svc("a")}),
            json!({"name": "exact", "match": {"hosts": ["api.example"]}, "backend": svc("a")}),
        ]);
        assert_eq!(names(&t), ["exact", "mixed"]);
    }

    #[test]
    fn path_precedence() {
        let t = table(vec![
            json!({"name": "root", "match": {"path": {"prefix": "/"}}, "backend": svc("a")}),
            json!({"name": "users-prefix", "match": {"path": {"prefix": "/users"}},
                "backend": svc("a")}),
            json!({"name": "admin-prefix", "match": {"path": {"prefix": "/users/admin/"}},
                "backend": svc("a")}),
            json!({"name": "user", "match": {"path": {"template": "/users/{id}"}},
                "backend": svc("a")}),
            json!({"name": "any-two", "match": {"path": {"template": "/{kind}/{id}"}},
                "backend": svc("a")}),
            json!({"name": "order", "match": {"path": {"template": "/users/{id}/orders/{oid}"}},
                "backend": svc("a")}),
            json!({"name": "me", "match": {"path": {"exact": "/users/me"}}, "backend": svc("a")}),
            json!({"name": "none", "backend": svc("a")}),
        ]);
        assert_eq!(
            names(&t),
            [
                "me",
                "order",
                "user",
                "any-two",
                "admin-prefix",
                "users-prefix",
                "root",
                "none"
            ]
        );
        let h = HeaderMap::new();
        let cases = [
            ("/users/me", "me"),
            ("/users/7", "user"),
            ("/users/7/orders/9", "order"),
            ("/users/7/x", "users-prefix"),
            ("/users/", "users-prefix"),
            ("/users", "users-prefix"),
            ("/usersx", "root"),
            ("/users/admin/x", "admin-prefix"),
            // A template outranks a prefix whatever its length.
            ("/users/admin", "user"),
            ("/teams/3", "any-two"),
            ("/", "root"),
        ];
        for (path, want) in cases {
            assert_eq!(
                found(&t, &view("GET", "h", path, &h)).as_deref(),
                Some(want),
                "path {path}"
            );
        }
    }

    #[test]
    fn prefix_is_segment_aware() {
        let cases = [
            ("/users", "/users", true),
            ("/users", "/users/", true),
            ("/users", "/users/7", true),
            ("/users", "/usersx", false),
            ("/users", "/user", false),
            ("/users", "/", false),
            ("/users/", "/users", true),
            ("/users/", "/users/7", true),
            ("/users/", "/usersx", false),
            ("/", "/", true),
            ("/", "/anything/at/all", true),
            ("/a/b", "/a/b/c", true),
            ("/a/b", "/a/bc", false),
        ];
        let h = HeaderMap::new();
        for (prefix, path, want) in cases {
            let t = table(vec![
                json!({"name": "r", "match": {"path": {"prefix": prefix}}, "backend": svc("a")}),
            ]);
            assert_eq!(
                t.find(&view("GET", "h", path, &h)).is_some(),
                want,
                "prefix {prefix} path {path}"
            );
        }
    }

    #[test]
    fn template_captures() {
        let cases: &[(&str, &str, Option<Pairs<'_>>)] = &[
            ("/users/{id}", "/users/7", Some(&[("id", "7")])),
            ("/users/{id}", "/users/7/x", None),
            ("/users/{id}", "/users/", None),
            ("/users/{id}", "/users", None),
            ("/users/{id}", "/Users/7", None),
            (
                "/users/{id}/orders/{oid}",
                "/users/7/orders/9",
                Some(&[("id", "7"), ("oid", "9")]),
            ),
            ("/users/{id}/orders/{oid}", "/users/7/orders/", None),
            ("/users/{id}/orders/{oid}", "/users/7/items/9", None),
            ("/{a}", "/x", Some(&[("a", "x")])),
            ("/{a}", "/", None),
            ("/users/{id}/", "/users/7/", Some(&[("id", "7")])),
            ("/users/{id}/", "/users/7", None),
            (
                "/files/{name}",
                "/files/a%20b.txt",
                Some(&[("name", "a%20b.txt")]),
            ),
        ];
        let h = HeaderMap::new();
        for (template, path, want) in cases {
            let t = table(vec![
                json!({"name": "r", "match": {"path": {"template": template}},
                    "backend": svc("a")}),
            ]);
            let got = t.find(&view("GET", "h", path, &h)).map(|m| m.params);
            let want = want.map(|w| {
                w.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "template {template} path {path}");
        }
        let t = table(vec![
            json!({"name": "r", "match": {"path": {"template": "/u/{id}"}}, "backend": svc("a")}),
        ]);
        let m = t.find(&view("GET", "h", "/u/42", &h)).expect("matches");
        assert_eq!(m.param("id"), Some("42"));
        assert_eq!(m.param("nope"), None);
    }

    #[test]
    fn methods() {
        let t = table(vec![
            json!({"name": "any", "match": {"path": {"prefix": "/x"}}, "backend": svc("a")}),
            json!({"name": "read", "match": {"path": {"prefix": "/x"}, "methods": ["GET", "head"]},
                "backend": svc("a")}),
        ]);
        assert_eq!(names(&t), ["read", "any"]);
        let h = HeaderMap::new();
        for (method, want) in [
            ("GET", "read"),
            ("get", "read"),
            ("HEAD", "read"),
            ("POST", "any"),
            ("DELETE", "any"),
        ] {
            assert_eq!(
                found(&t, &view(method, "h", "/x", &h)).as_deref(),
                Some(want),
                "method {method}"
            );
        }
        let only = table(vec![
            json!({"name": "post", "match": {"methods": ["POST"]}, "backend": svc("a")}),
        ]);
        assert_eq!(found(&only, &view("GET", "h", "/", &h)), None);
    }

    #[test]
    fn header_conditions() {
        let t = table(vec![
            json!({"name": "base", "backend": svc("a")}),
            json!({"name": "v2", "match": {"headers": {"Accept-Version": "2"}},
                "backend": svc("a")}),
            json!({"name": "debug", "match": {"headers": {"X-Debug": "*"}}, "backend": svc("a")}),
        ]);
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "base"),
            (&[("accept-version", "2")], "v2"),
            (&[("ACCEPT-VERSION", "2")], "v2"),
            (&[("Accept-Version", "3")], "base"),
            (&[("Accept-Version", "2 ")], "base"),
            (&[("Accept-Version", "1"), ("Accept-Version", "2")], "v2"),
            (&[("x-debug", "yes")], "debug"),
            (&[("X-Debug", "")], "debug"),
            // Equal specificity: config order.
            (&[("x-debug", "1"), ("accept-version", "2")], "v2"),
        ];
        for (pairs, want) in cases {
            let h = headers(pairs);
            assert_eq!(
                found(&t, &view("GET", "h", "/", &h)).as_deref(),
                Some(*want),
                "headers {pairs:?}"
            );
        }
    }

    #[test]
    fn query_conditions() {
        let t = table(vec![
            json!({"name": "base", "backend": svc("a")}),
            json!({"name": "dbg", "match": {"query": {"debug": "1"}}, "backend": svc("a")}),
            json!({"name": "trace", "match": {"query": {"trace": "*"}}, "backend": svc("a")}),
            json!({"name": "spaced", "match": {"query": {"q": "a b"}}, "backend": svc("a")}),
            json!({"name": "both", "match": {"query": {"a": "1", "b": "2"}}, "backend": svc("a")}),
        ]);
        let h = HeaderMap::new();
        let cases = [
            ("/", "base"),
            ("/?debug=1", "dbg"),
            ("/?a=1&debug=1", "dbg"),
            ("/?debug=0", "base"),
            ("/?debug=0&debug=1", "dbg"),
            ("/?Debug=1", "base"),
            ("/?%64ebug=1", "dbg"),
            ("/?trace", "trace"),
            ("/?trace=", "trace"),
            ("/?q=a+b", "spaced"),
            ("/?q=a%20b", "spaced"),
            ("/?q=a%2", "base"),
            ("/?a=1&b=2", "both"),
            ("/?b=2&a=1", "both"),
            ("/?a=1&b=3", "base"),
            ("/?&&a=1&&b=2&", "both"),
        ];
        for (target, want) in cases {
            assert_eq!(
                found(&t, &view("GET", "h", target, &h)).as_deref(),
                Some(want),
                "target {target}"
            );
        }
    }

    fn versioned() -> RouteTable {
        table(vec![
            json!({"name": "users-v1", "backend": svc("users"),
                "match": {"hosts": ["api.example"], "path": {"prefix": "/users"}}}),
            json!({"name": "users-v2-path", "backend": svc("users-v2"),
                "match": {"hosts": ["api.example"], "path": {"prefix": "/v2/users"}},
                "rewrite": {"prefix": "/users"}}),
            json!({"name": "users-v2-header", "backend": svc("users-v2"),
                "match": {"hosts": ["api.example"], "path": {"prefix": "/users"},
                    "headers": {"Accept-Version": "2"}}}),
            json!({"name": "users-v2-host", "backend": svc("users-v2"),
                "match": {"hosts": ["v2.api.example"], "path": {"prefix": "/users"}}}),
        ])
    }

    #[test]
    fn versioning() {
        let t = versioned();
        let cases: &[(&str, &str, Pairs<'_>, &str, &str)] = &[
            ("api.example", "/users/7", &[], "users-v1", "/users/7"),
            (
                "api.example",
                "/v2/users/7",
                &[],
                "users-v2-path",
                "/users/7",
            ),
            ("api.example", "/v2/users", &[], "users-v2-path", "/users"),
            (
                "api.example",
                "/users/7",
                &[("Accept-Version", "2")],
                "users-v2-header",
                "/users/7",
            ),
            (
                "api.example",
                "/users/7",
                &[("Accept-Version", "1")],
                "users-v1",
                "/users/7",
            ),
            (
                "v2.api.example:443",
                "/users/7",
                &[],
                "users-v2-host",
                "/users/7",
            ),
        ];
        for (host, path, pairs, want, forwarded) in cases {
            let h = headers(pairs);
            let req = view("GET", host, path, &h);
            let m = t.find(&req).expect("a route matches");
            assert_eq!(m.route.config.name, *want, "{host}{path} {pairs:?}");
            assert_eq!(rewrite_path(m.route, path), *forwarded, "{host}{path}");
            assert_eq!(
                choose_backend(m.route, &req, 0),
                if *want == "users-v1" {
                    "users"
                } else {
                    "users-v2"
                }
            );
        }
    }

    #[test]
    fn explain_reasons() {
        let t = table(vec![
            json!({"name": "catch-all", "backend": svc("a")}),
            json!({"name": "v2-host", "match": {"hosts": ["v2.api.example"]}, "backend": svc("a")}),
            json!({"name": "v1", "match": {"path": {"prefix": "/v1"}}, "backend": svc("a")}),
            json!({"name": "writes", "match": {"path": {"prefix": "/v2/users"},
                "methods": ["get"]}, "backend": svc("a")}),
            json!({"name": "versioned", "match": {"path": {"prefix": "/v2"},
                "headers": {"Accept-Version": "2"}}, "backend": svc("a")}),
            json!({"name": "debug", "match": {"path": {"prefix": "/v2"}, "query": {"debug": "1"}},
                "backend": svc("a")}),
            json!({"name": "user", "match": {"path": {"template": "/v2/users/{id}"}},
                "backend": svc("a")}),
        ]);
        let h = HeaderMap::new();
        let e = t.explain(&view("POST", "API.example:443", "/v2/users/7?debug=0", &h));
        assert_eq!(e.chosen.as_deref(), Some("user"));
        let got: Vec<(&str, bool, &str)> = e
            .candidates
            .iter()
            .map(|c| (c.route.as_str(), c.matched, c.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "v2-host",
                    false,
                    "host api.example does not match [v2.api.example]"
                ),
                ("user", true, "matched (template /v2/users/{id}, id=7)"),
                ("writes", false, "method POST not in [GET]"),
                (
                    "versioned",
                    false,
                    "header Accept-Version: missing (wants 2)"
                ),
                ("debug", false, "query debug: is 0 (wants 1)"),
                ("v1", false, "path /v2/users/7 does not match prefix /v1"),
                (
                    "catch-all",
                    true,
                    "matched, but route user is more specific"
                ),
            ]
        );
        let json = serde_json::to_value(&e).expect("explanation serializes");
        assert_eq!(json["chosen"], "user");
        assert_eq!(json["candidates"][0]["route"], "v2-host");

        let e = t.explain(&view("GET", "", "/x", &h));
        assert_eq!(e.chosen.as_deref(), Some("catch-all"));
        assert_eq!(
            e.candidates[0].reason,
            "host (none) does not match [v2.api.example]"
        );
        assert_eq!(
            e.candidates.last().map(|c| c.reason.as_str()),
            Some("matched (any path)")
        );

        let none = table(vec![
            json!({"name": "x", "match": {"headers": {"X-A": "*"}}, "backend": svc("a")}),
        ]);
        let h = headers(&[("x-b", "1")]);
        let e = none.explain(&view("GET", "h", "/", &h));
        assert_eq!(e.chosen, None);
        assert_eq!(
            e.candidates[0].reason,
            "header X-A: missing (wants any value)"
        );
    }

    fn split_route(split: Value, pin: Option<Value>) -> RouteTable {
        let mut backend = json!({"split": split});
        if let Some(pin) = pin {
            backend["pin"] = pin;
        }
        table(vec![json!({"name": "r", "backend": backend})])
    }

    fn spread(t: &RouteTable, h: &HeaderMap) -> BTreeMap<String, u32> {
        let req = view("GET", "h", "/", h);
        let route = &t.routes()[0];
        let mut counts = BTreeMap::new();
        for roll in 0..ROLL_RANGE {
            *counts
                .entry(choose_backend(route, &req, roll).to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn weighted_split() {
        let cases: &[(Value, &[(&str, u32)])] = &[
            (
                json!([{"service": "users", "weight": 90}, {"service": "users-canary",
                    "weight": 10}]),
                &[("users", 9000), ("users-canary", 1000)],
            ),
            (
                json!([{"service": "a", "weight": 1}, {"service": "b", "weight": 0},
                    {"service": "c", "weight": 2}]),
                &[("a", 3334), ("c", 6666)],
            ),
            (
                json!([{"service": "only", "weight": 7}]),
                &[("only", 10_000)],
            ),
            (
                json!([{"service": "a", "weight": u32::MAX}, {"service": "b", "weight": u32::MAX}]),
                &[("a", 5000), ("b", 5000)],
            ),
        ];
        let h = HeaderMap::new();
        for (split, want) in cases {
            let t = split_route(split.clone(), None);
            let want: BTreeMap<String, u32> =
                want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            assert_eq!(spread(&t, &h), want, "split {split}");
        }
        // Out-of-range rolls count as the last roll.
        let t = split_route(
            json!([{"service": "a", "weight": 1}, {"service": "b", "weight": 1}]),
            None,
        );
        let req = view("GET", "h", "/", &h);
        assert_eq!(choose_backend(&t.routes()[0], &req, u32::MAX), "b");
        assert_eq!(choose_backend(&t.routes()[0], &req, ROLL_RANGE), "b");
    }

    #[test]
    fn pinning() {
        let split = json!([
            {"service": "users", "weight": 100, "version": "v1"},
            {"service": "users-canary", "weight": 0, "version": "v2"},
        ]);
        let pin = json!({"header": "X-Canary", "cookie": "canary"});
        let t = split_route(split.clone(), Some(pin));
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "users"),
            (&[("x-canary", "users-canary")], "users-canary"),
            (&[("X-Canary", " v2 ")], "users-canary"),
            (&[("x-canary", "V2")], "users"),
            (&[("x-canary", "nope")], "users"),
            (&[("cookie", "a=1; canary=users-canary")], "users-canary"),
            (
                &[("cookie", "a=1"), ("cookie", "canary=v2")],
                "users-canary",
            ),
            (&[("cookie", "canary=\"v2\"")], "users-canary"),
            (&[("cookie", "xcanary=v2")], "users"),
            // Header first, then cookie; an unknown header value falls through to the cookie.
            (&[("x-canary", "v1"), ("cookie", "canary=v2")], "users"),
            (
                &[("x-canary", "nope"), ("cookie", "canary=v2")],
                "users-canary",
            ),
        ];
        for (pairs, want) in cases {
            let h = headers(pairs);
            let counts = spread(&t, &h);
            assert_eq!(
                counts.keys().collect::<Vec<_>>(),
                [want],
                "headers {pairs:?}"
            );
        }

        // `services` limits what a request may pin to.
        let t = split_route(split, Some(json!({"cookie": "canary", "services": ["v1"]})));
        let h = headers(&[("cookie", "canary=v2")]);
        assert_eq!(spread(&t, &h).keys().collect::<Vec<_>>(), ["users"]);
    }

    #[test]
    fn cookies() {
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            (&["a=1; b=2"], "b", Some("2")),
            (&["a=1;b=2"], "b", Some("2")),
            (&["a=1", "b=2"], "b", Some("2")),
            (&["a=1; b=2"], "c", None),
            (&["a=1; b=2"], "B", None),
            (&["a=\"q\""], "a", Some("q")),
            (&["a="], "a", Some("")),
            (&["flag; a=1"], "a", Some("1")),
            (&["a=1; a=2"], "a", Some("1")),
            (&[], "a", None),
        ];
        for (values, name, want) in cases {
            let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("cookie", *v)).collect();
            let h = headers(&pairs);
            assert_eq!(cookie(&h, name), *want, "cookies {values:?} name {name}");
        }
    }

    #[test]
    fn compile_errors() {
        let ok_backend = svc("a");
        let cases: Vec<(Vec<Value>, &str)> = vec![
            (
                vec![
                    json!({"name": "a", "backend": ok_backend}),
                    json!({"name": "a", "backend": ok_backend}),
                ],
                "routes[1] (a): duplicate route name (first used by routes[0])",
            ),
            (
                vec![json!({"name": "bad name", "backend": ok_backend})],
                "routes[0] (bad name): name \"bad name\" must be non-empty [A-Za-z0-9._-]",
            ),
            (
                vec![
                    json!({"name": "a", "backend": ok_backend}),
                    json!({"name": "b", "backend": ok_backend}),
                    json!({"name": "users-v2", "match": {"path": {"template": "/users/{"}},
                        "backend": ok_backend}),
                ],
                "routes[2] (users-v2): template \"/users/{\" is not closed",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/users/{}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/users/{}\" has an empty parameter name",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/a/{id}/{id}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/a/{id}/{id}\" repeats parameter \"id\"",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/a/x{id}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/a/x{id}\": segment \"x{id}\" mixes literal text and a parameter",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/a/{id}x"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/a/{id}x\": segment \"{id}x\" mixes literal text and a parameter",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/a//{id}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/a//{id}\" has an empty segment",
            ),
            (
                vec![
                    json!({"name": "t", "match": {"path": {"template": "/a/{i-d}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (t): template \"/a/{i-d}\": parameter name \"i-d\" must be [A-Za-z0-9_]",
            ),
            (
                vec![json!({"name": "p", "match": {"path": {"prefix": "users"}},
                        "backend": ok_backend})],
                "routes[0] (p): prefix \"users\" must start with '/'",
            ),
            (
                vec![json!({"name": "p", "match": {"path": {"exact": "users"}},
                        "backend": ok_backend})],
                "routes[0] (p): exact path \"users\" must start with '/'",
            ),
            (
                vec![
                    json!({"name": "p", "match": {"path": {"template": "users/{id}"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (p): template \"users/{id}\" must start with '/'",
            ),
            (
                vec![json!({"name": "p", "match": {"path": {"exact": "/a?b=1"}},
                        "backend": ok_backend})],
                "routes[0] (p): exact path \"/a?b=1\" must not contain '?', '#' or whitespace",
            ),
            (
                vec![
                    json!({"name": "w", "backend": {"split": [{"service": "a", "weight": 0},
                        {"service": "b", "weight": 0}]}}),
                ],
                "routes[0] (w): backend split weights add up to 0",
            ),
            (
                vec![json!({"name": "w", "backend": {"split": []}})],
                "routes[0] (w): backend split has no backends",
            ),
            (
                vec![
                    json!({"name": "w", "backend": {"split": [{"service": "a", "weight": 1},
                        {"service": "a", "weight": 1}]}}),
                ],
                "routes[0] (w): backend split lists service \"a\" twice",
            ),
            (
                vec![
                    json!({"name": "w", "backend": {"split": [{"service": "a", "weight": 1,
                        "version": "b"}, {"service": "b", "weight": 1}]}}),
                ],
                "routes[0] (w): backend split version \"b\" also names another backend",
            ),
            (
                vec![
                    json!({"name": "pin", "backend": {"split": [{"service": "a", "weight": 1}],
                            "pin": {"header": "X-Canary", "services": ["a-canary"]}}}),
                ],
                "routes[0] (pin): backend pin names \"a-canary\", which is not a service or version of the split",
            ),
            (
                vec![
                    json!({"name": "pin", "backend": {"split": [{"service": "a", "weight": 1}],
                        "pin": {}}}),
                ],
                "routes[0] (pin): backend pin needs a header or a cookie",
            ),
            (
                vec![
                    json!({"name": "pin", "backend": {"split": [{"service": "a", "weight": 1}],
                        "pin": {"header": "X Canary"}}}),
                ],
                "routes[0] (pin): backend pin header \"X Canary\" is not a valid header name",
            ),
            (
                vec![json!({"name": "h", "match": {"hosts": ["api.*.example"]},
                        "backend": ok_backend})],
                "routes[0] (h): host \"api.*.example\" is not valid (DNS labels; a wildcard only as a leading \"*.\")",
            ),
            (
                vec![json!({"name": "h", "match": {"hosts": ["*"]}, "backend": ok_backend})],
                "routes[0] (h): host \"*\" is not allowed: leave hosts empty to match any host",
            ),
            (
                vec![json!({"name": "h", "match": {"hosts": ["api.example:443"]},
                        "backend": ok_backend})],
                "routes[0] (h): host \"api.example:443\" must not include a port (ports are ignored)",
            ),
            (
                vec![
                    json!({"name": "m", "match": {"methods": ["GET POST"]}, "backend": ok_backend}),
                ],
                "routes[0] (m): method \"GET POST\" is not an HTTP token",
            ),
            (
                vec![
                    json!({"name": "hd", "match": {"headers": {"Bad Header": "1"}},
                        "backend": ok_backend}),
                ],
                "routes[0] (hd): header name \"Bad Header\" is not valid",
            ),
            (
                vec![json!({"name": "rw", "rewrite": {"prefix": "/x"}, "backend": ok_backend})],
                "routes[0] (rw): rewrite.prefix needs a match.path whose matched part it replaces",
            ),
            (
                vec![json!({"name": "rw", "match": {"path": {"prefix": "/a"}},
                        "rewrite": {"prefix": "x"}, "backend": ok_backend})],
                "routes[0] (rw): rewrite.prefix \"x\" must start with '/'",
            ),
            (
                vec![json!({"name": "rw", "rewrite": {"host": "a b"}, "backend": ok_backend})],
                "routes[0] (rw): rewrite.host \"a b\" must be a host name with an optional :port",
            ),
            (
                vec![json!({"name": "to", "timeout": "0s", "backend": ok_backend})],
                "routes[0] (to): timeout must be greater than 0",
            ),
            (
                vec![json!({"name": "re", "retries": {"budget_percent": 150.0},
                        "backend": ok_backend})],
                "routes[0] (re): retries.budget_percent 150 must be between 0 and 100",
            ),
            (
                vec![json!({"name": "ct", "content_types": ["json"], "backend": ok_backend})],
                "routes[0] (ct): content type \"json\" must be type/subtype without wildcards (e.g. application/json)",
            ),
            (
                vec![json!({"name": "ct", "content_types": ["text/*"], "backend": ok_backend})],
                "routes[0] (ct): content type \"text/*\" must be type/subtype without wildcards (e.g. application/json)",
            ),
            (
                vec![json!({"name": "s", "backend": svc("")})],
                "routes[0] (s): backend service \"\" must be non-empty [A-Za-z0-9._-]",
            ),
        ];
        for (values, want) in cases {
            let err = RouteTable::compile(&routes(values)).expect_err(want);
            assert_eq!(err.to_string(), want);
        }
    }

    #[test]
    fn compile_accepts_valid_edge_cases() {
        let t = table(vec![
            json!({"name": "a.b_c-1", "match": {"hosts": ["*.example", "API.Example"],
                "path": {"template": "/"},
                   "methods": ["PURGE"], "query": {"x": "*"}}, "content_types": ["application/json", "text/plain"],
                   "timeout": "1.5s", "retries": {}, "rewrite": {"host": "users.internal:8080"}, "backend": svc("a")}),
            json!({"name": "pin-zero", "backend": {"split": [{"service": "a", "weight": 1},
                {"service": "b", "weight": 0, "version": "v2"}],
                   "pin": {"cookie": "canary", "services": ["v2", "a"]}}}),
        ]);
        assert_eq!(t.routes().len(), 2);
        let r = &t.routes()[0];
        assert_eq!(r.index(), 0);
        assert_eq!(r.config.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            r.config.retries,
            Some(RetryConfig {
                attempts: 2,
                budget_percent: 20.0
            })
        );
        assert!(
            RouteTable::compile(&[])
                .expect("empty table")
                .routes()
                .is_empty()
        );
        assert_eq!(t.routes()[1].config.backend.services(), ["a", "b"]);
        assert_eq!(r.config.backend.services(), ["a"]);
    }

    #[test]
    fn rewrite_paths() {
        let cases = [
            (
                json!({"prefix": "/v2/users"}),
                "/users",
                "/v2/users/7",
                "/users/7",
            ),
            (
                json!({"prefix": "/v2/users"}),
                "/users",
                "/v2/users",
                "/users",
            ),
            (
                json!({"prefix": "/v2/users"}),
                "/users",
                "/v2/users/",
                "/users/",
            ),
            (json!({"prefix": "/api"}), "/", "/api", "/"),
            (json!({"prefix": "/api"}), "/", "/api/x", "/x"),
            (json!({"prefix": "/api"}), "/", "/api/", "/"),
            (json!({"prefix": "/api/"}), "/svc/", "/api/x/y", "/svc/x/y"),
            (json!({"prefix": "/api"}), "/svc", "/api//x", "/svc/x"),
            (json!({"prefix": "/"}), "/base", "/x", "/base/x"),
            (json!({"prefix": "/"}), "/base", "/", "/base/"),
            (json!({"prefix": "/api"}), "/svc", "/other", "/other"),
            (
                json!({"exact": "/login"}),
                "/auth/login",
                "/login",
                "/auth/login",
            ),
            (
                json!({"template": "/v1/users/{id}/orders"}),
                "/users",
                "/v1/users/7/orders",
                "/users/7/orders",
            ),
            (
                json!({"template": "/{tenant}/items"}),
                "/t",
                "/acme/items",
                "/t/acme/items",
            ),
        ];
        for (path, to, input, want) in cases {
            let t = table(vec![
                json!({"name": "r", "match": {"path": path}, "rewrite": {"prefix": to},
                    "backend": svc("a")}),
            ]);
            assert_eq!(
                rewrite_path(&t.routes()[0], input),
                want,
                "{path} -> {to} on {input}"
            );
        }
        let plain = table(vec![json!({"name": "r", "backend": svc("a")})]);
        assert_eq!(rewrite_path(&plain.routes()[0], "/a/b"), "/a/b");
        assert_eq!(rewrite_path(&plain.routes()[0], ""), "/");
    }

    #[test]
    fn yaml_shapes_round_trip() {
        let cases = [
            json!({"name": "plain", "backend": {"service": "x"}}),
            json!({"name": "split", "backend": {
                "split": [{"service": "users", "weight": 90}, {"service": "users-canary",
                    "weight": 10, "version": "v2"}],
                "pin": {"header": "X-Canary", "cookie": "canary"}}}),
            json!({"name": "tpl", "match": {"path": {"template": "/users/{id}"}},
                "backend": {"service": "users"}}),
            json!({"name": "full",
                "match": {"hosts": ["api.example"], "path": {"prefix": "/v2/users"}, "methods": ["GET"],
                          "headers": {"Accept-Version": "2"}, "query": {"debug": "*"}},
                "backend": {"service": "users"}, "rewrite": {"prefix": "/users", "host": "users.internal"},
                "timeout": "15s", "retries": {"attempts": 3, "budget_percent": 10.0},
                "max_body": 1_048_576, "content_types": ["application/json"]}),
        ];
        for value in cases {
            let config: RouteConfig = serde_json::from_value(value.clone()).expect("parses");
            let mut back = serde_json::to_value(&config).expect("serializes");
            // `match` is always written; drop an empty one to compare with the input.
            if back["match"] == json!({}) && value.get("match").is_none() {
                back.as_object_mut().expect("object").remove("match");
            }
            assert_eq!(back, value);
            let again: RouteConfig = serde_json::from_value(back).expect("re-parses");
            assert_eq!(again, config);
        }

        let split: RouteConfig = serde_json::from_value(json!({"name": "s", "backend": {
            "split": [{"service": "a", "weight": 1}], "pin": {"cookie": "c"}}}))
        .expect("split parses");
        assert!(matches!(
            split.backend,
            BackendConfig::Split {
                pin: Some(PinConfig {
                    cookie: Some(_),
                    ..
                }),
                ..
            }
        ));
        assert_eq!(split.r#match, MatchConfig::default());

        let rejected = [
            (
                json!({"name": "x", "backend": {"service": "a"}, "extra": 1}),
                "unknown field `extra`",
            ),
            (
                json!({"name": "x", "match": {"paths": []}, "backend": {"service": "a"}}),
                "unknown field `paths`",
            ),
            (
                json!({"name": "x", "match": {"path": {"glob": "/a"}},
                    "backend": {"service": "a"}}),
                "unknown variant `glob`",
            ),
            (
                json!({"name": "x", "backend": {"service": "a", "weight": 1}}),
                "unknown field `weight`",
            ),
            (
                json!({"name": "x", "backend": {"service": "a", "split": []}}),
                "set exactly one of `service`, `split`",
            ),
            (
                json!({"name": "x", "backend": {}}),
                "set exactly one of `service`, `split`",
            ),
            (
                json!({"name": "x", "backend": {"service": "a", "pin": {"header": "h"}}}),
                "`pin` only applies to a `split`",
            ),
            (
                json!({"name": "x", "backend": {"split": [{"service": "a", "weight": 1, "w": 2}]}}),
                "unknown field `w`",
            ),
            (
                json!({"name": "x", "timeout": "soon", "backend": {"service": "a"}}),
                "expected a duration",
            ),
        ];
        for (value, want) in rejected {
            let err = serde_json::from_value::<RouteConfig>(value.clone()).expect_err("rejected");
            assert!(err.to_string().contains(want), "{value}: {err}");
        }
    }

    #[test]
    fn json_schema_describes_the_yaml_shape() {
        let schema =
            serde_json::to_value(schemars::schema_for!(RouteConfig)).expect("schema serializes");
        assert!(schema["properties"]["match"].is_object(), "{schema}");
        assert_eq!(
            schema["properties"]["timeout"]["type"],
            json!(["string", "null"]),
            "{schema}"
        );
        let text = schema.to_string();
        assert!(
            text.contains("\"split\"") && text.contains("\"pin\""),
            "{text}"
        );
        assert_eq!(schema["additionalProperties"], json!(false));
    }
}
