//! `google.api.http` path templates: parsing (`/v1/{name=shelves/*/books/**}:publish`) and
//! matching against a request's raw path, with the decoding rules of http.proto.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! Matching works on the path as sent (percent-escapes intact), segment by segment, so an
//! encoded `/` (`%2F`) never splits a segment. A variable of one segment (`{id}`, `{id=*}`) is
//! then decoded fully; a variable of several segments (`{name=**}`, `{name=a/*}`) is decoded
//! except `%2F`, which stays as is (http.proto, "Path template syntax"). Pure: no I/O.

use std::fmt;

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// Exactly this text.
    Literal(String),
    /// `*`: one non-empty segment.
    One,
    /// `**`: zero or more segments (only last).
    Rest,
}

/// A variable: the request field it sets and the segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// The field path, `order.id` -> `["order", "id"]`.
    pub field: Vec<String>,
    /// First segment it covers.
    pub start: usize,
    /// One past its last segment (`segs.len()` when it ends with `**`).
    pub end: usize,
    /// More than one segment, or `**`: `%2F` is kept undecoded.
    pub multi: bool,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The segments, variables expanded (`{id}` is one [`Seg::One`]).
    pub segs: Vec<Seg>,
    /// The custom verb (`cancel` of `:cancel`).
    pub verb: Option<String>,
    /// The variables, in template order.
    pub vars: Vec<Var>,
    /// The template as written.
    pub source: String,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a matched variable cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The field it binds, dotted.
    pub field: String,
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn literal_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b'@'
                )
        })
}

