//! Memberships (`socle.crm.v1.MembershipService`): an organisation's
//! membership periods ("adhésions"), their dues and payment.
//!
//! - Periods: calendar year (1 January to 31 December of the start's year)
//!   or anniversary (one year from the start, minus a day), from the type
//!   unless an end date is given; the grace period ends `grace_period_days`
//!   after the end. Periods of one organisation never overlap, except with
//!   the part of a cancelled period after its cancellation took effect
//!   (`FAILED_PRECONDITION`, checked under a lock on the organisation).
//! - Dues default from the type: the bracket of the organisation's headcount
//!   band, else the type's yearly dues; later changes of the type never
//!   touch existing periods.
//! - Payment: the status follows the amounts when not given (nothing paid:
//!   unpaid, less than the dues: partially paid, the dues or more: paid).
//!   A status must agree with the amounts: unpaid means nothing received,
//!   partially paid less than the dues, paid at least the dues (an
//!   overpayment is recorded as received, e.g. a cheque paid twice until it
//!   is refunded), waived at most the dues; refunded accepts any amount.
//! - History: a renewal creates the next period (starting the day after
//!   the end) linked to the previous one, idempotently (`request_id`); a
//!   period created by hand starting the day after an unlinked period of
//!   the organisation ends is linked the same way. A renewed period cannot
//!   be renewed again, cancelled or deleted (`FAILED_PRECONDITION`): cancel
//!   or delete its successor first.
//! - Status (computed in SQL, `crm_membership_period_status`): upcoming
//!   before the start, active within the period, then grace until the grace
//!   end unless renewed, then expired; cancelled from the cancellation date
//!   (which must fall within the period or its grace period).
//! - Updates: a new start date without an end date lays the period out
//!   again from the type; a new type brings its dues (unless `dues_amount`
//!   is given) and grace period, never new dates.
//! - Lists: `active_on_date` keeps the periods containing the day and not
//!   cancelled by then; `not_renewed` those without a successor.
//! - Types offered by ancestors: the ancestors of the membership's entity
//!   (tenancy, cached) are set for the transaction (see [`crate::ancestry`]);
//!   a type is usable when it is the entity's own or offered by one of them,
//!   and not archived.
//! - Every transaction that writes memberships calls
//!   `crm_refresh_membership`, so that the organisation's status, current
//!   membership and member-since date (and the inherited status of its
//!   contacts) stay right, and audits each change in its transaction.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Date, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, page_size, parse_id, parse_optional_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::crm::v1::{membership_service_server::MembershipService, *};
use socle_server::remote_auth::PlatformClients;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    ancestry::{Ancestry, set_ancestors},
    common::{Audited, Caller, Crm, TODAY_SQL, absorb, audit, etag, reply, rid, timestamp},
    membership_types::{self, TypeRow, amount, money},
    organizations::scope_ids,
};

/// The membership APIs' state: the CRM's, and the entities' ancestors (for
/// the membership types they offer to their descendants).
#[derive(Clone)]
pub struct Memberships {
    /// The CRM state.
    pub crm: Crm,
    /// Ancestors from tenancy, cached.
    pub ancestry: Arc<Ancestry>,
}

impl Memberships {
    /// The membership APIs over `crm`, with ancestors from tenancy through
    /// `platform` (none: `declared` mode, where entities have no ancestors).
    pub fn new(crm: Crm, platform: Option<PlatformClients>) -> Self {
        Memberships { crm, ancestry: Arc::new(Ancestry::new(platform)) }
    }
}

impl std::ops::Deref for Memberships {
    type Target = Crm;
    fn deref(&self) -> &Crm {
        &self.crm
    }
}

/// The status of `m` (with its successor `n`), as SQL.
fn status_sql() -> String {
    format!(
        "crm_membership_period_status(m.start_date, m.end_date, m.grace_end_date, m.cancel_date,
            n.id IS NOT NULL, {TODAY_SQL})"
    )
}

/// The rows of [`MembershipRow`]: every membership visible in the
/// transaction with its successor, organisation name, type name and status,
/// in one statement (a subquery aliased `m`).
pub(crate) fn source() -> String {
    format!(
        "(SELECT m.id, m.entity_id, m.organization_id, m.membership_type_id, m.start_date, m.end_date,
            m.grace_end_date, m.dues_cents, m.paid_cents, m.currency_code, m.payment_status, m.payment_date,
            m.payment_reference, m.notes, m.previous_membership_id, n.id AS next_membership_id, m.cancel_date,
            m.cancel_reason, m.version, m.create_time, m.update_time,
            coalesce(o.legal_name, '') AS organization_legal_name,
            coalesce(o.name_key, '') AS organization_name_key,
            coalesce(o.siret, '') AS organization_siret, coalesce(o.siren, '') AS organization_siren,
            coalesce(t.display_name, '') AS membership_type_display_name,
            coalesce(t.code, '') AS membership_type_code,
            {status} AS status, {TODAY_SQL} AS today
          FROM memberships m
          LEFT JOIN memberships n ON n.previous_membership_id = m.id
          LEFT JOIN organizations o ON o.id = m.organization_id
          LEFT JOIN membership_types t ON t.id = m.membership_type_id) m",
        status = status_sql()
    )
}

/// One membership as stored, with its computed fields.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct MembershipRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub organization_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    membership_type_id: Uuid,
    #[diesel(sql_type = Date)]
    start_date: NaiveDate,
    #[diesel(sql_type = Date)]
    end_date: NaiveDate,
    #[diesel(sql_type = Date)]
    grace_end_date: NaiveDate,
    #[diesel(sql_type = BigInt)]
    dues_cents: i64,
    #[diesel(sql_type = BigInt)]
    paid_cents: i64,
    #[diesel(sql_type = Text)]
    currency_code: String,
    #[diesel(sql_type = SmallInt)]
    payment_status: i16,
    #[diesel(sql_type = Nullable<Date>)]
    payment_date: Option<NaiveDate>,
    #[diesel(sql_type = Text)]
    payment_reference: String,
    #[diesel(sql_type = Text)]
    notes: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    previous_membership_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    next_membership_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Date>)]
    cancel_date: Option<NaiveDate>,
    #[diesel(sql_type = Text)]
    cancel_reason: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    organization_legal_name: String,
    #[diesel(sql_type = Text)]
    organization_name_key: String,
    /// The organisation's SIRET and SIREN (empty when unknown): exports.
    #[diesel(sql_type = Text)]
    pub organization_siret: String,
    #[diesel(sql_type = Text)]
    pub organization_siren: String,
    #[diesel(sql_type = Text)]
    membership_type_display_name: String,
    /// The type's code: exports.
    #[diesel(sql_type = Text)]
    pub membership_type_code: String,
    #[diesel(sql_type = SmallInt)]
    status: i16,
    /// Today in Europe/Paris, as the database sees it.
    #[diesel(sql_type = Date)]
    today: NaiveDate,
}

