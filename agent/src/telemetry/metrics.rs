//! The process's metrics (Prometheus text via prometheus-client), named `meshgate_<area>_<name>`
//! with small, bounded label sets. docs/metrics.md lists every one; a test keeps it complete.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// Latency buckets (seconds) of every meshgate duration histogram: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A family of latency histograms.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A new, empty family of latency histograms.
pub fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(latency_histogram)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    service: String,
    rule: String,
}

/// Which side of the tunnel a metric is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Upstream listeners -> remote agents.
    Outbound,
    /// Remote agents -> local services.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Why a tunnel stream or request was refused on the inbound side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// An L4 intention (or the default) denied the source.
    Policy,
    /// An L7 rule denied one HTTP request.
    L7Policy,
    /// The CONNECT named a service that does not run on this node.
    UnknownService,
    /// The peer's certificate is not a workload SVID.
    NotWorkload,
}

impl DenyReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Policy => "policy",
            DenyReason::L7Policy => "l7_policy",
            DenyReason::UnknownService => "unknown_service",
            DenyReason::NotWorkload => "not_workload",
        }
    }
}

/// Why the outbound side refused a destination agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationRefusal {
    /// The server presented a valid SVID of another node than the one the endpoint names (or
    /// one the hosting map does not allow for the service).
    WrongIdentity,
    /// The node discovery names may not host the service (the hosting map says so).
    NotHosting,
    /// The node is revoked.
    Revoked,
    /// The trust bundle carries no hosting map yet, so no unpinned endpoint can be verified.
    NoHostingMap,
}

