//! `meshgate ca …`: create the CA, serve it, make and manage join tokens, manage the nodes that
//! joined (which services each may run, revocation), and rotate the intermediate and the root.
//! Every command but `serve` works on the data dir directly; a running `ca serve` picks up what
//! they change within its `reload_interval` (or at once on SIGHUP).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use meshgate_agent::config_check::{CheckOptions, FileKind, Finding, check_consul, check_file};
use meshgate_ca::{
    pki, rotation,
    server::CaServer,
    store::{self, Denylist, NodeRegistry, Reports, TokenStore},
};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::CaConfig,
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
    /// Serve the CA's gRPC API over TLS (default 0.0.0.0:15012).
    ///
    /// Every reload_interval (default 2s), and at once on SIGHUP, it looks at its data dir:
    /// a new intermediate, root rotation steps, revoked nodes and changed node services apply
    /// without a restart.
    Serve {
        /// ca.yaml: trust_domain, data_dir, listen, workload_ttl, node_ttl,
        /// expired_renewal_grace, reload_interval, consul. Relative paths in it are relative
        /// to its directory.
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
    /// The nodes that joined: list them, change their services, revoke or remove them.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The signing intermediate: replace it before it expires.
    Intermediate {
        #[command(subcommand)]
        command: IntermediateCommand,
    },
    /// Root rotation, in stages: plan, start, status, finish, abort.
    ///
    /// Stage 1 (add-root) puts a new root next to the old one in every trust bundle and waits
    /// until every node holds it; stage 2 (reissue) signs under the new root, with a
    /// cross-signed intermediate so both roots verify new certificates, and waits until no
    /// certificate of the old root is valid; finish retires the old root. The state lives in
    /// the data dir, so a CA restart resumes the same stage.
    Rotate {
        #[command(subcommand)]
        command: RotateCommand,
    },
}

