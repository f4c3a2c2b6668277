//! meshgate's certificate authority, and the identity primitives every side verifies with.
//!
//! Always built (what agents and gateways use): SPIFFE IDs ([`spiffe`]), the trust bundle with
//! its hosting map and denylist ([`bundle`]), the rustls verifiers that check SVIDs
//! ([`verify`]), a live certificate slot ([`tls`]), certificate and key files ([`pki`]), CSR
//! creation and checks ([`signer`]) and the catalog trait the CA's Consul check goes through
//! ([`catalog`]).
//!
//! With the `server` feature (the default; the agent turns it off): the CA's state on disk
//! ([`store`]), root and intermediate rotation ([`rotation`]), SVID signing ([`signer::Signer`])
//! and the gRPC service nodes call ([`service`], [`server`]). This crate never depends on the
//! agent: the CLI hands the server a [`catalog::Catalog`] built on the agent's Consul client.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use meshgate_ca::{server::{CaConfig, CaServer}, store};
//! let dir = std::path::Path::new("/var/lib/meshgate/ca");
//! let report = store::init(dir, "mesh.example", false, std::time::SystemTime::now())?;
//! println!("pin {}", report.ca_fingerprint);
//! let config: CaConfig = CaConfig {
//!     listen: "127.0.0.1:15012".parse()?,
//!     ..CaConfig::new("mesh.example", dir)
//! };
//! let server = CaServer::start(&config, None).await?;
//! println!("serving on {}", server.local_addr());
//! # Ok(()) }
//! ```

pub mod bundle;
pub mod catalog;
pub mod pki;
#[cfg(feature = "server")]
pub mod rotation;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
pub mod signer;
pub mod spiffe;
#[cfg(feature = "server")]
pub mod store;
pub mod tls;
pub mod verify;
