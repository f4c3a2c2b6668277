//! `meshgate check`: verifies a running deployment, like `linkerd check`. For each agent or
//! gateway admin API given (default 127.0.0.1:15000) it checks readiness, the certificates it
//! holds (valid, not near expiry), discovery (no stale source, endpoints present), for a
//! gateway that every route's backend resolves, and the file modes of its keys; then, for each
//! CA those processes use (or `--ca`), that the CA answers with the pinned root and how far its
//! clock is from ours. Every problem is named with what to do; the exit status is 1 if any.
//!
//! It only reads: the admin APIs (GET), the files' metadata, and one TLS handshake plus one
//! harmless gRPC request (the standard health-check method, which the CA does not implement,
//! so it counts nothing and logs nothing) per CA. The decisions are plain functions below.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_ca::{
    spiffe::SpiffeId,
    verify::{ExpectedPeer, SpiffeServerVerifier, tls13_client_config},
};
use serde::Serialize;
use serde_json::Value;

use crate::output::{Output, human_left, print_table};

/// How long one admin request or the CA probe may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `meshgate check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Admin API of an agent or gateway (`listen.admin`); repeat or comma-separate for several.
    /// Default 127.0.0.1:15000 unless only --ca or --ca-data-dir is given.
    #[arg(long = "admin", env = "MESHGATE_ADMIN", value_delimiter = ',')]
    admins: Vec<SocketAddr>,
    /// Check this CA directly (`https://HOST:PORT`), e.g. on a CA host; needs --ca-fingerprint
    /// and --trust-domain. CAs named in the checked processes' configs are checked anyway.
    #[arg(long, requires_all = ["ca_fingerprint", "trust_domain"])]
    ca: Option<String>,
    /// The root fingerprint to pin (`sha256:…`, as `meshgate ca token create` prints it).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// The trust domain of --ca.
    #[arg(long)]
    trust_domain: Option<String>,
    /// The CA's data dir on this host: checks that its keys are private.
    #[arg(long)]
    ca_data_dir: Option<PathBuf>,
    /// The largest clock difference to the CA that passes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_clock_skew: Duration,
    /// Output format; json prints {"ok", "problems", "checks": [...]}.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Problem,
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Finding {
    check: &'static str,
    target: String,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Debug, Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, check: &'static str, target: &str, detail: impl Into<String>) {
        self.push(check, target, Status::Ok, detail.into(), None);
    }
    fn skipped(&mut self, check: &'static str, target: &str, detail: impl Into<String>) {
        self.push(check, target, Status::Skipped, detail.into(), None);
    }
    fn problem(
        &mut self,
        check: &'static str,
        target: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(
            check,
            target,
            Status::Problem,
            detail.into(),
            Some(fix.into()),
        );
    }
    fn push(
        &mut self,
        check: &'static str,
        target: &str,
        status: Status,
        detail: String,
        fix: Option<String>,
    ) {
        self.findings.push(Finding {
            check,
            target: target.to_owned(),
            status,
            detail,
            fix,
        });
    }
    fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Problem)
            .count()
    }
}

/// A CA to probe: address, pinned fingerprint, trust domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CaTarget {
    address: String,
    fingerprint: String,
    trust_domain: String,
}

/// `meshgate check`.
pub(crate) async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    let mut cas = BTreeSet::new();
    let admins = if args.admins.is_empty() && args.ca.is_none() && args.ca_data_dir.is_none() {
        vec![SocketAddr::from(([127, 0, 0, 1], 15000))]
    } else {
        args.admins.clone()
    };
    let now = SystemTime::now();
    for admin in &admins {
        if let Some(ca) = check_process(&mut report, *admin, now).await {
            cas.insert(ca);
        }
    }
    if let (Some(address), Some(fingerprint), Some(trust_domain)) =
        (&args.ca, &args.ca_fingerprint, &args.trust_domain)
    {
        cas.insert(CaTarget {
            address: address.clone(),
            fingerprint: fingerprint.to_ascii_lowercase(),
            trust_domain: trust_domain.clone(),
        });
    }
    for ca in &cas {
        check_ca(&mut report, ca, args.max_clock_skew).await;
    }
    if let Some(dir) = &args.ca_data_dir {
        let target = dir.display().to_string();
        let mut files = vec![(dir.clone(), Secret::PrivateDir)];
        for key in ["root.key", "intermediate.key"] {
            files.push((dir.join(key), Secret::PrivateKey));
        }
        let tokens = dir.join("tokens");
        if tokens.exists() {
            files.push((tokens, Secret::PrivateDir));
        }
        check_files(&mut report, "ca key files", &target, &files);
    }
    print(&report, args.output)?;
    match report.problems() {
        0 => Ok(()),
        1 => Err(anyhow!("1 problem found")),
        n => Err(anyhow!("{n} problems found")),
    }
}

