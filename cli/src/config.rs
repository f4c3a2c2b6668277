//! Reading YAML config files with errors that point at `file:line:column`.

use std::path::Path;

use anyhow::{Context, anyhow};
use serde::de::DeserializeOwned;

/// Parses a YAML file into `T`; unknown fields are errors (the config structs deny them).
pub(crate) fn load_yaml<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| match e.location() {
        Some(loc) => anyhow!("{}:{}:{}: {e}", path.display(), loc.line(), loc.column()),
        None => anyhow!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use meshgate_agent::config::AgentConfig;
    use meshgate_ca::server::CaConfig;

    fn example(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(name)
    }

    #[test]
    fn shipped_examples_are_valid() {
        let agent: AgentConfig =
            super::load_yaml(&example("agent.yaml")).expect("agent.yaml parses");
        agent.validate().expect("agent.yaml validates");
        assert_eq!(agent.services[0].upstreams[0].service, "users");
        let consul: AgentConfig =
            super::load_yaml(&example("agent-consul.yaml")).expect("agent-consul.yaml parses");
        consul.validate().expect("agent-consul.yaml validates");
        assert!(consul.discovery.consul.is_some() && consul.discovery.dns.is_some());
        let gw: meshgate_gateway::config::GatewayConfig =
            super::load_yaml(&example("gateway.yaml")).expect("gateway.yaml parses");
        gw.compile().expect("gateway.yaml validates");
        assert_eq!(gw.routes.len(), 3);
        let ca: CaConfig = super::load_yaml(&example("ca.yaml")).expect("ca.yaml parses");
        assert_eq!(ca.trust_domain, "mesh.example");
    }
}

/// Which configuration a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// agent.yaml
    Agent,
    /// gateway.yaml
    Gateway,
    /// ca.yaml
    Ca,
}

/// Arguments of `meshgate config`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Check a config file: syntax (errors as FILE:LINE:COLUMN) and meaning; exit 1 if invalid.
    Validate {
        /// The file.
        file: std::path::PathBuf,
        /// What the file is; guessed from its keys when not given.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
    /// Print the JSON Schema of a config (for editors and CI linters).
    Schema {
        /// Which config.
        #[arg(long, value_enum)]
        kind: Kind,
    },
}

fn guess(path: &Path) -> anyhow::Result<Kind> {
    let v: serde_json::Value = load_yaml(path)?;
    let has = |k: &str| v.get(k).is_some();
    Ok(
        if has("routes")
            || has("tls")
            || v["listen"].get("https").is_some()
            || v["listen"].get("http").is_some()
        {
            Kind::Gateway
        } else if has("node") {
            Kind::Agent
        } else {
            Kind::Ca
        },
    )
}

/// `meshgate config …`.
pub(crate) fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Schema { kind } => {
            let schema = match kind {
                Kind::Agent => schemars::schema_for!(meshgate_agent::config::AgentConfig),
                Kind::Gateway => schemars::schema_for!(meshgate_gateway::config::GatewayConfig),
                Kind::Ca => schemars::schema_for!(meshgate_ca::server::CaConfig),
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(())
        }
        ConfigCommand::Validate { file, kind } => {
            let kind = match kind {
                Some(k) => k,
                None => guess(&file)?,
            };
            let what = match kind {
                Kind::Agent => {
                    let c: meshgate_agent::config::AgentConfig = load_yaml(&file)?;
                    c.validate()
                        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
                    format!(
                        "agent config for node {} ({} services)",
                        c.node,
                        c.services.len()
                    )
                }
                Kind::Gateway => {
                    let c: meshgate_gateway::config::GatewayConfig = load_yaml(&file)?;
                    c.compile()
                        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
                    format!(
                        "gateway config for node {} ({} routes)",
                        c.node,
                        c.routes.len()
                    )
                }
                Kind::Ca => {
                    let c: meshgate_ca::server::CaConfig = load_yaml(&file)?;
                    meshgate_ca::spiffe::validate_trust_domain(&c.trust_domain)
                        .map_err(|e| anyhow!("{}: trust_domain: {e}", file.display()))?;
                    format!("CA config for trust domain {}", c.trust_domain)
                }
            };
            println!("{}: valid {what}", file.display());
            Ok(())
        }
    }
}
