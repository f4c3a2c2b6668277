//! A thin client for the parts of Consul's HTTP API meshgate uses: health and catalog reads
//! (blocking queries, `X-Consul-Index`), agent service registration, and the ACL token.
//!
//! The agent uses it for discovery and registration; the CA's catalog check (a
//! [`meshgate_ca::catalog::Catalog`], wired by the CLI) goes through it too, so the CA crate
//! speaks no HTTP itself. It decodes Consul's payloads leniently (unknown fields ignored, both
//! casings of service `TaggedAddresses` keys) and classifies errors the way Consul does (status
//! plus body substring). The existing Consul crates do not fit our dependency set.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Consul sends `null` for empty maps and lists in places; treat it as empty.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn default_wait() -> Duration {
    Duration::from_secs(300)
}

/// `discovery.consul` (agent) and `consul` (CA).
#[derive(Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsulConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT` of a Consul agent. Default port 8500.
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`. Prefer `token_file`.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// File holding the ACL token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Datacenter (`?dc=`); default: the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// Enterprise namespace (`?ns=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Enterprise admin partition (`?partition=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// TLS settings for an `https://` address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ConsulTls>,
    /// Allow stale reads (`?stale`): any server answers; faster, may lag.
    #[serde(default)]
    pub stale: bool,
    /// How long one blocking query may wait. Default 5m (Consul clamps at 10m).
    #[serde(default = "default_wait", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub wait: Duration,
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("datacenter", &self.datacenter)
            .field("stale", &self.stale)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl ConsulConfig {
    /// Makes the token and TLS file paths relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(p) = &mut self.token_file {
            crate::config_check::resolve_path(p, base);
        }
        if let Some(t) = &mut self.tls {
            for p in [&mut t.ca_file, &mut t.cert_file, &mut t.key_file]
                .into_iter()
                .flatten()
            {
                crate::config_check::resolve_path(p, base);
            }
        }
    }
}

/// TLS to Consul.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsulTls {
    /// CA bundle (PEM) that signs Consul's certificate; default: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), when Consul verifies clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Consul errors, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsulError {
    /// The config is unusable.
    #[error("consul config: {0}")]
    Config(String),
    /// DNS, TCP, TLS or a timeout: Consul could not be asked.
    #[error("consul at {address} unreachable: {reason}")]
    Unreachable {
        /// The configured address.
        address: String,
        /// Why.
        reason: String,
    },
    /// 403 "ACL not found": the token itself is unknown, deleted or expired.
    #[error("consul rejected the ACL token (ACL not found): check token/token_file")]
    TokenRejected,
    /// 403 "Permission denied": the token lacks a permission.
    #[error("consul denied {operation}: the token needs {needs} ({body})")]
    PermissionDenied {
        /// What we tried.
        operation: String,
        /// The permission this operation needs.
        needs: String,
        /// Consul's words.
        body: String,
    },
    /// Any other non-2xx answer.
    #[error("consul answered {status} to {operation}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// What we tried.
        operation: String,
        /// Consul's words (plain text).
        body: String,
    },
    /// The body is not what Consul documents.
    #[error("consul response to {operation} could not be decoded: {reason}")]
    Decode {
        /// What we tried.
        operation: String,
        /// Why.
        reason: String,
    },
}

impl ConsulError {
    /// A short label for metrics: `unreachable`, `token`, `permission`, `status`, `decode`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConsulError::Config(_) => "config",
            ConsulError::Unreachable { .. } => "unreachable",
            ConsulError::TokenRejected => "token",
            ConsulError::PermissionDenied { .. } => "permission",
            ConsulError::Status { .. } => "status",
            ConsulError::Decode { .. } => "decode",
        }
    }
}

/// Response metadata of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueryMeta {
    /// `X-Consul-Index` (0 if absent).
    pub index: u64,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
}

/// A node as health and catalog results carry it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    /// Node ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// Datacenter.
    pub datacenter: String,
    /// `lan`, `wan`, … -> address.
    #[serde(deserialize_with = "nullable")]
    pub tagged_addresses: BTreeMap<String, String>,
    /// Node meta.
    #[serde(deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
}

