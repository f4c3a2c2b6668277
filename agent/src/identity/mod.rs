//! The identity manager: the node's and its services' SVIDs, for agents and gateways alike.
//!
//! It generates every private key locally (keys never leave the process except to the node's own
//! `data_dir`, mode 0600), joins the mesh with a single-use token while pinning the CA root by
//! fingerprint, obtains the node SVID and workload SVIDs, renews each at 2/3 of its lifetime with
//! jitter (retrying with backoff and keeping the current certificate until it expires), follows
//! the CA's trust bundle stream, and builds TLS 1.3 rustls configs that verify peers as SVIDs.
//!
//! It does not decide who may talk to whom (that is authorization) and opens no listeners.

mod ca_client;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use meshgate_ca::{
    pki::{self, CertInfo, PkiError},
    signer::make_csr,
    spiffe::{SpiffeId, validate_segment, validate_trust_domain},
    tls::CertSlot,
    verify::{
        ExpectedPeer, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle, Usage,
        tls13_client_config, tls13_server_config, verify_svid,
    },
};
use meshgate_proto::ca::v1::{
    Bundle, CsrRequest, JoinNodeRequest, SvidResponse, TrustBundleRequest,
};
use rcgen::KeyPair;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use ca_client::{CaClient, connect as connect_ca, error_chain};

/// How to reach the CA and where to keep keys.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Trust domain, e.g. `mesh.example`.
    pub trust_domain: String,
    /// This node's name; its SVID is `spiffe://TD/node/NAME`.
    pub node: String,
    /// Keys, certificates and the bundle are kept here (directory 0700, keys 0600).
    pub data_dir: PathBuf,
    /// `https://HOST:PORT` of `meshgate ca serve`.
    pub ca_address: String,
    /// The root fingerprint printed by `meshgate ca token create` (`sha256:` + 64 hex digits).
    pub ca_fingerprint: String,
    /// Join token; needed only when `data_dir` holds no valid node SVID.
    pub join_token: Option<String>,
}

/// Identity manager errors.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A config value is invalid.
    #[error("identity config: {0}")]
    Config(String),
    /// No valid node SVID on disk and no token to join with.
    #[error(
        "{0} holds no valid node certificate and no join token was given: create one with `meshgate ca token create --node NAME`"
    )]
    NeedToken(String),
    /// The CA could not be reached or its TLS identity was refused.
    #[error("cannot reach the CA at {address}: {reason}")]
    CaUnreachable {
        /// The address.
        address: String,
        /// The whole error chain.
        reason: String,
    },
    /// The CA refused the request.
    #[error("CA refused {rpc}: {message}")]
    Refused {
        /// The RPC.
        rpc: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// The CA's explanation.
        message: String,
    },
    /// The CA answered with something that does not verify.
    #[error("CA response rejected: {0}")]
    BadResponse(String),
    /// Reading or writing the data dir failed.
    #[error(transparent)]
    Io(#[from] PkiError),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Key(String),
}

/// An identity this process holds: its SPIFFE ID and the slot that always has its current
/// certificate (renewals replace the slot's content).
#[derive(Debug, Clone)]
pub struct Identity {
    /// The SPIFFE ID.
    pub id: SpiffeId,
    slot: Arc<CertSlot>,
}

impl Identity {
    /// The current chain, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.slot.chain().unwrap_or_default()
    }

    /// The current leaf's details.
    pub fn info(&self) -> Option<CertInfo> {
        self.slot
            .chain()
            .and_then(|c| c.first().and_then(|l| CertInfo::from_der(l).ok()))
    }
}

/// Counters for the admin API and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityStatus {
    /// Successful renewals.
    pub renewals: u64,
    /// Failed renewal attempts.
    pub renew_failures: u64,
    /// Trust bundle changes applied.
    pub bundle_updates: u64,
    /// Sequence of the bundle in use.
    pub bundle_sequence: u64,
}

struct Held {
    identity: Identity,
    crt: PathBuf,
    key: PathBuf,
}

