//! `meshgate version`: this client's version, and the version and kind (agent or gateway) of
//! the process whose admin API `--admin` names.

use clap::Args;
use serde_json::json;

use crate::{
    admin_client::{Admin, AdminAddr, DEFAULT_ADMIN, ProcessKind},
    outln,
    output::{Output, print_json},
};

/// Arguments of `meshgate version`.
#[derive(Debug, Args)]
pub(crate) struct VersionArgs {
    /// Also ask this admin API (HOST:PORT or http://HOST:PORT) for its version. Without it,
    /// the default address is tried and its absence is not an error.
    #[arg(long, env = "MESHGATE_ADMIN")]
    admin: Option<AdminAddr>,
    /// Output format; json prints {"client": {"version"}, "server": {"address","version","kind"} or null}.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

const CLIENT: &str = env!("CARGO_PKG_VERSION");

pub(crate) async fn run(args: VersionArgs) -> anyhow::Result<()> {
    let explicit = args.admin.is_some();
    let addr = match args.admin {
        Some(a) => a,
        None => DEFAULT_ADMIN.parse().map_err(anyhow::Error::msg)?,
    };
    let admin = Admin::new(addr);
    let server = admin.version().await;
    let server = match server {
        Ok(v) => Some(v),
        Err(e) if explicit => {
            if args.output == Output::Table {
                outln!("client: meshgate {CLIENT}");
            }
            return Err(e);
        }
        Err(_) => None,
    };
    let kind_name = |k: ProcessKind| match k {
        ProcessKind::Agent => "agent",
        ProcessKind::Gateway => "gateway",
    };
    if args.output == Output::Json {
        let server = server.as_ref().map(|(v, k)| {
            json!({"address": admin.addr().to_string(), "version": v, "kind": kind_name(*k)})
        });
        return print_json(&json!({"client": {"version": CLIENT}, "server": server}));
    }
    outln!("client: meshgate {CLIENT}");
    match server {
        Some((v, k)) => outln!(
            "server: meshgate {v} ({}) at {}",
            kind_name(k),
            admin.addr()
        ),
        None => outln!(
            "server: no meshgate admin API at {} (pass --admin HOST:PORT to ask another)",
            admin.addr()
        ),
    }
    Ok(())
}
