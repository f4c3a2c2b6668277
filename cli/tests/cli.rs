//! The `meshgate` binary as a user runs it: exit codes, output formats, files on disk.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use meshgate_agent::identity::{IdentityConfig, IdentityManager};

fn meshgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("run meshgate")
}

/// Writes a secret the way an operator should: mode 0600.
fn write_secret(path: &Path, contents: &str) {
    std::fs::write(path, contents).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn init_ca(dir: &Path) -> serde_json::Value {
    let out = meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn ca_init_writes_private_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let report = init_ca(&dir);
    let fp = report["ca_fingerprint"].as_str().expect("fingerprint");
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
    for key in ["root.key", "intermediate.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .expect(key)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let again = meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--data-dir",
        dir.to_str().expect("utf8"),
    ]);
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force") && err.contains(fp),
        "{err}"
    );

    let bad = meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "Not A Domain",
        "--data-dir",
        tmp.path().join("x").to_str().expect("utf8"),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("invalid trust domain"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn token_create_prints_json_for_scripts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let report = init_ca(&dir);
    let out = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "--node",
        "node-a",
        "--services",
        "web,prod/users",
        "--ttl",
        "30m",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["ca_fingerprint", "expires_at", "id", "node", "token"]
    );
    assert_eq!(v["ca_fingerprint"], report["ca_fingerprint"]);
    assert_eq!(v["node"], "node-a");
    let token = v["token"].as_str().expect("token");
    // stored hashed: the secret appears in no file of the CA
    for entry in std::fs::read_dir(dir.join("tokens")).expect("tokens dir") {
        let body = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        assert!(!body.contains(token));
        assert!(body.contains("prod/users"));
    }
    let table = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "--node",
        "node-b",
    ]);
    assert!(
        text(&table.stdout).contains("ca fingerprint:  sha256:"),
        "{}",
        text(&table.stdout)
    );

    let missing = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        tmp.path().join("nope").to_str().expect("utf8"),
        "--node",
        "a",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("ca init"),
        "{}",
        text(&missing.stderr)
    );
}

