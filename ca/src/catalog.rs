//! The catalog check the CA makes before signing a workload SVID, as a trait.
//!
//! In Consul mode a node may obtain a certificate for a service only when the service is
//! registered on that very node in Consul's catalog (and its join token's scope allows it). The
//! CA does not speak Consul itself: the CLI hands it an implementation built on the agent's
//! Consul client (`meshgate_agent::discovery::consul::ConsulClient`), and tests hand it a fake.

use std::{fmt, future::Future, pin::Pin};

/// Why the catalog could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CatalogError {
    /// What went wrong, for the refusal sent to the node and the CA's log.
    pub message: String,
}

/// A boxed future of a catalog answer.
pub type CatalogFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, CatalogError>> + Send + 'a>>;

/// Where the CA looks up which services run on which node.
pub trait Catalog: Send + Sync + fmt::Debug {
    /// Whether an instance of `service` is registered on node `node`. An error (the catalog is
    /// unreachable, the ACL token is refused…) makes the CA answer `UNAVAILABLE`, never sign.
    fn node_runs<'a>(&'a self, node: &'a str, service: &'a str) -> CatalogFuture<'a>;

    /// Where the catalog is, for logs (`http://127.0.0.1:8500`).
    fn describe(&self) -> String;
}