fn date_text(date: Option<NaiveDate>) -> String {
    date.map(|d| d.to_string()).unwrap_or_default()
}

impl MembershipRow {
    pub(crate) fn to_proto(&self) -> Membership {
        Membership {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            organization_id: self.organization_id.to_string(),
            membership_type_id: self.membership_type_id.to_string(),
            start_date: self.start_date.to_string(),
            end_date: self.end_date.to_string(),
            dues_amount: Some(socle_proto::socle::r#type::v1::Money {
                amount_cents: self.dues_cents,
                currency_code: self.currency_code.clone(),
            }),
            amount_paid: Some(socle_proto::socle::r#type::v1::Money {
                amount_cents: self.paid_cents,
                currency_code: self.currency_code.clone(),
            }),
            payment_status: i32::from(self.payment_status),
            payment_date: date_text(self.payment_date),
            payment_reference: self.payment_reference.clone(),
            notes: self.notes.clone(),
            status: i32::from(self.status),
            grace_end_date: self.grace_end_date.to_string(),
            previous_membership_id: self.previous_membership_id.map(|id| id.to_string()).unwrap_or_default(),
            next_membership_id: self.next_membership_id.map(|id| id.to_string()).unwrap_or_default(),
            cancel_date: date_text(self.cancel_date),
            cancel_reason: self.cancel_reason.clone(),
            organization_legal_name: self.organization_legal_name.clone(),
            membership_type_display_name: self.membership_type_display_name.clone(),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }

    /// The last day the period may be cancelled from: its grace end.
    fn last_cancel_day(&self) -> NaiveDate {
        self.grace_end_date
    }
}

impl Audited for Membership {
    const RESOURCE_TYPE: &'static str = "crm.membership";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

/// The last day of a period of `kind` starting on `start`: 31 December of
/// the start's year (calendar year), or the day before the same date a year
/// later (anniversary; a period starting on 29 February ends on 28 February).
pub fn period_end(kind: i16, start: NaiveDate) -> NaiveDate {
    if kind == MembershipPeriodKind::Anniversary as i16 {
        let next = NaiveDate::from_ymd_opt(start.year() + 1, start.month(), start.day())
            .or_else(|| NaiveDate::from_ymd_opt(start.year() + 1, 3, 1))
            .unwrap_or(start);
        next.pred_opt().unwrap_or(start)
    } else {
        NaiveDate::from_ymd_opt(start.year(), 12, 31).unwrap_or(start)
    }
}

/// `end` plus `days` days.
fn plus_days(end: NaiveDate, days: i32) -> NaiveDate {
    end.checked_add_days(Days::new(u64::try_from(days).unwrap_or(0))).unwrap_or(end)
}

/// Parses a `YYYY-MM-DD` date; empty is `None`; an invalid date is a
/// violation (and `Err`).
fn parse_date(v: &mut Violations, field: &str, text: &str) -> Result<Option<NaiveDate>, ()> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        Ok(date) if text.len() == 10 && (1900..=2200).contains(&date.year()) => Ok(Some(date)),
        _ => {
            v.add(field, "date attendue au format AAAA-MM-JJ, par exemple 2026-01-01");
            Err(())
        }
    }
}

/// The payment status `status` (unspecified: from the amounts), checked
/// against the amounts; a violation on `field` otherwise.
fn payment_status(v: &mut Violations, field: &str, status: i32, dues: i64, paid: i64) -> i16 {
    let derived = if paid == 0 {
        PaymentStatus::Unpaid
    } else if paid < dues {
        PaymentStatus::PartiallyPaid
    } else {
        PaymentStatus::Paid
    };
    let status = match PaymentStatus::try_from(status) {
        Ok(PaymentStatus::Unspecified) => derived,
        Ok(s) => s,
        Err(_) => {
            v.add(field, "statut de paiement inconnu");
            return 0;
        }
    };
    let consistent = match status {
        PaymentStatus::Unspecified | PaymentStatus::Unpaid => paid == 0,
        PaymentStatus::PartiallyPaid => paid > 0 && paid < dues,
        PaymentStatus::Paid => paid >= dues,
        PaymentStatus::Waived => paid <= dues,
        PaymentStatus::Refunded => true,
    };
    if !consistent {
        let why = match status {
            PaymentStatus::PartiallyPaid => "partiellement payée : le montant reçu doit être entre 0 et la cotisation",
            PaymentStatus::Paid => "payée : le montant reçu doit couvrir la cotisation",
            PaymentStatus::Waived => "exonérée : le montant reçu ne peut dépasser la cotisation",
            _ => "impayée : aucun montant ne doit avoir été reçu",
        };
        v.add(field, format!("statut incohérent avec les montants ({why})"));
    }
    status as i16
}

/// The fields of a membership given on create or update, validated.
#[derive(Debug, Clone, Default)]
struct Given {
    organization: Option<Uuid>,
    membership_type: Option<Uuid>,
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
    dues: Option<i64>,
    paid: Option<i64>,
    payment_date: Option<NaiveDate>,
    payment_reference: String,
    notes: String,
}

