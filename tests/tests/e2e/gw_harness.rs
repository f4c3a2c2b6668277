//! Gateway test helpers: a backend HTTP service that reports what it saw, a gateway on
//! loopback with a throwaway TLS certificate, and HTTPS clients (HTTP/1.1 and h2).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tempfile::TempDir;

use crate::harness::TestCa;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body_len: usize,
}

/// An HTTP backend on 127.0.0.1:0 answering JSON `{"service", "method", "path", "headers"}`;
/// `/slow/{ms}` sleeps first; it always sets a permissive CORS header the gateway must replace.
pub(crate) struct Backend {
    pub(crate) port: u16,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub(crate) async fn start(name: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let headers: BTreeMap<String, String> = parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_owned(),
                                            v.to_str().unwrap_or_default().to_owned(),
                                        )
                                    })
                                    .collect();
                                log.lock().expect("lock").push(Seen {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    headers: headers.clone(),
                                    body_len: body.len(),
                                });
                                if let Some(ms) = parts
                                    .uri
                                    .path()
                                    .strip_prefix("/slow/")
                                    .and_then(|m| m.parse::<u64>().ok())
                                {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                let out = json!({"service": name, "method": parts.method.as_str(), "path": parts.uri.path(), "headers": headers, "secret": "s3cr3t"});
                                let resp = http::Response::builder()
                                    .header("content-type", "application/json")
                                    .header("access-control-allow-origin", "*")
                                    .header("access-control-allow-methods", "GET, POST, DELETE")
                                    .body(Full::new(Bytes::from(out.to_string())))
                                    .expect("response");
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self { port, seen, task }
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running gateway.
pub(crate) struct TestGateway {
    pub(crate) app: meshgate_gateway::app::GatewayApp,
    pub(crate) _dir: TempDir,
    pub(crate) cert: rustls_pki_types::CertificateDer<'static>,
    pub(crate) config: meshgate_gateway::config::GatewayConfig,
}

impl TestGateway {
    /// Starts a gateway from a typed config whose files live in `dir`.
    pub(crate) async fn start(
        config: meshgate_gateway::config::GatewayConfig,
        dir: TempDir,
        cert: rustls_pki_types::CertificateDer<'static>,
    ) -> Self {
        let app = meshgate_gateway::app::GatewayApp::start(config.clone())
            .await
            .expect("gateway start");
        TestGateway {
            app,
            _dir: dir,
            cert,
            config,
        }
    }

    /// The access log written so far (empty when off).
    pub(crate) fn access_log(&self) -> String {
        self.config
            .telemetry
            .access_log
            .path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub(crate) fn http(&self) -> SocketAddr {
        self.app.http_addr().expect("http listener")
    }

    pub(crate) fn https(&self) -> SocketAddr {
        self.app.https_addr().expect("https listener")
    }

    /// One metric sample from the gateway's /metrics (0 when absent).
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        crate::harness::metric_at(self.app.admin_addr(), series).await
    }

    /// Reloads the config as started with `change` applied.
    pub(crate) async fn reload_with(
        &self,
        change: impl FnOnce(&mut meshgate_gateway::config::GatewayConfig),
    ) -> Result<(), String> {
        let mut c = self.config.clone();
        change(&mut c);
        self.app.reload(c).await.map_err(|e| e.to_string())
    }
}

impl TestCa {
    /// The config every test gateway starts from: node `gw` (identity `gateway`) with http and
    /// https listeners on port 0 and a self-signed certificate for api.example,
    /// *.api.example and localhost; `spec` adds or replaces top-level keys. Returns the typed
    /// config, the directory holding its files and the certificate.
    pub(crate) fn gateway_base(
        &self,
        spec: serde_json::Value,
    ) -> (
        meshgate_gateway::config::GatewayConfig,
        TempDir,
        rustls_pki_types::CertificateDer<'static>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec![
            "api.example".into(),
            "*.api.example".into(),
            "localhost".into(),
        ])
        .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("crt");
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("key");
        let token_file = dir.path().join("join.token");
        std::fs::write(&token_file, self.token("gw", &["gateway"])).expect("token");
        let mut cfg = json!({
            "node": "gw",
            "trust_domain": self.trust_domain,
            "data_dir": dir.path().join("data"),
            "ca": {"address": self.address(), "fingerprint": self.fingerprint(), "join_token_file": token_file},
            "listen": {"http": "127.0.0.1:0", "https": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "tls": [{"cert_file": dir.path().join("tls.crt"), "key_file": dir.path().join("tls.key")}],
            "drain_timeout": "5s",
            // the access log (on by default for gateways) goes to the test's own directory
            "telemetry": {"access_log": {"path": dir.path().join("access.log")}},
        });
        for (k, v) in spec.as_object().expect("spec object") {
            cfg[k] = v.clone();
        }
        let parsed: meshgate_gateway::config::GatewayConfig =
            serde_json::from_value(cfg).expect("gateway config");
        (parsed, dir, cert.der().clone())
    }

    /// A gateway from [`TestCa::gateway_base`] with `spec` applied.
    pub(crate) async fn gateway(&self, spec: serde_json::Value) -> TestGateway {
        let (cfg, dir, cert) = self.gateway_base(spec);
        TestGateway::start(cfg, dir, cert).await
    }
}

/// A response as tests look at it.
#[derive(Debug)]
pub(crate) struct Got {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: String,
}

impl Got {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One request over plain HTTP/1.1 to `addr`, `Host: host`.
pub(crate) async fn plain(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Got {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    send(
        &mut Sender::H1(&mut sender),
        method,
        host,
        path,
        headers,
        body,
        false,
    )
    .await
}

/// A keep-alive HTTP/1.1 connection for many requests.
pub(crate) struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    pub(crate) async fn open(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        Self(sender)
    }

    pub(crate) async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Got {
        send(
            &mut Sender::H1(&mut self.0),
            "GET",
            host,
            path,
            headers,
            b"",
            false,
        )
        .await
    }
}

pub(crate) enum Sender<'a> {
    H1(&'a mut hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn send(
    s: &mut Sender<'_>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    h2: bool,
) -> Got {
    let uri = if h2 {
        format!("https://{host}{path}")
    } else {
        path.to_owned()
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    if !h2 {
        b = b.header("host", host);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let resp = match s {
        Sender::H1(s) => {
            // a keep-alive connection is ready again only once the previous exchange is done
            s.ready().await.expect("connection ready");
            s.send_request(req).await.expect("response")
        }
        Sender::H2(s) => s.send_request(req).await.expect("response"),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// One request over TLS (SNI `host`) with HTTP/2 or HTTP/1.1 chosen by ALPN.
pub(crate) async fn tls(
    gw: &TestGateway,
    h2: bool,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Got {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(gw.cert.clone()).expect("root");
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = tokio::net::TcpStream::connect(gw.https())
        .await
        .expect("connect");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from(host.to_owned()).expect("sni"),
            tcp,
        )
        .await
        .expect("TLS handshake with the gateway");
    let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert_eq!(
        negotiated.as_deref(),
        Some(if h2 { &b"h2"[..] } else { &b"http/1.1"[..] })
    );
    let io = hyper_util::rt::TokioIo::new(stream);
    if h2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .expect("h2");
        tokio::spawn(conn);
        send(&mut Sender::H2(s), method, host, path, headers, body, true).await
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
        tokio::spawn(conn);
        send(
            &mut Sender::H1(&mut s),
            method,
            host,
            path,
            headers,
            body,
            false,
        )
        .await
    }
}
