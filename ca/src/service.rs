//! The CA's gRPC service: `JoinNode`, `RenewNode`, `SignWorkload`, `TrustBundle`,
//! `ReportBundle`, and the state behind it.
//!
//! Authentication of callers with a node SVID happens in the TLS handshake (the server's
//! [`crate::verify::SpiffeClientVerifier`], never on a resumed session); this module
//! authorizes: a node may renew only its own ID; it may sign only for services in its own
//! namespace that its scope allows (and, with a catalog, that the catalog registers on it); a
//! revoked node gets nothing. Every refusal is logged once and issues nothing.
//!
//! [`CaState::maintain`] keeps the state in step with the data dir: the signing intermediate
//! (hot-loaded after `ca intermediate rotate`), the root rotation's stage, and the trust bundle
//! (roots, hosting map from the node registry, denylist), which is streamed on every change.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use meshgate_proto::ca::v1::{
    Bundle, BundleReport, BundleReportAck, CsrRequest, JoinNodeRequest, SvidResponse,
    TrustBundleRequest, certificate_authority_server::CertificateAuthority,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, watch};
use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    catalog::Catalog,
    pki::{self, CertInfo},
    rotation::{self, Signing, Stage},
    signer::{self, Signer, make_csr},
    spiffe::{SpiffeId, Subject},
    store::{
        self, Denylist, IssuedRecord, NodeRecord, NodeRegistry, Reports, StoreError, TokenStore,
    },
    tls::CertSlot,
    verify::TrustBundle,
};

/// What changed on disk since the last look, as [`CaState::maintain`] found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// The signer changed (a new intermediate, or a rotation stage switched signing).
    pub signer: bool,
    /// The published bundle changed.
    pub bundle: bool,
    /// The rotation entered this stage on its own.
    pub stage: Option<Stage>,
}

/// Everything the service needs; shared with the server for bundle updates and counters.
pub struct CaState {
    pub(crate) trust_domain: String,
    pub(crate) data_dir: PathBuf,
    signer: ArcSwap<Signer>,
    /// The roots of the bundle as the signing material has them (signing root first).
    roots: ArcSwap<Vec<CertificateDer<'static>>>,
    stage: Mutex<Option<Stage>>,
    pub(crate) tokens: TokenStore,
    pub(crate) nodes: NodeRegistry,
    denylist: Denylist,
    reports: Reports,
    pub(crate) bundle: watch::Sender<TrustBundle>,
    pub(crate) workload_ttl: Duration,
    pub(crate) node_ttl: Duration,
    catalog: Option<Arc<dyn Catalog>>,
    /// How long after expiry a node certificate may still renew itself (0: not at all).
    pub(crate) expired_grace: Duration,
    /// The CA's own serving certificate.
    serving: Arc<CertSlot>,
    serving_id: SpiffeId,
    serving_not_after: Mutex<SystemTime>,
    warned_intermediate: Mutex<Option<SystemTime>>,
    /// Woken when an RPC changed what the bundle says (a join, a report).
    pub(crate) changed: Notify,
    issued: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState")
            .field("trust_domain", &self.trust_domain)
            .field("data_dir", &self.data_dir)
            .field("signer", &self.signer.load())
            .finish_non_exhaustive()
    }
}

/// The settings [`CaState`] takes from `ca.yaml`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) trust_domain: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) workload_ttl: Duration,
    pub(crate) node_ttl: Duration,
    pub(crate) expired_grace: Duration,
}

