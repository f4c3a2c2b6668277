//! Graceful drain: a signal every accept loop and connection watches, and a count of the
//! streams still in flight so shutdown can wait for them (up to a deadline).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

/// Shared drain state.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    signal: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Not draining, nothing in flight.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                signal: watch::channel(false).0,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts draining: accept loops stop, connections finish what they carry.
    pub fn start(&self) {
        self.inner.signal.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.inner.signal.borrow()
    }

    /// Resolves once draining starts.
    pub async fn started(&self) {
        let mut rx = self.inner.signal.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Marks one unit of work in flight until the guard drops.
    pub fn track(&self) -> DrainGuard {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        DrainGuard {
            inner: self.inner.clone(),
        }
    }

    /// Work in flight now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight or `timeout` passes; true if idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Decrements the in-flight count on drop.
#[derive(Debug)]
pub struct DrainGuard {
    inner: Arc<Inner>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_work_or_deadline() {
        let d = Drain::new();
        assert!(d.wait_idle(Duration::from_secs(1)).await);
        let g = d.track();
        assert!(
            !d.wait_idle(Duration::from_secs(1)).await,
            "deadline passes with work in flight"
        );
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.wait_idle(Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(g);
        assert!(waiter.await.expect("task"));
        assert!(!d.is_draining());
        d.start();
        d.started().await;
        assert!(d.is_draining());
    }
}
