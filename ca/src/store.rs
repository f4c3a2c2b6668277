//! The CA's state on disk: root and intermediate (keys 0600, written atomically), join tokens
//! (stored as SHA-256 hashes, single-use by atomic rename), the node registry (the namespace
//! and services of each node), revoked nodes, the bundle each node reported holding, the
//! bundle's sequence number and the issuance log. Root rotation keeps its own files
//! (see [`crate::rotation`]).
//!
//! Layout of `data_dir`:
//! ```text
//! root.crt  root.key  intermediate.crt  intermediate.key
//! intermediates/<serial>.crt         intermediates replaced by `ca intermediate rotate`
//! tokens/<sha256(token)>.json        unused token  (renamed to .used when consumed,
//!                                                   .revoked by `meshgate ca token revoke`)
//! nodes/<node>.json                  namespace and services the node may obtain SVIDs for
//! revoked/<node>.json                a revoked node and its certificates still valid then
//! reports/<node>.json                the trust bundle the node last said it holds
//! bundle.seq                         the bundle's sequence number and content digest
//! issued.log                         one JSON line per certificate issued
//! rotation/                          a root rotation in progress
//! ```
//!
//! A token's ID is the first 12 hex digits of its hash: `ca token list` shows it and
//! `ca token revoke` takes it, so the secret itself is never needed again.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::{
    pki::{self, CertInfo, PkiError},
    spiffe::{self, SpiffeError},
};

/// Root lifetime: 10 years.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Intermediate lifetime: 1 year.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The CA warns when its signing intermediate has less than this left.
pub const INTERMEDIATE_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// RFC 3339 UTC with seconds, e.g. `2026-11-27T22:40:00Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Unix seconds as RFC 3339.
pub(crate) fn rfc3339_unix(secs: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}
/// How far the root and intermediate are back-dated (clock skew between the CA and nodes).
pub const CA_BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of the on-disk CA state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `ca init` would overwrite a CA.
    #[error("a CA already exists in {dir} (root {fingerprint}); pass --force to replace it")]
    Exists {
        /// The data dir.
        dir: String,
        /// Fingerprint of the existing root.
        fingerprint: String,
    },
    /// No CA in the data dir.
    #[error("no CA in {0}: run `meshgate ca init --trust-domain TD --data-dir {0}` first")]
    Missing(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Bad trust domain or name.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// An operator's request cannot be carried out; the message says why and what to do.
    #[error("{0}")]
    Request(String),
    /// No node of that name has joined.
    #[error(
        "node {0:?} has not joined this CA (`meshgate ca node list` shows the nodes that have); a node that has not joined yet gets its services from its join token (--services)"
    )]
    UnknownNode(String),
    /// A stored file is not what we wrote.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The CA's keys and certificates, loaded.
pub struct CaMaterial {
    /// Trust domain, from the root's URI SAN.
    pub trust_domain: String,
    /// Root certificate.
    pub root: CertificateDer<'static>,
    /// Intermediate certificate.
    pub intermediate: CertificateDer<'static>,
    /// Intermediate key.
    pub intermediate_key: KeyPair,
}

impl CaMaterial {
    /// The root's fingerprint (`sha256:…`).
    pub fn root_fingerprint(&self) -> String {
        pki::fingerprint(&self.root)
    }
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("trust_domain", &self.trust_domain)
            .field("root", &pki::fingerprint(&self.root))
            .finish_non_exhaustive()
    }
}

/// The result of `ca init`.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    /// Trust domain.
    pub trust_domain: String,
    /// Root fingerprint (`sha256:…`), what agents pin.
    pub ca_fingerprint: String,
    /// Root expiry, RFC 3339.
    pub root_not_after: String,
    /// Intermediate expiry, RFC 3339.
    pub intermediate_not_after: String,
}

