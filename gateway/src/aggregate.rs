//! The `aggregate` route action (a backend-for-frontend): one request fans out to several
//! upstream calls in parallel, each with its own service (or external URL), path and timeout,
//! and their JSON answers are merged into one object by call name.
//!
//! ```yaml
//! backend:
//!   aggregate:
//!     on_error: partial          # or fail (the default)
//!     forward_headers: [accept-language]
//!     calls:
//!       - {name: profile, service: users, path: "/users/{user}", timeout: 500ms}
//!       - {name: orders, service: orders, path: "/orders?user={user}"}
//! ```
//!
//! Each call goes through the agent's `Proxy` (timeouts, failover, metrics as for any route).
//! A call fails when it cannot be made, does not finish within its timeout, answers outside
//! 2xx, or answers something that is not JSON. With `on_error: fail` a failure fails the whole
//! request (502, or 504 when a call timed out) with a problem+json naming the call; with
//! `partial` the failed member is `null` and `errors` lists each failure (`{call, status,
//! error}`); if every call fails the request fails as with `fail`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use meshgate_agent::http::{
    Body,
    action::{ActionFuture, Proxy, RouteAction},
    body::collect_capped,
    ctx::Ctx,
    full,
    respond::TYPE_BASE,
    upstream::{ExternalConfig, Upstream},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::compile::RouteParams;

/// What a failed call does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Any failed call fails the request (502; 504 when the call timed out). The default.
    #[default]
    Fail,
    /// A failed call's member is `null` and `errors` lists the failures; the request fails
    /// only when every call failed.
    Partial,
}

fn yes() -> bool {
    true
}

fn default_max_response() -> usize {
    1 << 20
}

/// `backend: {aggregate: …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The calls, made in parallel; each answer is the member of the same name.
    pub calls: Vec<CallConfig>,
    /// `fail` (default) or `partial`.
    #[serde(default)]
    pub on_error: FailurePolicy,
    /// Request headers copied to every call (names, any case). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward_headers: Vec<String>,
    /// Copy the identity headers authentication set (user, scopes, consumer, claim headers)
    /// to every call. Default true.
    #[serde(default = "yes")]
    pub forward_identity: bool,
    /// Largest answer of one call, bytes (a larger one is a failed call). Default 1 MiB.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

/// One call of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// The member name in the merged answer: `[A-Za-z0-9_-]+`, unique, not `errors`.
    pub name: String,
    /// The mesh service to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Or a URL outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalConfig>,
    /// Path and query of the GET request; `{param}` takes a capture of the route's
    /// `match.path` template (percent-encoded).
    pub path: String,
    /// Time for the whole call (humantime); default: the route timeout.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
}

impl AggregateConfig {
    /// The mesh services the calls use.
    pub fn services(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter_map(|c| c.service.clone())
            .collect()
    }

    /// Checks names, placeholders (against the route template's `params`) and backends.
    pub fn validate(&self, params: &[String]) -> Result<(), String> {
        if self.calls.is_empty() {
            return Err("aggregate: calls is empty".into());
        }
        for (i, c) in self.calls.iter().enumerate() {
            let at = format!("aggregate.calls[{i}] ({})", c.name);
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{at}: name must be non-empty [A-Za-z0-9_-]"));
            }
            if c.name == "errors" {
                return Err(format!(
                    "{at}: the name errors is reserved for the failure list"
                ));
            }
            if self.calls[..i].iter().any(|o| o.name == c.name) {
                return Err(format!("{at}: duplicate name"));
            }
            match (&c.service, &c.external) {
                (Some(s), None) if !s.is_empty() => {}
                (None, Some(_)) => {}
                _ => return Err(format!("{at}: set exactly one of service or external")),
            }
            if !c.path.starts_with('/') {
                return Err(format!("{at}: path must start with '/'"));
            }
            for p in placeholders(&c.path) {
                if !params.iter().any(|x| x == p) {
                    return Err(format!(
                        "{at}: path placeholder {{{p}}} is not a parameter of the route's match.path template{}",
                        if params.is_empty() {
                            String::new()
                        } else {
                            format!(" (it has {})", params.join(", "))
                        }
                    ));
                }
            }
            if c.timeout.is_some_and(|t| t.is_zero()) {
                return Err(format!("{at}: timeout must be more than zero"));
            }
        }
        for h in &self.forward_headers {
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("aggregate.forward_headers: {h:?} is not a header name"))?;
        }
        if self.max_response_bytes == 0 {
            return Err("aggregate.max_response_bytes must be at least 1".into());
        }
        Ok(())
    }
}

