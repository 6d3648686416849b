//! Generates the certificate service's gRPC code when the `ca-proto` feature is on, with a
//! vendored protoc so that no system package is needed.

fn main() {
    #[cfg(feature = "ca-proto")]
    generate();
}

#[cfg(feature = "ca-proto")]
fn generate() {
    println!("cargo:rerun-if-changed=proto/mesh/ca/v1/ca.proto");
    let protoc = match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => path,
        Err(e) => panic!("no vendored protoc for this platform: {e}"),
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    if let Err(e) = tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/mesh/ca/v1/ca.proto"],
        &["proto"],
    ) {
        panic!("compiling proto/mesh/ca/v1/ca.proto: {e}");
    }
}
