//! The client side of the admin API: the `--admin` address every inspecting command takes
//! (`host:port` or `http://host:port`), GET (JSON or text) and POST of JSON, and what kind of
//! process answered, so a command pointed at the wrong one says so ("that is an agent, not a
//! gateway").

use std::{fmt, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The default admin address of every meshgate process.
pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// An admin API address: `HOST:PORT` or `http://HOST:PORT` (as `meshgate dev` prints them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminAddr {
    host: String,
    port: u16,
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") {
            return Err(format!(
                "{s:?}: the admin API is plain HTTP on loopback; write http://HOST:PORT or HOST:PORT"
            ));
        } else if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "{s:?}: unknown scheme {scheme}://; write HOST:PORT or http://HOST:PORT"
            ));
        } else {
            s
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!(
                "{s:?}: give only the address (HOST:PORT), not a path"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p),
            _ => {
                return Err(format!(
                    "{s:?} has no port; write HOST:PORT, e.g. {DEFAULT_ADMIN}"
                ));
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// What kind of meshgate process serves an admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcessKind {
    /// `meshgate agent`.
    Agent,
    /// `meshgate gateway`.
    Gateway,
}

impl ProcessKind {
    fn article(self) -> &'static str {
        match self {
            Self::Agent => "an agent",
            Self::Gateway => "a gateway",
        }
    }
}

/// One admin API.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    addr: AdminAddr,
}

/// What one request answered.
struct Answer {
    status: http::StatusCode,
    body: Bytes,
}

impl Admin {
    /// The admin API at `addr`.
    pub(crate) fn new(addr: AdminAddr) -> Self {
        Self { addr }
    }

    /// The address, as given.
    pub(crate) fn addr(&self) -> &AdminAddr {
        &self.addr
    }

