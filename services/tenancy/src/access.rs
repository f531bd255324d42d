//! Access decisions (`socle.tenancy.v1.AccessService`): does a principal
//! hold a permission on an entity, and through which grant? A grant applies
//! to its own entity, and to the entity's descendants when its scope is
//! `SUBTREE`; an expired grant applies to nothing. On an archived entity only
//! read permissions are given. The closure table turns each question into
//! one indexed query.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, Bool, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{parse_id, parse_optional_id};
use socle_db::{Database, DbError, EntityScope};
use socle_errors::Error;
use socle_proto::socle::tenancy::v1::{access_service_server::AccessService, *};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{policy_version, reply, rid, timestamp},
    entities,
    grants::principal,
    roles,
};

/// A grant applying to an entity, with the depth from the granted entity.
#[derive(Debug, Clone, QueryableByName)]
struct Applying {
    #[diesel(sql_type = SqlUuid)]
    grant_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    role_id: Uuid,
    #[diesel(sql_type = Text)]
    role_name: String,
    #[diesel(sql_type = Array<Text>)]
    permissions: Vec<String>,
    #[diesel(sql_type = SqlUuid)]
    granted_entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    scope: i16,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    expire_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    expired: bool,
}

/// The grants of a principal that reach `entity`, nearest first (expired ones
/// included, flagged).
async fn applying(
    conn: &mut AsyncPgConnection,
    kind: i16,
    principal: Uuid,
    entity: Uuid,
) -> Result<Vec<Applying>, DbError> {
    Ok(diesel::sql_query(
        "SELECT g.id AS grant_id, g.role_id, r.name AS role_name, r.permissions, g.entity_id AS granted_entity_id,
                g.scope, g.expire_time, (g.expire_time IS NOT NULL AND g.expire_time <= now()) AS expired, c.depth
           FROM grants g
           JOIN roles r ON r.id = g.role_id
           JOIN entity_closure c ON c.ancestor_id = g.entity_id AND c.descendant_id = $3
          WHERE g.principal_kind = $1 AND g.principal_id = $2 AND (g.scope = 2 OR c.depth = 0)
          ORDER BY c.depth, g.create_time",
    )
    .bind::<SmallInt, _>(kind)
    .bind::<SqlUuid, _>(principal)
    .bind::<SqlUuid, _>(entity)
    .load(conn)
    .await?)
}

fn grant_path(grant: &Applying, target: &entities::EntityRow) -> GrantPath {
    // From the granted entity down to the target, both included.
    let mut chain: Vec<Uuid> = target.ancestor_ids.clone();
    chain.push(target.id());
    let start = chain.iter().position(|id| *id == grant.granted_entity_id).unwrap_or(0);
    GrantPath {
        grant_id: grant.grant_id.to_string(),
        role_id: grant.role_id.to_string(),
        role_name: grant.role_name.clone(),
        granted_entity_id: grant.granted_entity_id.to_string(),
        scope: i32::from(grant.scope),
        entity_path: chain[start..].iter().map(Uuid::to_string).collect(),
        expire_time: grant.expire_time.map(timestamp),
    }
}

fn is_read(permission: &str) -> bool {
    permission.ends_with(".read")
}

/// The entities where a principal holds `permission` through an unexpired
/// grant: active ones, plus archived ones for read permissions when
/// `include_archived`; within `root`'s subtree when given. The one query
/// behind `ListAccessibleEntities` and the grant-list filter.
pub(crate) async fn accessible(
    conn: &mut AsyncPgConnection,
    kind: i16,
    who: Uuid,
    permission: &str,
    include_archived: bool,
    root: Option<Uuid>,
) -> Result<Vec<Uuid>, DbError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let ids: Vec<Id> = diesel::sql_query(
        "SELECT DISTINCT c.descendant_id AS id
           FROM grants g
           JOIN roles r ON r.id = g.role_id
           JOIN entity_closure c ON c.ancestor_id = g.entity_id AND (g.scope = 2 OR c.depth = 0)
           JOIN entities e ON e.id = c.descendant_id
          WHERE g.principal_kind = $1 AND g.principal_id = $2
            AND $3 = ANY (r.permissions)
            AND (g.expire_time IS NULL OR g.expire_time > now())
            AND (e.state = 1 OR ($4 AND right($3, 5) = '.read'))
            AND ($5::uuid IS NULL OR c.descendant_id IN
                 (SELECT descendant_id FROM entity_closure WHERE ancestor_id = $5))
          ORDER BY 1",
    )
    .bind::<SmallInt, _>(kind)
    .bind::<SqlUuid, _>(who)
    .bind::<Text, _>(permission)
    .bind::<Bool, _>(include_archived)
    .bind::<Nullable<SqlUuid>, _>(root)
    .load(conn)
    .await?;
    Ok(ids.into_iter().map(|i| i.id).collect())
}

fn denied(reason: DenyReason, policy_version: i64) -> CheckAccessResponse {
    CheckAccessResponse { allowed: false, decided_by: None, deny_reason: reason as i32, policy_version }
}

