//! `agent.yaml`: the node agent's configuration, and its validation into typed values.
//!
//! Parsing (YAML, file:line:column errors) happens in the CLI; this module owns the shape,
//! the defaults and the checks that need no I/O. Secrets (the join token) live in files the
//! config points at, never in the config itself.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use meshgate_ca::spiffe::{validate_segment, validate_trust_domain};
use serde::{Deserialize, Serialize};

use crate::discovery::consul::ConsulConfig;

use crate::{
    discovery::dns::DnsConfig,
    policy::authz::{AuthzConfig, Policy},
};

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name (`spiffe://TD/node/NAME`).
    pub node: String,
    /// Trust domain, e.g. `mesh.example`.
    pub trust_domain: String,
    /// Namespace of this node's services. Default `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Keys and certificates (directory 0700, keys 0600).
    pub data_dir: PathBuf,
    /// How to reach the CA.
    pub ca: CaRef,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Services that run on this node.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Intentions, evaluated on the inbound side.
    #[serde(default)]
    pub authz: AuthzConfig,
    /// Where other services' endpoints come from.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// Consul registration of the local services (when `discovery.consul` is set).
    #[serde(default)]
    pub registration: RegistrationConfig,
    /// Tunnel tuning.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Access log (off by default on agents) and traces; see docs/observability.md.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// How long in-flight connections may finish after SIGTERM. Default 30s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}

/// The CA this node joins.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaRef {
    /// `https://HOST:PORT` of `meshgate ca serve`.
    pub address: String,
    /// Root fingerprint printed by `meshgate ca token create` (`sha256:…`).
    pub fingerprint: String,
    /// File holding the join token; needed only until the node holds a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
}

impl CaRef {
    /// The identity manager's settings for `node` of `trust_domain`, keeping keys in
    /// `data_dir`; reads the join token file when it exists (a missing file means "no token":
    /// the node already holds a certificate).
    pub fn identity_config(
        &self,
        trust_domain: &str,
        node: &str,
        data_dir: &std::path::Path,
    ) -> Result<crate::identity::IdentityConfig, (PathBuf, std::io::Error)> {
        let join_token = match &self.join_token_file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(t) => Some(t.trim().to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err((path.clone(), e)),
            },
        };
        Ok(crate::identity::IdentityConfig {
            trust_domain: trust_domain.to_owned(),
            node: node.to_owned(),
            data_dir: data_dir.to_owned(),
            ca_address: self.address.clone(),
            ca_fingerprint: self.fingerprint.clone(),
            join_token,
        })
    }
}

/// Listen addresses.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Mesh inbound (mTLS tunnels). Default `0.0.0.0:15008`.
    #[serde(default = "default_inbound")]
    pub inbound: SocketAddr,
    /// Admin API; must be loopback. Default `127.0.0.1:15000`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15008))
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            inbound: default_inbound(),
            admin: default_admin(),
        }
    }
}

/// How the inbound side treats a service's traffic.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes: L4 intentions only.
    #[default]
    Tcp,
    /// HTTP/1.1 to the service: every request is checked against the intentions (methods,
    /// paths) and forwarded over pooled keep-alive connections; upgrades (WebSocket) work.
    Http,
    /// HTTP/2 with prior knowledge to the service (gRPC, h2c): every request (stream) is
    /// checked against the intentions; trailers are kept.
    Grpc,
}

/// A service that runs on this node.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// The local service's port on 127.0.0.1.
    pub port: u16,
    /// `tcp` (default), `http` or `grpc`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Services this one calls, each through a local listener.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Tags for its Consul registration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Path of an HTTP health endpoint on the local service: Consul gets an HTTP check
    /// `http://127.0.0.1:PORT/PATH`. Without it, a TCP check on the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
}

/// A local listener that carries connections to another service through the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The destination service.
    pub service: String,
    /// Where the local listener binds, e.g. `127.0.0.1:9191`.
    pub listen: SocketAddr,
}

/// Discovery sources. A service listed under `static` uses those addresses; one listed under
/// `dns.services` is looked up in DNS; every other upstream is watched in Consul when
/// `consul` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Service name -> the inbound addresses of the nodes that run it: `IP:PORT`, or
    /// `NODE@IP:PORT` (also `{address: IP:PORT, node: NODE}`) to accept only that node's
    /// certificate there. A plain address accepts any node the CA's hosting map allows for
    /// the service (the nodes whose scope lists it), never any node of the mesh.
    #[serde(default, rename = "static")]
    pub static_endpoints: BTreeMap<String, Vec<crate::discovery::StaticEndpoint>>,
    /// Consul: blocking health queries per upstream, and registration of local services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulConfig>,
    /// DNS: A or SRV lookups per service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
}

fn default_true() -> bool {
    true
}
fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_deregister_after() -> Duration {
    Duration::from_secs(3600)
}

