//! `meshgate services` and `meshgate endpoints SERVICE`: what a running agent (or gateway)
//! knows, read from its admin API (`/endpoints`).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use crate::{
    admin_client::{Admin, AdminAddr},
    outln,
    output::{Output, print_json, print_table},
};

/// Where the admin API is.
#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    /// The agent's or gateway's admin address: HOST:PORT or http://HOST:PORT.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = crate::admin_client::DEFAULT_ADMIN)]
    pub(crate) admin: AdminAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

/// Arguments of `meshgate endpoints`.
#[derive(Debug, Args)]
pub(crate) struct EndpointsArgs {
    /// The upstream service.
    service: String,
    #[command(flatten)]
    admin: AdminArgs,
}

/// GET `path` on the admin API and parse JSON.
pub(crate) async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, body) = crate::lifecycle::fetch(admin, path, Duration::from_secs(10)).await?;
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("{path} did not return JSON"))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn freshness(svc: &Value) -> &'static str {
    if svc["stale"] == true {
        "stale"
    } else {
        "fresh"
    }
}

/// `meshgate services`.
pub(crate) async fn services(args: AdminArgs) -> anyhow::Result<()> {
    let v = Admin::new(args.admin).get("/endpoints").await?;
    let list = v.as_array().cloned().unwrap_or_default();
    if args.output == Output::Json {
        let rows: Vec<Value> = list
            .iter()
            .map(|svc| {
                let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
                serde_json::json!({
                    "service": svc["service"],
                    "source": svc["source"],
                    "state": freshness(svc),
                    "endpoints": eps.len(),
                    "healthy": eps.iter().filter(|e| e["ejected"] != true).count(),
                    "last_update": svc["last_update"],
                    "last_error": svc["last_error"],
                })
            })
            .collect();
        print_json(&rows)?;
        return Ok(());
    }
    if list.is_empty() {
        outln!("it calls no services (no upstreams or route backends configured)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|svc| {
            let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
            let healthy = eps.iter().filter(|e| e["ejected"] != true).count();
            vec![
                s(&svc["service"]),
                s(&svc["source"]),
                freshness(svc).to_owned(),
                format!("{healthy}/{}", eps.len()),
                s(&svc["last_update"]),
            ]
        })
        .collect();
    print_table(
        &[
            "SERVICE",
            "SOURCE",
            "STATE",
            "HEALTHY/ENDPOINTS",
            "LAST UPDATE",
        ],
        &rows,
    )?;
    Ok(())
}

/// `meshgate endpoints SERVICE`.
pub(crate) async fn endpoints(args: EndpointsArgs) -> anyhow::Result<()> {
    let v = Admin::new(args.admin.admin).get("/endpoints").await?;
    let Some(svc) = v
        .as_array()
        .and_then(|l| l.iter().find(|s| s["service"] == args.service.as_str()))
        .cloned()
    else {
        bail!(
            "it does not call {:?}; `meshgate services` lists what it calls",
            args.service
        );
    };
    let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
    if args.admin.output == Output::Json {
        let rows: Vec<Value> = eps
            .iter()
            .map(|e| {
                serde_json::json!({
                    "address": e["addr"],
                    "health": if e["ejected"] == true { "ejected" } else { "healthy" },
                    "source": svc["source"],
                    "state": freshness(&svc),
                    "last_update": svc["last_update"],
                    "rtt_ewma_ms": e["rtt_ewma_ms"],
                    "pending": e["pending"],
                    "consecutive_failures": e["consecutive_failures"],
                })
            })
            .collect();
        print_json(&rows)?;
        return Ok(());
    }
    outln!(
        "{}: source {}, {}, last update {}{}",
        args.service,
        s(&svc["source"]),
        freshness(&svc),
        s(&svc["last_update"]),
        svc["last_error"]
            .as_str()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    );
    if eps.is_empty() {
        outln!("no endpoints");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = eps
        .iter()
        .map(|e| {
            vec![
                s(&e["addr"]),
                if e["ejected"] == true {
                    format!("ejected ({} ms left)", s(&e["ejected_for_ms"]))
                } else {
                    "healthy".into()
                },
                format!("{:.1}", e["rtt_ewma_ms"].as_f64().unwrap_or(0.0)),
                s(&e["pending"]),
                s(&e["consecutive_failures"]),
            ]
        })
        .collect();
    print_table(
        &["ADDRESS", "HEALTH", "RTT MS", "IN FLIGHT", "FAILURES"],
        &rows,
    )?;
    Ok(())
}