/// A service's tagged address. Consul's docs write `address`/`port`, the wire says
/// `Address`/`Port`: both are accepted.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServiceAddress {
    /// Address.
    #[serde(rename = "Address", alias = "address")]
    pub address: String,
    /// Port.
    #[serde(rename = "Port", alias = "port")]
    pub port: u16,
}

/// A service instance as health results carry it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    /// Instance ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags.
    #[serde(deserialize_with = "nullable")]
    pub tags: Vec<String>,
    /// Address; empty means "use the node's address".
    pub address: String,
    /// Tagged addresses.
    #[serde(deserialize_with = "nullable")]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    /// Service meta.
    #[serde(deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
    /// Port.
    pub port: u16,
}

/// One health check.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Name.
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// Service ID ("" for node checks).
    #[serde(rename = "ServiceID")]
    pub service_id: String,
}

/// One entry of `/v1/health/service/:service`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthEntry {
    /// The node.
    pub node: Node,
    /// The instance.
    pub service: AgentService,
    /// Its checks and the node's.
    #[serde(deserialize_with = "nullable")]
    pub checks: Vec<HealthCheck>,
}

impl HealthEntry {
    /// `passing` if every check passes, else the worst status.
    pub fn aggregate_status(&self) -> &str {
        let worst = |s: &str| match s {
            "critical" => 2,
            "warning" => 1,
            _ => 0,
        };
        self.checks
            .iter()
            .map(|c| c.status.as_str())
            .max_by_key(|s| worst(s))
            .filter(|s| worst(s) > 0)
            .unwrap_or("passing")
    }
}

/// One entry of `/v1/catalog/service/:service`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct CatalogEntry {
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// Instance ID.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// Service name.
    pub service_name: String,
    /// Service address.
    pub service_address: String,
    /// Service port.
    pub service_port: u16,
    /// Service meta.
    #[serde(deserialize_with = "nullable")]
    pub service_meta: BTreeMap<String, String>,
    /// Service tagged addresses (both casings).
    #[serde(deserialize_with = "nullable")]
    pub service_tagged_addresses: BTreeMap<String, ServiceAddress>,
}

/// A check registered with a service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckDefinition {
    /// Check ID.
    #[serde(rename = "CheckID", skip_serializing_if = "String::is_empty", default)]
    pub check_id: String,
    /// Name.
    pub name: String,
    /// URL for an HTTP check.
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none", default)]
    pub http: Option<String>,
    /// `host:port` for a TCP check.
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none", default)]
    pub tcp: Option<String>,
    /// Go duration, e.g. `10s`.
    pub interval: String,
    /// Go duration.
    pub timeout: String,
    /// Go duration; Consul removes the service after this long critical (minimum 1m).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deregister_critical_service_after: Option<String>,
}

/// `PUT /v1/agent/service/register` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    /// Instance ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub name: String,
    /// Tags.
    #[serde(deserialize_with = "nullable")]
    pub tags: Vec<String>,
    /// Address the service is reachable at (for meshgate: the node's mesh address).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub address: String,
    /// Port.
    pub port: u16,
    /// Meta, including `meshgate-inbound` and `meshgate-protocol`.
    #[serde(deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
    /// The health check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub check: Option<CheckDefinition>,
}

/// Formats a duration the way Consul parses it (Go syntax), in whole milliseconds or seconds.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    cfg: ConsulConfig,
}

