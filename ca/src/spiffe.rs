//! SPIFFE IDs as meshgate uses them: parsing, formatting and the two shapes we issue.
//!
//! Pure data and functions; no I/O. Workloads are `spiffe://TD/ns/NS/svc/SVC`, nodes
//! `spiffe://TD/node/NAME`, the CA's own serving identity `spiffe://TD/ca`.

use std::fmt;

/// Why a string is not a SPIFFE ID meshgate accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The string does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or has characters SPIFFE does not allow.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// A path segment is empty, '.', '..' or has characters SPIFFE does not allow.
    #[error("invalid path segment {0:?} in SPIFFE ID: use letters, digits, '.', '-' and '_'")]
    Segment(String),
    /// The path is none of the shapes meshgate issues.
    #[error(
        "SPIFFE ID {0:?} is neither spiffe://TD/node/NAME, spiffe://TD/ns/NS/svc/SVC nor spiffe://TD/ca"
    )]
    Shape(String),
}

/// What a SPIFFE ID names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A node (the agent or gateway process itself).
    Node(String),
    /// A service in a namespace.
    Workload {
        /// Namespace, `default` unless configured.
        namespace: String,
        /// Service name.
        service: String,
    },
    /// The CA's serving identity.
    Ca,
}

/// A parsed SPIFFE ID of one of the shapes meshgate issues.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    subject: Subject,
}

impl SpiffeId {
    /// `spiffe://TD/node/NAME`.
    pub fn node(trust_domain: &str, node: &str) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        validate_segment(node)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            subject: Subject::Node(node.to_owned()),
        })
    }

    /// `spiffe://TD/ns/NS/svc/SVC`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service: &str,
    ) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        validate_segment(namespace)?;
        validate_segment(service)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            subject: Subject::Workload {
                namespace: namespace.to_owned(),
                service: service.to_owned(),
            },
        })
    }

    /// `spiffe://TD/ca`.
    pub fn ca(trust_domain: &str) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            subject: Subject::Ca,
        })
    }

    /// Parses `spiffe://TD/...`; only the shapes meshgate issues are accepted.
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        validate_trust_domain(td)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["node", name] => Self::node(td, name),
            ["ns", ns, "svc", svc] => Self::workload(td, ns, svc),
            ["ca"] => Self::ca(td),
            _ => Err(SpiffeError::Shape(s.to_owned())),
        }
    }

    /// The trust domain, without scheme.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// What the ID names.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The service name, for a workload ID.
    pub fn service(&self) -> Option<&str> {
        match &self.subject {
            Subject::Workload { service, .. } => Some(service),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        match &self.subject {
            Subject::Node(n) => write!(f, "/node/{n}"),
            Subject::Workload { namespace, service } => write!(f, "/ns/{namespace}/svc/{service}"),
            Subject::Ca => write!(f, "/ca"),
        }
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a trust domain name (SPIFFE: lowercase letters, digits, `.`, `-`, `_`).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::TrustDomain(td.to_owned()))
    }
}

/// Checks one path segment (a node, namespace or service name).
pub fn validate_segment(seg: &str) -> Result<(), SpiffeError> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg.len() <= 128
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Segment(seg.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        for s in [
            "spiffe://mesh.example/node/node-a",
            "spiffe://mesh.example/ns/default/svc/users",
            "spiffe://mesh.example/ca",
        ] {
            assert_eq!(SpiffeId::parse(s).expect(s).to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_ids() {
        let cases = [
            ("http://mesh.example/node/a", "must start with spiffe://"),
            ("spiffe://Mesh.Example/node/a", "invalid trust domain"),
            ("spiffe:///node/a", "invalid trust domain"),
            ("spiffe://mesh.example/node/../x", "neither"),
            ("spiffe://mesh.example/node/..", "invalid path segment"),
            (
                "spiffe://mesh.example/ns/default/svc/",
                "invalid path segment",
            ),
            ("spiffe://mesh.example/ns/default/svc/a/b", "neither"),
            ("spiffe://mesh.example", "neither"),
            ("spiffe://mesh.example/node/a%2f", "invalid path segment"),
        ];
        for (input, want) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn accessors() {
        let id = SpiffeId::parse("spiffe://td/ns/prod/svc/web").expect("valid");
        assert_eq!(id.trust_domain(), "td");
        assert_eq!(id.service(), Some("web"));
        assert_eq!(
            id.subject(),
            &Subject::Workload {
                namespace: "prod".into(),
                service: "web".into()
            }
        );
        assert_eq!(SpiffeId::node("td", "n1").expect("valid").service(), None);
    }
}
