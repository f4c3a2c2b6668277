//! Where endpoints come from. Today: static addresses from the config. Each upstream service
//! has one [`Balancer`] whose endpoint set discovery replaces atomically; the balancer keeps
//! per-endpoint state (latency, ejection) across updates.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Instant};

use serde::Serialize;

use crate::balance::{BalanceConfig, Balancer, EndpointStatus};

/// The endpoints of every service this node calls.
#[derive(Debug, Default)]
pub struct Endpoints {
    services: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    balancer: Arc<Balancer>,
    source: &'static str,
}

/// One service as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceEndpoints {
    /// Service name.
    pub service: String,
    /// `static` (later: `consul`, `dns`).
    pub source: &'static str,
    /// Each endpoint's state.
    pub endpoints: Vec<EndpointStatus>,
}

impl Endpoints {
    /// Static endpoints for `services`, plus an empty entry for every upstream without any.
    pub fn from_static(
        static_endpoints: &BTreeMap<String, Vec<SocketAddr>>,
        upstreams: impl IntoIterator<Item = String>,
        cfg: BalanceConfig,
    ) -> Self {
        let mut services = BTreeMap::new();
        for (name, addrs) in static_endpoints {
            services.insert(
                name.clone(),
                Entry {
                    balancer: Arc::new(Balancer::new(addrs.clone(), cfg)),
                    source: "static",
                },
            );
        }
        for name in upstreams {
            services.entry(name).or_insert_with(|| Entry {
                balancer: Arc::new(Balancer::new(Vec::new(), cfg)),
                source: "static",
            });
        }
        Self { services }
    }

    /// The balancer for `service`.
    pub fn balancer(&self, service: &str) -> Option<Arc<Balancer>> {
        self.services.get(service).map(|e| e.balancer.clone())
    }

    /// Every service's endpoints and their state.
    pub fn snapshot(&self, now: Instant) -> Vec<ServiceEndpoints> {
        self.services
            .iter()
            .map(|(name, e)| ServiceEndpoints {
                service: name.clone(),
                source: e.source,
                endpoints: e.balancer.statuses(now),
            })
            .collect()
    }
}
