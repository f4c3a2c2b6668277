//! The HA lab: two gateways behind an L4 load balancer (haproxy) that health-checks each
//! gateway's `/readyz`, three nodes running `users`, a CA, Consul (the stand-in) and Redis, each
//! in its own network namespace (deploy/lab/netns-lab.sh, 198.18.0.0/15), as real processes.
//!
//! Under a bounded load loop it measures and asserts:
//! - a planned stop of one gateway (SIGTERM: /readyz 503 at once, serving on for the drain
//!   delay, then drain) loses no request;
//! - a crash of one gateway (SIGKILL) is taken out of rotation within 2 s: the window and the
//!   requests failed in it are measured and printed;
//! - a node whose link goes down is routed around;
//! - a rate limit kept in Redis holds across both gateways.
//!
//! Readiness across namespaces: the admin API answers on loopback only, by design, so haproxy
//! (in its own namespace) checks each gateway's health listener (`--health-listen`), which
//! answers only `/healthz` and `/readyz` by relaying the admin API's answer.
//!
//! Consul: the stand-in runs in this process (its state is the test's to inspect and to mark
//! registered instances passing, as a Consul agent running the checks would). The lab reaches
//! it at 198.18.0.1:8500 through a relay (haproxy in node 1's namespace) to a Unix socket that
//! this process serves, so no address of the host's own network namespace is touched.
//!
//! Needs root, iproute2, python3, haproxy, redis-server and the `meshgate` binary built next to
//! this test binary (`cargo test --workspace` builds it). CI runs it; elsewhere it is skipped with
//! the reason printed.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::consul_standin::ConsulStandin;

/// Node indexes in the lab (198.18.0.N).
const CTL: usize = 1;
const NODES: [(usize, &str); 3] = [(2, "node-a"), (3, "node-b"), (4, "node-c")];
const GWS: [(usize, &str); 2] = [(5, "gw-1"), (6, "gw-2")];
const LB: usize = 7;
/// The drain delay given to the gateways: longer than haproxy needs to mark one down
/// (inter 200ms x fall 2, plus a check timeout).
const DRAIN_DELAY: &str = "2s";

fn ip(n: usize) -> String {
    format!("198.18.0.{n}")
}

fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/netns-lab.sh")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The newest modification time of any file under `dir`.
fn newest(dir: &Path) -> SystemTime {
    let mut best = UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest(&p)
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH)
            };
            best = best.max(t);
        }
    }
    best
}

/// The `meshgate` binary of this build (`target/<profile>/meshgate`), or why it cannot be used.
fn meshgate_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MESHGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("meshgate"))
        .ok_or("cannot find the target directory")?;
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map_err(|_| {
            format!(
                "{} is not built (cargo build -p meshgate, or cargo test --workspace)",
                bin.display()
            )
        })?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in ["cli/src", "agent/src", "gateway/src", "ca/src"] {
        if newest(&root.join(src)) > built {
            return Err(format!(
                "{} is older than {src}: rebuild it (cargo build -p meshgate)",
                bin.display()
            ));
        }
    }
    Ok(bin)
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root to create network namespaces".into());
    }
    for tool in ["ip", "python3", "haproxy", "redis-server"] {
        if !have(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    meshgate_binary().err()
}

/// Written past the test harness's capture, so it shows in CI logs.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The lab's namespaces and processes; everything is removed on drop, pass or fail.
struct Lab {
    prefix: String,
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Lab {
    fn up(prefix: &str, dir: &Path) -> Self {
        let _ = Command::new(lab_script()).args(["down", prefix]).status();
        let st = Command::new(lab_script())
            .args(["up", prefix, "7"])
            .status()
            .expect("run netns-lab.sh");
        assert!(st.success(), "netns-lab.sh up failed");
        Self {
            prefix: prefix.to_owned(),
            dir: dir.to_owned(),
            children: Vec::new(),
        }
    }

    fn ns(&self, node: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{node}", self.prefix)]);
        c
    }

    /// Starts `args` in `node`'s namespace as `name`, stderr to `DIR/name.log`.
    fn spawn(&mut self, name: &str, node: usize, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file");
        let child = self
            .ns(node)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn in namespace");
        self.children.push((name.to_owned(), child));
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .1
    }

    fn signal(&mut self, name: &str, sig: &str) {
        let pid = self.child(name).id().to_string();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} {name}");
    }

    /// Waits up to `limit` for `name` to exit and forgets it; its exit status.
    fn reap(&mut self, name: &str, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child(name).try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit within {limit:?}; log in {}",
                self.dir.display()
            );
            sleep(Duration::from_millis(20));
        };
        self.children.retain(|(n, _)| n != name);
        status
    }

    /// GET `url` from inside `node` with python3: Ok(body) or Err(why).
    fn get(&self, node: usize, url: &str) -> Result<String, String> {
        let out = self
            .ns(node)
            .args([
                "python3",
                "-c",
                "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())",
                url,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned())
        }
    }

    fn wait_ready(&self, node: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.get(node, "http://127.0.0.1:15000/readyz").is_ok() {
                return;
            }
            sleep(Duration::from_millis(200));
        }
        panic!("{what} never became ready; its logs:\n{}", self.logs());
    }

    /// The last lines of every process log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for p in names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", p.display()));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn link(&self, node: usize, state: &str) {
        let st = Command::new(lab_script())
            .args(["link", &self.prefix, &node.to_string(), state])
            .status()
            .expect("link");
        assert!(st.success(), "link {node} {state}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(lab_script())
            .args(["down", &self.prefix])
            .status();
    }
}

