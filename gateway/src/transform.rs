//! Header and JSON body transforms for requests and responses on a route.
//!
//! This module owns the transform configuration ([`TransformConfig`]), its validation
//! ([`validate`]) and the pure rewrites: [`apply_headers`] on a header map and [`apply_json`]
//! on a buffered body. It must not buffer or stream bodies itself, fix `Content-Length`
//! (the caller does that after a [`JsonOutcome::Rewritten`]), or touch framing and routing
//! headers: transforms of `Host`, `Content-Length`, `Transfer-Encoding` and the hop-by-hop
//! headers are rejected by [`validate`] and ignored by [`apply_headers`].

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Headers a transform may not touch: they carry message framing, routing or hop-by-hop
/// semantics, and rewriting them could desynchronise the gateway and the upstream.
const PROTECTED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Header edits, applied in the order `remove`, `set`, `add`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderTransform {
    /// Headers appended (existing values of the same name are kept). Default: none.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Headers replaced (every existing value of the name goes). Default: none.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Header names removed (case-insensitive). Default: none.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// JSON body edits, applied to objects along dotted paths: `remove` first, then `rename`
/// (deepest paths first, so `user` and `user.fullName` may both be renamed).
///
/// A path segment that meets an array applies the rest of the path to each element, so
/// `items.secret` reaches `{"items": [{"secret": 1}, {"secret": 2}]}`. Missing paths are
/// ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonTransform {
    /// Dotted path to new name of its last segment, e.g. `"user.fullName": "name"`. A rename
    /// onto an existing field replaces that field. Default: none.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Dotted paths removed. Default: none.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Bodies larger than this pass through untouched. Default: 1 MiB (1048576).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_max_bytes() -> usize {
    1024 * 1024
}

impl Default for JsonTransform {
    fn default() -> Self {
        Self {
            rename: BTreeMap::new(),
            remove: Vec::new(),
            max_bytes: default_max_bytes(),
        }
    }
}

/// A route's transforms. Every part is optional; absent means untouched.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Edits of the request headers sent upstream. Default: none.
    #[serde(default)]
    pub request_headers: Option<HeaderTransform>,
    /// Edits of the response headers sent to the client. Default: none.
    #[serde(default)]
    pub response_headers: Option<HeaderTransform>,
    /// Edits of JSON request bodies. Default: none.
    #[serde(default)]
    pub request_json: Option<JsonTransform>,
    /// Edits of JSON response bodies. Default: none.
    #[serde(default)]
    pub response_json: Option<JsonTransform>,
}

/// Why a [`TransformConfig`] is invalid. `section` names the place, e.g.
/// `request_headers.set` or `response_json.rename`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    /// Not a valid header name.
    #[error("transform {section}: {name:?} is not a valid header name")]
    InvalidHeaderName {
        /// Where it was found.
        section: String,
        /// The name as configured.
        name: String,
    },
    /// Not a valid header value.
    #[error("transform {section}: value of {name:?} is not a valid header value")]
    InvalidHeaderValue {
        /// Where it was found.
        section: String,
        /// The header the value belongs to.
        name: String,
    },
    /// A framing, routing or hop-by-hop header that transforms may not touch.
    #[error("transform {section}: {name:?} may not be transformed (framing/hop-by-hop header)")]
    ProtectedHeader {
        /// Where it was found.
        section: String,
        /// The name as configured.
        name: String,
    },
    /// An empty path, or one with an empty segment (`a..b`, `.a`, `a.`).
    #[error("transform {section}: path {path:?} is empty or has an empty segment")]
    InvalidPath {
        /// Where it was found.
        section: String,
        /// The path as configured.
        path: String,
    },
    /// A rename target that is empty or contains `.` (it names one field, not a path).
    #[error(
        "transform {section}: new name {name:?} for {path:?} must be one non-empty field name without '.'"
    )]
    InvalidRenameTarget {
        /// Where it was found.
        section: String,
        /// The path being renamed.
        path: String,
        /// The new name as configured.
        name: String,
    },
}

