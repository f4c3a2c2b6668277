//! Consul discovery, registration and the CA's catalog check, against the Consul stand-in
//! (real HTTP, real blocking queries) and Consul's documented payloads.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use meshgate_agent::discovery::consul::{CatalogEntry, HealthEntry, ServiceRegistration};
use meshgate_agent::identity::IdentityError;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    consul_standin::{ConsulStandin, Instance},
    harness::{EchoService, TestAgent, TestCa, eventually},
};

const TD: &str = "mesh.example";

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/consul")
        .join(name);
    std::fs::read_to_string(&p).expect("fixture")
}

#[test]
fn decoder_accepts_every_documented_sample_we_consume() {
    for name in ["health_service.json", "health_connect.composed.json"] {
        let entries: Vec<HealthEntry> = serde_json::from_str(&fixture(name)).expect(name);
        assert!(!entries.is_empty(), "{name}");
        assert!(!entries[0].node.address.is_empty(), "{name}");
    }
    let health: Vec<HealthEntry> =
        serde_json::from_str(&fixture("health_service.json")).expect("health");
    // the docs write tagged-address keys in lower case; the wire uses Address/Port
    assert_eq!(health[0].service.tagged_addresses["wan"].port, 80);
    assert_eq!(health[0].aggregate_status(), "passing");
    for name in [
        "catalog_service.json",
        "filter_catalog_service_unfiltered.json",
        "filter_catalog_service_filtered.json",
    ] {
        let entries: Vec<CatalogEntry> = serde_json::from_str(&fixture(name)).expect(name);
        assert!(entries.iter().all(|e| !e.node.is_empty()), "{name}");
    }
    let reg: ServiceRegistration =
        serde_json::from_str(&fixture("agent_service_register_request.json"))
            .expect("register sample");
    assert_eq!(reg.name, "redis");
}

/// An agent on `node` whose `web` calls `users` found in Consul.
async fn consul_client_agent(
    ca: &TestCa,
    consul: &ConsulStandin,
    extra: serde_json::Value,
) -> TestAgent {
    let mut spec = json!({
        "services": [{"name": "web", "port": 1, "upstreams": [{"service": "users", "listen": "127.0.0.1:0"}]}],
        "discovery": {"consul": {"address": consul.url(), "wait": "10s"}},
        "registration": {"enabled": false},
    });
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    ca.agent("node-a", spec).await
}

async fn users_agent(ca: &TestCa, node: &str, port: u16) -> TestAgent {
    ca.agent(node, json!({
        "services": [{"name": "users", "port": port}],
        "authz": {"default": "deny", "rules": [{"from": "web", "to": "users", "action": "allow"}]},
    }))
    .await
}

fn instance(node: &str, agent: &TestAgent) -> Instance {
    let mut meta = BTreeMap::new();
    meta.insert("meshgate-inbound".to_owned(), agent.inbound().to_string());
    Instance {
        node: node.into(),
        meta,
        ..Instance::new("users", &format!("users-{node}"), 8080)
    }
}

async fn endpoints_of(agent: &TestAgent) -> serde_json::Value {
    let (_, body) = agent.admin("/endpoints").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .find(|s| s["service"] == "users")
        .cloned()
        .expect("users listed")
}

