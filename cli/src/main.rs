//! `meshgate`: the one binary. It parses the command line, sets up logging and wires the crates
//! together; the work happens in `meshgate-ca` and `meshgate-agent`.
//!
//! Conventions every command follows: output on stdout, logs and errors on stderr; exit 0 on
//! success, 1 on error, 2 for a usage error, 141 when stdout was closed early (`| head`), 130
//! after a second Ctrl-C; `NO_COLOR` or `--no-color` turn colour off; `--quiet` keeps only
//! what a script needs.

mod admin_client;
mod agent;
mod auth_explain;
mod authz;
mod ca;
mod certs;
mod check;
mod config;
#[cfg(test)]
mod config_reference;
mod demo;
mod demo_orders;
mod dev;
mod dev_setup;
mod gateway;
mod inspect;
mod lifecycle;
mod openapi;
mod otlp_sink;
mod output;
#[cfg(test)]
mod reference;
mod routes;
mod signals;
mod status;
mod top;
mod version;
mod why;
mod yaml_pos;

use std::io::Write as _;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

/// mimalloc: per-request allocations are a visible share of the data plane's work, and
/// glibc's malloc is the slowest part of it (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meshgate: a sidecar-less service mesh with a gateway mode.
///
/// Quick start: `meshgate dev` runs everything on 127.0.0.1. For a real deployment:
/// `meshgate ca init --trust-domain mesh.example --data-dir ./ca`, then
/// `meshgate ca serve --config ca.yaml` and
/// `meshgate ca token create --data-dir ./ca --node node-a --print-join-command`.
#[derive(Debug, Parser)]
#[command(name = "meshgate", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHGATE_LOG_FORMAT", help_heading = "Global options")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `meshgate_agent=debug` (RUST_LOG syntax). Default `info`,
    /// `warn` with --quiet.
    #[arg(
        long,
        global = true,
        env = "MESHGATE_LOG",
        help_heading = "Global options"
    )]
    log: Option<String>,
    /// No colour in logs and messages (so does a non-empty NO_COLOR environment variable).
    #[arg(long, global = true, help_heading = "Global options")]
    no_color: bool,
    /// Print only what a script needs: errors, and the one value a command produces.
    #[arg(short, long, global = true, help_heading = "Global options")]
    quiet: bool,
    /// Threads that carry traffic (the async runtime's workers). Default for `agent`,
    /// `gateway` and `ca`: half the CPUs this process may use (cgroup limits count), at least
    /// one, since a meshgate process shares its host with the workloads it serves; `dev` uses
    /// them all. One thread runs a single-threaded scheduler (no cross-thread wake-ups). On a
    /// host dedicated to a gateway, set it to the number of CPUs.
    #[arg(long, global = true, env = "MESHGATE_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024), help_heading = "Global options")]
    threads: Option<u16>,
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
    /// The certificate authority: create it, serve it, make join tokens, manage nodes.
    Ca(ca::CaArgs),
    /// List the certificates a node holds in its data dir.
    Certs(certs::CertsArgs),
    /// Run the gateway: the public HTTPS/HTTP door to every service, through the mesh.
    Gateway(gateway::GatewayArgs),
    /// The gateway's routes, or which route a request would take (--match).
    Routes(routes::RoutesArgs),
    /// Print the OpenAPI 3.1 document of a gateway config's routes (transcoded protos included).
    Openapi(openapi::OpenApiArgs),
    /// Edge authentication: explain why a token passes or fails on a route.
    Auth(AuthArgs),
    /// API keys: print the hash to put in `auth.api_keys.consumers[].keys`.
    Apikey(ApikeyArgs),
    /// Intentions: what the live rules of a running agent decide.
    Authz(AuthzArgs),
    /// Validate config files and print their JSON Schema.
    Config(config::ConfigArgs),
    /// A running agent or gateway: kind, node, version, readiness (with what to do when not
    /// ready), listeners, identities and their expiry, tunnel peers, discovery health, config
    /// generation and last reload. Exit 1 when not ready.
    Status(status::StatusArgs),
    /// Live requests per second, p50/p99 latency and error rate per route and per upstream
    /// service of a running gateway or agent: redrawn in place on a terminal, one table per
    /// interval when piped, one JSON object per line with -o json (--once: one sample).
    Top(top::TopArgs),
    /// Walk every layer a request would cross (route, authentication, authorization, rate
    /// limit, endpoint, the destination's intention) and say where it would stop and why.
    /// Exit 1 when it would not get through (or, for a split, only part of it would).
    Why(why::WhyArgs),
    /// The services a running agent calls: source, freshness, endpoint counts.
    Services(inspect::AdminArgs),
    /// The endpoints of one service as a running agent sees them.
    Endpoints(inspect::EndpointsArgs),
    /// Verify a running deployment: CA reachable and pinned, certificates, discovery, routes,
    /// clock skew, key file modes. Names each problem with what to do; exit 1 if any.
    Check(check::CheckArgs),
    /// This client's version, and the version and kind of the process --admin points at.
    Version(version::VersionArgs),
    /// Serve the demo REST service of `meshgate dev` (GET /users/ID, GET /health) on its own.
    Demo(demo::DemoArgs),
    /// Print a shell completion script: `meshgate completion bash > /etc/bash_completion.d/meshgate`.
    Completion(CompletionArgs),
    /// Debugging aids (hidden): `meshgate debug otlp-sink`.
    #[command(hide = true)]
    Debug(DebugArgs),
}

