//! The trust bundle and the rustls verifiers that check SPIFFE X.509 SVIDs.
//!
//! A peer is accepted when its chain verifies to a root in the current [`TrustBundle`] (read
//! through an `ArcSwap`, so bundle updates apply to live configs), its leaf has exactly one URI
//! SAN, that URI is a SPIFFE ID in our trust domain, it is not on the bundle's denylist, and
//! (for servers) it is exactly one of the IDs the caller expects. TLS versions are not decided
//! here: configs built on these verifiers are TLS 1.3 only (see [`tls13_server_config`],
//! [`tls13_client_config`]), and the server configs meshgate builds never resume sessions, so
//! every connection is verified afresh.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

pub use crate::bundle::{BundleError, TrustBundle};
use crate::{pki::CertInfo, spiffe::SpiffeId};

/// A bundle shared between its owner (who swaps in updates) and live TLS configs.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// Which server identities a client accepts.
#[derive(Debug, Clone)]
pub enum ExpectedPeer {
    /// Exactly one of these SPIFFE IDs: how the data plane verifies a destination agent (the
    /// node discovery names for the endpoint, or the nodes the hosting map allows to host the
    /// service) and how agents verify the CA.
    AnyOf(Vec<SpiffeId>),
    /// Any node identity (`spiffe://TD/node/*`) of the bundle's trust domain. Not for the data
    /// plane (any node could then answer for any service); tools and tests only.
    AnyNode,
    /// Any ID in the bundle's trust domain.
    TrustDomain,
}

/// The server presented a valid SVID, but not one the caller expects: a verification failure
/// the caller can tell apart from the others (downcast the [`OtherError`] of the TLS error).
/// Its `Debug` is its message, since rustls prints the inner error that way.
#[derive(Clone, PartialEq, Eq)]
pub struct UnexpectedPeer {
    /// What the server presented.
    pub presented: SpiffeId,
    /// What the caller accepts (empty with [`ExpectedPeer::AnyNode`]).
    pub expected: Vec<SpiffeId>,
}

impl fmt::Display for UnexpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.expected.is_empty() {
            return write!(
                f,
                "server identity {} is not a node identity",
                self.presented
            );
        }
        let want: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
        write!(
            f,
            "server identity {} is not the expected {}",
            self.presented,
            want.join(" or ")
        )
    }
}

impl fmt::Debug for UnexpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for UnexpectedPeer {}

/// The peer's certificate is on the bundle's denylist (downcast the [`OtherError`]). Its
/// `Debug` is its message.
#[derive(Clone, PartialEq, Eq)]
pub struct RevokedPeer {
    /// The peer.
    pub id: SpiffeId,
    /// Why.
    pub reason: crate::bundle::Revocation,
}

impl fmt::Display for RevokedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer {} is revoked: {}", self.id, self.reason)
    }
}

impl fmt::Debug for RevokedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for RevokedPeer {}

/// The [`UnexpectedPeer`] or [`RevokedPeer`] inside a TLS error, if that is why it failed.
pub fn peer_refusal(e: &TlsError) -> Option<PeerRefusal<'_>> {
    let TlsError::InvalidCertificate(CertificateError::Other(o)) = e else {
        return None;
    };
    if let Some(u) = o.0.downcast_ref::<UnexpectedPeer>() {
        return Some(PeerRefusal::Unexpected(u));
    }
    o.0.downcast_ref::<RevokedPeer>().map(PeerRefusal::Revoked)
}

/// Why a verified peer was refused anyway.
#[derive(Debug, Clone, Copy)]
pub enum PeerRefusal<'a> {
    /// Not the identity the caller expects.
    Unexpected(&'a UnexpectedPeer),
    /// On the denylist.
    Revoked(&'a RevokedPeer),
}

/// [`verify_svid`] over a whole presented chain (leaf first), then the bundle's denylist: what
/// a live connection is re-checked with when the bundle changes or time passes.
pub fn check_chain(
    bundle: &TrustBundle,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, TlsError> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or(TlsError::NoCertificatesPresented)?;
    let id = verify_svid(bundle, leaf, rest, now, usage)?;
    check_revocation(bundle, &id, leaf)?;
    Ok(id)
}

/// Refuses `leaf` (of peer `id`) when the bundle's denylist names it.
fn check_revocation(
    bundle: &TrustBundle,
    id: &SpiffeId,
    leaf: &CertificateDer<'_>,
) -> Result<(), TlsError> {
    if bundle.revoked_nodes().is_empty() && bundle.revoked_serials().is_empty() {
        return Ok(());
    }
    let info = CertInfo::from_der(leaf)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    match bundle.revocation(id, &info.serial) {
        Some(reason) => Err(other_error(RevokedPeer {
            id: id.clone(),
            reason,
        })),
        None => Ok(()),
    }
}

/// Which extended key usage a verified certificate must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
}

