//! Grants (`socle.tenancy.v1.GrantService`): a role given to a user or a
//! service account on an entity, alone (`ENTITY_ONLY`) or with its subtree
//! (`SUBTREE`), optionally until an expiry. Grants are immutable: they are
//! created and deleted, never edited.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    result::Error as DieselError,
    sql_types::{Bool, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{PageToken, Violations, check_etag, etag, page_size, parse_id, parse_optional_id};
use socle_db::{Database, DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    tenancy::v1::{grant_service_server::GrantService, *},
    r#type::v1::{ActorKind, ActorRef},
};
use socle_server::token_authz::check_record;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::record,
    common::{acting_entity, bump_policy, from_timestamp, reply, rid, timestamp},
    entities, roles,
};

/// A row of `grants` with its role and entity names.
#[derive(Debug, Clone, QueryableByName)]
pub struct GrantRow {
    #[diesel(sql_type = SqlUuid)]
    pub(crate) id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub(crate) entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    principal_kind: i16,
    #[diesel(sql_type = SqlUuid)]
    principal_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub(crate) role_id: Uuid,
    #[diesel(sql_type = Text)]
    pub(crate) role_name: String,
    #[diesel(sql_type = SmallInt)]
    pub(crate) scope: i16,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(crate) expire_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Text)]
    entity_display_name: String,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
}

/// The columns of [`GrantRow`], over `grants g JOIN roles r JOIN entities e`.
pub(crate) const COLUMNS: &str = "g.id, g.entity_id, g.principal_kind, g.principal_id, g.role_id, r.name AS role_name,
        g.scope, g.expire_time, g.reason, e.display_name AS entity_display_name, g.create_time";
pub(crate) const FROM: &str = "FROM grants g JOIN roles r ON r.id = g.role_id JOIN entities e ON e.id = g.entity_id";

impl GrantRow {
    fn expired(&self) -> bool {
        self.expire_time.is_some_and(|t| t <= Utc::now())
    }

    fn to_proto(&self) -> Grant {
        Grant {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            principal: Some(ActorRef {
                kind: i32::from(self.principal_kind),
                id: self.principal_id.to_string(),
                display_name: String::new(),
            }),
            role_id: self.role_id.to_string(),
            role_name: self.role_name.clone(),
            scope: i32::from(self.scope),
            expire_time: self.expire_time.map(timestamp),
            reason: self.reason.clone(),
            entity_display_name: self.entity_display_name.clone(),
            expired: self.expired(),
            creator: None,
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.create_time)),
            etag: etag(1),
        }
    }
}

async fn require(conn: &mut AsyncPgConnection, id: Uuid) -> Result<GrantRow, Error> {
    match diesel::sql_query(format!("SELECT {COLUMNS} {FROM} WHERE g.id = $1"))
        .bind::<SqlUuid, _>(id)
        .get_result(conn)
        .await
    {
        Ok(row) => Ok(row),
        Err(DieselError::NotFound) => Err(Error::not_found("grant", id)),
        Err(e) => Err(DbError::from(e).into()),
    }
}

/// Parses a principal: a user or a service account, by UUID.
pub(crate) fn principal(field: &str, actor: Option<&ActorRef>) -> Result<(i16, Uuid), Error> {
    let actor = actor.ok_or_else(|| Error::invalid_field(field, "is required"))?;
    let kind = match ActorKind::try_from(actor.kind) {
        Ok(ActorKind::User) => 1,
        Ok(ActorKind::ServiceAccount) => 2,
        _ => {
            return Err(Error::invalid_field(
                format!("{field}.kind"),
                "must be ACTOR_KIND_USER or ACTOR_KIND_SERVICE_ACCOUNT",
            ));
        }
    };
    Ok((kind, parse_id(&format!("{field}.id"), &actor.id)?))
}

