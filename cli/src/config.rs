//! Reading config files, and `meshgate config validate|schema`.
//!
//! Every problem is reported once, as `FILE:LINE:COLUMN: error: what is wrong`, with a hint
//! line saying what to do: syntax and type errors from the YAML parser (with "did you mean"
//! for a misspelt key), and the semantic checks start-up runs (the crates' `check()`), whose
//! config paths are mapped back to the YAML position. Relative paths in a file are resolved
//! against the file's directory.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use meshgate_agent::{
    config::AgentConfig,
    config_check::{CheckOptions, Finding, Severity, split_config_path},
};
/// `ca.yaml`: the CA's settings, its `consul:` section read as the agent's Consul settings.
pub(crate) type CaConfig =
    meshgate_ca::server::CaConfig<meshgate_agent::discovery::consul::ConsulConfig>;
use meshgate_gateway::config::GatewayConfig;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    outln,
    output::{Output, Paint, paint, print_json, quiet},
    yaml_pos::{Pos, YamlIndex},
};

/// One problem in one file, with its position when known.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Diagnostic {
    /// The file.
    pub(crate) file: PathBuf,
    /// Error or warning.
    pub(crate) severity: Severity,
    /// Where, when known.
    #[serde(flatten)]
    pub(crate) pos: Option<Pos>,
    /// The config path, when known (`routes[2].backend`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) path: String,
    /// What is wrong.
    pub(crate) message: String,
    /// What to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) hint: Option<String>,
}

impl Diagnostic {
    fn from_finding(file: &Path, index: &YamlIndex, f: Finding) -> Self {
        let pos = index.locate_message(&f.path, &f.message);
        Self {
            file: file.to_owned(),
            severity: f.severity,
            pos,
            path: f.path,
            message: f.message,
            hint: f.hint,
        }
    }

    /// `FILE:LINE:COLUMN: error: message` and, on the next line, `  hint: …`.
    pub(crate) fn render(&self) -> String {
        let level = match self.severity {
            Severity::Error => paint(Paint::Error, "error"),
            Severity::Warning => paint(Paint::Warning, "warning"),
        };
        let at = match self.pos {
            Some(p) => format!("{}:{}:{}", self.file.display(), p.line, p.column),
            None => self.file.display().to_string(),
        };
        let what = if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        };
        let mut s = format!("{at}: {level}: {what}");
        if let Some(h) = &self.hint {
            s.push_str(&format!("\n  {}: {h}", paint(Paint::Hint, "hint")));
        }
        s
    }
}

