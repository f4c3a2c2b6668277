//! Consul discovery and registration for the agent.
//!
//! Watching: one blocking query per upstream service on `/v1/health/service/NAME?passing`,
//! following Consul's index rules (never index 0, reset when it goes backwards, a small token
//! bucket against busy loops, backoff with jitter on errors). Endpoints come from the service's
//! `meshgate-inbound` meta, else its address (or the node's) plus the mesh inbound port.
//!
//! Registration: each local service as `SERVICE-NODE` with tags, meta (`meshgate-inbound`,
//! `meshgate-protocol`, `meshgate-node`) and an HTTP or TCP check against the local service;
//! deregistered on clean shutdown. The `meshgate-node` meta is what pins an endpoint to the
//! node identity that must answer for it. The HTTP client itself is [`client`].

pub mod client;

pub use client::{
    AgentService, CatalogEntry, CheckDefinition, ConsulClient, ConsulConfig, ConsulError,
    ConsulTls, HealthCheck, HealthEntry, Node, QueryMeta, ServiceAddress, ServiceRegistration,
    go_duration,
};

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::ServiceEntry;
use crate::{
    balance::Target,
    config::{Protocol, RegistrationConfig, ServiceConfig},
    telemetry::Metrics,
};

/// The next index to block on, from the previous one and the one Consul returned:
/// 0 is raised to 1 (waiting on 1 is always safe), and an index that went backwards resets
/// the loop to 0 (the next query does not block).
pub fn next_index(previous: u64, returned: u64) -> u64 {
    let returned = returned.max(1);
    if returned < previous { 0 } else { returned }
}

/// Where to reach an instance's agent: `meshgate-inbound` meta (`addr:port`), else the
/// service address (or the node's when empty) on `inbound_port`; pinned to the node its
/// `meshgate-node` meta names (what meshgate agents register). `None` when the address is
/// unusable or the node name is not one (such an instance could never be verified).
pub fn endpoint_of(entry: &HealthEntry, inbound_port: u16) -> Option<Target> {
    let addr = match entry.service.meta.get("meshgate-inbound") {
        Some(v) => v.parse().ok()?,
        None => {
            let addr = if entry.service.address.is_empty() {
                &entry.node.address
            } else {
                &entry.service.address
            };
            SocketAddr::new(addr.parse::<IpAddr>().ok()?, inbound_port)
        }
    };
    match entry.service.meta.get("meshgate-node") {
        None => Some(Target::from(addr)),
        Some(node) => {
            meshgate_ca::spiffe::validate_segment(node).ok()?;
            Some(Target::pinned(addr, node))
        }
    }
}

/// A token bucket against busy loops: `burst` immediate calls, then one per `every`.
struct Limiter {
    tokens: f64,
    burst: f64,
    every: Duration,
    last: Instant,
}

impl Limiter {
    fn new(burst: u32, every: Duration) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            every,
            last: Instant::now(),
        }
    }

    async fn acquire(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() / self.every.as_secs_f64())
        .min(self.burst);
        self.last = now;
        if self.tokens < 1.0 {
            let wait = self.every.mul_f64(1.0 - self.tokens);
            tokio::time::sleep(wait).await;
            self.tokens = 1.0;
            self.last = Instant::now();
        }
        self.tokens -= 1.0;
    }
}

fn jittered_backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
    let r = (crate::rand::secure_u64() & 0xffff) as f64 / f64::from(u16::MAX);
    base.mul_f64(0.5 + r / 2.0)
}

/// Watches `service` forever, feeding `entry`.
pub async fn watch(
    client: ConsulClient,
    service: String,
    entry: Arc<ServiceEntry>,
    inbound_port: u16,
    metrics: Arc<Metrics>,
) {
    let mut index = 0u64;
    let mut failures = 0u32;
    let mut limiter = Limiter::new(2, Duration::from_secs(1));
    loop {
        limiter.acquire().await;
        match client
            .health_service(&service, true, (index > 0).then_some(index))
            .await
        {
            Ok((entries, meta)) => {
                if failures > 0 || entry.is_stale() {
                    info!(dst.service = %service, "consul reachable again; endpoints fresh");
                }
                failures = 0;
                let next = next_index(index, meta.index);
                if next == 0 && index > 0 {
                    info!(dst.service = %service, previous = index, returned = meta.index, "consul index went backwards; resetting the watch");
                }
                index = next;
                let addrs: Vec<Target> = entries
                    .iter()
                    .filter_map(|e| endpoint_of(e, inbound_port))
                    .collect();
                if addrs.len() < entries.len() {
                    debug!(dst.service = %service, skipped = entries.len() - addrs.len(), "instances without a usable address");
                }
                metrics.discovery_update(&service, addrs.len(), false);
                entry.update(addrs);
            }
            Err(e) => {
                metrics.discovery_error("consul", e.kind());
                metrics.discovery_update(&service, entry.balancer().endpoints().len(), true);
                if entry.mark_stale(e.to_string()) {
                    warn!(dst.service = %service, error = %e, "consul watch failed; keeping the last good endpoints (stale)");
                } else {
                    debug!(dst.service = %service, error = %e, "consul watch still failing");
                }
                tokio::time::sleep(jittered_backoff(failures)).await;
                failures = failures.saturating_add(1);
                // a failed blocking query says nothing about the index; ask afresh
                index = 0;
            }
        }
    }
}

