//! Everything that touches sockets and TLS for the data plane: the HBONE-style tunnel
//! ([`hbone`]) and byte splicing ([`forward`]).

pub mod forward;
pub mod hbone;

/// Listen backlog for every listener: bursts of new connections (a thousand clients at once)
/// queue in the kernel instead of being reset; Linux caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with SO_REUSEADDR and [`BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What [`raise_fd_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before.
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every connection is a descriptor (two
/// for a proxied one), and the usual soft default of 1024 fails clients long before the machine
/// is busy. Returns the limits before and after; an error leaves the limit as it was.
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    if cur.current == cur.maximum {
        return Ok(FdLimit {
            before: cur.current,
            now: cur.current,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: cur.maximum,
            maximum: cur.maximum,
        },
    )?;
    Ok(FdLimit {
        before: cur.current,
        now: getrlimit(Resource::Nofile).current,
    })
}
