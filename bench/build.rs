//! Generates the benchmark service's gRPC code with the vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &["proto/bench.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
