//! Organisations (`socle.crm.v1.OrganizationService`): the member companies
//! and prospects of an entity. Validated identifiers (SIREN/SIRET with their
//! check digits, NAF, legal form), normalised contact points, duplicate
//! detection on create and update, keyset lists with filters, partial
//! updates with etags, idempotent creates. Every write is audited in its
//! transaction.

use chrono::{DateTime, NaiveDate, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Date, Integer, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use socle_api::{FieldMask, PageToken, Violations, check_etag, page_size, parse_id};
use socle_db::{DbError, EntityScope, idempotency};
use socle_errors::{Code, Error};
use socle_proto::socle::{
    crm::v1::{organization_service_server::OrganizationService, *},
    r#type::v1::PostalAddress,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    common::{Audited, Caller, Count, Crm, Hint, TODAY_SQL, audit, candidates, duplicate_conflict, etag, like_literal},
    common::{absorb, reply, rid, sql_fold, timestamp},
    validate,
};

/// The columns of [`OrganizationRow`], over `organizations o`.
pub(crate) const COLUMNS: &str = "o.id, o.entity_id, o.legal_name, o.trade_name, o.siren, o.siret, o.naf_code,
    o.legal_form_code, o.headcount_band, o.addresses, o.website, o.email, o.phone, o.tags, o.description,
    o.external_refs, o.state, o.merged_into_id, o.latest_membership_id, o.member_since, o.name_key,
    o.postal_code, o.city, o.version, o.create_time, o.update_time";

/// The computed columns of [`OrganizationRow`]: membership status and
/// contact count, in the same statement (no query per row).
pub(crate) fn computed_columns() -> String {
    format!(
        "crm_membership_status(o.latest_membership_id, o.latest_membership_cancelled, o.member_since,
            o.latest_membership_end, o.latest_membership_grace_end, {TODAY_SQL}) AS membership_status,
         (SELECT count(*) FROM affiliations a WHERE a.organization_id = o.id
             AND (a.end_date IS NULL OR a.end_date >= {TODAY_SQL}))::int AS contact_count"
    )
}

/// One organisation as stored, with its computed status.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct OrganizationRow {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub entity_id: Uuid,
    #[diesel(sql_type = Text)]
    pub legal_name: String,
    #[diesel(sql_type = Text)]
    trade_name: String,
    #[diesel(sql_type = Nullable<Text>)]
    siren: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    siret: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    naf_code: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    legal_form_code: Option<String>,
    #[diesel(sql_type = SmallInt)]
    headcount_band: i16,
    #[diesel(sql_type = Jsonb)]
    addresses: serde_json::Value,
    #[diesel(sql_type = Text)]
    website: String,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    phone: String,
    #[diesel(sql_type = Array<Text>)]
    tags: Vec<String>,
    #[diesel(sql_type = Text)]
    description: String,
    #[diesel(sql_type = Jsonb)]
    external_refs: serde_json::Value,
    #[diesel(sql_type = SmallInt)]
    state: i16,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    merged_into_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    latest_membership_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Date>)]
    member_since: Option<NaiveDate>,
    #[diesel(sql_type = Text)]
    name_key: String,
    #[diesel(sql_type = Text)]
    pub postal_code: String,
    #[diesel(sql_type = Text)]
    pub city: String,
    #[diesel(sql_type = BigInt)]
    pub version: i64,
    #[diesel(sql_type = Timestamptz)]
    create_time: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
    #[diesel(sql_type = SmallInt)]
    membership_status: i16,
    #[diesel(sql_type = Integer)]
    contact_count: i32,
}

/// An address as stored in `organizations.addresses`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct StoredAddress {
    kind: i32,
    primary: bool,
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

impl StoredAddress {
    fn to_proto(&self) -> OrganizationAddress {
        OrganizationAddress {
            kind: self.kind,
            primary: self.primary,
            address: Some(PostalAddress {
                street_line: self.street_line.clone(),
                complement: self.complement.clone(),
                distribution: self.distribution.clone(),
                postal_code: self.postal_code.clone(),
                city: self.city.clone(),
                cedex: self.cedex.clone(),
                insee_code: self.insee_code.clone(),
                department_code: self.department_code.clone(),
                country_code: self.country_code.clone(),
            }),
        }
    }
}

impl OrganizationRow {
    pub(crate) fn to_proto(&self) -> Organization {
        let addresses: Vec<StoredAddress> = serde_json::from_value(self.addresses.clone()).unwrap_or_default();
        let external_refs = serde_json::from_value(self.external_refs.clone()).unwrap_or_default();
        let naf = self.naf_code.clone().unwrap_or_default();
        let legal_form = self.legal_form_code.clone().unwrap_or_default();
        Organization {
            id: self.id.to_string(),
            entity_id: self.entity_id.to_string(),
            legal_name: self.legal_name.clone(),
            trade_name: self.trade_name.clone(),
            siren: self.siren.clone().unwrap_or_default(),
            siret: self.siret.clone().unwrap_or_default(),
            naf_label: validate::naf_label(&naf).unwrap_or_default().to_owned(),
            naf_code: naf,
            legal_form_label: validate::legal_form_label(&legal_form).unwrap_or_default().to_owned(),
            legal_form_code: legal_form,
            headcount_band: i32::from(self.headcount_band),
            addresses: addresses.iter().map(StoredAddress::to_proto).collect(),
            website: self.website.clone(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            tags: self.tags.clone(),
            description: self.description.clone(),
            external_refs,
            state: i32::from(self.state),
            merged_into_id: self.merged_into_id.map(|id| id.to_string()).unwrap_or_default(),
            membership_status: i32::from(self.membership_status),
            current_membership_id: self.latest_membership_id.map(|id| id.to_string()).unwrap_or_default(),
            member_since_date: self.member_since.map(|d| d.to_string()).unwrap_or_default(),
            contact_count: self.contact_count,
            create_time: Some(timestamp(self.create_time)),
            update_time: Some(timestamp(self.update_time)),
            etag: etag(self.version),
        }
    }

    /// A one-line summary to recognise the company (duplicate candidates).
    pub(crate) fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(siret) = &self.siret {
            parts.push(format!("SIRET {siret}"));
        } else if let Some(siren) = &self.siren {
            parts.push(format!("SIREN {siren}"));
        }
        if !self.city.is_empty() {
            parts.push(format!("{} {}", self.postal_code, self.city).trim().to_owned());
        }
        parts.join(" · ")
    }
}

