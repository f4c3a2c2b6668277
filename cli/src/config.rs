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
