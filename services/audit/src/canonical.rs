//! The canonical encoding of an event and the chain hash (ADR 0011).
//!
//! Version 1: the event, in its stored form (personal values sealed), as a
//! JSON object serialised with the JSON Canonicalization Scheme (RFC 8785:
//! keys sorted by UTF-16 code units, no whitespace, ECMAScript number
//! formatting, minimal string escaping). Members added to the contract
//! later (`erase_subject_ids`) are present only when non-empty. The hash of an event is
//! `SHA-256(raw 32 bytes of prev_hash || canonical bytes)`, written in
//! lowercase hex. Everything here is pure: the store, `VerifyChain` and the
//! offline verifier share it.

use aws_lc_rs::digest;
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Map, Value as Json, json};
use socle_proto::socle::{
    audit::v1::{AuditEvent, FieldChange, Outcome, SealedValues},
    r#type::v1::ActorKind,
};

/// The encoding version written by this code.
pub const ENCODING_VERSION: i32 = 1;

/// The `prev_hash` of the first event of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Parses lowercase hex of exactly `len` bytes.
pub fn unhex(text: &str, len: usize) -> Option<Vec<u8>> {
    if text.len() != len * 2 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..len).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}

/// `SHA-256(prev_hash bytes || canonical)`, lowercase hex. `prev_hash` must
/// be 64 lowercase hex characters.
pub fn chain_hash(prev_hash: &str, canonical: &[u8]) -> Result<String, String> {
    let prev = unhex(prev_hash, 32).ok_or_else(|| "prev_hash is not 64 lowercase hex characters".to_owned())?;
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(&prev);
    context.update(canonical);
    Ok(hex(context.finish().as_ref()))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, bytes).as_ref().to_vec()
}

/// RFC 8785 serialisation of a JSON value.
pub fn jcs(value: &Json) -> String {
    let mut out = String::new();
    write_jcs(value, &mut out);
    out
}

fn write_jcs(value: &Json, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&es_number(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => out.push_str(&serde_json::to_string(s).expect("string")),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_jcs(item, out);
            }
            out.push(']');
        }
        Json::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).expect("string"));
                out.push(':');
                write_jcs(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// ECMAScript `Number.prototype.toString` of a finite double (RFC 8785 §3.2.2.3).
pub fn es_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return "0".into();
    }
    let sign = if x < 0.0 { "-" } else { "" };
    // Rust's `{:e}` prints the shortest digits that round-trip.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = digits.len() as i32;
    let n = exponent.parse::<i32>().expect("exponent") + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let e = if e >= 0 { format!("+{e}") } else { e.to_string() };
        if k == 1 { format!("{digits}e{e}") } else { format!("{}.{}e{e}", &digits[..1], &digits[1..]) }
    };
    format!("{sign}{body}")
}

/// A protobuf `Value` as JSON; refuses non-finite numbers.
pub fn value_to_json(value: &prost_types::Value) -> Result<Json, String> {
    use prost_types::value::Kind;
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            Json::Number(serde_json::Number::from_f64(*n).ok_or_else(|| "numbers must be finite".to_owned())?)
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(value_to_json).collect::<Result<_, _>>()?),
        Some(Kind::StructValue(s)) => struct_to_json(s)?,
    })
}

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(value: &prost_types::Struct) -> Result<Json, String> {
    let mut map = Map::new();
    for (k, v) in &value.fields {
        map.insert(k.clone(), value_to_json(v)?);
    }
    Ok(Json::Object(map))
}