fn print(report: &Report, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        let v = serde_json::json!({
            "ok": report.problems() == 0,
            "problems": report.problems(),
            "checks": report.findings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .findings
        .iter()
        .map(|f| {
            vec![
                match f.status {
                    Status::Ok => "ok",
                    Status::Problem => "PROBLEM",
                    Status::Skipped => "skipped",
                }
                .to_owned(),
                f.check.to_owned(),
                f.target.clone(),
                f.detail.clone(),
            ]
        })
        .collect();
    print_table(&["RESULT", "CHECK", "TARGET", "DETAIL"], &rows)?;
    let problems: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.status == Status::Problem)
        .collect();
    println!();
    if problems.is_empty() {
        println!("all checks passed");
        return Ok(());
    }
    println!(
        "{} problem{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for f in problems {
        println!("  {} ({}): {}", f.check, f.target, f.detail);
        if let Some(fix) = &f.fix {
            println!("    fix: {fix}");
        }
    }
    Ok(())
}

/// Checks one agent or gateway; returns the CA it uses.
async fn check_process(
    report: &mut Report,
    admin: SocketAddr,
    now: SystemTime,
) -> Option<CaTarget> {
    let target = admin.to_string();
    let config = match crate::inspect::admin_get(admin, "/config").await {
        Ok(c) => c,
        Err(e) => {
            report.problem(
                "admin api",
                &target,
                format!("{e:#}"),
                "start the process, or pass --admin with its listen.admin address (the admin API answers on loopback only, so run check on the same host)",
            );
            return None;
        }
    };
    let gateway = config.get("routes").is_some();
    let node = config["node"].as_str().unwrap_or("?");
    let kind = if gateway { "gateway" } else { "agent" };
    let target = format!("{kind}/{node}");
    report.ok(
        "admin api",
        &target,
        format!("{kind} {node} answers at {admin}"),
    );

    match crate::lifecycle::fetch(admin, "/readyz", TIMEOUT).await {
        Ok((s, _)) if s.is_success() => report.ok("ready", &target, "/readyz answers 200"),
        Ok((s, body)) => report.problem(
            "ready",
            &target,
            format!(
                "/readyz answers {}: {}",
                s.as_u16(),
                String::from_utf8_lossy(&body).trim()
            ),
            "read the process log: it is still joining, draining, or cannot bind a listener",
        ),
        Err(e) => report.problem(
            "ready",
            &target,
            format!("{e:#}"),
            "the process stopped answering; read its log",
        ),
    }

    match crate::inspect::admin_get(admin, "/certs").await {
        Ok(certs) => check_certs(report, &target, &certs, now),
        Err(e) => report.problem(
            "certificates",
            &target,
            format!("{e:#}"),
            "read the process log",
        ),
    }

    let endpoints = crate::inspect::admin_get(admin, "/endpoints").await;
    match &endpoints {
        Ok(eps) => check_discovery(report, &target, eps),
        Err(e) => report.problem(
            "discovery",
            &target,
            format!("{e:#}"),
            "read the process log",
        ),
    }
    if gateway {
        match (
            crate::inspect::admin_get(admin, "/routes").await,
            &endpoints,
        ) {
            (Ok(routes), Ok(eps)) => check_routes(report, &target, &routes, eps),
            (Err(e), _) => {
                report.problem("routes", &target, format!("{e:#}"), "read the gateway log")
            }
            (_, Err(_)) => report.skipped("routes", &target, "no discovery state to check against"),
        }
    }

    let files = secret_files(&config, gateway);
    check_files(report, "key files", &target, &files);

    let ca = &config["ca"];
    match (
        ca["address"].as_str(),
        ca["fingerprint"].as_str(),
        config["trust_domain"].as_str(),
    ) {
        (Some(address), Some(fp), Some(td)) => Some(CaTarget {
            address: address.to_owned(),
            fingerprint: fp.to_ascii_lowercase(),
            trust_domain: td.to_owned(),
        }),
        _ => None,
    }
}

/// What a certificate's validity says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validity {
    Fine,
    /// Less than a quarter of the lifetime left: renewal (due at 2/3) has been failing.
    NearExpiry,
    Expired,
    NotYetValid,
}

