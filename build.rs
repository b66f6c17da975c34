//! Compiles the public contract in `proto/` with a vendored `protoc`, so a plain
//! `cargo build` needs no system package, and emits the file descriptor set that
//! server reflection serves (grpcurl works with no .proto files at hand).

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/keybroker/v1/broker.proto",
    "proto/keybroker/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // INVALID_ARGUMENT, not INTERNAL, for a body that is not protobuf.
        .codec_path("crate::api::codec::StrictProstCodec")
        // Per-item statuses of the batch RPCs: tonic's own google.rpc.Status
        // (proto/google/rpc is vendored only for protoc to read).
        .extern_path(".google.rpc.Status", "::tonic_types::Status")
        // Contexts decode straight into the sorted map `Context` keeps (no
        // hashing, no second map per request).
        .btree_map(".keybroker.v1")
        // The hot path's bytes without a copy: a batch item's wrapped key is
        // a slice of the request body, and an answer's plaintext is the
        // cached key itself (no second, unzeroized copy of it in the heap).
        .bytes(".keybroker.v1.UnwrapKeyRequest.wrapped_key")
        .bytes(".keybroker.v1.UnwrapKeyResponse.plaintext")
        .bytes(".keybroker.v1.GenerateDataKeyResponse.plaintext")
        // Secrets in requests get a redacting Debug (src/lib.rs).
        .skip_debug([
            ".keybroker.v1.VaultAppRole",
            ".keybroker.v1.ImportKeyMaterialRequest",
        ])
        .file_descriptor_set_path(out_dir.join("keybroker_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=proto/google/rpc/status.proto");
    // sqlx::migrate! embeds the migrations: a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
