//! The HTTP data plane both modes compose (DESIGN §3): the front that accepts connections
//! ([`front`]), the per-request context ([`ctx`]), the filter contract and chains ([`filter`],
//! [`chain`]), the pipeline that runs a request through them ([`pipeline`]), route actions
//! ([`action`]), streaming bodies ([`body`]), upstreams ([`upstream`]), path normalization
//! ([`path`]) and the one place errors become responses ([`respond`]).
//!
//! There is no `if gateway` here: the gateway and the node agent build different chains and
//! routers and hand them to the same pipeline.

pub mod action;
pub mod body;
pub mod chain;
pub mod ctx;
pub mod filter;
pub mod front;
pub mod path;
pub mod pipeline;
pub mod respond;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the HTTP layer passes on.
pub type Body = BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed()
}

/// Response header a destination agent sets on its own answers (the problem slug), so the
/// caller can tell a refusal by the mesh from the service's own status. Stripped before any
/// client sees it.
pub const LOCAL_HEADER: http::HeaderName = http::HeaderName::from_static("meshgate-local");

/// Response header naming the intention that denied a request (mesh peers only; stripped at
/// the edge, logged by the caller).
pub const DENY_RULE_HEADER: http::HeaderName = http::HeaderName::from_static("meshgate-deny-rule");
