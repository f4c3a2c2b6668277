//! `meshgate authz check`: the decision of the live intentions of the agent that would decide
//! (the destination's), and the rule that made it. The agent evaluates (`/authz/check` on its
//! admin API); the CLI only asks and prints.

use clap::Args;

use crate::{
    admin_client::{Admin, ProcessKind},
    inspect::AdminArgs,
    outln,
    output::{Output, print_json, print_table},
};

/// Arguments of `meshgate authz check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The calling service (a name, or a full SPIFFE ID).
    #[arg(long)]
    from: String,
    /// The destination service; --admin must be the agent of the node that runs it.
    #[arg(long)]
    to: String,
    /// The request method, for `protocol: http`/`grpc` services (default GET).
    #[arg(long)]
    method: Option<String>,
    /// The request path, for `protocol: http`/`grpc` services (default /).
    #[arg(long)]
    path: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// `s` percent-encoded for a query value.
pub(crate) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `meshgate authz check`; exit 1 when the decision is deny.
pub(crate) async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let admin = Admin::new(args.admin.admin);
    admin.expect(ProcessKind::Agent, "authz check").await?;
    let mut q = format!("/authz/check?from={}&to={}", enc(&args.from), enc(&args.to));
    if let Some(m) = &args.method {
        q.push_str(&format!("&method={}", enc(m)));
    }
    if let Some(p) = &args.path {
        q.push_str(&format!("&path={}", enc(p)));
    }
    let v = admin.get(&q).await?;
    if args.admin.output == Output::Json {
        print_json(&v)?;
    } else {
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
        let request = match v["layer"].as_str() {
            Some("l7") => format!("{} {}", s("method"), s("path")),
            _ => "connection (L4)".into(),
        };
        print_table(
            &["FROM", "TO", "REQUEST", "DECISION", "RULE"],
            &[vec![
                s("from"),
                s("to"),
                request,
                s("decision").to_uppercase(),
                s("reason"),
            ]],
        )?;
    }
    if v["decision"] != "allow" {
        if args.admin.output != Output::Json {
            if v["problem"] == "invalid-path" {
                // no rule can allow it: the agent answers 400 before the rules
                outln!("refused: the agent rejects this path spelling before any rule (400)");
            } else {
                outln!("denied: change authz.rules on the destination's agent to allow it");
            }
        }
        return Err(crate::Reported.into());
    }
    Ok(())
}
