//! The identity manager: the node's and its services' SVIDs, for agents and gateways alike.
//!
//! It generates every private key locally (keys never leave the process except to the node's own
//! `data_dir`, mode 0600), joins the mesh with a single-use token while pinning the CA root by
//! fingerprint, obtains the node SVID and workload SVIDs, renews each at 2/3 of its lifetime with
//! jitter (retrying with backoff and keeping the current certificate until it expires), follows
//! the CA's trust bundle stream (roots, hosting map, denylist; kept in `bundle.json` and reported
//! back to the CA), and builds TLS 1.3 rustls configs that verify peers as SVIDs and never
//! resume sessions. When the bundle names a new signing root (root rotation), every held
//! certificate that chains to another root is renewed at once. [`PeerWatch`] tells a live
//! connection when its peer's certificate stops being acceptable.
//!
//! Joining just works: while the CA cannot be reached the manager keeps trying (1s doubling to
//! 60s, each attempt logged) and spends its token only once the CA answers; a node whose
//! certificate expired while the CA was away renews it when the CA returns (within the CA's
//! `expired_renewal_grace`); a join token that differs from the one the node last used is used
//! even when the node holds a certificate, so an operator can change a node's services by
//! handing it a new token. What is held is reported by [`IdentityManager::problems`] (readiness).
//!
//! It does not decide who may talk to whom (that is authorization) and opens no listeners.

mod ca_client;
mod clock;
mod watch;

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
        disable_resumption, tls13_client_config_at, tls13_server_config_at, verify_svid,
    },
};
use meshgate_proto::ca::v1::{
    Bundle, BundleReport, CsrRequest, JoinNodeRequest, SvidResponse, TrustBundleRequest,
};
use rcgen::KeyPair;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use ca_client::{CaClient, connect as connect_ca, error_chain};
pub use clock::{Clock, SkewedClock, SystemClock};
pub use watch::{CutOff, CutOffReason, ExtraCheck, PeerWatch};

use clock::{ClockTime, unix_time};

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
    /// Join token; needed only when `data_dir` holds no valid node SVID, or to change the
    /// node's services (a token other than the one last used is used even then).
    pub join_token: Option<String>,
}

/// Settings of [`IdentityManager::start_with`] that most callers leave at their defaults.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The clock certificates are checked and renewals scheduled by. Default: the system clock.
    pub clock: Arc<dyn Clock>,
    /// How many times to try reaching the CA at start before giving up; `None` (the default)
    /// keeps trying, like Consul's `retry_join`. Refusals (a bad token, a wrong fingerprint)
    /// are never retried.
    pub max_start_attempts: Option<u32>,
    /// Where start-up reports what it is waiting for (the admin API's `/readyz` shows it).
    pub status: Option<Arc<StartupStatus>>,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            max_start_attempts: None,
            status: None,
        }
    }
}

/// What identity start-up is doing, in one line for people ("joining: cannot reach the CA …").
#[derive(Debug, Default)]
pub struct StartupStatus(Mutex<Option<String>>);

impl StartupStatus {
    /// The current line, if start-up is waiting for something.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.clone())
    }

    fn set(&self, line: Option<String>) {
        if let Ok(mut s) = self.0.lock() {
            *s = line;
        }
    }
}

/// Identity manager errors.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A config value is invalid.
    #[error("identity config: {0}")]
    Config(String),
    /// No valid node SVID on disk and no token to join with.
    #[error(
        "{0} holds no valid node certificate and no join token was given: create one on the CA host with `meshgate ca token create --node NAME --services SVC,…` and put it in the file `ca.join_token_file` names"
    )]
    NeedToken(String),
    /// The CA could not be reached or its TLS identity was refused.
    #[error("cannot reach the CA at {address}: {reason}")]
    CaUnreachable {
        /// The address.
        address: String,
        /// The whole error chain.
        reason: String,
        /// Whether trying again later may help (a refused or timed-out connection), as opposed
        /// to a certificate problem (wrong fingerprint, wrong CA).
        transient: bool,
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
    /// The node certificate expired and the CA no longer renews it.
    #[error(
        "the node certificate of {node} expired at {not_after} and the CA does not renew it ({reason}): create a new join token on the CA host with `meshgate ca token create --node {node} --services SVC,…`, write it to the file `ca.join_token_file` names, and restart; the data dir can stay"
    )]
    NodeExpired {
        /// The node.
        node: String,
        /// When it expired, RFC 3339.
        not_after: String,
        /// What the CA said.
        reason: String,
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

impl IdentityError {
    /// Whether trying again later may succeed: the CA could not be reached, or said it is
    /// unavailable for now.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::CaUnreachable { transient, .. } => *transient,
            Self::Refused { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                )
            }
            _ => false,
        }
    }
}

/// The last failed renewal of a certificate.
#[derive(Debug, Clone)]
struct RenewFailure {
    since: SystemTime,
    error: String,
}