/// The registration of one local service.
pub fn registration(
    svc: &ServiceConfig,
    node: &str,
    advertise: IpAddr,
    inbound_port: u16,
    reg: &RegistrationConfig,
) -> ServiceRegistration {
    let inbound = SocketAddr::new(advertise, inbound_port);
    let mut meta = BTreeMap::new();
    meta.insert("meshgate-inbound".to_owned(), inbound.to_string());
    meta.insert(
        "meshgate-protocol".to_owned(),
        match svc.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
        .to_owned(),
    );
    meta.insert("meshgate-node".to_owned(), node.to_owned());
    let (http, tcp, kind) = match &svc.health_path {
        Some(path) => (
            Some(format!("http://127.0.0.1:{}{path}", svc.port)),
            None,
            "HTTP",
        ),
        None => (None, Some(format!("127.0.0.1:{}", svc.port)), "TCP"),
    };
    ServiceRegistration {
        id: format!("{}-{node}", svc.name),
        name: svc.name.clone(),
        tags: reg.tags.clone(),
        address: advertise.to_string(),
        port: inbound_port,
        meta,
        check: Some(CheckDefinition {
            check_id: format!("meshgate:{}-{node}", svc.name),
            name: format!("{kind} check of {} on {node}", svc.name),
            http,
            tcp,
            interval: go_duration(reg.check_interval),
            timeout: go_duration(reg.check_timeout),
            deregister_critical_service_after: Some(go_duration(reg.deregister_critical_after)),
        }),
    }
}

/// Registers every registration, logging each failure once with the permission it needs.
/// Returns the first error.
pub async fn register_all(
    client: &ConsulClient,
    regs: &[ServiceRegistration],
    metrics: &Metrics,
) -> Result<(), ConsulError> {
    let mut first = None;
    for r in regs {
        match client.register(r).await {
            Ok(()) => info!(id = %r.id, consul = %client.address(), "registered in consul"),
            Err(e) => {
                metrics.discovery_error("consul", e.kind());
                warn!(id = %r.id, error = %e, "consul registration failed");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Deregisters every registration (clean shutdown).
pub async fn deregister_all(client: &ConsulClient, regs: &[ServiceRegistration]) {
    for r in regs {
        match client.deregister(&r.id, &r.name).await {
            Ok(()) => info!(id = %r.id, "deregistered from consul"),
            Err(e) => warn!(id = %r.id, error = %e, "consul deregistration failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        // (previous, returned) -> next
        for (prev, ret, want) in [
            (0, 0, 1),
            (0, 7, 7),
            (7, 7, 7),
            (7, 9, 9),
            (9, 3, 0),
            (5, 0, 0),
            (1, 0, 1),
        ] {
            assert_eq!(next_index(prev, ret), want, "next_index({prev}, {ret})");
        }
    }

    #[test]
    fn endpoints_from_every_documented_sample_shape() {
        let sample = include_str!("../../../../tests/fixtures/consul/health_service.json");
        let entries: Vec<HealthEntry> =
            serde_json::from_str(sample).expect("documented sample decodes");
        let at = |s: &str| Some(Target::from(s.parse::<SocketAddr>().expect("addr")));
        assert_eq!(endpoint_of(&entries[0], 15008), at("10.1.10.12:15008"));
        let mut e = entries[0].clone();
        e.service.address.clear();
        e.node.address = "10.0.0.9".into();
        assert_eq!(endpoint_of(&e, 15008), at("10.0.0.9:15008"));
        e.service
            .meta
            .insert("meshgate-inbound".into(), "10.0.0.7:16008".into());
        assert_eq!(endpoint_of(&e, 15008), at("10.0.0.7:16008"));
        // a meshgate agent's registration pins the endpoint to its node
        e.service
            .meta
            .insert("meshgate-node".into(), "node-b".into());
        assert_eq!(
            endpoint_of(&e, 15008),
            Some(Target::pinned(
                "10.0.0.7:16008".parse().expect("addr"),
                "node-b"
            ))
        );
        e.service.meta.insert("meshgate-node".into(), "a/b".into());
        assert_eq!(
            endpoint_of(&e, 15008),
            None,
            "a node name that cannot be verified"
        );
        e.service.meta.remove("meshgate-node");
        e.service
            .meta
            .insert("meshgate-inbound".into(), "nonsense".into());
        assert_eq!(endpoint_of(&e, 15008), None);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_allows_a_burst_then_paces() {
        let mut l = Limiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        l.acquire().await;
        l.acquire().await;
        assert!(t0.elapsed() < Duration::from_millis(10));
        l.acquire().await;
        assert!(t0.elapsed() >= Duration::from_millis(990));
    }
}
