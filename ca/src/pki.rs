//! Certificate and key files as every side of the mesh handles them: fingerprints, reading a
//! certificate's SPIFFE ID and validity, PEM files, and atomic 0600 writes of keys.
//!
//! Identity primitives only. General encodings come from `data-encoding` (hex, base64url) and
//! times from `humantime` (RFC 3339), so nothing here is a utility library for other crates.

use std::{
    fs,
    io::{self, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, pem::PemObject};
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

/// Errors reading certificates and files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The DER is not an X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    BadCertificate(String),
    /// A PEM file holds no certificate or is malformed.
    #[error("{path}: no PEM certificate could be read")]
    BadPem {
        /// The file.
        path: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `sha256:` + lowercase hex of SHA-256 over the certificate DER; how a CA root is pinned.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(cert))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lowercase hex of SHA-256 over `data`: how join tokens are stored and recorded (never the
/// token itself).
pub fn sha256_hex(data: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&sha256(data))
}

/// `N` bytes from the system's secure random generator (serial numbers, join tokens).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).expect("invariant: the system RNG is available");
    buf
}

/// What `meshgate certs` and the admin API show of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Every URI SAN (a meshgate SVID has exactly one).
    pub uris: Vec<String>,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether the certificate is a CA.
    pub is_ca: bool,
    /// Subject DN, RFC 4514-ish.
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Email (rfc822Name) SANs.
    pub emails: Vec<String>,
}

impl CertInfo {
    /// Parses the interesting fields of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        let mut emails = Vec::new();
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push((*u).to_owned()),
                            GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                            GeneralName::RFC822Name(e) => emails.push((*e).to_owned()),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let to_system = |t: i64| {
            if t >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Self {
            uris,
            serial: data_encoding::HEXLOWER.encode(cert.raw_serial()),
            not_before: to_system(cert.validity().not_before.timestamp()),
            not_after: to_system(cert.validity().not_after.timestamp()),
            is_ca,
            subject: cert.subject().to_string(),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            dns_names,
            emails,
        })
    }

    /// The single SPIFFE URI SAN, if there is exactly one URI SAN and it is `spiffe://`.
    pub fn spiffe_uri(&self) -> Option<&str> {
        match self.uris.as_slice() {
            [one] if one.starts_with("spiffe://") => Some(one),
            _ => None,
        }
    }

    /// Total validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// The earliest end of validity over a whole chain (leaf, intermediates, root if present): a
/// connection authenticated with `chain` must not outlive it. `None` if a certificate does not
/// parse or the chain is empty.
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Option<SystemTime> {
    chain
        .iter()
        .map(|c| CertInfo::from_der(c).map(|i| i.not_after).ok())
        .try_fold(None::<SystemTime>, |min, t| {
            let t = t?;
            Some(Some(min.map_or(t, |m| m.min(t))))
        })
        .flatten()
}

/// Reads every certificate of a PEM file, in order.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let data = fs::read(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::BadPem {
            path: path.display().to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// PEM-encodes certificates, one block each.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
}

/// One PEM block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename) with
/// the given Unix mode; secrets use 0o600.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io_err = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        data_encoding::HEXLOWER.encode(&random_bytes::<6>())
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    let res = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok(())
}

/// Creates a directory (and parents) with mode 0700 if it does not exist.
pub fn create_private_dir(path: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| PkiError::Io {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_hex() {
        assert_eq!(
            fingerprint(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn atomic_write_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("secret.key");
        write_atomic(&p, b"one", 0o600).expect("write");
        write_atomic(&p, b"two", 0o600).expect("overwrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(
            fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
    }
}