impl fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn tls_config(tls: Option<&ConsulTls>) -> Result<rustls::ClientConfig, ConsulError> {
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = tls.and_then(|t| t.ca_file.as_ref()) {
        for cert in
            meshgate_ca::pki::read_pem_certs(ca).map_err(|e| ConsulError::Config(e.to_string()))?
        {
            roots
                .add(cert)
                .map_err(|e| ConsulError::Config(format!("{}: {e}", ca.display())))?;
        }
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(meshgate_ca::verify::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConsulError::Config(e.to_string()))?;
    let builder = if roots.is_empty() {
        return Err(ConsulError::Config(
            "https Consul addresses need tls.ca_file (the CA that signed Consul's certificate)"
                .into(),
        ));
    } else {
        builder.with_root_certificates(roots)
    };
    let cfg = match tls.map(|t| (&t.cert_file, &t.key_file)) {
        Some((Some(cert), Some(key))) => {
            let chain = meshgate_ca::pki::read_pem_certs(cert)
                .map_err(|e| ConsulError::Config(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ConsulError::Config(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConsulError::Config(e.to_string()))?
        }
        Some((None, None)) | None => builder.with_no_client_auth(),
        _ => {
            return Err(ConsulError::Config(
                "tls.cert_file and tls.key_file go together".into(),
            ));
        }
    };
    Ok(cfg)
}

impl ConsulClient {
    /// Builds a client; reads `token_file` once.
    pub fn new(cfg: &ConsulConfig) -> Result<Self, ConsulError> {
        let base = cfg.address.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(ConsulError::Config(format!(
                "address {:?} must start with http:// or https://",
                cfg.address
            )));
        }
        let token = match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| ConsulError::Config(format!("token_file {}: {e}", f.display())))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90));
        if https {
            builder = builder.tls_backend_preconfigured(tls_config(cfg.tls.as_ref())?);
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Config(e.to_string()))?;
        Ok(Self {
            http,
            base,
            token,
            cfg: cfg.clone(),
        })
    }

    /// The configured address.
    pub fn address(&self) -> &str {
        &self.base
    }

    /// The blocking wait from the config.
    pub fn wait(&self) -> Duration {
        self.cfg.wait
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(dc) = &self.cfg.datacenter {
            q.push(("dc", dc));
        }
        if let Some(ns) = &self.cfg.namespace {
            q.push(("ns", ns));
        }
        if let Some(p) = &self.cfg.partition {
            q.push(("partition", p));
        }
        req.query(&q)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        operation: &str,
        needs: &str,
    ) -> Result<reqwest::Response, ConsulError> {
        let resp = req.send().await.map_err(|e| ConsulError::Unreachable {
            address: self.base.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default().trim().to_owned();
        Err(match status.as_u16() {
            403 if body.contains("ACL not found") => ConsulError::TokenRejected,
            403 => ConsulError::PermissionDenied {
                operation: operation.to_owned(),
                needs: needs.to_owned(),
                body,
            },
            s => ConsulError::Status {
                status: s,
                operation: operation.to_owned(),
                body,
            },
        })
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        extra: &[(&str, String)],
        index: Option<u64>,
        operation: &str,
        needs: &str,
    ) -> Result<(T, QueryMeta), ConsulError> {
        let mut req = self.request(reqwest::Method::GET, path).query(extra);
        if self.cfg.stale {
            req = req.query(&[("stale", "")]);
        }
        let wait = self.cfg.wait;
        match index {
            Some(i) if i > 0 => {
                // Consul adds up to wait/16 of jitter; leave room for it and the network
                req = req
                    .query(&[("index", i.to_string()), ("wait", go_duration(wait))])
                    .timeout(wait + wait / 16 + Duration::from_secs(5));
            }
            _ => req = req.timeout(Duration::from_secs(30)),
        }
        let resp = self.send(req, operation, needs).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let meta = QueryMeta {
            index: header("X-Consul-Index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            known_leader: header("X-Consul-KnownLeader").as_deref() == Some("true"),
        };
        let bytes = resp.bytes().await.map_err(|e| ConsulError::Unreachable {
            address: self.base.clone(),
            reason: error_chain(&e),
        })?;
        let body = serde_json::from_slice(&bytes).map_err(|e| ConsulError::Decode {
            operation: operation.to_owned(),
            reason: e.to_string(),
        })?;
        Ok((body, meta))
    }

    /// `GET /v1/health/service/:name[?passing]`, blocking when `index` is `Some(i > 0)`.
    pub async fn health_service(
        &self,
        name: &str,
        passing: bool,
        index: Option<u64>,
    ) -> Result<(Vec<HealthEntry>, QueryMeta), ConsulError> {
        let extra: Vec<(&str, String)> = if passing {
            vec![("passing", "1".into())]
        } else {
            vec![]
        };
        self.read(
            &format!("/v1/health/service/{name}"),
            &extra,
            index,
            &format!("reading the health of {name}"),
            &format!("service:read on {name:?} and node:read"),
        )
        .await
    }

    /// `GET /v1/catalog/service/:name`, optionally only on `node` (`filter=Node == "node"`).
    pub async fn catalog_service(
        &self,
        name: &str,
        node: Option<&str>,
    ) -> Result<(Vec<CatalogEntry>, QueryMeta), ConsulError> {
        let extra: Vec<(&str, String)> = node
            .map(|n| vec![("filter", format!("Node == {n:?}"))])
            .unwrap_or_default();
        self.read(
            &format!("/v1/catalog/service/{name}"),
            &extra,
            None,
            &format!("reading the catalog entry of {name}"),
            &format!("service:read on {name:?} and node:read"),
        )
        .await
    }

    /// `PUT /v1/agent/service/register`.
    pub async fn register(&self, reg: &ServiceRegistration) -> Result<(), ConsulError> {
        let req = self
            .request(reqwest::Method::PUT, "/v1/agent/service/register")
            .query(&[("replace-existing-checks", "true")])
            .timeout(Duration::from_secs(15))
            .json(reg);
        self.send(
            req,
            &format!("registering {}", reg.id),
            &format!("service:write on {:?}", reg.name),
        )
        .await
        .map(drop)
    }

    /// `PUT /v1/agent/service/deregister/:id`. A 404 (already gone) counts as success.
    pub async fn deregister(&self, id: &str, service: &str) -> Result<(), ConsulError> {
        let req = self
            .request(
                reqwest::Method::PUT,
                &format!("/v1/agent/service/deregister/{id}"),
            )
            .timeout(Duration::from_secs(15));
        match self
            .send(
                req,
                &format!("deregistering {id}"),
                &format!("service:write on {service:?}"),
            )
            .await
        {
            Ok(_) | Err(ConsulError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl meshgate_ca::catalog::Catalog for ConsulClient {
    /// `GET /v1/catalog/service/:service?filter=Node == "node"`: true when an instance of
    /// `service` is registered on `node`.
    fn node_runs<'a>(
        &'a self,
        node: &'a str,
        service: &'a str,
    ) -> meshgate_ca::catalog::CatalogFuture<'a> {
        Box::pin(async move {
            let (entries, _) = self
                .catalog_service(service, Some(node))
                .await
                .map_err(|e| meshgate_ca::catalog::CatalogError {
                    message: e.to_string(),
                })?;
            Ok(entries
                .iter()
                .any(|e| e.node == node && e.service_name == service))
        })
    }

    fn describe(&self) -> String {
        format!("Consul at {}", self.base)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(300)), "300s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn both_tagged_address_casings_decode() {
        let lower: AgentService =
            serde_json::from_str(r#"{"TaggedAddresses":{"lan":{"address":"10.0.0.1","port":80}}}"#)
                .expect("lower");
        let upper: AgentService =
            serde_json::from_str(r#"{"TaggedAddresses":{"lan":{"Address":"10.0.0.1","Port":80}}}"#)
                .expect("upper");
        assert_eq!(lower, upper);
        assert_eq!(upper.tagged_addresses["lan"].port, 80);
    }

    #[test]
    fn aggregate_status_is_the_worst() {
        let mut e = HealthEntry::default();
        assert_eq!(e.aggregate_status(), "passing");
        for s in ["passing", "warning", "critical", "passing"] {
            e.checks.push(HealthCheck {
                status: s.into(),
                ..Default::default()
            });
        }
        assert_eq!(e.aggregate_status(), "critical");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let cfg: ConsulConfig =
            serde_json::from_str(r#"{"address":"http://127.0.0.1:8500","token":"s3cr3t"}"#)
                .expect("cfg");
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
        assert!(
            !serde_json::to_string(&cfg)
                .expect("json")
                .contains("s3cr3t")
        );
    }
}
