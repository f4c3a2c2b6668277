//! What `meshgate config validate` and start-up check in an agent config beyond its shape:
//! everything that needs no network. The CA reference (fingerprint syntax and placeholder, URL
//! scheme, join token file), files (present, readable, secrets not readable by others), ports
//! used twice within the file, and upstreams that no discovery source can resolve. Each problem
//! is a [`Finding`] naming the config path it is about, so the CLI can point at its line.
//!
//! Also [`AgentConfig::resolve_paths`]: relative paths in a config file are relative to that
//! file's directory, not to the working directory.
//!
//! The gateway runs the same checks on the parts it shares (CA, discovery, files, ports).

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::discovery::consul::ConsulConfig;

use crate::{
    config::{AgentConfig, CaRef, DiscoveryConfig},
    identity::{check_ca_address, fingerprint_is_placeholder, fingerprint_syntax_ok},
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Start-up would refuse the config, or it cannot work.
    Error,
    /// It starts, but probably not as intended (a placeholder, a file that is not there yet).
    Warning,
}

/// One problem in a config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The config path it is about, e.g. `services[1].upstreams[0].listen` (empty: the whole
    /// file).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Finding {
    /// An error at `path`.
    pub fn error(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            path: path.into(),
            message: message.into(),
            hint: None,
        }
    }

    /// A warning at `path`.
    pub fn warning(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(path, message)
        }
    }

    /// The same finding with a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// What the checks may look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Check that files the config names exist, are readable and (for secrets) private.
    /// Off for CI machines that lack the target host's files.
    pub files: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { files: true }
    }
}

/// Whether a file holds a secret (it must not be readable by others) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A key, token or password: mode 0600 expected (0640 is accepted with a warning).
    Secret,
    /// A single-use, short-lived join token: 0600 expected, but a looser mode is a warning,
    /// not a refusal (it is spent at the first join, and scripts write it with the umask).
    JoinToken,
    /// A certificate, bundle or list anyone may read.
    Public,
}

/// Checks that `file` (named by the config at `path`) exists, is a readable regular file and,
/// for secrets, is not readable by others (an error) or by its group (a warning). Returns
/// whether it could be read.
pub fn check_file(path: &str, file: &Path, kind: FileKind, out: &mut Vec<Finding>) -> bool {
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(
                Finding::error(path, format!("{} does not exist", file.display())).hint(
                    "create it, or fix the path (relative paths are relative to the config file's directory)",
                ),
            );
            return false;
        }
        Err(e) => {
            out.push(Finding::error(
                path,
                format!("cannot read {}: {}", file.display(), io_reason(&e)),
            ));
            return false;
        }
    };
    if !meta.is_file() {
        out.push(Finding::error(
            path,
            format!("{} is not a regular file", file.display()),
        ));
        return false;
    }
    if let Err(e) = std::fs::File::open(file) {
        out.push(
            Finding::error(
                path,
                format!("cannot read {}: {}", file.display(), io_reason(&e)),
            )
            .hint("the process that runs meshgate needs read access to it"),
        );
        return false;
    }
    let mode = meta.permissions().mode() & 0o777;
    if kind == FileKind::JoinToken && mode & 0o077 != 0 {
        out.push(
            Finding::warning(
                path,
                format!(
                    "{} holds a join token and its mode is {mode:04o}: others on this machine can read it until it is used",
                    file.display()
                ),
            )
            .hint(format!("chmod 600 {}", file.display())),
        );
    } else if kind == FileKind::Secret && mode & 0o007 != 0 {
        out.push(
            Finding::error(
                path,
                format!(
                    "{} holds a secret but its mode is {mode:04o}: every user of this machine can read it",
                    file.display()
                ),
            )
            .hint(format!("chmod 600 {}", file.display())),
        );
    } else if kind == FileKind::Secret && mode & 0o070 != 0 {
        out.push(
            Finding::warning(
                path,
                format!(
                    "{} holds a secret and its group can read it (mode {mode:04o})",
                    file.display()
                ),
            )
            .hint(format!(
                "chmod 600 {} unless that group is meant to (such as Debian's ssl-cert)",
                file.display()
            )),
        );
    }
    true
}

