//! The API conventions of `proto/README.md`, as functions every handler
//! calls, so that each one validates the same way and answers the same
//! field violations.
//!
//! - ids: [`parse_id`] (UUIDs, a violation naming the field otherwise);
//! - pagination: [`page_size`] (default 50, maximum 500) and [`PageToken`]
//!   (opaque keyset tokens bound to the filters they were issued for);
//! - partial updates: [`FieldMask`] (paths checked against an allow-list);
//! - optimistic concurrency: [`etag`] and [`check_etag`].

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};
use socle_errors::Error;
use uuid::Uuid;

/// Default page size of every list.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of every list.
pub const MAX_PAGE_SIZE: usize = 500;

/// Parses a required UUID field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Error> {
    if value.is_empty() {
        return Err(Error::invalid_field(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| Error::invalid_field(field, "must be a UUID"))
}

/// Parses an optional UUID field (empty means none).
pub fn parse_optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Error> {
    if value.is_empty() { Ok(None) } else { parse_id(field, value).map(Some) }
}

/// The effective page size: 0 means the default, above the maximum is
/// clamped, negative is an error.
pub fn page_size(requested: i32) -> Result<usize, Error> {
    match requested {
        n if n < 0 => Err(Error::invalid_field("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// An opaque keyset page token: the sort key of the last item returned and
/// a fingerprint of the filters, so that a token cannot be replayed with
/// other filters (which would skip or repeat items).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken<K> {
    /// The sort key after which the next page starts.
    pub after: K,
}

#[derive(Serialize, serde::Deserialize)]
struct Encoded<K> {
    v: u8,
    f: String,
    k: K,
}

impl<K: Serialize + DeserializeOwned> PageToken<K> {
    /// Encodes a token for the page after `after`, under `filters`.
    pub fn encode(after: K, filters: &str) -> String {
        let encoded = Encoded { v: 1, f: fingerprint(filters), k: after };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&encoded).expect("serialisable key"))
    }

    /// Decodes `token` (empty: the first page, `None`), refusing tokens issued
    /// for other filters or tampered with.
    pub fn decode(token: &str, filters: &str) -> Result<Option<Self>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || Error::invalid_field("page_token", "is not a token returned by this list");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let encoded: Encoded<K> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if encoded.v != 1 {
            return Err(invalid());
        }
        if encoded.f != fingerprint(filters) {
            return Err(Error::invalid_field(
                "page_token",
                "was issued for other filters; restart from the first page",
            ));
        }
        Ok(Some(PageToken { after: encoded.k }))
    }
}

/// FNV-1a: a consistency check, not a security measure (authorization and
/// row-level security protect the data whatever the token says).
fn fingerprint(filters: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in filters.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A validated update mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMask {
    paths: Vec<String>,
}

impl FieldMask {
    /// Checks `mask` against the updatable `allowed` paths (snake_case).
    /// A missing or empty mask is refused: a partial update names its fields.
    pub fn new(mask: Option<&prost_types::FieldMask>, allowed: &[&str]) -> Result<Self, Error> {
        let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid_field("update_mask", "is required and names the fields to update"));
        }
        let mut error: Option<Error> = None;
        for path in &paths {
            if !allowed.contains(&path.as_str()) {
                let e = error.take().unwrap_or_else(|| Error::invalid_argument("the request has invalid fields"));
                error = Some(e.with_violation(
                    "update_mask",
                    format!("`{path}` cannot be updated; allowed: {}", allowed.join(", ")),
                ));
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(FieldMask { paths }),
        }
    }

    /// Whether `path` is to be updated.
    pub fn contains(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    /// The paths.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }
}

/// The etag of a record version.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Refuses a stale etag (`ABORTED`, HTTP 412). An empty etag is refused when
/// `required`, and accepted otherwise.
pub fn check_etag(given: &str, version: i64, required: bool) -> Result<(), Error> {
    if given.is_empty() {
        return if required {
            Err(Error::invalid_field("etag", "is required: send the etag last read"))
        } else {
            Ok(())
        };
    }
    if given == etag(version) { Ok(()) } else { Err(Error::etag_mismatch()) }
}

/// A protobuf timestamp from a UTC time.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// A UTC time from a protobuf timestamp; `field` names it in the violation.
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .ok_or_else(|| Error::invalid_field(field, "is not a valid time"))
}

/// Collects field violations and turns them into one error.
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    /// No violation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    /// Records a violation when `condition` is false.
    pub fn check(&mut self, condition: bool, field: &str, description: &str) {
        if !condition {
            self.add(field, description);
        }
    }

    /// `Ok` when there is none, otherwise one `INVALID_ARGUMENT` with all.
    pub fn into_result(self) -> Result<(), Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut error = Error::invalid_argument("the request has invalid fields");
        for (field, description) in self.0 {
            error = error.with_violation(field, description);
        }
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_filters() {
        let token = PageToken::encode(("Lyon".to_owned(), 7), "root=a;kinds=");
        let back: PageToken<(String, i32)> = PageToken::decode(&token, "root=a;kinds=").unwrap().unwrap();
        assert_eq!(back.after, ("Lyon".to_owned(), 7));
        let other = PageToken::<(String, i32)>::decode(&token, "root=b;kinds=").unwrap_err();
        assert_eq!(other.violations()[0].field, "page_token");
        assert!(PageToken::<(String, i32)>::decode("garbage!", "root=a;kinds=").is_err());
        assert!(PageToken::<(String, i32)>::decode("", "x").unwrap().is_none());
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(10_000).unwrap(), MAX_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn masks_are_checked_against_the_allowed_paths() {
        let mask = prost_types::FieldMask { paths: vec!["display_name".into(), "state".into()] };
        let error = FieldMask::new(Some(&mask), &["display_name", "code"]).unwrap_err();
        assert_eq!(error.violations().len(), 1);
        assert!(error.violations()[0].description.contains("`state`"));
        assert!(FieldMask::new(None, &["display_name"]).is_err());
        let ok = FieldMask::new(Some(&prost_types::FieldMask { paths: vec!["code".into()] }), &["code"]).unwrap();
        assert!(ok.contains("code") && !ok.contains("display_name"));
    }

    #[test]
    fn etags_refuse_stale_versions() {
        assert!(check_etag(&etag(3), 3, true).is_ok());
        assert_eq!(check_etag(&etag(2), 3, true).unwrap_err().reason(), Some("ETAG_MISMATCH"));
        assert!(check_etag("", 3, true).is_err());
        assert!(check_etag("", 3, false).is_ok());
        assert!(parse_id("entity_id", "nope").is_err());
    }
}
