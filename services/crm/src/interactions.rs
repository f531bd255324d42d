//! Interactions (`socle.crm.v1.InteractionService`): the calls, meetings,
//! e-mails, event attendances and notes of an entity with its members.
//! Each concerns an organisation, contacts, or both, all of the
//! interaction's entity; the author is the caller, set by the server.
//! Listed newest first by organisation (optionally with the interactions of
//! its current contacts) or by contact, they form timelines. Keyset lists
//! with filters and accent-insensitive full text, partial updates with
//! etags, idempotent creates; every write is audited in its transaction.
//! Exports: [`crate::exports`], with the lists' `filters`; imports:
//! [`crate::imports`], through `create`.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Integer, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use socle_api::{FieldMask, PageToken, Violations, check_etag, from_timestamp, page_size, parse_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{interaction_service_server::InteractionService, *},
    r#type::v1::ActorRef,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    affiliations::{Named, check_reference, references},
    common::{Audited, Caller, Crm, TODAY_SQL, absorb, audit, etag, reply, rid, sql_fold, timestamp},
    organizations::scope_ids,
    validate,
};

/// The columns of [`InteractionRow`], over `interactions i`.
pub(crate) const COLUMNS: &str = "i.id, i.entity_id, i.kind, i.subject, i.body, i.occur_time, i.duration_seconds,
    i.direction, i.organization_id, i.event_name, i.location, i.participant_user_ids, i.tags, i.author_kind,
    i.author_id, i.version, i.create_time, i.update_time";

/// The computed columns of [`InteractionRow`] (contacts and the
/// organisation's name), in the same statement: no query per row.
pub(crate) const COMPUTED: &str = "coalesce((SELECT array_agg(ic.contact_id ORDER BY ic.ordinal, ic.contact_id)
        FROM interaction_contacts ic WHERE ic.interaction_id = i.id), '{}') AS contact_ids,
    coalesce(o.legal_name, '') AS organization_legal_name";

/// Interactions with their organisation (same entity, so visible together).
pub(crate) const FROM: &str = "interactions i LEFT JOIN organizations o ON o.id = i.organization_id";

/// Longest subject (the contract says 200; the table allows 300).
const SUBJECT_MAX: usize = 200;
/// Longest body.
const BODY_MAX: usize = 20_000;
/// Most contacts or participants on one interaction.
const PEOPLE_MAX: usize = 100;
/// Longest duration: 30 days.
const DURATION_MAX: i64 = 30 * 24 * 3600;

/// One interaction as stored, with its computed fields.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct InteractionRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    kind: i16,
    #[diesel(sql_type = Text)]
    subject: String,
    #[diesel(sql_type = Text)]
    body: String,
    #[diesel(sql_type = Timestamptz)]
    occur_time: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Integer>)]
    duration_seconds: Option<i32>,
    #[diesel(sql_type = SmallInt)]
    direction: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    organization_id: Option<Uuid>,
    #[diesel(sql_type = Text)]
    event_name: String,
    #[diesel(sql_type = Text)]
    location: String,
    #[diesel(sql_type = Array<SqlUuid>)]
    participant_user_ids: Vec<Uuid>,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
    #[diesel(sql_type = SmallInt)]
    author_kind: i16,
    #[diesel(sql_type = Text)]
    author_id: String,
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = Array<SqlUuid>)]
    contact_ids: Vec<Uuid>,
    #[diesel(sql_type = Text)]
    organization_legal_name: String,
}

