//! Small helpers shared by the tenancy handlers.

use chrono::{DateTime, Utc};
use diesel::{QueryableByName, sql_types::BigInt};
use socle_errors::Error;
use tonic::{Request, Response, Status};

/// A `count(*) AS n` row.
#[derive(QueryableByName)]
pub struct Count {
    /// The count.
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// A protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// A chrono time from a protobuf timestamp (field named for errors).
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .ok_or_else(|| Error::invalid_field(field, "is not a valid time"))
}

/// The gRPC answer of a handler result: the one place errors become statuses.
pub fn reply<T>(result: Result<T, Error>, request_id: Option<String>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| e.into_status(request_id.as_deref()))
}

/// The request id of a call.
pub fn rid<T>(request: &Request<T>) -> Option<String> {
    socle_server::request_id::of(request).map(str::to_owned)
}

/// The entity the caller acts for (`x-socle-entity`), if given.
pub fn acting_entity<T>(request: &Request<T>) -> Option<String> {
    request.metadata().get("x-socle-entity").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Bumps the policy version (call in every transaction that changes the
/// tree, a role or a grant).
pub async fn bump_policy(conn: &mut diesel_async::AsyncPgConnection) -> Result<(), socle_db::DbError> {
    use diesel_async::RunQueryDsl;
    diesel::sql_query("UPDATE policy_version SET version = version + 1").execute(conn).await?;
    Ok(())
}

/// The current policy version.
pub async fn policy_version(conn: &mut diesel_async::AsyncPgConnection) -> Result<i64, socle_db::DbError> {
    use diesel_async::RunQueryDsl;
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = BigInt)]
        version: i64,
    }
    let row: Version = diesel::sql_query("SELECT version FROM policy_version").get_result(conn).await?;
    Ok(row.version)
}
