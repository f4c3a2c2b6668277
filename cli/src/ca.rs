//! `meshgate ca …`: create the CA, serve it, make and manage join tokens, and manage the
//! nodes that joined (which services each may run).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use meshgate_agent::config_check::{CheckOptions, FileKind, Finding, check_consul, check_file};
use meshgate_ca::{
    pki,
    server::{CaConfig, CaServer},
    store::{self, NodeRegistry, TokenStore},
};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    outln,
    output::{Output, print_json, print_table, quiet},
    signals::Signals,
};

/// How long `ca serve` lets in-flight calls finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `meshgate ca`.
#[derive(Debug, Args)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

/// `--data-dir` of every offline CA command.
#[derive(Debug, Args)]
struct DataDir {
    /// The CA's data dir (made by `meshgate ca init`).
    #[arg(long, env = "MESHGATE_CA_DATA_DIR")]
    data_dir: PathBuf,
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
        /// ca.yaml: trust_domain, data_dir, listen, workload_ttl, node_ttl,
        /// expired_renewal_grace. Relative paths in it are relative to its directory.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        lifecycle: crate::lifecycle::LifecycleArgs,
    },
    /// Print the root fingerprint nodes pin (`ca.fingerprint` in their configs).
    Fingerprint {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Join tokens for nodes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The nodes that joined: list them, change their services, remove them.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a single-use join token bound to a node; prints it with the CA fingerprint.
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// The node the token is for.
        #[arg(long)]
        node: String,
        /// Services the node may get SVIDs for: `svc` (namespace default) or `ns/svc`, comma-separated.
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        /// How long the token stays valid, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Also print the commands that install the token on the node and start its agent,
        /// and the `ca:` block its config needs.
        #[arg(long)]
        print_join_command: bool,
        /// With --print-join-command: the CA address nodes use. Default https://HOSTNAME:15012.
        #[arg(long, value_name = "URL")]
        ca_address: Option<String>,
        /// With --print-join-command: where the token goes on the node.
        #[arg(long, value_name = "PATH", default_value = "/etc/meshgate/join-token")]
        token_path: PathBuf,
        /// Output format; json prints {"token","id","ca_fingerprint","node","expires_at"} (and
        /// "join_command" with --print-join-command). With --quiet only the token is printed.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List join tokens (never the secrets): ID, node, services, state, expiry.
    List {
        #[command(flatten)]
        dir: DataDir,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke an unused token by its ID (from `ca token list`; 6 or more leading digits).
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        /// The token's ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// The nodes that joined and the services each may obtain certificates for.
    List {
        #[command(flatten)]
        dir: DataDir,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Replace the services a node may run (`svc` or `ns/svc`, comma-separated); applies at
    /// once, with no new token and without touching the node's data dir.
    SetServices {
        #[command(flatten)]
        dir: DataDir,
        /// The node.
        node: String,
        /// The services, e.g. web,users or prod/billing.
        #[arg(value_delimiter = ',')]
        services: Vec<String>,
    },
    /// Forget a node: the CA refuses its renewals and certificate requests from now on, so it
    /// leaves the mesh when its certificates expire. It can join again with a new token.
    Remove {
        #[command(flatten)]
        dir: DataDir,
        /// The node.
        node: String,
    },
}

#[derive(Debug, Serialize)]
struct TokenJson<'a> {
    token: &'a str,
    id: String,
    ca_fingerprint: &'a str,
    node: &'a str,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    join_command: Option<String>,
}

fn root_fingerprint(data_dir: &Path) -> anyhow::Result<String> {
    let root = pki::read_pem_certs(&data_dir.join("root.crt"))
        .map_err(|_| store::StoreError::Missing(data_dir.display().to_string()))?;
    Ok(pki::fingerprint(&root[0]))
}

/// This machine's name, for the default CA address in join commands.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "CA-HOST".into())
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The lines an operator pastes on the node: write the token, the config block, start.
fn join_command(
    node: &str,
    token: &str,
    fingerprint: &str,
    ca_address: &str,
    token_path: &Path,
) -> String {
    let path = token_path.display().to_string();
    format!(
        "# on {node}, as the user that runs meshgate: save the token (mode 0600)\n\
         (umask 077 && mkdir -p {dir} && printf '%s\\n' {tok} > {file})\n\
         # the agent's (or gateway's) config needs:\n\
         #   node: {node}\n\
         #   ca:\n\
         #     address: {ca_address}\n\
         #     fingerprint: \"{fingerprint}\"\n\
         #     join_token_file: {path}\n\
         meshgate agent --config /etc/meshgate/agent.yaml",
        dir = shell_quote(
            &token_path
                .parent()
                .map(|p| p.display().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| ".".into())
        ),
        tok = shell_quote(token),
        file = shell_quote(&path),
    )
}

/// What `config validate` checks in a ca.yaml, as `ca serve` would at start.
pub(crate) fn check_config(c: &CaConfig, opts: CheckOptions) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Err(e) = meshgate_ca::spiffe::validate_trust_domain(&c.trust_domain) {
        out.push(Finding::error("trust_domain", e.to_string()));
    }
    for (name, ttl) in [("workload_ttl", c.workload_ttl), ("node_ttl", c.node_ttl)] {
        if ttl < Duration::from_secs(1) {
            out.push(Finding::error(name, "must be at least 1s"));
        } else if ttl < Duration::from_secs(300) {
            out.push(
                Finding::warning(name, "under 5 minutes: nodes renew constantly")
                    .hint("24h is the default"),
            );
        }
    }
    if let Some(consul) = &c.consul {
        check_consul("consul", consul, opts, &mut out);
    }
    if opts.files {
        let init = format!(
            "create it with `meshgate ca init --trust-domain {} --data-dir {}`",
            c.trust_domain,
            c.data_dir.display()
        );
        if !c.data_dir.join("root.crt").exists() {
            out.push(
                Finding::error(
                    "data_dir",
                    format!("{} holds no CA (no root.crt)", c.data_dir.display()),
                )
                .hint(init),
            );
        } else {
            match store::load(&c.data_dir) {
                Ok(ca) if ca.trust_domain != c.trust_domain => out.push(
                    Finding::error(
                        "trust_domain",
                        format!(
                            "{:?} is not the trust domain of the CA in data_dir ({:?})",
                            c.trust_domain, ca.trust_domain
                        ),
                    )
                    .hint(format!("set trust_domain: {}", ca.trust_domain)),
                ),
                Ok(_) => {}
                Err(e) => out.push(Finding::error("data_dir", e.to_string())),
            }
            for key in ["root.key", "intermediate.key"] {
                let path = c.data_dir.join(key);
                if path.exists() {
                    check_file("data_dir", &path, FileKind::Secret, &mut out);
                }
            }
        }
    }
    meshgate_agent::config_check::dedup(&mut out);
    out
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
                    Output::Json => print_json(&serde_json::json!({
                        "created": false,
                        "trust_domain": trust_domain,
                        "ca_fingerprint": fingerprint,
                    }))?,
                    Output::Table => outln!(
                        "kept the existing CA for trust domain {trust_domain} in {} (root fingerprint {fingerprint})",
                        data_dir.display()
                    ),
                }
                return Ok(());
            }
            let report = store::init(&data_dir, &trust_domain, force, SystemTime::now())?;
            match output {
                Output::Json => print_json(&report)?,
                Output::Table if quiet() => outln!("{}", report.ca_fingerprint),
                Output::Table => {
                    outln!(
                        "created CA for trust domain {} in {}",
                        report.trust_domain,
                        data_dir.display()
                    );
                    outln!("  root fingerprint:  {}", report.ca_fingerprint);
                    outln!("  root expires:      {}", report.root_not_after);
                    outln!(
                        "  intermediate:      expires {}",
                        report.intermediate_not_after
                    );
                    outln!(
                        "next: meshgate ca serve --config ca.yaml   (ca.yaml: trust_domain: {}, data_dir: {})",
                        report.trust_domain,
                        data_dir.display()
                    );
                }
            }
            Ok(())
        }
        CaCommand::Serve { config, lifecycle } => serve(config, lifecycle).await,
        CaCommand::Fingerprint { dir } => {
            outln!("{}", root_fingerprint(&dir.data_dir)?);
            Ok(())
        }
        CaCommand::Token { command } => token(command),
        CaCommand::Node { command } => node(command),
    }
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match command {
        TokenCommand::Create {
            dir,
            node,
            services,
            ttl,
            print_join_command,
            ca_address,
            token_path,
            output,
        } => {
            let data_dir = dir.data_dir;
            let fingerprint = root_fingerprint(&data_dir)?;
            if ttl.is_zero() {
                anyhow::bail!("--ttl must be more than zero, e.g. --ttl 1h");
            }
            let t = TokenStore::new(&data_dir).create(&node, &services, ttl, now)?;
            let id = pki::hex(&pki::sha256(t.token.as_bytes()))[..store::TOKEN_ID_LEN].to_owned();
            let expires_at =
                store::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.record.expires_at));
            let ca_address = ca_address.unwrap_or_else(|| format!("https://{}:15012", hostname()));
            let join = print_join_command
                .then(|| join_command(&node, &t.token, &fingerprint, &ca_address, &token_path));
            match output {
                Output::Json => print_json(&TokenJson {
                    token: &t.token,
                    id,
                    ca_fingerprint: &fingerprint,
                    node: &node,
                    expires_at,
                    join_command: join,
                })?,
                Output::Table if quiet() => outln!("{}", t.token),
                Output::Table => {
                    outln!("join token:      {}", t.token);
                    outln!("token id:        {id}   (for `meshgate ca token revoke`)");
                    outln!("node:            {node}");
                    let services = if t.record.services.is_empty() {
                        "(none)".to_owned()
                    } else {
                        t.record.services.join(", ")
                    };
                    outln!("services:        {services}");
                    outln!("expires at:      {expires_at} (single use)");
                    outln!("ca fingerprint:  {fingerprint}");
                    if let Some(j) = join {
                        outln!();
                        outln!("{j}");
                    }
                }
            }
            Ok(())
        }
        TokenCommand::List { dir, output } => {
            let tokens = TokenStore::new(&dir.data_dir).list(now)?;
            if output == Output::Json {
                return print_json(&tokens);
            }
            if tokens.is_empty() {
                outln!(
                    "no join tokens in {}; create one with `meshgate ca token create --node NAME`",
                    dir.data_dir.display()
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.node.clone(),
                        t.state.to_string(),
                        if t.services.is_empty() {
                            "-".into()
                        } else {
                            t.services.join(",")
                        },
                        t.expires_at.clone(),
                    ]
                })
                .collect();
            print_table(&["ID", "NODE", "STATE", "SERVICES", "EXPIRES"], &rows)
        }
        TokenCommand::Revoke { dir, id } => {
            let t = TokenStore::new(&dir.data_dir).revoke(&id, now)?;
            if !quiet() {
                outln!("revoked token {} for node {}", t.id, t.node);
            }
            Ok(())
        }
    }
}