fn validity(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Validity {
    if now < not_before {
        return Validity::NotYetValid;
    }
    let Ok(left) = not_after.duration_since(now) else {
        return Validity::Expired;
    };
    if left.is_zero() {
        return Validity::Expired;
    }
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    if left < lifetime / 4 {
        Validity::NearExpiry
    } else {
        Validity::Fine
    }
}

fn check_certs(report: &mut Report, target: &str, certs: &Value, now: SystemTime) {
    let list = certs.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        report.problem(
            "certificates",
            target,
            "holds no certificates",
            "the node has not joined: give it a join token (`meshgate ca token create --node NAME`) and read its log",
        );
        return;
    }
    let mut soonest: Option<Duration> = None;
    let mut bad = 0;
    for c in &list {
        let id = c["spiffe_id"].as_str().unwrap_or("?");
        let parse = |k: &str| c[k].as_str().and_then(|s| humantime::parse_rfc3339(s).ok());
        let (Some(nb), Some(na)) = (parse("not_before"), parse("not_after")) else {
            report.problem(
                "certificates",
                target,
                format!("{id}: unreadable validity dates"),
                "report this: the admin API should give RFC 3339 times",
            );
            bad += 1;
            continue;
        };
        let left = na.duration_since(now).unwrap_or_default();
        let (detail, fix) = match validity(nb, na, now) {
            Validity::Fine => {
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
                continue;
            }
            Validity::Expired => (
                format!("{id} expired at {}", c["not_after"].as_str().unwrap_or("?")),
                "renewal failed until expiry: check that the CA is up and reachable from this node (see the ca check), then restart the process; if its certificate cannot be renewed, join again with a new token",
            ),
            Validity::NearExpiry => (
                format!(
                    "{id} expires in {} (less than a quarter of its lifetime left)",
                    human_left(left)
                ),
                "renewal is failing (it is due at 2/3 of the lifetime): see the ca check and meshgate_identity_renewal_failures in /metrics",
            ),
            Validity::NotYetValid => (
                format!(
                    "{id} is not valid before {}",
                    c["not_before"].as_str().unwrap_or("?")
                ),
                "this host's clock is behind the CA's: synchronise it (chrony, systemd-timesyncd)",
            ),
        };
        bad += 1;
        report.problem("certificates", target, detail, fix);
    }
    if bad == 0 {
        report.ok(
            "certificates",
            target,
            format!(
                "{} valid, the first expires in {}",
                list.len(),
                soonest.map_or_else(|| "-".to_owned(), human_left)
            ),
        );
    }
}

fn check_discovery(report: &mut Report, target: &str, endpoints: &Value) {
    let list = endpoints.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        report.ok("discovery", target, "calls no services");
        return;
    }
    let mut bad = 0;
    for svc in &list {
        let name = svc["service"].as_str().unwrap_or("?");
        let source = svc["source"].as_str().unwrap_or("?");
        let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
        let healthy = eps.iter().filter(|e| e["ejected"] != true).count();
        if svc["stale"] == true {
            bad += 1;
            report.problem(
                "discovery",
                target,
                format!(
                    "{name}: {source} source is stale since {} ({}); serving the last good {} endpoints",
                    svc["last_update"].as_str().unwrap_or("start"),
                    svc["last_error"].as_str().unwrap_or("no error recorded"),
                    eps.len()
                ),
                fix_for_source(source),
            );
        } else if svc["last_update"].is_null() && source != "static" {
            bad += 1;
            report.problem(
                "discovery",
                target,
                format!("{name}: no answer from {source} yet"),
                fix_for_source(source),
            );
        } else if eps.is_empty() {
            bad += 1;
            report.problem(
                "discovery",
                target,
                format!("{name}: no endpoints ({source})"),
                format!("no healthy instance of {name} is known: start one, or check its registration and health check in {source}"),
            );
        } else if healthy == 0 {
            bad += 1;
            report.problem(
                "discovery",
                target,
                format!("{name}: all {} endpoints ejected after connect failures", eps.len()),
                format!("the nodes running {name} do not answer on their mesh port (15008): check those agents and the network"),
            );
        }
    }
    if bad == 0 {
        report.ok(
            "discovery",
            target,
            format!(
                "{} service{} fresh, each with endpoints",
                list.len(),
                if list.len() == 1 { "" } else { "s" }
            ),
        );
    }
}

