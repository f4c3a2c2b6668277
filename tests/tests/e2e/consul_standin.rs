//! An in-process stand-in for HashiCorp Consul's HTTP API, for the end-to-end tests of
//! meshgate's Consul client. Test code only, never a product feature.
//!
//! It serves plain HTTP/1.1 on loopback and follows the documented behaviour of real Consul
//! (see `shared/consul-api/README.md`) for these endpoints:
//!
//! - `GET /v1/health/service/:name` (params `passing`, `index`, `wait`, `stale`,
//!   `consistent`, `filter` of the form `Node.Node == "<node>"`; `dc`, `ns`, `partition`,
//!   `tag`, ... are ignored);
//! - `GET /v1/catalog/service/:name` (same rules, no health data, `filter` of the form
//!   `Node == "<node>"`);
//! - `PUT /v1/agent/service/register` and `PUT /v1/agent/service/deregister/:id`.
//!
//! Blocking queries: with `?index=N` (N > 0) and a current index <= N, a read waits until any
//! write changes the index (even a write to another service, as real Consul may return without
//! a change) or until `wait` plus a random jitter of up to `wait/16` passes, then answers `200`
//! with the current body. The index is one global raft index, starting at 10 and bumped by
//! every write; `X-Consul-Index` is never 0 (raised to 1). Service `TaggedAddresses` use the
//! wire casing `Address`/`Port` and are left out when the service has no address, as Consul
//! does (`omitempty`); clients must then use the node address.
//!
//! ACL (off until [`ConsulStandin::require_token`] or [`ConsulStandin::deny_write`]) is checked
//! first on every request, before routing. Error bodies are plain text, as Consul sends them.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};

/// The raft index of a fresh stand-in.
const FIRST_INDEX: u64 = 10;
/// Consul's `default_query_time`, used when `wait` is missing or <= 0.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul's `max_query_time`: longer waits are clamped to it.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// The node of registered services unless their Meta has [`NODE_META_KEY`].
const DEFAULT_NODE: &str = "standin-node";
/// Service Meta key naming the registering agent's node.
const NODE_META_KEY: &str = "meshgate-node";
/// The node address of registered services that have no `Address`.
const DEFAULT_NODE_ADDRESS: &str = "127.0.0.1";
const CHECK_STATUSES: [&str; 3] = ["passing", "warning", "critical"];
const ANONYMOUS_DENIED: &str = "Permission denied: anonymous token lacks permission 'service:read'. \
     The anonymous token is used implicitly when a request does not specify a token.";
const ACL_NOT_FOUND: &str = "ACL not found";
const DENIED_ACCESSOR: &str = "00000000-0000-0000-0000-000000000001";
const INVALID_PATH: &str = "Invalid URL path: not a recognized HTTP API endpoint\n";
const FILTER_ERROR: &str = "Failed to create boolean expression evaluator:";

type Resp = Response<Full<Bytes>>;

/// One service instance in the catalog (one node, one service, at most one service check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Instance {
    pub(crate) node: String,
    pub(crate) node_address: String,
    /// Unique across the whole stand-in (it is also the deregister key).
    pub(crate) service_id: String,
    pub(crate) service: String,
    /// May be `""`, meaning "use the node address".
    pub(crate) address: String,
    pub(crate) port: u16,
    pub(crate) tags: Vec<String>,
    pub(crate) meta: BTreeMap<String, String>,
    /// The service check's status: `passing`, `warning` or `critical`; `""` means the instance
    /// has no service check, only the node's `serfHealth` (so it counts as passing).
    pub(crate) status: String,
}

impl Instance {
    /// A passing instance on node `standin-node` (127.0.0.1), without a service address, tags
    /// or meta. Adjust with struct update syntax: `Instance { tags, ..Instance::new(..) }`.
    pub(crate) fn new(service: &str, service_id: &str, port: u16) -> Self {
        Self {
            node: DEFAULT_NODE.into(),
            node_address: DEFAULT_NODE_ADDRESS.into(),
            service_id: service_id.into(),
            service: service.into(),
            address: String::new(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            status: "passing".into(),
        }
    }
}

/// One logged `GET` of a health or catalog endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestLog {
    /// The request path as sent (not percent-decoded).
    pub(crate) path: String,
    /// The raw query string, `""` when there is none.
    pub(crate) query: String,
    /// The `X-Consul-Token` header, if sent.
    pub(crate) token: Option<String>,
}

/// The stand-in's data (catalog, index, ACL settings, logs), handed from
/// [`ConsulStandin::stop`] to [`ConsulStandin::start_with`].
pub(crate) struct State(Arc<Shared>);

impl State {
    fn new() -> Self {
        let (changes, _) = watch::channel(FIRST_INDEX);
        Self(Arc::new(Shared {
            inner: Mutex::new(Inner {
                index: FIRST_INDEX,
                ..Inner::default()
            }),
            changes,
        }))
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// Sent on every index change; blocked queries wait on it.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bumps the index and wakes blocked queries; call with the lock held.
    fn bump(&self, inner: &mut Inner) -> u64 {
        inner.index = inner.index.saturating_add(1);
        self.changes.send_replace(inner.index);
        inner.index
    }
}

#[derive(Default)]
struct Inner {
    index: u64,
    /// By service ID.
    entries: BTreeMap<String, Entry>,
    token: Option<String>,
    deny_write: BTreeSet<String>,
    registrations: Vec<Value>,
    deregistrations: Vec<String>,
    requests: Vec<RequestLog>,
}

impl Inner {
    fn upsert(&mut self, inst: Instance, index: u64) {
        let create_index = self
            .entries
            .get(&inst.service_id)
            .map_or(index, |e| e.create_index);
        let entry = Entry {
            inst,
            create_index,
            modify_index: index,
            check_index: index,
        };
        self.entries.insert(entry.inst.service_id.clone(), entry);
    }
}

struct Entry {
    inst: Instance,
    create_index: u64,
    modify_index: u64,
    check_index: u64,
}

/// A running stand-in. Dropping it stops the server too (without waiting).
pub(crate) struct ConsulStandin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ConsulStandin {
    /// Serves fresh data on `127.0.0.1:0`.
    pub(crate) async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves fresh data on `addr` (e.g. the address of a stopped stand-in).
    pub(crate) async fn start_on(addr: SocketAddr) -> Self {
        Self::start_with(addr, State::new()).await
    }