struct Inner {
    cfg: IdentityConfig,
    node_id: SpiffeId,
    ca_id: SpiffeId,
    bundle: SharedBundle,
    node: Held,
    workloads: tokio::sync::Mutex<HashMap<SpiffeId, Identity>>,
    renewals: AtomicU64,
    renew_failures: AtomicU64,
    bundle_updates: AtomicU64,
}

struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Tasks {
    fn push(&self, h: JoinHandle<()>) {
        self.0
            .lock()
            .expect("invariant: task list lock not poisoned")
            .push(h);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Ok(tasks) = self.0.get_mut() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }
}

/// Holds and renews this process's SVIDs. Cheap to clone; background tasks stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
    tasks: Arc<Tasks>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("node", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

fn validate(cfg: &IdentityConfig) -> Result<(), IdentityError> {
    validate_trust_domain(&cfg.trust_domain).map_err(|e| IdentityError::Config(e.to_string()))?;
    validate_segment(&cfg.node).map_err(|e| IdentityError::Config(format!("node name: {e}")))?;
    let fp = cfg.ca_fingerprint.to_ascii_lowercase();
    let ok = fp
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(IdentityError::Config(format!(
            "ca fingerprint {:?} must be sha256: followed by 64 hex digits, as printed by `meshgate ca token create`",
            cfg.ca_fingerprint
        )));
    }
    ca_client::parse_address(&cfg.ca_address)?;
    Ok(())
}

impl IdentityManager {
    /// Loads a valid node SVID from `data_dir`, or joins with the token; then starts renewal
    /// and the trust bundle follower.
    pub async fn start(mut cfg: IdentityConfig) -> Result<Self, IdentityError> {
        validate(&cfg)?;
        cfg.ca_fingerprint = cfg.ca_fingerprint.to_ascii_lowercase();
        pki::create_private_dir(&cfg.data_dir)?;
        let node_id = SpiffeId::node(&cfg.trust_domain, &cfg.node)
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        let ca_id =
            SpiffeId::ca(&cfg.trust_domain).map_err(|e| IdentityError::Config(e.to_string()))?;
        let node_crt = cfg.data_dir.join("node.crt");
        let node_key = cfg.data_dir.join("node.key");
        let slot = CertSlot::new();

        let bundle = match load_from_disk(&cfg, &node_id, &node_crt, &node_key, &slot) {
            Some(bundle) => {
                info!(node = %node_id, "using the node certificate in the data dir");
                bundle
            }
            None => {
                let token = cfg
                    .join_token
                    .clone()
                    .ok_or_else(|| IdentityError::NeedToken(cfg.data_dir.display().to_string()))?;
                join(&cfg, &node_id, &ca_id, &token, &node_crt, &node_key, &slot).await?
            }
        };
        let inner = Arc::new(Inner {
            node_id: node_id.clone(),
            ca_id,
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            node: Held {
                identity: Identity { id: node_id, slot },
                crt: node_crt,
                key: node_key,
            },
            workloads: tokio::sync::Mutex::new(HashMap::new()),
            renewals: AtomicU64::new(0),
            renew_failures: AtomicU64::new(0),
            bundle_updates: AtomicU64::new(0),
            cfg,
        });
        let tasks = Arc::new(Tasks(Mutex::new(Vec::new())));
        tasks.push(tokio::spawn(renew_loop(inner.clone(), None)));
        tasks.push(tokio::spawn(follow_bundle(inner.clone())));
        Ok(Self { inner, tasks })
    }

    /// The node identity (`spiffe://TD/node/NAME`).
    pub fn node(&self) -> Identity {
        self.inner.node.identity.clone()
    }

