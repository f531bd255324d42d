//! The entity tree (`socle.tenancy.v1.EntityService`): a closure table gives
//! subtree and ancestor queries as index lookups; moves rewrite the closure
//! of the moved subtree in one transaction under a tree lock, so no cycle can
//! be created even by concurrent moves.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, etag, page_size, parse_id, parse_optional_id};
use socle_db::{Database, DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    tenancy::v1::{entity_service_server::EntityService, *},
    r#type::v1::PostalAddress,
};
use tonic::{Request, Response, Status};

use crate::common::{Count, acting_entity, bump_policy, record, reply, rid, timestamp};
use uuid::Uuid;

/// Fields UpdateEntity may change.
const UPDATABLE: &[&str] =
    &["display_name", "legal_name", "code", "slug", "siret", "address", "email", "phone", "website"];

const SELECT: &str = "SELECT e.id, e.parent_id, e.kind, e.display_name, e.legal_name, e.code, e.slug, e.siret,
        e.address, e.email, e.phone, e.website, e.state, e.archive_time, e.create_time, e.update_time, e.version,
        COALESCE((SELECT array_agg(c.ancestor_id ORDER BY c.depth DESC) FROM entity_closure c
                  WHERE c.descendant_id = e.id AND c.depth > 0), '{}') AS ancestor_ids,
        (SELECT count(*) FROM entity_closure c WHERE c.descendant_id = e.id AND c.depth > 0)::int AS depth,
        (SELECT count(*) FROM entities ch WHERE ch.parent_id = e.id)::int AS child_count
   FROM entities e";

/// A row of `entities` with its tree position.
#[derive(Debug, Clone, QueryableByName)]
pub struct EntityRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    parent_id: Option<Uuid>,
    #[diesel(sql_type = SmallInt)]
    kind: i16,
    #[diesel(sql_type = Text)]
    pub(crate) display_name: String,
    #[diesel(sql_type = Text)]
    legal_name: String,
    #[diesel(sql_type = Text)]
    code: String,
    #[diesel(sql_type = Text)]
    slug: String,
    #[diesel(sql_type = Text)]
    siret: String,
    #[diesel(sql_type = Jsonb)]
    address: serde_json::Value,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    phone: String,
    #[diesel(sql_type = Text)]
    website: String,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    archive_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Array<SqlUuid>)]
    pub(crate) ancestor_ids: Vec<Uuid>,
    #[diesel(sql_type = Integer)]
    depth: i32,
    #[diesel(sql_type = Integer)]
    child_count: i32,
}

