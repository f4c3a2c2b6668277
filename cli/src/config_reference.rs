//! The configuration reference in docs/config-reference.md, generated from the same JSON
//! schemas `meshgate config schema` prints: one table per file kind with every field's dotted
//! path, type, default and doc comment. A test fails when the file differs from the schemas or
//! when a field has no doc comment, so a field cannot be added without docs;
//! `MESHGATE_UPDATE_CONFIG_DOCS=1 cargo test -p meshgate config_reference` rewrites it.

use serde_json::{Map, Value};

/// The line after which the generated part starts.
pub(crate) const BEGIN: &str = "<!-- BEGIN GENERATED: from `meshgate config schema`; edit the doc comments in the config structs, not this -->";

/// One documented field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Field {
    /// Dotted path, `[]` for list items and `{name}` for map values.
    pub path: String,
    /// Short type: `string`, `integer`, `duration`, `list`, one of the enum values, …
    pub kind: String,
    /// The default as YAML-ish text, empty when required or none.
    pub default: String,
    /// Whether the file must set it.
    pub required: bool,
    /// The doc comment, one paragraph.
    pub description: String,
}

/// Every field of `schema` (a root schema from schemars), depth first, keys sorted.
pub(crate) fn fields(schema: &Value) -> Vec<Field> {
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut stack = Vec::new();
    walk_object(schema, "", &defs, &mut stack, &mut out);
    out
}

/// The schema `v` points at, following `$ref` and unwrapping `Option` (`anyOf [X, null]`).
fn resolve<'a>(v: &'a Value, defs: &'a Map<String, Value>) -> (&'a Value, Option<&'a str>) {
    let mut cur = v;
    let mut name = None;
    for _ in 0..8 {
        if let Some(r) = cur.get("$ref").and_then(Value::as_str) {
            let n = r.trim_start_matches("#/$defs/");
            match defs.get(n) {
                Some(d) => {
                    name = Some(n);
                    cur = d;
                    continue;
                }
                None => break,
            }
        }
        if let Some(any) = cur.get("anyOf").and_then(Value::as_array) {
            let non_null: Vec<&Value> = any
                .iter()
                .filter(|s| s.get("type").and_then(Value::as_str) != Some("null"))
                .collect();
            if non_null.len() == 1 && any.len() == 2 {
                cur = non_null[0];
                continue;
            }
        }
        break;
    }
    (cur, name)
}

