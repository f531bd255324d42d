//! Roles (`socle.tenancy.v1.RoleService`) and the permission catalogue.
//!
//! The catalogue is read from the contracts: every permission an RPC
//! declares in its `(socle.api.v1.access)` option, so it can never drift
//! from what the authorization layer enforces. Built-in roles are defined
//! here as rules over the catalogue and written at start-up, so a new RPC's
//! permission reaches the right built-in roles without a migration.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, etag, page_size, parse_id, parse_optional_id};
use socle_db::{Database, DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::tenancy::v1::{role_service_server::RoleService, *};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::record,
    common::{Count, acting_entity, bump_policy, reply, rid, timestamp},
    entities,
};

/// Permissions that only service accounts may hold.
const SERVICE_ACCOUNT_ONLY: &[&str] = &["audit.events.append", "tenancy.principals.purge"];

/// Every permission declared by the contracts, sorted.
pub fn catalogue() -> Vec<Permission> {
    let names: BTreeSet<String> = socle_proto::descriptor_pool()
        .services()
        .filter(|s| s.package_name().starts_with("socle."))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter_map(|m| socle_proto::options::access_rule(&m))
        .map(|rule| rule.permission)
        .filter(|p| !p.is_empty())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let mut parts = name.splitn(3, '.');
            let (service, collection, action) =
                (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let verb = match action {
                "read" => "Consulter",
                "create" => "Créer",
                "update" => "Modifier",
                "delete" => "Supprimer",
                "manage" => "Administrer",
                "merge" => "Fusionner",
                "import" => "Importer",
                "export" => "Exporter",
                "erase" => "Effacer (RGPD)",
                "publish" => "Publier",
                "review" => "Relire",
                "verify" => "Vérifier",
                "append" => "Ajouter (service)",
                "ask" => "Interroger",
                "purge" => "Purger (service)",
                other => other,
            };
            Permission {
                description: format!("{verb} : {collection} ({service})"),
                service: service.into(),
                collection: collection.into(),
                action: action.into(),
                service_account_only: SERVICE_ACCOUNT_ONLY.contains(&name.as_str()),
                name,
            }
        })
        .collect()
}

/// The built-in roles: (name, display name, description, rule).
type Rule = fn(&Permission) -> bool;
const BUILT_IN: &[(&str, &str, &str, Rule)] = &[
    ("national_admin", "Administrateur national", "Toutes les permissions sur le sous-arbre accordé.", |p| {
        !p.service_account_only
    }),
    (
        "entity_admin",
        "Administrateur d'entité",
        "Gère les entités, les utilisateurs et les droits ; consulte tout.",
        |p| {
            !p.service_account_only
                && (p.service == "tenancy" || p.service == "identity" || p.action == "read")
                && p.service != "audit"
        },
    ),
    ("staff", "Personnel", "Travaille au quotidien dans le CRM, le CMS et l'assistant.", |p| {
        matches!(p.service.as_str(), "crm" | "cms" | "ai")
            && matches!(p.action.as_str(), "read" | "create" | "update" | "import" | "export" | "ask")
            || (p.service == "tenancy" && p.action == "read")
    }),
    ("editor", "Rédacteur", "Rédige et publie les contenus du CMS.", |p| {
        p.service == "cms" || (p.service == "tenancy" && p.action == "read")
    }),
    ("viewer", "Lecteur", "Consulte sans modifier.", |p| p.action == "read" && p.service != "audit"),
    ("auditor", "Auditeur / DPO", "Consulte, vérifie et exporte la piste d'audit.", |p| {
        (p.service == "audit" && !p.service_account_only) || (p.service == "tenancy" && p.action == "read")
    }),
    ("ai_user", "Utilisateur de l'assistant", "Interroge l'assistant IA.", |p| {
        p.name == "ai.questions.ask" || (p.service == "ai" && p.action == "read")
    }),
    (
        "platform_service",
        "Service de la plateforme",
        "Pour les comptes de service des services Socle : lire l'arbre et les droits, écrire l'audit.",
        platform_service,
    ),
    (
        "identity_service",
        "Service d'identité",
        "Pour le compte de service d'identity : celui des services Socle, plus la suppression de tous les droits \
         d'un compte supprimé.",
        |p| platform_service(p) || p.name == "tenancy.principals.purge",
    ),
];

