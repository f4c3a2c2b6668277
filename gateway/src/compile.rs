//! `gateway.yaml` -> the pipeline the front runs: the pre-route chain (hygiene, HTTPS redirect,
//! gateway-wide CORS for requests no route takes), and per route its filter chain and action,
//! built once per config load. Requests never look anything up by name.
//!
//! Upstreams come from an [`Upstreams`] factory: the running gateway's mesh client, or (for
//! `meshgate config validate`) placeholders that only check what can be checked offline.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http::request;
use meshgate_agent::http::{
    action::{Proxy, ProxySettings, Retries, RetryBudget, RouteAction},
    chain::Chain,
    ctx::Ctx,
    filter::Filter,
    pipeline::{PipelineConfig, Route, Router},
    respond::Problem,
    upstream::{External, ExternalConfig, SendFuture, Upstream, UpstreamError},
};

use crate::{
    config::{GatewayConfig, GatewayConfigError},
    cors::Cors,
    filters::{
        auth::AuthFilter, cors::CorsFilter, hygiene::HygieneFilter, limits::ContentTypes,
        rate_limit::RateLimitFilter, redirect::RedirectHttps, rewrite::Rewrite,
        schema::SchemaFilter, transform::TransformFilter,
    },
    grpc_web::{GrpcWeb, GrpcWebFilter},
    hygiene::Hygiene,
    proxy::{Backends, GatewayProxy},
    routes::{BackendConfig, RequestView, RouteTable},
};

/// Makes the upstreams routes send to.
pub trait Upstreams {
    /// The upstream for mesh service `service`.
    fn mesh(&self, service: &str) -> Arc<dyn Upstream>;
    /// The upstream for an external URL.
    fn external(&self, cfg: &ExternalConfig) -> Result<Arc<dyn Upstream>, String>;
}

/// Upstreams for validation: mesh services are placeholders; external URLs are built (so
/// their settings and CA files are checked) but never called.
#[derive(Debug, Default)]
pub struct Offline;

/// A mesh service the process is not connected to.
#[derive(Debug)]
struct Unconnected(Arc<str>);

impl Upstream for Unconnected {
    fn name(&self) -> &Arc<str> {
        &self.0
    }
    fn send<'a>(
        &'a self,
        _req: http::Request<meshgate_agent::http::Body>,
        _ctx: &'a Ctx,
        _exclude: &'a [std::net::SocketAddr],
    ) -> SendFuture<'a> {
        Box::pin(async move { Err(UpstreamError::NoEndpoints(self.0.to_string())) })
    }
}

impl Upstreams for Offline {
    fn mesh(&self, service: &str) -> Arc<dyn Upstream> {
        Arc::new(Unconnected(Arc::from(service)))
    }
    fn external(&self, cfg: &ExternalConfig) -> Result<Arc<dyn Upstream>, String> {
        External::new(cfg, Duration::from_secs(5))
            .map(|e| e as Arc<dyn Upstream>)
            .map_err(|e| e.to_string())
    }
}

/// Template captures of the matched route (`/users/{id}` -> `[("id", "7")]`), for actions.
#[derive(Debug, Clone, Default)]
pub struct RouteParams(pub Vec<(String, String)>);

/// Routes requests with the route table.
#[derive(Debug)]
pub struct GatewayRouter {
    table: Arc<RouteTable>,
    /// By config index.
    routes: Vec<Arc<Route>>,
}

impl Router for GatewayRouter {
    fn route(&self, req: &request::Parts, ctx: &mut Ctx) -> Result<Arc<Route>, Problem> {
        let view = RequestView {
            method: req.method.as_str(),
            host: &ctx.authority,
            path: req.uri.path(),
            query: req.uri.query().unwrap_or_default(),
            headers: &req.headers,
        };
        let Some(m) = self.table.find(&view) else {
            return Err(Problem::NoRoute);
        };
        let route = self.routes[m.route.index()].clone();
        if !m.params.is_empty() {
            ctx.extensions.insert(RouteParams(m.params));
        }
        Ok(route)
    }
}

