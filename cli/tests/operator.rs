//! The CLI conventions an operator relies on: no panic when stdout closes early, config
//! validation that refuses what start-up would (each problem once, at its line, with a hint),
//! `--admin` spellings and wrong-process detection, version, colour, and a second Ctrl-C.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
}

fn meshgate(args: &[&str]) -> std::process::Output {
    bin().args(args).output().expect("run meshgate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_secret(path: &Path, contents: &str) {
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Runs meshgate with a stdout whose reader is already gone.
fn into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run meshgate")
}

/// A child process that is killed if the test ends (or panics) before stopping it.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `meshgate dev` on a free port block, with its state in `data`; returns the child and the
/// lines it printed up to "ready".
fn start_dev(data: &Path) -> (Guard, Vec<String>, u16) {
    let mut attempt = 0u32;
    loop {
        let base =
            22_000 + u16::try_from((std::process::id() + attempt * 5) % 9).unwrap_or(0) * 1_000;
        let mut child = bin()
            .args(["dev", "--port-base", &base.to_string(), "--data-dir"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut printed = Vec::new();
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l == "ready" => break true,
                Ok(l) => printed.push(l),
                Err(_) => break false,
            }
        };
        if ready {
            return (Guard(Some(child)), printed, base);
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        attempt += 1;
        assert!(
            attempt < 3 && text(&out.stderr).contains("in use"),
            "dev did not start: {}",
            text(&out.stderr)
        );
    }
}

/// SIGTERM, then waits (bounded) for the exit; returns the exit status.
fn stop(mut guard: Guard) -> std::process::ExitStatus {
    let mut child = guard.0.take().expect("running");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 GET on loopback: status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_one_host_example_starts_with_its_script_and_serves_end_to_end() {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/local");
    // the committed files are valid as they are (the placeholder fingerprint is a warning)
    let mut args = vec![
        "config".to_owned(),
        "validate".to_owned(),
        "--skip-files".to_owned(),
    ];
    for f in [
        "ca.yaml",
        "node-1.yaml",
        "node-2.yaml",
        "node-3.yaml",
        "gateway.yaml",
    ] {
        args.push(local.join(f).display().to_string());
    }
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = meshgate(&args_ref);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("placeholder"));

    // a block of ports where every port of the layout is free
    let ports = [
        "012", "108", "100", "208", "200", "308", "300", "391", "080", "001", "181", "281",
    ];
    let block = (27..=31u16)
        .find(|b| {
            ports
                .iter()
                .all(|p| std::net::TcpListener::bind(format!("127.0.0.1:{b}{p}")).is_ok())
        })
        .expect("a free port block");
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("sh")
        .arg(local.join("run.sh"))
        .arg(state.path())
        .env("MESHGATE", env!("CARGO_BIN_EXE_meshgate"))
        .env("PORT_BLOCK", block.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run.sh");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let script = Guard(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l == "ready" => break,
            Ok(l) => printed.push(l),
            Err(_) => {
                let logs: String = std::fs::read_dir(state.path().join("logs"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| {
                        format!(
                            "{}:\n{}",
                            e.path().display(),
                            std::fs::read_to_string(e.path()).unwrap_or_default()
                        )
                    })
                    .collect();
                assert!(
                    Instant::now() < deadline,
                    "run.sh did not become ready: {printed:#?}\n{logs}"
                );
            }
        }
    }
    assert!(
        printed
            .iter()
            .any(|l| l.ends_with("valid CA config for trust domain mesh.example")),
        "{printed:#?}"
    );
    // north-south through the gateway, east-west through node-3's upstream listener
    let (code, body) = http_get(&format!("127.0.0.1:{block}080"), "/api/users/7");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"name\":\"user 7\""), "{body}");
    let (code, body) = http_get(&format!("127.0.0.1:{block}391"), "/users/8");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user 8"), "{body}");
    // what runs is valid by every check, files included
    let files: Vec<String> = [
        "ca.yaml",
        "node-1.yaml",
        "node-2.yaml",
        "node-3.yaml",
        "gateway.yaml",
    ]
    .iter()
    .map(|f| state.path().join(f).display().to_string())
    .collect();
    let mut args = vec!["config", "validate"];
    args.extend(files.iter().map(String::as_str));
    let out = meshgate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "no warnings: {}", text(&out.stderr));

    let status = stop(script);
    assert!(status.success(), "{status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l == "stopped"),
        "{rest:?} {}",
        errors.join().unwrap_or_default()
    );
    assert_eq!(
        http_get(&format!("127.0.0.1:{block}001"), "/readyz").0,
        0,
        "the gateway stopped"
    );
}

