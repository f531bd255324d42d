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

impl AccessRule {
    /// A rule must say exactly one of: public, authenticated, or a permission.
    pub fn validate(&self) -> Result<(), &'static str> {
        let kinds =
            usize::from(self.public) + usize::from(self.authenticated) + usize::from(!self.permission.is_empty());
        if kinds == 1 {
            Ok(())
        } else {
            Err("an access rule must set exactly one of public, authenticated, permission")
        }
    }
}