    /// The identity for service `service` in `namespace`: from memory, else from the data dir
    /// if still valid, else signed by the CA (which checks the node may run it). Renewed in the
    /// background from then on.
    pub async fn workload(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Identity, IdentityError> {
        let id = SpiffeId::workload(&self.inner.cfg.trust_domain, namespace, service)
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        let mut map = self.inner.workloads.lock().await;
        if let Some(w) = map.get(&id) {
            return Ok(w.clone());
        }
        let dir = self.inner.cfg.data_dir.join("svids").join(namespace);
        pki::create_private_dir(&dir)?;
        let held = Held {
            identity: Identity {
                id: id.clone(),
                slot: CertSlot::new(),
            },
            crt: dir.join(format!("{service}.crt")),
            key: dir.join(format!("{service}.key")),
        };
        let bundle = self.inner.bundle.load_full();
        if !load_svid(&bundle, &id, &held.crt, &held.key, &held.identity.slot) {
            self.inner.request(&held, "SignWorkload").await?;
        }
        let identity = held.identity.clone();
        map.insert(id, identity.clone());
        self.tasks
            .push(tokio::spawn(renew_loop(self.inner.clone(), Some(held))));
        Ok(identity)
    }

    /// A CA client authenticated with the node SVID.
    pub async fn ca_client(&self) -> Result<CaClient, IdentityError> {
        self.inner.node_client().await
    }

    /// The live trust bundle.
    pub fn bundle(&self) -> SharedBundle {
        self.inner.bundle.clone()
    }

    /// Counters.
    pub fn status(&self) -> IdentityStatus {
        IdentityStatus {
            renewals: self.inner.renewals.load(Ordering::Relaxed),
            renew_failures: self.inner.renew_failures.load(Ordering::Relaxed),
            bundle_updates: self.inner.bundle_updates.load(Ordering::Relaxed),
            bundle_sequence: self.inner.bundle.load().sequence(),
        }
    }

    /// Every identity held now: the node first, then workloads.
    pub async fn identities(&self) -> Vec<Identity> {
        let mut out = vec![self.node()];
        let map = self.inner.workloads.lock().await;
        let mut w: Vec<_> = map.values().cloned().collect();
        w.sort_by(|a, b| a.id.cmp(&b.id));
        out.extend(w);
        out
    }

    /// A TLS 1.3 server config that presents `identity`, requires a client SVID from the trust
    /// bundle, and offers ALPN h2. Renewals and bundle updates apply to it live.
    pub fn server_config(&self, identity: &Identity) -> Arc<ServerConfig> {
        let mut cfg = tls13_server_config()
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(self.bundle(), true)))
            .with_cert_resolver(identity.slot.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// A TLS 1.3 client config that presents `identity` and accepts only servers whose SVID
    /// chains to the bundle and matches `expected`. ALPN h2.
    pub fn client_config(&self, identity: &Identity, expected: ExpectedPeer) -> Arc<ClientConfig> {
        let mut cfg = tls13_client_config()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle(),
                expected,
            )))
            .with_client_cert_resolver(identity.slot.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }
}

impl Inner {
    /// A client authenticated with the node SVID, talking to `spiffe://TD/ca`.
    async fn node_client(&self) -> Result<ca_client::CaClient, IdentityError> {
        let tls = tls13_client_config()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle.clone(),
                ExpectedPeer::AnyOf(vec![self.ca_id.clone()]),
            )))
            .with_client_cert_resolver(self.node.identity.slot.clone());
        ca_client::connect(&self.cfg.ca_address, tls).await
    }

    /// Asks the CA for a fresh SVID for `held` (new key each time), verifies and stores it.
    async fn request(&self, held: &Held, rpc: &'static str) -> Result<(), IdentityError> {
        let (key, csr) =
            make_csr(&held.identity.id).map_err(|e| IdentityError::Key(e.to_string()))?;
        let mut client = self.node_client().await?;
        let req = CsrRequest { csr_der: csr };
        let resp = if rpc == "RenewNode" {
            client.renew_node(req).await
        } else {
            client.sign_workload(req).await
        }
        .map_err(|s| refused(rpc, s))?
        .into_inner();
        let bundle = self.bundle.load_full();
        accept_svid(
            &bundle,
            &held.identity.id,
            resp,
            &key,
            &held.crt,
            &held.key,
            &held.identity.slot,
        )?;
        Ok(())
    }

    fn apply_bundle(&self, msg: Bundle) -> Result<bool, IdentityError> {
        if msg.trust_domain != self.cfg.trust_domain {
            return Err(IdentityError::BadResponse(format!(
                "bundle for trust domain {:?}, expected {:?}",
                msg.trust_domain, self.cfg.trust_domain
            )));
        }
        let next = bundle_from_proto(&msg)?;
        let cur = self.bundle.load();
        if next.roots() == cur.roots() {
            return Ok(false);
        }
        pki::write_atomic(
            &self.cfg.data_dir.join("bundle.pem"),
            pki::certs_to_pem(next.roots()).as_bytes(),
            0o644,
        )?;
        self.bundle.store(Arc::new(next));
        self.bundle_updates.fetch_add(1, Ordering::Relaxed);
        info!(
            sequence = msg.sequence,
            roots = msg.roots_der.len(),
            "trust bundle updated"
        );
        Ok(true)
    }
}