fn walk_object(
    schema: &Value,
    prefix: &str,
    defs: &Map<String, Value>,
    stack: &mut Vec<String>,
    out: &mut Vec<Field>,
) {
    let (schema, name) = resolve(schema, defs);
    if let Some(n) = name {
        if stack.iter().any(|s| s == n) {
            return;
        }
        stack.push(n.to_owned());
    }
    // Tagged and untagged enums: every variant's fields, once each.
    let variants: Vec<&Value> = ["oneOf", "anyOf"]
        .iter()
        .filter_map(|k| schema.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut seen: Vec<String> = Vec::new();
    for part in std::iter::once(schema).chain(variants) {
        let (part, _) = resolve(part, defs);
        let Some(props) = part.get("properties").and_then(Value::as_object) else {
            continue;
        };
        let required: Vec<&str> = part
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (key, prop) in props {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if seen.contains(&path) {
                continue;
            }
            seen.push(path.clone());
            // An externally tagged variant (`{header: NAME}`) carries its doc on the variant.
            let variant_doc = (props.len() == 1)
                .then(|| part.get("description"))
                .flatten();
            let req = required.contains(&key.as_str());
            emit(prop, variant_doc, path, req, defs, stack, out);
        }
    }
    if name.is_some() {
        stack.pop();
    }
}

fn emit(
    prop: &Value,
    variant_doc: Option<&Value>,
    path: String,
    required: bool,
    defs: &Map<String, Value>,
    stack: &mut Vec<String>,
    out: &mut Vec<Field>,
) {
    let (target, _) = resolve(prop, defs);
    let description = prop
        .get("description")
        .or(variant_doc)
        .or_else(|| target.get("description"))
        .and_then(Value::as_str)
        .map(one_paragraph)
        .unwrap_or_default();
    let default = prop.get("default").map(show_default).unwrap_or_default();
    out.push(Field {
        path: path.clone(),
        kind: kind_of(target, defs),
        default,
        required,
        description,
    });
    descend(target, &path, defs, stack, out);
}

/// Fields below `target`: an object's own, a list's items', a map's values'.
fn descend(
    target: &Value,
    path: &str,
    defs: &Map<String, Value>,
    stack: &mut Vec<String>,
    out: &mut Vec<Field>,
) {
    if has_fields(target, defs) {
        walk_object(target, path, defs, stack, out);
    } else if let Some(items) = target.get("items") {
        let (inner, _) = resolve(items, defs);
        if has_fields(inner, defs) {
            walk_object(items, &format!("{path}[]"), defs, stack, out);
        }
    } else if let Some(values) = target.get("additionalProperties").filter(|v| v.is_object()) {
        let (inner, _) = resolve(values, defs);
        if has_fields(inner, defs) {
            walk_object(values, &format!("{path}.{{name}}"), defs, stack, out);
        }
    }
}

fn has_fields(v: &Value, defs: &Map<String, Value>) -> bool {
    if v.get("properties").is_some() {
        return true;
    }
    ["oneOf", "anyOf"]
        .iter()
        .filter_map(|k| v.get(*k).and_then(Value::as_array))
        .flatten()
        .any(|s| resolve(s, defs).0.get("properties").is_some())
}

fn kind_of(v: &Value, defs: &Map<String, Value>) -> String {
    if let Some(values) = enum_values(v, defs) {
        return values.join(" \\| ");
    }
    let ty = match v.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" \\| "),
        _ if has_fields(v, defs) => "object".to_owned(),
        _ => "any".to_owned(),
    };
    match ty.as_str() {
        "array" => {
            let inner = v
                .get("items")
                .map(|i| kind_of(resolve(i, defs).0, defs))
                .unwrap_or_else(|| "any".into());
            format!("list of {inner}")
        }
        "object" if v.get("properties").is_none() && v.get("additionalProperties").is_some() => {
            "map".to_owned()
        }
        "integer" | "number" | "boolean" | "object" => ty,
        "string" => "string".to_owned(),
        _ => ty,
    }
}

/// The allowed values of a plain string enum (`enum` or `oneOf` of `const`s).
fn enum_values(v: &Value, defs: &Map<String, Value>) -> Option<Vec<String>> {
    if let Some(e) = v.get("enum").and_then(Value::as_array) {
        return Some(e.iter().map(|x| format!("`{}`", show_default(x))).collect());
    }
    let variants = v.get("oneOf").and_then(Value::as_array)?;
    let mut out = Vec::new();
    for var in variants {
        let (var, _) = resolve(var, defs);
        if let Some(c) = var.get("const") {
            out.push(format!("`{}`", show_default(c)));
        } else if let Some(e) = var.get("enum").and_then(Value::as_array) {
            out.extend(e.iter().map(|x| format!("`{}`", show_default(x))));
        } else {
            return None;
        }
    }
    Some(out)
}

fn show_default(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "[]".to_owned(),
        Value::Object(o) if o.is_empty() => "{}".to_owned(),
        other => other.to_string(),
    }
}

fn one_paragraph(doc: &str) -> String {
    doc.split("\n\n")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// Markdown for one kind.
pub(crate) fn render_kind(title: &str, file: &str, fields: &[Field]) -> String {
    let mut out = format!(
        "## {title} (`{file}`)\n\n| field | type | default | meaning |\n|---|---|---|---|\n"
    );
    for f in fields {
        let default = if f.required {
            "**required**".to_owned()
        } else if f.default.is_empty() {
            "—".to_owned()
        } else if f.default.len() > 60 {
            "see the fields below".to_owned()
        } else {
            format!("`{}`", f.default.replace('|', "\\|"))
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.path, f.kind, default, f.description
        ));
    }
    out.push('\n');
    out
}

