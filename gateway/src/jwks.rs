//! JWKS fetching and caching for JWT providers: keys from a `jwks_uri` (refreshed on an
//! interval and refetched, rate limited, when a token names an unknown `kid`), a `jwks_file`
//! or inline. A failed fetch keeps the last good key set, and is logged and counted by why it
//! failed: `dns`, `tcp`, `tls`, `http_status`, `bad_json`, `io`.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tracing::{info, warn};

use crate::jwt::{JwtProviderConfig, KeySet};

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
enum KeySource {
    Uri(String),
    File(PathBuf),
    Inline(Vec<u8>),
    /// Only the HMAC secret file.
    None,
}

/// JWKS fetch failures by provider and reason.
pub type FetchFailures = Family<Vec<(&'static str, String)>, Counter>;

/// One provider's keys.
pub struct JwksCache {
    provider: String,
    source: KeySource,
    hmac_secret_file: Option<PathBuf>,
    keys: ArcSwap<KeySet>,
    http: reqwest::Client,
    refresh: Duration,
    min_refetch: Duration,
    last_fetch: Mutex<Option<Instant>>,
    last_error: Mutex<Option<(&'static str, String)>>,
    failures: FetchFailures,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("provider", &self.provider)
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

fn classify(e: &reqwest::Error) -> &'static str {
    let chain = {
        let mut s = e.to_string();
        let mut cur = std::error::Error::source(e);
        while let Some(inner) = cur {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            cur = inner.source();
        }
        s.to_ascii_lowercase()
    };
    if chain.contains("dns")
        || chain.contains("failed to lookup")
        || chain.contains("name or service not known")
    {
        "dns"
    } else if chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake")
    {
        "tls"
    } else {
        // connect failures, resets and timeouts
        "tcp"
    }
}

impl JwksCache {
    /// A cache for `cfg`; `ca` is the PEM bundle trusted for `https` JWKS URIs (default: the
    /// system roots). The first load happens in [`JwksCache::load`].
    pub fn new(
        cfg: &JwtProviderConfig,
        ca: Option<&std::path::Path>,
        failures: FetchFailures,
    ) -> Result<Self, String> {
        let source = match (&cfg.jwks_uri, &cfg.jwks_file, &cfg.jwks) {
            (Some(u), None, None) => KeySource::Uri(u.clone()),
            (None, Some(f), None) => KeySource::File(f.clone()),
            (None, None, Some(v)) => {
                KeySource::Inline(serde_json::to_vec(v).map_err(|e| e.to_string())?)
            }
            (None, None, None) if cfg.hmac_secret_file.is_some() => KeySource::None,
            _ => {
                return Err(format!(
                    "jwt provider {}: set exactly one of jwks_uri, jwks_file, jwks",
                    cfg.name
                ));
            }
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            let mut roots = rustls::RootCertStore::empty();
            for c in meshgate_ca::pki::read_pem_certs(ca).map_err(|e| e.to_string())? {
                roots.add(c).map_err(|e| e.to_string())?;
            }
            let tls =
                rustls::ClientConfig::builder_with_provider(meshgate_ca::verify::crypto_provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(Self {
            provider: cfg.name.clone(),
            source,
            hmac_secret_file: cfg.hmac_secret_file.clone(),
            keys: ArcSwap::from_pointee(
                KeySet::from_jwks(br#"{"keys":[]}"#).map_err(|e| e.to_string())?,
            ),
            http: builder.build().map_err(|e| e.to_string())?,
            refresh: cfg.jwks_refresh,
            min_refetch: cfg.unknown_kid_refetch_min_interval,
            last_fetch: Mutex::new(None),
            last_error: Mutex::new(None),
            failures,
        })
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    fn fail(&self, reason: &'static str, detail: &str) {
        *self
            .last_error
            .lock()
            .expect("invariant: lock not poisoned") = Some((reason, detail.to_owned()));
        self.failures
            .get_or_create(&vec![
                ("provider", self.provider.clone()),
                ("reason", reason.to_owned()),
            ])
            .inc();
        warn!(provider = %self.provider, reason, detail, kept_keys = self.keys.load().len(), "JWKS fetch failed; keeping the last good keys");
    }

    /// Fetches and swaps in the key set; on failure the last good set stays (and the failure
    /// is logged and counted). Returns the number of keys, or the failure's reason and detail.
    pub async fn try_load(&self) -> Result<usize, (&'static str, String)> {
        if self.load().await {
            Ok(self.keys.load().len())
        } else {
            Err(self
                .last_error
                .lock()
                .expect("invariant: lock not poisoned")
                .clone()
                .unwrap_or(("unknown", String::new())))
        }
    }

    /// Fetches and swaps in the key set; on failure the last good set stays. Returns whether
    /// new keys were loaded.
    pub async fn load(&self) -> bool {
        *self
            .last_fetch
            .lock()
            .expect("invariant: lock not poisoned") = Some(Instant::now());
        let bytes = match &self.source {
            KeySource::None => br#"{"keys":[]}"#.to_vec(),
            KeySource::Inline(b) => b.clone(),
            KeySource::File(p) => match tokio::fs::read(p).await {
                Ok(b) => b,
                Err(e) => {
                    self.fail("io", &format!("{}: {e}", p.display()));
                    return false;
                }
            },
            KeySource::Uri(u) => match self.http.get(u).send().await {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) => b.to_vec(),
                    Err(e) => {
                        self.fail(classify(&e), &e.to_string());
                        return false;
                    }
                },
                Ok(r) => {
                    self.fail("http_status", &format!("{u} answered {}", r.status()));
                    return false;
                }
                Err(e) => {
                    self.fail(classify(&e), &e.to_string());
                    return false;
                }
            },
        };
        let set = KeySet::from_jwks(&bytes).map_err(|e| ("bad_json", e.to_string()));
        let set = match (set, &self.hmac_secret_file) {
            (Ok(set), Some(path)) => match tokio::fs::read(path).await {
                Ok(mut secret) => {
                    if secret.last() == Some(&b'\n') {
                        secret.pop();
                        if secret.last() == Some(&b'\r') {
                            secret.pop();
                        }
                    }
                    set.with_hmac_secret(&secret)
                        .map_err(|e| ("io", format!("{}: {e}", path.display())))
                }
                Err(e) => Err(("io", format!("{}: {e}", path.display()))),
            },
            (r, _) => r,
        };
        match set {
            Ok(set) => {
                for s in set.skipped() {
                    warn!(provider = %self.provider, reason = %s, "JWKS key skipped");
                }
                info!(provider = %self.provider, keys = set.len(), "JWKS loaded");
                self.keys.store(Arc::new(set));
                true
            }
            Err((reason, detail)) => {
                self.fail(reason, &detail);
                false
            }
        }
    }

    /// A token named a kid we do not know: refetch, at most once per the configured interval.
    /// Returns whether a fetch happened and brought keys.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        if matches!(self.source, KeySource::Inline(_) | KeySource::None) {
            return false;
        }
        {
            let last = self
                .last_fetch
                .lock()
                .expect("invariant: lock not poisoned");
            if last.is_some_and(|t| t.elapsed() < self.min_refetch) {
                return false;
            }
        }
        self.load().await
    }

    /// Refreshes the keys every `jwks_refresh`, forever.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.refresh).await;
                me.load().await;
            }
        })
    }
}