async fn addrs_of(agent: &TestAgent) -> Vec<String> {
    let mut v: Vec<String> = endpoints_of(agent).await["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["addr"].as_str().expect("addr").to_owned())
        .collect();
    v.sort();
    v
}

async fn roundtrip(addr: std::net::SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.map_err(|e| e.to_string())?;
    if back == b"ping" {
        Ok(())
    } else {
        Err(format!("got {back:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_reach_routing_and_outages_keep_stale_endpoints() {
    let ca = TestCa::start(TD).await;
    let consul = ConsulStandin::start().await;
    let (echo_b, echo_c) = (EchoService::start().await, EchoService::start().await);
    let b = users_agent(&ca, "node-b", echo_b.port).await;
    let c = users_agent(&ca, "node-c", echo_c.port).await;
    let a = consul_client_agent(&ca, &consul, json!({})).await;
    let upstream = a.agent.upstream_addr("users").expect("listener");
    assert!(
        eventually(Duration::from_secs(5), || async {
            endpoints_of(&a).await["last_update"].is_string()
        })
        .await
    );
    assert!(addrs_of(&a).await.is_empty());

    // a new instance reaches routing within 1s: the blocking query returns at once
    let t0 = std::time::Instant::now();
    consul.add_instance(instance("node-b", &b));
    let seen = eventually(Duration::from_secs(5), || async {
        addrs_of(&a).await == vec![b.inbound().to_string()]
    })
    .await;
    let took = t0.elapsed();
    assert!(seen, "node-b appeared");
    assert!(
        took < Duration::from_secs(1),
        "catalog change took {took:?}"
    );
    roundtrip(upstream).await.expect("traffic to node-b");
    assert_eq!(echo_b.accepted(), 1);

    // a failing health check removes the endpoint
    consul.add_instance(instance("node-c", &c));
    assert!(
        eventually(Duration::from_secs(5), || async {
            addrs_of(&a).await.len() == 2
        })
        .await
    );
    consul.set_check_status("users-node-b", "critical");
    assert!(
        eventually(Duration::from_secs(5), || async {
            addrs_of(&a).await == vec![c.inbound().to_string()]
        })
        .await,
        "critical instance removed"
    );
    for _ in 0..5 {
        roundtrip(upstream).await.expect("traffic to node-c");
    }
    assert_eq!(echo_c.accepted(), 5);

    // Consul goes away: the last good endpoints keep serving, marked stale
    let addr = consul.addr();
    let state = consul.stop().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            endpoints_of(&a).await["stale"] == true
        })
        .await,
        "marked stale"
    );
    assert_eq!(
        a.metric(r#"meshgate_discovery_stale{service="users"}"#)
            .await,
        1.0
    );
    assert!(
        a.metric(r#"meshgate_discovery_errors_total{source="consul",kind="unreachable"}"#)
            .await
            >= 1.0
    );
    roundtrip(upstream)
        .await
        .expect("stale endpoints still carry traffic");
    let ep = endpoints_of(&a).await;
    assert!(
        ep["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{ep}"
    );

    // and recovery is automatic
    let consul = ConsulStandin::start_with(addr, state).await;
    consul.set_check_status("users-node-b", "passing");
    assert!(
        eventually(Duration::from_secs(40), || async {
            endpoints_of(&a).await["stale"] == false && addrs_of(&a).await.len() == 2
        })
        .await,
        "fresh again"
    );
    assert_eq!(
        a.metric(r#"meshgate_discovery_stale{service="users"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn index_rules_hold() {
    let ca = TestCa::start(TD).await;
    let consul = ConsulStandin::start().await;
    let echo = EchoService::start().await;
    let b = users_agent(&ca, "node-b", echo.port).await;
    consul.add_instance(instance("node-b", &b));
    let a = consul_client_agent(&ca, &consul, json!({})).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            addrs_of(&a).await.len() == 1
        })
        .await
    );
    let blocking = |q: &str| q.split('&').any(|kv| kv.starts_with("index="));
    assert!(
        eventually(Duration::from_secs(5), || async {
            consul.requests().iter().any(|r| blocking(&r.query))
        })
        .await,
        "blocks on the index"
    );

    // the index goes backwards (e.g. a snapshot restore): the watch resets and asks afresh
    let before = consul.requests().len();
    consul.set_index(3);
    assert!(
        eventually(Duration::from_secs(5), || async {
            consul.requests()[before..]
                .iter()
                .any(|r| r.path.contains("/health/service/users") && !blocking(&r.query))
        })
        .await,
        "a non-blocking query follows the reset"
    );
    // Consul never sends index 0 and the client never blocks on it: after 0 it waits on 1
    assert!(
        eventually(Duration::from_secs(5), || async {
            consul
                .requests()
                .iter()
                .any(|r| r.query.split('&').any(|kv| kv == "index=3"))
        })
        .await,
        "blocking on the reset index"
    );
    let before = consul.requests().len();
    consul.set_index(0);
    assert!(
        eventually(Duration::from_secs(5), || async {
            consul.requests()[before..]
                .iter()
                .any(|r| r.query.split('&').any(|kv| kv == "index=1"))
        })
        .await,
        "blocks on index 1: {:?}",
        consul.requests()
    );
    assert!(
        consul
            .requests()
            .iter()
            .all(|r| !r.query.split('&').any(|kv| kv == "index=0"))
    );
    assert!(
        consul
            .requests()
            .iter()
            .all(|r| r.query.contains("passing"))
    );
    // and routing is intact through it all
    assert_eq!(addrs_of(&a).await, vec![b.inbound().to_string()]);
}

#[tokio::test]
async fn a_rejected_token_is_logged_and_counted() {
    let ca = TestCa::start(TD).await;
    let consul = ConsulStandin::start().await;
    consul.require_token("the-right-token");
    let a = consul_client_agent(&ca, &consul, json!({"discovery": {"consul": {"address": consul.url(), "token": "wrong", "wait": "10s"}}})).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.metric(r#"meshgate_discovery_errors_total{source="consul",kind="token"}"#)
                .await
                >= 1.0
        })
        .await
    );
    let ep = endpoints_of(&a).await;
    assert!(
        ep["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ACL not found")),
        "{ep}"
    );
    assert!(
        consul
            .requests()
            .iter()
            .any(|r| r.token.as_deref() == Some("wrong")),
        "sent as X-Consul-Token"
    );
    let (_, config) = a.admin("/config").await;
    assert!(!config.contains("wrong"), "the token is never shown");
}

