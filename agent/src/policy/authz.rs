//! Intentions: who may talk to whom. This module owns the `authz` config shape, its validation
//! and compilation into a [`Policy`], and the decisions: per connection (L4,
//! [`Policy::check_connection`]) and per HTTP request (L7, [`Policy::check_request`]).
//!
//! A rule names a source (`from`: service name, `*`, `prefix-*`, or a SPIFFE ID, exact or with a
//! trailing `*`) and a destination (`to`, same forms), an action, and optionally HTTP `methods`
//! and `paths` (which make it an L7 rule). Among the rules that match, the most specific wins
//! (Consul-like): +2 for an exact `from`, +2 for an exact `to`, +1 for an L7 rule; at equal score
//! deny beats allow, then the earlier rule. If no rule matches, the configured default applies.
//!
//! Everything here is pure: no I/O, no clocks. Identities are taken as already verified.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a rule (or the default) does with matching traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the traffic through.
    Allow,
    /// Refuse the traffic.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// The serde default for [`AuthzConfig::default`]: deny.
fn deny() -> Action {
    Action::Deny
}

/// The `authz` section of the config: a default action and the rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// The action when no rule matches (default: deny).
    #[serde(default = "deny")]
    pub default: Action,
    /// The rules, in config order; decisions name them by index.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig {
            default: Action::Deny,
            rules: Vec::new(),
        }
    }
}

/// One rule as written in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The source: a service name, `*`, a prefix ending in `*`, or a SPIFFE ID (exact or with a
    /// trailing `*`).
    pub from: String,
    /// The destination: same forms as `from`; a SPIFFE ID is compared with the destination's.
    pub to: String,
    /// What to do with matching traffic.
    pub action: Action,
    /// HTTP methods (case-insensitive); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// HTTP paths: exact (`/admin`) or prefix with a trailing `*` (`/admin/*`); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// The verified identity of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// The caller's service name.
    pub service: &'a str,
    /// The caller's SPIFFE ID (`spiffe://…`).
    pub spiffe_id: &'a str,
}

/// The local destination being called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The destination's service name.
    pub service: &'a str,
    /// The destination's SPIFFE ID (`spiffe://…`).
    pub spiffe_id: &'a str,
}

/// The parts of an HTTP request that rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    /// The method, any case.
    pub method: &'a str,
    /// The request target's path; a query string (`?…`) is ignored.
    pub path: &'a str,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// The index into the config's rules of the deciding rule; `None` when the default applied.
    pub rule: Option<usize>,
    /// Human-readable explanation, e.g. `rule #1 (web -> users deny DELETE /admin/*)` or
    /// `default deny` (shared: deciding allocates nothing).
    pub reason: std::sync::Arc<str>,
}

impl Decision {
    /// Whether the decision allows the traffic.
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

/// Errors from [`Policy::compile`].
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// A rule is invalid.
    #[error("authz.rules[{index}]: {reason}")]
    Rule {
        /// The rule's index in the config.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// A compiled [`AuthzConfig`]: validated, normalized, ready to answer checks.
#[derive(Debug, Clone)]
pub struct Policy {
    default: Action,
    default_reason: std::sync::Arc<str>,
    rules: Vec<Rule>,
}

/// A string pattern: anything, exactly this, or anything starting with this.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    /// Parses `s` where a single `*` is allowed only as the last character.
    fn parse(s: &str) -> Result<Pattern, String> {
        match s.find('*') {
            None => Ok(Pattern::Exact(s.to_owned())),
            Some(i) if i + 1 == s.len() => {
                if i == 0 {
                    Ok(Pattern::Any)
                } else {
                    Ok(Pattern::Prefix(s[..i].to_owned()))
                }
            }
            Some(_) => Err(format!("{s:?}: `*` is only allowed at the end")),
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => s == e,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
        }
    }

    fn is_exact(&self) -> bool {
        matches!(self, Pattern::Exact(_))
    }
}

/// A `from` or `to`: a pattern over service names or over SPIFFE IDs.
#[derive(Debug, Clone)]
struct Subject {
    spiffe: bool,
    pattern: Pattern,
}

impl Subject {
    fn parse(s: &str) -> Result<Subject, String> {
        Ok(Subject {
            spiffe: s.starts_with("spiffe://"),
            pattern: Pattern::parse(s)?,
        })
    }

