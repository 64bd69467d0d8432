//! Generated protobuf and gRPC code, and the one hand-written message
//! ([`v1::GetCitizenResponse`]). The domain has its own validated types.

//!
//! Everything with a protobuf shape lives here; the gateway converts to and from its domain
//! types at the edge.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("civgate.v1");
    /// Hand-written (build.rs `extern_path`), so look-ups can be answered with checked bytes.
    pub use super::get_citizen_response::GetCitizenResponse;
}

mod get_citizen_response;

pub mod upstream {
    pub mod v1 {
        tonic::include_proto!("civgate.upstream.v1");
    }
}

/// Encoded `FileDescriptorSet` of `proto/`, for the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/civgate_descriptor.bin"));
