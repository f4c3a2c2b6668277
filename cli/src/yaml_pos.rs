//! Where things are in a YAML file: a tree of every key and value with its line and column
//! (serde-saphyr's `Spanned`), and the lookup from a config path such as `routes[2].backend`
//! or `auth.jwt (demo)` to a position, so errors found after parsing still point at
//! `file:line:column`.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Pos {
    /// Line, from 1.
    pub(crate) line: u64,
    /// Column, from 1.
    pub(crate) column: u64,
}

impl Pos {
    fn of<T>(s: &Spanned<T>) -> Option<Self> {
        let l = s.referenced;
        (l.line() > 0).then(|| Self {
            line: l.line(),
            column: l.column(),
        })
    }
}

/// A YAML node with positions.
#[derive(Debug)]
enum Node {
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar(String),
}

/// A mapping key as text (numbers and booleans as written).
#[derive(Debug)]
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor).map(|n| match n {
            Node::Scalar(s) => Key(s),
            _ => Key(String::new()),
        })
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Scalar(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Scalar(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Scalar(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Scalar(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Scalar(v.to_string()))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Scalar(v.to_string()))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(String::new()))
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(String::new()))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = a.next_element::<Spanned<Node>>()? {
            v.push(x);
        }
        Ok(Node::Seq(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
        let mut v = Vec::new();
        while let Some(k) = a.next_key::<Spanned<Key>>()? {
            let val = a.next_value::<Spanned<Node>>()?;
            v.push((k, val));
        }
        Ok(Node::Map(v))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// One step of a config path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    /// `(name)`: the element of a list whose `name` is this.
    Named(String),
}

/// Parses `routes[1] (users).cors`, `discovery.static.users`, `auth.jwt (demo)`.
fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut rest = path.trim();
    while !rest.is_empty() {
        rest = rest.trim_start_matches('.');
        let end = rest.find(['.', '[', ' ']).unwrap_or(rest.len());
        if end > 0 {
            out.push(Step::Key(rest[..end].to_owned()));
        }
        rest = &rest[end..];
        loop {
            if let Some(r) = rest.strip_prefix('[') {
                let Some(close) = r.find(']') else {
                    return out;
                };
                match r[..close].parse() {
                    Ok(i) => out.push(Step::Index(i)),
                    Err(_) => return out,
                }
                rest = &r[close + 1..];
            } else if let Some(r) = rest.strip_prefix(" (") {
                let Some(close) = r.find(')') else {
                    return out;
                };
                out.push(Step::Named(r[..close].to_owned()));
                rest = &r[close + 1..];
            } else {
                break;
            }
        }
        if rest.starts_with(' ') {
            return out;
        }
    }
    out
}

/// The positions of every node of one YAML document.
#[derive(Debug)]
pub(crate) struct YamlIndex {
    root: Option<Spanned<Node>>,
}

impl YamlIndex {
    /// Indexes `text`; a document that does not parse gives an empty index.
    pub(crate) fn new(text: &str) -> Self {
        Self {
            root: serde_saphyr::from_str::<Spanned<Node>>(text).ok(),
        }
    }

    #[cfg(test)]
    /// The position of the deepest node on `path` that exists: the key for map entries (so
    /// `routes[2].backend` points at `backend:`), the element for list items. None when not
    /// even the first step exists.
    pub(crate) fn locate(&self, path: &str) -> Option<Pos> {
        self.walk(&steps(path)).map(|(pos, _)| pos)
    }

    /// The position of the deepest node on `path` that exists, then one or two steps further when `message` starts with a
    /// key under that node (`backend split weights…` under `routes[0]`, or `endpoint: …` under
    /// an introspection provider): the most precise position the text allows.
    pub(crate) fn locate_message(&self, path: &str, message: &str) -> Option<Pos> {
        let base = steps(path);
        let word: String = message
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .collect();
        let word = word.trim_end_matches('.');
        if !word.is_empty() {
            let mut deeper = base.clone();
            deeper.extend(word.split('.').map(|k| Step::Key(k.to_owned())));
            if let Some((pos, depth)) = self.walk(&deeper)
                && depth > base.len()
            {
                return Some(pos);
            }
        }
        self.walk(&base).map(|(pos, _)| pos)
    }

    /// Follows `steps` as far as they exist; returns the last position and how many steps
    /// were followed.
    fn walk(&self, steps: &[Step]) -> Option<(Pos, usize)> {
        let mut node = self.root.as_ref()?;
        let mut pos = None;
        let mut depth = 0;
        for step in steps {
            let next = match (step, &node.value) {
                (Step::Key(k), Node::Map(entries)) => entries
                    .iter()
                    .find(|(key, _)| key.value.0 == *k)
                    .map(|(key, v)| (Pos::of(key), v)),
                (Step::Index(i), Node::Seq(items)) => items.get(*i).map(|v| (Pos::of(v), v)),
                (Step::Named(name), Node::Seq(items)) => items
                    .iter()
                    .find(|item| match &item.value {
                        Node::Map(e) => e.iter().any(|(k, v)| {
                            k.value.0 == "name" && matches!(&v.value, Node::Scalar(s) if s == name)
                        }),
                        _ => false,
                    })
                    .map(|v| (Pos::of(v), v)),
                // `routes[1] (users)`: the name only repeats what the index said
                (Step::Named(_), Node::Map(_)) => Some((pos, node)),
                _ => None,
            };
            let Some((p, n)) = next else { break };
            if p.is_some() {
                pos = p;
            }
            node = n;
            depth += 1;
        }
        pos.map(|p| (p, depth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
node: gw
listen:
  admin: 127.0.0.1:15000
routes:
  - name: a
    backend: { service: x }
  - name: users
    backend:
      split:
        - { service: users, weight: 0 }
auth:
  jwt:
    - name: other
    - name: demo
      issuer: me
";

    #[test]
    fn paths_map_to_lines_and_columns() {
        let idx = YamlIndex::new(YAML);
        let at = |p: &str| idx.locate(p).map(|p| (p.line, p.column));
        assert_eq!(at("node"), Some((1, 1)));
        assert_eq!(at("listen.admin"), Some((3, 3)));
        assert_eq!(at("routes[1]"), Some((7, 5)));
        assert_eq!(at("routes[1].backend"), Some((8, 5)));
        assert_eq!(
            at("routes[1] (users).backend.split[0].service"),
            Some((10, 13))
        );
        assert_eq!(at("auth.jwt (demo)"), Some((14, 7)));
        // as deep as the file goes
        assert_eq!(at("routes[0].backend.nothing"), Some((6, 5)));
        assert_eq!(at("nothing"), None);
        let m = |p: &str, msg: &str| idx.locate_message(p, msg).map(|p| (p.line, p.column));
        assert_eq!(
            m("routes[1] (users)", "backend split weights add up to 0"),
            Some((8, 5))
        );
        assert_eq!(m("auth.jwt (demo)", "issuer: must be a URL"), Some((15, 7)));
        assert_eq!(m("", "listen.admin is not loopback"), Some((3, 3)));
        assert_eq!(m("", "no such thing"), None);
    }

    #[test]
    fn unparsable_text_has_no_positions() {
        assert_eq!(YamlIndex::new("a: [").locate("a"), None);
    }
}
