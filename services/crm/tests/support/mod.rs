//! What the CRM's import and export tests share: two branches with a staff
//! member each, raw REST uploads and downloads, import job reports, valid
//! SIRETs and CSV helpers.

// Each test file uses a part of it.
#![allow(dead_code)]

use reqwest::Method;
use serde_json::Value;
use socle_crm::validate::luhn_valid;
use socle_proto::socle::crm::v1::{
    ExportContactsResponse, ExportInteractionsResponse, ExportMembershipsResponse, ExportOrganizationsResponse,
};
use socle_testkit::secure::SecurePlatform;

/// Two branches under the national root, each with one staff member.
pub struct Branches {
    pub p: SecurePlatform,
    pub lyon: String,
    pub lille: String,
    pub lyon_staff: String,
    pub lille_staff: String,
}

impl Branches {
    pub async fn start() -> Branches {
        let p = SecurePlatform::start().await.expect("secured platform");
        let lyon = p.create_entity(&p.root, "ENTITY_KIND_BRANCH", "ARA-LYON").await.unwrap();
        let lille = p.create_entity(&p.root, "ENTITY_KIND_BRANCH", "HDF-LILLE").await.unwrap();
        let (user, lyon_staff) = p.user_with_password("staff.lyon@socle.test", &lyon).await.unwrap();
        p.grant_user(user, "staff", &lyon, "GRANT_SCOPE_SUBTREE").await.unwrap();
        let (user, lille_staff) = p.user_with_password("staff.lille@socle.test", &lille).await.unwrap();
        p.grant_user(user, "staff", &lille, "GRANT_SCOPE_SUBTREE").await.unwrap();
        Branches { p, lyon, lille, lyon_staff, lille_staff }
    }

    /// A REST call through the edge with `token`, acting for `entity`.
    pub async fn call(&self, token: &str, verb: Method, path: &str, entity: &str, body: Option<Value>) -> (u16, Value) {
        self.p.call(Some(token), verb, path, Some(entity), body).await.unwrap()
    }

    /// A raw upload to `what`'s import: the options as query parameters,
    /// the file as the body.
    pub async fn import(&self, token: &str, what: &str, entity: &str, query: &str, file: Vec<u8>) -> (u16, Value) {
        self.p.upload(token, &format!("/api/v1/{what}:import?entityId={entity}&{query}"), entity, file).await
    }

    /// A raw download of `what`'s export: (status, content type, content
    /// disposition, bytes).
    pub async fn export(&self, token: &str, what: &str, entity: &str, body: Value) -> (u16, String, String, Vec<u8>) {
        self.p.download(token, &format!("/api/v1/{what}:export"), entity, body).await
    }

    /// A download that must succeed: (content type, content disposition,
    /// bytes).
    pub async fn download(&self, token: &str, what: &str, entity: &str, body: Value) -> (String, String, Vec<u8>) {
        let (status, content_type, disposition, bytes) = self.export(token, what, entity, body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        (content_type, disposition, bytes)
    }

    /// The per-row report of an import job.
    pub async fn rows(&self, token: &str, entity: &str, job: &str, query: &str) -> Vec<Value> {
        let (status, body) =
            self.call(token, Method::GET, &format!("/api/v1/import-jobs/{job}/rows?{query}"), entity, None).await;
        assert_eq!(status, 200, "{body}");
        body["rows"].as_array().cloned().unwrap_or_default()
    }
}

/// A count of a job (int64 as a JSON string; absent when zero).
pub fn count(job: &Value, name: &str) -> i64 {
    job["counts"][name].as_str().map_or(0, |n| n.parse().unwrap())
}

/// A job's counts: total, created, updated, unchanged, rejected, valid.
pub fn counts(job: &Value) -> [i64; 6] {
    ["total", "created", "updated", "unchanged", "rejected", "valid"].map(|n| count(job, n))
}

/// The columns a row report's violations name.
pub fn fields(row: &Value) -> Vec<String> {
    row["violations"].as_array().into_iter().flatten().map(|v| v["field"].as_str().unwrap_or("").to_owned()).collect()
}

/// A valid SIRET with the given 8-digit prefix (its head office, NIC 0001).
pub fn siret(prefix8: u32) -> String {
    siret_at(prefix8, 1)
}

/// A valid SIRET of establishment `nic` (4 digits before the key) of the
/// company whose SIREN starts with `prefix8`.
pub fn siret_at(prefix8: u32, nic: u32) -> String {
    let key = |digits: &str| (0..10).find(|k| luhn_valid(&format!("{digits}{k}"))).unwrap();
    let siren = format!("{prefix8:08}{}", key(&format!("{prefix8:08}")));
    let body = format!("{siren}{nic:04}");
    format!("{body}{}", key(&body))
}

pub fn windows_1252(text: &str) -> Vec<u8> {
    let (bytes, _, unmappable) = encoding_rs::WINDOWS_1252.encode(text);
    assert!(!unmappable);
    bytes.into_owned()
}

/// The data rows of a `;` CSV export (BOM and header removed), in file
/// order, cells joined with `|`.
pub fn data_rows(csv: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(csv.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(csv)).unwrap();
    let mut reader = csv::ReaderBuilder::new().delimiter(b';').from_reader(text.as_bytes());
    reader.records().map(|r| r.unwrap().iter().collect::<Vec<_>>().join("|")).collect()
}

/// A message of a streamed export.
pub trait Piece {
    /// (chunk, content type, file name, record count).
    fn parts(&self) -> (&[u8], &str, &str, i64);
}

macro_rules! piece {
    ($($t:ty),*) => {$(
        impl Piece for $t {
            fn parts(&self) -> (&[u8], &str, &str, i64) {
                (&self.chunk, &self.content_type, &self.filename, self.record_count)
            }
        }
    )*};
}
piece!(ExportOrganizationsResponse, ExportContactsResponse, ExportMembershipsResponse, ExportInteractionsResponse);

/// A streamed export read to its end: the media type and file name of the
/// first message, the record count of the last, and the file as text.
pub async fn read_export<M: Piece>(mut stream: tonic::Streaming<M>) -> (String, String, i64, String) {
    let mut messages = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        messages.push(message);
    }
    let (_, content_type, filename, _) = messages[0].parts();
    let (content_type, filename) = (content_type.to_owned(), filename.to_owned());
    let count = messages.last().unwrap().parts().3;
    let body: Vec<u8> = messages.iter().flat_map(|m| m.parts().0.to_vec()).collect();
    (content_type, filename, count, String::from_utf8(body).unwrap())
}