fn refused(rpc: &'static str, s: tonic::Status) -> IdentityError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown if s.message().contains("transport") => {
            IdentityError::CaUnreachable {
                address: String::new(),
                reason: error_chain(&s),
            }
        }
        code => IdentityError::Refused {
            rpc,
            code,
            message: s.message().to_owned(),
        },
    }
}

fn bundle_from_proto(msg: &Bundle) -> Result<TrustBundle, IdentityError> {
    let roots = msg
        .roots_der
        .iter()
        .map(|r| CertificateDer::from(r.clone()))
        .collect();
    TrustBundle::new(&msg.trust_domain, roots, msg.sequence)
        .map_err(|e| IdentityError::BadResponse(e.to_string()))
}

/// Joins: pinned TLS to the CA, JoinNode, then checks that the bundle holds the pinned root
/// and that the SVID verifies against it.
async fn join(
    cfg: &IdentityConfig,
    node_id: &SpiffeId,
    ca_id: &SpiffeId,
    token: &str,
    crt: &Path,
    key_path: &Path,
    slot: &CertSlot,
) -> Result<TrustBundle, IdentityError> {
    let (key, csr) = make_csr(node_id).map_err(|e| IdentityError::Key(e.to_string()))?;
    let tls = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::pinned(
            &cfg.trust_domain,
            &cfg.ca_fingerprint,
            ExpectedPeer::AnyOf(vec![ca_id.clone()]),
        )))
        .with_no_client_auth();
    let mut client = ca_client::connect(&cfg.ca_address, tls).await?;
    let resp = client
        .join_node(JoinNodeRequest {
            token: token.trim().to_owned(),
            csr_der: csr,
        })
        .await
        .map_err(|s| refused("JoinNode", s))?
        .into_inner();
    let msg = resp.bundle.clone().ok_or_else(|| {
        IdentityError::BadResponse("JoinNode response has no trust bundle".into())
    })?;
    if msg.trust_domain != cfg.trust_domain {
        return Err(IdentityError::BadResponse(format!(
            "CA is for trust domain {:?}, expected {:?}",
            msg.trust_domain, cfg.trust_domain
        )));
    }
    let bundle = bundle_from_proto(&msg)?;
    if !bundle.contains_fingerprint(&cfg.ca_fingerprint) {
        return Err(IdentityError::BadResponse(format!(
            "trust bundle does not contain the pinned root {}",
            cfg.ca_fingerprint
        )));
    }
    accept_svid(&bundle, node_id, resp, &key, crt, key_path, slot)?;
    pki::write_atomic(
        &cfg.data_dir.join("bundle.pem"),
        pki::certs_to_pem(bundle.roots()).as_bytes(),
        0o644,
    )?;
    info!(node = %node_id, ca = %cfg.ca_address, "joined the mesh");
    Ok(bundle)
}