/// One server's line of haproxy's `show stat`.
#[derive(Debug, Clone)]
struct ServerStat {
    status: String,
    sessions_total: u64,
}

/// Asks haproxy's stats socket for `backend`'s servers.
fn haproxy_servers(socket: &Path, backend: &str) -> Vec<(String, ServerStat)> {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"show stat\n").is_err() {
        return Vec::new();
    }
    let mut csv = String::new();
    let _ = s.read_to_string(&mut csv);
    let mut lines = csv.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st), Some(stot)) =
        (col("pxname"), col("svname"), col("status"), col("stot"))
    else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > stot && f[px] == backend && f[sv] != "BACKEND" && f[sv] != "FRONTEND")
        .map(|f| {
            (
                f[sv].to_owned(),
                ServerStat {
                    status: f[st].to_owned(),
                    sessions_total: f[stot].parse().unwrap_or(0),
                },
            )
        })
        .collect()
}

fn server(socket: &Path, backend: &str, name: &str) -> Option<ServerStat> {
    haproxy_servers(socket, backend)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
}

fn wait_status(
    lab: &Lab,
    socket: &Path,
    backend: &str,
    name: &str,
    want: &str,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if server(socket, backend, name).is_some_and(|s| s.status.starts_with(want)) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "haproxy never reported {name} {want} in {backend}: {:?}; logs:\n{}",
            haproxy_servers(socket, backend),
            lab.logs()
        );
        sleep(Duration::from_millis(10));
    }
}

/// The load client: `conc` workers, each sending GETs (a new connection each, as many clients
/// do) for `secs`, at most `max` in all; one line per request: `start end status body`.
const LOAD_PY: &str = r#"
import http.client, sys, threading, time
host, port, path, secs, conc, cap = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
headers = dict(h.split(":", 1) for h in sys.argv[7:])
end = time.monotonic() + secs
lock = threading.Lock()
count = [0]
def worker():
    while time.monotonic() < end:
        with lock:
            if count[0] >= cap:
                return
            count[0] += 1
        t0 = time.time()
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", path, headers=dict(headers, Connection="close"))
            r = c.getresponse()
            status, body = r.status, r.read().decode(errors="replace")
            c.close()
        except Exception as e:
            status, body = 0, type(e).__name__
        t1 = time.time()
        line = "%.6f %.6f %d %s" % (t0, t1, status, body.strip().replace("\n", " ")[:60])
        with lock:
            print(line, flush=True)
threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads: t.start()
for t in threads: t.join()
"#;

/// One request of the load loop.
#[derive(Debug, Clone)]
struct Sample {
    start: f64,
    end: f64,
    status: u16,
    body: String,
}