pub(crate) fn ca_params(
    trust_domain: &str,
    cn: &str,
    now: SystemTime,
    ttl: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, StoreError> {
    let mut params = CertificateParams::default();
    // CA certificates live for years: back-date them by an hour so that nodes whose clocks run
    // behind can verify a CA created a moment ago.
    params.not_before = (now - CA_BACKDATE).into();
    params.not_after = (now + ttl).into();
    let mut serial = pki::random_bytes::<16>();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshgate");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Creates a root (ECDSA P-256, 10 years, URI SAN `spiffe://TD`) and a signing intermediate
/// (1 year) in `dir`. Refuses to replace an existing CA unless `force`.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    force: bool,
    now: SystemTime,
) -> Result<InitReport, StoreError> {
    spiffe::validate_trust_domain(trust_domain)?;
    if dir.join("root.key").exists() && !force {
        let fingerprint = pki::read_pem_certs(&dir.join("root.crt"))
            .ok()
            .and_then(|c| c.first().map(|r| pki::fingerprint(r)))
            .unwrap_or_else(|| "unreadable".into());
        return Err(StoreError::Exists {
            dir: dir.display().to_string(),
            fingerprint,
        });
    }
    pki::create_private_dir(dir)?;
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let root_key = KeyPair::generate_for(alg)?;
    let root_params = ca_params(
        trust_domain,
        &format!("meshgate root CA {trust_domain}"),
        now,
        ROOT_TTL,
        Some(1),
    )?;
    let root = root_params.self_signed(&root_key)?;
    let int_key = KeyPair::generate_for(alg)?;
    let int_params = ca_params(
        trust_domain,
        &format!("meshgate intermediate CA {trust_domain}"),
        now,
        INTERMEDIATE_TTL,
        Some(0),
    )?;
    let root_issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let intermediate = int_params.signed_by(&int_key, &root_issuer)?;

    // Keys first, certificates last: a CA without root.crt is not loadable, never half-valid.
    pki::write_atomic(
        &dir.join("root.key"),
        root_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    pki::write_atomic(
        &dir.join("intermediate.key"),
        int_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    pki::write_atomic(
        &dir.join("intermediate.crt"),
        intermediate.pem().as_bytes(),
        0o644,
    )?;
    pki::write_atomic(&dir.join("root.crt"), root.pem().as_bytes(), 0o644)?;
    Ok(InitReport {
        trust_domain: trust_domain.to_owned(),
        ca_fingerprint: pki::fingerprint(root.der()),
        root_not_after: rfc3339(now + ROOT_TTL),
        intermediate_not_after: rfc3339(now + INTERMEDIATE_TTL),
    })
}

/// A key from a PEM file.
pub(crate) fn load_key(path: &Path) -> Result<KeyPair, StoreError> {
    let pem = fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })?;
    KeyPair::from_pem(&pem).map_err(|e| StoreError::Corrupt {
        path: path.display().to_string(),
        reason: format!("not a usable private key ({e})"),
    })
}

/// What `ca intermediate rotate` did.
#[derive(Debug, Clone, Serialize)]
pub struct IntermediateReport {
    /// Serial of the new intermediate, hex.
    pub serial: String,
    /// Its expiry, RFC 3339.
    pub not_after: String,
    /// Serial of the one it replaced (kept as `intermediates/SERIAL.crt`).
    pub replaced: String,
    /// When the replaced one expires, RFC 3339: leaves it signed stay valid until their own
    /// expiry, which is never later.
    pub replaced_not_after: String,
}

/// Makes a new signing intermediate (ECDSA P-256, valid `ttl` from `now`) signed by the root
/// in `dir`, and puts it in place of the current one, which is kept under `intermediates/`.
/// A running `ca serve` loads it within its `reload_interval` (or at once on SIGHUP); nodes
/// renew onto it on their usual schedule, without joining again. Refused during a root
/// rotation (which brings its own intermediate).
pub fn rotate_intermediate(
    dir: &Path,
    ttl: Duration,
    now: SystemTime,
) -> Result<IntermediateReport, StoreError> {
    let ca = load(dir)?;
    if crate::rotation::in_progress(dir) {
        return Err(StoreError::Request(
            "a root rotation is in progress and brings its own intermediate: finish or abort it first (`meshgate ca rotate status`)".into(),
        ));
    }
    if ttl < Duration::from_secs(10) {
        return Err(StoreError::Request(format!(
            "--ttl {} is too short for an intermediate: give at least 10s (the default is 1y; every leaf ends when it does)",
            humantime::format_duration(ttl)
        )));
    }
    let root_info = CertInfo::from_der(&ca.root)?;
    let not_after = (now + ttl).min(root_info.not_after);
    let root_key = load_key(&dir.join("root.key"))?;
    let root_issuer = rcgen::Issuer::from_ca_cert_der(&ca.root, root_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(
        &ca.trust_domain,
        &format!("meshgate intermediate CA {}", ca.trust_domain),
        now,
        ttl,
        Some(0),
    )?;
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &root_issuer)?;
    let old = CertInfo::from_der(&ca.intermediate)?;
    let archive = dir.join("intermediates");
    pki::create_private_dir(&archive)?;
    pki::write_atomic(
        &archive.join(format!("{}.crt", old.serial)),
        pki::certs_to_pem(std::slice::from_ref(&ca.intermediate)).as_bytes(),
        0o644,
    )?;
    // key first: a loader that sees the new key with the old certificate refuses the pair
    // and tries again on its next look
    pki::write_atomic(
        &dir.join("intermediate.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    pki::write_atomic(&dir.join("intermediate.crt"), cert.pem().as_bytes(), 0o644)?;
    let new = CertInfo::from_der(cert.der())?;
    Ok(IntermediateReport {
        serial: new.serial,
        not_after: rfc3339(new.not_after),
        replaced: old.serial,
        replaced_not_after: rfc3339(old.not_after),
    })
}

/// Loads the CA from `dir`.
pub fn load(dir: &Path) -> Result<CaMaterial, StoreError> {
    let root_path = dir.join("root.crt");
    if !root_path.exists() {
        return Err(StoreError::Missing(dir.display().to_string()));
    }
    let root = first_cert(&root_path)?;
    let intermediate = first_cert(&dir.join("intermediate.crt"))?;
    let intermediate_key = load_key(&dir.join("intermediate.key"))?;
    let info = CertInfo::from_der(&root)?;
    let trust_domain = info
        .uris
        .iter()
        .find_map(|u| u.strip_prefix("spiffe://"))
        .map(|td| td.trim_end_matches('/').to_owned())
        .ok_or_else(|| StoreError::Corrupt {
            path: root_path.display().to_string(),
            reason: "root has no spiffe://TRUST-DOMAIN URI SAN".into(),
        })?;
    Ok(CaMaterial {
        trust_domain,
        root,
        intermediate,
        intermediate_key,
    })
}

pub(crate) fn first_cert(path: &Path) -> Result<CertificateDer<'static>, StoreError> {
    Ok(pki::read_pem_certs(path)?.remove(0))
}

/// A join token's stored record (the token itself is never stored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// The node the token is bound to.
    pub node: String,
    /// The node's namespace: every workload certificate it obtains is in it. Absent in tokens
    /// made before namespaces were bound (then: the namespace of the services, else `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Services (`ns/svc`) the node may obtain workload SVIDs for.
    pub services: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

/// A token just created: the secret (shown once) and its record.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The secret to hand to the node; printed once, never stored.
    pub token: String,
    /// What was stored.
    pub record: TokenRecord,
}

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No such token (never issued, or purged).
    #[error("unknown join token")]
    Unknown,
    /// Already consumed by a join.
    #[error("join token already used")]
    AlreadyUsed,
    /// Past its expiry.
    #[error("join token expired at {0}")]
    Expired(String),
    /// Revoked by an operator.
    #[error("join token was revoked")]
    Revoked,
    /// Bound to a different node.
    #[error("join token is for node {expected:?}, not {got:?}")]
    WrongNode {
        /// The node the token names.
        expected: String,
        /// The node that asked.
        got: String,
    },
    /// Storage failed.
    #[error("token store: {0}")]
    Store(String),
}