/// An I/O error's reason without the `(os error N)` suffix.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Checks the `ca:` block: fingerprint syntax (the all-zero placeholder is a warning), the
/// address scheme, and the join token file against what `data_dir` already holds.
pub fn check_ca_ref(
    ca: &CaRef,
    node: &str,
    services: &[&str],
    data_dir: &Path,
    opts: CheckOptions,
    out: &mut Vec<Finding>,
) {
    let services = if services.is_empty() {
        String::new()
    } else {
        format!(" --services {}", services.join(","))
    };
    if !fingerprint_syntax_ok(&ca.fingerprint) {
        out.push(
            Finding::error(
                "ca.fingerprint",
                format!(
                    "{:?} is not a CA fingerprint: it must be sha256: followed by 64 hex digits",
                    ca.fingerprint
                ),
            )
            .hint(
                "on the CA host, `meshgate ca fingerprint --data-dir CA_DIR` prints it (so do `ca init` and `ca token create`)",
            ),
        );
    } else if fingerprint_is_placeholder(&ca.fingerprint) {
        out.push(
            Finding::warning(
                "ca.fingerprint",
                "the all-zero placeholder of the examples: joining will fail because no CA has this root",
            )
            .hint(
                "on the CA host, `meshgate ca fingerprint --data-dir CA_DIR` prints the real one",
            ),
        );
    }
    if let Err(e) = check_ca_address(&ca.address) {
        let msg = match ca.address.split_once("://") {
            Some((scheme, _)) if scheme != "https" => format!(
                "{:?} uses {scheme}://, but the CA speaks gRPC over TLS only",
                ca.address
            ),
            _ => {
                let m = e.to_string();
                m.strip_prefix("identity config: ").unwrap_or(&m).to_owned()
            }
        };
        out.push(
            Finding::error("ca.address", msg)
                .hint("write https://HOST:PORT of `meshgate ca serve` (port 15012 by default)"),
        );
    }
    let has_cert = data_dir.join("node.crt").exists();
    match &ca.join_token_file {
        None if !has_cert && opts.files => out.push(
            Finding::warning(
                "ca",
                format!(
                    "no join_token_file, and {} holds no node certificate: the node cannot join",
                    data_dir.display()
                ),
            )
            .hint(format!(
                "create a token with `meshgate ca token create --node {node}{services}`, save it (mode 0600) and set ca.join_token_file to its path"
            )),
        ),
        None => {}
        Some(_) if !opts.files => {}
        Some(file) if !file.exists() && has_cert => {}
        Some(file) if !file.exists() => {
            out.push(
                Finding::warning(
                    "ca.join_token_file",
                    format!(
                        "{} does not exist yet and {} holds no node certificate: the node cannot join until it does",
                        file.display(),
                        data_dir.display()
                    ),
                )
                .hint(format!(
                    "on the CA host, `meshgate ca token create --node {node}{services} --print-join-command` prints the lines that write it"
                )),
            );
        }
        Some(file) => {
            check_file("ca.join_token_file", file, FileKind::JoinToken, out);
        }
    }
}

/// Checks `discovery.consul` (address scheme and files): Consul's own settings.
pub fn check_consul(path: &str, c: &ConsulConfig, opts: CheckOptions, out: &mut Vec<Finding>) {
    let a = c.address.trim();
    if !(a.starts_with("http://") || a.starts_with("https://")) {
        out.push(
            Finding::error(
                format!("{path}.address"),
                format!("{a:?} must start with http:// or https://"),
            )
            .hint("Consul's HTTP API, e.g. http://127.0.0.1:8500"),
        );
    }
    if c.token.is_some() && c.token_file.is_some() {
        out.push(Finding::error(
            format!("{path}.token"),
            "set token or token_file, not both",
        ));
    }
    if !opts.files {
        return;
    }
    if let Some(f) = &c.token_file {
        check_file(&format!("{path}.token_file"), f, FileKind::Secret, out);
    }
    if let Some(tls) = &c.tls {
        for (key, file, kind) in [
            ("ca_file", &tls.ca_file, FileKind::Public),
            ("cert_file", &tls.cert_file, FileKind::Public),
            ("key_file", &tls.key_file, FileKind::Secret),
        ] {
            if let Some(f) = file {
                check_file(&format!("{path}.tls.{key}"), f, kind, out);
            }
        }
    }
}

/// Checks that every service in `services` (with the config path that names it) has a
/// discovery source: an entry in `discovery.static`, in `discovery.dns.services`, or Consul.
pub fn check_resolvable(
    discovery: &DiscoveryConfig,
    services: &[(String, String)],
    out: &mut Vec<Finding>,
) {
    if discovery.consul.is_some() {
        return;
    }
    let dns = discovery.dns.as_ref();
    for (path, service) in services {
        let known = discovery.static_endpoints.contains_key(service)
            || dns.is_some_and(|d| d.services.contains_key(service));
        if !known {
            out.push(
                Finding::error(
                    path,
                    format!("service {service:?} has no discovery entry, so it has no endpoints"),
                )
                .hint(format!(
                    "add it under discovery.static ({service}: [\"NODE-IP:15008\"]) or discovery.dns.services, or configure discovery.consul"
                )),
            );
        }
    }
}