fn fix_for_source(source: &str) -> String {
    match source {
        "consul" => "Consul does not answer: check discovery.consul.address, the ACL token (service:read) and that the local Consul agent runs".into(),
        "dns" => "DNS lookups fail: check discovery.dns.nameservers and that the names resolve".into(),
        other => format!("check the {other} discovery settings"),
    }
}

/// The backend service names a route JSON names (`backend.service`, `backend.split[].service`).
fn route_services(route: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("service", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&route["backend"], &mut out);
    out.sort();
    out.dedup();
    out
}

fn check_routes(report: &mut Report, target: &str, routes: &Value, endpoints: &Value) {
    let list = routes.as_array().cloned().unwrap_or_default();
    let eps = endpoints.as_array().cloned().unwrap_or_default();
    let usable = |svc: &str| {
        eps.iter().any(|e| {
            e["service"] == svc
                && e["endpoints"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x["ejected"] != true))
        })
    };
    let mut bad = 0;
    for r in &list {
        let name = r["name"].as_str().unwrap_or("?");
        let missing: Vec<String> = route_services(r)
            .into_iter()
            .filter(|s| !usable(s))
            .collect();
        if !missing.is_empty() {
            bad += 1;
            report.problem(
                "routes",
                target,
                format!("route {name}: no usable endpoint for {}", missing.join(", ")),
                "requests on this route get 503: start the service, or fix its discovery (see the discovery check)",
            );
        }
    }
    if bad == 0 {
        report.ok(
            "routes",
            target,
            format!("{} routes, every backend has endpoints", list.len()),
        );
    }
}

/// How private a file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secret {
    /// A directory holding keys: no access for group or others (0700).
    PrivateDir,
    /// A private key or token meshgate wrote: owner only (0600).
    PrivateKey,
    /// A key an operator provides (public TLS): not readable by others (0640 is fine).
    OperatorKey,
}

/// What is wrong with `mode` for a file of this kind, if anything.
fn mode_problem(mode: u32, kind: Secret) -> Option<String> {
    let mode = mode & 0o777;
    let (mask, want) = match kind {
        Secret::PrivateDir => (0o077, "chmod 700"),
        Secret::PrivateKey => (0o077, "chmod 600"),
        Secret::OperatorKey => (0o007, "chmod 640 (or 600)"),
    };
    (mode & mask != 0).then(|| format!("mode {mode:04o}; {want}"))
}

fn secret_files(config: &Value, gateway: bool) -> Vec<(PathBuf, Secret)> {
    let mut files = Vec::new();
    if let Some(dir) = config["data_dir"].as_str() {
        let dir = PathBuf::from(dir);
        files.push((dir.clone(), Secret::PrivateDir));
        files.push((dir.join("node.key"), Secret::PrivateKey));
        let svids = dir.join("svids");
        if let Ok(namespaces) = std::fs::read_dir(&svids) {
            files.push((svids.clone(), Secret::PrivateDir));
            for ns in namespaces.flatten() {
                files.push((ns.path(), Secret::PrivateDir));
                if let Ok(keys) = std::fs::read_dir(ns.path()) {
                    let mut keys: Vec<PathBuf> = keys
                        .flatten()
                        .map(|f| f.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "key"))
                        .collect();
                    keys.sort();
                    files.extend(keys.into_iter().map(|k| (k, Secret::PrivateKey)));
                }
            }
        }
    }
    if let Some(token) = config["ca"]["join_token_file"].as_str() {
        files.push((PathBuf::from(token), Secret::PrivateKey));
    }
    if gateway {
        for t in config["tls"].as_array().into_iter().flatten() {
            if let Some(k) = t["key_file"].as_str() {
                files.push((PathBuf::from(k), Secret::OperatorKey));
            }
        }
    }
    files
}