fn node(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List { dir, output } => {
            let nodes = NodeRegistry::new(&dir.data_dir).list();
            if output == Output::Json {
                let rows: Vec<serde_json::Value> = nodes
                    .iter()
                    .map(|(name, r)| {
                        serde_json::json!({
                            "node": name,
                            "services": r.services,
                            "joined_at": store::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(r.joined_at)),
                        })
                    })
                    .collect();
                return print_json(&rows);
            }
            if nodes.is_empty() {
                outln!("no node has joined the CA in {}", dir.data_dir.display());
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|(name, r)| {
                    vec![
                        name.clone(),
                        if r.services.is_empty() {
                            "-".into()
                        } else {
                            r.services.join(",")
                        },
                        store::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(r.joined_at)),
                    ]
                })
                .collect();
            print_table(&["NODE", "SERVICES", "JOINED"], &rows)
        }
        NodeCommand::SetServices {
            dir,
            node,
            services,
        } => {
            let rec = NodeRegistry::new(&dir.data_dir).set_services(&node, &services)?;
            if !quiet() {
                let list = if rec.services.is_empty() {
                    "no services".to_owned()
                } else {
                    rec.services.join(", ")
                };
                outln!(
                    "node {node} may now run: {list} (applies at once; restart its agent if it gave up on a service)"
                );
            }
            Ok(())
        }
        NodeCommand::Remove { dir, node } => {
            if !NodeRegistry::new(&dir.data_dir).remove(&node)? {
                anyhow::bail!(
                    "node {node:?} has not joined this CA; `meshgate ca node list` shows those that have"
                );
            }
            if !quiet() {
                outln!(
                    "removed node {node}: the CA refuses its renewals from now on; its current certificates stay valid until they expire"
                );
            }
            Ok(())
        }
    }
}

