//! Builds a running gateway: its config checked and its TLS files read first, listeners bound,
//! then the shared bootstrap (its own SVID joined like an agent's, discovery for every backend
//! service, the tunnel pool), the pipeline and the fronts, and the admin API with `/routes`.
//! Hot reload swaps the compiled pipeline; what cannot change at run time is refused by name.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use arc_swap::ArcSwap;
use meshgate_agent::{
    admin::{self, AdminExtension, AdminState},
    bootstrap::{BootstrapError, Mesh, MeshSpec},
    drain::Drain,
    http::{
        front::{self, Front, FrontLimits, Security},
        pipeline::{Observe, Pipeline, PipelineHandler, RequestMetrics},
        upstream::{External, ExternalConfig, MeshClient, Upstream},
    },
    identity::{IdentityError, IdentityManager},
    telemetry::{
        Metrics,
        access::{AccessLog, Mode as AccessMode},
        otel::Tracing,
    },
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::{
    auth::RateStores,
    compile::Upstreams,
    config::{Compiled, GatewayConfig, GatewayConfigError},
    jwks::{FetchFailures, JwksCache},
    jwt::JwtProviderConfig,
    ratelimit_redis::RedisStore,
    routes::{RequestView, RouteTable},
    why::{WhyRequest, WhyState},
};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config is invalid.
    #[error("invalid config: {0}")]
    Config(#[from] GatewayConfigError),
    /// A listener could not bind.
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        /// Which.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Joining the mesh failed.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// Obtaining the gateway's workload certificate failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// TLS certificates or the rate-limit store are unusable.
    #[error("{0}")]
    Setup(String),
}

/// Gateway-specific metrics.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    reloads: Family<Vec<(&'static str, String)>, Counter>,
    tls_reloads: Family<Vec<(&'static str, &'static str)>, Counter>,
    requests: Arc<RequestMetrics>,
}

impl GatewayMetrics {
    /// Registers into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.requests.register(
            registry,
            "meshgate_gateway_requests",
            "requests by route and status code",
        );
        registry.register(
            "meshgate_gateway_config_reloads",
            "config reloads by result (ok, invalid)",
            self.reloads.clone(),
        );
        registry.register(
            "meshgate_gateway_tls_reloads",
            "loads of changed TLS certificate files by result (ok, error: the old certificates keep serving)",
            self.tls_reloads.clone(),
        );
    }

    /// Counts a load of changed TLS files.
    pub fn tls_reload(&self, ok: bool) {
        self.tls_reloads
            .get_or_create(&vec![("result", if ok { "ok" } else { "error" })])
            .inc();
    }

    /// Counts a reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&vec![(
                "result",
                if ok { "ok" } else { "invalid" }.to_owned(),
            )])
            .inc();
    }
}

/// `/routes` and `/routes/match` on the admin API.
#[derive(Debug)]
struct RoutesApi {
    /// The live config's routes and policies (`/routes` reads its table too).
    why: Arc<ArcSwap<WhyState>>,
}

fn query_params(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The route table as JSON, in precedence order.
pub fn routes_json(table: &RouteTable) -> serde_json::Value {
    serde_json::Value::Array(
        table
            .routes()
            .iter()
            .map(|r| serde_json::to_value(&r.config).unwrap_or_default())
            .collect(),
    )
}

/// Explains which route `method url` (plus `headers`) would take. The path is normalized as
/// the gateway normalizes it before routing.
pub fn explain(
    table: &RouteTable,
    method: &str,
    url: &str,
    headers: &[(String, String)],
) -> Result<serde_json::Value, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|e| format!("header {k:?}: {e}"))?;
        let value =
            http::HeaderValue::from_str(v.trim()).map_err(|e| format!("header {k:?}: {e}"))?;
        map.append(name, value);
    }
    let host = uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            map.get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let path = meshgate_agent::http::path::normalize(uri.path(), &Default::default())
        .map_err(|e| format!("the gateway would answer 400: {e}"))?;
    let view = RequestView {
        method: &method.to_ascii_uppercase(),
        host: &host,
        path: &path,
        query: uri.query().unwrap_or_default(),
        headers: &map,
    };
    serde_json::to_value(table.explain(&view)).map_err(|e| e.to_string())
}

