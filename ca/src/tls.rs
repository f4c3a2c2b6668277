//! A certificate slot that live rustls configs read on every handshake, so a renewed SVID is
//! used by the next connection without rebuilding any config.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwapOption;
use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::verify::crypto_provider;

/// Holds the current certificate and key (or none yet).
#[derive(Default)]
pub struct CertSlot {
    current: ArcSwapOption<CertifiedKey>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot")
            .field("loaded", &self.current.load().is_some())
            .finish()
    }
}

impl CertSlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the certificate: `chain` leaf first, `key_pkcs8` the leaf's key.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
    ) -> Result<(), rustls::Error> {
        let key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)))?;
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, key))));
        Ok(())
    }

    /// The current certificate chain, if any.
    pub fn chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.current.load().as_ref().map(|c| c.cert.clone())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}