    /// Serves `state` (from [`ConsulStandin::stop`]) on `addr`.
    pub(crate) async fn start_with(addr: SocketAddr, state: State) -> Self {
        let listener = bind(addr).await;
        let addr = listener
            .local_addr()
            .expect("consul stand-in local address");
        let (shutdown, stop_rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, state.0.clone(), stop_rx));
        Self {
            addr,
            shared: state.0,
            shutdown,
            task,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every open connection (blocked queries included, so their
    /// clients see errors), then returns the data for [`ConsulStandin::start_with`].
    pub(crate) async fn stop(self) -> State {
        let Self {
            shared,
            shutdown,
            task,
            ..
        } = self;
        // An Err means the server task is gone already; awaiting it below says why.
        let _ = shutdown.send(());
        task.await.expect("consul stand-in server task");
        State(shared)
    }

    /// From now on every request needs this token (`X-Consul-Token`, `Authorization: Bearer`
    /// or `?token=`): none gives 403 with the anonymous-token denial, another gives 403
    /// `ACL not found`.
    pub(crate) fn require_token(&self, token: &str) {
        self.shared.lock().token = Some(token.into());
    }

    /// Registering or deregistering this service name gives 403 `Permission denied: ...
    /// lacks permission 'service:write' on "<service>"`.
    pub(crate) fn deny_write(&self, service: &str) {
        self.shared.lock().deny_write.insert(service.into());
    }

    /// Adds or replaces (same `service_id`) an instance; bumps the index.
    pub(crate) fn add_instance(&self, i: Instance) {
        assert!(
            i.status.is_empty() || CHECK_STATUSES.contains(&i.status.as_str()),
            "bad check status {:?}",
            i.status
        );
        let mut inner = self.shared.lock();
        let index = self.shared.bump(&mut inner);
        inner.upsert(i, index);
    }

    /// Removes an instance and bumps the index; an unknown ID changes nothing.
    pub(crate) fn remove_instance(&self, service_id: &str) {
        let mut inner = self.shared.lock();
        if inner.entries.contains_key(service_id) {
            self.shared.bump(&mut inner);
            inner.entries.remove(service_id);
        }
    }

    /// Sets the service check's status (`passing`, `warning`, `critical`) and bumps the
    /// index. Panics on an unknown ID or status.
    pub(crate) fn set_check_status(&self, service_id: &str, status: &str) {
        assert!(
            CHECK_STATUSES.contains(&status),
            "bad check status {status:?}"
        );
        let mut inner = self.shared.lock();
        assert!(
            inner.entries.contains_key(service_id),
            "set_check_status: unknown service ID {service_id:?}"
        );
        let index = self.shared.bump(&mut inner);
        if let Some(entry) = inner.entries.get_mut(service_id) {
            entry.inst.status = status.into();
            entry.check_index = index;
        }
    }

    /// Forces the raft index (it may go down, as after a snapshot restore) and wakes blocked
    /// queries, which then answer with this index.
    pub(crate) fn set_index(&self, index: u64) {
        let mut inner = self.shared.lock();
        inner.index = index;
        self.shared.changes.send_replace(index);
    }

    /// Every JSON body received by `PUT /v1/agent/service/register`, in order, including the
    /// rejected ones (400, or 403 from [`ConsulStandin::deny_write`]); not those refused by
    /// [`ConsulStandin::require_token`] or that are not JSON.
    pub(crate) fn registrations(&self) -> Vec<Value> {
        self.shared.lock().registrations.clone()
    }

    /// Every service ID deregistered with success, in order.
    pub(crate) fn deregistrations(&self) -> Vec<String> {
        self.shared.lock().deregistrations.clone()
    }

    /// Every `GET` of the health and catalog endpoints, in order, including refused ones.
    pub(crate) fn requests(&self) -> Vec<RequestLog> {
        self.shared.lock().requests.clone()
    }
}

/// Binds, retrying for a moment in case the port of a just-stopped server is still held.
async fn bind(addr: SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if tries >= 40 => panic!("consul stand-in: bind {addr}: {e}"),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // A stop, or the stand-in was dropped.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let service = service_fn(move |req| handle(shared.clone(), req));
                        // Errors here are the client's business (it went away, sent garbage).
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // e.g. out of file descriptors: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let mut resp = dispatch(&shared, req).await;
    resp.headers_mut().insert(
        "x-consul-default-acl-policy",
        HeaderValue::from_static("allow"),
    );
    Ok(resp)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Health,
    Catalog,
}

enum Endpoint {
    Read(Kind, String),
    Register,
    Deregister(String),
}

impl Endpoint {
    fn of(path: &str) -> Option<Self> {
        if let Some(name) = path.strip_prefix("/v1/health/service/") {
            Some(Self::Read(Kind::Health, percent_decode(name, false)))
        } else if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
            Some(Self::Read(Kind::Catalog, percent_decode(name, false)))
        } else if path == "/v1/agent/service/register" {
            Some(Self::Register)
        } else {
            path.strip_prefix("/v1/agent/service/deregister/")
                .map(|id| Self::Deregister(percent_decode(id, false)))
        }
    }
}

async fn dispatch(shared: &Shared, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or_default().to_owned();
    let query = Query::parse(&raw_query);
    let endpoint = Endpoint::of(&path);
    if req.method() == Method::GET && matches!(endpoint, Some(Endpoint::Read(..))) {
        let token = header_str(req.headers(), "x-consul-token").map(str::to_owned);
        shared.lock().requests.push(RequestLog {
            path: path.clone(),
            query: raw_query.clone(),
            token,
        });
    }
    let token = request_token(&query, req.headers());
    if let Some(denied) = check_token(&shared.lock(), token.as_deref()) {
        return denied;
    }
    let Some(endpoint) = endpoint else {
        return if path.contains("/v1/") {
            text(StatusCode::NOT_FOUND, INVALID_PATH)
        } else {
            text(StatusCode::NOT_FOUND, "")
        };
    };
    let (expected, allow) = match endpoint {
        Endpoint::Read(..) => (Method::GET, "OPTIONS,GET"),
        Endpoint::Register | Endpoint::Deregister(_) => (Method::PUT, "OPTIONS,PUT"),
    };
    if req.method() != expected {
        let mut resp = if req.method() == Method::OPTIONS {
            text(StatusCode::OK, "")
        } else {
            let msg = format!("method {} not allowed", req.method());
            text(StatusCode::METHOD_NOT_ALLOWED, msg)
        };
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        return resp;
    }
    match endpoint {
        Endpoint::Read(kind, name) => read(shared, kind, &name, &query).await,
        Endpoint::Register => register(shared, req).await,
        Endpoint::Deregister(id) => deregister(shared, &id),
    }
}

/// The request's ACL token, in Consul's order of precedence.
fn request_token(query: &Query, headers: &HeaderMap) -> Option<String> {
    if let Some(token) = query.get("token").filter(|t| !t.is_empty()) {
        return Some(token.to_owned());
    }
    if let Some(token) = header_str(headers, "x-consul-token").filter(|t| !t.is_empty()) {
        return Some(token.to_owned());
    }
    let mut words = header_str(headers, "authorization")?.split_whitespace();
    let scheme = words.next()?;
    let token = words.next()?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.to_owned())
}

fn check_token(inner: &Inner, token: Option<&str>) -> Option<Resp> {
    let required = inner.token.as_deref()?;
    match token {
        None => Some(text(StatusCode::FORBIDDEN, ANONYMOUS_DENIED)),
        Some(token) if token == required => None,
        Some(_) => Some(text(StatusCode::FORBIDDEN, ACL_NOT_FOUND)),
    }
}

fn write_denied(service: &str) -> Resp {
    text(
        StatusCode::FORBIDDEN,
        format!(
            "Permission denied: token with AccessorID '{DENIED_ACCESSOR}' lacks permission \
             'service:write' on \"{service}\""
        ),
    )
}

async fn read(shared: &Shared, kind: Kind, name: &str, query: &Query) -> Resp {
    if name.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing service name");
    }
    let consistency = match (query.has("stale"), query.has("consistent")) {
        (true, true) => {
            return text(
                StatusCode::BAD_REQUEST,
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            );
        }
        (true, false) => "stale",
        (false, true) => "consistent",
        (false, false) => "leader",
    };
    let Ok(wait) = parse_wait(query.get("wait")) else {
        return text(StatusCode::BAD_REQUEST, "Invalid wait time");
    };
    let min_index = match query.get("index").filter(|i| !i.is_empty()) {
        None => 0,
        Some(i) => match i.parse::<u64>() {
            Ok(n) if i.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return text(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let passing = match query.get("passing") {
        _ if kind == Kind::Catalog => false,
        None => false,
        Some("") => true,
        Some(v) => match parse_go_bool(v) {
            Some(b) => b,
            None => return text(StatusCode::BAD_REQUEST, "Invalid value for ?passing"),
        },
    };
    let selector = match kind {
        Kind::Health => "Node.Node",
        Kind::Catalog => "Node",
    };
    let node = match query.get("filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(expr) => match parse_node_filter(expr, selector) {
            Some(node) => Some(node),
            None => {
                let msg = format!(
                    "{FILTER_ERROR} 1:1 (0): the Consul stand-in supports only \
                     `{selector} == \"<node>\"`, not {expr:?}"
                );
                return text(StatusCode::INTERNAL_SERVER_ERROR, msg);
            }
        },
    };

    block(shared, min_index, wait).await;

    let inner = shared.lock();
    let body = render(&inner, kind, name, passing, node.as_deref());
    let index = inner.index.max(1);
    drop(inner);

    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-consul-index", HeaderValue::from(index));
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    headers.insert(
        "x-consul-effective-consistency",
        HeaderValue::from_static(consistency),
    );
    if kind == Kind::Health {
        headers.insert(
            "x-consul-query-backend",
            HeaderValue::from_static("blocking-query"),
        );
    }
    resp
}

/// Waits while the index is <= `min_index` (> 0), until any index change or the timeout.
async fn block(shared: &Shared, min_index: u64, wait: Duration) {
    if min_index == 0 {
        return;
    }
    let mut changes = {
        let inner = shared.lock();
        if inner.index > min_index {
            return;
        }
        // Subscribed under the lock: a write after this point is seen as a change.
        shared.changes.subscribe()
    };
    let jitter_max = wait.as_nanos() / 16;
    let jitter = match jitter_max {
        0 => 0,
        max => u128::from(random_u64()) % max,
    };
    let timeout = wait + Duration::from_nanos(u64::try_from(jitter).unwrap_or(u64::MAX));
    // Err(Elapsed) is the timeout; the sender lives as long as `shared`.
    let _ = tokio::time::timeout(timeout, changes.changed()).await;
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(SystemTime::now())
}

fn render(inner: &Inner, kind: Kind, name: &str, passing: bool, node: Option<&str>) -> Value {
    // A node's indexes (health answers): those of its oldest service.
    let mut node_index: BTreeMap<&str, u64> = BTreeMap::new();
    for e in inner.entries.values() {
        let slot = node_index.entry(&e.inst.node).or_insert(e.create_index);
        *slot = (*slot).min(e.create_index);
    }
    let mut selected: Vec<&Entry> = inner
        .entries
        .values()
        .filter(|e| e.inst.service == name)
        .filter(|e| node.is_none_or(|n| e.inst.node == n))
        .filter(|e| !passing || e.inst.status.is_empty() || e.inst.status == "passing")
        .collect();
    selected.sort_by(|a, b| {
        (&a.inst.node, &a.inst.service_id).cmp(&(&b.inst.node, &b.inst.service_id))
    });
    let rows = selected.into_iter().map(|e| match kind {
        Kind::Health => {
            let ni = node_index.get(e.inst.node.as_str()).copied();
            health_json(e, ni.unwrap_or(e.create_index))
        }
        Kind::Catalog => catalog_json(e),
    });
    Value::Array(rows.collect())
}

fn node_tagged(i: &Instance) -> Value {
    json!({"lan": i.node_address, "wan": i.node_address})
}

/// `{"lan": {"Address", "Port"}}`, or None without a service address (omitted then).
fn service_tagged(i: &Instance) -> Option<Value> {
    (!i.address.is_empty()).then(|| json!({"lan": {"Address": i.address, "Port": i.port}}))
}

fn health_json(e: &Entry, node_index: u64) -> Value {
    let i = &e.inst;
    let mut service = json!({
        "ID": i.service_id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": i.address,
        "Meta": i.meta,
        "Port": i.port,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
        "Proxy": {"MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "Namespace": "default",
        "Partition": "default",
        "PeerName": "",
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let (Some(tagged), Some(obj)) = (service_tagged(i), service.as_object_mut()) {
        obj.insert("TaggedAddresses".into(), tagged);
    }
    let mut checks = Vec::new();
    if !i.status.is_empty() {
        checks.push(json!({
            "Node": i.node,
            "CheckID": format!("service:{}", i.service_id),
            "Name": format!("Service '{}' check", i.service),
            "Status": i.status,
            "Notes": "",
            "Output": "",
            "ServiceID": i.service_id,
            "ServiceName": i.service,
            "ServiceTags": i.tags,
            "Type": "http",
            "Interval": "10s",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "Namespace": "default",
            "Partition": "default",
            "CreateIndex": e.create_index,
            "ModifyIndex": e.check_index,
        }));
    }
    checks.push(json!({
        "Node": i.node,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "Namespace": "default",
        "Partition": "default",
        "CreateIndex": node_index,
        "ModifyIndex": node_index,
    }));
    json!({
        "Node": {
            "ID": node_id(&i.node),
            "Node": i.node,
            "Address": i.node_address,
            "Datacenter": "dc1",
            "TaggedAddresses": node_tagged(i),
            "Meta": {},
            "CreateIndex": node_index,
            "ModifyIndex": node_index,
        },
        "Service": service,
        "Checks": checks,
    })
}

/// A catalog row; its indexes are the service's.
fn catalog_json(e: &Entry) -> Value {
    let i = &e.inst;
    let mut row = json!({
        "ID": node_id(&i.node),
        "Node": i.node,
        "Address": i.node_address,
        "Datacenter": "dc1",
        "TaggedAddresses": node_tagged(i),
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": i.service_id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "ServiceAddress": i.address,
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceMeta": i.meta,
        "ServicePort": i.port,
        "ServiceEnableTagOverride": false,
        "ServiceProxy": {"MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
        "Namespace": "default",
        "Partition": "default",
    });
    if let (Some(tagged), Some(obj)) = (service_tagged(i), row.as_object_mut()) {
        obj.insert("ServiceTaggedAddresses".into(), tagged);
    }
    row
}

/// A stable UUID-shaped node ID derived from the node name.
fn node_id(node: &str) -> String {
    let fnv = |seed: u64| {
        node.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

async fn register(shared: &Shared, req: Request<Incoming>) -> Resp {
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            );
        }
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            );
        }
    };
    shared.lock().registrations.push(body.clone());
    let inst = match instance_from_registration(&body) {
        Ok(inst) => inst,
        Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
    };
    let mut inner = shared.lock();
    if inner.deny_write.contains(&inst.service) {
        return write_denied(&inst.service);
    }
    let index = shared.bump(&mut inner);
    inner.upsert(inst, index);
    text(StatusCode::OK, "")
}

fn deregister(shared: &Shared, id: &str) -> Resp {
    let mut inner = shared.lock();
    let Some(service) = inner.entries.get(id).map(|e| e.inst.service.clone()) else {
        let msg = format!(
            "Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."
        );
        return text(StatusCode::NOT_FOUND, msg);
    };
    if inner.deny_write.contains(&service) {
        return write_denied(&service);
    }
    shared.bump(&mut inner);
    inner.entries.remove(id);
    inner.deregistrations.push(id.into());
    text(StatusCode::OK, "")
}

/// Reads a register body the way the agent does (field names case-insensitive).
fn instance_from_registration(body: &Value) -> Result<Instance, String> {
    let obj = body
        .as_object()
        .ok_or_else(|| decode_error("", "structs.ServiceDefinition"))?;
    let name = opt_str(obj, "Name")?.unwrap_or_default();
    if name.is_empty() {
        return Err("Missing service name".into());
    }
    let service_id = opt_str(obj, "ID")?
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| name.clone());
    let address = opt_str(obj, "Address")?.unwrap_or_default();
    let port = match field(obj, "Port") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| decode_error("Port", "int"))?,
    };
    let tags = match field(obj, "Tags") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|t| t.as_str().map(str::to_owned)).collect())
            .ok_or_else(|| decode_error("Tags", "[]string"))?,
    };
    let meta: BTreeMap<String, String> = match field(obj, "Meta") {
        None => BTreeMap::new(),
        Some(v) => v
            .as_object()
            .and_then(|m| {
                m.iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .ok_or_else(|| decode_error("Meta", "map[string]string"))?,
    };
    // Go's CheckTypes(): `Check` (unless empty) first, then `Checks`.
    let mut checks: Vec<&Map<String, Value>> = Vec::new();
    if let Some(check) = field(obj, "Check") {
        let check = check
            .as_object()
            .ok_or_else(|| decode_error("Check", "structs.CheckType"))?;
        if !check.is_empty() {
            checks.push(check);
        }
    }
    if let Some(list) = field(obj, "Checks") {
        let list = list
            .as_array()
            .ok_or_else(|| decode_error("Checks", "structs.CheckTypes"))?;
        for check in list {
            checks.push(
                check
                    .as_object()
                    .ok_or_else(|| decode_error("Checks", "structs.CheckType"))?,
            );
        }
    }
    let mut status = String::new();
    for (n, check) in checks.iter().enumerate() {
        let given = opt_str(check, "Status")?.unwrap_or_default();
        if !given.is_empty() && !CHECK_STATUSES.contains(&given.as_str()) {
            return Err("Status for checks must 'passing', 'warning', 'critical'".into());
        }
        if n == 0 {
            status = if given.is_empty() {
                "critical".into()
            } else {
                given
            };
        }
    }
    if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err("Invalid service address".into());
    }
    Ok(Instance {
        node: meta
            .get(NODE_META_KEY)
            .cloned()
            .unwrap_or_else(|| DEFAULT_NODE.into()),
        node_address: if address.is_empty() {
            DEFAULT_NODE_ADDRESS.into()
        } else {
            address.clone()
        },
        service_id,
        service: name,
        address,
        port,
        tags,
        meta,
        status,
    })
}