/// JSON as a protobuf `Value`.
pub fn json_to_value(value: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.iter().map(json_to_value).collect() })
        }
        Json::Object(_) => Kind::StructValue(json_to_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct` (anything else: empty).
pub fn json_to_struct(value: &Json) -> prost_types::Struct {
    match value {
        Json::Object(map) => {
            prost_types::Struct { fields: map.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() }
        }
        _ => prost_types::Struct::default(),
    }
}

/// A time as RFC 3339 UTC with exactly six fractional digits
/// (`2025-06-01T12:00:00.000000Z`): the precision the store keeps.
pub fn format_time(t: &prost_types::Timestamp) -> Result<String, String> {
    let time = chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .ok_or_else(|| "time out of range".to_owned())?;
    Ok(time.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// One change in its stored (and canonical) JSON form.
pub fn change_to_json(change: &FieldChange) -> Result<Json, String> {
    let mut map = Map::new();
    map.insert("field_path".into(), Json::String(change.field_path.clone()));
    map.insert("personal_data".into(), Json::Bool(change.personal_data));
    map.insert("subject_id".into(), Json::String(change.subject_id.clone()));
    if change.personal_data {
        let sealed = change.sealed.as_ref().ok_or_else(|| "a personal change is stored sealed".to_owned())?;
        map.insert(
            "sealed".into(),
            json!({
                "key_id": sealed.key_id,
                "ciphertext": STANDARD.encode(&sealed.ciphertext),
                "commitment": hex(&sealed.commitment),
            }),
        );
    } else {
        let side = |v: &Option<prost_types::Value>| v.as_ref().map(value_to_json).transpose();
        map.insert("before".into(), side(&change.before)?.unwrap_or(Json::Null));
        map.insert("after".into(), side(&change.after)?.unwrap_or(Json::Null));
    }
    Ok(Json::Object(map))
}

/// A change from its stored JSON form (personal values stay sealed).
pub fn change_from_json(value: &Json) -> Result<FieldChange, String> {
    let text = |key: &str| value.get(key).and_then(Json::as_str).unwrap_or_default().to_owned();
    let personal = value.get("personal_data").and_then(Json::as_bool).unwrap_or(false);
    let mut change = FieldChange {
        field_path: text("field_path"),
        personal_data: personal,
        subject_id: text("subject_id"),
        ..Default::default()
    };
    if personal {
        let sealed = value.get("sealed").ok_or_else(|| "sealed values missing".to_owned())?;
        let field = |key: &str| sealed.get(key).and_then(Json::as_str).unwrap_or_default();
        change.sealed = Some(SealedValues {
            key_id: field("key_id").to_owned(),
            ciphertext: STANDARD.decode(field("ciphertext")).map_err(|_| "ciphertext is not base64".to_owned())?,
            commitment: unhex(field("commitment"), 32).ok_or_else(|| "commitment is not hex".to_owned())?,
        });
    } else {
        let side = |key: &str| value.get(key).filter(|v| !v.is_null()).map(json_to_value);
        change.before = side("before");
        change.after = side("after");
    }
    Ok(change)
}

fn enum_name(kind: i32) -> String {
    ActorKind::try_from(kind).map(|k| k.as_str_name().to_owned()).unwrap_or_else(|_| kind.to_string())
}

fn outcome_name(outcome: i32) -> String {
    Outcome::try_from(outcome).map(|k| k.as_str_name().to_owned()).unwrap_or_else(|_| outcome.to_string())
}

/// The canonical object of an event (stored form) for `encoding_version` 1.
pub fn canonical_json(event: &AuditEvent) -> Result<Json, String> {
    if event.encoding_version != ENCODING_VERSION {
        return Err(format!("unknown encoding_version {}", event.encoding_version));
    }
    let actor = event.actor.clone().unwrap_or_default();
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(format_time).transpose();
    let changes = event.changes.iter().map(change_to_json).collect::<Result<Vec<_>, _>>()?;
    let details = match &event.details {
        Some(details) => struct_to_json(details)?,
        None => Json::Object(Map::new()),
    };
    let mut object = json!({
        "encoding_version": event.encoding_version,
        "id": event.id,
        "entity_id": event.entity_id,
        "sequence": event.sequence,
        "actor": { "kind": enum_name(actor.kind), "id": actor.id },
        "acting_entity_id": event.acting_entity_id,
        "service": event.service,
        "action": event.action,
        "resource_type": event.resource_type,
        "resource_id": event.resource_id,
        "outcome": outcome_name(event.outcome),
        "status_code": event.status_code,
        "reason": event.reason,
        "permission": event.permission,
        "request_id": event.request_id,
        "trace_id": event.trace_id,
        "client_address": event.client_address,
        "occur_time": time(&event.occur_time)?,
        "record_time": time(&event.record_time)?,
        "changes": changes,
        "details": details,
    });
    // Added to version 1 after events were stored: present only when
    // non-empty, so that the encoding of every event without it is unchanged
    // (ADR 0011, "additive members").
    if !event.erase_subject_ids.is_empty() {
        object["erase_subject_ids"] = Json::from(event.erase_subject_ids.clone());
    }
    Ok(object)
}

/// The canonical bytes of an event (stored form).
pub fn canonical(event: &AuditEvent) -> Result<Vec<u8>, String> {
    Ok(jcs(&canonical_json(event)?).into_bytes())
}

/// The hash an event should carry: over its `prev_hash` and content.
pub fn event_hash(event: &AuditEvent) -> Result<String, String> {
    chain_hash(&event.prev_hash, &canonical(event)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_ecmascript() {
        // RFC 8785 appendix B samples.
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (9007199254740992.0, "9007199254740992"),
            (0.1 + 0.2, "0.30000000000000004"),
            (333333333.3333333, "333333333.3333333"),
        ];
        for (x, expected) in cases {
            assert_eq!(es_number(x), expected, "{x:e}");
        }
    }

    #[test]
    fn objects_are_sorted_by_utf16_and_strings_minimally_escaped() {
        let value: Json =
            serde_json::from_str(r#"{"b":[1.0,"é\u0001\"\\/"],"a":{"\ud83d\ude00":1,"\ufb33":2},"€":null,"1":true}"#)
                .unwrap();
        assert_eq!(jcs(&value), "{\"1\":true,\"a\":{\"😀\":1,\"דּ\":2},\"b\":[1,\"é\\u0001\\\"\\\\/\"],\"€\":null}");
    }

    #[test]
    fn erase_subject_ids_are_encoded_only_when_present() {
        let mut event = AuditEvent {
            id: "0193d9b4-7c1e-7a3b-9d2e-1f2a3b4c5d6e".into(),
            encoding_version: ENCODING_VERSION,
            ..Default::default()
        };
        let without = canonical(&event).unwrap();
        assert!(canonical_json(&event).unwrap().get("erase_subject_ids").is_none(), "events before it hash as before");
        event.erase_subject_ids = vec!["s-2".into(), "s-1".into()];
        let with = String::from_utf8(canonical(&event).unwrap()).unwrap();
        assert!(with.contains(r#""erase_subject_ids":["s-2","s-1"]"#), "{with}");
        assert_ne!(with.into_bytes(), without, "covered by the hash");
    }

    #[test]
    fn hashes_chain_over_the_previous_hash() {
        let first = chain_hash(GENESIS_HASH, b"{}").unwrap();
        assert_eq!(first.len(), 64);
        assert_ne!(chain_hash(&first, b"{}").unwrap(), first);
        assert!(chain_hash("ABC", b"{}").is_err());
    }
}
