//! What `meshgate dev` does around starting its processes: check that its ports are free
//! before anything starts (and suggest a `--port-base` whose block is), and write the configs it
//! runs (`--print-configs DIR`) as a starting point for a real deployment.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
};

use crate::config::CaConfig;
use anyhow::Context;
use meshgate_agent::config::AgentConfig;
use meshgate_gateway::config::GatewayConfig;

/// The ports dev binds, as offsets from `--port-base`, with what each is for.
pub(crate) const PORTS: &[(u16, &str)] = &[
    (0, "node-a admin"),
    (8, "node-a mesh inbound"),
    (12, "CA"),
    (80, "gateway HTTP"),
    (81, "demo users v1"),
    (82, "demo users v2"),
    (84, "demo orders gRPC"),
    (91, "web's upstream listener"),
    (100, "node-b admin"),
    (108, "node-b mesh inbound"),
    (200, "gateway admin"),
];

/// The block dev needs above its base.
pub(crate) const SPAN: u16 = 500;

fn busy(base: u16) -> Vec<(u16, &'static str)> {
    PORTS
        .iter()
        .filter_map(|(off, what)| {
            let port = base.checked_add(*off)?;
            TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
                .is_err()
                .then_some((port, *what))
        })
        .collect()
}

/// A base below the usual ephemeral range (32768+) whose whole block is free, near `from`.
fn free_base(from: u16) -> Option<u16> {
    // blocks of 1000 from 10000 to 31000, starting with the one above `from`
    let start = (from / 1000).clamp(10, 31) - 10;
    (1..=22u16)
        .map(|k| 10_000 + ((start + k) % 22) * 1000)
        .find(|b| busy(*b).is_empty())
}

/// Fails, before anything starts, when a port dev needs on 127.0.0.1 is taken, naming the port,
/// what dev wanted it for, and a `--port-base` that works.
pub(crate) fn check_ports(base: u16) -> anyhow::Result<()> {
    if base.checked_add(SPAN).is_none() {
        anyhow::bail!(
            "--port-base {base} is too high: dev needs {SPAN} ports above it (at most {})",
            u16::MAX - SPAN
        );
    }
    let taken = busy(base);
    if taken.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = taken
        .iter()
        .map(|(p, what)| format!("{p} ({what})"))
        .collect();
    let suggestion = match free_base(base) {
        Some(b) => format!("try `meshgate dev --port-base {b}`, whose ports are free"),
        None => "pass another --port-base (dev uses base..base+500)".into(),
    };
    anyhow::bail!(
        "127.0.0.1 port{} {} already in use (another meshgate dev?): {suggestion}",
        if taken.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}

/// When `meshgate` is not on PATH (run with `cargo run`): how to get it there.
pub(crate) fn path_hint() -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("meshgate").is_file()));
    if on_path {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    Some(format!(
        "meshgate is not on your PATH: run {} instead, or install it with `cargo install --path cli`",
        exe.display()
    ))
}

/// What `--print-configs` writes.
pub(crate) struct DevConfigs<'a> {
    /// The CA's config.
    pub(crate) ca: &'a CaConfig,
    /// The agents, by node name.
    pub(crate) agents: Vec<&'a AgentConfig>,
    /// The gateway.
    pub(crate) gateway: &'a GatewayConfig,
}

fn header(what: &str, node: &str, services: &str) -> String {
    format!(
        "# {what}, as `meshgate dev` ran it: a starting point for a real deployment.\n\
         # Paths are relative to this file. Before starting it, make its join token on the CA:\n\
         #   meshgate ca token create --data-dir ./ca --node {node}{services} --print-join-command\n\
         # and save the token in ./{node}.token (mode 0600).\n"
    )
}

fn yaml(v: &impl serde::Serialize) -> anyhow::Result<String> {
    serde_saphyr::to_string(v).context("cannot write the config as YAML")
}

/// Writes `ca.yaml`, one `NODE.yaml` per agent and `gateway.yaml` into `dir`, with data dirs
/// and token files relative to it.
pub(crate) fn write_configs(dir: &Path, c: &DevConfigs<'_>) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path.display().to_string());
        Ok(())
    };
    let mut ca = c.ca.clone();
    ca.data_dir = "./ca".into();
    write(
        "ca.yaml",
        format!(
            "# The CA, as `meshgate dev` ran it. Create ./ca with\n#   meshgate ca init --trust-domain {} --data-dir ./ca\n# (a new CA has a new fingerprint: update ca.fingerprint in the other files).\n{}",
            ca.trust_domain,
            yaml(&ca)?
        ),
    )?;
    for a in &c.agents {
        let mut a = (*a).clone();
        a.data_dir = format!("./{}", a.node).into();
        a.ca.join_token_file = Some(format!("./{}.token", a.node).into());
        let services: Vec<&str> = a.services.iter().map(|s| s.name.as_str()).collect();
        let head = header(
            "A node agent",
            &a.node,
            &format!(" --services {}", services.join(",")),
        );
        write(&format!("{}.yaml", a.node), format!("{head}{}", yaml(&a)?))?;
    }
    let mut g = c.gateway.clone();
    // the demo's protos go next to the configs, and transcoded routes import from there
    if g.routes.iter().any(|r| r.transcode.is_some()) {
        let file = dir.join("protos/demo/orders/v1/orders.proto");
        std::fs::create_dir_all(file.parent().expect("invariant: the path has a parent"))
            .with_context(|| format!("cannot create {}", dir.join("protos").display()))?;
        write(
            "protos/demo/orders/v1/orders.proto",
            meshgate_proto::demo::ORDERS_PROTO.to_owned(),
        )?;
        for r in &mut g.routes {
            if let Some(t) = &mut r.transcode {
                t.include = vec!["./protos".into()];
            }
        }
    }
    g.data_dir = format!("./{}", g.node).into();
    g.ca.join_token_file = Some(format!("./{}.token", g.node).into());
    let head = header(
        "The gateway",
        &g.node,
        &format!(" --services {}", g.identity),
    );
    write("gateway.yaml", format!("{head}{}", yaml(&g)?))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_named_with_a_way_out() {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        // a base that puts the node-a admin port on the taken one
        let err = check_ports(port).expect_err("taken").to_string();
        assert!(err.contains(&format!("{port} (node-a admin)")), "{err}");
        assert!(err.contains("--port-base"), "{err}");
        assert!(check_ports(u16::MAX - 10).is_err());
    }
}
