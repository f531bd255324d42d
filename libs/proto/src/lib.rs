//! Socle v1 contracts.
//!
//! Everything here is generated at build time from `proto/` by `build.rs`
//! with the pure-Rust `protox` compiler: prost messages, tonic clients and
//! servers (every RPC has a default `UNIMPLEMENTED` body, so a service only
//! overrides what it implements), and the encoded [`FILE_DESCRIPTOR_SET`]
//! that gRPC reflection, the edge and the authorization layer read.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, MethodDescriptor};

include!(concat!(env!("OUT_DIR"), "/socle.rs"));

pub mod options;

/// The encoded `FileDescriptorSet` of every Socle proto file and its imports,
/// with source info (comments) and custom options.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/socle_descriptor.bin"));

static POOL: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("the embedded descriptor set is valid"));

/// The descriptor pool of every Socle contract.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &POOL
}

/// Finds a method by its gRPC path (`/package.Service/Method`).
pub fn method_by_path(pool: &DescriptorPool, path: &str) -> Option<MethodDescriptor> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    pool.get_service_by_name(service)?.methods().find(|m| m.name() == method)
}
