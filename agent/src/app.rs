//! Builds a node agent from its config: admin API first (so health answers during the join),
//! then identity, workload SVIDs, discovery, the inbound tunnel port and the upstream listeners.
//! Reports what it bound (port 0 works everywhere) and drains on shutdown.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use meshgate_ca::consul::{ConsulClient, ConsulError, ServiceRegistration};

use crate::{
    admin::{self, AdminState},
    balance::BalanceConfig,
    config::{AgentConfig, ConfigError},
    discovery::{self, consul},
    drain::Drain,
    identity::{IdentityError, IdentityManager},
    proxy::{
        inbound::{self, Inbound, LocalService},
        outbound::{self, Upstream},
    },
    telemetry::Metrics,
    transport::hbone::Pool,
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config is invalid.
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The join token file could not be read.
    #[error("cannot read the join token file {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Joining or obtaining certificates failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The Consul settings are unusable.
    #[error(transparent)]
    Consul(ConsulError),
    /// The DNS settings are unusable.
    #[error("DNS discovery: {0}")]
    Dns(String),
}

/// Retries Consul registration with backoff until it succeeds.
async fn retry_registration(
    client: ConsulClient,
    regs: Vec<ServiceRegistration>,
    metrics: Arc<Metrics>,
) {
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        tokio::time::sleep(delay).await;
        if consul::register_all(&client, &regs, &metrics).await.is_ok() {
            return;
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(60));
    }
}

