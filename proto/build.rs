//! Generates Rust code for the protocol files with `protoc`.
//!
//! `protoc` comes from Debian's `protobuf-compiler` (installed by
//! `scripts/setup`) or from the `PROTOC` environment variable.

use std::path::Path;
use std::process::Command;

const PROTOS: &[&str] = &[
    "proto/tidemark/v1/usage.proto",
    "proto/tidemark/v1/ingest.proto",
    "proto/tidemark/v1/scaling.proto",
    "proto/tidemark/v1/billing.proto",
    "proto/externalscaler/externalscaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    if Command::new(&protoc).arg("--version").output().is_err() {
        return Err(format!(
            "cannot run the protocol buffer compiler `{}`: install Debian's `protobuf-compiler` \
             (scripts/setup does) or set PROTOC to its path",
            Path::new(&protoc).display()
        )
        .into());
    }
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
