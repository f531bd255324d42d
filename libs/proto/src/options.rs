//! Typed access to the `socle.api.v1` method options declared on every RPC.

use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

pub use crate::socle::api::v1::{AccessRule, HttpRule, http_rule::Pattern};

const HTTP_EXTENSION: &str = "socle.api.v1.http";
const ACCESS_EXTENSION: &str = "socle.api.v1.access";

fn extension<T: prost::Message + Default>(method: &MethodDescriptor, name: &str) -> Option<T> {
    let pool: &DescriptorPool = method.parent_pool();
    let extension = pool.get_extension_by_name(name)?;
    let options = method.options();
    if !options.has_extension(&extension) {
        return None;
    }
    match options.get_extension(&extension).as_ref() {
        Value::Message(message) => message.transcode_to::<T>().ok(),
        _ => None,
    }
}

/// The HTTP mapping declared on `method`, if any.
pub fn http_rule(method: &MethodDescriptor) -> Option<HttpRule> {
    extension(method, HTTP_EXTENSION)
}

/// The access rule declared on `method`, if any.
pub fn access_rule(method: &MethodDescriptor) -> Option<AccessRule> {
    extension(method, ACCESS_EXTENSION)
}