/// The errors of one file, as one error value (what `load_*` return).
#[derive(Debug)]
pub(crate) struct ConfigErrors(pub(crate) Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(Diagnostic::render).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| {
            (
                distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                *c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or `expected `a` or `b``):
/// the unknown word and the valid ones.
fn unknown_name(msg: &str) -> Option<(String, &'static str, Vec<String>)> {
    let (what, rest) = if let Some(r) = msg.strip_prefix("unknown field `") {
        ("key", r)
    } else if let Some(r) = msg.strip_prefix("unknown variant `") {
        ("value", r)
    } else {
        return None;
    };
    let (word, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected ").map(|x| x.1).unwrap_or("");
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    let valid: Vec<String> = expected
        .split([',', ' '])
        .map(|s| s.trim().trim_matches('`'))
        .filter(|s| !s.is_empty() && *s != "or")
        .map(str::to_owned)
        .collect();
    Some((word.to_owned(), what, valid))
}

/// A parser message made readable, with a hint: "did you mean" for misspelt keys and values.
fn explain_parse_error(msg: &str, kind: Option<&str>) -> (String, Option<String>) {
    let schema = kind
        .map(|k| format!("; `meshgate config schema --kind {k}` lists every key"))
        .unwrap_or_default();
    if let Some((word, what, valid)) = unknown_name(msg) {
        let message = format!("unknown {what} `{word}`");
        let refs: Vec<&str> = valid.iter().map(String::as_str).collect();
        let hint = match closest(&word, &refs) {
            Some(c) => format!("did you mean `{c}`? (valid here: {})", valid.join(", ")),
            None if valid.is_empty() => format!("nothing is allowed here{schema}"),
            None => format!("valid here: {}", valid.join(", ")),
        };
        return (message, Some(hint));
    }
    if let Some(field) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.split_once('`'))
        .map(|x| x.0)
    {
        return (
            format!("missing key `{field}`"),
            Some(format!("add `{field}:` here{schema}")),
        );
    }
    let hint = match msg {
        m if m.starts_with("invalid u16") => Some("expected a whole number from 0 to 65535".into()),
        m if m.starts_with("invalid u32") || m.starts_with("invalid u64") || m.starts_with("invalid usize") => {
            Some("expected a whole number".into())
        }
        m if m.contains("invalid socket address") => {
            Some("expected IP:PORT, e.g. 127.0.0.1:15000".into())
        }
        m if m.contains("duration") => Some("durations look like 30s, 10m, 24h".into()),
        m if m.contains("mapping values are not allowed") => Some(
            "check the indentation here and on the line above: a `key:` cannot start inside a value".into(),
        ),
        m if m.contains("did not find expected") || m.contains("while parsing") => {
            Some("a YAML syntax error: check quotes, brackets and indentation".into())
        }
        _ => None,
    };
    (msg.to_owned(), hint)
}

fn kind_name<T: 'static>() -> Option<&'static str> {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    if t == TypeId::of::<AgentConfig>() {
        Some("agent")
    } else if t == TypeId::of::<GatewayConfig>() {
        Some("gateway")
    } else if t == TypeId::of::<CaConfig>() {
        Some("ca")
    } else {
        None
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot read {}: {reason}", path.display())
    })
}

/// Parses YAML text into `T`, with every parse error as a [`Diagnostic`].
fn parse<T: DeserializeOwned + 'static>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    serde_saphyr::from_str(text).map_err(|e| {
        use serde_saphyr::MessageFormatter as _;
        let raw = serde_saphyr::UserMessageFormatter
            .format_message(&e)
            .into_owned();
        let (message, hint) = explain_parse_error(&raw, kind_name::<T>());
        let pos = e.location().filter(|l| l.line() > 0).map(|l| Pos {
            line: l.line(),
            column: l.column(),
        });
        ConfigErrors(vec![Diagnostic {
            file: path.to_owned(),
            severity: Severity::Error,
            pos,
            path: String::new(),
            message,
            hint,
        }])
    })
}

/// Parses a YAML file into `T`; unknown keys are errors (the config structs deny them).
pub(crate) fn load_yaml<T: DeserializeOwned + 'static>(path: &Path) -> anyhow::Result<T> {
    let text = read(path)?;
    Ok(parse(path, &text)?)
}

/// The directory relative paths in `path` are relative to.
fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Reads an agent config, with relative paths resolved against the file's directory.
pub(crate) fn load_agent(path: &Path) -> anyhow::Result<AgentConfig> {
    let mut c: AgentConfig = load_yaml(path)?;
    c.resolve_paths(&base_dir(path));
    Ok(c)
}

/// Reads a gateway config, with relative paths resolved against the file's directory.
pub(crate) fn load_gateway(path: &Path) -> anyhow::Result<GatewayConfig> {
    let mut c: GatewayConfig = load_yaml(path)?;
    c.resolve_paths(&base_dir(path));
    Ok(c)
}

/// Reads a CA config, with relative paths resolved against the file's directory.
pub(crate) fn load_ca(path: &Path) -> anyhow::Result<CaConfig> {
    let mut c: CaConfig = load_yaml(path)?;
    resolve_ca_paths(&mut c, &base_dir(path));
    Ok(c)
}

/// Makes the data dir and the Consul files of a CA config relative to `base` (the directory
/// of the file it was read from) instead of the working directory.
pub(crate) fn resolve_ca_paths(c: &mut CaConfig, base: &Path) {
    meshgate_agent::config_check::resolve_path(&mut c.data_dir, base);
    if let Some(consul) = &mut c.consul {
        consul.resolve_paths(base);
    }
}

/// An error a crate reported about `path`'s config (`routes[1] (users): …`), pointed at its
/// line when the text names a config path.
pub(crate) fn semantic_error(path: &Path, text: &str) -> anyhow::Error {
    let index = std::fs::read_to_string(path)
        .map(|t| YamlIndex::new(&t))
        .unwrap_or_else(|_| YamlIndex::new(""));
    let (p, message) = split_config_path(text);
    anyhow::Error::new(ConfigErrors(vec![Diagnostic::from_finding(
        path,
        &index,
        Finding::error(p, message),
    )]))
}

