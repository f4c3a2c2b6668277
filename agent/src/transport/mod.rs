//! Everything that touches sockets and TLS for the data plane: the HBONE-style tunnel
//! ([`hbone`]) and byte splicing ([`forward`]).

pub mod forward;
pub mod hbone;
