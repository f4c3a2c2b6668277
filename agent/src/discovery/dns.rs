//! DNS discovery: A or SRV lookups through hickory-resolver (for example Consul's DNS interface,
//! `users.service.consul`), refreshed when the answer's TTL runs out.
//!
//! A records give addresses on the configured port (default: the mesh inbound port); SRV records
//! give target and port, the targets resolved with A/AAAA lookups. A failed lookup keeps the last
//! good endpoints (marked stale) and retries with backoff.
//!
//! Node names: an SRV target of the form `NODE.node.REST` (Consul's own naming of node
//! targets, e.g. `node-b.node.dc1.consul.`; in a zone of your own, name the targets that way)
//! pins its endpoints to node `NODE`, so only that node's certificate is accepted there. A
//! records and other SRV targets carry no node: any node the CA's hosting map allows for the
//! service may answer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::ServiceEntry;
use crate::{balance::Target, telemetry::Metrics};

fn default_min_refresh() -> Duration {
    Duration::from_secs(1)
}

fn default_max_refresh() -> Duration {
    Duration::from_secs(300)
}

/// `discovery.dns`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`IP:PORT`); default: the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Service name -> what to look up.
    #[serde(default)]
    pub services: BTreeMap<String, DnsService>,
    /// Never refresh more often than this, whatever the TTL. Default 1s.
    #[serde(default = "default_min_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_refresh: Duration,
    /// Refresh at least this often. Default 5m.
    #[serde(default = "default_max_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_refresh: Duration,
}

/// Record type to ask for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// A/AAAA records, on `port`.
    #[default]
    A,
    /// SRV records: target and port from the record.
    Srv,
}

/// One service's DNS name.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsService {
    /// The name to look up, e.g. `users.service.consul` or `_users._tcp.example.`.
    pub name: String,
    /// `a` (default) or `srv`.
    #[serde(default)]
    pub record: RecordKind,
    /// Port for A records; default the mesh inbound port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Builds the resolver: the configured name servers, else the system's.
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if cfg.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system DNS config: {e}"))?
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|ns| {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    // we schedule refreshes by TTL ourselves; a cached answer would hide a change
    builder.options_mut().cache_size = 0;
    builder.build().map_err(|e| e.to_string())
}

/// The node an SRV target names by the `NODE.node.REST` convention (trailing dot or not).
pub fn node_of_target(target: &str) -> Option<&str> {
    let mut labels = target.trim_end_matches('.').split('.');
    let node = labels.next()?;
    (labels.next() == Some("node")
        && labels.next().is_some()
        && meshgate_ca::spiffe::validate_segment(node).is_ok())
    .then_some(node)
}

/// Looks `svc` up once: the endpoints and how long the answer is valid.
pub async fn lookup(
    resolver: &TokioResolver,
    svc: &DnsService,
    default_port: u16,
) -> Result<(Vec<Target>, Duration), String> {
    let now = std::time::Instant::now();
    match svc.record {
        RecordKind::A => {
            let ips = resolver
                .lookup_ip(svc.name.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let port = svc.port.unwrap_or(default_port);
            let addrs = ips
                .iter()
                .map(|ip| Target::from(SocketAddr::new(ip, port)))
                .collect();
            Ok((addrs, ips.valid_until().saturating_duration_since(now)))
        }
        RecordKind::Srv => {
            let srv = resolver
                .srv_lookup(svc.name.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let mut valid = srv.valid_until().saturating_duration_since(now);
            let mut addrs = Vec::new();
            for record in srv.answers() {
                let RData::SRV(s) = &record.data else {
                    continue;
                };
                // an address-record for the target may ride along in the additional section
                let extra: Vec<IpAddr> = srv
                    .additionals()
                    .iter()
                    .filter(|r| r.name == s.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                let ips = if extra.is_empty() {
                    let ips = resolver
                        .lookup_ip(s.target.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    valid = valid.min(ips.valid_until().saturating_duration_since(now));
                    ips.iter().collect()
                } else {
                    extra
                };
                let target = s.target.to_utf8();
                let node = node_of_target(&target);
                addrs.extend(ips.into_iter().map(|ip| {
                    let addr = SocketAddr::new(ip, s.port);
                    match node {
                        Some(n) => Target::pinned(addr, n),
                        None => Target::from(addr),
                    }
                }));
            }
            Ok((addrs, valid))
        }
    }
}

/// Keeps `entry` in step with DNS forever.
pub async fn watch(
    resolver: TokioResolver,
    service: String,
    svc: DnsService,
    cfg: DnsConfig,
    default_port: u16,
    entry: Arc<ServiceEntry>,
    metrics: Arc<Metrics>,
) {
    let mut failures = 0u32;
    loop {
        match lookup(&resolver, &svc, default_port).await {
            Ok((mut addrs, ttl)) => {
                if failures > 0 {
                    info!(dst.service = %service, name = %svc.name, "DNS answers again; endpoints fresh");
                }
                failures = 0;
                addrs.sort();
                addrs.dedup();
                debug!(dst.service = %service, endpoints = addrs.len(), ttl = ?ttl, "DNS answer");
                metrics.discovery_update(&service, addrs.len(), false);
                entry.update(addrs);
                tokio::time::sleep(ttl.clamp(cfg.min_refresh, cfg.max_refresh)).await;
            }
            Err(e) => {
                metrics.discovery_error("dns", "lookup");
                metrics.discovery_update(&service, entry.balancer().endpoints().len(), true);
                if entry.mark_stale(e.clone()) {
                    warn!(dst.service = %service, name = %svc.name, error = %e, "DNS lookup failed; keeping the last good endpoints (stale)");
                }
                let backoff =
                    Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
                tokio::time::sleep(backoff.max(cfg.min_refresh)).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_targets_name_nodes_by_convention() {
        for (target, want) in [
            ("node-b.node.dc1.consul.", Some("node-b")),
            ("node-b.node.example", Some("node-b")),
            ("0a000002.addr.dc1.consul.", None),
            ("node-b.node.", None),
            ("users.service.consul.", None),
            ("node", None),
        ] {
            assert_eq!(node_of_target(target), want, "{target}");
        }
    }
}
