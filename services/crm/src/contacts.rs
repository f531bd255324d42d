//! Contacts (`socle.crm.v1.ContactService`): the people an entity deals
//! with. Names, e-mail addresses (validated, normalised) and phone numbers
//! (normalised to E.164 from French formats), communication consents,
//! duplicate detection on create and update, keyset lists with filters,
//! partial updates with etags, idempotent creates. A contact inherits the
//! membership of the organisations it is currently affiliated with. Every
//! write is audited in its transaction, personal fields sealed per contact.

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use socle_api::{FieldMask, PageToken, Violations, check_etag, from_timestamp, page_size, parse_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{contact_service_server::ContactService, *},
    r#type::v1::PostalAddress,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Crm, Hint, TODAY_SQL, audit, candidates, duplicate_conflict, etag, like_literal},
    common::{absorb, reply, rid, sql_fold, timestamp},
    organizations::scope_ids,
    validate,
};

/// The columns of [`ContactRow`], over `contacts c`.
pub(crate) const COLUMNS: &str = "c.id, c.entity_id, c.civility, c.given_name, c.family_name, c.job_title,
    c.emails, c.phones, c.address, c.consents, c.tags, c.external_refs, c.state, c.merged_into_id,
    c.erase_time, c.name_key, c.version, c.create_time, c.update_time";

/// The inherited membership status of a contact: the best status among the
/// organisations it is currently affiliated with (active first).
fn status_sql() -> String {
    format!(
        "coalesce((SELECT s FROM (
            SELECT crm_membership_status(o.latest_membership_id, o.latest_membership_cancelled, o.member_since,
                   o.latest_membership_end, o.latest_membership_grace_end, {TODAY_SQL}) AS s
              FROM affiliations a JOIN organizations o ON o.id = a.organization_id
             WHERE a.contact_id = c.id AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})) x
          ORDER BY array_position(ARRAY[3, 4, 2, 5, 6, 1]::smallint[], x.s) LIMIT 1), 1)::smallint"
    )
}

/// The computed columns of [`ContactRow`], in the same statement.
pub(crate) fn computed_columns() -> String {
    format!(
        "{} AS membership_status,
         coalesce((SELECT jsonb_agg(jsonb_build_object('organization_id', o.id, 'legal_name', o.legal_name,
                     'affiliation_id', a.id, 'job_title', a.job_title) ORDER BY o.name_key)
             FROM affiliations a JOIN organizations o ON o.id = a.organization_id
            WHERE a.contact_id = c.id AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})), '[]') AS organizations",
        status_sql()
    )
}

