//! Request body validation with JSON Schema 2020-12 (`request_schema:` on a route): the schema
//! is read and compiled when the config loads; a body that fails it is answered 400 naming the
//! JSON pointer of the value and the schema rule it broke, before any upstream is called. Pure
//! (the filter in `filters::schema` does the HTTP part).
//!
//! Schemas are self-contained: `$ref` may point inside the schema (`#/$defs/item`), not to
//! other files or URLs (the gateway fetches nothing while validating). A schema without
//! `$schema` is read as 2020-12; formats (`email`, `date-time`, …) are checked.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `request_schema:` — one of `file` or `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSchemaConfig {
    /// A JSON Schema file (JSON), read when the config loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The schema inline (YAML or JSON in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub schema: Option<serde_json::Value>,
}

impl RequestSchemaConfig {
    /// The schema document (read from `file`, or the inline one).
    pub fn document(&self) -> Result<serde_json::Value, String> {
        match (&self.file, &self.schema) {
            (Some(f), None) => {
                let text = std::fs::read(f).map_err(|e| format!("file {}: {e}", f.display()))?;
                serde_json::from_slice(&text)
                    .map_err(|e| format!("file {}: not JSON: {e}", f.display()))
            }
            (None, Some(s)) => Ok(s.clone()),
            _ => Err("set exactly one of file or schema".into()),
        }
    }
}

/// A compiled schema.
pub struct RequestSchema {
    validator: jsonschema::Validator,
    document: serde_json::Value,
}

impl std::fmt::Debug for RequestSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSchema").finish_non_exhaustive()
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer of the value (`/items/0/quantity`; `/` for the whole body).
    pub pointer: String,
    /// JSON pointer of the rule in the schema (`/properties/items/items/properties/quantity/minimum`).
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (rule {})", self.pointer, self.message, self.rule)
    }
}

impl RequestSchema {
    /// Compiles `cfg`'s schema; errors say what is wrong with it.
    pub fn new(cfg: &RequestSchemaConfig) -> Result<Self, String> {
        let document = cfg.document()?;
        if !document.is_object() && !document.is_boolean() {
            return Err("a JSON Schema is an object (or true/false)".into());
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&document)
            .map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        Ok(Self {
            validator,
            document,
        })
    }

    /// The schema as configured (for OpenAPI).
    pub fn document(&self) -> &serde_json::Value {
        &self.document
    }

    /// The first `max` violations of `value`; empty when it is valid.
    pub fn check(&self, value: &serde_json::Value, max: usize) -> Vec<Violation> {
        self.validator
            .iter_errors(value)
            .take(max)
            .map(|e| {
                let pointer = e.instance_path().as_str().to_owned();
                Violation {
                    pointer: if pointer.is_empty() {
                        "/".into()
                    } else {
                        pointer
                    },
                    rule: e.schema_path().as_str().to_owned(),
                    message: e.to_string(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> RequestSchema {
        RequestSchema::new(&RequestSchemaConfig {
            file: None,
            schema: Some(json!({
                "type": "object",
                "required": ["sku", "quantity"],
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z0-9-]+$"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "email": {"type": "string", "format": "email"},
                    "items": {"type": "array", "items": {"$ref": "#/$defs/item"}}
                },
                "$defs": {"item": {"type": "object", "properties": {"n": {"maximum": 3}}}},
                "additionalProperties": false
            })),
        })
        .expect("schema compiles")
    }

    #[test]
    fn violations_name_the_pointer_and_the_rule() {
        let s = schema();
        assert!(s.check(&json!({"sku": "A-1", "quantity": 2}), 5).is_empty());
        let cases = [
            (
                json!({"sku": "A-1", "quantity": 0}),
                "/quantity",
                "/properties/quantity/minimum",
            ),
            (
                json!({"sku": "a b", "quantity": 1}),
                "/sku",
                "/properties/sku/pattern",
            ),
            (json!({"quantity": 1}), "/", "/required"),
            (
                json!({"sku": "A", "quantity": 1, "x": 1}),
                "/",
                "/additionalProperties",
            ),
            (
                json!({"sku": "A", "quantity": 1, "email": "nope"}),
                "/email",
                "/properties/email/format",
            ),
            (
                json!({"sku": "A", "quantity": 1, "items": [{"n": 1}, {"n": 9}]}),
                "/items/1/n",
                "maximum",
            ),
            (json!([1]), "/", "/type"),
        ];
        for (body, pointer, rule) in cases {
            let v = s.check(&body, 5);
            assert_eq!(v.len(), 1, "{body}: {v:?}");
            assert_eq!(v[0].pointer, pointer, "{body}");
            assert!(v[0].rule.contains(rule), "{body}: {}", v[0].rule);
        }
    }

    #[test]
    fn bad_schemas_are_config_errors() {
        let bad = |s: serde_json::Value| {
            RequestSchema::new(&RequestSchemaConfig {
                file: None,
                schema: Some(s),
            })
            .expect_err("bad schema")
        };
        assert!(bad(json!({"type": "nonsense"})).contains("not a valid JSON Schema"));
        assert!(bad(json!(3)).contains("object"));
        let e = RequestSchema::new(&RequestSchemaConfig {
            file: Some("/nonexistent/schema.json".into()),
            schema: None,
        })
        .expect_err("missing file");
        assert!(e.contains("/nonexistent/schema.json"), "{e}");
        let e = RequestSchema::new(&RequestSchemaConfig {
            file: None,
            schema: None,
        })
        .expect_err("neither");
        assert!(e.contains("exactly one"), "{e}");
    }
}