async fn serve(path: PathBuf, lifecycle: crate::lifecycle::LifecycleArgs) -> anyhow::Result<()> {
    let config = crate::config::load_ca(&path)?;
    crate::config::refuse_errors(&path, check_config(&config, CheckOptions::default()))?;
    let server = CaServer::start(&config)
        .await
        .with_context(|| format!("cannot start the CA from {}", path.display()))?;
    let mut signals = Signals::new()?;
    let mut hup = signal(SignalKind::hangup())?;
    let life = crate::lifecycle::Lifecycle::start(&lifecycle, None).await?;
    let status = format!("serving on {}", server.local_addr());
    life.ready(&status);
    let how = loop {
        tokio::select! {
            how = signals.recv() => break how,
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
    };
    signals.stopping("the CA", how);
    life.stopping().await;
    server.shutdown(DRAIN_TIMEOUT).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_commands_quote_what_they_paste() {
        let j = join_command(
            "node-a",
            "mgjt_ab'c",
            "sha256:00",
            "https://ca.example:15012",
            Path::new("/etc/meshgate/join-token"),
        );
        assert!(
            j.contains("printf '%s\\n' 'mgjt_ab'\\''c' > '/etc/meshgate/join-token'"),
            "{j}"
        );
        assert!(j.contains("umask 077 && mkdir -p '/etc/meshgate'"), "{j}");
        assert!(j.contains("#     address: https://ca.example:15012"), "{j}");
        assert!(
            j.ends_with("meshgate agent --config /etc/meshgate/agent.yaml"),
            "{j}"
        );
    }
}
