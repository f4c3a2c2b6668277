//! The public HTTP front: HTTP/1.1 and HTTP/2 (ALPN) over TLS with a certificate chosen by SNI,
//! and an optional plain-HTTP listener. It owns sockets, TLS and connection lifetimes (header
//! read timeout answered with 408, graceful drain); what to do with a request is the
//! [`Handler`]'s business.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
};
use tracing::{debug, warn};

use super::{Body, respond::Problem};
use crate::drain::Drain;

/// A certificate and its key, PEM files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1). Keep it 0600.
    pub key_file: PathBuf,
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

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate (leaf), when the client presented one and it verified against
    /// the configured client CA (edge mTLS).
    pub client_cert: Option<Arc<rustls_pki_types::CertificateDer<'static>>>,
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

/// What the front calls for every request.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
}

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    /// Bytes hyper buffers for a request head; larger heads get 431 from hyper itself.
    pub max_head_bytes: usize,
    /// Time allowed for a request head to arrive (408 after it).
    pub header_read_timeout: Duration,
}

/// Picks a certificate by SNI: exact DNS names, then `*.` wildcards, else the first.
#[derive(Debug)]
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(self.default.clone());
        };
        if let Some(c) = self.by_name.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return Some(c.clone());
        }
        Some(self.default.clone())
    }
}

fn cert_err(path: &std::path::Path, reason: impl ToString) -> FrontError {
    FrontError::Cert {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A TLS acceptor for the public listener: every certificate in `certs`, chosen by SNI (the
/// first is the default), ALPN h2 and http/1.1.
/// With `client_auth`, client certificates are verified against its CAs (chain, validity,
/// EKU clientAuth); without a certificate the handshake still succeeds unless `required`.
pub fn tls_acceptor(
    certs: &[CertFiles],
    client_auth: Option<&ClientAuth>,
) -> Result<tokio_rustls::TlsAcceptor, FrontError> {
    let provider = meshgate_ca::verify::crypto_provider();
    let mut by_name = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in certs {
        let chain = meshgate_ca::pki::read_pem_certs(&c.cert_file)
            .map_err(|e| cert_err(&c.cert_file, e))?;
        let key =
            PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| cert_err(&c.key_file, e))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| cert_err(&c.key_file, e))?;
        let leaf = chain[0].clone();
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        certified
            .keys_match()
            .map_err(|e| cert_err(&c.key_file, format!("does not match the certificate: {e}")))?;
        let (_, parsed) = x509_names(&leaf).map_err(|e| cert_err(&c.cert_file, e))?;
        for name in parsed {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_owned(), certified.clone()),
                None => by_name.insert(name, certified.clone()),
            };
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or_else(|| FrontError::Cert {
        path: "tls.certs".into(),
        reason: "at least one certificate is needed for the HTTPS listener".into(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("invariant: aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(client_verifier(client_auth, provider_for_clients())?)
        .with_cert_resolver(Arc::new(SniResolver {
            by_name,
            wildcard,
            default,
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn provider_for_clients() -> Arc<rustls::crypto::CryptoProvider> {
    meshgate_ca::verify::crypto_provider()
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
fn x509_names(der: &[u8]) -> Result<((), Vec<String>), String> {
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
    Ok(((), names))
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
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut io = self.0.lock().expect("invariant: io lock not poisoned");
        Pin::new(&mut *io).poll_shutdown(cx)
    }
}

/// Accepts on `listener` (TLS when `tls` is set) until draining starts; open connections then
/// finish their requests (HTTP/2 gets GOAWAY).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<dyn Handler>,
    limits: FrontLimits,
    drain: Drain,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "public accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.started() => return,
        };
        let (tls, handler, drain) = (tls.clone(), handler.clone(), drain.clone());
        tokio::spawn(async move {
            let _tracked = drain.track();
            let _ = tcp.set_nodelay(true);
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => {
                            let client_cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| Arc::new(c.clone().into_owned()));
                            let info = ConnInfo {
                                peer,
                                tls: true,
                                client_cert,
                            };
                            connection(stream, info, handler, limits, drain).await
                        }
                        Ok(Err(e)) => {
                            debug!(src.addr = %peer, error = %e, "public TLS handshake failed")
                        }
                        Err(_) => debug!(src.addr = %peer, "public TLS handshake timed out"),
                    }
                }
                None => {
                    let info = ConnInfo {
                        peer,
                        tls: false,
                        client_cert: None,
                    };
                    connection(tcp, info, handler, limits, drain).await
                }
            }
        });
    }
}

async fn connection<T>(
    io: T,
    info: ConnInfo,
    handler: Arc<dyn Handler>,
    limits: FrontLimits,
    drain: Drain,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Mutex::new(io));
    let info = Arc::new(info);
    let svc = {
        let info = info.clone();
        hyper::service::service_fn(move |req| {
            let fut = handler.handle(req, info.clone());
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(SharedIo(shared.clone())), svc);
    let mut conn = std::pin::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.started() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            // hyper closes silently when the head does not arrive; say why first
            let id = format!(
                "{:016x}",
                u64::from_le_bytes(meshgate_ca::pki::random_bytes::<8>())
            );
            let mut w = SharedIo(shared);
            let _ = w.write_all(&Problem::RequestTimeout.raw_http1(&id)).await;
            let _ = w.shutdown().await;
            debug!(src.addr = %info.peer, "request head timed out: 408");
        } else {
            debug!(src.addr = %info.peer, error = %e, "public connection ended with an error");
        }
    }
}
