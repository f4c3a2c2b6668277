//! One bootstrap for every process kind that joins the mesh (the node agent and the gateway):
//! identity (join, or restart from the data dir), discovery for the services it calls, and the
//! tunnel pool. The caller binds its listeners first, so a config mistake is found before the
//! single-use join token is spent.

use std::{path::Path, sync::Arc};

use crate::discovery::consul::{ConsulClient, ConsulError};
use tokio::task::JoinHandle;

use crate::{
    admin::AdminState,
    balance::BalanceConfig,
    config::{CaRef, DiscoveryConfig, TunnelConfig},
    discovery::{self, Endpoints},
    identity::{IdentityError, IdentityManager, IdentityOptions},
    telemetry::Metrics,
    transport::hbone::Pool,
};

/// What a process needs to join the mesh.
#[derive(Debug, Clone, Copy)]
pub struct MeshSpec<'a> {
    /// Trust domain.
    pub trust_domain: &'a str,
    /// This node's name.
    pub node: &'a str,
    /// Keys and certificates.
    pub data_dir: &'a Path,
    /// The CA.
    pub ca: &'a CaRef,
    /// Endpoint sources.
    pub discovery: &'a DiscoveryConfig,
    /// Tunnel settings.
    pub tunnel: &'a TunnelConfig,
    /// The inbound port assumed for endpoints that do not name one.
    pub mesh_port: u16,
}

/// Why joining the mesh failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
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

/// A process's place in the mesh.
#[derive(Debug)]
pub struct Mesh {
    /// Its identities.
    pub identity: IdentityManager,
    /// Endpoints of the services it calls.
    pub endpoints: Arc<Endpoints>,
    /// Pooled tunnels.
    pub pool: Arc<Pool>,
    /// The Consul client, when Consul is configured (shared with registration).
    pub consul: Option<ConsulClient>,
    /// Discovery watchers.
    pub tasks: Vec<JoinHandle<()>>,
}

impl Mesh {
    /// Joins the mesh (or restarts from certificates in the data dir), starts discovery for
    /// `watch` and opens the tunnel pool. Fills in the admin state's identity and endpoints.
    pub async fn start(
        spec: MeshSpec<'_>,
        watch: impl IntoIterator<Item = String>,
        metrics: &Arc<Metrics>,
        state: &AdminState,
    ) -> Result<Self, BootstrapError> {
        let consul = match &spec.discovery.consul {
            Some(c) => Some(ConsulClient::new(c).map_err(BootstrapError::Consul)?),
            None => None,
        };
        let identity_cfg = spec
            .ca
            .identity_config(spec.trust_domain, spec.node, spec.data_dir)
            .map_err(|(path, source)| BootstrapError::Token {
                path: path.display().to_string(),
                source,
            })?;
        // keeps trying while the CA is unreachable (the token is spent once); /readyz says what
        // it waits for meanwhile
        let identity = IdentityManager::start_with(
            identity_cfg,
            IdentityOptions {
                status: Some(state.startup.clone()),
                ..IdentityOptions::default()
            },
        )
        .await?;
        let _ = state.identity.set(identity.clone());
        let balance = BalanceConfig {
            failures_to_eject: spec.tunnel.failures_to_eject,
            ..BalanceConfig::default()
        };
        let running = discovery::spawn(
            spec.discovery,
            consul.as_ref(),
            watch,
            spec.mesh_port,
            balance,
            metrics,
        )
        .map_err(BootstrapError::Dns)?;
        let _ = state.endpoints.set(running.endpoints.clone());
        let pool = Arc::new(Pool::new(
            identity.clone(),
            spec.tunnel.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            identity,
            endpoints: running.endpoints,
            pool,
            consul,
            tasks: running.tasks,
        })
    }
}
