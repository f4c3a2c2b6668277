//! Where endpoints come from: static addresses, Consul (blocking health queries) or DNS (A/SRV).
//! Each upstream service has one [`Balancer`] whose endpoint set its source replaces atomically;
//! the balancer keeps per-endpoint state (latency, ejection) across updates. When a source fails,
//! the last good endpoints keep serving and the service is marked stale until it recovers.
//!
//! Every source can say which node must answer at an address (a [`Target`]): Consul through
//! the `meshgate-node` meta the agent registers, static discovery as `node@ip:port` (or
//! `{address, node}`), DNS through SRV targets named `NODE.node.…`. The tunnel then accepts
//! exactly that node's certificate. An address without a node is still not open to any node:
//! only a node the trust bundle's hosting map allows for the service may answer there.

pub mod consul;
pub mod dns;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use consul::ConsulClient;
use tokio::task::JoinHandle;

use crate::{
    balance::{BalanceConfig, Balancer, EndpointStatus, Target},
    config::DiscoveryConfig,
    telemetry::Metrics,
};

/// Discovery up and running: the endpoints, the watcher tasks, and the Consul client (shared
/// with registration).
#[derive(Debug)]
pub struct Running {
    /// Endpoints of every service.
    pub endpoints: Arc<Endpoints>,
    /// Watch tasks (Consul queries, DNS refreshes); abort them to stop.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Builds the endpoint set for `services` from `cfg` and starts the Consul and DNS watchers.
/// `mesh_port` is the inbound port assumed for endpoints that do not name one.
pub fn spawn(
    cfg: &DiscoveryConfig,
    consul: Option<&ConsulClient>,
    services: impl IntoIterator<Item = String>,
    mesh_port: u16,
    balance: BalanceConfig,
    metrics: &Arc<Metrics>,
) -> Result<Running, String> {
    let dns_names: Vec<String> = cfg
        .dns
        .as_ref()
        .map(|d| d.services.keys().cloned().collect())
        .unwrap_or_default();
    let endpoints = Arc::new(Endpoints::new(
        &cfg.static_endpoints,
        services,
        &dns_names,
        consul.is_some(),
        balance,
    ));
    let mut tasks = Vec::new();
    if let Some(client) = consul {
        for (name, entry) in endpoints.by_source(Source::Consul) {
            tasks.push(tokio::spawn(consul::watch(
                client.clone(),
                name,
                entry,
                mesh_port,
                metrics.clone(),
            )));
        }
    }
    if let Some(dns_cfg) = &cfg.dns {
        let resolver = dns::resolver(dns_cfg)?;
        for (name, entry) in endpoints.by_source(Source::Dns) {
            let svc = dns_cfg.services[&name].clone();
            tasks.push(tokio::spawn(dns::watch(
                resolver.clone(),
                name,
                svc,
                dns_cfg.clone(),
                mesh_port,
                entry,
                metrics.clone(),
            )));
        }
    }
    Ok(Running { endpoints, tasks })
}

/// One entry of `discovery.static.SERVICE`: `ip:port`, `node@ip:port`, or
/// `{address: ip:port, node: NAME}`. With a node, exactly that node's certificate is accepted
/// at the address; without one, any node the CA's hosting map allows for the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoint(pub Target);

impl From<SocketAddr> for StaticEndpoint {
    fn from(addr: SocketAddr) -> Self {
        Self(Target::from(addr))
    }
}

impl From<Target> for StaticEndpoint {
    fn from(t: Target) -> Self {
        Self(t)
    }
}

impl std::str::FromStr for StaticEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, addr) = match s.split_once('@') {
            Some((node, addr)) => (Some(node), addr),
            None => (None, s),
        };
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("{s:?} is not IP:PORT or NODE@IP:PORT (e.g. node-b@10.0.0.2:15008)")
        })?;
        match node {
            None => Ok(Self(Target::from(addr))),
            Some(n) => {
                meshgate_ca::spiffe::validate_segment(n)
                    .map_err(|e| format!("{s:?}: node name: {e}"))?;
                Ok(Self(Target::pinned(addr, n)))
            }
        }
    }
}