/// Builds the pipeline for `cfg`: its table, hygiene and auth already compiled by
/// [`GatewayConfig::compile_with`].
pub(crate) fn pipeline(
    cfg: &GatewayConfig,
    table: &Arc<RouteTable>,
    hygiene: &Hygiene,
    auth: &Arc<crate::auth::Auth>,
    https_port: Option<u16>,
    upstreams: &dyn Upstreams,
) -> Result<PipelineConfig, GatewayConfigError> {
    let e = |m: String| GatewayConfigError(m);
    let identity = auth.identity_header_names();
    let global_cors = match &cfg.cors {
        Some(c) => Some(Cors::new(c).map_err(|x| e(format!("cors: {x}")))?),
        None => None,
    };
    let mut pre: Vec<Arc<dyn Filter>> = vec![Arc::new(HygieneFilter::new(
        hygiene.clone(),
        identity.clone(),
    ))];
    if cfg.redirect_https {
        pre.push(Arc::new(RedirectHttps { https_port }));
    }
    if let Some(h) = &cfg.hsts {
        pre.push(Arc::new(crate::filters::hsts::Hsts::new(h)));
    }
    if let Some(c) = &global_cors {
        pre.push(Arc::new(CorsFilter::global(c.clone())));
    }
    // headers meshgate sets that a client's `Connection` header must not remove
    let mut protected = identity;
    for h in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "traceparent",
        "tracestate",
    ] {
        protected.push(http::HeaderName::from_static(h));
    }
    if let Ok(h) = http::HeaderName::from_bytes(cfg.headers.request_id_header.trim().as_bytes()) {
        protected.push(h);
    }
    // the document an `openapi` backend serves: built once per load, from every route
    let openapi_doc = if cfg
        .routes
        .iter()
        .any(|r| matches!(r.backend, BackendConfig::OpenApi(_)))
    {
        Some(crate::openapi::from_config(cfg, None).map_err(e)?)
    } else {
        None
    };
    let mut routes = Vec::with_capacity(cfg.routes.len());
    let mut by_index: BTreeMap<usize, Arc<Route>> = BTreeMap::new();
    for compiled in table.routes() {
        let r = &compiled.config;
        let i = compiled.index();
        let name = &r.name;
        let compiled = Arc::new(compiled.clone());
        let max_body = r.max_body.unwrap_or(cfg.limits.max_body);
        let mut chain: Vec<Arc<dyn Filter>> = Vec::new();
        let cors = match r.cors.as_ref() {
            Some(c) => {
                Some(Cors::new(c).map_err(|x| e(format!("routes[{i}] ({name}).cors: {x}")))?)
            }
            None => global_cors.clone(),
        };
        if let Some(c) = cors {
            chain.push(Arc::new(CorsFilter::route(c)));
        }
        if !r.content_types.is_empty() {
            chain.push(Arc::new(ContentTypes::new(&r.content_types)));
        }
        // a limit keyed on the caller's identity runs after authentication; one keyed on the
        // client address, a header or the route runs before it (see rate_limit_needs_principal)
        let limit = r
            .rate_limit
            .as_ref()
            .map(|l| (auth.rate_limit_needs_principal(l), l));
        if let Some((false, l)) = limit {
            chain.push(Arc::new(RateLimitFilter::new(auth.clone(), l, name)));
        }
        if let Some(a) = &r.auth {
            chain.push(Arc::new(AuthFilter::new(auth.clone(), a.clone())));
        }
        if let Some((true, l)) = limit {
            chain.push(Arc::new(RateLimitFilter::new(auth.clone(), l, name)));
        }
        if let Some(sc) = &r.request_schema {
            let schema = crate::schema::RequestSchema::new(sc)
                .map_err(|x| e(format!("routes[{i}] ({name}).request_schema: {x}")))?;
            chain.push(Arc::new(SchemaFilter::new(Arc::new(schema), max_body)));
        }
        if let Some(t) = &r.transforms {
            crate::transform::validate(t)
                .map_err(|x| e(format!("routes[{i}] ({name}).transforms: {x}")))?;
            chain.push(Arc::new(TransformFilter::new(t.clone(), max_body)));
        }
        if let Some(rw) = Rewrite::for_route(&compiled) {
            chain.push(Arc::new(rw));
        }
        let special = matches!(
            r.backend,
            BackendConfig::Aggregate(_) | BackendConfig::OpenApi(_)
        );
        if special && (r.transcode.is_some() || r.grpc_web) {
            return Err(e(format!(
                "routes[{i}] ({name}): transcode and grpc_web need a service, split or external backend"
            )));
        }
        if r.transcode.is_some() && r.rewrite.as_ref().is_some_and(|w| w.prefix.is_some()) {
            return Err(e(format!(
                "routes[{i}] ({name}): rewrite.prefix does not apply to a transcoded route (its google.api.http rules name the paths)"
            )));
        }
        let retries = r.retries.as_ref().map(|rc| Retries {
            attempts: rc.attempts,
            budget: RetryBudget::new(rc.budget_percent),
        });
        let settings = |timeout: Option<Duration>, retries: Option<Retries>| ProxySettings {
            timeout: timeout.or(r.timeout).unwrap_or(cfg.limits.timeout),
            retries,
            response_idle_timeout: r
                .response_idle_timeout
                .or(Some(cfg.limits.response_idle_timeout))
                .filter(|d| !d.is_zero()),
            protected_headers: protected.clone(),
            ..ProxySettings::default()
        };
        let action: Arc<dyn RouteAction> = match &r.backend {
            BackendConfig::Aggregate(a) => {
                let params: Vec<String> = match &r.r#match.path {
                    Some(crate::routes::PathMatch::Template(t)) => {
                        crate::aggregate::placeholders(t)
                            .into_iter()
                            .map(str::to_owned)
                            .collect()
                    }
                    _ => Vec::new(),
                };
                a.validate(&params)
                    .map_err(|x| e(format!("routes[{i}] ({name}).backend.{x}")))?;
                let mut calls = Vec::with_capacity(a.calls.len());
                for (j, c) in a.calls.iter().enumerate() {
                    let upstream = match (&c.service, &c.external) {
                        (Some(s), _) => upstreams.mesh(s),
                        (None, Some(x)) => upstreams.external(x).map_err(|m| {
                            e(format!(
                                "routes[{i}] ({name}).backend.aggregate.calls[{j}].external: {m}"
                            ))
                        })?,
                        (None, None) => unreachable!("invariant: validate checked the backend"),
                    };
                    calls.push(crate::aggregate::Call {
                        name: c.name.clone(),
                        upstream,
                        path: c.path.clone(),
                        proxy: Proxy::new(settings(c.timeout, None)),
                    });
                }
                let mut forward: Vec<http::HeaderName> = a
                    .forward_headers
                    .iter()
                    .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect();
                if a.forward_identity {
                    forward.extend(auth.identity_header_names());
                }
                Arc::new(crate::aggregate::Aggregate::new(
                    calls,
                    a.on_error,
                    forward,
                    a.max_response_bytes,
                ))
            }
            BackendConfig::OpenApi(_) => Arc::new(crate::openapi::ServeOpenApi::new(
                openapi_doc
                    .as_ref()
                    .expect("invariant: built when a route serves it"),
            )),
            backend => {
                let backends = match backend {
                    BackendConfig::Service(s) => Backends::One(upstreams.mesh(s)),
                    BackendConfig::Split { split, .. } => Backends::Split(
                        split
                            .iter()
                            .map(|b| (b.service.clone(), upstreams.mesh(&b.service)))
                            .collect(),
                    ),
                    BackendConfig::External(x) => {
                        Backends::One(upstreams.external(x).map_err(|m| {
                            e(format!("routes[{i}] ({name}).backend.external: {m}"))
                        })?)
                    }
                    BackendConfig::Aggregate(_) | BackendConfig::OpenApi(_) => {
                        unreachable!("invariant: matched above")
                    }
                };
                let proxy = GatewayProxy {
                    proxy: Proxy::new(settings(None, retries)),
                    route: compiled.clone(),
                    backends,
                };
                match &r.transcode {
                    Some(t) => {
                        let loaded = t
                            .load()
                            .map_err(|x| e(format!("routes[{i}] ({name}).transcode: {x}")))?;
                        Arc::new(crate::transcode::Transcode::new(t, loaded, proxy))
                    }
                    None => Arc::new(proxy),
                }
            }
        };
        let action: Arc<dyn RouteAction> = if r.grpc_web {
            chain.insert(0, Arc::new(GrpcWebFilter));
            Arc::new(GrpcWeb::new(action))
        } else {
            action
        };
        let route = Arc::new(Route {
            stats: Default::default(),
            name: Arc::from(name.as_str()),
            chain: Chain::new(chain),
            action,
            max_body,
            body_idle_timeout: cfg.limits.body_idle_timeout,
            allow_trace: r
                .r#match
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case("TRACE")),
        });
        by_index.insert(i, route);
    }
    for i in 0..cfg.routes.len() {
        routes.push(
            by_index
                .remove(&i)
                .expect("invariant: every configured route was compiled"),
        );
    }
    Ok(PipelineConfig {
        pre: Chain::new(pre),
        router: Arc::new(GatewayRouter {
            table: table.clone(),
            routes,
        }),
        paths: cfg.paths,
        max_head_bytes: cfg.limits.max_header_bytes,
    })
}