/// A bound upstream listener.
#[derive(Debug, Clone)]
pub struct UpstreamListener {
    /// The local service that owns it (its SVID is presented).
    pub from: String,
    /// The destination service.
    pub service: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A running node agent.
#[derive(Debug)]
pub struct Agent {
    inbound_addr: SocketAddr,
    admin_addr: SocketAddr,
    upstreams: Vec<UpstreamListener>,
    identity: IdentityManager,
    metrics: Arc<Metrics>,
    state: Arc<AdminState>,
    drain: Drain,
    drain_timeout: std::time::Duration,
    tasks: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    consul: Option<ConsulClient>,
    registrations: Vec<ServiceRegistration>,
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    crate::transport::listen(addr).map_err(|source| AgentError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

fn local_addr(what: &str, l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, AgentError> {
    l.local_addr().map_err(|source| AgentError::Bind {
        what: what.to_owned(),
        addr,
        source,
    })
}

impl Agent {
    /// Starts the agent; returns once it is ready (certificates held, listeners bound).
    pub async fn start(cfg: AgentConfig) -> Result<Self, AgentError> {
        let policy = cfg.validate()?;
        let metrics = Arc::new(Metrics::new());
        let drain = Drain::new();

        let admin_listener = bind("admin", cfg.listen.admin).await?;
        let admin_addr = local_addr("admin", &admin_listener, cfg.listen.admin)?;
        let state = Arc::new(AdminState::new(
            metrics.clone(),
            serde_json::to_value(&cfg).unwrap_or_default(),
            drain.clone(),
        ));
        let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));

        let identity_cfg = cfg
            .ca
            .identity_config(&cfg.trust_domain, &cfg.node, &cfg.data_dir)
            .map_err(|(path, source)| AgentError::Token {
                path: path.display().to_string(),
                source,
            })?;
        let identity = IdentityManager::start(identity_cfg).await?;
        let _ = state.identity.set(identity.clone());

        // Bind the inbound port before registering, so the registration carries the real port
        // (port 0 works) and the CA can find the services in Consul before signing their SVIDs.
        let mut tasks = Vec::new();
        let inbound_listener = bind("inbound", cfg.listen.inbound).await?;
        let inbound_addr = local_addr("inbound", &inbound_listener, cfg.listen.inbound)?;
        let consul = match &cfg.discovery.consul {
            Some(c) => Some(ConsulClient::new(c).map_err(AgentError::Consul)?),
            None => None,
        };
        let mut registrations = Vec::new();
        if let (Some(client), true) = (&consul, cfg.consul_registration()) {
            let advertise = cfg.advertise()?;
            registrations = cfg
                .services
                .iter()
                .map(|s| {
                    consul::registration(
                        s,
                        &cfg.node,
                        advertise,
                        inbound_addr.port(),
                        &cfg.registration,
                    )
                })
                .collect();
            if consul::register_all(client, &registrations, &metrics)
                .await
                .is_err()
            {
                // keep trying in the background; the agent serves meanwhile
                tasks.push(tokio::spawn(retry_registration(
                    client.clone(),
                    registrations.clone(),
                    metrics.clone(),
                )));
            }
        }

        let mut local = HashMap::new();
        let mut owners = HashMap::new();
        for s in &cfg.services {
            let id = identity.workload(&cfg.namespace, &s.name).await?;
            local.insert(
                s.name.clone(),
                LocalService {
                    id: id.id.clone(),
                    port: s.port,
                    protocol: s.protocol,
                },
            );
            owners.insert(s.name.clone(), id);
        }
        let upstream_names = cfg
            .services
            .iter()
            .flat_map(|s| s.upstreams.iter().map(|u| u.service.clone()));
        let balance = BalanceConfig {
            failures_to_eject: cfg.tunnel.failures_to_eject,
            ..BalanceConfig::default()
        };
        // endpoints of other nodes are on the same inbound port as ours unless they say otherwise
        let mesh_port = match cfg.listen.inbound.port() {
            0 => 15008,
            p => p,
        };
        let running = discovery::spawn(
            &cfg.discovery,
            consul.as_ref(),
            upstream_names,
            mesh_port,
            balance,
            &metrics,
        )
        .map_err(AgentError::Dns)?;
        let endpoints = running.endpoints;
        tasks.extend(running.tasks);
        let _ = state.endpoints.set(endpoints.clone());
        let pool = Arc::new(Pool::new(
            identity.clone(),
            cfg.tunnel.clone(),
            metrics.clone(),
        ));

        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config(&identity.node()));
        let inbound_ctx = Arc::new(Inbound {
            services: local,
            policy,
            tunnel: cfg.tunnel.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
        });
        tasks.push(tokio::spawn(inbound::serve(
            inbound_listener,
            acceptor,
            inbound_ctx,
        )));

        let mut upstreams = Vec::new();
        for s in &cfg.services {
            for u in &s.upstreams {
                let what = format!("upstream {} -> {}", s.name, u.service);
                let listener = bind(&what, u.listen).await?;
                let addr = local_addr(&what, &listener, u.listen)?;
                let up = Arc::new(Upstream {
                    service: u.service.clone(),
                    source: owners[&s.name].clone(),
                    balancer: endpoints
                        .balancer(&u.service)
                        .expect("invariant: every upstream has a balancer"),
                    pool: pool.clone(),
                    metrics: metrics.clone(),
                    drain: drain.clone(),
                });
                tasks.push(tokio::spawn(outbound::serve(listener, up)));
                upstreams.push(UpstreamListener {
                    from: s.name.clone(),
                    service: u.service.clone(),
                    addr,
                });
            }
        }
        state.ready.store(true, Ordering::SeqCst);
        metrics.set_ready(true);
        info!(node = %cfg.node, inbound = %inbound_addr, admin = %admin_addr, upstreams = upstreams.len(), "agent ready");
        Ok(Self {
            inbound_addr,
            admin_addr,
            upstreams,
            identity,
            metrics,
            state,
            drain,
            drain_timeout: cfg.drain_timeout,
            tasks,
            admin_task,
            consul,
            registrations,
        })
    }

    /// The bound mesh inbound address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Every bound upstream listener.
    pub fn upstreams(&self) -> &[UpstreamListener] {
        &self.upstreams
    }

    /// The address of the first upstream listener for `service`.
    pub fn upstream_addr(&self, service: &str) -> Option<SocketAddr> {
        self.upstreams
            .iter()
            .find(|u| u.service == service)
            .map(|u| u.addr)
    }

    /// The identity manager.
    pub fn identity(&self) -> &IdentityManager {
        &self.identity
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Graceful drain: not ready, stop accepting, let in-flight streams finish for up to the
    /// drain timeout, then stop. Returns true if everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.state.ready.store(false, Ordering::SeqCst);
        self.drain.start();
        let in_flight = self.drain.active();
        info!(in_flight, timeout = ?self.drain_timeout, "draining");
        let clean = self.drain.wait_idle(self.drain_timeout).await;
        if !clean {
            info!(
                left = self.drain.active(),
                "drain timeout reached; closing what is left"
            );
        }
        for t in &self.tasks {
            t.abort();
        }
        if let Some(client) = &self.consul {
            consul::deregister_all(client, &self.registrations).await;
        }
        self.admin_task.abort();
        clean
    }
}
