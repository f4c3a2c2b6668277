//! Protobuf definitions and generated gRPC code, nothing else.
//!
//! - [`ca::v1`]: the certificate authority API (`JoinNode`, `RenewNode`, `SignWorkload`,
//!   `TrustBundle`, `ReportBundle`), served by `meshgate ca serve` and called by every agent
//!   and gateway.
//! - [`test::v1`]: `Echo`, the four gRPC call kinds, for end-to-end tests only (not an API).

/// The certificate authority API.
pub mod ca {
    /// Version 1 of the CA API.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub)]
        tonic::include_proto!("meshgate.ca.v1");
    }
}

/// Services used only by tests.
pub mod test {
    /// Version 1 of the test services: `Echo` (unary, server-, client- and bidi-streaming).
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub)]
        tonic::include_proto!("meshgate.test.v1");
    }
}

/// The encoded FileDescriptorSet of every .proto file in this crate (with imports).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meshgate_descriptor.bin"));
