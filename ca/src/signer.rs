//! CSRs (made by nodes, checked by the CA) and SVID signing by the intermediate. Pure over its
//! inputs: no I/O.
//!
//! A CSR is accepted only with an ECDSA P-256 key, a valid self-signature and exactly one SAN,
//! a URI that parses as a SPIFFE ID in our trust domain. Nothing else from the CSR reaches the
//! certificate: the subject, key usages and extensions are ours. [`Signer`] (the `server`
//! feature) holds the intermediate key.

#[cfg(feature = "server")]
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, KeyPair, PublicKey,
    SanType,
};
#[cfg(feature = "server")]
use rcgen::{DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SerialNumber};
#[cfg(feature = "server")]
use rustls_pki_types::CertificateDer;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::{
    certification_request::X509CertificationRequest,
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::FromDer,
};

use crate::spiffe::SpiffeId;

/// Why a CSR was refused. The messages are safe to return to the caller.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Not a PKCS#10 request, or an extension we do not accept.
    #[error("CSR could not be parsed: {0}")]
    Malformed(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// Only ECDSA P-256 keys are accepted.
    #[error("CSR key type not allowed: {0}; only ECDSA P-256 keys are accepted")]
    KeyType(String),
    /// The SANs are not exactly one spiffe:// URI.
    #[error("CSR must carry exactly one SAN, the spiffe:// URI asked for; it has {0}")]
    Sans(String),
    /// The URI is not a SPIFFE ID we issue.
    #[error("CSR SPIFFE ID rejected: {0}")]
    Id(String),
}

/// A CSR that passed [`check_csr`]: the SPIFFE ID asked for and the key to certify.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The SPIFFE ID in the CSR's only SAN.
    pub id: SpiffeId,
    /// The subject public key.
    pub public_key: PublicKey,
}

/// Checks a CSR (key type, signature, SANs, trust domain) and returns what it asks for.
pub fn check_csr(der: &[u8], trust_domain: &str) -> Result<CheckedCsr, CsrError> {
    let (_, req) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let spki = &req.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        let what = match curve {
            Some(c) => format!("{} with parameters {c}", spki.algorithm.algorithm),
            None => spki.algorithm.algorithm.to_string(),
        };
        return Err(CsrError::KeyType(what));
    }
    let parsed =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
                other => CsrError::Malformed(other.to_string()),
            })?;
    let sans = &parsed.params.subject_alt_names;
    let uri = match sans.as_slice() {
        [SanType::URI(u)] => u.as_str().to_owned(),
        _ => {
            let names: Vec<String> = sans.iter().map(describe_san).collect();
            return Err(CsrError::Sans(if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }));
        }
    };
    let id = SpiffeId::parse(&uri).map_err(|e| CsrError::Id(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(CsrError::Id(format!(
            "{id} is not in trust domain {trust_domain}"
        )));
    }
    Ok(CheckedCsr {
        id,
        public_key: parsed.public_key,
    })
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        _ => "otherName".into(),
    }
}

/// Errors while signing.
#[cfg(feature = "server")]
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// rcgen refused (a bug or a broken key).
    #[error("signing failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The key is not the one the intermediate certificate certifies.
    #[error("the intermediate key does not match the intermediate certificate")]
    KeyMismatch,
    /// The intermediate has expired; nothing can be issued until it is renewed.
    #[error(
        "the signing intermediate expired: run `meshgate ca intermediate rotate` on the CA host (nodes renew onto the new one by themselves)"
    )]
    IntermediateExpired,
}

/// How far before "now" a leaf's validity starts: clock skew between the CA and its nodes of up
/// to this much is tolerated (Vault back-dates by 30 seconds, Consul's CA by a minute; NTP-less
/// VMs drift further, so meshgate allows five minutes).
#[cfg(feature = "server")]
pub const BACKDATE: Duration = Duration::from_secs(300);

/// Signs SVIDs with the intermediate key.
#[cfg(feature = "server")]
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    intermediate: CertificateDer<'static>,
    intermediate_not_after: SystemTime,
    /// Certificates sent after the intermediate: a cross-signed copy of it during a root
    /// rotation, so peers that hold only the old root verify new leaves too.
    extra: Vec<CertificateDer<'static>>,
    root_fingerprint: String,
}

#[cfg(feature = "server")]
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("intermediate_not_after", &self.intermediate_not_after)
            .field("root", &self.root_fingerprint)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "server")]