    fn matches(&self, service: &str, spiffe_id: &str) -> bool {
        self.pattern
            .matches(if self.spiffe { spiffe_id } else { service })
    }
}

#[derive(Debug, Clone)]
struct Rule {
    index: usize,
    from: Subject,
    to: Subject,
    action: Action,
    /// Uppercase; empty means any.
    methods: Vec<String>,
    /// Empty means any.
    paths: Vec<Pattern>,
    /// Precomputed specificity score.
    score: u8,
    /// Precomputed `rule #i (…)` text for decisions.
    describe: std::sync::Arc<str>,
}

impl Rule {
    fn is_l7(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }

    fn matches_peers(&self, from: &Peer<'_>, to: &Target<'_>) -> bool {
        self.from.matches(from.service, from.spiffe_id) && self.to.matches(to.service, to.spiffe_id)
    }

    fn matches_request(&self, req: &HttpRequest<'_>) -> bool {
        let path = req.path.split_once('?').map_or(req.path, |(p, _)| p);
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(req.method)))
            && (self.paths.is_empty() || self.paths.iter().any(|p| path_matches(p, path)))
    }
}

/// Whether a rule's path pattern covers `path` (already normalized by the pipeline): an exact
/// path, or a prefix ending in `/` (`/admin/*`), which also covers the directory itself
/// (`/admin`), so a deny on `/admin/*` cannot be dodged by dropping the trailing slash.
fn path_matches(p: &Pattern, path: &str) -> bool {
    match p {
        Pattern::Prefix(prefix) if prefix.ends_with('/') && prefix.len() > 1 => {
            path.starts_with(prefix.as_str()) || path == &prefix[..prefix.len() - 1]
        }
        p => p.matches(path),
    }
}

/// Whether `c` is an RFC 9110 `tchar` (the characters allowed in a method token).
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn compile_rule(index: usize, rc: &RuleConfig) -> Result<Rule, AuthzError> {
    let err = |reason: String| AuthzError::Rule { index, reason };
    if rc.from.trim().is_empty() {
        return Err(err("`from` is empty".into()));
    }
    if rc.to.trim().is_empty() {
        return Err(err("`to` is empty".into()));
    }
    let from = Subject::parse(&rc.from).map_err(|e| err(format!("from {e}")))?;
    let to = Subject::parse(&rc.to).map_err(|e| err(format!("to {e}")))?;

    let mut methods = Vec::with_capacity(rc.methods.len());
    for m in &rc.methods {
        if m == "*" {
            return Err(err(
                "method \"*\": leave `methods` empty to match any method".into(),
            ));
        }
        if m.is_empty() || !m.chars().all(is_tchar) {
            return Err(err(format!(
                "method {m:?} is not a valid HTTP method token"
            )));
        }
        let m = m.to_ascii_uppercase();
        if !methods.contains(&m) {
            methods.push(m);
        }
    }

    let mut paths = Vec::with_capacity(rc.paths.len());
    for p in &rc.paths {
        if !p.starts_with('/') {
            return Err(err(format!("path {p:?} must start with '/'")));
        }
        paths.push(Pattern::parse(p).map_err(|e| err(format!("path {e}")))?);
    }

    let l7 = !methods.is_empty() || !paths.is_empty();
    let score =
        2 * u8::from(from.pattern.is_exact()) + 2 * u8::from(to.pattern.is_exact()) + u8::from(l7);

    let mut describe = format!("rule #{index} ({} -> {} {}", rc.from, rc.to, rc.action);
    if !methods.is_empty() {
        describe.push(' ');
        describe.push_str(&methods.join(","));
    }
    if !rc.paths.is_empty() {
        describe.push(' ');
        describe.push_str(&rc.paths.join(","));
    }
    describe.push(')');

    Ok(Rule {
        index,
        from,
        to,
        action: rc.action,
        methods,
        paths,
        score,
        describe: describe.into(),
    })
}