impl Audited for Organization {
    const RESOURCE_TYPE: &'static str = "crm.organization";
    fn record_id(&self) -> &str {
        &self.id
    }
    fn owner(&self) -> &str {
        &self.entity_id
    }
}

/// A validated organisation, ready to be written.
#[derive(Debug, Clone, Default)]
pub struct OrganizationInput {
    legal_name: String,
    trade_name: String,
    siren: Option<String>,
    siret: Option<String>,
    naf_code: Option<String>,
    legal_form_code: Option<String>,
    headcount_band: i16,
    addresses: Vec<StoredAddress>,
    website: String,
    email: String,
    phone: String,
    tags: Vec<String>,
    description: String,
    external_refs: serde_json::Value,
}

impl OrganizationInput {
    fn primary(&self) -> Option<&StoredAddress> {
        self.addresses.iter().find(|a| a.primary)
    }

    /// The duplicate-detection key of the name.
    fn name_key(&self) -> String {
        sql_fold(&self.legal_name)
    }
}

fn reason(violations: &mut Violations, field: String, reason: &str) {
    violations.add(field, validate::describe(reason));
}

/// Validates and normalises `org` (fields reported under `prefix.`).
/// `strict` is false for duplicate lookups, where a partial record is fine.
pub fn validate(org: &Organization, prefix: &str, strict: bool) -> Result<OrganizationInput, Error> {
    let field = |name: &str| format!("{prefix}.{name}");
    let mut v = Violations::new();
    let mut input = OrganizationInput::default();

    let legal_name = org.legal_name.split_whitespace().collect::<Vec<_>>().join(" ");
    if legal_name.is_empty() {
        if strict {
            v.add(field("legal_name"), "la raison sociale est obligatoire");
        }
    } else if legal_name.chars().count() > 200 || legal_name.chars().any(char::is_control) {
        v.add(field("legal_name"), "la raison sociale doit faire au plus 200 caractères, sans caractère de contrôle");
    }
    input.legal_name = legal_name;
    input.trade_name = org.trade_name.split_whitespace().collect::<Vec<_>>().join(" ");
    v.check(
        input.trade_name.chars().count() <= 200,
        &field("trade_name"),
        "le nom commercial doit faire au plus 200 caractères",
    );

    if !org.siren.trim().is_empty() {
        match validate::normalize_siren(&org.siren) {
            Ok(siren) => input.siren = Some(siren),
            Err(r) => reason(&mut v, field("siren"), r),
        }
    }
    if !org.siret.trim().is_empty() {
        match validate::normalize_siret(&org.siret) {
            Ok(siret) => {
                let siren = validate::siren_of_siret(&siret).to_owned();
                match &input.siren {
                    Some(given) if *given != siren => {
                        v.add(field("siret"), "le SIRET doit commencer par le SIREN de l'entreprise");
                    }
                    _ => input.siren = Some(siren),
                }
                input.siret = Some(siret);
            }
            Err(r) => reason(&mut v, field("siret"), r),
        }
    }
    if !org.naf_code.trim().is_empty() {
        match validate::normalize_naf(&org.naf_code) {
            Ok(naf) => input.naf_code = Some(naf),
            Err(r) => reason(&mut v, field("naf_code"), r),
        }
    }
    if !org.legal_form_code.trim().is_empty() {
        match validate::normalize_legal_form(&org.legal_form_code) {
            Ok(code) => input.legal_form_code = Some(code),
            Err(r) => reason(&mut v, field("legal_form_code"), r),
        }
    }
    match HeadcountBand::try_from(org.headcount_band) {
        Ok(band) => input.headcount_band = band as i16,
        Err(_) => v.add(field("headcount_band"), "tranche d'effectif inconnue"),
    }

    let mut primaries = 0;
    for (i, address) in org.addresses.iter().enumerate() {
        let at = |name: &str| format!("{prefix}.addresses[{i}].{name}");
        let kind = AddressKind::try_from(address.kind).unwrap_or(AddressKind::Unspecified);
        if kind == AddressKind::Unspecified {
            v.add(at("kind"), "le type d'adresse est obligatoire");
        }
        let Some(postal) = &address.address else {
            v.add(at("address"), "l'adresse est obligatoire");
            continue;
        };
        let mut stored = StoredAddress {
            kind: kind as i32,
            primary: address.primary,
            street_line: postal.street_line.trim().to_owned(),
            complement: postal.complement.trim().to_owned(),
            distribution: postal.distribution.trim().to_owned(),
            postal_code: postal.postal_code.trim().to_owned(),
            city: postal.city.split_whitespace().collect::<Vec<_>>().join(" "),
            cedex: postal.cedex.trim().to_owned(),
            insee_code: postal.insee_code.trim().to_owned(),
            department_code: String::new(),
            country_code: postal.country_code.trim().to_ascii_uppercase(),
        };
        if stored.country_code.is_empty() {
            stored.country_code = "FR".into();
        }
        if stored.country_code.len() != 2 || !stored.country_code.chars().all(|c| c.is_ascii_uppercase()) {
            v.add(at("address.country_code"), "code pays ISO 3166-1 à deux lettres attendu, par exemple FR");
        }
        if stored.country_code == "FR" {
            match validate::normalize_postal_code(&stored.postal_code) {
                Ok(code) => {
                    stored.department_code = validate::department_of(&code, &stored.country_code).unwrap_or_default();
                    stored.postal_code = code;
                }
                Err(r) if strict || !stored.postal_code.is_empty() => {
                    reason(&mut v, at("address.postal_code"), r);
                }
                Err(_) => {}
            }
        }
        if strict && stored.city.is_empty() {
            v.add(at("address.city"), "la ville est obligatoire");
        }
        if stored.street_line.chars().count() > 200 || stored.city.chars().count() > 100 {
            v.add(at("address"), "ligne d'adresse (200) ou ville (100) trop longue");
        }
        primaries += usize::from(stored.primary);
        input.addresses.push(stored);
    }
    match primaries {
        0 => {
            if let Some(first) = input.addresses.first_mut() {
                first.primary = true;
            }
        }
        1 => {}
        _ => v.add(field("addresses"), "une seule adresse peut être principale"),
    }
    v.check(input.addresses.len() <= 10, &field("addresses"), "au plus 10 adresses");

    if !org.website.trim().is_empty() {
        match validate::normalize_website(&org.website) {
            Ok(url) => input.website = url,
            Err(r) => reason(&mut v, field("website"), r),
        }
    }
    if !org.email.trim().is_empty() {
        match validate::normalize_email(&org.email) {
            Ok(email) => input.email = email,
            Err(r) => reason(&mut v, field("email"), r),
        }
    }
    if !org.phone.trim().is_empty() {
        match validate::normalize_phone(&org.phone) {
            Ok(phone) => input.phone = phone,
            Err(r) => reason(&mut v, field("phone"), r),
        }
    }
    match validate::normalize_tags(&org.tags) {
        Ok(tags) => input.tags = tags,
        Err((i, r)) => reason(&mut v, format!("{prefix}.tags[{i}]"), r),
    }
    input.description = org.description.trim().to_owned();
    v.check(input.description.chars().count() <= 10_000, &field("description"), "au plus 10 000 caractères");
    for (system, value) in &org.external_refs {
        let ok = !system.is_empty()
            && system.len() <= 50
            && system.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && value.len() <= 200;
        v.check(ok, &field("external_refs"), "clés de 1 à 50 caractères [a-zA-Z0-9_-], valeurs d'au plus 200");
    }
    input.external_refs = serde_json::to_value(&org.external_refs).unwrap_or_else(|_| serde_json::json!({}));
    v.into_result()?;
    Ok(input)
}

