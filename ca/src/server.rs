//! `meshgate ca serve`: the CA configuration and its gRPC-over-TLS server.
//!
//! The server presents `spiffe://TD/ca` (signed by the intermediate, renewed at 2/3 of its
//! lifetime) with every bundle root in its chain, so a joining node can pin a root by
//! fingerprint. Client certificates are optional at the TLS layer (joining nodes have none)
//! and required by the RPCs that act for a node; sessions are never resumed. Every
//! `reload_interval` (and on [`CaServer::reload`]) it looks at its data dir, so offline
//! commands (`ca intermediate rotate`, `ca rotate …`, `ca node revoke|remove|set-services`)
//! take effect without a restart.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use meshgate_proto::ca::v1::certificate_authority_server::CertificateAuthorityServer;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    catalog::Catalog,
    rotation,
    service::{CaService, CaState, Changes, Settings},
    store::{self, StoreError},
    tls::CertSlot,
    verify::{SpiffeClientVerifier, disable_resumption, tls13_server_config},
};

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}

fn default_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_reload() -> Duration {
    Duration::from_secs(2)
}

/// The `consul:` section of a CA config read without a catalog client: any value is refused.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoCatalog {}

/// `ca.yaml`. `C` is the type of its `consul:` section: the CLI reads it as the agent's
/// Consul settings and hands [`CaServer::start`] a [`Catalog`] built from them.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(
    deny_unknown_fields,
    bound(serialize = "C: Serialize", deserialize = "C: Deserialize<'de>")
)]
pub struct CaConfig<C = NoCatalog> {
    /// Trust domain; must match the one the CA was initialized with.
    pub trust_domain: String,
    /// Directory made by `meshgate ca init`.
    pub data_dir: PathBuf,
    /// gRPC listen address. Default `0.0.0.0:15012`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Workload SVID lifetime. Default 24h.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub workload_ttl: Duration,
    /// Node SVID lifetime. Default 24h.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub node_ttl: Duration,
    /// When set, a node may obtain a workload SVID only for a service its join token's scope
    /// allows AND that is registered on that node in Consul's catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<C>,
    /// How long after its node certificate expired a node may still renew it (with that
    /// certificate, for RenewNode only): a node whose certificate ran out during a CA outage
    /// recovers by itself when the CA returns within this. `0s` turns it off, so such a node
    /// needs a new join token. Default 24h. The cost: a node key stolen from a node that was
    /// stopped works for this much longer after expiry (`meshgate ca node revoke` ends it).
    #[serde(default = "default_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub expired_renewal_grace: Duration,
    /// How often `ca serve` looks at its data dir for what offline commands changed: a new
    /// intermediate, a root rotation step, revoked nodes, changed node services (SIGHUP looks
    /// at once). Default 2s.
    #[serde(default = "default_reload", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub reload_interval: Duration,
}

fn default_grace() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl<C> CaConfig<C> {
    /// A config with every default: listen `0.0.0.0:15012`, 24h lifetimes, no Consul, a 24h
    /// expired-renewal grace, a 2s reload interval.
    pub fn new(trust_domain: &str, data_dir: &Path) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            data_dir: data_dir.to_owned(),
            listen: default_listen(),
            workload_ttl: default_ttl(),
            node_ttl: default_ttl(),
            consul: None,
            expired_renewal_grace: default_grace(),
            reload_interval: default_reload(),
        }
    }
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data dir is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config's trust domain is not the CA's.
    #[error("config trust_domain {config:?} does not match the CA in data_dir ({ca:?})")]
    TrustDomain {
        /// From ca.yaml.
        config: String,
        /// From the root.
        ca: String,
    },
    /// A TTL of zero or beyond what the CA can sign.
    #[error("{0}")]
    Config(String),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Building TLS material failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A running CA server.
#[derive(Debug)]
pub struct CaServer {
    local_addr: SocketAddr,
    state: Arc<CaState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    accept: JoinHandle<()>,
    maintain: JoinHandle<()>,
}