impl Template {
    /// Parses `source`; errors say what is wrong and where.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let err = |m: String| TemplateError(format!("path template {source:?}: {m}"));
        let Some(rest) = source.strip_prefix('/') else {
            return Err(err("must start with '/'".into()));
        };
        // the verb: a ':' after the last '/' that is outside braces
        let mut depth = 0i32;
        let mut colon = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                '/' if depth == 0 => colon = None,
                ':' if depth == 0 => colon = Some(i),
                _ => {}
            }
            if depth < 0 {
                return Err(err("'}' without '{'".into()));
            }
        }
        if depth != 0 {
            return Err(err("a '{' is not closed".into()));
        }
        let (body, verb) = match colon {
            Some(i) => {
                let v = &rest[i + 1..];
                if !literal_ok(v) {
                    return Err(err(format!("custom verb {v:?} is not a literal")));
                }
                (&rest[..i], Some(v.to_owned()))
            }
            None => (rest, None),
        };
        let mut segs = Vec::new();
        let mut vars: Vec<Var> = Vec::new();
        for part in split_top(body) {
            if let Some(inner) = part.strip_prefix('{') {
                let Some(inner) = inner.strip_suffix('}') else {
                    return Err(err(format!("segment {part:?} mixes a variable and text")));
                };
                let (field, pattern) = match inner.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (inner, "*"),
                };
                let path: Vec<String> = field.split('.').map(str::to_owned).collect();
                if path.iter().any(|p| !is_ident(p)) {
                    return Err(err(format!("variable {field:?} is not a field path")));
                }
                if vars.iter().any(|v| v.field == path) {
                    return Err(err(format!("variable {field:?} appears twice")));
                }
                let start = segs.len();
                let mut n = 0;
                for p in pattern.split('/') {
                    segs.push(plain_seg(p).map_err(&err)?);
                    n += 1;
                }
                let multi = n > 1 || segs[start..].contains(&Seg::Rest);
                vars.push(Var {
                    field: path,
                    start,
                    end: start + n,
                    multi,
                });
            } else {
                segs.push(plain_seg(part).map_err(&err)?);
            }
        }
        if let Some(i) = segs.iter().position(|s| *s == Seg::Rest)
            && i + 1 != segs.len()
        {
            return Err(err("'**' must be the last segment".into()));
        }
        Ok(Template {
            segs,
            verb,
            vars,
            source: source.to_owned(),
        })
    }

    /// Matches the raw `path` (with escapes, without the query): the raw text each variable
    /// covers, in [`Template::vars`] order; `None` when the path does not fit.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(v) => {
                let stem = rest.strip_suffix(v.as_str())?.strip_suffix(':')?;
                // the verb belongs to the last segment
                if stem.ends_with('/') {
                    return None;
                }
                stem
            }
            None => rest,
        };
        // segment boundaries (byte offsets into `rest`)
        let mut bounds: Vec<(usize, usize)> = Vec::with_capacity(self.segs.len() + 1);
        if !rest.is_empty() || self.segs.first() != Some(&Seg::Rest) {
            let mut start = 0;
            for (i, b) in rest.bytes().enumerate() {
                if b == b'/' {
                    bounds.push((start, i));
                    start = i + 1;
                }
            }
            bounds.push((start, rest.len()));
        }
        let mut k = 0;
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Rest => {
                    debug_assert_eq!(i + 1, self.segs.len());
                    // zero or more segments, none of them empty except a lone trailing one
                    k = bounds.len();
                }
                Seg::One => {
                    let (a, b) = *bounds.get(k)?;
                    if a == b {
                        return None;
                    }
                    k += 1;
                }
                Seg::Literal(l) => {
                    let (a, b) = *bounds.get(k)?;
                    if &rest[a..b] != l {
                        return None;
                    }
                    k += 1;
                }
            }
        }
        if k != bounds.len() {
            return None;
        }
        let text = |from: usize, to: usize| -> &'p str {
            if from >= to || from >= bounds.len() {
                return "";
            }
            let a = bounds[from].0;
            let b = bounds[(to - 1).min(bounds.len() - 1)].1;
            &rest[a..b]
        };
        Some(
            self.vars
                .iter()
                .map(|v| {
                    let to = if self.segs[v.end - 1] == Seg::Rest {
                        bounds.len()
                    } else {
                        v.end
                    };
                    let from = v.start;
                    // a `**` variable that matched nothing
                    if from >= to { "" } else { text(from, to) }
                })
                .collect(),
        )
    }

    /// How specific the template is, for choosing among several that match one path: literal
    /// segments beat `*`, which beats `**`, compared segment by segment; a verb wins ties.
    pub fn rank(&self) -> (Vec<u8>, bool) {
        (
            self.segs
                .iter()
                .map(|s| match s {
                    Seg::Literal(_) => 3,
                    Seg::One => 2,
                    Seg::Rest => 1,
                })
                .collect(),
            self.verb.is_some(),
        )
    }

    /// The template in OpenAPI form: `/v1/orders/{id}:cancel`, `{name}` for `{name=**}`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segs.len() {
            if let Some(v) = self.vars.iter().find(|v| v.start == i) {
                out.push('/');
                out.push('{');
                out.push_str(&v.field.join("."));
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            out.push('/');
            match &self.segs[i] {
                Seg::Literal(l) => out.push_str(l),
                Seg::One => out.push('*'),
                Seg::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if out.is_empty() {
            out.push('/');
        }
        if let Some(v) = &self.verb {
            out.push(':');
            out.push_str(v);
        }
        out
    }
}

