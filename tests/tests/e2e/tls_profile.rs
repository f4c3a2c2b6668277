//! The public listener's TLS profile as an independent TLS stack (OpenSSL's `s_client`) sees
//! it: TLS 1.2 with ECDHE + AEAD gets the same answer as TLS 1.3; TLS 1.1, CBC suites and
//! static RSA key exchange are refused; `tls_min_version: "1.3"` refuses TLS 1.2; the mesh
//! ports (tunnel inbound, CA) refuse TLS 1.2; an OCSP response file is stapled; a replaced
//! certificate is served without a restart while open connections keep working.
//!
//! The gateway's certificate here is RSA, made with `openssl` itself: with an ECDSA
//! certificate static RSA key exchange could never be chosen, and its refusal would prove
//! nothing.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::io::AsyncWriteExt;

use crate::{
    gw_harness::Backend,
    mesh::{AgentSpec, GatewaySpec, Intention, Mesh, RouteSpec, ServiceSpec, TestMesh},
};

/// `openssl` on PATH; `None` (reason printed) outside CI, a failure under `CI=true`.
fn openssl() -> Option<PathBuf> {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("openssl"));
    }
    let reason = "no openssl on PATH (Debian: apt-get install openssl)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

fn run(openssl: &Path, dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(openssl)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway PKI in `dir`: `ca.crt`, and `<name>.crt`/`<name>.key` (RSA 2048, SAN
/// api.example, serial `serial`) signed by it, plus `<name>.ocsp`, a signed "good" OCSP
/// response for it.
fn rsa_pki(openssl: &Path, dir: &Path, names: &[(&str, &str)]) {
    run(
        openssl,
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=tls-profile test CA",
            "-days",
            "2",
        ],
    );
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:api.example\n").expect("ext");
    let mut index = String::new();
    for (name, serial) in names {
        run(
            openssl,
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=api.example",
            ],
        );
        run(
            openssl,
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{serial}"),
                "-days",
                "1",
                "-extfile",
                "ext",
                "-out",
                &format!("{name}.crt"),
            ],
        );
        // the index wants the serial in upper-case hex
        let (expiry, serial) = (chrono_like_expiry(), serial.to_uppercase());
        index.push_str(&format!(
            "V\t{expiry}\t\t{serial}\tunknown\t/CN=api.example\n"
        ));
    }
    std::fs::write(dir.join("index.txt"), &index).expect("index");
    // both test certificates name api.example
    std::fs::write(dir.join("index.txt.attr"), "unique_subject = no\n").expect("attr");
    for (name, _) in names {
        run(
            openssl,
            dir,
            &[
                "ocsp",
                "-index",
                "index.txt",
                "-rsigner",
                "ca.crt",
                "-rkey",
                "ca.key",
                "-CA",
                "ca.crt",
                "-issuer",
                "ca.crt",
                "-cert",
                &format!("{name}.crt"),
                "-respout",
                &format!("{name}.ocsp"),
                "-ndays",
                "1",
            ],
        );
    }
}

/// An OpenSSL index expiry a day from now (`YYMMDDHHMMSSZ`); the exact value only has to be
/// in the future.
fn chrono_like_expiry() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", "+1 day", "+%y%m%d%H%M%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What one `openssl s_client` run saw.
#[derive(Debug)]
struct Client {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Client {
    /// The negotiated protocol (`TLSv1.2`), from `-brief`'s report.
    fn protocol(&self) -> Option<&str> {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("Protocol version: "))
            .map(str::trim)
    }

    /// The HTTP status line and body of the answer (headers that vary per request dropped).
    fn answer(&self) -> (String, String) {
        let (head, body) = self.stdout.split_once("\r\n\r\n").unwrap_or(("", ""));
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, body.to_owned())
    }
}

