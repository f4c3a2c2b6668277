//! Builds a running gateway: its own SVID (joined like an agent), discovery for every backend
//! service, the pooled mesh HTTP client, the public listeners and the admin API with `/routes`.
//! Hot reload swaps the compiled policy set; listeners, identity and discovery stay.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use meshgate_agent::{
    admin::{self, AdminExtension, AdminState},
    balance::BalanceConfig,
    discovery,
    drain::Drain,
    http::{
        front::{self, FrontLimits},
        upstream::MeshHttpClient,
    },
    identity::{IdentityError, IdentityManager},
    telemetry::Metrics,
    transport::hbone::Pool,
};
use meshgate_ca::consul::ConsulClient;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::{
    auth::RateStores,
    config::{Compiled, GatewayConfig, GatewayConfigError},
    jwks::{FetchFailures, JwksCache},
    jwt::JwtProviderConfig,
    ratelimit_redis::RedisStore,
    routes::RequestView,
    server::{Gateway, GatewayHandler, GatewayMetrics},
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
    /// Joining or certificates failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// TLS certificates, Consul or DNS settings are unusable.
    #[error("{0}")]
    Setup(String),
}

/// `/routes` and `/routes/match` on the admin API.
#[derive(Debug)]
struct RoutesApi {
    gateway: Arc<Gateway>,
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
pub fn routes_json(compiled: &Compiled) -> serde_json::Value {
    serde_json::Value::Array(
        compiled
            .table
            .routes()
            .iter()
            .map(|r| serde_json::to_value(&r.config).unwrap_or_default())
            .collect(),
    )
}

/// Explains which route `method url` (plus `headers`) would take.
pub fn explain(
    compiled: &Compiled,
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
    let view = RequestView {
        method: &method.to_ascii_uppercase(),
        host: &host,
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers: &map,
    };
    serde_json::to_value(compiled.table.explain(&view)).map_err(|e| e.to_string())
}

impl AdminExtension for RoutesApi {
    fn get(&self, path: &str, query: &str) -> Option<Result<serde_json::Value, String>> {
        match path {
            "/routes" => Some(Ok(routes_json(&self.gateway.current()))),
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
                Some(explain(&self.gateway.current(), &method, &url, &headers))
            }
            _ => None,
        }
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

/// A running gateway.
#[derive(Debug)]
pub struct GatewayApp {
    https_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    gateway: Arc<Gateway>,
    metrics: Arc<GatewayMetrics>,
    config: tokio::sync::Mutex<(GatewayConfig, Caches)>,
    stores: RateStores,
    failures: FetchFailures,
    state: Arc<AdminState>,
    drain: Drain,
    drain_timeout: std::time::Duration,
    tasks: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    _identity: IdentityManager,
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

impl GatewayApp {
    /// Starts the gateway; returns once it is ready.
    pub async fn start(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        let gw_metrics = Arc::new(GatewayMetrics::default());
        let failures = FetchFailures::default();
        let metrics = Arc::new(Metrics::with_extra(|r| {
            gw_metrics.register(r);
            r.register(
                "meshgate_gateway_jwks_fetch_failures",
                "JWKS fetches that failed, by provider and reason (dns, tcp, tls, http_status, bad_json, io)",
                failures.clone(),
            );
        }));
        let mut stores = RateStores::memory();
        if let Some(r) = &cfg.auth.rate_limit_store {
            stores.redis = Some(
                RedisStore::connect(r)
                    .await
                    .map_err(|e| GatewayError::Setup(format!("auth.rate_limit_store: {e}")))?,
            );
        }
        let mut caches = Caches::default();
        let (compiled, fresh) = caches.compile(&cfg, &stores, &failures)?;
        caches.load(fresh).await;
        let drain = Drain::new();
        let (admin_listener, admin_addr) = bind("admin", cfg.listen.admin).await?;
        let state = Arc::new(AdminState::new(
            metrics.clone(),
            serde_json::to_value(&cfg).unwrap_or_default(),
            drain.clone(),
        ));
        let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));

        let identity_cfg = cfg
            .ca
            .identity_config(&cfg.trust_domain, &cfg.node, &cfg.data_dir)
            .map_err(|(path, e)| {
                GatewayError::Setup(format!("join token file {}: {e}", path.display()))
            })?;
        let identity = IdentityManager::start(identity_cfg).await?;
        let _ = state.identity.set(identity.clone());
        let me = identity.workload(&cfg.namespace, &cfg.identity).await?;