impl InteractionRow {
    pub(crate) fn to_proto(&self) -> Interaction {
        Interaction {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            kind: i32::from(self.kind),
            subject: self.subject.clone(),
            body: self.body.clone(),
            occur_time: Some(timestamp(self.occur_time)),
            duration: self.duration_seconds.map(|s| prost_types::Duration { seconds: i64::from(s), nanos: 0 }),
            direction: i32::from(self.direction),
            organization_id: self.organization_id.map(|id| id.to_string()).unwrap_or_default(),
            contact_ids: self.contact_ids.iter().map(Uuid::to_string).collect(),
            event_name: self.event_name.clone(),
            location: self.location.clone(),
            participant_user_ids: self.participant_user_ids.iter().map(Uuid::to_string).collect(),
            tags: self.tags.clone(),
            author: Some(ActorRef {
                kind: i32::from(self.author_kind),
                id: self.author_id.clone(),
                display_name: String::new(),
            }),
            organization_legal_name: self.organization_legal_name.clone(),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }
}

impl Audited for Interaction {
    const RESOURCE_TYPE: &'static str = "crm.interaction";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

/// A validated interaction, ready to be written.
#[derive(Debug, Clone)]
pub(crate) struct InteractionInput {
    kind: i16,
    subject: String,
    body: String,
    occur_time: DateTime<Utc>,
    duration_seconds: Option<i32>,
    direction: i16,
    organization: Option<Uuid>,
    contacts: Vec<Uuid>,
    event_name: String,
    location: String,
    participants: Vec<Uuid>,
    tags: Vec<String>,
}

/// Collapses runs of whitespace and trims.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a list of ids (`field[i]` in violations): UUIDs, no duplicate,
/// at most [`PEOPLE_MAX`].
fn ids(v: &mut Violations, field: &str, values: &[String]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match Uuid::parse_str(value.trim()) {
            Ok(id) if ids.contains(&id) => v.add(format!("{field}[{i}]"), "identifiant en double"),
            Ok(id) => ids.push(id),
            Err(_) => v.add(format!("{field}[{i}]"), "identifiant invalide : UUID attendu"),
        }
    }
    v.check(ids.len() <= PEOPLE_MAX, field, "au plus 100 personnes");
    ids
}

/// Validates and normalises `interaction` (fields reported under `prefix.`).
pub(crate) fn validate(interaction: &Interaction, prefix: &str) -> Result<InteractionInput, Error> {
    use InteractionKind::{Call, Email, EventAttendance, Meeting};
    let field = |name: &str| format!("{prefix}.{name}");
    let mut v = Violations::new();
    let kind = match InteractionKind::try_from(interaction.kind) {
        Ok(InteractionKind::Unspecified) => {
            v.add(field("kind"), "le type d'interaction est obligatoire");
            InteractionKind::Unspecified
        }
        Ok(kind) => kind,
        Err(_) => {
            v.add(field("kind"), "type d'interaction inconnu");
            InteractionKind::Unspecified
        }
    };
    let known = kind != InteractionKind::Unspecified;

    let subject = one_line(&interaction.subject);
    if subject.is_empty() {
        v.add(field("subject"), "l'objet est obligatoire");
    } else if subject.chars().count() > SUBJECT_MAX || subject.chars().any(char::is_control) {
        v.add(field("subject"), "l'objet doit faire au plus 200 caractères, sans caractère de contrôle");
    }
    let body = interaction.body.trim().to_owned();
    v.check(body.chars().count() <= BODY_MAX, &field("body"), "au plus 20 000 caractères");

    let occur_time = match &interaction.occur_time {
        None => {
            v.add(field("occur_time"), "la date et l'heure sont obligatoires");
            None
        }
        Some(t) => match from_timestamp(&field("occur_time"), t) {
            Ok(t) => Some(t),
            Err(e) => {
                absorb(&mut v, e)?;
                None
            }
        },
    };
    let mut duration_seconds = None;
    if let Some(d) = &interaction.duration {
        if d.seconds < 0 || d.nanos < 0 {
            v.add(field("duration"), "la durée ne peut pas être négative");
        } else if d.seconds > DURATION_MAX {
            v.add(field("duration"), "la durée ne peut pas dépasser 30 jours");
        } else if known && !matches!(kind, Call | Meeting | EventAttendance) {
            v.add(field("duration"), "la durée ne concerne que les appels, les réunions et les événements");
        } else {
            duration_seconds = i32::try_from(d.seconds).ok();
        }
    }
    let direction = match InteractionDirection::try_from(interaction.direction) {
        Ok(InteractionDirection::Unspecified) => InteractionDirection::Unspecified,
        Ok(direction) => {
            if known && !matches!(kind, Call | Email) {
                v.add(field("direction"), "le sens ne concerne que les appels et les e-mails");
            }
            direction
        }
        Err(_) => {
            v.add(field("direction"), "sens inconnu");
            InteractionDirection::Unspecified
        }
    };

    let organization = match socle_api::parse_optional_id(&field("organization_id"), &interaction.organization_id) {
        Ok(id) => id,
        Err(e) => {
            absorb(&mut v, e)?;
            None
        }
    };
    let contacts = ids(&mut v, &field("contact_ids"), &interaction.contact_ids);
    if interaction.organization_id.is_empty() && interaction.contact_ids.is_empty() {
        v.add(field("organization_id"), "une organisation ou au moins un contact est obligatoire");
    }

    let event_name = one_line(&interaction.event_name);
    v.check(event_name.chars().count() <= 200, &field("event_name"), "au plus 200 caractères");
    if !event_name.is_empty() && known && kind != EventAttendance {
        v.add(field("event_name"), "le nom d'événement ne concerne que la participation à un événement");
    }
    let location = one_line(&interaction.location);
    v.check(location.chars().count() <= 200, &field("location"), "au plus 200 caractères");
    if !location.is_empty() && known && !matches!(kind, Meeting | EventAttendance) {
        v.add(field("location"), "le lieu ne concerne que les réunions et les événements");
    }
    let participants = ids(&mut v, &field("participant_user_ids"), &interaction.participant_user_ids);
    let tags = match validate::normalize_tags(&interaction.tags) {
        Ok(tags) => tags,
        Err((i, r)) => {
            v.add(format!("{prefix}.tags[{i}]"), validate::describe(r));
            Vec::new()
        }
    };
    v.into_result()?;
    let occur_time = occur_time.ok_or_else(|| Error::internal("violations were reported"))?;
    Ok(InteractionInput {
        kind: kind as i16,
        subject,
        body,
        occur_time,
        duration_seconds,
        direction: direction as i16,
        organization,
        contacts,
        event_name,
        location,
        participants,
        tags,
    })
}

/// Checks the organisation and contacts `input` names that the record did
/// not name already (`known`): visible to the caller (organisations in
/// `scopes.organizations`, contacts in `scopes.contacts`), of `entity`,
/// active. The transaction's scope is `restore` afterwards.
async fn check_references(
    conn: &mut AsyncPgConnection,
    input: &InteractionInput,
    known: Option<&InteractionRow>,
    entity: Uuid,
    scopes: &Scopes,
    restore: &EntityScope,
) -> Result<(), Error> {
    let mut v = Violations::new();
    let new_contacts: Vec<Uuid> =
        input.contacts.iter().copied().filter(|c| known.is_none_or(|k| !k.contact_ids.contains(c))).collect();
    let found = references(conn, Named::Contact, &new_contacts, &scopes.contacts).await?;
    for (i, id) in input.contacts.iter().enumerate() {
        if new_contacts.contains(id) {
            let field = format!("interaction.contact_ids[{i}]");
            check_reference(&mut v, field, Named::Contact, *id, &found, entity, "l'interaction");
        }
    }
    if let Some(id) = input.organization.filter(|o| known.is_none_or(|k| k.organization_id != Some(*o))) {
        let found = references(conn, Named::Organization, &[id], &scopes.organizations).await?;
        let field = "interaction.organization_id".to_owned();
        check_reference(&mut v, field, Named::Organization, id, &found, entity, "l'interaction");
    }
    socle_db::set_scope(conn, restore).await.map_err(DbError::from)?;
    v.into_result()
}

/// The scopes in which the caller sees the records an interaction names.
pub(crate) struct Scopes {
    contacts: EntityScope,
    organizations: EntityScope,
}

/// Creates interaction `id` of `entity` from `input`, recorded by
/// `author`, in the transaction: its organisation and contacts checked
/// ([`check_references`]; the scope is `restore` afterwards), its contacts
/// written in order, audited. Refusals are field violations, before
/// anything is written. `CreateInteraction` and imports.
pub(crate) async fn create(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    author: &ActorRef,
    input: &InteractionInput,
    scopes: &Scopes,
    restore: &EntityScope,
) -> Result<Interaction, Error> {
    check_references(conn, input, None, entity, scopes, restore).await?;
    let query = diesel::sql_query(
        "INSERT INTO interactions (kind, subject, body, occur_time, duration_seconds, direction,
            organization_id, event_name, location, participant_user_ids, tags, id, entity_id,
            author_kind, author_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .into_boxed();
    bind_input(query, input)
        .bind::<SqlUuid, _>(id)
        .bind::<SqlUuid, _>(entity)
        .bind::<SmallInt, _>(author.kind as i16)
        .bind::<Text, _>(author.id.clone())
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    write_contacts(conn, id, entity, &input.contacts).await?;
    let created = load(conn, id).await?.ok_or_else(|| Error::internal("created row not found"))?;
    let created = created.to_proto();
    audit(conn, "crm.interactions.create", None, Some(&created)).await?;
    Ok(created)
}

/// Writes the contacts of interaction `id`, in order (one statement).
async fn write_contacts(conn: &mut AsyncPgConnection, id: Uuid, entity: Uuid, contacts: &[Uuid]) -> Result<(), Error> {
    diesel::sql_query("DELETE FROM interaction_contacts WHERE interaction_id = $1")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    if contacts.is_empty() {
        return Ok(());
    }
    diesel::sql_query(
        "INSERT INTO interaction_contacts (interaction_id, contact_id, entity_id, ordinal)
         SELECT $1, t.contact_id, $2, (t.n - 1)::smallint FROM unnest($3::uuid[]) WITH ORDINALITY AS t(contact_id, n)",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<SqlUuid, _>(entity)
    .bind::<Array<SqlUuid>, _>(contacts)
    .execute(conn)
    .await
    .map_err(DbError::from)?;
    Ok(())
}

/// Every interaction a contact takes part in, newest first, in one
/// statement (the GDPR export).
pub(crate) async fn of_contact(conn: &mut AsyncPgConnection, contact: Uuid) -> Result<Vec<InteractionRow>, Error> {
    Ok(diesel::sql_query(format!(
        "SELECT {COLUMNS}, {COMPUTED} FROM {FROM}
          WHERE i.id IN (SELECT interaction_id FROM interaction_contacts WHERE contact_id = $1)
          ORDER BY i.occur_time DESC, i.id DESC"
    ))
    .bind::<SqlUuid, _>(contact)
    .load(conn)
    .await
    .map_err(DbError::from)?)
}

/// Loads one interaction visible in the transaction's scope.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<InteractionRow>, Error> {
    let rows: Vec<InteractionRow> =
        diesel::sql_query(format!("SELECT {COLUMNS}, {COMPUTED} FROM {FROM} WHERE i.id = $1"))
            .bind::<SqlUuid, _>(id)
            .load(conn)
            .await
            .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// [`load`] with the row locked for the rest of the transaction.
async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<InteractionRow>, Error> {
    diesel::sql_query("SELECT 1 FROM interactions WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

pub(crate) type Boxed<'f> = diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Binds $1 to $11 of the insert and update statements.
fn bind_input<'f>(query: Boxed<'f>, input: &InteractionInput) -> Boxed<'f> {
    query
        .bind::<SmallInt, _>(input.kind)
        .bind::<Text, _>(input.subject.clone())
        .bind::<Text, _>(input.body.clone())
        .bind::<Timestamptz, _>(input.occur_time)
        .bind::<Nullable<Integer>, _>(input.duration_seconds)
        .bind::<SmallInt, _>(input.direction)
        .bind::<Nullable<SqlUuid>, _>(input.organization)
        .bind::<Text, _>(input.event_name.clone())
        .bind::<Text, _>(input.location.clone())
        .bind::<Array<SqlUuid>, _>(input.participants.clone())
        .bind::<Array<Text>, _>(input.tags.clone())
}

/// The fields an update may name.
const UPDATABLE: &[&str] = &[
    "kind",
    "subject",
    "body",
    "occur_time",
    "duration",
    "direction",
    "organization_id",
    "contact_ids",
    "event_name",
    "location",
    "participant_user_ids",
    "tags",
];

/// Copies the fields named in `mask` from `from` into `into`.
fn apply_mask(into: &mut Interaction, from: Interaction, mask: &FieldMask) {
    let Interaction {
        kind,
        subject,
        body,
        occur_time,
        duration,
        direction,
        organization_id,
        contact_ids,
        event_name,
        location,
        participant_user_ids,
        tags,
        ..
    } = from;
    let set = |path: &str| mask.contains(path);
    if set("kind") {
        into.kind = kind;
    }
    if set("subject") {
        into.subject = subject;
    }
    if set("body") {
        into.body = body;
    }
    if set("occur_time") {
        into.occur_time = occur_time;
    }
    if set("duration") {
        into.duration = duration;
    }
    if set("direction") {
        into.direction = direction;
    }
    if set("organization_id") {
        into.organization_id = organization_id;
    }
    if set("contact_ids") {
        into.contact_ids = contact_ids;
    }
    if set("event_name") {
        into.event_name = event_name;
    }
    if set("location") {
        into.location = location;
    }
    if set("participant_user_ids") {
        into.participant_user_ids = participant_user_ids;
    }
    if set("tags") {
        into.tags = tags;
    }
}

/// The SQL order and keyset condition of a list order ($11 and $12 are the
/// keyset binds).
struct Order {
    sql: &'static str,
    after: &'static str,
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "occur_time desc" => {
            Order { sql: "i.occur_time DESC, i.id DESC", after: "(i.occur_time, i.id) < ($11::timestamptz, $12::uuid)" }
        }
        "occur_time" => {
            Order { sql: "i.occur_time, i.id", after: "(i.occur_time, i.id) > ($11::timestamptz, $12::uuid)" }
        }
        _ => return Err(Error::invalid_field("order_by", "must be one of: occur_time desc, occur_time")),
    })
}

/// The words of a query, folded, as a French prefix `tsquery` text:
/// `relance cotis` → `relance:* & cotis:*`.
fn prefix_tsquery(folded: &str) -> String {
    folded
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(12)
        .map(|w| format!("{w}:*"))
        .collect::<Vec<_>>()
        .join(" & ")
}

/// The `WHERE` clause of lists over [`FROM`]: binds $1 (entities) to $10;
/// the keyset binds are $11 and $12.
pub(crate) fn where_sql() -> String {
    format!(
        "i.entity_id = ANY($1)
         AND ($2::uuid IS NULL OR i.organization_id = $2
              OR ($3 AND i.organization_id IS NULL AND EXISTS (
                  SELECT 1 FROM interaction_contacts ic JOIN affiliations a ON a.contact_id = ic.contact_id
                   WHERE ic.interaction_id = i.id AND a.organization_id = $2
                     AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL}))))
         AND ($4::uuid IS NULL OR EXISTS (SELECT 1 FROM interaction_contacts ic
              WHERE ic.interaction_id = i.id AND ic.contact_id = $4))
         AND (cardinality($5::smallint[]) = 0 OR i.kind = ANY($5))
         AND ($6::timestamptz IS NULL OR i.occur_time >= $6)
         AND ($7::timestamptz IS NULL OR i.occur_time < $7)
         AND ($8 = '' OR i.author_id = $8)
         AND i.tags @> $9
         AND ($10 = '' OR i.search_vector @@ to_tsquery('french', $10))"
    )
}

