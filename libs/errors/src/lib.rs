//! The one Socle error model.
//!
//! Every service turns its own errors into [`Error`]: a small [`Code`], a
//! message that is safe to show a client, an optional machine-readable
//! [`reason`](Error::reason) and field violations. [`Error::into_status`] is
//! the only place where an error becomes a `tonic::Status` (with
//! `google.rpc.BadRequest`, `ErrorInfo` and `RequestInfo` details), and
//! [`Problem::from_status`] the only place where a status becomes an RFC 9457
//! `application/problem+json` body, so REST and gRPC clients see the same code,
//! reason and violations.
//!
//! Internal causes (SQL errors, I/O, bugs) are carried as a `source` that is
//! logged when the error is converted and never sent to the client.

use std::{collections::HashMap, fmt};

use serde::{Deserialize, Serialize};
use tonic_types::{ErrorDetails, StatusExt};

/// The domain of our `google.rpc.ErrorInfo` details.
pub const ERROR_DOMAIN: &str = "socle.fr";

/// The content type of RFC 9457 problem documents.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Well-known machine reasons carried in `google.rpc.ErrorInfo.reason`.
pub mod reason {
    /// An update or delete named an etag that is no longer current (HTTP 412).
    pub const ETAG_MISMATCH: &str = "ETAG_MISMATCH";
    /// The request body is larger than the configured limit (HTTP 413).
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    /// The path exists but not with this HTTP method (HTTP 405).
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    /// The request body is not JSON (HTTP 415).
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "UNSUPPORTED_MEDIA_TYPE";
    /// No route matches the path (HTTP 404).
    pub const ROUTE_NOT_FOUND: &str = "ROUTE_NOT_FOUND";
    /// The called RPC declares no access rule and is therefore refused.
    pub const ACCESS_RULE_MISSING: &str = "ACCESS_RULE_MISSING";
    /// The server is at its concurrency limit and shed the request.
    pub const OVERLOADED: &str = "OVERLOADED";
}

/// The small, shared set of error codes. Each maps to one gRPC code and one
/// HTTP status (see [`Code::grpc`] and [`http_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The request is malformed or a field is invalid.
    InvalidArgument,
    /// The resource does not exist, or the caller may not know it exists.
    NotFound,
    /// A resource with the same identity already exists.
    AlreadyExists,
    /// The system is not in a state where the operation can run.
    FailedPrecondition,
    /// A concurrency conflict (stale etag, serialization failure): retry after re-reading.
    Aborted,
    /// The caller is known but lacks the permission.
    PermissionDenied,
    /// The caller is not (or no longer) authenticated.
    Unauthenticated,
    /// A quota or rate limit was hit, or the server shed load.
    ResourceExhausted,
    /// A dependency is temporarily unavailable: retry with backoff.
    Unavailable,
    /// The deadline passed before the operation completed.
    DeadlineExceeded,
    /// The operation is not implemented (yet).
    Unimplemented,
    /// A bug or an unexpected failure; details are only in the logs.
    Internal,
}

impl Code {
    /// The gRPC code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Aborted => tonic::Code::Aborted,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Internal => tonic::Code::Internal,
        }
    }

    /// The code of a gRPC status received from another service (codes with
    /// no counterpart here are `Internal`, `Cancelled` is `Unavailable`).
    pub fn from_grpc(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            tonic::Code::Aborted => Code::Aborted,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::Unauthenticated => Code::Unauthenticated,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::Unavailable | tonic::Code::Cancelled => Code::Unavailable,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Unimplemented => Code::Unimplemented,
            _ => Code::Internal,
        }
    }

    /// The gRPC name of the code, e.g. `PERMISSION_DENIED`.
    pub fn name(self) -> &'static str {
        code_name(self.grpc())
    }
}

/// A field-level validation failure. `field` is a proto field path in
/// snake_case (`organization.legal_name`, `emails[1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The path of the offending field.
    pub field: String,
    /// What is wrong with it, for a human.
    pub description: String,
}

