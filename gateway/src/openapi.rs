//! OpenAPI 3.1 from the gateway's point of view: the route table (paths, methods, template
//! parameters), the transcoded routes' proto descriptors (one operation per `google.api.http`
//! binding, with parameters, request and response schemas from the proto types), the routes'
//! JSON Schemas for request bodies, and security schemes from the routes' `auth`.
//! `meshgate openapi --config gateway.yaml` prints it; a route with `backend: {openapi: {}}`
//! serves it. Pure, apart from [`from_config`] which compiles the protos and reads schemas.
//!
//! What OpenAPI cannot say is kept in `x-meshgate-*` extensions: a `prefix` route becomes the
//! prefix path with `x-meshgate-match: prefix`, a route without a path is `/` with `any`.

use std::collections::BTreeMap;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use meshgate_agent::http::{
    Body,
    action::{ActionFuture, RouteAction},
    ctx::Ctx,
    full,
    respond::Problem,
};
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{
    auth::{AuthConfig, RouteAuth},
    config::GatewayConfig,
    routes::{BackendConfig, PathMatch, RouteConfig},
    transcode::{
        TranscodeConfig,
        descriptors::{BodyRule, Loaded},
    },
};

/// `backend: {openapi: …}`, and the document's `info` and `servers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenApiConfig {
    /// `info.title`; default `meshgate gateway NODE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// `info.version`; default `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `info.description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Base URLs clients use (`servers[].url`); default none (the document's own origin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
}

/// What the generator knows of one route beyond its config.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc<'a> {
    /// The route.
    pub route: &'a RouteConfig,
    /// Its transcoding, loaded.
    pub transcode: Option<(&'a TranscodeConfig, &'a Loaded)>,
    /// Its request body schema.
    pub request_schema: Option<&'a Value>,
}

/// Builds the document for `cfg`: compiles the protos of transcoded routes and reads the
/// routes' schemas (what `meshgate openapi` runs). `info` overrides the first `openapi`
/// backend's settings.
pub fn from_config(cfg: &GatewayConfig, info: Option<&OpenApiConfig>) -> Result<Value, String> {
    let mut loaded = Vec::new();
    let mut schemas = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let at = |m: String| format!("routes[{i}] ({}): {m}", r.name);
        loaded.push(match &r.transcode {
            Some(t) => Some(t.load().map_err(|m| at(format!("transcode: {m}")))?),
            None => None,
        });
        schemas.push(match &r.request_schema {
            Some(s) => Some(
                s.document()
                    .map_err(|m| at(format!("request_schema: {m}")))?,
            ),
            None => None,
        });
    }
    let docs: Vec<RouteDoc<'_>> = cfg
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| RouteDoc {
            route: r,
            transcode: r.transcode.as_ref().zip(loaded[i].as_ref()),
            request_schema: schemas[i].as_ref(),
        })
        .collect();
    let info = info.cloned().or_else(|| {
        cfg.routes.iter().find_map(|r| match &r.backend {
            BackendConfig::OpenApi(o) => Some(o.clone()),
            _ => None,
        })
    });
    Ok(document(&cfg.node, info.as_ref(), &docs, &cfg.auth))
}

fn scheme_names(a: &RouteAuth, auth: &AuthConfig) -> Vec<Value> {
    let mut out = Vec::new();
    for j in &a.jwt {
        out.push(json!({ format!("jwt-{j}"): a.scopes }));
    }
    if a.api_key {
        let locs = auth
            .api_keys
            .as_ref()
            .map(|k| k.locations.clone())
            .unwrap_or_else(|| crate::apikey::ApiKeyConfig::default().locations);
        for l in locs {
            out.push(json!({ api_key_scheme(&l): [] }));
        }
    }
    for i in &a.introspection {
        out.push(json!({ format!("introspection-{i}"): a.scopes }));
    }
    if a.mtls {
        out.push(json!({"mtls": []}));
    }
    out
}

fn api_key_scheme(l: &crate::apikey::KeyLocation) -> String {
    match l {
        crate::apikey::KeyLocation::Header { name } => {
            format!("api-key-header-{}", name.to_ascii_lowercase())
        }
        crate::apikey::KeyLocation::Query { name } => format!("api-key-query-{name}"),
    }
}

