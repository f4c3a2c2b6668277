//! The tunnel connections open now, each with its remote address, the identity it proved and
//! its transport, for `/status` and `meshgate status`. A connection is in the table from its
//! completed handshake until it closes (the guard removes it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

use super::Direction;

/// One open tunnel connection.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// `outbound` (this process dialled) or `inbound` (accepted on the mesh port).
    pub direction: &'static str,
    /// The remote address.
    pub address: SocketAddr,
    /// The SPIFFE ID the peer's certificate proved (empty if it had none).
    pub identity: String,
    /// How it is carried, e.g. `HBONE: HTTP/2 over mTLS (TLSv1.3)`.
    pub transport: String,
    /// When it was established (RFC 3339).
    pub since: String,
}

/// The table; cheap to share.
#[derive(Debug, Default)]
pub struct Peers {
    open: Arc<Mutex<BTreeMap<u64, PeerView>>>,
    next: AtomicU64,
}

/// Keeps a connection in the table until dropped.
#[derive(Debug)]
pub struct PeerGuard {
    open: Arc<Mutex<BTreeMap<u64, PeerView>>>,
    id: u64,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Peers {
    /// A connection to or from `address` whose peer proved `identity` is open; it stays listed
    /// while the guard lives.
    pub fn opened(
        &self,
        direction: Direction,
        address: SocketAddr,
        identity: String,
        tls: Option<&'static str>,
    ) -> PeerGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let transport = match tls {
            Some(v) => format!("HBONE: HTTP/2 over mTLS ({v})"),
            None => "HBONE: HTTP/2 over mTLS".to_owned(),
        };
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                PeerView {
                    direction: direction.as_str(),
                    address,
                    identity,
                    transport,
                    since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                },
            );
        PeerGuard {
            open: self.open.clone(),
            id,
        }
    }

    /// The connections open now, oldest first.
    pub fn snapshot(&self) -> Vec<PeerView> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_until_its_guard_drops() {
        let p = Peers::default();
        let a = p.opened(
            Direction::Outbound,
            "127.0.0.1:15008".parse().expect("addr"),
            "spiffe://td/ns/default/svc/users".into(),
            Some("TLSv1.3"),
        );
        let b = p.opened(
            Direction::Inbound,
            "127.0.0.1:40000".parse().expect("addr"),
            String::new(),
            None,
        );
        let s = p.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].direction, "outbound");
        assert_eq!(s[0].transport, "HBONE: HTTP/2 over mTLS (TLSv1.3)");
        drop(a);
        let s = p.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].direction, "inbound");
        drop(b);
        assert!(p.snapshot().is_empty());
    }
}
