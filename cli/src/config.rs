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
        let ca: CaConfig = super::load_yaml(&example("ca.yaml")).expect("ca.yaml parses");
        assert_eq!(ca.trust_domain, "mesh.example");
    }
}
