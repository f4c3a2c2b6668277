//! `meshgate ca …`: create the CA, serve it, make join tokens.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use meshgate_ca::{
    pki,
    server::{CaConfig, CaServer},
    store::{self, TokenStore},
};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::output::Output;

/// How long `ca serve` lets in-flight calls finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `meshgate ca`.
#[derive(Debug, Args)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root (ECDSA P-256, 10 years) and a signing intermediate (1 year) in DIR.
    ///
    /// Keys are written with mode 0600. Refuses to replace an existing CA unless --force.
    Init {
        /// Trust domain, e.g. mesh.example (lowercase letters, digits, '.', '-', '_').
        #[arg(long)]
        trust_domain: String,
        /// Where the CA keeps its keys and state.
        #[arg(long, env = "MESHGATE_CA_DATA_DIR")]
        data_dir: PathBuf,
        /// Replace an existing CA (every node will have to join again).
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Succeed without change when DIR already holds a CA for this trust domain (for
        /// init containers and provisioning scripts); a CA of another trust domain is an error.
        #[arg(long)]
        if_missing: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Serve the CA's gRPC API over TLS (default 0.0.0.0:15012). SIGHUP re-reads the bundle roots.
    Serve {
        /// ca.yaml: trust_domain, data_dir, listen, workload_ttl, node_ttl.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        lifecycle: crate::lifecycle::LifecycleArgs,
    },
    /// Join tokens for nodes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use join token bound to a node; prints it with the CA fingerprint.
    Create {
        /// The CA's data dir.
        #[arg(long, env = "MESHGATE_CA_DATA_DIR")]
        data_dir: PathBuf,
        /// The node the token is for.
        #[arg(long)]
        node: String,
        /// Services the node may get SVIDs for: `svc` (namespace default) or `ns/svc`, comma-separated.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// How long the token stays valid, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Output format; json prints {"token","ca_fingerprint","node","expires_at"}.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Serialize)]
struct TokenJson<'a> {
    token: &'a str,
    ca_fingerprint: &'a str,
    node: &'a str,
    expires_at: String,
}

pub(crate) async fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init {
            trust_domain,
            data_dir,
            force,
            if_missing,
            output,
        } => {
            if if_missing && data_dir.join("root.crt").exists() {
                let existing = store::load(&data_dir)?;
                anyhow::ensure!(
                    existing.trust_domain == trust_domain,
                    "{} holds a CA for trust domain {}, not {trust_domain}: point --data-dir elsewhere or fix --trust-domain",
                    data_dir.display(),
                    existing.trust_domain
                );
                let fingerprint = pki::fingerprint(&existing.root);
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "created": false,
                            "trust_domain": trust_domain,
                            "ca_fingerprint": fingerprint,
                        }))?
                    ),
                    Output::Table => println!(
                        "kept the existing CA for trust domain {trust_domain} in {} (root fingerprint {fingerprint})",
                        data_dir.display()
                    ),
                }
                return Ok(());
            }
            let report = store::init(&data_dir, &trust_domain, force, SystemTime::now())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => {
                    println!(
                        "created CA for trust domain {} in {}",
                        report.trust_domain,
                        data_dir.display()
                    );
                    println!("  root fingerprint:  {}", report.ca_fingerprint);
                    println!("  root expires:      {}", report.root_not_after);
                    println!(
                        "  intermediate:      expires {}",
                        report.intermediate_not_after
                    );
                    println!("next: meshgate ca serve --config ca.yaml");
                }
            }
            Ok(())
        }
        CaCommand::Serve { config, lifecycle } => serve(config, lifecycle).await,
        CaCommand::Token {
            command:
                TokenCommand::Create {
                    data_dir,
                    node,
                    services,
                    ttl,
                    output,
                },
        } => {
            let root = pki::read_pem_certs(&data_dir.join("root.crt"))
                .map_err(|_| store::StoreError::Missing(data_dir.display().to_string()))?;
            let fingerprint = pki::fingerprint(&root[0]);
            if ttl.is_zero() {
                anyhow::bail!("--ttl must be more than zero");
            }
            let t = TokenStore::new(&data_dir).create(&node, &services, ttl, SystemTime::now())?;
            let expires_at =
                store::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.record.expires_at));
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&TokenJson {
                        token: &t.token,
                        ca_fingerprint: &fingerprint,
                        node: &node,
                        expires_at,
                    })?
                ),
                Output::Table => {
                    println!("join token:      {}", t.token);
                    println!("node:            {node}");
                    let services = if t.record.services.is_empty() {
                        "(none)".to_owned()
                    } else {
                        t.record.services.join(", ")
                    };
                    println!("services:        {services}");
                    println!("expires at:      {expires_at} (single use)");
                    println!("ca fingerprint:  {fingerprint}");
                }
            }
            Ok(())
        }
    }
}

async fn serve(path: PathBuf, lifecycle: crate::lifecycle::LifecycleArgs) -> anyhow::Result<()> {
    let config: CaConfig = crate::config::load_yaml(&path)?;
    let server = CaServer::start(&config)
        .await
        .with_context(|| format!("cannot start the CA from {}", path.display()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let life = crate::lifecycle::Lifecycle::start(&lifecycle, None).await?;
    let status = format!("serving on {}", server.local_addr());
    life.ready(&status);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                life.reloading();
                match server.reload_bundle() {
                    Ok(true) => info!("trust bundle reloaded"),
                    Ok(false) => info!("trust bundle unchanged"),
                    Err(e) => warn!(error = %e, "trust bundle reload failed; keeping the current one"),
                }
                life.ready(&status);
            }
        }
    }
    life.stopping(&mut term, &mut int).await;
    info!("shutting down");
    server.shutdown(DRAIN_TIMEOUT).await;
    Ok(())
}
