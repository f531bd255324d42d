//! Conventions every v1 RPC must follow, checked on the compiled contracts
//! (what buf lint cannot see: our own method options).

use std::collections::BTreeSet;

use prost_reflect::Kind;
use socle_proto::options::{access_rule, http_rule};

fn rpcs() -> Vec<prost_reflect::MethodDescriptor> {
    socle_proto::descriptor_pool()
        .services()
        .filter(|s| s.package_name().starts_with("socle."))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .collect()
}

#[test]
fn every_rpc_declares_exactly_one_kind_of_access() {
    let rpcs = rpcs();
    assert!(rpcs.len() > 100, "the v1 contracts are loaded");
    for method in rpcs {
        let rule = access_rule(&method).unwrap_or_else(|| panic!("{} declares no access rule", method.full_name()));
        rule.validate().unwrap_or_else(|e| panic!("{}: {e}", method.full_name()));
    }
}

#[test]
fn permissions_are_named_after_their_service() {
    for method in rpcs() {
        let rule = access_rule(&method).unwrap();
        if rule.permission.is_empty() {
            continue;
        }
        let parts: Vec<&str> = rule.permission.split('.').collect();
        assert_eq!(parts.len(), 3, "{}: `{}` is not <svc>.<collection>.<action>", method.full_name(), rule.permission);
        let package = method.parent_service().package_name();
        assert_eq!(
            format!("socle.{}.v1", parts[0]),
            package,
            "{}: permission `{}` names another service",
            method.full_name(),
            rule.permission
        );
        assert!(
            parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
            "{}: `{}`",
            method.full_name(),
            rule.permission
        );
    }
}

#[test]
fn entity_fields_name_real_request_fields() {
    for method in rpcs() {
        let rule = access_rule(&method).unwrap();
        if rule.entity_field.is_empty() {
            continue;
        }
        let mut message = method.input();
        let segments: Vec<&str> = rule.entity_field.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            let field = message
                .get_field_by_name(segment)
                .unwrap_or_else(|| panic!("{}: entity_field `{}` not found", method.full_name(), rule.entity_field));
            match field.kind() {
                Kind::Message(inner) if i + 1 < segments.len() => message = inner,
                Kind::String if i + 1 == segments.len() => {}
                _ => panic!("{}: entity_field `{}` must end on a string", method.full_name(), rule.entity_field),
            }
        }
    }
}

#[test]
fn every_rpc_has_a_unique_rest_mapping_under_the_api() {
    let mut seen = BTreeSet::new();
    for method in rpcs() {
        let rule = http_rule(&method).unwrap_or_else(|| panic!("{} has no http rule", method.full_name()));
        let (verb, path) = match rule.pattern.unwrap() {
            socle_proto::options::Pattern::Get(p) => ("GET", p),
            socle_proto::options::Pattern::Post(p) => ("POST", p),
            socle_proto::options::Pattern::Put(p) => ("PUT", p),
            socle_proto::options::Pattern::Patch(p) => ("PATCH", p),
            socle_proto::options::Pattern::Delete(p) => ("DELETE", p),
        };
        assert!(path.starts_with("/api/v1/") || path.starts_with("/.well-known/"), "{}: {path}", method.full_name());
        assert!(seen.insert((verb, path.clone())), "{verb} {path} is mapped twice");
    }
}

#[test]
fn creates_are_idempotent_lists_paginated_and_updates_masked_and_guarded() {
    let mut problems = Vec::new();
    for method in rpcs() {
        let (input, output, name) = (method.input(), method.output(), method.name().to_owned());
        let mut require = |message: &prost_reflect::MessageDescriptor, field: &str| {
            if message.get_field_by_name(field).is_none() {
                problems.push(format!("{} lacks {field}", method.full_name()));
            }
        };
        if name.starts_with("Create") && !method.is_client_streaming() {
            require(&input, "request_id");
        }
        if name.starts_with("Update") {
            require(&input, "update_mask");
            require(&input, "etag");
        }
        // ListAccessibleEntities answers a set used whole to scope queries.
        let whole_set = method.full_name() == "socle.tenancy.v1.AccessService.ListAccessibleEntities";
        if name.starts_with("List") && !method.is_server_streaming() && !whole_set {
            require(&input, "page_size");
            require(&input, "page_token");
            require(&output, "next_page_token");
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
