//! The trust bundle: what every node must agree on to trust a peer.
//!
//! - the **roots** of the trust domain (two during a root rotation);
//! - the **hosting map**: which nodes may host which services (`ns/svc` -> node names). The
//!   outbound side refuses an endpoint whose node may not host the service it is asked for, so
//!   one compromised node that steers an address (a Consul registration, a DNS answer, a stale
//!   static entry) cannot answer for a service it does not run;
//! - the **denylist**: revoked nodes and the serial numbers of their certificates that are still
//!   valid; peers presenting them are refused and their open tunnels closed;
//! - the **signing root**: the root the CA issues under now; a holder of a leaf under another
//!   root renews it at once (root rotation);
//! - a **sequence** that grows with every change and survives CA restarts (agents report the
//!   one they hold).
//!
//! Pure data: built by the CA, streamed as [`meshgate_proto::ca::v1::Bundle`], kept by agents
//! in `bundle.json` so that a restart with the CA away still knows the hosting map.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
};

use meshgate_proto::ca::v1::{Bundle, Hosting};
use rustls_pki_types::{CertificateDer, TrustAnchor};
use serde::{Deserialize, Serialize};

use crate::{
    pki,
    spiffe::{SpiffeId, Subject},
};

/// Why a bundle cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A bundle needs at least one root.
    #[error("trust bundle for {0} has no roots")]
    Empty(String),
    /// A root is not a usable trust anchor.
    #[error("trust bundle root #{index} is not a valid CA certificate: {reason}")]
    BadRoot {
        /// Position in the list.
        index: usize,
        /// What webpki said.
        reason: String,
    },
    /// A stored bundle could not be read.
    #[error("stored trust bundle: {0}")]
    Stored(String),
}

/// Why a peer's certificate is on the denylist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The peer is a revoked node.
    Node(String),
    /// The certificate was issued to a node that was revoked since.
    Serial(String),
}

impl fmt::Display for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revocation::Node(n) => write!(f, "node {n} was revoked"),
            Revocation::Serial(s) => {
                write!(f, "certificate {s} belongs to a node that was revoked")
            }
        }
    }
}

/// The roots, hosting map, denylist and signing root of one trust domain, with a sequence
/// number that grows on every change.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    sequence: u64,
    /// namespace -> service -> nodes; `None` when the bundle carries no hosting map (it came
    /// from a PEM file, or from a CA older than this code).
    hosting: Option<HashMap<String, HashMap<String, BTreeSet<String>>>>,
    revoked_nodes: BTreeSet<String>,
    revoked_serials: BTreeSet<String>,
    signing_root: Option<String>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("sequence", &self.sequence)
            .field("hosting", &self.hosting.as_ref().map(HashMap::len))
            .field("revoked_nodes", &self.revoked_nodes)
            .finish_non_exhaustive()
    }
}