#[test]
fn every_printing_command_exits_141_without_panicking_when_stdout_closes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("dev");
    let (dev, _printed, base) = start_dev(&data);
    let gw_admin = format!("127.0.0.1:{}", base + 200);
    let agent_admin = format!("http://127.0.0.1:{}", base + 100);
    let ca_dir = tmp.path().join("ca");
    let ca = ca_dir.to_str().expect("utf8").to_owned();
    let dev_ca = data.join("ca").to_str().expect("utf8").to_owned();
    let node_dir = data.join("node-b").to_str().expect("utf8").to_owned();
    let examples = format!("{}/../deploy/examples", env!("CARGO_MANIFEST_DIR"));
    let gateway_yaml = format!("{examples}/gateway.yaml");
    // a route with a JWT provider, for `auth explain`
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let p = key.public_key_raw().to_vec();
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1",
        "x": data_encoding::BASE64URL_NOPAD.encode(&p[1..33]), "y": data_encoding::BASE64URL_NOPAD.encode(&p[33..])});
    let jwt_cfg = tmp.path().join("jwt.yaml");
    std::fs::write(
        &jwt_cfg,
        format!(
            "node: gw\ntrust_domain: mesh.example\ndata_dir: ./gw\n\
             ca: {{ address: https://127.0.0.1:1, fingerprint: \"sha256:00\" }}\n\
             listen: {{ http: 127.0.0.1:0 }}\n\
             auth:\n  jwt:\n    - {{ name: main, algorithms: [ES256], jwks: {{ keys: [{jwk}] }} }}\n\
             routes:\n  - {{ name: me, auth: {{ jwt: [main] }}, backend: {{ service: users }} }}\n"
        ),
    )
    .expect("write");
    let b64 =
        |v: serde_json::Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
    let token = format!(
        "{}.{}.{}",
        b64(serde_json::json!({"alg": "ES256", "kid": "k1"})),
        b64(serde_json::json!({"sub": "a", "exp": 1})),
        data_encoding::BASE64URL_NOPAD.encode(b"not a signature")
    );
    let jwt_cfg = jwt_cfg.to_str().expect("utf8").to_owned();
    let commands: Vec<Vec<&str>> = vec![
        vec![
            "auth", "explain", "--config", &jwt_cfg, "--route", "me", "--token", &token,
        ],
        vec!["--help"],
        vec!["--version"],
        vec!["ca", "token", "create", "--help"],
        vec!["version", "--admin", &gw_admin],
        vec!["version", "--admin", &agent_admin, "-o", "json"],
        vec!["status", "--admin", &agent_admin],
        vec!["routes", "--admin", &gw_admin],
        vec!["routes", "--admin", &gw_admin, "-o", "json"],
        vec![
            "routes",
            "--admin",
            &gw_admin,
            "--match",
            "GET http://x/api/users/1",
        ],
        vec!["routes", "--config", &gateway_yaml],
        vec!["services", "--admin", &agent_admin],
        vec!["services", "--admin", &agent_admin, "-o", "json"],
        vec!["endpoints", "users", "--admin", &agent_admin],
        vec!["certs", "--data-dir", &node_dir],
        vec!["certs", "--data-dir", &node_dir, "-o", "json"],
        vec!["config", "schema", "--kind", "gateway"],
        vec!["config", "validate", "--skip-files", &gateway_yaml],
        vec![
            "config",
            "validate",
            "--skip-files",
            &gateway_yaml,
            "-o",
            "json",
        ],
        vec!["completion", "bash"],
        vec!["completion", "zsh"],
        vec!["completion", "fish"],
        vec!["apikey", "hash", "abc"],
        vec![
            "ca",
            "init",
            "--trust-domain",
            "mesh.example",
            "--data-dir",
            &ca,
        ],
        vec!["ca", "fingerprint", "--data-dir", &dev_ca],
        vec![
            "ca",
            "token",
            "create",
            "--data-dir",
            &dev_ca,
            "--node",
            "n1",
            "--print-join-command",
        ],
        vec!["ca", "token", "list", "--data-dir", &dev_ca],
        vec!["ca", "node", "list", "--data-dir", &dev_ca],
        vec![
            "ca",
            "node",
            "set-services",
            "--data-dir",
            &dev_ca,
            "node-b",
            "web",
        ],
    ];
    for args in &commands {
        let out = into_closed_pipe(args);
        let err = text(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
    }
    stop(dev);

    // dev itself: it starts, cannot print its banner, and ends quietly
    let other = tmp.path().join("dev2");
    let mut attempt = 0u32;
    loop {
        let base = 31_000 - u16::try_from((std::process::id() + attempt) % 9).unwrap_or(0) * 1_000;
        let out = into_closed_pipe(&[
            "dev",
            "--port-base",
            &base.to_string(),
            "--data-dir",
            other.to_str().expect("utf8"),
        ]);
        let err = text(&out.stderr);
        if out.status.code() == Some(1) && err.contains("in use") && attempt < 3 {
            attempt += 1;
            continue;
        }
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(out.status.code(), Some(141), "{err}");
        break;
    }
}

