//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and keeps the encoded
//! descriptor set of the public API (`civgate.v1` only) for the reflection service.
use std::{env, fs, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let public = [
        "proto/civgate/v1/citizens.proto",
        "proto/civgate/v1/exchange.proto",
        "proto/civgate/v1/audit.proto",
    ];
    let upstream = ["proto/civgate/upstream/v1/directory.proto"];
    for f in public.iter().chain(&upstream) {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let public_fds = protox::compile(public, ["proto"])?;
    fs::write(
        out.join("civgate_descriptor.bin"),
        public_fds.encode_to_vec(),
    )?;
    let all = protox::compile(public.iter().chain(&upstream), ["proto"])?;
    tonic_prost_build::configure()
        // Hand-written, so a look-up can be answered with the directory's checked bytes
        // (src/pb/get_citizen_response.rs, checked by src/api/wire.rs).
        .extern_path(
            ".civgate.v1.GetCitizenResponse",
            "crate::pb::v1::GetCitizenResponse",
        )
        .build_server(true)
        .build_client(true)
        .compile_fds(all)?;
    Ok(())
}
