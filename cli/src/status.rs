//! `meshgate status`: what a running agent or gateway is, whether it is ready and why not (with
//! what to do), the certificates it holds, and how long the CA's signing intermediate has left
//! (a warning under 30 days).

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use crate::{
    admin_client::{Admin, ProcessKind},
    inspect::AdminArgs,
    outln,
    output::{Output, human_left, print_json, print_table},
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
            "ready": ready,
            "reasons": reasons,
            "certs": certs,
        }))?;
    } else {
        outln!(
            "{kind} at {} (meshgate {version}): {}",
            admin.addr(),
            if ready { "ready" } else { "NOT READY" }
        );
        for r in &reasons {
            outln!("  - {r}");
        }
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
            print_table(&["CERTIFICATE", "NOT AFTER", "TIME LEFT"], &rows)?;
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
}