impl EntityRow {
    /// The id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub(crate) fn active(&self) -> bool {
        self.state == EntityState::Active as i16
    }

    /// The API resource.
    pub fn to_proto(&self) -> Entity {
        Entity {
            id: self.id.to_string(),
            parent_id: self.parent_id.map(|p| p.to_string()).unwrap_or_default(),
            kind: i32::from(self.kind),
            display_name: self.display_name.clone(),
            legal_name: self.legal_name.clone(),
            code: self.code.clone(),
            slug: self.slug.clone(),
            siret: self.siret.clone(),
            address: address_from_json(&self.address),
            email: self.email.clone(),
            phone: self.phone.clone(),
            website: self.website.clone(),
            state: i32::from(self.state),
            ancestor_ids: self.ancestor_ids.iter().map(Uuid::to_string).collect(),
            depth: self.depth,
            child_count: self.child_count,
            archive_time: self.archive_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

fn address_to_json(address: Option<&PostalAddress>) -> serde_json::Value {
    let Some(a) = address else { return serde_json::json!({}) };
    serde_json::json!({
        "street_line": a.street_line, "complement": a.complement, "distribution": a.distribution,
        "postal_code": a.postal_code, "city": a.city, "cedex": a.cedex, "insee_code": a.insee_code,
        "department_code": a.department_code, "country_code": a.country_code,
    })
}

fn address_from_json(value: &serde_json::Value) -> Option<PostalAddress> {
    let object = value.as_object().filter(|o| !o.is_empty())?;
    let text = |key: &str| object.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    Some(PostalAddress {
        street_line: text("street_line"),
        complement: text("complement"),
        distribution: text("distribution"),
        postal_code: text("postal_code"),
        city: text("city"),
        cedex: text("cedex"),
        insee_code: text("insee_code"),
        department_code: text("department_code"),
        country_code: text("country_code"),
    })
}

/// Checks the descriptive fields of `entity` (named `entity.<field>`); with
/// a mask, only the masked fields.
fn validate(entity: &Entity, mask: Option<&FieldMask>) -> Result<(), Error> {
    let checked = |field: &str| mask.is_none_or(|m| m.contains(field));
    let mut v = Violations::new();
    if checked("display_name") {
        let n = entity.display_name.trim().chars().count();
        v.check((1..=120).contains(&n), "entity.display_name", "is required, at most 120 characters");
    }
    if checked("code") {
        let ok = !entity.code.is_empty()
            && entity.code.len() <= 32
            && entity.code.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-')
            && !entity.code.starts_with('-');
        v.check(ok, "entity.code", "is required: upper case letters, digits and dashes, e.g. ARA-LYON");
    }
    if checked("slug") {
        let ok = !entity.slug.is_empty()
            && entity.slug.len() <= 63
            && entity.slug.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !entity.slug.starts_with('-');
        v.check(ok, "entity.slug", "is required: lower case letters, digits and dashes, e.g. lyon");
    }
    if checked("siret") {
        let ok =
            entity.siret.is_empty() || (entity.siret.len() == 14 && entity.siret.bytes().all(|b| b.is_ascii_digit()));
        v.check(ok, "entity.siret", "must be 14 digits");
    }
    if checked("email") {
        let e = &entity.email;
        let ok = e.is_empty()
            || (e.len() <= 254
                && !e.contains(char::is_whitespace)
                && e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.')));
        v.check(ok, "entity.email", "must be an e-mail address");
    }
    if checked("phone") {
        let p = &entity.phone;
        let ok = p.is_empty()
            || (p.starts_with('+')
                && (8..=16).contains(&p.len())
                && p[1..].bytes().all(|b| b.is_ascii_digit())
                && !p[1..].starts_with('0'));
        v.check(ok, "entity.phone", "must be in E.164 format, e.g. +33478000000");
    }
    if checked("website") {
        let ok = entity.website.is_empty() || (entity.website.starts_with("https://") && entity.website.len() > 8);
        v.check(ok, "entity.website", "must be an https:// URL");
    }
    if checked("legal_name") {
        v.check(entity.legal_name.chars().count() <= 200, "entity.legal_name", "at most 200 characters");
    }
    v.into_result()
}

/// Unique violations of the code and slug become field violations.
fn conflict(error: DbError) -> Error {
    if let DbError::Query(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) = &error {
        let field = match info.constraint_name() {
            Some("entities_code_key") => Some("entity.code"),
            Some("entities_slug_key") => Some("entity.slug"),
            _ => None,
        };
        if let Some(field) = field {
            return Error::new(Code::AlreadyExists, "another entity uses this value")
                .with_violation(field, "is already used by another entity");
        }
    }
    error.into()
}

pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid, lock: bool) -> Result<Option<EntityRow>, DbError> {
    let sql = format!("{SELECT} WHERE e.id = $1{}", if lock { " FOR UPDATE OF e" } else { "" });
    Ok(diesel::sql_query(sql).bind::<SqlUuid, _>(id).get_result(conn).await.map(Some).or_else(|e| match e {
        DieselError::NotFound => Ok(None),
        e => Err(e),
    })?)
}

async fn require(conn: &mut AsyncPgConnection, id: Uuid, lock: bool) -> Result<EntityRow, Error> {
    load(conn, id, lock).await?.ok_or_else(|| Error::not_found("entity", id))
}

/// Serialises structural changes of the tree (moves, creates).
async fn lock_tree(conn: &mut AsyncPgConnection) -> Result<(), DbError> {
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext('socle.tenancy.entity_tree'))").execute(conn).await?;
    Ok(())
}

async fn insert(conn: &mut AsyncPgConnection, id: Uuid, parent: Option<Uuid>, e: &Entity) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO entities (id, parent_id, kind, display_name, legal_name, code, slug, siret, address, email, phone, website)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Nullable<SqlUuid>, _>(parent)
    .bind::<SmallInt, _>(e.kind as i16)
    .bind::<Text, _>(e.display_name.trim())
    .bind::<Text, _>(e.legal_name.trim())
    .bind::<Text, _>(&e.code)
    .bind::<Text, _>(&e.slug)
    .bind::<Text, _>(&e.siret)
    .bind::<Jsonb, _>(address_to_json(e.address.as_ref()))
    .bind::<Text, _>(e.email.trim().to_lowercase())
    .bind::<Text, _>(&e.phone)
    .bind::<Text, _>(&e.website)
    .execute(conn)
    .await
    .map_err(|e| conflict(e.into()))?;
    diesel::sql_query(
        "INSERT INTO entity_closure (ancestor_id, descendant_id, depth)
         SELECT ancestor_id, $1, depth + 1 FROM entity_closure WHERE descendant_id = $2
         UNION ALL SELECT $1, $1, 0",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Nullable<SqlUuid>, _>(parent)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

/// Creates the national root when the tree is empty (the bootstrap
/// command); returns the existing root otherwise.
pub async fn ensure_root(db: &Database, display_name: &str, code: &str, slug: &str) -> Result<Entity, Error> {
    let root = Entity {
        kind: EntityKind::National as i32,
        display_name: display_name.into(),
        code: code.into(),
        slug: slug.into(),
        ..Default::default()
    };
    validate(&root, None)?;
    db.transaction(&EntityScope::System, |conn| {
        Box::pin(async move {
            lock_tree(conn).await?;
            let existing: Vec<EntityRow> = diesel::sql_query(format!("{SELECT} WHERE e.parent_id IS NULL"))
                .load(conn)
                .await
                .map_err(DbError::from)?;
            if let Some(row) = existing.into_iter().next() {
                return Ok(row.to_proto());
            }
            let id = Uuid::now_v7();
            insert(conn, id, None, &root).await?;
            bump_policy(conn).await?;
            let created = require(conn, id, false).await?.to_proto();
            record(conn, "tenancy.entities.create", None, Some(&created)).await?;
            Ok(created)
        })
    })
    .await
}

/// The gRPC adapter of the entity tree.
#[derive(Clone)]
pub struct EntityApi {
    db: Database,
    access: crate::access::LocalAccessCheck,
}

impl EntityApi {
    /// An API over the tenancy database.
    pub fn new(db: Database) -> Self {
        EntityApi { access: crate::access::LocalAccessCheck::new(db.clone()), db }
    }

    async fn tx<R: Send + 'static>(
        &self,
        body: impl for<'c> FnOnce(&'c mut AsyncPgConnection) -> socle_db::BoxFuture<'c, Result<R, Error>> + Send,
    ) -> Result<R, Error> {
        self.db.transaction(&EntityScope::System, body).await
    }
}

