//! Telemetry of a meshgate process: metrics ([`metrics`]), the JSON access log ([`access`]),
//! OpenTelemetry traces ([`otel`]).
//!
//! The access log is its own sink, separate from the diagnostic log that `--log` filters: on by
//! default for the gateway, off for node agents (`telemetry.access_log` in either config).

pub mod access;
pub mod metrics;
pub mod otel;
pub mod peers;

pub use metrics::{DenyReason, DestinationRefusal, Direction, Metrics, StreamGuard};

use serde::{Deserialize, Serialize};

/// The `telemetry` block of `agent.yaml` and `gateway.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// JSON access log: one line per request (and per L4 tunnel stream on agents).
    #[serde(default)]
    pub access_log: access::AccessLogConfig,
    /// OpenTelemetry traces over OTLP; off unless an endpoint is set here or in the
    /// environment (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[serde(default)]
    pub tracing: otel::TracingConfig,
}
