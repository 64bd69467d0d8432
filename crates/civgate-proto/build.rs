//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and keeps the encoded
//! descriptor set of the public API (`civgate.v1` only) for the reflection service.
use std::{env, fs, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The .proto files stay at the top of the repository (`proto/`), where clients find them.
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let public = [
        "civgate/v1/citizens.proto",
        "civgate/v1/exchange.proto",
        "civgate/v1/audit.proto",
    ];
    let upstream = ["civgate/upstream/v1/directory.proto"];
    for f in public.iter().chain(&upstream) {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let public_fds = protox::compile(public, [&root])?;
    fs::write(
        out.join("civgate_descriptor.bin"),
        public_fds.encode_to_vec(),
    )?;
    let all = protox::compile(public.iter().chain(&upstream), [&root])?;
    tonic_prost_build::configure()
        // Hand-written, so a look-up can be answered with the directory's checked bytes
        // (src/get_citizen_response.rs here, checked by the gateway's api/wire.rs).
        .extern_path(
            ".civgate.v1.GetCitizenResponse",
            "crate::v1::GetCitizenResponse",
        )
        .build_server(true)
        .build_client(true)
        .compile_fds(all)?;
    Ok(())
}
