//! How long a live connection may trust its peer: a TLS handshake checks the peer's chain once,
//! but a tunnel lives for hours. [`PeerWatch::cut_off`] resolves when the chain the peer
//! presented is no longer acceptable — it expired, it no longer chains to a root of the bundle
//! (a root left it), the bundle's denylist names it (a revoked node), or a check of the
//! caller's own fails (the peer may no longer host the service the connection is for) — so the
//! caller can close the connection. Time is read from the identity manager's clock.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use meshgate_ca::{
    pki,
    spiffe::SpiffeId,
    verify::{PeerRefusal, TrustBundle, Usage, check_chain, describe_tls_error, peer_refusal},
};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use super::clock::{Clock, unix_time};

/// Why a connection's peer is no longer trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOffReason {
    /// A certificate of the peer's chain expired.
    Expired,
    /// The chain no longer verifies against the bundle (its root left it).
    Untrusted,
    /// The denylist names the peer.
    Revoked,
    /// The caller's own check failed (e.g. the peer may no longer host the service).
    NotAllowed,
}

impl CutOffReason {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CutOffReason::Expired => "expired",
            CutOffReason::Untrusted => "untrusted",
            CutOffReason::Revoked => "revoked",
            CutOffReason::NotAllowed => "not_allowed",
        }
    }
}

/// A connection's peer stopped being trusted: why, in a word and in a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOff {
    /// Why, for metrics.
    pub reason: CutOffReason,
    /// Why, for logs.
    pub detail: String,
}

impl fmt::Display for CutOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A check of the caller's own, run on every bundle: `Some(why)` to cut the connection off.
pub type ExtraCheck = Box<dyn Fn(&TrustBundle, &SpiffeId) -> Option<String> + Send + Sync>;

/// Watches peers' chains against the live bundle and the clock. Cheap to clone.
#[derive(Clone)]
pub struct PeerWatch {
    bundles: watch::Receiver<Arc<TrustBundle>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for PeerWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerWatch").finish_non_exhaustive()
    }
}

impl PeerWatch {
    pub(crate) fn new(bundles: watch::Receiver<Arc<TrustBundle>>, clock: Arc<dyn Clock>) -> Self {
        Self { bundles, clock }
    }

    /// Now, by the watch's clock.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Checks `chain` (leaf first, as the peer presented it, verified for `usage`) against the
    /// current bundle now: the reason to cut it off, if there is one.
    pub fn check(&self, chain: &[CertificateDer<'_>], usage: Usage) -> Option<CutOff> {
        let bundle = self.bundles.borrow().clone();
        verdict(&bundle, chain, usage, self.clock.now(), None)
    }

    /// Resolves when a connection authenticated by `chain` must be closed (see the module
    /// docs); never, while it stays acceptable. `extra` runs on every bundle change too.
    pub async fn cut_off(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        usage: Usage,
        extra: Option<ExtraCheck>,
    ) -> CutOff {
        let ends: Vec<SystemTime> = chain
            .iter()
            .filter_map(|c| pki::CertInfo::from_der(c).ok().map(|i| i.not_after))
            .collect();
        loop {
            let bundle = self.bundles.borrow_and_update().clone();
            let now = self.clock.now();
            if let Some(c) = verdict(&bundle, &chain, usage, now, extra.as_ref()) {
                return c;
            }
            // the verdict can change when the next certificate of the chain expires (a whole
            // second past its end, as certificate checks count in seconds)
            let next = ends
                .iter()
                .filter_map(|t| t.duration_since(now).ok())
                .min()
                .map(|left| left + Duration::from_secs(1));
            let sleep = async {
                match next {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                changed = self.bundles.changed() => {
                    if changed.is_err() {
                        // the identity manager is gone: nothing can renew trust any more
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// Why `chain` is not acceptable under `bundle` at `now` (and `extra`), if it is not.
fn verdict(
    bundle: &TrustBundle,
    chain: &[CertificateDer<'_>],
    usage: Usage,
    now: SystemTime,
    extra: Option<&ExtraCheck>,
) -> Option<CutOff> {
    let at = unix_time(now)?;
    match check_chain(bundle, chain, at, usage) {
        Ok(id) => extra.and_then(|f| f(bundle, &id)).map(|detail| CutOff {
            reason: CutOffReason::NotAllowed,
            detail,
        }),
        Err(e) => {
            let reason = match (&e, peer_refusal(&e)) {
                (_, Some(PeerRefusal::Revoked(_))) => CutOffReason::Revoked,
                (
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. },
                    ),
                    _,
                ) => CutOffReason::Expired,
                _ => CutOffReason::Untrusted,
            };
            Some(CutOff {
                reason,
                detail: describe_tls_error(&e),
            })
        }
    }
}
