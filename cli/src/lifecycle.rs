//! Process lifecycle shared by `meshgate agent`, `meshgate gateway` and `meshgate ca serve`:
//! systemd notification (`READY=1`, `RELOADING=1`, `STOPPING=1`), the optional health listener
//! (`--health-listen`) and the drain delay (`--drain-delay`).
//!
//! The admin API stays on loopback by design, so a load balancer on another host (haproxy) or
//! a kubelet probing the pod IP cannot reach it. The health listener answers exactly two paths,
//! `GET /healthz` and `GET /readyz`, in plain HTTP on an address of the operator's choice; it
//! relays the admin API's own answer for them (one source of truth for readiness), except that
//! from the first SIGTERM it answers `/readyz` with 503 at once. With `--drain-delay` the
//! process keeps serving that long after SIGTERM, so the balancer stops sending new connections
//! before the listeners close. Nothing else of the admin API is exposed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use meshgate_agent::notify::Notifier;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

/// How long the health listener waits for the admin API before answering 503.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags every long-running mode shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct LifecycleArgs {
    /// Also answer `GET /healthz` and `GET /readyz` (nothing else) in plain HTTP on this address,
    /// e.g. 0.0.0.0:15021, for load balancer health checks and kubelet probes; the admin API
    /// stays on loopback. `/readyz` turns 503 at the first SIGTERM.
    #[arg(long, env = "MESHGATE_HEALTH_LISTEN")]
    pub(crate) health_listen: Option<SocketAddr>,
    /// After SIGTERM, keep serving this long while reporting not-ready (on --health-listen and
    /// to systemd), so load balancers and Kubernetes stop sending new connections first; then
    /// drain. A second SIGTERM or Ctrl-C exits at once. Default 0s.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, env = "MESHGATE_DRAIN_DELAY")]
    pub(crate) drain_delay: Duration,
}

/// One process's lifecycle reporting.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    notifier: Option<Notifier>,
    health: Option<HealthListener>,
    drain_delay: Duration,
}

impl Lifecycle {
    /// Reads `$NOTIFY_SOCKET` and starts the health listener (relaying to `admin` when given;
    /// without an admin API, `/readyz` is 200 until draining).
    pub(crate) async fn start(
        args: &LifecycleArgs,
        admin: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let notifier = match Notifier::from_env() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "systemd notification disabled");
                None
            }
        };
        let health = match args.health_listen {
            Some(addr) => Some(HealthListener::start(addr, admin).await?),
            None => None,
        };
        Ok(Self {
            notifier,
            health,
            drain_delay: args.drain_delay,
        })
    }

    fn notify(
        &self,
        what: &str,
        f: impl FnOnce(&Notifier) -> Result<(), meshgate_agent::notify::NotifyError>,
    ) {
        if let Some(n) = &self.notifier
            && let Err(e) = f(n)
        {
            warn!(error = %e, "systemd {what} notification failed");
        }
    }

    /// Start-up or a reload finished: `READY=1`.
    pub(crate) fn ready(&self, status: &str) {
        self.notify("ready", |n| n.ready(status));
    }

    /// A reload begins: `RELOADING=1` (follow with [`Lifecycle::ready`]).
    pub(crate) fn reloading(&self) {
        self.notify("reloading", Notifier::reloading);
    }

    /// The first SIGTERM arrived: `STOPPING=1`, `/readyz` 503, then the drain delay (a second
    /// signal exits at once, see `signals`).
    pub(crate) async fn stopping(&self) {
        self.notify("stopping", |n| n.stopping("draining"));
        if let Some(h) = &self.health {
            h.draining.store(true, Ordering::SeqCst);
        }
        if self.drain_delay.is_zero() {
            return;
        }
        info!(delay = %humantime::format_duration(self.drain_delay), "not ready; still serving for the drain delay");
        tokio::time::sleep(self.drain_delay).await;
    }
}

#[derive(Debug)]
struct HealthListener {
    draining: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for HealthListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthListener {
    async fn start(listen: SocketAddr, admin: Option<SocketAddr>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot bind --health-listen {listen}"))?;
        let addr = listener.local_addr()?;
        let draining = Arc::new(AtomicBool::new(false));
        let flag = draining.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let flag = flag.clone();
                        async move { Ok::<_, Infallible>(answer(&req, admin, &flag).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        info!(addr = %addr, "health listener: GET /healthz and /readyz");
        Ok(Self { draining, task })
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

async fn answer<B>(
    req: &Request<B>,
    admin: Option<SocketAddr>,
    draining: &AtomicBool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let path = req.uri().path();
    match path {
        "/readyz" if draining.load(Ordering::SeqCst) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
        }
        "/healthz" | "/readyz" => match admin {
            None if path == "/readyz" => text(StatusCode::OK, "ready\n"),
            None => text(StatusCode::OK, "ok\n"),
            Some(admin) => match fetch(admin, path, ADMIN_TIMEOUT).await {
                Ok((status, body)) => text(status, body),
                Err(e) => {
                    debug!(error = %format!("{e:#}"), "health listener: admin API did not answer");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: the admin API does not answer\n",
                    )
                }
            },
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "only /healthz and /readyz are served here; the admin API is on loopback\n",
        ),
    }
}

/// GET `path` from the admin API at `admin`: its status and body, within `timeout`.
pub(crate) async fn fetch(
    admin: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let get = async {
        let tcp = tokio::net::TcpStream::connect(admin).await.with_context(|| {
            format!("cannot reach the agent's admin API at {admin} (is the agent running? see --admin)")
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, admin.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(timeout, get).await.with_context(|| {
        format!(
            "the admin API at {admin} did not answer within {}",
            humantime::format_duration(timeout)
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[tokio::test]
    async fn answers_only_health_paths_and_turns_unready_when_draining() {
        let flag = AtomicBool::new(false);
        let r = answer(&get("/readyz"), None, &flag).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            answer(&get("/config"), None, &flag).await.status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/readyz").body(()).expect("request");
        assert_eq!(
            answer(&post, None, &flag).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        flag.store(true, Ordering::SeqCst);
        assert_eq!(
            answer(&get("/readyz"), None, &flag).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // liveness is not readiness: a draining process is still alive
        assert_eq!(
            answer(&get("/healthz"), None, &flag).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn an_unreachable_admin_api_is_not_ready() {
        // a port that was just free: nothing listens there
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let flag = AtomicBool::new(false);
        let r = answer(&get("/readyz"), Some(port), &flag).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