impl TrustBundle {
    /// A bundle of `roots` only (no hosting map, nothing revoked); every root must parse as a
    /// trust anchor.
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
        sequence: u64,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty(trust_domain.to_owned()));
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, r)| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            anchors,
            sequence,
            hosting: None,
            revoked_nodes: BTreeSet::new(),
            revoked_serials: BTreeSet::new(),
            signing_root: None,
        })
    }

    /// With a hosting map: `(service as ns/svc, nodes that may host it)`. Entries that are not
    /// `ns/svc` are ignored.
    pub fn with_hosting<S, N>(mut self, hosting: impl IntoIterator<Item = (S, N)>) -> Self
    where
        S: AsRef<str>,
        N: IntoIterator,
        N::Item: Into<String>,
    {
        let mut map: HashMap<String, HashMap<String, BTreeSet<String>>> = HashMap::new();
        for (service, nodes) in hosting {
            let Some((ns, svc)) = service.as_ref().split_once('/') else {
                continue;
            };
            map.entry(ns.to_owned())
                .or_default()
                .entry(svc.to_owned())
                .or_default()
                .extend(nodes.into_iter().map(Into::into));
        }
        self.hosting = Some(map);
        self
    }

    /// With a denylist: revoked node names and the serials (lowercase hex) of their
    /// certificates that are still valid.
    pub fn with_revoked(
        mut self,
        nodes: impl IntoIterator<Item = String>,
        serials: impl IntoIterator<Item = String>,
    ) -> Self {
        self.revoked_nodes = nodes.into_iter().collect();
        self.revoked_serials = serials
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        self
    }

    /// With the fingerprint of the root the CA signs under now.
    pub fn with_signing_root(mut self, fingerprint: Option<String>) -> Self {
        self.signing_root = fingerprint;
        self
    }

    /// With another sequence number.
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Grows with every change.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Whether a root with this fingerprint (`sha256:…`) is in the bundle.
    pub fn contains_fingerprint(&self, fp: &str) -> bool {
        self.roots.iter().any(|r| pki::fingerprint(r) == fp)
    }

    /// The fingerprints of the roots, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| pki::fingerprint(r)).collect()
    }

    /// The root the CA signs under now, when the CA said.
    pub fn signing_root(&self) -> Option<&str> {
        self.signing_root.as_deref()
    }

    /// Whether the bundle carries a hosting map at all.
    pub fn has_hosting(&self) -> bool {
        self.hosting.is_some()
    }

    /// The nodes that may host `service` in `namespace` (empty: none, or no hosting map).
    pub fn hosts(&self, namespace: &str, service: &str) -> Vec<&str> {
        self.hosting
            .as_ref()
            .and_then(|h| h.get(namespace))
            .and_then(|s| s.get(service))
            .map(|n| n.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Whether node `node` may host `service` in `namespace` (false without a hosting map).
    pub fn may_host(&self, node: &str, namespace: &str, service: &str) -> bool {
        self.hosting
            .as_ref()
            .and_then(|h| h.get(namespace))
            .and_then(|s| s.get(service))
            .is_some_and(|n| n.contains(node))
    }

    /// The hosting map as `ns/svc -> nodes`, sorted (empty without one).
    pub fn hosting(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (ns, services) in self.hosting.iter().flatten() {
            for (svc, nodes) in services {
                out.insert(format!("{ns}/{svc}"), nodes.iter().cloned().collect());
            }
        }
        out
    }

    /// Revoked nodes.
    pub fn revoked_nodes(&self) -> &BTreeSet<String> {
        &self.revoked_nodes
    }

    /// Serials of revoked nodes' certificates that are still valid.
    pub fn revoked_serials(&self) -> &BTreeSet<String> {
        &self.revoked_serials
    }

    /// Whether a peer with identity `id` presenting a leaf with serial `serial` (lowercase hex)
    /// is on the denylist, and why.
    pub fn revocation(&self, id: &SpiffeId, serial: &str) -> Option<Revocation> {
        if let Subject::Node(n) = id.subject()
            && self.revoked_nodes.contains(n)
        {
            return Some(Revocation::Node(n.clone()));
        }
        self.revoked_serials
            .contains(serial)
            .then(|| Revocation::Serial(serial.to_owned()))
    }

    /// Whether `other` says the same (roots, hosting map, denylist, signing root), whatever
    /// the sequence numbers.
    pub fn same_content(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain
            && self.roots == other.roots
            && self.hosting == other.hosting
            && self.revoked_nodes == other.revoked_nodes
            && self.revoked_serials == other.revoked_serials
            && self.signing_root == other.signing_root
    }

    /// SHA-256 (hex) over the content, not the sequence: equal for equal content.
    pub fn content_digest(&self) -> String {
        let stored = Stored {
            sequence: 0,
            ..self.stored()
        };
        pki::sha256_hex(&serde_json::to_vec(&stored).expect("invariant: bundle serializes"))
    }

    /// The wire form.
    pub fn to_proto(&self) -> Bundle {
        Bundle {
            trust_domain: self.trust_domain.clone(),
            roots_der: self.roots.iter().map(|r| r.to_vec()).collect(),
            sequence: self.sequence,
            hosting: self
                .hosting()
                .into_iter()
                .map(|(service, nodes)| Hosting { service, nodes })
                .collect(),
            revoked_nodes: self.revoked_nodes.iter().cloned().collect(),
            revoked_serials: self.revoked_serials.iter().cloned().collect(),
            signing_root: self.signing_root.clone().unwrap_or_default(),
            hosting_published: self.hosting.is_some(),
        }
    }

    /// From the wire form.
    pub fn from_proto(msg: &Bundle) -> Result<Self, BundleError> {
        let roots = msg
            .roots_der
            .iter()
            .map(|r| CertificateDer::from(r.clone()))
            .collect();
        let mut b = Self::new(&msg.trust_domain, roots, msg.sequence)?
            .with_revoked(msg.revoked_nodes.clone(), msg.revoked_serials.clone())
            .with_signing_root(Some(msg.signing_root.clone()).filter(|s| !s.is_empty()));
        if msg.hosting_published {
            b = b.with_hosting(msg.hosting.iter().map(|h| (&h.service, h.nodes.clone())));
        }
        Ok(b)
    }

    fn stored(&self) -> Stored {
        Stored {
            trust_domain: self.trust_domain.clone(),
            sequence: self.sequence,
            roots_pem: pki::certs_to_pem(&self.roots),
            hosting: self.hosting.as_ref().map(|_| self.hosting()),
            revoked_nodes: self.revoked_nodes.iter().cloned().collect(),
            revoked_serials: self.revoked_serials.iter().cloned().collect(),
            signing_root: self.signing_root.clone(),
        }
    }

    /// JSON for a node's data dir (`bundle.json`): everything, roots as PEM.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.stored()).expect("invariant: bundle serializes")
    }

    /// Reads what [`TrustBundle::to_json`] wrote.
    pub fn from_json(data: &[u8]) -> Result<Self, BundleError> {
        use rustls_pki_types::pem::PemObject;
        let s: Stored =
            serde_json::from_slice(data).map_err(|e| BundleError::Stored(e.to_string()))?;
        let roots = CertificateDer::pem_slice_iter(s.roots_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Stored(e.to_string()))?;
        let mut b = Self::new(&s.trust_domain, roots, s.sequence)?
            .with_revoked(s.revoked_nodes, s.revoked_serials)
            .with_signing_root(s.signing_root);
        if let Some(h) = s.hosting {
            b = b.with_hosting(h);
        }
        Ok(b)
    }
}

