//! Where a transcoded route's types and rules come from: `.proto` files compiled at load time
//! by protox (imports resolved in the configured directories, then meshgate's vendored
//! `google/api` and `google/rpc` files, then the well-known types), or a FileDescriptorSet
//! file (`protoc --include_imports --descriptor_set_out=…`). Out come the descriptor pool and
//! one [`Binding`] per `google.api.http` rule (additional bindings included), each checked
//! against the message types so a bad rule fails the config load with its name, not a request.

use std::path::{Path, PathBuf};

use http::Method;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MessageDescriptor, MethodDescriptor, Value,
};
use protox::file::{
    ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver,
};

use super::template::Template;

/// Resolves meshgate's vendored Google files (`google/api/http.proto`, …).
struct Vendored;

impl FileResolver for Vendored {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match meshgate_proto::google::SOURCES
            .iter()
            .find(|(n, _)| *n == name)
        {
            Some((n, src)) => File::from_source(n, src),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// What a binding does with the request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRule {
    /// No body: every field not in the path may come from the query.
    None,
    /// `body: "*"`: the body is the whole request message (no query parameters).
    All,
    /// `body: "field"`: the body is this top-level field; other fields may come from the query.
    Field(String),
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The HTTP method (`custom` rules give their own kind).
    pub method: Method,
    /// The path template.
    pub template: Template,
    /// The body mapping.
    pub body: BodyRule,
    /// `response_body`: the top-level response field sent as the HTTP body.
    pub response_body: Option<String>,
    /// The RPC.
    pub rpc: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
}

/// The loaded descriptors and bindings of one route.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Every type (the route's files, their imports, google.rpc error details).
    pub pool: DescriptorPool,
    /// The bindings, in file order.
    pub bindings: Vec<Binding>,
}

/// Compiles `protos` with `include` directories (plus the vendored and well-known files).
/// Errors carry protox's message, which names the file, line and column.
pub fn compile(protos: &[PathBuf], include: &[PathBuf]) -> Result<DescriptorPool, String> {
    let mut chain = ChainFileResolver::new();
    let dirs: Vec<PathBuf> = if include.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        include.to_vec()
    };
    for d in &dirs {
        if !d.is_dir() {
            return Err(format!(
                "include directory {} does not exist or is not a directory",
                d.display()
            ));
        }
        chain.add(IncludeFileResolver::new(d.clone()));
    }
    chain.add(Vendored);
    chain.add(GoogleFileResolver::new());
    let mut c = protox::Compiler::with_file_resolver(chain);
    c.include_imports(true).include_source_info(true);
    for p in protos {
        c.open_file(p).map_err(|e| {
            let hint = if e.is_file_not_found()
                || e.to_string().contains("not found")
                || e.to_string().contains("include")
            {
                format!(
                    " (the file must be under one of the include directories: {})",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            };
            format!("{}: {e}{hint}", p.display())
        })?;
    }
    // the standard error details, so a status's details render as JSON
    c.open_file("google/rpc/error_details.proto")
        .and_then(|c| c.open_file("google/rpc/status.proto"))
        .map_err(|e| format!("vendored google/rpc files: {e}"))?;
    // protox's own encoding keeps extension options such as (google.api.http)
    DescriptorPool::decode(c.encode_file_descriptor_set().as_slice())
        .map_err(|e| format!("the compiled descriptors do not load: {e}"))
}

/// Reads a FileDescriptorSet file.
pub fn read_descriptor_set(path: &Path) -> Result<DescriptorPool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
        format!(
            "{}: not a FileDescriptorSet ({e}); write one with `protoc --include_imports --descriptor_set_out=FILE`",
            path.display()
        )
    })
}

fn http_method(rule: &DynamicMessage) -> Option<(Method, String)> {
    for (name, m) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(name) {
            let path = rule.get_field_by_name(name)?.as_str()?.to_owned();
            return Some((m, path));
        }
    }
    if rule.has_field_by_name("custom") {
        let c = rule.get_field_by_name("custom")?;
        let c = c.as_message()?;
        let kind = c.get_field_by_name("kind")?.as_str()?.to_owned();
        let path = c.get_field_by_name("path")?.as_str()?.to_owned();
        let m = Method::from_bytes(kind.to_ascii_uppercase().as_bytes()).ok()?;
        return Some((m, path));
    }
    None
}