/// A gateway config that passes every check, and the files it names.
struct GatewayFixture {
    dir: tempfile::TempDir,
}

const GATEWAY: &str = "\
node: gw-1
trust_domain: mesh.example
data_dir: ./gw-1
ca:
  address: https://127.0.0.1:15012
  fingerprint: \"sha256:FINGERPRINT\"
  join_token_file: ./gw-1.token
listen:
  https: 127.0.0.1:8443
  http: 127.0.0.1:8080
  admin: 127.0.0.1:15000
tls:
  - { cert_file: tls/api.crt, key_file: tls/api.key }
auth:
  jwt:
    - { name: main, issuer: https://iss, algorithms: [ES256], jwks_file: jwks.json }
routes:
  - name: users
    match: { path: { prefix: /users } }
    backend: { service: users }
  - name: orders
    match: { path: { prefix: /orders } }
    backend: { service: orders }
discovery:
  static:
    users: [\"127.0.0.1:15008\"]
    orders: [\"127.0.0.1:15008\"]
";

impl GatewayFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("tls")).expect("tls dir");
        let cert =
            rcgen::generate_simple_self_signed(vec!["api.example".to_owned()]).expect("cert");
        std::fs::write(dir.path().join("tls/api.crt"), cert.cert.pem()).expect("crt");
        write_secret(
            &dir.path().join("tls/api.key"),
            &cert.signing_key.serialize_pem(),
        );
        let other = rcgen::generate_simple_self_signed(vec!["other".to_owned()]).expect("other");
        std::fs::write(dir.path().join("tls/other.crt"), other.cert.pem()).expect("crt");
        std::fs::write(dir.path().join("jwks.json"), r#"{"keys": []}"#).expect("jwks");
        write_secret(&dir.path().join("gw-1.token"), "mgjt_test");
        Self { dir }
    }

    /// Writes the config with `edit` applied (old text -> new text) and validates it.
    fn validate(&self, edits: &[(&str, &str)], extra: &[&str]) -> (std::process::Output, String) {
        let mut body = GATEWAY.replace("FINGERPRINT", &"ab".repeat(32));
        for (old, new) in edits {
            assert!(body.contains(old), "fixture has {old:?}");
            body = body.replace(old, new);
        }
        let path = self.dir.path().join("gateway.yaml");
        std::fs::write(&path, &body).expect("write");
        let mut args = vec!["config", "validate", path.to_str().expect("utf8")];
        args.extend_from_slice(extra);
        (meshgate(&args), body)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }
}

/// The 1-based line of `body` that contains `needle`.
fn line_of(body: &str, needle: &str) -> usize {
    body.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
}

#[test]
fn config_validate_refuses_what_start_up_would_each_once_at_its_line() {
    let f = GatewayFixture::new();
    let (out, _) = f.validate(&[], &[]);
    assert!(
        out.status.success(),
        "the fixture is valid: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("valid gateway config for node gw-1 (2 routes)"));

    let file = f.path().display().to_string();
    let good_fp = "ab".repeat(32);
    // (edits, the line the error must point at, what it must say, what the hint must say)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![(good_fp.as_str(), "abc")],
            "fingerprint:",
            "is not a CA fingerprint",
            "meshgate ca fingerprint",
        ),
        (
            vec![("https://127.0.0.1:15012", "http://127.0.0.1:15012")],
            "address: http://",
            "but the CA speaks gRPC over TLS only",
            "https://HOST:PORT",
        ),
        (
            vec![("tls/api.crt", "tls/missing.crt")],
            "cert_file:",
            "missing.crt does not exist",
            "relative to the config file",
        ),
        (
            vec![("tls/api.crt", "tls/other.crt")],
            "key_file:",
            "is not the private key of",
            "PEM private key",
        ),
        (
            vec![("jwks_file: jwks.json", "jwks_file: nope.json")],
            "jwks_file:",
            "nope.json does not exist",
            "create it",
        ),
        (
            vec![("    orders: [\"127.0.0.1:15008\"]\n", "")],
            "service: orders",
            "service \"orders\" has no discovery entry",
            "discovery.static",
        ),
        (
            vec![("http: 127.0.0.1:8080", "http: 127.0.0.1:8443")],
            "http: 127.0.0.1:8443",
            "collides with listen.https",
            "its own port",
        ),
        (
            vec![(
                "    match: { path: { prefix: /orders } }",
                "    match: { paht: { prefix: /orders } }",
            )],
            "paht",
            "unknown key `paht`",
            "did you mean `path`?",
        ),
    ];
    for (edits, at, says, hint) in cases {
        let (out, body) = f.validate(&edits, &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{says}: {err}");
        let want = format!("{file}:{}:", line_of(&body, at));
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&want) && first.contains(": error: ") && first.contains(says),
            "want {want}… error: …{says}, got:\n{err}"
        );
        let hint_line = err.lines().nth(1).unwrap_or_default();
        assert!(
            hint_line.trim_start().starts_with("hint: ") && hint_line.contains(hint),
            "{says}: hint {hint:?} in {err}"
        );
        // said once, with no parser snippets or Rust Debug text
        assert_eq!(err.matches(says).count(), 1, "{err}");
        for leak in [
            "-->", "line ", "Some(", "Other(", "Custom {", "os error", "Mismatch",
        ] {
            assert!(!err.contains(leak), "{leak:?} in {err}");
        }
    }

    // a secret readable by everyone; the placeholder fingerprint is a warning, not an error
    std::fs::set_permissions(
        f.dir.path().join("tls/api.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let zero = "0".repeat(64);
    let (out, body) = f.validate(&[(good_fp.as_str(), &zero)], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{file}:{}:", line_of(&body, "key_file:")))
            && err.contains("mode is 0644")
            && err.contains(&format!(
                "chmod 600 {}",
                f.dir.path().join("tls/api.key").display()
            )),
        "{err}"
    );
    assert!(
        err.contains(": warning: ca.fingerprint: the all-zero placeholder"),
        "{err}"
    );
    // -o json for CI, with the same facts
    let (out, _) = f.validate(&[(good_fp.as_str(), &zero)], &["-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["valid"], false);
    let d = &v["files"][0]["diagnostics"];
    assert_eq!(d[0]["severity"], "error");
    assert_eq!(d[0]["path"], "tls[0].key_file");
    assert_eq!(d[0]["line"], line_of(&body, "key_file:"));
    assert_eq!(d[1]["severity"], "warning");
    // --quiet: only the error
    let (out, _) = f.validate(&[(good_fp.as_str(), &zero)], &["--quiet"]);
    let err = text(&out.stderr);
    assert!(err.contains("error") && !err.contains("warning"), "{err}");
    assert!(out.stdout.is_empty());
    // the fix makes it valid, warnings and all
    std::fs::set_permissions(
        f.dir.path().join("tls/api.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let (out, _) = f.validate(&[(good_fp.as_str(), &zero)], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(1 warning)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn relative_paths_are_relative_to_the_config_file_not_the_working_directory() {
    let f = GatewayFixture::new();
    let (out, _) = f.validate(&[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // from another directory, naming the file by a relative path of its own
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let rel = pathdiff(&f.path(), elsewhere.path());
    let out = bin()
        .current_dir(elsewhere.path())
        .args(["config", "validate"])
        .arg(&rel)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `path` relative to `from` (both absolute).
fn pathdiff(path: &Path, from: &Path) -> PathBuf {
    let ups = from.components().count() - 1;
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    rel.push(path.strip_prefix("/").expect("absolute"));
    rel
}

#[test]
fn inspection_commands_know_which_process_they_talk_to() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dev, printed, base) = start_dev(&tmp.path().join("dev"));
    let gw = format!("http://127.0.0.1:{}", base + 200);
    let agent = format!("127.0.0.1:{}", base + 100);
    let ca = format!("127.0.0.1:{}", base + 12);

    // the inspect lines dev prints run as printed, one command per line
    let inspect: Vec<&String> = printed
        .iter()
        .filter(|l| l.starts_with("  meshgate "))
        .collect();
    assert_eq!(inspect.len(), 4, "{printed:#?}");
    for line in inspect {
        assert!(!line.contains('|'), "{line}");
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = meshgate(&args);
        assert!(out.status.success(), "{line}: {}", text(&out.stderr));
    }

    // routes against an agent, in both --admin spellings
    for addr in [agent.clone(), format!("http://{agent}")] {
        let out = meshgate(&["routes", "--admin", &addr]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains("is the admin API of an agent, not a gateway"),
            "{err}"
        );
    }
    // any command against the CA's gRPC port
    let out = meshgate(&["services", "--admin", &ca]);
    assert!(
        text(&out.stderr).contains("did not answer HTTP, so it is not a meshgate admin API"),
        "{}",
        text(&out.stderr)
    );
    // a bad spelling is a usage error that says how to write it
    let out = meshgate(&["services", "--admin", "https://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("plain HTTP"),
        "{}",
        text(&out.stderr)
    );

    let out = meshgate(&["version", "--admin", &gw, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["server"]["kind"], "gateway");
    assert_eq!(v["server"]["version"], env!("CARGO_PKG_VERSION"));
    let out = meshgate(&["status", "--admin", &agent]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("agent node-b at {agent}")),
        "{}",
        text(&out.stdout)
    );
    stop(dev);
}

/// Runs `args` under a pseudo-terminal (util-linux `script`), so colour would be used.
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> Option<String> {
    let mut cmd = Command::new("script");
    cmd.args([
        "-qec",
        &format!("{} {args}", env!("CARGO_BIN_EXE_meshgate")),
        "/dev/null",
    ]);
    cmd.env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().ok()?;
    Some(text(&out.stdout))
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let f = GatewayFixture::new();
    let (out, _) = f.validate(&[("http: 127.0.0.1:8080", "http: 127.0.0.1:8443")], &[]);
    assert!(!text(&out.stderr).contains('\x1b'), "no colour into a pipe");
    let args = format!("config validate {}", f.path().display());
    let Some(coloured) = on_a_terminal(&args, &[]) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have util-linux script"
        );
        eprintln!("SKIPPED colour test: `script` (util-linux) is not installed");
        return;
    };
    assert!(coloured.contains("\x1b[1;31merror"), "{coloured:?}");
    let plain = on_a_terminal(&args, &[("NO_COLOR", "1")]).expect("script");
    assert!(
        plain.contains("error") && !plain.contains('\x1b'),
        "{plain:?}"
    );
    let plain = on_a_terminal(&format!("--no-color {args}"), &[]).expect("script");
    assert!(
        plain.contains("error") && !plain.contains('\x1b'),
        "{plain:?}"
    );
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let out = meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--data-dir",
        ca_dir.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    assert!(out.status.success());
    let fp: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let cfg = tmp.path().join("ca.yaml");
    std::fs::write(
        &cfg,
        "trust_domain: mesh.example\ndata_dir: ca\nlisten: 127.0.0.1:0\n",
    )
    .expect("write");
    let mut child = bin()
        .args([
            "--log-format",
            "json",
            "ca",
            "serve",
            "--config",
            cfg.to_str().expect("utf8"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("CA started");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(a) = v["fields"]["addr"].as_str() {
            break a.to_owned();
        }
    };
    // a node holds a trust-bundle stream open, so a graceful stop waits for its drain (5s)
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let token = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        ca_dir.to_str().expect("utf8"),
        "--node",
        "n",
        "-q",
    ]);
    let node = runtime
        .block_on(meshgate_agent::identity::IdentityManager::start(
            meshgate_agent::identity::IdentityConfig {
                trust_domain: "mesh.example".into(),
                node: "n".into(),
                data_dir: tmp.path().join("n"),
                ca_address: format!("https://{addr}"),
                ca_fingerprint: fp["ca_fingerprint"].as_str().expect("fp").into(),
                join_token: Some(text(&token.stdout).trim().to_owned()),
            },
        ))
        .expect("join");
    // an open trust-bundle stream: an in-flight call the CA's graceful stop waits for
    let _stream = runtime.block_on(async {
        let mut client = node.ca_client().await.expect("client");
        let mut stream = client
            .trust_bundle(meshgate_proto::ca::v1::TrustBundleRequest {})
            .await
            .expect("stream")
            .into_inner();
        stream
            .message()
            .await
            .expect("first bundle")
            .expect("bundle");
        stream
    });
    let kill = |sig: &str| {
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("kill")
    };
    kill("-INT");
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("stopping line");
        if line.contains("press Ctrl-C again") {
            break;
        }
    }
    let second = Instant::now();
    kill("-INT");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            second.elapsed() < Duration::from_secs(4),
            "the second Ctrl-C did not exit at once"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    drop(node);
}

/// `meshgate` with `args`; exit code, stdout parsed as JSON (Null when it is not JSON), and
/// stdout and stderr as text.
fn json_of(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = meshgate(args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code(),
        v,
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// The layer `why -o json` says the request stops at, and its status.
fn stopped_at(v: &serde_json::Value) -> (String, u64) {
    (
        v["stopped_at"]["layer"].as_str().unwrap_or("-").to_owned(),
        v["stopped_at"]["status"].as_u64().unwrap_or(0),
    )
}

#[test]
fn status_top_authz_and_why_print_the_live_mesh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dev, printed, base) = start_dev(&tmp.path().join("dev"));
    let gw_admin = format!("127.0.0.1:{}", base + 200);
    let node_a = format!("127.0.0.1:{}", base);
    let node_b = format!("127.0.0.1:{}", base + 100);
    let gw = format!("127.0.0.1:{}", base + 80);
    let web_upstream = format!("127.0.0.1:{}", base + 91);
    let after = |marker: &str| {
        printed
            .iter()
            .find_map(|l| {
                l.split_once(marker).map(|(_, r)| {
                    r.split(['\'', ' ', ')'])
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
            })
            .unwrap_or_else(|| panic!("dev printed no {marker}: {printed:#?}"))
    };
    let token = after("Authorization: Bearer ");
    let key = after("(demo key ");
    assert!(
        token.len() > 100 && key.starts_with("mgk_demo_"),
        "{token} {key}"
    );
    for _ in 0..5 {
        assert_eq!(http_get(&gw, "/api/users/7").0, 200);
    }

    // status: the gateway's node, listeners, identities, peers, discovery and config state
    let (code, s, all) = json_of(&["status", "--admin", &gw_admin, "-o", "json"]);
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(
        (s["kind"].as_str(), s["node"].as_str()),
        (Some("gateway"), Some("gateway")),
        "{s:#}"
    );
    let listeners = s["listeners"].as_array().expect("listeners");
    assert!(
        listeners
            .iter()
            .any(|l| l["name"] == "http" && l["address"] == gw.as_str()),
        "{s:#}"
    );
    assert!(
        s["certs"].as_array().expect("certs").iter().any(|c| {
            c["spiffe_id"]
                .as_str()
                .is_some_and(|id| id.ends_with("/svc/gateway"))
                && c["time_left_seconds"].as_u64().is_some_and(|t| t > 3600)
        }),
        "{s:#}"
    );
    let peers = s["peers"].as_array().expect("peers");
    assert!(
        peers.iter().any(|p| p["direction"] == "outbound"
            && p["address"] == format!("127.0.0.1:{}", base + 8).as_str()
            && p["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/node/node-a"))
            && p["transport"]
                .as_str()
                .is_some_and(|t| t.contains("TLSv1.3"))),
        "{s:#}"
    );
    let users = s["discovery"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["service"] == "users"))
        .expect("users in discovery");
    assert_eq!(
        (users["healthy"].as_u64(), users["stale"].as_bool()),
        (Some(1), Some(false)),
        "{users}"
    );
    assert_eq!(s["config"]["generation"], 1, "{s:#}");
    let (code, _, table) = json_of(&["status", "--admin", &node_a]);
    assert_eq!(code, Some(0), "{table}");
    assert!(
        table.starts_with(&format!("agent node-a at {node_a}")),
        "{table}"
    );
    assert!(
        table.contains("inbound") && table.contains("/svc/gateway"),
        "{table}"
    );

    // top: traffic during its sampling interval shows up as rate and latency of its route
    let sender = {
        let gw = gw.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_millis(2500);
            let mut sent = 0u32;
            while Instant::now() < until && sent < 400 {
                let _ = http_get(&gw, "/api/users/7");
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (code, t, all) = json_of(&[
        "top",
        "--once",
        "--interval",
        "1s",
        "--admin",
        &gw_admin,
        "-o",
        "json",
    ]);
    sender.join().expect("sender");
    assert_eq!(code, Some(0), "{all}");
    let route = t["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "users"))
        .unwrap_or_else(|| panic!("no users route in {t:#}"));
    assert!(
        route["requests"].as_f64().is_some_and(|n| n >= 5.0),
        "{route}"
    );
    assert!(route["rps"].as_f64().is_some_and(|r| r > 2.0), "{route}");
    assert!(
        route["p50_seconds"]
            .as_f64()
            .is_some_and(|p| p > 0.0 && p < 5.0),
        "{route}"
    );
    assert_eq!(route["errors"].as_f64(), Some(0.0), "{route}");
    assert!(
        t["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "users")),
        "{t:#}"
    );

    // authz check: the deciding rule of node-a's live intentions
    let (code, _, out) = json_of(&[
        "authz", "check", "--from", "web", "--to", "users", "--method", "DELETE", "--path",
        "/admin/x", "--admin", &node_a,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("DENY") && out.contains("rule #2"), "{out}");
    assert!(out.contains("change authz.rules"), "{out}");
    let (code, _, out) = json_of(&[
        "authz", "check", "--from", "web", "--to", "users", "--admin", &node_a,
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ALLOW") && out.contains("rule #1"), "{out}");

    // why: the stopping layer of an unauthenticated, a rate-limited, a denied and an allowed
    // request; peeking at a rate limit does not spend it
    let me = format!("GET http://{gw}/api/me/7");
    let (code, v, out) = json_of(&["why", &me, "--admin", &gw_admin, "-o", "json"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(stopped_at(&v), ("authentication".into(), 401), "{v:#}");
    let (code, v, out) = json_of(&[
        "why",
        &me,
        "--token",
        &token,
        "--admin",
        &gw_admin,
        "--agent-admin",
        &node_b,
        "--agent-admin",
        &node_a,
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(v["verdict"], "allowed", "{v:#}");
    let layers: Vec<(&str, &str)> = v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["layer"].as_str().unwrap_or("-"),
                l["result"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        layers,
        [
            ("path", "pass"),
            ("route", "pass"),
            ("authentication", "pass"),
            ("authorization", "pass"),
            ("rate-limit", "skip"),
            ("backend", "pass"),
            ("endpoint users", "pass"),
            ("intention users", "pass"),
        ],
        "{v:#}"
    );
    assert!(
        v["layers"][7]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rule #0")),
        "{v:#}"
    );
    assert!(!out.contains(&token), "the token was printed: {out}");
    // the same from a file (kept out of shell history)
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    let (code, v, out) = json_of(&[
        "why",
        &me,
        "--token-file",
        token_file.to_str().expect("utf-8"),
        "--admin",
        &gw_admin,
        "-o",
        "json",
    ]);
    // without --agent-admin the destination's intention is not checked, and it says so
    assert_eq!(
        (code, &v["verdict"]),
        (Some(0), &serde_json::json!("allowed-unchecked")),
        "{out}"
    );
    let (code, v, out) = json_of(&[
        "why",
        &format!("GET http://{gw}/api/partner/7"),
        "--api-key",
        &key,
        "--admin",
        &gw_admin,
        "-o",
        "json",
    ]);
    assert_eq!(
        (code, v["layers"][2]["detail"].as_str()),
        (Some(0), Some("consumer demo-partner, groups partners")),
        "{out}"
    );
    assert!(!out.contains(&key), "the key was printed: {out}");
    let limited = format!("GET http://{gw}/api/limited/7");
    for _ in 0..2 {
        let (code, v, out) = json_of(&["why", &limited, "--admin", &gw_admin, "-o", "json"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            v["layers"][2]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("3 left now, this one included (3 per 1m")),
            "{v:#}"
        );
    }
    for want in [200, 200, 200, 429] {
        assert_eq!(http_get(&gw, "/api/limited/7").0, want);
    }
    let (code, v, out) = json_of(&["why", &limited, "--admin", &gw_admin, "-o", "json"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(stopped_at(&v), ("rate-limit".into(), 429), "{v:#}");
    let (code, v, out) = json_of(&[
        "why",
        &format!("DELETE http://{web_upstream}/admin/x"),
        "--from",
        "web",
        "--admin",
        &node_b,
        "--agent-admin",
        &node_a,
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(stopped_at(&v), ("intention".into(), 403), "{v:#}");
    assert!(
        v["stopped_at"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rule #2")),
        "{v:#}"
    );
    // odd spellings are decided as the agent decides them: normalized first, or refused
    let (code, v, out) = json_of(&[
        "why",
        &format!("DELETE http://{web_upstream}/foo/../admin/x"),
        "--from",
        "web",
        "--admin",
        &node_b,
        "--agent-admin",
        &node_a,
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(stopped_at(&v), ("intention".into(), 403), "{v:#}");
    let (code, _, out) = json_of(&[
        "authz",
        "check",
        "--from",
        "web",
        "--to",
        "users",
        "--method",
        "DELETE",
        "--path",
        "/admin%2Fx",
        "--admin",
        &node_a,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("refuses the path"), "{out}");
    assert!(
        out.contains("rejects this path spelling") && !out.contains("change authz.rules"),
        "no rule can allow a refused path, so the hint does not say to change one: {out}"
    );
    // the front's refusals come before any route
    let big = format!("X-Big: {}", "a".repeat(20 * 1024));
    let (code, v, out) = json_of(&[
        "why",
        &format!("GET http://{gw}/api/users/7"),
        "-H",
        &big,
        "--admin",
        &gw_admin,
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(stopped_at(&v), ("front".into(), 431), "{v:#}");
    let (code, v, _) = json_of(&[
        "why",
        &format!("CONNECT http://{gw}/api/users/7"),
        "--admin",
        &gw_admin,
        "-o",
        "json",
    ]);
    assert_eq!(
        (code, stopped_at(&v)),
        (Some(1), ("front".into(), 405)),
        "{v:#}"
    );

    // the admin API takes a POST only for /why, only as JSON, only small
    let send = |method: &str, host: &str, path: &str, ct: &str, body: &str| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&gw_admin).expect("connect");
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .unwrap_or(0)
    };
    let post = |path: &str, ct: &str, body: &str| send("POST", &gw_admin, path, ct, body);
    let good = format!(r#"{{"url": "http://{gw}/api/users/7"}}"#);
    assert_eq!(post("/why", "application/json", &good), 200);
    // a page that rebinds its name to loopback sends that name as Host: refused, GET or POST
    let port = gw_admin.rsplit_once(':').expect("port").1;
    let rebound = format!("attacker.example:{port}");
    assert_eq!(send("GET", &rebound, "/config", "text/plain", ""), 403);
    assert_eq!(send("GET", &rebound, "/status", "text/plain", ""), 403);
    assert_eq!(
        send("POST", &rebound, "/why", "application/json", &good),
        403
    );
    assert_eq!(
        send(
            "GET",
            &format!("localhost:{port}"),
            "/config",
            "text/plain",
            ""
        ),
        200
    );
    assert_eq!(
        post("/why", "text/plain", &good),
        415,
        "a cross-site form post is refused"
    );
    assert_eq!(post("/metrics", "application/json", &good), 405);
    assert_eq!(post("/why", "application/json", "{not json"), 400);
    assert_eq!(post("/why", "application/json", r#"{"url": 7}"#), 400);
    assert_eq!(post("/why", "application/json", &"x".repeat(70_000)), 413);
    // and the table form names the layer in words
    let (code, _, out) = json_of(&["why", &me, "--admin", &gw_admin]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("it would stop at authentication: 401 unauthorized"),
        "{out}"
    );
    stop(dev);
}