impl CaState {
    /// State for serving from `settings.data_dir` with the signing material and bundle found
    /// there; issues the CA's serving certificate into `serving`.
    pub(crate) fn new(
        settings: Settings,
        signing: Signing,
        catalog: Option<Arc<dyn Catalog>>,
        serving: Arc<CertSlot>,
    ) -> Result<Self, StoreError> {
        let serving_id = SpiffeId::ca(&settings.trust_domain)?;
        let dir = &settings.data_dir;
        let bundle = compute_bundle(
            dir,
            &settings.trust_domain,
            &signing.roots,
            signing.signing_root(),
            SystemTime::now(),
        )?;
        let state = Self {
            tokens: TokenStore::new(dir),
            nodes: NodeRegistry::new(dir),
            denylist: Denylist::new(dir),
            reports: Reports::new(dir),
            trust_domain: settings.trust_domain,
            data_dir: settings.data_dir.clone(),
            stage: Mutex::new(signing.stage),
            roots: ArcSwap::from_pointee(signing.roots),
            signer: ArcSwap::from_pointee(signing.signer),
            bundle: watch::channel(bundle).0,
            workload_ttl: settings.workload_ttl,
            node_ttl: settings.node_ttl,
            catalog,
            expired_grace: settings.expired_grace,
            serving,
            serving_id,
            serving_not_after: Mutex::new(SystemTime::UNIX_EPOCH),
            warned_intermediate: Mutex::new(None),
            changed: Notify::new(),
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        };
        state.issue_serving_cert()?;
        state.warn_intermediate(SystemTime::now());
        Ok(state)
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

    /// Fingerprint of the root the CA signs under now: what new joins pin.
    pub fn signing_root(&self) -> String {
        self.signer.load().root_fingerprint().to_owned()
    }

    /// When the signing intermediate expires.
    pub fn intermediate_not_after(&self) -> SystemTime {
        self.signer.load().intermediate_not_after()
    }

    /// Re-reads the data dir: moves a root rotation on when it may, loads a new signing
    /// intermediate (or the rotation's), renews the serving certificate when due, and
    /// publishes the bundle if it changed. Safe to call at any time; errors leave the current
    /// state serving.
    pub fn maintain(&self, now: SystemTime) -> Result<Changes, StoreError> {
        let mut changes = Changes {
            stage: rotation::advance(&self.data_dir, now)?,
            ..Changes::default()
        };
        if let Some(stage) = changes.stage {
            info!(%stage, "root rotation: every node holds the new root; signing under it from now on");
        }
        let signing = rotation::signing(&self.data_dir)?;
        let cur = self.signer.load();
        if signing.signer.intermediate() != cur.intermediate()
            || signing.signer.root_fingerprint() != cur.root_fingerprint()
            || **self.roots.load() != signing.roots
        {
            let info = CertInfo::from_der(signing.signer.intermediate())?;
            info!(
                intermediate = %info.serial,
                not_after = %store::rfc3339(info.not_after),
                root = %signing.signer.root_fingerprint(),
                "signing material changed; signing with it from now on"
            );
            *self
                .stage
                .lock()
                .expect("invariant: stage lock not poisoned") = signing.stage;
            self.roots.store(Arc::new(signing.roots.clone()));
            self.signer.store(Arc::new(signing.signer));
            changes.signer = true;
            self.issue_serving_cert()?;
        } else {
            let due = *self
                .serving_not_after
                .lock()
                .expect("invariant: serving lock not poisoned");
            let lifetime = self.workload_ttl;
            if now + lifetime / 3 >= due {
                self.issue_serving_cert()?;
            }
            drop(signing);
        }
        self.warn_intermediate(now);
        changes.bundle = self.publish(now)?;
        Ok(changes)
    }

    /// Recomputes the bundle from the data dir and streams it if its content changed.
    fn publish(&self, now: SystemTime) -> Result<bool, StoreError> {
        let next = compute_bundle(
            &self.data_dir,
            &self.trust_domain,
            &self.roots.load(),
            self.signer.load().root_fingerprint(),
            now,
        )?;
        if next.same_content(&self.bundle.borrow()) {
            return Ok(false);
        }
        info!(
            sequence = next.sequence(),
            roots = next.roots().len(),
            revoked = next.revoked_nodes().len(),
            "trust bundle changed"
        );
        self.bundle.send_replace(next);
        Ok(true)
    }

    fn warn_intermediate(&self, now: SystemTime) {
        let not_after = self.intermediate_not_after();
        let left = not_after.duration_since(now).unwrap_or_default();
        if left >= store::INTERMEDIATE_WARNING {
            return;
        }
        let mut last = self
            .warned_intermediate
            .lock()
            .expect("invariant: warning lock not poisoned");
        if last.is_some_and(|t| {
            now.duration_since(t).unwrap_or_default() < Duration::from_secs(24 * 3600)
        }) {
            return;
        }
        *last = Some(now);
        warn!(
            not_after = %store::rfc3339(not_after),
            left = %humantime::format_duration(Duration::from_secs(left.as_secs())),
            "the signing intermediate expires within 30 days: run `meshgate ca intermediate rotate` on the CA host (nodes renew onto the new one by themselves)"
        );
    }

    /// Issues the serving certificate (`spiffe://TD/ca`) under the current signer, with every
    /// bundle root in its chain so that a joining node finds the root it pinned.
    fn issue_serving_cert(&self) -> Result<(), StoreError> {
        let bad = |e: String| StoreError::Request(format!("CA serving certificate: {e}"));
        let (key, _csr) = make_csr(&self.serving_id).map_err(|e| bad(e.to_string()))?;
        let now = SystemTime::now();
        let mut chain = self
            .signer
            .load()
            .sign(&self.serving_id, &key, self.workload_ttl, now)
            .map_err(|e| bad(e.to_string()))?;
        let not_after = CertInfo::from_der(&chain[0])?.not_after;
        chain.extend(self.roots.load().iter().cloned());
        self.serving
            .set(chain, key.serialize_der())
            .map_err(|e| bad(e.to_string()))?;
        *self
            .serving_not_after
            .lock()
            .expect("invariant: serving lock not poisoned") = not_after;
        Ok(())
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
        let signer = self.signer.load();
        let chain = signer
            .sign(id, key, ttl, SystemTime::now())
            .map_err(|e| Status::internal(e.to_string()))?;
        let info = CertInfo::from_der(&chain[0]).map_err(|e| Status::internal(e.to_string()))?;
        let rec = IssuedRecord {
            serial: info.serial.clone(),
            spiffe_id: id.to_string(),
            node: node.to_owned(),
            not_after: store::rfc3339(info.not_after),
            root: Some(signer.root_fingerprint().to_owned()),
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

    fn bundle_msg(&self) -> Bundle {
        self.bundle.borrow().to_proto()
    }

    /// The node's registry record; a node that is not registered (removed by an operator, or
    /// joined to another CA data dir) or that was revoked gets nothing.
    fn registered(&self, rpc: &str, node: &str) -> Result<NodeRecord, Status> {
        self.not_revoked(rpc, node)?;
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

    /// Refuses a node an operator revoked.
    fn not_revoked(&self, rpc: &str, node: &str) -> Result<(), Status> {
        match self.denylist.refused(node) {
            None => Ok(()),
            Some(at) => Err(self.refuse(
                rpc,
                node,
                Status::permission_denied(format!(
                    "node {node} was revoked at {}: the CA refuses its certificates and requests; if it is trustworthy again, run `meshgate ca node remove {node}` on the CA host and give it a new join token",
                    store::rfc3339(at)
                )),
            )),
        }
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
        if let Some(reason) = self.bundle.borrow().revocation(&id, &info.serial) {
            return Err(Status::permission_denied(format!(
                "{id} is refused: {reason}"
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

/// The bundle the data dir describes: the signing material's roots plus `extra-roots.pem`,
/// the hosting map from the node registry (revoked nodes left out), the denylist, the signing
/// root, and the sequence for that content.
pub(crate) fn compute_bundle(
    data_dir: &std::path::Path,
    trust_domain: &str,
    signing_roots: &[CertificateDer<'static>],
    signing_root: &str,
    now: SystemTime,
) -> Result<TrustBundle, StoreError> {
    let mut roots = signing_roots.to_vec();
    let extra = data_dir.join("extra-roots.pem");
    if extra.exists() {
        for r in pki::read_pem_certs(&extra)? {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
    }
    let revoked = Denylist::new(data_dir).list(now);
    let refused: Vec<String> = revoked
        .iter()
        .filter(|(_, r)| r.node_refused)
        .map(|(n, _)| n.clone())
        .collect();
    let serials: Vec<String> = revoked
        .iter()
        .flat_map(|(_, r)| r.serials.iter().map(|s| s.serial.clone()))
        .collect();
    let mut hosting: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (node, rec) in NodeRegistry::new(data_dir).list() {
        if refused.contains(&node) {
            continue;
        }
        for svc in rec.services {
            hosting.entry(svc).or_default().push(node.clone());
        }
    }
    let bundle = TrustBundle::new(trust_domain, roots, 0)
        .map_err(|e| StoreError::Request(e.to_string()))?
        .with_hosting(hosting)
        .with_revoked(refused, serials)
        .with_signing_root(Some(signing_root.to_owned()));
    let seq = store::bundle_sequence(data_dir, &bundle.content_digest())?;
    Ok(bundle.with_sequence(seq))
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

fn bundle_changed(s: &CaState) {
    if let Err(e) = s.publish(SystemTime::now()) {
        warn!(error = %e, "could not publish the trust bundle");
    }
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
        s.not_revoked("JoinNode", &node)?;
        let record = s
            .tokens
            .consume(&req.token, &node, SystemTime::now())
            .map_err(|e| s.refuse("JoinNode", &node, Status::permission_denied(e.to_string())))?;
        let namespace = record.namespace();
        s.nodes
            .register(&node, &namespace, &record.services, SystemTime::now())
            .map_err(|e| s.refuse("JoinNode", &node, Status::internal(e.to_string())))?;
        info!(node, namespace, services = ?record.services, "node joined");
        // the hosting map names the node's services before its answer carries the bundle
        bundle_changed(s);
        let resp = s.issue(&node, &csr.id, &csr.public_key, s.node_ttl)?;
        s.changed.notify_one();
        Ok(Response::new(resp))
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
        let record = s.registered("SignWorkload", &node)?;
        let node_ns = record.namespace();
        if *namespace != node_ns {
            return Err(s.refuse(
                "SignWorkload",
                &node,
                Status::permission_denied(format!(
                    "node {node} is in namespace {node_ns} (fixed at join by its token): it may not obtain certificates in namespace {namespace}; a node in another namespace needs its own join token made with `--namespace {namespace}`"
                )),
            ));
        }
        let scope = format!("{namespace}/{service}");
        // the node's scope (from its token, or `ca node set-services`) always applies; a
        // catalog narrows it further, never widens it
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
                .map(|s| s.split_once('/').map_or(s.as_str(), |(_, n)| n).to_owned())
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
        if let Some(catalog) = &s.catalog {
            // the catalog decides too: the service must be registered on this very node
            match catalog.node_runs(&node, service).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(s.refuse(
                        "SignWorkload",
                        &node,
                        Status::permission_denied(format!(
                            "service {service} is not registered on node {node} in the catalog ({}): register it there (the agent does so for the services in its config) and try again",
                            catalog.describe()
                        )),
                    ));
                }
                Err(e) => {
                    return Err(s.refuse(
                        "SignWorkload",
                        &node,
                        Status::unavailable(format!("cannot check the catalog: {e}")),
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
        let node = s
            .caller_node(&req)
            .map_err(|e| s.refuse("TrustBundle", "-", e))?;
        s.not_revoked("TrustBundle", &node)?;
        let stream = WatchStream::new(s.bundle.subscribe()).map(|b| Ok(b.to_proto()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_bundle(
        &self,
        req: Request<BundleReport>,
    ) -> Result<Response<BundleReportAck>, Status> {
        let s = &self.state;
        let node = s
            .caller_node(&req)
            .map_err(|e| s.refuse("ReportBundle", "-", e))?;
        s.registered("ReportBundle", &node)?;
        let report = req.into_inner();
        s.reports
            .record(
                &node,
                report.sequence,
                report.root_fingerprints,
                SystemTime::now(),
            )
            .map_err(|e| s.refuse("ReportBundle", &node, Status::internal(e.to_string())))?;
        // a rotation waiting for this node may move on
        s.changed.notify_one();
        Ok(Response::new(BundleReportAck {}))
    }
}
