//! systemd readiness notification (`sd_notify`): `READY=1`, `RELOADING=1` and `STOPPING=1`
//! datagrams to the socket named by `$NOTIFY_SOCKET`, for units with `Type=notify`.
//!
//! Dependency-free: one `AF_UNIX` datagram per message over [`UnixDatagram`], to a path or, for
//! names that start with `@`, to a Linux abstract socket. Without `$NOTIFY_SOCKET` (not started
//! by systemd, or a unit type that does not listen) every call is a no-op. It only reports
//! state; it never decides when a process is ready (its callers do) and opens no listener.
//!
//! ```no_run
//! let notifier = meshgate_agent::notify::Notifier::from_env().ok().flatten();
//! if let Some(n) = &notifier {
//!     let _ = n.ready("serving");
//! }
//! ```

use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    path::PathBuf,
};

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` names something other than a path or an `@abstract` name (for
    /// example systemd's `vsock:` form, which this implementation does not speak).
    #[error(
        "NOTIFY_SOCKET {0:?} is neither an absolute path nor an @abstract socket name; only those are supported"
    )]
    Unsupported(String),
    /// The datagram could not be sent.
    #[error("cannot notify systemd at {socket}: {source}")]
    Send {
        /// The socket, as `$NOTIFY_SOCKET` names it.
        socket: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends state changes to the service manager's notification socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    name: String,
    target: Target,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`; `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Self::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `socket`: an absolute path, or `@name` for the abstract name `name`.
    pub fn new(socket: &str) -> Result<Self, NotifyError> {
        let target = if let Some(name) = socket.strip_prefix('@') {
            if name.is_empty() {
                return Err(NotifyError::Unsupported(socket.to_owned()));
            }
            Target::Abstract(name.as_bytes().to_vec())
        } else if socket.starts_with('/') {
            Target::Path(PathBuf::from(socket))
        } else {
            return Err(NotifyError::Unsupported(socket.to_owned()));
        };
        Ok(Self {
            name: socket.to_owned(),
            target,
        })
    }

    /// Sends `message` (newline-separated `KEY=VALUE` assignments) as one datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let err = |source| NotifyError::Send {
            socket: self.name.clone(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        let sent = match &self.target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = SocketAddr::from_abstract_name(name).map_err(err)?;
                sock.send_to_addr(message.as_bytes(), &addr)
            }
        }
        .map_err(err)?;
        if sent != message.len() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            )));
        }
        Ok(())
    }

    /// Start-up (or a reload) is complete: `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&ready_message(status))
    }

    /// A reload has begun: `RELOADING=1` with `MONOTONIC_USEC`; send [`Notifier::ready`]
    /// when it is done, whatever its outcome.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        self.send(&reloading_message(monotonic_usec_upper_bound()))
    }

    /// Shutdown (drain) has begun: `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&stopping_message(status))
    }
}

fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// `READY=1` and `STATUS=` (newlines in `status` become spaces).
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", one_line(status))
}

/// `STOPPING=1` and `STATUS=`.
pub fn stopping_message(status: &str) -> String {
    format!("STOPPING=1\nSTATUS={}\n", one_line(status))
}

/// `RELOADING=1`, `MONOTONIC_USEC=` and a status line.
pub fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=reloading\n")
}

/// A value of `CLOCK_MONOTONIC` in microseconds that is never below the true one.
///
/// The standard library exposes no absolute monotonic time, so this reads `/proc/uptime`
/// (`CLOCK_BOOTTIME`, which equals `CLOCK_MONOTONIC` plus time spent suspended, so it never
/// runs behind) and rounds its 10 ms resolution up. systemd (v253+) uses the value only to check
/// that a `RELOADING=1` was sent after the reload it asked for began, which an upper bound
/// always satisfies. Returns 0 when `/proc/uptime` cannot be read (older systemd ignores the
/// field; newer may then wait for its reload timeout).
pub fn monotonic_usec_upper_bound() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| parse_uptime_usec(&s))
        .unwrap_or(0)
}

/// `/proc/uptime`'s first field (`SECONDS.CC`) in microseconds, rounded up by its resolution.
fn parse_uptime_usec(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    let digits = frac.len().min(6);
    let frac_usec = if digits == 0 {
        0
    } else {
        let v: u64 = frac[..digits].parse().ok()?;
        v * 10u64.pow(u32::try_from(6 - digits).ok()?)
    };
    let resolution = 10u64.pow(u32::try_from(6 - digits).ok()?);
    Some(secs * 1_000_000 + frac_usec + resolution)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::new(path.to_str().expect("utf8")).expect("path socket");
        n.ready("serving 3 routes").expect("ready");
        assert_eq!(recv(&server), "READY=1\nSTATUS=serving 3 routes\n");
        n.stopping("draining").expect("stopping");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=draining\n");
        n.reloading().expect("reloading");
        let msg = recv(&server);
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        let usec: u64 = msg
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("field")
            .parse()
            .expect("number");
        assert!(usec > 0, "{msg}");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!(
            "meshgate-notify-test-{}-{}",
            std::process::id(),
            crate::rand::secure_u64() & 0xffff_ffff_ffff
        );
        let server = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("name"),
        )
        .expect("bind abstract");
        let n = Notifier::new(&format!("@{name}")).expect("abstract socket");
        n.ready("up\nsecond line").expect("ready");
        assert_eq!(recv(&server), "READY=1\nSTATUS=up second line\n");
    }

    #[test]
    fn refuses_what_it_cannot_speak_and_reports_send_failures() {
        for bad in ["vsock:2:1234", "relative/path", "@"] {
            let e = Notifier::new(bad).expect_err(bad);
            assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("nobody-listens.sock");
        let n = Notifier::new(gone.to_str().expect("utf8")).expect("path");
        let e = n.ready("x").expect_err("no listener");
        assert!(e.to_string().contains("nobody-listens.sock"), "{e}");
    }

    #[test]
    fn uptime_is_rounded_up_to_its_resolution() {
        for (text, want) in [
            ("12345.67 54321.00\n", 12_345_680_000),
            ("0.00 0.00", 10_000),
            ("7 1", 8_000_000),
            ("1.5", 1_600_000),
        ] {
            assert_eq!(parse_uptime_usec(text), Some(want), "{text:?}");
        }
        assert_eq!(parse_uptime_usec(""), None);
        assert_eq!(parse_uptime_usec("x.y"), None);
        // never behind the process's own view of time since boot
        assert!(monotonic_usec_upper_bound() > 0);
    }
}
