//! Small helpers shared by the tenancy handlers.

use diesel::{
    QueryableByName,
    sql_types::{BigInt, Uuid as SqlUuid},
};
use tonic::Request;

/// A `count(*) AS n` row.
#[derive(QueryableByName)]
pub struct Count {
    /// The count.
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// An `id` row.
#[derive(QueryableByName)]
pub struct Id {
    /// The id.
    #[diesel(sql_type = SqlUuid)]
    pub id: uuid::Uuid,
}

pub use socle_api::{from_timestamp, timestamp};
pub use socle_server::{reply, request_id::owned as rid};

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
