//! Authentication and authorization on the request head (JWT, API keys, introspection, edge
//! mTLS; then scopes, claims, groups), before any body byte is read. The principal goes into
//! the context for the rate limit and later stages; identity headers are injected only after
//! authentication succeeded (hygiene stripped every client-sent copy on ingress).

use std::sync::Arc;

use http::request;
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step, Verdict},
};

use crate::auth::{Auth, Principal, RouteAuth};

/// A route's `auth`.
#[derive(Debug)]
pub struct AuthFilter {
    auth: Arc<Auth>,
    route: RouteAuth,
}

impl AuthFilter {
    /// The route's requirements, checked with the gateway's credential sources.
    pub fn new(auth: Arc<Auth>, route: RouteAuth) -> Self {
        Self { auth, route }
    }
}

impl Filter for AuthFilter {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        Step::Later(Box::pin(async move {
            let original = req.uri.query().unwrap_or_default().to_owned();
            let mut query = original.clone();
            let cert = ctx.conn.client_cert.clone();
            let principal = match self
                .auth
                .authenticate(&self.route, &mut req.headers, &mut query, cert.as_deref())
                .await
            {
                Ok(p) => p,
                Err(problem) => {
                    self.auth
                        .auth_failed(ctx.route.as_deref().unwrap_or("-"), &problem);
                    return Verdict::Reject(problem);
                }
            };
            self.auth.inject(&principal, &mut req.headers);
            if query != original {
                let path = req.uri.path().to_owned();
                let pq = if query.is_empty() {
                    path
                } else {
                    format!("{path}?{query}")
                };
                let mut parts = std::mem::take(&mut req.uri).into_parts();
                parts.path_and_query = pq.parse().ok();
                req.uri =
                    http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"));
            }
            ctx.consumer = principal
                .consumer
                .clone()
                .or_else(|| principal.user.clone());
            ctx.extensions.insert(principal);
            Verdict::Continue
        }))
    }
}

/// The principal a request authenticated as, if its route required authentication.
pub fn principal(ctx: &Ctx) -> Option<&Principal> {
    ctx.extensions.get::<Principal>()
}
