//! Generates the tonic/prost code from `proto/`. Uses the protoc binary that
//! the `protoc-bin-vendored` crate ships, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("twopc_descriptor.bin")).compile_with_config(
        config,
        &["proto/twopc/v1/twopc.proto", "proto/twopc/v1/log.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