impl fmt::Display for StaticEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for StaticEndpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The map form of a static endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticMap {
    address: SocketAddr,
    #[serde(default)]
    node: Option<String>,
}

impl<'de> Deserialize<'de> for StaticEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StaticEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("IP:PORT, NODE@IP:PORT or {address: IP:PORT, node: NAME}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let m = StaticMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match m.node {
                    None => Ok(StaticEndpoint(Target::from(m.address))),
                    Some(n) => {
                        meshgate_ca::spiffe::validate_segment(&n)
                            .map_err(|e| serde::de::Error::custom(format!("node: {e}")))?;
                        Ok(StaticEndpoint(Target::pinned(m.address, &n)))
                    }
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for StaticEndpoint {
    fn schema_name() -> Cow<'static, str> {
        "StaticEndpoint".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A destination agent: IP:PORT, or NODE@IP:PORT to accept only that node's certificate there, or {address, node}",
            "oneOf": [
                {"type": "string", "examples": ["10.0.0.2:15008", "node-b@10.0.0.2:15008"]},
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["address"],
                    "properties": {
                        "address": {"type": "string", "description": "IP:PORT of the node's inbound port"},
                        "node": {"type": "string", "description": "the node that must answer there"}
                    }
                }
            ]
        })
    }
}

/// Where a service's endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `discovery.static`.
    Static,
    /// `discovery.consul`.
    Consul,
    /// `discovery.dns`.
    Dns,
}

/// Freshness of a service's endpoints.
#[derive(Debug, Clone, Default)]
struct Freshness {
    stale: bool,
    last_update: Option<SystemTime>,
    last_error: Option<String>,
}

/// One service's endpoints and where they came from.
#[derive(Debug)]
pub struct ServiceEntry {
    balancer: Arc<Balancer>,
    source: Source,
    state: Mutex<Freshness>,
}

impl ServiceEntry {
    fn new(source: Source, addrs: Vec<Target>, cfg: BalanceConfig) -> Arc<Self> {
        let fresh = source == Source::Static;
        Arc::new(Self {
            balancer: Arc::new(Balancer::new(addrs, cfg)),
            source,
            state: Mutex::new(Freshness {
                stale: false,
                last_update: fresh.then(SystemTime::now),
                last_error: None,
            }),
        })
    }

    /// The balancer.
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Replaces the endpoint set (atomically) and marks the entry fresh.
    pub fn update(&self, addrs: Vec<Target>) {
        self.balancer.update(addrs);
        let mut s = self
            .state
            .lock()
            .expect("invariant: discovery lock not poisoned");
        s.stale = false;
        s.last_update = Some(SystemTime::now());
        s.last_error = None;
    }

    /// Marks the entry stale: its source failed; the last good endpoints stay in use.
    /// Returns true if it was fresh before (so the caller logs the transition once).
    pub fn mark_stale(&self, error: String) -> bool {
        let mut s = self
            .state
            .lock()
            .expect("invariant: discovery lock not poisoned");
        let was_fresh = !s.stale;
        s.stale = true;
        s.last_error = Some(error);
        was_fresh
    }

    /// Whether the endpoints are stale.
    pub fn is_stale(&self) -> bool {
        self.state
            .lock()
            .expect("invariant: discovery lock not poisoned")
            .stale
    }
}

/// The endpoints of every service this node calls.
#[derive(Debug, Default)]
pub struct Endpoints {
    services: BTreeMap<String, Arc<ServiceEntry>>,
}

/// One service as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceEndpoints {
    /// Service name.
    pub service: String,
    /// Where the endpoints come from.
    pub source: Source,
    /// True when the source failed and the last good endpoints are in use.
    pub stale: bool,
    /// RFC 3339 time of the last successful update (none yet: null).
    pub last_update: Option<String>,
    /// The last error of the source, while stale.
    pub last_error: Option<String>,
    /// Each endpoint's state.
    pub endpoints: Vec<EndpointStatus>,
}