/// Normalizes a service scope entry: `svc` -> `default/svc`, `ns/svc` kept.
pub fn normalize_service(s: &str) -> Result<String, SpiffeError> {
    let (ns, svc) = s.split_once('/').unwrap_or(("default", s));
    spiffe::validate_segment(ns)?;
    spiffe::validate_segment(svc)?;
    Ok(format!("{ns}/{svc}"))
}

/// A node's namespace and services from what an operator typed: `namespace` (default: the one
/// the `ns/svc` entries name, else `default`) and services as `svc` or `ns/svc`, which must
/// all be in that namespace (a node has exactly one). Returns the namespace and `ns/svc` list.
pub fn scope(
    namespace: Option<&str>,
    services: &[String],
) -> Result<(String, Vec<String>), StoreError> {
    let explicit: BTreeSet<&str> = services
        .iter()
        .filter_map(|s| s.split_once('/').map(|(ns, _)| ns))
        .collect();
    let ns = match (namespace, explicit.len()) {
        (Some(ns), _) => ns.to_owned(),
        (None, 0) => "default".to_owned(),
        (None, 1) => explicit
            .iter()
            .next()
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
        (None, _) => {
            let list: Vec<&str> = explicit.into_iter().collect();
            return Err(StoreError::Request(format!(
                "the services name namespaces {}: a node has exactly one namespace (--namespace), so give each namespace's services to their own node",
                list.join(" and ")
            )));
        }
    };
    spiffe::validate_segment(&ns)?;
    let mut out = Vec::with_capacity(services.len());
    for s in services {
        let full = match s.split_once('/') {
            Some(_) => normalize_service(s)?,
            None => normalize_service(&format!("{ns}/{s}"))?,
        };
        if !full.starts_with(&format!("{ns}/")) {
            let other = full.split_once('/').map_or("", |(n, _)| n);
            return Err(StoreError::Request(format!(
                "service {s} is in namespace {other}, but this node's namespace is {ns}: a node has exactly one namespace (--namespace), so list its services as NAME or {ns}/NAME"
            )));
        }
        out.push(full);
    }
    Ok((ns, out))
}

/// The namespace of a stored scope: `namespace` if recorded, else the one every service
/// names, else `default` (records made before namespaces were bound).
fn scope_namespace(namespace: &Option<String>, services: &[String]) -> String {
    if let Some(ns) = namespace {
        return ns.clone();
    }
    let mut names = services
        .iter()
        .filter_map(|s| s.split_once('/').map(|(n, _)| n));
    match names.next() {
        Some(first) if names.all(|n| n == first) => first.to_owned(),
        _ => "default".to_owned(),
    }
}

impl TokenRecord {
    /// The namespace the token binds its node to.
    pub fn namespace(&self) -> String {
        scope_namespace(&self.namespace, &self.services)
    }
}

