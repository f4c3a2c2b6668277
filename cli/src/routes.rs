//! `meshgate routes`: the gateway's route table, and which route a request would take.

use std::path::PathBuf;

use clap::Args;
use meshgate_gateway::app::{explain, routes_json};
use serde_json::Value;

use crate::{
    admin_client::{Admin, AdminAddr, ProcessKind},
    outln,
    output::{Output, print_json, print_table},
};

/// Arguments of `meshgate routes`.
#[derive(Debug, Args)]
pub(crate) struct RoutesArgs {
    /// Read routes from this gateway.yaml instead of a running gateway.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The running gateway's admin address: HOST:PORT or http://HOST:PORT.
    #[arg(long, env = "MESHGATE_ADMIN", default_value = crate::admin_client::DEFAULT_ADMIN)]
    admin: AdminAddr,
    /// Which route would take this request, e.g. 'GET https://api.example/v2/users/7'.
    #[arg(long = "match", value_name = "METHOD URL")]
    matches: Option<String>,
    /// A request header for --match, e.g. -H 'Accept-Version: 2' (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

fn describe_match(r: &Value) -> String {
    let m = &r["match"];
    let mut parts = Vec::new();
    if let Some(h) = m["hosts"].as_array().filter(|h| !h.is_empty()) {
        parts.push(
            h.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if let Some(p) = m["path"].as_object().and_then(|o| o.iter().next()) {
        parts.push(format!("{} {}", p.0, p.1.as_str().unwrap_or_default()));
    }
    if let Some(ms) = m["methods"].as_array().filter(|x| !x.is_empty()) {
        parts.push(
            ms.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("|"),
        );
    }
    for key in ["headers", "query"] {
        if let Some(o) = m[key].as_object() {
            for (k, v) in o {
                parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
            }
        }
    }
    if parts.is_empty() {
        "*".into()
    } else {
        parts.join(" ")
    }
}

fn describe_backend(r: &Value) -> String {
    let b = &r["backend"];
    let mut out = describe_target(b);
    if r.get("transcode").is_some_and(|t| !t.is_null()) {
        out = format!("transcode -> {out}");
    }
    if r["grpc_web"].as_bool() == Some(true) {
        out = format!("grpc-web -> {out}");
    }
    out
}

fn describe_target(b: &Value) -> String {
    if let Some(s) = b["service"].as_str() {
        return s.to_owned();
    }
    if let Some(u) = b["external"]["url"].as_str() {
        return u.to_owned();
    }
    if let Some(calls) = b["aggregate"]["calls"].as_array() {
        let names: Vec<String> = calls
            .iter()
            .map(|c| {
                format!(
                    "{}={}",
                    c["name"].as_str().unwrap_or_default(),
                    c["service"]
                        .as_str()
                        .or_else(|| c["external"]["url"].as_str())
                        .unwrap_or_default()
                )
            })
            .collect();
        return format!("aggregate({})", names.join(" "));
    }
    if b.get("openapi").is_some() {
        return "openapi document".into();
    }
    b["split"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|w| {
                    format!(
                        "{}={}",
                        w["service"].as_str().unwrap_or_default(),
                        w["weight"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub(crate) async fn run(args: RoutesArgs) -> anyhow::Result<()> {
    let local = match &args.config {
        Some(p) => {
            let cfg = crate::config::load_gateway(p)?;
            Some(
                cfg.compile()
                    .map_err(|e| crate::config::semantic_error(p, &e.to_string()))?,
            )
        }
        None => None,
    };
    let admin = Admin::new(args.admin.clone());
    if local.is_none() {
        admin.expect(ProcessKind::Gateway, "routes").await?;
    }
    if let Some(spec) = &args.matches {
        let (method, url) = spec
            .trim()
            .split_once(char::is_whitespace)
            .map(|(m, u)| (m.to_owned(), u.trim().to_owned()))
            .unwrap_or_else(|| ("GET".to_owned(), spec.trim().to_owned()));
        let headers: Vec<(String, String)> = args
            .headers
            .iter()
            .map(|h| {
                h.split_once(':')
                    .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
                    .ok_or_else(|| anyhow::anyhow!("header {h:?} must be 'Name: value'"))
            })
            .collect::<anyhow::Result<_>>()?;
        let v = match &local {
            Some(c) => explain(&c.table, &method, &url, &headers).map_err(anyhow::Error::msg)?,
            None => {
                let mut q = format!("/routes/match?method={}&url={}", enc(&method), enc(&url));
                for (k, v) in &headers {
                    q.push_str(&format!("&header={}", enc(&format!("{k}:{v}"))));
                }
                admin.get(&q).await?
            }
        };
        if args.output == Output::Json {
            print_json(&v)?;
            return Ok(());
        }
        match v["chosen"].as_str() {
            Some(r) => outln!("{method} {url} -> route {r}"),
            None => outln!("{method} {url} -> no route (404)"),
        }
        let rows: Vec<Vec<String>> = v["candidates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                vec![
                    c["route"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                ]
            })
            .collect();
        print_table(&["ROUTE", "WHY"], &rows)?;
        return Ok(());
    }
    let table = match &local {
        Some(c) => routes_json(&c.table),
        None => admin.get("/routes").await?,
    };
    if args.output == Output::Json {
        print_json(&table)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = table
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                (i + 1).to_string(),
                r["name"].as_str().unwrap_or_default().to_owned(),
                describe_match(r),
                describe_backend(r),
            ]
        })
        .collect();
    print_table(&["#", "ROUTE", "MATCH", "BACKEND"], &rows)?;
    Ok(())
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
