//! The CA and the identity manager over real gRPC and TLS: joining, workload SVIDs, mTLS
//! between SVIDs, renewal, bundle updates, and every way a request must be refused.

use std::{os::unix::fs::PermissionsExt, sync::Arc, time::Duration};

use meshgate_agent::identity::{IdentityError, IdentityManager, connect_ca};
use meshgate_ca::{
    pki::{self, CertInfo},
    signer::make_csr,
    spiffe::SpiffeId,
    store::TokenStore,
    tls::CertSlot,
    verify::{ExpectedPeer, SpiffeServerVerifier, Usage, tls13_client_config, verify_svid},
};
use meshgate_proto::ca::v1::CsrRequest;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::harness::{TestCa, eventually};

const TD: &str = "mesh.example";

fn leaf_uri(chain: &[CertificateDer<'_>]) -> String {
    CertInfo::from_der(&chain[0]).expect("leaf").uris.join(",")
}

fn refused(e: IdentityError) -> (tonic::Code, String) {
    match e {
        IdentityError::Refused { code, message, .. } => (code, message),
        other => panic!("expected a refusal from the CA, got: {other}"),
    }
}

#[tokio::test]
async fn join_get_svids_and_handshake_over_mtls() {
    let ca = TestCa::start(TD).await;
    let (node_a, dir_a) = ca.join("node-a", &["users"]).await;
    let (node_b, _dir_b) = ca.join("node-b", &["web"]).await;
    // a node has one namespace, fixed by its token
    let (node_p, _dir_p) = ca.join("node-p", &["prod/billing"]).await;

    // node SVID: exact URI SAN, chains to the bundle, files private
    let node = node_a.node();
    assert_eq!(leaf_uri(&node.chain()), "spiffe://mesh.example/node/node-a");
    let data = dir_a.path().join("data");
    for key in ["node.key", "svids/default/users.key"] {
        if key.starts_with("svids") {
            node_a
                .workload("default", "users")
                .await
                .expect("users svid");
        }
        let mode = std::fs::metadata(data.join(key))
            .expect(key)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} must be 0600");
    }
    let bundle = node_a.bundle().load_full();
    assert!(bundle.contains_fingerprint(&ca.fingerprint()));

    let users = node_a.workload("default", "users").await.expect("users");
    let web = node_b.workload("default", "web").await.expect("web");
    let billing = node_p
        .workload("prod", "billing")
        .await
        .expect("billing in prod");
    assert_eq!(
        leaf_uri(&users.chain()),
        "spiffe://mesh.example/ns/default/svc/users"
    );
    assert_eq!(
        leaf_uri(&web.chain()),
        "spiffe://mesh.example/ns/default/svc/web"
    );
    assert_eq!(
        leaf_uri(&billing.chain()),
        "spiffe://mesh.example/ns/prod/svc/billing"
    );
    let chain = web.chain();
    let id = verify_svid(
        &bundle,
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Server,
    )
    .expect("verifies");
    assert_eq!(id, SpiffeId::workload(TD, "default", "web").expect("id"));
    let info = web.info().expect("info");
    assert!(!info.is_ca);
    assert!(info.lifetime() <= Duration::from_secs(3600) + meshgate_ca::signer::BACKDATE);

    // a real TLS 1.3 handshake: users (node-a) -> web (node-b), both sides see the exact peer ID
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(node_b.server_config(&web));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("client cert")
            .to_vec();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.expect("read");
        tls.write_all(b"pong").await.expect("write");
        tls.shutdown().await.ok();
        (leaf_uri(&peer), tls.get_ref().1.protocol_version())
    });
    let expected = ExpectedPeer::AnyOf(vec![web.id.clone()]);
    let connector = tokio_rustls::TlsConnector::from(node_a.client_config(&users, expected));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("web").expect("name"), tcp)
        .await
        .expect("client handshake");
    assert_eq!(
        leaf_uri(tls.get_ref().1.peer_certificates().expect("server cert")),
        "spiffe://mesh.example/ns/default/svc/web"
    );
    tls.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"pong");
    let (client_seen, version) = server.await.expect("server task");
    assert_eq!(client_seen, "spiffe://mesh.example/ns/default/svc/users");
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));

    // the same server refuses a client that expects someone else
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(node_b.server_config(&web));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let wrong = ExpectedPeer::AnyOf(vec![billing.id.clone()]);
    let connector = tokio_rustls::TlsConnector::from(node_a.client_config(&users, wrong));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let err = connector
        .connect(ServerName::try_from("web").expect("name"), tcp)
        .await
        .expect_err("wrong server identity");
    assert!(err.to_string().contains("not the expected"), "{err}");

    // a restart reuses the certificates on disk: no token needed, nothing new issued
    let issued = ca.issued();
    let (mut cfg, _d) = ca.node_config("node-a", None);
    cfg.data_dir = data;
    let again = IdentityManager::start(cfg)
        .await
        .expect("restart from disk");
    assert_eq!(again.node().chain(), node.chain());
    again
        .workload("default", "users")
        .await
        .expect("users from disk");
    assert_eq!(ca.issued(), issued);
}

