//! Affiliations (`socle.crm.v1.AffiliationService`): which contact works for
//! which organisation, in which roles, since and until when. The contact,
//! the organisation and the affiliation belong to one entity; a contact has
//! at most one current link with an organisation (a second one is refused
//! with `ALREADY_EXISTS`). A link is current while it has no end date or
//! ends today or later (Europe/Paris). Keyset lists with filters, partial
//! updates with etags, idempotent creates; every write is audited in its
//! transaction.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Date, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, page_size, parse_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::crm::v1::{affiliation_service_server::AffiliationService, *};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Count, Crm, TODAY_SQL, absorb, audit, etag, reply, rid, timestamp},
    organizations::scope_ids,
    validate,
};

/// The columns of [`AffiliationRow`], over [`FROM`].
const COLUMNS: &str = "a.id, a.entity_id, a.contact_id, a.organization_id, a.roles, a.job_title, a.start_date,
    a.end_date, a.version, a.create_time, a.update_time";

/// An affiliation with its contact and organisation (same entity: visible
/// together), so that names come in the same statement.
const FROM: &str = "affiliations a JOIN contacts c ON c.id = a.contact_id
    JOIN organizations o ON o.id = a.organization_id";

/// The contact's display name, as `ContactRow::display_name` builds it.
const DISPLAY_NAME: &str = "btrim(c.given_name || ' ' || c.family_name)";

/// The computed columns of [`AffiliationRow`].
fn computed_columns() -> String {
    format!(
        "(a.end_date IS NULL OR a.end_date >= {TODAY_SQL}) AS current,
         {DISPLAY_NAME} AS contact_display_name, socle_fold({DISPLAY_NAME}) AS contact_key,
         o.legal_name AS organization_legal_name, o.name_key AS organization_key"
    )
}

/// One affiliation as stored, with its computed fields.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct AffiliationRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub contact_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub organization_id: Uuid,
    #[diesel(sql_type = Array<SmallInt>)]
    roles: Vec<i16>,
    #[diesel(sql_type = Text)]
    job_title: String,
    #[diesel(sql_type = Nullable<Date>)]
    start_date: Option<NaiveDate>,
    #[diesel(sql_type = Nullable<Date>)]
    end_date: Option<NaiveDate>,
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    current: bool,
    #[diesel(sql_type = Text)]
    contact_display_name: String,
    #[diesel(sql_type = Text)]
    contact_key: String,
    #[diesel(sql_type = Text)]
    organization_legal_name: String,
    #[diesel(sql_type = Text)]
    organization_key: String,
}

impl AffiliationRow {
    pub(crate) fn to_proto(&self) -> Affiliation {
        Affiliation {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            contact_id: self.contact_id.to_string(),
            organization_id: self.organization_id.to_string(),
            roles: self.roles.iter().map(|r| i32::from(*r)).collect(),
            job_title: self.job_title.clone(),
            start_date: self.start_date.map(|d| d.to_string()).unwrap_or_default(),
            end_date: self.end_date.map(|d| d.to_string()).unwrap_or_default(),
            current: self.current,
            contact_display_name: self.contact_display_name.clone(),
            organization_legal_name: self.organization_legal_name.clone(),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

impl Audited for Affiliation {
    const RESOURCE_TYPE: &'static str = "crm.affiliation";
    /// The contact's name and job title are the person's data, sealed with
    /// the contact's own events (an erased contact's name must not survive
    /// in clear in the trail of its links).
    const PERSONAL: &'static [&'static str] = &["contact_display_name", "job_title"];
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
    fn subject(&self) -> &str {
        &self.contact_id
    }
}

/// A validated affiliation (the updatable fields), ready to be written.
#[derive(Debug, Clone, Default)]
pub(crate) struct AffiliationInput {
    roles: Vec<i16>,
    job_title: String,
    start_date: Option<NaiveDate>,
    end_date: Option<NaiveDate>,
}

/// A `YYYY-MM-DD` date field: empty is none, anything else must be a date.
fn date_field(v: &mut Violations, field: String, value: &str) -> Option<NaiveDate> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if !validate::valid_date(value) {
        v.add(field, "date invalide : format attendu AAAA-MM-JJ (ex. 2025-01-31)");
        return None;
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()
}

/// Validates and normalises the roles, job title and dates of `a` (fields
/// reported under `prefix.`).
pub(crate) fn validate(a: &Affiliation, prefix: &str) -> Result<AffiliationInput, Error> {
    let field = |name: &str| format!("{prefix}.{name}");
    let mut v = Violations::new();
    let mut input = AffiliationInput::default();
    for (i, role) in a.roles.iter().enumerate() {
        match AffiliationRole::try_from(*role) {
            Ok(AffiliationRole::Unspecified) => v.add(format!("{prefix}.roles[{i}]"), "le rôle doit être précisé"),
            Ok(role) => {
                if !input.roles.contains(&(role as i16)) {
                    input.roles.push(role as i16);
                }
            }
            Err(_) => v.add(format!("{prefix}.roles[{i}]"), "rôle inconnu"),
        }
    }
    input.job_title = a.job_title.split_whitespace().collect::<Vec<_>>().join(" ");
    v.check(
        input.job_title.chars().count() <= 150 && !input.job_title.chars().any(char::is_control),
        &field("job_title"),
        "la fonction doit faire au plus 150 caractères, sans caractère de contrôle",
    );
    input.start_date = date_field(&mut v, field("start_date"), &a.start_date);
    input.end_date = date_field(&mut v, field("end_date"), &a.end_date);
    if let (Some(start), Some(end)) = (input.start_date, input.end_date)
        && end < start
    {
        v.add(field("end_date"), "la date de fin doit être égale ou postérieure à la date de début");
    }
    v.into_result()?;
    Ok(input)
}

/// A contact or an organisation a record names, as the caller sees it.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct Reference {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    pub state: i16,
}

/// What a record names: a contact or an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Named {
    Contact,
    Organization,
}

