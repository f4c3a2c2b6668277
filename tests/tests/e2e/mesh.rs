//! `TestMesh`: a typed builder for a whole mesh on loopback — a CA, agents with the local
//! services they run, intentions, and a gateway — with static discovery computed from which
//! agent runs which service. Every listener binds port 0 and the handles report what was bound;
//! dropping or [`Mesh::shutdown`] stops everything.
//!
//! ```ignore
//! let mesh = TestMesh::new()
//!     .agent(AgentSpec::new("node-b").service(ServiceSpec::http("users", backend.port)))
//!     .agent(AgentSpec::new("node-a").service(ServiceSpec::tcp("web", 1).calls("users")))
//!     .intention(Intention::allow("web", "users"))
//!     .gateway(GatewaySpec::new().route(RouteSpec::new("users").prefix("/users").to("users")))
//!     .start()
//!     .await;
//! let addr = mesh.agent("node-a").upstream("users");
//! ```
//!
//! Agents start in dependency order (an agent's upstreams are started before it), so each
//! static discovery entry names inbound addresses that are already bound. The model is
//! ztunnel's `WorkloadManager` / `TestWorkloadBuilder`: tests say what runs where, the harness
//! writes the configs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use meshgate_agent::{
    balance::Target,
    config::{AgentConfig, Protocol, ServiceConfig, UpstreamConfig},
    discovery::{StaticEndpoint, consul::ConsulConfig},
    policy::authz::{Action, AuthzConfig, RuleConfig},
};
use meshgate_gateway::{
    config::{GatewayConfig, Limits},
    routes::RouteConfig,
};
use serde_json::{Value, json};

use crate::{
    gw_harness::TestGateway,
    harness::{TestAgent, TestCa},
};

/// The trust domain of every mesh built here unless [`TestMesh::trust_domain`] says otherwise.
pub(crate) const TD: &str = "mesh.example";

/// A config change applied to the typed agent config after the builder wrote it.
type AgentTweak = Box<dyn FnOnce(&mut AgentConfig) + Send>;
/// A change to the CA's config before it starts.
type CaTweak = Box<dyn FnOnce(&mut meshgate_ca::server::CaConfig<ConsulConfig>) + Send>;
/// A change to the CA's fresh data dir before it starts.
type CaPrepare = Box<dyn FnOnce(&std::path::Path) + Send>;

/// How [`TestMesh::agent_endpoint`] lists an agent's inbound address.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Listed {
    /// `IP:PORT`: any node the hosting map allows for the service may answer there.
    Plain,
    /// `NODE@IP:PORT` with the agent's own node name.
    Pinned,
    /// `NAME@IP:PORT` with another node's name (an address that answers with the wrong node).
    PinnedAs(&'static str),
}
/// A config change applied to the typed gateway config after the builder wrote it.
type GatewayTweak = Box<dyn FnOnce(&mut GatewayConfig) + Send>;

/// One local service an agent runs.
#[derive(Debug, Clone)]
pub(crate) struct ServiceSpec {
    name: String,
    port: u16,
    protocol: Protocol,
    calls: Vec<String>,
}

impl ServiceSpec {
    /// A service on 127.0.0.1:`port` speaking `protocol`.
    pub(crate) fn new(name: &str, port: u16, protocol: Protocol) -> Self {
        Self {
            name: name.into(),
            port,
            protocol,
            calls: Vec::new(),
        }
    }

    /// A `protocol: tcp` service (bytes, L4 intentions).
    pub(crate) fn tcp(name: &str, port: u16) -> Self {
        Self::new(name, port, Protocol::Tcp)
    }

    /// A `protocol: http` service (HTTP/1.1 to the service, per-request intentions).
    pub(crate) fn http(name: &str, port: u16) -> Self {
        Self::new(name, port, Protocol::Http)
    }

    /// A `protocol: grpc` service (h2c to the service).
    pub(crate) fn grpc(name: &str, port: u16) -> Self {
        Self::new(name, port, Protocol::Grpc)
    }

    /// This service calls `service` through an upstream listener on 127.0.0.1:0.
    pub(crate) fn calls(mut self, service: &str) -> Self {
        self.calls.push(service.into());
        self
    }
}