/// Loads one organisation visible in the transaction's scope.
pub(crate) async fn load(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<OrganizationRow>, Error> {
    let rows: Vec<OrganizationRow> =
        diesel::sql_query(format!("SELECT {COLUMNS}, {} FROM organizations o WHERE o.id = $1", computed_columns()))
            .bind::<SqlUuid, _>(id)
            .load(conn)
            .await
            .map_err(DbError::from)?;
    Ok(rows.into_iter().next())
}

/// Loads several organisations visible in the transaction's scope, in one
/// statement.
pub(crate) async fn load_many(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Vec<OrganizationRow>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(format!("SELECT {COLUMNS}, {} FROM organizations o WHERE o.id = ANY($1)", computed_columns()))
        .bind::<Array<SqlUuid>, _>(ids)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

/// The organisations that look like `input` in every entity (hints only).
async fn hints(
    conn: &mut AsyncPgConnection,
    input: &OrganizationInput,
    exclude: Option<Uuid>,
    limit: i32,
) -> Result<Vec<Hint>, Error> {
    let primary = input.primary();
    Ok(diesel::sql_query("SELECT * FROM crm_organization_duplicate_hints($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind::<Text, _>(input.siren.clone().unwrap_or_default())
        .bind::<Text, _>(input.siret.clone().unwrap_or_default())
        .bind::<Text, _>(input.email.to_lowercase())
        .bind::<Text, _>(&input.phone)
        .bind::<Text, _>(input.name_key())
        .bind::<Text, _>(primary.map(|a| a.postal_code.clone()).unwrap_or_default())
        .bind::<Nullable<SqlUuid>, _>(exclude)
        .bind::<Integer, _>(limit)
        .load(conn)
        .await
        .map_err(DbError::from)?)
}

impl OrganizationInput {
    /// What two organisations share when [`hints`] may pair them: their
    /// identifiers, and the postal code a similar name needs.
    pub(crate) fn duplicate_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        keys.extend(self.siren.iter().map(|s| format!("siren:{s}")));
        keys.extend(self.siret.iter().map(|s| format!("siret:{s}")));
        if !self.email.is_empty() {
            keys.push(format!("email:{}", self.email.to_lowercase()));
        }
        if !self.phone.is_empty() {
            keys.push(format!("phone:{}", self.phone));
        }
        if let Some(a) = self.primary().filter(|a| !a.postal_code.is_empty()) {
            keys.push(format!("postal:{}", a.postal_code));
        }
        keys
    }
}

/// Whether each of `inputs` has duplicate hints (as [`hints`] finds them),
/// in one statement.
pub(crate) async fn have_hints(
    conn: &mut AsyncPgConnection,
    inputs: &[&OrganizationInput],
) -> Result<Vec<bool>, Error> {
    #[derive(QueryableByName)]
    struct Index {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    if inputs.is_empty() {
        return Ok(Vec::new());
    }
    let text = |f: fn(&OrganizationInput) -> String| inputs.iter().map(|i| f(i)).collect::<Vec<_>>();
    let found: Vec<Index> = diesel::sql_query(
        "SELECT DISTINCT i.n FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                WITH ORDINALITY AS i(siren, siret, email, phone, name_key, postal_code, n)
          CROSS JOIN LATERAL crm_organization_duplicate_hints(i.siren, i.siret, i.email, i.phone, i.name_key,
                i.postal_code, NULL, 1) h",
    )
    .bind::<Array<Text>, _>(text(|i| i.siren.clone().unwrap_or_default()))
    .bind::<Array<Text>, _>(text(|i| i.siret.clone().unwrap_or_default()))
    .bind::<Array<Text>, _>(text(|i| i.email.to_lowercase()))
    .bind::<Array<Text>, _>(text(|i| i.phone.clone()))
    .bind::<Array<Text>, _>(text(|i| i.name_key()))
    .bind::<Array<Text>, _>(text(|i| i.primary().map(|a| a.postal_code.clone()).unwrap_or_default()))
    .load(conn)
    .await
    .map_err(DbError::from)?;
    let mut flags = vec![false; inputs.len()];
    for Index { n } in found {
        flags[(n - 1) as usize] = true;
    }
    Ok(flags)
}

/// Writes the new organisation `id` of `entity` from `input` and its audit
/// event (`crm.organizations.create`), in the caller's transaction, whose
/// scope must allow `entity`. Returns the created record.
pub(crate) async fn insert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    entity: Uuid,
    input: &OrganizationInput,
) -> Result<Organization, Error> {
    let query = diesel::sql_query(
        "INSERT INTO organizations (id, entity_id, legal_name, trade_name, siren, siret, naf_code,
            legal_form_code, headcount_band, addresses, website, email, phone, tags, description,
            external_refs, postal_code, city, department_code)
         VALUES ($18, $19, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
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
    audit(conn, "crm.organizations.create", None, Some(&created)).await?;
    Ok(created)
}

/// Likely duplicates of `input`: hints, then the details of those the
/// caller may read (row-level security applies to the lookup as well).
/// The transaction is left in the `readable` scope.
pub(crate) async fn find_duplicates(
    conn: &mut AsyncPgConnection,
    input: &OrganizationInput,
    exclude: Option<Uuid>,
    limit: i32,
    readable: &EntityScope,
    known: &[Uuid],
) -> Result<Vec<DuplicateCandidate>, Error> {
    let mut hints = hints(conn, input, exclude, limit).await?;
    hints.retain(|h| !known.contains(&h.id));
    let visible: Vec<Uuid> = hints.iter().filter(|h| readable.allows(h.entity_id)).map(|h| h.id).collect();
    // The write transaction's scope may be narrower than what the caller
    // reads: look the visible ones up in the read scope.
    socle_db::set_scope(conn, readable).await.map_err(DbError::from)?;
    let rows = load_many(conn, &visible).await;
    let rows = rows?;
    Ok(candidates(RecordKind::Organization, hints, readable, |id| {
        rows.iter().find(|r| r.id == id).map(|r| (r.legal_name.clone(), r.summary()))
    }))
}

type Boxed<'f> = diesel::query_builder::BoxedSqlQuery<'f, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Binds $1 to $17 of the insert and update statements.
fn bind_input<'f>(query: Boxed<'f>, input: &OrganizationInput) -> Boxed<'f> {
    let primary = input.primary().cloned().unwrap_or_default();
    query
        .bind::<Text, _>(input.legal_name.clone())
        .bind::<Text, _>(input.trade_name.clone())
        .bind::<Nullable<Text>, _>(input.siren.clone())
        .bind::<Nullable<Text>, _>(input.siret.clone())
        .bind::<Nullable<Text>, _>(input.naf_code.clone())
        .bind::<Nullable<Text>, _>(input.legal_form_code.clone())
        .bind::<SmallInt, _>(input.headcount_band)
        .bind::<Jsonb, _>(serde_json::to_value(&input.addresses).unwrap_or_default())
        .bind::<Text, _>(input.website.clone())
        .bind::<Text, _>(input.email.clone())
        .bind::<Text, _>(input.phone.clone())
        .bind::<Array<Text>, _>(input.tags.clone())
        .bind::<Text, _>(input.description.clone())
        .bind::<Jsonb, _>(input.external_refs.clone())
        .bind::<Text, _>(primary.postal_code)
        .bind::<Text, _>(primary.city)
        .bind::<Text, _>(primary.department_code)
}

/// Writes `input` over the record `id` if it is still at `version` (else
/// `ABORTED`: someone changed it since it was read).
pub(crate) async fn write(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    input: &OrganizationInput,
) -> Result<(), Error> {
    let query = diesel::sql_query(
        "UPDATE organizations SET legal_name = $1, trade_name = $2, siren = $3, siret = $4,
                            naf_code = $5, legal_form_code = $6, headcount_band = $7, addresses = $8, website = $9,
                            email = $10, phone = $11, tags = $12, description = $13, external_refs = $14,
                            postal_code = $15, city = $16, department_code = $17,
                            version = version + 1, update_time = now()
                         WHERE id = $18 AND version = $19",
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

/// The fields an update may name.
const UPDATABLE: &[&str] = &[
    "legal_name",
    "trade_name",
    "siren",
    "siret",
    "naf_code",
    "legal_form_code",
    "headcount_band",
    "addresses",
    "website",
    "email",
    "phone",
    "tags",
    "description",
    "external_refs",
];

/// Copies the fields named in `mask` from `from` into `into`.
fn apply_mask(into: &mut Organization, from: Organization, mask: &FieldMask) {
    let Organization {
        legal_name,
        trade_name,
        siren,
        siret,
        naf_code,
        legal_form_code,
        headcount_band,
        addresses,
        website,
        email,
        phone,
        tags,
        description,
        external_refs,
        ..
    } = from;
    let set = |path: &str| mask.contains(path);
    if set("legal_name") {
        into.legal_name = legal_name;
    }
    if set("trade_name") {
        into.trade_name = trade_name;
    }
    if set("siren") {
        into.siren = siren;
        // A SIREN without the SIRET it was filled from: drop the SIRET too
        // unless it is part of the update.
        if !set("siret") && !into.siret.starts_with(&into.siren) {
            into.siret.clear();
        }
    }
    if set("siret") {
        into.siret = siret;
        if !set("siren") {
            into.siren.clear();
        }
    }
    if set("naf_code") {
        into.naf_code = naf_code;
    }
    if set("legal_form_code") {
        into.legal_form_code = legal_form_code;
    }
    if set("headcount_band") {
        into.headcount_band = headcount_band;
    }
    if set("addresses") {
        into.addresses = addresses;
    }
    if set("website") {
        into.website = website;
    }
    if set("email") {
        into.email = email;
    }
    if set("phone") {
        into.phone = phone;
    }
    if set("tags") {
        into.tags = tags;
    }
    if set("description") {
        into.description = description;
    }
    if set("external_refs") {
        into.external_refs = external_refs;
    }
}

/// The SQL order and keyset condition of a list order.
struct Order {
    sql: &'static str,
    after: &'static str,
    key: fn(&OrganizationRow) -> String,
}

fn order(order_by: &str) -> Result<Order, Error> {
    Ok(match order_by.trim() {
        "" | "legal_name" => Order {
            sql: "o.name_key, o.id",
            after: "(o.name_key, o.id) > ($16::text, $17::uuid)",
            key: |r| r.name_key.clone(),
        },
        "update_time desc" => Order {
            sql: "o.update_time DESC, o.id DESC",
            after: "(o.update_time, o.id) < ($16::timestamptz, $17::uuid)",
            key: |r| r.update_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
        "create_time desc" => Order {
            sql: "o.create_time DESC, o.id DESC",
            after: "(o.create_time, o.id) < ($16::timestamptz, $17::uuid)",
            key: |r| r.create_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
        "member_since_date" => Order {
            sql: "coalesce(o.member_since, '9999-12-31'::date), o.id",
            after: "(coalesce(o.member_since, '9999-12-31'::date), o.id) > ($16::date, $17::uuid)",
            key: |r| r.member_since.map_or_else(|| "9999-12-31".to_owned(), |d| d.to_string()),
        },
        _ => {
            return Err(Error::invalid_field(
                "order_by",
                "must be one of: legal_name, update_time desc, create_time desc, member_since_date",
            ));
        }
    })
}

/// The filters of a list or an export, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filters {
    tags: Vec<String>,
    statuses: Vec<i16>,
    membership_type: Option<Uuid>,
    naf_prefixes: Vec<String>,
    departments: Vec<String>,
    postal_code: String,
    city: String,
    bands: Vec<i16>,
    query: String,
    include_merged: bool,
}

impl Filters {
    /// A stable text form, for page tokens.
    fn fingerprint(&self, entity: Uuid, descendants: bool, order: &str) -> String {
        format!("{entity}|{descendants}|{order}|{self:?}")
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn filters(
    tags: &[String],
    statuses: &[i32],
    membership_type_id: &str,
    naf_codes: &[String],
    departments: &[String],
    postal_code: &str,
    city: &str,
    bands: &[i32],
    query: &str,
    include_merged: bool,
) -> Result<Filters, Error> {
    let mut v = Violations::new();
    let mut f = Filters { include_merged, ..Filters::default() };
    match validate::normalize_tags(tags) {
        Ok(t) => f.tags = t,
        Err((i, r)) => v.add(format!("tags[{i}]"), validate::describe(r)),
    }
    for (i, s) in statuses.iter().enumerate() {
        match MembershipStatus::try_from(*s) {
            Ok(MembershipStatus::Unspecified) | Err(_) => v.add(format!("membership_statuses[{i}]"), "statut inconnu"),
            Ok(s) => f.statuses.push(s as i16),
        }
    }
    match socle_api::parse_optional_id("membership_type_id", membership_type_id) {
        Ok(id) => f.membership_type = id,
        Err(e) => absorb(&mut v, e)?,
    }
    for (i, naf) in naf_codes.iter().enumerate() {
        let cleaned: String = naf.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_uppercase();
        let ok = (2..=6).contains(&cleaned.len())
            && cleaned.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            && cleaned.chars().take(2).all(|c| c.is_ascii_digit());
        if ok {
            // `1071` and `10.71` are the same prefix.
            let normalized = if cleaned.len() > 2 && !cleaned.contains('.') {
                format!("{}.{}", &cleaned[..2], &cleaned[2..])
            } else {
                cleaned
            };
            f.naf_prefixes.push(format!("{}%", like_literal(&normalized)));
        } else {
            v.add(format!("naf_codes[{i}]"), "préfixe de code NAF attendu, par exemple 10.71 ou 62");
        }
    }
    for (i, d) in departments.iter().enumerate() {
        let d = d.trim().to_ascii_uppercase();
        let ok = matches!(d.len(), 2 | 3) && d.chars().all(|c| c.is_ascii_alphanumeric());
        if ok {
            f.departments.push(d);
        } else {
            v.add(format!("department_codes[{i}]"), "code de département attendu, par exemple 69, 2A ou 974");
        }
    }
    let postal: String = postal_code.chars().filter(|c| !c.is_whitespace()).collect();
    v.check(
        postal.len() <= 5 && postal.chars().all(|c| c.is_ascii_digit()),
        "postal_code",
        "début de code postal attendu",
    );
    f.postal_code = postal;
    f.city = sql_fold(city.trim());
    for (i, b) in bands.iter().enumerate() {
        match HeadcountBand::try_from(*b) {
            Ok(HeadcountBand::Unspecified) | Err(_) => v.add(format!("headcount_bands[{i}]"), "tranche inconnue"),
            Ok(b) => f.bands.push(b as i16),
        }
    }
    f.query = query.trim().to_owned();
    v.check(f.query.chars().count() <= 200, "query", "au plus 200 caractères");
    v.into_result()?;
    f.statuses.sort_unstable();
    f.statuses.dedup();
    f.bands.sort_unstable();
    f.bands.dedup();
    Ok(f)
}

/// The `WHERE` clause of lists and exports over `organizations o`: binds
/// $1 (entities) to $15; the keyset binds are $16 and $17.
pub(crate) fn where_sql() -> String {
    format!(
        "o.entity_id = ANY($1)
         AND ($2 OR o.state = 1)
         AND o.tags @> $3
         AND (cardinality($4::smallint[]) = 0 OR crm_membership_status(o.latest_membership_id,
              o.latest_membership_cancelled, o.member_since, o.latest_membership_end,
              o.latest_membership_grace_end, {TODAY_SQL}) = ANY($4))
         AND ($5::uuid IS NULL OR o.latest_membership_type_id = $5)
         AND (cardinality($6::text[]) = 0 OR o.naf_code LIKE ANY($6))
         AND (cardinality($7::text[]) = 0 OR o.department_code = ANY($7))
         AND ($8 = '' OR o.postal_code LIKE $8 || '%')
         AND ($9 = '' OR o.city_key = $9)
         AND (cardinality($10::smallint[]) = 0 OR o.headcount_band = ANY($10))
         AND ($11 = '' OR o.name_key LIKE $11 || '%' OR o.trade_key LIKE $11 || '%'
              OR ($12 <> '' AND (o.siren LIKE $12 || '%' OR o.siret LIKE $12 || '%')))
         AND $13 AND $14 AND $15"
    )
}

/// Binds the filters of [`where_sql`] ($1 to $15).
pub(crate) fn bind_filters<'f>(query: Boxed<'f>, entities: Vec<Uuid>, f: &Filters) -> Boxed<'f> {
    let folded_query = like_literal(&sql_fold(&f.query));
    let digits: String = f.query.chars().filter(|c| !c.is_whitespace()).collect();
    let digits = if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) { digits } else { String::new() };
    query
        .bind::<Array<SqlUuid>, _>(entities)
        .bind::<Bool, _>(f.include_merged)
        .bind::<Array<Text>, _>(f.tags.clone())
        .bind::<Array<SmallInt>, _>(f.statuses.clone())
        .bind::<Nullable<SqlUuid>, _>(f.membership_type)
        .bind::<Array<Text>, _>(f.naf_prefixes.clone())
        .bind::<Array<Text>, _>(f.departments.clone())
        .bind::<Text, _>(like_literal(&f.postal_code))
        .bind::<Text, _>(f.city.clone())
        .bind::<Array<SmallInt>, _>(f.bands.clone())
        .bind::<Text, _>(folded_query)
        .bind::<Text, _>(digits)
        // Reserved for later filters, always true for now.
        .bind::<Bool, _>(true)
        .bind::<Bool, _>(true)
        .bind::<Bool, _>(true)
}

/// The statement of a list page: $1 to $15 the filters ([`where_sql`]),
/// $16 and $17 the keyset position (NULL for the first page).
fn list_sql(order: &Order, size: usize) -> String {
    format!(
        "SELECT {COLUMNS}, {} FROM organizations o WHERE {} AND ($16::text IS NULL OR {})
         ORDER BY {} LIMIT {}",
        computed_columns(),
        where_sql(),
        order.after,
        order.sql,
        size + 1
    )
}

/// The statement `ListOrganizations` sends for a first page in the default
/// order, with every bind of an unfiltered list of `entity` written as a
/// literal: what `cargo xtask bench crm` gives pgbench, so that the
/// database's own throughput on the same SQL is the baseline.
pub fn first_page_sql_for(entity: Uuid, page_size: usize) -> String {
    let sql = list_sql(&order("").expect("the default order"), page_size);
    let literals = [
        format!("ARRAY['{entity}']::uuid[]"),
        "false".into(),
        "'{}'::text[]".into(),
        "'{}'::smallint[]".into(),
        "NULL::uuid".into(),
        "'{}'::text[]".into(),
        "'{}'::text[]".into(),
        "''::text".into(),
        "''::text".into(),
        "'{}'::smallint[]".into(),
        "''::text".into(),
        "''::text".into(),
        "true".into(),
        "true".into(),
        "true".into(),
        "NULL::text".into(),
        "NULL::uuid".into(),
    ];
    // Highest numbers first, so that `$1` does not match inside `$16`.
    literals.iter().enumerate().rev().fold(sql, |sql, (i, literal)| sql.replace(&format!("${}", i + 1), literal))
}

/// The entity ids of a scope, for the explicit entity filter of lists (also
/// enforced by row-level security).
pub(crate) fn scope_ids(scope: &EntityScope, entity: Uuid) -> Vec<Uuid> {
    match scope {
        EntityScope::Entities(ids) => ids.clone(),
        EntityScope::System => vec![entity],
    }
}

impl Crm {
    pub async fn create_organization(
        &self,
        caller: &Caller,
        r: CreateOrganizationRequest,
    ) -> Result<CreateOrganizationResponse, Error> {
        let mut v = Violations::new();
        let key = parse_id("request_id", &r.request_id).map_err(|e| absorb(&mut v, e)).err();
        let org = r.organization.unwrap_or_default();
        let entity = match parse_id("organization.entity_id", &org.entity_id) {
            Ok(id) => Some(id),
            Err(e) => {
                absorb(&mut v, e)?;
                None
            }
        };
        let input = match validate(&org, "organization", true) {
            Ok(input) => Some(input),
            Err(e) => {
                absorb(&mut v, e)?;
                None
            }
        };
        v.into_result()?;
        let (Some(entity), Some(input)) = (entity, input) else { return Err(Error::internal("validated")) };
        if let Some(Err(e)) = key {
            return Err(e);
        }
        let key = parse_id("request_id", &r.request_id)?;
        let readable = self.scope(&caller.with_acting(entity), "crm.organizations.read").await?;
        let allow = r.allow_duplicates;
        let write_scope = EntityScope::entity(entity);
        let tx_scope = write_scope.clone();
        self.db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let id = match idempotency::claim(conn, "CreateOrganization", key, Uuid::now_v7()).await? {
                        idempotency::Claim::Existing(id) => {
                            socle_db::set_scope(conn, &readable).await.map_err(DbError::from)?;
                            let row = load(conn, id).await?.ok_or_else(|| {
                                Error::new(Code::AlreadyExists, "this request_id was used for another record")
                            })?;
                            return Ok(CreateOrganizationResponse {
                                organization: Some(row.to_proto()),
                                duplicates: Vec::new(),
                            });
                        }
                        idempotency::Claim::New(id) => id,
                    };
                    let duplicates = find_duplicates(conn, &input, None, 10, &readable, &[]).await?;
                    if !duplicates.is_empty() && !allow {
                        return Err(duplicate_conflict(duplicates));
                    }
                    socle_db::set_scope(conn, &write_scope).await.map_err(DbError::from)?;
                    let created = insert(conn, id, entity, &input).await?;
                    Ok(CreateOrganizationResponse { organization: Some(created), duplicates })
                })
            })
            .await
    }

    pub async fn get_organization(&self, caller: &Caller, id: &str) -> Result<Organization, Error> {
        let id = parse_id("organization_id", id)?;
        let scope = self.scope(caller, "crm.organizations.read").await?;
        let row = self.db.transaction(&scope, move |conn| Box::pin(async move { load(conn, id).await })).await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(self.not_found(caller, "organizations", id, "crm.organizations.read", "organization").await),
        }
    }

    pub async fn list_organizations(
        &self,
        caller: &Caller,
        r: ListOrganizationsRequest,
    ) -> Result<ListOrganizationsResponse, Error> {
        let size = page_size(r.page_size)?;
        let entity = caller.entity_or_acting("entity_id", &r.entity_id)?;
        let order_by = r.order_by.trim().to_owned();
        let order = order(&order_by)?;
        let f = filters(
            &r.tags,
            &r.membership_statuses,
            &r.membership_type_id,
            &r.naf_codes,
            &r.department_codes,
            &r.postal_code,
            &r.city,
            &r.headcount_bands,
            &r.query,
            r.include_merged,
        )?;
        let fingerprint = f.fingerprint(entity, r.include_descendants, &order_by);
        let after = PageToken::<(String, Uuid)>::decode(&r.page_token, &fingerprint)?.map(|t| t.after);
        let scope = self.list_scope(caller, "crm.organizations.read", entity, r.include_descendants).await?;
        let entities = scope_ids(&scope, entity);
        let sql = list_sql(&order, size);
        let mut rows: Vec<OrganizationRow> = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let query = bind_filters(diesel::sql_query(sql).into_boxed(), entities, &f)
                        .bind::<Nullable<Text>, _>(after.as_ref().map(|a| a.0.clone()))
                        .bind::<Nullable<SqlUuid>, _>(after.as_ref().map(|a| a.1));
                    query.load(conn).await.map_err(DbError::from)
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
        Ok(ListOrganizationsResponse {
            organizations: rows.iter().map(OrganizationRow::to_proto).collect(),
            next_page_token,
        })
    }

    pub async fn update_organization(
        &self,
        caller: &Caller,
        r: UpdateOrganizationRequest,
    ) -> Result<Organization, Error> {
        let id = parse_id("organization_id", &r.organization_id)?;
        let mask = FieldMask::new(r.update_mask.as_ref(), UPDATABLE)?;
        let changes = r.organization.ok_or_else(|| Error::invalid_field("organization", "is required"))?;
        if r.etag.is_empty() {
            return Err(Error::invalid_field("etag", "is required: send the etag last read"));
        }
        let scope = self.scope(caller, "crm.organizations.update").await?;
        let readable = self.scope(caller, "crm.organizations.read").await?;
        let (etag_given, allow) = (r.etag.clone(), r.allow_duplicates);
        let tx_scope = scope.clone();
        let result = self
            .db
            .transaction(&tx_scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok(None) };
                    check_etag(&etag_given, current.version, true)?;
                    if current.state != OrganizationState::Active as i16 {
                        return Err(Error::new(Code::FailedPrecondition, "a merged organisation cannot be changed"));
                    }
                    let before = current.to_proto();
                    let mut next = before.clone();
                    apply_mask(&mut next, changes, &mask);
                    let input = validate(&next, "organization", true)?;
                    let identity_changed = ["legal_name", "siren", "siret", "email", "phone", "addresses"]
                        .iter()
                        .any(|p| mask.contains(p));
                    if identity_changed && !allow {
                        // Only the candidates the change brings are refused: a
                        // duplicate already known before the change does not
                        // block unrelated edits.
                        let known = validate(&before, "organization", false)?;
                        let mut known: Vec<Uuid> =
                            hints(conn, &known, Some(id), 50).await?.iter().map(|h| h.id).collect();
                        // Pairs reviewed as not duplicates are not proposed again.
                        known.extend(crate::duplicates::dismissed_partners(conn, RecordKind::Organization, id).await?);
                        let duplicates = find_duplicates(conn, &input, Some(id), 10, &readable, &known).await?;
                        socle_db::set_scope(conn, &scope).await.map_err(DbError::from)?;
                        if !duplicates.is_empty() {
                            return Err(duplicate_conflict(duplicates));
                        }
                    }
                    write(conn, id, current.version, &input).await?;
                    let after = load(conn, id).await?.ok_or_else(|| Error::internal("updated row not found"))?;
                    let after = after.to_proto();
                    audit(conn, "crm.organizations.update", Some(&before), Some(&after)).await?;
                    Ok(Some(after))
                })
            })
            .await?;
        match result {
            Some(org) => Ok(org),
            None => Err(self.not_found(caller, "organizations", id, "crm.organizations.update", "organization").await),
        }
    }

    pub async fn delete_organization(&self, caller: &Caller, r: DeleteOrganizationRequest) -> Result<(), Error> {
        let id = parse_id("organization_id", &r.organization_id)?;
        let scope = self.scope(caller, "crm.organizations.delete").await?;
        let (etag_given, force) = (r.etag.clone(), r.force);
        let found = self
            .db
            .transaction(&scope, move |conn| {
                Box::pin(async move {
                    let Some(current) = load_for_update(conn, id).await? else { return Ok::<_, Error>(false) };
                    check_etag(&etag_given, current.version, false)?;
                    let memberships: Count =
                        diesel::sql_query("SELECT count(*) AS n FROM memberships WHERE organization_id = $1")
                            .bind::<SqlUuid, _>(id)
                            .get_result(conn)
                            .await
                            .map_err(DbError::from)?;
                    if memberships.n > 0 && !force {
                        return Err(Error::new(
                            Code::FailedPrecondition,
                            format!(
                                "l'organisation a {} adhésion(s) : supprimez-les d'abord, ou forcez la suppression (force)",
                                memberships.n
                            ),
                        )
                        .with_reason("HAS_MEMBERSHIPS"));
                    }
                    let before = current.to_proto();
                    // Merged organisations pointing here keep their history
                    // but lose the link (the merge cannot be undone any more).
                    diesel::sql_query("UPDATE organizations SET merged_into_id = NULL WHERE merged_into_id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    diesel::sql_query("DELETE FROM organizations WHERE id = $1")
                        .bind::<SqlUuid, _>(id)
                        .execute(conn)
                        .await
                        .map_err(DbError::from)?;
                    audit(conn, "crm.organizations.delete", Some(&before), None).await?;
                    Ok(true)
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_found(caller, "organizations", id, "crm.organizations.delete", "organization").await)
        }
    }

    pub async fn find_organization_duplicates(
        &self,
        caller: &Caller,
        r: FindOrganizationDuplicatesRequest,
    ) -> Result<Vec<DuplicateCandidate>, Error> {
        let org = r.organization.unwrap_or_default();
        let entity = parse_id("organization.entity_id", &org.entity_id)?;
        let input = validate(&org, "organization", false)?;
        let exclude = socle_api::parse_optional_id("exclude_organization_id", &r.exclude_organization_id)?;
        let limit = match r.max_candidates {
            n if n < 0 => return Err(Error::invalid_field("max_candidates", "must not be negative")),
            0 => 10,
            n => n.min(50),
        };
        let readable = self.scope(&caller.with_acting(entity), "crm.organizations.read").await?;
        let scope = readable.clone();
        self.db
            .transaction(&scope, move |conn| {
                Box::pin(async move { find_duplicates(conn, &input, exclude, limit, &readable, &[]).await })
            })
            .await
    }
}

/// [`load`] with the row locked for the rest of the transaction.
pub(crate) async fn load_for_update(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<OrganizationRow>, Error> {
    diesel::sql_query("SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await
        .map_err(DbError::from)?;
    load(conn, id).await
}

/// The gRPC adapter.
#[tonic::async_trait]
impl OrganizationService for Crm {
    async fn create_organization(
        &self,
        request: Request<CreateOrganizationRequest>,
    ) -> Result<Response<CreateOrganizationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::create_organization(self, &caller, request.into_inner()).await, request_id)
    }

    async fn get_organization(
        &self,
        request: Request<GetOrganizationRequest>,
    ) -> Result<Response<GetOrganizationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::get_organization(self, &caller, &request.get_ref().organization_id).await;
        reply(result.map(|o| GetOrganizationResponse { organization: Some(o) }), request_id)
    }

    async fn list_organizations(
        &self,
        request: Request<ListOrganizationsRequest>,
    ) -> Result<Response<ListOrganizationsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::list_organizations(self, &caller, request.into_inner()).await, request_id)
    }

    async fn update_organization(
        &self,
        request: Request<UpdateOrganizationRequest>,
    ) -> Result<Response<UpdateOrganizationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::update_organization(self, &caller, request.into_inner()).await;
        reply(result.map(|o| UpdateOrganizationResponse { organization: Some(o) }), request_id)
    }

    async fn delete_organization(
        &self,
        request: Request<DeleteOrganizationRequest>,
    ) -> Result<Response<DeleteOrganizationResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::delete_organization(self, &caller, request.into_inner()).await;
        reply(result.map(|()| DeleteOrganizationResponse {}), request_id)
    }

    async fn find_organization_duplicates(
        &self,
        request: Request<FindOrganizationDuplicatesRequest>,
    ) -> Result<Response<FindOrganizationDuplicatesResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::find_organization_duplicates(self, &caller, request.into_inner()).await;
        reply(result.map(|candidates| FindOrganizationDuplicatesResponse { candidates }), request_id)
    }

    async fn preview_organization_merge(
        &self,
        request: Request<PreviewOrganizationMergeRequest>,
    ) -> Result<Response<PreviewOrganizationMergeResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::preview_organization_merge(self, &caller, request.into_inner()).await, request_id)
    }

    async fn merge_organizations(
        &self,
        request: Request<MergeOrganizationsRequest>,
    ) -> Result<Response<MergeOrganizationsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::merge_organizations(self, &caller, request.into_inner()).await, request_id)
    }

    async fn import_organizations(
        &self,
        request: Request<tonic::Streaming<ImportOrganizationsRequest>>,
    ) -> Result<Response<ImportOrganizationsResponse>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        let result = Crm::import(self, &caller, crate::imports::Kind::Organizations, None, request.into_inner()).await;
        reply(result.map(|job| ImportOrganizationsResponse { import_job: Some(job) }), request_id)
    }

    async fn export_organizations(
        &self,
        request: Request<ExportOrganizationsRequest>,
    ) -> Result<Response<crate::exports::Pieces<ExportOrganizationsResponse>>, Status> {
        let (request_id, caller) = (rid(&request), Caller::of(&request));
        reply(Crm::export_organizations(self, &caller, request.into_inner()).await, request_id)
    }
}
