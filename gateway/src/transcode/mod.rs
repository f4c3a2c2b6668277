//! The `transcode` route action: REST/JSON in, gRPC to the route's backend, JSON back, driven
//! by the `google.api.http` rules of the backend's `.proto` files (DESIGN §8, docs/transcoding.md).
//!
//! Per request: the method and raw path pick a [`Binding`] ([`template`]; 404 problem+json when
//! no template fits, 405 with `Allow` when only the method is wrong); the request message is
//! built from the JSON body, the query and the path variables ([`json`], [`query`]; a path
//! variable wins); any mistake is a 400 naming the field, before the service is called. The
//! gRPC call goes through the route's [`GatewayProxy`] — the agent's `Proxy` — so timeouts,
//! failover, retries and metrics are the same as for a proxied route. The answer's status maps
//! by the google.rpc table ([`status`]) with a `{code, message, details}` body; server streams
//! are relayed message by message as NDJSON or SSE ([`stream`]). Requests that already speak
//! gRPC (`application/grpc`) pass through unchanged.
//!
//! It owns no sockets and no policy: filters (auth, limits, schema) have run before it.

pub mod descriptors;
pub mod frames;
pub mod json;
pub mod query;
pub mod status;
pub mod stream;
pub mod template;

use std::path::PathBuf;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use meshgate_agent::http::{
    Body,
    action::{ActionFuture, RouteAction},
    ctx::Ctx,
    full,
    respond::Problem,
};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, SerializeOptions};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::proxy::GatewayProxy;
use descriptors::{Binding, BodyRule, Loaded};
use frames::{Item, Reader};

fn default_max_response() -> usize {
    4 << 20
}

/// How server-streaming answers are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    /// One JSON object per line (`application/x-ndjson`). The default.
    #[default]
    Ndjson,
    /// Server-sent events (`text/event-stream`): `data: {json}` per message.
    Sse,
}

/// `transcode:` on a route: the backend speaks gRPC and is offered as REST/JSON by the
/// `google.api.http` rules of these protos.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscodeConfig {
    /// `.proto` files to compile, named as an `import` would name them (relative to an
    /// `include` directory). Their imports are found in `include`, then in meshgate's copies
    /// of `google/api/*.proto` and `google/rpc/*.proto`, then among the well-known types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protos: Vec<PathBuf>,
    /// Import directories, in order; relative ones are relative to the config file, and the
    /// default is the config file's directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<PathBuf>,
    /// Instead of `protos`: a FileDescriptorSet file with its imports
    /// (`protoc --include_imports --descriptor_set_out=FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_set: Option<PathBuf>,
    /// Only these services (full names, `demo.orders.v1.Orders`); default: every service
    /// with http rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Server streams as `ndjson` (default) or `sse`; a client's `Accept: text/event-stream`
    /// or `application/x-ndjson` chooses for itself.
    #[serde(default)]
    pub streaming: StreamFormat,
    /// Refuse unknown JSON fields and unknown query parameters with 400 (default: ignored).
    #[serde(default)]
    pub strict: bool,
    /// Write fields that hold their default value (0, "", false, empty lists); default: omitted.
    #[serde(default)]
    pub emit_defaults: bool,
    /// Write the proto field names (`total_cents`) instead of the JSON names (`totalCents`).
    #[serde(default)]
    pub use_proto_names: bool,
    /// Write enums as numbers instead of names.
    #[serde(default)]
    pub enums_as_numbers: bool,
    /// Largest response message accepted from the service, bytes (502 beyond). Default 4 MiB.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

impl TranscodeConfig {
    /// Compiles or reads the descriptors and checks every rule.
    pub fn load(&self) -> Result<Loaded, String> {
        let pool = match (&self.descriptor_set, self.protos.is_empty()) {
            (Some(_), false) => {
                return Err("set either protos or descriptor_set, not both".into());
            }
            (None, true) => {
                return Err("set protos (with include) or descriptor_set".into());
            }
            (Some(set), true) => descriptors::read_descriptor_set(set)?,
            (None, false) => descriptors::compile(&self.protos, &self.include)?,
        };
        if self.max_response_bytes == 0 {
            return Err("max_response_bytes must be at least 1".into());
        }
        let bindings = descriptors::bindings(&pool, &self.services)?;
        Ok(Loaded { pool, bindings })
    }

