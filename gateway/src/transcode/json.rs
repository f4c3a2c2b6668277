//! The proto3 JSON mapping, request side: a JSON value (or a query/path string) into a
//! [`DynamicMessage`], with errors that name the field by JSON pointer (`/items/0/quantity`).
//!
//! Written here rather than taken whole from prost-reflect because the gateway's rules differ
//! in two places: an unknown field is ignored by default but an invalid enum name is always an
//! error, and every error must say where it is. Well-known types with a special JSON form
//! (Timestamp, Duration, FieldMask, Struct, Value, ListValue, wrappers, Any, Empty) are handed
//! to prost-reflect's own deserializer, which implements those forms. The response side is
//! prost-reflect's serializer (see `SerializeOptions` in the action).
//!
//! Accepted, as the proto3 JSON spec says: 64-bit integers as numbers or strings, enums by
//! name or number, `json_name` and the original field name, `null` for "not set", bytes in
//! standard or URL-safe base64 with or without padding, `"NaN"`/`"Infinity"` for floats.

use std::collections::HashMap;

use base64::Engine as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value,
};
use serde_json::Value as Json;

/// A request value that does not fit the message: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON pointer of the offending value (`/order/items/0/quantity`), or the query
    /// parameter / path variable it came from (`?page_size`, `{id}`).
    pub at: String,
    /// What is wrong, e.g. `3000000000 is out of range for int32`.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.at.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

/// Parsing options.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Refuse unknown fields (strict mode) instead of ignoring them.
    pub strict: bool,
}

/// Well-known types whose JSON form is not an object of their fields.
pub fn is_special_wkt(full_name: &str) -> bool {
    matches!(
        full_name,
        "google.protobuf.Any"
            | "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.FieldMask"
            | "google.protobuf.ListValue"
            | "google.protobuf.Value"
            | "google.protobuf.Empty"
    )
}

struct Ptr(String);

impl Ptr {
    fn err(&self, message: impl Into<String>) -> FieldError {
        FieldError {
            at: if self.0.is_empty() {
                "/".into()
            } else {
                self.0.clone()
            },
            message: message.into(),
        }
    }
    fn push(&mut self, seg: &str) -> usize {
        let len = self.0.len();
        self.0.push('/');
        for c in seg.chars() {
            match c {
                '~' => self.0.push_str("~0"),
                '/' => self.0.push_str("~1"),
                c => self.0.push(c),
            }
        }
        len
    }
    fn pop(&mut self, len: usize) {
        self.0.truncate(len);
    }
}

/// `json` as a message of type `desc`; `at` prefixes the pointers of errors (`/order` when the
/// JSON is the body bound to field `order`, empty for the whole body).
pub fn message_from_json(
    desc: &MessageDescriptor,
    json: &Json,
    opts: ParseOptions,
    at: &str,
) -> Result<DynamicMessage, FieldError> {
    let mut p = Ptr(at.to_owned());
    message(desc, json, opts, &mut p)
}

/// Sets `field` of `msg` from `json` (the body bound to one field, `body: "order"`).
pub fn set_field_from_json(
    msg: &mut DynamicMessage,
    field: &FieldDescriptor,
    json: &Json,
    opts: ParseOptions,
) -> Result<(), FieldError> {
    let mut p = Ptr(String::new());
    if let Some(v) = field_value(field, json, opts, &mut p)? {
        msg.set_field(field, v);
    }
    Ok(())
}

