//! Request fields from the URL: path variables and query parameters set into the request
//! message by field path (`order.id`, `filter.min_total_cents`), by proto or JSON name. Pure.

use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use super::json::{FieldError, value_from_text};

/// `a=1&b=x+y&c=%C3%A9` as decoded pairs (`+` is a space, `%XX` decoded, invalid UTF-8
/// replaced); pairs without a name are skipped.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = form_decode(k);
            (!k.is_empty()).then(|| (k, form_decode(v)))
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The field chain `dotted` names in `msg` (each part a proto or JSON name).
pub fn resolve(msg: &MessageDescriptor, dotted: &str) -> Option<Vec<FieldDescriptor>> {
    let mut m = msg.clone();
    let mut out = Vec::new();
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, name) in parts.iter().enumerate() {
        let f = m
            .get_field_by_name(name)
            .or_else(|| m.get_field_by_json_name(name))?;
        if i + 1 < parts.len() {
            m = match f.kind() {
                prost_reflect::Kind::Message(k) if !f.is_list() && !f.is_map() => k,
                _ => return None,
            };
        }
        out.push(f);
    }
    Some(out)
}

/// Sets (or, for a repeated leaf, appends) `v` at `path` in `msg`, creating the messages on
/// the way.
pub fn set_at(msg: &mut DynamicMessage, path: &[FieldDescriptor], v: Value) {
    let Some((leaf, inner)) = path.split_last() else {
        return;
    };
    let mut m = msg;
    for f in inner {
        let slot = m.get_field_mut(f);
        let Value::Message(next) = slot else {
            return;
        };
        m = next;
    }
    if leaf.is_list() {
        if let Value::List(l) = m.get_field_mut(leaf) {
            l.push(v);
        }
    } else {
        m.set_field(leaf, v);
    }
}

/// What to do with query parameters that name no field.
#[derive(Debug, Clone, Copy)]
pub struct QueryRules<'a> {
    /// Refuse them (strict mode).
    pub strict: bool,
    /// Field paths (proto names) the path binds: query values for them are ignored.
    pub bound: &'a [Vec<String>],
    /// The top-level field the body binds (`body: "order"`), whose subtree the query may not set.
    pub body_field: Option<&'a str>,
}

/// Applies the query parameters to `msg`.
pub fn apply_query(
    msg: &mut DynamicMessage,
    pairs: &[(String, String)],
    rules: QueryRules<'_>,
) -> Result<(), FieldError> {
    let desc = msg.descriptor();
    let mut seen: Vec<Vec<String>> = Vec::new();
    let mut unknown: Vec<&str> = Vec::new();
    for (name, value) in pairs {
        let at = format!("?{name}");
        let Some(path) = resolve(&desc, name) else {
            if rules.strict {
                unknown.push(name);
            }
            continue;
        };
        let names: Vec<String> = path.iter().map(|f| f.name().to_owned()).collect();
        if rules.bound.contains(&names) || rules.body_field.is_some_and(|b| names[0] == b) {
            // the path (or the body) wins
            continue;
        }
        let leaf = path
            .last()
            .expect("invariant: resolve returns a non-empty path");
        if leaf.is_map() {
            return Err(FieldError {
                at,
                message: "a map field cannot be set from the query".into(),
            });
        }
        if !leaf.is_list() {
            if seen.contains(&names) {
                return Err(FieldError {
                    at,
                    message: "given more than once, but the field is not repeated".into(),
                });
            }
            seen.push(names);
        }
        let v = value_from_text(leaf, value).map_err(|message| FieldError { at, message })?;
        set_at(msg, &path, v);
    }
    if !unknown.is_empty() {
        return Err(FieldError {
            at: format!("?{}", unknown.join(", ?")),
            message: format!(
                "{} no field of {} (this route is strict)",
                if unknown.len() == 1 { "names" } else { "name" },
                desc.full_name()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list_req() -> DynamicMessage {
        let pool = crate::transcode::descriptors::tests::demo_pool();
        DynamicMessage::new(
            pool.get_message_by_name("demo.orders.v1.ListOrdersRequest")
                .expect("req"),
        )
    }

    fn json(m: &DynamicMessage) -> serde_json::Value {
        serde_json::to_value(m).expect("json")
    }

    const LAX: QueryRules<'static> = QueryRules {
        strict: false,
        bound: &[],
        body_field: None,
    };

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            parse_query("a=1&b=x+y&c=%C3%A9&&=z&d"),
            [
                ("a".to_owned(), "1".to_owned()),
                ("b".into(), "x y".into()),
                ("c".into(), "é".into()),
                ("d".into(), String::new())
            ]
        );
    }

    #[test]
    fn query_parameters_set_nested_repeated_enum_and_wkt_fields() {
        let mut m = list_req();
        let q = parse_query(
            "shop=s1&status=PAID&status=2&status=SHIPPED&pageSize=5&filter.min_total_cents=100&filter.sku=A%201&labels=a&labels=b&createdAfter=2026-01-02T03:04:05Z&min_items=3&gift=true&min_sequence=18446744073709551615&max_age=90s&unknown=1",
        );
        apply_query(&mut m, &q, LAX).expect("applies");
        let j = json(&m);
        assert_eq!(j["shop"], "s1");
        assert_eq!(j["status"], serde_json::json!(["PAID", "PAID", "SHIPPED"]));
        assert_eq!(j["pageSize"], 5);
        assert_eq!(j["filter"]["minTotalCents"], "100");
        assert_eq!(j["filter"]["sku"], "A 1");
        assert_eq!(j["labels"], serde_json::json!(["a", "b"]));
        assert_eq!(j["createdAfter"], "2026-01-02T03:04:05Z");
        assert_eq!(j["minItems"], 3);
        assert_eq!(j["gift"], true);
        assert_eq!(j["minSequence"], "18446744073709551615");
        assert_eq!(j["maxAge"], "90s");
    }

    #[test]
    fn bad_and_unknown_parameters() {
        for (q, at, msg) in [
            ("pageSize=x", "?pageSize", "not an integer"),
            ("status=LOST", "?status", "not a value of enum"),
            ("shop=a&shop=b", "?shop", "more than once"),
            ("filter=1", "?filter", "set its fields"),
        ] {
            let e = apply_query(&mut list_req(), &parse_query(q), LAX).expect_err(q);
            assert_eq!(e.at, at, "{q}: {e}");
            assert!(e.message.contains(msg), "{q}: {e}");
        }
        let strict = QueryRules {
            strict: true,
            ..LAX
        };
        let e = apply_query(&mut list_req(), &parse_query("nope=1&x.y=2&shop=a"), strict)
            .expect_err("strict");
        assert_eq!(e.at, "?nope, ?x.y");
        // a bound field keeps the path's value
        let mut m = list_req();
        let shop = resolve(&m.descriptor(), "shop").expect("shop");
        set_at(&mut m, &shop, Value::String("from-path".into()));
        let bound = vec![vec!["shop".to_owned()]];
        apply_query(
            &mut m,
            &parse_query("shop=from-query"),
            QueryRules {
                bound: &bound,
                ..LAX
            },
        )
        .expect("ok");
        assert_eq!(json(&m)["shop"], "from-path");
    }
}
