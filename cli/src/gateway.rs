//! `meshgate gateway --config gateway.yaml`: run the gateway; reload on SIGHUP or when the file
//! changes (validate first, keep the old config on error); drain on SIGTERM/Ctrl-C (a second
//! Ctrl-C exits at once). Reports ready / reloading / stopping to systemd (see `lifecycle`).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use meshgate_agent::config_check::CheckOptions;
use meshgate_gateway::{app::GatewayApp, config::GatewayConfig};
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
    /// Use this node name instead of the config's `node` (e.g. `$(NODE_NAME)` in Kubernetes);
    /// applies to every reload too.
    #[arg(long, env = "MESHGATE_NODE")]
    node: Option<String>,
    #[command(flatten)]
    lifecycle: crate::lifecycle::LifecycleArgs,
}

fn fingerprint(path: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Reads the file (paths relative to it) and applies `--node`.
fn load(path: &std::path::Path, node: Option<&String>) -> anyhow::Result<GatewayConfig> {
    let mut cfg = crate::config::load_gateway(path)?;
    if let Some(node) = node {
        cfg.node.clone_from(node);
    }
    Ok(cfg)
}

/// Loads, validates and applies the file; logs one line either way, and counts every refusal
/// (a file that does not parse included) in `meshgate_gateway_config_reloads_total`.
async fn reload(app: &GatewayApp, path: &std::path::Path, node: Option<&String>) {
    // one line: YAML errors carry a multi-line excerpt
    let one_line = |e: &anyhow::Error| {
        format!("{e:#}")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let result = match load(path, node) {
        Ok(cfg) => app.reload(cfg).await.map_err(anyhow::Error::from),
        Err(e) => {
            app.reload_refused(one_line(&e));
            Err(e)
        }
    };
    match result {
        Ok(()) => info!(config = %path.display(), "config reloaded"),
        Err(e) => {
            let reason = one_line(&e);
            error!(config = %path.display(), error = %reason, "config rejected; the previous config keeps serving")
        }
    }
}

pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let cfg = load(&args.config, args.node.as_ref())?;
    // what `meshgate config validate` checks, before anything is bound or a token is spent
    crate::config::refuse_errors(&args.config, cfg.check(CheckOptions::default()))?;
    let mut signals = Signals::new()?;
    let mut hup = signal(SignalKind::hangup())?;
    let app = tokio::select! {
        a = GatewayApp::start(cfg) => a.with_context(|| format!("cannot start the gateway from {}", args.config.display()))?,
        _ = signals.recv() => return Ok(()),
    };
    let life = crate::lifecycle::Lifecycle::start(&args.lifecycle, Some(app.admin_addr())).await?;
    let listening: Vec<String> = [("https", app.https_addr()), ("http", app.http_addr())]
        .into_iter()
        .filter_map(|(what, a)| a.map(|a| format!("{what} {a}")))
        .collect();
    let status = || format!("serving; {}", listening.join(", "));
    life.ready(&status());
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
                life.reloading();
                reload(&app, &args.config, args.node.as_ref()).await;
                life.ready(&status());
            }
            _ = tick.tick(), if !args.watch_interval.is_zero() => {
                let now = fingerprint(&args.config);
                if now.is_some() && now != seen {
                    seen = now;
                    life.reloading();
                    reload(&app, &args.config, args.node.as_ref()).await;
                    life.ready(&status());
                }
            }
        }
    };
    signals.stopping("the gateway", how);
    life.stopping().await;
    let clean = app.shutdown().await;
    info!(clean, "gateway stopped");
    Ok(())
}