/// The whole generated part: CA, agent, gateway.
pub(crate) fn render() -> String {
    let kinds = [
        (
            "Certificate authority",
            "ca.yaml",
            serde_json::to_value(schemars::schema_for!(crate::config::CaConfig)),
        ),
        (
            "Node agent",
            "agent.yaml",
            serde_json::to_value(schemars::schema_for!(meshgate_agent::config::AgentConfig)),
        ),
        (
            "Gateway",
            "gateway.yaml",
            serde_json::to_value(schemars::schema_for!(
                meshgate_gateway::config::GatewayConfig
            )),
        ),
    ];
    let mut out = String::new();
    for (title, file, schema) in kinds {
        let schema = schema.expect("invariant: a schema is JSON");
        out.push_str(&render_kind(title, file, &fields(&schema)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{END, splice_with};

    fn path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config-reference.md")
    }

    #[test]
    fn config_reference_matches_the_schemas() {
        let doc = std::fs::read_to_string(path()).expect("docs/config-reference.md");
        let want = splice_with(&doc, BEGIN, END, &render())
            .expect("docs/config-reference.md has the generated markers");
        if std::env::var_os("MESHGATE_UPDATE_CONFIG_DOCS").is_some() {
            std::fs::write(path(), &want).expect("write docs/config-reference.md");
            return;
        }
        assert!(
            doc == want,
            "docs/config-reference.md does not match `meshgate config schema`; run `MESHGATE_UPDATE_CONFIG_DOCS=1 cargo test -p meshgate config_reference` and commit the result"
        );
    }

    #[test]
    fn config_reference_every_field_has_a_doc_comment() {
        let mut missing = Vec::new();
        for (file, schema) in [
            (
                "ca",
                serde_json::to_value(schemars::schema_for!(crate::config::CaConfig)),
            ),
            (
                "agent",
                serde_json::to_value(schemars::schema_for!(meshgate_agent::config::AgentConfig)),
            ),
            (
                "gateway",
                serde_json::to_value(schemars::schema_for!(
                    meshgate_gateway::config::GatewayConfig
                )),
            ),
        ] {
            for f in fields(&schema.expect("schema as JSON")) {
                if f.description.is_empty() {
                    missing.push(format!("{file}: {}", f.path));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "config fields without a doc comment (add `///` on the field): {missing:#?}"
        );
    }

    #[test]
    fn walker_finds_nested_list_map_and_enum_fields() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"description": "A.", "$ref": "#/$defs/A", "default": {"x": 1}},
                "list": {"description": "L.", "type": "array", "items": {"$ref": "#/$defs/A"}},
                "mode": {"description": "M.", "$ref": "#/$defs/Mode"},
                "maybe": {"description": "O.", "anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}
            },
            "required": ["mode"],
            "$defs": {
                "A": {"type": "object", "properties": {"x": {"description": "X.", "type": "integer"}}},
                "Mode": {"oneOf": [{"const": "on", "type": "string"}, {"const": "off", "type": "string"}]}
            }
        });
        let got: Vec<(String, String, bool)> = fields(&schema)
            .into_iter()
            .map(|f| (f.path, f.kind, f.required))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), "object".into(), false),
                ("a.x".into(), "integer".into(), false),
                ("list".into(), "list of object".into(), false),
                ("list[].x".into(), "integer".into(), false),
                ("maybe".into(), "object".into(), false),
                ("maybe.x".into(), "integer".into(), false),
                ("mode".into(), "`on` \\| `off`".into(), true),
            ]
        );
    }
}
