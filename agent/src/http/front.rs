//! Fronts: where HTTP connections come in and are handed to a [`Handler`] request by request.
//! It owns sockets, TLS and connection lifetimes, never what a request means:
//!
//! - accept with a connection cap (over it, new connections are closed at once and counted);
//! - TLS (certificates by SNI, ALPN h2/http1.1, optional client certificates) or plain, where
//!   HTTP/2 with prior knowledge (h2c) is recognised by its preface;
//! - timeouts: a connection with no request in progress is closed after `idle_timeout`
//!   (quietly: no unrequested 408; this covers connections that never send a byte and half an
//!   HTTP/2 preface); an HTTP/1.1 request head that started arriving must complete within
//!   `header_read_timeout` (408);
//! - HTTP/2 limits: concurrent streams per connection, header list size, and a reset-flood
//!   guard: a connection whose peer cancels more streams per second than it lets complete
//!   (and more than `reset_flood_limit`) is cut off — the rapid-reset and "made you reset"
//!   attacks — while ordinary cancellations never trip it;
//! - graceful drain (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close` after the request in flight).
//!
//! The mesh inbound port uses the same machinery with mutual TLS ([`Security::Mesh`]).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
};
use tracing::{debug, info, warn};

use super::{Body, body::ResponseBody, respond::Problem};
pub use super::{ctx::ConnInfo, pipeline::Handler};
use crate::{drain::Drain, telemetry::Metrics};

/// A certificate and its key, PEM files. The files are watched: a renewed certificate (an
/// ACME client such as certbot replacing them) is served without a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1). Keep it 0600.
    pub key_file: PathBuf,
    /// A DER-encoded OCSP response for the certificate, stapled to every handshake (refresh the
    /// file, e.g. with `openssl ocsp`, before it expires; it is re-read like the certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocsp_file: Option<PathBuf>,
}

/// Why the front could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// A certificate or key file is unusable.
    #[error("{path}: {reason}")]
    Cert {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Client certificates on the public listener (edge mTLS).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM bundle of the CAs whose client certificates are accepted.
    pub ca_file: PathBuf,
    /// Refuse TLS handshakes without a client certificate. Default false: routes that need one
    /// ask for it (`auth.mtls`), others serve anyone.
    #[serde(default)]
    pub required: bool,
}

/// The lowest TLS version the public listener accepts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum MinTls {
    /// TLS 1.2 and 1.3 with Mozilla's "intermediate" profile: ECDHE key exchange and AEAD
    /// ciphers only (no TLS 1.0/1.1, no CBC, no static RSA). The default.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Connection-level limits of a front.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    /// Bytes hyper buffers for a request head; the pipeline answers 431 below this.
    pub max_head_bytes: usize,
    /// Time allowed for a request head to arrive once it started (408 after it).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// TLS handshakes must finish within this.
    pub handshake_timeout: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Streams per second a peer may cancel before its connection is cut off (when it also
    /// cancels more than it lets complete).
    pub reset_flood_limit: u32,
    /// HTTP/2 stream window.
    pub stream_window: u32,
    /// HTTP/2 connection window.
    pub connection_window: u32,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_concurrent_streams: 128,
            reset_flood_limit: 200,
            stream_window: 1 << 20,
            connection_window: 4 << 20,
        }
    }
}

/// How connections on a listener are secured.
#[derive(Clone)]
pub enum Security {
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge.
    Plain,
    /// TLS with ALPN h2 / http/1.1; client certificates when the acceptor asks for them.
    Tls(tokio_rustls::TlsAcceptor),
    /// The mesh inbound port: mutual TLS with SVIDs, HTTP/2 only; the peer's SPIFFE ID goes
    /// into [`ConnInfo::peer_id`]. The watch closes a connection once the peer's certificate
    /// stops being trusted (expired, its root left the bundle, revoked).
    Mesh(tokio_rustls::TlsAcceptor, crate::identity::PeerWatch),
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Security::Plain => "Plain",
            Security::Tls(_) => "Tls",
            Security::Mesh(..) => "Mesh",
        })
    }
}

/// Picks a certificate by SNI: exact DNS names, then `*.` wildcards, else the first.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn resolve(&self, hello: &ClientHello<'_>) -> Arc<CertifiedKey> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(c) = self.by_name.get(&name) {
            return c.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return c.clone();
        }
        self.default.clone()
    }
}