/// The errors of `findings` (warnings are logged), as one error if there are any.
pub(crate) fn refuse_errors(path: &Path, findings: Vec<Finding>) -> anyhow::Result<()> {
    let index = std::fs::read_to_string(path)
        .map(|t| YamlIndex::new(&t))
        .unwrap_or_else(|_| YamlIndex::new(""));
    let (errors, warnings): (Vec<_>, Vec<_>) = findings
        .into_iter()
        .map(|f| Diagnostic::from_finding(path, &index, f))
        .partition(|d| d.severity == Severity::Error);
    for w in warnings {
        tracing::warn!("{}", w.render());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors).into())
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

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Gateway => "gateway",
            Self::Ca => "CA",
        }
    }
}

/// Arguments of `meshgate config`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Check config files as start-up would, without the network; exit 1 if any is invalid.
    ///
    /// Runs the same checks start-up runs, except reachability: syntax and types (with "did
    /// you mean" for misspelt keys), the CA fingerprint (the all-zero placeholder is a
    /// warning) and URL schemes, files (present, readable, secrets mode 0600), TLS
    /// certificate/key pairs, ports used twice in the file, and backends or upstreams that no
    /// discovery source resolves. Each problem is printed once, as FILE:LINE:COLUMN: error:
    /// MESSAGE, with a hint line. Relative paths are relative to the file's directory.
    Validate {
        /// The files (agent.yaml, gateway.yaml, ca.yaml; any number).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// What the files are; guessed from their keys when not given.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
        /// Do not check the files a config names (for CI machines without the host's files).
        #[arg(long)]
        skip_files: bool,
        /// Output format; json prints {"valid", "files": [{"file","kind","valid","summary",
        /// "diagnostics": [{"severity","line","column","path","message","hint"}]}]}.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print the JSON Schema of a config (for editors and CI linters).
    Schema {
        /// Which config.
        #[arg(long, value_enum)]
        kind: Kind,
    },
}

fn guess(path: &Path, text: &str) -> Result<Kind, ConfigErrors> {
    let v: serde_json::Value = parse(path, text)?;
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

/// The outcome for one file.
#[derive(Debug, Serialize)]
struct FileReport {
    file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    diagnostics: Vec<Diagnostic>,
}

fn validate_file(file: &Path, kind: Option<Kind>, opts: CheckOptions) -> FileReport {
    let mut report = FileReport {
        file: file.to_owned(),
        kind: None,
        valid: false,
        summary: None,
        diagnostics: Vec::new(),
    };
    let text = match read(file) {
        Ok(t) => t,
        Err(e) => {
            report.diagnostics.push(Diagnostic {
                file: file.to_owned(),
                severity: Severity::Error,
                pos: None,
                path: String::new(),
                message: e.to_string(),
                hint: None,
            });
            return report;
        }
    };
    let kind = match kind.map(Ok).unwrap_or_else(|| guess(file, &text)) {
        Ok(k) => k,
        Err(ConfigErrors(d)) => {
            report.diagnostics = d;
            return report;
        }
    };
    report.kind = Some(kind.label());
    let base = base_dir(file);
    let parsed = match kind {
        Kind::Agent => parse::<AgentConfig>(file, &text).map(|mut c| {
            c.resolve_paths(&base);
            (
                c.check(opts),
                format!(
                    "agent config for node {} ({} service{})",
                    c.node,
                    c.services.len(),
                    if c.services.len() == 1 { "" } else { "s" }
                ),
            )
        }),
        Kind::Gateway => parse::<GatewayConfig>(file, &text).map(|mut c| {
            c.resolve_paths(&base);
            (
                c.check(opts),
                format!(
                    "gateway config for node {} ({} route{})",
                    c.node,
                    c.routes.len(),
                    if c.routes.len() == 1 { "" } else { "s" }
                ),
            )
        }),
        Kind::Ca => parse::<CaConfig>(file, &text).map(|mut c| {
            resolve_ca_paths(&mut c, &base);
            (
                crate::ca::check_config(&c, opts),
                format!("CA config for trust domain {}", c.trust_domain),
            )
        }),
    };
    match parsed {
        Err(ConfigErrors(d)) => report.diagnostics = d,
        Ok((findings, summary)) => {
            let index = YamlIndex::new(&text);
            report.diagnostics = findings
                .into_iter()
                .map(|f| Diagnostic::from_finding(file, &index, f))
                .collect();
            // errors first, then warnings; each in the order of the file
            report.diagnostics.sort_by_key(|d| {
                (
                    d.severity,
                    d.pos.map_or((u64::MAX, 0), |p| (p.line, p.column)),
                )
            });
            report.valid = !report
                .diagnostics
                .iter()
                .any(|d| d.severity == Severity::Error);
            report.summary = Some(summary);
        }
    }
    report
}

/// `meshgate config …`.
pub(crate) fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Schema { kind } => {
            let schema = match kind {
                Kind::Agent => schemars::schema_for!(AgentConfig),
                Kind::Gateway => schemars::schema_for!(GatewayConfig),
                Kind::Ca => schemars::schema_for!(CaConfig),
            };
            print_json(&schema)
        }
        ConfigCommand::Validate {
            files,
            kind,
            skip_files,
            output,
        } => {
            let opts = CheckOptions { files: !skip_files };
            let reports: Vec<FileReport> =
                files.iter().map(|f| validate_file(f, kind, opts)).collect();
            let valid = reports.iter().all(|r| r.valid);
            if output == Output::Json {
                print_json(&serde_json::json!({"valid": valid, "files": reports}))?;
            } else {
                for r in &reports {
                    for d in &r.diagnostics {
                        if d.severity == Severity::Warning && quiet() {
                            continue;
                        }
                        eprintln_safe(&d.render());
                    }
                    if r.valid && !quiet() {
                        let warnings = r.diagnostics.len();
                        let note = match warnings {
                            0 => String::new(),
                            1 => " (1 warning)".into(),
                            n => format!(" ({n} warnings)"),
                        };
                        outln!(
                            "{}: valid {}{note}",
                            r.file.display(),
                            r.summary.as_deref().unwrap_or("config")
                        );
                    }
                }
            }
            if valid {
                Ok(())
            } else {
                Err(crate::Reported.into())
            }
        }
    }
}