impl AdminExtension for RoutesApi {
    fn get(&self, path: &str, query: &str) -> Option<Result<serde_json::Value, String>> {
        match path {
            "/routes" => Some(Ok(routes_json(&self.why.load().table))),
            "/routes/match" => {
                let params = query_params(query);
                let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let method = get("method").unwrap_or_else(|| "GET".into());
                let Some(url) = get("url") else {
                    return Some(Err("url is required: /routes/match?method=GET&url=https://host/path&header=Name:value".into()));
                };
                let headers: Vec<(String, String)> = params
                    .iter()
                    .filter(|(n, _)| n == "header")
                    .filter_map(|(_, v)| {
                        v.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned()))
                    })
                    .collect();
                Some(explain(&self.why.load().table, &method, &url, &headers))
            }
            _ => None,
        }
    }

    fn post<'a>(
        &'a self,
        path: &'a str,
        body: serde_json::Value,
    ) -> Option<meshgate_agent::admin::PostFuture<'a>> {
        if path != "/why" {
            return None;
        }
        Some(Box::pin(async move {
            let req: WhyRequest = serde_json::from_value(body)
                .map_err(|e| format!("/why takes {{\"method\", \"url\", \"headers\": [[name, value]], \"api_key\", \"client_ip\"}}: {e}"))?;
            let state = self.why.load_full();
            let answer = crate::why::why(&state, &req).await?;
            // one audit line per question, never its credentials or the URL's query
            let stopped = answer
                .layers
                .iter()
                .find(|l| l.result == crate::why::Verdict::Stop)
                .map_or("-", |l| l.layer);
            tracing::info!(
                method = %answer.method,
                path = %answer.path,
                route = answer.route.as_deref().unwrap_or("-"),
                stopped_at = stopped,
                "admin: POST /why answered"
            );
            serde_json::to_value(answer).map_err(|e| e.to_string())
        }))
    }
}

/// What `POST /why` evaluates with: one value per config, swapped whole on reload.
fn why_state(cfg: &GatewayConfig, compiled: &Compiled, caller: String) -> WhyState {
    WhyState {
        table: compiled.table.clone(),
        auth: compiled.auth.clone(),
        paths: cfg.paths,
        caller,
        max_head_bytes: cfg.limits.max_header_bytes,
        max_body: cfg.limits.max_body,
        redirect_https: cfg.redirect_https,
        cors: cfg.cors.is_some(),
    }
}

/// A provider's config, its cache and the cache's refresh task.
type CacheEntry = (JwtProviderConfig, Arc<JwksCache>, Arc<JoinHandle<()>>);

/// A cache that still has to be loaded.
type FreshCache = (JwtProviderConfig, Arc<JwksCache>);

/// The JWKS caches in use, by provider, each with its refresh task. A reload reuses the cache
/// of a provider whose config did not change, so its keys and schedule carry over.
#[derive(Debug, Default, Clone)]
struct Caches {
    by_name: std::collections::BTreeMap<String, CacheEntry>,
}

impl Caches {
    /// Compiles `cfg` with these caches; returns the caches that are new and must be loaded.
    fn compile(
        &mut self,
        cfg: &GatewayConfig,
        stores: &RateStores,
        failures: &FetchFailures,
        upstreams: &dyn Upstreams,
        https_port: Option<u16>,
    ) -> Result<(Compiled, Vec<FreshCache>), GatewayConfigError> {
        let mut fresh = Vec::new();
        let ca = cfg.auth.jwks_ca_file.clone();
        let existing = self.by_name.clone();
        let compiled = cfg.compile_with(
            &mut |p| {
                if let Some((old, cache, _)) = existing.get(&p.name)
                    && old == p
                {
                    return Ok(cache.clone());
                }
                let cache = Arc::new(JwksCache::new(p, ca.as_deref(), failures.clone())?);
                fresh.push((p.clone(), cache.clone()));
                Ok(cache)
            },
            stores.clone(),
            upstreams,
            https_port,
        )?;
        let names: std::collections::BTreeSet<String> =
            cfg.auth.jwt.iter().map(|p| p.name.clone()).collect();
        self.by_name.retain(|n, _| names.contains(n));
        Ok((compiled, fresh))
    }

    /// Loads new caches (a failed load keeps an empty set and is logged) and starts refreshing.
    async fn load(&mut self, fresh: Vec<FreshCache>) {
        for (p, cache) in fresh {
            cache.load().await;
            let task = Arc::new(cache.spawn_refresh());
            if let Some((_, _, old)) = self.by_name.insert(p.name.clone(), (p, cache, task)) {
                old.abort();
            }
        }
    }

