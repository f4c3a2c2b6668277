//! The CA's gRPC service: `JoinNode`, `RenewNode`, `SignWorkload`, `TrustBundle`.
//!
//! Authentication of callers with a node SVID happens in the TLS handshake (the server's
//! [`crate::verify::SpiffeClientVerifier`]); this module authorizes: a node may renew only its own
//! ID and sign only for services registered to it. Every refusal is logged once and issues nothing.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use meshgate_proto::ca::v1::{
    Bundle, CsrRequest, JoinNodeRequest, SvidResponse, TrustBundleRequest,
    certificate_authority_server::CertificateAuthority,
};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    consul::ConsulClient,
    pki::CertInfo,
    signer::{self, Signer},
    spiffe::{SpiffeId, Subject},
    store::{self, IssuedRecord, NodeRecord, NodeRegistry, TokenStore},
    verify::TrustBundle,
};

/// Everything the service needs; shared with the server for bundle updates and counters.
#[derive(Debug)]
pub struct CaState {
    pub(crate) trust_domain: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) signer: Signer,
    pub(crate) tokens: TokenStore,
    pub(crate) nodes: NodeRegistry,
    pub(crate) bundle: watch::Sender<TrustBundle>,
    pub(crate) workload_ttl: Duration,
    pub(crate) node_ttl: Duration,
    pub(crate) consul: Option<ConsulClient>,
    /// How long after expiry a node certificate may still renew itself (0: not at all).
    pub(crate) expired_grace: Duration,
    issued: AtomicU64,
    refused: AtomicU64,
}

impl CaState {
    /// State for serving `config` (its trust domain, data dir, lifetimes and grace) with
    /// `signer` and `bundle`.
    pub(crate) fn new(
        config: &crate::server::CaConfig,
        signer: Signer,
        bundle: TrustBundle,
        consul: Option<ConsulClient>,
    ) -> Self {
        Self {
            expired_grace: config.expired_renewal_grace,
            tokens: TokenStore::new(&config.data_dir),
            nodes: NodeRegistry::new(&config.data_dir),
            trust_domain: config.trust_domain.clone(),
            data_dir: config.data_dir.clone(),
            signer,
            bundle: watch::channel(bundle).0,
            workload_ttl: config.workload_ttl,
            node_ttl: config.node_ttl,
            consul,
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Certificates issued since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Requests refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The current bundle.
    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    fn bundle_msg(&self) -> Bundle {
        bundle_to_proto(&self.bundle.borrow())
    }

    fn refuse(&self, rpc: &str, who: &str, status: Status) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        warn!(rpc, peer = who, code = ?status.code(), reason = status.message(), "request refused");
        status
    }

    fn issue(
        &self,
        node: &str,
        id: &SpiffeId,
        key: &rcgen::PublicKey,
        ttl: Duration,
    ) -> Result<SvidResponse, Status> {
        let chain = self
            .signer
            .sign(id, key, ttl, SystemTime::now())
            .map_err(|e| Status::internal(e.to_string()))?;
        let info = CertInfo::from_der(&chain[0]).map_err(|e| Status::internal(e.to_string()))?;
        let rec = IssuedRecord {
            serial: info.serial.clone(),
            spiffe_id: id.to_string(),
            node: node.to_owned(),
            not_after: store::rfc3339(info.not_after),
        };
        if let Err(e) = store::append_issued(&self.data_dir, &rec) {
            warn!(error = %e, "could not append to the issuance log");
        }
        self.issued.fetch_add(1, Ordering::Relaxed);
        info!(spiffe_id = %id, node, serial = %info.serial, not_after = %rec.not_after, "issued SVID");
        Ok(SvidResponse {
            spiffe_id: id.to_string(),
            cert_chain_der: chain.into_iter().map(|c| c.to_vec()).collect(),
            bundle: Some(self.bundle_msg()),
        })
    }

    /// The node's registry record; a node that is not registered (removed by an operator, or
    /// joined to another CA data dir) gets nothing.
    fn registered(&self, rpc: &str, node: &str) -> Result<NodeRecord, Status> {
        self.nodes.get(node).ok_or_else(|| {
            self.refuse(
                rpc,
                node,
                Status::permission_denied(format!(
                    "node {node} is not registered with this CA (it was removed, or the CA's data dir is not the one it joined): join it again with a new token from `meshgate ca token create --node {node}`"
                )),
            )
        })
    }

    /// The calling node, from a verified client certificate that has not expired.
    fn caller_node<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let (node, expired) = self.caller_node_any(req)?;
        match expired {
            None => Ok(node),
            Some(not_after) => Err(Status::unauthenticated(format!(
                "the node certificate of {node} expired at {not_after}: renew it first (the agent does so on its own)"
            ))),
        }
    }