/// The public listener's certificates, re-read when their files change.
#[derive(Debug)]
pub struct Certificates {
    files: Vec<CertFiles>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: arc_swap::ArcSwap<SniResolver>,
    stamp: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().resolve(&hello))
    }
}

fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Certificates {
    fn stamps(files: &[CertFiles]) -> Vec<Option<std::time::SystemTime>> {
        files
            .iter()
            .flat_map(|f| {
                [Some(&f.cert_file), Some(&f.key_file), f.ocsp_file.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| modified(p))
            })
            .collect()
    }

    /// Re-reads the files if any changed since the last load; a set that fails to load keeps
    /// the current certificates (and says why). Returns whether new certificates are served.
    pub fn reload_if_changed(&self) -> Result<bool, FrontError> {
        let now = Self::stamps(&self.files);
        {
            let stamp = self
                .stamp
                .lock()
                .expect("invariant: stamp lock not poisoned");
            if *stamp == now {
                return Ok(false);
            }
        }
        let next = load_certs(&self.files, &self.provider)?;
        self.current.store(Arc::new(next));
        *self
            .stamp
            .lock()
            .expect("invariant: stamp lock not poisoned") = now;
        Ok(true)
    }

    /// Checks the files every `every` and serves renewed certificates; logs each outcome once
    /// and tells `outcome` about every load attempt (`true`: new certificates served).
    pub fn spawn_watch(
        self: &Arc<Self>,
        every: Duration,
        outcome: impl Fn(bool) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut failing: Option<String> = None;
            loop {
                tokio::time::sleep(every).await;
                match me.reload_if_changed() {
                    Ok(true) => {
                        failing = None;
                        outcome(true);
                        tracing::info!("TLS certificates reloaded from their files");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // a half-written renewal fails until its last file lands: counted each
                        // time, logged once per distinct reason
                        outcome(false);
                        let why = e.to_string();
                        if failing.as_deref() != Some(why.as_str()) {
                            warn!(error = %why, "TLS certificate files changed but cannot be used; the current certificates keep serving");
                        }
                        failing = Some(why);
                    }
                }
            }
        })
    }
}

fn load_certs(
    certs: &[CertFiles],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<SniResolver, FrontError> {
    let mut by_name = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in certs {
        let chain = meshgate_ca::pki::read_pem_certs(&c.cert_file)
            .map_err(|e| cert_err(&c.cert_file, e))?;
        if chain.is_empty() {
            return Err(cert_err(&c.cert_file, "no certificate in the file"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| cert_err(&c.key_file, e))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| cert_err(&c.key_file, e))?;
        let leaf = chain[0].clone();
        let mut certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| cert_err(&c.key_file, format!("does not match the certificate: {e}")))?;
        if let Some(ocsp) = &c.ocsp_file {
            let der = std::fs::read(ocsp).map_err(|e| cert_err(ocsp, e))?;
            if der.is_empty() {
                return Err(cert_err(ocsp, "the OCSP response file is empty"));
            }
            certified.ocsp = Some(der);
        }
        let certified = Arc::new(certified);
        let parsed = x509_names(&leaf).map_err(|e| cert_err(&c.cert_file, e))?;
        for name in parsed {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_owned(), certified.clone()),
                None => by_name.insert(name, certified.clone()),
            };
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or_else(|| FrontError::Cert {
        path: "tls".into(),
        reason: "at least one certificate is needed for the HTTPS listener".into(),
    })?;
    Ok(SniResolver {
        by_name,
        wildcard,
        default,
    })
}

fn cert_err(path: &std::path::Path, reason: impl ToString) -> FrontError {
    FrontError::Cert {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The cipher suites of Mozilla's "intermediate" profile that rustls implements: every TLS 1.3
/// suite, and for TLS 1.2 only ECDHE with AEAD ciphers.
fn intermediate_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut p = (*meshgate_ca::verify::crypto_provider()).clone();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    p
}

/// A TLS acceptor for the public listener: every certificate in `certs`, chosen by SNI (the
/// first is the default), ALPN h2 and http/1.1, TLS 1.2+1.3 (intermediate profile) or 1.3 only.
/// With `client_auth`, client certificates are verified against its CAs (chain, validity,
/// EKU clientAuth); without a certificate the handshake still succeeds unless `required`.
/// Session tickets are off and the session cache is the default; the returned
/// [`Certificates`] re-read their files when asked ([`Certificates::spawn_watch`]).
pub fn tls_acceptor(
    certs: &[CertFiles],
    client_auth: Option<&ClientAuth>,
    min: MinTls,
) -> Result<(tokio_rustls::TlsAcceptor, Arc<Certificates>), FrontError> {
    let provider = Arc::new(intermediate_provider());
    let resolver = load_certs(certs, &provider)?;
    let certificates = Arc::new(Certificates {
        files: certs.to_vec(),
        provider: provider.clone(),
        current: arc_swap::ArcSwap::from_pointee(resolver),
        stamp: std::sync::Mutex::new(Certificates::stamps(certs)),
    });
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        MinTls::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinTls::Tls13 => &[&rustls::version::TLS13],
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| cert_err(std::path::Path::new("tls"), e))?
        .with_client_cert_verifier(client_verifier(client_auth, provider)?)
        .with_cert_resolver(certificates.clone());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), certificates))
}