impl Named {
    fn table(self) -> &'static str {
        match self {
            Named::Contact => "contacts",
            Named::Organization => "organizations",
        }
    }
}

/// The records of `named` among `ids` that `scope` shows (row-level
/// security applies); the transaction keeps `scope` afterwards.
pub(crate) async fn references(
    conn: &mut AsyncPgConnection,
    named: Named,
    ids: &[Uuid],
    scope: &EntityScope,
) -> Result<Vec<Reference>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    socle_db::set_scope(conn, scope).await.map_err(DbError::from)?;
    Ok(diesel::sql_query(format!("SELECT id, entity_id, state FROM {} WHERE id = ANY($1)", named.table()))
        .bind::<Array<SqlUuid>, _>(ids)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

/// Reports on `field` a named record that is not visible, belongs to
/// another entity than `entity` (the record's, `of` saying which record in
/// the message), or was merged or erased.
pub(crate) fn check_reference(
    v: &mut Violations,
    field: String,
    named: Named,
    id: Uuid,
    found: &[Reference],
    entity: Uuid,
    of: &str,
) {
    let found = found.iter().find(|r| r.id == id);
    match (named, found) {
        (Named::Contact, None) => v.add(field, "ne désigne aucun contact"),
        (Named::Organization, None) => v.add(field, "ne désigne aucune organisation"),
        (Named::Contact, Some(r)) if r.entity_id != entity => {
            v.add(field, format!("le contact doit appartenir à l'entité de {of} (entity_id)"))
        }
        (Named::Organization, Some(r)) if r.entity_id != entity => {
            v.add(field, format!("l'organisation doit appartenir à l'entité de {of} (entity_id)"))
        }
        (Named::Contact, Some(r)) if r.state != ContactState::Active as i16 => {
            v.add(field, "le contact a été fusionné ou effacé")
        }
        (Named::Organization, Some(r)) if r.state != OrganizationState::Active as i16 => {
            v.add(field, "l'organisation a été fusionnée")
        }
        _ => {}
    }
}

/// Refuses a second current link between a contact and an organisation
/// (`ALREADY_EXISTS`) when `end_date` makes the written one current. The
/// pair is locked until the end of the transaction, so that two concurrent
/// writes cannot both pass the check.
async fn refuse_second_current(
    conn: &mut AsyncPgConnection,
    contact: Uuid,
    organization: Uuid,
    exclude: Option<Uuid>,
    end_date: Option<NaiveDate>,
) -> Result<(), Error> {
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('crm.affiliations:' || $1 || ':' || $2, 0))")
        .bind::<Text, _>(contact.to_string())
        .bind::<Text, _>(organization.to_string())
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    let existing: Count = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM affiliations a
          WHERE a.contact_id = $1 AND a.organization_id = $2 AND ($3::uuid IS NULL OR a.id <> $3)
            AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})
            AND ($4::date IS NULL OR $4 >= {TODAY_SQL})"
    ))
    .bind::<SqlUuid, _>(contact)
    .bind::<SqlUuid, _>(organization)
    .bind::<Nullable<SqlUuid>, _>(exclude)
    .bind::<Nullable<Date>, _>(end_date)
    .get_result(conn)
    .await
    .map_err(DbError::from)?;
    if existing.n > 0 {
        return Err(Error::new(
            Code::AlreadyExists,
            "ce contact est déjà rattaché à cette organisation : modifiez l'affiliation en cours, \
             ou renseignez sa date de fin",
        )
        .with_reason("CURRENT_AFFILIATION_EXISTS"));
    }
    Ok(())
}

