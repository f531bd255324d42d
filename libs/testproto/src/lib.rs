//! A test-only contract (`socle.example.v1`), compiled like the real ones.
//! The edge tests serve it and check that its RPCs appear on REST, gRPC-web
//! and OpenAPI without any edge code knowing about it.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use std::sync::LazyLock;

use prost_reflect::DescriptorPool;

include!(concat!(env!("OUT_DIR"), "/example.rs"));

/// The encoded descriptor set of the example contract and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/example_descriptor.bin"));

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    let mut pool = socle_proto::descriptor_pool().clone();
    pool.decode_file_descriptor_set(FILE_DESCRIPTOR_SET).expect("valid example descriptors");
    pool
});

/// The Socle contracts plus the example contract.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &POOL
}
