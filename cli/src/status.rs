//! `meshgate status`: what a running agent or gateway is, whether it is ready and why not (with
//! what to do), and the certificates it holds.

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
    }
    if ready {
        Ok(())
    } else {
        Err(crate::Reported.into())
    }
}