/// A JSON field the way Go decodes it: exact name first, then any case; null is absent.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn opt_str(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    field(obj, name)
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| decode_error(name, "string"))
        })
        .transpose()
}

fn decode_error(field: &str, go_type: &str) -> String {
    format!(
        "Request decode failed: json: cannot unmarshal into Go struct field \
         ServiceDefinition.{field} of type {go_type}"
    )
}

/// `Sel == "value"` (or a raw `value` in backticks), with any spacing; nothing else.
fn parse_node_filter(expr: &str, selector: &str) -> Option<String> {
    let rest = expr.trim().strip_prefix(selector)?.trim_start();
    let value = rest.strip_prefix("==")?.trim();
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|v| !v.contains(['"', '\\']))
        .or_else(|| {
            value
                .strip_prefix('`')
                .and_then(|v| v.strip_suffix('`'))
                .filter(|v| !v.contains('`'))
        })?;
    Some(inner.to_owned())
}

/// Consul's `wait`: missing or <= 0 means 5 minutes; clamped to 10 minutes.
fn parse_wait(wait: Option<&str>) -> Result<Duration, ()> {
    let Some(wait) = wait.filter(|w| !w.is_empty()) else {
        return Ok(DEFAULT_WAIT);
    };
    let nanos = parse_go_duration(wait).ok_or(())?;
    if nanos <= 0.0 {
        return Ok(DEFAULT_WAIT);
    }
    Ok(Duration::from_secs_f64(nanos / 1e9).min(MAX_WAIT))
}

