//! Validation of appended events: every violation names its field
//! (`events[i].field`), and valid events come out normalised (lowercase
//! UUIDs, times at microsecond precision, the subject of personal values
//! filled in, output-only fields cleared).

use socle_api::Violations;
use socle_errors::Error;
use socle_proto::socle::{
    audit::v1::{AuditEvent, Outcome},
    r#type::v1::ActorKind,
};
use uuid::Uuid;

use crate::{canonical, store::MAX_BATCH};

/// The services that emit events (`ai-proxy` is the binary name of `ai`).
pub const SERVICES: &[&str] = &["identity", "tenancy", "crm", "cms", "audit", "ai", "ai-proxy", "edge", "migrate"];

const MAX_TEXT: usize = 512;
const MAX_CHANGES: usize = 200;
/// Most subjects one event may erase.
const MAX_ERASE_SUBJECTS: usize = 100;
/// Longest subject id an event may erase.
const MAX_SUBJECT_ID: usize = 200;
/// Largest canonical encoding of one event.
const MAX_EVENT_BYTES: usize = 256 * 1024;

fn is_name(segment: &str) -> bool {
    let mut chars = segment.chars();
    matches!(chars.next(), Some('a'..='z')) && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn dotted(text: &str, parts: std::ops::RangeInclusive<usize>) -> bool {
    let segments: Vec<&str> = text.split('.').collect();
    parts.contains(&segments.len()) && segments.iter().all(|s| is_name(s))
}

fn normal_uuid(v: &mut Violations, field: String, value: &mut String, required: bool) {
    if value.is_empty() {
        if required {
            v.add(field, "is required");
        }
        return;
    }
    match Uuid::parse_str(value) {
        Ok(id) => *value = id.to_string(),
        Err(_) => v.add(field, "must be a UUID"),
    }
}

fn micros(t: &mut prost_types::Timestamp) {
    t.nanos -= t.nanos % 1000;
}

/// Validates and normalises a batch.
pub fn events(mut events: Vec<AuditEvent>) -> Result<Vec<AuditEvent>, Error> {
    if events.is_empty() || events.len() > MAX_BATCH {
        return Err(Error::invalid_field("events", format!("must hold 1 to {MAX_BATCH} events")));
    }
    let mut v = Violations::new();
    let mut seen = std::collections::HashSet::new();
    for (i, event) in events.iter_mut().enumerate() {
        let f = |name: &str| format!("events[{i}].{name}");
        // Output-only fields are computed by the store.
        event.sequence = 0;
        event.record_time = None;
        event.prev_hash.clear();
        event.hash.clear();
        event.encoding_version = canonical::ENCODING_VERSION;

        normal_uuid(&mut v, f("id"), &mut event.id, true);
        if !event.id.is_empty() && !seen.insert(event.id.clone()) {
            v.add(f("id"), "appears more than once in the request");
        }
        normal_uuid(&mut v, f("entity_id"), &mut event.entity_id, true);
        normal_uuid(&mut v, f("acting_entity_id"), &mut event.acting_entity_id, false);
        match event.actor.as_mut() {
            None => v.add(f("actor"), "is required"),
            Some(actor) => {
                actor.display_name.clear();
                match ActorKind::try_from(actor.kind) {
                    Ok(ActorKind::User | ActorKind::ServiceAccount) => {
                        normal_uuid(&mut v, f("actor.id"), &mut actor.id, true)
                    }
                    Ok(ActorKind::System) => {
                        v.check(actor.id.is_empty(), &f("actor.id"), "must be empty for the system")
                    }
                    _ => v.add(f("actor.kind"), "must be a user, a service account or the system"),
                }
            }
        }
        v.check(SERVICES.contains(&event.service.as_str()), &f("service"), "must name a Socle service");
        // `<service>.<collection>.<verb>`; `<service>.<rpc>` (two segments) is
        // accepted too: the denials recorded by the authorization layer are
        // named after the RPC.
        v.check(
            dotted(&event.action, 2..=3),
            &f("action"),
            "must be `<service>.<collection>.<verb>` in lower snake case",
        );
        v.check(
            event.resource_type.is_empty() || dotted(&event.resource_type, 2..=2),
            &f("resource_type"),
            "must be `<service>.<resource>` in lower snake case",
        );
        if !matches!(Outcome::try_from(event.outcome), Ok(Outcome::Ok | Outcome::Denied | Outcome::Error)) {
            v.add(f("outcome"), "must be OK, DENIED or ERROR");
        }
        v.check(
            event.trace_id.is_empty() || canonical::unhex(&event.trace_id, 16).is_some(),
            &f("trace_id"),
            "must be 32 lowercase hex characters",
        );
        for (name, value) in [
            ("resource_id", &event.resource_id),
            ("status_code", &event.status_code),
            ("reason", &event.reason),
            ("permission", &event.permission),
            ("request_id", &event.request_id),
            ("client_address", &event.client_address),
        ] {
            v.check(value.chars().count() <= MAX_TEXT, &f(name), "is too long");
        }
        match event.occur_time.as_mut() {
            None => v.add(f("occur_time"), "is required"),
            Some(t) => {
                micros(t);
                if !(0..=253_402_300_799).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
                    v.add(f("occur_time"), "is not a valid time between 1970 and 9999");
                }
            }
        }
        if event.changes.len() > MAX_CHANGES {
            v.add(f("changes"), format!("must hold at most {MAX_CHANGES} changes"));
        }
        for (j, change) in event.changes.iter_mut().enumerate() {
            let g = |name: &str| format!("events[{i}].changes[{j}].{name}");
            change.erased = false;
            change.sealed = None;
            v.check(!change.field_path.is_empty(), &g("field_path"), "is required");
            v.check(change.field_path.chars().count() <= MAX_TEXT, &g("field_path"), "is too long");
            for (name, value) in [("before", &change.before), ("after", &change.after)] {
                if let Some(value) = value
                    && canonical::value_to_json(value).is_err()
                {
                    v.add(g(name), "numbers must be finite");
                }
            }
            if change.personal_data {
                if change.subject_id.is_empty() {
                    change.subject_id = event.resource_id.clone();
                }
                v.check(
                    !change.subject_id.is_empty(),
                    &g("subject_id"),
                    "is required for personal data when the event has no resource_id",
                );
            } else {
                v.check(change.subject_id.is_empty(), &g("subject_id"), "is only for personal data");
            }
        }
        if event.erase_subject_ids.len() > MAX_ERASE_SUBJECTS {
            v.add(f("erase_subject_ids"), format!("must hold at most {MAX_ERASE_SUBJECTS} subject ids"));
        }
        let mut erased = std::collections::HashSet::new();
        for (k, subject) in event.erase_subject_ids.iter().enumerate() {
            let g = format!("events[{i}].erase_subject_ids[{k}]");
            if subject.is_empty() {
                v.add(g, "must not be empty");
            } else if subject.chars().count() > MAX_SUBJECT_ID {
                v.add(g, format!("must be at most {MAX_SUBJECT_ID} characters"));
            } else if !erased.insert(subject.as_str()) {
                v.add(g, "appears more than once in the event");
            }
        }
        if let Some(details) = &event.details
            && canonical::struct_to_json(details).is_err()
        {
            v.add(f("details"), "numbers must be finite");
        }
    }
    v.into_result()?;
    let mut v = Violations::new();
    for (i, event) in events.iter().enumerate() {
        // A rough bound before sealing (sealed values are slightly larger).
        let size: usize = prost::Message::encoded_len(event);
        v.check(size <= MAX_EVENT_BYTES, &format!("events[{i}]"), "is larger than 256 KiB");
    }
    v.into_result()?;
    Ok(events)
}