/// One agent: a node name and the services it runs.
pub(crate) struct AgentSpec {
    node: String,
    services: Vec<ServiceSpec>,
    tweaks: Vec<AgentTweak>,
}

impl AgentSpec {
    /// An agent for node `node` running nothing yet.
    pub(crate) fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            services: Vec::new(),
            tweaks: Vec::new(),
        }
    }

    /// Adds a local service.
    pub(crate) fn service(mut self, s: ServiceSpec) -> Self {
        self.services.push(s);
        self
    }

    /// Escape hatch for rare fields: runs `f` on the typed config the builder wrote.
    pub(crate) fn configure(mut self, f: impl FnOnce(&mut AgentConfig) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }
}

/// An intention (authz rule), given to every agent (each evaluates the ones naming its
/// services); the default is deny.
#[derive(Debug, Clone)]
pub(crate) struct Intention(RuleConfig);

impl Intention {
    /// `from` may call `to` (service names, `*`, prefixes ending in `*`, or SPIFFE IDs).
    pub(crate) fn allow(from: &str, to: &str) -> Self {
        Self(RuleConfig {
            from: from.into(),
            to: to.into(),
            action: Action::Allow,
            methods: Vec::new(),
            paths: Vec::new(),
        })
    }

    /// `from` may not call `to` (narrow it with [`Intention::methods`] / [`Intention::paths`]).
    pub(crate) fn deny(from: &str, to: &str) -> Self {
        Self(RuleConfig {
            action: Action::Deny,
            ..Self::allow(from, to).0
        })
    }

    /// Only these HTTP methods.
    pub(crate) fn methods(mut self, m: &[&str]) -> Self {
        self.0.methods = m.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Only these paths (`/admin` exact, `/admin/*` prefix).
    pub(crate) fn paths(mut self, p: &[&str]) -> Self {
        self.0.paths = p.iter().map(|s| (*s).to_owned()).collect();
        self
    }
}

/// A gateway route: the common fields typed, the rare ones through [`RouteSpec::extra`].
#[derive(Debug, Clone)]
pub(crate) struct RouteSpec {
    name: String,
    hosts: Vec<String>,
    path: Option<(&'static str, String)>,
    methods: Vec<String>,
    headers: BTreeMap<String, String>,
    backend: Value,
    jwt: Vec<String>,
    timeout: Option<Duration>,
    rate_limit: Option<String>,
    cors_origins: Vec<String>,
    extra: Value,
}

impl RouteSpec {
    /// A route named `name` that matches every request until narrowed.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            hosts: Vec::new(),
            path: None,
            methods: Vec::new(),
            headers: BTreeMap::new(),
            backend: Value::Null,
            jwt: Vec::new(),
            timeout: None,
            rate_limit: None,
            cors_origins: Vec::new(),
            extra: json!({}),
        }
    }