fn client_verifier(
    client_auth: Option<&ClientAuth>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, FrontError> {
    let Some(ca) = client_auth else {
        return Ok(rustls::server::WebPkiClientVerifier::no_client_auth());
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in meshgate_ca::pki::read_pem_certs(&ca.ca_file).map_err(|e| cert_err(&ca.ca_file, e))? {
        roots.add(c).map_err(|e| cert_err(&ca.ca_file, e))?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if ca.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| cert_err(&ca.ca_file, e))
}

/// The DNS names of a certificate (SAN dNSName entries), lowercase.
fn x509_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// Connection state: timeouts and the reset-flood guard
// ---------------------------------------------------------------------------------------------

/// What a connection's watchdog and its requests share.
#[derive(Debug)]
struct ConnState {
    start: tokio::time::Instant,
    /// Requests whose response has not finished.
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `start` + 1 when the first byte of an HTTP/1.1 head arrived while
    /// idle; 0 when none.
    head_since: AtomicU64,
    h1: bool,
    window: AtomicU64,
    cancelled: AtomicU32,
    completed: AtomicU32,
    flood_limit: u32,
    flooded: AtomicBool,
    kill: Notify,
    head: Notify,
}

impl ConnState {
    fn new(h1: bool, flood_limit: u32) -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h1,
            window: AtomicU64::new(0),
            cancelled: AtomicU32::new(0),
            completed: AtomicU32::new(0),
            flood_limit,
            flooded: AtomicBool::new(false),
            kill: Notify::new(),
            head: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn on_read(&self) {
        if self.h1
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
            // the watchdog sleeps towards the idle deadline: move it to the head's
            self.head.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> StreamWatch {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        StreamWatch {
            conn: self.clone(),
            answered: false,
        }
    }

    fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Counts a stream outcome in the current one-second window; trips the guard on a flood.
    fn outcome(&self, cancelled: bool) {
        let sec = self.now_ms() / 1000;
        if self.window.swap(sec, Ordering::Relaxed) != sec {
            self.cancelled.store(0, Ordering::Relaxed);
            self.completed.store(0, Ordering::Relaxed);
        }
        if !cancelled {
            self.completed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let c = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        if c > self.flood_limit
            && c > self.completed.load(Ordering::Relaxed)
            && !self.flooded.swap(true, Ordering::Relaxed)
        {
            self.kill.notify_one();
        }
    }
}

/// Keeps a connection busy (not idle) while work that outlives a request runs on it, such as
/// the stream of a tunnel CONNECT after its `200`.
#[derive(Debug, Clone)]
pub struct ConnHold(Arc<ConnState>);

impl ConnHold {
    /// The connection counts as busy until the guard drops.
    pub fn hold(&self) -> HoldGuard {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        HoldGuard(self.0.clone())
    }
}

/// See [`ConnHold::hold`].
#[derive(Debug)]
pub struct HoldGuard(Arc<ConnState>);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// One request on a connection: counts it in flight, and as cancelled if it is dropped before
/// its response head was produced (the peer reset the stream).
#[derive(Debug)]
struct StreamWatch {
    conn: Arc<ConnState>,
    answered: bool,
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        if !self.answered {
            self.conn.outcome(true);
        }
        self.conn.end();
    }
}

/// Reads through to `io`, telling the connection state when bytes arrive.
struct Watched<T> {
    io: T,
    state: Arc<ConnState>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An IO that hyper drives while we keep a handle to write a last answer (the 408) after hyper
/// gave the connection up.
struct SharedIo<T>(Arc<Mutex<T>>);

impl<T: AsyncRead + Unpin> AsyncRead for SharedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SharedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_shutdown(cx)
    }
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Nothing in progress for `idle_timeout`.
    Idle,
    /// An HTTP/1.1 head did not complete in time.
    Head,
    /// The peer flooded the connection with resets.
    Flood,
}

/// Resolves when the connection should end, rechecking only at deadlines (no timer work per
/// request).
async fn watchdog(state: &ConnState, limits: &FrontLimits) -> Expiry {
    loop {
        let wake = if state.in_flight.load(Ordering::Relaxed) > 0 {
            // requests in progress are bounded by their own timeouts; look again later
            Some(limits.idle_timeout.min(limits.header_read_timeout))
        } else {
            let now = state.now_ms();
            let head = state.head_since.load(Ordering::Relaxed);
            if head > 0 {
                let deadline = head - 1 + ms(limits.header_read_timeout);
                if now >= deadline {
                    return Expiry::Head;
                }
                Some(Duration::from_millis(deadline - now))
            } else {
                let deadline = state.idle_since.load(Ordering::Relaxed) + ms(limits.idle_timeout);
                if now >= deadline {
                    return Expiry::Idle;
                }
                Some(Duration::from_millis(deadline - now))
            }
        };
        let wait = wake.unwrap_or(limits.idle_timeout);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = state.head.notified() => {}
            () = state.kill.notified() => return Expiry::Flood,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// Which HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (upgrades supported).
    Http1,
    /// HTTP/2.
    Http2,
}

/// Everything a front needs.
#[derive(Clone)]
pub struct Front {
    /// What answers requests.
    pub handler: Arc<dyn Handler>,
    /// Limits.
    pub limits: FrontLimits,
    /// Drain state.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The listener's name in logs and metrics (`https`, `http`, `inbound`).
    pub name: &'static str,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Accepts on `listener` until draining starts; open connections then finish what they carry.
pub async fn serve(listener: TcpListener, security: Security, front: Front) {
    let permits = Arc::new(Semaphore::new(front.limits.max_connections));
    let mut last_full_warning: Option<Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(listener = front.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = front.drain.started() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            front.metrics.connection_refused(front.name, "limit");
            if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                warn!(
                    listener = front.name,
                    limit = front.limits.max_connections,
                    "connection limit reached; closing new connections"
                );
                last_full_warning = Some(Instant::now());
            }
            drop(tcp);
            continue;
        };
        let (security, front) = (security.clone(), front.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _tracked = front.drain.track();
            front.metrics.connection_opened(front.name);
            accept(tcp, peer, security, &front).await;
            front.metrics.connection_closed(front.name);
        });
    }
}

async fn accept(tcp: TcpStream, peer: SocketAddr, security: Security, front: &Front) {
    let _ = tcp.set_nodelay(true);
    let limits = &front.limits;
    match security {
        Security::Plain => {
            let proto = match sniff(&tcp, limits).await {
                Some(p) => p,
                None => {
                    debug!(src.addr = %peer, "connection sent no request in time; closed");
                    return;
                }
            };
            serve_io(tcp, ConnInfo::plain(peer), proto, front).await;
        }
        Security::Tls(ref acceptor) | Security::Mesh(ref acceptor, _) => {
            let mesh = matches!(security, Security::Mesh(..));
            let handshake_started = std::time::Instant::now();
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        front.metrics.handshake_done(
                            if mesh { "inbound" } else { "edge" },
                            handshake_started.elapsed(),
                        );
                        s
                    }
                    Ok(Err(e)) => {
                        if mesh {
                            front
                                .metrics
                                .handshake_failed(crate::telemetry::Direction::Inbound);
                            let error = crate::identity::error_chain(&e);
                            warn!(src.addr = %peer, %error, "inbound handshake refused");
                        } else {
                            let error = crate::identity::error_chain(&e);
                            debug!(src.addr = %peer, %error, "TLS handshake failed");
                        }
                        return;
                    }
                    Err(_) => {
                        if mesh {
                            front
                                .metrics
                                .handshake_failed(crate::telemetry::Direction::Inbound);
                        }
                        debug!(src.addr = %peer, "TLS handshake timed out");
                        return;
                    }
                };
            let session = tls.get_ref().1;
            let leaf = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let chain: Vec<rustls_pki_types::CertificateDer<'static>> = session
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let h2 = session.alpn_protocol() == Some(b"h2");
            let mut info = ConnInfo::plain(peer);
            info.tls = true;
            if mesh {
                info.set_peer(
                    leaf.as_ref()
                        .and_then(|l| meshgate_ca::pki::CertInfo::from_der(l).ok())
                        .and_then(|i| {
                            i.spiffe_uri()
                                .and_then(|u| meshgate_ca::spiffe::SpiffeId::parse(u).ok())
                        }),
                );
                if !h2 {
                    debug!(src.addr = %peer, "mesh peer did not negotiate h2; closed");
                    return;
                }
            } else {
                info.client_cert = leaf.map(Arc::new);
            }
            let proto = if h2 { Proto::Http2 } else { Proto::Http1 };
            let _listed = mesh.then(|| {
                front.metrics.peers.opened(
                    crate::telemetry::Direction::Inbound,
                    peer,
                    info.peer_id
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    crate::transport::hbone::tls_version(session.protocol_version()),
                )
            });
            if mesh {
                front
                    .metrics
                    .tunnel_opened(crate::telemetry::Direction::Inbound);
                debug!(src.addr = %peer, peer.identity = info.peer_id.as_ref().map(ToString::to_string).unwrap_or_default(), "tunnel accepted");
            }
            match &security {
                Security::Mesh(_, watch) => {
                    let peer_id = info.peer_id.as_ref().map(ToString::to_string);
                    let cut =
                        watch
                            .clone()
                            .cut_off(chain, meshgate_ca::verify::Usage::Client, None);
                    tokio::select! {
                        () = serve_io(tls, info, proto, front) => {}
                        c = cut => {
                            front.metrics.tunnel_cut_off(crate::telemetry::Direction::Inbound, c.reason.as_str());
                            info!(src.addr = %peer, peer.identity = peer_id.unwrap_or_default(), reason = c.reason.as_str(), "closing tunnel connection: {c}");
                        }
                    }
                }
                _ => serve_io(tls, info, proto, front).await,
            }
            if mesh {
                front
                    .metrics
                    .tunnel_closed(crate::telemetry::Direction::Inbound);
            }
        }
    }
}