impl DestinationRefusal {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationRefusal::WrongIdentity => "wrong_identity",
            DestinationRefusal::NotHosting => "not_hosting",
            DestinationRefusal::Revoked => "revoked",
            DestinationRefusal::NoHostingMap => "no_hosting_map",
        }
    }
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tunnel_connections: Family<Labels, Counter>,
    tunnel_connections_active: Family<Labels, Gauge>,
    tunnel_streams: Family<Labels, Counter>,
    tunnel_streams_active: Family<Labels, Gauge>,
    tunnel_bytes: Family<Labels, Counter>,
    handshake_failures: Family<Labels, Counter>,
    authz_denials: Family<Labels, Counter>,
    connect_failures: Family<Labels, Counter>,
    cert_expiry: Family<Labels, Gauge>,
    cert_at_risk: Family<Labels, Gauge>,
    intermediate_expiry: Gauge,
    bundle_sequence: Gauge,
    destination_refusals: Family<Labels, Counter>,
    tunnel_cut_offs: Family<Labels, Counter>,
    renew_failures: Gauge,
    ready: Gauge,
    discovery_endpoints: Family<Labels, Gauge>,
    discovery_stale: Family<Labels, Gauge>,
    discovery_errors: Family<Labels, Counter>,
    http_connections: Family<Labels, Counter>,
    http_connections_active: Family<Labels, Gauge>,
    http_connections_refused: Family<Labels, Counter>,
    http_reset_floods: Family<Labels, Counter>,
    access_log_dropped: Counter,
    tracing_export: super::otel::ExportCounters,
    authz_rule_denials: Family<RuleLabel, Counter>,
    tunnel_connect_duration: Histogram,
    handshake_duration: LatencyFamily<DirectionLabel>,
    /// The tunnel connections open now (for `/status`, not exported as metrics).
    pub peers: super::peers::Peers,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, plus what `extra` registers (metrics of
    /// a composition such as the gateway).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut m = Self::new();
        extra(&mut m.registry);
        m
    }

    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            tunnel_connections: Family::default(),
            tunnel_connections_active: Family::default(),
            tunnel_streams: Family::default(),
            tunnel_streams_active: Family::default(),
            tunnel_bytes: Family::default(),
            handshake_failures: Family::default(),
            authz_denials: Family::default(),
            connect_failures: Family::default(),
            cert_expiry: Family::default(),
            cert_at_risk: Family::default(),
            intermediate_expiry: Gauge::default(),
            bundle_sequence: Gauge::default(),
            destination_refusals: Family::default(),
            tunnel_cut_offs: Family::default(),
            renew_failures: Gauge::default(),
            ready: Gauge::default(),
            discovery_endpoints: Family::default(),
            discovery_stale: Family::default(),
            discovery_errors: Family::default(),
            http_connections: Family::default(),
            http_connections_active: Family::default(),
            http_connections_refused: Family::default(),
            http_reset_floods: Family::default(),
            access_log_dropped: Counter::default(),
            tracing_export: Default::default(),
            authz_rule_denials: Family::default(),
            tunnel_connect_duration: latency_histogram(),
            handshake_duration: latency_family(),
            peers: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "meshgate_tunnel_connections",
            "mTLS tunnel connections established",
            m.tunnel_connections.clone(),
        );
        registry.register(
            "meshgate_tunnel_connections_active",
            "mTLS tunnel connections open now",
            m.tunnel_connections_active.clone(),
        );
        registry.register(
            "meshgate_tunnel_streams",
            "tunnel streams (one per application connection)",
            m.tunnel_streams.clone(),
        );
        registry.register(
            "meshgate_tunnel_streams_active",
            "tunnel streams open now",
            m.tunnel_streams_active.clone(),
        );
        registry.register(
            "meshgate_tunnel_bytes",
            "bytes carried, by direction and flow (sent = towards the service)",
            m.tunnel_bytes.clone(),
        );
        registry.register(
            "meshgate_tunnel_handshake_failures",
            "TLS handshakes that failed",
            m.handshake_failures.clone(),
        );
        registry.register(
            "meshgate_authz_denials",
            "connections or requests refused, by reason",
            m.authz_denials.clone(),
        );
        registry.register(
            "meshgate_upstream_connect_failures",
            "failed attempts to open a tunnel stream, by service",
            m.connect_failures.clone(),
        );
        registry.register(
            "meshgate_identity_cert_expiry_seconds",
            "seconds until each held certificate expires",
            m.cert_expiry.clone(),
        );
        registry.register(
            "meshgate_identity_cert_at_risk",
            "1 while a held certificate has expired, or is in the last quarter of its lifetime and renewing it fails",
            m.cert_at_risk.clone(),
        );
        registry.register(
            "meshgate_identity_intermediate_expiry_seconds",
            "seconds until the CA's signing intermediate (the one in this node's certificate chain) expires; the CA warns at 30 days",
            m.intermediate_expiry.clone(),
        );
        registry.register(
            "meshgate_identity_bundle_sequence",
            "sequence number of the trust bundle this process holds",
            m.bundle_sequence.clone(),
        );
        registry.register(
            "meshgate_tunnel_destination_refusals",
            "destination agents refused before or in the handshake, by reason (wrong_identity, not_hosting, revoked, no_hosting_map)",
            m.destination_refusals.clone(),
        );
        registry.register(
            "meshgate_tunnel_cut_offs",
            "tunnel connections closed because the peer's certificate stopped being trusted, by direction and reason (expired, untrusted, revoked, not_allowed)",
            m.tunnel_cut_offs.clone(),
        );
        registry.register(
            "meshgate_identity_renewal_failures",
            "failed certificate renewal attempts since start",
            m.renew_failures.clone(),
        );
        registry.register(
            "meshgate_agent_ready",
            "1 once certificates are held and listeners bound",
            m.ready.clone(),
        );
        registry.register(
            "meshgate_discovery_endpoints",
            "endpoints known per upstream service",
            m.discovery_endpoints.clone(),
        );
        registry.register(
            "meshgate_discovery_stale",
            "1 while a service's source fails and its last good endpoints are in use",
            m.discovery_stale.clone(),
        );
        registry.register(
            "meshgate_http_connections",
            "HTTP connections accepted, by listener",
            m.http_connections.clone(),
        );
        registry.register(
            "meshgate_http_connections_active",
            "HTTP connections open now, by listener",
            m.http_connections_active.clone(),
        );
        registry.register(
            "meshgate_http_connections_refused",
            "connections closed at accept, by listener and reason (limit)",
            m.http_connections_refused.clone(),
        );
        registry.register(
            "meshgate_http_reset_floods",
            "connections cut off for cancelling streams faster than they complete, by listener",
            m.http_reset_floods.clone(),
        );
        registry.register(
            "meshgate_authz_rule_denials",
            "requests and streams denied by intentions, by local service and deciding rule (#N: its index in authz.rules counting from 0, as `rule #N` in logs; default: no rule matched)",
            m.authz_rule_denials.clone(),
        );
        registry.register(
            "meshgate_tunnel_connect_duration_seconds",
            "time to open an outbound tunnel connection: TCP connect, mTLS handshake and HTTP/2 handshake",
            m.tunnel_connect_duration.clone(),
        );
        registry.register(
            "meshgate_tls_handshake_duration_seconds",
            "completed TLS handshakes by direction (outbound: tunnel dials; inbound: the mesh port; edge: the gateway's HTTPS listener)",
            m.handshake_duration.clone(),
        );
        registry.register(
            "meshgate_access_log_dropped",
            "access records dropped because the writer fell behind (the queue was full)",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "meshgate_tracing_spans_exported",
            "spans the OTLP collector accepted",
            m.tracing_export.exported.clone(),
        );
        registry.register(
            "meshgate_tracing_export_failures",
            "OTLP exports that failed (collector unreachable or refusing); their spans are lost",
            m.tracing_export.failures.clone(),
        );
        registry.register(
            "meshgate_tracing_spans_lost",
            "spans in failed OTLP exports",
            m.tracing_export.lost.clone(),
        );
        registry.register("meshgate_discovery_errors", "discovery and registration errors, by source and kind (unreachable, token, permission, status, decode, lookup)", m.discovery_errors.clone());
        Self { registry, ..m }
    }

    fn dir(d: Direction) -> Labels {
        vec![("direction", d.as_str().to_owned())]
    }

    /// A tunnel connection opened; call [`Metrics::tunnel_closed`] when it closes.
    pub fn tunnel_opened(&self, d: Direction) {
        self.tunnel_connections.get_or_create(&Self::dir(d)).inc();
        self.tunnel_connections_active
            .get_or_create(&Self::dir(d))
            .inc();
    }

    /// A tunnel connection closed.
    pub fn tunnel_closed(&self, d: Direction) {
        self.tunnel_connections_active
            .get_or_create(&Self::dir(d))
            .dec();
    }

    /// A stream opened; the guard marks it closed on drop.
    pub fn stream(self: &Arc<Self>, d: Direction) -> StreamGuard {
        self.tunnel_streams.get_or_create(&Self::dir(d)).inc();
        self.tunnel_streams_active
            .get_or_create(&Self::dir(d))
            .inc();
        StreamGuard {
            metrics: self.clone(),
            direction: d,
        }
    }

    /// Bytes carried towards the service (`sent`) and back (`received`).
    pub fn bytes(&self, d: Direction, sent: u64, received: u64) {
        let mut l = Self::dir(d);
        l.push(("flow", "sent".into()));
        self.tunnel_bytes.get_or_create(&l).inc_by(sent);
        l[1].1 = "received".into();
        self.tunnel_bytes.get_or_create(&l).inc_by(received);
    }

    /// A TLS handshake failed.
    pub fn handshake_failed(&self, d: Direction) {
        self.handshake_failures.get_or_create(&Self::dir(d)).inc();
    }

    /// An inbound refusal.
    pub fn denied(&self, reason: DenyReason) {
        self.authz_denials
            .get_or_create(&vec![("reason", reason.as_str().to_owned())])
            .inc();
    }

    /// An intention denied traffic to local `service`; `rule` is the deciding rule's index
    /// into `authz.rules`, from 0 as in `rule #N` log text (`None`: the default applied).
    pub fn denied_by_rule(&self, service: &str, rule: Option<usize>) {
        let rule = match rule {
            Some(i) => format!("#{i}"),
            None => "default".to_owned(),
        };
        self.authz_rule_denials
            .get_or_create(&RuleLabel {
                service: service.to_owned(),
                rule,
            })
            .inc();
    }

    /// An outbound tunnel connection took `d` to open.
    pub fn tunnel_connected(&self, d: std::time::Duration) {
        self.tunnel_connect_duration.observe(d.as_secs_f64());
    }

    /// A TLS handshake completed in `d`; `direction` is `outbound`, `inbound` or `edge`.
    pub fn handshake_done(&self, direction: &'static str, d: std::time::Duration) {
        self.handshake_duration
            .get_or_create(&DirectionLabel { direction })
            .observe(d.as_secs_f64());
    }

    /// An outbound attempt to reach `service` failed.
    pub fn connect_failed(&self, service: &str) {
        self.connect_failures
            .get_or_create(&vec![("service", service.to_owned())])
            .inc();
    }

    /// Sets the per-certificate expiry gauge.
    pub fn set_cert_expiry(&self, spiffe_id: &str, seconds: i64) {
        self.cert_expiry
            .get_or_create(&vec![("spiffe_id", spiffe_id.to_owned())])
            .set(seconds);
    }

    /// Sets whether a certificate is at risk (expired, or near expiry while renewal fails).
    pub fn set_cert_at_risk(&self, spiffe_id: &str, at_risk: bool) {
        self.cert_at_risk
            .get_or_create(&vec![("spiffe_id", spiffe_id.to_owned())])
            .set(i64::from(at_risk));
    }

    /// Sets the seconds left on the signing intermediate.
    pub fn set_intermediate_expiry(&self, seconds: i64) {
        self.intermediate_expiry.set(seconds);
    }

    /// Sets the held bundle's sequence.
    pub fn set_bundle_sequence(&self, sequence: u64) {
        self.bundle_sequence
            .set(i64::try_from(sequence).unwrap_or(i64::MAX));
    }

    /// A destination agent was refused.
    pub fn destination_refused(&self, reason: DestinationRefusal) {
        self.destination_refusals
            .get_or_create(&vec![("reason", reason.as_str().to_owned())])
            .inc();
    }

    /// A tunnel connection was closed because its peer is no longer trusted.
    pub fn tunnel_cut_off(&self, d: Direction, reason: &'static str) {
        let mut l = Self::dir(d);
        l.push(("reason", reason.to_owned()));
        self.tunnel_cut_offs.get_or_create(&l).inc();
    }

    /// Sets the renewal failure gauge.
    pub fn set_renew_failures(&self, n: u64) {
        self.renew_failures
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// A service's endpoint count and freshness.
    pub fn discovery_update(&self, service: &str, endpoints: usize, stale: bool) {
        let l = vec![("service", service.to_owned())];
        self.discovery_endpoints
            .get_or_create(&l)
            .set(i64::try_from(endpoints).unwrap_or(i64::MAX));
        self.discovery_stale.get_or_create(&l).set(i64::from(stale));
    }

    /// A discovery or registration error.
    pub fn discovery_error(&self, source: &'static str, kind: &'static str) {
        self.discovery_errors
            .get_or_create(&vec![
                ("source", source.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    /// A connection was accepted on `listener`; call [`Metrics::connection_closed`] when it ends.
    pub fn connection_opened(&self, listener: &'static str) {
        let l = vec![("listener", listener.to_owned())];
        self.http_connections.get_or_create(&l).inc();
        self.http_connections_active.get_or_create(&l).inc();
    }

    /// A connection on `listener` ended.
    pub fn connection_closed(&self, listener: &'static str) {
        self.http_connections_active
            .get_or_create(&vec![("listener", listener.to_owned())])
            .dec();
    }

    /// A connection on `listener` was closed at accept.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.http_connections_refused
            .get_or_create(&vec![
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// A connection on `listener` was cut off for a reset flood.
    pub fn reset_flood(&self, listener: &'static str) {
        self.http_reset_floods
            .get_or_create(&vec![("listener", listener.to_owned())])
            .inc();
    }

    /// The counter of dropped access records, for [`super::access::AccessLog::start`].
    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// The counters the trace exporter moves (shared handles).
    pub fn tracing_export(&self) -> super::otel::ExportCounters {
        self.tracing_export.clone()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("invariant: writing to a String cannot fail");
        out
    }
}

/// Marks a stream closed on drop.
#[derive(Debug)]
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .tunnel_streams_active
            .get_or_create(&Metrics::dir(self.direction))
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_names_and_labels() {
        let m = Arc::new(Metrics::new());
        m.tunnel_opened(Direction::Outbound);
        {
            let _s = m.stream(Direction::Inbound);
            m.bytes(Direction::Inbound, 10, 20);
        }
        m.denied(DenyReason::Policy);
        let text = m.encode();
        for want in [
            r#"meshgate_tunnel_connections_total{direction="outbound"} 1"#,
            r#"meshgate_tunnel_streams_total{direction="inbound"} 1"#,
            r#"meshgate_tunnel_streams_active{direction="inbound"} 0"#,
            r#"meshgate_tunnel_bytes_total{direction="inbound",flow="received"} 20"#,
            r#"meshgate_authz_denials_total{reason="policy"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