    /// The calling node, and when its certificate expired if it did (the TLS layer admits
    /// certificates that expired within `expired_renewal_grace`, for RenewNode only).
    fn caller_node_any<T>(&self, req: &Request<T>) -> Result<(String, Option<String>), Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a node SVID: connect with mTLS using the node certificate",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
        let info = CertInfo::from_der(leaf)
            .map_err(|_| Status::unauthenticated("unreadable client certificate"))?;
        let id = info
            .spiffe_uri()
            .and_then(|u| SpiffeId::parse(u).ok())
            .ok_or_else(|| Status::unauthenticated("client certificate has no SPIFFE ID"))?;
        // whole seconds, as the TLS layer counts them
        let secs = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let (now, not_after) = (secs(SystemTime::now()), secs(info.not_after));
        if now > not_after.saturating_add(self.expired_grace.as_secs()) {
            return Err(Status::unauthenticated(format!(
                "the node certificate expired at {} and is past the CA's expired_renewal_grace",
                store::rfc3339(info.not_after)
            )));
        }
        let expired = (now > not_after).then(|| store::rfc3339(info.not_after));
        match id.subject() {
            Subject::Node(n) if id.trust_domain() == self.trust_domain => Ok((n.clone(), expired)),
            _ => Err(Status::permission_denied(format!(
                "{id} is not a node identity; use the node SVID for this call"
            ))),
        }
    }
}