/// One contact as stored, with its computed fields.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct ContactRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = SmallInt)]
    civility: i16,
    #[diesel(sql_type = Text)]
    given_name: String,
    #[diesel(sql_type = Text)]
    family_name: String,
    #[diesel(sql_type = Text)]
    job_title: String,
    #[diesel(sql_type = Jsonb)]
    emails: serde_json::Value,
    #[diesel(sql_type = Jsonb)]
    phones: serde_json::Value,
    #[diesel(sql_type = Nullable<Jsonb>)]
    address: Option<serde_json::Value>,
    #[diesel(sql_type = Jsonb)]
    consents: serde_json::Value,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
    #[diesel(sql_type = Jsonb)]
    external_refs: serde_json::Value,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    merged_into_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    erase_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    name_key: String,
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = SmallInt)]
    membership_status: i16,
    #[diesel(sql_type = Jsonb)]
    organizations: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredEmail {
    address: String,
    kind: i32,
    primary: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredPhone {
    number: String,
    kind: i32,
    primary: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredConsent {
    topic: i32,
    channel: i32,
    granted: bool,
    source: String,
    /// RFC 3339.
    record_time: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredAddress {
    street_line: String,
    complement: String,
    distribution: String,
    postal_code: String,
    city: String,
    cedex: String,
    insee_code: String,
    department_code: String,
    country_code: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct StoredLink {
    organization_id: String,
    legal_name: String,
    affiliation_id: String,
    job_title: String,
}

impl ContactRow {
    pub(crate) fn display_name(&self) -> String {
        format!("{} {}", self.given_name, self.family_name).trim().to_owned()
    }

    pub(crate) fn to_proto(&self) -> Contact {
        let emails: Vec<StoredEmail> = serde_json::from_value(self.emails.clone()).unwrap_or_default();
        let phones: Vec<StoredPhone> = serde_json::from_value(self.phones.clone()).unwrap_or_default();
        let consents: Vec<StoredConsent> = serde_json::from_value(self.consents.clone()).unwrap_or_default();
        let address: Option<StoredAddress> = self.address.clone().and_then(|a| serde_json::from_value(a).ok());
        let links: Vec<StoredLink> = serde_json::from_value(self.organizations.clone()).unwrap_or_default();
        Contact {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            civility: i32::from(self.civility),
            given_name: self.given_name.clone(),
            family_name: self.family_name.clone(),
            display_name: self.display_name(),
            job_title: self.job_title.clone(),
            emails: emails
                .into_iter()
                .map(|e| ContactEmail { address: e.address, kind: e.kind, primary: e.primary })
                .collect(),
            phones: phones
                .into_iter()
                .map(|p| ContactPhone { number: p.number, kind: p.kind, primary: p.primary })
                .collect(),
            address: address.map(|a| PostalAddress {
                street_line: a.street_line,
                complement: a.complement,
                distribution: a.distribution,
                postal_code: a.postal_code,
                city: a.city,
                cedex: a.cedex,
                insee_code: a.insee_code,
                department_code: a.department_code,
                country_code: a.country_code,
            }),
            consents: consents
                .into_iter()
                .map(|c| CommunicationConsent {
                    topic: c.topic,
                    channel: c.channel,
                    granted: c.granted,
                    source: c.source,
                    record_time: DateTime::parse_from_rfc3339(&c.record_time)
                        .ok()
                        .map(|t| timestamp(t.with_timezone(&Utc))),
                })
                .collect(),
            tags: self.tags.clone(),
            external_refs: serde_json::from_value(self.external_refs.clone()).unwrap_or_default(),
            state: i32::from(self.state),
            merged_into_id: self.merged_into_id.map(|id| id.to_string()).unwrap_or_default(),
            membership_status: i32::from(self.membership_status),
            organizations: links
                .into_iter()
                .map(|l| ContactOrganization {
                    organization_id: l.organization_id,
                    legal_name: l.legal_name,
                    affiliation_id: l.affiliation_id,
                    job_title: l.job_title,
                })
                .collect(),
            erase_time: self.erase_time.map(timestamp),
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }

    /// A one-line summary to recognise the person (duplicate candidates).
    fn summary(&self) -> String {
        let contact = self.to_proto();
        let mut parts = Vec::new();
        if let Some(email) = contact.emails.iter().find(|e| e.primary).or(<[ContactEmail]>::first(&contact.emails)) {
            parts.push(email.address.clone());
        }
        if let Some(org) = <[ContactOrganization]>::first(&contact.organizations) {
            parts.push(org.legal_name.clone());
        }
        parts.join(" · ")
    }
}

impl Audited for Contact {
    const RESOURCE_TYPE: &'static str = "crm.contact";
    const PERSONAL: &'static [&'static str] = &[
        "civility",
        "given_name",
        "family_name",
        "display_name",
        "job_title",
        "emails",
        "phones",
        "address",
        "consents",
        "external_refs",
        "organizations",
    ];
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
    fn subject(&self) -> &str {
        &self.id
    }
}

/// A validated contact, ready to be written.
#[derive(Debug, Clone, Default)]
pub struct ContactInput {
    civility: i16,
    given_name: String,
    family_name: String,
    job_title: String,
    emails: Vec<StoredEmail>,
    phones: Vec<StoredPhone>,
    address: Option<StoredAddress>,
    consents: Vec<StoredConsent>,
    tags: Vec<String>,
    external_refs: serde_json::Value,
}

impl ContactInput {
    fn email_keys(&self) -> Vec<String> {
        self.emails.iter().map(|e| validate::email_match_key(&e.address)).collect()
    }

    fn phone_keys(&self) -> Vec<String> {
        self.phones.iter().map(|p| p.number.clone()).collect()
    }

    fn postal_code(&self) -> String {
        self.address.as_ref().map(|a| a.postal_code.clone()).unwrap_or_default()
    }

    fn name_key(&self) -> String {
        sql_fold(format!("{} {}", self.family_name, self.given_name).trim())
    }
}

/// Exactly one primary item: the first when none is marked; a violation
/// when several are.
fn one_primary(flags: &mut [bool], v: &mut Violations, field: String) {
    match flags.iter().filter(|p| **p).count() {
        0 => {
            if let Some(first) = flags.first_mut() {
                *first = true;
            }
        }
        1 => {}
        _ => v.add(field, "un seul élément peut être principal"),
    }
}

/// Validates and normalises `contact` (fields reported under `prefix.`).
/// `strict` is false for duplicate lookups.
pub fn validate(contact: &Contact, prefix: &str, strict: bool) -> Result<ContactInput, Error> {
    let field = |name: &str| format!("{prefix}.{name}");
    let mut v = Violations::new();
    let mut input = ContactInput::default();
    match Civility::try_from(contact.civility) {
        Ok(c) => input.civility = c as i16,
        Err(_) => v.add(field("civility"), "civilité inconnue"),
    }
    for (name, value, required) in
        [("given_name", &contact.given_name, false), ("family_name", &contact.family_name, strict)]
    {
        if value.trim().is_empty() {
            if required {
                v.add(field(name), "le nom de famille est obligatoire");
            }
            continue;
        }
        match validate::normalize_person_name(value) {
            Ok(n) if name == "given_name" => input.given_name = n,
            Ok(n) => input.family_name = n,
            Err(r) => v.add(field(name), validate::describe(r)),
        }
    }
    input.job_title = contact.job_title.split_whitespace().collect::<Vec<_>>().join(" ");
    v.check(input.job_title.chars().count() <= 150, &field("job_title"), "au plus 150 caractères");

    let mut seen = std::collections::HashSet::new();
    for (i, email) in contact.emails.iter().enumerate() {
        match validate::normalize_email(&email.address) {
            Ok(address) => {
                if !seen.insert(validate::email_match_key(&address)) {
                    v.add(format!("{prefix}.emails[{i}].address"), "adresse en double");
                }
                let kind = EmailKind::try_from(email.kind).unwrap_or(EmailKind::Unspecified);
                input.emails.push(StoredEmail { address, kind: kind as i32, primary: email.primary });
            }
            Err(r) => v.add(format!("{prefix}.emails[{i}].address"), validate::describe(r)),
        }
    }
    v.check(contact.emails.len() <= 10, &field("emails"), "au plus 10 adresses");
    let mut flags: Vec<bool> = input.emails.iter().map(|e| e.primary).collect();
    one_primary(&mut flags, &mut v, field("emails"));
    for (e, p) in input.emails.iter_mut().zip(flags) {
        e.primary = p;
    }

    let mut seen = std::collections::HashSet::new();
    for (i, phone) in contact.phones.iter().enumerate() {
        match validate::normalize_phone(&phone.number) {
            Ok(number) => {
                if !seen.insert(number.clone()) {
                    v.add(format!("{prefix}.phones[{i}].number"), "numéro en double");
                }
                let kind = PhoneKind::try_from(phone.kind).unwrap_or(PhoneKind::Unspecified);
                input.phones.push(StoredPhone { number, kind: kind as i32, primary: phone.primary });
            }
            Err(r) => v.add(format!("{prefix}.phones[{i}].number"), validate::describe(r)),
        }
    }
    v.check(contact.phones.len() <= 10, &field("phones"), "au plus 10 numéros");
    let mut flags: Vec<bool> = input.phones.iter().map(|p| p.primary).collect();
    one_primary(&mut flags, &mut v, field("phones"));
    for (p, f) in input.phones.iter_mut().zip(flags) {
        p.primary = f;
    }

    if let Some(a) = &contact.address {
        let mut stored = StoredAddress {
            street_line: a.street_line.trim().to_owned(),
            complement: a.complement.trim().to_owned(),
            distribution: a.distribution.trim().to_owned(),
            postal_code: a.postal_code.trim().to_owned(),
            city: a.city.split_whitespace().collect::<Vec<_>>().join(" "),
            cedex: a.cedex.trim().to_owned(),
            insee_code: a.insee_code.trim().to_owned(),
            department_code: String::new(),
            country_code: a.country_code.trim().to_ascii_uppercase(),
        };
        if stored.country_code.is_empty() {
            stored.country_code = "FR".into();
        }
        if stored.country_code == "FR" && !stored.postal_code.is_empty() {
            match validate::normalize_postal_code(&stored.postal_code) {
                Ok(code) => {
                    stored.department_code = validate::department_of(&code, "FR").unwrap_or_default();
                    stored.postal_code = code;
                }
                Err(r) => v.add(field("address.postal_code"), validate::describe(r)),
            }
        }
        if stored != (StoredAddress { country_code: "FR".into(), ..StoredAddress::default() }) {
            input.address = Some(stored);
        }
    }

    for (i, consent) in contact.consents.iter().enumerate() {
        let topic = ConsentTopic::try_from(consent.topic).unwrap_or(ConsentTopic::Unspecified);
        let channel = ConsentChannel::try_from(consent.channel).unwrap_or(ConsentChannel::Unspecified);
        if topic == ConsentTopic::Unspecified || channel == ConsentChannel::Unspecified {
            v.add(format!("{prefix}.consents[{i}]"), "le sujet et le canal du consentement sont obligatoires");
            continue;
        }
        if input.consents.iter().any(|c| c.topic == topic as i32 && c.channel == channel as i32) {
            v.add(format!("{prefix}.consents[{i}]"), "consentement en double pour ce sujet et ce canal");
            continue;
        }
        let record_time = match &consent.record_time {
            Some(t) => match from_timestamp(&format!("{prefix}.consents[{i}].record_time"), t) {
                Ok(t) => t,
                Err(e) => {
                    absorb(&mut v, e)?;
                    continue;
                }
            },
            None => Utc::now(),
        };
        input.consents.push(StoredConsent {
            topic: topic as i32,
            channel: channel as i32,
            granted: consent.granted,
            source: consent.source.trim().chars().take(200).collect(),
            record_time: record_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
    }
    match validate::normalize_tags(&contact.tags) {
        Ok(tags) => input.tags = tags,
        Err((i, r)) => v.add(format!("{prefix}.tags[{i}]"), validate::describe(r)),
    }
    for (system, value) in &contact.external_refs {
        let ok = !system.is_empty()
            && system.len() <= 50
            && system.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && value.len() <= 200;
        v.check(ok, &field("external_refs"), "clés de 1 à 50 caractères [a-zA-Z0-9_-], valeurs d'au plus 200");
    }
    input.external_refs = serde_json::to_value(&contact.external_refs).unwrap_or_else(|_| serde_json::json!({}));
    v.into_result()?;
    Ok(input)
}

/// Loads one contact visible in the transaction's scope.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<ContactRow>, Error> {
    Ok(load_many(conn, &[id]).await?.into_iter().next())
}

/// Loads several contacts visible in the transaction's scope, in one statement.
pub(crate) async fn load_many(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Vec<ContactRow>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(format!("SELECT {COLUMNS}, {} FROM contacts c WHERE c.id = ANY($1)", computed_columns()))
        .bind::<Array<SqlUuid>, _>(ids)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

/// The contacts that look like `input` in every entity (hints only).
async fn hints(
    conn: &mut AsyncPgConnection,
    input: &ContactInput,
    exclude: Option<Uuid>,
    limit: i32,
) -> Result<Vec<Hint>, Error> {
    Ok(diesel::sql_query("SELECT * FROM crm_contact_duplicate_hints($1, $2, $3, $4, $5, $6)")
        .bind::<Array<Text>, _>(input.email_keys())
        .bind::<Array<Text>, _>(input.phone_keys())
        .bind::<Text, _>(input.name_key())
        .bind::<Text, _>(input.postal_code())
        .bind::<Nullable<SqlUuid>, _>(exclude)
        .bind::<diesel::sql_types::Integer, _>(limit)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

impl ContactInput {
    /// What two contacts share when [`hints`] may pair them: e-mail and
    /// phone keys, and the postal code a similar name needs.
    pub(crate) fn duplicate_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.email_keys().into_iter().map(|k| format!("email:{k}")).collect();
        keys.extend(self.phone_keys().into_iter().map(|k| format!("phone:{k}")));
        let postal = self.postal_code();
        if !postal.is_empty() {
            keys.push(format!("postal:{postal}"));
        }
        keys
    }
}

/// Whether each of `inputs` has duplicate hints (as [`hints`] finds them),
/// in one statement.
pub(crate) async fn have_hints(conn: &mut AsyncPgConnection, inputs: &[&ContactInput]) -> Result<Vec<bool>, Error> {
    #[derive(QueryableByName)]
    struct Index {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    // Keys hold no control character: lists travel joined by U+001F.
    let joined = |keys: Vec<String>| keys.join("\u{1f}");
    let found: Vec<Index> = diesel::sql_query(
        "SELECT DISTINCT i.n FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                WITH ORDINALITY AS i(emails, phones, name_key, postal_code, n)
          CROSS JOIN LATERAL crm_contact_duplicate_hints(string_to_array(i.emails, chr(31)),
                string_to_array(i.phones, chr(31)), i.name_key, i.postal_code, NULL, 1) h",
    )
    .bind::<Array<Text>, _>(inputs.iter().map(|i| joined(i.email_keys())).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(inputs.iter().map(|i| joined(i.phone_keys())).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(inputs.iter().map(|i| i.name_key()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(inputs.iter().map(|i| i.postal_code()).collect::<Vec<_>>())
    .load(conn)
    .await
    .map_err(DbError::from)?;
    let mut flags = vec![false; inputs.len()];
    for Index { n } in found {
        flags[(n - 1) as usize] = true;
    }
    Ok(flags)
}

/// Writes the new contact `id` of `entity` from `input` and its audit event
/// (`crm.contacts.create`), in the caller's transaction, whose scope must
/// allow `entity`. Returns the created record.
pub(crate) async fn insert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    input: &ContactInput,
) -> Result<Contact, Error> {
    let query = diesel::sql_query(
        "INSERT INTO contacts (id, entity_id, civility, given_name, family_name, job_title, emails,
            phones, address, consents, tags, external_refs, email_keys, phone_keys, postal_code)
         VALUES ($14, $15, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .into_boxed();
    bind_input(query, input)
        .bind::<SqlUuid, _>(id)
        .bind::<SqlUuid, _>(entity)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    let created = load(conn, id).await?.ok_or_else(|| Error::internal("created row not found"))?;
    let created = created.to_proto();
    audit(conn, "crm.contacts.create", None, Some(&created)).await?;
    Ok(created)
}

/// Likely duplicates of `input` (hints, then the details of those the
/// caller may read); the transaction is left in the `readable` scope.
pub(crate) async fn find_duplicates(
    conn: &mut AsyncPgConnection,
    input: &ContactInput,
    exclude: Option<Uuid>,
    limit: i32,
    readable: &EntityScope,
    known: &[Uuid],
) -> Result<Vec<DuplicateCandidate>, Error> {
    let mut hints = hints(conn, input, exclude, limit).await?;
    hints.retain(|h| !known.contains(&h.id));
    let visible: Vec<Uuid> = hints.iter().filter(|h| readable.allows(h.entity_id)).map(|h| h.id).collect();
    socle_db::set_scope(conn, readable).await.map_err(DbError::from)?;
    let rows = load_many(conn, &visible).await?;
    Ok(candidates(RecordKind::Contact, hints, readable, |id| {
        rows.iter().find(|r| r.id == id).map(|r| (r.display_name(), r.summary()))
    }))
}

type Boxed<'f> = diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Binds $1 to $13 of the insert and update statements.
fn bind_input<'f>(query: Boxed<'f>, input: &ContactInput) -> Boxed<'f> {
    query
        .bind::<SmallInt, _>(input.civility)
        .bind::<Text, _>(input.given_name.clone())
        .bind::<Text, _>(input.family_name.clone())
        .bind::<Text, _>(input.job_title.clone())
        .bind::<Jsonb, _>(serde_json::to_value(&input.emails).unwrap_or_default())
        .bind::<Jsonb, _>(serde_json::to_value(&input.phones).unwrap_or_default())
        .bind::<Nullable<Jsonb>, _>(input.address.as_ref().and_then(|a| serde_json::to_value(a).ok()))
        .bind::<Jsonb, _>(serde_json::to_value(&input.consents).unwrap_or_default())
        .bind::<Array<Text>, _>(input.tags.clone())
        .bind::<Jsonb, _>(input.external_refs.clone())
        .bind::<Array<Text>, _>(input.email_keys())
        .bind::<Array<Text>, _>(input.phone_keys())
        .bind::<Text, _>(input.postal_code())
}

/// Writes `input` over the record `id` if it is still at `version` (else
/// `ABORTED`: someone changed it since it was read).
pub(crate) async fn write(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    input: &ContactInput,
) -> Result<(), Error> {
    let query = diesel::sql_query(
        "UPDATE contacts SET civility = $1, given_name = $2, family_name = $3, job_title = $4,
                            emails = $5, phones = $6, address = $7, consents = $8, tags = $9, external_refs = $10,
                            email_keys = $11, phone_keys = $12, postal_code = $13,
                            version = version + 1, update_time = now()
                         WHERE id = $14 AND version = $15",
    )
    .into_boxed();
    let updated = bind_input(query, input)
        .bind::<SqlUuid, _>(id)
        .bind::<BigInt, _>(version)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    if updated != 1 {
        return Err(Error::etag_mismatch());
    }
    Ok(())
}

const UPDATABLE: &[&str] = &[
    "civility",
    "given_name",
    "family_name",
    "job_title",
    "emails",
    "phones",
    "address",
    "consents",
    "tags",
    "external_refs",
];

fn apply_mask(into: &mut Contact, from: Contact, mask: &FieldMask) {
    let Contact {
        civility,
        given_name,
        family_name,
        job_title,
        emails,
        phones,
        address,
        consents,
        tags,
        external_refs,
        ..
    } = from;
    let set = |path: &str| mask.contains(path);
    if set("civility") {
        into.civility = civility;
    }
    if set("given_name") {
        into.given_name = given_name;
    }
    if set("family_name") {
        into.family_name = family_name;
    }
    if set("job_title") {
        into.job_title = job_title;
    }
    if set("emails") {
        into.emails = emails;
    }
    if set("phones") {
        into.phones = phones;
    }
    if set("address") {
        into.address = address;
    }
    if set("consents") {
        into.consents = consents;
    }
    if set("tags") {
        into.tags = tags;
    }
    if set("external_refs") {
        into.external_refs = external_refs;
    }
}

struct Order {
    sql: &'static str,
    after: &'static str,
    key: fn(&ContactRow) -> String,
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "family_name" => Order {
            sql: "c.name_key, c.id",
            after: "(c.name_key, c.id) > ($10::text, $11::uuid)",
            key: |r| r.name_key.clone(),
        },
        "update_time desc" => Order {
            sql: "c.update_time DESC, c.id DESC",
            after: "(c.update_time, c.id) < ($10::timestamptz, $11::uuid)",
            key: |r| r.update_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
        "create_time desc" => Order {
            sql: "c.create_time DESC, c.id DESC",
            after: "(c.create_time, c.id) < ($10::timestamptz, $11::uuid)",
            key: |r| r.create_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
        _ => {
            return Err(Error::invalid_field(
                "order_by",
                "must be one of: family_name, update_time desc, create_time desc",
            ));
        }
    })
}

/// The filters of a contact list or export, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filters {
    organization: Option<Uuid>,
    tags: Vec<String>,
    statuses: Vec<i16>,
    topic: i32,
    channel: i32,
    query: String,
    include_inactive: bool,
}

/// Validates the filters of a contact list or export.
pub(crate) fn filters(
    organization_id: &str,
    tags: &[String],
    statuses: &[i32],
    consent_topic: i32,
    consent_channel: i32,
    query: &str,
    include_inactive: bool,
) -> Result<Filters, Error> {
    let mut v = Violations::new();
    let organization = socle_api::parse_optional_id("organization_id", organization_id).map_err(|e| absorb(&mut v, e));
    let tags =
        validate::normalize_tags(tags).map_err(|(i, reason)| v.add(format!("tags[{i}]"), validate::describe(reason)));
    let mut kept = Vec::new();
    for (i, s) in statuses.iter().enumerate() {
        match MembershipStatus::try_from(*s) {
            Ok(MembershipStatus::Unspecified) | Err(_) => v.add(format!("membership_statuses[{i}]"), "statut inconnu"),
            Ok(s) => kept.push(s as i16),
        }
    }
    let topic = ConsentTopic::try_from(consent_topic).unwrap_or(ConsentTopic::Unspecified) as i32;
    let channel = ConsentChannel::try_from(consent_channel).unwrap_or(ConsentChannel::Unspecified) as i32;
    if (topic == 0) != (channel == 0) {
        v.add(
            if topic == 0 { "consent_topic" } else { "consent_channel" },
            "consent_topic et consent_channel vont ensemble",
        );
    }
    let query = query.trim().to_owned();
    v.check(query.chars().count() <= 200, "query", "au plus 200 caractères");
    v.into_result()?;
    let (Ok(organization), Ok(tags)) = (organization, tags) else { return Err(Error::internal("violations")) };
    kept.sort_unstable();
    kept.dedup();
    Ok(Filters { organization, tags, statuses: kept, topic, channel, query, include_inactive })
}

/// The `WHERE` clause of lists and exports over `contacts c`: binds $1
/// (entities) to $9; the keyset binds are $10 and $11.
pub(crate) fn where_sql() -> String {
    format!(
        "c.entity_id = ANY($1)
                AND ($2 OR c.state = 1)
                AND ($3::uuid IS NULL OR EXISTS (SELECT 1 FROM affiliations a WHERE a.contact_id = c.id
                     AND a.organization_id = $3 AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL})))
                AND c.tags @> $4
                AND (cardinality($5::smallint[]) = 0 OR {status} = ANY($5))
                AND ($6::jsonb IS NULL OR c.consents @> $6)
                AND ($7 = '' OR c.name_key LIKE $7 || '%' OR socle_fold(c.given_name) LIKE $7 || '%'
                     OR EXISTS (SELECT 1 FROM unnest(c.email_keys) k WHERE k LIKE $8 || '%'))
                AND $9",
        status = status_sql()
    )
}

/// Binds the filters of [`where_sql`] ($1 to $9).
pub(crate) fn bind_filters<'f>(query: Boxed<'f>, entities: Vec<Uuid>, f: &Filters) -> Boxed<'f> {
    let consent =
        (f.topic != 0).then(|| serde_json::json!([{ "topic": f.topic, "channel": f.channel, "granted": true }]));
    query
        .bind::<Array<SqlUuid>, _>(entities)
        .bind::<Bool, _>(f.include_inactive)
        .bind::<Nullable<SqlUuid>, _>(f.organization)
        .bind::<Array<Text>, _>(f.tags.clone())
        .bind::<Array<SmallInt>, _>(f.statuses.clone())
        .bind::<Nullable<Jsonb>, _>(consent)
        .bind::<Text, _>(like_literal(&sql_fold(&f.query)))
        .bind::<Text, _>(like_literal(&f.query.to_lowercase()))
        // Reserved for later filters, always true for now.
        .bind::<Bool, _>(true)
}

impl Crm {
    pub async fn create_contact(
        &self,
        caller: &Caller,
        r: CreateContactRequest,
    ) -> Result<CreateContactResponse, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e));
        let contact = r.contact.unwrap_or_default();
        let entity = parse_id("contact.entity_id", &contact.entity_id).map_err(|e| absorb(&mut v, e));
        let input = validate(&contact, "contact", true).map_err(|e| absorb(&mut v, e));
        v.into_result()?;
        let (Ok(key), Ok(entity), Ok(input)) = (key, entity, input) else {
            return Err(Error::internal("violations were reported"));
        };
        let readable = self.scope(&caller.with_acting(entity), "crm.contacts.read").await?;
        let allow = r.allow_duplicates;
        let write_scope = EntityScope::entity(entity);
        let tx_scope = write_scope.clone();
        self.db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "CreateContact", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(CreateContactResponse { contact: Some(row.to_proto()), duplicates: Vec::new() });
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    let duplicates = find_duplicates(conn, &input, None, 10, &readable, &[]).await?;
                    if !duplicates.is_empty() && !allow {
                        return Err(duplicate_conflict(duplicates));
                    }
                    socle_db::set_scope(conn, &write_scope).await.map_err(DbError::from)?;
                    let created = insert(conn, id, entity, &input).await?;
                    Ok(CreateContactResponse { contact: Some(created), duplicates })
                })
            })
            .await
    }

    pub async fn get_contact(&self, caller: &Caller, id: &str) -> Result<Contact, Error> {
        let id = parse_id("contact_id", id)?;
        let scope = self.scope(caller, "crm.contacts.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "contacts", id, "crm.contacts.read", "contact").await),
        }
    }

    pub async fn list_contacts(&self, caller: &Caller, r: ListContactsRequest) -> Result<ListContactsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let f = filters(
            &r.organization_id,
            &r.tags,
            &r.membership_statuses,
            r.consent_topic,
            r.consent_channel,
            &r.query,
            r.include_inactive,
        )?;
        let fingerprint = format!(
            "{entity}|{}|{order_by}|{:?}|{:?}|{:?}|{}|{}|{}|{}",
            r.include_descendants, f.organization, f.tags, f.statuses, f.topic, f.channel, f.query, f.include_inactive
        );
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.contacts.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = format!(
            "SELECT {COLUMNS}, {computed} FROM contacts c
              WHERE {filters}
                AND ($10::text IS NULL OR {after})
              ORDER BY {order} LIMIT {limit}",
            computed = computed_columns(),
            filters = where_sql(),
            after = order.after,
            order = order.sql,
            limit = size + 1
        );
        let mut rows: Vec<ContactRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f)
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
        Ok(ListContactsResponse { contacts: rows.iter().map(ContactRow::to_proto).collect(), next_page_token })
    }

    pub async fn update_contact(&self, caller: &Caller, r: UpdateContactRequest) -> Result<Contact, Error> {
        let id = parse_id("contact_id", &r.contact_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.contact.ok_or_else(|| Error::invalid_field("contact", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.contacts.update").await?;
        let readable = self.scope(caller, "crm.contacts.read").await?;
        let (etag_given, allow) = (r.etag.clone(), r.allow_duplicates);
        let tx_scope = scope.clone();
        let result = self
            .db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, true)?;
                    if current.state != ContactState::Active as i16 {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            "a merged or erased contact cannot be changed",
                        ));
                    }
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let input = validate(&next, "contact", true)?;
                    let identity_changed =
                        ["given_name", "family_name", "emails", "phones", "address"].iter().any(|p| mask.contains(p));
                    if identity_changed && !allow {
                        // Only the candidates the change brings are refused: a
                        // duplicate already known before the change does not
                        // block unrelated edits.
                        let known = validate(&before, "contact", false)?;
                        let mut known: Vec<Uuid> =
                            hints(conn, &known, Some(id), 50).await?.iter().map(|h| h.id).collect();
                        // Pairs reviewed as not duplicates are not proposed again.
                        known.extend(crate::duplicates::dismissed_partners(conn, RecordKind::Contact, id).await?);
                        let duplicates = find_duplicates(conn, &input, Some(id), 10, &readable, &known).await?;
                        socle_db::set_scope(conn, &scope).await.map_err(DbError::from)?;
                        if !duplicates.is_empty() {
                            return Err(duplicate_conflict(duplicates));
                        }
                    }
                    write(conn, id, current.version, &input).await?;
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.contacts.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(contact) => Ok(contact),
            None => Err(self.not_found(caller, "contacts", id, "crm.contacts.update", "contact").await),
        }
    }

    pub async fn delete_contact(&self, caller: &Caller, r: DeleteContactRequest) -> Result<(), Error> {
        let id = parse_id("contact_id", &r.contact_id)?;
        let scope = self.scope(caller, "crm.contacts.delete").await?;
        let etag_given = r.etag.clone();
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    check_etag(&etag_given, current.version, false)?;
                    let before = current.to_proto();
                    diesel::sql_query("UPDATE contacts SET merged_into_id = NULL WHERE merged_into_id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    diesel::sql_query("DELETE FROM contacts WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    audit(conn, "crm.contacts.delete", Some(&before), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found { Ok(()) } else { Err(self.not_found(caller, "contacts", id, "crm.contacts.delete", "contact").await) }
    }

    pub async fn find_contact_duplicates(
        &self,
        caller: &Caller,
        r: FindContactDuplicatesRequest,
    ) -> Result<Vec<DuplicateCandidate>, Error> {
        let contact = r.contact.unwrap_or_default();
        let entity = parse_id("contact.entity_id", &contact.entity_id)?;
        let input = validate(&contact, "contact", false)?;
        let exclude = socle_api::parse_optional_id("exclude_contact_id", &r.exclude_contact_id)?;
        let limit = match r.max_candidates {
            n if n < 0 => return Err(Error::invalid_field("max_candidates", "must not be negative")),
            0 => 10,
            n => n.min(50),
        };
        let readable = self.scope(&caller.with_acting(entity), "crm.contacts.read").await?;
        let scope = readable.clone();
        self.db
            .transaction(&scope, move |conn| {
                Box::pin(async move { find_duplicates(conn, &input, exclude, limit, &readable, &[]).await })
            })
            .await
    }
}

/// [`load`] with the row locked for the rest of the transaction.
pub(crate) async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<ContactRow>, Error> {
    diesel::sql_query("SELECT 1 FROM contacts WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

/// The gRPC adapter.
#[tonic::async_trait]
impl ContactService for Crm {
    async fn create_contact(
        &self,
        request: Request<CreateContactRequest>,
    ) -> Result<Response<CreateContactResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::create_contact(self, &caller, request.into_inner()).await, request_id)
    }

    async fn get_contact(&self, request: Request<GetContactRequest>) -> Result<Response<GetContactResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_contact(self, &caller, &request.get_ref().contact_id).await;
        reply(result.map(|c| GetContactResponse { contact: Some(c) }), request_id)
    }

    async fn list_contacts(
        &self,
        request: Request<ListContactsRequest>,
    ) -> Result<Response<ListContactsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_contacts(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_contact(
        &self,
        request: Request<UpdateContactRequest>,
    ) -> Result<Response<UpdateContactResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::update_contact(self, &caller, request.into_inner()).await;
        reply(result.map(|c| UpdateContactResponse { contact: Some(c) }), request_id)
    }

    async fn delete_contact(
        &self,
        request: Request<DeleteContactRequest>,
    ) -> Result<Response<DeleteContactResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(
            Crm::delete_contact(self, &caller, request.into_inner()).await.map(|()| DeleteContactResponse {}),
            request_id,
        )
    }

    async fn find_contact_duplicates(
        &self,
        request: Request<FindContactDuplicatesRequest>,
    ) -> Result<Response<FindContactDuplicatesResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::find_contact_duplicates(self, &caller, request.into_inner()).await;
        reply(result.map(|candidates| FindContactDuplicatesResponse { candidates }), request_id)
    }

    async fn preview_contact_merge(
        &self,
        request: Request<PreviewContactMergeRequest>,
    ) -> Result<Response<PreviewContactMergeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::preview_contact_merge(self, &caller, request.into_inner()).await, request_id)
    }

    async fn merge_contacts(
        &self,
        request: Request<MergeContactsRequest>,
    ) -> Result<Response<MergeContactsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::merge_contacts(self, &caller, request.into_inner()).await, request_id)
    }

    async fn import_contacts(
        &self,
        request: Request<tonic::Streaming<ImportContactsRequest>>,
    ) -> Result<Response<ImportContactsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::import(self, &caller, crate::imports::Kind::Contacts, None, request.into_inner()).await;
        reply(result.map(|job| ImportContactsResponse { import_job: Some(job) }), request_id)
    }

    async fn export_contacts(
        &self,
        request: Request<ExportContactsRequest>,
    ) -> Result<Response<crate::exports::Pieces<ExportContactsResponse>>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::export_contacts(self, &caller, request.into_inner()).await, request_id)
    }

    async fn export_contact_data(
        &self,
        request: Request<ExportContactDataRequest>,
    ) -> Result<Response<ExportContactDataResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::export_contact_data(self, &caller, request.into_inner()).await, request_id)
    }

    async fn erase_contact(
        &self,
        request: Request<EraseContactRequest>,
    ) -> Result<Response<EraseContactResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::erase_contact(self, &caller, request.into_inner()).await, request_id)
    }
}
