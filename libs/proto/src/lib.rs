//! The `infermesh.v1` gRPC contracts, generated from `proto/` at build time.
//!
//! Services convert these types to their own domain types at the edge; the
//! generated code is never used as a storage or domain model.

/// Generated messages, clients and servers for `infermesh.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, reason = "generated code")]
    tonic::include_proto!("infermesh.v1");
}

/// The encoded `FileDescriptorSet`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/infermesh_descriptor.bin"));