/// An identity this process holds: its SPIFFE ID and the slot that always has its current
/// certificate (renewals replace the slot's content).
#[derive(Debug, Clone)]
pub struct Identity {
    /// The SPIFFE ID.
    pub id: SpiffeId,
    namespace: Arc<str>,
    slot: Arc<CertSlot>,
    renewal: Arc<Mutex<Option<RenewFailure>>>,
    /// When the current certificate arrived from the CA (None: loaded from disk).
    arrived: Arc<Mutex<Option<SystemTime>>>,
}

impl Identity {
    fn new(id: SpiffeId) -> Self {
        let namespace = match id.subject() {
            meshgate_ca::spiffe::Subject::Workload { namespace, .. } => {
                Arc::from(namespace.as_str())
            }
            _ => Arc::from("default"),
        };
        Self {
            id,
            namespace,
            slot: CertSlot::new(),
            renewal: Arc::new(Mutex::new(None)),
            arrived: Arc::new(Mutex::new(None)),
        }
    }

    fn arrived(&self) -> Option<SystemTime> {
        self.arrived.lock().ok().and_then(|a| *a)
    }

    /// The namespace of a workload identity (`default` for the node identity): the namespace
    /// of the services it calls.
    pub fn namespace(&self) -> &Arc<str> {
        &self.namespace
    }

    /// The current chain, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.slot.chain().unwrap_or_default()
    }

    /// When the current chain stops being valid (the earliest end over leaf and
    /// intermediates), if a certificate is held.
    pub fn chain_not_after(&self) -> Option<SystemTime> {
        self.slot.chain().and_then(|c| pki::chain_not_after(&c))
    }

    /// The signing intermediate of the current chain (the certificate after the leaf).
    pub fn intermediate_info(&self) -> Option<CertInfo> {
        self.slot
            .chain()
            .and_then(|c| c.get(1).and_then(|i| CertInfo::from_der(i).ok()))
    }

    /// The current leaf's details.
    pub fn info(&self) -> Option<CertInfo> {
        self.slot
            .chain()
            .and_then(|c| c.first().and_then(|l| CertInfo::from_der(l).ok()))
    }

    /// Why the last renewal failed, if the latest attempt did.
    pub fn renewal_error(&self) -> Option<String> {
        self.failure().map(|f| f.error)
    }

    fn failure(&self) -> Option<RenewFailure> {
        self.renewal.lock().ok().and_then(|f| f.clone())
    }

    fn set_failure(&self, f: Option<RenewFailure>) {
        if let Ok(mut cur) = self.renewal.lock() {
            *cur = f;
        }
    }
}

/// A certificate that needs attention: it expired, or it is in the last quarter of its
/// lifetime while renewing it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertProblem {
    /// The identity.
    pub spiffe_id: String,
    /// Seconds left (0 once expired).
    pub seconds_left: u64,
    /// Whether it has expired.
    pub expired: bool,
    /// One line for people: what is wrong and what to do.
    pub message: String,
}

/// A certificate is at risk once less than this fraction of its lifetime is left and renewing
/// it has failed (renewal starts at 2/3, so this leaves a quarter of the lifetime to react).
pub const AT_RISK_FRACTION: f64 = 0.25;

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
    clock: Arc<dyn Clock>,
    node_id: SpiffeId,
    ca_id: SpiffeId,
    bundle: SharedBundle,
    /// Every applied bundle, for renewal loops and live connections.
    bundle_tx: tokio::sync::watch::Sender<Arc<TrustBundle>>,
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

/// Whether `fp` is `sha256:` followed by 64 hex digits (any case).
pub fn fingerprint_syntax_ok(fp: &str) -> bool {
    fp.to_ascii_lowercase()
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `fp` is the all-zero placeholder of the example configs.
pub fn fingerprint_is_placeholder(fp: &str) -> bool {
    fp.strip_prefix("sha256:")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b == b'0'))
}

/// Checks a CA address the way the identity manager will use it: `https://HOST:PORT` (the
/// scheme may be left out; the port defaults to 15012). Returns host and port.
pub fn check_ca_address(addr: &str) -> Result<(String, u16), IdentityError> {
    ca_client::parse_address(addr)
}

