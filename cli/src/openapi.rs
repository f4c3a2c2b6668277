//! `meshgate openapi --config gateway.yaml`: the OpenAPI 3.1 document of a gateway's routes —
//! paths and methods from the route table, operations with parameters and schemas from the
//! transcoded routes' protos, request bodies from route JSON Schemas, security schemes from
//! the routes' auth — printed as JSON (what a route with `backend: {openapi: {}}` serves).

use std::path::PathBuf;

use clap::Args;
use meshgate_gateway::openapi::OpenApiConfig;

use crate::outln;

/// Arguments of `meshgate openapi`.
#[derive(Debug, Args)]
pub(crate) struct OpenApiArgs {
    /// The gateway config whose routes to describe.
    #[arg(long, short)]
    config: PathBuf,
    /// `info.title`; default: the `openapi` route's title, else `meshgate gateway NODE`.
    #[arg(long)]
    title: Option<String>,
    /// `info.version`; default: the `openapi` route's version, else `1`.
    #[arg(long = "api-version", value_name = "VERSION")]
    api_version: Option<String>,
    /// A base URL clients use (`servers[].url`; repeatable).
    #[arg(long = "server", value_name = "URL")]
    servers: Vec<String>,
    /// Write the document to FILE instead of standard output.
    #[arg(long, short = 'O', value_name = "FILE")]
    out: Option<PathBuf>,
}

pub(crate) fn run(args: OpenApiArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load_gateway(&args.config)?;
    // the same checks as a gateway start, so the document describes a config that runs
    cfg.compile()
        .map_err(|e| crate::config::semantic_error(&args.config, &e.to_string()))?;
    let from_route = cfg.routes.iter().find_map(|r| match &r.backend {
        meshgate_gateway::routes::BackendConfig::OpenApi(o) => Some(o.clone()),
        _ => None,
    });
    let info = if args.title.is_some() || args.api_version.is_some() || !args.servers.is_empty() {
        let base = from_route.unwrap_or_default();
        Some(OpenApiConfig {
            title: args.title.or(base.title),
            version: args.api_version.or(base.version),
            description: base.description,
            servers: if args.servers.is_empty() {
                base.servers
            } else {
                args.servers
            },
        })
    } else {
        None
    };
    let doc = meshgate_gateway::openapi::from_config(&cfg, info.as_ref())
        .map_err(|e| crate::config::semantic_error(&args.config, &e))?;
    let text = serde_json::to_string_pretty(&doc)?;
    match &args.out {
        Some(f) => std::fs::write(f, format!("{text}\n"))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", f.display()))?,
        None => outln!("{text}"),
    }
    Ok(())
}
