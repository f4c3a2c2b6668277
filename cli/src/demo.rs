//! `meshgate demo --listen ADDR`: the demo REST service `meshgate dev` runs, on its own, as the
//! local service behind an agent when trying a layout by hand (deploy/examples/local/).

use std::net::SocketAddr;

use clap::Args;
use tracing::info;

use crate::signals::Signals;

/// Arguments of `meshgate demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Where to listen; keep it on loopback so only the node's agent reaches it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// What its answers carry in their `version` field, to tell instances apart.
    #[arg(long, default_value = "v1")]
    instance: String,
}

/// Serves `GET /users/ID`, `DELETE /admin/WHAT` and `GET /health` until SIGTERM or Ctrl-C.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // one value for the whole life of the process
    let version: &'static str = Box::leak(args.instance.into_boxed_str());
    let task = crate::dev::demo_service(args.listen, version).await?;
    info!(listen = %args.listen, version, "demo service: GET /users/ID, GET /health");
    let mut signals = Signals::new()?;
    let how = signals.recv().await;
    signals.stopping("the demo service", how);
    task.abort();
    Ok(())
}
