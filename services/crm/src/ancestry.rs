//! The ancestors of an entity, from tenancy (`EntityService.GetEntity`),
//! cached for a short while.
//!
//! Membership types offered to descendants are readable by the entities
//! below their owner, whose scope does not include the owner: the service
//! puts the acting entity's ancestors in the transaction-local setting
//! `socle.crm_ancestors`, which the `membership_types_offered` row-level
//! security policy reads (SELECT only; writes still need the owner in the
//! caller's scope). See the `2026-12-06-000003_memberships` migration.
//!
//! Without platform clients (`declared` mode) no entity has ancestors.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_db::DbError;
use socle_errors::Error;
use socle_proto::socle::tenancy::v1::{GetEntityRequest, entity_service_client::EntityServiceClient};
use socle_server::remote_auth::PlatformClients;
use uuid::Uuid;

/// How long an entity's ancestors are reused (entities rarely move).
const TTL: Duration = Duration::from_secs(30);

/// Resolves and caches entities' ancestors.
pub struct Ancestry {
    platform: Option<PlatformClients>,
    cache: Mutex<HashMap<Uuid, (Vec<Uuid>, Instant)>>,
}

impl Ancestry {
    /// Ancestors from tenancy through `platform` (none: `declared` mode).
    pub fn new(platform: Option<PlatformClients>) -> Self {
        Ancestry { platform, cache: Mutex::new(HashMap::new()) }
    }

    /// The ancestors of `entity`, from the root down to its parent.
    pub async fn of(&self, entity: Uuid) -> Result<Vec<Uuid>, Error> {
        let Some(platform) = &self.platform else { return Ok(Vec::new()) };
        if let Some((ids, at)) = self.cache.lock().expect("ancestry cache").get(&entity)
            && at.elapsed() < TTL
        {
            return Ok(ids.clone());
        }
        let mut request = platform.request(GetEntityRequest { entity_id: entity.to_string() }).await?;
        request.metadata_mut().insert(
            "x-socle-entity",
            entity.to_string().parse().map_err(|_| Error::internal("an entity id is not a valid header"))?,
        );
        let reply = EntityServiceClient::new(platform.tenancy.clone())
            .get_entity(request)
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), %entity, "cannot read the entity's ancestors");
                Error::unavailable("the entity tree cannot be read now (tenancy), retry later")
            })?
            .into_inner();
        let ids: Vec<Uuid> = reply
            .entity
            .map(|e| e.ancestor_ids.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect())
            .unwrap_or_default();
        let mut cache = self.cache.lock().expect("ancestry cache");
        if cache.len() > 10_000 {
            cache.retain(|_, (_, at)| at.elapsed() < TTL);
        }
        cache.insert(entity, (ids.clone(), Instant::now()));
        Ok(ids)
    }
}

/// Makes the membership types that `ancestors` offer to their descendants
/// readable for the rest of the transaction (`socle.crm_ancestors`).
pub async fn set_ancestors(conn: &mut AsyncPgConnection, ancestors: &[Uuid]) -> Result<(), Error> {
    let setting = ancestors.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
    diesel::sql_query("SELECT set_config('socle.crm_ancestors', $1, true)")
        .bind::<Text, _>(setting)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    Ok(())
}