/// `bundle.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    trust_domain: String,
    sequence: u64,
    roots_pem: String,
    #[serde(default)]
    hosting: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    revoked_nodes: Vec<String>,
    #[serde(default)]
    revoked_serials: Vec<String>,
    #[serde(default)]
    signing_root: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("root").der().clone()
    }

    #[test]
    fn hosting_and_denylist_answer_and_survive_both_encodings() {
        let b = TrustBundle::new("td", vec![root()], 7)
            .expect("bundle")
            .with_hosting([
                ("default/users", vec!["node-b", "node-d"]),
                ("prod/users", vec!["node-p"]),
                ("not-a-scope", vec!["node-x"]),
            ])
            .with_revoked(vec!["node-c".into()], vec!["ABCD".into()])
            .with_signing_root(Some("sha256:00".into()));
        // (node, namespace, service, may host)
        for (node, ns, svc, want) in [
            ("node-b", "default", "users", true),
            ("node-d", "default", "users", true),
            ("node-p", "default", "users", false),
            ("node-p", "prod", "users", true),
            ("node-b", "default", "batch", false),
            ("node-x", "default", "not-a-scope", false),
        ] {
            assert_eq!(b.may_host(node, ns, svc), want, "{node} {ns}/{svc}");
        }
        assert_eq!(b.hosts("default", "users"), ["node-b", "node-d"]);
        let c = SpiffeId::node("td", "node-c").expect("id");
        let d = SpiffeId::node("td", "node-d").expect("id");
        assert_eq!(
            b.revocation(&c, "01"),
            Some(Revocation::Node("node-c".into()))
        );
        assert_eq!(
            b.revocation(&d, "abcd"),
            Some(Revocation::Serial("abcd".into()))
        );
        assert_eq!(b.revocation(&d, "01"), None);

        let wire = TrustBundle::from_proto(&b.to_proto()).expect("proto");
        let disk = TrustBundle::from_json(&b.to_json()).expect("json");
        for other in [&wire, &disk] {
            assert!(b.same_content(other));
            assert_eq!(other.sequence(), 7);
            assert_eq!(other.content_digest(), b.content_digest());
        }
        // no hosting map is not the same as an empty one
        let plain = TrustBundle::new("td", b.roots().to_vec(), 1).expect("plain");
        assert!(!plain.has_hosting());
        assert!(
            !TrustBundle::from_proto(&plain.to_proto())
                .expect("proto")
                .has_hosting()
        );
        let empty = plain
            .clone()
            .with_hosting(Vec::<(String, Vec<String>)>::new());
        assert!(empty.has_hosting() && !empty.same_content(&plain));
        assert!(
            TrustBundle::from_proto(&empty.to_proto())
                .expect("proto")
                .has_hosting()
        );
    }
}