/// `openssl s_client` to `addr` with `args`, sending `request` (if any) and reading until the
/// server closes; with no request it stops after the handshake.
async fn s_client<S: AsRef<std::ffi::OsStr>>(
    openssl: &Path,
    addr: std::net::SocketAddr,
    args: &[S],
    request: &str,
) -> Client {
    let mut cmd = tokio::process::Command::new(openssl);
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "api.example",
    ])
    .args(args)
    // with a request: keep reading until the server closes; without: stop after the
    // handshake (at stdin's end)
    .args(if request.is_empty() {
        None
    } else {
        Some("-ign_eof")
    })
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.as_bytes()).await.expect("write");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("s_client finished in time")
        .expect("s_client output");
    Client {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const GET: &str = "GET /users/1 HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n";

async fn stack(dir: &Path, min13: bool, reload: Duration) -> (Mesh, Backend) {
    let backend = Backend::start("users").await;
    let (crt, key, ocsp) = (dir.join("a.crt"), dir.join("a.key"), dir.join("a.ocsp"));
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
        .intention(Intention::allow("gateway", "users"))
        .gateway(
            GatewaySpec::new()
                .configure(move |c| {
                    c.tls = vec![meshgate_agent::http::front::CertFiles {
                        cert_file: crt,
                        key_file: key,
                        ocsp_file: Some(ocsp),
                    }];
                    c.tls_reload_interval = reload;
                    if min13 {
                        c.tls_min_version = meshgate_agent::http::front::MinTls::Tls13;
                    }
                })
                .route(RouteSpec::new("users").prefix("/users").to("users")),
        )
        .start()
        .await;
    (mesh, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_intermediate_profile_serves_old_clients_and_refuses_weak_ones() {
    let Some(openssl) = openssl() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    rsa_pki(&openssl, dir.path(), &[("a", "a1")]);
    let (mesh, _backend) = stack(dir.path(), false, Duration::from_secs(10)).await;
    let https = mesh.gw().https();
    let verify = ["-CAfile", "ca.crt", "-verify_return_error", "-brief"];
    let ca = dir.path().join("ca.crt");
    let ca = ca.to_str().expect("utf-8 path");
    let with_ca = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = verify.iter().map(|s| s.to_string()).collect();
        v[1] = ca.to_owned();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let v13 = with_ca(&["-tls1_3"]);
    let t13 = s_client(&openssl, https, &v13, GET).await;
    assert!(t13.ok, "TLS 1.3: {t13:?}");
    assert_eq!(t13.protocol(), Some("TLSv1.3"), "{t13:?}");
    let v12 = with_ca(&["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]);
    let t12 = s_client(&openssl, https, &v12, GET).await;
    assert!(t12.ok, "TLS 1.2 ECDHE-RSA-AES128-GCM: {t12:?}");
    assert_eq!(t12.protocol(), Some("TLSv1.2"), "{t12:?}");
    assert!(t12.answer().0.starts_with("HTTP/1.1 200"), "{t12:?}");
    let (status12, body12) = t12.answer();
    let (status13, body13) = t13.answer();
    assert_eq!(status12, status13);
    let strip = |b: &str| {
        let mut v: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
        // the backend echoes what it saw; per-request ids differ by design
        if let Some(h) = v.get_mut("headers").and_then(|h| h.as_object_mut()) {
            h.retain(|k, _| !["x-request-id", "traceparent"].contains(&k.as_str()));
        }
        v
    };
    assert_eq!(
        strip(&body12),
        strip(&body13),
        "same answer over 1.2 and 1.3"
    );
    assert_eq!(strip(&body12)["service"], "users", "{body12}");
    // every intermediate TLS 1.2 suite that fits an RSA certificate works
    for suite in ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"] {
        let v = with_ca(&["-tls1_2", "-cipher", suite]);
        let got = s_client(&openssl, https, &v, GET).await;
        assert!(
            got.ok && got.answer().0.starts_with("HTTP/1.1 200"),
            "{suite}: {got:?}"
        );
    }

    // refused: TLS 1.1 (the client's own floor lowered, so the refusal is the server's),
    // CBC suites, static RSA key exchange
    let v11 = with_ca(&["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    let t11 = s_client(&openssl, https, &v11, GET).await;
    assert!(
        !t11.ok && t11.protocol().is_none(),
        "TLS 1.1 must fail: {t11:?}"
    );
    for suite in [
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-RSA-AES256-SHA384",
        "AES128-GCM-SHA256",
        "AES256-GCM-SHA384",
        "AES128-SHA",
    ] {
        let v = with_ca(&["-tls1_2", "-cipher", suite]);
        let got = s_client(&openssl, https, &v, GET).await;
        assert!(
            !got.ok && got.protocol().is_none(),
            "{suite} must be refused: {got:?}"
        );
    }

    // the OCSP response file is stapled
    let vs = with_ca(&["-tls1_2", "-status"]);
    let mut vs = vs;
    vs.retain(|a| a != "-brief");
    let st = s_client(&openssl, https, &vs, GET).await;
    assert!(
        st.stdout.contains("OCSP Response Status: successful")
            && st.stdout.contains("Cert Status: good"),
        "stapled OCSP: {st:?}"
    );

    // mesh ports stay TLS 1.3 only: the tunnel inbound and the CA refuse 1.2 at the
    // handshake and negotiate 1.3
    for (what, addr) in [
        ("inbound", mesh.agent("node-b").inbound()),
        (
            "ca",
            mesh.ca
                .address()
                .trim_start_matches("https://")
                .parse()
                .expect("ca addr"),
        ),
    ] {
        let got = s_client(&openssl, addr, &["-tls1_2", "-brief"], "").await;
        assert!(got.protocol().is_none(), "{what} accepted TLS 1.2: {got:?}");
        let got = s_client(&openssl, addr, &["-tls1_3", "-brief"], "").await;
        assert_eq!(got.protocol(), Some("TLSv1.3"), "{what}: {got:?}");
    }
    assert!(mesh.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_13_refuses_tls12() {
    let Some(openssl) = openssl() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    rsa_pki(&openssl, dir.path(), &[("a", "a1")]);
    let (mesh, _backend) = stack(dir.path(), true, Duration::from_secs(10)).await;
    let https = mesh.gw().https();
    let got = s_client(&openssl, https, &["-tls1_2", "-brief"], GET).await;
    assert!(got.protocol().is_none(), "TLS 1.2 accepted: {got:?}");
    let got = s_client(&openssl, https, &["-tls1_3", "-brief"], GET).await;
    assert_eq!(got.protocol(), Some("TLSv1.3"), "{got:?}");
    assert!(got.answer().0.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(mesh.shutdown().await);
}

/// The serial of the certificate a fresh handshake presents.
async fn served_serial(openssl: &Path, addr: std::net::SocketAddr) -> String {
    let got = s_client(openssl, addr, &["-showcerts"], "").await;
    let pem_start = got.stdout.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
    let pem_end = got
        .stdout
        .find("-----END CERTIFICATE-----")
        .map(|i| i + "-----END CERTIFICATE-----".len())
        .unwrap_or(0);
    let pem = &got.stdout[pem_start..pem_end];
    let mut x = std::process::Command::new(openssl)
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("x509");
    std::io::Write::write_all(&mut x.stdin.take().expect("stdin"), pem.as_bytes()).expect("pem");
    let out = x.wait_with_output().expect("x509 output");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let Some(openssl) = openssl() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    rsa_pki(&openssl, dir.path(), &[("a", "a1"), ("b", "b2")]);
    let (mesh, _backend) = stack(dir.path(), false, Duration::from_millis(200)).await;
    let gw = mesh.gw();
    let https = gw.https();
    assert_eq!(served_serial(&openssl, https).await, "a1");

    // a keep-alive connection opened on the old certificate
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&dir.path().join("ca.crt")) {
        roots.add(c).expect("root");
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let tcp = tokio::net::TcpStream::connect(https)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("api.example").expect("sni"),
            tcp,
        )
        .await
        .expect("tls");
    let (mut old, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tls))
    .await
    .expect("h1");
    tokio::spawn(conn);
    let get =
        |s: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>| {
            s.send_request(
                http::Request::get("/users/1")
                    .header("host", "api.example")
                    .body(http_body_util::Empty::new())
                    .expect("request"),
            )
        };
    let first = get(&mut old).await.expect("first");
    assert_eq!(first.status(), 200);
    // read the body to its end: a client that drops an unread body may lose the connection,
    // and the point is to reuse this one after the renewal
    http_body_util::BodyExt::collect(first.into_body())
        .await
        .expect("first body");

    // a broken replacement (certificate without its key) is refused; the old one keeps serving
    let bad_key = dir.path().join("a.key.new");
    std::fs::write(&bad_key, "not a key").expect("write");
    std::fs::rename(&bad_key, dir.path().join("a.key")).expect("rename");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(served_serial(&openssl, https).await, "a1", "old cert kept");

    // certbot-style renewal: new files moved into place
    for ext in ["crt", "key", "ocsp"] {
        let tmp = dir.path().join(format!("next.{ext}"));
        std::fs::copy(dir.path().join(format!("b.{ext}")), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.path().join(format!("a.{ext}"))).expect("rename");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let serial = served_serial(&openssl, https).await;
        if serial == "b2" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed certificate not served within 5s (still {serial})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the connection from before the renewal still works
    assert_eq!(get(&mut old).await.expect("after renewal").status(), 200);
    assert!(
        gw.metric("meshgate_gateway_tls_reloads_total{result=\"ok\"}")
            .await
            >= 1.0
    );
    assert!(
        gw.metric("meshgate_gateway_tls_reloads_total{result=\"error\"}")
            .await
            >= 1.0
    );
    assert!(mesh.shutdown().await);
}

fn rustls_pemfile_certs(path: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .expect("pem")
        .map(|c| c.expect("cert"))
        .collect()
}