/// Converts a bundle to its wire form.
pub fn bundle_to_proto(b: &TrustBundle) -> Bundle {
    Bundle {
        trust_domain: b.trust_domain().to_owned(),
        roots_der: b.roots().iter().map(|r| r.to_vec()).collect(),
        sequence: b.sequence(),
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct CaService {
    state: Arc<CaState>,
}

impl CaService {
    /// A service over shared state.
    pub fn new(state: Arc<CaState>) -> Self {
        Self { state }
    }
}

fn csr_status(e: signer::CsrError) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn join_node(
        &self,
        req: Request<JoinNodeRequest>,
    ) -> Result<Response<SvidResponse>, Status> {
        let s = &self.state;
        let req = req.into_inner();
        let csr = signer::check_csr(&req.csr_der, &s.trust_domain)
            .map_err(|e| s.refuse("JoinNode", "-", csr_status(e)))?;
        let Subject::Node(node) = csr.id.subject().clone() else {
            return Err(s.refuse(
                "JoinNode",
                "-",
                Status::invalid_argument(format!(
                    "JoinNode needs a CSR for spiffe://{}/node/NAME, not {}",
                    s.trust_domain, csr.id
                )),
            ));
        };
        let record = s
            .tokens
            .consume(&req.token, &node, SystemTime::now())
            .map_err(|e| s.refuse("JoinNode", &node, Status::permission_denied(e.to_string())))?;
        s.nodes
            .register(&node, &record.services, SystemTime::now())
            .map_err(|e| s.refuse("JoinNode", &node, Status::internal(e.to_string())))?;
        info!(node, services = ?record.services, "node joined");
        s.issue(&node, &csr.id, &csr.public_key, s.node_ttl)
            .map(Response::new)
    }

    async fn renew_node(&self, req: Request<CsrRequest>) -> Result<Response<SvidResponse>, Status> {
        let s = &self.state;
        let (node, expired) = s
            .caller_node_any(&req)
            .map_err(|e| s.refuse("RenewNode", "-", e))?;
        let csr = signer::check_csr(&req.get_ref().csr_der, &s.trust_domain)
            .map_err(|e| s.refuse("RenewNode", &node, csr_status(e)))?;
        s.registered("RenewNode", &node)?;
        if let Some(not_after) = &expired {
            info!(node, not_after = %not_after, grace = %humantime::format_duration(s.expired_grace), "renewing a node certificate that expired within the grace period");
        }
        if csr.id.subject() != &Subject::Node(node.clone()) {
            return Err(s.refuse(
                "RenewNode",
                &node,
                Status::permission_denied(format!(
                    "node {node} may only renew its own identity, not {}",
                    csr.id
                )),
            ));
        }
        s.issue(&node, &csr.id, &csr.public_key, s.node_ttl)
            .map(Response::new)
    }

    async fn sign_workload(
        &self,
        req: Request<CsrRequest>,
    ) -> Result<Response<SvidResponse>, Status> {
        let s = &self.state;
        let node = s
            .caller_node(&req)
            .map_err(|e| s.refuse("SignWorkload", "-", e))?;
        let csr = signer::check_csr(&req.get_ref().csr_der, &s.trust_domain)
            .map_err(|e| s.refuse("SignWorkload", &node, csr_status(e)))?;
        let Subject::Workload { namespace, service } = csr.id.subject() else {
            return Err(s.refuse(
                "SignWorkload",
                &node,
                Status::invalid_argument(format!(
                    "SignWorkload needs a CSR for spiffe://{}/ns/NS/svc/SVC, not {}",
                    s.trust_domain, csr.id
                )),
            ));
        };
        let scope = format!("{namespace}/{service}");
        let record = s.registered("SignWorkload", &node)?;
        match &s.consul {
            // the catalog decides: the service must be registered on this very node
            Some(consul) => match consul.catalog_service(service, Some(&node)).await {
                Ok((entries, _))
                    if entries
                        .iter()
                        .any(|e| e.node == node && e.service_name == *service) => {}
                Ok(_) => {
                    return Err(s.refuse(
                        "SignWorkload",
                        &node,
                        Status::permission_denied(format!(
                            "service {service} is not registered on node {node} in Consul's catalog: register it there (the agent does so for the services in its config) and try again"
                        )),
                    ));
                }
                Err(e) => {
                    return Err(s.refuse(
                        "SignWorkload",
                        &node,
                        Status::unavailable(format!("cannot check Consul's catalog: {e}")),
                    ));
                }
            },
            None => {
                if !record.services.contains(&scope) {
                    let mut services = record.services;
                    let now_allowed = if services.is_empty() {
                        "none".to_owned()
                    } else {
                        services.join(", ")
                    };
                    services.push(scope.clone());
                    let list: Vec<String> = services
                        .iter()
                        .map(|s| s.strip_prefix("default/").unwrap_or(s).to_owned())
                        .collect();
                    return Err(s.refuse(
                        "SignWorkload",
                        &node,
                        Status::permission_denied(format!(
                            "node {node} may not run service {scope} (it may run: {now_allowed}); to allow it, run on the CA host `meshgate ca node set-services {node} {}`, or give the node a new join token made with `--services {}`; its data dir can stay",
                            list.join(","),
                            list.join(",")
                        )),
                    ));
                }
            }
        }
        s.issue(&node, &csr.id, &csr.public_key, s.workload_ttl)
            .map(Response::new)
    }

    type TrustBundleStream = Pin<Box<dyn Stream<Item = Result<Bundle, Status>> + Send>>;

    async fn trust_bundle(
        &self,
        req: Request<TrustBundleRequest>,
    ) -> Result<Response<Self::TrustBundleStream>, Status> {
        let s = &self.state;
        s.caller_node(&req)
            .map_err(|e| s.refuse("TrustBundle", "-", e))?;
        let stream = WatchStream::new(s.bundle.subscribe()).map(|b| Ok(bundle_to_proto(&b)));
        Ok(Response::new(Box::pin(stream)))
    }
}