/// The filters of a list or an export, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filters {
    organization: Option<Uuid>,
    with_contacts: bool,
    contact: Option<Uuid>,
    kinds: Vec<i16>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    author: Option<Uuid>,
    tags: Vec<String>,
    /// The folded words of `query`, as a prefix `tsquery`.
    tsquery: String,
}

pub(crate) fn filters(r: &ListInteractionsRequest) -> Result<Filters, Error> {
    let mut v = Violations::new();
    let organization =
        socle_api::parse_optional_id("organization_id", &r.organization_id).map_err(|e| absorb(&mut v, e));
    if r.include_contact_interactions && r.organization_id.is_empty() {
        v.add("include_contact_interactions", "ne s'emploie qu'avec organization_id");
    }
    let contact = socle_api::parse_optional_id("contact_id", &r.contact_id).map_err(|e| absorb(&mut v, e));
    let mut kinds = Vec::new();
    for (i, kind) in r.kinds.iter().enumerate() {
        match InteractionKind::try_from(*kind) {
            Ok(InteractionKind::Unspecified) | Err(_) => v.add(format!("kinds[{i}]"), "type d'interaction inconnu"),
            Ok(kind) => kinds.push(kind as i16),
        }
    }
    let mut time = |name: &str, t: &Option<prost_types::Timestamp>| match t {
        None => None,
        Some(t) => from_timestamp(name, t).map_err(|e| absorb(&mut v, e)).ok(),
    };
    let start = time("start_time", &r.start_time);
    let end = time("end_time", &r.end_time);
    if let (Some(start), Some(end)) = (start, end)
        && end <= start
    {
        v.add("end_time", "la fin doit être postérieure au début");
    }
    let author = socle_api::parse_optional_id("author_id", &r.author_id).map_err(|e| absorb(&mut v, e));
    let tags = validate::normalize_tags(&r.tags)
        .map_err(|(i, reason)| v.add(format!("tags[{i}]"), validate::describe(reason)));
    let query = r.query.trim().to_owned();
    v.check(query.chars().count() <= 200, "query", "au plus 200 caractères");
    v.into_result()?;
    let (Ok(organization), Ok(contact), Ok(author), Ok(tags)) = (organization, contact, author, tags) else {
        return Err(Error::internal("violations were reported"));
    };
    kinds.sort_unstable();
    kinds.dedup();
    Ok(Filters {
        organization,
        with_contacts: r.include_contact_interactions,
        contact,
        kinds,
        start,
        end,
        author,
        tags,
        tsquery: prefix_tsquery(&sql_fold(&query)),
    })
}

