//! The in-process test harness: a CA on loopback with its own throwaway PKI, and helpers to
//! start identity managers against it.

use std::{future::Future, path::PathBuf, sync::Once, time::Duration};

use meshgate_agent::{
    discovery::consul::{ConsulClient, ConsulConfig},
    identity::{IdentityConfig, IdentityManager},
};
use meshgate_ca::{
    catalog::Catalog,
    server::{CaConfig, CaServer},
    store::{self, TokenStore},
};
use tempfile::TempDir;

static INIT: Once = Once::new();

/// Every log line of this test process (bounded), for tests that assert on logs.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Appends to [`LOGS`], keeping the newest 16 MiB; echoes to stderr when RUST_LOG is set.
struct CaptureWriter {
    echo: bool,
}

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = LOGS.lock() {
            logs.extend_from_slice(buf);
            let len = logs.len();
            if len > 16 << 20 {
                logs.drain(..len - (8 << 20));
            }
        }
        if self.echo {
            let _ = std::io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything logged so far by this process.
pub(crate) fn captured_logs() -> String {
    LOGS.lock()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default()
}

/// Installs the crypto provider and a process-wide log subscriber once: it records every line
/// (see [`captured_logs`]); RUST_LOG=meshgate_agent=debug also prints them.
pub(crate) fn init() {
    INIT.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let echo = std::env::var_os("RUST_LOG").is_some();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,meshgate_gateway=debug,meshgate_agent=debug,access=info",
            )
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || CaptureWriter { echo })
            .try_init();
    });
}

/// A CA serving on 127.0.0.1:0 from a temporary data dir.
pub(crate) struct TestCa {
    pub(crate) dir: TempDir,
    pub(crate) server: CaServer,
    pub(crate) trust_domain: String,
    config: CaConfig<ConsulConfig>,
}

/// The catalog a CA config's `consul:` section asks for, as the CLI builds it.
fn catalog_of(config: &CaConfig<ConsulConfig>) -> Option<std::sync::Arc<dyn Catalog>> {
    config.consul.as_ref().map(|c| {
        std::sync::Arc::new(ConsulClient::new(c).expect("consul client"))
            as std::sync::Arc<dyn Catalog>
    })
}

impl TestCa {
    pub(crate) async fn start(trust_domain: &str) -> Self {
        Self::start_with_ttl(trust_domain, Duration::from_secs(3600)).await
    }

    pub(crate) async fn start_with_ttl(trust_domain: &str, ttl: Duration) -> Self {
        Self::start_full(trust_domain, ttl, None).await
    }

    /// A CA that checks workload requests against Consul's catalog at `consul_url`.
    pub(crate) async fn start_with_consul(trust_domain: &str, consul_url: &str) -> Self {
        let consul = serde_json::from_value(serde_json::json!({"address": consul_url}))
            .expect("consul config");
        Self::start_full(trust_domain, Duration::from_secs(3600), Some(consul)).await
    }

    pub(crate) async fn start_full(
        trust_domain: &str,
        ttl: Duration,
        consul: Option<ConsulConfig>,
    ) -> Self {
        Self::start_configured(trust_domain, |c| {
            c.workload_ttl = ttl;
            c.node_ttl = ttl;
            c.consul = consul;
        })
        .await
    }

    /// A CA whose config (1h lifetimes, a 200ms reload interval, 127.0.0.1:0) `tweak` changes
    /// before it starts; `before_start` may change the fresh data dir first (a short-lived
    /// intermediate…).
    pub(crate) async fn start_configured(
        trust_domain: &str,
        tweak: impl FnOnce(&mut CaConfig<ConsulConfig>),
    ) -> Self {
        Self::start_prepared(trust_domain, |_| {}, tweak).await
    }

