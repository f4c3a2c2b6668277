//! `meshgate ca serve`: the CA configuration and its gRPC-over-TLS server.
//!
//! The server presents `spiffe://TD/ca` (signed by the intermediate, renewed at 2/3 of its
//! lifetime) with the root in its chain, so a joining node can pin the root by fingerprint.
//! Client certificates are optional at the TLS layer (joining nodes have none) and required by
//! the RPCs that act for a node.

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
    pki::{self, CertInfo},
    service::{CaService, CaState},
    signer::{Signer, make_csr},
    spiffe::SpiffeId,
    store::{self, StoreError},
    tls::CertSlot,
    verify::{SpiffeClientVerifier, TrustBundle, tls13_server_config},
};

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}

fn default_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// `ca.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
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
    /// When set, a node may obtain a workload SVID only for a service registered on that node
    /// in Consul's catalog (instead of the join token's service list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<crate::consul::ConsulConfig>,
    /// How long after its node certificate expired a node may still renew it (with that
    /// certificate, for RenewNode only): a node whose certificate ran out during a CA outage
    /// recovers by itself when the CA returns within this. `0s` turns it off, so such a node
    /// needs a new join token. Default 24h. The cost: a node key stolen from a node that was
    /// stopped works for this much longer after expiry (`meshgate ca node remove` ends it).
    #[serde(default = "default_grace", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub expired_renewal_grace: Duration,
}

fn default_grace() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl CaConfig {
    /// A config with every default: listen `0.0.0.0:15012`, 24h lifetimes, no Consul, a 24h
    /// expired-renewal grace.
    pub fn new(trust_domain: &str, data_dir: &Path) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            data_dir: data_dir.to_owned(),
            listen: default_listen(),
            workload_ttl: default_ttl(),
            node_ttl: default_ttl(),
            consul: None,
            expired_renewal_grace: default_grace(),
        }
    }

    /// Makes every relative path in the config relative to `base` (the directory of the file
    /// it was read from) instead of the working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.data_dir, base);
        if let Some(c) = &mut self.consul {
            c.resolve_paths(base);
        }
    }
}