/// Checks that no two listeners of one file use the same port on overlapping addresses
/// (port 0 means "any free port" and never collides).
pub fn check_ports(listeners: &[(String, SocketAddr)], out: &mut Vec<Finding>) {
    for (i, (path, addr)) in listeners.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        let clash = listeners[..i].iter().find(|(_, other)| {
            other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if let Some((first, other)) = clash {
            out.push(
                Finding::error(
                    path,
                    format!("{addr} collides with {first} ({other}): both cannot listen at once"),
                )
                .hint("give each listener its own port"),
            );
        }
    }
}

impl AgentConfig {
    /// Makes every relative path (data_dir, join token file, Consul files) relative to `base`,
    /// the directory of the file the config was read from.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(&mut self.data_dir, base);
        if let Some(p) = &mut self.ca.join_token_file {
            resolve(p, base);
        }
        if let Some(c) = &mut self.discovery.consul {
            c.resolve_paths(base);
        }
    }

    /// Every check that needs no network, errors first: [`AgentConfig::validate`] (its first
    /// error), then the CA reference, files, ports and upstream discovery.
    pub fn check(&self, opts: CheckOptions) -> Vec<Finding> {
        let mut out = Vec::new();
        if let Err(e) = self.validate() {
            out.push(Finding::error(e.path.clone(), e.reason.clone()));
        }
        let services: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        check_ca_ref(
            &self.ca,
            &self.node,
            &services,
            &self.data_dir,
            opts,
            &mut out,
        );
        if opts.files {
            check_data_dir(&self.data_dir, &mut out);
        }
        if let Some(c) = &self.discovery.consul {
            check_consul("discovery.consul", c, opts, &mut out);
        }
        let mut listeners = vec![
            ("listen.inbound".to_owned(), self.listen.inbound),
            ("listen.admin".to_owned(), self.listen.admin),
        ];
        let mut upstreams = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.port != 0 {
                listeners.push((
                    format!("services[{i}].port"),
                    SocketAddr::from(([127, 0, 0, 1], s.port)),
                ));
            }
            for (j, u) in s.upstreams.iter().enumerate() {
                listeners.push((format!("services[{i}].upstreams[{j}].listen"), u.listen));
                upstreams.push((
                    format!("services[{i}].upstreams[{j}].service"),
                    u.service.clone(),
                ));
            }
        }
        check_ports(&listeners, &mut out);
        check_resolvable(&self.discovery, &upstreams, &mut out);
        dedup(&mut out);
        out
    }
}

/// Checks a node data dir that exists: a directory, private to its owner.
pub fn check_data_dir(dir: &Path, out: &mut Vec<Finding>) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return; // created at start with mode 0700
    };
    if !meta.is_dir() {
        out.push(Finding::error(
            "data_dir",
            format!("{} exists and is not a directory", dir.display()),
        ));
        return;
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        out.push(
            Finding::warning(
                "data_dir",
                format!(
                    "{} holds private keys but its mode is {mode:04o}",
                    dir.display()
                ),
            )
            .hint(format!("chmod 700 {}", dir.display())),
        );
    }
}

/// Keeps one finding per config path and severity (the first: two checks that trip over the
/// same value say it once); errors sort before warnings, otherwise the order is kept (the CLI
/// sorts by position).
pub fn dedup(out: &mut Vec<Finding>) {
    let mut seen = std::collections::HashSet::new();
    out.retain(|f| seen.insert((f.path.clone(), f.severity)));
    out.sort_by_key(|f| f.severity);
}

/// Splits an error text that starts with a config path (`routes[1] (users).cors: bad origin`,
/// `listen.admin: not loopback`, `auth.api_keys.consumers_file /x: not found`) into the path
/// and the rest. Texts that do not start with one are returned whole with an empty path.
pub fn split_config_path(text: &str) -> (String, String) {
    let b = text.as_bytes();
    let mut i = 0;
    let mut dotted = false;
    loop {
        // a key
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
            i += 1;
        }
        if i == start {
            return (String::new(), text.to_owned());
        }
        // indexes
        while i < b.len() && b[i] == b'[' {
            let close = match text[i..].find(']') {
                Some(c) => i + c,
                None => return (String::new(), text.to_owned()),
            };
            if !text[i + 1..close].bytes().all(|c| c.is_ascii_digit()) || close == i + 1 {
                return (String::new(), text.to_owned());
            }
            dotted = true;
            i = close + 1;
        }
        // a name in parentheses
        if text[i..].starts_with(" (")
            && let Some(c) = text[i..].find(')')
        {
            dotted = true;
            i += c + 1;
        }
        if i < b.len() && b[i] == b'.' && b.get(i + 1).is_some_and(|c| c.is_ascii_alphanumeric()) {
            dotted = true;
            i += 1;
            continue;
        }
        break;
    }
    let (path, rest) = text.split_at(i);
    if let Some(msg) = rest.strip_prefix(": ") {
        (path.to_owned(), msg.to_owned())
    } else if dotted && rest.starts_with(' ') {
        (path.to_owned(), rest.trim_start().to_owned())
    } else {
        (String::new(), text.to_owned())
    }
}

