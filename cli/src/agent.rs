//! `meshgate agent --config agent.yaml`: run the node agent until SIGTERM/Ctrl-C, then drain
//! (a second Ctrl-C exits at once).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use meshgate_agent::{app::Agent, config_check::CheckOptions};
use tracing::info;

use crate::signals::Signals;

/// Arguments of `meshgate agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// agent.yaml; see docs/configuration.md. Relative paths in it are relative to its
    /// directory.
    #[arg(long, short)]
    config: PathBuf,
}

pub(crate) async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = crate::config::load_agent(&args.config)?;
    // what `meshgate config validate` checks, before anything is bound or a token is spent
    crate::config::refuse_errors(&args.config, config.check(CheckOptions::default()))?;
    let mut signals = Signals::new()?;
    let agent = tokio::select! {
        a = Agent::start(config) => a.with_context(|| format!("cannot start the agent from {}", args.config.display()))?,
        _ = signals.recv() => return Ok(()),
    };
    for u in agent.upstreams() {
        info!(from = %u.from, service = %u.service, listen = %u.addr, "upstream listener");
    }
    let how = signals.recv().await;
    signals.stopping("the agent", how);
    let clean = agent.shutdown().await;
    info!(clean, "agent stopped");
    Ok(())
}
