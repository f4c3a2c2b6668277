//! The CA's and the data plane's trust costs: CSR signing (what `SignWorkload` and `RenewNode`
//! do per call once authorized: parse and check the CSR, sign the leaf with the intermediate)
//! in signatures per second, and the SPIFFE verifier every tunnel handshake runs (chain to a
//! bundle root, SAN, trust domain, expected identity, denylist).
//!
//! `cargo bench -p meshgate-ca --bench trust` (criterion reports `elem/s` = signatures/s).
#![allow(missing_docs)] // criterion's macros generate undocumented functions

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshgate_ca::{
    bundle::TrustBundle,
    rotation, signer,
    spiffe::SpiffeId,
    store,
    verify::{ExpectedPeer, SpiffeServerVerifier, Usage, check_chain},
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

const TD: &str = "mesh.example";

/// A CA data dir (root, intermediate) made the way `meshgate ca init` makes it.
fn ca() -> (tempfile::TempDir, rotation::Signing) {
    let tmp = tempfile::tempdir().expect("tempdir");
    store::init(tmp.path(), TD, false, SystemTime::now()).expect("ca init");
    let s = rotation::signing(tmp.path()).expect("signing");
    (tmp, s)
}

fn unix_now() -> UnixTime {
    UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).expect("time"))
}

fn signing(c: &mut Criterion) {
    let (_dir, s) = ca();
    let id = SpiffeId::workload(TD, "default", "web").expect("id");
    let (_key, csr) = signer::make_csr(&id).expect("csr");
    let ttl = Duration::from_secs(3600);
    let mut g = c.benchmark_group("csr");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check_and_sign", |b| {
        b.iter(|| {
            let checked = signer::check_csr(&csr, TD).expect("csr checks");
            s.signer
                .sign(&checked.id, &checked.public_key, ttl, SystemTime::now())
                .expect("sign")
        })
    });
    g.bench_function("check_only", |b| {
        b.iter(|| signer::check_csr(&csr, TD).expect("csr checks"))
    });
    g.finish();
}

fn verifying(c: &mut Criterion) {
    let (_dir, s) = ca();
    let node = SpiffeId::node(TD, "node-b").expect("id");
    let (_key, csr) = signer::make_csr(&node).expect("csr");
    let checked = signer::check_csr(&csr, TD).expect("csr");
    let chain: Vec<CertificateDer<'static>> = s
        .signer
        .sign(
            &checked.id,
            &checked.public_key,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .expect("sign");
    // a bundle as agents hold it: the root, a hosting map and a denylist with entries, so the
    // revocation check does its lookup rather than its empty-list shortcut
    let bundle = TrustBundle::new(TD, s.roots.clone(), 1)
        .expect("bundle")
        .with_hosting((0..50).map(|i| (format!("default/svc{i}"), vec![format!("node-{i}")])))
        .with_revoked(["node-z".to_owned()], ["00ff".to_owned()]);
    let shared = Arc::new(ArcSwap::from_pointee(bundle.clone()));
    let pinned = SpiffeServerVerifier::new(
        shared,
        ExpectedPeer::AnyOf(vec![
            node.clone(),
            SpiffeId::node(TD, "node-c").expect("id"),
        ]),
    );
    let name = ServerName::try_from("node-b").expect("name");
    let mut g = c.benchmark_group("spiffe_verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("server_pinned", |b| {
        b.iter(|| {
            pinned
                .verify_server_cert(&chain[0], &chain[1..], &name, &[], unix_now())
                .expect("verifies")
        })
    });
    g.bench_function("check_chain", |b| {
        b.iter(|| check_chain(&bundle, &chain, unix_now(), Usage::Server).expect("verifies"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = signing, verifying
}
criterion_main!(benches);
