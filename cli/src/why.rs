//! `meshgate why 'METHOD URL'`: one answer that walks every layer a request would cross and
//! says where it would stop and why.
//!
//! Through the gateway (`--admin` is a gateway): path normalization, route selection, rate
//! limits (peeked, nothing counted), authentication and authorization — the gateway evaluates
//! them with its live config (`POST /why`) — then, per backend service, the endpoints its
//! discovery holds (`/endpoints`) and the intention of the destination's agent (`/authz/check`
//! on the `--agent-admin` that runs it). East-west (`--from SERVICE`, `--admin` is the caller's
//! agent): the caller's upstream, its endpoints, and the destination's intention.
//!
//! Credentials (`--token`, `--api-key`) go only to the gateway's admin API, in a POST body, and
//! are never printed; neither is the URL's query.

use anyhow::{Context, bail};
use clap::Args;
use meshgate_agent::http::respond::Problem;
use serde_json::{Value, json};

use crate::{
    admin_client::{Admin, AdminAddr, ProcessKind},
    authz::enc,
    inspect::AdminArgs,
    outln,
    output::{Output, print_json, print_table},
};

/// Arguments of `meshgate why`.
#[derive(Debug, Args)]
pub(crate) struct WhyArgs {
    /// The request: 'METHOD URL' (one argument, quoted) or METHOD URL, e.g.
    /// 'GET http://127.0.0.1:18080/api/users/7'. The method defaults to GET.
    #[arg(required = true, num_args = 1..=2, value_name = "METHOD URL")]
    request: Vec<String>,
    /// A request header, 'Name: value' (repeatable).
    #[arg(
        short = 'H',
        long = "header",
        value_name = "NAME: VALUE",
        conflicts_with = "from"
    )]
    headers: Vec<String>,
    /// A bearer token to authenticate with (sent as `Authorization: Bearer`; never printed).
    /// Prefer --token-file to keep it out of shell history.
    #[arg(long, conflicts_with_all = ["api_key", "token_file", "from"])]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["api_key", "from"])]
    token_file: Option<std::path::PathBuf>,
    /// An API key, put where the gateway looks for one (never printed).
    #[arg(long, conflicts_with = "from")]
    api_key: Option<String>,
    /// East-west: the calling mesh service; --admin is then the caller's agent, and the URL's
    /// host is the destination service (or the caller's upstream listener address). The
    /// gateway's checks do not apply, so -H, --token, --token-file, --api-key and --client-ip
    /// cannot be given with it.
    #[arg(long, value_name = "SERVICE")]
    from: Option<String>,
    /// The admin API of an agent that may run the destination (repeatable): the one that runs
    /// it answers for its intentions. `meshgate dev` prints each agent's.
    #[arg(long = "agent-admin", value_name = "ADDR")]
    agent_admin: Vec<AdminAddr>,
    /// The client address rate limits key on, as the gateway sees it after X-Forwarded-For
    /// handling (default 127.0.0.1).
    #[arg(long, value_name = "IP", conflicts_with = "from")]
    client_ip: Option<std::net::IpAddr>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// One layer's verdict, as printed.
#[derive(Debug, Clone)]
struct Layer {
    layer: String,
    result: String,
    detail: String,
    status: Option<u64>,
    problem: Option<String>,
}

impl Layer {
    fn new(layer: impl Into<String>, result: &str, detail: impl Into<String>) -> Self {
        Self {
            layer: layer.into(),
            result: result.to_owned(),
            detail: detail.into(),
            status: None,
            problem: None,
        }
    }

    /// The request stops here with the agent's own answer `p` (its status and problem type).
    fn problem(layer: impl Into<String>, p: &Problem, detail: impl Into<String>) -> Self {
        Self::stop(layer, u64::from(p.status().as_u16()), p.slug(), detail)
    }

    fn stop(
        layer: impl Into<String>,
        status: u64,
        problem: &str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status: Some(status),
            problem: Some(problem.to_owned()),
            ..Self::new(layer, "stop", detail)
        }
    }

    fn from_json(v: &Value) -> Self {
        Self {
            layer: v["layer"].as_str().unwrap_or("-").to_owned(),
            result: v["result"].as_str().unwrap_or("-").to_owned(),
            detail: v["detail"].as_str().unwrap_or_default().to_owned(),
            status: v["status"].as_u64(),
            problem: v["problem"].as_str().map(str::to_owned),
        }
    }

    fn json(&self) -> Value {
        json!({"layer": self.layer, "result": self.result, "detail": self.detail,
               "status": self.status, "problem": self.problem})
    }
}