/// The Socle error. Build it with the constructors, convert it with
/// [`Error::into_status`]. Boxed: errors travel on cold paths, results on hot ones.
pub struct Error(Box<Inner>);

struct Inner {
    code: Code,
    message: String,
    reason: Option<String>,
    violations: Vec<FieldViolation>,
    metadata: HashMap<String, String>,
    retry_after: Option<std::time::Duration>,
    details: Vec<prost_types::Any>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error with a client-safe message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            code,
            message: message.into(),
            reason: None,
            violations: Vec::new(),
            metadata: HashMap::new(),
            retry_after: None,
            details: Vec::new(),
            source: None,
        }))
    }

    /// `INVALID_ARGUMENT` with no violation yet; add them with [`Error::with_violation`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `INVALID_ARGUMENT` for one field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid_argument("the request has invalid fields").with_violation(field, description)
    }

    /// `NOT_FOUND` for a resource kind and id.
    pub fn not_found(resource: &str, id: impl fmt::Display) -> Self {
        Self::new(Code::NotFound, format!("{resource} {id} not found"))
    }

    /// `ABORTED` because the etag given is not the current one.
    pub fn etag_mismatch() -> Self {
        Self::new(Code::Aborted, "the resource was modified since it was read: re-read it and retry")
            .with_reason(reason::ETAG_MISMATCH)
    }

    /// `PERMISSION_DENIED`.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    /// `UNAUTHENTICATED`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    /// `UNAVAILABLE`: the caller may retry with backoff.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    /// `INTERNAL`: the client sees "internal error"; `source` is only logged.
    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self::new(Code::Internal, "internal error").with_source(source)
    }

    /// Adds a field violation.
    pub fn with_violation(mut self, field: impl Into<String>, description: impl Into<String>) -> Self {
        self.0.violations.push(FieldViolation { field: field.into(), description: description.into() });
        self
    }

    /// Sets the machine-readable reason (`google.rpc.ErrorInfo.reason`).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.0.reason = Some(reason.into());
        self
    }

    /// Adds a metadata entry to the `ErrorInfo` detail.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.metadata.insert(key.into(), value.into());
        self
    }

    /// Tells the client when to retry (`google.rpc.RetryInfo`; HTTP `Retry-After`).
    pub fn with_retry_after(mut self, delay: std::time::Duration) -> Self {
        self.0.retry_after = Some(delay);
        self
    }

    /// Attaches a service-specific detail message (e.g. the duplicate
    /// candidates of a refused create). The edge renders such details in the
    /// problem document's `details` member.
    pub fn with_detail<M: prost::Name>(mut self, message: &M) -> Self {
        self.0.details.push(prost_types::Any { type_url: M::type_url(), value: message.encode_to_vec() });
        self
    }

    /// Attaches an internal cause, logged but never sent to the client.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// The client-safe message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The machine-readable reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }

    /// The field violations.
    pub fn violations(&self) -> &[FieldViolation] {
        &self.0.violations
    }

    /// Converts to a `tonic::Status` carrying `google.rpc` details. This is
    /// the one place where an error becomes a status. Internal causes are
    /// logged here, with the request id, and dropped.
    pub fn into_status(self, request_id: Option<&str>) -> tonic::Status {
        if let Some(source) = &self.0.source {
            tracing::error!(
                code = ?self.0.code,
                request_id = request_id.unwrap_or(""),
                error = %source,
                "request failed"
            );
        }
        let mut details = ErrorDetails::new();
        for v in &self.0.violations {
            details.add_bad_request_violation(v.field.clone(), v.description.clone());
        }
        if let Some(reason) = &self.0.reason {
            details.set_error_info(reason.clone(), ERROR_DOMAIN, self.0.metadata.clone());
        }
        if let Some(id) = request_id.filter(|id| !id.is_empty()) {
            details.set_request_info(id, "");
        }
        if let Some(delay) = self.0.retry_after {
            details.set_retry_info(Some(delay));
        }
        let status = tonic::Status::with_error_details(self.0.code.grpc(), self.0.message, details);
        if self.0.details.is_empty() {
            return status;
        }
        // Standard details are encoded by tonic-types; ours are appended.
        use prost::Message;
        let mut encoded = tonic_types::Status::decode(status.details()).unwrap_or_default();
        encoded.details.extend(self.0.details);
        tonic::Status::with_details(status.code(), status.message(), encoded.encode_to_vec().into())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("code", &self.0.code)
            .field("message", &self.0.message)
            .field("reason", &self.0.reason)
            .field("violations", &self.0.violations)
            .field("source", &self.0.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.0.code, self.0.message)?;
        for v in &self.0.violations {
            write!(f, "; {}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        error.into_status(None)
    }
}

/// The HTTP status for a gRPC code and an optional reason.
pub fn http_status(code: tonic::Code, reason: Option<&str>) -> u16 {
    match reason {
        Some(reason::ETAG_MISMATCH) => return 412,
        Some(reason::PAYLOAD_TOO_LARGE) => return 413,
        Some(reason::METHOD_NOT_ALLOWED) => return 405,
        Some(reason::UNSUPPORTED_MEDIA_TYPE) => return 415,
        _ => {}
    }
    use tonic::Code as C;
    match code {
        C::Ok => 200,
        C::Cancelled => 499,
        C::InvalidArgument | C::OutOfRange | C::FailedPrecondition => 400,
        C::Unauthenticated => 401,
        C::PermissionDenied => 403,
        C::NotFound => 404,
        C::AlreadyExists | C::Aborted => 409,
        C::ResourceExhausted => 429,
        C::Unimplemented => 501,
        C::Unavailable => 503,
        C::DeadlineExceeded => 504,
        C::Unknown | C::Internal | C::DataLoss => 500,
    }
}

/// The SCREAMING_SNAKE name of a gRPC code, as in the gRPC spec.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A field violation in a problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemViolation {
    /// The field path, in proto3 JSON (lowerCamelCase) names on REST.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

/// An RFC 9457 problem document, with the gRPC code, reason, request id and
/// field violations as extension members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI naming the problem type (`urn:socle:problem:<kind>`).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened, for a human.
    pub detail: String,
    /// The gRPC code name, e.g. `INVALID_ARGUMENT`.
    pub code: String,
    /// The machine reason, when there is one, e.g. `ETAG_MISMATCH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request id to quote to support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Field violations, empty unless the request was invalid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<ProblemViolation>,
    /// Seconds to wait before retrying, when the server says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Service-specific details in proto3 JSON, each with its `@type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<serde_json::Value>,
}