    fn serialize_options(&self) -> SerializeOptions {
        SerializeOptions::new()
            .stringify_64_bit_integers(true)
            .use_enum_numbers(self.enums_as_numbers)
            .use_proto_field_name(self.use_proto_names)
            .skip_default_fields(!self.emit_defaults)
    }
}

/// Response headers of the service that are not passed to the HTTP client.
fn internal_response_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("grpc-")
        || matches!(
            n,
            "content-type" | "content-length" | "trailer" | "te" | "transfer-encoding"
        )
}

/// Request headers of the client that do not become gRPC metadata.
fn internal_request_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("grpc-")
        || matches!(
            n,
            "content-type"
                | "content-length"
                | "accept"
                | "accept-encoding"
                | "transfer-encoding"
                | "te"
                | "connection"
                | "keep-alive"
                | "upgrade"
                | "expect"
                | "host"
        )
}

/// The outcome of a gRPC call: its status code, message and `grpc-status-details-bin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    /// google.rpc.Code.
    pub code: i32,
    /// Decoded `grpc-message`.
    pub message: String,
    /// Raw `grpc-status-details-bin` (base64 of a google.rpc.Status).
    pub details: Option<Bytes>,
}

impl GrpcStatus {
    /// From headers or trailers that carry `grpc-status`.
    pub fn from_headers(h: &HeaderMap) -> Option<GrpcStatus> {
        let code = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
        Some(GrpcStatus {
            code,
            message: h
                .get("grpc-message")
                .map(|v| status::decode_grpc_message(v.as_bytes()))
                .unwrap_or_default(),
            details: h
                .get("grpc-status-details-bin")
                .map(|v| Bytes::copy_from_slice(v.as_bytes())),
        })
    }

    /// A status meshgate assigns (the service sent none).
    pub fn local(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }
}

/// The `{code, message, details}` body of a failed call, members in that order.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// google.rpc.Code.
    pub code: i32,
    /// The decoded `grpc-message`.
    pub message: String,
    /// The status details (`{"@type": …, …}` each).
    pub details: Vec<serde_json::Value>,
}

/// The `{code, message, details}` of a status; details decoded by the types in `pool`
/// (unknown types keep their bytes as base64 `value`).
pub fn error_body(pool: &DescriptorPool, st: &GrpcStatus) -> ErrorBody {
    let mut details = Vec::new();
    if let Some(raw) = &st.details
        && let Some(bin) = json::decode_base64(std::str::from_utf8(raw).unwrap_or_default().trim())
        && let Some(desc) = pool.get_message_by_name("google.rpc.Status")
        && let Ok(m) = DynamicMessage::decode(desc, bin.as_slice())
        && let Some(list) = m.get_field_by_name("details")
        && let Some(list) = list.as_list()
    {
        for any in list {
            let Some(any) = any.as_message() else {
                continue;
            };
            let url = any
                .get_field_by_name("type_url")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let value = any
                .get_field_by_name("value")
                .and_then(|v| v.as_bytes().cloned())
                .unwrap_or_default();
            let name = url.rsplit('/').next().unwrap_or_default();
            let decoded = pool
                .get_message_by_name(name)
                .and_then(|d| DynamicMessage::decode(d, value.as_ref()).ok())
                .and_then(|m| serde_json::to_value(&m).ok());
            let mut obj = serde_json::Map::new();
            obj.insert("@type".into(), url.clone().into());
            match decoded {
                Some(serde_json::Value::Object(fields)) => obj.extend(fields),
                _ => {
                    obj.insert(
                        "value".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(&value)
                            .into(),
                    );
                }
            }
            details.push(serde_json::Value::Object(obj));
        }
    }
    ErrorBody {
        code: st.code,
        message: st.message.clone(),
        details,
    }
}