/// Every affiliation of a contact, current or ended, in one statement
/// (the GDPR export).
pub(crate) async fn of_contact(conn: &mut AsyncPgConnection, contact: Uuid) -> Result<Vec<AffiliationRow>, Error> {
    Ok(diesel::sql_query(format!(
        "SELECT {COLUMNS}, {} FROM {FROM} WHERE a.contact_id = $1 ORDER BY a.create_time, a.id",
        computed_columns()
    ))
    .bind::<SqlUuid, _>(contact)
    .load(conn)
    .await
    .map_err(DbError::from)?)
}

/// Loads one affiliation visible in the transaction's scope.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<AffiliationRow>, Error> {
    let rows: Vec<AffiliationRow> =
        diesel::sql_query(format!("SELECT {COLUMNS}, {} FROM {FROM} WHERE a.id = $1", computed_columns()))
            .bind::<SqlUuid, _>(id)
            .load(conn)
            .await
            .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// [`load`] with the row locked for the rest of the transaction.
async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<AffiliationRow>, Error> {
    diesel::sql_query("SELECT 1 FROM affiliations WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

/// The fields an update may name.
const UPDATABLE: &[&str] = &["roles", "job_title", "start_date", "end_date"];

/// Copies the fields named in `mask` from `from` into `into`.
fn apply_mask(into: &mut Affiliation, from: Affiliation, mask: &FieldMask) {
    let Affiliation { roles, job_title, start_date, end_date, .. } = from;
    let set = |path: &str| mask.contains(path);
    if set("roles") {
        into.roles = roles;
    }
    if set("job_title") {
        into.job_title = job_title;
    }
    if set("start_date") {
        into.start_date = start_date;
    }
    if set("end_date") {
        into.end_date = end_date;
    }
}

/// The SQL order and keyset condition of a list order ($6 and $7 are the
/// keyset binds).
struct Order {
    sql: &'static str,
    after: &'static str,
    key: fn(&AffiliationRow) -> String,
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "contact_display_name" => Order {
            sql: "contact_key, a.id",
            after: "(socle_fold(btrim(c.given_name || ' ' || c.family_name)), a.id) > ($6::text, $7::uuid)",
            key: |r| r.contact_key.clone(),
        },
        "organization_legal_name" => Order {
            sql: "o.name_key, a.id",
            after: "(o.name_key, a.id) > ($6::text, $7::uuid)",
            key: |r| r.organization_key.clone(),
        },
        "start_date desc" => Order {
            // Unknown start dates last.
            sql: "coalesce(a.start_date, '0001-01-01'::date) DESC, a.id DESC",
            after: "(coalesce(a.start_date, '0001-01-01'::date), a.id) < ($6::date, $7::uuid)",
            key: |r| r.start_date.map_or_else(|| "0001-01-01".to_owned(), |d| d.to_string()),
        },
        _ => {
            return Err(Error::invalid_field(
                "order_by",
                "must be one of: contact_display_name, organization_legal_name, start_date desc",
            ));
        }
    })
}

