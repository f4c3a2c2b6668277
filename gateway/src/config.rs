//! `gateway.yaml`: the gateway's configuration and its validation into a [`Compiled`] policy
//! set that requests read through an `ArcSwap` (hot reload swaps it whole).
//!
//! Parsing (YAML, file:line:column) is the CLI's job; this module owns the shape, defaults and
//! checks. Listeners, identity and discovery are fixed at start; routes, header policy, CORS,
//! request limits, path options and transforms reload (see `GatewayApp::reload`).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use meshgate_agent::{
    config::{CaRef, DiscoveryConfig, TunnelConfig},
    http::{
        front::{CertFiles, MinTls},
        path::PathOptions,
        pipeline::PipelineConfig,
    },
};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::{
    auth::{Auth, AuthConfig, RateStores},
    cors::CorsConfig,
    hygiene::{Hygiene, HygieneConfig},
    jwks::{FetchFailures, JwksCache},
    jwt::JwtProviderConfig,
    routes::{RouteConfig, RouteTable},
};

fn default_namespace() -> String {
    "default".into()
}
fn default_identity() -> String {
    "gateway".into()
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_tls_reload() -> Duration {
    Duration::from_secs(10)
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's node name (`spiffe://TD/node/NAME`).
    pub node: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Namespace of the gateway's own workload identity. Default `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service name the gateway's SVID carries (`spiffe://TD/ns/NS/svc/NAME`): what
    /// intentions on the services see as the source. Default `gateway`.
    #[serde(default = "default_identity")]
    pub identity: String,
    /// Keys and certificates (0700, keys 0600).
    pub data_dir: PathBuf,
    /// The CA to join.
    pub ca: CaRef,
    /// Listeners.
    pub listen: GatewayListen,
    /// Certificates for the HTTPS listener, chosen by SNI; the first is the default.
    #[serde(default)]
    pub tls: Vec<CertFiles>,
    /// Verify client certificates on the HTTPS listener (edge mTLS); routes opt in with
    /// `auth: {mtls: true}`.
    #[serde(default)]
    pub client_auth: Option<meshgate_agent::http::front::ClientAuth>,
    /// Answer plain-HTTP requests with a redirect to HTTPS (308). Default false.
    #[serde(default)]
    pub redirect_https: bool,
    /// Request and connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// How request paths are normalized before routing (the normalized path is forwarded).
    #[serde(default)]
    pub paths: PathOptions,
    /// Lowest TLS version on the HTTPS listener: `"1.2"` (default, Mozilla's intermediate
    /// profile: ECDHE + AEAD only) or `"1.3"`.
    #[serde(default)]
    pub tls_min_version: MinTls,
    /// How often the `tls` certificate, key and OCSP files are checked for changes (renewed
    /// files are served without a restart). Default 10s.
    #[serde(default = "default_tls_reload", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub tls_reload_interval: Duration,
    /// `Strict-Transport-Security` on every HTTPS answer. Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<crate::filters::hsts::HstsConfig>,
    /// Header hygiene: spoofable headers stripped, request id, traceparent, X-Forwarded-*.
    #[serde(default)]
    pub headers: HygieneConfig,
    /// CORS for every route without its own.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Credentials routes can require (JWT providers, API keys), identity header names, and
    /// rate-limit policies.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Routes; see docs/gateway.md for the matching order.
    #[serde(default)]
    pub routes: Vec<GatewayRoute>,
    /// Where services' endpoints come from (as for the agent).
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// Tunnel tuning (as for the agent).
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Access log (on by default on the gateway) and traces; see docs/observability.md.
    #[serde(default)]
    pub telemetry: meshgate_agent::telemetry::TelemetryConfig,
    /// How long open requests may finish after SIGTERM. Default 30s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
}

/// A route with its edge policies (CORS, transforms) as written in `gateway.yaml`.
pub type GatewayRoute = RouteConfig;

/// Listen addresses.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayListen {
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN). Needs `tls`.
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// Plain HTTP.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// Admin API; loopback only. Default 127.0.0.1:15000.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

fn default_max_body() -> u64 {
    1 << 20
}
fn default_max_headers() -> usize {
    16 * 1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_body_idle() -> Duration {
    Duration::from_secs(10)
}
fn default_response_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_streams() -> u32 {
    128
}

/// Request and connection limits; routes may lower or raise `max_body`, `timeout` and
/// `response_idle_timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body (413 as soon as it is crossed, while streaming). Default 1 MiB.
    #[serde(default = "default_max_body")]
    pub max_body: u64,
    /// Largest request head, all header names and values (431 beyond). Default 16 KiB.
    #[serde(default = "default_max_headers")]
    pub max_header_bytes: usize,
    /// Time for a request head to arrive once it started (408 after). Default 10s. Needs a
    /// restart to change.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub header_read_timeout: Duration,
    /// Default route timeout for the upstream's response head (504 after). Default 15s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// A connection with no request in progress (including one that never sent a byte) is
    /// closed after this. Default 60s. Needs a restart to change.
    #[serde(default = "default_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// A request body that sends nothing for this long gets 408. Default 10s.
    #[serde(default = "default_body_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_idle_timeout: Duration,
    /// A response body that sends nothing for this long is cut off (`0s`: no limit).
    /// Default 5m.
    #[serde(default = "default_response_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub response_idle_timeout: Duration,
    /// Open client connections at most, per listener; more are closed at once and counted in
    /// `meshgate_http_connections_refused_total`. Default 10000. Needs a restart to change.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams one client connection may have open. Default 128. Needs a restart to
    /// change.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: default_max_body(),
            max_header_bytes: default_max_headers(),
            header_read_timeout: default_header_timeout(),
            timeout: default_timeout(),
            idle_timeout: default_idle(),
            body_idle_timeout: default_body_idle(),
            response_idle_timeout: default_response_idle(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_streams(),
        }
    }
}

