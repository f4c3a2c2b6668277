//! `meshgate certs`: the SVIDs a node holds in its data dir.

use std::{path::PathBuf, time::SystemTime};

use clap::Args;
use meshgate_agent::identity::list_certs;
use serde::Serialize;

use crate::{
    outln,
    output::{Output, human_left, print_json, print_table},
};

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Arguments of `meshgate certs`.
#[derive(Debug, Args)]
pub(crate) struct CertsArgs {
    /// The node's data dir (the agent's `data_dir`).
    #[arg(long)]
    data_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Serialize)]
struct Row {
    spiffe_id: String,
    serial: String,
    not_before: String,
    not_after: String,
    time_left_seconds: u64,
    path: String,
}

pub(crate) fn run(args: CertsArgs) -> anyhow::Result<()> {
    if args.data_dir.join("root.key").exists() || args.data_dir.join("intermediate.key").exists() {
        anyhow::bail!(
            "{} is a CA's data dir, not a node's: `meshgate certs` lists what an agent or gateway holds (its `data_dir`); `meshgate ca token list` and `meshgate ca node list` show the CA's side",
            args.data_dir.display()
        );
    }
    let now = SystemTime::now();
    let rows: Vec<Row> = list_certs(&args.data_dir)?
        .into_iter()
        .map(|c| Row {
            spiffe_id: c.info.spiffe_uri().unwrap_or("(no SPIFFE ID)").to_owned(),
            serial: c.info.serial.clone(),
            not_before: rfc3339(c.info.not_before),
            not_after: rfc3339(c.info.not_after),
            time_left_seconds: c.info.remaining(now).as_secs(),
            path: c.path.display().to_string(),
        })
        .collect();
    match args.output {
        Output::Json => print_json(&rows)?,
        Output::Table => {
            if rows.is_empty() {
                outln!(
                    "no certificates in {} (has the node joined?)",
                    args.data_dir.display()
                );
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.spiffe_id.clone(),
                        r.serial.clone(),
                        r.not_before.clone(),
                        r.not_after.clone(),
                        human_left(std::time::Duration::from_secs(r.time_left_seconds)),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SPIFFE ID",
                    "SERIAL",
                    "NOT BEFORE",
                    "NOT AFTER",
                    "TIME LEFT",
                ],
                &table,
            )?;
        }
    }
    Ok(())
}
