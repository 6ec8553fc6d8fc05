//! Compiles KEDA's `externalscaler.proto` (kept in the workspace's `proto/`) with the `protoc`
//! vendored by `protoc-bin-vendored`, so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/externalscaler.proto";
    println!("cargo:rerun-if-changed={proto}");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // Build scripts run single-threaded; nothing else reads the environment concurrently.
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
