//! The gateway's route action: pick the backend (one service, a weighted split with pinning,
//! or an external URL) and hand the request to the agent's [`Proxy`], which owns timeouts,
//! failover, retries and streaming.

use std::{collections::BTreeMap, sync::Arc};

use http::Request;
use meshgate_agent::http::{
    Body,
    action::{ActionFuture, Proxy, RouteAction},
    ctx::{Ctx, fast_rand},
    upstream::Upstream,
};

use crate::routes::{CompiledRoute, ROLL_RANGE, RequestView, choose_backend};

/// Where a route's requests go.
#[derive(Debug)]
pub enum Backends {
    /// Always this upstream.
    One(Arc<dyn Upstream>),
    /// A split: the upstream of each service it names.
    Split(BTreeMap<String, Arc<dyn Upstream>>),
}

/// `proxy` for a gateway route.
#[derive(Debug)]
pub struct GatewayProxy {
    /// Timeouts, retries, streaming.
    pub proxy: Proxy,
    /// The route (for the split and its pins).
    pub route: Arc<CompiledRoute>,
    /// Its upstreams.
    pub backends: Backends,
}

impl GatewayProxy {
    fn pick(&self, req: &http::request::Parts, ctx: &Ctx) -> Option<Arc<dyn Upstream>> {
        match &self.backends {
            Backends::One(u) => Some(u.clone()),
            Backends::Split(map) => {
                let view = RequestView {
                    method: req.method.as_str(),
                    host: &ctx.authority,
                    path: req.uri.path(),
                    query: req.uri.query().unwrap_or_default(),
                    headers: &req.headers,
                };
                let roll = u32::try_from(fast_rand() % u64::from(ROLL_RANGE)).unwrap_or(0);
                map.get(choose_backend(&self.route, &view, roll)).cloned()
            }
        }
    }
}

impl RouteAction for GatewayProxy {
    fn kind(&self) -> &'static str {
        "proxy"
    }

    fn call<'a>(&'a self, req: Request<Body>, ctx: &'a mut Ctx) -> ActionFuture<'a> {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let Some(up) = self.pick(&parts, ctx) else {
                return Err(meshgate_agent::http::respond::Problem::NoEndpoints {
                    service: self.route.config.name.clone(),
                });
            };
            self.proxy
                .forward(&*up, Request::from_parts(parts, body), ctx)
                .await
        })
    }
}
