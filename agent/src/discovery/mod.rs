//! Where endpoints come from: static addresses, Consul (blocking health queries) or DNS (A/SRV).
//! Each upstream service has one [`Balancer`] whose endpoint set its source replaces atomically;
//! the balancer keeps per-endpoint state (latency, ejection) across updates. When a source fails,
//! the last good endpoints keep serving and the service is marked stale until it recovers.

pub mod consul;
pub mod dns;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use serde::Serialize;

use meshgate_ca::consul::ConsulClient;
use tokio::task::JoinHandle;

use crate::{
    balance::{BalanceConfig, Balancer, EndpointStatus},
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
    fn new(source: Source, addrs: Vec<SocketAddr>, cfg: BalanceConfig) -> Arc<Self> {
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
    pub fn update(&self, addrs: Vec<SocketAddr>) {
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
        static_endpoints: &BTreeMap<String, Vec<SocketAddr>>,
        upstreams: impl IntoIterator<Item = String>,
        dns_services: &[String],
        consul: bool,
        cfg: BalanceConfig,
    ) -> Self {
        let mut services = BTreeMap::new();
        for (name, addrs) in static_endpoints {
            services.insert(
                name.clone(),
                ServiceEntry::new(Source::Static, addrs.clone(), cfg),
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
                    last_update: s.last_update.map(meshgate_ca::store::rfc3339),
                    last_error: s.last_error,
                    endpoints: e.balancer.statuses(now),
                }
            })
            .collect()
    }
}