#[tokio::test]
async fn registration_matches_consuls_documented_shape() {
    let consul = ConsulStandin::start().await;
    let ca = TestCa::start_with_consul(TD, &consul.url()).await;
    let echo = EchoService::start().await;
    let a = ca
        .agent("node-a", json!({
            "services": [
                {"name": "web", "port": echo.port, "protocol": "http", "tags": ["v1"], "health_path": "/health"},
                {"name": "users", "port": echo.port},
            ],
            "discovery": {"consul": {"address": consul.url()}},
            "registration": {"tags": ["mesh"], "deregister_critical_after": "90m"},
        }))
        .await;
    let regs = consul.registrations();
    assert_eq!(regs.len(), 2, "{regs:?}");
    let web = &regs[0];
    let inbound = a.inbound().to_string();
    assert_eq!(web["ID"], "web-node-a");
    assert_eq!(web["Name"], "web");
    assert_eq!(web["Tags"], json!(["mesh"]));
    assert_eq!(web["Address"], "127.0.0.1");
    assert_eq!(web["Port"], a.inbound().port());
    assert_eq!(web["Meta"]["meshgate-inbound"], inbound.as_str());
    assert_eq!(web["Meta"]["meshgate-protocol"], "http");
    assert_eq!(
        web["Check"]["HTTP"],
        format!("http://127.0.0.1:{}/health", echo.port)
    );
    assert_eq!(web["Check"]["Interval"], "10s");
    assert_eq!(web["Check"]["DeregisterCriticalServiceAfter"], "5400s");
    assert_eq!(regs[1]["Check"]["TCP"], format!("127.0.0.1:{}", echo.port));
    // every key we send is one Consul documents for this endpoint
    let documented: serde_json::Value = serde_json::from_str(&fixture(
        "agent_service_register_request_checks.composed.json",
    ))
    .expect("sample");
    let doc_sample: serde_json::Value =
        serde_json::from_str(&fixture("agent_service_register_request.json")).expect("sample");
    for key in web.as_object().expect("object").keys() {
        assert!(
            documented.get(key).is_some() || doc_sample.get(key).is_some(),
            "{key} is not a documented field"
        );
    }
    let doc_check = &documented["Checks"][0];
    for key in web["Check"].as_object().expect("check").keys() {
        assert!(
            doc_check.get(key).is_some() || key == "CheckID" || key == "TCP",
            "check field {key} is not documented"
        );
    }
    // the CA found both services in the catalog and signed them
    assert_eq!(a.admin("/readyz").await.0, 200);
    assert!(a.agent.shutdown().await);
    let mut gone = consul.deregistrations();
    gone.sort();
    assert_eq!(
        gone,
        vec!["users-node-a", "web-node-a"],
        "deregistered on clean shutdown"
    );
}

#[tokio::test]
async fn registration_denied_is_a_clear_error_and_the_agent_keeps_serving() {
    let consul = ConsulStandin::start().await;
    consul.deny_write("web");
    let ca = TestCa::start(TD).await;
    let a = ca
        .agent(
            "node-a",
            json!({
                "services": [{"name": "web", "port": 1}],
                "discovery": {"consul": {"address": consul.url()}},
            }),
        )
        .await;
    assert_eq!(
        a.admin("/readyz").await.0,
        200,
        "the agent serves without its registration"
    );
    assert!(
        a.metric(r#"meshgate_discovery_errors_total{source="consul",kind="permission"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn ca_signs_only_services_registered_on_that_node_in_consul() {
    let consul = ConsulStandin::start().await;
    let ca = TestCa::start_with_consul(TD, &consul.url()).await;
    // the token would allow billing: with Consul, the catalog decides
    let (node, _d) = ca.join("node-x", &["billing"]).await;
    let err = node
        .workload("default", "billing")
        .await
        .expect_err("not in the catalog");
    match err {
        IdentityError::Refused { message, .. } => {
            assert!(
                message.contains("not registered on node node-x"),
                "{message}"
            )
        }
        other => panic!("{other}"),
    }
    // registered on another node: still no
    consul.add_instance(Instance {
        node: "node-y".into(),
        ..Instance::new("billing", "billing-node-y", 80)
    });
    assert!(node.workload("default", "billing").await.is_err());
    consul.add_instance(Instance {
        node: "node-x".into(),
        ..Instance::new("billing", "billing-node-x", 80)
    });
    node.workload("default", "billing")
        .await
        .expect("registered on node-x now");
}
