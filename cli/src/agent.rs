//! `meshgate agent --config agent.yaml`: run the node agent until SIGTERM/Ctrl-C, then drain
//! (a second Ctrl-C exits at once); tells systemd when it is ready and when it stops (see
//! `lifecycle`).

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
    /// Use this node name instead of the config's `node` (e.g. `$(NODE_NAME)` in a Kubernetes
    /// DaemonSet, so one ConfigMap serves every node).
    #[arg(long, env = "MESHGATE_NODE")]
    node: Option<String>,
    /// Use this address instead of the config's `registration.advertise` (e.g. the node IP).
    #[arg(long, env = "MESHGATE_ADVERTISE")]
    advertise: Option<std::net::IpAddr>,
    #[command(flatten)]
    lifecycle: crate::lifecycle::LifecycleArgs,
}

pub(crate) async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let mut config = crate::config::load_agent(&args.config)?;
    if let Some(node) = &args.node {
        config.node.clone_from(node);
    }
    if args.advertise.is_some() {
        config.registration.advertise = args.advertise;
    }
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
    let life =
        crate::lifecycle::Lifecycle::start(&args.lifecycle, Some(agent.admin_addr())).await?;
    life.ready(&format!("serving; inbound {}", agent.inbound_addr()));
    let how = signals.recv().await;
    signals.stopping("the agent", how);
    life.stopping().await;
    let clean = agent.shutdown().await;
    info!(clean, "agent stopped");
    Ok(())
}