impl Signer {
    /// A signer from the intermediate's certificate and key; `root_fingerprint` names the root
    /// the intermediate chains to (recorded with every leaf it signs). Refuses a key that is
    /// not the certificate's.
    pub fn new(
        intermediate: CertificateDer<'static>,
        key: KeyPair,
        root_fingerprint: &str,
    ) -> Result<Self, SignError> {
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&intermediate)
            .map_err(|_| SignError::Rcgen(rcgen::Error::CouldNotParseCertificate))?;
        if *cert.public_key().subject_public_key.data != *rcgen::PublicKeyData::der_bytes(&key) {
            return Err(SignError::KeyMismatch);
        }
        let not_after = cert.validity().not_after.timestamp();
        let intermediate_not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
        let issuer = Issuer::from_ca_cert_der(&intermediate, key)?;
        Ok(Self {
            issuer,
            intermediate,
            intermediate_not_after,
            extra: Vec::new(),
            root_fingerprint: root_fingerprint.to_owned(),
        })
    }

    /// Also sends `extra` after the intermediate in every chain (a cross-signed intermediate).
    pub fn with_extra(mut self, extra: Vec<CertificateDer<'static>>) -> Self {
        self.extra = extra;
        self
    }

    /// The intermediate certificate that goes with every leaf.
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate
    }

    /// When the intermediate expires (every leaf is capped at it).
    pub fn intermediate_not_after(&self) -> SystemTime {
        self.intermediate_not_after
    }

    /// The fingerprint of the root the intermediate chains to.
    pub fn root_fingerprint(&self) -> &str {
        &self.root_fingerprint
    }

    /// Signs a leaf for `id` and `public_key`, valid for `ttl` from `now` (capped at the
    /// intermediate's expiry) and back-dated by [`BACKDATE`] so that a node whose clock runs
    /// behind the CA's can use it at once (a quarter of the lifetime for lifetimes under 20
    /// minutes). Returns the chain: leaf, intermediate (and the cross-signed intermediate during
    /// a root rotation).
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, SignError> {
        if now >= self.intermediate_not_after {
            return Err(SignError::IntermediateExpired);
        }
        let not_after = (now + ttl).min(self.intermediate_not_after);
        let mut params = CertificateParams::default();
        params.not_before = (now - (ttl / 4).min(BACKDATE)).into();
        params.not_after = not_after.into();
        let mut serial = crate::pki::random_bytes::<16>();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshgate");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(public_key, &self.issuer)?;
        let mut chain = Vec::with_capacity(2 + self.extra.len());
        chain.push(leaf.der().clone());
        chain.push(self.intermediate.clone());
        chain.extend(self.extra.iter().cloned());
        Ok(chain)
    }
}

/// Makes a CSR for `id` with a fresh ECDSA P-256 key; the key stays with the caller.
pub fn make_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn csr_checks() {
        let td = "mesh.example";
        let good = "spiffe://mesh.example/ns/default/svc/web";
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
        let ok = check_csr(&csr_with(p256, vec![uri(good)]), td).expect("valid CSR");
        assert_eq!(ok.id.to_string(), good);

        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(good)]),
                "key type not allowed",
            ),
            (
                csr_with(&rcgen::PKCS_ED25519, vec![uri(good)]),
                "key type not allowed",
            ),
            (
                csr_with(
                    p256,
                    vec![
                        uri(good),
                        SanType::DnsName("evil.example".try_into().expect("dns")),
                    ],
                ),
                "DNS:evil.example",
            ),
            (
                csr_with(p256, vec![uri(good), uri(good)]),
                "exactly one SAN",
            ),
            (csr_with(p256, vec![]), "it has none"),
            (
                csr_with(p256, vec![uri("spiffe://other.example/ns/default/svc/web")]),
                "not in trust domain",
            ),
            (
                csr_with(p256, vec![uri("https://mesh.example/web")]),
                "must start with spiffe://",
            ),
            (b"not a csr".to_vec(), "could not be parsed"),
        ];
        for (der, want) in cases {
            let err = check_csr(&der, td).expect_err(want).to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    #[test]
    fn tampered_csr_signature_is_refused() {
        let mut der = csr_with(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri("spiffe://mesh.example/node/a")],
        );
        // flip one bit inside the URI: the DER still parses, the signature no longer matches
        let pos = der
            .windows(4)
            .position(|w| w == b"node")
            .expect("uri in csr");
        der[pos] ^= 0x01;
        let err = check_csr(&der, "mesh.example")
            .expect_err("tampered")
            .to_string();
        assert!(err.contains("signature"), "{err}");
    }
}