/// The `{name}` placeholders of a path, in order.
pub fn placeholders(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        out.push(&rest[i + 1..i + j]);
        rest = &rest[i + j + 1..];
    }
    out
}

/// `path` with each `{name}` replaced by its value (a template capture, as sent: decoded
/// first, then percent-encoded so it is safe as a path segment or a query value).
pub fn fill(path: &str, params: &[(String, String)]) -> String {
    const ENC: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let mut out = String::with_capacity(path.len() + 16);
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        out.push_str(&rest[..i]);
        let name = &rest[i + 1..i + j];
        let v = params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        out.push_str(&percent_encoding::utf8_percent_encode(&v, ENC).to_string());
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// One compiled call.
#[derive(Debug)]
pub struct Call {
    /// Member name.
    pub name: String,
    /// Where.
    pub upstream: Arc<dyn Upstream>,
    /// Path template.
    pub path: String,
    /// How (its timeout).
    pub proxy: Proxy,
}

/// The action.
#[derive(Debug)]
pub struct Aggregate {
    calls: Vec<Call>,
    policy: FailurePolicy,
    forward: Vec<HeaderName>,
    max_response: usize,
}

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallFailure {
    /// The call's name.
    pub call: String,
    /// The HTTP status that stands for the failure (the call's own, or 502/504/503).
    pub status: u16,
    /// What happened.
    pub error: String,
}

impl Aggregate {
    /// The action for `calls`; `forward` are the header names copied to each call.
    pub fn new(
        calls: Vec<Call>,
        policy: FailurePolicy,
        forward: Vec<HeaderName>,
        max_response: usize,
    ) -> Self {
        Self {
            calls,
            policy,
            forward,
            max_response,
        }
    }

    async fn one(
        &self,
        call: &Call,
        parent: &http::request::Parts,
        params: &[(String, String)],
        ctx: &Ctx,
    ) -> Result<serde_json::Value, CallFailure> {
        let fail = |status: u16, error: String| CallFailure {
            call: call.name.clone(),
            status,
            error,
        };
        let timeout = call.proxy.settings().timeout;
        let deadline = tokio::time::Instant::from_std(ctx.started) + timeout;
        let mut req = Request::new(meshgate_agent::http::empty());
        *req.uri_mut() = fill(&call.path, params)
            .parse()
            .map_err(|_| fail(502, "the call's path is not a valid URI".into()))?;
        let h = req.headers_mut();
        for name in &self.forward {
            for v in parent.headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id)
            && !ctx.request_id.is_empty()
        {
            h.insert("x-request-id", v);
        }
        let mut child = Ctx::new(ctx.conn.clone());
        child.request_id = ctx.request_id.clone();
        child.client_ip = ctx.client_ip;
        child.started = ctx.started;
        child.route = ctx.route.clone();
        let timed_out = || {
            fail(
                504,
                format!("did not answer within {} ms", timeout.as_millis()),
            )
        };
        let work = async {
            let resp = call
                .proxy
                .forward(&*call.upstream, req, &mut child)
                .await
                .map_err(|p| {
                    fail(
                        p.status().as_u16(),
                        format!("{} ({})", p.slug(), call.upstream.name()),
                    )
                })?;
            let status = resp.status();
            let bytes = collect_capped(resp.into_body(), self.max_response)
                .await
                .map_err(|_| {
                    fail(
                        502,
                        format!("the answer failed or exceeded {} bytes", self.max_response),
                    )
                })?;
            if !status.is_success() {
                return Err(fail(
                    status.as_u16(),
                    format!("answered {}", status.as_u16()),
                ));
            }
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|_| fail(502, "the answer is not JSON".into()))
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(r) => r.map_err(|mut f| {
                if f.status == 504 {
                    f.error = timed_out().error;
                }
                f
            }),
            Err(_) => Err(timed_out()),
        }
    }

    fn failed(&self, ctx: &mut Ctx, failures: &[CallFailure]) -> Response<Body> {
        let first = &failures[0];
        let status = if first.status == 504 {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        if ctx.request_id.is_empty() {
            ctx.request_id = Ctx::new_request_id();
        }
        ctx.local_reason = Some("aggregate-failed");
        let body = serde_json::json!({
            "type": format!("{TYPE_BASE}aggregate-failed"),
            "title": "Aggregate call failed",
            "status": status.as_u16(),
            "detail": format!("call {} {}", first.call, first.error),
            "request_id": ctx.request_id,
            "errors": failures,
        });
        let mut r = Response::new(full(serde_json::to_vec(&body).expect("invariant: JSON")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        r
    }
}

impl RouteAction for Aggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }

    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            drop(body);
            let params = ctx
                .extensions
                .get::<RouteParams>()
                .map(|p| p.0.clone())
                .unwrap_or_default();
            let shared: &Ctx = ctx;
            let results = futures_util::future::join_all(
                self.calls
                    .iter()
                    .map(|c| self.one(c, &parts, &params, shared)),
            )
            .await;
            let names: Vec<&str> = self
                .calls
                .iter()
                .map(|c| c.upstream.name().as_ref())
                .collect();
            ctx.upstream = Some(Arc::from(names.join(",").as_str()));
            let mut merged = serde_json::Map::new();
            let mut failures = Vec::new();
            for (c, r) in self.calls.iter().zip(results) {
                match r {
                    Ok(v) => {
                        merged.insert(c.name.clone(), v);
                    }
                    Err(f) => {
                        merged.insert(c.name.clone(), serde_json::Value::Null);
                        failures.push(f);
                    }
                }
            }
            if !failures.is_empty()
                && (self.policy == FailurePolicy::Fail || failures.len() == self.calls.len())
            {
                return Ok(self.failed(ctx, &failures));
            }
            if self.policy == FailurePolicy::Partial {
                merged.insert(
                    "errors".into(),
                    serde_json::to_value(&failures).expect("invariant: JSON"),
                );
            }
            let bytes: Bytes = serde_json::to_vec(&merged).expect("invariant: JSON").into();
            let mut r = Response::new(full(bytes));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_and_encode() {
        assert_eq!(placeholders("/u/{id}/x?y={q}"), ["id", "q"]);
        let p = [
            ("id".to_owned(), "a%20b/c".to_owned()),
            ("q".into(), "é&x".into()),
        ];
        assert_eq!(fill("/u/{id}/x?y={q}", &p), "/u/a%20b%2Fc/x?y=%C3%A9%26x");
        assert_eq!(fill("/plain", &p), "/plain");
    }

    #[test]
    fn configs_are_checked() {
        let call = |name: &str, path: &str| CallConfig {
            name: name.into(),
            service: Some("users".into()),
            external: None,
            path: path.into(),
            timeout: None,
        };
        let cfg = |calls: Vec<CallConfig>| AggregateConfig {
            calls,
            on_error: FailurePolicy::Fail,
            forward_headers: vec![],
            forward_identity: true,
            max_response_bytes: 10,
        };
        let params = ["id".to_owned()];
        assert!(cfg(vec![call("a", "/u/{id}")]).validate(&params).is_ok());
        for (c, want) in [
            (cfg(vec![]), "empty"),
            (cfg(vec![call("errors", "/")]), "reserved"),
            (cfg(vec![call("a", "/"), call("a", "/")]), "duplicate"),
            (cfg(vec![call("a b", "/")]), "name must"),
            (cfg(vec![call("a", "x")]), "start with"),
            (cfg(vec![call("a", "/{nope}")]), "{nope}"),
        ] {
            let e = c.validate(&params).expect_err(want);
            assert!(e.contains(want), "{e}");
        }
        let mut both = call("a", "/");
        both.service = None;
        assert!(
            cfg(vec![both])
                .validate(&params)
                .expect_err("neither service nor url")
                .contains("exactly one")
        );
    }
}
