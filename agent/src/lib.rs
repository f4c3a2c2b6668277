//! meshgate's data plane: the node agent, and the pieces the gateway reuses.
//!
//! - [`identity`]: join the mesh, hold and renew SVIDs, follow the trust bundle, build mTLS configs.
//! - [`transport`]: the HBONE-style tunnel (TLS 1.3 mTLS, HTTP/2 CONNECT) and byte splicing.
//! - [`proxy`]: inbound (tunnels to local services, with intentions) and outbound (upstream listeners).
//! - [`policy`]: intentions as pure functions; [`balance`]: P2C over peak-EWMA with ejection.
//! - [`discovery`]: endpoints per service; [`admin`]: the loopback admin API; [`telemetry`]: metrics.
//! - [`http`]: the HTTP pipeline both modes run (front, filters, routes, actions, upstreams).
//! - [`bootstrap`]: joining the mesh, shared by the agent and the gateway.
//! - [`notify`]: systemd readiness notification (`sd_notify`) for `Type=notify` units.
//! - [`app`]: builds a running [`app::Agent`] from an [`config::AgentConfig`]; [`config_check`]:
//!   the checks `meshgate config validate` and start-up run on it.
//!
//! ```no_run
//! # async fn run(cfg: meshgate_agent::config::AgentConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let agent = meshgate_agent::app::Agent::start(cfg).await?;
//! println!("inbound on {}, admin on {}", agent.inbound_addr(), agent.admin_addr());
//! agent.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod app;
pub mod balance;
pub mod bootstrap;
pub mod config;
pub mod config_check;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod identity;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod rand;
pub mod telemetry;
pub mod transport;
