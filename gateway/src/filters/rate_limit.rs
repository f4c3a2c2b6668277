//! A route's rate limit, after authentication (keys may be the consumer, API key, a claim…):
//! over the limit is 429 with `Retry-After`; under it, `RateLimit` / `RateLimit-Policy` headers
//! are added to whatever answer the request gets.

use std::{sync::Arc, time::SystemTime};

use http::request;
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step, Verdict},
};

use crate::auth::Auth;

/// A route's `rate_limit`.
#[derive(Debug)]
pub struct RateLimitFilter {
    auth: Arc<Auth>,
    policy: String,
    route: String,
    allowed: prometheus_client::metrics::counter::Counter,
    limited: prometheus_client::metrics::counter::Counter,
}

impl RateLimitFilter {
    /// Policy `policy` (from `auth.rate_limits`) on route `route`.
    pub fn new(auth: Arc<Auth>, policy: &str, route: &str) -> Self {
        let (allowed, limited) = auth.rate_decision_counters(route, policy);
        Self {
            auth,
            allowed,
            limited,
            policy: policy.to_owned(),
            route: route.to_owned(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Filter for RateLimitFilter {
    fn name(&self) -> &'static str {
        "rate-limit"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        Step::Later(Box::pin(async move {
            let principal = super::auth::principal(ctx);
            let result = self
                .auth
                .rate_limit(
                    &self.policy,
                    &self.route,
                    principal,
                    ctx.client_ip,
                    &req.headers,
                    now_ms(),
                )
                .await;
            match result {
                Ok(headers) => {
                    self.allowed.inc();
                    ctx.response_headers.extend(headers);
                    Verdict::Continue
                }
                Err(problem) => {
                    self.limited.inc();
                    Verdict::Reject(problem)
                }
            }
        }))
    }
}