impl Endpoints {
    /// Builds the set: static services first; every other upstream is watched in DNS if listed
    /// there, else in Consul if configured, else it has no endpoints.
    pub fn new(
        static_endpoints: &BTreeMap<String, Vec<StaticEndpoint>>,
        upstreams: impl IntoIterator<Item = String>,
        dns_services: &[String],
        consul: bool,
        cfg: BalanceConfig,
    ) -> Self {
        let mut services = BTreeMap::new();
        for (name, addrs) in static_endpoints {
            services.insert(
                name.clone(),
                ServiceEntry::new(
                    Source::Static,
                    addrs.iter().map(|a| a.0.clone()).collect(),
                    cfg,
                ),
            );
        }
        for name in upstreams {
            let source = if dns_services.contains(&name) {
                Source::Dns
            } else if consul {
                Source::Consul
            } else {
                Source::Static
            };
            services
                .entry(name)
                .or_insert_with(|| ServiceEntry::new(source, Vec::new(), cfg));
        }
        Self { services }
    }

    /// The entry for `service`.
    pub fn entry(&self, service: &str) -> Option<Arc<ServiceEntry>> {
        self.services.get(service).cloned()
    }

    /// The balancer for `service`.
    pub fn balancer(&self, service: &str) -> Option<Arc<Balancer>> {
        self.services.get(service).map(|e| e.balancer.clone())
    }

    /// Services fed by `source`.
    pub fn by_source(&self, source: Source) -> Vec<(String, Arc<ServiceEntry>)> {
        self.services
            .iter()
            .filter(|(_, e)| e.source == source)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// Every service's endpoints and their state.
    pub fn snapshot(&self, now: Instant) -> Vec<ServiceEndpoints> {
        self.services
            .iter()
            .map(|(name, e)| {
                let s = e
                    .state
                    .lock()
                    .expect("invariant: discovery lock not poisoned")
                    .clone();
                ServiceEndpoints {
                    service: name.clone(),
                    source: e.source,
                    stale: s.stale,
                    last_update: s
                        .last_update
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    last_error: s.last_error,
                    endpoints: e.balancer.statuses(now),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_endpoints_parse_in_every_form() {
        let addr: SocketAddr = "10.0.0.2:15008".parse().expect("addr");
        // (JSON value as a config holds it, endpoint or error)
        let cases: &[(&str, Result<Target, &str>)] = &[
            (r#""10.0.0.2:15008""#, Ok(Target::from(addr))),
            (
                r#""node-b@10.0.0.2:15008""#,
                Ok(Target::pinned(addr, "node-b")),
            ),
            (
                r#"{"address": "10.0.0.2:15008", "node": "node-b"}"#,
                Ok(Target::pinned(addr, "node-b")),
            ),
            (r#"{"address": "10.0.0.2:15008"}"#, Ok(Target::from(addr))),
            (
                r#""node-b@10.0.0.2""#,
                Err("is not IP:PORT or NODE@IP:PORT"),
            ),
            (r#""a/b@10.0.0.2:15008""#, Err("node name")),
            (
                r#"{"address": "10.0.0.2:15008", "nod": "x"}"#,
                Err("unknown field"),
            ),
        ];
        for (yaml, want) in cases {
            let got: Result<StaticEndpoint, _> = serde_json::from_str(yaml);
            match (got, want) {
                (Ok(e), Ok(t)) => {
                    assert_eq!(&e.0, t, "{yaml}");
                    // the string form reads back the same
                    let again: StaticEndpoint = e.to_string().parse().expect("round trip");
                    assert_eq!(again, e, "{yaml}");
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{yaml}: {e}"),
                (got, _) => panic!("{yaml}: {got:?}"),
            }
        }
    }
}