#[derive(Debug, Subcommand)]
enum IntermediateCommand {
    /// Make a new signing intermediate under the same root and put it in place.
    ///
    /// A running `ca serve` loads it within its reload_interval; nodes renew onto it on their
    /// usual schedule, without joining again. The old one is kept under intermediates/;
    /// certificates it signed stay valid until they expire.
    Rotate {
        #[command(flatten)]
        dir: DataDir,
        /// Lifetime of the new intermediate, e.g. 1y, 180d (capped at the root's expiry).
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum RotateCommand {
    /// Show what a root rotation does and what each stage would wait for now; changes nothing.
    Plan {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Begin: make the new root, its intermediate and the cross-signed copy (stage add-root).
    Start {
        #[command(flatten)]
        dir: DataDir,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// The stage, and what it waits for (which nodes lack the new root, which certificates of
    /// the old root are still valid).
    Status {
        #[command(flatten)]
        dir: DataDir,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Retire the old root; refused (with what it waits for) until that is safe.
    Finish {
        #[command(flatten)]
        dir: DataDir,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Go back to the old root alone, from stage add-root or reissue.
    Abort {
        #[command(flatten)]
        dir: DataDir,
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
        /// The node's namespace, fixed at join: every workload certificate it gets is in it.
        /// Default: the namespace its `ns/svc` services name, else `default`.
        #[arg(long)]
        namespace: Option<String>,
        /// Services the node may get SVIDs for: `svc` (in the node's namespace) or `ns/svc`,
        /// comma-separated. With Consul, each must also be registered on the node.
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
    /// The nodes that joined: namespace, services, state (active or revoked) and the trust
    /// bundle each last reported holding.
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
    /// leaves the mesh when its certificates expire. It can join again with a new token (also
    /// after a revocation: its old certificates stay refused until they expire).
    Remove {
        #[command(flatten)]
        dir: DataDir,
        /// The node.
        node: String,
    },
    /// Revoke a node now (a stolen key, a compromised machine): the CA refuses its renewals
    /// and certificate requests, and the denylist in every trust bundle makes every agent
    /// refuse its certificates and close the tunnels it has open.
    Revoke {
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

/// The fingerprint new joins pin: the root the CA signs under (the new one once a root
/// rotation reached its reissue stage).
fn root_fingerprint(data_dir: &Path) -> anyhow::Result<String> {
    if !data_dir.join("root.crt").exists() {
        return Err(store::StoreError::Missing(data_dir.display().to_string()).into());
    }
    Ok(rotation::signing(data_dir)?.signing_root().to_owned())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
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
        CaCommand::Intermediate { command } => intermediate(command),
        CaCommand::Rotate { command } => rotate(command),
    }
}

fn intermediate(command: IntermediateCommand) -> anyhow::Result<()> {
    match command {
        IntermediateCommand::Rotate { dir, ttl, output } => {
            let r = store::rotate_intermediate(&dir.data_dir, ttl, SystemTime::now())?;
            match output {
                Output::Json => print_json(&r)?,
                Output::Table if quiet() => outln!("{}", r.serial),
                Output::Table => {
                    outln!(
                        "new signing intermediate {} (expires {}) in {}",
                        r.serial,
                        r.not_after,
                        dir.data_dir.display()
                    );
                    outln!(
                        "  it replaces {} (expires {}); certificates that one signed stay valid until they expire",
                        r.replaced,
                        r.replaced_not_after
                    );
                    outln!(
                        "  a running `meshgate ca serve` signs with it within its reload_interval (SIGHUP: at once); nodes renew onto it by themselves"
                    );
                }
            }
            Ok(())
        }
    }
}

fn rotate(command: RotateCommand) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match command {
        RotateCommand::Plan { dir } => {
            outln!("{}", rotation::plan(&dir.data_dir, now)?);
            Ok(())
        }
        RotateCommand::Start { dir, output } => {
            let state = rotation::start(&dir.data_dir, now)?;
            match output {
                Output::Json => print_json(&state)?,
                Output::Table if quiet() => outln!("{}", state.new_root),
                Output::Table => {
                    outln!(
                        "root rotation started: stage add-root, new root {}",
                        state.new_root
                    );
                    outln!(
                        "  every trust bundle now carries both roots (a running `meshgate ca serve` publishes it within its reload_interval)"
                    );
                    outln!(
                        "  next: `meshgate ca rotate status --data-dir {}` says what each stage waits for",
                        dir.data_dir.display()
                    );
                }
            }
            Ok(())
        }
        RotateCommand::Status { dir, output } => {
            let status = rotation::status(&dir.data_dir, now)?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "stage": status.stage(),
                    "can_finish": status.can_finish(),
                    "waiting_for": status.waiting_for(),
                    "status": status,
                }))?,
                Output::Table => outln!("{status}"),
            }
            Ok(())
        }
        RotateCommand::Finish { dir, output } => {
            let r = rotation::finish(&dir.data_dir, now)?;
            match output {
                Output::Json => print_json(&r)?,
                Output::Table if quiet() => outln!("{}", r.root),
                Output::Table => {
                    outln!(
                        "root rotation finished: {} retired, {} in place",
                        r.retired_root,
                        r.root
                    );
                    outln!(
                        "  new joins pin {}: put it in `ca.fingerprint` of node configs (nodes that joined need no change)",
                        r.root
                    );
                }
            }
            Ok(())
        }
        RotateCommand::Abort { dir } => {
            let state = rotation::abort(&dir.data_dir)?;
            if !quiet() {
                outln!(
                    "root rotation aborted (it was in stage {}); signing under {} again; certificates issued under the new root keep verifying through the cross-signed intermediate, and nodes renew them",
                    state.stage,
                    state.old_root
                );
            }
            Ok(())
        }
    }
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match command {
        TokenCommand::Create {
            dir,
            node,
            namespace,
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
            if let Some(at) = Denylist::new(&data_dir).refused(&node) {
                anyhow::bail!(
                    "node {node} was revoked at {}: run `meshgate ca node remove {node}` first if it may join again",
                    rfc3339(at)
                );
            }
            let t = TokenStore::new(&data_dir).create(
                &node,
                namespace.as_deref(),
                &services,
                ttl,
                now,
            )?;
            let id = pki::sha256_hex(t.token.as_bytes())[..store::TOKEN_ID_LEN].to_owned();
            let expires_at =
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.record.expires_at));
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
                    outln!("namespace:       {}", t.record.namespace());
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
    let now = SystemTime::now();
    match command {
        NodeCommand::List { dir, output } => {
            let nodes = NodeRegistry::new(&dir.data_dir).list();
            let deny = Denylist::new(&dir.data_dir);
            let reports = Reports::new(&dir.data_dir);
            let unix = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
            let mut rows = Vec::new();
            let mut json_rows = Vec::new();
            for (name, r) in &nodes {
                let revoked = deny.refused(name);
                let report = reports.get(name);
                json_rows.push(serde_json::json!({
                    "node": name,
                    "namespace": r.namespace(),
                    "services": r.services,
                    "state": if revoked.is_some() { "revoked" } else { "active" },
                    "revoked_at": revoked.map(rfc3339),
                    "bundle_sequence": report.as_ref().map(|b| b.sequence),
                    "bundle_roots": report.as_ref().map(|b| &b.roots),
                    "bundle_reported_at": report.as_ref().map(|b| unix(b.at)),
                    "joined_at": unix(r.joined_at),
                }));
                rows.push(vec![
                    name.clone(),
                    r.namespace(),
                    if r.services.is_empty() {
                        "-".into()
                    } else {
                        r.services
                            .iter()
                            .map(|s| s.split_once('/').map_or(s.as_str(), |(_, n)| n))
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    match revoked {
                        Some(at) => format!("revoked {}", rfc3339(at)),
                        None => "active".into(),
                    },
                    report.as_ref().map_or_else(
                        || "-".into(),
                        |b| format!("{} ({})", b.sequence, unix(b.at)),
                    ),
                    unix(r.joined_at),
                ]);
            }
            if output == Output::Json {
                return print_json(&json_rows);
            }
            if nodes.is_empty() {
                outln!("no node has joined the CA in {}", dir.data_dir.display());
                return Ok(());
            }
            print_table(
                &["NODE", "NAMESPACE", "SERVICES", "STATE", "BUNDLE", "JOINED"],
                &rows,
            )
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
            let released = Denylist::new(&dir.data_dir).release(&node)?;
            if !NodeRegistry::new(&dir.data_dir).remove(&node)? && !released {
                anyhow::bail!(
                    "node {node:?} has not joined this CA; `meshgate ca node list` shows those that have"
                );
            }
            if !quiet() {
                if released {
                    outln!(
                        "removed node {node}: it may join again with a new token; the certificates it held when it was revoked stay refused until they expire"
                    );
                } else {
                    outln!(
                        "removed node {node}: the CA refuses its renewals from now on; its current certificates stay valid until they expire (`meshgate ca node revoke {node}` ends them at once)"
                    );
                }
            }
            Ok(())
        }
        NodeCommand::Revoke { dir, node } => {
            let known = NodeRegistry::new(&dir.data_dir).get(&node).is_some();
            let r = Denylist::new(&dir.data_dir).revoke(&node, now)?;
            if !known {
                warn!(
                    node,
                    "this node has not joined (or was removed); revoking its name anyway"
                );
            }
            if !quiet() {
                outln!(
                    "revoked node {node}: {} of its certificates are refused from now on; a running `meshgate ca serve` pushes the denylist to every node within its reload_interval, and they close the node's tunnels",
                    r.serials.len()
                );
            }
            Ok(())
        }
    }
}

async fn serve(path: PathBuf, lifecycle: crate::lifecycle::LifecycleArgs) -> anyhow::Result<()> {
    let config = crate::config::load_ca(&path)?;
    crate::config::refuse_errors(&path, check_config(&config, CheckOptions::default()))?;
    let catalog = match &config.consul {
        Some(c) => {
            let client = meshgate_agent::discovery::consul::ConsulClient::new(c)
                .with_context(|| format!("{}: consul", path.display()))?;
            Some(std::sync::Arc::new(client) as std::sync::Arc<dyn meshgate_ca::catalog::Catalog>)
        }
        None => None,
    };
    let server = CaServer::start(&config, catalog)
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
                match server.reload() {
                    Ok(c) if c.bundle || c.signer => info!(bundle = c.bundle, signer = c.signer, "reloaded the data dir"),
                    Ok(_) => info!("data dir unchanged"),
                    Err(e) => warn!(error = %e, "reloading the data dir failed; keeping the current state"),
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
