//! Idempotent creates: a client `request_id` is claimed in the same
//! transaction as the record it creates, so a retry (even concurrent) finds
//! the first record instead of creating a second one.

use diesel::{
    QueryableByName,
    sql_types::{Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::DbError;

/// The outcome of claiming a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use: create the record with this id.
    New(Uuid),
    /// A retry: the record created by the first call.
    Existing(Uuid),
}

#[derive(QueryableByName)]
struct Resource {
    #[diesel(sql_type = SqlUuid)]
    resource_id: Uuid,
}

/// Claims `request_id` for `method`, proposing `new_id`. A concurrent claim
/// of the same key waits for the first transaction and then sees its record.
pub async fn claim(
    conn: &mut AsyncPgConnection,
    method: &str,
    request_id: Uuid,
    new_id: Uuid,
) -> Result<Claim, DbError> {
    let inserted: Vec<Resource> = diesel::sql_query(
        "INSERT INTO socle_idempotency (method, request_id, resource_id) VALUES ($1, $2, $3)
         ON CONFLICT (method, request_id) DO NOTHING RETURNING resource_id",
    )
    .bind::<Text, _>(method)
    .bind::<SqlUuid, _>(request_id)
    .bind::<SqlUuid, _>(new_id)
    .load(conn)
    .await?;
    if !inserted.is_empty() {
        return Ok(Claim::New(new_id));
    }
    let existing: Resource =
        diesel::sql_query("SELECT resource_id FROM socle_idempotency WHERE method = $1 AND request_id = $2")
            .bind::<Text, _>(method)
            .bind::<SqlUuid, _>(request_id)
            .get_result(conn)
            .await?;
    Ok(Claim::Existing(existing.resource_id))
}