/// Filters of a list call, in a stable text form (page token fingerprint).
fn list_filters(r: &ListEntitiesRequest, root: Uuid, order: &str) -> String {
    format!(
        "root={root};depth={};incl={};kinds={:?};arch={};q={};order={order}",
        r.max_depth, r.include_root, r.kinds, r.include_archived, r.query
    )
}

#[tonic::async_trait]
impl EntityService for EntityApi {
    async fn create_entity(
        &self,
        request: Request<CreateEntityRequest>,
    ) -> Result<Response<CreateEntityResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let key = parse_id("request_id", &r.request_id)?;
            let entity = r.entity.ok_or_else(|| Error::invalid_field("entity", "is required"))?;
            let parent = parse_id("entity.parent_id", &entity.parent_id)?;
            let mut v = Violations::new();
            v.check(
                matches!(EntityKind::try_from(entity.kind), Ok(EntityKind::Region | EntityKind::Branch)),
                "entity.kind",
                "must be ENTITY_KIND_REGION or ENTITY_KIND_BRANCH (the national root is created at bootstrap)",
            );
            v.into_result()?;
            validate(&entity, None)?;
            self.tx(|conn| {
                Box::pin(async move {
                    lock_tree(conn).await?;
                    let id = match idempotency::claim(conn, "CreateEntity", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => return Ok(require(conn, id, false).await?.to_proto()),
                        idempotency::Claim::New(id) => id,
                    };
                    let parent_row = load(conn, parent, true)
                        .await?
                        .ok_or_else(|| Error::invalid_field("entity.parent_id", "names no entity"))?;
                    if !parent_row.active() {
                        return Err(Error::new(Code::FailedPrecondition, "the parent entity is archived"));
                    }
                    insert(conn, id, Some(parent), &entity).await?;
                    bump_policy(conn).await?;
                    let created = require(conn, id, false).await?.to_proto();
                    record(conn, "tenancy.entities.create", None, Some(&created)).await?;
                    Ok(created)
                })
            })
            .await
        }
        .await;
        reply(result.map(|entity| CreateEntityResponse { entity: Some(entity) }), request_id)
    }

    async fn get_entity(&self, request: Request<GetEntityRequest>) -> Result<Response<GetEntityResponse>, Status> {
        let request_id = rid(&request);
        let result = async {
            let id = parse_id("entity_id", &request.get_ref().entity_id)?;
            self.tx(|conn| Box::pin(async move { Ok(require(conn, id, false).await?.to_proto()) })).await
        }
        .await;
        reply(result.map(|entity| GetEntityResponse { entity: Some(entity) }), request_id)
    }

    async fn list_entities(
        &self,
        request: Request<ListEntitiesRequest>,
    ) -> Result<Response<ListEntitiesResponse>, Status> {
        let request_id = rid(&request);
        let acting = acting_entity(&request);
        let r = request.into_inner();
        let result = async {
            let size = page_size(r.page_size)?;
            let order = match r.order_by.trim() {
                "" | "tree" => "tree",
                "display_name" => "display_name",
                "code" => "code",
                "create_time desc" => "create_time desc",
                _ => {
                    return Err(Error::invalid_field(
                        "order_by",
                        "must be one of: tree, display_name, code, create_time desc",
                    ));
                }
            };
            if r.max_depth < 0 {
                return Err(Error::invalid_field("max_depth", "must not be negative"));
            }
            let mut kinds = Vec::new();
            for kind in &r.kinds {
                match EntityKind::try_from(*kind) {
                    Ok(EntityKind::Unspecified) | Err(_) => {
                        return Err(Error::invalid_field("kinds", "contains an unknown kind"));
                    }
                    Ok(k) => kinds.push(k as i16),
                }
            }
            let root_text = if r.root_entity_id.is_empty() { acting.unwrap_or_default() } else { r.root_entity_id.clone() };
            let root_given = parse_optional_id("root_entity_id", &root_text)?;
            let query = r.query.trim().to_owned();
            let (token_raw, include_root, include_archived, max_depth) =
                (r.page_token.clone(), r.include_root, r.include_archived, r.max_depth);
            let r_for_filters = r.clone();
            self.tx(move |conn| {
                Box::pin(async move {
                    let root = match root_given {
                        Some(root) => require(conn, root, false).await?.id(),
                        None => {
                            let roots: Vec<EntityRow> = diesel::sql_query(format!("{SELECT} WHERE e.parent_id IS NULL"))
                                .load(conn)
                                .await
                                .map_err(DbError::from)?;
                            match roots.into_iter().next() {
                                Some(root) => root.id(),
                                None => return Ok((Vec::new(), String::new(), 0)),
                            }
                        }
                    };
                    let filters = list_filters(&r_for_filters, root, order);
                    let after = PageToken::<String>::decode(&token_raw, &filters)?.map(|t| t.after);
                    // The sort key of every ordering ends with the id: keys are unique.
                    let key = match order {
                        "tree" => "(SELECT string_agg(socle_fold(a.display_name) || chr(1) || a.id::text, chr(2) ORDER BY c2.depth DESC)
                                      FROM entity_closure c2 JOIN entities a ON a.id = c2.ancestor_id
                                     WHERE c2.descendant_id = e.id)",
                        "display_name" => "socle_fold(e.display_name) || chr(1) || e.id::text",
                        "code" => "e.code || chr(1) || e.id::text",
                        _ => "to_char(e.create_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || chr(1) || e.id::text",
                    };
                    let descending = order == "create_time desc";
                    let base = "FROM entities e JOIN entity_closure sub ON sub.descendant_id = e.id AND sub.ancestor_id = $1
                         WHERE ($2 = 0 OR sub.depth <= $2)
                           AND ($3 OR sub.depth > 0)
                           AND ($4 OR e.state = 1)
                           AND (cardinality($5::smallint[]) = 0 OR e.kind = ANY($5))
                           AND ($6 = '' OR socle_fold(e.display_name || ' ' || e.legal_name || ' ' || e.code) LIKE '%' || socle_fold($6) || '%')".to_string();
                    let total: Count = diesel::sql_query(format!("SELECT count(*) AS n {base}"))
                        .bind::<SqlUuid, _>(root)
                        .bind::<Integer, _>(max_depth)
                        .bind::<Bool, _>(include_root)
                        .bind::<Bool, _>(include_archived)
                        .bind::<Array<SmallInt>, _>(&kinds)
                        .bind::<Text, _>(&query)
                        .get_result(conn)
                        .await
                        .map_err(DbError::from)?;
                    #[derive(QueryableByName)]
                    struct Keyed {
                        #[diesel(sql_type = SqlUuid)]
                        id: Uuid,
                        #[diesel(sql_type = Text)]
                        sort_key: String,
                    }
                    let page: Vec<Keyed> = diesel::sql_query(format!(
                        "SELECT * FROM (SELECT e.id, {key} COLLATE \"C\" AS sort_key {base}) k
                          WHERE $7::text IS NULL OR sort_key {cmp} $7
                          ORDER BY sort_key {dir} LIMIT $8",
                        cmp = if descending { "<" } else { ">" },
                        dir = if descending { "DESC" } else { "ASC" },
                    ))
                    .bind::<SqlUuid, _>(root)
                    .bind::<Integer, _>(max_depth)
                    .bind::<Bool, _>(include_root)
                    .bind::<Bool, _>(include_archived)
                    .bind::<Array<SmallInt>, _>(&kinds)
                    .bind::<Text, _>(&query)
                    .bind::<Nullable<Text>, _>(after)
                    .bind::<BigInt, _>(size as i64 + 1)
                    .load(conn)
                    .await
                    .map_err(DbError::from)?;
                    let more = page.len() > size;
                    let page = &page[..page.len().min(size)];
                    let ids: Vec<Uuid> = page.iter().map(|k| k.id).collect();
                    // One statement for the whole page, whatever its size.
                    let rows: Vec<EntityRow> = diesel::sql_query(format!("{SELECT} WHERE e.id = ANY($1)"))
                        .bind::<Array<SqlUuid>, _>(&ids)
                        .load(conn)
                        .await
                        .map_err(DbError::from)?;
                    let mut entities: Vec<Entity> = Vec::with_capacity(ids.len());
                    for id in &ids {
                        if let Some(row) = rows.iter().find(|r| r.id == *id) {
                            entities.push(row.to_proto());
                        }
                    }
                    let next = if more {
                        page.last().map(|k| PageToken::encode(k.sort_key.clone(), &filters)).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    Ok((entities, next, total.n as i32))
                })
            })
            .await
        }
        .await;
        reply(
            result.map(|(entities, next_page_token, total_size)| ListEntitiesResponse {
                entities,
                next_page_token,
                total_size,
            }),
            request_id,
        )
    }

    async fn update_entity(
        &self,
        request: Request<UpdateEntityRequest>,
    ) -> Result<Response<UpdateEntityResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("entity_id", &r.entity_id)?;
            let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
            let new = r.entity.ok_or_else(|| Error::invalid_field("entity", "is required"))?;
            validate(&new, Some(&mask))?;
            let etag_given = r.etag;
            self.tx(move |conn| {
                Box::pin(async move {
                    let current = require(conn, id, true).await?;
                    check_etag(&etag_given, current.version, true)?;
                    let mut merged = current.to_proto();
                    for path in mask.paths() {
                        match path.as_str() {
                            "display_name" => merged.display_name = new.display_name.trim().to_owned(),
                            "legal_name" => merged.legal_name = new.legal_name.trim().to_owned(),
                            "code" => merged.code = new.code.clone(),
                            "slug" => merged.slug = new.slug.clone(),
                            "siret" => merged.siret = new.siret.clone(),
                            "address" => merged.address = new.address.clone(),
                            "email" => merged.email = new.email.trim().to_lowercase(),
                            "phone" => merged.phone = new.phone.clone(),
                            "website" => merged.website = new.website.clone(),
                            _ => unreachable!("checked by the mask"),
                        }
                    }
                    diesel::sql_query(
                        "UPDATE entities SET display_name = $2, legal_name = $3, code = $4, slug = $5, siret = $6,
                                address = $7, email = $8, phone = $9, website = $10,
                                version = version + 1, update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<Text, _>(&merged.display_name)
                    .bind::<Text, _>(&merged.legal_name)
                    .bind::<Text, _>(&merged.code)
                    .bind::<Text, _>(&merged.slug)
                    .bind::<Text, _>(&merged.siret)
                    .bind::<Jsonb, _>(address_to_json(merged.address.as_ref()))
                    .bind::<Text, _>(&merged.email)
                    .bind::<Text, _>(&merged.phone)
                    .bind::<Text, _>(&merged.website)
                    .execute(conn)
                    .await
                    .map_err(|e| conflict(e.into()))?;
                    let updated = require(conn, id, false).await?.to_proto();
                    record(conn, "tenancy.entities.update", Some(&current.to_proto()), Some(&updated)).await?;
                    Ok(updated)
                })
            })
            .await
        }
        .await;
        reply(result.map(|entity| UpdateEntityResponse { entity: Some(entity) }), request_id)
    }

    async fn move_entity(&self, request: Request<MoveEntityRequest>) -> Result<Response<MoveEntityResponse>, Status> {
        let request_id = rid(&request);
        let principal = socle_server::principal_of(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("entity_id", &r.entity_id)?;
            let new_parent = parse_id("new_parent_id", &r.new_parent_id)?;
            // The layer checked the moved entity; the destination needs the
            // same permission (else a branch admin could move a branch away).
            socle_server::token_authz::check_record(
                principal.as_ref(),
                &self.access,
                "tenancy.entities.manage",
                &new_parent.to_string(),
                "new parent entity",
            )
            .await
            .map_err(|_| Error::invalid_field("new_parent_id", "names no entity you may manage"))?;
            let etag_given = r.etag;
            self.tx(move |conn| {
                Box::pin(async move {
                    lock_tree(conn).await?;
                    let current = require(conn, id, true).await?;
                    check_etag(&etag_given, current.version, true)?;
                    if current.parent_id.is_none() {
                        return Err(Error::new(Code::FailedPrecondition, "the root entity cannot be moved"));
                    }
                    let parent = load(conn, new_parent, false)
                        .await?
                        .ok_or_else(|| Error::invalid_field("new_parent_id", "names no entity"))?;
                    if parent.id == id || parent.ancestor_ids.contains(&id) {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "an entity cannot be moved under itself or one of its descendants",
                        ));
                    }
                    if !parent.active() {
                        return Err(Error::new(Code::FailedPrecondition, "the new parent is archived"));
                    }
                    // Unlink the subtree from its old ancestors, link it to the new ones.
                    diesel::sql_query(
                        "DELETE FROM entity_closure
                          WHERE descendant_id IN (SELECT descendant_id FROM entity_closure WHERE ancestor_id = $1)
                            AND ancestor_id NOT IN (SELECT descendant_id FROM entity_closure WHERE ancestor_id = $1)",
                    )
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query(
                        "INSERT INTO entity_closure (ancestor_id, descendant_id, depth)
                         SELECT sup.ancestor_id, sub.descendant_id, sup.depth + sub.depth + 1
                           FROM entity_closure sup CROSS JOIN entity_closure sub
                          WHERE sup.descendant_id = $2 AND sub.ancestor_id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<SqlUuid, _>(new_parent)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    diesel::sql_query(
                        "UPDATE entities SET parent_id = $2, version = version + 1, update_time = now() WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .bind::<SqlUuid, _>(new_parent)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    let moved: Count =
                        diesel::sql_query("SELECT count(*) AS n FROM entity_closure WHERE ancestor_id = $1")
                            .bind::<SqlUuid, _>(id)
                            .get_result(conn)
                            .await
                            .map_err(DbError::from)?;
                    bump_policy(conn).await?;
                    let after = require(conn, id, false).await?.to_proto();
                    record(conn, "tenancy.entities.move", Some(&current.to_proto()), Some(&after)).await?;
                    Ok((after, moved.n as i32))
                })
            })
            .await
        }
        .await;
        reply(
            result.map(|(entity, moved_entity_count)| MoveEntityResponse { entity: Some(entity), moved_entity_count }),
            request_id,
        )
    }

    async fn archive_entity(
        &self,
        request: Request<ArchiveEntityRequest>,
    ) -> Result<Response<ArchiveEntityResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("entity_id", &r.entity_id)?;
            let (etag_given, include_descendants) = (r.etag, r.include_descendants);
            self.tx(move |conn| {
                Box::pin(async move {
                    lock_tree(conn).await?;
                    let current = require(conn, id, true).await?;
                    check_etag(&etag_given, current.version, false)?;
                    if current.parent_id.is_none() {
                        return Err(Error::new(Code::FailedPrecondition, "the root entity cannot be archived"));
                    }
                    if !current.active() {
                        return Err(Error::new(Code::FailedPrecondition, "the entity is already archived"));
                    }
                    let active_descendants: Count = diesel::sql_query(
                        "SELECT count(*) AS n FROM entity_closure c JOIN entities d ON d.id = c.descendant_id
                          WHERE c.ancestor_id = $1 AND c.depth > 0 AND d.state = 1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .get_result(conn)
                    .await
                    .map_err(DbError::from)?;
                    if active_descendants.n > 0 && !include_descendants {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "the entity has active descendants: archive them too with include_descendants",
                        ));
                    }
                    let archived = diesel::sql_query(
                        "UPDATE entities SET state = 2, archive_time = now(), version = version + 1, update_time = now()
                          WHERE state = 1 AND id IN (SELECT descendant_id FROM entity_closure WHERE ancestor_id = $1)",
                    )
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    bump_policy(conn).await?;
                    let after = require(conn, id, false).await?.to_proto();
                    record(conn, "tenancy.entities.archive", Some(&current.to_proto()), Some(&after)).await?;
                    Ok((after, archived as i32))
                })
            })
            .await
        }
        .await;
        reply(
            result.map(|(entity, archived_entity_count)| ArchiveEntityResponse {
                entity: Some(entity),
                archived_entity_count,
            }),
            request_id,
        )
    }

    async fn unarchive_entity(
        &self,
        request: Request<UnarchiveEntityRequest>,
    ) -> Result<Response<UnarchiveEntityResponse>, Status> {
        let request_id = rid(&request);
        let r = request.into_inner();
        let result = async {
            let id = parse_id("entity_id", &r.entity_id)?;
            let etag_given = r.etag;
            self.tx(move |conn| {
                Box::pin(async move {
                    lock_tree(conn).await?;
                    let current = require(conn, id, true).await?;
                    check_etag(&etag_given, current.version, false)?;
                    if current.active() {
                        return Err(Error::new(Code::FailedPrecondition, "the entity is not archived"));
                    }
                    if let Some(parent) = current.parent_id
                        && !require(conn, parent, false).await?.active()
                    {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "the parent entity is archived: restore it first",
                        ));
                    }
                    diesel::sql_query(
                        "UPDATE entities SET state = 1, archive_time = NULL, version = version + 1, update_time = now()
                          WHERE id = $1",
                    )
                    .bind::<SqlUuid, _>(id)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    bump_policy(conn).await?;
                    let after = require(conn, id, false).await?.to_proto();
                    record(conn, "tenancy.entities.unarchive", Some(&current.to_proto()), Some(&after)).await?;
                    Ok(after)
                })
            })
            .await
        }
        .await;
        reply(result.map(|entity| UnarchiveEntityResponse { entity: Some(entity) }), request_id)
    }
}