fn message(
    desc: &MessageDescriptor,
    json: &Json,
    opts: ParseOptions,
    p: &mut Ptr,
) -> Result<DynamicMessage, FieldError> {
    if is_special_wkt(desc.full_name()) {
        let o = DeserializeOptions::new().deny_unknown_fields(opts.strict);
        return DynamicMessage::deserialize_with_options(desc.clone(), json, &o).map_err(|e| {
            p.err(format!(
                "not a valid {}: {}",
                desc.full_name(),
                strip_position(&e.to_string())
            ))
        });
    }
    let Json::Object(map) = json else {
        return Err(p.err(format!(
            "expected an object ({}), got {}",
            desc.name(),
            kind_of(json)
        )));
    };
    let mut msg = DynamicMessage::new(desc.clone());
    for (key, value) in map {
        let Some(field) = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
        else {
            if opts.strict {
                let l = p.push(key);
                let e = p.err(format!("unknown field {key:?} of {}", desc.name()));
                p.pop(l);
                return Err(e);
            }
            continue;
        };
        let l = p.push(key);
        let v = field_value(&field, value, opts, p)?;
        if let Some(v) = v {
            if let Some(oneof) = field.containing_oneof()
                && let Some(other) = oneof
                    .fields()
                    .find(|f| f.number() != field.number() && msg.has_field(f))
            {
                let e = p.err(format!(
                    "{} and {} are members of the same oneof {:?}; set at most one",
                    other.json_name(),
                    field.json_name(),
                    oneof.name()
                ));
                p.pop(l);
                return Err(e);
            }
            msg.set_field(&field, v);
        }
        p.pop(l);
    }
    Ok(msg)
}

/// The value of one field from JSON; `None` for `null` (not set).
fn field_value(
    field: &FieldDescriptor,
    json: &Json,
    opts: ParseOptions,
    p: &mut Ptr,
) -> Result<Option<Value>, FieldError> {
    let kind = field.kind();
    if json.is_null() {
        // null means "not set", except where null is itself a value
        return match &kind {
            Kind::Message(m) if m.full_name() == "google.protobuf.Value" && !field.is_list() => {
                Ok(Some(Value::Message(message(m, json, opts, p)?)))
            }
            Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue" => {
                Ok(Some(Value::EnumNumber(0)))
            }
            _ => Ok(None),
        };
    }
    if field.is_map() {
        let Json::Object(obj) = json else {
            return Err(p.err(format!("expected an object (a map), got {}", kind_of(json))));
        };
        let entry = kind
            .as_message()
            .expect("invariant: a map field's kind is its entry message")
            .clone();
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let mut out = HashMap::with_capacity(obj.len());
        for (k, v) in obj {
            let l = p.push(k);
            let key = map_key(&key_field.kind(), k).map_err(|m| p.err(m))?;
            if v.is_null() {
                p.pop(l);
                continue;
            }
            let v = single(&value_field.kind(), v, opts, p)?;
            out.insert(key, v);
            p.pop(l);
        }
        return Ok(Some(Value::Map(out)));
    }
    if field.is_list() {
        let Json::Array(items) = json else {
            return Err(p.err(format!(
                "expected an array (a repeated field), got {}",
                kind_of(json)
            )));
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let l = p.push(&i.to_string());
            if item.is_null() {
                return Err(p.err("null is not allowed in a repeated field"));
            }
            out.push(single(&kind, item, opts, p)?);
            p.pop(l);
        }
        return Ok(Some(Value::List(out)));
    }
    single(&kind, json, opts, p).map(Some)
}

fn kind_of(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn strip_position(s: &str) -> String {
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// The name of a scalar kind as proto writes it.
pub fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
    }
}

/// An integer from a JSON number or string, checked against `[min, max]`.
fn integer(k: &Kind, j: &Json, min: i128, max: i128) -> Result<i128, String> {
    let name = kind_name(k);
    let n: i128 = match j {
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                i128::from(i)
            } else if let Some(u) = n.as_u64() {
                i128::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                float_to_int(f).ok_or_else(|| format!("{n} is not an integer ({name})"))?
            }
        }
        Json::String(s) => {
            parse_int_str(s).ok_or_else(|| format!("{s:?} is not an integer ({name})"))?
        }
        other => {
            return Err(format!(
                "expected an integer ({name}), got {}",
                kind_of(other)
            ));
        }
    };
    if n < min || n > max {
        return Err(format!("{n} is out of range for {name}"));
    }
    Ok(n)
}

fn float_to_int(f: f64) -> Option<i128> {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1.8e19 {
        Some(f as i128)
    } else {
        None
    }
}

fn parse_int_str(s: &str) -> Option<i128> {
    let t = s.trim();
    if t != s || t.is_empty() {
        return None;
    }
    if let Ok(i) = t.parse::<i128>() {
        return Some(i);
    }
    // exponent notation ("1e3") is allowed for integral values
    t.parse::<f64>().ok().and_then(float_to_int)
}