#[test]
fn serve_reports_config_errors_with_line_and_column() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("ca.yaml");
    std::fs::write(
        &cfg,
        "trust_domain: mesh.example\ndata_dir: ./ca\nlisten_on: 1.2.3.4:5\n",
    )
    .expect("write");
    let out = meshgate(&["ca", "serve", "--config", cfg.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:3:", cfg.display())), "{err}");
    assert!(err.contains("listen_on"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_then_join_then_list_certs() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let report = init_ca(&dir);
    let cfg = tmp.path().join("ca.yaml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain: mesh.example\ndata_dir: {}\nlisten: 127.0.0.1:0\nworkload_ttl: 2h\n",
            dir.display()
        ),
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
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
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("CA printed its address");

    let out = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        dir.to_str().expect("utf8"),
        "--node",
        "node-a",
        "--services",
        "web",
        "-o",
        "json",
    ]);
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let node_dir = tmp.path().join("node-a");
    let ids = IdentityManager::start(IdentityConfig {
        trust_domain: "mesh.example".into(),
        node: "node-a".into(),
        data_dir: node_dir.clone(),
        ca_address: format!("https://{addr}"),
        ca_fingerprint: tok["ca_fingerprint"].as_str().expect("fp").into(),
        join_token: Some(tok["token"].as_str().expect("token").into()),
    })
    .await
    .expect("join through the CLI-served CA");
    ids.workload("default", "web").await.expect("web");
    assert_eq!(tok["ca_fingerprint"], report["ca_fingerprint"]);

    let out = meshgate(&[
        "certs",
        "--data-dir",
        node_dir.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let certs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<&str> = certs
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["spiffe_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://mesh.example/node/node-a",
            "spiffe://mesh.example/ns/default/svc/web"
        ]
    );
    let left = certs[1]["time_left_seconds"].as_u64().expect("left");
    assert!(left > 3600 && left <= 7200 + 60, "{left}");
    let table = text(&meshgate(&["certs", "--data-dir", node_dir.to_str().expect("utf8")]).stdout);
    assert!(table.starts_with("SPIFFE ID"), "{table}");
    assert!(
        table.contains("spiffe://mesh.example/ns/default/svc/web"),
        "{table}"
    );

    // SIGTERM: a clean exit
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoints_read_a_running_agent() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    meshgate_ca::store::init(&ca_dir, "mesh.example", false, std::time::SystemTime::now())
        .expect("init");
    let ca = meshgate_ca::server::CaServer::start(
        &meshgate_ca::server::CaConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            workload_ttl: Duration::from_secs(3600),
            node_ttl: Duration::from_secs(3600),
            ..meshgate_ca::server::CaConfig::<meshgate_ca::server::NoCatalog>::new(
                "mesh.example",
                &ca_dir,
            )
        },
        None,
    )
    .await
    .expect("ca");
    let token = meshgate_ca::store::TokenStore::new(&ca_dir)
        .create(
            "node-a",
            None,
            &["web".to_owned()],
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .expect("token");
    write_secret(&tmp.path().join("t"), &token.token);
    let cfg: meshgate_agent::config::AgentConfig = serde_json::from_value(serde_json::json!({
        "node": "node-a",
        "trust_domain": "mesh.example",
        "data_dir": tmp.path().join("node-a"),
        "ca": {"address": format!("https://{}", ca.local_addr()), "fingerprint": ca.fingerprint(), "join_token_file": tmp.path().join("t")},
        "listen": {"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "services": [{"name": "web", "port": 1, "upstreams": [{"service": "users", "listen": "127.0.0.1:0"}]}],
        "discovery": {"static": {"users": ["127.0.0.1:9", "127.0.0.1:10"]}},
    }))
    .expect("config");
    let agent = meshgate_agent::app::Agent::start(cfg).await.expect("agent");
    let admin = agent.admin_addr().to_string();
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            meshgate(&args)
        })
        .await
        .expect("join")
    };
    let out = run(vec![
        "services".into(),
        "--admin".into(),
        admin.clone(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["service"], "users");
    assert_eq!(v[0]["source"], "static");
    assert_eq!(v[0]["state"], "fresh");
    assert_eq!(v[0]["endpoints"], 2);
    let table = text(
        &run(vec!["services".into(), "--admin".into(), admin.clone()])
            .await
            .stdout,
    );
    assert!(
        table.starts_with("SERVICE") && table.contains("users") && table.contains("2/2"),
        "{table}"
    );

    let out = run(vec![
        "endpoints".into(),
        "users".into(),
        "--admin".into(),
        admin.clone(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let addrs: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["address"].as_str().expect("addr"))
        .collect();
    assert_eq!(addrs, ["127.0.0.1:9", "127.0.0.1:10"]);
    assert_eq!(v[0]["health"], "healthy");
    let table = text(
        &run(vec![
            "endpoints".into(),
            "users".into(),
            "--admin".into(),
            admin.clone(),
        ])
        .await
        .stdout,
    );
    assert!(
        table.contains("users: source static, fresh") && table.contains("ADDRESS"),
        "{table}"
    );

    let out = run(vec![
        "endpoints".into(),
        "nope".into(),
        "--admin".into(),
        admin,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not call \"nope\""),
        "{}",
        text(&out.stderr)
    );
    let out = run(vec![
        "services".into(),
        "--admin".into(),
        "127.0.0.1:9".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach an admin API at 127.0.0.1:9"),
        "{}",
        text(&out.stderr)
    );
    agent.shutdown().await;
    ca.shutdown(Duration::from_millis(100)).await;
}

fn example(name: &str) -> String {
    format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn config_validate_and_schema_cover_every_kind() {
    for (file, kind) in [
        ("agent.yaml", "agent"),
        ("gateway.yaml", "gateway"),
        ("ca.yaml", "CA"),
    ] {
        // the production examples name files of their target hosts (TLS keys in /etc/meshgate)
        let out = meshgate(&["config", "validate", "--skip-files", &example(file)]);
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("valid {kind} config")),
            "{}",
            text(&out.stdout)
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("gateway.yaml");
    let mut body = std::fs::read_to_string(example("gateway.yaml")).expect("example");
    body = body.replace(
        "    match: { hosts: [api.example], path: { prefix: /v1/orders } }",
        "    match: { hosts: [api.example], paht: { prefix: /v1/orders } }",
    );
    std::fs::write(&bad, body).expect("write");
    let out = meshgate(&["config", "validate", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}:", bad.display())) && err.contains("paht"),
        "{err}"
    );
    let at = format!("{}:", bad.display());
    let line = err
        .split_once(&at)
        .and_then(|(_, rest)| rest.split(':').next())
        .and_then(|l| l.trim().parse::<usize>().ok());
    let typo_line = std::fs::read_to_string(&bad)
        .expect("read")
        .lines()
        .position(|l| l.contains("paht"))
        .map(|i| i + 1);
    assert_eq!(
        line, typo_line,
        "file:line:column points at the typo: {err}"
    );
    // a semantic error: a split without weights
    let sem = tmp.path().join("sem.yaml");
    let body = std::fs::read_to_string(example("gateway.yaml"))
        .expect("example")
        .replace("weight: 90", "weight: 0")
        .replace("weight: 10", "weight: 0");
    std::fs::write(&sem, body).expect("write");
    let out = meshgate(&[
        "config",
        "validate",
        sem.to_str().expect("utf8"),
        "--kind",
        "gateway",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("routes[1] (users)"),
        "{}",
        text(&out.stderr)
    );

    for kind in ["agent", "gateway", "ca"] {
        let out = meshgate(&["config", "schema", "--kind", kind]);
        assert!(out.status.success());
        let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json schema");
        assert!(schema["properties"].is_object(), "{kind}");
    }
    let out = meshgate(&["config", "schema", "--kind", "gateway"]);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(schema["properties"]["routes"].is_object());
}

#[test]
fn routes_match_names_the_route_and_why_others_lost() {
    let gw = example("gateway.yaml");
    let out = meshgate(&["routes", "--config", &gw]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.starts_with("#") && table.contains("users-v2") && table.contains("users=90"),
        "{table}"
    );
    let out = meshgate(&[
        "routes",
        "--config",
        &gw,
        "--match",
        "GET https://api.example/users/7",
        "-H",
        "Accept-Version: 2",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["chosen"], "users-v2");
    let out = meshgate(&[
        "routes",
        "--config",
        &gw,
        "--match",
        "GET https://api.example/users/7",
    ]);
    let t = text(&out.stdout);
    assert!(
        t.contains("-> route users") && t.contains("Accept-Version"),
        "{t}"
    );
    let out = meshgate(&[
        "routes",
        "--config",
        &gw,
        "--match",
        "DELETE https://other.example/x",
    ]);
    assert!(
        text(&out.stdout).contains("no route (404)"),
        "{}",
        text(&out.stdout)
    );
}

/// GET through a plain HTTP/1.1 connection: (status, body).
async fn http_get(addr: &str, host: &str, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("req");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_binary_reloads_on_file_change_and_sighup_and_refuses_invalid_files() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    meshgate_ca::store::init(&ca_dir, "mesh.example", false, std::time::SystemTime::now())
        .expect("init");
    let ca = meshgate_ca::server::CaServer::start(
        &meshgate_ca::server::CaConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            workload_ttl: Duration::from_secs(3600),
            node_ttl: Duration::from_secs(3600),
            ..meshgate_ca::server::CaConfig::<meshgate_ca::server::NoCatalog>::new(
                "mesh.example",
                &ca_dir,
            )
        },
        None,
    )
    .await
    .expect("ca");
    let token = meshgate_ca::store::TokenStore::new(&ca_dir)
        .create(
            "gw",
            None,
            &["gateway".to_owned()],
            Duration::from_secs(600),
            std::time::SystemTime::now(),
        )
        .expect("token");
    write_secret(&tmp.path().join("gw.token"), &token.token);
    let cfg_path = tmp.path().join("gateway.yaml");
    let write_cfg = |route_path: &str| {
        let yaml = format!(
            "node: gw\ntrust_domain: mesh.example\ndata_dir: {data}\n\
             ca: {{ address: \"https://{ca}\", fingerprint: \"{fp}\", join_token_file: {tok} }}\n\
             listen: {{ http: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             routes:\n  - {{ name: r, match: {{ path: {{ prefix: {route_path} }} }}, backend: {{ service: users }} }}\n\
             discovery: {{ static: {{ users: [\"127.0.0.1:9\"] }} }}\n",
            data = tmp.path().join("gw").display(),
            ca = ca.local_addr(),
            fp = ca.fingerprint(),
            tok = tmp.path().join("gw.token").display(),
        );
        std::fs::write(&cfg_path, yaml).expect("write config");
    };
    write_cfg("/one");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args([
            "--log-format",
            "json",
            "gateway",
            "--config",
            cfg_path.to_str().expect("utf8"),
            "--watch-interval",
            "200ms",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway");
    let stderr = child.stderr.take().expect("stderr");
    // a failing assertion must not leave the gateway running (it holds the test's pipes)
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
    let _guard = KillOnDrop(child.id());
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let wait_for = |msg: &str| -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("gateway never logged {msg:?}"));
            if v["fields"]["message"] == msg {
                return v;
            }
        }
    };
    let ready = wait_for("gateway ready");
    let http = ready["fields"]["http"]
        .as_str()
        .expect("http")
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_owned();
    // the route answers (502: its only endpoint refuses connections, but it matched) and
    // others are 404
    assert_eq!(http_get(&http, "a", "/one/x").await.0, 502);
    assert_eq!(http_get(&http, "a", "/two/x").await.0, 404);

    // a file change is picked up
    write_cfg("/two");
    wait_for("config reloaded");
    assert_eq!(http_get(&http, "a", "/two/x").await.0, 502);
    assert_eq!(http_get(&http, "a", "/one/x").await.0, 404);

    // an invalid file is refused and the old routes keep serving
    std::fs::write(&cfg_path, "node: gw\nroutes: [ {name: broken} ]\n").expect("write");
    let rejected = wait_for("config rejected; the previous config keeps serving");
    assert!(
        rejected["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("gateway.yaml")),
        "{rejected}"
    );
    assert_eq!(http_get(&http, "a", "/two/x").await.0, 502);
    // `meshgate status` names the generation in use and why the last reload was refused
    let admin = ready["fields"]["admin"].as_str().expect("admin").to_owned();
    let status = || {
        let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["status", "--admin", &admin, "-o", "json"])
            .output()
            .expect("status");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status json")
    };
    let s = status();
    assert_eq!(s["config"]["generation"], 2, "{s:#}");
    assert_eq!(s["config"]["last_reload"]["result"], "invalid", "{s:#}");
    assert!(
        s["config"]["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("gateway.yaml")),
        "{s:#}"
    );

    // SIGHUP reloads too
    write_cfg("/three");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    wait_for("config reloaded");
    assert_eq!(http_get(&http, "a", "/three/x").await.0, 502);
    let s = status();
    assert_eq!(
        (
            &s["config"]["generation"],
            &s["config"]["last_reload"]["result"]
        ),
        (&serde_json::json!(3), &serde_json::json!("ok")),
        "{s:#}"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    ca.shutdown(Duration::from_millis(100)).await;
}

#[test]
fn apikey_hash_prints_the_stored_form() {
    let out = meshgate(&["apikey", "hash", "abc"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["apikey", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"abc\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        text(&out.stdout).trim(),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn auth_explain_names_the_failing_check_without_printing_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let p = key.public_key_raw().to_vec();
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1", "x": data_encoding::BASE64URL_NOPAD.encode(&p[1..33]), "y": data_encoding::BASE64URL_NOPAD.encode(&p[33..])});
    let cfg = tmp.path().join("gw.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node: gw\ntrust_domain: mesh.example\ndata_dir: ./gw\nca: {{ address: https://127.0.0.1:1, fingerprint: \"sha256:00\" }}\n\
             listen: {{ http: 127.0.0.1:0 }}\n\
             auth:\n  jwt:\n    - {{ name: main, issuer: https://iss, audiences: [api], algorithms: [ES256], jwks: {{ keys: [{jwk}] }} }}\n\
             routes:\n  - {{ name: me, auth: {{ jwt: [main] }}, backend: {{ service: users }} }}\n"
        ),
    )
    .expect("write");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let sign = |exp: u64, aud: &str| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"iss": "https://iss", "aud": aud, "sub": "alice", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("key"),
        )
        .expect("sign")
    };
    let good = sign(now + 600, "api");
    let out = meshgate(&[
        "auth",
        "explain",
        "--config",
        cfg.to_str().expect("utf8"),
        "--route",
        "me",
        "--token",
        &good,
    ]);
    let text_out = text(&out.stdout);
    assert!(out.status.success(), "{text_out}{}", text(&out.stderr));
    assert!(
        text_out.contains("VALID") && text_out.contains("signature"),
        "{text_out}"
    );
    assert!(!text_out.contains(&good), "the token is never printed");
    let expired = sign(now - 600, "other");
    let out = meshgate(&[
        "auth",
        "explain",
        "--config",
        cfg.to_str().expect("utf8"),
        "--route",
        "me",
        "--token",
        &expired,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out.stdout);
    let failing: Vec<&str> = t.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(
        failing.iter().any(|l| l.trim_start().starts_with("exp"))
            && failing.iter().any(|l| l.trim_start().starts_with("aud")),
        "{t}"
    );
    assert!(t.contains("INVALID") && !t.contains(&expired), "{t}");
}

#[test]
fn ca_commands_bind_namespaces_rotate_in_stages_and_revoke_nodes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let fp = init_ca(&dir)["ca_fingerprint"]
        .as_str()
        .expect("fp")
        .to_owned();
    let d = dir.to_str().expect("utf8");
    let ok = |args: &[&str]| {
        let out = meshgate(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let fails = |args: &[&str]| {
        let out = meshgate(args);
        assert!(
            !out.status.success(),
            "{args:?} succeeded: {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    };

    // a node has one namespace, fixed by its token
    let token = ok(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        d,
        "--node",
        "node-a",
        "--namespace",
        "prod",
        "--services",
        "web,prod/api",
    ]);
    assert!(token.contains("namespace:       prod"), "{token}");
    assert!(token.contains("prod/web, prod/api"), "{token}");
    let err = fails(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        d,
        "--node",
        "node-b",
        "--services",
        "prod/web,dev/api",
    ]);
    assert!(err.contains("exactly one namespace"), "{err}");

    // the intermediate rotates under the same root
    let int: serde_json::Value = serde_json::from_str(&ok(&[
        "ca",
        "intermediate",
        "rotate",
        "--data-dir",
        d,
        "--ttl",
        "90d",
        "-o",
        "json",
    ]))
    .expect("json");
    assert!(
        dir.join(format!(
            "intermediates/{}.crt",
            int["replaced"].as_str().expect("replaced")
        ))
        .exists()
    );
    assert_eq!(ok(&["ca", "fingerprint", "--data-dir", d]).trim(), fp);
    let status = ok(&["ca", "rotate", "status", "--data-dir", d]);
    assert!(status.contains("root rotation: idle"), "{status}");
    assert!(status.contains("signing intermediate expires"), "{status}");

    // root rotation: plan changes nothing; start; refusals while in progress; abort
    let plan = ok(&["ca", "rotate", "plan", "--data-dir", d]);
    assert!(
        plan.contains("1. add-root") && plan.contains("3. retire"),
        "{plan}"
    );
    assert!(!dir.join("rotation").exists(), "plan changed nothing");
    let started = ok(&["ca", "rotate", "start", "--data-dir", d]);
    assert!(started.contains("stage add-root"), "{started}");
    let err = fails(&["ca", "rotate", "start", "--data-dir", d]);
    assert!(err.contains("already in progress"), "{err}");
    let err = fails(&["ca", "intermediate", "rotate", "--data-dir", d]);
    assert!(err.contains("root rotation is in progress"), "{err}");
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        "ca",
        "rotate",
        "status",
        "--data-dir",
        d,
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(status["stage"], "add-root");
    assert_eq!(status["can_finish"], false);
    // no node joined yet, so stage 1 waits for nothing but the CA's own look
    let err = fails(&["ca", "rotate", "finish", "--data-dir", d]);
    assert!(err.contains("cannot be retired yet"), "{err}");
    assert_eq!(
        ok(&["ca", "fingerprint", "--data-dir", d]).trim(),
        fp,
        "new joins pin the old root until stage 2"
    );
    let aborted = ok(&["ca", "rotate", "abort", "--data-dir", d]);
    assert!(aborted.contains("aborted"), "{aborted}");
    let err = fails(&["ca", "rotate", "abort", "--data-dir", d]);
    assert!(err.contains("no root rotation is in progress"), "{err}");

    // revocation: listed, refuses new tokens until the node is removed
    meshgate_ca::store::NodeRegistry::new(&dir)
        .register(
            "node-c",
            "default",
            &["default/batch".into()],
            std::time::SystemTime::now(),
        )
        .expect("register");
    let revoked = ok(&["ca", "node", "revoke", "--data-dir", d, "node-c"]);
    assert!(revoked.contains("revoked node node-c"), "{revoked}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["ca", "node", "list", "--data-dir", d, "-o", "json"]))
            .expect("json");
    assert_eq!(list[0]["node"], "node-c");
    assert_eq!(list[0]["state"], "revoked");
    assert_eq!(list[0]["namespace"], "default");
    let table = ok(&["ca", "node", "list", "--data-dir", d]);
    assert!(
        table.contains("NAMESPACE") && table.contains("revoked"),
        "{table}"
    );
    let err = fails(&["ca", "token", "create", "--data-dir", d, "--node", "node-c"]);
    assert!(
        err.contains("was revoked") && err.contains("ca node remove node-c"),
        "{err}"
    );
    let removed = ok(&["ca", "node", "remove", "--data-dir", d, "node-c"]);
    assert!(removed.contains("may join again"), "{removed}");
    ok(&["ca", "token", "create", "--data-dir", d, "--node", "node-c"]);
}