/// What every platform service account holds: tenancy reads and audit appends.
fn platform_service(p: &Permission) -> bool {
    (p.service == "tenancy" && p.action == "read") || p.name == "audit.events.append"
}

/// Whether `name` is a built-in role.
pub fn catalogue_role_exists(name: &str) -> bool {
    BUILT_IN.iter().any(|(n, ..)| *n == name)
}

/// Writes the built-in roles from the current catalogue (idempotent).
pub async fn ensure_built_in(db: &Database) -> Result<(), Error> {
    let catalogue = catalogue();
    db.transaction(&EntityScope::System, |conn| {
        Box::pin(async move {
            for (name, display_name, description, rule) in BUILT_IN {
                let permissions: Vec<String> = catalogue.iter().filter(|p| rule(p)).map(|p| p.name.clone()).collect();
                diesel::sql_query(
                    "INSERT INTO roles (id, entity_id, name, display_name, description, permissions, built_in)
                     VALUES ($1, NULL, $2, $3, $4, $5, true)
                     ON CONFLICT (name) WHERE entity_id IS NULL DO UPDATE
                        SET display_name = EXCLUDED.display_name, description = EXCLUDED.description,
                            permissions = EXCLUDED.permissions,
                            version = roles.version + (roles.permissions IS DISTINCT FROM EXCLUDED.permissions)::int,
                            update_time = CASE WHEN roles.permissions IS DISTINCT FROM EXCLUDED.permissions
                                               THEN now() ELSE roles.update_time END",
                )
                .bind::<SqlUuid, _>(Uuid::now_v7())
                .bind::<Text, _>(*name)
                .bind::<Text, _>(*display_name)
                .bind::<Text, _>(*description)
                .bind::<Array<Text>, _>(&permissions)
                .execute(conn)
                .await
                .map_err(DbError::from)?;
            }
            bump_policy(conn).await?;
            Ok(())
        })
    })
    .await
}