/// Join tokens in `data_dir/tokens`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenStore {
    /// The token store of a CA data dir.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tokens"),
        }
    }

    fn path(&self, token: &str, ext: &str) -> PathBuf {
        self.dir
            .join(format!("{}.{ext}", pki::sha256_hex(token.as_bytes())))
    }

    /// Creates a single-use token for `node`, valid for `ttl` from `now`. The node's namespace
    /// is `namespace` (default: the namespace its services name, else `default`); see
    /// [`scope`].
    pub fn create(
        &self,
        node: &str,
        namespace: Option<&str>,
        services: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        spiffe::validate_segment(node)?;
        let (namespace, services) = scope(namespace, services)?;
        pki::create_private_dir(&self.dir)?;
        let token = format!(
            "mgjt_{}",
            data_encoding::HEXLOWER.encode(&pki::random_bytes::<32>())
        );
        let record = TokenRecord {
            node: node.to_owned(),
            namespace: Some(namespace),
            services,
            created_at: unix(now),
            expires_at: unix(now + ttl),
        };
        let json = serde_json::to_vec_pretty(&record).expect("invariant: record serializes");
        pki::write_atomic(&self.path(&token, "json"), &json, 0o600)?;
        Ok(NewToken { token, record })
    }

    /// Checks a token for `node` at `now` and consumes it; exactly one caller can succeed.
    pub fn consume(
        &self,
        token: &str,
        node: &str,
        now: SystemTime,
    ) -> Result<TokenRecord, TokenError> {
        let path = self.path(token, "json");
        let used = self.path(token, "used");
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(_) if used.exists() => return Err(TokenError::AlreadyUsed),
            Err(_) if self.path(token, "revoked").exists() => return Err(TokenError::Revoked),
            Err(_) => return Err(TokenError::Unknown),
        };
        let record: TokenRecord =
            serde_json::from_slice(&data).map_err(|e| TokenError::Store(e.to_string()))?;
        if record.node != node {
            return Err(TokenError::WrongNode {
                expected: record.node,
                got: node.to_owned(),
            });
        }
        if unix(now) >= record.expires_at {
            return Err(TokenError::Expired(rfc3339_unix(record.expires_at)));
        }
        match fs::rename(&path, &used) {
            Ok(()) => Ok(record),
            Err(_) => Err(TokenError::AlreadyUsed),
        }
    }
}

/// What became of a join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// Not used yet and not expired.
    Unused,
    /// Consumed by a join.
    Used,
    /// Not used before it expired.
    Expired,
    /// Revoked by an operator.
    Revoked,
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unused => "unused",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        })
    }
}

/// One token as `ca token list` shows it (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenSummary {
    /// First 12 hex digits of the token's SHA-256: what `ca token revoke` takes.
    pub id: String,
    /// The node it is for.
    pub node: String,
    /// The namespace it binds the node to.
    pub namespace: String,
    /// Services it grants.
    pub services: Vec<String>,
    /// Its state at the time of listing.
    pub state: TokenState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// Length of a token ID in hex digits.
pub const TOKEN_ID_LEN: usize = 12;

impl TokenStore {
    /// Every token ever created here (unused, used, expired, revoked), newest first.
    pub fn list(&self, now: SystemTime) -> Result<Vec<TokenSummary>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Pki(PkiError::Io {
                    path: self.dir.display().to_string(),
                    source,
                }));
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let (Some(stem), Some(ext)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let state = match ext {
                "json" => TokenState::Unused,
                "used" => TokenState::Used,
                "revoked" => TokenState::Revoked,
                _ => continue,
            };
            let Ok(data) = fs::read(&path) else { continue };
            let Ok(record) = serde_json::from_slice::<TokenRecord>(&data) else {
                continue;
            };
            let state = if state == TokenState::Unused && unix(now) >= record.expires_at {
                TokenState::Expired
            } else {
                state
            };
            out.push((
                record.created_at,
                TokenSummary {
                    id: stem.chars().take(TOKEN_ID_LEN).collect(),
                    namespace: record.namespace(),
                    node: record.node,
                    services: record.services,
                    state,
                    created_at: rfc3339_unix(record.created_at),
                    expires_at: rfc3339_unix(record.expires_at),
                },
            ));
        }
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }

    /// Revokes the unused token whose ID (or a unique prefix of at least 6 digits) is `id`:
    /// a join with it is refused from now on. Returns its summary.
    pub fn revoke(&self, id: &str, now: SystemTime) -> Result<TokenSummary, StoreError> {
        let id = id.trim().to_ascii_lowercase();
        let bad = StoreError::Request;
        if id.len() < 6 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "{id:?} is not a token ID: give at least 6 of the hex digits `meshgate ca token list` shows"
            )));
        }
        let matches: Vec<TokenSummary> = self
            .list(now)?
            .into_iter()
            .filter(|t| t.id.starts_with(&id))
            .collect();
        let token = match matches.as_slice() {
            [] => {
                return Err(bad(format!(
                    "no token with ID {id}; `meshgate ca token list` shows them"
                )));
            }
            [one] => one.clone(),
            _ => {
                return Err(bad(format!(
                    "{} tokens have IDs starting with {id}: give more digits",
                    matches.len()
                )));
            }
        };
        match token.state {
            TokenState::Unused | TokenState::Expired => {}
            TokenState::Used => {
                return Err(bad(format!(
                    "token {} was already used by node {}: to stop that node, run `meshgate ca node remove {}`",
                    token.id, token.node, token.node
                )));
            }
            TokenState::Revoked => return Ok(token),
        }
        let file = fs::read_dir(&self.dir)
            .map_err(|source| PkiError::Io {
                path: self.dir.display().to_string(),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && p.file_stem()
                        .and_then(|s| s.to_str())
                        .is_some_and(|s| s.starts_with(&token.id))
            })
            .ok_or_else(|| bad(format!("token {} changed while revoking it", token.id)))?;
        fs::rename(&file, file.with_extension("revoked")).map_err(|source| PkiError::Io {
            path: file.display().to_string(),
            source,
        })?;
        Ok(TokenSummary {
            state: TokenState::Revoked,
            ..token
        })
    }
}