fn string_field(rule: &DynamicMessage, name: &str) -> String {
    rule.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Checks that `path` names a field chain of `msg` ending in a value a string can set.
fn check_field_path(msg: &MessageDescriptor, path: &[String], what: &str) -> Result<(), String> {
    let mut m = msg.clone();
    for (i, name) in path.iter().enumerate() {
        let Some(f) = m.get_field_by_name(name) else {
            return Err(format!("{what}: {} has no field {name:?}", m.full_name()));
        };
        let last = i + 1 == path.len();
        if last {
            if f.is_list() || f.is_map() {
                return Err(format!("{what}: field {name:?} is repeated"));
            }
            if let Kind::Message(k) = f.kind()
                && !super::json::is_special_wkt(k.full_name())
            {
                return Err(format!(
                    "{what}: field {name:?} is a message ({})",
                    k.full_name()
                ));
            }
        } else {
            match f.kind() {
                Kind::Message(k) if !f.is_list() && !f.is_map() => m = k,
                _ => {
                    return Err(format!("{what}: field {name:?} is not a message field"));
                }
            }
        }
    }
    Ok(())
}

/// The bindings of every service in `pool` (only `services`, full names, when not empty).
/// RPCs without an http rule are not exposed. Fails on a rule that does not fit its types and
/// on a streaming-request RPC with a rule.
pub fn bindings(pool: &DescriptorPool, services: &[String]) -> Result<Vec<Binding>, String> {
    for s in services {
        if pool.get_service_by_name(s).is_none() {
            let known: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
            return Err(format!(
                "service {s:?} is not in the protos (they define: {})",
                if known.is_empty() {
                    "no service".into()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return Err("the protos do not import google/api/annotations.proto, so no method has a google.api.http rule".into());
    };
    let mut out: Vec<Binding> = Vec::new();
    for svc in pool.services() {
        if !services.is_empty() && !services.iter().any(|s| s == svc.full_name()) {
            continue;
        }
        for m in svc.methods() {
            let opts = m.options();
            if !opts.has_extension(&ext) {
                continue;
            }
            let v = opts.get_extension(&ext);
            let Value::Message(rule) = v.as_ref() else {
                continue;
            };
            let mut rules = vec![rule.clone()];
            if let Some(extra) = rule.get_field_by_name("additional_bindings")
                && let Some(list) = extra.as_list()
            {
                rules.extend(list.iter().filter_map(|r| r.as_message().cloned()));
            }
            let name = m.full_name().to_owned();
            if m.is_client_streaming() {
                return Err(format!(
                    "{name} takes a stream of requests; transcoding supports unary and server-streaming methods (remove its http rule, or call it over gRPC)"
                ));
            }
            for rule in rules {
                let Some((method, path)) = http_method(&rule) else {
                    return Err(format!(
                        "{name}: an http rule without get, put, post, delete, patch or custom"
                    ));
                };
                let template = Template::parse(&path).map_err(|e| format!("{name}: {e}"))?;
                let input = m.input();
                for var in &template.vars {
                    check_field_path(
                        &input,
                        &var.field,
                        &format!("{name}: path variable {{{}}}", var.field.join(".")),
                    )?;
                }
                let body = match string_field(&rule, "body").as_str() {
                    "" => BodyRule::None,
                    "*" => BodyRule::All,
                    f => {
                        if input.get_field_by_name(f).is_none() {
                            return Err(format!(
                                "{name}: body {f:?}: {} has no such field",
                                input.full_name()
                            ));
                        }
                        BodyRule::Field(f.to_owned())
                    }
                };
                let response_body = match string_field(&rule, "response_body") {
                    s if s.is_empty() => None,
                    s => {
                        if m.output().get_field_by_name(&s).is_none() {
                            return Err(format!(
                                "{name}: response_body {s:?}: {} has no such field",
                                m.output().full_name()
                            ));
                        }
                        Some(s)
                    }
                };
                if let Some(dup) = out
                    .iter()
                    .find(|b| b.method == method && b.template.source == template.source)
                {
                    return Err(format!(
                        "{name}: {method} {} is already bound to {}",
                        template.source,
                        dup.rpc.full_name()
                    ));
                }
                out.push(Binding {
                    method,
                    template,
                    body,
                    response_body,
                    grpc_path: format!("/{}/{}", svc.full_name(), m.name()),
                    rpc: m.clone(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(
            "no method of the protos has a google.api.http rule, so the route would expose nothing"
                .into(),
        );
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The demo protos as the proto crate compiled them.
    pub(crate) fn demo_pool() -> DescriptorPool {
        DescriptorPool::decode(meshgate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set")
    }

    fn proto_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto/proto")
    }

    #[test]
    fn protos_compile_at_run_time_with_vendored_imports() {
        let pool = compile(
            &[PathBuf::from("demo/orders/v1/orders.proto")],
            &[proto_dir()],
        )
        .expect("compiles");
        let b = bindings(&pool, &[]).expect("bindings");
        let find = |m: &str, p: &str| {
            b.iter()
                .find(|x| x.method.as_str() == m && x.template.source == p)
                .unwrap_or_else(|| panic!("{m} {p}"))
        };
        assert_eq!(
            find("GET", "/v1/orders/{id}").grpc_path,
            "/demo.orders.v1.Orders/GetOrder"
        );
        assert_eq!(
            find("GET", "/v1/shops/{shop}/orders/{id}").grpc_path,
            "/demo.orders.v1.Orders/GetOrder",
            "additional_bindings"
        );
        assert_eq!(
            find("POST", "/v1/shops/{shop}/orders").body,
            BodyRule::Field("order".into())
        );
        assert_eq!(find("POST", "/v1/orders/{id}:cancel").body, BodyRule::All);
        assert_eq!(
            find("GET", "/v1/orders/{id}/items")
                .response_body
                .as_deref(),
            Some("items")
        );
        assert!(find("GET", "/v1/orders:watch").rpc.is_server_streaming());
        assert!(
            !b.iter().any(|x| x.grpc_path.ends_with("/Reindex")),
            "an RPC without an http rule is not exposed"
        );
        assert!(pool.get_message_by_name("google.rpc.BadRequest").is_some());
        // the same from the proto crate's descriptor set
        assert_eq!(
            bindings(&demo_pool(), &["demo.orders.v1.Orders".into()])
                .expect("set")
                .len(),
            b.len()
        );
    }

    #[test]
    fn bad_sources_and_rules_fail_with_their_names() {
        let e = compile(&[PathBuf::from("demo/nope.proto")], &[proto_dir()]).expect_err("missing");
        assert!(e.contains("demo/nope.proto"), "{e}");
        let e = compile(
            &[PathBuf::from("x.proto")],
            &[PathBuf::from("/nonexistent-dir")],
        )
        .expect_err("dir");
        assert!(e.contains("/nonexistent-dir"), "{e}");
        let e = bindings(&demo_pool(), &["demo.Nope".into()]).expect_err("service");
        assert!(e.contains("demo.orders.v1.Orders"), "{e}");
        let dir = tempfile::tempdir().expect("tmp");
        let write = |src: &str| {
            std::fs::write(dir.path().join("t.proto"), src).expect("write");
            compile(&[PathBuf::from("t.proto")], &[dir.path().to_owned()])
                .and_then(|p| bindings(&p, &[]))
        };
        let head = "syntax = \"proto3\"; package t; import \"google/api/annotations.proto\";\nmessage R { string id = 1; repeated string tags = 2; R child = 3; }\n";
        for (rule, want) in [
            ("get: \"/v1/{nope}\"", "has no field \"nope\""),
            ("get: \"/v1/{tags}\"", "repeated"),
            ("get: \"/v1/{child}\"", "is a message"),
            ("post: \"/v1\" body: \"nope\"", "body \"nope\""),
            ("get: \"/v1/{id\"", "not closed"),
        ] {
            let src = format!(
                "{head}service S {{ rpc M(R) returns (R) {{ option (google.api.http) = {{ {rule} }}; }} }}"
            );
            let e = write(&src).expect_err(rule);
            assert!(e.contains(want), "{rule}: {e}");
            assert!(e.contains("t.S.M"), "{rule}: {e}");
        }
        let e = write(&format!("{head}service S {{ rpc M(stream R) returns (R) {{ option (google.api.http) = {{ post: \"/v1\" body: \"*\" }}; }} }}")).expect_err("client streaming");
        assert!(e.contains("stream of requests"), "{e}");
        let e =
            write(&format!("{head}service S {{ rpc M(R) returns (R); }}")).expect_err("no rules");
        assert!(e.contains("no method"), "{e}");
        let e = write("syntax = \"proto3\"; package t; message R { strin id = 1; }")
            .expect_err("syntax");
        assert!(e.contains("t.proto"), "{e}");
    }
}