/// A config that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GatewayConfigError(pub String);

/// Everything a request needs, compiled once per config load.
#[derive(Debug)]
pub struct Compiled {
    /// The route table (also for `meshgate routes` and `/routes`).
    pub table: Arc<RouteTable>,
    /// Header hygiene.
    pub hygiene: Hygiene,
    /// Limits.
    pub limits: Limits,
    /// Authentication, authorization, identity injection and rate limits.
    pub auth: Arc<Auth>,
    /// The pipeline configuration the front runs.
    pub pipeline: PipelineConfig,
}

impl GatewayConfig {
    /// Every service a route may send to.
    pub fn backend_services(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .routes
            .iter()
            .flat_map(|r| r.backend.services())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks everything that needs no I/O and compiles the reloadable part, with fresh JWKS
    /// caches (not loaded), a fresh rate-limit store and unconnected mesh upstreams: what
    /// `meshgate config validate` runs.
    pub fn compile(&self) -> Result<Compiled, GatewayConfigError> {
        let failures = FetchFailures::default();
        let ca = self.auth.jwks_ca_file.clone();
        self.compile_with(
            &mut |p| JwksCache::new(p, ca.as_deref(), failures.clone()).map(Arc::new),
            RateStores::memory(),
            &crate::compile::Offline,
            self.listen.https.map(|a| a.port()),
        )
    }

    /// Like [`GatewayConfig::compile`], with JWKS caches from `cache_for` (so a reload keeps the
    /// keys of unchanged providers), the rate-limit `stores` (so counts survive reloads), the
    /// upstreams routes send to, and the bound HTTPS port (for redirects).
    pub fn compile_with(
        &self,
        cache_for: &mut dyn FnMut(&JwtProviderConfig) -> Result<Arc<JwksCache>, String>,
        stores: RateStores,
        upstreams: &dyn crate::compile::Upstreams,
        https_port: Option<u16>,
    ) -> Result<Compiled, GatewayConfigError> {
        let e = |m: String| GatewayConfigError(m);
        meshgate_ca::spiffe::validate_trust_domain(&self.trust_domain)
            .map_err(|x| e(format!("trust_domain: {x}")))?;
        meshgate_ca::spiffe::validate_segment(&self.node).map_err(|x| e(format!("node: {x}")))?;
        meshgate_ca::spiffe::validate_segment(&self.identity)
            .map_err(|x| e(format!("identity: {x}")))?;
        if !self.listen.admin.ip().is_loopback() {
            return Err(e(format!(
                "listen.admin: {} is not a loopback address",
                self.listen.admin
            )));
        }
        if self.listen.https.is_none() && self.listen.http.is_none() {
            return Err(e("listen: set https, http or both".into()));
        }
        if self.listen.https.is_some() && self.tls.is_empty() {
            return Err(e("tls: listen.https needs at least one certificate".into()));
        }
        if self.redirect_https && (self.listen.https.is_none() || self.listen.http.is_none()) {
            return Err(e(
                "redirect_https needs both listen.http and listen.https".into()
            ));
        }
        let l = &self.limits;
        for (name, d) in [
            ("header_read_timeout", l.header_read_timeout),
            ("timeout", l.timeout),
            ("idle_timeout", l.idle_timeout),
            ("body_idle_timeout", l.body_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(e(format!("limits.{name}: must be more than zero")));
            }
        }
        if l.max_connections == 0 || l.max_concurrent_streams == 0 {
            return Err(e(
                "limits: max_connections and max_concurrent_streams must be at least 1".into(),
            ));
        }
        if l.max_header_bytes > 256 * 1024 {
            return Err(e(
                "limits.max_header_bytes: at most 262144 (the mesh carries heads up to 256 KiB)"
                    .into(),
            ));
        }
        self.tunnel
            .validate("tunnel")
            .map_err(|x| e(x.to_string()))?;
        if self.tls_reload_interval.is_zero() {
            return Err(e("tls_reload_interval: must be more than zero".into()));
        }
        if let Some(h) = &self.hsts {
            h.validate().map_err(|x| e(format!("hsts: {x}")))?;
        }
        let table = Arc::new(RouteTable::compile(&self.routes).map_err(|x| e(x.to_string()))?);
        let hygiene = Hygiene::new(&self.headers).map_err(|x| e(format!("headers: {x}")))?;
        let mut caches = BTreeMap::new();
        for p in &self.auth.jwt {
            p.validate()
                .map_err(|x| e(format!("auth.jwt ({}): {x}", p.name)))?;
            caches.insert(
                p.name.clone(),
                cache_for(p).map_err(|x| e(format!("auth.jwt ({}): {x}", p.name)))?,
            );
        }
        let auth = Auth::new(&self.auth, &caches, stores).map_err(e)?;
        for r in &self.routes {
            auth.check_route(&r.name, r.auth.as_ref(), r.rate_limit.as_deref())
                .map_err(e)?;
        }
        let auth = Arc::new(auth);
        let pipeline =
            crate::compile::pipeline(self, &table, &hygiene, &auth, https_port, upstreams)?;
        Ok(Compiled {
            table,
            hygiene,
            limits: self.limits.clone(),
            auth,
            pipeline,
        })
    }
}