/// The decision of `CheckAccess`, shared by the RPC and by tenancy's own
/// authorization layer (which must not call itself over the network).
pub async fn decide(
    db: &Database,
    kind: i16,
    who: Uuid,
    permission: String,
    entity: Uuid,
) -> Result<CheckAccessResponse, Error> {
    if !roles::catalogue().iter().any(|p| p.name == permission) {
        return Ok(denied(DenyReason::UnknownPermission, 0));
    }
    db.transaction(&EntityScope::System, move |conn| {
        Box::pin(async move {
            let version = policy_version(conn).await?;
            let Some(target) = entities::load(conn, entity, false).await? else {
                return Ok(denied(DenyReason::EntityNotFound, version));
            };
            if !target.active() && !is_read(&permission) {
                return Ok(denied(DenyReason::EntityArchived, version));
            }
            let grants = applying(conn, kind, who, entity).await?;
            let holding: Vec<&Applying> = grants.iter().filter(|g| g.permissions.contains(&permission)).collect();
            match holding.iter().find(|g| !g.expired) {
                Some(grant) => Ok(CheckAccessResponse {
                    allowed: true,
                    decided_by: Some(grant_path(grant, &target)),
                    deny_reason: DenyReason::Unspecified as i32,
                    policy_version: version,
                }),
                None if !holding.is_empty() => Ok(denied(DenyReason::GrantExpired, version)),
                None => Ok(denied(DenyReason::NoMatchingGrant, version)),
            }
        })
    })
    .await
}

/// Tenancy's authorization layer decides locally, with [`decide`].
#[derive(Clone)]
pub struct LocalAccessCheck {
    db: Database,
}

impl LocalAccessCheck {
    /// Decisions from the tenancy database.
    pub fn new(db: Database) -> Self {
        LocalAccessCheck { db }
    }
}

impl socle_server::token_authz::AccessCheck for LocalAccessCheck {
    fn check<'a>(
        &'a self,
        principal: &'a socle_server::Principal,
        permission: &'a str,
        entity: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<socle_server::token_authz::Decision, Error>> {
        Box::pin(async move {
            let refuse = socle_server::token_authz::Decision { allowed: false, policy_version: 0 };
            let (kind, id) = match principal {
                socle_server::Principal::User { user_id, .. } => (1, user_id),
                socle_server::Principal::Service { account_id } => (2, account_id),
                socle_server::Principal::Anonymous => return Ok(refuse),
            };
            let (Ok(who), Ok(target)) = (Uuid::parse_str(id), Uuid::parse_str(entity)) else { return Ok(refuse) };
            let decision = decide(&self.db, kind, who, permission.to_owned(), target).await?;
            Ok(socle_server::token_authz::Decision {
                allowed: decision.allowed,
                policy_version: decision.policy_version,
            })
        })
    }
}

/// The gRPC adapter of access decisions.
#[derive(Clone)]
pub struct AccessApi {
    db: Database,
}

impl AccessApi {
    /// An API over the tenancy database.
    pub fn new(db: Database) -> Self {
        AccessApi { db }
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn check_access(
        &self,
        request: Request<CheckAccessRequest>,
    ) -> Result<Response<CheckAccessResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let (kind, who) = principal("principal", r.principal.as_ref())?;
            let entity = parse_id("entity_id", &r.entity_id)?;
            if r.permission.is_empty() {
                return Err(Error::invalid_field("permission", "is required"));
            }
            let db = self.db.clone();
            decide(&db, kind, who, r.permission, entity).await
        }
        .await;
        reply(result, request_id)
    }

    async fn list_accessible_entities(
        &self,
        request: Request<ListAccessibleEntitiesRequest>,
    ) -> Result<Response<ListAccessibleEntitiesResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let (kind, who) = principal("principal", r.principal.as_ref())?;
            if r.permission.is_empty() {
                return Err(Error::invalid_field("permission", "is required"));
            }
            let root = parse_optional_id("root_entity_id", &r.root_entity_id)?;
            let (permission, include_archived) = (r.permission, r.include_archived);
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let ids = accessible(conn, kind, who, &permission, include_archived, root).await?;
                        Ok(ListAccessibleEntitiesResponse {
                            entity_ids: ids.iter().map(Uuid::to_string).collect(),
                            policy_version: policy_version(conn).await?,
                        })
                    })
                })
                .await
        }
        .await;
        reply(result, request_id)
    }

    async fn explain_access(
        &self,
        request: Request<ExplainAccessRequest>,
    ) -> Result<Response<ExplainAccessResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let (kind, who) = principal("principal", r.principal.as_ref())?;
            let entity = parse_id("entity_id", &r.entity_id)?;
            let service = r.service;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let target = entities::load(conn, entity, false)
                            .await?
                            .ok_or_else(|| Error::not_found("entity", entity))?;
                        let version = policy_version(conn).await?;
                        let grants = applying(conn, kind, who, entity).await?;
                        let mut effective: BTreeMap<String, Vec<GrantPath>> = BTreeMap::new();
                        let mut expired = Vec::new();
                        for grant in &grants {
                            if grant.expired {
                                expired.push(grant_path(grant, &target));
                                continue;
                            }
                            for permission in &grant.permissions {
                                let in_service = service.is_empty() || permission.starts_with(&format!("{service}."));
                                if in_service && (target.active() || is_read(permission)) {
                                    effective.entry(permission.clone()).or_default().push(grant_path(grant, &target));
                                }
                            }
                        }
                        Ok(ExplainAccessResponse {
                            permissions: effective
                                .into_iter()
                                .map(|(permission, granted_by)| EffectivePermission { permission, granted_by })
                                .collect(),
                            expired_grants: expired,
                            policy_version: version,
                        })
                    })
                })
                .await
        }
        .await;
        reply(result, request_id)
    }
}
