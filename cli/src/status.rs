//! `meshgate status`: what a running agent or gateway is (kind, node, version, uptime), whether
//! it is ready and why not (with what to do), its listeners, the identities it holds and their
//! time to expiry, the tunnel peers connected now and their transport, discovery health (stale
//! services named), the config generation and the last reload, and how long the CA's signing
//! intermediate has left (a warning under 30 days).

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};

use crate::{
    admin_client::{Admin, ProcessKind},
    inspect::AdminArgs,
    outln,
    output::{Output, human_duration, human_left, print_json, print_table},
};

/// Arguments of `meshgate status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    admin: AdminArgs,
}

/// `meshgate status`; fails (exit 1) when the process is not ready.
pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let admin = Admin::new(args.admin.admin);
    let (version, kind) = admin.version().await?;
    let (ready, body) = admin.readyz().await?;
    let certs = admin
        .get("/certs")
        .await
        .unwrap_or(Value::Array(Vec::new()));
    // older processes have no /status (404): everything else still prints; any other failure
    // is an error, not a quieter status
    let status = admin
        .get_optional("/status")
        .await
        .context("the status of the process could not be read")?
        .unwrap_or(Value::Null);
    let kind = match kind {
        ProcessKind::Agent => "agent",
        ProcessKind::Gateway => "gateway",
    };
    let reasons: Vec<String> = if ready {
        Vec::new()
    } else {
        body.lines()
            .map(|l| l.strip_prefix("not ready: ").unwrap_or(l).to_owned())
            .collect()
    };
    if args.admin.output == Output::Json {
        print_json(&json!({
            "address": admin.addr().to_string(),
            "kind": kind,
            "version": version,
            "node": status["node"],
            "trust_domain": status["trust_domain"],
            "uptime_seconds": status["uptime_seconds"],
            "ready": ready,
            "reasons": reasons,
            "listeners": status["listeners"],
            "certs": certs,
            "peers": status["peers"],
            "discovery": status["discovery"],
            "config": status["config"],
        }))?;
    } else {
        let node = status["node"]
            .as_str()
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        let up = status["uptime_seconds"]
            .as_u64()
            .map(|s| format!(", up {}", human_duration(Duration::from_secs(s))))
            .unwrap_or_default();
        outln!(
            "{kind}{node} at {} (meshgate {version}{up}): {}",
            admin.addr(),
            if ready { "ready" } else { "NOT READY" }
        );
        for r in &reasons {
            outln!("  - {r}");
        }
        if let Some(line) = config_line(&status["config"]) {
            outln!("{line}");
        }
        table(
            &status["listeners"],
            &["LISTENER", "ADDRESS"],
            &[&["name"], &["address"]],
        )?;
        let rows: Vec<Vec<String>> = certs
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                vec![
                    c["spiffe_id"].as_str().unwrap_or("-").to_owned(),
                    c["not_after"].as_str().unwrap_or("-").to_owned(),
                    human_left(Duration::from_secs(
                        c["time_left_seconds"].as_u64().unwrap_or(0),
                    )),
                ]
            })
            .collect();
        if !rows.is_empty() {
            outln!();
            print_table(&["IDENTITY", "NOT AFTER", "TIME LEFT"], &rows)?;
        }
        if status["peers"].as_array().is_some_and(Vec::is_empty) {
            outln!();
            outln!("tunnel peers: none connected now (connections open on the first request)");
        } else {
            table(
                &status["peers"],
                &["PEER", "DIRECTION", "IDENTITY", "TRANSPORT", "SINCE"],
                &[
                    &["address"],
                    &["direction"],
                    &["identity"],
                    &["transport"],
                    &["since"],
                ],
            )?;
        }
        let discovery: Vec<Vec<String>> = status["discovery"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|d| {
                let state = if d["stale"] == true {
                    format!(
                        "STALE: {}",
                        d["last_error"].as_str().unwrap_or("its source fails")
                    )
                } else {
                    "fresh".to_owned()
                };
                vec![
                    d["service"].as_str().unwrap_or("-").to_owned(),
                    d["source"].as_str().unwrap_or("-").to_owned(),
                    format!(
                        "{}/{}",
                        d["healthy"].as_u64().unwrap_or(0),
                        d["endpoints"].as_u64().unwrap_or(0)
                    ),
                    state,
                    d["last_update"].as_str().unwrap_or("-").to_owned(),
                ]
            })
            .collect();
        if !discovery.is_empty() {
            outln!();
            print_table(
                &[
                    "SERVICE",
                    "SOURCE",
                    "HEALTHY/ENDPOINTS",
                    "STATE",
                    "LAST UPDATE",
                ],
                &discovery,
            )?;
        }
        if let Some(line) = intermediate_line(&certs) {
            outln!();
            outln!("{line}");
        }
    }
    if ready {
        Ok(())
    } else {
        Err(crate::Reported.into())
    }
}