/// One message on stderr; a closed stderr is ignored.
pub(crate) fn eprintln_safe(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples")
            .join(name)
    }

    #[test]
    fn shipped_examples_parse() {
        let agent = load_agent(&example("agent.yaml")).expect("agent.yaml parses");
        agent.validate().expect("agent.yaml validates");
        assert_eq!(agent.services[0].upstreams[0].service, "users");
        // relative paths follow the file
        assert!(
            agent.data_dir.starts_with(example("")),
            "{:?}",
            agent.data_dir
        );
        let consul = load_agent(&example("agent-consul.yaml")).expect("agent-consul.yaml parses");
        consul.validate().expect("agent-consul.yaml validates");
        assert!(consul.discovery.consul.is_some() && consul.discovery.dns.is_some());
        let gw = load_gateway(&example("gateway.yaml")).expect("gateway.yaml parses");
        gw.compile().expect("gateway.yaml validates");
        assert_eq!(gw.routes.len(), 3);
        let ca = load_ca(&example("ca.yaml")).expect("ca.yaml parses");
        assert_eq!(ca.trust_domain, "mesh.example");
    }

    #[test]
    fn typos_get_a_suggestion() {
        let (msg, hint) = explain_parse_error(
            "unknown field `conect_timeout`, expected one of connect_timeout, keepalive_interval",
            Some("agent"),
        );
        assert_eq!(msg, "unknown key `conect_timeout`");
        assert_eq!(
            hint.as_deref(),
            Some(
                "did you mean `connect_timeout`? (valid here: connect_timeout, keepalive_interval)"
            )
        );
        let (_, hint) = explain_parse_error(
            "unknown variant `htp`, expected one of `tcp`, `http`, `grpc`",
            None,
        );
        assert!(hint.expect("hint").starts_with("did you mean `http`?"));
        let (_, hint) = explain_parse_error("unknown field `zzzzzz`, expected `a` or `b`", None);
        assert_eq!(hint.as_deref(), Some("valid here: a, b"));
        assert_eq!(closest("paht", &["path", "hosts", "methods"]), Some("path"));
        assert_eq!(closest("xyz", &["path"]), None);
    }
}