impl Problem {
    /// Builds the problem document for a gRPC status. Field paths are
    /// converted to proto3 JSON names (`legal_name` → `legalName`).
    /// Messages of `INTERNAL`/`UNKNOWN`/`DATA_LOSS` statuses are replaced by
    /// a generic text: only our own error model decides what clients read.
    pub fn from_status(status: &tonic::Status, request_id: Option<&str>) -> Self {
        let details = status.get_error_details();
        let reason = details.error_info().map(|info| info.reason.clone()).filter(|r| !r.is_empty());
        let code = status.code();
        let http = http_status(code, reason.as_deref());
        let violations = details
            .bad_request()
            .map(|br| {
                br.field_violations
                    .iter()
                    .map(|v| ProblemViolation { field: json_field_path(&v.field), description: v.description.clone() })
                    .collect()
            })
            .unwrap_or_default();
        let request_id = details
            .request_info()
            .map(|info| info.request_id.clone())
            .filter(|id| !id.is_empty())
            .or_else(|| request_id.map(str::to_owned));
        let detail = match code {
            tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss => "internal error".to_owned(),
            _ => status.message().to_owned(),
        };
        let kind = reason.as_deref().unwrap_or(code_name(code)).to_ascii_lowercase().replace('_', "-");
        Problem {
            type_uri: format!("urn:socle:problem:{kind}"),
            title: title(code, reason.as_deref()).to_owned(),
            status: http,
            detail,
            code: code_name(code).to_owned(),
            reason,
            request_id,
            violations,
            retry_after_seconds: details.retry_info().and_then(|r| r.retry_delay).map(|d| d.as_secs().max(1)),
            details: Vec::new(),
        }
    }