    /// Stops the refresh of caches `next` no longer uses.
    fn retire(&self, next: &Caches) {
        for (name, (_, cache, task)) in &self.by_name {
            let kept = next
                .by_name
                .get(name)
                .is_some_and(|(_, c, _)| Arc::ptr_eq(c, cache));
            if !kept {
                task.abort();
            }
        }
    }
}

/// Upstreams of a running gateway: mesh services through its tunnels, external URLs directly.
#[derive(Debug)]
struct Connected {
    client: Arc<MeshClient>,
    connect_timeout: Duration,
}

impl Upstreams for Connected {
    fn mesh(&self, service: &str) -> Arc<dyn Upstream> {
        self.client.service(service)
    }
    fn external(&self, cfg: &ExternalConfig) -> Result<Arc<dyn Upstream>, String> {
        External::new(cfg, self.connect_timeout)
            .map(|e| e as Arc<dyn Upstream>)
            .map_err(|e| e.to_string())
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct GatewayApp {
    https_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    pipeline: Arc<Pipeline>,
    /// The routes and policies of the config in use, for the admin API; swapped on reload.
    why: Arc<ArcSwap<WhyState>>,
    metrics: Arc<GatewayMetrics>,
    config: tokio::sync::Mutex<(GatewayConfig, Caches)>,
    upstreams: Connected,
    stores: RateStores,
    failures: FetchFailures,
    state: Arc<AdminState>,
    drain: Drain,
    tasks: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    identity: IdentityManager,
    tracing: Option<Tracing>,
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), GatewayError> {
    let err = |source| GatewayError::Bind { what, addr, source };
    let l = meshgate_agent::transport::listen(addr).map_err(err)?;
    let a = l.local_addr().map_err(err)?;
    Ok((l, a))
}

fn front_limits(cfg: &GatewayConfig) -> FrontLimits {
    FrontLimits {
        // hyper's buffer: room above the configured limit so the pipeline answers 431 itself
        max_head_bytes: cfg.limits.max_header_bytes + 8 * 1024,
        header_read_timeout: cfg.limits.header_read_timeout,
        idle_timeout: cfg.limits.idle_timeout,
        max_connections: cfg.limits.max_connections,
        max_concurrent_streams: cfg.limits.max_concurrent_streams,
        ..FrontLimits::default()
    }
}

/// The fields a reload cannot change, by name.
fn fixed_fields(c: &GatewayConfig) -> Vec<(&'static str, serde_json::Value)> {
    let j = |v: &dyn erased::Ser| v.to_json();
    vec![
        ("node", j(&c.node)),
        ("trust_domain", j(&c.trust_domain)),
        ("namespace", j(&c.namespace)),
        ("identity", j(&c.identity)),
        ("data_dir", j(&c.data_dir)),
        ("ca", j(&c.ca)),
        ("listen", j(&c.listen)),
        ("tls", j(&c.tls)),
        ("tls_min_version", j(&c.tls_min_version)),
        ("tls_reload_interval", j(&c.tls_reload_interval.as_millis())),
        ("client_auth", j(&c.client_auth)),
        ("discovery", j(&c.discovery)),
        ("tunnel", j(&c.tunnel)),
        ("telemetry", j(&c.telemetry)),
        ("auth.jwks_ca_file", j(&c.auth.jwks_ca_file)),
        ("auth.rate_limit_store", j(&c.auth.rate_limit_store)),
        (
            "limits.header_read_timeout",
            j(&c.limits.header_read_timeout.as_millis()),
        ),
        ("limits.idle_timeout", j(&c.limits.idle_timeout.as_millis())),
        ("limits.max_connections", j(&c.limits.max_connections)),
        (
            "limits.max_concurrent_streams",
            j(&c.limits.max_concurrent_streams),
        ),
    ]
}

mod erased {
    /// Anything serializable, as JSON (for comparing config fields).
    pub(super) trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

impl GatewayApp {
    /// Starts the gateway; returns once it is ready. The config, the TLS files and every
    /// listener are checked before the join token is spent.
    pub async fn start(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        cfg.compile()?;
        let https_tls = match cfg.listen.https {
            Some(_) => Some(
                front::tls_acceptor(&cfg.tls, cfg.client_auth.as_ref(), cfg.tls_min_version)
                    .map_err(|e| GatewayError::Setup(format!("tls: {e}")))?,
            ),
            None => None,
        };
        let mut tasks = Vec::new();
        let gw_metrics = Arc::new(GatewayMetrics::default());
        // renewed certificate files (certbot, cert-manager) are served without a restart
        let https_tls = https_tls.map(|(acceptor, certs)| {
            let m = gw_metrics.clone();
            tasks.push(certs.spawn_watch(cfg.tls_reload_interval, move |ok| m.tls_reload(ok)));
            acceptor
        });
        let failures = FetchFailures::default();
        let mut stores = RateStores::memory();
        let metrics = Arc::new(Metrics::with_extra(|r| {
            gw_metrics.register(r);
            r.register(
                "meshgate_gateway_jwks_fetch_failures",
                "JWKS fetches that failed, by provider and reason (dns, tcp, tls, http_status, bad_json, io)",
                failures.clone(),
            );
            r.register(
                "meshgate_gateway_jwt_checks",
                "JWT checks by provider and result (verified: signature checked; cache_hit: a token verified before, its exp/nbf checked again)",
                stores.jwt_checks.clone(),
            );
            r.register(
                "meshgate_gateway_auth_failures",
                "refused authentications by route and reason (missing, expired, invalid, forbidden)",
                stores.auth_failures.clone(),
            );
            r.register(
                "meshgate_gateway_rate_limit_decisions",
                "rate-limit decisions by route, policy and decision (allowed, limited; limited also covers a store error when the policy fails closed)",
                stores.rate_decisions.clone(),
            );
        }));
        if let Some(r) = &cfg.auth.rate_limit_store {
            stores.redis = Some(
                RedisStore::connect(r)
                    .await
                    .map_err(|e| GatewayError::Setup(format!("auth.rate_limit_store: {e}")))?,
            );
        }
        let drain = Drain::new();
        let (admin_listener, admin_addr) = bind("admin", cfg.listen.admin).await?;
        let https = match cfg.listen.https {
            Some(addr) => Some(bind("https", addr).await?),
            None => None,
        };
        let http = match cfg.listen.http {
            Some(addr) => Some(bind("http", addr).await?),
            None => None,
        };
        let state = Arc::new(AdminState::new(
            metrics.clone(),
            serde_json::to_value(&cfg).unwrap_or_default(),
            drain.clone(),
        ));
        let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));
        state.reloadable();
        state.listener("admin", admin_addr);
        if let Some((_, a)) = &https {
            state.listener("https", *a);
        }
        if let Some((_, a)) = &http {
            state.listener("http", *a);
        }

        let mesh = Mesh::start(
            MeshSpec {
                trust_domain: &cfg.trust_domain,
                node: &cfg.node,
                data_dir: &cfg.data_dir,
                ca: &cfg.ca,
                discovery: &cfg.discovery,
                tunnel: &cfg.tunnel,
                mesh_port: 15008,
            },
            cfg.backend_services(),
            &metrics,
            &state,
        )
        .await?;
        let me = mesh
            .identity
            .workload(&cfg.namespace, &cfg.identity)
            .await?;
        let caller = me.id.to_string();
        let upstreams = Connected {
            client: MeshClient::new(me, mesh.endpoints, mesh.pool, metrics.clone()),
            connect_timeout: cfg.tunnel.connect_timeout,
        };
        tasks.extend(mesh.tasks);
        let https_port = https.as_ref().map(|(_, a)| a.port());
        let mut caches = Caches::default();
        let (compiled, fresh) = caches.compile(&cfg, &stores, &failures, &upstreams, https_port)?;
        caches.load(fresh).await;
        let access = AccessLog::start(
            &cfg.telemetry.access_log,
            AccessMode::Gateway,
            metrics.access_log_dropped(),
        )
        .map_err(|e| GatewayError::Setup(e.to_string()))?;
        let tracing = Tracing::start(
            &cfg.telemetry.tracing,
            "meshgate-gateway",
            &cfg.node,
            metrics.tracing_export(),
        )
        .map_err(|e| GatewayError::Setup(e.to_string()))?;
        let why = Arc::new(ArcSwap::from_pointee(why_state(&cfg, &compiled, caller)));
        let pipeline = Pipeline::new(
            compiled.pipeline,
            gw_metrics.requests.clone(),
            Observe {
                access,
                tracing: tracing.clone(),
            },
        );
        let _ = state
            .extension
            .set(Arc::new(RoutesApi { why: why.clone() }));

        let front = Front {
            handler: Arc::new(PipelineHandler(pipeline.clone())),
            limits: front_limits(&cfg),
            drain: drain.clone(),
            metrics: metrics.clone(),
            name: "https",
        };
        let mut https_addr = None;
        if let (Some((l, a)), Some(acceptor)) = (https, https_tls) {
            https_addr = Some(a);
            tasks.push(tokio::spawn(front::serve(
                l,
                Security::Tls(acceptor),
                front.clone(),
            )));
        }
        let mut http_addr = None;
        if let Some((l, a)) = http {
            http_addr = Some(a);
            tasks.push(tokio::spawn(front::serve(
                l,
                Security::Plain,
                Front {
                    name: "http",
                    ..front.clone()
                },
            )));
        }
        state.ready.store(true, Ordering::SeqCst);
        metrics.set_ready(true);
        info!(node = %cfg.node, https = ?https_addr, http = ?http_addr, admin = %admin_addr, routes = cfg.routes.len(), "gateway ready");
        Ok(Self {
            https_addr,
            http_addr,
            admin_addr,
            pipeline,
            why,
            metrics: gw_metrics,
            config: tokio::sync::Mutex::new((cfg, caches)),
            upstreams,
            stores,
            failures,
            state,
            drain,
            tasks,
            admin_task,
            identity: mesh.identity,
            tracing,
        })
    }

    /// The bound HTTPS address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The bound plain-HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The identity manager (its SVIDs, the tunnel client certificates).
    pub fn identity(&self) -> &IdentityManager {
        &self.identity
    }

    /// Validates `next` and swaps it in atomically; requests in flight finish on the old
    /// config. Fields that need a restart are refused by name (see [`fixed_fields`]), and every
    /// route's backend must be known to discovery. On error the old config keeps serving.
    pub async fn reload(&self, next: GatewayConfig) -> Result<(), GatewayConfigError> {
        let mut guard = self.config.lock().await;
        let result = self.try_reload(&mut guard, next).await;
        self.metrics.reload(result.is_ok());
        self.state
            .reloaded(result.as_ref().map(|_| ()).map_err(ToString::to_string));
        result
    }

    /// Counts a reload refused before it reached [`GatewayApp::reload`] (the file could not
    /// be read or parsed), with the reason `/status` shows.
    pub fn reload_refused(&self, reason: String) {
        self.metrics.reload(false);
        self.state.reloaded(Err(reason));
    }

    async fn try_reload(
        &self,
        guard: &mut (GatewayConfig, Caches),
        next: GatewayConfig,
    ) -> Result<(), GatewayConfigError> {
        let changed: Vec<&str> = fixed_fields(&guard.0)
            .into_iter()
            .zip(fixed_fields(&next))
            .filter(|((_, a), (_, b))| a != b)
            .map(|((n, _), _)| n)
            .collect();
        if !changed.is_empty() {
            return Err(GatewayConfigError(format!(
                "{} change only with a restart (routes, headers, cors, paths, auth, request limits and transforms reload)",
                changed.join(", ")
            )));
        }
        let known = self.state.endpoints.get().cloned();
        for svc in next.backend_services() {
            if known.as_ref().is_some_and(|e| e.entry(&svc).is_none()) {
                return Err(GatewayConfigError(format!(
                    "route backend {svc} is not a service this gateway discovers; discovery is fixed at start, so a new backend service needs a restart"
                )));
            }
        }
        let mut caches = guard.1.clone();
        let (compiled, fresh) = caches.compile(
            &next,
            &self.stores,
            &self.failures,
            &self.upstreams,
            self.https_addr.map(|a| a.port()),
        )?;
        caches.load(fresh).await;
        let caller = self.why.load().caller.clone();
        self.why
            .store(Arc::new(why_state(&next, &compiled, caller)));
        self.pipeline.swap(compiled.pipeline);
        self.state
            .set_config(serde_json::to_value(&next).unwrap_or_default());
        guard.1.retire(&caches);
        *guard = (next, caches);
        Ok(())
    }

    /// Graceful drain: not ready, listeners closed, open requests finish within the drain
    /// timeout. Returns true if everything finished in time.
    pub async fn shutdown(self) -> bool {
        let timeout = self.config.lock().await.0.drain_timeout;
        self.state.ready.store(false, Ordering::SeqCst);
        self.drain.start();
        let clean = self.drain.wait_idle(timeout).await;
        for t in &self.tasks {
            t.abort();
        }
        self.admin_task.abort();
        if let Some(t) = self.tracing.clone() {
            // the batch exporter blocks while it sends what is left
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        clean
    }
}
