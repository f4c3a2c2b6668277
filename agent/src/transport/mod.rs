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
