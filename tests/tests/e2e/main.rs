//! meshgate end-to-end tests: real sockets, real TLS and real gRPC on loopback, port 0
//! everywhere. One binary for every suite to save link time.

mod agent;
mod auth;
mod bff;
mod bodies;
mod clients;
mod consul;
mod consul_standin;
mod dns;
mod edge;
mod gateway;
mod grpc;
mod gw_harness;
mod ha_lab;
mod harness;
mod identity;
mod jwt_cache;
mod load;
mod mesh;
mod observability;
mod paths;
mod tls_profile;
mod transcode;
mod trust;