    /// Like [`TestCa::start_configured`], running `prepare` on the data dir after `ca init`.
    pub(crate) async fn start_prepared(
        trust_domain: &str,
        prepare: impl FnOnce(&std::path::Path),
        tweak: impl FnOnce(&mut CaConfig<ConsulConfig>),
    ) -> Self {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        store::init(
            dir.path(),
            trust_domain,
            false,
            std::time::SystemTime::now(),
        )
        .expect("ca init");
        prepare(dir.path());
        let mut config = CaConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            workload_ttl: Duration::from_secs(3600),
            node_ttl: Duration::from_secs(3600),
            reload_interval: Duration::from_millis(200),
            ..CaConfig::new(trust_domain, dir.path())
        };
        tweak(&mut config);
        let server = CaServer::start(&config, catalog_of(&config))
            .await
            .expect("ca serve");
        Self {
            dir,
            server,
            trust_domain: trust_domain.into(),
            config,
        }
    }

    /// Stops the server (the CA's state stays), runs `while_down`, then serves again on the
    /// same address.
    pub(crate) async fn restart<F: Future<Output = ()>>(mut self, while_down: F) -> Self {
        let addr = self.server.local_addr();
        self.server.shutdown(Duration::from_millis(100)).await;
        while_down.await;
        self.config.listen = addr;
        self.server = CaServer::start(&self.config, catalog_of(&self.config))
            .await
            .expect("ca restart");
        self
    }

    pub(crate) fn address(&self) -> String {
        format!("https://{}", self.server.local_addr())
    }

    pub(crate) fn fingerprint(&self) -> String {
        self.server.fingerprint()
    }

    pub(crate) fn token(&self, node: &str, services: &[&str]) -> String {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        TokenStore::new(self.dir.path())
            .create(
                node,
                None,
                &services,
                Duration::from_secs(3600),
                std::time::SystemTime::now(),
            )
            .expect("token")
            .token
    }

    pub(crate) fn issued(&self) -> u64 {
        self.server.state().issued()
    }

    /// An identity config for `node` with its own fresh data dir.
    pub(crate) fn node_config(
        &self,
        node: &str,
        token: Option<String>,
    ) -> (IdentityConfig, TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        (
            IdentityConfig {
                trust_domain: self.trust_domain.clone(),
                node: node.into(),
                data_dir: dir.path().join("data"),
                ca_address: self.address(),
                ca_fingerprint: self.fingerprint(),
                join_token: token,
            },
            dir,
        )
    }

    /// Joins `node` allowed to run `services`.
    pub(crate) async fn join(&self, node: &str, services: &[&str]) -> (IdentityManager, TempDir) {
        let (cfg, dir) = self.node_config(node, Some(self.token(node, services)));
        (IdentityManager::start(cfg).await.expect("join"), dir)
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().into()
    }
}

/// Polls `check` until it returns true, for at most `limit`.
pub(crate) async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running agent and the directory that holds its state.
pub(crate) struct TestAgent {
    pub(crate) agent: meshgate_agent::app::Agent,
    pub(crate) _dir: TempDir,
}

impl TestAgent {
    pub(crate) fn inbound(&self) -> std::net::SocketAddr {
        self.agent.inbound_addr()
    }

    pub(crate) fn upstream(&self, service: &str) -> std::net::SocketAddr {
        self.agent
            .upstream_addr(service)
            .expect("upstream listener")
    }

    /// GET on the admin API: (status, body).
    pub(crate) async fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.agent.admin_addr(), path).await
    }

    /// One metric sample from /metrics (0 when absent).
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        metric_at(self.agent.admin_addr(), series).await
    }
}

/// One metric sample from the /metrics of the admin API at `admin` (0 when absent).
pub(crate) async fn metric_at(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

impl TestCa {
    /// Starts an agent for `node`. `spec` holds `services`, `authz`, `discovery` (and any other
    /// agent.yaml key); ports are 0 and the join token goes through a token file.
    pub(crate) async fn agent(&self, node: &str, spec: serde_json::Value) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let services: Vec<String> = spec["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let token_file = dir.path().join("join.token");
        std::fs::write(&token_file, self.token(node, &names)).expect("token file");
        let mut cfg = serde_json::json!({
            "node": node,
            "trust_domain": self.trust_domain,
            "data_dir": dir.path().join("data"),
            "ca": {"address": self.address(), "fingerprint": self.fingerprint(), "join_token_file": token_file},
            "listen": {"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "drain_timeout": "5s",
        });
        for (k, v) in spec.as_object().expect("spec object") {
            cfg[k] = v.clone();
        }
        let cfg: meshgate_agent::config::AgentConfig =
            serde_json::from_value(cfg).expect("agent config");
        let agent = meshgate_agent::app::Agent::start(cfg)
            .await
            .expect("agent start");
        TestAgent { agent, _dir: dir }
    }
}

/// A minimal HTTP/1.1 GET with hyper: (status, body).
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.1 request with hyper: (status, body).
pub(crate) async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("http handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A TCP service on 127.0.0.1:0 that echoes until EOF, then closes; counts connections.
pub(crate) struct EchoService {
    pub(crate) port: u16,
    pub(crate) accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoService {
    pub(crate) async fn start() -> Self {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(4096).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }

    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        self.task.abort();
    }
}