fn check_files(
    report: &mut Report,
    check: &'static str,
    target: &str,
    files: &[(PathBuf, Secret)],
) {
    let Some((first, _)) = files.first() else {
        report.skipped(check, target, "no key files configured");
        return;
    };
    if !first.exists() {
        report.skipped(
            check,
            target,
            format!(
                "{} is not on this host (run check where the process runs)",
                first.display()
            ),
        );
        return;
    }
    let mut checked = 0;
    let mut bad = 0;
    for (path, kind) in files {
        match std::fs::metadata(path) {
            Ok(m) => {
                checked += 1;
                if let Some(why) = mode_problem(m.permissions().mode(), *kind) {
                    bad += 1;
                    report.problem(
                        check,
                        target,
                        format!("{}: {why}", path.display()),
                        format!(
                            "{} {}; only the service user may read keys",
                            why.split("; ").nth(1).unwrap_or("chmod 600"),
                            path.display()
                        ),
                    );
                }
            }
            // a join token file is deleted once used, keys may not exist yet: not a problem
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                report.skipped(
                    check,
                    target,
                    format!(
                        "cannot read {}: {e} (run check as root or the service user)",
                        path.display()
                    ),
                );
                return;
            }
        }
    }
    if bad == 0 {
        report.ok(
            check,
            target,
            format!("{checked} files and directories private"),
        );
    }
}

/// Bounds on how far the CA's clock is from ours, from an HTTP `Date` (whole seconds, so the
/// CA's time was in `[date, date+1s)`) seen between our `t0` and `t1`: the smallest absolute
/// difference consistent with those observations (zero when they allow none), and its sign
/// (+1: the CA is ahead).
fn skew_lower_bound(t0: SystemTime, t1: SystemTime, date: SystemTime) -> (Duration, i8) {
    let ms = |t: SystemTime| -> i128 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i128)
            .unwrap_or(0)
    };
    let (t0, t1, d) = (ms(t0), ms(t1), ms(date));
    // skew = ca - local lies in (d - t1, d + 1000 - t0)
    let (lo, hi) = (d - t1, d + 1000 - t0);
    let millis = |v: i128| Duration::from_millis(u64::try_from(v).unwrap_or(u64::MAX));
    if lo > 0 {
        (millis(lo), 1)
    } else if hi < 0 {
        (millis(-hi), -1)
    } else {
        (Duration::ZERO, 0)
    }
}

/// Parses an HTTP date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// `https://HOST:PORT` (scheme optional, port default 15012).
fn host_port(address: &str) -> anyhow::Result<(String, u16)> {
    let rest = address.strip_prefix("https://").unwrap_or(address);
    let uri: http::Uri = format!("https://{}", rest.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("CA address {address:?} is not https://HOST:PORT"))?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("CA address {address:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(15012)))
}

/// The reason a TLS handshake failed, without rustls's Debug wrapping of verifier errors.
fn tls_reason(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(o))) => o.to_string(),
        Some(Error::InvalidCertificate(c)) => format!("the CA's certificate is refused: {c}"),
        Some(other) => other.to_string(),
        None => meshgate_agent::identity::error_chain(e),
    }
}

/// What the CA probe saw.
struct CaAnswer {
    t0: SystemTime,
    t1: SystemTime,
    date: Option<String>,
    grpc_status: Option<String>,
}

/// A pinned TLS 1.3 handshake with the CA, then one gRPC health-check request on it.
async fn probe_ca(ca: &CaTarget) -> anyhow::Result<CaAnswer> {
    let (host, port) = host_port(&ca.address)?;
    let ca_id = SpiffeId::ca(&ca.trust_domain).map_err(|e| anyhow!("trust domain: {e}"))?;
    let mut tls = tls13_client_config()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::pinned(
            &ca.trust_domain,
            &ca.fingerprint,
            ExpectedPeer::AnyOf(vec![ca_id]),
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| anyhow!("CA host {host:?}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| anyhow!("TLS handshake: {}", tls_reason(&e)))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2")?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{host}:{port}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        // one empty, uncompressed gRPC message
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))?;
    let t0 = SystemTime::now();
    let resp = sender.send_request(req).await.context("gRPC request")?;
    let t1 = SystemTime::now();
    let header = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(CaAnswer {
        t0,
        t1,
        date: header("date"),
        grpc_status: header("grpc-status"),
    })
}

