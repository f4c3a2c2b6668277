//! The binary as it is deployed: systemd notification (`READY=1`, `RELOADING=1`, `STOPPING=1`
//! over path and abstract sockets), the health listener and the drain delay, `meshgate check`
//! against a healthy and a broken deployment, and `meshgate dev` against a Consul HTTP API (the
//! test stand-in) and a real Redis.

#[path = "../../tests/tests/e2e/consul_standin.rs"]
#[allow(dead_code)]
mod consul_standin;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};

const MESHGATE: &str = env!("CARGO_BIN_EXE_meshgate");

/// Written past the test harness's capture, so a skip reason is always shown.
fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run {test}, but: {reason}"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

fn meshgate(args: &[&str]) -> std::process::Output {
    Command::new(MESHGATE)
        .args(args)
        .output()
        .expect("run meshgate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `meshgate` process whose JSON log lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    logs: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(MESHGATE);
        cmd.args(["--log-format", "json"]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            logs,
            seen: Vec::new(),
        }
    }

    /// The first log line (from the start) whose message is `msg`.
    fn wait_log(&mut self, msg: &str) -> Value {
        if let Some(v) = self.seen.iter().find(|v| v["fields"]["message"] == msg) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("never logged {msg:?}; logged: {:#?}", self.seen));
            self.seen.push(v.clone());
            if v["fields"]["message"] == msg {
                return v;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    /// Waits up to `limit` for the process to exit; its status.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A notification socket as systemd holds it.
struct NotifySocket {
    sock: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn path(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        Self {
            sock,
            name: path.display().to_string(),
        }
    }

    fn abstract_name() -> Self {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!(
            "meshgate-deploy-test-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_nanos()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract name");
        Self {
            sock: UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket"),
            name: format!("@{name}"),
        }
    }

    /// The next datagram; panics if none arrives in 30s.
    fn next(&self) -> String {
        self.sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification within 30s");
        text(&buf[..n])
    }

    fn expect(&self, first_line: &str) -> String {
        let msg = self.next();
        assert!(
            msg.lines().next() == Some(first_line),
            "expected {first_line}, got {msg:?}"
        );
        msg
    }
}

fn status_field(msg: &str) -> &str {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("STATUS=")
}

/// A plain HTTP/1.1 GET: (status, body), or the connection error.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {raw:?}"))?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_owned()))
}

fn init_ca(dir: &Path) -> String {
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
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    v["ca_fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned()
}

fn token(ca_dir: &Path, node: &str, services: &str, file: &Path) {
    let out = meshgate(&[
        "ca",
        "token",
        "create",
        "--data-dir",
        ca_dir.to_str().expect("utf8"),
        "--node",
        node,
        "--services",
        services,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    std::fs::write(file, v["token"].as_str().expect("token")).expect("token file");
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[test]
fn ca_and_agent_tell_systemd_when_they_are_ready_reload_and_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let fp = init_ca(&ca_dir);
    let ca_yaml = tmp.path().join("ca.yaml");
    std::fs::write(
        &ca_yaml,
        format!(
            "trust_domain: mesh.example\ndata_dir: {}\nlisten: 127.0.0.1:0\n",
            ca_dir.display()
        ),
    )
    .expect("ca.yaml");

    // the CA notifies an abstract socket (systemd's own is a path; containers often use '@')
    let ca_notify = NotifySocket::abstract_name();
    let mut ca = Proc::spawn(
        &["ca", "serve", "--config", ca_yaml.to_str().expect("utf8")],
        &[("NOTIFY_SOCKET", &ca_notify.name)],
    );
    let ready = ca_notify.expect("READY=1");
    let ca_addr = status_field(&ready)
        .strip_prefix("serving on ")
        .expect("status names the address")
        .to_owned();
    ca.signal("HUP");
    let reloading = ca_notify.expect("RELOADING=1");
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading:?}");
    ca_notify.expect("READY=1");

    // the agent notifies a path socket and answers health checks off loopback-only admin
    let node_token = tmp.path().join("node-a.token");
    token(&ca_dir, "node-a", "web", &node_token);
    let agent_yaml = tmp.path().join("agent.yaml");
    std::fs::write(
        &agent_yaml,
        format!(
            "node: set-by-the-node-flag\ntrust_domain: mesh.example\ndata_dir: {data}\n\
             ca: {{ address: \"https://{ca_addr}\", fingerprint: \"{fp}\", join_token_file: {tok} }}\n\
             listen: {{ inbound: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             services: [ {{ name: web, port: 1 }} ]\n",
            data = tmp.path().join("node-a").display(),
            tok = node_token.display(),
        ),
    )
    .expect("agent.yaml");
    let agent_notify = NotifySocket::path(tmp.path());
    let mut agent = Proc::spawn(
        &[
            "agent",
            "--config",
            agent_yaml.to_str().expect("utf8"),
            "--health-listen",
            "127.0.0.1:0",
            // one config for every node: the name comes from the command line
            "--node",
            "node-a",
        ],
        &[("NOTIFY_SOCKET", &agent_notify.name)],
    );
    let ready = agent_notify.expect("READY=1");
    assert!(
        status_field(&ready).starts_with("serving; inbound 127.0.0.1:"),
        "{ready:?}"
    );
    let health = agent.wait_log("health listener: GET /healthz and /readyz")["fields"]["addr"]
        .as_str()
        .expect("addr")
        .to_owned();
    assert_eq!(
        http_get(&health, "/readyz"),
        Ok((200, "ready\n".to_owned()))
    );
    assert_eq!(http_get(&health, "/healthz"), Ok((200, "ok\n".to_owned())));
    // nothing else of the admin API is exposed there
    for path in ["/config", "/certs", "/endpoints", "/metrics"] {
        assert_eq!(http_get(&health, path).map(|r| r.0), Ok(404), "{path}");
    }

    // it joined as the node named on the command line
    let certs = meshgate(&[
        "certs",
        "--data-dir",
        tmp.path().join("node-a").to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    let certs: Value = serde_json::from_slice(&certs.stdout).expect("json");
    assert_eq!(certs[0]["spiffe_id"], "spiffe://mesh.example/node/node-a");

    agent.signal("TERM");
    agent_notify.expect("STOPPING=1");
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    ca.signal("TERM");
    ca_notify.expect("STOPPING=1");
    assert!(ca.wait_exit(Duration::from_secs(30)).success());
}

/// An in-process CA for tests that only need one to be there.
async fn test_ca(dir: &Path, ttl: Duration) -> meshgate_ca::server::CaServer {
    meshgate_ca::store::init(dir, "mesh.example", false, SystemTime::now()).expect("init");
    let config: meshgate_ca::server::CaConfig = meshgate_ca::server::CaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        workload_ttl: ttl,
        node_ttl: ttl,
        expired_renewal_grace: Duration::ZERO,
        ..meshgate_ca::server::CaConfig::new("mesh.example", dir)
    };
    meshgate_ca::server::CaServer::start(&config, None)
        .await
        .expect("ca")
}

fn ca_token(ca_dir: &Path, node: &str, services: &[&str], file: &Path) {
    let t = meshgate_ca::store::TokenStore::new(ca_dir)
        .create(
            node,
            None,
            &services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .expect("token");
    meshgate_ca::pki::write_atomic(file, t.token.as_bytes(), 0o600).expect("token file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reports_not_ready_first_then_drains_after_the_delay() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let ca = test_ca(&ca_dir, Duration::from_secs(3600)).await;
    let tok = tmp.path().join("gw.token");
    ca_token(&ca_dir, "gw", &["gateway"], &tok);
    let cfg = tmp.path().join("gateway.yaml");
    std::fs::write(
        &cfg,
        format!(
            "node: gw\ntrust_domain: mesh.example\ndata_dir: {data}\n\
             ca: {{ address: \"https://{ca}\", fingerprint: \"{fp}\", join_token_file: {tok} }}\n\
             listen: {{ http: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             routes:\n  - {{ name: r, match: {{ path: {{ prefix: /r }} }}, backend: {{ service: users }} }}\n\
             discovery: {{ static: {{ users: [\"127.0.0.1:9\"] }} }}\n\
             drain_timeout: 5s\n",
            data = tmp.path().join("gw").display(),
            ca = ca.local_addr(),
            fp = ca.fingerprint(),
            tok = tok.display(),
        ),
    )
    .expect("gateway.yaml");
    let dir = tmp.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let notify = NotifySocket::path(&dir);
        let mut gw = Proc::spawn(
            &[
                "gateway",
                "--config",
                cfg.to_str().expect("utf8"),
                "--health-listen",
                "127.0.0.1:0",
                "--drain-delay",
                "2s",
                "--watch-interval",
                "0s",
            ],
            &[("NOTIFY_SOCKET", &notify.name)],
        );
        let ready = notify.expect("READY=1");
        let public = status_field(&ready)
            .strip_prefix("serving; http ")
            .expect("status names the http listener")
            .to_owned();
        let health = gw.wait_log("health listener: GET /healthz and /readyz")["fields"]["addr"]
            .as_str()
            .expect("addr")
            .to_owned();
        assert_eq!(http_get(&health, "/readyz").map(|r| r.0), Ok(200));
        // the route matches; its only endpoint refuses connections: 502 from the gateway itself
        assert_eq!(http_get(&public, "/r/x").map(|r| r.0), Ok(502));

        gw.signal("HUP");
        let reloading = notify.expect("RELOADING=1");
        assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading:?}");
        notify.expect("READY=1");

        gw.signal("TERM");
        let stop = Instant::now();
        notify.expect("STOPPING=1");
        // not ready at once, while the public listener still serves during the delay
        assert_eq!(
            http_get(&health, "/readyz"),
            Ok((503, "not ready: draining\n".to_owned()))
        );
        let mut served_while_draining = 0;
        while stop.elapsed() < Duration::from_millis(1500) {
            assert_eq!(http_get(&public, "/r/x").map(|r| r.0), Ok(502));
            served_while_draining += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(served_while_draining > 5);
        let st = gw.wait_exit(Duration::from_secs(15));
        let took = stop.elapsed();
        assert!(st.success(), "{st}");
        assert!(
            took >= Duration::from_millis(1900),
            "the delay was honoured: {took:?}"
        );
        // then the listener is closed
        assert!(http_get(&public, "/r/x").is_err());
    })
    .await
    .expect("blocking part");
    ca.shutdown(Duration::from_millis(100)).await;
}

/// `meshgate check ARGS -o json`: (exit code, report).
async fn check(args: Vec<String>) -> (Option<i32>, Value) {
    let out = tokio::task::spawn_blocking(move || {
        let mut a: Vec<&str> = vec!["check", "-o", "json"];
        a.extend(args.iter().map(String::as_str));
        meshgate(&a)
    })
    .await
    .expect("join");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("json: {} {}", text(&out.stdout), text(&out.stderr)));
    (out.status.code(), v)
}

fn findings<'a>(report: &'a Value, check: &str) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["check"] == check)
        .collect()
}