fn float(k: &Kind, j: &Json) -> Result<f64, String> {
    let name = kind_name(k);
    let f = match j {
        Json::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Json::String(s) => match s.as_str() {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            s => s
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{s:?} is not a number ({name})"))?,
        },
        other => {
            return Err(format!(
                "expected a number ({name}), got {}",
                kind_of(other)
            ));
        }
    };
    if matches!(k, Kind::Float) && f.is_finite() && f.abs() > f64::from(f32::MAX) {
        return Err(format!("{f} is out of range for float"));
    }
    Ok(f)
}

/// Bytes from standard or URL-safe base64, padded or not.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let engine = if s.contains(['-', '_']) {
        if s.ends_with('=') {
            URL_SAFE
        } else {
            URL_SAFE_NO_PAD
        }
    } else if s.ends_with('=') {
        STANDARD
    } else {
        STANDARD_NO_PAD
    };
    engine.decode(s).ok()
}

fn single(k: &Kind, j: &Json, opts: ParseOptions, p: &mut Ptr) -> Result<Value, FieldError> {
    let e = |m: String| p.err(m);
    Ok(match k {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(integer(k, j, i128::from(i32::MIN), i128::from(i32::MAX)).map_err(e)? as i32)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(integer(k, j, i128::from(i64::MIN), i128::from(i64::MAX)).map_err(e)? as i64)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(integer(k, j, 0, i128::from(u32::MAX)).map_err(e)? as u32)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(integer(k, j, 0, i128::from(u64::MAX)).map_err(e)? as u64)
        }
        Kind::Double => Value::F64(float(k, j).map_err(e)?),
        Kind::Float => Value::F32(float(k, j).map_err(e)? as f32),
        Kind::Bool => match j {
            Json::Bool(b) => Value::Bool(*b),
            other => return Err(p.err(format!("expected true or false, got {}", kind_of(other)))),
        },
        Kind::String => match j {
            Json::String(s) => Value::String(s.clone()),
            other => return Err(p.err(format!("expected a string, got {}", kind_of(other)))),
        },
        Kind::Bytes => match j {
            Json::String(s) => Value::Bytes(
                decode_base64(s)
                    .ok_or_else(|| p.err("not valid base64 (bytes are base64 in JSON)"))?
                    .into(),
            ),
            other => {
                return Err(p.err(format!(
                    "expected a base64 string (bytes), got {}",
                    kind_of(other)
                )));
            }
        },
        Kind::Enum(en) => match j {
            Json::String(s) => match en.get_value_by_name(s) {
                Some(v) => Value::EnumNumber(v.number()),
                None => {
                    let names: Vec<String> = en.values().map(|v| v.name().to_owned()).collect();
                    return Err(p.err(format!(
                        "{s:?} is not a value of enum {} (one of {})",
                        en.name(),
                        names.join(", ")
                    )));
                }
            },
            Json::Number(_) => Value::EnumNumber(
                integer(&Kind::Int32, j, i128::from(i32::MIN), i128::from(i32::MAX))
                    .map_err(|m| p.err(format!("enum {}: {m}", en.name())))? as i32,
            ),
            other => {
                return Err(p.err(format!(
                    "expected an enum name or number ({}), got {}",
                    en.name(),
                    kind_of(other)
                )));
            }
        },
        Kind::Message(m) => Value::Message(message(m, j, opts, p)?),
    })
}

