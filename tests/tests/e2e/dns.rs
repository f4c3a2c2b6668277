//! DNS discovery against a real DNS server: dnsmasq (Debian's dnsmasq-base, which CI installs),
//! started by the test on a loopback port, serving A and SRV records with a 1s TTL.

use std::{path::Path, process::Stdio, time::Duration};

use serde_json::json;

use crate::harness::{EchoService, TestAgent, TestCa, eventually};

const TD: &str = "mesh.example";

/// A dnsmasq on 127.0.0.1:PORT answering only from `hosts` and the given SRV records.
struct Dnsmasq {
    child: tokio::process::Child,
    port: u16,
}

impl Dnsmasq {
    async fn start(dir: &Path, srv: &[String]) -> Option<Self> {
        if std::process::Command::new("dnsmasq")
            .arg("--version")
            .output()
            .is_err()
        {
            return None;
        }
        // dnsmasq listens on UDP and TCP: a port free for UDP may be taken for TCP by a listener
        // of a test running beside this one, and then dnsmasq exits at once; try a few ports
        for _ in 0..5 {
            let port = free_udp_and_tcp_port();
            let mut cmd = tokio::process::Command::new("dnsmasq");
            cmd.args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--local-ttl=1",
                "--log-facility=-",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", dir.join("hosts").display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
            for s in srv {
                cmd.arg(format!("--srv-host={s}"));
            }
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn dnsmasq");
            tokio::time::sleep(Duration::from_millis(300)).await;
            match child.try_wait() {
                Ok(None) => return Some(Self { child, port }),
                Ok(Some(status)) => {
                    eprintln!("dnsmasq on port {port} exited at start ({status}); another port");
                }
                Err(e) => panic!("dnsmasq: {e}"),
            }
        }
        panic!("dnsmasq did not stay up on any of five ports");
    }

    fn reload(&self) {
        let pid = self.child.id().expect("running");
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }
}

/// A loopback port that is free for both UDP and TCP right now.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the DNS test, but: {reason}"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED dns discovery test: {reason}");
}

async fn users_of(a: &TestAgent) -> Vec<String> {
    let (_, body) = a.admin("/endpoints").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|s| s["service"] == "users")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| e["addr"].as_str().expect("addr").to_owned())
        .collect()
}

#[tokio::test]
async fn a_and_srv_records_feed_endpoints_and_changes_follow_the_ttl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::start(TD).await;
    let echo = EchoService::start().await;
    let b = ca
        .agent("node-b", json!({
            "services": [{"name": "users", "port": echo.port}],
            "authz": {"default": "deny", "rules": [{"from": "web", "to": "*", "action": "allow"}]},
            "listen": {"inbound": "127.0.0.2:0", "admin": "127.0.0.1:0"},
        }))
        .await;
    let port = b.inbound().port();
    std::fs::write(
        tmp.path().join("hosts"),
        "127.0.0.2 users.mesh.test\n127.0.0.2 node-b.mesh.test\n",
    )
    .expect("hosts");
    let srv = vec![format!("_users._tcp.mesh.test,node-b.mesh.test,{port}")];
    let Some(dns) = Dnsmasq::start(tmp.path(), &srv).await else {
        return skip("dnsmasq is not installed (apt-get install dnsmasq-base)");
    };
    // wait until dnsmasq answers, so the agent's first lookup is not a race with its start
    let probe_cfg: meshgate_agent::discovery::dns::DnsConfig = serde_json::from_value(json!({
        "nameservers": [format!("127.0.0.1:{}", dns.port)],
    }))
    .expect("dns config");
    let resolver = meshgate_agent::discovery::dns::resolver(&probe_cfg).expect("resolver");
    let probe: meshgate_agent::discovery::dns::DnsService =
        serde_json::from_value(json!({"name": "users.mesh.test.", "record": "a", "port": 1}))
            .expect("svc");
    let answering = eventually(Duration::from_secs(20), || {
        let (resolver, probe) = (resolver.clone(), probe.clone());
        async move {
            meshgate_agent::discovery::dns::lookup(&resolver, &probe, 1)
                .await
                .is_ok()
        }
    })
    .await;
    assert!(answering, "dnsmasq answers on 127.0.0.1:{}", dns.port);
    let a = ca
        .agent(
            "node-a",
            json!({
                "services": [{"name": "web", "port": 1, "upstreams": [
                    {"service": "users", "listen": "127.0.0.1:0"},
                    {"service": "users-srv", "listen": "127.0.0.1:0"},
                ]}],
                "discovery": {"dns": {
                    "nameservers": [format!("127.0.0.1:{}", dns.port)],
                    "services": {
                        "users": {"name": "users.mesh.test.", "record": "a", "port": port},
                        "users-srv": {"name": "_users._tcp.mesh.test.", "record": "srv"},
                    },
                }},
            }),
        )
        .await;
    let want = format!("127.0.0.2:{port}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            users_of(&a).await == vec![want.clone()]
        })
        .await,
        "A record -> endpoint"
    );
    let (_, body) = a.admin("/endpoints").await;
    assert!(
        body.contains(&format!("\"addr\": \"{want}\"")) && body.contains("\"source\": \"dns\""),
        "{body}"
    );
    let srv_ok = eventually(Duration::from_secs(20), || async {
        let (_, body) = a.admin("/endpoints").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .any(|s| s["service"] == "users-srv" && s["endpoints"][0]["addr"] == want.as_str())
    })
    .await;
    assert!(srv_ok, "SRV record -> target address and port");

    // traffic flows to what DNS said
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(a.upstream("users"))
        .await
        .expect("connect");
    s.write_all(b"dns").await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"dns");

    // the record changes; after its 1s TTL the agent follows
    std::fs::write(
        tmp.path().join("hosts"),
        "127.0.0.3 users.mesh.test\n127.0.0.2 node-b.mesh.test\n",
    )
    .expect("hosts");
    dns.reload();
    let moved = format!("127.0.0.3:{port}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            users_of(&a).await == vec![moved.clone()]
        })
        .await,
        "record change picked up"
    );
}