/// `path` made relative to `base` when it is relative (and not empty); `./` steps are dropped.
pub fn resolve(path: &mut PathBuf, base: &Path) {
    if !path.as_os_str().is_empty() && path.is_relative() {
        let rest: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        *path = base.join(rest);
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

/// Reads the bundle roots: `root.crt` plus, when present, `extra-roots.pem` (roots being
/// rotated in or out).
pub fn load_bundle(
    data_dir: &Path,
    trust_domain: &str,
    sequence: u64,
) -> Result<TrustBundle, ServeError> {
    let mut roots = pki::read_pem_certs(&data_dir.join("root.crt")).map_err(StoreError::from)?;
    let extra = data_dir.join("extra-roots.pem");
    if extra.exists() {
        roots.extend(pki::read_pem_certs(&extra).map_err(StoreError::from)?);
    }
    TrustBundle::new(trust_domain, roots, sequence).map_err(|e| ServeError::Tls(e.to_string()))
}

/// A running CA server.
#[derive(Debug)]
pub struct CaServer {
    local_addr: SocketAddr,
    state: Arc<CaState>,
    fingerprint: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    accept: JoinHandle<()>,
    renew: JoinHandle<()>,
}

impl CaServer {
    /// Loads the CA from `config.data_dir`, binds `config.listen` and starts serving.
    pub async fn start(config: &CaConfig) -> Result<Self, ServeError> {
        let ca = store::load(&config.data_dir)?;
        if ca.trust_domain != config.trust_domain {
            return Err(ServeError::TrustDomain {
                config: config.trust_domain.clone(),
                ca: ca.trust_domain,
            });
        }
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
        let int_info = CertInfo::from_der(&ca.intermediate).map_err(StoreError::from)?;
        let left = int_info.remaining(SystemTime::now());
        if left < Duration::from_secs(30 * 24 * 3600) {
            warn!(not_after = %store::rfc3339(int_info.not_after), "the signing intermediate expires within 30 days");
        }
        let fingerprint = pki::fingerprint(&ca.root);
        let root = ca.root.clone();
        let signer = Signer::new(ca.intermediate, ca.intermediate_key)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let bundle = load_bundle(&config.data_dir, &ca.trust_domain, 1)?;
        let shared_bundle = Arc::new(arc_swap::ArcSwap::from_pointee(bundle.clone()));
        let consul = match &config.consul {
            Some(c) => Some(
                crate::consul::ConsulClient::new(c)
                    .map_err(|e| ServeError::Config(e.to_string()))?,
            ),
            None => None,
        };
        // (the trust domain was checked against the CA's above)
        let state = Arc::new(CaState::new(config, signer, bundle, consul));

        // the serving certificate, renewed in the background
        let slot = CertSlot::new();
        let serving_ttl = config.workload_ttl;
        let serving_id =
            SpiffeId::ca(&ca.trust_domain).map_err(|e| ServeError::Tls(e.to_string()))?;
        issue_serving_cert(&state, &slot, &serving_id, &root, serving_ttl)?;
        let renew = {
            let (state, slot) = (state.clone(), slot.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(serving_ttl * 2 / 3).await;
                    if let Err(e) =
                        issue_serving_cert(&state, &slot, &serving_id, &root, serving_ttl)
                    {
                        warn!(error = %e, "could not renew the CA serving certificate");
                    }
                }
            })
        };
        {
            // keep the verifier's bundle in step with the streamed one
            let shared = shared_bundle.clone();
            let mut rx = state.bundle.subscribe();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    shared.store(Arc::new(rx.borrow().clone()));
                }
            });
        }

        let mut tls = tls13_server_config()
            .with_client_cert_verifier(Arc::new(
                SpiffeClientVerifier::new(shared_bundle, false)
                    .with_expired_grace(config.expired_renewal_grace),
            ))
            .with_cert_resolver(slot);
        tls.alpn_protocols = vec![b"h2".to_vec()];
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
        info!(addr = %local_addr, trust_domain = %config.trust_domain, ca_fingerprint = %fingerprint, "CA serving");
        Ok(Self {
            local_addr,
            state,
            fingerprint,
            shutdown: Some(shutdown_tx),
            task,
            accept,
            renew,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The root fingerprint agents pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Counters and the current bundle.
    pub fn state(&self) -> &Arc<CaState> {
        &self.state
    }

    /// Re-reads the bundle roots from disk and streams them to every node if they changed.
    pub fn reload_bundle(&self) -> Result<bool, ServeError> {
        let cur = self.state.bundle();
        let next = load_bundle(
            &self.state.data_dir,
            &self.state.trust_domain,
            cur.sequence() + 1,
        )?;
        if next.roots() == cur.roots() {
            return Ok(false);
        }
        info!(
            roots = next.roots().len(),
            sequence = next.sequence(),
            "trust bundle changed"
        );
        self.state.bundle.send_replace(next);
        Ok(true)
    }

    /// Replaces the bundle (used by root rotation and by tests).
    pub fn set_bundle_roots(
        &self,
        roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<(), ServeError> {
        let seq = self.state.bundle().sequence() + 1;
        let next = TrustBundle::new(&self.state.trust_domain, roots, seq)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        self.state.bundle.send_replace(next);
        Ok(())
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
        self.renew.abort();
        if tokio::time::timeout(drain, &mut self.task).await.is_err() {
            info!(drain = %humantime::format_duration(drain), "drain timeout reached; closing remaining connections");
            self.task.abort();
        }
    }
}

fn issue_serving_cert(
    state: &CaState,
    slot: &CertSlot,
    id: &SpiffeId,
    root: &rustls_pki_types::CertificateDer<'static>,
    ttl: Duration,
) -> Result<(), ServeError> {
    let (key, _csr) = make_csr(id).map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut chain = state
        .signer
        .sign(id, &key, ttl, SystemTime::now())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    chain.push(root.clone());
    slot.set(chain, key.serialize_der())
        .map_err(|e| ServeError::Tls(e.to_string()))
}