/// A node's registration: its namespace and the services it may obtain workload SVIDs for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The namespace fixed at join by the node's token (absent in records made before
    /// namespaces were bound; see [`NodeRecord::namespace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Services as `ns/svc`.
    pub services: Vec<String>,
    /// Unix seconds of the last join.
    pub joined_at: u64,
}

impl NodeRecord {
    /// The node's namespace: the one recorded at join, else the one its services name, else
    /// `default`.
    pub fn namespace(&self) -> String {
        scope_namespace(&self.namespace, &self.services)
    }
}

/// The node registry in `data_dir/nodes`.
#[derive(Debug, Clone)]
pub struct NodeRegistry {
    dir: PathBuf,
}

impl NodeRegistry {
    /// The registry of a CA data dir.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("nodes"),
        }
    }

    /// Records (or replaces) a node's namespace and services at join.
    pub fn register(
        &self,
        node: &str,
        namespace: &str,
        services: &[String],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        spiffe::validate_segment(node)?;
        pki::create_private_dir(&self.dir)?;
        let rec = NodeRecord {
            namespace: Some(namespace.to_owned()),
            services: services.to_vec(),
            joined_at: unix(now),
        };
        let json = serde_json::to_vec_pretty(&rec).expect("invariant: record serializes");
        pki::write_atomic(&self.dir.join(format!("{node}.json")), &json, 0o600)?;
        Ok(())
    }

    /// A node's record, if it joined.
    pub fn get(&self, node: &str) -> Option<NodeRecord> {
        spiffe::validate_segment(node).ok()?;
        let data = fs::read(self.dir.join(format!("{node}.json"))).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Replaces the services a node that has joined may obtain SVIDs for (`svc` means a
    /// service in the node's namespace, which stays what its token fixed). The CA reads the
    /// registry on every request, so this applies at once, without a new token and without
    /// touching the node's data dir.
    pub fn set_services(&self, node: &str, services: &[String]) -> Result<NodeRecord, StoreError> {
        let Some(mut rec) = self.get(node) else {
            return Err(StoreError::UnknownNode(node.to_owned()));
        };
        let namespace = rec.namespace();
        let (_, services) = scope(Some(&namespace), services)?;
        rec.namespace = Some(namespace);
        rec.services = services;
        let json = serde_json::to_vec_pretty(&rec).expect("invariant: record serializes");
        pki::write_atomic(&self.dir.join(format!("{node}.json")), &json, 0o600)?;
        Ok(rec)
    }

    /// Forgets a node: the CA refuses its renewals and workload requests from now on, so it
    /// loses its identity when its current certificates expire. Returns whether it was known.
    pub fn remove(&self, node: &str) -> Result<bool, StoreError> {
        spiffe::validate_segment(node)?;
        let path = self.dir.join(format!("{node}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Pki(PkiError::Io {
                path: path.display().to_string(),
                source,
            })),
        }
    }

    /// Every registered node and its record, by name.
    pub fn list(&self) -> Vec<(String, NodeRecord)> {
        let mut out: Vec<(String, NodeRecord)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                if path.extension()? != "json" {
                    return None;
                }
                let name = path.file_stem()?.to_str()?.to_owned();
                let rec = self.get(&name)?;
                Some((name, rec))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// One line of `issued.log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Serial, hex.
    pub serial: String,
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// The node that asked.
    pub node: String,
    /// RFC 3339.
    pub not_after: String,
    /// Fingerprint of the root the certificate chains to (absent in lines written before root
    /// rotation existed: those count as signed under the root that was in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

impl IssuedRecord {
    /// `not_after` as a time (the epoch if unreadable, so a bad line never blocks anything).
    pub fn expires(&self) -> SystemTime {
        humantime::parse_rfc3339(&self.not_after).unwrap_or(UNIX_EPOCH)
    }
}

/// Appends to `data_dir/issued.log` (0600).
pub fn append_issued(data_dir: &Path, rec: &IssuedRecord) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("issued.log");
    let mut line = serde_json::to_vec(rec).expect("invariant: record serializes");
    line.push(b'\n');
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&line))
        .map_err(|source| PkiError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// Every certificate in `data_dir/issued.log` still valid at `now` (unreadable lines skipped).
pub fn issued_alive(data_dir: &Path, now: SystemTime) -> Vec<IssuedRecord> {
    let Ok(text) = fs::read_to_string(data_dir.join("issued.log")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<IssuedRecord>(l).ok())
        .filter(|r| r.expires() > now)
        .collect()
}

/// One certificate of a revoked node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevokedSerial {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Unix seconds of its expiry: it leaves the denylist then.
    pub not_after: u64,
}

/// `revoked/<node>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevokedRecord {
    /// Unix seconds of the revocation.
    pub revoked_at: u64,
    /// Whether the node name itself is still refused (false once `ca node remove` let it join
    /// again; its old certificates stay refused until they expire).
    pub node_refused: bool,
    /// The node's certificates that were valid when it was revoked.
    pub serials: Vec<RevokedSerial>,
}

/// Revoked nodes, in `data_dir/revoked`.
#[derive(Debug, Clone)]
pub struct Denylist {
    dir: PathBuf,
}