/// Waits (up to the idle timeout) for the first bytes of a plain connection and tells
/// HTTP/2 prior knowledge (the connection preface) from HTTP/1.1.
async fn sniff(tcp: &TcpStream, limits: &FrontLimits) -> Option<Proto> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    let started = Instant::now();
    let mut budget = limits.idle_timeout;
    loop {
        // the deadline covers the peek itself: readiness can be reported before any byte is
        // there, and a peek then waits for data with no limit of its own
        let peeked = match tokio::time::timeout(budget, tcp.peek(&mut buf)).await {
            Ok(r) => r,
            Err(_) => return None,
        };
        match peeked {
            Ok(0) => return None,
            Ok(n) => {
                if buf[..n] != PREFACE[..n] {
                    return Some(Proto::Http1);
                }
                if n == PREFACE.len() {
                    return Some(Proto::Http2);
                }
                // part of the preface: the rest must come within the head timeout
                budget = limits.header_read_timeout.saturating_sub(started.elapsed());
                if budget.is_zero() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Serves one established connection speaking `proto` until it ends, draining on signal.
pub async fn serve_io<T>(io: T, info: ConnInfo, proto: Proto, front: &Front)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = front.limits;
    let state = ConnState::new(proto == Proto::Http1, limits.reset_flood_limit);
    let mut info = info;
    info.hold = Some(ConnHold(state.clone()));
    let info = Arc::new(info);
    let svc = {
        let (state, info, handler) = (state.clone(), info.clone(), front.handler.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut watch = state.begin();
            let fut = handler.handle(req, info.clone());
            async move {
                let resp = fut.await;
                watch.answered = true;
                watch.conn.outcome(false);
                let (parts, body) = resp.into_parts();
                let body = ResponseBody::new(body).guard(Box::new(watch));
                Ok::<_, std::convert::Infallible>(Response::from_parts(
                    parts,
                    http_body_util::BodyExt::boxed(body),
                ))
            }
        })
    };
    match proto {
        Proto::Http2 => {
            let watched = Watched {
                io,
                state: state.clone(),
            };
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
                .initial_stream_window_size(limits.stream_window)
                .initial_connection_window_size(limits.connection_window)
                .max_frame_size(64 * 1024)
                .max_local_error_reset_streams(Some(65_536))
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = b.serve_connection(TokioIo::new(watched), svc);
            let mut conn = std::pin::pin!(conn);
            let end = tokio::select! {
                r = conn.as_mut() => {
                    match r.err() {
                        // h2's own guard (streams reset before they were accepted) fired
                        // before ours could see them: the same attack, counted the same way
                        Some(e) if h2_reset_flood(&e) => flooded(&info, front),
                        e => log_end(&info, front.name, e),
                    }
                    return;
                }
                () = front.drain.started() => None,
                e = watchdog(&state, &limits) => Some(e),
            };
            match end {
                None | Some(Expiry::Idle) | Some(Expiry::Head) => {
                    conn.as_mut().graceful_shutdown();
                    let grace = if end.is_none() {
                        Duration::from_secs(3600)
                    } else {
                        Duration::from_secs(5)
                    };
                    let _ = tokio::time::timeout(grace, conn).await;
                }
                Some(Expiry::Flood) => flooded(&info, front),
            }
        }
        Proto::Http1 => {
            let shared = Arc::new(Mutex::new(Watched {
                io,
                state: state.clone(),
            }));
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(None)
                .max_buf_size(limits.max_head_bytes.max(8192) + 8192);
            let conn = b
                .serve_connection(TokioIo::new(SharedIo(shared.clone())), svc)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let end = tokio::select! {
                r = conn.as_mut() => { log_end(&info, front.name, r.err()); return; }
                () = front.drain.started() => None,
                e = watchdog(&state, &limits) => Some(e),
            };
            match end {
                None => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                Some(Expiry::Idle) => {
                    debug!(src.addr = %info.peer, listener = front.name, "idle connection closed");
                }
                Some(Expiry::Head) => {
                    // hyper is no longer polled; answer below it
                    let mut w = SharedIo(shared);
                    let _ = w
                        .write_all(
                            &Problem::RequestTimeout.raw_http1(&super::ctx::Ctx::new_request_id()),
                        )
                        .await;
                    let _ = w.shutdown().await;
                    debug!(src.addr = %info.peer, "request head timed out: 408");
                }
                Some(Expiry::Flood) => flooded(&info, front),
            }
        }
    }
}

fn flooded(info: &ConnInfo, front: &Front) {
    front.metrics.reset_flood(front.name);
    warn!(src.addr = %info.peer, peer.identity = info.peer_id.as_ref().map(ToString::to_string).unwrap_or_default(), listener = front.name, "peer cancelled streams faster than it let them complete; connection cut off");
}

/// Whether hyper ended an HTTP/2 connection because the h2 library sent GOAWAY
/// ENHANCE_YOUR_CALM itself: the peer reset more streams than it allows before they were even
/// handed to us (HEADERS followed at once by RST_STREAM, the rapid-reset attack).
fn h2_reset_flood(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            return h.is_go_away()
                && !h.is_remote()
                && h.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = s.source();
    }
    false
}