    /// The service-specific (non `google.rpc`) details of a status, to be
    /// rendered by a caller that knows their types.
    pub fn custom_details(status: &tonic::Status) -> Vec<prost_types::Any> {
        use prost::Message;
        tonic_types::Status::decode(status.details())
            .map(|s| s.details.into_iter().filter(|any| !any.type_url.contains("/google.rpc.")).collect())
            .unwrap_or_default()
    }

    /// Serialises the document.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a problem always serialises")
    }
}

fn title(code: tonic::Code, reason: Option<&str>) -> &'static str {
    match reason {
        Some(reason::ETAG_MISMATCH) => return "Precondition failed",
        Some(reason::PAYLOAD_TOO_LARGE) => return "Payload too large",
        Some(reason::METHOD_NOT_ALLOWED) => return "Method not allowed",
        Some(reason::UNSUPPORTED_MEDIA_TYPE) => return "Unsupported media type",
        _ => {}
    }
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "Request cancelled",
        C::InvalidArgument | C::OutOfRange => "Invalid request",
        C::FailedPrecondition => "Failed precondition",
        C::Unauthenticated => "Unauthenticated",
        C::PermissionDenied => "Permission denied",
        C::NotFound => "Not found",
        C::AlreadyExists => "Already exists",
        C::Aborted => "Conflict",
        C::ResourceExhausted => "Too many requests",
        C::Unimplemented => "Not implemented",
        C::Unavailable => "Service unavailable",
        C::DeadlineExceeded => "Gateway timeout",
        C::Unknown | C::Internal | C::DataLoss => "Internal error",
    }
}

/// Converts a proto field path to its proto3 JSON form: each snake_case
/// segment becomes lowerCamelCase, indexes and dots are kept.
pub fn json_field_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut upper = false;
    for c in path.chars() {
        match c {
            '_' => upper = true,
            '.' | '[' | ']' => {
                upper = false;
                out.push(c);
            }
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_survive_the_status_and_reach_the_problem() {
        let status = Error::invalid_field("organization.legal_name", "must not be empty").into_status(Some("req-1"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let problem = Problem::from_status(&status, None);
        assert_eq!(problem.status, 400);
        assert_eq!(problem.code, "INVALID_ARGUMENT");
        assert_eq!(problem.request_id.as_deref(), Some("req-1"));
        assert_eq!(
            problem.violations,
            vec![ProblemViolation { field: "organization.legalName".into(), description: "must not be empty".into() }]
        );
    }

    #[test]
    fn stale_etag_is_aborted_on_grpc_and_412_on_rest() {
        let status = Error::etag_mismatch().into_status(None);
        assert_eq!(status.code(), tonic::Code::Aborted);
        let problem = Problem::from_status(&status, None);
        assert_eq!(problem.status, 412);
        assert_eq!(problem.reason.as_deref(), Some(reason::ETAG_MISMATCH));
        assert_eq!(problem.type_uri, "urn:socle:problem:etag-mismatch");
    }

    #[test]
    fn internal_causes_never_reach_the_client() {
        let cause = std::io::Error::other("password authentication failed for user app");
        let status = Error::internal(cause).into_status(Some("r"));
        assert_eq!(status.message(), "internal error");
        // Even a raw status from elsewhere is scrubbed on REST.
        let raw = tonic::Status::internal("duplicate key value violates unique constraint \"users_pkey\"");
        let problem = Problem::from_status(&raw, None);
        assert_eq!(problem.detail, "internal error");
        assert_eq!(problem.status, 500);
    }

    #[test]
    fn json_paths_follow_proto3_json_names() {
        assert_eq!(json_field_path("contact.emails[1].address"), "contact.emails[1].address");
        assert_eq!(json_field_path("update_mask"), "updateMask");
        assert_eq!(json_field_path("a_b.c_d_e"), "aB.cDE");
    }
}
