//! Membership types (`socle.crm.v1.MembershipTypeService`): the kinds of
//! membership an entity offers, their yearly dues (with brackets by
//! headcount band), period layout and grace period. A type offered to
//! descendants is usable, read-only, by every entity below its owner: the
//! acting entity's ancestors (from tenancy, see [`crate::ancestry`]) are set
//! for the transaction, and the `membership_types_offered` row-level
//! security policy lets their offered types be read, never written.
//! Every write is audited in its transaction.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use socle_api::{FieldMask, PageToken, Violations, check_etag, page_size, parse_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{membership_type_service_server::MembershipTypeService, *},
    r#type::v1::Money,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    ancestry::set_ancestors,
    common::{Audited, Caller, TODAY_SQL, absorb, audit, etag, reply, rid, timestamp},
    memberships::Memberships,
};

/// The only currency of dues.
pub(crate) const CURRENCY: &str = "EUR";
/// The largest amount accepted (10 million euros, in cents).
const MAX_CENTS: i64 = 1_000_000_000;
/// The grace period of a type created without one.
const DEFAULT_GRACE_DAYS: i32 = 90;

/// The columns of [`TypeRow`], over `membership_types t`, with the number
/// of memberships of the type currently ACTIVE or GRACE (those the caller's
/// scope shows), in the same statement.
fn columns() -> String {
    format!(
        "t.id, t.entity_id, t.code, t.display_name, t.description, t.yearly_dues_cents, t.currency_code,
         t.dues_brackets, t.period_kind, t.grace_period_days, t.offered_to_descendants, t.archived, t.version,
         t.create_time, t.update_time, socle_fold(t.display_name) AS name_key,
         (SELECT count(*) FROM memberships m WHERE m.membership_type_id = t.id
             AND crm_membership_period_status(m.start_date, m.end_date, m.grace_end_date, m.cancel_date,
                 EXISTS (SELECT 1 FROM memberships n WHERE n.previous_membership_id = m.id), {TODAY_SQL})
                 IN (3, 4))::int AS active_membership_count"
    )
}

/// One membership type as stored.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct TypeRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = Text)]
    pub code: String,
    #[diesel(sql_type = Text)]
    pub display_name: String,
    #[diesel(sql_type = Text)]
    description: String,
    #[diesel(sql_type = BigInt)]
    yearly_dues_cents: i64,
    #[diesel(sql_type = Text)]
    currency_code: String,
    #[diesel(sql_type = Jsonb)]
    dues_brackets: serde_json::Value,
    #[diesel(sql_type = SmallInt)]
    pub period_kind: i16,
    #[diesel(sql_type = Integer)]
    pub grace_period_days: i32,
    #[diesel(sql_type = Bool)]
    pub offered_to_descendants: bool,
    #[diesel(sql_type = Bool)]
    pub archived: bool,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    name_key: String,
    #[diesel(sql_type = Integer)]
    active_membership_count: i32,
}

/// A dues bracket as stored in `membership_types.dues_brackets`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredBracket {
    headcount_band: i32,
    amount_cents: i64,
}

/// An amount in euros.
pub(crate) fn money(cents: i64) -> Money {
    Money { amount_cents: cents, currency_code: CURRENCY.to_owned() }
}

/// Validates an amount of money (euros, not negative); `None` when invalid.
pub(crate) fn amount(v: &mut Violations, field: &str, m: &Money) -> Option<i64> {
    let currency = m.currency_code.trim().to_ascii_uppercase();
    let mut ok = true;
    if !currency.is_empty() && currency != CURRENCY {
        v.add(format!("{field}.currency_code"), "seul l'euro (EUR) est accepté");
        ok = false;
    }
    if !(0..=MAX_CENTS).contains(&m.amount_cents) {
        v.add(format!("{field}.amount_cents"), "montant attendu entre 0 et 10 000 000 €, en centimes");
        ok = false;
    }
    ok.then_some(m.amount_cents)
}

impl TypeRow {
    fn brackets(&self) -> Vec<StoredBracket> {
        serde_json::from_value(self.dues_brackets.clone()).unwrap_or_default()
    }

    /// The yearly dues of a company in `band`: its bracket, else the
    /// default yearly dues.
    pub(crate) fn dues_for(&self, band: i16) -> i64 {
        self.brackets()
            .iter()
            .find(|b| b.headcount_band == i32::from(band) && band != 0)
            .map_or(self.yearly_dues_cents, |b| b.amount_cents)
    }

