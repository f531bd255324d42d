//! The entity scope of a call, for row-level security.
//!
//! The authorization layer decides whether the caller holds the RPC's
//! permission on one entity. A handler that reads or writes tenant-owned
//! rows also needs the *set* of entities the caller may touch with that
//! permission, which becomes the transaction's [`EntityScope`]: PostgreSQL
//! then hides every other entity's rows, whatever the query says.
//!
//! The set comes from tenancy's `ListAccessibleEntities`, called with this
//! service's own token and cached for a few seconds per (principal,
//! permission, root); an answer with a newer `policy_version` empties the
//! cache, as the access decisions do.
//!
//! Without platform clients (the `declared` authorization mode of
//! single-service tests, where every declared call is let through) the
//! scope is the named root entity, or every entity for calls naming none.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use socle_db::EntityScope;
use socle_errors::Error;
use socle_proto::socle::tenancy::v1::{ListAccessibleEntitiesRequest, access_service_client::AccessServiceClient};
use uuid::Uuid;

use crate::{Principal, remote_auth::PlatformClients};

const TTL: Duration = Duration::from_secs(5);

type Key = (String, String, Option<Uuid>);

#[derive(Default)]
struct Cache {
    version: i64,
    entries: HashMap<Key, (std::sync::Arc<Vec<Uuid>>, Instant)>,
}

/// Resolves and caches the entities a caller may touch (see the module docs).
pub struct ScopeResolver {
    platform: Option<PlatformClients>,
    cache: Mutex<Cache>,
}

impl ScopeResolver {
    /// A resolver asking tenancy through `platform` (none: `declared` mode).
    pub fn new(platform: Option<PlatformClients>) -> Self {
        ScopeResolver { platform, cache: Mutex::new(Cache::default()) }
    }

    /// The entities on which `principal` holds `permission`: all of them, or
    /// those of `root`'s subtree. `via` is an entity the caller was
    /// authorized on (tenancy's own layer checks this service's access to it).
    pub async fn entities(
        &self,
        principal: Option<&Principal>,
        permission: &str,
        root: Option<Uuid>,
        via: &str,
    ) -> Result<EntityScope, Error> {
        let Some(platform) = &self.platform else {
            return Ok(root.map_or(EntityScope::System, EntityScope::entity));
        };
        let Some(actor) = principal.and_then(crate::remote_auth::actor) else { return Ok(EntityScope::none()) };
        let subject = format!("{}:{}", actor.kind, actor.id);
        let key = (subject, permission.to_owned(), root);
        if let Some((ids, at)) = self.cache.lock().expect("scope cache").entries.get(&key)
            && at.elapsed() < TTL
        {
            return Ok(EntityScope::Entities(ids.as_ref().clone()));
        }
        let via = root.map(|r| r.to_string()).unwrap_or_else(|| via.to_owned());
        let mut request = platform
            .request(ListAccessibleEntitiesRequest {
                principal: Some(actor),
                permission: permission.to_owned(),
                root_entity_id: root.map(|r| r.to_string()).unwrap_or_default(),
                include_archived: true,
            })
            .await?;
        request.metadata_mut().insert(
            "x-socle-entity",
            via.parse().map_err(|_| Error::invalid_field("entity_id", "is not a valid entity id"))?,
        );
        let reply = AccessServiceClient::new(platform.tenancy.clone())
            .list_accessible_entities(request)
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "cannot list the caller's entities");
                Error::unavailable("the entities you may access cannot be listed now (tenancy), retry later")
            })?
            .into_inner();
        let ids: Vec<Uuid> = reply.entity_ids.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
        let mut cache = self.cache.lock().expect("scope cache");
        if reply.policy_version > cache.version {
            cache.version = reply.policy_version;
            cache.entries.clear();
        }
        cache.entries.insert(key, (std::sync::Arc::new(ids.clone()), Instant::now()));
        Ok(EntityScope::Entities(ids))
    }
}
