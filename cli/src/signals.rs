//! Stopping on SIGTERM or Ctrl-C: the first one starts a graceful drain, a second one (the
//! operator is impatient, or the drain hangs) exits at once with status 130.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

/// Exit status after a second interrupt: 128 + SIGINT.
pub(crate) const EXIT_FORCED: i32 = 130;

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGTERM.
    Term,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// SIGTERM and SIGINT, installed once per process.
#[derive(Debug)]
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Starts listening for both.
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first SIGTERM or SIGINT.
    pub(crate) async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.term.recv() => Stop::Term,
            _ = self.int.recv() => Stop::Interrupt,
        }
    }

    /// After the first signal: logs that the process is stopping, and exits at once (status
    /// 130) if another SIGTERM or SIGINT arrives before it is done.
    pub(crate) fn stopping(mut self, what: &str, how: Stop) {
        let by = match how {
            Stop::Term => "SIGTERM",
            Stop::Interrupt => "Ctrl-C",
        };
        info!("{by}: stopping {what}; press Ctrl-C again to exit at once");
        tokio::spawn(async move {
            let _ = self.recv().await;
            crate::config::eprintln_safe("second interrupt: exiting without waiting for the drain");
            std::process::exit(EXIT_FORCED);
        });
    }
}