#[tokio::test]
async fn bad_tokens_are_refused_and_issue_nothing() {
    let ca = TestCa::start(TD).await;
    let token = ca.token("node-a", &["web"]);
    let (cfg, _d) = ca.node_config("node-a", Some(token.clone()));
    IdentityManager::start(cfg).await.expect("first use");
    let issued = ca.issued();

    // reused
    let (cfg, _d) = ca.node_config("node-a", Some(token));
    let (code, msg) = refused(IdentityManager::start(cfg).await.expect_err("reused token"));
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("already used"), "{msg}");

    // expired
    let past = std::time::SystemTime::now() - Duration::from_secs(7200);
    let expired = TokenStore::new(&ca.data_dir())
        .create("node-a", None, &[], Duration::from_secs(3600), past)
        .expect("token")
        .token;
    let (cfg, _d) = ca.node_config("node-a", Some(expired));
    let (_, msg) = refused(IdentityManager::start(cfg).await.expect_err("expired"));
    assert!(msg.contains("expired"), "{msg}");

    // bound to another node
    let (cfg, _d) = ca.node_config("node-b", Some(ca.token("node-a", &[])));
    let (_, msg) = refused(IdentityManager::start(cfg).await.expect_err("other node"));
    assert!(
        msg.contains(r#"is for node "node-a", not "node-b""#),
        "{msg}"
    );

    // unknown
    let (cfg, _d) = ca.node_config("node-a", Some("mgjt_0000".into()));
    let (_, msg) = refused(IdentityManager::start(cfg).await.expect_err("unknown"));
    assert!(msg.contains("unknown join token"), "{msg}");

    // no token and nothing on disk
    let (cfg, _d) = ca.node_config("node-c", None);
    let err = IdentityManager::start(cfg).await.expect_err("no token");
    assert!(matches!(err, IdentityError::NeedToken(_)), "{err}");

    assert_eq!(ca.issued(), issued, "nothing issued for refused joins");
    assert!(ca.server.state().refused() >= 4);
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_by_the_client() {
    let ca = TestCa::start(TD).await;
    let other = TestCa::start(TD).await;
    let token = ca.token("node-a", &[]);
    let (mut cfg, _d) = ca.node_config("node-a", Some(token.clone()));
    cfg.ca_fingerprint = other.fingerprint();
    let err = IdentityManager::start(cfg).await.expect_err("wrong pin");
    let text = err.to_string();
    assert!(matches!(err, IdentityError::CaUnreachable { .. }), "{text}");
    assert!(text.contains("pinned root"), "{text}");
    assert_eq!(ca.issued(), 0);
    // the token was never sent, so it still works with the right pin
    let (cfg, _d) = ca.node_config("node-a", Some(token));
    IdentityManager::start(cfg).await.expect("right pin");
}

fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

#[tokio::test]
async fn workload_requests_are_authorized() {
    let ca = TestCa::start(TD).await;
    let (node_a, _d) = ca.join("node-a", &["web"]).await;
    let issued = ca.issued();

    // a service this node may not run
    let (code, msg) = refused(
        node_a
            .workload("default", "billing")
            .await
            .expect_err("not allowed"),
    );
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(msg.contains("may not run service default/billing"), "{msg}");

    let mut client = node_a.ca_client().await.expect("mTLS client");
    let web = "spiffe://mesh.example/ns/default/svc/web";
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            csr_with(
                p256,
                vec![
                    uri(web),
                    SanType::DnsName("web.example".try_into().expect("dns")),
                ],
            ),
            "exactly one SAN",
        ),
        (
            csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(web)]),
            "key type not allowed",
        ),
        (
            csr_with(&rcgen::PKCS_ED25519, vec![uri(web)]),
            "key type not allowed",
        ),
        (
            csr_with(p256, vec![uri("spiffe://mesh.example/node/node-a")]),
            "SignWorkload needs a CSR",
        ),
        (
            csr_with(p256, vec![uri("spiffe://evil.example/ns/default/svc/web")]),
            "not in trust domain",
        ),
    ];
    for (csr_der, want) in cases {
        let status = client
            .sign_workload(CsrRequest { csr_der })
            .await
            .expect_err(want);
        assert!(
            status.message().contains(want),
            "want {want:?}, got {:?}",
            status.message()
        );
    }
    // renewing someone else's node identity
    let status = client
        .renew_node(CsrRequest {
            csr_der: csr_with(p256, vec![uri("spiffe://mesh.example/node/node-b")]),
        })
        .await
        .expect_err("other node");
    assert!(
        status.message().contains("may only renew its own identity"),
        "{}",
        status.message()
    );

    // SignWorkload without any client certificate
    let pinned = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::pinned(
            TD,
            &ca.fingerprint(),
            ExpectedPeer::TrustDomain,
        )))
        .with_no_client_auth();
    let mut anon = connect_ca(&ca.address(), pinned)
        .await
        .expect("anonymous TLS is allowed");
    let (_, csr_der) = make_csr(&SpiffeId::parse(web).expect("id")).expect("csr");
    let status = anon
        .sign_workload(CsrRequest { csr_der })
        .await
        .expect_err("no client cert");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("needs a node SVID"),
        "{}",
        status.message()
    );

    assert_eq!(ca.issued(), issued, "nothing issued for refused requests");
    // and a legitimate request still works afterwards
    node_a.workload("default", "web").await.expect("web");
    assert_eq!(ca.issued(), issued + 1);
}