/// Checks every header name and value and every JSON path of a configuration.
///
/// # Errors
/// The first invalid or protected header name, invalid header value, empty path or path
/// segment, or invalid rename target.
pub fn validate(cfg: &TransformConfig) -> Result<(), TransformError> {
    for (prefix, t) in [
        ("request_headers", &cfg.request_headers),
        ("response_headers", &cfg.response_headers),
    ] {
        if let Some(t) = t {
            validate_headers(prefix, t)?;
        }
    }
    for (prefix, t) in [
        ("request_json", &cfg.request_json),
        ("response_json", &cfg.response_json),
    ] {
        if let Some(t) = t {
            validate_json(prefix, t)?;
        }
    }
    Ok(())
}

fn validate_headers(prefix: &str, t: &HeaderTransform) -> Result<(), TransformError> {
    let name_check = |section: &str, name: &str| -> Result<HeaderName, TransformError> {
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            TransformError::InvalidHeaderName {
                section: section.to_owned(),
                name: name.to_owned(),
            }
        })?;
        if PROTECTED_HEADERS.contains(&parsed.as_str()) {
            return Err(TransformError::ProtectedHeader {
                section: section.to_owned(),
                name: name.to_owned(),
            });
        }
        Ok(parsed)
    };
    for name in &t.remove {
        name_check(&format!("{prefix}.remove"), name)?;
    }
    for (field, map) in [("set", &t.set), ("add", &t.add)] {
        let section = format!("{prefix}.{field}");
        for (name, value) in map {
            name_check(&section, name)?;
            HeaderValue::from_str(value).map_err(|_| TransformError::InvalidHeaderValue {
                section: section.clone(),
                name: name.clone(),
            })?;
        }
    }
    Ok(())
}

