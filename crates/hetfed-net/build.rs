//! Compiles `proto/hetfed/v2/fed.proto` with the protoc binary vendored by `protoc-bin-vendored`,
//! so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Read by prost-build; build scripts run single-threaded, so setting the variable is sound.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        // Maps as BTreeMap (like the domain types) and bytes fields as `bytes::Bytes` (no copies).
        .btree_map(".")
        .bytes(".")
        .compile_protos(&["proto/hetfed/v2/fed.proto"], &["proto"])?;
    Ok(())
}
