//! A route's `rewrite`: the matched path prefix replaced (`/v2/users/7` -> `/users/7`) and the
//! `Host` replaced, last before the action, so policies see what the client sent.

use std::sync::Arc;

use http::{HeaderValue, header, request};
use meshgate_agent::http::{
    ctx::Ctx,
    filter::{Filter, Step},
};

use crate::routes::{CompiledRoute, rewrite_path};

/// Applies the route's rewrite.
#[derive(Debug)]
pub struct Rewrite {
    route: Arc<CompiledRoute>,
}

impl Rewrite {
    /// The rewrite of `route`, or `None` when it has none.
    pub fn for_route(route: &Arc<CompiledRoute>) -> Option<Self> {
        route.config.rewrite.as_ref().map(|_| Self {
            route: route.clone(),
        })
    }
}

impl Filter for Rewrite {
    fn name(&self) -> &'static str {
        "rewrite"
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a> {
        let rw = self.route.config.rewrite.as_ref();
        if let Some(host) = rw.and_then(|r| r.host.as_ref())
            && let Ok(v) = HeaderValue::from_str(host)
        {
            req.headers.insert(header::HOST, v);
            ctx.authority.clone_from(host);
        }
        if rw.is_some_and(|r| r.prefix.is_some()) {
            let path = rewrite_path(&self.route, req.uri.path());
            let pq = match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = std::mem::take(&mut req.uri).into_parts();
            parts.path_and_query = pq.parse().ok();
            req.uri = http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"));
        }
        Step::CONTINUE
    }
}