#[derive(Debug, clap::Args)]
struct DebugArgs {
    #[command(subcommand)]
    command: DebugCommand,
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// A local OTLP receiver (gRPC and HTTP/protobuf) that counts spans and drops them, for
    /// measuring tracing's cost.
    OtlpSink(otlp_sink::OtlpSinkArgs),
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
struct AuthzArgs {
    #[command(subcommand)]
    command: AuthzCommand,
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// The decision and the deciding rule for --from calling --to (with --method/--path for
    /// HTTP services), from the live rule set of the destination's agent (--admin). Exit 1
    /// when denied.
    Check(authz::CheckArgs),
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

#[derive(Debug, clap::Args)]
struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// An error that was already reported on stderr (e.g. by `config validate`): exit 1 quietly.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported above")
    }
}

impl std::error::Error for Reported {}

fn init_logging(cli: &Cli) {
    let default = if cli.quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(output::color())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The clap command with every environment value hidden from help (help must not print a
/// token or an address someone exported), as both `--help` and the CLI reference use it.
pub(crate) fn command() -> clap::Command {
    fn hide(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_args(|a| a.hide_env_values(true));
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        names
            .into_iter()
            .fold(cmd, |c, n| c.mut_subcommand(n, hide))
    }
    hide(Cli::command()).term_width(100)
}

/// "outer: inner", dropping a cause whose text the previous part already contains (thiserror
/// messages often embed their source, which `{:#}` would print twice).
fn describe(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if parts.last().is_none_or(|l| !l.contains(&msg)) {
            parts.push(msg);
        }
    }
    parts.join(": ")
}

fn parse() -> Result<Cli, std::process::ExitCode> {
    let matches = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = e.exit_code();
            let informational =
                matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            let colour = !informational
                && output::color_wanted(
                    false,
                    std::io::IsTerminal::is_terminal(&std::io::stderr()),
                );
            let text = if colour {
                e.render().ansi().to_string()
            } else {
                e.render().to_string()
            };
            if e.use_stderr() {
                let _ = write!(std::io::stderr(), "{text}");
            } else if let Err(err) = output::write_bytes(text.as_bytes())
                && err.downcast_ref::<output::StdoutClosed>().is_some()
            {
                return Err(std::process::ExitCode::from(output::EXIT_STDOUT_CLOSED));
            }
            return Err(std::process::ExitCode::from(
                u8::try_from(code).unwrap_or(2),
            ));
        }
    };
    Cli::from_arg_matches(&matches).map_err(|e| {
        let _ = write!(std::io::stderr(), "{}", e.render());
        std::process::ExitCode::from(2)
    })
}

/// The async runtime for `cli.command`: see `--threads` for the defaults. Commands that only
/// ask something and print get a single thread.
fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = match (cli.threads, &cli.command) {
        (Some(n), _) => usize::from(n),
        (None, Command::Dev(_)) => cpus,
        (None, Command::Agent(_) | Command::Gateway(_) | Command::Ca(_) | Command::Demo(_)) => {
            (cpus / 2).max(1)
        }
        (None, _) => 1,
    };
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build()
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = match parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    output::init(cli.no_color, cli.quiet);
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
    let runtime = match runtime(&cli) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
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
            Command::Status(args) => status::run(args).await,
            Command::Top(args) => top::run(args).await,
            Command::Why(args) => why::run(args).await,
            Command::Gateway(args) => gateway::run(args).await,
            Command::Routes(args) => routes::run(args).await,
            Command::Openapi(args) => openapi::run(args),
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
                outln!("{}", meshgate_gateway::apikey::hash_key(&key));
                Ok(())
            }
            Command::Authz(AuthzArgs {
                command: AuthzCommand::Check(args),
            }) => authz::run(args).await,
            Command::Endpoints(args) => inspect::endpoints(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Version(args) => version::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Debug(DebugArgs {
                command: DebugCommand::OtlpSink(args),
            }) => otlp_sink::run(args).await,
            Command::Completion(CompletionArgs { shell }) => {
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut command(), "meshgate", &mut script);
                output::write_bytes(&script)
            }
        }
    });
    // stop background tasks before the process exits
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<output::StdoutClosed>().is_some() => {
            std::process::ExitCode::from(output::EXIT_STDOUT_CLOSED)
        }
        Err(e) if e.downcast_ref::<Reported>().is_some() => std::process::ExitCode::FAILURE,
        Err(e) => {
            let text = describe(&e);
            // multi-line errors (config diagnostics) carry their own `error:` labels
            let text = if text.contains(": error: ") || text.contains(": warning: ") {
                text
            } else {
                format!("{}: {text}", output::paint(output::Paint::Error, "error"))
            };
            let _ = writeln!(std::io::stderr(), "{text}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(io).context("cannot bind 127.0.0.1:1: Address already in use");
        assert_eq!(
            describe(&e),
            "cannot bind 127.0.0.1:1: Address already in use"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&e), "outer: inner");
    }

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }
}
