//! `meshgate auth explain`: which check a token passes or fails on a route (signature, kid, alg,
//! iss, aud, exp, nbf, JWKS reachability), without printing the token.

use std::{path::PathBuf, time::SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use meshgate_gateway::{
    jwks::{FetchFailures, JwksCache},
    jwt::{Validator, decode_unverified},
};
use serde_json::Value;

/// Arguments of `meshgate auth explain`.
#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// gateway.yaml.
    #[arg(long, short)]
    config: PathBuf,
    /// The route whose JWT providers to check.
    #[arg(long)]
    route: String,
    /// The token; prefer --token-file or stdin to keep it out of shell history.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

fn line(check: &str, ok: bool, detail: &str) -> anyhow::Result<()> {
    crate::outln!(
        "  {check:<10} {}  {detail}",
        if ok { "ok  " } else { "FAIL" }
    );
    Ok(())
}

pub(crate) async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load_gateway(&args.config)?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => {
            let mut s = String::new();
            std::io::stdin().read_line(&mut s)?;
            s
        }
    };
    let token = token.trim().trim_start_matches("Bearer ").to_owned();
    let Some(route) = cfg.routes.iter().find(|r| r.name == args.route) else {
        bail!(
            "no route named {:?} in {}",
            args.route,
            args.config.display()
        );
    };
    let providers: Vec<_> = route
        .auth
        .as_ref()
        .map(|a| a.jwt.clone())
        .unwrap_or_default();
    if providers.is_empty() {
        bail!(
            "route {} does not accept JWTs (auth.jwt is empty)",
            route.name
        );
    }
    let Some((header, claims)) = decode_unverified(&token) else {
        bail!("the token is not a JWS compact serialization (three base64url parts)");
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let mut any = false;
    for name in &providers {
        let Some(p) = cfg.auth.jwt.iter().find(|p| &p.name == name) else {
            continue;
        };
        crate::outln!("provider {name}");
        let alg = header["alg"].as_str().unwrap_or("(none)");
        line(
            "alg",
            p.algorithms.iter().any(|a| a == alg) && alg != "none",
            &format!("{alg}, allowed: {}", p.algorithms.join(", ")),
        )?;
        let kid = header["kid"].as_str();
        for ignored in ["jwk", "jku", "x5u", "x5c"] {
            if header.get(ignored).is_some() {
                crate::outln!(
                    "  {ignored:<10} note  present in the token header and ignored: keys come only from the JWKS"
                );
            }
        }
        if header.get("crit").is_some() {
            line(
                "crit",
                false,
                "the token requires extensions meshgate does not implement",
            )?;
        }
        let cache = JwksCache::new(
            p,
            cfg.auth.jwks_ca_file.as_deref(),
            FetchFailures::default(),
        )
        .map_err(anyhow::Error::msg)?;
        let keys = match cache.try_load().await {
            Ok(n) => {
                line("jwks", true, &format!("{n} keys loaded"))?;
                cache.keys()
            }
            Err((reason, detail)) => {
                line("jwks", false, &format!("unreachable ({reason}): {detail}"))?;
                cache.keys()
            }
        };
        line(
            "kid",
            kid.is_some_and(|k| keys.has_kid(k)) || (kid.is_none() && keys.len() == 1),
            &format!(
                "{}; known: {}",
                kid.unwrap_or("(none)"),
                keys.kids().join(", ")
            ),
        )?;
        let leeway = p.leeway.as_secs();
        match (&p.issuer, claims.get("iss").and_then(Value::as_str)) {
            (Some(want), got) => line(
                "iss",
                got == Some(want.as_str()),
                &format!("{} (wants {want})", got.unwrap_or("missing")),
            ),
            (None, got) => line(
                "iss",
                true,
                &format!("{} (not checked)", got.unwrap_or("missing")),
            ),
        }?;
        let auds: Vec<String> = match claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        if p.audiences.is_empty() {
            line("aud", true, "not checked")?;
        } else {
            line(
                "aud",
                auds.iter().any(|a| p.audiences.contains(a)),
                &format!("{:?} (wants one of {:?})", auds, p.audiences),
            )?;
        }
        match claims.get("exp").and_then(Value::as_u64) {
            Some(exp) => line(
                "exp",
                now < exp + leeway,
                &format!(
                    "{} s {} (leeway {leeway} s)",
                    exp.abs_diff(now),
                    if now < exp { "left" } else { "ago" }
                ),
            ),
            None => line("exp", !p.require_exp, "missing"),
        }?;
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
            line(
                "nbf",
                now + leeway >= nbf,
                &format!(
                    "valid from {} s {}",
                    nbf.abs_diff(now),
                    if nbf > now { "from now" } else { "ago" }
                ),
            )?;
        }
        let validator = Validator::new(p).map_err(|e| anyhow::anyhow!("{e}"))?;
        match validator.validate(&token, &keys, now) {
            Ok(v) => {
                line(
                    "signature",
                    true,
                    &format!("verified with kid {}", v.kid.as_deref().unwrap_or("(none)")),
                )?;
                crate::outln!(
                    "  result     VALID for provider {name} (sub {})",
                    v.claim_as_header_value("sub").unwrap_or_default()
                );
                any = true;
            }
            Err(e) => crate::outln!("  result     INVALID: {e}"),
        }
    }
    if !any {
        return Err(crate::Reported.into());
    }
    Ok(())
}
