//! Joins that just work, tested the way an operator meets them: a node started before its CA,
//! a CA outage longer than a certificate's lifetime, a node whose clock runs behind, and a node
//! whose services change at the CA. Real CA servers, real agents, real TLS, all on loopback.

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    sync::Once,
    time::{Duration, SystemTime},
};

use meshgate_agent::{
    app::Agent,
    config::AgentConfig,
    identity::{IdentityConfig, IdentityError, IdentityManager, IdentityOptions, SkewedClock},
};
use meshgate_ca::{
    server::{CaConfig, CaServer},
    store::{self, TokenStore},
    verify::ExpectedPeer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "mesh.example";

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

/// Polls `check` until true, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
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

/// A loopback port nobody listens on right now (bound, then released): for a server that must
/// start later at an address its clients already know.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A CA data dir and the config to serve it; the server itself starts and stops in tests.
struct Ca {
    dir: tempfile::TempDir,
    config: CaConfig,
    fingerprint: String,
}

impl Ca {
    fn new(ttl: Duration, grace: Duration) -> Self {
        init();
        let dir = tempfile::tempdir().expect("tempdir");
        let report = store::init(dir.path(), TD, false, SystemTime::now()).expect("ca init");
        let config = CaConfig {
            listen: free_port(),
            workload_ttl: ttl,
            node_ttl: ttl,
            expired_renewal_grace: grace,
            ..CaConfig::new(TD, dir.path())
        };
        Self {
            dir,
            config,
            fingerprint: report.ca_fingerprint,
        }
    }

    async fn serve(&self) -> CaServer {
        CaServer::start(&self.config, None).await.expect("ca serve")
    }

    fn address(&self) -> String {
        format!("https://{}", self.config.listen)
    }

    fn token(&self, node: &str, services: &[&str]) -> String {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        TokenStore::new(self.dir.path())
            .create(
                node,
                None,
                &services,
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .expect("token")
            .token
    }

    fn identity(&self, node: &str, data_dir: &Path, token: Option<String>) -> IdentityConfig {
        IdentityConfig {
            trust_domain: TD.into(),
            node: node.into(),
            data_dir: data_dir.to_owned(),
            ca_address: self.address(),
            ca_fingerprint: self.fingerprint.clone(),
            join_token: token,
        }
    }

    /// An agent config for `node` running `services`, its token (if any) in `token_file`.
    fn agent(
        &self,
        node: &str,
        dir: &Path,
        services: &[&str],
        admin: SocketAddr,
        token_file: Option<&Path>,
    ) -> AgentConfig {
        let services: Vec<serde_json::Value> = services
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({"name": s, "port": 9 + i}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "node": node,
            "trust_domain": TD,
            "data_dir": dir.join("data"),
            "ca": {"address": self.address(), "fingerprint": self.fingerprint,
                   "join_token_file": token_file},
            "listen": {"inbound": "127.0.0.1:0", "admin": admin},
            "services": services,
            "drain_timeout": "1s",
        }))
        .expect("agent config")
    }
}