impl Crm {
    pub async fn create_affiliation(&self, caller: &Caller, r: CreateAffiliationRequest) -> Result<Affiliation, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let affiliation = r.affiliation.unwrap_or_default();
        let entity = parse_id("affiliation.entity_id", &affiliation.entity_id).map_err(|e| absorb(&mut v, e));
        let contact = parse_id("affiliation.contact_id", &affiliation.contact_id).map_err(|e| absorb(&mut v, e));
        let organization =
            parse_id("affiliation.organization_id", &affiliation.organization_id).map_err(|e| absorb(&mut v, e));
        let input = validate(&affiliation, "affiliation").map_err(|e| absorb(&mut v, e));
        v.into_result()?;
        let (Ok(key), Ok(entity), Ok(contact), Ok(organization), Ok(input)) =
            (key, entity, contact, organization, input)
        else {
            return Err(Error::internal("violations were reported"));
        };
        let acting = caller.with_acting(entity);
        let readable = self.scope(&acting, "crm.affiliations.read").await?;
        let contacts = self.scope(&acting, "crm.contacts.read").await?;
        let organizations = self.scope(&acting, "crm.organizations.read").await?;
        let write_scope = EntityScope::entity(entity);
        let tx_scope = write_scope.clone();
        self.db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "CreateAffiliation", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(row.to_proto());
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    // The contact and the organisation, as the caller sees them.
                    let mut v = Violations::new();
                    let found = references(conn, Named::Contact, &[contact], &contacts).await?;
                    let field = "affiliation.contact_id".to_owned();
                    check_reference(&mut v, field, Named::Contact, contact, &found, entity, "l'affiliation");
                    let found = references(conn, Named::Organization, &[organization], &organizations).await?;
                    let field = "affiliation.organization_id".to_owned();
                    check_reference(&mut v, field, Named::Organization, organization, &found, entity, "l'affiliation");
                    v.into_result()?;
                    socle_db::set_scope(conn, &write_scope).await.map_err(DbError::from)?;
                    refuse_second_current(conn, contact, organization, None, input.end_date).await?;
                    let row = NewAffiliation {
                        id,
                        entity,
                        contact,
                        organization,
                        roles: input.roles.clone(),
                        job_title: input.job_title.clone(),
                        start_date: input.start_date,
                        end_date: input.end_date,
                    };
                    insert(conn, row).await
                })
            })
            .await
    }

    pub async fn get_affiliation(&self, caller: &Caller, id: &str) -> Result<Affiliation, Error> {
        let id = parse_id("affiliation_id", id)?;
        let scope = self.scope(caller, "crm.affiliations.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "affiliations", id, "crm.affiliations.read", "affiliation").await),
        }
    }

    pub async fn list_affiliations(
        &self,
        caller: &Caller,
        r: ListAffiliationsRequest,
    ) -> Result<ListAffiliationsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let mut v = Violations::new();
        let organization =
            socle_api::parse_optional_id("organization_id", &r.organization_id).map_err(|e| absorb(&mut v, e));
        let contact = socle_api::parse_optional_id("contact_id", &r.contact_id).map_err(|e| absorb(&mut v, e));
        let mut roles = Vec::new();
        for (i, role) in r.roles.iter().enumerate() {
            match AffiliationRole::try_from(*role) {
                Ok(AffiliationRole::Unspecified) | Err(_) => v.add(format!("roles[{i}]"), "rôle inconnu"),
                Ok(role) => roles.push(role as i16),
            }
        }
        v.into_result()?;
        let (Ok(organization), Ok(contact)) = (organization, contact) else {
            return Err(Error::internal("violations were reported"));
        };
        roles.sort_unstable();
        roles.dedup();
        let fingerprint = format!(
            "{entity}|{}|{order_by}|{organization:?}|{contact:?}|{roles:?}|{}",
            r.include_descendants, r.include_ended
        );
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.affiliations.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "SELECT {COLUMNS}, {computed} FROM {FROM}
              WHERE a.entity_id = ANY($1)
                AND ($2::uuid IS NULL OR a.organization_id = $2)
                AND ($3::uuid IS NULL OR a.contact_id = $3)
                AND (cardinality($4::smallint[]) = 0 OR a.roles && $4)
                AND ($5 OR a.end_date IS NULL OR a.end_date >= {TODAY_SQL})
                AND ($6::text IS NULL OR {after})
              ORDER BY {order} LIMIT {limit}",
            computed = computed_columns(),
            after = order.after,
            order = order.sql,
            limit = size + 1
        );
        let include_ended = r.include_ended;
        let mut rows: Vec<AffiliationRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<Array<SqlUuid>, _>(entities)
                        .bind::<Nullable<SqlUuid>, _>(organization)
                        .bind::<Nullable<SqlUuid>, _>(contact)
                        .bind::<Array<SmallInt>, _>(roles)
                        .bind::<Bool, _>(include_ended)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.1))
                        .load(conn)
                        .await
                        .map_err(DbError::from)
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            PageToken::encode(((order.key)(last), last.id), &fingerprint)
        } else {
            String::new()
        };
        Ok(ListAffiliationsResponse {
            affiliations: rows.iter().map(AffiliationRow::to_proto).collect(),
            next_page_token,
        })
    }

    pub async fn update_affiliation(&self, caller: &Caller, r: UpdateAffiliationRequest) -> Result<Affiliation, Error> {
        let id = parse_id("affiliation_id", &r.affiliation_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.affiliation.ok_or_else(|| Error::invalid_field("affiliation", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.affiliations.update").await?;
        let etag_given = r.etag.clone();
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, true)?;
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let input = validate(&next, "affiliation")?;
                    refuse_second_current(conn, current.contact_id, current.organization_id, Some(id), input.end_date)
                        .await?;
                    let updated = diesel::sql_query(
                        "UPDATE affiliations SET roles = $1, job_title = $2, start_date = $3, end_date = $4,
                            version = version + 1, update_time = now()
                         WHERE id = $5 AND version = $6",
                    )
                    .bind::<Array<SmallInt>, _>(input.roles.clone())
                    .bind::<Text, _>(input.job_title.clone())
                    .bind::<Nullable<Date>, _>(input.start_date)
                    .bind::<Nullable<Date>, _>(input.end_date)
                    .bind::<SqlUuid, _>(id)
                    .bind::<BigInt, _>(current.version)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if updated != 1 {
                        return Err(Error::etag_mismatch());
                    }
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.affiliations.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(affiliation) => Ok(affiliation),
            None => Err(self.not_found(caller, "affiliations", id, "crm.affiliations.update", "affiliation").await),
        }
    }

    pub async fn delete_affiliation(&self, caller: &Caller, r: DeleteAffiliationRequest) -> Result<(), Error> {
        let id = parse_id("affiliation_id", &r.affiliation_id)?;
        let scope = self.scope(caller, "crm.affiliations.delete").await?;
        let etag_given = r.etag.clone();
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    check_etag(&etag_given, current.version, false)?;
                    let before = current.to_proto();
                    diesel::sql_query("DELETE FROM affiliations WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    audit(conn, "crm.affiliations.delete", Some(&before), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_found(caller, "affiliations", id, "crm.affiliations.delete", "affiliation").await)
        }
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl AffiliationService for Crm {
    async fn create_affiliation(
        &self,
        request: Request<CreateAffiliationRequest>,
    ) -> Result<Response<CreateAffiliationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::create_affiliation(self, &caller, request.into_inner()).await;
        reply(result.map(|a| CreateAffiliationResponse { affiliation: Some(a) }), request_id)
    }

    async fn get_affiliation(
        &self,
        request: Request<GetAffiliationRequest>,
    ) -> Result<Response<GetAffiliationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_affiliation(self, &caller, &request.get_ref().affiliation_id).await;
        reply(result.map(|a| GetAffiliationResponse { affiliation: Some(a) }), request_id)
    }

    async fn list_affiliations(
        &self,
        request: Request<ListAffiliationsRequest>,
    ) -> Result<Response<ListAffiliationsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_affiliations(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_affiliation(
        &self,
        request: Request<UpdateAffiliationRequest>,
    ) -> Result<Response<UpdateAffiliationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::update_affiliation(self, &caller, request.into_inner()).await;
        reply(result.map(|a| UpdateAffiliationResponse { affiliation: Some(a) }), request_id)
    }

    async fn delete_affiliation(
        &self,
        request: Request<DeleteAffiliationRequest>,
    ) -> Result<Response<DeleteAffiliationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::delete_affiliation(self, &caller, request.into_inner()).await;
        reply(result.map(|()| DeleteAffiliationResponse {}), request_id)
    }
}

