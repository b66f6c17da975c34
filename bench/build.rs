//! Compiles the floor server's one-RPC service with a vendored `protoc`.

use std::path::PathBuf;

const FLOOR_PROTO: &str = "proto/floor.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The same map type as keybroker's contexts: the floor decodes what
    // keybroker decodes, the same way.
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_with_config(
            config,
            &[PathBuf::from(FLOOR_PROTO)],
            &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed={FLOOR_PROTO}");
    Ok(())
}