fn validate(cfg: &IdentityConfig) -> Result<(), IdentityError> {
    validate_trust_domain(&cfg.trust_domain).map_err(|e| IdentityError::Config(e.to_string()))?;
    validate_segment(&cfg.node).map_err(|e| IdentityError::Config(format!("node name: {e}")))?;
    if !fingerprint_syntax_ok(&cfg.ca_fingerprint) {
        return Err(IdentityError::Config(format!(
            "ca fingerprint {:?} must be sha256: followed by 64 hex digits, as printed by `meshgate ca fingerprint --data-dir CA_DIR` or `meshgate ca token create`",
            cfg.ca_fingerprint
        )));
    }
    ca_client::parse_address(&cfg.ca_address)?;
    Ok(())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The file that records which join token this node used last (its SHA-256, never the token).
const USED_TOKEN_FILE: &str = "join-token.sha256";

fn token_hash(token: &str) -> String {
    pki::sha256_hex(token.trim().as_bytes())
}

fn last_used_token(data_dir: &Path) -> Option<String> {
    fs::read_to_string(data_dir.join(USED_TOKEN_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn record_used_token(data_dir: &Path, token: &str) {
    if let Err(e) = pki::write_atomic(
        &data_dir.join(USED_TOKEN_FILE),
        token_hash(token).as_bytes(),
        0o600,
    ) {
        warn!(error = %e, "could not record which join token was used");
    }
}

/// What the data dir holds of the node's identity.
enum OnDisk {
    /// Nothing usable.
    Nothing,
    /// A valid node certificate (loaded into the slot) and the bundle.
    Valid(TrustBundle),
    /// A node certificate that expired (or is about to), otherwise right: loaded into the slot
    /// so it can renew itself while the CA allows it.
    Expired(TrustBundle, SystemTime),
}

impl IdentityManager {
    /// [`IdentityManager::start_with`] with the default options: the system clock, and keep
    /// trying while the CA cannot be reached.
    pub async fn start(cfg: IdentityConfig) -> Result<Self, IdentityError> {
        Self::start_with(cfg, IdentityOptions::default()).await
    }

    /// Loads a valid node SVID from `data_dir`, or joins with the token (retrying while the CA
    /// cannot be reached, spending the token once); renews an expired node SVID when the CA
    /// still allows it; joins with a token the node has not used before even when it holds a
    /// certificate. Then starts renewal and the trust bundle follower.
    pub async fn start_with(
        mut cfg: IdentityConfig,
        opts: IdentityOptions,
    ) -> Result<Self, IdentityError> {
        validate(&cfg)?;
        cfg.ca_fingerprint = cfg.ca_fingerprint.to_ascii_lowercase();
        pki::create_private_dir(&cfg.data_dir)?;
        let node_id = SpiffeId::node(&cfg.trust_domain, &cfg.node)
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        let ca_id =
            SpiffeId::ca(&cfg.trust_domain).map_err(|e| IdentityError::Config(e.to_string()))?;
        let node = Held {
            identity: Identity::new(node_id.clone()),
            crt: cfg.data_dir.join("node.crt"),
            key: cfg.data_dir.join("node.key"),
        };
        let clock = opts.clock.clone();
        let new_token = cfg
            .join_token
            .as_deref()
            .filter(|t| last_used_token(&cfg.data_dir).as_deref() != Some(&token_hash(t)))
            .map(str::to_owned);
        let joiner = Joiner {
            cfg: &cfg,
            node_id: &node_id,
            ca_id: &ca_id,
            node: &node,
            opts: &opts,
        };

        let mut renew_expired = None;
        let bundle = match load_from_disk(&cfg, &node, clock.now()) {
            OnDisk::Valid(bundle) => match new_token {
                // a token this node has not used: the operator wants it to join again (for
                // instance with other services); keep the current certificate if that fails
                Some(token) => match joiner.join_once(&token).await {
                    Ok(b) => {
                        info!(node = %node_id, "joined again with a new join token");
                        b
                    }
                    Err(e) => {
                        warn!(node = %node_id, error = %e, "the new join token could not be used; keeping the node certificate in the data dir");
                        if !e.is_transient() {
                            record_used_token(&cfg.data_dir, &token);
                        }
                        load_valid_again(&cfg, &node, clock.now()).unwrap_or(bundle)
                    }
                },
                None => {
                    info!(node = %node_id, "using the node certificate in the data dir");
                    bundle
                }
            },
            OnDisk::Expired(bundle, not_after) => match new_token {
                Some(token) => joiner.join_retrying(&token).await?,
                None => {
                    renew_expired = Some(not_after);
                    bundle
                }
            },
            OnDisk::Nothing => {
                let token = cfg
                    .join_token
                    .clone()
                    .ok_or_else(|| IdentityError::NeedToken(cfg.data_dir.display().to_string()))?;
                joiner.join_retrying(&token).await?
            }
        };
        let bundle = Arc::new(bundle);
        let inner = Arc::new(Inner {
            node_id: node_id.clone(),
            ca_id,
            bundle_tx: tokio::sync::watch::channel(bundle.clone()).0,
            bundle: Arc::new(ArcSwap::new(bundle)),
            node,
            workloads: tokio::sync::Mutex::new(HashMap::new()),
            renewals: AtomicU64::new(0),
            renew_failures: AtomicU64::new(0),
            bundle_updates: AtomicU64::new(0),
            clock,
            cfg,
        });
        if let Some(not_after) = renew_expired {
            inner.renew_expired_node(not_after, &opts).await?;
        }
        if let Some(status) = &opts.status {
            status.set(None);
        }
        let tasks = Arc::new(Tasks(Mutex::new(Vec::new())));
        tasks.push(tokio::spawn(renew_loop(inner.clone(), None)));
        tasks.push(tokio::spawn(follow_bundle(inner.clone())));
        tasks.push(tokio::spawn(report_bundles(inner.clone())));
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
            identity: Identity::new(id.clone()),
            crt: dir.join(format!("{service}.crt")),
            key: dir.join(format!("{service}.key")),
        };
        let bundle = self.inner.bundle.load_full();
        let now = self.inner.clock.now();
        if !matches!(
            load_svid(&bundle, &id, &held.crt, &held.key, &held.identity.slot, now),
            Loaded::Valid
        ) {
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

    /// Every bundle from now on, as it is applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle_tx.subscribe()
    }

    /// Watches peers' certificates for live connections (see [`PeerWatch`]).
    pub fn peer_watch(&self) -> PeerWatch {
        PeerWatch::new(self.subscribe(), self.inner.clock.clone())
    }

    /// Now, by the manager's clock (the one certificates are checked with).
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
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

    /// Certificates that need attention now: expired ones, and those in the last quarter of
    /// their lifetime ([`AT_RISK_FRACTION`]) whose renewal keeps failing. Empty when all is well.
    pub async fn problems(&self) -> Vec<CertProblem> {
        let now = self.inner.clock.now();
        self.identities()
            .await
            .iter()
            .filter_map(|i| cert_problem(i, &self.inner.cfg.node, now))
            .collect()
    }

    /// A TLS 1.3 server config that presents `identity`, requires a client SVID from the trust
    /// bundle (not on its denylist), and offers ALPN h2. Renewals and bundle updates apply to
    /// it live; sessions are never resumed.
    pub fn server_config(&self, identity: &Identity) -> Arc<ServerConfig> {
        let mut cfg = tls13_server_config_at(self.inner.time())
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(self.bundle(), true)))
            .with_cert_resolver(identity.slot.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // a resumed session would skip the certificate checks; tunnels are long-lived, so a
        // full handshake per connection costs nothing that matters
        disable_resumption(&mut cfg);
        Arc::new(cfg)
    }

    /// A TLS 1.3 client config that presents `identity` and accepts only servers whose SVID
    /// chains to the bundle and matches `expected`. ALPN h2.
    pub fn client_config(&self, identity: &Identity, expected: ExpectedPeer) -> Arc<ClientConfig> {
        let mut cfg = tls13_client_config_at(self.inner.time())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle(),
                expected,
            )))
            .with_client_cert_resolver(identity.slot.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }
}

/// The problem with `identity` at `now`, if any (see [`IdentityManager::problems`]).
fn cert_problem(identity: &Identity, node: &str, now: SystemTime) -> Option<CertProblem> {
    let info = identity.info()?;
    let left = info.remaining(now);
    let failure = identity.failure();
    let id = identity.id.to_string();
    if left.is_zero() {
        let why = failure
            .map(|f| format!("; renewal fails since {}: {}", rfc3339(f.since), f.error))
            .unwrap_or_default();
        return Some(CertProblem {
            message: format!(
                "certificate {id} expired at {}{why}; peers refuse it until it is renewed. If the CA is up and still refuses, give the node a new join token (`meshgate ca token create --node {node}`) and restart it",
                rfc3339(info.not_after)
            ),
            spiffe_id: id,
            seconds_left: 0,
            expired: true,
        });
    }
    let failure = failure?;
    if left.as_secs_f64() >= info.lifetime().as_secs_f64() * AT_RISK_FRACTION {
        return None;
    }
    Some(CertProblem {
        message: format!(
            "certificate {id} expires in {} and renewal fails since {}: {}; make the CA reachable (`meshgate ca serve`) before {}",
            humantime::format_duration(Duration::from_secs(left.as_secs())),
            rfc3339(failure.since),
            failure.error,
            rfc3339(info.not_after)
        ),
        spiffe_id: id,
        seconds_left: left.as_secs(),
        expired: false,
    })
}

/// Joins for start-up: one attempt, or attempts until the CA answers.
struct Joiner<'a> {
    cfg: &'a IdentityConfig,
    node_id: &'a SpiffeId,
    ca_id: &'a SpiffeId,
    node: &'a Held,
    opts: &'a IdentityOptions,
}