/// Verifies an SVID response (chain to the bundle for both client and server use, exact ID,
/// our key), then stores it on disk and in the slot.
fn accept_svid(
    bundle: &TrustBundle,
    want: &SpiffeId,
    resp: SvidResponse,
    key: &KeyPair,
    crt: &Path,
    key_path: &Path,
    slot: &CertSlot,
) -> Result<(), IdentityError> {
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| IdentityError::BadResponse("empty certificate chain".into()))?;
    let now = UnixTime::now();
    for usage in [Usage::Client, Usage::Server] {
        let id = verify_svid(bundle, leaf, rest, now, usage).map_err(|e| {
            IdentityError::BadResponse(format!("issued certificate does not verify: {e}"))
        })?;
        if &id != want {
            return Err(IdentityError::BadResponse(format!(
                "asked for {want}, got {id}"
            )));
        }
    }
    slot.set(chain.clone(), key.serialize_der()).map_err(|e| {
        IdentityError::BadResponse(format!("certificate does not match our key: {e}"))
    })?;
    pki::write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    pki::write_atomic(crt, pki::certs_to_pem(&chain).as_bytes(), 0o644)?;
    Ok(())
}

/// Loads the bundle and node SVID from the data dir when both are present and the SVID is
/// still valid for this node; returns the bundle.
fn load_from_disk(
    cfg: &IdentityConfig,
    node_id: &SpiffeId,
    crt: &Path,
    key: &Path,
    slot: &CertSlot,
) -> Option<TrustBundle> {
    let roots = pki::read_pem_certs(&cfg.data_dir.join("bundle.pem")).ok()?;
    let bundle = TrustBundle::new(&cfg.trust_domain, roots, 0).ok()?;
    load_svid(&bundle, node_id, crt, key, slot).then_some(bundle)
}

/// Loads one SVID from disk into `slot` if it verifies against `bundle` for `id`, has more than
/// a minute left, and matches its key.
fn load_svid(bundle: &TrustBundle, id: &SpiffeId, crt: &Path, key: &Path, slot: &CertSlot) -> bool {
    let Ok(chain) = pki::read_pem_certs(crt) else {
        return false;
    };
    let Ok(key_pem) = fs::read_to_string(key) else {
        return false;
    };
    let Ok(key) = KeyPair::from_pem(&key_pem) else {
        warn!(path = %key.display(), "unreadable private key; requesting a new certificate");
        return false;
    };
    let soon = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            + Duration::from_secs(60),
    );
    let (leaf, rest) = chain
        .split_first()
        .expect("invariant: read_pem_certs returns at least one");
    match verify_svid(bundle, leaf, rest, soon, Usage::Client) {
        Ok(got) if &got == id => slot.set(chain, key.serialize_der()).is_ok(),
        _ => false,
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: at 2/3 of its lifetime,
/// moved by `jitter` (in -1.0..=1.0) times 5% of the lifetime. Zero if that time has passed.
pub fn renew_delay(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let base = not_before + lifetime * 2 / 3;
    let shift = lifetime.mul_f64(0.05 * jitter.abs().min(1.0));
    let target = if jitter < 0.0 {
        base - shift
    } else {
        base + shift
    };
    target.duration_since(now).unwrap_or_default()
}

/// Retry delay after `failures` consecutive failures: 1s doubling to at most 60s.
pub fn retry_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60))
}

fn jitter() -> f64 {
    let b = pki::random_bytes::<4>();
    (f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)) * 2.0 - 1.0
}