/// Splits on '/' outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '/' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn plain_seg(p: &str) -> Result<Seg, String> {
    match p {
        "*" => Ok(Seg::One),
        "**" => Ok(Seg::Rest),
        "" => Err("empty segment".into()),
        l if literal_ok(l) => Ok(Seg::Literal(l.to_owned())),
        l => Err(format!(
            "segment {l:?} is not a literal, '*', '**' or a {{variable}}"
        )),
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes a matched variable: everything for a single-segment variable; all but
/// `%2F`/`%2f` for a multi-segment one. `None` when the result is not UTF-8 or an escape is
/// malformed.
pub fn decode_var(raw: &str, multi: bool) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_owned());
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = hex(*b.get(i + 1)?)?;
            let l = hex(*b.get(i + 2)?)?;
            let v = h << 4 | l;
            if multi && v == b'/' {
                out.extend_from_slice(&b[i..i + 3]);
            } else {
                out.push(v);
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn templates_parse_into_segments_variables_and_verbs() {
        let x = t("/v1/{name=shelves/*/books/**}:publish");
        assert_eq!(
            x.segs,
            [
                Seg::Literal("v1".into()),
                Seg::Literal("shelves".into()),
                Seg::One,
                Seg::Literal("books".into()),
                Seg::Rest
            ]
        );
        assert_eq!(x.verb.as_deref(), Some("publish"));
        assert_eq!(
            x.vars,
            [Var {
                field: vec!["name".into()],
                start: 1,
                end: 5,
                multi: true
            }]
        );
        let y = t("/v1/orders/{order.id}");
        assert_eq!(y.vars[0].field, ["order", "id"]);
        assert!(!y.vars[0].multi);
        assert_eq!(t("/v1/orders:watch").verb.as_deref(), Some("watch"));
        assert_eq!(
            t("/v1/orders/{id}:cancel").openapi_path(),
            "/v1/orders/{id}:cancel"
        );
        assert_eq!(t("/v1/files/{name=**}").openapi_path(), "/v1/files/{name}");
        for bad in [
            "v1/x",
            "/v1/{id",
            "/v1/id}",
            "/v1/**/x",
            "/v1/{a}/{a}",
            "/v1/{1x}",
            "/v1//x",
            "/v1/x{id}",
            "/v1/x:",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn matching_binds_variables_on_the_raw_path() {
        let cases: &[(&str, &str, Option<&[&str]>)] = &[
            ("/v1/orders/{id}", "/v1/orders/7", Some(&["7"])),
            ("/v1/orders/{id}", "/v1/orders/a%2Fb", Some(&["a%2Fb"])),
            ("/v1/orders/{id}", "/v1/orders/", None),
            ("/v1/orders/{id}", "/v1/orders/7/x", None),
            ("/v1/orders/{id}", "/v1/orders", None),
            // without a verb in the template, ':' is part of the segment
            (
                "/v1/orders/{id}",
                "/v1/orders/7:cancel",
                Some(&["7:cancel"]),
            ),
            (
                "/v1/orders/{id}:cancel",
                "/v1/orders/7:cancel",
                Some(&["7"]),
            ),
            ("/v1/orders/{id}:cancel", "/v1/orders/7", None),
            ("/v1/orders/{id}:cancel", "/v1/orders/7:undo", None),
            ("/v1/orders:watch", "/v1/orders:watch", Some(&[])),
            ("/v1/orders:watch", "/v1/orders/:watch", None),
            (
                "/v1/files/{name=**}",
                "/v1/files/a/b/c.txt",
                Some(&["a/b/c.txt"]),
            ),
            ("/v1/files/{name=**}", "/v1/files", Some(&[""])),
            (
                "/v1/{name=shelves/*/books/*}",
                "/v1/shelves/1/books/2",
                Some(&["shelves/1/books/2"]),
            ),
            (
                "/v1/{name=shelves/*/books/*}",
                "/v1/shelves/1/novels/2",
                None,
            ),
            ("/v1/a/*/c", "/v1/a/b/c", Some(&[])),
            (
                "/v1/shops/{shop}/orders/{id}",
                "/v1/shops/s1/orders/9",
                Some(&["s1", "9"]),
            ),
        ];
        for (tpl, path, want) in cases {
            let got = t(tpl).matches(path);
            assert_eq!(got.as_deref(), *want, "{tpl} vs {path}");
        }
    }

    #[test]
    fn variables_decode_as_http_proto_says() {
        // single segment: every escape
        assert_eq!(decode_var("a%2Fb%20c", false).as_deref(), Some("a/b c"));
        assert_eq!(decode_var("caf%C3%A9", false).as_deref(), Some("café"));
        // multi segment: all but %2F
        assert_eq!(
            decode_var("a/b%2Fc%20d", true).as_deref(),
            Some("a/b%2Fc d")
        );
        assert_eq!(decode_var("x%2fy", true).as_deref(), Some("x%2fy"));
        assert_eq!(decode_var("%FF", false), None, "not UTF-8");
        assert_eq!(decode_var("%G1", false), None);
        assert_eq!(decode_var("%4", false), None);
    }

    #[test]
    fn literals_beat_variables_which_beat_rest() {
        let a = t("/v1/orders/special");
        let b = t("/v1/orders/{id}");
        let c = t("/v1/{name=**}");
        assert!(a.rank() > b.rank());
        assert!(b.rank() > c.rank());
        assert!(t("/v1/orders/{id}:cancel").rank() > b.rank());
    }
}