impl Denylist {
    /// The denylist of a CA data dir.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("revoked"),
        }
    }

    fn path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.json"))
    }

    /// Revokes `node`: its name and every certificate issued to it that is still valid at
    /// `now` (from the issuance log) go on the denylist that travels with the trust bundle.
    /// Returns the record; revoking again adds certificates issued since.
    pub fn revoke(&self, node: &str, now: SystemTime) -> Result<RevokedRecord, StoreError> {
        spiffe::validate_segment(node)?;
        let data_dir = self.dir.parent().unwrap_or_else(|| Path::new("."));
        let mut serials: Vec<RevokedSerial> = issued_alive(data_dir, now)
            .into_iter()
            .filter(|r| r.node == node)
            .map(|r| RevokedSerial {
                not_after: unix(r.expires()),
                serial: r.serial.to_ascii_lowercase(),
                spiffe_id: r.spiffe_id,
            })
            .collect();
        let mut rec = self.get(node).unwrap_or(RevokedRecord {
            revoked_at: unix(now),
            node_refused: true,
            serials: Vec::new(),
        });
        rec.node_refused = true;
        serials.retain(|s| !rec.serials.iter().any(|o| o.serial == s.serial));
        rec.serials.extend(serials);
        pki::create_private_dir(&self.dir)?;
        let json = serde_json::to_vec_pretty(&rec).expect("invariant: record serializes");
        pki::write_atomic(&self.path(node), &json, 0o600)?;
        Ok(rec)
    }

    /// The record of `node`, if it was ever revoked.
    pub fn get(&self, node: &str) -> Option<RevokedRecord> {
        spiffe::validate_segment(node).ok()?;
        let data = fs::read(self.path(node)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// When `node` was revoked, if its name is refused now.
    pub fn refused(&self, node: &str) -> Option<SystemTime> {
        self.get(node)
            .filter(|r| r.node_refused)
            .map(|r| UNIX_EPOCH + Duration::from_secs(r.revoked_at))
    }

    /// Lets `node` join again (its old certificates stay refused until they expire). Returns
    /// whether it was refused.
    pub fn release(&self, node: &str) -> Result<bool, StoreError> {
        let Some(mut rec) = self.get(node) else {
            return Ok(false);
        };
        let was = rec.node_refused;
        rec.node_refused = false;
        let json = serde_json::to_vec_pretty(&rec).expect("invariant: record serializes");
        pki::write_atomic(&self.path(node), &json, 0o600)?;
        Ok(was)
    }

    /// Every record, by node; records whose certificates all expired and whose node may join
    /// again are deleted on the way.
    pub fn list(&self, now: SystemTime) -> Vec<(String, RevokedRecord)> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let Some(mut rec) = self.get(&name) else {
                continue;
            };
            rec.serials.retain(|s| s.not_after > unix(now));
            if !rec.node_refused && rec.serials.is_empty() {
                let _ = fs::remove_file(&path);
                continue;
            }
            out.push((name, rec));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// `reports/<node>.json`: the trust bundle a node last said it holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleReportRecord {
    /// The bundle's sequence.
    pub sequence: u64,
    /// Fingerprints of its roots.
    pub roots: Vec<String>,
    /// Unix seconds of the report.
    pub at: u64,
}

/// What nodes report holding, in `data_dir/reports`.
#[derive(Debug, Clone)]
pub struct Reports {
    dir: PathBuf,
}

impl Reports {
    /// The reports of a CA data dir.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("reports"),
        }
    }

    /// Records that `node` holds the bundle of `sequence` with `roots`.
    pub fn record(
        &self,
        node: &str,
        sequence: u64,
        roots: Vec<String>,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        spiffe::validate_segment(node)?;
        pki::create_private_dir(&self.dir)?;
        let rec = BundleReportRecord {
            sequence,
            roots,
            at: unix(now),
        };
        if self
            .get(node)
            .is_some_and(|r| r.sequence == rec.sequence && r.roots == rec.roots)
        {
            return Ok(());
        }
        let json = serde_json::to_vec(&rec).expect("invariant: record serializes");
        pki::write_atomic(&self.dir.join(format!("{node}.json")), &json, 0o600)?;
        Ok(())
    }

    /// What `node` last reported.
    pub fn get(&self, node: &str) -> Option<BundleReportRecord> {
        spiffe::validate_segment(node).ok()?;
        let data = fs::read(self.dir.join(format!("{node}.json"))).ok()?;
        serde_json::from_slice(&data).ok()
    }
}

