//! The per-request context every stage reads and writes: who is calling (the connection), the
//! request id, the client address as hygiene established it, the authority, the matched route,
//! typed extensions filters leave for each other (the principal, the CORS origin…), headers to
//! add to whatever response goes back, and what the access log reports.
//!
//! It holds no policy: filters decide, the context only carries.

use std::{
    cell::Cell,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::{HeaderName, HeaderValue};
use meshgate_ca::spiffe::SpiffeId;
use rustls_pki_types::CertificateDer;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate (leaf), when the client presented one and it verified against
    /// the configured client CA (edge mTLS).
    pub client_cert: Option<Arc<CertificateDer<'static>>>,
    /// The verified SPIFFE ID of a mesh peer (tunnel connections only).
    pub peer_id: Option<SpiffeId>,
    /// For a workload peer: its service name and SPIFFE ID as text, computed once per
    /// connection (intentions look at them for every request).
    pub peer_workload: Option<(Arc<str>, Arc<str>)>,
    /// For requests nested in a tunnel CONNECT stream: the service that stream was opened to
    /// (the requests may not name another one).
    pub bound_service: Option<Arc<str>>,
    /// Keeps the connection from counting as idle (set by the front).
    pub hold: Option<super::front::ConnHold>,
}

impl ConnInfo {
    /// Sets the verified mesh peer (and, for a workload, its service and ID text).
    pub fn set_peer(&mut self, id: Option<SpiffeId>) {
        self.peer_workload = id.as_ref().and_then(|id| match id.subject() {
            meshgate_ca::spiffe::Subject::Workload { service, .. } => Some((
                Arc::from(service.as_str()),
                Arc::from(id.to_string().as_str()),
            )),
            _ => None,
        });
        self.peer_id = id;
    }

    /// A connection from `peer`, plain, without certificates.
    pub fn plain(peer: SocketAddr) -> Self {
        Self {
            peer,
            tls: false,
            client_cert: None,
            peer_id: None,
            peer_workload: None,
            bound_service: None,
            hold: None,
        }
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    crate::rand::secure_u64() | 1
}

/// A fast per-thread xorshift draw, for request ids, trace ids and balancing rolls (not for
/// secrets: nothing that guards access is derived from it).
pub fn fast_rand() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        x
    })
}

/// Per-request state, created by the pipeline for every request.
#[derive(Debug)]
pub struct Ctx {
    /// The request id (from a trusted client, else generated).
    pub request_id: String,
    /// The connection the request came on.
    pub conn: Arc<ConnInfo>,
    /// When the request head was handed to the pipeline.
    pub started: Instant,
    /// The client address: the TCP peer, or what hygiene derived from a trusted
    /// `X-Forwarded-For` chain.
    pub client_ip: IpAddr,
    /// The request's authority (`Host`, or HTTP/2 `:authority`), as sent.
    pub authority: String,
    /// Whether the caller speaks gRPC (local answers are then gRPC statuses).
    pub grpc: bool,
    /// The request method.
    pub method: http::Method,
    /// Whether the request has a body (HTTP/2 bodies without `Content-Length` included).
    pub has_body: bool,
    /// The matched route's name, once resolved.
    pub route: Option<Arc<str>>,
    /// Values filters leave for later filters and the action (principal, CORS origin, template
    /// captures…), by type.
    pub extensions: http::Extensions,
    /// Headers added to the response, whatever answers (upstream or a local refusal).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the request went, for the access log (`service` or a URL host).
    pub upstream: Option<Arc<str>>,
    /// The endpoint that answered.
    pub endpoint: Option<SocketAddr>,
    /// Why meshgate answered itself (a problem slug), for the access log.
    pub local_reason: Option<&'static str>,
    /// The `traceparent` this hop sends on (hygiene sets it at the gateway; the access log
    /// and the trace read it). Only filled in when something reads it.
    pub traceparent: Option<String>,
    /// Who authenticated (API key consumer or JWT subject), for the access log.
    pub consumer: Option<String>,
    /// How long the upstream exchange took (set by the proxy action), for metrics.
    pub upstream_duration: Option<std::time::Duration>,
    /// The request's server span, when tracing is on (None costs nothing).
    pub otel: Option<crate::telemetry::otel::TraceCx>,
}

impl Ctx {
    /// A fresh context for a request on `conn`.
    pub fn new(conn: Arc<ConnInfo>) -> Self {
        let client_ip = conn.peer.ip();
        Self {
            request_id: String::new(),
            conn,
            started: Instant::now(),
            client_ip,
            authority: String::new(),
            grpc: false,
            method: http::Method::GET,
            has_body: false,
            route: None,
            extensions: http::Extensions::new(),
            response_headers: Vec::new(),
            upstream: None,
            endpoint: None,
            local_reason: None,
            traceparent: None,
            consumer: None,
            upstream_duration: None,
            otel: None,
        }
    }

    /// Adds a header to whatever response this request gets.
    pub fn add_response_header(&mut self, name: HeaderName, value: HeaderValue) {
        self.response_headers.push((name, value));
    }

    /// A request id: 32 lowercase hex characters.
    pub fn new_request_id() -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, fast_rand());
        push_hex(&mut s, fast_rand());
        s
    }
}

/// Appends `v` as 16 lowercase hex digits (request and trace ids are made per request; this
/// skips the formatting machinery).
pub fn push_hex(out: &mut String, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out.push_str(std::str::from_utf8(&buf).expect("invariant: hex digits are ASCII"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_matches_the_formatter() {
        for v in [0u64, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            let mut s = String::new();
            super::push_hex(&mut s, v);
            assert_eq!(s, format!("{v:016x}"));
        }
        assert_eq!(super::Ctx::new_request_id().len(), 32);
    }
}