fn log_end(info: &ConnInfo, name: &str, e: Option<hyper::Error>) {
    if let Some(e) = e {
        debug!(src.addr = %info.peer, listener = name, error = %e, "connection ended with an error");
    }
}

/// A handler from a closure, for tests and small compositions.
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Request<Incoming>, Arc<ConnInfo>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        Box::pin((self.0)(req, conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flood_guard_trips_only_on_more_cancels_than_completions() {
        let s = ConnState::new(false, 10);
        for _ in 0..50 {
            s.outcome(false);
        }
        for _ in 0..40 {
            s.outcome(true);
        }
        assert!(
            !s.flooded.load(Ordering::Relaxed),
            "40 cancels beside 50 completions"
        );
        let s = ConnState::new(false, 10);
        for _ in 0..10 {
            s.outcome(true);
        }
        assert!(!s.flooded.load(Ordering::Relaxed), "at the limit");
        s.outcome(true);
        assert!(
            s.flooded.load(Ordering::Relaxed),
            "over the limit, nothing completed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_tells_idle_from_a_slow_head() {
        let limits = FrontLimits {
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            ..FrontLimits::default()
        };
        let s = ConnState::new(true, 10);
        assert_eq!(watchdog(&s, &limits).await, Expiry::Idle);
        let s = ConnState::new(true, 10);
        s.on_read();
        assert_eq!(watchdog(&s, &limits).await, Expiry::Head);
        let s = ConnState::new(true, 10);
        let w = s.begin();
        let t = tokio::spawn({
            let s = s.clone();
            async move {
                let l = FrontLimits {
                    idle_timeout: Duration::from_secs(60),
                    header_read_timeout: Duration::from_secs(10),
                    ..FrontLimits::default()
                };
                watchdog(&s, &l).await
            }
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!t.is_finished(), "a request in flight keeps the connection");
        drop(w);
        assert_eq!(t.await.expect("join"), Expiry::Idle);
    }
}