impl Policy {
    /// Validates and compiles `cfg`. Errors name the offending rule (`authz.rules[2]: …`): an
    /// empty `from`/`to`, a `*` anywhere but at the end, a method that is not an HTTP token, a
    /// path not starting with `/`.
    pub fn compile(cfg: &AuthzConfig) -> Result<Policy, AuthzError> {
        let rules = cfg
            .rules
            .iter()
            .enumerate()
            .map(|(i, rc)| compile_rule(i, rc))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            default: cfg.default,
            default_reason: format!("default {}", cfg.default).into(),
            rules,
        })
    }

    /// The L4 decision for a connection from `from` to `to`: only rules without methods or
    /// paths are considered.
    pub fn check_connection(&self, from: &Peer<'_>, to: &Target<'_>) -> Decision {
        self.decide(|r| !r.is_l7() && r.matches_peers(from, to))
    }

    /// For HTTP services: whether a connection from `from` to `to` must be accepted, so that its
    /// requests can be checked one by one with [`Policy::check_request`]. True if
    /// [`Policy::check_connection`] allows, or if some L7 allow rule matches this pair.
    pub fn admits_http(&self, from: &Peer<'_>, to: &Target<'_>) -> bool {
        self.check_connection(from, to).is_allowed()
            || self
                .rules
                .iter()
                .any(|r| r.action == Action::Allow && r.is_l7() && r.matches_peers(from, to))
    }

    /// The L7 decision for one HTTP request: all rules are considered; an L7 rule matches only if
    /// its methods and paths match the request.
    pub fn check_request(
        &self,
        from: &Peer<'_>,
        to: &Target<'_>,
        req: &HttpRequest<'_>,
    ) -> Decision {
        self.decide(|r| r.matches_peers(from, to) && r.matches_request(req))
    }

    /// The action applied when no rule matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Picks the winner among the rules satisfying `matches`: highest score, then deny over
    /// allow, then the earliest; the default if none match.
    fn decide(&self, matches: impl Fn(&Rule) -> bool) -> Decision {
        let key = |r: &Rule| (r.score, r.action == Action::Deny);
        let mut best: Option<&Rule> = None;
        for r in self.rules.iter().filter(|r| matches(r)) {
            if best.is_none_or(|b| key(r) > key(b)) {
                best = Some(r);
            }
        }
        match best {
            Some(r) => Decision {
                action: r.action,
                rule: Some(r.index),
                reason: r.describe.clone(),
            },
            None => Decision {
                action: self.default,
                rule: None,
                reason: self.default_reason.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "spiffe://mesh.example/ns/default/svc/";

    fn sid(svc: &str) -> String {
        format!("{TD}{svc}")
    }

    fn policy(json: &str) -> Policy {
        let cfg: AuthzConfig = serde_json::from_str(json).expect("test config parses");
        Policy::compile(&cfg).expect("test config compiles")
    }

    /// The YAML example from the docs, as JSON.
    const EXAMPLE: &str = r#"{
        "default": "deny",
        "rules": [
            { "from": "web", "to": "users", "action": "allow" },
            { "from": "web", "to": "users", "action": "deny", "methods": ["DELETE"], "paths": ["/admin/*"] }
        ]
    }"#;

    /// (config, from, to, method, path, expected action, expected rule)
    type RequestCase = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        Action,
        Option<usize>,
    );

    #[test]
    fn check_request_table() {
        use Action::{Allow, Deny};
        let wildcard = r#"{ "rules": [
            { "from": "*", "to": "users", "action": "deny" },
            { "from": "web", "to": "users", "action": "allow" }
        ]}"#;
        let equal = r#"{ "rules": [
            { "from": "web", "to": "users", "action": "allow" },
            { "from": "web", "to": "users", "action": "deny" }
        ]}"#;
        let spiffe = r#"{ "rules": [
            { "from": "spiffe://mesh.example/ns/default/svc/web", "to": "users", "action": "allow" },
            { "from": "spiffe://mesh.example/ns/batch/*", "to": "users", "action": "allow", "methods": ["get"] }
        ]}"#;
        let default_allow = r#"{ "default": "allow", "rules": [
            { "from": "web-*", "to": "*", "action": "deny" }
        ]}"#;
        let paths = r#"{ "default": "allow", "rules": [
            { "from": "*", "to": "*", "action": "deny", "paths": ["/admin"] },
            { "from": "*", "to": "*", "action": "deny", "paths": ["/x*"] }
        ]}"#;
        let l7_beats_l4 = r#"{ "rules": [
            { "from": "web", "to": "users", "action": "deny" },
            { "from": "web", "to": "users", "action": "allow", "methods": ["GET", "head"] }
        ]}"#;
        let to_spiffe = r#"{ "rules": [
            { "from": "*", "to": "spiffe://mesh.example/ns/default/svc/users", "action": "allow" }
        ]}"#;
        let cases: &[RequestCase] = &[
            (EXAMPLE, "web", "users", "GET", "/users/1", Allow, Some(0)),
            (EXAMPLE, "web", "users", "DELETE", "/admin/x", Deny, Some(1)),
            (
                EXAMPLE,
                "web",
                "users",
                "delete",
                "/admin/x?y=1",
                Deny,
                Some(1),
            ),
            (EXAMPLE, "web", "users", "DELETE", "/admin/", Deny, Some(1)),
            // `/admin/*` covers the directory itself too
            (EXAMPLE, "web", "users", "DELETE", "/admin", Deny, Some(1)),
            (
                EXAMPLE,
                "web",
                "users",
                "DELETE",
                "/administrator",
                Allow,
                Some(0),
            ),
            (EXAMPLE, "web", "users", "GET", "/admin/x", Allow, Some(0)),
            (
                EXAMPLE,
                "web",
                "users",
                "DELETE",
                "/users/1",
                Allow,
                Some(0),
            ),
            (EXAMPLE, "billing", "users", "GET", "/users/1", Deny, None),
            (EXAMPLE, "web", "orders", "GET", "/", Deny, None),
            (wildcard, "web", "users", "GET", "/", Allow, Some(1)),
            (wildcard, "billing", "users", "GET", "/", Deny, Some(0)),
            (equal, "web", "users", "GET", "/", Deny, Some(1)),
            (spiffe, "web", "users", "GET", "/", Allow, Some(0)),
            (spiffe, "other", "users", "GET", "/", Deny, None),
            (default_allow, "web-1", "users", "GET", "/", Deny, Some(0)),
            (default_allow, "web", "users", "GET", "/", Allow, None),
            (paths, "a", "b", "GET", "/admin", Deny, Some(0)),
            (paths, "a", "b", "GET", "/admin?q", Deny, Some(0)),
            (paths, "a", "b", "GET", "/admin/x", Allow, None),
            (paths, "a", "b", "GET", "/x", Deny, Some(1)),
            (paths, "a", "b", "GET", "/xyz/1", Deny, Some(1)),
            (paths, "a", "b", "GET", "/y", Allow, None),
            (l7_beats_l4, "web", "users", "GET", "/", Allow, Some(1)),
            (l7_beats_l4, "web", "users", "HEAD", "/", Allow, Some(1)),
            (l7_beats_l4, "web", "users", "POST", "/", Deny, Some(0)),
            (to_spiffe, "a", "users", "GET", "/", Allow, Some(0)),
            (to_spiffe, "a", "orders", "GET", "/", Deny, None),
        ];
        for (i, &(cfg, from, to, method, path, action, rule)) in cases.iter().enumerate() {
            let p = policy(cfg);
            let (from_id, to_id) = (sid(from), sid(to));
            let d = p.check_request(
                &Peer {
                    service: from,
                    spiffe_id: &from_id,
                },
                &Target {
                    service: to,
                    spiffe_id: &to_id,
                },
                &HttpRequest { method, path },
            );
            assert_eq!(
                (d.action, d.rule),
                (action, rule),
                "case {i}: {from} -> {to} {method} {path}: {d:?}"
            );
        }

        // A SPIFFE prefix in `from` matches on the ID, not the service name.
        let p = policy(spiffe);
        let batch = "spiffe://mesh.example/ns/batch/svc/job";
        let users = sid("users");
        let to = Target {
            service: "users",
            spiffe_id: &users,
        };
        let from = Peer {
            service: "job",
            spiffe_id: batch,
        };
        let get = HttpRequest {
            method: "GET",
            path: "/",
        };
        let post = HttpRequest {
            method: "POST",
            path: "/",
        };
        assert_eq!(p.check_request(&from, &to, &get).rule, Some(1));
        assert_eq!(p.check_request(&from, &to, &post).action, Action::Deny);
    }

    /// (config, from, to, expected check_connection, expected rule, expected admits_http)
    type ConnCase = (
        &'static str,
        &'static str,
        &'static str,
        Action,
        Option<usize>,
        bool,
    );

    #[test]
    fn connection_table() {
        use Action::{Allow, Deny};
        let l7_only = r#"{ "default": "deny", "rules": [
            { "from": "web", "to": "users", "action": "allow", "paths": ["/public/*"] }
        ]}"#;
        let l7_deny_only = r#"{ "default": "allow", "rules": [
            { "from": "web", "to": "users", "action": "deny", "methods": ["POST"] }
        ]}"#;
        let cases: &[ConnCase] = &[
            (EXAMPLE, "web", "users", Allow, Some(0), true),
            (EXAMPLE, "billing", "users", Deny, None, false),
            (l7_only, "web", "users", Deny, None, true),
            (l7_only, "billing", "users", Deny, None, false),
            (l7_deny_only, "web", "users", Allow, None, true),
        ];
        for (i, &(cfg, from, to, action, rule, admits)) in cases.iter().enumerate() {
            let p = policy(cfg);
            let (from_id, to_id) = (sid(from), sid(to));
            let from = Peer {
                service: from,
                spiffe_id: &from_id,
            };
            let to = Target {
                service: to,
                spiffe_id: &to_id,
            };
            let d = p.check_connection(&from, &to);
            assert_eq!((d.action, d.rule), (action, rule), "case {i}: {d:?}");
            assert_eq!(p.admits_http(&from, &to), admits, "case {i}");
        }
    }

    #[test]
    fn reasons() {
        let p = policy(EXAMPLE);
        let (web, users) = (sid("web"), sid("users"));
        let from = Peer {
            service: "web",
            spiffe_id: &web,
        };
        let to = Target {
            service: "users",
            spiffe_id: &users,
        };
        let d = p.check_request(
            &from,
            &to,
            &HttpRequest {
                method: "delete",
                path: "/admin/x",
            },
        );
        assert_eq!(&*d.reason, "rule #1 (web -> users deny DELETE /admin/*)");
        assert_eq!(
            &*p.check_connection(&from, &to).reason,
            "rule #0 (web -> users allow)"
        );
        let other = Peer {
            service: "billing",
            spiffe_id: &web,
        };
        assert_eq!(&*p.check_connection(&other, &to).reason, "default deny");
        assert_eq!(p.default_action(), Action::Deny);
    }

    #[test]
    fn compile_errors() {
        let rule = |from: &str, to: &str, methods: &[&str], paths: &[&str]| RuleConfig {
            from: from.into(),
            to: to.into(),
            action: Action::Allow,
            methods: methods.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
        };
        let cases: &[(RuleConfig, &str)] = &[
            (
                rule("", "users", &[], &[]),
                "authz.rules[1]: `from` is empty",
            ),
            (rule("web", " ", &[], &[]), "authz.rules[1]: `to` is empty"),
            (
                rule("w*b", "users", &[], &[]),
                "authz.rules[1]: from \"w*b\": `*` is only allowed at the end",
            ),
            (
                rule("web", "**", &[], &[]),
                "authz.rules[1]: to \"**\": `*` is only allowed at the end",
            ),
            (
                rule("web", "users", &["GE T"], &[]),
                "authz.rules[1]: method \"GE T\" is not a valid HTTP method token",
            ),
            (
                rule("web", "users", &[""], &[]),
                "authz.rules[1]: method \"\" is not a valid HTTP method token",
            ),
            (
                rule("web", "users", &["*"], &[]),
                "authz.rules[1]: method \"*\": leave `methods` empty to match any method",
            ),
            (
                rule("web", "users", &[], &["admin"]),
                "authz.rules[1]: path \"admin\" must start with '/'",
            ),
            (
                rule("web", "users", &[], &["/a*/b"]),
                "authz.rules[1]: path \"/a*/b\": `*` is only allowed at the end",
            ),
        ];
        for (bad, want) in cases {
            let cfg = AuthzConfig {
                default: Action::Deny,
                rules: vec![rule("web", "users", &[], &[]), bad.clone()],
            };
            match Policy::compile(&cfg) {
                Err(e @ AuthzError::Rule { index: 1, .. }) => assert_eq!(e.to_string(), *want),
                other => panic!("{bad:?}: expected error {want:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn serde_shape() {
        // (json, parses)
        let cases: &[(&str, bool)] = &[
            (EXAMPLE, true),
            ("{}", true),
            (r#"{ "default": "allow" }"#, true),
            (r#"{ "default": "Allow" }"#, false),
            (
                r#"{ "rules": [{ "from": "a", "to": "b", "action": "allow", "actions": ["GET"] }] }"#,
                false,
            ),
            (r#"{ "rules": [{ "from": "a", "to": "b" }] }"#, false),
            (r#"{ "default": "deny", "extra": 1 }"#, false),
        ];
        for (json, ok) in cases {
            assert_eq!(
                serde_json::from_str::<AuthzConfig>(json).is_ok(),
                *ok,
                "{json}"
            );
        }

        let empty: AuthzConfig = serde_json::from_str("{}").expect("parses");
        assert_eq!(empty, AuthzConfig::default());

        let cfg: AuthzConfig = serde_json::from_str(EXAMPLE).expect("parses");
        assert_eq!(cfg.rules[1].methods, vec!["DELETE".to_string()]);
        let out = serde_json::to_string(&cfg).expect("serializes");
        assert_eq!(
            out,
            concat!(
                r#"{"default":"deny","rules":[{"from":"web","to":"users","action":"allow"},"#,
                r#"{"from":"web","to":"users","action":"deny","methods":["DELETE"],"#,
                r#""paths":["/admin/*"]}]}"#
            )
        );
        let back: AuthzConfig = serde_json::from_str(&out).expect("round-trips");
        assert_eq!(back, cfg);
    }
}