/// An affiliation to write, its references checked by the caller.
pub(crate) struct NewAffiliation {
    pub id: Uuid,
    pub entity: Uuid,
    pub contact: Uuid,
    pub organization: Uuid,
    pub roles: Vec<i16>,
    pub job_title: String,
    pub start_date: Option<NaiveDate>,
    pub end_date: Option<NaiveDate>,
}

/// Inserts an affiliation and emits its audit event (the create path of
/// CreateAffiliation and of the contacts' imports).
pub(crate) async fn insert(conn: &mut AsyncPgConnection, row: NewAffiliation) -> Result<Affiliation, Error> {
    diesel::sql_query(
        "INSERT INTO affiliations (id, entity_id, contact_id, organization_id, roles, job_title, start_date, end_date)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind::<SqlUuid, _>(row.id)
    .bind::<SqlUuid, _>(row.entity)
    .bind::<SqlUuid, _>(row.contact)
    .bind::<SqlUuid, _>(row.organization)
    .bind::<Array<SmallInt>, _>(row.roles)
    .bind::<Text, _>(row.job_title)
    .bind::<Nullable<Date>, _>(row.start_date)
    .bind::<Nullable<Date>, _>(row.end_date)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    let created = load(conn, row.id).await?.ok_or_else(|| Error::internal("created row not found"))?.to_proto();
    audit(conn, "crm.affiliations.create", None, Some(&created)).await?;
    Ok(created)
}
