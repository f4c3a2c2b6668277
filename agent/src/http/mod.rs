//! The HTTP layer shared by the gateway (and later the agent's HTTP proxy port): the filter
//! trait ([`filter`]), the one place errors become responses ([`respond`]), the public listener
//! ([`front`]) and the HTTP client that reaches services through mesh tunnels ([`upstream`]).

pub mod filter;
pub mod front;
pub mod respond;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the HTTP layer produces.
pub type Body = BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}
