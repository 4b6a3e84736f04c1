//! Generates the gRPC contracts from `proto/infermesh/v1` with protox, so a
//! build needs no system `protoc`.

use std::path::PathBuf;

use prost::Message;

fn main() -> anyhow::Result<()> {
    // Read at run time: a build script binary compiled for one checkout is
    // reused by a shared target dir for another checkout at another path.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let dir = root.join("infermesh/v1");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            // tonic-prost-build does not emit these itself.
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());

    let fds = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("infermesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().codec_path("crate::SmallBufferCodec").compile_fds(fds)?;
    Ok(())
}