    /// Whether memberships of `entity` (whose ancestors are `ancestors`) may
    /// use this type: its own, or one an ancestor offers to descendants.
    pub(crate) fn usable_by(&self, entity: Uuid, ancestors: &[Uuid]) -> bool {
        self.entity_id == entity || (self.offered_to_descendants && ancestors.contains(&self.entity_id))
    }

    pub(crate) fn to_proto(&self) -> MembershipType {
        MembershipType {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            code: self.code.clone(),
            display_name: self.display_name.clone(),
            description: self.description.clone(),
            yearly_dues: Some(Money {
                amount_cents: self.yearly_dues_cents,
                currency_code: self.currency_code.clone(),
            }),
            dues_brackets: self
                .brackets()
                .into_iter()
                .map(|b| DuesBracket { headcount_band: b.headcount_band, amount: Some(money(b.amount_cents)) })
                .collect(),
            period_kind: i32::from(self.period_kind),
            grace_period_days: self.grace_period_days,
            offered_to_descendants: self.offered_to_descendants,
            archived: self.archived,
            active_membership_count: self.active_membership_count,
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

impl Audited for MembershipType {
    const RESOURCE_TYPE: &'static str = "crm.membership_type";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

/// A validated membership type, ready to be written.
#[derive(Debug, Clone, Default)]
struct TypeInput {
    code: String,
    display_name: String,
    description: String,
    yearly_dues_cents: i64,
    brackets: Vec<StoredBracket>,
    period_kind: i16,
    grace_period_days: i32,
    offered_to_descendants: bool,
    archived: bool,
}

/// Validates and normalises `t` (fields under `membership_type.`). On
/// create, a zero grace period means the default (90 days); an update
/// naming `grace_period_days` sets it as given.
fn validate(t: &MembershipType, creating: bool) -> Result<TypeInput, Error> {
    let field = |name: &str| format!("membership_type.{name}");
    let mut v = Violations::new();
    let mut input =
        TypeInput { offered_to_descendants: t.offered_to_descendants, archived: t.archived, ..TypeInput::default() };
    input.code = t.code.trim().to_ascii_uppercase();
    let code_ok = !input.code.is_empty()
        && input.code.len() <= 32
        && input.code.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && input.code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if input.code.is_empty() {
        v.add(field("code"), "le code est obligatoire");
    } else if !code_ok {
        v.add(field("code"), "code de 1 à 32 caractères : lettres, chiffres, - et _, par exemple STD ou SOUTIEN");
    }
    input.display_name = t.display_name.split_whitespace().collect::<Vec<_>>().join(" ");
    if input.display_name.is_empty() {
        v.add(field("display_name"), "le libellé est obligatoire");
    } else if input.display_name.chars().count() > 200 || input.display_name.chars().any(char::is_control) {
        v.add(field("display_name"), "le libellé doit faire au plus 200 caractères, sans caractère de contrôle");
    }
    input.description = t.description.trim().to_owned();
    v.check(input.description.chars().count() <= 5_000, &field("description"), "au plus 5 000 caractères");
    match &t.yearly_dues {
        Some(m) => input.yearly_dues_cents = amount(&mut v, &field("yearly_dues"), m).unwrap_or_default(),
        None => v.add(field("yearly_dues"), "la cotisation annuelle est obligatoire"),
    }
    for (i, bracket) in t.dues_brackets.iter().enumerate() {
        let at = |name: &str| format!("membership_type.dues_brackets[{i}].{name}");
        let band = match HeadcountBand::try_from(bracket.headcount_band) {
            Ok(HeadcountBand::Unspecified) | Err(_) => {
                v.add(at("headcount_band"), "la tranche d'effectif est obligatoire");
                continue;
            }
            Ok(band) => band as i32,
        };
        if input.brackets.iter().any(|b| b.headcount_band == band) {
            v.add(at("headcount_band"), "une seule cotisation par tranche d'effectif");
            continue;
        }
        let Some(m) = &bracket.amount else {
            v.add(at("amount"), "le montant est obligatoire");
            continue;
        };
        if let Some(cents) = amount(&mut v, &at("amount"), m) {
            input.brackets.push(StoredBracket { headcount_band: band, amount_cents: cents });
        }
    }
    input.brackets.sort_by_key(|b| b.headcount_band);
    input.period_kind = match MembershipPeriodKind::try_from(t.period_kind) {
        Ok(MembershipPeriodKind::Unspecified) => MembershipPeriodKind::CalendarYear as i16,
        Ok(kind) => kind as i16,
        Err(_) => {
            v.add(field("period_kind"), "type de période inconnu");
            0
        }
    };
    input.grace_period_days = match t.grace_period_days {
        0 if creating => DEFAULT_GRACE_DAYS,
        days @ 0..=366 => days,
        _ => {
            v.add(field("grace_period_days"), "délai de grâce attendu entre 0 et 366 jours");
            0
        }
    };
    v.into_result()?;
    Ok(input)
}

/// The fields an update may name.
const UPDATABLE: &[&str] = &[
    "code",
    "display_name",
    "description",
    "yearly_dues",
    "dues_brackets",
    "period_kind",
    "grace_period_days",
    "offered_to_descendants",
    "archived",
];

/// Copies the fields named in `mask` from `from` into `into`.
fn apply_mask(into: &mut MembershipType, from: MembershipType, mask: &FieldMask) {
    let MembershipType {
        code,
        display_name,
        description,
        yearly_dues,
        dues_brackets,
        period_kind,
        grace_period_days,
        offered_to_descendants,
        archived,
        ..
    } = from;
    let set = |path: &str| mask.contains(path);
    if set("code") {
        into.code = code;
    }
    if set("display_name") {
        into.display_name = display_name;
    }
    if set("description") {
        into.description = description;
    }
    if set("yearly_dues") {
        into.yearly_dues = yearly_dues;
    }
    if set("dues_brackets") {
        into.dues_brackets = dues_brackets;
    }
    if set("period_kind") {
        into.period_kind = period_kind;
    }
    if set("grace_period_days") {
        into.grace_period_days = grace_period_days;
    }
    if set("offered_to_descendants") {
        into.offered_to_descendants = offered_to_descendants;
    }
    if set("archived") {
        into.archived = archived;
    }
}

type Boxed<'f> = diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Binds $1 to $9 of the insert and update statements.
fn bind_input<'f>(query: Boxed<'f>, input: &TypeInput) -> Boxed<'f> {
    query
        .bind::<Text, _>(input.code.clone())
        .bind::<Text, _>(input.display_name.clone())
        .bind::<Text, _>(input.description.clone())
        .bind::<BigInt, _>(input.yearly_dues_cents)
        .bind::<Jsonb, _>(serde_json::to_value(&input.brackets).unwrap_or_default())
        .bind::<SmallInt, _>(input.period_kind)
        .bind::<Integer, _>(input.grace_period_days)
        .bind::<Bool, _>(input.offered_to_descendants)
        .bind::<Bool, _>(input.archived)
}

/// Loads one membership type visible in the transaction (its scope, plus
/// the types its ancestors offer).
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<TypeRow>, Error> {
    let rows: Vec<TypeRow> = diesel::sql_query(format!("SELECT {} FROM membership_types t WHERE t.id = $1", columns()))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// The membership types with these codes visible in the transaction, in
/// one statement (imports naming types by code).
pub(crate) async fn load_by_codes(conn: &mut AsyncPgConnection, codes: &[String]) -> Result<Vec<TypeRow>, Error> {
    Ok(diesel::sql_query(format!("SELECT {} FROM membership_types t WHERE t.code = ANY($1)", columns()))
        .bind::<Array<Text>, _>(codes)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

/// [`load`] with the row locked (only rows the scope may write can be).
async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<TypeRow>, Error> {
    diesel::sql_query("SELECT 1 FROM membership_types WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

/// Refuses a code another type of the same entity has (`ALREADY_EXISTS`).
async fn check_code_free(conn: &mut AsyncPgConnection, entity: Uuid, code: &str, id: Uuid) -> Result<(), Error> {
    let taken: crate::common::Count =
        diesel::sql_query("SELECT count(*) AS n FROM membership_types WHERE entity_id = $1 AND code = $2 AND id <> $3")
            .bind::<SqlUuid, _>(entity)
            .bind::<Text, _>(code)
            .bind::<SqlUuid, _>(id)
            .get_result(conn)
            .await
            .map_err(DbError::from)?;
    if taken.n > 0 {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("un type d'adhésion de code {code} existe déjà dans cette entité"),
        )
        .with_reason("CODE_TAKEN"));
    }
    Ok(())
}

/// How many memberships use a type, in every entity, and how many of them
/// belong to other entities than the type's own.
#[derive(QueryableByName)]
struct Usage {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = BigInt)]
    elsewhere: i64,
}

async fn usage(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Usage, Error> {
    Ok(diesel::sql_query("SELECT total, elsewhere FROM crm_membership_type_usage($1)")
        .bind::<SqlUuid, _>(id)
        .get_result(conn)
        .await
        .map_err(DbError::from)?)
}

/// The refusal to change a type offered by an ancestor.
fn inherited() -> Error {
    Error::permission_denied(
        "ce type d'adhésion est proposé par une entité parente : seule celle-ci peut le modifier ou le supprimer",
    )
    .with_reason("INHERITED_MEMBERSHIP_TYPE")
}

/// The SQL order and keyset condition of a list order.
struct Order {
    sql: &'static str,
    after: &'static str,
    key: fn(&TypeRow) -> String,
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "display_name" => Order {
            sql: "socle_fold(t.display_name), t.id",
            after: "(socle_fold(t.display_name), t.id) > ($5::text, $6::uuid)",
            key: |r| r.name_key.clone(),
        },
        "code" => {
            Order { sql: "t.code, t.id", after: "(t.code, t.id) > ($5::text, $6::uuid)", key: |r| r.code.clone() }
        }
        _ => return Err(Error::invalid_field("order_by", "must be one of: display_name, code")),
    })
}

impl Memberships {
    /// The ancestors of the acting entity (none when it is not given).
    pub(crate) async fn acting_ancestors(&self, caller: &Caller) -> Result<Vec<Uuid>, Error> {
        match caller.acting.as_deref().and_then(|a| Uuid::parse_str(a).ok()) {
            Some(entity) => self.ancestry.of(entity).await,
            None => Ok(Vec::new()),
        }
    }

    pub async fn create_membership_type(
        &self,
        caller: &Caller,
        r: CreateMembershipTypeRequest,
    ) -> Result<MembershipType, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let t = r.membership_type.unwrap_or_default();
        let entity = parse_id("membership_type.entity_id", &t.entity_id).map_err(|e| absorb(&mut v, e));
        let input = validate(&t, true).map_err(|e| absorb(&mut v, e));
        v.into_result()?;
        let (Ok(key), Ok(entity), Ok(input)) = (key, entity, input) else {
            return Err(Error::internal("violations were reported"));
        };
        let readable = self.scope(&caller.with_acting(entity), "crm.membership_types.read").await?;
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "CreateMembershipType", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(row.to_proto());
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    check_code_free(conn, entity, &input.code, id).await?;
                    let query = diesel::sql_query(
                        "INSERT INTO membership_types (id, entity_id, code, display_name, description,
                            yearly_dues_cents, dues_brackets, period_kind, grace_period_days,
                            offered_to_descendants, archived)
                         VALUES ($10, $11, $1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .into_boxed();
                    bind_input(query, &input)
                        .bind::<SqlUuid, _>(id)
                        .bind::<SqlUuid, _>(entity)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    let created = load(conn, id).await?.ok_or_else(|| Error::internal("created row not found"))?;
                    let created = created.to_proto();
                    audit(conn, "crm.membership_types.create", None, Some(&created)).await?;
                    Ok(created)
                })
            })
            .await
    }

    pub async fn get_membership_type(&self, caller: &Caller, id: &str) -> Result<MembershipType, Error> {
        let id = parse_id("membership_type_id", id)?;
        let scope = self.scope(caller, "crm.membership_types.read").await?;
        let ancestors = self.acting_ancestors(caller).await?;
        let row = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    load(conn, id).await
                })
            })
            .await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self
                .not_found(caller, "membership_types", id, "crm.membership_types.read", "membership type")
                .await),
        }
    }

    pub async fn list_membership_types(
        &self,
        caller: &Caller,
        r: ListMembershipTypesRequest,
    ) -> Result<ListMembershipTypesResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let fingerprint = format!("{entity}|{order_by}|{}|{}", r.exclude_inherited, r.include_archived);
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.membership_types.read", entity, false).await?;
        let ancestors = if r.exclude_inherited { Vec::new() } else { self.ancestry.of(entity).await? };
        let sql = format!(
            "SELECT {} FROM membership_types t
              WHERE (t.entity_id = $1 OR (NOT $2 AND t.offered_to_descendants AND t.entity_id = ANY($3)))
                AND ($4 OR NOT t.archived)
                AND ($5::text IS NULL OR {})
              ORDER BY {} LIMIT {}",
            columns(),
            order.after,
            order.sql,
            size + 1
        );
        let (exclude, archived) = (r.exclude_inherited, r.include_archived);
        let mut rows: Vec<TypeRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    diesel::sql_query(sql)
                        .bind::<SqlUuid, _>(entity)
                        .bind::<Bool, _>(exclude)
                        .bind::<Array<SqlUuid>, _>(ancestors)
                        .bind::<Bool, _>(archived)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.1))
                        .load(conn)
                        .await
                        .map_err(|e| Error::from(DbError::from(e)))
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
        Ok(ListMembershipTypesResponse {
            membership_types: rows.iter().map(TypeRow::to_proto).collect(),
            next_page_token,
        })
    }

    pub async fn update_membership_type(
        &self,
        caller: &Caller,
        r: UpdateMembershipTypeRequest,
    ) -> Result<MembershipType, Error> {
        let id = parse_id("membership_type_id", &r.membership_type_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.membership_type.ok_or_else(|| Error::invalid_field("membership_type", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.membership_types.manage").await?;
        let ancestors = self.acting_ancestors(caller).await?;
        let etag_given = r.etag.clone();
        let writable = scope.clone();
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    if !writable.allows(current.entity_id) {
                        return Err(inherited());
                    }
                    check_etag(&etag_given, current.version, true)?;
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let input = validate(&next, false)?;
                    if input.code != current.code {
                        check_code_free(conn, current.entity_id, &input.code, id).await?;
                    }
                    if current.offered_to_descendants && !input.offered_to_descendants {
                        let used = usage(conn, id).await?;
                        if used.elsewhere > 0 {
                            return Err(Error::new(
                                Code::FailedPrecondition,
                                format!(
                                    "{} adhésion(s) d'entités descendantes utilisent ce type : il ne peut plus \
                                     leur être retiré ; archivez-le plutôt (archived)",
                                    used.elsewhere
                                ),
                            )
                            .with_reason("MEMBERSHIP_TYPE_USED_BY_DESCENDANTS"));
                        }
                    }
                    let query = diesel::sql_query(
                        "UPDATE membership_types SET code = $1, display_name = $2, description = $3,
                            yearly_dues_cents = $4, dues_brackets = $5, period_kind = $6, grace_period_days = $7,
                            offered_to_descendants = $8, archived = $9, version = version + 1, update_time = now()
                         WHERE id = $10 AND version = $11",
                    )
                    .into_boxed();
                    let updated = bind_input(query, &input)
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
                    audit(conn, "crm.membership_types.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(t) => Ok(t),
            None => Err(self
                .not_found(caller, "membership_types", id, "crm.membership_types.manage", "membership type")
                .await),
        }
    }

    pub async fn delete_membership_type(&self, caller: &Caller, r: DeleteMembershipTypeRequest) -> Result<(), Error> {
        let id = parse_id("membership_type_id", &r.membership_type_id)?;
        let scope = self.scope(caller, "crm.membership_types.manage").await?;
        let ancestors = self.acting_ancestors(caller).await?;
        let etag_given = r.etag.clone();
        let writable = scope.clone();
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    if !writable.allows(current.entity_id) {
                        return Err(inherited());
                    }
                    check_etag(&etag_given, current.version, false)?;
                    let used = usage(conn, id).await?;
                    if used.total > 0 {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            format!(
                                "{} adhésion(s) utilisent ce type : il ne peut pas être supprimé ; archivez-le \
                                 plutôt (archived)",
                                used.total
                            ),
                        )
                        .with_reason("MEMBERSHIP_TYPE_IN_USE"));
                    }
                    let before = current.to_proto();
                    diesel::sql_query("DELETE FROM membership_types WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    audit(conn, "crm.membership_types.delete", Some(&before), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_found(caller, "membership_types", id, "crm.membership_types.manage", "membership type").await)
        }
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl MembershipTypeService for Memberships {
    async fn create_membership_type(
        &self,
        request: Request<CreateMembershipTypeRequest>,
    ) -> Result<Response<CreateMembershipTypeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::create_membership_type(self, &caller, request.into_inner()).await;
        reply(result.map(|t| CreateMembershipTypeResponse { membership_type: Some(t) }), request_id)
    }

    async fn get_membership_type(
        &self,
        request: Request<GetMembershipTypeRequest>,
    ) -> Result<Response<GetMembershipTypeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::get_membership_type(self, &caller, &request.get_ref().membership_type_id).await;
        reply(result.map(|t| GetMembershipTypeResponse { membership_type: Some(t) }), request_id)
    }

    async fn list_membership_types(
        &self,
        request: Request<ListMembershipTypesRequest>,
    ) -> Result<Response<ListMembershipTypesResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Memberships::list_membership_types(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_membership_type(
        &self,
        request: Request<UpdateMembershipTypeRequest>,
    ) -> Result<Response<UpdateMembershipTypeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::update_membership_type(self, &caller, request.into_inner()).await;
        reply(result.map(|t| UpdateMembershipTypeResponse { membership_type: Some(t) }), request_id)
    }

    async fn delete_membership_type(
        &self,
        request: Request<DeleteMembershipTypeRequest>,
    ) -> Result<Response<DeleteMembershipTypeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::delete_membership_type(self, &caller, request.into_inner()).await;
        reply(result.map(|()| DeleteMembershipTypeResponse {}), request_id)
    }
}