/// A table of `list`'s objects, one column per key path; nothing when the list is absent.
fn table(list: &Value, headers: &[&str], keys: &[&[&str]]) -> anyhow::Result<()> {
    let Some(items) = list.as_array() else {
        return Ok(());
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            keys.iter()
                .map(|path| {
                    let v = path.iter().fold(item, |v, k| &v[*k]);
                    match v {
                        Value::String(s) if s.is_empty() => "-".to_owned(),
                        Value::String(s) => s.clone(),
                        Value::Null => "-".to_owned(),
                        other => other.to_string(),
                    }
                })
                .collect()
        })
        .collect();
    if !rows.is_empty() {
        outln!();
        print_table(headers, &rows)?;
    }
    Ok(())
}

/// The config generation and the last reload, in one line.
fn config_line(c: &Value) -> Option<String> {
    let generation = c["generation"].as_u64()?;
    let applied = c["applied_at"].as_str().unwrap_or("-");
    let last = match &c["last_reload"] {
        Value::Null if c["reloads"] == true => "no reload yet (SIGHUP reloads)".to_owned(),
        Value::Null => "reloads: restart to change the config".to_owned(),
        r if r["result"] == "ok" => {
            format!("last reload ok at {}", r["at"].as_str().unwrap_or("-"))
        }
        r => format!(
            "last reload REFUSED at {}: {} (the previous config keeps serving)",
            r["at"].as_str().unwrap_or("-"),
            r["error"].as_str().unwrap_or("-")
        ),
    };
    Some(format!(
        "config generation {generation}, applied {applied}; {last}"
    ))
}

/// Under this, `status` warns about the intermediate (the CA warns too).
const INTERMEDIATE_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// The line about the CA's signing intermediate, from the first certificate that names it (the
/// node certificate comes first).
fn intermediate_line(certs: &Value) -> Option<String> {
    let c = certs
        .as_array()?
        .iter()
        .find(|c| c["intermediate_time_left_seconds"].is_u64())?;
    let left = Duration::from_secs(c["intermediate_time_left_seconds"].as_u64()?);
    let not_after = c["intermediate_not_after"].as_str().unwrap_or("-");
    let mut line = format!(
        "signing intermediate: expires {not_after} (in {})",
        human_left(left)
    );
    if left < INTERMEDIATE_WARNING {
        line.push_str(
            "\nWARNING: the CA's signing intermediate expires within 30 days: run `meshgate ca intermediate rotate --data-dir CA_DIR` on the CA host (nodes renew onto the new one by themselves)",
        );
    }
    if let Some(seq) = c["bundle_sequence"].as_u64() {
        line.push_str(&format!("\ntrust bundle: sequence {seq}"));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intermediate_line_warns_under_30_days() {
        let certs = |left: u64| {
            json!([{"spiffe_id": "spiffe://td/node/a", "intermediate_not_after": "2027-01-01T00:00:00Z",
                    "intermediate_time_left_seconds": left, "bundle_sequence": 4}])
        };
        let far = intermediate_line(&certs(200 * 86_400)).expect("line");
        assert!(
            far.contains("expires 2027-01-01T00:00:00Z") && !far.contains("WARNING"),
            "{far}"
        );
        assert!(far.contains("sequence 4"), "{far}");
        let near = intermediate_line(&certs(10 * 86_400)).expect("line");
        assert!(
            near.contains("WARNING") && near.contains("meshgate ca intermediate rotate"),
            "{near}"
        );
        assert_eq!(intermediate_line(&json!([])), None);
    }

    #[test]
    fn the_config_line_names_the_generation_and_a_refused_reload() {
        let line = config_line(&json!({"generation": 3, "applied_at": "2026-12-01T10:00:00Z", "reloads": true,
            "last_reload": {"at": "2026-12-01T11:00:00Z", "result": "invalid", "error": "routes[0]: bad"}}))
        .expect("line");
        assert!(
            line.starts_with("config generation 3, applied 2026-12-01T10:00:00Z"),
            "{line}"
        );
        assert!(
            line.contains("REFUSED at 2026-12-01T11:00:00Z: routes[0]: bad"),
            "{line}"
        );
        let agent = config_line(
            &json!({"generation": 1, "applied_at": "x", "reloads": false, "last_reload": null}),
        )
        .expect("line");
        assert!(agent.contains("restart to change"), "{agent}");
        assert_eq!(config_line(&Value::Null), None);
    }
}
