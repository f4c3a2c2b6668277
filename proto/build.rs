//! Compiles the .proto files without a `protoc` binary: `protox` (pure Rust) parses them into a
//! FileDescriptorSet and `tonic-prost-build` generates messages and client/server code from it.
use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/meshgate/ca/v1/ca.proto",
    "proto/meshgate/test/v1/echo.proto",
    "proto/demo/orders/v1/orders.proto",
    "proto/google/rpc/status.proto",
    "proto/google/rpc/error_details.proto",
];
const INCLUDES: &[&str] = &["proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(INCLUDES)?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?;
    std::fs::write(
        out.join("meshgate_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // compile_protos adds this itself; compile_fds does not
        .type_attribute(".", "#[allow(clippy::all)]")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
