//! The filter contract: each edge policy looks at a request and either lets it continue or
//! answers it locally, and may adjust the response on the way back. A route's chain is built
//! once when the config loads; per request there is no lookup by name.

use http::{Response, request::Parts};

use super::{Body, respond::Problem};

/// What a filter decided about a request.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the next filter.
    Continue,
    /// Answer now with this response (for example a CORS preflight).
    Respond(Response<Body>),
    /// Answer now with this problem.
    Reject(Problem),
}

/// One edge policy.
pub trait Filter: Send + Sync + std::fmt::Debug {
    /// A short name for logs and `meshgate routes`.
    fn name(&self) -> &'static str;
    /// Inspect or change the request head.
    fn on_request(&self, req: &mut Parts) -> Verdict;
    /// Change the response on the way back; `req` is the request head as the filter left it.
    fn on_response(&self, _req: &Parts, _resp: &mut Response<Body>) {}
}
