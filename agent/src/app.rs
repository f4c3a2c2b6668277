//! Builds a node agent from its config: admin API first (so health answers during the join),
//! every listener bound, then the shared bootstrap (identity, discovery, tunnel pool), workload
//! SVIDs, the inbound port on the HTTP front and the upstream listeners. Reports what it bound
//! (port 0 works everywhere) and drains on shutdown.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::discovery::consul::{ConsulClient, ServiceRegistration};

use crate::{
    admin::{self, AdminState},
    bootstrap::{BootstrapError, Mesh, MeshSpec},
    config::{AgentConfig, ConfigError},
    discovery::consul,
    drain::Drain,
    http::{
        front::{self, Security},
        pipeline::RequestMetrics,
    },
    identity::{IdentityError, IdentityManager},
    proxy::{
        inbound::{Inbound, InboundHandler, LocalService},
        outbound::{self, Upstream},
    },
    telemetry::{
        Metrics,
        access::{AccessLog, AccessLogError, Mode as AccessMode},
        otel::Tracing,
    },
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
    /// Joining the mesh failed (token file, CA, Consul or DNS settings).
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// Obtaining a workload certificate failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The access log cannot be opened.
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    /// The trace exporter cannot be set up.
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::otel::TracingError),
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
    tracing: Option<Tracing>,
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
    /// Starts the agent; returns once it is ready (certificates held, listeners bound). Every
    /// listener is bound before the join token is spent, so a bad address fails first.
    pub async fn start(cfg: AgentConfig) -> Result<Self, AgentError> {
        let policy = Arc::new(cfg.validate()?);
        let request_metrics = Arc::new(RequestMetrics::default());
        let metrics = Arc::new(Metrics::with_extra(|r| {
            request_metrics.register(
                r,
                "meshgate_inbound_requests",
                "L7 requests on the inbound port, by local service and status code",
            );
        }));
        let drain = Drain::new();
        let access = AccessLog::start(
            &cfg.telemetry.access_log,
            AccessMode::Agent,
            metrics.access_log_dropped(),
        )?;
        let tracing = Tracing::start(
            &cfg.telemetry.tracing,
            "meshgate-agent",
            &cfg.node,
            metrics.tracing_export(),
        )?;

        let admin_listener = bind("admin", cfg.listen.admin).await?;
        let admin_addr = local_addr("admin", &admin_listener, cfg.listen.admin)?;
        let state = Arc::new(AdminState::new(
            metrics.clone(),
            serde_json::to_value(&cfg).unwrap_or_default(),
            drain.clone(),
        ));
        let admin_task = tokio::spawn(admin::serve(admin_listener, state.clone()));

        let inbound_listener = bind("inbound", cfg.listen.inbound).await?;
        let inbound_addr = local_addr("inbound", &inbound_listener, cfg.listen.inbound)?;
        state.listener("admin", admin_addr);
        state.listener("inbound (mesh, mTLS)", inbound_addr);
        let mut upstream_listeners = Vec::new();
        for s in &cfg.services {
            for u in &s.upstreams {
                let what = format!("upstream {} -> {}", s.name, u.service);
                let listener = bind(&what, u.listen).await?;
                let addr = local_addr(&what, &listener, u.listen)?;
                state.listener(format!("upstream {} -> {}", s.name, u.service), addr);
                upstream_listeners.push((s.name.clone(), u.service.clone(), listener, addr));
            }
        }

        // endpoints of other nodes are on the same inbound port as ours unless they say otherwise
        let mesh_port = match cfg.listen.inbound.port() {
            0 => 15008,
            p => p,
        };
        let upstream_names: Vec<String> = cfg
            .services
            .iter()
            .flat_map(|s| s.upstreams.iter().map(|u| u.service.clone()))
            .collect();
        let mesh = Mesh::start(
            MeshSpec {
                trust_domain: &cfg.trust_domain,
                node: &cfg.node,
                data_dir: &cfg.data_dir,
                ca: &cfg.ca,
                discovery: &cfg.discovery,
                tunnel: &cfg.tunnel,
                mesh_port,
            },
            upstream_names,
            &metrics,
            &state,
        )
        .await?;
        let identity = mesh.identity.clone();
        let mut tasks = mesh.tasks;

        // Register before asking for workload SVIDs: the registration carries the real inbound
        // port (port 0 works), and the CA finds the services in Consul before signing.
        let consul = mesh.consul;
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

        let _ = state.extension.set(Arc::new(crate::admin::authz::AuthzApi {
            policy: policy.clone(),
            services: local.clone(),
            id_prefix: format!("spiffe://{}/ns/{}/svc/", cfg.trust_domain, cfg.namespace),
        }));
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config(&identity.node()));
        let inbound = InboundHandler::new(
            Arc::new(Inbound {
                services: local,
                policy,
                tunnel: cfg.tunnel.clone(),
                metrics: metrics.clone(),
                drain: drain.clone(),
                access,
                tracing: tracing.clone(),
            }),
            request_metrics,
        );
        tasks.push(tokio::spawn(front::serve(
            inbound_listener,
            Security::Mesh(acceptor, identity.peer_watch()),
            inbound.front(),
        )));

        let mut upstreams = Vec::new();
        for (from, service, listener, addr) in upstream_listeners {
            let up = Arc::new(Upstream {
                service: service.clone(),
                source: owners[&from].clone(),
                balancer: mesh
                    .endpoints
                    .balancer(&service)
                    .expect("invariant: every upstream has a balancer"),
                pool: mesh.pool.clone(),
                metrics: metrics.clone(),
                drain: drain.clone(),
            });
            tasks.push(tokio::spawn(outbound::serve(listener, up)));
            upstreams.push(UpstreamListener {
                from,
                service,
                addr,
            });
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
            tracing,
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
        if let Some(t) = self.tracing.clone() {
            // the batch exporter blocks while it sends what is left
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        clean
    }
}