/// Grants a built-in role directly in the database: the bootstrap of the
/// first administrator and of the platform's service accounts, before any
/// principal could call `CreateGrant`. Idempotent.
pub async fn bootstrap_grant(
    db: &Database,
    principal_kind: i16,
    principal_id: Uuid,
    role_name: &str,
    entity: Uuid,
    scope: GrantScope,
) -> Result<(), Error> {
    let role_name = role_name.to_owned();
    let scope = scope as i16;
    db.transaction(&EntityScope::System, move |conn| {
        Box::pin(async move {
            let exists: crate::common::Count = diesel::sql_query(
                "SELECT count(*) AS n FROM grants g JOIN roles r ON r.id = g.role_id
                  WHERE g.principal_kind = $1 AND g.principal_id = $2 AND r.name = $3 AND r.entity_id IS NULL
                    AND g.entity_id = $4 AND g.scope = $5",
            )
            .bind::<SmallInt, _>(principal_kind)
            .bind::<SqlUuid, _>(principal_id)
            .bind::<Text, _>(&role_name)
            .bind::<SqlUuid, _>(entity)
            .bind::<SmallInt, _>(scope)
            .get_result(conn)
            .await
            .map_err(DbError::from)?;
            if exists.n == 0 {
                let id = Uuid::now_v7();
                diesel::sql_query(
                    "INSERT INTO grants (id, entity_id, principal_kind, principal_id, role_id, scope, reason)
                     SELECT $1, $2, $3, $4, r.id, $6, 'bootstrap' FROM roles r WHERE r.name = $5 AND r.entity_id IS NULL",
                )
                .bind::<SqlUuid, _>(id)
                .bind::<SqlUuid, _>(entity)
                .bind::<SmallInt, _>(principal_kind)
                .bind::<SqlUuid, _>(principal_id)
                .bind::<Text, _>(&role_name)
                .bind::<SmallInt, _>(scope)
                .execute(conn)
                .await
                .map_err(DbError::from)?;
                bump_policy(conn).await?;
                let created = require(conn, id).await?.to_proto();
                record(conn, "tenancy.grants.create", None, Some(&created)).await?;
            }
            Ok(())
        })
    })
    .await
}

/// The gRPC adapter of grants.
#[derive(Clone)]
pub struct GrantApi {
    db: Database,
    access: crate::access::LocalAccessCheck,
}

impl GrantApi {
    /// An API over the tenancy database.
    pub fn new(db: Database) -> Self {
        GrantApi { access: crate::access::LocalAccessCheck::new(db.clone()), db }
    }
}

