//! Protobuf definitions and generated gRPC code, nothing else.
//!
//! - [`ca::v1`]: the certificate authority API (`JoinNode`, `RenewNode`, `SignWorkload`,
//!   `TrustBundle`, `ReportBundle`), served by `meshgate ca serve` and called by every agent
//!   and gateway.
//! - [`test::v1`]: `Echo`, the four gRPC call kinds, for end-to-end tests only (not an API).
//! - [`demo::orders::v1`]: `Orders`, the demo service `meshgate dev` transcodes (REST/JSON via
//!   `google.api.http` rules, a server-streaming method).
//! - [`google`]: the vendored `google/api` (http rules) and `google/rpc` (status, error details)
//!   files, as sources for the gateway's run-time proto compiler and as generated types.

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

/// The demo services.
pub mod demo {
    /// The source of `demo/orders/v1/orders.proto`, for `meshgate dev` to give the gateway's
    /// run-time proto compiler (as a user's own files would be).
    pub const ORDERS_PROTO: &str = include_str!("../proto/demo/orders/v1/orders.proto");

    /// The demo shop.
    pub mod orders {
        /// Version 1 of the demo Orders API.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub)]
            tonic::include_proto!("demo.orders.v1");
        }
    }
}

/// Google's API and RPC definitions that protox does not ship (it has only the well-known
/// types): their `.proto` sources, for resolving imports at run time, and generated types.
pub mod google {
    /// `google.rpc`: `Status` and the standard error details.
    pub mod rpc {
        #![allow(missing_docs, unreachable_pub)]
        tonic::include_proto!("google.rpc");
    }

    /// `(name, source)` of every vendored file, as an `import` names it.
    pub const SOURCES: &[(&str, &str)] = &[
        (
            "google/api/annotations.proto",
            include_str!("../proto/google/api/annotations.proto"),
        ),
        (
            "google/api/http.proto",
            include_str!("../proto/google/api/http.proto"),
        ),
        (
            "google/rpc/status.proto",
            include_str!("../proto/google/rpc/status.proto"),
        ),
        (
            "google/rpc/error_details.proto",
            include_str!("../proto/google/rpc/error_details.proto"),
        ),
    ];
}

/// The encoded FileDescriptorSet of every .proto file in this crate (with imports).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meshgate_descriptor.bin"));
