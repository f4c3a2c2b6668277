//! meshgate gateway mode: edge policy layered on the agent's data plane.
//!
//! The gateway is the agent's outbound half with a public front: the same identity manager,
//! tunnels and discovery (`meshgate-agent`), plus the edge chain this crate owns:
//!
//! - [`routes`]: the route table (host, path, method, header and query matching; most specific
//!   wins; versioning; weighted splits with pinning; rewrites).
//! - [`hygiene`]: spoofable identity headers stripped, request id, W3C traceparent,
//!   X-Forwarded-* with trusted proxies.
//! - [`cors`]: preflights answered here; upstream CORS headers replaced.
//! - [`transform`]: header add/set/remove and JSON body field rename/remove.
//! - [`auth`]: edge authentication ([`jwt`] with [`jwks`] caches, [`apikey`]), authorization
//!   (scopes, claims, groups), identity injection and rate limits ([`ratelimit`]).
//! - [`filters`]: each edge policy as a pipeline filter; [`compile`]: config -> the pipeline
//!   (per route: its chain and its action: [`proxy`], [`transcode`] (REST to gRPC),
//!   [`aggregate`] (BFF fan-out), [`openapi`] (the document), wrapped by [`grpc_web`] when
//!   asked); [`schema`]: JSON Schema validation of request bodies.
//! - [`config`], [`config_check`] (what `meshgate config validate` checks), [`app`] (start,
//!   reload, drain).
//!
//! It holds no socket code: listeners, TLS and tunnels live in `meshgate-agent`.

pub mod aggregate;
pub mod apikey;
pub mod app;
pub mod auth;
pub mod compile;
pub mod config;
pub mod config_check;
pub mod cors;
pub mod filters;
pub mod grpc_web;
pub mod hygiene;
pub mod introspect;
pub mod jwks;
pub mod jwt;
pub mod openapi;
pub mod proxy;
pub mod ratelimit;
pub mod ratelimit_redis;
pub mod routes;
pub mod schema;
pub mod transcode;
pub mod transform;
pub mod why;
