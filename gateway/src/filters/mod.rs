//! The gateway's edge policies as pipeline filters, one file each, thin over the pure modules
//! of this crate (hygiene, CORS, auth, rate limits, transforms, routes). DESIGN §8 order on a
//! route: CORS preflight -> limits -> authentication + authorization -> rate limit -> request
//! transforms -> rewrite; on the way back (reverse order) response transforms, then CORS;
//! RateLimit headers ride the context onto every answer.

pub mod auth;
pub mod cors;
pub mod hsts;
pub mod hygiene;
pub mod limits;
pub mod rate_limit;
pub mod redirect;
pub mod rewrite;
pub mod schema;
pub mod transform;

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for filter tests: a context and a request head without sockets.

    use std::sync::Arc;

    use meshgate_agent::http::{
        ctx::{ConnInfo, Ctx},
        filter::{Filter, Verdict},
    };

    /// A context for a plain connection from 192.0.2.7.
    pub(crate) fn ctx() -> Ctx {
        Ctx::new(Arc::new(ConnInfo::plain(
            "192.0.2.7:5555".parse().expect("addr"),
        )))
    }

    /// A request head.
    pub(crate) fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    /// Runs a filter's `on_request`.
    pub(crate) async fn run(
        f: &dyn Filter,
        req: &mut http::request::Parts,
        ctx: &mut Ctx,
    ) -> Verdict {
        f.on_request(req, ctx).resolve().await
    }
}