impl CaServer {
    /// Loads the CA from `config.data_dir`, binds `config.listen` and starts serving. With a
    /// `catalog`, workload requests are also checked against it (see [`CaConfig::consul`]).
    pub async fn start<C>(
        config: &CaConfig<C>,
        catalog: Option<Arc<dyn Catalog>>,
    ) -> Result<Self, ServeError> {
        let ca = store::load(&config.data_dir)?;
        if ca.trust_domain != config.trust_domain {
            return Err(ServeError::TrustDomain {
                config: config.trust_domain.clone(),
                ca: ca.trust_domain,
            });
        }
        drop(ca);
        for (name, ttl) in [
            ("workload_ttl", config.workload_ttl),
            ("node_ttl", config.node_ttl),
        ] {
            if ttl < Duration::from_secs(1) {
                return Err(ServeError::Config(format!(
                    "{name} must be at least 1s, got {}",
                    humantime::format_duration(ttl)
                )));
            }
            if ttl < Duration::from_secs(300) {
                warn!(name, ttl = %humantime::format_duration(ttl), "very short certificate lifetime: nodes renew constantly");
            }
        }
        if config.reload_interval.is_zero() {
            return Err(ServeError::Config(
                "reload_interval must be more than 0s (default 2s)".into(),
            ));
        }
        let signing = rotation::signing(&config.data_dir)?;
        if let Some(stage) = signing.stage {
            info!(%stage, "a root rotation is in progress; resuming it");
        }
        let slot = CertSlot::new();
        let settings = Settings {
            trust_domain: config.trust_domain.clone(),
            data_dir: config.data_dir.clone(),
            workload_ttl: config.workload_ttl,
            node_ttl: config.node_ttl,
            expired_grace: config.expired_renewal_grace,
        };
        if let Some(c) = &catalog {
            info!(catalog = %c.describe(), "workload certificates also need a catalog registration on the asking node");
        }
        let state = Arc::new(CaState::new(settings, signing, catalog, slot.clone())?);

        // the verifier follows the streamed bundle
        let shared_bundle = Arc::new(arc_swap::ArcSwap::from_pointee(state.bundle()));
        {
            let shared = shared_bundle.clone();
            let mut rx = state.bundle.subscribe();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    shared.store(Arc::new(rx.borrow().clone()));
                }
            });
        }
        let maintain = {
            let state = state.clone();
            let every = config.reload_interval;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        () = state.changed.notified() => {}
                    }
                    if let Err(e) = state.maintain(SystemTime::now()) {
                        warn!(error = %e, "could not reload the CA's state from its data dir; keeping the current one");
                    }
                }
            })
        };

        // the CA refuses revoked nodes in its RPCs, with words, rather than in the handshake;
        // no session is ever resumed, so every connection's certificate is checked afresh
        let mut tls = tls13_server_config()
            .with_client_cert_verifier(Arc::new(
                SpiffeClientVerifier::new(shared_bundle, false)
                    .with_expired_grace(config.expired_renewal_grace)
                    .with_revocation(false),
            ))
            .with_cert_resolver(slot);
        tls.alpn_protocols = vec![b"h2".to_vec()];
        disable_resumption(&mut tls);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), conn_tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => {
                            let reason = e
                                .get_ref()
                                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                                .map(crate::verify::describe_tls_error)
                                .unwrap_or_else(|| e.to_string());
                            warn!(peer = %peer, error = %reason, "TLS handshake refused")
                        }
                        Err(_) => debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        let service = CaService::new(state.clone());
        let accept_abort = accept.abort_handle();
        let task = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(CertificateAuthorityServer::new(service))
                .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async {
                    let _ = shutdown_rx.await;
                })
                .await;
            accept_abort.abort();
            if let Err(e) = res {
                warn!(error = %e, "CA server stopped with an error");
            }
        });
        info!(addr = %local_addr, trust_domain = %config.trust_domain, ca_fingerprint = %state.signing_root(), "CA serving");
        Ok(Self {
            local_addr,
            state,
            shutdown: Some(shutdown_tx),
            task,
            accept,
            maintain,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The fingerprint new joins pin: the root the CA signs under now (the new one once a
    /// root rotation reached its reissue stage).
    pub fn fingerprint(&self) -> String {
        self.state.signing_root()
    }

    /// Counters and the current bundle.
    pub fn state(&self) -> &Arc<CaState> {
        &self.state
    }

    /// Looks at the data dir now (what SIGHUP does) instead of at the next reload tick: a new
    /// intermediate, rotation steps, revocations, changed node services, `extra-roots.pem`.
    pub fn reload(&self) -> Result<Changes, ServeError> {
        Ok(self.state.maintain(SystemTime::now())?)
    }

    /// Stops accepting and lets in-flight calls finish for up to `drain`; then closes what is
    /// left (trust bundle streams never finish on their own; nodes reconnect with backoff).
    pub async fn shutdown(mut self, drain: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // stop accepting at once; calls already in flight get `drain`
        self.accept.abort();
        let _ = (&mut self.accept).await;
        self.maintain.abort();
        if tokio::time::timeout(drain, &mut self.task).await.is_err() {
            info!(drain = %humantime::format_duration(drain), "drain timeout reached; closing remaining connections");
            self.task.abort();
        }
    }
}