fn security_schemes(docs: &[RouteDoc<'_>], auth: &AuthConfig) -> Map<String, Value> {
    let mut s = Map::new();
    for d in docs {
        let Some(a) = &d.route.auth else { continue };
        for j in &a.jwt {
            let mut v = json!({"type": "http", "scheme": "bearer", "bearerFormat": "JWT"});
            if let Some(p) = auth.jwt.iter().find(|p| &p.name == j)
                && let Some(iss) = &p.issuer
            {
                v["description"] = json!(format!("a JWT issued by {iss}"));
            }
            s.insert(format!("jwt-{j}"), v);
        }
        if a.api_key {
            let locs = auth
                .api_keys
                .as_ref()
                .map(|k| k.locations.clone())
                .unwrap_or_else(|| crate::apikey::ApiKeyConfig::default().locations);
            for l in locs {
                let v = match &l {
                    crate::apikey::KeyLocation::Header { name } => {
                        json!({"type": "apiKey", "in": "header", "name": name})
                    }
                    crate::apikey::KeyLocation::Query { name } => {
                        json!({"type": "apiKey", "in": "query", "name": name})
                    }
                };
                s.insert(api_key_scheme(&l), v);
            }
        }
        for i in &a.introspection {
            s.insert(
                format!("introspection-{i}"),
                json!({"type": "http", "scheme": "bearer", "description": "an OAuth 2 access token, checked by introspection (RFC 7662)"}),
            );
        }
        if a.mtls {
            s.insert("mtls".into(), json!({"type": "mutualTLS"}));
        }
    }
    s
}

struct Gen<'a> {
    paths: BTreeMap<String, Map<String, Value>>,
    schemas: Map<String, Value>,
    auth: &'a AuthConfig,
    op_ids: Vec<String>,
}

const ANY_METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem: meshgate's own answer (no route, refused, upstream failed...).",
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "request_id": {"type": "string"}
        },
        "required": ["type", "title", "status"]
    })
}

fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "A failed gRPC call: google.rpc.Status as JSON (the HTTP status follows the google.rpc.Code mapping).",
        "properties": {
            "code": {"type": "integer", "description": "google.rpc.Code"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object", "properties": {"@type": {"type": "string"}}}}
        },
        "required": ["code", "message", "details"]
    })
}

