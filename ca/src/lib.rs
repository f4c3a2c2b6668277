//! meshgate's certificate authority.
//!
//! It owns the CA's keys and state on disk ([`store`]), the checks a CSR must pass and SVID
//! signing ([`signer`]), SPIFFE IDs ([`spiffe`]), the trust bundle and the rustls verifiers that
//! check SVIDs ([`verify`]), and the gRPC service nodes call ([`service`], [`server`]). It never
//! depends on the agent; agents and gateways use this crate's verifiers and CSR helpers.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use meshgate_ca::{server::{CaConfig, CaServer}, store};
//! let dir = std::path::Path::new("/var/lib/meshgate/ca");
//! let report = store::init(dir, "mesh.example", false, std::time::SystemTime::now())?;
//! println!("pin {}", report.ca_fingerprint);
//! let config = CaConfig {
//!     listen: "127.0.0.1:15012".parse()?,
//!     ..CaConfig::new("mesh.example", dir)
//! };
//! let server = CaServer::start(&config).await?;
//! println!("serving on {}", server.local_addr());
//! # Ok(()) }
//! ```

pub mod consul;
pub mod pki;
pub mod server;
pub mod service;
pub mod signer;
pub mod spiffe;
pub mod store;
pub mod tls;
pub mod verify;