/// How local services are registered in Consul.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Register local services when `discovery.consul` is set. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The address other nodes reach this node's inbound port at. Default: the IP of
    /// `listen.inbound` (required when that is 0.0.0.0 or ::).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<std::net::IpAddr>,
    /// Tags added to every registration.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Health check interval. Default 10s.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub check_interval: Duration,
    /// Health check timeout. Default 2s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub check_timeout: Duration,
    /// Consul removes an instance critical for this long (minimum 1m). Default 1h.
    #[serde(default = "default_deregister_after", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub deregister_critical_after: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            advertise: None,
            tags: Vec::new(),
            check_interval: default_check_interval(),
            check_timeout: default_check_timeout(),
            deregister_critical_after: default_deregister_after(),
        }
    }
}

/// Tunnel tuning; the defaults suit most meshes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// TCP + TLS connect timeout to another agent. Default 5s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval on idle tunnels. Default 10s.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub keepalive_interval: Duration,
    /// Close a tunnel whose ping is not answered within this. Default 20s.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub keepalive_timeout: Duration,
    /// HTTP/2 stream window (bytes): how much one stream may have in flight unread. Default
    /// 256 KiB.
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    /// HTTP/2 connection window (bytes). Default 32 MiB: larger than `stream_window` times
    /// `max_streams_per_connection`, so streams nobody reads never stall the others.
    #[serde(default = "default_connection_window")]
    pub connection_window: u32,
    /// Streams one inbound tunnel connection may carry at once. Default 4096.
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
    /// Streams the caller puts on one tunnel connection before it opens another to the same
    /// agent. Default 100.
    #[serde(default = "default_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Consecutive connect failures that eject an endpoint. Default 3.
    #[serde(default = "default_failures_to_eject")]
    pub failures_to_eject: u32,
    /// An inbound tunnel connection with no stream open is closed after this. Default 10m.
    #[serde(default = "default_tunnel_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// Time a local L7 service has to start answering a request (502 after). Default 5m.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
    /// Idle keep-alive connections to local HTTP/1.1 services are closed after this; keep it
    /// below the service's own keep-alive timeout (Node.js: 5s). Default 3s.
    #[serde(default = "default_local_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub local_idle_timeout: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_stream_window() -> u32 {
    256 << 10
}
fn default_connection_window() -> u32 {
    32 << 20
}
fn default_max_streams() -> u32 {
    4096
}
fn default_streams_per_connection() -> u32 {
    100
}
fn default_failures_to_eject() -> u32 {
    3
}
fn default_tunnel_idle() -> Duration {
    Duration::from_secs(600)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_local_idle() -> Duration {
    Duration::from_secs(3)
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            keepalive_interval: default_keepalive(),
            keepalive_timeout: default_keepalive_timeout(),
            stream_window: default_stream_window(),
            connection_window: default_connection_window(),
            max_streams: default_max_streams(),
            max_streams_per_connection: default_streams_per_connection(),
            failures_to_eject: default_failures_to_eject(),
            idle_timeout: default_tunnel_idle(),
            request_timeout: default_request_timeout(),
            local_idle_timeout: default_local_idle(),
        }
    }
}

impl TunnelConfig {
    /// Checks the values; errors name the field under `prefix` (`tunnel`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let t = self;
        for (name, d) in [
            ("connect_timeout", t.connect_timeout),
            ("idle_timeout", t.idle_timeout),
            ("request_timeout", t.request_timeout),
            ("local_idle_timeout", t.local_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(err(format!("{prefix}.{name}"), "must be more than zero"));
            }
        }
        if t.max_streams == 0 || t.failures_to_eject == 0 || t.max_streams_per_connection == 0 {
            return Err(err(
                prefix,
                "max_streams, max_streams_per_connection and failures_to_eject must be at least 1",
            ));
        }
        if t.stream_window < 65_535 || t.connection_window < t.stream_window {
            return Err(err(
                prefix,
                "stream_window must be >= 65535 and connection_window >= stream_window",
            ));
        }
        Ok(())
    }
}

/// A config that failed validation; `path` names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `services[1].upstreams[0].listen`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        reason: reason.into(),
    }
}