fn problem_response() -> Value {
    json!({"description": "refused or failed by the gateway", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/meshgate.Problem"}}}})
}

/// Rewrites the local `$ref`s of an embedded schema (`#/$defs/x`) to point into its new home.
fn rebase_refs(v: &mut Value, base: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "$ref"
                    && let Value::String(s) = x
                    && let Some(rest) = s.strip_prefix('#')
                {
                    *s = format!("#{base}{rest}");
                } else {
                    rebase_refs(x, base);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rebase_refs(x, base)),
        _ => {}
    }
}

impl Gen<'_> {
    fn op_id(&mut self, want: String) -> String {
        let mut id = want.clone();
        let mut n = 2;
        while self.op_ids.contains(&id) {
            id = format!("{want}-{n}");
            n += 1;
        }
        self.op_ids.push(id.clone());
        id
    }

    fn put(&mut self, path: String, method: &str, op: Value) {
        let item = self.paths.entry(path).or_default();
        // the first route for a path and method wins (more specific routes come first)
        item.entry(method.to_owned()).or_insert(op);
    }

    fn message_ref(&mut self, m: &MessageDescriptor, names: bool) -> Value {
        self.message_schema(m, names);
        json!({"$ref": format!("#/components/schemas/{}", m.full_name())})
    }

    fn message_schema(&mut self, m: &MessageDescriptor, names: bool) {
        let key = m.full_name().to_owned();
        if self.schemas.contains_key(&key) {
            return;
        }
        if let Some(w) = wkt_schema(m.full_name()) {
            self.schemas.insert(key, w);
            return;
        }
        self.schemas.insert(key.clone(), json!({}));
        let mut props = Map::new();
        for f in m.fields() {
            let name = if names {
                f.name().to_owned()
            } else {
                f.json_name().to_owned()
            };
            let s = self.field_schema(&f, names);
            props.insert(name, s);
        }
        let mut s = json!({"type": "object", "properties": props});
        let oneofs: Vec<String> = m
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .map(|o| {
                let members: Vec<String> = o.fields().map(|f| f.json_name().to_owned()).collect();
                format!("{}: at most one of {}", o.name(), members.join(", "))
            })
            .collect();
        if !oneofs.is_empty() {
            s["description"] = json!(format!("oneof {}", oneofs.join("; ")));
        }
        self.schemas.insert(key, s);
    }

    fn field_schema(&mut self, f: &FieldDescriptor, names: bool) -> Value {
        if f.is_map() {
            let entry = f.kind();
            let entry = entry.as_message().expect("invariant: map entry");
            let v = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": self.kind_schema(&v.kind(), names)});
        }
        let one = self.kind_schema(&f.kind(), names);
        if f.is_list() {
            json!({"type": "array", "items": one})
        } else {
            one
        }
    }

    fn kind_schema(&mut self, k: &Kind, names: bool) -> Value {
        match k {
            Kind::Double | Kind::Float => {
                json!({"oneOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]})
            }
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "format": "int32"})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int32", "minimum": 0})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": ["string", "integer"], "format": "int64", "description": "a 64-bit integer: a string on output, a string or a number on input"})
            }
            Kind::Uint64 | Kind::Fixed64 => {
                json!({"type": ["string", "integer"], "format": "uint64", "description": "a 64-bit unsigned integer: a string on output, a string or a number on input"})
            }
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Enum(e) => {
                let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
                json!({"type": "string", "enum": names, "description": format!("{} (the number is accepted too)", e.full_name())})
            }
            Kind::Message(m) => self.message_ref(m, names),
        }
    }

    fn proxy_route(&mut self, d: &RouteDoc<'_>) {
        let r = d.route;
        let (path, kind) = match &r.r#match.path {
            Some(PathMatch::Exact(p)) => (p.clone(), "exact"),
            Some(PathMatch::Template(p)) => (p.clone(), "template"),
            Some(PathMatch::Prefix(p)) => (p.clone(), "prefix"),
            None => ("/".to_owned(), "any"),
        };
        let params: Vec<Value> = crate::aggregate::placeholders(&path)
            .into_iter()
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let methods: Vec<String> = if r.r#match.methods.is_empty() {
            ANY_METHODS.iter().map(|m| (*m).to_owned()).collect()
        } else {
            r.r#match
                .methods
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect()
        };
        let (summary, responses) = match &r.backend {
            BackendConfig::Aggregate(a) => {
                let mut props = Map::new();
                for c in &a.calls {
                    props.insert(
                        c.name.clone(),
                        json!({"description": format!("the JSON answer of {}", c.path)}),
                    );
                }
                if a.on_error == crate::aggregate::FailurePolicy::Partial {
                    props.insert("errors".into(), json!({"type": "array", "items": {"type": "object", "properties": {"call": {"type": "string"}, "status": {"type": "integer"}, "error": {"type": "string"}}}}));
                }
                (
                    format!("aggregate of {} calls", a.calls.len()),
                    json!({"200": {"description": "the calls' answers merged by name", "content": {"application/json": {"schema": {"type": "object", "properties": props}}}}, "default": problem_response()}),
                )
            }
            BackendConfig::OpenApi(_) => (
                "this OpenAPI document".into(),
                json!({"200": {"description": "the OpenAPI 3.1 document", "content": {"application/json": {"schema": {"type": "object"}}}}}),
            ),
            b => (
                format!(
                    "proxied to {}",
                    b.services().join(", ").if_empty_then("an external URL")
                ),
                json!({"default": {"description": "the service's answer"}}),
            ),
        };
        for m in methods {
            if m == "trace" || m == "connect" {
                continue;
            }
            let mut op = json!({
                "operationId": self.op_id(r.name.clone()),
                "summary": summary,
                "responses": responses,
                "x-meshgate-route": r.name,
                "x-meshgate-match": kind,
            });
            if !params.is_empty() {
                op["parameters"] = json!(params);
            }
            if let Some(s) = d.request_schema
                && matches!(m.as_str(), "post" | "put" | "patch")
            {
                let key = format!("{}.request", r.name);
                let mut s = s.clone();
                if let Value::Object(o) = &mut s {
                    o.remove("$schema");
                    o.remove("$id");
                }
                rebase_refs(&mut s, &format!("/components/schemas/{key}"));
                self.schemas.insert(key.clone(), s);
                op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{key}")}}}});
                op["responses"]["400"] = problem_response();
            }
            self.secure(&mut op, r);
            self.put(path.clone(), &m, op);
        }
    }

    fn secure(&self, op: &mut Value, r: &RouteConfig) {
        if let Some(a) = &r.auth {
            let s = scheme_names(a, self.auth);
            if !s.is_empty() {
                op["security"] = json!(s);
                op["responses"]["401"] = problem_response();
            }
        }
    }

    fn transcoded(&mut self, d: &RouteDoc<'_>, t: &TranscodeConfig, l: &Loaded) {
        let names = t.use_proto_names;
        for b in &l.bindings {
            let input = b.rpc.input();
            let path = b.template.openapi_path();
            let mut params: Vec<Value> = b
                .template
                .vars
                .iter()
                .map(|v| {
                    let dotted = v.field.join(".");
                    let f = crate::transcode::query::resolve(&input, &dotted);
                    let schema = f
                        .as_ref()
                        .and_then(|p| p.last())
                        .map(|leaf| self.field_schema(leaf, names))
                        .unwrap_or_else(|| json!({"type": "string"}));
                    let mut p =
                        json!({"name": dotted, "in": "path", "required": true, "schema": schema});
                    if v.multi {
                        p["description"] = json!("may contain '/'");
                    }
                    p
                })
                .collect();
            let bound: Vec<Vec<String>> = b.template.vars.iter().map(|v| v.field.clone()).collect();
            if b.body != BodyRule::All {
                let skip = match &b.body {
                    BodyRule::Field(f) => Some(f.clone()),
                    _ => None,
                };
                let mut qs = Vec::new();
                query_params(&input, &mut Vec::new(), &bound, skip.as_deref(), 0, &mut qs);
                for (name, f) in qs {
                    let schema = self.field_schema(&f, names);
                    params.push(
                        json!({"name": name, "in": "query", "required": false, "schema": schema}),
                    );
                }
            }
            let mut op = json!({
                "operationId": self.op_id(format!("{}.{}", d.route.name, b.rpc.name())),
                "summary": format!("{} (gRPC {})", b.rpc.name(), b.rpc.full_name()),
                "x-meshgate-route": d.route.name,
                "x-meshgate-grpc": b.grpc_path,
            });
            if !params.is_empty() {
                op["parameters"] = json!(params);
            }
            match &b.body {
                BodyRule::All => {
                    op["requestBody"] = json!({"content": {"application/json": {"schema": self.message_ref(&input, names)}}});
                }
                BodyRule::Field(f) => {
                    let field = input
                        .get_field_by_name(f)
                        .expect("invariant: checked at load");
                    op["requestBody"] = json!({"content": {"application/json": {"schema": self.field_schema(&field, names)}}});
                }
                BodyRule::None => {}
            }
            let output = b.rpc.output();
            let ok_schema = match &b.response_body {
                Some(f) => {
                    let field = output
                        .get_field_by_name(f)
                        .expect("invariant: checked at load");
                    self.field_schema(&field, names)
                }
                None => self.message_ref(&output, names),
            };
            let ok = if b.rpc.is_server_streaming() {
                json!({"description": "a stream of messages: one JSON object per line (NDJSON), or server-sent events; a failure after the first message is a final {\"error\": {...}} record", "content": {
                    "application/x-ndjson": {"schema": ok_schema},
                    "text/event-stream": {"schema": {"type": "string"}}
                }})
            } else {
                json!({"description": "the RPC's answer", "content": {"application/json": {"schema": ok_schema}}})
            };
            op["responses"] = json!({
                "200": ok,
                "default": {"description": "the RPC failed (google.rpc.Status), or the gateway refused", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/meshgate.GrpcStatus"}},
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/meshgate.Problem"}}
                }}
            });
            self.secure(&mut op, d.route);
            self.put(path, &b.method.as_str().to_ascii_lowercase(), op);
        }
    }
}