    async fn fetch(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(http::Method::GET, path, None).await
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        json_body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let addr = &self.addr;
        let fetch = async {
            let tcp = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port))
                .await
                .map_err(|e| {
                    let reason = e.to_string();
                    let reason = reason.split(" (os error").next().unwrap_or_default().to_lowercase();
                    anyhow::anyhow!(
                        "cannot reach an admin API at {addr}: {reason} (is the process running? pass its admin address with --admin; the default is {DEFAULT_ADMIN})"
                    )
                })?;
            let not_http = || {
                anyhow::anyhow!(
                    "{addr} did not answer HTTP, so it is not a meshgate admin API (the CA's port, 15012 by default, speaks gRPC over TLS; agents and gateways serve their admin API on 127.0.0.1:15000 unless configured otherwise)"
                )
            };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|_| not_http())?;
            tokio::spawn(conn);
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, addr.to_string());
            if json_body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            let req = req.body(Full::new(Bytes::from(json_body.unwrap_or_default())))?;
            let resp = sender.send_request(req).await.map_err(|_| not_http())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| not_http())?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .with_context(|| format!("the admin API at {addr} did not answer within 10s"))?
    }

    /// An error naming the answer unless it is 2xx.
    fn ok(&self, path: &str, a: &Answer) -> anyhow::Result<()> {
        if !a.status.is_success() {
            bail!(
                "{}{path} answered {}: {}",
                self.addr,
                a.status,
                String::from_utf8_lossy(&a.body).trim()
            );
        }
        Ok(())
    }

    /// GET `path` and parse JSON.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let a = self.fetch(path).await?;
        self.json(path, &a)
    }

    /// [`Admin::get`], with `None` when the process has no `path` (404: an older version).
    pub(crate) async fn get_optional(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let a = self.fetch(path).await?;
        if a.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.json(path, &a).map(Some)
    }

    /// The JSON of answer `a` to `path`; an error naming it unless it is 2xx JSON.
    fn json(&self, path: &str, a: &Answer) -> anyhow::Result<Value> {
        self.ok(path, a)?;
        serde_json::from_slice(&a.body).with_context(|| {
            format!(
                "{}{path} did not answer JSON: is {} a meshgate admin API?",
                self.addr, self.addr
            )
        })
    }

    /// GET `path` and return the body as text (`/metrics`: Prometheus text 0.0.4, since no
    /// `Accept` asks for OpenMetrics). An answer other than 2xx is an error naming it.
    pub(crate) async fn text(&self, path: &str) -> anyhow::Result<String> {
        let a = self.fetch(path).await?;
        self.ok(path, &a)?;
        String::from_utf8(a.body.to_vec()).map_err(|_| {
            anyhow::anyhow!(
                "{}{path} did not answer UTF-8 text: is {} a meshgate admin API?",
                self.addr,
                self.addr
            )
        })
    }

    /// POST `body` as JSON to `path` and parse the JSON answer (for questions that carry
    /// credentials, which must not travel in a URL).
    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let a = self
            .send(http::Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        if a.status == http::StatusCode::METHOD_NOT_ALLOWED {
            bail!(
                "{} does not answer POST {path}: is it an older meshgate? (`meshgate version --admin {}`)",
                self.addr,
                self.addr
            );
        }
        self.ok(path, &a)?;
        serde_json::from_slice(&a.body)
            .with_context(|| format!("{}{path} did not answer JSON", self.addr))
    }

    /// `/readyz`: whether ready, and the body.
    pub(crate) async fn readyz(&self) -> anyhow::Result<(bool, String)> {
        let a = self.fetch("/readyz").await?;
        Ok((
            a.status.is_success(),
            String::from_utf8_lossy(&a.body).trim().to_owned(),
        ))
    }

    /// `/version` (`{"name","version","kind"}`), or what older processes without it tell
    /// through `/config`.
    pub(crate) async fn version(&self) -> anyhow::Result<(String, ProcessKind)> {
        let a = self.fetch("/version").await?;
        if a.status.is_success()
            && let Ok(v) = serde_json::from_slice::<Value>(&a.body)
            && v["name"] == "meshgate"
        {
            let kind = match v["kind"].as_str() {
                Some("gateway") => ProcessKind::Gateway,
                _ => ProcessKind::Agent,
            };
            return Ok((v["version"].as_str().unwrap_or("unknown").to_owned(), kind));
        }
        let config = self.get("/config").await.map_err(|_| {
            anyhow::anyhow!(
                "{} answers HTTP but is not a meshgate admin API (no /version or /config)",
                self.addr
            )
        })?;
        let kind = if config.get("routes").is_some() {
            ProcessKind::Gateway
        } else if config.get("services").is_some() || config["listen"].get("inbound").is_some() {
            ProcessKind::Agent
        } else {
            bail!("{} answers HTTP but is not a meshgate admin API", self.addr);
        };
        Ok(("older than 0.1 (no /version)".to_owned(), kind))
    }

    /// Fails with a clear message unless a `want` process answers here.
    pub(crate) async fn expect(&self, want: ProcessKind, command: &str) -> anyhow::Result<()> {
        let (_, kind) = self.version().await?;
        if kind != want {
            bail!(
                "{} is the admin API of {}, not {}: `meshgate {command}` needs {}'s admin address (pass it with --admin; `meshgate dev` prints each one)",
                self.addr,
                kind.article(),
                want.article(),
                want.article(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_take_both_spellings() {
        for (input, want) in [
            ("127.0.0.1:15000", "127.0.0.1:15000"),
            ("http://127.0.0.1:18200", "127.0.0.1:18200"),
            ("http://127.0.0.1:18200/", "127.0.0.1:18200"),
            ("localhost:15000", "localhost:15000"),
            ("[::1]:15000", "[::1]:15000"),
            ("http://[::1]:15000", "[::1]:15000"),
        ] {
            let a: AdminAddr = input.parse().expect(input);
            assert_eq!(a.to_string(), want);
        }
        for (input, want) in [
            ("https://127.0.0.1:15000", "plain HTTP"),
            ("127.0.0.1", "no port"),
            ("127.0.0.1:x", "not a port"),
            ("http://127.0.0.1:1/routes", "not a path"),
            ("grpc://a:1", "unknown scheme"),
        ] {
            let e = input.parse::<AdminAddr>().expect_err(input);
            assert!(e.contains(want), "{input}: {e}");
        }
    }
}