/// The sequence number for a bundle whose content digest is `digest`: the stored one if the
/// content did not change, else one more (stored in `data_dir/bundle.seq`). Sequences so grow
/// across restarts of the CA and agree between replicas that share the data dir.
pub fn bundle_sequence(data_dir: &Path, digest: &str) -> Result<u64, StoreError> {
    let path = data_dir.join("bundle.seq");
    let stored = fs::read_to_string(&path).ok().and_then(|t| {
        let (seq, dig) = t.trim().split_once(' ')?;
        Some((seq.parse::<u64>().ok()?, dig.to_owned()))
    });
    match stored {
        Some((seq, dig)) if dig == digest => Ok(seq),
        other => {
            let seq = other.map_or(1, |(s, _)| s + 1);
            pki::write_atomic(&path, format!("{seq} {digest}\n").as_bytes(), 0o644)?;
            Ok(seq)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_private_keys_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let report = init(dir.path(), "mesh.example", false, now).expect("init");
        for key in ["root.key", "intermediate.key"] {
            let mode = fs::metadata(dir.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let err = init(dir.path(), "mesh.example", false, now)
            .expect_err("exists")
            .to_string();
        assert!(
            err.contains("--force") && err.contains(&report.ca_fingerprint),
            "{err}"
        );
        let again = init(dir.path(), "mesh.example", true, now).expect("force");
        assert_ne!(again.ca_fingerprint, report.ca_fingerprint);

        let ca = load(dir.path()).expect("load");
        assert_eq!(ca.trust_domain, "mesh.example");
        assert_eq!(pki::fingerprint(&ca.root), again.ca_fingerprint);
        let root = CertInfo::from_der(&ca.root).expect("root");
        assert!(root.is_ca);
        assert_eq!(root.uris, vec!["spiffe://mesh.example".to_string()]);
        let years = root.lifetime().as_secs() / (365 * 24 * 3600);
        assert_eq!(years, 10);
        let int = CertInfo::from_der(&ca.intermediate).expect("int");
        assert_eq!(int.lifetime().as_secs() / (24 * 3600), 365);
    }

    #[test]
    fn tokens_are_single_use_bound_and_expiring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::new(dir.path());
        let now = SystemTime::now();
        let t = store
            .create(
                "node-a",
                Some("prod"),
                &["web".into(), "prod/users".into()],
                Duration::from_secs(3600),
                now,
            )
            .expect("create");
        assert_eq!(t.record.services, vec!["prod/web", "prod/users"]);
        assert_eq!(t.record.namespace(), "prod");
        // the secret is not on disk
        for e in fs::read_dir(dir.path().join("tokens")).expect("ls") {
            let body = fs::read_to_string(e.expect("entry").path()).expect("read");
            assert!(!body.contains(&t.token));
        }
        assert_eq!(
            store.consume(&t.token, "node-b", now),
            Err(TokenError::WrongNode {
                expected: "node-a".into(),
                got: "node-b".into()
            })
        );
        assert!(matches!(
            store.consume(&t.token, "node-a", now + Duration::from_secs(3600)),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(
            store.consume(&t.token, "node-a", now).expect("ok").node,
            "node-a"
        );
        assert_eq!(
            store.consume(&t.token, "node-a", now),
            Err(TokenError::AlreadyUsed)
        );
        assert_eq!(
            store.consume("mgjt_nope", "node-a", now),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn tokens_are_listed_without_secrets_and_revoked_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::new(dir.path());
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let a = store
            .create("node-a", None, &["web".into()], hour, now)
            .expect("a");
        let b = store
            .create("node-b", None, &[], hour, now - 2 * hour)
            .expect("b");
        let c = store.create("node-c", None, &[], hour, now).expect("c");
        store.consume(&c.token, "node-c", now).expect("used");
        let list = store.list(now).expect("list");
        let state = |node: &str| list.iter().find(|t| t.node == node).map(|t| t.state);
        assert_eq!(state("node-a"), Some(TokenState::Unused));
        assert_eq!(state("node-b"), Some(TokenState::Expired));
        assert_eq!(state("node-c"), Some(TokenState::Used));
        let id = list
            .iter()
            .find(|t| t.node == "node-a")
            .map(|t| t.id.clone())
            .expect("id");
        assert_eq!(id.len(), TOKEN_ID_LEN);
        assert!(a.token.len() > id.len() && !a.token.contains(&id));
        let used = list
            .iter()
            .find(|t| t.node == "node-c")
            .expect("c")
            .id
            .clone();
        let err = store.revoke(&used, now).expect_err("used").to_string();
        assert!(err.contains("meshgate ca node remove node-c"), "{err}");
        assert!(store.revoke("12", now).is_err(), "too short");
        assert_eq!(
            store.revoke(&id[..6], now).expect("revoke").state,
            TokenState::Revoked
        );
        assert_eq!(
            store.consume(&a.token, "node-a", now),
            Err(TokenError::Revoked)
        );
        let _ = b;
    }

    #[test]
    fn node_services_change_and_nodes_can_be_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = NodeRegistry::new(dir.path());
        let now = SystemTime::now();
        assert!(matches!(
            nodes.set_services("node-a", &["web".into()]),
            Err(StoreError::UnknownNode(_))
        ));
        nodes
            .register("node-a", "default", &["default/web".into()], now)
            .expect("register");
        let rec = nodes
            .set_services("node-a", &["web".into(), "default/users".into()])
            .expect("set");
        assert_eq!(rec.services, ["default/web", "default/users"]);
        assert_eq!(nodes.get("node-a").expect("get").services, rec.services);
        assert!(nodes.set_services("node-a", &["a/b/c".into()]).is_err());
        let err = nodes
            .set_services("node-a", &["prod/users".into()])
            .expect_err("another namespace")
            .to_string();
        assert!(err.contains("exactly one namespace"), "{err}");
        assert_eq!(nodes.list().len(), 1);
        assert!(nodes.remove("node-a").expect("remove"));
        assert!(!nodes.remove("node-a").expect("again"));
        assert!(nodes.get("node-a").is_none());
    }

    #[test]
    fn scopes_bind_one_namespace() {
        // (--namespace, --services, namespace or error, services)
        type Case<'a> = (
            Option<&'a str>,
            &'a [&'a str],
            Result<&'a str, &'a str>,
            &'a [&'a str],
        );
        let cases: &[Case<'_>] = &[
            (None, &["web"], Ok("default"), &["default/web"]),
            (None, &[], Ok("default"), &[]),
            (
                None,
                &["prod/web", "prod/api"],
                Ok("prod"),
                &["prod/web", "prod/api"],
            ),
            (
                Some("prod"),
                &["web", "prod/api"],
                Ok("prod"),
                &["prod/web", "prod/api"],
            ),
            (
                None,
                &["api", "prod/web"],
                Ok("prod"),
                &["prod/api", "prod/web"],
            ),
            (
                None,
                &["prod/web", "other/api"],
                Err("exactly one namespace"),
                &[],
            ),
            (Some("prod"), &["other/web"], Err("namespace other"), &[]),
            (Some("a/b"), &["web"], Err("invalid path segment"), &[]),
        ];
        for (ns, services, want, list) in cases {
            let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
            match (scope(*ns, &services), want) {
                (Ok((got_ns, got)), Ok(w)) => {
                    let got: Vec<&str> = got.iter().map(String::as_str).collect();
                    assert_eq!(
                        (got_ns.as_str(), got.as_slice()),
                        (*w, *list),
                        "{ns:?} {services:?}"
                    )
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{ns:?} {services:?}: {e}"),
                (got, _) => panic!("{ns:?} {services:?}: {got:?}"),
            }
        }
        // records written before namespaces were bound
        let legacy: NodeRecord =
            serde_json::from_str(r#"{"services":["prod/web"],"joined_at":1}"#).expect("legacy");
        assert_eq!(legacy.namespace(), "prod");
        let mixed: NodeRecord =
            serde_json::from_str(r#"{"services":["prod/web","default/x"],"joined_at":1}"#)
                .expect("legacy");
        assert_eq!(mixed.namespace(), "default");
    }

    #[test]
    fn revocation_takes_the_live_certificates_and_sequences_grow_with_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let rec = |serial: &str, node: &str, left: i64| IssuedRecord {
            serial: serial.into(),
            spiffe_id: format!("spiffe://td/node/{node}"),
            node: node.into(),
            not_after: rfc3339(if left >= 0 {
                now + Duration::from_secs(left as u64)
            } else {
                now - Duration::from_secs((-left) as u64)
            }),
            root: None,
        };
        for r in [
            rec("AA", "node-c", 60),
            rec("bb", "node-c", -60),
            rec("cc", "node-d", 60),
        ] {
            append_issued(dir.path(), &r).expect("log");
        }
        let deny = Denylist::new(dir.path());
        let r = deny.revoke("node-c", now).expect("revoke");
        assert!(r.node_refused);
        assert_eq!(
            r.serials
                .iter()
                .map(|s| s.serial.as_str())
                .collect::<Vec<_>>(),
            ["aa"],
            "only live certificates of that node"
        );
        assert!(deny.refused("node-c").is_some() && deny.refused("node-d").is_none());
        assert_eq!(deny.list(now).len(), 1);
        assert!(deny.release("node-c").expect("release"));
        assert!(deny.refused("node-c").is_none());
        assert_eq!(deny.list(now).len(), 1, "its certificate stays refused");
        assert!(
            deny.list(now + Duration::from_secs(120)).is_empty(),
            "dropped once it expired"
        );

        assert_eq!(bundle_sequence(dir.path(), "d1").expect("seq"), 1);
        assert_eq!(bundle_sequence(dir.path(), "d1").expect("seq"), 1);
        assert_eq!(bundle_sequence(dir.path(), "d2").expect("seq"), 2);
        assert_eq!(bundle_sequence(dir.path(), "d1").expect("seq"), 3);
    }

    #[test]
    fn intermediate_rotation_keeps_the_root_and_archives_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        init(dir.path(), "mesh.example", false, now).expect("init");
        let before = load(dir.path()).expect("load");
        let err = rotate_intermediate(dir.path(), Duration::from_secs(1), now)
            .expect_err("too short")
            .to_string();
        assert!(err.contains("at least 10s"), "{err}");
        let r = rotate_intermediate(dir.path(), Duration::from_secs(3600), now).expect("rotate");
        let after = load(dir.path()).expect("load");
        assert_eq!(after.root, before.root);
        assert_ne!(after.intermediate, before.intermediate);
        let info = CertInfo::from_der(&after.intermediate).expect("int");
        assert_eq!(info.serial, r.serial);
        assert!(info.lifetime() <= Duration::from_secs(3600) + CA_BACKDATE);
        assert!(
            dir.path()
                .join(format!("intermediates/{}.crt", r.replaced))
                .exists()
        );
        crate::signer::Signer::new(after.intermediate, after.intermediate_key, "fp")
            .expect("the new key matches the new certificate");
        let mismatched = crate::signer::Signer::new(
            before.intermediate,
            load_key(&dir.path().join("intermediate.key")).expect("key"),
            "fp",
        );
        assert!(matches!(
            mismatched,
            Err(crate::signer::SignError::KeyMismatch)
        ));
    }
}