async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_healthy_deployment_and_names_each_problem_of_a_broken_one() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca_dir = tmp.path().join("ca");
    let ca = test_ca(&ca_dir, Duration::from_secs(3600)).await;
    let ca_ref = |node: &str, services: &[&str]| {
        let file = tmp.path().join(format!("{node}.token"));
        ca_token(&ca_dir, node, services, &file);
        json!({"address": format!("https://{}", ca.local_addr()), "fingerprint": ca.fingerprint(), "join_token_file": file})
    };

    // healthy: an agent running users, a gateway routing to it
    let agent: meshgate_agent::config::AgentConfig = serde_json::from_value(json!({
        "node": "node-a", "trust_domain": "mesh.example", "data_dir": tmp.path().join("node-a"),
        "ca": ca_ref("node-a", &["users"]),
        "listen": {"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "services": [{"name": "users", "port": 1, "protocol": "http"}],
        "authz": {"default": "deny", "rules": [{"from": "gateway", "to": "users", "action": "allow"}]},
    }))
    .expect("agent config");
    let agent = meshgate_agent::app::Agent::start(agent)
        .await
        .expect("agent");
    let gw: meshgate_gateway::config::GatewayConfig = serde_json::from_value(json!({
        "node": "gw-1", "trust_domain": "mesh.example", "data_dir": tmp.path().join("gw-1"),
        "ca": ca_ref("gw-1", &["gateway"]),
        "listen": {"http": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "routes": [{"name": "users", "match": {"path": {"prefix": "/users"}}, "backend": {"service": "users"}}],
        "discovery": {"static": {"users": [agent.inbound_addr()]}},
    }))
    .expect("gateway config");
    let gw = meshgate_gateway::app::GatewayApp::start(gw)
        .await
        .expect("gateway");
    let admins = format!("{},{}", agent.admin_addr(), gw.admin_addr());
    let (code, report) = check(vec!["--admin".into(), admins.clone()]).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    for name in [
        "admin api",
        "ready",
        "certificates",
        "discovery",
        "routes",
        "key files",
        "ca",
        "clock skew",
    ] {
        let f = findings(&report, name);
        assert!(!f.is_empty(), "no {name} check: {report:#}");
        assert!(f.iter().all(|c| c["status"] == "ok"), "{name}: {report:#}");
    }
    // the table says so too
    let table = tokio::task::spawn_blocking({
        let admins = admins.clone();
        move || meshgate(&["check", "--admin", &admins])
    })
    .await
    .expect("join");
    assert!(table.status.success());
    let table = text(&table.stdout);
    assert!(
        table.starts_with("RESULT") && table.contains("all checks passed"),
        "{table}"
    );

    // a key readable by others is named, with the command that fixes it
    let key = tmp.path().join("node-a/node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, report) = check(vec!["--admin".into(), agent.admin_addr().to_string()]).await;
    assert_eq!(code, Some(1));
    let keys = findings(&report, "key files");
    assert!(
        keys.iter().any(|c| c["status"] == "problem"
            && c["detail"]
                .as_str()
                .is_some_and(|d| d.contains("node.key: mode 0644"))
            && c["fix"]
                .as_str()
                .is_some_and(|f| f.starts_with("chmod 600"))),
        "{report:#}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // a wrong pin is named as such
    let (code, report) = check(vec![
        "--ca".into(),
        format!("https://{}", ca.local_addr()),
        "--ca-fingerprint".into(),
        format!("sha256:{}", "ab".repeat(32)),
        "--trust-domain".into(),
        "mesh.example".into(),
        "--ca-data-dir".into(),
        ca_dir.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(1));
    let c = findings(&report, "ca");
    assert!(
        c[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("did not present the pinned root")),
        "{report:#}"
    );
    assert_eq!(findings(&report, "ca key files")[0]["status"], "ok");
    gw.shutdown().await;
    agent.shutdown().await;
    ca.shutdown(Duration::from_millis(100)).await;

    // broken: short-lived certificates, discovery from Consul, then the CA and Consul go away
    let ca2_dir = tmp.path().join("ca2");
    let ca2 = test_ca(&ca2_dir, Duration::from_secs(4)).await;
    let consul = consul_standin::ConsulStandin::start().await;
    let mut users = consul_standin::Instance::new("users", "users-1", 15008);
    users
        .meta
        .insert("meshgate-inbound".into(), "127.0.0.1:9".into());
    consul.add_instance(users);
    let tok = tmp.path().join("node-b.token");
    ca_token(&ca2_dir, "node-b", &["web"], &tok);
    let cfg: meshgate_agent::config::AgentConfig = serde_json::from_value(json!({
        "node": "node-b", "trust_domain": "mesh.example", "data_dir": tmp.path().join("node-b"),
        "ca": {"address": format!("https://{}", ca2.local_addr()), "fingerprint": ca2.fingerprint(), "join_token_file": tok},
        "listen": {"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "services": [{"name": "web", "port": 1, "upstreams": [{"service": "users", "listen": "127.0.0.1:0"}]}],
        "discovery": {"consul": {"address": consul.url(), "wait": "1s"}},
        "registration": {"enabled": false},
    }))
    .expect("agent config");
    let broken = meshgate_agent::app::Agent::start(cfg).await.expect("agent");
    let admin = broken.admin_addr().to_string();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let (code, r) = check(vec!["--admin".into(), admin.clone()]).await;
            code == Some(0) && r["ok"] == true
        })
        .await,
        "the short-lived deployment passes while everything runs"
    );
    ca2.shutdown(Duration::from_millis(100)).await;
    let _ = consul.stop().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (named_all, last) = loop {
        let (code, r) = check(vec!["--admin".into(), admin.clone()]).await;
        let problem = |name: &str, words: &str| {
            findings(&r, name).iter().any(|c| {
                c["status"] == "problem"
                    && c["detail"].as_str().is_some_and(|d| d.contains(words))
                    && c["fix"].as_str().is_some_and(|f| !f.is_empty())
            })
        };
        let all = code == Some(1)
            && problem("ca", "cannot connect")
            && problem("certificates", "expired at")
            && problem("discovery", "users: consul source is stale");
        if all || Instant::now() >= deadline {
            break (all, r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        named_all,
        "check names the CA, the expired certificate and the stale source: {last:#}"
    );
    // the table gives each problem its fix
    let out = tokio::task::spawn_blocking(move || meshgate(&["check", "--admin", &admin]))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(
        table.contains("problems:") && table.matches("    fix: ").count() >= 3,
        "{table}"
    );
    assert!(
        text(&out.stderr).contains("problems found"),
        "{}",
        text(&out.stderr)
    );
    broken.shutdown().await;
}

/// Starts `meshgate dev --port-base B EXTRA…` on a block below the ephemeral range, retried
/// elsewhere when taken; returns the process, its remaining stdout and what it printed.
fn start_dev(
    first_block: u16,
    extra: &[&str],
    mut before_ready: impl FnMut(&str),
) -> (Child, mpsc::Receiver<String>, Vec<String>, u16) {
    let mut attempt = 0u16;
    loop {
        let base = first_block
            + u16::try_from((std::process::id() + u32::from(attempt) * 5) % 6).unwrap_or(0) * 1000;
        let log = std::env::temp_dir().join(format!(
            "meshgate-deploy-dev-{}-{base}.log",
            std::process::id()
        ));
        let mut child = Command::new(MESHGATE)
            .args(["dev", "--port-base", &base.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn meshgate dev");
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
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            before_ready(&std::fs::read_to_string(&log).unwrap_or_default());
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line == "ready" => break true,
                Ok(line) => printed.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => break false,
            }
        };
        if ready {
            return (child, rx, printed, base);
        }
        let _ = child.kill();
        let _ = child.wait();
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        attempt += 1;
        assert!(
            attempt < 3 && err.contains("in use"),
            "meshgate dev did not print 'ready' (base {base}):\n{err}\n{printed:#?}"
        );
    }
}

fn stop_dev(mut child: Child, rx: &mpsc::Receiver<String>) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "dev did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_registers_in_and_discovers_from_a_consul_api() {
    let consul = consul_standin::ConsulStandin::start().await;
    let url = consul.url();
    let (child, rx, printed, base, consul) = tokio::task::spawn_blocking(move || {
        // the stand-in runs no health checks; like a Consul agent whose checks pass, mark
        // each registered instance passing once it is registered
        let mut passed = std::collections::BTreeSet::new();
        let (child, rx, printed, base) = start_dev(20_000, &["--consul", &url], |_| {
            for r in consul.registrations() {
                if let Some(id) = r["ID"].as_str()
                    && passed.insert(id.to_owned())
                {
                    consul.set_check_status(id, "passing");
                }
            }
        });
        (child, rx, printed, base, consul)
    })
    .await
    .expect("join");
    assert!(
        printed
            .iter()
            .any(|l| l.contains("discovery  Consul at http://127.0.0.1:")),
        "{printed:#?}"
    );
    let mut ids: Vec<String> = consul
        .registrations()
        .iter()
        .filter_map(|r| r["ID"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "orders-node-a",
            "users-canary-node-a",
            "users-node-a",
            "web-node-b"
        ]
    );
    let inbound = consul.registrations()[0]["Meta"]["meshgate-inbound"].clone();
    assert!(
        inbound
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{inbound}"
    );
    let gateway = format!("127.0.0.1:{}", base + 80);
    let web = format!("127.0.0.1:{}", base + 91);
    let (rx, consul) = tokio::task::spawn_blocking(move || {
        // through the gateway and east-west, both found in Consul
        let (code, body) = http_get(&gateway, "/api/users/7").expect("gateway");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"id\":\"7\""), "{body}");
        // node-b learns users' endpoint from Consul's blocking query: give it a moment under load
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let east_west = loop {
            let r = http_get(&web, "/users/7").map(|r| r.0);
            if r == Ok(200) || std::time::Instant::now() >= deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(east_west, Ok(200));
        stop_dev(child, &rx);
        (rx, consul)
    })
    .await
    .expect("join");
    drop(rx);
    // a clean stop deregisters what it registered
    let mut gone = consul.deregistrations();
    gone.sort();
    assert_eq!(
        gone,
        [
            "orders-node-a",
            "users-canary-node-a",
            "users-node-a",
            "web-node-b"
        ]
    );
    let _ = consul.stop().await;
}

#[test]
fn dev_keeps_rate_limits_in_redis() {
    let found = Command::new("redis-server").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        skip(
            "dev_keeps_rate_limits_in_redis",
            "redis-server is not installed",
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("redis.sock");
    let password = "s3cret-dev-test";
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--unixsocket",
            sock.to_str().expect("utf8"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            password,
            "--dir",
            tmp.path().to_str().expect("utf8"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis+unix://{}?pass={password}", sock.display());
    let (child, rx, printed, base) = start_dev(26_000, &["--redis", &url], |_| {});
    let banner = printed.join("\n");
    assert!(
        banner.contains("rate limits  Redis at redis+unix://"),
        "{banner}"
    );
    assert!(
        !banner.contains(password),
        "the password is not printed: {banner}"
    );
    let gateway = format!("127.0.0.1:{}", base + 80);
    let codes: Vec<u16> = (0..4)
        .map(|_| http_get(&gateway, "/api/limited/7").expect("gateway").0)
        .collect();
    assert_eq!(codes, [200, 200, 200, 429]);
    // the counters live in Redis, where another gateway would find them
    let keys = Command::new("redis-cli")
        .args([
            "-s",
            sock.to_str().expect("utf8"),
            "--no-auth-warning",
            "-a",
            password,
        ])
        .args(["--scan", "--pattern", "meshgate:rl:*"])
        .output()
        .expect("redis-cli");
    assert!(
        !text(&keys.stdout).trim().is_empty(),
        "no rate-limit keys in Redis"
    );
    stop_dev(child, &rx);
    let _ = redis.kill();
    let _ = redis.wait();
}

#[test]
fn ca_init_if_missing_keeps_an_existing_ca_and_refuses_another_trust_domain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let d = dir.to_str().expect("utf8");
    let init = |td: &str| {
        meshgate(&[
            "ca",
            "init",
            "--trust-domain",
            td,
            "--data-dir",
            d,
            "--if-missing",
            "-o",
            "json",
        ])
    };
    let first = init("mesh.example");
    assert!(first.status.success(), "{}", text(&first.stderr));
    let first: Value = serde_json::from_slice(&first.stdout).expect("json");
    let key = std::fs::read(dir.join("root.key")).expect("root key");
    let again = init("mesh.example");
    assert!(again.status.success(), "{}", text(&again.stderr));
    let again: Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(again["created"], false);
    assert_eq!(again["ca_fingerprint"], first["ca_fingerprint"]);
    assert_eq!(std::fs::read(dir.join("root.key")).expect("root key"), key);
    let other = init("other.example");
    assert_eq!(other.status.code(), Some(1));
    let err = text(&other.stderr);
    assert!(
        err.contains("holds a CA for trust domain mesh.example, not other.example"),
        "{err}"
    );
    // --force and --if-missing contradict each other
    let both = meshgate(&[
        "ca",
        "init",
        "--trust-domain",
        "mesh.example",
        "--data-dir",
        d,
        "--if-missing",
        "--force",
    ]);
    assert_eq!(both.status.code(), Some(2));
}

#[test]
fn every_example_config_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("examples dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("production/kong-migrated-gateway.yaml")),
        "{files:?}"
    );
    for f in &files {
        // the files they name (keys, tokens, certificates) exist only on their target hosts
        let out = meshgate(&[
            "config",
            "validate",
            "--skip-files",
            f.to_str().expect("utf8"),
        ]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            text(&out.stderr)
        );
    }
}