trait IfEmpty {
    fn if_empty_then(self, other: &str) -> String;
}

impl IfEmpty for String {
    fn if_empty_then(self, other: &str) -> String {
        if self.is_empty() {
            other.to_owned()
        } else {
            self
        }
    }
}

/// The query parameters a binding accepts: scalar leaves of the request message (nested
/// messages flattened as `a.b`, three levels deep), minus the path-bound and body fields.
fn query_params(
    m: &MessageDescriptor,
    prefix: &mut Vec<String>,
    bound: &[Vec<String>],
    body_field: Option<&str>,
    depth: usize,
    out: &mut Vec<(String, FieldDescriptor)>,
) {
    for f in m.fields() {
        if depth == 0 && body_field == Some(f.name()) {
            continue;
        }
        prefix.push(f.name().to_owned());
        if bound.iter().any(|b| b == prefix) || f.is_map() {
            prefix.pop();
            continue;
        }
        match f.kind() {
            Kind::Message(k) if !crate::transcode::json::is_special_wkt(k.full_name()) => {
                if depth < 3 && !f.is_list() {
                    query_params(&k, prefix, bound, None, depth + 1, out);
                }
            }
            Kind::Message(k)
                if matches!(
                    k.full_name(),
                    "google.protobuf.Struct"
                        | "google.protobuf.Value"
                        | "google.protobuf.ListValue"
                        | "google.protobuf.Any"
                        | "google.protobuf.Empty"
                ) => {}
            _ => out.push((prefix.join("."), f.clone())),
        }
        prefix.pop();
    }
}