#[tokio::test]
async fn node_certificate_from_a_foreign_ca_is_refused() {
    let ca = TestCa::start(TD).await;
    let foreign = TestCa::start(TD).await;
    let (_evil, dir) = foreign.join("node-a", &["web"]).await;
    let data = dir.path().join("data");
    let chain = pki::read_pem_certs(&data.join("node.crt")).expect("chain");
    let key = KeyPair::from_pem(&std::fs::read_to_string(data.join("node.key")).expect("key"))
        .expect("key");
    let slot = CertSlot::new();
    slot.set(chain, key.serialize_der()).expect("slot");
    let tls = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::pinned(
            TD,
            &ca.fingerprint(),
            ExpectedPeer::TrustDomain,
        )))
        .with_client_cert_resolver(slot);
    let (_, csr_der) =
        make_csr(&SpiffeId::workload(TD, "default", "web").expect("id")).expect("csr");
    let result = async {
        let mut client = connect_ca(&ca.address(), tls)
            .await
            .map_err(|e| e.to_string())?;
        client
            .sign_workload(CsrRequest { csr_der })
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(
        result.is_err(),
        "a foreign node certificate must not be accepted"
    );
    assert_eq!(ca.issued(), 0);
}

#[tokio::test]
async fn certificates_renew_before_expiry() {
    // 3s certificates renew at about 2s; the test waits for that, bounded
    let ca = TestCa::start_with_ttl(TD, Duration::from_secs(3)).await;
    let (node, _d) = ca.join("node-a", &["web"]).await;
    let web = node.workload("default", "web").await.expect("web");
    let first_web = web.info().expect("info").serial;
    let first_node = node.node().info().expect("info").serial;
    let renewed = eventually(Duration::from_secs(20), || {
        let (web, node) = (web.clone(), node.node());
        let (first_web, first_node) = (first_web.clone(), first_node.clone());
        async move {
            web.info().is_some_and(|i| i.serial != first_web)
                && node.info().is_some_and(|i| i.serial != first_node)
        }
    })
    .await;
    assert!(renewed, "node and workload certificates were renewed");
    let renewals = node.status().renewals;
    assert!(renewals >= 2, "{renewals}");
    // renewal is paced by the lifetime (about every 2s here), not a tight loop
    assert!(renewals <= 12, "{renewals} renewals is too many");
    assert_eq!(
        leaf_uri(&web.chain()),
        "spiffe://mesh.example/ns/default/svc/web"
    );
}

#[tokio::test]
async fn trust_bundle_updates_reach_nodes() {
    let ca = TestCa::start(TD).await;
    let (node, dir) = ca.join("node-a", &[]).await;
    // a root the operator adds by hand (extra-roots.pem), picked up on reload (SIGHUP)
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let next_root = params.self_signed(&key).expect("root");
    std::fs::write(ca.data_dir().join("extra-roots.pem"), next_root.pem()).expect("extra roots");
    assert!(ca.server.reload().expect("reload").bundle);
    let updated = eventually(Duration::from_secs(10), || {
        let node = node.clone();
        async move { node.bundle().load().roots().len() == 2 }
    })
    .await;
    assert!(updated, "the node follows the bundle stream");
    assert_eq!(node.status().bundle_updates, 1);
    let on_disk = pki::read_pem_certs(&dir.path().join("data/bundle.pem")).expect("bundle.pem");
    assert_eq!(on_disk.len(), 2);
}

#[tokio::test]
async fn renewal_retries_while_the_ca_is_down_and_keeps_the_current_certificate() {
    let ca = TestCa::start_with_ttl(TD, Duration::from_secs(4)).await;
    let (node, _d) = ca.join("node-a", &["web"]).await;
    let web = node.workload("default", "web").await.expect("web");
    let held = web.info().expect("info").serial;
    let ca = ca
        .restart(async {
            let failed = eventually(Duration::from_secs(20), || {
                let node = node.clone();
                async move { node.status().renew_failures >= 2 }
            })
            .await;
            assert!(failed, "renewal attempts fail while the CA is down");
            // the certificate in use did not change meanwhile
            assert_eq!(web.info().expect("info").serial, held);
        })
        .await;
    let recovered = eventually(Duration::from_secs(30), || {
        let web = web.clone();
        let held = held.clone();
        async move { web.info().is_some_and(|i| i.serial != held) }
    })
    .await;
    assert!(recovered, "renewal succeeds once the CA is back");
    assert!(ca.issued() >= 1);
}