/// The method and URL from `'METHOD URL'`, `METHOD URL` or `URL`.
fn split_request(parts: &[String]) -> anyhow::Result<(String, String)> {
    let joined = parts.join(" ");
    let mut words = joined.split_whitespace();
    let (method, url) = match (words.next(), words.next(), words.next()) {
        (Some(u), None, None) => ("GET".to_owned(), u.to_owned()),
        // methods are case-sensitive: `get` is not GET (the gateway would not route it as GET)
        (Some(m), Some(u), None) => (m.to_owned(), u.to_owned()),
        _ => {
            bail!("give the request as 'METHOD URL', e.g. 'GET http://127.0.0.1:18080/api/users/7'")
        }
    };
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        bail!("{method:?} is not an HTTP method");
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!(
            "give a full URL, http://HOST[:PORT]/PATH (not {})",
            shown(&url)
        );
    }
    Ok((method, url))
}

fn headers(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .with_context(|| format!("-H {h:?}: write 'Name: value'"))
        })
        .collect()
}

/// The URL without what may carry credentials: the query and a `user:password@`.
fn shown(url: &str) -> String {
    let mut u = match url.split_once('?') {
        Some((u, _)) => format!("{u}?…"),
        None => url.to_owned(),
    };
    let start = u.find("://").map_or(0, |i| i + 3);
    let end = u[start..].find('/').map_or(u.len(), |i| start + i);
    if let Some(at) = u[start..end].rfind('@') {
        u.replace_range(start..start + at + 1, "…@");
    }
    u
}