/// Validates the fields of `m` (under `membership.`) that do not depend on
/// the stored records. `creating`: the ids and the start date are required.
fn validate(v: &mut Violations, m: &Membership, creating: bool) -> Result<Given, Error> {
    let field = |name: &str| format!("membership.{name}");
    let mut g = Given::default();
    let id = |v: &mut Violations, name: &str, value: &str| -> Result<Option<Uuid>, Error> {
        let parsed =
            if creating { parse_id(&field(name), value).map(Some) } else { parse_optional_id(&field(name), value) };
        match parsed {
            Ok(id) => Ok(id),
            Err(e) => absorb(v, e).map(|()| None),
        }
    };
    if creating {
        g.organization = id(v, "organization_id", &m.organization_id)?;
    }
    g.membership_type = id(v, "membership_type_id", &m.membership_type_id)?;
    g.start = parse_date(v, &field("start_date"), &m.start_date).unwrap_or_default();
    if creating && m.start_date.trim().is_empty() {
        v.add(field("start_date"), "la date de début est obligatoire");
    }
    g.end = parse_date(v, &field("end_date"), &m.end_date).unwrap_or_default();
    if let (Some(start), Some(end)) = (g.start, g.end)
        && end < start
    {
        v.add(field("end_date"), "la date de fin doit suivre la date de début");
    }
    g.dues = m.dues_amount.as_ref().and_then(|d| amount(v, &field("dues_amount"), d));
    g.paid = m.amount_paid.as_ref().and_then(|d| amount(v, &field("amount_paid"), d));
    g.payment_date = parse_date(v, &field("payment_date"), &m.payment_date).unwrap_or_default();
    g.payment_reference = m.payment_reference.trim().to_owned();
    v.check(
        g.payment_reference.chars().count() <= 200 && !g.payment_reference.chars().any(char::is_control),
        &field("payment_reference"),
        "au plus 200 caractères, sans caractère de contrôle",
    );
    g.notes = m.notes.trim().to_owned();
    v.check(g.notes.chars().count() <= 10_000, &field("notes"), "au plus 10 000 caractères");
    Ok(g)
}

/// Loads one membership visible in the transaction.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<MembershipRow>, Error> {
    let rows: Vec<MembershipRow> = diesel::sql_query(format!("SELECT * FROM {} WHERE m.id = $1", source()))
        .bind::<SqlUuid, _>(id)
        .load(conn)
        .await
        .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// [`load`] with the row locked for the rest of the transaction.