/// Renews the node SVID (`held` = None) or a workload SVID forever.
async fn renew_loop(inner: Arc<Inner>, held: Option<Held>) {
    let held = held.as_ref().unwrap_or(&inner.node);
    let rpc = if held.identity.id == inner.node_id {
        "RenewNode"
    } else {
        "SignWorkload"
    };
    loop {
        let Some(info) = held.identity.info() else {
            return;
        };
        // never less than a second between renewals, whatever the certificate says
        let delay = renew_delay(info.not_before, info.not_after, SystemTime::now(), jitter());
        tokio::time::sleep(delay.max(Duration::from_secs(1))).await;
        let mut failures = 0u32;
        loop {
            match inner.request(held, rpc).await {
                Ok(()) => {
                    inner.renewals.fetch_add(1, Ordering::Relaxed);
                    info!(spiffe_id = %held.identity.id, "certificate renewed");
                    break;
                }
                Err(e) => {
                    inner.renew_failures.fetch_add(1, Ordering::Relaxed);
                    let expired = info.remaining(SystemTime::now()).is_zero();
                    warn!(spiffe_id = %held.identity.id, error = %e, expired, "certificate renewal failed; keeping the current one");
                    tokio::time::sleep(retry_backoff(failures)).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
    }
}

/// Follows the CA's trust bundle stream, reconnecting with backoff.
async fn follow_bundle(inner: Arc<Inner>) {
    let mut failures = 0u32;
    loop {
        let result = async {
            let mut client = inner.node_client().await?;
            let mut stream = client
                .trust_bundle(TrustBundleRequest {})
                .await
                .map_err(|s| refused("TrustBundle", s))?
                .into_inner();
            while let Some(msg) = stream
                .message()
                .await
                .map_err(|s| refused("TrustBundle", s))?
            {
                failures = 0;
                if let Err(e) = inner.apply_bundle(msg) {
                    warn!(error = %e, "trust bundle update ignored");
                }
            }
            Ok::<(), IdentityError>(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "trust bundle stream interrupted; retrying");
        }
        tokio::time::sleep(retry_backoff(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// A certificate found in a node's data dir.
#[derive(Debug, Clone)]
pub struct StoredCert {
    /// The file.
    pub path: PathBuf,
    /// Its leaf.
    pub info: CertInfo,
}

/// Lists the SVIDs a node holds on disk: `node.crt`, then `svids/NS/SVC.crt`, sorted.
pub fn list_certs(data_dir: &Path) -> Result<Vec<StoredCert>, IdentityError> {
    if !data_dir.is_dir() {
        return Err(IdentityError::Config(format!(
            "{} is not a directory",
            data_dir.display()
        )));
    }
    let mut paths = vec![data_dir.join("node.crt")];
    let mut svids = Vec::new();
    if let Ok(namespaces) = fs::read_dir(data_dir.join("svids")) {
        for ns in namespaces.flatten() {
            if let Ok(files) = fs::read_dir(ns.path()) {
                svids.extend(
                    files
                        .flatten()
                        .map(|f| f.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "crt")),
                );
            }
        }
    }
    svids.sort();
    paths.extend(svids);
    let mut out = Vec::new();
    for path in paths.into_iter().filter(|p| p.exists()) {
        let certs = pki::read_pem_certs(&path)?;
        let info = CertInfo::from_der(&certs[0])?;
        out.push(StoredCert { path, info });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_with_bounded_jitter() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_delay(t0, t0 + day, t0, 0.0), day * 2 / 3);
        assert_eq!(
            renew_delay(t0, t0 + day, t0, 1.0),
            day * 2 / 3 + day.mul_f64(0.05)
        );
        assert_eq!(
            renew_delay(t0, t0 + day, t0, -1.0),
            day * 2 / 3 - day.mul_f64(0.05)
        );
        // past the renewal point: renew now
        assert_eq!(renew_delay(t0, t0 + day, t0 + day, 0.0), Duration::ZERO);
        for _ in 0..100 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let got: Vec<u64> = (0..9).map(|n| retry_backoff(n).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn config_is_checked() {
        let good = IdentityConfig {
            trust_domain: "mesh.example".into(),
            node: "node-a".into(),
            data_dir: "/tmp/x".into(),
            ca_address: "https://127.0.0.1:15012".into(),
            ca_fingerprint: format!("sha256:{}", "ab".repeat(32)),
            join_token: None,
        };
        validate(&good).expect("valid");
        let mut bad = good.clone();
        bad.ca_fingerprint = "sha256:abc".into();
        assert!(
            validate(&bad)
                .expect_err("short")
                .to_string()
                .contains("64 hex")
        );
        let mut bad = good.clone();
        bad.node = "a/b".into();
        assert!(
            validate(&bad)
                .expect_err("node")
                .to_string()
                .contains("node name")
        );
        let mut bad = good;
        bad.ca_address = "http://ca:1".into();
        assert!(validate(&bad).is_err());
    }
}