/// Verifies a chain against the bundle for the given usage and returns the peer's SPIFFE ID.
///
/// Checks, in order: chain to a bundle root (validity dates, signatures, EKU), exactly one URI
/// SAN, a SPIFFE ID of a shape we issue, in the bundle's trust domain.
pub fn verify_svid(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, TlsError> {
    let usage = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    let algs = provider_algorithms();
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    ee.verify_for_usage(
        algs.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    let info = CertInfo::from_der(end_entity)
        .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
    let uri = info
        .spiffe_uri()
        .ok_or_else(|| other("certificate must carry exactly one spiffe:// URI SAN"))?;
    let id = SpiffeId::parse(uri).map_err(|e| other(&e.to_string()))?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(other(&format!(
            "peer {id} is not in trust domain {}",
            bundle.trust_domain()
        )));
    }
    Ok(id)
}

/// What a server's chain must lead to.
#[derive(Debug, Clone)]
enum ServerTrust {
    /// A root of the live bundle.
    Bundle(SharedBundle),
    /// The root the server presents in its chain, when its fingerprint is this one: how a node
    /// that holds no bundle yet pins the CA at join time (no trust on first use).
    Pinned {
        trust_domain: String,
        fingerprint: String,
    },
}

/// Verifies server certificates as SPIFFE SVIDs; the TLS server name is ignored.
pub struct SpiffeServerVerifier {
    trust: ServerTrust,
    expected: ExpectedPeer,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl SpiffeServerVerifier {
    /// A verifier over a live bundle.
    pub fn new(bundle: SharedBundle, expected: ExpectedPeer) -> Self {
        Self {
            trust: ServerTrust::Bundle(bundle),
            expected,
            algs: provider_algorithms(),
        }
    }

    /// A verifier that trusts only a root with this `sha256:` fingerprint, which the server
    /// must present in its chain. Used to join, before the node holds a bundle.
    pub fn pinned(trust_domain: &str, fingerprint: &str, expected: ExpectedPeer) -> Self {
        Self {
            trust: ServerTrust::Pinned {
                trust_domain: trust_domain.to_owned(),
                fingerprint: fingerprint.to_ascii_lowercase(),
            },
            expected,
            algs: provider_algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let bundle = match &self.trust {
            ServerTrust::Bundle(b) => b.load_full(),
            ServerTrust::Pinned {
                trust_domain,
                fingerprint,
            } => {
                let root = intermediates
                    .iter()
                    .find(|c| &crate::pki::fingerprint(c) == fingerprint)
                    .ok_or_else(|| {
                        other(&format!(
                            "the CA did not present the pinned root {fingerprint}: wrong CA or wrong fingerprint"
                        ))
                    })?;
                let b = TrustBundle::new(trust_domain, vec![root.clone().into_owned()], 0)
                    .map_err(|e| other(&e.to_string()))?;
                Arc::new(b)
            }
        };
        let id = verify_svid(&bundle, end_entity, intermediates, now, Usage::Server)?;
        match &self.expected {
            ExpectedPeer::TrustDomain => {}
            ExpectedPeer::AnyNode if matches!(id.subject(), crate::spiffe::Subject::Node(_)) => {}
            ExpectedPeer::AnyNode => {
                return Err(other_error(UnexpectedPeer {
                    presented: id,
                    expected: Vec::new(),
                }));
            }
            ExpectedPeer::AnyOf(ids) if ids.contains(&id) => {}
            ExpectedPeer::AnyOf(ids) => {
                return Err(other_error(UnexpectedPeer {
                    presented: id,
                    expected: ids.clone(),
                }));
            }
        }
        check_revocation(&bundle, &id, end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies client certificates as SPIFFE SVIDs of our trust domain. Which identity may do
/// what is decided after the handshake (authorization), not here.
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    mandatory: bool,
    expired_grace: std::time::Duration,
    revocation: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .field("expired_grace", &self.expired_grace)
            .field("revocation", &self.revocation)
            .finish()
    }
}

impl SpiffeClientVerifier {
    /// `mandatory`: refuse handshakes without a client certificate.
    pub fn new(bundle: SharedBundle, mandatory: bool) -> Self {
        Self {
            bundle,
            mandatory,
            expired_grace: std::time::Duration::ZERO,
            revocation: true,
            algs: provider_algorithms(),
        }
    }

    /// Whether peers on the bundle's denylist are refused in the handshake (default: yes).
    /// The CA turns it off and refuses revoked nodes in its RPCs instead, with a message that
    /// says what happened rather than a bare TLS alert.
    pub fn with_revocation(mut self, on: bool) -> Self {
        self.revocation = on;
        self
    }

    /// Also accepts a leaf that expired less than `grace` ago (its chain must have verified
    /// just before it expired). Only the CA uses this, so that a node whose certificate ran out
    /// during a CA outage can still renew it; the CA then allows such a caller nothing else.
    pub fn with_expired_grace(mut self, grace: std::time::Duration) -> Self {
        self.expired_grace = grace;
        self
    }
}

/// How long ago `leaf` expired at `now`, if it has (None for a valid or unreadable leaf).
pub fn expired_for(leaf: &CertificateDer<'_>, now: UnixTime) -> Option<std::time::Duration> {
    let info = CertInfo::from_der(leaf).ok()?;
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
    now.duration_since(info.not_after)
        .ok()
        .filter(|d| !d.is_zero())
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let bundle = self.bundle.load();
        match verify_svid(&bundle, end_entity, intermediates, now, Usage::Client) {
            Ok(id) => {
                if self.revocation {
                    check_revocation(&bundle, &id, end_entity)?;
                }
                Ok(ClientCertVerified::assertion())
            }
            Err(TlsError::InvalidCertificate(CertificateError::Expired))
                if !self.expired_grace.is_zero() =>
            {
                let info = CertInfo::from_der(end_entity)
                    .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
                let since = expired_for(end_entity, now).unwrap_or_default();
                if since > self.expired_grace {
                    return Err(TlsError::InvalidCertificate(CertificateError::Expired));
                }
                // the chain as it stood one second before the leaf expired
                let before = info
                    .not_after
                    .checked_sub(std::time::Duration::from_secs(1))
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(UnixTime::since_unix_epoch)
                    .ok_or(TlsError::InvalidCertificate(CertificateError::Expired))?;
                let id = verify_svid(&bundle, end_entity, intermediates, before, Usage::Client)?;
                if self.revocation {
                    check_revocation(&bundle, &id, end_entity)?;
                }
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The process crypto provider: the installed default, else aws-lc-rs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

fn provider_algorithms() -> WebPkiSupportedAlgorithms {
    crypto_provider().signature_verification_algorithms
}

/// A TLS 1.3-only server config builder on the process provider.
pub fn tls13_server_config() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("invariant: aws-lc-rs supports TLS 1.3")
}

/// Makes a server config forget sessions: no session cache and no TLS 1.3 tickets, so every
/// connection is a full handshake whose peer certificate is verified against the bundle and
/// denylist of that moment. A resumed session would restore the peer's certificate from when
/// the session was made without checking expiry, the bundle or the denylist again.
pub fn disable_resumption(cfg: &mut rustls::ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
}

/// A TLS 1.3-only client config builder on the process provider.
pub fn tls13_client_config() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("invariant: aws-lc-rs supports TLS 1.3")
}

/// Like [`tls13_server_config`], verifying peer certificates at the time `time` tells (tests
/// inject a clock that runs behind or ahead).
pub fn tls13_server_config_at(
    time: Arc<dyn rustls::time_provider::TimeProvider>,
) -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    rustls::ServerConfig::builder_with_details(crypto_provider(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("invariant: aws-lc-rs supports TLS 1.3")
}

/// Like [`tls13_client_config`], verifying peer certificates at the time `time` tells.
pub fn tls13_client_config_at(
    time: Arc<dyn rustls::time_provider::TimeProvider>,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_details(crypto_provider(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("invariant: aws-lc-rs supports TLS 1.3")
}

/// A TLS error in words for people: the verifier's own message rather than rustls' `Debug`
/// form (`Other(OtherError(…))`), and what to check for clock problems.
pub fn describe_tls_error(e: &TlsError) -> String {
    match e {
        TlsError::InvalidCertificate(ce) => format!(
            "peer certificate rejected: {}",
            describe_certificate_error(ce)
        ),
        TlsError::AlertReceived(alert) => match alert {
            rustls::AlertDescription::CertificateExpired => {
                "the peer refused our certificate: it has expired".to_owned()
            }
            rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA => "the peer refused our certificate".to_owned(),
            rustls::AlertDescription::CertificateRequired => {
                "the peer requires a client certificate".to_owned()
            }
            other => format!("the peer ended the handshake ({other:?})"),
        },
        TlsError::NoApplicationProtocol => {
            "no common ALPN protocol (is this the right port?)".into()
        }
        other => other.to_string(),
    }
}

fn describe_certificate_error(e: &CertificateError) -> String {
    match e {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet: is this machine's clock behind? (check NTP)".into()
        }
        CertificateError::UnknownIssuer => "it is not signed by a trusted root".into(),
        CertificateError::BadSignature => "its signature does not verify".into(),
        CertificateError::Revoked => "it has been revoked".into(),
        CertificateError::BadEncoding => "it cannot be parsed".into(),
        CertificateError::Other(o) => o.0.to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn other(msg: &str) -> TlsError {
    other_error(VerifyError(msg.to_owned()))
}

fn other_error(e: impl std::error::Error + Send + Sync + 'static) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[derive(Debug)]
struct VerifyError(String);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerifyError {}

fn webpki_error(e: webpki::Error) -> TlsError {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        other_err => {
            return other(&format!("certificate rejected: {other_err}"));
        }
    };
    TlsError::InvalidCertificate(ce)
}