/// Go's `time.ParseDuration`, in nanoseconds: `[-+]` then `<number><unit>` pairs (`1m30s`,
/// `1.5s`, `300000ms`), units ns, us (µs), ms, s, m, h; a bare `0` is allowed.
fn parse_go_duration(s: &str) -> Option<f64> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if !number.bytes().any(|b| b.is_ascii_digit()) || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if total > 9.223_372_036_854_775e18 {
        return None; // Go: invalid duration (overflows int64 nanoseconds)
    }
    Some(if negative { -total } else { total })
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A parsed query string: decoded pairs in order; a bare `key` has the value `""`.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k, true), percent_decode(v, true))
            })
            .collect();
        Self(pairs)
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// The first value, as Go's `Query().Get` does.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'%' => {
                if let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) {
                    out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A plain-text response, as Consul writes errors; an empty body has no content type.
fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let body: String = body.into();
    let empty = body.is_empty();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if !empty {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    resp
}

#[cfg(test)]
mod self_tests {
    use std::time::Instant;

    use tokio::{net::TcpStream, time::timeout};

    use super::*;

    struct Reply {
        status: u16,
        headers: HeaderMap,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> &str {
            header_str(&self.headers, name)
                .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
        }

        fn index(&self) -> u64 {
            self.header("x-consul-index")
                .parse()
                .expect("numeric index")
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("JSON body")
        }

        /// The service IDs of a health or catalog answer, in order.
        fn ids(&self) -> Vec<String> {
            let rows = self.json();
            let rows = rows.as_array().expect("array").clone();
            rows.iter()
                .map(|r| {
                    let id = r.pointer("/Service/ID").or_else(|| r.get("ServiceID"));
                    id.and_then(Value::as_str).expect("service ID").to_owned()
                })
                .collect()
        }
    }

    async fn send(
        addr: SocketAddr,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn get(addr: SocketAddr, target: &str) -> Reply {
        let call = send(addr, Method::GET, target, &[], "");
        timeout(Duration::from_secs(5), call)
            .await
            .expect("GET in time")
            .expect("GET")
    }

    async fn put(addr: SocketAddr, target: &str, body: &str) -> Reply {
        let call = send(addr, Method::PUT, target, &[], body);
        timeout(Duration::from_secs(5), call)
            .await
            .expect("PUT in time")
            .expect("PUT")
    }

    fn web(id: &str, status: &str) -> Instance {
        Instance {
            status: status.into(),
            ..Instance::new("web", id, 8080)
        }
    }

    #[tokio::test]
    async fn health_and_catalog_shapes_and_headers() {
        let consul = ConsulStandin::start().await;
        assert_eq!(consul.url(), format!("http://{}", consul.addr()));
        assert!(consul.url().starts_with("http://127.0.0.1:"));
        consul.add_instance(Instance {
            node: "n1".into(),
            node_address: "10.0.0.100".into(),
            address: "10.0.0.1".into(),
            tags: vec!["v1".into()],
            meta: BTreeMap::from([("k".into(), "v".into())]),
            ..web("web-1", "passing")
        });
        consul.add_instance(web("web-2", "critical"));
        let addr = consul.addr();

        let r = get(addr, "/v1/health/service/web?dc=dc1&ns=default").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.index(), 12);
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("x-consul-knownleader"), "true");
        assert_eq!(r.header("x-consul-lastcontact"), "0");
        assert_eq!(r.header("x-consul-effective-consistency"), "leader");
        assert_eq!(r.header("x-consul-default-acl-policy"), "allow");
        let v = r.json();
        assert_eq!(r.ids(), ["web-1", "web-2"]); // node n1 sorts before standin-node
        let e = &v[0];
        assert_eq!(e["Node"]["Node"], "n1");
        assert_eq!(e["Node"]["Address"], "10.0.0.100");
        assert_eq!(e["Node"]["Datacenter"], "dc1");
        assert_eq!(e["Node"]["TaggedAddresses"]["lan"], "10.0.0.100");
        assert_eq!(e["Node"]["ID"].as_str().expect("node ID").len(), 36);
        assert_eq!(e["Service"]["Service"], "web");
        assert_eq!(e["Service"]["Address"], "10.0.0.1");
        assert_eq!(
            e["Service"]["TaggedAddresses"]["lan"],
            json!({"Address": "10.0.0.1", "Port": 8080})
        );
        assert_eq!(e["Service"]["Port"], 8080);
        assert_eq!(e["Service"]["Tags"], json!(["v1"]));
        assert_eq!(e["Service"]["Meta"], json!({"k": "v"}));
        assert_eq!(e["Service"]["Weights"], json!({"Passing": 1, "Warning": 1}));
        assert_eq!(e["Service"]["Namespace"], "default");
        assert_eq!(e["Checks"][0]["CheckID"], "service:web-1");
        assert_eq!(e["Checks"][0]["Name"], "Service 'web' check");
        assert_eq!(e["Checks"][0]["ServiceID"], "web-1");
        assert_eq!(e["Checks"][0]["Status"], "passing");
        assert_eq!(e["Checks"][1]["CheckID"], "serfHealth");
        assert_eq!(e["Checks"][1]["ServiceID"], "");
        // No service address: no service TaggedAddresses, like Consul's omitempty.
        assert_eq!(v[1]["Service"]["Address"], "");
        assert!(v[1]["Service"].get("TaggedAddresses").is_none());
        assert_eq!(v[1]["Checks"][0]["Status"], "critical");

        let r = get(addr, "/v1/health/service/web?stale").await;
        assert_eq!(r.header("x-consul-effective-consistency"), "stale");
        let r = get(addr, "/v1/health/service/nope").await;
        assert_eq!((r.status, r.body.as_str(), r.index()), (200, "[]", 12));

        let r = get(addr, "/v1/catalog/service/web").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.index(), 12);
        assert_eq!(r.ids(), ["web-1", "web-2"]); // unhealthy ones included
        let c = &r.json()[0];
        for key in [
            "ID",
            "Node",
            "Address",
            "Datacenter",
            "TaggedAddresses",
            "NodeMeta",
            "ServiceID",
            "ServiceName",
            "ServiceTags",
            "ServiceAddress",
            "ServiceTaggedAddresses",
            "ServiceWeights",
            "ServiceMeta",
            "ServicePort",
            "ServiceEnableTagOverride",
            "CreateIndex",
            "ModifyIndex",
            "Namespace",
        ] {
            assert!(c.get(key).is_some(), "catalog row lacks {key}: {c}");
        }
        assert_eq!(c["Node"], "n1");
        assert_eq!(c["ServiceAddress"], "10.0.0.1");
        assert_eq!(c["ServiceTaggedAddresses"]["lan"]["Port"], 8080);
        assert_eq!(c["CreateIndex"], 11);

        // filter: only `Node == "<name>"`
        let r = get(
            addr,
            "/v1/catalog/service/web?filter=Node%20%3D%3D%20%22n1%22",
        )
        .await;
        assert_eq!(r.ids(), ["web-1"]);
        let r = get(
            addr,
            "/v1/catalog/service/web?filter=Node+==+%60standin-node%60",
        )
        .await;
        assert_eq!(r.ids(), ["web-2"]);
        let r = get(addr, "/v1/health/service/web?filter=Node.Node==%22n1%22").await;
        assert_eq!(r.ids(), ["web-1"]);
        let r = get(
            addr,
            "/v1/catalog/service/web?filter=NodeMeta.os%20%3D%3D%20%22x%22",
        )
        .await;
        assert_eq!(r.status, 500);
        assert!(r.body.starts_with(FILTER_ERROR), "{}", r.body);

        let log = consul.requests();
        assert_eq!(log.len(), 8);
        assert_eq!(
            log[0],
            RequestLog {
                path: "/v1/health/service/web".into(),
                query: "dc=dc1&ns=default".into(),
                token: None,
            }
        );
    }

    #[tokio::test]
    async fn blocking_query_times_out_with_the_same_index() {
        let consul = ConsulStandin::start().await;
        consul.add_instance(web("web-1", "passing"));
        let addr = consul.addr();
        let first = get(addr, "/v1/health/service/web").await;
        let index = first.index();
        assert_eq!(index, 11);

        let started = Instant::now();
        let r = get(
            addr,
            &format!("/v1/health/service/web?index={index}&wait=1s"),
        )
        .await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1000),
            "returned after {took:?}"
        );
        assert!(took < Duration::from_secs(3), "returned after {took:?}");
        assert_eq!((r.status, r.index()), (200, index));
        assert_eq!(r.body, first.body);

        // An index behind the current one answers at once.
        let started = Instant::now();
        let r = get(addr, "/v1/catalog/service/web?index=5&wait=1s").await;
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(r.index(), 11);
    }

    #[tokio::test]
    async fn blocking_query_wakes_on_a_change() {
        let consul = ConsulStandin::start().await;
        consul.add_instance(web("web-1", "passing"));
        let addr = consul.addr();
        let index = get(addr, "/v1/health/service/web").await.index();

        let started = Instant::now();
        let health_target = format!("/v1/health/service/web?index={index}&wait=5s");
        let health = tokio::spawn(async move { get(addr, &health_target).await });
        let catalog_target = format!("/v1/catalog/service/web?wait=5s&index={index}");
        let catalog = tokio::spawn(async move { get(addr, &catalog_target).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        consul.add_instance(web("web-2", "passing"));
        for blocked in [health, catalog] {
            let r = timeout(Duration::from_secs(3), blocked)
                .await
                .expect("woken in time")
                .expect("query task");
            assert!(r.index() > index);
            assert_eq!(r.ids(), ["web-1", "web-2"]);
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "returned after {took:?}"
        );
        assert!(took < Duration::from_secs(3), "returned after {took:?}");

        // Removing an instance wakes too.
        let index = get(addr, "/v1/health/service/web").await.index();
        let target = format!("/v1/health/service/web?index={index}&wait=5s");
        let blocked = tokio::spawn(async move { get(addr, &target).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        consul.remove_instance("web-1");
        let r = timeout(Duration::from_secs(3), blocked)
            .await
            .expect("woken in time")
            .expect("query task");
        assert_eq!((r.index(), r.ids()), (index + 1, vec!["web-2".to_owned()]));
    }

    #[tokio::test]
    async fn passing_filter() {
        let consul = ConsulStandin::start().await;
        consul.add_instance(web("web-1", "passing"));
        consul.add_instance(web("web-2", "warning"));
        consul.add_instance(web("web-3", "critical"));
        consul.add_instance(web("web-4", "")); // serfHealth only
        let addr = consul.addr();
        for q in ["passing", "passing=1", "passing=true", "passing=T"] {
            let r = get(addr, &format!("/v1/health/service/web?{q}")).await;
            assert_eq!(r.ids(), ["web-1", "web-4"], "{q}");
        }
        let r = get(addr, "/v1/health/service/web?passing").await;
        assert_eq!(r.json()[1]["Checks"].as_array().expect("checks").len(), 1);
        for q in ["", "?passing=false", "?passing=0"] {
            let r = get(addr, &format!("/v1/health/service/web{q}")).await;
            assert_eq!(r.ids(), ["web-1", "web-2", "web-3", "web-4"], "{q}");
        }
        let r = get(addr, "/v1/health/service/web?passing=yes").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (400, "Invalid value for ?passing")
        );

        consul.set_check_status("web-2", "passing");
        consul.set_check_status("web-1", "critical");
        let r = get(addr, "/v1/health/service/web?passing=1").await;
        assert_eq!(r.ids(), ["web-2", "web-4"]);
        assert_eq!(r.index(), 16);
        let r = get(addr, "/v1/catalog/service/web?passing=1").await;
        assert_eq!(r.ids().len(), 4); // the catalog has no health filter
    }

    #[tokio::test]
    async fn index_is_never_zero_and_may_go_down() {
        let consul = ConsulStandin::start().await;
        let addr = consul.addr();
        consul.set_index(0);
        assert_eq!(get(addr, "/v1/health/service/web").await.index(), 1);
        assert_eq!(get(addr, "/v1/catalog/service/web").await.index(), 1);

        consul.set_index(100);
        assert_eq!(get(addr, "/v1/health/service/web").await.index(), 100);
        // A query blocked on 100 wakes when the index is reset lower.
        let blocked =
            tokio::spawn(
                async move { get(addr, "/v1/health/service/web?index=100&wait=5s").await },
            );
        tokio::time::sleep(Duration::from_millis(100)).await;
        consul.set_index(7);
        let r = timeout(Duration::from_secs(3), blocked)
            .await
            .expect("woken in time")
            .expect("query task");
        assert_eq!(r.index(), 7);
        consul.add_instance(web("web-1", "passing"));
        assert_eq!(get(addr, "/v1/health/service/web").await.index(), 8);
    }

    #[tokio::test]
    async fn wait_and_index_parameters() {
        let ms = |n: f64| Some(n * 1e6);
        assert_eq!(parse_go_duration("500ms"), ms(500.0));
        assert_eq!(parse_go_duration("5s"), ms(5000.0));
        assert_eq!(parse_go_duration("5m"), ms(300_000.0));
        assert_eq!(parse_go_duration("1h"), ms(3_600_000.0));
        assert_eq!(parse_go_duration("1.5s"), ms(1500.0));
        assert_eq!(parse_go_duration("1m30s"), ms(90_000.0));
        assert_eq!(parse_go_duration("300000ms"), ms(300_000.0));
        assert_eq!(parse_go_duration("0"), Some(0.0));
        assert_eq!(parse_go_duration("-1s"), ms(-1000.0));
        for bad in ["", "5", "s", "5x", "1..5s", "5 s", "-"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_wait(None), Ok(DEFAULT_WAIT));
        assert_eq!(parse_wait(Some("0s")), Ok(DEFAULT_WAIT));
        assert_eq!(parse_wait(Some("-5s")), Ok(DEFAULT_WAIT));
        assert_eq!(parse_wait(Some("20m")), Ok(MAX_WAIT));
        assert_eq!(parse_wait(Some("500ms")), Ok(Duration::from_millis(500)));
        assert_eq!(parse_wait(Some("5")), Err(()));

        let consul = ConsulStandin::start().await;
        let addr = consul.addr();
        for (q, msg) in [
            ("wait=abc", "Invalid wait time"),
            ("wait=5", "Invalid wait time"),
            ("index=abc", "Invalid index"),
            ("index=-1", "Invalid index"),
            ("index=+1", "Invalid index"),
            (
                "stale&consistent",
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ),
        ] {
            let r = get(addr, &format!("/v1/health/service/web?{q}")).await;
            assert_eq!((r.status, r.body.as_str()), (400, msg), "{q}");
        }
        let r = get(addr, "/v1/health/service/web?index=0&wait=5m").await;
        assert_eq!((r.status, r.index()), (200, 10)); // index 0: no blocking
    }

    const REDIS: &str = r#"{
        "ID": "redis1", "Name": "redis", "Tags": ["primary", "v1"], "Address": "127.0.0.2",
        "Port": 8000, "Meta": {"redis_version": "4.0"}, "EnableTagOverride": false,
        "Check": {"DeregisterCriticalServiceAfter": "90m", "Args": ["/check.py"],
                  "Interval": "10s", "Timeout": "5s"},
        "Weights": {"Passing": 10, "Warning": 1}
    }"#;

    #[tokio::test]
    async fn register_and_deregister_round_trip() {
        let consul = ConsulStandin::start().await;
        let addr = consul.addr();
        let r = put(
            addr,
            "/v1/agent/service/register?replace-existing-checks",
            REDIS,
        )
        .await;
        assert_eq!((r.status, r.body.as_str()), (200, ""));
        assert_eq!(
            consul.registrations(),
            [serde_json::from_str::<Value>(REDIS).expect("JSON")]
        );
        let r = get(addr, "/v1/health/service/redis").await;
        assert_eq!(r.index(), 11);
        let e = &r.json()[0];
        assert_eq!(e["Node"]["Node"], "standin-node");
        assert_eq!(e["Node"]["Address"], "127.0.0.2");
        assert_eq!(e["Service"]["ID"], "redis1");
        assert_eq!(e["Service"]["Address"], "127.0.0.2");
        assert_eq!(e["Service"]["Port"], 8000);
        assert_eq!(e["Service"]["Tags"], json!(["primary", "v1"]));
        assert_eq!(e["Service"]["Meta"], json!({"redis_version": "4.0"}));
        assert_eq!(e["Checks"][0]["Status"], "critical"); // Consul's initial status
        assert_eq!(
            get(addr, "/v1/health/service/redis?passing").await.body,
            "[]"
        );

        // No checks at all: serfHealth only, so passing. ID defaults to Name.
        let body = r#"{"name": "web", "Port": 80, "Meta": {"meshgate-node": "node-a"}}"#;
        assert_eq!(
            put(addr, "/v1/agent/service/register", body).await.status,
            200
        );
        let r = get(addr, "/v1/health/service/web?passing").await;
        let e = &r.json()[0];
        assert_eq!(e["Service"]["ID"], "web");
        assert_eq!(e["Node"]["Node"], "node-a");
        assert_eq!(e["Node"]["Address"], "127.0.0.1");
        assert_eq!(e["Checks"].as_array().expect("checks").len(), 1);
        // Re-registering the same ID replaces it; the first check's Status is used.
        let body = r#"{"Name": "web", "Port": 81, "Checks": [
            {"TTL": "30s", "Status": "warning"}, {"TCP": "x:1", "Interval": "5s"}]}"#;
        assert_eq!(
            put(addr, "/v1/agent/service/register", body).await.status,
            200
        );
        let r = get(addr, "/v1/catalog/service/web").await;
        assert_eq!((r.ids(), r.index()), (vec!["web".to_owned()], 13));
        assert_eq!(r.json()[0]["ServicePort"], 81);
        assert_eq!(r.json()[0]["CreateIndex"], 12);
        assert_eq!(r.json()[0]["ModifyIndex"], 13);
        let r = get(addr, "/v1/health/service/web").await;
        assert_eq!(r.json()[0]["Checks"][0]["Status"], "warning");

        for (body, msg) in [
            (r#"{"Port": 1}"#, "Missing service name"),
            (
                r#"{"Name": "x", "Check": {"TTL": "5s", "Status": "ok"}}"#,
                "Status for checks must 'passing', 'warning', 'critical'",
            ),
            (
                r#"{"Name": "x", "Address": "0.0.0.0"}"#,
                "Invalid service address",
            ),
        ] {
            let r = put(addr, "/v1/agent/service/register", body).await;
            assert_eq!((r.status, r.body.as_str()), (400, msg));
        }
        let r = put(addr, "/v1/agent/service/register", "{nope").await;
        assert_eq!(r.status, 400);
        assert!(r.body.starts_with("Request decode failed: "), "{}", r.body);
        let r = put(
            addr,
            "/v1/agent/service/register",
            r#"{"Name": "x", "Port": "80"}"#,
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(r.body.starts_with("Request decode failed: "), "{}", r.body);
        assert_eq!(consul.registrations().len(), 7);

        let r = put(addr, "/v1/agent/service/deregister/redis1", "").await;
        assert_eq!((r.status, r.body.as_str()), (200, ""));
        assert_eq!(consul.deregistrations(), ["redis1"]);
        let r = get(addr, "/v1/health/service/redis").await;
        assert_eq!((r.body.as_str(), r.index()), ("[]", 14));
        let r = put(addr, "/v1/agent/service/deregister/redis1", "").await;
        assert_eq!(r.status, 404);
        assert_eq!(
            r.body,
            "Unknown service ID \"redis1\". Ensure that the service ID is passed, not the service name."
        );
        assert_eq!(consul.deregistrations(), ["redis1"]);
    }

    #[tokio::test]
    async fn acl_errors() {
        let consul = ConsulStandin::start().await;
        let addr = consul.addr();
        consul.add_instance(web("web-1", "passing"));
        consul.require_token("s3cret");
        let target = "/v1/health/service/web";
        let with = |headers: &'static [(&'static str, &'static str)], target: &'static str| {
            send(addr, Method::GET, target, headers, "")
        };
        let r = with(&[], target).await.expect("GET");
        assert_eq!((r.status, r.body.as_str()), (403, ANONYMOUS_DENIED));
        assert!(
            r.body
                .contains("lacks permission 'service:read'. The anonymous token")
        );
        assert_eq!(r.header("x-consul-default-acl-policy"), "allow");
        let r = with(&[("X-Consul-Token", "wrong")], target)
            .await
            .expect("GET");
        assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));
        let r = with(&[("X-Consul-Token", "s3cret")], target)
            .await
            .expect("GET");
        assert_eq!((r.status, r.ids()), (200, vec!["web-1".to_owned()]));
        let r = with(&[("Authorization", "Bearer s3cret")], target)
            .await
            .expect("GET");
        assert_eq!(r.status, 200);
        let r = with(&[("Authorization", "Bearer nope")], target)
            .await
            .expect("GET");
        assert_eq!(r.status, 403);
        let r = with(&[], "/v1/catalog/service/web?token=s3cret")
            .await
            .expect("GET");
        assert_eq!(r.status, 200);
        // ACL first: even before routing and body validation.
        assert_eq!(with(&[], "/v1/nope").await.expect("GET").status, 403);
        let r = put(addr, "/v1/agent/service/register", "{nope").await;
        assert_eq!((r.status, r.body.as_str()), (403, ANONYMOUS_DENIED));
        assert!(consul.registrations().is_empty());
        let tokens: Vec<_> = consul.requests().into_iter().map(|l| l.token).collect();
        let s = |t: &str| Some(t.to_owned());
        assert_eq!(tokens, [None, s("wrong"), s("s3cret"), None, None, None]);

        consul.deny_write("db");
        consul.add_instance(Instance::new("db", "db-1", 5432));
        let token = [("X-Consul-Token", "s3cret")];
        let denied = "Permission denied: token with AccessorID \
                      '00000000-0000-0000-0000-000000000001' lacks permission 'service:write' on \"db\"";
        let call = |target: &'static str, body: &'static str| {
            send(addr, Method::PUT, target, &token, body)
        };
        let r = call("/v1/agent/service/register", r#"{"Name": "db"}"#)
            .await
            .expect("PUT");
        assert_eq!((r.status, r.body.as_str()), (403, denied));
        let r = call("/v1/agent/service/deregister/db-1", "")
            .await
            .expect("PUT");
        assert_eq!((r.status, r.body.as_str()), (403, denied));
        let r = call("/v1/agent/service/deregister/db-9", "")
            .await
            .expect("PUT");
        assert_eq!(r.status, 404);
        let r = call("/v1/agent/service/register", r#"{"Name": "api"}"#)
            .await
            .expect("PUT");
        assert_eq!(r.status, 200);
        assert_eq!(consul.registrations().len(), 2);
        assert!(consul.deregistrations().is_empty());
    }

    #[tokio::test]
    async fn method_and_path_errors() {
        let consul = ConsulStandin::start().await;
        let addr = consul.addr();
        for (method, target, allow) in [
            (Method::POST, "/v1/health/service/web", "OPTIONS,GET"),
            (Method::PUT, "/v1/catalog/service/web", "OPTIONS,GET"),
            (Method::GET, "/v1/agent/service/register", "OPTIONS,PUT"),
            (
                Method::DELETE,
                "/v1/agent/service/deregister/x",
                "OPTIONS,PUT",
            ),
        ] {
            let r = send(addr, method.clone(), target, &[], "")
                .await
                .expect("call");
            assert_eq!(r.status, 405, "{method} {target}");
            assert_eq!(r.body, format!("method {method} not allowed"));
            assert_eq!(r.header("allow"), allow);
            assert_eq!(r.header("x-consul-default-acl-policy"), "allow");
        }
        let r = send(addr, Method::OPTIONS, "/v1/health/service/web", &[], "")
            .await
            .expect("OPTIONS");
        assert_eq!((r.status, r.header("allow")), (200, "OPTIONS,GET"));
        for target in [
            "/v1/nope",
            "/v1/health/services",
            "/v1/agent/service/register/x",
        ] {
            let r = get(addr, target).await;
            assert_eq!((r.status, r.body.as_str()), (404, INVALID_PATH), "{target}");
            assert_eq!(r.header("x-consul-default-acl-policy"), "allow");
        }
        let r = get(addr, "/v1/health/service/").await;
        assert_eq!((r.status, r.body.as_str()), (400, "Missing service name"));
    }

    #[tokio::test]
    async fn stop_drops_connections_and_restart_keeps_state() {
        let consul = ConsulStandin::start().await;
        consul.add_instance(web("web-1", "passing"));
        let addr = consul.addr();
        let index = get(addr, "/v1/health/service/web").await.index();
        let target = format!("/v1/health/service/web?index={index}&wait=5s");
        let blocked = tokio::spawn(async move { send(addr, Method::GET, &target, &[], "").await });
        tokio::time::sleep(Duration::from_millis(100)).await;

        let state = timeout(Duration::from_secs(2), consul.stop())
            .await
            .expect("stopped in time");
        let outcome = timeout(Duration::from_secs(2), blocked)
            .await
            .expect("blocked query ended in time")
            .expect("query task");
        assert!(outcome.is_err(), "a blocked query must fail on stop");
        let refused = send(addr, Method::GET, "/v1/health/service/web", &[], "").await;
        assert!(refused.is_err(), "the listener must be closed");

        let consul = ConsulStandin::start_with(addr, state).await;
        assert_eq!(consul.addr(), addr);
        let r = get(addr, "/v1/health/service/web").await;
        assert_eq!((r.ids(), r.index()), (vec!["web-1".to_owned()], index));

        let _ = consul.stop().await;
        let consul = ConsulStandin::start_on(addr).await;
        let r = get(consul.addr(), "/v1/health/service/web").await;
        assert_eq!((r.body.as_str(), r.index()), ("[]", FIRST_INDEX));
    }
}