impl Joiner<'_> {
    async fn join_once(&self, token: &str) -> Result<TrustBundle, IdentityError> {
        let time = Arc::new(ClockTime(self.opts.clock.clone()));
        let bundle = join(self.cfg, self.node_id, self.ca_id, token, self.node, time).await?;
        record_used_token(&self.cfg.data_dir, token);
        Ok(bundle)
    }

    /// Joins, trying again with backoff while the CA cannot be reached. The token is sent
    /// only over a verified connection to the pinned CA, so it is spent at most once.
    async fn join_retrying(&self, token: &str) -> Result<TrustBundle, IdentityError> {
        let what = format!("joining the mesh as {}", self.cfg.node);
        retry_transient(self.opts, &self.cfg.ca_address, &what, || {
            self.join_once(token)
        })
        .await
    }
}

/// Runs `attempt` until it succeeds or fails for a reason other than an unreachable CA,
/// waiting 1s doubling to 60s between attempts, logging each, and reporting progress.
async fn retry_transient<T, F, Fut>(
    opts: &IdentityOptions,
    ca: &str,
    what: &str,
    mut attempt: F,
) -> Result<T, IdentityError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, IdentityError>>,
{
    let mut failures = 0u32;
    loop {
        if let Some(status) = &opts.status {
            status.set(Some(format!("{what} (CA {ca})")));
        }
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                failures = failures.saturating_add(1);
                if opts.max_start_attempts.is_some_and(|max| failures >= max) {
                    return Err(e);
                }
                let delay = retry_backoff(failures - 1);
                warn!(attempt = failures, retry_in = %humantime::format_duration(delay), error = %e, "{what}: the CA is not reachable yet; retrying");
                if let Some(status) = &opts.status {
                    status.set(Some(format!(
                        "{what}: {e} (attempt {failures}, next in {})",
                        humantime::format_duration(delay)
                    )));
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Inner {
    fn time(&self) -> Arc<dyn rustls::time_provider::TimeProvider> {
        Arc::new(ClockTime(self.clock.clone()))
    }

    /// A client authenticated with the node SVID, talking to `spiffe://TD/ca`.
    async fn node_client(&self) -> Result<ca_client::CaClient, IdentityError> {
        let tls = tls13_client_config_at(self.time())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle.clone(),
                ExpectedPeer::AnyOf(vec![self.ca_id.clone()]),
            )))
            .with_client_cert_resolver(self.node.identity.slot.clone());
        ca_client::connect(&self.cfg.ca_address, tls).await
    }

    /// Reports the bundle this node holds to the CA.
    async fn report(&self, bundle: &TrustBundle) -> Result<(), IdentityError> {
        let mut client = self.node_client().await?;
        client
            .report_bundle(BundleReport {
                sequence: bundle.sequence(),
                root_fingerprints: bundle.fingerprints(),
            })
            .await
            .map_err(|s| refused("ReportBundle", &self.cfg.ca_address, s))?;
        Ok(())
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
        .map_err(|s| refused(rpc, &self.cfg.ca_address, s))?
        .into_inner();
        // the answer carries the CA's bundle of that moment: take it first, so a certificate
        // under a root this node learns of only now verifies (and the denylist is current)
        if let Some(b) = resp.bundle.clone()
            && let Err(e) = self.apply_bundle(b)
        {
            warn!(error = %e, "trust bundle in the CA's answer ignored");
        }
        let bundle = self.bundle.load_full();
        accept_svid(
            &bundle,
            &held.identity.id,
            resp,
            &key,
            held,
            self.clock.now(),
        )?;
        Ok(())
    }

    /// Start-up with an expired node certificate: renew it with itself (the CA allows that
    /// within its `expired_renewal_grace`), trying again while the CA cannot be reached.
    async fn renew_expired_node(
        &self,
        not_after: SystemTime,
        opts: &IdentityOptions,
    ) -> Result<(), IdentityError> {
        warn!(node = %self.node_id, not_after = %rfc3339(not_after), "the node certificate in the data dir has expired (or is about to); renewing it");
        let what = format!("renewing the expired node certificate of {}", self.cfg.node);
        let result = retry_transient(opts, &self.cfg.ca_address, &what, || {
            self.request(&self.node, "RenewNode")
        })
        .await;
        match result {
            Ok(()) => {
                self.renewals.fetch_add(1, Ordering::Relaxed);
                info!(node = %self.node_id, "expired node certificate renewed");
                Ok(())
            }
            Err(e) => Err(self.expired_error(not_after, &e).unwrap_or(e)),
        }
    }

    /// The error to show when renewing an expired node certificate failed with `e`: what to do
    /// when the CA refuses it for good (None for other failures).
    fn expired_error(&self, not_after: SystemTime, e: &IdentityError) -> Option<IdentityError> {
        if e.is_transient() {
            return None;
        }
        let reason = match e {
            IdentityError::Refused { message, .. } => message.clone(),
            IdentityError::CaUnreachable { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        Some(IdentityError::NodeExpired {
            node: self.cfg.node.clone(),
            not_after: rfc3339(not_after),
            reason,
        })
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
        if next.same_content(&cur) {
            if next.sequence() != cur.sequence() {
                self.bundle.store(Arc::new(
                    TrustBundle::clone(&cur).with_sequence(next.sequence()),
                ));
            }
            return Ok(false);
        }
        store_bundle(&self.cfg.data_dir, &next)?;
        let next = Arc::new(next);
        self.bundle.store(next.clone());
        self.bundle_tx.send_replace(next);
        self.bundle_updates.fetch_add(1, Ordering::Relaxed);
        info!(
            sequence = msg.sequence,
            roots = msg.roots_der.len(),
            revoked = msg.revoked_nodes.len(),
            "trust bundle updated"
        );
        Ok(true)
    }
}

fn refused(rpc: &'static str, address: &str, s: tonic::Status) -> IdentityError {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown if s.message().contains("transport") => {
            IdentityError::CaUnreachable {
                address: address.to_owned(),
                transient: ca_client::is_transient(&s),
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
    TrustBundle::from_proto(msg).map_err(|e| IdentityError::BadResponse(e.to_string()))
}

/// Writes the bundle to the data dir: `bundle.json` (everything, read back at start) and
/// `bundle.pem` (the roots, for people and tools).
fn store_bundle(data_dir: &Path, bundle: &TrustBundle) -> Result<(), IdentityError> {
    pki::write_atomic(&data_dir.join("bundle.json"), &bundle.to_json(), 0o644)?;
    pki::write_atomic(
        &data_dir.join("bundle.pem"),
        pki::certs_to_pem(bundle.roots()).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Reads the bundle from the data dir: `bundle.json`, else the roots of `bundle.pem` (a data
/// dir from before bundles carried a hosting map; the CA's next message fills it in).
fn read_bundle(cfg: &IdentityConfig) -> Option<TrustBundle> {
    if let Ok(data) = fs::read(cfg.data_dir.join("bundle.json")) {
        match TrustBundle::from_json(&data) {
            Ok(b) if b.trust_domain() == cfg.trust_domain => return Some(b),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "bundle.json unreadable; using bundle.pem"),
        }
    }
    let roots = pki::read_pem_certs(&cfg.data_dir.join("bundle.pem")).ok()?;
    TrustBundle::new(&cfg.trust_domain, roots, 0).ok()
}

/// Joins: pinned TLS to the CA, JoinNode, then checks that the bundle holds the pinned root
/// and that the SVID verifies against it.
async fn join(
    cfg: &IdentityConfig,
    node_id: &SpiffeId,
    ca_id: &SpiffeId,
    token: &str,
    node: &Held,
    time: Arc<ClockTime>,
) -> Result<TrustBundle, IdentityError> {
    let (key, csr) = make_csr(node_id).map_err(|e| IdentityError::Key(e.to_string()))?;
    let now = time.0.now();
    let tls = tls13_client_config_at(time)
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
        .map_err(|s| refused("JoinNode", &cfg.ca_address, s))?
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
    accept_svid(&bundle, node_id, resp, &key, node, now)?;
    store_bundle(&cfg.data_dir, &bundle)?;
    info!(node = %node_id, ca = %cfg.ca_address, "joined the mesh");
    Ok(bundle)
}

/// Verifies an SVID response (chain to the bundle for both client and server use, exact ID,
/// our key) at `now`, then stores it on disk and in the slot.
fn accept_svid(
    bundle: &TrustBundle,
    want: &SpiffeId,
    resp: SvidResponse,
    key: &KeyPair,
    held: &Held,
    now: SystemTime,
) -> Result<(), IdentityError> {
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| IdentityError::BadResponse("empty certificate chain".into()))?;
    let at =
        unix_time(now).ok_or_else(|| IdentityError::Config("the clock is before 1970".into()))?;
    for usage in [Usage::Client, Usage::Server] {
        let id = verify_svid(bundle, leaf, rest, at, usage).map_err(|e| {
            IdentityError::BadResponse(format!(
                "issued certificate does not verify: {}",
                meshgate_ca::verify::describe_tls_error(&e)
            ))
        })?;
        if &id != want {
            return Err(IdentityError::BadResponse(format!(
                "asked for {want}, got {id}"
            )));
        }
    }
    held.identity
        .slot
        .set(chain.clone(), key.serialize_der())
        .map_err(|e| {
            IdentityError::BadResponse(format!("certificate does not match our key: {e}"))
        })?;
    if let Ok(mut at) = held.identity.arrived.lock() {
        *at = Some(now);
    }
    pki::write_atomic(&held.key, key.serialize_pem().as_bytes(), 0o600)?;
    pki::write_atomic(&held.crt, pki::certs_to_pem(&chain).as_bytes(), 0o644)?;
    Ok(())
}

/// Reads the bundle and the node SVID from the data dir.
fn load_from_disk(cfg: &IdentityConfig, node: &Held, now: SystemTime) -> OnDisk {
    let Some(bundle) = read_bundle(cfg) else {
        return OnDisk::Nothing;
    };
    match load_svid(
        &bundle,
        &node.identity.id,
        &node.crt,
        &node.key,
        &node.identity.slot,
        now,
    ) {
        Loaded::Valid => OnDisk::Valid(bundle),
        Loaded::Expired(not_after) => OnDisk::Expired(bundle, not_after),
        Loaded::Unusable => OnDisk::Nothing,
    }
}

/// After a failed re-join: the certificate on disk again (the join may have replaced nothing,
/// but never trust what a half-finished call left in the slot).
fn load_valid_again(cfg: &IdentityConfig, node: &Held, now: SystemTime) -> Option<TrustBundle> {
    match load_from_disk(cfg, node, now) {
        OnDisk::Valid(b) => Some(b),
        _ => None,
    }
}

/// What [`load_svid`] found.
enum Loaded {
    /// Valid for more than a minute; in the slot.
    Valid,
    /// Right identity and key, chains to the bundle, but expired or expiring within a minute;
    /// in the slot (it can still ask the CA to renew it).
    Expired(SystemTime),
    /// Missing, unreadable, for another identity or not from this trust domain.
    Unusable,
}

/// Loads one SVID from disk into `slot` if it verifies against `bundle` for `id` and matches
/// its key; tells whether it has more than a minute left at `now`.
fn load_svid(
    bundle: &TrustBundle,
    id: &SpiffeId,
    crt: &Path,
    key: &Path,
    slot: &CertSlot,
    now: SystemTime,
) -> Loaded {
    let Ok(chain) = pki::read_pem_certs(crt) else {
        return Loaded::Unusable;
    };
    let Ok(key_pem) = fs::read_to_string(key) else {
        return Loaded::Unusable;
    };
    let Ok(key) = KeyPair::from_pem(&key_pem) else {
        warn!(path = %key.display(), "unreadable private key; requesting a new certificate");
        return Loaded::Unusable;
    };
    let (leaf, rest) = chain
        .split_first()
        .expect("invariant: read_pem_certs returns at least one");
    let Ok(info) = CertInfo::from_der(leaf) else {
        return Loaded::Unusable;
    };
    let soon = now + Duration::from_secs(60);
    let expiring = info.not_after <= soon;
    // an expiring certificate is checked as it stood just before it expired
    let at = if expiring {
        info.not_after.checked_sub(Duration::from_secs(1))
    } else {
        Some(soon)
    };
    let Some(at) = at.and_then(unix_time) else {
        return Loaded::Unusable;
    };
    match verify_svid(bundle, leaf, rest, at, Usage::Client) {
        Ok(got) if &got == id => {
            if slot.set(chain, key.serialize_der()).is_err() {
                return Loaded::Unusable;
            }
            if expiring {
                Loaded::Expired(info.not_after)
            } else {
                Loaded::Valid
            }
        }
        _ => Loaded::Unusable,
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

/// Retry delay for renewing a certificate of `lifetime`: [`retry_backoff`], but never more
/// than an eighth of the lifetime (at least a second), so short-lived certificates get several
/// attempts before they expire.
pub fn renew_retry_delay(failures: u32, lifetime: Duration) -> Duration {
    retry_backoff(failures).min((lifetime / 8).max(Duration::from_secs(1)))
}

fn jitter() -> f64 {
    let b = (crate::rand::secure_u64() & 0xffff_ffff) as u32;
    (f64::from(b) / f64::from(u32::MAX)) * 2.0 - 1.0
}

/// Renews the node SVID (`held` = None) or a workload SVID forever.
async fn renew_loop(inner: Arc<Inner>, held: Option<Held>) {
    let held = held.as_ref().unwrap_or(&inner.node);
    let is_node = held.identity.id == inner.node_id;
    let rpc = if is_node { "RenewNode" } else { "SignWorkload" };
    let mut bundles = inner.bundle_tx.subscribe();
    loop {
        let Some(info) = held.identity.info() else {
            return;
        };
        // 2/3 of the lifetime counted from when this certificate arrived from the CA (a CA
        // back-dates its leaves by minutes, which near an intermediate's end — where leaves are
        // cut short — would put the renewal after the expiry; one loaded from disk counts from
        // its start); never less than a second between renewals, whatever it says
        let now = inner.clock.now();
        let start = match held.identity.arrived() {
            Some(at) => info.not_before.max(at),
            None => info.not_before,
        };
        let delay = renew_delay(start, info.not_after, now, jitter());
        let due = tokio::time::sleep(delay.max(Duration::from_secs(1)));
        tokio::pin!(due);
        loop {
            tokio::select! {
                () = &mut due => break,
                changed = bundles.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let bundle = bundles.borrow_and_update().clone();
                    if needs_reissue(&held.identity, &bundle, inner.clock.now()) {
                        // spread the renewals of a whole mesh over a moment
                        let spread = (info.lifetime() / 10).min(Duration::from_secs(2));
                        let wait = spread.mul_f64(jitter().abs());
                        info!(spiffe_id = %held.identity.id, signing_root = bundle.signing_root().unwrap_or("-"), "the CA signs under another root now; renewing at once");
                        tokio::time::sleep(wait).await;
                        break;
                    }
                }
            }
        }
        let mut failures = 0u32;
        let mut told_expired = false;
        loop {
            match inner.request(held, rpc).await {
                Ok(()) => {
                    inner.renewals.fetch_add(1, Ordering::Relaxed);
                    if held.identity.failure().is_some() {
                        info!(spiffe_id = %held.identity.id, "certificate renewed after failed attempts");
                    } else {
                        info!(spiffe_id = %held.identity.id, "certificate renewed");
                    }
                    held.identity.set_failure(None);
                    break;
                }
                Err(e) => {
                    inner.renew_failures.fetch_add(1, Ordering::Relaxed);
                    let now = inner.clock.now();
                    let expired = info.remaining(now).is_zero();
                    let since = held.identity.failure().map_or(now, |f| f.since);
                    held.identity.set_failure(Some(RenewFailure {
                        since,
                        error: e.to_string(),
                    }));
                    match (is_node && expired).then(|| inner.expired_error(info.not_after, &e)) {
                        Some(Some(hopeless)) if !told_expired => {
                            error!(spiffe_id = %held.identity.id, error = %hopeless, "the node certificate expired and cannot be renewed");
                            told_expired = true;
                        }
                        _ => {
                            warn!(spiffe_id = %held.identity.id, error = %e, expired, "certificate renewal failed; keeping the current one");
                        }
                    }
                    tokio::time::sleep(renew_retry_delay(failures, info.lifetime())).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
    }
}

/// Whether `identity`'s chain does not lead to the root the bundle says the CA signs under
/// now (through the intermediate right after the leaf): a root rotation moved on, so the
/// certificate should be renewed at once rather than at its usual time.
fn needs_reissue(identity: &Identity, bundle: &TrustBundle, now: SystemTime) -> bool {
    let Some(fp) = bundle.signing_root() else {
        return false;
    };
    let chain = identity.chain();
    let (Some(leaf), Some(int)) = (chain.first(), chain.get(1)) else {
        return false;
    };
    let Some(root) = bundle.roots().iter().find(|r| pki::fingerprint(r) == fp) else {
        return false;
    };
    let Ok(only) = TrustBundle::new(bundle.trust_domain(), vec![root.clone()], 0) else {
        return false;
    };
    let Some(at) = unix_time(now) else {
        return false;
    };
    verify_svid(&only, leaf, std::slice::from_ref(int), at, Usage::Client).is_err()
}

/// Tells the CA which bundle this node holds: the current one at start, then every one
/// applied (root rotation waits for these). Retries with backoff until it got through or a
/// newer bundle replaced it.
async fn report_bundles(inner: Arc<Inner>) {
    let mut rx = inner.bundle_tx.subscribe();
    let mut failures = 0u32;
    loop {
        let bundle = rx.borrow_and_update().clone();
        loop {
            match inner.report(&bundle).await {
                Ok(()) => {
                    failures = 0;
                    break;
                }
                Err(IdentityError::Refused {
                    code: tonic::Code::Unimplemented,
                    ..
                }) => {
                    info!("the CA does not take bundle reports (an older version); not reporting");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, sequence = bundle.sequence(), "could not report the held trust bundle to the CA; retrying");
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(retry_backoff(failures)) => {}
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            break;
                        }
                    }
                }
            }
        }
        if !rx.has_changed().unwrap_or(false) && rx.changed().await.is_err() {
            return;
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
                .map_err(|s| refused("TrustBundle", &inner.cfg.ca_address, s))?
                .into_inner();
            while let Some(msg) = stream
                .message()
                .await
                .map_err(|s| refused("TrustBundle", &inner.cfg.ca_address, s))?
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
        // short-lived certificates retry at least 8 times per lifetime, never faster than 1/s
        let got: Vec<u64> = (0..6)
            .map(|n| renew_retry_delay(n, Duration::from_secs(16)).as_secs())
            .collect();
        assert_eq!(got, vec![1, 2, 2, 2, 2, 2]);
        assert_eq!(
            renew_retry_delay(0, Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_retry_delay(9, Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn fingerprints_and_placeholders() {
        let zero = format!("sha256:{}", "0".repeat(64));
        assert!(fingerprint_syntax_ok(&zero) && fingerprint_is_placeholder(&zero));
        let real = format!("sha256:{}", "Ab".repeat(32));
        assert!(fingerprint_syntax_ok(&real) && !fingerprint_is_placeholder(&real));
        for bad in ["sha256:abc", "md5:00", "", "sha256:", &"0".repeat(71)] {
            assert!(!fingerprint_syntax_ok(bad), "{bad}");
        }
    }

    fn identity_valid(now: SystemTime, before: Duration, after: Duration) -> Identity {
        let id = SpiffeId::workload("mesh.example", "default", "web").expect("id");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.not_before = (now - before).into();
        params.not_after = (now + after).into();
        let cert = params.self_signed(&key).expect("cert");
        let i = Identity::new(id);
        i.slot
            .set(vec![cert.der().clone()], key.serialize_der())
            .expect("slot");
        i
    }

    #[test]
    fn problems_are_expiry_or_failing_renewal_in_the_last_quarter() {
        let now = SystemTime::now();
        let h = Duration::from_secs(3600);
        // healthy, and failing early in its lifetime: not a problem yet
        let i = identity_valid(now, h, 3 * h);
        assert_eq!(cert_problem(&i, "node-a", now), None);
        i.set_failure(Some(RenewFailure {
            since: now,
            error: "cannot reach the CA".into(),
        }));
        assert_eq!(cert_problem(&i, "node-a", now), None);
        // the last quarter with failing renewals: at risk, with the reason
        let i = identity_valid(now, 3 * h + h / 2, h / 2);
        assert_eq!(cert_problem(&i, "node-a", now), None, "renewal not failing");
        i.set_failure(Some(RenewFailure {
            since: now,
            error: "cannot reach the CA".into(),
        }));
        let p = cert_problem(&i, "node-a", now).expect("at risk");
        assert!(!p.expired && p.seconds_left > 0);
        assert!(
            p.message.contains("renewal fails") && p.message.contains("cannot reach the CA"),
            "{}",
            p.message
        );
        // expired: always a problem, with what to do
        let i = identity_valid(now, 2 * h, Duration::ZERO);
        let p = cert_problem(&i, "node-a", now + Duration::from_secs(1)).expect("expired");
        assert!(
            p.expired && p.message.contains("meshgate ca token create --node node-a"),
            "{}",
            p.message
        );
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