async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<MembershipRow>, Error> {
    diesel::sql_query("SELECT 1 FROM memberships WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

/// What a membership needs of its organisation.
#[derive(QueryableByName)]
struct OrgInfo {
    #[diesel(sql_type = SqlUuid)]
    entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    headcount_band: i16,
    #[diesel(sql_type = SmallInt)]
    state: i16,
}

/// Locks the organisation (its memberships' overlap checks and series are
/// then serialised) and returns what memberships need of it.
async fn lock_organization(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<OrgInfo>, Error> {
    let rows: Vec<OrgInfo> =
        diesel::sql_query("SELECT entity_id, headcount_band, state FROM organizations WHERE id = $1 FOR UPDATE")
            .bind::<SqlUuid, _>(id)
            .load(conn)
            .await
            .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// The type of a membership of `entity`: visible, its own or offered by an
/// ancestor, and not archived (unless `keep_archived`: the type it already
/// has). A violation on `field` otherwise.
async fn usable_type(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    ancestors: &[Uuid],
    field: &str,
    keep_archived: bool,
) -> Result<TypeRow, Error> {
    let row = membership_types::load(conn, id).await?.filter(|t| t.usable_by(entity, ancestors));
    match row {
        None => Err(Error::invalid_field(field, "type d'adhésion inconnu, ou non proposé à cette entité")
            .with_reason("UNKNOWN_MEMBERSHIP_TYPE")),
        Some(t) if t.archived && !keep_archived => Err(Error::invalid_field(
            field,
            "ce type d'adhésion est archivé : il ne peut plus servir à de nouvelles adhésions",
        )),
        Some(t) => Ok(t),
    }
}

/// A row id.
#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Refuses a period overlapping another period of the organisation (a
/// cancelled period counts until the day before its cancellation).
async fn check_no_overlap(
    conn: &mut AsyncPgConnection,
    organization: Uuid,
    id: Uuid,
    start: NaiveDate,
    end: NaiveDate,
) -> Result<(), Error> {
    #[derive(QueryableByName)]
    struct Clash {
        #[diesel(sql_type = Date)]
        start_date: NaiveDate,
        #[diesel(sql_type = Date)]
        end_date: NaiveDate,
    }
    let clashes: Vec<Clash> = diesel::sql_query(
        "SELECT start_date, end_date FROM memberships
          WHERE organization_id = $1 AND id <> $2 AND start_date <= $4
            AND (CASE WHEN cancel_date IS NULL THEN end_date ELSE least(end_date, cancel_date - 1) END) >= $3
          ORDER BY start_date LIMIT 1",
    )
    .bind::<SqlUuid, _>(organization)
    .bind::<SqlUuid, _>(id)
    .bind::<Date, _>(start)
    .bind::<Date, _>(end)
    .load(conn)
    .await
    .map_err(DbError::from)?;
    match clashes.into_iter().next() {
        None => Ok(()),
        Some(c) => Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "la période du {start} au {end} chevauche une autre adhésion de l'organisation (du {} au {})",
                c.start_date, c.end_date
            ),
        )
        .with_reason("OVERLAPPING_MEMBERSHIP")),
    }
}

/// The organisation's membership series, recomputed (status, current
/// membership, member-since date): in every transaction writing memberships.
async fn refresh(conn: &mut AsyncPgConnection, organization: Uuid) -> Result<(), Error> {
    diesel::sql_query("SELECT crm_refresh_membership($1)")
        .bind::<SqlUuid, _>(organization)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// Marks `id` as changed (its successor link changed) and audits it.
async fn touch(conn: &mut AsyncPgConnection, before: &MembershipRow) -> Result<MembershipRow, Error> {
    diesel::sql_query("UPDATE memberships SET version = version + 1, update_time = now() WHERE id = $1")
        .bind::<SqlUuid, _>(before.id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    let after = load(conn, before.id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
    audit(conn, "crm.memberships.update", Some(&before.to_proto()), Some(&after.to_proto())).await?;
    Ok(after)
}

/// The values of a new period, ready to be inserted.
struct NewPeriod {
    id: Uuid,
    entity: Uuid,
    organization: Uuid,
    membership_type: Uuid,
    start: NaiveDate,
    end: NaiveDate,
    grace_end: NaiveDate,
    dues: i64,
    paid: i64,
    payment_status: i16,
    payment_date: Option<NaiveDate>,
    payment_reference: String,
    notes: String,
    previous: Option<Uuid>,
}

async fn insert(conn: &mut AsyncPgConnection, p: &NewPeriod) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO memberships (id, entity_id, organization_id, membership_type_id, start_date, end_date,
            grace_end_date, dues_cents, paid_cents, payment_status, payment_date, payment_reference, notes,
            previous_membership_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind::<SqlUuid, _>(p.id)
    .bind::<SqlUuid, _>(p.entity)
    .bind::<SqlUuid, _>(p.organization)
    .bind::<SqlUuid, _>(p.membership_type)
    .bind::<Date, _>(p.start)
    .bind::<Date, _>(p.end)
    .bind::<Date, _>(p.grace_end)
    .bind::<BigInt, _>(p.dues)
    .bind::<BigInt, _>(p.paid)
    .bind::<SmallInt, _>(p.payment_status)
    .bind::<Nullable<Date>, _>(p.payment_date)
    .bind::<Text, _>(p.payment_reference.clone())
    .bind::<Text, _>(p.notes.clone())
    .bind::<Nullable<SqlUuid>, _>(p.previous)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

/// A membership to create, validated.
#[derive(Debug, Clone)]
pub(crate) struct NewMembership {
    given: Given,
    /// The payment status as given (unspecified: from the amounts).
    status_given: i32,
}

/// Validates a membership to create (fields under `membership.`):
/// `CreateMembership` and imports.
pub(crate) fn validate_new(m: &Membership) -> Result<NewMembership, Error> {
    let mut v = Violations::new();
    let given = validate(&mut v, m, true)?;
    if PaymentStatus::try_from(m.payment_status).is_err() {
        v.add("membership.payment_status", "statut de paiement inconnu");
    }
    v.into_result()?;
    Ok(NewMembership { given, status_given: m.payment_status })
}

/// Creates `new` as membership `id` of `entity` in the transaction, the
/// types `ancestors` offer readable: the organisation locked, of the entity
/// and not merged; the type usable; the period laid out from the type
/// unless given; dues from the type and the headcount band unless given;
/// the payment status checked against the amounts; no overlap; linked to
/// the unlinked period it follows; the series refreshed; audited. Refusals
/// are field violations or `FAILED_PRECONDITION`, before anything is
/// written. `paid_in_full` (imports): a `PAID` status without an amount
/// received means the dues were received.
pub(crate) async fn create(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    ancestors: &[Uuid],
    new: NewMembership,
    paid_in_full: bool,
) -> Result<Membership, Error> {
    let NewMembership { given, status_given } = new;
    let (Some(organization), Some(type_id), Some(start)) = (given.organization, given.membership_type, given.start)
    else {
        return Err(Error::internal("violations were reported"));
    };
    let org = lock_organization(conn, organization).await?.filter(|o| o.entity_id == entity);
    let Some(org) = org else {
        return Err(Error::invalid_field("membership.organization_id", "organisation introuvable dans cette entité"));
    };
    if org.state != OrganizationState::Active as i16 {
        return Err(Error::invalid_field(
            "membership.organization_id",
            "cette organisation a été fusionnée : choisissez l'organisation qui l'a absorbée",
        ));
    }
    let t = usable_type(conn, type_id, entity, ancestors, "membership.membership_type_id", false).await?;
    let end = given.end.unwrap_or_else(|| period_end(t.period_kind, start));
    let dues = given.dues.unwrap_or_else(|| t.dues_for(org.headcount_band));
    let paid = given.paid.unwrap_or(if paid_in_full && status_given == PaymentStatus::Paid as i32 { dues } else { 0 });
    let mut v = Violations::new();
    let status = payment_status(&mut v, "membership.payment_status", status_given, dues, paid);
    v.into_result()?;
    check_no_overlap(conn, organization, id, start, end).await?;
    // A period starting the day after an unlinked period of the
    // organisation ends is its renewal.
    let previous: Vec<Id> = diesel::sql_query(
        "SELECT p.id FROM memberships p
          WHERE p.organization_id = $1 AND p.end_date = $2 AND p.cancel_date IS NULL
            AND NOT EXISTS (SELECT 1 FROM memberships n WHERE n.previous_membership_id = p.id)
          ORDER BY p.start_date DESC LIMIT 1",
    )
    .bind::<SqlUuid, _>(organization)
    .bind::<Date, _>(start.pred_opt().unwrap_or(start))
    .load(conn)
    .await
    .map_err(DbError::from)?;
    let previous = previous.into_iter().next().map(|p| p.id);
    let previous_before = match previous {
        Some(p) => load(conn, p).await?,
        None => None,
    };
    insert(
        conn,
        &NewPeriod {
            id,
            entity,
            organization,
            membership_type: t.id,
            start,
            end,
            grace_end: plus_days(end, t.grace_period_days),
            dues,
            paid,
            payment_status: status,
            payment_date: given.payment_date,
            payment_reference: given.payment_reference,
            notes: given.notes,
            previous,
        },
    )
    .await?;
    if let Some(before) = &previous_before {
        touch(conn, before).await?;
    }
    refresh(conn, organization).await?;
    let created = load(conn, id).await?.ok_or_else(|| Error::internal("created row not found"))?;
    let created = created.to_proto();
    audit(conn, "crm.memberships.create", None, Some(&created)).await?;
    Ok(created)
}

/// The fields an update may name.
const UPDATABLE: &[&str] = &[
    "membership_type_id",
    "start_date",
    "end_date",
    "dues_amount",
    "amount_paid",
    "payment_status",
    "payment_date",
    "payment_reference",
    "notes",
];

/// Copies the fields named in `mask` from `from` into `into`.
fn apply_mask(into: &mut Membership, from: Membership, mask: &FieldMask) {
    let Membership {
        membership_type_id,
        start_date,
        end_date,
        dues_amount,
        amount_paid,
        payment_status,
        payment_date,
        payment_reference,
        notes,
        ..
    } = from;
    let set = |path: &str| mask.contains(path);
    if set("membership_type_id") {
        into.membership_type_id = membership_type_id;
    }
    if set("start_date") {
        into.start_date = start_date;
    }
    if set("end_date") {
        into.end_date = end_date;
    }
    if set("dues_amount") {
        into.dues_amount = dues_amount.or_else(|| Some(money(0)));
    }
    if set("amount_paid") {
        into.amount_paid = amount_paid.or_else(|| Some(money(0)));
    }
    if set("payment_status") {
        into.payment_status = payment_status;
    }
    if set("payment_date") {
        into.payment_date = payment_date;
    }
    if set("payment_reference") {
        into.payment_reference = payment_reference;
    }
    if set("notes") {
        into.notes = notes;
    }
}

/// The filters of a list or an export, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filters {
    organization: Option<Uuid>,
    membership_type: Option<Uuid>,
    statuses: Vec<i16>,
    payment_statuses: Vec<i16>,
    active_on: Option<NaiveDate>,
    end_from: Option<NaiveDate>,
    end_to: Option<NaiveDate>,
    not_renewed: bool,
}

pub(crate) fn filters(r: &ListMembershipsRequest) -> Result<Filters, Error> {
    let mut v = Violations::new();
    let mut f = Filters { not_renewed: r.not_renewed, ..Filters::default() };
    match parse_optional_id("organization_id", &r.organization_id) {
        Ok(id) => f.organization = id,
        Err(e) => absorb(&mut v, e)?,
    }
    match parse_optional_id("membership_type_id", &r.membership_type_id) {
        Ok(id) => f.membership_type = id,
        Err(e) => absorb(&mut v, e)?,
    }
    for (i, s) in r.statuses.iter().enumerate() {
        match MembershipStatus::try_from(*s) {
            Ok(MembershipStatus::Unspecified | MembershipStatus::None) | Err(_) => {
                v.add(format!("statuses[{i}]"), "statut d'adhésion inconnu")
            }
            Ok(s) => f.statuses.push(s as i16),
        }
    }
    for (i, s) in r.payment_statuses.iter().enumerate() {
        match PaymentStatus::try_from(*s) {
            Ok(PaymentStatus::Unspecified) | Err(_) => {
                v.add(format!("payment_statuses[{i}]"), "statut de paiement inconnu")
            }
            Ok(s) => f.payment_statuses.push(s as i16),
        }
    }
    f.active_on = parse_date(&mut v, "active_on_date", &r.active_on_date).unwrap_or_default();
    f.end_from = parse_date(&mut v, "end_date_from", &r.end_date_from).unwrap_or_default();
    f.end_to = parse_date(&mut v, "end_date_to", &r.end_date_to).unwrap_or_default();
    if let (Some(from), Some(to)) = (f.end_from, f.end_to)
        && to < from
    {
        v.add("end_date_to", "la borne de fin doit suivre la borne de début");
    }
    v.into_result()?;
    f.statuses.sort_unstable();
    f.statuses.dedup();
    f.payment_statuses.sort_unstable();
    f.payment_statuses.dedup();
    Ok(f)
}

/// The `WHERE` clause of lists and exports over [`source`]: binds $1
/// (entities) to $9; the keyset binds follow.
pub(crate) const WHERE_SQL: &str = "m.entity_id = ANY($1)
    AND ($2::uuid IS NULL OR m.organization_id = $2)
    AND ($3::uuid IS NULL OR m.membership_type_id = $3)
    AND (cardinality($4::smallint[]) = 0 OR m.status = ANY($4))
    AND (cardinality($5::smallint[]) = 0 OR m.payment_status = ANY($5))
    AND ($6::date IS NULL OR (m.start_date <= $6 AND m.end_date >= $6
         AND (m.cancel_date IS NULL OR m.cancel_date > $6)))
    AND ($7::date IS NULL OR m.end_date >= $7)
    AND ($8::date IS NULL OR m.end_date <= $8)
    AND (NOT $9 OR m.next_membership_id IS NULL)";

pub(crate) type Boxed<'f> = diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Binds the filters of [`WHERE_SQL`] ($1 to $9).
pub(crate) fn bind_filters<'f>(query: Boxed<'f>, entities: Vec<Uuid>, f: &Filters) -> Boxed<'f> {
    query
        .bind::<Array<SqlUuid>, _>(entities)
        .bind::<Nullable<SqlUuid>, _>(f.organization)
        .bind::<Nullable<SqlUuid>, _>(f.membership_type)
        .bind::<Array<SmallInt>, _>(f.statuses.clone())
        .bind::<Array<SmallInt>, _>(f.payment_statuses.clone())
        .bind::<Nullable<Date>, _>(f.active_on)
        .bind::<Nullable<Date>, _>(f.end_from)
        .bind::<Nullable<Date>, _>(f.end_to)
        .bind::<Bool, _>(f.not_renewed)
}

/// The SQL order and keyset condition of a list order (keys: `$10`, `$11`
/// and the id, `$12`).
struct Order {
    sql: &'static str,
    after: &'static str,
    key: fn(&MembershipRow) -> (String, String),
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "start_date desc" => Order {
            sql: "m.start_date DESC, m.id DESC",
            after: "(m.start_date, m.id) < ($10::date, $12::uuid)",
            key: |r| (r.start_date.to_string(), String::new()),
        },
        "end_date" => Order {
            sql: "m.end_date, m.id",
            after: "(m.end_date, m.id) > ($10::date, $12::uuid)",
            key: |r| (r.end_date.to_string(), String::new()),
        },
        "organization_legal_name" => Order {
            sql: "m.organization_name_key, m.start_date, m.id",
            after: "(m.organization_name_key, m.start_date, m.id) > ($10::text, $11::date, $12::uuid)",
            key: |r| (r.organization_name_key.clone(), r.start_date.to_string()),
        },
        "update_time desc" => Order {
            sql: "m.update_time DESC, m.id DESC",
            after: "(m.update_time, m.id) < ($10::timestamptz, $12::uuid)",
            key: |r| (r.update_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), String::new()),
        },
        _ => {
            return Err(Error::invalid_field(
                "order_by",
                "must be one of: start_date desc, end_date, organization_legal_name, update_time desc",
            ));
        }
    })
}

