//! The in-process test harness: a CA on loopback with its own throwaway PKI, and helpers to
//! start identity managers against it.

use std::{future::Future, path::PathBuf, sync::Once, time::Duration};

use meshgate_agent::identity::{IdentityConfig, IdentityManager};
use meshgate_ca::{
    server::{CaConfig, CaServer},
    store::{self, TokenStore},
};
use tempfile::TempDir;

static INIT: Once = Once::new();

/// Installs the crypto provider and a test log subscriber once per process.
pub(crate) fn init() {
    INIT.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A CA serving on 127.0.0.1:0 from a temporary data dir.
pub(crate) struct TestCa {
    pub(crate) dir: TempDir,
    pub(crate) server: CaServer,
    pub(crate) trust_domain: String,
    config: CaConfig,
}

impl TestCa {
    pub(crate) async fn start(trust_domain: &str) -> Self {
        Self::start_with_ttl(trust_domain, Duration::from_secs(3600)).await
    }

    pub(crate) async fn start_with_ttl(trust_domain: &str, ttl: Duration) -> Self {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        store::init(
            dir.path(),
            trust_domain,
            false,
            std::time::SystemTime::now(),
        )
        .expect("ca init");
        let config = CaConfig {
            trust_domain: trust_domain.into(),
            data_dir: dir.path().into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            workload_ttl: ttl,
            node_ttl: ttl,
        };
        let server = CaServer::start(&config).await.expect("ca serve");
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
        self.server = CaServer::start(&self.config).await.expect("ca restart");
        self
    }

    pub(crate) fn address(&self) -> String {
        format!("https://{}", self.server.local_addr())
    }

    pub(crate) fn fingerprint(&self) -> String {
        self.server.fingerprint().to_owned()
    }

    pub(crate) fn token(&self, node: &str, services: &[&str]) -> String {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        TokenStore::new(self.dir.path())
            .create(
                node,
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