fn map_key(k: &Kind, s: &str) -> Result<MapKey, String> {
    let j = Json::String(s.to_owned());
    Ok(match k {
        Kind::String => MapKey::String(s.to_owned()),
        Kind::Bool => match s {
            "true" => MapKey::Bool(true),
            "false" => MapKey::Bool(false),
            _ => return Err(format!("map key {s:?} is not true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            MapKey::I32(integer(k, &j, i128::from(i32::MIN), i128::from(i32::MAX))? as i32)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            MapKey::I64(integer(k, &j, i128::from(i64::MIN), i128::from(i64::MAX))? as i64)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            MapKey::U32(integer(k, &j, 0, i128::from(u32::MAX))? as u32)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            MapKey::U64(integer(k, &j, 0, i128::from(u64::MAX))? as u64)
        }
        other => return Err(format!("{} cannot be a map key", kind_name(other))),
    })
}

/// A value for `field` from a query parameter or path variable `text`: scalars and enums
/// parse from their text, well-known types from their JSON string form (`2026-01-02T03:04:05Z`,
/// `1.5s`, `a,b.c`), wrappers as their wrapped scalar. Messages of other types cannot come from
/// a string.
pub fn value_from_text(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let k = field.kind();
    text_value(&k, text)
}

fn text_value(k: &Kind, text: &str) -> Result<Value, String> {
    let s = Json::String(text.to_owned());
    let mut p = Ptr(String::new());
    let strip = |e: FieldError| e.message;
    match k {
        Kind::Bool => match text {
            "true" | "1" => Ok(Value::Bool(true)),
            "false" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("{text:?} is not true or false")),
        },
        Kind::String => Ok(Value::String(text.to_owned())),
        Kind::Enum(en) => match en.get_value_by_name(text) {
            Some(v) => Ok(Value::EnumNumber(v.number())),
            None => match text.parse::<i32>() {
                Ok(n) => Ok(Value::EnumNumber(n)),
                Err(_) => {
                    let names: Vec<String> = en.values().map(|v| v.name().to_owned()).collect();
                    Err(format!(
                        "{text:?} is not a value of enum {} (one of {})",
                        en.name(),
                        names.join(", ")
                    ))
                }
            },
        },
        Kind::Message(m) => {
            let json = match m.full_name() {
                "google.protobuf.BoolValue" => match text {
                    "true" | "1" => Json::Bool(true),
                    "false" | "0" => Json::Bool(false),
                    _ => return Err(format!("{text:?} is not true or false")),
                },
                "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
                    match text.parse::<i64>() {
                        Ok(n) => Json::from(n),
                        Err(_) => return Err(format!("{text:?} is not an integer")),
                    }
                }
                "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
                    match text.parse::<f64>() {
                        Ok(f) if f.is_finite() => Json::from(f),
                        _ => s.clone(),
                    }
                }
                "google.protobuf.Timestamp"
                | "google.protobuf.Duration"
                | "google.protobuf.FieldMask"
                | "google.protobuf.StringValue"
                | "google.protobuf.BytesValue"
                | "google.protobuf.Int64Value"
                | "google.protobuf.UInt64Value" => s.clone(),
                other => {
                    return Err(format!(
                        "a {other} cannot be given as text; set its fields one by one (name.field=value)"
                    ));
                }
            };
            message(m, &json, ParseOptions::default(), &mut p)
                .map(Value::Message)
                .map_err(strip)
        }
        _ => single(k, &s, ParseOptions::default(), &mut p).map_err(strip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::DescriptorPool;
    use serde_json::json;

    fn pool() -> DescriptorPool {
        crate::transcode::descriptors::tests::demo_pool()
    }

    fn order() -> MessageDescriptor {
        pool()
            .get_message_by_name("demo.orders.v1.Order")
            .expect("Order")
    }

    fn parse(j: Json, strict: bool) -> Result<DynamicMessage, FieldError> {
        message_from_json(&order(), &j, ParseOptions { strict }, "")
    }

    #[test]
    fn every_mapping_parses() {
        let m = parse(
            json!({
                "id": "o1", "status": "PAID", "totalCents": "9007199254740993", "sequence": 18446744073709551615u64,
                "items": [{"sku": "A", "quantity": 2, "priceCents": 150}],
                "createdAt": "2026-01-02T03:04:05.5Z", "holdFor": "90s",
                "metadata": {"a": [1, "x", null]}, "coupon": "SAVE", "signature": "aGk=",
                "labels": {"k": "v"}, "card": {"last4": "4242"}, "customer_email": "a@b",
                "extra": null, "weightKg": "NaN", "gift": true, "rating": 4.5,
                "parentId": "12", "updatedFields": "status,totalCents", "unknown": 1
            }),
            false,
        )
        .expect("parses");
        let out = serde_json::to_value(&m).expect("json");
        assert_eq!(out["totalCents"], "9007199254740993", "no precision lost");
        assert_eq!(out["sequence"], "18446744073709551615");
        assert_eq!(out["status"], "PAID");
        assert_eq!(out["createdAt"], "2026-01-02T03:04:05.500Z");
        assert_eq!(out["holdFor"], "90s");
        assert_eq!(out["signature"], "aGk=");
        assert_eq!(
            out["email"], "a@b",
            "json_name on output, proto name accepted"
        );
        assert_eq!(out["extra"], Json::Null, "null is a Value");
        assert_eq!(out["updatedFields"], "status,totalCents");
        assert_eq!(out["parentId"], "12");
        assert_eq!(out["metadata"], json!({"a": [1.0, "x", null]}));
        // enum numbers are accepted
        let m = parse(json!({"status": 3}), false).expect("number");
        assert_eq!(serde_json::to_value(&m).expect("json")["status"], "SHIPPED");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                json!({"items": [{"quantity": 3000000000u64}]}),
                "/items/0/quantity",
                "out of range for int32",
            ),
            (
                json!({"items": [{"quantity": 1.5}]}),
                "/items/0/quantity",
                "not an integer",
            ),
            (
                json!({"sequence": -1}),
                "/sequence",
                "out of range for uint64",
            ),
            (
                json!({"totalCents": "12x"}),
                "/totalCents",
                "not an integer",
            ),
            (
                json!({"status": "LOST"}),
                "/status",
                "not a value of enum Status",
            ),
            (json!({"gift": "yes"}), "/gift", "expected true or false"),
            (json!({"id": 7}), "/id", "expected a string"),
            (
                json!({"items": {"sku": "A"}}),
                "/items",
                "expected an array",
            ),
            (json!({"signature": "***"}), "/signature", "base64"),
            (json!({"createdAt": "yesterday"}), "/createdAt", "Timestamp"),
            (
                json!({"card": {"last4": "1"}, "voucherCode": "V"}),
                "/voucherCode",
                "same oneof",
            ),
            (
                json!({"rating": 1e300}),
                "/rating",
                "out of range for float",
            ),
            (json!([1]), "/", "expected an object"),
            (
                json!({"labels": {"k": 1}}),
                "/labels/k",
                "expected a string",
            ),
        ];
        for (j, at, msg) in cases {
            let e = parse(j.clone(), false).expect_err(&j.to_string());
            assert_eq!(e.at, at, "{j}: {e}");
            assert!(e.message.contains(msg), "{j}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_unless_strict() {
        assert!(parse(json!({"nope": 1, "items": [{"nope": 2}]}), false).is_ok());
        let e = parse(json!({"items": [{"sku": "a", "nope": 2}]}), true).expect_err("strict");
        assert_eq!(e.at, "/items/0/nope");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn text_values_for_query_and_path() {
        let req = pool()
            .get_message_by_name("demo.orders.v1.ListOrdersRequest")
            .expect("req");
        let f = |n: &str| req.get_field_by_name(n).expect(n);
        assert_eq!(value_from_text(&f("page_size"), "20"), Ok(Value::I32(20)));
        assert!(value_from_text(&f("page_size"), "x").is_err());
        assert_eq!(
            value_from_text(&f("status"), "PAID"),
            Ok(Value::EnumNumber(2))
        );
        assert_eq!(value_from_text(&f("status"), "3"), Ok(Value::EnumNumber(3)));
        assert!(value_from_text(&f("status"), "LOST").is_err());
        assert_eq!(value_from_text(&f("gift"), "true"), Ok(Value::Bool(true)));
        assert_eq!(
            value_from_text(&f("min_sequence"), "18446744073709551615"),
            Ok(Value::U64(u64::MAX))
        );
        assert!(matches!(
            value_from_text(&f("created_after"), "2026-01-02T03:04:05Z"),
            Ok(Value::Message(_))
        ));
        assert!(value_from_text(&f("created_after"), "soon").is_err());
        assert!(matches!(
            value_from_text(&f("max_age"), "1.5s"),
            Ok(Value::Message(_))
        ));
        assert!(matches!(
            value_from_text(&f("min_items"), "3"),
            Ok(Value::Message(_))
        ));
        assert!(
            value_from_text(&f("filter"), "x").is_err(),
            "a plain message"
        );
        assert_eq!(
            value_from_text(&f("max_weight_kg"), "2.5"),
            Ok(Value::F64(2.5))
        );
    }
}
