//! Mesh trust, end to end (issue 12): a node that may not host a service never answers for it
//! (from an agent or the gateway), a node's namespace and scope bind what the CA signs in Consul
//! mode, the intermediate and the root rotate under load without a failed request, a revoked
//! node loses its certificates and tunnels, no session is ever resumed, and a black-holed
//! endpoint costs 20 concurrent connections one connect timeout.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use meshgate_agent::identity::{Identity, IdentityError, IdentityManager, connect_ca};
use meshgate_ca::{
    pki, rotation,
    signer::make_csr,
    spiffe::SpiffeId,
    store::{self, Denylist},
    tls::CertSlot,
    verify::{ExpectedPeer, SpiffeServerVerifier, tls13_client_config},
};
use meshgate_proto::ca::v1::{BundleReport, CsrRequest};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    clients::try_raw_h1,
    consul_standin::{ConsulStandin, Instance},
    gw_harness::Backend,
    harness::{EchoService, TestCa, captured_logs, eventually},
    mesh::{AgentSpec, GatewaySpec, Intention, Listed, RouteSpec, ServiceSpec, TD, TestMesh},
};

/// One connection through an upstream listener to an echo service: what goes in comes back.
async fn echo(addr: SocketAddr) -> Result<(), String> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.map_err(|e| e.to_string())?;
        if back == b"ping" {
            Ok(())
        } else {
            Err(format!("got {back:?} back"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap_or_else(|_| Err("no answer in 10s".into()))
}

/// WARN lines about a refused destination at `addr`.
fn refusal_warnings(addr: SocketAddr) -> usize {
    let addr = addr.to_string();
    captured_logs()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("destination refused") && l.contains(&addr))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_may_not_host_a_service_never_answers_for_it() {
    // (how node-c's inbound is listed as an endpoint of users, the refusal node-a counts)
    let cases = [
        // an address without a node: only a node the hosting map allows may answer there
        (Listed::Plain, "wrong_identity"),
        // pinned to node-c, which may not host users: never dialled
        (Listed::Pinned, "not_hosting"),
        // pinned to node-b, but node-c answers there
        (Listed::PinnedAs("node-b"), "wrong_identity"),
    ];
    for (how, reason) in cases {
        let users = EchoService::start().await;
        let batch = EchoService::start().await;
        let mesh = TestMesh::new()
            .agent(AgentSpec::new("node-b").service(ServiceSpec::tcp("users", users.port)))
            .agent(AgentSpec::new("node-c").service(ServiceSpec::tcp("batch", batch.port)))
            .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
            .agent_endpoint("users", "node-c", how)
            .intention(Intention::allow("web", "*"))
            .start()
            .await;
        let (a, c) = (mesh.agent("node-a"), mesh.agent("node-c"));
        let upstream = a.upstream("users");
        // concurrent connections spread over both endpoints (pending requests raise the cost
        // of the one in use), so node-c is tried; then some one after the other
        let burst: Vec<_> = (0..10).map(|_| tokio::spawn(echo(upstream))).collect();
        for (i, t) in burst.into_iter().enumerate() {
            t.await
                .expect("task")
                .unwrap_or_else(|e| panic!("{how:?}: connection {i}: {e}"));
        }
        for i in 0..20 {
            echo(upstream)
                .await
                .unwrap_or_else(|e| panic!("{how:?}: sequential connection {i}: {e}"));
        }
        assert_eq!(
            users.accepted(),
            30,
            "{how:?}: node-b served every connection"
        );
        assert_eq!(batch.accepted(), 0, "{how:?}");
        let refused = a
            .metric(&format!(
                r#"meshgate_tunnel_destination_refusals_total{{reason="{reason}"}}"#
            ))
            .await;
        assert!(
            refused >= 1.0,
            "{how:?}: refusals counted as {reason}: {refused}"
        );
        assert_eq!(
            c.metric(r#"meshgate_tunnel_streams_total{direction="inbound"}"#)
                .await,
            0.0,
            "{how:?}: no stream ever reached node-c"
        );
        let handshakes = c
            .metric(r#"meshgate_tunnel_handshake_failures_total{direction="inbound"}"#)
            .await;
        if reason == "not_hosting" {
            assert_eq!(handshakes, 0.0, "{how:?}: node-c was not even dialled");
        } else {
            assert!(
                handshakes >= 1.0,
                "{how:?}: node-a ended node-c's handshake"
            );
        }
        assert_eq!(
            refusal_warnings(c.inbound()),
            1,
            "{how:?}: logged once, however often it was refused ({refused} times)"
        );
        assert!(mesh.shutdown().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_an_endpoint_that_presents_the_wrong_node_identity() {
    let users = Backend::start("users").await;
    let batch = Backend::start("batch").await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", users.port)))
        .agent(AgentSpec::new("node-c").service(ServiceSpec::http("batch", batch.port)))
        .agent_endpoint("users", "node-c", Listed::Plain)
        .intention(Intention::allow("gateway", "*"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/users").to("users")))
        .start()
        .await;
    let gw = mesh.gw();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let addr = gw.http();
            tokio::spawn(async move { try_raw_h1(addr, "GET", "/users/1").await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in burst {
        answers.push(t.await.expect("task"));
    }
    for _ in 0..20 {
        answers.push(try_raw_h1(gw.http(), "GET", "/users/1").await);
    }
    for (i, got) in answers.iter().enumerate() {
        let got = got
            .as_ref()
            .unwrap_or_else(|| panic!("request {i}: no answer"));
        assert_eq!(got.status, 200, "request {i}: {}", got.body);
        assert_eq!(got.json()["service"], "users", "request {i}");
    }
    assert_eq!(users.count(), 30);
    assert_eq!(batch.count(), 0);
    assert!(
        gw.metric(r#"meshgate_tunnel_destination_refusals_total{reason="wrong_identity"}"#)
            .await
            >= 1.0
    );
    assert_eq!(
        mesh.agent("node-c")
            .metric(r#"meshgate_tunnel_streams_total{direction="inbound"}"#)
            .await,
        0.0
    );
    assert_eq!(refusal_warnings(mesh.agent("node-c").inbound()), 1);
}

fn refusal(e: IdentityError) -> (tonic::Code, String) {
    match e {
        IdentityError::Refused { code, message, .. } => (code, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn with_consul_a_node_gets_certificates_only_in_its_namespace_and_scope() {
    let consul = ConsulStandin::start().await;
    let ca = TestCa::start_with_consul(TD, &consul.url()).await;
    let (node, _d) = ca.join("node-x", &["web"]).await;
    for service in ["web", "gateway"] {
        consul.add_instance(Instance {
            node: "node-x".into(),
            ..Instance::new(service, &format!("{service}-node-x"), 80)
        });
    }
    // the catalog registers web on the node, but not in namespace other
    let (code, msg) = refusal(node.workload("other", "web").await.expect_err("other ns"));
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(
        msg.contains("is in namespace default") && msg.contains("namespace other"),
        "{msg}"
    );
    // its own namespace: issued
    let web = node.workload("default", "web").await.expect("default/web");
    assert_eq!(
        web.id.to_string(),
        "spiffe://mesh.example/ns/default/svc/web"
    );
    // in the catalog on this node, but outside the token's scope
    let (code, msg) = refusal(
        node.workload("default", "gateway")
            .await
            .expect_err("outside the scope"),
    );
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("may not run service default/gateway"), "{msg}");
}

/// A background loop of requests, one at a time, counting what succeeded and what failed.
struct LoadLoop {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl LoadLoop {
    /// Runs `attempt` every 20 ms until stopped (at most 5 minutes).
    fn start<F, Fut>(attempt: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (o, f, s) = (ok.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            let started = Instant::now();
            let deadline = started + Duration::from_secs(300);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                match attempt().await {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!(
                            "{e} (at {:?}, {})",
                            started.elapsed(),
                            humantime::format_rfc3339_millis(SystemTime::now())
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        });
        Self {
            ok,
            failed,
            stop,
            task,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests succeeded (at most 20 s): the loop ran through a stage.
    async fn more(&self, n: u64) {
        let from = self.ok();
        assert!(
            eventually(Duration::from_secs(20), || async { self.ok() >= from + n }).await,
            "the load loop made no progress ({} failed)",
            self.failed.load(Ordering::SeqCst)
        );
    }

    /// Stops it: (succeeded, every failure).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let ok = self.ok.clone();
        let errors = self.task.await.expect("load loop");
        (ok.load(Ordering::SeqCst), errors)
    }
}

/// The serial of the intermediate right after the leaf in `identity`'s chain.
fn intermediate_serial(identity: &Identity) -> String {
    identity
        .intermediate_info()
        .map(|i| i.serial)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_onto_a_new_intermediate_without_rejoining_or_a_failed_request() {
    let users = EchoService::start().await;
    let mesh = TestMesh::new()
        // an intermediate with 24 s left: every leaf ends with it
        .ca_prepare(|dir| {
            store::rotate_intermediate(dir, Duration::from_secs(24), SystemTime::now())
                .expect("short intermediate");
        })
        .agent(AgentSpec::new("node-b").service(ServiceSpec::tcp("users", users.port)))
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .start()
        .await;
    let dir = mesh.ca.data_dir();
    let old = pki::CertInfo::from_der(&store::load(&dir).expect("ca").intermediate).expect("int");
    let upstream = mesh.agent("node-a").upstream("users");
    let load = LoadLoop::start(move || echo(upstream));
    load.more(5).await;

    let rotated = store::rotate_intermediate(
        &dir,
        Duration::from_secs(365 * 24 * 3600),
        SystemTime::now(),
    )
    .expect("rotate");
    assert_eq!(rotated.replaced, old.serial);
    let ca = &mesh.ca;
    assert!(
        eventually(Duration::from_secs(5), || async {
            ca.server.state().intermediate_not_after() > old.not_after
        })
        .await,
        "ca serve loads the new intermediate by itself"
    );
    let agents = [mesh.agent("node-a"), mesh.agent("node-b")];
    let renewed = eventually(Duration::from_secs(40), || async {
        let mut all = true;
        for a in agents {
            for i in a.agent.identity().identities().await {
                all &= intermediate_serial(&i) == rotated.serial;
            }
        }
        all
    })
    .await;
    assert!(
        renewed,
        "every certificate renewed onto the new intermediate"
    );
    // run on past the old intermediate's end
    assert!(
        eventually(Duration::from_secs(40), || async {
            SystemTime::now() > old.not_after + Duration::from_secs(3)
        })
        .await
    );
    load.more(20).await;
    let (ok, errors) = load.finish().await;
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(ok >= 100, "only {ok} requests");
    for a in agents {
        let id = a.agent.identity();
        assert!(id.status().renewals >= 2, "renewed (node and workload)");
        assert_eq!(intermediate_serial(&id.node()), rotated.serial);
    }
    // renewed with the certificates they held: no node joined again (the single-use tokens
    // of the mesh were each spent once, at start)
    let tokens = store::TokenStore::new(&dir)
        .list(SystemTime::now())
        .expect("tokens");
    assert!(
        tokens.iter().all(|t| t.state == store::TokenState::Used),
        "{tokens:?}"
    );
}

/// A request through the gateway's public listener.
async fn via_gateway(addr: SocketAddr) -> Result<(), String> {
    match try_raw_h1(addr, "GET", "/users/1").await {
        Some(g) if g.status == 200 => Ok(()),
        Some(g) => Err(format!("gateway answered {}: {}", g.status, g.body)),
        None => Err("gateway: no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_in_stages_under_load_and_survives_a_ca_restart() {
    let users = Backend::start("users").await;
    let echo_svc = EchoService::start().await;
    let mut mesh = TestMesh::new()
        .ca_config(|c| {
            c.workload_ttl = Duration::from_secs(6);
            c.node_ttl = Duration::from_secs(6);
        })
        .agent(
            AgentSpec::new("node-b")
                .service(ServiceSpec::http("users", users.port))
                .service(ServiceSpec::tcp("echo", echo_svc.port)),
        )
        .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("echo")))
        .intention(Intention::allow("web", "echo"))
        .intention(Intention::allow("gateway", "users"))
        .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/users").to("users")))
        .start()
        .await;
    let dir = mesh.ca.data_dir();
    let (gw_addr, agent_addr) = (mesh.gw().http(), mesh.agent("node-a").upstream("echo"));
    let load = LoadLoop::start(move || async move {
        via_gateway(gw_addr).await?;
        echo(agent_addr).await
    });
    load.more(5).await;
    let status = || rotation::status(&dir, SystemTime::now()).expect("status");
    let idle = status().to_string();
    assert!(idle.contains("root rotation: idle"), "{idle}");
    let old_root = mesh.ca.fingerprint();

    // stage 1: both roots in every bundle
    let state = rotation::start(&dir, SystemTime::now()).expect("start");
    assert_eq!(state.old_root, old_root);
    let text = status().to_string();
    for want in [
        "root rotation: stage add-root",
        "1. add-root  in progress",
        "2. reissue   pending",
        "3. retire    pending",
        "3 of 3 nodes do not hold the new root yet",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let err = rotation::finish(&dir, SystemTime::now())
        .expect_err("not in stage 1")
        .to_string();
    assert!(err.contains("cannot be retired yet"), "{err}");
    // every node reports the new root; the CA moves on to reissue by itself
    assert!(
        eventually(Duration::from_secs(20), || async {
            status().stage() == "reissue"
        })
        .await,
        "stage 2 never came:\n{}",
        status()
    );
    load.more(5).await;
    let text = status().to_string();
    assert!(
        text.contains("1. add-root  done: every node holds the new root"),
        "{text}"
    );
    let identities = |mesh: &crate::mesh::Mesh| {
        let mut out = vec![mesh.gw().app.identity().clone()];
        out.extend(["node-a", "node-b"].map(|n| mesh.agent(n).agent.identity().clone()));
        out
    };
    for id in identities(&mesh) {
        let b = id.bundle().load_full();
        assert!(b.contains_fingerprint(&state.new_root) && b.contains_fingerprint(&old_root));
    }

    // a CA restart in the middle resumes the same stage
    let ca = mesh.ca;
    let ca = ca
        .restart(async {
            assert_eq!(status().stage(), "reissue", "the stage is on disk");
        })
        .await;
    mesh.ca = ca;
    assert_eq!(status().stage(), "reissue");
    assert_eq!(
        mesh.ca.fingerprint(),
        state.new_root,
        "new joins pin the new root"
    );

    // stage 2: every certificate renewed under the new root at once
    let new_int = pki::read_pem_certs(&dir.join("rotation/intermediate.crt")).expect("new int");
    let new_int = pki::CertInfo::from_der(&new_int[0]).expect("int").serial;
    let ids = identities(&mesh);
    let reissued = eventually(Duration::from_secs(20), || async {
        let mut all = true;
        for id in &ids {
            for i in id.identities().await {
                all &= intermediate_serial(&i) == new_int;
            }
        }
        all
    })
    .await;
    assert!(reissued, "every certificate reissued under the new root");
    load.more(5).await;
    let now = status();
    if now.old_leaves_alive > 0 {
        let text = now.to_string();
        assert!(text.contains("2. reissue   in progress"), "{text}");
        assert!(
            text.contains("signed under the old root are still valid"),
            "{text}"
        );
        let err = rotation::finish(&dir, SystemTime::now())
            .expect_err("old leaves alive")
            .to_string();
        assert!(err.contains("still valid"), "{err}");
    }
    assert!(
        eventually(Duration::from_secs(30), || async { status().can_finish() }).await,
        "the old root's certificates never all expired:\n{}",
        status()
    );
    let text = status().to_string();
    assert!(text.contains("3. retire    ready"), "{text}");
    assert!(text.contains("waiting for: nothing"), "{text}");

    // stage 3: the old root leaves every bundle
    let done = rotation::finish(&dir, SystemTime::now()).expect("finish");
    assert_eq!(
        (done.retired_root, done.root),
        (old_root.clone(), state.new_root.clone())
    );
    let only_new = eventually(Duration::from_secs(10), || async {
        ids.iter()
            .all(|id| id.bundle().load().fingerprints() == [state.new_root.clone()])
    })
    .await;
    assert!(only_new, "every bundle holds only the new root");
    load.more(10).await;
    let (ok, errors) = load.finish().await;
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(ok >= 30, "only {ok} requests");
    assert!(status().to_string().contains("root rotation: idle"));
    assert_eq!(mesh.ca.fingerprint(), state.new_root);
    assert_eq!(
        pki::fingerprint(&store::load(&dir).expect("ca").root),
        state.new_root,
        "root.crt is the new root"
    );
    assert!(!dir.join("rotation").exists());
}

/// A CSR for `id`.
fn csr(id: &SpiffeId) -> CsrRequest {
    CsrRequest {
        csr_der: make_csr(id).expect("csr").1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_loses_its_certificates_and_its_tunnels_within_one_bundle_update() {
    let users = EchoService::start().await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::tcp("users", users.port)))
        .agent(AgentSpec::new("node-c").service(ServiceSpec::tcp("web", 1).calls("users")))
        .intention(Intention::allow("web", "users"))
        .start()
        .await;
    let (b, c) = (mesh.agent("node-b"), mesh.agent("node-c"));
    // a connection held open through node-c's tunnel to node-b
    let mut open = TcpStream::connect(c.upstream("users"))
        .await
        .expect("connect");
    open.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).await.expect("echo");
    let before = b.agent.identity().status().bundle_sequence;

    Denylist::new(&mesh.ca.data_dir())
        .revoke("node-c", SystemTime::now())
        .expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.map(|_| rest)
    })
    .await;
    assert!(ended.is_ok(), "the tunnel from node-c stayed open");
    let after = b.agent.identity().status().bundle_sequence;
    assert_eq!(
        after,
        before + 1,
        "closed by the first bundle update after the revocation"
    );
    assert!(
        b.metric(r#"meshgate_tunnel_cut_offs_total{direction="inbound",reason="revoked"}"#)
            .await
            >= 1.0
    );
    assert!(
        echo(c.upstream("users")).await.is_err(),
        "no new tunnel either"
    );

    // and the CA gives it nothing
    let node_id = SpiffeId::node(TD, "node-c").expect("id");
    let web_id = SpiffeId::workload(TD, "default", "web").expect("id");
    let mut client = c.agent.identity().ca_client().await.expect("ca client");
    let renew = client.renew_node(csr(&node_id)).await.expect_err("renew");
    assert_eq!(renew.code(), tonic::Code::PermissionDenied);
    assert!(renew.message().contains("revoked"), "{}", renew.message());
    let sign = client.sign_workload(csr(&web_id)).await.expect_err("sign");
    assert_eq!(sign.code(), tonic::Code::PermissionDenied);
    assert!(sign.message().contains("revoked"), "{}", sign.message());
}

/// A client TLS config that presents `chain`/`key` (a node certificate), verifies the CA, and
/// keeps rustls' default session cache (resumption on).
fn node_client_tls(
    identity: &IdentityManager,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
) -> rustls::ClientConfig {
    let slot = CertSlot::new();
    slot.set(chain, key).expect("slot");
    let mut cfg = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            identity.bundle(),
            ExpectedPeer::AnyOf(vec![SpiffeId::ca(TD).expect("id")]),
        )))
        .with_client_cert_resolver(slot);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// One TLS handshake with `cfg` to `addr` (reading whatever the server sends after it, so any
/// session ticket would be stored): whether it was a full handshake or a resumption.
async fn handshake_kind(addr: SocketAddr, cfg: &rustls::ClientConfig) -> rustls::HandshakeKind {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg.clone()));
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .expect("handshake");
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await;
    tls.get_ref().1.handshake_kind().expect("handshake done")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_is_resumed_so_an_expired_node_certificate_cannot_renew() {
    let ca = TestCa::start_configured(TD, |c| {
        c.node_ttl = Duration::from_secs(3);
        c.expired_renewal_grace = Duration::ZERO;
    })
    .await;
    let (node, dir) = ca.join("node-a", &[]).await;
    let chain = pki::read_pem_certs(&dir.path().join("data/node.crt")).expect("node.crt");
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join("data/node.key")).expect("node.key"),
    )
    .expect("key")
    .serialize_der();
    let not_after = pki::CertInfo::from_der(&chain[0]).expect("leaf").not_after;
    let cfg = node_client_tls(&node, chain, key);
    let ca_addr = ca.server.local_addr();
    for i in 0..2 {
        assert_ne!(
            handshake_kind(ca_addr, &cfg).await,
            rustls::HandshakeKind::Resumed,
            "handshake {i} with the CA"
        );
    }
    let mut client = connect_ca(&ca.address(), cfg.clone())
        .await
        .expect("client");
    client
        .report_bundle(BundleReport {
            sequence: 1,
            root_fingerprints: vec![],
        })
        .await
        .expect("a valid certificate is served");
    drop(client);
    assert!(
        eventually(Duration::from_secs(10), || async {
            SystemTime::now() > not_after + Duration::from_secs(1)
        })
        .await
    );
    let node_id = SpiffeId::node(TD, "node-a").expect("id");
    let renewed = async {
        let mut client = connect_ca(&ca.address(), cfg.clone())
            .await
            .map_err(|e| e.to_string())?;
        client
            .renew_node(csr(&node_id))
            .await
            .map_err(|s| s.message().to_owned())
    }
    .await;
    assert!(
        renewed.is_err(),
        "an expired certificate renewed: {renewed:?}"
    );

    // the mesh inbound does not resume either
    let echo_svc = EchoService::start().await;
    let b = ca
        .agent(
            "node-b",
            serde_json::json!({"services": [{"name": "users", "port": echo_svc.port}]}),
        )
        .await;
    let (web, web_dir) = ca.join("node-w", &["web"]).await;
    let mesh_cfg = crate::mesh::mesh_client_config(&web, &web_dir, "web").await;
    for i in 0..2 {
        assert_ne!(
            handshake_kind(b.inbound(), &mesh_cfg).await,
            rustls::HandshakeKind::Resumed,
            "handshake {i} with the mesh inbound"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_connections_fail_over_past_a_black_hole_within_one_connect_timeout() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    // accepts TCP (the kernel does, into the backlog) and never says a word
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let users = EchoService::start().await;
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::tcp("users", users.port)))
        .agent(
            AgentSpec::new("node-a")
                .service(ServiceSpec::tcp("web", 1).calls("users"))
                .configure(|c| c.tunnel.connect_timeout = CONNECT_TIMEOUT),
        )
        .endpoint("users", blackhole.local_addr().expect("addr"))
        .intention(Intention::allow("web", "users"))
        .start()
        .await;
    let a = mesh.agent("node-a");
    let upstream = a.upstream("users");
    let started = Instant::now();
    let conns: Vec<_> = (0..20).map(|_| tokio::spawn(echo(upstream))).collect();
    for (i, c) in conns.into_iter().enumerate() {
        c.await
            .expect("task")
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    let took = started.elapsed();
    assert!(
        took <= CONNECT_TIMEOUT + Duration::from_secs(1),
        "20 connections took {took:?}"
    );
    assert_eq!(users.accepted(), 20, "all served by the good endpoint");
    let failed = a
        .metric(r#"meshgate_upstream_connect_failures_total{service="users"}"#)
        .await;
    assert!(
        (1.0..=20.0).contains(&failed),
        "the black hole was tried (once per connection that picked it): {failed}"
    );
    drop(blackhole);
}