        let consul = match &cfg.discovery.consul {
            Some(c) => Some(ConsulClient::new(c).map_err(|e| GatewayError::Setup(e.to_string()))?),
            None => None,
        };
        let balance = BalanceConfig {
            failures_to_eject: cfg.tunnel.failures_to_eject,
            ..BalanceConfig::default()
        };
        let running = discovery::spawn(
            &cfg.discovery,
            consul.as_ref(),
            cfg.backend_services(),
            15008,
            balance,
            &metrics,
        )
        .map_err(GatewayError::Setup)?;
        let _ = state.endpoints.set(running.endpoints.clone());
        let mut tasks = running.tasks;
        let pool = Arc::new(Pool::new(
            identity.clone(),
            cfg.tunnel.clone(),
            metrics.clone(),
        ));
        let client = MeshHttpClient::new(me, running.endpoints, pool, metrics.clone());
        // bind first: redirects need the real HTTPS port (port 0 works)
        let https = match cfg.listen.https {
            Some(addr) => {
                let acceptor = front::tls_acceptor(&cfg.tls, cfg.client_auth.as_ref())
                    .map_err(|e| GatewayError::Setup(e.to_string()))?;
                Some((bind("https", addr).await?, acceptor))
            }
            None => None,
        };
        let http = match cfg.listen.http {
            Some(addr) => Some(bind("http", addr).await?),
            None => None,
        };
        let mut compiled = compiled;
        compiled.https_port = https.as_ref().map(|((_, a), _)| a.port());
        let gateway = Arc::new(Gateway::new(compiled, client, gw_metrics.clone()));
        let _ = state.extension.set(Arc::new(RoutesApi {
            gateway: gateway.clone(),
        }));

        let limits = FrontLimits {
            max_head_bytes: cfg.limits.max_header_bytes + 8 * 1024,
            header_read_timeout: cfg.limits.header_read_timeout,
        };
        let handler: Arc<dyn front::Handler> = Arc::new(GatewayHandler(gateway.clone()));
        let mut https_addr = None;
        if let Some(((l, a), acceptor)) = https {
            https_addr = Some(a);
            tasks.push(tokio::spawn(front::serve(
                l,
                Some(acceptor),
                handler.clone(),
                limits,
                drain.clone(),
            )));
        }
        let mut http_addr = None;
        if let Some((l, a)) = http {
            http_addr = Some(a);
            tasks.push(tokio::spawn(front::serve(
                l,
                None,
                handler.clone(),
                limits,
                drain.clone(),
            )));
        }
        state.ready.store(true, Ordering::SeqCst);
        metrics.set_ready(true);
        info!(node = %cfg.node, https = ?https_addr, http = ?http_addr, admin = %admin_addr, routes = cfg.routes.len(), "gateway ready");
        Ok(Self {
            https_addr,
            http_addr,
            admin_addr,
            gateway,
            metrics: gw_metrics,
            drain_timeout: cfg.drain_timeout,
            config: tokio::sync::Mutex::new((cfg, caches)),
            stores,
            failures,
            state,
            drain,
            tasks,
            admin_task,
            _identity: identity,
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

    /// Validates `next` and swaps it in atomically. Listeners, identity, discovery and tunnel
    /// settings are fixed at start: a change to them is refused with a message saying so, and
    /// every route's backend must be known to discovery. On error the old config keeps serving.
    pub async fn reload(&self, next: GatewayConfig) -> Result<(), GatewayConfigError> {
        let mut guard = self.config.lock().await;
        let result = self.try_reload(&mut guard, next).await;
        self.metrics.reload(result.is_ok());
        result
    }

    async fn try_reload(
        &self,
        guard: &mut (GatewayConfig, Caches),
        next: GatewayConfig,
    ) -> Result<(), GatewayConfigError> {
        let fixed = |c: &GatewayConfig| {
            serde_json::json!([
                c.node,
                c.trust_domain,
                c.namespace,
                c.identity,
                c.data_dir,
                c.listen.https,
                c.listen.http,
                c.listen.admin,
                serde_json::to_value(&c.tls).unwrap_or_default(),
                serde_json::to_value(&c.client_auth).unwrap_or_default(),
                serde_json::to_value(&c.discovery).unwrap_or_default(),
                c.auth.jwks_ca_file,
                serde_json::to_value(&c.auth.rate_limit_store).unwrap_or_default(),
            ])
        };
        if fixed(&guard.0) != fixed(&next) {
            return Err(GatewayConfigError(
                "node, identity, data_dir, listen, tls, discovery and auth.jwks_ca_file change only with a restart; routes, headers, cors, limits, transforms and auth reload".into(),
            ));
        }
        let known = self.state.endpoints.get().cloned();
        for svc in next.backend_services() {
            if known.as_ref().is_some_and(|e| e.entry(&svc).is_none()) {
                return Err(GatewayConfigError(format!(
                    "service {svc} has no discovery entry; new services need a restart (or an entry in discovery.static)"
                )));
            }
        }
        let mut caches = guard.1.clone();
        let (mut compiled, fresh) = caches.compile(&next, &self.stores, &self.failures)?;
        compiled.https_port = self.https_addr.map(|a| a.port());
        caches.load(fresh).await;
        self.gateway.swap(compiled);
        guard.1.retire(&caches);
        *guard = (next, caches);
        Ok(())
    }

    /// Graceful drain: not ready, listeners closed, open requests finish within the drain
    /// timeout. Returns true if everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.state.ready.store(false, Ordering::SeqCst);
        self.drain.start();
        let clean = self.drain.wait_idle(self.drain_timeout).await;
        for t in &self.tasks {
            t.abort();
        }
        self.admin_task.abort();
        clean
    }
}
