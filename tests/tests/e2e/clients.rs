//! Clients that attack from outside: raw HTTP/1.1 over a socket (any request-target, byte for
//! byte), HTTP/2 with prior knowledge (h2c) and HTTP/2 over TLS, and Python processes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gw_harness::Got;

/// One raw HTTP/1.1 request (`Connection: close`) with `target` sent exactly as given; the
/// answer parsed from what came back before the server closed (at most 10 s).
pub(crate) async fn raw_h1(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no complete answer in 10s"))
        .expect("read");
    parse_h1(&buf).unwrap_or_else(|| {
        panic!(
            "{method} {target}: not an HTTP answer: {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

/// [`raw_h1`] without headers, `None` when the server closed without an HTTP answer.
pub(crate) async fn try_raw_h1(addr: SocketAddr, method: &str, target: &str) -> Option<Got> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    parse_h1(&buf)
}

/// Parses one HTTP/1.1 response (Content-Length, chunked, or until close).
pub(crate) fn parse_h1(buf: &[u8]) -> Option<Got> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = http::HeaderMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let rest = &buf[end + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        dechunk(rest)?
    } else if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        rest.get(..n)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// An HTTP/2 connection (h2c prior knowledge, or TLS with ALPN h2) for many requests.
#[derive(Clone)]
pub(crate) struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    scheme: &'static str,
}

impl H2 {
    /// HTTP/2 with prior knowledge over plain TCP.
    pub(crate) async fn h2c(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2c handshake");
        tokio::spawn(conn);
        Self {
            sender,
            scheme: "http",
        }
    }

    /// HTTP/2 over TLS to `addr`, trusting `root`, SNI `sni`.
    pub(crate) async fn tls(
        addr: SocketAddr,
        root: &rustls_pki_types::CertificateDer<'static>,
        sni: &str,
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).expect("root");
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("sni"),
                tcp,
            )
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        Self {
            sender,
            scheme: "https",
        }
    }

    /// Whether `path` can be sent as an HTTP/2 `:path` by this client (the `http` crate refuses
    /// a few bytes, such as a raw `\`).
    pub(crate) fn can_send(path: &str) -> bool {
        format!("http://api.example{path}")
            .parse::<http::Uri>()
            .is_ok()
    }

    /// One request with `:authority` `authority` and `:path` `path`.
    pub(crate) async fn send(
        &mut self,
        method: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Got {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}://{authority}{path}", self.scheme));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        self.sender.ready().await.expect("h2 connection ready");
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in 10s"))
            .expect("response");
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
}

/// Runs `python script args…` from `tests/fixtures/python` and returns its stdout lines
/// (at most `limit`); panics with stderr when it fails.
pub(crate) async fn python_output(
    python: &std::path::Path,
    script: &str,
    args: &[&str],
    limit: Duration,
) -> Vec<String> {
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(python)
            .arg(crate::mesh::fixtures().join("python").join(script))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} did not finish in {limit:?}"))
    .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A Python server from `tests/fixtures/python` that printed `READY port=N`; killed on drop.
pub(crate) struct PyServer {
    _proc: crate::mesh::ChildProc,
    /// The port it listens on (127.0.0.1).
    pub(crate) port: u16,
}

impl PyServer {
    /// Starts `python script args…`.
    pub(crate) async fn start(python: &std::path::Path, script: &str, args: &[&str]) -> Self {
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(crate::mesh::fixtures().join("python").join(script))
            .args(args);
        let proc = crate::mesh::ChildProc::spawn(cmd, "READY").await;
        let port = proc.field("port").parse().expect("port");
        Self { _proc: proc, port }
    }

    /// Its address.
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A boxed body that can stream (request bodies made of generated chunks).
pub(crate) type Boxed = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A whole body as a [`Boxed`] one.
pub(crate) fn full(s: String) -> Boxed {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}
