//! `meshgate`: the one binary. It parses the command line, sets up logging and wires the crates
//! together; the work happens in `meshgate-ca` and `meshgate-agent`.

mod agent;
mod auth_explain;
mod ca;
mod certs;
mod check;
mod config;
mod dev;
mod gateway;
mod inspect;
mod lifecycle;
mod output;
mod routes;

use clap::{Parser, Subcommand, ValueEnum};

/// meshgate: a sidecar-less service mesh with a gateway mode.
///
/// Quick start: `meshgate ca init --trust-domain mesh.example --data-dir ./ca`, then
/// `meshgate ca serve --config ca.yaml` and `meshgate ca token create --data-dir ./ca --node node-a`.
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHGATE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `meshgate_agent=debug` (RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info", env = "MESHGATE_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything on 127.0.0.1 in one process: CA, two agents, gateway, demo service.
    Dev(dev::DevArgs),
    /// Run the node agent: mTLS tunnels between services, intentions, admin API.
    Agent(agent::AgentArgs),
    /// The certificate authority: create it, serve it, make join tokens.
    Ca(ca::CaArgs),
    /// List the certificates a node holds in its data dir.
    Certs(certs::CertsArgs),
    /// Run the gateway: the public HTTPS/HTTP door to every service, through the mesh.
    Gateway(gateway::GatewayArgs),
    /// The gateway's routes, or which route a request would take (--match).
    Routes(routes::RoutesArgs),
    /// Edge authentication: explain why a token passes or fails on a route.
    Auth(AuthArgs),
    /// API keys: print the hash to put in `auth.api_keys.consumers[].keys`.
    Apikey(ApikeyArgs),
    /// Validate config files and print their JSON Schema.
    Config(config::ConfigArgs),
    /// The services a running agent calls: source, freshness, endpoint counts.
    Services(inspect::AdminArgs),
    /// The endpoints of one service as a running agent sees them.
    Endpoints(inspect::EndpointsArgs),
    /// Verify a running deployment: CA reachable and pinned, certificates, discovery, routes,
    /// clock skew, key file modes. Names each problem with what to do; exit 1 if any.
    Check(check::CheckArgs),
}

#[derive(Debug, clap::Args)]
struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Which check a token passes or fails on a route (signature, kid, alg, iss, aud, exp,
    /// nbf, JWKS reachability), without printing the token. Exit 1 when invalid.
    Explain(auth_explain::ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct ApikeyArgs {
    #[command(subcommand)]
    command: ApikeyCommand,
}

#[derive(Debug, Subcommand)]
enum ApikeyCommand {
    /// Print `sha256:HEX` of a key. Reads the key from stdin when not given, so it stays out of
    /// shell history: `meshgate apikey hash < key.txt`.
    Hash {
        /// The key (prefer stdin).
        key: Option<String>,
    },
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    init_logging(&cli);
    if matches!(
        cli.command,
        Command::Agent(_) | Command::Gateway(_) | Command::Dev(_) | Command::Ca(_)
    ) {
        // every connection is a descriptor; the usual soft limit of 1024 fails clients early
        match meshgate_agent::transport::raise_fd_limit() {
            Ok(l) if l.before != l.now => {
                tracing::info!(before = ?l.before, now = ?l.now, "raised the open-file limit (RLIMIT_NOFILE) to the hard limit")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)")
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => agent::run(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Ca(args) => ca::run(args).await,
            Command::Certs(args) => certs::run(args),
            Command::Services(args) => inspect::services(args).await,
            Command::Gateway(args) => gateway::run(args).await,
            Command::Routes(args) => routes::run(args).await,
            Command::Config(args) => config::run(args),
            Command::Auth(AuthArgs {
                command: AuthCommand::Explain(args),
            }) => auth_explain::run(args).await,
            Command::Apikey(ApikeyArgs {
                command: ApikeyCommand::Hash { key },
            }) => {
                let key = match key {
                    Some(k) => k,
                    None => {
                        let mut line = String::new();
                        std::io::stdin().read_line(&mut line)?;
                        line.trim().to_owned()
                    }
                };
                anyhow::ensure!(
                    !key.is_empty(),
                    "no key given (pass it as an argument or on stdin)"
                );
                println!("{}", meshgate_gateway::apikey::hash_key(&key));
                Ok(())
            }
            Command::Endpoints(args) => inspect::endpoints(args).await,
            Command::Check(args) => check::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