fn parse_samples(out: &str) -> Vec<Sample> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            Some(Sample {
                start: f.next()?.parse().ok()?,
                end: f.next()?.parse().ok()?,
                status: f.next()?.parse().ok()?,
                body: f.next().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Starts the load client (4 workers) in the balancer's namespace, against `port`.
fn start_load(lab: &Lab, port: u16, path: &str, secs: f64) -> Child {
    let mut c = lab.ns(LB);
    c.args(["python3", "-c", LOAD_PY, &ip(LB), &port.to_string(), path])
        .arg(secs.to_string())
        .args(["4", "20000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c.spawn().expect("load client")
}

fn finish_load(child: Child) -> Vec<Sample> {
    let out = child.wait_with_output().expect("load client output");
    parse_samples(&String::from_utf8_lossy(&out.stdout))
}

fn failed(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.status != 200).collect()
}

/// A gateway's command line.
fn gateway_args(meshgate: &str, dir: &Path, name: &str, node: usize) -> Vec<String> {
    vec![
        meshgate.to_owned(),
        "gateway".into(),
        "--config".into(),
        dir.join(format!("{name}.yaml")).display().to_string(),
        "--health-listen".into(),
        format!("{}:15021", ip(node)),
        "--drain-delay".into(),
        DRAIN_DELAY.into(),
        "--watch-interval".into(),
        "0s".into(),
    ]
}

fn start_gateway(lab: &mut Lab, meshgate: &str, name: &str, node: usize) {
    let args = gateway_args(meshgate, &lab.dir.clone(), name, node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(name, node, &args);
}

/// Serves the Consul stand-in on a Unix socket (the lab's relay connects to it).
fn relay_consul(rt: &tokio::runtime::Runtime, socket: &Path, to: std::net::SocketAddr) {
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(socket).expect("bind the consul relay socket")
    };
    rt.spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut tcp) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                }
            });
        }
    });
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write lab file");
}