#[tonic::async_trait]
impl GrantService for GrantApi {
    async fn create_grant(
        &self,
        request: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let key = parse_id("request_id", &r.request_id)?;
            let grant = r.grant.ok_or_else(|| Error::invalid_field("grant", "is required"))?;
            let mut v = Violations::new();
            let entity = parse_id("grant.entity_id", &grant.entity_id);
            let role = parse_id("grant.role_id", &grant.role_id);
            let principal = principal("grant.principal", grant.principal.as_ref());
            let scope = match GrantScope::try_from(grant.scope) {
                Ok(GrantScope::EntityOnly) => 1i16,
                Ok(GrantScope::Subtree) => 2,
                _ => {
                    v.add("grant.scope", "must be GRANT_SCOPE_ENTITY_ONLY or GRANT_SCOPE_SUBTREE");
                    0
                }
            };
            let expire = match &grant.expire_time {
                None => None,
                Some(t) => {
                    let t = from_timestamp("grant.expire_time", t)?;
                    v.check(t > Utc::now(), "grant.expire_time", "must be in the future");
                    Some(t)
                }
            };
            v.check(grant.reason.chars().count() <= 500, "grant.reason", "at most 500 characters");
            for e in [entity.as_ref().err(), role.as_ref().err(), principal.as_ref().err()].into_iter().flatten() {
                for violation in e.violations() {
                    v.add(violation.field.clone(), violation.description.clone());
                }
            }
            v.into_result()?;
            let (entity, role, (kind, principal_id)) = (entity?, role?, principal?);
            let reason = grant.reason.trim().to_owned();
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let id = match idempotency::claim(conn, "CreateGrant", key, Uuid::now_v7()).await? {
                            idempotency::Claim::Existing(id) => return Ok(require(conn, id).await?.to_proto()),
                            idempotency::Claim::New(id) => id,
                        };
                        let entity_row = entities::load(conn, entity, false)
                            .await?
                            .ok_or_else(|| Error::invalid_field("grant.entity_id", "names no entity"))?;
                        if !entity_row.active() {
                            return Err(Error::new(Code::FailedPrecondition, "the entity is archived"));
                        }
                        let role_row = roles::load(conn, role, false)
                            .await?
                            .ok_or_else(|| Error::invalid_field("grant.role_id", "names no role"))?;
                        // A custom role is usable on its entity and the entity's descendants.
                        if let Some(owner) = role_row.entity_id
                            && owner != entity
                            && !entity_row.ancestor_ids.contains(&owner)
                        {
                            return Err(Error::invalid_field(
                                "grant.role_id",
                                "is a custom role of another entity: it can only be granted on that entity's subtree",
                            ));
                        }
                        let catalogue = roles::catalogue();
                        let service_only = role_row
                            .permissions
                            .iter()
                            .any(|p| catalogue.iter().any(|c| &c.name == p && c.service_account_only));
                        if service_only && kind != 2 {
                            return Err(Error::invalid_field(
                                "grant.role_id",
                                "holds permissions reserved to service accounts",
                            ));
                        }
                        diesel::sql_query(
                            "INSERT INTO grants (id, entity_id, principal_kind, principal_id, role_id, scope, expire_time, reason)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<SqlUuid, _>(entity)
                        .bind::<SmallInt, _>(kind)
                        .bind::<SqlUuid, _>(principal_id)
                        .bind::<SqlUuid, _>(role)
                        .bind::<SmallInt, _>(scope)
                        .bind::<Nullable<Timestamptz>, _>(expire)
                        .bind::<Text, _>(&reason)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        bump_policy(conn).await?;
                        let created = require(conn, id).await?.to_proto();
                        record(conn, "tenancy.grants.create", None, Some(&created)).await?;
                        Ok(created)
                    })
                })
                .await
        }
        .await;
        reply(result.map(|grant| CreateGrantResponse { grant: Some(grant) }), request_id)
    }

    async fn get_grant(&self, request: Request<GetGrantRequest>) -> Result<Response<GetGrantResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let result = async {
            let id = parse_id("grant_id", &request.get_ref().grant_id)?;
            let grant = self
                .db
                .transaction(&EntityScope::System, |conn| {
                    Box::pin(async move { Ok::<_, Error>(require(conn, id).await?.to_proto()) })
                })
                .await?;
            check_record(principal.as_ref(), &self.access, "tenancy.grants.read", &grant.entity_id, "grant").await?;
            Ok(grant)
        }
        .await;
        reply(result.map(|grant| GetGrantResponse { grant: Some(grant) }), request_id)
    }

    async fn list_grants(&self, request: Request<ListGrantsRequest>) -> Result<Response<ListGrantsResponse>, Status> {
        let request_id = rid(&request);
        let caller = socle_server::principal_of(&request);
        let acting = acting_entity(&request);
        let r = request.into_inner();
        let result = async {
            let size = page_size(r.page_size)?;
            let (order, descending) = match r.order_by.trim() {
                "" | "create_time desc" => {
                    ("to_char(g.create_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || chr(1) || g.id::text", true)
                }
                "role_name" => ("r.name || chr(1) || g.id::text", false),
                "expire_time" => (
                    "coalesce(to_char(g.expire_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS'), '99999999') || chr(1) || g.id::text",
                    false,
                ),
                _ => return Err(Error::invalid_field("order_by", "must be one of: create_time desc, role_name, expire_time")),
            };
            // With a principal filter and no entity, every entity: "all my grants".
            let entity_text = match (r.entity_id.is_empty(), r.principal_id.is_empty()) {
                (false, _) => r.entity_id.clone(),
                (true, true) => acting.unwrap_or_default(),
                (true, false) => String::new(),
            };
            let entity = parse_optional_id("entity_id", &entity_text)?;
            let principal = parse_optional_id("principal_id", &r.principal_id)?;
            let role = parse_optional_id("role_id", &r.role_id)?;
            if entity.is_none() && principal.is_none() {
                return Err(Error::invalid_field("entity_id", "is required unless principal_id is given"));
            }
            let filters = format!(
                "e={entity:?};d={};i={};p={principal:?};r={role:?};x={};o={}",
                r.include_descendants, r.include_inherited, r.include_expired, r.order_by
            );
            let after = PageToken::<String>::decode(&r.page_token, &filters)?.map(|t| t.after);
            let (descendants, inherited, expired) = (r.include_descendants, r.include_inherited, r.include_expired);
            // Across every entity, a caller sees only the grants on entities
            // where it may read grants (the layer checked its acting entity).
            let visible_to = match (&entity, &caller) {
                (None, Some(socle_server::Principal::User { user_id, .. })) => Some((1i16, user_id.clone())),
                (None, Some(socle_server::Principal::Service { account_id })) => Some((2i16, account_id.clone())),
                _ => None,
            };
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let visible: Option<Vec<Uuid>> = match visible_to {
                            None => None,
                            Some((kind, who)) => {
                                let who = Uuid::parse_str(&who).map_err(|_| Error::unauthenticated("invalid principal"))?;
                                Some(crate::access::accessible(conn, kind, who, "tenancy.grants.read", true, None).await?)
                            }
                        };
                        let rows: Vec<GrantRow> = diesel::sql_query(format!(
                            "SELECT {COLUMNS} FROM (SELECT g.*, {order} AS sort_key FROM grants g JOIN roles r ON r.id = g.role_id) g
                               JOIN roles r ON r.id = g.role_id JOIN entities e ON e.id = g.entity_id
                              WHERE ($1::uuid IS NULL
                                     OR g.entity_id = $1
                                     OR ($2 AND g.entity_id IN (SELECT descendant_id FROM entity_closure WHERE ancestor_id = $1))
                                     OR ($3 AND g.scope = 2 AND g.entity_id IN (SELECT ancestor_id FROM entity_closure WHERE descendant_id = $1)))
                                AND ($4::uuid IS NULL OR g.principal_id = $4)
                                AND ($5::uuid IS NULL OR g.role_id = $5)
                                AND ($6 OR g.expire_time IS NULL OR g.expire_time > now())
                                AND ($7::text IS NULL OR g.sort_key COLLATE \"C\" {cmp} $7)
                                AND ($9::uuid[] IS NULL OR g.entity_id = ANY($9))
                              ORDER BY g.sort_key COLLATE \"C\" {dir} LIMIT $8",
                            cmp = if descending { "<" } else { ">" },
                            dir = if descending { "DESC" } else { "ASC" },
                        ))
                        .bind::<Nullable<SqlUuid>, _>(entity)
                        .bind::<Bool, _>(descendants)
                        .bind::<Bool, _>(inherited)
                        .bind::<Nullable<SqlUuid>, _>(principal)
                        .bind::<Nullable<SqlUuid>, _>(role)
                        .bind::<Bool, _>(expired)
                        .bind::<Nullable<Text>, _>(after)
                        .bind::<diesel::sql_types::BigInt, _>(size as i64 + 1)
                        .bind::<Nullable<diesel::sql_types::Array<SqlUuid>>, _>(visible)
                        .load(conn)
                        .await
                        .map_err(DbError::from)?;
                        let more = rows.len() > size;
                        let rows = &rows[..rows.len().min(size)];
                        let next = match (more, rows.last()) {
                            (true, Some(last)) => {
                                #[derive(QueryableByName)]
                                struct Key {
                                    #[diesel(sql_type = Text)]
                                    k: String,
                                }
                                let key: Key = diesel::sql_query(format!(
                                    "SELECT {order} AS k FROM grants g JOIN roles r ON r.id = g.role_id WHERE g.id = $1"
                                ))
                                .bind::<SqlUuid, _>(last.id)
                                .get_result(conn)
                                .await
                                .map_err(DbError::from)?;
                                PageToken::encode(key.k, &filters)
                            }
                            _ => String::new(),
                        };
                        Ok((rows.iter().map(GrantRow::to_proto).collect(), next))
                    })
                })
                .await
        }
        .await;
        reply(result.map(|(grants, next_page_token)| ListGrantsResponse { grants, next_page_token }), request_id)
    }

    async fn delete_grant(
        &self,
        request: Request<DeleteGrantRequest>,
    ) -> Result<Response<DeleteGrantResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("grant_id", &r.grant_id)?;
            let etag_given = r.etag;
            let grant = self
                .db
                .transaction(&EntityScope::System, |conn| {
                    Box::pin(async move { Ok::<_, Error>(require(conn, id).await?.to_proto()) })
                })
                .await?;
            check_record(principal.as_ref(), &self.access, "tenancy.grants.manage", &grant.entity_id, "grant").await?;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let deleted = require(conn, id).await?.to_proto();
                        check_etag(&etag_given, 1, false)?;
                        diesel::sql_query("DELETE FROM grants WHERE id = $1")
                            .bind::<SqlUuid, _>(id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        bump_policy(conn).await?;
                        record(conn, "tenancy.grants.delete", Some(&deleted), None).await?;
                        Ok(())
                    })
                })
                .await
        }
        .await;
        reply(result.map(|()| DeleteGrantResponse {}), request_id)
    }

    async fn delete_principal_grants(
        &self,
        request: Request<DeletePrincipalGrantsRequest>,
    ) -> Result<Response<DeletePrincipalGrantsResponse>, Status> {
        let request_id = rid(&request);
        let caller = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let (kind, who) = principal("principal", r.principal.as_ref())?;
            // The layer checked the permission on the acting entity; every
            // grant removed must also lie where the caller holds it (archived
            // entities included: a grant there is still the person's).
            let purger = match &caller {
                Some(socle_server::Principal::User { user_id, .. }) => Some((1i16, user_id.clone())),
                Some(socle_server::Principal::Service { account_id }) => Some((2i16, account_id.clone())),
                _ => None,
            };
            let purger = purger
                .map(|(k, id)| Uuid::parse_str(&id).map(|id| (k, id)))
                .transpose()
                .map_err(|_| Error::unauthenticated("invalid principal"))?;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        if let Some((purger_kind, purger_id)) = purger {
                            let outside: crate::common::Count = diesel::sql_query(
                                "SELECT count(*) AS n FROM grants t
                                  WHERE t.principal_kind = $1 AND t.principal_id = $2
                                    AND NOT EXISTS (
                                        SELECT 1 FROM grants g JOIN roles r ON r.id = g.role_id
                                          JOIN entity_closure c ON c.ancestor_id = g.entity_id AND (g.scope = 2 OR c.depth = 0)
                                         WHERE g.principal_kind = $3 AND g.principal_id = $4
                                           AND 'tenancy.principals.purge' = ANY (r.permissions)
                                           AND (g.expire_time IS NULL OR g.expire_time > now())
                                           AND c.descendant_id = t.entity_id)",
                            )
                            .bind::<SmallInt, _>(kind)
                            .bind::<SqlUuid, _>(who)
                            .bind::<SmallInt, _>(purger_kind)
                            .bind::<SqlUuid, _>(purger_id)
                            .get_result(conn)
                            .await
                            .map_err(DbError::from)?;
                            if outside.n > 0 {
                                return Err(Error::permission_denied(
                                    "the principal holds grants on entities where you lack `tenancy.principals.purge`: nothing was deleted",
                                ));
                            }
                        }
                        let held: Vec<crate::common::Id> =
                            diesel::sql_query("SELECT id FROM grants WHERE principal_kind = $1 AND principal_id = $2")
                                .bind::<SmallInt, _>(kind)
                                .bind::<SqlUuid, _>(who)
                                .load(conn)
                                .await
                                .map_err(DbError::from)?;
                        for grant in &held {
                            let grant = require(conn, grant.id).await?.to_proto();
                            record(conn, "tenancy.grants.purge", Some(&grant), None).await?;
                        }
                        let deleted = diesel::sql_query("DELETE FROM grants WHERE principal_kind = $1 AND principal_id = $2")
                            .bind::<SmallInt, _>(kind)
                            .bind::<SqlUuid, _>(who)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        if deleted > 0 {
                            bump_policy(conn).await?;
                        }
                        Ok(DeletePrincipalGrantsResponse { deleted_grant_count: deleted as i32 })
                    })
                })
                .await
        }
        .await;
        reply(result, request_id)
    }
}