fn wkt_schema(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "description": "seconds with an s suffix, e.g. 1.5s"})
        }
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "comma-separated field paths in lowerCamelCase"})
        }
        "google.protobuf.Struct" => json!({"type": "object"}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array"}),
        "google.protobuf.Empty" => json!({"type": "object"}),
        "google.protobuf.Any" => {
            json!({"type": "object", "properties": {"@type": {"type": "string"}}, "required": ["@type"]})
        }
        "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
        "google.protobuf.BytesValue" => {
            json!({"type": ["string", "null"], "contentEncoding": "base64"})
        }
        "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({"type": ["integer", "null"]})
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": ["string", "integer", "null"]})
        }
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
            json!({"type": ["number", "string", "null"]})
        }
        _ => return None,
    })
}

/// The OpenAPI 3.1 document of `routes`.
pub fn document(
    node: &str,
    info: Option<&OpenApiConfig>,
    routes: &[RouteDoc<'_>],
    auth: &AuthConfig,
) -> Value {
    let mut g = Gen {
        paths: BTreeMap::new(),
        schemas: Map::new(),
        auth,
        op_ids: Vec::new(),
    };
    g.schemas
        .insert("meshgate.Problem".into(), problem_schema());
    g.schemas
        .insert("meshgate.GrpcStatus".into(), status_schema());
    for d in routes {
        match d.transcode {
            Some((t, l)) => g.transcoded(d, t, l),
            None => g.proxy_route(d),
        }
    }
    let info_v = info.cloned().unwrap_or_default();
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": info_v.title.unwrap_or_else(|| format!("meshgate gateway {node}")),
            "version": info_v.version.unwrap_or_else(|| "1".into()),
        },
        "paths": g.paths,
        "components": {"schemas": g.schemas, "securitySchemes": security_schemes(routes, auth)},
    });
    if let Some(d) = info_v.description {
        doc["info"]["description"] = json!(d);
    }
    if !info_v.servers.is_empty() {
        doc["servers"] = json!(
            info_v
                .servers
                .iter()
                .map(|u| json!({"url": u}))
                .collect::<Vec<_>>()
        );
    }
    doc
}