fn validate_json(prefix: &str, t: &JsonTransform) -> Result<(), TransformError> {
    let path_check = |section: String, path: &str| {
        if path.split('.').any(str::is_empty) {
            return Err(TransformError::InvalidPath {
                section,
                path: path.to_owned(),
            });
        }
        Ok(())
    };
    for path in &t.remove {
        path_check(format!("{prefix}.remove"), path)?;
    }
    for (path, name) in &t.rename {
        let section = format!("{prefix}.rename");
        path_check(section.clone(), path)?;
        if name.is_empty() || name.contains('.') {
            return Err(TransformError::InvalidRenameTarget {
                section,
                path: path.clone(),
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// A header name a transform may touch, or `None` (invalid or protected: skipped).
fn transformable(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .ok()
        .filter(|n| !PROTECTED_HEADERS.contains(&n.as_str()))
}

/// Applies header edits in the order remove, set, add.
///
/// Entries [`validate`] would reject (invalid or protected names, invalid values) are skipped,
/// so an unvalidated configuration can never corrupt framing headers.
pub fn apply_headers(t: &HeaderTransform, headers: &mut HeaderMap) {
    for name in t.remove.iter().filter_map(|n| transformable(n)) {
        headers.remove(name);
    }
    for (name, value) in &t.set {
        if let (Some(name), Ok(value)) = (transformable(name), HeaderValue::from_str(value)) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &t.add {
        if let (Some(name), Ok(value)) = (transformable(name), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
}

/// Whether a `Content-Type` is JSON: `application/json` or `application/<anything>+json`,
/// with or without parameters, case-insensitively.
pub fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(text)) = content_type.map(HeaderValue::to_str) else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some(subtype) = essence.strip_prefix("application/") else {
        return false;
    };
    subtype == "json"
        || subtype
            .strip_suffix("+json")
            .is_some_and(|base| !base.is_empty() && !base.contains(['/', ' ', '\t']))
}

/// The result of [`apply_json`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonOutcome {
    /// The rewritten body (compact JSON). The caller must update `Content-Length`.
    Rewritten(Vec<u8>),
    /// Pass the body through untouched: not a JSON content type, larger than `max_bytes`,
    /// not valid JSON, or no configured path matched anything.
    Unchanged,
}

/// Applies JSON edits (`remove`, then `rename`) to a buffered body.
///
/// The body is re-serialised only when an edit matched, so unmatched bodies keep their exact
/// bytes. A rewritten body is compact; object key order follows `serde_json`'s map (sorted
/// unless its `preserve_order` feature is on) and numbers go through `i64`/`u64`/`f64`, so
/// integers beyond 64 bits or decimals beyond `f64` precision may be rounded.
pub fn apply_json(
    t: &JsonTransform,
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> JsonOutcome {
    if !is_json(content_type) || body.len() > t.max_bytes {
        return JsonOutcome::Unchanged;
    }
    if t.remove.is_empty() && t.rename.is_empty() {
        return JsonOutcome::Unchanged;
    }
    let Ok(mut doc) = serde_json::from_slice::<Value>(body) else {
        return JsonOutcome::Unchanged;
    };
    let mut changed = false;
    for path in &t.remove {
        if let Some(segments) = split_path(path) {
            changed |= edit(&mut doc, &segments, &Edit::Remove);
        }
    }
    // Deepest paths first, so `user.fullName` is still found when `user` is renamed too.
    let mut renames: Vec<(Vec<&str>, &str)> = t
        .rename
        .iter()
        .filter(|(_, name)| !name.is_empty())
        .filter_map(|(path, name)| Some((split_path(path)?, name.as_str())))
        .collect();
    renames.sort_by_key(|(segments, _)| std::cmp::Reverse(segments.len()));
    for (segments, name) in &renames {
        changed |= edit(&mut doc, segments, &Edit::Rename(name));
    }
    if !changed {
        return JsonOutcome::Unchanged;
    }
    match serde_json::to_vec(&doc) {
        Ok(bytes) => JsonOutcome::Rewritten(bytes),
        Err(_) => JsonOutcome::Unchanged,
    }
}

/// Path segments, or `None` for a path [`validate`] would reject.
fn split_path(path: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = path.split('.').collect();
    (!segments.iter().any(|s| s.is_empty())).then_some(segments)
}

enum Edit<'a> {
    Remove,
    Rename(&'a str),
}

/// Applies `op` to the field named by `segments` under `value`, fanning out over arrays.
/// Returns whether anything changed.
fn edit(value: &mut Value, segments: &[&str], op: &Edit<'_>) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return false;
    };
    match value {
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, item| edit(item, segments, op) | changed),
        Value::Object(map) if rest.is_empty() => match op {
            Edit::Remove => map.remove(*first).is_some(),
            Edit::Rename(name) => {
                if *first == *name {
                    return false;
                }
                match map.remove(*first) {
                    Some(v) => {
                        map.insert((*name).to_owned(), v);
                        true
                    }
                    None => false,
                }
            }
        },
        Value::Object(map) => map
            .get_mut(*first)
            .is_some_and(|child| edit(child, rest, op)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ct(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).expect("test content type")
    }

    #[test]
    fn config_defaults_and_deny_unknown_fields() {
        let parsed: TransformConfig = serde_json::from_str("{}").expect("empty parses");
        assert_eq!(parsed, TransformConfig::default());
        let json: JsonTransform = serde_json::from_str("{}").expect("empty parses");
        assert_eq!(json.max_bytes, 1_048_576);
        assert!(serde_json::from_str::<HeaderTransform>(r#"{"append": {}}"#).is_err());
        assert!(serde_json::from_str::<TransformConfig>(r#"{"headers": {}}"#).is_err());
    }

    #[test]
    fn validate_table() {
        let headers = |t: HeaderTransform| TransformConfig {
            response_headers: Some(t),
            ..TransformConfig::default()
        };
        let json = |t: JsonTransform| TransformConfig {
            request_json: Some(t),
            ..TransformConfig::default()
        };
        let cases: &[(&str, TransformConfig, Option<&str>)] = &[
            ("empty", TransformConfig::default(), None),
            (
                "good headers",
                headers(HeaderTransform {
                    add: strings(&[("X-Gateway", "meshgate")]),
                    set: strings(&[("Cache-Control", "no-store")]),
                    remove: vec!["Server".into()],
                }),
                None,
            ),
            (
                "bad name",
                headers(HeaderTransform {
                    set: strings(&[("Bad Name", "x")]),
                    ..HeaderTransform::default()
                }),
                Some("transform response_headers.set: \"Bad Name\" is not a valid header name"),
            ),
            (
                "bad value",
                headers(HeaderTransform {
                    add: strings(&[("X-A", "line\nbreak")]),
                    ..HeaderTransform::default()
                }),
                Some(
                    "transform response_headers.add: value of \"X-A\" is not a valid header value",
                ),
            ),
            (
                "protected",
                headers(HeaderTransform {
                    remove: vec!["Content-Length".into()],
                    ..HeaderTransform::default()
                }),
                Some(
                    "transform response_headers.remove: \"Content-Length\" may not be transformed (framing/hop-by-hop header)",
                ),
            ),
            (
                "good paths",
                json(JsonTransform {
                    rename: strings(&[("user.fullName", "name")]),
                    remove: vec!["items.secret".into()],
                    ..JsonTransform::default()
                }),
                None,
            ),
            (
                "empty path",
                json(JsonTransform {
                    remove: vec!["".into()],
                    ..JsonTransform::default()
                }),
                Some("transform request_json.remove: path \"\" is empty or has an empty segment"),
            ),
            (
                "empty segment",
                json(JsonTransform {
                    rename: strings(&[("a..b", "c")]),
                    ..JsonTransform::default()
                }),
                Some(
                    "transform request_json.rename: path \"a..b\" is empty or has an empty segment",
                ),
            ),
            (
                "dotted target",
                json(JsonTransform {
                    rename: strings(&[("a.b", "c.d")]),
                    ..JsonTransform::default()
                }),
                Some(
                    "transform request_json.rename: new name \"c.d\" for \"a.b\" must be one non-empty field name without '.'",
                ),
            ),
        ];
        for (name, config, want) in cases {
            let got = validate(config).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), *want, "{name}");
        }
    }

    #[test]
    fn header_transform_order() {
        let t = HeaderTransform {
            add: strings(&[("x-multi", "added"), ("x-new", "fresh")]),
            set: strings(&[
                ("x-multi", "set"),
                ("x-removed", "reset"),
                ("x-replaced", "new"),
            ]),
            remove: vec![
                "X-Multi".into(),
                "x-removed".into(),
                "server".into(),
                "host".into(),
            ],
        };
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-multi", "orig1"),
            ("x-multi", "orig2"),
            ("x-removed", "orig"),
            ("x-replaced", "old1"),
            ("x-replaced", "old2"),
            ("server", "nginx"),
            ("host", "api.example"),
            ("x-untouched", "keep"),
        ] {
            headers.append(k, HeaderValue::from_static(v));
        }
        apply_headers(&t, &mut headers);
        let cases: &[(&str, &[&str])] = &[
            // removed, then set, then appended to
            ("x-multi", &["set", "added"]),
            // removed, then set again
            ("x-removed", &["reset"]),
            ("x-new", &["fresh"]),
            // set replaces every earlier value
            ("x-replaced", &["new"]),
            ("server", &[]),
            // protected: untouched despite the remove entry
            ("host", &["api.example"]),
            ("x-untouched", &["keep"]),
        ];
        for (name, want) in cases {
            let got: Vec<&str> = headers
                .get_all(*name)
                .iter()
                .map(|v| v.to_str().expect("ascii"))
                .collect();
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn is_json_table() {
        let cases = [
            ("application/json", true),
            ("Application/JSON", true),
            ("application/json; charset=utf-8", true),
            ("  application/json ;charset=UTF-8", true),
            ("application/problem+json", true),
            ("application/vnd.api+json; ext=bulk", true),
            ("APPLICATION/LD+JSON", true),
            ("application/+json", false),
            ("application/jsonp", false),
            ("application/json-seq", false),
            ("text/json", false),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
            ("multipart/form-data; boundary=x", false),
            ("", false),
        ];
        for (value, want) in cases {
            assert_eq!(is_json(Some(&ct(value))), want, "{value:?}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn json_edits_table() {
        let t = JsonTransform {
            rename: strings(&[
                ("user.fullName", "name"),
                ("items.sku", "id"),
                ("meta.same", "same"),
                ("meta", "info"),
            ]),
            remove: vec![
                "user.password".into(),
                "items.secret".into(),
                "items.tags.internal".into(),
                "missing.path".into(),
                "user.age.nested".into(),
            ],
            ..JsonTransform::default()
        };
        // (name, input, expected output; None = Unchanged)
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "nested rename and remove",
                r#"{"user":{"fullName":"Ada","password":"x","age":36},"keep":true}"#,
                Some(r#"{"keep":true,"user":{"age":36,"name":"Ada"}}"#),
            ),
            (
                "through arrays, nested arrays and non-objects",
                r#"{"items":[{"sku":"a","secret":1},{"sku":"b"},[{"secret":2}],3,{"tags":[{"internal":1,"x":2}]}]}"#,
                Some(r#"{"items":[{"id":"a"},{"id":"b"},[{}],3,{"tags":[{"x":2}]}]}"#),
            ),
            (
                "root array fans out",
                r#"[{"user":{"password":"p"}},{"user":null}]"#,
                Some(r#"[{"user":{}},{"user":null}]"#),
            ),
            (
                "rename replaces an existing field",
                r#"{"user":{"fullName":"Ada","name":"old"}}"#,
                Some(r#"{"user":{"name":"Ada"}}"#),
            ),
            (
                "nothing matches: bytes untouched",
                r#"{"other": 1,  "user": {"age": 3}}"#,
                None,
            ),
            (
                "rename onto itself is no change",
                r#"{"other":{"same":1}}"#,
                None,
            ),
            (
                "parent and child renamed",
                r#"{"meta":{"same":1},"user":{"fullName":"Ada"}}"#,
                Some(r#"{"info":{"same":1},"user":{"name":"Ada"}}"#),
            ),
            ("scalar root", "42", None),
            ("invalid JSON", r#"{"user":{"password":"x""#, None),
            ("not even UTF-8", "\u{0}\u{1}", None),
        ];
        let json = ct("application/json");
        for (name, input, want) in cases {
            let got = apply_json(&t, Some(&json), input.as_bytes());
            let want = match want {
                Some(text) => JsonOutcome::Rewritten(text.as_bytes().to_vec()),
                None => JsonOutcome::Unchanged,
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn json_passthrough_table() {
        let t = JsonTransform {
            remove: vec!["secret".into()],
            max_bytes: 32,
            ..JsonTransform::default()
        };
        let small = br#"{"secret":1,"a":2}"#;
        let big = br#"{"secret":1,"padding":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let cases: &[(&str, Option<&str>, &[u8], bool)] = &[
            ("json", Some("application/json"), small, true),
            (
                "+json with charset",
                Some("application/merge-patch+json; charset=utf-8"),
                small,
                true,
            ),
            ("text/plain", Some("text/plain"), small, false),
            ("no content type", None, small, false),
            ("oversized", Some("application/json"), big, false),
            ("invalid", Some("application/json"), b"{secret", false),
        ];
        for (name, content_type, body, rewritten) in cases {
            let header = content_type.map(ct);
            let got = apply_json(&t, header.as_ref(), body);
            assert_eq!(
                matches!(got, JsonOutcome::Rewritten(_)),
                *rewritten,
                "{name}: {got:?}"
            );
        }
        assert!(big.len() > 32 && small.len() <= 32);
    }
}
