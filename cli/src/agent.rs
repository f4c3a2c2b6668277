//! `meshgate agent --config agent.yaml`: run the node agent until SIGTERM/Ctrl-C, then drain.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use meshgate_agent::{app::Agent, config::AgentConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Arguments of `meshgate agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// agent.yaml; see docs/configuration.md.
    #[arg(long, short)]
    config: PathBuf,
}

pub(crate) async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config: AgentConfig = crate::config::load_yaml(&args.config)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let agent = tokio::select! {
        a = Agent::start(config) => a.with_context(|| format!("cannot start the agent from {}", args.config.display()))?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    for u in agent.upstreams() {
        info!(from = %u.from, service = %u.service, listen = %u.addr, "upstream listener");
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let clean = agent.shutdown().await;
    info!(clean, "agent stopped");
    Ok(())
}