/// `path` made relative to `base` (the directory of the config file it was read from) when
/// it is relative and not empty; `./` steps are dropped. Used for every file a config names.
pub fn resolve_path(path: &mut PathBuf, base: &Path) {
    if !path.as_os_str().is_empty() && path.is_relative() {
        let rest: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        *path = base.join(rest);
    }
}

fn resolve(path: &mut PathBuf, base: &Path) {
    resolve_path(path, base);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> AgentConfig {
        serde_json::from_value(serde_json::json!({
            "node": "node-a",
            "trust_domain": "mesh.example",
            "data_dir": dir.join("node-a"),
            "ca": {"address": "https://127.0.0.1:15012", "fingerprint": format!("sha256:{}", "ab".repeat(32))},
            "listen": {"inbound": "127.0.0.1:15008", "admin": "127.0.0.1:15000"},
            "services": [{"name": "web", "port": 8080,
                          "upstreams": [{"service": "users", "listen": "127.0.0.1:9191"}]}],
            "discovery": {"static": {"users": ["127.0.0.1:15108"]}}
        }))
        .expect("valid shape")
    }

    fn paths(f: &[Finding]) -> Vec<(&str, Severity)> {
        f.iter().map(|f| (f.path.as_str(), f.severity)).collect()
    }

    #[test]
    fn each_problem_is_reported_once_at_its_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut c = base(tmp.path());
        let token = tmp.path().join("t");
        std::fs::write(&token, "mgjt_x").expect("write");
        c.ca.join_token_file = Some(token.clone());
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(c.check(CheckOptions::default()), vec![]);

        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        c.ca.fingerprint = format!("sha256:{}", "0".repeat(64));
        c.ca.address = "http://127.0.0.1:15012".into();
        c.services[0].upstreams[0].service = "billing".into();
        c.services[0].upstreams[0].listen = "0.0.0.0:15000".parse().expect("addr");
        let f = c.check(CheckOptions::default());
        assert_eq!(
            paths(&f),
            vec![
                ("ca.address", Severity::Error),
                ("services[0].upstreams[0].listen", Severity::Error),
                ("services[0].upstreams[0].service", Severity::Error),
                ("ca.fingerprint", Severity::Warning),
                ("ca.join_token_file", Severity::Warning),
            ],
            "{f:#?}"
        );
        assert!(
            f[4].hint
                .as_deref()
                .is_some_and(|h| h.starts_with("chmod 600"))
        );
        assert!(f[1].message.contains("listen.admin"), "{}", f[1].message);
        assert!(
            f[3].hint
                .as_deref()
                .is_some_and(|h| h.contains("meshgate ca fingerprint"))
        );
        // the same config without file checks: the mode problem is not looked at
        let f = c.check(CheckOptions { files: false });
        assert!(!paths(&f).contains(&("ca.join_token_file", Severity::Warning)));
    }

    #[test]
    fn error_texts_split_into_path_and_message() {
        for (text, path, msg) in [
            ("listen.admin: not loopback", "listen.admin", "not loopback"),
            (
                "routes[1] (users).cors: bad",
                "routes[1] (users).cors",
                "bad",
            ),
            (
                "routes[0] (w): backend split",
                "routes[0] (w)",
                "backend split",
            ),
            ("auth.jwt (demo): no keys", "auth.jwt (demo)", "no keys"),
            (
                "auth.api_keys.consumers_file /x: gone",
                "auth.api_keys.consumers_file",
                "/x: gone",
            ),
            ("trust_domain: bad", "trust_domain", "bad"),
            (
                "service \"x\" is listed twice",
                "",
                "service \"x\" is listed twice",
            ),
            ("redirect_https needs both", "", "redirect_https needs both"),
        ] {
            assert_eq!(
                split_config_path(text),
                (path.to_owned(), msg.to_owned()),
                "{text}"
            );
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c: AgentConfig = serde_json::from_value(serde_json::json!({
            "node": "n", "trust_domain": "mesh.example", "data_dir": "./data",
            "ca": {"address": "https://ca:15012", "fingerprint": "sha256:00", "join_token_file": "n.token"},
            "discovery": {"consul": {"address": "http://127.0.0.1:8500", "token_file": "/etc/consul.token"}},
        }))
        .expect("shape");
        c.resolve_paths(Path::new("/etc/meshgate"));
        assert_eq!(c.data_dir, Path::new("/etc/meshgate/data"));
        assert_eq!(
            c.ca.join_token_file.as_deref(),
            Some(Path::new("/etc/meshgate/n.token"))
        );
        let consul = c.discovery.consul.expect("consul");
        assert_eq!(
            consul.token_file.as_deref(),
            Some(Path::new("/etc/consul.token"))
        );
    }
}