fn write_secret(path: &Path, contents: &str) {
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
    else {
        return (0, String::new());
    };
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("req");
    let Ok(resp) = sender.send_request(req).await else {
        return (0, String::new());
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn token_states(ca_dir: &Path) -> Vec<String> {
    TokenStore::new(ca_dir)
        .list(SystemTime::now())
        .expect("list")
        .into_iter()
        .map(|t| t.state.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_its_ca_becomes_ready_once_the_ca_starts() {
    let ca = Ca::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let tmp = tempfile::tempdir().expect("tempdir");
    let token_file = tmp.path().join("node-a.token");
    write_secret(&token_file, &ca.token("node-a", &["web"]));
    let admin = free_port();
    let cfg = ca.agent("node-a", tmp.path(), &["web"], admin, Some(&token_file));
    let agent = tokio::spawn(Agent::start(cfg));

    // the CA is down: the admin API answers, readiness is 503 and says what it waits for
    let waiting = eventually(Duration::from_secs(20), || async {
        let (code, body) = http_get(admin, "/readyz").await;
        code == 503 && body.contains("not ready")
    })
    .await;
    assert!(waiting, "readyz is 503 while the CA cannot be reached");
    // a few attempts go by (1s, 2s, …) and the token is still unused
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !agent.is_finished(),
        "the agent keeps trying instead of exiting"
    );
    assert_eq!(token_states(ca.dir.path()), ["unused"]);

    let server = ca.serve().await;
    let agent = tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent joins once the CA is up")
        .expect("task")
        .expect("agent started");
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(
        token_states(ca.dir.path()),
        ["used"],
        "the token was spent once"
    );
    assert_eq!(server.state().refused(), 0, "no attempt was refused");
    // node + web: two certificates, so exactly one join
    assert_eq!(server.state().issued(), 2);
    agent.shutdown().await;
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_past_expiry_turns_readiness_503_and_the_node_recovers_within_the_grace() {
    // 20s certificates (25s with back-dating): renewal at ~13s after issue, at risk from
    // ~14s, expired at 20s; a window of seconds even on a loaded machine
    let ca = Ca::new(Duration::from_secs(20), Duration::from_secs(3600));
    let tmp = tempfile::tempdir().expect("tempdir");
    let token_file = tmp.path().join("node-a.token");
    write_secret(&token_file, &ca.token("node-a", &["web"]));
    let server = ca.serve().await;
    let admin = free_port();
    let agent = Agent::start(ca.agent("node-a", tmp.path(), &["web"], admin, Some(&token_file)))
        .await
        .expect("agent");
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let node = agent.identity().node();
    let first = node.info().expect("node cert");
    server.shutdown(Duration::from_millis(100)).await;

    // before the certificate expires, readiness turns 503 and says why, and the metric is 1
    // (the web certificate, renewed on its own jittered schedule, may turn at risk a moment
    // before the node's: wait for the node's)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (code, body) = http_get(admin, "/readyz").await;
        let left = node.info().map(|i| i.remaining(SystemTime::now()));
        if code == 503
            && body.contains("spiffe://mesh.example/node/node-a expires")
            && left.is_some_and(|l| !l.is_zero())
        {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline && left.is_some_and(|l| !l.is_zero()),
            "readyz must turn 503 before the certificate expires (last: {code} {body})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains("renewal fails") && body.contains("cannot reach the CA"),
        "{body}"
    );
    let metrics = http_get(admin, "/metrics").await.1;
    assert!(
        metrics.contains(
            "meshgate_identity_cert_at_risk{spiffe_id=\"spiffe://mesh.example/node/node-a\"} 1"
        ),
        "{metrics}"
    );

    // the outage outlasts the certificate
    let expired = eventually(Duration::from_secs(30), || async {
        SystemTime::now() > first.not_after
    })
    .await;
    assert!(expired);
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("expired"), "{body}");

    // the CA returns within its grace: the node renews its expired certificate by itself
    let server = ca.serve().await;
    let recovered = eventually(Duration::from_secs(40), || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    assert!(recovered, "readyz back to 200 once the CA returns");
    let now = node.info().expect("renewed");
    assert!(now.not_after > SystemTime::now() && now.serial != first.serial);
    agent.shutdown().await;
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_grace_the_node_is_told_what_to_do_and_a_new_token_brings_it_back() {
    let ca = Ca::new(Duration::from_secs(3), Duration::ZERO);
    let server = ca.serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let ids =
        IdentityManager::start(ca.identity("node-a", &data, Some(ca.token("node-a", &["web"]))))
            .await
            .expect("join");
    let not_after = ids.node().info().expect("cert").not_after;
    drop(ids); // the node is stopped: nothing renews
    // (certificate times have whole seconds: wait until it is expired by any count)
    let expired = eventually(Duration::from_secs(20), || async {
        SystemTime::now() > not_after + Duration::from_secs(1)
    })
    .await;
    assert!(expired);
    let err = IdentityManager::start(ca.identity("node-a", &data, None))
        .await
        .expect_err("expired beyond a zero grace");
    assert!(matches!(err, IdentityError::NodeExpired { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("meshgate ca token create --node node-a") && text.contains("join_token_file"),
        "{text}"
    );
    // the remedy works, without deleting the data dir
    IdentityManager::start(ca.identity("node-a", &data, Some(ca.token("node-a", &["web"]))))
        .await
        .expect("a new token re-joins");
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_120s_behind_joins_and_serves() {
    let ca = Ca::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let server = ca.serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let behind = IdentityOptions {
        clock: std::sync::Arc::new(SkewedClock {
            offset: Duration::from_secs(120),
            behind: true,
        }),
        max_start_attempts: Some(1),
        ..IdentityOptions::default()
    };
    let slow = IdentityManager::start_with(
        ca.identity(
            "node-slow",
            &tmp.path().join("slow"),
            Some(ca.token("node-slow", &["users"])),
        ),
        behind,
    )
    .await
    .expect("a node 120s behind joins");
    let users = slow.workload("default", "users").await.expect("users");
    let info = users.info().expect("cert");
    assert!(
        info.not_before <= SystemTime::now() - Duration::from_secs(120),
        "certificates are back-dated past the skew"
    );
    let fine = IdentityManager::start(ca.identity(
        "node-fine",
        &tmp.path().join("fine"),
        Some(ca.token("node-fine", &["web"])),
    ))
    .await
    .expect("join");
    let web = fine.workload("default", "web").await.expect("web");

    // the slow node serves: a TLS 1.3 mTLS exchange with a node on the right time, both ways
    async fn exchange(
        server: (&IdentityManager, &meshgate_agent::identity::Identity),
        client: (&IdentityManager, &meshgate_agent::identity::Identity),
    ) -> Vec<u8> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server.0.server_config(server.1));
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("server handshake");
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.expect("read");
            tls.write_all(b"pong").await.expect("write");
            tls.shutdown().await.ok();
        });
        let expected = ExpectedPeer::AnyOf(vec![server.1.id.clone()]);
        let connector =
            tokio_rustls::TlsConnector::from(client.0.client_config(client.1, expected));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut tls = connector
            .connect(
                rustls_pki_types::ServerName::try_from("peer").expect("name"),
                tcp,
            )
            .await
            .expect("client handshake");
        tls.write_all(b"ping").await.expect("write");
        let mut buf = vec![0u8; 4];
        tls.read_exact(&mut buf).await.expect("read");
        task.await.expect("server");
        buf
    }
    assert_eq!(exchange((&slow, &users), (&fine, &web)).await, b"pong");
    assert_eq!(exchange((&fine, &web), (&slow, &users)).await, b"pong");
    server.shutdown(Duration::from_millis(100)).await;
}

fn meshgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("run meshgate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_services_change_at_the_ca_without_deleting_its_data_dir() {
    let ca = Ca::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let server = ca.serve().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let token_file = tmp.path().join("node-f.token");
    write_secret(&token_file, &ca.token("node-f", &["web"]));
    let admin = free_port();
    let agent = Agent::start(ca.agent("node-f", tmp.path(), &["web"], admin, Some(&token_file)))
        .await
        .expect("agent with web");
    agent.shutdown().await;

    // the node now runs users too: the CA refuses, and its refusal names the remedy
    // (each start gets its own admin port: a failed start may leave its admin API behind)
    let err = Agent::start(ca.agent(
        "node-f",
        tmp.path(),
        &["web", "users"],
        free_port(),
        Some(&token_file),
    ))
    .await
    .expect_err("users is not allowed yet")
    .to_string();
    assert!(
        err.contains("may not run service default/users")
            && err.contains("meshgate ca node set-services node-f web,users"),
        "{err}"
    );

    // remedy 1: change the node's services at the CA
    let ca_dir = ca.dir.path().to_str().expect("utf8").to_owned();
    let out = meshgate(&[
        "ca",
        "node",
        "set-services",
        "--data-dir",
        &ca_dir,
        "node-f",
        "web,users",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = Agent::start(ca.agent(
        "node-f",
        tmp.path(),
        &["web", "users"],
        free_port(),
        Some(&token_file),
    ))
    .await
    .expect("users allowed after set-services");
    let held: Vec<String> = agent
        .identity()
        .identities()
        .await
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert!(
        held.contains(&"spiffe://mesh.example/ns/default/svc/users".to_owned()),
        "{held:?}"
    );
    agent.shutdown().await;
    let listed = meshgate(&["ca", "node", "list", "--data-dir", &ca_dir, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(
        v[0]["services"],
        serde_json::json!(["default/web", "default/users"])
    );

    // remedy 2: a new token with the services, used although the node holds a certificate
    write_secret(
        &token_file,
        &ca.token("node-f", &["web", "users", "billing"]),
    );
    let agent = Agent::start(ca.agent(
        "node-f",
        tmp.path(),
        &["web", "users", "billing"],
        free_port(),
        Some(&token_file),
    ))
    .await
    .expect("billing allowed by the new token");
    assert!(tmp.path().join("data/svids/default/billing.crt").exists());
    assert_eq!(token_states(ca.dir.path()), ["used", "used"]);
    agent.shutdown().await;
    // a restart does not use the same token again
    let issued = server.state().issued();
    let agent = Agent::start(ca.agent(
        "node-f",
        tmp.path(),
        &["web", "users", "billing"],
        free_port(),
        Some(&token_file),
    ))
    .await
    .expect("restart");
    assert_eq!(
        server.state().issued(),
        issued,
        "restarted from the data dir"
    );
    assert_eq!(server.state().refused(), 1, "only the one refusal above");
    agent.shutdown().await;
    server.shutdown(Duration::from_millis(100)).await;
}

#[test]
fn token_list_and_revoke_from_the_cli() {
    let ca = Ca::new(Duration::from_secs(3600), Duration::from_secs(3600));
    let dir = ca.dir.path().to_str().expect("utf8").to_owned();
    let out = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        &dir,
        "--node",
        "node-a",
        "--services",
        "web",
        "--print-join-command",
        "--ca-address",
        "https://ca.example:15012",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let join = v["join_command"].as_str().expect("join command");
    assert!(
        join.contains(v["token"].as_str().expect("token"))
            && join.contains("address: https://ca.example:15012")
            && join.contains(&ca.fingerprint)
            && join.contains("meshgate agent --config"),
        "{join}"
    );
    let id = v["id"].as_str().expect("id").to_owned();
    let list = meshgate(&["ca", "token", "list", "--data-dir", &dir]);
    let table = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        table.starts_with("ID") && table.contains(&id) && table.contains("unused"),
        "{table}"
    );
    assert!(
        !table.contains(v["token"].as_str().expect("token")),
        "the secret is never listed"
    );
    let out = meshgate(&["ca", "token", "revoke", "--data-dir", &dir, &id[..8]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(token_states(ca.dir.path()), ["revoked"]);
    let out = meshgate(&["ca", "token", "revoke", "--data-dir", &dir, "zz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a token ID"));
    let fp = meshgate(&["ca", "fingerprint", "--data-dir", &dir]);
    assert_eq!(String::from_utf8_lossy(&fp.stdout).trim(), ca.fingerprint);
    // the revoked token cannot join
    let err = TokenStore::new(ca.dir.path())
        .consume(
            v["token"].as_str().expect("token"),
            "node-a",
            SystemTime::now(),
        )
        .expect_err("revoked");
    assert_eq!(err, store::TokenError::Revoked);
}