/// `meshgate why`; exit 1 when the request would not get through.
pub(crate) async fn run(args: WhyArgs) -> anyhow::Result<()> {
    let (method, url) = split_request(&args.request)?;
    let mut hdrs = headers(&args.headers)?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?,
        ),
        (None, None) => None,
    };
    if let Some(t) = &token {
        let t = t.trim();
        let t = match t.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => t,
        };
        hdrs.push(("authorization".into(), format!("Bearer {t}")));
    }
    let admin = Admin::new(args.admin.admin.clone());
    let (_, kind) = admin.version().await?;
    let agents: Vec<Admin> = args.agent_admin.iter().cloned().map(Admin::new).collect();
    let mut layers = Vec::new();
    let via = match (kind, &args.from) {
        (ProcessKind::Gateway, Some(_)) => bail!(
            "--from is for east-west requests, which do not cross the gateway: point --admin at the caller's agent (or drop --from to ask the gateway)"
        ),
        (ProcessKind::Agent, None) => bail!(
            "{} is an agent: for an east-west request give the caller with --from SERVICE; for a request through the gateway point --admin at the gateway",
            admin.addr()
        ),
        (ProcessKind::Gateway, None) => {
            let body = json!({
                "method": method,
                "url": url,
                "headers": hdrs,
                "api_key": args.api_key,
                "client_ip": args.client_ip,
            });
            let answer = admin.post("/why", &body).await?;
            layers.extend(
                answer["layers"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(Layer::from_json),
            );
            if !layers.iter().any(|l| l.result == "stop") {
                let caller = answer["caller"].as_str().unwrap_or_default().to_owned();
                // None: a transcoded route, whose service sees a gRPC method, not this path
                let path = answer["upstream_path"].as_str().map(str::to_owned);
                let up_method = answer["upstream_method"]
                    .as_str()
                    .unwrap_or(&method)
                    .to_owned();
                let endpoints = admin.get("/endpoints").await;
                let mesh: Vec<(String, f64, Option<String>)> = answer["backends"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter(|b| b["kind"] == "mesh")
                    .map(|b| {
                        (
                            b["target"].as_str().unwrap_or_default().to_owned(),
                            b["percent"].as_f64().unwrap_or(100.0),
                            // an aggregate's call has its own path
                            b["path"]
                                .as_str()
                                .map(str::to_owned)
                                .or_else(|| path.clone()),
                        )
                    })
                    .collect();
                for (svc, percent, call_path) in &mesh {
                    let label = |l: &str| {
                        if mesh.len() > 1 {
                            format!("{l} {svc} ({percent:.0}%)")
                        } else {
                            format!("{l} {svc}")
                        }
                    };
                    let ep = match &endpoints {
                        Ok(e) => endpoint_layer(e, svc, &label("endpoint")),
                        Err(e) => Layer::new(
                            label("endpoint"),
                            "unchecked",
                            format!("/endpoints failed: {e}"),
                        ),
                    };
                    let stopped = ep.result == "stop";
                    layers.push(ep);
                    if stopped {
                        continue;
                    }
                    layers.push(match call_path {
                        Some(p) => {
                            intention_layer(&agents, &caller, svc, &up_method, p, &label("intention"))
                                .await
                        }
                        None => Layer::new(
                            label("intention"),
                            "unchecked",
                            format!(
                                "transcoded: {svc} sees the gRPC method this call maps to; check it with `meshgate authz check --from {caller} --to {svc} --method POST --path /PACKAGE.SERVICE/METHOD`"
                            ),
                        ),
                    });
                }
            }
            "gateway"
        }
        (ProcessKind::Agent, Some(from)) => {
            east_west(&admin, &agents, from, &method, &url, &mut layers).await?;
            "agent"
        }
    };
    let stop = layers.iter().find(|l| l.result == "stop").cloned();
    let unchecked: Vec<&str> = layers
        .iter()
        .filter(|l| l.result == "unchecked")
        .map(|l| l.layer.as_str())
        .collect();
    let partial = stop.is_some()
        && layers
            .iter()
            .filter(|l| l.layer.starts_with("intention"))
            .any(|l| l.result == "pass");
    if args.admin.output == Output::Json {
        print_json(&json!({
            "method": method,
            "url": shown(&url),
            "via": via,
            "admin": admin.addr().to_string(),
            "layers": layers.iter().map(Layer::json).collect::<Vec<_>>(),
            "verdict": match (&stop, partial, unchecked.is_empty()) {
                (None, _, true) => "allowed",
                (None, _, false) => "allowed-unchecked",
                (Some(_), true, _) => "partly-stopped",
                (Some(_), false, _) => "stopped",
            },
            "stopped_at": stop.as_ref().map(Layer::json),
        }))?;
    } else {
        outln!("{method} {} via the {via} at {}", shown(&url), admin.addr());
        outln!();
        let rows: Vec<Vec<String>> = layers
            .iter()
            .map(|l| {
                vec![
                    l.layer.clone(),
                    match l.result.as_str() {
                        "stop" => "STOP".to_owned(),
                        r => r.to_owned(),
                    },
                    match (&l.status, &l.problem) {
                        (Some(s), Some(p)) => format!("{s} {p}"),
                        _ => String::new(),
                    },
                    l.detail.clone(),
                ]
            })
            .collect();
        print_table(&["LAYER", "RESULT", "ANSWER", "WHY"], &rows)?;
        outln!();
        match &stop {
            None if unchecked.is_empty() => outln!("it would get through: every layer passes"),
            None => outln!(
                "it would get through every layer checked; not checked: {} (see WHY)",
                unchecked.join(", ")
            ),
            Some(l) => outln!(
                "it would stop at {}: {} {} — {}{}",
                l.layer,
                l.status.map(|s| s.to_string()).unwrap_or_default(),
                l.problem.as_deref().unwrap_or_default(),
                l.detail,
                if partial {
                    " (other backends of the split get through)"
                } else {
                    ""
                }
            ),
        }
    }
    if stop.is_some() {
        return Err(crate::Reported.into());
    }
    Ok(())
}

/// The endpoints the process holds for `svc`, and which one the balancer would favour.
fn no_endpoints(svc: &str) -> Problem {
    Problem::NoEndpoints {
        service: svc.to_owned(),
    }
}

fn endpoint_layer(endpoints: &Value, svc: &str, label: &str) -> Layer {
    let Some(entry) = endpoints
        .as_array()
        .and_then(|l| l.iter().find(|s| s["service"] == svc))
    else {
        return Layer::problem(
            label,
            &no_endpoints(svc),
            format!("{svc} is not a service this process discovers"),
        );
    };
    let all = entry["endpoints"].as_array().cloned().unwrap_or_default();
    let healthy: Vec<&Value> = all.iter().filter(|e| e["ejected"] != true).collect();
    let stale = if entry["stale"] == true {
        " (discovery is STALE: its source fails, the last good endpoints are in use)"
    } else {
        ""
    };
    if all.is_empty() {
        return Layer::problem(
            label,
            &no_endpoints(svc),
            format!("{svc}: none known{stale}"),
        );
    }
    if healthy.is_empty() {
        // the balancer's panic mode: with every endpoint ejected it still picks among them
        return Layer::new(
            label,
            "pass",
            format!(
                "{svc}: all {} ejected after failures; the balancer tries them anyway (panic mode), expect failures{stale}",
                all.len()
            ),
        );
    }
    // the balancer's cost: latency estimate x (requests in flight + 1)
    let cost = |e: &Value| {
        e["rtt_ewma_ms"].as_f64().unwrap_or(1.0) * (e["pending"].as_f64().unwrap_or(0.0) + 1.0)
    };
    let best = healthy
        .iter()
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .and_then(|e| e["addr"].as_str())
        .unwrap_or("-");
    let choice = if healthy.len() == 1 {
        format!("{best}, the only one")
    } else {
        format!(
            "least busy now: {best} (latency x requests in flight; the balancer takes the cheaper of two random picks)"
        )
    };
    Layer::new(
        label,
        "pass",
        format!(
            "{} of {} endpoints healthy; {choice}{stale}",
            healthy.len(),
            all.len()
        ),
    )
}

/// The destination agent's intention for `from` calling `svc`.
async fn intention_layer(
    agents: &[Admin],
    from: &str,
    svc: &str,
    method: &str,
    path: &str,
    label: &str,
) -> Layer {
    if agents.is_empty() {
        return Layer::new(
            label,
            "unchecked",
            format!("pass --agent-admin ADDR of the agent that runs {svc} to check its intentions"),
        );
    }
    let q = format!(
        "/authz/check?from={}&to={}&method={}&path={}",
        enc(from),
        enc(svc),
        enc(method),
        enc(path)
    );
    let mut tried = Vec::new();
    for a in agents {
        match a.get(&q).await {
            Ok(v) => {
                let rule = v["reason"].as_str().unwrap_or("-");
                let from = v["from"].as_str().unwrap_or(from);
                let at = format!("agent {}", a.addr());
                return if v["decision"] == "allow" {
                    Layer::new(
                        label,
                        "pass",
                        format!("allowed by {rule} ({at}, as {from})"),
                    )
                } else if let Some(status) = v["status"].as_u64() {
                    // refused before any rule (an invalid path)
                    Layer::stop(
                        label,
                        status,
                        v["problem"].as_str().unwrap_or("invalid-path"),
                        format!("{rule} ({at})"),
                    )
                } else {
                    Layer::problem(
                        label,
                        &Problem::DeniedByIntention,
                        format!("denied by {rule} ({at}, as {from})"),
                    )
                };
            }
            Err(e) => tried.push(format!(
                "{}: {}",
                a.addr(),
                e.to_string().lines().next().unwrap_or_default()
            )),
        }
    }
    Layer::new(
        label,
        "unchecked",
        format!("no given agent answered for {svc} ({})", tried.join("; ")),
    )
}

/// East-west: `from` on the agent at `admin` calls the service the URL names.
async fn east_west(
    admin: &Admin,
    agents: &[Admin],
    from: &str,
    method: &str,
    url: &str,
    layers: &mut Vec<Layer>,
) -> anyhow::Result<()> {
    let config = admin.get("/config").await?;
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split('?').next().unwrap_or("/");
    let services = config["services"].as_array().cloned().unwrap_or_default();
    let Some(caller) = services.iter().find(|s| s["name"] == from) else {
        let names: Vec<&str> = services.iter().filter_map(|s| s["name"].as_str()).collect();
        bail!(
            "{from} does not run on the agent at {} (it runs: {}): --admin must be the caller's agent",
            admin.addr(),
            if names.is_empty() {
                "nothing".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    let upstreams = caller["upstreams"].as_array().cloned().unwrap_or_default();
    let by_listener = upstreams.iter().find(|u| {
        u["listen"].as_str().is_some_and(|l| {
            l == authority || (l.starts_with("0.0.0.0:") && authority.ends_with(&l[7..]))
        })
    });
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let (svc, how) = match by_listener {
        Some(u) => (
            u["service"].as_str().unwrap_or_default().to_owned(),
            format!(
                "{from} calls {} through its upstream listener {authority}",
                u["service"].as_str().unwrap_or_default()
            ),
        ),
        None => match upstreams.iter().find(|u| u["service"] == host) {
            Some(u) => (
                host.to_owned(),
                format!(
                    "{from} calls {host}; its upstream listener is {}",
                    u["listen"].as_str().unwrap_or("-")
                ),
            ),
            None => {
                // no HTTP answer at all: nothing listens there, the connection is refused
                layers.push(Layer::new(
                    "upstream",
                    "stop",
                    format!("{from} has no upstream for {authority} (a connection to it is refused): add one under services[{from}].upstreams"),
                ));
                return Ok(());
            }
        },
    };
    layers.push(Layer::new("upstream", "pass", how));
    let ep = match admin.get("/endpoints").await {
        Ok(e) => endpoint_layer(&e, &svc, "endpoint"),
        Err(e) => Layer::new("endpoint", "unchecked", format!("/endpoints failed: {e}")),
    };
    let stopped = ep.result == "stop";
    layers.push(ep);
    if !stopped {
        layers.push(intention_layer(agents, from, &svc, method, path, "intention").await);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_every_spelling_and_refuse_half_ones() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            split_request(&v(&["GET http://h/p"])).expect("one arg"),
            ("GET".into(), "http://h/p".into())
        );
        assert_eq!(
            split_request(&v(&["DELETE", "http://h/p"])).expect("two args"),
            ("DELETE".into(), "http://h/p".into())
        );
        assert_eq!(split_request(&v(&["http://h/"])).expect("url").0, "GET");
        assert!(split_request(&v(&["GET /p"])).is_err());
        assert!(split_request(&v(&["G(T http://h/"])).is_err());
        assert!(headers(&v(&["X-A: 1", "b:2"])).is_ok());
        assert!(headers(&v(&["no colon"])).is_err());
        assert_eq!(shown("http://h/p?api_key=secret"), "http://h/p?…");
        assert_eq!(shown("http://alice:s3cr3t@h:80/p"), "http://…@h:80/p");
        assert_eq!(
            split_request(&v(&["get http://h/"])).expect("lower").0,
            "get"
        );
        let e = split_request(&v(&["GET h/p?api_key=secret"])).expect_err("no scheme");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn the_endpoint_layer_stops_without_endpoints_and_warns_when_all_are_ejected() {
        let eps = json!([{"service": "users", "stale": false, "endpoints": [
            {"addr": "10.0.0.1:15008", "ejected": false, "pending": 3},
            {"addr": "10.0.0.2:15008", "ejected": false, "pending": 1},
            {"addr": "10.0.0.3:15008", "ejected": true, "pending": 0}]},
            {"service": "down", "stale": true, "endpoints": [{"addr": "10.0.0.9:15008", "ejected": true}]},
            {"service": "empty", "stale": false, "endpoints": []}]);
        let l = endpoint_layer(&eps, "users", "endpoint");
        assert_eq!(l.result, "pass");
        assert!(
            l.detail
                .starts_with("2 of 3 endpoints healthy; least busy now: 10.0.0.2:15008"),
            "{}",
            l.detail
        );
        // all ejected: the balancer's panic mode still sends to them
        let l = endpoint_layer(&eps, "down", "endpoint");
        assert_eq!((l.result.as_str(), l.status), ("pass", None));
        assert!(
            l.detail.contains("ejected") && l.detail.contains("STALE"),
            "{}",
            l.detail
        );
        let l = endpoint_layer(&eps, "empty", "endpoint");
        assert_eq!((l.result.as_str(), l.status), ("stop", Some(503)));
        let l = endpoint_layer(&eps, "nope", "endpoint");
        assert_eq!(l.result, "stop");
    }
}