#[test]
fn ha_lab_two_gateways_behind_haproxy_survive_stop_crash_and_node_loss() {
    if let Some(reason) = skip_reason() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the HA lab, but: {reason}"
        );
        say(&format!(
            "SKIPPED ha_lab_two_gateways_behind_haproxy_survive_stop_crash_and_node_loss: {reason}"
        ));
        return;
    }
    let meshgate_path = meshgate_binary().expect("checked above");
    let meshgate = meshgate_path.to_str().expect("utf8 path");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let prefix = format!("mh{}", std::process::id() % 100_000);
    let mut lab = Lab::up(&prefix, &dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // node 1: the CA, Redis, and the relay to the Consul stand-in
    let consul = rt.block_on(ConsulStandin::start());
    let consul_sock = dir.join("consul.sock");
    relay_consul(&rt, &consul_sock, consul.addr());
    write(
        &dir.join("relay.cfg"),
        &format!(
            "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
             frontend consul\n  bind {ctl}:8500\n  default_backend standin\n\
             backend standin\n  server standin unix@{sock}\n",
            ctl = ip(CTL),
            sock = consul_sock.display()
        ),
    );
    lab.spawn(
        "consul-relay",
        CTL,
        &[
            "haproxy",
            "-db",
            "-f",
            dir.join("relay.cfg").to_str().expect("utf8"),
        ],
    );
    lab.spawn(
        "redis",
        CTL,
        &[
            "redis-server",
            "--bind",
            &ip(CTL),
            "--port",
            "6379",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().expect("utf8"),
        ],
    );
    let ca_dir = dir.join("ca");
    let out = Command::new(meshgate)
        .args(["ca", "init", "--trust-domain", "mesh.example", "--data-dir"])
        .arg(&ca_dir)
        .args(["-o", "json"])
        .output()
        .expect("ca init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["ca_fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned();
    write(
        &dir.join("ca.yaml"),
        &format!(
            "trust_domain: mesh.example\ndata_dir: {}\nlisten: {}:15012\n",
            ca_dir.display(),
            ip(CTL)
        ),
    );
    lab.spawn(
        "ca",
        CTL,
        &[
            meshgate,
            "ca",
            "serve",
            "--config",
            dir.join("ca.yaml").to_str().expect("utf8"),
        ],
    );
    let token = |node: &str, services: &str| {
        let out = Command::new(meshgate)
            .args(["ca", "token", "create", "--data-dir"])
            .arg(&ca_dir)
            .args(["--node", node, "--services", services, "-o", "json"])
            .output()
            .expect("token create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let path = dir.join(format!("{node}.token"));
        write(&path, v["token"].as_str().expect("token"));
        // a join token is a secret: keep it 0600, as operators should
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token");
        path
    };
    let ca_ref = |node: &str, services: &str| {
        format!(
            "ca: {{ address: \"https://{}:15012\", fingerprint: \"{fp}\", join_token_file: {} }}\n",
            ip(CTL),
            token(node, services).display()
        )
    };
    let consul_url = format!("http://{}:8500", ip(CTL));

    // nodes 2..4: users (python http.server on loopback, answering its node's name) + an agent
    // registering it in Consul
    for (i, node) in NODES {
        let www = dir.join(format!("www-{node}"));
        std::fs::create_dir_all(&www).expect("www");
        write(&www.join("who"), node);
        lab.spawn(
            &format!("{node}-users"),
            i,
            &[
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "127.0.0.1",
                "--directory",
                www.to_str().expect("utf8"),
            ],
        );
        let cfg = dir.join(format!("{node}.yaml"));
        write(
            &cfg,
            &format!(
                "node: {node}\ntrust_domain: mesh.example\ndata_dir: {data}\n{ca}\
                 listen: {{ inbound: {addr}:15008, admin: 127.0.0.1:15000 }}\n\
                 services:\n  - {{ name: users, port: 8080, protocol: http }}\n\
                 authz: {{ default: deny, rules: [ {{ from: gateway, to: users, action: allow }} ] }}\n\
                 discovery: {{ consul: {{ address: \"{consul_url}\", wait: 10s }} }}\n\
                 registration: {{ check_interval: 1s }}\n\
                 tunnel: {{ connect_timeout: 1s, keepalive_interval: 1s, keepalive_timeout: 2s }}\n\
                 drain_timeout: 2s\n",
                data = dir.join(node).display(),
                ca = ca_ref(node, "users"),
                addr = ip(i),
            ),
        );
        lab.spawn(
            node,
            i,
            &[meshgate, "agent", "--config", cfg.to_str().expect("utf8")],
        );
    }
    for (i, node) in NODES {
        lab.wait_ready(i, node);
    }
    // the stand-in runs no checks: mark what the agents registered passing, as Consul would
    let registered = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = consul
            .registrations()
            .iter()
            .filter_map(|r| r["ID"].as_str().map(str::to_owned))
            .collect();
        if ids.len() >= NODES.len() {
            for id in &ids {
                consul.set_check_status(id, "passing");
            }
            break;
        }
        assert!(
            Instant::now() < registered,
            "agents did not register: {ids:?}"
        );
        sleep(Duration::from_millis(50));
    }

    // nodes 5, 6: the gateways; shared rate limit in Redis, endpoints from Consul
    for (i, gw) in GWS {
        write(
            &dir.join(format!("{gw}.yaml")),
            &format!(
                "node: {gw}\ntrust_domain: mesh.example\ndata_dir: {data}\n{ca}\
                 listen: {{ http: \"{addr}:8080\", admin: 127.0.0.1:15000 }}\n\
                 auth:\n  rate_limits:\n    - {{ name: shared, key: {{ header: X-Tenant }}, limit: {{ requests: 20, per: 1h }} }}\n\
                 \x20 rate_limit_store: {{ url: \"redis://{ctl}:6379/0\", fail: closed, timeout: 500ms }}\n\
                 routes:\n\
                 \x20 - {{ name: who, match: {{ path: {{ prefix: /who }} }}, timeout: 3s, retries: {{ attempts: 2, budget_percent: 100 }}, backend: {{ service: users }} }}\n\
                 \x20 - {{ name: limited, match: {{ path: {{ prefix: /limited }} }}, rewrite: {{ prefix: /who }}, rate_limit: shared, backend: {{ service: users }} }}\n\
                 discovery: {{ consul: {{ address: \"{consul_url}\", wait: 10s }} }}\n\
                 tunnel: {{ connect_timeout: 1s, keepalive_interval: 1s, keepalive_timeout: 2s, failures_to_eject: 2 }}\n\
                 drain_timeout: 5s\n",
                data = dir.join(gw).display(),
                ca = ca_ref(gw, "gateway"),
                addr = ip(i),
                ctl = ip(CTL),
            ),
        );
        start_gateway(&mut lab, meshgate, gw, i);
    }
    for (i, gw) in GWS {
        lab.wait_ready(i, gw);
    }

    // node 7: the L4 balancer, checking each gateway's /readyz on its health listener. Two
    // frontends over the same gateways: :80 ("strict") never retries a failed connection, so
    // what it sees is the gateways' own behaviour; :81 ("retrying") retries and redispatches
    // connection failures, as deploy/examples/production/haproxy.cfg recommends.
    let stats = dir.join("lb.sock");
    let backend = |name: &str, extra: &str| {
        format!(
            "backend {name}\n  balance roundrobin\n{extra}  option httpchk\n  http-check send meth GET uri /readyz\n  http-check expect status 200\n\
             \x20 default-server check port 15021 inter 200ms fall 2 rise 2\n\
             \x20 server gw-1 {gw1}:8080\n  server gw-2 {gw2}:8080\n",
            gw1 = ip(GWS[0].0),
            gw2 = ip(GWS[1].0),
        )
    };
    write(
        &dir.join("lb.cfg"),
        &format!(
            "global\n  maxconn 2000\n  stats socket {stats} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 500ms\n  timeout client 10s\n  timeout server 10s\n  timeout check 300ms\n  retries 0\n\
             frontend public\n  bind {lb}:80\n  default_backend strict\n\
             frontend public_retrying\n  bind {lb}:81\n  default_backend retrying\n\
             {strict}{retrying}",
            stats = stats.display(),
            lb = ip(LB),
            strict = backend("strict", ""),
            retrying = backend("retrying", "  retries 3\n  option redispatch 1\n"),
        ),
    );
    lab.spawn(
        "lb",
        LB,
        &[
            "haproxy",
            "-db",
            "-f",
            dir.join("lb.cfg").to_str().expect("utf8"),
        ],
    );
    let wait_both = |lab: &Lab, gw: &str, want: &str| {
        for b in ["strict", "retrying"] {
            wait_status(lab, &stats, b, gw, want, Duration::from_secs(30));
        }
    };
    for (_, gw) in GWS {
        wait_both(&lab, gw, "UP");
    }
    let lb_url = format!("http://{}/who", ip(LB));
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.get(LB, &lb_url).is_err() {
        assert!(
            Instant::now() < deadline,
            "no answer through the balancer; logs:\n{}",
            lab.logs()
        );
        sleep(Duration::from_millis(200));
    }

    // 1. planned stop of gw-1 under load, behind the balancer that never retries: nothing lost
    let before = server(&stats, "strict", "gw-1")
        .expect("gw-1")
        .sessions_total;
    let load = start_load(&lab, 80, "/who", 6.0);
    sleep(Duration::from_millis(1500));
    let term_at = Instant::now();
    lab.signal("gw-1", "TERM");
    let out_of_rotation = wait_status(
        &lab,
        &stats,
        "strict",
        "gw-1",
        "DOWN",
        Duration::from_secs(5),
    );
    let served_before_stop = server(&stats, "strict", "gw-1")
        .expect("gw-1")
        .sessions_total
        - before;
    let stopped = lab.reap("gw-1", Duration::from_secs(20));
    let stop_took = term_at.elapsed();
    let samples = finish_load(load);
    let lost = failed(&samples);
    say(&format!(
        "HA lab: planned stop (SIGTERM gw-1, drain delay {DRAIN_DELAY}, balancer without retries): {} requests, {} failed; haproxy took gw-1 out after {} ms, it exited after {} ms ({stopped})",
        samples.len(),
        lost.len(),
        out_of_rotation.as_millis(),
        stop_took.as_millis()
    ));
    assert!(
        stopped.success(),
        "gw-1 exits cleanly after its drain: {stopped}"
    );
    assert!(
        samples.len() > 100,
        "the load loop ran: {} requests",
        samples.len()
    );
    assert!(served_before_stop > 0, "gw-1 was serving before the stop");
    assert!(lost.is_empty(), "a planned stop loses nothing: {lost:#?}");
    assert!(
        samples
            .iter()
            .all(|s| NODES.iter().any(|(_, n)| s.body == *n)),
        "every answer comes from a users instance"
    );
    start_gateway(&mut lab, meshgate, "gw-1", GWS[0].0);
    wait_both(&lab, "gw-1", "UP");

    // 2. crash of gw-2 under load on both frontends: out of rotation within 2 s, requests fail
    // only in that window
    let strict_load = start_load(&lab, 80, "/who", 6.0);
    let retrying_load = start_load(&lab, 81, "/who", 6.0);
    sleep(Duration::from_millis(1500));
    let killed_at = unix_now();
    let killed = Instant::now();
    lab.signal("gw-2", "KILL");
    let mut windows = Vec::new();
    for b in ["strict", "retrying"] {
        wait_status(&lab, &stats, b, "gw-2", "DOWN", Duration::from_secs(5));
        windows.push(killed.elapsed());
    }
    let _ = lab.reap("gw-2", Duration::from_secs(5));
    for ((name, load), window) in [("strict", strict_load), ("retrying", retrying_load)]
        .into_iter()
        .zip(windows)
    {
        let samples = finish_load(load);
        let lost = failed(&samples);
        let window_end = killed_at + window.as_secs_f64();
        let in_window = lost
            .iter()
            .filter(|s| s.end >= killed_at - 0.05 && s.start <= window_end + 0.05)
            .count();
        say(&format!(
            "HA lab: crash (SIGKILL gw-2), {name} balancer: it stopped sending to gw-2 after {} ms; {} of {} requests failed, {in_window} of them in that window",
            window.as_millis(),
            lost.len(),
            samples.len()
        ));
        assert!(
            window < Duration::from_secs(2),
            "a crashed gateway is routed around within 2s, took {window:?} ({name})"
        );
        assert!(samples.len() > 100, "the load loop ran ({name})");
        assert_eq!(
            in_window,
            lost.len(),
            "requests fail only while the balancer still sends to the dead gateway ({name}): {lost:#?}"
        );
    }
    start_gateway(&mut lab, meshgate, "gw-2", GWS[1].0);
    wait_both(&lab, "gw-2", "UP");

    // 3. node-b's link goes down under load: routed around
    let load = start_load(&lab, 80, "/who", 9.0);
    sleep(Duration::from_millis(1500));
    let down_at = unix_now();
    lab.link(NODES[1].0, "down");
    let samples = finish_load(load);
    // a request already on the tunnel to node-b waits until that tunnel is declared dead
    // (keepalive_interval 1s + keepalive_timeout 2s) or its route timeout (3s) ends it; one sent
    // later goes elsewhere (node-b is ejected after 2 connect failures)
    let settle = 4.0;
    let (transition, after): (Vec<&Sample>, Vec<&Sample>) = samples
        .iter()
        .filter(|s| s.start >= down_at)
        .partition(|s| s.start < down_at + settle);
    let transition_failed = transition.iter().filter(|s| s.status != 200).count();
    let before_failed = samples
        .iter()
        .filter(|s| s.start < down_at && s.status != 200)
        .count();
    let failures: Vec<String> = samples
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| {
            format!(
                "+{:.2}s..+{:.2}s {} {}",
                s.start - down_at,
                s.end - down_at,
                s.status,
                s.body
            )
        })
        .collect();
    say(&format!(
        "HA lab: node-b link down: {transition_failed} of {} requests failed in the first {settle}s, {} of {} after {failures:?}",
        transition.len(),
        after.iter().filter(|s| s.status != 200).count(),
        after.len()
    ));
    assert_eq!(before_failed, 0, "no failures before the link went down");
    assert!(after.len() > 20, "load continued after the link went down");
    assert!(
        after.iter().all(|s| s.status == 200 && s.body != "node-b"),
        "after {settle}s every request is answered by node-a or node-c: {:#?}",
        after
            .iter()
            .filter(|s| s.status != 200 || s.body == "node-b")
            .collect::<Vec<_>>()
    );
    lab.link(NODES[1].0, "up");

    // 4. one rate limit across both gateways: 20 per tenant, whichever gateway answers
    let per_gw_before: Vec<u64> = GWS
        .iter()
        .map(|(_, g)| server(&stats, "strict", g).map_or(0, |s| s.sessions_total))
        .collect();
    let tenant = format!("X-Tenant:t-{}", std::process::id());
    let mut c = lab.ns(LB);
    c.args([
        "python3",
        "-c",
        LOAD_PY,
        &ip(LB),
        "80",
        "/limited",
        "30",
        "1",
        "40",
        &tenant,
    ]);
    let out = c.output().expect("rate-limit client");
    let samples = parse_samples(&String::from_utf8_lossy(&out.stdout));
    let per_gw: Vec<u64> = GWS
        .iter()
        .zip(&per_gw_before)
        .map(|((_, g), b)| server(&stats, "strict", g).map_or(0, |s| s.sessions_total) - b)
        .collect();
    let ok = samples.iter().filter(|s| s.status == 200).count();
    let limited = samples.iter().filter(|s| s.status == 429).count();
    say(&format!(
        "HA lab: shared rate limit 20/h: {ok} allowed, {limited} refused of {} (gw-1 served {}, gw-2 {})",
        samples.len(),
        per_gw[0],
        per_gw[1]
    ));
    assert_eq!(samples.len(), 40);
    assert!(
        per_gw.iter().all(|n| *n >= 10),
        "both gateways answered: {per_gw:?}"
    );
    assert_eq!(
        (ok, limited),
        (20, 20),
        "the limit is one limit across both gateways"
    );
    drop(lab);
    drop(consul);
    drop(rt);
}