impl AgentConfig {
    /// Checks everything that needs no I/O and compiles the authz policy.
    pub fn validate(&self) -> Result<Policy, ConfigError> {
        validate_trust_domain(&self.trust_domain)
            .map_err(|e| err("trust_domain", e.to_string()))?;
        validate_segment(&self.node).map_err(|e| err("node", e.to_string()))?;
        validate_segment(&self.namespace).map_err(|e| err("namespace", e.to_string()))?;
        if !self.listen.admin.ip().is_loopback() {
            return Err(err(
                "listen.admin",
                format!(
                    "{} is not a loopback address; the admin API must stay on 127.0.0.1 or ::1",
                    self.listen.admin
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut listeners = std::collections::HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let p = format!("services[{i}]");
            validate_segment(&svc.name).map_err(|e| err(format!("{p}.name"), e.to_string()))?;
            if !names.insert(svc.name.as_str()) {
                return Err(err(
                    format!("{p}.name"),
                    format!("service {:?} is listed twice", svc.name),
                ));
            }
            if svc.port == 0 {
                return Err(err(
                    format!("{p}.port"),
                    "must be the local service's port (1-65535)",
                ));
            }
            for (j, up) in svc.upstreams.iter().enumerate() {
                let q = format!("{p}.upstreams[{j}]");
                validate_segment(&up.service)
                    .map_err(|e| err(format!("{q}.service"), e.to_string()))?;
                if up.listen.port() != 0 && !listeners.insert(up.listen) {
                    return Err(err(
                        format!("{q}.listen"),
                        format!("{} is used by another upstream", up.listen),
                    ));
                }
            }
        }
        for (name, addrs) in &self.discovery.static_endpoints {
            validate_segment(name)
                .map_err(|e| err(format!("discovery.static.{name}"), e.to_string()))?;
            if addrs.is_empty() {
                return Err(err(
                    format!("discovery.static.{name}"),
                    "needs at least one address",
                ));
            }
        }
        if let Some(dns) = &self.discovery.dns {
            for (name, svc) in &dns.services {
                if self.discovery.static_endpoints.contains_key(name) {
                    return Err(err(
                        format!("discovery.dns.services.{name}"),
                        "also listed under discovery.static",
                    ));
                }
                if svc.name.is_empty() {
                    return Err(err(
                        format!("discovery.dns.services.{name}.name"),
                        "must not be empty",
                    ));
                }
            }
            if dns.min_refresh.is_zero() || dns.max_refresh < dns.min_refresh {
                return Err(err(
                    "discovery.dns",
                    "min_refresh must be > 0 and <= max_refresh",
                ));
            }
        }
        if self.consul_registration() {
            self.advertise()?;
            if self.registration.deregister_critical_after < Duration::from_secs(60) {
                return Err(err(
                    "registration.deregister_critical_after",
                    "Consul's minimum is 1m",
                ));
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            if let Some(p) = &svc.health_path
                && !p.starts_with('/')
            {
                return Err(err(
                    format!("services[{i}].health_path"),
                    "must start with '/'",
                ));
            }
        }
        self.tunnel.validate("tunnel")?;
        Policy::compile(&self.authz).map_err(|e| err("authz", e.to_string()))
    }

    /// Whether local services are registered in Consul.
    pub fn consul_registration(&self) -> bool {
        self.discovery.consul.is_some() && self.registration.enabled
    }

    /// The address registered for this node's inbound port.
    pub fn advertise(&self) -> Result<std::net::IpAddr, ConfigError> {
        match self.registration.advertise {
            Some(ip) => Ok(ip),
            None if !self.listen.inbound.ip().is_unspecified() => Ok(self.listen.inbound.ip()),
            None => Err(err(
                "registration.advertise",
                "required when listen.inbound is 0.0.0.0 or ::: the address other nodes reach this node at",
            )),
        }
    }

    /// The service named `name` on this node.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentConfig {
        serde_json::from_value(serde_json::json!({
            "node": "node-a",
            "trust_domain": "mesh.example",
            "data_dir": "./node-a",
            "ca": {"address": "https://127.0.0.1:15012", "fingerprint": "sha256:00"},
            "services": [{"name": "web", "port": 8080, "protocol": "http",
                          "upstreams": [{"service": "users", "listen": "127.0.0.1:9191"}]}],
            "discovery": {"static": {"users": ["127.0.0.1:15108"]}}
        }))
        .expect("valid shape")
    }

    #[test]
    fn defaults_and_validation() {
        let cfg = base();
        assert_eq!(cfg.listen.inbound.port(), 15008);
        assert_eq!(cfg.listen.admin, "127.0.0.1:15000".parse().expect("addr"));
        assert_eq!(cfg.namespace, "default");
        assert_eq!(cfg.drain_timeout, Duration::from_secs(30));
        cfg.validate().expect("valid");

        type Mutation = Box<dyn Fn(&mut AgentConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.listen.admin = "0.0.0.0:15000".parse().expect("addr")),
                "listen.admin",
            ),
            (Box::new(|c| c.services[0].port = 0), "services[0].port"),
            (
                Box::new(|c| c.services.push(c.services[0].clone())),
                "listed twice",
            ),
            (
                Box::new(|c| c.services[0].upstreams[0].service = "a/b".into()),
                "services[0].upstreams[0].service",
            ),
            (
                Box::new(|c| {
                    c.discovery.static_endpoints.insert("x".into(), vec![]);
                }),
                "discovery.static.x",
            ),
            (
                Box::new(|c| c.tunnel.connect_timeout = Duration::ZERO),
                "tunnel.connect_timeout",
            ),
            (Box::new(|c| c.node = "".into()), "node"),
        ];
        for (mutate, want) in cases {
            let mut c = base();
            mutate(&mut c);
            let e = c.validate().expect_err(want).to_string();
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = serde_json::to_value(base()).expect("json");
        v["services"][0]["prot"] = serde_json::json!("tcp");
        let e = serde_json::from_value::<AgentConfig>(v)
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("prot"), "{e}");
    }
}