/// Binds the filters of [`where_sql`] ($1 to $10).
pub(crate) fn bind_filters<'f>(query: Boxed<'f>, entities: Vec<Uuid>, f: &Filters) -> Boxed<'f> {
    query
        .bind::<Array<SqlUuid>, _>(entities)
        .bind::<Nullable<SqlUuid>, _>(f.organization)
        .bind::<Bool, _>(f.with_contacts)
        .bind::<Nullable<SqlUuid>, _>(f.contact)
        .bind::<Array<SmallInt>, _>(f.kinds.clone())
        .bind::<Nullable<Timestamptz>, _>(f.start)
        .bind::<Nullable<Timestamptz>, _>(f.end)
        .bind::<Text, _>(f.author.map(|a| a.to_string()).unwrap_or_default())
        .bind::<Array<Text>, _>(f.tags.clone())
        .bind::<Text, _>(f.tsquery.clone())
}

impl Crm {
    /// The scopes in which `caller` sees the records interactions name.
    pub(crate) async fn reference_scopes(&self, caller: &Caller) -> Result<Scopes, Error> {
        Ok(Scopes {
            contacts: self.scope(caller, "crm.contacts.read").await?,
            organizations: self.scope(caller, "crm.organizations.read").await?,
        })
    }

    pub async fn create_interaction(&self, caller: &Caller, r: CreateInteractionRequest) -> Result<Interaction, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let interaction = r.interaction.unwrap_or_default();
        let entity = parse_id("interaction.entity_id", &interaction.entity_id).map_err(|e| absorb(&mut v, e));
        let input = validate(&interaction, "interaction").map_err(|e| absorb(&mut v, e));
        v.into_result()?;
        let (Ok(key), Ok(entity), Ok(input)) = (key, entity, input) else {
            return Err(Error::internal("violations were reported"));
        };
        let acting = caller.with_acting(entity);
        let readable = self.scope(&acting, "crm.interactions.read").await?;
        let scopes = self.reference_scopes(&acting).await?;
        let author = socle_server::audit::actor(caller.principal.as_ref());
        let write_scope = EntityScope::entity(entity);
        let tx_scope = write_scope.clone();
        self.db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "CreateInteraction", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(row.to_proto());
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    create(conn, id, entity, &author, &input, &scopes, &write_scope).await
                })
            })
            .await
    }

    pub async fn get_interaction(&self, caller: &Caller, id: &str) -> Result<Interaction, Error> {
        let id = parse_id("interaction_id", id)?;
        let scope = self.scope(caller, "crm.interactions.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "interactions", id, "crm.interactions.read", "interaction").await),
        }
    }

    pub async fn list_interactions(
        &self,
        caller: &Caller,
        r: ListInteractionsRequest,
    ) -> Result<ListInteractionsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let f = filters(&r)?;
        let fingerprint = format!("{entity}|{}|{order_by}|{f:?}", r.include_descendants);
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let after = match after {
            None => None,
            Some((time, id)) => Some((
                DateTime::parse_from_rfc3339(&time)
                    .map_err(|_| Error::invalid_field("page_token", "is not a token returned by this list"))?
                    .with_timezone(&Utc),
                id,
            )),
        };
        let scope = self.list_scope(caller, "crm.interactions.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "SELECT {COLUMNS}, {COMPUTED} FROM {FROM}
              WHERE {} AND ($11::timestamptz IS NULL OR {})
              ORDER BY {} LIMIT {}",
            where_sql(),
            order.after,
            order.sql,
            size + 1
        );
        let mut rows: Vec<InteractionRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f)
                        .bind::<Nullable<Timestamptz>, _>(after.map(|a| a.0))
                        .bind::<Nullable<SqlUuid>, _>(after.map(|a| a.1))
                        .load(conn)
                        .await
                        .map_err(DbError::from)
                })
            })
            .await?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            let last = rows.last().expect("a full page");
            let key = last.occur_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            PageToken::encode((key, last.id), &fingerprint)
        } else {
            String::new()
        };
        Ok(ListInteractionsResponse {
            interactions: rows.iter().map(InteractionRow::to_proto).collect(),
            next_page_token,
        })
    }

    pub async fn update_interaction(&self, caller: &Caller, r: UpdateInteractionRequest) -> Result<Interaction, Error> {
        let id = parse_id("interaction_id", &r.interaction_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.interaction.ok_or_else(|| Error::invalid_field("interaction", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.interactions.update").await?;
        let scopes = self.reference_scopes(caller).await?;
        let etag_given = r.etag.clone();
        let tx_scope = scope.clone();
        let result = self
            .db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, true)?;
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let input = validate(&next, "interaction")?;
                    check_references(conn, &input, Some(&current), current.entity_id, &scopes, &scope).await?;
                    let query = diesel::sql_query(
                        "UPDATE interactions SET kind = $1, subject = $2, body = $3, occur_time = $4,
                            duration_seconds = $5, direction = $6, organization_id = $7, event_name = $8,
                            location = $9, participant_user_ids = $10, tags = $11,
                            version = version + 1, update_time = now()
                         WHERE id = $12 AND version = $13",
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
                    if mask.contains("contact_ids") {
                        write_contacts(conn, id, current.entity_id, &input.contacts).await?;
                    }
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.interactions.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(interaction) => Ok(interaction),
            None => Err(self.not_found(caller, "interactions", id, "crm.interactions.update", "interaction").await),
        }
    }

    pub async fn delete_interaction(&self, caller: &Caller, r: DeleteInteractionRequest) -> Result<(), Error> {
        let id = parse_id("interaction_id", &r.interaction_id)?;
        let scope = self.scope(caller, "crm.interactions.delete").await?;
        let etag_given = r.etag.clone();
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    check_etag(&etag_given, current.version, false)?;
                    let before = current.to_proto();
                    diesel::sql_query("DELETE FROM interactions WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    audit(conn, "crm.interactions.delete", Some(&before), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_found(caller, "interactions", id, "crm.interactions.delete", "interaction").await)
        }
    }
}

/// The gRPC adapter.
#[tonic::async_trait]
impl InteractionService for Crm {
    async fn create_interaction(
        &self,
        request: Request<CreateInteractionRequest>,
    ) -> Result<Response<CreateInteractionResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::create_interaction(self, &caller, request.into_inner()).await;
        reply(result.map(|i| CreateInteractionResponse { interaction: Some(i) }), request_id)
    }

    async fn get_interaction(
        &self,
        request: Request<GetInteractionRequest>,
    ) -> Result<Response<GetInteractionResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_interaction(self, &caller, &request.get_ref().interaction_id).await;
        reply(result.map(|i| GetInteractionResponse { interaction: Some(i) }), request_id)
    }

    async fn list_interactions(
        &self,
        request: Request<ListInteractionsRequest>,
    ) -> Result<Response<ListInteractionsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_interactions(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_interaction(
        &self,
        request: Request<UpdateInteractionRequest>,
    ) -> Result<Response<UpdateInteractionResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::update_interaction(self, &caller, request.into_inner()).await;
        reply(result.map(|i| UpdateInteractionResponse { interaction: Some(i) }), request_id)
    }

    async fn delete_interaction(
        &self,
        request: Request<DeleteInteractionRequest>,
    ) -> Result<Response<DeleteInteractionResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::delete_interaction(self, &caller, request.into_inner()).await;
        reply(result.map(|()| DeleteInteractionResponse {}), request_id)
    }

    async fn export_interactions(
        &self,
        request: Request<ExportInteractionsRequest>,
    ) -> Result<Response<crate::exports::Pieces<ExportInteractionsResponse>>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::export_interactions(self, &caller, request.into_inner()).await, request_id)
    }

    async fn import_interactions(
        &self,
        request: Request<tonic::Streaming<ImportInteractionsRequest>>,
    ) -> Result<Response<ImportInteractionsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::import(self, &caller, crate::imports::Kind::Interactions, None, request.into_inner()).await;
        reply(result.map(|job| ImportInteractionsResponse { import_job: Some(job) }), request_id)
    }
}
