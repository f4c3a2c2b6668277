//! The identity manager's clock: the system clock in production, a shifted one in tests that
//! check clock skew (a node whose clock runs behind the CA's) without touching the real clock.
//! The same clock verifies peers in the TLS configs the manager builds.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::time_provider::TimeProvider;
use rustls_pki_types::UnixTime;

/// What time it is, for certificate checks and renewal scheduling.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The system clock moved by a fixed amount: `behind` true means it reads earlier than the
/// system clock (a node whose clock is slow).
#[derive(Debug, Clone, Copy)]
pub struct SkewedClock {
    /// How far it is off.
    pub offset: Duration,
    /// Whether it runs behind (true) or ahead (false).
    pub behind: bool,
}

impl Clock for SkewedClock {
    fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        if self.behind {
            now.checked_sub(self.offset)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            now + self.offset
        }
    }
}

/// A [`Clock`] as rustls' time provider, so TLS handshakes verify peers at the same time.
#[derive(Debug)]
pub(crate) struct ClockTime(pub(crate) Arc<dyn Clock>);

impl TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        unix_time(self.0.now())
    }
}

/// `t` as rustls' time type.
pub(crate) fn unix_time(t: SystemTime) -> Option<UnixTime> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(UnixTime::since_unix_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skewed_clock_is_offset() {
        let behind = SkewedClock {
            offset: Duration::from_secs(120),
            behind: true,
        };
        let slow = behind.now();
        let d = SystemTime::now().duration_since(slow).expect("behind");
        assert!(
            d >= Duration::from_secs(120) && d < Duration::from_secs(130),
            "{d:?}"
        );
        let t = ClockTime(Arc::new(behind)).current_time().expect("time");
        let sys = unix_time(SystemTime::now()).expect("now");
        assert!(sys.as_secs() - t.as_secs() >= 119);
    }
}