impl Memberships {
    /// The ancestors of `entity`: those of the acting entity when it is
    /// the same (already resolved), else from tenancy.
    async fn ancestors_of(&self, entity: Uuid, acting: Option<(Uuid, &[Uuid])>) -> Result<Vec<Uuid>, Error> {
        match acting {
            Some((a, ancestors)) if a == entity => Ok(ancestors.to_vec()),
            _ => self.ancestry.of(entity).await,
        }
    }

    pub async fn create_membership(&self, caller: &Caller, r: CreateMembershipRequest) -> Result<Membership, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let m = r.membership.unwrap_or_default();
        let entity = parse_id("membership.entity_id", &m.entity_id).map_err(|e| absorb(&mut v, e));
        let new = validate_new(&m).map_err(|e| absorb(&mut v, e));
        v.into_result()?;
        let (Ok(key), Ok(entity), Ok(new)) = (key, entity, new) else {
            return Err(Error::internal("violations were reported"));
        };
        let ancestors = self.ancestry.of(entity).await?;
        let readable = self.scope(&caller.with_acting(entity), "crm.memberships.read").await?;
        self.db
            .transaction(&EntityScope::entity(entity), move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    let id = match idempotency::claim(conn, "CreateMembership", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(row.to_proto());
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    create(conn, id, entity, &ancestors, new, false).await
                })
            })
            .await
    }

    pub async fn get_membership(&self, caller: &Caller, id: &str) -> Result<Membership, Error> {
        let id = parse_id("membership_id", id)?;
        let scope = self.scope(caller, "crm.memberships.read").await?;
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
            None => Err(self.not_found(caller, "memberships", id, "crm.memberships.read", "membership").await),
        }
    }

    pub async fn list_memberships(
        &self,
        caller: &Caller,
        r: ListMembershipsRequest,
    ) -> Result<ListMembershipsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let f = filters(&r)?;
        let fingerprint = format!("{entity}|{}|{order_by}|{f:?}", r.include_descendants);
        let after = PageToken::<(String, String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.memberships.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let ancestors = self.ancestry.of(entity).await?;
        let sql = format!(
            "SELECT * FROM {source} WHERE {WHERE_SQL} AND ($10::text IS NULL OR {after})
              ORDER BY {order} LIMIT {limit}",
            source = source(),
            after = order.after,
            order = order.sql,
            limit = size + 1
        );
        let mut rows: Vec<MembershipRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.1.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.2))
                        .load(conn)
                        .await
                        .map_err(|e| Error::from(DbError::from(e)))
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            let (k1, k2) = (order.key)(last);
            PageToken::encode((k1, k2, last.id), &fingerprint)
        } else {
            String::new()
        };
        Ok(ListMembershipsResponse { memberships: rows.iter().map(MembershipRow::to_proto).collect(), next_page_token })
    }

    pub async fn update_membership(&self, caller: &Caller, r: UpdateMembershipRequest) -> Result<Membership, Error> {
        let id = parse_id("membership_id", &r.membership_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.membership.ok_or_else(|| Error::invalid_field("membership", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.memberships.update").await?;
        let acting = caller.acting.as_deref().and_then(|a| Uuid::parse_str(a).ok());
        let acting_ancestors = self.acting_ancestors(caller).await?;
        let this = self.clone();
        let etag_given = r.etag.clone();
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &acting_ancestors).await?;
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, true)?;
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let mut v = Violations::new();
                    let given = validate(&mut v, &next, false)?;
                    for (path, value, what) in [
                        ("start_date", &next.start_date, "la date de début est obligatoire"),
                        ("membership_type_id", &next.membership_type_id, "le type d'adhésion est obligatoire"),
                    ] {
                        if mask.contains(path) && value.trim().is_empty() {
                            v.add(format!("membership.{path}"), what);
                        }
                    }
                    v.into_result()?;
                    let type_id = given.membership_type.unwrap_or(current.membership_type_id);
                    let type_changed = type_id != current.membership_type_id;
                    let dates_changed = mask.contains("start_date") || mask.contains("end_date");
                    let org = lock_organization(conn, current.organization_id).await?;
                    let band = org.map_or(0, |o| o.headcount_band);
                    let ancestors =
                        this.ancestors_of(current.entity_id, acting.map(|a| (a, acting_ancestors.as_slice()))).await?;
                    set_ancestors(conn, &ancestors).await?;
                    let t = usable_type(
                        conn,
                        type_id,
                        current.entity_id,
                        &ancestors,
                        "membership.membership_type_id",
                        !type_changed,
                    )
                    .await?;
                    let start = given.start.unwrap_or(current.start_date);
                    // A new start without a new end lays the period out again.
                    let end = match given.end {
                        Some(end) if mask.contains("end_date") => end,
                        _ if mask.contains("start_date") || mask.contains("end_date") => {
                            period_end(t.period_kind, start)
                        }
                        _ => current.end_date,
                    };
                    let mut v = Violations::new();
                    if end < start {
                        v.add("membership.end_date", "la date de fin doit suivre la date de début");
                    }
                    let grace_days = if type_changed {
                        t.grace_period_days
                    } else {
                        i32::try_from((current.grace_end_date - current.end_date).num_days()).unwrap_or(0)
                    };
                    let grace_end = plus_days(end, grace_days);
                    if let Some(cancel) = current.cancel_date
                        && (cancel < start || cancel > grace_end)
                    {
                        v.add(
                            if cancel < start { "membership.start_date" } else { "membership.end_date" },
                            format!("l'adhésion est résiliée au {cancel} : cette date doit rester dans la période"),
                        );
                    }
                    let dues = match given.dues {
                        Some(dues) if mask.contains("dues_amount") => dues,
                        _ if type_changed => t.dues_for(band),
                        _ => current.dues_cents,
                    };
                    let paid = given.paid.unwrap_or(current.paid_cents);
                    let derivable = [PaymentStatus::Unpaid, PaymentStatus::PartiallyPaid, PaymentStatus::Paid]
                        .contains(&PaymentStatus::try_from(next.payment_status).unwrap_or(PaymentStatus::Unspecified));
                    let amounts_changed = dues != current.dues_cents || paid != current.paid_cents;
                    let status_given = if !mask.contains("payment_status") && amounts_changed && derivable {
                        PaymentStatus::Unspecified as i32
                    } else {
                        next.payment_status
                    };
                    let status = payment_status(&mut v, "membership.payment_status", status_given, dues, paid);
                    v.into_result()?;
                    if dates_changed {
                        check_no_overlap(conn, current.organization_id, id, start, end).await?;
                    }
                    let updated = diesel::sql_query(
                        "UPDATE memberships SET membership_type_id = $1, start_date = $2, end_date = $3,
                            grace_end_date = $4, dues_cents = $5, paid_cents = $6, payment_status = $7,
                            payment_date = $8, payment_reference = $9, notes = $10,
                            version = version + 1, update_time = now()
                         WHERE id = $11 AND version = $12",
                    )
                    .bind::<SqlUuid, _>(t.id)
                    .bind::<Date, _>(start)
                    .bind::<Date, _>(end)
                    .bind::<Date, _>(grace_end)
                    .bind::<BigInt, _>(dues)
                    .bind::<BigInt, _>(paid)
                    .bind::<SmallInt, _>(status)
                    .bind::<Nullable<Date>, _>(given.payment_date)
                    .bind::<Text, _>(given.payment_reference)
                    .bind::<Text, _>(given.notes)
                    .bind::<SqlUuid, _>(id)
                    .bind::<BigInt, _>(current.version)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if updated != 1 {
                        return Err(Error::etag_mismatch());
                    }
                    refresh(conn, current.organization_id).await?;
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.memberships.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(m) => Ok(m),
            None => Err(self.not_found(caller, "memberships", id, "crm.memberships.update", "membership").await),
        }
    }

    pub async fn delete_membership(&self, caller: &Caller, r: DeleteMembershipRequest) -> Result<(), Error> {
        let id = parse_id("membership_id", &r.membership_id)?;
        let scope = self.scope(caller, "crm.memberships.delete").await?;
        let ancestors = self.acting_ancestors(caller).await?;
        let etag_given = r.etag.clone();
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    check_etag(&etag_given, current.version, false)?;
                    if current.next_membership_id.is_some() {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "cette adhésion a été renouvelée : supprimez d'abord son renouvellement, ou résiliez-la",
                        )
                        .with_reason("MEMBERSHIP_RENEWED"));
                    }
                    lock_organization(conn, current.organization_id).await?;
                    let previous = match current.previous_membership_id {
                        Some(p) => load_for_update(conn, p).await?,
                        None => None,
                    };
                    diesel::sql_query("DELETE FROM memberships WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    if let Some(previous) = &previous {
                        touch(conn, previous).await?;
                    }
                    refresh(conn, current.organization_id).await?;
                    audit(conn, "crm.memberships.delete", Some(&current.to_proto()), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_found(caller, "memberships", id, "crm.memberships.delete", "membership").await)
        }
    }

    pub async fn renew_membership(
        &self,
        caller: &Caller,
        r: RenewMembershipRequest,
    ) -> Result<RenewMembershipResponse, Error> {
        let mut v = Violations::new();
        let id = parse_id("membership_id", &r.membership_id).map_err(|e| absorb(&mut v, e));
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let type_id = parse_optional_id("membership_type_id", &r.membership_type_id).map_err(|e| absorb(&mut v, e));
        let dues_given = r.dues_amount.as_ref().and_then(|d| amount(&mut v, "dues_amount", d));
        v.into_result()?;
        let (Ok(id), Ok(key), Ok(type_id)) = (id, key, type_id) else {
            return Err(Error::internal("violations were reported"));
        };
        let scope = self.scope(caller, "crm.memberships.create").await?;
        let acting = caller.acting.as_deref().and_then(|a| Uuid::parse_str(a).ok());
        let acting_ancestors = self.acting_ancestors(caller).await?;
        let this = self.clone();
        let etag_given = r.etag.clone();
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &acting_ancestors).await?;
                    let Some(previous) = load_for_update(conn, id).await? else { return Ok(None) };
                    let new_id = match idempotency::claim(conn, "RenewMembership", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(new_id) => {
                            let renewal = load(conn, new_id).await?.filter(|n| n.previous_membership_id == Some(id));
                            let renewal = renewal.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(Some(RenewMembershipResponse {
                                previous_membership: Some(previous.to_proto()),
                                membership: Some(renewal.to_proto()),
                            }));
                        }
                        idempotency::Claim::New(new_id) => new_id,
                    };
                    check_etag(&etag_given, previous.version, false)?;
                    if previous.next_membership_id.is_some() {
                        return Err(Error::new(Code::FailedPrecondition, "cette adhésion a déjà été renouvelée")
                            .with_reason("MEMBERSHIP_RENEWED"));
                    }
                    if previous.cancel_date.is_some() {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "une adhésion résiliée ne se renouvelle pas : créez une nouvelle adhésion",
                        )
                        .with_reason("MEMBERSHIP_CANCELLED"));
                    }
                    let entity = previous.entity_id;
                    let ancestors = this.ancestors_of(entity, acting.map(|a| (a, acting_ancestors.as_slice()))).await?;
                    set_ancestors(conn, &ancestors).await?;
                    let t = usable_type(
                        conn,
                        type_id.unwrap_or(previous.membership_type_id),
                        entity,
                        &ancestors,
                        "membership_type_id",
                        false,
                    )
                    .await?;
                    let org = lock_organization(conn, previous.organization_id).await?;
                    if org.as_ref().is_some_and(|o| o.state != OrganizationState::Active as i16) {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "cette organisation a été fusionnée : renouvelez l'adhésion de celle qui l'a absorbée",
                        )
                        .with_reason("ORGANIZATION_MERGED"));
                    }
                    let band = org.map_or(0, |o| o.headcount_band);
                    let start = previous.end_date.succ_opt().unwrap_or(previous.end_date);
                    let end = period_end(t.period_kind, start);
                    check_no_overlap(conn, previous.organization_id, new_id, start, end).await?;
                    insert(
                        conn,
                        &NewPeriod {
                            id: new_id,
                            entity,
                            organization: previous.organization_id,
                            membership_type: t.id,
                            start,
                            end,
                            grace_end: plus_days(end, t.grace_period_days),
                            dues: dues_given.unwrap_or_else(|| t.dues_for(band)),
                            paid: 0,
                            payment_status: PaymentStatus::Unpaid as i16,
                            payment_date: None,
                            payment_reference: String::new(),
                            notes: String::new(),
                            previous: Some(id),
                        },
                    )
                    .await?;
                    let linked = touch(conn, &previous).await?;
                    refresh(conn, previous.organization_id).await?;
                    let renewal = load(conn, new_id).await?.ok_or_else(|| Error::internal("created row not found"))?;
                    let renewal = renewal.to_proto();
                    audit(conn, "crm.memberships.renew", None, Some(&renewal)).await?;
                    Ok(Some(RenewMembershipResponse {
                        previous_membership: Some(linked.to_proto()),
                        membership: Some(renewal),
                    }))
                })
            })
            .await?;
        match result {
            Some(renewed) => Ok(renewed),
            None => Err(self.not_found(caller, "memberships", id, "crm.memberships.create", "membership").await),
        }
    }

    pub async fn cancel_membership(&self, caller: &Caller, r: CancelMembershipRequest) -> Result<Membership, Error> {
        let mut v = Violations::new();
        let id = parse_id("membership_id", &r.membership_id).map_err(|e| absorb(&mut v, e));
        let date = parse_date(&mut v, "cancel_date", &r.cancel_date).unwrap_or_default();
        let reason = r.reason.split_whitespace().collect::<Vec<_>>().join(" ");
        if reason.is_empty() {
            v.add("reason", "le motif de la résiliation est obligatoire");
        } else if reason.chars().count() > 500 {
            v.add("reason", "au plus 500 caractères");
        }
        v.into_result()?;
        let Ok(id) = id else { return Err(Error::internal("violations were reported")) };
        let scope = self.scope(caller, "crm.memberships.update").await?;
        let ancestors = self.acting_ancestors(caller).await?;
        let etag_given = r.etag.clone();
        let result = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    set_ancestors(conn, &ancestors).await?;
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    let date = date.unwrap_or(current.today);
                    if let Some(cancelled) = current.cancel_date {
                        // A retry of the same cancellation changes nothing.
                        if cancelled == date && current.cancel_reason == reason {
                            return Ok(Some(current.to_proto()));
                        }
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            format!("cette adhésion est déjà résiliée depuis le {cancelled}"),
                        )
                        .with_reason("MEMBERSHIP_CANCELLED"));
                    }
                    check_etag(&etag_given, current.version, false)?;
                    if current.next_membership_id.is_some() {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "cette adhésion a été renouvelée : résiliez son renouvellement (ou supprimez-le)",
                        )
                        .with_reason("MEMBERSHIP_RENEWED"));
                    }
                    if date < current.start_date || date > current.last_cancel_day() {
                        return Err(Error::invalid_field(
                            "cancel_date",
                            format!(
                                "la résiliation doit prendre effet pendant la période ou son délai de grâce \
                                 (du {} au {})",
                                current.start_date,
                                current.last_cancel_day()
                            ),
                        ));
                    }
                    let before = current.to_proto();
                    lock_organization(conn, current.organization_id).await?;
                    let updated = diesel::sql_query(
                        "UPDATE memberships SET cancel_date = $1, cancel_reason = $2,
                            version = version + 1, update_time = now()
                         WHERE id = $3 AND version = $4",
                    )
                    .bind::<Date, _>(date)
                    .bind::<Text, _>(reason)
                    .bind::<SqlUuid, _>(id)
                    .bind::<BigInt, _>(current.version)
                    .execute(conn)
                    .await
                    .map_err(DbError::from)?;
                    if updated != 1 {
                        return Err(Error::etag_mismatch());
                    }
                    refresh(conn, current.organization_id).await?;
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.memberships.cancel", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(m) => Ok(m),
            None => Err(self.not_found(caller, "memberships", id, "crm.memberships.update", "membership").await),
        }
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl MembershipService for Memberships {
    async fn create_membership(
        &self,
        request: Request<CreateMembershipRequest>,
    ) -> Result<Response<CreateMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::create_membership(self, &caller, request.into_inner()).await;
        reply(result.map(|m| CreateMembershipResponse { membership: Some(m) }), request_id)
    }

    async fn get_membership(
        &self,
        request: Request<GetMembershipRequest>,
    ) -> Result<Response<GetMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::get_membership(self, &caller, &request.get_ref().membership_id).await;
        reply(result.map(|m| GetMembershipResponse { membership: Some(m) }), request_id)
    }

    async fn list_memberships(
        &self,
        request: Request<ListMembershipsRequest>,
    ) -> Result<Response<ListMembershipsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Memberships::list_memberships(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_membership(
        &self,
        request: Request<UpdateMembershipRequest>,
    ) -> Result<Response<UpdateMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::update_membership(self, &caller, request.into_inner()).await;
        reply(result.map(|m| UpdateMembershipResponse { membership: Some(m) }), request_id)
    }

    async fn delete_membership(
        &self,
        request: Request<DeleteMembershipRequest>,
    ) -> Result<Response<DeleteMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::delete_membership(self, &caller, request.into_inner()).await;
        reply(result.map(|()| DeleteMembershipResponse {}), request_id)
    }

    async fn renew_membership(
        &self,
        request: Request<RenewMembershipRequest>,
    ) -> Result<Response<RenewMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Memberships::renew_membership(self, &caller, request.into_inner()).await, request_id)
    }

    async fn cancel_membership(
        &self,
        request: Request<CancelMembershipRequest>,
    ) -> Result<Response<CancelMembershipResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Memberships::cancel_membership(self, &caller, request.into_inner()).await;
        reply(result.map(|m| CancelMembershipResponse { membership: Some(m) }), request_id)
    }

    async fn export_memberships(
        &self,
        request: Request<ExportMembershipsRequest>,
    ) -> Result<Response<crate::exports::Pieces<ExportMembershipsResponse>>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Memberships::export_memberships(self, &caller, request.into_inner()).await, request_id)
    }

    async fn import_memberships(
        &self,
        request: Request<tonic::Streaming<ImportMembershipsRequest>>,
    ) -> Result<Response<ImportMembershipsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let kind = crate::imports::Kind::Memberships;
        let result = Crm::import(self, &caller, kind, Some(&self.ancestry), request.into_inner()).await;
        reply(result.map(|job| ImportMembershipsResponse { import_job: Some(job) }), request_id)
    }
}
