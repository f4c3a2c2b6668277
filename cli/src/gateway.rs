//! `meshgate gateway --config gateway.yaml`: run the gateway; reload on SIGHUP or when the file
//! changes (validate first, keep the old config on error); drain on SIGTERM/Ctrl-C (a second
//! Ctrl-C exits at once).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use meshgate_agent::config_check::CheckOptions;
use meshgate_gateway::app::GatewayApp;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::signals::Signals;

/// Arguments of `meshgate gateway`.
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// gateway.yaml; see docs/gateway.md. Relative paths in it are relative to its directory.
    #[arg(long, short)]
    config: PathBuf,
    /// How often to look at the config file for changes (0 turns watching off; SIGHUP still works).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
}

fn fingerprint(path: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Loads, validates and applies the file; logs one clear line either way.
async fn reload(app: &GatewayApp, path: &std::path::Path) {
    let result = match crate::config::load_gateway(path) {
        Ok(cfg) => app.reload(cfg).await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => info!(config = %path.display(), "config reloaded"),
        Err(e) => {
            error!(config = %path.display(), error = %format!("{e:#}"), "config rejected; the previous config keeps serving")
        }
    }
}

pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load_gateway(&args.config)?;
    // what `meshgate config validate` checks, before anything is bound or a token is spent
    crate::config::refuse_errors(&args.config, cfg.check(CheckOptions::default()))?;
    let mut signals = Signals::new()?;
    let mut hup = signal(SignalKind::hangup())?;
    let app = tokio::select! {
        a = GatewayApp::start(cfg) => a.with_context(|| format!("cannot start the gateway from {}", args.config.display()))?,
        _ = signals.recv() => return Ok(()),
    };
    let mut seen = fingerprint(&args.config);
    let mut tick = tokio::time::interval(if args.watch_interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        args.watch_interval
    });
    let how = loop {
        tokio::select! {
            how = signals.recv() => break how,
            _ = hup.recv() => {
                seen = fingerprint(&args.config);
                reload(&app, &args.config).await;
            }
            _ = tick.tick(), if !args.watch_interval.is_zero() => {
                let now = fingerprint(&args.config);
                if now.is_some() && now != seen {
                    seen = now;
                    reload(&app, &args.config).await;
                }
            }
        }
    };
    signals.stopping("the gateway", how);
    let clean = app.shutdown().await;
    info!(clean, "gateway stopped");
    Ok(())
}