/// A row of `roles`.
#[derive(Debug, Clone, QueryableByName)]
pub struct RoleRow {
    #[diesel(sql_type = SqlUuid)]
    pub(crate) id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub(crate) entity_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    pub(crate) name: String,
    #[diesel(sql_type = Text)]
    display_name: String,
    #[diesel(sql_type = Text)]
    description: String,
    #[diesel(sql_type = Array<Text>)]
    pub(crate) permissions: Vec<String>,
    #[diesel(sql_type = Bool)]
    built_in: bool,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

const SELECT: &str = "SELECT id, entity_id, name, display_name, description, permissions, built_in, create_time, update_time, version FROM roles";

impl RoleRow {
    fn to_proto(&self) -> Role {
        Role {
            id: self.id.to_string(),
            entity_id: self.entity_id.map(|e| e.to_string()).unwrap_or_default(),
            name: self.name.clone(),
            display_name: self.display_name.clone(),
            description: self.description.clone(),
            permissions: self.permissions.clone(),
            built_in: self.built_in,
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
            ..Default::default()
        }
    }
}

/// Loads a role.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid, lock: bool) -> Result<Option<RoleRow>, DbError> {
    let sql = format!("{SELECT} WHERE id = $1{}", if lock { " FOR UPDATE" } else { "" });
    match diesel::sql_query(sql).bind::<SqlUuid, _>(id).get_result(conn).await {
        Ok(row) => Ok(Some(row)),
        Err(DieselError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn require(conn: &mut AsyncPgConnection, id: Uuid, lock: bool) -> Result<RoleRow, Error> {
    load(conn, id, lock).await?.ok_or_else(|| Error::not_found("role", id))
}

fn validate(role: &Role, mask: Option<&FieldMask>) -> Result<(), Error> {
    let checked = |field: &str| mask.is_none_or(|m| m.contains(field));
    let mut v = Violations::new();
    if checked("name") {
        let ok = (2..=63).contains(&role.name.len())
            && role.name.starts_with(|c: char| c.is_ascii_lowercase())
            && role.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        v.check(ok, "role.name", "is required: lower snake case, e.g. membership_manager");
        v.check(!BUILT_IN.iter().any(|(n, ..)| *n == role.name), "role.name", "is the name of a built-in role");
    }
    if checked("display_name") {
        v.check(
            (1..=120).contains(&role.display_name.trim().chars().count()),
            "role.display_name",
            "is required, at most 120 characters",
        );
    }
    if checked("description") {
        v.check(role.description.chars().count() <= 1000, "role.description", "at most 1000 characters");
    }
    if checked("permissions") {
        let known: BTreeSet<String> = catalogue().into_iter().map(|p| p.name).collect();
        v.check(!role.permissions.is_empty(), "role.permissions", "must hold at least one permission");
        for (i, p) in role.permissions.iter().enumerate() {
            if !known.contains(p) {
                v.add(format!("role.permissions[{i}]"), format!("`{p}` is not in the permission catalogue"));
            }
        }
    }
    v.into_result()
}

fn conflict(error: DbError) -> Error {
    if let DbError::Query(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) = &error {
        return Error::new(Code::AlreadyExists, "a role with this name already exists on this entity")
            .with_violation("role.name", "is already used");
    }
    error.into()
}

/// The gRPC adapter of roles.
#[derive(Clone)]
pub struct RoleApi {
    db: Database,
    access: crate::access::LocalAccessCheck,
}

impl RoleApi {
    /// An API over the tenancy database.
    pub fn new(db: Database) -> Self {
        RoleApi { access: crate::access::LocalAccessCheck::new(db.clone()), db }
    }

    /// A custom role is visible only where the caller holds `permission` on
    /// its entity; built-in roles belong to no entity.
    async fn check_role(
        &self,
        principal: Option<&socle_server::Principal>,
        id: Uuid,
        permission: &str,
    ) -> Result<RoleRow, Error> {
        let row = self
            .db
            .transaction(&EntityScope::System, |conn| Box::pin(async move { require(conn, id, false).await }))
            .await?;
        if let Some(entity) = row.entity_id {
            socle_server::token_authz::check_record(principal, &self.access, permission, &entity.to_string(), "role")
                .await?;
        }
        Ok(row)
    }
}

#[tonic::async_trait]
impl RoleService for RoleApi {
    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<CreateRoleResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let key = parse_id("request_id", &r.request_id)?;
            let role = r.role.ok_or_else(|| Error::invalid_field("role", "is required"))?;
            let entity = parse_id("role.entity_id", &role.entity_id)?;
            validate(&role, None)?;
            self.db
                .transaction(&EntityScope::System, |conn| {
                    Box::pin(async move {
                        let id = match idempotency::claim(conn, "CreateRole", key, Uuid::now_v7()).await? {
                            idempotency::Claim::Existing(id) => return Ok(require(conn, id, false).await?.to_proto()),
                            idempotency::Claim::New(id) => id,
                        };
                        entities::load(conn, entity, false)
                            .await?
                            .ok_or_else(|| Error::invalid_field("role.entity_id", "names no entity"))?;
                        let mut permissions = role.permissions.clone();
                        permissions.sort();
                        permissions.dedup();
                        diesel::sql_query(
                            "INSERT INTO roles (id, entity_id, name, display_name, description, permissions, built_in)
                             VALUES ($1, $2, $3, $4, $5, $6, false)",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<SqlUuid, _>(entity)
                        .bind::<Text, _>(&role.name)
                        .bind::<Text, _>(role.display_name.trim())
                        .bind::<Text, _>(role.description.trim())
                        .bind::<Array<Text>, _>(&permissions)
                        .execute(conn)
                        .await
                        .map_err(|e| conflict(e.into()))?;
                        bump_policy(conn).await?;
                        let created = require(conn, id, false).await?.to_proto();
                        record(conn, "tenancy.roles.create", None, Some(&created)).await?;
                        Ok(created)
                    })
                })
                .await
        }
        .await;
        reply(result.map(|role| CreateRoleResponse { role: Some(role) }), request_id)
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<GetRoleResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let result = async {
            let id = parse_id("role_id", &request.get_ref().role_id)?;
            Ok(self.check_role(principal.as_ref(), id, "tenancy.roles.read").await?.to_proto())
        }
        .await;
        reply(result.map(|role| GetRoleResponse { role: Some(role) }), request_id)
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        let request_id = rid(&request);
        let acting = acting_entity(&request);
        let r = request.into_inner();
        let result = async {
            let size = page_size(r.page_size)?;
            let order = match r.order_by.trim() {
                "" | "display_name" => "lower(display_name) || chr(1) || id::text",
                "name" => "name || chr(1) || id::text",
                _ => return Err(Error::invalid_field("order_by", "must be one of: display_name, name")),
            };
            let entity_text = if r.entity_id.is_empty() { acting.unwrap_or_default() } else { r.entity_id.clone() };
            let entity = parse_optional_id("entity_id", &entity_text)?;
            let filters = format!("entity={entity:?};custom={};perm={};order={order}", r.custom_only, r.permission);
            let after = PageToken::<String>::decode(&r.page_token, &filters)?.map(|t| t.after);
            let (custom_only, permission) = (r.custom_only, r.permission.clone());
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        // Roles usable on the entity: built-in ones and the custom roles
                        // of the entity and of its ancestors.
                        let rows: Vec<RoleRow> = diesel::sql_query(format!(
                            "SELECT * FROM ({SELECT}) r
                              WHERE (r.entity_id IS NULL AND NOT $1)
                                 OR ($2::uuid IS NOT NULL AND r.entity_id IN
                                     (SELECT ancestor_id FROM entity_closure WHERE descendant_id = $2))
                                 OR ($2::uuid IS NULL AND r.entity_id IS NOT NULL)
                             ORDER BY {order}"
                        ))
                        .bind::<Bool, _>(custom_only)
                        .bind::<Nullable<SqlUuid>, _>(entity)
                        .load(conn)
                        .await
                        .map_err(DbError::from)?;
                        let key = |row: &RoleRow| match order.starts_with("name") {
                            true => format!("{}\u{1}{}", row.name, row.id),
                            false => format!("{}\u{1}{}", row.display_name.to_lowercase(), row.id),
                        };
                        let mut matching: Vec<&RoleRow> = rows
                            .iter()
                            .filter(|row| permission.is_empty() || row.permissions.contains(&permission))
                            .filter(|row| after.as_ref().is_none_or(|a| key(row) > *a))
                            .collect();
                        matching.sort_by_key(|row| key(row));
                        let more = matching.len() > size;
                        matching.truncate(size);
                        let next = if more {
                            matching.last().map(|row| PageToken::encode(key(row), &filters)).unwrap_or_default()
                        } else {
                            String::new()
                        };
                        Ok((matching.iter().map(|row| row.to_proto()).collect(), next))
                    })
                })
                .await
        }
        .await;
        reply(result.map(|(roles, next_page_token)| ListRolesResponse { roles, next_page_token }), request_id)
    }

    async fn update_role(&self, request: Request<UpdateRoleRequest>) -> Result<Response<UpdateRoleResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("role_id", &r.role_id)?;
            self.check_role(principal.as_ref(), id, "tenancy.roles.manage").await?;
            let mask = FieldMask::new(r.update_mask.as_ref(), &["display_name", "description", "permissions"])?;
            let new = r.role.ok_or_else(|| Error::invalid_field("role", "is required"))?;
            validate(&new, Some(&mask))?;
            let etag_given = r.etag;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let current = require(conn, id, true).await?;
                        if current.built_in {
                            return Err(Error::new(Code::FailedPrecondition, "built-in roles cannot be changed"));
                        }
                        let before = current.to_proto();
                        check_etag(&etag_given, current.version, true)?;
                        let display_name = if mask.contains("display_name") {
                            new.display_name.trim().to_owned()
                        } else {
                            current.display_name
                        };
                        let description = if mask.contains("description") {
                            new.description.trim().to_owned()
                        } else {
                            current.description
                        };
                        let mut permissions =
                            if mask.contains("permissions") { new.permissions } else { current.permissions };
                        permissions.sort();
                        permissions.dedup();
                        diesel::sql_query(
                            "UPDATE roles SET display_name = $2, description = $3, permissions = $4,
                                    version = version + 1, update_time = now() WHERE id = $1",
                        )
                        .bind::<SqlUuid, _>(id)
                        .bind::<Text, _>(&display_name)
                        .bind::<Text, _>(&description)
                        .bind::<Array<Text>, _>(&permissions)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                        bump_policy(conn).await?;
                        let after = require(conn, id, false).await?.to_proto();
                        record(conn, "tenancy.roles.update", Some(&before), Some(&after)).await?;
                        Ok(after)
                    })
                })
                .await
        }
        .await;
        reply(result.map(|role| UpdateRoleResponse { role: Some(role) }), request_id)
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<DeleteRoleResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("role_id", &r.role_id)?;
            self.check_role(principal.as_ref(), id, "tenancy.roles.manage").await?;
            let etag_given = r.etag;
            self.db
                .transaction(&EntityScope::System, move |conn| {
                    Box::pin(async move {
                        let current = require(conn, id, true).await?;
                        if current.built_in {
                            return Err(Error::new(Code::FailedPrecondition, "built-in roles cannot be deleted"));
                        }
                        check_etag(&etag_given, current.version, false)?;
                        let grants: Count = diesel::sql_query("SELECT count(*) AS n FROM grants WHERE role_id = $1")
                            .bind::<SqlUuid, _>(id)
                            .get_result(conn)
                            .await
                            .map_err(DbError::from)?;
                        if grants.n > 0 {
                            return Err(Error::new(
                                Code::FailedPrecondition,
                                format!("the role is still granted {} time(s): delete those grants first", grants.n),
                            ));
                        }
                        diesel::sql_query("DELETE FROM roles WHERE id = $1")
                            .bind::<SqlUuid, _>(id)
                            .execute(conn)
                            .await
                            .map_err(DbError::from)?;
                        bump_policy(conn).await?;
                        record(conn, "tenancy.roles.delete", Some(&current.to_proto()), None).await?;
                        Ok(())
                    })
                })
                .await
        }
        .await;
        reply(result.map(|()| DeleteRoleResponse {}), request_id)
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<Response<ListPermissionsResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = (|| {
            let size = page_size(r.page_size)?;
            let filters = format!("service={}", r.service);
            let after = PageToken::<String>::decode(&r.page_token, &filters)?.map(|t| t.after);
            let mut permissions: Vec<Permission> = catalogue()
                .into_iter()
                .filter(|p| r.service.is_empty() || p.service == r.service)
                .filter(|p| after.as_ref().is_none_or(|a| p.name > *a))
                .collect();
            let more = permissions.len() > size;
            permissions.truncate(size);
            let next = if more {
                permissions.last().map(|p| PageToken::encode(p.name.clone(), &filters)).unwrap_or_default()
            } else {
                String::new()
            };
            Ok((permissions, next))
        })();
        reply(
            result.map(|(permissions, next_page_token)| ListPermissionsResponse { permissions, next_page_token }),
            request_id,
        )
    }
}
