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

/// prost's codec with small buffers: tonic's default reserves 8 KiB to
/// encode and to decode every message, and the mesh's messages are mostly
/// under 200 bytes, on the path of every request four times over (two
/// calls each way) — an allocator's worth of work for nothing.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(std::marker::PhantomData)
    }
}

/// Grows as needed past 512 bytes; a stream still yields every 32 KiB.
fn codec_buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(512, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(codec_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(codec_buffers())
    }
}
