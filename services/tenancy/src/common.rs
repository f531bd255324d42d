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

/// A tenancy record whose changes are audited.
pub trait Audited: prost::Message + prost::Name {
    /// The audit resource type, e.g. `tenancy.grant`.
    const RESOURCE_TYPE: &'static str;
    /// The record's id.
    fn record_id(&self) -> &str;
    /// The entity whose chain holds the record's events.
    fn chain_entity(&self) -> &str;
}

impl Audited for socle_proto::socle::tenancy::v1::Entity {
    const RESOURCE_TYPE: &'static str = "tenancy.entity";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn chain_entity(&self) -> &str {
        &self.id
    }
}

impl Audited for socle_proto::socle::tenancy::v1::Grant {
    const RESOURCE_TYPE: &'static str = "tenancy.grant";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn chain_entity(&self) -> &str {
        &self.entity_id
    }
}

impl Audited for socle_proto::socle::tenancy::v1::Role {
    const RESOURCE_TYPE: &'static str = "tenancy.role";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn chain_entity(&self) -> &str {
        &self.entity_id
    }
}

/// Writes the audit event of a record created (`before` unset), changed or
/// deleted (`after` unset) in the transaction of the change, on the chain
/// of the record's entity. Tenancy records hold no personal data (an
/// entity's e-mail and phone are the organisation's), so nothing is sealed.
pub async fn record<M: Audited>(
    conn: &mut diesel_async::AsyncPgConnection,
    action: &str,
    before: Option<&M>,
    after: Option<&M>,
) -> Result<(), socle_errors::Error> {
    let Some(record) = after.or(before) else { return Ok(()) };
    let event = socle_server::audit::change(
        crate::NAME,
        action,
        M::RESOURCE_TYPE,
        record.record_id(),
        record.chain_entity(),
        before,
        after,
        &[],
        "",
    );
    socle_outbox::enqueue(conn, &event).await
}