/// Serves a document (the `openapi` backend).
#[derive(Debug)]
pub struct ServeOpenApi {
    body: bytes::Bytes,
}

impl ServeOpenApi {
    /// Serves `doc`.
    pub fn new(doc: &Value) -> Self {
        Self {
            body: serde_json::to_vec_pretty(doc)
                .expect("invariant: JSON serializes")
                .into(),
        }
    }
}

impl RouteAction for ServeOpenApi {
    fn kind(&self) -> &'static str {
        "openapi"
    }

    fn call<'a>(&'a self, req: Request<Body>, _ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return Err(Problem::MethodNotAllowed {
                    allow: "GET, HEAD".into(),
                });
            }
            let mut r = Response::new(full(self.body.clone()));
            *r.status_mut() = StatusCode::OK;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcoded_routes_become_operations_with_schemas() {
        let cfg: GatewayConfig = serde_json::from_value(json!({
            "node": "gw", "trust_domain": "td", "data_dir": "/tmp/x",
            "ca": {"address": "https://127.0.0.1:1", "fingerprint": "00", "join_token_file": "/tmp/t"},
            "listen": {"http": "127.0.0.1:0"},
            "auth": {"jwt": [{"name": "main", "issuer": "https://idp", "jwks": {"keys": []}, "algorithms": ["RS256"]}]},
            "routes": [
                {"name": "orders", "match": {"path": {"prefix": "/v1"}}, "backend": {"service": "orders"},
                 "auth": {"jwt": ["main"], "scopes": ["read"]},
                 "transcode": {"protos": ["demo/orders/v1/orders.proto"], "include": [concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto")]}},
                {"name": "users", "match": {"path": {"template": "/users/{id}"}, "methods": ["GET"]}, "backend": {"service": "users"}},
                {"name": "new-user", "match": {"path": {"exact": "/users"}, "methods": ["POST"]}, "backend": {"service": "users"},
                 "request_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "string"}}}}},
                {"name": "doc", "match": {"path": {"exact": "/openapi.json"}}, "backend": {"openapi": {"title": "Shop"}}}
            ]
        }))
        .expect("config");
        let d = from_config(&cfg, None).expect("document");
        assert_eq!(d["openapi"], "3.1.0");
        assert_eq!(d["info"]["title"], "Shop");
        let get = &d["paths"]["/v1/orders/{id}"]["get"];
        assert_eq!(get["parameters"][0]["name"], "id");
        assert_eq!(
            get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/demo.orders.v1.Order"
        );
        assert_eq!(get["security"][0]["jwt-main"][0], "read");
        assert!(d["paths"]["/v1/orders/{id}:cancel"]["post"]["requestBody"].is_object());
        assert!(d["paths"]["/v1/orders:watch"]["get"]["responses"]["200"]["content"]["application/x-ndjson"].is_object());
        let list = &d["paths"]["/v1/orders"]["get"]["parameters"];
        let names: Vec<&str> = list
            .as_array()
            .expect("params")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            names.contains(&"filter.min_total_cents") && names.contains(&"status"),
            "{names:?}"
        );
        assert!(d["paths"]["/v1/attachments/{name}"]["get"].is_object());
        assert_eq!(
            d["components"]["schemas"]["demo.orders.v1.Order"]["properties"]["totalCents"]["format"],
            "int64"
        );
        assert_eq!(
            d["components"]["schemas"]["demo.orders.v1.Order"]["properties"]["email"]["type"],
            "string"
        );
        assert!(d["paths"]["/users/{id}"]["get"]["parameters"][0]["name"] == "id");
        assert_eq!(
            d["components"]["schemas"]["new-user.request"]["properties"]["a"]["$ref"],
            "#/components/schemas/new-user.request/$defs/a"
        );
        assert_eq!(
            d["components"]["securitySchemes"]["jwt-main"]["scheme"],
            "bearer"
        );
        assert!(
            !d["paths"]
                .as_object()
                .expect("paths")
                .keys()
                .any(|k| k.contains("Reindex"))
        );
    }
}
