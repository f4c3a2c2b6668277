//! The filter contract: each policy looks at a request head and lets it continue or answers it
//! locally; on the way back it may adjust every response (upstream answers and local refusals
//! alike). A filter that needs the body says so ([`Filter::request_body_cap`]); every other
//! filter runs on the head alone, before a body byte is read.
//!
//! Most filters decide synchronously and return [`Step::Now`]; one that must wait (a JWKS
//! refetch, an introspection call, a Redis round trip) returns [`Step::Later`] with a future.

use std::{future::Future, pin::Pin};

use bytes::Bytes;
use http::{Response, request, response};

use super::{Body, ctx::Ctx, respond::Problem};

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

/// A verdict that took I/O to reach.
pub type FilterFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// A verdict now, or later.
pub enum Step<'a> {
    /// Decided without waiting.
    Now(Verdict),
    /// Decided once the future resolves.
    Later(FilterFuture<'a>),
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Now(v) => f.debug_tuple("Now").field(v).finish(),
            Step::Later(_) => f.write_str("Later(..)"),
        }
    }
}

impl From<Verdict> for Step<'_> {
    fn from(v: Verdict) -> Self {
        Step::Now(v)
    }
}

impl Step<'_> {
    /// Go on.
    pub const CONTINUE: Step<'static> = Step::Now(Verdict::Continue);

    /// Refuse with `p`.
    pub fn reject(p: Problem) -> Self {
        Step::Now(Verdict::Reject(p))
    }

    /// The verdict, waiting for it if needed.
    pub async fn resolve(self) -> Verdict {
        match self {
            Step::Now(v) => v,
            Step::Later(f) => f.await,
        }
    }
}

/// One policy in a chain.
pub trait Filter: Send + Sync + std::fmt::Debug {
    /// A short name for logs, spans and `meshgate routes`.
    fn name(&self) -> &'static str;

    /// Inspect or change the request head. Runs before any body byte is read.
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Ctx) -> Step<'a>;

    /// Change the response head on the way back. Runs for every response of a request that
    /// reached this filter's chain, local answers included; filters run in reverse order.
    fn on_response(&self, _ctx: &Ctx, _resp: &mut response::Parts) {}

    /// The largest request body this filter needs to see whole; `None` (the default) means the
    /// body streams past it. Declared once, when the chain is built.
    fn request_body_cap(&self) -> Option<usize> {
        None
    }

    /// The buffered request body (only called when [`Filter::request_body_cap`] is `Some`).
    fn on_request_body(
        &self,
        _req: &mut request::Parts,
        _ctx: &mut Ctx,
        body: Bytes,
    ) -> Result<Bytes, Problem> {
        Ok(body)
    }

    /// Whether this response's body must be buffered for [`Filter::on_response_body`], and up
    /// to how many bytes. Also the place to ask for changes that make a body transformable.
    fn response_body_cap(&self, _ctx: &Ctx, _resp: &response::Parts) -> Option<usize> {
        None
    }

    /// The buffered response body (only called when [`Filter::response_body_cap`] said so).
    fn on_response_body(
        &self,
        _ctx: &Ctx,
        _resp: &mut response::Parts,
        body: Bytes,
    ) -> Result<Bytes, Problem> {
        Ok(body)
    }
}
