//! `meshgate gateway --config gateway.yaml`: run the gateway; reload on SIGHUP or when the file
//! changes (validate first, keep the old config on error); drain on SIGTERM/Ctrl-C.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use meshgate_gateway::{app::GatewayApp, config::GatewayConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

/// Arguments of `meshgate gateway`.
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// gateway.yaml; see docs/gateway.md.
    #[arg(long, short)]
    config: PathBuf,
    /// How often to look at the config file for changes (0 turns watching off; SIGHUP still works).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
}

fn fingerprint(path: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Loads, validates and applies the file; logs one line either way, and counts every refusal
/// (a file that does not parse included) in `meshgate_gateway_config_reloads_total`.
async fn reload(app: &GatewayApp, path: &std::path::Path) {
    let result = match crate::config::load_yaml::<GatewayConfig>(path) {
        Ok(cfg) => app.reload(cfg).await.map_err(anyhow::Error::from),
        Err(e) => {
            app.reload_refused();
            Err(e)
        }
    };
    match result {
        Ok(()) => info!(config = %path.display(), "config reloaded"),
        Err(e) => {
            // one line: YAML errors carry a multi-line excerpt
            let reason = format!("{e:#}")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" | ");
            error!(config = %path.display(), error = %reason, "config rejected; the previous config keeps serving")
        }
    }
}

pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let cfg: GatewayConfig = crate::config::load_yaml(&args.config)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let app = tokio::select! {
        a = GatewayApp::start(cfg) => a.with_context(|| format!("cannot start the gateway from {}", args.config.display()))?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let mut seen = fingerprint(&args.config);
    let mut tick = tokio::time::interval(if args.watch_interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        args.watch_interval
    });
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
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
    }
    let clean = app.shutdown().await;
    info!(clean, "gateway stopped");
    Ok(())
}