    /// Matches these hosts only.
    pub(crate) fn hosts(mut self, h: &[&str]) -> Self {
        self.hosts = h.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Matches a path prefix (segment-aware).
    pub(crate) fn prefix(mut self, p: &str) -> Self {
        self.path = Some(("prefix", p.into()));
        self
    }

    /// Matches one exact path.
    pub(crate) fn exact(mut self, p: &str) -> Self {
        self.path = Some(("exact", p.into()));
        self
    }

    /// Matches these methods only.
    pub(crate) fn methods(mut self, m: &[&str]) -> Self {
        self.methods = m.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Matches only requests with header `name: value` (`*`: present).
    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sends to mesh service `service`.
    pub(crate) fn to(mut self, service: &str) -> Self {
        self.backend = json!({"service": service});
        self
    }

    /// Splits by weight over `(service, weight)`; `pin` lets a header / cookie choose.
    pub(crate) fn split(mut self, backends: &[(&str, u32)], pin: Option<(&str, &str)>) -> Self {
        let split: Vec<Value> = backends
            .iter()
            .map(|(s, w)| json!({"service": s, "weight": w}))
            .collect();
        self.backend = json!({"split": split});
        if let Some((header, cookie)) = pin {
            self.backend["pin"] = json!({"header": header, "cookie": cookie});
        }
        self
    }

    /// Sends to a URL outside the mesh (`backend: {external: …}`); `ca_file` for https.
    pub(crate) fn external(mut self, url: &str, ca_file: Option<&std::path::Path>) -> Self {
        self.backend = json!({"external": {"url": url}});
        if let Some(ca) = ca_file {
            self.backend["external"]["ca_file"] = json!(ca);
        }
        self
    }

    /// Requires a token from these JWT providers.
    pub(crate) fn jwt(mut self, providers: &[&str]) -> Self {
        self.jwt = providers.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The route timeout.
    pub(crate) fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Applies the rate-limit policy named `policy`.
    pub(crate) fn rate_limit(mut self, policy: &str) -> Self {
        self.rate_limit = Some(policy.into());
        self
    }

    /// Route CORS allowing these origins.
    pub(crate) fn cors(mut self, origins: &[&str]) -> Self {
        self.cors_origins = origins.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Escape hatch for rare route fields (`rewrite`, `transforms`, `max_body`, …): merged over
    /// the typed fields, then checked by the gateway's own `RouteConfig` parser.
    pub(crate) fn extra(mut self, fields: Value) -> Self {
        for (k, v) in fields.as_object().expect("extra: a JSON object") {
            self.extra[k] = v.clone();
        }
        self
    }

    fn backend_services(&self) -> Vec<String> {
        if let Some(s) = self.backend["service"].as_str() {
            return vec![s.to_owned()];
        }
        self.backend["split"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["service"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The gateway's typed route.
    pub(crate) fn build(&self) -> RouteConfig {
        let mut m = json!({});
        if !self.hosts.is_empty() {
            m["hosts"] = json!(self.hosts);
        }
        if let Some((kind, p)) = &self.path {
            m["path"] = json!({ *kind: p });
        }
        if !self.methods.is_empty() {
            m["methods"] = json!(self.methods);
        }
        if !self.headers.is_empty() {
            m["headers"] = json!(self.headers);
        }
        let mut r = json!({"name": self.name, "match": m, "backend": self.backend});
        if !self.jwt.is_empty() {
            r["auth"] = json!({"jwt": self.jwt});
        }
        if let Some(t) = self.timeout {
            r["timeout"] = json!(format!("{}ms", t.as_millis()));
        }
        if let Some(p) = &self.rate_limit {
            r["rate_limit"] = json!(p);
        }
        if !self.cors_origins.is_empty() {
            r["cors"] = json!({"allow_origins": self.cors_origins});
        }
        for (k, v) in self.extra.as_object().expect("object") {
            r[k] = v.clone();
        }
        serde_json::from_value(r.clone())
            .unwrap_or_else(|e| panic!("route {}: {e} in {r}", self.name))
    }
}

/// The gateway: routes, limits, auth, and an escape hatch for the rest.
#[derive(Default)]
pub(crate) struct GatewaySpec {
    routes: Vec<RouteSpec>,
    limits: Option<Limits>,
    auth: Option<Value>,
    tweaks: Vec<GatewayTweak>,
}

impl GatewaySpec {
    /// A gateway with no routes yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds a route.
    pub(crate) fn route(mut self, r: RouteSpec) -> Self {
        self.routes.push(r);
        self
    }

    /// Replaces the limits.
    pub(crate) fn limits(mut self, l: Limits) -> Self {
        self.limits = Some(l);
        self
    }

    /// The `auth` section (JWT providers, API keys, rate-limit policies) as written in
    /// gateway.yaml; parsed by the gateway's own `AuthConfig`.
    pub(crate) fn auth(mut self, auth: Value) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Escape hatch for rare fields: runs `f` on the typed config the builder wrote.
    pub(crate) fn configure(mut self, f: impl FnOnce(&mut GatewayConfig) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }
}

/// What a mesh is made of, before it starts.
pub(crate) struct TestMesh {
    trust_domain: String,
    agents: Vec<AgentSpec>,
    intentions: Vec<Intention>,
    gateway: Option<GatewaySpec>,
    extra_endpoints: BTreeMap<String, Vec<SocketAddr>>,
    /// (service, node, how): an agent's inbound address listed as an endpoint of a service.
    agent_endpoints: Vec<(String, String, Listed)>,
    ca_tweaks: Vec<CaTweak>,
    ca_prepare: Vec<CaPrepare>,
}

impl Default for TestMesh {
    fn default() -> Self {
        Self::new()
    }
}

impl TestMesh {
    /// An empty mesh in trust domain [`TD`].
    pub(crate) fn new() -> Self {
        Self {
            trust_domain: TD.into(),
            agents: Vec::new(),
            intentions: Vec::new(),
            gateway: None,
            extra_endpoints: BTreeMap::new(),
            agent_endpoints: Vec::new(),
            ca_tweaks: Vec::new(),
            ca_prepare: Vec::new(),
        }
    }

    /// Lists agent `node`'s inbound address as an endpoint of `service` (whether it runs it
    /// or not), for everyone who calls `service`; `node` starts before them.
    pub(crate) fn agent_endpoint(mut self, service: &str, node: &str, how: Listed) -> Self {
        self.agent_endpoints
            .push((service.into(), node.into(), how));
        self
    }

    /// Changes the CA's config (lifetimes, grace, reload interval) before it starts.
    pub(crate) fn ca_config(
        mut self,
        f: impl FnOnce(&mut meshgate_ca::server::CaConfig<ConsulConfig>) + Send + 'static,
    ) -> Self {
        self.ca_tweaks.push(Box::new(f));
        self
    }

    /// Runs `f` on the CA's data dir after `ca init`, before it starts (a short intermediate…).
    pub(crate) fn ca_prepare(mut self, f: impl FnOnce(&std::path::Path) + Send + 'static) -> Self {
        self.ca_prepare.push(Box::new(f));
        self
    }

    /// Adds an agent.
    pub(crate) fn agent(mut self, a: AgentSpec) -> Self {
        self.agents.push(a);
        self
    }

    /// Adds an intention (given to every agent).
    pub(crate) fn intention(mut self, i: Intention) -> Self {
        self.intentions.push(i);
        self
    }

    /// Adds the gateway (identity `gateway`).
    pub(crate) fn gateway(mut self, g: GatewaySpec) -> Self {
        self.gateway = Some(g);
        self
    }

    /// A discovery entry no agent of this mesh serves (a dead or foreign address).
    pub(crate) fn endpoint(mut self, service: &str, addr: SocketAddr) -> Self {
        self.extra_endpoints
            .entry(service.into())
            .or_default()
            .push(addr);
        self
    }

    /// The order agents start in: each after the agents running the services it calls.
    fn start_order(&self) -> Vec<usize> {
        let runs = |i: usize, svc: &str| {
            self.agents[i].services.iter().any(|s| s.name == svc)
                || self
                    .agent_endpoints
                    .iter()
                    .any(|(s, n, _)| s == svc && *n == self.agents[i].node)
        };
        let mut done: Vec<usize> = Vec::new();
        let mut left: BTreeSet<usize> = (0..self.agents.len()).collect();
        while !left.is_empty() {
            let ready: Vec<usize> = left
                .iter()
                .copied()
                .filter(|&i| {
                    self.agents[i]
                        .services
                        .iter()
                        .flat_map(|s| &s.calls)
                        .all(|c| {
                            (0..self.agents.len())
                                .filter(|&j| j != i && runs(j, c))
                                .all(|j| done.contains(&j))
                        })
                })
                .collect();
            assert!(
                !ready.is_empty(),
                "TestMesh: agents {:?} call each other in a cycle; static discovery needs an order",
                left.iter()
                    .map(|&i| self.agents[i].node.as_str())
                    .collect::<Vec<_>>()
            );
            for i in ready {
                left.remove(&i);
                done.push(i);
            }
        }
        done
    }

    /// Starts the CA, the agents in dependency order, then the gateway.
    pub(crate) async fn start(self) -> Mesh {
        let (mut mesh, gateway) = self.start_agents().await;
        if let Some(spec) = gateway {
            let (cfg, dir, cert) = mesh.gateway_config(spec);
            mesh.gateway = Some(TestGateway::start(cfg, dir, cert).await);
        }
        mesh
    }

    /// Starts the CA and the agents; returns the mesh and the gateway spec still to start
    /// (in process by [`TestMesh::start`], or in a child process).
    pub(crate) async fn start_agents(mut self) -> (Mesh, Option<GatewaySpec>) {
        let (prepare, tweaks) = (
            std::mem::take(&mut self.ca_prepare),
            std::mem::take(&mut self.ca_tweaks),
        );
        let ca = TestCa::start_prepared(
            &self.trust_domain,
            |dir| prepare.into_iter().for_each(|f| f(dir)),
            |c| tweaks.into_iter().for_each(|f| f(c)),
        )
        .await;
        let order = self.start_order();
        let authz = AuthzConfig {
            default: Action::Deny,
            rules: self.intentions.iter().map(|i| i.0.clone()).collect(),
        };
        let mut specs: Vec<Option<AgentSpec>> = self.agents.drain(..).map(Some).collect();
        let mut running: Vec<(String, TestAgent)> = Vec::new();
        let mut runs: BTreeMap<String, Vec<StaticEndpoint>> = self
            .extra_endpoints
            .iter()
            .map(|(s, a)| (s.clone(), a.iter().copied().map(Into::into).collect()))
            .collect();
        for i in order {
            let spec = specs[i].take().expect("each agent starts once");
            let (mut cfg, dir) = ca.agent_base(&spec.node, &spec_services(&spec));
            cfg.services = spec
                .services
                .iter()
                .map(|s| ServiceConfig {
                    name: s.name.clone(),
                    port: s.port,
                    protocol: s.protocol,
                    upstreams: s
                        .calls
                        .iter()
                        .map(|c| UpstreamConfig {
                            service: c.clone(),
                            listen: "127.0.0.1:0".parse().expect("addr"),
                        })
                        .collect(),
                    tags: Vec::new(),
                    health_path: None,
                })
                .collect();
            cfg.authz = authz.clone();
            for s in &spec.services {
                for c in &s.calls {
                    let addrs = runs.get(c).cloned().unwrap_or_else(|| {
                        panic!(
                            "TestMesh: {} calls {c}, which no agent started before it runs",
                            spec.node
                        )
                    });
                    cfg.discovery.static_endpoints.insert(c.clone(), addrs);
                }
            }
            for t in spec.tweaks {
                t(&mut cfg);
            }
            let agent = ca.start_agent(cfg, dir).await;
            for s in &spec.services {
                runs.entry(s.name.clone())
                    .or_default()
                    .push(agent.inbound().into());
            }
            for (svc, _, how) in self
                .agent_endpoints
                .iter()
                .filter(|(_, n, _)| *n == spec.node)
            {
                let at = agent.inbound();
                let e = match how {
                    Listed::Plain => at.into(),
                    Listed::Pinned => Target::pinned(at, &spec.node).into(),
                    Listed::PinnedAs(other) => Target::pinned(at, other).into(),
                };
                runs.entry(svc.clone()).or_default().push(e);
            }
            running.push((spec.node.clone(), agent));
        }
        (
            Mesh {
                ca,
                agents: running,
                gateway: None,
                runs,
            },
            self.gateway,
        )
    }
}

fn spec_services(spec: &AgentSpec) -> Vec<String> {
    spec.services.iter().map(|s| s.name.clone()).collect()
}

/// A running mesh. Dropping it stops every task it started.
pub(crate) struct Mesh {
    /// The CA (its data dir mints extra identities).
    pub(crate) ca: TestCa,
    agents: Vec<(String, TestAgent)>,
    gateway: Option<TestGateway>,
    /// Service -> the inbound addresses of the agents running it (plus extra endpoints).
    runs: BTreeMap<String, Vec<StaticEndpoint>>,
}

impl Mesh {
    /// The agent of node `node`.
    pub(crate) fn agent(&self, node: &str) -> &TestAgent {
        self.agents
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("no agent {node} in this mesh"))
    }

    /// Takes agent `node` out of the mesh (to shut it down by itself).
    pub(crate) fn take_agent(&mut self, node: &str) -> TestAgent {
        let i = self
            .agents
            .iter()
            .position(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no agent {node} in this mesh"));
        self.agents.remove(i).1
    }

    /// The gateway.
    pub(crate) fn gw(&self) -> &TestGateway {
        self.gateway.as_ref().expect("this mesh has a gateway")
    }

    /// The typed gateway config for `spec`: listeners on port 0, a throwaway certificate,
    /// discovery of every route backend from the agents that run it. Returns the config, the
    /// directory holding its files and the certificate.
    pub(crate) fn gateway_config(
        &self,
        spec: GatewaySpec,
    ) -> (
        GatewayConfig,
        tempfile::TempDir,
        rustls_pki_types::CertificateDer<'static>,
    ) {
        let (mut cfg, dir, cert) = self.ca.gateway_base(json!({}));
        cfg.routes = spec.routes.iter().map(RouteSpec::build).collect();
        for svc in spec.routes.iter().flat_map(RouteSpec::backend_services) {
            let addrs = self.runs.get(&svc).cloned().unwrap_or_else(|| {
                panic!("TestMesh: a gateway route sends to {svc}, which no agent runs")
            });
            cfg.discovery.static_endpoints.insert(svc, addrs);
        }
        if let Some(l) = spec.limits {
            cfg.limits = l;
        }
        if let Some(a) = spec.auth {
            cfg.auth = serde_json::from_value(a).unwrap_or_else(|e| panic!("gateway auth: {e}"));
        }
        for t in spec.tweaks {
            t(&mut cfg);
        }
        (cfg, dir, cert)
    }

    /// Drains the gateway, then the agents in reverse start order; true when all drained in
    /// time.
    pub(crate) async fn shutdown(mut self) -> bool {
        let mut clean = true;
        if let Some(gw) = self.gateway.take() {
            clean &= gw.app.shutdown().await;
        }
        while let Some((_, a)) = self.agents.pop() {
            clean &= a.agent.shutdown().await;
        }
        clean
    }
}

impl TestCa {
    /// The agent config every test agent starts from: node `node` allowed to run `services`,
    /// listeners on port 0, a token file, a short drain. Returns the directory that holds it.
    pub(crate) fn agent_base(
        &self,
        node: &str,
        services: &[String],
    ) -> (AgentConfig, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let token_file = dir.path().join("join.token");
        std::fs::write(&token_file, self.token(node, &names)).expect("token file");
        let cfg = json!({
            "node": node,
            "trust_domain": self.trust_domain,
            "data_dir": dir.path().join("data"),
            "ca": {"address": self.address(), "fingerprint": self.fingerprint(), "join_token_file": token_file},
            "listen": {"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "drain_timeout": "5s",
        });
        (serde_json::from_value(cfg).expect("agent config"), dir)
    }

    /// Starts an agent from a typed config.
    pub(crate) async fn start_agent(&self, cfg: AgentConfig, dir: tempfile::TempDir) -> TestAgent {
        let agent = meshgate_agent::app::Agent::start(cfg)
            .await
            .expect("agent start");
        TestAgent { agent, _dir: dir }
    }
}

/// The Python interpreter of the test virtual environment (grpcio and friends): the env var
/// `MESHGATE_TEST_PYTHON`, else `target/test-venv/bin/python` of the workspace (what `.ci/run`
/// creates). `None` (with the reason printed) when neither exists and CI is not set; under
/// `CI=true` a missing interpreter fails the test instead.
pub(crate) fn venv_python() -> Option<PathBuf> {
    let path = match std::env::var_os("MESHGATE_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python"),
    };
    let ok = std::process::Command::new(&path)
        .args(["-c", "import grpc, grpc_health.v1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(path);
    }
    let reason = format!(
        "no Python with grpcio at {} (set MESHGATE_TEST_PYTHON, or create the venv as .ci/run does: python3 -m venv target/test-venv && target/test-venv/bin/pip install -r tests/fixtures/python/requirements.txt)",
        path.display()
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

/// A plain `python3` (no packages needed), for `http.server`-based backends; `None` with the
/// reason printed outside CI, a failure under `CI=true`.
pub(crate) fn system_python() -> Option<PathBuf> {
    for p in ["python3"] {
        if std::process::Command::new(p)
            .args(["-c", "import http.server"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(PathBuf::from(p));
        }
    }
    let reason = "no python3 on PATH (Debian: apt-get install python3)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

/// The test fixtures directory (`tests/fixtures`).
pub(crate) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A child process started by a test: killed when dropped.
pub(crate) struct ChildProc {
    pub(crate) child: tokio::process::Child,
    /// What it printed on stdout before it said it was ready.
    pub(crate) banner: Vec<String>,
}

impl ChildProc {
    /// Spawns `cmd` and reads stdout lines until one contains `ready_prefix` (at most 30 s).
    pub(crate) async fn spawn(mut cmd: tokio::process::Command, ready_prefix: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        cmd.stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn child process");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                // libtest may print "test NAME ... " in front of the line
                if let Some(at) = l.find(ready_prefix) {
                    banner.push(l[at..].to_owned());
                    return true;
                }
                banner.push(l);
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "child process never printed {ready_prefix:?}; it printed {banner:?}"
        );
        // keep draining stdout so the child never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, banner }
    }

    /// The value of `key=` in the ready line.
    pub(crate) fn field(&self, key: &str) -> String {
        let line = self.banner.last().expect("ready line");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= not in {line:?}"))
            .to_owned()
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("child still running")
    }
}

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A gateway in its own process (this test binary run again as [`gateway_process`]), so its
/// memory can be measured apart from the clients, backends and other tests of this process.
pub(crate) struct GatewayProcess {
    proc: ChildProc,
    _dir: tempfile::TempDir,
    /// Plain HTTP listener.
    pub(crate) http: SocketAddr,
    /// Admin API.
    pub(crate) admin: SocketAddr,
}

impl Mesh {
    /// Starts the gateway of `spec` in a child process.
    pub(crate) async fn start_gateway_process(&self, spec: GatewaySpec) -> GatewayProcess {
        let (cfg, dir, _) = self.gateway_config(spec);
        let file = dir.path().join("gateway.json");
        std::fs::write(&file, serde_json::to_vec(&cfg).expect("config json")).expect("write");
        let mut cmd = tokio::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "--exact",
            "mesh::gateway_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MESHGATE_E2E_GATEWAY_CONFIG", &file)
        .env_remove("RUST_LOG");
        let proc = ChildProc::spawn(cmd, "GATEWAY READY").await;
        let http = proc.field("http").parse().expect("http addr");
        let admin = proc.field("admin").parse().expect("admin addr");
        GatewayProcess {
            proc,
            _dir: dir,
            http,
            admin,
        }
    }
}

impl GatewayProcess {
    /// (current, peak) resident memory of the gateway process, KiB.
    pub(crate) fn rss_kib(&self) -> (u64, u64) {
        rss_kib(self.proc.pid())
    }

    /// One metric sample from the gateway's /metrics (0 when absent).
    pub(crate) async fn metric(&self, series: &str) -> f64 {
        crate::harness::metric_at(self.admin, series).await
    }
}

/// Not a test: the gateway half of [`Mesh::start_gateway_process`]. Run by the memory tests as
/// a child process with `MESHGATE_E2E_GATEWAY_CONFIG` naming its config; serves until its stdin
/// closes.
#[test]
#[ignore = "helper: started as a child process by the memory tests"]
fn gateway_process() {
    let Some(file) = std::env::var_os("MESHGATE_E2E_GATEWAY_CONFIG") else {
        panic!("run by Mesh::start_gateway_process with MESHGATE_E2E_GATEWAY_CONFIG set");
    };
    crate::harness::init();
    let cfg: GatewayConfig =
        serde_json::from_slice(&std::fs::read(file).expect("config file")).expect("config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let app = meshgate_gateway::app::GatewayApp::start(cfg)
            .await
            .expect("gateway start");
        println!(
            "GATEWAY READY http={} admin={}",
            app.http_addr().expect("http listener"),
            app.admin_addr()
        );
        // serve until the parent closes our stdin (or dies)
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await;
        app.shutdown().await;
    });
}

/// A client TLS config for the mesh inbound port with the SVID of `service` held by
/// `identity` (whose data dir is `dir`): a caller with a valid mesh identity, ALPN h2.
pub(crate) async fn mesh_client_config(
    identity: &meshgate_agent::identity::IdentityManager,
    dir: &tempfile::TempDir,
    service: &str,
) -> rustls::ClientConfig {
    use meshgate_ca::{
        tls::CertSlot,
        verify::{ExpectedPeer, SpiffeServerVerifier, tls13_client_config},
    };
    let svid = identity
        .workload("default", service)
        .await
        .expect("workload certificate");
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join(format!("data/svids/default/{service}.key")))
            .expect("workload key"),
    )
    .expect("key");
    let slot = CertSlot::new();
    slot.set(svid.chain(), key.serialize_der()).expect("slot");
    let mut cfg = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(SpiffeServerVerifier::new(
            identity.bundle(),
            ExpectedPeer::AnyNode,
        )))
        .with_client_cert_resolver(slot);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}
