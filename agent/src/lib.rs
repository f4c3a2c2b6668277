//! meshgate's data plane. Today it holds the identity manager ([`identity`]): the piece every
//! agent and gateway uses to join the mesh, hold and renew its SVIDs, follow the trust bundle and
//! build the mTLS configs its tunnels use.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use meshgate_agent::identity::{IdentityConfig, IdentityManager};
//! let ids = IdentityManager::start(IdentityConfig {
//!     trust_domain: "mesh.example".into(),
//!     node: "node-a".into(),
//!     data_dir: "./node-a".into(),
//!     ca_address: "https://127.0.0.1:15012".into(),
//!     ca_fingerprint: "sha256:…".into(),
//!     join_token: Some("mgjt_…".into()),
//! })
//! .await?;
//! let web = ids.workload("default", "web").await?;
//! let _server_tls = ids.server_config(&web);
//! # Ok(()) }
//! ```

pub mod identity;