async fn check_ca(report: &mut Report, ca: &CaTarget, max_skew: Duration) {
    let target = ca.address.clone();
    let answer = match tokio::time::timeout(TIMEOUT, probe_ca(ca)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            let fix = if msg.contains("pinned root") {
                "the CA does not hold the root this node pins: ca.fingerprint must be the one `meshgate ca token create` printed for this CA; if the CA was re-initialised, every node must join again"
            } else {
                "start `meshgate ca serve` (systemctl status meshgate-ca), and check ca.address and that port 15012 is open from this host"
            };
            report.problem("ca", &target, msg, fix);
            report.skipped("clock skew", &target, "the CA did not answer");
            return;
        }
        Err(_) => {
            report.problem(
                "ca",
                &target,
                format!("no answer within {}", humantime::format_duration(TIMEOUT)),
                "check that the CA runs and that nothing between here and it drops packets",
            );
            report.skipped("clock skew", &target, "the CA did not answer");
            return;
        }
    };
    if answer.grpc_status.is_none() {
        report.problem(
            "ca",
            &target,
            "answered TLS with the pinned root but not as a gRPC server",
            "ca.address must point at `meshgate ca serve` (port 15012), not a proxy that ends HTTP/2",
        );
    } else {
        report.ok(
            "ca",
            &target,
            format!(
                "reachable, presents the pinned root {}",
                short_fp(&ca.fingerprint)
            ),
        );
    }
    match answer.date.as_deref().and_then(parse_http_date) {
        Some(date) => {
            let (skew, sign) = skew_lower_bound(answer.t0, answer.t1, date);
            let rtt = answer.t1.duration_since(answer.t0).unwrap_or_default();
            let who = if sign > 0 { "ahead of" } else { "behind" };
            if skew > max_skew {
                report.problem(
                    "clock skew",
                    &target,
                    format!("the CA's clock is at least {} {who} this host's", humantime::format_duration(round_ms(skew))),
                    "synchronise both clocks (chrony, systemd-timesyncd): certificates are checked against local time, so skew makes fresh ones not yet valid",
                );
            } else {
                report.ok(
                    "clock skew",
                    &target,
                    format!(
                        "within {} (limit {}; measured to 1s, round trip {})",
                        humantime::format_duration(round_ms(skew)),
                        humantime::format_duration(max_skew),
                        humantime::format_duration(round_ms(rtt))
                    ),
                );
            }
        }
        None => report.skipped("clock skew", &target, "the CA sent no Date header"),
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn short_fp(fp: &str) -> String {
    fp.chars().take(7 + 16).collect::<String>() + "…"
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T + Duration::from_secs(secs)
    }

    #[test]
    fn certificate_validity() {
        // a 24h certificate
        for (now, want) in [
            (0, Validity::Fine),
            (16 * 3600, Validity::Fine),           // renewal due
            (18 * 3600 + 1, Validity::NearExpiry), // less than 6h left
            (24 * 3600, Validity::Expired),
            (30 * 3600, Validity::Expired),
        ] {
            assert_eq!(
                validity(at(3600), at(3600 + 24 * 3600), at(3600 + now)),
                want,
                "{now}s in"
            );
        }
        assert_eq!(validity(at(100), at(200), at(50)), Validity::NotYetValid);
    }

    #[test]
    fn key_modes() {
        for (mode, kind, bad) in [
            (0o600, Secret::PrivateKey, false),
            (0o400, Secret::PrivateKey, false),
            (0o640, Secret::PrivateKey, true),
            (0o644, Secret::PrivateKey, true),
            (0o700, Secret::PrivateDir, false),
            (0o755, Secret::PrivateDir, true),
            (0o640, Secret::OperatorKey, false),
            (0o644, Secret::OperatorKey, true),
            (0o100600, Secret::PrivateKey, false), // file type bits are ignored
        ] {
            assert_eq!(mode_problem(mode, kind).is_some(), bad, "{mode:o} {kind:?}");
        }
        assert_eq!(
            mode_problem(0o644, Secret::PrivateKey).as_deref(),
            Some("mode 0644; chmod 600")
        );
    }

    #[test]
    fn skew_bounds_account_for_resolution_and_round_trip() {
        let ms = |m: u64| T + Duration::from_millis(m);
        // date 100s, seen between 100.2 and 100.4: consistent with no skew
        assert_eq!(
            skew_lower_bound(ms(100_200), ms(100_400), ms(100_000)),
            (Duration::ZERO, 0)
        );
        // the CA says 110s while we are at 100.2..100.4: at least 9.6s ahead
        assert_eq!(
            skew_lower_bound(ms(100_200), ms(100_400), ms(110_000)),
            (Duration::from_millis(9_600), 1)
        );
        // the CA says 90s: it is at least 100.2 - 91 = 9.2s behind
        assert_eq!(
            skew_lower_bound(ms(100_200), ms(100_400), ms(90_000)),
            (Duration::from_millis(9_200), -1)
        );
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(at(0))
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(at(1_835_481_599))
        );
        for bad in [
            "",
            "yesterday",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
        // what our own clock formats, parses back
        let now = SystemTime::now();
        let secs = now.duration_since(T).expect("after epoch").as_secs();
        let text = httpdate_of(secs);
        assert_eq!(parse_http_date(&text), Some(at(secs)), "{text}");
    }

    /// Formats `secs` as an IMF-fixdate with `date -u` semantics, independently of the parser.
    fn httpdate_of(secs: u64) -> String {
        let out = std::process::Command::new("date")
            .args([
                "-u",
                "-d",
                &format!("@{secs}"),
                "+%a, %d %b %Y %H:%M:%S GMT",
            ])
            .env("LC_ALL", "C")
            .output()
            .expect("date");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn route_backends_and_their_resolution() {
        let routes = serde_json::json!([
            {"name": "users", "backend": {"split": [{"service": "users", "weight": 90}, {"service": "users-canary", "weight": 10}]}},
            {"name": "orders", "backend": {"service": "orders"}},
        ]);
        assert_eq!(route_services(&routes[0]), ["users", "users-canary"]);
        let eps = serde_json::json!([
            {"service": "users", "endpoints": [{"addr": "10.0.0.1:15008", "ejected": false}]},
            {"service": "users-canary", "endpoints": [{"addr": "10.0.0.2:15008", "ejected": false}]},
            {"service": "orders", "endpoints": [{"addr": "10.0.0.3:15008", "ejected": true}]},
        ]);
        let mut r = Report::default();
        check_routes(&mut r, "gw", &routes, &eps);
        assert_eq!(r.problems(), 1);
        assert!(
            r.findings[0]
                .detail
                .contains("route orders: no usable endpoint for orders"),
            "{:?}",
            r.findings
        );
    }

    #[test]
    fn stale_and_empty_discovery_are_problems() {
        let eps = serde_json::json!([
            {"service": "a", "source": "consul", "stale": true, "last_update": "2026-01-01T00:00:00Z", "last_error": "connection refused", "endpoints": [{"addr": "x", "ejected": false}]},
            {"service": "b", "source": "static", "stale": false, "last_update": "2026-01-01T00:00:00Z", "endpoints": []},
            {"service": "c", "source": "consul", "stale": false, "last_update": null, "endpoints": []},
            {"service": "d", "source": "dns", "stale": false, "last_update": "2026-01-01T00:00:00Z", "endpoints": [{"addr": "y", "ejected": false}]},
        ]);
        let mut r = Report::default();
        check_discovery(&mut r, "agent", &eps);
        let details: Vec<&str> = r.findings.iter().map(|f| f.detail.as_str()).collect();
        assert_eq!(r.problems(), 3, "{details:?}");
        assert!(
            details[0].contains("a: consul source is stale")
                && details[0].contains("connection refused")
        );
        assert!(details[1].contains("b: no endpoints"));
        assert!(details[2].contains("c: no answer from consul yet"));
        assert!(r.findings.iter().all(|f| f.fix.is_some()));
    }
}
