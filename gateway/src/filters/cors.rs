//! CORS: preflights answered at the gateway; the CORS headers of every answer (the service's,
//! and the gateway's own 401/403/404/413/429/5xx) set from the policy, so browser code can read
//! refusals too. A route's policy replaces the gateway-wide one; the gateway-wide one also
//! covers requests no route takes.

use http::{HeaderMap, Response, StatusCode, header, request, response};
use meshgate_agent::http::{
    ctx::Ctx,
    empty,
    filter::{Filter, Step, Verdict},
    respond::Problem,
};
use tracing::debug;

use crate::cors::{Cors, Preflight};

/// The request's `Origin` headers, kept for the response phase.
#[derive(Debug, Clone)]
struct RequestOrigin(HeaderMap);

/// CORS for a route (`global: false`) or for requests without a route (`global: true`).
#[derive(Debug)]
pub struct CorsFilter {
    cors: Cors,
    global: bool,
}

impl CorsFilter {
    /// A route's CORS policy.
    pub fn route(cors: Cors) -> Self {
        Self {
            cors,
            global: false,
        }
    }

    /// The gateway-wide policy, applied to answers that matched no route.
    pub fn global(cors: Cors) -> Self {
        Self { cors, global: true }
    }
}

impl Filter for CorsFilter {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        if let Some(o) = req.headers.get(header::ORIGIN) {
            let mut h = HeaderMap::new();
            for v in req.headers.get_all(header::ORIGIN) {
                h.append(header::ORIGIN, v.clone());
            }
            let _ = o;
            ctx.extensions.insert(RequestOrigin(h));
        }
        if self.global {
            return Step::CONTINUE;
        }
        match self.cors.preflight(&req.method, &req.headers) {
            Preflight::NotPreflight => Step::CONTINUE,
            Preflight::Allowed(h) => {
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                *r.headers_mut() = h;
                Step::Now(Verdict::Respond(r))
            }
            Preflight::Denied(why) => {
                debug!(request_id = %ctx.request_id, reason = why, "CORS preflight refused");
                Step::reject(Problem::Forbidden(format!("CORS preflight refused: {why}")))
            }
        }
    }

    fn on_response(&self, ctx: &Ctx, resp: &mut response::Parts) {
        if self.global && ctx.route.is_some() {
            return;
        }
        // a preflight answer already carries its headers
        if resp.status == StatusCode::NO_CONTENT
            && resp
                .headers
                .contains_key(header::ACCESS_CONTROL_ALLOW_METHODS)
        {
            return;
        }
        let empty = HeaderMap::new();
        let origin = ctx
            .extensions
            .get::<RequestOrigin>()
            .map_or(&empty, |o| &o.0);
        self.cors.apply_response(origin, &mut resp.headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cors::CorsConfig, filters::testing};

    fn filter() -> CorsFilter {
        let cfg: CorsConfig = serde_json::from_value(serde_json::json!({
            "allow_origins": ["https://app.example"],
            "allow_methods": ["GET", "POST"],
            "expose_headers": ["RateLimit"]
        }))
        .expect("cors");
        CorsFilter::route(Cors::new(&cfg).expect("compiles"))
    }

    #[tokio::test]
    async fn local_refusals_get_cors_headers_too() {
        let f = filter();
        let mut ctx = testing::ctx();
        let mut req = testing::head("GET", "/", &[("origin", "https://app.example")]);
        assert!(matches!(
            testing::run(&f, &mut req, &mut ctx).await,
            Verdict::Continue
        ));
        let (mut resp, _) = Problem::Unauthorized {
            challenge: "Bearer".into(),
            reason: "missing token".into(),
        }
        .response("r")
        .into_parts();
        f.on_response(&ctx, &mut resp);
        assert_eq!(
            resp.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        assert_eq!(
            resp.headers[header::ACCESS_CONTROL_EXPOSE_HEADERS],
            "ratelimit"
        );
    }

    #[tokio::test]
    async fn preflights_are_answered_here() {
        let f = filter();
        let mut ctx = testing::ctx();
        let mut req = testing::head(
            "OPTIONS",
            "/",
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let Verdict::Respond(r) = testing::run(&f, &mut req, &mut ctx).await else {
            panic!("preflight not answered");
        };
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let mut req = testing::head(
            "OPTIONS",
            "/",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        assert!(matches!(
            testing::run(&f, &mut req, &mut ctx).await,
            Verdict::Reject(Problem::Forbidden(_))
        ));
    }
}