/// The HTTP answer for a failed call.
fn error_response(pool: &DescriptorPool, st: &GrpcStatus, headers: HeaderMap) -> Response<Body> {
    let body = serde_json::to_vec(&error_body(pool, st)).expect("invariant: JSON serializes");
    let mut r = Response::new(full(body));
    *r.status_mut() = status::http_status(st.code);
    *r.headers_mut() = headers;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The per-route transcoder.
#[derive(Debug)]
pub struct Transcode {
    cfg: TranscodeConfig,
    loaded: Loaded,
    ser: SerializeOptions,
    inner: GatewayProxy,
}

/// The options a stream writer needs.
#[derive(Debug, Clone)]
pub struct Output {
    /// The pool (error details).
    pub pool: DescriptorPool,
    /// JSON options.
    pub ser: SerializeOptions,
    /// Proto field names instead of JSON names.
    pub proto_names: bool,
}

fn bad(e: impl std::fmt::Display) -> Problem {
    Problem::BadRequest(e.to_string())
}

const METHOD_ORDER: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

impl Transcode {
    /// The action for a route whose backend `inner` reaches.
    pub fn new(cfg: &TranscodeConfig, loaded: Loaded, inner: GatewayProxy) -> Self {
        Self {
            ser: cfg.serialize_options(),
            cfg: cfg.clone(),
            loaded,
            inner,
        }
    }

    /// The bindings (for OpenAPI and `meshgate routes`).
    pub fn bindings(&self) -> &[Binding] {
        &self.loaded.bindings
    }

    /// The binding for `method` and raw `path`, or 404 / 405.
    fn pick(&self, method: &Method, path: &str) -> Result<(&Binding, Vec<String>), Problem> {
        let mut best: Option<(&Binding, Vec<&str>)> = None;
        let mut allowed: Vec<&Method> = Vec::new();
        for b in &self.loaded.bindings {
            let Some(caps) = b.template.matches(path) else {
                continue;
            };
            if b.method != *method {
                if !allowed.contains(&&b.method) {
                    allowed.push(&b.method);
                }
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(cur, _)| b.template.rank() > cur.template.rank())
            {
                best = Some((b, caps));
            }
        }
        let Some((b, caps)) = best else {
            if allowed.is_empty() {
                return Err(Problem::NoRoute);
            }
            allowed.sort_by_key(|m| {
                METHOD_ORDER
                    .iter()
                    .position(|o| o == *m)
                    .unwrap_or(METHOD_ORDER.len())
            });
            let allow: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
            return Err(Problem::MethodNotAllowed {
                allow: allow.join(", "),
            });
        };
        let mut vals = Vec::with_capacity(caps.len());
        for (v, raw) in b.template.vars.iter().zip(caps) {
            let d = template::decode_var(raw, v.multi).ok_or_else(|| {
                bad(format!(
                    "path variable {{{}}}: {raw:?} is not valid percent-encoded UTF-8",
                    v.field.join(".")
                ))
            })?;
            vals.push(d);
        }
        Ok((b, vals))
    }

    /// The request message for `b` from the body, query and path.
    fn request_message(
        &self,
        b: &Binding,
        vars: &[String],
        query: Option<&str>,
        body: &[u8],
    ) -> Result<DynamicMessage, Problem> {
        let opts = json::ParseOptions {
            strict: self.cfg.strict,
        };
        let input = b.rpc.input();
        let parse_body = || -> Result<Option<serde_json::Value>, Problem> {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            serde_json::from_slice(body)
                .map(Some)
                .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))
        };
        let mut msg = match &b.body {
            BodyRule::All => match parse_body()? {
                Some(j) => json::message_from_json(&input, &j, opts, "").map_err(bad)?,
                None => DynamicMessage::new(input.clone()),
            },
            BodyRule::Field(f) => {
                let mut m = DynamicMessage::new(input.clone());
                if let Some(j) = parse_body()? {
                    let field = input
                        .get_field_by_name(f)
                        .expect("invariant: checked when the route loaded");
                    json::set_field_from_json(&mut m, &field, &j, opts).map_err(bad)?;
                }
                m
            }
            BodyRule::None => DynamicMessage::new(input.clone()),
        };
        let bound: Vec<Vec<String>> = b.template.vars.iter().map(|v| v.field.clone()).collect();
        if b.body != BodyRule::All
            && let Some(q) = query
        {
            let pairs = query::parse_query(q);
            query::apply_query(
                &mut msg,
                &pairs,
                query::QueryRules {
                    strict: self.cfg.strict,
                    bound: &bound,
                    body_field: match &b.body {
                        BodyRule::Field(f) => Some(f.as_str()),
                        _ => None,
                    },
                },
            )
            .map_err(bad)?;
        }
        for (var, text) in b.template.vars.iter().zip(vars) {
            let dotted = var.field.join(".");
            let path = query::resolve(&input, &dotted)
                .expect("invariant: variable fields checked when the route loaded");
            let leaf = path.last().expect("invariant: non-empty field path");
            let v = json::value_from_text(leaf, text)
                .map_err(|m| bad(format!("path variable {{{dotted}}}: {m}")))?;
            query::set_at(&mut msg, &path, v);
        }
        Ok(msg)
    }

    async fn transcode(
        &self,
        req: Request<Body>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, Problem> {
        let (parts, body) = req.into_parts();
        let (b, vars) = self.pick(&parts.method, parts.uri.path())?;
        let bytes: Bytes = if b.body == BodyRule::None {
            drop(body);
            Bytes::new()
        } else {
            if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                let ct = ct.to_str().unwrap_or_default();
                let essence = ct
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase();
                if !(essence == "application/json" || essence.ends_with("+json")) {
                    return Err(Problem::UnsupportedMediaType { got: ct.to_owned() });
                }
            }
            body.collect()
                .await
                .map_err(|_| bad("the request body could not be read"))?
                .to_bytes()
        };
        let msg = self.request_message(b, &vars, parts.uri.query(), &bytes)?;
        let payload = frames::frame(&msg.encode_to_vec());
        let timeout = self.inner.proxy.settings().timeout;
        let deadline = tokio::time::Instant::from_std(ctx.started) + timeout;
        let mut up = Request::new(full(payload));
        *up.method_mut() = Method::POST;
        *up.uri_mut() = b.grpc_path.parse().map_err(|_| Problem::UpstreamFailed)?;
        *up.version_mut() = http::Version::HTTP_2;
        let h = up.headers_mut();
        for (k, v) in &parts.headers {
            if !internal_request_header(k) {
                h.append(k.clone(), v.clone());
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(v) = HeaderValue::from_str(&format!("{}m", left.as_millis().max(1))) {
            h.insert("grpc-timeout", v);
        }
        let resp = self.inner.call(up, ctx).await?;
        let (rparts, rbody) = resp.into_parts();
        let mut headers = HeaderMap::new();
        for (k, v) in &rparts.headers {
            if !internal_response_header(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        let is_grpc = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if rparts.status != StatusCode::OK || !is_grpc {
            if let Some(st) = GrpcStatus::from_headers(&rparts.headers) {
                return Ok(error_response(&self.loaded.pool, &st, headers));
            }
            if rparts.status == StatusCode::OK {
                return Err(Problem::ResponseNotTransformable(
                    "the service did not answer with gRPC".into(),
                ));
            }
            let st = GrpcStatus::local(
                status::code_for_http(rparts.status),
                format!(
                    "the service answered HTTP {} instead of gRPC",
                    rparts.status.as_u16()
                ),
            );
            return Ok(error_response(&self.loaded.pool, &st, headers));
        }
        // trailers-only: the status is in the head
        if let Some(st) = GrpcStatus::from_headers(&rparts.headers)
            && st.code != 0
        {
            return Ok(error_response(&self.loaded.pool, &st, headers));
        }
        let out_desc = b.rpc.output();
        let mut reader = Reader::new(rbody, self.cfg.max_response_bytes);
        if b.rpc.is_server_streaming() {
            let format = stream::negotiate(&parts.headers, self.cfg.streaming);
            let first = reader.next().await;
            return Ok(stream::respond(
                stream::Start {
                    first,
                    head_status: GrpcStatus::from_headers(&rparts.headers),
                    reader,
                    desc: out_desc,
                    format,
                    out: Output {
                        pool: self.loaded.pool.clone(),
                        ser: self.ser.clone(),
                        proto_names: self.cfg.use_proto_names,
                    },
                },
                headers,
            ));
        }
        let timeout_problem = || Problem::UpstreamTimeout {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let mut message: Option<Bytes> = None;
        let end = loop {
            let item = tokio::time::timeout_at(deadline, reader.next())
                .await
                .map_err(|_| timeout_problem())?;
            match item {
                Ok(Item::Message(m)) => {
                    if message.replace(m).is_some() {
                        return Err(Problem::ResponseNotTransformable(
                            "the service sent more than one message for a unary call".into(),
                        ));
                    }
                }
                Ok(Item::End(t)) => break t,
                Err(e) => {
                    tracing::warn!(request_id = %ctx.request_id, error = %e, "transcoded call failed");
                    return Err(Problem::UpstreamFailed);
                }
            }
        };
        let st = end
            .as_ref()
            .and_then(GrpcStatus::from_headers)
            .or_else(|| GrpcStatus::from_headers(&rparts.headers))
            .unwrap_or_else(|| {
                GrpcStatus::local(2, "the service ended the call without a grpc-status")
            });
        if st.code != 0 {
            return Ok(error_response(&self.loaded.pool, &st, headers));
        }
        let Some(message) = message else {
            return Err(Problem::ResponseNotTransformable(
                "the service ended the call without a response message".into(),
            ));
        };
        let m = DynamicMessage::decode(out_desc.clone(), message).map_err(|e| {
            Problem::ResponseNotTransformable(format!(
                "the service's answer is not a valid {}: {e}",
                out_desc.full_name()
            ))
        })?;
        let json = render(
            &m,
            b.response_body.as_deref(),
            &self.ser,
            self.cfg.use_proto_names,
        )
        .map_err(|e| {
            Problem::ResponseNotTransformable(format!("the answer cannot be written as JSON: {e}"))
        })?;
        let mut r = Response::new(full(json));
        *r.headers_mut() = headers;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }
}

/// The JSON of `m`, or of its field `response_body`.
pub fn render(
    m: &DynamicMessage,
    response_body: Option<&str>,
    ser: &SerializeOptions,
    proto_names: bool,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    match response_body {
        None => {
            m.serialize_with_options(&mut serde_json::Serializer::new(&mut out), ser)?;
        }
        Some(f) => {
            let mut v = serde_json::Value::Null;
            let mut whole = Vec::new();
            m.serialize_with_options(&mut serde_json::Serializer::new(&mut whole), ser)?;
            let j: serde_json::Value = serde_json::from_slice(&whole)?;
            let field = m.descriptor().get_field_by_name(f);
            if let Some(field) = field {
                let key = if proto_names {
                    field.name().to_owned()
                } else {
                    field.json_name().to_owned()
                };
                v = match j.get(&key) {
                    Some(x) => x.clone(),
                    None if field.is_list() => serde_json::json!([]),
                    None if field.is_map() => serde_json::json!({}),
                    None => serde_json::Value::Null,
                };
            }
            serde_json::to_writer(&mut out, &v)?;
        }
    }
    Ok(out)
}

impl RouteAction for Transcode {
    fn kind(&self) -> &'static str {
        "transcode"
    }

    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move {
            if ctx.grpc {
                // already gRPC: plain passthrough
                return self.inner.call(req, ctx).await;
            }
            self.transcode(req, ctx).await
        })
    }
}
